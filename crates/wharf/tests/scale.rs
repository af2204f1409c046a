//! Durability at the sizes users reach (issue #16): the real `wharf serve` process with durable
//! backlogs larger than one log record, one WAL submission and one checkpoint chunk, stopped
//! gracefully, killed with `kill -9` and restarted on the same data dir; a second broker on a
//! data dir in use; the log's disk use while a large backlog sits next to heavy churn.
//!
//! Sizes are the by default. `WHARF_SCALE_ROUNDS` (default 3) and `WHARF_SCALE_MB`
//! (default 200) size the kill -9 rounds; `WHARF_SCALE_CHURN_MB` (default 400) the churn of the
//! disk-bound test. Randomized parts print their seed; `WHARF_SEED=n` replays them.
//!
//! Message bodies carry their queue and index and are otherwise pseudo-random (incompressible,
//! regenerated from the seed to check every byte that comes back).

mod common;

use common::DEADLINE;
use common::process::{self, Broker, Start};
use std::collections::{BTreeMap, VecDeque};
use std::hash::{DefaultHasher, Hasher};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::watch;
use wharf_client::{
    Client, ClientError, ConsumeOptions, Durability, Message, PublishTicket, Publisher,
};
use wharf_storage::SplitMix64;

/// Startup deadline: recovering a log of a few hundred MB takes seconds in a debug build.
const STARTUP: Duration = Duration::from_secs(120);
/// Graceful stop deadline (the broker waits up to 6 s for connections, then closes its log).
const STOP: Duration = Duration::from_secs(60);
/// Deadline of a long phase (publishing or draining a backlog of hundreds of MB).
const PHASE: Duration = Duration::from_secs(300);
/// A WAL segment's default size (`segment_bytes`), and the default `checkpoint_bytes`.
const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
const CHECKPOINT_BYTES: u64 = 64 * 1024 * 1024;
const MB: u64 = 1_000_000;

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(text) => text
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, not {text:?}")),
        Err(_) => default,
    }
}

fn seed(test: &str) -> u64 {
    let seed = std::env::var("WHARF_SEED")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("{test}: seed {seed} (replay with WHARF_SEED={seed})");
    seed
}

/// A body of `body_bytes` (>= 9) bytes: the message index (8 bytes, big endian), the queue
/// index, then bytes drawn from (seed, queue, index).
fn body(seed: u64, queue_idx: u8, message_idx: u64, body_bytes: usize) -> Vec<u8> {
    assert!(body_bytes >= 9);
    let mut rng = SplitMix64::new(
        seed ^ (u64::from(queue_idx) << 56) ^ message_idx.wrapping_mul(0xD6E8_FEB8_6659_FD93),
    );
    let mut body = Vec::with_capacity(body_bytes + 8);
    body.extend_from_slice(&message_idx.to_be_bytes());
    body.push(queue_idx);
    while body.len() < body_bytes {
        body.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    body.truncate(body_bytes);
    body
}

fn message_idx_of(body: &[u8]) -> u64 {
    u64::from_be_bytes(body[..8].try_into().expect("a body of at least 8 bytes"))
}

/// A message's priority (0..=9), drawn from (seed, queue, index).
fn priority_of(seed: u64, queue_idx: u8, message_idx: u64) -> u8 {
    let mut rng =
        SplitMix64::new(seed.rotate_left(17) ^ (u64::from(queue_idx) << 48) ^ message_idx);
    rng.below(10) as u8
}

async fn connect(addr: SocketAddr) -> Client {
    Client::connect(&addr.to_string())
        .await
        .unwrap_or_else(|err| panic!("connect to {addr}: {err}"))
}

/// The messages in the queue (ready and unacked) as a fresh connection sees them, or why they
/// cannot be counted.
async fn n_queued(addr: SocketAddr, queue: &str) -> Result<u64, String> {
    let client = Client::connect(&addr.to_string())
        .await
        .map_err(|err| format!("cannot connect: {err}"))?;
    let stats = client.queue_stats(queue).await;
    let _ = client.close().await;
    match stats {
        Ok(stats) => Ok(stats.ready + stats.unacked),
        Err(err) => Err(err.to_string()),
    }
}

/// The broker's WARN and ERROR lines (the first `n_lines`), for failure messages.
fn warnings(broker: &Broker, n_lines: usize) -> String {
    let lines: Vec<String> = broker
        .log_lines()
        .into_iter()
        .filter(|line| line.contains(" WARN ") || line.contains(" ERROR "))
        .collect();
    let mut text = format!("{} warnings/errors in its log", lines.len());
    let n_dropped = broker.n_log_lines_dropped();
    if n_dropped > 0 {
        text.push_str(&format!(" ({n_dropped} later lines not kept)"));
    }
    for line in lines.iter().take(n_lines) {
        text.push_str("\n  ");
        text.push_str(line);
    }
    text
}

/// Publishes messages `0..n_messages` of `queue` in order (one publisher, at most `window`
/// unconfirmed) and returns how many were confirmed `Fsynced`, and the first other outcome.
async fn publish_all(
    publisher: &Publisher,
    queue: &str,
    n_messages: u64,
    window: usize,
    message: impl Fn(u64) -> Message,
) -> (u64, Option<String>) {
    let mut tickets: VecDeque<(u64, PublishTicket)> = VecDeque::new();
    let mut n_fsynced = 0u64;
    let mut first_other: Option<String> = None;
    let mut note = |message_idx: u64, outcome: Result<Durability, ClientError>| match outcome {
        Ok(Durability::Fsynced) => n_fsynced += 1,
        other => {
            first_other.get_or_insert_with(|| format!("message {message_idx}: {other:?}"));
        }
    };
    for message_idx in 0..n_messages {
        match publisher.publish("", queue, message(message_idx)).await {
            Ok(ticket) => tickets.push_back((message_idx, ticket)),
            Err(err) => {
                note(message_idx, Err(err));
                break;
            }
        }
        while tickets.len() >= window {
            let (message_idx, ticket) = tickets.pop_front().expect("not empty");
            note(message_idx, ticket.await);
        }
    }
    for (message_idx, ticket) in tickets {
        note(message_idx, ticket.await);
    }
    (n_fsynced, first_other)
}

/// Consumes `queue` until it is empty (nothing ready, nothing unacked), acking as it goes,
/// and shows every delivery to `visit` (body, redelivered flag) in delivery order.
async fn drain(client: &Client, queue: &str, mut visit: impl FnMut(&[u8], bool)) -> u64 {
    let mut consumer = client
        .consume(
            queue,
            ConsumeOptions {
                prefetch: 1_000,
                auto_ack: false,
                ..ConsumeOptions::default()
            },
        )
        .await
        .unwrap_or_else(|err| panic!("consume {queue}: {err}"));
    let mut n_delivered = 0u64;
    let mut unacked = None;
    let deadline = tokio::time::Instant::now() + PHASE;
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "draining {queue} took more than {PHASE:?} ({n_delivered} delivered)"
        );
        match tokio::time::timeout(Duration::from_millis(100), consumer.next()).await {
            Ok(Some(Ok(delivery))) => {
                visit(delivery.body(), delivery.redelivered());
                n_delivered += 1;
                if n_delivered.is_multiple_of(256) {
                    delivery.ack_multiple().await.expect("ack");
                    unacked = None;
                } else {
                    unacked = Some(delivery);
                }
            }
            Ok(other) => panic!("the consumer of {queue} ended: {other:?}"),
            Err(_) => {
                // Quiet: ack what is held, then ask whether anything is left.
                if let Some(delivery) = unacked.take() {
                    delivery.ack_multiple().await.expect("ack");
                }
                let stats = client.queue_stats(queue).await.expect("queue stats");
                if stats.ready == 0 && stats.unacked == 0 {
                    break;
                }
            }
        }
    }
    consumer.cancel().await.expect("cancel");
    n_delivered
}

