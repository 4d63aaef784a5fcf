//! Compiled per-role configuration: what each unit needs of the spec, and nothing more.
//!
//! A dispatcher never sees firewall rules; a data plane never sees device names it does not drive.
//! Every config carries the appliance's `version` so units can ACK/NACK exactly what they got.

use std::net::{IpAddr, SocketAddr};

use dva_flow::{BucketTable, UnitId};
use dva_services::firewall::{Action, PortRange, Rule, RuleSet};
use dva_services::lb::{Backend, BackendState, LbConfig, VirtualService};
use dva_services::nat::{DnatRule, NatConfig, SnatRule};
use dva_wire::ip_proto;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::spec::{ActionSpec, ApplianceSpec, DriverSpec, ServiceSpec, SpecError, TcpWindowSpec};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceConfig {
    /// Index carried in the backplane header (`ingress_if`) and matched by rules.
    pub id: u8,
    pub name: String,
    pub device: String,
    pub addresses: Vec<IpNet>,
}

impl InterfaceConfig {
    /// The interface's first address of the given family (the source of ICMP errors it sends).
    pub fn address(&self, v4: bool) -> Option<IpAddr> {
        self.addresses
            .iter()
            .map(|a| a.addr())
            .find(|a| a.is_ipv4() == v4)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteConfig {
    pub to: IpNet,
    pub via: IpAddr,
    pub interface: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitEndpoint {
    pub id: UnitId,
    /// Backplane (GENEVE/UDP) address.
    pub addr: SocketAddr,
}

/// The backplane address of lane `i` of a unit listening at `addr`: the port + i (`None` past
/// the last port). Lane 0 is the unit's own address.
pub fn lane_addr(addr: SocketAddr, i: u16) -> Option<SocketAddr> {
    addr.port()
        .checked_add(i)
        .map(|p| SocketAddr::new(addr.ip(), p))
}

/// Whether `from` is one of the `lanes` backplane addresses of a unit listening at `addr`.
pub fn is_lane_of(addr: SocketAddr, lanes: u16, from: SocketAddr) -> bool {
    from.ip() == addr.ip()
        && from
            .port()
            .checked_sub(addr.port())
            .is_some_and(|i| i < lanes.max(1))
}

/// An address the appliance answers for besides its interfaces' own (a VIP, a NAT pool address),
/// and how the dispatcher picks the bucket of packets sent to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceAddr {
    /// The interface it lives on (ARP/ND are answered there).
    pub interface: u8,
    pub addr: IpAddr,
    /// A NAT/LB source address: replies to it carry a port the data plane chose so that its
    /// bucket is `port & (buckets - 1)` (DESIGN.md §3). Otherwise (a VIP) the usual flow hash.
    pub nat_source: bool,
}

/// Packets from a port-forwarding target are hashed as the outside saw the flow (the public
/// address and port), so both directions of the flow land in one bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnatReverse {
    pub proto: u8,
    pub inside: IpAddr,
    pub inside_first: u16,
    pub inside_last: u16,
    pub public: IpAddr,
    pub public_first: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthKind {
    Tcp,
    Http,
}

/// An active health check the dispatcher runs against a load-balancer backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheckConfig {
    pub service: String,
    pub backend: String,
    pub addr: IpAddr,
    pub port: u16,
    /// Our address on the backend's network (the probes' source).
    pub source: IpAddr,
    pub kind: HealthKind,
    pub path: String,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub rise: u32,
    pub fall: u32,
}

/// How a unit runs its data path (the spec's `runtime`). A unit sets it up with its first config
/// (interfaces opened with the driver, sockets' busy polling, rings, the thread pinned) and
/// cannot redo that under traffic, so a later config that changes it is refused (NACK, see
/// [`RuntimeConfig::unchanged`]) and the unit keeps serving as it was: a restarted or new unit
/// takes the new values. A data plane opens no interface: its driver and busy polling stay at
/// their defaults, so changing them never makes a data plane refuse a config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeConfig {
    pub driver: DriverSpec,
    /// AF_XDP busy polling per socket, microseconds; 0: off.
    pub busy_poll_us: u32,
    /// Shared-memory rings to the units on this machine; false: UDP only.
    pub rings: bool,
    /// The CPUs data paths are pinned to: unit N on the (N mod length)-th; empty: not pinned.
    pub cpus: Vec<usize>,
    /// A dispatcher's data-path threads (lanes); 1 for a data plane (see
    /// [`DataplaneConfig::dispatcher_lanes`]).
    #[serde(default = "one_lane")]
    pub dispatcher_threads: u16,
    /// A data plane's threads (lanes): lane i serves the buckets `b` with `b % n == i` at the
    /// data plane's port + i. Dispatchers send bucket `b` there and data planes address their
    /// peers' lanes the same way, so every unit of an appliance must agree on it.
    #[serde(default = "one_lane")]
    pub dataplane_threads: u16,
}

