//! The log's leader-based commit through the real server and client (docs/durability.md
//! "Latency"): a publish awaited alone is written and fsynced by its own connection's task,
//! not handed to the WAL's writer thread; its confirm still follows its fsync; a failed fsync
//! there is still fail-stop; and concurrent publishers still share fsyncs.
//!
//! The log runs on an in-memory disk wrapped to record which thread ran each fsync (and,
//! for the group-commit test, to make each fsync take 2 ms, like a slow device).

mod common;

use common::DEADLINE;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use wharf_client::{Client, Durability, Message};
use wharf_server::{RunningServer, ServerConfig};
use wharf_storage::{Fault, MemStorage, Storage, StorageFile};

/// The WAL's writer thread (see `Wal::open`).
const WRITER_THREAD: &str = "wharf-wal-writer";

/// One file fsync: the thread that ran it and whether it succeeded.
#[derive(Debug, Clone)]
struct Sync {
    thread: String,
    ok: bool,
}

/// `MemStorage` whose file fsyncs are recorded (and optionally slowed down).
#[derive(Clone)]
struct Recording {
    inner: MemStorage,
    syncs: Arc<Mutex<Vec<Sync>>>,
    sync_delay: Duration,
}

impl Recording {
    fn new(inner: MemStorage, sync_delay: Duration) -> Recording {
        Recording {
            inner,
            syncs: Arc::default(),
            sync_delay,
        }
    }

    fn syncs(&self) -> Vec<Sync> {
        self.syncs.lock().unwrap().clone()
    }
}

struct RecordingFile {
    inner: Arc<dyn StorageFile>,
    storage: Recording,
}

impl StorageFile for RecordingFile {
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.inner.write_at(offset, buf)
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_at(offset, buf)
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn sync(&self) -> io::Result<()> {
        if !self.storage.sync_delay.is_zero() {
            std::thread::sleep(self.storage.sync_delay);
        }
        let outcome = self.inner.sync();
        let thread = std::thread::current()
            .name()
            .unwrap_or("unnamed")
            .to_owned();
        self.storage.syncs.lock().unwrap().push(Sync {
            thread,
            ok: outcome.is_ok(),
        });
        outcome
    }
    fn truncate(&self, len: u64) -> io::Result<()> {
        self.inner.truncate(len)
    }
}

impl Storage for Recording {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        self.inner.create_dir_all(dir)
    }
    fn create(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>> {
        Ok(Arc::new(RecordingFile {
            inner: self.inner.create(path)?,
            storage: self.clone(),
        }))
    }
    fn open(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>> {
        Ok(Arc::new(RecordingFile {
            inner: self.inner.open(path)?,
            storage: self.clone(),
        }))
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        self.inner.remove(path)
    }
    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        self.inner.list_dir(dir)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.inner.sync_dir(dir)
    }
}

async fn start_on(storage: Arc<dyn Storage>, dir: &Path) -> RunningServer {
    RunningServer::start_with_storage(ServerConfig::ephemeral(dir), storage)
        .await
        .expect("server starts")
}

async fn connect(server: &RunningServer) -> Client {
    Client::connect(&server.addr.to_string())
        .await
        .expect("connect")
}

