//! The `wharf` binary: `wharf serve` runs the broker (the `wharf-server` library); `wharf bench`
//! (`bench/`) load-tests one; the other subcommands are its CLI (`cli.rs`), which talks to a
//! broker through `wharf-client`.

mod bench;
mod cli;
mod tls_gen;
mod users;
mod vhosts;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use wharf_server::config::{FileConfig, Overrides, resolve};
use wharf_server::{LogFormat, Server};

/// Wharf: a fast, durable message broker.
#[derive(Debug, Parser)]
#[command(
    name = "wharf",
    version,
    about,
    long_about = "Wharf: a fast, durable message broker.\n\n\
                  `wharf serve` runs the broker; the other commands talk to one at --server \
                  (env WHARF_SERVER, default 127.0.0.1:5800).",
    after_long_help = cli::EXIT_CODES_HELP
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the broker.
    Serve(ServeArgs),
    /// Load-test a broker end to end: rates, latency percentiles, loss and duplicate check.
    Bench(bench::BenchArgs),
    /// Manage the broker's users: over the protocol as an administrator, or with --data-dir in
    /// a stopped broker's directory.
    User(users::UserArgs),
    /// Manage users' permissions: over the protocol as an administrator, or with --data-dir in
    /// a stopped broker's directory.
    Permissions(users::PermissionArgs),
    /// TLS helpers: a self-made CA and certificates for development.
    Tls(tls_gen::TlsArgs),
    /// Manage the broker's virtual hosts over the protocol, as an administrator.
    #[command(subcommand)]
    Vhost(vhosts::Vhost),
    #[command(flatten)]
    Client(cli::Command),
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Address to listen on [default: 127.0.0.1:5800].
    #[arg(long, env = "WHARF_BIND")]
    bind: Option<SocketAddr>,
    /// Directory for durable state [default: ./wharf-data].
    #[arg(long, env = "WHARF_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Config file (TOML); flags and WHARF_* variables override it.
    #[arg(long, env = "WHARF_CONFIG")]
    config: Option<PathBuf>,
    /// Log format [default: text].
    #[arg(long, env = "WHARF_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,
    /// When the log is fsynced: always (confirm after fsync), interval=MS, never (unsafe)
    /// [default: always].
    #[arg(long, env = "WHARF_SYNC")]
    sync: Option<String>,
    /// The user created at the first start [default: guest].
    #[arg(long, env = "WHARF_DEFAULT_USER")]
    default_user: Option<String>,
    /// Its password [default: guest].
    #[arg(long, env = "WHARF_DEFAULT_PASS", hide_env_values = true)]
    default_pass: Option<String>,
    /// The TLS listener's address [default: 127.0.0.1:5801].
    #[arg(long, env = "WHARF_TLS_BIND")]
    tls_bind: Option<SocketAddr>,
    /// The server's certificate chain (PEM); with --tls-key, turns the TLS listener on.
    #[arg(long, env = "WHARF_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// The server's private key (PEM).
    #[arg(long, env = "WHARF_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// CA (PEM) that client certificates are verified against (mutual TLS, SASL EXTERNAL).
    #[arg(long, env = "WHARF_TLS_CLIENT_CA")]
    tls_client_ca: Option<PathBuf>,
    /// TLS clients must present a certificate --tls-client-ca verifies.
    #[arg(long)]
    tls_require_client_cert: bool,
    /// Do not listen in plaintext (TLS clients only).
    #[arg(long)]
    no_plaintext: bool,
}

/// The exit status of an offline command: its error, if any, on stderr.
fn exit_code(result: Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    // Colours only on a terminal: log files and pipes get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn serve(args: ServeArgs) -> Result<()> {
    let file = args.config.as_deref().map(FileConfig::load).transpose()?;
    let overrides = Overrides {
        bind: args.bind,
        data_dir: args.data_dir,
        log_format: args.log_format,
        sync: args.sync,
        default_user: args.default_user,
        default_pass: args.default_pass,
        tls_bind: args.tls_bind,
        tls_cert: args.tls_cert,
        tls_key: args.tls_key,
        tls_client_ca: args.tls_client_ca,
        tls_require_client_cert: args.tls_require_client_cert.then_some(true),
        plaintext: args.no_plaintext.then_some(false),
    };
    let config = resolve(overrides, file)?;
    init_logging(config.log_format);
    let server = Server::bind(config.clone())
        .await
        .context("cannot start the broker")?;
    let shutdown = server.shutdown_handle();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("signal received: shutting down");
        shutdown.shutdown();
    });
    server.run().await?;
    Ok(())
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read before `main` (a `_RJEM_MALLOC_CONF` variable still overrides
/// them): freed pages go back to the system after about 1 s instead of 10 s. A broker's
/// working set moves on (a drained backlog's memory is not reused soon), and with the default
/// decay the 10 M-message priority-queue backlog peaked at 273–376 MB of RSS of which about
/// 140 MB was live; with 1 s it peaked at 192–202 MB, drained as fast (docs/benchmarks.md,
/// session 8).
// The one way to give jemalloc compile-time options is a symbol it reads, exported under
// tikv-jemalloc-sys's prefix with the type that crate declares for it (a nullable C string).
#[allow(unsafe_code)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static MALLOC_CONF: Option<&'static std::ffi::c_char> =
    // SAFETY: a pointer to the first byte of a static, NUL-terminated string.
    Some(unsafe { &*c"dirty_decay_ms:1000,muzzy_decay_ms:1000".as_ptr() });

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Serve(args) => {
            let result = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|runtime| runtime.block_on(serve(args)));
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("error: {err:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Bench(args) => bench::main(args),
        Cmd::User(args) => exit_code(users::main(args)),
        Cmd::Permissions(args) => exit_code(users::permissions_main(args)),
        Cmd::Tls(args) => exit_code(tls_gen::main(args)),
        Cmd::Vhost(command) => client_main(vhosts::run(command)),
        Cmd::Client(command) => client_main(cli::run(command)),
    }
}

/// Runs a client command on a runtime of its own; its failure's exit code is the process's.
fn client_main(command: impl std::future::Future<Output = Result<(), cli::Failure>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the runtime: {err}");
            return ExitCode::from(cli::EXIT_OTHER);
        }
    };
    let result = runtime.block_on(command);
    // Do not wait for a stdin reader blocked in `read`.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::from(cli::EXIT_OK),
        Err(failure) => {
            eprintln!("error: {}", failure.message);
            ExitCode::from(failure.exit_code)
        }
    }
}
