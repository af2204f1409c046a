//! Codec throughput: encode and decode a `PublishBatch` of 1,000 messages with 100-byte bodies
//! and 3 headers (string, int, bool) plus a content type.
//!
//! Target (docs/protocol.md): decode >= 10 M messages/s and >= 1.5 GB/s on one core.
//! Run: `cargo bench -p wharf-benches --bench protocol -- --warm-up-time 1 --measurement-time 3`

use bytes::{Bytes, BytesMut};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use wharf_protocol::limits::FRAME_BYTES_MAX;
use wharf_protocol::{
    BatchMessage, Frame, Properties, PropertiesRef, PublishBatch, Table, Value, decode,
    decode_frame, encode, encode_vectored,
};

const N_MESSAGES: usize = 1_000;
const BODY_BYTES: usize = 100;

fn batch() -> Frame {
    let messages = (0..N_MESSAGES)
        .map(|message_idx| {
            let headers = Table::try_from_entries([
                ("trace-id", Value::Str(format!("trace-{message_idx:08}"))),
                ("attempt", Value::I64(message_idx as i64 % 5)),
                ("urgent", Value::Bool(message_idx % 2 == 0)),
            ])
            .expect("flat table");
            BatchMessage {
                properties: Properties::try_from(PropertiesRef {
                    content_type: Some("application/json"),
                    timestamp_ms: 1_700_000_000_000 + message_idx as u64,
                    persistent: true,
                    headers: headers.as_table_ref(),
                    ..PropertiesRef::default()
                })
                .expect("short strings"),
                body: Bytes::from(vec![b'x'; BODY_BYTES]),
                ..BatchMessage::default()
            }
        })
        .collect();
    Frame::PublishBatch(PublishBatch {
        exchange: "orders".into(),
        routing_key: "orders.created".into(),
        messages,
    })
}

fn bench_protocol(c: &mut Criterion) {
    let frame = batch();
    let mut encoded = BytesMut::new();
    encode(&frame, FRAME_BYTES_MAX, &mut encoded).expect("encodable");
    let encoded = encoded.freeze();
    println!(
        "PublishBatch of {N_MESSAGES} x {BODY_BYTES}-byte bodies: {} bytes on the wire ({} per message)",
        encoded.len(),
        encoded.len() / N_MESSAGES
    );

    let mut group = c.benchmark_group("protocol/publish_batch_1000x100B");
    group.throughput(Throughput::Elements(N_MESSAGES as u64));
    group.bench_function("decode", |b| {
        b.iter(|| {
            // Clone = refcount bump, as the codec sees a frame split off its read buffer.
            let frame = decode_frame(black_box(encoded.slice(4..))).expect("valid");
            black_box(frame)
        })
    });
    group.bench_function("decode_stream", |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(&black_box(&encoded)[..]);
            black_box(decode(&mut buf, FRAME_BYTES_MAX).expect("valid"))
        })
    });
    let mut dst = BytesMut::with_capacity(encoded.len());
    group.bench_function("encode", |b| {
        b.iter(|| {
            dst.clear();
            encode(black_box(&frame), FRAME_BYTES_MAX, &mut dst).expect("encodable");
            black_box(dst.len())
        })
    });
    let mut chunks = Vec::new();
    group.bench_function("encode_vectored", |b| {
        b.iter(|| {
            chunks.clear();
            black_box(
                encode_vectored(black_box(&frame), FRAME_BYTES_MAX, &mut chunks)
                    .expect("encodable"),
            )
        })
    });
    group.finish();

    let mut group = c.benchmark_group("protocol/publish_batch_1000x100B_bytes");
    group.throughput(Throughput::Bytes(encoded.len() as u64));
    group.bench_function("decode", |b| {
        b.iter(|| black_box(decode_frame(black_box(encoded.slice(4..))).expect("valid")))
    });
    group.finish();
}

criterion_group!(benches, bench_protocol);
criterion_main!(benches);