// -------------------------------------------------------------------------------------------
// 1. The repro.

/// 80,000 persistent 1,000-byte messages, all confirmed, must survive two graceful restarts
/// and a `kill -9`: the whole backlog is larger than one WAL submission and than a queue's
/// memory (64 MiB), so every checkpoint is written in chunks and part of it from the spool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_80_mb_confirmed_backlog_survives_two_restarts_and_a_kill() {
    const QUEUE: &str = "scale-backlog";
    const N_MESSAGES: u64 = 80_000;
    const BODY_BYTES: usize = 1_000;
    let test_started = Instant::now();
    let seed = seed("80 MB backlog");
    let dir = tempfile::tempdir().unwrap();
    let mut history: Vec<String> = Vec::new();

    let broker = process::spawn_with(dir.path(), &[], STARTUP);
    let client = connect(broker.addr).await;
    client.declare_queue(QUEUE).durable(true).await.unwrap();
    let publisher = client.publisher_with_window(4_096);
    let (n_fsynced, first_other) = publish_all(&publisher, QUEUE, N_MESSAGES, 4_096, |idx| {
        Message::new(body(seed, 0, idx, BODY_BYTES)).persistent(true)
    })
    .await;
    assert_eq!(
        n_fsynced,
        N_MESSAGES,
        "every publish must be confirmed Fsynced; first other outcome: {first_other:?}\n{}",
        warnings(&broker, 10)
    );
    client.close().await.unwrap();
    eprintln!(
        "80 MB backlog: published and confirmed {n_fsynced} x {BODY_BYTES} B in {:?}",
        test_started.elapsed()
    );
    broker.terminate(STOP);

    // A restart, stopped gracefully again once the checkpoint the broker writes at start has
    // released the replayed log (as a broker that runs for a while would); a second restart,
    // killed with `kill -9` at once (its startup checkpoint anywhere in flight); then the
    // start that is drained.
    for start in 1..=2 {
        let files_before = log_files(dir.path());
        let broker = process::spawn_with(dir.path(), &[], STARTUP);
        let ready = n_queued(broker.addr, QUEUE).await;
        history.push(format!(
            "restart {start}: {QUEUE} holds {ready:?}; {}",
            warnings(&broker, 5)
        ));
        eprintln!("80 MB backlog: {}", history.last().unwrap());
        assert_eq!(
            ready,
            Ok(N_MESSAGES),
            "confirmed messages lost at restart {start}:\n{}",
            history.join("\n")
        );
        if start == 2 {
            broker.kill();
            break;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let mut poll = tokio::time::interval(Duration::from_millis(20));
        loop {
            poll.tick().await;
            let now = log_files(dir.path());
            if files_before.iter().any(|file| !now.contains(file)) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "restart {start}: the checkpoint written at start released none of the \
                 replayed log within 30 s (no log file present before the start was deleted: \
                 {files_before:?})\n{}",
                warnings(&broker, 10)
            );
        }
        broker.terminate(STOP);
    }

    let broker = process::spawn_with(dir.path(), &[], STARTUP);
    let client = connect(broker.addr).await;
    let mut n_deliveries = vec![0u32; N_MESSAGES as usize];
    let mut next_idx = 0u64;
    let mut n_corrupt = 0u64;
    let mut out_of_order: Vec<(u64, u64)> = Vec::new();
    let n_delivered = drain(&client, QUEUE, |delivered, _redelivered| {
        let message_idx = message_idx_of(delivered);
        if message_idx != next_idx && out_of_order.len() < 10 {
            out_of_order.push((next_idx, message_idx));
        }
        next_idx = message_idx + 1;
        if message_idx >= N_MESSAGES || delivered != body(seed, 0, message_idx, BODY_BYTES) {
            n_corrupt += 1;
            return;
        }
        n_deliveries[message_idx as usize] += 1;
    })
    .await;
    client.close().await.unwrap();
    broker.terminate(STOP);
    let lost: Vec<usize> = (0..n_deliveries.len())
        .filter(|idx| n_deliveries[*idx] == 0)
        .collect();
    let n_duplicates: u64 = n_deliveries
        .iter()
        .map(|n| u64::from(n.saturating_sub(1)))
        .sum();
    eprintln!(
        "80 MB backlog: published {N_MESSAGES}, confirmed {n_fsynced}, recovered {n_delivered}, \
         lost {}, duplicates {n_duplicates}, corrupt {n_corrupt}, order breaks {} ({:?} total)",
        lost.len(),
        out_of_order.len(),
        test_started.elapsed()
    );
    assert!(
        lost.is_empty(),
        "{} confirmed messages lost after the kill, first {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    assert_eq!(n_duplicates, 0, "messages delivered more than once");
    assert_eq!(n_corrupt, 0, "bodies that are not what was published");
    assert!(
        out_of_order.is_empty(),
        "delivered out of order (expected, got): {out_of_order:?}"
    );
}

