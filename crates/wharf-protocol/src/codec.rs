//! Pure `encode` / `decode` functions and the tokio-util [`Codec`] wrapping them.
//!
//! Stream layout: `u32` big-endian frame length, then the frame: a postcard header starting
//! with the kind varint, then the payload (message bodies, raw). See docs/protocol.md.

use crate::error::Error;
use crate::frame::*;
use crate::limits::{
    BATCH_MESSAGES_MAX, FRAME_BYTES_MAX, FRAME_PREFIX_BYTES, READ_RESERVE_BYTES_MAX,
    VECTORED_COPY_BYTES_MAX,
};
use crate::properties::Properties;
use crate::wire::{
    self, Reader, check_admin_text, check_name, check_reason, check_tags, check_vhost,
};
use crate::wire_str::WireStr;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::de::DeserializeOwned;

/// Smallest encoding of one batch entry: a publish entry is two `None` overrides, an empty
/// properties blob and a body length (4 bytes); a delivery entry is larger. Bounds the capacity
/// reserved for a claimed message count.
const BATCH_ENTRY_WIRE_BYTES_MIN: usize = 4;

// ---------------------------------------------------------------------------------------------
// Decoding.

/// Decodes one frame from the front of `src`, the connection's read buffer.
///
/// Returns `Ok(None)` when `src` does not yet hold a whole frame (after reserving room for the
/// next part of it),
/// `Ok(Some(frame))` after removing exactly one frame's bytes from `src`, and `Err` when the
/// stream is corrupt; the caller then sends `Close` and stops reading. The length prefix is
/// checked against `frame_bytes_max` before anything is reserved or read.
pub fn decode(src: &mut BytesMut, frame_bytes_max: u32) -> Result<Option<Frame>, Error> {
    if src.len() < FRAME_PREFIX_BYTES {
        return Ok(None);
    }
    let frame_bytes = u32::from_be_bytes([src[0], src[1], src[2], src[3]]);
    if frame_bytes > frame_bytes_max {
        return Err(Error::FrameTooLarge {
            bytes: u64::from(frame_bytes),
            max: frame_bytes_max,
        });
    }
    let total = FRAME_PREFIX_BYTES + frame_bytes as usize;
    if src.len() < total {
        // Reserve for what is missing, but not more than `READ_RESERVE_BYTES_MAX` at a time: a
        // peer that claims a large frame and sends nothing pins no memory.
        src.reserve((total - src.len()).min(READ_RESERVE_BYTES_MAX));
        return Ok(None);
    }
    src.advance(FRAME_PREFIX_BYTES);
    let frame = src.split_to(frame_bytes as usize).freeze();
    decode_frame(frame).map(Some)
}

/// Decodes one frame (without its length prefix). Strings, tables and bodies of the hot frames
/// are zero-copy slices of `frame`.
pub fn decode_frame(frame: Bytes) -> Result<Frame, Error> {
    let mut reader = Reader::new(&frame, "frame");
    let kind = match reader.u32() {
        Ok(kind) => kind,
        Err(_) => {
            return Err(Error::Malformed {
                frame: "frame",
                detail: "missing or bad kind",
            });
        }
    };
    let body = reader.remaining();
    match kind {
        kind::HELLO => decode_hello(body).map(Frame::Hello),
        kind::HELLO_OK => {
            let hello_ok: HelloOk = from_postcard(body, "HelloOk")?;
            check_reason(&hello_ok.server_version)?;
            Ok(Frame::HelloOk(hello_ok))
        }
        kind::CLOSE => {
            let close: Close = from_postcard(body, "Close")?;
            check_reason(&close.reason)?;
            Ok(Frame::Close(close))
        }
        kind::CLOSE_OK => from_postcard::<()>(body, "CloseOk").map(|()| Frame::CloseOk),
        kind::HEARTBEAT => from_postcard::<()>(body, "Heartbeat").map(|()| Frame::Heartbeat),
        kind::REQUEST => {
            let (correlation_id, request): (u64, Request) = from_postcard(body, "Request")?;
            check_request(&request)?;
            Ok(Frame::Request {
                correlation_id,
                request,
            })
        }
        kind::RESPONSE => {
            let (correlation_id, response): (u64, Response) = from_postcard(body, "Response")?;
            check_response(&response)?;
            Ok(Frame::Response {
                correlation_id,
                response,
            })
        }
        kind::PUBLISH => decode_publish(&frame, body).map(Frame::Publish),
        kind::PUBLISH_BATCH => decode_publish_batch(&frame, body).map(Frame::PublishBatch),
        kind::CONFIRM => {
            let confirm: Confirm = from_postcard(body, "Confirm")?;
            check_confirm(&confirm)?;
            Ok(Frame::Confirm(confirm))
        }
        kind::DELIVER => decode_deliver(&frame, body).map(Frame::Deliver),
        kind::DELIVER_BATCH => decode_deliver_batch(&frame, body).map(Frame::DeliverBatch),
        kind::ACK => from_postcard(body, "Ack").map(Frame::Ack),
        kind::NACK => from_postcard(body, "Nack").map(Frame::Nack),
        kind::REJECT => from_postcard(body, "Reject").map(Frame::Reject),
        kind::ACK_RANGES => {
            let ack_ranges: AckRanges = from_postcard(body, "AckRanges")?;
            check_tag_ranges(&ack_ranges)?;
            Ok(Frame::AckRanges(ack_ranges))
        }
        kind::CREDIT => from_postcard(body, "Credit").map(Frame::Credit),
        kind::CONSUMER_CANCELLED => {
            let cancelled: ConsumerCancelled = from_postcard(body, "ConsumerCancelled")?;
            check_reason(&cancelled.reason)?;
            Ok(Frame::ConsumerCancelled(cancelled))
        }
        kind::DEFER => from_postcard(body, "Defer").map(Frame::Defer),
        kind::TOUCH => from_postcard(body, "Touch").map(Frame::Touch),
        kind => Err(Error::UnknownFrameKind { kind }),
    }
}

