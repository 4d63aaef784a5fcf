//! Firewall rules: the serde form (what the spec compiler emits) and the compiled matcher.

use std::net::IpAddr;

use dva_wire::ip_proto;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::index::RuleIndex;
use super::PacketInfo;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Accept,
    Drop,
    /// Drop and tell the sender: TCP reset for TCP, ICMP port unreachable otherwise.
    Reject,
}

/// An inclusive port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub const fn single(port: u16) -> PortRange {
        PortRange {
            first: port,
            last: port,
        }
    }

    #[inline]
    pub fn contains(&self, port: u16) -> bool {
        self.first <= port && port <= self.last
    }
}

/// One rule: every field that is set must match (empty lists and `None` match anything).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Interface index the packet arrived on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress_if: Option<u8>,
    /// Source networks (any of them); empty = any source.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub src: Vec<IpNet>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dst: Vec<IpNet>,
    /// IP protocol number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proto: Option<u8>,
    /// Only packets of protocols with ports (TCP, UDP, SCTP, UDP-Lite) match a port list.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub src_ports: Vec<PortRange>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dst_ports: Vec<PortRange>,
    /// ICMP or ICMPv6 type (only ICMP packets match).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icmp_type: Option<u8>,
    pub action: Action,
}

impl Rule {
    /// A rule matching everything, with `action`; set fields with struct update syntax.
    pub fn any(action: Action) -> Rule {
        Rule {
            name: None,
            ingress_if: None,
            src: Vec::new(),
            dst: Vec::new(),
            proto: None,
            src_ports: Vec::new(),
            dst_ports: Vec::new(),
            icmp_type: None,
            action,
        }
    }
}

/// Ordered rules and the action for packets no rule matches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSet {
    #[serde(default)]
    pub rules: Vec<Rule>,
    pub default_action: Action,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("rule {index}{}: port range {first}-{last} is empty (first > last)", name_suffix(.name))]
    EmptyPortRange {
        index: usize,
        name: Option<String>,
        first: u16,
        last: u16,
    },
    #[error("rule {index}{}: ports given but protocol {proto} has no ports", name_suffix(.name))]
    PortsWithoutPorts {
        index: usize,
        name: Option<String>,
        proto: u8,
    },
    #[error("rule {index}{}: icmp_type {icmp_type} given but the rule's protocol is {} (needs 1 or 58)", name_suffix(.name), proto.map_or("unset".to_string(), |p| p.to_string()))]
    IcmpTypeWithoutIcmp {
        index: usize,
        name: Option<String>,
        icmp_type: u8,
        proto: Option<u8>,
    },
}

fn name_suffix(name: &Option<String>) -> String {
    name.as_ref().map(|n| format!(" ({n})")).unwrap_or_default()
}

#[inline]
pub(crate) fn has_ports(p: u8) -> bool {
    matches!(
        p,
        ip_proto::TCP | ip_proto::UDP | ip_proto::SCTP | ip_proto::UDPLITE
    )
}

impl RuleSet {
    /// A rule set with no rules: every new flow gets `default_action`.
    pub fn with_default(default_action: Action) -> RuleSet {
        RuleSet {
            rules: Vec::new(),
            default_action,
        }
    }

    /// Reject rules that can never match as written (the firewall still runs them: an empty
    /// port range matches nothing, a port list on a port-less protocol matches nothing).
    pub fn validate(&self) -> Result<(), RuleError> {
        for (index, r) in self.rules.iter().enumerate() {
            let name = || r.name.clone();
            for p in r.src_ports.iter().chain(&r.dst_ports) {
                if p.first > p.last {
                    return Err(RuleError::EmptyPortRange {
                        index,
                        name: name(),
                        first: p.first,
                        last: p.last,
                    });
                }
            }
            if let Some(proto) = r.proto {
                let has_port_match = !r.src_ports.is_empty() || !r.dst_ports.is_empty();
                if has_port_match && !has_ports(proto) {
                    return Err(RuleError::PortsWithoutPorts {
                        index,
                        name: name(),
                        proto,
                    });
                }
            }
            if let Some(icmp_type) = r.icmp_type {
                if !matches!(r.proto, Some(ip_proto::ICMP | ip_proto::ICMPV6)) {
                    return Err(RuleError::IcmpTypeWithoutIcmp {
                        index,
                        name: name(),
                        icmp_type,
                        proto: r.proto,
                    });
                }
            }
        }
        Ok(())
    }
}

