//! `wharf bench`: the end-to-end load generator (in the spirit of rabbitmq-perf-test and
//! `nats bench`). It declares its own exchange and `bench-*` queues, runs producers and
//! consumers on their own connections, and reports publish, confirm and delivery rates, the
//! publish → deliver latency (HdrHistogram) and an integrity check: every confirmed message
//! must be delivered to every queue it was routed to, and never twice without the
//! redelivered flag.
//!
//! Every message body starts with 16 bytes written by the producer:
//! `intended send time (u64 LE, ns since the bench's shared Instant)` then
//! `producer index (u16) << 48 | sequence number (48 bits)` (u64 LE). With `--rate` the time is
//! the message's slot on the schedule, not when it was actually sent, so a stalled producer
//! shows up in the latency instead of hiding it (no coordinated omission).
//!
//! Cost discipline (the bench shares the machine with the broker): bodies are cut from one
//! buffer per chunk (no allocation per message beyond what the client needs), each task keeps
//! its own counters, bitsets and histograms, and they are merged once at the end; progress is
//! read from per-task atomics that only their owner writes.
//!
//! Modules: [`settings`] (flags, presets, validation), [`producer`], [`consumer`] and
//! [`report`] (histograms, progress, table and JSON output); this one runs them.

mod consumer;
mod producer;
mod report;
mod settings;

pub use settings::BenchArgs;

use crate::cli::{EXIT_BENCH_CHECK, EXIT_OTHER, EXIT_REFUSED, Failure, connect_as};
use consumer::{ConsumerReport, ConsumerTask};
use producer::{PacedProducer, PendingProducer, ProducerReport, ProducerStart};
use report::{Reporter, Results};
use settings::Settings;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use wharf_client::{Client, ConsumeOptions, ExchangeKind, HeadersMatch};

/// Bytes of the header every bench body starts with (send time, producer and sequence).
pub const BODY_HEADER_BYTES: usize = 16;
/// Sequence numbers are 48 bits of the body's id word; the producer index is the top 16.
const SEQ_BITS: u32 = 48;
const SEQ_MASK: u64 = (1 << SEQ_BITS) - 1;
/// Header used to route to a queue through a headers exchange.
const HEADERS_KEY: &str = "bench-queue";

/// Entry point from `main`: resolves the settings, runs the bench on its own runtime, prints
/// the results, and turns the integrity check into the exit code.
pub fn main(args: BenchArgs) -> ExitCode {
    let settings = match Settings::try_from(args) {
        Ok(settings) => settings,
        Err(failure) => return report_failure(failure),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(settings.threads as usize)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            return report_failure(Failure::new(
                EXIT_OTHER,
                format!("cannot start the runtime: {err}"),
            ));
        }
    };
    let result = runtime.block_on(run(&settings));
    runtime.shutdown_timeout(Duration::from_secs(1));
    let results = match result {
        Ok(results) => results,
        Err(failure) => return report_failure(failure),
    };
    if settings.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&results.to_json(&settings)).expect("JSON of numbers")
        );
    } else {
        print!("{}", results.table(&settings));
    }
    let counts = results.counts_line();
    if results.lost > 0 || results.duplicates > 0 || results.malformed > 0 || results.unexpected > 0
    {
        return report_failure(Failure::new(
            EXIT_BENCH_CHECK,
            format!("integrity check failed: {counts}"),
        ));
    }
    if let Some(err) = &results.error {
        return report_failure(Failure::from(err.clone()));
    }
    if results.refused > 0 {
        return report_failure(Failure::new(
            EXIT_REFUSED,
            format!("{} publishes were refused: {counts}", results.refused),
        ));
    }
    ExitCode::SUCCESS
}

fn report_failure(failure: Failure) -> ExitCode {
    eprintln!("error: {}", failure.message);
    ExitCode::from(failure.exit_code)
}

// ---------------------------------------------------------------------------------------------
// Shared clock and progress.

/// Nanoseconds since the bench's shared `Instant` (every task of the process reads the same).
#[derive(Clone, Copy)]
struct Clock {
    epoch: Instant,
}

