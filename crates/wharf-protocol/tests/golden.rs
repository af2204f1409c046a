//! Golden vectors: checked-in encodings that must not change without a version bump.
//!
//! Each `vectors/<name>.hex` file holds one encoded frame (length prefix included) as hex, with
//! `#` comment lines. The test asserts the encoder produces these bytes exactly and the decoder
//! turns them back into the frame. To (re)generate after an *intended* format change (which
//! needs a protocol version decision, see docs/protocol.md): `WHARF_BLESS=1 cargo test -p
//! wharf-protocol --test golden`.

use bytes::{Bytes, BytesMut};
use std::path::PathBuf;
use wharf_protocol::limits::FRAME_BYTES_MAX;
use wharf_protocol::*;

fn vectors() -> Vec<(&'static str, Frame)> {
    let headers = Table::try_from_entries([
        ("trace-id", Value::Str("abc".into())),
        ("attempt", Value::I64(3)),
        ("urgent", Value::Bool(true)),
    ])
    .unwrap();
    let properties = Properties::try_from(PropertiesRef {
        message_id: Some("m-1"),
        content_type: Some("text/plain"),
        timestamp_ms: 1_700_000_000_000,
        expiration_ms: Some(60_000),
        priority: 5,
        persistent: true,
        headers: headers.as_table_ref(),
        ..PropertiesRef::default()
    })
    .unwrap();
    vec![
        ("heartbeat", Frame::Heartbeat),
        (
            "hello",
            Frame::Hello(Hello {
                client_name: "wharf-client/0.1".into(),
                credentials: Credentials {
                    mechanism: "PLAIN".into(),
                    data: Bytes::from_static(b"\0guest\0guest"),
                },
                frame_bytes_max: 1 << 20,
                heartbeat_ms: 0,
                vhost: "/".into(),
            }),
        ),
        (
            "hello_ok",
            Frame::HelloOk(HelloOk {
                server_version: "wharf/0.1.0".into(),
                protocol_minor: 0,
                limits: ServerLimits::default(),
            }),
        ),
        (
            "close_unsupported_version",
            Frame::Close(Close {
                code: ErrorCode::UnsupportedVersion,
                reason: "major 2 not supported".into(),
            }),
        ),
        (
            "request_declare_queue",
            Frame::Request {
                correlation_id: 7,
                request: Request::DeclareQueue {
                    name: "orders".into(),
                    durable: true,
                    exclusive: false,
                    auto_delete: false,
                    passive: false,
                    arguments: Table::try_from_entries([("x-max-length", Value::I64(1000))])
                        .unwrap(),
                },
            },
        ),
        (
            "response_error",
            Frame::Response {
                correlation_id: 7,
                response: Response::Error {
                    code: ErrorCode::NotFound,
                    message: "no queue 'orders'".into(),
                },
            },
        ),
        (
            "publish",
            Frame::Publish(Publish {
                exchange: "".into(),
                routing_key: "orders".into(),
                properties: properties.clone(),
                body: Bytes::from_static(b"hello"),
            }),
        ),
        (
            "publish_batch",
            Frame::PublishBatch(PublishBatch {
                exchange: "events".into(),
                routing_key: "a.b".into(),
                messages: vec![
                    BatchMessage {
                        body: Bytes::from_static(b"one"),
                        ..BatchMessage::default()
                    },
                    BatchMessage {
                        routing_key: Some("a.c".into()),
                        properties: properties.clone(),
                        body: Bytes::from_static(b"two"),
                        ..BatchMessage::default()
                    },
                ],
            }),
        ),
        (
            "confirm",
            Frame::Confirm(Confirm {
                ranges: vec![
                    ConfirmRange {
                        first_seq: 1,
                        last_seq: 100,
                        status: ConfirmStatus::Confirmed(Durability::Fsynced),
                    },
                    ConfirmRange {
                        first_seq: 101,
                        last_seq: 101,
                        status: ConfirmStatus::Refused {
                            code: ErrorCode::Backpressure,
                            reason: "queue full".into(),
                        },
                    },
                ],
            }),
        ),
        (
            "deliver_batch",
            Frame::DeliverBatch(DeliverBatch {
                consumer_tag: 1,
                deliveries: vec![
                    Delivery {
                        delivery_tag: 41,
                        delivery_count: 1,
                        exchange: "events".into(),
                        routing_key: "a.b".into(),
                        body: Bytes::from_static(b"x"),
                        ..Delivery::default()
                    },
                    Delivery {
                        delivery_tag: 42,
                        redelivered: true,
                        delivery_count: 2,
                        exchange: "events".into(),
                        routing_key: "a.b".into(),
                        properties,
                        body: Bytes::from_static(b"y"),
                    },
                ],
            }),
        ),
        (
            "ack_ranges",
            Frame::AckRanges(AckRanges {
                ranges: vec![
                    TagRange { first: 1, last: 10 },
                    TagRange {
                        first: 12,
                        last: 12,
                    },
                ],
            }),
        ),
        (
            "credit",
            Frame::Credit(Credit {
                consumer_tag: 1,
                credit: 500,
            }),
        ),
        // Protocol 1.1.
        (
            "defer",
            Frame::Defer(Defer {
                delivery_tag: 42,
                delay_ms: 10_000,
            }),
        ),
        ("touch", Frame::Touch(Touch { delivery_tag: 42 })),
        (
            "request_add_user",
            Frame::Request {
                correlation_id: 10,
                request: Request::AddUser {
                    name: "alice".into(),
                    password: "s3cret".into(),
                    tags: vec!["monitoring".into()],
                },
            },
        ),
        (
            "request_set_permissions",
            Frame::Request {
                correlation_id: 11,
                request: Request::SetPermissions(PermissionInfo {
                    user: "alice".into(),
                    vhost: "/".into(),
                    configure: "^alice-".into(),
                    write: ".*".into(),
                    read: "".into(),
                }),
            },
        ),
        (
            "response_users",
            Frame::Response {
                correlation_id: 12,
                response: Response::Users(vec![UserInfo {
                    name: "guest".into(),
                    tags: vec!["administrator".into()],
                }]),
            },
        ),
        (
            "request_redrive",
            Frame::Request {
                correlation_id: 8,
                request: Request::Redrive {
                    queue: "orders.dlq".into(),
                    max: 100,
                },
            },
        ),
        (
            "response_redriven",
            Frame::Response {
                correlation_id: 8,
                response: Response::Redriven { moved: 100 },
            },
        ),
        (
            "request_queue_stats_v2",
            Frame::Request {
                correlation_id: 9,
                request: Request::QueueStatsV2 {
                    name: "orders".into(),
                },
            },
        ),
        (
            "response_stats_v2",
            Frame::Response {
                correlation_id: 9,
                response: Response::StatsV2(QueueInfoV2 {
                    name: "orders".into(),
                    durable: true,
                    exclusive: false,
                    auto_delete: false,
                    ready: 5,
                    unacked: 2,
                    consumers: 1,
                    delayed: 300,
                    ready_bytes: 640,
                    published: 1_000,
                    delivered: 700,
                    redelivered: 3,
                    acked: 690,
                    dropped: 4,
                    expired: 1,
                    duplicates: 2,
                }),
            },
        ),
        (
            "request_subscribe_ack_timeout",
            Frame::Request {
                correlation_id: 10,
                request: Request::Subscribe {
                    queue: "orders".into(),
                    consumer_tag: 1,
                    prefetch: 10,
                    auto_ack: false,
                    exclusive: false,
                    priority: 0,
                    initial_credit: None,
                    arguments: Table::try_from_entries([("x-ack-timeout", Value::I64(30_000))])
                        .unwrap(),
                },
            },
        ),
        (
            "publish_delayed",
            Frame::Publish(Publish {
                exchange: "".into(),
                routing_key: "orders".into(),
                properties: Properties::try_from(PropertiesRef {
                    delay_ms: Some(5_000),
                    message_id: Some("m-2"),
                    ..PropertiesRef::default()
                })
                .unwrap(),
                body: Bytes::from_static(b"later"),
            }),
        ),
        // Protocol 1.3.
        (
            "hello_vhost",
            Frame::Hello(Hello {
                client_name: "wharf-client/0.1".into(),
                credentials: Credentials {
                    mechanism: "PLAIN".into(),
                    data: Bytes::from_static(b"\0guest\0guest"),
                },
                frame_bytes_max: 1 << 20,
                heartbeat_ms: 0,
                vhost: "staging".into(),
            }),
        ),
        (
            "request_add_vhost",
            Frame::Request {
                correlation_id: 13,
                request: Request::AddVhost {
                    name: "staging".into(),
                    limits: VhostLimits {
                        max_connections: Some(100),
                        max_queues: None,
                    },
                },
            },
        ),
        (
            "request_delete_vhost",
            Frame::Request {
                correlation_id: 14,
                request: Request::DeleteVhost {
                    name: "staging".into(),
                },
            },
        ),
        (
            "request_list_vhosts",
            Frame::Request {
                correlation_id: 15,
                request: Request::ListVhosts,
            },
        ),
        (
            "request_set_vhost_limits",
            Frame::Request {
                correlation_id: 16,
                request: Request::SetVhostLimits {
                    name: "staging".into(),
                    limits: VhostLimits {
                        max_connections: None,
                        max_queues: Some(1_000),
                    },
                },
            },
        ),
        (
            "response_vhosts",
            Frame::Response {
                correlation_id: 15,
                response: Response::Vhosts(vec![
                    VhostInfo {
                        name: "/".into(),
                        limits: VhostLimits::default(),
                        connections: 2,
                        queues: 5,
                    },
                    VhostInfo {
                        name: "staging".into(),
                        limits: VhostLimits {
                            max_connections: Some(100),
                            max_queues: Some(1_000),
                        },
                        connections: 0,
                        queues: 0,
                    },
                ]),
            },
        ),
        (
            "request_set_user_limits",
            Frame::Request {
                correlation_id: 17,
                request: Request::SetUserLimits {
                    user: "alice".into(),
                    limits: UserLimits {
                        max_connections: Some(10),
                        max_queues: None,
                    },
                },
            },
        ),
        (
            "request_list_user_limits",
            Frame::Request {
                correlation_id: 18,
                request: Request::ListUserLimits,
            },
        ),
        (
            "response_user_limits",
            Frame::Response {
                correlation_id: 18,
                response: Response::UserLimits(vec![
                    UserLimitsInfo {
                        user: "alice".into(),
                        limits: UserLimits {
                            max_connections: Some(10),
                            max_queues: Some(1_000),
                        },
                    },
                    UserLimitsInfo {
                        user: "guest".into(),
                        limits: UserLimits::default(),
                    },
                ]),
            },
        ),
    ]
}

