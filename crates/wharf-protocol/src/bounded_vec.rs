//! A serde deserializer for the `Vec`s of control frames that does not trust a claimed length:
//! `#[serde(deserialize_with = "crate::bounded_vec::deserialize")]`.
//!
//! A module of its own, below `frame` whose types name it, so that the frame types need nothing
//! from `codec`, which depends on them: the two modules depend one way only.

use serde::de::{Deserialize, Deserializer, SeqAccess, Visitor};
use std::marker::PhantomData;

/// Deserializes a `Vec` without trusting the claimed length for preallocation: memory grows
/// only with elements actually present in the frame.
pub(crate) fn deserialize<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct VecVisitor<T>(PhantomData<T>);
    impl<'de, T: Deserialize<'de>> Visitor<'de> for VecVisitor<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a sequence")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut items = Vec::new();
            while let Some(item) = seq.next_element()? {
                items.push(item);
            }
            Ok(items)
        }
    }
    deserializer.deserialize_seq(VecVisitor(PhantomData))
}
