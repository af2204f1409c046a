//! The generated input: the universe of names, the per-case choices and the `Op` strategies.

use super::*;

// ----- the universe of names -----

/// `q0..q2` are declared by the test; the last two names are refused (reserved, invalid).
pub(crate) const QUEUE_NAMES: [&str; 5] = ["q0", "q1", "q2", "wharf.mine", "bad\nname"];
pub(crate) const N_USER_QUEUES: usize = 3;
/// `x0..x2` are declared by the test (kinds and options chosen per case), then two built-ins
/// (the default exchange among them), then two names that are refused (reserved, invalid).
pub(crate) const EXCHANGE_NAMES: [&str; 7] = [
    "x0",
    "x1",
    "x2",
    "wharf.topic",
    "",
    "wharf.mine",
    "bad\nname",
];
pub(crate) const N_USER_EXCHANGES: usize = 3;
pub(crate) const DEFAULT_EXCHANGE_IDX: usize = 4;
pub(crate) const BUILTIN_TOPIC: &str = "wharf.topic";
pub(crate) const N_CONNECTIONS: usize = 3;
pub(crate) const CONSUMER_TAGS_MAX: u32 = 3;
/// Publish keys: words for direct/topic routing and queue names for the default exchange.
pub(crate) const PUBLISH_KEYS: [&str; 8] = ["a", "b", "a.b", "b.c", "", "q0", "q1", "q2"];
/// Binding keys: the same words plus topic patterns.
pub(crate) const BINDING_KEYS: [&str; 9] = ["a", "b", "a.b", "b.c", "", "*", "#", "a.#", "*.c"];
pub(crate) const N_BINDING_ARGUMENTS: usize = 7;
pub(crate) const N_MESSAGE_HEADERS: usize = 5;
/// Message ids: few, so that dedup windows see duplicates.
pub(crate) const MESSAGE_IDS: [&str; 2] = ["id-a", "id-b"];

pub(crate) fn binding_arguments(choice: usize) -> Headers {
    match choice {
        0 => Headers::new(),
        1 => Headers::new().with("x-match", "any"),
        2 => Headers::new().with("k", "1"),
        3 => Headers::new()
            .with("x-match", "any")
            .with("k", "1")
            .with("j", "2"),
        4 => Headers::new()
            .with("x-match", "all")
            .with("k", "1")
            .with("j", "2"),
        5 => Headers::new().with("x-match", "some"),
        6 => Headers::new()
            .with("x-match", "all-with-x")
            .with("x-h", "1"),
        _ => unreachable!("{N_BINDING_ARGUMENTS} binding argument sets"),
    }
}

pub(crate) fn message_headers(choice: usize) -> Headers {
    match choice {
        0 => Headers::new(),
        1 => Headers::new().with("k", "1"),
        2 => Headers::new().with("k", "2").with("j", "2"),
        3 => Headers::new().with("k", "1").with("j", "2"),
        4 => Headers::new().with("x-h", "1").with("k", 1i64),
        _ => unreachable!("{N_MESSAGE_HEADERS} header sets"),
    }
}

// ----- generated input -----

/// Kind and options of one user exchange, fixed for a case so that redeclares usually agree.
#[derive(Debug, Clone)]
pub(crate) struct ExchangeProfile {
    pub(crate) kind: ExchangeKind,
    pub(crate) options: ExchangeOptions,
}

/// The per-case choices that make names mean something: exchange kinds and queue options.
#[derive(Debug, Clone)]
pub(crate) struct Universe {
    pub(crate) exchanges: [ExchangeProfile; N_USER_EXCHANGES],
    pub(crate) queues: [QueueOptions; N_USER_QUEUES],
    /// The broker's limits: the defaults, or tight ones so that every limit is reached.
    pub(crate) limits: Limits,
    /// Setup ops run before the generated sequence (declares and a few bindings), so that
    /// sequences start from a populated topology instead of mostly failing on missing names.
    pub(crate) setup: Vec<Op>,
}

/// How a declare departs from the case's profile (to provoke precondition failures).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Variant {
    AsProfiled,
    DurabilityFlipped,
    OtherKind,
}