/// Decodes a control frame's postcard body, which must be consumed exactly.
fn from_postcard<T: DeserializeOwned>(body: &[u8], frame: &'static str) -> Result<T, Error> {
    let (value, rest) = take_postcard(body, frame)?;
    if !rest.is_empty() {
        return Err(Error::Malformed {
            frame,
            detail: "trailing bytes",
        });
    }
    Ok(value)
}

/// Decodes a postcard value from the front of `body`; returns it and the bytes after it.
fn take_postcard<'a, T: DeserializeOwned>(
    body: &'a [u8],
    frame: &'static str,
) -> Result<(T, &'a [u8]), Error> {
    postcard::take_from_bytes::<T>(body).map_err(|err| Error::Malformed {
        frame,
        detail: match err {
            postcard::Error::DeserializeUnexpectedEnd => "truncated",
            postcard::Error::DeserializeBadVarint => "bad varint",
            postcard::Error::DeserializeBadBool => "bool is not 0 or 1",
            postcard::Error::DeserializeBadOption => "option tag is not 0 or 1",
            postcard::Error::DeserializeBadUtf8 => "string is not UTF-8",
            postcard::Error::DeserializeBadEnum => "unknown enum variant",
            _ => "invalid encoding (unknown variant or invalid table)",
        },
    })
}

/// `Hello`'s fields up to protocol 1.2, in wire order: what every `Hello` starts with.
type HelloBase = (String, Credentials, u32, u32);

/// Decodes `Hello`: the 1.0 fields, then (protocol 1.3) an optional trailing string, the
/// virtual host, which must end the frame. Without it the virtual host is `/`, so a `Hello`
/// from a client older than 1.3 still decodes.
fn decode_hello(body: &[u8]) -> Result<Hello, Error> {
    let ((client_name, credentials, frame_bytes_max, heartbeat_ms), rest): (HelloBase, _) =
        take_postcard(body, "Hello")?;
    let vhost = match rest.is_empty() {
        true => DEFAULT_VHOST.to_owned(),
        false => from_postcard(rest, "Hello")?,
    };
    let hello = Hello {
        client_name,
        credentials,
        frame_bytes_max,
        heartbeat_ms,
        vhost,
    };
    check_hello(&hello)?;
    Ok(hello)
}

/// Writes what follows `Hello`'s kind: byte for byte the 1.0 `Hello` when the virtual host is
/// `/`, else followed by the virtual host (only for a server whose minor is at least
/// [`MINOR_VHOSTS`]: an older one refuses the trailing bytes).
fn put_hello(dst: &mut BytesMut, hello: &Hello) -> Result<(), Error> {
    put_postcard(
        dst,
        &(
            &hello.client_name,
            &hello.credentials,
            hello.frame_bytes_max,
            hello.heartbeat_ms,
        ),
    )?;
    if hello.vhost != DEFAULT_VHOST {
        wire::put_str(dst, &hello.vhost);
    }
    Ok(())
}

#[inline]
fn read_opt_name<'a>(reader: &mut Reader<'a>) -> Result<Option<&'a [u8]>, Error> {
    if reader.option_tag()? {
        Ok(Some(reader.name()?))
    } else {
        Ok(None)
    }
}

#[inline]
fn opt_wire_str(frame: &Bytes, text: Option<&[u8]>) -> Option<WireStr> {
    text.map(|text| WireStr::from_frame_slice(frame, text))
}

#[inline]
fn read_properties(reader: &mut Reader<'_>, frame: &Bytes) -> Result<Properties, Error> {
    Properties::from_frame_slice(frame, reader.bytes()?)
}

fn decode_publish(frame: &Bytes, body: &[u8]) -> Result<Publish, Error> {
    let mut reader = Reader::new(body, "Publish");
    let exchange = reader.name()?;
    let routing_key = reader.name()?;
    let properties = read_properties(&mut reader, frame)?;
    Ok(Publish {
        exchange: WireStr::from_frame_slice(frame, exchange),
        routing_key: WireStr::from_frame_slice(frame, routing_key),
        properties,
        body: frame.slice_ref(reader.remaining()),
    })
}