/// Networks of one family as `(network, mask)` integers: a match is one AND and one compare.
#[derive(Debug, Clone, Default)]
struct NetSet {
    any: bool,
    v4: Vec<(u32, u32)>,
    v6: Vec<(u128, u128)>,
}

impl NetSet {
    fn new(nets: &[IpNet]) -> NetSet {
        let mut s = NetSet {
            any: nets.is_empty(),
            ..NetSet::default()
        };
        for n in nets {
            match n {
                IpNet::V4(n) => {
                    let mask = n.netmask().to_bits();
                    s.v4.push((n.network().to_bits() & mask, mask));
                }
                IpNet::V6(n) => {
                    let mask = n.netmask().to_bits();
                    s.v6.push((n.network().to_bits() & mask, mask));
                }
            }
        }
        s
    }

    #[inline]
    fn contains(&self, a: IpAddr) -> bool {
        self.any
            || match a {
                IpAddr::V4(a) => {
                    let a = a.to_bits();
                    self.v4.iter().any(|&(net, mask)| a & mask == net)
                }
                IpAddr::V6(a) => {
                    let a = a.to_bits();
                    self.v6.iter().any(|&(net, mask)| a & mask == net)
                }
            }
    }
}

#[derive(Debug, Clone)]
struct CompiledRule {
    ingress_if: Option<u8>,
    proto: Option<u8>,
    icmp_type: Option<u8>,
    src: NetSet,
    dst: NetSet,
    src_ports: Vec<PortRange>,
    dst_ports: Vec<PortRange>,
    action: Action,
}

impl CompiledRule {
    #[inline]
    fn matches(&self, pkt: &PacketInfo) -> bool {
        let k = &pkt.key;
        // Cheapest and most selective tests first.
        if self.proto.is_some_and(|p| p != k.proto)
            || self.ingress_if.is_some_and(|i| i != pkt.ingress_if)
        {
            return false;
        }
        if let Some(t) = self.icmp_type {
            let is_icmp = matches!(k.proto, ip_proto::ICMP | ip_proto::ICMPV6);
            if !is_icmp || pkt.icmp.map(|(ty, _)| ty) != Some(t) {
                return false;
            }
        }
        if !self.src_ports.is_empty() || !self.dst_ports.is_empty() {
            if !has_ports(k.proto) {
                return false;
            }
            let in_any = |l: &[PortRange], p: u16| l.is_empty() || l.iter().any(|r| r.contains(p));
            if !in_any(&self.dst_ports, k.dst_port) || !in_any(&self.src_ports, k.src_port) {
                return false;
            }
        }
        self.dst.contains(k.dst) && self.src.contains(k.src)
    }
}

/// Rule sets at least this long are looked up through a [`RuleIndex`]; shorter ones are
/// scanned (a handful of compares beats the index's fixed cost).
const INDEX_FROM: usize = 16;

/// The rule set in matching form: first match, paid once per new flow (established packets
/// never reach the rules). Short sets are scanned in order; longer ones go through the
/// bit-vector index (`index.rs`), which finds the same rule in time logarithmic in the rules.
#[derive(Debug, Clone)]
pub(crate) struct CompiledRules {
    rules: Vec<CompiledRule>,
    index: Option<RuleIndex>,
    pub(crate) default_action: Action,
}

impl CompiledRules {
    pub(crate) fn new(set: &RuleSet) -> CompiledRules {
        let rules = set
            .rules
            .iter()
            .map(|r| CompiledRule {
                ingress_if: r.ingress_if,
                proto: r.proto,
                icmp_type: r.icmp_type,
                src: NetSet::new(&r.src),
                dst: NetSet::new(&r.dst),
                src_ports: r.src_ports.clone(),
                dst_ports: r.dst_ports.clone(),
                action: r.action,
            })
            .collect();
        CompiledRules {
            index: (set.rules.len() >= INDEX_FROM).then(|| RuleIndex::new(&set.rules)),
            rules,
            default_action: set.default_action,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.rules.len()
    }

    /// Index of the first matching rule (or `None` for the default) and the action.
    #[inline]
    pub(crate) fn evaluate(&self, pkt: &PacketInfo) -> (Option<usize>, Action) {
        let first = match &self.index {
            Some(ix) => ix.first_match(pkt),
            None => self.scan(pkt),
        };
        match first {
            Some(i) => (Some(i), self.rules[i].action),
            None => (None, self.default_action),
        }
    }

    /// The first match by a scan in order (also the reference the index is tested against).
    #[inline]
    pub(crate) fn scan(&self, pkt: &PacketInfo) -> Option<usize> {
        self.rules.iter().position(|r| r.matches(pkt))
    }
}
