//! Behaviour of the broker core through its public API: routing, consuming, acks, and every
//! error a user can provoke.

use std::sync::Arc;
use wharf_core::{
    BindTarget, CancelReason, Command, ConnectionId, ConsumerOptions, ConsumerTag, CoreError,
    Delivery, DeliveryTag, Effect, EntityKind, ExchangeKind, ExchangeOptions, Headers, Limits,
    Message, QueueOptions, Reply,
};

const C1: ConnectionId = ConnectionId(1);
const C2: ConnectionId = ConnectionId(2);

mod common;
use common::{Clock, Harness};

impl Harness {
    fn new() -> Self {
        Self::with_limits(Limits::default())
    }

    fn with_limits(limits: Limits) -> Self {
        Harness::open(limits, 0, Clock::PerCommand, &[C1, C2])
    }

    fn err(&mut self, command: Command) -> CoreError {
        let before_queues = self.broker.list_queues(wharf_core::DEFAULT_VHOST);
        let before_exchanges = self.broker.list_exchanges(wharf_core::DEFAULT_VHOST);
        let n_effects = self.effects.len();
        let err = self.apply(command).expect_err("command should fail");
        assert_eq!(
            self.broker.list_queues(wharf_core::DEFAULT_VHOST),
            before_queues,
            "a failed command changes nothing"
        );
        assert_eq!(
            self.broker.list_exchanges(wharf_core::DEFAULT_VHOST),
            before_exchanges,
            "a failed command changes nothing"
        );
        assert_eq!(
            self.effects.len(),
            n_effects,
            "a failed command has no effects"
        );
        err
    }

    fn queue(&mut self, name: &str) {
        self.queue_with(C1, name, QueueOptions::default());
    }

    fn queue_with(&mut self, connection: ConnectionId, name: &str, options: QueueOptions) {
        self.ok(Command::DeclareQueue {
            vhost: wharf_core::DEFAULT_VHOST.into(),
            connection,
            name: name.into(),
            options,
            passive: false,
            declarer: None,
        });
    }

    fn exchange(&mut self, name: &str, kind: ExchangeKind) {
        self.ok(Command::DeclareExchange {
            vhost: wharf_core::DEFAULT_VHOST.into(),
            name: name.into(),
            kind,
            options: ExchangeOptions::default(),
            passive: false,
        });
    }

    fn bind(&mut self, source: &str, queue: &str, key: &str) {
        self.bind_args(source, queue, key, Headers::new());
    }

    fn bind_args(&mut self, source: &str, queue: &str, key: &str, arguments: Headers) {
        self.ok(Command::Bind {
            vhost: wharf_core::DEFAULT_VHOST.into(),
            source: source.into(),
            target: BindTarget::Queue(queue.into()),
            routing_key: key.into(),
            arguments,
        });
    }

    fn publish(&mut self, exchange: &str, key: &str, body: &str) -> u32 {
        self.publish_message(Message {
            exchange: exchange.into(),
            ..Message::new(key, body.to_owned())
        })
    }

    fn publish_message(&mut self, message: Message) -> u32 {
        match self.ok(Command::Publish {
            vhost: wharf_core::DEFAULT_VHOST.into(),
            message: Arc::new(message),
        }) {
            Reply::Published { routed, .. } => routed,
            other => panic!("unexpected reply {other:?}"),
        }
    }

    fn subscribe(&mut self, connection: ConnectionId, queue: &str, tag: u32, prefetch: u32) {
        self.subscribe_with(
            connection,
            queue,
            tag,
            ConsumerOptions {
                prefetch,
                ..ConsumerOptions::default()
            },
        );
    }

    fn subscribe_with(
        &mut self,
        connection: ConnectionId,
        queue: &str,
        tag: u32,
        options: ConsumerOptions,
    ) {
        self.ok(Command::Subscribe {
            vhost: wharf_core::DEFAULT_VHOST.into(),
            connection,
            queue: queue.into(),
            consumer_tag: ConsumerTag(tag),
            options,
        });
    }

    fn deliveries(&mut self) -> Vec<Delivery> {
        let mut out = Vec::new();
        self.effects.retain(|effect| match effect {
            Effect::Deliver(delivery) => {
                out.push(delivery.clone());
                false
            }
            _ => true,
        });
        out
    }

    fn bodies(&mut self) -> Vec<String> {
        self.deliveries()
            .iter()
            .map(|delivery| String::from_utf8(delivery.message.body.to_vec()).unwrap())
            .collect()
    }

    fn ack(&mut self, connection: ConnectionId, tag: u64) {
        self.ok(Command::Ack {
            connection,
            delivery_tag: DeliveryTag(tag),
            multiple: false,
        });
    }

    fn ready(&self, queue: &str) -> u64 {
        self.broker
            .queue_stats(wharf_core::DEFAULT_VHOST, queue)
            .unwrap()
            .ready
    }
}

// ----- routing -----

#[test]
fn default_exchange_routes_by_queue_name_and_drops_unroutable() {
    let mut h = Harness::new();
    h.queue("orders");
    assert_eq!(h.publish("", "orders", "a"), 1);
    assert_eq!(h.publish("", "nowhere", "b"), 0);
    assert_eq!(h.ready("orders"), 1);
}

#[test]
fn direct_exchange_routes_on_exact_key_to_every_bound_queue_once() {
    let mut h = Harness::new();
    h.queue("q1");
    h.queue("q2");
    h.bind("wharf.direct", "q1", "red");
    h.bind("wharf.direct", "q2", "red");
    h.bind("wharf.direct", "q2", "blue");
    h.bind("wharf.direct", "q2", "blue"); // idempotent
    assert_eq!(h.publish("wharf.direct", "red", "r"), 2);
    assert_eq!(h.publish("wharf.direct", "blue", "b"), 1);
    assert_eq!(h.publish("wharf.direct", "green", "g"), 0);
    assert_eq!((h.ready("q1"), h.ready("q2")), (1, 2));
}

#[test]
fn fanout_exchange_routes_to_every_bound_queue_regardless_of_key() {
    let mut h = Harness::new();
    for name in ["f1", "f2", "f3"] {
        h.queue(name);
        h.bind("wharf.fanout", name, "ignored");
    }
    h.bind("wharf.fanout", "f1", "other-key");
    assert_eq!(
        h.publish("wharf.fanout", "anything", "x"),
        3,
        "a queue bound twice gets one copy"
    );
}

