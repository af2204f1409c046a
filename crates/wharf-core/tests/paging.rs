//! Queues larger than memory: a pageable queue keeps at most `Limits::paging_threshold` ready
//! messages in memory and hands later arrivals to the server (`Effect::PageOut`), which gives
//! them back in order when asked (`Effect::PageIn` → `Command::PageIn`). The harness plays the
//! server's part with a list per queue, as the server's spool files do.

use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use wharf_core::{
    Broker, Command, ConnectionId, ConsumerOptions, ConsumerTag, DeliveryTag, Effect, HeaderValue,
    Headers, Limits, Message, PagedEntry, QueueOptions, Reply,
};

const C1: ConnectionId = ConnectionId(1);

/// The broker plus a pager that keeps paged entries as the server does, and the log's view of
/// which logged messages are live (enqueued and not settled).
struct Harness {
    broker: Broker,
    now: u64,
    effects: Vec<Effect>,
    /// Paged entries per (queue, epoch, level), oldest first.
    spools: HashMap<(String, u64, u8), VecDeque<PagedEntry>>,
    /// Page-in requests not yet answered: (queue, epoch, level, max, max bytes).
    requests: Vec<(String, u64, u8, u64, u64)>,
    /// Logged messages per queue, as the log would replay them.
    live: BTreeMap<String, BTreeSet<u64>>,
    /// Deliveries seen: (body, tag, redelivered).
    deliveries: Vec<(String, DeliveryTag, bool)>,
    page_outs: usize,
}

impl Harness {
    fn new(threshold: usize) -> Self {
        Harness::with_bytes(threshold, 0)
    }

    fn with_bytes(threshold: usize, threshold_bytes: u64) -> Self {
        Harness::with_limits(Limits {
            paging_threshold: threshold,
            paging_threshold_bytes: threshold_bytes,
            ..Limits::default()
        })
    }

    fn with_limits(limits: Limits) -> Self {
        let mut harness = Harness {
            broker: Broker::new(limits),
            now: 0,
            effects: Vec::new(),
            spools: HashMap::new(),
            requests: Vec::new(),
            live: BTreeMap::new(),
            deliveries: Vec::new(),
            page_outs: 0,
        };
        harness.ok(Command::OpenConnection {
            vhost: wharf_core::DEFAULT_VHOST.into(),
            connection: C1,
        });
        harness
    }

    fn ok(&mut self, command: Command) -> Reply {
        self.now += 1;
        let debug = format!("{command:?}");
        let reply = self
            .broker
            .apply(self.now, command, &mut self.effects)
            .unwrap_or_else(|err| panic!("{debug} failed: {err}"));
        self.take_effects();
        reply
    }

    fn take_effects(&mut self) {
        for effect in std::mem::take(&mut self.effects) {
            match effect {
                Effect::PageOut {
                    queue,
                    epoch,
                    level,
                    entry,
                } => {
                    self.page_outs += 1;
                    self.spools
                        .entry((queue.to_string(), epoch, level))
                        .or_default()
                        .push_back(*entry);
                }
                Effect::PageIn {
                    queue,
                    epoch,
                    level,
                    max,
                    max_bytes,
                } => {
                    assert!(
                        !self
                            .requests
                            .iter()
                            .any(|(q, e, _, _, _)| *q == *queue && *e == epoch),
                        "one page-in request per queue at a time"
                    );
                    let held = self
                        .spools
                        .get(&(queue.to_string(), epoch, level))
                        .map_or(0, VecDeque::len);
                    assert!(max >= 1 && max as usize <= held, "asks for what is paged");
                    assert!(max_bytes >= 1);
                    self.requests
                        .push((queue.to_string(), epoch, level, max, max_bytes));
                }
                Effect::PagesDropped { queue, epoch } => {
                    self.spools
                        .retain(|(q, e, _), _| !(**q == *queue && *e == epoch));
                }
                Effect::DurableEnqueued {
                    durable_id, queues, ..
                } => {
                    for queue in queues {
                        assert!(
                            self.live
                                .entry(queue.to_string())
                                .or_default()
                                .insert(durable_id)
                        );
                    }
                }
                Effect::DurableSettled { durable_id, queue } => {
                    assert!(
                        self.live
                            .entry(queue.to_string())
                            .or_default()
                            .remove(&durable_id),
                        "settled once"
                    );
                }
                Effect::DurableSettledRange {
                    first,
                    count,
                    queue,
                } => {
                    assert!(count >= 1);
                    for durable_id in first..first + count {
                        assert!(
                            self.live
                                .entry(queue.to_string())
                                .or_default()
                                .remove(&durable_id),
                            "a range settles live messages of its queue only"
                        );
                    }
                }
                Effect::QueueDeleted { name, .. } => {
                    self.live.remove(&*name);
                }
                Effect::Deliver(delivery) => self.deliveries.push((
                    String::from_utf8(delivery.message.body.to_vec()).unwrap(),
                    delivery.delivery_tag,
                    delivery.redelivered,
                )),
                _ => {}
            }
        }
    }

