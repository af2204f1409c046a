//! Queue features against plain FIFO: the cost per message of enqueueing a backlog and
//! draining it, for a plain queue, a priority queue (`x-max-priority = 10`, random
//! priorities), delayed messages (each held by a timer, then released by one `Tick`), and a
//! queue with a TTL (each message gets an expiry timer). Issue #7's target: priorities and
//! delays within 2× of plain FIFO.
//!
//! One iteration publishes 1,000 100-byte messages to a queue without consumers, (for delays)
//! ticks the clock past their due times, then attaches an auto-ack consumer that drains them
//! all and cancels it.

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use std::sync::Arc;
use wharf_core::{
    Broker, Command, ConnectionId, ConsumerOptions, ConsumerTag, Effect, HeaderValue, Headers,
    Message, QueueOptions,
};

const CONN: ConnectionId = ConnectionId(1);
const BACKLOG: usize = 1_000;

#[derive(Clone, Copy)]
enum Kind {
    Fifo,
    Priority,
    Delayed,
    Ttl,
}

struct Setup {
    broker: Broker,
    effects: Vec<Effect>,
    messages: Vec<Arc<Message>>,
    now: u64,
    kind: Kind,
}

fn setup(kind: Kind) -> Setup {
    let mut broker = Broker::default();
    let mut effects = Vec::new();
    broker
        .apply(
            0,
            Command::OpenConnection {
                vhost: wharf_core::DEFAULT_VHOST.into(),
                connection: CONN,
            },
            &mut effects,
        )
        .unwrap();
    let arguments: Headers = match kind {
        Kind::Priority => [("x-max-priority", HeaderValue::Int(10))]
            .into_iter()
            .collect(),
        Kind::Ttl => [("x-message-ttl", HeaderValue::Int(3_600_000))]
            .into_iter()
            .collect(),
        Kind::Fifo | Kind::Delayed => Headers::new(),
    };
    broker
        .apply(
            0,
            Command::DeclareQueue {
                vhost: wharf_core::DEFAULT_VHOST.into(),
                connection: CONN,
                name: "q".into(),
                options: QueueOptions {
                    arguments,
                    ..QueueOptions::default()
                },
                passive: false,
                declarer: None,
            },
            &mut effects,
        )
        .unwrap();
    // A fixed pseudo-random sequence (no RNG dependency): priorities 0..=10, delays 1..=1000.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let messages = (0..BACKLOG)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let mut message = Message::new("q", Bytes::from(vec![7u8; 100]));
            match kind {
                Kind::Priority => message.priority = (state % 11) as u8,
                Kind::Delayed => message.delay_ms = Some(1 + state % 1_000),
                Kind::Fifo | Kind::Ttl => {}
            }
            Arc::new(message)
        })
        .collect();
    Setup {
        broker,
        effects,
        messages,
        now: 1,
        kind,
    }
}

fn round(setup: &mut Setup) {
    let now = setup.now;
    for message in &setup.messages {
        let message = message.clone();
        setup
            .broker
            .apply(
                now,
                Command::Publish {
                    vhost: wharf_core::DEFAULT_VHOST.into(),
                    message,
                },
                &mut setup.effects,
            )
            .unwrap();
    }
    if let Kind::Delayed = setup.kind {
        setup.now += 1_001;
        setup
            .broker
            .apply(setup.now, Command::Tick, &mut setup.effects)
            .unwrap();
    }
    let options = ConsumerOptions {
        prefetch: 0,
        auto_ack: true,
        ..ConsumerOptions::default()
    };
    setup
        .broker
        .apply(
            setup.now,
            Command::Subscribe {
                vhost: wharf_core::DEFAULT_VHOST.into(),
                connection: CONN,
                queue: "q".into(),
                consumer_tag: ConsumerTag(1),
                options,
            },
            &mut setup.effects,
        )
        .unwrap();
    assert_eq!(setup.effects.len(), BACKLOG, "every message delivered");
    for effect in setup.effects.drain(..) {
        if let Effect::Deliver(delivery) = effect {
            black_box(&delivery.message.body);
        }
    }
    setup
        .broker
        .apply(
            setup.now,
            Command::Cancel {
                connection: CONN,
                consumer_tag: ConsumerTag(1),
            },
            &mut setup.effects,
        )
        .unwrap();
    setup.effects.clear();
    setup.now += 1;
}

fn features(c: &mut Criterion) {
    let mut group = c.benchmark_group("queue_features");
    group.throughput(Throughput::Elements(BACKLOG as u64));
    for (name, kind) in [
        ("fifo", Kind::Fifo),
        ("priority_10", Kind::Priority),
        ("delayed", Kind::Delayed),
        ("ttl", Kind::Ttl),
    ] {
        let mut setup = setup(kind);
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| round(&mut setup))
        });
    }
    group.finish();
}

criterion_group!(benches, features);
criterion_main!(benches);
