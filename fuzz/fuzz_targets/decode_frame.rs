//! One frame body (no length prefix) from arbitrary bytes: decoding never panics, and whatever
//! decodes re-encodes and decodes to the same frame (so decoder and encoder agree).
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use wharf_protocol::limits::FRAME_BYTES_MAX;
use wharf_protocol::{decode, decode_frame, encode, encode_vectored};

fuzz_target!(|data: &[u8]| {
    let Ok(frame) = decode_frame(Bytes::copy_from_slice(data)) else {
        return;
    };
    let mut encoded = BytesMut::new();
    encode(&frame, FRAME_BYTES_MAX, &mut encoded).expect("a decoded frame re-encodes");
    let mut chunks = Vec::new();
    let total = encode_vectored(&frame, FRAME_BYTES_MAX, &mut chunks).expect("vectored re-encode");
    assert_eq!(total, encoded.len());
    let joined: Vec<u8> = chunks
        .iter()
        .flat_map(|chunk| chunk.iter().copied())
        .collect();
    assert_eq!(&joined[..], &encoded[..]);
    let again = decode(&mut encoded, FRAME_BYTES_MAX)
        .expect("re-decodes")
        .expect("whole frame");
    assert_eq!(again, frame);
    assert!(encoded.is_empty());
});