fn one_lane() -> u16 {
    1
}

fn is_one_lane(n: &u16) -> bool {
    *n == 1
}

impl Default for RuntimeConfig {
    /// What a spec without `runtime` asks for.
    fn default() -> Self {
        RuntimeConfig {
            driver: DriverSpec::Auto,
            busy_poll_us: 0,
            rings: true,
            cpus: Vec::new(),
            dispatcher_threads: 1,
            dataplane_threads: 1,
        }
    }
}

impl RuntimeConfig {
    /// What the spec's `runtime` asks a dispatcher for.
    pub fn from_spec(rt: &crate::spec::RuntimeSpec) -> RuntimeConfig {
        RuntimeConfig {
            driver: rt.driver,
            busy_poll_us: rt.busy_poll_us(),
            rings: rt.backplane.rings(),
            cpus: rt.cpus.as_ref().map(|c| c.0.clone()).unwrap_or_default(),
            dispatcher_threads: rt.dispatcher_threads.unwrap_or(1),
            dataplane_threads: rt.dataplane_threads.unwrap_or(1),
        }
    }

    /// `next` asks for nothing this unit would have to be restarted for (it runs with `self`).
    pub fn unchanged(&self, next: &RuntimeConfig) -> Result<(), String> {
        let cpus = |c: &[usize]| {
            if c.is_empty() {
                "none".to_string()
            } else {
                crate::spec::CpuList(c.to_vec()).to_string()
            }
        };
        let rings = |r: bool| if r { "rings" } else { "udp" };
        let change = if next.driver != self.driver {
            Some((
                "driver",
                self.driver.as_str().into(),
                next.driver.as_str().into(),
            ))
        } else if next.busy_poll_us != self.busy_poll_us {
            Some((
                "busy_poll",
                format!("{}us", self.busy_poll_us),
                format!("{}us", next.busy_poll_us),
            ))
        } else if next.rings != self.rings {
            Some((
                "backplane",
                rings(self.rings).into(),
                rings(next.rings).into(),
            ))
        } else if next.cpus != self.cpus {
            Some(("cpus", cpus(&self.cpus), cpus(&next.cpus)))
        } else if next.dispatcher_threads != self.dispatcher_threads {
            Some((
                "dispatcher_threads",
                self.dispatcher_threads.to_string(),
                next.dispatcher_threads.to_string(),
            ))
        } else if next.dataplane_threads != self.dataplane_threads {
            Some((
                "dataplane_threads",
                self.dataplane_threads.to_string(),
                next.dataplane_threads.to_string(),
            ))
        } else {
            None
        };
        match change {
            Some((field, now, asked)) => Err(format!(
                "spec.runtime.{field} changes need the unit restarted (it runs with {now}, \
                 the new config asks for {asked})"
            )),
            None => Ok(()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DispatcherConfig {
    pub appliance: String,
    pub version: u64,
    pub vni: u32,
    pub unit: UnitId,
    pub listen: SocketAddr,
    pub interfaces: Vec<InterfaceConfig>,
    pub routes: Vec<RouteConfig>,
    pub dataplanes: Vec<UnitEndpoint>,
    pub table: BucketTable,
    /// Data planes the manager took out of the table because they fell silent (their machine
    /// or its link may be gone, or only their path to the manager): their buckets went to
    /// their backups, so nothing they send may leave the appliance any more, until they have
    /// taken the config that failed them over (rejoined). The fencing of a partitioned unit at
    /// the one place its output could go.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fenced: Vec<UnitId>,
    #[serde(default)]
    pub service_addrs: Vec<ServiceAddr>,
    #[serde(default)]
    pub dnat_reverse: Vec<DnatReverse>,
    #[serde(default)]
    pub health_checks: Vec<HealthCheckConfig>,
    #[serde(default)]
    pub runtime: RuntimeConfig,
    /// Keys that authenticate the backplane (the manager adds them after compiling).
    #[serde(default)]
    pub backplane: BackplaneAuth,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataplaneConfig {
    pub appliance: String,
    pub version: u64,
    pub vni: u32,
    pub unit: UnitId,
    pub listen: SocketAddr,
    pub dispatchers: Vec<UnitEndpoint>,
    /// Data-path threads of each dispatcher: lane i sends from (and takes back packets at) the
    /// dispatcher's address with port + i, and on this machine has a ring of its own.
    #[serde(default = "one_lane", skip_serializing_if = "is_one_lane")]
    pub dispatcher_lanes: u16,
    /// Every data plane of the appliance (itself included): punt targets.
    pub peers: Vec<UnitEndpoint>,
    pub table: BucketTable,
    pub interfaces: Vec<InterfaceConfig>,
    pub firewall: RuleSet,
    pub max_connections: usize,
    /// Accept TCP segments outside their connection's window (the spec's `tcp_window: liberal`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tcp_liberal: bool,
    /// Hand the state of every flow still held to the owners of their buckets, then hold none
    /// (a draining data plane past its drain deadline).
    #[serde(default)]
    pub export: bool,
    /// Per bucket, the data plane that gets a copy of this bucket's flow state (and takes the
    /// bucket over if its owner dies); 0: none. Empty: no replication.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backups: Vec<UnitId>,
    /// The service chain in spec order (the firewall first when the spec has none: it still
    /// tracks connections). Replies of a translated flow go through it backwards.
    #[serde(default = "firewall_only")]
    pub chain: Vec<Stage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat: Option<NatConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lb: Option<LbConfig>,
    /// Load-balancer backends not `up`: drained by the spec, or down by the dispatchers' health
    /// checks (the manager merges those in).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backend_states: Vec<BackendStateConfig>,
    #[serde(default)]
    pub runtime: RuntimeConfig,
    /// Keys that authenticate the backplane (the manager adds them after compiling).
    #[serde(default)]
    pub backplane: BackplaneAuth,
}

/// The appliance's backplane keys as a unit holds them: the previous, current and next epochs'
/// (so units that take a rotation a moment apart still understand each other), and the epoch
/// to seal with. Created and rotated by the manager; travels only on the unit channel.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackplaneAuth {
    pub send_epoch: u32,
    pub keys: Vec<BackplaneKey>,
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackplaneKey {
    pub epoch: u32,
    /// 32 bytes, hex.
    #[serde(with = "hex32")]
    pub key: [u8; 32],
}

// Keys stay out of every log line and error message that prints a config.
impl std::fmt::Debug for BackplaneAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackplaneAuth")
            .field("send_epoch", &self.send_epoch)
            .field(
                "epochs",
                &self.keys.iter().map(|k| k.epoch).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl std::fmt::Debug for BackplaneKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "BackplaneKey {{ epoch: {}, key: <redacted> }}",
            self.epoch
        )
    }
}

impl BackplaneAuth {
    /// A config a unit can serve with: the send epoch's key is among the keys.
    pub fn check(&self) -> Result<(), String> {
        if self.keys.iter().any(|k| k.epoch == self.send_epoch) {
            Ok(())
        } else {
            Err(format!(
                "backplane keys: none for the send epoch {} (the config carries epochs {:?})",
                self.send_epoch,
                self.keys.iter().map(|k| k.epoch).collect::<Vec<_>>()
            ))
        }
    }
}

mod hex32 {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(k: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        let mut out = String::with_capacity(64);
        for b in k {
            out.push_str(&format!("{b:02x}"));
        }
        s.serialize_str(&out)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let text = String::deserialize(d)?;
        let bytes = text.as_bytes();
        if bytes.len() != 64 {
            return Err(D::Error::custom("a backplane key is 64 hex digits"));
        }
        let mut k = [0u8; 32];
        for (i, pair) in bytes.chunks(2).enumerate() {
            let digits = std::str::from_utf8(pair).map_err(D::Error::custom)?;
            k[i] = u8::from_str_radix(digits, 16)
                .map_err(|_| D::Error::custom("a backplane key is 64 hex digits"))?;
        }
        Ok(k)
    }
}

/// A stage of the data planes' chain. Firewall, NAT and LB configs are the role config's
/// `firewall`, `nat` and `lb` (shared with the dispatchers and the manager); a stage nobody else
/// reads carries its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Firewall,
    Nat,
    Lb,
    Ratelimit(dva_services::ratelimit::RateLimitConfig),
}

fn firewall_only() -> Vec<Stage> {
    vec![Stage::Firewall]
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BackendStateConfig {
    pub service: String,
    pub backend: String,
    pub state: BackendState,
}

/// Ports the data planes allocate for NAT and full-NAT sources by default: below the dispatchers'
/// health-check probe ports (65000-65535), which must never look like a translated flow's.
pub const NAT_PORTS: PortRange = PortRange {
    first: 1024,
    last: 64_999,
};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "lowercase")]
pub enum RoleConfig {
    Dispatcher(DispatcherConfig),
    Dataplane(DataplaneConfig),
}

impl RoleConfig {
    pub fn version(&self) -> u64 {
        match self {
            RoleConfig::Dispatcher(c) => c.version,
            RoleConfig::Dataplane(c) => c.version,
        }
    }
    pub fn unit(&self) -> UnitId {
        match self {
            RoleConfig::Dispatcher(c) => c.unit,
            RoleConfig::Dataplane(c) => c.unit,
        }
    }

