//! Queues larger than memory through the real server and client: with a small
//! `queue_memory_messages`, a durable queue pages its tail to a spool file, delivers everything
//! in order, gives its disk back once drained, and keeps (or, once purged, forgets) its paged
//! messages across restarts and checkpoints.

mod common;

use common::DEADLINE;
use std::path::Path;
use std::time::Duration;
use wharf_client::{Client, ConsumeOptions, Consumer, Message};
use wharf_server::{RunningServer, ServerConfig};

const THRESHOLD: usize = 50;

async fn start(dir: &Path, checkpoint_bytes: Option<u64>) -> RunningServer {
    let mut config = ServerConfig::ephemeral(dir);
    config.queue_memory_messages = THRESHOLD;
    if let Some(bytes) = checkpoint_bytes {
        config.checkpoint_bytes = bytes;
        config.segment_bytes = 64 * 1024;
    }
    RunningServer::start(config).await.expect("server starts")
}

async fn connect(server: &RunningServer) -> Client {
    Client::connect(&server.addr.to_string())
        .await
        .expect("connect")
}

fn spool_files(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("spool")).map_or(0, |entries| entries.count())
}

/// Waits (within the deadline) until `n` spool files exist: the pager task creates a tail's
/// file shortly after the tail starts.
async fn wait_for_spool_files(dir: &Path, n: usize) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while spool_files(dir) != n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} spool files, expected {n}",
            spool_files(dir)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits (within the deadline) until every spool file is gone: drained tails delete theirs.
async fn wait_until_no_spool_files(dir: &Path) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while spool_files(dir) > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "drained spool files are deleted"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn publish(client: &Client, queue: &str, range: std::ops::Range<usize>) {
    let publisher = client.publisher_with_window(256);
    let messages = range
        .map(|idx| Message::new(format!("m{idx:05}-{}", "x".repeat(80))).persistent(true))
        .collect();
    for outcome in publisher.publish_batch("", queue, messages).await.unwrap() {
        outcome.expect("confirmed");
    }
}

/// Takes `n` deliveries, acking each, and returns their indexes.
async fn drain(consumer: &mut Consumer, n: usize) -> Vec<usize> {
    let mut seen = Vec::with_capacity(n);
    for _ in 0..n {
        let delivery = tokio::time::timeout(DEADLINE, consumer.next())
            .await
            .expect("in time")
            .expect("open")
            .expect("ok");
        let body = std::str::from_utf8(delivery.body()).unwrap();
        seen.push(body[1..6].parse().unwrap());
        delivery.ack().await.unwrap();
    }
    seen
}

fn manual(prefetch: u32) -> ConsumeOptions {
    ConsumeOptions {
        prefetch,
        auto_ack: false,
        ..ConsumeOptions::default()
    }
}

