//! Super-packets and partial checksums on their way through the appliance.
//!
//! A kernel TCP sender hands a veth (or a NIC with TSO) 64 KB segments, and a receiving
//! kernel coalesces wire frames back into them (GRO). With `PACKET_VNET_HDR` the dispatcher
//! receives such a *super-packet* whole, with its description ([`dva_io::Offload`]): 40-odd
//! wire frames that cross the dispatcher, the backplane and the service chain as one packet,
//! the way they cross the kernel's own forwarding path. Their L4 checksum is usually *partial*
//! (the field holds the pseudo-header sum; the last device that can finish it does).
//!
//! The rules, end to end:
//! - The dispatcher marks a packet whose checksum is partial with
//!   [`dva_flags::CSUM_PARTIAL`] and a super-packet with its segment size
//!   ([`DvaMeta::gso_size`]); data planes keep both on what they forward (the stages may
//!   rewrite addresses and ports; the checksum field's content stops mattering).
//! - On the way out the dispatcher writes the pseudo-header sum of the final headers into the
//!   field and hands the frame to an interface that can offload ([`FrameIo::tx_offload`]);
//!   one that cannot (AF_XDP) gets wire-sized frames with complete checksums, cut and summed
//!   here ([`finish_in_software`]).
//! - A super-packet no backplane path can carry whole (UDP between machines) is cut into
//!   segments by its sender ([`encap_send`]): what the kernel's GSO would do, done once.
//!
//! No service needs to see every wire frame: conntrack tracks a super-packet's sequence range
//! as the kernel's does, and NAT/LB rewrite headers only.

use std::net::{IpAddr, SocketAddr};

use dva_io::backplane::BackplaneTx;
use dva_io::{FrameIo, GsoType, Offload};
use dva_wire::geneve::{self, dva_flags, DvaMeta, DVA_HEADER_LEN};
use dva_wire::{gso, ip_proto, TcpPacket, UdpPacket};

use crate::classify::Classified;

/// How a datagram left: whole, in `n` segments, or not at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    Whole,
    Segmented(usize),
    /// The batch was full, or a super-packet could not be cut (malformed): a counted drop.
    Failed,
}

/// Whether a packet with this classification can be offloaded (a partial checksum kept, a
/// super-packet carried whole): TCP and UDP, not fragments.
pub fn offloadable(c: &Classified) -> bool {
    matches!(c.key.proto, ip_proto::TCP | ip_proto::UDP) && !c.fragment
}

/// Whether the TCP/UDP checksum of `ip` verifies (the wire views' own check). A transport
/// header that does not parse counts as fine: it is no partial checksum, and the stages judge
/// malformed packets.
pub fn l4_checksum_ok(ip: &[u8], c: &Classified) -> bool {
    let seg = &ip[c.l4_offset.min(ip.len())..c.ip_len.min(ip.len())];
    match (c.key.proto, c.key.src, c.key.dst) {
        (ip_proto::TCP, IpAddr::V4(s), IpAddr::V4(d)) => {
            TcpPacket::new_checked(seg).map_or(true, |t| t.verify_checksum_v4(&s, &d))
        }
        (ip_proto::TCP, IpAddr::V6(s), IpAddr::V6(d)) => {
            TcpPacket::new_checked(seg).map_or(true, |t| t.verify_checksum_v6(&s, &d))
        }
        (ip_proto::UDP, IpAddr::V4(s), IpAddr::V4(d)) => {
            UdpPacket::new_checked(seg).map_or(true, |u| u.verify_checksum_v4(&s, &d))
        }
        (ip_proto::UDP, IpAddr::V6(s), IpAddr::V6(d)) => {
            UdpPacket::new_checked(seg).map_or(true, |u| u.verify_checksum_v6(&s, &d))
        }
        _ => true,
    }
}

/// Encapsulate `ip` with `meta` to `dst`, built once where it goes: whole into `dst`'s ring if
/// one exists, else into the UDP batch when it fits a datagram, else (a super-packet) cut into
/// segments, each with a complete checksum and no offload marks. `scratch` is reused for the
/// segments.
pub fn encap_send<B: BackplaneTx>(
    bp: &mut B,
    vni: u32,
    dst: SocketAddr,
    meta: &DvaMeta,
    ip: &[u8],
    scratch: &mut Vec<u8>,
) -> Sent {
    let ptype = if ip.first().map(|b| b >> 4) == Some(6) {
        geneve::PROTO_IPV6
    } else {
        geneve::PROTO_IPV4
    };
    let total = DVA_HEADER_LEN + ip.len();
    if bp.send_with(total, dst, |buf| {
        geneve::encap_dva(buf, vni, ptype, meta);
        buf[DVA_HEADER_LEN..].copy_from_slice(ip);
    }) {
        return Sent::Whole;
    }
    let Ok(c) = crate::classify::classify(ip) else {
        return Sent::Failed;
    };
    if meta.gso_size == 0 || !offloadable(&c) {
        return Sent::Failed;
    }
    let m = DvaMeta {
        gso_size: 0,
        flags: meta.flags & !dva_flags::CSUM_PARTIAL,
        ..*meta
    };
    let mut ok = true;
    let n = gso::segment(
        ip,
        c.l4_offset,
        c.key.proto,
        usize::from(meta.gso_size),
        scratch,
        |seg| {
            let total = DVA_HEADER_LEN + seg.len();
            match bp.tx_slot() {
                Some(slot) if slot.len() >= total => {
                    geneve::encap_dva(slot, vni, ptype, &m);
                    slot[DVA_HEADER_LEN..total].copy_from_slice(seg);
                    bp.commit_slot(total, dst);
                }
                _ => ok = false,
            }
        },
    );
    match n {
        Ok(n) if ok => Sent::Segmented(n),
        _ => Sent::Failed,
    }
}

