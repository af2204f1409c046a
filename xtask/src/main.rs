//! `cargo xtask TASK`: every developer and CI task of the Wharf workspace, in Rust so that it
//! runs the same on any machine with cargo.
//!
//! - `test`: the whole suite, exactly what CI runs (`.ci/run`): rustfmt, clippy and rustdoc
//!   with warnings as errors, every Rust test (the tidy test included), doctests, a fuzz smoke
//!   of every target, and the Python tier.
//! - `bench [--quick]`: the criterion suite (`--quick`: a short subset with short measurement);
//!   `bench --plot`: `wharf bench` across message sizes, drawn to `docs/bench-sizes.svg`.
//! - `fuzz TARGET [--seconds N] [--sanitizer]`: a cargo-fuzz target for N seconds.
//! - `tidy`: only the tidy test (`xtask/tests/tidy.rs`: layering, the sans-IO core, limits
//!   modules, module cycles, test attributes).
//! - `python`: only the Python tier of `test` (build the package, pytest, mypy on examples).
//! - `backlog [--count N] [--in-memory] [--max-priority N]`: the queues-larger-than-memory
//!   benchmark: a release server, `wharf bench --backlog` with N persistent 100-byte messages
//!   (default 10 M), then the server's peak RSS (`--in-memory`: with paging off, for
//!   comparison; `--max-priority N`: into a priority queue, priorities 0..=N in turn).

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let task = args.next().unwrap_or_else(|| "help".to_owned());
    let rest: Vec<String> = args.collect();
    match task.as_str() {
        "test" => test(&rest),
        "bench" => bench(&rest),
        "fuzz" => fuzz(&rest),
        "tidy" => run(cargo().args(["test", "-p", "xtask", "--test", "tidy"])),
        "python" => python_tier(),
        "crash" => crash(&rest),
        "backlog" => backlog(&rest),
        "help" | "--help" | "-h" => {
            println!("{}", HELP);
            Ok(())
        }
        other => bail!("unknown task `{other}`\n{HELP}"),
    }
}

const HELP: &str = "usage: cargo xtask <task>
  test [--fuzz-seconds N]      every check CI runs: fmt, clippy, rustdoc, tests, doctests,
                               N seconds of fuzzing per target (default 10), Python tier
  bench [--quick]              criterion benchmarks (quick: short subset)
  bench --plot [--from DIR] [--out FILE]
                               wharf bench over message sizes against a release server,
                               drawn to docs/bench-sizes.svg (--from: redraw saved JSON)
  fuzz TARGET [--seconds N] [--sanitizer]
                               run a cargo-fuzz target (decode_frame, decode_stream, wal_recover)
  tidy                         the tidy test: layering, sans-IO core, limits, module cycles,
                               test attributes
  python                       only the Python tier (bindings/python tests, mypy on examples)
  crash [--rounds N]           kill -9 crash rounds of the real server (default 50; CI runs 10),
                               then N kill -9 rounds with 200+ MB backlogs (tests/scale.rs)
  backlog [--count N] [--in-memory] [--max-priority N]
                               N persistent 100-byte messages published, then drained (default
                               10 M): rates and the broker's peak RSS (--in-memory: paging off)";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

