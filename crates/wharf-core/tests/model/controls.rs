//! Negative controls: the checker catches planted faults.

use super::*;

// ----- negative controls: the checker can fail -----

/// A connection with a consumer (prefetch 10) on `q0`, and one message published to it.
pub(crate) fn harness_with_one_delivery() -> (Harness, Vec<Effect>) {
    let universe = Universe {
        exchanges: std::array::from_fn(|_| ExchangeProfile {
            kind: ExchangeKind::Fanout,
            options: ExchangeOptions::default(),
        }),
        queues: std::array::from_fn(|_| QueueOptions::default()),
        limits: Limits::default(),
        setup: Vec::new(),
    };
    let mut harness = Harness::new(universe);
    harness
        .step(&Op::DeclareQueue {
            conn: 0,
            queue: 0,
            variant: Variant::AsProfiled,
            passive: false,
        })
        .unwrap();
    harness
        .step(&Op::Subscribe {
            conn: 0,
            queue: 0,
            tag: 1,
            prefetch: 10,
            auto_ack: false,
            exclusive: false,
            priority: 0,
            ack_timeout_ms: None,
            initial_credit: None,
        })
        .unwrap();
    (harness, Vec::new())
}

pub(crate) fn publish_to_q0(
    harness: &mut Harness,
) -> (Command, Result<Reply, CoreError>, Vec<Effect>) {
    let command = harness.command(&Op::Publish {
        exchange: DEFAULT_EXCHANGE_IDX,
        key: 5,
        headers: 0,
        padding: 0,
        timing: Timing::default(),
    });
    let mut effects = Vec::new();
    harness.now_ms += 1;
    let outcome = harness
        .broker
        .apply(harness.now_ms, command.clone(), &mut effects);
    (command, outcome, effects)
}

pub(crate) fn checker_rejects_a_duplicate_delivery_not_flagged_redelivered() {
    let (mut harness, _) = harness_with_one_delivery();
    let (command, outcome, mut effects) = publish_to_q0(&mut harness);
    let Some(Effect::Deliver(delivery)) = effects.first().cloned() else {
        panic!("one delivery expected: {effects:?}")
    };
    let mut duplicate = delivery;
    duplicate.delivery_tag = DeliveryTag(duplicate.delivery_tag.0 + 1);
    effects.push(Effect::Deliver(duplicate));
    let err = harness
        .model
        .observe(harness.now_ms, &command, &outcome, &effects)
        .expect_err("a duplicate delivery must be reported");
    assert!(err.contains("duplicate"), "{err}");
}

pub(crate) fn checker_rejects_a_redelivery_without_the_redelivered_flag() {
    let (mut harness, _) = harness_with_one_delivery();
    harness
        .step(&Op::Publish {
            exchange: DEFAULT_EXCHANGE_IDX,
            key: 5,
            headers: 0,
            padding: 0,
            timing: Timing::default(),
        })
        .unwrap();
    let command = harness.command(&Op::Nack {
        conn: 0,
        pick: TagPick::Zero,
        multiple: true,
        requeue: true,
    });
    let mut effects = Vec::new();
    let outcome = harness
        .broker
        .apply(harness.now_ms + 1, command.clone(), &mut effects);
    for effect in &mut effects {
        if let Effect::Deliver(delivery) = effect {
            assert!(delivery.redelivered, "the broker flags the redelivery");
            delivery.redelivered = false;
        }
    }
    let err = harness
        .model
        .observe(harness.now_ms + 1, &command, &outcome, &effects)
        .expect_err("an unflagged redelivery must be reported");
    assert!(err.contains("redelivered flag"), "{err}");
}

