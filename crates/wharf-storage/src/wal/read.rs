//! Reading: random access to one record, and the sequential cursor behind [`Records`] and
//! recovery.

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

use crate::error::WalError;
use crate::format::{self, Damage, Lsn, RECORD_HEADER_LEN, RecordHeader, SEGMENT_HEADER_LEN};
use crate::limits::{READ_AHEAD_BYTES, RECORD_BYTES_MAX};
use crate::storage::StorageFile;

use super::Index;

/// Why a cursor stopped.
pub(super) enum CursorError {
    Damaged {
        segment: u64,
        offset: u64,
        damage: Damage,
    },
    Io {
        segment: u64,
        offset: u64,
        source: io::Error,
    },
}

impl CursorError {
    fn into_wal_error(self, path: &Path) -> WalError {
        match self {
            CursorError::Damaged {
                segment,
                offset,
                damage,
            } => WalError::Corrupt {
                segment,
                path: path.to_path_buf(),
                offset,
                damage,
            },
            CursorError::Io {
                segment,
                offset,
                source,
            } => WalError::io("sequential read", segment, offset, source),
        }
    }
}

/// Reads one segment's records in order with large reads.
pub(super) struct Cursor {
    file: Arc<dyn StorageFile>,
    base: u64,
    /// File offset where records end (exclusive).
    limit: u64,
    /// File offset of the next record.
    pos: u64,
    buf: Vec<u8>,
    buf_offset: u64,
    verify_crc: bool,
}

impl Cursor {
    pub(super) fn new(
        file: Arc<dyn StorageFile>,
        base: u64,
        end_lsn: u64,
        verify_crc: bool,
    ) -> Self {
        Cursor {
            file,
            base,
            limit: SEGMENT_HEADER_LEN + (end_lsn - base),
            pos: SEGMENT_HEADER_LEN,
            buf: Vec::new(),
            buf_offset: SEGMENT_HEADER_LEN,
            verify_crc,
        }
    }

    fn lsn_at(&self, offset: u64) -> u64 {
        self.base + (offset - SEGMENT_HEADER_LEN)
    }

    /// Makes `buf` hold the file bytes `[pos, pos + need)` (`need` ≤ bytes left).
    fn fill(&mut self, need: u64) -> Result<(), CursorError> {
        let have_end = self.buf_offset + self.buf.len() as u64;
        if self.pos >= self.buf_offset && self.pos + need <= have_end {
            return Ok(());
        }
        let len = need.max(READ_AHEAD_BYTES as u64).min(self.limit - self.pos);
        self.buf.resize(len as usize, 0);
        self.buf_offset = self.pos;
        self.file
            .read_at(self.pos, &mut self.buf)
            .map_err(|source| CursorError::Io {
                segment: self.base,
                offset: self.pos,
                source,
            })
    }

    fn damaged(&self, damage: Damage) -> CursorError {
        CursorError::Damaged {
            segment: self.base,
            offset: self.pos,
            damage,
        }
    }

    pub(super) fn next_record(&mut self) -> Result<Option<(RecordHeader, Bytes)>, CursorError> {
        if self.pos >= self.limit {
            return Ok(None);
        }
        let left = self.limit - self.pos;
        if left < RECORD_HEADER_LEN {
            return Err(self.damaged(Damage::TornHeader));
        }
        self.fill(RECORD_HEADER_LEN)?;
        let at = (self.pos - self.buf_offset) as usize;
        let header = RecordHeader::decode(&self.buf[at..]);
        let expected = self.lsn_at(self.pos);
        if header.lsn != expected {
            return Err(self.damaged(Damage::LsnMismatch { found: header.lsn }));
        }
        if header.payload_len > RECORD_BYTES_MAX {
            return Err(self.damaged(Damage::LengthTooLarge {
                len: header.payload_len,
            }));
        }
        let total = RECORD_HEADER_LEN + u64::from(header.payload_len);
        if total > left {
            return Err(self.damaged(Damage::TornPayload));
        }
        self.fill(total)?;
        let at = (self.pos - self.buf_offset) as usize;
        let framed = &self.buf[at..at + total as usize];
        let header = format::check_record(framed, expected, self.verify_crc)
            .map_err(|damage| self.damaged(damage))?;
        let payload = Bytes::copy_from_slice(&framed[RECORD_HEADER_LEN as usize..]);
        self.pos += total;
        Ok(Some((header, payload)))
    }
}

