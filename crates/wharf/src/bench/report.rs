//! `wharf bench` reporting: latency histograms (HdrHistogram), progress on stderr while it
//! runs, and the results: the producers' and consumers' reports merged into rates, latency
//! percentiles and the integrity check, printed as a table or as JSON.

use super::consumer::ConsumerReport;
use super::producer::ProducerReport;
use super::settings::{Scenario, Settings};
use crate::cli::kind_name;
use hdrhistogram::Histogram;
use std::collections::HashSet;
use std::fmt::Write as _;
use std::io::IsTerminal as _;
use std::time::{Duration, Instant};
use wharf_client::ClientError;

/// Latencies are recorded in ns between 1 ns and this (longer ones saturate).
const LATENCY_NS_MAX: u64 = 3_600 * 1_000_000_000;

pub(super) fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_NS_MAX, 3).expect("valid histogram bounds")
}

/// Shows progress on stderr: a bar on a terminal, a plain line per second otherwise.
pub(super) struct Reporter {
    bar: Option<indicatif::ProgressBar>,
    plain: bool,
    last_line: Instant,
    last_sample: (Instant, u64, u64, u64),
}

impl Reporter {
    pub(super) fn new(settings: &Settings, expected_deliveries: Option<u64>) -> Reporter {
        let terminal = std::io::stderr().is_terminal();
        let bar = (!settings.quiet && terminal).then(|| {
            let bar = match expected_deliveries {
                Some(total) => indicatif::ProgressBar::new(total),
                None => indicatif::ProgressBar::new_spinner(),
            };
            let template = if expected_deliveries.is_some() {
                "{elapsed_precise} [{bar:30}] {percent:>3}% delivered  {msg}"
            } else {
                "{elapsed_precise} {spinner} {msg}"
            };
            bar.set_style(
                indicatif::ProgressStyle::with_template(template)
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            bar
        });
        let now = Instant::now();
        Reporter {
            bar,
            plain: !settings.quiet && !terminal,
            last_line: now,
            last_sample: (now, 0, 0, 0),
        }
    }

    pub(super) fn update(&mut self, published: u64, confirmed: u64, delivered: u64) {
        let now = Instant::now();
        let (then, published_then, confirmed_then, delivered_then) = self.last_sample;
        let seconds = now.duration_since(then).as_secs_f64();
        if seconds < 0.25 {
            return;
        }
        let rate = |now_count: u64, then_count: u64| (now_count - then_count) as f64 / seconds;
        let text = format!(
            "published {} ({}/s)  confirmed {} ({}/s)  delivered {} ({}/s)",
            published,
            si(rate(published, published_then)),
            confirmed,
            si(rate(confirmed, confirmed_then)),
            delivered,
            si(rate(delivered, delivered_then)),
        );
        if let Some(bar) = &self.bar {
            bar.set_position(delivered);
            bar.set_message(text);
            self.last_sample = (now, published, confirmed, delivered);
        } else if self.plain && now.duration_since(self.last_line) >= Duration::from_secs(1) {
            eprintln!("bench: {text}");
            self.last_line = now;
            self.last_sample = (now, published, confirmed, delivered);
        }
    }

    pub(super) fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// `1234567.0` → `1.23M`.
fn si(value: f64) -> String {
    if value >= 1e9 {
        format!("{:.2}G", value / 1e9)
    } else if value >= 1e6 {
        format!("{:.2}M", value / 1e6)
    } else if value >= 1e3 {
        format!("{:.1}k", value / 1e3)
    } else {
        format!("{value:.0}")
    }
}

pub(super) struct Results {
    pub(super) published: u64,
    pub(super) confirmed: u64,
    pub(super) refused: u64,
    pub(super) expected: u64,
    pub(super) delivered: u64,
    pub(super) duplicates: u64,
    pub(super) redelivered: u64,
    pub(super) lost: u64,
    pub(super) malformed: u64,
    /// Delivered to a queue it was not routed to, or never published.
    pub(super) unexpected: u64,
    pub(super) publish_seconds: f64,
    pub(super) confirm_seconds: f64,
    pub(super) deliver_seconds: f64,
    pub(super) latency: Histogram<u64>,
    pub(super) confirm_latency: Histogram<u64>,
    pub(super) error: Option<ClientError>,
}

impl Results {
    /// `drain_start_ns`: with `--backlog`, when the consumers attached (deliveries are timed
    /// from then).
    pub(super) fn merge(
        settings: &Settings,
        start_ns: u64,
        drain_start_ns: Option<u64>,
        producers: Vec<ProducerReport>,
        consumers: Vec<ConsumerReport>,
    ) -> Results {
        let seconds = |end_ns: u64| (end_ns.saturating_sub(start_ns)) as f64 / 1e9;
        let mut latency = new_histogram();
        let mut confirm_latency = new_histogram();
        for report in &producers {
            confirm_latency
                .add(&report.confirm_latency)
                .expect("same bounds");
        }
        for report in &consumers {
            latency.add(&report.latency).expect("same bounds");
        }
        let mut results = Results {
            published: producers.iter().map(|report| report.published).sum(),
            confirmed: producers.iter().map(|report| report.confirmed).sum(),
            refused: producers.iter().map(|report| report.refused).sum(),
            expected: 0,
            delivered: consumers.iter().map(|report| report.delivered).sum(),
            duplicates: consumers.iter().map(|report| report.duplicates).sum(),
            redelivered: consumers.iter().map(|report| report.redelivered).sum(),
            lost: 0,
            malformed: consumers.iter().map(|report| report.malformed).sum(),
            unexpected: 0,
            publish_seconds: seconds(
                producers
                    .iter()
                    .map(|report| report.last_publish_ns)
                    .max()
                    .unwrap_or(start_ns),
            ),
            confirm_seconds: seconds(
                producers
                    .iter()
                    .map(|report| report.last_confirm_ns)
                    .max()
                    .unwrap_or(start_ns),
            ),
            deliver_seconds: consumers
                .iter()
                .map(|report| report.last_delivery_ns)
                .max()
                .map_or(0.0, |end_ns| {
                    let from = drain_start_ns.unwrap_or(start_ns);
                    end_ns.saturating_sub(from) as f64 / 1e9
                }),
            latency,
            confirm_latency,
            error: producers
                .iter()
                .filter_map(|report| report.error.clone())
                .chain(consumers.iter().filter_map(|report| report.error.clone()))
                .next(),
        };
        let unconfirmed: Vec<HashSet<u64>> = producers
            .iter()
            .map(|report| report.unconfirmed.iter().copied().collect())
            .collect();
        for queue_idx in 0..settings.queues {
            let mine: Vec<&ConsumerReport> = consumers
                .iter()
                .filter(|report| report.queue_idx == queue_idx)
                .collect();
            for (producer_idx, producer) in (0..).zip(&producers) {
                // The union of what this queue's consumers saw; a copy seen by two of them is a
                // duplicate unless it came back flagged redelivered.
                let mut union: Vec<u64> = Vec::new();
                for report in &mine {
                    let bits = &report.seen[producer_idx as usize];
                    if union.len() < bits.len() {
                        union.resize(bits.len(), 0);
                    }
                    for (word_idx, word) in bits.iter().enumerate() {
                        let overlap = union[word_idx] & word;
                        if overlap != 0 {
                            for bit in 0..64 {
                                if overlap & (1 << bit) != 0 {
                                    let seq = (word_idx as u64) * 64 + bit;
                                    let redelivered = mine.iter().any(|report| {
                                        report.redelivered_ids.contains(&(producer_idx, seq))
                                    });
                                    if !redelivered {
                                        results.duplicates += 1;
                                    }
                                }
                            }
                        }
                        union[word_idx] |= word;
                    }
                }
                let is_delivered = |seq: u64| {
                    union
                        .get((seq >> 6) as usize)
                        .is_some_and(|word| word & (1 << (seq & 63)) != 0)
                };
                let routed_here = |seq: u64| {
                    settings.fanout() || settings.queue_of(producer_idx, seq) == queue_idx
                };
                for seq in 0..producer.published {
                    if !routed_here(seq) {
                        if is_delivered(seq) {
                            results.unexpected += 1;
                        }
                        continue;
                    }
                    if unconfirmed[producer_idx as usize].contains(&seq) {
                        continue;
                    }
                    results.expected += 1;
                    if !is_delivered(seq) {
                        results.lost += 1;
                    }
                }
                let n_beyond: u64 = union
                    .iter()
                    .enumerate()
                    .map(|(word_idx, word)| {
                        let first = word_idx as u64 * 64;
                        (0..64)
                            .filter(|bit| {
                                word & (1 << bit) != 0 && first + bit >= producer.published
                            })
                            .count() as u64
                    })
                    .sum();
                results.unexpected += n_beyond;
            }
        }
        results
    }

    fn rate(count: u64, seconds: f64) -> f64 {
        if seconds > 0.0 {
            count as f64 / seconds
        } else {
            0.0
        }
    }

    pub(super) fn counts_line(&self) -> String {
        format!(
            "published {}, confirmed {}, refused {}, delivered {} (expected {}), duplicates {}, \
             redelivered {}, lost {}, malformed {}, unexpected {}",
            self.published,
            self.confirmed,
            self.refused,
            self.delivered,
            self.expected,
            self.duplicates,
            self.redelivered,
            self.lost,
            self.malformed,
            self.unexpected,
        )
    }

    fn percentiles_us(histogram: &Histogram<u64>) -> [(&'static str, f64); 6] {
        let at = |quantile: f64| histogram.value_at_quantile(quantile) as f64 / 1e3;
        [
            ("p50", at(0.50)),
            ("p90", at(0.90)),
            ("p99", at(0.99)),
            ("p999", at(0.999)),
            ("max", histogram.max() as f64 / 1e3),
            ("mean", histogram.mean() / 1e3),
        ]
    }

    pub(super) fn to_json(&self, settings: &Settings) -> serde_json::Value {
        use serde_json::{Map, Value, json};
        let percentiles = |histogram: &Histogram<u64>| {
            let mut map = Map::new();
            for (name, value) in Results::percentiles_us(histogram) {
                map.insert(name.to_owned(), json!((value * 1e3).round() / 1e3));
            }
            map.insert("samples".to_owned(), json!(histogram.len()));
            Value::Object(map)
        };
        let delivery_rate = Results::rate(self.delivered, self.deliver_seconds);
        json!({
            "scenario": settings.scenario.map(Scenario::name),
            "description": settings.describe(),
            "settings": {
                "producers": settings.producers,
                "consumers": settings.consumers,
                "queues": settings.queues,
                "exchange_kind": kind_name(settings.kind),
                "size_bytes": settings.size,
                "count": settings.count,
                "duration_s": settings.duration.map(|duration| duration.as_secs_f64()),
                "rate": settings.rate,
                "persistent": settings.persistent,
                "confirm_window": settings.confirm_window,
                "prefetch": settings.prefetch,
                "auto_ack": settings.auto_ack,
                "ack_every": settings.ack_every,
                "publish": settings.publish.name(),
                "batch": settings.batch,
                "threads": settings.threads,
                "backlog": settings.backlog,
            },
            "published": self.published,
            "confirmed": self.confirmed,
            "refused": self.refused,
            "expected": self.expected,
            "delivered": self.delivered,
            "duplicates": self.duplicates,
            "redelivered": self.redelivered,
            "lost": self.lost,
            "malformed": self.malformed,
            "unexpected": self.unexpected,
            "elapsed_s": self.deliver_seconds.max(self.confirm_seconds),
            "publish_rate": Results::rate(self.published, self.publish_seconds).round(),
            "confirm_rate": Results::rate(self.confirmed, self.confirm_seconds).round(),
            "delivery_rate": delivery_rate.round(),
            "delivery_mb_per_s": (delivery_rate * settings.size as f64 / 1e6 * 10.0).round() / 10.0,
            "latency_us": percentiles(&self.latency),
            "confirm_latency_us": percentiles(&self.confirm_latency),
            "error": self.error.as_ref().map(ToString::to_string),
        })
    }

    pub(super) fn table(&self, settings: &Settings) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "{}", settings.describe());
        let _ = writeln!(
            out,
            "{:<10} {:>12} {:>10} {:>14} {:>10}",
            "", "messages", "seconds", "msgs/s", "MB/s"
        );
        let size = settings.size as f64;
        let delivered = if settings.backlog {
            "drained"
        } else {
            "delivered"
        };
        for (name, count, seconds) in [
            ("published", self.published, self.publish_seconds),
            ("confirmed", self.confirmed, self.confirm_seconds),
            (delivered, self.delivered, self.deliver_seconds),
        ] {
            let rate = Results::rate(count, seconds);
            let _ = writeln!(
                out,
                "{name:<10} {count:>12} {seconds:>10.3} {:>14.0} {:>10.1}",
                rate,
                rate * size / 1e6
            );
        }
        for (name, histogram) in [
            ("publish → deliver latency", &self.latency),
            ("publish → confirm latency", &self.confirm_latency),
        ] {
            let _ = write!(out, "{name} (µs):");
            for (label, value) in Results::percentiles_us(histogram) {
                let label = if label == "p999" { "p99.9" } else { label };
                let _ = write!(out, " {label} {value:.1}");
            }
            let _ = writeln!(out);
        }
        let _ = writeln!(out, "{}", self.counts_line());
        out
    }
}
