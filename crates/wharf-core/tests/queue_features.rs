//! Queue features through the public API: priorities (`x-max-priority`) and length limits
//! (`x-max-length`, `x-max-length-bytes`, `x-overflow`).

use std::sync::Arc;
use wharf_core::{
    Command, ConnectionId, ConsumerOptions, ConsumerTag, CoreError, DeliveryTag, Effect,
    HeaderValue, Headers, Limits, Message, QueueOptions, Reply,
};

const C1: ConnectionId = ConnectionId(1);

mod common;
use common::{Clock, Harness};

impl Harness {
    fn new() -> Self {
        Harness::open(Limits::default(), 0, Clock::PerCommand, &[C1])
    }

    fn declare(
        &mut self,
        name: &str,
        durable: bool,
        arguments: Headers,
    ) -> Result<Reply, CoreError> {
        self.apply(Command::DeclareQueue {
            vhost: wharf_core::DEFAULT_VHOST.into(),
            connection: C1,
            name: name.to_owned(),
            options: QueueOptions {
                durable,
                arguments,
                ..QueueOptions::default()
            },
            passive: false,
            declarer: None,
        })
    }

    fn publish(&mut self, message: Message) -> Result<Reply, CoreError> {
        self.apply(Command::Publish {
            vhost: wharf_core::DEFAULT_VHOST.into(),
            message: Arc::new(message),
        })
    }

    fn subscribe(&mut self, queue: &str, tag: u32, prefetch: u32) {
        self.ok(Command::Subscribe {
            vhost: wharf_core::DEFAULT_VHOST.into(),
            connection: C1,
            queue: queue.to_owned(),
            consumer_tag: ConsumerTag(tag),
            options: ConsumerOptions {
                prefetch,
                ..ConsumerOptions::default()
            },
        });
    }

    /// Bodies delivered since the last call, in order, with their delivery tags.
    fn delivered(&mut self) -> Vec<(String, DeliveryTag)> {
        self.effects
            .drain(..)
            .filter_map(|effect| match effect {
                Effect::Deliver(delivery) => Some((
                    String::from_utf8(delivery.message.body.to_vec()).unwrap(),
                    delivery.delivery_tag,
                )),
                _ => None,
            })
            .collect()
    }

    fn bodies(&mut self) -> Vec<String> {
        self.delivered().into_iter().map(|(body, _)| body).collect()
    }
}

fn message(queue: &str, body: &str, priority: u8) -> Message {
    Message {
        priority,
        ..Message::new(queue, body.to_owned())
    }
}

fn persistent(queue: &str, body: &str) -> Message {
    Message {
        persistent: true,
        ..Message::new(queue, body.to_owned())
    }
}

fn args(entries: &[(&str, HeaderValue)]) -> Headers {
    entries.iter().cloned().collect()
}

fn int(value: i64) -> HeaderValue {
    HeaderValue::Int(value)
}

fn text(value: &str) -> HeaderValue {
    HeaderValue::Str(value.to_owned())
}

// ----- priorities -----

#[test]
fn higher_priorities_are_delivered_first_and_fifo_within_a_priority() {
    let mut harness = Harness::new();
    harness
        .declare("jobs", false, args(&[("x-max-priority", int(5))]))
        .unwrap();
    for (body, priority) in [
        ("low-1", 1),
        ("high-1", 5),
        ("none", 0),
        ("low-2", 1),
        ("high-2", 5),
    ] {
        harness.publish(message("jobs", body, priority)).unwrap();
    }
    harness.subscribe("jobs", 1, 0);
    assert_eq!(
        harness.bodies(),
        ["high-1", "high-2", "low-1", "low-2", "none"]
    );
}

