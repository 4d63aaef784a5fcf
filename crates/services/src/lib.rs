//! dva-services: the network services a data plane applies to the packets of the flows it owns.
//!
//! Contract of this layer:
//! - Sans-IO and wire-agnostic: the caller parses packets (with `dva-wire`) and hands each stage a
//!   small plain struct of the fields it needs ([`firewall::PacketInfo`]) or, for the translating
//!   stages ([`nat`], [`lb`]), the IP packet itself to rewrite in place; a stage returns a verdict
//!   and never touches a socket or a clock. Every time-dependent call takes
//!   `now: u64`, nanoseconds on a monotonic clock the caller owns, so tests drive time by hand.
//! - A stage instance belongs to one data-path thread (`&mut self`, no locks); configuration arrives
//!   as whole snapshots (`set_rules`) that leave per-flow state in place, as nftables does.
//! - Malformed or hostile input yields a verdict and a counted drop, never a panic, and per-packet
//!   work is bounded: O(1) amortized conntrack operations, expiry done in caller-sized slices.
//!
//! Modules: [`conntrack`] (connection tracking, TCP state machine, timeouts, reusable by NAT and LB)
//! and [`firewall`] (ordered rules over conntrack: `ct state established,related accept`, then the
//! rules, then the default policy).
//!
//! [`nat`]: SNAT/masquerade, DNAT/port forwarding and full NAT; unlike the firewall it rewrites the
//! packet bytes in place (incremental checksums), allocating translated ports in the flow's bucket.
//!
//! [`lb`]: L4 load balancer, VIPs to weighted backends by Maglev lookup, full NAT, backend drain.
//!
//! [`icmp`]: what each ICMP / ICMPv6 type means to connection tracking (request, reply, error).
//! Per-flow tables use a per-table keyed hasher (flow keys come from the network) and storage
//! that grows without stopping the data path.
#![forbid(unsafe_code)]

pub mod conntrack;
pub mod firewall;
mod hash;
pub mod icmp;
mod index;
pub mod lb;
pub mod nat;
pub mod ratelimit;
pub mod stage;
