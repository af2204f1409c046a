//! Time-driven queue features through the public API, with the clock set explicitly: delayed
//! delivery, deferred nacks, retry schedules, TTL (message and queue), leases (ack timeouts),
//! queue expiry, dedup windows and dead-letter redrive.

use std::sync::Arc;
use wharf_core::{
    Command, ConnectionId, ConsumerOptions, ConsumerTag, CoreError, DeliveryTag, Effect,
    HeaderValue, Headers, Limits, Message, QueueOptions, Reply,
};

const C1: ConnectionId = ConnectionId(1);
const C2: ConnectionId = ConnectionId(2);

mod common;
use common::{Clock, Harness};

impl Harness {
    fn new() -> Self {
        Harness::open(Limits::default(), 1_000, Clock::Manual, &[C1, C2])
    }

    /// Moves the clock to `now` and fires what is due.
    fn tick_at(&mut self, now: u64) {
        self.now = now;
        self.ok(Command::Tick);
    }

    fn declare(&mut self, name: &str, durable: bool, arguments: Headers) {
        self.ok(Command::DeclareQueue {
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
        });
    }

    fn publish(&mut self, message: Message) -> Reply {
        self.ok(Command::Publish {
            vhost: wharf_core::DEFAULT_VHOST.into(),
            message: Arc::new(message),
        })
    }

    fn subscribe(
        &mut self,
        connection: ConnectionId,
        queue: &str,
        tag: u32,
        options: ConsumerOptions,
    ) {
        self.ok(Command::Subscribe {
            vhost: wharf_core::DEFAULT_VHOST.into(),
            connection,
            queue: queue.to_owned(),
            consumer_tag: ConsumerTag(tag),
            options,
        });
    }

    /// Deliveries since the last call: (connection, body, tag, redelivered).
    fn delivered(&mut self) -> Vec<(ConnectionId, String, DeliveryTag, bool)> {
        self.effects
            .drain(..)
            .filter_map(|effect| match effect {
                Effect::Deliver(delivery) => Some((
                    delivery.connection,
                    String::from_utf8(delivery.message.body.to_vec()).unwrap(),
                    delivery.delivery_tag,
                    delivery.redelivered,
                )),
                _ => None,
            })
            .collect()
    }

    fn bodies(&mut self) -> Vec<String> {
        self.delivered()
            .into_iter()
            .map(|(_, body, _, _)| body)
            .collect()
    }

    /// Takes the single delivery made since the last call.
    fn one(&mut self) -> (ConnectionId, String, DeliveryTag, bool) {
        let mut delivered = self.delivered();
        assert_eq!(delivered.len(), 1, "{delivered:?}");
        delivered.pop().unwrap()
    }

    fn stats(&self, queue: &str) -> wharf_core::QueueStats {
        self.broker
            .queue_stats(wharf_core::DEFAULT_VHOST, queue)
            .unwrap()
    }

