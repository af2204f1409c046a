//! End to end through the Rust client against the real server on an ephemeral port.

mod common;

use common::{DEADLINE, TestServer, wait_for_stats};
use std::time::Duration;
use wharf_client::{
    Client, ClientError, ConsumeOptions, Consumer, Delivery, ExchangeKind, HeadersMatch, Message,
};
use wharf_protocol::{ErrorCode, Frame};

async fn connect(server: &TestServer) -> Client {
    Client::connect(&server.addr().to_string())
        .await
        .expect("connect")
}

async fn next(consumer: &mut Consumer) -> Delivery {
    tokio::time::timeout(DEADLINE, consumer.next())
        .await
        .expect("a delivery within the deadline")
        .expect("stream open")
        .expect("delivery ok")
}

/// Asserts nothing more arrives for a short while (the broker has nothing to send).
async fn assert_quiet(consumer: &mut Consumer) {
    if let Ok(Some(item)) = tokio::time::timeout(Duration::from_millis(200), consumer.next()).await
    {
        panic!("unexpected delivery: {:?}", item.map(|d| d.body().clone()));
    }
}

fn manual(prefetch: u32) -> ConsumeOptions {
    ConsumeOptions {
        prefetch,
        auto_ack: false,
        ..ConsumeOptions::default()
    }
}

async fn body_of(consumer: &mut Consumer) -> String {
    let delivery = next(consumer).await;
    delivery.ack().await.unwrap();
    String::from_utf8(delivery.body().to_vec()).unwrap()
}

#[tokio::test]
async fn default_exchange_publish_consume_ack_round_trip_with_metadata() {
    let server = TestServer::start().await;
    let client = connect(&server).await;
    client.declare_queue("orders").await.unwrap();
    let message = Message::new("Order 12345")
        .message_id("o-1")
        .content_type("text/plain")
        .correlation_id("c-9")
        .reply_to("replies")
        .priority(3)
        .header("kind", "order")
        .header("attempt", 2i64);
    client
        .publish("", "orders", message)
        .await
        .expect("confirmed");
    let mut consumer = client.consume("orders", manual(10)).await.unwrap();
    let delivery = next(&mut consumer).await;
    assert_eq!(&delivery.body()[..], b"Order 12345");
    assert_eq!(delivery.routing_key(), "orders");
    assert!(!delivery.redelivered());
    assert_eq!(delivery.delivery_count(), 1);
    let properties = delivery.properties();
    assert_eq!(properties.message_id(), Some("o-1"));
    assert_eq!(properties.content_type(), Some("text/plain"));
    assert_eq!(properties.correlation_id(), Some("c-9"));
    assert_eq!(properties.reply_to(), Some("replies"));
    assert_eq!(properties.priority(), 3);
    assert_eq!(
        delivery.header("kind").and_then(|v| v.as_str()),
        Some("order")
    );
    assert_eq!(delivery.header("attempt").and_then(|v| v.as_i64()), Some(2));
    delivery.ack().await.unwrap();
    let stats = wait_for_stats(&client, "orders", |s| s.unacked == 0).await;
    assert_eq!((stats.ready, stats.unacked, stats.consumers), (0, 0, 1));
}

