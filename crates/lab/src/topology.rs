//! The lab's fixed plan (namespaces, veth pairs, bridges, addresses) and the four things done
//! with it: build it, check a running lab against it, find a lab by its namespaces, remove it.
//!
//! One [`Plan`] drives building, checking and [`Lab::describe`], so what is printed is what is
//! built and what is checked.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::cmd::{self, show};
use crate::{apps, Lab, LabError, LabSpec};

/// Servers are 198.18.2.(k+1): k = 1..=253.
pub(crate) const MAX_SERVERS: usize = 253;
/// Data-plane hosts are 198.19.0.(10+m): m = 1..=244.
pub(crate) const MAX_HOSTS: usize = 244;
const MAX_PREFIX_LEN: usize = 40;

/// How long `down` waits for SIGKILLed processes to leave their namespaces.
const KILL_GRACE: Duration = Duration::from_secs(5);

/// The L2 segments, each a Linux bridge in the fabric namespace: outside, inside, backplane, and
/// in a lab with several dispatchers one point-to-point transit segment per dispatcher and side
/// (between the upstream router and that dispatcher).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Segment {
    Outside,
    Inside,
    Backplane,
    TransitOut(usize),
    TransitIn(usize),
}

/// Interface names of the routers' transit ports (`&'static str` like every lab interface name).
const TRANSIT_NAMES: [&str; MAX_DISPATCHERS] = ["t1", "t2", "t3", "t4", "t5", "t6", "t7", "t8"];
/// Dispatcher hosts of a lab: disp1..dispN, N <= 8.
pub(crate) const MAX_DISPATCHERS: usize = 8;

impl Segment {
    pub(crate) fn bridge(self) -> String {
        match self {
            Segment::Outside => "br-out".into(),
            Segment::Inside => "br-in".into(),
            Segment::Backplane => "br-bp".into(),
            Segment::TransitOut(d) => format!("br-to{d}"),
            Segment::TransitIn(d) => format!("br-ti{d}"),
        }
    }

    /// GENEVE adds ~60 bytes to every 1500-byte frame the appliance carries, so the backplane
    /// needs jumbo frames; the hosts' own segments keep the usual 1500.
    pub(crate) fn mtu(self) -> u32 {
        match self {
            Segment::Backplane => 9000,
            _ => 1500,
        }
    }
}

/// One veth pair: `ifname` in `ns`, `fabric_port` in the fabric namespace on the segment's bridge.
#[derive(Debug, Clone)]
pub(crate) struct Port {
    pub(crate) ns: String,
    pub(crate) ifname: &'static str,
    pub(crate) fabric_port: String,
    pub(crate) segment: Segment,
    pub(crate) v4: Option<(Ipv4Addr, u8)>,
    pub(crate) v6: Option<(Ipv6Addr, u8)>,
    pub(crate) gw4: Option<Ipv4Addr>,
    pub(crate) gw6: Option<Ipv6Addr>,
    /// The dispatcher's appliance-facing ports: no address and IPv6 off, so the dispatcher
    /// host's kernel never answers ARP/ND or anything else for the appliance.
    pub(crate) appliance: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub(crate) fabric: String,
    /// Every namespace of the lab, the fabric first.
    pub(crate) namespaces: Vec<String>,
    pub(crate) segments: Vec<Segment>,
    pub(crate) ports: Vec<Port>,
    pub(crate) lab: Lab,
}

impl Plan {
    pub(crate) fn new(lab: &Lab) -> Plan {
        let ha = lab.dispatchers > 1;
        let mut namespaces = vec![lab.fabric_ns(), lab.client_ns()];
        namespaces.extend((1..=lab.servers).map(|k| lab.server_ns(k)));
        namespaces.extend((1..=lab.dispatchers.max(1)).map(|d| lab.dispatcher_ns(d)));
        if ha {
            namespaces.push(lab.router_ns(true));
            namespaces.push(lab.router_ns(false));
        }
        namespaces.extend((1..=lab.hosts).map(|m| lab.host_ns(m)));
        if lab.control {
            namespaces.push(lab.ctl_ns());
        }
        let mut segments = vec![Segment::Outside, Segment::Inside, Segment::Backplane];
        if ha {
            for d in 1..=lab.dispatchers {
                segments.push(Segment::TransitOut(d));
                segments.push(Segment::TransitIn(d));
            }
        }

        let host_port = |ns: String, ifname, fabric_port: String, segment, v4, v6, gw4, gw6| Port {
            ns,
            ifname,
            fabric_port,
            segment,
            v4: Some((v4, 24)),
            v6,
            gw4,
            gw6,
            appliance: false,
        };
        let mut ports = vec![host_port(
            lab.client_ns(),
            "eth0",
            "c-client".to_string(),
            Segment::Outside,
            Lab::client_addr(),
            Some((Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2), 64)),
            Some(Lab::outside_gateway()),
            Some(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1)),
        )];
        for k in 1..=lab.servers {
            ports.push(host_port(
                lab.server_ns(k),
                "eth0",
                format!("s-server{k}"),
                Segment::Inside,
                Lab::server_addr(k),
                // k <= MAX_SERVERS, so k + 1 fits.
                Some((
                    Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, (k + 1) as u16),
                    64,
                )),
                Some(Lab::inside_gateway()),
                Some(Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 1)),
            ));
        }
        for d in 1..=lab.dispatchers.max(1) {
            let disp = lab.dispatcher_ns(d);
            // One dispatcher: its ports are on the hosts' segments and it owns the gateways.
            // Several: each sits behind the upstream routers on its own transit segments.
            let (out_seg, in_seg) = if ha {
                (Segment::TransitOut(d), Segment::TransitIn(d))
            } else {
                (Segment::Outside, Segment::Inside)
            };
            for (ifname, fabric_port, segment) in [
                ("out0", format!("o-disp{d}"), out_seg),
                ("in0", format!("i-disp{d}"), in_seg),
            ] {
                ports.push(Port {
                    ns: disp.clone(),
                    ifname,
                    fabric_port,
                    segment,
                    v4: None,
                    v6: None,
                    gw4: None,
                    gw6: None,
                    appliance: true,
                });
            }
            ports.push(host_port(
                disp,
                "bp0",
                format!("b-disp{d}"),
                Segment::Backplane,
                Lab::dispatcher_backplane_addr(d),
                None,
                None,
                None,
            ));
        }
        if ha {
            for (outside, seg, gw, gw6, transit) in [
                (
                    true,
                    Segment::Outside,
                    Lab::outside_gateway(),
                    Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1),
                    Lab::router_transit_addr(true),
                ),
                (
                    false,
                    Segment::Inside,
                    Lab::inside_gateway(),
                    Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 1),
                    Lab::router_transit_addr(false),
                ),
            ] {
                let ns = lab.router_ns(outside);
                let side = if outside { "ro" } else { "ri" };
                ports.push(host_port(
                    ns.clone(),
                    "eth0",
                    format!("{side}-eth0"),
                    seg,
                    gw,
                    Some((gw6, 64)),
                    None,
                    None,
                ));
                for d in 1..=lab.dispatchers {
                    ports.push(host_port(
                        ns.clone(),
                        TRANSIT_NAMES[d - 1],
                        format!("{side}-t{d}"),
                        if outside {
                            Segment::TransitOut(d)
                        } else {
                            Segment::TransitIn(d)
                        },
                        transit,
                        None,
                        None,
                        None,
                    ));
                }
            }
        }
        for m in 1..=lab.hosts {
            ports.push(host_port(
                lab.host_ns(m),
                "bp0",
                format!("b-host{m}"),
                Segment::Backplane,
                Lab::host_backplane_addr(m),
                None,
                None,
                None,
            ));
        }
        if lab.control {
            ports.push(host_port(
                lab.ctl_ns(),
                "bp0",
                "b-ctl".to_string(),
                Segment::Backplane,
                Lab::ctl_backplane_addr(),
                None,
                None,
                None,
            ));
        }
        Plan {
            fabric: lab.fabric_ns(),
            namespaces,
            segments,
            ports,
            lab: lab.clone(),
        }
    }

    fn ports_in<'a>(&'a self, ns: &'a str) -> impl Iterator<Item = &'a Port> + 'a {
        self.ports.iter().filter(move |p| p.ns == ns)
    }
}

