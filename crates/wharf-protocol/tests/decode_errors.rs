//! Black-box tests of the decoder's refusals and of the zero-copy and limit guarantees.

use bytes::{BufMut, Bytes, BytesMut};
use serde::Serialize;
use wharf_protocol::limits::{BATCH_MESSAGES_MAX, FRAME_BYTES_MAX, NAME_BYTES_MAX};
use wharf_protocol::*;

fn encoded(frame: &Frame) -> BytesMut {
    let mut buf = BytesMut::new();
    encode(frame, FRAME_BYTES_MAX, &mut buf).unwrap();
    buf
}

/// A frame buffer from a kind number and header bytes, length prefix included.
fn raw_frame(kind_and_body: &[u8]) -> BytesMut {
    let mut buf = BytesMut::new();
    buf.put_u32(kind_and_body.len() as u32);
    buf.put_slice(kind_and_body);
    buf
}

fn sample_publish(body: &'static [u8]) -> Publish {
    Publish {
        exchange: "ex".into(),
        routing_key: "rk".into(),
        properties: Properties::try_from(PropertiesRef {
            content_type: Some("application/json"),
            headers: Table::try_from_entries([("k", Value::Str("v".into()))])
                .unwrap()
                .as_table_ref(),
            ..PropertiesRef::default()
        })
        .unwrap(),
        body: Bytes::from_static(body),
    }
}

