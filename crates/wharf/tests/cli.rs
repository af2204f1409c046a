//! The `wharf` client subcommands, run as the real binary against an in-process broker:
//! output, stdin, JSON, peeking, tables, and the message and exit code of every error class.

mod common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use wharf_client::Client;

/// Every run of the binary must end within this.
const RUN_DEADLINE: Duration = Duration::from_secs(30);

/// An in-process broker on its own runtime, so the tests themselves stay synchronous.
struct Broker {
    addr: String,
    // Dropped before the runtime that runs it.
    _server: common::TestServer,
    runtime: tokio::runtime::Runtime,
}

impl Broker {
    fn start() -> Broker {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let server = runtime.block_on(common::TestServer::start());
        Broker {
            addr: server.addr().to_string(),
            _server: server,
            runtime,
        }
    }

    /// Runs `wharf ARGS --server ADDR`.
    fn wharf(&self, args: &[&str]) -> Run {
        self.wharf_with_stdin(args, b"")
    }

    fn wharf_with_stdin(&self, args: &[&str], stdin: &[u8]) -> Run {
        let mut args = args.to_vec();
        args.extend(["--server", &self.addr]);
        run(&args, stdin, &[])
    }

    /// A queue's `(ready, unacked)` counters, read through the Rust client.
    fn queue_counts(&self, queue: &str) -> (u64, u64) {
        self.runtime.block_on(async {
            let client = Client::connect(&self.addr).await.expect("connect");
            let stats = client.queue_stats(queue).await.expect("queue stats");
            client.close().await.expect("close");
            (stats.ready, stats.unacked)
        })
    }
}

/// What a run of the binary produced.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    #[track_caller]
    fn success(self) -> Run {
        assert_eq!(self.code, 0, "{self:?}");
        self
    }

    #[track_caller]
    fn failure(self, code: i32) -> Run {
        assert_eq!(self.code, code, "{self:?}");
        assert!(
            self.stderr.starts_with("error: ") || code == 2,
            "errors go to stderr as `error: ...`: {self:?}"
        );
        self
    }

    fn lines(&self) -> Vec<&str> {
        self.stdout.lines().collect()
    }
}

