//! The whole packet path under a fuzzer (smoltcp's habit): the conformance harness's world —
//! three real data-plane cores and a real dispatcher core over the in-memory backplane — driven
//! by arbitrary bytes read as a sequence of inputs: frames on the dispatcher's interfaces (well
//! formed, so flows get state, or raw), backplane datagrams to data planes and to the
//! dispatcher (from an authenticated peer, so everything after the seal is the cores'
//! business: any GENEVE meta, handover and replication messages, garbage), bucket-table
//! changes with history and backups, draining, NACKed configs, lost and reordered datagrams,
//! dead units and time passing. The chain is picked by the first byte: the firewall alone,
//! with NAT, with the load balancer, or behind the rate limiter.
//!
//! Nothing is asserted but that no input panics, loops for ever or grows without bound (the
//! target runs under AddressSanitizer and libFuzzer's RSS limit): the conformance cases say
//! what the right outputs are. `fuzz/fuzz_targets/cores.rs` calls [`run`].

use std::net::{IpAddr, Ipv4Addr};

use dva_flow::UnitId;
use dva_proto::role::{ServiceAddr, Stage};
use dva_services::firewall::{Action, PortRange};
use dva_wire::geneve::{self, DvaMeta, DVA_HEADER_LEN};
use dva_wire::{ethertype, ip_proto, EthernetAddress};

use super::{port_mac, Fault, World, VNI};
use crate::handover::PROTO_HANDOVER;
use crate::reply;

/// Inputs taken from one fuzz case at most: the world's work per input is bounded (settling
/// stops after 64 turns), so this bounds a case's time.
const MAX_INPUTS: usize = 200;
const DATAPLANES: [UnitId; 3] = [1, 2, 3];
const DISPATCHER: UnitId = 100;
const BUCKETS: usize = 8;

/// The fuzz input, read front to back; past its end every read is zero.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_be_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    /// Up to `max` bytes, the count first.
    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = (self.u16() as usize % (max + 1)).min(self.0.len());
        let (taken, rest) = self.0.split_at(n);
        self.0 = rest;
        taken.to_vec()
    }
    fn pick<T: Copy>(&mut self, of: &[T]) -> T {
        of[self.u8() as usize % of.len()]
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The addresses packets use: the two sides of the dispatcher's interfaces, the NAT source, the
/// VIP and the backends, so that flows meet state.
const ADDRS: [[u8; 4]; 8] = [
    [10, 0, 0, 1],
    [10, 0, 0, 2],
    [10, 0, 1, 1],
    [10, 0, 1, 2],
    [10, 0, 1, 200],
    [10, 0, 1, 100],
    [10, 0, 0, 254],
    [127, 0, 0, 1],
];
const PORTS: [u16; 6] = [80, 443, 1024, 40000, 53, 0];

/// An IPv4 packet from the input's choices: TCP, UDP, an ICMP error quoting a TCP packet, or raw
/// bytes after an IPv4 header.
fn ip_packet(inp: &mut Input) -> Vec<u8> {
    let src = Ipv4Addr::from(inp.pick(&ADDRS));
    let dst = Ipv4Addr::from(inp.pick(&ADDRS));
    let (sport, dport) = (inp.pick(&PORTS), inp.pick(&PORTS));
    let mut out = Vec::new();
    match inp.u8() % 5 {
        0 | 1 => {
            let (seq, ack, flags) = (inp.u32(), inp.u32(), inp.u8() & 0x3f);
            let payload = inp.bytes(64);
            let _ = reply::tcp_segment(
                &mut out,
                src.into(),
                dst.into(),
                sport,
                dport,
                seq,
                ack,
                flags,
                &payload,
            );
        }
        2 => {
            let payload = inp.bytes(64);
            reply::ipv4_header(&mut out, src, dst, ip_proto::UDP, 8 + payload.len(), 64);
            out.extend_from_slice(&sport.to_be_bytes());
            out.extend_from_slice(&dport.to_be_bytes());
            out.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&payload);
        }
        3 => {
            // An ICMP error quoting a TCP segment between two of the addresses.
            let mut quoted = Vec::new();
            let _ = reply::tcp_segment(
                &mut quoted,
                dst.into(),
                src.into(),
                dport,
                sport,
                inp.u32(),
                0,
                0x02,
                &[],
            );
            let (kind, code) = (inp.pick(&[3u8, 11, 12, 5]), inp.u8() & 0x0f);
            let _ = reply::icmpv4_error_with(&mut out, &quoted, src, kind, code, 0);
        }
        _ => {
            let proto = inp.u8();
            let body = inp.bytes(128);
            reply::ipv4_header(&mut out, src, dst, proto, body.len(), inp.u8());
            out.extend_from_slice(&body);
        }
    }
    out
}

