//! Protocol limits: every size, count and depth the codec accepts is bounded by a constant here.
//!
//! The decoder enforces the limits marked *decode*; the others are defaults the server
//! advertises in [`HelloOk`](crate::HelloOk) and its configuration may override.

/// Major protocol version this build speaks; a different major is a different wire format.
pub const PROTOCOL_MAJOR: u16 = 1;

/// Minor protocol version this build speaks; minors only add (see docs/protocol.md).
/// 1.1 added delayed delivery, `Defer`, `Touch` (leases), `Redrive` and the V2 queue counters;
/// 1.2 online administration of users and permissions; 1.3 virtual hosts.
pub const PROTOCOL_MINOR: u16 = 3;

/// Longest password or permission pattern in an administration request (bytes, *decode*).
pub const ADMIN_TEXT_BYTES_MAX: usize = 1024;

/// Most tags in an administration request (*decode*); each is a name.
pub const TAGS_MAX: usize = 16;

/// Bytes of the length prefix before every frame: a big-endian `u32`.
pub const FRAME_PREFIX_BYTES: usize = 4;

/// Default largest frame (*decode*, excluding the prefix): big enough for a 1,000-message batch
/// of 16 KiB bodies, small enough that one connection cannot pin much memory.
pub const FRAME_BYTES_MAX: u32 = 16 * 1024 * 1024;

/// Smallest `frame_bytes_max` a peer may advertise: every control frame must still fit.
pub const FRAME_BYTES_MAX_FLOOR: u32 = 64 * 1024;

/// Longest queue, exchange, routing-key or binding-key name in bytes (*decode*): AMQP's
/// short-string limit, so names map 1:1 to AMQP tooling.
pub const NAME_BYTES_MAX: usize = 255;

/// Longest human-readable reason or error message in bytes (*decode*): enough to explain,
/// too short to smuggle data.
pub const REASON_BYTES_MAX: usize = 1024;

/// Most messages in one `PublishBatch` or `DeliverBatch` (*decode*): a batch is one latency
/// unit and one confirm range; larger batches only add latency.
pub const BATCH_MESSAGES_MAX: u32 = 16_384;

/// Deepest nesting of lists and maps inside a [`Table`](crate::Table) value (*decode*): bounds
/// the validator's recursion, so a hostile frame cannot overflow the stack.
pub const TABLE_DEPTH_MAX: u32 = 16;

/// Longest delay, TTL, lease or window in ms a peer may ask for (`delay_ms`, `Defer`,
/// `x-ack-timeout`, `x-message-ttl`, ...): about ten years, so `now + duration` never overflows
/// and a typo in units is refused rather than parked forever. The server refuses longer ones.
pub const DURATION_MS_MAX: u64 = 10 * 366 * 24 * 3600 * 1000;

/// Default heartbeat interval the server advertises: a dead peer is noticed within ~2 intervals.
pub const HEARTBEAT_MS: u32 = 10_000;

/// Default publishes in flight (sent, not yet confirmed) per connection: bounds the server's
/// per-connection confirm bookkeeping and gives the client natural backpressure.
pub const PUBLISHES_IN_FLIGHT_MAX: u32 = 65_536;

/// Most bytes the decoder reserves at once for a partly received frame: memory follows the bytes
/// that actually arrive, not the length a peer claims.
pub const READ_RESERVE_BYTES_MAX: usize = 64 * 1024;

/// Bodies shorter than this are copied into the header chunk by
/// [`encode_vectored`](crate::encode_vectored): one more iovec costs more than copying them.
pub const VECTORED_COPY_BYTES_MAX: usize = 512;

const _: () = assert!(FRAME_BYTES_MAX_FLOOR <= FRAME_BYTES_MAX);
const _: () = assert!(NAME_BYTES_MAX < FRAME_BYTES_MAX_FLOOR as usize);
const _: () = assert!(REASON_BYTES_MAX < FRAME_BYTES_MAX_FLOOR as usize);
const _: () = assert!(
    NAME_BYTES_MAX * (3 + TAGS_MAX) + ADMIN_TEXT_BYTES_MAX * 3 < FRAME_BYTES_MAX_FLOOR as usize
);
