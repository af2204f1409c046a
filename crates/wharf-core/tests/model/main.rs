//! Model-based property test of the broker core, through its public API only.
//!
//! Random sequences of commands over a small universe of names (3 queues, 3 user exchanges plus
//! two built-ins, a reserved and an invalid name, 3 connections, consumer tags 1..=3; default or
//! tight [`Limits`]) are applied to a real [`Broker`] and to a
//! reference [`Model`] made of plain vectors and maps. The model predicts everything except the
//! broker's choice of *which* consumer gets a message: it checks that choice is legal (attached,
//! with capacity, highest priority among those with capacity, or the active consumer of a
//! single-active-consumer queue) and then learns from the observed `Effect::Deliver`s.
//!
//! After every command the checker verifies:
//! - the reply (or error class) is the one the model predicts; a failed command changes nothing
//!   and emits no effects;
//! - every delivery is the oldest ready copy of its queue (FIFO, requeued copies back at their
//!   arrival place), flagged `redelivered` exactly when it was delivered before, with
//!   `delivery_count` one more than last time, and the connection's next delivery tag;
//! - no copy is lost or duplicated: the model's ledger (ready + outstanding + delayed + settled =
//!   created) holds and the broker's per-queue counters (`delayed`, `expired` and `duplicates`
//!   included) and per-connection unacked counts equal the model's;
//! - routing: each publish lands in exactly the queues a naive router (recursive, cycle-safe)
//!   finds;
//! - prefetch and credit are never exceeded, and dispatch is eager (no ready message while a
//!   consumer of its queue has capacity);
//! - queue features (queue profiles carry the arguments): priority order (highest first, FIFO
//!   within a priority), length limits (drop-head before dispatch, reject-publish refusing the
//!   publish as a whole or, with other targets, via `refused_by`), dead-lettering (reasons
//!   `rejected`, `maxlen`, `delivery_limit`; death records built independently by the model and
//!   compared by value; the cycle guard) and the delivery limit, with their log effects;
//! - time (the clock moves 1 ms per command, and `Advance` ops jump it and `Tick`): delayed
//!   messages (`delay_ms`, `Defer`, retry schedules) enter the back of their queue only at a
//!   `Tick` at or after their due time, in due order (ties in the order they were set); TTLs
//!   (the message's or the queue's `x-message-ttl`, the shorter, counted from when the copy
//!   became ready; a requeue keeps it) expire ready copies exactly at the `Tick` that reaches
//!   them, or when dispatch finds them past due (never delivered), dead-lettered with reason
//!   `expired` and without TTL or delay; leases (`ack_timeout_ms`) lapse back to the queue,
//!   `Touch` extends them, a late settle of a lapsed tag is `Settled { count: 0 }` once; unused
//!   queues with `x-expires` are deleted; `x-dedup-window` drops repeated message ids per
//!   queue; `Redrive` moves dead letters back to where they last died;
//! - the order of events inside one `Tick` that covers several due times (which copy a
//!   drop-head limit drops, the order dead letters reach their queue, hence durable ids) is a
//!   choice of the core's timer scheme, so the model keeps its own timer list with the scheme's
//!   documented rules (`timers.rs`: fired by due time, then in the order they were set; one TTL
//!   timer per queue at its earliest expiry, re-armed only for an earlier one, expiring every
//!   copy due when it fires; stale timers skipped), and its own dispatch order (queues
//!   dispatched in the order the command touched them; dead letters found by dispatch
//!   republished before the next round). Independently of the scheme it checks the contract:
//!   after a `Tick` nothing is left due (no delayed copy, expiry, lease or unused queue), and
//!   `next_deadline` is never later than the next thing due;
//! - `list_queues`, `queue_stats`, `list_exchanges`, `list_bindings`, `unacked_count`,
//!   `ready_bytes_total`, `delayed_total`, `durable_messages` (with the due times of delayed
//!   copies) and `durable_dedup_entries` agree with the model.
//!
//! Not generated: the recovery commands (`Restore`, `RestoreDedup`; see `tests/timers.rs` and
//! the server's restart tests).
//!
//! Each case starts from a generated setup (declares, a few bindings and consumers) so that the
//! 1..=60 generated steps mostly exercise consuming rather than failing on missing names;
//! `generated_sequences_reach_the_interesting_interactions` guards that the generator keeps
//! reaching redeliveries, cascades, limits, the time-driven features and every error class.
//!
//! Cases: 1024 by default, `PROPTEST_CASES` overrides. The seed is printed (visible when the test
//! fails) and `PROPTEST_RNG_SEED=<seed>` replays a run.
//!
//! Layout: `strategy` (the generated input), `model` (the reference model), `harness` (applies
//! ops to the broker and the model and checks them), `coverage` (the generator guard) and
//! `controls` (negative controls); the `#[test]` entry points are here, so the test names do
//! not carry a module path.