impl Clock {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// Written by one task only, read by the progress reporter: no contention, no lock.
#[derive(Default)]
#[repr(align(64))]
struct Progress {
    /// Producers: messages handed to the client. Consumers: first-time deliveries.
    primary: AtomicU64,
    /// Producers: confirmed messages. Consumers: every delivery.
    secondary: AtomicU64,
}

/// Connects one connection of the run (`role`: control, producer or consumer).
async fn connect(settings: &Settings, role: &str) -> Result<Client, Failure> {
    connect_as(
        &settings.server,
        format!("wharf-bench/{} {role}", env!("CARGO_PKG_VERSION")),
    )
    .await
}

/// The topology of one run: names unique to it.
struct Topology {
    exchange: String,
    queues: Vec<String>,
}

async fn declare(settings: &Settings, client: &Client) -> Result<Topology, Failure> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    let run_id = format!("bench-{}-{nanos:08x}", std::process::id());
    let topology = Topology {
        exchange: run_id.clone(),
        queues: (0..settings.queues)
            .map(|queue_idx| format!("{run_id}-q{queue_idx}"))
            .collect(),
    };
    client
        .declare_exchange(&topology.exchange, settings.kind)
        .durable(settings.persistent)
        .await?;
    for (queue_idx, queue) in (0..).zip(&topology.queues) {
        let mut declare = client
            .declare_queue(queue)
            .durable(settings.persistent)
            .auto_delete(!settings.persistent);
        if let Some(max_priority) = settings.max_priority {
            declare = declare.max_priority(max_priority);
        }
        declare.await?;
        let mut bind = client.bind_queue(
            queue,
            &topology.exchange,
            &settings.binding_key(&run_id, queue_idx),
        );
        if settings.kind == ExchangeKind::Headers {
            bind = bind
                .headers_match(HeadersMatch::All)
                .argument(HEADERS_KEY, i64::from(queue_idx));
        }
        bind.await?;
    }
    Ok(topology)
}

async fn clean_up(client: &Client, topology: &Topology) {
    for queue in &topology.queues {
        // Auto-delete queues may be gone already.
        let _ = client.delete_queue(queue).await;
    }
    let _ = client.delete_exchange(&topology.exchange).await;
    let _ = client.close().await;
}

async fn run(settings: &Settings) -> Result<Results, Failure> {
    let settings = Arc::new(settings.clone());
    let clock = Clock {
        epoch: Instant::now(),
    };
    let control = connect(&settings, "control").await?;
    let topology = declare(&settings, &control).await?;
    let result = run_load(&settings, &topology, clock).await;
    clean_up(&control, &topology).await;
    result
}