/// What a namespace is in a lab, read from its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Client,
    Fabric,
    Dispatcher(usize),
    Server(usize),
    Host(usize),
    RouterOut,
    RouterIn,
    Ctl,
}

/// The role of namespace `name` in the lab `prefix`, if it is one of the lab's names. Exact
/// matches only, so labs whose prefixes extend each other (`a-`, `a-b-`) never claim each
/// other's namespaces.
pub(crate) fn role(prefix: &str, name: &str) -> Option<Role> {
    let rest = name.strip_prefix(prefix)?;
    match rest {
        "client" => Some(Role::Client),
        "fabric" => Some(Role::Fabric),
        "rtr-out" => Some(Role::RouterOut),
        "rtr-in" => Some(Role::RouterIn),
        "ctl" => Some(Role::Ctl),
        _ => {
            if let Some(n) = rest.strip_prefix("server") {
                index(n).map(Role::Server)
            } else if let Some(n) = rest.strip_prefix("host") {
                index(n).map(Role::Host)
            } else if let Some(n) = rest.strip_prefix("disp") {
                index(n).map(Role::Dispatcher)
            } else {
                None
            }
        }
    }
}

/// 1, 2, ... written the way the lab writes them (no sign, no leading zero).
fn index(s: &str) -> Option<usize> {
    if s.is_empty() || s.starts_with('0') || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok().filter(|&n| n >= 1)
}

/// The lab these namespace names form, if its core (client, fabric, disp1) is there. Servers
/// and hosts count up from 1 while the names are contiguous.
pub(crate) fn shape(prefix: &str, names: &[String]) -> Option<Lab> {
    let roles: Vec<Role> = names.iter().filter_map(|n| role(prefix, n)).collect();
    let core = [Role::Client, Role::Fabric, Role::Dispatcher(1)];
    if !core.iter().all(|r| roles.contains(r)) {
        return None;
    }
    let count = |f: fn(usize) -> Role| (1..).take_while(|&i| roles.contains(&f(i))).count();
    Some(Lab {
        prefix: prefix.to_string(),
        servers: count(Role::Server),
        hosts: count(Role::Host),
        dispatchers: count(Role::Dispatcher),
        control: roles.contains(&Role::Ctl),
    })
}

pub(crate) fn validate_prefix(prefix: &str) -> Result<(), LabError> {
    let bad = |reason| {
        Err(LabError::InvalidPrefix {
            prefix: prefix.to_string(),
            reason,
        })
    };
    let Some(first) = prefix.chars().next() else {
        return bad("it must not be empty (an empty prefix would claim namespaces named plain `client`, `server1`, ...)");
    };
    if prefix.len() > MAX_PREFIX_LEN {
        return bad("it must be at most 40 characters");
    }
    if !first.is_ascii_alphanumeric() {
        return bad("it must start with a letter or digit");
    }
    if !prefix
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return bad("only letters, digits, '-', '_' and '.' are allowed");
    }
    Ok(())
}

pub(crate) fn validate(spec: &LabSpec) -> Result<(), LabError> {
    validate_prefix(&spec.prefix)?;
    if spec.servers > MAX_SERVERS {
        return Err(LabError::InvalidShape {
            what: "servers",
            value: spec.servers,
            max: MAX_SERVERS,
        });
    }
    if spec.dispatchers > MAX_DISPATCHERS {
        return Err(LabError::InvalidShape {
            what: "dispatchers",
            value: spec.dispatchers,
            max: MAX_DISPATCHERS,
        });
    }
    if spec.hosts > MAX_HOSTS {
        return Err(LabError::InvalidShape {
            what: "hosts",
            value: spec.hosts,
            max: MAX_HOSTS,
        });
    }
    Ok(())
}