    /// The messages ready in `queue`, drained through a fresh auto-ack consumer.
    fn drain(&mut self, queue: &str) -> Vec<Arc<Message>> {
        self.effects.clear();
        self.subscribe(
            C2,
            queue,
            999,
            ConsumerOptions {
                auto_ack: true,
                prefetch: 0,
                ..ConsumerOptions::default()
            },
        );
        let messages = self
            .effects
            .drain(..)
            .filter_map(|effect| match effect {
                Effect::Deliver(delivery) => Some(delivery.message),
                _ => None,
            })
            .collect();
        self.ok(Command::Cancel {
            connection: C2,
            consumer_tag: ConsumerTag(999),
        });
        messages
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

fn manual(prefetch: u32) -> ConsumerOptions {
    ConsumerOptions {
        prefetch,
        ..ConsumerOptions::default()
    }
}

fn delayed(queue: &str, body: &str, delay_ms: u64) -> Message {
    Message {
        delay_ms: Some(delay_ms),
        ..Message::new(queue, body.to_owned())
    }
}

fn with_ttl(queue: &str, body: &str, ttl_ms: u64) -> Message {
    Message {
        expiration_ms: Some(ttl_ms),
        ..Message::new(queue, body.to_owned())
    }
}

fn with_id(queue: &str, body: &str, id: &str) -> Message {
    Message {
        message_id: Some(id.to_owned()),
        ..Message::new(queue, body.to_owned())
    }
}

fn death_reason(message: &Message) -> Option<String> {
    match message.headers.get("x-death")? {
        HeaderValue::List(records) => match records.first()? {
            HeaderValue::Map(record) => Some(record.get("reason")?.as_str()?.to_owned()),
            _ => None,
        },
        _ => None,
    }
}

/// A work queue whose dead letters go to `dead` through the default exchange.
fn with_dead_letter_queue(harness: &mut Harness, mut arguments: Headers) {
    harness.declare("dead", false, Headers::new());
    arguments.insert("x-dead-letter-exchange", "");
    arguments.insert("x-dead-letter-routing-key", "dead");
    harness.declare("work", false, arguments);
}

// ----- delayed delivery -----

/// A delay longer than `DURATION_MS_MAX` would hold the message forever: the publish is
/// refused (issue #17) and nothing changes; the maximum itself is accepted.
#[test]
fn a_publish_delayed_past_the_maximum_is_refused_and_changes_nothing() {
    let mut harness = Harness::new();
    harness.declare("q", false, Headers::new());
    for delay_ms in [wharf_core::DURATION_MS_MAX + 1, u64::MAX] {
        let refused = harness.apply(Command::Publish {
            vhost: wharf_core::DEFAULT_VHOST.into(),
            message: Arc::new(delayed("q", "forever", delay_ms)),
        });
        assert!(
            matches!(&refused, Err(CoreError::InvalidArgument { reason }) if reason.contains("delay")),
            "{delay_ms}: {refused:?}"
        );
    }
    let stats = harness.stats("q");
    assert_eq!((stats.ready, stats.delayed, stats.published), (0, 0, 0));
    harness.publish(delayed("q", "far", wharf_core::DURATION_MS_MAX));
    assert_eq!(harness.stats("q").delayed, 1);
}

#[test]
fn a_delayed_message_is_held_until_due_then_delivered_in_due_order() {
    let mut harness = Harness::new();
    harness.declare("jobs", false, Headers::new());
    harness.subscribe(C1, "jobs", 1, manual(0));
    harness.publish(delayed("jobs", "late", 500));
    harness.publish(delayed("jobs", "early", 100));
    harness.publish(Message::new("jobs", "now"));
    assert_eq!(harness.bodies(), ["now"]);
    assert_eq!(harness.stats("jobs").delayed, 2);
    assert_eq!(harness.broker.delayed_total(), 2);
    assert_eq!(harness.broker.next_deadline(), Some(1_100));
    harness.tick_at(1_099);
    assert!(
        harness.bodies().is_empty(),
        "nothing is due before its time"
    );
    harness.tick_at(1_100);
    assert_eq!(harness.bodies(), ["early"]);
    harness.tick_at(5_000);
    assert_eq!(harness.bodies(), ["late"]);
    assert_eq!(harness.stats("jobs").delayed, 0);
    assert_eq!(harness.broker.delayed_total(), 0);
    assert_eq!(harness.broker.next_deadline(), None);
    assert_eq!(harness.stats("jobs").published, 3);
}

#[test]
fn a_delayed_persistent_message_is_logged_with_its_due_time_and_restored_held() {
    let mut harness = Harness::new();
    harness.declare("jobs", true, Headers::new());
    harness.publish(Message {
        persistent: true,
        ..delayed("jobs", "later", 300)
    });
    let logged = harness.effects.iter().find_map(|effect| match effect {
        Effect::DurableEnqueued {
            durable_id,
            ready_at_ms,
            ..
        } => Some((*durable_id, *ready_at_ms)),
        _ => None,
    });
    assert_eq!(logged, Some((1, 1_300)));
    let kept = harness.broker.durable_messages();
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].2, [(Arc::from("jobs"), Some(1_300))]);

