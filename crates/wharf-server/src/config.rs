//! Server configuration: flag > `WHARF_*` environment variable > config file (TOML) > default.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use wharf_storage::{ParseSyncPolicyError, SyncPolicy};

/// The address `wharf serve` listens on by default.
pub const DEFAULT_BIND: &str = "127.0.0.1:5800";
/// The address the TLS listener listens on by default (when a certificate is configured).
pub const DEFAULT_TLS_BIND: &str = "127.0.0.1:5801";
/// Where durable state lives by default.
pub const DEFAULT_DATA_DIR: &str = "./wharf-data";

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// A password in the configuration: never shown by `Debug`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Everything the server needs to run, fully resolved.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Listen address (port 0 picks an ephemeral port).
    pub bind: SocketAddr,
    /// Whether the plaintext listener (on `bind`) runs; off, only TLS clients are served.
    pub plaintext: bool,
    /// The TLS listener's address (used when `tls_cert` is set).
    pub tls_bind: SocketAddr,
    /// The server's certificate chain (PEM); with `tls_key`, turns the TLS listener on.
    pub tls_cert: Option<PathBuf>,
    /// The server's private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// CA certificates (PEM) client certificates are verified against; set, a client may log
    /// in with SASL `EXTERNAL` as its certificate's common name.
    pub tls_client_ca: Option<PathBuf>,
    /// Whether a TLS client must present a certificate `tls_client_ca` verifies.
    pub tls_require_client_cert: bool,
    /// Directory for durable state.
    pub data_dir: PathBuf,
    /// Log format.
    pub log_format: LogFormat,
    /// Heartbeat interval offered to clients; a peer silent for twice this is dead.
    pub heartbeat: Duration,
    /// Largest frame accepted.
    pub frame_bytes_max: u32,
    /// Unconfirmed publishes a connection may have before the server stops reading it.
    pub publishes_in_flight_max: u32,
    /// Open connections at most; more are refused with `ResourceLimit`. Sockets still in the
    /// handshake count too, and the open-file limit lowers it further (see
    /// [`crate::resources::FdLimit::sockets`]).
    pub connections_max: usize,
    /// Consumers one connection may hold at most.
    pub consumers_per_connection_max: usize,
    /// Connections one user may hold at once (0: no limit beyond `connections_max`).
    pub connections_per_user_max: usize,
    /// Queues the broker holds at most.
    pub queues_max: usize,
    /// Exchanges the broker holds at most (the built-in ones included).
    pub exchanges_max: usize,
    /// The memory alarm, in bytes: publishers of growing queues are paused while the message
    /// bytes the broker holds (ready, unacked, queued for sockets, in read buffers) exceed it. 0: use
    /// [`ServerConfig::memory_high_watermark_fraction`] of the machine's memory.
    pub memory_high_watermark_bytes: u64,
    /// The memory alarm as a fraction of the machine's (or the cgroup's) memory, used when
    /// [`ServerConfig::memory_high_watermark_bytes`] is 0 (RabbitMQ's default: 0.4).
    pub memory_high_watermark_fraction: f64,
    /// Persistent publishes are refused while the data directory's file system has less free
    /// space than this many bytes (RabbitMQ's default: 50 MB) ...
    pub disk_free_limit_bytes: u64,
    /// ... or than this fraction of its size, whichever is more (0: only the bytes).
    pub disk_free_limit_fraction: f64,
    /// How long a client may take to send its preamble and `Hello`.
    pub handshake_timeout: Duration,
    /// The user created at the first start (when the data directory has no users file).
    pub default_user: String,
    /// Its password.
    pub default_pass: Secret,
    /// Whether clients may log in with SASL `ANONYMOUS` (no user).
    pub allow_anonymous: bool,
    /// The user whose permissions an `ANONYMOUS` login has (RabbitMQ 4's
    /// `anonymous_login_user`); it is subject to `loopback_users` like a login by name.
    pub anonymous_login_user: String,
    /// Users that may only log in from a loopback address (RabbitMQ's `loopback_users`).
    pub loopback_users: Vec<String>,
    /// How long after its `Hello` a refused login is answered (whatever the reason, so the
    /// timing does not tell an unknown user from a wrong password, and guessing is slow).
    pub auth_failure_delay: Duration,
    /// How long a frame that has begun may take to arrive whole (time spent reading only).
    pub frame_timeout: Duration,
    /// A connection whose socket accepts nothing for this long while output waits for it is
    /// closed as a slow consumer (`SlowConsumer`) and its unacked deliveries are requeued.
    pub slow_consumer_timeout: Duration,
    /// How long graceful shutdown waits for connections to flush.
    pub shutdown_timeout: Duration,
    /// When the write-ahead log is fsynced relative to confirms.
    pub sync_policy: SyncPolicy,
    /// Log bytes after which a checkpoint is considered.
    pub checkpoint_bytes: u64,
    /// Log segment file size.
    pub segment_bytes: u64,
    /// Ready messages a durable queue keeps in memory; later arrivals are paged to a spool
    /// file until it drains (queues larger than memory). 0: never page.
    pub queue_memory_messages: usize,
    /// The same limit in body bytes (paging starts at whichever is reached first). 0: no
    /// byte limit.
    pub queue_memory_bytes: u64,
    /// Whether transient queues larger than memory page too (to spool files, never to the
    /// log); `false`: they stay in memory and the memory alarm pauses their publishers.
    pub transient_queues_page: bool,
    /// Publisher flow control: ready messages in a queue, with consumers keeping up with it,
    /// above which its publishers are paused until the consumers bring it to half. 0: off.
    pub flow_ready_messages: u64,
    /// The same limit in body bytes (whichever is reached first). 0: no byte limit.
    pub flow_ready_bytes: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            bind: DEFAULT_BIND.parse().expect("valid default address"),
            plaintext: true,
            tls_bind: DEFAULT_TLS_BIND.parse().expect("valid default address"),
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            tls_require_client_cert: false,
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            log_format: LogFormat::Text,
            heartbeat: Duration::from_millis(u64::from(wharf_protocol::limits::HEARTBEAT_MS)),
            frame_bytes_max: wharf_protocol::limits::FRAME_BYTES_MAX,
            publishes_in_flight_max: wharf_protocol::limits::PUBLISHES_IN_FLIGHT_MAX,
            connections_max: crate::limits::CONNECTIONS_MAX,
            consumers_per_connection_max: wharf_core::limits::CONSUMERS_PER_CONNECTION_MAX,
            connections_per_user_max: 0,
            queues_max: wharf_core::limits::QUEUES_MAX,
            exchanges_max: wharf_core::limits::EXCHANGES_MAX,
            memory_high_watermark_bytes: 0,
            memory_high_watermark_fraction: crate::limits::MEMORY_HIGH_WATERMARK_FRACTION,
            disk_free_limit_bytes: crate::limits::DISK_FREE_LIMIT_BYTES,
            disk_free_limit_fraction: 0.0,
            handshake_timeout: crate::limits::HANDSHAKE_TIMEOUT,
            default_user: "guest".to_owned(),
            default_pass: Secret("guest".to_owned()),
            allow_anonymous: false,
            anonymous_login_user: "guest".to_owned(),
            loopback_users: vec!["guest".to_owned()],
            auth_failure_delay: crate::limits::AUTH_FAILURE_DELAY,
            frame_timeout: crate::limits::FRAME_TIMEOUT,
            slow_consumer_timeout: crate::limits::SLOW_CONSUMER_TIMEOUT,
            shutdown_timeout: crate::limits::SHUTDOWN_TIMEOUT,
            sync_policy: SyncPolicy::Always,
            checkpoint_bytes: crate::persist::checkpoint::CHECKPOINT_BYTES_DEFAULT,
            segment_bytes: 64 * 1024 * 1024,
            queue_memory_messages: crate::limits::QUEUE_MEMORY_MESSAGES,
            queue_memory_bytes: crate::limits::QUEUE_MEMORY_BYTES,
            transient_queues_page: true,
            flow_ready_messages: crate::limits::FLOW_READY_MESSAGES,
            flow_ready_bytes: crate::limits::FLOW_READY_BYTES,
        }
    }
}

