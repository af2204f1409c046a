//! Wire error codes: a closed, append-only list. A retired code is never reused.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// Error code carried by `Close`, `Response::Error`, refused confirms and `ConsumerCancelled`.
///
/// The numbering is append-only: new codes get the next free number, a retired code keeps its
/// number forever (and is marked retired here and in docs/protocol.md). A code this build does
/// not know — sent by a newer peer — decodes as [`ErrorCode::Unknown`] with its raw value, so an
/// older peer can still log it and react by the frame it came in (a `Close` still closes).
/// `u16::MAX` is reserved as the discriminant of `Unknown` and is never assigned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// Not an error: a normal, requested close. Connection closes (it is only sent in `Close`).
    Normal = 0,
    /// The named queue, exchange, binding or consumer does not exist. Connection stays open.
    NotFound = 1,
    /// A passive declare or conditional delete found state that does not match the request
    /// (different flags, `if_unused` / `if_empty` not met). Connection stays open.
    PreconditionFailed = 2,
    /// The credentials were rejected, or the user may not perform the operation.
    /// Closes the connection during the handshake; stays open for a refused request.
    AccessRefused = 3,
    /// A frame's length prefix exceeds the receiver's `frame_bytes_max`. Connection closes.
    FrameTooLarge = 4,
    /// The peer broke the protocol: malformed frame, unknown frame kind, frame sent in the wrong
    /// state (e.g. before `Hello`). Connection closes.
    ProtocolViolation = 5,
    /// A server limit was reached (queues, consumers, connections, bindings). Connection stays
    /// open; the request fails.
    ResourceLimit = 6,
    /// The server failed in a way that is not the client's fault. Connection closes.
    Internal = 7,
    /// The client's protocol major version is not supported (sent in `Close` right after the
    /// server's preamble). Connection closes.
    UnsupportedVersion = 8,
    /// A name is empty where it must not be, too long, or uses a reserved prefix (`amq.`,
    /// `wharf.`). Connection stays open.
    InvalidName = 9,
    /// The queue is exclusive to another connection, or has an exclusive consumer.
    /// Connection stays open.
    ResourceLocked = 10,
    /// The target queue is full and its overflow policy rejects publishes; sent as a refused
    /// confirm. Connection stays open; retry later.
    Backpressure = 11,
    /// An ack, nack or reject named a delivery tag that is not outstanding on this connection
    /// (never delivered, already settled, or auto-acked). Connection closes: the client's
    /// bookkeeping is broken.
    UnknownDeliveryTag = 12,
    /// A publish was refused for a reason other than backpressure (unroutable with a
    /// mandatory flag, body too large, exchange missing); sent as a refused confirm.
    /// Connection stays open.
    PublishRefused = 13,
    /// No frame arrived from the peer for twice the heartbeat interval. Connection closes.
    HeartbeatTimeout = 14,
    /// The server is shutting down or an operator closed the connection. Connection closes.
    ConnectionForced = 15,
    /// The request is understood but not implemented by this server. Connection stays open.
    NotImplemented = 16,
    /// An `arguments` table holds a key with a wrong type or value (e.g. `x-match: "maybe"`).
    /// Connection stays open.
    InvalidArgument = 17,
    /// The client did not take what the server sent it: its socket accepted nothing for
    /// `slow_consumer_timeout_ms` while output waited (a stopped or stuck consumer). Its
    /// unacknowledged deliveries return to their queues. Connection closes.
    SlowConsumer = 18,
    /// A frame that had begun did not arrive whole within `frame_timeout_ms` (a peer trickling
    /// bytes to pin a large read buffer). Connection closes.
    FrameTimeout = 19,
    /// A code unknown to this build (from a newer peer), carrying its raw value.
    Unknown(u16) = u16::MAX,
}

impl ErrorCode {
    /// Every code this build knows, in numeric order (for docs, tests and tooling).
    pub const ALL: [ErrorCode; 20] = [
        ErrorCode::Normal,
        ErrorCode::NotFound,
        ErrorCode::PreconditionFailed,
        ErrorCode::AccessRefused,
        ErrorCode::FrameTooLarge,
        ErrorCode::ProtocolViolation,
        ErrorCode::ResourceLimit,
        ErrorCode::Internal,
        ErrorCode::UnsupportedVersion,
        ErrorCode::InvalidName,
        ErrorCode::ResourceLocked,
        ErrorCode::Backpressure,
        ErrorCode::UnknownDeliveryTag,
        ErrorCode::PublishRefused,
        ErrorCode::HeartbeatTimeout,
        ErrorCode::ConnectionForced,
        ErrorCode::NotImplemented,
        ErrorCode::InvalidArgument,
        ErrorCode::SlowConsumer,
        ErrorCode::FrameTimeout,
    ];

