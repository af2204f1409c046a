//! `Properties`: a message's metadata as one validated, zero-copy blob with typed accessors.
//!
//! The blob travels as a postcard `bytes` field. Empty means "all defaults"; otherwise it holds,
//! in order: `priority: u8`, `persistent: bool`, `timestamp_ms: u64`, `expiration_ms:
//! Option<u64>`, `delay_ms: Option<u64>`, then five `Option<string>` (`message_id`,
//! `correlation_id`, `reply_to`, `content_type`, `content_encoding`, each at most
//! `NAME_BYTES_MAX` bytes), then the headers: table entries up to the end of the blob.
//!
//! Why a blob: decoding a message validates it in one allocation-free walk and keeps it as one
//! shared slice of the frame (one reference count, not one per field), the server can store
//! and forward it to consumers without re-encoding, and a `Deliver` carries it unchanged.

use crate::error::Error;
use crate::table::{self, TableIter, TableRef, ValueRef};
use crate::wire::{self, Reader, check_name};
use bytes::{BufMut, Bytes, BytesMut};
use std::fmt;

/// A message's properties: a validated blob (layout in the module docs). Every accessor is
/// infallible. Build one with [`Properties::try_from`] a [`PropertiesRef`].
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Properties(Bytes);

/// The properties' fields, borrowed: what [`Properties::get`] returns and what
/// [`Properties::try_from`] encodes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PropertiesRef<'a> {
    /// Priority, 0 (lowest) to 255; queues clamp it to their own maximum.
    pub priority: u8,
    /// Store to disk in a durable queue.
    pub persistent: bool,
    /// Publisher timestamp, ms since the Unix epoch; 0 = not set.
    pub timestamp_ms: u64,
    /// Per-message TTL in ms.
    pub expiration_ms: Option<u64>,
    /// Delayed delivery: ms after the publish before the message becomes ready (honoured
    /// from protocol 1.1 on).
    pub delay_ms: Option<u64>,
    /// Application message id (also the deduplication key of queues with `x-dedup-window`).
    pub message_id: Option<&'a str>,
    /// Correlates a reply with its request.
    pub correlation_id: Option<&'a str>,
    /// Queue the consumer should reply to.
    pub reply_to: Option<&'a str>,
    /// MIME type of the body.
    pub content_type: Option<&'a str>,
    /// Encoding of the body (e.g. `gzip`).
    pub content_encoding: Option<&'a str>,
    /// Application headers (also matched by headers exchanges).
    pub headers: TableRef<'a>,
}

/// Validation walk: checks everything [`parse`] checks, without building strings.
#[inline]
pub(crate) fn validate(blob: &[u8]) -> Result<(), Error> {
    if blob.is_empty() {
        return Ok(());
    }
    let mut reader = Reader::new(blob, "properties");
    reader.u8()?;
    reader.bool()?;
    reader.u64()?;
    for _ in 0..2 {
        if reader.option_tag()? {
            reader.u64()?;
        }
    }
    for _ in 0..5 {
        if reader.option_tag()? {
            reader.name()?;
        }
    }
    table::validate(reader.remaining())
}

fn parse(blob: &[u8]) -> Result<PropertiesRef<'_>, Error> {
    if blob.is_empty() {
        return Ok(PropertiesRef::default());
    }
    let mut reader = Reader::new(blob, "properties");
    let priority = reader.u8()?;
    let persistent = reader.bool()?;
    let timestamp_ms = reader.u64()?;
    let expiration_ms = opt_u64(&mut reader)?;
    let delay_ms = opt_u64(&mut reader)?;
    let message_id = opt_str(&mut reader)?;
    let correlation_id = opt_str(&mut reader)?;
    let reply_to = opt_str(&mut reader)?;
    let content_type = opt_str(&mut reader)?;
    let content_encoding = opt_str(&mut reader)?;
    let headers = reader.remaining();
    table::validate(headers)?;
    Ok(PropertiesRef {
        priority,
        persistent,
        timestamp_ms,
        expiration_ms,
        delay_ms,
        message_id,
        correlation_id,
        reply_to,
        content_type,
        content_encoding,
        headers: TableRef::from_validated(headers),
    })
}

fn opt_u64(reader: &mut Reader<'_>) -> Result<Option<u64>, Error> {
    if reader.option_tag()? {
        Ok(Some(reader.u64()?))
    } else {
        Ok(None)
    }
}

fn opt_str<'a>(reader: &mut Reader<'a>) -> Result<Option<&'a str>, Error> {
    if !reader.option_tag()? {
        return Ok(None);
    }
    let text = reader.str()?;
    check_name(text)?;
    Ok(Some(text))
}

impl Properties {
    /// All defaults (an empty blob).
    pub const fn new() -> Properties {
        Properties(Bytes::new())
    }

    /// Validates `blob` (e.g. read back from storage) and wraps it without copying.
    pub fn from_bytes(blob: Bytes) -> Result<Properties, Error> {
        validate(&blob)?;
        Ok(Properties(blob))
    }

    /// Validates `blob`, a sub-slice of `frame`, and shares `frame`'s buffer.
    #[inline]
    pub(crate) fn from_frame_slice(frame: &Bytes, blob: &[u8]) -> Result<Properties, Error> {
        validate(blob)?;
        Ok(Properties(frame.slice_ref(blob)))
    }

    /// The encoded blob (store it as is; [`Properties::from_bytes`] reads it back).
    pub fn as_bytes(&self) -> &Bytes {
        &self.0
    }

