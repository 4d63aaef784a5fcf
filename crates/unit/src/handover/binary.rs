//! Compact binary encoding of `Replicate` messages: the one handover message sent all the time
//! (every change of every replicated flow), so it is kept small and cheap to build, about 90
//! bytes a connection instead of about 400 in JSON.
//!
//! A body starts with [`MAGIC`] (never `{`, so it cannot be taken for a JSON handover message)
//! and a version byte; a receiver refuses a version it does not know. Version 1, big-endian:
//!
//! ```text
//! MAGIC u8 | VERSION u8 | KIND_REPLICATE u8 | from u32 | conns u16 | nat u16 | lb u16
//! conn:    key | bucket u16 | state u8 | sub u8 | created, last_seen, orig_packets, orig_bytes,
//!          reply_packets, reply_bytes u64 | window: 2 x (end, maxend, maxwin, maxack u32,
//!          scale u8, flags u8)
//! binding: bucket u16 | orig key | xlat key | state bits u8 | created, last_seen u64
//! key:     proto u8 | family u8 (4 or 6) | src, dst (4 or 16 bytes) | src_port, dst_port u16
//! ```

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use dva_flow::{FlowKey, UnitId};
use dva_services::conntrack::{Conn, ConnState, TcpPeer, TcpState, TcpWindow};
use dva_services::nat::{Binding, FlowState};

use super::Flows;

pub const MAGIC: u8 = 0xd1;
pub const VERSION: u8 = 1;
const KIND_REPLICATE: u8 = 1;
/// Offset of the three entry counts in a body.
const COUNTS_AT: usize = 7;

/// Bodies of at most `max_body` bytes carrying `flows` (none if there are none).
pub fn replicate_bodies(from: UnitId, flows: &Flows, max_body: usize) -> Vec<Vec<u8>> {
    let mut bodies = Vec::new();
    let mut body = Vec::new();
    let mut counts = [0u16; 3];
    let mut entry = Vec::with_capacity(128);
    let items = flows
        .conns
        .iter()
        .map(Item::Conn)
        .chain(flows.nat.iter().map(|b| Item::Binding(0, b)))
        .chain(flows.lb.iter().map(|b| Item::Binding(1, b)));
    for item in items {
        entry.clear();
        let kind = match item {
            Item::Conn(c) => {
                put_conn(&mut entry, c);
                0
            }
            Item::Binding(k, b) => {
                put_binding(&mut entry, b);
                1 + k
            }
        };
        // Kinds go in order (conns, nat, lb) within a body, so a body starts anew when one is full.
        if !body.is_empty() && (body.len() + entry.len() > max_body || counts[kind] == u16::MAX) {
            bodies.push(finish(std::mem::take(&mut body), counts));
            counts = [0; 3];
        }
        if body.is_empty() {
            body.extend_from_slice(&[MAGIC, VERSION, KIND_REPLICATE]);
            body.extend_from_slice(&from.to_be_bytes());
            body.extend_from_slice(&[0; 6]);
        }
        body.extend_from_slice(&entry);
        counts[kind] += 1;
    }
    if !body.is_empty() {
        bodies.push(finish(body, counts));
    }
    bodies
}

enum Item<'a> {
    Conn(&'a Conn),
    Binding(usize, &'a Binding),
}

fn finish(mut body: Vec<u8>, counts: [u16; 3]) -> Vec<u8> {
    for (i, n) in counts.iter().enumerate() {
        body[COUNTS_AT + 2 * i..COUNTS_AT + 2 + 2 * i].copy_from_slice(&n.to_be_bytes());
    }
    body
}

/// `(from, flows)` of a binary `Replicate` body; `None` if it is malformed, truncated, of another
/// version or has bytes left over.
pub fn decode_replicate(body: &[u8]) -> Option<(UnitId, Flows)> {
    let mut r = Reader(body);
    if (r.u8()?, r.u8()?, r.u8()?) != (MAGIC, VERSION, KIND_REPLICATE) {
        return None;
    }
    let from = r.u32()?;
    let (nc, nn, nl) = (r.u16()?, r.u16()?, r.u16()?);
    let mut flows = Flows::default();
    for _ in 0..nc {
        flows.conns.push(r.conn()?);
    }
    for _ in 0..nn {
        flows.nat.push(r.binding()?);
    }
    for _ in 0..nl {
        flows.lb.push(r.binding()?);
    }
    r.0.is_empty().then_some((from, flows))
}

fn put_key(b: &mut Vec<u8>, k: &FlowKey) {
    b.push(k.proto);
    match (k.src, k.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            b.push(4);
            b.extend_from_slice(&s.octets());
            b.extend_from_slice(&d.octets());
        }
        (s, d) => {
            let v6 = |a: IpAddr| match a {
                IpAddr::V4(a) => a.to_ipv6_mapped(),
                IpAddr::V6(a) => a,
            };
            b.push(6);
            b.extend_from_slice(&v6(s).octets());
            b.extend_from_slice(&v6(d).octets());
        }
    }
    b.extend_from_slice(&k.src_port.to_be_bytes());
    b.extend_from_slice(&k.dst_port.to_be_bytes());
}

