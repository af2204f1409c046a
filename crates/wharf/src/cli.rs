//! The `wharf` client subcommands (`declare`, `bind`, `delete`, `purge`, `publish`, `consume`,
//! `queues`, `exchanges`, `dlq`, `vhost`), built on `wharf-client`. Each opens one connection to `--server`
//! (env `WHARF_SERVER`, default `127.0.0.1:5800`), does its work and closes it.
//!
//! Errors go to stderr as `error: ...`; the exit code says what kind of error it was
//! ([`EXIT_CODES_HELP`] is the table shown by `wharf --help`).

use anyhow::Context as _;
use bytes::Bytes;
use clap::{ArgGroup, Args, Subcommand, ValueEnum};
use futures::stream::FuturesUnordered;
use futures::{FutureExt as _, StreamExt as _};
use std::fmt::Write as _;
use std::io::{self, BufRead as _, Write as _};
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::mpsc;
use wharf_client::{
    Client, ClientError, ClientOptions, ConsumeOptions, Credentials, Delivery, ErrorCode,
    ExchangeKind, HeadersMatch, Message, PREFETCH_MAX, Publisher, QueueInfo, TlsOptions, ValueRef,
};

/// Success.
pub const EXIT_OK: u8 = 0;
/// Any error not listed below (local I/O, an unexpected server error).
pub const EXIT_OTHER: u8 = 1;
/// Bad arguments: rejected by the command line parser, or a name / argument the server
/// rejected as invalid (`invalid_name`, `invalid_argument`).
pub const EXIT_USAGE: u8 = 2;
/// The connection could not be opened (refused, unreachable, handshake refused or timed out).
pub const EXIT_CONNECT: u8 = 3;
/// The queue, exchange or binding does not exist (`not_found`).
pub const EXIT_NOT_FOUND: u8 = 4;
/// The broker's state does not allow it (`precondition_failed`, `resource_locked`,
/// `access_refused`, `resource_limit`).
pub const EXIT_PRECONDITION: u8 = 5;
/// Some published messages were not confirmed (refused, queue full).
pub const EXIT_REFUSED: u8 = 6;
/// The connection broke, the server closed it, or the server did not answer in time.
pub const EXIT_CONNECTION: u8 = 7;
/// `wharf bench`: a message was lost, delivered twice without the redelivered flag, or
/// arrived malformed.
pub const EXIT_BENCH_CHECK: u8 = 8;

/// The exit code table, for `wharf --help`.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  success
  1  other error (local I/O, unexpected server error)
  2  bad arguments (usage error, or a name/argument the server rejects as invalid)
  3  cannot connect to the server
  4  not found (queue, exchange, binding)
  5  precondition failed (flags differ, queue in use or locked, access refused, server limit)
  6  publish refused: not every message was confirmed
  7  connection lost or closed by the server, or no answer in time
  8  bench: messages lost, duplicated or malformed";

/// An error to report: the message for stderr and the process's exit code.
#[derive(Debug)]
pub struct Failure {
    /// One of the `EXIT_*` constants.
    pub exit_code: u8,
    /// What went wrong, without the `error: ` prefix.
    pub message: String,
}

impl Failure {
    pub(crate) fn new(exit_code: u8, message: impl Into<String>) -> Failure {
        Failure {
            exit_code,
            message: message.into(),
        }
    }
}

impl From<ClientError> for Failure {
    fn from(err: ClientError) -> Failure {
        let exit_code = match &err {
            ClientError::Server { code, .. } => exit_code_for(*code),
            ClientError::InvalidAddress { .. }
            | ClientError::InvalidArgument { .. }
            | ClientError::Encode(_) => EXIT_USAGE,
            ClientError::Connect { .. }
            | ClientError::Tls { .. }
            | ClientError::Handshake { .. } => EXIT_CONNECT,
            // A refused login: the broker is there, this client may not use it.
            ClientError::ServerClosed {
                code: ErrorCode::AccessRefused,
                ..
            } => EXIT_CONNECT,
            ClientError::PublishRefused { .. }
            | ClientError::Backpressure { .. }
            | ClientError::Duplicate => EXIT_REFUSED,
            ClientError::ConsumerCancelled { code, .. } => exit_code_for(*code),
            ClientError::ConnectionLost(_)
            | ClientError::ServerClosed { .. }
            | ClientError::Protocol(_)
            | ClientError::Closed
            | ClientError::Timeout { .. } => EXIT_CONNECTION,
            _ => EXIT_OTHER,
        };
        let message = match &err {
            ClientError::Connect { addr, source } => {
                format!("cannot connect to {addr}: {}", io_detail(source))
            }
            // The server's text already names the entity ("queue 'orders' not found").
            ClientError::Server { message, .. } => message.clone(),
            other => other.to_string(),
        };
        Failure::new(exit_code, message)
    }
}