fn read_batch_len(reader: &mut Reader<'_>) -> Result<u32, Error> {
    let n_messages = reader.u32()?;
    if n_messages > BATCH_MESSAGES_MAX {
        return Err(Error::LimitExceeded {
            what: "batch messages",
            len: u64::from(n_messages),
            max: u64::from(BATCH_MESSAGES_MAX),
        });
    }
    Ok(n_messages)
}

/// Capacity for a claimed count: never more entries than the remaining bytes could hold.
fn batch_capacity(n_messages: u32, reader: &Reader<'_>) -> usize {
    (n_messages as usize).min(reader.remaining_len() / BATCH_ENTRY_WIRE_BYTES_MIN)
}

/// The payload of a batch frame: the bodies, back to back, at the end of the frame. The batch
/// header announces its size, so bodies are sliced while the entries are read (one pass).
struct Payload {
    bodies: Bytes,
    offset: usize,
}

impl Payload {
    fn new(frame: &Bytes, reader: &mut Reader<'_>) -> Result<Payload, Error> {
        let payload_bytes = reader.u32()? as usize;
        let rest = reader.remaining();
        if payload_bytes > rest.len() {
            return Err(reader.malformed("payload longer than the frame"));
        }
        Ok(Payload {
            bodies: frame.slice_ref(&rest[rest.len() - payload_bytes..]),
            offset: 0,
        })
    }

    /// The next body, of `body_len` bytes.
    #[inline]
    fn next_body(&mut self, reader: &Reader<'_>, body_len: u32) -> Result<Bytes, Error> {
        let end = self.offset + body_len as usize;
        if end > self.bodies.len() {
            return Err(reader.malformed("bodies longer than the payload"));
        }
        let body = self.bodies.slice(self.offset..end);
        self.offset = end;
        Ok(body)
    }

    /// Checks the entries ended exactly where the payload starts and the bodies filled it.
    fn finish(&self, reader: &Reader<'_>) -> Result<(), Error> {
        if self.offset != self.bodies.len() || reader.remaining_len() != self.bodies.len() {
            return Err(reader.malformed("entries and bodies do not add up to the frame"));
        }
        Ok(())
    }
}

fn decode_publish_batch(frame: &Bytes, body: &[u8]) -> Result<PublishBatch, Error> {
    let mut reader = Reader::new(body, "PublishBatch");
    let exchange = WireStr::from_frame_slice(frame, reader.name()?);
    let routing_key = WireStr::from_frame_slice(frame, reader.name()?);
    let n_messages = read_batch_len(&mut reader)?;
    let capacity = batch_capacity(n_messages, &reader);
    let mut payload = Payload::new(frame, &mut reader)?;
    let mut messages = Vec::with_capacity(capacity);
    for _ in 0..n_messages {
        let exchange = opt_wire_str(frame, read_opt_name(&mut reader)?);
        let routing_key = opt_wire_str(frame, read_opt_name(&mut reader)?);
        let properties = read_properties(&mut reader, frame)?;
        let body_len = reader.u32()?;
        let body = payload.next_body(&reader, body_len)?;
        messages.push(BatchMessage {
            exchange,
            routing_key,
            properties,
            body,
        });
    }
    payload.finish(&reader)?;
    Ok(PublishBatch {
        exchange,
        routing_key,
        messages,
    })
}

fn decode_deliver(frame: &Bytes, body: &[u8]) -> Result<Deliver, Error> {
    let mut reader = Reader::new(body, "Deliver");
    let consumer_tag = reader.u32()?;
    let delivery_tag = reader.u64()?;
    if delivery_tag == 0 {
        return Err(reader.malformed("delivery tag 0"));
    }
    let redelivered = reader.bool()?;
    let delivery_count = reader.u32()?;
    let exchange = WireStr::from_frame_slice(frame, reader.name()?);
    let routing_key = WireStr::from_frame_slice(frame, reader.name()?);
    let properties = read_properties(&mut reader, frame)?;
    let delivery = Delivery {
        delivery_tag,
        redelivered,
        delivery_count,
        exchange,
        routing_key,
        properties,
        body: frame.slice_ref(reader.remaining()),
    };
    Ok(Deliver {
        consumer_tag,
        delivery,
    })
}