impl ServerConfig {
    /// A configuration for tests: ephemeral port on 127.0.0.1 and the given data directory.
    pub fn ephemeral(data_dir: impl Into<PathBuf>) -> Self {
        ServerConfig {
            bind: "127.0.0.1:0".parse().expect("valid address"),
            tls_bind: "127.0.0.1:0".parse().expect("valid address"),
            data_dir: data_dir.into(),
            ..ServerConfig::default()
        }
    }
}

/// The config file: every key optional; unknown keys are an error (a typo must not be silently
/// ignored).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// See [`ServerConfig::bind`].
    pub bind: Option<SocketAddr>,
    /// See [`ServerConfig::plaintext`].
    pub plaintext: Option<bool>,
    /// See [`ServerConfig::tls_bind`].
    pub tls_bind: Option<SocketAddr>,
    /// See [`ServerConfig::tls_cert`].
    pub tls_cert: Option<PathBuf>,
    /// See [`ServerConfig::tls_key`].
    pub tls_key: Option<PathBuf>,
    /// See [`ServerConfig::tls_client_ca`].
    pub tls_client_ca: Option<PathBuf>,
    /// See [`ServerConfig::tls_require_client_cert`].
    pub tls_require_client_cert: Option<bool>,
    /// See [`ServerConfig::data_dir`].
    pub data_dir: Option<PathBuf>,
    /// See [`ServerConfig::log_format`].
    pub log_format: Option<LogFormat>,
    /// Milliseconds; see [`ServerConfig::heartbeat`].
    pub heartbeat_ms: Option<u64>,
    /// See [`ServerConfig::frame_bytes_max`].
    pub frame_bytes_max: Option<u32>,
    /// See [`ServerConfig::publishes_in_flight_max`].
    pub publishes_in_flight_max: Option<u32>,
    /// See [`ServerConfig::connections_max`].
    pub connections_max: Option<usize>,
    /// See [`ServerConfig::consumers_per_connection_max`].
    pub consumers_per_connection_max: Option<usize>,
    /// See [`ServerConfig::connections_per_user_max`].
    pub connections_per_user_max: Option<usize>,
    /// See [`ServerConfig::queues_max`].
    pub queues_max: Option<usize>,
    /// See [`ServerConfig::exchanges_max`].
    pub exchanges_max: Option<usize>,
    /// See [`ServerConfig::memory_high_watermark_bytes`].
    pub memory_high_watermark_bytes: Option<u64>,
    /// See [`ServerConfig::memory_high_watermark_fraction`].
    pub memory_high_watermark_fraction: Option<f64>,
    /// See [`ServerConfig::disk_free_limit_bytes`].
    pub disk_free_limit_bytes: Option<u64>,
    /// See [`ServerConfig::disk_free_limit_fraction`].
    pub disk_free_limit_fraction: Option<f64>,
    /// Milliseconds; see [`ServerConfig::handshake_timeout`].
    pub handshake_timeout_ms: Option<u64>,
    /// See [`ServerConfig::default_user`].
    pub default_user: Option<String>,
    /// See [`ServerConfig::default_pass`].
    pub default_pass: Option<Secret>,
    /// See [`ServerConfig::allow_anonymous`].
    pub allow_anonymous: Option<bool>,
    /// See [`ServerConfig::anonymous_login_user`].
    pub anonymous_login_user: Option<String>,
    /// See [`ServerConfig::loopback_users`].
    pub loopback_users: Option<Vec<String>>,
    /// Milliseconds; see [`ServerConfig::auth_failure_delay`].
    pub auth_failure_delay_ms: Option<u64>,
    /// Milliseconds; see [`ServerConfig::frame_timeout`].
    pub frame_timeout_ms: Option<u64>,
    /// Milliseconds; see [`ServerConfig::slow_consumer_timeout`].
    pub slow_consumer_timeout_ms: Option<u64>,
    /// `always`, `never` or `interval=MS`; see [`ServerConfig::sync_policy`].
    pub sync: Option<String>,
    /// See [`ServerConfig::checkpoint_bytes`].
    pub checkpoint_bytes: Option<u64>,
    /// See [`ServerConfig::segment_bytes`].
    pub segment_bytes: Option<u64>,
    /// See [`ServerConfig::queue_memory_messages`].
    pub queue_memory_messages: Option<usize>,
    /// See [`ServerConfig::queue_memory_bytes`].
    pub queue_memory_bytes: Option<u64>,
    /// See [`ServerConfig::transient_queues_page`].
    pub transient_queues_page: Option<bool>,
    /// See [`ServerConfig::flow_ready_messages`].
    pub flow_ready_messages: Option<u64>,
    /// See [`ServerConfig::flow_ready_bytes`].
    pub flow_ready_bytes: Option<u64>,
}