fn put_conn(b: &mut Vec<u8>, c: &Conn) {
    put_key(b, &c.key);
    b.extend_from_slice(&c.bucket.to_be_bytes());
    let (tag, sub) = match c.state {
        ConnState::Tcp(s) => (0, s as u8),
        ConnState::Udp { replied } => (1, u8::from(replied)),
        ConnState::Icmp { replied } => (2, u8::from(replied)),
        ConnState::Generic { replied } => (3, u8::from(replied)),
    };
    b.extend_from_slice(&[tag, sub]);
    for v in [
        c.created,
        c.last_seen,
        c.orig_packets,
        c.orig_bytes,
        c.reply_packets,
        c.reply_bytes,
    ] {
        b.extend_from_slice(&v.to_be_bytes());
    }
    for p in [&c.tcp_window.original, &c.tcp_window.reply] {
        for v in [p.end, p.maxend, p.maxwin, p.maxack] {
            b.extend_from_slice(&v.to_be_bytes());
        }
        b.extend_from_slice(&[p.scale, p.flags]);
    }
}

fn put_binding(b: &mut Vec<u8>, x: &Binding) {
    b.extend_from_slice(&x.bucket.to_be_bytes());
    put_key(b, &x.orig);
    put_key(b, &x.xlat);
    let s = &x.state;
    b.push(
        u8::from(s.replied)
            | u8::from(s.fin_orig) << 1
            | u8::from(s.fin_reply) << 2
            | u8::from(s.rst) << 3,
    );
    b.extend_from_slice(&x.created.to_be_bytes());
    b.extend_from_slice(&x.last_seen.to_be_bytes());
}

