//! Wharf's wire protocol: the bytes between clients and the server.
//!
//! The normative spec is `docs/protocol.md`; this crate implements it and owns its types (the
//! server converts to `wharf-core` types at the boundary; this crate depends on no other Wharf
//! crate and on no runtime).
//!
//! - [`Preamble`]: the 8 bytes each side sends first (`WHRF`, major, minor).
//! - [`Frame`]: every frame kind, with [`encode`] / [`encode_vectored`] / [`decode`] /
//!   [`decode_frame`] as pure functions and [`Codec`] as the tokio-util wrapper.
//! - [`ErrorCode`]: the closed, append-only list of wire error codes.
//! - [`Properties`]: a message's metadata as one validated zero-copy blob with typed accessors
//!   (build it from a [`PropertiesRef`]).
//! - [`Table`]: typed headers and arguments, validated at decode and read lazily.
//! - [`limits`]: every bound the codec enforces.
//!
//! ```
//! use bytes::BytesMut;
//! use wharf_protocol::{decode, encode, Frame, limits::FRAME_BYTES_MAX};
//!
//! let mut buf = BytesMut::new();
//! encode(&Frame::Heartbeat, FRAME_BYTES_MAX, &mut buf).unwrap();
//! assert_eq!(decode(&mut buf, FRAME_BYTES_MAX).unwrap(), Some(Frame::Heartbeat));
//! assert!(buf.is_empty());
//! ```

mod bounded_vec;
mod code;
mod codec;
mod error;
mod frame;
pub mod limits;
mod preamble;
mod properties;
mod table;
mod wire;
mod wire_str;

pub use code::ErrorCode;
pub use codec::{
    Codec, DeliveryRef, decode, decode_frame, encode, encode_deliver_batch,
    encode_deliver_batch_head, encode_vectored,
};
pub use error::Error;
pub use frame::{
    Ack, AckRanges, BatchMessage, Binding, Close, Confirm, ConfirmRange, ConfirmStatus,
    ConsumerCancelled, Credentials, Credit, DEFAULT_VHOST, Defer, Deliver, DeliverBatch, Delivery,
    Destination, Durability, ExchangeInfo, ExchangeKind, Frame, Hello, HelloOk, MINOR_ADMIN,
    MINOR_QUEUE_FEATURES, MINOR_VHOSTS, Nack, Password, PermissionInfo, Publish, PublishBatch,
    QueueInfo, QueueInfoV2, Reject, Request, Response, ServerLimits, TagRange, TopicPermissionInfo,
    Touch, UserInfo, UserLimits, UserLimitsInfo, VhostInfo, VhostLimits, kind,
};
pub use preamble::{MAGIC, Preamble};
pub use properties::{Properties, PropertiesRef};
pub use table::{ListIter, ListRef, MapRef, Table, TableIter, TableRef, Value, ValueRef};
pub use wire_str::WireStr;
