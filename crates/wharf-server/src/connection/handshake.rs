//! The handshake of docs/protocol.md §1: preambles, `Hello` / `HelloOk`, refusals with `Close`.

use super::*;

/// Sends a `Close` frame (after our preamble has been sent) and shuts the socket.
pub(super) async fn send_close(writer: &mut WriteHalf, code: ErrorCode, reason: String) {
    let mut out = BytesMut::new();
    if encode(
        &Frame::Close(Close { code, reason }),
        wharf_protocol::limits::FRAME_BYTES_MAX_FLOOR,
        &mut out,
    )
    .is_ok()
    {
        let _ = writer.write_all(&out).await;
    }
    let _ = writer.shutdown().await;
}

/// Refuses a socket the server cannot take (over the connection cap) without reading from it:
/// its preamble, then `Close` with `ResourceLimit`, so that a client reports why.
/// What the client sent meanwhile is read and dropped until it closes (the caller bounds the
/// time): closing with unread input would reset the connection, and the client could lose
/// the `Close` before reading it.
pub(crate) async fn refuse(socket: Stream, code: ErrorCode, reason: String) {
    let (mut reader, mut writer) = socket.split();
    if writer.write_all(&Preamble::CURRENT.encode()).await.is_ok() {
        send_close(&mut writer, code, reason).await;
    }
    let mut sink = [0u8; 1024];
    while matches!(reader.read(&mut sink).await, Ok(read) if read > 0) {}
}

/// One of a user's connections, counted against `connections_per_user_max` while it lives.
pub(super) struct UserSlot {
    counts: Option<(Arc<Context>, String)>,
}

impl std::fmt::Debug for UserSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UserSlot")
    }
}

/// A connection the core took in during the handshake: closed in the core when dropped
/// before it is handed over to the connection's reader.
struct OpenedInCore<'a> {
    shared: &'a Arc<Context>,
    connection: ConnectionId,
    handed_over: bool,
}

impl Drop for OpenedInCore<'_> {
    fn drop(&mut self) {
        if !self.handed_over {
            let mut batch = self.shared.batch();
            batch.close(now_ms(), self.connection);
            if let Some(leader) = batch.finish().flush(None) {
                leader.commit();
            }
        }
    }
}

/// Which limit caps a user's connections.
#[derive(Debug, Clone, Copy)]
enum LimitOf {
    Broker,
    User,
}

impl UserSlot {
    /// Counts a connection of `user` against the broker's `connections_per_user_max` and
    /// the user's own `max_connections`, whichever is lower.
    fn take(shared: &Arc<Context>, user: &str) -> Result<UserSlot, HandshakeError> {
        let global = match shared.config.connections_per_user_max {
            0 => None,
            max => Some(max),
        };
        let own = shared
            .users
            .limits_of(user)
            .and_then(|limits| limits.max_connections)
            .map(|max| max as usize);
        let (max, whose) = match (global, own) {
            (None, None) => return Ok(UserSlot { counts: None }),
            (Some(global), Some(own)) if own < global => (own, LimitOf::User),
            (Some(global), _) => (global, LimitOf::Broker),
            (None, Some(own)) => (own, LimitOf::User),
        };
        let user = user.to_owned();
        let mut counts = shared
            .user_connections
            .lock()
            .expect("user connections lock");
        let count = counts.entry(user.clone()).or_default();
        if *count >= max {
            return Err(match whose {
                LimitOf::Broker => HandshakeError::UserFull {
                    user: user.clone(),
                    max,
                },
                LimitOf::User => HandshakeError::UserLimit {
                    user: user.clone(),
                    max,
                },
            });
        }
        *count += 1;
        Ok(UserSlot {
            counts: Some((shared.clone(), user.clone())),
        })
    }
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        if let Some((shared, user)) = self.counts.take() {
            let mut counts = shared
                .user_connections
                .lock()
                .expect("user connections lock");
            if let Some(count) = counts.get_mut(&user) {
                *count -= 1;
                if *count == 0 {
                    counts.remove(&user);
                }
            }
        }
    }
}

/// Checks a `Hello`'s credentials (the KDF runs on a blocking thread). A refusal is logged
/// with the peer's address and the user name (never the password), and returned no sooner
/// than `auth_failure_delay` after the `Hello` arrived, whatever the reason.
async fn login(
    shared: &Context,
    peer: SocketAddr,
    certificate_user: Option<String>,
    hello: &wharf_protocol::Hello,
) -> Result<crate::auth::Principal, crate::auth::Refusal> {
    let arrived = tokio::time::Instant::now();
    let users = shared.users.clone();
    let mechanism = hello.credentials.mechanism.clone();
    let data = hello.credentials.data.clone();
    let (allow_anonymous, anonymous_user, loopback_users) = (
        shared.config.allow_anonymous,
        shared.config.anonymous_login_user.clone(),
        shared.config.loopback_users.clone(),
    );
    // Bounded: a permit per check, held by the blocking job until it ends (a handshake that
    // times out meanwhile does not free it early).
    let permit = shared
        .kdf
        .clone()
        .acquire_owned()
        .await
        .expect("the KDF semaphore is never closed");
    let checked = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let rules = crate::auth::LoginRules {
            allow_anonymous,
            anonymous_user: &anonymous_user,
            loopback_users: &loopback_users,
        };
        crate::auth::authenticate(
            &users,
            rules,
            &mechanism,
            &data,
            peer.ip(),
            certificate_user.as_deref(),
        )
    })
    .await
    .unwrap_or(Err(crate::auth::Refusal::WrongPassword));
    if let Err(refusal) = &checked {
        warn!(
            %peer,
            user = crate::auth::plain_user(&hello.credentials.data).unwrap_or("-"),
            mechanism = %hello.credentials.mechanism,
            "login refused: {refusal}"
        );
        tokio::time::sleep_until(arrived + shared.config.auth_failure_delay).await;
    }
    checked
}