fn decode_deliver_batch(frame: &Bytes, body: &[u8]) -> Result<DeliverBatch, Error> {
    let mut reader = Reader::new(body, "DeliverBatch");
    let consumer_tag = reader.u32()?;
    let n_deliveries = read_batch_len(&mut reader)?;
    let capacity = batch_capacity(n_deliveries, &reader);
    let mut payload = Payload::new(frame, &mut reader)?;
    let mut deliveries: Vec<Delivery> = Vec::with_capacity(capacity);
    let mut delivery_tag = 0u64;
    for _ in 0..n_deliveries {
        let tag_delta = reader.u64()?;
        if tag_delta == 0 {
            return Err(reader.malformed("delivery tags not strictly increasing"));
        }
        delivery_tag = delivery_tag
            .checked_add(tag_delta)
            .ok_or_else(|| reader.malformed("delivery tag overflow"))?;
        let redelivered = reader.bool()?;
        let delivery_count = reader.u32()?;
        // `None` = same as the previous delivery; the first must carry both.
        let exchange = match (read_opt_name(&mut reader)?, deliveries.last()) {
            (Some(exchange), _) => WireStr::from_frame_slice(frame, exchange),
            (None, Some(previous)) => previous.exchange.clone(),
            (None, None) => return Err(reader.malformed("first delivery without exchange")),
        };
        let routing_key = match (read_opt_name(&mut reader)?, deliveries.last()) {
            (Some(routing_key), _) => WireStr::from_frame_slice(frame, routing_key),
            (None, Some(previous)) => previous.routing_key.clone(),
            (None, None) => return Err(reader.malformed("first delivery without routing key")),
        };
        let properties = read_properties(&mut reader, frame)?;
        let body_len = reader.u32()?;
        let body = payload.next_body(&reader, body_len)?;
        deliveries.push(Delivery {
            delivery_tag,
            redelivered,
            delivery_count,
            exchange,
            routing_key,
            properties,
            body,
        });
    }
    payload.finish(&reader)?;
    Ok(DeliverBatch {
        consumer_tag,
        deliveries,
    })
}

// ---------------------------------------------------------------------------------------------
// Checks shared by encoder and decoder, so that whatever encodes also decodes.

fn check_request(request: &Request) -> Result<(), Error> {
    match request {
        Request::DeclareQueue { name, .. }
        | Request::DeleteQueue { name, .. }
        | Request::PurgeQueue { name }
        | Request::DeclareExchange { name, .. }
        | Request::DeleteExchange { name, .. }
        | Request::QueueStats { name }
        | Request::QueueStatsV2 { name }
        | Request::Redrive { queue: name, .. }
        | Request::Subscribe { queue: name, .. } => check_name(name),
        Request::Bind(binding) | Request::Unbind(binding) => {
            let (Destination::Queue(destination) | Destination::Exchange(destination)) =
                &binding.destination;
            check_name(destination)?;
            check_name(&binding.source)?;
            check_name(&binding.routing_key)
        }
        Request::Cancel { .. }
        | Request::ListQueues
        | Request::ListExchanges
        | Request::ListQueuesV2
        | Request::ListUsers
        | Request::ListVhosts
        | Request::ListUserLimits => Ok(()),
        Request::AddUser {
            name,
            password,
            tags,
        } => {
            check_name(name)?;
            check_admin_text(&password.0)?;
            check_tags(tags)
        }
        Request::DeleteUser { name }
        | Request::ListPermissions { vhost: name }
        | Request::ListTopicPermissions { vhost: name } => check_name(name),
        Request::ChangePassword { name, password } => {
            check_name(name)?;
            check_admin_text(&password.0)
        }
        Request::SetUserTags { name, tags } => {
            check_name(name)?;
            check_tags(tags)
        }
        Request::SetPermissions(permission) => check_permission(permission),
        Request::ClearPermissions { user, vhost } => {
            check_name(user)?;
            check_name(vhost)
        }
        Request::SetTopicPermissions(permission) => check_topic_permission(permission),
        Request::ClearTopicPermissions {
            user,
            vhost,
            exchange,
        } => {
            check_name(user)?;
            check_name(vhost)?;
            exchange.as_deref().map_or(Ok(()), check_name)
        }
        Request::AddVhost { name, .. }
        | Request::DeleteVhost { name }
        | Request::SetVhostLimits { name, .. } => check_vhost(name),
        Request::SetUserLimits { user, .. } => check_name(user),
    }
}

fn check_hello(hello: &Hello) -> Result<(), Error> {
    check_reason(&hello.client_name)?;
    check_name(&hello.credentials.mechanism)?;
    check_vhost(&hello.vhost)
}

fn check_permission(permission: &PermissionInfo) -> Result<(), Error> {
    check_name(&permission.user)?;
    check_name(&permission.vhost)?;
    check_admin_text(&permission.configure)?;
    check_admin_text(&permission.write)?;
    check_admin_text(&permission.read)
}

fn check_topic_permission(permission: &TopicPermissionInfo) -> Result<(), Error> {
    check_name(&permission.user)?;
    check_name(&permission.vhost)?;
    check_name(&permission.exchange)?;
    check_admin_text(&permission.write)?;
    check_admin_text(&permission.read)
}

