//! Hostile clients against the real `wharf serve` process (issue #17), for the cases that need
//! a process of their own: a lowered open-file limit (`prlimit`) and a small disk (a tmpfs
//! mounted in a private mount namespace by `unshare -rm`, as an unprivileged user may). The
//! in-process cases are in `crates/wharf-server/tests/hostile.rs`.

mod common;

use common::DEADLINE;
use common::process::{self, Broker};
use std::ffi::OsStr;
use std::path::Path;
use std::time::{Duration, Instant};
use wharf_client::{Client, ClientError, ErrorCode, Message};

/// The broker's resident memory, from /proc.
fn rss_bytes(broker: &Broker) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", broker.child.id()))
        .expect("the broker's /proc status");
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .expect("VmRSS");
    kib * 1024
}

fn assert_running(broker: &mut Broker) {
    if let Some(status) = broker.child.try_wait().expect("try_wait") {
        panic!("the broker exited: {status}\n{}", broker.log_tail(40));
    }
}

/// A client of `broker`, which has declared the durable queue `queue`.
async fn connect_with_durable_queue(broker: &Broker, queue: &str) -> Client {
    let client = Client::connect(&broker.addr.to_string())
        .await
        .expect("connect");
    client.declare_queue(queue).durable(true).await.unwrap();
    client
}

fn write_config(dir: &Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("wharf.toml");
    std::fs::write(&path, text).expect("write the config");
    path
}

/// With the broker's open-file limit at 256, 400 sockets that never send a byte used to take
/// every descriptor: the log's next segment could not be created and the broker exited. Now
/// the sockets over the cap (256 less the 128 kept for the log) are refused, and a bystander
/// keeps publishing persistent messages across many segment rotations, all confirmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn descriptors_exhausted_by_silent_sockets_never_stop_the_log() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(dir.path(), "segment_bytes = 1048576\n");
    let data = dir.path().join("data");
    let mut broker = process::spawn_wrapped(
        &[
            OsStr::new("prlimit"),
            OsStr::new("--nofile=256:256"),
            OsStr::new("--"),
        ],
        &data,
        &[OsStr::new("--config"), config.as_os_str()],
    );
    let client = connect_with_durable_queue(&broker, "kept").await;
    let mut silent = Vec::new();
    for _ in 0..400 {
        match tokio::net::TcpStream::connect(broker.addr).await {
            Ok(socket) => silent.push(socket),
            // The listen backlog is full: what the broker would not take.
            Err(_) => break,
        }
    }
    // 8 MiB of persistent messages through 1 MiB segments while the sockets are held.
    let publisher = client.publisher_with_window(64);
    for chunk in 0..32u64 {
        let batch = (0..64)
            .map(|idx| Message::new(vec![(chunk * 64 + idx) as u8; 4096]).persistent(true))
            .collect();
        let outcomes = tokio::time::timeout(DEADLINE, publisher.publish_batch("", "kept", batch))
            .await
            .expect("confirmed within the deadline")
            .unwrap();
        assert!(
            outcomes.iter().all(Result::is_ok),
            "{:?}\n{}",
            outcomes.iter().find(|outcome| outcome.is_err()),
            broker.log_tail(20)
        );
        assert_running(&mut broker);
    }
    assert_eq!(client.queue_stats("kept").await.unwrap().ready, 32 * 64);
    // The sockets over the cap were refused (a preamble and `Close`) or closed: they do not
    // wait for the handshake deadline holding a descriptor each.
    let n_silent = silent.len();
    let mut reads = tokio::task::JoinSet::new();
    for mut socket in silent.drain(..) {
        reads.spawn(async move {
            let mut buf = [0u8; 64];
            let answered = tokio::time::timeout(
                Duration::from_millis(500),
                tokio::io::AsyncReadExt::read(&mut socket, &mut buf),
            )
            .await
            .is_ok();
            (answered, socket)
        });
    }
    let mut n_answered = 0;
    while let Some(read) = reads.join_next().await {
        let (answered, socket) = read.expect("read task");
        n_answered += usize::from(answered);
        silent.push(socket);
    }
    assert!(
        n_answered + 128 >= n_silent,
        "{n_answered} of {n_silent} sockets over a cap of 128 were refused"
    );
    let rss = rss_bytes(&broker);
    println!(
        "RSS {:.1} MiB with {n_silent} silent sockets, {n_answered} refused",
        rss as f64 / 1048576.0
    );
    assert!(rss < 256 * 1024 * 1024, "RSS {rss}");
    drop(silent);
    // Room returns: a new client connects.
    let deadline = Instant::now() + DEADLINE;
    loop {
        match Client::connect(&broker.addr.to_string()).await {
            Ok(_) => break,
            Err(err) => assert!(Instant::now() < deadline, "still refused: {err}"),
        }
    }
    assert_running(&mut broker);
    broker.terminate(DEADLINE);
}