#[test]
fn topic_exchange_matches_star_and_hash_patterns() {
    let mut h = Harness::new();
    h.queue("all");
    h.queue("eu");
    h.queue("orders_any_region");
    h.bind("wharf.topic", "all", "#");
    h.bind("wharf.topic", "eu", "*.eu.*");
    h.bind("wharf.topic", "orders_any_region", "orders.#");
    assert_eq!(h.publish("wharf.topic", "orders.eu.paid", "1"), 3);
    assert_eq!(h.publish("wharf.topic", "orders", "2"), 2);
    assert_eq!(h.publish("wharf.topic", "users.eu.new", "3"), 2);
    assert_eq!(h.publish("wharf.topic", "users.us.new", "4"), 1);
    assert_eq!(
        (h.ready("all"), h.ready("eu"), h.ready("orders_any_region")),
        (4, 2, 2)
    );
}

#[test]
fn headers_exchange_matches_all_and_any() {
    let mut h = Harness::new();
    h.queue("pdf_reports");
    h.queue("pdf_or_zip");
    h.bind_args(
        "wharf.headers",
        "pdf_reports",
        "",
        Headers::new()
            .with("x-match", "all")
            .with("format", "pdf")
            .with("type", "report"),
    );
    h.bind_args(
        "wharf.headers",
        "pdf_or_zip",
        "",
        Headers::new()
            .with("x-match", "any")
            .with("format", "pdf")
            .with("format2", "zip"),
    );
    let mut message = Message::new("", "m");
    message.exchange = "wharf.headers".into();
    message.headers = Headers::new().with("format", "pdf").with("type", "report");
    assert_eq!(h.publish_message(message.clone()), 2);
    message.headers = Headers::new().with("format", "pdf");
    assert_eq!(h.publish_message(message), 1);
}

#[test]
fn exchange_to_exchange_bindings_route_through_and_survive_cycles() {
    let mut h = Harness::new();
    h.exchange("ingress", ExchangeKind::Fanout);
    h.exchange("regional", ExchangeKind::Topic);
    h.queue("eu");
    h.ok(Command::Bind {
        vhost: wharf_core::DEFAULT_VHOST.into(),
        source: "ingress".into(),
        target: BindTarget::Exchange("regional".into()),
        routing_key: String::new(),
        arguments: Headers::new(),
    });
    h.ok(Command::Bind {
        vhost: wharf_core::DEFAULT_VHOST.into(),
        source: "regional".into(),
        target: BindTarget::Exchange("ingress".into()),
        routing_key: "#".into(),
        arguments: Headers::new(),
    });
    h.bind("regional", "eu", "eu.#");
    h.bind("ingress", "eu", "");
    assert_eq!(
        h.publish("ingress", "eu.paris", "x"),
        1,
        "reached twice, enqueued once, no infinite loop"
    );
    assert_eq!(
        h.publish("ingress", "us.nyc", "y"),
        1,
        "fanout binding still delivers"
    );
    assert_eq!(h.ready("eu"), 2);
}

#[test]
fn unbind_stops_routing_and_unknown_binding_is_not_found() {
    let mut h = Harness::new();
    h.queue("q");
    h.bind("wharf.topic", "q", "a.*");
    h.ok(Command::Unbind {
        vhost: wharf_core::DEFAULT_VHOST.into(),
        source: "wharf.topic".into(),
        target: BindTarget::Queue("q".into()),
        routing_key: "a.*".into(),
        arguments: Headers::new(),
    });
    assert_eq!(h.publish("wharf.topic", "a.b", "x"), 0);
    let err = h.err(Command::Unbind {
        vhost: wharf_core::DEFAULT_VHOST.into(),
        source: "wharf.topic".into(),
        target: BindTarget::Queue("q".into()),
        routing_key: "a.*".into(),
        arguments: Headers::new(),
    });
    assert!(matches!(err, CoreError::NotFound { .. }), "{err}");
}

// ----- consuming -----

#[test]
fn competing_consumers_with_prefetch_one_take_turns() {
    let mut h = Harness::new();
    h.queue("work");
    h.subscribe(C1, "work", 1, 1);
    h.subscribe(C2, "work", 1, 1);
    for idx in 0..4 {
        h.publish("", "work", &format!("m{idx}"));
    }
    let first = h.deliveries();
    assert_eq!(
        first.iter().map(|d| d.connection).collect::<Vec<_>>(),
        vec![C1, C2]
    );
    assert_eq!(h.ready("work"), 2);
    h.ack(C2, first[1].delivery_tag.0);
    let next = h.deliveries();
    assert_eq!(next.len(), 1);
    assert_eq!(
        next[0].connection, C2,
        "only the consumer with free capacity gets the next one"
    );
    assert_eq!(
        String::from_utf8(next[0].message.body.to_vec()).unwrap(),
        "m2"
    );
}

#[test]
fn nack_with_requeue_returns_message_to_head_flagged_redelivered() {
    let mut h = Harness::new();
    h.queue("q");
    for body in ["a", "b", "c"] {
        h.publish("", "q", body);
    }
    h.subscribe(C1, "q", 1, 2);
    let first = h.deliveries();
    assert_eq!(first.len(), 2);
    // Requeue b then a: both go back to their arrival places, ahead of c.
    h.ok(Command::Nack {
        connection: C1,
        delivery_tag: first[1].delivery_tag,
        multiple: false,
        requeue: true,
    });
    let after_b = h.deliveries();
    assert_eq!(after_b.len(), 1);
    assert_eq!(&after_b[0].message.body[..], b"b");
    assert!(after_b[0].redelivered);
    assert_eq!(after_b[0].delivery_count, 2);
    h.ok(Command::Reject {
        connection: C1,
        delivery_tag: first[0].delivery_tag,
        requeue: true,
    });
    let after_a = h.deliveries();
    assert_eq!(&after_a[0].message.body[..], b"a");
    assert!(after_a[0].redelivered);
}

#[test]
fn nack_without_requeue_and_reject_drop_the_message() {
    let mut h = Harness::new();
    h.queue("q");
    h.publish("", "q", "a");
    h.publish("", "q", "b");
    h.subscribe(C1, "q", 1, 10);
    let got = h.deliveries();
    h.ok(Command::Nack {
        connection: C1,
        delivery_tag: got[0].delivery_tag,
        multiple: false,
        requeue: false,
    });
    h.ok(Command::Reject {
        connection: C1,
        delivery_tag: got[1].delivery_tag,
        requeue: false,
    });
    let stats = h
        .broker
        .queue_stats(wharf_core::DEFAULT_VHOST, "q")
        .unwrap();
    assert_eq!((stats.ready, stats.unacked, stats.dropped), (0, 0, 2));
}

