//! `wharf bench` consumers: a task per consumer connection that checks every delivery's body
//! (a bitset per producer), records its latency and acks (auto, one by one, or `ack multiple`).

use super::report::new_histogram;
use super::settings::Settings;
use super::{BODY_HEADER_BYTES, Clock, Progress, SEQ_BITS, SEQ_MASK};
use futures::FutureExt as _;
use hdrhistogram::Histogram;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::sync::watch;
use wharf_client::{Client, ClientError, Consumer, Delivery};

/// Consumers read the clock once per wake-up and then every this many deliveries of a burst.
const CLOCK_EVERY_DELIVERIES: u32 = 32;

pub(super) struct ConsumerReport {
    pub(super) queue_idx: u32,
    /// Every delivery, duplicates and redeliveries included.
    pub(super) delivered: u64,
    /// First deliveries (as seen by this consumer).
    pub(super) unique: u64,
    pub(super) duplicates: u64,
    pub(super) redelivered: u64,
    pub(super) malformed: u64,
    /// One bitset per producer: sequence numbers delivered.
    pub(super) seen: Vec<Vec<u64>>,
    /// Redelivered messages (rare), so a copy seen by two consumers of a queue is not taken
    /// for a duplicate.
    pub(super) redelivered_ids: Vec<(u32, u64)>,
    pub(super) latency: Histogram<u64>,
    pub(super) last_delivery_ns: u64,
    /// Deliveries dropped on purpose (`--fault-ignore-every`).
    pub(super) n_ignored: u64,
    pub(super) error: Option<ClientError>,
}

impl ConsumerReport {
    /// Checks and records one body; `false` if this consumer saw it before.
    pub(super) fn record(&mut self, body: &[u8], redelivered: bool, n_producers: u32, now_ns: u64) {
        self.delivered += 1;
        if redelivered {
            self.redelivered += 1;
        }
        let Some(header) = body.get(..BODY_HEADER_BYTES) else {
            self.malformed += 1;
            return;
        };
        let intended_ns = u64::from_le_bytes(header[..8].try_into().expect("8 bytes"));
        let id = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
        let producer_idx = (id >> SEQ_BITS) as u32;
        let seq = id & SEQ_MASK;
        if producer_idx >= n_producers {
            self.malformed += 1;
            return;
        }
        let bits = &mut self.seen[producer_idx as usize];
        let word_idx = (seq >> 6) as usize;
        if word_idx >= bits.len() {
            let len = (word_idx + 1).max(bits.len() * 2);
            bits.resize(len, 0);
        }
        let mask = 1_u64 << (seq & 63);
        if bits[word_idx] & mask != 0 {
            if !redelivered {
                self.duplicates += 1;
            }
            return;
        }
        bits[word_idx] |= mask;
        self.unique += 1;
        if redelivered {
            self.redelivered_ids.push((producer_idx, seq));
        }
        self.latency
            .saturating_record(now_ns.saturating_sub(intended_ns).max(1));
    }
}

pub(super) struct ConsumerTask {
    pub(super) settings: Arc<Settings>,
    pub(super) queue_idx: u32,
    pub(super) client: Client,
    pub(super) consumer: Consumer,
    pub(super) clock: Clock,
    pub(super) progress: Arc<Progress>,
    pub(super) stop: watch::Receiver<bool>,
}