    /// Answers every pending page-in request (as the server's pager task does).
    fn serve_page_ins(&mut self) -> usize {
        let mut served = 0;
        for (queue, epoch, level, max, max_bytes) in std::mem::take(&mut self.requests) {
            let spool = self
                .spools
                .entry((queue.clone(), epoch, level))
                .or_default();
            // As the server: at least one, then while within both budgets.
            let mut entries: Vec<PagedEntry> = Vec::new();
            let mut bytes = 0;
            while let Some(next) = spool.front() {
                let size = next.message.body.len() as u64;
                if !entries.is_empty() && (entries.len() as u64 >= max || bytes + size > max_bytes)
                {
                    break;
                }
                bytes += size;
                entries.push(spool.pop_front().unwrap());
            }
            served += entries.len();
            self.ok(Command::PageIn {
                vhost: wharf_core::DEFAULT_VHOST.into(),
                queue,
                epoch,
                level,
                entries,
            });
        }
        served
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

    fn publish(&mut self, queue: &str, body: &str, persistent: bool) {
        self.ok(Command::Publish {
            vhost: wharf_core::DEFAULT_VHOST.into(),
            message: Arc::new(Message {
                persistent,
                ..Message::new(queue, body.to_owned())
            }),
        });
    }

    fn subscribe(&mut self, queue: &str, tag: u32, prefetch: u32, auto_ack: bool) {
        self.ok(Command::Subscribe {
            vhost: wharf_core::DEFAULT_VHOST.into(),
            connection: C1,
            queue: queue.to_owned(),
            consumer_tag: ConsumerTag(tag),
            options: ConsumerOptions {
                prefetch,
                auto_ack,
                ..ConsumerOptions::default()
            },
        });
    }

    fn stats(&self, queue: &str) -> wharf_core::QueueStats {
        self.broker
            .queue_stats(wharf_core::DEFAULT_VHOST, queue)
            .unwrap()
    }

    fn bodies(&mut self) -> Vec<String> {
        self.deliveries.drain(..).map(|(body, _, _)| body).collect()
    }
}

fn numbered(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("m{i}")).collect()
}

