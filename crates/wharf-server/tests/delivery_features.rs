//! The timed queue features of protocol 1.1 end to end, through the Rust client (and raw frames
//! where the client would not send what is tested): delayed delivery, `Defer`, message TTL and
//! queue TTL into dead-letter queues, retry schedules, dedup windows, leases (`x-ack-timeout`,
//! `Touch`, the client's automatic extension), queue expiry, redrive, and what a 1.0 peer may
//! not send. Durations are tens to hundreds of ms; every wait polls with a deadline, and lower
//! bounds on elapsed time leave a generous margin.

mod common;

use common::{DEADLINE, Raw, TestServer, wait_for_stats};
use std::time::Duration;
use tokio::time::Instant;
use wharf_client::{
    Client, ClientError, ConsumeOptions, Consumer, Delivery, ExchangeKind, Message, QueueInfoV2,
};
use wharf_protocol::limits::DURATION_MS_MAX;
use wharf_protocol::{Ack, ErrorCode, Frame, Preamble, Request, Response, Table, Touch, Value};

/// Lower bounds on elapsed time allow this much slack (clock granularity, ms rounding).
const MARGIN: Duration = Duration::from_millis(50);

async fn connect(server: &TestServer) -> Client {
    Client::connect(&server.addr().to_string())
        .await
        .expect("connect")
}

fn manual(prefetch: u32) -> ConsumeOptions {
    ConsumeOptions {
        prefetch,
        ..ConsumeOptions::default()
    }
}

async fn next(consumer: &mut Consumer) -> Delivery {
    tokio::time::timeout(DEADLINE, consumer.next())
        .await
        .expect("a delivery within the deadline")
        .expect("stream open")
        .expect("delivery ok")
}

async fn stats(client: &Client, queue: &str) -> QueueInfoV2 {
    client.queue_stats_v2(queue).await.expect("queue stats")
}

fn death_reason(delivery: &Delivery) -> Option<&str> {
    delivery
        .header("x-first-death-reason")
        .and_then(|value| value.as_str())
}