#[test]
fn priorities_above_the_queue_maximum_count_as_the_maximum() {
    let mut harness = Harness::new();
    harness
        .declare("jobs", false, args(&[("x-max-priority", int(2))]))
        .unwrap();
    for (body, priority) in [("p2", 2), ("p200", 200), ("p9", 9), ("p1", 1)] {
        harness.publish(message("jobs", body, priority)).unwrap();
    }
    harness.subscribe("jobs", 1, 0);
    assert_eq!(harness.bodies(), ["p2", "p200", "p9", "p1"]);
}

#[test]
fn a_queue_without_max_priority_ignores_message_priorities() {
    let mut harness = Harness::new();
    harness.declare("jobs", false, Headers::new()).unwrap();
    for (body, priority) in [("a", 0), ("b", 9), ("c", 3)] {
        harness.publish(message("jobs", body, priority)).unwrap();
    }
    harness.subscribe("jobs", 1, 0);
    assert_eq!(harness.bodies(), ["a", "b", "c"]);
}

#[test]
fn a_requeued_message_returns_to_its_arrival_place_within_its_priority() {
    let mut harness = Harness::new();
    harness
        .declare("jobs", false, args(&[("x-max-priority", int(9))]))
        .unwrap();
    harness.subscribe("jobs", 1, 1);
    // The consumer holds "first" (prefetch 1) while the rest queue up.
    for (body, priority) in [("first", 3), ("high-a", 3), ("low", 1), ("high-b", 3)] {
        harness.publish(message("jobs", body, priority)).unwrap();
    }
    let delivered = harness.delivered();
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0].0, "first");
    harness.ok(Command::Nack {
        connection: C1,
        delivery_tag: delivered[0].1,
        multiple: false,
        requeue: true,
    });
    let mut order = harness.bodies();
    for _ in 0..3 {
        harness.ok(Command::Ack {
            connection: C1,
            delivery_tag: DeliveryTag(0),
            multiple: true,
        });
        order.extend(harness.bodies());
    }
    assert_eq!(order, ["first", "high-a", "high-b", "low"]);
}

#[test]
fn max_priority_must_be_an_integer_from_1_to_255() {
    let mut harness = Harness::new();
    for bad in [
        int(0),
        int(256),
        int(-1),
        text("9"),
        HeaderValue::Bool(true),
    ] {
        let err = harness
            .declare("jobs", false, args(&[("x-max-priority", bad.clone())]))
            .expect_err("refused");
        assert!(
            matches!(err, CoreError::InvalidArgument { .. }),
            "{bad:?}: {err}"
        );
    }
    assert!(
        harness
            .broker
            .list_queues(wharf_core::DEFAULT_VHOST)
            .is_empty(),
        "nothing declared"
    );
    harness
        .declare("jobs", false, args(&[("x-max-priority", int(255))]))
        .unwrap();
}

// ----- length limits -----

#[test]
fn drop_head_keeps_the_newest_messages_and_counts_the_dropped() {
    let mut harness = Harness::new();
    harness
        .declare("recent", false, args(&[("x-max-length", int(2))]))
        .unwrap();
    for body in ["m1", "m2", "m3", "m4"] {
        let reply = harness.publish(Message::new("recent", body)).unwrap();
        assert_eq!(
            reply,
            Reply::Published {
                routed: 1,
                refused_by: None,
                duplicates: 0,
            }
        );
    }
    let stats = harness
        .broker
        .queue_stats(wharf_core::DEFAULT_VHOST, "recent")
        .unwrap();
    assert_eq!((stats.ready, stats.dropped, stats.published), (2, 2, 4));
    assert_eq!(harness.broker.ready_bytes_total(), 4);
    harness.subscribe("recent", 1, 0);
    assert_eq!(harness.bodies(), ["m3", "m4"]);
}