/// Runs the binary with `args`, `stdin` and extra environment; kills it and fails the test if it
/// has not exited within [`RUN_DEADLINE`].
fn run(args: &[&str], stdin: &[u8], env: &[(&str, &str)]) -> Run {
    let mut command = Command::new(env!("CARGO_BIN_EXE_wharf"));
    command
        .args(args)
        .env_remove("WHARF_SERVER")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child = command.spawn().expect("spawn wharf");
    let mut child_stdin = child.stdin.take().expect("stdin");
    let stdin = stdin.to_vec();
    // Written from a thread so a child that does not read stdin cannot block the test.
    let writer = std::thread::spawn(move || {
        let _ = child_stdin.write_all(&stdin);
    });
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
    writer.join().expect("stdin writer");
    Run {
        code: status.code().expect("exited, not killed by a signal"),
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

/// A local address nobody listens on.
fn refused_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    drop(listener);
    addr
}

#[test]
fn help_lists_every_command_with_a_description_and_the_exit_codes() {
    let help = run(&["--help"], b"", &[]).success().stdout;
    for command in [
        "serve",
        "declare",
        "bind",
        "delete",
        "purge",
        "publish",
        "consume",
        "queues",
        "exchanges",
        "dlq",
    ] {
        let line = help
            .lines()
            .find(|line| line.trim_start().starts_with(&format!("{command} ")))
            .unwrap_or_else(|| panic!("{command} missing from:\n{help}"));
        assert!(
            line.split_whitespace().count() > 2,
            "no description: {line}"
        );
    }
    assert!(help.contains("Exit codes:"), "{help}");
    assert!(help.contains("4  not found"), "{help}");
}

#[test]
fn declare_bind_publish_consume_purge_delete_round_trip() {
    let broker = Broker::start();
    broker
        .wharf(&[
            "declare",
            "exchange",
            "shop",
            "--kind",
            "topic",
            "--durable",
        ])
        .success();
    let declared = broker
        .wharf(&["declare", "queue", "orders", "--durable"])
        .success();
    assert_eq!(
        declared.stdout,
        "declared queue orders (ready 0, consumers 0)\n"
    );
    broker
        .wharf(&[
            "bind",
            "--exchange",
            "shop",
            "--queue",
            "orders",
            "--routing-key",
            "order.*",
        ])
        .success();
    let published = broker
        .wharf(&[
            "publish",
            "--exchange",
            "shop",
            "--routing-key",
            "order.created",
            "--body",
            "hello",
            "--count",
            "3",
        ])
        .success();
    assert_eq!(published.stdout, "published 3, confirmed 3\n");
    // Not matching the binding: confirmed, routed nowhere.
    broker
        .wharf(&[
            "publish",
            "--exchange",
            "shop",
            "--routing-key",
            "invoice.paid",
            "--body",
            "other",
        ])
        .success();
    assert_eq!(broker.queue_counts("orders"), (3, 0));

    let consumed = broker
        .wharf(&["consume", "orders", "--count", "2", "--ack"])
        .success();
    assert_eq!(consumed.lines(), ["hello", "hello"]);
    assert_eq!(broker.queue_counts("orders"), (1, 0));

    let purged = broker.wharf(&["purge", "orders"]).success();
    assert_eq!(purged.stdout, "purged 1 messages from queue orders\n");
    assert_eq!(broker.queue_counts("orders"), (0, 0));

    broker.wharf(&["delete", "queue", "orders"]).success();
    broker.wharf(&["delete", "exchange", "shop"]).success();
    let exchanges = broker.wharf(&["exchanges"]).success();
    assert!(!exchanges.stdout.contains("shop"), "{exchanges:?}");
    broker.wharf(&["delete", "queue", "orders"]).failure(4);
}

#[test]
fn headers_binding_routes_by_the_published_headers() {
    let broker = Broker::start();
    broker
        .wharf(&["declare", "exchange", "events", "--kind", "headers"])
        .success();
    broker.wharf(&["declare", "queue", "eu"]).success();
    broker
        .wharf(&[
            "bind",
            "--exchange",
            "events",
            "--queue",
            "eu",
            "--header",
            "region=eu",
            "--header",
            "tier=gold",
            "--match",
            "any",
        ])
        .success();
    for (header, body) in [("region=eu", "a"), ("region=us", "b"), ("tier=gold", "c")] {
        broker
            .wharf(&[
                "publish",
                "--exchange",
                "events",
                "--routing-key",
                "",
                "--header",
                header,
                "--body",
                body,
            ])
            .success();
    }
    let consumed = broker
        .wharf(&["consume", "eu", "--ack", "--timeout", "0.5"])
        .success();
    assert_eq!(consumed.lines(), ["a", "c"]);
}

#[test]
fn publish_from_stdin_sends_one_message_per_line() {
    let broker = Broker::start();
    broker.wharf(&["declare", "queue", "lines"]).success();
    let published = broker
        .wharf_with_stdin(
            &["publish", "--routing-key", "lines"],
            b"first\nsecond\r\n\nbin\xff\xfe\nlast-without-newline",
        )
        .success();
    assert_eq!(published.stdout, "published 5, confirmed 5\n");
    let consumed = broker
        .wharf(&["consume", "lines", "--count", "5", "--ack"])
        .success();
    // Non-UTF-8 bodies are printed as hex.
    assert_eq!(
        consumed.lines(),
        [
            "first",
            "second",
            "",
            "hex:62696efffe",
            "last-without-newline"
        ]
    );
}

#[test]
fn publish_size_and_file_bodies_in_large_counts_are_all_confirmed() {
    let broker = Broker::start();
    broker.wharf(&["declare", "queue", "bulk"]).success();
    let published = broker
        .wharf(&[
            "publish",
            "--routing-key",
            "bulk",
            "--size",
            "100",
            "--count",
            "20000",
        ])
        .success();
    assert_eq!(published.stdout, "published 20000, confirmed 20000\n");
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), b"from a file").expect("write");
    broker
        .wharf(&[
            "publish",
            "--routing-key",
            "bulk",
            "--file",
            file.path().to_str().expect("utf-8 path"),
        ])
        .success();
    assert_eq!(broker.queue_counts("bulk"), (20_001, 0));
}

