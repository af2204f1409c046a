//! Outgoing messages: [`Message`] and typed header values.

use crate::error::ClientError;
use bytes::Bytes;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use wharf_protocol::{MINOR_QUEUE_FEATURES, Properties, PropertiesRef, Table, Value};

/// Converts Rust values into typed table values (message headers, queue and binding
/// arguments).
pub trait IntoValue {
    /// The table value.
    fn into_value(self) -> Value;
}

impl IntoValue for Value {
    fn into_value(self) -> Value {
        self
    }
}

impl IntoValue for &str {
    fn into_value(self) -> Value {
        Value::Str(self.to_owned())
    }
}

impl IntoValue for String {
    fn into_value(self) -> Value {
        Value::Str(self)
    }
}

impl IntoValue for bool {
    fn into_value(self) -> Value {
        Value::Bool(self)
    }
}

impl IntoValue for f64 {
    fn into_value(self) -> Value {
        Value::F64(self)
    }
}

impl IntoValue for Bytes {
    fn into_value(self) -> Value {
        Value::Bytes(self)
    }
}

impl IntoValue for Vec<u8> {
    fn into_value(self) -> Value {
        Value::Bytes(Bytes::from(self))
    }
}

macro_rules! into_i64_value {
    ($($int:ty),*) => {$(
        impl IntoValue for $int {
            fn into_value(self) -> Value {
                Value::I64(i64::from(self))
            }
        }
    )*};
}
into_i64_value!(i8, i16, i32, i64, u8, u16, u32);

/// Builds a table from owned entries; the only failure is nesting deeper than the protocol
/// allows.
pub(crate) fn build_table(
    what: &'static str,
    entries: Vec<(String, Value)>,
) -> Result<Table, ClientError> {
    if entries.is_empty() {
        return Ok(Table::new());
    }
    Table::try_from_entries(entries).map_err(|err| ClientError::InvalidArgument {
        what,
        detail: err.to_string(),
    })
}

/// A message to publish: a body plus properties, built fluently.
///
/// ```
/// use std::time::Duration;
/// use wharf_client::Message;
///
/// let message = Message::new("order #42")
///     .content_type("text/plain")
///     .message_id("order-42")
///     .header("region", "eu")
///     .header("attempt", 1)
///     .priority(5)
///     .expiration(Duration::from_secs(60))
///     .persistent(true);
/// assert_eq!(&message.body()[..], b"order #42");
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Message {
    body: Bytes,
    message_id: Option<String>,
    correlation_id: Option<String>,
    reply_to: Option<String>,
    content_type: Option<String>,
    content_encoding: Option<String>,
    timestamp_ms: u64,
    expiration_ms: Option<u64>,
    delay_ms: Option<u64>,
    priority: u8,
    persistent: bool,
    headers: Vec<(String, Value)>,
}

impl Message {
    /// A message with `body` (`&'static str`, `String`, `Vec<u8>`, `Bytes`, ...) and no
    /// properties. Not persistent unless [`Message::persistent`] is set.
    pub fn new(body: impl Into<Bytes>) -> Message {
        Message {
            body: body.into(),
            ..Message::default()
        }
    }

    /// A message whose body is a copy of `body` (for borrowed `&str` / `&[u8]`).
    pub fn copy_from(body: impl AsRef<[u8]>) -> Message {
        Message::new(Bytes::copy_from_slice(body.as_ref()))
    }

    /// The body.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// Adds an application header (typed; also matched by headers exchanges). Keys keep
    /// their insertion order; a repeated key is sent twice and readers see the first.
    pub fn header(mut self, key: impl Into<String>, value: impl IntoValue) -> Message {
        self.headers.push((key.into(), value.into_value()));
        self
    }

    /// Application message id (the deduplication key, if the broker deduplicates).
    pub fn message_id(mut self, message_id: impl Into<String>) -> Message {
        self.message_id = Some(message_id.into());
        self
    }

    /// MIME type of the body.
    pub fn content_type(mut self, content_type: impl Into<String>) -> Message {
        self.content_type = Some(content_type.into());
        self
    }

    /// Encoding of the body (e.g. `gzip`).
    pub fn content_encoding(mut self, content_encoding: impl Into<String>) -> Message {
        self.content_encoding = Some(content_encoding.into());
        self
    }

    /// Correlates a reply with its request.
    pub fn correlation_id(mut self, correlation_id: impl Into<String>) -> Message {
        self.correlation_id = Some(correlation_id.into());
        self
    }

    /// Queue the consumer should reply to.
    pub fn reply_to(mut self, reply_to: impl Into<String>) -> Message {
        self.reply_to = Some(reply_to.into());
        self
    }

    /// Priority 0 (lowest, default) to 255; queues clamp it to their own maximum.
    pub fn priority(mut self, priority: u8) -> Message {
        self.priority = priority;
        self
    }

    /// Per-message time to live (millisecond precision, saturating).
    pub fn expiration(mut self, ttl: Duration) -> Message {
        self.expiration_ms = Some(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
        self
    }

    /// Delayed delivery (protocol 1.1): each queue the message is routed to holds it this long
    /// (millisecond precision, saturating) before a consumer can get it. The publish is
    /// confirmed at once; the queue counts the message as `delayed` until then. A persistent
    /// delayed message in a durable queue survives a restart. Publishing it to a server older
    /// than protocol 1.1 fails with [`ClientError::NotSupported`] (nothing is sent).
    pub fn delay(mut self, delay: Duration) -> Message {
        self.delay_ms = Some(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX));
        self
    }

