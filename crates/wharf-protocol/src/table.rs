//! `Table`: ordered, typed key/value lists (message headers, declare and bind arguments).
//!
//! A table travels as one length-prefixed blob that is validated once at decode and then read
//! lazily: decoding a message costs one validation walk and no allocation, and every accessor
//! on a validated table is infallible.
//!
//! Blob layout (postcard-compatible): a sequence of entries until the blob ends, each entry a
//! string key followed by a value. A value is a varint type tag and its content:
//! `0` string, `1` i64 (zigzag varint), `2` f64 (8 bytes little-endian), `3` bool (one byte),
//! `4` bytes (varint length + bytes), `5` list (varint count + values), `6` map (varint count +
//! entries). Lists and maps nest at most [`TABLE_DEPTH_MAX`] deep.

use crate::error::Error;
use crate::limits::TABLE_DEPTH_MAX;
use crate::wire::{self, Reader};
use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

const TAG_STR: u32 = 0;
const TAG_I64: u32 = 1;
const TAG_F64: u32 = 2;
const TAG_BOOL: u32 = 3;
const TAG_BYTES: u32 = 4;
const TAG_LIST: u32 = 5;
const TAG_MAP: u32 = 6;

/// A validated, immutable table of `(key, value)` entries in insertion order. Duplicate keys are
/// allowed on the wire; [`Table::get`] returns the first.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Table(Bytes);

/// A validated table borrowed from a larger buffer (e.g. a message's [`Properties`]).
///
/// [`Properties`]: crate::Properties
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct TableRef<'a>(&'a [u8]);

/// An owned table value, for building tables and for [`Table::to_entries`].
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// UTF-8 string.
    Str(String),
    /// Signed integer.
    I64(i64),
    /// IEEE-754 double.
    F64(f64),
    /// Boolean.
    Bool(bool),
    /// Raw bytes.
    Bytes(Bytes),
    /// Ordered list of values.
    List(Vec<Value>),
    /// Nested table (ordered entries).
    Map(Vec<(String, Value)>),
}

/// A value borrowed from a validated table.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ValueRef<'a> {
    /// UTF-8 string.
    Str(&'a str),
    /// Signed integer.
    I64(i64),
    /// IEEE-754 double.
    F64(f64),
    /// Boolean.
    Bool(bool),
    /// Raw bytes.
    Bytes(&'a [u8]),
    /// Ordered list of values.
    List(ListRef<'a>),
    /// Nested table.
    Map(MapRef<'a>),
}

/// A validated list inside a table; iterate it with [`ListRef::iter`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ListRef<'a> {
    items: &'a [u8],
    n_items: u64,
}

/// A validated nested map inside a table; iterate it with [`MapRef::iter`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MapRef<'a> {
    entries: &'a [u8],
    n_entries: u64,
}

/// Parses (and so validates) one value; `depth` is the nesting level of the value itself.
fn read_value<'a>(reader: &mut Reader<'a>, depth: u32) -> Result<ValueRef<'a>, Error> {
    let tag = reader.u32()?;
    Ok(match tag {
        TAG_STR => ValueRef::Str(reader.str()?),
        TAG_I64 => ValueRef::I64(reader.i64()?),
        TAG_F64 => ValueRef::F64(reader.f64()?),
        TAG_BOOL => ValueRef::Bool(reader.bool()?),
        TAG_BYTES => ValueRef::Bytes(reader.bytes()?),
        TAG_LIST | TAG_MAP => {
            if depth >= TABLE_DEPTH_MAX {
                return Err(Error::LimitExceeded {
                    what: "table nesting depth",
                    len: u64::from(depth) + 1,
                    max: u64::from(TABLE_DEPTH_MAX),
                });
            }
            let count = reader.u64()?;
            let start = reader.remaining();
            for _ in 0..count {
                // Each item consumes at least one byte, so a hostile count fails at the end of
                // the blob instead of looping long.
                if tag == TAG_MAP {
                    reader.str()?;
                }
                read_value(reader, depth + 1)?;
            }
            let used = start.len() - reader.remaining_len();
            let span = &start[..used];
            if tag == TAG_LIST {
                ValueRef::List(ListRef {
                    items: span,
                    n_items: count,
                })
            } else {
                ValueRef::Map(MapRef {
                    entries: span,
                    n_entries: count,
                })
            }
        }
        _ => return Err(reader.malformed("unknown table value type")),
    })
}

/// Walks a blob, checking every entry, without building anything.
pub(crate) fn validate(blob: &[u8]) -> Result<(), Error> {
    let mut reader = Reader::new(blob, "table");
    while reader.remaining_len() > 0 {
        reader.str_bytes()?;
        skip_value(&mut reader, 0)?;
    }
    Ok(())
}