#[test]
fn drop_head_by_bytes_drops_until_the_bodies_fit() {
    let mut harness = Harness::new();
    harness
        .declare(
            "recent",
            false,
            args(&[
                ("x-max-length-bytes", int(10)),
                ("x-overflow", text("drop-head")),
            ]),
        )
        .unwrap();
    for body in ["aaaa", "bbbb", "cccccc"] {
        harness.publish(Message::new("recent", body)).unwrap();
    }
    let stats = harness
        .broker
        .queue_stats(wharf_core::DEFAULT_VHOST, "recent")
        .unwrap();
    assert_eq!((stats.ready, stats.ready_bytes, stats.dropped), (2, 10, 1));
    harness.subscribe("recent", 1, 0);
    assert_eq!(harness.bodies(), ["bbbb", "cccccc"]);
}

#[test]
fn drop_head_from_a_durable_queue_settles_the_logged_message() {
    let mut harness = Harness::new();
    harness
        .declare("recent", true, args(&[("x-max-length", int(1))]))
        .unwrap();
    harness.publish(persistent("recent", "old")).unwrap();
    harness.publish(persistent("recent", "new")).unwrap();
    let logged: Vec<(u64, bool)> = harness
        .effects
        .iter()
        .filter_map(|effect| match effect {
            Effect::DurableEnqueued { durable_id, .. } => Some((*durable_id, true)),
            Effect::DurableSettled { durable_id, .. } => Some((*durable_id, false)),
            _ => None,
        })
        .collect();
    assert_eq!(logged, [(1, true), (2, true), (1, false)]);
    let kept: Vec<u64> = harness
        .broker
        .durable_messages()
        .into_iter()
        .map(|(durable_id, _, _)| durable_id)
        .collect();
    assert_eq!(kept, [2]);
}

#[test]
fn reject_publish_refuses_when_full_and_accepts_again_once_there_is_room() {
    let mut harness = Harness::new();
    harness
        .declare(
            "bounded",
            false,
            args(&[
                ("x-max-length", int(2)),
                ("x-overflow", text("reject-publish")),
            ]),
        )
        .unwrap();
    harness.publish(Message::new("bounded", "m1")).unwrap();
    harness.publish(Message::new("bounded", "m2")).unwrap();
    let n_effects = harness.effects.len();
    let err = harness
        .publish(Message::new("bounded", "m3"))
        .expect_err("full");
    assert_eq!(
        err,
        CoreError::QueueFull {
            queue: "bounded".into()
        }
    );
    assert_eq!(harness.effects.len(), n_effects, "a refusal emits nothing");
    let stats = harness
        .broker
        .queue_stats(wharf_core::DEFAULT_VHOST, "bounded")
        .unwrap();
    assert_eq!((stats.ready, stats.published, stats.dropped), (2, 2, 0));
    harness.subscribe("bounded", 1, 1);
    let delivered = harness.delivered();
    assert_eq!(delivered[0].0, "m1");
    // m1 is unacked, m2 ready: one ready message, room for another.
    harness.publish(Message::new("bounded", "m3")).unwrap();
    harness
        .publish(Message::new("bounded", "m4"))
        .expect_err("full again");
}

#[test]
fn reject_publish_by_bytes_refuses_a_message_that_would_not_fit() {
    let mut harness = Harness::new();
    harness
        .declare(
            "bounded",
            false,
            args(&[
                ("x-max-length-bytes", int(5)),
                ("x-overflow", text("reject-publish")),
            ]),
        )
        .unwrap();
    harness.publish(Message::new("bounded", "abc")).unwrap();
    assert!(matches!(
        harness.publish(Message::new("bounded", "def")),
        Err(CoreError::QueueFull { .. })
    ));
    harness.publish(Message::new("bounded", "de")).unwrap();
}