/// A datagram to or from a data plane: a DVA GENEVE header with the input's meta around an IP
/// packet, a handover/replication body or raw bytes.
fn datagram(inp: &mut Input, epoch: u64) -> Vec<u8> {
    let meta = DvaMeta {
        epoch: if inp.u8() & 1 == 0 {
            epoch as u32
        } else {
            inp.u32()
        },
        bucket: match inp.u8() % 3 {
            0 => u16::MAX,
            1 => u16::from(inp.u8()) % BUCKETS as u16,
            _ => inp.u16(),
        },
        flags: inp.u8(),
        hops: inp.u8() & 7,
        ingress_if: inp.u8() & 3,
        ..DvaMeta::default()
    };
    let (ptype, body) = match inp.u8() % 4 {
        0 | 1 => (geneve::PROTO_IPV4, ip_packet(inp)),
        2 => (PROTO_HANDOVER, inp.bytes(512)),
        _ => (inp.u16(), inp.bytes(256)),
    };
    let mut d = vec![0; DVA_HEADER_LEN + body.len()];
    geneve::encap_dva(&mut d, VNI, ptype, &meta);
    d[DVA_HEADER_LEN..].copy_from_slice(&body);
    if inp.u8() == 0xff {
        // Now and then a header cut short or corrupted too.
        let cut = inp.u8() as usize % d.len().max(1);
        d.truncate(cut);
    }
    d
}