/// A config error: the file cannot be read or parsed, or a value is out of range.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("invalid config file {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        source: Box<toml::de::Error>,
    },
    /// A value is out of range.
    #[error("invalid setting {key}: {reason}")]
    Invalid {
        /// The setting.
        key: &'static str,
        /// Why.
        reason: String,
    },
}

impl FileConfig {
    /// Reads and parses a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })
    }
}

/// Values given on the command line or in `WHARF_*` variables (clap reads both; a flag wins).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--bind` / `WHARF_BIND`.
    pub bind: Option<SocketAddr>,
    /// `--data-dir` / `WHARF_DATA_DIR`.
    pub data_dir: Option<PathBuf>,
    /// `--log-format` / `WHARF_LOG_FORMAT`.
    pub log_format: Option<LogFormat>,
    /// `--sync` / `WHARF_SYNC`.
    pub sync: Option<String>,
    /// `--default-user` / `WHARF_DEFAULT_USER`.
    pub default_user: Option<String>,
    /// `--default-pass` / `WHARF_DEFAULT_PASS`.
    pub default_pass: Option<String>,
    /// `--tls-bind` / `WHARF_TLS_BIND`.
    pub tls_bind: Option<SocketAddr>,
    /// `--tls-cert` / `WHARF_TLS_CERT`.
    pub tls_cert: Option<PathBuf>,
    /// `--tls-key` / `WHARF_TLS_KEY`.
    pub tls_key: Option<PathBuf>,
    /// `--tls-client-ca` / `WHARF_TLS_CLIENT_CA`.
    pub tls_client_ca: Option<PathBuf>,
    /// `--tls-require-client-cert` (true when given).
    pub tls_require_client_cert: Option<bool>,
    /// `--no-plaintext` (false when given).
    pub plaintext: Option<bool>,
}