/// The configuration tools, resolved once per operation.
pub(crate) struct Tools {
    ip: PathBuf,
}

impl Tools {
    pub(crate) fn find() -> Result<Tools, LabError> {
        Ok(Tools {
            ip: cmd::tool("ip")?,
        })
    }

    fn ip(&self, args: &[&str]) -> Result<String, LabError> {
        cmd::run(Command::new(&self.ip).args(args))
    }

    /// `ip -n NS ARGS`.
    fn ip_in(&self, ns: &str, args: &[&str]) -> Result<String, LabError> {
        cmd::run(Command::new(&self.ip).args(["-n", ns]).args(args))
    }

    /// `ip -n NS -j ARGS`, parsed.
    fn ip_json(&self, ns: &str, args: &[&str]) -> Result<Vec<Value>, LabError> {
        let mut c = Command::new(&self.ip);
        c.args(["-n", ns, "-j"]).args(args);
        let text = cmd::run(&mut c)?;
        if text.trim().is_empty() {
            return Ok(Vec::new());
        }
        serde_json::from_str(&text).map_err(|e| LabError::BadOutput {
            command: show(&c),
            reason: format!("not a JSON array: {e}"),
        })
    }

    fn exec_in(&self, ns: &str, program: &Path, args: &[&str]) -> Result<String, LabError> {
        let mut c = Command::new(&self.ip);
        c.args(["netns", "exec", ns]).arg(program).args(args);
        cmd::run(&mut c)
    }

    /// Kernel settings of one namespace. `/proc/sys/net` shows the namespace of whoever opens
    /// it, hence sysctl run inside the namespace.
    fn sysctl(&self, ns: &str, settings: &[String]) -> Result<(), LabError> {
        let mut args = vec!["-q", "-w"];
        args.extend(settings.iter().map(String::as_str));
        self.exec_in(ns, &cmd::tool("sysctl")?, &args).map(drop)
    }

    /// Every namespace on the machine.
    fn namespaces(&self) -> Result<Vec<String>, LabError> {
        // Lines are `NAME` or `NAME (id: N)`; names cannot contain spaces.
        Ok(self
            .ip(&["netns", "list"])?
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_string)
            .collect())
    }
}

/// The namespaces of lab `prefix` that exist now.
pub(crate) fn lab_namespaces(tools: &Tools, prefix: &str) -> Result<Vec<String>, LabError> {
    Ok(tools
        .namespaces()?
        .into_iter()
        .filter(|n| role(prefix, n).is_some())
        .collect())
}

pub(crate) fn up(spec: &LabSpec) -> Result<Lab, LabError> {
    validate(spec)?;
    let tools = Tools::find()?;
    // All checked before anything is created, so a missing package fails fast and clean.
    let ethtool = cmd::tool("ethtool")?;
    cmd::tool("sysctl")?;
    cmd::tool("sh")?;
    let lab = Lab {
        prefix: spec.prefix.clone(),
        servers: spec.servers,
        hosts: spec.hosts,
        dispatchers: spec.dispatchers.max(1),
        control: spec.control,
    };
    let plan = Plan::new(&lab);

    let mut existing = lab_namespaces(&tools, &lab.prefix)?;
    if !existing.is_empty() {
        existing.sort();
        let mut wanted = plan.namespaces.clone();
        wanted.sort();
        if existing == wanted {
            // A namespace that cannot even be inspected (a stale mount) counts as broken.
            if let Ok(check) = check(&tools, &plan) {
                if check.problems.is_empty() {
                    if check.kernel_router {
                        kernel_router(&tools, &lab, false)?;
                    }
                    return Ok(lab);
                }
            }
        }
        // Another shape, or a lab left half-built, modified or broken: start again from nothing.
        down(&lab.prefix)?;
    }

    let built = build(&tools, &ethtool, &plan).and_then(|()| {
        let check = check(&tools, &plan)?;
        match check.problems.first() {
            None => Ok(()),
            Some(problem) => Err(LabError::Mismatch {
                prefix: lab.prefix.clone(),
                problem: problem.clone(),
            }),
        }
    });
    if let Err(e) = built {
        let _ = down(&lab.prefix);
        return Err(e);
    }
    Ok(lab)
}