#[tokio::test]
async fn a_queue_larger_than_memory_delivers_everything_in_order_and_gives_its_disk_back() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), None).await;
    let client = connect(&server).await;
    client.declare_queue("big").durable(true).await.unwrap();
    client.declare_queue("small").durable(true).await.unwrap();
    publish(&client, "big", 0..3_000).await;
    publish(&client, "small", 0..THRESHOLD).await;
    assert_eq!(client.queue_stats("big").await.unwrap().ready, 3_000);
    // Only the queue past its threshold pages.
    wait_for_spool_files(dir.path(), 1).await;
    let mut consumer = client.consume("big", manual(100)).await.unwrap();
    // Arrivals while draining join the paged tail, after everything before them.
    let (first, ()) = tokio::join!(
        drain(&mut consumer, 3_500),
        publish(&client, "big", 3_000..3_500)
    );
    assert_eq!(
        first,
        (0..3_500).collect::<Vec<_>>(),
        "FIFO across memory and spool"
    );
    wait_until_no_spool_files(dir.path()).await;
    let stats = client.queue_stats("big").await.unwrap();
    assert_eq!((stats.ready, stats.unacked), (0, 0));
    client.close().await.unwrap();
    drop(consumer);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn paged_messages_survive_a_restart_and_a_purged_tail_does_not_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), None).await;
    let client = connect(&server).await;
    client.declare_queue("keep").durable(true).await.unwrap();
    client.declare_queue("purge").durable(true).await.unwrap();
    publish(&client, "keep", 0..1_000).await;
    publish(&client, "purge", 0..1_000).await;
    assert_eq!(
        client.purge_queue("purge").await.unwrap(),
        1_000,
        "memory and tail"
    );
    assert_eq!(client.queue_stats("purge").await.unwrap().ready, 0);
    client.close().await.unwrap();
    server.stop().await.unwrap();

    let server = start(dir.path(), None).await;
    let client = connect(&server).await;
    assert_eq!(client.queue_stats("keep").await.unwrap().ready, 1_000);
    assert_eq!(
        client.queue_stats("purge").await.unwrap().ready,
        0,
        "the purge was logged"
    );
    // Recovery pages the restored tail again.
    wait_for_spool_files(dir.path(), 1).await;
    let mut consumer = client.consume("keep", manual(64)).await.unwrap();
    assert_eq!(
        drain(&mut consumer, 1_000).await,
        (0..1_000).collect::<Vec<_>>()
    );
    client.close().await.unwrap();
    drop(consumer);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_checkpoint_taken_while_messages_are_paged_keeps_them() {
    let dir = tempfile::tempdir().unwrap();
    // Small checkpoints and segments: checkpoints run while most of the queue is paged.
    let server = start(dir.path(), Some(32 * 1024)).await;
    let client = connect(&server).await;
    client.declare_queue("q").durable(true).await.unwrap();
    let mut consumer = client.consume("q", manual(16)).await.unwrap();
    let mut seen = Vec::new();
    for round in 0..6 {
        publish(&client, "q", round * 1_000..(round + 1) * 1_000).await;
        seen.extend(drain(&mut consumer, 800).await);
    }
    assert_eq!(seen, (0..4_800).collect::<Vec<_>>());
    client.close().await.unwrap();
    drop(consumer);
    server.stop().await.unwrap();
    let segments = std::fs::read_dir(dir.path().join("wal")).unwrap().count();
    assert!(
        segments < 20,
        "checkpoints released the consumed history ({segments} segments of 64 KiB for ~600 KiB logged)"
    );

    let server = start(dir.path(), Some(32 * 1024)).await;
    let client = connect(&server).await;
    // Every drained delivery was acked; those still in the consumer's buffer were not, and
    // are still in the queue with the rest.
    let ready = client.queue_stats("q").await.unwrap().ready;
    assert_eq!(ready, 1_200);
    let mut consumer = client.consume("q", manual(64)).await.unwrap();
    let rest = drain(&mut consumer, 1_200).await;
    let expected: Vec<usize> = (4_800..6_000).collect();
    assert_eq!(rest, expected);
    client.close().await.unwrap();
    drop(consumer);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn once_a_backlog_drains_its_log_is_released() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), Some(64 * 1024)).await;
    let client = connect(&server).await;
    client.declare_queue("q").durable(true).await.unwrap();
    // A backlog as large as the log defers checkpoints (rewriting it would free nothing):
    // the next one is due only once the log has grown by twice the live state...
    publish(&client, "q", 0..20_000).await;
    let logged = std::fs::read_dir(dir.path().join("wal")).unwrap().count();
    assert!(logged >= 30, "{logged} segments of 64 KiB");
    let mut consumer = client.consume("q", manual(256)).await.unwrap();
    assert_eq!(
        drain(&mut consumer, 20_000).await,
        (0..20_000).collect::<Vec<_>>()
    );
    // ...but once the backlog has drained, the log is mostly garbage: it is checkpointed and
    // released, with no further traffic (the broker's housekeeping looks again every second).
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut segments = logged;
    while segments > 3 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        segments = std::fs::read_dir(dir.path().join("wal")).unwrap().count();
    }
    assert!(
        segments <= 3,
        "still {segments} segments after the backlog drained"
    );
    client.close().await.unwrap();
    drop(consumer);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn large_messages_page_by_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServerConfig::ephemeral(dir.path());
    config.queue_memory_bytes = 64 * 1024;
    let server = RunningServer::start(config).await.expect("server starts");
    let client = connect(&server).await;
    client.declare_queue("big").durable(true).await.unwrap();
    let publisher = client.publisher_with_window(64);
    let messages = (0..200)
        .map(|idx| Message::new(format!("m{idx:05}-{}", "y".repeat(4_000))).persistent(true))
        .collect();
    for outcome in publisher.publish_batch("", "big", messages).await.unwrap() {
        outcome.expect("confirmed");
    }
    // 200 × 4 KB is 800 KB: far under the message threshold, over the byte threshold.
    wait_for_spool_files(dir.path(), 1).await;
    let mut consumer = client.consume("big", manual(8)).await.unwrap();
    assert_eq!(
        drain(&mut consumer, 200).await,
        (0..200).collect::<Vec<_>>()
    );
    client.close().await.unwrap();
    drop(consumer);
    server.stop().await.unwrap();
}

