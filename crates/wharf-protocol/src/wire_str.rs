//! `WireStr`: an immutable UTF-8 string backed by `Bytes`, so decoded names are zero-copy
//! slices of the frame.

use bytes::Bytes;
use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;

/// An immutable UTF-8 string sharing the frame buffer it was decoded from.
///
/// Invariant: the bytes are valid UTF-8 (checked at construction). Cloning is a reference-count
/// increment.
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WireStr(Bytes);

impl WireStr {
    /// The empty string.
    pub const fn new() -> WireStr {
        WireStr(Bytes::new())
    }

    /// A string from a `'static` literal, without copying.
    pub const fn from_static(value: &'static str) -> WireStr {
        WireStr(Bytes::from_static(value.as_bytes()))
    }

    /// A string copied from `value`.
    pub fn copy_from_str(value: &str) -> WireStr {
        WireStr(Bytes::copy_from_slice(value.as_bytes()))
    }

    /// Checks `bytes` is UTF-8 and wraps it.
    pub fn from_utf8(bytes: Bytes) -> Result<WireStr, std::str::Utf8Error> {
        std::str::from_utf8(&bytes)?;
        Ok(WireStr(bytes))
    }

    /// Shares `frame`'s buffer for `text`, a sub-slice of it that the reader already checked
    /// to be UTF-8.
    #[inline]
    pub(crate) fn from_frame_slice(frame: &Bytes, text: &[u8]) -> WireStr {
        WireStr(frame.slice_ref(text))
    }

    /// The string.
    pub fn as_str(&self) -> &str {
        // Cannot fail: UTF-8 was checked at construction. Re-checking keeps the crate free of
        // `unsafe`; names are short, so it costs nanoseconds.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// The underlying bytes (shares the buffer).
    pub fn as_bytes(&self) -> &Bytes {
        &self.0
    }

    /// Unwraps into the underlying bytes.
    pub fn into_bytes(self) -> Bytes {
        self.0
    }
}

impl Deref for WireStr {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for WireStr {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl Borrow<str> for WireStr {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl From<&'static str> for WireStr {
    fn from(value: &'static str) -> WireStr {
        WireStr::from_static(value)
    }
}

impl From<String> for WireStr {
    fn from(value: String) -> WireStr {
        WireStr(Bytes::from(value.into_bytes()))
    }
}

impl From<&String> for WireStr {
    fn from(value: &String) -> WireStr {
        WireStr(Bytes::copy_from_slice(value.as_bytes()))
    }
}

impl PartialEq<str> for WireStr {
    fn eq(&self, other: &str) -> bool {
        self.0 == other.as_bytes()
    }
}

impl PartialEq<&str> for WireStr {
    fn eq(&self, other: &&str) -> bool {
        self.0 == other.as_bytes()
    }
}

impl fmt::Display for WireStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for WireStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}