const TCP_STATES: [TcpState; 10] = [
    TcpState::None,
    TcpState::SynSent,
    TcpState::SynRecv,
    TcpState::Established,
    TcpState::FinWait,
    TcpState::CloseWait,
    TcpState::LastAck,
    TcpState::TimeWait,
    TcpState::Close,
    TcpState::SynSent2,
];

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take::<1>().map(|[b]| b)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take().map(u16::from_be_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_be_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take().map(u64::from_be_bytes)
    }
    fn bool(&mut self) -> Option<bool> {
        match self.u8()? {
            0 => Some(false),
            1 => Some(true),
            _ => None,
        }
    }

    fn key(&mut self) -> Option<FlowKey> {
        let proto = self.u8()?;
        let (src, dst) = match self.u8()? {
            4 => (
                IpAddr::V4(Ipv4Addr::from(self.take::<4>()?)),
                IpAddr::V4(Ipv4Addr::from(self.take::<4>()?)),
            ),
            6 => (
                IpAddr::V6(Ipv6Addr::from(self.take::<16>()?)),
                IpAddr::V6(Ipv6Addr::from(self.take::<16>()?)),
            ),
            _ => return None,
        };
        Some(FlowKey {
            proto,
            src,
            dst,
            src_port: self.u16()?,
            dst_port: self.u16()?,
        })
    }

    fn conn(&mut self) -> Option<Conn> {
        let key = self.key()?;
        let bucket = self.u16()?;
        let state = match self.u8()? {
            0 => ConnState::Tcp(*TCP_STATES.get(usize::from(self.u8()?))?),
            1 => ConnState::Udp {
                replied: self.bool()?,
            },
            2 => ConnState::Icmp {
                replied: self.bool()?,
            },
            3 => ConnState::Generic {
                replied: self.bool()?,
            },
            _ => return None,
        };
        let mut v = [0u64; 6];
        for x in &mut v {
            *x = self.u64()?;
        }
        let mut peer = || -> Option<TcpPeer> {
            Some(TcpPeer {
                end: self.u32()?,
                maxend: self.u32()?,
                maxwin: self.u32()?,
                maxack: self.u32()?,
                scale: self.u8()?,
                flags: self.u8()?,
            })
        };
        let tcp_window = TcpWindow {
            original: peer()?,
            reply: peer()?,
        };
        Some(Conn {
            key,
            bucket,
            state,
            created: v[0],
            last_seen: v[1],
            orig_packets: v[2],
            orig_bytes: v[3],
            reply_packets: v[4],
            reply_bytes: v[5],
            tcp_window,
        })
    }

    fn binding(&mut self) -> Option<Binding> {
        let bucket = self.u16()?;
        let orig = self.key()?;
        let xlat = self.key()?;
        let bits = self.u8()?;
        if bits & !0x0f != 0 {
            return None;
        }
        Some(Binding {
            bucket,
            orig,
            xlat,
            state: FlowState {
                replied: bits & 1 != 0,
                fin_orig: bits & 2 != 0,
                fin_reply: bits & 4 != 0,
                rst: bits & 8 != 0,
            },
            created: self.u64()?,
            last_seen: self.u64()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(i: u16, v6: bool) -> Conn {
        let (src, dst): (IpAddr, IpAddr) = if v6 {
            (
                "2001:db8:1::2".parse().unwrap(),
                "2001:db8:2::2".parse().unwrap(),
            )
        } else {
            ("198.18.1.2".parse().unwrap(), "198.18.2.2".parse().unwrap())
        };
        let mut w = TcpWindow::default();
        w.original.end = 0xdead_beef;
        w.reply.scale = 7;
        w.reply.flags = 3;
        Conn {
            key: FlowKey {
                proto: 6,
                src,
                dst,
                src_port: 1000 + i,
                dst_port: 80,
            },
            bucket: i % 4096,
            state: ConnState::Tcp(TcpState::Established),
            created: 1,
            last_seen: u64::MAX,
            orig_packets: 3,
            orig_bytes: 4,
            reply_packets: 5,
            reply_bytes: 6,
            tcp_window: w,
        }
    }

    fn binding(i: u16) -> Binding {
        let c = conn(i, false);
        Binding {
            bucket: 9,
            orig: c.key,
            xlat: c.key.reversed(),
            state: FlowState {
                replied: true,
                fin_orig: false,
                fin_reply: true,
                rst: false,
            },
            created: 7,
            last_seen: 8,
        }
    }

    #[test]
    fn round_trip_in_bodies_that_fit() {
        let flows = Flows {
            conns: (0..300).map(|i| conn(i, i % 3 == 0)).collect(),
            nat: (0..50).map(binding).collect(),
            lb: (50..60).map(binding).collect(),
        };
        let bodies = replicate_bodies(5, &flows, 8000);
        assert!(bodies.len() > 1);
        let mut back = Flows::default();
        for b in &bodies {
            assert!(b.len() <= 8000);
            assert_ne!(b[0], b'{');
            let (from, f) = decode_replicate(b).expect("decodes");
            assert_eq!(from, 5);
            back.conns.extend(f.conns);
            back.nat.extend(f.nat);
            back.lb.extend(f.lb);
        }
        assert_eq!(back, flows);
        assert!(replicate_bodies(5, &Flows::default(), 8000).is_empty());
        // Compact: well under a third of JSON's size.
        let json = serde_json::to_vec(&flows.conns).unwrap().len();
        let bin: usize = replicate_bodies(5, &flows, 8000).iter().map(Vec::len).sum();
        assert!(bin * 3 < json, "binary {bin} vs JSON {json}");
    }

    #[test]
    fn malformed_bodies_are_refused_never_panic() {
        let flows = Flows {
            conns: vec![conn(1, false), conn(2, true)],
            nat: vec![binding(3)],
            lb: Vec::new(),
        };
        let body = replicate_bodies(5, &flows, 8000).remove(0);
        for n in 0..body.len() {
            assert!(decode_replicate(&body[..n]).is_none(), "truncated at {n}");
        }
        let mut longer = body.clone();
        longer.push(0);
        assert!(decode_replicate(&longer).is_none());
        let mut other_version = body.clone();
        other_version[1] = VERSION + 1;
        assert!(decode_replicate(&other_version).is_none());
        // Every single-byte corruption decodes to something or nothing, without a panic.
        for i in 0..body.len() {
            let mut b = body.clone();
            b[i] ^= 0xff;
            let _ = decode_replicate(&b);
        }
    }
}