/// Issue #17: a body the server could never take is refused before anything is built or sent
/// (usage error, exit 2): before, `--size 18446744073709551615` panicked with a capacity
/// overflow, a 100 GB size allocated until the machine ran out, and 20 MB printed "published
/// 1, confirmed 0" for a message never sent.
#[test]
fn a_body_larger_than_the_server_takes_is_refused_before_it_is_built() {
    let broker = Broker::start();
    broker.wharf(&["declare", "queue", "big"]).success();
    for size in ["18446744073709551615", "100000000000", "20000000"] {
        let refused = broker
            .wharf(&["publish", "--routing-key", "big", "--size", size])
            .failure(2);
        assert!(
            refused.stderr.contains("too large")
                && refused.stderr.contains("nothing was published"),
            "{size}: {refused:?}"
        );
        assert!(!refused.stderr.contains("panicked"), "{size}: {refused:?}");
        assert!(refused.stdout.is_empty(), "{size}: {refused:?}");
    }
    let file = tempfile::NamedTempFile::new().expect("temp file");
    file.as_file()
        .set_len(20_000_000)
        .expect("sparse 20 MB file");
    broker
        .wharf(&[
            "publish",
            "--routing-key",
            "big",
            "--file",
            file.path().to_str().expect("utf-8 path"),
        ])
        .failure(2);
    // Just under the limit still goes through.
    broker
        .wharf(&["publish", "--routing-key", "big", "--size", "16000000"])
        .success();
    assert_eq!(broker.queue_counts("big"), (1, 0));
}

#[test]
fn consume_json_prints_one_object_per_message_with_metadata() {
    let broker = Broker::start();
    broker.wharf(&["declare", "queue", "meta"]).success();
    broker
        .wharf(&[
            "publish",
            "--routing-key",
            "meta",
            "--persistent",
            "--header",
            "source=cli",
            "--body",
            "{\"id\":1}",
        ])
        .success();
    broker
        .wharf_with_stdin(&["publish", "--routing-key", "meta"], b"\xff\n")
        .success();
    let consumed = broker
        .wharf(&["consume", "meta", "--count", "2", "--json", "--ack"])
        .success();
    let objects: Vec<serde_json::Value> = consumed
        .lines()
        .iter()
        .map(|line| serde_json::from_str(line).expect("one JSON object per line"))
        .collect();
    assert_eq!(objects.len(), 2, "{consumed:?}");
    let first = &objects[0];
    assert_eq!(first["exchange"], "");
    assert_eq!(first["routing_key"], "meta");
    assert_eq!(first["redelivered"], false);
    assert_eq!(first["delivery_count"], 1);
    assert_eq!(first["persistent"], true);
    assert_eq!(first["headers"]["source"], "cli");
    assert_eq!(first["message_id"], serde_json::Value::Null);
    assert_eq!(first["body_encoding"], "utf-8");
    assert_eq!(first["body"], "{\"id\":1}");
    assert_eq!(objects[1]["body_encoding"], "hex");
    assert_eq!(objects[1]["body"], "ff");
}

#[test]
fn consume_without_ack_is_a_peek_and_leaves_the_messages_in_the_queue() {
    let broker = Broker::start();
    broker.wharf(&["declare", "queue", "peek"]).success();
    broker
        .wharf_with_stdin(&["publish", "--routing-key", "peek"], b"one\ntwo\n")
        .success();
    let peeked = broker.wharf(&["consume", "peek", "--count", "2"]).success();
    assert_eq!(peeked.lines(), ["one", "two"]);
    // The command closed its connection before exiting, after the broker requeued the two.
    assert_eq!(broker.queue_counts("peek"), (2, 0));
    let again = broker
        .wharf(&["consume", "peek", "--json", "--timeout", "0.5"])
        .success();
    let objects: Vec<serde_json::Value> = again
        .lines()
        .iter()
        .map(|line| serde_json::from_str(line).expect("JSON"))
        .collect();
    assert_eq!(objects.len(), 2);
    assert!(
        objects
            .iter()
            .all(|object| object["redelivered"] == true && object["delivery_count"] == 2),
        "{objects:?}"
    );
    assert_eq!(broker.queue_counts("peek"), (2, 0));
}

