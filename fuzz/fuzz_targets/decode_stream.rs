//! A connection's byte stream, delivered in fuzzer-chosen chunk sizes to the tokio-util codec
//! with a small frame limit: never panics, never returns a frame from fewer bytes than it
//! consumed, and stops at the first error like a real connection.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;
use wharf_protocol::{Codec, Preamble};

fuzz_target!(|data: &[u8]| {
    let Some((&chunk_seed, stream)) = data.split_first() else {
        return;
    };
    // The preamble parser sees the bytes a server reads first; frames follow a valid one.
    let stream = match Preamble::decode(stream) {
        Ok(Some(preamble)) => {
            let _ = preamble.check_supported();
            &stream[Preamble::BYTES..]
        }
        _ => stream,
    };
    let chunk_len = usize::from(chunk_seed % 64) + 1;
    let mut codec = Codec::with_frame_bytes_max(64 * 1024);
    let mut buf = BytesMut::new();
    for chunk in stream.chunks(chunk_len) {
        buf.extend_from_slice(chunk);
        loop {
            let before = buf.len();
            match codec.decode(&mut buf) {
                Ok(Some(_frame)) => assert!(buf.len() < before, "a frame consumed no bytes"),
                Ok(None) => {
                    assert_eq!(buf.len(), before, "Ok(None) consumed bytes");
                    break;
                }
                Err(_) => return,
            }
        }
    }
});
