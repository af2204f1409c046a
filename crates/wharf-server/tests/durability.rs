//! Durability through the real server and client: restarts keep durable topology and
//! persistent messages, drop transient ones; a failed fsync stops the broker with nothing more
//! confirmed; a full disk refuses persistent publishes while everyone else is still served.

mod common;

use common::DEADLINE;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use wharf_client::{Client, ConsumeOptions, Consumer, Delivery, Durability, ExchangeKind, Message};
use wharf_protocol::ErrorCode;
use wharf_server::{RunningServer, ServerConfig};
use wharf_storage::{Fault, MemStorage};

async fn start(dir: &Path) -> RunningServer {
    RunningServer::start(ServerConfig::ephemeral(dir))
        .await
        .expect("server starts")
}

async fn start_on(storage: MemStorage, dir: &Path) -> RunningServer {
    RunningServer::start_with_storage(ServerConfig::ephemeral(dir), Arc::new(storage))
        .await
        .expect("server starts")
}

async fn connect(server: &RunningServer) -> Client {
    Client::connect(&server.addr.to_string())
        .await
        .expect("connect")
}

async fn next(consumer: &mut Consumer) -> Delivery {
    tokio::time::timeout(DEADLINE, consumer.next())
        .await
        .expect("in time")
        .expect("open")
        .expect("ok")
}

fn manual(prefetch: u32) -> ConsumeOptions {
    ConsumeOptions {
        prefetch,
        auto_ack: false,
        ..ConsumeOptions::default()
    }
}

#[tokio::test]
async fn restart_keeps_durable_topology_and_persistent_messages_and_drops_transient_ones() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let client = connect(&server).await;
    client.declare_queue("orders").durable(true).await.unwrap();
    client.declare_queue("scratch").await.unwrap();
    client
        .declare_exchange("shop", ExchangeKind::Topic)
        .durable(true)
        .await
        .unwrap();
    client
        .bind_queue("orders", "shop", "order.#")
        .await
        .unwrap();
    client
        .bind_queue("scratch", "shop", "order.#")
        .await
        .unwrap();
    for idx in 0..5 {
        let durability = client
            .publish(
                "shop",
                "order.created",
                Message::new(format!("persistent-{idx}"))
                    .persistent(true)
                    .message_id(format!("o-{idx}")),
            )
            .await
            .unwrap();
        assert_eq!(
            durability,
            Durability::Fsynced,
            "a persistent message in a durable queue is confirmed after fsync"
        );
    }
    let transient = client
        .publish("", "orders", Message::new("transient"))
        .await
        .unwrap();
    assert_eq!(transient, Durability::InMemory);
    let mut consumer = client.consume("orders", manual(2)).await.unwrap();
    for expected in ["persistent-0", "persistent-1"] {
        let delivery = next(&mut consumer).await;
        assert_eq!(delivery.body(), expected.as_bytes());
        delivery.ack().await.unwrap();
    }
    // The acks are fire-and-forget: wait until the broker has applied them.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while client.queue_stats("orders").await.unwrap().unacked != 2
        || client.queue_stats("orders").await.unwrap().ready != 2
    {
        assert!(tokio::time::Instant::now() < deadline, "acks applied");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    client.close().await.unwrap();
    drop(consumer);
    server.stop().await.unwrap();

    let server = start(dir.path()).await;
    let client = connect(&server).await;
    let queues = client.list_queues().await.unwrap();
    assert_eq!(
        queues.iter().map(|q| q.name.as_str()).collect::<Vec<_>>(),
        vec!["orders"],
        "transient queue gone"
    );
    // 3 unacked persistent + 2 outstanding at shutdown came back; the transient message is gone.
    assert_eq!(queues[0].ready, 3, "{queues:?}");
    let exchanges = client.list_exchanges().await.unwrap();
    assert!(exchanges.iter().any(|e| e.name == "shop" && e.durable));
    let mut consumer = client.consume("orders", manual(10)).await.unwrap();
    let mut bodies = Vec::new();
    for _ in 0..3 {
        let delivery = next(&mut consumer).await;
        assert!(
            delivery.redelivered(),
            "recovered messages are flagged redelivered"
        );
        assert_eq!(
            delivery.properties().message_id().map(str::to_owned),
            Some(format!("o-{}", bodies.len() + 2))
        );
        bodies.push(String::from_utf8(delivery.body().to_vec()).unwrap());
        delivery.ack().await.unwrap();
    }
    assert_eq!(
        bodies,
        vec!["persistent-2", "persistent-3", "persistent-4"],
        "arrival order kept"
    );
    client
        .publish(
            "shop",
            "order.paid",
            Message::new("after restart").persistent(true),
        )
        .await
        .unwrap();
    let delivery = next(&mut consumer).await;
    assert_eq!(
        delivery.body().as_ref(),
        b"after restart",
        "the durable binding was restored"
    );
    delivery.ack().await.unwrap();
    client.close().await.unwrap();
    server.stop().await.unwrap();
}