impl From<anyhow::Error> for Failure {
    fn from(err: anyhow::Error) -> Failure {
        Failure::new(EXIT_OTHER, format!("{err:#}"))
    }
}

impl From<io::Error> for Failure {
    fn from(err: io::Error) -> Failure {
        Failure::new(EXIT_OTHER, err.to_string())
    }
}

fn exit_code_for(code: ErrorCode) -> u8 {
    match code {
        ErrorCode::NotFound => EXIT_NOT_FOUND,
        ErrorCode::PreconditionFailed
        | ErrorCode::ResourceLocked
        | ErrorCode::AccessRefused
        | ErrorCode::ResourceLimit => EXIT_PRECONDITION,
        ErrorCode::InvalidName | ErrorCode::InvalidArgument => EXIT_USAGE,
        ErrorCode::Backpressure | ErrorCode::PublishRefused => EXIT_REFUSED,
        code if code.closes_connection() => EXIT_CONNECTION,
        _ => EXIT_OTHER,
    }
}

/// `connection refused` rather than `Connection refused (os error 111)`: the kind is what the
/// user needs; other errors (DNS failures) keep their own text.
fn io_detail(err: &io::Error) -> String {
    match err.kind() {
        io::ErrorKind::ConnectionRefused
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::TimedOut
        | io::ErrorKind::AddrNotAvailable
        | io::ErrorKind::HostUnreachable
        | io::ErrorKind::NetworkUnreachable => err.kind().to_string(),
        _ => err.to_string(),
    }
}

/// The broker to talk to.
#[derive(Debug, Clone, Args)]
pub struct ServerArg {
    /// Broker address: HOST:PORT, wharf://USER:PASSWORD@HOST:PORT/VHOST, or wharfs://... for
    /// TLS (credentials, port and virtual host optional; wharfs:// defaults to port 5801; a
    /// '/' in a virtual host's name is written %2F).
    #[arg(
        long = "server",
        value_name = "ADDR",
        env = "WHARF_SERVER",
        default_value = "127.0.0.1:5800",
        global = true
    )]
    pub(crate) server: String,
    /// TLS: CA certificates (PEM) the broker's certificate must chain to [default: the
    /// system's trusted roots].
    #[arg(long, value_name = "FILE", env = "WHARF_CA", global = true)]
    pub(crate) ca: Option<std::path::PathBuf>,
    /// TLS: a client certificate (PEM) to present, with --key.
    #[arg(
        long,
        value_name = "FILE",
        env = "WHARF_CERT",
        requires = "key",
        global = true
    )]
    pub(crate) cert: Option<std::path::PathBuf>,
    /// TLS: the client certificate's private key (PEM).
    #[arg(
        long,
        value_name = "FILE",
        env = "WHARF_KEY",
        requires = "cert",
        global = true
    )]
    pub(crate) key: Option<std::path::PathBuf>,
    /// Log in as the client certificate's subject (SASL EXTERNAL) instead of a password.
    #[arg(long, requires = "cert", global = true)]
    pub(crate) external: bool,
}

impl ServerArg {
    /// The client options these arguments ask for (TLS settings only with one given: a
    /// wharfs:// address alone uses the system's roots).
    fn options(&self, client_name: String) -> ClientOptions {
        let tls = (self.ca.is_some() || self.cert.is_some()).then(|| TlsOptions {
            ca_file: self.ca.clone(),
            cert_file: self.cert.clone(),
            key_file: self.key.clone(),
            server_name: None,
        });
        ClientOptions {
            client_name,
            connect_timeout: Duration::from_secs(10),
            tls,
            credentials: match self.external {
                true => Credentials::External,
                false => Credentials::Default,
            },
            ..ClientOptions::default()
        }
    }
}

/// The client subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Declare a queue or an exchange (idempotent; other flags than the existing ones fail).
    #[command(subcommand)]
    Declare(Declare),
    /// Bind a queue to an exchange.
    Bind(BindArgs),
    /// Delete a queue or an exchange.
    #[command(subcommand)]
    Delete(Delete),
    /// Drop every ready message of a queue (unacked ones stay).
    Purge(PurgeArgs),
    /// Publish messages (text, file, generated bytes or stdin lines) and wait for confirms.
    Publish(PublishArgs),
    /// Print messages from a queue, one per line (a peek unless --ack).
    Consume(ConsumeArgs),
    /// List the queues: name, durable, ready, delayed, unacked, consumers.
    Queues(ServerArg),
    /// List the exchanges: name, type, durable.
    Exchanges(ServerArg),
    /// Dead-letter queues: move dead-lettered messages back.
    #[command(subcommand)]
    Dlq(Dlq),
}

/// `wharf dlq ...`
#[derive(Debug, Subcommand)]
pub enum Dlq {
    /// Move the dead-lettered messages of QUEUE back to the queues they died in; prints how
    /// many moved.
    Redrive(RedriveArgs),
}

