//! The client's state machine against a scripted peer (tests/support): handshake,
//! request correlation, publish numbering and confirms, windows, batches, deliveries,
//! credit, cancel, heartbeats and close.

mod support;

use bytes::Bytes;
use std::collections::HashMap;
use std::io;
use std::time::Duration;
use support::{Peer, quiet_limits, within};
use wharf_client::{
    Client, ClientError, ClientOptions, ConsumeOptions, Credentials, Durability, ErrorCode, Message,
};
use wharf_protocol::{
    Ack, Close, ConfirmRange, ConfirmStatus, ConsumerCancelled, Credit, Deliver, DeliverBatch,
    Delivery, Frame, Preamble, Request, Response, ServerLimits, WireStr,
};

fn confirm(first_seq: u64, last_seq: u64, status: ConfirmStatus) -> Frame {
    Frame::Confirm(wharf_protocol::Confirm {
        ranges: vec![ConfirmRange {
            first_seq,
            last_seq,
            status,
        }],
    })
}

const FSYNCED: ConfirmStatus = ConfirmStatus::Confirmed(Durability::Fsynced);

fn delivery(delivery_tag: u64, body: &'static str) -> Delivery {
    Delivery {
        delivery_tag,
        delivery_count: 1,
        exchange: WireStr::from(""),
        routing_key: WireStr::from("jobs"),
        body: Bytes::from_static(body.as_bytes()),
        ..Delivery::default()
    }
}

/// Receives publish frames (single or batched) until `n_messages` bodies arrived; returns the
/// bodies in socket order.
async fn recv_published(conn: &mut support::PeerConn, n_messages: usize) -> Vec<Bytes> {
    let mut bodies = Vec::new();
    while bodies.len() < n_messages {
        match conn.recv().await {
            Frame::Publish(publish) => bodies.push(publish.body),
            Frame::PublishBatch(batch) => {
                bodies.extend(batch.messages.into_iter().map(|message| message.body))
            }
            other => panic!("expected a publish, got {other:?}"),
        }
    }
    assert_eq!(
        bodies.len(),
        n_messages,
        "no more than {n_messages} publishes"
    );
    bodies
}

async fn connected(peer: &Peer, limits: ServerLimits) -> (Client, support::PeerConn) {
    let url = peer.url();
    let connecting = tokio::spawn(async move { Client::connect(&url).await });
    let (conn, _) = peer.accept(limits).await;
    (within(connecting).await.unwrap().unwrap(), conn)
}

/// Subscribes through the peer; returns the consumer and the `Subscribe` request.
async fn subscribed(
    client: &Client,
    conn: &mut support::PeerConn,
    options: ConsumeOptions,
) -> (wharf_client::Consumer, Request) {
    let consuming = {
        let client = client.clone();
        tokio::spawn(async move { client.consume("jobs", options).await })
    };
    let (correlation_id, request) = conn.recv_request().await;
    let Request::Subscribe { consumer_tag, .. } = request else {
        panic!("expected Subscribe, got {request:?}")
    };
    conn.respond(correlation_id, Response::Subscribed { consumer_tag })
        .await;
    (within(consuming).await.unwrap().unwrap(), request)
}

#[tokio::test]
async fn handshake_sends_hello_and_adopts_the_server_limits() {
    let peer = Peer::bind().await;
    let url = peer.url().replace("wharf://", "wharf://alice:secret@");
    let options = ClientOptions {
        client_name: "orders-svc".into(),
        heartbeat_ms: 1234,
        ..ClientOptions::default()
    };
    let connecting = tokio::spawn(async move { Client::connect_with(&url, options).await });
    let limits = ServerLimits {
        frame_bytes_max: 1 << 20,
        heartbeat_ms: 0,
        publishes_in_flight_max: 7,
        batch_messages_max: 3,
    };
    let (_conn, hello) = peer.accept(limits).await;
    let client = within(connecting).await.unwrap().unwrap();
    assert_eq!(hello.client_name, "orders-svc");
    assert_eq!(hello.heartbeat_ms, 1234);
    assert_eq!(
        hello.credentials,
        Credentials::plain("alice", "secret")
            .clone()
            .to_wire_for_test()
    );
    assert_eq!(client.server_limits(), limits);
    assert_eq!(client.server_version(), "peer/0");
    assert_eq!(client.publisher().window(), 7);
}

/// `Credentials::to_wire` is crate-private; rebuild the expected `PLAIN` frame field here.
trait ToWireForTest {
    fn to_wire_for_test(self) -> wharf_protocol::Credentials;
}

impl ToWireForTest for Credentials {
    fn to_wire_for_test(self) -> wharf_protocol::Credentials {
        match self {
            Credentials::Plain { username, password } => wharf_protocol::Credentials {
                mechanism: "PLAIN".into(),
                data: Bytes::from(format!("\0{username}\0{password}")),
            },
            _ => wharf_protocol::Credentials {
                mechanism: "ANONYMOUS".into(),
                data: Bytes::new(),
            },
        }
    }
}