    pub fn runtime(&self) -> &RuntimeConfig {
        match self {
            RoleConfig::Dispatcher(c) => &c.runtime,
            RoleConfig::Dataplane(c) => &c.runtime,
        }
    }

    /// The config as JSON for people to read (`dva config`): the same shape as on the unit
    /// channel, but every backplane key is replaced by [`REDACTED`] (the epochs stay). The
    /// derived `Serialize` must keep the keys (the manager sends them to units with it), so
    /// the dump redacts its own copy rather than changing how the config serialises.
    pub fn redacted_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(keys) = v
            .get_mut("backplane")
            .and_then(|b| b.get_mut("keys"))
            .and_then(|k| k.as_array_mut())
        {
            for k in keys {
                if let Some(key) = k.get_mut("key") {
                    *key = serde_json::Value::String(REDACTED.into());
                }
            }
        }
        v
    }
}

/// What stands for a secret in a config dump.
pub const REDACTED: &str = "<redacted>";

/// Where the units are and which buckets each data plane owns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Placement {
    pub dispatchers: Vec<UnitEndpoint>,
    pub dataplanes: Vec<UnitEndpoint>,
    pub table: BucketTable,
}

/// Default cap on tracked connections per data plane.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1 << 20;

/// Compile a validated spec into one config per unit of `placement`.
pub fn compile(
    spec: &ApplianceSpec,
    placement: &Placement,
    version: u64,
) -> Result<(Vec<DispatcherConfig>, Vec<DataplaneConfig>), SpecError> {
    spec.validate()?;
    let interfaces: Vec<InterfaceConfig> = spec
        .spec
        .interfaces
        .iter()
        .enumerate()
        .map(|(i, f)| InterfaceConfig {
            // validate() caps interfaces at 250, so the index fits.
            id: i as u8,
            name: f.name.clone(),
            device: f.device.clone(),
            addresses: f.addresses.iter().map(|c| c.0).collect(),
        })
        .collect();
    let routes = spec
        .spec
        .routes
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let ifc = interfaces
                .iter()
                .find(|f| f.addresses.iter().any(|a| a.contains(&r.via)))
                .ok_or_else(|| SpecError::Field {
                    path: format!("spec.routes[{i}].via"),
                    message: format!("next hop {} is on no interface", r.via),
                })?;
            Ok(RouteConfig {
                to: r.to.0.trunc(),
                via: r.via,
                interface: ifc.id,
            })
        })
        .collect::<Result<Vec<_>, SpecError>>()?;
    let (firewall, max_connections) = compile_firewall(spec, &interfaces)?;
    let edge = compile_edge(spec, &interfaces);
    let chain = compile_chain(spec);
    let nat = compile_nat(spec, &interfaces, &routes);
    let lb = compile_lb(spec, &interfaces);
    let backend_states = compile_backend_states(spec);
    let vni = spec.vni();
    let runtime = RuntimeConfig::from_spec(&spec.spec.runtime);
    // Interfaces are the dispatchers' alone (see RuntimeConfig).
    let dataplane_runtime = RuntimeConfig {
        driver: DriverSpec::Auto,
        busy_poll_us: 0,
        dispatcher_threads: 1,
        ..runtime.clone()
    };
    let dispatchers = placement
        .dispatchers
        .iter()
        .map(|d| DispatcherConfig {
            appliance: spec.name().to_string(),
            version,
            vni,
            unit: d.id,
            listen: d.addr,
            interfaces: interfaces.clone(),
            routes: routes.clone(),
            dataplanes: placement.dataplanes.clone(),
            table: placement.table.clone(),
            fenced: Vec::new(),
            service_addrs: edge.service_addrs.clone(),
            dnat_reverse: edge.dnat_reverse.clone(),
            health_checks: edge.health_checks.clone(),
            runtime: runtime.clone(),
            backplane: BackplaneAuth::default(),
        })
        .collect();
    let dataplanes = placement
        .dataplanes
        .iter()
        .map(|d| DataplaneConfig {
            appliance: spec.name().to_string(),
            version,
            vni,
            unit: d.id,
            listen: d.addr,
            dispatchers: placement.dispatchers.clone(),
            dispatcher_lanes: runtime.dispatcher_threads,
            peers: placement.dataplanes.clone(),
            table: placement.table.clone(),
            interfaces: interfaces.clone(),
            firewall: firewall.clone(),
            max_connections,
            tcp_liberal: spec
                .firewall()
                .is_some_and(|f| f.tcp_window == TcpWindowSpec::Liberal),
            export: false,
            backups: Vec::new(),
            chain: chain.clone(),
            nat: nat.clone(),
            lb: lb.clone(),
            backend_states: backend_states.clone(),
            runtime: dataplane_runtime.clone(),
            backplane: BackplaneAuth::default(),
        })
        .collect();
    Ok((dispatchers, dataplanes))
}

