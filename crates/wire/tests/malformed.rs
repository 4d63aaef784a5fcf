//! The stable-toolchain fuzz smoke: random buffers, and truncations and bit flips of real
//! packets, through every parser and getter of dva-wire. Deterministic (own xorshift, fixed
//! seed) so a failure reproduces; the panicking input is printed.

mod exercise;

use std::net::{Ipv4Addr, Ipv6Addr};
use std::panic;

use dva_wire::geneve::{self, dva_flags, DvaMeta, DVA_HEADER_LEN};
use dva_wire::{
    ethertype, ip_proto, ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame,
    EthernetRepr, Icmpv4Packet, Icmpv4Repr, Icmpv6Packet, Ipv4Packet, Ipv4Repr, Ipv6Packet,
    Ipv6Repr, NdiscRepr, TcpPacket, TcpRepr, UdpPacket, UdpRepr,
};

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

const MAC_A: EthernetAddress = EthernetAddress([0x02, 0, 0xc6, 0x12, 1, 2]);
const MAC_B: EthernetAddress = EthernetAddress([0x02, 0, 0xc6, 0x12, 1, 1]);
const V4_A: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
const V4_B: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 2);

fn v6(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

fn ethernet(ethertype: u16, vlan: Option<u16>, payload: &[u8]) -> Vec<u8> {
    let repr = EthernetRepr {
        dst_addr: MAC_B,
        src_addr: MAC_A,
        vlan,
        ethertype,
    };
    let mut v = vec![0u8; repr.buffer_len(payload.len())];
    repr.emit(&mut EthernetFrame::new_unchecked(&mut v[..]));
    v[repr.header_len()..].copy_from_slice(payload);
    v
}

fn ipv4(proto: u8, l4: &[u8]) -> Vec<u8> {
    let repr = Ipv4Repr {
        src_addr: V4_A,
        dst_addr: V4_B,
        next_header: proto,
        payload_len: l4.len(),
        hop_limit: 64,
    };
    let mut v = vec![0u8; repr.buffer_len()];
    v[20..].copy_from_slice(l4);
    repr.emit(&mut Ipv4Packet::new_unchecked(&mut v[..]));
    v
}

fn ipv6(next: u8, payload: &[u8]) -> Vec<u8> {
    let repr = Ipv6Repr {
        src_addr: v6("2001:db8:1::2"),
        dst_addr: v6("2001:db8:2::2"),
        next_header: next,
        payload_len: payload.len(),
        hop_limit: 255,
    };
    let mut v = vec![0u8; repr.buffer_len()];
    repr.emit(&mut Ipv6Packet::new_unchecked(&mut v[..]));
    v[40..].copy_from_slice(payload);
    v
}

fn tcp_syn_with_options() -> Vec<u8> {
    let mut v = vec![
        0xa4, 0x7e, 0x00, 0x50, 0x5e, 0x2b, 0x6f, 0x4c, 0, 0, 0, 0, 0xa0, 0x02, 0xfa, 0xf0, 0, 0,
        0, 0, 0x02, 0x04, 0x05, 0xb4, 0x04, 0x02, 0x08, 0x0a, 0x00, 0x01, 0x02, 0x03, 0, 0, 0, 0,
        0x01, 0x03, 0x03, 0x07,
    ];
    TcpPacket::new_unchecked(&mut v[..]).fill_checksum_v4(&V4_A, &V4_B);
    v
}

fn udp(payload: &[u8]) -> Vec<u8> {
    let repr = UdpRepr {
        src_port: 40000,
        dst_port: geneve::UDP_PORT,
        payload_len: payload.len(),
    };
    let mut v = vec![0u8; repr.buffer_len()];
    v[8..].copy_from_slice(payload);
    repr.emit_v4(&mut UdpPacket::new_unchecked(&mut v[..]), &V4_A, &V4_B);
    v
}

fn fixtures() -> Vec<Vec<u8>> {
    let arp = {
        let repr = ArpRepr {
            operation: ArpOperation::Request,
            source_hardware_addr: MAC_A,
            source_protocol_addr: V4_A,
            target_hardware_addr: EthernetAddress::UNSPECIFIED,
            target_protocol_addr: Ipv4Addr::new(198, 18, 1, 1),
        };
        let mut v = vec![0u8; 46];
        repr.emit(&mut ArpPacket::new_unchecked(&mut v[..]));
        v
    };
    let echo = {
        let repr = Icmpv4Repr::EchoRequest {
            ident: 0x0b2d,
            seq_no: 1,
            data_len: 16,
        };
        let mut v = vec![0x5a; repr.buffer_len()];
        repr.emit(&mut Icmpv4Packet::new_unchecked(&mut v[..]));
        v
    };
    let syn = tcp_syn_with_options();
    let v4_syn = ipv4(ip_proto::TCP, &syn);
    let port_unreach = {
        let quote = &v4_syn[..28];
        let repr = Icmpv4Repr::DstUnreachable {
            code: 3,
            data_len: quote.len(),
        };
        let mut v = vec![0u8; repr.buffer_len()];
        v[8..].copy_from_slice(quote);
        repr.emit(&mut Icmpv4Packet::new_unchecked(&mut v[..]));
        ipv4(ip_proto::ICMP, &v)
    };
    let ns = {
        let repr = NdiscRepr::NeighborSolicit {
            target_addr: v6("2001:db8:1::1"),
            lladdr: Some(MAC_A),
        };
        let mut v = vec![0u8; repr.buffer_len()];
        repr.emit(
            &mut Icmpv6Packet::new_unchecked(&mut v[..]),
            &v6("2001:db8:1::2"),
            &v6("ff02::1:ff00:1"),
        );
        ipv6(ip_proto::ICMPV6, &v)
    };
    let v6_ext_tcp = {
        let mut payload = vec![ip_proto::ROUTING, 0, 1, 4, 0, 0, 0, 0];
        payload.extend_from_slice(&[ip_proto::FRAGMENT, 0, 0, 0, 0, 0, 0, 0]);
        payload.extend_from_slice(&[ip_proto::TCP, 0, 0, 1, 0, 0, 0, 9]);
        payload.extend_from_slice(&syn);
        ipv6(ip_proto::HOPOPTS, &payload)
    };
    let dva = {
        let meta = DvaMeta {
            epoch: 3,
            bucket: 77,
            hops: 0,
            flags: dva_flags::NEW_HERE,
            ingress_if: 1,
            egress_if: 0,
            gso_size: 0,
        };
        let mut v = vec![0u8; DVA_HEADER_LEN + v4_syn.len()];
        geneve::encap_dva(&mut v, 0x101, geneve::PROTO_IPV4, &meta);
        v[DVA_HEADER_LEN..].copy_from_slice(&v4_syn);
        v
    };
    let backplane = ethernet(ethertype::IPV4, None, &ipv4(ip_proto::UDP, &udp(&dva)));
    vec![
        ethernet(ethertype::ARP, None, &arp),
        ethernet(ethertype::ARP, Some(0x0064), &arp[..28]),
        ethernet(ethertype::IPV4, None, &v4_syn),
        ethernet(ethertype::IPV4, Some(0xa064), &ipv4(ip_proto::ICMP, &echo)),
        ethernet(ethertype::IPV4, None, &port_unreach),
        ethernet(ethertype::IPV6, None, &ns),
        ethernet(ethertype::IPV6, None, &v6_ext_tcp),
        backplane,
        dva,
        v4_syn,
        syn,
    ]
}

/// Runs every parser over `buf`, reporting the input if anything panics.
fn check(buf: &[u8]) {
    if panic::catch_unwind(|| exercise::all(buf)).is_err() {
        panic!("dva-wire panicked on input {buf:02x?}");
    }
}

#[test]
fn fixtures_parse_as_built() {
    let f = fixtures();
    // The fixtures must be valid, or mutating them tests little.
    let (off, et) = dva_wire::ethernet::l3_offset(&f[0]).unwrap();
    assert_eq!((off, et), (14, ethertype::ARP));
    ArpRepr::parse(&ArpPacket::new_checked(&f[0][off..]).unwrap()).unwrap();
    assert_eq!(
        dva_wire::ethernet::l3_offset(&f[1]).unwrap(),
        (18, ethertype::ARP)
    );
    let ip = Ipv4Packet::new_checked(&f[2][14..]).unwrap();
    Ipv4Repr::parse(&ip).unwrap();
    let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
    assert!(tcp.verify_checksum_v4(&V4_A, &V4_B));
    assert_eq!(
        TcpRepr::parse(&tcp).unwrap().flags,
        dva_wire::tcp::flags::SYN
    );
    let ip6 = &f[5][14..];
    assert_eq!(
        dva_wire::ipv6::upper_layer(ip6).unwrap(),
        (ip_proto::ICMPV6, 40, false)
    );
    assert_eq!(
        dva_wire::ipv6::upper_layer(&f[6][14..]).unwrap(),
        (ip_proto::TCP, 64, true)
    );
    let (vni, ptype, meta, off) = geneve::decap_dva(&f[8]).unwrap();
    assert_eq!(
        (vni, ptype, meta.bucket, off),
        (0x101, geneve::PROTO_IPV4, 77, DVA_HEADER_LEN)
    );
    for fx in &f {
        check(fx);
    }
}

#[test]
fn no_panic_on_random_truncated_or_flipped_input() {
    // Quiet the default hook: `check` reports the input itself.
    let hook = panic::take_hook();
    panic::set_hook(Box::new(|_| {}));
    let result = panic::catch_unwind(run);
    panic::set_hook(hook);
    if let Err(e) = result {
        panic::resume_unwind(e);
    }
}

fn run() {
    let mut rng = XorShift(0x5eed_f00d_d7a0);
    let fixtures = fixtures();
    let mut buf = [0u8; 256];

    // Random buffers: mostly short, where the length checks live, biased towards plausible
    // first bytes so the parsers get past their first check.
    for i in 0..100_000 {
        let len = if i % 4 == 0 {
            rng.below(256)
        } else {
            rng.below(80)
        };
        for b in buf[..len].iter_mut() {
            *b = rng.next() as u8;
        }
        if len > 0 && i % 3 == 0 {
            buf[0] = [0x45, 0x46, 0x4f, 0x60, 0x04, 0x00][rng.below(6)];
        }
        check(&buf[..len]);
    }

    // Every truncation of every fixture, from the front and (for the inner layers) from the back.
    for fx in &fixtures {
        for len in 0..=fx.len() {
            check(&fx[..len]);
            check(&fx[fx.len() - len..]);
        }
    }

    // Bit flips and byte overwrites of the fixtures.
    let mut scratch = Vec::new();
    for _ in 0..20_000 {
        let fx = &fixtures[rng.below(fixtures.len())];
        scratch.clear();
        scratch.extend_from_slice(fx);
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(scratch.len());
            if rng.next() & 1 == 0 {
                scratch[at] ^= 1 << rng.below(8);
            } else {
                scratch[at] = rng.next() as u8;
            }
        }
        let len = if rng.next() & 3 == 0 {
            rng.below(scratch.len() + 1)
        } else {
            scratch.len()
        };
        check(&scratch[..len]);
    }
}