/// Run one fuzz case. Never panics on any input: a panic is a bug in a core.
pub fn run(data: &[u8]) {
    let mut inp = Input(data);
    let mut w = World::new();
    w.dataplanes = DATAPLANES.to_vec();
    w.dispatchers = vec![DISPATCHER];
    w.buckets = (0..BUCKETS)
        .map(|b| (DATAPLANES[b % DATAPLANES.len()], Vec::new()))
        .collect();
    w.disp_ports = 2;
    w.default_action = inp.pick(&[Action::Accept, Action::Drop, Action::Reject]);
    let setup = inp.u8();
    match setup % 4 {
        0 => {}
        1 => {
            w.chain.push(Stage::Nat);
            w.nat = Some(dva_services::nat::NatConfig {
                snat: vec![dva_services::nat::SnatRule {
                    name: None,
                    src: vec!["10.0.0.0/24".parse().expect("literal")],
                    dst: Vec::new(),
                    proto: None,
                    to: vec!["10.0.1.200".parse().expect("literal")],
                    ports: PortRange {
                        first: 1024,
                        last: 2047,
                    },
                }],
                dnat: Vec::new(),
                max_bindings: 256,
            });
            w.service_addrs.push(ServiceAddr {
                interface: 1,
                addr: IpAddr::from([10, 0, 1, 200]),
                nat_source: true,
            });
        }
        2 => {
            use dva_services::lb::{Backend, LbConfig, VirtualService};
            w.chain.push(Stage::Lb);
            w.lb = Some(LbConfig {
                services: vec![VirtualService {
                    name: "web".into(),
                    vip: "10.0.1.100".parse().expect("literal"),
                    proto: ip_proto::TCP,
                    port: 80,
                    backends: (1..3u8)
                        .map(|k| Backend {
                            name: format!("b{k}"),
                            addr: IpAddr::from([10, 0, 1, k]),
                            port: 80,
                            weight: 1,
                        })
                        .collect(),
                    source: vec!["10.0.1.200".parse().expect("literal")],
                    ports: PortRange {
                        first: 1024,
                        last: 2047,
                    },
                }],
                max_flows: 256,
            });
            w.service_addrs.extend([
                ServiceAddr {
                    interface: 1,
                    addr: IpAddr::from([10, 0, 1, 200]),
                    nat_source: true,
                },
                ServiceAddr {
                    interface: 0,
                    addr: IpAddr::from([10, 0, 1, 100]),
                    nat_source: false,
                },
            ]);
        }
        _ => {
            w.chain.insert(
                0,
                Stage::Ratelimit(dva_services::ratelimit::RateLimitConfig {
                    new_flows_per_second: 5,
                    burst: 3,
                    max_sources: 4,
                    ..Default::default()
                }),
            );
        }
    }
    if w.start().is_err() {
        return;
    }
    // The neighbours, so forwarded frames leave the dispatcher and are not only queued.
    for (p, host) in [(0usize, [10, 0, 0, 1]), (1, [10, 0, 1, 1])] {
        let mut f = Vec::new();
        let mac = EthernetAddress([2, 0, 0, 0, p as u8, 1]);
        let ours = Ipv4Addr::new(10, 0, p as u8, 254);
        reply::ethernet(&mut f, port_mac(p), mac, ethertype::ARP);
        reply::arp(&mut f, 2, mac, Ipv4Addr::from(host), port_mac(p), ours);
        f.resize(60, 0);
        let _ = w.inject_frame(p, f);
    }
    for _ in 0..MAX_INPUTS {
        if inp.is_empty() {
            break;
        }
        w.log.clear();
        match inp.u8() % 12 {
            0..=2 => {
                let p = usize::from(inp.u8() & 1);
                let mut f = Vec::new();
                reply::ethernet(
                    &mut f,
                    port_mac(p),
                    EthernetAddress([2, 0, 0, 0, p as u8, 1]),
                    ethertype::IPV4,
                );
                f.extend_from_slice(&ip_packet(&mut inp));
                let _ = w.inject_frame(p, f);
            }
            3 => {
                let p = usize::from(inp.u8() & 1);
                let f = inp.bytes(1600);
                let _ = w.inject_frame(p, f);
            }
            4 | 5 => {
                let from = inp.pick(&[DISPATCHER, 1, 2, 3]);
                let to = inp.pick(&DATAPLANES);
                let d = datagram(&mut inp, w.epoch);
                w.deliver(from, to, d);
                w.settle();
            }
            6 => {
                let from = inp.pick(&DATAPLANES);
                let d = datagram(&mut inp, w.epoch);
                w.deliver(from, DISPATCHER, d);
            }
            7 => w.tick(u64::from(inp.u8()) * 40),
            8 => {
                // A bucket moves, with history (punting and handover), or gets a backup.
                let b = inp.u8() as usize % BUCKETS;
                let owner = inp.pick(&DATAPLANES);
                let history: Vec<UnitId> = (0..inp.u8() % 3)
                    .map(|_| inp.pick(&DATAPLANES))
                    .filter(|&h| h != owner)
                    .collect();
                w.buckets[b] = (owner, history);
                if inp.u8() & 1 == 1 {
                    w.backups.insert(b as u16, inp.pick(&DATAPLANES));
                }
                let _ = w.push(&[]);
            }
            9 => {
                // A data plane drains, or a config it must refuse.
                let u = inp.pick(&DATAPLANES);
                if inp.u8() & 1 == 0 {
                    w.export.insert(u);
                    let _ = w.push(&[]);
                } else {
                    let u = u.to_string();
                    let _ = w.push(&[u.as_str(), "with", "listen", "10.9.9.9:1"]);
                }
            }
            10 => {
                // The backplane loses or holds the next datagram between two units, or
                // delivers what it held (reordered).
                match inp.u8() % 3 {
                    0 => w.faults.push(Fault::Lose(format!(
                        "{} -> {}",
                        inp.pick(&DATAPLANES),
                        inp.pick(&DATAPLANES)
                    ))),
                    1 => w
                        .faults
                        .push(Fault::Hold(format!("{} -> ", inp.pick(&DATAPLANES)))),
                    _ => {
                        for (from, to, d) in std::mem::take(&mut w.held) {
                            w.deliver(from, to, d);
                        }
                        w.settle();
                    }
                }
            }
            _ => {
                // A data plane dies; one always lives.
                let u = inp.pick(&DATAPLANES);
                if w.dead.len() + 1 < DATAPLANES.len() {
                    w.dead.insert(u);
                }
            }
        }
        // Faults that never matched do not pile up.
        w.faults.truncate(8);
        w.held.truncate(64);
    }
    // Every core still answers for its counters.
    for dp in w.dps.values() {
        let _ = dp.core.snapshot();
    }
    if let Some(d) = w.disp.as_ref() {
        let _ = d.core.snapshot();
    }
}

#[cfg(test)]
mod tests {
    /// The fuzz driver on a few fixed inputs (the nightly fuzz run explores from these):
    /// it runs on stable with the other unit tests, so it cannot rot.
    #[test]
    fn fixed_inputs() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for setup in 0..4u8 {
            let mut data = vec![0, setup];
            for _ in 0..4000 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                data.push(seed as u8);
            }
            super::run(&data);
        }
        super::run(&[]);
        super::run(&[0xff; 64]);
    }
}