fn build(tools: &Tools, ethtool: &Path, plan: &Plan) -> Result<(), LabError> {
    let fabric = plan.fabric.as_str();
    for ns in &plan.namespaces {
        tools.ip(&["netns", "add", ns])?;
    }

    // The fabric is a pure L2 switch: before any interface appears there, IPv6 is off by
    // default (no link-local addresses, ND or MLD from bridges and ports), and bridged frames
    // skip iptables even where br_netfilter is loaded.
    tools.sysctl(
        fabric,
        &settings(&[
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ]),
    )?;
    tools.exec_in(
        fabric,
        &cmd::tool("sh")?,
        &["-c", "for f in /proc/sys/net/bridge/bridge-nf-call-*; do if [ -e \"$f\" ]; then echo 0 > \"$f\"; fi; done"],
    )?;
    for seg in &plan.segments {
        let mtu = seg.mtu().to_string();
        tools.ip_in(
            fabric,
            &[
                "link",
                "add",
                &seg.bridge(),
                "mtu",
                &mtu,
                "type",
                "bridge",
                "stp_state",
                "0",
                "forward_delay",
                "0",
                "mcast_snooping",
                "0",
            ],
        )?;
    }

    // Both ends are created in their namespaces at once, so nothing ever appears in the root
    // namespace and labs with other prefixes (same interface names) are never in the way.
    for p in &plan.ports {
        let mtu = p.segment.mtu().to_string();
        tools.ip(&[
            "link",
            "add",
            p.ifname,
            "netns",
            &p.ns,
            "mtu",
            &mtu,
            "type",
            "veth",
            "peer",
            "name",
            &p.fabric_port,
            "netns",
            fabric,
            "mtu",
            &mtu,
        ])?;
    }

    // Root's IPv4 forwarding setting leaks into new namespaces; nothing in the lab routes unless
    // asked to (`set_kernel_router`).
    for ns in &plan.namespaces {
        let mut s = settings(&["net.ipv4.ip_forward=0", "net.ipv6.conf.all.forwarding=0"]);
        for p in plan.ports_in(ns).filter(|p| p.appliance) {
            s.push(format!("net.ipv6.conf.{}.disable_ipv6=1", p.ifname));
            // Kernel-router mode puts addresses on these ports; answer ARP only for those.
            s.push(format!("net.ipv4.conf.{}.arp_ignore=1", p.ifname));
        }
        tools.sysctl(ns, &s)?;
    }

    // See the crate doc: AF_PACKET must see wire-sized frames with complete checksums. RX
    // checksum offload stays on: it only marks good checksums as verified.
    for p in &plan.ports {
        for (ns, dev) in [(p.ns.as_str(), p.ifname), (fabric, p.fabric_port.as_str())] {
            tools.exec_in(
                ns,
                ethtool,
                &[
                    "-K", dev, "tso", "off", "gso", "off", "gro", "off", "tx", "off",
                ],
            )?;
        }
    }

    for ns in &plan.namespaces {
        tools.ip_in(ns, &["link", "set", "lo", "up"])?;
    }
    for seg in &plan.segments {
        tools.ip_in(fabric, &["link", "set", &seg.bridge(), "up"])?;
    }
    for p in &plan.ports {
        tools.ip_in(
            fabric,
            &[
                "link",
                "set",
                &p.fabric_port,
                "master",
                &p.segment.bridge(),
                "up",
            ],
        )?;
        if let Some((a, len)) = p.v4 {
            tools.ip_in(
                &p.ns,
                &["-4", "addr", "add", &format!("{a}/{len}"), "dev", p.ifname],
            )?;
        }
        if let Some((a, len)) = p.v6 {
            // nodad: usable at once, no 1-2 s wait for duplicate address detection.
            tools.ip_in(
                &p.ns,
                &[
                    "-6",
                    "addr",
                    "add",
                    &format!("{a}/{len}"),
                    "dev",
                    p.ifname,
                    "nodad",
                ],
            )?;
        }
        tools.ip_in(&p.ns, &["link", "set", p.ifname, "up"])?;
        if let Some(gw) = p.gw4 {
            tools.ip_in(
                &p.ns,
                &[
                    "-4",
                    "route",
                    "add",
                    "default",
                    "via",
                    &gw.to_string(),
                    "dev",
                    p.ifname,
                ],
            )?;
        }
        if let Some(gw) = p.gw6 {
            tools.ip_in(
                &p.ns,
                &[
                    "-6",
                    "route",
                    "add",
                    "default",
                    "via",
                    &gw.to_string(),
                    "dev",
                    p.ifname,
                ],
            )?;
        }
    }
    {
        let lab = &plan.lab;
        if lab.dispatchers > 1 {
            for outside in [true, false] {
                // Forward, spread flows by their L4 hash, and accept traffic on any transit
                // port (the same transit address sits on each of them).
                tools.sysctl(
                    &lab.router_ns(outside),
                    &settings(&[
                        "net.ipv4.ip_forward=1",
                        "net.ipv4.fib_multipath_hash_policy=1",
                        "net.ipv4.conf.all.rp_filter=0",
                        "net.ipv4.conf.default.rp_filter=0",
                    ]),
                )?;
            }
            let all: Vec<usize> = (1..=lab.dispatchers).collect();
            ecmp(tools, lab, &all)?;
        }
    }
    Ok(())
}

/// Point each upstream router's route to the far side at these dispatchers, spread by ECMP.
pub(crate) fn ecmp(tools: &Tools, lab: &Lab, dispatchers: &[usize]) -> Result<(), LabError> {
    if lab.dispatchers < 2 || dispatchers.is_empty() {
        return Ok(());
    }
    for outside in [true, false] {
        let ns = lab.router_ns(outside);
        let (dst, via) = if outside {
            ("198.18.2.0/24", Lab::dispatcher_transit_addr(true))
        } else {
            ("198.18.1.0/24", Lab::dispatcher_transit_addr(false))
        };
        let mut args: Vec<String> = ["-4", "route", "replace", dst]
            .iter()
            .map(|s| s.to_string())
            .collect();
        for &d in dispatchers {
            if d == 0 || d > lab.dispatchers {
                continue;
            }
            args.extend(
                [
                    "nexthop",
                    "via",
                    &via.to_string(),
                    "dev",
                    TRANSIT_NAMES[d - 1],
                ]
                .iter()
                .map(|s| s.to_string()),
            );
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        tools.ip_in(&ns, &refs)?;
    }
    Ok(())
}

fn settings(s: &[&str]) -> Vec<String> {
    s.iter().map(|s| s.to_string()).collect()
}

/// How a running lab differs from its plan.
pub(crate) struct Check {
    pub(crate) problems: Vec<String>,
    /// The dispatcher host's appliance ports carry addresses: `set_kernel_router(true)` is on.
    pub(crate) kernel_router: bool,
}

pub(crate) fn check(tools: &Tools, plan: &Plan) -> Result<Check, LabError> {
    let mut problems = Vec::new();
    let mut kernel_router = false;

    let links = tools.ip_json(&plan.fabric, &["link", "show"])?;
    for seg in &plan.segments {
        let bridge = seg.bridge();
        match find_link(&links, &bridge) {
            None => problems.push(format!("bridge {bridge} missing in {}", plan.fabric)),
            Some(l) => problems.extend(link_problems(&plan.fabric, &bridge, l, seg.mtu())),
        }
    }
    for p in &plan.ports {
        match find_link(&links, &p.fabric_port) {
            None => problems.push(format!("port {} missing in {}", p.fabric_port, plan.fabric)),
            Some(l) => {
                problems.extend(link_problems(
                    &plan.fabric,
                    &p.fabric_port,
                    l,
                    p.segment.mtu(),
                ));
                if l.get("master").and_then(Value::as_str) != Some(p.segment.bridge().as_str()) {
                    problems.push(format!(
                        "port {} in {} is not on bridge {}",
                        p.fabric_port,
                        plan.fabric,
                        p.segment.bridge()
                    ));
                }
            }
        }
    }

    for ns in plan.namespaces.iter().filter(|ns| **ns != plan.fabric) {
        let addrs = tools.ip_json(ns, &["addr", "show"])?;
        match find_link(&addrs, "lo") {
            Some(l) if has_flag(l, "UP") => {}
            _ => problems.push(format!("lo is not up in {ns}")),
        }
        for p in plan.ports_in(ns) {
            let Some(l) = find_link(&addrs, p.ifname) else {
                problems.push(format!("{} missing in {ns}", p.ifname));
                continue;
            };
            problems.extend(link_problems(ns, p.ifname, l, p.segment.mtu()));
            let (inet, inet6) = addresses(l);
            if p.appliance {
                kernel_router |= !inet.is_empty();
            }
            if let Some((a, len)) = p.v4 {
                if !inet.contains(&(a.to_string(), len)) {
                    problems.push(format!("{} in {ns} lacks {a}/{len}", p.ifname));
                }
            }
            if let Some((a, len)) = p.v6 {
                if !inet6.contains(&(a.to_string(), len)) {
                    problems.push(format!("{} in {ns} lacks {a}/{len}", p.ifname));
                }
            }
            if let Some(gw) = p.gw4 {
                let routes = tools.ip_json(ns, &["-4", "route", "show", "default"])?;
                if !routes.iter().any(|r| {
                    r.get("gateway").and_then(Value::as_str) == Some(gw.to_string().as_str())
                }) {
                    problems.push(format!("{ns} has no default route via {gw}"));
                }
            }
        }
    }
    Ok(Check {
        problems,
        kernel_router,
    })
}

fn find_link<'a>(links: &'a [Value], name: &str) -> Option<&'a Value> {
    links
        .iter()
        .find(|l| l.get("ifname").and_then(Value::as_str) == Some(name))
}

