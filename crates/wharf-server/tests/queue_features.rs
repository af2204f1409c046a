//! Queue features end to end through the Rust client: priorities and length limits.

mod common;

use common::{DEADLINE, TestServer, wait_for_stats};
use wharf_client::{Client, ClientError, ConsumeOptions, Consumer, Message, Overflow};
use wharf_protocol::ErrorCode;
use wharf_server::{RunningServer, ServerConfig};

async fn connect(server: &TestServer) -> Client {
    Client::connect(&server.addr().to_string())
        .await
        .expect("connect")
}

fn manual(prefetch: u32) -> ConsumeOptions {
    ConsumeOptions {
        prefetch,
        auto_ack: false,
        ..ConsumeOptions::default()
    }
}

/// The next delivery's body, acked.
async fn body_of(consumer: &mut Consumer) -> String {
    let delivery = tokio::time::timeout(DEADLINE, consumer.next())
        .await
        .expect("a delivery within the deadline")
        .expect("stream open")
        .expect("delivery ok");
    delivery.ack().await.unwrap();
    String::from_utf8(delivery.body().to_vec()).unwrap()
}

#[tokio::test]
async fn a_priority_queue_delivers_higher_priorities_first() {
    let server = TestServer::start().await;
    let client = connect(&server).await;
    client.declare_queue("jobs").max_priority(9).await.unwrap();
    for (body, priority) in [("low", 1), ("urgent", 9), ("normal", 5), ("urgent-2", 200)] {
        client
            .publish("", "jobs", Message::new(body).priority(priority))
            .await
            .expect("confirmed");
    }
    let mut consumer = client.consume("jobs", manual(10)).await.unwrap();
    let mut order = Vec::new();
    for _ in 0..4 {
        order.push(body_of(&mut consumer).await);
    }
    assert_eq!(order, ["urgent", "urgent-2", "normal", "low"]);
}

#[tokio::test]
async fn drop_head_keeps_the_newest_messages() {
    let server = TestServer::start().await;
    let client = connect(&server).await;
    client
        .declare_queue("recent")
        .max_length(2)
        .overflow(Overflow::DropHead)
        .await
        .unwrap();
    for body in ["m1", "m2", "m3"] {
        client
            .publish("", "recent", Message::new(body))
            .await
            .expect("drop-head accepts every publish");
    }
    assert_eq!(client.queue_stats("recent").await.unwrap().ready, 2);
    let mut consumer = client.consume("recent", manual(10)).await.unwrap();
    assert_eq!(body_of(&mut consumer).await, "m2");
    assert_eq!(body_of(&mut consumer).await, "m3");
}

#[tokio::test]
async fn reject_publish_refuses_with_backpressure_and_accepts_after_a_consume() {
    let server = TestServer::start().await;
    let client = connect(&server).await;
    client
        .declare_queue("bounded")
        .max_length(1)
        .overflow(Overflow::RejectPublish)
        .await
        .unwrap();
    client
        .publish("", "bounded", Message::new("first"))
        .await
        .expect("room for one");
    let refused = client
        .publish("", "bounded", Message::new("second"))
        .await
        .expect_err("full");
    assert!(
        matches!(refused, ClientError::Backpressure { .. }),
        "{refused:?}"
    );
    let mut consumer = client.consume("bounded", manual(10)).await.unwrap();
    assert_eq!(body_of(&mut consumer).await, "first");
    client
        .publish("", "bounded", Message::new("third"))
        .await
        .expect("room again");
    assert_eq!(body_of(&mut consumer).await, "third");
}