    // Recovery in a new broker: still held until 1,300; a message already due is ready.
    let mut restored = Harness::new();
    restored.now = 1_200;
    restored.declare("jobs", true, Headers::new());
    for (durable_id, body, ready_at_ms) in [(1, "held", 1_300), (2, "due", 900)] {
        restored.ok(Command::Restore {
            vhost: wharf_core::DEFAULT_VHOST.into(),
            queue: "jobs".into(),
            durable_id,
            message: Arc::new(Message {
                persistent: true,
                ..Message::new("jobs", body)
            }),
            ready_at_ms,
        });
    }
    assert_eq!(restored.stats("jobs").delayed, 1);
    restored.subscribe(C1, "jobs", 1, manual(0));
    assert_eq!(restored.bodies(), ["due"]);
    restored.tick_at(1_300);
    assert_eq!(restored.bodies(), ["held"]);
}

#[test]
fn deleting_a_queue_drops_its_delayed_messages() {
    let mut harness = Harness::new();
    harness.declare("jobs", false, Headers::new());
    harness.publish(delayed("jobs", "a", 100));
    harness.publish(delayed("jobs", "b", 100));
    assert_eq!(harness.broker.delayed_total(), 2);
    harness.ok(Command::DeleteQueue {
        vhost: wharf_core::DEFAULT_VHOST.into(),
        connection: C1,
        name: "jobs".into(),
        if_unused: false,
        if_empty: false,
    });
    assert_eq!(harness.broker.delayed_total(), 0);
    harness.declare("jobs", false, Headers::new());
    harness.subscribe(C1, "jobs", 1, manual(0));
    harness.tick_at(2_000);
    assert!(
        harness.bodies().is_empty(),
        "the new queue of the same name gets none"
    );
}

// ----- defer and retry -----

#[test]
fn defer_requeues_a_delivery_after_its_delay_flagged_redelivered() {
    let mut harness = Harness::new();
    harness.declare("jobs", false, Headers::new());
    harness.subscribe(C1, "jobs", 1, manual(1));
    harness.publish(Message::new("jobs", "a"));
    harness.publish(Message::new("jobs", "b"));
    let (_, body, tag, _) = harness.one();
    assert_eq!(body, "a");
    harness.ok(Command::Defer {
        connection: C1,
        delivery_tag: tag,
        delay_ms: 250,
    });
    // Capacity freed at once: "b" is delivered while "a" waits.
    let (_, body, tag_b, _) = harness.one();
    assert_eq!(body, "b");
    assert_eq!(harness.stats("jobs").delayed, 1);
    harness.ok(Command::Ack {
        connection: C1,
        delivery_tag: tag_b,
        multiple: false,
    });
    harness.tick_at(1_249);
    assert!(harness.delivered().is_empty());
    harness.tick_at(1_250);
    let (_, body, _, redelivered) = harness.one();
    assert_eq!((body.as_str(), redelivered), ("a", true));
    let err = harness
        .apply(Command::Defer {
            connection: C1,
            delivery_tag: DeliveryTag(99),
            delay_ms: 1,
        })
        .unwrap_err();
    assert_eq!(err, CoreError::UnknownDeliveryTag { tag: 99 });
    let err = harness
        .apply(Command::Defer {
            connection: C1,
            delivery_tag: DeliveryTag(3),
            delay_ms: u64::MAX,
        })
        .unwrap_err();
    assert!(matches!(err, CoreError::InvalidArgument { .. }), "{err:?}");
}

#[test]
fn a_retry_schedule_delays_each_requeue_then_dead_letters() {
    let mut harness = Harness::new();
    let schedule = HeaderValue::List(vec![int(100), int(1_000)]);
    with_dead_letter_queue(&mut harness, args(&[("x-retry", schedule)]));
    harness.subscribe(C1, "work", 1, manual(0));
    harness.publish(Message::new("work", "job"));
    let mut times = Vec::new();
    loop {
        let delivered = harness.delivered();
        if delivered.is_empty() {
            break;
        }
        let (_, _, tag, _) = delivered[0].clone();
        times.push(harness.now);
        harness.ok(Command::Nack {
            connection: C1,
            delivery_tag: tag,
            multiple: false,
            requeue: true,
        });
        if let Some(due) = harness.broker.next_deadline() {
            harness.tick_at(due);
        }
    }
    assert_eq!(
        times,
        [1_000, 1_100, 2_100],
        "delivered, then after 100 ms, then after 1 s"
    );
    let dead = harness.drain("dead");
    assert_eq!(dead.len(), 1);
    assert_eq!(death_reason(&dead[0]).as_deref(), Some("rejected"));
    assert_eq!(harness.stats("work").dropped, 1);
}

