//! `wharf bench`, run as the real binary against an in-process broker with small counts: every
//! exchange kind and ack mode, persistent messages, the open-loop schedule, the JSON report, the
//! integrity check (and its negative controls) and argument errors.

mod common;

use serde_json::Value;
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use wharf_client::Client;

/// Every run of the binary must end within this.
const RUN_DEADLINE: Duration = Duration::from_secs(60);

/// An in-process broker on its own runtime, so the tests themselves stay synchronous.
struct Broker {
    addr: String,
    _server: common::TestServer,
    runtime: tokio::runtime::Runtime,
}

impl Broker {
    fn start() -> Broker {
        Broker::start_with(|_| {})
    }

    fn start_with(tweak: impl FnOnce(&mut wharf_server::config::ServerConfig)) -> Broker {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let server = runtime.block_on(common::TestServer::start_with(tweak));
        Broker {
            addr: server.addr().to_string(),
            _server: server,
            runtime,
        }
    }

    /// Runs `wharf bench ARGS --server ADDR`.
    fn bench(&self, args: &[&str]) -> Run {
        let mut all = vec!["bench"];
        all.extend_from_slice(args);
        all.extend(["--server", &self.addr]);
        run(&all)
    }

    /// Runs `wharf bench ARGS --json`, expects success and returns the report.
    #[track_caller]
    fn bench_json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        let run = self.bench(&all);
        assert_eq!(run.code, 0, "{run:?}");
        serde_json::from_str(&run.stdout).unwrap_or_else(|err| panic!("{err}: {run:?}"))
    }

    /// Names of the queues the broker has.
    fn queue_names(&self) -> Vec<String> {
        self.runtime.block_on(async {
            let client = Client::connect(&self.addr).await.expect("connect");
            let queues = client.list_queues().await.expect("list queues");
            client.close().await.expect("close");
            queues.into_iter().map(|queue| queue.name).collect()
        })
    }
}