#[tokio::test]
async fn handshake_refusal_is_a_typed_error_with_the_server_code() {
    let peer = Peer::bind().await;
    let url = peer.url();
    let connecting = tokio::spawn(async move { Client::connect(&url).await });
    let mut conn = peer.accept_with_preamble(Preamble::CURRENT).await;
    assert!(matches!(conn.recv().await, Frame::Hello(_)));
    conn.send(&Frame::Close(Close {
        code: ErrorCode::AccessRefused,
        reason: "bad password".into(),
    }))
    .await;
    let err = within(connecting).await.unwrap().unwrap_err();
    assert!(
        matches!(err, ClientError::ServerClosed { code: ErrorCode::AccessRefused, ref reason } if reason == "bad password")
    );
    assert_eq!(err.code(), Some(ErrorCode::AccessRefused));
}

#[tokio::test]
async fn other_major_version_is_reported_from_the_servers_close() {
    let peer = Peer::bind().await;
    let url = peer.url();
    let connecting = tokio::spawn(async move { Client::connect(&url).await });
    let mut conn = peer
        .accept_with_preamble(Preamble { major: 9, minor: 0 })
        .await;
    conn.send(&Frame::Close(Close {
        code: ErrorCode::UnsupportedVersion,
        reason: "speaks 9".into(),
    }))
    .await;
    let err = within(connecting).await.unwrap().unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::UnsupportedVersion));
}

#[tokio::test]
async fn refused_tcp_connect_is_a_connect_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let err = within(Client::connect(&addr.to_string()))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClientError::Connect { ref source, .. } if source.kind() == io::ErrorKind::ConnectionRefused),
        "{err:?}"
    );
}