/// Cargo's target directory: `CARGO_TARGET_DIR` when set (relative to the workspace root, as
/// cargo reads it), else `<root>/target`. The debug `wharf` binary, maturin's build and the
/// Python venv all go there.
fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR").filter(|dir| !dir.is_empty()) {
        Some(dir) => root().join(dir),
        None => root().join("target"),
    }
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: running {:?}", cmd);
    let status = cmd
        .current_dir(root())
        .status()
        .with_context(|| format!("spawning {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()))
}

fn has_nextest() -> bool {
    cargo()
        .args(["nextest", "--version"])
        .output()
        .map(|out| out.status.success())
        .unwrap_or(false)
}

/// Seconds each fuzz target runs in `cargo xtask test` unless `--fuzz-seconds` says otherwise:
/// a smoke (the build and the seed corpus replay are most of it), not a campaign.
const FUZZ_SMOKE_SECONDS: u64 = 10;

fn test(args: &[String]) -> Result<()> {
    let mut fuzz_seconds = FUZZ_SMOKE_SECONDS;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--fuzz-seconds" => {
                fuzz_seconds = args
                    .next()
                    .context("--fuzz-seconds needs a value")?
                    .parse()?
            }
            other => bail!("test: unknown argument `{other}`"),
        }
    }
    build_tools()?;
    // The cheap checks first: a formatting slip fails in seconds, not after the suite.
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // nextest runs the tidy test (xtask/tests/tidy.rs) with the rest.
    if has_nextest() {
        run(cargo().args(["nextest", "run", "--workspace", "--no-fail-fast"]))?;
    } else {
        run(cargo().args(["test", "--workspace", "--no-fail-fast"]))?;
    }
    // nextest does not run doctests.
    run(cargo().args(["test", "--workspace", "--doc"]))?;
    run(cargo()
        .args(["doc", "--workspace", "--no-deps"])
        .env("RUSTDOCFLAGS", "-D warnings"))?;
    if fuzz_seconds > 0 {
        for target in fuzz_targets()? {
            fuzz(&[target, "--seconds".to_owned(), fuzz_seconds.to_string()])?;
        }
    }
    python_tier()?;
    Ok(())
}

/// The fuzz targets: every `fuzz/fuzz_targets/*.rs`.
fn fuzz_targets() -> Result<Vec<String>> {
    let dir = root().join("fuzz/fuzz_targets");
    let mut targets = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if let Some(target) = name.strip_suffix(".rs") {
            targets.push(target.to_owned());
        }
    }
    targets.sort();
    if targets.is_empty() {
        bail!("no fuzz targets in {}", dir.display());
    }
    Ok(targets)
}

/// The `wharf` binary links jemalloc, whose build (`tikv-jemalloc-sys`) runs `make` besides
/// the C compiler that Rust already links with. On a fresh Debian machine without `make`, it is
/// installed with apt (as root, or through sudo).
fn build_tools() -> Result<()> {
    let has = |tool: &str| {
        Command::new(tool)
            .arg("--version")
            .output()
            .map(|out| out.status.success())
            .unwrap_or(false)
    };
    if has("make") {
        return Ok(());
    }
    if !has("apt-get") {
        bail!("`make` is needed to build jemalloc; install it with your package manager");
    }
    eprintln!("xtask: `make` is missing; installing it with apt-get");
    let as_root = std::env::var("USER").is_ok_and(|user| user == "root")
        || Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|out| out.stdout.starts_with(b"0"));
    let apt = |args: &[&str]| {
        let mut cmd = if as_root {
            Command::new("apt-get")
        } else {
            let mut sudo = Command::new("sudo");
            sudo.arg("apt-get");
            sudo
        };
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        run(&mut cmd)
    };
    apt(&["update", "-q"])?;
    apt(&["install", "-y", "-q", "make"])
}

/// Tool versions the Python tier installs into its venv (pinned: a new release must not change
/// what CI checks).
const PYTHON_TOOLS: &[&str] = &["maturin==1.16.0", "pytest==9.0.2", "mypy==1.19.1"];

