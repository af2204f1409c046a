//! Damage-then-recover: records written through the real WAL, segment files damaged, reopened;
//! recovery must refuse exactly where the rules of docs/storage.md say, otherwise cut exactly
//! the torn tail and replay exactly the records written before it (the checker:
//! `wharf_storage::recovery_check`, shared with the `wal_recover` fuzz target).
//!
//! 500 seeded cases (5000 with `WHARF_SLOW_TESTS=1`); `WHARF_SEED=n` replays one. A crasher of
//! the `wal_recover` fuzz target becomes a named test here, with its input bytes.

use std::panic::{AssertUnwindSafe, catch_unwind};

use wharf_storage::recovery_check::{Outcome, Rule, check, random_input};

fn seeds() -> Vec<u64> {
    if let Some(seed) = std::env::var("WHARF_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
    {
        return vec![seed];
    }
    let slow = std::env::var_os("WHARF_SLOW_TESTS").is_some_and(|value| value != "0");
    (0..if slow { 5000 } else { 500 }).collect()
}

#[test]
fn recovery_refuses_damage_outside_the_torn_tail_and_replays_exactly_the_records_before_it() {
    let seeds = seeds();
    // Opened, cut a torn tail, rewrote a header; refused by each rule.
    let mut outcomes = [0usize; 7];
    let (mut gaps, mut segments, mut mutations) = (0, 0, 0);
    for &seed in &seeds {
        let input = random_input(seed);
        let case = match catch_unwind(AssertUnwindSafe(|| check(&input))) {
            Ok(Ok(case)) => case,
            Ok(Err(failure)) => panic!("seed {seed} (replay: WHARF_SEED={seed}): {failure}"),
            Err(_) => panic!("seed {seed} (replay: WHARF_SEED={seed}): panicked"),
        };
        outcomes[match case.outcome {
            Outcome::Opened => 0,
            Outcome::CutTornTail => 1,
            Outcome::RewroteHeader => 2,
            Outcome::Refused(Rule::SegmentHeader) => 3,
            Outcome::Refused(Rule::Overlap) => 4,
            Outcome::Refused(Rule::SealedSegment) => 5,
            Outcome::Refused(Rule::Vouched) => 6,
        }] += 1;
        gaps += usize::from(case.gap);
        segments += case.n_segments;
        mutations += case.n_mutations;
    }
    eprintln!(
        "{} cases, {segments} segments written, {mutations} damage operations, {gaps} gaps; \
         opened / cut a torn tail / rewrote a header / refused for a header, an overlap, a \
         sealed segment, vouched damage: {outcomes:?}",
        seeds.len()
    );
    // The cases reach every rule (not meaningful when replaying one seed).
    if seeds.len() >= 500 {
        assert!(outcomes.iter().all(|&n| n >= 2), "{outcomes:?}");
        assert!(
            outcomes[0] >= 50 && outcomes[1] >= 40 && outcomes[6] >= 10,
            "{outcomes:?}"
        );
        assert!(gaps >= 5 && segments >= 3 * seeds.len());
    }
}

#[test]
fn an_undamaged_log_reopens_with_every_record() {
    for seed in 0..20 {
        let mut input = random_input(seed);
        input[5] = 0; // no damage operations
        let case = check(&input).unwrap_or_else(|failure| panic!("seed {seed}: {failure}"));
        assert_eq!(case.outcome, Outcome::Opened, "seed {seed}");
        assert_eq!(case.n_mutations, 0);
    }
}