    /// Delayed delivery until a point in time: the delay from now on this machine's clock
    /// (a time already past means no delay). The broker holds the message until then.
    pub fn deliver_at(self, at: SystemTime) -> Message {
        let delay = at
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        self.delay(delay)
    }

    /// Store the message on disk when it lands in a durable queue (default: not persistent).
    pub fn persistent(mut self, persistent: bool) -> Message {
        self.persistent = persistent;
        self
    }

    /// Publisher timestamp (millisecond precision; times before 1970 are sent as "not set").
    pub fn timestamp(mut self, timestamp: SystemTime) -> Message {
        let since_epoch = timestamp.duration_since(UNIX_EPOCH).unwrap_or_default();
        self.timestamp_ms = u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX);
        self
    }

    /// Converts into the wire properties and body for a server speaking `protocol_minor`.
    pub(crate) fn into_wire(self, protocol_minor: u16) -> Result<(Properties, Bytes), ClientError> {
        if self.delay_ms.is_some() && protocol_minor < MINOR_QUEUE_FEATURES {
            return Err(ClientError::NotSupported {
                feature: "delayed delivery",
                minor_required: MINOR_QUEUE_FEATURES,
                server_minor: protocol_minor,
            });
        }
        let headers = build_table("headers", self.headers)?;
        let fields = PropertiesRef {
            priority: self.priority,
            persistent: self.persistent,
            timestamp_ms: self.timestamp_ms,
            expiration_ms: self.expiration_ms,
            delay_ms: self.delay_ms,
            message_id: self.message_id.as_deref(),
            correlation_id: self.correlation_id.as_deref(),
            reply_to: self.reply_to.as_deref(),
            content_type: self.content_type.as_deref(),
            content_encoding: self.content_encoding.as_deref(),
            headers: headers.as_table_ref(),
        };
        let properties =
            Properties::try_from(fields).map_err(|err| ClientError::InvalidArgument {
                what: "message properties",
                detail: err.to_string(),
            })?;
        Ok((properties, self.body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_sets_every_property_and_typed_headers() {
        let (properties, body) = Message::copy_from(String::from("hi"))
            .message_id("m1")
            .content_type("text/plain")
            .content_encoding("identity")
            .correlation_id("c1")
            .reply_to("replies")
            .priority(9)
            .expiration(Duration::from_millis(1500))
            .delay(Duration::from_millis(250))
            .persistent(true)
            .timestamp(UNIX_EPOCH + Duration::from_millis(42))
            .header("n", 7u32)
            .header("flag", true)
            .header("name", "x")
            .into_wire(MINOR_QUEUE_FEATURES)
            .unwrap();
        assert_eq!(&body[..], b"hi");
        assert_eq!(properties.message_id(), Some("m1"));
        assert_eq!(properties.content_type(), Some("text/plain"));
        assert_eq!(properties.content_encoding(), Some("identity"));
        assert_eq!(properties.correlation_id(), Some("c1"));
        assert_eq!(properties.reply_to(), Some("replies"));
        assert_eq!(
            (
                properties.priority(),
                properties.expiration_ms(),
                properties.persistent()
            ),
            (9, Some(1500), true)
        );
        assert_eq!(properties.timestamp_ms(), 42);
        assert_eq!(properties.get().delay_ms, Some(250));
        assert_eq!(
            properties.header("n").and_then(|value| value.as_i64()),
            Some(7)
        );
        assert_eq!(
            properties.header("flag").and_then(|value| value.as_bool()),
            Some(true)
        );
        assert_eq!(
            properties.header("name").and_then(|value| value.as_str()),
            Some("x")
        );
    }

    #[test]
    fn deliver_at_is_the_delay_from_now_and_a_past_time_is_no_delay() {
        let delay_of = |message: Message| {
            let (properties, _) = message.into_wire(MINOR_QUEUE_FEATURES).unwrap();
            properties.get().delay_ms.unwrap()
        };
        let later =
            delay_of(Message::new("x").deliver_at(SystemTime::now() + Duration::from_secs(60)));
        assert!((59_000..=60_000).contains(&later), "{later}");
        let past = delay_of(Message::new("x").deliver_at(UNIX_EPOCH));
        assert_eq!(past, 0);
    }

    #[test]
    fn a_delay_is_refused_locally_for_a_server_without_delayed_delivery() {
        let err = Message::new("x")
            .delay(Duration::from_secs(1))
            .into_wire(0)
            .unwrap_err();
        assert!(
            matches!(
                err,
                ClientError::NotSupported {
                    feature: "delayed delivery",
                    server_minor: 0,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(Message::new("x").into_wire(0).is_ok());
    }

    #[test]
    fn headers_nested_too_deep_are_an_invalid_argument() {
        let mut value = Value::I64(1);
        for _ in 0..=wharf_protocol::limits::TABLE_DEPTH_MAX {
            value = Value::List(vec![value]);
        }
        let err = Message::new("x")
            .header("deep", value)
            .into_wire(MINOR_QUEUE_FEATURES)
            .unwrap_err();
        assert!(matches!(
            err,
            ClientError::InvalidArgument {
                what: "headers",
                ..
            }
        ));
    }
}