#[tokio::test]
async fn every_exchange_type_routes_end_to_end() {
    let server = TestServer::start().await;
    let client = connect(&server).await;
    for queue in ["direct_q", "fanout_a", "fanout_b", "topic_q", "headers_q"] {
        client.declare_queue(queue).await.unwrap();
    }
    client
        .declare_exchange("d", ExchangeKind::Direct)
        .await
        .unwrap();
    client
        .declare_exchange("f", ExchangeKind::Fanout)
        .await
        .unwrap();
    client
        .declare_exchange("t", ExchangeKind::Topic)
        .await
        .unwrap();
    client
        .declare_exchange("h", ExchangeKind::Headers)
        .await
        .unwrap();
    client.bind_queue("direct_q", "d", "red").await.unwrap();
    client.bind_queue("fanout_a", "f", "").await.unwrap();
    client.bind_queue("fanout_b", "f", "").await.unwrap();
    client
        .bind_queue("topic_q", "t", "orders.*.paid")
        .await
        .unwrap();
    client
        .bind_queue("headers_q", "h", "")
        .headers_match(HeadersMatch::Any)
        .argument("region", "eu")
        .argument("vip", true)
        .await
        .unwrap();

    client
        .publish("d", "red", Message::new("direct-hit"))
        .await
        .unwrap();
    client
        .publish("d", "blue", Message::new("direct-miss"))
        .await
        .unwrap();
    client
        .publish("f", "whatever", Message::new("fan"))
        .await
        .unwrap();
    client
        .publish("t", "orders.eu.paid", Message::new("topic-hit"))
        .await
        .unwrap();
    client
        .publish("t", "orders.eu.refunded", Message::new("topic-miss"))
        .await
        .unwrap();
    client
        .publish("h", "", Message::new("headers-hit").header("vip", true))
        .await
        .unwrap();
    client
        .publish("h", "", Message::new("headers-miss").header("region", "us"))
        .await
        .unwrap();

    let expect = [
        ("direct_q", "direct-hit"),
        ("fanout_a", "fan"),
        ("fanout_b", "fan"),
        ("topic_q", "topic-hit"),
        ("headers_q", "headers-hit"),
    ];
    for (queue, body) in expect {
        let stats = client.queue_stats(queue).await.unwrap();
        assert_eq!(stats.ready, 1, "{queue}");
        let mut consumer = client.consume(queue, manual(1)).await.unwrap();
        assert_eq!(body_of(&mut consumer).await, body, "{queue}");
        consumer.cancel().await.unwrap();
    }
}

#[tokio::test]
async fn competing_consumers_with_prefetch_one_share_the_work_fairly() {
    let server = TestServer::start().await;
    let publisher = connect(&server).await;
    publisher.declare_queue("work").await.unwrap();
    let worker_a = connect(&server).await;
    let worker_b = connect(&server).await;
    let mut consumer_a = worker_a.consume("work", manual(1)).await.unwrap();
    let mut consumer_b = worker_b.consume("work", manual(1)).await.unwrap();
    let publishing = publisher.publisher();
    let outcomes = publishing
        .publish_batch(
            "",
            "work",
            (0..20)
                .map(|idx| Message::new(format!("job-{idx}")))
                .collect(),
        )
        .await
        .unwrap();
    assert!(outcomes.iter().all(Result::is_ok));
    let mut got_a = 0;
    let mut got_b = 0;
    for _ in 0..10 {
        body_of(&mut consumer_a).await;
        got_a += 1;
        body_of(&mut consumer_b).await;
        got_b += 1;
    }
    assert_eq!((got_a, got_b), (10, 10));
    assert_quiet(&mut consumer_a).await;
}

#[tokio::test]
async fn nack_requeue_redelivers_flagged_and_reject_drops() {
    let server = TestServer::start().await;
    let client = connect(&server).await;
    client.declare_queue("q").await.unwrap();
    client.publish("", "q", Message::new("a")).await.unwrap();
    client.publish("", "q", Message::new("b")).await.unwrap();
    let mut consumer = client.consume("q", manual(1)).await.unwrap();
    let first = next(&mut consumer).await;
    assert_eq!(&first.body()[..], b"a");
    first.nack(true).await.unwrap();
    let again = next(&mut consumer).await;
    assert_eq!(&again.body()[..], b"a", "requeued to the head");
    assert!(again.redelivered());
    assert_eq!(again.delivery_count(), 2);
    again.reject().await.unwrap();
    let second = next(&mut consumer).await;
    assert_eq!(&second.body()[..], b"b");
    second.nack(false).await.unwrap();
    let stats = wait_for_stats(&client, "q", |s| s.unacked == 0).await;
    assert_eq!(stats.ready, 0, "reject and nack without requeue drop");
}

