//! The crate's error type.

use crate::code::ErrorCode;

/// Everything that can go wrong encoding or decoding Wharf's wire format.
///
/// A decode error means the byte stream is corrupt or hostile: the receiver answers with
/// `Close { code: err.error_code(), .. }` (see [`Error::error_code`]) and closes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The first four bytes of the connection are not `WHRF`.
    #[error("bad preamble magic {found:02x?}, expected \"WHRF\"")]
    BadMagic {
        /// The four bytes received instead.
        found: [u8; 4],
    },
    /// The peer speaks a protocol major version this build does not.
    #[error("unsupported protocol version {major}.{minor} (this build speaks major {supported})")]
    UnsupportedVersion {
        /// The peer's major version.
        major: u16,
        /// The peer's minor version.
        minor: u16,
        /// The major version this build speaks.
        supported: u16,
    },
    /// A frame's length prefix (or an encoded frame) exceeds the frame size limit.
    #[error("frame of {bytes} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// Claimed or actual frame length, excluding the 4-byte prefix.
        bytes: u64,
        /// The limit in force.
        max: u32,
    },
    /// The frame kind number is not one this build knows (a newer peer broke the
    /// compatibility rule, or the stream is corrupt).
    #[error("unknown frame kind {kind}")]
    UnknownFrameKind {
        /// The kind number read.
        kind: u32,
    },
    /// The frame's bytes do not decode as its kind says.
    #[error("malformed {frame} frame: {detail}")]
    Malformed {
        /// Frame kind (or structure) being decoded.
        frame: &'static str,
        /// What was wrong.
        detail: &'static str,
    },
    /// A length or count inside a frame exceeds a protocol limit.
    #[error("{what} is {len}, limit {max}")]
    LimitExceeded {
        /// What was too long or too many.
        what: &'static str,
        /// The offending length or count.
        len: u64,
        /// The limit (see [`crate::limits`]).
        max: u64,
    },
    /// A frame handed to the encoder breaks an invariant the decoder checks (so it would be
    /// rejected by the peer): e.g. delivery tags not increasing, a range with `first > last`.
    #[error("cannot encode {frame} frame: {detail}")]
    Invalid {
        /// Frame kind being encoded.
        frame: &'static str,
        /// Which invariant is broken.
        detail: &'static str,
    },
    /// I/O error of the underlying transport (only produced through the tokio-util codec).
    #[error("transport: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// The wire code to send in `Close` when this error ends a connection.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            Error::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            Error::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            Error::BadMagic { .. }
            | Error::UnknownFrameKind { .. }
            | Error::Malformed { .. }
            | Error::LimitExceeded { .. } => ErrorCode::ProtocolViolation,
            Error::Invalid { .. } | Error::Io(_) => ErrorCode::Internal,
        }
    }
}
