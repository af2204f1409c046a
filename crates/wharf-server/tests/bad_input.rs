//! Bad input: each case gets a clear, typed answer, and other clients keep being served.

mod common;

use common::{Raw, TestServer, server_still_serves};
use wharf_protocol::{
    Ack, ConfirmStatus, ErrorCode, Frame, Preamble, Properties, Publish, Request, Response, WireStr,
};

#[tokio::test]
async fn random_bytes_instead_of_a_handshake_are_refused_and_others_are_still_served() {
    let server = TestServer::start().await;
    let mut raw = Raw::connect(server.addr()).await;
    raw.send_bytes(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    // Not a Wharf client: the server closes without a word (docs/protocol.md §1).
    assert!(
        raw.read_preamble().await.is_none(),
        "socket closed with nothing sent"
    );
    assert!(raw.buf.is_empty());
    server_still_serves(server.addr(), "after-garbage").await;
}

#[tokio::test]
async fn an_unsupported_protocol_major_version_is_refused_with_its_code() {
    let server = TestServer::start().await;
    let mut raw = Raw::connect(server.addr()).await;
    raw.send_bytes(&Preamble { major: 9, minor: 0 }.encode())
        .await;
    raw.read_preamble().await.expect("preamble");
    let close = raw.expect_close().await;
    assert_eq!(close.code, ErrorCode::UnsupportedVersion);
    server_still_serves(server.addr(), "after-version").await;
}

#[tokio::test]
async fn a_length_prefix_over_the_frame_limit_closes_with_frame_too_large() {
    let server = TestServer::start().await;
    let mut raw = Raw::open(server.addr()).await;
    raw.send_bytes(&[0xff, 0xff, 0xff, 0xf0]).await;
    let close = raw.expect_close().await;
    assert_eq!(close.code, ErrorCode::FrameTooLarge);
    server_still_serves(server.addr(), "after-large").await;
}

/// Before the handshake, a frame may claim at most 64 KiB (a `Hello` is a control frame):
/// a peer that has not said who it is cannot make the broker expect 16 MiB.
#[tokio::test]
async fn a_hello_larger_than_a_control_frame_closes_with_frame_too_large() {
    let server = TestServer::start().await;
    let mut raw = Raw::connect(server.addr()).await;
    raw.send_bytes(&Preamble::CURRENT.encode()).await;
    raw.send_bytes(&(64u32 * 1024 + 1).to_be_bytes()).await;
    raw.read_preamble().await.expect("preamble");
    let close = raw.expect_close().await;
    assert_eq!(close.code, ErrorCode::FrameTooLarge);
    server_still_serves(server.addr(), "after-large-hello").await;
}

#[tokio::test]
async fn an_unknown_frame_kind_closes_with_protocol_violation() {
    let server = TestServer::start().await;
    let mut raw = Raw::open(server.addr()).await;
    // Length 2, kind 200 as a varint (0xC8 0x01).
    raw.send_bytes(&[0, 0, 0, 2, 0xc8, 0x01]).await;
    let close = raw.expect_close().await;
    assert_eq!(close.code, ErrorCode::ProtocolViolation);
    assert!(close.reason.contains("200"), "{}", close.reason);
    server_still_serves(server.addr(), "after-unknown").await;
}

#[tokio::test]
async fn a_frame_before_the_hello_closes_with_protocol_violation() {
    let server = TestServer::start().await;
    let mut raw = Raw::connect(server.addr()).await;
    raw.send_bytes(&Preamble::CURRENT.encode()).await;
    raw.send(&Frame::Heartbeat).await;
    raw.read_preamble().await.expect("preamble");
    let close = raw.expect_close().await;
    assert_eq!(close.code, ErrorCode::ProtocolViolation);
    assert!(close.reason.contains("Hello"), "{}", close.reason);
    server_still_serves(server.addr(), "after-early-frame").await;
}

#[tokio::test]
async fn a_server_only_frame_from_a_client_closes_with_protocol_violation() {
    let server = TestServer::start().await;
    let mut raw = Raw::open(server.addr()).await;
    raw.send(&Frame::HelloOk(Default::default())).await;
    assert_eq!(raw.expect_close().await.code, ErrorCode::ProtocolViolation);
}

#[tokio::test]
async fn publishing_to_an_unknown_exchange_is_refused_and_the_connection_stays_usable() {
    let server = TestServer::start().await;
    let mut raw = Raw::open(server.addr()).await;
    raw.send(&Frame::Publish(Publish {
        exchange: WireStr::from("no-such-exchange"),
        routing_key: WireStr::from("k"),
        properties: Properties::default(),
        body: bytes::Bytes::from_static(b"x"),
    }))
    .await;
    let Some(Frame::Confirm(confirm)) = raw.recv_significant().await else {
        panic!("expected a confirm")
    };
    assert_eq!(confirm.ranges.len(), 1);
    assert_eq!(
        (confirm.ranges[0].first_seq, confirm.ranges[0].last_seq),
        (1, 1)
    );
    let ConfirmStatus::Refused { code, reason } = &confirm.ranges[0].status else {
        panic!("{confirm:?}")
    };
    assert_eq!(*code, ErrorCode::NotFound);
    assert!(reason.contains("no-such-exchange"), "{reason}");
    let response = raw.request(Request::ListQueues).await;
    assert!(matches!(response, Response::Queues(_)), "{response:?}");
}

#[tokio::test]
async fn requests_with_bad_names_get_typed_errors_and_the_connection_stays_usable() {
    let server = TestServer::start().await;
    let mut raw = Raw::open(server.addr()).await;
    let response = raw
        .request(Request::DeclareQueue {
            name: "wharf.reserved".into(),
            durable: false,
            exclusive: false,
            auto_delete: false,
            passive: false,
            arguments: Default::default(),
        })
        .await;
    assert!(
        matches!(
            response,
            Response::Error {
                code: ErrorCode::InvalidName,
                ..
            }
        ),
        "{response:?}"
    );
    let response = raw
        .request(Request::QueueStats {
            name: "missing".into(),
        })
        .await;
    assert!(
        matches!(
            response,
            Response::Error {
                code: ErrorCode::NotFound,
                ..
            }
        ),
        "{response:?}"
    );
    let response = raw
        .request(Request::DeleteExchange {
            name: "wharf.topic".into(),
            if_unused: false,
        })
        .await;
    assert!(
        matches!(
            response,
            Response::Error {
                code: ErrorCode::AccessRefused,
                ..
            }
        ),
        "{response:?}"
    );
}

/// `amq.` names are reserved (docs/protocol.md, as in RabbitMQ): a declare that would create a
/// queue or an exchange named so is refused with `InvalidName` naming the prefix; a passive
/// declare only looks (and finds nothing); the connection stays usable.
#[tokio::test]
async fn declaring_an_amq_name_is_refused_and_a_passive_declare_only_looks() {
    let server = TestServer::start().await;
    let mut raw = Raw::open(server.addr()).await;
    let queue = |name: &str, passive: bool| Request::DeclareQueue {
        name: name.into(),
        durable: false,
        exclusive: false,
        auto_delete: false,
        passive,
        arguments: Default::default(),
    };
    let exchange = |name: &str, passive: bool| Request::DeclareExchange {
        name: name.into(),
        kind: wharf_protocol::ExchangeKind::Direct,
        durable: false,
        auto_delete: false,
        internal: false,
        passive,
        arguments: Default::default(),
    };
    for request in [queue("amq.mine", false), exchange("amq.direct2", false)] {
        match raw.request(request).await {
            Response::Error {
                code: ErrorCode::InvalidName,
                message,
            } => assert!(message.contains("`amq.`"), "{message}"),
            other => panic!("expected InvalidName, got {other:?}"),
        }
    }
    for request in [queue("amq.mine", true), exchange("amq.direct2", true)] {
        let response = raw.request(request).await;
        assert!(
            matches!(
                response,
                Response::Error {
                    code: ErrorCode::NotFound,
                    ..
                }
            ),
            "{response:?}"
        );
    }
    // Other names, including ones merely containing `amq.`, are fine.
    let response = raw.request(queue("my.amq.queue", false)).await;
    assert!(
        matches!(response, Response::QueueDeclared { .. }),
        "{response:?}"
    );
    server_still_serves(server.addr(), "after-amq").await;
}

#[tokio::test]
async fn acking_an_unknown_delivery_tag_closes_that_connection_only() {
    let server = TestServer::start().await;
    let mut bystander = Raw::open(server.addr()).await;
    let mut raw = Raw::open(server.addr()).await;
    raw.send(&Frame::Ack(Ack {
        delivery_tag: 42,
        multiple: false,
    }))
    .await;
    let close = raw.expect_close().await;
    assert_eq!(close.code, ErrorCode::UnknownDeliveryTag);
    assert!(close.reason.contains("42"), "{}", close.reason);
    let response = bystander.request(Request::ListExchanges).await;
    assert!(
        matches!(response, Response::Exchanges(ref all) if all.len() >= 5),
        "{response:?}"
    );
}

#[tokio::test]
async fn a_thousand_idle_connections_do_not_stop_others_being_served() {
    let server = TestServer::start().await;
    let mut idle = Vec::with_capacity(1000);
    for _ in 0..1000 {
        idle.push(Raw::open(server.addr()).await);
    }
    server_still_serves(server.addr(), "with-1000-idle").await;
    drop(idle);
    server_still_serves(server.addr(), "after-1000-idle").await;
}

#[tokio::test]
async fn connections_over_the_limit_are_refused_with_resource_limit() {
    let server = TestServer::start_with(|config| config.connections_max = 2).await;
    let _first = Raw::open(server.addr()).await;
    let _second = Raw::open(server.addr()).await;
    let mut third = Raw::connect(server.addr()).await;
    third.send_bytes(&Preamble::CURRENT.encode()).await;
    third.send(&Raw::hello()).await;
    third.read_preamble().await.expect("preamble");
    assert_eq!(third.expect_close().await.code, ErrorCode::ResourceLimit);
}

#[tokio::test]
async fn a_silent_peer_is_closed_after_twice_the_heartbeat() {
    let server =
        TestServer::start_with(|config| config.heartbeat = std::time::Duration::from_millis(200))
            .await;
    let mut raw = Raw::open(server.addr()).await;
    let started = std::time::Instant::now();
    // Read (and ignore) the server's heartbeats, never answering: the server gives up on us.
    let close = raw.expect_close().await;
    assert_eq!(close.code, ErrorCode::HeartbeatTimeout);
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}

#[tokio::test]
async fn graceful_shutdown_sends_close_to_every_connection_and_stops() {
    let server = TestServer::start().await;
    let mut first = Raw::open(server.addr()).await;
    let mut second = Raw::open(server.addr()).await;
    let addr = server.addr();
    let TestServer { server, dir: _dir } = server;
    let stopping = tokio::spawn(server.stop());
    assert_eq!(first.expect_close().await.code, ErrorCode::ConnectionForced);
    assert_eq!(
        second.expect_close().await.code,
        ErrorCode::ConnectionForced
    );
    tokio::time::timeout(common::DEADLINE, stopping)
        .await
        .expect("stops in time")
        .unwrap()
        .unwrap();
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no longer listening"
    );
}