/// Checks one value like [`read_value`] does, without producing it.
fn skip_value(reader: &mut Reader<'_>, depth: u32) -> Result<(), Error> {
    match reader.u32()? {
        TAG_STR => {
            reader.str_bytes()?;
        }
        TAG_I64 => {
            reader.i64()?;
        }
        TAG_F64 => {
            reader.take(8)?;
        }
        TAG_BOOL => {
            reader.bool()?;
        }
        TAG_BYTES => {
            reader.bytes()?;
        }
        tag @ (TAG_LIST | TAG_MAP) => {
            check_depth(depth)?;
            let count = reader.u64()?;
            for _ in 0..count {
                // Each item consumes at least one byte, so a hostile count fails at the end of
                // the blob instead of looping long.
                if tag == TAG_MAP {
                    reader.str_bytes()?;
                }
                skip_value(reader, depth + 1)?;
            }
        }
        _ => return Err(reader.malformed("unknown table value type")),
    }
    Ok(())
}

impl Table {
    /// The empty table (zero bytes on the wire besides its length).
    pub const fn new() -> Table {
        Table(Bytes::new())
    }

    /// Validates `blob` (layout in the module docs) and wraps it without copying.
    pub fn from_bytes(blob: Bytes) -> Result<Table, Error> {
        validate(&blob)?;
        Ok(Table(blob))
    }

    /// Builds a table from owned entries, in order. Fails only if a value nests deeper than
    /// [`TABLE_DEPTH_MAX`].
    pub fn try_from_entries<K, I>(entries: I) -> Result<Table, Error>
    where
        K: AsRef<str>,
        I: IntoIterator<Item = (K, Value)>,
    {
        let mut dst = BytesMut::new();
        for (key, value) in entries {
            wire::put_str(&mut dst, key.as_ref());
            put_value(&mut dst, &value, 0)?;
        }
        Ok(Table(dst.freeze()))
    }

    /// The encoded blob (layout in the module docs).
    pub fn as_bytes(&self) -> &Bytes {
        &self.0
    }

    /// Borrows the table.
    pub fn as_table_ref(&self) -> TableRef<'_> {
        TableRef(&self.0)
    }

    /// Whether the table has no entries.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Number of top-level entries (walks the table).
    pub fn len(&self) -> usize {
        self.as_table_ref().len()
    }

    /// The entries in order.
    pub fn iter(&self) -> TableIter<'_> {
        self.as_table_ref().iter()
    }

    /// The first value stored under `key`.
    pub fn get(&self, key: &str) -> Option<ValueRef<'_>> {
        self.as_table_ref().get(key)
    }

    /// Copies the entries out as owned values.
    pub fn to_entries(&self) -> Vec<(String, Value)> {
        self.as_table_ref().to_entries()
    }
}

impl<'a> TableRef<'a> {
    /// Wraps a blob that [`validate`] accepted.
    pub(crate) fn from_validated(blob: &'a [u8]) -> TableRef<'a> {
        TableRef(blob)
    }

    /// The encoded blob.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.0
    }

    /// Whether the table has no entries.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Number of top-level entries (walks the table).
    pub fn len(&self) -> usize {
        self.iter().count()
    }

    /// The entries in order.
    pub fn iter(&self) -> TableIter<'a> {
        TableIter {
            reader: Reader::new(self.0, "table"),
            n_left: u64::MAX,
        }
    }

    /// The first value stored under `key`.
    pub fn get(&self, key: &str) -> Option<ValueRef<'a>> {
        self.iter()
            .find(|(entry_key, _)| *entry_key == key)
            .map(|(_, value)| value)
    }

    /// Copies the entries out as owned values.
    pub fn to_entries(&self) -> Vec<(String, Value)> {
        self.iter()
            .map(|(key, value)| (key.to_owned(), value.to_owned_value()))
            .collect()
    }

    /// Copies the table out.
    pub fn to_table(&self) -> Table {
        Table(Bytes::copy_from_slice(self.0))
    }
}

impl fmt::Debug for TableRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

