//! The client side of the queue features of protocol 1.1 against a scripted peer: what is
//! refused locally with a 1.0 server, the `Defer` and `Touch` frames, the `x-ack-timeout`
//! argument, and the lease extender (which deliveries it touches, when, and when it stops).

mod support;

use bytes::Bytes;
use std::time::Duration;
use support::{Peer, PeerConn, quiet_limits, within};
use tokio::time::Instant;
use wharf_client::{Client, ClientError, ConsumeOptions, Consumer, Message};
use wharf_protocol::{
    Ack, Defer, Deliver, DeliverBatch, Delivery, Frame, MINOR_QUEUE_FEATURES, Nack, Request,
    Response, Touch, WireStr,
};

/// The lease used by the extender tests: touches are due every 100 ms.
const ACK_TIMEOUT: Duration = Duration::from_millis(200);

async fn connected_minor(peer: &Peer, minor: u16) -> (Client, PeerConn) {
    let url = peer.url();
    let connecting = tokio::spawn(async move { Client::connect(&url).await });
    let (conn, _) = peer.accept_minor(quiet_limits(), minor).await;
    (within(connecting).await.unwrap().unwrap(), conn)
}

fn delivery(delivery_tag: u64) -> Delivery {
    Delivery {
        delivery_tag,
        delivery_count: 1,
        exchange: WireStr::from(""),
        routing_key: WireStr::from("jobs"),
        body: Bytes::from(format!("job-{delivery_tag}")),
        ..Delivery::default()
    }
}

