//! Fuzz target: IP fragment sequences through the dispatcher's reassembler (overlaps, duplicates,
//! tiny first fragments, timeouts), every completed datagram checked byte for byte and cut again
//! for a smaller link; the harness is shared with `crates/unit/tests/hostile_fragments.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../crates/unit/tests/exercise/mod.rs"]
mod exercise;

fuzz_target!(|data: &[u8]| {
    exercise::fragments(data);
});