// -------------------------------------------------------------------------------------------
// 2. kill -9 rounds with large backlogs of every durable queue kind.

/// A durable queue of the kill -9 rounds.
struct Spec {
    name: &'static str,
    max_priority: Option<u8>,
    max_length: Option<u64>,
}

/// Far above anything the test puts in a queue: the capped queue never drops, so every
/// confirmed and unacked message must come back (asserted at every start).
const MAX_LENGTH: u64 = 10_000_000;

const SPECS: [Spec; 4] = [
    Spec {
        name: "scale-fifo-a",
        max_priority: None,
        max_length: None,
    },
    Spec {
        name: "scale-fifo-b",
        max_priority: None,
        max_length: None,
    },
    Spec {
        name: "scale-priority",
        max_priority: Some(9),
        max_length: None,
    },
    Spec {
        name: "scale-capped",
        max_priority: None,
        max_length: Some(MAX_LENGTH),
    },
];

/// Which queues each publisher connection feeds, in a repeating cycle (weights 3:1 and 2:2, so
/// `scale-fifo-a` grows past a queue's memory, 64 MiB, in the first round and pages).
const PUBLISHER_CYCLES: [&[usize]; 2] = [&[0, 0, 3, 0], &[1, 2]];

/// Body size of the kill -9 rounds.
const ROUND_BODY_BYTES: usize = 2_000;

/// One message's history, as bits.
const PUBLISHED: u8 = 1;
const CONFIRMED: u8 = 2;
/// An ack was about to be sent (it may or may not have reached the broker).
const ACK_SENT: u8 = 4;
/// Delivered at least once.
const SEEN: u8 = 8;
/// Delivered by the final drain.
const DRAINED: u8 = 16;

#[derive(Default)]
struct Tally {
    /// Per message index: the bits above.
    flags: Vec<u8>,
    n_confirmed: u64,
    n_ack_sent: u64,
    /// Publishes answered otherwise than `Fsynced` while the connection lived.
    refused: Vec<String>,
    /// Deliveries after the first of a message without the redelivered flag.
    n_unflagged_duplicates: u64,
    /// Deliveries whose body is not what was published, or of a message never published.
    n_corrupt: u64,
    /// (session, priority, previous index, index) where a consumer session saw a message
    /// of one priority after a later one.
    order_breaks: Vec<String>,
}

impl Tally {
    fn confirmed_not_acked(&self) -> u64 {
        self.flags
            .iter()
            .filter(|flags| **flags & (CONFIRMED | ACK_SENT) == CONFIRMED)
            .count() as u64
    }
}

/// What every task of the rounds shares.
struct Oracle {
    seed: u64,
    queues: Vec<Mutex<Tally>>,
    /// Confirmed minus acks sent, all queues: the backlog the kill waits for.
    backlog: watch::Sender<i64>,
}

impl Oracle {
    fn message(&self, queue_idx: usize, message_idx: u64) -> Message {
        let queue_tag = u8::try_from(queue_idx).unwrap();
        let message = Message::new(body(self.seed, queue_tag, message_idx, ROUND_BODY_BYTES))
            .persistent(true);
        match SPECS[queue_idx].max_priority {
            Some(_) => message.priority(priority_of(self.seed, queue_tag, message_idx)),
            None => message,
        }
    }

    /// Checks a delivered body; returns its index and the priority it is ordered by.
    fn check(&self, queue_idx: usize, delivered: &[u8], redelivered: bool, flag: u8) -> (u64, u8) {
        let queue_tag = u8::try_from(queue_idx).unwrap();
        let message_idx = message_idx_of(delivered);
        let mut tally = self.queues[queue_idx].lock().unwrap();
        let known = usize::try_from(message_idx)
            .ok()
            .and_then(|idx| tally.flags.get(idx).copied())
            .unwrap_or(0);
        if known & PUBLISHED == 0
            || delivered != body(self.seed, queue_tag, message_idx, ROUND_BODY_BYTES)
        {
            tally.n_corrupt += 1;
            return (message_idx, 0);
        }
        if known & SEEN != 0 && !redelivered {
            tally.n_unflagged_duplicates += 1;
        }
        tally.flags[message_idx as usize] |= SEEN | flag;
        let priority = match SPECS[queue_idx].max_priority {
            Some(_) => priority_of(self.seed, queue_tag, message_idx),
            None => 0,
        };
        (message_idx, priority)
    }
}

/// Per consumer session: the last index seen per priority; a smaller or equal one breaks the
/// queue's order (FIFO within a priority).
#[derive(Default)]
struct OrderCheck {
    last: BTreeMap<u8, u64>,
}

