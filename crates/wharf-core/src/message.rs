//! Messages and their metadata, as the core sees them (not the wire or disk format).

use bytes::Bytes;
use std::sync::Arc;

/// A typed header value. Floats compare by bit pattern so that equality is total.
#[derive(Debug, Clone)]
pub enum HeaderValue {
    /// UTF-8 text.
    Str(String),
    /// A signed integer.
    Int(i64),
    /// A double.
    Float(f64),
    /// A boolean.
    Bool(bool),
    /// Raw bytes.
    Bytes(Bytes),
    /// A list of values.
    List(Vec<HeaderValue>),
    /// A nested map.
    Map(Headers),
}

impl PartialEq for HeaderValue {
    fn eq(&self, other: &Self) -> bool {
        use HeaderValue::*;
        match (self, other) {
            (Str(a), Str(b)) => a == b,
            (Int(a), Int(b)) => a == b,
            (Float(a), Float(b)) => a.to_bits() == b.to_bits(),
            (Bool(a), Bool(b)) => a == b,
            (Bytes(a), Bytes(b)) => a == b,
            (List(a), List(b)) => a == b,
            (Map(a), Map(b)) => a == b,
            _ => false,
        }
    }
}
impl Eq for HeaderValue {}

impl HeaderValue {
    /// The value as text, if it is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            HeaderValue::Str(text) => Some(text),
            _ => None,
        }
    }

    /// The nesting depth: 1 for a scalar.
    pub fn depth(&self) -> usize {
        match self {
            HeaderValue::List(values) => {
                1 + values.iter().map(HeaderValue::depth).max().unwrap_or(0)
            }
            HeaderValue::Map(map) => 1 + map.depth(),
            _ => 1,
        }
    }
}

impl From<&str> for HeaderValue {
    fn from(text: &str) -> Self {
        HeaderValue::Str(text.to_owned())
    }
}
impl From<String> for HeaderValue {
    fn from(text: String) -> Self {
        HeaderValue::Str(text)
    }
}
impl From<i64> for HeaderValue {
    fn from(value: i64) -> Self {
        HeaderValue::Int(value)
    }
}
impl From<bool> for HeaderValue {
    fn from(value: bool) -> Self {
        HeaderValue::Bool(value)
    }
}
impl From<f64> for HeaderValue {
    fn from(value: f64) -> Self {
        HeaderValue::Float(value)
    }
}

/// An ordered map of header names to typed values. Insertion order is kept (it is what the
/// publisher sent); keys are unique.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers {
    entries: Vec<(String, HeaderValue)>,
}

impl Headers {
    /// An empty map.
    pub fn new() -> Self {
        Headers {
            entries: Vec::new(),
        }
    }

    /// Sets `key` to `value`, replacing an earlier value in place (keeping its position).
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<HeaderValue>) {
        let key = key.into();
        let value = value.into();
        match self
            .entries
            .iter_mut()
            .find(|(existing, _)| *existing == key)
        {
            Some(slot) => slot.1 = value,
            None => self.entries.push((key, value)),
        }
    }

    /// Builder form of [`Headers::insert`].
    pub fn with(mut self, key: impl Into<String>, value: impl Into<HeaderValue>) -> Self {
        self.insert(key, value);
        self
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&HeaderValue> {
        self.entries
            .iter()
            .find(|(existing, _)| existing == key)
            .map(|(_, value)| value)
    }

    /// Removes `key`, returning its value.
    pub fn remove(&mut self, key: &str) -> Option<HeaderValue> {
        let idx = self
            .entries
            .iter()
            .position(|(existing, _)| existing == key)?;
        Some(self.entries.remove(idx).1)
    }

    /// Entries in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &HeaderValue)> {
        self.entries
            .iter()
            .map(|(key, value)| (key.as_str(), value))
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when there are no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The nesting depth of the deepest value (0 when empty).
    pub fn depth(&self) -> usize {
        self.entries
            .iter()
            .map(|(_, value)| value.depth())
            .max()
            .unwrap_or(0)
    }
}

impl<K: Into<String>, V: Into<HeaderValue>> FromIterator<(K, V)> for Headers {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut headers = Headers::new();
        for (key, value) in iter {
            headers.insert(key, value);
        }
        headers
    }
}

/// A published message. It is shared (`Arc`) by every queue it is routed to, so fanout never
/// copies the body or the metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    /// The exchange it was published to (`""` for the default exchange).
    pub exchange: Arc<str>,
    /// The routing key it was published with.
    pub routing_key: Arc<str>,
    /// The producer's message id, if it set one.
    pub message_id: Option<String>,
    /// Typed application headers.
    pub headers: Headers,
    /// MIME content type, e.g. `application/json`.
    pub content_type: Option<String>,
    /// Content encoding, e.g. `gzip`.
    pub content_encoding: Option<String>,
    /// Producer's timestamp, milliseconds since the Unix epoch.
    pub timestamp_ms: Option<u64>,
    /// Correlation id (RPC).
    pub correlation_id: Option<String>,
    /// Reply-to queue (RPC).
    pub reply_to: Option<String>,
    /// Priority, 0 (lowest, the default) to 255.
    pub priority: u8,
    /// Time to live in milliseconds: how long it may stay ready in a queue (the queue's
    /// `x-message-ttl`, if shorter, wins). Counted from when it enters the queue.
    pub expiration_ms: Option<u64>,
    /// Delayed delivery: it enters its queues this many milliseconds after publication.
    pub delay_ms: Option<u64>,
    /// Persistent messages routed to durable queues are written to the log.
    pub persistent: bool,
    /// The body; cloning it is a reference count increment.
    pub body: Bytes,
}

impl Message {
    /// A message with the given routing key and body and default metadata.
    pub fn new(routing_key: &str, body: impl Into<Bytes>) -> Self {
        Message {
            routing_key: routing_key.into(),
            body: body.into(),
            ..Message::default()
        }
    }

    /// Bytes the message accounts for in a queue (body only: metadata is bounded and small).
    pub fn size_bytes(&self) -> u64 {
        self.body.len() as u64
    }
}
