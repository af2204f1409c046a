//! Delayed delivery at scale: 1,000,000 messages held at once, due uniformly over 5 seconds of
//! wall-clock time, fired by `Tick` as the clock reaches them, exactly as the server's timer
//! task does (it ticks at `Broker::next_deadline`). Reports how late each message was
//! delivered after its due time (p50 / p99 / p99.9 / max), which includes the millisecond
//! granularity of the clock. Issue #7's target: p99 lateness under 10 ms.
//!
//! `cargo bench -p wharf-benches --bench delay_lateness` (`-- --quick`: 100,000 messages
//! over 2 s). Prints a table; not a criterion benchmark (one long run, not many samples).

use bytes::Bytes;
use hdrhistogram::Histogram;
use std::sync::Arc;
use std::time::Instant;
use wharf_core::{
    Broker, Command, ConnectionId, ConsumerOptions, ConsumerTag, Effect, Message, QueueOptions,
};

const CONN: ConnectionId = ConnectionId(1);
/// The logical clock at the start (any origin works; the server uses unix ms).
const ORIGIN_MS: u64 = 1_000_000;
/// Due times start this long after the start, so that publishing finishes first.
const LEAD_MS: u64 = 3_000;

fn main() {
    let quick = std::env::args().any(|arg| arg == "--quick");
    let (n_messages, spread_ms) = if quick {
        (100_000u64, 2_000u64)
    } else {
        (1_000_000, 5_000)
    };
    let start = Instant::now();
    let now_ms = || ORIGIN_MS + start.elapsed().as_millis() as u64;
    let mut broker = Broker::default();
    let mut effects = Vec::new();
    let apply = |broker: &mut Broker, now: u64, command: Command, effects: &mut Vec<Effect>| {
        broker
            .apply(now, command, effects)
            .expect("command applies");
    };
    apply(
        &mut broker,
        now_ms(),
        Command::OpenConnection {
            vhost: wharf_core::DEFAULT_VHOST.into(),
            connection: CONN,
        },
        &mut effects,
    );
    apply(
        &mut broker,
        now_ms(),
        Command::DeclareQueue {
            vhost: wharf_core::DEFAULT_VHOST.into(),
            connection: CONN,
            name: "q".into(),
            options: QueueOptions::default(),
            passive: false,
            declarer: None,
        },
        &mut effects,
    );
    apply(
        &mut broker,
        now_ms(),
        Command::Subscribe {
            vhost: wharf_core::DEFAULT_VHOST.into(),
            connection: CONN,
            queue: "q".into(),
            consumer_tag: ConsumerTag(1),
            options: ConsumerOptions {
                prefetch: 0,
                auto_ack: true,
                ..ConsumerOptions::default()
            },
        },
        &mut effects,
    );
    // Due times spread evenly (a fixed permutation, so that they are published out of order).
    let publish_started = Instant::now();
    for idx in 0..n_messages {
        let slot = (idx.wrapping_mul(2_654_435_761)) % n_messages;
        let due = ORIGIN_MS + LEAD_MS + slot * spread_ms / n_messages;
        let now = now_ms();
        let message = Message {
            delay_ms: Some(due - now),
            ..Message::new("q", Bytes::copy_from_slice(&due.to_le_bytes()))
        };
        apply(
            &mut broker,
            now,
            Command::Publish {
                vhost: wharf_core::DEFAULT_VHOST.into(),
                message: Arc::new(message),
            },
            &mut effects,
        );
    }
    let publish_secs = publish_started.elapsed().as_secs_f64();
    assert!(effects.is_empty(), "nothing is delivered before it is due");
    assert_eq!(broker.delayed_total(), n_messages);
    assert!(
        now_ms() < ORIGIN_MS + LEAD_MS,
        "publishing took longer than the lead time; raise LEAD_MS"
    );

    let mut lateness_us = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
    let mut delivered = 0u64;
    let mut ticks = 0u64;
    let mut longest_tick_us = 0u64;
    while delivered < n_messages {
        let now = now_ms();
        if broker.next_deadline().is_none_or(|due| due > now) {
            std::hint::spin_loop();
            continue;
        }
        let tick_started = Instant::now();
        apply(&mut broker, now, Command::Tick, &mut effects);
        ticks += 1;
        let at_us = start.elapsed().as_micros() as u64;
        for effect in effects.drain(..) {
            if let Effect::Deliver(delivery) = effect {
                let due = u64::from_le_bytes(delivery.message.body[..8].try_into().unwrap());
                let due_us = (due - ORIGIN_MS) * 1_000;
                assert!(at_us >= due_us, "delivered before due");
                lateness_us
                    .record((at_us - due_us).max(1))
                    .expect("in bounds");
                delivered += 1;
            }
        }
        longest_tick_us = longest_tick_us.max(tick_started.elapsed().as_micros() as u64);
    }
    let ms = |us: u64| us as f64 / 1_000.0;
    println!("delayed delivery: {n_messages} messages due over {spread_ms} ms");
    println!(
        "  published (held) in {publish_secs:.2} s ({:.0} msgs/s)",
        n_messages as f64 / publish_secs
    );
    println!(
        "  ticks: {ticks}, longest tick {:.2} ms",
        ms(longest_tick_us)
    );
    println!(
        "  lateness after due: p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
        ms(lateness_us.value_at_quantile(0.50)),
        ms(lateness_us.value_at_quantile(0.99)),
        ms(lateness_us.value_at_quantile(0.999)),
        ms(lateness_us.max())
    );
}