/// Which delivery tag an ack, nack or reject names.
#[derive(Debug, Clone)]
pub(crate) enum TagPick {
    /// One of the outstanding deliveries of any connection (per the model); the op's own
    /// connection is used only when there is none.
    Outstanding(Index),
    /// Tag 0: "all outstanding" with `multiple`, unknown without.
    Zero,
    /// A tag the connection was never given.
    Unknown,
    /// A delivery whose lease lapsed (per the model), if any; else as `Outstanding`.
    Lapsed(Index),
    /// The latest outstanding delivery (of any connection): a consumer failing what it just
    /// got, again and again (retry schedules run out).
    Newest,
}

/// The time-related properties of a published message.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Timing {
    pub(crate) delay_ms: Option<u64>,
    pub(crate) expiration_ms: Option<u64>,
    /// Index into [`MESSAGE_IDS`].
    pub(crate) message_id: Option<usize>,
}

/// Which consumer a cancel or credit names.
#[derive(Debug, Clone)]
pub(crate) enum ConsumerPick {
    /// One of the consumers attached (per the model), if any; else consumer 1 of connection 0.
    Attached(Index),
    /// Any connection slot and tag, attached or not.
    Named { conn: usize, tag: u32 },
}

#[derive(Debug, Clone)]
pub(crate) enum Target {
    Queue(usize),
    Exchange(usize),
}

/// One step of a generated sequence; rendered into a [`Command`] against the current model
/// (connection ids, outstanding tags), so that shrinking keeps sequences meaningful.
#[derive(Debug, Clone)]
pub(crate) enum Op {
    /// Ack the outstanding deliveries with tags `first..=first + span` (reversed: an empty
    /// range `first + span..=first`).
    AckRange {
        conn: usize,
        pick: TagPick,
        span: u64,
        reversed: bool,
    },
    /// `count` publishes in a row (long outstanding lists, many ready messages).
    /// Ack, one by one, every outstanding delivery of the connection with the most of them
    /// except its oldest (a stuck delivery ahead of many settled ones).
    AckAllButOldest,
    PublishMany {
        exchange: usize,
        key: usize,
        count: usize,
        /// Message ids in turn from [`MESSAGE_IDS`] (1 ms apart: a dedup window's end is met
        /// exactly).
        with_ids: bool,
    },
    Open {
        conn: usize,
    },
    /// Close the slot's connection and, if `reopen`, open a fresh one in its place.
    Close {
        conn: usize,
        reopen: bool,
    },
    DeclareExchange {
        exchange: usize,
        variant: Variant,
        passive: bool,
    },
    DeleteExchange {
        exchange: usize,
        if_unused: bool,
    },
    DeclareQueue {
        conn: usize,
        queue: usize,
        variant: Variant,
        passive: bool,
    },
    DeleteQueue {
        conn: usize,
        queue: usize,
        if_unused: bool,
        if_empty: bool,
    },
    Purge {
        conn: usize,
        queue: usize,
    },
    Bind {
        source: usize,
        target: Target,
        key: usize,
        arguments: usize,
    },
    Unbind {
        source: usize,
        target: Target,
        key: usize,
        arguments: usize,
    },
    /// Unbind one of the existing bindings (per the model), if any.
    UnbindExisting {
        binding: Index,
    },
    Publish {
        exchange: usize,
        key: usize,
        headers: usize,
        padding: usize,
        timing: Timing,
    },
    Subscribe {
        conn: usize,
        queue: usize,
        tag: u32,
        prefetch: u32,
        auto_ack: bool,
        exclusive: bool,
        priority: i32,
        ack_timeout_ms: Option<u64>,
        /// Credit mode (`ConsumerOptions::initial_credit`).
        initial_credit: Option<u32>,
    },
    Cancel {
        consumer: ConsumerPick,
    },
    Credit {
        consumer: ConsumerPick,
        credit: u32,
    },
    Ack {
        conn: usize,
        pick: TagPick,
        multiple: bool,
    },
    Nack {
        conn: usize,
        pick: TagPick,
        multiple: bool,
        requeue: bool,
    },
    Reject {
        conn: usize,
        pick: TagPick,
        requeue: bool,
    },
    /// A consumer failing a poison message: `rounds` times, nack (requeue) the newest
    /// outstanding delivery, then tick at the next deadline if it is near (a retry delay).
    KeepFailing {
        rounds: usize,
    },
    /// Move the clock `ms` forward (on top of the 1 ms every command takes), then `Tick` if
    /// `tick` (else the next command finds timers overdue).
    Advance {
        ms: u64,
        tick: bool,
    },
    /// Move the clock so that the next command lands on the model's next deadline or dedup
    /// window end (or 1 ms before it, `early`), and `Tick` there if `tick`: exact boundaries.
    ToDeadline {
        early: bool,
        tick: bool,
    },
    Defer {
        conn: usize,
        pick: TagPick,
        delay_ms: u64,
    },
    Touch {
        conn: usize,
        pick: TagPick,
    },
    /// Redrive a queue holding dead letters that can go back (per the model), if any; else
    /// `queue`.
    Redrive {
        conn: usize,
        queue: usize,
        dead_letters: Option<Index>,
        max: u64,
    },
}