/// Priority and length-limited queues page too (issue #16): a priority queue keeps one spool
/// file per level, delivers strictly by priority (then arrival) across memory, spools and a
/// restart, and a drop-head queue counts its paged messages against its limit.
#[tokio::test]
async fn priority_and_length_limited_queues_page_and_keep_their_order_across_a_restart() {
    const N: usize = 2_000;
    const LEVELS: u8 = 5;
    const MAX_LENGTH: usize = 500;
    let priority = |idx: usize| (idx * 7 % LEVELS as usize) as u8;
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), None).await;
    let client = connect(&server).await;
    client
        .declare_queue("prio")
        .durable(true)
        .max_priority(LEVELS - 1)
        .await
        .unwrap();
    client
        .declare_queue("limited")
        .durable(true)
        .max_length(MAX_LENGTH as u64)
        .await
        .unwrap();
    let publisher = client.publisher_with_window(256);
    for queue in ["prio", "limited"] {
        let messages = (0..N)
            .map(|idx| {
                Message::new(format!("m{idx:05}-{}", "x".repeat(80)))
                    .persistent(true)
                    .priority(priority(idx))
            })
            .collect();
        for outcome in publisher.publish_batch("", queue, messages).await.unwrap() {
            outcome.expect("confirmed");
        }
    }
    // Paged messages count against the limit. Once the drops have emptied memory, the head
    // is paged: the queue is over its limit until the page-ins bring the head back and drop
    // it (docs/durability.md), which they do without a consumer.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let limited = client.queue_stats_v2("limited").await.unwrap();
        if limited.ready == MAX_LENGTH as u64 {
            assert_eq!(limited.dropped, (N - MAX_LENGTH) as u64);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the drop-head limit is enforced: {limited:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // One spool per priority level, and one for the limited queue.
    wait_for_spool_files(dir.path(), LEVELS as usize + 1).await;
    client.close().await.unwrap();
    server.stop().await.unwrap();

    let server = start(dir.path(), None).await;
    let client = connect(&server).await;
    assert_eq!(client.queue_stats("prio").await.unwrap().ready, N as u64);
    // Recovery pages the restored tails again.
    wait_for_spool_files(dir.path(), LEVELS as usize + 1).await;
    let mut expected: Vec<usize> = (0..N).collect();
    expected.sort_by_key(|idx| (std::cmp::Reverse(priority(*idx)), *idx));
    let mut consumer = client.consume("prio", manual(64)).await.unwrap();
    assert_eq!(
        drain(&mut consumer, N).await,
        expected,
        "by priority, then arrival"
    );
    let mut consumer = client.consume("limited", manual(64)).await.unwrap();
    assert_eq!(
        drain(&mut consumer, MAX_LENGTH).await,
        (N - MAX_LENGTH..N).collect::<Vec<_>>(),
        "the newest survive a drop-head limit"
    );
    wait_until_no_spool_files(dir.path()).await;
    client.close().await.unwrap();
    drop(consumer);
    server.stop().await.unwrap();
}

/// With `transient_queues_page` (the default), a transient queue larger than memory pages too:
/// everything comes back in order; checkpoints taken meanwhile (small ones, while thousands of
/// its messages are paged) copy none of them into the log, and after a restart the durable
/// queue beside it is whole and the transient one is gone, as before. Off, it stays in memory.
#[tokio::test]
async fn a_transient_queue_larger_than_memory_pages_and_is_never_logged() {
    for page in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let mut config = ServerConfig::ephemeral(dir.path());
        config.queue_memory_messages = THRESHOLD;
        config.transient_queues_page = page;
        config.checkpoint_bytes = 32 * 1024;
        config.segment_bytes = 64 * 1024;
        let server = RunningServer::start(config.clone()).await.unwrap();
        let client = connect(&server).await;
        client.declare_queue("transient").await.unwrap();
        client.declare_queue("durable").durable(true).await.unwrap();
        publish(&client, "transient", 0..3_000).await;
        publish(&client, "durable", 0..200).await;
        assert_eq!(client.queue_stats("transient").await.unwrap().ready, 3_000);
        // One spool file per paging queue: the durable one's, and the transient one's if it
        // pages.
        let files = if page { 2 } else { 1 };
        wait_for_spool_files(dir.path(), files).await;
        let mut consumer = client.consume("transient", manual(64)).await.unwrap();
        let (first, ()) = tokio::join!(
            drain(&mut consumer, 1_000),
            publish(&client, "durable", 200..400)
        );
        assert_eq!(first, (0..1_000).collect::<Vec<_>>());
        // 2,000 still queued: a paging transient queue still has its file, one kept in
        // memory never had one.
        assert_eq!(spool_files(dir.path()), files);
        drop(consumer);
        client.close().await.unwrap();
        server.stop().await.unwrap();
        let server = RunningServer::start(config).await.unwrap();
        let client = connect(&server).await;
        assert_eq!(client.queue_stats("durable").await.unwrap().ready, 400);
        let err = client.queue_stats("transient").await.unwrap_err();
        assert_eq!(
            err.code(),
            Some(wharf_client::ErrorCode::NotFound),
            "{err:?}"
        );
        client.close().await.unwrap();
        server.stop().await.unwrap();
    }
}