#[tokio::test]
async fn cancel_returns_unacked_messages_for_redelivery() {
    let server = TestServer::start().await;
    let client = connect(&server).await;
    client.declare_queue("q").await.unwrap();
    for idx in 0..3 {
        client
            .publish("", "q", Message::new(format!("m{idx}")))
            .await
            .unwrap();
    }
    let mut consumer = client.consume("q", manual(10)).await.unwrap();
    let _held = next(&mut consumer).await;
    consumer.cancel().await.unwrap();
    let stats = wait_for_stats(&client, "q", |s| s.ready == 3).await;
    assert_eq!((stats.unacked, stats.consumers), (0, 0));
    let mut again = client.consume("q", manual(10)).await.unwrap();
    let redelivered = next(&mut again).await;
    assert_eq!(&redelivered.body()[..], b"m0");
    assert!(redelivered.redelivered());
}

#[tokio::test]
async fn a_dropped_connection_returns_its_unacked_messages_to_other_consumers() {
    let server = TestServer::start().await;
    let survivor = connect(&server).await;
    survivor.declare_queue("q").await.unwrap();
    for idx in 0..4 {
        survivor
            .publish("", "q", Message::new(format!("m{idx}")))
            .await
            .unwrap();
    }
    let doomed = connect(&server).await;
    let mut doomed_consumer = doomed.consume("q", manual(4)).await.unwrap();
    for _ in 0..4 {
        next(&mut doomed_consumer).await;
    }
    wait_for_stats(&survivor, "q", |s| s.unacked == 4).await;
    doomed.close().await.unwrap();
    drop(doomed_consumer);
    let mut consumer = survivor.consume("q", manual(10)).await.unwrap();
    let mut bodies = Vec::new();
    for _ in 0..4 {
        let delivery = next(&mut consumer).await;
        assert!(delivery.redelivered());
        bodies.push(String::from_utf8(delivery.body().to_vec()).unwrap());
        delivery.ack().await.unwrap();
    }
    assert_eq!(
        bodies,
        vec!["m0", "m1", "m2", "m3"],
        "FIFO order kept across the redelivery"
    );
}

#[tokio::test]
async fn publish_confirms_report_refusals_as_typed_errors() {
    let server = TestServer::start().await;
    let client = connect(&server).await;
    let err = client
        .publish("missing-exchange", "k", Message::new("x"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound), "{err}");
    client
        .publish(
            "",
            "no-such-queue",
            Message::new("unroutable is confirmed, as in AMQP"),
        )
        .await
        .unwrap();
    let err = client.declare_queue("wharf.mine").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InvalidName), "{err}");
    let err = client.queue_stats("nope").await.unwrap_err();
    assert!(err.is_not_found(), "{err}");
    client.declare_queue("q").await.unwrap();
    let err = client.declare_queue("q").durable(true).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::PreconditionFailed), "{err}");
}

#[tokio::test]
async fn pipelined_publishes_are_all_confirmed_and_delivered_in_order() {
    let server = TestServer::start().await;
    let client = connect(&server).await;
    client.declare_queue("stream").await.unwrap();
    let publisher = client.publisher_with_window(64);
    let mut tickets = Vec::new();
    for idx in 0..1000u32 {
        tickets.push(
            publisher
                .publish("", "stream", Message::new(idx.to_be_bytes().to_vec()))
                .await
                .unwrap(),
        );
    }
    for ticket in tickets {
        ticket.await.unwrap();
    }
    let mut consumer = client.consume("stream", manual(200)).await.unwrap();
    for idx in 0..1000u32 {
        let delivery = next(&mut consumer).await;
        assert_eq!(&delivery.body()[..], &idx.to_be_bytes());
        delivery.ack().await.unwrap();
    }
}

#[tokio::test]
async fn deleting_a_queue_under_a_consumer_ends_its_stream_with_a_server_cancel() {
    let server = TestServer::start().await;
    let client = connect(&server).await;
    client.declare_queue("doomed").await.unwrap();
    let mut consumer = client.consume("doomed", manual(5)).await.unwrap();
    let other = connect(&server).await;
    assert_eq!(other.delete_queue("doomed").await.unwrap(), 0);
    let item = tokio::time::timeout(DEADLINE, consumer.next())
        .await
        .expect("ends in time");
    assert!(
        matches!(item, Some(Err(ClientError::ConsumerCancelled { .. }))),
        "{item:?}"
    );
}

