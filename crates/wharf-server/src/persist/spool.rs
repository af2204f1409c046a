//! Spool files: where the paged tails of queues larger than memory live (see
//! [`wharf_core::Limits::paging_threshold`]). One append-only file per queue, priority level
//! (a queue without `x-max-priority` has one, level 0) and tail epoch in `DATA_DIR/spool/`, written in large sequential writes and read back in order with large
//! reads (read-ahead for free).
//!
//! A spool is memory, not durability: the write-ahead log stays the durable truth for logged
//! messages (checkpoints copy paged messages out of their spools, see [`crate::persist::checkpoint`]), so
//! spool files are never fsynced and are deleted at start. A file is unlinked as soon as its
//! tail is drained, purged or its queue deleted, so disk use follows the paged messages.
//!
//! Failures: a spool that cannot be written keeps its records in memory (the broker degrades
//! rather than losing a message; a warning says so). A spool that cannot be read back is
//! fatal: the messages would be lost, so the server stops (fail-stop, as for the log).

use crate::persist::record::StoredMessage;
use bytes::{Buf, BufMut};
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::Notify;
use tracing::warn;
use wharf_core::{Message, PagedEntry};

/// Buffered records are written once the buffer holds this much.
const WRITE_BUFFER_BYTES: usize = 1024 * 1024;
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

/// The paged tail of one queue.
#[derive(Debug)]
struct Spool {
    epoch: u64,
    path: PathBuf,
    file: Arc<File>,
    /// Bytes written to the file.
    written: u64,
    /// Bytes of the file already paged back in.
    read_at: u64,
    /// Encoded records not yet written (they follow the file's content).
    buffer: Vec<u8>,
    /// Writing failed: records stay in `buffer` from now on.
    degraded: bool,
    /// A page-in is being read.
    reading: bool,
}

impl Drop for Spool {
    fn drop(&mut self) {
        // Readers holding the file (a page-in, a checkpoint) keep its data until they finish.
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Spool {
    /// Writes the buffered records (unless degraded). On failure the records stay buffered.
    fn flush(&mut self) {
        if self.buffer.is_empty() || self.degraded {
            return;
        }
        #[cfg(test)]
        let result = if FAIL_WRITES.with(|fail| fail.get()) {
            Err(std::io::Error::other("injected write failure"))
        } else {
            self.file.write_all_at(&self.buffer, self.written)
        };
        #[cfg(not(test))]
        let result = self.file.write_all_at(&self.buffer, self.written);
        match result {
            Ok(()) => {
                self.written += self.buffer.len() as u64;
                self.buffer.clear();
            }
            Err(err) => {
                warn!(
                    path = %self.path.display(),
                    "cannot write a spool file ({err}): its paged messages stay in memory"
                );
                self.degraded = true;
            }
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
    file: Arc<File>,
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
    file: &File,
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
        file.read_exact_at(&mut carry[start..], at)
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
            &self.file,
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
    file: Arc<File>,
    from: u64,
    to: u64,
    /// Records that could not be written, in memory (after the file's).
    tail: Vec<u8>,
}

impl SpoolRange {
    /// Calls `each` with every entry of the range, in order, reading block by block.
    pub fn for_each(&self, mut each: impl FnMut(PagedEntry)) -> Result<(), SpoolError> {
        let mut unlimited = Budget::new(u64::MAX, u64::MAX);
        let (_, mut carry) =
            read_range(&self.file, self.from, self.to, &mut unlimited, |entries| {
                entries.into_iter().for_each(&mut each)
            })?;
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
        if dir.exists()
            && let Err(err) = std::fs::remove_dir_all(&dir)
        {
            warn!(dir = %dir.display(), "cannot clear the spool directory: {err}");
        }
        Spools {
            dir,
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
        encode(entry, &mut spool.buffer);
        if spool.buffer.len() >= WRITE_BUFFER_BYTES {
            spool.flush();
        }
    }

    fn create(&mut self, epoch: u64) -> Spool {
        self.next_file += 1;
        let path = self.dir.join(format!("{:08}.spool", self.next_file));
        let opened = std::fs::create_dir_all(&self.dir).and_then(|()| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
        });
        let (file, degraded) = match opened {
            Ok(file) => (file, false),
            Err(err) => {
                warn!(path = %path.display(), "cannot create a spool file ({err}): paged messages stay in memory");
                (File::open("/dev/null").expect("/dev/null opens"), true)
            }
        };
        Spool {
            epoch,
            path,
            file: Arc::new(file),
            written: 0,
            read_at: 0,
            buffer: Vec::new(),
            degraded,
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

    /// Takes the pending requests as reads of the file part of each tail (flushing buffered
    /// records first, so the file holds everything the core counts as paged).
    pub fn start_reads(&mut self) -> Vec<PageRead> {
        let mut reads = Vec::new();
        for (queue, epoch, level, max, max_bytes) in std::mem::take(&mut self.requests) {
            let Some(spool) = self.spools.get_mut(&(queue.clone(), level)) else {
                continue;
            };
            if spool.epoch != epoch {
                continue;
            }
            spool.flush();
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
    /// in memory (a degraded spool), advances the tail, and returns the entries to hand to
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
            let (mut more, used) = decode(&spool.buffer, &mut read.budget)?;
            spool.buffer.drain(..used);
            entries.append(&mut more);
        }
        if !read.budget.full && (entries.len() as u64) < read.max {
            return Err(SpoolError::Short {
                queue: read.queue.clone(),
                missing: read.max - entries.len() as u64,
            });
        }
        if spool.read_at == spool.written && spool.buffer.is_empty() {
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
                let spool = self.spools.get_mut(&key).expect("listed above");
                spool.flush();
                SpoolRange {
                    queue: key.0,
                    file: spool.file.clone(),
                    from: spool.read_at,
                    to: spool.written,
                    tail: spool.buffer.clone(),
                }
            })
            .filter(|range| range.from < range.to || !range.tail.is_empty())
            .collect()
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

    fn drain(spools: &mut Spools, queue: &Arc<str>, epoch: u64, max: u64) -> Vec<PagedEntry> {
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