/// The Python tier: builds the `wharf` package (bindings/python, outside the Cargo workspace)
/// into a venv under `target/`, runs its pytest suite against the debug `wharf` binary, and
/// type-checks the examples with `mypy --strict`. Needs only `python3` (>= 3.9) with venv/pip;
/// `WHARF_PYTHON` names another interpreter.
fn python_tier() -> Result<()> {
    let root = root();
    let target = target_dir();
    let venv = target.join("python-venv");
    let bin = venv.join(if cfg!(windows) { "Scripts" } else { "bin" });
    let python = bin.join(if cfg!(windows) {
        "python.exe"
    } else {
        "python"
    });
    if !python.exists() {
        let system_python = std::env::var("WHARF_PYTHON").unwrap_or_else(|_| "python3".to_owned());
        run(Command::new(system_python).args(["-m", "venv"]).arg(&venv))?;
    }
    run(Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(PYTHON_TOOLS))?;
    run(cargo().args(["build", "--bin", "wharf"]))?;
    // A debug build (about 20 s) is plenty for the tests; the shared target dir reuses the
    // workspace's compiled dependencies where their features agree.
    run(Command::new(bin.join("maturin"))
        .args(["develop", "--manifest-path", "bindings/python/Cargo.toml"])
        .env("VIRTUAL_ENV", &venv)
        .env("CARGO_TARGET_DIR", &target))?;
    let mut pytest = Command::new(&python);
    pytest
        .args([
            "-m",
            "pytest",
            "bindings/python/tests",
            "-q",
            "-p",
            "no:cacheprovider",
        ])
        .env("WHARF_BIN", target.join("debug").join("wharf"))
        .current_dir(&root);
    eprintln!("xtask: running {pytest:?}");
    let status = pytest.status().context("spawning pytest")?;
    match status.code() {
        Some(0) => {}
        // Exit 5: no tests were collected, which must never pass as green.
        Some(5) => bail!("pytest collected no tests in bindings/python/tests"),
        _ => bail!("the Python tests failed ({status})"),
    }
    run(Command::new(&python).args([
        "-m",
        "mypy",
        "--strict",
        "--cache-dir",
        &target.join("mypy-cache").to_string_lossy(),
        "examples/python",
    ]))
}

/// Real-process crash rounds: `wharf serve` killed with SIGKILL while publishing and consuming,
/// restarted, and checked for lost confirmed messages (crates/wharf/tests/crash.rs).
fn crash(args: &[String]) -> Result<()> {
    let mut rounds = 50u64;
    if let Some(idx) = args.iter().position(|arg| arg == "--rounds") {
        rounds = args
            .get(idx + 1)
            .context("--rounds needs a value")?
            .parse()?;
    }
    // The tests that run the `wharf` binary live in its crate, `wharf`.
    let server_test = |test: &str, filter: &str, (var, value): (&str, String)| {
        run(cargo()
            .args(["test", "--release", "-p", "wharf", "--test", test])
            .args(["--", "--nocapture", filter])
            .env(var, value))
    };
    server_test("crash", "", ("WHARF_CRASH_ROUNDS", rounds.to_string()))?;
    // The same number of kill -9 rounds with backlogs of 200 MB and more across a FIFO, a
    // priority and a length-limited queue (tests/scale.rs; CI runs 3).
    server_test(
        "scale",
        "kill_9_rounds",
        ("WHARF_SCALE_ROUNDS", rounds.to_string()),
    )
}

fn bench(args: &[String]) -> Result<()> {
    if args.iter().any(|arg| arg == "--plot") {
        return bench_plot(args);
    }
    let quick = args.iter().any(|arg| arg == "--quick");
    let mut cmd = cargo();
    cmd.args(["bench", "-p", "wharf-benches"]);
    if quick {
        cmd.args([
            "--",
            "--warm-up-time",
            "0.5",
            "--measurement-time",
            "2",
            "--sample-size",
            "10",
        ]);
    }
    run(&mut cmd)
}

