//! The on-disk format: segment header and record framing (spec: docs/storage.md).
//!
//! All integers are little-endian. Changing anything here changes the log format: bump
//! [`FORMAT_VERSION`] and write down the reasoning first (see STYLE.md).

use std::fmt;

use crate::limits::RECORD_BYTES_MAX;

/// A log sequence number: the record's byte position in the logical log (the concatenation
/// of all segments' record areas). Monotonically increasing, never reused for a record that
/// was reported committed; it locates the record directly (segment by base LSN, then
/// `file offset = SEGMENT_HEADER_LEN + (lsn - base)`), so random reads need no index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl From<u64> for Lsn {
    fn from(value: u64) -> Self {
        Lsn(value)
    }
}

impl From<Lsn> for u64 {
    fn from(value: Lsn) -> Self {
        value.0
    }
}

/// First eight bytes of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"WHARFWAL";
/// Version of the format described in this module.
pub const FORMAT_VERSION: u32 = 1;
/// Bytes of the segment header.
pub const SEGMENT_HEADER_LEN: u64 = 32;
/// Bytes of a record header.
pub const RECORD_HEADER_LEN: u64 = 32;
/// `origin_lsn` value of a record that was appended by the owner, not copied by compaction:
/// every record the WAL writes since compaction was removed (docs/storage.md).
pub const ORIGIN_NONE: u64 = u64::MAX;

/// Segment header layout:
/// `magic [u8;8] | version u32 | flags u32 | base_lsn u64 | reserved u32 | crc32c u32`,
/// the CRC covering bytes 0..28.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SegmentHeader {
    pub base_lsn: u64,
}
const _: () = assert!(8 + 4 + 4 + 8 + 4 + 4 == SEGMENT_HEADER_LEN as usize);

impl SegmentHeader {
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_LEN as usize] {
        let mut out = [0u8; SEGMENT_HEADER_LEN as usize];
        out[0..8].copy_from_slice(&SEGMENT_MAGIC);
        out[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        out[12..16].copy_from_slice(&0u32.to_le_bytes());
        out[16..24].copy_from_slice(&self.base_lsn.to_le_bytes());
        out[24..28].copy_from_slice(&0u32.to_le_bytes());
        let crc = crc32c::crc32c(&out[0..28]);
        out[28..32].copy_from_slice(&crc.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, Damage> {
        if bytes.len() < SEGMENT_HEADER_LEN as usize {
            return Err(Damage::ShortSegmentHeader);
        }
        if bytes[0..8] != SEGMENT_MAGIC {
            return Err(Damage::BadMagic);
        }
        let crc = u32_at(bytes, 28);
        if crc != crc32c::crc32c(&bytes[0..28]) {
            return Err(Damage::HeaderChecksum);
        }
        let version = u32_at(bytes, 8);
        if version != FORMAT_VERSION {
            return Err(Damage::UnknownVersion(version));
        }
        Ok(SegmentHeader {
            base_lsn: u64_at(bytes, 16),
        })
    }
}

/// Record header layout:
/// `crc32c u32 | payload_len u32 | lsn u64 | durable_lsn u64 | origin_lsn u64`, followed by the
/// payload. The CRC covers header bytes 4..32 and then the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RecordHeader {
    pub crc: u32,
    pub payload_len: u32,
    /// The record's own LSN: makes every record self-identifying, so a stale or misplaced
    /// record (or a forward scan landing mid-record) is rejected.
    pub lsn: u64,
    /// Log end that was fsynced when this record was written. A valid record whose
    /// `durable_lsn` lies past a damaged record proves the damage hit synced data.
    pub durable_lsn: u64,
    /// LSN this record was copied from by compaction (only in logs written before compaction
    /// was removed), or [`ORIGIN_NONE`].
    pub origin_lsn: u64,
}
const _: () = assert!(4 + 4 + 8 + 8 + 8 == RECORD_HEADER_LEN as usize);

impl RecordHeader {
    pub fn decode(bytes: &[u8]) -> Self {
        assert!(bytes.len() >= RECORD_HEADER_LEN as usize);
        RecordHeader {
            crc: u32_at(bytes, 0),
            payload_len: u32_at(bytes, 4),
            lsn: u64_at(bytes, 8),
            durable_lsn: u64_at(bytes, 16),
            origin_lsn: u64_at(bytes, 24),
        }
    }
}

/// Appends one framed record to `out`.
pub(crate) fn encode_record(
    out: &mut Vec<u8>,
    lsn: u64,
    durable_lsn: u64,
    origin_lsn: u64,
    payload: &[u8],
) {
    assert!(payload.len() <= RECORD_BYTES_MAX as usize);
    let start = out.len();
    out.extend_from_slice(&[0u8; 4]);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&lsn.to_le_bytes());
    out.extend_from_slice(&durable_lsn.to_le_bytes());
    out.extend_from_slice(&origin_lsn.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&out[start + 4..start + 32]), payload);
    out[start..start + 4].copy_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(payload);
}

