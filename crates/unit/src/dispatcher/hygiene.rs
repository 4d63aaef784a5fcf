//! Ingress hygiene: what the kernel refuses before a packet is routed, refused here before it
//! reaches a data plane (and so before any connection state is touched).
//!
//! - Martian sources ([`martian_source`]): addresses no host on a wire may send from
//!   (`ip_route_input_slow`'s martian checks, `ip6_rcv_core`'s).
//! - TCP/UDP checksums ([`l4_checksum`]): a segment that does not verify never reaches
//!   conntrack (`nf_conntrack_checksum = 1`), except a *partial* one, which the sender's kernel
//!   left for the last device to finish (see [`crate::offload`]).
//!
//! The source-address and IPv4-option checks that need the config or the header live with
//! the dispatcher and in [`dva_wire::ipv4::check_options`].

use std::net::IpAddr;

use dva_io::{GsoType, RxMeta};
use dva_wire::checksum;
use dva_wire::ip_proto;

use crate::classify::Classified;
use crate::offload;

/// Whether `src` can never be a packet's source on a wire. `dst` exempts the two cases that
/// are sound: address configuration probes from the unspecified address to a broadcast or
/// multicast group (DHCP discover, IPv6 DAD and MLD reports), which the kernel accepts too.
pub fn martian_source(src: IpAddr, dst: IpAddr) -> bool {
    match src {
        IpAddr::V4(s) => {
            let first = s.octets()[0];
            if s.is_unspecified() && (dst.is_multicast() || is_broadcast(dst)) {
                return false;
            }
            // 0/8 "this network", 127/8 loopback, 224/4 multicast, 240/4 class E (with the
            // limited broadcast 255.255.255.255).
            first == 0 || first == 127 || first >= 224
        }
        IpAddr::V6(s) => {
            if s.is_unspecified() && dst.is_multicast() {
                return false;
            }
            // ::, ::1, ff00::/8, and v4-mapped ::ffff:0:0/96 (RFC 4291 2.5.5.2: never on a wire,
            // and a way to look like an IPv4 peer to dual-stack sockets).
            s.is_unspecified()
                || s.is_loopback()
                || s.is_multicast()
                || s.to_ipv4_mapped().is_some()
        }
    }
}

fn is_broadcast(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V4(a) if a.is_broadcast())
}

/// What a received segment's TCP/UDP checksum field holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4Checksum {
    /// Verified here or by the kernel, or nothing to verify (another protocol, a fragment, a
    /// transport header that does not parse: the stages judge that one).
    Good,
    /// Partial: the driver said so, or (AF_XDP on a veth, which cannot say) the field holds
    /// exactly the pseudo-header sum. Finished on the way out.
    Partial,
    /// Neither complete nor partial: corrupted or forged.
    Bad,
}

/// Judge the TCP/UDP checksum of `ip` (classified as `c`) received with `rx`. A super-packet
/// (GSO) and a frame the kernel flagged `CHECKSUM_PARTIAL` carry a partial checksum by design
/// and are not summed.
pub fn l4_checksum(ip: &[u8], c: &Classified, rx: &RxMeta) -> L4Checksum {
    if !offload::offloadable(c) {
        return L4Checksum::Good;
    }
    if rx.csum_not_ready || rx.offload.gso != GsoType::None {
        return L4Checksum::Partial;
    }
    if rx.csum_valid || offload::l4_checksum_ok(ip, c) {
        return L4Checksum::Good;
    }
    if rx.csum_unknown && holds_pseudo_header_sum(ip, c) {
        return L4Checksum::Partial;
    }
    L4Checksum::Bad
}

