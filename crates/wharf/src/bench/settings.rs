//! `wharf bench` settings: the flags ([`BenchArgs`]), the preset scenarios, and their
//! resolution (flags > scenario > defaults) and validation into [`Settings`].

use super::{BODY_HEADER_BYTES, SEQ_MASK};
use crate::cli::{EXIT_USAGE, Failure, Kind, ServerArg, kind_name, parse_seconds};
use clap::{Args, ValueEnum};
use std::fmt::Write as _;
use std::time::Duration;
use wharf_client::{ExchangeKind, PREFETCH_MAX};

/// Largest body: well under the 16 MiB frame limit, with room for the frame's own fields.
const BODY_BYTES_MAX: usize = 8 * 1024 * 1024;

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
    pub(super) fn name(self) -> &'static str {
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

/// How producers hand messages to the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PublishMode {
    /// One `Publisher::publish` call per message, as most programs publish (the client
    /// coalesces what queues up while its connection is busy).
    Single,
    /// `Publisher::publish_batch` calls of `--batch` messages each.
    Batch,
}

impl PublishMode {
    pub(super) fn name(self) -> &'static str {
        match self {
            PublishMode::Single => "single",
            PublishMode::Batch => "batch",
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
    /// A preset scenario of docs/benchmarks.md (listed below); explicit flags override its
    /// values.
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
    /// How producers publish: `single` calls `publish` once per message, as most programs
    /// do; `batch` calls `publish_batch` with --batch messages [default: single; batch when
    /// --batch is more than 1].
    #[arg(long, value_enum)]
    publish: Option<PublishMode>,
    /// Messages per `publish_batch` call (--publish batch) [default: 100].
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
    /// Declare the queues with `x-max-priority` N and publish each producer's message i with
    /// priority i mod (N + 1): a priority-queue workload.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(1..))]
    max_priority: Option<u8>,
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

/// What the run does, resolved from flags > scenario > defaults and validated.
#[derive(Clone, Debug)]
pub(super) struct Settings {
    pub(super) scenario: Option<Scenario>,
    pub(super) producers: u32,
    pub(super) consumers: u32,
    pub(super) queues: u32,
    pub(super) kind: ExchangeKind,
    pub(super) size: usize,
    /// Messages per producer, or `None` with `duration` (closed loop until the deadline).
    pub(super) count: Option<u64>,
    pub(super) duration: Option<Duration>,
    pub(super) rate: Option<f64>,
    pub(super) persistent: bool,
    pub(super) confirm_window: u32,
    pub(super) prefetch: u32,
    pub(super) auto_ack: bool,
    pub(super) ack_every: u32,
    pub(super) publish: PublishMode,
    /// Messages per `publish_batch` call and per run of one routing key; 1 with
    /// `PublishMode::Single`.
    pub(super) batch: u32,
    pub(super) threads: u32,
    pub(super) drain_timeout: Duration,
    pub(super) backlog: bool,
    pub(super) max_priority: Option<u8>,
    pub(super) json: bool,
    pub(super) quiet: bool,
    pub(super) fault_ignore_every: Option<u64>,
    pub(super) fault_repeat_every: Option<u64>,
    pub(super) server: crate::cli::ServerArg,
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
        let publish = match (args.publish, args.batch) {
            (Some(publish), _) => publish,
            (None, Some(batch)) if batch > 1 => PublishMode::Batch,
            (None, _) => PublishMode::Single,
        };
        let batch = match publish {
            PublishMode::Single => {
                if let Some(batch) = args.batch.filter(|batch| *batch > 1) {
                    return Err(usage(format!(
                        "--batch {batch} needs --publish batch: with --publish single every \
                         message is its own publish call"
                    )));
                }
                1
            }
            PublishMode::Batch => args.batch.or(preset.batch).unwrap_or(100),
        };
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
            publish,
            batch,
            threads: args.threads.unwrap_or(2),
            drain_timeout: args.drain_timeout,
            backlog: args.backlog,
            max_priority: args.max_priority,
            json: args.json,
            quiet: args.quiet,
            fault_ignore_every: args.fault_ignore_every,
            fault_repeat_every: args.fault_repeat_every,
            server: args.server,
        })
    }
}

