//! First-match rule lookup in time that grows with the logarithm of the rule count, not linearly:
//! the bit-vector scheme of Lakshman & Stiliadis (SIGCOMM'98).
//!
//! Per field, the value space is cut into *elementary intervals* at every rule boundary, and each
//! interval carries the bitset of the rules whose condition on that field it satisfies (a rule
//! without a condition on the field is in every set). A packet's candidates are the AND of one
//! bitset per field (found by binary search for ranges, by table for small fields); the first set
//! bit is the first matching rule, exactly what a linear scan in rule order finds.
//!
//! Fields: protocol, ingress interface, ICMP type (256-entry tables), source and destination
//! address (intervals per family: a CIDR is one interval), source and destination port
//! (intervals). Port conditions only ever match packets of protocols with ports, and ICMP type
//! conditions only ICMP packets, as in [`super::rules`]; both are tables of their own for the
//! packets they cannot apply to.
//!
//! Memory: `rules / 64` words per set, sets per field about twice the rules' boundaries: for
//! 1 000 rules some 16 words × a few thousand sets, well under a megabyte.

use std::net::IpAddr;

use dva_wire::ip_proto;
use ipnet::IpNet;

use super::rules::{has_ports, PortRange, Rule};
use super::PacketInfo;

/// A set of rules, by index.
type Bits = Box<[u64]>;

fn empty(words: usize) -> Bits {
    vec![0u64; words].into_boxed_slice()
}

#[inline]
fn set(b: &mut [u64], i: usize) {
    b[i / 64] |= 1 << (i % 64);
}

/// The elementary intervals of one ordered field and their rule sets.
#[derive(Debug, Clone)]
struct Intervals<T> {
    /// Interval `i` is `starts[i] ..= starts[i + 1] - 1` (the last one runs to the maximum);
    /// `starts[0]` is the minimum value.
    starts: Vec<T>,
    sets: Vec<Bits>,
}

impl<T: Copy + Ord + Default> Intervals<T> {
    /// `ranges[r]`: rule `r`'s inclusive ranges on this field, `None` for "any value".
    /// `succ(v)` is `v + 1`, or `None` at the maximum.
    fn new(ranges: &[Option<Vec<(T, T)>>], words: usize, succ: impl Fn(T) -> Option<T>) -> Self {
        let mut starts = vec![T::default()];
        for (lo, hi) in ranges.iter().flatten().flatten() {
            starts.push(*lo);
            if let Some(next) = succ(*hi) {
                starts.push(next);
            }
        }
        starts.sort_unstable();
        starts.dedup();
        let mut sets: Vec<Bits> = (0..starts.len()).map(|_| empty(words)).collect();
        for (r, rr) in ranges.iter().enumerate() {
            match rr {
                None => sets.iter_mut().for_each(|s| set(s, r)),
                Some(list) => {
                    for &(lo, hi) in list {
                        // Every elementary interval starting inside [lo, hi] lies inside it
                        // (each range's ends are interval boundaries).
                        let first = starts.partition_point(|s| *s < lo);
                        let end = starts.partition_point(|s| *s <= hi);
                        for s in &mut sets[first..end] {
                            set(s, r);
                        }
                    }
                }
            }
        }
        Intervals { starts, sets }
    }

    #[inline]
    fn lookup(&self, v: T) -> &[u64] {
        // starts[0] is the minimum, so the point is at least 1.
        let i = self.starts.partition_point(|s| *s <= v).saturating_sub(1);
        &self.sets[i]
    }
}

/// A 256-entry field (protocol, interface, ICMP type): one set per value, shared when equal.
#[derive(Debug, Clone)]
struct Table {
    index: Box<[u16; 256]>,
    sets: Vec<Bits>,
}

impl Table {
    /// `cond[r]`: the value rule `r` requires, `None` for any.
    fn new(cond: &[Option<u8>], words: usize) -> Table {
        let mut any = empty(words);
        for (r, c) in cond.iter().enumerate() {
            if c.is_none() {
                set(&mut any, r);
            }
        }
        let mut sets = vec![any.clone()];
        let mut index = Box::new([0u16; 256]);
        for v in 0..=255u8 {
            if !cond.contains(&Some(v)) {
                continue;
            }
            let mut s = any.clone();
            for (r, c) in cond.iter().enumerate() {
                if *c == Some(v) {
                    set(&mut s, r);
                }
            }
            index[usize::from(v)] = sets.len() as u16;
            sets.push(s);
        }
        Table { index, sets }
    }

    #[inline]
    fn lookup(&self, v: u8) -> &[u64] {
        &self.sets[usize::from(self.index[usize::from(v)])]
    }

    /// Rules without a condition on this field.
    #[inline]
    fn unconditioned(&self) -> &[u64] {
        &self.sets[0]
    }
}