#[derive(Debug, Clone)]
pub(crate) struct Case {
    pub(crate) universe: Universe,
    pub(crate) ops: Vec<Op>,
}

pub(crate) fn exchange_profile() -> impl Strategy<Value = ExchangeProfile> {
    let kind = prop_oneof![
        Just(ExchangeKind::Direct),
        Just(ExchangeKind::Fanout),
        Just(ExchangeKind::Topic),
        Just(ExchangeKind::Headers)
    ];
    (
        kind,
        any::<bool>(),
        prop::bool::weighted(0.25),
        prop::bool::weighted(0.15),
    )
        .prop_map(|(kind, durable, auto_delete, internal)| ExchangeProfile {
            kind,
            options: ExchangeOptions {
                durable,
                auto_delete,
                internal,
                arguments: Headers::new(),
            },
        })
}

pub(crate) fn queue_profile() -> impl Strategy<Value = QueueOptions> {
    let plain = QueueOptions::default();
    let with = |options: &QueueOptions, arguments: &[(&str, HeaderValue)]| QueueOptions {
        arguments: arguments.iter().cloned().collect(),
        ..options.clone()
    };
    let durable = QueueOptions {
        durable: true,
        ..plain.clone()
    };
    let int = HeaderValue::Int;
    let text = |value: &str| HeaderValue::Str(value.to_owned());
    let retry =
        |steps: &[i64]| HeaderValue::List(steps.iter().copied().map(HeaderValue::Int).collect());
    prop_oneof![
        2 => Just(with(&plain, &[("x-max-priority", int(2))])),
        1 => Just(with(&durable, &[("x-max-priority", int(3)), ("x-max-length", int(2))])),
        2 => Just(with(&durable, &[("x-max-length", int(2))])),
        1 => Just(with(&plain, &[("x-max-length-bytes", int(12)), ("x-overflow", text("drop-head"))])),
        2 => Just(with(&plain, &[("x-max-length", int(2)), ("x-overflow", text("reject-publish"))])),
        1 => Just(with(&durable, &[("x-max-length-bytes", int(10)), ("x-overflow", text("reject-publish")), ("x-max-priority", int(1))])),
        1 => Just(with(&plain, &[("x-max-priority", int(0))])),
        2 => Just(with(&durable, &[("x-dead-letter-exchange", text("")), ("x-dead-letter-routing-key", text("q1"))])),
        2 => Just(with(&plain, &[("x-dead-letter-exchange", text("x0")), ("x-max-length", int(1))])),
        1 => Just(with(&plain, &[("x-dead-letter-exchange", text("wharf.topic")), ("x-max-priority", int(2))])),
        2 => Just(with(&durable, &[("x-dead-letter-exchange", text("")), ("x-max-length", int(1))])),
        // Dead letters parked in q2 (redrive brings them back).
        2 => Just(with(&plain, &[("x-dead-letter-exchange", text("")), ("x-dead-letter-routing-key", text("q2")), ("x-max-length", int(1))])),
        1 => Just(with(&plain, &[("x-dead-letter-exchange", text("nowhere")), ("x-max-length", int(1))])),
        1 => Just(with(&plain, &[("x-dead-letter-exchange", int(1))])),
        2 => Just(with(&durable, &[("x-delivery-limit", int(1)), ("x-dead-letter-exchange", text("")), ("x-dead-letter-routing-key", text("q2"))])),
        1 => Just(with(&plain, &[("x-delivery-limit", int(2)), ("x-max-priority", int(3))])),
        1 => Just(with(&plain, &[("x-delivery-limit", int(0)), ("x-dead-letter-exchange", text("x1"))])),
        2 => Just(with(&durable, &[("x-message-ttl", int(10)), ("x-dead-letter-exchange", text("")), ("x-dead-letter-routing-key", text("q1"))])),
        1 => Just(with(&plain, &[("x-message-ttl", int(0))])),
        1 => Just(with(&plain, &[("x-message-ttl", int(25)), ("x-max-length", int(2)), ("x-dead-letter-exchange", text("x0"))])),
        // With another queue dead-lettering here, the "retry through a TTL queue" loop.
        1 => Just(with(&plain, &[("x-message-ttl", int(6)), ("x-dead-letter-exchange", text("")), ("x-dead-letter-routing-key", text("q0"))])),
        3 => Just(with(&durable, &[("x-retry", retry(&[0])), ("x-dead-letter-exchange", text("")), ("x-dead-letter-routing-key", text("q2"))])),
        2 => Just(with(&plain, &[("x-retry", retry(&[0, 4])), ("x-dead-letter-exchange", text("x0")), ("x-max-priority", int(2))])),
        1 => Just(with(&plain, &[("x-retry", retry(&[3])), ("x-delivery-limit", int(3))])),
        3 => Just(with(&plain, &[("x-dedup-window", int(40))])),
        1 => Just(with(&durable, &[("x-dedup-window", int(5)), ("x-max-length", int(2)), ("x-overflow", text("reject-publish"))])),
        2 => Just(with(&plain, &[("x-expires", int(15))])),
        1 => Just(with(&durable, &[("x-expires", int(40)), ("x-message-ttl", int(20)), ("x-dead-letter-exchange", text("x0"))])),
        1 => Just(with(&plain, &[("x-expires", int(0))])),
        6 => Just(plain.clone()),
        5 => Just(QueueOptions { durable: true, ..plain.clone() }),
        1 => Just(QueueOptions { durable: true, single_active_consumer: true, ..plain.clone() }),
        2 => Just(QueueOptions { auto_delete: true, ..plain.clone() }),
        1 => Just(QueueOptions { exclusive: true, ..plain.clone() }),
        2 => Just(QueueOptions { single_active_consumer: true, ..plain.clone() }),
        1 => Just(QueueOptions { exclusive: true, auto_delete: true, ..plain }),
    ]
}