#[tokio::test]
async fn reject_publish_dlx_refuses_with_backpressure_and_dead_letters_the_message() {
    let server = TestServer::start().await;
    let client = connect(&server).await;
    client.declare_queue("bounded.dead").await.unwrap();
    client
        .declare_queue("bounded")
        .max_length(1)
        .overflow(Overflow::RejectPublishDlx)
        .dead_letter_exchange("")
        .dead_letter_routing_key("bounded.dead")
        .await
        .unwrap();
    client
        .publish("", "bounded", Message::new("first"))
        .await
        .expect("room for one");
    let refused = client
        .publish("", "bounded", Message::new("second"))
        .await
        .expect_err("full");
    assert!(
        matches!(refused, ClientError::Backpressure { .. }),
        "{refused:?}"
    );
    let mut dead = client.consume("bounded.dead", manual(10)).await.unwrap();
    assert_eq!(body_of(&mut dead).await, "second");
}

#[tokio::test]
async fn invalid_queue_feature_arguments_are_refused() {
    let server = TestServer::start().await;
    let client = connect(&server).await;
    let err = client
        .declare_queue("q")
        .argument("x-max-priority", 0i64)
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Some(ErrorCode::InvalidArgument), "{err:?}");
    let err = client
        .declare_queue("q")
        .argument("x-overflow", "drop-tail")
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Some(ErrorCode::InvalidArgument), "{err:?}");
    let err = client
        .declare_queue("q")
        .durable(true)
        .argument("x-sync", "sometimes")
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Some(ErrorCode::InvalidArgument), "{err:?}");
    assert!(err.to_string().contains("x-sync"), "{err}");
    // The connection lives on.
    client.declare_queue("q").max_length(5).await.unwrap();
}

#[tokio::test]
async fn a_rejected_message_is_dead_lettered_with_its_death_record() {
    let server = TestServer::start().await;
    let client = connect(&server).await;
    client.declare_queue("failed").await.unwrap();
    client
        .declare_queue("work")
        .dead_letter_exchange("")
        .dead_letter_routing_key("failed")
        .await
        .unwrap();
    client
        .publish("", "work", Message::new("job-1"))
        .await
        .expect("confirmed");
    let mut consumer = client.consume("work", manual(10)).await.unwrap();
    let delivery = tokio::time::timeout(DEADLINE, consumer.next())
        .await
        .expect("a delivery within the deadline")
        .expect("stream open")
        .expect("delivery ok");
    delivery.reject().await.unwrap();

    let mut dead_letters = client.consume("failed", manual(10)).await.unwrap();
    let dead = tokio::time::timeout(DEADLINE, dead_letters.next())
        .await
        .expect("a dead letter within the deadline")
        .expect("stream open")
        .expect("delivery ok");
    assert_eq!(&dead.body()[..], b"job-1");
    assert_eq!(dead.routing_key(), "failed");
    assert_eq!(
        dead.header("x-first-death-reason").and_then(|v| v.as_str()),
        Some("rejected")
    );
    assert_eq!(
        dead.header("x-first-death-queue").and_then(|v| v.as_str()),
        Some("work")
    );
    match dead.header("x-death") {
        Some(wharf_protocol::ValueRef::List(records)) => assert_eq!(records.len(), 1),
        other => panic!("x-death is a list of one record: {other:?}"),
    }
    dead.ack().await.unwrap();
}

#[tokio::test]
async fn drop_head_dead_letters_to_the_dead_letter_exchange() {
    let server = TestServer::start().await;
    let client = connect(&server).await;
    client.declare_queue("evicted").await.unwrap();
    client
        .declare_queue("recent")
        .max_length(1)
        .dead_letter_exchange("")
        .dead_letter_routing_key("evicted")
        .await
        .unwrap();
    for body in ["old", "new"] {
        client
            .publish("", "recent", Message::new(body))
            .await
            .expect("confirmed");
    }
    let mut evicted = client.consume("evicted", manual(10)).await.unwrap();
    assert_eq!(body_of(&mut evicted).await, "old");
    let mut recent = client.consume("recent", manual(10)).await.unwrap();
    assert_eq!(body_of(&mut recent).await, "new");
}

