//! Drives every parser of dva-wire over one buffer, calling every getter a checked view offers
//! and round-tripping what parses. Shared by `tests/malformed.rs` (the stable-toolchain smoke)
//! and the cargo-fuzz targets in `/fuzz` (included there with `#[path]`), so both exercise the
//! same surface. Nothing here may panic on any input: that is the property under test.

use std::hint::black_box;
use std::net::{Ipv4Addr, Ipv6Addr};

use dva_wire::geneve::{self, DvaMeta, DVA_HEADER_LEN};
use dva_wire::{arp, ethernet, icmpv4, icmpv6, ip_proto, ipv4, ipv6};
use dva_wire::{
    ArpPacket, ArpRepr, EthernetFrame, EthernetRepr, GenevePacket, GeneveRepr, Icmpv4Packet,
    Icmpv4Repr, Icmpv6Packet, Icmpv6Repr, Ipv4Packet, Ipv4Repr, Ipv6Packet, Ipv6Repr, NdiscRepr,
    TcpPacket, TcpRepr, UdpPacket, UdpRepr,
};

const MAX_COPY: usize = 2048;

/// Runs `f` on a stack copy of `buf` so mutating helpers run without allocating; buffers larger
/// than the scratch space are skipped.
fn with_copy(buf: &[u8], f: impl FnOnce(&mut [u8])) {
    let mut scratch = [0u8; MAX_COPY];
    if let Some(copy) = scratch.get_mut(..buf.len()) {
        copy.copy_from_slice(buf);
        f(copy);
    }
}

/// Ethernet framing and ARP.
pub fn ethernet_arp(buf: &[u8]) {
    let _ = black_box(ethernet::l3_offset(buf));
    let _ = black_box(EthernetRepr::parse(&EthernetFrame::new_unchecked(buf)));
    if let Ok(frame) = EthernetFrame::new_checked(buf) {
        black_box((
            frame.dst_addr(),
            frame.src_addr(),
            frame.ethertype(),
            frame.payload(),
        ));
        black_box((
            frame.dst_addr().is_multicast(),
            frame.src_addr().to_string(),
        ));
        if let Ok(repr) = EthernetRepr::parse(&frame) {
            let mut out = [0u8; ethernet::VLAN_HEADER_LEN];
            repr.emit(&mut EthernetFrame::new_unchecked(&mut out[..]));
            let again =
                EthernetRepr::parse(&EthernetFrame::new_unchecked(&out[..repr.header_len()]));
            assert_eq!(again, Ok(repr));
            if let Ok((off, ethertype)) = ethernet::l3_offset(buf) {
                assert_eq!((off, ethertype), (repr.header_len(), repr.ethertype));
                arp_packet(&buf[off..]);
            }
        }
        arp_packet(frame.payload());
    }
    arp_packet(buf);
}

fn arp_packet(buf: &[u8]) {
    let _ = black_box(ArpRepr::parse(&ArpPacket::new_unchecked(buf)));
    if let Ok(p) = ArpPacket::new_checked(buf) {
        black_box((
            p.hardware_type(),
            p.protocol_type(),
            p.hardware_len(),
            p.protocol_len(),
            p.operation(),
        ));
        black_box((p.source_hardware_addr(), p.source_protocol_addr()));
        black_box((
            p.target_hardware_addr(),
            p.target_protocol_addr(),
            p.payload(),
        ));
        if let Ok(repr) = ArpRepr::parse(&p) {
            let mut out = [0u8; ArpRepr::BUFFER_LEN];
            repr.emit(&mut ArpPacket::new_unchecked(&mut out[..]));
            assert_eq!(&out[..], &buf[..arp::FIXED_LEN + 20]);
            assert_eq!(
                ArpRepr::parse(&ArpPacket::new_unchecked(&out[..])),
                Ok(repr)
            );
        }
    }
}