#[derive(Debug, Clone)]
pub(crate) struct RuleIndex {
    words: usize,
    proto: Table,
    ingress: Table,
    icmp: Table,
    src4: Intervals<u32>,
    dst4: Intervals<u32>,
    src6: Intervals<u128>,
    dst6: Intervals<u128>,
    sport: Intervals<u32>,
    dport: Intervals<u32>,
    /// Rules without port conditions: the only candidates for a packet without ports.
    portless: Bits,
}

fn v4_ranges(nets: &[IpNet]) -> Option<Vec<(u32, u32)>> {
    if nets.is_empty() {
        return None;
    }
    Some(
        nets.iter()
            .filter_map(|n| match n {
                IpNet::V4(n) => Some((n.network().to_bits(), n.broadcast().to_bits())),
                IpNet::V6(_) => None,
            })
            .collect(),
    )
}

fn v6_ranges(nets: &[IpNet]) -> Option<Vec<(u128, u128)>> {
    if nets.is_empty() {
        return None;
    }
    Some(
        nets.iter()
            .filter_map(|n| match n {
                IpNet::V6(n) => Some((n.network().to_bits(), n.broadcast().to_bits())),
                IpNet::V4(_) => None,
            })
            .collect(),
    )
}

fn port_ranges(ports: &[PortRange]) -> Option<Vec<(u32, u32)>> {
    if ports.is_empty() {
        return None;
    }
    // An empty range (first > last) matches nothing, as in the linear scan.
    Some(
        ports
            .iter()
            .filter(|p| p.first <= p.last)
            .map(|p| (u32::from(p.first), u32::from(p.last)))
            .collect(),
    )
}

impl RuleIndex {
    pub(crate) fn new(rules: &[Rule]) -> RuleIndex {
        let n = rules.len();
        let words = n.div_ceil(64).max(1);
        let succ32 = |v: u32| v.checked_add(1);
        let succ128 = |v: u128| v.checked_add(1);
        let icmp: Vec<Option<u8>> = rules.iter().map(|r| r.icmp_type).collect();
        let mut portless = empty(words);
        for (i, r) in rules.iter().enumerate() {
            if r.src_ports.is_empty() && r.dst_ports.is_empty() {
                set(&mut portless, i);
            }
        }
        RuleIndex {
            words,
            proto: Table::new(&rules.iter().map(|r| r.proto).collect::<Vec<_>>(), words),
            ingress: Table::new(
                &rules.iter().map(|r| r.ingress_if).collect::<Vec<_>>(),
                words,
            ),
            icmp: Table::new(&icmp, words),
            src4: Intervals::new(
                &rules.iter().map(|r| v4_ranges(&r.src)).collect::<Vec<_>>(),
                words,
                succ32,
            ),
            dst4: Intervals::new(
                &rules.iter().map(|r| v4_ranges(&r.dst)).collect::<Vec<_>>(),
                words,
                succ32,
            ),
            src6: Intervals::new(
                &rules.iter().map(|r| v6_ranges(&r.src)).collect::<Vec<_>>(),
                words,
                succ128,
            ),
            dst6: Intervals::new(
                &rules.iter().map(|r| v6_ranges(&r.dst)).collect::<Vec<_>>(),
                words,
                succ128,
            ),
            sport: Intervals::new(
                &rules
                    .iter()
                    .map(|r| port_ranges(&r.src_ports))
                    .collect::<Vec<_>>(),
                words,
                |v| (v < 65_535).then_some(v + 1),
            ),
            dport: Intervals::new(
                &rules
                    .iter()
                    .map(|r| port_ranges(&r.dst_ports))
                    .collect::<Vec<_>>(),
                words,
                |v| (v < 65_535).then_some(v + 1),
            ),
            portless,
        }
    }

