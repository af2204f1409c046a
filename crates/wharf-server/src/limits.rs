//! Server-side limits, each with the reason it exists. The config file may override some.

use std::time::Duration;

/// What a message costs beyond its body in the server's size estimates (log bytes kept alive,
/// checkpoint sizes, a connection's queued output, delivery batching): its metadata and
/// bookkeeping, bounded and small next to most bodies.
pub const MESSAGE_OVERHEAD_BYTES: usize = 64;

/// Open connections: each costs buffers and a task pair; 10 k idle fit in ~200 MB.
pub const CONNECTIONS_MAX: usize = 20_000;
/// The memory alarm's default threshold, as a fraction of the machine's memory (RabbitMQ's
/// `vm_memory_high_watermark.relative`): a broker must not be pushed into swap or the OOM
/// killer by producers outrunning consumers, and the rest is the page cache's and the
/// allocator's slack.
pub const MEMORY_HIGH_WATERMARK_FRACTION: f64 = 0.4;
/// Free disk space below which persistent publishes are refused (RabbitMQ's default
/// `disk_free_limit`): the log must never meet a full disk, which would stop the broker.
pub const DISK_FREE_LIMIT_BYTES: u64 = 50_000_000;
/// How often the resource monitor reads the broker's resident memory and the disk's free
/// space: a publisher at 500 MB/s writes 50 MB between two looks.
pub const RESOURCE_CHECK_INTERVAL: Duration = Duration::from_millis(100);
/// A frame that has begun must arrive whole within this much reading time: a peer trickling a
/// byte every few seconds would otherwise pin a partial frame's buffer forever. 16 MiB (the
/// largest frame) at 2 Mbit/s takes about 67 s.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(120);
/// A connection whose socket takes nothing for this long while output waits is closed as a
/// slow consumer (NATS closes at its 10 s write deadline; a stopped process never recovers,
/// and a long GC pause or a paused container should not lose its connection).
pub const SLOW_CONSUMER_TIMEOUT: Duration = Duration::from_secs(30);
/// Ready messages a durable queue keeps in memory before later arrivals are paged to its spool
/// file: about 30 MB of 100-byte messages with their bookkeeping, so a backlog of tens of
/// millions stays within a few hundred MB, while ordinary queues never touch a spool.
pub const QUEUE_MEMORY_MESSAGES: usize = 100_000;
/// Body bytes of ready messages a durable queue keeps in memory before later arrivals are
/// paged: large messages page early (1,600 of 40 KiB), so a backlog of them cannot fill memory
/// either.
pub const QUEUE_MEMORY_BYTES: u64 = 64 * 1024 * 1024;
/// Paged records sealed for the pager task to write and not yet being written, across every
/// spool: past this the page-out writes them itself, under the broker lock (as before the
/// pager wrote them), so a pager falling behind a fast publisher cannot grow memory (a 10 M
/// priority-queue backlog peaked 40–80 MB higher without this bound).
pub const SPOOL_UNWRITTEN_BYTES_MAX: usize = 8 * 1024 * 1024;
/// Spool files open at once (each holds a descriptor for its tail's life): half of the
/// descriptors kept out of the connections' reach (`resources::FDS_RESERVED`), so that
/// clients paging thousands of queues cannot take the log's. A tail past it keeps its
/// records in memory (the memory alarm bounds them) until another tail's file closes.
pub const SPOOL_FILES_OPEN_MAX: usize = 64;
/// Publisher flow control: a publisher is paused while a queue it publishes to holds more
/// ready messages than this and its consumers keep up with it (they drain it, only more slowly
/// than it is filled). A short backlog keeps the entries and bodies in cache and the broker's memory
/// reused; a deep one only adds latency. S1 (one producer, one consumer, 100-byte messages)
/// delivered 1.57–1.62 M msgs/s with 65,536, 1.66 M with 16,384, 1.80–1.99 M with 4,096 down
/// to 256; at 1.8 M msgs/s the resume point (2,048) still leaves the consumers 1 ms of work
/// while the publisher is woken.
pub const FLOW_READY_MESSAGES: u64 = 4_096;
/// The same in body bytes (4 MiB: 1,024 bodies of 4 KiB).
pub const FLOW_READY_BYTES: u64 = 4 * 1024 * 1024;
/// A held publisher stays held only while the queue's consumers keep up: every window, they
/// must have taken enough to bring the queue to its resume level within the horizon at that
/// pace (a stream whose producer is merely faster). Slower consumers (a job queue's workers)
/// release it ...
pub const FLOW_WINDOW: Duration = Duration::from_millis(10);
/// See [`FLOW_WINDOW`].
pub const FLOW_DRAIN_HORIZON: Duration = Duration::from_millis(100);
/// ... and their queue does not hold that publisher again for this long: a producer filling a
/// job queue loses at most one window per backoff (1%).
pub const FLOW_SLOW_BACKOFF: Duration = Duration::from_secs(1);
/// A held publisher resumes when the queue is down to this percentage of the flow limits.
pub const FLOW_RESUME_PERCENT: u64 = 50;
/// Publishers resume once ready bytes fall below this fraction of the high watermark.
pub const READY_BYTES_LOW_WATERMARK_PERCENT: u64 = 80;
/// Outbound bytes queued for one connection before its reader stops reading: a client that
/// does not read its responses cannot make the broker buffer without bound.
pub const OUTBOX_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Time for a new connection to complete the handshake; idle sockets do not pin resources.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest user name (bytes), as RabbitMQ's short strings.
pub const USER_NAME_BYTES_MAX: usize = 255;
/// Longest password (bytes): bounds the KDF's input.
pub const PASSWORD_BYTES_MAX: usize = 1024;
/// Users at most: each is an entry of a file rewritten on every change.
pub const USERS_MAX: usize = 10_000;
/// Longest permission pattern (bytes): a regular expression compiled per connection.
pub const PERMISSION_PATTERN_BYTES_MAX: usize = 1024;
/// Memory one compiled permission pattern may take (the regex crate's size limit): a pattern
/// such as `a{1000}{1000}` is refused when set instead of costing every connection megabytes.
pub const PERMISSION_REGEX_BYTES_MAX: usize = 256 * 1024;
/// Topic-permission exchanges per user per virtual host at most.
pub const TOPIC_PERMISSIONS_MAX: usize = 1024;
/// Permission answers a connection remembers (per resource and kind of access); past it the
/// cache starts afresh, so a client naming ever new resources costs bounded memory.
pub const ACCESS_CACHE_ENTRIES_MAX: usize = 4096;
/// Password checks running at once at most (each runs argon2id: tens of ms of CPU and
/// 19 MiB): a flood of `Hello`s queues for these instead of filling the blocking pool that
/// spool writes and page-ins need. Waiting logins stay bounded by the socket cap and the
/// handshake deadline.
pub const KDF_CONCURRENCY_MAX: usize = 4;
/// A refused login is answered this long after its `Hello` (a constant: the timing tells
/// nothing, and a password guesser gets two tries a second per connection).
pub const AUTH_FAILURE_DELAY: Duration = Duration::from_millis(500);
/// Time graceful shutdown waits for connections to flush their `Close`.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
/// Initial read buffer: small so that idle connections stay cheap; it grows with traffic.
pub const READ_BUFFER_BYTES: usize = 4 * 1024;
/// Output a reader writes to a connection's socket itself, right after its batch, instead of
/// waking that connection's writer task: a message at low rates (its delivery, its confirm)
/// then takes no extra task, and often no second worker thread, on its way; bulk output stays
/// with the writer tasks so that readers and writers share the CPUs.
pub const INLINE_WRITE_BYTES_MAX: usize = 8 * 1024;
/// Bytes encoded before the writer flushes to the socket mid-batch.
pub const WRITE_CHUNK_BYTES: usize = 256 * 1024;
