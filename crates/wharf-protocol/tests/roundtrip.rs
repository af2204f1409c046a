//! Property tests: encode → decode is the identity for every frame kind, whole or split at every
//! byte boundary, and no input makes the decoder panic.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use tokio_util::codec::{Decoder, Encoder};
use wharf_protocol::limits::{FRAME_BYTES_MAX, NAME_BYTES_MAX};
use wharf_protocol::*;

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z0-9.#*_-]{0,16}",
        1 => "\\PC{0,8}",
        1 => proptest::collection::vec(any::<char>(), 0..4).prop_map(|chars| chars.into_iter().collect()),
        1 => Just("n".repeat(NAME_BYTES_MAX)),
    ]
}

/// A valid virtual host name: non-empty, no control characters (`/` most often).
fn vhost() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => Just("/".to_owned()),
        4 => "[a-z0-9/._-]{1,16}",
        1 => "\\PC{1,8}",
        1 => Just("v".repeat(NAME_BYTES_MAX)),
    ]
}

fn vhost_limits() -> impl Strategy<Value = VhostLimits> {
    (
        proptest::option::of(any::<u32>()),
        proptest::option::of(any::<u32>()),
    )
        .prop_map(|(max_connections, max_queues)| VhostLimits {
            max_connections,
            max_queues,
        })
}

fn user_limits() -> impl Strategy<Value = UserLimits> {
    (
        proptest::option::of(any::<u32>()),
        proptest::option::of(any::<u32>()),
    )
        .prop_map(|(max_connections, max_queues)| UserLimits {
            max_connections,
            max_queues,
        })
}

fn wire_str() -> impl Strategy<Value = WireStr> {
    name().prop_map(WireStr::from)
}

fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        name().prop_map(Value::Str),
        any::<i64>().prop_map(Value::I64),
        any::<f64>().prop_map(Value::F64),
        any::<bool>().prop_map(Value::Bool),
        proptest::collection::vec(any::<u8>(), 0..16)
            .prop_map(|bytes| Value::Bytes(Bytes::from(bytes))),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::List),
            proptest::collection::vec((name(), inner), 0..4).prop_map(Value::Map),
        ]
    })
}

fn table() -> impl Strategy<Value = Table> {
    proptest::collection::vec((name(), value()), 0..4)
        .prop_map(|entries| Table::try_from_entries(entries).expect("depth 3 < TABLE_DEPTH_MAX"))
}

fn body() -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..64).prop_map(Bytes::from)
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    any::<u16>().prop_map(ErrorCode::from)
}

fn reason() -> impl Strategy<Value = String> {
    "\\PC{0,24}"
}

fn properties() -> impl Strategy<Value = Properties> {
    (
        (
            proptest::option::of(name()),
            proptest::option::of(name()),
            proptest::option::of(name()),
            proptest::option::of(name()),
            proptest::option::of(name()),
        ),
        (
            any::<u64>(),
            any::<Option<u64>>(),
            any::<Option<u64>>(),
            any::<u8>(),
            any::<bool>(),
        ),
        table(),
        any::<bool>(),
    )
        .prop_map(
            |(
                (message_id, correlation_id, reply_to, content_type, content_encoding),
                (timestamp_ms, expiration_ms, delay_ms, priority, persistent),
                headers,
                defaults,
            )| {
                if defaults {
                    return Properties::default();
                }
                Properties::try_from(PropertiesRef {
                    message_id: message_id.as_deref(),
                    correlation_id: correlation_id.as_deref(),
                    reply_to: reply_to.as_deref(),
                    content_type: content_type.as_deref(),
                    content_encoding: content_encoding.as_deref(),
                    timestamp_ms,
                    expiration_ms,
                    delay_ms,
                    priority,
                    persistent,
                    headers: headers.as_table_ref(),
                })
                .expect("names within limits")
            },
        )
}

fn delivery_parts() -> impl Strategy<Value = (u64, bool, u32, WireStr, WireStr, Properties, Bytes)>
{
    (
        1..u64::MAX / 2,
        any::<bool>(),
        any::<u32>(),
        wire_str(),
        wire_str(),
        properties(),
        body(),
    )
}

fn to_delivery(parts: (u64, bool, u32, WireStr, WireStr, Properties, Bytes)) -> Delivery {
    let (delivery_tag, redelivered, delivery_count, exchange, routing_key, properties, body) =
        parts;
    Delivery {
        delivery_tag,
        redelivered,
        delivery_count,
        exchange,
        routing_key,
        properties,
        body,
    }
}