pub(crate) fn variant() -> impl Strategy<Value = Variant> {
    prop_oneof![10 => Just(Variant::AsProfiled), 1 => Just(Variant::DurabilityFlipped), 1 => Just(Variant::OtherKind)]
}

pub(crate) fn consumer_pick() -> impl Strategy<Value = ConsumerPick> {
    prop_oneof![
        4 => any::<Index>().prop_map(ConsumerPick::Attached),
        1 => (0..N_CONNECTIONS, 1..=CONSUMER_TAGS_MAX).prop_map(|(conn, tag)| ConsumerPick::Named { conn, tag }),
    ]
}

pub(crate) fn tag_pick() -> impl Strategy<Value = TagPick> {
    prop_oneof![
        8 => any::<Index>().prop_map(TagPick::Outstanding),
        1 => Just(TagPick::Zero),
        1 => Just(TagPick::Unknown),
        2 => any::<Index>().prop_map(TagPick::Lapsed),
        2 => Just(TagPick::Newest),
    ]
}

pub(crate) fn target() -> impl Strategy<Value = Target> {
    prop_oneof![4 => queue_idx().prop_map(Target::Queue), 1 => exchange_idx().prop_map(Target::Exchange)]
}

/// Exchange names: mostly the user exchanges, sometimes a built-in or a refused name.
pub(crate) fn exchange_idx() -> impl Strategy<Value = usize> {
    prop_oneof![16 => 0..N_USER_EXCHANGES, 2 => N_USER_EXCHANGES..=DEFAULT_EXCHANGE_IDX, 1 => DEFAULT_EXCHANGE_IDX + 1..EXCHANGE_NAMES.len()]
}

/// Queue names: mostly the user queues, sometimes a refused name.
pub(crate) fn queue_idx() -> impl Strategy<Value = usize> {
    prop_oneof![20 => 0..N_USER_QUEUES, 1 => N_USER_QUEUES..QUEUE_NAMES.len()]
}

