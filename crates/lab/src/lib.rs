//! dva-lab: the network-namespace lab every dva test, the demo and every benchmark run in, and
//! the real apps (nginx, iperf3, curl, ping) run inside it.
//!
//! Contract of this layer:
//! - [`Lab::up`] builds one fixed topology, named by a prefix `P` (default [`DEFAULT_PREFIX`]):
//!   namespaces `{P}client`, `{P}server1..N`, `{P}disp1` (the dispatcher host),
//!   `{P}host1..M` (data-plane hosts) and `{P}fabric`, whose Linux bridges `br-out`
//!   (outside), `br-in` (inside) and `br-bp` (backplane) join them through veth pairs.
//!   Addresses come from 198.18.0.0/15 and 2001:db8::/32 ([`Lab::client_addr`] and friends);
//!   nothing routes out of the lab, and every veth pair is created with both ends already in
//!   their namespaces, so the root namespace never sees a lab interface and labs with
//!   different prefixes coexist. [`Lab::describe`] prints the whole plan.
//! - The dispatcher host's kernel never answers for the appliance: `out0` and `in0` in
//!   `{P}disp1` carry no address and have IPv6 disabled; the appliance's dispatcher owns
//!   198.18.1.1 / 198.18.2.1 through AF_XDP or AF_PACKET. IPv4 forwarding is off in every namespace
//!   unless [`Lab::set_kernel_router`] turns `{P}disp1` into a plain router (the benchmark
//!   baseline).
//! - Offloads: TSO, GSO, GRO and TX checksumming are off on every veth end, both sides, so
//!   that every path under comparison (dva's drivers, the kernel's forwarding) moves
//!   wire-sized frames with complete checksums. [`Lab::set_offloads`] turns them on, as a
//!   Linux host runs: 64 KB super-packets and partial checksums, which dva handles too (see
//!   the README's section on offloads). RX checksum offload stays on: it only marks checksums
//!   the kernel verified. MTU is 1500 on the outside and inside segments and 9000 on the
//!   backplane, where GENEVE adds ~60 bytes to every full-size frame.
//! - Everything is done by running iproute2 (`ip`), `ethtool`, `sysctl` (inside the
//!   namespace: `/proc/sys/net` shows the namespace of its reader) and procps' `kill` as
//!   subprocesses, so every step can be replayed by hand. A missing tool is an error naming
//!   the Debian package to install; a failed command is an error with its command line,
//!   exit code and stderr. `up` is idempotent and leaves nothing behind when it fails;
//!   `down` kills whatever still runs in the lab so its namespaces really go away.
//! - With [`LabSpec::control`], a control host `{P}ctl` joins the backplane (198.19.0.10), and
//!   [`machines`] makes the appliance hosts machines of their own: `dva serve` on `{P}ctl`, an
//!   agent on each host, each with a private filesystem. [`Lab::set_cut`] partitions any host
//!   by taking its links down at the fabric.
//! - [`apps`] starts servers as guards (dropping one kills it and removes its temp files),
//!   waits for readiness by polling with a deadline (never a fixed sleep), and runs
//!   clients with a bound on their run time.
//!
//! Root is required (namespaces, veth, bridges).
#![forbid(unsafe_code)]

pub mod apps;
mod cmd;
mod error;
pub mod machines;
mod placement;
mod topology;

use std::net::Ipv4Addr;
use std::process::Command;

pub use error::LabError;
pub use placement::LabHosts;
pub use topology::process_alive;

/// The prefix of the default lab's namespaces (`dva-client`, ...).
pub const DEFAULT_PREFIX: &str = "dva-";

/// The lab to build: its namespace prefix, its number of servers and of data-plane hosts.
#[derive(Debug, Clone)]
pub struct LabSpec {
    pub prefix: String,
    pub servers: usize,
    pub hosts: usize,
    /// Dispatcher hosts. With more than one, the lab gets an upstream router on each side
    /// (`{P}rtr-out`, `{P}rtr-in`, owning the hosts' gateways) spreading flows over the
    /// dispatchers by ECMP, each dispatcher on its own transit links.
    pub dispatchers: usize,
    /// A control host `{P}ctl` on the backplane (198.19.0.10), where `dva lab up --machines`
    /// runs the management tool ([`machines`]). Off: the lab is exactly as it always was.
    pub control: bool,
}

impl Default for LabSpec {
    fn default() -> Self {
        LabSpec {
            prefix: DEFAULT_PREFIX.to_string(),
            servers: 3,
            hosts: 2,
            dispatchers: 1,
            control: false,
        }
    }
}

/// A lab that exists: every name and address in it follows from these three values.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Lab {
    pub prefix: String,
    pub servers: usize,
    pub hosts: usize,
    pub dispatchers: usize,
    /// Whether it has the control host `{P}ctl` ([`LabSpec::control`]).
    pub control: bool,
}