fn has_flag(link: &Value, flag: &str) -> bool {
    link.get("flags")
        .and_then(Value::as_array)
        .is_some_and(|f| f.iter().any(|v| v.as_str() == Some(flag)))
}

fn link_problems(ns: &str, name: &str, link: &Value, mtu: u32) -> Vec<String> {
    let mut problems = Vec::new();
    if !has_flag(link, "UP") {
        problems.push(format!("{name} in {ns} is down"));
    }
    let actual = link.get("mtu").and_then(Value::as_u64);
    if actual != Some(u64::from(mtu)) {
        problems.push(format!("{name} in {ns} has MTU {actual:?}, want {mtu}"));
    }
    problems
}

/// An address as `ip -j addr` prints it, with its prefix length.
type Addr = (String, u8);

/// (IPv4, IPv6) addresses of one `ip -j addr` entry, as (address, prefix length).
fn addresses(link: &Value) -> (Vec<Addr>, Vec<Addr>) {
    let mut inet = Vec::new();
    let mut inet6 = Vec::new();
    for a in link
        .get("addr_info")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let local = a
            .get("local")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let len = a
            .get("prefixlen")
            .and_then(Value::as_u64)
            .and_then(|l| u8::try_from(l).ok())
            .unwrap_or(0);
        match a.get("family").and_then(Value::as_str) {
            Some("inet") => inet.push((local, len)),
            Some("inet6") => inet6.push((local, len)),
            _ => {}
        }
    }
    (inet, inet6)
}

pub(crate) fn discover(prefix: &str) -> Result<Option<Lab>, LabError> {
    validate_prefix(prefix)?;
    let tools = Tools::find()?;
    Ok(shape(prefix, &lab_namespaces(&tools, prefix)?))
}

pub(crate) fn down(prefix: &str) -> Result<(), LabError> {
    validate_prefix(prefix)?;
    let tools = Tools::find()?;
    let names = lab_namespaces(&tools, prefix)?;
    let killed = stop_processes(&tools, &names);
    for ns in &names {
        tools.ip(&["netns", "del", ns])?;
    }
    // What `dva lab up --machines` left on this machine's own filesystem (logs, the client
    // file), once nothing writes there any more; each host's private filesystem (tmpfs in its
    // own mount namespace) went with its last process.
    crate::machines::remove_dir(prefix)?;
    killed
}

/// SIGKILL every process in these namespaces, until none is left (or [`KILL_GRACE`] has passed).
pub(crate) fn stop_processes(tools: &Tools, names: &[String]) -> Result<(), LabError> {
    // A namespace outlives `ip netns del` while a process still runs in it, taking its veths
    // and addresses along: kill everything first, then delete.
    let pids_in = |ns: &str| -> Result<Vec<u32>, LabError> {
        let me = std::process::id();
        Ok(tools
            .ip(&["netns", "pids", ns])?
            .lines()
            .filter_map(|l| l.trim().parse::<u32>().ok())
            .filter(|&pid| pid > 1 && pid != me)
            .collect())
    };
    let mut survivors = Vec::new();
    let mut killed: Vec<u32> = Vec::new();
    let all_gone = apps::wait_until(KILL_GRACE, Duration::from_millis(20), || {
        survivors.clear();
        for ns in names {
            match pids_in(ns) {
                Ok(pids) if !pids.is_empty() => survivors.push((ns.clone(), pids)),
                // A namespace that cannot be read is deleted below, or reports its own error there.
                _ => {}
            }
        }
        if survivors.is_empty() {
            return true;
        }
        // Every round, not once: a supervisor outside the lab may start new processes in it.
        kill(survivors.iter().flat_map(|(_, pids)| pids));
        killed.extend(survivors.iter().flat_map(|(_, pids)| pids));
        false
    });
    // A killed process leaves its namespaces early in its exit, before its memory is freed:
    // `ip netns pids` no longer lists it while it still exists. Returning then would leave
    // lab processes behind for a moment (a test or a new lab sees them), so wait them out.
    killed.sort_unstable();
    killed.dedup();
    apps::wait_until(KILL_GRACE, Duration::from_millis(10), || {
        killed.iter().all(|&pid| !process_alive(pid))
    });
    match survivors.into_iter().next() {
        Some((ns, pids)) if !all_gone => Err(LabError::Unkillable { ns, pids }),
        _ => Ok(()),
    }
}

