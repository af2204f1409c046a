//! Hand-rolled postcard primitives for the hot frames (publish and deliver).
//!
//! The hot path reads fields straight out of the frame buffer without serde, so that string and
//! table fields become zero-copy `Bytes` slices of the frame. The encoding is exactly postcard's
//! (varints, zigzag, one-byte `Option` tags, length-prefixed strings); a test in `codec.rs`
//! checks it against `postcard` itself.

use crate::error::Error;
use bytes::{BufMut, BytesMut};

/// Cursor over one frame's bytes. Every read is bounds-checked and returns `Malformed`.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    frame: &'static str,
}

impl<'a> Reader<'a> {
    #[inline]
    pub(crate) fn new(buf: &'a [u8], frame: &'static str) -> Reader<'a> {
        Reader { buf, pos: 0, frame }
    }

    #[cold]
    pub(crate) fn malformed(&self, detail: &'static str) -> Error {
        Error::Malformed {
            frame: self.frame,
            detail,
        }
    }

    #[inline]
    pub(crate) fn remaining(&self) -> &'a [u8] {
        &self.buf[self.pos..]
    }

    #[inline]
    pub(crate) fn remaining_len(&self) -> usize {
        self.buf.len() - self.pos
    }

    #[inline(always)]
    pub(crate) fn u8(&mut self) -> Result<u8, Error> {
        let byte = *self
            .buf
            .get(self.pos)
            .ok_or_else(|| self.malformed("truncated"))?;
        self.pos += 1;
        Ok(byte)
    }

    #[inline]
    pub(crate) fn bool(&mut self) -> Result<bool, Error> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(self.malformed("bool is not 0 or 1")),
        }
    }

    /// Postcard `Option` tag: one byte, 0 = `None`, 1 = `Some`.
    #[inline]
    pub(crate) fn option_tag(&mut self) -> Result<bool, Error> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(self.malformed("option tag is not 0 or 1")),
        }
    }

    /// LEB128 varint of at most `max_bits` bits (postcard's rule: the last byte may not carry
    /// bits beyond the type's width). One-byte varints (lengths, tags, counts) take the fast path.
    #[inline(always)]
    fn varint(&mut self, max_bits: u32) -> Result<u64, Error> {
        if let Some(&byte) = self.buf.get(self.pos)
            && byte < 0x80
        {
            self.pos += 1;
            return Ok(u64::from(byte));
        }
        self.varint_multi_byte(max_bits)
    }

    fn varint_multi_byte(&mut self, max_bits: u32) -> Result<u64, Error> {
        let max_bytes = max_bits.div_ceil(7);
        let mut value: u64 = 0;
        for idx in 0..max_bytes {
            let byte = self.u8()?;
            let shift = idx * 7;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                if idx == max_bytes - 1 && max_bits < 64 && value >> max_bits != 0 {
                    return Err(self.malformed("varint overflows its type"));
                }
                if idx == max_bytes - 1 && max_bits == 64 && byte > 1 {
                    return Err(self.malformed("varint overflows its type"));
                }
                return Ok(value);
            }
        }
        Err(self.malformed("varint too long"))
    }

    #[inline]
    pub(crate) fn u32(&mut self) -> Result<u32, Error> {
        Ok(self.varint(32)? as u32)
    }

    #[inline]
    pub(crate) fn u64(&mut self) -> Result<u64, Error> {
        self.varint(64)
    }

    #[inline]
    pub(crate) fn i64(&mut self) -> Result<i64, Error> {
        let zigzag = self.varint(64)?;
        Ok(((zigzag >> 1) as i64) ^ -((zigzag & 1) as i64))
    }

    #[inline]
    pub(crate) fn f64(&mut self) -> Result<f64, Error> {
        let bytes = self.take(8)?;
        let mut array = [0u8; 8];
        array.copy_from_slice(bytes);
        Ok(f64::from_le_bytes(array))
    }

    #[inline(always)]
    pub(crate) fn take(&mut self, len: usize) -> Result<&'a [u8], Error> {
        if len > self.remaining_len() {
            return Err(self.malformed("length runs past the end of the frame"));
        }
        let slice = &self.buf[self.pos..self.pos + len];
        self.pos += len;
        Ok(slice)
    }

    /// Length-prefixed byte string (postcard `&[u8]`).
    #[inline(always)]
    pub(crate) fn bytes(&mut self) -> Result<&'a [u8], Error> {
        let len = self.varint(64)?;
        let len = usize::try_from(len).map_err(|_| self.malformed("length overflows usize"))?;
        self.take(len)
    }

    /// Length-prefixed UTF-8 string (postcard `&str`).
    #[inline]
    pub(crate) fn str(&mut self) -> Result<&'a str, Error> {
        let bytes = self.bytes()?;
        std::str::from_utf8(bytes).map_err(|_| self.malformed("string is not UTF-8"))
    }

    /// Length-prefixed UTF-8 string, validated but returned as bytes: the hot path only needs
    /// to know it is UTF-8, and short ASCII strings (the common case) skip the full check.
    #[inline(always)]
    pub(crate) fn str_bytes(&mut self) -> Result<&'a [u8], Error> {
        let bytes = self.bytes()?;
        if bytes.is_ascii() || std::str::from_utf8(bytes).is_ok() {
            Ok(bytes)
        } else {
            Err(self.malformed("string is not UTF-8"))
        }
    }

    /// A name (queue, exchange, routing key): a UTF-8 string of at most `NAME_BYTES_MAX` bytes,
    /// returned as validated bytes.
    #[inline(always)]
    pub(crate) fn name(&mut self) -> Result<&'a [u8], Error> {
        let name = self.str_bytes()?;
        check_name_len(name.len())?;
        Ok(name)
    }
}

