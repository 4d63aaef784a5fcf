#!/usr/bin/env bash
# Instructions per packet of dva's packet path, counted by callgrind: a figure that does not move
# on a noisy machine (unlike time), so a change to the path shows even as a 1 % difference.
#
# Builds the `instructions` bench target of dva-unit (crates/unit/benches/instructions.rs: the
# unit's own dispatcher and data-plane cores, and the service stages alone, as the criterion
# benches run them) and runs, for each stage, a fixed number of
# packets under `valgrind --tool=callgrind`, collecting only inside the measured loop
# (`--collect-atstart=no --toggle-collect='*measure_*'`, so setup is not counted). Prints
# Ir (instructions executed) / packets per stage and the functions that execute most of them.
#
# Usage: scripts/callgrind.sh [STAGE...]
#   stages: dispatcher dispatcher-1514 dispatcher-out dataplane-firewall dataplane-nat
#   dataplane-lb firewall-established firewall-new nat-established lb-established, and from the
#   `chain` bench chain-fw chain-nat chain-lb with their -before twins (default: all)
#   PACKETS=N overrides the packets per stage; TOP=N the functions listed per stage (default 8).
#   The callgrind files stay in $CARGO_TARGET_DIR/callgrind (or target/callgrind) for
#   `callgrind_annotate` or kcachegrind.
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in valgrind callgrind_annotate cargo; do
    command -v "$tool" >/dev/null 2>&1 || {
        echo "callgrind.sh: $tool not found (Debian: apt-get install valgrind; cargo: rustup)" >&2
        exit 1
    }
done

stages=("$@")
if [ "${#stages[@]}" -eq 0 ]; then
    stages=(dispatcher dispatcher-1514 dispatcher-out dataplane-firewall dataplane-nat dataplane-lb
        firewall-established firewall-new nat-established lb-established
        chain-fw chain-fw-before chain-nat chain-nat-before chain-lb chain-lb-before)
fi
top="${TOP:-8}"
target_dir="${CARGO_TARGET_DIR:-target}"
out_dir="$target_dir/callgrind"
mkdir -p "$out_dir"

# The executable of bench target $1 of dva-unit, built if needed.
bench_bin() {
    local bin
    bin="$(cargo bench -p dva-unit --bench "$1" --no-run --message-format=json 2>/dev/null |
        grep -o '"executable":"[^"]*"' | sed 's/^"executable":"//; s/"$//' | grep "/$1-" | tail -n 1)"
    if [ -z "$bin" ] || [ ! -x "$bin" ]; then
        echo "callgrind.sh: could not build or find the $1 bench; try: cargo bench -p dva-unit --bench $1 --no-run" >&2
        exit 1
    fi
    echo "$bin"
}
echo "building the instructions and chain benches (bench profile: release with debug info)..." >&2
bin="$(bench_bin instructions)"
chain_bin="$(bench_bin chain)"

# Packets per stage: enough that the per-packet figure is stable to well under 1 %, few enough
# that each stage runs in seconds under callgrind (a new flow scans ~1000 rules: fewer of those).
default_packets() {
    case "$1" in
        firewall-new) echo 20000 ;;
        *) echo 200000 ;;
    esac
}

printf '\n%-22s %10s %16s %14s\n' "stage" "packets" "Ir" "Ir/packet"
summary=()
for stage in "${stages[@]}"; do
    packets="${PACKETS:-$(default_packets "$stage")}"
    file="$out_dir/$stage.callgrind"
    log="$out_dir/$stage.log"
    # chain-*: the data plane's per-packet work after the GENEVE header through its chain, and
    # (-before) the same packets through the path it took before the Stage trait
    # (crates/unit/benches/chain.rs).
    case "$stage" in
        chain-*) run=("$chain_bin" "${stage#chain-}") ;;
        *) run=("$bin" "$stage") ;;
    esac
    if ! valgrind --tool=callgrind --collect-atstart=no --toggle-collect='*measure_*' \
        --callgrind-out-file="$file" "${run[@]}" "$packets" >"$log" 2>&1; then
        echo "callgrind.sh: $stage failed; its log:" >&2
        cat "$log" >&2
        exit 1
    fi
    ir="$(grep -o 'Collected : [0-9]*' "$log" | awk '{ print $3 }' | tail -n 1)"
    if [ -z "$ir" ] || [ "$ir" -eq 0 ]; then
        echo "callgrind.sh: $stage: callgrind collected nothing (did the measure_* functions get inlined away?); log: $log" >&2
        exit 1
    fi
    per="$(awk -v ir="$ir" -v n="$packets" 'BEGIN { printf "%.1f", ir / n }')"
    printf '%-22s %10d %16d %14s\n' "$stage" "$packets" "$ir" "$per"
    summary+=("$stage")
done

for stage in "${summary[@]}"; do
    echo
    echo "== $stage: top $top functions by instructions executed in them (self cost)"
    # callgrind_annotate's rows are "  Ir (share)  file:function [object]"; code inlined into a
    # function is listed under the file it came from (file:caller). `|| true`: head closes the
    # pipe early, which pipefail would otherwise count as a failure.
    { callgrind_annotate --inclusive=no "$out_dir/$stage.callgrind" 2>/dev/null |
        grep -E '^ *[0-9][0-9,]* \( *[0-9.]+%\) ' | grep -v 'PROGRAM TOTALS' | head -n "$top" |
        sed -E 's#\[[^]]*\]$##; s#/rustc/[0-9a-f]+/library/#<std>/#; s#'"$PWD"'/##'; } || true
done