/// The chain in spec order, the firewall first (after admission stages) if the spec has none.
fn compile_chain(spec: &ApplianceSpec) -> Vec<Stage> {
    let mut chain: Vec<Stage> = spec
        .spec
        .services
        .iter()
        .map(|s| match s {
            ServiceSpec::Firewall(_) => Stage::Firewall,
            ServiceSpec::Nat(_) => Stage::Nat,
            ServiceSpec::Lb(_) => Stage::Lb,
            ServiceSpec::Ratelimit(r) => Stage::Ratelimit(r.compile()),
        })
        .collect();
    if !chain.contains(&Stage::Firewall) {
        // After the stages that only admit (validation keeps those first).
        let at = chain
            .iter()
            .take_while(|s| matches!(s, Stage::Ratelimit(_)))
            .count();
        chain.insert(at, Stage::Firewall);
    }
    chain
}

/// A spec port range capped below the probe ports.
fn nat_ports(p: Option<&crate::spec::PortList>) -> PortRange {
    let Some(r) = p.and_then(|l| l.0.first()) else {
        return NAT_PORTS;
    };
    PortRange {
        first: r.first,
        last: r.last.min(NAT_PORTS.last).max(r.first),
    }
}

/// Networks reached through interface `id`: its own subnets and the routes via it.
fn networks_via(interfaces: &[InterfaceConfig], routes: &[RouteConfig], id: u8) -> Vec<IpNet> {
    let mut nets: Vec<IpNet> = interfaces
        .iter()
        .filter(|f| f.id == id)
        .flat_map(|f| f.addresses.iter().map(|a| a.trunc()))
        .collect();
    nets.extend(routes.iter().filter(|r| r.interface == id).map(|r| r.to));
    nets
}