impl Settings {
    /// Messages producer `producer_idx` publishes (count mode).
    pub(super) fn producer_count(&self, producer_idx: u32) -> Option<u64> {
        self.count.map(|total| {
            let base = total / u64::from(self.producers);
            let extra = u64::from(u64::from(producer_idx) < total % u64::from(self.producers));
            base + extra
        })
    }

    pub(super) fn fanout(&self) -> bool {
        self.kind == ExchangeKind::Fanout
    }

    /// The queue a producer's message goes to: consecutive `batch`-sized runs of sequence
    /// numbers rotate over the queues (producers start at different queues). Fanout: all.
    pub(super) fn queue_of(&self, producer_idx: u32, seq: u64) -> u32 {
        ((seq / u64::from(self.batch) + u64::from(producer_idx)) % u64::from(self.queues)) as u32
    }

    pub(super) fn describe(&self) -> String {
        let mut text = String::new();
        if let Some(scenario) = self.scenario {
            let _ = write!(text, "{}: ", scenario.name());
        }
        let _ = write!(
            text,
            "{} producer(s) → {} exchange → {} queue(s) → {} consumer(s), {} B, {}, {}, {}, \
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
            match self.publish {
                PublishMode::Single => "one publish per message".to_owned(),
                PublishMode::Batch => format!("batches of {}", self.batch),
            },
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
        if let Some(max_priority) = self.max_priority {
            text.push_str(&format!(
                ", priority queues (x-max-priority {max_priority})"
            ));
        }
        text
    }

    pub(super) fn routing_key(&self, run_id: &str, queue_idx: u32) -> String {
        match self.kind {
            ExchangeKind::Direct => format!("{run_id}-q{queue_idx}"),
            ExchangeKind::Topic => format!("bench.q{queue_idx}.msg"),
            _ => String::new(),
        }
    }

    pub(super) fn binding_key(&self, run_id: &str, queue_idx: u32) -> String {
        match self.kind {
            ExchangeKind::Direct => format!("{run_id}-q{queue_idx}"),
            ExchangeKind::Topic => format!("bench.q{queue_idx}.*"),
            _ => String::new(),
        }
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
            &["--publish", "single", "--batch", "10"],
        ] {
            let failure = settings(args).expect_err("refused");
            assert_eq!(failure.exit_code, EXIT_USAGE, "{args:?}");
        }
    }

    #[test]
    fn presets_publish_one_message_per_call_unless_batches_are_asked_for() {
        for scenario in ["s1", "s1-4k", "s2", "s3", "s3d", "s4"] {
            let preset = settings(&["--scenario", scenario]).unwrap();
            assert_eq!(preset.publish, PublishMode::Single, "{scenario}");
            assert_eq!(preset.batch, 1, "{scenario}");
        }
        let batched = settings(&["--scenario", "s1", "--publish", "batch"]).unwrap();
        assert_eq!((batched.publish, batched.batch), (PublishMode::Batch, 500));
        let sized = settings(&["--batch", "50"]).unwrap();
        assert_eq!((sized.publish, sized.batch), (PublishMode::Batch, 50));
        let plain = settings(&["--publish", "batch"]).unwrap();
        assert_eq!(plain.batch, 100);
        let one = settings(&["--batch", "1"]).unwrap();
        assert_eq!(one.publish, PublishMode::Single);
    }

    #[test]
    fn runs_of_a_batch_rotate_over_the_queues() {
        let settings = settings(&["--queues", "3", "--batch", "2"]).unwrap();
        let queues: Vec<u32> = (0..8).map(|seq| settings.queue_of(0, seq)).collect();
        assert_eq!(queues, [0, 0, 1, 1, 2, 2, 0, 0]);
        assert_eq!(settings.queue_of(1, 0), 1);
    }
}
