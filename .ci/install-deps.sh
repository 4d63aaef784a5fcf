#!/usr/bin/env bash
# Install the Debian packages dva's lab and its tests need (crates/lab): iproute2 (ip, ss),
# ethtool (offloads off on every veth), nginx-light or nginx, iperf3, curl, iputils-ping, wrk,
# procps (sysctl, kill), haproxy and nftables (baselines of `dva bench compare`), and the
# toolchain for the AF_XDP driver's XDP program (crates/io/bpf, built by crates/io/build.rs):
# clang and llvm (`clang -target bpf`), libbpf-dev (bpf_helpers.h) and linux-libc-dev
# (linux/bpf.h), and python3-scapy (e2e_hygiene and e2e_tcp_window forge packets; Debian's scapy imports only under
# /usr/bin/python3), and prometheus for its promtool (e2e_metrics checks `dva serve`'s /metrics
# with `promtool check metrics`; the Prometheus server it also installs is kept from starting,
# see below). Without clang dva still builds, with AF_PACKET as its only driver. Idempotent:
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
    clang llvm libbpf-dev linux-libc-dev)
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
    apt-get install -y --no-install-recommends "${missing[@]}"
fi

# promtool comes only with the prometheus package, whose maintainer scripts start and enable a
# Prometheus server (port 9090) that would stay running. A policy-rc.d answering 101 ("action
# forbidden") for just this install keeps invoke-rc.d / deb-systemd-invoke from starting it (one
# that exists already, e.g. a container's, is left as it is), and its unit is disabled so it
# does not start at boot either.
if ! installed prometheus; then
    policy=/usr/sbin/policy-rc.d
    ours=false
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\n# dva install-deps: no service starts during this install\nexit 101\n' >"$policy"
        chmod 0755 "$policy"
        ours=true
    fi
    status=0
    apt-get install -y --no-install-recommends prometheus || status=$?
    if $ours; then
        rm -f "$policy"
    fi
    [ "$status" -eq 0 ] || exit "$status"
    # Works without a running systemd too (it only removes the symlink the install made).
    if command -v systemctl >/dev/null 2>&1; then
        systemctl disable prometheus.service >/dev/null 2>&1 || true
    fi
fi

# The lab runs its own nginx processes, one per server namespace; a system nginx would hold
# port 80 in the root namespace for nothing (and start again at boot).
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl disable --now nginx.service >/dev/null 2>&1 || true
    systemctl disable --now iperf3.service >/dev/null 2>&1 || true
    # The benchmark starts its own HAProxy with its own config.
    systemctl disable --now haproxy.service >/dev/null 2>&1 || true
elif [ -x /etc/init.d/nginx ]; then
    /etc/init.d/nginx stop >/dev/null 2>&1 || true
fi
if [ -s /run/nginx.pid ] && kill -0 "$(cat /run/nginx.pid)" 2>/dev/null; then
    kill -QUIT "$(cat /run/nginx.pid)" || true
fi

for tool in ip ss ethtool nginx iperf3 curl ping sysctl clang promtool; do
    command -v "$tool" >/dev/null 2>&1 || {
        echo "install-deps: $tool is still missing" >&2
        exit 1
    }
done
/usr/bin/python3 -c 'import scapy.all' 2>/dev/null || {
    echo "install-deps: scapy does not import under /usr/bin/python3" >&2
    exit 1
}
echo "install-deps: lab tools present (iproute2 ethtool nginx iperf3 curl iputils-ping procps wrk haproxy nftables clang llvm libbpf-dev python3-scapy prometheus/promtool)"