#[tokio::test]
async fn exclusive_queues_belong_to_one_connection_and_vanish_with_it() {
    let server = TestServer::start().await;
    let owner = connect(&server).await;
    let other = connect(&server).await;
    owner.declare_queue("mine").exclusive(true).await.unwrap();
    let err = other.consume("mine", manual(1)).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::ResourceLocked), "{err}");
    owner.close().await.unwrap();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        match other.queue_stats("mine").await {
            Err(err) if err.is_not_found() => break,
            _ => assert!(
                tokio::time::Instant::now() < deadline,
                "exclusive queue still there"
            ),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn auto_delete_queue_goes_when_its_last_consumer_cancels() {
    let server = TestServer::start().await;
    let client = connect(&server).await;
    let declared = client.declare_queue("").auto_delete(true).await.unwrap();
    assert!(declared.name.starts_with("wharf.gen-"), "{}", declared.name);
    let consumer = client.consume(&declared.name, manual(1)).await.unwrap();
    consumer.cancel().await.unwrap();
    let err = client.queue_stats(&declared.name).await.unwrap_err();
    assert!(err.is_not_found(), "{err}");
}

#[tokio::test]
async fn auto_ack_consumer_keeps_receiving_beyond_its_prefetch_through_credit() {
    let server = TestServer::start().await;
    let client = connect(&server).await;
    client.declare_queue("firehose").await.unwrap();
    let publisher = client.publisher();
    let outcomes = publisher
        .publish_batch(
            "",
            "firehose",
            (0..500).map(|idx| Message::new(format!("{idx}"))).collect(),
        )
        .await
        .unwrap();
    assert!(outcomes.iter().all(Result::is_ok));
    let mut consumer = client
        .consume(
            "firehose",
            ConsumeOptions {
                prefetch: 16,
                auto_ack: true,
                ..ConsumeOptions::default()
            },
        )
        .await
        .unwrap();
    for idx in 0..500 {
        let delivery = next(&mut consumer).await;
        assert_eq!(delivery.body(), format!("{idx}").as_bytes());
    }
    let stats = client.queue_stats("firehose").await.unwrap();
    assert_eq!((stats.ready, stats.unacked), (0, 0));
}

#[tokio::test]
async fn listings_show_queues_and_built_in_exchanges() {
    let server = TestServer::start().await;
    let client = connect(&server).await;
    client.declare_queue("b").await.unwrap();
    client.declare_queue("a").durable(true).await.unwrap();
    client.publish("", "a", Message::new("x")).await.unwrap();
    let queues = client.list_queues().await.unwrap();
    let names: Vec<&str> = queues.iter().map(|q| q.name.as_str()).collect();
    assert_eq!(names, vec!["a", "b"]);
    assert!(queues[0].durable && queues[0].ready == 1);
    let exchanges = client.list_exchanges().await.unwrap();
    for builtin in [
        "",
        "wharf.direct",
        "wharf.fanout",
        "wharf.topic",
        "wharf.headers",
    ] {
        assert!(
            exchanges.iter().any(|e| e.name == builtin),
            "{builtin} missing"
        );
    }
}

#[tokio::test]
async fn many_tasks_share_one_client() {
    let server = TestServer::start().await;
    let client = connect(&server).await;
    client.declare_queue("shared").await.unwrap();
    let mut tasks = Vec::new();
    for task_idx in 0..8 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            for idx in 0..50 {
                client
                    .publish("", "shared", Message::new(format!("{task_idx}-{idx}")))
                    .await
                    .unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(client.queue_stats("shared").await.unwrap().ready, 400);
}

#[tokio::test]
async fn a_peer_gone_silent_has_its_unacked_messages_requeued_and_exclusive_queues_deleted() {
    let server =
        TestServer::start_with(|config| config.heartbeat = Duration::from_millis(200)).await;
    let client = connect(&server).await;
    client.declare_queue("work").await.unwrap();
    client
        .publish("", "work", Message::new("held"))
        .await
        .unwrap();
    // A raw peer that completes the handshake, takes a message and then never speaks again.
    let mut raw = common::Raw::open(server.addr()).await;
    raw.request(wharf_protocol::Request::DeclareQueue {
        name: "silent-owned".into(),
        durable: false,
        exclusive: true,
        auto_delete: false,
        passive: false,
        arguments: Default::default(),
    })
    .await;
    raw.subscribe("work", 1).await;
    let started = tokio::time::Instant::now();
    let close = raw.expect_close().await;
    assert_eq!(close.code, ErrorCode::HeartbeatTimeout);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "detected within about 2x the heartbeat"
    );
    let stats = client.queue_stats("work").await.unwrap();
    assert_eq!(
        (stats.ready, stats.unacked),
        (1, 0),
        "the held message is back"
    );
    assert!(
        client
            .queue_stats("silent-owned")
            .await
            .unwrap_err()
            .is_not_found()
    );
}

#[tokio::test]
async fn a_publisher_outrunning_its_consumers_is_paused_at_the_memory_watermark() {
    const WATERMARK: u64 = 256 * 1024;
    let server =
        TestServer::start_with(|config| config.memory_high_watermark_bytes = WATERMARK).await;
    let client = connect(&server).await;
    client.declare_queue("flood").await.unwrap();
    // 4 MiB offered, 16 times the watermark, with nobody consuming.
    let publishing = {
        let client = client.clone();
        tokio::spawn(async move {
            let publisher = client.publisher_with_window(64);
            for chunk in 0..64 {
                let batch = (0..64)
                    .map(|idx| Message::new(vec![(chunk + idx) as u8; 1024]))
                    .collect();
                let outcomes = publisher.publish_batch("", "flood", batch).await.unwrap();
                assert!(outcomes.iter().all(Result::is_ok));
            }
        })
    };
    // The broker stops reading the publisher: ready bytes level off near the watermark (one
    // read's worth of frames may land past it) instead of reaching 4 MiB.
    let observer = connect(&server).await;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut last = 0;
    loop {
        let ready = observer.queue_stats("flood").await.unwrap().ready;
        if ready > 0 && ready == last {
            break;
        }
        last = ready;
        assert!(tokio::time::Instant::now() < deadline, "never levelled off");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!publishing.is_finished(), "the publisher was paused");
    let ready_bytes = last * 1024;
    assert!(
        ready_bytes < 4 * 1024 * 1024,
        "paused well below what was offered: {ready_bytes}"
    );
    assert!(
        ready_bytes < WATERMARK + 1024 * 1024,
        "paused near the watermark: {ready_bytes}"
    );
    // Consuming frees memory below the low watermark and the publisher resumes and finishes.
    let mut consumer = observer
        .consume(
            "flood",
            ConsumeOptions {
                prefetch: 256,
                auto_ack: true,
                ..ConsumeOptions::default()
            },
        )
        .await
        .unwrap();
    let mut received = 0;
    while received < 64 * 64 {
        next(&mut consumer).await;
        received += 1;
    }
    tokio::time::timeout(DEADLINE, publishing)
        .await
        .expect("the publisher finished")
        .unwrap();
}

#[tokio::test]
async fn deliveries_of_large_bodies_come_in_frames_of_at_most_256_kib_of_bodies() {
    let server = TestServer::start().await;
    let client = connect(&server).await;
    client.declare_queue("big").await.unwrap();
    let publisher = client.publisher();
    let messages = (0..300)
        .map(|idx| Message::new(format!("{idx:04}{}", "b".repeat(4_092))))
        .collect();
    for outcome in publisher.publish_batch("", "big", messages).await.unwrap() {
        outcome.unwrap();
    }
    // A raw consumer attaches to the standing backlog: the broker batches what it sends.
    let mut raw = common::Raw::open(server.addr()).await;
    // Sent raw, not through `Raw::subscribe`: the order of the answer and the deliveries is
    // what this test looks at.
    raw.send(&Frame::Request {
        correlation_id: 1,
        request: common::Raw::subscribe_request("big", 1_000),
    })
    .await;
    let mut seen = 0;
    let mut frames = 0;
    let mut order = Vec::new();
    while seen < 300 {
        let frame = raw.recv_significant().await.expect("deliveries");
        order.push(matches!(frame, Frame::Response { .. }));
        let bodies: Vec<usize> = match frame {
            Frame::DeliverBatch(batch) => batch.deliveries.iter().map(|d| d.body.len()).collect(),
            Frame::Deliver(deliver) => vec![deliver.delivery.body.len()],
            Frame::Response { response, .. } => {
                assert!(
                    matches!(response, wharf_protocol::Response::Subscribed { .. }),
                    "{response:?}"
                );
                continue;
            }
            other => panic!("unexpected {other:?}"),
        };
        let bytes: usize = bodies.iter().sum();
        assert!(
            bytes <= 256 * 1024,
            "{} bodies, {bytes} bytes in one frame",
            bodies.len()
        );
        seen += bodies.len();
        frames += 1;
    }
    assert_eq!(seen, 300);
    assert!(
        order[0],
        "the Subscribed response precedes the first delivery: {order:?}"
    );
    assert!(
        frames >= 5,
        "300 bodies of 4 KiB need at least 5 frames, got {frames}"
    );
}

#[tokio::test]
async fn a_consumer_that_dies_with_a_full_outbox_has_its_deliveries_redelivered() {
    // A consumer stops reading while more than the outbox limit (64 MiB) is queued for it, so
    // its connection's reader waits for room; then it dies. Its writer's next write fails.
    // The reader must notice (it cannot drain any more) and close the connection, so that
    // the unacked deliveries go back to the queue.
    let server = TestServer::start().await;
    let client = connect(&server).await;
    client.declare_queue("big").await.unwrap();
    let mut stuck = common::Raw::open(server.addr()).await;
    stuck.subscribe("big", 100).await;
    let n_messages = 9;
    let body = vec![7u8; 8 * 1024 * 1024];
    for _ in 0..n_messages {
        client
            .publish("", "big", Message::new(body.clone()))
            .await
            .expect("confirmed");
    }
    // Confirmed, so routed: 72 MiB are queued for the consumer, which reads none of it. A
    // frame makes its reader go round its loop, into the wait for room.
    stuck.send(&Frame::Heartbeat).await;
    wait_for_stats(&client, "big", |stats| stats.unacked == n_messages).await;
    // Unread data makes the close a reset: the broker's pending write fails.
    drop(stuck);
    let stats = wait_for_stats(&client, "big", |stats| stats.consumers == 0).await;
    assert_eq!(stats.ready, n_messages, "{stats:?}");
    let mut consumer = client.consume("big", manual(100)).await.unwrap();
    for _ in 0..n_messages {
        let delivery = next(&mut consumer).await;
        assert!(delivery.redelivered());
        assert_eq!(delivery.body().len(), body.len());
        delivery.ack().await.unwrap();
    }
}

#[tokio::test]
async fn a_delivery_too_large_for_its_consumer_cancels_that_consumer_and_is_redelivered() {
    // The consumer accepts frames of 64 KiB at most; a 100 KiB message cannot be sent to it.
    // Its consumer is cancelled with `FrameTooLarge` saying so, the connection goes on, and
    // the message waits in its queue for a consumer that can take it. Before (issue #17), the
    // connection was shut without a word and the message circled back to the same client.
    let server = TestServer::start().await;
    let client = connect(&server).await;
    client.declare_queue("wide").await.unwrap();
    let mut small = common::Raw::connect(server.addr()).await;
    small
        .send_bytes(&wharf_protocol::Preamble::CURRENT.encode())
        .await;
    let mut hello = common::Raw::hello();
    if let Frame::Hello(hello) = &mut hello {
        hello.frame_bytes_max = wharf_protocol::limits::FRAME_BYTES_MAX_FLOOR;
    }
    small.send(&hello).await;
    small.read_preamble().await.expect("server preamble");
    assert!(matches!(small.recv().await, Some(Frame::HelloOk(_))));
    small.subscribe("wide", 10).await;
    client
        .publish("", "wide", Message::new("small enough"))
        .await
        .expect("confirmed");
    let body = vec![1u8; 100 * 1024];
    client
        .publish("", "wide", Message::new(body.clone()))
        .await
        .expect("confirmed");
    // The small message arrives; then the consumer is cancelled.
    let first_tag = match small.recv_significant().await {
        Some(Frame::DeliverBatch(batch)) => batch.deliveries[0].delivery_tag,
        Some(Frame::Deliver(deliver)) => deliver.delivery.delivery_tag,
        other => panic!("expected the small delivery, got {other:?}"),
    };
    let Some(Frame::ConsumerCancelled(cancelled)) = small.recv_significant().await else {
        panic!("expected ConsumerCancelled");
    };
    assert_eq!(cancelled.code, ErrorCode::FrameTooLarge, "{cancelled:?}");
    assert!(cancelled.reason.contains("102400"), "{cancelled:?}");
    let stats = wait_for_stats(&client, "wide", |stats| stats.consumers == 0).await;
    assert_eq!((stats.ready, stats.unacked), (2, 0), "{stats:?}");
    // Acking what it received before the cancel is harmless: the connection goes on.
    small
        .send(&Frame::Ack(wharf_protocol::Ack {
            delivery_tag: first_tag,
            multiple: false,
        }))
        .await;
    common::server_still_serves(server.addr(), "after-cancel").await;
    let response = small
        .request(wharf_protocol::Request::QueueStats {
            name: "wide".into(),
        })
        .await;
    assert!(
        matches!(response, wharf_protocol::Response::Stats(_)),
        "{response:?}"
    );
    let mut consumer = client.consume("wide", manual(10)).await.unwrap();
    assert_eq!(body_of(&mut consumer).await, "small enough");
    let delivery = next(&mut consumer).await;
    assert_eq!(delivery.body().len(), body.len());
}

#[tokio::test]
async fn a_publisher_that_dies_while_paused_by_the_memory_alarm_is_cleaned_up() {
    // The memory alarm stops reading a publisher's socket; if the publisher dies meanwhile,
    // the broker learns it from its writer (a heartbeat it cannot send) and ends the
    // connection: the delivery the publisher held as a consumer returns to its queue.
    let server = TestServer::start_with(|config| {
        config.memory_high_watermark_bytes = 64 * 1024;
        config.heartbeat = Duration::from_millis(100);
    })
    .await;
    let client = connect(&server).await;
    client.declare_queue("side").await.unwrap();
    client.declare_queue("fill").await.unwrap();
    let mut dying = common::Raw::open(server.addr()).await;
    dying.subscribe("side", 10).await;
    client
        .publish("", "side", Message::new("held"))
        .await
        .unwrap();
    wait_for_stats(&client, "side", |stats| stats.unacked == 1).await;
    // Past the watermark with nobody consuming: the alarm is on for good (and this client,
    // which published, is not read any more either: another one watches).
    client
        .publish("", "fill", Message::new(vec![0u8; 128 * 1024]))
        .await
        .unwrap();
    let observer = connect(&server).await;
    // The raw connection publishes too, so its reader waits on the alarm before reading on.
    dying
        .send(&Frame::Publish(wharf_protocol::Publish {
            exchange: wharf_protocol::WireStr::from(""),
            routing_key: wharf_protocol::WireStr::from("fill"),
            properties: Default::default(),
            body: bytes::Bytes::from_static(b"x"),
        }))
        .await;
    wait_for_stats(&observer, "fill", |stats| stats.ready == 2).await;
    drop(dying);
    let stats = wait_for_stats(&observer, "side", |stats| stats.consumers == 0).await;
    assert_eq!((stats.ready, stats.unacked), (1, 0), "{stats:?}");
}