    /// The number on the wire.
    pub fn as_u16(self) -> u16 {
        u16::from(self)
    }

    /// Whether the sender closes the connection after sending this code outside the handshake.
    /// `AccessRefused` during the handshake always closes.
    pub fn closes_connection(self) -> bool {
        match self {
            ErrorCode::NotFound
            | ErrorCode::PreconditionFailed
            | ErrorCode::AccessRefused
            | ErrorCode::ResourceLimit
            | ErrorCode::InvalidName
            | ErrorCode::ResourceLocked
            | ErrorCode::Backpressure
            | ErrorCode::PublishRefused
            | ErrorCode::NotImplemented
            | ErrorCode::InvalidArgument => false,
            ErrorCode::Normal
            | ErrorCode::FrameTooLarge
            | ErrorCode::ProtocolViolation
            | ErrorCode::Internal
            | ErrorCode::UnsupportedVersion
            | ErrorCode::UnknownDeliveryTag
            | ErrorCode::HeartbeatTimeout
            | ErrorCode::ConnectionForced
            | ErrorCode::SlowConsumer
            | ErrorCode::FrameTimeout
            // An unknown code is treated by the frame that carried it; alone, assume the worst.
            | ErrorCode::Unknown(_) => true,
        }
    }

    /// Whether this build knows the code.
    pub fn is_known(self) -> bool {
        !matches!(self, ErrorCode::Unknown(_))
    }

    /// Stable snake-case name, as listed in docs/protocol.md.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::Normal => "normal",
            ErrorCode::NotFound => "not_found",
            ErrorCode::PreconditionFailed => "precondition_failed",
            ErrorCode::AccessRefused => "access_refused",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::ProtocolViolation => "protocol_violation",
            ErrorCode::ResourceLimit => "resource_limit",
            ErrorCode::Internal => "internal",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::InvalidName => "invalid_name",
            ErrorCode::ResourceLocked => "resource_locked",
            ErrorCode::Backpressure => "backpressure",
            ErrorCode::UnknownDeliveryTag => "unknown_delivery_tag",
            ErrorCode::PublishRefused => "publish_refused",
            ErrorCode::HeartbeatTimeout => "heartbeat_timeout",
            ErrorCode::ConnectionForced => "connection_forced",
            ErrorCode::NotImplemented => "not_implemented",
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::SlowConsumer => "slow_consumer",
            ErrorCode::FrameTimeout => "frame_timeout",
            ErrorCode::Unknown(_) => "unknown",
        }
    }
}

impl From<ErrorCode> for u16 {
    fn from(code: ErrorCode) -> u16 {
        match code {
            ErrorCode::Normal => 0,
            ErrorCode::NotFound => 1,
            ErrorCode::PreconditionFailed => 2,
            ErrorCode::AccessRefused => 3,
            ErrorCode::FrameTooLarge => 4,
            ErrorCode::ProtocolViolation => 5,
            ErrorCode::ResourceLimit => 6,
            ErrorCode::Internal => 7,
            ErrorCode::UnsupportedVersion => 8,
            ErrorCode::InvalidName => 9,
            ErrorCode::ResourceLocked => 10,
            ErrorCode::Backpressure => 11,
            ErrorCode::UnknownDeliveryTag => 12,
            ErrorCode::PublishRefused => 13,
            ErrorCode::HeartbeatTimeout => 14,
            ErrorCode::ConnectionForced => 15,
            ErrorCode::NotImplemented => 16,
            ErrorCode::InvalidArgument => 17,
            ErrorCode::SlowConsumer => 18,
            ErrorCode::FrameTimeout => 19,
            ErrorCode::Unknown(raw) => raw,
        }
    }
}

/// Total: numbers this build does not know become [`ErrorCode::Unknown`], keeping the value.
impl From<u16> for ErrorCode {
    fn from(raw: u16) -> ErrorCode {
        ErrorCode::ALL
            .get(usize::from(raw))
            .copied()
            .unwrap_or(ErrorCode::Unknown(raw))
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), u16::from(*self))
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u16(u16::from(*self))
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<ErrorCode, D::Error> {
        u16::deserialize(deserializer).map(ErrorCode::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_codes_round_trip_through_u16_and_are_dense() {
        for (idx, code) in ErrorCode::ALL.iter().enumerate() {
            assert_eq!(usize::from(code.as_u16()), idx);
            assert_eq!(ErrorCode::from(code.as_u16()), *code);
            assert!(code.is_known());
        }
    }

    #[test]
    fn unknown_codes_keep_their_value_and_close() {
        let code = ErrorCode::from(900);
        assert_eq!(code, ErrorCode::Unknown(900));
        assert_eq!(u16::from(code), 900);
        assert!(code.closes_connection());
        assert_eq!(ErrorCode::from(u16::MAX), ErrorCode::Unknown(u16::MAX));
    }
}
