//! Damage-then-recover checker, shared by the `wal_recover` fuzz target and
//! `tests/recover_damage.rs` (feature `recovery-check`; not part of the API).
//!
//! One case, decoded from arbitrary bytes ([`check`]): records are written through the real
//! [`Wal`] on a [`MemStorage`] (small segments, so there are several; batches fsynced or not,
//! the log sometimes closed and reopened in between); the segment files are then damaged (bit
//! flips, overwritten ranges, zeroed sectors, cuts, appended garbage, ranges copied from
//! elsewhere in the log, removed segment files, stray segment files); then [`Wal::open`] runs
//! recovery and [`Wal::records`] replays. The oracle predicts the outcome from what was written
//! and which bytes the damage changed, by the recovery rules of docs/storage.md, and the case
//! fails unless recovery does exactly that:
//!
//! - damage in a segment that is not the last, a damaged segment header (other than a last
//!   segment no longer than a header: an interrupted rollover, rewritten), overlapping
//!   segments, or damage in the last segment followed by an intact record whose durable LSN
//!   lies past the damage: the open fails with `Corrupt` naming that segment and offset;
//! - otherwise the open succeeds, cuts the last segment exactly at its first damaged byte range
//!   (and reports that cut), and replays exactly the records written before the damage, in LSN
//!   order, byte for byte: nothing invented, altered, skipped or reordered;
//! - after a successful open, a power loss loses none of recovery's repairs (the log reopens
//!   with nothing to cut and the same records), and an append gets the next LSN and is
//!   replayed after them.
//!
//! Gaps between segments stay legal as the rules say (GC deletes whole segments, so a removed
//! segment file, or a sealed segment ending early at a record boundary, looks the same);
//! [`Case::gap`] counts them.
//!
//! Why byte equality is enough to know which records recovery can still see: payloads and
//! garbage come from a PRNG and every record names its own LSN, so no bytes the damage produces
//! (random, constant, or copied from another position) form a valid record anywhere but where
//! the WAL wrote it, short of a CRC32C collision. (The documented false refusal, a payload that
//! embeds a valid record header for its own position, is out of scope for the same reason.)
//! Nothing is released and GC is off, so the log holds exactly what was written and no record
//! carries an origin LSN (`superseded` must stay 0).
//!
//! Input layout (missing bytes read as 0, so every input is a case): segment size selector;
//! payload seed `u32`; number of mutations, each 8 bytes `kind file at:u16 len:u16 arg arg2`;
//! number of batches, each a flags byte then `u16` payload lengths.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};

use bytes::Bytes;

use crate::format::{ORIGIN_NONE, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN, SegmentHeader};
use crate::limits::SEGMENT_BYTES_MIN;
use crate::mem::{MemStorage, SECTOR_BYTES, SplitMix64};
use crate::storage::Storage;
use crate::wal::{Committed, SyncCoverage, SyncPolicy, Wal, WalConfig};
use crate::{Lsn, WalError};

/// Most batches one case writes: several segments of 4–16 KiB, and cases stay fast.
const BATCHES_MAX: usize = 64;
/// Most framed bytes one case writes (the same reason).
const WRITTEN_BYTES_MAX: u64 = 96 * 1024;
/// Most damage operations one case applies.
const MUTATIONS_MAX: usize = 8;
/// Most clean reopens while writing (each starts a writer thread).
const REOPENS_MAX: usize = 8;

fn dir() -> &'static Path {
    Path::new("/wal")
}

fn segment_path(base: u64) -> PathBuf {
    dir().join(format!("{base:020}.wal"))
}

/// What one case did, for a harness's coverage counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Case {
    /// Segment files the WAL wrote.
    pub n_segments: usize,
    /// Records the WAL wrote.
    pub n_records: usize,
    /// Damage operations applied (some decode to nothing, e.g. on an empty file).
    pub n_mutations: usize,
    /// What recovery did (and had to do).
    pub outcome: Outcome,
    /// The replay lacks written records while yielding later ones: a removed segment file or a
    /// sealed segment cut at a record boundary, which the rules accept as GC'd segments.
    pub gap: bool,
}

/// What recovery did in a case that passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Opened without cutting anything.
    Opened,
    /// Opened after cutting a torn tail from the last segment.
    CutTornTail,
    /// Opened after rewriting the torn header of the last segment.
    RewroteHeader,
    /// Refused to open with `Corrupt` at the segment and offset the rule names.
    Refused(Rule),
}

