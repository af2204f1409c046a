//! Spool files: where the paged tails of queues larger than memory live (see
//! [`wharf_core::Limits::paging_threshold`]). One append-only file per queue, priority level
//! (a queue without `x-max-priority` has one, level 0) and tail epoch in `DATA_DIR/spool/`, written in large sequential writes and read back in order with large
//! reads (read-ahead for free).
//!
//! Page-outs only encode records into a buffer under the broker lock; full buffers are sealed
//! and written by the pager task without the lock ([`Spools::take_writes`]), unless it falls
//! behind by more than [`SPOOL_UNWRITTEN_BYTES_MAX`]: then the page-out writes them itself.
//!
//! A spool is memory, not durability: the write-ahead log stays the durable truth for logged
//! messages (checkpoints copy paged messages out of their spools, see [`crate::persist::checkpoint`]), so
//! spool files are never fsynced and are deleted at start. A file is unlinked as soon as its
//! tail is drained, purged or its queue deleted, so disk use follows the paged messages.
//!
//! Failures: a spool that cannot be written keeps its records in memory (the broker degrades
//! rather than losing a message; a warning says so). A spool that cannot be read back is
//! fatal: the messages would be lost, so the server stops (fail-stop, as for the log).

use crate::limits::{SPOOL_FILES_OPEN_MAX, SPOOL_UNWRITTEN_BYTES_MAX};
use crate::persist::record::StoredMessage;
use bytes::{Buf, BufMut, Bytes};
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::Notify;
use tracing::warn;
use wharf_core::{Message, PagedEntry};

/// Buffered records are written once the buffer holds this much.
const WRITE_BUFFER_BYTES: usize = 1024 * 1024;
/// What a spool record holds besides its body, at most in the usual case (names, ids,
/// properties, a few headers): sizes a buffer so that records rarely outgrow it.
const RECORD_METADATA_ESTIMATE_BYTES: usize = 4 * 1024;
/// Bytes read per `pread` when paging in.
const READ_BLOCK_BYTES: usize = 4 * 1024 * 1024;

/// One paged entry as stored.
#[derive(Debug, Serialize, Deserialize)]
struct SpoolRecord {
    seq: u64,
    durable_id: Option<u64>,
    redelivered: bool,
    delivery_count: u32,
    expires_at: Option<u64>,
    retries: u32,
    persistent: bool,
    delay_ms: Option<u64>,
    message: StoredMessage,
}

fn encode(entry: &PagedEntry, out: &mut Vec<u8>) {
    let record = SpoolRecord {
        seq: entry.seq,
        durable_id: entry.durable_id,
        redelivered: entry.redelivered,
        delivery_count: entry.delivery_count,
        expires_at: entry.expires_at,
        retries: entry.retries,
        persistent: entry.message.persistent,
        delay_ms: entry.message.delay_ms,
        message: StoredMessage::from(&*entry.message),
    };
    let at = out.len();
    out.put_u32_le(0);
    let out_len = {
        let encoded = postcard::to_extend(&record, std::mem::take(out))
            .expect("spool records always serialize");
        *out = encoded;
        out.len()
    };
    let len = (out_len - at - 4) as u32;
    out[at..at + 4].copy_from_slice(&len.to_le_bytes());
}

/// How much a page-in may take: entries, and body bytes (the first entry always fits).
#[derive(Debug, Clone, Copy)]
struct Budget {
    entries: u64,
    bytes: u64,
    taken: u64,
    /// An entry was refused: the page-in is complete.
    full: bool,
}

impl Budget {
    fn new(entries: u64, bytes: u64) -> Budget {
        Budget {
            entries,
            bytes,
            taken: 0,
            full: false,
        }
    }

    fn take(&mut self, size: u64) -> bool {
        if self.entries == 0 || (self.taken > 0 && size > self.bytes) {
            self.full = true;
            return false;
        }
        self.entries -= 1;
        self.bytes = self.bytes.saturating_sub(size);
        self.taken += 1;
        true
    }
}

