//! The broker core's hot path: publish → route → enqueue → deliver → ack, 100-byte bodies,
//! single-threaded, for each exchange type. One iteration = one message published and every
//! resulting delivery acked.

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use std::sync::Arc;
use wharf_core::{
    BindTarget, Broker, Command, ConnectionId, ConsumerOptions, ConsumerTag, Effect, Headers,
    Message, QueueOptions,
};

const CONN: ConnectionId = ConnectionId(1);

struct Setup {
    broker: Broker,
    effects: Vec<Effect>,
    scratch: Vec<Effect>,
    messages: Vec<Arc<Message>>,
}

fn setup(n_queues: usize) -> Setup {
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
    for idx in 0..n_queues {
        let name = format!("q{idx}");
        broker
            .apply(
                0,
                Command::DeclareQueue {
                    vhost: wharf_core::DEFAULT_VHOST.into(),
                    connection: CONN,
                    name: name.clone(),
                    options: QueueOptions::default(),
                    passive: false,
                    declarer: None,
                },
                &mut effects,
            )
            .unwrap();
        let options = ConsumerOptions {
            prefetch: 1000,
            ..ConsumerOptions::default()
        };
        broker
            .apply(
                0,
                Command::Subscribe {
                    vhost: wharf_core::DEFAULT_VHOST.into(),
                    connection: CONN,
                    queue: name,
                    consumer_tag: ConsumerTag(idx as u32),
                    options,
                },
                &mut effects,
            )
            .unwrap();
    }
    Setup {
        broker,
        effects,
        scratch: Vec::new(),
        messages: Vec::new(),
    }
}

fn bind(setup: &mut Setup, exchange: &str, queue: usize, key: &str, arguments: Headers) {
    setup
        .broker
        .apply(
            0,
            Command::Bind {
                vhost: wharf_core::DEFAULT_VHOST.into(),
                source: exchange.into(),
                target: BindTarget::Queue(format!("q{queue}")),
                routing_key: key.into(),
                arguments,
            },
            &mut setup.effects,
        )
        .unwrap();
}

fn message(exchange: &str, key: &str, headers: Headers) -> Arc<Message> {
    Arc::new(Message {
        exchange: exchange.into(),
        headers,
        ..Message::new(key, Bytes::from(vec![7u8; 100]))
    })
}

/// One cycle: publish the next message, ack every delivery it caused. With `fresh`, the
/// message is first copied into a new `Arc`, as the server's decoding stage does for every
/// published message; without, the core cycle alone (the message is shared).
fn cycle(setup: &mut Setup, idx: usize, fresh: bool) {
    let message = setup.messages[idx % setup.messages.len()].clone();
    let message = if fresh {
        Arc::new(Message::clone(&message))
    } else {
        message
    };
    setup
        .broker
        .apply(
            0,
            Command::Publish {
                vhost: wharf_core::DEFAULT_VHOST.into(),
                message,
            },
            &mut setup.effects,
        )
        .unwrap();
    // Swap buffers instead of allocating: deliveries to ack in one, new effects in the other.
    std::mem::swap(&mut setup.effects, &mut setup.scratch);
    for effect in setup.scratch.drain(..) {
        if let Effect::Deliver(delivery) = effect {
            black_box(&delivery.message.body);
            let ack = Command::Ack {
                connection: delivery.connection,
                delivery_tag: delivery.delivery_tag,
                multiple: false,
            };
            setup.broker.apply(0, ack, &mut setup.effects).unwrap();
        }
    }
    setup.effects.clear();
}

fn scenarios() -> Vec<(&'static str, Setup)> {
    let mut out = Vec::new();

    let mut default = setup(1);
    default.messages.push(message("", "q0", Headers::new()));
    out.push(("default", default));

    let mut direct = setup(1000);
    for idx in 0..1000 {
        bind(
            &mut direct,
            "wharf.direct",
            idx,
            &format!("key.{idx}"),
            Headers::new(),
        );
    }
    direct.messages = (0..1000)
        .map(|idx| message("wharf.direct", &format!("key.{idx}"), Headers::new()))
        .collect();
    out.push(("direct_1000_bindings", direct));

    let mut topic = setup(1000);
    for idx in 0..1000 {
        bind(
            &mut topic,
            "wharf.topic",
            idx,
            &format!("region{}.*.orders.#", idx),
            Headers::new(),
        );
    }
    topic.messages = (0..1000)
        .map(|idx| {
            message(
                "wharf.topic",
                &format!("region{idx}.eu.orders.paid"),
                Headers::new(),
            )
        })
        .collect();
    out.push(("topic_1000_bindings", topic));

    let mut fanout = setup(10);
    for idx in 0..10 {
        bind(&mut fanout, "wharf.fanout", idx, "", Headers::new());
    }
    fanout
        .messages
        .push(message("wharf.fanout", "", Headers::new()));
    out.push(("fanout_10_queues", fanout));

    let mut headers = setup(10);
    for idx in 0..10 {
        let args = Headers::new()
            .with("x-match", "all")
            .with("kind", "order")
            .with("shard", idx as i64);
        bind(&mut headers, "wharf.headers", idx, "", args);
    }
    headers.messages = (0..10)
        .map(|idx| {
            message(
                "wharf.headers",
                "",
                Headers::new()
                    .with("kind", "order")
                    .with("shard", idx as i64),
            )
        })
        .collect();
    out.push(("headers_10_bindings", headers));

    out
}

fn core_cycle(c: &mut Criterion) {
    let mut group = c.benchmark_group("core_cycle");
    group.throughput(Throughput::Elements(1));
    for (name, mut setup) in scenarios() {
        let mut idx = 0usize;
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| {
                cycle(&mut setup, idx, false);
                idx = idx.wrapping_add(1);
            })
        });
        if name == "default" {
            group.bench_function(
                BenchmarkId::from_parameter("default_with_fresh_message"),
                |b| {
                    b.iter(|| {
                        cycle(&mut setup, idx, true);
                        idx = idx.wrapping_add(1);
                    })
                },
            );
        }
    }
    group.finish();
}

criterion_group!(benches, core_cycle);
criterion_main!(benches);
