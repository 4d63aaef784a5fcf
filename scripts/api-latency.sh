#!/bin/bash
# How long `GET /v1/appliances` takes while the reconciler provisions: a lab of its own, `dva
# serve` on it, the edge firewall with 1 data plane, then a curl loop on the list while it scales
# to 3 (two units start) and back to 1 (two drain and stop), then while its manager is killed
# and replaced. Prints the answers' times.
#
#   scripts/api-latency.sh [DVA_BINARY] [ROUNDS]     # root; lab prefix "lat-", API on :7181
#
# Run it under the e2e lock when others share the machine:
#   flock /tmp/dva-e2e.lock scripts/api-latency.sh target/debug/dva 3
set -euo pipefail
DVA=$(realpath "${1:-target/debug/dva}")
ROUNDS=${2:-3}
P=lat-
PORT=7181
STATE=$(mktemp -d /tmp/dva-lat.XXXXXX)
"$DVA" lab up --prefix $P >/dev/null
"$DVA" serve --state "$STATE" --lab $P --listen 127.0.0.1:$PORT --no-client-config \
    >"$STATE/serve.log" 2>&1 &
SERVE=$!
LOOP=
cleanup() {
    [ -n "$LOOP" ] && kill "$LOOP" 2>/dev/null
    "$DVA" delete edge-fw >/dev/null 2>&1 || true
    kill "$SERVE" 2>/dev/null; wait "$SERVE" 2>/dev/null || true
    "$DVA" lab down --prefix $P >/dev/null
    rm -rf "$STATE"
}
trap cleanup EXIT
# The token is written before the API listens: wait for both.
for _ in $(seq 200); do
    [ -s "$STATE/token" ] && curl -sf -o /dev/null "http://127.0.0.1:$PORT/healthz" && break
    sleep 0.1
done
export DVA_SERVER=http://127.0.0.1:$PORT DVA_TOKEN
DVA_TOKEN=$(cat "$STATE/token")
"$DVA" apply -f examples/edge-firewall.yaml >/dev/null
"$DVA" scale edge-fw --dataplanes 1 >/dev/null
"$DVA" wait edge-fw --timeout 60s >/dev/null

# One GET after another (no pause): each time is how long the API made a reader wait.
probe() {
    while :; do
        curl -s -o /dev/null -w '%{time_total}\n' -H "Authorization: Bearer $DVA_TOKEN" \
            "$DVA_SERVER/v1/appliances"
    done
}
probe >"$STATE/idle" & LOOP=$!
sleep 3
kill $LOOP; LOOP=
probe >"$STATE/busy" & LOOP=$!
for _ in $(seq "$ROUNDS"); do
    "$DVA" scale edge-fw --dataplanes 3 >/dev/null
    "$DVA" wait edge-fw --timeout 60s >/dev/null
    "$DVA" scale edge-fw --dataplanes 1 --drain-deadline 1s >/dev/null
    "$DVA" wait edge-fw --timeout 60s >/dev/null
done
kill $LOOP; LOOP=
# The manager dies: a new one starts, the link to it is made again.
probe >"$STATE/manager" & LOOP=$!
for _ in $(seq "$ROUNDS"); do
    pid=$(curl -s -H "Authorization: Bearer $DVA_TOKEN" "$DVA_SERVER/v1/appliances/edge-fw" |
        jq -r '.units[] | select(.role == "manager") | .pid')
    kill -9 "$pid"
    sleep 1
    "$DVA" wait edge-fw --timeout 60s >/dev/null
done
kill $LOOP; LOOP=

stats() {
    sort -n "$1" | awk -v what="$2" '{ t[NR] = $1 * 1000 }
        END { printf "%-34s %6d %8.2f %8.2f %8.2f\n", what, NR, t[int(NR * 0.5) + 1],
              t[int(NR * 0.99) + 1], t[NR] }'
}
printf "%-34s %6s %8s %8s %8s\n" "GET /v1/appliances ($(basename "$DVA"))" answers p50_ms p99_ms max_ms
stats "$STATE/idle" "idle (3 s)"
stats "$STATE/busy" "scaling 1->3->1, $ROUNDS round(s)"
stats "$STATE/manager" "manager killed, $ROUNDS time(s)"