fn to_hex(bytes: &[u8]) -> String {
    let hex: Vec<String> = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
    hex.chunks(16)
        .map(|line| line.join(" "))
        .collect::<Vec<_>>()
        .join("\n")
}

fn from_hex(text: &str) -> Vec<u8> {
    text.lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .flat_map(|line| line.split_whitespace())
        .map(|byte| u8::from_str_radix(byte, 16).expect("hex byte"))
        .collect()
}

fn vector_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/vectors")
        .join(format!("{name}.hex"))
}

#[test]
fn encodings_match_checked_in_vectors_byte_for_byte() {
    let bless = std::env::var_os("WHARF_BLESS").is_some();
    for (name, frame) in vectors() {
        let mut encoded = BytesMut::new();
        encode(&frame, FRAME_BYTES_MAX, &mut encoded).unwrap();
        let path = vector_path(name);
        if bless {
            let text = format!("# {name}: {frame:?}\n{}\n", to_hex(&encoded));
            std::fs::write(&path, text).unwrap();
        }
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|err| panic!("{}: {err}", path.display()));
        let expected = from_hex(&text);
        assert_eq!(&encoded[..], &expected[..], "vector {name} changed");
        let mut buf = BytesMut::from(&expected[..]);
        assert_eq!(
            decode(&mut buf, FRAME_BYTES_MAX).unwrap(),
            Some(frame),
            "vector {name} decodes differently"
        );
    }
}

#[test]
fn preamble_vector_is_whrf_then_versions() {
    assert_eq!(
        Preamble { major: 1, minor: 0 }.encode(),
        *b"WHRF\x00\x01\x00\x00"
    );
    assert_eq!(Preamble::CURRENT.encode(), *b"WHRF\x00\x01\x00\x03");
}

#[test]
fn heartbeat_is_five_bytes() {
    // Spelled out as the smallest example in docs/protocol.md.
    let mut buf = BytesMut::new();
    encode(&Frame::Heartbeat, FRAME_BYTES_MAX, &mut buf).unwrap();
    assert_eq!(&buf[..], &[0, 0, 0, 1, 4]);
}