fn fuzz(args: &[String]) -> Result<()> {
    let Some(target) = args.first() else {
        bail!("usage: cargo xtask fuzz TARGET [--seconds N]")
    };
    let mut seconds = 60u64;
    let mut sanitizer = false;
    let mut idx = 1;
    while idx < args.len() {
        match args[idx].as_str() {
            "--seconds" => {
                seconds = args
                    .get(idx + 1)
                    .context("--seconds needs a value")?
                    .parse()?;
                idx += 1;
            }
            "--sanitizer" => sanitizer = true,
            other => bail!("unknown fuzz flag `{other}`"),
        }
        idx += 1;
    }
    let ok = cargo()
        .args(["fuzz", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        run(cargo().args(["install", "cargo-fuzz", "--locked"]))?;
    }
    let mut cmd = cargo();
    // cargo-fuzz passes `-Z` flags; on the stable toolchain that needs RUSTC_BOOTSTRAP.
    cmd.env("RUSTC_BOOTSTRAP", "1").arg("fuzz").arg("run");
    if !sanitizer {
        cmd.args(["-s", "none"]);
    }
    let corpus = root().join("fuzz/corpus").join(target);
    cmd.arg(target)
        .arg(&corpus)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"));
    run(&mut cmd)
}

// ---------------------------------------------------------------------------------------------
// `bench --plot`: `wharf bench` over message sizes against a release server, drawn to an SVG.

/// Body sizes of the sweep, with the messages and batch of the throughput run at each size
/// (bounded so the whole sweep takes well under two minutes).
const PLOT_SIZES: [(u64, u64, u64); 5] = [
    (16, 500_000, 500),
    (100, 500_000, 500),
    (1024, 200_000, 200),
    (4096, 100_000, 100),
    (16384, 30_000, 25),
];
/// Open-loop rate and seconds of the latency run at each size.
const PLOT_LATENCY_RATE: &str = "5000";
const PLOT_LATENCY_SECONDS: &str = "2";

/// `cargo xtask bench --plot [--from DIR] [--out FILE]`: runs the sweep (JSON reports are kept
/// in `target/bench-plot/`), or with `--from` re-draws from the reports of an earlier sweep.
fn bench_plot(args: &[String]) -> Result<()> {
    let flag = |name: &str| {
        args.iter()
            .position(|arg| arg == name)
            .and_then(|idx| args.get(idx + 1))
            .map(PathBuf::from)
    };
    let out = flag("--out").unwrap_or_else(|| root().join("docs/bench-sizes.svg"));
    let reports_dir = match flag("--from") {
        Some(dir) => dir,
        None => {
            let dir = target_dir().join("bench-plot");
            run_sweep(&dir)?;
            dir
        }
    };
    let mut rows = Vec::new();
    for (size, _, _) in PLOT_SIZES {
        let read = |kind: &str| {
            let path = reports_dir.join(format!("{kind}-{size}.json"));
            std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
        };
        let throughput = read("throughput")?;
        let latency = read("latency")?;
        let number = |text: &str, path: &[&str]| {
            json_number(text, path).with_context(|| format!("{path:?} missing at size {size}"))
        };
        rows.push(PlotRow {
            size,
            msgs_per_s: number(&throughput, &["delivery_rate"])?,
            mb_per_s: number(&throughput, &["delivery_mb_per_s"])?,
            latency_us: [
                number(&latency, &["latency_us", "p50"])?,
                number(&latency, &["latency_us", "p90"])?,
                number(&latency, &["latency_us", "p99"])?,
                number(&latency, &["latency_us", "p999"])?,
            ],
        });
    }
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let note = format!(
        "wharf bench, 1 producer → direct → 1 queue → 1 consumer, transient, auto-ack; \
         broker and bench on one machine ({nproc} cores)"
    );
    std::fs::write(&out, plot_svg(&rows, &note))
        .with_context(|| format!("writing {}", out.display()))?;
    for row in &rows {
        eprintln!(
            "xtask: {:>6} B  {:>10.0} msgs/s  {:>8.1} MB/s  p50 {:.0} µs  p99 {:.0} µs  p99.9 {:.0} µs",
            row.size,
            row.msgs_per_s,
            row.mb_per_s,
            row.latency_us[0],
            row.latency_us[2],
            row.latency_us[3]
        );
    }
    eprintln!("xtask: wrote {}", out.display());
    Ok(())
}

/// `cargo xtask backlog`: a release `wharf serve` on a fresh data dir, `wharf bench --backlog`
/// against it, then the server's peak resident memory (`VmHWM`, Linux).
fn backlog(args: &[String]) -> Result<()> {
    let mut count = "10000000".to_owned();
    let mut in_memory = false;
    let mut max_priority: Option<String> = None;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--count" => count = args.next().context("--count needs a number")?.clone(),
            "--in-memory" => in_memory = true,
            "--max-priority" => {
                max_priority = Some(
                    args.next()
                        .context("--max-priority needs a number")?
                        .clone(),
                )
            }
            other => bail!("backlog: unknown argument {other}"),
        }
    }
    run(cargo().args(["build", "--release", "--bin", "wharf"]))?;
    let dir = target_dir().join("backlog");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("wharf.toml");
    let paging = if in_memory { 0 } else { 100_000 };
    std::fs::write(&config, format!("queue_memory_messages = {paging}\n"))?;
    let wharf = target_dir().join("release/wharf");
    let mut server = Command::new(&wharf)
        .args(["serve", "--bind", "127.0.0.1:0", "--data-dir"])
        .arg(dir.join("data"))
        .arg("--config")
        .arg(&config)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("starting wharf serve")?;
    let result = (|| {
        let addr = server_addr(&mut server)?;
        let mut bench = Command::new(&wharf);
        bench.args([
            "bench",
            "--persistent",
            "--manual-ack",
            "--backlog",
            "--confirm-window",
            "1000",
            "--quiet",
            "--count",
            &count,
            "--server",
            &addr,
        ]);
        if let Some(max_priority) = &max_priority {
            bench.args(["--max-priority", max_priority]);
        }
        run(&mut bench)?;
        let status = std::fs::read_to_string(format!("/proc/{}/status", server.id()))
            .context("reading the server's /proc status (Linux only)")?;
        for line in status.lines() {
            if line.starts_with("VmHWM") || line.starts_with("VmRSS") {
                println!(
                    "broker {}",
                    line.split_whitespace().collect::<Vec<_>>().join(" ")
                );
            }
        }
        Ok(())
    })();
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Builds the release binary, starts `wharf serve` on a free port with a fresh data dir, runs
/// a throughput and an open-loop latency bench per size, and stops the server.
fn run_sweep(dir: &Path) -> Result<()> {
    run(cargo().args(["build", "--release", "--bin", "wharf"]))?;
    let _ = std::fs::remove_dir_all(dir);
    let data_dir = dir.join("data");
    std::fs::create_dir_all(&data_dir)?;
    let wharf = target_dir().join("release/wharf");
    let mut server = Command::new(&wharf)
        .args(["serve", "--bind", "127.0.0.1:0", "--data-dir"])
        .arg(&data_dir)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("starting wharf serve")?;
    let result = (|| {
        let addr = server_addr(&mut server)?;
        for (size, count, batch) in PLOT_SIZES {
            let (size, count, batch) = (size.to_string(), count.to_string(), batch.to_string());
            let throughput = [
                "--size",
                &size,
                "--count",
                &count,
                "--batch",
                &batch,
                "--prefetch",
                "2000",
            ];
            let latency = [
                "--size",
                &size,
                "--rate",
                PLOT_LATENCY_RATE,
                "--duration",
                PLOT_LATENCY_SECONDS,
            ];
            for (kind, flags) in [("throughput", &throughput[..]), ("latency", &latency[..])] {
                let mut cmd = Command::new(&wharf);
                cmd.arg("bench")
                    .args(flags)
                    .args(["--json", "--quiet", "--server", &addr]);
                eprintln!("xtask: running {cmd:?}");
                let output = cmd.output().context("running wharf bench")?;
                if !output.status.success() {
                    bail!(
                        "{cmd:?} failed with {}: {}",
                        output.status,
                        String::from_utf8_lossy(&output.stderr)
                    );
                }
                std::fs::write(dir.join(format!("{kind}-{size}.json")), &output.stdout)?;
            }
        }
        Ok(())
    })();
    let _ = server.kill();
    let _ = server.wait();
    result
}

