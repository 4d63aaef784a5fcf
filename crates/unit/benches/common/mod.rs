//! The dispatcher's per-packet work, and the frames it is measured on, shared by the criterion
//! bench (`dispatcher_path.rs`) and the instruction counter (`instructions.rs`), so both measure
//! the same code.
//!
//! [`dispatch`] does what `Dispatcher::on_frame` → `on_ipv4` → `send_to_dataplane` do for a
//! forwarded IPv4 packet (crates/unit/src/dispatcher/mod.rs): Ethernet header and destination
//! MAC, IPv4 header checks and header checksum, `classify`, the symmetric hash of the bucket key,
//! the bucket's owner, and the GENEVE header plus the copy of the IP packet into the backplane
//! send buffer. What it leaves out is I/O (the TPACKET_V3 ring, `sendmmsg`) and counters.

#![allow(dead_code)] // each bench target uses a different part of this module

use std::net::Ipv4Addr;

use dva_flow::BucketTable;
use dva_unit::classify::{classify, Classified};
use dva_wire::geneve::{self, DvaMeta, DVA_HEADER_LEN};
use dva_wire::tcp::flags;
use dva_wire::{ethertype, EthernetAddress, EthernetFrame, EthernetRepr, Ipv4Packet, Ipv4Repr};
use dva_wire::{ip_proto, TcpPacket, TcpRepr};

/// Distinct flows in a batch: enough that the batch is not one cached flow, few enough that
/// the frames stay in L2 like a receive ring's would.
pub const FLOWS: usize = 1024;
/// The bucket table of the edge-firewall spec.
pub const BUCKETS: usize = 4096;
/// Data planes the table spreads the buckets over.
pub const MEMBERS: [u32; 4] = [11, 12, 13, 14];
/// Room for the largest encapsulated packet (the backplane MTU is 9000).
pub const SLOT_LEN: usize = 9000;

/// The dispatcher's MAC on the outside segment.
pub const DISPATCHER_MAC: EthernetAddress = EthernetAddress([0x02, 0xd7, 0xa0, 0, 0, 1]);
const CLIENT_MAC: EthernetAddress = EthernetAddress([0x02, 0xc1, 0, 0, 0, 2]);

/// TCP ACK frames client → server of `FLOWS` distinct connections (client ports differ; three
/// servers, ports 80 and 5201), each carrying `payload` bytes of TCP data. `payload = 0` gives
/// the 54-byte frame of a bare ACK (padded to the 60-byte Ethernet minimum, as on the wire);
/// `payload = 1460` a full 1514-byte frame.
pub fn tcp_frames(payload: usize) -> Vec<Vec<u8>> {
    (0..FLOWS)
        .map(|i| {
            let src = Ipv4Addr::new(198, 18, 1, 2 + (i % 200) as u8);
            let dst = Ipv4Addr::new(198, 18, 2, 2 + (i % 3) as u8);
            // 37 is odd: distinct ports for the first 32768 flows.
            let sport = 32768 | ((i as u16).wrapping_mul(37) & 0x7fff);
            let dport = if i % 2 == 0 { 80 } else { 5201 };
            tcp_frame(src, sport, dst, dport, payload, i as u32)
        })
        .collect()
}

fn tcp_frame(
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
    payload: usize,
    seq: u32,
) -> Vec<u8> {
    let tcp = TcpRepr {
        src_port: sport,
        dst_port: dport,
        seq_number: seq.wrapping_mul(2_654_435_761),
        ack_number: 1,
        flags: flags::ACK,
        window_len: 502,
        payload_len: payload,
    };
    let ip = Ipv4Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: ip_proto::TCP,
        payload_len: tcp.buffer_len(),
        hop_limit: 64,
    };
    let eth = EthernetRepr {
        dst_addr: DISPATCHER_MAC,
        src_addr: CLIENT_MAC,
        vlan: None,
        ethertype: ethertype::IPV4,
    };
    let l3 = eth.header_len();
    let len = eth.buffer_len(ip.buffer_len()).max(60);
    let mut f = vec![0u8; len];
    eth.emit(&mut EthernetFrame::new_unchecked(&mut f[..]));
    ip.emit(&mut Ipv4Packet::new_unchecked(&mut f[l3..]));
    let l4 = l3 + ip.header_len();
    for (k, b) in f[l4 + tcp.header_len()..l4 + tcp.buffer_len()]
        .iter_mut()
        .enumerate()
    {
        *b = (k as u8).wrapping_mul(31) ^ seq as u8;
    }
    tcp.emit_v4(&mut TcpPacket::new_unchecked(&mut f[l4..]), &src, &dst);
    f
}

/// The Maglev table the manager would push: [`BUCKETS`] buckets over [`MEMBERS`].
pub fn table() -> BucketTable {
    BucketTable::maglev(BUCKETS, &MEMBERS).expect("valid table")
}

/// Why the dispatcher would not forward a frame (each is a counted drop there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drop {
    Ethernet,
    NotForUs,
    NotIpv4,
    Ip,
    Checksum,
    L4,
    Oversize,
}

/// Stage 1: Ethernet + IPv4 header checks + classify. Returns the IP packet (without link
/// padding) and what classify read from it.
#[inline]
pub fn parse(frame: &[u8]) -> Result<(&[u8], Classified), Drop> {
    let (l3, ether) = dva_wire::ethernet::l3_offset(frame).map_err(|_| Drop::Ethernet)?;
    let eth = EthernetFrame::new_unchecked(frame);
    if eth.dst_addr() != DISPATCHER_MAC {
        return Err(Drop::NotForUs);
    }
    if ether != ethertype::IPV4 {
        return Err(Drop::NotIpv4);
    }
    let ip = &frame[l3..];
    let pkt = Ipv4Packet::new_checked(ip).map_err(|_| Drop::Ip)?;
    if pkt.version() != 4 {
        return Err(Drop::Ip);
    }
    if !pkt.verify_checksum() {
        return Err(Drop::Checksum);
    }
    let ip = &ip[..usize::from(pkt.total_len())];
    let c = classify(ip).map_err(|_| Drop::L4)?;
    Ok((ip, c))
}

/// Stage 2: the bucket of a classified packet (symmetric hash of its bucket key, masked).
#[inline]
pub fn bucket(table: &BucketTable, c: &Classified) -> u16 {
    table.bucket_of(c.bucket_key().symmetric_hash())
}

/// Stage 3: GENEVE header with dva's option, then the IP packet, into `slot`. Returns the
/// encapsulated length.
#[inline]
pub fn encap(slot: &mut [u8], ip: &[u8], bucket: u16, ingress_if: u8) -> Result<usize, Drop> {
    let total = DVA_HEADER_LEN + ip.len();
    if slot.len() < total {
        return Err(Drop::Oversize);
    }
    let meta = DvaMeta {
        epoch: 7,
        bucket,
        hops: 0,
        flags: 0,
        ingress_if,
        egress_if: 0,
        gso_size: 0,
    };
    geneve::encap_dva(slot, 0x00d7a0, geneve::PROTO_IPV4, &meta);
    slot[DVA_HEADER_LEN..total].copy_from_slice(ip);
    Ok(total)
}

/// The whole per-packet path: returns the owner data plane and the encapsulated length.
#[inline]
pub fn dispatch(table: &BucketTable, frame: &[u8], slot: &mut [u8]) -> Result<(u32, usize), Drop> {
    let (ip, c) = parse(frame)?;
    let b = bucket(table, &c);
    let owner = table.owner(b);
    let len = encap(slot, ip, b, 0)?;
    Ok((owner, len))
}
