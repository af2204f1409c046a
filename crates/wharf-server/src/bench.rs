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

use crate::cli::{
    EXIT_BENCH_CHECK, EXIT_CONNECT, EXIT_OTHER, EXIT_REFUSED, EXIT_USAGE, Failure, Kind, ServerArg,
};
use bytes::{BufMut as _, Bytes, BytesMut};
use clap::{Args, ValueEnum};
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt as _, StreamExt as _};
use hdrhistogram::Histogram;
use std::collections::{HashSet, VecDeque};
use std::fmt::Write as _;
use std::io::IsTerminal as _;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use wharf_client::{
    Client, ClientError, ClientOptions, ConsumeOptions, Consumer, Delivery, Durability,
    ExchangeKind, HeadersMatch, Message, PREFETCH_MAX, PublishTicket,
};

/// Bytes of the header every bench body starts with (send time, producer and sequence).
pub const BODY_HEADER_BYTES: usize = 16;
/// Largest body: well under the 16 MiB frame limit, with room for the frame's own fields.
const BODY_BYTES_MAX: usize = 8 * 1024 * 1024;
/// Sequence numbers are 48 bits of the body's id word; the producer index is the top 16.
const SEQ_BITS: u32 = 48;
const SEQ_MASK: u64 = (1 << SEQ_BITS) - 1;
/// Bodies are cut from buffers of about this many bytes: one allocation per chunk, not per
/// message.
const BODY_CHUNK_BYTES: usize = 256 * 1024;
/// Latencies are recorded in ns between 1 ns and this (longer ones saturate).
const LATENCY_NS_MAX: u64 = 3_600 * 1_000_000_000;
/// Consumers read the clock once per wake-up and then every this many deliveries of a burst.
const CLOCK_EVERY_DELIVERIES: u32 = 32;
/// Header used to route to a queue through a headers exchange.
const HEADERS_KEY: &str = "bench-queue";

/// The preset scenarios; explicit flags override their values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// Transient, 1 producer → 1 queue → 1 consumer, 100 B, auto-ack, 1 M messages.
    S1,
    /// S1 with 4 KiB bodies, 200 k messages.
    #[value(name = "s1-4k")]
    S1_4k,
    /// Durable queue, persistent messages, confirm window 1,000, manual acks, 100 B, 500 k.
    S2,
    /// Open loop: 10,000 msgs/s for 10 s, transient, 100 B: latency percentiles.
    S3,
    /// S3 with a durable queue, persistent messages, confirms and manual acks.
    S3d,
    /// Fanout exchange → 4 queues → 4 consumers, 100 B, 250 k published.
    S4,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::S1 => "S1",
            Scenario::S1_4k => "S1-4k",
            Scenario::S2 => "S2",
            Scenario::S3 => "S3",
            Scenario::S3d => "S3d",
            Scenario::S4 => "S4",
        }
    }
}

