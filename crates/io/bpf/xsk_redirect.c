// SPDX-License-Identifier: GPL-2.0 OR MIT
//
// dva's XDP program for the AF_XDP driver (crates/io/src/af_xdp.rs): hand every frame that
// arrives on a queue to the AF_XDP socket bound to that queue. Everything goes, ARP and IPv6
// neighbour discovery included, because the dispatcher answers those itself and the kernel
// stack on an appliance interface has nothing to do.
//
// If no socket is registered for the queue yet (between attach and the map update, or on a
// queue the driver did not bind), the frame goes to the kernel stack (XDP_PASS) instead of
// being dropped.
//
// The loader creates the XSKMAP itself and patches the map reference of this program to it,
// so the map definition below is only what the relocation points at; its BTF is not used.

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, __u32);
} xsks_map SEC(".maps");

SEC("xdp")
int xsk_redirect(struct xdp_md *ctx)
{
	return bpf_redirect_map(&xsks_map, ctx->rx_queue_index, XDP_PASS);
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
