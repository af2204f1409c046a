//! Recovery when the log is opened: every segment read in order, every record verified, a
//! torn tail of the last segment cut (docs/storage.md, "Recovery rules").

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use crate::error::WalError;
use crate::format::{
    self, Damage, Lsn, ORIGIN_NONE, RECORD_HEADER_LEN, RecordHeader, SEGMENT_HEADER_LEN,
    SegmentHeader,
};
use crate::storage::{Storage, StorageFile};

use super::read::{Cursor, CursorError};
use super::{Index, RecoveryReport, Segment, Truncation, WalConfig, segment_path};

/// The base LSN a segment file name (`{base:020}.wal`) gives, if it is one.
fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".wal")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The recovered log: its index, and what recovery found and did.
pub(crate) struct Recovered {
    pub(super) index: Index,
    pub(crate) report: RecoveryReport,
}

/// Recovery: see docs/storage.md "Recovery rules".
pub(crate) fn recover(
    storage: &dyn Storage,
    dir: &Path,
    config: &WalConfig,
) -> Result<Recovered, WalError> {
    #[cfg(test)]
    let verify_crc = !config.hooks.skip_crc;
    #[cfg(not(test))]
    let verify_crc = true;
    let _ = config;
    storage
        .create_dir_all(dir)
        .map_err(|source| WalError::io("create WAL directory", 0, 0, source))?;
    let names = storage
        .list_dir(dir)
        .map_err(|source| WalError::io("list WAL directory", 0, 0, source))?;
    let mut bases: Vec<u64> = names
        .iter()
        .filter_map(|name| parse_segment_name(name))
        .collect();
    bases.sort_unstable();
    let mut report = RecoveryReport::default();
    let mut segments = BTreeMap::new();
    if bases.is_empty() {
        let path = segment_path(dir, 0);
        let file = storage
            .create(&path)
            .map_err(|source| WalError::io("create segment", 0, 0, source))?;
        write_fresh_header(file.as_ref(), 0)?;
        storage
            .sync_dir(dir)
            .map_err(|source| WalError::SyncFailed {
                segment: 0,
                source: Arc::new(source),
            })?;
        // A brand-new directory's own entry must be durable too, or the whole log can vanish.
        if let Some(parent) = dir.parent().filter(|parent| !parent.as_os_str().is_empty()) {
            storage
                .sync_dir(parent)
                .map_err(|source| WalError::SyncFailed {
                    segment: 0,
                    source: Arc::new(source),
                })?;
        }
        bases.push(0);
    }
    let mut origins = Vec::new();
    let mut prev_end = 0u64;
    let n_segments = bases.len();
    for (segment_idx, &base) in bases.iter().enumerate() {
        let is_last = segment_idx + 1 == n_segments;
        let path = segment_path(dir, base);
        let corrupt = |offset: u64, damage: Damage| WalError::Corrupt {
            segment: base,
            path: path.clone(),
            offset,
            damage,
        };
        let file = storage
            .open(&path)
            .map_err(|source| WalError::io("open segment", base, 0, source))?;
        let file_len = file
            .len()
            .map_err(|source| WalError::io("stat segment", base, 0, source))?;
        let mut header_bytes = vec![0u8; file_len.min(SEGMENT_HEADER_LEN) as usize];
        file.read_at(0, &mut header_bytes)
            .map_err(|source| WalError::io("read segment header", base, 0, source))?;
        let header = SegmentHeader::decode(&header_bytes).and_then(|header| {
            if header.base_lsn == base {
                Ok(header)
            } else {
                Err(Damage::BaseMismatch {
                    found: header.base_lsn,
                })
            }
        });
        if let Err(damage) = header {
            // Records are written only after the header is fsynced, so a bad header with no
            // room for records is a rollover interrupted by the crash, nothing else.
            if is_last && file_len <= SEGMENT_HEADER_LEN && base >= prev_end {
                tracing::warn!(path = %path.display(), %damage, "rewriting torn header of the last segment");
                file.truncate(0)
                    .map_err(|source| WalError::io("truncate torn segment", base, 0, source))?;
                write_fresh_header(file.as_ref(), base)?;
                report.rewrote_segment_header = Some(base);
            } else {
                return Err(corrupt(0, damage));
            }
        }
        if base < prev_end {
            return Err(corrupt(0, Damage::BaseMismatch { found: base }));
        }
        let file_len = file_len.max(SEGMENT_HEADER_LEN);
        let end_lsn = base + (file_len - SEGMENT_HEADER_LEN);
        let mut cursor = Cursor::new(Arc::clone(&file), base, end_lsn, verify_crc);
        let mut n_records = 0u64;
        let mut valid_end = base;
        loop {
            match cursor.next_record() {
                Ok(None) => break,
                Ok(Some((header, _))) => {
                    n_records += 1;
                    valid_end = header.lsn + RECORD_HEADER_LEN + u64::from(header.payload_len);
                    if header.origin_lsn != ORIGIN_NONE {
                        origins.push(header.origin_lsn);
                    }
                }
                Err(CursorError::Io {
                    segment,
                    offset,
                    source,
                }) => {
                    return Err(WalError::io("recovery read", segment, offset, source));
                }
                Err(CursorError::Damaged { offset, damage, .. }) => {
                    if !is_last {
                        return Err(corrupt(offset, damage));
                    }
                    if let Some(vouched_at) =
                        find_vouching_record(file.as_ref(), base, offset, file_len, verify_crc)?
                    {
                        tracing::error!(path = %path.display(), offset, vouched_at, %damage, "damaged record followed by records written after it was fsynced");
                        return Err(corrupt(offset, damage));
                    }
                    tracing::warn!(
                        path = %path.display(), offset, bytes_dropped = file_len - offset, %damage,
                        "truncating torn tail of the last WAL segment"
                    );
                    file.truncate(offset).map_err(|source| {
                        WalError::io("truncate torn tail", base, offset, source)
                    })?;
                    report.truncated = Some(Truncation {
                        segment: base,
                        path: path.clone(),
                        offset,
                        bytes_dropped: file_len - offset,
                        damage,
                    });
                    break;
                }
            }
        }
        if is_last {
            // Whatever survived may be only in the page cache (after kill -9): make it durable
            // before the broker rebuilds state from it.
            file.sync().map_err(|source| WalError::SyncFailed {
                segment: base,
                source: Arc::new(source),
            })?;
        }
        report.records += n_records;
        prev_end = valid_end;
        segments.insert(
            base,
            Segment {
                base,
                path,
                file,
                end: valid_end,
                n_records,
                n_live: n_records,
                released: HashSet::new(),
            },
        );
    }
    storage
        .sync_dir(dir)
        .map_err(|source| WalError::SyncFailed {
            segment: prev_end,
            source: Arc::new(source),
        })?;
    let active = *segments.keys().next_back().expect("at least one segment");
    let mut index = Index {
        segments,
        active,
        superseded: HashSet::new(),
    };
    // Compaction copies (written before compaction was removed): an original whose copy also
    // survived is dead and never yielded, so each record is replayed once.
    for origin in origins {
        if index
            .segment_of_mut(origin)
            .is_some_and(|segment| segment.release(origin))
        {
            index.superseded.insert(origin);
        }
    }
    report.superseded = index.superseded.len() as u64;
    report.segments = index.segments.len();
    report.end_lsn = Lsn(prev_end);
    Ok(Recovered { index, report })
}

