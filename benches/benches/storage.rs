//! The write-ahead log on the real disk: append throughput with group commit under
//! `SyncPolicy::Always`, next to a raw sequential write + fsync of the same bytes, and the
//! machine's fsyncs per second (which bound durable commits per second).
//!
//! One `wal_append` iteration = `IN_FLIGHT` single-record batches submitted at once (like that
//! many publishers waiting for confirms), then waiting for every completion; records are
//! released afterwards so GC keeps the directory small. Files live in `CARGO_TARGET_TMPDIR`
//! (the target dir's disk; `/tmp` may be a tmpfs where fsync is free).

use std::fs::{File, OpenOptions};
use std::hint::black_box;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use wharf_storage::{FileStorage, Lsn, Wal, WalConfig};

/// Appends submitted concurrently per iteration.
const IN_FLIGHT: usize = 256;
const RECORD_SIZES: [usize; 2] = [100, 4096];
/// Records per iteration of the fsync-per-record baseline.
const RECORDS_PER_FSYNC_ITERATION: usize = 16;

fn bench_dir(name: &str) -> PathBuf {
    let base = option_env!("CARGO_TARGET_TMPDIR").map_or_else(std::env::temp_dir, PathBuf::from);
    let dir = base.join(format!("wharf-storage-bench-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("bench dir");
    dir
}

/// Counts completions down to zero.
struct Latch {
    state: Mutex<(usize, Vec<Lsn>)>,
    done: Condvar,
}

fn wal_append(c: &mut Criterion) {
    let mut group = c.benchmark_group("storage/wal_append_always");
    for size in RECORD_SIZES {
        let dir = bench_dir(&format!("wal-{size}"));
        let (wal, _) = Wal::open(Arc::new(FileStorage), &dir, WalConfig::default()).expect("open");
        let record = Bytes::from(vec![0x5a; size]);
        group.throughput(Throughput::Bytes((IN_FLIGHT * size) as u64));
        group.bench_with_input(BenchmarkId::new("record_bytes", size), &size, |b, _| {
            b.iter(|| {
                let latch = Arc::new(Latch {
                    state: Mutex::new((IN_FLIGHT, Vec::new())),
                    done: Condvar::new(),
                });
                for _ in 0..IN_FLIGHT {
                    let latch = Arc::clone(&latch);
                    wal.append(
                        vec![record.clone()],
                        Box::new(move |outcome| {
                            let committed = outcome.expect("append");
                            assert!(committed.is_durable());
                            let mut state = latch.state.lock().unwrap();
                            state.0 -= 1;
                            state.1.extend(committed.lsns);
                            if state.0 == 0 {
                                latch.done.notify_one();
                            }
                        }),
                    );
                }
                let mut state = latch.state.lock().unwrap();
                while state.0 > 0 {
                    state = latch.done.wait(state).unwrap();
                }
                for lsn in state.1.drain(..) {
                    wal.release(lsn).expect("release");
                }
            });
        });
        drop(wal);
        let _ = std::fs::remove_dir_all(&dir);
    }
    group.finish();
}

fn open_raw(name: &str) -> (PathBuf, File) {
    let dir = bench_dir(name);
    let file = OpenOptions::new()
        .create(true)
        .read(true)
        .write(true)
        .truncate(true)
        .open(dir.join("raw"))
        .unwrap();
    (dir, file)
}

fn raw_write_fsync(c: &mut Criterion) {
    let mut group = c.benchmark_group("storage/raw_write_fsync");
    for size in RECORD_SIZES {
        let bytes = vec![0x5a; IN_FLIGHT * size];
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        // The ceiling: the same bytes as one wal_append iteration, one write, one fsync.
        let (dir, file) = open_raw(&format!("raw-{size}"));
        let mut offset = 0u64;
        group.bench_with_input(
            BenchmarkId::new("one_fsync_per_iteration", size),
            &size,
            |b, _| {
                b.iter(|| {
                    if offset > 256 << 20 {
                        file.set_len(0).unwrap();
                        offset = 0;
                    }
                    file.write_all_at(&bytes, offset).unwrap();
                    file.sync_data().unwrap();
                    offset += bytes.len() as u64;
                });
            },
        );
        let _ = std::fs::remove_dir_all(&dir);
        // The floor: what a log without group commit does (one fsync per record). Fewer records
        // per iteration and samples, or this alone would take minutes.
        let (dir, file) = open_raw(&format!("raw-each-{size}"));
        let mut offset = 0u64;
        let bytes = &bytes[..RECORDS_PER_FSYNC_ITERATION * size];
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        group.sample_size(10);
        group.bench_with_input(BenchmarkId::new("fsync_per_record", size), &size, |b, _| {
            b.iter(|| {
                if offset > 256 << 20 {
                    file.set_len(0).unwrap();
                    offset = 0;
                }
                for chunk in bytes.chunks(size) {
                    file.write_all_at(chunk, offset).unwrap();
                    file.sync_data().unwrap();
                    offset += chunk.len() as u64;
                }
            });
        });
        let _ = std::fs::remove_dir_all(&dir);
        group.sample_size(100);
    }
    group.finish();
}

fn fsyncs_per_second(c: &mut Criterion) {
    let mut group = c.benchmark_group("storage/fsync");
    // One appending 100-byte write + fdatasync per iteration: elements/s = fsyncs/s.
    group.throughput(Throughput::Elements(1));
    let (dir, file) = open_raw("fsync");
    let record = [0x5au8; 100];
    let mut offset = 0u64;
    group.bench_function("append_100b_fdatasync", |b| {
        b.iter(|| {
            file.write_all_at(black_box(&record), offset).unwrap();
            file.sync_data().unwrap();
            offset += record.len() as u64;
        });
    });
    let _ = std::fs::remove_dir_all(&dir);
    group.finish();
}

criterion_group!(benches, fsyncs_per_second, wal_append, raw_write_fsync);
criterion_main!(benches);