#[test]
fn retry_schedules_are_validated() {
    let mut harness = Harness::new();
    for bad in [
        HeaderValue::List(vec![]),
        HeaderValue::List(vec![int(-1)]),
        HeaderValue::List(vec![text("1s")]),
        HeaderValue::List(vec![int(1); 65]),
        int(100),
    ] {
        let err = harness
            .apply(Command::DeclareQueue {
                vhost: wharf_core::DEFAULT_VHOST.into(),
                connection: C1,
                name: "q".into(),
                options: QueueOptions {
                    arguments: args(&[("x-retry", bad.clone())]),
                    ..QueueOptions::default()
                },
                passive: false,
                declarer: None,
            })
            .unwrap_err();
        assert!(
            matches!(err, CoreError::InvalidArgument { .. }),
            "{bad:?}: {err:?}"
        );
    }
}

// ----- TTL -----

#[test]
fn message_ttl_expires_ready_messages_into_the_dead_letter_queue() {
    let mut harness = Harness::new();
    with_dead_letter_queue(&mut harness, args(&[("x-message-ttl", int(500))]));
    harness.publish(Message::new("work", "queue-ttl"));
    harness.publish(with_ttl("work", "own-ttl", 100));
    harness.publish(with_ttl("work", "longer-own-ttl", 10_000));
    harness.tick_at(1_100);
    assert_eq!(
        harness.stats("work").expired,
        0,
        "alive through its last millisecond"
    );
    harness.tick_at(1_101);
    assert_eq!(
        harness.stats("work").expired,
        1,
        "the 100 ms message, not at the head"
    );
    assert_eq!(harness.stats("work").ready, 2);
    harness.tick_at(1_501);
    assert_eq!(
        harness.stats("work").expired,
        3,
        "the queue TTL caps the message's"
    );
    assert_eq!(harness.stats("work").ready, 0);
    let dead = harness.drain("dead");
    let bodies: Vec<&[u8]> = dead.iter().map(|message| &message.body[..]).collect();
    assert_eq!(bodies, [&b"own-ttl"[..], b"queue-ttl", b"longer-own-ttl"]);
    for message in &dead {
        assert_eq!(death_reason(message).as_deref(), Some("expired"));
        assert_eq!(message.expiration_ms, None, "dead letters lose their TTL");
    }
}

#[test]
fn an_expired_message_is_never_delivered_even_before_its_timer_fires() {
    let mut harness = Harness::new();
    with_dead_letter_queue(&mut harness, Headers::new());
    harness.publish(with_ttl("work", "stale", 10));
    harness.publish(Message::new("work", "fresh"));
    harness.now = 2_000; // no tick: the consumer arrives first
    harness.subscribe(C1, "work", 1, manual(0));
    assert_eq!(harness.bodies(), ["fresh"]);
    assert_eq!(harness.stats("work").expired, 1);
    assert_eq!(
        harness.stats("dead").ready,
        1,
        "dead-lettered in the same command"
    );
}

#[test]
fn a_requeued_message_keeps_its_expiry() {
    let mut harness = Harness::new();
    harness.declare("work", false, args(&[("x-message-ttl", int(300))]));
    harness.subscribe(C1, "work", 1, manual(0));
    harness.publish(Message::new("work", "a"));
    let (_, _, tag, _) = harness.one();
    harness.tick_at(1_400); // the TTL timer fires while it is out: nothing happens
    assert_eq!(harness.stats("work").expired, 0);
    harness.ok(Command::Cancel {
        connection: C1,
        consumer_tag: ConsumerTag(1),
    });
    let _ = tag;
    assert_eq!(harness.stats("work").ready, 1);
    harness.tick_at(1_400);
    assert_eq!(
        harness.stats("work").expired,
        1,
        "requeued past its TTL: expired at once"
    );
}