/// The recovery rule that made a case refuse (docs/storage.md, "Recovery rules").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// 1: a damaged segment header, other than a torn one of the last segment.
    SegmentHeader,
    /// 1: a segment's base below the previous segment's end.
    Overlap,
    /// 2: damage in a segment that is not the last (sealed).
    SealedSegment,
    /// 3: damage in the last segment followed by a record written after it was fsynced.
    Vouched,
}

/// Runs one case decoded from `input`. `Err` describes how recovery broke the rules (or how the
/// writer broke the format), with the case's writes and damage; a panic inside the WAL
/// propagates.
pub fn check(input: &[u8]) -> Result<Case, String> {
    check_with(input, WalConfig::default())
}

/// Input bytes for a seeded case. Random, except that most cases damage little, most damage
/// lands in the last two segments and most batches are fsynced: uniformly placed damage nearly
/// always hits a sealed segment, and the last segment's rules would go untested.
pub fn random_input(seed: u64) -> Vec<u8> {
    let mut rng = SplitMix64::new(seed);
    let mut byte = || rng.next_u64() as u8;
    let mut input: Vec<u8> = (0..5).map(|_| byte()).collect();
    let n_mutations = match byte() {
        many if many % 8 == 0 => many % 9,
        few => few % 4,
    };
    input.push(n_mutations);
    for _ in 0..n_mutations {
        let kind = byte();
        let file = match byte() % 4 {
            0 | 1 => 0x80,
            2 => 0x81,
            _ => byte(),
        };
        input.extend([kind, file]);
        input.extend((0..6).map(|_| byte()));
    }
    input.push(byte());
    for _ in 0..BATCHES_MAX {
        let mut flags = byte();
        if flags & 0x80 != 0 {
            flags &= !4;
        }
        input.push(flags);
        input.extend((0..=flags & 3).flat_map(|_| [byte(), byte()]));
    }
    input
}

/// [`check`] with the WAL's configuration taken from `template` (except the fields a case
/// decides): lets the crate's negative control switch off the CRC check.
pub(crate) fn check_with(input: &[u8], template: WalConfig) -> Result<Case, String> {
    let plan = Plan::decode(input);
    let config = WalConfig {
        segment_bytes: plan.segment_bytes,
        sync_policy: SyncPolicy::Always,
        // Nothing is released and no GC, so the log is exactly what was written.
        roll_dead_active_bytes: u64::MAX,
        ..template
    };
    let storage = MemStorage::new(plan.payload_seed);
    let written = write(&plan, &storage, &config)?;
    let mut files = read_dir(&storage)?;
    written.check_images(&files)?;
    let mut rng = SplitMix64::new(plan.payload_seed ^ 0xDA3A_6E5E_ED00_0000);
    let mut damage = Vec::new();
    for mutation in &plan.mutations {
        if let Some(what) = mutation.apply(&mut files, written.end, &mut rng) {
            damage.push(what);
        }
    }
    install(&storage, &written, &files)?;
    let expected = predict(&written, &files);
    let outcome =
        recover_and_compare(&storage, &config, &written, &expected).map_err(|failure| {
            let mut report = format!("{failure}\n  segment bytes {}", plan.segment_bytes);
            for (base, records) in &written.segments {
                let _ = write!(
                    report,
                    "\n  written: segment {base}: {} records, LSNs {:?}",
                    records.len(),
                    records
                        .iter()
                        .map(|record| (record.lsn, record.durable_lsn))
                        .collect::<Vec<_>>()
                );
            }
            for what in &damage {
                let _ = write!(report, "\n  damage: {what}");
            }
            let _ = write!(report, "\n  expected: {expected}");
            report
        })?;
    // Written records missing from the replay while later ones are yielded.
    let gap = match &expected {
        Expected::Open(Opening { records, .. }) => {
            let yielded: HashSet<u64> = records.iter().map(|(lsn, _)| *lsn).collect();
            let last = records.last().map_or(0, |(lsn, _)| *lsn);
            written
                .records()
                .any(|record| record.lsn < last && !yielded.contains(&record.lsn))
        }
        Expected::Refuse { .. } => false,
    };
    Ok(Case {
        n_segments: written.segments.len(),
        n_records: written.records().count(),
        n_mutations: damage.len(),
        outcome,
        gap,
    })
}

// ---------------------------------------------------------------------------------------------
// Decoding a case.

/// Reads the input front to back; past its end every byte is 0.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&byte, rest)) => {
                self.0 = rest;
                byte
            }
            None => 0,
        }
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
}

