//! Unit tests of the log's records, replay and checkpoint capture.

use super::checkpoint::Captured;
use super::record::*;
use super::replay::*;
use bytes::Bytes;
use std::sync::Arc;
use wharf_core::{Broker, Command, HeaderValue, Headers, Message, QueueOptions};

fn message(body: &str) -> StoredMessage {
    let mut message = Message::new("q", body.to_owned());
    message
        .headers
        .insert("h", HeaderValue::List(vec![HeaderValue::Int(1)]));
    message.persistent = true;
    StoredMessage::from(&message)
}

#[test]
fn records_round_trip_and_unknown_versions_are_refused() {
    let record = Record::Batch(vec![
        Op::Enqueue {
            durable_id: 7,
            queues: vec!["a".into(), "b".into()],
            message: message("x"),
        },
        Op::Settle {
            durable_id: 7,
            queue: "a".into(),
        },
    ]);
    let bytes = record.encode();
    assert_eq!(Record::decode(1, &bytes).unwrap(), record);
    let mut wrong = bytes.to_vec();
    wrong[0] = 9;
    assert!(matches!(
        Record::decode(1, &wrong),
        Err(RecordError::Version { version: 9, .. })
    ));
    assert!(matches!(
        Record::decode(1, &bytes[..bytes.len() - 2]),
        Err(RecordError::Decode { .. })
    ));
}

#[test]
fn replay_uses_the_last_complete_checkpoint_and_the_batches_after_it() {
    let declare = |name: &str| Op::DeclareQueue {
        name: name.into(),
        auto_delete: false,
        single_active_consumer: false,
        arguments: vec![],
    };
    let records = vec![
        (
            1,
            Record::Batch(vec![
                declare("old"),
                Op::Enqueue {
                    durable_id: 1,
                    queues: vec!["old".into()],
                    message: message("gone"),
                },
            ]),
        ),
        (2, Record::CheckpointBegin { epoch: 1 }),
        (
            3,
            Record::CheckpointChunk {
                epoch: 1,
                ops: vec![
                    declare("q"),
                    Op::Enqueue {
                        durable_id: 2,
                        queues: vec!["q".into()],
                        message: message("kept"),
                    },
                ],
            },
        ),
        (4, Record::CheckpointEnd { epoch: 1 }),
        (
            5,
            Record::Batch(vec![Op::Enqueue {
                durable_id: 3,
                queues: vec!["q".into()],
                message: message("acked"),
            }]),
        ),
        (
            6,
            Record::Batch(vec![
                Op::Settle {
                    durable_id: 3,
                    queue: "q".into(),
                },
                Op::Enqueue {
                    durable_id: 4,
                    queues: vec!["q".into()],
                    message: message("new"),
                },
            ]),
        ),
        (7, Record::CheckpointBegin { epoch: 2 }),
        (
            8,
            Record::CheckpointChunk {
                epoch: 2,
                ops: vec![declare("torn")],
            },
        ),
    ];
    let (replay, n_records) = Replay::plan(records);
    assert_eq!(n_records, 8);
    let mut broker = broker_with_system_connection();
    let recovered = replay.apply(&mut broker, 0, &mut |_| {}).unwrap();
    assert_eq!(recovered.messages, 2);
    assert_eq!(recovered.epoch, 1);
    let names: Vec<String> = broker
        .list_queues(wharf_core::DEFAULT_VHOST)
        .into_iter()
        .map(|q| q.name)
        .collect();
    assert_eq!(
        names,
        vec!["q".to_owned()],
        "pre-checkpoint and torn-checkpoint state ignored"
    );
    let ids: Vec<u64> = broker
        .durable_messages()
        .into_iter()
        .map(|(id, _, _)| id)
        .collect();
    assert_eq!(ids, vec![2, 4]);
}

/// A broker that logs into `log` the way the server does (effects → ops).
fn apply_logged(broker: &mut Broker, now_ms: u64, command: Command, log: &mut Vec<Op>) {
    let mut effects = Vec::new();
    broker.apply(now_ms, command, &mut effects).unwrap();
    for effect in effects {
        match effect {
            wharf_core::Effect::DurableEnqueued {
                durable_id,
                queues,
                message,
                ready_at_ms,
                ..
            } => log.push(Op::EnqueueAt {
                durable_id,
                queues: queues.iter().map(|queue| queue.to_string()).collect(),
                message: StoredMessage::from(&*message),
                delay_ms: message.delay_ms,
                ready_at_ms,
            }),
            wharf_core::Effect::DurableSettled { durable_id, queue } => log.push(Op::Settle {
                durable_id,
                queue: queue.to_string(),
            }),
            _ => {}
        }
    }
}

fn recover(records: Vec<(u64, Record)>, now_ms: u64) -> Broker {
    let (replay, _) = Replay::plan(records);
    let mut broker = broker_with_system_connection();
    replay.apply(&mut broker, now_ms, &mut |_| {}).unwrap();
    broker
}