/// `wharf bench`
#[derive(Debug, Args)]
#[command(
    after_help = "Presets (--scenario): s1, s1-4k, s2, s3, s3d, s4; flags override them.\n\
Exits 8 if a message was lost, duplicated without the redelivered flag, or malformed."
)]
pub struct BenchArgs {
    /// A preset from the benchmarks issue; explicit flags override its values.
    #[arg(long, value_enum)]
    scenario: Option<Scenario>,
    /// Producer connections [default: 1].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=65_535))]
    producers: Option<u32>,
    /// Consumer connections, spread over the queues round-robin [default: --queues].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    consumers: Option<u32>,
    /// Queues (bench-*), each bound to the bench's exchange [default: 1].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    queues: Option<u32>,
    /// Exchange type; with fanout every queue gets every message [default: direct].
    #[arg(long, value_enum)]
    exchange_kind: Option<Kind>,
    /// Body bytes, at least 16 (send time and sequence number) [default: 100].
    #[arg(long, value_name = "BYTES")]
    size: Option<usize>,
    /// Messages to publish in total [default: 100000].
    #[arg(long, conflicts_with = "duration")]
    count: Option<u64>,
    /// Publish for SECS (fractions allowed) instead of a count.
    #[arg(long, value_name = "SECS", value_parser = parse_seconds)]
    duration: Option<Duration>,
    /// Open loop: publish at this many msgs/s in total, on a fixed schedule; latency is
    /// measured from each message's slot on the schedule.
    #[arg(long, value_name = "MSGS_PER_S")]
    rate: Option<f64>,
    /// Durable queues and persistent messages (confirmed after fsync).
    #[arg(long, conflicts_with = "transient")]
    persistent: bool,
    /// Transient queues and messages (overrides a persistent preset).
    #[arg(long)]
    transient: bool,
    /// Most unconfirmed publishes per producer [default: 10000].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    confirm_window: Option<u32>,
    /// Consumer prefetch (manual ack) or credit window (auto-ack) [default: 2000; 1000 with
    /// --rate].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=i64::from(PREFETCH_MAX)))]
    prefetch: Option<u32>,
    /// Deliveries are settled when sent (the default).
    #[arg(long, conflicts_with = "manual_ack")]
    auto_ack: bool,
    /// Consumers ack; see --ack-every.
    #[arg(long)]
    manual_ack: bool,
    /// Manual ack: one `ack multiple` per N deliveries (and whenever the consumer is idle);
    /// 1 acks each delivery [default: prefetch / 4].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    ack_every: Option<u32>,
    /// Messages per `PublishBatch`; 1 publishes one by one [default: 100; 1 with --rate].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=16_384))]
    batch: Option<u32>,
    /// Runtime worker threads of the bench process [default: 2].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=64))]
    threads: Option<u32>,
    /// After publishing ends, give up waiting for deliveries after SECS without progress.
    #[arg(long, value_name = "SECS", value_parser = parse_seconds, default_value = "10")]
    drain_timeout: Duration,
    /// Publish everything before any consumer attaches, then drain the standing queues
    /// (queues larger than memory): the delivery rate is the drain rate, from the moment the
    /// consumers attach.
    #[arg(long, conflicts_with = "rate")]
    backlog: bool,
    /// Print the results as one JSON object on stdout (instead of the table).
    #[arg(long)]
    json: bool,
    /// No progress output on stderr.
    #[arg(long)]
    quiet: bool,
    /// Negative control of the integrity check (tests): consumers ignore every Nth delivery,
    /// so the run must report those messages lost.
    #[arg(long, hide = true, value_parser = clap::value_parser!(u64).range(1..))]
    fault_ignore_every: Option<u64>,
    /// Negative control of the integrity check (tests): consumers record every Nth delivery
    /// twice, so the run must report duplicates.
    #[arg(long, hide = true, value_parser = clap::value_parser!(u64).range(1..))]
    fault_repeat_every: Option<u64>,
    #[command(flatten)]
    server: ServerArg,
}

fn parse_seconds(text: &str) -> Result<Duration, String> {
    let seconds: f64 = text
        .parse()
        .map_err(|_| format!("expected seconds, got {text:?}"))?;
    Duration::try_from_secs_f64(seconds).map_err(|err| format!("{text:?}: {err}"))
}

/// What the run does, resolved from flags > scenario > defaults and validated.
#[derive(Clone, Debug)]
struct Settings {
    scenario: Option<Scenario>,
    producers: u32,
    consumers: u32,
    queues: u32,
    kind: ExchangeKind,
    size: usize,
    /// Messages per producer, or `None` with `duration` (closed loop until the deadline).
    count: Option<u64>,
    duration: Option<Duration>,
    rate: Option<f64>,
    persistent: bool,
    confirm_window: u32,
    prefetch: u32,
    auto_ack: bool,
    ack_every: u32,
    batch: u32,
    threads: u32,
    drain_timeout: Duration,
    backlog: bool,
    json: bool,
    quiet: bool,
    fault_ignore_every: Option<u64>,
    fault_repeat_every: Option<u64>,
    server: String,
}

/// Values a scenario sets (`None`: the general default).
#[derive(Default)]
struct Preset {
    queues: Option<u32>,
    kind: Option<Kind>,
    size: Option<usize>,
    count: Option<u64>,
    duration: Option<Duration>,
    rate: Option<f64>,
    persistent: bool,
    confirm_window: Option<u32>,
    prefetch: Option<u32>,
    manual_ack: bool,
    ack_every: Option<u32>,
    batch: Option<u32>,
}

fn preset(scenario: Option<Scenario>) -> Preset {
    let Some(scenario) = scenario else {
        return Preset::default();
    };
    match scenario {
        Scenario::S1 => Preset {
            count: Some(1_000_000),
            batch: Some(500),
            prefetch: Some(4_000),
            ..Preset::default()
        },
        Scenario::S1_4k => Preset {
            size: Some(4_096),
            count: Some(200_000),
            batch: Some(100),
            prefetch: Some(2_000),
            ..Preset::default()
        },
        Scenario::S2 => Preset {
            count: Some(500_000),
            persistent: true,
            confirm_window: Some(1_000),
            manual_ack: true,
            batch: Some(100),
            prefetch: Some(4_000),
            ack_every: Some(500),
            ..Preset::default()
        },
        Scenario::S3 | Scenario::S3d => Preset {
            rate: Some(10_000.0),
            duration: Some(Duration::from_secs(10)),
            persistent: scenario == Scenario::S3d,
            confirm_window: Some(1_000),
            manual_ack: scenario == Scenario::S3d,
            ack_every: Some(1),
            batch: Some(1),
            prefetch: Some(1_000),
            ..Preset::default()
        },
        Scenario::S4 => Preset {
            queues: Some(4),
            kind: Some(Kind::Fanout),
            count: Some(250_000),
            batch: Some(500),
            prefetch: Some(4_000),
            ..Preset::default()
        },
    }
}