struct Plan {
    segment_bytes: u64,
    payload_seed: u64,
    mutations: Vec<Mutation>,
    batches: Vec<Batch>,
}

struct Batch {
    sync: SyncPolicy,
    reopen_before: bool,
    zero_payloads: bool,
    lens: Vec<usize>,
}

impl Plan {
    fn decode(input: &[u8]) -> Plan {
        let mut input = Input(input);
        let segment_bytes = SEGMENT_BYTES_MIN << (input.u8() % 3);
        let payload_seed = u64::from(input.u32());
        let n_mutations = usize::from(input.u8()) % (MUTATIONS_MAX + 1);
        let mutations = (0..n_mutations)
            .map(|_| Mutation {
                kind: input.u8(),
                file: input.u8(),
                at: input.u16(),
                len: input.u16(),
                arg: input.u8(),
                arg2: input.u8(),
            })
            .collect();
        // Any four records fit an empty segment, so no batch is refused as too large.
        let records_area = segment_bytes - SEGMENT_HEADER_LEN;
        let len_max = records_area / 4 - RECORD_HEADER_LEN;
        let n_batches = 1 + usize::from(input.u8()) % BATCHES_MAX;
        let mut batches = Vec::new();
        let (mut written, mut reopens) = (0u64, 0);
        while batches.len() < n_batches && written < WRITTEN_BYTES_MAX {
            let flags = input.u8();
            let reopen_before = flags & 0x38 == 0x38 && reopens < REOPENS_MAX;
            reopens += usize::from(reopen_before);
            let lens: Vec<usize> = (0..=flags & 3)
                .map(|_| (u64::from(input.u16()) % (len_max + 1)) as usize)
                .collect();
            written += lens
                .iter()
                .map(|&len| RECORD_HEADER_LEN + len as u64)
                .sum::<u64>();
            batches.push(Batch {
                sync: if flags & 4 == 0 {
                    SyncPolicy::Always
                } else {
                    SyncPolicy::Never
                },
                reopen_before,
                zero_payloads: flags & 0x40 != 0,
                lens,
            });
        }
        Plan {
            segment_bytes,
            payload_seed,
            mutations,
            batches,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Writing through the real WAL, with the bytes it must produce predicted alongside.

/// A record as the format says it must be on disk.
struct Record {
    lsn: u64,
    durable_lsn: u64,
    payload: Bytes,
    framed: Vec<u8>,
}

struct Written {
    /// Base LSN → the records of that segment, in order.
    segments: BTreeMap<u64, Vec<Record>>,
    /// LSN just past the last record.
    end: u64,
}

impl Written {
    fn records(&self) -> impl Iterator<Item = &Record> {
        self.segments.values().flatten()
    }

    /// The directory must hold exactly the predicted segment files, byte for byte.
    fn check_images(&self, files: &BTreeMap<u64, Vec<u8>>) -> Result<(), String> {
        let names: Vec<u64> = files.keys().copied().collect();
        let bases: Vec<u64> = self.segments.keys().copied().collect();
        if names != bases {
            return Err(format!(
                "writer: segment files {names:?}, the rollover rule gives {bases:?}"
            ));
        }
        for (base, records) in &self.segments {
            let mut image = SegmentHeader { base_lsn: *base }.encode().to_vec();
            for record in records {
                image.extend_from_slice(&record.framed);
            }
            let file = &files[base];
            if *file != image {
                let at = file
                    .iter()
                    .zip(&image)
                    .position(|(found, wanted)| found != wanted)
                    .unwrap_or(file.len().min(image.len()));
                return Err(format!(
                    "writer: segment {base} differs from the format at offset {at} \
                     ({} bytes, expected {})",
                    file.len(),
                    image.len()
                ));
            }
        }
        Ok(())
    }
}

fn open(
    storage: &MemStorage,
    config: &WalConfig,
) -> Result<(Wal, crate::RecoveryReport), WalError> {
    Wal::open(Arc::new(storage.clone()), dir(), config.clone())
}

/// Appends one batch as a leader (this thread writes and fsyncs it when the log is idle; no
/// thread hand-off per batch) and waits for its completion.
fn append(wal: &Wal, records: Vec<Bytes>, sync: SyncPolicy) -> Result<Committed, WalError> {
    let (tx, rx) = mpsc::sync_channel(1);
    let leader = wal.lead();
    wal.append_with(
        records,
        sync,
        Box::new(move |outcome| {
            let _ = tx.send(outcome);
        }),
    );
    leader.commit();
    rx.recv().unwrap_or(Err(WalError::Closed))
}

fn payload(rng: &mut SplitMix64, len: usize, zeros: bool) -> Bytes {
    if zeros {
        return Bytes::from(vec![0u8; len]);
    }
    Bytes::from((0..len).map(|_| rng.next_u64() as u8).collect::<Vec<u8>>())
}

/// Writes the plan's batches and predicts every byte: LSNs are positions, a batch that does
/// not fit seals the segment (fsync) and starts the next at the current end, and each record
/// carries the end fsynced when it was written (after the previous `Always` batch, a seal, or
/// an open).
fn write(plan: &Plan, storage: &MemStorage, config: &WalConfig) -> Result<Written, String> {
    let (mut wal, _) = open(storage, config).map_err(|error| format!("open empty: {error}"))?;
    let records_area = config.segment_bytes - SEGMENT_HEADER_LEN;
    let mut segments = BTreeMap::from([(0, Vec::new())]);
    let (mut write_lsn, mut durable_lsn, mut active_base) = (0u64, 0u64, 0u64);
    let mut rng = SplitMix64::new(plan.payload_seed);
    for batch in &plan.batches {
        if batch.reopen_before {
            drop(wal);
            let (reopened, report) =
                open(storage, config).map_err(|error| format!("reopen undamaged: {error}"))?;
            if report.truncated.is_some()
                || report.rewrote_segment_header.is_some()
                || report.end_lsn.0 != write_lsn
            {
                return Err(format!(
                    "reopening an undamaged log at end {write_lsn}: {report:?}"
                ));
            }
            wal = reopened;
            durable_lsn = write_lsn;
        }
        let payloads: Vec<Bytes> = batch
            .lens
            .iter()
            .map(|&len| payload(&mut rng, len, batch.zero_payloads))
            .collect();
        let framed_bytes: u64 = payloads
            .iter()
            .map(|payload| RECORD_HEADER_LEN + payload.len() as u64)
            .sum();
        if write_lsn - active_base + framed_bytes > records_area {
            durable_lsn = write_lsn;
            active_base = write_lsn;
            segments.insert(active_base, Vec::new());
        }
        let segment = segments.get_mut(&active_base).expect("active segment");
        let mut lsns = Vec::new();
        let mut lsn = write_lsn;
        for payload in &payloads {
            let mut framed = Vec::new();
            crate::format::encode_record(&mut framed, lsn, durable_lsn, ORIGIN_NONE, payload);
            lsns.push(Lsn(lsn));
            let next = lsn + framed.len() as u64;
            segment.push(Record {
                lsn,
                durable_lsn,
                payload: payload.clone(),
                framed,
            });
            lsn = next;
        }
        let committed = append(&wal, payloads, batch.sync)
            .map_err(|error| format!("append at LSN {write_lsn}: {error}"))?;
        let coverage = match batch.sync {
            SyncPolicy::Always => SyncCoverage::Fsynced,
            _ => SyncCoverage::Unsynced,
        };
        if committed.lsns != lsns || committed.end != Lsn(lsn) || committed.coverage != coverage {
            return Err(format!(
                "append at LSN {write_lsn}: {committed:?}, expected LSNs {lsns:?} end {lsn} {coverage:?}"
            ));
        }
        write_lsn = lsn;
        if batch.sync == SyncPolicy::Always {
            durable_lsn = write_lsn;
        }
    }
    // Close: commits and fsyncs everything, so the files can be damaged "on the disk".
    drop(wal);
    Ok(Written {
        segments,
        end: write_lsn,
    })
}

fn read_file(storage: &MemStorage, path: &Path) -> Result<Vec<u8>, String> {
    let file = storage
        .open(path)
        .map_err(|error| format!("open {}: {error}", path.display()))?;
    let len = file.len().map_err(|error| error.to_string())?;
    let mut bytes = vec![0u8; len as usize];
    file.read_at(0, &mut bytes)
        .map_err(|error| format!("read {}: {error}", path.display()))?;
    Ok(bytes)
}

/// Every `*.wal` file of the log directory by base LSN (the WAL writes no other file).
fn read_dir(storage: &MemStorage) -> Result<BTreeMap<u64, Vec<u8>>, String> {
    let mut files = BTreeMap::new();
    for name in storage.list_dir(dir()).map_err(|error| error.to_string())? {
        let base = name
            .strip_suffix(".wal")
            .and_then(|digits| digits.parse::<u64>().ok())
            .filter(|base| segment_path(*base).file_name() == Some(name.as_ref()))
            .ok_or_else(|| format!("writer: unexpected file {name} in the log directory"))?;
        files.insert(base, read_file(storage, &dir().join(&name))?);
    }
    Ok(files)
}

// ---------------------------------------------------------------------------------------------
// Damage.

/// One damage operation, as decoded: `kind & 7` selects it, `kind & 0x80` counts `at` from the
/// end of the file; `file` picks a segment by index (`& 0x80`: from the last one).
#[derive(Debug, Clone, Copy)]
struct Mutation {
    kind: u8,
    file: u8,
    at: u16,
    len: u16,
    arg: u8,
    arg2: u8,
}

/// Fills `bytes` with zeros, 0xff, or PRNG bytes (never with anything that forms a record).
fn fill(bytes: &mut [u8], how: u8, rng: &mut SplitMix64) -> &'static str {
    match how % 4 {
        0 => {
            bytes.fill(0);
            "zeros"
        }
        1 => {
            bytes.fill(0xff);
            "0xff"
        }
        _ => {
            bytes
                .iter_mut()
                .for_each(|byte| *byte = rng.next_u64() as u8);
            "random bytes"
        }
    }
}

impl Mutation {
    fn pick(selector: u8, bases: &[u64]) -> u64 {
        let idx = usize::from(selector & 0x7f) % bases.len();
        if selector & 0x80 != 0 {
            bases[bases.len() - 1 - idx]
        } else {
            bases[idx]
        }
    }

    /// A byte position in `0..len` (`len > 0`).
    fn position(&self, len: usize) -> usize {
        let step = usize::from(self.at) % len;
        if self.kind & 0x80 != 0 {
            len - 1 - step
        } else {
            step
        }
    }

    /// Applies the damage to `files`; returns what it did, or `None` if it decodes to nothing.
    fn apply(
        &self,
        files: &mut BTreeMap<u64, Vec<u8>>,
        log_end: u64,
        rng: &mut SplitMix64,
    ) -> Option<String> {
        let bases: Vec<u64> = files.keys().copied().collect();
        if self.kind & 7 == 7 {
            return self.add_segment(files, &bases, log_end, rng);
        }
        if bases.is_empty() {
            return None;
        }
        let base = Self::pick(self.file, &bases);
        let len = files[&base].len();
        match self.kind & 7 {
            0 if len > 0 => {
                let at = self.position(len);
                let bit = self.arg % 8;
                files.get_mut(&base)?[at] ^= 1 << bit;
                Some(format!("segment {base}: flip bit {bit} at offset {at}"))
            }
            1 if len > 0 => {
                let at = self.position(len);
                let end = len.min(at + 1 + usize::from(self.len) % 512);
                let what = fill(&mut files.get_mut(&base)?[at..end], self.arg, rng);
                Some(format!("segment {base}: overwrite {at}..{end} with {what}"))
            }
            2 if len > 0 => {
                let at = self.position(len);
                let start = at - at % SECTOR_BYTES as usize;
                let end = len.min(start + SECTOR_BYTES as usize);
                files.get_mut(&base)?[start..end].fill(0);
                Some(format!("segment {base}: zero sector {start}..{end}"))
            }
            3 => {
                let step = usize::from(self.at) % (len + 1);
                let cut = if self.kind & 0x80 != 0 {
                    len - step
                } else {
                    step
                };
                files.get_mut(&base)?.truncate(cut);
                Some(format!("segment {base}: cut to {cut} bytes (from {len})"))
            }
            4 => {
                let mut garbage = vec![0u8; 1 + usize::from(self.len) % 1024];
                let what = fill(&mut garbage, self.arg, rng);
                files.get_mut(&base)?.extend_from_slice(&garbage);
                Some(format!(
                    "segment {base}: append {} bytes of {what} at {len}",
                    garbage.len()
                ))
            }
            5 if len > 0 => {
                // A misdirected write: bytes of the log (maybe whole records) at the wrong place.
                let from = Self::pick(self.arg, &bases);
                let source = &files[&from];
                if source.is_empty() {
                    return None;
                }
                let from_at = usize::from(self.len) % source.len();
                let n = (1 + usize::from(self.arg2) * 4).min(source.len() - from_at);
                let copied = source[from_at..from_at + n].to_vec();
                let at = self.position(len);
                let target = files.get_mut(&base)?;
                if target.len() < at + n {
                    target.resize(at + n, 0);
                }
                target[at..at + n].copy_from_slice(&copied);
                Some(format!(
                    "segment {base}: copy {n} bytes from segment {from} offset {from_at} to offset {at}"
                ))
            }
            6 => {
                files.remove(&base);
                Some(format!("segment {base}: file removed"))
            }
            _ => None,
        }
    }

    /// A stray segment file: the next segment of an interrupted rollover (a header prefix, or a
    /// header followed by garbage), one past a gap, or one whose base falls inside a segment.
    fn add_segment(
        &self,
        files: &mut BTreeMap<u64, Vec<u8>>,
        bases: &[u64],
        log_end: u64,
        rng: &mut SplitMix64,
    ) -> Option<String> {
        let base = match self.arg % 4 {
            0 => log_end,
            1 => log_end + 1 + u64::from(self.at),
            2 if !bases.is_empty() => Self::pick(self.file, bases) + 1 + u64::from(self.at) % 4096,
            _ => log_end + 32 * u64::from(self.at % 64),
        };
        if files.contains_key(&base) {
            return None;
        }
        let header_len = usize::from(self.arg2 % 48);
        let mut bytes = SegmentHeader { base_lsn: base }.encode()[..header_len.min(32)].to_vec();
        let mut what = "";
        if header_len > 32 {
            let mut garbage = vec![0u8; (header_len - 32) * 16];
            what = fill(&mut garbage, self.len as u8, rng);
            bytes.extend_from_slice(&garbage);
        }
        let len = bytes.len();
        files.insert(base, bytes);
        Some(format!(
            "new segment file {base}: {} header bytes, {} bytes of {what}",
            header_len.min(32),
            len - header_len.min(32)
        ))
    }
}

/// Puts the damaged files on the simulated disk, durably (as if the disk held those bytes).
fn install(
    storage: &MemStorage,
    written: &Written,
    files: &BTreeMap<u64, Vec<u8>>,
) -> Result<(), String> {
    let failed = |error: std::io::Error| format!("installing the damage: {error}");
    for base in written.segments.keys() {
        let path = segment_path(*base);
        match files.get(base) {
            Some(bytes) => storage
                .edit_durably(&path, |data| data.clone_from(bytes))
                .map_err(failed)?,
            None => storage.remove(&path).map_err(failed)?,
        }
    }
    for (base, bytes) in files {
        if !written.segments.contains_key(base) {
            let file = storage.create(&segment_path(*base)).map_err(failed)?;
            file.write_at(0, bytes).map_err(failed)?;
            file.sync().map_err(failed)?;
        }
    }
    storage.sync_dir(dir()).map_err(failed)
}

// ---------------------------------------------------------------------------------------------
// The oracle.

/// What recovery must do with a damaged log.
enum Expected {
    Open(Opening),
    Refuse {
        segment: u64,
        offset: u64,
        rule: Rule,
        why: String,
    },
}

/// A successful open the rules require.
struct Opening {
    /// (LSN, payload) of every record the replay must yield, in order.
    records: Vec<(u64, Bytes)>,
    end_lsn: u64,
    segments: usize,
    /// (segment, file offset, bytes dropped) of the torn tail cut.
    truncated: Option<(u64, u64, u64)>,
    rewrote_segment_header: Option<u64>,
}

impl std::fmt::Display for Expected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Expected::Open(open) => write!(
                f,
                "open with {} records, end {}, {} segments, cut {:?}, rewritten header {:?}",
                open.records.len(),
                open.end_lsn,
                open.segments,
                open.truncated,
                open.rewrote_segment_header
            ),
            Expected::Refuse {
                segment,
                offset,
                rule,
                why,
            } => write!(
                f,
                "refuse at segment {segment} offset {offset} ({rule:?}): {why}"
            ),
        }
    }
}