/// Reads the server's stderr until it logs `wharf is listening addr=...`; a thread drains the
/// rest so the server never blocks on a full pipe.
fn server_addr(server: &mut std::process::Child) -> Result<String> {
    use std::io::BufRead as _;
    let stderr = server.stderr.take().context("server stderr")?;
    let mut lines = std::io::BufReader::new(stderr).lines();
    for line in lines.by_ref() {
        let line = line?;
        if let Some((_, rest)) = line.split_once("wharf is listening") {
            let addr = rest
                .split_once("addr=")
                .map(|(_, addr)| addr.trim_matches(|c: char| c == '"' || c.is_whitespace()))
                .context("no addr= in the listening line")?
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned();
            std::thread::spawn(move || lines.for_each(drop));
            return Ok(addr);
        }
    }
    bail!("wharf serve exited before listening")
}

/// The number at `path` (keys searched one after the other) in `wharf bench --json` output: a
/// deliberately small reader, so xtask needs no JSON dependency. Works because the report's
/// keys are unique along each path.
fn json_number(text: &str, path: &[&str]) -> Option<f64> {
    let mut rest = text;
    for key in path {
        let quoted = format!("\"{key}\":");
        let at = rest.find(&quoted)?;
        rest = &rest[at + quoted.len()..];
    }
    let rest = rest.trim_start();
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | '-' | '+' | 'e' | 'E')))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

