//! The listener, the accept loop and graceful shutdown.

use crate::config::ServerConfig;
use crate::log::{FailStop, Log, LogConfig};
use crate::state::State;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tracing::{info, warn};
use wharf_core::Broker;
use wharf_storage::{FileStorage, Storage};

/// Milliseconds since the Unix epoch: the logical time the core is given.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

/// What every connection shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub config: ServerConfig,
    state: Mutex<State>,
    /// Set when the log failed: the server stops and `run` reports it (fail-stop).
    pub failure: Arc<Mutex<Option<String>>>,
    pub next_connection: AtomicU64,
    pub shutdown: watch::Receiver<bool>,
    /// Notified when ready bytes fall below the low watermark (see the memory alarm).
    pub memory_freed: Notify,
}

impl Shared {
    /// The broker state. Held only while applying commands: never across an `.await`.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .expect("a panic while holding the broker lock is fatal")
    }
}

/// Stops a running server: stop accepting, close every connection with `ConnectionForced`,
/// flush, return.
#[derive(Debug, Clone)]
pub struct ShutdownHandle {
    sender: Arc<watch::Sender<bool>>,
}

impl ShutdownHandle {
    /// Begins a graceful shutdown (idempotent).
    pub fn shutdown(&self) {
        self.sender.send_replace(true);
    }
}

/// A bound server, ready to run.
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: ShutdownHandle,
}

impl Server {
    /// Binds the listener and prepares the data directory.
    pub async fn bind(config: ServerConfig) -> std::io::Result<Server> {
        Self::bind_with_storage(config, Arc::new(FileStorage)).await
    }

    /// Like [`Server::bind`], with the log on the given storage (tests inject faults here).
    pub async fn bind_with_storage(
        config: ServerConfig,
        storage: Arc<dyn Storage>,
    ) -> std::io::Result<Server> {
        std::fs::create_dir_all(&config.data_dir)?;
        let (sender, receiver) = watch::channel(false);
        let sender = Arc::new(sender);
        let failure: Arc<Mutex<Option<String>>> = Arc::default();
        let fail_stop: FailStop = {
            let (sender, failure) = (sender.clone(), failure.clone());
            Arc::new(move |reason: String| {
                failure.lock().expect("failure lock").get_or_insert(reason);
                sender.send_replace(true);
            })
        };
        let log_config = LogConfig {
            sync_policy: config.sync_policy,
            segment_bytes: config.segment_bytes,
            checkpoint_bytes: config.checkpoint_bytes,
        };
        let mut broker = Broker::default();
        let (log, recovered) = Log::open(
            storage,
            &config.data_dir.join("wal"),
            log_config,
            &mut broker,
            now_ms(),
            fail_stop,
        )
        .map_err(|err| {
            std::io::Error::other(format!(
                "cannot recover the log in {}: {err}",
                config.data_dir.display()
            ))
        })?;
        info!(?recovered, "log open");
        let listener = TcpListener::bind(config.bind).await?;
        let shared = Arc::new(Shared {
            config,
            failure,
            state: Mutex::new(State::with_log(broker, log)),
            next_connection: AtomicU64::new(1),
            shutdown: receiver,
            memory_freed: Notify::new(),
        });
        Ok(Server {
            listener,
            shared,
            shutdown: ShutdownHandle { sender },
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// A handle that stops the server.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.shutdown.clone()
    }

    /// Accepts connections until shut down, then waits (bounded) for connections to close.
    pub async fn run(self) -> std::io::Result<()> {
        let Server {
            listener,
            shared,
            shutdown: _keep_sender,
        } = self;
        let mut stop = shared.shutdown.clone();
        let mut connections = JoinSet::new();
        info!(addr = %listener.local_addr()?, "wharf is listening");
        loop {
            while connections.try_join_next().is_some() {}
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((socket, peer)) => {
                        connections.spawn(crate::connection::serve(shared.clone(), socket, peer));
                    }
                    Err(err) => {
                        // Out of file descriptors and the like: keep serving existing clients.
                        warn!("accept failed: {err}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                _ = async { stop.wait_for(|stop| *stop).await.is_ok() } => break,
            }
        }
        info!(
            connections = connections.len(),
            "shutting down: closing connections"
        );
        drop(listener);
        let deadline = shared.config.shutdown_timeout + Duration::from_secs(1);
        if tokio::time::timeout(deadline, async {
            while connections.join_next().await.is_some() {}
        })
        .await
        .is_err()
        {
            warn!("some connections did not close in time");
            connections.abort_all();
        }
        let log = shared.lock().log().cloned();
        if let Some(log) = log {
            log.close();
        }
        if let Some(reason) = shared.failure.lock().expect("failure lock").clone() {
            return Err(std::io::Error::other(format!(
                "stopped after a log failure: {reason}"
            )));
        }
        info!("shutdown complete");
        Ok(())
    }
}

/// A server running on a background task (for tests and embedding).
#[derive(Debug)]
pub struct RunningServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Stops it.
    pub shutdown: ShutdownHandle,
    /// Completes when it has stopped.
    pub task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl RunningServer {
    /// Binds and starts a server on the current tokio runtime.
    pub async fn start(config: ServerConfig) -> std::io::Result<RunningServer> {
        let server = Server::bind(config).await?;
        let addr = server.local_addr()?;
        let shutdown = server.shutdown_handle();
        let task = tokio::spawn(server.run());
        Ok(RunningServer {
            addr,
            shutdown,
            task,
        })
    }

    /// Shuts down gracefully and waits for the server to stop.
    pub async fn stop(self) -> std::io::Result<()> {
        self.shutdown.shutdown();
        self.task.await.map_err(std::io::Error::other)?
    }
}