#[test]
fn ack_multiple_settles_everything_up_to_the_tag_and_zero_means_all() {
    let mut h = Harness::new();
    h.queue("q");
    for idx in 0..5 {
        h.publish("", "q", &idx.to_string());
    }
    h.subscribe(C1, "q", 1, 0);
    let got = h.deliveries();
    assert_eq!(got.len(), 5);
    let reply = h.ok(Command::Ack {
        connection: C1,
        delivery_tag: got[2].delivery_tag,
        multiple: true,
    });
    assert_eq!(reply, Reply::Settled { count: 3 });
    let reply = h.ok(Command::Nack {
        connection: C1,
        delivery_tag: DeliveryTag(0),
        multiple: true,
        requeue: false,
    });
    assert_eq!(reply, Reply::Settled { count: 2 });
    assert_eq!(
        h.broker
            .queue_stats(wharf_core::DEFAULT_VHOST, "q")
            .unwrap()
            .unacked,
        0
    );
}

#[test]
fn a_delivery_belongs_to_the_consumer_of_its_tag_only_if_made_after_it_subscribed() {
    let mut h = Harness::new();
    h.queue("q");
    h.publish("", "q", "a");
    h.subscribe(C1, "q", 1, 10);
    let first = h.deliveries();
    assert_eq!(first.len(), 1);
    let old_tag = first[0].delivery_tag;
    assert!(
        h.broker
            .delivered_to_current_consumer(C1, ConsumerTag(1), old_tag)
    );
    assert!(
        !h.broker
            .delivered_to_current_consumer(C1, ConsumerTag(2), old_tag)
    );
    assert!(
        !h.broker
            .delivered_to_current_consumer(C2, ConsumerTag(1), old_tag)
    );
    h.ok(Command::Cancel {
        connection: C1,
        consumer_tag: ConsumerTag(1),
    });
    assert!(
        !h.broker
            .delivered_to_current_consumer(C1, ConsumerTag(1), old_tag)
    );
    // The same tag subscribed again: the earlier delivery is not the new consumer's.
    h.subscribe(C1, "q", 1, 10);
    let again = h.deliveries();
    assert_eq!(again.len(), 1, "the requeued message, redelivered");
    assert!(
        !h.broker
            .delivered_to_current_consumer(C1, ConsumerTag(1), old_tag)
    );
    assert!(
        h.broker
            .delivered_to_current_consumer(C1, ConsumerTag(1), again[0].delivery_tag)
    );
}

#[test]
fn cancel_returns_unacked_messages_to_the_queue_for_other_consumers() {
    let mut h = Harness::new();
    h.queue("q");
    h.publish("", "q", "a");
    h.publish("", "q", "b");
    h.subscribe(C1, "q", 1, 10);
    assert_eq!(h.deliveries().len(), 2);
    h.ok(Command::Cancel {
        connection: C1,
        consumer_tag: ConsumerTag(1),
    });
    assert_eq!(h.ready("q"), 2);
    h.subscribe(C2, "q", 7, 10);
    let again = h.deliveries();
    assert!(again.iter().all(|d| d.redelivered && d.connection == C2));
    assert_eq!(
        again
            .iter()
            .map(|d| d.message.body.to_vec())
            .collect::<Vec<_>>(),
        vec![b"a".to_vec(), b"b".to_vec()]
    );
    // The client may still have been working on them: a late ack is a harmless no-op (as for
    // a lapsed lease), not an unknown tag that would close its connection.
    h.ok(Command::Ack {
        connection: C1,
        delivery_tag: DeliveryTag(1),
        multiple: false,
    });
    assert_eq!(
        h.broker
            .queue_stats(wharf_core::DEFAULT_VHOST, "q")
            .unwrap()
            .unacked,
        2,
        "C2's copies"
    );
    // A tag never delivered is still unknown.
    let err = h.err(Command::Ack {
        connection: C1,
        delivery_tag: DeliveryTag(99),
        multiple: false,
    });
    assert_eq!(err, CoreError::UnknownDeliveryTag { tag: 99 });
}