impl OrderCheck {
    fn see(&mut self, session: &str, priority: u8, message_idx: u64, tally: &Mutex<Tally>) {
        if let Some(previous) = self.last.insert(priority, message_idx)
            && previous >= message_idx
        {
            let mut tally = tally.lock().unwrap();
            if tally.order_breaks.len() < 10 {
                tally.order_breaks.push(format!(
                    "{session}: priority {priority}: {message_idx} after {previous}"
                ));
            }
        }
    }
}

async fn declare(client: &Client, spec: &Spec) -> Result<(), ClientError> {
    let mut declare = client.declare_queue(spec.name).durable(true);
    if let Some(max_priority) = spec.max_priority {
        declare = declare.max_priority(max_priority);
    }
    if let Some(max_length) = spec.max_length {
        declare = declare.max_length(max_length);
    }
    declare.await.map(|_| ())
}

/// One publisher connection of a round: publishes to the queues of `cycle` in turn (in order
/// per queue), at most `n_max` messages, until the connection dies (the kill).
async fn publish_round(
    addr: SocketAddr,
    oracle: Arc<Oracle>,
    cycle: &'static [usize],
    n_max: u64,
    confirmed: Vec<watch::Sender<u64>>,
) {
    const WINDOW: usize = 512;
    let Ok(client) = Client::connect(&addr.to_string()).await else {
        return;
    };
    for &queue_idx in cycle {
        if declare(&client, &SPECS[queue_idx]).await.is_err() {
            return;
        }
    }
    let publisher = client.publisher_with_window(WINDOW as u32);
    let mut tickets: VecDeque<(usize, u64, PublishTicket)> = VecDeque::new();
    let note = |queue_idx: usize, message_idx: u64, outcome: Result<Durability, ClientError>| {
        let mut tally = oracle.queues[queue_idx].lock().unwrap();
        match outcome {
            Ok(Durability::Fsynced) => {
                tally.flags[message_idx as usize] |= CONFIRMED;
                tally.n_confirmed += 1;
                drop(tally);
                confirmed[queue_idx].send_modify(|n| *n += 1);
                oracle.backlog.send_modify(|n| *n += 1);
                true
            }
            _ if client.is_closed() => false,
            other => {
                if tally.refused.len() < 10 {
                    tally.refused.push(format!(
                        "{}: {message_idx}: {other:?}",
                        SPECS[queue_idx].name
                    ));
                }
                true
            }
        }
    };
    for (n_sent, queue_idx) in cycle.iter().copied().cycle().enumerate() {
        if n_sent as u64 >= n_max {
            break;
        }
        let message_idx = {
            let mut tally = oracle.queues[queue_idx].lock().unwrap();
            tally.flags.push(PUBLISHED);
            tally.flags.len() as u64 - 1
        };
        let message = oracle.message(queue_idx, message_idx);
        match publisher.publish("", SPECS[queue_idx].name, message).await {
            Ok(ticket) => tickets.push_back((queue_idx, message_idx, ticket)),
            Err(_) => return,
        }
        while tickets.len() >= WINDOW {
            let (queue_idx, message_idx, ticket) = tickets.pop_front().expect("not empty");
            if !note(queue_idx, message_idx, ticket.await) {
                return;
            }
        }
    }
    for (queue_idx, message_idx, ticket) in tickets {
        if !note(queue_idx, message_idx, ticket.await) {
            return;
        }
    }
}

/// One acking consumer of a round: acks at most one message per `ACK_SHARE` confirmed to its
/// queue in this round (so the backlog grows), checking order and bodies, until the
/// connection dies (the kill) or the queue's publisher has ended.
async fn consume_round(
    addr: SocketAddr,
    oracle: Arc<Oracle>,
    queue_idx: usize,
    round: u64,
    mut confirmed: watch::Receiver<u64>,
) {
    const ACK_SHARE: u64 = 10;
    let spec = &SPECS[queue_idx];
    let Ok(client) = Client::connect(&addr.to_string()).await else {
        return;
    };
    if declare(&client, spec).await.is_err() {
        return;
    }
    let Ok(mut consumer) = client
        .consume(
            spec.name,
            ConsumeOptions {
                prefetch: 64,
                auto_ack: false,
                ..ConsumeOptions::default()
            },
        )
        .await
    else {
        return;
    };
    let session = format!("round {round} consumer of {}", spec.name);
    let mut order = OrderCheck::default();
    let mut n_acked = 0u64;
    while let Some(Ok(delivery)) = consumer.next().await {
        let (message_idx, priority) =
            oracle.check(queue_idx, delivery.body(), delivery.redelivered(), 0);
        order.see(&session, priority, message_idx, &oracle.queues[queue_idx]);
        // Waits on the publisher's progress; ends with it.
        if confirmed
            .wait_for(|n_confirmed| n_acked * ACK_SHARE < *n_confirmed)
            .await
            .is_err()
        {
            return;
        }
        {
            let mut tally = oracle.queues[queue_idx].lock().unwrap();
            if let Some(flags) = tally.flags.get_mut(message_idx as usize) {
                *flags |= ACK_SENT;
            }
            tally.n_ack_sent += 1;
        }
        oracle.backlog.send_modify(|n| *n -= 1);
        n_acked += 1;
        if delivery.ack().await.is_err() {
            return;
        }
    }
}