/// Whether the checksum field holds the pseudo-header sum of the packet's addresses and L4
/// length, as a kernel leaves it for `CHECKSUM_PARTIAL` (`~tcp_v4_check(len, s, d, 0)`).
fn holds_pseudo_header_sum(ip: &[u8], c: &Classified) -> bool {
    let field = if c.key.proto == ip_proto::TCP { 16 } else { 6 };
    let Some(&[hi, lo]) = ip.get(c.l4_offset + field..c.l4_offset + field + 2) else {
        return false;
    };
    let Some(len) = c.ip_len.checked_sub(c.l4_offset) else {
        return false;
    };
    let pseudo = match (c.key.src, c.key.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            checksum::pseudo_header_v4(&s, &d, c.key.proto, len as u32)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            checksum::pseudo_header_v6(&s, &d, c.key.proto, len as u32)
        }
        _ => return false,
    };
    // `fold` complements; the partial value is the folded sum, where 0 and 0xffff are the same
    // ones'-complement number.
    let want = !checksum::fold(pseudo);
    let got = u16::from_be_bytes([hi, lo]);
    got == want || (got, want) == (0, 0xffff) || (got, want) == (0xffff, 0)
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;
    use crate::classify::classify;
    use crate::reply;

    fn v4(s: &str) -> IpAddr {
        IpAddr::V4(s.parse::<Ipv4Addr>().expect("v4"))
    }
    fn v6(s: &str) -> IpAddr {
        IpAddr::V6(s.parse::<Ipv6Addr>().expect("v6"))
    }

    #[test]
    fn martian_sources() {
        let server = v4("198.18.2.2");
        for s in [
            "0.0.0.0",
            "0.1.2.3",
            "127.0.0.1",
            "127.255.0.9",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
        ] {
            assert!(martian_source(v4(s), server), "{s}");
        }
        for s in ["198.18.1.2", "10.0.0.1", "1.1.1.1", "223.255.255.254"] {
            assert!(!martian_source(v4(s), server), "{s}");
        }
        // DHCP discover.
        assert!(!martian_source(v4("0.0.0.0"), v4("255.255.255.255")));
        let server = v6("2001:db8:2::2");
        for s in [
            "::",
            "::1",
            "ff02::1",
            "ff0e::1",
            "::ffff:198.18.1.2",
            "::ffff:0:0",
        ] {
            assert!(martian_source(v6(s), server), "{s}");
        }
        for s in [
            "2001:db8:1::2",
            "fe80::1",
            "::198.18.1.2",
            "64:ff9b::c612:102",
        ] {
            assert!(!martian_source(v6(s), server), "{s}");
        }
        // Duplicate address detection: a neighbour solicitation from :: to a solicited-node group.
        assert!(!martian_source(v6("::"), v6("ff02::1:ff00:2")));
    }

    fn syn(src: IpAddr, dst: IpAddr) -> Vec<u8> {
        let mut p = Vec::new();
        reply::tcp_segment(&mut p, src, dst, 40000, 80, 1, 0, 0x02, &[]).expect("segment");
        p
    }

    fn udp(src: Ipv4Addr, dst: Ipv4Addr, csum: u16) -> Vec<u8> {
        let mut p = Vec::new();
        reply::ipv4_header(&mut p, src, dst, 17, 12, 64);
        p.extend_from_slice(&[0x9c, 0x40, 0x00, 0x35, 0x00, 0x0c]);
        p.extend_from_slice(&csum.to_be_bytes());
        p.extend_from_slice(b"dva!");
        p
    }

    /// The pseudo-header sum a kernel leaves in a partial checksum.
    fn make_partial(ip: &mut [u8]) {
        let c = classify(ip).expect("classify");
        dva_wire::gso::set_partial_checksum(ip, c.l4_offset, c.key.proto).expect("partial");
    }

    #[test]
    fn checksums_good_partial_and_bad() {
        let xdp_veth = RxMeta {
            csum_unknown: true,
            ..RxMeta::default()
        };
        let plain = RxMeta::default();
        let judge = |ip: &[u8], rx: &RxMeta| {
            let c = classify(ip).expect("classify");
            l4_checksum(ip, &c, rx)
        };
        for (src, dst) in [
            (v4("198.18.1.2"), v4("198.18.2.2")),
            (v6("2001:db8:1::2"), v6("2001:db8:2::2")),
        ] {
            let good = syn(src, dst);
            assert_eq!(judge(&good, &plain), L4Checksum::Good);
            assert_eq!(judge(&good, &xdp_veth), L4Checksum::Good);
            let mut partial = good.clone();
            make_partial(&mut partial);
            // Only a driver that cannot say may guess; one that can has said it is complete.
            assert_eq!(judge(&partial, &xdp_veth), L4Checksum::Partial);
            assert_eq!(judge(&partial, &plain), L4Checksum::Bad);
            let mut bad = good.clone();
            let at = bad.len() - 4; // TCP checksum field (no options, no payload)
            bad[at] ^= 0x5a;
            assert_eq!(judge(&bad, &plain), L4Checksum::Bad);
            assert_eq!(judge(&bad, &xdp_veth), L4Checksum::Bad);
            // Flagged partial by the kernel (TP_STATUS_CSUMNOTREADY), or verified by it.
            let not_ready = RxMeta {
                csum_not_ready: true,
                ..RxMeta::default()
            };
            assert_eq!(judge(&bad, &not_ready), L4Checksum::Partial);
            let valid = RxMeta {
                csum_valid: true,
                ..RxMeta::default()
            };
            assert_eq!(judge(&bad, &valid), L4Checksum::Good);
        }
        let (s, d) = (
            "198.18.1.2".parse().expect("v4"),
            "198.18.2.2".parse().expect("v4"),
        );
        // UDP over IPv4 without a checksum (0) is allowed; a wrong one is not.
        assert_eq!(judge(&udp(s, d, 0), &plain), L4Checksum::Good);
        assert_eq!(judge(&udp(s, d, 0x1234), &plain), L4Checksum::Bad);
        let mut u = udp(s, d, 0);
        make_partial(&mut u);
        assert_eq!(judge(&u, &xdp_veth), L4Checksum::Partial);
        // A super-packet is partial by design.
        let mut gso = RxMeta::default();
        gso.offload.gso = GsoType::TcpV4;
        gso.offload.gso_size = 1448;
        let bad = udp(s, d, 0x1234);
        assert_eq!(judge(&bad, &gso), L4Checksum::Partial);
        // ICMP is not judged here.
        let mut e = Vec::new();
        reply::icmpv4_error(&mut e, &bad, d, 3, 3).expect("error");
        e[22] ^= 0xff;
        assert_eq!(judge(&e, &plain), L4Checksum::Good);
    }
}
