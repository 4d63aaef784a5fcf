//! dva-services: the network services a data plane applies to the packets of the flows it owns.
//!
//! Contract of this layer:
//! - One interface, [`stage::Stage`]: the caller parses a packet once into a descriptor
//!   ([`stage::Packet`], with the fields the firewall reads, [`firewall::PacketInfo`]) that every
//!   stage reads; the translating stages ([`nat`], [`lb`]) rewrite the IP packet in place and
//!   update the descriptor. A stage returns one [`stage::Verdict`] and never touches a socket or
//!   a clock, and owns its flow state's lifecycle (expiry, bucket export/import, replication). Every time-dependent call takes
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
//! [`ratelimit`]: per-source new-connection rate limiting (token buckets), a stage written
//! against [`stage::Stage`] alone.
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