fn usage(message: impl Into<String>) -> Failure {
    Failure::new(EXIT_USAGE, message)
}

impl TryFrom<BenchArgs> for Settings {
    type Error = Failure;

    fn try_from(args: BenchArgs) -> Result<Settings, Failure> {
        let preset = preset(args.scenario);
        let queues = args.queues.or(preset.queues).unwrap_or(1);
        let producers = args.producers.unwrap_or(1);
        let consumers = args.consumers.unwrap_or(queues);
        if consumers < queues {
            return Err(usage(format!(
                "every queue needs a consumer: --consumers ({consumers}) must be at least \
                 --queues ({queues})"
            )));
        }
        let size = args.size.or(preset.size).unwrap_or(100);
        if !(BODY_HEADER_BYTES..=BODY_BYTES_MAX).contains(&size) {
            return Err(usage(format!(
                "--size must be {BODY_HEADER_BYTES}..={BODY_BYTES_MAX} bytes (the body carries a \
                 16-byte timestamp and sequence number), got {size}"
            )));
        }
        let rate = args.rate.or(preset.rate);
        if let Some(rate) = rate
            && !(rate.is_finite() && rate > 0.0)
        {
            return Err(usage(format!("--rate must be positive, got {rate}")));
        }
        // An explicit --count or --duration replaces the preset's choice of either.
        let (count_total, duration) = match (args.count, args.duration) {
            (Some(count), _) => (Some(count), None),
            (None, Some(duration)) => (None, Some(duration)),
            (None, None) => match (preset.count, preset.duration) {
                (Some(count), _) => (Some(count), None),
                (None, Some(duration)) => (None, Some(duration)),
                (None, None) => (Some(100_000), None),
            },
        };
        if count_total == Some(0) {
            return Err(usage("--count must be at least 1"));
        }
        if duration.is_some_and(|duration| duration.is_zero()) {
            return Err(usage("--duration must be positive"));
        }
        // Open loop with a duration: the schedule fixes the count.
        let count_total = match (count_total, duration, rate) {
            (None, Some(duration), Some(rate)) => {
                Some(((rate * duration.as_secs_f64()).ceil() as u64).max(1))
            }
            (count, _, _) => count,
        };
        let duration = if rate.is_some() { None } else { duration };
        let count = match count_total {
            Some(total) if total < u64::from(producers) => {
                return Err(usage(format!(
                    "--count ({total}) must be at least --producers ({producers})"
                )));
            }
            Some(total) if total / u64::from(producers) > SEQ_MASK => {
                return Err(usage("--count is too large"));
            }
            other => other,
        };
        let persistent = if args.transient {
            false
        } else {
            args.persistent || preset.persistent
        };
        let auto_ack = if args.auto_ack {
            true
        } else {
            !(args.manual_ack || preset.manual_ack)
        };
        let prefetch = args
            .prefetch
            .or(preset.prefetch)
            .unwrap_or(if rate.is_some() { 1_000 } else { 2_000 });
        let ack_every = args
            .ack_every
            .or(preset.ack_every)
            .unwrap_or((prefetch / 4).max(1))
            .min(prefetch);
        let batch = args
            .batch
            .or(preset.batch)
            .unwrap_or(if rate.is_some() { 1 } else { 100 });
        let kind: ExchangeKind = args
            .exchange_kind
            .or(preset.kind)
            .unwrap_or(Kind::Direct)
            .into();
        Ok(Settings {
            scenario: args.scenario,
            producers,
            consumers,
            queues,
            kind,
            size,
            count,
            duration,
            rate,
            persistent,
            confirm_window: args
                .confirm_window
                .or(preset.confirm_window)
                .unwrap_or(10_000),
            prefetch,
            auto_ack,
            ack_every,
            batch,
            threads: args.threads.unwrap_or(2),
            drain_timeout: args.drain_timeout,
            backlog: args.backlog,
            json: args.json,
            quiet: args.quiet,
            fault_ignore_every: args.fault_ignore_every,
            fault_repeat_every: args.fault_repeat_every,
            server: args.server.server,
        })
    }
}