/// Subscribes through the peer; returns the consumer and the `Subscribe` request.
async fn subscribed(
    client: &Client,
    conn: &mut PeerConn,
    options: ConsumeOptions,
) -> (Consumer, Request) {
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

/// Sends deliveries `tags` to `consumer` in one batch.
async fn deliver(conn: &mut PeerConn, consumer: &Consumer, tags: &[u64]) {
    conn.send(&Frame::DeliverBatch(DeliverBatch {
        consumer_tag: consumer.consumer_tag(),
        deliveries: tags.iter().copied().map(delivery).collect(),
    }))
    .await;
}

async fn take(consumer: &mut Consumer) -> wharf_client::Delivery {
    within(consumer.next()).await.unwrap().unwrap()
}

/// Sends a request through `client` and checks it is the next frame the peer reads: nothing
/// else was queued before it.
async fn assert_nothing_else_sent(client: &Client, conn: &mut PeerConn) {
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

/// Every frame the peer reads within `window` (heartbeats skipped).
async fn frames_within(conn: &mut PeerConn, window: Duration) -> Vec<Frame> {
    let until = Instant::now() + window;
    let mut frames = Vec::new();
    while let Ok(frame) = tokio::time::timeout_at(until, conn.recv()).await {
        frames.push(frame);
    }
    frames
}

fn not_supported(result: Result<impl std::fmt::Debug, ClientError>, feature: &str) {
    match result {
        Err(ClientError::NotSupported {
            feature: got,
            minor_required,
            server_minor: 0,
        }) => {
            assert_eq!(got, feature);
            assert_eq!(minor_required, MINOR_QUEUE_FEATURES);
        }
        other => panic!("{feature}: expected NotSupported, got {other:?}"),
    }
}

#[tokio::test]
async fn features_of_protocol_1_1_are_refused_locally_against_a_1_0_server() {
    let peer = Peer::bind().await;
    let (client, mut conn) = connected_minor(&peer, 0).await;
    assert_eq!(client.protocol_minor(), 0);
    not_supported(
        client
            .consume("jobs", ConsumeOptions::default().ack_timeout(ACK_TIMEOUT))
            .await,
        "ack_timeout",
    );
    not_supported(
        client
            .publish("", "jobs", Message::new("x").delay(Duration::from_secs(1)))
            .await,
        "delayed delivery",
    );
    not_supported(client.redrive("jobs.dlq", 0).await, "redrive");
    not_supported(client.queue_stats_v2("jobs").await, "queue_stats_v2");
    not_supported(client.list_queues_v2().await, "list_queues_v2");

    let (mut consumer, _) = subscribed(&client, &mut conn, ConsumeOptions::default()).await;
    deliver(&mut conn, &consumer, &[1]).await;
    let held = take(&mut consumer).await;
    not_supported(held.defer(Duration::from_secs(1)).await, "Delivery::defer");
    not_supported(held.in_progress().await, "Delivery::in_progress");
    assert_nothing_else_sent(&client, &mut conn).await;
    // The refused defer did not settle it.
    held.ack().await.unwrap();
    assert_eq!(
        conn.recv().await,
        Frame::Ack(Ack {
            delivery_tag: 1,
            multiple: false
        })
    );
}

#[tokio::test]
async fn defer_settles_with_its_delay_and_in_progress_touches_without_settling() {
    let peer = Peer::bind().await;
    let (client, mut conn) = connected_minor(&peer, MINOR_QUEUE_FEATURES).await;
    assert_eq!(client.protocol_minor(), MINOR_QUEUE_FEATURES);
    let (mut consumer, subscribe) = subscribed(&client, &mut conn, ConsumeOptions::default()).await;
    let Request::Subscribe { arguments, .. } = subscribe else {
        unreachable!()
    };
    assert!(arguments.is_empty(), "no lease asked: {arguments:?}");
    deliver(&mut conn, &consumer, &[1, 2]).await;
    let first = take(&mut consumer).await;
    let second = take(&mut consumer).await;

    first.defer(Duration::from_millis(1500)).await.unwrap();
    assert!(matches!(
        first.defer(Duration::from_millis(1)).await,
        Err(ClientError::NotSettleable {
            delivery_tag: 1,
            ..
        })
    ));
    assert!(matches!(
        first.in_progress().await,
        Err(ClientError::NotSettleable {
            delivery_tag: 1,
            ..
        })
    ));
    let too_long = second
        .defer(Duration::from_secs(20 * 366 * 24 * 3600))
        .await;
    assert!(
        matches!(
            too_long,
            Err(ClientError::InvalidArgument {
                what: "defer delay",
                ..
            })
        ),
        "{too_long:?}"
    );
    second.in_progress().await.unwrap();
    second.in_progress().await.unwrap();
    second.ack().await.unwrap();
    assert!(matches!(
        second.in_progress().await,
        Err(ClientError::NotSettleable {
            delivery_tag: 2,
            ..
        })
    ));
    let expected = [
        Frame::Defer(Defer {
            delivery_tag: 1,
            delay_ms: 1500,
        }),
        Frame::Touch(Touch { delivery_tag: 2 }),
        Frame::Touch(Touch { delivery_tag: 2 }),
        Frame::Ack(Ack {
            delivery_tag: 2,
            multiple: false,
        }),
    ];
    for frame in expected {
        assert_eq!(conn.recv().await, frame);
    }
    assert_nothing_else_sent(&client, &mut conn).await;
}

#[tokio::test]
async fn an_ack_timeout_is_sent_as_x_ack_timeout_and_checked_locally() {
    let peer = Peer::bind().await;
    let (client, mut conn) = connected_minor(&peer, MINOR_QUEUE_FEATURES).await;
    let (_consumer, subscribe) = subscribed(
        &client,
        &mut conn,
        ConsumeOptions::default().ack_timeout(Duration::from_millis(1500)),
    )
    .await;
    let Request::Subscribe { arguments, .. } = subscribe else {
        unreachable!()
    };
    assert_eq!(
        arguments
            .as_table_ref()
            .get("x-ack-timeout")
            .and_then(|value| value.as_i64()),
        Some(1500)
    );
    for (options, why) in [
        (
            ConsumeOptions {
                auto_ack: true,
                ..ConsumeOptions::default().ack_timeout(ACK_TIMEOUT)
            },
            "auto-ack",
        ),
        (
            ConsumeOptions::default().ack_timeout(Duration::ZERO),
            "zero",
        ),
    ] {
        let err = client.consume("jobs", options).await.unwrap_err();
        assert!(
            matches!(
                err,
                ClientError::InvalidArgument {
                    what: "ack_timeout",
                    ..
                }
            ),
            "{why}: {err:?}"
        );
    }
    assert_nothing_else_sent(&client, &mut conn).await;
}

#[tokio::test]
async fn held_deliveries_are_touched_every_half_timeout_until_settled_or_dropped() {
    let peer = Peer::bind().await;
    let (client, mut conn) = connected_minor(&peer, MINOR_QUEUE_FEATURES).await;
    let (mut consumer, _) = subscribed(
        &client,
        &mut conn,
        ConsumeOptions::default().ack_timeout(ACK_TIMEOUT),
    )
    .await;
    let delivered_at = Instant::now();
    deliver(&mut conn, &consumer, &[1, 2, 3]).await;
    let first = take(&mut consumer).await;
    let second = take(&mut consumer).await;
    // Delivery 3 stays in the consumer's buffer: not the application's yet, never touched.

    // Each held delivery is touched repeatedly, the first time about half the timeout after
    // it arrived (not at once).
    let mut touches: Vec<(u64, Duration)> = Vec::new();
    while touches.iter().filter(|(tag, _)| *tag == 1).count() < 2
        || touches.iter().filter(|(tag, _)| *tag == 2).count() < 2
    {
        match conn.recv().await {
            Frame::Touch(Touch { delivery_tag }) => {
                touches.push((delivery_tag, delivered_at.elapsed()));
            }
            other => panic!("only touches expected, got {other:?}"),
        }
    }
    assert!(
        touches.iter().all(|(tag, _)| *tag == 1 || *tag == 2),
        "{touches:?}"
    );
    let first_touch = touches[0].1;
    assert!(
        first_touch >= ACK_TIMEOUT / 4,
        "first touch after {first_touch:?}, long before half of {ACK_TIMEOUT:?}"
    );

    // Settled: no longer touched. Dropped unsettled: no longer touched either (the broker
    // takes it back when the lease lapses).
    first.ack().await.unwrap();
    drop(second);
    let after: Vec<Frame> = frames_within(&mut conn, ACK_TIMEOUT * 2).await;
    let ack_idx = after
        .iter()
        .position(|frame| {
            *frame
                == Frame::Ack(Ack {
                    delivery_tag: 1,
                    multiple: false,
                })
        })
        .unwrap_or_else(|| panic!("the ack was sent: {after:?}"));
    // A touch of 2 may have been queued before it was dropped, but nothing of 1 after its ack.
    for frame in &after[ack_idx + 1..] {
        assert!(
            matches!(frame, Frame::Touch(Touch { delivery_tag: 2 })),
            "{after:?}"
        );
    }
    assert!(
        after.len() <= ack_idx + 2,
        "2 kept being touched: {after:?}"
    );

    // Taking the buffered delivery starts its extension at once: it waited longer than half
    // the timeout in the buffer.
    let third = take(&mut consumer).await;
    assert_eq!(conn.recv().await, Frame::Touch(Touch { delivery_tag: 3 }));
    third.ack().await.unwrap();
    loop {
        match conn.recv().await {
            Frame::Touch(Touch { delivery_tag: 3 }) => continue,
            frame => {
                assert_eq!(
                    frame,
                    Frame::Ack(Ack {
                        delivery_tag: 3,
                        multiple: false
                    })
                );
                break;
            }
        }
    }
}

#[tokio::test]
async fn ack_multiple_stops_the_extension_of_every_delivery_it_covers() {
    let peer = Peer::bind().await;
    let (client, mut conn) = connected_minor(&peer, MINOR_QUEUE_FEATURES).await;
    let (mut consumer, _) = subscribed(
        &client,
        &mut conn,
        ConsumeOptions::default().ack_timeout(ACK_TIMEOUT),
    )
    .await;
    deliver(&mut conn, &consumer, &[1, 2, 3]).await;
    let held: Vec<_> = vec![
        take(&mut consumer).await,
        take(&mut consumer).await,
        take(&mut consumer).await,
    ];
    held[1].ack_multiple().await.unwrap();
    let ack = Frame::Ack(Ack {
        delivery_tag: 2,
        multiple: true,
    });
    let frames = frames_within(&mut conn, ACK_TIMEOUT * 2).await;
    let ack_idx = frames
        .iter()
        .position(|frame| *frame == ack)
        .unwrap_or_else(|| panic!("the ack was sent: {frames:?}"));
    let later = &frames[ack_idx + 1..];
    assert!(
        later
            .iter()
            .all(|frame| matches!(frame, Frame::Touch(Touch { delivery_tag: 3 }))),
        "only 3 is still held: {frames:?}"
    );
    assert!(!later.is_empty(), "3 is still extended: {frames:?}");
    held[2].ack().await.unwrap();
}

#[tokio::test]
async fn no_touch_follows_the_cancel_of_its_consumer() {
    let peer = Peer::bind().await;
    let (client, mut conn) = connected_minor(&peer, MINOR_QUEUE_FEATURES).await;
    let (mut consumer, _) = subscribed(
        &client,
        &mut conn,
        ConsumeOptions::default().ack_timeout(ACK_TIMEOUT),
    )
    .await;
    deliver(&mut conn, &consumer, &[1]).await;
    let held = take(&mut consumer).await;
    let cancelling = tokio::spawn(consumer.cancel());
    let correlation_id = loop {
        match conn.recv().await {
            Frame::Touch(Touch { delivery_tag: 1 }) => continue,
            Frame::Request {
                correlation_id,
                request: Request::Cancel { .. },
            } => break correlation_id,
            other => panic!("{other:?}"),
        }
    };
    conn.respond(correlation_id, Response::Done).await;
    within(cancelling).await.unwrap().unwrap();
    let after = frames_within(&mut conn, ACK_TIMEOUT * 2).await;
    assert!(after.is_empty(), "sent after the Cancel: {after:?}");
    assert!(matches!(
        held.in_progress().await,
        Err(ClientError::NotSettleable { .. })
    ));
}

#[tokio::test]
async fn process_acks_on_ok_and_nacks_with_requeue_on_err() {
    let peer = Peer::bind().await;
    let (client, mut conn) = connected_minor(&peer, MINOR_QUEUE_FEATURES).await;
    let (mut consumer, _) = subscribed(
        &client,
        &mut conn,
        ConsumeOptions::default().ack_timeout(ACK_TIMEOUT),
    )
    .await;
    deliver(&mut conn, &consumer, &[1, 2]).await;
    let length = take(&mut consumer)
        .await
        .process(async |delivery| Ok::<_, ClientError>(delivery.body().len()))
        .await
        .unwrap();
    assert_eq!(length, "job-1".len());
    let failed = take(&mut consumer)
        .await
        .process(async |_| {
            Err::<(), _>(ClientError::InvalidArgument {
                what: "job",
                detail: "cannot process".into(),
            })
        })
        .await;
    assert!(matches!(
        failed,
        Err(ClientError::InvalidArgument { what: "job", .. })
    ));
    let mut settlements = Vec::new();
    while settlements.len() < 2 {
        match conn.recv().await {
            Frame::Touch(_) => continue,
            frame => settlements.push(frame),
        }
    }
    assert_eq!(
        settlements,
        [
            Frame::Ack(Ack {
                delivery_tag: 1,
                multiple: false
            }),
            Frame::Nack(Nack {
                delivery_tag: 2,
                multiple: false,
                requeue: true
            }),
        ]
    );
}

#[tokio::test]
async fn a_long_handler_inside_process_keeps_being_touched() {
    let peer = Peer::bind().await;
    let (client, mut conn) = connected_minor(&peer, MINOR_QUEUE_FEATURES).await;
    let (mut consumer, _) = subscribed(
        &client,
        &mut conn,
        ConsumeOptions::default().ack_timeout(ACK_TIMEOUT),
    )
    .await;
    conn.send(&Frame::Deliver(Deliver {
        consumer_tag: consumer.consumer_tag(),
        delivery: delivery(7),
    }))
    .await;
    let delivery = take(&mut consumer).await;
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let processing = tokio::spawn(delivery.process(async move |_| {
        // The "work" lasts until the test has seen the lease extended three times.
        released.await.map_err(|_| ClientError::Closed)
    }));
    for _ in 0..3 {
        assert_eq!(conn.recv().await, Frame::Touch(Touch { delivery_tag: 7 }));
    }
    release.send(()).unwrap();
    within(processing).await.unwrap().unwrap();
    loop {
        match conn.recv().await {
            Frame::Touch(Touch { delivery_tag: 7 }) => continue,
            frame => {
                assert_eq!(
                    frame,
                    Frame::Ack(Ack {
                        delivery_tag: 7,
                        multiple: false
                    })
                );
                break;
            }
        }
    }
}
