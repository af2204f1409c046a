//! `cargo xtask TASK`: every developer and CI task of the Wharf workspace, in Rust so that it
//! runs the same on any machine with cargo.
//!
//! - `test`: the whole suite, exactly what CI runs (`.ci/run`).
//! - `bench [--quick]`: the criterion suite (`--quick`: a short subset with short measurement).
//! - `fuzz TARGET [--seconds N] [--sanitizer]`: a cargo-fuzz target for N seconds.
//! - `layers`: checks the crate layering (the sans-IO core pulls in no runtime).

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
        "layers" => layers(),
        "help" | "--help" | "-h" => {
            println!("{}", HELP);
            Ok(())
        }
        other => bail!("unknown task `{other}`\n{HELP}"),
    }
}

const HELP: &str = "usage: cargo xtask <task>
  test                         run every test tier CI runs
  bench [--quick]              criterion benchmarks (quick: short subset)
  fuzz TARGET [--seconds N] [--sanitizer]
                               run a cargo-fuzz target (decode_frame, decode_stream)
  layers                       check crate layering (wharf-core has no tokio)";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_owned()
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: running {:?}", cmd);
    let status = cmd.current_dir(root()).status().with_context(|| format!("spawning {cmd:?}"))?;
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

fn test(_args: &[String]) -> Result<()> {
    layers()?;
    // Release-mode build of the binary is what end-to-end tests exercise when present; the
    // tests themselves build what they need through cargo's own test harness.
    if has_nextest() {
        run(cargo().args(["nextest", "run", "--workspace", "--no-fail-fast"]))?;
    } else {
        run(cargo().args(["test", "--workspace", "--no-fail-fast"]))?;
    }
    // nextest does not run doctests.
    run(cargo().args(["test", "--workspace", "--doc"]))?;
    Ok(())
}

fn bench(args: &[String]) -> Result<()> {
    let quick = args.iter().any(|arg| arg == "--quick");
    let mut cmd = cargo();
    cmd.args(["bench", "-p", "wharf-benches"]);
    if quick {
        cmd.args(["--", "--warm-up-time", "0.5", "--measurement-time", "2", "--sample-size", "10"]);
    }
    run(&mut cmd)
}

fn fuzz(args: &[String]) -> Result<()> {
    let Some(target) = args.first() else { bail!("usage: cargo xtask fuzz TARGET [--seconds N]") };
    let mut seconds = 60u64;
    let mut sanitizer = false;
    let mut idx = 1;
    while idx < args.len() {
        match args[idx].as_str() {
            "--seconds" => {
                seconds = args.get(idx + 1).context("--seconds needs a value")?.parse()?;
                idx += 1;
            }
            "--sanitizer" => sanitizer = true,
            other => bail!("unknown fuzz flag `{other}`"),
        }
        idx += 1;
    }
    let ok = cargo().args(["fuzz", "--version"]).output().map(|o| o.status.success()).unwrap_or(false);
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
    cmd.arg(target).arg(&corpus).arg("--").arg(format!("-max_total_time={seconds}"));
    run(&mut cmd)
}

/// The architecture invariant: `wharf-core` and `wharf-protocol` never depend on an async
/// runtime or the network stack; `wharf-client` never depends on core or storage.
fn layers() -> Result<()> {
    let forbidden: &[(&str, &[&str])] = &[
        ("wharf-core", &["tokio", "wharf-protocol", "wharf-storage"]),
        ("wharf-protocol", &["wharf-core", "wharf-storage"]),
        ("wharf-client", &["wharf-core", "wharf-storage", "wharf-server"]),
    ];
    for (krate, banned) in forbidden {
        if !root().join("crates").join(krate).exists() {
            continue;
        }
        let out = cargo()
            .current_dir(root())
            .args(["tree", "-e", "normal", "--prefix", "none", "-p", krate])
            .output()
            .context("running cargo tree")?;
        if !out.status.success() {
            bail!("cargo tree -p {krate} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let tree = String::from_utf8_lossy(&out.stdout);
        for dep in *banned {
            if tree.lines().any(|line| line.split_whitespace().next() == Some(dep)) {
                bail!("layering violated: {krate} depends on {dep}");
            }
        }
    }
    eprintln!("xtask: layering ok");
    Ok(())
}