/// Resolves the final configuration: overrides > file > defaults.
pub fn resolve(
    overrides: Overrides,
    file: Option<FileConfig>,
) -> Result<ServerConfig, ConfigError> {
    let file = file.unwrap_or_default();
    let defaults = ServerConfig::default();
    let frame_bytes_max = file.frame_bytes_max.unwrap_or(defaults.frame_bytes_max);
    if frame_bytes_max < wharf_protocol::limits::FRAME_BYTES_MAX_FLOOR {
        return Err(ConfigError::Invalid {
            key: "frame_bytes_max",
            reason: format!(
                "must be at least {}",
                wharf_protocol::limits::FRAME_BYTES_MAX_FLOOR
            ),
        });
    }
    let heartbeat_ms = file
        .heartbeat_ms
        .unwrap_or(defaults.heartbeat.as_millis() as u64);
    if !(100..=3_600_000).contains(&heartbeat_ms) {
        return Err(ConfigError::Invalid {
            key: "heartbeat_ms",
            reason: "must be between 100 and 3600000".to_owned(),
        });
    }
    let publishes_in_flight_max = file
        .publishes_in_flight_max
        .unwrap_or(defaults.publishes_in_flight_max);
    if publishes_in_flight_max == 0 {
        return Err(ConfigError::Invalid {
            key: "publishes_in_flight_max",
            reason: "must be at least 1".to_owned(),
        });
    }
    let sync_policy = match overrides.sync.as_deref().or(file.sync.as_deref()) {
        Some(text) => text
            .parse()
            .map_err(|err: ParseSyncPolicyError| ConfigError::Invalid {
                key: "sync",
                reason: err.to_string(),
            })?,
        None => defaults.sync_policy,
    };
    let tls_cert = overrides.tls_cert.or(file.tls_cert);
    let tls_key = overrides.tls_key.or(file.tls_key);
    let tls_client_ca = overrides.tls_client_ca.or(file.tls_client_ca);
    let tls_require_client_cert = overrides
        .tls_require_client_cert
        .or(file.tls_require_client_cert)
        .unwrap_or(defaults.tls_require_client_cert);
    let plaintext = overrides
        .plaintext
        .or(file.plaintext)
        .unwrap_or(defaults.plaintext);
    if tls_cert.is_some() != tls_key.is_some() {
        return Err(ConfigError::Invalid {
            key: "tls_cert",
            reason: "tls_cert and tls_key go together".to_owned(),
        });
    }
    if !plaintext && tls_cert.is_none() {
        return Err(ConfigError::Invalid {
            key: "plaintext",
            reason: "with the plaintext listener off, tls_cert and tls_key are needed".to_owned(),
        });
    }
    if tls_require_client_cert && tls_client_ca.is_none() {
        return Err(ConfigError::Invalid {
            key: "tls_require_client_cert",
            reason: "needs tls_client_ca (the CA client certificates are verified against)"
                .to_owned(),
        });
    }
    if tls_client_ca.is_some() && tls_cert.is_none() {
        return Err(ConfigError::Invalid {
            key: "tls_client_ca",
            reason: "client certificates need the TLS listener (tls_cert and tls_key)".to_owned(),
        });
    }
    Ok(ServerConfig {
        sync_policy,
        checkpoint_bytes: file.checkpoint_bytes.unwrap_or(defaults.checkpoint_bytes),
        segment_bytes: file.segment_bytes.unwrap_or(defaults.segment_bytes),
        queue_memory_messages: file
            .queue_memory_messages
            .unwrap_or(defaults.queue_memory_messages),
        queue_memory_bytes: file
            .queue_memory_bytes
            .unwrap_or(defaults.queue_memory_bytes),
        transient_queues_page: file
            .transient_queues_page
            .unwrap_or(defaults.transient_queues_page),
        flow_ready_messages: file
            .flow_ready_messages
            .unwrap_or(defaults.flow_ready_messages),
        flow_ready_bytes: file.flow_ready_bytes.unwrap_or(defaults.flow_ready_bytes),
        bind: overrides.bind.or(file.bind).unwrap_or(defaults.bind),
        plaintext,
        tls_bind: overrides
            .tls_bind
            .or(file.tls_bind)
            .unwrap_or(defaults.tls_bind),
        tls_cert,
        tls_key,
        tls_client_ca,
        tls_require_client_cert,
        data_dir: overrides
            .data_dir
            .or(file.data_dir)
            .unwrap_or(defaults.data_dir),
        log_format: overrides
            .log_format
            .or(file.log_format)
            .unwrap_or(defaults.log_format),
        heartbeat: Duration::from_millis(heartbeat_ms),
        frame_bytes_max,
        publishes_in_flight_max,
        connections_max: positive(
            "connections_max",
            file.connections_max,
            defaults.connections_max,
        )?,
        connections_per_user_max: file
            .connections_per_user_max
            .unwrap_or(defaults.connections_per_user_max),
        consumers_per_connection_max: positive(
            "consumers_per_connection_max",
            file.consumers_per_connection_max,
            defaults.consumers_per_connection_max,
        )?,
        queues_max: positive("queues_max", file.queues_max, defaults.queues_max)?,
        exchanges_max: positive("exchanges_max", file.exchanges_max, defaults.exchanges_max)?,
        memory_high_watermark_bytes: file
            .memory_high_watermark_bytes
            .unwrap_or(defaults.memory_high_watermark_bytes),
        memory_high_watermark_fraction: match file.memory_high_watermark_fraction {
            // 0 would pause every publisher for good.
            Some(fraction) if fraction <= 0.0 => {
                return Err(ConfigError::Invalid {
                    key: "memory_high_watermark_fraction",
                    reason: format!("must be above 0 and at most 1, not {fraction}"),
                });
            }
            value => fraction(
                "memory_high_watermark_fraction",
                value,
                defaults.memory_high_watermark_fraction,
            )?,
        },
        disk_free_limit_bytes: file
            .disk_free_limit_bytes
            .unwrap_or(defaults.disk_free_limit_bytes),
        disk_free_limit_fraction: fraction(
            "disk_free_limit_fraction",
            file.disk_free_limit_fraction,
            defaults.disk_free_limit_fraction,
        )?,
        handshake_timeout: millis(
            "handshake_timeout_ms",
            file.handshake_timeout_ms,
            defaults.handshake_timeout,
        )?,
        frame_timeout: millis(
            "frame_timeout_ms",
            file.frame_timeout_ms,
            defaults.frame_timeout,
        )?,
        slow_consumer_timeout: millis(
            "slow_consumer_timeout_ms",
            file.slow_consumer_timeout_ms,
            defaults.slow_consumer_timeout,
        )?,
        default_user: overrides
            .default_user
            .or(file.default_user)
            .unwrap_or(defaults.default_user),
        default_pass: overrides
            .default_pass
            .map(Secret)
            .or(file.default_pass)
            .unwrap_or(defaults.default_pass),
        allow_anonymous: file.allow_anonymous.unwrap_or(defaults.allow_anonymous),
        anonymous_login_user: file
            .anonymous_login_user
            .unwrap_or(defaults.anonymous_login_user),
        loopback_users: file.loopback_users.unwrap_or(defaults.loopback_users),
        auth_failure_delay: match file.auth_failure_delay_ms {
            Some(ms) if ms > 10_000 => {
                return Err(ConfigError::Invalid {
                    key: "auth_failure_delay_ms",
                    reason: format!("must be at most 10000 ms, not {ms}"),
                });
            }
            Some(ms) => Duration::from_millis(ms),
            None => defaults.auth_failure_delay,
        },
        ..defaults
    })
}