/// On a 96 MB disk with `disk_free_limit_bytes` at 48 MB (a 40 MB file already on it),
/// persistent publishes are refused with `ResourceLimit` before the disk fills, transient ones
/// go on, and once space returns (the file is deleted) persistent publishes are confirmed
/// again. Before, the disk filled to 0 bytes first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_publishes_are_refused_below_disk_free_limit_and_resume() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(
        dir.path(),
        "segment_bytes = 4194304\ndisk_free_limit_bytes = 48000000\n",
    );
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    // $6 is the data dir in `WRAPPER... wharf serve --bind ADDR --data-dir DIR ...`.
    let script = "mount -t tmpfs -o size=96m tmpfs \"$6\" \
                  && dd if=/dev/zero of=\"$6/filler\" bs=1M count=40 2>/dev/null \
                  && exec \"$@\"";
    let mut broker = process::spawn_wrapped(
        &[
            OsStr::new("unshare"),
            OsStr::new("-rm"),
            OsStr::new("sh"),
            OsStr::new("-c"),
            OsStr::new(script),
            OsStr::new("sh"),
        ],
        &data,
        &[OsStr::new("--config"), config.as_os_str()],
    );
    let client = connect_with_durable_queue(&broker, "kept").await;
    client.declare_queue("fleeting").await.unwrap();
    let publisher = client.publisher_with_window(64);
    let body = |idx: u64| Message::new(vec![idx as u8; 16 * 1024]).persistent(true);
    // At most the 56 MB that were free: refused well before.
    let mut refused = None;
    'publishing: for chunk in 0..56u64 {
        let batch = (0..64).map(|idx| body(chunk * 64 + idx)).collect();
        let outcomes = publisher.publish_batch("", "kept", batch).await.unwrap();
        for outcome in outcomes {
            if let Err(err) = outcome {
                refused = Some(err);
                break 'publishing;
            }
        }
    }
    let refused = refused.expect("a persistent publish was refused before the disk filled");
    assert!(
        matches!(&refused, ClientError::PublishRefused { code: ErrorCode::ResourceLimit, reason } if reason.contains("disk_free_limit")),
        "{refused:?}"
    );
    assert!(
        broker.wait_for_log("disk alarm", DEADLINE),
        "{}",
        broker.log_tail(20)
    );
    // Transient messages to a transient queue are not refused.
    client
        .publish("", "fleeting", Message::new("light"))
        .await
        .expect("a transient publish goes on");
    assert_running(&mut broker);
    // Space returns: persistent publishes are confirmed again.
    std::fs::remove_file(format!(
        "/proc/{}/root{}/filler",
        broker.child.id(),
        data.display()
    ))
    .expect("delete the filler inside the broker's mount namespace");
    let deadline = Instant::now() + DEADLINE;
    loop {
        match client.publish("", "kept", body(0)).await {
            Ok(_) => break,
            Err(err) => {
                assert!(Instant::now() < deadline, "still refused: {err}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    assert_running(&mut broker);
    broker.terminate(DEADLINE);
}

/// A consumer with no prefetch limit that stops reading while a publisher floods its queue
/// with 64 KiB messages, next to 100 peers that each claim a 16 MiB frame and send 256 KiB of
/// it: with a 64 MiB memory budget, the broker's RSS stays within the budget plus 96 MiB of
/// slack (its own base, allocator slack, and messages counted twice: unacked and queued for
/// their socket), the stuck consumer is reaped, and a bystander keeps its round trips. Before
/// (issue #17), 400 MB published to a stopped consumer took the broker to 674–821 MB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_within_the_budget_with_a_stopped_consumer_and_claimed_frames() {
    const BUDGET: u64 = 64 * 1024 * 1024;
    const SLACK: u64 = 96 * 1024 * 1024;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(
        dir.path(),
        &format!("memory_high_watermark_bytes = {BUDGET}\nslow_consumer_timeout_ms = 2000\n"),
    );
    let mut broker = process::spawn_with(
        &dir.path().join("data"),
        &[OsStr::new("--config"), config.as_os_str()],
        DEADLINE,
    );
    let addr = broker.addr.to_string();
    let bystander = Client::connect(&addr).await.expect("connect");
    bystander.declare_queue("bystander").await.unwrap();
    let mut deliveries = bystander
        .consume(
            "bystander",
            wharf_client::ConsumeOptions {
                prefetch: 16,
                auto_ack: true,
                ..wharf_client::ConsumeOptions::default()
            },
        )
        .await
        .unwrap();
    let flooder = Client::connect(&addr).await.expect("connect");
    flooder.declare_queue("stuck").await.unwrap();
    let mut stuck = common::Raw::open(broker.addr).await;
    stuck.subscribe("stuck", 0).await;
    let mut claims = Vec::new();
    for _ in 0..100 {
        let mut claim = common::Raw::open(broker.addr).await;
        claim.send_bytes(&(16u32 << 20).to_be_bytes()).await;
        claim.send_bytes(&vec![0u8; 256 * 1024]).await;
        claims.push(claim);
    }
    // 400 MB offered; the flooder is paused long before.
    let flooding = tokio::spawn(async move {
        let publisher = flooder.publisher_with_window(64);
        for chunk in 0..100u64 {
            let batch = (0..64)
                .map(|idx| Message::new(vec![(chunk + idx) as u8; 64 * 1024]))
                .collect();
            if publisher.publish_batch("", "stuck", batch).await.is_err() {
                return;
            }
        }
    });
    let mut latencies = Vec::new();
    let mut rss_max = 0;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(4) {
        let round_trip = Instant::now();
        tokio::time::timeout(
            DEADLINE,
            bystander.publish("", "bystander", Message::new("still here")),
        )
        .await
        .expect("the bystander's publish is confirmed within the deadline")
        .expect("confirmed");
        tokio::time::timeout(DEADLINE, deliveries.next())
            .await
            .expect("the bystander's delivery within the deadline")
            .expect("open")
            .expect("ok");
        latencies.push(round_trip.elapsed());
        rss_max = rss_max.max(rss_bytes(&broker));
        assert_running(&mut broker);
    }
    latencies.sort();
    let p99 = latencies[latencies.len() * 99 / 100];
    println!(
        "RSS max {:.1} MiB, bystander p99 {p99:?} over {} round trips",
        rss_max as f64 / 1048576.0,
        latencies.len()
    );
    assert!(
        rss_max < BUDGET + SLACK,
        "RSS {rss_max} over the budget {BUDGET} + {SLACK}"
    );
    assert!(p99 < Duration::from_millis(250), "bystander p99 {p99:?}");
    assert!(!flooding.is_finished(), "the flooder was paused");
    let observer = Client::connect(&addr).await.expect("connect");
    let stats = observer.queue_stats_v2("stuck").await.unwrap();
    assert_eq!(
        (stats.consumers, stats.unacked),
        (0, 0),
        "the stopped consumer was reaped: {stats:?}"
    );
    flooding.abort();
    drop((stuck, claims));
    broker.terminate(DEADLINE);
}