/// After a start: every queue holds at least its confirmed and not acked messages (more is
/// fine: unconfirmed publishes and acks lost in the kill). Returns a report line per queue.
/// Starts the broker on `dir` (start number `start`) and checks that every queue holds all its
/// confirmed and unacked messages; the report lines go to stderr and `history`.
async fn start_and_check(
    dir: &std::path::Path,
    oracle: &Oracle,
    start: u64,
    history: &mut Vec<String>,
    seed: u64,
) -> Broker {
    let broker = process::spawn_with(dir, &[], STARTUP);
    let report = check_recovered(broker.addr, oracle, start).await;
    for (line, _) in &report {
        eprintln!("kill -9 rounds: {line}");
        history.push(line.clone());
    }
    assert!(
        report.iter().all(|(_, ok)| *ok),
        "confirmed messages lost (seed {seed}):\n{}\n{}",
        history.join("\n"),
        warnings(&broker, 10)
    );
    broker
}

async fn check_recovered(addr: SocketAddr, oracle: &Oracle, start: u64) -> Vec<(String, bool)> {
    let mut report = Vec::new();
    for (queue_idx, spec) in SPECS.iter().enumerate() {
        let expected_min = oracle.queues[queue_idx]
            .lock()
            .unwrap()
            .confirmed_not_acked();
        let ready = n_queued(addr, spec.name).await;
        let ok = match &ready {
            Ok(n_ready) => *n_ready >= expected_min && *n_ready < MAX_LENGTH,
            Err(_) => expected_min == 0,
        };
        report.push((
            format!(
                "start {start}: {}: holds {ready:?}, confirmed and not acked {expected_min}, lost {}",
                spec.name,
                match &ready {
                    Ok(n_ready) => expected_min.saturating_sub(*n_ready),
                    Err(_) => expected_min,
                }
            ),
            ok,
        ));
    }
    report
}

/// `kill -9` rounds with publishers and acking consumers running and a backlog of at least
/// `WHARF_SCALE_MB` (default 200) across a plain queue that pages, another plain queue, a
/// priority queue and a length-limited queue: after every start no confirmed and unacked
/// message is missing; at the end every one of them is drained, in order per queue (per
/// priority for the priority queue), intact, and every repeated delivery is flagged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_rounds_with_large_backlogs_lose_nothing_confirmed() {
    let test_started = Instant::now();
    let n_rounds = env_u64("WHARF_SCALE_ROUNDS", 3).max(1);
    let backlog_mb = env_u64("WHARF_SCALE_MB", 200).max(1);
    let seed = seed("kill -9 rounds");
    eprintln!(
        "kill -9 rounds: {n_rounds} rounds, backlog at the first kill >= {backlog_mb} MB, \
         growing 10% a round; {ROUND_BODY_BYTES} B bodies"
    );
    let mut rng = SplitMix64::new(seed);
    let dir = tempfile::tempdir().unwrap();
    let (backlog, _) = watch::channel(0i64);
    let oracle = Arc::new(Oracle {
        seed,
        queues: SPECS.iter().map(|_| Mutex::default()).collect(),
        backlog,
    });
    let mut history: Vec<String> = Vec::new();

    for round in 0..n_rounds {
        let broker = start_and_check(dir.path(), &oracle, round + 1, &mut history, seed).await;

        // The backlog the kill waits for: the target of this round, plus a seeded 0-20% more
        // so the kill lands at a different point of the log each time.
        let target_mb = backlog_mb + round * backlog_mb / 10;
        let target = i64::try_from(target_mb * MB / ROUND_BODY_BYTES as u64).unwrap();
        let trigger = target + i64::try_from(rng.below(target as u64 / 5 + 1)).unwrap();
        let round_started = Instant::now();
        let (senders, receivers): (Vec<_>, Vec<_>) =
            SPECS.iter().map(|_| watch::channel(0u64)).unzip();
        let mut tasks = Vec::new();
        for (queue_idx, receiver) in receivers.into_iter().enumerate() {
            tasks.push(tokio::spawn(consume_round(
                broker.addr,
                oracle.clone(),
                queue_idx,
                round + 1,
                receiver,
            )));
        }
        for cycle in PUBLISHER_CYCLES {
            tasks.push(tokio::spawn(publish_round(
                broker.addr,
                oracle.clone(),
                cycle,
                // Bounded: together they can publish twice what the trigger needs.
                u64::try_from(trigger).unwrap(),
                senders.clone(),
            )));
        }
        drop(senders);
        let mut backlog = oracle.backlog.subscribe();
        // (The watch's `Ref` is dropped at once: held, it would block every publisher.)
        let reached = matches!(
            tokio::time::timeout(PHASE, backlog.wait_for(|n_backlog| *n_backlog >= trigger)).await,
            Ok(Ok(_))
        );
        let at_kill = *oracle.backlog.borrow();
        assert!(
            reached,
            "round {}: the backlog reached {at_kill} messages, not {trigger}, within {PHASE:?} \
             (seed {seed})\n{}",
            round + 1,
            warnings(&broker, 10)
        );
        // Publishers and consumers are running: kill now.
        broker.kill();
        for (task_idx, task) in tasks.into_iter().enumerate() {
            tokio::time::timeout(DEADLINE, task)
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "task {task_idx} of round {} did not end once its broker was gone",
                        round + 1
                    )
                })
                .expect("a round's task does not panic");
        }
        let line = format!(
            "round {}: killed at a backlog of {at_kill} messages ({} MB) after {:?}",
            round + 1,
            at_kill * ROUND_BODY_BYTES as i64 / MB as i64,
            round_started.elapsed()
        );
        eprintln!("kill -9 rounds: {line}");
        history.push(line);
    }

    let broker = start_and_check(dir.path(), &oracle, n_rounds + 1, &mut history, seed).await;
    let client = connect(broker.addr).await;
    let mut n_recovered = 0u64;
    for (queue_idx, spec) in SPECS.iter().enumerate() {
        let session = format!("final drain of {}", spec.name);
        let mut order = OrderCheck::default();
        n_recovered += drain(&client, spec.name, |delivered, redelivered| {
            let (message_idx, priority) = oracle.check(queue_idx, delivered, redelivered, DRAINED);
            order.see(&session, priority, message_idx, &oracle.queues[queue_idx]);
        })
        .await;
    }
    client.close().await.unwrap();
    broker.terminate(STOP);

    let mut failures = Vec::new();
    let (mut n_published, mut n_confirmed, mut n_acked, mut n_lost) = (0, 0, 0, 0);
    for (queue_idx, spec) in SPECS.iter().enumerate() {
        let tally = oracle.queues[queue_idx].lock().unwrap();
        let lost: Vec<u64> = tally
            .flags
            .iter()
            .enumerate()
            .filter(|(_, flags)| **flags & (CONFIRMED | ACK_SENT | DRAINED) == CONFIRMED)
            .map(|(message_idx, _)| message_idx as u64)
            .collect();
        eprintln!(
            "kill -9 rounds: {}: published {}, confirmed {}, acks sent {}, lost {}, \
             unflagged duplicates {}, corrupt {}, order breaks {}, refused {}",
            spec.name,
            tally.flags.len(),
            tally.n_confirmed,
            tally.n_ack_sent,
            lost.len(),
            tally.n_unflagged_duplicates,
            tally.n_corrupt,
            tally.order_breaks.len(),
            tally.refused.len()
        );
        n_published += tally.flags.len() as u64;
        n_confirmed += tally.n_confirmed;
        n_acked += tally.n_ack_sent;
        n_lost += lost.len() as u64;
        if !lost.is_empty() {
            failures.push(format!(
                "{}: {} confirmed and unacked messages lost, first {:?}",
                spec.name,
                lost.len(),
                &lost[..lost.len().min(10)]
            ));
        }
        if tally.n_unflagged_duplicates > 0 {
            failures.push(format!(
                "{}: {} repeated deliveries without the redelivered flag",
                spec.name, tally.n_unflagged_duplicates
            ));
        }
        if tally.n_corrupt > 0 {
            failures.push(format!(
                "{}: {} deliveries not as published",
                spec.name, tally.n_corrupt
            ));
        }
        if !tally.order_breaks.is_empty() {
            failures.push(format!(
                "{}: order broken: {:?}",
                spec.name, tally.order_breaks
            ));
        }
        if !tally.refused.is_empty() {
            failures.push(format!(
                "{}: publishes refused: {:?}",
                spec.name, tally.refused
            ));
        }
    }
    eprintln!(
        "kill -9 rounds: published {n_published}, confirmed {n_confirmed}, acks sent {n_acked}, \
         recovered at the end {n_recovered}, lost {n_lost} ({:?} total)",
        test_started.elapsed()
    );
    assert!(
        n_confirmed * ROUND_BODY_BYTES as u64 >= backlog_mb * MB,
        "too few confirms to prove anything"
    );
    assert!(
        failures.is_empty(),
        "seed {seed}:\n{}\n{}",
        failures.join("\n"),
        history.join("\n")
    );
}