struct PlotRow {
    size: u64,
    msgs_per_s: f64,
    mb_per_s: f64,
    /// p50, p90, p99, p99.9.
    latency_us: [f64; 4],
}

fn size_label(size: u64) -> String {
    if size >= 1024 {
        format!("{} KiB", size / 1024)
    } else {
        format!("{size} B")
    }
}

/// Two panels: delivered msgs/s and MB/s against body size; latency percentiles (log scale)
/// against body size. Hand-written SVG: axes, grid lines, polylines, labels.
fn plot_svg(rows: &[PlotRow], note: &str) -> String {
    use std::fmt::Write as _;
    const WIDTH: f64 = 1000.0;
    const PANEL_W: f64 = 380.0;
    const PANEL_H: f64 = 260.0;
    const TOP: f64 = 70.0;
    const COLORS: [&str; 4] = ["#1f77b4", "#2ca02c", "#ff7f0e", "#d62728"];
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="400" viewBox="0 0 {WIDTH} 400" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="24" text-anchor="middle" font-size="15">Throughput and latency against message size</text>"#,
        WIDTH / 2.0
    );
    let _ = writeln!(
        svg,
        r##"<text x="{}" y="44" text-anchor="middle" fill="#555">{note}</text>"##,
        WIDTH / 2.0
    );
    let (size_min, size_max) = (rows[0].size as f64, rows[rows.len() - 1].size as f64);
    let x_of = |left: f64, size: u64| {
        left + (size as f64 / size_min).log10() / (size_max / size_min).log10() * PANEL_W
    };
    let bottom = TOP + PANEL_H;
    let axes = |svg: &mut String, left: f64, title: &str| {
        let _ = writeln!(
            svg,
            r##"<rect x="{left}" y="{TOP}" width="{PANEL_W}" height="{PANEL_H}" fill="none" stroke="#333"/>"##
        );
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle">{title}</text>"#,
            left + PANEL_W / 2.0,
            TOP - 8.0
        );
        for row in rows {
            let x = x_of(left, row.size);
            let _ = writeln!(
                svg,
                r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{bottom}" stroke="#ddd"/><text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"##,
                bottom + 16.0,
                size_label(row.size)
            );
        }
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle">message body size (log scale)</text>"#,
            left + PANEL_W / 2.0,
            bottom + 34.0
        );
    };
    let polyline = |svg: &mut String, points: &[(f64, f64)], color: &str| {
        let text: Vec<String> = points
            .iter()
            .map(|(x, y)| format!("{x:.1},{y:.1}"))
            .collect();
        let _ = writeln!(
            svg,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#,
            text.join(" ")
        );
        for (x, y) in points {
            let _ = writeln!(
                svg,
                r#"<circle cx="{x:.1}" cy="{y:.1}" r="3" fill="{color}"/>"#
            );
        }
    };
    let nice_max = |value: f64| {
        let magnitude = 10_f64.powf(value.max(1.0).log10().floor());
        [1.0, 2.0, 2.5, 5.0, 10.0]
            .into_iter()
            .map(|step| step * magnitude)
            .find(|candidate| *candidate >= value)
            .unwrap_or(10.0 * magnitude)
    };

    // Left panel: msgs/s (left axis) and MB/s (right axis).
    let left = 80.0;
    axes(
        &mut svg,
        left,
        "Delivered per second (closed loop, max rate)",
    );
    let msgs_max = nice_max(rows.iter().map(|row| row.msgs_per_s).fold(0.0, f64::max));
    let mb_max = nice_max(rows.iter().map(|row| row.mb_per_s).fold(0.0, f64::max));
    for tick in 0..=4 {
        let fraction = f64::from(tick) / 4.0;
        let y = bottom - fraction * PANEL_H;
        let _ = writeln!(
            svg,
            r##"<line x1="{left}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end" fill="{}">{}</text><text x="{}" y="{:.1}" fill="{}">{:.0}</text>"##,
            left + PANEL_W,
            left - 6.0,
            y + 4.0,
            COLORS[0],
            si_label(fraction * msgs_max),
            left + PANEL_W + 6.0,
            y + 4.0,
            COLORS[2],
            fraction * mb_max
        );
    }
    let points = |value: &dyn Fn(&PlotRow) -> f64, max: f64| -> Vec<(f64, f64)> {
        rows.iter()
            .map(|row| (x_of(left, row.size), bottom - value(row) / max * PANEL_H))
            .collect()
    };
    polyline(
        &mut svg,
        &points(&|row| row.msgs_per_s, msgs_max),
        COLORS[0],
    );
    polyline(&mut svg, &points(&|row| row.mb_per_s, mb_max), COLORS[2]);
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" fill="{}">msgs/s (left axis)</text><text x="{}" y="{}" fill="{}">MB/s (right axis)</text>"#,
        left + 10.0,
        TOP + 18.0,
        COLORS[0],
        left + 10.0,
        TOP + 34.0,
        COLORS[2]
    );

    // Right panel: latency percentiles, log scale.
    let left = 570.0;
    axes(
        &mut svg,
        left,
        &format!("Publish → deliver latency, µs, at {PLOT_LATENCY_RATE} msgs/s (open loop)"),
    );
    let all = rows.iter().flat_map(|row| row.latency_us);
    let decade_min = all
        .clone()
        .fold(f64::MAX, f64::min)
        .max(1.0)
        .log10()
        .floor();
    let decade_max = all.fold(1.0, f64::max).log10().ceil().max(decade_min + 1.0);
    let y_of = |value: f64| {
        bottom - (value.max(1.0).log10() - decade_min) / (decade_max - decade_min) * PANEL_H
    };
    let mut decade = decade_min;
    while decade <= decade_max {
        let y = y_of(10_f64.powf(decade));
        let _ = writeln!(
            svg,
            r##"<line x1="{left}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            left + PANEL_W,
            left - 6.0,
            y + 4.0,
            si_label(10_f64.powf(decade))
        );
        decade += 1.0;
    }
    for (idx, name) in ["p50", "p90", "p99", "p99.9"].into_iter().enumerate() {
        let points: Vec<(f64, f64)> = rows
            .iter()
            .map(|row| (x_of(left, row.size), y_of(row.latency_us[idx])))
            .collect();
        polyline(&mut svg, &points, COLORS[idx]);
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" fill="{}">{name}</text>"#,
            left + 10.0 + 50.0 * idx as f64,
            TOP + 18.0,
            COLORS[idx]
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// `1500000.0` → `1.5M`.
fn si_label(value: f64) -> String {
    if value >= 1e6 {
        format!("{}M", (value / 1e5).round() / 10.0)
    } else if value >= 1e3 {
        format!("{}k", (value / 1e2).round() / 10.0)
    } else {
        format!("{}", (value * 10.0).round() / 10.0)
    }
}