#[test]
fn disconnect_requeues_unacked_deletes_exclusive_and_auto_delete_queues() {
    let mut h = Harness::new();
    h.queue("shared");
    h.queue_with(
        C1,
        "mine",
        QueueOptions {
            exclusive: true,
            ..QueueOptions::default()
        },
    );
    h.queue_with(
        C2,
        "temp",
        QueueOptions {
            auto_delete: true,
            ..QueueOptions::default()
        },
    );
    h.publish("", "shared", "a");
    h.subscribe(C1, "shared", 1, 10);
    h.subscribe(C1, "temp", 2, 10);
    assert_eq!(h.deliveries().len(), 1);
    h.ok(Command::CloseConnection { connection: C1 });
    let deleted: Vec<String> = h
        .effects
        .iter()
        .filter_map(|effect| match effect {
            Effect::QueueDeleted { name, .. } => Some(name.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(deleted, vec!["mine".to_owned(), "temp".to_owned()]);
    let stats = h
        .broker
        .queue_stats(wharf_core::DEFAULT_VHOST, "shared")
        .unwrap();
    assert_eq!((stats.ready, stats.unacked, stats.consumers), (1, 0, 0));
    h.subscribe(C2, "shared", 1, 10);
    assert!(h.deliveries()[0].redelivered);
}

#[test]
fn auto_delete_queue_is_deleted_when_its_last_consumer_cancels() {
    let mut h = Harness::new();
    h.queue_with(
        C1,
        "temp",
        QueueOptions {
            auto_delete: true,
            ..QueueOptions::default()
        },
    );
    h.subscribe(C1, "temp", 1, 10);
    h.subscribe(C2, "temp", 1, 10);
    h.ok(Command::Cancel {
        connection: C1,
        consumer_tag: ConsumerTag(1),
    });
    assert!(
        h.broker
            .queue_stats(wharf_core::DEFAULT_VHOST, "temp")
            .is_ok(),
        "one consumer left"
    );
    h.ok(Command::Cancel {
        connection: C2,
        consumer_tag: ConsumerTag(1),
    });
    assert!(matches!(
        h.broker.queue_stats(wharf_core::DEFAULT_VHOST, "temp"),
        Err(CoreError::NotFound { .. })
    ));
}

#[test]
fn deleting_a_queue_cancels_its_consumers_and_later_acks_are_harmless() {
    let mut h = Harness::new();
    h.queue("q");
    h.publish("", "q", "a");
    h.publish("", "q", "b");
    h.subscribe(C2, "q", 4, 1);
    let got = h.deliveries();
    let reply = h.ok(Command::DeleteQueue {
        vhost: wharf_core::DEFAULT_VHOST.into(),
        connection: C1,
        name: "q".into(),
        if_unused: false,
        if_empty: false,
    });
    assert_eq!(reply, Reply::QueueDeleted { messages: 1 });
    assert!(h.effects.contains(&Effect::ConsumerCancelled {
        connection: C2,
        consumer_tag: ConsumerTag(4),
        reason: CancelReason::QueueDeleted
    }));
    h.ack(C2, got[0].delivery_tag.0);
    let err = h.err(Command::Cancel {
        connection: C2,
        consumer_tag: ConsumerTag(4),
    });
    assert!(matches!(
        err,
        CoreError::NotFound {
            kind: EntityKind::Consumer,
            ..
        }
    ));
}

#[test]
fn purge_drops_ready_messages_but_not_unacked_ones() {
    let mut h = Harness::new();
    h.queue("q");
    for idx in 0..3 {
        h.publish("", "q", &idx.to_string());
    }
    h.subscribe(C1, "q", 1, 1);
    assert_eq!(
        h.ok(Command::PurgeQueue {
            vhost: wharf_core::DEFAULT_VHOST.into(),
            connection: C1,
            name: "q".into()
        }),
        Reply::Purged { messages: 2 }
    );
    let stats = h
        .broker
        .queue_stats(wharf_core::DEFAULT_VHOST, "q")
        .unwrap();
    assert_eq!((stats.ready, stats.unacked), (0, 1));
}

/// A queue "q" holding `messages` messages ("0", "1", ...) and consumer 1 of `C1` on it with
/// `prefetch`, `initial_credit` and `auto_ack`.
fn credit_case(
    messages: usize,
    prefetch: u32,
    initial_credit: Option<u32>,
    auto_ack: bool,
) -> Harness {
    let mut h = Harness::new();
    h.queue("q");
    for idx in 0..messages {
        h.publish("", "q", &idx.to_string());
    }
    h.subscribe_with(
        C1,
        "q",
        1,
        ConsumerOptions {
            prefetch,
            initial_credit,
            auto_ack,
            ..ConsumerOptions::default()
        },
    );
    h
}

fn grant(h: &mut Harness, credit: u32) {
    h.ok(Command::Credit {
        connection: C1,
        consumer_tag: ConsumerTag(1),
        credit,
    });
}

#[test]
fn auto_ack_consumer_is_limited_by_credit_until_granted_more() {
    let mut h = credit_case(5, 2, Some(2), true);
    assert_eq!(h.bodies(), vec!["0", "1"]);
    grant(&mut h, 10);
    assert_eq!(h.bodies(), vec!["2", "3"], "credit is capped at prefetch");
    let stats = h
        .broker
        .queue_stats(wharf_core::DEFAULT_VHOST, "q")
        .unwrap();
    assert_eq!((stats.acked, stats.unacked, stats.ready), (4, 0, 1));
}

/// `initial_credit: None` (docs/protocol.md, "Flow control"): only prefetch applies, so an
/// auto-ack consumer is sent everything ready and a grant of credit changes nothing.
#[test]
fn without_initial_credit_an_auto_ack_consumer_is_not_limited_and_credit_is_ignored() {
    let mut h = credit_case(5, 2, None, true);
    assert_eq!(h.bodies(), vec!["0", "1", "2", "3", "4"]);
    grant(&mut h, 10);
    h.publish("", "q", "5");
    assert_eq!(h.bodies(), vec!["5"]);
}

/// `initial_credit: Some(n)` on a manual-ack consumer: credit and prefetch both apply; a
/// delivery uses a credit whether or not it is acked.
#[test]
fn a_manual_ack_consumer_in_credit_mode_needs_credit_and_room() {
    let mut h = credit_case(6, 3, Some(1), false);
    assert_eq!(h.bodies(), vec!["0"], "one credit");
    grant(&mut h, 5);
    assert_eq!(
        h.bodies(),
        vec!["1", "2"],
        "credit capped at prefetch 3, prefetch full at 3 unacked"
    );
    let stats = h
        .broker
        .queue_stats(wharf_core::DEFAULT_VHOST, "q")
        .unwrap();
    assert_eq!((stats.unacked, stats.ready), (3, 3));
}

#[test]
fn higher_priority_consumer_is_served_first_while_it_has_capacity() {
    let mut h = Harness::new();
    h.queue("q");
    h.subscribe_with(
        C1,
        "q",
        1,
        ConsumerOptions {
            prefetch: 2,
            priority: 0,
            ..ConsumerOptions::default()
        },
    );
    h.subscribe_with(
        C2,
        "q",
        1,
        ConsumerOptions {
            prefetch: 2,
            priority: 5,
            ..ConsumerOptions::default()
        },
    );
    for idx in 0..3 {
        h.publish("", "q", &idx.to_string());
    }
    let got = h.deliveries();
    assert_eq!(
        got.iter().map(|d| d.connection).collect::<Vec<_>>(),
        vec![C2, C2, C1]
    );
}

#[test]
fn single_active_consumer_gets_everything_until_it_leaves() {
    let mut h = Harness::new();
    h.queue_with(
        C1,
        "sac",
        QueueOptions {
            single_active_consumer: true,
            ..QueueOptions::default()
        },
    );
    h.subscribe(C1, "sac", 1, 1);
    h.subscribe(C2, "sac", 1, 1);
    h.publish("", "sac", "a");
    h.publish("", "sac", "b");
    let got = h.deliveries();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].connection, C1);
    h.ok(Command::Cancel {
        connection: C1,
        consumer_tag: ConsumerTag(1),
    });
    let got = h.deliveries();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].connection, C2);
    assert!(
        got[0].redelivered,
        "the active consumer's unacked message moved over"
    );
}

#[test]
fn empty_name_declares_a_generated_queue() {
    let mut h = Harness::new();
    let reply = h.ok(Command::DeclareQueue {
        vhost: wharf_core::DEFAULT_VHOST.into(),
        connection: C1,
        name: String::new(),
        options: QueueOptions::default(),
        passive: false,
        declarer: None,
    });
    let Reply::QueueDeclared { name, .. } = reply else {
        panic!()
    };
    assert!(name.starts_with("wharf.gen-"));
    assert!(
        h.broker
            .queue_stats(wharf_core::DEFAULT_VHOST, &name)
            .is_ok()
    );
}