fn ids_in(broker: &Broker, queue: &str) -> Vec<u64> {
    broker
        .durable_messages()
        .into_iter()
        .filter(|(_, _, queues)| queues.iter().any(|(q, _)| &**q == queue))
        .map(|(id, _, _)| id)
        .collect()
}

#[test]
fn id_runs_merge_and_answer_membership() {
    let mut runs = IdRuns::default();
    for id in [5, 7, 6, 1, 2] {
        runs.insert_range(id, id + 1);
    }
    runs.insert_range(10, 20);
    runs.insert_range(15, 25);
    runs.insert_range(8, 10);
    assert_eq!(
        runs.runs.iter().map(|(s, e)| (*s, *e)).collect::<Vec<_>>(),
        vec![(1, 3), (5, 25)]
    );
    for id in [1, 2, 5, 9, 24] {
        assert!(runs.contains(id), "{id}");
    }
    for id in [0, 3, 4, 25, 100] {
        assert!(!runs.contains(id), "{id}");
    }
}

#[test]
fn replay_settles_ranges_forgets_deleted_incarnations_and_applies_batches_held_inside_a_checkpoint()
{
    let declare = |name: &str| Op::DeclareQueue {
        name: name.into(),
        auto_delete: false,
        single_active_consumer: false,
        arguments: vec![],
    };
    let enqueue = |id: u64, queue: &str| Op::EnqueueAt {
        durable_id: id,
        queues: vec![queue.into()],
        message: message(&format!("m{id}")),
        delay_ms: None,
        ready_at_ms: 0,
    };
    let records = vec![
        (1, Record::CheckpointBegin { epoch: 1 }),
        (
            2,
            Record::CheckpointChunk {
                epoch: 1,
                ops: vec![declare("q"), declare("r"), enqueue(1, "q"), enqueue(2, "q")],
            },
        ),
        // Appended while the checkpoint's paged messages were copied: after its state.
        (
            3,
            Record::Batch(vec![
                enqueue(6, "q"),
                Op::Settle {
                    durable_id: 3,
                    queue: "q".into(),
                },
            ]),
        ),
        (
            4,
            Record::CheckpointChunk {
                epoch: 1,
                ops: vec![
                    enqueue(3, "q"),
                    enqueue(4, "q"),
                    enqueue(5, "q"),
                    enqueue(5, "r"),
                ],
            },
        ),
        (5, Record::CheckpointEnd { epoch: 1 }),
        (
            6,
            Record::Batch(vec![
                Op::SettleRange {
                    first: 4,
                    count: 2,
                    queue: "q".into(),
                },
                Op::DeleteQueue { name: "r".into() },
                declare("r"),
                enqueue(7, "r"),
            ]),
        ),
    ];
    let broker = recover(records, 0);
    assert_eq!(
        ids_in(&broker, "q"),
        vec![1, 2, 6],
        "3 settled, 4..=5 by range"
    );
    assert_eq!(
        ids_in(&broker, "r"),
        vec![7],
        "5 went with the first incarnation of r"
    );
}

