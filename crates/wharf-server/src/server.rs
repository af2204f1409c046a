//! The listener, the accept loop, the timer task and graceful shutdown.

use crate::config::ServerConfig;
use crate::context::{Context, now_ms};
use crate::persist::journal::{FailStop, Log, LogConfig};
use crate::persist::spool::Spools;
use crate::state::State;
use crate::transport::Stream;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};
use wharf_core::{Broker, Command, Limits};
use wharf_storage::{FileStorage, Storage};

/// The pager task: writes the spools of queues larger than memory and serves their page-in
/// requests. It writes sealed chunks of paged records and reads spool files without the
/// broker lock (on a blocking thread; writes first, so a read never overlaps a write of its
/// spool), then hands the entries read to the core, whose deliveries and further requests
/// follow as for any command.
async fn run_pager(shared: Arc<Context>) {
    let mut stop = shared.shutdown.clone();
    loop {
        tokio::select! {
            _ = async { stop.wait_for(|stop| *stop).await.is_ok() } => {
                debug!("pager task stopped");
                return;
            }
            _ = shared.pager_wake.notified() => {}
        }
        loop {
            let writes = match shared.lock().spools() {
                Some(spools) => spools.take_writes(),
                None => Vec::new(),
            };
            let wrote = !writes.is_empty();
            if wrote {
                let written = tokio::task::spawn_blocking(move || {
                    writes
                        .into_iter()
                        .map(crate::persist::spool::SpoolWrite::run)
                        .collect::<Vec<_>>()
                })
                .await;
                match written {
                    Ok(written) => {
                        if let Some(spools) = shared.lock().spools() {
                            spools.finish_writes(written);
                        }
                    }
                    Err(err) => {
                        error!("the spool writer failed: {err}; stopping");
                        (shared.fail_stop)(format!("the spool writer failed: {err}"));
                        return;
                    }
                }
            }
            let reads = match shared.lock().spools() {
                Some(spools) => spools.start_reads(),
                None => Vec::new(),
            };
            if reads.is_empty() {
                if wrote {
                    continue;
                }
                break;
            }
            let done = tokio::task::spawn_blocking(move || {
                reads
                    .into_iter()
                    .map(crate::persist::spool::PageRead::run)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|err| err.to_string())
            })
            .await
            .unwrap_or_else(|err| Err(format!("the spool reader failed: {err}")));
            let done = match done {
                Ok(done) => done,
                Err(err) => {
                    error!("{err}: paged messages cannot come back; stopping");
                    (shared.fail_stop)(err);
                    return;
                }
            };
            let mut state = shared.batch();
            for read in done {
                let (queue, epoch, level) = (read.queue().to_string(), read.epoch(), read.level());
                let finished = state
                    .spools()
                    .expect("reads come from spools")
                    .finish_read(read);
                match finished {
                    Ok(Some(entries)) => {
                        let (vhost, queue) = wharf_core::split_resource_key(&queue);
                        if let Err(err) = state.apply(
                            now_ms(),
                            Command::PageIn {
                                vhost: vhost.into(),
                                queue: queue.to_owned(),
                                epoch,
                                level,
                                entries,
                            },
                        ) {
                            warn!("paging in failed: {err}");
                        }
                    }
                    Ok(None) => {}
                    Err(err) => {
                        error!("{err}: stopping");
                        (shared.fail_stop)(err.to_string());
                        return;
                    }
                }
            }
            if let Some(leader) = state.finish().flush(None) {
                leader.commit();
            }
        }
    }
}

/// How often the log's housekeeping runs (releases and deferred checkpoints on an idle broker).
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(1);

/// The housekeeping task: the log's periodic work, see [`crate::persist::journal::Log::housekeeping`].
async fn run_housekeeping(shared: Arc<Context>) {
    let mut stop = shared.shutdown.clone();
    let mut every = tokio::time::interval(HOUSEKEEPING_INTERVAL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = async { stop.wait_for(|stop| *stop).await.is_ok() } => return,
            _ = every.tick() => shared.lock().housekeeping(),
        }
    }
}