fn file_offset(base: u64, lsn: u64) -> usize {
    (SEGMENT_HEADER_LEN + (lsn - base)) as usize
}

/// The recovery rules of docs/storage.md, applied to what was written and what the damage
/// left of it. A written record is *intact* if its bytes are still at its position; nothing else
/// in a file can be a valid record (see the module comment).
fn predict(written: &Written, files: &BTreeMap<u64, Vec<u8>>) -> Expected {
    let mut expected = Vec::new();
    let mut truncated = None;
    let mut rewrote_segment_header = None;
    let mut prev_end = 0u64;
    let n_files = files.len();
    for (idx, (&base, bytes)) in files.iter().enumerate() {
        let is_last = idx + 1 == n_files;
        let refuse = |offset: u64, rule: Rule, why: String| Expected::Refuse {
            segment: base,
            offset,
            rule,
            why,
        };
        let header = SegmentHeader { base_lsn: base }.encode();
        if bytes.get(..header.len()) != Some(&header[..]) {
            // Rule 1: only a last segment no longer than a header is an interrupted rollover.
            if is_last && bytes.len() as u64 <= SEGMENT_HEADER_LEN && base >= prev_end {
                rewrote_segment_header = Some(base);
                prev_end = base;
                break;
            }
            return refuse(0, Rule::SegmentHeader, "damaged segment header".into());
        }
        if base < prev_end {
            return refuse(
                0,
                Rule::Overlap,
                format!("base overlaps the previous segment's end {prev_end}"),
            );
        }
        let records: &[Record] = written.segments.get(&base).map_or(&[], Vec::as_slice);
        let intact = |record: &Record| {
            let at = file_offset(base, record.lsn);
            bytes.get(at..at + record.framed.len()) == Some(&record.framed[..])
        };
        let n_kept = records.iter().take_while(|record| intact(record)).count();
        let kept = &records[..n_kept];
        let kept_end = kept.last().map_or(SEGMENT_HEADER_LEN as usize, |record| {
            file_offset(base, record.lsn) + record.framed.len()
        });
        // A file ending exactly after its intact records shows no damage (a cut at a record
        // boundary is invisible); anything past them is a bad record at `kept_end`.
        if bytes.len() > kept_end {
            let offset = kept_end as u64;
            if !is_last {
                // Rule 2: earlier segments were sealed; damage there is never a torn write.
                return refuse(
                    offset,
                    Rule::SealedSegment,
                    "damage in a segment that is not the last".into(),
                );
            }
            // Rule 3: an intact later record written after the damaged bytes were fsynced
            // vouches that they were durable.
            let bad_lsn = base + (offset - SEGMENT_HEADER_LEN);
            if let Some(voucher) = records[n_kept..]
                .iter()
                .skip(1)
                .find(|record| intact(record) && record.durable_lsn > bad_lsn)
            {
                return refuse(
                    offset,
                    Rule::Vouched,
                    format!(
                        "the intact record at LSN {} has durable LSN {} > {bad_lsn}",
                        voucher.lsn, voucher.durable_lsn
                    ),
                );
            }
            truncated = Some((base, offset, bytes.len() as u64 - offset));
        }
        expected.extend(
            kept.iter()
                .map(|record| (record.lsn, record.payload.clone())),
        );
        prev_end = kept
            .last()
            .map_or(base, |record| record.lsn + record.framed.len() as u64);
    }
    Expected::Open(Opening {
        records: expected,
        end_lsn: prev_end,
        // An empty directory gets a fresh segment 0.
        segments: n_files.max(1),
        truncated,
        rewrote_segment_header,
    })
}