/// Verifies a framed record whose header starts at `bytes[0]` and is expected to carry
/// `expected_lsn`. `bytes` may extend past the record. Returns the header on success.
pub(crate) fn check_record(
    bytes: &[u8],
    expected_lsn: u64,
    verify_crc: bool,
) -> Result<RecordHeader, Damage> {
    if bytes.len() < RECORD_HEADER_LEN as usize {
        return Err(Damage::TornHeader);
    }
    let header = RecordHeader::decode(bytes);
    if header.lsn != expected_lsn {
        return Err(Damage::LsnMismatch { found: header.lsn });
    }
    if header.payload_len > RECORD_BYTES_MAX {
        return Err(Damage::LengthTooLarge {
            len: header.payload_len,
        });
    }
    let end = RECORD_HEADER_LEN as usize + header.payload_len as usize;
    if bytes.len() < end {
        return Err(Damage::TornPayload);
    }
    if verify_crc {
        let crc = crc32c::crc32c_append(crc32c::crc32c(&bytes[4..32]), &bytes[32..end]);
        if crc != header.crc {
            return Err(Damage::Checksum);
        }
    }
    Ok(header)
}

/// What is wrong with a damaged header or record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Damage {
    /// The segment file is shorter than its header.
    ShortSegmentHeader,
    /// The segment header does not start with [`SEGMENT_MAGIC`].
    BadMagic,
    /// The segment header's CRC does not match.
    HeaderChecksum,
    /// The segment header names a format version this build cannot read.
    UnknownVersion(u32),
    /// The base LSN in the header disagrees with the file name or the previous segment.
    BaseMismatch {
        /// Base LSN found in the header.
        found: u64,
    },
    /// Fewer bytes than a record header remain.
    TornHeader,
    /// The header's LSN is not the record's position.
    LsnMismatch {
        /// LSN found in the header.
        found: u64,
    },
    /// The length field exceeds [`RECORD_BYTES_MAX`].
    LengthTooLarge {
        /// Length found.
        len: u32,
    },
    /// The payload extends past the end of the file.
    TornPayload,
    /// The record's CRC does not match.
    Checksum,
}

impl fmt::Display for Damage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Damage::ShortSegmentHeader => write!(f, "file shorter than the segment header"),
            Damage::BadMagic => write!(f, "bad segment magic"),
            Damage::HeaderChecksum => write!(f, "segment header checksum mismatch"),
            Damage::UnknownVersion(version) => write!(f, "unknown format version {version}"),
            Damage::BaseMismatch { found } => write!(f, "segment base LSN {found} does not match"),
            Damage::TornHeader => write!(f, "truncated record header"),
            Damage::LsnMismatch { found } => write!(f, "record header names LSN {found}"),
            Damage::LengthTooLarge { len } => write!(f, "record length {len} exceeds the limit"),
            Damage::TornPayload => write!(f, "record payload extends past the end of the file"),
            Damage::Checksum => write!(f, "record checksum mismatch"),
        }
    }
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_encoding_matches_golden_bytes() {
        let mut out = Vec::new();
        encode_record(&mut out, 0x10, 0x08, ORIGIN_NONE, b"abc");
        let crc = crc32c::crc32c_append(crc32c::crc32c(&out[4..32]), b"abc");
        let mut golden = Vec::new();
        golden.extend_from_slice(&crc.to_le_bytes());
        golden.extend_from_slice(&[3, 0, 0, 0]);
        golden.extend_from_slice(&[0x10, 0, 0, 0, 0, 0, 0, 0]);
        golden.extend_from_slice(&[0x08, 0, 0, 0, 0, 0, 0, 0]);
        golden.extend_from_slice(&[0xff; 8]);
        golden.extend_from_slice(b"abc");
        assert_eq!(out, golden);
        // Pinned value: a change here is a log format change.
        assert_eq!(crc, 0xfac9_d0bc, "crc was {crc:#x}");
        // And the checksum is CRC32C (Castagnoli): its standard check value.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        let header = check_record(&out, 0x10, true).expect("valid");
        assert_eq!(header.payload_len, 3);
        assert_eq!(
            check_record(&out, 0x11, true),
            Err(Damage::LsnMismatch { found: 0x10 })
        );
    }

    #[test]
    fn segment_header_round_trips_and_rejects_damage() {
        let bytes = SegmentHeader { base_lsn: 4096 }.encode();
        assert_eq!(&bytes[0..8], b"WHARFWAL");
        assert_eq!(
            SegmentHeader::decode(&bytes),
            Ok(SegmentHeader { base_lsn: 4096 })
        );
        for bit in 0..SEGMENT_HEADER_LEN as usize * 8 {
            let mut damaged = bytes;
            damaged[bit / 8] ^= 1 << (bit % 8);
            assert!(SegmentHeader::decode(&damaged).is_err(), "bit {bit}");
        }
    }
}
