//! The load balancer as a chain [`Stage`]: full NAT in place, the descriptor updated with it.

use std::any::Any;
use std::collections::BTreeMap;

use dva_flow::FlowKey;

use crate::conntrack::{Conn, Direction};
use crate::nat::rewrite::{self, ParseError};
use crate::nat::stage::{after_translation, carried, lookup_key};
use crate::stage::{Bytes, FlowNote, FlowSet, Hint, Import, Packet, Stage, Verdict};

use super::{BackendStats, Lb, LbDropReason, LbVerdict};

/// Drop reasons as the data plane counts them, indexed like [`LbDropReason::ALL`] (`NoFlow` is
/// never a drop here: it punts).
const DROP_NAMES: [&str; LbDropReason::ALL.len()] = [
    "no-state-anywhere",
    "lb-no-healthy-backend",
    "lb-ports-exhausted",
    "lb-table-full",
    "malformed-ip",
    "fragment-unsupported",
];

impl Stage for Lb {
    fn name(&self) -> &'static str {
        "lb"
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
            return Verdict::Drop(LbDropReason::Malformed as u8);
        };
        let v = match rewrite::from_descriptor(pkt, buf) {
            Ok(p) => {
                let found = carried(pkt);
                self.out = None;
                let v = self.process_parsed(now, pkt.bucket, &p, found, buf);
                if v == LbVerdict::Translated {
                    after_translation(pkt, &p, buf, self.out);
                }
                v
            }
            Err(ParseError::Malformed) => self.drop(LbDropReason::Malformed),
            Err(e) => self.unparsed(e),
        };
        match v {
            LbVerdict::Translated | LbVerdict::Untouched => Verdict::Forward,
            LbVerdict::Drop(LbDropReason::NoFlow) => Verdict::Punt,
            LbVerdict::Drop(r) => Verdict::Drop(r as u8),
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
        out.lb.extend(Lb::export_bucket(self, now, bucket));
    }

    fn import(
        &mut self,
        now: u64,
        set: &mut FlowSet,
        how: &mut dyn FnMut(u16) -> Option<Import>,
    ) -> usize {
        for b in std::mem::take(&mut set.lb) {
            let _ = match how(b.bucket) {
                None => continue,
                Some(Import::Fill) => Lb::import(self, now, b),
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
            out.lb.push(b.clone());
        }
    }

    fn replicate_all(&self, out: &mut FlowSet) {
        out.lb.extend(self.flows().cloned());
    }

    fn annotate(&mut self, now: u64, key: &FlowKey, note: &mut FlowNote) {
        note.backend = self
            .binding_of(now, key)
            .map(|(b, _)| b.xlat)
            .or_else(|| self.binding_of(now, &key.reversed()).map(|(b, _)| b.xlat))
            .map(|x| std::net::SocketAddr::new(x.dst, x.dst_port));
    }

    fn counters(&self, out: &mut BTreeMap<String, u64>) {
        out.insert("lb_flows".into(), self.table.len() as u64);
    }

    fn backend_stats(&self, out: &mut Vec<BackendStats>) {
        out.extend(Lb::backend_stats(self));
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}
