//! The connection preamble: the first 8 bytes each side sends, before any frame.

use crate::error::Error;
use crate::limits::{PROTOCOL_MAJOR, PROTOCOL_MINOR};

/// Magic bytes opening every Wharf connection.
pub const MAGIC: [u8; 4] = *b"WHRF";

/// `WHRF`, then the major and minor protocol version as big-endian `u16`s.
///
/// The client sends its preamble first; the server answers with its own, then (same major) waits
/// for `Hello`, or (other major) sends `Close { code: UnsupportedVersion }` and closes. The
/// preamble and the `Close` frame layout never change, so every version can read the refusal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Preamble {
    /// Major version: a different major is a different, incompatible wire format.
    pub major: u16,
    /// Minor version: minors add frame kinds and variants only (see docs/protocol.md).
    pub minor: u16,
}

impl Preamble {
    /// Encoded size in bytes.
    pub const BYTES: usize = 8;

    /// The version this build speaks.
    pub const CURRENT: Preamble = Preamble {
        major: PROTOCOL_MAJOR,
        minor: PROTOCOL_MINOR,
    };

    /// The 8 bytes on the wire.
    pub fn encode(&self) -> [u8; Preamble::BYTES] {
        let mut bytes = [0u8; Preamble::BYTES];
        bytes[..4].copy_from_slice(&MAGIC);
        bytes[4..6].copy_from_slice(&self.major.to_be_bytes());
        bytes[6..8].copy_from_slice(&self.minor.to_be_bytes());
        bytes
    }

    /// Reads a preamble from the start of `src`: `Ok(None)` if fewer than 8 bytes arrived,
    /// [`Error::BadMagic`] if the magic is wrong (checked as soon as 4 bytes are there, so a
    /// stray HTTP or TLS client is refused at once). Any version is returned; see
    /// [`Preamble::check_supported`].
    pub fn decode(src: &[u8]) -> Result<Option<Preamble>, Error> {
        if src.len() >= 4 && src[..4] != MAGIC {
            return Err(Error::BadMagic {
                found: [src[0], src[1], src[2], src[3]],
            });
        }
        if src.len() < Preamble::BYTES {
            return Ok(None);
        }
        Ok(Some(Preamble {
            major: u16::from_be_bytes([src[4], src[5]]),
            minor: u16::from_be_bytes([src[6], src[7]]),
        }))
    }

    /// `Err(UnsupportedVersion)` unless the major version is the one this build speaks.
    pub fn check_supported(&self) -> Result<(), Error> {
        if self.major != PROTOCOL_MAJOR {
            return Err(Error::UnsupportedVersion {
                major: self.major,
                minor: self.minor,
                supported: PROTOCOL_MAJOR,
            });
        }
        Ok(())
    }

    /// The minor version both sides speak: `min(own, peer)`.
    pub fn negotiated_minor(&self) -> u16 {
        self.minor.min(PROTOCOL_MINOR)
    }
}

const _: () = assert!(Preamble::BYTES == MAGIC.len() + 2 + 2);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preamble_round_trips_and_waits_for_eight_bytes() {
        let bytes = Preamble::CURRENT.encode();
        assert_eq!(&bytes, b"WHRF\x00\x01\x00\x03");
        for len in 0..Preamble::BYTES {
            assert!(Preamble::decode(&bytes[..len]).unwrap().is_none());
        }
        assert_eq!(Preamble::decode(&bytes).unwrap(), Some(Preamble::CURRENT));
        assert!(Preamble::CURRENT.check_supported().is_ok());
    }

    #[test]
    fn negotiated_minor_is_the_lower_of_the_two() {
        let older = Preamble { major: 1, minor: 0 };
        assert_eq!(older.negotiated_minor(), 0);
        assert_eq!(Preamble::CURRENT.negotiated_minor(), PROTOCOL_MINOR);
        let newer = Preamble {
            major: 1,
            minor: PROTOCOL_MINOR + 5,
        };
        assert_eq!(newer.negotiated_minor(), PROTOCOL_MINOR);
    }

    #[test]
    fn bad_magic_is_refused_after_four_bytes() {
        assert!(
            matches!(Preamble::decode(b"GET "), Err(Error::BadMagic { found }) if &found == b"GET ")
        );
    }

    #[test]
    fn other_major_is_unsupported_and_maps_to_its_code() {
        let preamble = Preamble { major: 2, minor: 0 };
        let err = Preamble::decode(&preamble.encode())
            .unwrap()
            .unwrap()
            .check_supported()
            .unwrap_err();
        assert!(matches!(err, Error::UnsupportedVersion { major: 2, .. }));
        assert_eq!(err.error_code(), crate::ErrorCode::UnsupportedVersion);
    }
}