#[tokio::test]
async fn a_message_over_its_delivery_limit_is_dead_lettered() {
    let server = TestServer::start().await;
    let client = connect(&server).await;
    client.declare_queue("poison").await.unwrap();
    client
        .declare_queue("work")
        .argument("x-delivery-limit", 2i64)
        .dead_letter_exchange("")
        .dead_letter_routing_key("poison")
        .await
        .unwrap();
    client
        .publish("", "work", Message::new("bad-job"))
        .await
        .expect("confirmed");
    let mut consumer = client.consume("work", manual(1)).await.unwrap();
    for attempt in 1..=2 {
        let delivery = tokio::time::timeout(DEADLINE, consumer.next())
            .await
            .expect("a delivery within the deadline")
            .expect("stream open")
            .expect("delivery ok");
        assert_eq!(delivery.delivery_count(), attempt);
        delivery.nack(true).await.unwrap();
    }
    let mut poison = client.consume("poison", manual(10)).await.unwrap();
    let dead = tokio::time::timeout(DEADLINE, poison.next())
        .await
        .expect("a dead letter within the deadline")
        .expect("stream open")
        .expect("delivery ok");
    assert_eq!(&dead.body()[..], b"bad-job");
    assert_eq!(
        dead.header("x-first-death-reason").and_then(|v| v.as_str()),
        Some("delivery_limit")
    );
}

async fn start_in(dir: &std::path::Path) -> RunningServer {
    RunningServer::start(ServerConfig::ephemeral(dir))
        .await
        .expect("server starts")
}

#[tokio::test]
async fn dropped_and_dead_lettered_persistent_messages_stay_where_they_went_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_in(dir.path()).await;
    let client = Client::connect(&server.addr.to_string()).await.unwrap();
    client.declare_queue("dead").durable(true).await.unwrap();
    client
        .declare_queue("work")
        .durable(true)
        .max_length(2)
        .dead_letter_exchange("")
        .dead_letter_routing_key("dead")
        .await
        .unwrap();
    for body in ["a", "b", "c"] {
        client
            .publish("", "work", Message::new(body).persistent(true))
            .await
            .expect("confirmed");
    }
    // "a" was pushed out by "c" (maxlen); now reject "b".
    let mut consumer = client.consume("work", manual(1)).await.unwrap();
    let delivery = tokio::time::timeout(DEADLINE, consumer.next())
        .await
        .expect("in time")
        .expect("open")
        .expect("ok");
    assert_eq!(&delivery.body()[..], b"b");
    delivery.reject().await.unwrap();
    // "c" is delivered next: cancel so it goes back, then wait for the broker to settle.
    consumer.cancel().await.unwrap();
    wait_for_stats(&client, "work", |s| s.ready == 1 && s.unacked == 0).await;
    wait_for_stats(&client, "dead", |s| s.ready == 2 && s.unacked == 0).await;
    client.close().await.unwrap();
    server.stop().await.unwrap();

    let server = start_in(dir.path()).await;
    let client = Client::connect(&server.addr.to_string()).await.unwrap();
    let mut work = client.consume("work", manual(10)).await.unwrap();
    assert_eq!(body_of(&mut work).await, "c");
    let mut dead = client.consume("dead", manual(10)).await.unwrap();
    for (body, reason) in [("a", "maxlen"), ("b", "rejected")] {
        let delivery = tokio::time::timeout(DEADLINE, dead.next())
            .await
            .expect("in time")
            .expect("open")
            .expect("ok");
        assert_eq!(&delivery.body()[..], body.as_bytes());
        assert_eq!(
            delivery
                .header("x-first-death-reason")
                .and_then(|v| v.as_str()),
            Some(reason)
        );
        delivery.ack().await.unwrap();
    }
    // The queue arguments came back with the queue: still limited to 2, still dead-lettering.
    work.cancel().await.unwrap();
    for body in ["d", "e", "f"] {
        client
            .publish("", "work", Message::new(body).persistent(true))
            .await
            .expect("confirmed");
    }
    wait_for_stats(&client, "work", |s| s.ready == 2 && s.unacked == 0).await;
    assert_eq!(body_of(&mut dead).await, "d");
    client.close().await.unwrap();
    server.stop().await.unwrap();
}