#[test]
fn a_queue_past_its_threshold_pages_later_arrivals_and_drains_them_back_in_order() {
    let mut h = Harness::new(4);
    h.declare("q", true, Headers::new());
    for body in numbered(10) {
        h.publish("q", &body, true);
    }
    let stats = h.stats("q");
    assert_eq!((stats.ready, stats.paged), (10, 6));
    assert_eq!(h.page_outs, 6);
    assert_eq!(
        h.broker.ready_bytes_total(),
        4 * 2,
        "only 4 bodies in memory"
    );
    let paged: Vec<u64> = h.spools[&("q".to_owned(), 0, 0)]
        .iter()
        .map(|entry| entry.durable_id.unwrap())
        .collect();
    assert_eq!(paged, (5..=10).collect::<Vec<_>>(), "the newest are paged");

    h.subscribe("q", 1, 0, true);
    assert_eq!(h.bodies(), numbered(4), "memory first");
    assert_eq!(h.requests, vec![("q".to_owned(), 0, 0, 4, u64::MAX)]);
    // Arrivals while the tail is paged join the tail (FIFO).
    h.publish("q", "m10", true);
    assert_eq!(h.stats("q").paged, 7);
    let mut rounds = 0;
    while h.serve_page_ins() > 0 {
        rounds += 1;
    }
    assert_eq!(rounds, 2);
    assert_eq!(h.bodies(), numbered(11)[4..].to_vec());
    let stats = h.stats("q");
    assert_eq!((stats.ready, stats.paged, stats.acked), (0, 0, 11));
    assert!(h.live["q"].is_empty(), "every logged message settled");
    // Drained: the queue is back in memory.
    h.publish("q", "again", true);
    assert_eq!(h.page_outs, 7);
    assert_eq!(h.bodies(), vec!["again".to_owned()]);
}

#[test]
fn purging_a_paged_queue_settles_its_tail_by_id_runs_and_stale_page_ins_are_ignored() {
    let mut h = Harness::new(2);
    h.declare("q", true, Headers::new());
    h.declare("other", true, Headers::new());
    for i in 0..6 {
        h.publish("q", &format!("q{i}"), true);
        // Interleaved ids: the runs of q's tail are split.
        h.publish("other", &format!("o{i}"), i % 2 == 0);
    }
    h.publish("q", "transient", false);
    assert_eq!(h.stats("q").paged, 5);
    h.subscribe("q", 1, 1, false);
    assert_eq!(h.bodies(), vec!["q0".to_owned()]);
    // Pending request for epoch 0, then a purge.
    h.ok(Command::Ack {
        connection: C1,
        delivery_tag: DeliveryTag(1),
        multiple: false,
    });
    assert_eq!(h.bodies(), vec!["q1".to_owned()]);
    assert_eq!(h.requests.len(), 1);
    let reply = h.ok(Command::PurgeQueue {
        vhost: wharf_core::DEFAULT_VHOST.into(),
        connection: C1,
        name: "q".to_owned(),
    });
    assert_eq!(reply, Reply::Purged { messages: 5 });
    assert!(
        !h.spools.contains_key(&("q".to_owned(), 0, 0)),
        "tail dropped"
    );
    assert_eq!(
        h.live["q"].iter().copied().collect::<Vec<_>>(),
        vec![3],
        "only the outstanding delivery (q1, id 3) is still logged in q"
    );
    // The answer to the old request arrives late: ignored.
    h.spools
        .insert(("q".to_owned(), 0, 0), VecDeque::from(vec![]));
    let stale = PagedEntry {
        seq: 2,
        message: Arc::new(Message::new("q", "ghost")),
        durable_id: None,
        redelivered: false,
        delivery_count: 0,
        expires_at: None,
        retries: 0,
    };
    h.requests.clear();
    h.ok(Command::PageIn {
        vhost: wharf_core::DEFAULT_VHOST.into(),
        queue: "q".to_owned(),
        epoch: 0,
        level: 0,
        entries: vec![stale],
    });
    assert!(h.bodies().is_empty());
    assert_eq!(h.stats("q").ready, 0);
    // The next tail has a new epoch.
    h.ok(Command::Cancel {
        connection: C1,
        consumer_tag: ConsumerTag(1),
    });
    for i in 0..4 {
        h.publish("q", &format!("n{i}"), true);
    }
    // The cancel put q1 back: q1 and n0 in memory, n1..n3 paged.
    assert_eq!(h.stats("q").paged, 3);
    assert_eq!(h.spools[&("q".to_owned(), 1, 0)].len(), 3);
}

#[test]
fn deleting_a_paged_queue_drops_its_tail() {
    let mut h = Harness::new(1);
    h.declare("q", true, Headers::new());
    for body in numbered(3) {
        h.publish("q", &body, true);
    }
    let reply = h.ok(Command::DeleteQueue {
        vhost: wharf_core::DEFAULT_VHOST.into(),
        connection: C1,
        name: "q".to_owned(),
        if_unused: false,
        if_empty: false,
    });
    assert_eq!(reply, Reply::QueueDeleted { messages: 3 });
    assert!(h.spools.is_empty());
}

