//! The compute unit runtime: one OS process, generic until configured into a role.
//!
//! Roles:
//! * [`dispatcher`] owns the appliance's interfaces (AF_XDP where the XDP program attaches,
//!   AF_PACKET on veths carrying super-packets and where AF_XDP does not attach), answers ARP
//!   and neighbour discovery for the appliance's addresses, drops what fails its hygiene checks, reassembles fragments, hashes each packet to a flow
//!   bucket and sends it over the GENEVE backplane to the bucket's data plane; packets coming
//!   back from data planes are routed and transmitted. It also runs the load balancer's health
//!   checks. It keeps no per-flow state.
//! * [`dataplane`] runs the service chain (firewall, NAT, load balancer, in the order the
//!   config gives) on the packets of the flows it owns, punting packets it has no state for to
//!   the bucket's previous owners, copying connection state to backups and taking over or
//!   giving away buckets' flows in a [`handover`].
//! * [`manager`] holds the appliance's desired state from the management tool, owns the bucket
//!   table, compiles one config per unit and pushes it over each unit's [`channel`] (TCP with
//!   mutual [`tls`]), tracking ACK/NACK.
//!
//! Around them: [`runtime`] (the `dva unit` process: namespace, control socket, role),
//! [`classify`] (one packet's flow key, flags and ICMP details), [`reply`] (packets a unit
//! originates), [`offload`] (super-packets and partial checksums), [`control`] (the local
//! control socket: readiness, JSON [`stats`], Prometheus [`metrics`], and [`inspect`]ion: flow
//! listings, config dumps, capture, and the [`monitor`] stream of flow and drop events).
//!
//! Data-path loops are single-threaded, never block on the control side (stats are published with
//! `try_lock`), and count every drop by reason. `unsafe` here is limited to process and CPU
//! syscalls (prctl, sched_setaffinity, flock, sysconf, getrlimit), each with a `// SAFETY:`
//! comment; packet I/O is `dva-io`'s.

#[cfg(any(test, feature = "bench"))]
#[doc(hidden)]
pub mod bench;
pub mod chain;
pub mod channel;
pub mod classify;
/// The role cores wired together in memory: conformance cases as data, and the fuzz target.
#[cfg(any(test, feature = "bench"))]
#[doc(hidden)]
pub mod conformance;
pub mod control;
pub mod dataplane;
pub mod dispatcher;
pub mod handover;
pub mod inspect;
mod keys;
pub mod lanes;
pub mod manager;
pub mod metrics;
pub mod monitor;
pub mod offload;
pub mod reply;
pub mod runtime;
pub mod stats;
pub mod tls;

pub use runtime::{run_unit, Role, UnitArgs};
pub use stats::UnitStats;
