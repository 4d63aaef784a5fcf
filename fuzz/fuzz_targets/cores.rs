//! The dispatcher and data-plane cores together (three data planes, one dispatcher, the
//! in-memory backplane): arbitrary frames, backplane datagrams, table changes, drains, NACKed
//! configs, lost and reordered datagrams, dead units and time, as `dva_unit::conformance::fuzz`
//! reads them from the input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    dva_unit::conformance::fuzz::run(data);
});
