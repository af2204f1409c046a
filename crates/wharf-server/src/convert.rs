//! Conversions at the boundary between wire types (wharf-protocol) and core types (wharf-core).

use bytes::Bytes;
use std::sync::Arc;
use wharf_core::{BindTarget, CoreError, HeaderValue, Headers, Message, QueueStats};
use wharf_protocol::{
    Destination, ErrorCode, ExchangeKind, Properties, PropertiesRef, QueueInfo, QueueInfoV2, Table,
    Value, ValueRef, WireStr,
};

// The wire's bound on delays, TTLs and leases is the core's: a client that checks against the
// protocol's constant is never refused by the core.
const _: () = assert!(wharf_core::DURATION_MS_MAX == wharf_protocol::limits::DURATION_MS_MAX);

/// The wire code for a core error, per docs/protocol.md.
pub fn error_code(err: &CoreError) -> ErrorCode {
    match err {
        CoreError::NotFound { .. } => ErrorCode::NotFound,
        CoreError::InvalidName { .. } | CoreError::ReservedName { .. } => ErrorCode::InvalidName,
        CoreError::PreconditionFailed { .. } | CoreError::ConsumerTagInUse { .. } => {
            ErrorCode::PreconditionFailed
        }
        CoreError::ResourceLocked { .. } => ErrorCode::ResourceLocked,
        CoreError::AccessRefused { .. } => ErrorCode::AccessRefused,
        CoreError::UnknownDeliveryTag { .. } => ErrorCode::UnknownDeliveryTag,
        CoreError::InvalidArgument { .. } => ErrorCode::InvalidArgument,
        CoreError::LimitExceeded { .. } => ErrorCode::ResourceLimit,
        CoreError::QueueFull { .. } => ErrorCode::Backpressure,
        _ => ErrorCode::Internal,
    }
}

fn value_to_core(value: ValueRef<'_>) -> HeaderValue {
    match value {
        ValueRef::Str(text) => HeaderValue::Str(text.to_owned()),
        ValueRef::I64(number) => HeaderValue::Int(number),
        ValueRef::F64(number) => HeaderValue::Float(number),
        ValueRef::Bool(flag) => HeaderValue::Bool(flag),
        ValueRef::Bytes(bytes) => HeaderValue::Bytes(Bytes::copy_from_slice(bytes)),
        ValueRef::List(list) => HeaderValue::List(list.iter().map(value_to_core).collect()),
        ValueRef::Map(map) => HeaderValue::Map(
            map.iter()
                .map(|(key, value)| (key, value_to_core(value)))
                .collect(),
        ),
    }
}

/// A validated wire table as core headers.
pub fn table_to_headers(table: &Table) -> Headers {
    table
        .iter()
        .map(|(key, value)| (key, value_to_core(value)))
        .collect()
}

fn value_to_wire(value: &HeaderValue) -> Value {
    match value {
        HeaderValue::Str(text) => Value::Str(text.clone()),
        HeaderValue::Int(number) => Value::I64(*number),
        HeaderValue::Float(number) => Value::F64(*number),
        HeaderValue::Bool(flag) => Value::Bool(*flag),
        HeaderValue::Bytes(bytes) => Value::Bytes(bytes.clone()),
        HeaderValue::List(values) => Value::List(values.iter().map(value_to_wire).collect()),
        HeaderValue::Map(map) => Value::Map(
            map.iter()
                .map(|(key, value)| (key.to_owned(), value_to_wire(value)))
                .collect(),
        ),
    }
}

/// Core headers as a wire table. Core headers were checked against the depth limit when
/// published, so encoding cannot fail.
pub fn headers_to_table(headers: &Headers) -> Table {
    if headers.is_empty() {
        return Table::new();
    }
    Table::try_from_entries(
        headers
            .iter()
            .map(|(key, value)| (key, value_to_wire(value))),
    )
    .expect("core headers respect the depth limit")
}

/// Reuses the `Arc<str>` of the previous publish when exchange or routing key repeat, which
/// they usually do: one allocation saved per message on the hot path.
#[derive(Debug, Default)]
pub struct NameCache {
    last: Option<Arc<str>>,
}