fn put_value(dst: &mut BytesMut, value: &Value, depth: u32) -> Result<(), Error> {
    match value {
        Value::Str(text) => {
            wire::put_varint(dst, u64::from(TAG_STR));
            wire::put_str(dst, text);
        }
        Value::I64(number) => {
            wire::put_varint(dst, u64::from(TAG_I64));
            wire::put_i64(dst, *number);
        }
        Value::F64(number) => {
            wire::put_varint(dst, u64::from(TAG_F64));
            dst.put_f64_le(*number);
        }
        Value::Bool(flag) => {
            wire::put_varint(dst, u64::from(TAG_BOOL));
            wire::put_bool(dst, *flag);
        }
        Value::Bytes(bytes) => {
            wire::put_varint(dst, u64::from(TAG_BYTES));
            wire::put_bytes(dst, bytes);
        }
        Value::List(items) => {
            check_depth(depth)?;
            wire::put_varint(dst, u64::from(TAG_LIST));
            wire::put_varint(dst, items.len() as u64);
            for item in items {
                put_value(dst, item, depth + 1)?;
            }
        }
        Value::Map(entries) => {
            check_depth(depth)?;
            wire::put_varint(dst, u64::from(TAG_MAP));
            wire::put_varint(dst, entries.len() as u64);
            for (key, item) in entries {
                wire::put_str(dst, key);
                put_value(dst, item, depth + 1)?;
            }
        }
    }
    Ok(())
}

fn check_depth(depth: u32) -> Result<(), Error> {
    if depth >= TABLE_DEPTH_MAX {
        return Err(Error::LimitExceeded {
            what: "table nesting depth",
            len: u64::from(depth) + 1,
            max: u64::from(TABLE_DEPTH_MAX),
        });
    }
    Ok(())
}

/// Iterator over a table's (or nested map's) entries.
pub struct TableIter<'a> {
    reader: Reader<'a>,
    n_left: u64,
}

impl<'a> Iterator for TableIter<'a> {
    type Item = (&'a str, ValueRef<'a>);

    fn next(&mut self) -> Option<Self::Item> {
        if self.n_left == 0 || self.reader.remaining_len() == 0 {
            return None;
        }
        self.n_left -= 1;
        // Cannot fail: the bytes were validated when the table was built or decoded.
        let key = self.reader.str().ok()?;
        let value = read_value(&mut self.reader, 0).ok()?;
        Some((key, value))
    }
}

/// Iterator over a list's values.
pub struct ListIter<'a> {
    reader: Reader<'a>,
    n_left: u64,
}

impl<'a> Iterator for ListIter<'a> {
    type Item = ValueRef<'a>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.n_left == 0 {
            return None;
        }
        self.n_left -= 1;
        read_value(&mut self.reader, 0).ok()
    }
}

impl<'a> ListRef<'a> {
    /// Number of items.
    pub fn len(&self) -> u64 {
        self.n_items
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.n_items == 0
    }

    /// The items in order.
    pub fn iter(&self) -> ListIter<'a> {
        ListIter {
            reader: Reader::new(self.items, "table"),
            n_left: self.n_items,
        }
    }
}

impl<'a> MapRef<'a> {
    /// Number of entries.
    pub fn len(&self) -> u64 {
        self.n_entries
    }

    /// Whether the map is empty.
    pub fn is_empty(&self) -> bool {
        self.n_entries == 0
    }

    /// The entries in order.
    pub fn iter(&self) -> TableIter<'a> {
        TableIter {
            reader: Reader::new(self.entries, "table"),
            n_left: self.n_entries,
        }
    }

    /// The first value stored under `key`.
    pub fn get(&self, key: &str) -> Option<ValueRef<'a>> {
        self.iter()
            .find(|(entry_key, _)| *entry_key == key)
            .map(|(_, value)| value)
    }
}

impl<'a> ValueRef<'a> {
    /// Copies the value out.
    pub fn to_owned_value(&self) -> Value {
        match *self {
            ValueRef::Str(text) => Value::Str(text.to_owned()),
            ValueRef::I64(number) => Value::I64(number),
            ValueRef::F64(number) => Value::F64(number),
            ValueRef::Bool(flag) => Value::Bool(flag),
            ValueRef::Bytes(bytes) => Value::Bytes(Bytes::copy_from_slice(bytes)),
            ValueRef::List(list) => {
                Value::List(list.iter().map(|item| item.to_owned_value()).collect())
            }
            ValueRef::Map(map) => Value::Map(
                map.iter()
                    .map(|(key, item)| (key.to_owned(), item.to_owned_value()))
                    .collect(),
            ),
        }
    }

    /// The string, if this is a string value.
    pub fn as_str(&self) -> Option<&'a str> {
        match *self {
            ValueRef::Str(text) => Some(text),
            _ => None,
        }
    }

    /// The integer, if this is an integer value.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            ValueRef::I64(number) => Some(number),
            _ => None,
        }
    }

    /// The boolean, if this is a boolean value.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            ValueRef::Bool(flag) => Some(flag),
            _ => None,
        }
    }
}