// -------------------------------------------------------------------------------------------
// 3. One broker per data directory.

/// A file or directory of a data dir, as far as a change would show.
#[derive(Debug, PartialEq, Eq)]
struct Entry {
    is_dir: bool,
    len: u64,
    modified: Option<SystemTime>,
    /// Of the content (files only).
    hash: u64,
}

/// Every file and directory under `dir` (relative paths), with size, mtime and content hash.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Entry> {
    let mut entries = BTreeMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        for item in std::fs::read_dir(&current).unwrap() {
            let item = item.unwrap();
            let path = item.path();
            let metadata = item.metadata().unwrap();
            let mut hasher = DefaultHasher::new();
            if metadata.is_dir() {
                pending.push(path.clone());
            } else {
                hasher.write(&std::fs::read(&path).unwrap());
            }
            entries.insert(
                path.strip_prefix(dir).unwrap().to_path_buf(),
                Entry {
                    is_dir: metadata.is_dir(),
                    len: metadata.len(),
                    modified: metadata.modified().ok(),
                    hash: hasher.finish(),
                },
            );
        }
    }
    entries
}

fn changes(before: &BTreeMap<PathBuf, Entry>, after: &BTreeMap<PathBuf, Entry>) -> Vec<String> {
    let mut changes = Vec::new();
    for (path, entry) in before {
        match after.get(path) {
            None => changes.push(format!("removed {}", path.display())),
            Some(now) if now != entry => {
                changes.push(format!("changed {}: {entry:?} -> {now:?}", path.display()))
            }
            Some(_) => {}
        }
    }
    for (path, entry) in after {
        if !before.contains_key(path) {
            changes.push(format!("created {}: {entry:?}", path.display()));
        }
    }
    changes
}

/// Whether `text` holds `number` as a whole number (not part of a longer one).
fn mentions_number(text: &str, number: u32) -> bool {
    text.split(|c: char| !c.is_ascii_digit())
        .any(|token| token == number.to_string())
}

