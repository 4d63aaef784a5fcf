//! From an IP packet's bytes to what flow distribution and the services need: the flow key, TCP
//! flags, ICMP type, and for ICMP errors the flow the error is about.
//!
//! The dispatcher hashes [`Classified::bucket_key`] (an ICMP error lands in the bucket of the flow it
//! quotes, so the data plane that owns the flow sees it); the data plane builds a firewall
//! `PacketInfo` from the rest.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use dva_flow::FlowKey;
use dva_wire::{
    ip_proto, Icmpv4Packet, Icmpv6Packet, Ipv4Packet, Ipv6Packet, TcpPacket, UdpPacket,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClassifyError {
    /// Not IPv4/IPv6, or a header that does not fit the buffer.
    MalformedIp,
    /// The transport header does not fit.
    MalformedL4,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Classified {
    /// The packet's own 5-tuple as sent (ports 0 for fragments and port-less protocols).
    pub key: FlowKey,
    pub tcp_flags: u8,
    pub icmp: Option<(u8, u8)>,
    /// For ICMP errors: the quoted packet's flow, as that packet was sent.
    pub icmp_inner: Option<FlowKey>,
    pub fragment: bool,
    /// Offset of the transport header from the start of the IP header.
    pub l4_offset: usize,
    /// IP packet length from its header (excludes link-layer padding).
    pub ip_len: usize,
}

impl Classified {
    /// The key whose symmetric hash picks the bucket.
    #[inline]
    pub fn bucket_key(&self) -> &FlowKey {
        self.icmp_inner.as_ref().unwrap_or(&self.key)
    }
    pub fn is_v6(&self) -> bool {
        self.key.src.is_ipv6()
    }
    /// A packet that may start a connection: TCP SYN without ACK, any UDP, ICMP queries.
    pub fn can_start_flow(&self) -> bool {
        match self.key.proto {
            ip_proto::TCP => self.tcp_flags & 0x12 == 0x02,
            ip_proto::ICMP | ip_proto::ICMPV6 => self.icmp_inner.is_none(),
            _ => true,
        }
    }
}

/// IP version of a packet from its first nibble.
#[inline]
pub fn ip_version(ip: &[u8]) -> Option<u8> {
    ip.first().map(|b| b >> 4)
}

pub fn classify(ip: &[u8]) -> Result<Classified, ClassifyError> {
    match ip_version(ip) {
        Some(4) => classify_v4(ip),
        Some(6) => classify_v6(ip),
        _ => Err(ClassifyError::MalformedIp),
    }
}

fn classify_v4(ip: &[u8]) -> Result<Classified, ClassifyError> {
    let pkt = Ipv4Packet::new_checked(ip).map_err(|_| ClassifyError::MalformedIp)?;
    let src = IpAddr::V4(pkt.src_addr());
    let dst = IpAddr::V4(pkt.dst_addr());
    let proto = pkt.next_header();
    let l4_offset = usize::from(pkt.header_len());
    let ip_len = usize::from(pkt.total_len());
    let fragment = pkt.more_frags() || pkt.frag_offset() != 0;
    let l4 = pkt.payload();
    let mut c = Classified {
        key: FlowKey {
            proto,
            src,
            dst,
            src_port: 0,
            dst_port: 0,
        },
        tcp_flags: 0,
        icmp: None,
        icmp_inner: None,
        fragment,
        l4_offset,
        ip_len,
    };
    if fragment {
        // Only the first fragment has ports; keying every fragment on addresses alone keeps them together.
        return Ok(c);
    }
    transport(&mut c, l4, false)?;
    Ok(c)
}

fn classify_v6(ip: &[u8]) -> Result<Classified, ClassifyError> {
    let pkt = Ipv6Packet::new_checked(ip).map_err(|_| ClassifyError::MalformedIp)?;
    let src = IpAddr::V6(pkt.src_addr());
    let dst = IpAddr::V6(pkt.dst_addr());
    let ip_len = Ipv6Packet::<&[u8]>::HEADER_LEN + usize::from(pkt.payload_len());
    let (proto, l4_offset, fragment) =
        dva_wire::ipv6::upper_layer(ip).map_err(|_| ClassifyError::MalformedIp)?;
    let l4 = ip
        .get(l4_offset..ip_len.min(ip.len()))
        .ok_or(ClassifyError::MalformedIp)?;
    let mut c = Classified {
        key: FlowKey {
            proto,
            src,
            dst,
            src_port: 0,
            dst_port: 0,
        },
        tcp_flags: 0,
        icmp: None,
        icmp_inner: None,
        fragment,
        l4_offset,
        ip_len,
    };
    if fragment {
        return Ok(c);
    }
    transport(&mut c, l4, true)?;
    Ok(c)
}

fn transport(c: &mut Classified, l4: &[u8], v6: bool) -> Result<(), ClassifyError> {
    match c.key.proto {
        ip_proto::TCP => {
            let t = TcpPacket::new_checked(l4).map_err(|_| ClassifyError::MalformedL4)?;
            c.key.src_port = t.src_port();
            c.key.dst_port = t.dst_port();
            c.tcp_flags = t.flags();
        }
        ip_proto::UDP => {
            let u = UdpPacket::new_checked(l4).map_err(|_| ClassifyError::MalformedL4)?;
            c.key.src_port = u.src_port();
            c.key.dst_port = u.dst_port();
        }
        ip_proto::ICMP if !v6 => {
            let i = Icmpv4Packet::new_checked(l4).map_err(|_| ClassifyError::MalformedL4)?;
            let (t, code) = (i.msg_type(), i.msg_code());
            c.icmp = Some((t, code));
            if dva_wire::icmpv4::is_error(t) {
                c.icmp_inner = quoted_v4(i.payload());
            } else if t == 8 || t == 0 {
                // Echo request/reply: the identifier plays the port on both sides, so both directions match.
                c.key.src_port = i.echo_ident();
                c.key.dst_port = i.echo_ident();
            }
        }
        ip_proto::ICMPV6 if v6 => {
            let i = Icmpv6Packet::new_checked(l4).map_err(|_| ClassifyError::MalformedL4)?;
            let (t, code) = (i.msg_type(), i.msg_code());
            c.icmp = Some((t, code));
            if t < 128 {
                c.icmp_inner = quoted_v6(i.payload());
            } else if t == 128 || t == 129 {
                c.key.src_port = i.echo_ident();
                c.key.dst_port = i.echo_ident();
            }
        }
        _ => {}
    }
    Ok(())
}

/// The flow of the IPv4 packet an ICMP error quotes. Parsed by hand: the quote is usually cut after 8
/// bytes of transport header and its length fields describe the original, not the quote.
fn quoted_v4(q: &[u8]) -> Option<FlowKey> {
    let vihl = *q.first()?;
    if vihl >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(vihl & 0x0f) * 4;
    if ihl < 20 || q.len() < ihl {
        return None;
    }
    let proto = q[9];
    let src = Ipv4Addr::new(q[12], q[13], q[14], q[15]);
    let dst = Ipv4Addr::new(q[16], q[17], q[18], q[19]);
    let l4 = &q[ihl..];
    let (sp, dp) = quoted_ports(proto, l4, ip_proto::ICMP);
    Some(FlowKey {
        proto,
        src: IpAddr::V4(src),
        dst: IpAddr::V4(dst),
        src_port: sp,
        dst_port: dp,
    })
}

fn quoted_v6(q: &[u8]) -> Option<FlowKey> {
    if q.len() < 40 || q[0] >> 4 != 6 {
        return None;
    }
    let (proto, off, _) = dva_wire::ipv6::upper_layer(q).ok()?;
    let src: [u8; 16] = q[8..24].try_into().ok()?;
    let dst: [u8; 16] = q[24..40].try_into().ok()?;
    let (sp, dp) = quoted_ports(proto, q.get(off..).unwrap_or(&[]), ip_proto::ICMPV6);
    Some(FlowKey {
        proto,
        src: IpAddr::V6(Ipv6Addr::from(src)),
        dst: IpAddr::V6(Ipv6Addr::from(dst)),
        src_port: sp,
        dst_port: dp,
    })
}

fn quoted_ports(proto: u8, l4: &[u8], icmp_proto: u8) -> (u16, u16) {
    let be = |i: usize| l4.get(i..i + 2).map(|b| u16::from_be_bytes([b[0], b[1]]));
    match proto {
        ip_proto::TCP | ip_proto::UDP => (be(0).unwrap_or(0), be(2).unwrap_or(0)),
        // A quoted echo: identifier at offset 4.
        p if p == icmp_proto => {
            let id = be(4).unwrap_or(0);
            (id, id)
        }
        _ => (0, 0),
    }
}
