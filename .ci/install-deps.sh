#!/usr/bin/env bash
# Install the Debian packages dva's lab and its tests need (crates/lab): iproute2 (ip, ss),
# ethtool (offloads off on every veth), nginx-light or nginx, iperf3, curl, iputils-ping, wrk,
# procps (sysctl, kill), haproxy and nftables (baselines of `dva bench compare`), and the
# toolchain for the AF_XDP driver's XDP program (crates/io/bpf, built by crates/io/build.rs):
# clang and llvm (`clang -target bpf`), libbpf-dev (bpf_helpers.h) and linux-libc-dev
# (linux/bpf.h), and python3-scapy (e2e_hygiene and e2e_tcp_window forge packets; Debian's scapy imports only under
# /usr/bin/python3), and prometheus for its promtool (e2e_metrics checks `dva serve`'s /metrics
# with `promtool check metrics`; the Prometheus server it also installs is kept from starting,
# see below), chromium (e2e_ui opens `dva serve`'s web view in headless Chromium; no service
# comes with it), tshark (e2e_seeing reads the pcap files `dva capture` writes; the
# wireshark-common question whether non-root users may capture is answered no),
# protobuf-compiler and libprotobuf-dev (protoc, and the well-known types it imports: the
# etcd-client crate compiles etcd's gRPC protos at build time) and etcd-server (e2e_etcd runs a
# 3-member cluster for `dva serve --store etcd://`; its system service is kept from starting
# like Prometheus's). Without clang dva still builds, with AF_PACKET as its only driver. Idempotent:
# packages already installed are left alone, and apt runs only when something is missing. Runs
# as root (or through sudo).
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
    exec sudo -- bash "$0" "$@"
fi

# Root's tools live in sbin, which a user's PATH carried through sudo may lack.
export PATH="$PATH:/usr/sbin:/sbin"

export DEBIAN_FRONTEND=noninteractive

installed() {
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]
}

packages=(iproute2 ethtool iperf3 curl iputils-ping procps wrk haproxy nftables python3-scapy
    prometheus clang llvm libbpf-dev linux-libc-dev chromium tshark protobuf-compiler
    libprotobuf-dev etcd-server)
missing=()
for p in "${packages[@]}"; do
    installed "$p" || missing+=("$p")
done
nginx_missing=false
if ! installed nginx-light && ! installed nginx; then
    nginx_missing=true
fi

if [ "${#missing[@]}" -gt 0 ] || $nginx_missing; then
    apt-get update
    if $nginx_missing; then
        # nginx-light is gone from newer Debian releases (trixie); nginx is the same server.
        candidate="$(apt-cache policy nginx-light 2>/dev/null | awk '/Candidate:/ { print $2 }')"
        if [ -n "$candidate" ] && [ "$candidate" != "(none)" ]; then
            missing+=(nginx-light)
        else
            missing+=(nginx)
        fi
    fi
    # iperf3 asks whether to run a system-wide daemon; the lab starts its own servers.
    echo 'iperf3 iperf3/start_daemon boolean false' | debconf-set-selections
    # tshark only reads files here: no dumpcap group, no setuid capture helper.
    echo 'wireshark-common wireshark-common/install-setuid boolean false' | debconf-set-selections
    # The lab and the benchmarks run their own nginx, iperf3 and HAProxy processes inside their
    # namespaces: the packages' system services are not wanted, and a user's machine must not
    # get services it did not ask for. A policy-rc.d that refuses every start keeps this install
    # from starting any (Debian's invoke-rc.d honours it); one the machine already has is left
    # alone and used as it is. Services that were installed and running before are never
    # touched.
    policy="${DVA_POLICY_RC_D:-/usr/sbin/policy-rc.d}" # overridable for the script's own test
    own_policy=false
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\n# dva install-deps: no service starts during this install\nexit 101\n' >"$policy"
        chmod 0755 "$policy"
        own_policy=true
    fi
    trap '$own_policy && rm -f "$policy"' EXIT
    apt-get install -y --no-install-recommends "${missing[@]}"
    if $own_policy; then
        rm -f "$policy"
        own_policy=false
    fi
    # What this run installed is ours to configure: its services stay off at boot too. Nothing
    # else is touched.
    if command -v systemctl >/dev/null 2>&1; then
        for p in "${missing[@]}"; do
            case "$p" in
                nginx | nginx-light) systemctl disable nginx.service >/dev/null 2>&1 || true ;;
                iperf3) systemctl disable iperf3.service >/dev/null 2>&1 || true ;;
                haproxy) systemctl disable haproxy.service >/dev/null 2>&1 || true ;;
                # Only for promtool (e2e_metrics checks the exposition with it).
                prometheus) systemctl disable prometheus.service >/dev/null 2>&1 || true ;;
                # Only for e2e_etcd, which runs its own members.
                etcd-server) systemctl disable etcd.service >/dev/null 2>&1 || true ;;
            esac
        done
    fi
fi

for tool in ip ss ethtool nginx iperf3 curl ping sysctl clang promtool chromium tshark protoc etcd; do
    command -v "$tool" >/dev/null 2>&1 || {
        echo "install-deps: $tool is still missing" >&2
        exit 1
    }
done
command -v cargo >/dev/null 2>&1 || {
    echo "install-deps: cargo is missing: dva needs Rust 1.85 or newer (Debian 12's is older);" \
        "install it with rustup: curl --proto '=https' -sSf https://sh.rustup.rs | sh -s -- -y" >&2
    exit 1
}
/usr/bin/python3 -c 'import scapy.all' 2>/dev/null || {
    echo "install-deps: scapy does not import under /usr/bin/python3" >&2
    exit 1
}
echo "install-deps: lab tools present (iproute2 ethtool nginx iperf3 curl iputils-ping procps wrk haproxy nftables clang llvm libbpf-dev python3-scapy prometheus/promtool chromium tshark protoc etcd)"