#[test]
fn ttl_arguments_are_validated() {
    let mut harness = Harness::new();
    for (key, bad) in [
        ("x-message-ttl", int(-1)),
        ("x-message-ttl", text("1s")),
        ("x-expires", int(0)),
        ("x-dedup-window", int(0)),
        ("x-dedup-window", int(i64::MAX)),
    ] {
        let err = harness
            .apply(Command::DeclareQueue {
                vhost: wharf_core::DEFAULT_VHOST.into(),
                connection: C1,
                name: "q".into(),
                options: QueueOptions {
                    arguments: args(&[(key, bad.clone())]),
                    ..QueueOptions::default()
                },
                passive: false,
                declarer: None,
            })
            .unwrap_err();
        assert!(
            matches!(err, CoreError::InvalidArgument { .. }),
            "{key} {bad:?}: {err:?}"
        );
    }
}

// ----- leases -----

#[test]
fn a_lapsed_lease_goes_to_another_consumer_and_a_late_ack_is_harmless() {
    let mut harness = Harness::new();
    harness.declare("jobs", false, Headers::new());
    let leased = ConsumerOptions {
        prefetch: 1,
        ack_timeout_ms: Some(1_000),
        ..ConsumerOptions::default()
    };
    harness.subscribe(C1, "jobs", 1, leased.clone());
    harness.publish(Message::new("jobs", "slow"));
    let (conn, _, tag, _) = harness.one();
    assert_eq!(conn, C1);
    harness.subscribe(C2, "jobs", 2, leased);
    harness.tick_at(1_999);
    assert!(harness.delivered().is_empty());
    harness.tick_at(2_000);
    let (conn, body, tag2, redelivered) = harness.one();
    assert_eq!((conn, body.as_str(), redelivered), (C2, "slow", true));
    assert_eq!(harness.stats("jobs").unacked, 1);
    // The first consumer finishes late: accepted, nothing settled, nothing closed.
    let reply = harness.ok(Command::Ack {
        connection: C1,
        delivery_tag: tag,
        multiple: false,
    });
    assert_eq!(reply, Reply::Settled { count: 0 });
    harness.ok(Command::Ack {
        connection: C2,
        delivery_tag: tag2,
        multiple: false,
    });
    assert_eq!(harness.stats("jobs").acked, 1);
    assert_eq!(harness.stats("jobs").unacked, 0);
    // Settling the lapsed tag twice is an unknown tag again.
    assert_eq!(
        harness.apply(Command::Ack {
            connection: C1,
            delivery_tag: tag,
            multiple: false,
        }),
        Err(CoreError::UnknownDeliveryTag { tag: tag.0 })
    );
}

#[test]
fn touch_extends_a_lease() {
    let mut harness = Harness::new();
    harness.declare("jobs", false, Headers::new());
    harness.subscribe(
        C1,
        "jobs",
        1,
        ConsumerOptions {
            ack_timeout_ms: Some(1_000),
            ..ConsumerOptions::default()
        },
    );
    harness.publish(Message::new("jobs", "long"));
    let (_, _, tag, _) = harness.one();
    // Touched every 900 ms (before each lease of 1 s lapses), with the clock moving on between.
    for now in [1_800, 2_700, 3_600] {
        harness.tick_at(now - 1);
        assert!(
            harness.delivered().is_empty(),
            "still leased at {}",
            now - 1
        );
        harness.now = now;
        harness.ok(Command::Touch {
            connection: C1,
            delivery_tag: tag,
        });
        assert_eq!(harness.stats("jobs").unacked, 1);
    }
    harness.tick_at(4_599);
    assert!(harness.delivered().is_empty());
    harness.tick_at(4_600);
    let (_, body, _, redelivered) = harness.one();
    assert_eq!((body.as_str(), redelivered), ("long", true));
    assert_eq!(
        harness.apply(Command::Touch {
            connection: C1,
            delivery_tag: DeliveryTag(77),
        }),
        Err(CoreError::UnknownDeliveryTag { tag: 77 })
    );
    for bad in [0, u64::MAX] {
        let err = harness
            .apply(Command::Subscribe {
                vhost: wharf_core::DEFAULT_VHOST.into(),
                connection: C2,
                queue: "jobs".into(),
                consumer_tag: ConsumerTag(9),
                options: ConsumerOptions {
                    ack_timeout_ms: Some(bad),
                    ..ConsumerOptions::default()
                },
            })
            .unwrap_err();
        assert!(
            matches!(err, CoreError::InvalidArgument { .. }),
            "{bad}: {err:?}"
        );
    }
}