/// A spec's CIDR list as networks (host bits cleared); none given: any.
fn networks(list: Option<&crate::spec::CidrList>) -> Vec<IpNet> {
    list.map(|l| l.0.iter().map(|c| c.0.trunc()).collect())
        .unwrap_or_default()
}

fn compile_nat(
    spec: &ApplianceSpec,
    interfaces: &[InterfaceConfig],
    routes: &[RouteConfig],
) -> Option<NatConfig> {
    let nat = spec.nat()?;
    let mut cfg = NatConfig::default();
    if let Some(m) = nat.max_bindings {
        cfg.max_bindings = m;
    }
    for m in &nat.masquerade {
        let Some(ifc) = interfaces.iter().find(|f| f.name == m.to) else {
            continue;
        };
        cfg.snat.push(SnatRule {
            name: m.name.clone(),
            src: networks(m.src.as_ref()),
            dst: networks_via(interfaces, routes, ifc.id),
            proto: None,
            to: [true, false]
                .into_iter()
                .filter_map(|v4| ifc.address(v4))
                .collect(),
            ports: nat_ports(m.ports.as_ref()),
        });
    }
    for r in &nat.snat {
        cfg.snat.push(SnatRule {
            name: r.name.clone(),
            src: networks(r.src.as_ref()),
            dst: networks(r.dst.as_ref()),
            proto: r.proto.map(|p| p.0),
            to: r.to.clone(),
            ports: nat_ports(r.ports.as_ref()),
        });
    }
    for f in &nat.port_forward {
        let Some(ifc) = interfaces.iter().find(|i| i.name == f.from) else {
            continue;
        };
        let Some(public) = f.dst.or_else(|| ifc.address(f.to.is_ipv4())) else {
            continue;
        };
        let Some(range) = f.dport.0.first() else {
            continue;
        };
        cfg.dnat.push(DnatRule {
            name: f.name.clone(),
            ingress_if: Some(ifc.id),
            dst: public,
            proto: f.proto.0,
            dport: PortRange {
                first: range.first,
                last: range.last,
            },
            to_addr: f.to,
            to_port: f.to_port,
        });
    }
    Some(cfg)
}