impl NameCache {
    /// The interned form of `text`.
    pub fn get(&mut self, text: &str) -> Arc<str> {
        match &self.last {
            Some(last) if **last == *text => last.clone(),
            _ => self.fresh(text),
        }
    }

    /// The interned form of a wire string: a repeat of the previous name is recognised by its
    /// bytes, without reading (and so re-validating) the string.
    pub fn get_wire(&mut self, text: &WireStr) -> Arc<str> {
        match &self.last {
            Some(last) if last.as_bytes() == &text.as_bytes()[..] => last.clone(),
            _ => self.fresh(text.as_str()),
        }
    }

    fn fresh(&mut self, text: &str) -> Arc<str> {
        let fresh: Arc<str> = text.into();
        self.last = Some(fresh.clone());
        fresh
    }
}

/// Names caches for publishes on one connection.
#[derive(Debug, Default)]
pub struct PublishNames {
    /// Exchange names.
    pub exchange: NameCache,
    /// Routing keys.
    pub routing_key: NameCache,
}

/// A published wire message as a core message, built in its shared allocation (a `Message` is
/// a few hundred bytes: moving it by value on the publish path cost more than the routing).
pub fn message_from_wire(
    names: &mut PublishNames,
    exchange: &WireStr,
    routing_key: &WireStr,
    properties: &Properties,
    body: Bytes,
) -> Arc<Message> {
    let mut shared = Arc::new(Message {
        exchange: names.exchange.get_wire(exchange),
        routing_key: names.routing_key.get_wire(routing_key),
        body,
        ..Message::default()
    });
    if properties.as_bytes().is_empty() {
        return shared;
    }
    // Destructured without `..`: a field added to `Message` fails to compile here until this
    // conversion sets it.
    let Message {
        exchange: _,
        routing_key: _,
        body: _,
        message_id,
        headers,
        content_type,
        content_encoding,
        timestamp_ms,
        correlation_id,
        reply_to,
        priority,
        expiration_ms,
        delay_ms,
        persistent,
    } = Arc::get_mut(&mut shared).expect("just created, not shared");
    let fields = properties.get();
    *message_id = fields.message_id.map(str::to_owned);
    *headers = fields
        .headers
        .iter()
        .map(|(key, value)| (key, value_to_core(value)))
        .collect();
    *content_type = fields.content_type.map(str::to_owned);
    *content_encoding = fields.content_encoding.map(str::to_owned);
    *timestamp_ms = (fields.timestamp_ms != 0).then_some(fields.timestamp_ms);
    *correlation_id = fields.correlation_id.map(str::to_owned);
    *reply_to = fields.reply_to.map(str::to_owned);
    *priority = fields.priority;
    *expiration_ms = fields.expiration_ms;
    *delay_ms = fields.delay_ms;
    *persistent = fields.persistent;
    shared
}

/// The wire properties of a core message (empty, with no allocation, when it has none).
pub fn properties_to_wire(message: &Message) -> Properties {
    // Exhaustive: a new `Message` field must be placed on the wire or named here as not sent.
    let Message {
        // Sent beside the properties, in the delivery itself.
        exchange: _,
        routing_key: _,
        body: _,
        message_id,
        headers,
        content_type,
        content_encoding,
        timestamp_ms,
        correlation_id,
        reply_to,
        priority,
        expiration_ms,
        delay_ms,
        persistent,
    } = message;
    let headers = headers_to_table(headers);
    let fields = PropertiesRef {
        priority: *priority,
        persistent: *persistent,
        timestamp_ms: timestamp_ms.unwrap_or(0),
        expiration_ms: *expiration_ms,
        delay_ms: *delay_ms,
        message_id: message_id.as_deref(),
        correlation_id: correlation_id.as_deref(),
        reply_to: reply_to.as_deref(),
        content_type: content_type.as_deref(),
        content_encoding: content_encoding.as_deref(),
        headers: headers.as_table_ref(),
    };
    Properties::try_from(fields).expect("core messages were validated when published")
}

/// A wire exchange kind as the core's.
pub fn core_kind(kind: ExchangeKind) -> wharf_core::ExchangeKind {
    match kind {
        ExchangeKind::Direct => wharf_core::ExchangeKind::Direct,
        ExchangeKind::Fanout => wharf_core::ExchangeKind::Fanout,
        ExchangeKind::Topic => wharf_core::ExchangeKind::Topic,
        ExchangeKind::Headers => wharf_core::ExchangeKind::Headers,
    }
}