pub(crate) fn checker_rejects_a_lost_message() {
    let (mut harness, _) = harness_with_one_delivery();
    harness
        .step(&Op::Cancel {
            consumer: ConsumerPick::Named { conn: 0, tag: 1 },
        })
        .unwrap();
    let (command, outcome, effects) = publish_to_q0(&mut harness);
    harness
        .model
        .observe(harness.now_ms, &command, &outcome, &effects)
        .unwrap();
    harness.model.check_broker(&harness.broker).unwrap();
    // The same history on a broker that lost the message (it never saw the publish).
    let mut lossy = Broker::default();
    let mut ignored = Vec::new();
    for connection in harness.model.connections.keys() {
        lossy
            .apply(
                0,
                Command::OpenConnection {
                    vhost: wharf_core::DEFAULT_VHOST.into(),
                    connection: *connection,
                },
                &mut ignored,
            )
            .unwrap();
    }
    let options = QueueOptions::default();
    let declare = Command::DeclareQueue {
        vhost: wharf_core::DEFAULT_VHOST.into(),
        connection: harness.slots[0],
        name: "q0".into(),
        options,
        passive: false,
        declarer: None,
    };
    lossy.apply(0, declare, &mut ignored).unwrap();
    let err = harness
        .model
        .check_broker(&lossy)
        .expect_err("a lost message must be reported");
    assert!(err.contains("list_queues"), "{err}");
}

pub(crate) fn checker_rejects_a_delivery_out_of_fifo_order() {
    let (mut harness, _) = harness_with_one_delivery();
    harness
        .step(&Op::Cancel {
            consumer: ConsumerPick::Named { conn: 0, tag: 1 },
        })
        .unwrap();
    harness
        .step(&Op::Publish {
            exchange: DEFAULT_EXCHANGE_IDX,
            key: 5,
            headers: 0,
            padding: 0,
            timing: Timing::default(),
        })
        .unwrap();
    harness
        .step(&Op::Publish {
            exchange: DEFAULT_EXCHANGE_IDX,
            key: 5,
            headers: 0,
            padding: 1,
            timing: Timing::default(),
        })
        .unwrap();
    let command = harness.command(&Op::Subscribe {
        conn: 0,
        queue: 0,
        tag: 2,
        prefetch: 0,
        auto_ack: false,
        exclusive: false,
        priority: 0,
        ack_timeout_ms: None,
        initial_credit: None,
    });
    let mut effects = Vec::new();
    let outcome = harness
        .broker
        .apply(harness.now_ms + 1, command.clone(), &mut effects);
    assert_eq!(effects.len(), 2, "both messages delivered: {effects:?}");
    let (Effect::Deliver(first), Effect::Deliver(second)) =
        (effects[0].clone(), effects[1].clone())
    else {
        panic!()
    };
    effects[0] = Effect::Deliver(Delivery {
        message: second.message.clone(),
        ..first.clone()
    });
    effects[1] = Effect::Deliver(Delivery {
        message: first.message,
        ..second
    });
    let err = harness
        .model
        .observe(harness.now_ms + 1, &command, &outcome, &effects)
        .expect_err("out-of-order delivery must be reported");
    assert!(err.contains("FIFO"), "{err}");
}

pub(crate) fn checker_rejects_a_delivery_beyond_prefetch() {
    let (mut harness, _) = harness_with_one_delivery();
    harness
        .step(&Op::Cancel {
            consumer: ConsumerPick::Named { conn: 0, tag: 1 },
        })
        .unwrap();
    harness
        .step(&Op::Publish {
            exchange: DEFAULT_EXCHANGE_IDX,
            key: 5,
            headers: 0,
            padding: 0,
            timing: Timing::default(),
        })
        .unwrap();
    harness
        .step(&Op::Publish {
            exchange: DEFAULT_EXCHANGE_IDX,
            key: 5,
            headers: 0,
            padding: 0,
            timing: Timing::default(),
        })
        .unwrap();
    let command = harness.command(&Op::Subscribe {
        conn: 0,
        queue: 0,
        tag: 2,
        prefetch: 0,
        auto_ack: false,
        exclusive: false,
        priority: 0,
        ack_timeout_ms: None,
        initial_credit: None,
    });
    let mut effects = Vec::new();
    let outcome = harness
        .broker
        .apply(harness.now_ms + 1, command.clone(), &mut effects);
    // Claim the consumer asked for prefetch 1: the broker's second delivery is then illegal.
    let Command::Subscribe {
        vhost: _,
        connection,
        queue,
        consumer_tag,
        options,
    } = command
    else {
        unreachable!()
    };
    let claimed = Command::Subscribe {
        vhost: wharf_core::DEFAULT_VHOST.into(),
        connection,
        queue,
        consumer_tag,
        options: ConsumerOptions {
            prefetch: 1,
            ..options
        },
    };
    let err = harness
        .model
        .observe(harness.now_ms + 1, &claimed, &outcome, &effects)
        .expect_err("exceeding prefetch must be reported");
    assert!(err.contains("without capacity"), "{err}");
}