// ----- queue expiry -----

#[test]
fn an_unused_queue_with_x_expires_is_deleted() {
    let mut harness = Harness::new();
    harness.declare("temp", true, args(&[("x-expires", int(1_000))]));
    harness.publish(Message::new("temp", "kept while used"));
    harness.subscribe(C1, "temp", 1, manual(0));
    harness.tick_at(5_000);
    assert!(
        harness
            .broker
            .queue_stats(wharf_core::DEFAULT_VHOST, "temp")
            .is_ok(),
        "a consumer keeps it"
    );
    harness.ok(Command::Cancel {
        connection: C1,
        consumer_tag: ConsumerTag(1),
    });
    harness.now = 5_500;
    harness.declare("temp", true, args(&[("x-expires", int(1_000))])); // a redeclare is a use
    harness.tick_at(6_499);
    assert!(
        harness
            .broker
            .queue_stats(wharf_core::DEFAULT_VHOST, "temp")
            .is_ok()
    );
    harness.effects.clear();
    harness.tick_at(6_500);
    assert!(
        harness
            .broker
            .queue_stats(wharf_core::DEFAULT_VHOST, "temp")
            .is_err(),
        "deleted after 1 s unused"
    );
    assert!(harness.effects.contains(&Effect::QueueDeleted {
        name: "temp".into(),
        durable: true
    }));
}

// ----- dedup -----

#[test]
fn a_message_id_seen_within_the_window_is_a_duplicate() {
    let mut harness = Harness::new();
    harness.declare("orders", false, args(&[("x-dedup-window", int(1_000))]));
    harness.declare("plain", false, Headers::new());
    harness.declare_fanout_to(&["orders", "plain"]);
    let first = harness.publish(with_id("orders", "first", "order-1"));
    assert_eq!(
        first,
        Reply::Published {
            routed: 1,
            refused_by: None,
            duplicates: 0
        }
    );
    harness.now = 1_999;
    let again = harness.publish(with_id("orders", "again", "order-1"));
    assert_eq!(
        again,
        Reply::Published {
            routed: 0,
            refused_by: None,
            duplicates: 1
        }
    );
    // Through a fanout, only the queue with the window drops its copy.
    let fanned = harness.publish(Message {
        exchange: "fan".into(),
        ..with_id("", "fanned", "order-1")
    });
    assert_eq!(
        fanned,
        Reply::Published {
            routed: 1,
            refused_by: None,
            duplicates: 1
        }
    );
    assert_eq!(harness.stats("orders").duplicates, 2);
    harness.now = 2_000; // the window has passed
    let later = harness.publish(with_id("orders", "later", "order-1"));
    assert!(
        matches!(later, Reply::Published { routed: 1, .. }),
        "{later:?}"
    );
    let bodies: Vec<Vec<u8>> = harness
        .drain("orders")
        .iter()
        .map(|message| message.body.to_vec())
        .collect();
    assert_eq!(bodies, [b"first".to_vec(), b"later".to_vec()]);
}