async fn run_load(
    settings: &Arc<Settings>,
    topology: &Topology,
    clock: Clock,
) -> Result<Results, Failure> {
    let (stop_sender, stop) = watch::channel(false);
    // Consumers first, so nothing is published before someone listens (unless measuring the
    // drain of a backlog: then they attach once everything is published).
    let (mut consumer_tasks, mut consumer_progress) = if settings.backlog {
        (Vec::new(), Vec::new())
    } else {
        start_consumers(settings, topology, clock, &stop).await?
    };
    let mut drain_start_ns: Option<u64> = None;
    let routing_keys: Arc<Vec<String>> = Arc::new(
        (0..settings.queues)
            .map(|queue_idx| settings.routing_key(&topology.exchange, queue_idx))
            .collect(),
    );
    // Every producer connects before the first one starts.
    let mut producers = Vec::new();
    for idx in 0..settings.producers {
        let producer = if settings.rate.is_some() {
            PendingProducer::Paced(PacedProducer::connect(settings.clone()).await?)
        } else {
            PendingProducer::Task(connect(settings, "producer").await?)
        };
        producers.push((idx, producer));
    }
    let start_ns = clock.now_ns();
    let mut producer_tasks = Vec::new();
    let mut producer_progress = Vec::new();
    for (idx, pending) in producers {
        let progress = Arc::new(Progress::default());
        producer_progress.push(progress.clone());
        let start = ProducerStart {
            idx,
            exchange: topology.exchange.clone(),
            routing_keys: routing_keys.clone(),
            clock,
            start_ns,
            progress,
        };
        producer_tasks.push(match pending {
            PendingProducer::Paced(paced) => paced.start(start),
            PendingProducer::Task(client) => {
                tokio::spawn(start.into_producer(settings.clone(), client).run())
            }
        });
    }
    let expected_upfront = settings.count.map(|count| {
        if settings.fanout() {
            count * u64::from(settings.queues)
        } else {
            count
        }
    });
    let mut reporter = Reporter::new(settings, expected_upfront);
    let mut producer_reports: Option<Vec<ProducerReport>> = None;
    let mut expected_per_queue = vec![0_u64; settings.queues as usize];
    let mut last_unique = 0_u64;
    let mut last_progress = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let published: u64 = producer_progress
            .iter()
            .map(|progress| progress.primary.load(Ordering::Relaxed))
            .sum();
        let confirmed: u64 = producer_progress
            .iter()
            .map(|progress| progress.secondary.load(Ordering::Relaxed))
            .sum();
        let mut unique_per_queue = vec![0_u64; settings.queues as usize];
        let mut delivered = 0;
        for (queue_idx, progress) in &consumer_progress {
            unique_per_queue[*queue_idx as usize] += progress.primary.load(Ordering::Relaxed);
            delivered += progress.secondary.load(Ordering::Relaxed);
        }
        reporter.update(published, confirmed, delivered);
        if consumer_tasks.iter().any(|task| task.is_finished()) {
            break; // A consumer ended early (its connection broke): stop and report.
        }
        if producer_reports.is_none() && producer_tasks.iter().all(|task| task.is_finished()) {
            let mut reports = Vec::new();
            for task in producer_tasks.drain(..) {
                reports.push(task.await.map_err(|err| {
                    Failure::new(EXIT_OTHER, format!("a producer task failed: {err}"))
                })?);
            }
            for report in &reports {
                for (queue_idx, n_confirmed) in report.confirmed_per_queue.iter().enumerate() {
                    if settings.fanout() {
                        expected_per_queue
                            .iter_mut()
                            .for_each(|n| *n += n_confirmed);
                    } else {
                        expected_per_queue[queue_idx] += n_confirmed;
                    }
                }
            }
            producer_reports = Some(reports);
            if settings.backlog {
                (consumer_tasks, consumer_progress) =
                    start_consumers(settings, topology, clock, &stop).await?;
                drain_start_ns = Some(clock.now_ns());
            }
            last_progress = Instant::now();
        }
        let unique: u64 = unique_per_queue.iter().sum();
        if unique != last_unique {
            last_unique = unique;
            last_progress = Instant::now();
        }
        if producer_reports.is_some() {
            let all_in = unique_per_queue
                .iter()
                .zip(&expected_per_queue)
                .all(|(unique, expected)| unique >= expected);
            if all_in || last_progress.elapsed() >= settings.drain_timeout {
                break;
            }
        }
    }
    let _ = stop_sender.send(true);
    let mut consumer_reports = Vec::new();
    for task in consumer_tasks {
        consumer_reports.push(
            task.await.map_err(|err| {
                Failure::new(EXIT_OTHER, format!("a consumer task failed: {err}"))
            })?,
        );
    }
    let producer_reports = match producer_reports {
        Some(reports) => reports,
        None => {
            // Consumers ended first; producers end once their connection fails or they finish.
            let mut reports = Vec::new();
            for task in producer_tasks {
                reports.push(task.await.map_err(|err| {
                    Failure::new(EXIT_OTHER, format!("a producer task failed: {err}"))
                })?);
            }
            reports
        }
    };
    reporter.finish();
    Ok(Results::merge(
        settings,
        start_ns,
        drain_start_ns,
        producer_reports,
        consumer_reports,
    ))
}

/// Attaches the consumers (spread over the queues round-robin) and starts their tasks.
#[allow(clippy::type_complexity)]
async fn start_consumers(
    settings: &Arc<Settings>,
    topology: &Topology,
    clock: Clock,
    stop: &watch::Receiver<bool>,
) -> Result<
    (
        Vec<tokio::task::JoinHandle<ConsumerReport>>,
        Vec<(u32, Arc<Progress>)>,
    ),
    Failure,
> {
    let mut consumer_tasks = Vec::new();
    let mut consumer_progress = Vec::new();
    for consumer_idx in 0..settings.consumers {
        let queue_idx = consumer_idx % settings.queues;
        let client = connect(settings, "consumer").await?;
        let consumer = client
            .consume(
                &topology.queues[queue_idx as usize],
                ConsumeOptions {
                    prefetch: settings.prefetch,
                    auto_ack: settings.auto_ack,
                    ..ConsumeOptions::default()
                },
            )
            .await?;
        let progress = Arc::new(Progress::default());
        consumer_progress.push((queue_idx, progress.clone()));
        let task = ConsumerTask {
            settings: settings.clone(),
            queue_idx,
            client,
            consumer,
            clock,
            progress,
            stop: stop.clone(),
        };
        consumer_tasks.push(tokio::spawn(task.run()));
    }
    Ok((consumer_tasks, consumer_progress))
}