fn replay(wal: &Wal) -> Result<Vec<(u64, Bytes)>, String> {
    wal.records(wal.first_lsn())
        .map(|record| record.map(|(lsn, payload)| (lsn.0, payload)))
        .collect::<Result<_, _>>()
        .map_err(|error| format!("replay after a successful open failed: {error}"))
}

/// Names the first difference between the replay and the records the rules keep.
fn compare_replay(
    yielded: &[(u64, Bytes)],
    expected: &[(u64, Bytes)],
    written: &Written,
) -> Result<(), String> {
    let Some(idx) =
        (0..yielded.len().max(expected.len())).find(|&idx| yielded.get(idx) != expected.get(idx))
    else {
        return Ok(());
    };
    let Some((lsn, payload)) = yielded.get(idx) else {
        return Err(format!(
            "record at LSN {} silently dropped: the replay ends after {idx} records",
            expected[idx].0
        ));
    };
    Err(match written.records().find(|record| record.lsn == *lsn) {
        None => format!("invented record at LSN {lsn} ({} bytes)", payload.len()),
        Some(record) if record.payload != payload => format!("altered record at LSN {lsn}"),
        Some(_) => match expected.get(idx) {
            Some((wanted, _)) if wanted < lsn => {
                format!("record at LSN {wanted} silently skipped (the replay went on at {lsn})")
            }
            _ => format!("record at LSN {lsn} yielded although damage before it must cut it"),
        },
    })
}

