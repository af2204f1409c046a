//! Every limit of the client in one place, each with the reason it exists (the protocol's own
//! limits are in [`wharf_protocol::limits`]).

/// Most deliveries a consumer may hold unsettled (or, auto-ack, receive ahead of the
/// application): the consumer's buffer is bounded by it, so it bounds client memory.
pub const PREFETCH_MAX: u32 = 65_536;