fn check_response(response: &Response) -> Result<(), Error> {
    match response {
        Response::QueueDeclared { name, .. } => check_name(name),
        Response::Stats(queue) => check_name(&queue.name),
        Response::Queues(queues) => queues.iter().try_for_each(|queue| check_name(&queue.name)),
        Response::StatsV2(queue) => check_name(&queue.name),
        Response::QueuesV2(queues) => queues.iter().try_for_each(|queue| check_name(&queue.name)),
        Response::Exchanges(exchanges) => exchanges
            .iter()
            .try_for_each(|exchange| check_name(&exchange.name)),
        Response::Error { message, .. } => check_reason(message),
        Response::Deleted { .. }
        | Response::Purged { .. }
        | Response::Subscribed { .. }
        | Response::Redriven { .. }
        | Response::Done => Ok(()),
        Response::Users(users) => users.iter().try_for_each(|user| {
            check_name(&user.name)?;
            check_tags(&user.tags)
        }),
        Response::Permissions(permissions) => permissions.iter().try_for_each(check_permission),
        Response::TopicPermissions(permissions) => {
            permissions.iter().try_for_each(check_topic_permission)
        }
        Response::Vhosts(vhosts) => vhosts.iter().try_for_each(|vhost| check_vhost(&vhost.name)),
        Response::UserLimits(users) => users.iter().try_for_each(|user| check_name(&user.user)),
    }
}

fn check_confirm(confirm: &Confirm) -> Result<(), Error> {
    for range in &confirm.ranges {
        if range.first_seq > range.last_seq {
            return Err(Error::Malformed {
                frame: "Confirm",
                detail: "range with first > last",
            });
        }
        if let ConfirmStatus::Refused { reason, .. } = &range.status {
            check_reason(reason)?;
        }
    }
    Ok(())
}

fn check_tag_ranges(ack_ranges: &AckRanges) -> Result<(), Error> {
    if ack_ranges
        .ranges
        .iter()
        .any(|range| range.first > range.last)
    {
        return Err(Error::Malformed {
            frame: "AckRanges",
            detail: "range with first > last",
        });
    }
    Ok(())
}

/// Runs the decoder's checks on a frame about to be encoded.
fn check_for_encode(frame: &Frame) -> Result<(), Error> {
    let checked = match frame {
        Frame::Hello(hello) => check_hello(hello),
        Frame::HelloOk(hello_ok) => check_reason(&hello_ok.server_version),
        Frame::Close(close) => check_reason(&close.reason),
        Frame::Request { request, .. } => check_request(request),
        Frame::Response { response, .. } => check_response(response),
        Frame::Confirm(confirm) => check_confirm(confirm),
        Frame::AckRanges(ack_ranges) => check_tag_ranges(ack_ranges),
        Frame::ConsumerCancelled(cancelled) => check_reason(&cancelled.reason),
        // Hot frames are checked while they are written.
        _ => Ok(()),
    };
    checked.map_err(|err| match err {
        Error::Malformed { frame, detail } => Error::Invalid { frame, detail },
        other => other,
    })
}

// ---------------------------------------------------------------------------------------------
// Encoding.

/// Appends `frame`, length prefix included, to `dst`. Fails without writing anything if the
/// frame would exceed `frame_bytes_max` or breaks a limit the decoder enforces.
pub fn encode(frame: &Frame, frame_bytes_max: u32, dst: &mut BytesMut) -> Result<(), Error> {
    let start = dst.len();
    let result = encode_inner(frame, frame_bytes_max, dst, None);
    if result.is_err() {
        dst.truncate(start);
    }
    result.map(|_| ())
}

/// A delivery borrowed from the sender's own store: what [`encode_deliver_batch`] encodes
/// without building owned [`Delivery`] values (no reference-count traffic, no copies of the
/// metadata).
#[derive(Clone, Copy, Debug)]
pub struct DeliveryRef<'a> {
    /// Per-connection delivery tag; strictly increasing within a batch.
    pub delivery_tag: u64,
    /// Delivered before.
    pub redelivered: bool,
    /// Deliveries of this message, this one included.
    pub delivery_count: u32,
    /// Exchange it was published to.
    pub exchange: &'a str,
    /// Routing key it was published with.
    pub routing_key: &'a str,
    /// Its properties.
    pub properties: &'a Properties,
    /// Its body.
    pub body: &'a [u8],
}

