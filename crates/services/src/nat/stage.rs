//! NAT as a chain [`Stage`]: translates the bytes in place and the descriptor with them.

use std::any::Any;
use std::collections::BTreeMap;

use dva_flow::FlowKey;

use crate::conntrack::{Conn, Direction};
use crate::stage::{Bytes, FlowSet, Hint, Import, Packet, Stage, Verdict};

use super::rewrite::{self, ParseError};
use super::{Nat, NatDropReason, NatVerdict};

/// Drop reasons as the data plane counts them, indexed like [`NatDropReason::ALL`] (`NoBinding`
/// is never a drop here: it punts).
const DROP_NAMES: [&str; NatDropReason::ALL.len()] = [
    "nat-ports-exhausted",
    "nat-table-full",
    "malformed-ip",
    "fragment-unsupported",
    "no-state-anywhere",
];

/// The key a translating stage's table holds a packet under: an ICMP error's is the flow it
/// quotes, as that flow's packets travel the error's way.
#[inline]
pub(crate) fn lookup_key(pkt: &Packet) -> FlowKey {
    pkt.info
        .icmp_inner
        .map(|k| k.reversed())
        .unwrap_or(pkt.info.key)
}

/// The descriptor after a translating stage rewrote the packet: `out`, the tuple it says the
/// packet left with (TCP, UDP, echo), or else (ICMP errors) what the bytes now say.
#[inline]
pub(crate) fn after_translation(
    pkt: &mut Packet,
    p: &rewrite::Parsed,
    bytes: &[u8],
    out: Option<FlowKey>,
) {
    match out {
        Some(key) if pkt.info.icmp_inner.is_none() => pkt.retuple(key, None),
        _ => {
            let (key, inner) = p.tuple_in(bytes);
            pkt.retuple(key, inner);
        }
    }
}

/// The carried lookup, for the `process_parsed` of a translating stage: only for the packets it
/// looks up by their own tuple (an ICMP error's quote is looked up again, rarely).
#[inline]
pub(crate) fn carried(pkt: &Packet) -> Option<Option<(u32, Direction)>> {
    if pkt.info.icmp_inner.is_some() {
        return None;
    }
    match pkt.hint() {
        Hint::Unknown => None,
        Hint::Missing => Some(None),
        Hint::Found(slot, dir) => Some(Some((slot, dir))),
    }
}