    /// Every field, borrowed. Parses the blob (a few nanoseconds); prefer one call over many
    /// single-field accessors when reading several fields.
    pub fn get(&self) -> PropertiesRef<'_> {
        // Cannot fail: the blob was validated when built or decoded.
        parse(&self.0).unwrap_or_default()
    }

    /// Priority (0 = lowest).
    pub fn priority(&self) -> u8 {
        self.0.first().copied().unwrap_or(0)
    }

    /// Whether the message should be stored to disk in a durable queue.
    pub fn persistent(&self) -> bool {
        self.0.get(1) == Some(&1)
    }

    /// Publisher timestamp in ms since the Unix epoch (0 = not set).
    pub fn timestamp_ms(&self) -> u64 {
        self.get().timestamp_ms
    }

    /// Per-message TTL in ms.
    pub fn expiration_ms(&self) -> Option<u64> {
        self.get().expiration_ms
    }

    /// Requested delivery delay in ms.
    pub fn delay_ms(&self) -> Option<u64> {
        self.get().delay_ms
    }

    /// Application message id.
    pub fn message_id(&self) -> Option<&str> {
        self.get().message_id
    }

    /// Correlation id.
    pub fn correlation_id(&self) -> Option<&str> {
        self.get().correlation_id
    }

    /// Reply-to queue.
    pub fn reply_to(&self) -> Option<&str> {
        self.get().reply_to
    }

    /// MIME type of the body.
    pub fn content_type(&self) -> Option<&str> {
        self.get().content_type
    }

    /// Encoding of the body.
    pub fn content_encoding(&self) -> Option<&str> {
        self.get().content_encoding
    }

    /// Application headers.
    pub fn headers(&self) -> TableRef<'_> {
        self.get().headers
    }

    /// The first header named `key`.
    pub fn header(&self, key: &str) -> Option<ValueRef<'_>> {
        self.headers().get(key)
    }

    /// The headers in order.
    pub fn headers_iter(&self) -> TableIter<'_> {
        self.headers().iter()
    }
}

/// Encodes the fields; fails if a string is longer than
/// [`NAME_BYTES_MAX`](crate::limits::NAME_BYTES_MAX). All-default fields encode as the empty blob.
impl TryFrom<PropertiesRef<'_>> for Properties {
    type Error = Error;

    fn try_from(fields: PropertiesRef<'_>) -> Result<Properties, Error> {
        if fields == PropertiesRef::default() {
            return Ok(Properties::new());
        }
        let mut dst = BytesMut::new();
        dst.put_u8(fields.priority);
        wire::put_bool(&mut dst, fields.persistent);
        wire::put_varint(&mut dst, fields.timestamp_ms);
        wire::put_option_u64(&mut dst, fields.expiration_ms);
        wire::put_option_u64(&mut dst, fields.delay_ms);
        for text in [
            fields.message_id,
            fields.correlation_id,
            fields.reply_to,
            fields.content_type,
            fields.content_encoding,
        ] {
            if let Some(text) = text {
                check_name(text)?;
            }
            wire::put_option_str(&mut dst, text);
        }
        dst.extend_from_slice(fields.headers.as_bytes());
        Ok(Properties(dst.freeze()))
    }
}

impl fmt::Debug for Properties {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.get(), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Table, Value};

    #[test]
    fn fields_round_trip_and_defaults_are_empty() {
        assert!(
            Properties::try_from(PropertiesRef::default())
                .unwrap()
                .as_bytes()
                .is_empty()
        );
        let headers = Table::try_from_entries([("k", Value::I64(-1))]).unwrap();
        let fields = PropertiesRef {
            priority: 7,
            persistent: true,
            timestamp_ms: 1_700_000_000_000,
            expiration_ms: Some(5),
            delay_ms: None,
            message_id: Some("id"),
            correlation_id: None,
            reply_to: Some("replies"),
            content_type: Some("text/plain"),
            content_encoding: None,
            headers: headers.as_table_ref(),
        };
        let properties = Properties::try_from(fields).unwrap();
        assert_eq!(properties.get(), fields);
        assert_eq!(properties.priority(), 7);
        assert!(properties.persistent());
        assert_eq!(properties.header("k"), Some(ValueRef::I64(-1)));
        assert_eq!(
            Properties::from_bytes(properties.as_bytes().clone()).unwrap(),
            properties
        );
    }

    #[test]
    fn validate_and_parse_agree_on_arbitrary_blobs() {
        // Deterministic pseudo-random blobs (xorshift, seed printed on failure).
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for case in 0..20_000 {
            let seed = state;
            let mut blob = Vec::new();
            let len = (state % 24) as usize;
            for _ in 0..len {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                blob.push(if state.is_multiple_of(3) {
                    (state >> 8) as u8 % 3
                } else {
                    (state >> 16) as u8
                });
            }
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            assert_eq!(
                validate(&blob).is_ok(),
                parse(&blob).is_ok(),
                "case {case} seed {seed:#x} blob {blob:?}"
            );
        }
    }

    #[test]
    fn over_long_string_is_refused() {
        let long = "x".repeat(crate::limits::NAME_BYTES_MAX + 1);
        let fields = PropertiesRef {
            message_id: Some(&long),
            ..PropertiesRef::default()
        };
        assert!(matches!(
            Properties::try_from(fields),
            Err(Error::LimitExceeded { .. })
        ));
    }
}
