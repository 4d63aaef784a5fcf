//! Fuzz target: IPv6 packets, their extension-header walk and the TCP/UDP/ICMPv6 message behind it.
//! Every getter of every checked view is called and what parses is re-emitted and re-parsed;
//! the harness is shared with `crates/wire/tests/malformed.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../crates/wire/tests/exercise/mod.rs"]
mod exercise;

fuzz_target!(|data: &[u8]| {
    exercise::ipv6_l4(data);
});