#[test]
fn oversized_length_prefix_is_refused_before_reserving_memory() {
    let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff][..]);
    let capacity = buf.capacity();
    let err = decode(&mut buf, 1024).unwrap_err();
    assert!(
        matches!(
            err,
            Error::FrameTooLarge {
                bytes: 0xffff_ffff,
                max: 1024
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.error_code(), ErrorCode::FrameTooLarge);
    assert_eq!(buf.capacity(), capacity);
}

#[test]
fn claimed_length_reserves_at_most_a_bounded_chunk() {
    let mut buf = BytesMut::new();
    buf.put_u32(FRAME_BYTES_MAX);
    assert_eq!(decode(&mut buf, FRAME_BYTES_MAX).unwrap(), None);
    assert!(buf.capacity() <= 4 + wharf_protocol::limits::READ_RESERVE_BYTES_MAX);
}

#[test]
fn partial_frame_returns_none_and_keeps_bytes() {
    let mut buf = encoded(&Frame::Heartbeat);
    let mut partial = buf.split_to(3);
    assert_eq!(decode(&mut partial, FRAME_BYTES_MAX).unwrap(), None);
    assert_eq!(partial.len(), 3);
}

#[test]
fn unknown_frame_kind_is_a_typed_error() {
    let mut buf = raw_frame(&[99]);
    assert!(matches!(
        decode(&mut buf, FRAME_BYTES_MAX),
        Err(Error::UnknownFrameKind { kind: 99 })
    ));
    let mut empty = raw_frame(&[]);
    assert!(matches!(
        decode(&mut empty, FRAME_BYTES_MAX),
        Err(Error::Malformed { .. })
    ));
}

#[test]
fn trailing_bytes_after_a_control_frame_are_malformed() {
    let mut buf = raw_frame(&[kind::HEARTBEAT as u8, 0]);
    let err = decode(&mut buf, FRAME_BYTES_MAX).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Malformed {
                frame: "Heartbeat",
                detail: "trailing bytes"
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.error_code(), ErrorCode::ProtocolViolation);
}

#[test]
fn batch_claiming_more_messages_than_its_bytes_fails_cleanly() {
    // PublishBatch, exchange "", routing key "", 16,384 messages claimed, none present.
    let mut body = vec![kind::PUBLISH_BATCH as u8, 0, 0];
    body.extend([0x80, 0x80, 0x01]); // varint 16384
    let mut buf = raw_frame(&body);
    assert!(matches!(
        decode(&mut buf, FRAME_BYTES_MAX),
        Err(Error::Malformed {
            frame: "PublishBatch",
            ..
        })
    ));

    let mut body = vec![kind::PUBLISH_BATCH as u8, 0, 0];
    body.extend([0xff, 0xff, 0xff, 0xff, 0x0f]); // u32::MAX messages
    let mut buf = raw_frame(&body);
    let err = decode(&mut buf, FRAME_BYTES_MAX).unwrap_err();
    assert!(
        matches!(err, Error::LimitExceeded { what: "batch messages", max, .. } if max == u64::from(BATCH_MESSAGES_MAX)),
        "{err:?}"
    );
}

#[test]
fn body_lengths_must_cover_the_payload_exactly() {
    let batch = Frame::PublishBatch(PublishBatch {
        exchange: "ex".into(),
        routing_key: "rk".into(),
        messages: vec![BatchMessage {
            body: Bytes::from_static(b"abc"),
            ..BatchMessage::default()
        }],
    });
    let mut buf = encoded(&batch);
    buf.put_u8(b'!');
    let len = (buf.len() - 4) as u32;
    buf[..4].copy_from_slice(&len.to_be_bytes());
    assert!(matches!(
        decode(&mut buf, FRAME_BYTES_MAX),
        Err(Error::Malformed {
            frame: "PublishBatch",
            ..
        })
    ));
}

#[test]
fn decoded_bodies_and_strings_share_the_read_buffer() {
    let frame = Frame::PublishBatch(PublishBatch {
        exchange: "ex".into(),
        routing_key: "rk".into(),
        messages: vec![
            BatchMessage {
                body: Bytes::from_static(b"first body"),
                ..BatchMessage::default()
            },
            BatchMessage {
                body: Bytes::from_static(b"second body"),
                ..BatchMessage::default()
            },
        ],
    });
    let mut buf = encoded(&frame);
    let range = buf.as_ptr_range();
    let start = range.start as usize;
    let end = range.end as usize;
    let Some(Frame::PublishBatch(batch)) = decode(&mut buf, FRAME_BYTES_MAX).unwrap() else {
        panic!()
    };
    for message in &batch.messages {
        let body = message.body.as_ptr() as usize;
        assert!(
            body >= start && body + message.body.len() <= end,
            "body was copied"
        );
    }
    let exchange = batch.exchange.as_bytes().as_ptr() as usize;
    assert!(exchange >= start && exchange < end, "exchange was copied");
}

#[test]
fn oversized_frame_is_refused_on_encode_and_leaves_the_buffer_untouched() {
    let frame = Frame::Publish(sample_publish(&[0u8; 2048]));
    let mut buf = BytesMut::from(&b"keep"[..]);
    let err = encode(&frame, 1024, &mut buf).unwrap_err();
    assert!(
        matches!(err, Error::FrameTooLarge { max: 1024, .. }),
        "{err:?}"
    );
    assert_eq!(&buf[..], b"keep");
    let mut chunks = vec![Bytes::from_static(b"keep")];
    assert!(encode_vectored(&frame, 1024, &mut chunks).is_err());
    assert_eq!(chunks.len(), 1);
}

#[test]
fn names_longer_than_the_limit_are_refused_both_ways() {
    let long = "x".repeat(NAME_BYTES_MAX + 1);
    let frame = Frame::Publish(Publish {
        exchange: long.clone().into(),
        ..Publish::default()
    });
    assert!(matches!(
        encode(&frame, FRAME_BYTES_MAX, &mut BytesMut::new()),
        Err(Error::LimitExceeded { .. })
    ));
    let request = Frame::Request {
        correlation_id: 1,
        request: Request::PurgeQueue { name: long.clone() },
    };
    assert!(matches!(
        encode(&request, FRAME_BYTES_MAX, &mut BytesMut::new()),
        Err(Error::LimitExceeded { .. })
    ));

    // Hand-made Publish with a 256-byte exchange name.
    let mut body = vec![kind::PUBLISH as u8, 0x80, 0x02];
    body.extend(long.as_bytes());
    let mut buf = raw_frame(&body);
    assert!(matches!(
        decode(&mut buf, FRAME_BYTES_MAX),
        Err(Error::LimitExceeded {
            what: "name bytes",
            ..
        })
    ));
}

#[test]
fn deliveries_must_have_increasing_tags_to_encode() {
    let delivery = |delivery_tag| Delivery {
        delivery_tag,
        ..Delivery::default()
    };
    let frame = Frame::DeliverBatch(DeliverBatch {
        consumer_tag: 1,
        deliveries: vec![delivery(5), delivery(5)],
    });
    assert!(matches!(
        encode(&frame, FRAME_BYTES_MAX, &mut BytesMut::new()),
        Err(Error::Invalid { .. })
    ));
    let frame = Frame::Deliver(Deliver {
        consumer_tag: 1,
        delivery: delivery(0),
    });
    assert!(matches!(
        encode(&frame, FRAME_BYTES_MAX, &mut BytesMut::new()),
        Err(Error::Invalid { .. })
    ));
}

#[test]
fn contiguous_deliveries_cost_one_byte_of_tag_and_no_repeated_names() {
    let delivery = |delivery_tag| Delivery {
        delivery_tag,
        exchange: "some-exchange".into(),
        routing_key: "some.routing.key".into(),
        ..Delivery::default()
    };
    let one = encoded(&Frame::DeliverBatch(DeliverBatch {
        consumer_tag: 1,
        deliveries: vec![delivery(1_000_000)],
    }));
    let two = encoded(&Frame::DeliverBatch(DeliverBatch {
        consumer_tag: 1,
        deliveries: vec![delivery(1_000_000), delivery(1_000_001)],
    }));
    // tag delta 1 + redelivered + count + 2 "same" tags + empty properties + body len.
    assert_eq!(two.len() - one.len(), 7);
}

#[test]
fn decoded_headers_are_readable_without_copying() {
    let mut buf = encoded(&Frame::Publish(sample_publish(b"{}")));
    let range = buf.as_ptr_range();
    let (start, end) = (range.start as usize, range.end as usize);
    let Some(Frame::Publish(publish)) = decode(&mut buf, FRAME_BYTES_MAX).unwrap() else {
        panic!()
    };
    assert_eq!(publish.properties.header("k"), Some(ValueRef::Str("v")));
    assert_eq!(publish.properties.content_type(), Some("application/json"));
    let props = publish.properties.as_bytes().as_ptr_range();
    assert!(
        props.start as usize >= start && props.end as usize <= end,
        "properties were copied"
    );
    assert_eq!(&publish.body[..], b"{}");
}

#[test]
fn hand_rolled_publish_header_is_postcard_encoding() {
    #[derive(Serialize)]
    struct PropertiesBlob<'a> {
        priority: u8,
        persistent: bool,
        timestamp_ms: u64,
        expiration_ms: Option<u64>,
        delay_ms: Option<u64>,
        message_id: Option<&'a str>,
        correlation_id: Option<&'a str>,
        reply_to: Option<&'a str>,
        content_type: Option<&'a str>,
        content_encoding: Option<&'a str>,
    }
    #[derive(Serialize)]
    struct PublishHeader<'a> {
        kind: u32,
        exchange: &'a str,
        routing_key: &'a str,
        #[serde(serialize_with = "as_bytes")]
        properties: &'a [u8],
    }
    fn as_bytes<S: serde::Serializer>(bytes: &&[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(bytes)
    }
    let headers = Table::try_from_entries([("k", Value::Str("v".into()))]).unwrap();
    let mut blob = postcard::to_allocvec(&PropertiesBlob {
        priority: 9,
        persistent: false,
        timestamp_ms: 1_700_000_000_000,
        expiration_ms: Some(300),
        delay_ms: None,
        message_id: None,
        correlation_id: Some("c"),
        reply_to: None,
        content_type: Some("application/json"),
        content_encoding: None,
    })
    .unwrap();
    blob.extend_from_slice(headers.as_bytes());
    let properties = Properties::try_from(PropertiesRef {
        priority: 9,
        timestamp_ms: 1_700_000_000_000,
        expiration_ms: Some(300),
        correlation_id: Some("c"),
        content_type: Some("application/json"),
        headers: headers.as_table_ref(),
        ..PropertiesRef::default()
    })
    .unwrap();
    assert_eq!(&properties.as_bytes()[..], &blob[..]);

    let publish = Publish {
        exchange: "ex".into(),
        routing_key: "rk".into(),
        properties,
        body: Bytes::from_static(b"body"),
    };
    let mut expected = postcard::to_allocvec(&PublishHeader {
        kind: kind::PUBLISH,
        exchange: "ex",
        routing_key: "rk",
        properties: &blob,
    })
    .unwrap();
    expected.extend_from_slice(b"body");
    let frame = encoded(&Frame::Publish(publish));
    assert_eq!(&frame[4..], &expected[..]);
}