#[test]
fn if_empty_counts_paged_messages() {
    let mut h = Harness::new(1);
    h.declare("q", true, Headers::new());
    h.publish("q", "a", true);
    h.publish("q", "b", true);
    h.subscribe("q", 1, 1, false);
    // "a" is outstanding, "b" is paged: nothing ready in memory, yet not empty.
    let err = h
        .broker
        .apply(
            100,
            Command::DeleteQueue {
                vhost: wharf_core::DEFAULT_VHOST.into(),
                connection: C1,
                name: "q".to_owned(),
                if_unused: false,
                if_empty: true,
            },
            &mut Vec::new(),
        )
        .unwrap_err();
    assert!(err.to_string().contains("1 ready messages"), "{err}");
}

#[test]
fn large_messages_page_by_bytes_and_come_back_within_the_byte_budget() {
    let mut h = Harness::with_bytes(1_000, 100);
    h.declare("q", true, Headers::new());
    for i in 0..10 {
        h.publish("q", &format!("{i}{}", "x".repeat(39)), true);
    }
    // 40-byte bodies: three fit under 100 bytes, the fourth reaches it, the rest page.
    let stats = h.stats("q");
    assert_eq!((stats.ready, stats.paged), (10, 7));
    assert_eq!(h.broker.ready_bytes_total(), 120);
    h.subscribe("q", 1, 0, true);
    assert_eq!(h.bodies().len(), 3);
    assert_eq!(h.requests, vec![("q".to_owned(), 0, 0, 7, 100)]);
    assert_eq!(h.serve_page_ins(), 2, "two bodies within 100 bytes");
    while h.serve_page_ins() > 0 {}
    let bodies = h.bodies();
    assert_eq!(bodies.len(), 7);
    assert!(
        bodies
            .iter()
            .enumerate()
            .all(|(i, body)| body.starts_with(&(i + 3).to_string()))
    );
}

fn arguments(pairs: &[(&str, HeaderValue)]) -> Headers {
    pairs
        .iter()
        .map(|(key, value)| ((*key).to_owned(), value.clone()))
        .collect()
}

#[test]
fn every_kind_of_durable_queue_pages_but_transient_ones_do_not() {
    let mut h = Harness::new(1);
    h.declare("transient", false, Headers::new());
    h.declare(
        "prio",
        true,
        arguments(&[("x-max-priority", HeaderValue::Int(5))]),
    );
    h.declare(
        "limited",
        true,
        arguments(&[("x-max-length", HeaderValue::Int(100))]),
    );
    h.declare(
        "limited_bytes",
        true,
        arguments(&[("x-max-length-bytes", HeaderValue::Int(1_000))]),
    );
    h.declare(
        "ttl",
        true,
        arguments(&[("x-message-ttl", HeaderValue::Int(60_000))]),
    );
    for queue in ["transient", "prio", "limited", "limited_bytes", "ttl"] {
        for body in numbered(3) {
            h.publish(queue, &body, true);
        }
    }
    assert_eq!(h.stats("transient").paged, 0);
    for queue in ["prio", "limited", "limited_bytes", "ttl"] {
        assert_eq!(h.stats(queue).paged, 2, "{queue} pages");
    }
    // Transient messages in a durable queue page as well (memory, not durability).
    h.declare("durable", true, Headers::new());
    for body in numbered(3) {
        h.publish("durable", &body, false);
    }
    assert_eq!(h.stats("durable").paged, 2);
}