fn recover_and_compare(
    storage: &MemStorage,
    config: &WalConfig,
    written: &Written,
    expected: &Expected,
) -> Result<Outcome, String> {
    let opened = open(storage, config);
    let opening = match expected {
        Expected::Refuse {
            segment,
            offset,
            rule,
            ..
        } => {
            return match opened {
                Err(WalError::Corrupt {
                    segment: found,
                    offset: at,
                    path,
                    ..
                }) if (found, at) == (*segment, *offset) && path == segment_path(found) => {
                    Ok(Outcome::Refused(*rule))
                }
                Err(error) => Err(format!("refused with the wrong error: {error}")),
                Ok((wal, report)) => Err(format!(
                    "accepted damage ({} records replayed, cut {:?})",
                    replay(&wal).map_or(0, |records| records.len()),
                    report.truncated.map(|cut| (cut.segment, cut.offset))
                )),
            };
        }
        Expected::Open(opening) => opening,
    };
    let (wal, report) =
        opened.map_err(|error| format!("refused a log the rules accept: {error}"))?;
    compare_replay(&replay(&wal)?, &opening.records, written)?;
    let cut = report
        .truncated
        .as_ref()
        .map(|cut| (cut.segment, cut.offset, cut.bytes_dropped));
    if cut != opening.truncated
        || report
            .truncated
            .as_ref()
            .is_some_and(|cut| cut.path != segment_path(cut.segment))
    {
        return Err(format!(
            "cut {:?}, the rules cut {:?}",
            report.truncated, opening.truncated
        ));
    }
    if report.rewrote_segment_header != opening.rewrote_segment_header
        || report.records != opening.records.len() as u64
        || report.superseded != 0
        || report.end_lsn != Lsn(opening.end_lsn)
        || report.segments != opening.segments
    {
        return Err(format!("recovery report {report:?}, expected {expected}"));
    }
    // Recovery made its repairs durable before returning: a power loss right after the open
    // finds nothing left to cut.
    storage.crash();
    drop(wal);
    let (wal, report) = open(storage, config)
        .map_err(|error| format!("reopen after recovery and a power loss: {error}"))?;
    if report.truncated.is_some() || report.rewrote_segment_header.is_some() {
        return Err(format!(
            "the repair did not survive a power loss: {report:?}"
        ));
    }
    compare_replay(&replay(&wal)?, &opening.records, written)
        .map_err(|failure| format!("after recovery and a power loss: {failure}"))?;
    // The repaired log goes on at its end.
    let extra = Bytes::from_static(b"appended after recovery");
    let committed = append(&wal, vec![extra.clone()], SyncPolicy::Always)
        .map_err(|error| format!("append after recovery: {error}"))?;
    if committed.lsns != [Lsn(opening.end_lsn)] {
        return Err(format!(
            "append after recovery got {committed:?}, expected LSN {}",
            opening.end_lsn
        ));
    }
    drop(wal);
    let (wal, report) =
        open(storage, config).map_err(|error| format!("reopen after an append: {error}"))?;
    let mut with_extra = opening.records.clone();
    with_extra.push((opening.end_lsn, extra));
    compare_replay(&replay(&wal)?, &with_extra, written)
        .map_err(|failure| format!("after recovery and an append: {failure}"))?;
    if report.truncated.is_some() {
        return Err(format!("reopen after an append cut {:?}", report.truncated));
    }
    Ok(if opening.truncated.is_some() {
        Outcome::CutTornTail
    } else if opening.rewrote_segment_header.is_some() {
        Outcome::RewroteHeader
    } else {
        Outcome::Opened
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::TestHooks;

    #[test]
    fn damage_checker_reports_accepted_corruption_when_crc_is_skipped() {
        let template = WalConfig {
            hooks: TestHooks {
                skip_crc: true,
                ..TestHooks::default()
            },
            ..WalConfig::default()
        };
        let failures: Vec<String> = (0..300)
            .filter_map(|seed| check_with(&random_input(seed), template.clone()).err())
            .collect();
        let accepted = failures
            .iter()
            .filter(|failure| {
                failure.starts_with("accepted damage") || failure.starts_with("altered record")
            })
            .count();
        eprintln!(
            "skip_crc: {} of 300 cases fail, {accepted} by accepting damage",
            failures.len()
        );
        // Damage in a payload goes through; damage in a header field is still caught by the
        // field checks, so not every damaged case fails.
        assert!(
            accepted >= 10,
            "negative control: skipping the CRC went unnoticed ({accepted} accepted of {} failures)",
            failures.len()
        );
    }
}