impl Lab {
    /// Build the topology. Idempotent: if a lab with this prefix exists with the same shape
    /// (and matches its plan), return it, with kernel-router mode turned off; if it exists with
    /// another shape, or half-built, tear it down and rebuild. On any failure, removes what it
    /// created and returns the error.
    pub fn up(spec: &LabSpec) -> Result<Lab, LabError> {
        topology::up(spec)
    }

    /// Remove every namespace of the prefix (and so every link), after SIGKILLing the
    /// processes still running in them. Idempotent.
    pub fn down(prefix: &str) -> Result<(), LabError> {
        topology::down(prefix)
    }

    /// The lab with this prefix if its namespaces exist (its shape read from which
    /// `{P}serverK` and `{P}hostM` namespaces exist, counting from 1).
    pub fn discover(prefix: &str) -> Result<Option<Lab>, LabError> {
        topology::discover(prefix)
    }

    pub fn client_ns(&self) -> String {
        format!("{}client", self.prefix)
    }

    /// Server `k`, 1-based.
    pub fn server_ns(&self, k: usize) -> String {
        format!("{}server{k}", self.prefix)
    }

    pub fn fabric_ns(&self) -> String {
        format!("{}fabric", self.prefix)
    }

    /// Dispatcher host `d` (the lab has one: d = 1).
    pub fn dispatcher_ns(&self, d: usize) -> String {
        format!("{}disp{d}", self.prefix)
    }

    /// The upstream router on the outside (`true`) or inside: labs with several dispatchers.
    pub fn router_ns(&self, outside: bool) -> String {
        format!("{}rtr-{}", self.prefix, if outside { "out" } else { "in" })
    }

    /// The routers' address on every transit link (several-dispatcher labs).
    pub fn router_transit_addr(outside: bool) -> Ipv4Addr {
        if outside {
            Ipv4Addr::new(198, 18, 3, 254)
        } else {
            Ipv4Addr::new(198, 18, 4, 254)
        }
    }

    /// The dispatchers' (shared) address on their transit links (several-dispatcher labs).
    pub fn dispatcher_transit_addr(outside: bool) -> Ipv4Addr {
        if outside {
            Ipv4Addr::new(198, 18, 3, 1)
        } else {
            Ipv4Addr::new(198, 18, 4, 1)
        }
    }

    /// Spread traffic over these dispatcher hosts only (1-based): a dispatcher that died is
    /// withdrawn from the upstream routers' ECMP routes, and put back once replaced.
    pub fn set_ecmp(&self, dispatchers: &[usize]) -> Result<(), LabError> {
        topology::ecmp(&topology::Tools::find()?, self, dispatchers)
    }

    /// The control host (labs built with [`LabSpec::control`]).
    pub fn ctl_ns(&self) -> String {
        format!("{}ctl", self.prefix)
    }

    /// 198.19.0.10: below the data-plane hosts (198.19.0.(10+m), m >= 1) and above the
    /// dispatcher hosts (198.19.0.d, d <= 8), so no shape of lab can collide with it.
    pub fn ctl_backplane_addr() -> Ipv4Addr {
        Ipv4Addr::new(198, 19, 0, 10)
    }

    /// The lab's host namespace `name` (with or without the prefix: `host1` or `dva-host1`),
    /// as `dva lab cut` and `dva lab heal` take it; an error listing the lab's hosts otherwise.
    pub fn host_named(&self, name: &str) -> Result<String, LabError> {
        topology::host_named(self, name)
    }

    /// Cut every link of host namespace `ns` (its veth ends in the fabric go down: the host
    /// hears nothing and is heard by no one, its processes run on), or heal them. Idempotent.
    pub fn set_cut(&self, ns: &str, cut: bool) -> Result<(), LabError> {
        topology::set_cut(&topology::Tools::find()?, self, ns, cut)
    }

    /// The host namespaces with a link cut (by [`Lab::set_cut`] or by hand).
    pub fn cut_hosts(&self) -> Result<Vec<String>, LabError> {
        topology::cut_hosts(&topology::Tools::find()?, self)
    }

    /// Data-plane host `m`, m = 1..=hosts.
    pub fn host_ns(&self, m: usize) -> String {
        format!("{}host{m}", self.prefix)
    }

    /// Every namespace of this lab, the fabric first.
    pub fn namespaces(&self) -> Vec<String> {
        topology::Plan::new(self).namespaces
    }

    /// 198.18.1.2
    pub fn client_addr() -> Ipv4Addr {
        Ipv4Addr::new(198, 18, 1, 2)
    }