fn compile_lb(spec: &ApplianceSpec, interfaces: &[InterfaceConfig]) -> Option<LbConfig> {
    let lb = spec.lb()?;
    let mut cfg = LbConfig::default();
    if let Some(m) = lb.max_flows {
        cfg.max_flows = m;
    }
    for v in &lb.services {
        cfg.services.push(VirtualService {
            name: v.name.clone(),
            vip: v.vip,
            proto: v.proto.0,
            port: v.port,
            backends: v
                .backends
                .iter()
                .map(|b| Backend {
                    name: b.name.clone(),
                    addr: b.addr,
                    port: b.port,
                    weight: b.weight,
                })
                .collect(),
            source: lb_source_address(interfaces, v).into_iter().collect(),
            ports: NAT_PORTS,
        });
    }
    Some(cfg)
}

/// Backends the spec drains.
fn compile_backend_states(spec: &ApplianceSpec) -> Vec<BackendStateConfig> {
    let Some(lb) = spec.lb() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for v in &lb.services {
        for b in &v.backends {
            if b.state == Some(crate::spec::BackendAdmin::Drain) {
                out.push(BackendStateConfig {
                    service: v.name.clone(),
                    backend: b.name.clone(),
                    state: BackendState::Draining,
                });
            }
        }
    }
    out
}

/// What the dispatchers need of the NAT and LB stages.
#[derive(Default)]
struct Edge {
    service_addrs: Vec<ServiceAddr>,
    dnat_reverse: Vec<DnatReverse>,
    health_checks: Vec<HealthCheckConfig>,
}

/// The interface (index) whose network holds `addr`.
fn interface_of(interfaces: &[InterfaceConfig], addr: IpAddr) -> Option<&InterfaceConfig> {
    interfaces
        .iter()
        .find(|f| f.addresses.iter().any(|a| a.contains(&addr)))
}

/// The NAT source address of a masquerade rule: the egress interface's first address of the
/// family. Validation made sure the interface exists and has one.
pub fn masquerade_address(interfaces: &[InterfaceConfig], to: &str, v4: bool) -> Option<IpAddr> {
    interfaces.iter().find(|f| f.name == to)?.address(v4)
}

/// The full-NAT source address of a virtual service.
pub fn lb_source_address(
    interfaces: &[InterfaceConfig],
    v: &crate::spec::VirtualServiceSpec,
) -> Option<IpAddr> {
    let v4 = v.vip.is_ipv4();
    match &v.source {
        Some(name) => interfaces.iter().find(|f| &f.name == name)?.address(v4),
        None => interface_of(interfaces, v.backends.first()?.addr)?.address(v4),
    }
}

fn compile_edge(spec: &ApplianceSpec, interfaces: &[InterfaceConfig]) -> Edge {
    let mut e = Edge::default();
    let add = |e: &mut Edge, addr: IpAddr, nat_source: bool| {
        if let Some(ifc) = interface_of(interfaces, addr) {
            if let Some(existing) = e.service_addrs.iter_mut().find(|a| a.addr == addr) {
                existing.nat_source |= nat_source;
            } else {
                e.service_addrs.push(ServiceAddr {
                    interface: ifc.id,
                    addr,
                    nat_source,
                });
            }
        }
    };
    if let Some(nat) = spec.nat() {
        for m in &nat.masquerade {
            for v4 in [true, false] {
                if let Some(a) = masquerade_address(interfaces, &m.to, v4) {
                    add(&mut e, a, true);
                }
            }
        }
        for r in &nat.snat {
            for a in &r.to {
                add(&mut e, *a, true);
            }
        }
        for f in &nat.port_forward {
            let Some(public) = f.dst.or_else(|| {
                interfaces
                    .iter()
                    .find(|i| i.name == f.from)
                    .and_then(|i| i.address(f.to.is_ipv4()))
            }) else {
                continue;
            };
            add(&mut e, public, false);
            let range = f.dport.0[0];
            let inside_first = f.to_port.unwrap_or(range.first);
            e.dnat_reverse.push(DnatReverse {
                proto: f.proto.0,
                inside: f.to,
                inside_first,
                inside_last: inside_first + (range.last - range.first),
                public,
                public_first: range.first,
            });
        }
    }
    if let Some(lb) = spec.lb() {
        for v in &lb.services {
            add(&mut e, v.vip, false);
            let Some(source) = lb_source_address(interfaces, v) else {
                continue;
            };
            add(&mut e, source, true);
            if let Some(h) = &v.health {
                for b in &v.backends {
                    e.health_checks.push(HealthCheckConfig {
                        service: v.name.clone(),
                        backend: b.name.clone(),
                        addr: b.addr,
                        port: b.port,
                        source,
                        kind: match h.kind {
                            crate::spec::HealthKind::Tcp => HealthKind::Tcp,
                            crate::spec::HealthKind::Http => HealthKind::Http,
                        },
                        path: h.path.clone().unwrap_or_else(|| "/".into()),
                        interval_ms: h.interval.ms(),
                        timeout_ms: h.timeout.ms(),
                        rise: h.rise,
                        fall: h.fall,
                    });
                }
            }
        }
    }
    e
}