/// Whether process `pid` still exists and is not a zombie (or dead) yet.
pub fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next().map(|st| st != "Z" && st != "X"))
        })
        .unwrap_or(false)
}

/// SIGKILL via procps' `kill`, which keeps this crate free of `unsafe`. Its exit status is
/// ignored: a process that exited meanwhile is not an error, and survivors are counted by the caller.
fn kill<'a>(pids: impl Iterator<Item = &'a u32>) {
    let Ok(program) = cmd::tool("kill") else {
        return;
    };
    let mut c = Command::new(program);
    c.arg("-KILL").args(pids.map(u32::to_string));
    let _ = cmd::run(&mut c);
}

/// Turn TSO, GSO, GRO and TX checksumming on or off on every traffic-carrying veth end
/// (outside, inside and transit segments; the backplane keeps them off).
pub(crate) fn offloads(tools: &Tools, lab: &Lab, on: bool) -> Result<(), LabError> {
    let ethtool = cmd::tool("ethtool")?;
    let plan = Plan::new(lab);
    let v = if on { "on" } else { "off" };
    for p in plan
        .ports
        .iter()
        .filter(|p| p.segment != Segment::Backplane)
    {
        for (ns, dev) in [
            (p.ns.as_str(), p.ifname),
            (plan.fabric.as_str(), p.fabric_port.as_str()),
        ] {
            tools.exec_in(
                ns,
                &ethtool,
                &["-K", dev, "tso", v, "gso", v, "gro", v, "tx", v],
            )?;
        }
    }
    Ok(())
}

/// Give the dispatchers' appliance-facing veths `n` receive and transmit queues, both ends
/// (`ethtool -L`; a veth offers as many as the machine has CPUs). The fabric end picks a
/// transmit queue by flow hash and the dispatcher's end takes the frame on the receive queue of
/// the same number, so flows spread over the queues as a NIC's RSS would spread them. Only
/// these: a frame that left a multi-queue veth elsewhere crosses the bridge with its queue
/// number still set, which the fabric end reads as a recorded receive queue and keeps (every
/// frame on queue 0, measured), instead of hashing.
pub(crate) fn queues(tools: &Tools, lab: &Lab, n: u32) -> Result<(), LabError> {
    let ethtool = cmd::tool("ethtool")?;
    let plan = Plan::new(lab);
    let n = n.to_string();
    for p in plan.ports.iter().filter(|p| p.appliance) {
        for (ns, dev) in [
            (p.ns.as_str(), p.ifname),
            (plan.fabric.as_str(), p.fabric_port.as_str()),
        ] {
            tools.exec_in(ns, &ethtool, &["-L", dev, "rx", &n, "tx", &n])?;
        }
    }
    Ok(())
}

pub(crate) fn kernel_router(tools: &Tools, lab: &Lab, on: bool) -> Result<(), LabError> {
    if lab.dispatchers > 1 {
        if !on {
            return Ok(());
        }
        return Err(LabError::InvalidArgument {
            what: "kernel router",
            value: lab.prefix.clone(),
            reason: "only in a lab with one dispatcher host",
        });
    }
    let disp = lab.dispatcher_ns(1);
    if on {
        // `replace`, not `add`: turning it on twice is not an error.
        tools.ip_in(
            &disp,
            &[
                "-4",
                "addr",
                "replace",
                &format!("{}/24", Lab::outside_gateway()),
                "dev",
                "out0",
            ],
        )?;
        tools.ip_in(
            &disp,
            &[
                "-4",
                "addr",
                "replace",
                &format!("{}/24", Lab::inside_gateway()),
                "dev",
                "in0",
            ],
        )?;
        tools.sysctl(&disp, &settings(&["net.ipv4.ip_forward=1"]))?;
    } else {
        tools.sysctl(&disp, &settings(&["net.ipv4.ip_forward=0"]))?;
        for dev in ["out0", "in0"] {
            tools.ip_in(&disp, &["-4", "addr", "flush", "dev", dev])?;
            tools.ip_in(&disp, &["neigh", "flush", "dev", dev])?;
        }
        // The hosts remember the kernel's MAC for the gateway; the appliance uses another.
        let mut hosts = vec![lab.client_ns()];
        hosts.extend((1..=lab.servers).map(|k| lab.server_ns(k)));
        for ns in &hosts {
            tools.ip_in(ns, &["neigh", "flush", "dev", "eth0"])?;
        }
    }
    Ok(())
}