pub(crate) fn checker_rejects_a_failed_command_that_should_have_succeeded() {
    let (mut harness, _) = harness_with_one_delivery();
    let command = harness.command(&Op::Purge { conn: 0, queue: 0 });
    let outcome = Err(CoreError::NotFound {
        kind: EntityKind::Queue,
        name: "q0".into(),
    });
    let err = harness
        .model
        .observe(harness.now_ms + 1, &command, &outcome, &[])
        .expect_err("a wrong error must be reported");
    assert!(err.contains("expected Ok(Purged"), "{err}");
}

pub(crate) fn checker_rejects_arrival_order_when_a_priority_queue_has_a_higher_priority_ready() {
    let universe = Universe {
        exchanges: std::array::from_fn(|_| ExchangeProfile {
            kind: ExchangeKind::Fanout,
            options: ExchangeOptions::default(),
        }),
        queues: std::array::from_fn(|_| QueueOptions {
            arguments: Headers::new().with("x-max-priority", 3i64),
            ..QueueOptions::default()
        }),
        limits: Limits::default(),
        setup: Vec::new(),
    };
    let mut harness = Harness::new(universe);
    harness
        .step(&Op::DeclareQueue {
            conn: 0,
            queue: 0,
            variant: Variant::AsProfiled,
            passive: false,
        })
        .unwrap();
    for padding in 0..2 {
        // Message ids 1 and 2: priorities 1 and 2.
        harness
            .step(&Op::Publish {
                exchange: DEFAULT_EXCHANGE_IDX,
                key: 5,
                headers: 0,
                padding,
                timing: Timing::default(),
            })
            .unwrap();
    }
    let command = harness.command(&Op::Subscribe {
        conn: 0,
        queue: 0,
        tag: 1,
        prefetch: 0,
        auto_ack: false,
        exclusive: false,
        priority: 0,
        ack_timeout_ms: None,
        initial_credit: None,
    });
    let mut effects = Vec::new();
    let outcome = harness
        .broker
        .apply(harness.now_ms + 1, command.clone(), &mut effects);
    let [Effect::Deliver(first), Effect::Deliver(second)] = effects.as_slice() else {
        panic!("both messages delivered: {effects:?}");
    };
    assert_eq!(
        first.message.priority, 2,
        "the broker serves priority first"
    );
    let arrival_order = vec![
        Effect::Deliver(Delivery {
            message: second.message.clone(),
            ..first.clone()
        }),
        Effect::Deliver(Delivery {
            message: first.message.clone(),
            ..second.clone()
        }),
    ];
    let err = harness
        .model
        .observe(harness.now_ms + 1, &command, &outcome, &arrival_order)
        .expect_err("arrival order ahead of a higher priority must be reported");
    assert!(err.contains("highest priority"), "{err}");
}

/// A plain `q0` without consumers.
pub(crate) fn harness_with_q0() -> Harness {
    let (mut harness, _) = harness_with_one_delivery();
    harness
        .step(&Op::Cancel {
            consumer: ConsumerPick::Named { conn: 0, tag: 1 },
        })
        .unwrap();
    harness
}

pub(crate) fn publish_timed_to_q0(harness: &mut Harness, timing: Timing) {
    harness
        .step(&Op::Publish {
            exchange: DEFAULT_EXCHANGE_IDX,
            key: 5,
            headers: 0,
            padding: 1,
            timing,
        })
        .unwrap();
}