fn compile_firewall(
    spec: &ApplianceSpec,
    interfaces: &[InterfaceConfig],
) -> Result<(RuleSet, usize), SpecError> {
    let Some(fw) = spec.firewall() else {
        // No firewall stage: forward everything (other stages may still act).
        return Ok((
            RuleSet {
                rules: Vec::new(),
                default_action: Action::Accept,
            },
            DEFAULT_MAX_CONNECTIONS,
        ));
    };
    let action = |a: ActionSpec| match a {
        ActionSpec::Accept => Action::Accept,
        ActionSpec::Drop => Action::Drop,
        ActionSpec::Reject => Action::Reject,
    };
    let svc = spec
        .spec
        .services
        .iter()
        .position(|s| matches!(s, ServiceSpec::Firewall(_)))
        .unwrap_or(0);
    let mut rules = Vec::with_capacity(fw.rules.len());
    for (i, r) in fw.rules.iter().enumerate() {
        let icmp_type = match &r.icmp_type {
            Some(t) => Some(
                t.resolve(r.proto.map(|p| p.0) == Some(ip_proto::ICMPV6))
                    .map_err(|m| SpecError::Field {
                        path: format!("spec.services[{svc}].firewall.rules[{i}].icmp_type"),
                        message: m,
                    })?,
            ),
            None => None,
        };
        let ports = |l: &Option<crate::spec::PortList>| -> Vec<PortRange> {
            l.iter()
                .flat_map(|l| l.0.iter())
                .map(|p| PortRange {
                    first: p.first,
                    last: p.last,
                })
                .collect()
        };
        let nets = |l: &Option<crate::spec::CidrList>| networks(l.as_ref());
        rules.push(Rule {
            name: r.name.clone(),
            ingress_if: r
                .from
                .as_ref()
                .and_then(|n| interfaces.iter().find(|f| &f.name == n))
                .map(|f| f.id),
            src: nets(&r.src),
            dst: nets(&r.dst),
            proto: r.proto.map(|p| p.0),
            src_ports: ports(&r.sport),
            dst_ports: ports(&r.dport),
            icmp_type,
            action: action(r.action),
        });
    }
    Ok((
        RuleSet {
            rules,
            default_action: action(fw.default),
        },
        fw.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_dumps_redact_backplane_keys() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../examples/edge-firewall.yaml"
        ))
        .unwrap();
        let spec = ApplianceSpec::from_yaml(&text).unwrap();
        let ep = |id: u32| UnitEndpoint {
            id,
            addr: SocketAddr::from(([198, 19, 0, 11], 6081)),
        };
        let placement = Placement {
            dispatchers: vec![ep(1)],
            dataplanes: vec![ep(11)],
            table: BucketTable::maglev(spec.spec.layout.buckets, &[11]).unwrap(),
        };
        let (mut d, mut p) = compile(&spec, &placement, 1).unwrap();
        let auth = BackplaneAuth {
            send_epoch: 4,
            keys: vec![
                BackplaneKey {
                    epoch: 4,
                    key: [0xab; 32],
                },
                BackplaneKey {
                    epoch: 5,
                    key: [0xcd; 32],
                },
            ],
        };
        d[0].backplane = auth.clone();
        p[0].backplane = auth;
        for cfg in [
            RoleConfig::Dispatcher(d.remove(0)),
            RoleConfig::Dataplane(p.remove(0)),
        ] {
            // The channel's serialisation keeps the keys; the dump does not.
            assert!(serde_json::to_string(&cfg).unwrap().contains("abababab"));
            let dump = cfg.redacted_json();
            let text = dump.to_string();
            assert!(!text.contains("abab") && !text.contains("cdcd"), "{text}");
            assert_eq!(dump["backplane"]["keys"][1]["epoch"], 5);
            assert_eq!(dump["backplane"]["keys"][0]["key"], REDACTED);
            assert_eq!(dump["backplane"]["send_epoch"], 4);
        }
    }

    #[test]
    fn a_runtime_change_is_refused_with_the_field_named() {
        let running = RuntimeConfig::default();
        assert_eq!(running.unchanged(&running.clone()), Ok(()));
        for (next, says) in [
            (
                RuntimeConfig {
                    driver: DriverSpec::AfPacket,
                    ..RuntimeConfig::default()
                },
                "spec.runtime.driver changes need the unit restarted (it runs with auto, the new config asks for af_packet)",
            ),
            (
                RuntimeConfig {
                    busy_poll_us: 50,
                    ..RuntimeConfig::default()
                },
                "spec.runtime.busy_poll changes need the unit restarted (it runs with 0us, the new config asks for 50us)",
            ),
            (
                RuntimeConfig {
                    rings: false,
                    ..RuntimeConfig::default()
                },
                "spec.runtime.backplane changes need the unit restarted (it runs with rings, the new config asks for udp)",
            ),
            (
                RuntimeConfig {
                    cpus: vec![0, 1, 2],
                    ..RuntimeConfig::default()
                },
                "spec.runtime.cpus changes need the unit restarted (it runs with none, the new config asks for 0-2)",
            ),
            (
                RuntimeConfig {
                    dispatcher_threads: 2,
                    ..RuntimeConfig::default()
                },
                "spec.runtime.dispatcher_threads changes need the unit restarted (it runs with 1, the new config asks for 2)",
            ),
            (
                RuntimeConfig {
                    dataplane_threads: 2,
                    ..RuntimeConfig::default()
                },
                "spec.runtime.dataplane_threads changes need the unit restarted (it runs with 1, the new config asks for 2)",
            ),
        ] {
            assert_eq!(running.unchanged(&next), Err(says.to_string()));
        }
    }

    #[test]
    fn compiles_edge_firewall() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../examples/edge-firewall.yaml"
        ))
        .unwrap();
        let spec = ApplianceSpec::from_yaml(&text).unwrap();
        let ep = |id: u32, port: u16| UnitEndpoint {
            id,
            addr: SocketAddr::from(([198, 19, 0, 11], port)),
        };
        let table = BucketTable::maglev(spec.spec.layout.buckets, &[11, 12]).unwrap();
        let placement = Placement {
            dispatchers: vec![ep(1, 6081)],
            dataplanes: vec![ep(11, 6081), ep(12, 6082)],
            table,
        };
        let (d, p) = compile(&spec, &placement, 7).unwrap();
        assert_eq!(d.len(), 1);
        assert_eq!(p.len(), 2);
        assert_eq!(d[0].interfaces[0].device, "out0");
        assert_eq!(p[1].unit, 12);
        assert_eq!(p[0].version, 7);
        let fw = &p[0].firewall;
        assert_eq!(fw.default_action, Action::Drop);
        assert!(fw.rules.iter().any(
            |r| r.proto == Some(6) && r.dst_ports.iter().any(|p| p.first <= 80 && 80 <= p.last)
        ));
        assert!(
            !p[0].tcp_liberal,
            "window tracking is strict unless the spec says so"
        );
        let ser = serde_json::to_string(&RoleConfig::Dataplane(p[0].clone())).unwrap();
        let back: RoleConfig = serde_json::from_str(&ser).unwrap();
        assert_eq!(back.unit(), 11);
        let liberal = ApplianceSpec::from_yaml(&text.replace(
            "default: drop",
            "default: drop\n        tcp_window: liberal",
        ))
        .unwrap();
        let (_, p) = compile(&liberal, &placement, 8).unwrap();
        assert!(p.iter().all(|d| d.tcp_liberal));
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;

    /// Every spec in examples/ parses, validates and compiles.
    #[test]
    fn examples_compile() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).expect("examples dir") {
            let path = entry.expect("entry").path();
            if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("read");
            let spec = ApplianceSpec::from_yaml(&text)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let ep = |id, port| UnitEndpoint {
                id,
                addr: SocketAddr::new(IpAddr::from([198, 19, 0, 1]), port),
            };
            let placement = Placement {
                dispatchers: vec![ep(1, 6081)],
                dataplanes: vec![ep(2, 6082)],
                table: BucketTable::maglev(spec.spec.layout.buckets, &[2]).expect("table"),
            };
            let (d, p) =
                compile(&spec, &placement, 1).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert_eq!((d.len(), p.len()), (1, 1));
            if spec.lb().is_some() {
                assert!(!d[0].health_checks.is_empty(), "{}", path.display());
                assert!(d[0].service_addrs.iter().any(|a| !a.nat_source));
            }
            if spec.nat().is_some() {
                assert!(d[0].service_addrs.iter().any(|a| a.nat_source));
            }
            n += 1;
        }
        assert!(n >= 3, "found {n} examples");
    }
}