#[test]
fn codec_limits_apply_per_direction() {
    use tokio_util::codec::{Decoder, Encoder};
    let mut codec = Codec::with_frame_bytes_max(64 * 1024);
    codec.set_send_frame_bytes_max(16);
    let mut buf = BytesMut::new();
    assert!(
        codec
            .encode(
                &Frame::Publish(sample_publish(b"0123456789abcdef")),
                &mut buf
            )
            .is_err()
    );
    codec.encode(Frame::Heartbeat, &mut buf).unwrap();
    assert_eq!(codec.decode(&mut buf).unwrap(), Some(Frame::Heartbeat));
    codec.set_recv_frame_bytes_max(0);
    let mut buf = encoded(&Frame::Heartbeat);
    assert!(matches!(
        codec.decode(&mut buf),
        Err(Error::FrameTooLarge { bytes: 1, max: 0 })
    ));
}

#[test]
fn unknown_error_codes_survive_a_round_trip() {
    let frame = Frame::Close(Close {
        code: ErrorCode::from(4242),
        reason: String::new(),
    });
    let mut buf = encoded(&frame);
    let Some(Frame::Close(close)) = decode(&mut buf, FRAME_BYTES_MAX).unwrap() else {
        panic!()
    };
    assert_eq!(close.code, ErrorCode::Unknown(4242));
}