/// Writes and fsyncs the header of an empty segment at `base`.
fn write_fresh_header(file: &dyn StorageFile, base: u64) -> Result<(), WalError> {
    file.write_at(0, &SegmentHeader { base_lsn: base }.encode())
        .map_err(|source| WalError::io("write segment header", base, 0, source))?;
    file.sync().map_err(|source| WalError::SyncFailed {
        segment: base,
        source: Arc::new(source),
    })
}

/// After damage at file offset `bad`, looks for any valid record further on whose header says
/// the log was fsynced past `bad` when it was written. Such a record proves the damaged bytes
/// had been durable: that is corruption, not a torn write, and recovery must refuse.
/// Returns the file offset of the first such record.
fn find_vouching_record(
    file: &dyn StorageFile,
    base: u64,
    bad: u64,
    file_len: u64,
    verify_crc: bool,
) -> Result<Option<u64>, WalError> {
    let mut rest = vec![0u8; (file_len - bad) as usize];
    file.read_at(bad, &mut rest)
        .map_err(|source| WalError::io("read damaged tail", base, bad, source))?;
    let bad_lsn = base + (bad - SEGMENT_HEADER_LEN);
    for at in 1..rest.len() {
        if rest.len() - at < RECORD_HEADER_LEN as usize {
            break;
        }
        let lsn = bad_lsn + at as u64;
        // Cheap filter first: a record names its own LSN.
        if RecordHeader::decode(&rest[at..]).lsn != lsn {
            continue;
        }
        if let Ok(header) = format::check_record(&rest[at..], lsn, verify_crc)
            && header.durable_lsn > bad_lsn
        {
            return Ok(Some(bad + at as u64));
        }
    }
    Ok(None)
}