impl ConsumerTask {
    pub(super) async fn run(mut self) -> ConsumerReport {
        let settings = self.settings.clone();
        let mut report = ConsumerReport {
            queue_idx: self.queue_idx,
            delivered: 0,
            unique: 0,
            duplicates: 0,
            redelivered: 0,
            malformed: 0,
            seen: vec![Vec::new(); settings.producers as usize],
            redelivered_ids: Vec::new(),
            latency: new_histogram(),
            last_delivery_ns: 0,
            n_ignored: 0,
            error: None,
        };
        if let Some(count) = settings.count {
            let per_queue = if settings.fanout() {
                count
            } else {
                count / u64::from(settings.queues)
            };
            let words = (per_queue / u64::from(settings.producers) / 64 + 1) as usize;
            report.seen.iter_mut().for_each(|bits| bits.reserve(words));
        }
        // Manual ack: the newest delivery not yet acked, and how many it covers.
        let mut unacked: Option<Delivery> = None;
        let mut n_unacked = 0_u32;
        let mut now_ns = self.clock.now_ns();
        let mut n_since_clock = 0_u32;
        loop {
            let next = match self.consumer.next().now_or_never() {
                Some(next) => next,
                None => {
                    // Idle: settle what we hold (so the prefetch window never stalls) and show
                    // progress before waiting.
                    if let Some(delivery) = unacked.take() {
                        if let Err(err) = ack(&delivery, n_unacked).await {
                            report.error = Some(err);
                            break;
                        }
                        n_unacked = 0;
                    }
                    self.progress
                        .primary
                        .store(report.unique, Ordering::Relaxed);
                    self.progress
                        .secondary
                        .store(report.delivered, Ordering::Relaxed);
                    let next = tokio::select! {
                        biased;
                        next = self.consumer.next() => next,
                        _ = self.stop.wait_for(|stop| *stop) => break,
                    };
                    now_ns = self.clock.now_ns();
                    n_since_clock = 0;
                    next
                }
            };
            let delivery = match next {
                Some(Ok(delivery)) => delivery,
                Some(Err(err)) => {
                    report.error = Some(err);
                    break;
                }
                None => break,
            };
            n_since_clock += 1;
            if n_since_clock >= CLOCK_EVERY_DELIVERIES {
                now_ns = self.clock.now_ns();
                n_since_clock = 0;
                self.progress
                    .primary
                    .store(report.unique, Ordering::Relaxed);
                self.progress
                    .secondary
                    .store(report.delivered, Ordering::Relaxed);
            }
            let n_received = report.delivered + report.n_ignored + 1;
            if settings
                .fault_ignore_every
                .is_some_and(|every| n_received.is_multiple_of(every))
            {
                report.n_ignored += 1;
            } else {
                report.record(
                    delivery.body(),
                    delivery.redelivered(),
                    settings.producers,
                    now_ns,
                );
                if settings
                    .fault_repeat_every
                    .is_some_and(|every| n_received.is_multiple_of(every))
                {
                    report.record(delivery.body(), false, settings.producers, now_ns);
                }
            }
            report.last_delivery_ns = now_ns;
            if !settings.auto_ack {
                n_unacked += 1;
                if n_unacked >= settings.ack_every {
                    if let Err(err) = ack(&delivery, n_unacked).await {
                        report.error = Some(err);
                        break;
                    }
                    n_unacked = 0;
                    unacked = None;
                } else {
                    unacked = Some(delivery);
                }
            }
        }
        if let Some(delivery) = unacked.take() {
            let _ = ack(&delivery, n_unacked).await;
        }
        self.progress
            .primary
            .store(report.unique, Ordering::Relaxed);
        self.progress
            .secondary
            .store(report.delivered, Ordering::Relaxed);
        let _ = self.consumer.cancel().await;
        let _ = self.client.close().await;
        report
    }
}

/// Acks `delivery`, and with `n_covered > 1` every earlier one of the connection too.
async fn ack(delivery: &Delivery, n_covered: u32) -> Result<(), ClientError> {
    if n_covered > 1 {
        delivery.ack_multiple().await
    } else {
        delivery.ack().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::producer::Bodies;

    #[test]
    fn bodies_carry_time_producer_and_sequence_and_are_recorded_once() {
        let mut bodies = Bodies::new(40);
        let body = bodies.next(1_234, 3, 77);
        assert_eq!(body.len(), 40);
        let mut report = ConsumerReport {
            queue_idx: 0,
            delivered: 0,
            unique: 0,
            duplicates: 0,
            redelivered: 0,
            malformed: 0,
            seen: vec![Vec::new(); 4],
            redelivered_ids: Vec::new(),
            latency: new_histogram(),
            last_delivery_ns: 0,
            n_ignored: 0,
            error: None,
        };
        report.record(&body, false, 4, 2_234);
        report.record(&body, true, 4, 3_000);
        report.record(&body, false, 4, 3_000);
        report.record(&body[..10], false, 4, 3_000);
        assert_eq!(
            (
                report.delivered,
                report.unique,
                report.redelivered,
                report.duplicates,
                report.malformed
            ),
            (4, 1, 1, 1, 1)
        );
        assert!(report.latency.value_at_quantile(0.5).abs_diff(1_000) <= 1);
    }
}
