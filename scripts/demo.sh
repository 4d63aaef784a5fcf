#!/usr/bin/env bash
# The README's main command: install the lab's tools, build dva, and run the demo
# (a real appliance in the lab, traffic through it). Needs root for network namespaces.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install-deps.sh
cargo build --release -p dva
exec ./target/release/dva demo "$@"
