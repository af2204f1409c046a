//! Connection and consumer options.

use bytes::{BufMut, BytesMut};
use std::fmt;
use std::time::Duration;

pub use crate::limits::PREFETCH_MAX;

/// How the client authenticates.
#[derive(Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Credentials {
    /// The URL's `user:password@` as `PLAIN` if it has one, otherwise `guest` / `guest`
    /// (what RabbitMQ's clients send by default; the broker accepts `guest` from loopback
    /// only).
    #[default]
    Default,
    /// No credentials (`ANONYMOUS` mechanism; the broker refuses it unless `allow_anonymous`).
    Anonymous,
    /// The identity of the client certificate presented over TLS (`EXTERNAL` mechanism; the
    /// broker takes the certificate's common name as the user).
    External,
    /// User name and password (`PLAIN` mechanism).
    Plain {
        /// User name.
        username: String,
        /// Password.
        password: String,
    },
}

impl Credentials {
    /// `PLAIN` credentials.
    pub fn plain(username: impl Into<String>, password: impl Into<String>) -> Credentials {
        Credentials::Plain {
            username: username.into(),
            password: password.into(),
        }
    }

    /// What is sent to a server at `addr`: [`Credentials::Default`] resolved.
    pub(crate) fn resolve(&self, addr: &crate::ServerAddr) -> Credentials {
        match (self, addr.user()) {
            (Credentials::Default, Some((username, password))) => {
                Credentials::plain(username, password)
            }
            (Credentials::Default, None) => Credentials::plain("guest", "guest"),
            (credentials, _) => credentials.clone(),
        }
    }

    pub(crate) fn to_wire(&self) -> wharf_protocol::Credentials {
        match self {
            Credentials::Default => Credentials::plain("guest", "guest").to_wire(),
            Credentials::Anonymous => wharf_protocol::Credentials {
                mechanism: "ANONYMOUS".to_owned(),
                data: Default::default(),
            },
            Credentials::External => wharf_protocol::Credentials {
                mechanism: "EXTERNAL".to_owned(),
                data: Default::default(),
            },
            Credentials::Plain { username, password } => {
                let mut data = BytesMut::with_capacity(2 + username.len() + password.len());
                data.put_u8(0);
                data.put_slice(username.as_bytes());
                data.put_u8(0);
                data.put_slice(password.as_bytes());
                wharf_protocol::Credentials {
                    mechanism: "PLAIN".to_owned(),
                    data: data.freeze(),
                }
            }
        }
    }
}

/// Never shows the password.
impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::Default => f.write_str("Default"),
            Credentials::Anonymous => f.write_str("Anonymous"),
            Credentials::External => f.write_str("External"),
            Credentials::Plain { username, .. } => f
                .debug_struct("Plain")
                .field("username", username)
                .field("password", &"<redacted>")
                .finish(),
        }
    }
}

/// Options of [`Client::connect_with`](crate::Client::connect_with). Start from
/// `ClientOptions::default()` and set what differs.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Name shown in the server's logs and management (default `wharf-client/<version>`).
    pub client_name: String,
    /// Credentials (default: the URL's `user:password@`, otherwise `guest` / `guest`).
    pub credentials: Credentials,
    /// Heartbeat interval to ask for in ms; 0 = accept the server's. The server's answer is
    /// used: a heartbeat is sent after that long without writing, and the connection is lost
    /// after twice that long without reading.
    pub heartbeat_ms: u32,
    /// Bound on TCP connect plus handshake.
    pub connect_timeout: Duration,
    /// Bound on each request (declare, bind, stats, subscribe, cancel, ...) and on
    /// [`Client::publish`](crate::Client::publish)'s wait for its confirm.
    pub request_timeout: Duration,
    /// Bound on [`Client::close`](crate::Client::close)'s wait for `CloseOk`.
    pub close_timeout: Duration,
    /// Largest frame the client accepts from the server (announced in `Hello`).
    pub frame_bytes_max: u32,
    /// Most encoded publish bytes queued for the socket and not yet written: publishers wait
    /// beyond it, so a slow network cannot make the client buffer without bound.
    pub outbound_bytes_max: usize,
    /// TLS settings for `wharfs://` addresses (`None`: the system's trusted roots, no client
    /// certificate). Given for a `wharf://` address, the connection is refused: TLS is
    /// chosen by the scheme, never silently dropped.
    pub tls: Option<crate::TlsOptions>,
    /// Virtual host to connect to (protocol 1.3), overriding the address's path (`None`: the
    /// address's, `/` if it names none). A virtual host other than `/` needs a 1.3 server:
    /// an older one fails the connect with [`ClientError::NotSupported`](crate::ClientError)
    /// before `Hello` is sent.
    pub vhost: Option<String>,
}