impl Settings {
    /// Messages producer `producer_idx` publishes (count mode).
    fn producer_count(&self, producer_idx: u32) -> Option<u64> {
        self.count.map(|total| {
            let base = total / u64::from(self.producers);
            let extra = u64::from(u64::from(producer_idx) < total % u64::from(self.producers));
            base + extra
        })
    }

    fn fanout(&self) -> bool {
        self.kind == ExchangeKind::Fanout
    }

    /// The queue a producer's message goes to: consecutive `batch`-sized runs of sequence
    /// numbers rotate over the queues (producers start at different queues). Fanout: all.
    fn queue_of(&self, producer_idx: u32, seq: u64) -> u32 {
        ((seq / u64::from(self.batch) + u64::from(producer_idx)) % u64::from(self.queues)) as u32
    }

    fn describe(&self) -> String {
        let mut text = String::new();
        if let Some(scenario) = self.scenario {
            let _ = write!(text, "{}: ", scenario.name());
        }
        let _ = write!(
            text,
            "{} producer(s) → {} exchange → {} queue(s) → {} consumer(s), {} B, {}, {}, batch {}, \
             confirm window {}, prefetch {}",
            self.producers,
            kind_name(self.kind),
            self.queues,
            self.consumers,
            self.size,
            if self.persistent {
                "persistent"
            } else {
                "transient"
            },
            if self.auto_ack {
                "auto-ack".to_owned()
            } else {
                format!("manual ack (every {})", self.ack_every)
            },
            self.batch,
            self.confirm_window,
            self.prefetch,
        );
        match (self.rate, self.count, self.duration) {
            (Some(rate), Some(count), _) => {
                let _ = write!(text, ", {count} messages at {rate} msgs/s (open loop)");
            }
            (_, Some(count), _) => {
                let _ = write!(text, ", {count} messages");
            }
            (_, None, Some(duration)) => {
                let _ = write!(text, ", for {:.1} s", duration.as_secs_f64());
            }
            _ => {}
        }
        if self.backlog {
            text.push_str(", published as a backlog, then drained");
        }
        text
    }

    fn routing_key(&self, run_id: &str, queue_idx: u32) -> String {
        match self.kind {
            ExchangeKind::Direct => format!("{run_id}-q{queue_idx}"),
            ExchangeKind::Topic => format!("bench.q{queue_idx}.msg"),
            _ => String::new(),
        }
    }

    fn binding_key(&self, run_id: &str, queue_idx: u32) -> String {
        match self.kind {
            ExchangeKind::Direct => format!("{run_id}-q{queue_idx}"),
            ExchangeKind::Topic => format!("bench.q{queue_idx}.*"),
            _ => String::new(),
        }
    }
}

fn kind_name(kind: ExchangeKind) -> &'static str {
    match kind {
        ExchangeKind::Direct => "direct",
        ExchangeKind::Fanout => "fanout",
        ExchangeKind::Topic => "topic",
        ExchangeKind::Headers => "headers",
    }
}

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

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_NS_MAX, 3).expect("valid histogram bounds")
}

// ---------------------------------------------------------------------------------------------
// Producers.

/// Cuts bench bodies out of shared chunk buffers.
struct Bodies {
    buf: BytesMut,
    size: usize,
    chunk_bytes: usize,
    filler: Vec<u8>,
}

impl Bodies {
    fn new(size: usize) -> Bodies {
        Bodies {
            buf: BytesMut::new(),
            size,
            chunk_bytes: (BODY_CHUNK_BYTES / size).clamp(1, 1024) * size,
            filler: (0..size - BODY_HEADER_BYTES)
                .map(|idx| b'a' + (idx % 26) as u8)
                .collect(),
        }
    }

    fn next(&mut self, intended_ns: u64, producer_idx: u32, seq: u64) -> Bytes {
        if self.buf.capacity() - self.buf.len() < self.size {
            self.buf = BytesMut::with_capacity(self.chunk_bytes.max(self.size));
        }
        self.buf.put_u64_le(intended_ns);
        self.buf
            .put_u64_le((u64::from(producer_idx) << SEQ_BITS) | seq);
        self.buf.put_slice(&self.filler);
        self.buf.split().freeze()
    }
}

struct ProducerReport {
    published: u64,
    confirmed: u64,
    refused: u64,
    /// Published messages without a positive confirm (refused, or the connection ended).
    unconfirmed: Vec<u64>,
    confirmed_per_queue: Vec<u64>,
    /// Confirm time minus intended send time.
    confirm_latency: Histogram<u64>,
    last_publish_ns: u64,
    last_confirm_ns: u64,
    error: Option<ClientError>,
}

