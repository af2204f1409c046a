//! Real process crashes: start `wharf serve`, publish persistent messages with confirms while
//! a consumer acks, `kill -9` the server at a random moment, restart on the same data dir,
//! repeat; then drain and check: no confirmed message lost, and every repeated delivery of a
//! message is flagged redelivered. A `kill -9` keeps the page cache, so this tests crash
//! consistency of the log, not fsync (crates/wharf-server/tests/power_loss.rs does that).
//!
//! Rounds: `WHARF_CRASH_ROUNDS` (default 10; `cargo xtask crash --rounds N`). Prints the seed;
//! `WHARF_SEED=n` replays the same kill timings.

mod common;

use common::DEADLINE;
use common::process::spawn;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use wharf_client::{Client, ConsumeOptions, Durability, Message};
use wharf_storage::SplitMix64;

const QUEUE: &str = "crash-test";

#[derive(Default)]
struct Seen {
    confirmed: BTreeSet<u64>,
    /// Every delivery of every message: (redelivered flag) in order.
    deliveries: BTreeMap<u64, Vec<bool>>,
    published: u64,
}

fn body_id(body: &[u8]) -> u64 {
    u64::from_be_bytes(body[..8].try_into().unwrap())
}

async fn round(
    addr: SocketAddr,
    seen: Arc<Mutex<Seen>>,
    next_id: Arc<Mutex<u64>>,
    run_for: Duration,
) {
    let Ok(client) = Client::connect(&addr.to_string()).await else {
        return;
    };
    if client.declare_queue(QUEUE).durable(true).await.is_err() {
        return;
    }
    let publisher = {
        let (client, seen, next_id) = (client.clone(), seen.clone(), next_id.clone());
        tokio::spawn(async move {
            let publisher = client.publisher_with_window(256);
            let mut tickets = Vec::new();
            // Bounded per round so the final drain stays short; the kill still lands mid-flight.
            for _ in 0..60_000 {
                let id = {
                    let mut next = next_id.lock().unwrap();
                    *next += 1;
                    *next
                };
                let mut body = id.to_be_bytes().to_vec();
                body.extend_from_slice(&[0u8; 92]);
                seen.lock().unwrap().published += 1;
                match publisher
                    .publish("", QUEUE, Message::new(body).persistent(true))
                    .await
                {
                    Ok(ticket) => tickets.push((id, ticket)),
                    Err(_) => break,
                }
                // Harvest finished confirms without blocking the pipeline.
                while tickets.len() > 512 {
                    let (id, ticket) = tickets.remove(0);
                    match ticket.await {
                        Ok(Durability::Fsynced) => {
                            seen.lock().unwrap().confirmed.insert(id);
                        }
                        _ => return,
                    }
                }
            }
            for (id, ticket) in tickets {
                if let Ok(Durability::Fsynced) = ticket.await {
                    seen.lock().unwrap().confirmed.insert(id);
                }
            }
        })
    };
    let consumer = {
        let seen = seen.clone();
        tokio::spawn(async move {
            let Ok(mut consumer) = client
                .consume(
                    QUEUE,
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
            while let Some(Ok(delivery)) = consumer.next().await {
                let id = body_id(delivery.body());
                seen.lock()
                    .unwrap()
                    .deliveries
                    .entry(id)
                    .or_default()
                    .push(delivery.redelivered());
                if delivery.ack().await.is_err() {
                    break;
                }
            }
        })
    };
    tokio::time::sleep(run_for).await;
    // The kill happens while both tasks are busy; they end when the connection drops.
    let _ = (publisher, consumer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_dash_nine_loses_no_confirmed_message() {
    let rounds: u64 = std::env::var("WHARF_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let seed: u64 = std::env::var("WHARF_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("crash test: {rounds} rounds, seed {seed} (replay with WHARF_SEED={seed})");
    let mut rng = SplitMix64::new(seed);
    let dir = tempfile::tempdir().unwrap();
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let next_id: Arc<Mutex<u64>> = Arc::default();
    for _ in 0..rounds {
        let mut broker = spawn(dir.path());
        let run_for = Duration::from_millis(20 + rng.below(200));
        round(broker.addr, seen.clone(), next_id.clone(), run_for).await;
        broker.child.kill().expect("kill -9");
        broker.child.wait().expect("reaped");
    }
    // Drain what is left.
    let mut broker = spawn(dir.path());
    let client = Client::connect(&broker.addr.to_string()).await.unwrap();
    client.declare_queue(QUEUE).durable(true).await.unwrap();
    let mut consumer = client
        .consume(
            QUEUE,
            ConsumeOptions {
                prefetch: 500,
                auto_ack: false,
                ..ConsumeOptions::default()
            },
        )
        .await
        .unwrap();
    let mut recovered = 0u64;
    let deadline = tokio::time::Instant::now() + DEADLINE * 3;
    loop {
        if client.queue_stats(QUEUE).await.unwrap().ready == 0
            && client.queue_stats(QUEUE).await.unwrap().unacked == 0
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "drain did not finish"
        );
        match tokio::time::timeout(Duration::from_millis(200), consumer.next()).await {
            Ok(Some(Ok(delivery))) => {
                recovered += 1;
                let id = body_id(delivery.body());
                seen.lock()
                    .unwrap()
                    .deliveries
                    .entry(id)
                    .or_default()
                    .push(delivery.redelivered());
                delivery.ack().await.unwrap();
            }
            Ok(other) => panic!("consumer ended: {other:?}"),
            Err(_) => {}
        }
    }
    client.close().await.unwrap();
    broker.child.kill().unwrap();
    broker.child.wait().unwrap();

    let seen = seen.lock().unwrap();
    let lost: Vec<u64> = seen
        .confirmed
        .iter()
        .copied()
        .filter(|id| !seen.deliveries.contains_key(id))
        .collect();
    let unflagged_duplicates: Vec<u64> = seen
        .deliveries
        .iter()
        .filter(|(_, flags)| flags.iter().skip(1).any(|redelivered| !redelivered))
        .map(|(id, _)| *id)
        .collect();
    let invented: Vec<u64> = seen
        .deliveries
        .keys()
        .copied()
        .filter(|id| *id == 0 || *id > *next_id.lock().unwrap())
        .collect();
    eprintln!(
        "crash test: published {}, confirmed {}, delivered {} distinct, recovered at the end {recovered}, lost {}, unflagged duplicates {}",
        seen.published,
        seen.confirmed.len(),
        seen.deliveries.len(),
        lost.len(),
        unflagged_duplicates.len()
    );
    assert!(
        seen.confirmed.len() as u64 > rounds * 10,
        "too few confirms to prove anything"
    );
    assert!(
        lost.is_empty(),
        "confirmed messages lost: {lost:?} (seed {seed})"
    );
    assert!(
        unflagged_duplicates.is_empty(),
        "duplicates without the redelivered flag: {unflagged_duplicates:?} (seed {seed})"
    );
    assert!(invented.is_empty(), "invented: {invented:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_every_connection_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = spawn(dir.path());
    let client = Client::connect(&broker.addr.to_string()).await.unwrap();
    client.declare_queue("q").durable(true).await.unwrap();
    client
        .publish("", "q", Message::new("kept").persistent(true))
        .await
        .unwrap();
    let mut raw = common::Raw::open(broker.addr).await;
    let status = Command::new("kill")
        .args(["-TERM", &broker.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let close = raw.expect_close().await;
    assert_eq!(close.code, wharf_protocol::ErrorCode::ConnectionForced);
    let deadline = std::time::Instant::now() + DEADLINE;
    let exit = loop {
        if let Some(exit) = broker.child.try_wait().unwrap() {
            break exit;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the broker did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(exit.code(), Some(0), "graceful shutdown exits 0");
    // What was confirmed is there after the restart.
    let mut broker = spawn(dir.path());
    let client = Client::connect(&broker.addr.to_string()).await.unwrap();
    assert_eq!(client.queue_stats("q").await.unwrap().ready, 1);
    broker.child.kill().unwrap();
    broker.child.wait().unwrap();
}