/// With `Limits::page_transient`, transient queues page like durable ones, their paged
/// messages unlogged (no durable id), and drain back in order; exclusive queues never page.
#[test]
fn transient_queues_page_when_the_server_says_so_and_come_back_in_order() {
    let mut h = Harness::with_limits(Limits {
        paging_threshold: 2,
        page_transient: true,
        ..Limits::default()
    });
    h.declare("transient", false, Headers::new());
    h.ok(Command::DeclareQueue {
        vhost: wharf_core::DEFAULT_VHOST.into(),
        connection: C1,
        name: "exclusive".into(),
        options: wharf_core::QueueOptions {
            exclusive: true,
            ..wharf_core::QueueOptions::default()
        },
        passive: false,
        declarer: None,
    });
    for body in numbered(10) {
        h.publish("transient", &body, true);
        h.publish("exclusive", &body, true);
    }
    assert_eq!(h.stats("transient").paged, 8);
    assert_eq!(
        h.stats("exclusive").paged,
        0,
        "exclusive queues stay in memory"
    );
    // Nothing of a transient queue is logged, paged or not.
    assert!(h.broker.durable_messages().is_empty());
    assert_eq!(h.broker.durable_paged_totals(), (0, 0));
    assert_eq!(h.broker.paged_totals().0, 8);
    h.subscribe("transient", 1, 100, true);
    while h.serve_page_ins() > 0 {}
    assert_eq!(h.bodies(), numbered(10));
}

impl Harness {
    fn publish_with_priority(&mut self, queue: &str, body: &str, priority: u8) {
        self.ok(Command::Publish {
            vhost: wharf_core::DEFAULT_VHOST.into(),
            message: Arc::new(Message {
                persistent: true,
                priority,
                ..Message::new(queue, body.to_owned())
            }),
        });
    }
}

#[test]
fn a_paged_priority_queue_keeps_a_tail_per_level_and_never_lets_a_lower_priority_overtake() {
    let mut h = Harness::new(2);
    h.declare(
        "q",
        true,
        arguments(&[("x-max-priority", HeaderValue::Int(5))]),
    );
    // Memory holds two (a, b); c joins level 0's tail, x and y (priority 5) level 5's.
    for (body, priority) in [("a", 0), ("b", 0), ("c", 0), ("x", 5), ("y", 5)] {
        h.publish_with_priority("q", body, priority);
    }
    let stats = h.stats("q");
    assert_eq!((stats.ready, stats.paged), (5, 3));
    assert_eq!(h.spools[&("q".to_owned(), 0, 0)].len(), 1);
    assert_eq!(h.spools[&("q".to_owned(), 0, 5)].len(), 2);
    // The next message to deliver (x) is paged: nothing is delivered until it is back, and
    // its level is asked for although memory is past half the threshold (an eighth of the
    // threshold past it, at least one entry: 1).
    h.subscribe("q", 1, 0, true);
    assert!(h.bodies().is_empty(), "a and b must not overtake x and y");
    let asked = |h: &Harness| -> Vec<(String, u64, u8, u64)> {
        h.requests
            .iter()
            .map(|(queue, epoch, level, max, _)| (queue.clone(), *epoch, *level, *max))
            .collect()
    };
    assert_eq!(asked(&h), vec![("q".to_owned(), 0, 5, 1)]);
    h.serve_page_ins();
    // x came back and went; y is next and paged: its level is asked for again.
    assert_eq!(h.bodies(), vec!["x"]);
    assert_eq!(asked(&h), vec![("q".to_owned(), 0, 5, 1)]);
    h.serve_page_ins();
    // y, then memory (a, b), then level 0's tail (c).
    assert_eq!(h.bodies(), vec!["y", "a", "b"]);
    while h.serve_page_ins() > 0 {}
    assert_eq!(h.bodies(), vec!["c"]);
    let stats = h.stats("q");
    assert_eq!((stats.ready, stats.paged, stats.acked), (0, 0, 5));
    assert!(h.live["q"].is_empty(), "every logged message settled");
    assert!(h.spools.values().all(VecDeque::is_empty));
}