/// Why a handshake ended without a connection (logged at debug: a port scanner or a client
/// of another protocol is not the server's problem).
#[derive(Debug, thiserror::Error)]
pub(super) enum HandshakeError {
    /// Not a Wharf preamble, or an unsupported major version.
    #[error("preamble: {0}")]
    Preamble(#[source] wharf_protocol::Error),
    /// A frame that does not decode, or a `HelloOk` that does not encode.
    #[error("frame: {0}")]
    Frame(#[source] wharf_protocol::Error),
    /// The first frame after the preamble was not `Hello`.
    #[error("expected Hello, got frame kind {kind}")]
    NotHello {
        /// The frame kind received.
        kind: u32,
    },
    /// The server already serves its maximum of connections.
    #[error("the server has its maximum of {max} connections")]
    Full {
        /// The configured maximum.
        max: usize,
    },
    /// The user already holds its maximum of connections.
    #[error("user {user} has its maximum of {max} connections")]
    UserFull {
        /// The user.
        user: String,
        /// `connections_per_user_max`.
        max: usize,
    },
    /// The user has its own `max_connections` open (RabbitMQ's wording).
    #[error("connection limit ({max}) of user '{user}' is reached")]
    UserLimit {
        /// The user.
        user: String,
        /// Its `max_connections`.
        max: usize,
    },
    /// The credentials were refused (`AccessRefused` sent after the constant delay).
    #[error("login refused: {0}")]
    Refused(crate::auth::Refusal),
    /// The user has no permissions in the virtual host.
    #[error("access to vhost '{vhost}' refused for user '{user}'")]
    NoVhostAccess {
        /// The user.
        user: String,
        /// The virtual host.
        vhost: String,
    },
    /// The virtual host named in `Hello` does not exist.
    #[error("vhost '{0}' not found")]
    NoVhost(String),
    /// The virtual host has its `max_connections` open.
    #[error(
        "access to vhost '{vhost}' refused for user '{user}': connection limit ({max}) is reached"
    )]
    VhostFull {
        /// The user.
        user: String,
        /// The virtual host.
        vhost: String,
        /// Its limit.
        max: usize,
    },
    /// The client closed before sending what was expected.
    #[error("closed before {0}")]
    Closed(&'static str),
    /// The socket failed.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
}

/// The handshake of docs/protocol.md §1: read the client's preamble (wrong magic: close
/// without a word, it is not a Wharf client), answer with ours at once, refuse an unsupported
/// major or a full server with `Close`, then expect `Hello` and answer `HelloOk`.
pub(super) async fn handshake(
    shared: &Arc<Context>,
    peer: SocketAddr,
    certificate_user: Option<String>,
    reader: &mut ReadHalf,
    writer: &mut WriteHalf,
    buf: &mut BytesMut,
) -> Result<Negotiated, HandshakeError> {
    let preamble = loop {
        match Preamble::decode(buf) {
            Ok(Some(preamble)) => break preamble,
            Ok(None) => {}
            Err(err) => {
                let _ = writer.shutdown().await;
                return Err(HandshakeError::Preamble(err));
            }
        }
        if reader.read_buf(buf).await? == 0 {
            return Err(HandshakeError::Closed("the preamble"));
        }
    };
    buf.advance(Preamble::BYTES);
    writer.write_all(&Preamble::CURRENT.encode()).await?;
    // Over TLS, written means encrypted into the session's buffer: flush sends it.
    writer.flush().await?;
    if let Err(err) = preamble.check_supported() {
        send_close(writer, ErrorCode::UnsupportedVersion, err.to_string()).await;
        return Err(HandshakeError::Preamble(err));
    }
    if shared.lock().n_connections() >= shared.config.connections_max {
        let error = HandshakeError::Full {
            max: shared.config.connections_max,
        };
        send_close(writer, ErrorCode::ResourceLimit, error.to_string()).await;
        return Err(error);
    }
    let recv_frame_bytes_max = shared.config.frame_bytes_max;
    // Before the handshake a peer is nobody: its `Hello`, a control frame, must fit in the
    // floor every control frame fits in (64 KiB), not in the frame limit it has yet to agree
    // on (16 MiB by default).
    let hello_bytes_max = recv_frame_bytes_max.min(wharf_protocol::limits::FRAME_BYTES_MAX_FLOOR);
    let hello = loop {
        match decode(buf, hello_bytes_max) {
            Ok(Some(Frame::Hello(hello))) => break hello,
            Ok(Some(other)) => {
                let error = HandshakeError::NotHello { kind: other.kind() };
                send_close(writer, ErrorCode::ProtocolViolation, error.to_string()).await;
                return Err(error);
            }
            Ok(None) => {}
            Err(err) => {
                send_close(writer, err.error_code(), err.to_string()).await;
                return Err(HandshakeError::Frame(err));
            }
        }
        if reader.read_buf(buf).await? == 0 {
            return Err(HandshakeError::Closed("Hello"));
        }
    };
    let principal = match login(shared, peer, certificate_user, &hello).await {
        Ok(principal) => principal,
        Err(refusal) => {
            send_close(writer, ErrorCode::AccessRefused, refusal.client_reason()).await;
            return Err(HandshakeError::Refused(refusal));
        }
    };
    let user = match &principal {
        crate::auth::Principal::User(name) => name.as_str(),
        crate::auth::Principal::Anonymous => shared.config.anonymous_login_user.as_str(),
    };
    let vhost: Arc<str> = hello.vhost.as_str().into();
    if !shared.lock().broker.has_vhost(&vhost) {
        // As RabbitMQ: said before permissions, which an unknown vhost cannot have.
        let error = HandshakeError::NoVhost(vhost.to_string());
        warn!(%peer, user, "login refused: {error}");
        send_close(writer, ErrorCode::AccessRefused, error.to_string()).await;
        return Err(error);
    }
    let mut access = Access::new(shared.users.clone(), user, &vhost);
    if !access.may_connect() {
        let error = HandshakeError::NoVhostAccess {
            user: user.to_owned(),
            vhost: vhost.to_string(),
        };
        warn!(%peer, user, "login refused: {error}");
        send_close(writer, ErrorCode::AccessRefused, error.to_string()).await;
        return Err(error);
    }
    let user_slot = match UserSlot::take(shared, user) {
        Ok(slot) => slot,
        Err(error) => {
            send_close(writer, ErrorCode::ResourceLimit, error.to_string()).await;
            return Err(error);
        }
    };
    let server_heartbeat_ms = shared.config.heartbeat.as_millis() as u32;
    let heartbeat_ms = match hello.heartbeat_ms {
        0 => server_heartbeat_ms,
        asked => asked.clamp(100, server_heartbeat_ms.max(100)),
    };
    let send_frame_bytes_max = hello
        .frame_bytes_max
        .max(wharf_protocol::limits::FRAME_BYTES_MAX_FLOOR);
    let limits = ServerLimits {
        frame_bytes_max: recv_frame_bytes_max,
        heartbeat_ms,
        publishes_in_flight_max: shared.config.publishes_in_flight_max,
        ..ServerLimits::default()
    };
    let hello_ok = Frame::HelloOk(HelloOk {
        server_version: format!("wharf/{}", env!("CARGO_PKG_VERSION")),
        protocol_minor: preamble.negotiated_minor(),
        limits,
    });
    let mut out = BytesMut::new();
    encode(&hello_ok, send_frame_bytes_max, &mut out).map_err(HandshakeError::Frame)?;
    // The core takes the connection into its virtual host last, once nothing else refuses
    // it (and gives it back if the answer cannot be written).
    let connection = ConnectionId(shared.next_connection.fetch_add(1, Ordering::Relaxed));
    let opened = {
        let mut batch = shared.batch();
        let opened = batch.open(now_ms(), connection, vhost.clone());
        let _ = batch.finish().flush(None);
        opened
    };
    if let Err(err) = opened {
        let error = match err {
            CoreError::LimitExceeded { limit, .. } => HandshakeError::VhostFull {
                user: user.to_owned(),
                vhost: vhost.to_string(),
                max: limit,
            },
            // Deleted since it was looked up.
            _ => HandshakeError::NoVhost(vhost.to_string()),
        };
        warn!(%peer, user, "login refused: {error}");
        let code = match error {
            HandshakeError::VhostFull { .. } => ErrorCode::ResourceLimit,
            _ => ErrorCode::AccessRefused,
        };
        send_close(writer, code, error.to_string()).await;
        return Err(error);
    }
    // From here the core counts the connection in its virtual host: if the answer cannot be
    // written, or the handshake's deadline drops this future while it is written, the guard
    // gives the place back.
    let mut opened = OpenedInCore {
        shared,
        connection,
        handed_over: false,
    };
    writer.write_all(&out).await?;
    writer.flush().await?;
    opened.handed_over = true;
    debug!(client = %hello.client_name, mechanism = %hello.credentials.mechanism, user = %principal, "handshake done");
    Ok(Negotiated {
        connection,
        vhost,
        principal,
        access,
        _user_slot: user_slot,
        minor: preamble.negotiated_minor(),
        heartbeat: Duration::from_millis(u64::from(heartbeat_ms)),
        send_frame_bytes_max,
        recv_frame_bytes_max,
    })
}