fn binding() -> impl Strategy<Value = Binding> {
    (
        prop_oneof![
            name().prop_map(Destination::Queue),
            name().prop_map(Destination::Exchange)
        ],
        name(),
        name(),
        table(),
    )
        .prop_map(|(destination, source, routing_key, arguments)| Binding {
            destination,
            source,
            routing_key,
            arguments,
        })
}

fn request() -> impl Strategy<Value = Request> {
    let exchange_kind = prop_oneof![
        Just(ExchangeKind::Direct),
        Just(ExchangeKind::Fanout),
        Just(ExchangeKind::Topic),
        Just(ExchangeKind::Headers)
    ];
    prop_oneof![
        (name(), any::<[bool; 4]>(), table()).prop_map(|(name, flags, arguments)| {
            Request::DeclareQueue {
                name,
                durable: flags[0],
                exclusive: flags[1],
                auto_delete: flags[2],
                passive: flags[3],
                arguments,
            }
        }),
        (name(), any::<bool>(), any::<bool>()).prop_map(|(name, if_unused, if_empty)| {
            Request::DeleteQueue {
                name,
                if_unused,
                if_empty,
            }
        }),
        name().prop_map(|name| Request::PurgeQueue { name }),
        (name(), exchange_kind, any::<[bool; 4]>(), table()).prop_map(
            |(name, kind, flags, arguments)| {
                Request::DeclareExchange {
                    name,
                    kind,
                    durable: flags[0],
                    auto_delete: flags[1],
                    internal: flags[2],
                    passive: flags[3],
                    arguments,
                }
            }
        ),
        (name(), any::<bool>())
            .prop_map(|(name, if_unused)| Request::DeleteExchange { name, if_unused }),
        binding().prop_map(Request::Bind),
        binding().prop_map(Request::Unbind),
        (
            name(),
            any::<(u32, u32, bool, bool, i32, Option<u32>)>(),
            table()
        )
            .prop_map(
                |(
                    queue,
                    (consumer_tag, prefetch, auto_ack, exclusive, priority, initial_credit),
                    arguments,
                )| {
                    Request::Subscribe {
                        queue,
                        consumer_tag,
                        prefetch,
                        auto_ack,
                        exclusive,
                        priority,
                        initial_credit,
                        arguments,
                    }
                }
            ),
        any::<u32>().prop_map(|consumer_tag| Request::Cancel { consumer_tag }),
        name().prop_map(|name| Request::QueueStats { name }),
        Just(Request::ListQueues),
        Just(Request::ListExchanges),
        (name(), any::<u64>()).prop_map(|(queue, max)| Request::Redrive { queue, max }),
        name().prop_map(|name| Request::QueueStatsV2 { name }),
        Just(Request::ListQueuesV2),
        admin_request(),
    ]
}

fn tags() -> impl Strategy<Value = Vec<String>> {
    proptest::collection::vec(name(), 0..4)
}

fn permission_info() -> impl Strategy<Value = PermissionInfo> {
    (name(), name(), reason(), reason(), reason()).prop_map(
        |(user, vhost, configure, write, read)| PermissionInfo {
            user,
            vhost,
            configure,
            write,
            read,
        },
    )
}

fn topic_permission_info() -> impl Strategy<Value = TopicPermissionInfo> {
    (name(), name(), name(), reason(), reason()).prop_map(|(user, vhost, exchange, write, read)| {
        TopicPermissionInfo {
            user,
            vhost,
            exchange,
            write,
            read,
        }
    })
}

fn admin_request() -> impl Strategy<Value = Request> {
    prop_oneof![
        (name(), reason(), tags()).prop_map(|(name, password, tags)| Request::AddUser {
            name,
            password: password.into(),
            tags
        }),
        name().prop_map(|name| Request::DeleteUser { name }),
        (name(), reason()).prop_map(|(name, password)| Request::ChangePassword {
            name,
            password: password.into()
        }),
        (name(), tags()).prop_map(|(name, tags)| Request::SetUserTags { name, tags }),
        Just(Request::ListUsers),
        permission_info().prop_map(Request::SetPermissions),
        (name(), name()).prop_map(|(user, vhost)| Request::ClearPermissions { user, vhost }),
        name().prop_map(|vhost| Request::ListPermissions { vhost }),
        topic_permission_info().prop_map(Request::SetTopicPermissions),
        (name(), name(), proptest::option::of(name())).prop_map(|(user, vhost, exchange)| {
            Request::ClearTopicPermissions {
                user,
                vhost,
                exchange,
            }
        }),
        name().prop_map(|vhost| Request::ListTopicPermissions { vhost }),
        (vhost(), vhost_limits()).prop_map(|(name, limits)| Request::AddVhost { name, limits }),
        vhost().prop_map(|name| Request::DeleteVhost { name }),
        Just(Request::ListVhosts),
        (vhost(), vhost_limits())
            .prop_map(|(name, limits)| Request::SetVhostLimits { name, limits }),
        (name(), user_limits()).prop_map(|(user, limits)| Request::SetUserLimits { user, limits }),
        Just(Request::ListUserLimits),
    ]
}

