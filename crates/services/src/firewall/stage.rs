//! The firewall as a chain [`Stage`]: rules and connection tracking over the packet descriptor.

use std::any::Any;
use std::collections::BTreeMap;

use crate::conntrack::{Conn, ConnId, Conntrack, Direction};
use crate::stage::{Bytes, FlowSet, Hint, Import, Packet, Stage, Verdict};

use super::{DropReason, Firewall, Verdict as FwVerdict};

/// Drop reasons as the data plane counts them, indexed like [`DropReason::ALL`].
const DROP_NAMES: [&str; DropReason::ALL.len()] = [
    "firewall-rule",
    "firewall-default-policy",
    "invalid-state",
    "conntrack-table-full",
    "icmp-error-unrelated",
    "tcp-out-of-window",
];

impl Stage for Firewall {
    fn name(&self) -> &'static str {
        "firewall"
    }

    #[inline]
    fn lookup(&mut self, now: u64, pkt: &mut Packet) -> Option<Direction> {
        // ICMP errors are matched by the flow they quote, in `process` (one whose quote could
        // not be read is looked up by its own tuple here, and that is then ignored).
        if pkt.info.icmp_inner.is_none() {
            let h = match self.ct.lookup(now, &pkt.info.key) {
                Some((id, dir)) => Hint::Found(id.raw(), dir),
                None => Hint::Missing,
            };
            pkt.set_hint(h);
        }
        None
    }

    #[inline]
    fn process(&mut self, now: u64, pkt: &mut Packet, _bytes: &mut Bytes<'_>) -> Verdict {
        let found = match pkt.hint() {
            Hint::Found(id, dir) => Some((ConnId::from_raw(id), dir)),
            Hint::Missing => None,
            Hint::Unknown => self.ct.lookup(now, &pkt.info.key),
        };
        let created = self.stats.created;
        let v = self.process_found(now, pkt.bucket, &pkt.info, pkt.policy, found);
        if self.stats.created != created {
            pkt.created = Some(pkt.info.key);
            pkt.rule = Some(self.last_rule);
        }
        match v {
            FwVerdict::Accept => Verdict::Forward,
            FwVerdict::NoState => Verdict::Punt,
            FwVerdict::Reject(kind) => {
                pkt.rule = Some(self.last_rule);
                Verdict::Reject(kind)
            }
            FwVerdict::Drop(reason) => {
                if matches!(reason, DropReason::RuleDrop | DropReason::DefaultPolicy) {
                    pkt.rule = Some(self.last_rule);
                }
                Verdict::Drop(reason as u8)
            }
        }
    }

    fn drop_reasons(&self) -> &'static [&'static str] {
        &DROP_NAMES
    }

    fn expire(&mut self, now: u64, budget: usize, gone: Option<&mut dyn FnMut(&Conn)>) -> usize {
        match gone {
            Some(f) => self.ct.expire_with(now, budget, f),
            None => self.ct.expire(now, budget),
        }
    }

    fn len(&self) -> usize {
        self.ct.len()
    }

    fn export_bucket(&self, now: u64, bucket: u16, out: &mut FlowSet) {
        out.conns.extend(self.ct.export_bucket(now, bucket));
    }

    fn import(
        &mut self,
        now: u64,
        set: &mut FlowSet,
        how: &mut dyn FnMut(u16) -> Option<Import>,
    ) -> usize {
        let mut taken = 0;
        for c in std::mem::take(&mut set.conns) {
            let ok = match how(c.bucket) {
                None => false,
                Some(Import::Fill) => self.ct.import(now, c).is_ok(),
                Some(Import::Replace) => self.ct.upsert(now, c).is_ok(),
            };
            taken += usize::from(ok);
        }
        taken
    }

    fn remove_bucket(&mut self, bucket: u16) -> usize {
        self.ct.remove_bucket(bucket)
    }

    fn counters(&self, out: &mut BTreeMap<String, u64>) {
        out.insert("conntrack_early_drops".into(), self.ct.early_drops());
    }

    fn rule_hits(&self) -> Option<(Vec<u64>, u64)> {
        Some((self.rule_hits.clone(), self.default_hits))
    }

    fn conntrack(&self) -> Option<&Conntrack> {
        Some(&self.ct)
    }

    fn conntrack_mut(&mut self) -> Option<&mut Conntrack> {
        Some(&mut self.ct)
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}