/// `wharf dlq redrive`
#[derive(Debug, Args)]
pub struct RedriveArgs {
    /// The dead-letter queue.
    queue: String,
    /// Move at most this many messages [default: all].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    max: Option<u64>,
    #[command(flatten)]
    server: ServerArg,
}

/// `wharf declare ...`
#[derive(Debug, Subcommand)]
pub enum Declare {
    /// Declare a queue.
    Queue(DeclareQueueArgs),
    /// Declare an exchange.
    Exchange(DeclareExchangeArgs),
}

/// `wharf declare queue`
#[derive(Debug, Args)]
pub struct DeclareQueueArgs {
    /// Queue name (empty: the server generates one, printed).
    name: String,
    /// Survive a broker restart.
    #[arg(long)]
    durable: bool,
    /// Usable only by this connection, deleted when it closes (so, when this command exits).
    #[arg(long)]
    exclusive: bool,
    /// Deleted when its last consumer cancels.
    #[arg(long)]
    auto_delete: bool,
    #[command(flatten)]
    server: ServerArg,
}

/// Exchange types.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Kind {
    /// Routing key equals the binding key.
    Direct,
    /// Every bound queue.
    Fanout,
    /// Dotted patterns (`*` one word, `#` zero or more).
    Topic,
    /// Message headers against binding headers (--match all|any).
    Headers,
}

impl From<Kind> for ExchangeKind {
    fn from(kind: Kind) -> ExchangeKind {
        match kind {
            Kind::Direct => ExchangeKind::Direct,
            Kind::Fanout => ExchangeKind::Fanout,
            Kind::Topic => ExchangeKind::Topic,
            Kind::Headers => ExchangeKind::Headers,
        }
    }
}

/// `wharf declare exchange`
#[derive(Debug, Args)]
pub struct DeclareExchangeArgs {
    /// Exchange name.
    name: String,
    /// Exchange type.
    #[arg(long, value_enum)]
    kind: Kind,
    /// Survive a broker restart.
    #[arg(long)]
    durable: bool,
    #[command(flatten)]
    server: ServerArg,
}

/// How a headers binding matches.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Match {
    /// Every header must match.
    All,
    /// At least one header must match.
    Any,
}

/// `wharf bind`
#[derive(Debug, Args)]
pub struct BindArgs {
    /// Source exchange.
    #[arg(long)]
    exchange: String,
    /// Destination queue.
    #[arg(long)]
    queue: String,
    /// Binding key (topic: a pattern).
    #[arg(long, default_value = "")]
    routing_key: String,
    /// Headers exchanges: a header to match, KEY=VALUE (string value); repeatable.
    #[arg(long = "header", value_name = "KEY=VALUE", value_parser = parse_header)]
    headers: Vec<(String, String)>,
    /// Headers exchanges: whether all or any of the headers must match.
    #[arg(long = "match", value_enum)]
    headers_match: Option<Match>,
    #[command(flatten)]
    server: ServerArg,
}

/// `wharf delete ...`
#[derive(Debug, Subcommand)]
pub enum Delete {
    /// Delete a queue and its messages.
    Queue(DeleteQueueArgs),
    /// Delete an exchange and its bindings.
    Exchange(DeleteExchangeArgs),
}

/// `wharf delete queue`
#[derive(Debug, Args)]
pub struct DeleteQueueArgs {
    /// Queue name.
    name: String,
    /// Fail if the queue has consumers.
    #[arg(long)]
    if_unused: bool,
    /// Fail if the queue has messages.
    #[arg(long)]
    if_empty: bool,
    #[command(flatten)]
    server: ServerArg,
}

/// `wharf delete exchange`
#[derive(Debug, Args)]
pub struct DeleteExchangeArgs {
    /// Exchange name.
    name: String,
    /// Fail if the exchange has bindings.
    #[arg(long)]
    if_unused: bool,
    #[command(flatten)]
    server: ServerArg,
}

/// `wharf purge`
#[derive(Debug, Args)]
pub struct PurgeArgs {
    /// Queue name.
    queue: String,
    #[command(flatten)]
    server: ServerArg,
}

/// `wharf publish`
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("source").args(["body", "file", "size"])))]
pub struct PublishArgs {
    /// Exchange ("" is the default exchange: routes to the queue named by the routing key).
    #[arg(long, default_value = "")]
    exchange: String,
    /// Routing key.
    #[arg(long)]
    routing_key: String,
    /// Mark the messages persistent.
    #[arg(long)]
    persistent: bool,
    /// A message header KEY=VALUE (string value); repeatable.
    #[arg(long = "header", value_name = "KEY=VALUE", value_parser = parse_header)]
    headers: Vec<(String, String)>,
    /// Message body (text). Without --body, --file or --size, each stdin line is one message.
    #[arg(long)]
    body: Option<String>,
    /// Message body: the contents of this file.
    #[arg(long, value_name = "PATH")]
    file: Option<PathBuf>,
    /// Message body: this many bytes (a repeated pattern).
    #[arg(long, value_name = "BYTES")]
    size: Option<usize>,
    /// Publish the body this many times (with --body, --file or --size) [default: 1].
    #[arg(long, requires = "source", value_parser = clap::value_parser!(u64).range(1..))]
    count: Option<u64>,
    #[command(flatten)]
    server: ServerArg,
}