#[tokio::test]
async fn deleted_durable_queues_and_acked_messages_stay_gone_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let client = connect(&server).await;
    client.declare_queue("doomed").durable(true).await.unwrap();
    client.declare_queue("kept").durable(true).await.unwrap();
    client
        .publish("", "doomed", Message::new("x").persistent(true))
        .await
        .unwrap();
    client
        .publish("", "kept", Message::new("y").persistent(true))
        .await
        .unwrap();
    client.delete_queue("doomed").await.unwrap();
    client.purge_queue("kept").await.unwrap();
    client.close().await.unwrap();
    server.stop().await.unwrap();
    for _ in 0..2 {
        let server = start(dir.path()).await;
        let client = connect(&server).await;
        let queues = client.list_queues().await.unwrap();
        assert_eq!(queues.len(), 1, "{queues:?}");
        assert_eq!((queues[0].name.as_str(), queues[0].ready), ("kept", 0));
        client.close().await.unwrap();
        server.stop().await.unwrap();
    }
}

#[tokio::test]
async fn a_failed_fsync_stops_the_broker_and_confirms_nothing_more() {
    let dir = tempfile::tempdir().unwrap();
    let storage = MemStorage::new(1);
    let server = start_on(storage.clone(), dir.path()).await;
    let client = connect(&server).await;
    client.declare_queue("q").durable(true).await.unwrap();
    client
        .publish("", "q", Message::new("before").persistent(true))
        .await
        .unwrap();
    storage.fail_sync(1, Fault::Eio);
    let outcome = client
        .publish("", "q", Message::new("after").persistent(true))
        .await;
    assert!(
        outcome.is_err(),
        "no confirm once an fsync failed: {outcome:?}"
    );
    let stopped = tokio::time::timeout(DEADLINE, server.task)
        .await
        .expect("the broker stops by itself")
        .unwrap();
    let err = stopped.expect_err("the broker reports the failure");
    assert!(err.to_string().contains("log failure"), "{err}");
    // After the power goes too, what was confirmed before the failure is intact. The message
    // whose fsync failed was never confirmed: the crash may have kept or dropped its write.
    storage.clear_faults();
    storage.crash();
    let server = start_on(storage, dir.path()).await;
    let client = connect(&server).await;
    let ready = client.queue_stats("q").await.unwrap().ready;
    assert!((1..=2).contains(&ready), "{ready}");
    let mut consumer = client.consume("q", manual(10)).await.unwrap();
    assert_eq!(next(&mut consumer).await.body().as_ref(), b"before");
    if ready == 2 {
        assert_eq!(
            next(&mut consumer).await.body().as_ref(),
            b"after",
            "nothing invented"
        );
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_full_disk_refuses_persistent_publishes_while_transient_traffic_and_consumers_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let storage = MemStorage::new(2);
    let server = start_on(storage.clone(), dir.path()).await;
    let client = connect(&server).await;
    client.declare_queue("durable").durable(true).await.unwrap();
    client.declare_queue("plain").await.unwrap();
    client
        .publish("", "durable", Message::new("kept").persistent(true))
        .await
        .unwrap();
    storage.fail_write(1, Fault::NoSpace);
    let err = client
        .publish("", "durable", Message::new("refused").persistent(true))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::ResourceLimit), "{err}");
    let err = client
        .publish(
            "",
            "durable",
            Message::new("still refused").persistent(true),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("disk"), "{err}");
    client
        .publish("", "plain", Message::new("transient ok"))
        .await
        .unwrap();
    let mut consumer = client.consume("plain", manual(1)).await.unwrap();
    assert_eq!(
        next(&mut consumer).await.body().as_ref(),
        b"transient ok",
        "consumers are still served"
    );
    storage.clear_faults();
    // Once space is back (after a short backoff), persistent publishes are accepted again.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        match client
            .publish("", "durable", Message::new("after").persistent(true))
            .await
        {
            Ok(durability) => {
                assert_eq!(durability, Durability::Fsynced);
                break;
            }
            Err(err) => assert_eq!(err.code(), Some(ErrorCode::ResourceLimit), "{err}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "persistent publishes never resumed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_log_damaged_in_the_middle_refuses_to_start_naming_the_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let client = connect(&server).await;
    client.declare_queue("q").durable(true).await.unwrap();
    for idx in 0..50 {
        client
            .publish(
                "",
                "q",
                Message::new(format!("message {idx}")).persistent(true),
            )
            .await
            .unwrap();
    }
    client.close().await.unwrap();
    server.stop().await.unwrap();
    // Flip one byte a third of the way into the log: valid records follow the damage, so this
    // is not a torn tail and must not be silently cut.
    let segment = std::fs::read_dir(dir.path().join("wal"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "wal"))
        .min()
        .expect("a segment file");
    let mut bytes = std::fs::read(&segment).unwrap();
    let at = bytes.len() / 3;
    bytes[at] ^= 0xff;
    std::fs::write(&segment, &bytes).unwrap();
    let err = RunningServer::start(ServerConfig::ephemeral(dir.path()))
        .await
        .expect_err("refuses to start");
    let text = err.to_string();
    let file_name = segment.file_name().unwrap().to_string_lossy().to_string();
    assert!(text.contains(&file_name), "names the segment: {text}");
    assert!(text.contains("offset"), "names the offset: {text}");
}

#[tokio::test]
async fn delayed_messages_dedup_windows_and_dead_letters_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let client = connect(&server).await;
    client
        .declare_queue("orders.dead")
        .durable(true)
        .await
        .unwrap();
    client
        .declare_queue("orders")
        .durable(true)
        .dedup_window(Duration::from_secs(600))
        .dead_letter_exchange("")
        .dead_letter_routing_key("orders.dead")
        .await
        .unwrap();
    let delay = Duration::from_millis(1_500);
    let published_at = std::time::Instant::now();
    client
        .publish(
            "",
            "orders",
            Message::new("later").persistent(true).delay(delay),
        )
        .await
        .unwrap();
    for (body, id) in [("consumed", "order-1"), ("rejected", "order-2")] {
        client
            .publish(
                "",
                "orders",
                Message::new(body).persistent(true).message_id(id),
            )
            .await
            .unwrap();
    }
    let mut consumer = client.consume("orders", manual(10)).await.unwrap();
    let consumed = next(&mut consumer).await;
    assert_eq!(consumed.body().as_ref(), b"consumed");
    consumed.ack().await.unwrap();
    let rejected = next(&mut consumer).await;
    rejected.reject().await.unwrap();
    consumer.cancel().await.unwrap();
    client.close().await.unwrap();
    server.stop().await.unwrap();

    let server = start(dir.path()).await;
    let client = connect(&server).await;
    let stats = client.queue_stats_v2("orders").await.unwrap();
    assert_eq!((stats.delayed, stats.ready), (1, 0), "{stats:?}");
    assert_eq!(client.queue_stats_v2("orders.dead").await.unwrap().ready, 1);
    // The dedup window came back: both ids are still duplicates, a new one is not.
    for id in ["order-1", "order-2"] {
        let again = client
            .publish(
                "",
                "orders",
                Message::new("again").persistent(true).message_id(id),
            )
            .await;
        assert!(
            matches!(again, Err(wharf_client::ClientError::Duplicate)),
            "{id}: {again:?}"
        );
    }
    client
        .publish(
            "",
            "orders",
            Message::new("fresh").persistent(true).message_id("order-3"),
        )
        .await
        .unwrap();
    let mut consumer = client.consume("orders", manual(10)).await.unwrap();
    let fresh = next(&mut consumer).await;
    assert_eq!(fresh.body().as_ref(), b"fresh");
    fresh.ack().await.unwrap();
    let later = next(&mut consumer).await;
    assert_eq!(later.body().as_ref(), b"later");
    // The broker's clock counts whole milliseconds: allow one for the truncation.
    assert!(
        published_at.elapsed() + Duration::from_millis(1) >= delay,
        "the delayed message waited out its delay across the restart: {:?}",
        published_at.elapsed()
    );
    later.ack().await.unwrap();
    consumer.cancel().await.unwrap();
    // The dead letter kept its death record and can be redriven after the restart.
    assert_eq!(client.redrive("orders.dead", 0).await.unwrap(), 1);
    let mut consumer = client.consume("orders", manual(10)).await.unwrap();
    let redriven = next(&mut consumer).await;
    assert_eq!(redriven.body().as_ref(), b"rejected");
    redriven.ack().await.unwrap();
    client.close().await.unwrap();
    server.stop().await.unwrap();
}