pub(crate) fn check_name(name: &str) -> Result<(), Error> {
    check_name_len(name.len())
}

#[inline]
fn check_name_len(len: usize) -> Result<(), Error> {
    if len > crate::limits::NAME_BYTES_MAX {
        return Err(Error::LimitExceeded {
            what: "name bytes",
            len: len as u64,
            max: crate::limits::NAME_BYTES_MAX as u64,
        });
    }
    Ok(())
}

/// A virtual host's name (protocol 1.3): a name that is not empty and has no control
/// characters (it appears in logs, URLs and the CLI's tables).
pub(crate) fn check_vhost(vhost: &str) -> Result<(), Error> {
    check_name(vhost)?;
    if vhost.is_empty() {
        return Err(Error::Malformed {
            frame: "vhost",
            detail: "empty virtual host name",
        });
    }
    if vhost.chars().any(char::is_control) {
        return Err(Error::Malformed {
            frame: "vhost",
            detail: "control character in a virtual host name",
        });
    }
    Ok(())
}

/// A password or permission pattern of an administration request.
pub(crate) fn check_admin_text(text: &str) -> Result<(), Error> {
    if text.len() > crate::limits::ADMIN_TEXT_BYTES_MAX {
        return Err(Error::LimitExceeded {
            what: "password or pattern bytes",
            len: text.len() as u64,
            max: crate::limits::ADMIN_TEXT_BYTES_MAX as u64,
        });
    }
    Ok(())
}

/// The tags of an administration request.
pub(crate) fn check_tags(tags: &[String]) -> Result<(), Error> {
    if tags.len() > crate::limits::TAGS_MAX {
        return Err(Error::LimitExceeded {
            what: "tags",
            len: tags.len() as u64,
            max: crate::limits::TAGS_MAX as u64,
        });
    }
    tags.iter().try_for_each(|tag| check_name(tag))
}

pub(crate) fn check_reason(reason: &str) -> Result<(), Error> {
    if reason.len() > crate::limits::REASON_BYTES_MAX {
        return Err(Error::LimitExceeded {
            what: "reason bytes",
            len: reason.len() as u64,
            max: crate::limits::REASON_BYTES_MAX as u64,
        });
    }
    Ok(())
}

pub(crate) fn put_varint(dst: &mut BytesMut, mut value: u64) {
    while value >= 0x80 {
        dst.put_u8((value as u8) | 0x80);
        value >>= 7;
    }
    dst.put_u8(value as u8);
}

pub(crate) fn put_i64(dst: &mut BytesMut, value: i64) {
    put_varint(dst, ((value << 1) ^ (value >> 63)) as u64);
}

pub(crate) fn put_bool(dst: &mut BytesMut, value: bool) {
    dst.put_u8(u8::from(value));
}

pub(crate) fn put_bytes(dst: &mut BytesMut, bytes: &[u8]) {
    put_varint(dst, bytes.len() as u64);
    dst.put_slice(bytes);
}

pub(crate) fn put_str(dst: &mut BytesMut, value: &str) {
    put_bytes(dst, value.as_bytes());
}

pub(crate) fn put_option_u64(dst: &mut BytesMut, value: Option<u64>) {
    match value {
        None => dst.put_u8(0),
        Some(value) => {
            dst.put_u8(1);
            put_varint(dst, value);
        }
    }
}

pub(crate) fn put_option_str(dst: &mut BytesMut, value: Option<&str>) {
    match value {
        None => dst.put_u8(0),
        Some(value) => {
            dst.put_u8(1);
            put_str(dst, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_match_postcard_for_edge_values() {
        for value in [0u64, 1, 127, 128, 300, u32::MAX as u64, u64::MAX] {
            let mut dst = BytesMut::new();
            put_varint(&mut dst, value);
            assert_eq!(&dst[..], &postcard::to_allocvec(&value).unwrap()[..]);
            assert_eq!(Reader::new(&dst, "test").u64().unwrap(), value);
        }
        for value in [0i64, -1, 1, i64::MIN, i64::MAX] {
            let mut dst = BytesMut::new();
            put_i64(&mut dst, value);
            assert_eq!(&dst[..], &postcard::to_allocvec(&value).unwrap()[..]);
            assert_eq!(Reader::new(&dst, "test").i64().unwrap(), value);
        }
    }

    #[test]
    fn varint_overflowing_its_type_is_malformed() {
        let u32_too_big = postcard::to_allocvec(&(u32::MAX as u64 + 1)).unwrap();
        assert!(Reader::new(&u32_too_big, "test").u32().is_err());
        assert!(Reader::new(&[0xff; 11], "test").u64().is_err());
        assert!(
            Reader::new(
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02],
                "test"
            )
            .u64()
            .is_err()
        );
        assert!(Reader::new(&[0x80], "test").u64().is_err());
    }
}
