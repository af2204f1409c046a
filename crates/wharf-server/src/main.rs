//! The `wharf` binary: `wharf serve` runs the broker; the other subcommands are its CLI.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use wharf_server::config::{FileConfig, Overrides, resolve};
use wharf_server::{LogFormat, Server};

/// Wharf: a fast, durable message broker.
#[derive(Debug, Parser)]
#[command(name = "wharf", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the broker.
    Serve(ServeArgs),
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
}

fn init_logging(format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
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
    };
    let config = resolve(overrides, file)?;
    init_logging(config.log_format);
    let server = Server::bind(config.clone())
        .await
        .with_context(|| format!("cannot listen on {}", config.bind))?;
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

fn main() -> Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Cmd::Serve(args) => runtime.block_on(serve(args)),
    }
}