impl ProducerReport {
    fn new(settings: &Settings, start_ns: u64) -> ProducerReport {
        ProducerReport {
            published: 0,
            confirmed: 0,
            refused: 0,
            unconfirmed: Vec::new(),
            confirmed_per_queue: vec![0; settings.queues as usize],
            confirm_latency: new_histogram(),
            last_publish_ns: start_ns,
            last_confirm_ns: start_ns,
            error: None,
        }
    }
}

struct Producer {
    settings: Arc<Settings>,
    idx: u32,
    client: Client,
    exchange: String,
    routing_keys: Arc<Vec<String>>,
    clock: Clock,
    start_ns: u64,
    progress: Arc<Progress>,
}

/// A paced producer waits longer than this before a slot on tokio's timer (1 ms granularity)
/// and only this last stretch on `std::thread::sleep`.
const PACED_COARSE_SLEEP_NS_MIN: u64 = 2_000_000;

/// A batch in flight: first sequence number, size, queue, intended time of its first message,
/// and the outcomes.
type BatchDone = (
    u64,
    u64,
    u32,
    u64,
    Result<Vec<Result<Durability, ClientError>>, ClientError>,
);

impl Producer {
    /// Nanoseconds between two messages of this producer on the `--rate` schedule.
    fn interval_ns(&self) -> Option<f64> {
        self.settings
            .rate
            .map(|rate| 1e9 * f64::from(self.settings.producers) / rate)
    }

    /// The intended send time of `seq` on the schedule; producers are phase-shifted so that
    /// together they publish evenly.
    fn slot_ns(&self, interval_ns: f64, seq: u64) -> u64 {
        let phase = interval_ns * f64::from(self.idx) / f64::from(self.settings.producers);
        self.start_ns + (seq as f64 * interval_ns + phase) as u64
    }

    fn message(&self, body: Bytes, queue_idx: u32) -> Message {
        let message = Message::new(body).persistent(self.settings.persistent);
        if self.settings.kind == ExchangeKind::Headers {
            message.header(HEADERS_KEY, i64::from(queue_idx))
        } else {
            message
        }
    }

