//! Records written through the real WAL on the in-memory disk, segment files damaged as the
//! input says (flipped bits, overwritten and zeroed ranges, cuts, appended garbage, misplaced
//! copies, removed and stray segment files), then reopened: recovery never panics, refuses
//! exactly the damage the rules of docs/storage.md refuse, otherwise cuts exactly the torn tail
//! and replays exactly the records written before it. The checker is
//! `wharf_storage::recovery_check`, which `tests/recover_damage.rs` runs on seeded inputs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wharf_storage::recovery_check::check;

fuzz_target!(|data: &[u8]| {
    if let Err(failure) = check(data) {
        panic!("{failure}");
    }
});