/// Why paged messages cannot come back: the server stops (fail-stop), since the queue counts
/// messages it can no longer deliver.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// Reading a spool file failed.
    #[error("cannot read a spool file: {0}")]
    Read(#[source] std::io::Error),
    /// A spool record does not decode.
    #[error("a spool record does not decode: {0}")]
    Decode(#[source] postcard::Error),
    /// A spool's bytes end in the middle of a record.
    #[error("a spool ends inside a record")]
    EndsInsideARecord,
    /// A spool holds fewer messages than its queue counts as paged.
    #[error("the spool of queue {queue} holds {missing} fewer messages than the queue counts")]
    Short {
        /// The queue.
        queue: Arc<str>,
        /// Messages missing.
        missing: u64,
    },
}

/// Decodes the records at the start of `bytes` within `budget`; returns them and the bytes
/// they took. A record cut by the end of `bytes` is left for the next read.
fn decode(mut bytes: &[u8], budget: &mut Budget) -> Result<(Vec<PagedEntry>, usize), SpoolError> {
    let start = bytes.len();
    let mut entries = Vec::new();
    while bytes.len() >= 4 {
        let len = u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes")) as usize;
        if bytes.len() < 4 + len {
            break;
        }
        let record: SpoolRecord =
            postcard::from_bytes(&bytes[4..4 + len]).map_err(SpoolError::Decode)?;
        if !budget.take(record.message.body_len() as u64) {
            break;
        }
        bytes.advance(4 + len);
        let message = Message {
            persistent: record.persistent,
            delay_ms: record.delay_ms,
            ..Message::from(record.message)
        };
        entries.push(PagedEntry {
            seq: record.seq,
            message: Arc::new(message),
            durable_id: record.durable_id,
            redelivered: record.redelivered,
            delivery_count: record.delivery_count,
            expires_at: record.expires_at,
            retries: record.retries,
        });
    }
    Ok((entries, start - bytes.len()))
}

/// The paged tail of one queue and priority level.
///
/// Its records, oldest first: the file from `read_at` to `written`, then `sealed` (chunks
/// handed to the pager task for writing, in order), then `buffer`. Records never straddle a
/// chunk: `buffer` (about [`WRITE_BUFFER_BYTES`]) is sealed before a record that would not fit.
#[derive(Debug)]
struct Spool {
    /// Tells this spool from an earlier one of the same key (a write completing late).
    id: u64,
    epoch: u64,
    path: PathBuf,
    /// The file, once the pager task has created it (`None` before: nothing is in a file).
    file: Option<Arc<File>>,
    /// Bytes written to the file.
    written: u64,
    /// Bytes of the file already paged back in.
    read_at: u64,
    /// Sealed chunks of records not yet written.
    sealed: VecDeque<Bytes>,
    /// A write (of the first this-many sealed chunks, creating the file if needed) is in
    /// flight.
    writing: Option<usize>,
    /// Encoded records not yet sealed.
    buffer: Vec<u8>,
    /// Writing failed: records stay in memory from now on.
    degraded: bool,
    /// A page-in is being read.
    reading: bool,
}

impl Drop for Spool {
    fn drop(&mut self) {
        // Readers holding the file (a page-in, a checkpoint) keep its data until they finish.
        // A file still being created is removed when its write finishes (`finish_writes`).
        if self.file.is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Spool {
    /// Seals the buffered records into a chunk for the pager task to write.
    fn seal(&mut self) {
        if !self.buffer.is_empty() {
            let chunk = std::mem::take(&mut self.buffer);
            self.sealed.push_back(Bytes::from(chunk));
        }
    }

    /// Whether nothing of the tail is left.
    fn drained(&self) -> bool {
        self.read_at == self.written && self.sealed.is_empty() && self.buffer.is_empty()
    }

    /// Records held in memory (not in the file), oldest first, as one buffer.
    fn in_memory(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(
            self.sealed.iter().map(Bytes::len).sum::<usize>() + self.buffer.len(),
        );
        for chunk in &self.sealed {
            bytes.extend_from_slice(chunk);
        }
        bytes.extend_from_slice(&self.buffer);
        bytes
    }
}

/// Sealed chunks of one spool to write at the end of its file (creating the file first if
/// it does not exist yet), taken by [`Spools::take_writes`] under the broker lock and run by
/// the pager task without it.
#[derive(Debug)]
pub struct SpoolWrite {
    key: (Arc<str>, u8),
    id: u64,
    file: Option<Arc<File>>,
    path: PathBuf,
    at: u64,
    chunks: Vec<Bytes>,
}

/// A finished [`SpoolWrite`], to hand back with [`Spools::finish_writes`].
#[derive(Debug)]
pub struct SpoolWritten {
    write: SpoolWrite,
    /// The file it created, if it had to.
    created: Option<Arc<File>>,
    result: std::io::Result<()>,
}

fn create_file(path: &std::path::Path) -> std::io::Result<File> {
    #[cfg(test)]
    if FAIL_WRITES.with(|fail| fail.get()) {
        return Err(std::io::Error::other("injected create failure"));
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
}

impl SpoolWrite {
    /// Creates the file if needed and writes the chunks (blocking; call without the broker
    /// lock).
    pub fn run(self) -> SpoolWritten {
        let (file, created) = match &self.file {
            Some(file) => (file.clone(), None),
            None => match create_file(&self.path) {
                Ok(file) => {
                    let file = Arc::new(file);
                    (file.clone(), Some(file))
                }
                Err(err) => {
                    return SpoolWritten {
                        write: self,
                        created: None,
                        result: Err(err),
                    };
                }
            },
        };
        let mut at = self.at;
        let mut result = Ok(());
        for chunk in &self.chunks {
            #[cfg(test)]
            let wrote = if FAIL_WRITES.with(|fail| fail.get()) {
                Err(std::io::Error::other("injected write failure"))
            } else {
                file.write_all_at(chunk, at)
            };
            #[cfg(not(test))]
            let wrote = file.write_all_at(chunk, at);
            if let Err(err) = wrote {
                result = Err(err);
                break;
            }
            at += chunk.len() as u64;
        }
        SpoolWritten {
            write: self,
            created,
            result,
        }
    }
}

#[cfg(test)]
thread_local! {
    static FAIL_WRITES: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// What a page-in reads without the broker lock: the file range not yet paged back.
#[derive(Debug)]
pub struct PageRead {
    /// The queue.
    pub queue: Arc<str>,
    /// Its tails' epoch.
    pub epoch: u64,
    /// The tail's priority level.
    pub level: u8,
    /// Entries wanted.
    pub max: u64,
    budget: Budget,
    /// `None` when nothing of the tail is in a file (then `from == to`).
    file: Option<Arc<File>>,
    from: u64,
    to: u64,
}

/// A page-in's file part, read.
#[derive(Debug)]
pub struct PageReadDone {
    read: PageRead,
    entries: Vec<PagedEntry>,
    consumed: u64,
}

impl PageReadDone {
    /// The queue read.
    pub fn queue(&self) -> &Arc<str> {
        &self.read.queue
    }

    /// Its tail's epoch.
    pub fn epoch(&self) -> u64 {
        self.read.epoch
    }

    /// The tail's priority level.
    pub fn level(&self) -> u8 {
        self.read.level
    }
}

/// Reads the records of `file` in `from..to` block by block, within `budget`, handing the
/// entries to `each`; returns the bytes of whole records taken and what is left over (a record
/// cut by `to`, or refused by the budget).
fn read_range(
    file: Option<&File>,
    from: u64,
    to: u64,
    budget: &mut Budget,
    mut each: impl FnMut(Vec<PagedEntry>),
) -> Result<(u64, Vec<u8>), SpoolError> {
    let mut at = from;
    let mut carry: Vec<u8> = Vec::new();
    while !budget.full && at < to {
        let n = READ_BLOCK_BYTES.min((to - at) as usize);
        let start = carry.len();
        carry.resize(start + n, 0);
        file.expect("a tail with bytes in a file has its file")
            .read_exact_at(&mut carry[start..], at)
            .map_err(SpoolError::Read)?;
        at += n as u64;
        let (entries, used) = decode(&carry, budget)?;
        each(entries);
        carry.drain(..used);
    }
    Ok((at - from - carry.len() as u64, carry))
}

impl PageRead {
    /// Reads up to `max` entries (and the byte budget) from the file (no lock held). An I/O or
    /// decoding error means paged messages cannot come back: the caller stops the server.
    pub fn run(mut self) -> Result<PageReadDone, SpoolError> {
        let mut entries = Vec::new();
        let (consumed, _) = read_range(
            self.file.as_deref(),
            self.from,
            self.to,
            &mut self.budget,
            |mut more| entries.append(&mut more),
        )?;
        Ok(PageReadDone {
            read: self,
            entries,
            consumed,
        })
    }
}

/// A paged tail's file range as of a checkpoint (read without the lock, see [`crate::persist::checkpoint`]).
#[derive(Debug)]
pub struct SpoolRange {
    /// The queue.
    pub queue: Arc<str>,
    file: Option<Arc<File>>,
    from: u64,
    to: u64,
    /// Records that could not be written, in memory (after the file's).
    tail: Vec<u8>,
}

impl SpoolRange {
    /// Calls `each` with every entry of the range, in order, reading block by block.
    pub fn for_each(&self, mut each: impl FnMut(PagedEntry)) -> Result<(), SpoolError> {
        let mut unlimited = Budget::new(u64::MAX, u64::MAX);
        let (_, mut carry) = read_range(
            self.file.as_deref(),
            self.from,
            self.to,
            &mut unlimited,
            |entries| entries.into_iter().for_each(&mut each),
        )?;
        carry.extend_from_slice(&self.tail);
        let (entries, used) = decode(&carry, &mut unlimited)?;
        if used != carry.len() {
            return Err(SpoolError::EndsInsideARecord);
        }
        entries.into_iter().for_each(&mut each);
        Ok(())
    }
}

/// Every queue's spool, and the page-in requests the pager task has yet to serve.
#[derive(Debug)]
pub struct Spools {
    dir: PathBuf,
    /// Spool files open (or being created) at most ([`SPOOL_FILES_OPEN_MAX`]).
    files_max: usize,
    next_file: u64,
    spools: FxHashMap<(Arc<str>, u8), Spool>,
    requests: Vec<(Arc<str>, u64, u8, u64, u64)>,
    /// Wakes the pager task when a request arrives.
    pub wake: Arc<Notify>,
}

impl Spools {
    /// Spools in `dir`, which is emptied: spool files never outlive the process that wrote
    /// them (recovery rebuilds paged tails from the log).
    pub fn new(dir: PathBuf) -> Self {
        Spools::with_files_max(dir, SPOOL_FILES_OPEN_MAX)
    }

    /// [`Spools::new`] with at most `files_max` spool files open at once.
    pub fn with_files_max(dir: PathBuf, files_max: usize) -> Self {
        if dir.exists()
            && let Err(err) = std::fs::remove_dir_all(&dir)
        {
            warn!(dir = %dir.display(), "cannot clear the spool directory: {err}");
        }
        Spools {
            dir,
            files_max: files_max.max(1),
            next_file: 0,
            spools: FxHashMap::default(),
            requests: Vec::new(),
            wake: Arc::new(Notify::new()),
        }
    }

    /// Keeps a paged entry at the end of its queue's tail `level` (called under the broker
    /// lock, for each [`wharf_core::Effect::PageOut`], in order).
    pub fn push(&mut self, queue: &Arc<str>, epoch: u64, level: u8, entry: &PagedEntry) {
        let key = (queue.clone(), level);
        let stale = self
            .spools
            .get(&key)
            .is_some_and(|spool| spool.epoch != epoch);
        if stale {
            self.spools.remove(&key);
        }
        if !self.spools.contains_key(&key) {
            let spool = self.create(epoch);
            self.spools.insert(key.clone(), spool);
        }
        let spool = self.spools.get_mut(&key).expect("inserted above");
        // Buffers are allocated once at their final size and sealed before a record would
        // outgrow them: no reallocation (a copy under the lock), chunks hold no slack, and a
        // written chunk's memory is reused by the next buffer.
        let estimate = entry.message.body.len() + RECORD_METADATA_ESTIMATE_BYTES;
        let sealed = if !spool.buffer.is_empty()
            && spool.buffer.len() + estimate > spool.buffer.capacity()
        {
            spool.seal();
            true
        } else {
            false
        };
        if spool.buffer.is_empty() {
            spool.buffer.reserve_exact(WRITE_BUFFER_BYTES.max(estimate));
        }
        encode(entry, &mut spool.buffer);
        if sealed {
            // Written by the pager task, without the broker lock.
            if !spool.degraded {
                self.wake.notify_one();
            }
            self.write_if_behind();
        }
    }

    /// If the pager task has fallen behind (more than [`SPOOL_UNWRITTEN_BYTES_MAX`] sealed and
    /// not being written), writes what it can itself, under the broker lock: memory stays
    /// bounded whatever the publish rate. Spools the pager is writing are left to it (their
    /// chunks must be written in order).
    fn write_if_behind(&mut self) {
        let waiting: usize = self
            .spools
            .values()
            .filter(|spool| spool.writing.is_none() && !spool.degraded)
            .flat_map(|spool| spool.sealed.iter().map(Bytes::len))
            .sum();
        if waiting <= SPOOL_UNWRITTEN_BYTES_MAX {
            return;
        }
        let written = self
            .take_writes()
            .into_iter()
            .map(SpoolWrite::run)
            .collect();
        self.finish_writes(written);
    }

    /// A new tail's spool. Its file is created by the pager task, without the lock, with its
    /// first write (the pager is woken for it now).
    fn create(&mut self, epoch: u64) -> Spool {
        self.next_file += 1;
        self.wake.notify_one();
        Spool {
            id: self.next_file,
            epoch,
            path: self.dir.join(format!("{:08}.spool", self.next_file)),
            file: None,
            written: 0,
            read_at: 0,
            sealed: VecDeque::new(),
            writing: None,
            buffer: Vec::new(),
            degraded: false,
            reading: false,
        }
    }

    /// Forgets a queue's discarded tails ([`wharf_core::Effect::PagesDropped`]), every level,
    /// and their files.
    pub fn drop_tail(&mut self, queue: &str, epoch: u64) {
        self.spools
            .retain(|(name, _), spool| !(**name == *queue && spool.epoch == epoch));
    }

    /// Records a page-in request ([`wharf_core::Effect::PageIn`]) and wakes the pager.
    pub fn request(&mut self, queue: Arc<str>, epoch: u64, level: u8, max: u64, max_bytes: u64) {
        self.requests.push((queue, epoch, level, max, max_bytes));
        self.wake.notify_one();
    }

    /// Takes the sealed chunks of every spool not being written, read or degraded, to write
    /// at the end of their files without the lock ([`SpoolWrite::run`]), in order; and the
    /// spools whose file is still to be created.
    pub fn take_writes(&mut self) -> Vec<SpoolWrite> {
        let mut writes = Vec::new();
        // Files open, or being created by a write in flight: a tail without one gets one only
        // below the cap (else its records wait in memory for a later call).
        let mut files = self
            .spools
            .values()
            .filter(|spool| spool.file.is_some() || spool.writing.is_some())
            .count();
        // Oldest tails first: the first to wait are the first to get a file.
        let mut keys: Vec<(&(Arc<str>, u8), &mut Spool)> = self.spools.iter_mut().collect();
        keys.sort_by_key(|(_, spool)| spool.id);
        for (key, spool) in keys {
            // A tail being read keeps its chunks in memory until the read finishes: the read
            // covers the file as it was when it started and takes the rest from memory, so a
            // chunk written meanwhile (by a page-out behind on writes, `write_if_behind`)
            // would be in neither place for it.
            if spool.degraded
                || spool.reading
                || spool.writing.is_some()
                || (spool.sealed.is_empty() && spool.file.is_some())
            {
                continue;
            }
            if spool.file.is_none() {
                if files >= self.files_max {
                    continue;
                }
                files += 1;
            }
            spool.writing = Some(spool.sealed.len());
            writes.push(SpoolWrite {
                key: key.clone(),
                id: spool.id,
                file: spool.file.clone(),
                path: spool.path.clone(),
                at: spool.written,
                chunks: spool.sealed.iter().cloned().collect(),
            });
        }
        writes
    }

    /// Records finished writes: their chunks now live in the file. A spool whose write
    /// failed keeps its records in memory from then on (a warning says so; nothing is lost);
    /// one discarded meanwhile is ignored.
    pub fn finish_writes(&mut self, written: Vec<SpoolWritten>) {
        for SpoolWritten {
            write,
            created,
            result,
        } in written
        {
            let spool = self
                .spools
                .get_mut(&write.key)
                .filter(|spool| spool.id == write.id);
            let Some(spool) = spool else {
                // Discarded meanwhile: a file this write created goes too.
                if created.is_some() {
                    let _ = std::fs::remove_file(&write.path);
                }
                continue;
            };
            spool.writing = None;
            if created.is_some() {
                spool.file = created;
            }
            match result {
                Ok(()) => {
                    for chunk in spool.sealed.drain(..write.chunks.len()) {
                        spool.written += chunk.len() as u64;
                    }
                }
                Err(err) => {
                    warn!(
                        path = %write.path.display(),
                        "cannot write a spool file ({err}): its paged messages stay in memory"
                    );
                    spool.degraded = true;
                }
            }
        }
    }

    /// Takes the pending requests as reads of the file part of each tail. Call once no write
    /// is in flight (the pager task finishes its writes first); what is not yet in the file
    /// is taken from memory by [`Spools::finish_read`].
    pub fn start_reads(&mut self) -> Vec<PageRead> {
        let mut reads = Vec::new();
        for (queue, epoch, level, max, max_bytes) in std::mem::take(&mut self.requests) {
            let Some(spool) = self.spools.get_mut(&(queue.clone(), level)) else {
                continue;
            };
            if spool.epoch != epoch {
                continue;
            }
            debug_assert!(spool.writing.is_none(), "reads start once writes finished");
            spool.reading = true;
            reads.push(PageRead {
                queue,
                epoch,
                level,
                max,
                budget: Budget::new(max, max_bytes),
                file: spool.file.clone(),
                from: spool.read_at,
                to: spool.written,
            });
        }
        reads
    }

    /// Completes a read under the lock: takes what is still missing from the records held
    /// in memory (sealed chunks not yet written, the buffer, everything of a degraded
    /// spool), advances the tail, and returns the entries to hand to
    /// the core — `None` if the tail was discarded meanwhile. A drained tail's file goes.
    pub fn finish_read(
        &mut self,
        done: PageReadDone,
    ) -> Result<Option<Vec<PagedEntry>>, SpoolError> {
        let PageReadDone {
            mut read,
            mut entries,
            consumed,
        } = done;
        let key = (read.queue.clone(), read.level);
        let Some(spool) = self.spools.get_mut(&key) else {
            return Ok(None);
        };
        if spool.epoch != read.epoch || !spool.reading {
            return Ok(None);
        }
        spool.reading = false;
        spool.read_at += consumed;
        if !read.budget.full && spool.read_at == spool.written {
            // The file is drained: the rest is in memory (no write is in flight now).
            while !read.budget.full
                && let Some(chunk) = spool.sealed.front_mut()
            {
                let (mut more, used) = decode(chunk, &mut read.budget)?;
                entries.append(&mut more);
                if used == chunk.len() {
                    spool.sealed.pop_front();
                } else if read.budget.full {
                    chunk.advance(used);
                } else {
                    return Err(SpoolError::EndsInsideARecord);
                }
            }
            if !read.budget.full && spool.sealed.is_empty() {
                let (mut more, used) = decode(&spool.buffer, &mut read.budget)?;
                spool.buffer.drain(..used);
                entries.append(&mut more);
            }
        }
        if !read.budget.full && (entries.len() as u64) < read.max {
            return Err(SpoolError::Short {
                queue: read.queue.clone(),
                missing: read.max - entries.len() as u64,
            });
        }
        if spool.drained() {
            // Drained: the file goes now; a later tail gets a new one.
            self.spools.remove(&key);
        }
        Ok(Some(entries))
    }

    /// The file ranges (and in-memory records) of every tail, for a checkpoint to copy
    /// without the lock. Their files stay readable even if the tails are discarded meanwhile.
    pub fn ranges(&mut self) -> Vec<SpoolRange> {
        let mut keys: Vec<(Arc<str>, u8)> = self.spools.keys().cloned().collect();
        keys.sort();
        keys.into_iter()
            .map(|key| {
                let spool = &self.spools[&key];
                SpoolRange {
                    queue: key.0,
                    file: spool.file.clone(),
                    from: spool.read_at,
                    to: spool.written,
                    tail: spool.in_memory(),
                }
            })
            .filter(|range| range.from < range.to || !range.tail.is_empty())
            .collect()
    }

    /// Bytes of records held in memory (sealed and not yet written, or buffered), across
    /// every spool.
    pub fn bytes_in_memory(&self) -> usize {
        self.spools
            .values()
            .map(|spool| spool.sealed.iter().map(Bytes::len).sum::<usize>() + spool.buffer.len())
            .sum()
    }

    /// Spool files in use.
    pub fn n_files(&self) -> usize {
        self.spools.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn entry(seq: u64, body: &str) -> PagedEntry {
        PagedEntry {
            seq,
            message: Arc::new(Message {
                persistent: seq.is_multiple_of(2),
                delay_ms: Some(seq),
                message_id: Some(format!("id-{seq}")),
                ..Message::new("q", Bytes::from(body.to_owned()))
            }),
            durable_id: seq.is_multiple_of(2).then_some(100 + seq),
            redelivered: seq.is_multiple_of(3),
            delivery_count: seq as u32,
            expires_at: Some(1_000 + seq),
            retries: 2,
        }
    }

    /// Runs the pending writes, as the pager task does before reading.
    fn write(spools: &mut Spools) {
        let written = spools
            .take_writes()
            .into_iter()
            .map(SpoolWrite::run)
            .collect();
        spools.finish_writes(written);
    }

    fn drain(spools: &mut Spools, queue: &Arc<str>, epoch: u64, max: u64) -> Vec<PagedEntry> {
        write(spools);
        spools.request(queue.clone(), epoch, 0, max, u64::MAX);
        let mut out = Vec::new();
        for read in spools.start_reads() {
            let done = read.run().unwrap();
            out.extend(spools.finish_read(done).unwrap().unwrap_or_default());
        }
        out
    }

    #[test]
    fn entries_come_back_unchanged_in_order_across_reads_and_files_go_when_drained() {
        let dir = tempfile::tempdir().unwrap();
        let mut spools = Spools::new(dir.path().join("spool"));
        let queue: Arc<str> = "q".into();
        // Big bodies: several buffer flushes and several read blocks, records cut by blocks.
        let body = "x".repeat(300_000);
        let pushed: Vec<PagedEntry> = (0..40).map(|seq| entry(seq, &body)).collect();
        for paged in &pushed {
            spools.push(&queue, 0, 0, paged);
        }
        assert_eq!(
            std::fs::read_dir(dir.path().join("spool")).unwrap().count(),
            1
        );
        let mut back = drain(&mut spools, &queue, 0, 7);
        assert_eq!(back.len(), 7);
        back.extend(drain(&mut spools, &queue, 0, 33));
        assert_eq!(back, pushed);
        assert_eq!(spools.n_files(), 0);
        assert_eq!(
            std::fs::read_dir(dir.path().join("spool")).unwrap().count(),
            0
        );
    }

    /// At most `files_max` spool files are open at once: a tail past it keeps its records in
    /// memory (counted by `bytes_in_memory`, which the memory alarm sees) and gets its file
    /// once another tail's is gone, and nothing is lost or reordered either way.
    #[test]
    fn spool_files_are_capped_and_a_waiting_tail_gets_a_file_when_one_closes() {
        let dir = tempfile::tempdir().unwrap();
        let spool_dir = dir.path().join("spool");
        let mut spools = Spools::with_files_max(spool_dir.clone(), 2);
        let files = || std::fs::read_dir(&spool_dir).map_or(0, |dir| dir.count());
        let body = "z".repeat(300_000);
        let queues: Vec<Arc<str>> = ["a", "b", "c"].into_iter().map(Arc::from).collect();
        let pushed: Vec<PagedEntry> = (0..10).map(|seq| entry(seq, &body)).collect();
        for queue in &queues {
            for paged in &pushed {
                spools.push(queue, 0, 0, paged);
            }
        }
        write(&mut spools);
        assert_eq!(files(), 2, "two files, the third tail waits");
        assert_eq!(spools.n_files(), 3);
        let in_memory = spools.bytes_in_memory();
        assert!(
            in_memory >= 10 * 300_000,
            "c's records are in memory: {in_memory}"
        );
        // Draining a reads from its file; c's records come back from memory all the same.
        assert_eq!(drain(&mut spools, &queues[2], 0, 10), pushed);
        assert_eq!(drain(&mut spools, &queues[0], 0, 10), pushed);
        assert_eq!(files(), 1);
        // A new tail now gets a file (below the cap again).
        for paged in &pushed {
            spools.push(&queues[2], 1, 0, paged);
        }
        write(&mut spools);
        assert_eq!(files(), 2);
        assert!(spools.bytes_in_memory() < 2 * 1024 * 1024);
        assert_eq!(drain(&mut spools, &queues[1], 0, 10), pushed);
        assert_eq!(drain(&mut spools, &queues[2], 1, 10), pushed);
        assert_eq!(files(), 0);
    }

    /// Found by a long benchmark run (S1-4k into a paging transient queue): a publish that
    /// pages out while a page-in read is in flight used to write the tail's sealed chunks
    /// itself (`write_if_behind`); the read covered only the file as it was, and the records
    /// it still needed from memory had moved into the file behind it, so the read came back
    /// short and the broker stopped.
    #[test]
    fn a_page_out_behind_on_writes_does_not_move_records_a_read_in_flight_needs() {
        let dir = tempfile::tempdir().unwrap();
        let mut spools = Spools::new(dir.path().join("spool"));
        let queue: Arc<str> = "q".into();
        let body = "y".repeat(4_000);
        let mut pushed: Vec<PagedEntry> = Vec::new();
        // Some records in the file, then some in memory only.
        for seq in 0..300 {
            pushed.push(entry(seq, &body));
            spools.push(&queue, 0, 0, &pushed[seq as usize]);
        }
        write(&mut spools);
        for seq in 300..600 {
            pushed.push(entry(seq, &body));
            spools.push(&queue, 0, 0, &pushed[seq as usize]);
        }
        // A read of all 600 starts: the file part is read without the lock...
        spools.request(queue.clone(), 0, 0, 600, u64::MAX);
        let reads = spools.start_reads();
        assert_eq!(reads.len(), 1);
        // ... while publishes page out more than the unwritten limit (the pager is behind).
        let n_more = (SPOOL_UNWRITTEN_BYTES_MAX / 4_000 + 600) as u64;
        for seq in 600..600 + n_more {
            spools.push(&queue, 0, 0, &entry(seq, &body));
        }
        let done = reads.into_iter().next().unwrap().run().unwrap();
        let got = spools.finish_read(done).unwrap().unwrap();
        assert_eq!(got.len(), 600);
        assert!(got == pushed, "the 600 records, in order");
        // The rest is all there too.
        let rest = drain(&mut spools, &queue, 0, n_more);
        assert_eq!(rest.len() as u64, n_more);
        assert_eq!(rest.first().map(|entry| entry.seq), Some(600));
    }

    #[test]
    fn the_default_spool_file_cap_is_crossed_at_its_full_size() {
        let dir = tempfile::tempdir().unwrap();
        let spool_dir = dir.path().join("spool");
        let mut spools = Spools::new(spool_dir.clone());
        let files = || std::fs::read_dir(&spool_dir).map_or(0, |dir| dir.count());
        let body = "z".repeat(300_000);
        let pushed: Vec<PagedEntry> = (0..4).map(|seq| entry(seq, &body)).collect();
        let queues: Vec<Arc<str>> = (0..=SPOOL_FILES_OPEN_MAX)
            .map(|idx| Arc::from(format!("q{idx}")))
            .collect();
        for queue in &queues {
            for paged in &pushed {
                spools.push(queue, 0, 0, paged);
            }
        }
        write(&mut spools);
        assert_eq!(
            files(),
            SPOOL_FILES_OPEN_MAX,
            "64 files; the 65th tail waits"
        );
        assert!(spools.bytes_in_memory() >= 4 * 300_000);
        // Every queue's records come back, from a file or from memory.
        for queue in queues.iter().rev() {
            assert_eq!(drain(&mut spools, queue, 0, 4), pushed);
        }
        assert_eq!(files(), 0);
    }

    /// Page-outs never write under the broker lock: `push` seals full buffers for the pager
    /// task, which writes them later. Reads, checkpoints and late writes see every record
    /// exactly once, in order, wherever it is (file, sealed chunk, chunk being written,
    /// buffer).
    #[test]
    fn pushes_never_write_and_every_record_is_seen_once_wherever_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let mut spools = Spools::new(dir.path().to_path_buf());
        let queue: Arc<str> = "q".into();
        let body = "w".repeat(200_000);
        let pushed: Vec<PagedEntry> = (0..30).map(|seq| entry(seq, &body)).collect();
        let file_len = |spools: &Spools| {
            spools.spools[&(queue.clone(), 0)]
                .file
                .as_ref()
                .map_or(0, |file| file.metadata().unwrap().len())
        };
        for paged in &pushed[..12] {
            spools.push(&queue, 0, 0, paged);
        }
        assert_eq!(file_len(&spools), 0, "6 MB pushed, nothing written by push");
        // A write in flight (taken, not finished) while more records arrive.
        let writes = spools.take_writes();
        assert_eq!(writes.len(), 1);
        for paged in &pushed[12..20] {
            spools.push(&queue, 0, 0, paged);
        }
        assert!(
            spools.take_writes().is_empty(),
            "one write per spool at a time"
        );
        // A checkpoint now sees the file part (empty) and everything in memory.
        let mut copied = Vec::new();
        for range in spools.ranges() {
            range.for_each(|paged| copied.push(paged)).unwrap();
        }
        assert_eq!(copied, pushed[..20].to_vec());
        let written: Vec<SpoolWritten> = writes.into_iter().map(SpoolWrite::run).collect();
        spools.finish_writes(written);
        assert!(file_len(&spools) > 0);
        for paged in &pushed[20..] {
            spools.push(&queue, 0, 0, paged);
        }
        // Read back without writing the rest: the file first, then memory.
        let mut back = Vec::new();
        for max in [3, 9, 11, 7] {
            spools.request(queue.clone(), 0, 0, max, u64::MAX);
            for read in spools.start_reads() {
                let done = read.run().unwrap();
                back.extend(spools.finish_read(done).unwrap().unwrap());
            }
        }
        assert_eq!(back, pushed);
        assert_eq!(spools.n_files(), 0, "drained");
    }

    /// With no pager running at all, what waits unwritten in memory stays within
    /// `SPOOL_UNWRITTEN_BYTES_MAX` (plus the chunk just sealed): the page-out writes the rest.
    #[test]
    fn unwritten_records_stay_bounded_when_the_pager_falls_behind() {
        let dir = tempfile::tempdir().unwrap();
        let mut spools = Spools::new(dir.path().to_path_buf());
        let body = "u".repeat(100_000);
        let mut pushed: Vec<(Arc<str>, PagedEntry)> = Vec::new();
        for seq in 0..400 {
            // Three spools: one page-out writes the others' chunks too.
            let queue: Arc<str> = ["a", "b", "c"][seq as usize % 3].into();
            let paged = entry(seq, &body);
            spools.push(&queue, 0, 0, &paged);
            pushed.push((queue, paged));
            let unwritten: usize = spools
                .spools
                .values()
                .flat_map(|spool| spool.sealed.iter().map(Bytes::len))
                .sum();
            assert!(unwritten <= SPOOL_UNWRITTEN_BYTES_MAX + WRITE_BUFFER_BYTES + 200_000);
        }
        let written: u64 = spools.spools.values().map(|spool| spool.written).sum();
        assert!(written > 30_000_000, "40 MB pushed, {written} written");
        for queue in ["a", "b", "c"] {
            let queue: Arc<str> = queue.into();
            let expected: Vec<PagedEntry> = pushed
                .iter()
                .filter(|(q, _)| *q == queue)
                .map(|(_, paged)| paged.clone())
                .collect();
            let n = expected.len() as u64;
            assert_eq!(drain(&mut spools, &queue, 0, n), expected);
        }
    }

    /// A tail's file is created by the pager task's first write, not under the lock by the
    /// page-out; a file created for a tail discarded meanwhile is removed; a file that cannot
    /// be created leaves the records in memory.
    #[test]
    fn spool_files_are_created_by_the_pager_and_never_outlive_their_tail() {
        let dir = tempfile::tempdir().unwrap();
        let mut spools = Spools::new(dir.path().join("spool"));
        let files =
            || std::fs::read_dir(dir.path().join("spool")).map_or(0, |entries| entries.count());
        let queue: Arc<str> = "q".into();
        spools.push(&queue, 0, 0, &entry(0, "a"));
        assert_eq!(files(), 0, "push creates no file");
        write(&mut spools);
        assert_eq!(files(), 1, "the pager's write created it");
        // Discarded while its file is being created: the file goes when the write finishes.
        spools.push(&queue, 0, 1, &entry(1, "b"));
        let writes = spools.take_writes();
        spools.drop_tail(&queue, 0);
        let written: Vec<SpoolWritten> = writes.into_iter().map(SpoolWrite::run).collect();
        assert_eq!(files(), 1, "created, its tail gone");
        spools.finish_writes(written);
        assert_eq!(files(), 0);
        // A file that cannot be created: degraded, records served from memory.
        spools.push(&queue, 1, 0, &entry(2, "c"));
        FAIL_WRITES.with(|fail| fail.set(true));
        write(&mut spools);
        FAIL_WRITES.with(|fail| fail.set(false));
        assert!(spools.spools[&(queue.clone(), 0)].degraded);
        assert_eq!(drain(&mut spools, &queue, 1, 1), vec![entry(2, "c")]);
    }

    /// A write that completes after its tail was discarded and a new tail of the same queue
    /// started does not count for the new one.
    #[test]
    fn a_late_write_of_a_discarded_tail_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let mut spools = Spools::new(dir.path().to_path_buf());
        let queue: Arc<str> = "q".into();
        let body = "v".repeat(600_000);
        for seq in 0..2 {
            spools.push(&queue, 0, 0, &entry(seq, &body));
        }
        let writes = spools.take_writes();
        spools.drop_tail(&queue, 0);
        spools.push(&queue, 1, 0, &entry(7, "new"));
        let written: Vec<SpoolWritten> = writes.into_iter().map(SpoolWrite::run).collect();
        spools.finish_writes(written);
        assert_eq!(drain(&mut spools, &queue, 1, 1), vec![entry(7, "new")]);
    }

    #[test]
    fn a_discarded_tail_is_not_paged_in_and_a_new_epoch_starts_a_new_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut spools = Spools::new(dir.path().to_path_buf());
        let queue: Arc<str> = "q".into();
        spools.push(&queue, 0, 0, &entry(0, "a"));
        spools.request(queue.clone(), 0, 0, 1, u64::MAX);
        let reads = spools.start_reads();
        spools.drop_tail(&queue, 0);
        spools.push(&queue, 1, 0, &entry(5, "b"));
        for read in reads {
            let done = read.run().unwrap();
            assert_eq!(
                spools.finish_read(done).unwrap(),
                None,
                "stale read ignored"
            );
        }
        assert_eq!(drain(&mut spools, &queue, 1, 1), vec![entry(5, "b")]);
    }

    #[test]
    fn a_spool_that_cannot_be_written_keeps_its_records_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let mut spools = Spools::new(dir.path().to_path_buf());
        let queue: Arc<str> = "q".into();
        let body = "y".repeat(400_000);
        let pushed: Vec<PagedEntry> = (0..10).map(|seq| entry(seq, &body)).collect();
        // The first records reach the file, then the disk fails.
        for paged in &pushed[..3] {
            spools.push(&queue, 0, 0, paged);
        }
        write(&mut spools);
        assert!(spools.spools[&(queue.clone(), 0)].written > 0);
        FAIL_WRITES.with(|fail| fail.set(true));
        for paged in &pushed[3..] {
            spools.push(&queue, 0, 0, paged);
        }
        let ranges = spools.ranges();
        let mut copied = Vec::new();
        ranges[0].for_each(|paged| copied.push(paged)).unwrap();
        assert_eq!(copied, pushed, "a checkpoint sees file and memory parts");
        let mut back = drain(&mut spools, &queue, 0, 4);
        back.extend(drain(&mut spools, &queue, 0, 6));
        FAIL_WRITES.with(|fail| fail.set(false));
        assert_eq!(back, pushed);
        assert_eq!(spools.n_files(), 0);
    }

    #[test]
    fn a_page_in_stops_at_its_byte_budget_but_always_takes_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut spools = Spools::new(dir.path().to_path_buf());
        let queue: Arc<str> = "q".into();
        let pushed: Vec<PagedEntry> = (0..6).map(|seq| entry(seq, &"z".repeat(1_000))).collect();
        for paged in &pushed {
            spools.push(&queue, 0, 0, paged);
        }
        let mut page = |max: u64, max_bytes: u64| {
            spools.request(queue.clone(), 0, 0, max, max_bytes);
            let read = spools.start_reads().pop().unwrap();
            spools.finish_read(read.run().unwrap()).unwrap().unwrap()
        };
        assert_eq!(page(6, 2_500).len(), 2, "two bodies of 1,000 within 2,500");
        assert_eq!(page(4, 10).len(), 1, "the first always fits");
        let rest = page(3, u64::MAX);
        assert_eq!(rest, pushed[3..].to_vec());
    }

    #[test]
    fn asking_for_more_than_the_spool_holds_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut spools = Spools::new(dir.path().to_path_buf());
        let queue: Arc<str> = "q".into();
        spools.push(&queue, 0, 0, &entry(0, "a"));
        spools.request(queue.clone(), 0, 0, 2, u64::MAX);
        let read = spools.start_reads().pop().unwrap();
        let err = spools.finish_read(read.run().unwrap()).unwrap_err();
        assert!(matches!(err, SpoolError::Short { missing: 1, .. }), "{err}");
    }
}
