//! The generator guard: a fixed sample reaches the interesting interactions.

use super::*;

pub(crate) fn generated_sequences_reach_the_interesting_interactions() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    // A fixed sample, so this guards the generator: if a change to the weights made the
    // property test vacuous (no redeliveries, no cascades, an error never provoked), it fails.
    let mut runner = TestRunner::new(ProptestConfig {
        rng_seed: RngSeed::Fixed(7),
        ..ProptestConfig::default()
    });
    let mut coverage: BTreeMap<String, u64> = BTreeMap::new();
    for _ in 0..1000 {
        let case = case().new_tree(&mut runner).expect("generates").current();
        // Disagreements are the property test's business; here only reach counts.
        let Ok(mut harness) = Harness::with_setup(case.universe.clone()) else {
            continue;
        };
        for op in &case.ops {
            if harness.step(op).is_err() {
                break;
            }
        }
        for (what, count) in harness.coverage {
            *coverage.entry(what).or_default() += count;
        }
    }
    let required = [
        "deliver",
        "redeliver",
        "durable enqueue",
        "durable enqueue to several queues",
        "durable settle",
        "deliver auto-ack with credit",
        "deliver manual-ack in credit mode",
        "deliver single-active with standby",
        "deliver with mixed priorities",
        "consumer cancelled by broker",
        "queue deleted implicitly by Cancel",
        "queue deleted implicitly by CloseConnection",
        "exchange auto-deleted by Unbind",
        "exchange auto-deleted by DeleteQueue",
        "publish through exchange-to-exchange binding",
        "publish routed to 2",
        "publish refused by one full queue of several",
        "drop-head over a length limit",
        "deliver a higher priority ahead of older messages",
        "err Publish QueueFull",
        "dead letter rejected",
        "dead letter maxlen",
        "dead letter delivery_limit",
        "dead letter cycle",
        "err DeclareQueue InvalidArgument",
        "publish via Direct routed true",
        "publish via Fanout routed true",
        "publish via Topic routed true",
        "publish via Headers routed true",
        "settle with a delivery of a deleted queue outstanding",
        "settle with more than 64 outstanding",
        "settled 0",
        "settled 2",
        "ok Credit",
        "ok AckRange",
        "ok PurgeQueue",
        "ok DeleteExchange",
        "err Ack UnknownDeliveryTag",
        "err AckRange InvalidArgument",
        "err Bind AccessRefused",
        "err Bind InvalidArgument",
        "err Bind LimitExceeded",
        "err Cancel NotFound(Consumer)",
        "err DeclareExchange AccessRefused",
        "err DeclareExchange InvalidName",
        "err DeclareExchange PreconditionFailed",
        "err DeclareQueue PreconditionFailed",
        "err DeclareQueue ReservedName",
        "err DeclareQueue ResourceLocked",
        "err DeleteExchange PreconditionFailed",
        "err DeleteQueue PreconditionFailed",
        "err Publish AccessRefused",
        "err Publish NotFound(Exchange)",
        "err Subscribe ConsumerTagInUse",
        "err Subscribe LimitExceeded",
        "err Subscribe NotFound(Connection)",
        "err Subscribe ResourceLocked",
        "err Unbind NotFound(Exchange)",
        // Time-driven features.
        "a delayed message entered its queue",
        "deliver a delayed message",
        "a delayed message entered a full queue",
        "redrive expired a message",
        "expired by a tick",
        "expired in dispatch",
        "dead letter expired",
        "lease lapsed",
        "redeliver after a lapsed lease",
        "late settle of a lapsed tag",
        "touch extended a lease",
        "publish dropped a duplicate",
        "retry delayed a requeue",
        "retries exhausted, dead-lettered",
        "defer held a message",
        "queue expired",
        "queue deleted implicitly by Tick",
        "redrive moved a message",
        "redrive kept a message",
        "ok Tick",
        "ok Defer",
        "ok Touch",
        "ok Redrive",
        "err Defer InvalidArgument",
        "err Touch UnknownDeliveryTag",
        "err Redrive NotFound(Queue)",
    ];
    let missing: Vec<&str> = required
        .into_iter()
        .filter(|what| !coverage.contains_key(*what))
        .collect();
    let report: Vec<String> = coverage
        .iter()
        .map(|(what, count)| format!("{count:>7} {what}"))
        .collect();
    assert!(
        missing.is_empty(),
        "never reached: {missing:?}\nreached:\n{}",
        report.join("\n")
    );
}