impl Stage for Nat {
    fn name(&self) -> &'static str {
        "nat"
    }

    fn rewrites(&self) -> bool {
        true
    }

    #[inline]
    fn lookup(&mut self, now: u64, pkt: &mut Packet) -> Option<Direction> {
        let found = self.table.lookup(now, &lookup_key(pkt));
        pkt.set_hint(found.map_or(Hint::Missing, |(s, d)| Hint::Found(s, d)));
        found.map(|(_, d)| d)
    }

    #[inline]
    fn process(&mut self, now: u64, pkt: &mut Packet, bytes: &mut Bytes<'_>) -> Verdict {
        let Some(buf) = bytes.writable() else {
            return Verdict::Drop(NatDropReason::Malformed as u8);
        };
        let v = match rewrite::from_descriptor(pkt, buf) {
            Ok(p) => {
                let found = carried(pkt);
                self.out = None;
                let v = self.process_parsed(now, pkt.bucket, pkt.info.ingress_if, &p, found, buf);
                if v == NatVerdict::Translated {
                    after_translation(pkt, &p, buf, self.out);
                }
                v
            }
            Err(ParseError::Malformed) => self.drop(NatDropReason::Malformed),
            Err(e) => self.unparsed(pkt.info.ingress_if, e),
        };
        match v {
            NatVerdict::Translated | NatVerdict::Untouched => Verdict::Forward,
            NatVerdict::Drop(NatDropReason::NoBinding) => Verdict::Punt,
            NatVerdict::Drop(r) => Verdict::Drop(r as u8),
        }
    }

    fn drop_reasons(&self) -> &'static [&'static str] {
        &DROP_NAMES
    }

    fn expire(&mut self, now: u64, budget: usize, _gone: Option<&mut dyn FnMut(&Conn)>) -> usize {
        self.table.expire(now, budget)
    }

    fn len(&self) -> usize {
        self.table.len()
    }

    fn export_bucket(&self, now: u64, bucket: u16, out: &mut FlowSet) {
        out.nat.extend(self.table.export_bucket(now, bucket));
    }

    fn import(
        &mut self,
        now: u64,
        set: &mut FlowSet,
        how: &mut dyn FnMut(u16) -> Option<Import>,
    ) -> usize {
        for b in std::mem::take(&mut set.nat) {
            let _ = match how(b.bucket) {
                None => continue,
                Some(Import::Fill) => Nat::import(self, now, b),
                Some(Import::Replace) => self.upsert(now, b),
            };
        }
        0
    }

    fn remove_bucket(&mut self, bucket: u16) -> usize {
        self.table.remove_bucket(bucket)
    }

    fn replicate_flow(&mut self, now: u64, key: &FlowKey, out: &mut FlowSet) {
        if let Some((b, _)) = self.binding_of(now, key) {
            out.nat.push(b.clone());
        }
    }

    fn replicate_all(&self, out: &mut FlowSet) {
        out.nat.extend(self.bindings().cloned());
    }

    fn annotate(&mut self, now: u64, key: &FlowKey, note: &mut crate::stage::FlowNote) {
        note.nat = self
            .binding_of(now, key)
            .map(|(b, _)| b.xlat)
            .or_else(|| self.binding_of(now, &key.reversed()).map(|(b, _)| b.xlat));
    }

    fn counters(&self, out: &mut BTreeMap<String, u64>) {
        out.insert("nat_bindings".into(), self.table.len() as u64);
        out.insert("nat_translated".into(), self.stats.translated);
        out.insert("nat_bindings_created".into(), self.stats.bindings_created);
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    //! Firewall and NAT through the `Stage` trait, as the data plane runs them: one descriptor
    //! per packet, lookups first, the chain backwards for replies; after each translation the
    //! descriptor says what a fresh parse of the bytes would.
    use dva_wire::tcp::flags::*;

    use super::super::testpkt::*;
    use super::super::{NatConfig, SnatRule, DEFAULT_PORTS};
    use super::*;
    use crate::firewall::{Action, ConntrackConfig, Firewall, NewFlowPolicy, PacketInfo, RuleSet};

    const SEC: u64 = 1_000_000_000;

    /// The descriptor the data plane builds (from its classifier; here from NAT's parser).
    fn describe(bytes: &[u8]) -> Packet {
        let p = rewrite::parse(bytes).expect("test packet parses");
        let (icmp, inner) = match p.kind {
            rewrite::Kind::IcmpError(i) => (Some((bytes[p.l4], bytes[p.l4 + 1])), Some(i.key)),
            rewrite::Kind::Echo { .. } => (Some((bytes[p.l4], 0)), None),
            _ => (None, None),
        };
        let info = PacketInfo {
            ingress_if: 0,
            key: p.key,
            tcp_flags: p.tcp_flags(),
            tcp: Packet::tcp_segment(bytes, p.key.proto, false, p.l4),
            icmp,
            icmp_inner: inner,
            len: p.end as u32,
        };
        Packet::new(info, 7, NewFlowPolicy::Create, false, p.l4, p.end)
    }

    fn run(chain: &mut [Box<dyn Stage>], now: u64, bytes: &mut [u8]) -> (Verdict, Packet) {
        let mut pkt = describe(bytes);
        let mut reverse = false;
        for (i, s) in chain.iter_mut().enumerate() {
            pkt.enter(i);
            reverse |= s.lookup(now, &mut pkt) == Some(Direction::Reply);
        }
        let n = chain.len();
        for k in 0..n {
            let i = if reverse { n - 1 - k } else { k };
            pkt.enter(i);
            let v = chain[i].process(now, &mut pkt, &mut Bytes::Writable(bytes));
            if v != Verdict::Forward {
                return (v, pkt);
            }
        }
        (Verdict::Forward, pkt)
    }

    fn chain() -> Vec<Box<dyn Stage>> {
        // Window tracking is the firewall's own business (its tests); these segments carry no
        // real sequence numbers.
        let limits = ConntrackConfig {
            tcp_liberal: true,
            ..Default::default()
        };
        let fw = Firewall::new(RuleSet::with_default(Action::Accept), limits);
        let nat = Nat::new(
            NatConfig {
                snat: vec![SnatRule {
                    name: None,
                    src: vec!["198.18.1.0/24".parse().expect("net")],
                    dst: Vec::new(),
                    proto: None,
                    to: vec![ip("198.19.0.1")],
                    ports: DEFAULT_PORTS,
                }],
                ..Default::default()
            },
            4096,
        );
        vec![Box::new(fw), Box::new(nat)]
    }

    #[test]
    fn the_descriptor_follows_the_translation_both_ways() {
        let mut c = chain();
        let mut syn = tcp4("198.18.1.2", 40000, "198.19.2.2", 80, SYN);
        let (v, d) = run(&mut c, SEC, &mut syn);
        assert_eq!(v, Verdict::Forward);
        let out = check(&syn);
        assert_eq!(out.src, ip("198.19.0.1"), "masqueraded");
        assert_eq!(d.info.key, out, "the descriptor is the packet as it leaves");
        assert_eq!(
            d.created.map(|k| k.src),
            Some(ip("198.18.1.2")),
            "the firewall tracked it as the inside host sent it"
        );

        // The reply, to the pool address: NAT first, then the firewall sees the flow it tracked.
        let mut synack = tcp4("198.19.2.2", 80, "198.19.0.1", out.src_port, SYN | ACK);
        let (v, d) = run(&mut c, SEC, &mut synack);
        assert_eq!(v, Verdict::Forward);
        let back = check(&synack);
        assert_eq!(back.dst, ip("198.18.1.2"));
        assert_eq!(back.dst_port, 40000);
        assert_eq!(d.info.key, back);
        assert!(d.known, "a flow the stages hold");
        let fw = c[0]
            .as_any_mut()
            .downcast_mut::<Firewall>()
            .expect("firewall");
        assert_eq!(
            fw.stats().established,
            1,
            "the reply went through conntrack"
        );

        // An ICMP error about the flow, from the far side: outer and quoted tuples translated.
        let quote = tcp4("198.19.0.1", out.src_port, "198.19.2.2", 80, ACK);
        let mut err = icmp_error("198.19.9.9", "198.19.0.1", 3, 4, &quote);
        let (v, d) = run(&mut c, SEC, &mut err);
        assert_eq!(v, Verdict::Forward);
        let outer = check(&err);
        assert_eq!(outer.dst, ip("198.18.1.2"));
        assert_eq!(d.info.key, outer);
        assert_eq!(d.info.icmp_inner, Some(quoted_key(&err)));
        assert_eq!(quoted_key(&err).src, ip("198.18.1.2"));
    }

    #[test]
    fn a_reply_without_a_binding_punts_and_drop_names_line_up() {
        let mut c = chain();
        let mut stray = tcp4("198.19.2.2", 80, "198.19.0.1", 5555, ACK);
        let (v, _) = run(&mut c, SEC, &mut stray.clone());
        assert_eq!(
            v,
            Verdict::Drop(2),
            "the firewall, first, finds no connection: invalid-state"
        );
        assert_eq!(c[0].drop_reasons()[2], "invalid-state");
        // NAT alone: not its flow, and it may not create one: somebody else's.
        let nat = c.remove(1);
        let mut c = vec![nat];
        let (v, _) = run(&mut c, SEC, &mut stray);
        assert_eq!(v, Verdict::Punt);
        assert_eq!(
            c[0].drop_reasons().len(),
            NatDropReason::ALL.len(),
            "one name per reason"
        );
        assert_eq!(
            c[0].drop_reasons()[NatDropReason::PortsExhausted as usize],
            "nat-ports-exhausted"
        );
    }
}