/// IPv4 and the transports on its payload.
pub fn ipv4_l4(buf: &[u8]) {
    let _ = black_box(Ipv4Repr::parse(&Ipv4Packet::new_unchecked(buf)));
    let Ok(p) = Ipv4Packet::new_checked(buf) else {
        return;
    };
    black_box((
        p.version(),
        p.header_len(),
        p.dscp_ecn(),
        p.total_len(),
        p.ident(),
    ));
    black_box((
        p.dont_frag(),
        p.more_frags(),
        p.frag_offset(),
        p.is_fragment(),
        p.hop_limit(),
        p.ttl(),
    ));
    black_box((
        p.next_header(),
        p.checksum(),
        p.src_addr(),
        p.dst_addr(),
        p.verify_checksum(),
    ));
    black_box((p.options(), p.payload()));
    let _ = black_box(p.check_options());
    if let Ok(repr) = Ipv4Repr::parse(&p) {
        assert_eq!(repr.payload_len, p.payload().len());
        let mut out = [0u8; ipv4::HEADER_LEN];
        // A header-only emit: total length points past the buffer, so parse the fields directly.
        repr.emit(&mut Ipv4Packet::new_unchecked(&mut out[..]));
        let q = Ipv4Packet::new_unchecked(&out[..]);
        assert!(q.verify_checksum());
        assert_eq!(
            (q.src_addr(), q.dst_addr(), q.next_header(), q.hop_limit()),
            (
                repr.src_addr,
                repr.dst_addr,
                repr.next_header,
                repr.hop_limit
            )
        );
    }
    with_copy(buf, |copy| {
        let mut q = Ipv4Packet::new_unchecked(copy);
        let valid = q.verify_checksum();
        ipv4::decrement_ttl(&mut q);
        if valid {
            assert!(q.verify_checksum());
        }
    });
    let (src, dst) = (p.src_addr(), p.dst_addr());
    let l4 = p.payload();
    match p.next_header() {
        ip_proto::TCP => tcp(l4, Some((src, dst)), None),
        ip_proto::UDP => udp(l4, Some((src, dst)), None),
        ip_proto::ICMP => icmp4(l4),
        _ => {}
    }
    // Also the transports on the raw buffer, whatever the protocol field says.
    tcp(l4, None, None);
    udp(l4, None, None);
    icmp4(l4);
}

/// IPv6, its extension headers and the transports behind them.
pub fn ipv6_l4(buf: &[u8]) {
    let _ = black_box(Ipv6Repr::parse(&Ipv6Packet::new_unchecked(buf)));
    let walked = ipv6::upper_layer(buf);
    if let Ok((_, off, _)) = walked {
        assert!(off <= buf.len());
    }
    let Ok(p) = Ipv6Packet::new_checked(buf) else {
        return;
    };
    black_box((
        p.version(),
        p.traffic_class(),
        p.flow_label(),
        p.payload_len(),
        p.next_header(),
    ));
    black_box((p.hop_limit(), p.src_addr(), p.dst_addr(), p.payload()));
    if let Ok(repr) = Ipv6Repr::parse(&p) {
        let mut out = [0u8; ipv6::HEADER_LEN];
        repr.emit(&mut Ipv6Packet::new_unchecked(&mut out[..]));
        let q = Ipv6Packet::new_unchecked(&out[..]);
        assert_eq!(
            (
                q.src_addr(),
                q.dst_addr(),
                q.next_header(),
                usize::from(q.payload_len())
            ),
            (
                repr.src_addr,
                repr.dst_addr,
                repr.next_header,
                repr.payload_len
            )
        );
    }
    let (src, dst) = (p.src_addr(), p.dst_addr());
    let end = ipv6::HEADER_LEN + usize::from(p.payload_len());
    if let Ok((proto, off, _)) = walked {
        let l4 = &buf[off..end];
        match proto {
            ip_proto::TCP => tcp(l4, None, Some((src, dst))),
            ip_proto::UDP => udp(l4, None, Some((src, dst))),
            ip_proto::ICMPV6 => icmp6(l4, src, dst),
            _ => {}
        }
    }
    let l4 = p.payload();
    tcp(l4, None, None);
    udp(l4, None, None);
    icmp6(l4, src, dst);
}