#[test]
fn a_publish_refused_by_one_of_several_queues_is_refused_but_the_others_keep_their_copy() {
    let mut harness = Harness::new();
    harness
        .declare(
            "full",
            false,
            args(&[
                ("x-max-length", int(0)),
                ("x-overflow", text("reject-publish")),
            ]),
        )
        .unwrap();
    harness.declare("open", false, Headers::new()).unwrap();
    for queue in ["full", "open"] {
        harness.ok(Command::Bind {
            vhost: wharf_core::DEFAULT_VHOST.into(),
            source: "wharf.fanout".into(),
            target: wharf_core::BindTarget::Queue(queue.into()),
            routing_key: String::new(),
            arguments: Headers::new(),
        });
    }
    let reply = harness
        .publish(Message {
            exchange: "wharf.fanout".into(),
            ..Message::new("", "both")
        })
        .unwrap();
    assert_eq!(
        reply,
        Reply::Published {
            routed: 1,
            refused_by: Some("full".into()),
            duplicates: 0,
        }
    );
    assert_eq!(
        harness
            .broker
            .queue_stats(wharf_core::DEFAULT_VHOST, "open")
            .unwrap()
            .ready,
        1
    );
    assert_eq!(
        harness
            .broker
            .queue_stats(wharf_core::DEFAULT_VHOST, "full")
            .unwrap()
            .ready,
        0
    );
}

#[test]
fn length_limit_arguments_are_validated() {
    let mut harness = Harness::new();
    for bad in [
        args(&[("x-max-length", int(-1))]),
        args(&[("x-max-length", text("10"))]),
        args(&[("x-max-length-bytes", HeaderValue::Float(1.0))]),
        args(&[("x-overflow", text("reject-publish-dlq"))]),
        args(&[("x-overflow", text("drop-tail"))]),
        args(&[("x-overflow", int(1))]),
    ] {
        let err = harness
            .declare("q", false, bad.clone())
            .expect_err("refused");
        assert!(
            matches!(err, CoreError::InvalidArgument { .. }),
            "{bad:?}: {err}"
        );
    }
    assert!(
        harness
            .broker
            .list_queues(wharf_core::DEFAULT_VHOST)
            .is_empty()
    );
}

#[test]
fn a_redeclare_must_repeat_the_queue_arguments() {
    let mut harness = Harness::new();
    harness
        .declare("q", false, args(&[("x-max-length", int(3))]))
        .unwrap();
    harness
        .declare("q", false, args(&[("x-max-length", int(3))]))
        .unwrap();
    assert!(matches!(
        harness.declare("q", false, args(&[("x-max-length", int(4))])),
        Err(CoreError::PreconditionFailed { .. })
    ));
}

// ----- dead-lettering -----

fn bind(harness: &mut Harness, exchange: &str, queue: &str, key: &str) {
    harness.ok(Command::Bind {
        vhost: wharf_core::DEFAULT_VHOST.into(),
        source: exchange.into(),
        target: wharf_core::BindTarget::Queue(queue.into()),
        routing_key: key.into(),
        arguments: Headers::new(),
    });
}

/// The one ready message of `queue`, taken by a fresh auto-ack consumer.
fn take_one(harness: &mut Harness, queue: &str, tag: u32) -> Arc<Message> {
    harness.effects.clear();
    harness.ok(Command::Subscribe {
        vhost: wharf_core::DEFAULT_VHOST.into(),
        connection: C1,
        queue: queue.to_owned(),
        consumer_tag: ConsumerTag(tag),
        options: ConsumerOptions {
            prefetch: 0,
            auto_ack: true,
            ..ConsumerOptions::default()
        },
    });
    let messages: Vec<Arc<Message>> = harness
        .effects
        .drain(..)
        .filter_map(|effect| match effect {
            Effect::Deliver(delivery) => Some(delivery.message),
            _ => None,
        })
        .collect();
    assert_eq!(messages.len(), 1, "one message in {queue}");
    messages[0].clone()
}

fn death_records(message: &Message) -> Vec<Headers> {
    match message.headers.get("x-death") {
        Some(HeaderValue::List(records)) => records
            .iter()
            .map(|record| match record {
                HeaderValue::Map(map) => map.clone(),
                other => panic!("a death record is a map: {other:?}"),
            })
            .collect(),
        other => panic!("x-death is a list: {other:?}"),
    }
}