#[test]
fn borrowed_delivery_encoding_is_byte_for_byte_the_frame_encoding() {
    use bytes::{Bytes, BytesMut};
    use wharf_protocol::{
        Deliver, DeliverBatch, Delivery, DeliveryRef, Frame, Properties, PropertiesRef, WireStr,
        encode, encode_deliver_batch, limits::FRAME_BYTES_MAX,
    };
    let properties = Properties::try_from(PropertiesRef {
        priority: 3,
        message_id: Some("id"),
        ..PropertiesRef::default()
    })
    .unwrap();
    let empty = Properties::default();
    let owned = [
        Delivery {
            delivery_tag: 5,
            redelivered: false,
            delivery_count: 1,
            exchange: WireStr::from("x"),
            routing_key: WireStr::from("k"),
            properties: properties.clone(),
            body: Bytes::from_static(b"one"),
        },
        Delivery {
            delivery_tag: 6,
            redelivered: true,
            delivery_count: 2,
            exchange: WireStr::from("x"),
            routing_key: WireStr::from("k2"),
            properties: empty.clone(),
            body: Bytes::from_static(b""),
        },
        Delivery {
            delivery_tag: 9,
            redelivered: false,
            delivery_count: 1,
            exchange: WireStr::from("y"),
            routing_key: WireStr::from("k2"),
            properties: empty.clone(),
            body: Bytes::from_static(b"three"),
        },
    ];
    let borrowed: Vec<DeliveryRef<'_>> = owned
        .iter()
        .map(|d| DeliveryRef {
            delivery_tag: d.delivery_tag,
            redelivered: d.redelivered,
            delivery_count: d.delivery_count,
            exchange: &d.exchange,
            routing_key: &d.routing_key,
            properties: &d.properties,
            body: &d.body,
        })
        .collect();
    for n in 1..=owned.len() {
        let frame = if n == 1 {
            Frame::Deliver(Deliver {
                consumer_tag: 7,
                delivery: owned[0].clone(),
            })
        } else {
            Frame::DeliverBatch(DeliverBatch {
                consumer_tag: 7,
                deliveries: owned[..n].to_vec(),
            })
        };
        let mut expected = BytesMut::new();
        encode(&frame, FRAME_BYTES_MAX, &mut expected).unwrap();
        let mut got = BytesMut::new();
        encode_deliver_batch(7, &borrowed[..n], FRAME_BYTES_MAX, &mut got).unwrap();
        assert_eq!(got, expected, "{n} deliveries");
    }
    let mut out = BytesMut::from(&b"keep"[..]);
    let bad = [borrowed[1], borrowed[0]];
    assert!(
        encode_deliver_batch(7, &bad, FRAME_BYTES_MAX, &mut out).is_err(),
        "tags must increase"
    );
    assert!(
        encode_deliver_batch(7, &borrowed, 16, &mut out).is_err(),
        "frame limit enforced"
    );
    assert_eq!(&out[..], b"keep", "nothing written on error");
}