    /// Publishes until the count or the deadline, then waits for every confirm. In open-loop
    /// mode it runs as a [`PacedProducer`].
    async fn run(self) -> ProducerReport {
        let settings = self.settings.clone();
        let publisher = self.client.publisher_with_window(settings.confirm_window);
        let count = settings.producer_count(self.idx);
        let deadline_ns = settings
            .duration
            .map(|duration| self.start_ns + duration.as_nanos() as u64);
        let interval_ns = self.interval_ns();
        let mut report = ProducerReport::new(&settings, self.start_ns);
        let mut bodies = Bodies::new(settings.size);
        let batch = u64::from(settings.batch);
        let batches_in_flight_max = (settings.confirm_window as usize)
            .div_ceil(settings.batch as usize)
            .max(1);
        let mut tickets: VecDeque<(u64, u32, u64, PublishTicket)> = VecDeque::new();
        let mut batches: FuturesUnordered<BoxFuture<'_, BatchDone>> = FuturesUnordered::new();
        let mut seq = 0_u64;
        loop {
            if count.is_some_and(|count| seq >= count) {
                break;
            }
            let mut now_ns = self.clock.now_ns();
            if deadline_ns.is_some_and(|deadline| now_ns >= deadline) {
                break;
            }
            // How many to send now: up to the end of this routing run of `batch` messages,
            // and, on a schedule, only those whose slot has come.
            let mut n_send = batch - seq % batch;
            if let Some(count) = count {
                n_send = n_send.min(count - seq);
            }
            if let Some(interval_ns) = interval_ns {
                let slot_ns = self.slot_ns(interval_ns, seq);
                if slot_ns > now_ns + PACED_COARSE_SLEEP_NS_MIN {
                    // A long wait goes on tokio's timer, which keeps this thread's connection
                    // served (heartbeats, confirms); the last stretch on the precise sleep.
                    let coarse_ns = slot_ns - now_ns - PACED_COARSE_SLEEP_NS_MIN;
                    tokio::time::sleep(Duration::from_nanos(coarse_ns)).await;
                    now_ns = self.clock.now_ns();
                }
                if slot_ns > now_ns {
                    std::thread::sleep(Duration::from_nanos(slot_ns - now_ns));
                    now_ns = self.clock.now_ns();
                }
                let n_slots_passed =
                    (now_ns.saturating_sub(self.start_ns) as f64 / interval_ns) as u64 + 1;
                n_send = n_send.min(n_slots_passed.saturating_sub(seq).max(1));
            }
            let queue_idx = settings.queue_of(self.idx, seq);
            let routing_key = &self.routing_keys[queue_idx as usize];
            let intended = |seq: u64| match interval_ns {
                Some(interval_ns) => self.slot_ns(interval_ns, seq),
                None => now_ns,
            };
            if settings.batch == 1 {
                let body = bodies.next(intended(seq), self.idx, seq);
                match publisher
                    .publish(&self.exchange, routing_key, self.message(body, queue_idx))
                    .await
                {
                    Ok(ticket) => tickets.push_back((seq, queue_idx, intended(seq), ticket)),
                    Err(err) => {
                        report.error = Some(err);
                        break;
                    }
                }
                seq += 1;
                report.published += 1;
                if interval_ns.is_some() {
                    // Paced: the connection's writer runs on this thread's runtime. Let it
                    // write the message (and the reader take in confirms) before sleeping.
                    tokio::task::yield_now().await;
                }
                self.drain_ready_tickets(&mut tickets, &mut report);
                if tickets.len() > 2 * settings.confirm_window as usize
                    && let Some(entry) = tickets.pop_front()
                {
                    self.settle_ticket(entry, &mut report).await;
                }
            } else {
                let first_intended = intended(seq);
                let messages: Vec<Message> = (seq..seq + n_send)
                    .map(|msg_seq| {
                        let body = bodies.next(intended(msg_seq), self.idx, msg_seq);
                        self.message(body, queue_idx)
                    })
                    .collect();
                let first_seq = seq;
                let publisher = &publisher;
                let exchange = self.exchange.as_str();
                batches.push(Box::pin(async move {
                    let outcomes = publisher
                        .publish_batch(exchange, routing_key, messages)
                        .await;
                    (first_seq, n_send, queue_idx, first_intended, outcomes)
                }));
                seq += n_send;
                report.published += n_send;
                // Polling sends the new batch's frames; completed ones are accounted.
                while let Some(Some(done)) = batches.next().now_or_never() {
                    self.account_batch(done, &mut report);
                }
                if interval_ns.is_some() {
                    // Paced: let this thread's connection writer send the batch now.
                    tokio::task::yield_now().await;
                }
                while batches.len() >= batches_in_flight_max {
                    match batches.next().await {
                        Some(done) => self.account_batch(done, &mut report),
                        None => break,
                    }
                }
                if report.error.is_some() {
                    break;
                }
            }
            report.last_publish_ns = self.clock.now_ns();
            self.progress
                .primary
                .store(report.published, Ordering::Relaxed);
        }
        report.last_publish_ns = self.clock.now_ns();
        self.progress
            .primary
            .store(report.published, Ordering::Relaxed);
        while let Some(entry) = tickets.pop_front() {
            self.settle_ticket(entry, &mut report).await;
        }
        while let Some(done) = batches.next().await {
            self.account_batch(done, &mut report);
        }
        drop(batches);
        let _ = self.client.close().await;
        report
    }

    fn drain_ready_tickets(
        &self,
        tickets: &mut VecDeque<(u64, u32, u64, PublishTicket)>,
        report: &mut ProducerReport,
    ) {
        while let Some((_, _, _, ticket)) = tickets.front_mut() {
            let Some(outcome) = ticket.now_or_never() else {
                return;
            };
            let (seq, queue_idx, intended_ns, _) = tickets.pop_front().expect("front exists");
            self.account_one(seq, queue_idx, intended_ns, outcome, report);
        }
    }

    async fn settle_ticket(
        &self,
        (seq, queue_idx, intended_ns, ticket): (u64, u32, u64, PublishTicket),
        report: &mut ProducerReport,
    ) {
        let outcome = ticket.await;
        self.account_one(seq, queue_idx, intended_ns, outcome, report);
    }

    fn account_one(
        &self,
        seq: u64,
        queue_idx: u32,
        intended_ns: u64,
        outcome: Result<Durability, ClientError>,
        report: &mut ProducerReport,
    ) {
        let now_ns = self.clock.now_ns();
        report.last_confirm_ns = now_ns;
        match outcome {
            Ok(_) => {
                report.confirmed += 1;
                report.confirmed_per_queue[queue_idx as usize] += 1;
                report
                    .confirm_latency
                    .saturating_record(now_ns.saturating_sub(intended_ns).max(1));
            }
            Err(err) => {
                self.account_refusal(seq, err, report);
            }
        }
        self.progress
            .secondary
            .store(report.confirmed, Ordering::Relaxed);
    }

    fn account_refusal(&self, seq: u64, err: ClientError, report: &mut ProducerReport) {
        report.unconfirmed.push(seq);
        if err.is_connection_error() {
            report.error.get_or_insert(err);
        } else {
            report.refused += 1;
        }
    }