    /// 198.18.2.(k+1). `k` wraps past 254 (the lab allows at most 253 servers).
    pub fn server_addr(k: usize) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, 2, ((k + 1) % 256) as u8)
    }

    /// 198.18.1.1: the appliance's (or the kernel router's) outside address.
    pub fn outside_gateway() -> Ipv4Addr {
        Ipv4Addr::new(198, 18, 1, 1)
    }

    /// 198.18.2.1: the appliance's (or the kernel router's) inside address.
    pub fn inside_gateway() -> Ipv4Addr {
        Ipv4Addr::new(198, 18, 2, 1)
    }

    /// 198.19.0.d
    pub fn dispatcher_backplane_addr(d: usize) -> Ipv4Addr {
        Ipv4Addr::new(198, 19, 0, (d % 256) as u8)
    }

    /// 198.19.0.(10+m). `m` wraps past 245 (the lab allows at most 244 hosts).
    pub fn host_backplane_addr(m: usize) -> Ipv4Addr {
        Ipv4Addr::new(198, 19, 0, ((10 + m) % 256) as u8)
    }

    /// Human table of namespaces, interfaces and addresses (what `dva lab show` prints).
    pub fn describe(&self) -> String {
        topology::describe(self)
    }

    /// Baseline for benchmarks: make `{P}disp1` a plain kernel router (198.18.1.1/24 on out0,
    /// 198.18.2.1/24 on in0, ip_forward=1), or undo it (remove the addresses, ip_forward=0,
    /// flush the neighbour caches of the dispatcher host, the client and the servers, so they
    /// re-learn the gateway's MAC from whatever answers next). Both directions are idempotent.
    pub fn set_kernel_router(&self, on: bool) -> Result<(), LabError> {
        topology::kernel_router(&topology::Tools::find()?, self, on)
    }

    /// Turn the segmentation and checksum offloads (TSO, GSO, GRO, TX checksumming) on or off
    /// on every veth of the outside, inside and transit segments, both ends. Off is how
    /// [`Lab::up`] leaves them (see the crate doc); on is how a Linux host runs by default:
    /// TCP crosses the lab as 64 KB super-packets with partial checksums, which the kernel
    /// router forwards whole and dva's dispatcher reads whole through AF_PACKET's virtio-net
    /// header. AF_XDP dispatchers get wire-sized frames (XDP on a veth turns the peer's
    /// segmentation off) with checksums they verify and complete.
    pub fn set_offloads(&self, on: bool) -> Result<(), LabError> {
        topology::offloads(&topology::Tools::find()?, self, on)
    }

    /// Give the dispatchers' appliance-facing veths (`out0`, `in0`) `n` receive and transmit
    /// queues each, both ends (1 is how [`Lab::up`] makes them; a veth has at most as many as
    /// the machine has CPUs): an AF_XDP dispatcher with `dispatcher_threads: n` then gives each
    /// of its lanes a queue, flows spread over them as by a NIC's RSS.
    pub fn set_queues(&self, n: u32) -> Result<(), LabError> {
        topology::queues(&topology::Tools::find()?, self, n)
    }
}

/// `ip netns exec NS <program>` as a Command, for running clients and servers inside a
/// namespace; add the program's arguments with `.arg`/`.args`.
pub fn netns_command(ns: &str, program: &str) -> Command {
    let mut c = Command::new(cmd::ip_program());
    c.args(["netns", "exec", ns, program]);
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_addresses() {
        let lab = Lab {
            prefix: "dva-".into(),
            servers: 3,
            hosts: 2,
            dispatchers: 1,
            control: false,
        };
        assert_eq!(lab.client_ns(), "dva-client");
        assert_eq!(lab.server_ns(2), "dva-server2");
        assert_eq!(lab.fabric_ns(), "dva-fabric");
        assert_eq!(lab.dispatcher_ns(1), "dva-disp1");
        assert_eq!(lab.host_ns(2), "dva-host2");
        assert_eq!(Lab::client_addr().to_string(), "198.18.1.2");
        assert_eq!(Lab::server_addr(1).to_string(), "198.18.2.2");
        assert_eq!(Lab::server_addr(253).to_string(), "198.18.2.254");
        assert_eq!(Lab::outside_gateway().to_string(), "198.18.1.1");
        assert_eq!(Lab::inside_gateway().to_string(), "198.18.2.1");
        assert_eq!(Lab::dispatcher_backplane_addr(1).to_string(), "198.19.0.1");
        assert_eq!(Lab::host_backplane_addr(2).to_string(), "198.19.0.12");
        assert_eq!(lab.namespaces().len(), 8);
        let with_ctl = Lab {
            control: true,
            ..lab.clone()
        };
        assert_eq!(with_ctl.namespaces().len(), 9);
        assert_eq!(with_ctl.ctl_ns(), "dva-ctl");
        let d = LabSpec::default();
        assert_eq!(
            (d.prefix.as_str(), d.servers, d.hosts),
            (DEFAULT_PREFIX, 3, 2)
        );
    }

    #[test]
    fn netns_command_wraps_the_program() {
        let mut c = netns_command("dva-client", "curl");
        c.arg("-V");
        let args: Vec<_> = c
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(args, ["netns", "exec", "dva-client", "curl", "-V"]);
    }
}