mod controls;
mod coverage;
mod harness;
mod model;
mod strategy;

use harness::*;
use model::*;
use strategy::*;

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config as ProptestConfig, RngSeed};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use wharf_core::topic::topic_matches_naive;
use wharf_core::{
    BindTarget, Broker, CancelReason, Command, ConnectionId, ConsumerOptions, ConsumerTag,
    CoreError, DURATION_MS_MAX, Delivery, DeliveryTag, Effect, EntityKind, ExchangeKind,
    ExchangeOptions, HeaderValue, Headers, Limits, Message, QueueOptions, QueueStats,
    RETRY_STEPS_MAX, Reply,
};

/// Cases per run when `PROPTEST_CASES` is not set: about 2 s at the test profile's opt-level 1.
const DEFAULT_CASES: u32 = 1024;

/// [`DEFAULT_CASES`] unless `PROPTEST_CASES` says otherwise; a fixed, printed seed (random unless
/// `PROPTEST_RNG_SEED` is set) so any failure can be replayed; no regression files written.
fn config() -> ProptestConfig {
    let defaults = ProptestConfig::default();
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|cases| cases.parse().ok())
        .unwrap_or(DEFAULT_CASES);
    let seed = match defaults.rng_seed {
        RngSeed::Fixed(seed) => seed,
        RngSeed::Random => {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            (nanos as u64) ^ u64::from(std::process::id()).rotate_left(32)
        }
    };
    eprintln!("model test: {cases} cases; replay with PROPTEST_RNG_SEED={seed}");
    ProptestConfig {
        cases,
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: None,
        ..defaults
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn broker_agrees_with_reference_model_on_random_command_sequences(case in case()) {
        run_case(&case).map_err(TestCaseError::fail)?;
    }
}

#[test]
fn generated_sequences_reach_the_interesting_interactions() {
    coverage::generated_sequences_reach_the_interesting_interactions();
}

// ----- negative controls: the checker can fail -----

#[test]
fn checker_rejects_a_duplicate_delivery_not_flagged_redelivered() {
    controls::checker_rejects_a_duplicate_delivery_not_flagged_redelivered();
}

#[test]
fn checker_rejects_a_redelivery_without_the_redelivered_flag() {
    controls::checker_rejects_a_redelivery_without_the_redelivered_flag();
}

#[test]
fn checker_rejects_a_lost_message() {
    controls::checker_rejects_a_lost_message();
}

#[test]
fn checker_rejects_a_delivery_out_of_fifo_order() {
    controls::checker_rejects_a_delivery_out_of_fifo_order();
}

#[test]
fn checker_rejects_a_delivery_beyond_prefetch() {
    controls::checker_rejects_a_delivery_beyond_prefetch();
}

#[test]
fn checker_rejects_a_failed_command_that_should_have_succeeded() {
    controls::checker_rejects_a_failed_command_that_should_have_succeeded();
}

#[test]
fn checker_rejects_arrival_order_when_a_priority_queue_has_a_higher_priority_ready() {
    controls::checker_rejects_arrival_order_when_a_priority_queue_has_a_higher_priority_ready();
}

#[test]
fn checker_rejects_a_delivery_of_an_expired_message() {
    controls::checker_rejects_a_delivery_of_an_expired_message();
}

#[test]
fn checker_rejects_a_delayed_message_delivered_before_due() {
    controls::checker_rejects_a_delayed_message_delivered_before_due();
}

#[test]
fn checker_rejects_a_lapsed_lease_that_is_not_redelivered() {
    controls::checker_rejects_a_lapsed_lease_that_is_not_redelivered();
}