    fn account_batch(&self, done: BatchDone, report: &mut ProducerReport) {
        let (first_seq, n_messages, queue_idx, intended_ns, outcomes) = done;
        let now_ns = self.clock.now_ns();
        report.last_confirm_ns = now_ns;
        match outcomes {
            Ok(outcomes) => {
                let mut n_confirmed = 0;
                for (seq, outcome) in (first_seq..).zip(outcomes) {
                    match outcome {
                        Ok(_) => n_confirmed += 1,
                        Err(err) => self.account_refusal(seq, err, report),
                    }
                }
                report.confirmed += n_confirmed;
                report.confirmed_per_queue[queue_idx as usize] += n_confirmed;
                if n_confirmed > 0 {
                    report.confirm_latency.saturating_record_n(
                        now_ns.saturating_sub(intended_ns).max(1),
                        n_confirmed,
                    );
                }
            }
            Err(err) => {
                // Nothing of this batch was sent.
                report.published -= n_messages;
                report.error.get_or_insert(err);
            }
        }
        self.progress
            .secondary
            .store(report.confirmed, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------------------------
// Consumers.

struct ConsumerReport {
    queue_idx: u32,
    /// Every delivery, duplicates and redeliveries included.
    delivered: u64,
    /// First deliveries (as seen by this consumer).
    unique: u64,
    duplicates: u64,
    redelivered: u64,
    malformed: u64,
    /// One bitset per producer: sequence numbers delivered.
    seen: Vec<Vec<u64>>,
    /// Redelivered messages (rare), so a copy seen by two consumers of a queue is not taken
    /// for a duplicate.
    redelivered_ids: Vec<(u32, u64)>,
    latency: Histogram<u64>,
    last_delivery_ns: u64,
    /// Deliveries dropped on purpose (`--fault-ignore-every`).
    n_ignored: u64,
    error: Option<ClientError>,
}

impl ConsumerReport {
    /// Checks and records one body; `false` if this consumer saw it before.
    fn record(&mut self, body: &[u8], redelivered: bool, n_producers: u32, now_ns: u64) {
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

struct ConsumerTask {
    settings: Arc<Settings>,
    queue_idx: u32,
    client: Client,
    consumer: Consumer,
    clock: Clock,
    progress: Arc<Progress>,
    stop: watch::Receiver<bool>,
}

impl ConsumerTask {
    async fn run(mut self) -> ConsumerReport {
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

// ---------------------------------------------------------------------------------------------
// The run.

/// What a producer is given once every producer is connected.
struct ProducerStart {
    idx: u32,
    exchange: String,
    routing_keys: Arc<Vec<String>>,
    clock: Clock,
    start_ns: u64,
    progress: Arc<Progress>,
}

impl ProducerStart {
    fn into_producer(self, settings: Arc<Settings>, client: Client) -> Producer {
        Producer {
            settings,
            idx: self.idx,
            client,
            exchange: self.exchange,
            routing_keys: self.routing_keys,
            clock: self.clock,
            start_ns: self.start_ns,
            progress: self.progress,
        }
    }
}

/// A connected producer waiting for the start.
enum PendingProducer {
    /// Runs as a task of the bench's runtime.
    Task(Client),
    /// Runs on a thread of its own (see [`PacedProducer`]).
    Paced(PacedProducer),
}

/// An open-loop (`--rate`) producer: a thread of its own that sleeps to each message's slot
/// with `std::thread::sleep` (precise to tens of µs, where tokio's timer has 1 ms granularity),
/// driving its connection on a current-thread runtime of its own. The publishing thread writes
/// each message to the socket itself: no other thread is woken between the schedule and the
/// broker, as with an application on a `current_thread` runtime (and as `loopback-floor`'s
/// sender does).
struct PacedProducer {
    start: std::sync::mpsc::Sender<ProducerStart>,
    thread: tokio::task::JoinHandle<ProducerReport>,
}

impl PacedProducer {
    /// Starts the thread and waits until its connection is open.
    async fn connect(settings: Arc<Settings>) -> Result<PacedProducer, Failure> {
        let (connected_sender, connected) = tokio::sync::oneshot::channel();
        let (start, started) = std::sync::mpsc::channel::<ProducerStart>();
        let thread = tokio::task::spawn_blocking(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(err) => {
                    let failure = Failure::new(
                        EXIT_OTHER,
                        format!("cannot start a producer runtime: {err}"),
                    );
                    let _ = connected_sender.send(Err(failure));
                    return ProducerReport::new(&settings, 0);
                }
            };
            let client = match runtime.block_on(connect(&settings, "producer")) {
                Ok(client) => client,
                Err(failure) => {
                    let _ = connected_sender.send(Err(failure));
                    return ProducerReport::new(&settings, 0);
                }
            };
            let _ = connected_sender.send(Ok(()));
            match started.recv() {
                Ok(start) => runtime.block_on(start.into_producer(settings, client).run()),
                // The run was abandoned before it started (another producer failed to connect).
                Err(_) => ProducerReport::new(&settings, 0),
            }
        });
        match connected.await {
            Ok(Ok(())) => Ok(PacedProducer { start, thread }),
            Ok(Err(failure)) => Err(failure),
            Err(_) => Err(Failure::new(EXIT_OTHER, "a producer thread ended early")),
        }
    }

    fn start(self, start: ProducerStart) -> tokio::task::JoinHandle<ProducerReport> {
        // The thread is waiting on the other end and only returns after receiving.
        let _ = self.start.send(start);
        self.thread
    }
}

async fn connect(settings: &Settings, role: &str) -> Result<Client, Failure> {
    let options = ClientOptions {
        client_name: format!("wharf-bench/{} {role}", env!("CARGO_PKG_VERSION")),
        connect_timeout: Duration::from_secs(10),
        ..ClientOptions::default()
    };
    Client::connect_with(&settings.server, options)
        .await
        .map_err(|err| {
            let mut failure = Failure::from(err);
            if failure.exit_code != EXIT_USAGE {
                failure.exit_code = EXIT_CONNECT;
            }
            failure
        })
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
        client
            .declare_queue(queue)
            .durable(settings.persistent)
            .auto_delete(!settings.persistent)
            .await?;
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

/// Shows progress on stderr: a bar on a terminal, a plain line per second otherwise.
struct Reporter {
    bar: Option<indicatif::ProgressBar>,
    plain: bool,
    last_line: Instant,
    last_sample: (Instant, u64, u64, u64),
}

impl Reporter {
    fn new(settings: &Settings, expected_deliveries: Option<u64>) -> Reporter {
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

    fn update(&mut self, published: u64, confirmed: u64, delivered: u64) {
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

    fn finish(&self) {
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

// ---------------------------------------------------------------------------------------------
// Results.

struct Results {
    published: u64,
    confirmed: u64,
    refused: u64,
    expected: u64,
    delivered: u64,
    duplicates: u64,
    redelivered: u64,
    lost: u64,
    malformed: u64,
    /// Delivered to a queue it was not routed to, or never published.
    unexpected: u64,
    publish_seconds: f64,
    confirm_seconds: f64,
    deliver_seconds: f64,
    latency: Histogram<u64>,
    confirm_latency: Histogram<u64>,
    error: Option<ClientError>,
}

impl Results {
    /// `drain_start_ns`: with `--backlog`, when the consumers attached (deliveries are timed
    /// from then).
    fn merge(
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

    fn counts_line(&self) -> String {
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

    fn to_json(&self, settings: &Settings) -> serde_json::Value {
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

    fn table(&self, settings: &Settings) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn settings(args: &[&str]) -> Result<Settings, Failure> {
        let cli = Cli::try_parse_from(std::iter::once("bench").chain(args.iter().copied()))
            .expect("parses");
        Settings::try_from(cli.bench)
    }

    #[test]
    fn scenario_presets_apply_and_flags_override_them() {
        let s2 = settings(&["--scenario", "s2"]).unwrap();
        assert!(s2.persistent && !s2.auto_ack);
        assert_eq!((s2.count, s2.confirm_window), (Some(500_000), 1_000));
        let s3 = settings(&["--scenario", "s3", "--duration", "2"]).unwrap();
        assert_eq!((s3.count, s3.duration), (Some(20_000), None));
        let s4 = settings(&["--scenario", "s4", "--count", "10", "--transient"]).unwrap();
        assert_eq!((s4.count, s4.queues, s4.consumers), (Some(10), 4, 4));
        assert!(s4.fanout());
    }

    #[test]
    fn impossible_settings_are_usage_errors() {
        for args in [
            &["--queues", "2", "--consumers", "1"][..],
            &["--size", "8"],
            &["--rate", "0"],
            &["--count", "1", "--producers", "2"],
        ] {
            let failure = settings(args).expect_err("refused");
            assert_eq!(failure.exit_code, EXIT_USAGE, "{args:?}");
        }
    }

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

    #[test]
    fn runs_of_a_batch_rotate_over_the_queues() {
        let settings = settings(&["--queues", "3", "--batch", "2"]).unwrap();
        let queues: Vec<u32> = (0..8).map(|seq| settings.queue_of(0, seq)).collect();
        assert_eq!(queues, [0, 0, 1, 1, 2, 2, 0, 0]);
        assert_eq!(settings.queue_of(1, 0), 1);
    }
}