/// `wharf consume`
#[derive(Debug, Args)]
pub struct ConsumeArgs {
    /// Queue name.
    queue: String,
    /// Stop after this many messages.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    count: Option<u64>,
    /// Ack each message after printing it. Without --ack nothing is acked: the messages go
    /// back to the queue (flagged redelivered) when the command exits, like a peek.
    #[arg(long)]
    ack: bool,
    /// Most unacked messages in flight [default: --count, at most 65536, else 100]. Without
    /// --ack it is also the most messages a peek can show.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=i64::from(PREFETCH_MAX)))]
    prefetch: Option<u32>,
    /// Stop after SECS (fractions allowed) without a message, exit 0.
    #[arg(long, value_name = "SECS", value_parser = parse_seconds)]
    timeout: Option<Duration>,
    /// One JSON object per line with the message's metadata and body.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    server: ServerArg,
}

fn parse_header(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got {text:?}")),
    }
}

/// Parses a (fractional) number of seconds, for the duration flags of the CLI and of
/// `wharf bench`.
pub(crate) fn parse_seconds(text: &str) -> Result<Duration, String> {
    let seconds: f64 = text
        .parse()
        .map_err(|_| format!("expected seconds, got {text:?}"))?;
    Duration::try_from_secs_f64(seconds).map_err(|err| format!("{text:?}: {err}"))
}

/// Runs a client subcommand.
pub async fn run(command: Command) -> Result<(), Failure> {
    match command {
        Command::Declare(Declare::Queue(args)) => declare_queue(args).await,
        Command::Declare(Declare::Exchange(args)) => declare_exchange(args).await,
        Command::Bind(args) => bind(args).await,
        Command::Delete(Delete::Queue(args)) => delete_queue(args).await,
        Command::Delete(Delete::Exchange(args)) => delete_exchange(args).await,
        Command::Purge(args) => purge(args).await,
        Command::Publish(args) => publish(args).await,
        Command::Consume(args) => consume(args).await,
        Command::Queues(server) => list_queues(server).await,
        Command::Exchanges(server) => list_exchanges(server).await,
        Command::Dlq(Dlq::Redrive(args)) => redrive(args).await,
    }
}

async fn connect(server: &ServerArg) -> Result<Client, Failure> {
    connect_as(
        server,
        concat!("wharf-cli/", env!("CARGO_PKG_VERSION")).to_owned(),
    )
    .await
}

/// Connects to the broker at `server` as `client_name`, for the CLI and for `wharf bench`;
/// every failure but a usage error (a bad address) exits with [`EXIT_CONNECT`].
pub(crate) async fn connect_as(server: &ServerArg, client_name: String) -> Result<Client, Failure> {
    let options = server.options(client_name);
    Client::connect_with(&server.server, options)
        .await
        .map_err(|err| {
            let mut failure = Failure::from(err);
            if failure.exit_code != EXIT_USAGE {
                // Whatever broke during the handshake, the command never got a connection.
                failure.exit_code = EXIT_CONNECT;
            }
            failure
        })
}

/// Runs `work` on a fresh connection, then closes it (also after an error).
pub(crate) async fn with_client<T>(
    server: &ServerArg,
    work: impl AsyncFnOnce(&Client) -> Result<T, Failure>,
) -> Result<T, Failure> {
    let client = connect(server).await?;
    let result = work(&client).await;
    let _ = client.close().await;
    result
}

pub(crate) fn print(line: impl std::fmt::Display) -> Result<(), Failure> {
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "{line}")?;
    Ok(())
}

async fn declare_queue(args: DeclareQueueArgs) -> Result<(), Failure> {
    with_client(&args.server, async |client| {
        let declared = client
            .declare_queue(&args.name)
            .durable(args.durable)
            .exclusive(args.exclusive)
            .auto_delete(args.auto_delete)
            .await?;
        print(format_args!(
            "declared queue {} (ready {}, consumers {})",
            declared.name, declared.ready, declared.consumers
        ))
    })
    .await
}

async fn declare_exchange(args: DeclareExchangeArgs) -> Result<(), Failure> {
    with_client(&args.server, async |client| {
        client
            .declare_exchange(&args.name, args.kind.into())
            .durable(args.durable)
            .await?;
        print(format_args!(
            "declared exchange {} ({})",
            args.name,
            kind_name(args.kind.into())
        ))
    })
    .await
}