/// A count that must be at least 1.
fn positive(key: &'static str, value: Option<usize>, default: usize) -> Result<usize, ConfigError> {
    match value {
        Some(0) => Err(ConfigError::Invalid {
            key,
            reason: "must be at least 1".to_owned(),
        }),
        value => Ok(value.unwrap_or(default)),
    }
}

/// A fraction from 0 to 1 (of memory or of a disk).
fn fraction(key: &'static str, value: Option<f64>, default: f64) -> Result<f64, ConfigError> {
    match value {
        Some(value) if !(0.0..=1.0).contains(&value) => Err(ConfigError::Invalid {
            key,
            reason: format!("must be from 0 to 1, not {value}"),
        }),
        value => Ok(value.unwrap_or(default)),
    }
}

/// A timeout in milliseconds: from 100 ms to one day.
fn millis(
    key: &'static str,
    value: Option<u64>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match value {
        Some(ms) if !(100..=86_400_000).contains(&ms) => Err(ConfigError::Invalid {
            key,
            reason: format!("must be from 100 to 86400000 ms, not {ms}"),
        }),
        Some(ms) => Ok(Duration::from_millis(ms)),
        None => Ok(default),
    }
}

impl ServerConfig {
    /// The memory alarm's threshold in bytes: the absolute setting, or the fraction of
    /// `total_memory` (the machine's, see [`crate::resources::total_memory`]; 4 GiB if unknown).
    pub fn memory_high_watermark(&self, total_memory: Option<u64>) -> u64 {
        if self.memory_high_watermark_bytes > 0 {
            return self.memory_high_watermark_bytes;
        }
        let total = total_memory.unwrap_or(4 << 30);
        (total as f64 * self.memory_high_watermark_fraction) as u64
    }