#[test]
fn delayed_messages_and_dedup_windows_survive_replay_from_batches_and_from_a_checkpoint() {
    let arguments = Headers::new().with(wharf_core::ARG_DEDUP_WINDOW, 10_000i64);
    let options = QueueOptions {
        durable: true,
        arguments: arguments.clone(),
        ..QueueOptions::default()
    };
    let mut broker = Broker::default();
    let mut log = vec![Op::DeclareQueue {
        name: "q".into(),
        auto_delete: false,
        single_active_consumer: false,
        arguments: stored_headers(&arguments),
    }];
    for command in [
        Command::OpenConnection {
            vhost: wharf_core::DEFAULT_VHOST.into(),
            connection: SYSTEM_CONNECTION,
        },
        Command::DeclareQueue {
            vhost: wharf_core::DEFAULT_VHOST.into(),
            connection: SYSTEM_CONNECTION,
            name: "q".into(),
            options,
            passive: false,
            declarer: None,
        },
    ] {
        apply_logged(&mut broker, 1_000, command, &mut log);
    }
    let publish = |body: &str, id: &str, delay_ms: Option<u64>| Command::Publish {
        vhost: wharf_core::DEFAULT_VHOST.into(),
        message: Arc::new(Message {
            persistent: true,
            message_id: Some(id.into()),
            delay_ms,
            ..Message::new("q", body.to_owned())
        }),
    };
    apply_logged(
        &mut broker,
        1_000,
        publish("later", "id-1", Some(5_000)),
        &mut log,
    );
    apply_logged(&mut broker, 1_000, publish("now", "id-2", None), &mut log);
    assert_eq!(
        broker
            .queue_stats(wharf_core::DEFAULT_VHOST, "q")
            .unwrap()
            .delayed,
        1
    );

    // From the log's batches, recovering at 2,000: still delayed until 6,000; both ids are
    // still duplicates.
    let batches = vec![(1, Record::Batch(log.clone()))];
    let check = |mut recovered: Broker, how: &str| {
        let stats = recovered
            .queue_stats(wharf_core::DEFAULT_VHOST, "q")
            .unwrap();
        assert_eq!((stats.delayed, stats.ready), (1, 1), "{how}");
        assert_eq!(recovered.next_deadline(), Some(6_000), "{how}");
        let mut effects = Vec::new();
        for id in ["id-1", "id-2"] {
            let reply = recovered
                .apply(2_000, publish("again", id, None), &mut effects)
                .unwrap();
            assert!(
                matches!(
                    reply,
                    wharf_core::Reply::Published {
                        routed: 0,
                        duplicates: 1,
                        ..
                    }
                ),
                "{how}: {id} is a duplicate after recovery: {reply:?}"
            );
        }
        recovered.apply(6_000, Command::Tick, &mut effects).unwrap();
        assert_eq!(
            recovered
                .queue_stats(wharf_core::DEFAULT_VHOST, "q")
                .unwrap()
                .ready,
            2,
            "{how}"
        );
    };
    check(recover(batches, 2_000), "batches");

    // From a checkpoint, after the ready message was consumed and acked: its id stays in
    // the window, the delayed one stays delayed.
    let mut effects = Vec::new();
    broker
        .apply(
            1_500,
            Command::Subscribe {
                vhost: wharf_core::DEFAULT_VHOST.into(),
                connection: SYSTEM_CONNECTION,
                queue: "q".into(),
                consumer_tag: wharf_core::ConsumerTag(1),
                options: wharf_core::ConsumerOptions {
                    auto_ack: true,
                    initial_credit: Some(100),
                    ..wharf_core::ConsumerOptions::default()
                },
            },
            &mut effects,
        )
        .unwrap();
    assert_eq!(
        broker
            .queue_stats(wharf_core::DEFAULT_VHOST, "q")
            .unwrap()
            .ready,
        0
    );
    let chunks = vec![Captured::capture(&broker).into_ops().collect::<Vec<_>>()];
    let mut records = vec![(1, Record::CheckpointBegin { epoch: 1 })];
    for ops in chunks {
        records.push((2, Record::CheckpointChunk { epoch: 1, ops }));
    }
    records.push((3, Record::CheckpointEnd { epoch: 1 }));
    let mut recovered = recover(records, 2_000);
    let stats = recovered
        .queue_stats(wharf_core::DEFAULT_VHOST, "q")
        .unwrap();
    assert_eq!((stats.delayed, stats.ready), (1, 0));
    for id in ["id-1", "id-2"] {
        let reply = recovered
            .apply(2_000, publish("again", id, None), &mut effects)
            .unwrap();
        assert!(
            matches!(
                reply,
                wharf_core::Reply::Published {
                    routed: 0,
                    duplicates: 1,
                    ..
                }
            ),
            "checkpoint: {id}: {reply:?}"
        );
    }
    recovered.apply(6_000, Command::Tick, &mut effects).unwrap();
    assert_eq!(
        recovered
            .queue_stats(wharf_core::DEFAULT_VHOST, "q")
            .unwrap()
            .ready,
        1
    );
}

fn declare_op(name: &str) -> Op {
    Op::DeclareQueue {
        name: name.into(),
        auto_delete: false,
        single_active_consumer: false,
        arguments: vec![],
    }
}

fn enqueue(durable_id: u64, queues: &[&str], body: &str) -> Op {
    Op::EnqueueAt {
        durable_id,
        queues: queues.iter().map(|queue| (*queue).to_owned()).collect(),
        message: message(body),
        delay_ms: None,
        ready_at_ms: 0,
    }
}

fn broker_with_system_connection() -> Broker {
    let mut broker = Broker::default();
    broker
        .apply(
            0,
            Command::OpenConnection {
                vhost: wharf_core::DEFAULT_VHOST.into(),
                connection: SYSTEM_CONNECTION,
            },
            &mut Vec::new(),
        )
        .unwrap();
    broker
}

fn replay_encoded(records: Vec<Bytes>) -> Result<(Broker, Recovered), RecordError> {
    let records = records
        .into_iter()
        .enumerate()
        .map(|(idx, bytes)| (idx as u64 * 100, bytes))
        .collect();
    let mut broker = broker_with_system_connection();
    let recovered = Replay::from_encoded(records).apply(&mut broker, 0, &mut |_| {})?;
    Ok((broker, recovered))
}