#[track_caller]
fn assert_at_least(elapsed: Duration, expected: Duration, what: &str) {
    assert!(
        elapsed + MARGIN >= expected,
        "{what} after {elapsed:?}, before {expected:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Delayed delivery and Defer.

#[tokio::test]
async fn a_delayed_message_is_held_then_delivered_after_its_delay() {
    let server = TestServer::start().await;
    let client = connect(&server).await;
    client.declare_queue("later").await.unwrap();
    let mut consumer = client.consume("later", manual(10)).await.unwrap();
    let delay = Duration::from_millis(300);
    let published_at = Instant::now();
    client
        .publish("", "later", Message::new("wake up").delay(delay))
        .await
        .expect("confirmed at once, before the delay");
    let held = stats(&client, "later").await;
    if published_at.elapsed() < delay - MARGIN {
        assert_eq!(
            (held.delayed, held.ready, held.unacked),
            (1, 0, 0),
            "{held:?}"
        );
    }
    let delivery = next(&mut consumer).await;
    assert_at_least(published_at.elapsed(), delay, "delivered");
    assert_eq!(&delivery.body()[..], b"wake up");
    assert!(!delivery.redelivered());
    assert_eq!(delivery.properties().delay_ms(), Some(300));
    delivery.ack().await.unwrap();
    wait_for_stats(&client, "later", |stats| {
        stats.delayed == 0 && stats.unacked == 0 && stats.acked == 1
    })
    .await;
}

/// A delay past `DURATION_MS_MAX` would hold a message forever: the publish is refused with
/// `InvalidArgument` (issue #17; before, it was confirmed and held), the connection lives on.
#[tokio::test]
async fn a_publish_delayed_past_the_maximum_is_refused_and_the_connection_lives() {
    let server = TestServer::start().await;
    let client = connect(&server).await;
    client.declare_queue("never").await.unwrap();
    let refused = client
        .publish(
            "",
            "never",
            Message::new("forever").delay(Duration::from_millis(DURATION_MS_MAX + 1)),
        )
        .await;
    assert!(
        matches!(
            &refused,
            Err(ClientError::PublishRefused {
                code: ErrorCode::InvalidArgument,
                ..
            })
        ),
        "{refused:?}"
    );
    client
        .publish("", "never", Message::new("now"))
        .await
        .expect("the connection still publishes");
    let stats = stats(&client, "never").await;
    assert_eq!((stats.ready, stats.delayed), (1, 0), "{stats:?}");
}

#[tokio::test]
async fn a_short_delay_is_not_held_up_by_a_longer_one_published_before() {
    // The timer task sleeps until the 60 s delay; the 200 ms one must wake it.
    let server = TestServer::start().await;
    let client = connect(&server).await;
    client.declare_queue("later").await.unwrap();
    let mut consumer = client.consume("later", manual(10)).await.unwrap();
    client
        .publish(
            "",
            "later",
            Message::new("in a minute").delay(Duration::from_secs(60)),
        )
        .await
        .unwrap();
    let published_at = Instant::now();
    client
        .publish(
            "",
            "later",
            Message::new("soon").delay(Duration::from_millis(200)),
        )
        .await
        .unwrap();
    let delivery = next(&mut consumer).await;
    assert_eq!(&delivery.body()[..], b"soon");
    let elapsed = published_at.elapsed();
    assert_at_least(elapsed, Duration::from_millis(200), "delivered");
    assert!(elapsed < Duration::from_secs(5), "woken late: {elapsed:?}");
    assert_eq!(stats(&client, "later").await.delayed, 1);
}

#[tokio::test]
async fn defer_requeues_the_message_after_its_delay() {
    let server = TestServer::start().await;
    let client = connect(&server).await;
    client.declare_queue("jobs").await.unwrap();
    client
        .publish("", "jobs", Message::new("job"))
        .await
        .unwrap();
    let mut consumer = client.consume("jobs", manual(10)).await.unwrap();
    let first = next(&mut consumer).await;
    let delay = Duration::from_millis(300);
    let deferred_at = Instant::now();
    first.defer(delay).await.unwrap();
    // Settled: not the application's any more.
    assert!(matches!(
        first.ack().await,
        Err(ClientError::NotSettleable { .. })
    ));
    let again = next(&mut consumer).await;
    assert_at_least(deferred_at.elapsed(), delay, "redelivered");
    assert_eq!(&again.body()[..], b"job");
    assert!(again.redelivered());
    assert_eq!(again.delivery_count(), 2);
    again.ack().await.unwrap();
    wait_for_stats(&client, "jobs", |stats| {
        stats.unacked == 0 && stats.delayed == 0 && stats.acked == 1
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// TTL, retries, dedup.

/// A queue `name` dead-lettering to `name.dead` through the default exchange, and a consumer
/// of the dead letters.
async fn with_dead_letters(
    client: &Client,
    name: &str,
    declare: impl FnOnce(wharf_client::DeclareQueue<'_>) -> wharf_client::DeclareQueue<'_>,
) -> Consumer {
    let dead = format!("{name}.dead");
    client.declare_queue(&dead).await.unwrap();
    declare(
        client
            .declare_queue(name)
            .dead_letter_exchange("")
            .dead_letter_routing_key(&dead),
    )
    .await
    .unwrap();
    client.consume(&dead, manual(10)).await.unwrap()
}

#[tokio::test]
async fn a_message_past_its_expiration_is_dead_lettered_as_expired() {
    let server = TestServer::start().await;
    let client = connect(&server).await;
    let mut dead = with_dead_letters(&client, "short", |declare| declare).await;
    let ttl = Duration::from_millis(100);
    let published_at = Instant::now();
    client
        .publish("", "short", Message::new("stale").expiration(ttl))
        .await
        .unwrap();
    client
        .publish("", "short", Message::new("fresh"))
        .await
        .unwrap();
    let expired = next(&mut dead).await;
    assert_at_least(published_at.elapsed(), ttl, "expired");
    assert_eq!(&expired.body()[..], b"stale");
    assert_eq!(death_reason(&expired), Some("expired"));
    expired.ack().await.unwrap();
    let short = stats(&client, "short").await;
    assert_eq!((short.ready, short.expired), (1, 1), "{short:?}");
}

#[tokio::test]
async fn the_queue_message_ttl_expires_every_message_into_the_dead_letter_queue() {
    let server = TestServer::start().await;
    let client = connect(&server).await;
    let ttl = Duration::from_millis(150);
    let mut dead = with_dead_letters(&client, "ttl", |declare| declare.message_ttl(ttl)).await;
    let published_at = Instant::now();
    for body in ["a", "b"] {
        client.publish("", "ttl", Message::new(body)).await.unwrap();
    }
    for body in ["a", "b"] {
        let expired = next(&mut dead).await;
        assert_at_least(published_at.elapsed(), ttl, "expired");
        assert_eq!(&expired.body()[..], body.as_bytes());
        assert_eq!(death_reason(&expired), Some("expired"));
        assert_eq!(
            expired
                .header("x-first-death-queue")
                .and_then(|value| value.as_str()),
            Some("ttl")
        );
        expired.ack().await.unwrap();
    }
    let ttl_stats = stats(&client, "ttl").await;
    assert_eq!(
        (ttl_stats.ready, ttl_stats.expired),
        (0, 2),
        "{ttl_stats:?}"
    );
}

#[tokio::test]
async fn the_retry_schedule_delays_each_requeue_then_dead_letters() {
    let server = TestServer::start().await;
    let client = connect(&server).await;
    let schedule = [Duration::from_millis(100), Duration::from_millis(250)];
    let mut dead = with_dead_letters(&client, "flaky", |declare| declare.retry(&schedule)).await;
    client
        .publish("", "flaky", Message::new("job"))
        .await
        .unwrap();
    let mut consumer = client.consume("flaky", manual(1)).await.unwrap();
    let mut nacked_at = None;
    for (attempt, delay) in (1..).zip([Duration::ZERO, schedule[0], schedule[1]]) {
        let delivery = next(&mut consumer).await;
        if let Some(nacked_at) = nacked_at {
            assert_at_least(
                Instant::elapsed(&nacked_at),
                delay,
                &format!("attempt {attempt}"),
            );
        }
        assert_eq!(delivery.delivery_count(), attempt);
        nacked_at = Some(Instant::now());
        delivery.nack(true).await.unwrap();
    }
    // The schedule is exhausted: the third failure dead-letters the message.
    let failed = next(&mut dead).await;
    assert_eq!(&failed.body()[..], b"job");
    assert_eq!(death_reason(&failed), Some("rejected"));
    failed.ack().await.unwrap();
    wait_for_stats(&client, "flaky", |stats| {
        stats.ready == 0 && stats.delayed == 0 && stats.unacked == 0
    })
    .await;
}

#[tokio::test]
async fn a_message_id_seen_within_the_dedup_window_is_confirmed_as_duplicate() {
    let server = TestServer::start().await;
    let client = connect(&server).await;
    let window = Duration::from_millis(300);
    client
        .declare_queue("orders")
        .dedup_window(window)
        .await
        .unwrap();
    let first_at = Instant::now();
    client
        .publish("", "orders", Message::new("1").message_id("o-1"))
        .await
        .expect("first publish stored");
    let duplicate = client
        .publish("", "orders", Message::new("1 again").message_id("o-1"))
        .await
        .expect_err("duplicate");
    assert!(duplicate.is_duplicate(), "{duplicate:?}");
    client
        .publish("", "orders", Message::new("2").message_id("o-2"))
        .await
        .expect("another id is stored");
    // A batch reports the duplicate per message.
    let outcomes = client
        .publisher()
        .publish_batch(
            "",
            "orders",
            vec![
                Message::new("3").message_id("o-3"),
                Message::new("2 again").message_id("o-2"),
            ],
        )
        .await
        .unwrap();
    assert!(outcomes[0].is_ok(), "{outcomes:?}");
    assert!(
        matches!(outcomes[1], Err(ClientError::Duplicate)),
        "{outcomes:?}"
    );
    let orders = stats(&client, "orders").await;
    assert_eq!((orders.ready, orders.duplicates), (3, 2), "{orders:?}");

    // Once the window has passed, the id is new again.
    loop {
        match client
            .publish("", "orders", Message::new("1, later").message_id("o-1"))
            .await
        {
            Ok(_) => break,
            Err(ClientError::Duplicate) => {
                assert!(first_at.elapsed() < DEADLINE, "o-1 never forgotten");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(err) => panic!("{err:?}"),
        }
    }
    assert_at_least(first_at.elapsed(), window, "o-1 accepted again");
    assert_eq!(stats(&client, "orders").await.ready, 4);
}

#[tokio::test]
async fn a_copy_taken_by_a_queue_without_dedup_makes_the_publish_confirmed() {
    let server = TestServer::start().await;
    let client = connect(&server).await;
    client
        .declare_exchange("events", ExchangeKind::Fanout)
        .await
        .unwrap();
    client
        .declare_queue("deduped")
        .dedup_window(Duration::from_secs(60))
        .await
        .unwrap();
    client.declare_queue("audit").await.unwrap();
    for queue in ["deduped", "audit"] {
        client.bind_queue(queue, "events", "").await.unwrap();
    }
    for _ in 0..2 {
        client
            .publish("events", "", Message::new("e").message_id("e-1"))
            .await
            .expect("routed to audit at least");
    }
    assert_eq!(stats(&client, "deduped").await.ready, 1);
    assert_eq!(stats(&client, "audit").await.ready, 2);
}

// ---------------------------------------------------------------------------------------------
// Leases.

/// The lease of the lease tests.
const ACK_TIMEOUT: Duration = Duration::from_millis(300);

#[tokio::test]
async fn a_lapsed_lease_redelivers_to_another_consumer_and_the_late_ack_is_harmless() {
    let server = TestServer::start().await;
    let holder = connect(&server).await;
    let other = connect(&server).await;
    holder.declare_queue("work").await.unwrap();
    // The holder gets the message but never takes it from its stream: nothing extends it.
    let mut holding = holder
        .consume("work", manual(1).ack_timeout(ACK_TIMEOUT))
        .await
        .unwrap();
    let published_at = Instant::now();
    holder
        .publish("", "work", Message::new("task"))
        .await
        .unwrap();
    wait_for_stats(&holder, "work", |stats| stats.unacked == 1).await;
    let mut taking = other.consume("work", manual(1)).await.unwrap();
    let redelivered = next(&mut taking).await;
    assert_at_least(published_at.elapsed(), ACK_TIMEOUT, "redelivered");
    assert_eq!(&redelivered.body()[..], b"task");
    assert!(redelivered.redelivered());
    assert_eq!(redelivered.delivery_count(), 2);

    // The first delivery, settled late: accepted and ignored, the connection lives.
    let late = next(&mut holding).await;
    assert_eq!(&late.body()[..], b"task");
    late.ack().await.unwrap();
    let work = stats(&holder, "work").await;
    assert!(!holder.is_closed());
    assert_eq!((work.unacked, work.acked), (1, 0), "{work:?}");
    redelivered.ack().await.unwrap();
    wait_for_stats(&holder, "work", |stats| {
        stats.unacked == 0 && stats.ready == 0 && stats.acked == 1
    })
    .await;
}

fn subscribe_request(queue: &str, auto_ack: bool, arguments: Table) -> Request {
    Request::Subscribe {
        queue: queue.into(),
        consumer_tag: 1,
        prefetch: 1,
        auto_ack,
        exclusive: false,
        priority: 0,
        initial_credit: None,
        arguments,
    }
}

/// Subscribes `raw` to `queue` with `arguments`; returns the response.
async fn raw_subscribe(raw: &mut Raw, queue: &str, auto_ack: bool, arguments: Table) -> Response {
    raw.request(subscribe_request(queue, auto_ack, arguments))
        .await
}

fn ack_timeout_arguments(value: Value) -> Table {
    Table::try_from_entries([("x-ack-timeout", value)]).unwrap()
}

#[tokio::test]
async fn touch_keeps_the_lease_of_a_delivery_being_worked_on() {
    let server = TestServer::start().await;
    let client = connect(&server).await;
    client.declare_queue("work").await.unwrap();
    client
        .publish("", "work", Message::new("long task"))
        .await
        .unwrap();
    let mut raw = Raw::open(server.addr()).await;
    let timeout_ms = i64::try_from(ACK_TIMEOUT.as_millis()).unwrap();
    raw.send(&Frame::Request {
        correlation_id: 1,
        request: subscribe_request("work", false, ack_timeout_arguments(Value::I64(timeout_ms))),
    })
    .await;
    // The first delivery may come before or after the `Subscribed` response.
    let (mut subscribed, mut delivery_tag) = (false, None);
    while !subscribed || delivery_tag.is_none() {
        match raw.recv_significant().await {
            Some(Frame::Deliver(deliver)) => delivery_tag = Some(deliver.delivery.delivery_tag),
            Some(Frame::Response {
                response: Response::Subscribed { .. },
                ..
            }) => subscribed = true,
            other => panic!("{other:?}"),
        }
    }
    let delivery_tag = delivery_tag.expect("delivered");
    // A competing consumer would get the message as soon as the lease lapsed.
    let mut competitor = client.consume("work", manual(1)).await.unwrap();
    let mut touches = tokio::time::interval(ACK_TIMEOUT / 3);
    let working_until = Instant::now() + ACK_TIMEOUT * 3;
    while Instant::now() < working_until {
        tokio::select! {
            _ = touches.tick() => raw.send(&Frame::Touch(Touch { delivery_tag })).await,
            stolen = competitor.next() => panic!("lease lapsed despite touches: {stolen:?}"),
        }
    }
    raw.send(&Frame::Ack(Ack {
        delivery_tag,
        multiple: false,
    }))
    .await;
    match raw
        .request(Request::QueueStatsV2 {
            name: "work".into(),
        })
        .await
    {
        Response::StatsV2(stats) => {
            assert_eq!(
                (stats.unacked, stats.acked, stats.redelivered),
                (0, 1, 0),
                "{stats:?}"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn the_client_extends_the_lease_while_a_long_handler_runs() {
    let server = TestServer::start().await;
    let worker = connect(&server).await;
    let other = connect(&server).await;
    worker.declare_queue("reports").await.unwrap();
    worker
        .publish("", "reports", Message::new("quarterly"))
        .await
        .unwrap();
    let mut consumer = worker
        .consume("reports", manual(1).ack_timeout(ACK_TIMEOUT))
        .await
        .unwrap();
    let delivery = next(&mut consumer).await;
    let mut competitor = other.consume("reports", manual(1)).await.unwrap();
    let handler_time = ACK_TIMEOUT * 3;
    let processing = delivery.process(async |delivery| {
        // "Work" for three lease periods without touching anything; a lapsed lease would hand
        // the message to the competitor meanwhile.
        tokio::select! {
            _ = tokio::time::sleep(handler_time) => Ok::<_, ClientError>(delivery.body().len()),
            stolen = competitor.next() => panic!("lease lapsed during the handler: {stolen:?}"),
        }
    });
    assert_eq!(processing.await.unwrap(), "quarterly".len());
    wait_for_stats(&worker, "reports", |stats| {
        stats.unacked == 0 && stats.acked == 1
    })
    .await;
    assert_eq!(stats(&worker, "reports").await.redelivered, 0);
}

#[tokio::test]
async fn an_invalid_x_ack_timeout_is_refused_and_the_connection_lives() {
    let server = TestServer::start().await;
    let client = connect(&server).await;
    client.declare_queue("work").await.unwrap();
    let mut raw = Raw::open(server.addr()).await;
    let too_long = i64::try_from(DURATION_MS_MAX + 1).unwrap();
    let cases = [
        (false, Value::I64(0)),
        (false, Value::I64(-5)),
        (false, Value::I64(too_long)),
        (false, Value::Str("30s".into())),
        (false, Value::F64(1.5)),
        // Auto-ack deliveries are settled when sent: a lease makes no sense.
        (true, Value::I64(1000)),
    ];
    for (auto_ack, value) in cases {
        let response = raw_subscribe(
            &mut raw,
            "work",
            auto_ack,
            ack_timeout_arguments(value.clone()),
        )
        .await;
        match response {
            Response::Error { code, message } => {
                assert_eq!(code, ErrorCode::InvalidArgument, "{value:?}: {message}");
                assert!(message.contains("x-ack-timeout"), "{message}");
            }
            other => panic!("{value:?} accepted: {other:?}"),
        }
    }
    let fine = raw_subscribe(
        &mut raw,
        "work",
        false,
        ack_timeout_arguments(Value::I64(1000)),
    )
    .await;
    assert!(matches!(fine, Response::Subscribed { .. }), "{fine:?}");
}

#[tokio::test]
async fn touching_a_tag_never_delivered_closes_the_connection() {
    let server = TestServer::start().await;
    let mut raw = Raw::open(server.addr()).await;
    raw.send(&Frame::Touch(Touch { delivery_tag: 42 })).await;
    let close = raw.expect_close().await;
    assert_eq!(close.code, ErrorCode::UnknownDeliveryTag, "{close:?}");
}

// ---------------------------------------------------------------------------------------------
// Queue expiry and redrive.

fn is_not_found<T: std::fmt::Debug>(result: &Result<T, ClientError>) -> bool {
    matches!(result, Err(err) if err.is_not_found())
}

#[tokio::test]
async fn an_unused_queue_with_x_expires_is_deleted_and_a_used_one_is_kept() {
    let server = TestServer::start().await;
    let client = connect(&server).await;
    let idle = Duration::from_millis(200);
    let declared_at = Instant::now();
    client.declare_queue("idle").expires(idle).await.unwrap();
    client.declare_queue("busy").expires(idle).await.unwrap();
    let consumer = client.consume("busy", manual(1)).await.unwrap();
    loop {
        if is_not_found(&client.queue_stats("idle").await) {
            break;
        }
        assert!(declared_at.elapsed() < DEADLINE, "idle never expired");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_at_least(declared_at.elapsed(), idle, "deleted");
    // Past its expiry too, but in use.
    client
        .queue_stats("busy")
        .await
        .expect("a queue with a consumer stays");
    consumer.cancel().await.unwrap();
    let unused_at = Instant::now();
    loop {
        if is_not_found(&client.queue_stats("busy").await) {
            break;
        }
        assert!(unused_at.elapsed() < DEADLINE, "busy never expired");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_at_least(unused_at.elapsed(), idle, "deleted after its consumer left");
}

#[tokio::test]
async fn redrive_moves_dead_letters_back_without_their_death_records() {
    let server = TestServer::start().await;
    let client = connect(&server).await;
    // The dead letters stay in `work.dead`: nobody consumes them.
    let dead = with_dead_letters(&client, "work", |declare| declare).await;
    dead.cancel().await.unwrap();
    let mut failing = client.consume("work", manual(10)).await.unwrap();
    for body in ["a", "b", "c"] {
        client
            .publish("", "work", Message::new(body))
            .await
            .unwrap();
    }
    for _ in 0..3 {
        next(&mut failing).await.reject().await.unwrap();
    }
    failing.cancel().await.unwrap();
    wait_for_stats(&client, "work.dead", |stats| stats.ready == 3).await;

    assert_eq!(client.redrive("work.dead", 2).await.unwrap(), 2);
    assert_eq!(stats(&client, "work.dead").await.ready, 1);
    assert_eq!(stats(&client, "work").await.ready, 2);
    assert_eq!(client.redrive("work.dead", 0).await.unwrap(), 1);
    assert_eq!(client.redrive("work.dead", 0).await.unwrap(), 0);
    let mut work = client.consume("work", manual(10)).await.unwrap();
    for body in ["a", "b", "c"] {
        let delivery = next(&mut work).await;
        assert_eq!(&delivery.body()[..], body.as_bytes());
        assert_eq!(delivery.routing_key(), "work");
        assert!(delivery.header("x-death").is_none(), "death records kept");
        delivery.ack().await.unwrap();
    }
    let err = client.redrive("no-such-queue", 0).await.unwrap_err();
    assert!(err.is_not_found(), "{err:?}");
}

// ---------------------------------------------------------------------------------------------
// Protocol versions.

/// A raw connection that announces protocol 1.0.
async fn raw_1_0(server: &TestServer) -> Raw {
    let mut raw = Raw::connect(server.addr()).await;
    raw.send_bytes(&Preamble { major: 1, minor: 0 }.encode())
        .await;
    raw.send(&Raw::hello()).await;
    let preamble = raw.read_preamble().await.expect("server preamble");
    assert_eq!(preamble, Preamble::CURRENT);
    match raw.recv().await {
        Some(Frame::HelloOk(hello_ok)) => assert_eq!(hello_ok.protocol_minor, 0),
        other => panic!("expected HelloOk, got {other:?}"),
    }
    raw
}

#[tokio::test]
async fn a_1_0_connection_sending_what_1_1_added_is_closed_as_a_violation() {
    let server = TestServer::start().await;
    let mut raw = raw_1_0(&server).await;
    // 1.0 requests still work.
    assert!(matches!(
        raw.request(Request::ListQueues).await,
        Response::Queues(_)
    ));
    raw.send(&Frame::Touch(Touch { delivery_tag: 1 })).await;
    let close = raw.expect_close().await;
    assert_eq!(close.code, ErrorCode::ProtocolViolation, "{close:?}");

    let mut raw = raw_1_0(&server).await;
    raw.send(&Frame::Request {
        correlation_id: 1,
        request: Request::Redrive {
            queue: "dlq".into(),
            max: 0,
        },
    })
    .await;
    let close = raw.expect_close().await;
    assert_eq!(close.code, ErrorCode::ProtocolViolation, "{close:?}");

    // The same request on a 1.1 connection is answered.
    let mut raw = Raw::open(server.addr()).await;
    let response = raw
        .request(Request::Redrive {
            queue: "dlq".into(),
            max: 0,
        })
        .await;
    assert!(
        matches!(
            response,
            Response::Error {
                code: ErrorCode::NotFound,
                ..
            }
        ),
        "{response:?}"
    );
    let client = connect(&server).await;
    assert_eq!(
        client.protocol_minor(),
        wharf_protocol::limits::PROTOCOL_MINOR
    );
    assert!(client.protocol_minor() >= wharf_protocol::MINOR_QUEUE_FEATURES);
}

/// `Subscribe.initial_credit` as docs/protocol.md ("Flow control") specifies it, over the raw
/// protocol: `Some(n)` is credit mode (n deliveries, then one more per credit granted); `None`
/// is not (an auto-ack consumer gets everything ready; a `Credit` frame is ignored). The
/// queue's counters are read after the subscribe's response, which follows the dispatch of
/// the same batch.
#[tokio::test]
async fn initial_credit_starts_credit_mode_and_none_means_no_credit_limit() {
    let server = TestServer::start().await;
    let client = connect(&server).await;
    for (queue, initial_credit, ready_after_subscribe) in
        [("credited", Some(1), 4), ("uncredited", None, 0)]
    {
        client.declare_queue(queue).await.unwrap();
        for idx in 0..5 {
            client
                .publish("", queue, Message::new(format!("{idx}")))
                .await
                .unwrap();
        }
        let mut raw = Raw::open(server.addr()).await;
        let response = raw
            .request(Request::Subscribe {
                queue: queue.into(),
                consumer_tag: 1,
                prefetch: 2,
                auto_ack: true,
                exclusive: false,
                priority: 0,
                initial_credit,
                arguments: Table::default(),
            })
            .await;
        assert!(
            matches!(response, Response::Subscribed { .. }),
            "{response:?}"
        );
        let stats = client.queue_stats_v2(queue).await.unwrap();
        assert_eq!(
            stats.ready, ready_after_subscribe,
            "{queue} after subscribing"
        );
        raw.send(&Frame::Credit(wharf_protocol::Credit {
            consumer_tag: 1,
            credit: 2,
        }))
        .await;
        let expected = if initial_credit.is_some() { 2 } else { 0 };
        wait_for_stats(&client, queue, |s| s.ready == expected).await;
    }
}