async fn bind(args: BindArgs) -> Result<(), Failure> {
    with_client(&args.server, async |client| {
        let mut binding = client.bind_queue(&args.queue, &args.exchange, &args.routing_key);
        if let Some(headers_match) = args.headers_match {
            binding = binding.headers_match(match headers_match {
                Match::All => HeadersMatch::All,
                Match::Any => HeadersMatch::Any,
            });
        }
        for (key, value) in &args.headers {
            binding = binding.argument(key, value.as_str());
        }
        binding.await?;
        print(format_args!(
            "bound queue {} to exchange {} with routing key {:?}",
            args.queue, args.exchange, args.routing_key
        ))
    })
    .await
}

async fn delete_queue(args: DeleteQueueArgs) -> Result<(), Failure> {
    with_client(&args.server, async |client| {
        let n_messages = client
            .delete_queue(&args.name)
            .if_unused(args.if_unused)
            .if_empty(args.if_empty)
            .await?;
        print(format_args!(
            "deleted queue {} ({n_messages} messages dropped)",
            args.name
        ))
    })
    .await
}

async fn delete_exchange(args: DeleteExchangeArgs) -> Result<(), Failure> {
    with_client(&args.server, async |client| {
        client
            .delete_exchange(&args.name)
            .if_unused(args.if_unused)
            .await?;
        print(format_args!("deleted exchange {}", args.name))
    })
    .await
}

async fn redrive(args: RedriveArgs) -> Result<(), Failure> {
    with_client(&args.server, async |client| {
        let n_moved = client.redrive(&args.queue, args.max.unwrap_or(0)).await?;
        print(format_args!(
            "moved {n_moved} messages from {} back to their queues",
            args.queue
        ))
    })
    .await
}

