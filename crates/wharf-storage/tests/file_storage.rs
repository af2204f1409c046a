//! Black-box tests of the WAL on the real file system (a unique temp dir per test).

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use wharf_storage::{FileStorage, Lsn, SEGMENT_HEADER_LEN, Wal, WalConfig, WalError};

/// A unique directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let unique = format!(
            "wharf-storage-{name}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let path = std::env::temp_dir().join(unique);
        let _ = fs::remove_dir_all(&path);
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn config() -> WalConfig {
    WalConfig {
        segment_bytes: 16 * 1024,
        roll_dead_active_bytes: 1,
        ..WalConfig::default()
    }
}

fn open(dir: &TempDir) -> (Wal, wharf_storage::RecoveryReport) {
    Wal::open(Arc::new(FileStorage), &dir.0, config()).expect("open")
}

fn segment_files(dir: &TempDir) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(&dir.0)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "wal"))
        .collect();
    files.sort();
    files
}

fn body(idx: usize) -> Bytes {
    Bytes::from(format!("message {idx} {}", "x".repeat((idx * 37) % 700)))
}

#[test]
fn records_survive_a_real_reopen_and_read_by_lsn() {
    let dir = TempDir::new("reopen");
    let mut lsns = Vec::new();
    {
        let (wal, report) = open(&dir);
        assert_eq!(report.records, 0);
        for idx in 0..100 {
            let committed = wal.append_wait(vec![body(idx)]).unwrap();
            assert!(committed.is_durable());
            lsns.extend(committed.lsns);
        }
        assert!(segment_files(&dir).len() > 1, "segments rolled over");
    }
    let (wal, report) = open(&dir);
    assert_eq!(report.records, 100);
    assert!(report.truncated.is_none());
    let replayed: Vec<(Lsn, Bytes)> = wal.records(wal.first_lsn()).map(Result::unwrap).collect();
    assert_eq!(replayed.len(), 100);
    for (idx, (lsn, bytes)) in replayed.iter().enumerate() {
        assert_eq!(*lsn, lsns[idx]);
        assert_eq!(*bytes, body(idx));
    }
    // Random reads, newest first.
    for idx in (0..100).rev() {
        assert_eq!(wal.read(lsns[idx]).unwrap(), body(idx));
    }
    // Sequential reads from the middle.
    let tail: Vec<Lsn> = wal
        .records(lsns[60])
        .map(|record| record.unwrap().0)
        .collect();
    assert_eq!(tail, lsns[60..].to_vec());
}

#[test]
fn garbage_after_the_last_record_is_truncated_and_reported_on_a_real_file() {
    let dir = TempDir::new("torn");
    {
        let (wal, _) = open(&dir);
        for idx in 0..5 {
            wal.append_wait(vec![body(idx)]).unwrap();
        }
    }
    let last = segment_files(&dir).pop().unwrap();
    let good_len = fs::metadata(&last).unwrap().len();
    // A torn append: a plausible-looking partial header.
    OpenOptions::new()
        .append(true)
        .open(&last)
        .unwrap()
        .write_all(&[0xAB; 20])
        .unwrap();
    let (wal, report) = open(&dir);
    let truncation = report.truncated.expect("reported");
    assert_eq!(truncation.offset, good_len);
    assert_eq!(truncation.bytes_dropped, 20);
    assert_eq!(truncation.path, last);
    assert_eq!(fs::metadata(&last).unwrap().len(), good_len);
    assert_eq!(wal.records(wal.first_lsn()).count(), 5);
    wal.append_wait(vec![body(5)]).unwrap();
}

#[test]
fn a_flipped_byte_in_an_earlier_segment_refuses_to_open_naming_the_file() {
    let dir = TempDir::new("corrupt");
    {
        let (wal, _) = open(&dir);
        for idx in 0..100 {
            wal.append_wait(vec![body(idx)]).unwrap();
        }
    }
    let first = segment_files(&dir).remove(0);
    let mut bytes = fs::read(&first).unwrap();
    let at = SEGMENT_HEADER_LEN as usize + 40;
    bytes[at] ^= 1;
    fs::write(&first, &bytes).unwrap();
    let error = Wal::open(Arc::new(FileStorage), &dir.0, config()).expect_err("refused");
    assert!(
        matches!(
            error,
            WalError::Corrupt {
                segment: 0,
                offset: 32,
                ..
            }
        ),
        "{error}"
    );
    assert!(
        error.to_string().contains(&first.display().to_string()),
        "{error}"
    );
}

#[test]
fn releasing_everything_deletes_segment_files() {
    let dir = TempDir::new("gc");
    let (wal, _) = open(&dir);
    let mut lsns = Vec::new();
    for idx in 0..200 {
        lsns.extend(wal.append_wait(vec![body(idx)]).unwrap().lsns);
    }
    assert!(segment_files(&dir).len() > 3);
    for lsn in lsns {
        wal.release(lsn).unwrap();
    }
    wal.quiesce();
    let files = segment_files(&dir);
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(fs::metadata(&files[0]).unwrap().len(), SEGMENT_HEADER_LEN);
    drop(wal);
    let (wal, report) = open(&dir);
    assert_eq!(report.records, 0);
    wal.append_wait(vec![body(1)]).unwrap();
}

#[test]
fn many_threads_append_concurrently_with_group_commit() {
    let dir = TempDir::new("threads");
    let (wal, _) = Wal::open(Arc::new(FileStorage), &dir.0, WalConfig::default()).unwrap();
    let wal = Arc::new(wal);
    let threads: Vec<_> = (0..4)
        .map(|thread_idx| {
            let wal = Arc::clone(&wal);
            std::thread::spawn(move || {
                let mut durable = 0;
                for idx in 0..50 {
                    let committed = wal.append_wait(vec![body(thread_idx * 100 + idx)]).unwrap();
                    durable += usize::from(committed.is_durable());
                }
                durable
            })
        })
        .collect();
    let total: usize = threads
        .into_iter()
        .map(|thread| thread.join().unwrap())
        .sum();
    assert_eq!(total, 200);
    assert_eq!(wal.records(wal.first_lsn()).count(), 200);
}

#[test]
fn dropping_the_last_reference_inside_a_completion_does_not_deadlock_the_writer() {
    let dir = TempDir::new("drop-in-completion");
    let (wal, _) = open(&dir);
    let wal = std::sync::Arc::new(wal);
    let (sender, receiver) = std::sync::mpsc::channel();
    let held = std::sync::Mutex::new(Some(wal.clone()));
    let held = std::sync::Arc::new(held);
    let in_completion = held.clone();
    wal.append(
        vec![body(1)],
        Box::new(move |outcome| {
            // The completion drops what may be the last reference, on the writer thread.
            drop(in_completion.lock().unwrap().take());
            sender.send(outcome.is_ok()).unwrap();
        }),
    );
    drop(wal);
    assert!(
        receiver
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("completion ran")
    );
}
