#!/usr/bin/env bash
# Where the dispatcher's and a data plane's time goes under TCP super-packets: `perf record -e
# cpu-clock` on each unit of an edge firewall (1 data plane) in the lab, offloads on (a Linux
# host's defaults), while 8 iperf3 streams cross it. Prints iperf3's rate and each unit's top
# symbols; the perf files stay in $OUT for `perf report -i`. Needs root, perf and a built dva
# (the lab is built for the run and removed after it; a lab of the default prefix must not run).
#
# Usage: scripts/profile-units.sh [DVA_BINARY] [LABEL]
#   DVA_BINARY defaults to target/release/dva; LABEL (default "now") names the perf files, so a
#   binary before a change and one after can be profiled side by side (docs/PERFORMANCE.md §1e).
#   SECS=N: seconds of perf per unit (default 4); OUT=DIR: where the files go (default /tmp);
#   SPEC=FILE: the appliance to run (default examples/edge-firewall.yaml; named edge-fw, e.g.
#   with a `runtime` section). Each unit's samples are also shown per thread (its lanes).
set -euo pipefail
cd "$(dirname "$0")/.."
B=${1:-target/release/dva}
L=${2:-now}
SECS=${SECS:-4}
OUT=${OUT:-/tmp}
command -v perf >/dev/null || { echo "perf is not installed (Debian: linux-perf)" >&2; exit 1; }
"$B" lab up --offloads >"$OUT/profile-lab-$L.log" 2>&1
cleanup() {
    [ -n "${RUN:-}" ] && kill -INT "$RUN" 2>/dev/null && wait "$RUN" 2>/dev/null
    "$B" lab down >/dev/null 2>&1 || true
}
trap cleanup EXIT
"$B" run -f "${SPEC:-examples/edge-firewall.yaml}" --dataplanes 1 >"$OUT/profile-run-$L.log" 2>&1 &
RUN=$!
D= P=
for _ in $(seq 1 60); do
    D=$(pgrep -f "unit --role dispatcher" | head -1 || true)
    P=$(pgrep -f "unit --role dataplane" | head -1 || true)
    [ -n "$D" ] && [ -n "$P" ] && break
    sleep 0.5
done
[ -n "$D" ] && [ -n "$P" ] || { echo "the units did not start: $OUT/profile-run-$L.log" >&2; exit 1; }
# Ready once the dispatcher serves a config (the run's log says so); then the traffic.
sleep 3
ip netns exec dva-server1 iperf3 -s -D -1 >/dev/null 2>&1
sleep 1
ip netns exec dva-client iperf3 -c 198.18.2.2 -P 8 -t $((SECS * 2 + 6)) -f g \
    >"$OUT/profile-iperf-$L.log" 2>&1 &
IPERF=$!
sleep 4
perf record -q -e cpu-clock -p "$D" -o "$OUT/perf-dispatcher-$L.data" -- sleep "$SECS" >/dev/null 2>&1 &
perf record -q -e cpu-clock -p "$P" -o "$OUT/perf-dataplane-$L.data" -- sleep "$SECS" >/dev/null 2>&1
wait "$IPERF" || true
grep SUM "$OUT/profile-iperf-$L.log" | tail -1
for u in dispatcher dataplane; do
    f="$OUT/perf-$u-$L.data"
    echo "-- $u ($L): $(perf report -i "$f" --stdio 2>/dev/null | grep -m1 'of event')"
    perf report -q -i "$f" --no-children --sort tid 2>/dev/null | head -8 || true
    perf report -q -i "$f" --no-children --sort dso,sym 2>/dev/null | head -"${TOP:-12}" || true
done