#[test]
fn defer_and_touch_reject_trailing_bytes_and_truncation() {
    // Defer { delivery_tag: 5, delay_ms: 300 }: kind 18, 05, ac 02.
    let mut buf = raw_frame(&[kind::DEFER as u8, 5, 0xac, 0x02]);
    assert_eq!(
        decode(&mut buf, FRAME_BYTES_MAX).unwrap(),
        Some(Frame::Defer(Defer {
            delivery_tag: 5,
            delay_ms: 300
        }))
    );
    let mut truncated = raw_frame(&[kind::DEFER as u8, 5]);
    assert!(matches!(
        decode(&mut truncated, FRAME_BYTES_MAX),
        Err(Error::Malformed {
            frame: "Defer",
            detail: "truncated"
        })
    ));
    let mut trailing = raw_frame(&[kind::TOUCH as u8, 5, 0]);
    assert!(matches!(
        decode(&mut trailing, FRAME_BYTES_MAX),
        Err(Error::Malformed {
            frame: "Touch",
            detail: "trailing bytes"
        })
    ));
}

#[test]
fn only_the_queue_feature_additions_need_protocol_1_1() {
    let touch = Frame::Touch(Touch { delivery_tag: 1 });
    assert_eq!(touch.minor_required(), MINOR_QUEUE_FEATURES);
    let defer = Frame::Defer(Defer {
        delivery_tag: 1,
        delay_ms: 0,
    });
    assert_eq!(defer.minor_required(), MINOR_QUEUE_FEATURES);
    for request in [
        Request::Redrive {
            queue: "dlq".into(),
            max: 0,
        },
        Request::QueueStatsV2 { name: "q".into() },
        Request::ListQueuesV2,
    ] {
        let frame = Frame::Request {
            correlation_id: 1,
            request,
        };
        assert_eq!(frame.minor_required(), MINOR_QUEUE_FEATURES, "{frame:?}");
    }
    for response in [
        Response::Redriven { moved: 1 },
        Response::StatsV2(QueueInfoV2::default()),
        Response::QueuesV2(Vec::new()),
    ] {
        assert_eq!(response.minor_required(), MINOR_QUEUE_FEATURES);
    }
    // Everything of 1.0 stays sendable to a 1.0 peer.
    assert_eq!(Frame::Heartbeat.minor_required(), 0);
    let stats = Frame::Request {
        correlation_id: 1,
        request: Request::QueueStats { name: "q".into() },
    };
    assert_eq!(stats.minor_required(), 0);
    assert_eq!(Response::Done.minor_required(), 0);
}