#[test]
fn a_rejected_message_is_dead_lettered_with_a_death_record() {
    let mut harness = Harness::new();
    harness.ok(Command::DeclareExchange {
        vhost: wharf_core::DEFAULT_VHOST.into(),
        name: "dlx".into(),
        kind: wharf_core::ExchangeKind::Direct,
        options: wharf_core::ExchangeOptions::default(),
        passive: false,
    });
    harness.declare("dead", false, Headers::new()).unwrap();
    bind(&mut harness, "dlx", "dead", "failed");
    harness
        .declare(
            "work",
            false,
            args(&[
                ("x-dead-letter-exchange", text("dlx")),
                ("x-dead-letter-routing-key", text("failed")),
            ]),
        )
        .unwrap();
    harness.publish(Message::new("work", "job")).unwrap();
    harness.subscribe("work", 1, 10);
    let delivered = harness.delivered();
    harness.ok(Command::Reject {
        connection: C1,
        delivery_tag: delivered[0].1,
        requeue: false,
    });
    assert_eq!(
        harness
            .broker
            .queue_stats(wharf_core::DEFAULT_VHOST, "work")
            .unwrap()
            .dropped,
        1
    );
    let dead = take_one(&mut harness, "dead", 2);
    assert_eq!(&dead.body[..], b"job");
    assert_eq!((&*dead.exchange, &*dead.routing_key), ("dlx", "failed"));
    let records = death_records(&dead);
    assert_eq!(records.len(), 1);
    let record = &records[0];
    assert_eq!(record.get("reason"), Some(&text("rejected")));
    assert_eq!(record.get("queue"), Some(&text("work")));
    assert_eq!(record.get("exchange"), Some(&text("")));
    assert_eq!(
        record.get("routing-keys"),
        Some(&HeaderValue::List(vec![text("work")]))
    );
    assert_eq!(record.get("count"), Some(&int(1)));
    assert!(matches!(record.get("time"), Some(HeaderValue::Int(time)) if *time > 0));
    assert_eq!(
        dead.headers.get("x-first-death-reason"),
        Some(&text("rejected"))
    );
    assert_eq!(dead.headers.get("x-first-death-queue"), Some(&text("work")));
}

#[test]
fn drop_head_dead_letters_with_reason_maxlen_and_the_original_routing_key() {
    let mut harness = Harness::new();
    harness.declare("overflow", false, Headers::new()).unwrap();
    bind(&mut harness, "wharf.direct", "overflow", "recent");
    harness
        .declare(
            "recent",
            false,
            args(&[
                ("x-max-length", int(1)),
                ("x-dead-letter-exchange", text("wharf.direct")),
            ]),
        )
        .unwrap();
    harness.publish(Message::new("recent", "old")).unwrap();
    harness.publish(Message::new("recent", "new")).unwrap();
    let dead = take_one(&mut harness, "overflow", 1);
    assert_eq!(&dead.body[..], b"old");
    assert_eq!(&*dead.routing_key, "recent");
    assert_eq!(death_records(&dead)[0].get("reason"), Some(&text("maxlen")));
    assert_eq!(&take_one(&mut harness, "recent", 2).body[..], b"new");
}