#[test]
fn durable_dedup_windows_are_listed_and_restored() {
    let mut harness = Harness::new();
    harness.declare("orders", true, args(&[("x-dedup-window", int(1_000))]));
    harness.publish(with_id("orders", "a", "id-a"));
    harness.now = 1_500;
    harness.publish(with_id("orders", "b", "id-b"));
    assert_eq!(
        harness.broker.durable_dedup_entries(),
        [
            (Arc::from("orders"), "id-a".to_owned(), 2_000),
            (Arc::from("orders"), "id-b".to_owned(), 2_500)
        ]
    );
    let mut restored = Harness::new();
    restored.now = 1_600;
    restored.declare("orders", true, args(&[("x-dedup-window", int(1_000))]));
    restored.ok(Command::RestoreDedup {
        vhost: wharf_core::DEFAULT_VHOST.into(),
        queue: "orders".into(),
        message_id: "id-a".into(),
        until_ms: 2_000,
    });
    // A restored logged message puts its id back in the window too.
    restored.ok(Command::Restore {
        vhost: wharf_core::DEFAULT_VHOST.into(),
        queue: "orders".into(),
        durable_id: 2,
        message: Arc::new(Message {
            persistent: true,
            ..with_id("orders", "b", "id-b")
        }),
        ready_at_ms: 1_500,
    });
    for id in ["id-a", "id-b"] {
        let reply = restored.publish(with_id("orders", "dup", id));
        assert!(
            matches!(
                reply,
                Reply::Published {
                    routed: 0,
                    duplicates: 1,
                    ..
                }
            ),
            "{id}"
        );
    }
    restored.now = 2_000;
    let reply = restored.publish(with_id("orders", "new", "id-a"));
    assert!(
        matches!(reply, Reply::Published { routed: 1, .. }),
        "{reply:?}"
    );
}

// ----- redrive -----

#[test]
fn redrive_moves_dead_letters_back_to_where_they_died() {
    let mut harness = Harness::new();
    with_dead_letter_queue(&mut harness, Headers::new());
    harness.subscribe(C1, "work", 1, manual(0));
    for body in ["a", "b", "c"] {
        harness.publish(Message::new("work", body));
    }
    for (_, _, tag, _) in harness.delivered() {
        harness.ok(Command::Reject {
            connection: C1,
            delivery_tag: tag,
            requeue: false,
        });
    }
    harness.publish(Message::new("dead", "never died"));
    harness.ok(Command::Cancel {
        connection: C1,
        consumer_tag: ConsumerTag(1),
    });
    assert_eq!(harness.stats("dead").ready, 4);
    let reply = harness.ok(Command::Redrive {
        vhost: wharf_core::DEFAULT_VHOST.into(),
        connection: C1,
        queue: "dead".into(),
        max: 2,
        into: None,
    });
    assert_eq!(reply, Reply::Redriven { moved: 2 });
    let reply = harness.ok(Command::Redrive {
        vhost: wharf_core::DEFAULT_VHOST.into(),
        connection: C1,
        queue: "dead".into(),
        max: 0,
        into: None,
    });
    assert_eq!(reply, Reply::Redriven { moved: 1 });
    let back = harness.drain("work");
    let bodies: Vec<&[u8]> = back.iter().map(|message| &message.body[..]).collect();
    assert_eq!(bodies, [&b"a"[..], b"b", b"c"]);
    for message in &back {
        assert!(message.headers.get("x-death").is_none());
        assert_eq!(&*message.routing_key, "work");
        assert_eq!(&*message.exchange, "");
    }
    let left = harness.drain("dead");
    assert_eq!(left.len(), 1, "a message without a death record stays");
    assert_eq!(
        harness.apply(Command::Redrive {
            vhost: wharf_core::DEFAULT_VHOST.into(),
            connection: C1,
            queue: "missing".into(),
            max: 0,
            into: None,
        }),
        Err(CoreError::NotFound {
            kind: wharf_core::EntityKind::Queue,
            name: "missing".into()
        })
    );
}

impl Harness {
    fn declare_fanout_to(&mut self, queues: &[&str]) {
        self.ok(Command::DeclareExchange {
            vhost: wharf_core::DEFAULT_VHOST.into(),
            name: "fan".into(),
            kind: wharf_core::ExchangeKind::Fanout,
            options: wharf_core::ExchangeOptions::default(),
            passive: false,
        });
        for queue in queues {
            self.ok(Command::Bind {
                vhost: wharf_core::DEFAULT_VHOST.into(),
                source: "fan".into(),
                target: wharf_core::BindTarget::Queue((*queue).to_owned()),
                routing_key: String::new(),
                arguments: Headers::new(),
            });
        }
    }
}