/// The offload request for an Ethernet frame carrying `c` (IP header at byte 14), after
/// [`prepare_partial`] put the pseudo-header sum into its checksum field.
pub fn offload_for(c: &Classified, gso_size: u16, csum_offset: usize, tcp_cwr: bool) -> Offload {
    let gso = match (gso_size, c.key.proto, c.is_v6()) {
        (0, _, _) => GsoType::None,
        (_, ip_proto::TCP, false) => GsoType::TcpV4,
        (_, ip_proto::TCP, true) => GsoType::TcpV6,
        _ => GsoType::UdpL4,
    };
    Offload {
        gso,
        ecn: gso != GsoType::None && c.key.proto == ip_proto::TCP && tcp_cwr,
        gso_size,
        needs_csum: true,
        csum_start: (14 + c.l4_offset) as u16,
        csum_offset: csum_offset as u16,
    }
}

/// Write the partial checksum of `ip`'s final headers (addresses and length as they leave)
/// into its L4 checksum field. Returns the field's offset in the L4 header.
pub fn prepare_partial(ip: &mut [u8], c: &Classified) -> Option<usize> {
    gso::set_partial_checksum(ip, c.l4_offset, c.key.proto).ok()
}

/// Finish a frame for an interface that cannot offload: complete its checksum, or cut a
/// super-packet into wire frames with complete checksums. `frame` is Ethernet + IP; each
/// finished frame goes to `out`. Returns how many frames were made, `None` if the packet
/// could not be cut (malformed headers).
pub fn finish_in_software(
    frame: &mut [u8],
    c: &Classified,
    gso_size: u16,
    scratch: &mut Vec<u8>,
    framed: &mut Vec<u8>,
    mut out: impl FnMut(&[u8]),
) -> Option<usize> {
    let (eth, ip) = frame.split_at_mut(14);
    if gso_size == 0 {
        gso::complete_checksum(ip, c.l4_offset, c.key.proto).ok()?;
        out(frame);
        return Some(1);
    }
    gso::segment(
        ip,
        c.l4_offset,
        c.key.proto,
        usize::from(gso_size),
        scratch,
        |seg| {
            framed.clear();
            framed.extend_from_slice(eth);
            framed.extend_from_slice(seg);
            if framed.len() < 60 {
                framed.resize(60, 0);
            }
            out(framed);
        },
    )
    .ok()
}

/// Make Ethernet frame `frame` ready for a driver that offloads (partial checksum in place) and
/// describe the work left to the kernel; `None`: its L4 header is not where `c` says.
pub fn offload_in_place(frame: &mut [u8], c: &Classified, gso_size: u16) -> Option<Offload> {
    let csum_offset = prepare_partial(frame.get_mut(14..)?, c)?;
    let cwr = c.key.proto == ip_proto::TCP && c.tcp_flags & 0x80 != 0;
    Some(offload_for(c, gso_size, csum_offset, cwr))
}