impl fmt::Debug for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// Serialized as one postcard byte string (the blob).
impl Serialize for Table {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

/// Validates while deserializing; copies the blob (only control frames go through serde).
impl<'de> Deserialize<'de> for Table {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Table, D::Error> {
        struct BlobVisitor;
        impl serde::de::Visitor<'_> for BlobVisitor {
            type Value = Table;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a table blob")
            }
            fn visit_bytes<E: serde::de::Error>(self, blob: &[u8]) -> Result<Table, E> {
                validate(blob).map_err(|_| E::custom("invalid table"))?;
                Ok(Table(Bytes::copy_from_slice(blob)))
            }
        }
        deserializer.deserialize_bytes(BlobVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_round_trips_every_value_type_in_order() {
        let entries = vec![
            ("s".to_owned(), Value::Str("text".into())),
            ("i".to_owned(), Value::I64(-42)),
            ("f".to_owned(), Value::F64(1.5)),
            ("b".to_owned(), Value::Bool(true)),
            ("y".to_owned(), Value::Bytes(Bytes::from_static(b"\0\x01"))),
            (
                "l".to_owned(),
                Value::List(vec![Value::I64(1), Value::Str("two".into())]),
            ),
            (
                "m".to_owned(),
                Value::Map(vec![("k".to_owned(), Value::Bool(false))]),
            ),
        ];
        let table = Table::try_from_entries(entries.clone()).unwrap();
        assert_eq!(table.to_entries(), entries);
        assert_eq!(table.len(), 7);
        assert_eq!(table.get("i"), Some(ValueRef::I64(-42)));
        assert!(table.get("missing").is_none());
        let reparsed = Table::from_bytes(table.as_bytes().clone()).unwrap();
        assert_eq!(reparsed, table);
    }

    #[test]
    fn table_blob_is_postcard_encoding_of_its_entries() {
        #[derive(Serialize)]
        enum PostcardValue {
            Str(String),
            I64(i64),
            F64(f64),
            Bool(bool),
            Bytes(#[serde(with = "serde_bytes_compat")] Vec<u8>),
            List(Vec<PostcardValue>),
            Map(Vec<(String, PostcardValue)>),
        }
        mod serde_bytes_compat {
            pub fn serialize<S: serde::Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
                s.serialize_bytes(bytes)
            }
        }
        let expected = [
            ("a".to_owned(), PostcardValue::Str("x".into())),
            ("b".to_owned(), PostcardValue::I64(-3)),
            ("c".to_owned(), PostcardValue::F64(2.0)),
            ("d".to_owned(), PostcardValue::Bool(true)),
            ("e".to_owned(), PostcardValue::Bytes(vec![1, 2])),
            (
                "f".to_owned(),
                PostcardValue::List(vec![PostcardValue::I64(7)]),
            ),
            (
                "g".to_owned(),
                PostcardValue::Map(vec![("h".into(), PostcardValue::Bool(false))]),
            ),
        ];
        let mut postcard_bytes = Vec::new();
        for entry in &expected {
            postcard_bytes.extend(postcard::to_allocvec(entry).unwrap());
        }
        let table = Table::try_from_entries([
            ("a", Value::Str("x".into())),
            ("b", Value::I64(-3)),
            ("c", Value::F64(2.0)),
            ("d", Value::Bool(true)),
            ("e", Value::Bytes(Bytes::from_static(&[1, 2]))),
            ("f", Value::List(vec![Value::I64(7)])),
            ("g", Value::Map(vec![("h".into(), Value::Bool(false))])),
        ])
        .unwrap();
        assert_eq!(&table.as_bytes()[..], &postcard_bytes[..]);
    }

    #[test]
    fn nesting_beyond_depth_max_is_refused_on_build_and_decode() {
        let mut value = Value::I64(0);
        for _ in 0..TABLE_DEPTH_MAX {
            value = Value::List(vec![value]);
        }
        assert!(Table::try_from_entries([("ok", value.clone())]).is_ok());
        let too_deep = Value::List(vec![value]);
        assert!(Table::try_from_entries([("deep", too_deep)]).is_err());

        // Hand-built blob: key "k", then TABLE_DEPTH_MAX + 1 nested single-item lists.
        let mut blob = vec![1, b'k'];
        for _ in 0..=TABLE_DEPTH_MAX {
            blob.extend([TAG_LIST as u8, 1]);
        }
        blob.extend([TAG_I64 as u8, 0]);
        assert!(matches!(
            Table::from_bytes(Bytes::from(blob)),
            Err(Error::LimitExceeded {
                what: "table nesting depth",
                ..
            })
        ));
    }

    #[test]
    fn hostile_list_count_fails_without_allocating() {
        // key "k", list claiming u64::MAX items, then nothing.
        let blob = vec![
            1,
            b'k',
            TAG_LIST as u8,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0x01,
        ];
        assert!(Table::from_bytes(Bytes::from(blob)).is_err());
    }
}