pub(crate) fn limits() -> impl Strategy<Value = Limits> {
    let tight = Limits {
        queues_max: 2,
        exchanges_max: 2,
        vhosts_max: 1,
        bindings_per_exchange_max: 2,
        consumers_per_queue_max: 2,
        consumers_per_connection_max: 2,
        // Paging has its own test (tests/paging.rs); the model keeps every message in memory.
        paging_threshold: 0,
        paging_threshold_bytes: 0,
        page_transient: false,
    };
    prop_oneof![3 => Just(Limits::default()), 1 => Just(tight)]
}

pub(crate) fn op() -> impl Strategy<Value = Op> {
    let conn = || 0..N_CONNECTIONS;
    let queue = queue_idx;
    prop_oneof![
        1 => conn().prop_map(|conn| Op::Open { conn }),
        1 => (conn(), prop::bool::weighted(0.8)).prop_map(|(conn, reopen)| Op::Close { conn, reopen }),
        2 => (exchange_idx(), variant(), prop::bool::weighted(0.1))
            .prop_map(|(exchange, variant, passive)| Op::DeclareExchange { exchange, variant, passive }),
        1 => (exchange_idx(), any::<bool>()).prop_map(|(exchange, if_unused)| Op::DeleteExchange { exchange, if_unused }),
        3 => (conn(), queue(), variant(), prop::bool::weighted(0.1))
            .prop_map(|(conn, queue, variant, passive)| Op::DeclareQueue { conn, queue, variant, passive }),
        1 => (conn(), queue(), any::<bool>(), any::<bool>())
            .prop_map(|(conn, queue, if_unused, if_empty)| Op::DeleteQueue { conn, queue, if_unused, if_empty }),
        1 => (conn(), queue()).prop_map(|(conn, queue)| Op::Purge { conn, queue }),
        4 => bind_op(),
        1 => (exchange_idx(), target(), 0..BINDING_KEYS.len(), 0..N_BINDING_ARGUMENTS)
            .prop_map(|(source, target, key, arguments)| Op::Unbind { source, target, key, arguments }),
        2 => any::<Index>().prop_map(|binding| Op::UnbindExisting { binding }),
        20 => (publish_route(), 0..N_MESSAGE_HEADERS, 0..3usize, timing())
            .prop_map(|((exchange, key), headers, padding, timing)| Op::Publish { exchange, key, headers, padding, timing }),
        6 => subscribe_op(),
        2 => consumer_pick().prop_map(|consumer| Op::Cancel { consumer }),
        2 => (consumer_pick(), 1..=2u32).prop_map(|(consumer, credit)| Op::Credit { consumer, credit }),
        8 => (conn(), tag_pick(), prop::bool::weighted(0.3)).prop_map(|(conn, pick, multiple)| Op::Ack { conn, pick, multiple }),
        3 => (conn(), tag_pick(), prop::bool::weighted(0.3), prop::bool::weighted(0.7))
            .prop_map(|(conn, pick, multiple, requeue)| Op::Nack { conn, pick, multiple, requeue }),
        2 => (conn(), tag_pick(), prop::bool::weighted(0.6)).prop_map(|(conn, pick, requeue)| Op::Reject { conn, pick, requeue }),
        2 => (conn(), tag_pick(), prop_oneof![4 => 0..=3u64, 1 => 10..=100u64], prop::bool::weighted(0.1))
            .prop_map(|(conn, pick, span, reversed)| Op::AckRange { conn, pick, span, reversed }),
        1 => (publish_route(), 10..=80usize, any::<bool>())
            .prop_map(|((exchange, key), count, with_ids)| Op::PublishMany { exchange, key, count, with_ids }),
        1 => Just(Op::AckAllButOldest),
        5 => (prop_oneof![3 => 0..=3u64, 2 => 4..=50u64], prop::bool::weighted(0.8))
            .prop_map(|(ms, tick)| Op::Advance { ms, tick }),
        3 => (any::<bool>(), prop::bool::weighted(0.7)).prop_map(|(early, tick)| Op::ToDeadline { early, tick }),
        2 => (1..=3usize).prop_map(|rounds| Op::KeepFailing { rounds }),
        2 => (conn(), tag_pick(), prop_oneof![2 => Just(0u64), 8 => 1..=20u64, 1 => Just(DURATION_MS_MAX + 1)])
            .prop_map(|(conn, pick, delay_ms)| Op::Defer { conn, pick, delay_ms }),
        3 => (conn(), tag_pick()).prop_map(|(conn, pick)| Op::Touch { conn, pick }),
        3 => (conn(), queue(), prop::option::weighted(0.7, any::<Index>()), 0..=2u64)
            .prop_map(|(conn, queue, dead_letters, max)| Op::Redrive { conn, queue, dead_letters, max }),
    ]
}