fn queue_info() -> impl Strategy<Value = QueueInfo> {
    (name(), any::<(bool, bool, bool, u64, u64, u32)>()).prop_map(
        |(name, (durable, exclusive, auto_delete, ready, unacked, consumers))| QueueInfo {
            name,
            durable,
            exclusive,
            auto_delete,
            ready,
            unacked,
            consumers,
        },
    )
}

fn queue_info_v2() -> impl Strategy<Value = QueueInfoV2> {
    (
        queue_info(),
        any::<(u64, u64, u64, u64)>(),
        any::<(u64, u64, u64, u64, u64)>(),
    )
        .prop_map(
            |(
                info,
                (delayed, ready_bytes, published, delivered),
                (redelivered, acked, dropped, expired, duplicates),
            )| QueueInfoV2 {
                name: info.name,
                durable: info.durable,
                exclusive: info.exclusive,
                auto_delete: info.auto_delete,
                ready: info.ready,
                unacked: info.unacked,
                consumers: info.consumers,
                delayed,
                ready_bytes,
                published,
                delivered,
                redelivered,
                acked,
                dropped,
                expired,
                duplicates,
            },
        )
}

fn response() -> impl Strategy<Value = Response> {
    let exchange_info = (
        name(),
        prop_oneof![Just(ExchangeKind::Direct), Just(ExchangeKind::Topic)],
        any::<bool>(),
    )
        .prop_map(|(name, kind, durable)| ExchangeInfo {
            name,
            kind,
            durable,
        });
    prop_oneof![
        (name(), any::<u64>(), any::<u32>()).prop_map(|(name, ready, consumers)| {
            Response::QueueDeclared {
                name,
                ready,
                consumers,
            }
        }),
        any::<u64>().prop_map(|messages| Response::Deleted { messages }),
        any::<u64>().prop_map(|messages| Response::Purged { messages }),
        queue_info().prop_map(Response::Stats),
        proptest::collection::vec(queue_info(), 0..4).prop_map(Response::Queues),
        proptest::collection::vec(exchange_info, 0..4).prop_map(Response::Exchanges),
        any::<u32>().prop_map(|consumer_tag| Response::Subscribed { consumer_tag }),
        Just(Response::Done),
        (error_code(), reason()).prop_map(|(code, message)| Response::Error { code, message }),
        any::<u64>().prop_map(|moved| Response::Redriven { moved }),
        queue_info_v2().prop_map(Response::StatsV2),
        proptest::collection::vec(queue_info_v2(), 0..4).prop_map(Response::QueuesV2),
        proptest::collection::vec(
            (name(), tags()).prop_map(|(name, tags)| UserInfo { name, tags }),
            0..4
        )
        .prop_map(Response::Users),
        proptest::collection::vec(permission_info(), 0..4).prop_map(Response::Permissions),
        proptest::collection::vec(topic_permission_info(), 0..4)
            .prop_map(Response::TopicPermissions),
        proptest::collection::vec(
            (vhost(), vhost_limits(), any::<(u32, u32)>()).prop_map(
                |(name, limits, (connections, queues))| VhostInfo {
                    name,
                    limits,
                    connections,
                    queues,
                }
            ),
            0..4
        )
        .prop_map(Response::Vhosts),
        proptest::collection::vec(
            (name(), user_limits()).prop_map(|(user, limits)| UserLimitsInfo { user, limits }),
            0..4
        )
        .prop_map(Response::UserLimits),
    ]
}

fn confirm_status() -> impl Strategy<Value = ConfirmStatus> {
    prop_oneof![
        Just(ConfirmStatus::Confirmed(Durability::Fsynced)),
        Just(ConfirmStatus::Confirmed(Durability::InMemory)),
        Just(ConfirmStatus::Confirmed(Durability::UnsafeNotSynced)),
        (error_code(), reason()).prop_map(|(code, reason)| ConfirmStatus::Refused { code, reason }),
        Just(ConfirmStatus::Duplicate),
    ]
}

fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (
            name(),
            name(),
            proptest::collection::vec(any::<u8>(), 0..32),
            any::<u32>(),
            any::<u32>(),
            vhost()
        )
            .prop_map(
                |(client_name, mechanism, data, frame_bytes_max, heartbeat_ms, vhost)| {
                    Frame::Hello(Hello {
                        client_name,
                        credentials: Credentials {
                            mechanism,
                            data: Bytes::from(data),
                        },
                        frame_bytes_max,
                        heartbeat_ms,
                        vhost,
                    })
                }
            ),
        (name(), any::<u16>(), any::<[u32; 4]>()).prop_map(
            |(server_version, protocol_minor, limits)| {
                Frame::HelloOk(HelloOk {
                    server_version,
                    protocol_minor,
                    limits: ServerLimits {
                        frame_bytes_max: limits[0],
                        heartbeat_ms: limits[1],
                        publishes_in_flight_max: limits[2],
                        batch_messages_max: limits[3],
                    },
                })
            }
        ),
        (error_code(), reason()).prop_map(|(code, reason)| Frame::Close(Close { code, reason })),
        Just(Frame::CloseOk),
        Just(Frame::Heartbeat),
        (any::<u64>(), request()).prop_map(|(correlation_id, request)| Frame::Request {
            correlation_id,
            request
        }),
        (any::<u64>(), response()).prop_map(|(correlation_id, response)| Frame::Response {
            correlation_id,
            response
        }),
        (wire_str(), wire_str(), properties(), body()).prop_map(
            |(exchange, routing_key, properties, body)| {
                Frame::Publish(Publish {
                    exchange,
                    routing_key,
                    properties,
                    body,
                })
            }
        ),
        (
            wire_str(),
            wire_str(),
            proptest::collection::vec(
                (
                    proptest::option::of(wire_str()),
                    proptest::option::of(wire_str()),
                    properties(),
                    body()
                ),
                0..6
            )
        )
            .prop_map(|(exchange, routing_key, messages)| {
                Frame::PublishBatch(PublishBatch {
                    exchange,
                    routing_key,
                    messages: messages
                        .into_iter()
                        .map(|(exchange, routing_key, properties, body)| BatchMessage {
                            exchange,
                            routing_key,
                            properties,
                            body,
                        })
                        .collect(),
                })
            }),
        proptest::collection::vec((any::<u64>(), any::<u64>(), confirm_status()), 0..6).prop_map(
            |ranges| {
                Frame::Confirm(Confirm {
                    ranges: ranges
                        .into_iter()
                        .map(|(first, second, status)| ConfirmRange {
                            first_seq: first.min(second),
                            last_seq: first.max(second),
                            status,
                        })
                        .collect(),
                })
            }
        ),
        (any::<u32>(), delivery_parts()).prop_map(|(consumer_tag, parts)| {
            Frame::Deliver(Deliver {
                consumer_tag,
                delivery: to_delivery(parts),
            })
        }),
        (
            any::<u32>(),
            proptest::collection::vec((1..1000u64, delivery_parts(), any::<bool>()), 0..6)
        )
            .prop_map(|(consumer_tag, entries)| {
                let mut delivery_tag = 0;
                let mut previous: Option<Delivery> = None;
                let mut deliveries = Vec::new();
                for (gap, parts, same_routing) in entries {
                    delivery_tag += gap;
                    let mut delivery = to_delivery(parts);
                    delivery.delivery_tag = delivery_tag;
                    if let (true, Some(previous)) = (same_routing, &previous) {
                        delivery.exchange = previous.exchange.clone();
                        delivery.routing_key = previous.routing_key.clone();
                    }
                    previous = Some(delivery.clone());
                    deliveries.push(delivery);
                }
                Frame::DeliverBatch(DeliverBatch {
                    consumer_tag,
                    deliveries,
                })
            }),
        any::<(u64, bool)>().prop_map(|(delivery_tag, multiple)| Frame::Ack(Ack {
            delivery_tag,
            multiple
        })),
        any::<(u64, bool, bool)>().prop_map(|(delivery_tag, multiple, requeue)| Frame::Nack(
            Nack {
                delivery_tag,
                multiple,
                requeue
            }
        )),
        any::<(u64, bool)>().prop_map(|(delivery_tag, requeue)| Frame::Reject(Reject {
            delivery_tag,
            requeue
        })),
        proptest::collection::vec(any::<(u64, u64)>(), 0..6).prop_map(|ranges| {
            Frame::AckRanges(AckRanges {
                ranges: ranges
                    .into_iter()
                    .map(|(a, b)| TagRange {
                        first: a.min(b),
                        last: a.max(b),
                    })
                    .collect(),
            })
        }),
        any::<(u32, u32)>().prop_map(|(consumer_tag, credit)| Frame::Credit(Credit {
            consumer_tag,
            credit
        })),
        (any::<u32>(), error_code(), reason()).prop_map(|(consumer_tag, code, reason)| {
            Frame::ConsumerCancelled(ConsumerCancelled {
                consumer_tag,
                code,
                reason,
            })
        }),
        any::<(u64, u64)>().prop_map(|(delivery_tag, delay_ms)| Frame::Defer(Defer {
            delivery_tag,
            delay_ms
        })),
        any::<u64>().prop_map(|delivery_tag| Frame::Touch(Touch { delivery_tag })),
    ]
}