#[test]
fn declare_is_idempotent_and_passive_declare_reports_counts() {
    let mut h = Harness::new();
    h.queue("q");
    h.queue("q");
    h.publish("", "q", "x");
    let reply = h.ok(Command::DeclareQueue {
        vhost: wharf_core::DEFAULT_VHOST.into(),
        connection: C2,
        name: "q".into(),
        options: QueueOptions {
            durable: true,
            ..QueueOptions::default()
        },
        passive: true,
        declarer: None,
    });
    assert_eq!(
        reply,
        Reply::QueueDeclared {
            name: "q".into(),
            ready: 1,
            consumers: 0
        }
    );
    h.exchange("x", ExchangeKind::Topic);
    h.exchange("x", ExchangeKind::Topic);
}

// ----- every error variant -----

#[test]
fn unknown_entities_are_not_found() {
    let mut h = Harness::new();
    let err = h.err(Command::DeclareQueue {
        vhost: wharf_core::DEFAULT_VHOST.into(),
        connection: C1,
        name: "nope".into(),
        options: QueueOptions::default(),
        passive: true,
        declarer: None,
    });
    assert!(
        matches!(
            err,
            CoreError::NotFound {
                kind: EntityKind::Queue,
                ..
            }
        ),
        "{err}"
    );
    let err = h.err(Command::Publish {
        vhost: wharf_core::DEFAULT_VHOST.into(),
        message: Arc::new(Message {
            exchange: "nope".into(),
            ..Message::new("k", "b")
        }),
    });
    assert!(
        matches!(
            err,
            CoreError::NotFound {
                kind: EntityKind::Exchange,
                ..
            }
        ),
        "{err}"
    );
    let err = h.err(Command::Cancel {
        connection: C1,
        consumer_tag: ConsumerTag(9),
    });
    assert!(
        matches!(
            err,
            CoreError::NotFound {
                kind: EntityKind::Consumer,
                ..
            }
        ),
        "{err}"
    );
    let err = h.err(Command::Ack {
        connection: ConnectionId(99),
        delivery_tag: DeliveryTag(1),
        multiple: false,
    });
    assert!(
        matches!(
            err,
            CoreError::NotFound {
                kind: EntityKind::Connection,
                ..
            }
        ),
        "{err}"
    );
    let err = h.err(Command::Subscribe {
        vhost: wharf_core::DEFAULT_VHOST.into(),
        connection: C1,
        queue: "nope".into(),
        consumer_tag: ConsumerTag(1),
        options: ConsumerOptions::default(),
    });
    assert!(
        matches!(
            err,
            CoreError::NotFound {
                kind: EntityKind::Queue,
                ..
            }
        ),
        "{err}"
    );
    let err = h.err(Command::DeleteExchange {
        vhost: wharf_core::DEFAULT_VHOST.into(),
        name: "nope".into(),
        if_unused: false,
    });
    assert!(
        matches!(
            err,
            CoreError::NotFound {
                kind: EntityKind::Exchange,
                ..
            }
        ),
        "{err}"
    );
    let err = h.err(Command::Bind {
        vhost: wharf_core::DEFAULT_VHOST.into(),
        source: "wharf.direct".into(),
        target: BindTarget::Queue("nope".into()),
        routing_key: String::new(),
        arguments: Headers::new(),
    });
    assert!(
        matches!(
            err,
            CoreError::NotFound {
                kind: EntityKind::Queue,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn invalid_and_reserved_names_are_refused() {
    let mut h = Harness::new();
    let err = h.err(Command::DeclareQueue {
        vhost: wharf_core::DEFAULT_VHOST.into(),
        connection: C1,
        name: "bad\u{7}name".into(),
        options: QueueOptions::default(),
        passive: false,
        declarer: None,
    });
    assert!(matches!(err, CoreError::InvalidName { .. }), "{err}");
    let err = h.err(Command::DeclareExchange {
        vhost: wharf_core::DEFAULT_VHOST.into(),
        name: "x".repeat(256),
        kind: ExchangeKind::Direct,
        options: ExchangeOptions::default(),
        passive: false,
    });
    assert!(matches!(err, CoreError::InvalidName { .. }), "{err}");
    let err = h.err(Command::DeclareQueue {
        vhost: wharf_core::DEFAULT_VHOST.into(),
        connection: C1,
        name: "wharf.mine".into(),
        options: QueueOptions::default(),
        passive: false,
        declarer: None,
    });
    assert!(matches!(err, CoreError::ReservedName { .. }), "{err}");
    let err = h.err(Command::DeclareExchange {
        vhost: wharf_core::DEFAULT_VHOST.into(),
        name: "wharf.custom".into(),
        kind: ExchangeKind::Direct,
        options: ExchangeOptions::default(),
        passive: false,
    });
    assert!(matches!(err, CoreError::ReservedName { .. }), "{err}");
}

#[test]
fn redeclare_with_other_properties_and_failed_conditional_deletes_are_precondition_failures() {
    let mut h = Harness::new();
    h.queue("q");
    let err = h.err(Command::DeclareQueue {
        vhost: wharf_core::DEFAULT_VHOST.into(),
        connection: C1,
        name: "q".into(),
        options: QueueOptions {
            durable: true,
            ..QueueOptions::default()
        },
        passive: false,
        declarer: None,
    });
    assert!(
        matches!(
            err,
            CoreError::PreconditionFailed {
                kind: EntityKind::Queue,
                ..
            }
        ),
        "{err}"
    );
    h.exchange("x", ExchangeKind::Direct);
    let err = h.err(Command::DeclareExchange {
        vhost: wharf_core::DEFAULT_VHOST.into(),
        name: "x".into(),
        kind: ExchangeKind::Fanout,
        options: ExchangeOptions::default(),
        passive: false,
    });
    assert!(
        matches!(
            err,
            CoreError::PreconditionFailed {
                kind: EntityKind::Exchange,
                ..
            }
        ),
        "{err}"
    );
    h.bind("x", "q", "k");
    let err = h.err(Command::DeleteExchange {
        vhost: wharf_core::DEFAULT_VHOST.into(),
        name: "x".into(),
        if_unused: true,
    });
    assert!(matches!(err, CoreError::PreconditionFailed { .. }), "{err}");
    h.publish("", "q", "m");
    let err = h.err(Command::DeleteQueue {
        vhost: wharf_core::DEFAULT_VHOST.into(),
        connection: C1,
        name: "q".into(),
        if_unused: false,
        if_empty: true,
    });
    assert!(matches!(err, CoreError::PreconditionFailed { .. }), "{err}");
    h.subscribe(C1, "q", 1, 1);
    let err = h.err(Command::DeleteQueue {
        vhost: wharf_core::DEFAULT_VHOST.into(),
        connection: C1,
        name: "q".into(),
        if_unused: true,
        if_empty: false,
    });
    assert!(matches!(err, CoreError::PreconditionFailed { .. }), "{err}");
}

#[test]
fn exclusive_queues_and_exclusive_consumers_lock_out_others() {
    let mut h = Harness::new();
    h.queue_with(
        C1,
        "mine",
        QueueOptions {
            exclusive: true,
            ..QueueOptions::default()
        },
    );
    for command in [
        Command::Subscribe {
            vhost: wharf_core::DEFAULT_VHOST.into(),
            connection: C2,
            queue: "mine".into(),
            consumer_tag: ConsumerTag(1),
            options: ConsumerOptions::default(),
        },
        Command::DeleteQueue {
            vhost: wharf_core::DEFAULT_VHOST.into(),
            connection: C2,
            name: "mine".into(),
            if_unused: false,
            if_empty: false,
        },
        Command::PurgeQueue {
            vhost: wharf_core::DEFAULT_VHOST.into(),
            connection: C2,
            name: "mine".into(),
        },
        Command::DeclareQueue {
            vhost: wharf_core::DEFAULT_VHOST.into(),
            connection: C2,
            name: "mine".into(),
            options: QueueOptions {
                exclusive: true,
                ..QueueOptions::default()
            },
            passive: false,
            declarer: None,
        },
    ] {
        let err = h.err(command);
        assert!(matches!(err, CoreError::ResourceLocked { .. }), "{err}");
    }
    h.queue("shared");
    h.subscribe_with(
        C1,
        "shared",
        1,
        ConsumerOptions {
            exclusive: true,
            ..ConsumerOptions::default()
        },
    );
    let err = h.err(Command::Subscribe {
        vhost: wharf_core::DEFAULT_VHOST.into(),
        connection: C2,
        queue: "shared".into(),
        consumer_tag: ConsumerTag(1),
        options: ConsumerOptions::default(),
    });
    assert!(matches!(err, CoreError::ResourceLocked { .. }), "{err}");
    h.queue("busy");
    h.subscribe(C1, "busy", 2, 1);
    let err = h.err(Command::Subscribe {
        vhost: wharf_core::DEFAULT_VHOST.into(),
        connection: C2,
        queue: "busy".into(),
        consumer_tag: ConsumerTag(2),
        options: ConsumerOptions {
            exclusive: true,
            ..ConsumerOptions::default()
        },
    });
    assert!(matches!(err, CoreError::ResourceLocked { .. }), "{err}");
}

#[test]
fn built_in_default_and_internal_exchanges_refuse_access() {
    let mut h = Harness::new();
    h.queue("q");
    let err = h.err(Command::DeleteExchange {
        vhost: wharf_core::DEFAULT_VHOST.into(),
        name: "wharf.topic".into(),
        if_unused: false,
    });
    assert!(matches!(err, CoreError::AccessRefused { .. }), "{err}");
    let err = h.err(Command::DeclareExchange {
        vhost: wharf_core::DEFAULT_VHOST.into(),
        name: "wharf.topic".into(),
        kind: ExchangeKind::Direct,
        options: ExchangeOptions::default(),
        passive: false,
    });
    assert!(matches!(err, CoreError::AccessRefused { .. }), "{err}");
    let err = h.err(Command::Bind {
        vhost: wharf_core::DEFAULT_VHOST.into(),
        source: String::new(),
        target: BindTarget::Queue("q".into()),
        routing_key: "q".into(),
        arguments: Headers::new(),
    });
    assert!(matches!(err, CoreError::AccessRefused { .. }), "{err}");
    h.ok(Command::DeclareExchange {
        vhost: wharf_core::DEFAULT_VHOST.into(),
        name: "inner".into(),
        kind: ExchangeKind::Fanout,
        options: ExchangeOptions {
            internal: true,
            ..ExchangeOptions::default()
        },
        passive: false,
    });
    let err = h.err(Command::Publish {
        vhost: wharf_core::DEFAULT_VHOST.into(),
        message: Arc::new(Message {
            exchange: "inner".into(),
            ..Message::new("", "b")
        }),
    });
    assert!(matches!(err, CoreError::AccessRefused { .. }), "{err}");
    // Redeclaring a built-in exchange as it is succeeds.
    h.ok(Command::DeclareExchange {
        vhost: wharf_core::DEFAULT_VHOST.into(),
        name: "wharf.topic".into(),
        kind: ExchangeKind::Topic,
        options: ExchangeOptions {
            durable: true,
            ..ExchangeOptions::default()
        },
        passive: false,
    });
}

#[test]
fn acking_an_unknown_or_already_acked_tag_is_refused() {
    let mut h = Harness::new();
    h.queue("q");
    h.publish("", "q", "a");
    h.subscribe(C1, "q", 1, 1);
    let tag = h.deliveries()[0].delivery_tag;
    h.ack(C1, tag.0);
    assert_eq!(
        h.err(Command::Ack {
            connection: C1,
            delivery_tag: tag,
            multiple: false
        }),
        CoreError::UnknownDeliveryTag { tag: tag.0 }
    );
    assert_eq!(
        h.err(Command::Nack {
            connection: C1,
            delivery_tag: DeliveryTag(77),
            multiple: true,
            requeue: true
        }),
        CoreError::UnknownDeliveryTag { tag: 77 }
    );
    assert_eq!(
        h.err(Command::Ack {
            connection: C2,
            delivery_tag: tag,
            multiple: false
        }),
        CoreError::UnknownDeliveryTag { tag: tag.0 },
        "tags belong to their connection"
    );
}

#[test]
fn reusing_a_consumer_tag_on_a_connection_is_refused() {
    let mut h = Harness::new();
    h.queue("q");
    h.subscribe(C1, "q", 1, 1);
    let err = h.err(Command::Subscribe {
        vhost: wharf_core::DEFAULT_VHOST.into(),
        connection: C1,
        queue: "q".into(),
        consumer_tag: ConsumerTag(1),
        options: ConsumerOptions::default(),
    });
    assert_eq!(err, CoreError::ConsumerTagInUse { tag: 1 });
    h.subscribe(C2, "q", 1, 1);
}

#[test]
fn malformed_arguments_are_invalid() {
    let mut h = Harness::new();
    h.queue("q");
    let err = h.err(Command::Bind {
        vhost: wharf_core::DEFAULT_VHOST.into(),
        source: "wharf.headers".into(),
        target: BindTarget::Queue("q".into()),
        routing_key: String::new(),
        arguments: Headers::new().with("x-match", "most"),
    });
    assert!(matches!(err, CoreError::InvalidArgument { .. }), "{err}");
    let err = h.err(Command::Publish {
        vhost: wharf_core::DEFAULT_VHOST.into(),
        message: Arc::new(Message::new(&"k".repeat(300), "b")),
    });
    assert!(matches!(err, CoreError::InvalidArgument { .. }), "{err}");
    let mut deep = wharf_core::HeaderValue::Int(1);
    for _ in 0..20 {
        deep = wharf_core::HeaderValue::List(vec![deep]);
    }
    let mut message = Message::new("q", "b");
    message.headers.insert("deep", deep);
    let err = h.err(Command::Publish {
        vhost: wharf_core::DEFAULT_VHOST.into(),
        message: Arc::new(message),
    });
    assert!(matches!(err, CoreError::InvalidArgument { .. }), "{err}");
}

#[test]
fn limits_are_enforced_with_a_typed_error() {
    let mut h = Harness::with_limits(Limits {
        queues_max: 2,
        consumers_per_queue_max: 1,
        consumers_per_connection_max: 1,
        bindings_per_exchange_max: 1,
        ..Limits::default()
    });
    h.queue("a");
    h.queue("b");
    let err = h.err(Command::DeclareQueue {
        vhost: wharf_core::DEFAULT_VHOST.into(),
        connection: C1,
        name: "c".into(),
        options: QueueOptions::default(),
        passive: false,
        declarer: None,
    });
    assert_eq!(
        err,
        CoreError::LimitExceeded {
            what: "queues",
            limit: 2
        }
    );
    h.subscribe(C1, "a", 1, 1);
    let err = h.err(Command::Subscribe {
        vhost: wharf_core::DEFAULT_VHOST.into(),
        connection: C2,
        queue: "a".into(),
        consumer_tag: ConsumerTag(1),
        options: ConsumerOptions::default(),
    });
    assert!(
        matches!(
            err,
            CoreError::LimitExceeded {
                what: "consumers per queue",
                ..
            }
        ),
        "{err}"
    );
    // C1 already has its one consumer (on "a"): a second one, on another queue, is refused.
    let err = h.err(Command::Subscribe {
        vhost: wharf_core::DEFAULT_VHOST.into(),
        connection: C1,
        queue: "b".into(),
        consumer_tag: ConsumerTag(2),
        options: ConsumerOptions::default(),
    });
    assert_eq!(
        err,
        CoreError::LimitExceeded {
            what: "consumers per connection",
            limit: 1
        }
    );
    h.bind("wharf.direct", "a", "k");
    let err = h.err(Command::Bind {
        vhost: wharf_core::DEFAULT_VHOST.into(),
        source: "wharf.direct".into(),
        target: BindTarget::Queue("b".into()),
        routing_key: "k".into(),
        arguments: Headers::new(),
    });
    assert!(matches!(err, CoreError::LimitExceeded { .. }), "{err}");
}

#[test]
fn auto_delete_exchange_goes_when_its_last_binding_is_removed() {
    let mut h = Harness::new();
    h.ok(Command::DeclareExchange {
        vhost: wharf_core::DEFAULT_VHOST.into(),
        name: "tmp".into(),
        kind: ExchangeKind::Fanout,
        options: ExchangeOptions {
            auto_delete: true,
            ..ExchangeOptions::default()
        },
        passive: false,
    });
    h.queue("q");
    h.bind("tmp", "q", "");
    h.ok(Command::DeleteQueue {
        vhost: wharf_core::DEFAULT_VHOST.into(),
        connection: C1,
        name: "q".into(),
        if_unused: false,
        if_empty: false,
    });
    assert!(h.effects.contains(&Effect::ExchangeDeleted {
        name: "tmp".into(),
        durable: false
    }));
    assert!(
        !h.broker
            .list_exchanges(wharf_core::DEFAULT_VHOST)
            .iter()
            .any(|exchange| exchange.name == "tmp")
    );
}

#[test]
fn same_commands_give_the_same_effects() {
    let run = || {
        let mut h = Harness::new();
        h.queue("q");
        h.subscribe(C1, "q", 1, 2);
        h.subscribe(C2, "q", 1, 2);
        for idx in 0..10 {
            h.publish("", "q", &idx.to_string());
        }
        h.ok(Command::CloseConnection { connection: C1 });
        h.effects.clone()
    };
    assert_eq!(run(), run());
}

#[test]
fn ack_range_settles_only_outstanding_tags_within_the_range() {
    let mut h = Harness::new();
    h.queue("q");
    for idx in 0..6 {
        h.publish("", "q", &idx.to_string());
    }
    h.subscribe(C1, "q", 1, 0);
    let tags: Vec<u64> = h.deliveries().iter().map(|d| d.delivery_tag.0).collect();
    h.ack(C1, tags[1]);
    let reply = h.ok(Command::AckRange {
        connection: C1,
        first: DeliveryTag(tags[0]),
        last: DeliveryTag(tags[3]),
    });
    assert_eq!(
        reply,
        Reply::Settled { count: 3 },
        "tag {} was already acked",
        tags[1]
    );
    // A huge range costs only what is outstanding in it.
    let reply = h.ok(Command::AckRange {
        connection: C1,
        first: DeliveryTag(0),
        last: DeliveryTag(u64::MAX),
    });
    assert_eq!(reply, Reply::Settled { count: 2 });
    let err = h.err(Command::AckRange {
        connection: C1,
        first: DeliveryTag(1),
        last: DeliveryTag(100),
    });
    assert_eq!(err, CoreError::UnknownDeliveryTag { tag: 1 });
    let err = h.err(Command::AckRange {
        connection: C1,
        first: DeliveryTag(5),
        last: DeliveryTag(4),
    });
    assert!(matches!(err, CoreError::InvalidArgument { .. }), "{err}");
}

#[test]
fn ready_bytes_total_tracks_every_way_messages_enter_and_leave_ready() {
    let mut h = Harness::new();
    let total = |h: &Harness| {
        h.broker
            .list_queues(wharf_core::DEFAULT_VHOST)
            .iter()
            .map(|q| q.ready_bytes)
            .sum::<u64>()
    };
    h.queue("a");
    h.queue("b");
    h.bind("wharf.fanout", "a", "");
    h.bind("wharf.fanout", "b", "");
    for _ in 0..4 {
        h.publish("wharf.fanout", "", "12345");
    }
    assert_eq!(h.broker.ready_bytes_total(), 40);
    h.subscribe(C1, "a", 1, 2);
    let got = h.deliveries();
    assert_eq!(h.broker.ready_bytes_total(), total(&h));
    h.ok(Command::Nack {
        connection: C1,
        delivery_tag: got[0].delivery_tag,
        multiple: false,
        requeue: true,
    });
    assert_eq!(h.broker.ready_bytes_total(), total(&h));
    h.ok(Command::CloseConnection { connection: C1 });
    assert_eq!(h.broker.ready_bytes_total(), 40);
    h.ok(Command::PurgeQueue {
        vhost: wharf_core::DEFAULT_VHOST.into(),
        connection: C2,
        name: "a".into(),
    });
    assert_eq!(h.broker.ready_bytes_total(), 20);
    h.ok(Command::DeleteQueue {
        vhost: wharf_core::DEFAULT_VHOST.into(),
        connection: C2,
        name: "b".into(),
        if_unused: false,
        if_empty: false,
    });
    assert_eq!(h.broker.ready_bytes_total(), 0);
}

#[test]
fn routed_queues_are_reported_once_each_with_their_backlog_and_progress() {
    let mut h = Harness::new();
    h.queue("a");
    h.queue("b");
    h.exchange("fan", ExchangeKind::Fanout);
    h.bind("fan", "a", "");
    h.bind("fan", "b", "");
    let mut routed = Vec::new();
    h.broker.take_routed(&mut routed);
    assert!(routed.is_empty(), "declaring and binding route nothing");

    for body in ["one", "two", "three"] {
        assert_eq!(h.publish("fan", "", body), 2);
    }
    h.publish("", "nowhere", "unroutable");
    h.broker.take_routed(&mut routed);
    assert_eq!(
        routed.len(),
        2,
        "two queues, each reported once: {routed:?}"
    );
    let flows: Vec<_> = routed
        .iter()
        .map(|qid| h.broker.queue_flow(*qid, C2).expect("live queue"))
        .collect();
    for flow in &flows {
        assert_eq!((flow.ready, flow.ready_bytes), (3, 3 + 3 + 5));
        assert_eq!((flow.consumers, flow.delivered), (0, 0));
    }
    let mut again = Vec::new();
    h.broker.take_routed(&mut again);
    assert!(again.is_empty(), "taken: nothing until the next publish");

    // Overlapping sets in another order: each queue still reported once.
    h.publish("", "b", "to b");
    h.publish("fan", "", "to both");
    h.publish("", "a", "to a");
    h.broker.take_routed(&mut again);
    assert_eq!(again.len(), 2, "{again:?}");
    assert_ne!(again[0], again[1]);

    // A consumer takes from "a": its backlog shrinks and its deliveries count up.
    h.subscribe(C1, "a", 1, 2);
    let a = routed
        .iter()
        .copied()
        .find(|qid| {
            h.broker
                .queue_flow(*qid, C2)
                .is_some_and(|flow| flow.consumers == 1)
        })
        .expect("the queue with the consumer");
    let flow = h.broker.queue_flow(a, C2).expect("live queue");
    // "a" holds 5 (three fanned out, "to both", "to a"): two delivered, three ready.
    assert_eq!((flow.ready, flow.delivered), (3, 2));
    assert_eq!(
        flow.own_consumers, 0,
        "the consumer is on another connection"
    );
    let flow = h.broker.queue_flow(a, C1).expect("live queue");
    assert_eq!(
        flow.own_consumers, 1,
        "as seen by the consumer's connection"
    );

    h.ok(Command::DeleteQueue {
        vhost: wharf_core::DEFAULT_VHOST.into(),
        connection: C1,
        name: "a".into(),
        if_unused: false,
        if_empty: false,
    });
    assert_eq!(
        h.broker.queue_flow(a, C1),
        None,
        "a deleted queue has no flow"
    );
}

#[test]
fn routed_queues_tracked_are_bounded() {
    let mut h = Harness::new();
    h.exchange("fan", ExchangeKind::Fanout);
    let n_queues = wharf_core::ROUTED_TRACKED_MAX + 6;
    for idx in 0..n_queues {
        let name = format!("q{idx}");
        h.queue(&name);
        h.bind("fan", &name, "");
    }
    assert_eq!(h.publish("fan", "", "x") as usize, n_queues);
    let mut routed = Vec::new();
    h.broker.take_routed(&mut routed);
    assert_eq!(routed.len(), wharf_core::ROUTED_TRACKED_MAX);
}

/// A consumer cancelled with 70,000 deliveries outstanding (more than the 65,536 lapsed tags a
/// connection once remembered one by one): every late settle of one of them, one by one, by
/// range or with `multiple`, is a harmless no-op, never an unknown tag; a tag never issued
/// still is one.
#[test]
fn late_settles_after_cancelling_a_consumer_with_many_outstanding_are_no_ops() {
    const N: usize = 70_000;
    let mut h = Harness::new();
    h.queue("q");
    for idx in 0..N {
        h.publish("", "q", &idx.to_string());
    }
    h.subscribe(C1, "q", 1, 0);
    let got = h.deliveries();
    assert_eq!(got.len(), N);
    h.ok(Command::Cancel {
        connection: C1,
        consumer_tag: ConsumerTag(1),
    });
    let tags: Vec<u64> = got.iter().map(|delivery| delivery.delivery_tag.0).collect();
    for &tag in &tags[..10] {
        let reply = h.ok(Command::Ack {
            connection: C1,
            delivery_tag: DeliveryTag(tag),
            multiple: false,
        });
        assert_eq!(reply, Reply::Settled { count: 0 });
    }
    let reply = h.ok(Command::AckRange {
        connection: C1,
        first: DeliveryTag(tags[10]),
        last: DeliveryTag(tags[N / 2]),
    });
    assert_eq!(reply, Reply::Settled { count: 0 });
    // One past the range, still remembered: a nack to requeue it does nothing either.
    let reply = h.ok(Command::Nack {
        connection: C1,
        delivery_tag: DeliveryTag(tags[N / 2 + 1]),
        multiple: false,
        requeue: true,
    });
    assert_eq!(reply, Reply::Settled { count: 0 });
    let reply = h.ok(Command::Ack {
        connection: C1,
        delivery_tag: DeliveryTag(tags[N - 1]),
        multiple: true,
    });
    assert_eq!(reply, Reply::Settled { count: 0 });
    let err = h.err(Command::Ack {
        connection: C1,
        delivery_tag: DeliveryTag(tags[N - 1] + 1),
        multiple: false,
    });
    assert!(matches!(err, CoreError::UnknownDeliveryTag { .. }), "{err}");
    // Every message is back in the queue, none lost.
    assert_eq!(
        h.broker
            .queue_stats(wharf_core::DEFAULT_VHOST, "q")
            .unwrap()
            .ready,
        N as u64
    );
}