#[test]
fn a_delayed_message_entering_a_full_reject_publish_queue_is_dead_lettered_maxlen() {
    let mut harness = Harness::new();
    with_dead_letter_queue(
        &mut harness,
        args(&[
            ("x-max-length", int(1)),
            ("x-overflow", text("reject-publish")),
        ]),
    );
    for body in ["a", "b"] {
        let reply = harness.publish(delayed("work", body, 10));
        assert!(
            matches!(reply, Reply::Published { routed: 1, .. }),
            "{reply:?}"
        );
    }
    harness.tick_at(1_010);
    let stats = harness.stats("work");
    assert_eq!((stats.ready, stats.dropped, stats.delayed), (1, 1, 0));
    let dead = harness.drain("dead");
    assert_eq!(dead.len(), 1);
    assert_eq!(death_reason(&dead[0]).as_deref(), Some("maxlen"));
}

#[test]
fn redrive_expires_a_dead_letter_past_its_ttl_instead_of_moving_it() {
    let mut harness = Harness::new();
    harness.declare("dead", false, args(&[("x-message-ttl", int(10))]));
    let mut arguments = Headers::new();
    arguments.insert("x-dead-letter-exchange", "");
    arguments.insert("x-dead-letter-routing-key", "dead");
    harness.declare("work", false, arguments);
    harness.subscribe(C1, "work", 1, manual(0));
    harness.publish(Message::new("work", "x"));
    let (_, _, tag, _) = harness.one();
    harness.ok(Command::Reject {
        connection: C1,
        delivery_tag: tag,
        requeue: false,
    });
    harness.now = 1_100; // no tick: the dead letter is still ready, past its TTL
    let reply = harness.ok(Command::Redrive {
        vhost: wharf_core::DEFAULT_VHOST.into(),
        connection: C1,
        queue: "dead".into(),
        max: 0,
        into: None,
    });
    assert_eq!(reply, Reply::Redriven { moved: 0 });
    assert_eq!(harness.stats("dead").expired, 1);
    assert!(
        harness.delivered().is_empty(),
        "nothing reached the consumer on work"
    );
}

#[test]
fn a_ttl_of_zero_means_deliver_now_or_never() {
    let mut harness = Harness::new();
    with_dead_letter_queue(&mut harness, Headers::new());
    harness.subscribe(C1, "work", 1, manual(1));
    harness.publish(with_ttl("work", "taken at once", 0));
    harness.publish(with_ttl("work", "no room", 0));
    assert_eq!(harness.bodies(), ["taken at once"]);
    assert_eq!(harness.broker.next_deadline(), Some(1_001));
    harness.tick_at(1_001);
    assert_eq!(harness.stats("work").expired, 1);
    assert_eq!(harness.stats("dead").ready, 1);
}

#[test]
fn reject_publish_dlx_refuses_the_publish_and_dead_letters_the_message() {
    let mut harness = Harness::new();
    with_dead_letter_queue(
        &mut harness,
        args(&[
            ("x-max-length", int(1)),
            ("x-overflow", text("reject-publish-dlx")),
        ]),
    );
    let first = harness.publish(Message::new("work", "fits"));
    assert!(matches!(
        first,
        Reply::Published {
            routed: 1,
            refused_by: None,
            ..
        }
    ));
    let refused = harness.publish(Message::new("work", "refused"));
    assert_eq!(
        refused,
        Reply::Published {
            routed: 0,
            refused_by: Some("work".into()),
            duplicates: 0
        },
        "refused (the server turns refused_by into a refused confirm), yet not an error"
    );
    let stats = harness.stats("work");
    assert_eq!((stats.ready, stats.dropped), (1, 1));
    let dead = harness.drain("dead");
    assert_eq!(dead.len(), 1);
    assert_eq!(&dead[0].body[..], b"refused");
    assert_eq!(death_reason(&dead[0]).as_deref(), Some("maxlen"));
    // A plain reject-publish queue still fails the command and changes nothing.
    harness.declare(
        "strict",
        false,
        args(&[
            ("x-max-length", int(0)),
            ("x-overflow", text("reject-publish")),
        ]),
    );
    assert_eq!(
        harness.apply(Command::Publish {
            vhost: wharf_core::DEFAULT_VHOST.into(),
            message: Arc::new(Message::new("strict", "x")),
        }),
        Err(CoreError::QueueFull {
            queue: "strict".into()
        })
    );
}