    /// The free space below which persistent publishes are refused, for a disk of `total` bytes.
    pub fn disk_free_limit(&self, total: u64) -> u64 {
        self.disk_free_limit_bytes
            .max((total as f64 * self.disk_free_limit_fraction) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_settings_that_cannot_work_are_refused() {
        let invalid =
            |text: &str| match resolve(Overrides::default(), Some(toml::from_str(text).unwrap())) {
                Err(ConfigError::Invalid { key, .. }) => key,
                other => panic!("{text}: {other:?}"),
            };
        assert_eq!(invalid("tls_cert = \"c.pem\""), "tls_cert");
        assert_eq!(invalid("tls_key = \"k.pem\""), "tls_cert");
        assert_eq!(invalid("plaintext = false"), "plaintext");
        assert_eq!(
            invalid("tls_cert = \"c\"\ntls_key = \"k\"\ntls_require_client_cert = true"),
            "tls_require_client_cert"
        );
        assert_eq!(invalid("tls_client_ca = \"ca\""), "tls_client_ca");
        let overrides = Overrides {
            tls_cert: Some("c.pem".into()),
            tls_key: Some("k.pem".into()),
            plaintext: Some(false),
            ..Overrides::default()
        };
        let config = resolve(overrides, None).unwrap();
        assert!(!config.plaintext);
        assert_eq!(config.tls_bind.port(), 5801);
    }

    #[test]
    fn flags_beat_file_and_file_beats_defaults() {
        let file: FileConfig = toml::from_str(
            "bind = \"127.0.0.1:7000\"\ndata_dir = \"/tmp/x\"\nheartbeat_ms = 500\n",
        )
        .unwrap();
        let overrides = Overrides {
            bind: Some("127.0.0.1:7001".parse().unwrap()),
            ..Overrides::default()
        };
        let config = resolve(overrides, Some(file)).unwrap();
        assert_eq!(config.bind.port(), 7001);
        assert_eq!(config.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(config.heartbeat, Duration::from_millis(500));
        assert_eq!(config.log_format, LogFormat::Text);
    }

    #[test]
    fn the_resource_and_login_keys_refuse_values_out_of_range() {
        let invalid = |text: &str| match resolve(
            Overrides::default(),
            Some(toml::from_str::<FileConfig>(text).expect("parses")),
        ) {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("{text}: expected Invalid, got {other:?}"),
        };
        assert_eq!(invalid("connections_max = 0"), "connections_max");
        assert_eq!(
            invalid("consumers_per_connection_max = 0"),
            "consumers_per_connection_max"
        );
        assert_eq!(invalid("queues_max = 0"), "queues_max");
        assert_eq!(invalid("exchanges_max = 0"), "exchanges_max");
        assert_eq!(
            invalid("memory_high_watermark_fraction = 0.0"),
            "memory_high_watermark_fraction"
        );
        assert_eq!(
            invalid("memory_high_watermark_fraction = 1.5"),
            "memory_high_watermark_fraction"
        );
        assert_eq!(
            invalid("disk_free_limit_fraction = -0.1"),
            "disk_free_limit_fraction"
        );
        assert_eq!(invalid("frame_timeout_ms = 5"), "frame_timeout_ms");
        assert_eq!(
            invalid("slow_consumer_timeout_ms = 100000000"),
            "slow_consumer_timeout_ms"
        );
        assert_eq!(invalid("handshake_timeout_ms = 0"), "handshake_timeout_ms");
        assert_eq!(
            invalid("auth_failure_delay_ms = 60000"),
            "auth_failure_delay_ms"
        );
        // In range: taken as given, and the derived limits follow.
        let file: FileConfig = toml::from_str(
            "memory_high_watermark_fraction = 0.5\ndisk_free_limit_fraction = 0.1\n\
             slow_consumer_timeout_ms = 2000\ndefault_pass = \"s3cret\"\n",
        )
        .unwrap();
        let config = resolve(Overrides::default(), Some(file)).unwrap();
        assert_eq!(config.memory_high_watermark(Some(1_000)), 500);
        assert_eq!(config.disk_free_limit(1_000_000_000), 100_000_000);
        assert_eq!(
            config.disk_free_limit(100_000_000),
            50_000_000,
            "the bytes floor"
        );
        assert_eq!(config.slow_consumer_timeout, Duration::from_secs(2));
        assert!(
            !format!("{config:?}").contains("s3cret"),
            "a password is never shown"
        );
        let absolute = ServerConfig {
            memory_high_watermark_bytes: 123,
            ..ServerConfig::default()
        };
        assert_eq!(absolute.memory_high_watermark(Some(1 << 40)), 123);
    }

    #[test]
    fn unknown_keys_and_out_of_range_values_are_errors() {
        assert!(toml::from_str::<FileConfig>("bnd = \"x\"").is_err());
        let file: FileConfig = toml::from_str("heartbeat_ms = 5").unwrap();
        assert!(matches!(
            resolve(Overrides::default(), Some(file)),
            Err(ConfigError::Invalid {
                key: "heartbeat_ms",
                ..
            })
        ));
        let file: FileConfig = toml::from_str("frame_bytes_max = 10").unwrap();
        assert!(matches!(
            resolve(Overrides::default(), Some(file)),
            Err(ConfigError::Invalid {
                key: "frame_bytes_max",
                ..
            })
        ));
        let overrides = Overrides {
            sync: Some("sometimes".to_owned()),
            ..Overrides::default()
        };
        assert!(matches!(
            resolve(overrides, None),
            Err(ConfigError::Invalid { key: "sync", reason }) if reason.contains("\"sometimes\"")
        ));
        let file: FileConfig = toml::from_str("sync = \"interval=0\"").unwrap();
        assert!(matches!(
            resolve(Overrides::default(), Some(file)),
            Err(ConfigError::Invalid { key: "sync", .. })
        ));
        let missing = FileConfig::load(Path::new("/nonexistent/wharf.toml")).unwrap_err();
        assert!(matches!(missing, ConfigError::Read { .. }));
    }

    /// docs/wharf.example.toml sets every key (the exhaustive pattern fails to compile when a
    /// key is added, and `Some` fails the test when the file lacks it) to the value the
    /// server uses without it, and docs/configuration.md documents each.
    #[test]
    fn the_example_config_sets_every_key_to_its_default() {
        let text = include_str!("../../../docs/wharf.example.toml");
        let file: FileConfig = toml::from_str(text).expect("the example parses");
        let FileConfig {
            bind: Some(_),
            plaintext: Some(_),
            tls_bind: Some(_),
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            tls_require_client_cert: Some(_),
            data_dir: Some(_),
            log_format: Some(_),
            heartbeat_ms: Some(_),
            frame_bytes_max: Some(_),
            publishes_in_flight_max: Some(_),
            connections_max: Some(_),
            consumers_per_connection_max: Some(_),
            connections_per_user_max: Some(_),
            queues_max: Some(_),
            exchanges_max: Some(_),
            memory_high_watermark_bytes: Some(_),
            memory_high_watermark_fraction: Some(_),
            disk_free_limit_bytes: Some(_),
            disk_free_limit_fraction: Some(_),
            handshake_timeout_ms: Some(_),
            frame_timeout_ms: Some(_),
            slow_consumer_timeout_ms: Some(_),
            default_user: Some(_),
            default_pass: Some(_),
            allow_anonymous: Some(_),
            anonymous_login_user: Some(_),
            loopback_users: Some(_),
            auth_failure_delay_ms: Some(_),
            sync: Some(_),
            checkpoint_bytes: Some(_),
            segment_bytes: Some(_),
            queue_memory_messages: Some(_),
            queue_memory_bytes: Some(_),
            transient_queues_page: Some(_),
            flow_ready_messages: Some(_),
            flow_ready_bytes: Some(_),
        } = file.clone()
        else {
            panic!("the example leaves a key out: {file:?}");
        };
        let resolved = resolve(Overrides::default(), Some(file)).expect("the example resolves");
        assert_eq!(
            format!("{resolved:?}"),
            format!("{:?}", ServerConfig::default()),
            "the example's values are the defaults"
        );
        let reference = include_str!("../../../docs/configuration.md");
        for key in text
            .lines()
            .filter(|line| !line.starts_with('#'))
            .filter_map(|line| line.split_once(" = ").map(|(key, _)| key))
        {
            assert!(
                reference.contains(&format!("`{key}`")),
                "docs/configuration.md does not document `{key}`"
            );
        }
    }
}
