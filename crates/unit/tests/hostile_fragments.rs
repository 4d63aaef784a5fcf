//! The stable-toolchain smoke of `fuzz/fuzz_targets/fragments.rs`: deterministic pseudo-random
//! fragment sequences (own xorshift, fixed seed, so a failure reproduces; the input is printed)
//! and a few crafted ones through the dispatcher's reassembler, each reassembled datagram checked
//! byte for byte and cut again for a smaller link. Runs on stable in CI; the fuzz target explores
//! further under `cargo +nightly fuzz run fragments`.

mod exercise;

use exercise::Reached;

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn run(input: &[u8]) -> Reached {
    match std::panic::catch_unwind(|| exercise::fragments(input)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("failing input ({} bytes): {input:02x?}", input.len());
            std::panic::resume_unwind(e)
        }
    }
}

/// An in-order datagram of `n` 8-byte-multiple pieces: `op` per piece (see the harness).
fn in_order(v6: bool, proto_sel: u8, pieces: u8, last_len: u8) -> Vec<u8> {
    let mut ops = Vec::new();
    for k in 0..pieces {
        let more = k + 1 < pieces;
        let flags = u8::from(v6) | (u8::from(more) << 1) | (proto_sel << 2);
        // 4 units (32 bytes) per non-last piece: len % 32 + 1 = 4.
        let len = if more { 3 } else { last_len };
        ops.extend_from_slice(&[flags, 0, k * 4, len, 0]);
    }
    ops
}

#[test]
fn crafted_fragment_sequences_reassemble_exactly() {
    let mut total = Reached::default();
    for v6 in [false, true] {
        for proto in 0..4 {
            total += run(&in_order(v6, proto, 5, 40));
            // Reversed order, a duplicate, then an overlap that drops the datagram.
            let mut ops = in_order(v6, proto, 5, 40);
            let chunks: Vec<&[u8]> = ops.chunks(5).rev().collect();
            let mut rev: Vec<u8> = chunks.concat();
            rev.extend_from_slice(&ops[..5]);
            total += run(&rev);
            ops.splice(5..5, [u8::from(v6) | 2 | (proto << 2), 0, 2, 3, 0]);
            total += run(&ops);
        }
    }
    // Datagrams long enough that a 1280-byte link must cut them again.
    for v6 in [false, true] {
        let mut ops = Vec::new();
        // 256-byte pieces (32 units each), the offset in 13 bits after the 0x80 marker.
        let at = |units: u16| [0x80 | (units >> 8) as u8, units as u8];
        for k in 0..20u16 {
            let [hi, lo] = at(k * 32);
            ops.extend_from_slice(&[u8::from(v6) | 2, hi, lo, 31, 0]);
        }
        let [hi, lo] = at(20 * 32);
        ops.extend_from_slice(&[u8::from(v6), hi, lo, 100, 0]);
        total += run(&ops);
    }
    println!("{total:?}");
    assert!(
        total.complete >= 16,
        "crafted datagrams complete: {total:?}"
    );
    assert!(
        total.refragmented >= 2,
        "long ones are cut again: {total:?}"
    );
    assert!(total.dropped >= 8, "overlaps are dropped: {total:?}");
}

#[test]
fn random_fragment_sequences_keep_every_property() {
    let mut rng = XorShift(0x5eed_f4a6_0001);
    let mut total = Reached::default();
    for _ in 0..3000 {
        let len = 5 * (1 + (rng.next() % 60) as usize);
        let input: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        total += run(&input);
    }
    println!("{total:?}");
    assert!(total.fragments > 10_000, "{total:?}");
    assert!(
        total.complete > 0,
        "random sequences complete some datagrams: {total:?}"
    );
}
