//! Every limit of the core in one place, each with the reason it exists. The server may
//! override them through [`Limits`].

/// Names are AMQP short strings: 255 bytes keeps them cheap to hash, log and put on the wire.
pub const NAME_BYTES_MAX: usize = 255;
/// Routing keys are short strings too; topic matching cost grows with their word count.
pub const ROUTING_KEY_BYTES_MAX: usize = 255;
/// Queues per broker: each costs memory and a slot in every listing.
pub const QUEUES_MAX: usize = 100_000;
/// Exchanges declared per broker (the built-in ones of each virtual host not counted), for
/// the same reason.
pub const EXCHANGES_MAX: usize = 10_000;
/// Virtual hosts per broker: each holds its own built-in exchanges and a slot in every listing.
pub const VHOSTS_MAX: usize = 1_024;
/// Bindings per exchange: the headers exchange matches each one per message.
pub const BINDINGS_PER_EXCHANGE_MAX: usize = 100_000;
/// Consumers per queue: dispatch scans consumers when choosing the next one.
pub const CONSUMERS_PER_QUEUE_MAX: usize = 10_000;
/// Consumers per connection: each holds a slot in the connection's consumer map and is
/// cancelled one by one when the connection closes, so one client cannot take them all.
pub const CONSUMERS_PER_CONNECTION_MAX: usize = 10_000;
/// Nesting depth of header values (lists and maps): bounds recursion when comparing.
pub const HEADER_DEPTH_MAX: usize = 16;
/// Hops through exchange-to-exchange bindings: bounds routing work per message.
pub const EXCHANGE_HOPS_MAX: usize = 16;
/// Dead letters republished by one command; further ones are dropped. Each can drop (and so
/// dead-letter) others from full queues, so a pathological topology could otherwise make one
/// command's work grow combinatorially.
pub const DEAD_LETTERS_PER_COMMAND_MAX: usize = 10_000;

/// Longest delay, TTL, expiry or window accepted: about 10 years, so that deadlines never
/// overflow.
pub const DURATION_MS_MAX: u64 = 10 * 366 * 24 * 3600 * 1000;
/// Most steps in a retry schedule.
pub const RETRY_STEPS_MAX: usize = 64;
/// Distinct queues [`crate::Broker::take_routed`] reports at most (a publish fanning out wider
/// is watched through its first ones).
pub const ROUTED_TRACKED_MAX: usize = 64;

/// Ready messages a pageable queue keeps in memory by default in the core: 0, never page (the
/// server sets its own default, see [`Limits::paging_threshold`]).
pub const PAGING_THRESHOLD_DEFAULT: usize = 0;

/// The limits in force in one broker; `Limits::default()` uses the constants of this module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// See [`QUEUES_MAX`].
    pub queues_max: usize,
    /// See [`EXCHANGES_MAX`].
    pub exchanges_max: usize,
    /// See [`VHOSTS_MAX`].
    pub vhosts_max: usize,
    /// See [`BINDINGS_PER_EXCHANGE_MAX`].
    pub bindings_per_exchange_max: usize,
    /// See [`CONSUMERS_PER_QUEUE_MAX`].
    pub consumers_per_queue_max: usize,
    /// See [`CONSUMERS_PER_CONNECTION_MAX`].
    pub consumers_per_connection_max: usize,
    /// Queues larger than memory: a durable, non-exclusive queue (of any kind: FIFO, priority,
    /// length-limited) keeps at most this many ready messages in memory; later arrivals are *paged* (handed to the
    /// server in [`crate::Effect::PageOut`] and counted only) until the queue has drained
    /// them back (see [`crate::Command::PageIn`]). 0: never page.
    pub paging_threshold: usize,
    /// The same limit in body bytes: a pageable queue also pages once its ready messages in
    /// memory hold this many bytes (so large messages page early). 0: no byte limit.
    pub paging_threshold_bytes: u64,
    /// Whether transient (non-durable, non-exclusive) queues page too. Their paged messages
    /// are never logged (they are lost at a restart, as their queue is); off, they stay in
    /// memory and only the server's memory alarm holds their publishers.
    pub page_transient: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            queues_max: QUEUES_MAX,
            exchanges_max: EXCHANGES_MAX,
            vhosts_max: VHOSTS_MAX,
            bindings_per_exchange_max: BINDINGS_PER_EXCHANGE_MAX,
            consumers_per_queue_max: CONSUMERS_PER_QUEUE_MAX,
            consumers_per_connection_max: CONSUMERS_PER_CONNECTION_MAX,
            paging_threshold: PAGING_THRESHOLD_DEFAULT,
            paging_threshold_bytes: 0,
            page_transient: false,
        }
    }
}