// Two workers, as `wharf serve` has on this machine: the leader blocks one of them in fsync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_awaited_alone_is_fsynced_by_its_connection_and_confirmed_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let mem = MemStorage::new(1);
    let storage = Recording::new(mem.clone(), Duration::ZERO);
    let server = start_on(Arc::new(storage.clone()), dir.path()).await;
    let client = connect(&server).await;
    client.declare_queue("q").durable(true).await.unwrap();
    let mut consumer = client.consume("q", Default::default()).await.unwrap();
    let before = storage.syncs().len();
    let n_publishes = 40;
    for idx in 0..n_publishes {
        let durability = tokio::time::timeout(
            DEADLINE,
            client.publish("", "q", Message::new(format!("m{idx}")).persistent(true)),
        )
        .await
        .expect("confirmed in time")
        .expect("confirmed");
        assert_eq!(durability, Durability::Fsynced);
        // Confirmed only once the fsync covering it returned: the disk holds it now.
        let disk = mem.deep_clone();
        disk.crash();
        let (recovered, _) = wharf_storage::Wal::open(
            Arc::new(disk),
            dir.path().join("wal"),
            wharf_storage::WalConfig::default(),
        )
        .expect("recovers");
        let n_records = recovered.records(recovered.first_lsn()).count();
        // The queue's declaration, then publishes 0..=idx (deliveries' settles ride along).
        assert!(
            n_records > idx + 1,
            "publish {idx} confirmed but not on disk"
        );
    }
    for _ in 0..n_publishes {
        tokio::time::timeout(DEADLINE, consumer.next())
            .await
            .expect("delivered in time")
            .expect("open")
            .expect("ok");
    }
    let syncs = storage.syncs()[before..].to_vec();
    assert!(syncs.iter().all(|sync| sync.ok));
    let by_writer = syncs
        .iter()
        .filter(|sync| sync.thread == WRITER_THREAD)
        .count();
    // Each awaited publish finds the log idle: its connection commits it. (A publish that
    // arrives before the previous leader gave the tail back goes to the writer thread.)
    assert!(
        syncs.len() >= n_publishes && by_writer * 4 < syncs.len(),
        "{by_writer} of {} fsyncs on the writer thread: {syncs:?}",
        syncs.len()
    );
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fsync_in_a_leader_commit_confirms_nothing_and_stops_the_broker() {
    let dir = tempfile::tempdir().unwrap();
    let mem = MemStorage::new(2);
    let storage = Recording::new(mem.clone(), Duration::ZERO);
    let server = start_on(Arc::new(storage.clone()), dir.path()).await;
    let client = connect(&server).await;
    client.declare_queue("q").durable(true).await.unwrap();
    client
        .publish("", "q", Message::new("before").persistent(true))
        .await
        .unwrap();
    mem.fail_sync(1, Fault::Eio);
    let outcome = tokio::time::timeout(
        DEADLINE,
        client.publish("", "q", Message::new("after").persistent(true)),
    )
    .await
    .expect("answered or closed in time");
    assert!(
        outcome.is_err(),
        "no confirm once an fsync failed: {outcome:?}"
    );
    let failed: Vec<Sync> = storage
        .syncs()
        .into_iter()
        .filter(|sync| !sync.ok)
        .collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_ne!(
        failed[0].thread, WRITER_THREAD,
        "the failing fsync ran in the publishing connection's commit"
    );
    let stopped = tokio::time::timeout(DEADLINE, server.task)
        .await
        .expect("the broker stops by itself")
        .unwrap();
    let err = stopped.expect_err("the broker reports the failure");
    assert!(err.to_string().contains("log failure"), "{err}");
    // What was confirmed before the failure survives the power going too.
    mem.clear_faults();
    mem.crash();
    let server = start_on(Arc::new(mem), dir.path()).await;
    let client = connect(&server).await;
    let ready = client.queue_stats("q").await.unwrap().ready;
    assert!((1..=2).contains(&ready), "{ready}");
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_still_share_fsyncs() {
    let dir = tempfile::tempdir().unwrap();
    let mem = MemStorage::new(3);
    let storage = Recording::new(mem.clone(), Duration::from_millis(2));
    let server = start_on(Arc::new(storage.clone()), dir.path()).await;
    let setup = connect(&server).await;
    setup.declare_queue("q").durable(true).await.unwrap();
    let before = storage.syncs().len();
    let (n_publishers, n_each) = (8, 25);
    let mut tasks = Vec::new();
    for publisher_idx in 0..n_publishers {
        let client = connect(&server).await;
        tasks.push(tokio::spawn(async move {
            for idx in 0..n_each {
                let body = format!("p{publisher_idx}-{idx}");
                let durability = client
                    .publish("", "q", Message::new(body).persistent(true))
                    .await
                    .expect("confirmed");
                assert_eq!(durability, Durability::Fsynced);
            }
        }));
    }
    for task in tasks {
        tokio::time::timeout(DEADLINE * 3, task)
            .await
            .expect("publishers finish in time")
            .unwrap();
    }
    let syncs = storage.syncs()[before..].to_vec();
    let n_publishes = n_publishers * n_each;
    let by_writer = syncs
        .iter()
        .filter(|sync| sync.thread == WRITER_THREAD)
        .count();
    assert!(
        syncs.len() * 2 < n_publishes,
        "{} fsyncs for {n_publishes} awaited publishes from {n_publishers} connections: no group commit",
        syncs.len()
    );
    assert!(
        by_writer > 0 && by_writer < syncs.len(),
        "both leaders and the writer thread commit groups ({by_writer} of {} on the writer)",
        syncs.len()
    );
    assert_eq!(
        setup.queue_stats("q").await.unwrap().ready,
        n_publishes as u64
    );
    server.stop().await.unwrap();
    // Every confirmed publish is on disk.
    mem.crash();
    let server = start_on(Arc::new(mem), dir.path()).await;
    let client = connect(&server).await;
    assert_eq!(
        client.queue_stats("q").await.unwrap().ready,
        n_publishes as u64
    );
    server.stop().await.unwrap();
}
