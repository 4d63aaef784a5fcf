#!/usr/bin/env bash
# A short run of every cargo-fuzz target in fuzz/ (FUZZ_SECONDS each, default 15): the parsers
# of dva-wire, the dispatcher's fragment reassembly and the whole packet path through the
# dispatcher and data-plane cores (`cores`), under libFuzzer and AddressSanitizer.
# Needs the nightly toolchain (cargo-fuzz passes sanitizer flags stable refuses): where it is
# absent this says so and skips; the stable smoke tests (crates/wire/tests/malformed.rs,
# crates/unit/tests/hostile_fragments.rs) run in every case. cargo-fuzz comes from crates.io
# when missing. A crash fails the run and leaves its input in fuzz/artifacts/TARGET/.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    echo "fuzz smoke: skipped, no nightly toolchain (rustup toolchain install nightly)"
    exit 0
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    cargo +stable install --locked cargo-fuzz
fi
seconds="${FUZZ_SECONDS:-15}"
cargo +nightly fuzz build
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
for target in $(cargo +nightly fuzz list); do
    # -rss_limit_mb: the harnesses hold at most a few MB; a leak or a blow-up shows at once.
    if ! cargo +nightly fuzz run "$target" -- -max_total_time="$seconds" -rss_limit_mb=1024 \
        -print_final_stats=1 >"$log" 2>&1; then
        tail -n 60 "$log"
        echo "fuzz smoke: $target failed (its input is in fuzz/artifacts/$target/)"
        exit 1
    fi
    runs="$(awk '/stat::number_of_executed_units/ { print $2 }' "$log")"
    echo "fuzz smoke: $target ran ${runs:-?} inputs in ${seconds}s, no failure"
done
