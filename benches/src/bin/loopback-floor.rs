//! `loopback-floor`: the publish → receive latency this machine gives over loopback TCP with
//! no broker, one hop or two (through a relay in a child process). See
//! `wharf_benches::floor`.

use clap::Parser;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::{Command, ExitCode, Stdio};
use wharf_benches::floor::{self, FloorError, FloorSettings, Hops};

#[derive(Parser)]
#[command(about = "Loopback latency floor: open-loop messages over TCP, without a broker")]
struct Args {
    /// 1: sender → receiver; 2: sender → relay process → receiver (like producer → broker →
    /// consumer).
    #[arg(long, default_value_t = 2)]
    hops: u8,
    /// Messages per second (open loop).
    #[arg(long, default_value_t = 10_000.0)]
    rate: f64,
    /// Length of the run.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Bytes per message.
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Print one JSON object instead of a line of text.
    #[arg(long)]
    json: bool,
    /// Internal: serve as the relay, printing the port it listens on.
    #[arg(long, hide = true)]
    relay: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let outcome = if args.relay {
        serve_relay()
    } else {
        measure(&args)
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("loopback-floor: {err}");
            ExitCode::FAILURE
        }
    }
}

fn serve_relay() -> Result<(), FloorError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io_err("bind the relay"))?;
    let port = listener
        .local_addr()
        .map_err(io_err("read the relay's address"))?
        .port();
    let mut stdout = std::io::stdout();
    writeln!(stdout, "{port}")
        .and_then(|()| stdout.flush())
        .map_err(io_err("print the relay's port"))?;
    floor::relay(&listener).map(|_| ())
}

fn measure(args: &Args) -> Result<(), FloorError> {
    let hops = Hops::try_from(args.hops)?;
    let settings = FloorSettings::for_duration(args.rate, args.seconds, args.size)?;
    let report = match hops {
        Hops::One => floor::run(settings, None)?,
        Hops::Two => {
            let exe = std::env::current_exe().map_err(io_err("find this executable"))?;
            let mut child = Command::new(exe)
                .arg("--relay")
                .stdout(Stdio::piped())
                .spawn()
                .map_err(io_err("start the relay process"))?;
            let mut line = String::new();
            BufReader::new(child.stdout.take().expect("piped stdout"))
                .read_line(&mut line)
                .map_err(io_err("read the relay's port"))?;
            let port: u16 = line.trim().parse().map_err(|_| FloorError::Io {
                what: "read the relay's port",
                source: std::io::Error::other(format!("the relay printed {line:?}")),
            })?;
            let report = floor::run(settings, Some(SocketAddr::from(([127, 0, 0, 1], port))));
            let _ = child.wait();
            report?
        }
    };
    if args.json {
        println!("{}", report.to_json());
    } else {
        println!(
            "{} hop(s), {} msgs/s, {} messages of {} B: p50 {:.0} p90 {:.0} p99 {:.0} p99.9 {:.0} \
             max {:.0} µs; {} later than 2 ms",
            args.hops,
            args.rate,
            report.received,
            args.size,
            report.p50_us,
            report.p90_us,
            report.p99_us,
            report.p999_us,
            report.max_us,
            report.over_2ms
        );
    }
    Ok(())
}

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> FloorError {
    move |source| FloorError::Io { what, source }
}