/// Mostly plain messages; some delayed, some with a TTL (0 included), some with a message id
/// from a small set.
pub(crate) fn timing() -> impl Strategy<Value = Timing> {
    let delay = prop_oneof![12 => Just(None), 1 => Just(Some(0)), 3 => (1..=30u64).prop_map(Some)];
    let expiration =
        prop_oneof![12 => Just(None), 1 => Just(Some(0)), 3 => (1..=40u64).prop_map(Some)];
    let message_id = prop_oneof![1 => Just(None), 1 => (0..MESSAGE_IDS.len()).prop_map(Some)];
    (delay, expiration, message_id).prop_map(|(delay_ms, expiration_ms, message_id)| Timing {
        delay_ms,
        expiration_ms,
        message_id,
    })
}

/// Exchange and key of a publish: mostly the default exchange with a queue name, or another
/// exchange with a word; sometimes the other way round (unroutable).
pub(crate) fn publish_route() -> impl Strategy<Value = (usize, usize)> {
    let default_exchange = DEFAULT_EXCHANGE_IDX;
    let words = 0..5usize;
    let queue_names = 5..PUBLISH_KEYS.len();
    prop_oneof![
        5 => (Just(default_exchange), queue_names.clone()),
        5 => (exchange_idx(), words.clone()),
        1 => (Just(default_exchange), words),
        1 => (exchange_idx(), queue_names),
    ]
}

pub(crate) fn subscribe_op() -> impl Strategy<Value = Op> {
    let flags = (
        prop::bool::weighted(0.3),
        prop::bool::weighted(0.04),
        0..=1i32,
        prop_oneof![30 => Just(None), 10 => (2..=20u64).prop_map(Some), 1 => Just(Some(0))],
    );
    (
        0..N_CONNECTIONS,
        queue_idx(),
        1..=CONSUMER_TAGS_MAX,
        0..=3u32,
        flags,
        prop_oneof![6 => Just(None), 1 => (0..=4u32).prop_map(Some)],
    )
        .prop_map(
            |(
                conn,
                queue,
                tag,
                prefetch,
                (auto_ack, exclusive, priority, ack_timeout_ms),
                initial_credit,
            )| {
                Op::Subscribe {
                    conn,
                    queue,
                    tag,
                    prefetch,
                    auto_ack,
                    exclusive,
                    priority,
                    ack_timeout_ms,
                    initial_credit,
                }
            },
        )
}

pub(crate) fn bind_op() -> impl Strategy<Value = Op> {
    (
        exchange_idx(),
        target(),
        0..BINDING_KEYS.len(),
        0..N_BINDING_ARGUMENTS,
    )
        .prop_map(|(source, target, key, arguments)| Op::Bind {
            source,
            target,
            key,
            arguments,
        })
}

pub(crate) fn case() -> impl Strategy<Value = Case> {
    let exchanges = [exchange_profile(), exchange_profile(), exchange_profile()];
    let queues = [queue_profile(), queue_profile(), queue_profile()];
    let declaring_conns = [0..N_CONNECTIONS, 0..N_CONNECTIONS, 0..N_CONNECTIONS];
    let bindings = prop::collection::vec(bind_op(), 0..=6);
    let consumers = prop::collection::vec(subscribe_op(), 0..=4);
    (
        (exchanges, queues, limits()),
        declaring_conns,
        bindings,
        consumers,
        prop::collection::vec(op(), 1..=60),
    )
        .prop_map(
            |((exchanges, queues, limits), declaring_conns, bindings, consumers, ops)| {
                let mut setup: Vec<Op> = (0..N_USER_EXCHANGES)
                    .map(|exchange| Op::DeclareExchange {
                        exchange,
                        variant: Variant::AsProfiled,
                        passive: false,
                    })
                    .collect();
                setup.extend((0..N_USER_QUEUES).map(|queue| Op::DeclareQueue {
                    conn: declaring_conns[queue],
                    queue,
                    variant: Variant::AsProfiled,
                    passive: false,
                }));
                setup.extend(bindings);
                setup.extend(consumers);
                Case {
                    universe: Universe {
                        exchanges,
                        queues,
                        limits,
                        setup,
                    },
                    ops,
                }
            },
        )
}