fn tcp(buf: &[u8], v4: Option<(Ipv4Addr, Ipv4Addr)>, v6: Option<(Ipv6Addr, Ipv6Addr)>) {
    let _ = black_box(TcpRepr::parse(&TcpPacket::new_unchecked(buf)));
    let Ok(p) = TcpPacket::new_checked(buf) else {
        return;
    };
    black_box((
        p.src_port(),
        p.dst_port(),
        p.seq_number(),
        p.ack_number(),
        p.header_len(),
        p.flags(),
    ));
    black_box((
        p.fin(),
        p.syn(),
        p.rst(),
        p.psh(),
        p.ack(),
        p.urg(),
        p.ece(),
        p.cwr(),
    ));
    black_box((
        p.window_len(),
        p.checksum(),
        p.urgent(),
        p.options(),
        p.payload(),
        p.segment_len(),
    ));
    black_box((p.option_iter().count(), p.max_seg_size()));
    let (s4, d4) = v4.unwrap_or((Ipv4Addr::new(198, 18, 1, 2), Ipv4Addr::new(198, 18, 2, 2)));
    let valid4 = p.verify_checksum_v4(&s4, &d4);
    if let Some((s6, d6)) = v6 {
        black_box(p.verify_checksum_v6(&s6, &d6));
    }
    with_copy(buf, |copy| {
        let mut q = TcpPacket::new_unchecked(copy);
        if q.clamp_mss(536) && valid4 {
            assert!(q.verify_checksum_v4(&s4, &d4));
        }
        assert!(q.max_seg_size().is_none_or(|m| m <= 536));
    });
    if let Ok(repr) = TcpRepr::parse(&p) {
        let mut out = [0u8; MAX_COPY];
        if repr.buffer_len() <= MAX_COPY {
            out[dva_wire::tcp::HEADER_LEN..repr.buffer_len()].copy_from_slice(p.payload());
            repr.emit_v4(&mut TcpPacket::new_unchecked(&mut out[..]), &s4, &d4);
            let q = TcpPacket::new_checked(&out[..repr.buffer_len()])
                .expect("emitted segment is valid");
            assert!(q.verify_checksum_v4(&s4, &d4));
            assert_eq!(TcpRepr::parse(&q), Ok(repr));
        }
    }
}

fn udp(buf: &[u8], v4: Option<(Ipv4Addr, Ipv4Addr)>, v6: Option<(Ipv6Addr, Ipv6Addr)>) {
    let _ = black_box(UdpRepr::parse(&UdpPacket::new_unchecked(buf)));
    let Ok(p) = UdpPacket::new_checked(buf) else {
        return;
    };
    black_box((
        p.src_port(),
        p.dst_port(),
        p.len(),
        p.is_empty(),
        p.checksum(),
        p.payload(),
    ));
    if let Some((s, d)) = v4 {
        black_box(p.verify_checksum_v4(&s, &d));
    }
    let (s6, d6) = v6.unwrap_or((Ipv6Addr::LOCALHOST, Ipv6Addr::LOCALHOST));
    black_box(p.verify_checksum_v6(&s6, &d6));
    if let Ok(repr) = UdpRepr::parse(&p) {
        let mut out = [0u8; MAX_COPY];
        if repr.buffer_len() <= MAX_COPY {
            out[dva_wire::udp::HEADER_LEN..repr.buffer_len()].copy_from_slice(p.payload());
            repr.emit_v6(&mut UdpPacket::new_unchecked(&mut out[..]), &s6, &d6);
            let q = UdpPacket::new_checked(&out[..repr.buffer_len()])
                .expect("emitted datagram is valid");
            assert!(q.verify_checksum_v6(&s6, &d6));
            assert_eq!(UdpRepr::parse(&q), Ok(repr));
        }
    }
    // The backplane rides on UDP.
    geneve(p.payload());
}

fn icmp4(buf: &[u8]) {
    let _ = black_box(Icmpv4Repr::parse(&Icmpv4Packet::new_unchecked(buf)));
    let Ok(p) = Icmpv4Packet::new_checked(buf) else {
        return;
    };
    black_box((
        p.msg_type(),
        p.msg_code(),
        p.checksum(),
        p.echo_ident(),
        p.echo_seq_no(),
    ));
    black_box((
        p.header_data(),
        p.next_hop_mtu(),
        p.payload(),
        p.verify_checksum(),
    ));
    black_box(icmpv4::is_error(p.msg_type()));
    if let Ok(repr) = Icmpv4Repr::parse(&p) {
        with_copy(buf, |copy| {
            repr.emit(&mut Icmpv4Packet::new_unchecked(&mut *copy));
            assert_eq!(
                Icmpv4Repr::parse(&Icmpv4Packet::new_unchecked(&copy[..])),
                Ok(repr)
            );
        });
    }
    // An error quotes an IPv4 packet: walk it as the classifier does.
    if icmpv4::is_error(p.msg_type()) {
        ipv4_quote(p.payload());
    }
}