/// Transmit an Ethernet frame that carries offload work on port `port`: through the kernel
/// where the driver can offload, else finished in software. Returns frames queued (0: the
/// driver refused them; the caller counts a drop).
#[allow(clippy::too_many_arguments)]
pub fn tx_offloaded<P: FrameIo>(
    port: &mut P,
    frame: &mut [u8],
    c: &Classified,
    gso_size: u16,
    scratch: &mut Vec<u8>,
    framed: &mut Vec<u8>,
) -> Option<usize> {
    if port.offloads() {
        let off = offload_in_place(frame, c, gso_size)?;
        return Some(usize::from(port.tx_offload(frame, &off).is_ok()));
    }
    let mut sent = 0;
    finish_in_software(frame, c, gso_size, scratch, framed, |f| {
        if port.tx(f).is_ok() {
            sent += 1;
        }
    })?;
    Some(sent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::classify;
    use dva_io::memory::MemoryIo;
    use dva_wire::checksum;

    /// Ethernet + IPv4 + TCP (20 B) + `payload` bytes, checksum field garbage (as a partial
    /// checksum after NAT rewrote the addresses would be).
    fn super_frame(payload: usize, flags: u8) -> Vec<u8> {
        let mut f = vec![0u8; 14];
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        let total = (40 + payload) as u16;
        let mut ip = vec![0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0];
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        ip.extend_from_slice(&[198, 18, 1, 1, 198, 18, 1, 2]);
        let ck = checksum::data(&ip);
        ip[10..12].copy_from_slice(&ck.to_be_bytes());
        f.extend_from_slice(&ip);
        let mut tcp = [0u8; 20];
        tcp[0..2].copy_from_slice(&1024u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&9000u16.to_be_bytes());
        tcp[4..8].copy_from_slice(&1000u32.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = flags;
        tcp[16..18].copy_from_slice(&[0xde, 0xad]);
        f.extend_from_slice(&tcp);
        f.extend((0..payload).map(|i| (i * 7 % 256) as u8));
        f
    }

    fn tcp_checksum_ok(ip: &[u8]) -> bool {
        let len = ip.len() - 20;
        let mut s = checksum::pseudo_header_v4(
            &[ip[12], ip[13], ip[14], ip[15]].into(),
            &[ip[16], ip[17], ip[18], ip[19]].into(),
            6,
            len as u32,
        );
        s += checksum::sum(&ip[20..]);
        checksum::fold(s) == 0
    }

    #[test]
    fn an_interface_without_offloads_gets_wire_frames_with_complete_checksums() {
        let mut port = MemoryIo::new();
        assert!(!port.offloads());
        let mut f = super_frame(10_000, 0x18); // PSH|ACK
        let c = classify(&f[14..]).expect("classify");
        let (mut seg, mut framed) = (Vec::new(), Vec::new());
        let n = tx_offloaded(&mut port, &mut f, &c, 1448, &mut seg, &mut framed);
        assert_eq!(n, Some(7));
        let frames = port.take_tx();
        assert_eq!(frames.len(), 7);
        let mut payload = Vec::new();
        for (i, fr) in frames.iter().enumerate() {
            assert_eq!(fr[..14], f[..14], "Ethernet header on every segment");
            let ip = &fr[14..];
            assert!(ip.len() <= 1500, "segment {i} is {} bytes", ip.len());
            assert_eq!(checksum::data(&ip[..20]), 0, "IPv4 header checksum");
            assert!(tcp_checksum_ok(ip), "TCP checksum of segment {i}");
            assert_eq!(ip[33] & 0x08 != 0, i == 6, "PSH on the last segment only");
            payload.extend_from_slice(&ip[40..]);
        }
        assert_eq!(payload, f[54..]);

        // A partial checksum on an ordinary frame is completed in place.
        let mut small = super_frame(100, 0x10);
        let c = classify(&small[14..]).expect("classify");
        assert_eq!(
            tx_offloaded(&mut port, &mut small, &c, 0, &mut seg, &mut framed),
            Some(1)
        );
        let frames = port.take_tx();
        assert!(tcp_checksum_ok(&frames[0][14..]));
    }

    #[test]
    fn partial_checksums_fail_verification_complete_ones_pass() {
        let mut f = super_frame(500, 0x18);
        let c = classify(&f[14..]).expect("classify");
        prepare_partial(&mut f[14..], &c).expect("partial");
        assert!(
            !l4_checksum_ok(&f[14..], &c),
            "a partial checksum is not a complete one"
        );
        gso::complete_checksum(&mut f[14..], c.l4_offset, c.key.proto).expect("complete");
        assert!(l4_checksum_ok(&f[14..], &c));
        f[60] ^= 1;
        assert!(!l4_checksum_ok(&f[14..], &c), "one flipped bit");
    }

    #[test]
    fn the_offload_request_names_the_segments_and_the_checksum() {
        let mut f = super_frame(3000, 0x90); // CWR|ACK
        let c = classify(&f[14..]).expect("classify");
        let at = prepare_partial(&mut f[14..], &c).expect("partial");
        assert_eq!(at, 16);
        let off = offload_for(&c, 1448, at, c.tcp_flags & 0x80 != 0);
        assert_eq!(off.gso, GsoType::TcpV4);
        assert!(off.ecn && off.needs_csum);
        assert_eq!(
            (off.csum_start, off.csum_offset, off.gso_size),
            (34, 16, 1448)
        );
        // What the kernel does with it: sum from csum_start, store at csum_offset.
        let full = checksum::fold(checksum::sum(&f[34..]));
        f[50..52].copy_from_slice(&full.to_be_bytes());
        assert!(tcp_checksum_ok(&f[14..]));
    }
}