#[test]
fn administration_needs_protocol_1_2_and_its_texts_are_bounded() {
    let add = Request::AddUser {
        name: "alice".into(),
        password: "pw".into(),
        tags: vec![],
    };
    assert!(add.is_admin());
    assert!(
        !format!("{add:?}").contains("pw\""),
        "a password is never shown: {add:?}"
    );
    assert!(format!("{add:?}").contains("<redacted>"));
    assert_eq!(add.minor_required(), MINOR_ADMIN);
    assert!(!Request::ListQueues.is_admin());
    assert_eq!(Response::Users(Vec::new()).minor_required(), MINOR_ADMIN);
    let too_long = "p".repeat(limits::ADMIN_TEXT_BYTES_MAX + 1);
    let too_many_tags = vec!["t".to_owned(); limits::TAGS_MAX + 1];
    for request in [
        Request::AddUser {
            name: "alice".into(),
            password: too_long.clone().into(),
            tags: vec![],
        },
        Request::AddUser {
            name: "alice".into(),
            password: "pw".into(),
            tags: too_many_tags.clone(),
        },
        Request::ChangePassword {
            name: "alice".into(),
            password: too_long.clone().into(),
        },
        Request::SetPermissions(PermissionInfo {
            user: "alice".into(),
            vhost: "/".into(),
            configure: too_long.clone(),
            write: String::new(),
            read: String::new(),
        }),
        Request::SetUserTags {
            name: "x".repeat(NAME_BYTES_MAX + 1),
            tags: vec![],
        },
    ] {
        let frame = Frame::Request {
            correlation_id: 1,
            request,
        };
        assert!(
            matches!(
                encode(&frame, FRAME_BYTES_MAX, &mut BytesMut::new()),
                Err(Error::LimitExceeded { .. })
            ),
            "{frame:?}"
        );
    }
    // Hand-made Request { 1, ChangePassword { "a", 1025 bytes } } is refused by the decoder.
    let mut body = vec![kind::REQUEST as u8, 1, 17, 1, b'a', 0x81, 0x08];
    body.extend(too_long.as_bytes());
    let mut buf = raw_frame(&body);
    assert!(matches!(
        decode(&mut buf, FRAME_BYTES_MAX),
        Err(Error::LimitExceeded {
            what: "password or pattern bytes",
            ..
        })
    ));
}

fn hello(vhost: &str) -> Hello {
    Hello {
        client_name: "c".into(),
        credentials: Credentials {
            mechanism: "ANONYMOUS".into(),
            data: Bytes::new(),
        },
        frame_bytes_max: FRAME_BYTES_MAX,
        heartbeat_ms: 0,
        vhost: vhost.into(),
    }
}

#[test]
fn hello_for_the_default_vhost_is_the_old_hello_byte_for_byte() {
    // The 1.2 `Hello`: the four fields, postcard, nothing after them.
    let old = &hello("/");
    let mut expected = vec![kind::HELLO as u8];
    expected.extend(
        postcard::to_allocvec(&(
            &old.client_name,
            &old.credentials,
            old.frame_bytes_max,
            old.heartbeat_ms,
        ))
        .unwrap(),
    );
    let frame = Frame::Hello(hello("/"));
    assert_eq!(&encoded(&frame)[..], &raw_frame(&expected)[..]);
    assert_eq!(frame.minor_required(), 0);
    // An old client's `Hello` (no trailing vhost) decodes with vhost "/".
    let decoded = decode(&mut raw_frame(&expected), FRAME_BYTES_MAX).unwrap();
    assert_eq!(decoded, Some(Frame::Hello(hello("/"))));
    // Another vhost is one trailing string, and needs protocol 1.3.
    let staging = Frame::Hello(hello("staging"));
    expected.extend(b"\x07staging");
    assert_eq!(&encoded(&staging)[..], &raw_frame(&expected)[..]);
    assert_eq!(staging.minor_required(), MINOR_VHOSTS);
    assert_eq!(
        decode(&mut raw_frame(&expected), FRAME_BYTES_MAX).unwrap(),
        Some(staging)
    );
}