/// Iterator over records in LSN order (see [`Wal::records`](super::Wal::records)).
pub struct Records {
    segments: VecDeque<(u64, Arc<dyn StorageFile>, u64, PathBuf)>,
    cursor: Option<(Cursor, PathBuf)>,
    from: u64,
    superseded: HashSet<u64>,
    verify_crc: bool,
    failed: bool,
}

impl Records {
    /// Reads from `from` to the end of the segments in `index` now.
    pub(super) fn new(index: &Index, from: u64) -> Self {
        let segments = index
            .segments
            .values()
            .filter(|segment| segment.end > from)
            .map(|segment| {
                (
                    segment.base,
                    Arc::clone(&segment.file),
                    segment.end,
                    segment.path.clone(),
                )
            })
            .collect::<VecDeque<_>>();
        Records {
            segments,
            cursor: None,
            from,
            superseded: index.superseded.clone(),
            verify_crc: true,
            failed: false,
        }
    }
}

impl fmt::Debug for Records {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Records")
            .field("from", &self.from)
            .field("segments_left", &self.segments.len())
            .finish()
    }
}

impl Iterator for Records {
    type Item = Result<(Lsn, Bytes), WalError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        loop {
            if self.cursor.is_none() {
                let (base, file, end, path) = self.segments.pop_front()?;
                let mut cursor = Cursor::new(file, base, end, self.verify_crc);
                if self.from > base && self.from < end {
                    // LSNs are positions: start reading at the record itself.
                    cursor.pos = SEGMENT_HEADER_LEN + (self.from - base);
                    cursor.buf_offset = cursor.pos;
                }
                self.cursor = Some((cursor, path));
            }
            let (cursor, path) = self.cursor.as_mut().expect("set above");
            match cursor.next_record() {
                Ok(None) => self.cursor = None,
                Ok(Some((header, payload))) => {
                    if header.lsn >= self.from && !self.superseded.contains(&header.lsn) {
                        return Some(Ok((Lsn(header.lsn), payload)));
                    }
                }
                Err(error) => {
                    self.failed = true;
                    return Some(Err(error.into_wal_error(path)));
                }
            }
        }
    }
}

/// Reads the record at `lsn` in the segment at `base` (two positional reads, CRC verified).
pub(super) fn read_record(
    file: &dyn StorageFile,
    base: u64,
    path: &Path,
    lsn: Lsn,
) -> Result<Bytes, WalError> {
    let offset = SEGMENT_HEADER_LEN + (lsn.0 - base);
    let mut header = [0u8; RECORD_HEADER_LEN as usize];
    file.read_at(offset, &mut header)
        .map_err(|source| WalError::io("read record header", base, offset, source))?;
    let parsed = RecordHeader::decode(&header);
    if parsed.lsn != lsn.0 || parsed.payload_len > RECORD_BYTES_MAX {
        // Not a record boundary (a caller bug), or damage.
        return Err(WalError::UnknownLsn { lsn });
    }
    let mut framed = vec![0u8; RECORD_HEADER_LEN as usize + parsed.payload_len as usize];
    framed[..RECORD_HEADER_LEN as usize].copy_from_slice(&header);
    file.read_at(
        offset + RECORD_HEADER_LEN,
        &mut framed[RECORD_HEADER_LEN as usize..],
    )
    .map_err(|source| WalError::io("read record payload", base, offset, source))?;
    format::check_record(&framed, lsn.0, true).map_err(|damage| WalError::Corrupt {
        segment: base,
        path: path.to_path_buf(),
        offset,
        damage,
    })?;
    Ok(Bytes::from(framed).slice(RECORD_HEADER_LEN as usize..))
}