fn encoded(frame: &Frame) -> BytesMut {
    let mut buf = BytesMut::new();
    encode(frame, FRAME_BYTES_MAX, &mut buf).expect("generated frames are valid");
    buf
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn encode_then_decode_is_identity_for_every_frame_kind(frame in frame()) {
        let mut buf = encoded(&frame);
        let decoded = decode(&mut buf, FRAME_BYTES_MAX).unwrap().expect("whole frame");
        prop_assert_eq!(&decoded, &frame);
        prop_assert!(buf.is_empty());
        // Re-encoding the decoded frame gives the same bytes (the encoding is canonical).
        prop_assert_eq!(encoded(&decoded), encoded(&frame));
    }

    #[test]
    fn frame_split_at_every_boundary_decodes_once_whole(frame in frame()) {
        let bytes = encoded(&frame).freeze();
        let mut codec = Codec::new();
        for split in 0..bytes.len() {
            let mut buf = BytesMut::from(&bytes[..split]);
            prop_assert!(codec.decode(&mut buf).unwrap().is_none(), "decoded from {} of {} bytes", split, bytes.len());
            buf.extend_from_slice(&bytes[split..]);
            let decoded = codec.decode(&mut buf).unwrap().expect("whole frame");
            prop_assert_eq!(&decoded, &frame);
            prop_assert!(buf.is_empty());
        }
    }

    #[test]
    fn stream_of_frames_fed_in_random_chunks_decodes_in_order(
        frames in proptest::collection::vec(frame(), 1..6),
        chunk_lens in proptest::collection::vec(1usize..40, 1..200),
    ) {
        let mut codec = Codec::new();
        let mut stream = BytesMut::new();
        for frame in &frames {
            codec.encode(frame, &mut stream).unwrap();
        }
        let stream = stream.freeze();
        let mut buf = BytesMut::new();
        let mut decoded = Vec::new();
        let mut offset = 0;
        let mut chunk_idx = 0;
        while offset < stream.len() {
            let chunk_len = chunk_lens[chunk_idx % chunk_lens.len()].min(stream.len() - offset);
            chunk_idx += 1;
            buf.extend_from_slice(&stream[offset..offset + chunk_len]);
            offset += chunk_len;
            while let Some(frame) = codec.decode(&mut buf).unwrap() {
                decoded.push(frame);
            }
        }
        prop_assert_eq!(decoded, frames);
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn vectored_chunks_concatenate_to_the_plain_encoding(frame in frame()) {
        let mut chunks = Vec::new();
        let total = encode_vectored(&frame, FRAME_BYTES_MAX, &mut chunks).unwrap();
        let joined: Vec<u8> = chunks.iter().flat_map(|chunk| chunk.iter().copied()).collect();
        prop_assert_eq!(total, joined.len());
        prop_assert_eq!(&joined[..], &encoded(&frame)[..]);
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_frame(Bytes::from(bytes.clone()));
        let mut buf = BytesMut::from(&bytes[..]);
        while let Ok(Some(_)) = decode(&mut buf, 4096) {}
    }

    #[test]
    fn mutated_valid_frames_never_panic_the_decoder(
        frame in frame(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let mut bytes = encoded(&frame).to_vec();
        for (idx, byte) in flips {
            let at = idx.index(bytes.len());
            bytes[at] ^= byte;
        }
        let _ = decode_frame(Bytes::copy_from_slice(&bytes[4..]));
        let mut buf = BytesMut::from(&bytes[..]);
        while let Ok(Some(_)) = decode(&mut buf, FRAME_BYTES_MAX) {}
    }
}