#[test]
fn a_persistent_dead_letter_is_settled_in_its_durable_queue_and_logged_in_the_next() {
    let mut harness = Harness::new();
    harness.declare("dead", true, Headers::new()).unwrap();
    harness
        .declare(
            "work",
            true,
            args(&[
                ("x-dead-letter-exchange", text("")),
                ("x-dead-letter-routing-key", text("dead")),
            ]),
        )
        .unwrap();
    harness.publish(persistent("work", "job")).unwrap();
    harness.subscribe("work", 1, 10);
    let delivered = harness.delivered();
    harness.ok(Command::Nack {
        connection: C1,
        delivery_tag: delivered[0].1,
        multiple: false,
        requeue: false,
    });
    let logged: Vec<String> = harness
        .effects
        .iter()
        .filter_map(|effect| match effect {
            Effect::DurableEnqueued {
                durable_id, queues, ..
            } => Some(format!("enqueue {durable_id} {queues:?}")),
            Effect::DurableSettled { durable_id, queue } => {
                Some(format!("settle {durable_id} {queue}"))
            }
            _ => None,
        })
        .collect();
    assert_eq!(logged, ["settle 1 work", "enqueue 2 [\"dead\"]"]);
    let kept: Vec<(u64, Vec<Arc<str>>)> = harness
        .broker
        .durable_messages()
        .into_iter()
        .map(|(durable_id, _, queues)| {
            (
                durable_id,
                queues.into_iter().map(|(queue, _)| queue).collect(),
            )
        })
        .collect();
    assert_eq!(kept, [(2, vec![Arc::from("dead")])]);
}

#[test]
fn a_missing_dead_letter_exchange_drops_the_message() {
    let mut harness = Harness::new();
    harness
        .declare(
            "work",
            false,
            args(&[
                ("x-dead-letter-exchange", text("nowhere")),
                ("x-max-length", int(1)),
            ]),
        )
        .unwrap();
    harness.publish(Message::new("work", "a")).unwrap();
    harness.publish(Message::new("work", "b")).unwrap();
    let stats = harness
        .broker
        .queue_stats(wharf_core::DEFAULT_VHOST, "work")
        .unwrap();
    assert_eq!((stats.ready, stats.dropped), (1, 1));
    assert_eq!(
        harness.broker.list_queues(wharf_core::DEFAULT_VHOST).len(),
        1
    );
}

#[test]
fn a_dead_letter_cycle_without_rejections_stops_after_one_round() {
    let mut harness = Harness::new();
    // Full queue whose dead letters come straight back to it.
    harness
        .declare(
            "loop",
            false,
            args(&[
                ("x-max-length", int(1)),
                ("x-dead-letter-exchange", text("")),
            ]),
        )
        .unwrap();
    harness.publish(Message::new("loop", "a")).unwrap();
    harness.publish(Message::new("loop", "b")).unwrap();
    // "b" pushed "a" out; "a" came back and pushed "b" out; "b" came back and pushed "a" out
    // again, whose second maxlen death in "loop" is a cycle: dropped.
    let stats = harness
        .broker
        .queue_stats(wharf_core::DEFAULT_VHOST, "loop")
        .unwrap();
    assert_eq!((stats.ready, stats.published, stats.dropped), (1, 4, 3));
    let last = take_one(&mut harness, "loop", 1);
    assert_eq!(&last.body[..], b"b");
    assert_eq!(death_records(&last).len(), 1);
}

#[test]
fn repeated_rejections_count_up_in_one_death_record() {
    let mut harness = Harness::new();
    harness
        .declare(
            "retry",
            false,
            args(&[("x-dead-letter-exchange", text(""))]),
        )
        .unwrap();
    harness.publish(Message::new("retry", "job")).unwrap();
    harness.subscribe("retry", 1, 1);
    for _ in 0..3 {
        let delivered = harness.delivered();
        assert_eq!(delivered.len(), 1);
        harness.ok(Command::Reject {
            connection: C1,
            delivery_tag: delivered[0].1,
            requeue: false,
        });
    }
    let Some(Effect::Deliver(delivery)) = harness
        .effects
        .iter()
        .rev()
        .find(|effect| matches!(effect, Effect::Deliver(_)))
        .cloned()
    else {
        panic!("the job came back a fourth time");
    };
    let records = death_records(&delivery.message);
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].get("count"), Some(&int(3)));
    assert!(!delivery.redelivered, "a dead letter is a new message");
}