fn ipv4_quote(buf: &[u8]) {
    if let Ok(p) = Ipv4Packet::new_checked(buf) {
        black_box((p.src_addr(), p.dst_addr(), p.payload()));
    }
}

fn icmp6(buf: &[u8], src: Ipv6Addr, dst: Ipv6Addr) {
    let _ = black_box(Icmpv6Repr::parse(&Icmpv6Packet::new_unchecked(buf)));
    let _ = black_box(NdiscRepr::parse(&Icmpv6Packet::new_unchecked(buf)));
    let Ok(p) = Icmpv6Packet::new_checked(buf) else {
        return;
    };
    black_box((
        p.msg_type(),
        p.msg_code(),
        p.checksum(),
        p.echo_ident(),
        p.echo_seq_no(),
    ));
    black_box((
        p.header_data(),
        p.mtu(),
        p.ndisc_flags(),
        p.target_addr(),
        p.payload(),
    ));
    black_box((
        p.verify_checksum(&src, &dst),
        icmpv6::is_error(p.msg_type()),
    ));
    if let Ok(repr) = Icmpv6Repr::parse(&p) {
        with_copy(buf, |copy| {
            repr.emit(&mut Icmpv6Packet::new_unchecked(&mut *copy), &src, &dst);
            let q = Icmpv6Packet::new_unchecked(&copy[..]);
            assert!(q.verify_checksum(&src, &dst));
            assert_eq!(Icmpv6Repr::parse(&q), Ok(repr));
        });
    }
    if let Ok(repr) = NdiscRepr::parse(&p) {
        let mut out = [0u8; 32];
        repr.emit(&mut Icmpv6Packet::new_unchecked(&mut out[..]), &src, &dst);
        let q = Icmpv6Packet::new_unchecked(&out[..repr.buffer_len()]);
        assert!(q.verify_checksum(&src, &dst));
        assert_eq!(NdiscRepr::parse(&q), Ok(repr));
    }
    if icmpv6::is_error(p.msg_type()) {
        let _ = black_box(ipv6::upper_layer(p.payload()));
    }
}

/// GENEVE and dva's backplane option.
pub fn geneve(buf: &[u8]) {
    let _ = black_box(GeneveRepr::parse(&GenevePacket::new_unchecked(buf)));
    let decapped = geneve::decap_dva(buf);
    if let Ok(p) = GenevePacket::new_checked(buf) {
        black_box((
            p.version(),
            p.opt_len(),
            p.header_len(),
            p.oam(),
            p.critical(),
            p.protocol_type(),
            p.vni(),
        ));
        black_box((p.options_bytes(), p.payload()));
        let mut walked = 0;
        for opt in p.options() {
            walked += opt.buffer_len();
            black_box((opt.class, opt.opt_type, opt.data, opt.is_critical()));
            let _ = black_box(DvaMeta::parse(opt.data));
        }
        // check_len guarantees the iterator consumes the whole options area.
        assert_eq!(walked, p.opt_len());
        if let Ok(repr) = GeneveRepr::parse(&p) {
            assert_eq!(repr.header_len(), p.header_len());
        }
    } else {
        assert!(decapped.is_err());
    }
    if let Ok((vni, ptype, meta, off)) = decapped {
        assert!(off <= buf.len());
        let mut out = [0u8; DVA_HEADER_LEN];
        geneve::encap_dva(&mut out, vni, ptype, &meta);
        assert_eq!(
            geneve::decap_dva(&out),
            Ok((vni, ptype, meta, DVA_HEADER_LEN))
        );
    }
}

/// Every family over the same bytes.
pub fn all(buf: &[u8]) {
    ethernet_arp(buf);
    ipv4_l4(buf);
    ipv6_l4(buf);
    geneve(buf);
    if let Ok((off, _)) = ethernet::l3_offset(buf) {
        ipv4_l4(&buf[off..]);
        ipv6_l4(&buf[off..]);
    }
    tcp(buf, None, None);
    udp(buf, None, None);
    icmp4(buf);
    icmp6(buf, Ipv6Addr::UNSPECIFIED, Ipv6Addr::LOCALHOST);
}