#[test]
fn hello_vhost_must_end_the_frame() {
    let mut bytes = encoded(&Frame::Hello(hello("staging"))).to_vec();
    bytes.push(0);
    let len = (bytes.len() - 4) as u32;
    bytes[..4].copy_from_slice(&len.to_be_bytes());
    let err = decode(&mut BytesMut::from(&bytes[..]), FRAME_BYTES_MAX).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Malformed {
                frame: "Hello",
                detail: "trailing bytes"
            }
        ),
        "{err:?}"
    );
    // A trailing vhost cut short is truncated, not a shorter name.
    let mut bytes = encoded(&Frame::Hello(hello("staging"))).to_vec();
    bytes.pop();
    let len = (bytes.len() - 4) as u32;
    bytes[..4].copy_from_slice(&len.to_be_bytes());
    assert!(matches!(
        decode(&mut BytesMut::from(&bytes[..]), FRAME_BYTES_MAX),
        Err(Error::Malformed {
            frame: "Hello",
            detail: "truncated"
        })
    ));
}

#[test]
fn vhost_names_must_be_non_empty_short_and_without_control_characters_both_ways() {
    let too_long = "v".repeat(NAME_BYTES_MAX + 1);
    for bad in ["", "a\nb", "\u{7f}", too_long.as_str()] {
        let frames = [
            Frame::Hello(hello(bad)),
            Frame::Request {
                correlation_id: 1,
                request: Request::AddVhost {
                    name: bad.into(),
                    limits: VhostLimits::default(),
                },
            },
            Frame::Request {
                correlation_id: 1,
                request: Request::DeleteVhost { name: bad.into() },
            },
            Frame::Request {
                correlation_id: 1,
                request: Request::SetVhostLimits {
                    name: bad.into(),
                    limits: VhostLimits::default(),
                },
            },
            Frame::Response {
                correlation_id: 1,
                response: Response::Vhosts(vec![VhostInfo {
                    name: bad.into(),
                    limits: VhostLimits::default(),
                    connections: 0,
                    queues: 0,
                }]),
            },
        ];
        for frame in frames {
            let err = encode(&frame, FRAME_BYTES_MAX, &mut BytesMut::new()).unwrap_err();
            assert!(
                matches!(err, Error::Invalid { .. } | Error::LimitExceeded { .. }),
                "{frame:?}: {err:?}"
            );
        }
    }
    // Hand-made Hello { "c", ANONYMOUS, 0, 0 } + vhost "a\nb" is refused by the decoder, and so
    // is an explicit empty vhost (a 1.3 client sends nothing for "/", never "").
    for trailing in [&b"\x03a\nb"[..], &b"\x00"[..]] {
        let mut body = vec![kind::HELLO as u8, 1, b'c', 9];
        body.extend(b"ANONYMOUS");
        body.extend([0, 0, 0]);
        body.extend(trailing);
        let err = decode(&mut raw_frame(&body), FRAME_BYTES_MAX).unwrap_err();
        assert!(
            matches!(err, Error::Malformed { frame: "vhost", .. }),
            "{err:?}"
        );
        assert_eq!(err.error_code(), ErrorCode::ProtocolViolation);
    }
    // Names of other virtual hosts may hold '/', like RabbitMQ's.
    encoded(&Frame::Hello(hello("/staging/eu")));
}

#[test]
fn virtual_hosts_need_protocol_1_3_and_administrator_rights() {
    for request in [
        Request::AddVhost {
            name: "a".into(),
            limits: VhostLimits::default(),
        },
        Request::DeleteVhost { name: "a".into() },
        Request::ListVhosts,
        Request::SetVhostLimits {
            name: "a".into(),
            limits: VhostLimits {
                max_connections: Some(1),
                max_queues: Some(2),
            },
        },
    ] {
        assert!(request.is_admin(), "{request:?}");
        assert_eq!(request.minor_required(), MINOR_VHOSTS, "{request:?}");
    }
    assert_eq!(Response::Vhosts(Vec::new()).minor_required(), MINOR_VHOSTS);
    assert_eq!(
        VhostLimits::default(),
        VhostLimits {
            max_connections: None,
            max_queues: None
        }
    );
    assert_eq!(Hello::default().vhost, DEFAULT_VHOST);
}