#[test]
fn a_drop_head_limit_counts_paged_messages_and_drops_a_paged_head_when_it_comes_back() {
    let mut h = Harness::new(2);
    h.declare(
        "q",
        true,
        arguments(&[("x-max-length", HeaderValue::Int(3))]),
    );
    // a, b in memory; c paged; d paged and a dropped (4 > 3); e paged and b dropped.
    for body in ["a", "b", "c", "d", "e"] {
        h.publish("q", body, true);
    }
    let stats = h.stats("q");
    assert_eq!((stats.ready, stats.paged, stats.dropped), (3, 3, 2));
    // Memory is empty, so the head (c) is paged and a page-in is pending: f leaves the
    // queue one over its limit until c is back.
    h.publish("q", "f", true);
    let stats = h.stats("q");
    assert_eq!((stats.ready, stats.paged, stats.dropped), (4, 4, 2));
    // The request went out when memory fell to b alone (half the threshold): one entry.
    assert_eq!(h.requests.len(), 1);
    assert_eq!(h.requests[0].3, 1);
    h.serve_page_ins();
    let stats = h.stats("q");
    assert_eq!(
        (stats.ready, stats.paged, stats.dropped),
        (3, 3, 3),
        "c dropped as it came back"
    );
    assert_eq!(h.requests.len(), 1, "memory is empty: d is asked for");
    h.subscribe("q", 1, 0, true);
    while h.serve_page_ins() > 0 {}
    assert_eq!(h.bodies(), vec!["d", "e", "f"]);
    assert!(
        h.live["q"].is_empty(),
        "dropped and delivered messages settled"
    );
}

#[test]
fn a_reject_publish_limit_counts_paged_messages() {
    let mut h = Harness::new(1);
    h.declare(
        "q",
        true,
        arguments(&[
            ("x-max-length", HeaderValue::Int(3)),
            ("x-overflow", HeaderValue::Str("reject-publish".into())),
        ]),
    );
    for body in ["a", "b", "c"] {
        h.publish("q", body, true);
    }
    assert_eq!(h.stats("q").paged, 2);
    let err = h
        .broker
        .apply(
            100,
            Command::Publish {
                vhost: wharf_core::DEFAULT_VHOST.into(),
                message: Arc::new(Message::new("q", "d")),
            },
            &mut Vec::new(),
        )
        .unwrap_err();
    assert!(
        matches!(err, wharf_core::CoreError::QueueFull { .. }),
        "{err}"
    );
}

#[test]
fn a_paged_message_keeps_its_ttl_and_expires_when_it_comes_back() {
    let mut h = Harness::new(1);
    let ttl: Headers = [("x-message-ttl".to_owned(), HeaderValue::Int(10))]
        .into_iter()
        .collect();
    h.declare("q", true, ttl);
    h.publish("q", "a", true);
    h.publish("q", "b", true);
    let expires = h.spools[&("q".to_owned(), 0, 0)][0].expires_at.unwrap();
    // Both expire: "a" from memory, which asks for "b".
    h.now += 100;
    h.ok(Command::Tick);
    assert_eq!(h.stats("q").expired, 1);
    assert_eq!(h.requests.len(), 1);
    h.serve_page_ins();
    h.now += 1;
    h.ok(Command::Tick);
    let stats = h.stats("q");
    assert_eq!((stats.expired, stats.ready), (2, 0));
    assert!(h.live["q"].is_empty());
    assert!(expires < h.now);
}