/// A second broker on a data dir in use must refuse to start before it touches anything in it:
/// exit promptly, non-zero, saying which directory and which process holds it, every file
/// and directory in it unchanged; the first broker keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_broker_on_a_locked_data_dir_refuses_to_start_and_writes_nothing() {
    const QUEUE: &str = "scale-locked";
    let test_started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let first = process::spawn(dir.path());
    let first_pid = first.child.id();
    let client = connect(first.addr).await;
    client.declare_queue(QUEUE).durable(true).await.unwrap();
    for idx in 0..100u64 {
        let durability = client
            .publish(
                "",
                QUEUE,
                Message::new(body(idx, 0, idx, 64)).persistent(true),
            )
            .await
            .unwrap();
        assert_eq!(durability, Durability::Fsynced);
    }
    // Everything the first broker wrote is confirmed; idle, it writes nothing more.
    let before = snapshot(dir.path());

    let mut second = process::start(dir.path(), &[]);
    let second_started = Instant::now();
    let start = second.wait_start(DEADLINE);
    let second_ran_for = second_started.elapsed();
    let second_log = second.log_tail(20);
    let second_lines = second.log_lines();
    // Stopped (if it is running) before looking, so that it writes nothing meanwhile.
    drop(second);
    let changed = changes(&before, &snapshot(dir.path()));
    eprintln!(
        "locked data dir: second broker: {start:?} after {second_ran_for:?}; {} changes in the \
         data dir",
        changed.len()
    );
    let status = match start {
        Start::Exited(Some(status)) => status,
        other => panic!(
            "a second broker on {} (in use by pid {first_pid}) must exit at once, but: {other:?}; \
             changes it made in the data dir: {changed:#?}\n{second_log}",
            dir.path().display()
        ),
    };
    assert!(
        !status.success(),
        "the second broker must exit non-zero, not {status}\n{second_log}"
    );
    assert!(
        second_ran_for < Duration::from_secs(5),
        "the second broker took {second_ran_for:?} to give up"
    );
    let canonical = std::fs::canonicalize(dir.path()).unwrap();
    let names_dir = |line: &String| {
        line.contains(&*dir.path().to_string_lossy())
            || line.contains(&*canonical.to_string_lossy())
    };
    assert!(
        second_lines.iter().any(names_dir),
        "the second broker's error must name the data directory {}\n{second_log}",
        dir.path().display()
    );
    assert!(
        second_lines
            .iter()
            .any(|line| mentions_number(line, first_pid)
                && (names_dir(line) || line.to_lowercase().contains("pid"))),
        "the second broker's error must name the pid holding the directory ({first_pid})\n\
         {second_log}"
    );
    assert!(
        changed.is_empty(),
        "the second broker changed the data dir: {changed:#?}"
    );

    // The first broker still serves, with everything it had.
    let durability = client
        .publish("", QUEUE, Message::new("after").persistent(true))
        .await
        .unwrap();
    assert_eq!(durability, Durability::Fsynced);
    assert_eq!(n_queued(first.addr, QUEUE).await, Ok(101));
    client.close().await.unwrap();
    first.terminate(STOP);
    eprintln!("locked data dir: {:?} total", test_started.elapsed());
}

// -------------------------------------------------------------------------------------------
// 4. The log's disk use with a large backlog that never moves and heavy churn next to it.

/// Bytes of the data dir outside its spool directory: the log (`wal/`) and whatever else the
/// broker keeps durably. The spool is memory that overflowed, not durable state.
fn log_bytes(dir: &Path) -> u64 {
    let mut n_bytes = 0;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        let Ok(items) = std::fs::read_dir(&current) else {
            continue;
        };
        for item in items.flatten() {
            let path = item.path();
            if current == dir && item.file_name() == "spool" {
                continue;
            }
            // Files may be deleted while walking: skip what is gone.
            let Ok(metadata) = item.metadata() else {
                continue;
            };
            if metadata.is_dir() {
                pending.push(path);
            } else {
                n_bytes += metadata.len();
            }
        }
    }
    n_bytes
}