/// The resource monitor: every `RESOURCE_CHECK_INTERVAL`, adds up the message bytes the
/// broker holds, ready, unacked and queued for sockets (the memory alarm: on over the high
/// watermark, off below `READY_BYTES_LOW_WATERMARK_PERCENT` of it) and the data directory's free disk space (`disk_free_limit`: persistent publishes
/// are refused below it, and accepted again once space returns).
async fn run_resources(shared: Arc<Context>) {
    use crate::limits::{READY_BYTES_LOW_WATERMARK_PERCENT, RESOURCE_CHECK_INTERVAL};
    use std::sync::atomic::Ordering;
    let mut stop = shared.shutdown.clone();
    let mut every = tokio::time::interval(RESOURCE_CHECK_INTERVAL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut disk_error_logged = false;
    loop {
        tokio::select! {
            _ = async { stop.wait_for(|stop| *stop).await.is_ok() } => return,
            _ = every.tick() => {}
        }
        let (ready, unacked, (outboxes, read_buffers), spooled) = {
            let state = shared.lock();
            (
                state.broker.ready_bytes_total(),
                state.broker.unacked_bytes_total(),
                state.held_by_connections(),
                state.spool_memory_bytes(),
            )
        };
        shared.spool_memory_bytes.store(spooled, Ordering::Relaxed);
        shared.unacked_bytes.store(unacked, Ordering::Relaxed);
        shared.outbox_bytes.store(outboxes, Ordering::Relaxed);
        shared
            .read_buffer_bytes
            .store(read_buffers, Ordering::Relaxed);
        let held = ready + shared.held_bytes();
        let high = shared.memory_high;
        let on = shared.memory_alarm.load(Ordering::Acquire);
        if !on && held > high {
            warn!(
                held,
                high,
                "memory alarm: messages held are over the high watermark; pausing the \
                 publishers of growing queues"
            );
            shared.memory_alarm.store(true, Ordering::Release);
        } else if on && held <= high / 100 * READY_BYTES_LOW_WATERMARK_PERCENT {
            info!(held, "memory alarm cleared");
            shared.memory_alarm.store(false, Ordering::Release);
            shared.memory_freed.notify_waiters();
        }
        let dir = shared.config.data_dir.clone();
        let space = tokio::task::spawn_blocking(move || crate::resources::disk_space(&dir)).await;
        match space {
            Ok(Ok(space)) => {
                disk_error_logged = false;
                let limit = shared.config.disk_free_limit(space.total);
                let low = space.free < limit;
                if let Some(log) = shared.lock().log() {
                    match log.set_disk_alarm(low) {
                        Some(true) => warn!(
                            free = space.free,
                            limit,
                            "disk alarm: free space is below disk_free_limit; refusing persistent publishes"
                        ),
                        Some(false) => info!(free = space.free, limit, "disk alarm cleared"),
                        None => {}
                    }
                }
            }
            Ok(Err(err)) if !disk_error_logged => {
                disk_error_logged = true;
                warn!("cannot read the data directory's free space: {err}");
            }
            _ => {}
        }
    }
}

/// The timer task: sleeps until the core's earliest timer (or until a command creates an
/// earlier one, see [`Context::wake_timer_if_earlier`]), then fires what is due. One task for
/// every timer of the broker (delays, TTLs, leases, queue expiry): no task per message.
async fn run_timers(shared: Arc<Context>) {
    let mut stop = shared.shutdown.clone();
    loop {
        let next = shared.fire_timers();
        let sleep_for =
            next.map(|deadline| Duration::from_millis(deadline.saturating_sub(now_ms())));
        if sleep_for == Some(Duration::ZERO) {
            // More timers due than one tick fires (or the clock moved on): let the
            // connections run between rounds.
            tokio::task::yield_now().await;
        }
        tokio::select! {
            _ = async { stop.wait_for(|stop| *stop).await.is_ok() } => {
                debug!("timer task stopped");
                return;
            }
            _ = shared.timer_wake.notified() => {}
            _ = tokio::time::sleep(sleep_for.unwrap_or_default()), if sleep_for.is_some() => {}
        }
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
pub struct Server {
    /// The plaintext listener (`None` when `plaintext` is off).
    listener: Option<TcpListener>,
    /// The TLS listener and its settings (`None` without `tls_cert`).
    tls: Option<(TcpListener, tokio_rustls::TlsAcceptor)>,
    shared: Arc<Context>,
    shutdown: ShutdownHandle,
    /// Held until `run` has closed the log.
    dir_lock: crate::data_dir::DirLock,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("listener", &self.listener)
            .field("tls", &self.tls.as_ref().map(|(listener, _)| listener))
            .finish_non_exhaustive()
    }
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
        // Before anything in the directory is opened: a second broker stops here.
        let dir_lock = crate::data_dir::lock(&config.data_dir)?;
        // Before the log is opened too: a broker that cannot listen touches nothing.
        let listen = |addr: SocketAddr| async move {
            TcpListener::bind(addr).await.map_err(|err| {
                std::io::Error::new(err.kind(), format!("cannot listen on {addr}: {err}"))
            })
        };
        if !config.plaintext && config.tls_cert.is_none() {
            return Err(std::io::Error::other(
                "with the plaintext listener off, tls_cert and tls_key are needed",
            ));
        }
        let listener = match config.plaintext {
            true => Some(listen(config.bind).await?),
            false => None,
        };
        let tls = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => {
                let settings = crate::transport::server_config(
                    cert,
                    key,
                    config.tls_client_ca.as_deref(),
                    config.tls_require_client_cert,
                )
                .map_err(|err| {
                    std::io::Error::other(format!("cannot use the TLS settings: {err}"))
                })?;
                Some((
                    listen(config.tls_bind).await?,
                    tokio_rustls::TlsAcceptor::from(settings),
                ))
            }
            _ => None,
        };
        let users =
            crate::auth::Users::open(dir_lock.dir(), &config.default_user, &config.default_pass.0)
                .map_err(|err| std::io::Error::other(format!("cannot open the users: {err}")))?;
        warn_if_exposed(&config, &users);
        info!(
            version = env!("CARGO_PKG_VERSION"),
            data_dir = %dir_lock.dir().display(),
            sync = %config.sync_policy,
            "wharf starting: recovering the log"
        );
        let started = std::time::Instant::now();
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
            ..LogConfig::default()
        };
        let mut broker = Broker::new(Limits {
            queues_max: config.queues_max,
            exchanges_max: config.exchanges_max,
            consumers_per_connection_max: config.consumers_per_connection_max,
            paging_threshold: config.queue_memory_messages,
            paging_threshold_bytes: config.queue_memory_bytes,
            page_transient: config.transient_queues_page,
            ..Limits::default()
        });
        let mut spools = Spools::new(config.data_dir.join("spool"));
        let (log, recovered) = Log::open(
            storage,
            &config.data_dir.join("wal"),
            log_config,
            &mut broker,
            &mut spools,
            now_ms(),
            fail_stop.clone(),
        )
        .map_err(|err| {
            std::io::Error::other(format!(
                "cannot recover the log in {}: {err}",
                config.data_dir.display()
            ))
        })?;
        let durable_queues = broker
            .list_all_queues()
            .iter()
            .filter(|(_, queue)| queue.durable)
            .count();
        info!(
            "recovered {} messages in {} durable queues ({} topology changes) from {} log \
             records{} in {} ms",
            recovered.messages,
            durable_queues,
            recovered.topology_ops,
            recovered.records,
            if recovered.epoch > 0 {
                format!(" (checkpoint {} and the records after it)", recovered.epoch)
            } else {
                String::new()
            },
            started.elapsed().as_millis()
        );
        let pager_wake = spools.wake.clone();
        let fds = crate::resources::raise_fd_limit();
        let sockets_max = config.connections_max.min(fds.sockets());
        let memory_high = config.memory_high_watermark(crate::resources::total_memory());
        info!(
            open_files = fds.soft,
            sockets_max, memory_high, "limits in force"
        );
        let shared = Arc::new(Context {
            users: Arc::new(users),
            user_connections: Mutex::default(),
            vhost_admin: Mutex::default(),
            kdf: Arc::new(tokio::sync::Semaphore::new(
                crate::limits::KDF_CONCURRENCY_MAX,
            )),
            sockets: std::sync::atomic::AtomicUsize::new(0),
            sockets_max,
            refusing: std::sync::atomic::AtomicUsize::new(0),
            memory_high,
            memory_alarm: std::sync::atomic::AtomicBool::new(false),
            outbox_bytes: std::sync::atomic::AtomicUsize::new(0),
            unacked_bytes: AtomicU64::new(0),
            read_buffer_bytes: std::sync::atomic::AtomicUsize::new(0),
            spool_memory_bytes: std::sync::atomic::AtomicUsize::new(0),
            config,
            failure,
            pager_wake,
            fail_stop,
            state: Mutex::new(State::with_log(broker, log, spools)),
            next_connection: AtomicU64::new(1),
            shutdown: receiver,
            memory_freed: Notify::new(),
            queues_changed: Notify::new(),
            timer_at: AtomicU64::new(u64::MAX),
            timer_wake: Notify::new(),
        });
        Ok(Server {
            listener,
            tls,
            shared,
            shutdown: ShutdownHandle { sender },
            dir_lock,
        })
    }

    /// The address actually bound (useful with port 0): the plaintext listener's, or the TLS
    /// listener's when plaintext is off.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match (&self.listener, &self.tls) {
            (Some(listener), _) => listener.local_addr(),
            (None, Some((listener, _))) => listener.local_addr(),
            (None, None) => unreachable!("the configuration has a listener"),
        }
    }

    /// The TLS listener's address, if it runs.
    pub fn tls_local_addr(&self) -> Option<SocketAddr> {
        self.tls
            .as_ref()
            .and_then(|(listener, _)| listener.local_addr().ok())
    }

    /// A handle that stops the server.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.shutdown.clone()
    }

    /// Accepts connections until shut down, then waits (bounded) for connections to close.
    pub async fn run(self) -> std::io::Result<()> {
        let Server {
            listener,
            tls,
            shared,
            shutdown: _keep_sender,
            dir_lock,
        } = self;
        let mut stop = shared.shutdown.clone();
        let mut connections = JoinSet::new();
        // Timers recovered from the log (delayed messages, dedup windows, queue expiry) are
        // fired from the start.
        let timers = tokio::spawn(run_timers(shared.clone()));
        let pager = tokio::spawn(run_pager(shared.clone()));
        let housekeeping = tokio::spawn(run_housekeeping(shared.clone()));
        let resources = tokio::spawn(run_resources(shared.clone()));
        if let Some(listener) = &listener {
            info!(addr = %listener.local_addr()?, "wharf is listening");
        }
        if let Some((listener, _)) = &tls {
            info!(addr = %listener.local_addr()?, "wharf is listening (TLS)");
        }
        loop {
            while connections.try_join_next().is_some() {}
            tokio::select! {
                accepted = next_incoming(listener.as_ref(), tls.as_ref()) => match accepted {
                    Ok((incoming, peer)) => accept(&shared, &mut connections, incoming, peer),
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
        drop(tls);
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
        // Stopped by the shutdown signal; nothing is appended to the log after this.
        if let Err(err) = timers.await {
            warn!("the timer task failed: {err}");
        }
        if let Err(err) = pager.await {
            warn!("the pager task failed: {err}");
        }
        if let Err(err) = housekeeping.await {
            warn!("the housekeeping task failed: {err}");
        }
        if let Err(err) = resources.await {
            warn!("the resource monitor failed: {err}");
        }
        let log = shared.lock().log().cloned();
        if let Some(log) = log {
            log.close();
        }
        // Another broker may use the directory from now on.
        drop(dir_lock);
        if let Some(reason) = shared.failure.lock().expect("failure lock").clone() {
            return Err(std::io::Error::other(format!(
                "stopped after a log failure: {reason}"
            )));
        }
        info!("shutdown complete");
        Ok(())
    }
}

/// Warns when the broker listens beyond loopback while the only user is the default one with
/// its default password (RabbitMQ refuses `guest` from afar for this reason; so does Wharf,
/// through `loopback_users`, but a renamed default user with a known password is not).
fn warn_if_exposed(config: &ServerConfig, users: &crate::auth::Users) {
    let users = users.list();
    if !config.bind.ip().is_loopback()
        && users.len() == 1
        && users[0].0 == config.default_user
        && config.default_pass.0 == "guest"
    {
        warn!(
            bind = %config.bind,
            user = %config.default_user,
            "listening beyond loopback with only the default user and password: add users \
             (wharf user add) or set --default-pass"
        );
    }
    if config.allow_anonymous && !config.bind.ip().is_loopback() {
        warn!(bind = %config.bind, "anonymous logins are enabled beyond loopback");
    }
}

/// Refusals sent at once at most to sockets over the cap; further sockets are closed without
/// a word (each refusal holds its descriptor for up to `REFUSAL_TIMEOUT`).
const REFUSING_MAX: usize = 16;
/// How long a refusal may take to send.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(1);

/// The next socket either listener accepts (a listener that is off never completes).
async fn next_incoming(
    plain: Option<&TcpListener>,
    tls: Option<&(TcpListener, tokio_rustls::TlsAcceptor)>,
) -> std::io::Result<(Incoming, SocketAddr)> {
    let plain = async {
        match plain {
            Some(listener) => listener
                .accept()
                .await
                .map(|(socket, peer)| (Incoming::Plain(socket), peer)),
            None => std::future::pending().await,
        }
    };
    let tls = async {
        match tls {
            Some((listener, acceptor)) => listener
                .accept()
                .await
                .map(|(socket, peer)| (Incoming::Tls(socket, acceptor.clone()), peer)),
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        accepted = plain => accepted,
        accepted = tls => accepted,
    }
}

/// An accepted socket, of the plaintext or the TLS listener.
enum Incoming {
    Plain(tokio::net::TcpStream),
    /// TLS: the handshake is still to be done.
    Tls(tokio::net::TcpStream, tokio_rustls::TlsAcceptor),
}

impl Incoming {
    /// The connection's stream: for TLS, once the TLS handshake succeeded within `within`.
    async fn stream(self, peer: SocketAddr, within: Duration) -> Option<Stream> {
        // One deadline for the first byte and the TLS handshake together.
        let deadline = tokio::time::Instant::now() + within;
        match self {
            Incoming::Plain(socket) => Some(Stream::Plain(socket)),
            Incoming::Tls(socket, acceptor) => {
                // A TLS client speaks first with a handshake record (0x16). A Wharf client
                // that forgot TLS sends our preamble instead: it is told in plaintext, in a
                // `Close` it can show, rather than left with a dropped connection.
                let mut first = [0u8; 1];
                if let Ok(Ok(1)) = tokio::time::timeout_at(deadline, socket.peek(&mut first)).await
                    && first[0] == wharf_protocol::Preamble::CURRENT.encode()[0]
                {
                    info!(%peer, "plaintext client on the TLS port: refused");
                    let reason = "this port speaks TLS: connect with wharfs://".to_owned();
                    let _ = tokio::time::timeout(
                        REFUSAL_TIMEOUT,
                        crate::connection::refuse(
                            Stream::Plain(socket),
                            wharf_protocol::ErrorCode::ProtocolViolation,
                            reason,
                        ),
                    )
                    .await;
                    return None;
                }
                match tokio::time::timeout_at(deadline, acceptor.accept(socket)).await {
                    Ok(Ok(stream)) => Some(Stream::Tls(Box::new(stream))),
                    Ok(Err(err)) => {
                        // An untrusted or missing client certificate, plaintext on the TLS
                        // port, a scanner: the client learns it from its TLS stack.
                        info!(%peer, "TLS handshake failed: {err}");
                        None
                    }
                    Err(_) => {
                        debug!(%peer, "TLS handshake timed out");
                        None
                    }
                }
            }
        }
    }
}

/// Serves an accepted socket, or refuses it when the broker already holds its maximum of
/// sockets (`ResourceLimit` in a `Close` after the server's preamble, without reading; closed
/// at once if many refusals are under way): the descriptors kept for the log and the spools
/// are never handed to clients.
fn accept(
    shared: &Arc<Context>,
    connections: &mut JoinSet<()>,
    socket: Incoming,
    peer: SocketAddr,
) {
    use std::sync::atomic::Ordering;
    /// Uncounts a socket when its task ends (or is aborted).
    struct Counted(
        Arc<Context>,
        fn(&Context) -> &std::sync::atomic::AtomicUsize,
    );
    impl Drop for Counted {
        fn drop(&mut self) {
            (self.1)(&self.0).fetch_sub(1, Ordering::AcqRel);
        }
    }
    if shared.sockets.load(Ordering::Acquire) < shared.sockets_max {
        shared.sockets.fetch_add(1, Ordering::AcqRel);
        let counted = Counted(shared.clone(), |context| &context.sockets);
        let context = shared.clone();
        connections.spawn(async move {
            let _counted = counted;
            let within = context.config.handshake_timeout;
            if let Some(stream) = socket.stream(peer, within).await {
                crate::connection::serve(context, stream, peer).await;
            }
        });
        return;
    }
    if shared.refusing.fetch_add(1, Ordering::AcqRel) >= REFUSING_MAX {
        shared.refusing.fetch_sub(1, Ordering::AcqRel);
        debug!(%peer, "over the socket limit: closed");
        return;
    }
    let counted = Counted(shared.clone(), |context| &context.refusing);
    let max = shared.sockets_max;
    debug!(%peer, max, "over the socket limit: refused");
    connections.spawn(async move {
        let _counted = counted;
        let reason = format!("the server has its maximum of {max} connections");
        let _ = tokio::time::timeout(REFUSAL_TIMEOUT, async move {
            if let Some(stream) = socket.stream(peer, REFUSAL_TIMEOUT).await {
                crate::connection::refuse(stream, wharf_protocol::ErrorCode::ResourceLimit, reason)
                    .await;
            }
        })
        .await;
    });
}

/// A server running on a background task (for tests and embedding).
#[derive(Debug)]
pub struct RunningServer {
    /// Where it listens (the plaintext listener, or the TLS one when plaintext is off).
    pub addr: SocketAddr,
    /// Where its TLS listener listens, if it runs.
    pub tls_addr: Option<SocketAddr>,
    /// Stops it.
    pub shutdown: ShutdownHandle,
    /// Completes when it has stopped.
    pub task: tokio::task::JoinHandle<std::io::Result<()>>,
    /// Its users and their permissions: a change made here (an embedding program's
    /// administration) applies to new logins at once and to open connections from their
    /// next operation.
    pub users: Arc<crate::auth::Users>,
}

impl RunningServer {
    /// Binds and starts a server on the current tokio runtime.
    pub async fn start(config: ServerConfig) -> std::io::Result<RunningServer> {
        RunningServer::spawn(Server::bind(config).await?)
    }

    /// Binds and starts a server whose log lives on `storage` (e.g. the fault-injecting
    /// in-memory storage of the tests).
    pub async fn start_with_storage(
        config: ServerConfig,
        storage: Arc<dyn Storage>,
    ) -> std::io::Result<RunningServer> {
        RunningServer::spawn(Server::bind_with_storage(config, storage).await?)
    }

    fn spawn(server: Server) -> std::io::Result<RunningServer> {
        let addr = server.local_addr()?;
        let tls_addr = server.tls_local_addr();
        let shutdown = server.shutdown_handle();
        let users = server.shared.users.clone();
        let task = tokio::spawn(server.run());
        Ok(RunningServer {
            addr,
            tls_addr,
            shutdown,
            task,
            users,
        })
    }

    /// Shuts down gracefully and waits for the server to stop.
    pub async fn stop(self) -> std::io::Result<()> {
        self.shutdown.shutdown();
        self.task.await.map_err(std::io::Error::other)?
    }
}