/// One step of the random workload.
#[derive(Debug, Clone)]
enum Op {
    Publish { persistent: bool, priority: u8 },
    Subscribe { prefetch: u32, auto_ack: bool },
    Cancel,
    Ack,
    Requeue,
    Pager,
    Purge,
    Tick { ms: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (any::<bool>(), 0u8..5).prop_map(|(persistent, priority)| Op::Publish { persistent, priority }),
        1 => (0u32..4, any::<bool>()).prop_map(|(prefetch, auto_ack)| Op::Subscribe { prefetch, auto_ack }),
        1 => Just(Op::Cancel),
        3 => Just(Op::Ack),
        1 => Just(Op::Requeue),
        3 => Just(Op::Pager),
        1 => Just(Op::Purge),
        1 => (0u64..3).prop_map(|ms| Op::Tick { ms }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever the threshold, priorities, interleaving and pager timing: every delivery is
    /// exactly the message an in-memory queue would deliver next (highest priority first, by
    /// arrival within a priority, requeues back at their place), nothing is delivered twice
    /// without the redelivered flag, nothing is lost (a final drain delivers everything not
    /// purged), memory stays within its bound, and the log's view of live messages matches
    /// the queue's content at every step.
    #[test]
    fn paging_keeps_order_and_loses_nothing(
        threshold in 1usize..6,
        threshold_bytes in prop_oneof![Just(0u64), 1u64..24],
        max_priority in prop_oneof![Just(0u8), 1u8..4],
        ops in prop::collection::vec(op(), 1..120),
    ) {
        let mut h = Harness::with_bytes(threshold, threshold_bytes);
        let arguments = if max_priority > 0 {
            [("x-max-priority".to_owned(), HeaderValue::Int(i64::from(max_priority)))].into_iter().collect()
        } else {
            Headers::new()
        };
        h.declare("q", true, arguments);
        let mut next = 0usize;
        let mut purged: BTreeSet<String> = BTreeSet::new();
        let mut subscribed: Option<bool> = None;
        let mut outstanding: VecDeque<DeliveryTag> = VecDeque::new();
        let mut requeued = 0u64;
        let mut first_seen: Vec<usize> = Vec::new();
        let mut seen: BTreeSet<String> = BTreeSet::new();
        // The reference: ready messages as an in-memory priority queue orders them, by
        // (higher priority first, arrival), and what each outstanding tag holds.
        type Key = (std::cmp::Reverse<u8>, usize);
        let mut reference: BTreeSet<Key> = BTreeSet::new();
        let mut held: HashMap<DeliveryTag, Key> = HashMap::new();
        let mut priorities: Vec<u8> = Vec::new();
        let mut check = |h: &mut Harness,
                         outstanding: &mut VecDeque<DeliveryTag>,
                         reference: &mut BTreeSet<Key>,
                         held: &mut HashMap<DeliveryTag, Key>,
                         priorities: &[u8],
                         auto: bool| {
            for (body, tag, redelivered) in h.deliveries.drain(..) {
                let idx: usize = body[1..].parse().unwrap();
                let key = (std::cmp::Reverse(priorities[idx].min(max_priority)), idx);
                prop_assert_eq!(reference.first(), Some(&key), "{} delivered out of order", body);
                reference.remove(&key);
                if !redelivered {
                    prop_assert!(seen.insert(body.clone()), "{body} delivered twice unflagged");
                    first_seen.push(idx);
                }
                if !auto {
                    outstanding.push_back(tag);
                    held.insert(tag, key);
                }
            }
            Ok(())
        };
        for (step, op) in ops.into_iter().enumerate() {
            let described = format!("{op:?}");
            match op {
                Op::Publish { persistent, priority } => {
                    priorities.push(priority);
                    reference.insert((std::cmp::Reverse(priority.min(max_priority)), next));
                    h.ok(Command::Publish {
                        vhost: wharf_core::DEFAULT_VHOST.into(),
                        message: Arc::new(Message {
                            persistent,
                            priority,
                            ..Message::new("q", format!("m{next}"))
                        }),
                    });
                    next += 1;
                }
                Op::Subscribe { prefetch, auto_ack } => {
                    if subscribed.is_none() {
                        h.subscribe("q", 1, prefetch, auto_ack);
                        subscribed = Some(auto_ack);
                    }
                }
                Op::Cancel => {
                    if subscribed.take().is_some() {
                        // Its outstanding deliveries go back to the queue.
                        h.ok(Command::Cancel { connection: C1, consumer_tag: ConsumerTag(1) });
                        requeued += outstanding.len() as u64;
                        outstanding.clear();
                        reference.extend(held.drain().map(|(_, key)| key));
                    }
                }
                Op::Ack | Op::Requeue => {
                    if let Some(tag) = outstanding.pop_front() {
                        let command = if matches!(op, Op::Ack) {
                            Command::Ack { connection: C1, delivery_tag: tag, multiple: false }
                        } else {
                            Command::Nack { connection: C1, delivery_tag: tag, multiple: false, requeue: true }
                        };
                        // A cancelled consumer's deliveries stay outstanding until settled.
                        requeued += u64::from(matches!(op, Op::Requeue));
                        let key = held.remove(&tag).expect("outstanding tags are held");
                        if matches!(op, Op::Requeue) {
                            reference.insert(key);
                        }
                        h.ok(command);
                    }
                }
                Op::Pager => { h.serve_page_ins(); }
                Op::Purge => {
                    let before = h.stats("q").ready;
                    let Reply::Purged { messages } = h.ok(Command::PurgeQueue {
vhost: wharf_core::DEFAULT_VHOST.into(), connection: C1, name: "q".to_owned() }) else {
                        unreachable!()
                    };
                    prop_assert_eq!(messages, before);
                    prop_assert_eq!(messages, reference.len() as u64);
                    reference.clear();
                    // Purged messages are the ones never delivered that are not outstanding:
                    // tracked below by the final drain.
                    purged.insert(format!("purge@{next}"));
                }
                Op::Tick { ms } => {
                    h.now += ms;
                    h.ok(Command::Tick);
                }
            }
            if let Err(violation) = h.broker.check_invariants() {
                panic!("step {step} ({described}): the broker broke an invariant: {violation}");
            }
            let auto = subscribed.unwrap_or(false);
            check(&mut h, &mut outstanding, &mut reference, &mut held, &priorities, auto)?;
            let stats = h.stats("q");
            prop_assert_eq!(stats.ready, reference.len() as u64);
            // Memory holds the threshold, plus what consumers gave back (requeues go to the
            // head); with priorities, up to an eighth of a threshold more when a paged level
            // is next, plus one entry per level.
            let levels = u64::from(max_priority) + 1;
            let slack = if max_priority > 0 { threshold as u64 / 8 + levels } else { 0 };
            prop_assert!(stats.ready - stats.paged <= threshold as u64 + slack + requeued);
            if threshold_bytes > 0 {
                // Bodies are at most 5 bytes ("m9999"): one arrival past the byte limit.
                let slack = if max_priority > 0 { threshold_bytes / 8 + 5 * levels } else { 0 };
                prop_assert!(
                    h.broker.ready_bytes_total() < threshold_bytes + slack + 5 * (1 + requeued)
                );
            }
            // The log's view: every logged message still in the queue, and nothing else.
            let live = h.live.get("q").map_or(0, BTreeSet::len) as u64;
            prop_assert!(live <= stats.ready + stats.unacked);
        }
        // Final drain: settle what is outstanding, attach a fresh auto-ack consumer, pump.
        if subscribed.take().is_some() {
            h.ok(Command::Cancel { connection: C1, consumer_tag: ConsumerTag(1) });
        }
        outstanding.clear();
        h.subscribe("q", 2, 0, true);
        for _ in 0..1000 {
            if h.serve_page_ins() == 0 {
                break;
            }
        }
        reference.extend(held.drain().map(|(_, key)| key));
        check(&mut h, &mut outstanding, &mut reference, &mut held, &priorities, true)?;
        let stats = h.stats("q");
        prop_assert_eq!((stats.ready, stats.paged, stats.unacked), (0, 0, 0));
        prop_assert!(reference.is_empty());
        prop_assert!(h.live.get("q").is_none_or(BTreeSet::is_empty), "log says {:?}", h.live);
        prop_assert!(h.spools.values().all(VecDeque::is_empty));
        // Without priorities: first deliveries in publish order (FIFO), whatever was paged.
        if max_priority == 0 {
            let mut sorted = first_seen.clone();
            sorted.sort_unstable();
            prop_assert_eq!(&first_seen, &sorted);
        }
        // Nothing lost: without a purge, every message was delivered.
        if purged.is_empty() {
            prop_assert_eq!(first_seen.len(), next);
        }
    }
}