/// A core exchange kind as the wire's.
pub fn wire_kind(kind: wharf_core::ExchangeKind) -> ExchangeKind {
    match kind {
        wharf_core::ExchangeKind::Direct => ExchangeKind::Direct,
        wharf_core::ExchangeKind::Fanout => ExchangeKind::Fanout,
        wharf_core::ExchangeKind::Topic => ExchangeKind::Topic,
        wharf_core::ExchangeKind::Headers => ExchangeKind::Headers,
    }
}

/// A queue's statistics as the wire's `QueueInfoV2` (protocol 1.1).
pub fn queue_info_v2(stats: QueueStats) -> QueueInfoV2 {
    QueueInfoV2 {
        name: stats.name,
        durable: stats.durable,
        exclusive: stats.exclusive,
        auto_delete: stats.auto_delete,
        ready: stats.ready,
        unacked: stats.unacked,
        consumers: stats.consumers,
        delayed: stats.delayed,
        ready_bytes: stats.ready_bytes,
        published: stats.published,
        delivered: stats.delivered,
        redelivered: stats.redelivered,
        acked: stats.acked,
        dropped: stats.dropped,
        expired: stats.expired,
        duplicates: stats.duplicates,
    }
}

/// A queue's statistics as the wire's `QueueInfo` (protocol 1.0).
pub fn queue_info(stats: QueueStats) -> QueueInfo {
    QueueInfo {
        name: stats.name,
        durable: stats.durable,
        exclusive: stats.exclusive,
        auto_delete: stats.auto_delete,
        ready: stats.ready,
        unacked: stats.unacked,
        consumers: stats.consumers,
    }
}

/// A binding's wire destination as the core's bind target.
pub fn bind_target(destination: Destination) -> BindTarget {
    match destination {
        Destination::Queue(name) => BindTarget::Queue(name),
        Destination::Exchange(name) => BindTarget::Exchange(name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_through_the_wire_table_with_every_value_type() {
        let nested: Headers = [("inner", HeaderValue::Int(1))].into_iter().collect();
        let headers = Headers::new()
            .with("s", "text")
            .with("i", -5i64)
            .with("f", 1.5f64)
            .with("b", true)
            .with("raw", HeaderValue::Bytes(Bytes::from_static(b"\x00\x01")))
            .with(
                "list",
                HeaderValue::List(vec![HeaderValue::Int(1), HeaderValue::Str("x".into())]),
            )
            .with("map", HeaderValue::Map(nested));
        let table = headers_to_table(&headers);
        assert_eq!(table_to_headers(&table), headers);
    }

    #[test]
    fn message_metadata_survives_wire_to_core_to_wire() {
        let headers = headers_to_table(&Headers::new().with("k", "v"));
        let fields = PropertiesRef {
            message_id: Some("m-1"),
            correlation_id: Some("c-1"),
            reply_to: Some("replies"),
            content_type: Some("text/plain"),
            content_encoding: Some("gzip"),
            timestamp_ms: 1_700_000_000_000,
            expiration_ms: Some(5_000),
            delay_ms: Some(250),
            priority: 7,
            persistent: true,
            headers: headers.as_table_ref(),
        };
        let properties = Properties::try_from(fields).unwrap();
        let mut names = PublishNames::default();
        let message = message_from_wire(
            &mut names,
            &WireStr::from("ex"),
            &WireStr::from("rk"),
            &properties,
            Bytes::from_static(b"body"),
        );
        assert_eq!(&*message.exchange, "ex");
        assert_eq!(message.headers, Headers::new().with("k", "v"));
        assert_eq!(message.delay_ms, Some(250));
        assert_eq!(properties_to_wire(&message), properties);
        let again = message_from_wire(
            &mut names,
            &WireStr::from("ex"),
            &WireStr::from("rk"),
            &Properties::default(),
            Bytes::new(),
        );
        assert!(
            Arc::ptr_eq(&message.exchange, &again.exchange),
            "repeated names are shared"
        );
        assert_eq!(properties_to_wire(&again), Properties::default());
    }
}