#[test]
fn dead_letter_arguments_are_validated() {
    let mut harness = Harness::new();
    for bad in [
        args(&[("x-dead-letter-exchange", int(1))]),
        args(&[("x-dead-letter-routing-key", HeaderValue::Bool(true))]),
        args(&[("x-dead-letter-routing-key", text(&"k".repeat(256)))]),
    ] {
        let err = harness
            .declare("q", false, bad.clone())
            .expect_err("refused");
        assert!(
            matches!(err, CoreError::InvalidArgument { .. }),
            "{bad:?}: {err}"
        );
    }
}

// ----- delivery limit -----

#[test]
fn a_message_nacked_at_its_delivery_limit_is_dead_lettered_instead_of_requeued() {
    let mut harness = Harness::new();
    harness.declare("poison", false, Headers::new()).unwrap();
    harness
        .declare(
            "work",
            false,
            args(&[
                ("x-delivery-limit", int(2)),
                ("x-dead-letter-exchange", text("")),
                ("x-dead-letter-routing-key", text("poison")),
            ]),
        )
        .unwrap();
    harness.publish(Message::new("work", "job")).unwrap();
    harness.subscribe("work", 1, 1);
    let mut attempts = 0;
    loop {
        let delivered = harness.delivered();
        if delivered.is_empty() {
            break;
        }
        attempts += 1;
        harness.ok(Command::Nack {
            connection: C1,
            delivery_tag: delivered[0].1,
            multiple: false,
            requeue: true,
        });
    }
    assert_eq!(attempts, 2, "delivered twice, then given up");
    let stats = harness
        .broker
        .queue_stats(wharf_core::DEFAULT_VHOST, "work")
        .unwrap();
    assert_eq!((stats.ready, stats.unacked, stats.dropped), (0, 0, 1));
    let dead = take_one(&mut harness, "poison", 2);
    assert_eq!(
        death_records(&dead)[0].get("reason"),
        Some(&text("delivery_limit"))
    );
}

#[test]
fn a_message_returned_by_a_disconnect_at_its_delivery_limit_is_dropped_without_a_dead_letter_exchange()
 {
    let mut harness = Harness::new();
    harness
        .declare("work", true, args(&[("x-delivery-limit", int(1))]))
        .unwrap();
    harness.publish(persistent("work", "job")).unwrap();
    harness.subscribe("work", 1, 1);
    assert_eq!(harness.delivered().len(), 1);
    harness.ok(Command::CloseConnection { connection: C1 });
    assert!(harness.effects.contains(&Effect::DurableSettled {
        durable_id: 1,
        queue: "work".into()
    }));
    let stats = harness
        .broker
        .queue_stats(wharf_core::DEFAULT_VHOST, "work")
        .unwrap();
    assert_eq!((stats.ready, stats.dropped), (0, 1));
    assert!(harness.broker.durable_messages().is_empty());
}

#[test]
fn a_message_returned_by_a_cancel_below_its_delivery_limit_is_requeued() {
    let mut harness = Harness::new();
    harness
        .declare("work", false, args(&[("x-delivery-limit", int(2))]))
        .unwrap();
    harness.publish(Message::new("work", "job")).unwrap();
    harness.subscribe("work", 1, 1);
    assert_eq!(harness.delivered().len(), 1);
    harness.ok(Command::Cancel {
        connection: C1,
        consumer_tag: ConsumerTag(1),
    });
    assert_eq!(
        harness
            .broker
            .queue_stats(wharf_core::DEFAULT_VHOST, "work")
            .unwrap()
            .ready,
        1
    );
    harness.subscribe("work", 2, 1);
    assert_eq!(harness.delivered().len(), 1);
    harness.ok(Command::Cancel {
        connection: C1,
        consumer_tag: ConsumerTag(2),
    });
    let stats = harness
        .broker
        .queue_stats(wharf_core::DEFAULT_VHOST, "work")
        .unwrap();
    assert_eq!(
        (stats.ready, stats.dropped),
        (0, 1),
        "second return: over the limit"
    );
}