#[test]
fn user_limits_need_protocol_1_3_and_administrator_rights() {
    for request in [
        Request::SetUserLimits {
            user: "alice".into(),
            limits: UserLimits {
                max_connections: Some(1),
                max_queues: None,
            },
        },
        Request::ListUserLimits,
    ] {
        assert!(request.is_admin(), "{request:?}");
        assert_eq!(request.minor_required(), MINOR_VHOSTS, "{request:?}");
    }
    assert_eq!(
        Response::UserLimits(Vec::new()).minor_required(),
        MINOR_VHOSTS
    );
    assert_eq!(
        UserLimits::default(),
        UserLimits {
            max_connections: None,
            max_queues: None
        }
    );
}

#[test]
fn user_names_in_user_limits_are_bounded_both_ways() {
    let too_long = "u".repeat(NAME_BYTES_MAX + 1);
    for frame in [
        Frame::Request {
            correlation_id: 1,
            request: Request::SetUserLimits {
                user: too_long.clone(),
                limits: UserLimits::default(),
            },
        },
        Frame::Response {
            correlation_id: 1,
            response: Response::UserLimits(vec![UserLimitsInfo {
                user: too_long.clone(),
                limits: UserLimits::default(),
            }]),
        },
    ] {
        assert!(
            matches!(
                encode(&frame, FRAME_BYTES_MAX, &mut BytesMut::new()),
                Err(Error::LimitExceeded {
                    what: "name bytes",
                    ..
                })
            ),
            "{frame:?}"
        );
    }
    // Hand-made Request { 1, SetUserLimits { 256-byte name, None, None } } is refused by the
    // decoder; a name at the limit is not.
    for (user, refused) in [(too_long.as_str(), true), (&too_long[1..], false)] {
        let mut body = vec![kind::REQUEST as u8, 1, 30];
        body.put_slice(&postcard::to_allocvec(user).unwrap());
        body.extend([0, 0]);
        let decoded = decode(&mut raw_frame(&body), FRAME_BYTES_MAX);
        match refused {
            true => assert!(
                matches!(
                    decoded,
                    Err(Error::LimitExceeded {
                        what: "name bytes",
                        ..
                    })
                ),
                "{decoded:?}"
            ),
            false => assert_eq!(
                decoded.unwrap(),
                Some(Frame::Request {
                    correlation_id: 1,
                    request: Request::SetUserLimits {
                        user: user.to_owned(),
                        limits: UserLimits::default(),
                    },
                })
            ),
        }
    }
}

#[test]
fn queue_info_v2_starts_with_the_bytes_of_queue_info() {
    // 1.1 appends counters after QueueInfo's fields, so a reader can share the prefix code.
    let v2 = QueueInfoV2 {
        name: "q".into(),
        durable: true,
        ready: 3,
        unacked: 1,
        consumers: 2,
        delayed: 7,
        expired: 9,
        ..QueueInfoV2::default()
    };
    let v1 = QueueInfo::from(v2.clone());
    let v1_bytes = postcard::to_allocvec(&v1).unwrap();
    let v2_bytes = postcard::to_allocvec(&v2).unwrap();
    assert!(v2_bytes.starts_with(&v1_bytes));
    assert_eq!((v1.ready, v1.unacked, v1.consumers), (3, 1, 2));
}

#[test]
fn redrive_names_are_checked_both_ways() {
    let long = "x".repeat(NAME_BYTES_MAX + 1);
    for request in [
        Request::Redrive {
            queue: long.clone(),
            max: 0,
        },
        Request::QueueStatsV2 { name: long.clone() },
    ] {
        let frame = Frame::Request {
            correlation_id: 1,
            request,
        };
        assert!(matches!(
            encode(&frame, FRAME_BYTES_MAX, &mut BytesMut::new()),
            Err(Error::LimitExceeded { .. })
        ));
    }
    // Hand-made Request { 1, Redrive { queue: 256 bytes, max: 0 } }.
    let mut body = vec![kind::REQUEST as u8, 1, 12, 0x80, 0x02];
    body.extend(long.as_bytes());
    body.push(0);
    let mut buf = raw_frame(&body);
    assert!(matches!(
        decode(&mut buf, FRAME_BYTES_MAX),
        Err(Error::LimitExceeded {
            what: "name bytes",
            ..
        })
    ));
}