/// Appends a `DeliverBatch` frame (or a `Deliver` frame for a single delivery) built from
/// borrowed deliveries: byte for byte what [`encode`] writes for the equivalent
/// [`Frame::DeliverBatch`] / [`Frame::Deliver`]. Fails without writing anything on a limit.
pub fn encode_deliver_batch(
    consumer_tag: u32,
    deliveries: &[DeliveryRef<'_>],
    frame_bytes_max: u32,
    dst: &mut BytesMut,
) -> Result<(), Error> {
    let start = dst.len();
    let result = encode_deliver_batch_inner(consumer_tag, deliveries, frame_bytes_max, dst);
    if result.is_err() {
        dst.truncate(start);
    }
    result
}

fn encode_deliver_batch_inner(
    consumer_tag: u32,
    deliveries: &[DeliveryRef<'_>],
    frame_bytes_max: u32,
    dst: &mut BytesMut,
) -> Result<(), Error> {
    let bodies_bytes =
        encode_deliver_batch_head_inner(consumer_tag, deliveries, frame_bytes_max, dst)?;
    dst.reserve(bodies_bytes as usize);
    for delivery in deliveries {
        dst.extend_from_slice(delivery.body);
    }
    Ok(())
}

/// Appends everything of [`encode_deliver_batch`]'s frame except the bodies, which the caller
/// must send right after it, in order (e.g. as their own buffers in a vectored write, so large
/// bodies are not copied). Returns the bodies' total length. Fails without writing anything.
pub fn encode_deliver_batch_head(
    consumer_tag: u32,
    deliveries: &[DeliveryRef<'_>],
    frame_bytes_max: u32,
    dst: &mut BytesMut,
) -> Result<u64, Error> {
    let start = dst.len();
    let result = encode_deliver_batch_head_inner(consumer_tag, deliveries, frame_bytes_max, dst);
    if result.is_err() {
        dst.truncate(start);
    }
    result
}

fn encode_deliver_batch_head_inner(
    consumer_tag: u32,
    deliveries: &[DeliveryRef<'_>],
    frame_bytes_max: u32,
    dst: &mut BytesMut,
) -> Result<u64, Error> {
    let start = dst.len();
    dst.put_u32(0); // Patched once the length is known.
    let single = deliveries.len() == 1;
    wire::put_varint(
        dst,
        u64::from(if single {
            kind::DELIVER
        } else {
            kind::DELIVER_BATCH
        }),
    );
    let bodies_bytes =
        put_deliveries_header(dst, consumer_tag, deliveries, single, frame_bytes_max)?;
    let frame_bytes = (dst.len() - start - FRAME_PREFIX_BYTES) as u64 + bodies_bytes;
    if frame_bytes > u64::from(frame_bytes_max) {
        return Err(Error::FrameTooLarge {
            bytes: frame_bytes,
            max: frame_bytes_max,
        });
    }
    // Cannot truncate: frame_bytes <= frame_bytes_max, a u32.
    dst[start..start + FRAME_PREFIX_BYTES].copy_from_slice(&(frame_bytes as u32).to_be_bytes());
    Ok(bodies_bytes)
}

impl<'a> From<&'a Delivery> for DeliveryRef<'a> {
    fn from(delivery: &'a Delivery) -> Self {
        DeliveryRef {
            delivery_tag: delivery.delivery_tag,
            redelivered: delivery.redelivered,
            delivery_count: delivery.delivery_count,
            exchange: &delivery.exchange,
            routing_key: &delivery.routing_key,
            properties: &delivery.properties,
            body: &delivery.body,
        }
    }
}

/// Writes what follows the kind of a `Deliver` (`single`: exactly one delivery) or
/// `DeliverBatch` frame up to the bodies; returns the bodies' total length. The one place
/// deliveries are encoded.
fn put_deliveries_header(
    dst: &mut BytesMut,
    consumer_tag: u32,
    deliveries: &[DeliveryRef<'_>],
    single: bool,
    frame_bytes_max: u32,
) -> Result<u64, Error> {
    let bodies_bytes: u64 = deliveries
        .iter()
        .map(|delivery| delivery.body.len() as u64)
        .sum();
    wire::put_varint(dst, u64::from(consumer_tag));
    if single {
        let [delivery] = deliveries else {
            unreachable!("a Deliver frame holds one delivery")
        };
        if delivery.delivery_tag == 0 {
            return Err(Error::Invalid {
                frame: "Deliver",
                detail: "delivery tag 0",
            });
        }
        wire::put_varint(dst, delivery.delivery_tag);
        wire::put_bool(dst, delivery.redelivered);
        wire::put_varint(dst, u64::from(delivery.delivery_count));
        put_name(dst, delivery.exchange)?;
        put_name(dst, delivery.routing_key)?;
        put_properties(dst, delivery.properties)?;
        return Ok(bodies_bytes);
    }
    put_batch_len(dst, deliveries.len())?;
    put_payload_len(dst, bodies_bytes, frame_bytes_max)?;
    let mut previous: Option<&DeliveryRef<'_>> = None;
    for delivery in deliveries {
        let previous_tag = previous.map_or(0, |previous| previous.delivery_tag);
        if delivery.delivery_tag <= previous_tag {
            return Err(Error::Invalid {
                frame: "DeliverBatch",
                detail: "delivery tags not strictly increasing from 1",
            });
        }
        wire::put_varint(dst, delivery.delivery_tag - previous_tag);
        wire::put_bool(dst, delivery.redelivered);
        wire::put_varint(dst, u64::from(delivery.delivery_count));
        let same_exchange = previous.is_some_and(|previous| previous.exchange == delivery.exchange);
        put_opt_name(dst, (!same_exchange).then_some(delivery.exchange))?;
        let same_key =
            previous.is_some_and(|previous| previous.routing_key == delivery.routing_key);
        put_opt_name(dst, (!same_key).then_some(delivery.routing_key))?;
        put_properties(dst, delivery.properties)?;
        wire::put_varint(dst, delivery.body.len() as u64);
        previous = Some(delivery);
    }
    Ok(bodies_bytes)
}

/// Encodes `frame` as a list of chunks for a vectored write (`write_vectored` / `writev`),
/// appended to `chunks`: header bytes, then each body as a shared `Bytes` (no copy), except
/// bodies shorter than [`VECTORED_COPY_BYTES_MAX`], which are copied next to the header bytes.
/// Returns the number of bytes appended (prefix included). On error nothing is appended.
pub fn encode_vectored(
    frame: &Frame,
    frame_bytes_max: u32,
    chunks: &mut Vec<Bytes>,
) -> Result<usize, Error> {
    let mut dst = BytesMut::new();
    let n_chunks = chunks.len();
    match encode_inner(frame, frame_bytes_max, &mut dst, Some(chunks)) {
        Ok(total) => {
            if !dst.is_empty() {
                chunks.push(dst.freeze());
            }
            Ok(total)
        }
        Err(err) => {
            chunks.truncate(n_chunks);
            Err(err)
        }
    }
}

/// Writes prefix + header into `dst`, then the bodies: into `dst` (inline) or as chunks.
/// Returns the total frame bytes including the prefix.
fn encode_inner(
    frame: &Frame,
    frame_bytes_max: u32,
    dst: &mut BytesMut,
    mut chunks: Option<&mut Vec<Bytes>>,
) -> Result<usize, Error> {
    check_for_encode(frame)?;
    let start = dst.len();
    dst.put_u32(0); // Patched once the length is known.
    wire::put_varint(dst, u64::from(frame.kind()));
    let mut bodies_bytes = 0u64;
    match frame {
        Frame::Hello(hello) => put_hello(dst, hello)?,
        Frame::HelloOk(hello_ok) => put_postcard(dst, hello_ok)?,
        Frame::Close(close) => put_postcard(dst, close)?,
        Frame::CloseOk | Frame::Heartbeat => {}
        Frame::Request {
            correlation_id,
            request,
        } => put_postcard(dst, &(correlation_id, request))?,
        Frame::Response {
            correlation_id,
            response,
        } => put_postcard(dst, &(correlation_id, response))?,
        Frame::Publish(publish) => {
            put_name(dst, &publish.exchange)?;
            put_name(dst, &publish.routing_key)?;
            put_properties(dst, &publish.properties)?;
            bodies_bytes = publish.body.len() as u64;
        }
        Frame::PublishBatch(batch) => {
            put_name(dst, &batch.exchange)?;
            put_name(dst, &batch.routing_key)?;
            put_batch_len(dst, batch.messages.len())?;
            bodies_bytes = batch
                .messages
                .iter()
                .map(|message| message.body.len() as u64)
                .sum();
            put_payload_len(dst, bodies_bytes, frame_bytes_max)?;
            for message in &batch.messages {
                put_opt_name(dst, message.exchange.as_deref())?;
                put_opt_name(dst, message.routing_key.as_deref())?;
                put_properties(dst, &message.properties)?;
                wire::put_varint(dst, message.body.len() as u64);
            }
        }
        Frame::Confirm(confirm) => put_postcard(dst, confirm)?,
        Frame::Deliver(deliver) => {
            let delivery = [DeliveryRef::from(&deliver.delivery)];
            bodies_bytes =
                put_deliveries_header(dst, deliver.consumer_tag, &delivery, true, frame_bytes_max)?;
        }
        Frame::DeliverBatch(batch) => {
            let deliveries: Vec<DeliveryRef<'_>> =
                batch.deliveries.iter().map(DeliveryRef::from).collect();
            bodies_bytes = put_deliveries_header(
                dst,
                batch.consumer_tag,
                &deliveries,
                false,
                frame_bytes_max,
            )?;
        }
        Frame::Ack(ack) => put_postcard(dst, ack)?,
        Frame::Nack(nack) => put_postcard(dst, nack)?,
        Frame::Reject(reject) => put_postcard(dst, reject)?,
        Frame::AckRanges(ack_ranges) => put_postcard(dst, ack_ranges)?,
        Frame::Credit(credit) => put_postcard(dst, credit)?,
        Frame::ConsumerCancelled(cancelled) => put_postcard(dst, cancelled)?,
        Frame::Defer(defer) => put_postcard(dst, defer)?,
        Frame::Touch(touch) => put_postcard(dst, touch)?,
    }
    let frame_bytes = (dst.len() - start - FRAME_PREFIX_BYTES) as u64 + bodies_bytes;
    if frame_bytes > u64::from(frame_bytes_max) {
        return Err(Error::FrameTooLarge {
            bytes: frame_bytes,
            max: frame_bytes_max,
        });
    }
    // Cannot truncate: frame_bytes <= frame_bytes_max, a u32.
    dst[start..start + FRAME_PREFIX_BYTES].copy_from_slice(&(frame_bytes as u32).to_be_bytes());
    if chunks.is_none() {
        dst.reserve(bodies_bytes as usize);
    }
    let mut put_body = |dst: &mut BytesMut, body: &Bytes| match chunks.as_deref_mut() {
        Some(chunks) if body.len() >= VECTORED_COPY_BYTES_MAX => {
            if !dst.is_empty() {
                chunks.push(dst.split().freeze());
            }
            chunks.push(body.clone());
        }
        _ => dst.extend_from_slice(body),
    };
    match frame {
        Frame::Publish(publish) => put_body(dst, &publish.body),
        Frame::PublishBatch(batch) => {
            for message in &batch.messages {
                put_body(dst, &message.body);
            }
        }
        Frame::Deliver(deliver) => put_body(dst, &deliver.delivery.body),
        Frame::DeliverBatch(batch) => {
            for delivery in &batch.deliveries {
                put_body(dst, &delivery.body);
            }
        }
        _ => {}
    }
    Ok(FRAME_PREFIX_BYTES + frame_bytes as usize)
}

/// Postcard serializer output straight into a `BytesMut`.
struct BytesMutFlavor<'a>(&'a mut BytesMut);

impl postcard::ser_flavors::Flavor for BytesMutFlavor<'_> {
    type Output = ();

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(data);
        Ok(())
    }

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.put_u8(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

fn put_postcard<T: serde::Serialize>(dst: &mut BytesMut, value: &T) -> Result<(), Error> {
    postcard::serialize_with_flavor(value, BytesMutFlavor(dst)).map_err(|_| Error::Invalid {
        frame: "frame",
        detail: "postcard serialization failed",
    })
}

fn put_name(dst: &mut BytesMut, name: &str) -> Result<(), Error> {
    check_name(name)?;
    wire::put_str(dst, name);
    Ok(())
}

fn put_opt_name(dst: &mut BytesMut, name: Option<&str>) -> Result<(), Error> {
    if let Some(name) = name {
        check_name(name)?;
    }
    wire::put_option_str(dst, name);
    Ok(())
}

fn put_batch_len(dst: &mut BytesMut, n_messages: usize) -> Result<(), Error> {
    if n_messages > BATCH_MESSAGES_MAX as usize {
        return Err(Error::LimitExceeded {
            what: "batch messages",
            len: n_messages as u64,
            max: u64::from(BATCH_MESSAGES_MAX),
        });
    }
    wire::put_varint(dst, n_messages as u64);
    Ok(())
}

/// Writes a batch's total body bytes; refuses early what cannot fit (each body length then
/// fits a `u32` too).
fn put_payload_len(
    dst: &mut BytesMut,
    payload_bytes: u64,
    frame_bytes_max: u32,
) -> Result<(), Error> {
    if payload_bytes > u64::from(frame_bytes_max) {
        return Err(Error::FrameTooLarge {
            bytes: payload_bytes,
            max: frame_bytes_max,
        });
    }
    wire::put_varint(dst, payload_bytes);
    Ok(())
}

fn put_properties(dst: &mut BytesMut, properties: &Properties) -> Result<(), Error> {
    wire::put_bytes(dst, properties.as_bytes());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The tokio-util codec.

/// tokio-util codec over [`encode`] and [`decode`]: use with `Framed` after the preambles.
#[derive(Clone, Copy, Debug)]
pub struct Codec {
    recv_frame_bytes_max: u32,
    send_frame_bytes_max: u32,
}

impl Codec {
    /// A codec accepting and sending frames up to [`FRAME_BYTES_MAX`].
    pub fn new() -> Codec {
        Codec::with_frame_bytes_max(FRAME_BYTES_MAX)
    }

    /// A codec accepting and sending frames up to `frame_bytes_max`.
    pub fn with_frame_bytes_max(frame_bytes_max: u32) -> Codec {
        Codec {
            recv_frame_bytes_max: frame_bytes_max,
            send_frame_bytes_max: frame_bytes_max,
        }
    }

    /// Largest frame this side accepts (its own limit).
    pub fn recv_frame_bytes_max(&self) -> u32 {
        self.recv_frame_bytes_max
    }

    /// Largest frame this side sends (the peer's limit, learnt from `Hello` / `HelloOk`).
    pub fn send_frame_bytes_max(&self) -> u32 {
        self.send_frame_bytes_max
    }

    /// Sets the largest frame this side accepts.
    pub fn set_recv_frame_bytes_max(&mut self, frame_bytes_max: u32) {
        self.recv_frame_bytes_max = frame_bytes_max;
    }

    /// Sets the largest frame this side sends (after the handshake, the peer's limit).
    pub fn set_send_frame_bytes_max(&mut self, frame_bytes_max: u32) {
        self.send_frame_bytes_max = frame_bytes_max;
    }
}

impl Default for Codec {
    fn default() -> Codec {
        Codec::new()
    }
}

impl tokio_util::codec::Decoder for Codec {
    type Item = Frame;
    type Error = Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, Error> {
        decode(src, self.recv_frame_bytes_max)
    }
}

impl tokio_util::codec::Encoder<&Frame> for Codec {
    type Error = Error;

    fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), Error> {
        encode(frame, self.send_frame_bytes_max, dst)
    }
}

impl tokio_util::codec::Encoder<Frame> for Codec {
    type Error = Error;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), Error> {
        encode(&frame, self.send_frame_bytes_max, dst)
    }
}