/// Applies `op` to the broker only, for a test to tamper with what the broker did.
pub(crate) fn apply_unchecked(
    harness: &mut Harness,
    op: &Op,
) -> (Command, Result<Reply, CoreError>, Vec<Effect>) {
    let command = harness.command(op);
    harness.now_ms += 1;
    let mut effects = Vec::new();
    let outcome = harness
        .broker
        .apply(harness.now_ms, command.clone(), &mut effects);
    (command, outcome, effects)
}

pub(crate) fn subscribe_to_q0(tag: u32, ack_timeout_ms: Option<u64>) -> Op {
    Op::Subscribe {
        conn: 0,
        queue: 0,
        tag,
        prefetch: 1,
        auto_ack: false,
        exclusive: false,
        priority: 0,
        ack_timeout_ms,
        initial_credit: None,
    }
}

pub(crate) fn checker_rejects_a_delivery_of_an_expired_message() {
    let mut harness = harness_with_q0();
    publish_timed_to_q0(
        &mut harness,
        Timing {
            expiration_ms: Some(5),
            ..Timing::default()
        },
    );
    // Past its TTL, with no tick since: the consumer that arrives must not get it.
    harness.now_ms += 10;
    let (command, outcome, mut effects) = apply_unchecked(&mut harness, &subscribe_to_q0(2, None));
    assert!(
        !effects
            .iter()
            .any(|effect| matches!(effect, Effect::Deliver(_))),
        "the broker expires it instead: {effects:?}"
    );
    let message = harness.model.queues["q0"].ready[0].message.clone();
    effects.push(Effect::Deliver(Delivery {
        connection: harness.slots[0],
        consumer_tag: ConsumerTag(2),
        delivery_tag: DeliveryTag(2),
        queue: "q0".into(),
        message,
        redelivered: false,
        delivery_count: 1,
    }));
    let err = harness
        .model
        .observe(harness.now_ms, &command, &outcome, &effects)
        .expect_err("a delivery past the TTL must be reported");
    assert!(err.contains("past its TTL"), "{err}");
}

pub(crate) fn checker_rejects_a_delayed_message_delivered_before_due() {
    let (mut harness, _) = harness_with_one_delivery();
    let op = Op::Publish {
        exchange: DEFAULT_EXCHANGE_IDX,
        key: 5,
        headers: 0,
        padding: 1,
        timing: Timing {
            delay_ms: Some(20),
            ..Timing::default()
        },
    };
    let (command, outcome, mut effects) = apply_unchecked(&mut harness, &op);
    assert!(effects.is_empty(), "held, not delivered: {effects:?}");
    let Command::Publish { vhost: _, message } = &command else {
        unreachable!()
    };
    effects.push(Effect::Deliver(Delivery {
        connection: harness.slots[0],
        consumer_tag: ConsumerTag(1),
        delivery_tag: DeliveryTag(1),
        queue: "q0".into(),
        message: message.clone(),
        redelivered: false,
        delivery_count: 1,
    }));
    let err = harness
        .model
        .observe(harness.now_ms, &command, &outcome, &effects)
        .expect_err("a delayed message delivered early must be reported");
    assert!(err.contains("before it was due"), "{err}");
}

pub(crate) fn checker_rejects_a_lapsed_lease_that_is_not_redelivered() {
    let mut harness = harness_with_q0();
    harness.step(&subscribe_to_q0(2, Some(5))).unwrap();
    publish_timed_to_q0(&mut harness, Timing::default());
    assert_eq!(
        harness.model.connections[&harness.slots[0]].unacked.len(),
        1
    );
    harness.now_ms += 10;
    let (command, outcome, mut effects) =
        apply_unchecked(&mut harness, &Op::Advance { ms: 0, tick: true });
    let n_effects = effects.len();
    effects.retain(|effect| !matches!(effect, Effect::Deliver(_)));
    assert_eq!(
        effects.len() + 1,
        n_effects,
        "the lapsed delivery is redelivered"
    );
    let err = harness
        .model
        .observe(harness.now_ms, &command, &outcome, &effects)
        .expect_err("a lapsed delivery that stays lost must be reported");
    assert!(err.contains("work conservation"), "{err}");
}