#[test]
fn packed_records_are_exactly_what_postcard_writes_for_the_record() {
    let ops: Vec<Op> = (0..40)
        .map(|idx| enqueue(idx, &["a", "b"], &"x".repeat(idx as usize * 7)))
        .chain([
            declare_op("q"),
            Op::Settle {
                durable_id: 3,
                queue: "a".into(),
            },
        ])
        .collect();
    let encoded = OpRecords::encode(ops.clone(), 1 << 20).unwrap();
    assert_eq!(encoded.len(), ops.len());
    // Fits: one `Batch` record, byte for byte postcard's.
    assert_eq!(
        OpRecords::encode(ops.clone(), 1 << 20)
            .unwrap()
            .into_batch(1 << 20),
        vec![Record::Batch(ops.clone()).encode()]
    );
    // Does not fit: parts, each within the limit, that decode to the same operations.
    let parts = OpRecords::encode(ops.clone(), 1 << 20)
        .unwrap()
        .into_batch(600);
    assert!(parts.len() > 3, "{} parts", parts.len());
    let mut joined = Vec::new();
    for (idx, part) in parts.iter().enumerate() {
        assert!(part.len() <= 600, "part {idx} has {} bytes", part.len());
        match Record::decode(0, part).unwrap() {
            Record::BatchPart { more, ops } => {
                assert_eq!(more, idx + 1 < parts.len());
                assert_eq!(
                    *part,
                    Record::BatchPart {
                        more,
                        ops: ops.clone()
                    }
                    .encode()
                );
                joined.extend(ops);
            }
            other => panic!("expected a part, got {other:?}"),
        }
    }
    assert_eq!(joined, ops);
    // Checkpoint chunks: the same, with the epoch.
    let chunks = encoded.chunks(7, 500);
    let mut joined = Vec::new();
    for chunk in &chunks {
        match Record::decode(0, chunk).unwrap() {
            Record::CheckpointChunk { epoch: 7, ops } => {
                assert_eq!(
                    *chunk,
                    Record::CheckpointChunk {
                        epoch: 7,
                        ops: ops.clone()
                    }
                    .encode()
                );
                joined.extend(ops);
            }
            other => panic!("expected a chunk of epoch 7, got {other:?}"),
        }
    }
    assert_eq!(joined, ops);
    // Large varints (an epoch past 2^35, more than 127 operations) are postcard's too.
    let many = OpRecords::encode(
        (0..300).map(|id| Op::Settle {
            durable_id: id,
            queue: "q".into(),
        }),
        1 << 20,
    )
    .unwrap();
    let chunk = many.chunks(1 << 40, 1 << 20);
    assert_eq!(chunk.len(), 1);
    assert!(
        matches!(Record::decode(0, &chunk[0]).unwrap(), Record::CheckpointChunk { epoch, ops } if epoch == 1 << 40 && ops.len() == 300)
    );
}

#[test]
fn an_operation_too_large_for_a_record_is_split_by_queues_or_refused() {
    let queues: Vec<String> = (0..64)
        .map(|idx| format!("queue-with-a-long-name-{idx:03}"))
        .collect();
    let names: Vec<&str> = queues.iter().map(String::as_str).collect();
    let op = enqueue(9, &names, &"b".repeat(200));
    let encoded = OpRecords::encode([op], 400).unwrap();
    assert!(encoded.len() > 4, "split into {} operations", encoded.len());
    let (broker, recovered) = replay_encoded(
        std::iter::once(
            Record::Batch(queues.iter().map(|name| declare_op(name)).collect()).encode(),
        )
        .chain(encoded.into_batch(450))
        .collect(),
    )
    .unwrap();
    assert_eq!(recovered.messages, 64, "one copy per queue, none twice");
    for name in &queues {
        assert_eq!(ids_in(&broker, name), vec![9]);
    }
    let err = OpRecords::encode([enqueue(1, &["q"], &"b".repeat(500))], 400).unwrap_err();
    assert!(
        matches!(err, RecordError::OpTooLarge { limit: 400, .. }),
        "{err}"
    );
}

#[test]
fn a_split_batch_is_replayed_only_when_its_last_part_is_in_the_log() {
    let setup = Record::Batch(vec![declare_op("q")]).encode();
    let ops: Vec<Op> = (1..=20)
        .map(|id| enqueue(id, &["q"], &"m".repeat(50)))
        .collect();
    let parts = OpRecords::encode(ops, 1 << 20).unwrap().into_batch(400);
    assert!(parts.len() >= 3);
    let all: Vec<u64> = (1..=20).collect();
    // Whole: every message.
    let mut records = vec![setup.clone()];
    records.extend(parts.iter().cloned());
    let (broker, _) = replay_encoded(records).unwrap();
    assert_eq!(ids_in(&broker, "q"), all);
    // The log ends before its last part (a crash mid-write): none of it.
    let mut records = vec![setup.clone()];
    records.extend(parts[..parts.len() - 1].iter().cloned());
    let (broker, _) = replay_encoded(records).unwrap();
    assert_eq!(ids_in(&broker, "q"), Vec::<u64>::new());
    // Its append failed part way and the log went on: none of it, and what follows.
    let mut records = vec![setup];
    records.extend(parts[..2].iter().cloned());
    records.push(Record::Batch(vec![enqueue(21, &["q"], "after")]).encode());
    records.extend(parts.iter().cloned());
    let (broker, _) = replay_encoded(records).unwrap();
    let mut expected = all;
    expected.push(21);
    assert_eq!(ids_in(&broker, "q"), expected, "ids, in id order");
}