#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs the binary; kills it and fails the test if it has not exited within [`RUN_DEADLINE`].
fn run(args: &[&str]) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args(args)
        .env_remove("WHARF_SERVER")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn wharf");
    let mut child_stdout = child.stdout.take().expect("stdout");
    let mut child_stderr = child.stderr.take().expect("stderr");
    let stdout = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = child_stdout.read_to_string(&mut text);
        text
    });
    let stderr = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = child_stderr.read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + RUN_DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("wharf {args:?} did not exit within {RUN_DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Run {
        code: status.code().expect("exited, not killed by a signal"),
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

fn count(report: &Value, key: &str) -> u64 {
    report[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing: {report:#}"))
}

/// Every published message confirmed and delivered exactly once to each of `n_queues`.
#[track_caller]
fn assert_complete(report: &Value, n_published: u64, n_queues: u64) {
    assert_eq!(count(report, "published"), n_published, "{report:#}");
    assert_eq!(count(report, "confirmed"), n_published, "{report:#}");
    assert_eq!(
        count(report, "delivered"),
        n_published * n_queues,
        "{report:#}"
    );
    assert_eq!(
        count(report, "expected"),
        n_published * n_queues,
        "{report:#}"
    );
    for key in ["lost", "duplicates", "malformed", "unexpected", "refused"] {
        assert_eq!(count(report, key), 0, "{key}: {report:#}");
    }
    let samples = report["latency_us"]["samples"].as_u64().expect("samples");
    assert_eq!(samples, n_published * n_queues, "{report:#}");
    assert!(report["delivery_rate"].as_f64().expect("rate") > 0.0);
}

#[test]
fn transient_auto_ack_delivers_every_message_once_and_cleans_up_its_queues() {
    let broker = Broker::start();
    let report = broker.bench_json(&["--count", "5000", "--batch", "50"]);
    assert_complete(&report, 5_000, 1);
    assert_eq!(report["settings"]["auto_ack"], Value::Bool(true));
    let leftovers: Vec<String> = broker
        .queue_names()
        .into_iter()
        .filter(|name| name.starts_with("bench-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn manual_ack_one_by_one_and_with_ack_multiple_loses_nothing() {
    let broker = Broker::start();
    for ack_every in ["1", "7"] {
        let report = broker.bench_json(&[
            "--count",
            "3000",
            "--manual-ack",
            "--ack-every",
            ack_every,
            "--prefetch",
            "50",
            "--batch",
            "1",
            "--confirm-window",
            "200",
        ]);
        assert_complete(&report, 3_000, 1);
        assert_eq!(report["settings"]["auto_ack"], Value::Bool(false));
    }
}

#[test]
fn fanout_delivers_every_message_to_each_queue() {
    let broker = Broker::start();
    let report = broker.bench_json(&[
        "--exchange-kind",
        "fanout",
        "--queues",
        "2",
        "--count",
        "4000",
    ]);
    assert_complete(&report, 4_000, 2);
}

#[test]
fn topic_and_headers_exchanges_route_runs_of_messages_over_queues() {
    let broker = Broker::start();
    for kind in ["topic", "headers", "direct"] {
        let report = broker.bench_json(&[
            "--exchange-kind",
            kind,
            "--queues",
            "3",
            "--consumers",
            "4",
            "--producers",
            "2",
            "--count",
            "3001",
            "--batch",
            "10",
        ]);
        assert_complete(&report, 3_001, 1);
    }
}

#[test]
fn persistent_messages_in_durable_queues_are_confirmed_and_delivered() {
    let broker = Broker::start();
    let report = broker.bench_json(&[
        "--persistent",
        "--manual-ack",
        "--count",
        "2000",
        "--confirm-window",
        "100",
    ]);
    assert_complete(&report, 2_000, 1);
    assert_eq!(report["settings"]["persistent"], Value::Bool(true));
    assert!(
        broker
            .queue_names()
            .iter()
            .all(|name| !name.starts_with("bench-")),
        "durable bench queues are deleted at the end"
    );
}

#[test]
fn open_loop_rate_follows_the_schedule_and_measures_every_message() {
    let broker = Broker::start();
    let started = Instant::now();
    let report = broker.bench_json(&["--rate", "2000", "--count", "400"]);
    // 400 messages at 2,000/s: the last slot is 0.2 s after the start.
    assert!(started.elapsed() >= Duration::from_millis(199));
    assert_complete(&report, 400, 1);
    let publish_rate = report["publish_rate"].as_f64().expect("rate");
    assert!(
        (1_000.0..=2_600.0).contains(&publish_rate),
        "open loop publishes near the asked rate: {report:#}"
    );
    assert_eq!(report["settings"]["batch"], 1, "one by one on a schedule");
}

#[test]
fn open_loop_producers_each_on_their_own_thread_share_the_schedule() {
    let broker = Broker::start();
    let report = broker.bench_json(&[
        "--rate",
        "4000",
        "--count",
        "400",
        "--producers",
        "2",
        "--queues",
        "2",
        "--batch",
        "10",
    ]);
    assert_complete(&report, 400, 1);
    assert_eq!(report["settings"]["batch"], 10);
    let publish_rate = report["publish_rate"].as_f64().expect("rate");
    assert!(
        (2_000.0..=5_200.0).contains(&publish_rate),
        "together near the asked rate: {report:#}"
    );
}

#[test]
fn an_open_loop_producer_the_server_refuses_fails_the_run_with_the_connect_code() {
    // Room for the bench's setup and consumer connections, not for its producer's (the
    // third): the producer's thread reports the refusal and the run ends with it.
    let broker = Broker::start_with(|config| config.connections_max = 2);
    let run = broker.bench(&["--rate", "1000", "--count", "100"]);
    assert_eq!(run.code, 3, "{run:?}");
    assert!(
        run.stderr
            .contains("the server has its maximum of 2 connections"),
        "{run:?}"
    );
    // With room for the producer too, the same run completes.
    let roomy = Broker::start_with(|config| config.connections_max = 3);
    let report = roomy.bench_json(&["--rate", "1000", "--count", "100"]);
    assert_complete(&report, 100, 1);
}

#[test]
fn a_slow_schedule_keeps_its_producer_connection_alive_between_messages() {
    // 4 msgs/s: 250 ms between messages, longer than the server waits for a silent client
    // (twice its 100 ms heartbeat). The paced producer's thread must keep serving its
    // connection while it waits for the next slot.
    let broker = Broker::start_with(|config| config.heartbeat = Duration::from_millis(100));
    let report = broker.bench_json(&["--rate", "4", "--count", "4"]);
    assert_complete(&report, 4, 1);
}

#[test]
fn plain_progress_lines_and_a_table_without_a_terminal() {
    let broker = Broker::start();
    let run = broker.bench(&["--scenario", "s1", "--count", "2000"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.starts_with("S1: "), "{run:?}");
    for row in ["published", "confirmed", "delivered", "p99.9"] {
        assert!(run.stdout.contains(row), "{row}: {run:?}");
    }
    assert!(
        run.stdout
            .contains("duplicates 0, redelivered 0, lost 0, malformed 0"),
        "{run:?}"
    );
    // No escape sequences of a progress bar when stderr is not a terminal.
    assert!(!run.stderr.contains('\u{1b}'), "{run:?}");
}

#[test]
fn the_integrity_check_fails_on_lost_and_duplicated_messages() {
    let broker = Broker::start();
    // Negative controls: the consumer pretends to miss, or to see twice, every 100th message.
    let lost = broker.bench(&[
        "--count",
        "1000",
        "--fault-ignore-every",
        "100",
        "--drain-timeout",
        "0.3",
        "--json",
    ]);
    assert_eq!(lost.code, 8, "{lost:?}");
    let report: Value = serde_json::from_str(&lost.stdout).expect("json");
    assert_eq!(count(&report, "lost"), 10, "{report:#}");
    assert!(lost.stderr.contains("lost 10"), "{lost:?}");

    let duplicated = broker.bench(&["--count", "1000", "--fault-repeat-every", "100"]);
    assert_eq!(duplicated.code, 8, "{duplicated:?}");
    assert!(
        duplicated.stderr.contains("duplicates 10,"),
        "{duplicated:?}"
    );
}

#[test]
fn bad_arguments_are_usage_errors_with_a_clear_message() {
    let broker = Broker::start();
    for (args, needle) in [
        (
            &["--queues", "2", "--consumers", "1"][..],
            "every queue needs a consumer",
        ),
        (&["--size", "8"], "--size must be"),
        (&["--rate", "0"], "--rate must be positive"),
        (&["--count", "10", "--duration", "1"], "cannot be used with"),
        (&["--auto-ack", "--manual-ack"], "cannot be used with"),
        (&["--exchange-kind", "nope"], "invalid value"),
        (&["--scenario", "s9"], "invalid value"),
        (&["--prefetch", "0"], "--prefetch"),
    ] {
        let run = broker.bench(args);
        assert_eq!(run.code, 2, "{args:?}: {run:?}");
        assert!(run.stderr.contains(needle), "{args:?}: {run:?}");
        assert!(run.stdout.is_empty(), "{args:?}: {run:?}");
    }
    let refused = run(&["bench", "--count", "10", "--server", "127.0.0.1:1"]);
    assert_eq!(refused.code, 3, "{refused:?}");
    assert!(
        refused.stderr.starts_with("error: cannot connect"),
        "{refused:?}"
    );
}