/// Files of the data dir outside its spool directory.
fn log_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        for item in std::fs::read_dir(&current).unwrap().flatten() {
            let path = item.path();
            if current == dir && item.file_name() == "spool" {
                continue;
            }
            if path.is_dir() {
                pending.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// A durable priority queue holding 80 MB (before issue #16's fix it never paged, so every
/// checkpoint held it whole; it now pages past 64 MiB like any durable queue) while `WHARF_SCALE_CHURN_MB` (default 400) churn through another
/// durable queue: checkpoints must complete (a log file written before the churn is deleted)
/// and, once the churn stops, the log settles within the bound its checkpoint rule implies
/// (below).
///
/// The churn is 400 MB rather than the 200 MB because only past about 300 MB can the
/// bound fail at all: 80 MB + 200 MB of log fit under it even if no checkpoint ever
/// completes. (With 200 MB, only the deleted-file check catches a broker that never
/// completes a checkpoint.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_priority_queue_backlog_with_churn_keeps_the_data_dir_bounded() {
    const HELD: &str = "scale-held";
    const CHURN: &str = "scale-churn";
    const N_HELD: u64 = 80_000;
    const HELD_BODY_BYTES: usize = 1_000;
    const CHURN_BODY_BYTES: usize = 16 * 1024;
    let test_started = Instant::now();
    let churn_mb = env_u64("WHARF_SCALE_CHURN_MB", 400);
    let seed = seed("priority backlog with churn");
    let dir = tempfile::tempdir().unwrap();
    let broker = process::spawn_with(dir.path(), &[], STARTUP);
    let client = connect(broker.addr).await;
    client
        .declare_queue(HELD)
        .durable(true)
        .max_priority(9)
        .await
        .unwrap();
    client.declare_queue(CHURN).durable(true).await.unwrap();
    let (n_fsynced, first_other) = publish_all(
        &client.publisher_with_window(4_096),
        HELD,
        N_HELD,
        4_096,
        |idx| {
            Message::new(body(seed, 0, idx, HELD_BODY_BYTES))
                .persistent(true)
                .priority(priority_of(seed, 0, idx))
        },
    )
    .await;
    assert_eq!(
        n_fsynced, N_HELD,
        "every publish must be confirmed Fsynced; first other outcome: {first_other:?}"
    );
    let files_after_fill = log_files(dir.path());
    let bytes_after_fill = log_bytes(dir.path());

    // The bound. `live` is the durable live state as the broker's checkpoint rule counts it:
    // each held message's body plus 64 bytes. A checkpoint is due once the log written since
    // the last one reaches max(checkpoint_bytes, 2 x live) (docs/durability.md), and once it is
    // on disk every older record is released. So once the churn has stopped and the last
    // checkpoint has finished, the log holds the last checkpoint (live), the log since it
    // (< max(checkpoint_bytes, 2 x live)), and at most two segments of slack (the oldest
    // segment, partly records superseded before the checkpoint's begin, and the one being
    // written):
    //   bound = live + max(checkpoint_bytes, 2 x live) + 2 x segment_bytes
    //         = 3 x live + 2 segments of 64 MiB here (live >= 32 MiB).
    // While a checkpoint is being written the log holds more: one more copy of the live state
    // and whatever the churn appends meanwhile, which depends on how fast the checkpoint is
    // written next to the churn; that peak is printed, not asserted.
    let live = N_HELD * (HELD_BODY_BYTES as u64 + 64);
    let bound = live + CHECKPOINT_BYTES.max(2 * live) + 2 * SEGMENT_BYTES;
    eprintln!(
        "priority backlog with churn: {N_HELD} x {HELD_BODY_BYTES} B held (live {} MB, log {} MB \
         in {} files) after {:?}; churning {churn_mb} MB in {CHURN_BODY_BYTES} B messages; \
         bound {} MB",
        live / MB,
        bytes_after_fill / MB,
        files_after_fill.len(),
        test_started.elapsed(),
        bound / MB
    );

    let n_churn = churn_mb * MB / CHURN_BODY_BYTES as u64;
    let churn_publisher = {
        let client = connect(broker.addr).await;
        tokio::spawn(async move {
            let publisher = client.publisher_with_window(256);
            let result = publish_all(&publisher, CHURN, n_churn, 256, |idx| {
                Message::new(body(seed, 1, idx, CHURN_BODY_BYTES)).persistent(true)
            })
            .await;
            let _ = client.close().await;
            result
        })
    };
    let churn_consumer = {
        let client = connect(broker.addr).await;
        tokio::spawn(async move {
            let mut consumer = client
                .consume(
                    CHURN,
                    ConsumeOptions {
                        prefetch: 256,
                        auto_ack: false,
                        ..ConsumeOptions::default()
                    },
                )
                .await
                .expect("consume the churn queue");
            let mut n_acked = 0u64;
            while n_acked < n_churn {
                match consumer.next().await {
                    Some(Ok(delivery)) => {
                        delivery.ack().await.expect("ack");
                        n_acked += 1;
                    }
                    other => panic!("the churn consumer ended after {n_acked}: {other:?}"),
                }
            }
            let _ = client.close().await;
            n_acked
        })
    };

    // The log's size while the churn runs (its peak is reported).
    let mut peak = bytes_after_fill;
    let mut sample = tokio::time::interval(Duration::from_millis(50));
    let churn_deadline = tokio::time::Instant::now() + PHASE;
    while !(churn_publisher.is_finished() && churn_consumer.is_finished()) {
        assert!(
            tokio::time::Instant::now() < churn_deadline,
            "the churn did not finish within {PHASE:?}\n{}",
            warnings(&broker, 10)
        );
        sample.tick().await;
        peak = peak.max(log_bytes(dir.path()));
    }
    let (n_churn_fsynced, churn_other) = churn_publisher.await.unwrap();
    let n_churn_acked = churn_consumer.await.unwrap();
    let churned_at = test_started.elapsed();
    assert_eq!(
        n_churn_fsynced, n_churn,
        "every churn publish confirmed Fsynced; first other outcome: {churn_other:?}"
    );

    // Then, within a deadline: a log file written before the churn is gone (a checkpoint
    // completed and its older records were released), and the log is within the bound (a
    // checkpoint still running when the churn stopped has finished).
    let settle_deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let (released, at_rest) = loop {
        let now = log_files(dir.path());
        let gone: Vec<&PathBuf> = files_after_fill
            .iter()
            .filter(|file| !now.contains(file))
            .collect();
        let n_bytes = log_bytes(dir.path());
        peak = peak.max(n_bytes);
        let released = (!gone.is_empty()).then(|| format!("{gone:?}"));
        if (released.is_some() && n_bytes <= bound)
            || tokio::time::Instant::now() >= settle_deadline
        {
            break (released, n_bytes);
        }
        sample.tick().await;
    };
    let held = n_queued(broker.addr, HELD).await;
    eprintln!(
        "priority backlog with churn: churned {n_churn_fsynced} confirmed / {n_churn_acked} acked \
         of {n_churn} in {churned_at:?}; log after the fill {} MB, peak {} MB, settled at {} MB \
         (bound {} MB); log files written before the churn and since deleted: {}; held queue: \
         {held:?} ({:?} total)",
        bytes_after_fill / MB,
        peak / MB,
        at_rest / MB,
        bound / MB,
        released.as_deref().unwrap_or("none"),
        test_started.elapsed()
    );
    assert_eq!(held, Ok(N_HELD), "the held queue keeps every message");
    let mut failures = Vec::new();
    if released.is_none() {
        failures.push(format!(
            "no checkpoint completed: none of the {} log files written before {churn_mb} MB of \
             churn was deleted within 30 s after it",
            files_after_fill.len()
        ));
    }
    if at_rest > bound {
        failures.push(format!(
            "30 s after the churn the log holds {at_rest} B, above live + max(checkpoint_bytes, \
             2 x live) + 2 x segment_bytes = {bound} B (live = {live} B: {N_HELD} held messages \
             x ({HELD_BODY_BYTES} + 64) B; checkpoint_bytes = segment_bytes = {SEGMENT_BYTES} B)"
        ));
    }
    assert!(
        failures.is_empty(),
        "{} (log: {} MB after the fill, peak {} MB, {} MB at the end)\n{}",
        failures.join("\n"),
        bytes_after_fill / MB,
        peak / MB,
        at_rest / MB,
        warnings(&broker, 10)
    );
    client.close().await.unwrap();
    broker.terminate(STOP);
}