impl Default for ClientOptions {
    fn default() -> ClientOptions {
        ClientOptions {
            client_name: concat!("wharf-client/", env!("CARGO_PKG_VERSION")).to_owned(),
            credentials: Credentials::Default,
            heartbeat_ms: 0,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            close_timeout: Duration::from_secs(5),
            frame_bytes_max: wharf_protocol::limits::FRAME_BYTES_MAX,
            outbound_bytes_max: 64 * 1024 * 1024,
            tls: None,
            vhost: None,
        }
    }
}

/// Options of [`Client::consume`](crate::Client::consume).
///
/// ```
/// use std::time::Duration;
/// use wharf_client::ConsumeOptions;
/// let options = ConsumeOptions { prefetch: 50, ..ConsumeOptions::default() };
/// assert!(!options.auto_ack);
/// let leased = ConsumeOptions::default().ack_timeout(Duration::from_secs(30));
/// assert_eq!(leased.ack_timeout, Some(Duration::from_secs(30)));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConsumeOptions {
    /// Manual ack: most deliveries unsettled at once. Auto-ack: most deliveries sent ahead of
    /// the application (credit window). `1..=PREFETCH_MAX`, default 100. It also bounds the
    /// consumer's buffer.
    pub prefetch: u32,
    /// Deliveries are settled by the broker when sent (at-most-once); no ack is possible.
    pub auto_ack: bool,
    /// Refuse other consumers on the queue while this one exists.
    pub exclusive: bool,
    /// Higher-priority consumers are served first (default 0).
    pub priority: i32,
    /// The lease of each delivery (manual ack only; protocol 1.1, sent as `x-ack-timeout` in
    /// ms): a delivery not settled within it is taken back by the broker and delivered again,
    /// possibly to another consumer, without closing anything. `None` (default): no lease.
    ///
    /// While the application holds a delivery taken from the [`Consumer`](crate::Consumer)
    /// stream and has not settled it (nor dropped it), the client extends its lease by itself
    /// (a `Touch` at about half the timeout), so a long handler keeps its message without
    /// doing anything; see [`Delivery`](crate::Delivery). Deliveries still waiting in the
    /// consumer's buffer are not extended: keep the prefetch small when handlers are long.
    pub ack_timeout: Option<Duration>,
}

impl ConsumeOptions {
    /// Sets [`ConsumeOptions::ack_timeout`] (the lease; millisecond precision, at least 1 ms).
    pub fn ack_timeout(mut self, timeout: Duration) -> ConsumeOptions {
        self.ack_timeout = Some(timeout);
        self
    }
}

impl Default for ConsumeOptions {
    fn default() -> ConsumeOptions {
        ConsumeOptions {
            prefetch: 100,
            auto_ack: false,
            exclusive: false,
            priority: 0,
            ack_timeout: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_credentials_encode_as_nul_user_nul_password_and_hide_the_password() {
        let credentials = Credentials::plain("alice", "s3cret");
        let wire = credentials.to_wire();
        assert_eq!(wire.mechanism, "PLAIN");
        assert_eq!(&wire.data[..], b"\0alice\0s3cret");
        assert!(!format!("{credentials:?}").contains("s3cret"));
        assert_eq!(Credentials::Anonymous.to_wire().mechanism, "ANONYMOUS");
    }

    #[test]
    fn default_credentials_are_the_urls_or_guest() {
        let with_user: crate::ServerAddr = "wharf://alice:s3cret@example.org".parse().unwrap();
        let without: crate::ServerAddr = "wharf://example.org".parse().unwrap();
        assert_eq!(
            Credentials::Default.resolve(&with_user),
            Credentials::plain("alice", "s3cret")
        );
        assert_eq!(
            Credentials::Default.resolve(&without),
            Credentials::plain("guest", "guest")
        );
        // Explicit credentials win over the URL's.
        assert_eq!(
            Credentials::Anonymous.resolve(&with_user),
            Credentials::Anonymous
        );
        assert_eq!(
            Credentials::plain("bob", "pw").resolve(&with_user),
            Credentials::plain("bob", "pw")
        );
    }
}
