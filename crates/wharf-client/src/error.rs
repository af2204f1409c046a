//! The crate's error type.

use std::io;
use std::sync::Arc;
use std::time::Duration;
use wharf_protocol::ErrorCode;

/// Everything a client operation can fail with.
///
/// Cloneable (I/O and codec errors are shared behind an `Arc`) because one connection failure
/// is reported to every pending operation and every consumer.
///
/// Three classes, as in the rest of Wharf:
/// - the operation failed and the connection lives: [`ClientError::Server`],
///   [`ClientError::PublishRefused`], [`ClientError::Backpressure`], [`ClientError::Timeout`],
///   [`ClientError::Encode`], [`ClientError::InvalidArgument`], ...;
/// - the connection ended: [`ClientError::ConnectionLost`], [`ClientError::ServerClosed`],
///   [`ClientError::Protocol`], [`ClientError::Closed`]; every later operation fails the same way;
/// - the connection never opened: [`ClientError::InvalidAddress`], [`ClientError::Connect`],
///   [`ClientError::Handshake`] (and `ServerClosed` / `Timeout` during the handshake).
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The server address could not be parsed.
    #[error("invalid server address {addr:?}: {reason}")]
    InvalidAddress {
        /// The address as given.
        addr: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The TCP connection could not be opened (refused, unreachable, DNS failure, ...).
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The address connected to.
        addr: String,
        /// The I/O error; decide on `source.kind()`.
        #[source]
        source: Arc<io::Error>,
    },
    /// TLS could not be set up: a CA, certificate or key file that cannot be used, or a TLS
    /// handshake that failed (an untrusted, expired or misnamed server certificate; a broker
    /// that wants a client certificate). Nothing was sent in the clear.
    #[error("TLS: {reason}")]
    Tls {
        /// Why (rustls's explanation, e.g. "invalid peer certificate: Expired").
        reason: String,
    },
    /// The server did not speak the handshake as expected (bad preamble, unexpected frame).
    #[error("handshake failed: {detail}")]
    Handshake {
        /// What went wrong.
        detail: String,
    },
    /// A request failed on the server (`Response::Error`); the connection stays open unless
    /// `code.closes_connection()`.
    #[error("server error {code}: {message}")]
    Server {
        /// The server's error code.
        code: ErrorCode,
        /// The server's explanation.
        message: String,
    },
    /// The server closed the connection (`Close` frame), e.g. `UnsupportedVersion` or
    /// `AccessRefused` during the handshake, `ConnectionForced` on shutdown.
    #[error("server closed the connection: {code}: {reason}")]
    ServerClosed {
        /// The code from the server's `Close`.
        code: ErrorCode,
        /// The reason from the server's `Close`.
        reason: String,
    },
    /// The connection broke: I/O error, end of stream, or no frame from the server for twice
    /// the heartbeat interval (`kind() == TimedOut`). Publishes not yet confirmed may or may
    /// not have been stored.
    #[error("connection lost: {0}")]
    ConnectionLost(#[source] Arc<io::Error>),
    /// The server sent bytes that do not decode: the connection was closed.
    #[error("protocol error from the server: {0}")]
    Protocol(#[source] Arc<wharf_protocol::Error>),
    /// A frame could not be encoded (a name over 255 bytes, a frame over the server's
    /// `frame_bytes_max`, ...): nothing was sent; the connection lives.
    #[error("cannot encode the frame: {0}")]
    Encode(#[source] Arc<wharf_protocol::Error>),
    /// The client was closed ([`Client::close`](crate::Client::close) or the last clone was
    /// dropped); no operation is possible any more.
    #[error("the client is closed")]
    Closed,
    /// The operation got no answer in time. For a publish, the message may or may not be
    /// stored: the broker still confirms it later, unobserved.
    #[error("{operation} timed out after {after:?}")]
    Timeout {
        /// What timed out (`"connect"`, `"request"`, `"publish"`, `"close"`).
        operation: &'static str,
        /// The limit that elapsed.
        after: Duration,
    },
    /// The broker refused a publish (unroutable, too large, exchange missing, ...): not stored.
    #[error("publish refused: {code}: {reason}")]
    PublishRefused {
        /// Why.
        code: ErrorCode,
        /// The broker's explanation.
        reason: String,
    },
    /// The broker refused a publish because the target queue is full: not stored; retry later.
    #[error("publish refused, queue full: {reason}")]
    Backpressure {
        /// The broker's explanation.
        reason: String,
    },
    /// The broker already holds a message with this message id (deduplication): it was not
    /// stored again. For a retried publish this means the first attempt succeeded.
    #[error("duplicate publish: already stored")]
    Duplicate,
    /// The server cancelled the consumer (e.g. its queue was deleted). Reported once by the
    /// consumer's stream, after the deliveries received before the cancellation.
    #[error("consumer {consumer_tag} cancelled by the server: {code}: {reason}")]
    ConsumerCancelled {
        /// The consumer.
        consumer_tag: u32,
        /// Why (e.g. `NotFound` when the queue was deleted).
        code: ErrorCode,
        /// The server's explanation.
        reason: String,
    },
    /// The delivery can no longer be settled: it was already acked, nacked or rejected, it came
    /// from an auto-ack consumer, or its consumer ended: cancelled or dropped by the application
    /// (the broker requeued it) or cancelled by the server (its queue, and the message with it,
    /// was deleted). Nothing was sent.
    #[error("delivery {delivery_tag} cannot be settled: {reason}")]
    NotSettleable {
        /// The delivery tag.
        delivery_tag: u64,
        /// Why.
        reason: &'static str,
    },
    /// An argument is outside what the client or protocol allows; nothing was sent.
    #[error("invalid argument {what}: {detail}")]
    InvalidArgument {
        /// Which argument.
        what: &'static str,
        /// What is wrong with it.
        detail: String,
    },
    /// The server speaks an older protocol minor version that lacks this feature (e.g. a 1.0
    /// server and `Delivery::defer`); nothing was sent and the connection lives.
    #[error("{feature} needs protocol 1.{minor_required}; the server speaks 1.{server_minor}")]
    NotSupported {
        /// The feature asked for.
        feature: &'static str,
        /// The protocol minor version that introduced it.
        minor_required: u16,
        /// The minor version negotiated with the server.
        server_minor: u16,
    },
}

impl ClientError {
    /// The wire error code behind this error, if the server sent one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server { code, .. }
            | ClientError::ServerClosed { code, .. }
            | ClientError::PublishRefused { code, .. }
            | ClientError::ConsumerCancelled { code, .. } => Some(*code),
            ClientError::Backpressure { .. } => Some(ErrorCode::Backpressure),
            _ => None,
        }
    }

    /// Whether the connection is over after this error (every later operation fails too).
    pub fn is_connection_error(&self) -> bool {
        matches!(
            self,
            ClientError::ConnectionLost(_)
                | ClientError::ServerClosed { .. }
                | ClientError::Protocol(_)
                | ClientError::Closed
                | ClientError::Connect { .. }
                | ClientError::Tls { .. }
                | ClientError::Handshake { .. }
        )
    }

    /// Whether the server answered "does not exist" ([`ErrorCode::NotFound`]).
    pub fn is_not_found(&self) -> bool {
        self.code() == Some(ErrorCode::NotFound)
    }

    /// Whether a publish was dropped as a duplicate: a queue's dedup window (`x-dedup-window`)
    /// already held its message id. Not an error for a retried publish: the first attempt was
    /// stored.
    pub fn is_duplicate(&self) -> bool {
        matches!(self, ClientError::Duplicate)
    }

    pub(crate) fn lost(kind: io::ErrorKind, detail: &'static str) -> ClientError {
        ClientError::ConnectionLost(Arc::new(io::Error::new(kind, detail)))
    }

    pub(crate) fn encode(err: wharf_protocol::Error) -> ClientError {
        ClientError::Encode(Arc::new(err))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_is_exposed_for_server_sent_errors_only() {
        let server = ClientError::Server {
            code: ErrorCode::NotFound,
            message: "no queue".into(),
        };
        assert_eq!(server.code(), Some(ErrorCode::NotFound));
        assert!(server.is_not_found());
        assert!(!server.is_connection_error());
        assert_eq!(
            ClientError::Backpressure {
                reason: String::new()
            }
            .code(),
            Some(ErrorCode::Backpressure)
        );
        assert_eq!(ClientError::Closed.code(), None);
        assert!(ClientError::lost(io::ErrorKind::TimedOut, "heartbeat").is_connection_error());
    }
}