/// See [`Lab::host_named`]: every namespace with links counts (the fabric is the links).
pub(crate) fn host_named(lab: &Lab, name: &str) -> Result<String, LabError> {
    let plan = Plan::new(lab);
    let hosts: Vec<&String> = plan
        .namespaces
        .iter()
        .filter(|ns| **ns != plan.fabric)
        .collect();
    let prefixed = format!("{}{name}", lab.prefix);
    match hosts.iter().find(|ns| ***ns == prefixed || ***ns == name) {
        Some(ns) => Ok((*ns).clone()),
        None => Err(LabError::UnknownHost {
            prefix: lab.prefix.clone(),
            name: name.to_string(),
            hosts: hosts
                .iter()
                .map(|ns| ns.strip_prefix(lab.prefix.as_str()).unwrap_or(ns.as_str()))
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// The fabric ports of host `ns`: every link it has.
fn fabric_ports_of(plan: &Plan, ns: &str) -> Vec<String> {
    plan.ports_in(ns).map(|p| p.fabric_port.clone()).collect()
}

pub(crate) fn set_cut(tools: &Tools, lab: &Lab, ns: &str, cut: bool) -> Result<(), LabError> {
    let plan = Plan::new(lab);
    let ports = fabric_ports_of(&plan, ns);
    if ports.is_empty() {
        // host_named's names all have ports; this guards callers passing anything else.
        host_named(lab, ns)?;
    }
    // The fabric's end, not the host's: the host cannot undo it from inside, and its own view
    // (interface up, addresses kept) is that of a machine whose cable was pulled at the switch.
    for port in ports {
        tools.ip_in(
            &plan.fabric,
            &["link", "set", &port, if cut { "down" } else { "up" }],
        )?;
    }
    Ok(())
}

pub(crate) fn cut_hosts(tools: &Tools, lab: &Lab) -> Result<Vec<String>, LabError> {
    let plan = Plan::new(lab);
    let links = tools.ip_json(&plan.fabric, &["link", "show"])?;
    Ok(plan
        .namespaces
        .iter()
        .filter(|ns| {
            fabric_ports_of(&plan, ns)
                .iter()
                .any(|port| find_link(&links, port).is_some_and(|l| !has_flag(l, "UP")))
        })
        .cloned()
        .collect())
}

/// The table `dva lab show` prints.
pub(crate) fn describe(lab: &Lab) -> String {
    let plan = Plan::new(lab);
    let mut rows = vec![[
        "namespace",
        "iface",
        "fabric port",
        "switch",
        "mtu",
        "addresses",
    ]
    .map(String::from)];
    for p in &plan.ports {
        let addresses = if p.appliance {
            "none: the appliance's side, IPv6 off".to_string()
        } else {
            let mut a: Vec<String> = p.v4.iter().map(|(a, l)| format!("{a}/{l}")).collect();
            a.extend(p.v6.iter().map(|(a, l)| format!("{a}/{l}")));
            let gws: Vec<String> = p
                .gw4
                .iter()
                .map(Ipv4Addr::to_string)
                .chain(p.gw6.iter().map(Ipv6Addr::to_string))
                .collect();
            if !gws.is_empty() {
                a.push(format!("default via {}", gws.join(", ")));
            }
            a.join("  ")
        };
        rows.push([
            p.ns.clone(),
            p.ifname.to_string(),
            p.fabric_port.clone(),
            p.segment.bridge(),
            p.segment.mtu().to_string(),
            addresses,
        ]);
    }
    let widths: Vec<usize> = (0..6)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let ctl = if lab.control {
        format!(", control host {}", lab.ctl_ns())
    } else {
        String::new()
    };
    let mut out = format!(
        "lab {}: client, {} server(s), dispatcher host {}, {} data-plane host(s){ctl}; switches br-out, br-in, br-bp in {}\n",
        lab.prefix,
        lab.servers,
        lab.dispatcher_ns(1),
        lab.hosts,
        plan.fabric
    );
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lab(servers: usize, hosts: usize) -> Lab {
        Lab {
            prefix: "t-".into(),
            servers,
            hosts,
            dispatchers: 1,
            control: false,
        }
    }

    #[test]
    fn plan_follows_the_address_plan() {
        let plan = Plan::new(&lab(3, 2));
        assert_eq!(
            plan.namespaces,
            [
                "t-fabric",
                "t-client",
                "t-server1",
                "t-server2",
                "t-server3",
                "t-disp1",
                "t-host1",
                "t-host2"
            ]
        );
        assert_eq!(plan.ports.len(), 1 + 3 + 3 + 2);
        let s3 = plan.ports.iter().find(|p| p.ns == "t-server3").unwrap();
        assert_eq!(s3.v4, Some(("198.18.2.4".parse().unwrap(), 24)));
        assert_eq!(s3.v6, Some(("2001:db8:2::4".parse().unwrap(), 64)));
        assert_eq!(s3.fabric_port, "s-server3");
        let disp: Vec<_> = plan
            .ports_in("t-disp1")
            .map(|p| (p.ifname, p.appliance, p.v4, p.segment))
            .collect();
        assert_eq!(
            disp,
            [
                ("out0", true, None, Segment::Outside),
                ("in0", true, None, Segment::Inside),
                (
                    "bp0",
                    false,
                    Some(("198.19.0.1".parse().unwrap(), 24)),
                    Segment::Backplane
                )
            ]
        );
        let h2 = plan.ports.iter().find(|p| p.ns == "t-host2").unwrap();
        assert_eq!(h2.v4, Some(("198.19.0.12".parse().unwrap(), 24)));
        assert_eq!(h2.segment.mtu(), 9000);
        assert!(h2.gw4.is_none(), "no default routes on appliance hosts");
    }

    #[test]
    fn the_control_host_collides_with_no_host_at_any_shape() {
        let mut l = lab(MAX_SERVERS, MAX_HOSTS);
        l.dispatchers = MAX_DISPATCHERS;
        l.control = true;
        let plan = Plan::new(&l);
        let mut addrs: Vec<_> = plan
            .ports
            .iter()
            .filter(|p| p.segment == Segment::Backplane)
            .map(|p| p.v4)
            .collect();
        let n = addrs.len();
        assert_eq!(n, MAX_HOSTS + MAX_DISPATCHERS + 1);
        addrs.sort();
        addrs.dedup();
        assert_eq!(addrs.len(), n, "backplane addresses are unique");
        let ctl = plan.ports.iter().find(|p| p.ns == "t-ctl").unwrap();
        assert_eq!(
            (ctl.ifname, ctl.fabric_port.as_str(), ctl.v4),
            ("bp0", "b-ctl", Some(("198.19.0.10".parse().unwrap(), 24)))
        );
        assert_eq!(role("t-", "t-ctl"), Some(Role::Ctl));
        let names: Vec<String> = plan.namespaces.clone();
        assert!(shape("t-", &names).unwrap().control);
        assert!(
            !shape("t-", &Plan::new(&lab(1, 1)).namespaces)
                .unwrap()
                .control
        );
    }

    #[test]
    fn hosts_are_named_with_or_without_the_prefix() {
        let mut l = lab(1, 2);
        l.control = true;
        assert_eq!(host_named(&l, "host2").unwrap(), "t-host2");
        assert_eq!(host_named(&l, "t-ctl").unwrap(), "t-ctl");
        assert_eq!(host_named(&l, "disp1").unwrap(), "t-disp1");
        let e = host_named(&l, "host3").unwrap_err().to_string();
        assert!(e.contains("host3") && e.contains("host1, host2"), "{e}");
        assert!(host_named(&l, "fabric").is_err(), "the fabric is the links");
        assert_eq!(
            fabric_ports_of(&Plan::new(&l), "t-disp1"),
            ["o-disp1", "i-disp1", "b-disp1"]
        );
    }

    #[test]
    fn fabric_names_fit_ifnamsiz_at_the_largest_shape() {
        let plan = Plan::new(&lab(MAX_SERVERS, MAX_HOSTS));
        for p in &plan.ports {
            assert!(p.fabric_port.len() <= 15, "{}", p.fabric_port);
        }
        let mut names: Vec<_> = plan.ports.iter().map(|p| &p.fabric_port).collect();
        names.sort();
        names.dedup();
        assert_eq!(
            names.len(),
            plan.ports.len(),
            "fabric port names are unique"
        );
    }

    #[test]
    fn roles_match_exact_names_only() {
        assert_eq!(role("a-", "a-client"), Some(Role::Client));
        assert_eq!(role("a-", "a-fabric"), Some(Role::Fabric));
        assert_eq!(role("a-", "a-server12"), Some(Role::Server(12)));
        assert_eq!(role("a-", "a-host2"), Some(Role::Host(2)));
        assert_eq!(role("a-", "a-disp1"), Some(Role::Dispatcher(1)));
        for other in [
            "a-b-client",
            "a-server",
            "a-server0",
            "a-server01",
            "a-server1x",
            "a-host-1",
            "b-client",
            "a-clients",
            "client",
        ] {
            assert_eq!(role("a-", other), None, "{other}");
        }
    }

    #[test]
    fn shape_counts_contiguous_servers_and_hosts() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let l = shape(
            "p-",
            &names(&[
                "p-client",
                "p-fabric",
                "p-disp1",
                "p-server1",
                "p-server2",
                "p-host1",
                "x-server3",
                "p-b-host2",
            ]),
        )
        .unwrap();
        assert_eq!((l.servers, l.hosts), (2, 1));
        assert!(
            shape("p-", &names(&["p-client", "p-disp1", "p-server1"])).is_none(),
            "no fabric, no lab"
        );
        let l = shape("p-", &names(&["p-client", "p-fabric", "p-disp1"])).unwrap();
        assert_eq!((l.servers, l.hosts), (0, 0));
    }

    #[test]
    fn prefixes_and_shapes_are_validated() {
        for good in ["dva-", "lt123a-", "a", "x_y.z-"] {
            validate_prefix(good).unwrap();
        }
        for bad in ["", "-x", "a b", "a/b", "é-", &"x".repeat(41)] {
            let e = validate_prefix(bad).unwrap_err();
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
        let e = validate(&LabSpec {
            prefix: "p-".into(),
            servers: 254,
            hosts: 1,
            dispatchers: 1,
            control: false,
        })
        .unwrap_err();
        assert!(e.to_string().contains("servers = 254"), "{e}");
        let e = validate(&LabSpec {
            prefix: "p-".into(),
            servers: 1,
            hosts: 245,
            dispatchers: 1,
            control: false,
        })
        .unwrap_err();
        assert!(e.to_string().contains("hosts = 245"), "{e}");
        validate(&LabSpec {
            prefix: "p-".into(),
            servers: MAX_SERVERS,
            hosts: MAX_HOSTS,
            dispatchers: 1,
            control: false,
        })
        .unwrap();
    }

    #[test]
    fn ip_json_helpers_read_links_and_addresses() {
        let json: Vec<Value> = serde_json::from_str(
            r#"[{"ifindex":1,"ifname":"lo","flags":["LOOPBACK","UP","LOWER_UP"],"mtu":65536,"addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8}]},
                {"ifindex":2,"ifname":"eth0","flags":["BROADCAST","MULTICAST"],"mtu":1400,"master":"br-in",
                 "addr_info":[{"family":"inet","local":"198.18.2.2","prefixlen":24},{"family":"inet6","local":"2001:db8:2::2","prefixlen":64}]}]"#,
        )
        .unwrap();
        let eth0 = find_link(&json, "eth0").unwrap();
        assert!(has_flag(find_link(&json, "lo").unwrap(), "UP"));
        let problems = link_problems("ns", "eth0", eth0, 1500);
        assert_eq!(
            problems,
            [
                "eth0 in ns is down",
                "eth0 in ns has MTU Some(1400), want 1500"
            ]
        );
        let (v4, v6) = addresses(eth0);
        assert_eq!(v4, [("198.18.2.2".to_string(), 24)]);
        assert_eq!(v6, [("2001:db8:2::2".to_string(), 64)]);
        assert!(find_link(&json, "eth1").is_none());
    }

    #[test]
    fn describe_lists_every_port() {
        let text = describe(&lab(2, 1));
        for needle in [
            "t-client",
            "198.18.1.2/24",
            "2001:db8:1::2/64",
            "default via 198.18.1.1, 2001:db8:1::1",
            "t-server2",
            "198.18.2.3/24",
            "o-disp1",
            "i-disp1",
            "none: the appliance's side",
            "198.19.0.1/24",
            "b-host1",
            "198.19.0.11/24",
            "9000",
        ] {
            assert!(text.contains(needle), "{needle} missing from:\n{text}");
        }
        assert_eq!(text.lines().count(), 2 + 1 + 2 + 3 + 1);
    }
}