#[test]
fn consume_with_timeout_exits_0_when_the_queue_stays_empty() {
    let broker = Broker::start();
    broker.wharf(&["declare", "queue", "empty"]).success();
    let started = Instant::now();
    let consumed = broker
        .wharf(&["consume", "empty", "--timeout", "0.3"])
        .success();
    assert_eq!(consumed.stdout, "");
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[test]
fn queues_and_exchanges_print_aligned_tables() {
    let broker = Broker::start();
    broker
        .wharf(&["declare", "queue", "a-long-queue-name", "--durable"])
        .success();
    broker.wharf(&["declare", "queue", "b"]).success();
    broker
        .wharf(&[
            "publish",
            "--routing-key",
            "b",
            "--body",
            "x",
            "--count",
            "12",
        ])
        .success();
    broker
        .wharf(&["declare", "exchange", "logs", "--kind", "fanout"])
        .success();

    let queues = broker.wharf(&["queues"]).success();
    let lines = queues.lines();
    let rows: Vec<Vec<&str>> = lines
        .iter()
        .map(|line| line.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows,
        [
            vec![
                "NAME",
                "DURABLE",
                "READY",
                "DELAYED",
                "UNACKED",
                "CONSUMERS"
            ],
            vec!["a-long-queue-name", "yes", "0", "0", "0", "0"],
            vec!["b", "no", "12", "0", "0", "0"],
        ],
        "{queues:?}"
    );
    // Numbers are right-aligned, so every line ends at the same column.
    assert!(
        lines.iter().all(|line| line.len() == lines[0].len()),
        "{queues:?}"
    );
    let durable_column = lines[0].find("DURABLE").expect("header");
    assert_eq!(lines[1].find("yes"), Some(durable_column), "{queues:?}");

    let exchanges = broker.wharf(&["exchanges"]).success();
    let lines = exchanges.lines();
    let type_column = lines[0].find("TYPE").expect("header");
    let logs = lines
        .iter()
        .find(|line| line.starts_with("logs "))
        .unwrap_or_else(|| panic!("{exchanges:?}"));
    assert_eq!(logs.find("fanout"), Some(type_column), "{exchanges:?}");
    assert!(
        lines.iter().any(|line| line.starts_with("(default) ")),
        "{exchanges:?}"
    );
}

#[test]
fn server_address_comes_from_wharf_server_env() {
    let broker = Broker::start();
    let queues = run(&["queues"], b"", &[("WHARF_SERVER", &broker.addr)]).success();
    assert_eq!(queues.lines()[0].split_whitespace().next(), Some("NAME"));
}

#[test]
fn connection_refused_is_exit_3_with_the_address() {
    let addr = refused_addr();
    for args in [
        vec!["queues"],
        vec!["declare", "queue", "q"],
        vec!["consume", "q", "--timeout", "1"],
    ] {
        let mut args = args;
        args.extend(["--server", &addr]);
        let refused = run(&args, b"", &[]).failure(3);
        assert_eq!(
            refused.stderr,
            format!("error: cannot connect to {addr}: connection refused\n")
        );
    }
    // Publishing from stdin connects first, so it fails without waiting for stdin.
    run(
        &["publish", "--routing-key", "q", "--server", &addr],
        b"",
        &[],
    )
    .failure(3);
}

#[test]
fn missing_queue_or_exchange_is_exit_4() {
    let broker = Broker::start();
    let deleted = broker.wharf(&["delete", "queue", "missing"]).failure(4);
    assert_eq!(deleted.stderr, "error: queue 'missing' not found\n");
    broker.wharf(&["delete", "exchange", "missing"]).failure(4);
    broker.wharf(&["purge", "missing"]).failure(4);
    broker
        .wharf(&["consume", "missing", "--timeout", "1"])
        .failure(4);
    broker
        .wharf(&["bind", "--exchange", "missing", "--queue", "missing"])
        .failure(4);
}

#[test]
fn redeclare_with_other_flags_is_precondition_failed_exit_5() {
    let broker = Broker::start();
    broker
        .wharf(&["declare", "queue", "flags", "--durable"])
        .success();
    // The same flags again: idempotent.
    broker
        .wharf(&["declare", "queue", "flags", "--durable"])
        .success();
    let redeclared = broker.wharf(&["declare", "queue", "flags"]).failure(5);
    assert!(
        redeclared.stderr.contains("precondition failed"),
        "{redeclared:?}"
    );
    broker
        .wharf(&["declare", "exchange", "x", "--kind", "direct"])
        .success();
    broker
        .wharf(&["declare", "exchange", "x", "--kind", "fanout"])
        .failure(5);
}

#[test]
fn publish_to_a_missing_exchange_reports_the_refusal_with_exit_6() {
    let broker = Broker::start();
    let refused = broker
        .wharf(&[
            "publish",
            "--exchange",
            "nope",
            "--routing-key",
            "k",
            "--body",
            "b",
            "--count",
            "2",
        ])
        .failure(6);
    assert_eq!(refused.stdout, "published 2, confirmed 0\n");
    assert!(
        refused.stderr.contains("exchange 'nope' not found"),
        "{refused:?}"
    );
}

#[test]
fn bad_arguments_are_usage_errors_exit_2() {
    let broker = Broker::start();
    for args in [
        vec!["frobnicate"],
        vec!["declare", "exchange", "x"],
        vec!["declare", "exchange", "x", "--kind", "bogus"],
        vec!["publish", "--body", "no routing key"],
        vec!["publish", "--routing-key", "q", "--count", "3"],
        vec![
            "publish",
            "--routing-key",
            "q",
            "--body",
            "b",
            "--count",
            "0",
        ],
        vec![
            "publish",
            "--routing-key",
            "q",
            "--body",
            "b",
            "--size",
            "3",
        ],
        vec![
            "publish",
            "--routing-key",
            "q",
            "--header",
            "novalue",
            "--body",
            "b",
        ],
        vec!["consume", "q", "--timeout", "soon"],
        vec!["consume", "q", "--prefetch", "0"],
        vec!["dlq", "redrive", "q", "--max", "0"],
        vec!["dlq", "redrive"],
    ] {
        let usage = broker.wharf(&args).failure(2);
        assert!(usage.stderr.contains("error:"), "{args:?}: {usage:?}");
        assert!(usage.stdout.is_empty(), "{args:?}: {usage:?}");
    }
    // Checked by the command itself: a peek cannot show more than its prefetch.
    let peek = broker
        .wharf(&["consume", "q", "--count", "20", "--prefetch", "10"])
        .failure(2);
    assert!(peek.stderr.contains("--prefetch"), "{peek:?}");
    // Rejected by the server as an invalid name.
    broker
        .wharf(&["declare", "queue", "wharf.reserved"])
        .failure(2);
    // An address that does not parse.
    run(&["queues", "--server", "127.0.0.1:notaport"], b"", &[]).failure(2);
}

#[test]
fn dlq_redrive_moves_dead_letters_back_and_prints_the_count() {
    let broker = Broker::start();
    // Three messages rejected from `work` into `work.dlq`.
    broker.runtime.block_on(async {
        let client = Client::connect(&broker.addr).await.expect("connect");
        client.declare_queue("work.dlq").await.expect("declare");
        client
            .declare_queue("work")
            .dead_letter_exchange("")
            .dead_letter_routing_key("work.dlq")
            .await
            .expect("declare");
        for body in ["a", "b", "c"] {
            client
                .publish("", "work", wharf_client::Message::new(body))
                .await
                .expect("confirmed");
        }
        let mut consumer = client
            .consume("work", wharf_client::ConsumeOptions::default())
            .await
            .expect("consume");
        for _ in 0..3 {
            let delivery = tokio::time::timeout(common::DEADLINE, consumer.next())
                .await
                .expect("in time")
                .expect("open")
                .expect("delivery");
            delivery.reject().await.expect("reject");
        }
        consumer.cancel().await.expect("cancel");
        client.close().await.expect("close");
    });
    let deadline = Instant::now() + common::DEADLINE;
    while broker.queue_counts("work.dlq") != (3, 0) {
        assert!(Instant::now() < deadline, "the rejects never arrived");
        std::thread::sleep(Duration::from_millis(10));
    }

    let some = broker
        .wharf(&["dlq", "redrive", "work.dlq", "--max", "2"])
        .success();
    assert_eq!(
        some.stdout,
        "moved 2 messages from work.dlq back to their queues\n"
    );
    assert_eq!(broker.queue_counts("work"), (2, 0));
    assert_eq!(broker.queue_counts("work.dlq"), (1, 0));
    let rest = broker.wharf(&["dlq", "redrive", "work.dlq"]).success();
    assert_eq!(
        rest.stdout,
        "moved 1 messages from work.dlq back to their queues\n"
    );
    assert_eq!(broker.queue_counts("work"), (3, 0));
    let none = broker.wharf(&["dlq", "redrive", "work.dlq"]).success();
    assert!(none.stdout.starts_with("moved 0 messages"), "{none:?}");

    let missing = broker.wharf(&["dlq", "redrive", "no-such-dlq"]).failure(4);
    assert!(missing.stderr.contains("no-such-dlq"), "{missing:?}");
    run(
        &["dlq", "redrive", "work.dlq", "--server", &refused_addr()],
        b"",
        &[],
    )
    .failure(3);
}