async fn purge(args: PurgeArgs) -> Result<(), Failure> {
    with_client(&args.server, async |client| {
        let n_messages = client.purge_queue(&args.queue).await?;
        print(format_args!(
            "purged {n_messages} messages from queue {}",
            args.queue
        ))
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Publishing.

/// Most messages handed to one `publish_batch` call (it splits further at the server's limit).
const CHUNK_MESSAGES_MAX: usize = 1_000;
/// Most body bytes in one chunk, so `--size` with large bodies stays a bounded batch.
const CHUNK_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Chunks published concurrently: keeps the connection busy while confirms come back.
const CHUNKS_IN_FLIGHT_MAX: usize = 8;

/// The message template: everything but the body.
#[derive(Clone)]
struct Template {
    persistent: bool,
    headers: Vec<(String, String)>,
}

impl Template {
    fn message(&self, body: Bytes) -> Message {
        let mut message = Message::new(body).persistent(self.persistent);
        for (key, value) in &self.headers {
            message = message.header(key.clone(), value.as_str());
        }
        message
    }
}

async fn publish(args: PublishArgs) -> Result<(), Failure> {
    let template = Template {
        persistent: args.persistent,
        headers: args.headers.clone(),
    };
    // Connect before building or reading any body, so a wrong address fails at once and a
    // body is checked against the server's frame limit before it is allocated.
    let client = connect(&args.server).await?;
    let body_bytes_max = body_bytes_max(&client, &args);
    let fixed_body = if let Some(body) = &args.body {
        check_body_size(body.len() as u64, body_bytes_max)?;
        Some(Bytes::from(body.clone()))
    } else if let Some(path) = &args.file {
        let len = std::fs::metadata(path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .len();
        check_body_size(len, body_bytes_max)?;
        let contents =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        Some(Bytes::from(contents))
    } else if let Some(size) = args.size {
        check_body_size(size as u64, body_bytes_max)?;
        Some(Bytes::from(
            (0..size)
                .map(|idx| b'a' + (idx % 26) as u8)
                .collect::<Vec<u8>>(),
        ))
    } else {
        None
    };
    let (chunk_sender, chunks) = mpsc::channel::<Vec<Message>>(CHUNKS_IN_FLIGHT_MAX);
    let producer = match fixed_body {
        Some(body) => {
            let count = args.count.unwrap_or(1);
            tokio::spawn(async move {
                repeat_chunks(body, count, &template, chunk_sender).await;
                Ok(())
            })
        }
        None => tokio::task::spawn_blocking(move || stdin_chunks(&template, &chunk_sender)),
    };
    let publisher = client.publisher();
    let result = publish_chunks(&publisher, &args.exchange, &args.routing_key, chunks).await;
    let _ = client.close().await;
    let tally = result?;
    producer
        .await
        .context("the message producer failed")?
        .context("cannot read stdin")?;
    print(format_args!(
        "published {}, confirmed {}",
        tally.n_published, tally.n_confirmed
    ))?;
    match tally.first_refusal {
        None => Ok(()),
        Some(err) => Err(Failure::new(
            EXIT_REFUSED,
            format!(
                "{} of {} messages not confirmed, first: {err}",
                tally.n_published - tally.n_confirmed,
                tally.n_published
            ),
        )),
    }
}

/// Bytes a publish frame takes besides the body, at most, for the names and headers given:
/// the frame's fixed fields and the properties' own encoding fit in the margin.
const PUBLISH_FRAME_MARGIN_BYTES: u64 = 1024;

/// The largest body the server takes in one publish from this command: its frame limit
/// less the exchange, routing key, headers and a margin for the rest of the frame.
fn body_bytes_max(client: &Client, args: &PublishArgs) -> u64 {
    let headers: usize = args
        .headers
        .iter()
        .map(|(key, value)| key.len() + value.len() + 16)
        .sum();
    let named = args.exchange.len() + args.routing_key.len() + headers;
    u64::from(client.server_limits().frame_bytes_max)
        .saturating_sub(named as u64 + PUBLISH_FRAME_MARGIN_BYTES)
}

/// Refuses a body the server could never take, before anything is built or sent.
fn check_body_size(len: u64, body_bytes_max: u64) -> Result<(), Failure> {
    if len > body_bytes_max {
        return Err(Failure::new(
            EXIT_USAGE,
            format!(
                "a body of {len} bytes is too large: the server takes bodies of at most \
                 {body_bytes_max} bytes in one message (its frame limit less the names, \
                 headers and framing); nothing was published"
            ),
        ));
    }
    Ok(())
}

async fn repeat_chunks(
    body: Bytes,
    count: u64,
    template: &Template,
    chunks: mpsc::Sender<Vec<Message>>,
) {
    let chunk_messages = (CHUNK_BYTES_MAX / body.len().max(1)).clamp(1, CHUNK_MESSAGES_MAX);
    let mut n_left = count;
    while n_left > 0 {
        let n_chunk = n_left.min(chunk_messages as u64);
        let chunk = (0..n_chunk)
            .map(|_| template.message(body.clone()))
            .collect();
        if chunks.send(chunk).await.is_err() {
            return;
        }
        n_left -= n_chunk;
    }
}

/// Reads stdin lines (without their `\n` or `\r\n`; any bytes) into chunks of messages.
fn stdin_chunks(template: &Template, chunks: &mpsc::Sender<Vec<Message>>) -> io::Result<()> {
    let mut stdin = io::stdin().lock();
    let mut chunk = Vec::new();
    let mut chunk_bytes = 0;
    loop {
        let mut line = Vec::new();
        if stdin.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        if line.last() == Some(&b'\n') {
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
        }
        chunk_bytes += line.len();
        chunk.push(template.message(Bytes::from(line)));
        if chunk.len() >= CHUNK_MESSAGES_MAX || chunk_bytes >= CHUNK_BYTES_MAX {
            chunk_bytes = 0;
            if chunks.blocking_send(std::mem::take(&mut chunk)).is_err() {
                return Ok(());
            }
        }
    }
    if !chunk.is_empty() {
        let _ = chunks.blocking_send(chunk);
    }
    Ok(())
}

struct Tally {
    n_published: u64,
    n_confirmed: u64,
    first_refusal: Option<ClientError>,
}

/// Publishes every chunk, up to [`CHUNKS_IN_FLIGHT_MAX`] at once under the publisher's
/// confirm window, and counts the outcomes.
async fn publish_chunks(
    publisher: &Publisher,
    exchange: &str,
    routing_key: &str,
    mut chunks: mpsc::Receiver<Vec<Message>>,
) -> Result<Tally, Failure> {
    let mut tally = Tally {
        n_published: 0,
        n_confirmed: 0,
        first_refusal: None,
    };
    let mut in_flight = FuturesUnordered::new();
    let mut source_done = false;
    loop {
        tokio::select! {
            chunk = chunks.recv(), if !source_done && in_flight.len() < CHUNKS_IN_FLIGHT_MAX => {
                match chunk {
                    Some(chunk) => in_flight.push(publisher.publish_batch(exchange, routing_key, chunk)),
                    None => source_done = true,
                }
            }
            Some(outcomes) = in_flight.next(), if !in_flight.is_empty() => {
                let outcomes = match outcomes {
                    Ok(outcomes) => outcomes,
                    Err(err) => {
                        // Nothing of this chunk was sent: the connection is over.
                        let _ = print(format_args!(
                            "published {}, confirmed {}",
                            tally.n_published, tally.n_confirmed
                        ));
                        return Err(err.into());
                    }
                };
                for outcome in outcomes {
                    tally.n_published += 1;
                    match outcome {
                        Ok(_) => tally.n_confirmed += 1,
                        Err(err) => {
                            tally.first_refusal.get_or_insert(err);
                        }
                    }
                }
            }
            else => break,
        }
    }
    Ok(tally)
}

// ---------------------------------------------------------------------------------------------
// Consuming.

/// Default prefetch without `--count`.
const PREFETCH_DEFAULT: u32 = 100;

async fn consume(args: ConsumeArgs) -> Result<(), Failure> {
    let prefetch = match (args.prefetch, args.count) {
        (Some(prefetch), _) => prefetch,
        (None, Some(count)) => u32::try_from(count).unwrap_or(u32::MAX).min(PREFETCH_MAX),
        (None, None) => PREFETCH_DEFAULT,
    };
    if !args.ack
        && let Some(count) = args.count.filter(|count| *count > u64::from(prefetch))
    {
        return Err(Failure::new(
            EXIT_USAGE,
            format!(
                "without --ack at most --prefetch ({prefetch}) messages can be shown, \
                     but --count is {count}: raise --prefetch (at most {PREFETCH_MAX}) or use --ack"
            ),
        ));
    }
    with_client(&args.server, async |client| {
        let options = ConsumeOptions {
            prefetch,
            ..ConsumeOptions::default()
        };
        let mut consumer = client.consume(&args.queue, options).await?;
        let mut out = io::BufWriter::new(io::stdout());
        let mut n_printed = 0_u64;
        while args.count.is_none_or(|count| n_printed < count) {
            let next = match consumer.next().now_or_never() {
                Some(next) => next,
                None => {
                    // Nothing ready: show what we have before waiting.
                    out.flush()?;
                    match args.timeout {
                        Some(idle) => match tokio::time::timeout(idle, consumer.next()).await {
                            Ok(next) => next,
                            Err(_) => break,
                        },
                        None => consumer.next().await,
                    }
                }
            };
            let delivery = match next {
                Some(delivery) => delivery?,
                None => break,
            };
            if args.json {
                writeln!(out, "{}", delivery_json(&delivery))?;
            } else {
                writeln!(out, "{}", body_text(delivery.body()))?;
            }
            if args.ack {
                // Printed (and flushed) first: at-least-once.
                out.flush()?;
                delivery.ack().await?;
            }
            n_printed += 1;
        }
        out.flush()?;
        // Dropping the consumer cancels it: the broker requeues what was not acked.
        drop(consumer);
        Ok(())
    })
    .await
}

/// The body as one line: the text if it is UTF-8 without line breaks, else `hex:` + hex.
fn body_text(body: &[u8]) -> String {
    match std::str::from_utf8(body) {
        Ok(text) if !text.contains(['\n', '\r']) => text.to_owned(),
        _ => format!("hex:{}", hex(body)),
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(out, "{byte:02x}");
    }
    out
}

/// One delivery as a JSON object. `body` is the text when the body is UTF-8
/// (`body_encoding: "utf-8"`), else its hex (`body_encoding: "hex"`).
fn delivery_json(delivery: &Delivery) -> serde_json::Value {
    use serde_json::{Value, json};
    let properties = delivery.properties();
    let headers: serde_json::Map<String, Value> = properties
        .headers_iter()
        .map(|(key, value)| (key.to_owned(), value_json(value)))
        .collect();
    let (body, body_encoding) = match std::str::from_utf8(delivery.body()) {
        Ok(text) => (text.to_owned(), "utf-8"),
        Err(_) => (hex(delivery.body()), "hex"),
    };
    let timestamp_ms = properties.timestamp_ms();
    json!({
        "exchange": delivery.exchange(),
        "routing_key": delivery.routing_key(),
        "delivery_tag": delivery.delivery_tag(),
        "redelivered": delivery.redelivered(),
        "delivery_count": delivery.delivery_count(),
        "message_id": properties.message_id(),
        "correlation_id": properties.correlation_id(),
        "reply_to": properties.reply_to(),
        "content_type": properties.content_type(),
        "content_encoding": properties.content_encoding(),
        "priority": properties.priority(),
        "persistent": properties.persistent(),
        "timestamp_ms": (timestamp_ms != 0).then_some(timestamp_ms),
        "expiration_ms": properties.expiration_ms(),
        "headers": headers,
        "body_bytes": delivery.body().len(),
        "body_encoding": body_encoding,
        "body": body,
    })
}

fn value_json(value: ValueRef<'_>) -> serde_json::Value {
    use serde_json::Value;
    match value {
        ValueRef::Str(text) => Value::from(text),
        ValueRef::I64(number) => Value::from(number),
        ValueRef::F64(number) => Value::from(number),
        ValueRef::Bool(flag) => Value::from(flag),
        ValueRef::Bytes(bytes) => Value::from(format!("hex:{}", hex(bytes))),
        ValueRef::List(list) => Value::Array(list.iter().map(value_json).collect()),
        ValueRef::Map(map) => Value::Object(
            map.iter()
                .map(|(key, item)| (key.to_owned(), value_json(item)))
                .collect(),
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// Listing.

async fn list_queues(server: ServerArg) -> Result<(), Failure> {
    with_client(&server, async |client| {
        // A 1.0 server has no delayed messages to count: its column shows `-`.
        let mut queues: Vec<(QueueInfo, Option<u64>)> = match client.list_queues_v2().await {
            Ok(queues) => queues
                .into_iter()
                .map(|queue| {
                    let delayed = queue.delayed;
                    (QueueInfo::from(queue), Some(delayed))
                })
                .collect(),
            Err(ClientError::NotSupported { .. }) => client
                .list_queues()
                .await?
                .into_iter()
                .map(|queue| (queue, None))
                .collect(),
            Err(err) => return Err(err.into()),
        };
        queues.sort_by(|(left, _), (right, _)| left.name.cmp(&right.name));
        let rows = queues
            .iter()
            .map(|(queue, delayed)| {
                vec![
                    queue.name.clone(),
                    yes_no(queue.durable).to_owned(),
                    queue.ready.to_string(),
                    delayed.map_or_else(|| "-".to_owned(), |delayed| delayed.to_string()),
                    queue.unacked.to_string(),
                    queue.consumers.to_string(),
                ]
            })
            .collect::<Vec<_>>();
        print_table(
            &[
                "name",
                "durable",
                "ready",
                "delayed",
                "unacked",
                "consumers",
            ],
            &[false, false, true, true, true, true],
            &rows,
        )
    })
    .await
}

async fn list_exchanges(server: ServerArg) -> Result<(), Failure> {
    with_client(&server, async |client| {
        let mut exchanges = client.list_exchanges().await?;
        exchanges.sort_by(|left, right| left.name.cmp(&right.name));
        let rows = exchanges
            .iter()
            .map(|exchange| {
                let name = if exchange.name.is_empty() {
                    "(default)".to_owned()
                } else {
                    exchange.name.clone()
                };
                vec![
                    name,
                    kind_name(exchange.kind).to_owned(),
                    yes_no(exchange.durable).to_owned(),
                ]
            })
            .collect::<Vec<_>>();
        print_table(&["name", "type", "durable"], &[false, false, false], &rows)
    })
    .await
}

fn yes_no(flag: bool) -> &'static str {
    if flag { "yes" } else { "no" }
}

/// The name of an exchange kind, as the flags and listings spell it.
pub(crate) fn kind_name(kind: ExchangeKind) -> &'static str {
    match kind {
        ExchangeKind::Direct => "direct",
        ExchangeKind::Fanout => "fanout",
        ExchangeKind::Topic => "topic",
        ExchangeKind::Headers => "headers",
    }
}

/// A limit in a table: its number, or `-` for no limit.
pub(crate) fn limit_cell(limit: Option<u32>) -> String {
    limit.map_or_else(|| "-".to_owned(), |n| n.to_string())
}

/// Prints `rows` under `header`, columns separated by two spaces, each as wide as its widest
/// cell; numeric columns (`right_aligned`) aligned right.
pub(crate) fn print_table(
    header: &[&str],
    right_aligned: &[bool],
    rows: &[Vec<String>],
) -> Result<(), Failure> {
    let widths: Vec<usize> = (0..header.len())
        .map(|column| {
            rows.iter()
                .map(|row| row[column].chars().count())
                .chain(std::iter::once(header[column].len()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = io::BufWriter::new(io::stdout().lock());
    let header: Vec<String> = header.iter().map(|cell| cell.to_uppercase()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (column, cell) in row.iter().enumerate() {
            if column > 0 {
                line.push_str("  ");
            }
            let width = widths[column];
            if right_aligned[column] {
                let _ = write!(line, "{cell:>width$}");
            } else {
                let _ = write!(line, "{cell:<width$}");
            }
        }
        writeln!(out, "{}", line.trim_end())?;
    }
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_text_is_the_text_when_it_fits_on_one_line_else_hex() {
        assert_eq!(body_text(b"hello world"), "hello world");
        assert_eq!(body_text(b"two\nlines"), "hex:74776f0a6c696e6573");
        assert_eq!(body_text(&[0xff, 0x00]), "hex:ff00");
    }

    #[test]
    fn headers_parse_as_key_equals_value() {
        assert_eq!(
            parse_header("a=b=c"),
            Ok(("a".to_owned(), "b=c".to_owned()))
        );
        assert!(parse_header("novalue").is_err());
        assert!(parse_header("=x").is_err());
    }

    #[test]
    fn server_error_codes_map_to_distinct_exit_codes() {
        let server = |code| {
            Failure::from(ClientError::Server {
                code,
                message: "m".into(),
            })
        };
        assert_eq!(server(ErrorCode::NotFound).exit_code, EXIT_NOT_FOUND);
        assert_eq!(
            server(ErrorCode::PreconditionFailed).exit_code,
            EXIT_PRECONDITION
        );
        assert_eq!(server(ErrorCode::InvalidName).exit_code, EXIT_USAGE);
        assert_eq!(server(ErrorCode::NotFound).message, "m");
    }
}