#[test]
fn replay_stops_at_a_logged_change_that_no_longer_applies() {
    // A message logged for a queue the log never declared: refused, with its LSN.
    let err = replay_encoded(vec![
        Record::Batch(vec![declare_op("q")]).encode(),
        Record::Batch(vec![
            enqueue(1, &["q"], "ok"),
            enqueue(2, &["nowhere"], "lost"),
        ])
        .encode(),
    ])
    .unwrap_err();
    assert!(
        matches!(err, RecordError::Inconsistent { lsn: 100, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("nowhere"), "{err}");
    // A binding to a queue that does not exist.
    let err = replay_encoded(vec![
        Record::Batch(vec![Op::Bind {
            source: "amq.direct".into(),
            to_queue: true,
            destination: "missing".into(),
            routing_key: "k".into(),
            arguments: vec![],
        }])
        .encode(),
    ])
    .unwrap_err();
    assert!(
        matches!(err, RecordError::Inconsistent { lsn: 0, .. }),
        "{err}"
    );
}

#[test]
fn replay_accepts_the_deletion_of_an_exchange_an_unbind_already_auto_deleted() {
    let (broker, _) = replay_encoded(vec![
        Record::Batch(vec![
            Op::DeclareExchange {
                name: "x".into(),
                kind: StoredKind::Direct,
                auto_delete: true,
                internal: false,
                arguments: vec![],
            },
            declare_op("q"),
            Op::Bind {
                source: "x".into(),
                to_queue: true,
                destination: "q".into(),
                routing_key: "k".into(),
                arguments: vec![],
            },
            Op::Unbind {
                source: "x".into(),
                to_queue: true,
                destination: "q".into(),
                routing_key: "k".into(),
                arguments: vec![],
            },
            Op::DeleteExchange { name: "x".into() },
        ])
        .encode(),
    ])
    .unwrap();
    assert!(
        broker
            .exchange_info(wharf_core::DEFAULT_VHOST, "x")
            .is_none()
    );
}

/// One record of every kind, with every operation and header value: the log format that
/// postcard's encoding of serde's variant order makes, frozen (see [`golden_records`]).
fn golden_records() -> Vec<Record> {
    let mut message = Message::new("rk", "body".to_owned());
    message.exchange = "ex".into();
    message.message_id = Some("id".into());
    message.content_type = Some("text/plain".into());
    message.content_encoding = Some("gzip".into());
    message.timestamp_ms = Some(1_700_000_000_000);
    message.correlation_id = Some("c".into());
    message.reply_to = Some("r".into());
    message.priority = 5;
    message.expiration_ms = Some(60_000);
    message.persistent = true;
    for (key, value) in [
        ("s", HeaderValue::Str("v".into())),
        ("i", HeaderValue::Int(-2)),
        ("f", HeaderValue::Float(1.5)),
        ("b", HeaderValue::Bool(true)),
        ("y", HeaderValue::Bytes(Bytes::from_static(b"\x00\xff"))),
        ("l", HeaderValue::List(vec![HeaderValue::Int(1)])),
    ] {
        message.headers.insert(key, value);
    }
    let mut nested = Headers::new();
    nested.insert("n", HeaderValue::Int(3));
    message.headers.insert("m", HeaderValue::Map(nested));
    let stored = StoredMessage::from(&message);
    let arguments = vec![("x-max-priority".to_owned(), StoredValue::Int(9))];
    let ops = vec![
        Op::DeclareExchange {
            name: "ex".into(),
            kind: StoredKind::Topic,
            auto_delete: true,
            internal: false,
            arguments: arguments.clone(),
        },
        Op::DeleteExchange { name: "ex".into() },
        Op::DeclareQueue {
            name: "q".into(),
            auto_delete: false,
            single_active_consumer: true,
            arguments,
        },
        Op::DeleteQueue { name: "q".into() },
        Op::Bind {
            source: "ex".into(),
            to_queue: true,
            destination: "q".into(),
            routing_key: "a.#".into(),
            arguments: vec![],
        },
        Op::Unbind {
            source: "ex".into(),
            to_queue: false,
            destination: "ex2".into(),
            routing_key: "k".into(),
            arguments: vec![],
        },
        Op::Enqueue {
            durable_id: 1,
            queues: vec!["q".into()],
            message: stored.clone(),
        },
        Op::Settle {
            durable_id: 1,
            queue: "q".into(),
        },
        Op::EnqueueAt {
            durable_id: 300,
            queues: vec!["q".into(), "q2".into()],
            message: stored,
            delay_ms: Some(1_000),
            ready_at_ms: 1_700_000_001_000,
        },
        Op::Dedup {
            queue: "q".into(),
            message_id: "id".into(),
            until_ms: 1_700_000_060_000,
        },
        Op::SettleRange {
            first: 10,
            count: 5,
            queue: "q".into(),
        },
    ];
    vec![
        Record::Batch(ops.clone()),
        Record::CheckpointBegin { epoch: 7 },
        Record::CheckpointChunk {
            epoch: 7,
            ops: ops[..3].to_vec(),
        },
        Record::CheckpointEnd { epoch: 7 },
        Record::BatchPart {
            more: true,
            ops: ops[8..9].to_vec(),
        },
    ]
}

/// A small log as this format wrote it: a queue, a message in the older `Enqueue` form and
/// one in `EnqueueAt`, the first settled, all split over two batch parts.
fn golden_log() -> Vec<Record> {
    let Record::Batch(ops) = golden_records().remove(0) else {
        unreachable!()
    };
    let Op::EnqueueAt { message, .. } = ops[8].clone() else {
        unreachable!()
    };
    vec![
        Record::Batch(vec![declare_op("q")]),
        Record::BatchPart {
            more: true,
            ops: vec![Op::Enqueue {
                durable_id: 1,
                queues: vec!["q".into()],
                message: message.clone(),
            }],
        },
        Record::BatchPart {
            more: false,
            ops: vec![
                Op::EnqueueAt {
                    durable_id: 2,
                    queues: vec!["q".into()],
                    message,
                    delay_ms: None,
                    ready_at_ms: 1_700_000_001_000,
                },
                Op::Settle {
                    durable_id: 1,
                    queue: "q".into(),
                },
            ],
        },
    ]
}

/// [`golden_records`] as version 1 of the format writes them (hex).
const GOLDEN_RECORDS: [&str; 5] = [
    concat!(
        "01000b00026578020100010e782d6d61782d7072696f726974790112010265780201710001010e78",
        "2d6d61782d7072696f7269747901120301710402657801017103612e230005026578000365783201",
        "6b00060101017102657802726b0102696407017300017601690103016602000000000000f83f0162",
        "03010179040200ff016c05010102016d0601016e0106010a746578742f706c61696e0104677a6970",
        "0180d095ffbc310101630101720501e0d40304626f64790701017108ac0202017102713202657802",
        "726b0102696407017300017601690103016602000000000000f83f016203010179040200ff016c05",
        "010102016d0601016e0106010a746578742f706c61696e0104677a69700180d095ffbc3101016301",
        "01720501e0d40304626f647901e807e8d795ffbc31090171026964e0a499ffbc310a0a050171",
    ),
    "010107",
    concat!(
        "0102070300026578020100010e782d6d61782d7072696f726974790112010265780201710001010e",
        "782d6d61782d7072696f726974790112",
    ),
    "010307",
    concat!(
        "0104010108ac0202017102713202657802726b010269640701730001760169010301660200000000",
        "0000f83f016203010179040200ff016c05010102016d0601016e0106010a746578742f706c61696e",
        "0104677a69700180d095ffbc310101630101720501e0d40304626f647901e807e8d795ffbc31",
    ),
];

/// [`golden_log`] as version 1 of the format writes it (hex).
const GOLDEN_LOG: [&str; 3] = [
    "010001020171000000",
    concat!(
        "01040101060101017102657802726b0102696407017300017601690103016602000000000000f83f",
        "016203010179040200ff016c05010102016d0601016e0106010a746578742f706c61696e0104677a",
        "69700180d095ffbc310101630101720501e0d40304626f6479",
    ),
    concat!(
        "01040002080201017102657802726b0102696407017300017601690103016602000000000000f83f",
        "016203010179040200ff016c05010102016d0601016e0106010a746578742f706c61696e0104677a",
        "69700180d095ffbc310101630101720501e0d40304626f647900e8d795ffbc3107010171",
    ),
];

fn unhex(hex: &str) -> Bytes {
    (0..hex.len())
        .step_by(2)
        .map(|idx| u8::from_str_radix(&hex[idx..idx + 2], 16).unwrap())
        .collect::<Vec<u8>>()
        .into()
}

#[test]
fn the_log_record_format_is_frozen_golden_bytes() {
    // A change here is a change of the log format: bump RECORD_FORMAT_VERSION and keep
    // reading the old one (docs/storage.md), never edit these bytes.
    for (record, hex) in golden_records()
        .into_iter()
        .chain(golden_log())
        .zip(GOLDEN_RECORDS.iter().chain(GOLDEN_LOG.iter()))
    {
        let bytes = unhex(hex);
        assert_eq!(
            record.encode(),
            bytes,
            "{record:?} encodes as it always did"
        );
        assert_eq!(Record::decode(0, &bytes).unwrap(), record);
    }
}

#[test]
fn a_log_written_by_format_version_1_still_replays() {
    let records = GOLDEN_LOG.iter().map(|hex| unhex(hex)).collect();
    let (broker, recovered) = replay_encoded(records).unwrap();
    assert_eq!(recovered.messages, 1);
    assert_eq!(ids_in(&broker, "q"), vec![2]);
    let (_, message, _) = broker.durable_messages().remove(0);
    assert_eq!(&message.body[..], b"body");
    assert_eq!(message.priority, 5);
    assert_eq!(message.message_id.as_deref(), Some("id"));
    assert_eq!(message.headers.len(), 7);
}

/// The turnstile that keeps log order core order: tickets append in the order they were
/// taken, whatever order their threads get there in, and a ticket given up unused (a batch
/// whose encoding failed, a panic) passes its turn instead of blocking every later batch.
#[test]
fn tickets_take_their_turns_in_order_and_an_unused_ticket_passes_its_turn() {
    use super::journal::Turnstile;
    use std::sync::Mutex;
    let turnstile = Arc::new(Turnstile::default());
    let order = Arc::new(Mutex::new(Vec::new()));
    let tickets: Vec<_> = (0..6).map(|_| turnstile.ticket()).collect();
    let mut threads = Vec::new();
    // Threads start in reverse ticket order, so later tickets usually wait first; whatever
    // order they arrive in, the turns come in ticket order.
    for (idx, mut ticket) in tickets.into_iter().enumerate().rev() {
        let order = order.clone();
        threads.push(std::thread::spawn(move || {
            if idx == 2 {
                // Given up unused: its turn passes.
                drop(ticket);
                return;
            }
            let _turn = ticket.wait();
            order.lock().unwrap().push(idx);
        }));
    }
    for thread in threads {
        thread.join().unwrap();
    }
    assert_eq!(*order.lock().unwrap(), vec![0, 1, 3, 4, 5]);
    // And later tickets keep working.
    let mut next = turnstile.ticket();
    drop(next.wait());
}

/// Clients may no longer declare `amq.*` names (the protocol front end refuses them), but a
/// log written before that refusal may hold such a queue: it still replays, with its messages.
#[test]
fn a_logged_amq_queue_from_before_the_refusal_still_replays() {
    let (broker, recovered) = replay_encoded(vec![
        Record::Batch(vec![
            declare_op("amq.legacy"),
            enqueue(1, &["amq.legacy"], "kept"),
        ])
        .encode(),
    ])
    .expect("replays");
    assert_eq!(recovered.messages, 1);
    assert_eq!(
        broker
            .queue_stats(wharf_core::DEFAULT_VHOST, "amq.legacy")
            .unwrap()
            .ready,
        1
    );
}

/// The state of virtual host `vhost` that recovery must bring back: queues with their
/// message ids, exchanges, bindings and limits.
fn vhost_state(broker: &Broker, vhost: &str) -> (Vec<(String, u64)>, Vec<String>, usize) {
    let queues = broker
        .list_queues(vhost)
        .into_iter()
        .map(|queue| (queue.name, queue.ready))
        .collect();
    let exchanges = broker
        .list_exchanges(vhost)
        .into_iter()
        .filter(|exchange| !exchange.builtin)
        .map(|exchange| exchange.name)
        .collect();
    (queues, exchanges, broker.list_bindings(vhost).len())
}

#[test]
fn virtual_hosts_and_what_they_hold_survive_replay_from_batches_and_from_a_checkpoint() {
    use wharf_core::{BindTarget, DEFAULT_VHOST, ExchangeKind, ExchangeOptions, VhostLimits};
    let mut broker = broker_with_system_connection();
    let mut log: Vec<Op> = Vec::new();
    let limits = VhostLimits {
        max_connections: Some(3),
        max_queues: Some(10),
    };
    for name in ["staging", "doomed"] {
        broker
            .apply(
                1,
                Command::AddVhost {
                    name: name.into(),
                    limits,
                },
                &mut Vec::new(),
            )
            .unwrap();
        log.push(Op::DeclareVhost {
            name: name.into(),
            max_connections: limits.max_connections,
            max_queues: limits.max_queues,
        });
    }
    // The same names in three virtual hosts, logged as the server logs them.
    for vhost in [DEFAULT_VHOST, "staging", "doomed"] {
        let options = QueueOptions {
            durable: true,
            ..QueueOptions::default()
        };
        apply_logged(
            &mut broker,
            2,
            Command::DeclareQueue {
                vhost: vhost.into(),
                connection: SYSTEM_CONNECTION,
                name: "q".into(),
                options: options.clone(),
                passive: false,
                declarer: Some(wharf_core::Declarer {
                    name: "alice".into(),
                    max_queues: None,
                }),
            },
            &mut log,
        );
        log.extend(declare_queue_op(vhost, "q", &options, Some("alice")));
        let exchange = ExchangeOptions {
            durable: true,
            ..ExchangeOptions::default()
        };
        apply_logged(
            &mut broker,
            2,
            Command::DeclareExchange {
                vhost: vhost.into(),
                name: "events".into(),
                kind: ExchangeKind::Fanout,
                options: exchange.clone(),
                passive: false,
            },
            &mut log,
        );
        log.extend(declare_exchange_op(
            vhost,
            "events",
            ExchangeKind::Fanout,
            &exchange,
        ));
        let target = BindTarget::Queue("q".into());
        log.extend(bind_op(
            &broker,
            vhost,
            "events",
            &target,
            "",
            &Headers::new(),
            true,
        ));
        apply_logged(
            &mut broker,
            2,
            Command::Bind {
                vhost: vhost.into(),
                source: "events".into(),
                target,
                routing_key: String::new(),
                arguments: Headers::new(),
            },
            &mut log,
        );
        let copies = if vhost == "staging" { 2 } else { 1 };
        for _ in 0..copies {
            let message = Message {
                exchange: "events".into(),
                persistent: true,
                ..Message::new("", format!("in {vhost}"))
            };
            apply_logged(
                &mut broker,
                3,
                Command::Publish {
                    vhost: vhost.into(),
                    message: Arc::new(message),
                },
                &mut log,
            );
        }
    }
    // Deleting a virtual host logs the deletes of what it held, then its own.
    let mut effects = Vec::new();
    broker
        .apply(
            4,
            Command::DeleteVhost {
                name: "doomed".into(),
            },
            &mut effects,
        )
        .unwrap();
    for effect in effects {
        match effect {
            wharf_core::Effect::QueueDeleted {
                name,
                durable: true,
            } => log.push(Op::DeleteQueue {
                name: name.to_string(),
            }),
            wharf_core::Effect::ExchangeDeleted {
                name,
                durable: true,
            } => log.push(Op::DeleteExchange {
                name: name.to_string(),
            }),
            _ => {}
        }
    }
    log.push(Op::DeleteVhost {
        name: "doomed".into(),
    });
    let expected = |ready: u64| {
        (
            vec![("q".to_owned(), ready)],
            vec!["events".to_owned()],
            1usize,
        )
    };
    for (from, recovered) in [
        ("batches", recover(vec![(1, Record::Batch(log.clone()))], 5)),
        ("a checkpoint", {
            let ops: Vec<Op> = Captured::capture(&broker).into_ops().collect();
            recover(
                vec![
                    (1, Record::CheckpointBegin { epoch: 1 }),
                    (2, Record::CheckpointChunk { epoch: 1, ops }),
                    (3, Record::CheckpointEnd { epoch: 1 }),
                ],
                5,
            )
        }),
    ] {
        assert_eq!(
            vhost_state(&recovered, DEFAULT_VHOST),
            expected(1),
            "from {from}"
        );
        assert_eq!(
            vhost_state(&recovered, "staging"),
            expected(2),
            "from {from}"
        );
        assert!(!recovered.has_vhost("doomed"), "from {from}");
        assert_eq!(
            recovered.vhost_limits("staging"),
            Some(limits),
            "from {from}"
        );
        assert_eq!(recovered.durable_messages().len(), 3, "from {from}");
        // Their declarer too: the queues in / and staging (doomed's went with it).
        assert_eq!(recovered.queues_declared_by("alice"), 2, "from {from}");
    }
}

#[test]
fn the_virtual_host_and_declarer_operations_have_frozen_golden_bytes() {
    // Appended to `Op` (indices 11 to 13): a log that has them is unreadable to an older
    // broker, and every older log reads as before.
    let ops = vec![
        Op::DeclareVhost {
            name: "v".into(),
            max_connections: Some(2),
            max_queues: None,
        },
        Op::DeleteVhost { name: "v".into() },
        Op::DeclareQueueBy {
            name: "q".into(),
            declared_by: "u".into(),
            auto_delete: false,
            single_active_consumer: true,
            arguments: vec![],
        },
    ];
    let bytes = Record::Batch(ops.clone()).encode();
    assert_eq!(hex(&bytes), "0100030b01760102000c01760d01710175000100");
    assert_eq!(Record::decode(0, &bytes).unwrap(), Record::Batch(ops));
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// A virtual host whose queue limit was lowered below what it holds (which refuses only what
/// comes next) replays from a checkpoint: its limits are written after its queues.
#[test]
fn a_vhost_holding_more_queues_than_its_lowered_limit_replays_from_a_checkpoint() {
    use wharf_core::{DEFAULT_VHOST, VhostLimits};
    let mut broker = broker_with_system_connection();
    let mut effects = Vec::new();
    broker
        .apply(
            1,
            Command::AddVhost {
                name: "v".into(),
                limits: VhostLimits::default(),
            },
            &mut effects,
        )
        .unwrap();
    for vhost in ["v", DEFAULT_VHOST] {
        for name in ["a", "b", "c"] {
            let command = Command::DeclareQueue {
                vhost: vhost.into(),
                connection: SYSTEM_CONNECTION,
                name: name.into(),
                options: QueueOptions {
                    durable: true,
                    ..QueueOptions::default()
                },
                passive: false,
                declarer: None,
            };
            broker.apply(2, command, &mut effects).unwrap();
        }
    }
    let lowered = VhostLimits {
        max_connections: Some(1),
        max_queues: Some(1),
    };
    for vhost in ["v", DEFAULT_VHOST] {
        let command = Command::SetVhostLimits {
            name: vhost.into(),
            limits: lowered,
        };
        broker.apply(3, command, &mut effects).unwrap();
    }
    let ops: Vec<Op> = Captured::capture(&broker).into_ops().collect();
    let recovered = recover(
        vec![
            (1, Record::CheckpointBegin { epoch: 1 }),
            (2, Record::CheckpointChunk { epoch: 1, ops }),
            (3, Record::CheckpointEnd { epoch: 1 }),
        ],
        4,
    );
    for vhost in ["v", DEFAULT_VHOST] {
        assert_eq!(recovered.list_queues(vhost).len(), 3, "{vhost}");
        assert_eq!(recovered.vhost_limits(vhost), Some(lowered), "{vhost}");
    }
}