    /// Index of the first rule matching `pkt`, as a linear scan in order would find it.
    #[inline]
    pub(crate) fn first_match(&self, pkt: &PacketInfo) -> Option<usize> {
        let k = &pkt.key;
        let proto = self.proto.lookup(k.proto);
        let ingress = self.ingress.lookup(pkt.ingress_if);
        let icmp = match (k.proto, pkt.icmp) {
            (ip_proto::ICMP | ip_proto::ICMPV6, Some((ty, _))) => self.icmp.lookup(ty),
            _ => self.icmp.unconditioned(),
        };
        let (src, dst) = match (k.src, k.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                (self.src4.lookup(s.to_bits()), self.dst4.lookup(d.to_bits()))
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                (self.src6.lookup(s.to_bits()), self.dst6.lookup(d.to_bits()))
            }
            // Mixed families never come from a parsed packet; match per address anyway.
            (IpAddr::V4(s), IpAddr::V6(d)) => {
                (self.src4.lookup(s.to_bits()), self.dst6.lookup(d.to_bits()))
            }
            (IpAddr::V6(s), IpAddr::V4(d)) => {
                (self.src6.lookup(s.to_bits()), self.dst4.lookup(d.to_bits()))
            }
        };
        let (sp, dp): (&[u64], &[u64]) = if has_ports(k.proto) {
            (
                self.sport.lookup(u32::from(k.src_port)),
                self.dport.lookup(u32::from(k.dst_port)),
            )
        } else {
            (&self.portless, &self.portless)
        };
        for w in 0..self.words {
            let m = proto[w] & ingress[w] & icmp[w] & src[w] & dst[w] & sp[w] & dp[w];
            if m != 0 {
                return Some(w * 64 + m.trailing_zeros() as usize);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::super::rules::{Action, CompiledRules, RuleSet};
    use super::*;
    use crate::nat::testpkt::Rng;
    use dva_flow::FlowKey;

    // Small value domains, so rules overlap and packets hit their edges.
    const PROTOS: [u8; 5] = [
        ip_proto::TCP,
        ip_proto::UDP,
        ip_proto::ICMP,
        ip_proto::ICMPV6,
        47,
    ];

    fn addr(rng: &mut Rng, v6: bool) -> IpAddr {
        let x = rng.below(64) as u8;
        if v6 {
            IpAddr::from([
                0x20,
                0x01,
                0x0d,
                0xb8,
                0,
                x >> 4,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                x,
            ])
        } else {
            IpAddr::from([198, 18, x >> 4, x])
        }
    }

    fn net(rng: &mut Rng) -> IpNet {
        let v6 = rng.chance(30);
        let a = addr(rng, v6);
        let len = if v6 {
            [128u8, 124, 120, 64, 0][rng.below(5) as usize]
        } else {
            [32u8, 28, 24, 20, 16, 0][rng.below(6) as usize]
        };
        IpNet::new(a, len).expect("prefix length")
    }

    fn ports(rng: &mut Rng) -> Vec<PortRange> {
        (0..rng.below(3))
            .map(|_| {
                let first = rng.below(40) as u16 * 25;
                let last = if rng.chance(5) {
                    first.saturating_sub(1) // an empty range: matches nothing
                } else if rng.chance(5) {
                    65_535
                } else {
                    first + rng.below(60) as u16
                };
                PortRange { first, last }
            })
            .collect()
    }

    fn rule(rng: &mut Rng) -> Rule {
        let proto = rng.chance(70).then(|| PROTOS[rng.below(5) as usize]);
        let icmp = matches!(proto, Some(ip_proto::ICMP | ip_proto::ICMPV6));
        let with_ports = matches!(proto, Some(ip_proto::TCP | ip_proto::UDP)) || proto.is_none();
        Rule {
            name: None,
            ingress_if: rng.chance(50).then(|| rng.below(3) as u8),
            src: (0..rng.below(3)).map(|_| net(rng)).collect(),
            dst: (0..rng.below(3)).map(|_| net(rng)).collect(),
            proto,
            src_ports: if with_ports && rng.chance(30) {
                ports(rng)
            } else {
                Vec::new()
            },
            dst_ports: if with_ports && rng.chance(60) {
                ports(rng)
            } else {
                Vec::new()
            },
            icmp_type: (icmp && rng.chance(50)).then(|| [0u8, 3, 8, 128][rng.below(4) as usize]),
            action: [Action::Accept, Action::Drop, Action::Reject][rng.below(3) as usize],
        }
    }

    fn packet(rng: &mut Rng) -> PacketInfo {
        let v6 = rng.chance(30);
        let proto = PROTOS[rng.below(5) as usize];
        let port = |rng: &mut Rng| {
            if rng.chance(10) {
                65_535
            } else {
                rng.below(1100) as u16
            }
        };
        PacketInfo {
            ingress_if: rng.below(4) as u8,
            key: FlowKey {
                proto,
                src: addr(rng, v6),
                dst: addr(rng, v6),
                src_port: port(rng),
                dst_port: port(rng),
            },
            tcp_flags: 2,
            tcp: Default::default(),
            icmp: matches!(proto, ip_proto::ICMP | ip_proto::ICMPV6)
                .then(|| ([0u8, 3, 8, 128, 11][rng.below(5) as usize], 0)),
            icmp_inner: None,
            len: 60,
        }
    }

    #[test]
    fn the_index_finds_the_rule_a_scan_in_order_finds() {
        let mut rng = Rng(7);
        let mut matched = 0;
        for round in 0..60 {
            let n = [16usize, 17, 63, 64, 65, 200, 700][round % 7];
            let rules: Vec<Rule> = (0..n).map(|_| rule(&mut rng)).collect();
            let set = RuleSet {
                rules: rules.clone(),
                default_action: Action::Drop,
            };
            let compiled = CompiledRules::new(&set);
            let index = RuleIndex::new(&rules);
            for _ in 0..2_000 {
                let p = packet(&mut rng);
                let want = compiled.scan(&p);
                assert_eq!(index.first_match(&p), want, "{p:?} against {n} rules");
                matched += usize::from(want.is_some());
            }
        }
        // The comparison means something only if packets match rules, and not all at rule 0.
        assert!(matched > 20_000, "{matched}");
    }

    #[test]
    fn an_empty_rule_set_matches_nothing() {
        let mut rng = Rng(1);
        let index = RuleIndex::new(&[]);
        assert_eq!(index.first_match(&packet(&mut rng)), None);
    }
}