/// A batch larger than one log record, and than one WAL submission (a whole segment here), is
/// logged whole and confirmed once all of it is on disk; it comes back after a restart, as
/// do the checkpoints written of it. A persistent message too large for any record is refused
/// up front with `ResourceLimit`, and the broker serves on.
#[tokio::test]
async fn batches_past_the_record_and_segment_limits_are_logged_whole_and_oversized_messages_refused()
 {
    let dir = tempfile::tempdir().unwrap();
    let config = || {
        let mut config = ServerConfig::ephemeral(dir.path());
        config.segment_bytes = 64 * 1024;
        config
    };
    let body = |idx: usize| format!("{idx:05}{}", "x".repeat(2_000));
    let server = RunningServer::start(config()).await.unwrap();
    let client = connect(&server).await;
    client.declare_queue("big").durable(true).await.unwrap();
    // 100 x 2 KB in one batch: about three segments' worth.
    let outcomes = client
        .publisher()
        .publish_batch(
            "",
            "big",
            (0..100)
                .map(|idx| Message::new(body(idx)).persistent(true))
                .collect(),
        )
        .await
        .unwrap();
    for outcome in outcomes {
        assert_eq!(outcome.unwrap(), Durability::Fsynced);
    }
    let err = client
        .publish(
            "",
            "big",
            Message::new(vec![7u8; 70 * 1024]).persistent(true),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::ResourceLimit), "{err}");
    assert!(err.to_string().contains("logged"), "{err}");
    // Transient, the same message is fine: it is never logged.
    client
        .publish("", "big", Message::new(vec![7u8; 70 * 1024]))
        .await
        .unwrap();
    server.stop().await.unwrap();
    // Twice: the first restart writes a checkpoint of it all, the second reads it back.
    for _ in 0..2 {
        let server = RunningServer::start(config()).await.unwrap();
        let client = connect(&server).await;
        let stats = client.queue_stats("big").await.unwrap();
        assert_eq!(stats.ready, 100, "{stats:?}");
        server.stop().await.unwrap();
    }
    let server = RunningServer::start(config()).await.unwrap();
    let client = connect(&server).await;
    let mut consumer = client.consume("big", manual(100)).await.unwrap();
    for idx in 0..100 {
        let delivery = next(&mut consumer).await;
        assert_eq!(&delivery.body()[..], body(idx).as_bytes(), "message {idx}");
        delivery.ack().await.unwrap();
    }
    server.stop().await.unwrap();
}