#[tokio::test]
async fn silent_server_makes_connect_time_out() {
    let peer = Peer::bind().await;
    let options = ClientOptions {
        connect_timeout: Duration::from_millis(200),
        ..ClientOptions::default()
    };
    // The listener accepts (kernel backlog) but never answers the preamble.
    let err = within(Client::connect_with(&peer.url(), options))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Timeout {
                operation: "connect",
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn responses_are_matched_by_correlation_id_in_any_order() {
    let peer = Peer::bind().await;
    let (client, mut conn) = connected(&peer, quiet_limits()).await;
    let declaring = {
        let client = client.clone();
        tokio::spawn(async move { client.declare_queue("a").durable(true).max_length(10).await })
    };
    let (first_id, first) = conn.recv_request().await;
    let purging = {
        let client = client.clone();
        tokio::spawn(async move { client.purge_queue("b").await })
    };
    let (second_id, second) = conn.recv_request().await;
    let Request::DeclareQueue {
        name,
        durable,
        arguments,
        ..
    } = first
    else {
        panic!("{first:?}")
    };
    assert_eq!((name.as_str(), durable), ("a", true));
    assert_eq!(
        arguments
            .get("x-max-length")
            .and_then(|value| value.as_i64()),
        Some(10)
    );
    assert_eq!(second, Request::PurgeQueue { name: "b".into() });
    assert_ne!(first_id, second_id);
    // Answer in reverse order; the purge fails on the server.
    conn.respond(
        second_id,
        Response::Error {
            code: ErrorCode::NotFound,
            message: "no queue b".into(),
        },
    )
    .await;
    conn.respond(
        first_id,
        Response::QueueDeclared {
            name: "a".into(),
            ready: 3,
            consumers: 0,
        },
    )
    .await;
    let declared = within(declaring).await.unwrap().unwrap();
    assert_eq!((declared.name.as_str(), declared.ready), ("a", 3));
    let err = within(purging).await.unwrap().unwrap_err();
    assert!(err.is_not_found() && !err.is_connection_error(), "{err:?}");
    // The connection lives on.
    let listing = tokio::spawn(async move { client.list_queues().await });
    let (correlation_id, request) = conn.recv_request().await;
    assert_eq!(request, Request::ListQueues);
    conn.respond(correlation_id, Response::Queues(Vec::new()))
        .await;
    assert!(within(listing).await.unwrap().unwrap().is_empty());
}

#[tokio::test]
async fn request_without_answer_times_out_and_the_late_answer_is_ignored() {
    let peer = Peer::bind().await;
    let url = peer.url();
    let options = ClientOptions {
        request_timeout: Duration::from_millis(100),
        ..ClientOptions::default()
    };
    let connecting = tokio::spawn(async move { Client::connect_with(&url, options).await });
    let (mut conn, _) = peer.accept(quiet_limits()).await;
    let client = within(connecting).await.unwrap().unwrap();
    let err = within(client.purge_queue("slow")).await.unwrap_err();
    assert!(matches!(
        err,
        ClientError::Timeout {
            operation: "request",
            ..
        }
    ));
    let (late_id, _) = conn.recv_request().await;
    conn.respond(late_id, Response::Purged { messages: 1 })
        .await;
    let purging = {
        let client = client.clone();
        tokio::spawn(async move { client.purge_queue("fast").await })
    };
    let (correlation_id, _) = conn.recv_request().await;
    conn.respond(correlation_id, Response::Purged { messages: 2 })
        .await;
    assert_eq!(within(purging).await.unwrap().unwrap(), 2);
}

/// Publishes from many tasks at once, singles and batches: the peer numbers publish frames in
/// the order it reads them (as the server does) and refuses every third sequence number; each
/// task must get exactly the outcome of the number its message got on the wire.
#[tokio::test]
async fn sequence_numbers_follow_socket_order_under_concurrent_publishers() {
    let peer = Peer::bind().await;
    let (client, mut conn) = connected(&peer, quiet_limits()).await;
    let n_tasks = 40;
    let mut tasks = Vec::new();
    for task_idx in 0..n_tasks {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            if task_idx % 5 == 0 {
                let messages = (0..3)
                    .map(|idx| Message::new(format!("{task_idx}/{idx}")))
                    .collect();
                let outcomes = client
                    .publisher()
                    .publish_batch("", "q", messages)
                    .await
                    .unwrap();
                outcomes
                    .into_iter()
                    .enumerate()
                    .map(|(idx, outcome)| (format!("{task_idx}/{idx}"), outcome.is_ok()))
                    .collect()
            } else {
                let body = format!("{task_idx}");
                let outcome = client.publish("", "q", Message::new(body.clone())).await;
                vec![(body, outcome.is_ok())]
            }
        }));
    }
    let n_messages = n_tasks / 5 * 3 + (n_tasks - n_tasks / 5);
    let mut seq_of_body = HashMap::new();
    let mut next_seq = 1u64;
    while (next_seq - 1) < n_messages as u64 {
        match conn.recv().await {
            Frame::Publish(publish) => {
                seq_of_body.insert(String::from_utf8(publish.body.to_vec()).unwrap(), next_seq);
                next_seq += 1;
            }
            Frame::PublishBatch(batch) => {
                for message in batch.messages {
                    seq_of_body.insert(String::from_utf8(message.body.to_vec()).unwrap(), next_seq);
                    next_seq += 1;
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    // Confirm in reverse, one number per range.
    for seq in (1..next_seq).rev() {
        let status = if seq % 3 == 0 {
            ConfirmStatus::Refused {
                code: ErrorCode::PublishRefused,
                reason: "no route".into(),
            }
        } else {
            FSYNCED
        };
        conn.send(&confirm(seq, seq, status)).await;
    }
    for task in tasks {
        for (body, ok) in within(task).await.unwrap() {
            assert_eq!(
                ok,
                seq_of_body[&body] % 3 != 0,
                "message {body} got sequence {}",
                seq_of_body[&body]
            );
        }
    }
}

#[tokio::test]
async fn refused_publishes_map_to_typed_errors() {
    let peer = Peer::bind().await;
    let (client, mut conn) = connected(&peer, quiet_limits()).await;
    let publisher = client.publisher();
    let first = publisher
        .publish("x", "k", Message::new("1"))
        .await
        .unwrap();
    let second = publisher
        .publish("x", "k", Message::new("2"))
        .await
        .unwrap();
    let third = publisher
        .publish("x", "k", Message::new("3"))
        .await
        .unwrap();
    assert_eq!(recv_published(&mut conn, 3).await.len(), 3);
    conn.send(&Frame::Confirm(wharf_protocol::Confirm {
        ranges: vec![
            ConfirmRange {
                first_seq: 3,
                last_seq: 3,
                status: ConfirmStatus::Confirmed(Durability::InMemory),
            },
            ConfirmRange {
                first_seq: 1,
                last_seq: 1,
                status: ConfirmStatus::Refused {
                    code: ErrorCode::Backpressure,
                    reason: "full".into(),
                },
            },
            ConfirmRange {
                first_seq: 2,
                last_seq: 2,
                status: ConfirmStatus::Refused {
                    code: ErrorCode::NotFound,
                    reason: "no exchange x".into(),
                },
            },
        ],
    }))
    .await;
    assert!(matches!(
        within(first).await,
        Err(ClientError::Backpressure { .. })
    ));
    let err = within(second).await.unwrap_err();
    assert!(matches!(
        err,
        ClientError::PublishRefused {
            code: ErrorCode::NotFound,
            ..
        }
    ));
    assert_eq!(within(third).await.unwrap(), Durability::InMemory);
    within(publisher.wait_confirms()).await.unwrap();
}

#[tokio::test]
async fn single_publishes_queued_together_travel_in_one_batch_and_confirm_one_by_one() {
    let peer = Peer::bind().await;
    let (client, mut conn) = connected(&peer, quiet_limits()).await;
    let publisher = client.publisher();
    // Queued from one task without yielding: the writer runs only after all of them, so it
    // finds them together and writes one frame.
    let mut tickets = Vec::new();
    for idx in 0..50 {
        let routing_key = if idx == 7 { "other" } else { "q" };
        let message = Message::new(format!("{idx}")).persistent(idx % 2 == 0);
        tickets.push(publisher.publish("", routing_key, message).await.unwrap());
    }
    let Frame::PublishBatch(batch) = conn.recv().await else {
        panic!("expected one PublishBatch")
    };
    assert_eq!(batch.messages.len(), 50);
    for (idx, message) in batch.messages.iter().enumerate() {
        assert_eq!(message.body, format!("{idx}").as_bytes());
        assert_eq!(message.properties.persistent(), idx % 2 == 0);
        let expected_key = if idx == 7 { "other" } else { "q" };
        assert_eq!(batch.routing_key_of(message).as_str(), expected_key);
    }
    // Confirms stay per message: the first 10 resolve while the rest wait.
    conn.send(&confirm(1, 10, FSYNCED)).await;
    let mut tickets = tickets.into_iter();
    for ticket in tickets.by_ref().take(10) {
        assert_eq!(within(ticket).await.unwrap(), Durability::Fsynced);
    }
    let rest: Vec<_> = tickets.collect();
    assert_eq!(publisher.n_in_flight(), 40, "the other 40 still wait");
    conn.send(&confirm(11, 50, FSYNCED)).await;
    for ticket in rest {
        assert_eq!(within(ticket).await.unwrap(), Durability::Fsynced);
    }
    assert_eq!(publisher.n_in_flight(), 0);
}

#[tokio::test]
async fn publisher_window_holds_back_publishes_until_confirms_free_room() {
    let peer = Peer::bind().await;
    let (client, mut conn) = connected(&peer, quiet_limits()).await;
    let publisher = client.publisher_with_window(2);
    let first = publisher.publish("", "q", Message::new("1")).await.unwrap();
    let _second = publisher.publish("", "q", Message::new("2")).await.unwrap();
    assert_eq!(publisher.n_in_flight(), 2);
    let blocked = {
        let publisher = publisher.clone();
        tokio::spawn(async move { publisher.publish("", "q", Message::new("3")).await })
    };
    assert_eq!(recv_published(&mut conn, 2).await, [&b"1"[..], &b"2"[..]]);
    // The third publish waits for room: nothing is written while the window is full.
    tokio::task::yield_now().await;
    assert!(!blocked.is_finished());
    conn.send(&confirm(1, 1, FSYNCED)).await;
    assert_eq!(within(first).await.unwrap(), Durability::Fsynced);
    let third = within(blocked).await.unwrap().unwrap();
    assert_eq!(recv_published(&mut conn, 1).await, [&b"3"[..]]);
    conn.send(&confirm(2, 3, FSYNCED)).await;
    assert!(within(third).await.is_ok());
    within(publisher.wait_confirms()).await.unwrap();
    assert_eq!(publisher.n_in_flight(), 0);
}

#[tokio::test]
async fn publish_batch_splits_at_the_servers_batch_max_and_reports_per_message() {
    let peer = Peer::bind().await;
    let limits = ServerLimits {
        batch_messages_max: 4,
        ..quiet_limits()
    };
    let (client, mut conn) = connected(&peer, limits).await;
    let publishing = tokio::spawn(async move {
        let messages = (0..10).map(|idx| Message::new(format!("{idx}"))).collect();
        client.publisher().publish_batch("ex", "rk", messages).await
    });
    let mut sizes = Vec::new();
    let mut bodies = Vec::new();
    while sizes.iter().sum::<usize>() < 10 {
        let Frame::PublishBatch(batch) = conn.recv().await else {
            panic!("expected PublishBatch")
        };
        assert_eq!((&*batch.exchange, &*batch.routing_key), ("ex", "rk"));
        sizes.push(batch.messages.len());
        bodies.extend(
            batch
                .messages
                .iter()
                .map(|message| String::from_utf8(message.body.to_vec()).unwrap()),
        );
    }
    assert_eq!(sizes, [4, 4, 2]);
    assert_eq!(
        bodies,
        (0..10).map(|idx| idx.to_string()).collect::<Vec<_>>()
    );
    // One range across all three frames, except message 5 refused.
    conn.send(&Frame::Confirm(wharf_protocol::Confirm {
        ranges: vec![
            ConfirmRange {
                first_seq: 1,
                last_seq: 5,
                status: FSYNCED,
            },
            ConfirmRange {
                first_seq: 6,
                last_seq: 6,
                status: ConfirmStatus::Refused {
                    code: ErrorCode::PublishRefused,
                    reason: "too big".into(),
                },
            },
            ConfirmRange {
                first_seq: 7,
                last_seq: 10,
                status: FSYNCED,
            },
        ],
    }))
    .await;
    let outcomes = within(publishing).await.unwrap().unwrap();
    assert_eq!(outcomes.len(), 10);
    for (idx, outcome) in outcomes.iter().enumerate() {
        assert_eq!(outcome.is_ok(), idx != 5, "message {idx}: {outcome:?}");
    }
}

#[tokio::test]
async fn deliveries_are_routed_by_consumer_tag_and_acked_once() {
    let peer = Peer::bind().await;
    let (client, mut conn) = connected(&peer, quiet_limits()).await;
    let (mut first, first_subscribe) = subscribed(
        &client,
        &mut conn,
        ConsumeOptions {
            prefetch: 10,
            ..ConsumeOptions::default()
        },
    )
    .await;
    let (mut second, second_subscribe) =
        subscribed(&client, &mut conn, ConsumeOptions::default()).await;
    let Request::Subscribe {
        consumer_tag: first_tag,
        prefetch: 10,
        auto_ack: false,
        initial_credit: None,
        ..
    } = first_subscribe
    else {
        panic!("{first_subscribe:?}")
    };
    let Request::Subscribe {
        consumer_tag: second_tag,
        ..
    } = second_subscribe
    else {
        panic!()
    };
    assert_ne!(first_tag, second_tag);
    conn.send(&Frame::Deliver(Deliver {
        consumer_tag: second_tag,
        delivery: delivery(1, "to second"),
    }))
    .await;
    conn.send(&Frame::DeliverBatch(DeliverBatch {
        consumer_tag: first_tag,
        deliveries: vec![delivery(2, "a"), delivery(3, "b")],
    }))
    .await;
    let got = within(second.next()).await.unwrap().unwrap();
    assert_eq!(
        (got.delivery_tag(), &got.body()[..], got.consumer_tag()),
        (1, &b"to second"[..], second_tag)
    );
    let a = within(first.next()).await.unwrap().unwrap();
    let b = within(first.next()).await.unwrap().unwrap();
    assert_eq!(
        (&a.body()[..], &b.body()[..], a.routing_key()),
        (&b"a"[..], &b"b"[..], "jobs")
    );
    b.ack().await.unwrap();
    assert!(matches!(
        b.ack().await,
        Err(ClientError::NotSettleable {
            delivery_tag: 3,
            ..
        })
    ));
    a.nack(true).await.unwrap();
    got.reject().await.unwrap();
    assert_eq!(
        conn.recv().await,
        Frame::Ack(Ack {
            delivery_tag: 3,
            multiple: false
        })
    );
    assert_eq!(
        conn.recv().await,
        Frame::Nack(wharf_protocol::Nack {
            delivery_tag: 2,
            multiple: false,
            requeue: true
        })
    );
    assert_eq!(
        conn.recv().await,
        Frame::Reject(wharf_protocol::Reject {
            delivery_tag: 1,
            requeue: false
        })
    );
}

#[tokio::test]
async fn acks_queued_together_travel_as_exact_ranges_before_later_frames() {
    let peer = Peer::bind().await;
    let (client, mut conn) = connected(&peer, quiet_limits()).await;
    let (mut consumer, subscribe) = subscribed(
        &client,
        &mut conn,
        ConsumeOptions {
            prefetch: 20,
            ..ConsumeOptions::default()
        },
    )
    .await;
    let Request::Subscribe { consumer_tag, .. } = subscribe else {
        panic!("{subscribe:?}")
    };
    conn.send(&Frame::DeliverBatch(DeliverBatch {
        consumer_tag,
        deliveries: (1..=8).map(|tag| delivery(tag, "m")).collect(),
    }))
    .await;
    let mut deliveries = Vec::new();
    for _ in 0..8 {
        deliveries.push(within(consumer.next()).await.unwrap().unwrap());
    }
    // Acked from one task without yielding: the writer finds them together. Tag 4 is
    // nacked after them, so no range may cover it, and the nack comes after the acks.
    for delivery in deliveries
        .iter()
        .filter(|delivery| delivery.delivery_tag() != 4)
    {
        delivery.ack().await.unwrap();
    }
    deliveries[3].nack(false).await.unwrap();
    let range = |first, last| wharf_protocol::TagRange { first, last };
    assert_eq!(
        conn.recv().await,
        Frame::AckRanges(wharf_protocol::AckRanges {
            ranges: vec![range(1, 3), range(5, 8)]
        })
    );
    assert_eq!(
        conn.recv().await,
        Frame::Nack(wharf_protocol::Nack {
            delivery_tag: 4,
            multiple: false,
            requeue: false
        })
    );
}

#[tokio::test]
async fn auto_ack_consumer_replenishes_credit_as_deliveries_are_taken() {
    let peer = Peer::bind().await;
    let (client, mut conn) = connected(&peer, quiet_limits()).await;
    let options = ConsumeOptions {
        prefetch: 4,
        auto_ack: true,
        ..ConsumeOptions::default()
    };
    let (mut consumer, subscribe) = subscribed(&client, &mut conn, options).await;
    let Request::Subscribe {
        consumer_tag,
        auto_ack: true,
        initial_credit: Some(4),
        ..
    } = subscribe
    else {
        panic!("{subscribe:?}")
    };
    let deliveries = (1..=4).map(|tag| delivery(tag, "m")).collect();
    conn.send(&Frame::DeliverBatch(DeliverBatch {
        consumer_tag,
        deliveries,
    }))
    .await;
    let first = within(consumer.next()).await.unwrap().unwrap();
    assert!(
        matches!(first.ack().await, Err(ClientError::NotSettleable { .. })),
        "auto-ack deliveries are settled"
    );
    within(consumer.next()).await.unwrap().unwrap();
    assert_eq!(
        conn.recv().await,
        Frame::Credit(Credit {
            consumer_tag,
            credit: 2
        })
    );
    within(consumer.next()).await.unwrap().unwrap();
    within(consumer.next()).await.unwrap().unwrap();
    assert_eq!(
        conn.recv().await,
        Frame::Credit(Credit {
            consumer_tag,
            credit: 2
        })
    );
}

#[tokio::test]
async fn prefetch_outside_the_bound_is_refused_before_sending() {
    let peer = Peer::bind().await;
    let (client, _conn) = connected(&peer, quiet_limits()).await;
    for prefetch in [0, wharf_client::PREFETCH_MAX + 1] {
        let err = client
            .consume(
                "q",
                ConsumeOptions {
                    prefetch,
                    ..ConsumeOptions::default()
                },
            )
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            ClientError::InvalidArgument {
                what: "prefetch",
                ..
            }
        ));
    }
}

/// Sends a request through `client` and checks it is the next frame the peer reads: nothing
/// else (no `Ack`, no `Reject`) was queued before it.
async fn assert_nothing_else_sent(client: &Client, conn: &mut support::PeerConn) {
    let probing = {
        let client = client.clone();
        tokio::spawn(async move { client.list_queues().await })
    };
    let (correlation_id, request) = conn.recv_request().await;
    assert_eq!(request, Request::ListQueues);
    conn.respond(correlation_id, Response::Queues(Vec::new()))
        .await;
    within(probing).await.unwrap().unwrap();
}

#[tokio::test]
async fn cancel_drops_untaken_deliveries_and_taken_ones_are_not_settleable() {
    let peer = Peer::bind().await;
    let (client, mut conn) = connected(&peer, quiet_limits()).await;
    let (mut consumer, subscribe) = subscribed(&client, &mut conn, ConsumeOptions::default()).await;
    let Request::Subscribe { consumer_tag, .. } = subscribe else {
        panic!()
    };
    conn.send(&Frame::DeliverBatch(DeliverBatch {
        consumer_tag,
        deliveries: vec![delivery(1, "x"), delivery(2, "buffered")],
    }))
    .await;
    let taken = within(consumer.next()).await.unwrap().unwrap();
    let cancelling = tokio::spawn(consumer.cancel());
    // The broker requeues every unsettled delivery on Cancel: the client sends no Reject.
    let (correlation_id, request) = conn.recv_request().await;
    assert_eq!(request, Request::Cancel { consumer_tag });
    // Sent before the server processed the Cancel: requeued by it too, dropped by the client.
    conn.send(&Frame::Deliver(Deliver {
        consumer_tag,
        delivery: delivery(3, "y"),
    }))
    .await;
    conn.respond(correlation_id, Response::Done).await;
    within(cancelling).await.unwrap().unwrap();
    for result in [
        taken.ack().await,
        taken.nack(true).await,
        taken.reject().await,
        taken.ack_multiple().await,
    ] {
        assert!(
            matches!(
                result,
                Err(ClientError::NotSettleable {
                    delivery_tag: 1,
                    ..
                })
            ),
            "{result:?}"
        );
    }
    assert_nothing_else_sent(&client, &mut conn).await;
}

#[tokio::test]
async fn dropping_a_consumer_sends_only_cancel_and_its_deliveries_are_not_settleable() {
    let peer = Peer::bind().await;
    let (client, mut conn) = connected(&peer, quiet_limits()).await;
    let (mut consumer, subscribe) = subscribed(&client, &mut conn, ConsumeOptions::default()).await;
    let Request::Subscribe { consumer_tag, .. } = subscribe else {
        panic!()
    };
    let deliveries = vec![delivery(1, "a"), delivery(2, "b")];
    conn.send(&Frame::DeliverBatch(DeliverBatch {
        consumer_tag,
        deliveries,
    }))
    .await;
    let taken = within(consumer.next()).await.unwrap().unwrap();
    drop(consumer);
    // Refused at once: the Cancel is already queued.
    assert!(matches!(
        taken.nack(false).await,
        Err(ClientError::NotSettleable {
            delivery_tag: 1,
            ..
        })
    ));
    let (correlation_id, request) = conn.recv_request().await;
    assert_eq!(request, Request::Cancel { consumer_tag });
    // A delivery racing the Cancel is dropped: the broker requeues it.
    conn.send(&Frame::Deliver(Deliver {
        consumer_tag,
        delivery: delivery(3, "c"),
    }))
    .await;
    conn.respond(correlation_id, Response::Done).await;
    assert_nothing_else_sent(&client, &mut conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_racing_a_cancel_is_either_sent_before_it_or_refused() {
    let peer = Peer::bind().await;
    let (client, mut conn) = connected(&peer, quiet_limits()).await;
    let (mut n_acked, mut n_refused) = (0, 0);
    for round in 0..40_u64 {
        let (mut consumer, subscribe) =
            subscribed(&client, &mut conn, ConsumeOptions::default()).await;
        let Request::Subscribe { consumer_tag, .. } = subscribe else {
            panic!()
        };
        let delivery_tag = round + 1;
        conn.send(&Frame::Deliver(Deliver {
            consumer_tag,
            delivery: delivery(delivery_tag, "m"),
        }))
        .await;
        let taken = within(consumer.next()).await.unwrap().unwrap();
        let acking = tokio::spawn(async move { taken.ack().await });
        let cancelling = tokio::spawn(consumer.cancel());
        let mut ack_seen = false;
        let correlation_id = loop {
            match conn.recv().await {
                Frame::Ack(ack) => {
                    assert_eq!(ack.delivery_tag, delivery_tag);
                    ack_seen = true;
                }
                Frame::Request {
                    correlation_id,
                    request: Request::Cancel { consumer_tag: tag },
                } if tag == consumer_tag => break correlation_id,
                other => panic!("unexpected {other:?}"),
            }
        };
        conn.respond(correlation_id, Response::Done).await;
        within(cancelling).await.unwrap().unwrap();
        match within(acking).await.unwrap() {
            Ok(()) => {
                n_acked += 1;
                // Queued before the Cancel, so read before it.
                assert!(ack_seen, "round {round}: the ack was sent after the cancel");
            }
            Err(ClientError::NotSettleable { .. }) => {
                n_refused += 1;
                assert!(!ack_seen);
            }
            Err(err) => panic!("{err:?}"),
        }
        // Nothing after the Cancel: in particular no Ack.
        assert_nothing_else_sent(&client, &mut conn).await;
    }
    assert_eq!(n_acked + n_refused, 40);
}

#[tokio::test]
async fn ack_multiple_sends_one_ack_with_multiple_set() {
    let peer = Peer::bind().await;
    let (client, mut conn) = connected(&peer, quiet_limits()).await;
    let (mut consumer, subscribe) = subscribed(&client, &mut conn, ConsumeOptions::default()).await;
    let Request::Subscribe { consumer_tag, .. } = subscribe else {
        panic!()
    };
    conn.send(&Frame::DeliverBatch(DeliverBatch {
        consumer_tag,
        deliveries: vec![delivery(4, "a"), delivery(5, "b")],
    }))
    .await;
    within(consumer.next()).await.unwrap().unwrap();
    let last = within(consumer.next()).await.unwrap().unwrap();
    last.ack_multiple().await.unwrap();
    assert_eq!(
        conn.recv().await,
        Frame::Ack(Ack {
            delivery_tag: 5,
            multiple: true
        })
    );
    assert!(matches!(
        last.ack().await,
        Err(ClientError::NotSettleable { .. })
    ));
}

#[tokio::test]
async fn server_cancellation_ends_the_stream_after_received_deliveries() {
    let peer = Peer::bind().await;
    let (client, mut conn) = connected(&peer, quiet_limits()).await;
    let (mut consumer, subscribe) = subscribed(&client, &mut conn, ConsumeOptions::default()).await;
    let Request::Subscribe { consumer_tag, .. } = subscribe else {
        panic!()
    };
    conn.send(&Frame::Deliver(Deliver {
        consumer_tag,
        delivery: delivery(7, "last"),
    }))
    .await;
    conn.send(&Frame::ConsumerCancelled(ConsumerCancelled {
        consumer_tag,
        code: ErrorCode::NotFound,
        reason: "queue deleted".into(),
    }))
    .await;
    let last = within(consumer.next()).await.unwrap().unwrap();
    assert_eq!(last.delivery_tag(), 7);
    let err = within(consumer.next()).await.unwrap().unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::ConsumerCancelled {
                code: ErrorCode::NotFound,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(within(consumer.next()).await.is_none());
    // The queue is gone with the message: settling is refused locally, nothing is sent.
    assert!(matches!(
        last.ack().await,
        Err(ClientError::NotSettleable {
            delivery_tag: 7,
            ..
        })
    ));
    within(consumer.cancel()).await.unwrap();
    assert_nothing_else_sent(&client, &mut conn).await;
}

#[tokio::test]
async fn client_sends_heartbeats_when_idle() {
    let peer = Peer::bind().await;
    let limits = ServerLimits {
        heartbeat_ms: 50,
        ..quiet_limits()
    };
    let (client, mut conn) = connected(&peer, limits).await;
    // Keep the client alive by answering with heartbeats of our own.
    for _ in 0..3 {
        assert_eq!(conn.recv_or_eof().await, Some(Frame::Heartbeat));
        conn.send(&Frame::Heartbeat).await;
    }
    assert!(!client.is_closed());
}

#[tokio::test]
async fn silent_server_is_declared_dead_after_two_heartbeat_intervals() {
    let peer = Peer::bind().await;
    let limits = ServerLimits {
        heartbeat_ms: 50,
        ..quiet_limits()
    };
    let (client, mut conn) = connected(&peer, limits).await;
    let (mut consumer, _) = subscribed(&client, &mut conn, ConsumeOptions::default()).await;
    let publishing = {
        let client = client.clone();
        tokio::spawn(async move { client.publish("", "q", Message::new("x")).await })
    };
    let err = within(publishing).await.unwrap().unwrap_err();
    assert!(
        matches!(err, ClientError::ConnectionLost(ref io) if io.kind() == io::ErrorKind::TimedOut),
        "{err:?}"
    );
    let stream_err = within(consumer.next()).await.unwrap().unwrap_err();
    assert!(matches!(stream_err, ClientError::ConnectionLost(_)));
    assert!(within(consumer.next()).await.is_none());
    assert!(matches!(
        client.purge_queue("q").await,
        Err(ClientError::ConnectionLost(_))
    ));
}

#[tokio::test]
async fn close_waits_for_close_ok_then_every_operation_fails_closed() {
    let peer = Peer::bind().await;
    let (client, mut conn) = connected(&peer, quiet_limits()).await;
    let publisher = client.publisher();
    let pending = publisher.publish("", "q", Message::new("x")).await.unwrap();
    let closing = {
        let client = client.clone();
        tokio::spawn(async move { client.close().await })
    };
    assert!(matches!(conn.recv().await, Frame::Publish(_)));
    assert_eq!(
        conn.recv().await,
        Frame::Close(Close {
            code: ErrorCode::Normal,
            reason: String::new()
        })
    );
    // A confirm sent before CloseOk still counts.
    conn.send(&confirm(1, 1, FSYNCED)).await;
    conn.send(&Frame::CloseOk).await;
    within(closing).await.unwrap().unwrap();
    assert_eq!(within(pending).await.unwrap(), Durability::Fsynced);
    assert!(client.is_closed());
    assert!(matches!(
        client.publish("", "q", Message::new("y")).await,
        Err(ClientError::Closed)
    ));
    assert!(matches!(
        client.list_exchanges().await,
        Err(ClientError::Closed)
    ));
    assert!(matches!(
        publisher.publish("", "q", Message::new("z")).await,
        Err(ClientError::Closed)
    ));
    client.close().await.unwrap();
    conn.expect_eof().await;
}

#[tokio::test]
async fn close_without_close_ok_gives_up_after_the_close_timeout() {
    let peer = Peer::bind().await;
    let url = peer.url();
    let options = ClientOptions {
        close_timeout: Duration::from_millis(100),
        ..ClientOptions::default()
    };
    let connecting = tokio::spawn(async move { Client::connect_with(&url, options).await });
    let (mut conn, _) = peer.accept(quiet_limits()).await;
    let client = within(connecting).await.unwrap().unwrap();
    let err = within(client.close()).await.unwrap_err();
    assert!(matches!(
        err,
        ClientError::Timeout {
            operation: "close",
            ..
        }
    ));
    assert!(matches!(
        client.purge_queue("q").await,
        Err(ClientError::Closed)
    ));
    assert!(matches!(conn.recv().await, Frame::Close(_)));
    conn.expect_eof().await;
}

#[tokio::test]
async fn dropping_the_last_client_closes_the_connection() {
    let peer = Peer::bind().await;
    let (client, mut conn) = connected(&peer, quiet_limits()).await;
    let clone = client.clone();
    drop(client);
    tokio::task::yield_now().await;
    drop(clone);
    assert_eq!(
        conn.recv().await,
        Frame::Close(Close {
            code: ErrorCode::Normal,
            reason: String::new()
        })
    );
    conn.send(&Frame::CloseOk).await;
    conn.expect_eof().await;
}

#[tokio::test]
async fn server_close_fails_pending_requests_with_its_code_and_is_answered() {
    let peer = Peer::bind().await;
    let (client, mut conn) = connected(&peer, quiet_limits()).await;
    let declaring = {
        let client = client.clone();
        tokio::spawn(async move { client.declare_queue("q").await })
    };
    conn.recv_request().await;
    conn.send(&Frame::Close(Close {
        code: ErrorCode::ConnectionForced,
        reason: "shutting down".into(),
    }))
    .await;
    let err = within(declaring).await.unwrap().unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::ServerClosed {
                code: ErrorCode::ConnectionForced,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.is_connection_error());
    assert_eq!(conn.recv().await, Frame::CloseOk);
    conn.expect_eof().await;
    assert!(matches!(
        client.purge_queue("q").await,
        Err(ClientError::ServerClosed { .. })
    ));
}

#[tokio::test]
async fn end_of_stream_fails_unconfirmed_publishes_with_connection_lost() {
    let peer = Peer::bind().await;
    let (client, conn) = connected(&peer, quiet_limits()).await;
    let ticket = client
        .publisher()
        .publish("", "q", Message::new("x"))
        .await
        .unwrap();
    drop(conn);
    let err = within(ticket).await.unwrap_err();
    assert!(matches!(err, ClientError::ConnectionLost(_)), "{err:?}");
}

#[tokio::test]
async fn confirm_for_an_unsent_sequence_number_is_a_protocol_violation() {
    let peer = Peer::bind().await;
    let (client, mut conn) = connected(&peer, quiet_limits()).await;
    conn.send(&confirm(1, 1, FSYNCED)).await;
    let Frame::Close(close) = conn.recv().await else {
        panic!("expected Close")
    };
    assert_eq!(close.code, ErrorCode::ProtocolViolation);
    conn.expect_eof().await;
    assert!(matches!(
        client.purge_queue("q").await,
        Err(ClientError::Protocol(_))
    ));
}

#[tokio::test]
async fn oversized_message_is_an_encode_error_and_the_connection_lives() {
    let peer = Peer::bind().await;
    let limits = ServerLimits {
        frame_bytes_max: wharf_protocol::limits::FRAME_BYTES_MAX_FLOOR,
        ..quiet_limits()
    };
    let (client, mut conn) = connected(&peer, limits).await;
    let big = Message::new(vec![0u8; 100 * 1024]);
    assert!(matches!(
        client.publish("", "q", big).await,
        Err(ClientError::Encode(_))
    ));
    let long_name = "n".repeat(300);
    assert!(matches!(
        client.purge_queue(&long_name).await,
        Err(ClientError::Encode(_))
    ));
    // A name over 255 bytes is refused at the publish call, not in the writer, on both the
    // confirmed and the pipelined path (the window's room is given back).
    assert!(matches!(
        client.publish(&long_name, "q", Message::new("x")).await,
        Err(ClientError::Encode(_))
    ));
    let publisher = client.publisher_with_window(1);
    for _ in 0..2 {
        assert!(matches!(
            publisher.publish("", &long_name, Message::new("x")).await,
            Err(ClientError::Encode(_))
        ));
    }
    assert_eq!(publisher.n_in_flight(), 0);
    // A batch with one oversized message: the others go out and are confirmed.
    let publishing = tokio::spawn(async move {
        let messages = vec![
            Message::new("a"),
            Message::new(vec![0u8; 100 * 1024]),
            Message::new("c"),
        ];
        client
            .publisher()
            .publish_batch("", "q", messages)
            .await
            .unwrap()
    });
    let mut n_received = 0;
    while n_received < 2 {
        let Frame::PublishBatch(batch) = conn.recv().await else {
            panic!("expected PublishBatch")
        };
        n_received += batch.messages.len();
    }
    conn.send(&confirm(1, 2, FSYNCED)).await;
    let outcomes = within(publishing).await.unwrap();
    assert!(outcomes[0].is_ok() && outcomes[2].is_ok());
    assert!(matches!(outcomes[1], Err(ClientError::Encode(_))));
}
