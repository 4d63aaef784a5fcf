//! Packet capture inside the data path: tcpdump cannot see what AF_XDP takes off an interface,
//! and backplane traffic between units on one machine goes through shared rings, so `dva
//! capture` copies packets where the unit handles them.
//!
//! - A [`Tap`] is one capture session: a small [`CaptureFilter`] (host / port / protocol, not
//!   BPF), a snap length, a packet budget and a deadline, and a bounded queue to the thread that
//!   writes the pcap stream. A full queue drops the packet and counts it: the packet path never
//!   waits on the consumer. Allocation happens only for packets the tap takes.
//! - [`Tapped`] wraps any [`FrameIo`] device with an optional tap (smoltcp's pcap-writer
//!   middleware): frames received and frames sent. With no tap it costs one `Option` check per
//!   batch and per transmitted frame.
//! - The backplane ([`crate::backplane::Backplane::set_tap`]) records datagrams as on the wire:
//!   sealed ones sealed (the GENEVE header and dva's option are in clear), inside Ethernet, IP
//!   and UDP headers made from the real addresses, so tshark decodes GENEVE on port 6081. The
//!   filter looks at the inner packet before sealing (or after opening).
//! - [`pcap_header`] / [`pcap_record`]: the classic libpcap file format, LINKTYPE_ETHERNET,
//!   microsecond timestamps.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use dva_wire::{ethertype, geneve, ip_proto};

use crate::{FrameIo, Offload, RxMeta};

/// LINKTYPE_ETHERNET.
pub const LINKTYPE_ETHERNET: u32 = 1;
/// Bytes of a pcap record header (ts_sec, ts_usec, incl_len, orig_len).
pub const RECORD_HEADER_LEN: usize = 16;
/// Bytes of the pcap file header.
pub const FILE_HEADER_LEN: usize = 24;
/// Largest snap length a session may ask for (a GSO super-packet is at most 64 KiB).
pub const MAX_SNAPLEN: usize = 65_535;

/// The pcap file header: magic, version 2.4, no time zone, `snaplen`, Ethernet.
pub fn pcap_header(snaplen: u32) -> [u8; FILE_HEADER_LEN] {
    let mut h = [0u8; FILE_HEADER_LEN];
    h[0..4].copy_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
    h[4..6].copy_from_slice(&2u16.to_le_bytes());
    h[6..8].copy_from_slice(&4u16.to_le_bytes());
    h[16..20].copy_from_slice(&snaplen.to_le_bytes());
    h[20..24].copy_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
    h
}

/// One captured packet: when (ns since the Unix epoch), its length on the wire, and its first
/// `snaplen` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Captured {
    pub ts_ns: u64,
    pub orig_len: u32,
    pub data: Vec<u8>,
}

/// The pcap record of `p`: header and data.
pub fn pcap_record(p: &Captured, out: &mut Vec<u8>) {
    let secs = (p.ts_ns / 1_000_000_000) as u32;
    let usecs = ((p.ts_ns % 1_000_000_000) / 1000) as u32;
    out.extend_from_slice(&secs.to_le_bytes());
    out.extend_from_slice(&usecs.to_le_bytes());
    out.extend_from_slice(&(p.data.len() as u32).to_le_bytes());
    out.extend_from_slice(&p.orig_len.to_le_bytes());
    out.extend_from_slice(&p.data);
}

/// Which packets a session takes: all conditions must hold; an empty filter takes everything.
/// For backplane datagrams the conditions apply to the packet they carry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CaptureFilter {
    /// Source or destination address.
    pub host: Option<IpAddr>,
    /// Source or destination port (TCP, UDP, UDP-Lite, SCTP).
    pub port: Option<u16>,
    /// IP protocol number.
    pub proto: Option<u8>,
}

/// What the filter looks at in a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Summary {
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    ports: Option<(u16, u16)>,
}

impl CaptureFilter {
    pub fn is_empty(&self) -> bool {
        self.host.is_none() && self.port.is_none() && self.proto.is_none()
    }

    fn matches(&self, s: Option<Summary>) -> bool {
        if self.is_empty() {
            return true;
        }
        let Some(s) = s else {
            return false;
        };
        self.host.is_none_or(|h| s.src == h || s.dst == h)
            && self.proto.is_none_or(|p| s.proto == p)
            && self
                .port
                .is_none_or(|p| s.ports.is_some_and(|(a, b)| a == p || b == p))
    }

    /// Whether an Ethernet frame matches.
    pub fn matches_frame(&self, frame: &[u8]) -> bool {
        self.is_empty() || self.matches(summarize_frame(frame))
    }

    /// Whether a (clear) GENEVE datagram's inner packet matches.
    pub fn matches_geneve(&self, datagram: &[u8]) -> bool {
        self.is_empty() || self.matches(summarize_geneve(datagram))
    }
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn summarize_frame(frame: &[u8]) -> Option<Summary> {
    let mut etype = be16(frame, 12)?;
    let mut at = 14;
    if etype == ethertype::VLAN {
        etype = be16(frame, 16)?;
        at = 18;
    }
    summarize_ip(etype, frame.get(at..)?)
}

fn summarize_geneve(d: &[u8]) -> Option<Summary> {
    let opt_len = usize::from(*d.first()? & 0x3f) * 4;
    let inner = d.get(8 + opt_len..)?;
    match be16(d, 2)? {
        geneve::PROTO_ETHERNET => summarize_frame(inner),
        t @ (geneve::PROTO_IPV4 | geneve::PROTO_IPV6) => summarize_ip(t, inner),
        _ => None,
    }
}

/// Addresses, protocol and ports of an IP packet (the first fragment's ports only).
fn summarize_ip(etype: u16, ip: &[u8]) -> Option<Summary> {
    let (src, dst, proto, l4) = match etype {
        ethertype::IPV4 => {
            let ihl = usize::from(*ip.first()? & 0x0f) * 4;
            let src: [u8; 4] = ip.get(12..16)?.try_into().ok()?;
            let dst: [u8; 4] = ip.get(16..20)?.try_into().ok()?;
            let first_fragment = be16(ip, 6)? & 0x1fff == 0;
            let l4 = if first_fragment { ip.get(ihl..) } else { None };
            (IpAddr::from(src), IpAddr::from(dst), *ip.get(9)?, l4)
        }
        ethertype::IPV6 => {
            let src: [u8; 16] = ip.get(8..24)?.try_into().ok()?;
            let dst: [u8; 16] = ip.get(24..40)?.try_into().ok()?;
            // Extension headers are not walked: the filter sees the next header as the protocol.
            (
                IpAddr::from(src),
                IpAddr::from(dst),
                *ip.get(6)?,
                ip.get(40..),
            )
        }
        _ => return None,
    };
    let ports = match proto {
        ip_proto::TCP | ip_proto::UDP | ip_proto::SCTP | ip_proto::UDPLITE => {
            l4.and_then(|l| Some((be16(l, 0)?, be16(l, 2)?)))
        }
        _ => None,
    };
    Some(Summary {
        src,
        dst,
        proto,
        ports,
    })
}

/// One capture session on the data path (see the module doc).
pub struct Tap {
    filter: CaptureFilter,
    snaplen: usize,
    /// Packets still to take.
    left: u64,
    until: Instant,
    out: SyncSender<Captured>,
    /// Packets that matched but found the queue full.
    dropped: Arc<AtomicU64>,
    /// A received sealed datagram, kept as on the wire until it is opened and filtered.
    stash: Vec<u8>,
}

impl std::fmt::Debug for Tap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tap")
            .field("filter", &self.filter)
            .field("snaplen", &self.snaplen)
            .field("left", &self.left)
            .finish()
    }
}

impl Tap {
    pub fn new(
        filter: CaptureFilter,
        snaplen: usize,
        max_packets: u64,
        until: Instant,
        out: SyncSender<Captured>,
        dropped: Arc<AtomicU64>,
    ) -> Tap {
        Tap {
            filter,
            snaplen: snaplen.clamp(1, MAX_SNAPLEN),
            left: max_packets,
            until,
            out,
            dropped,
            stash: Vec::new(),
        }
    }

    pub fn filter(&self) -> &CaptureFilter {
        &self.filter
    }

    /// The same session for another thread of the data path (a dispatcher's lanes): same
    /// filter, deadline and consumer, and a budget of its own (the consumer stops at the
    /// session's count, so together they never write more than it).
    pub fn fork(&self) -> Tap {
        Tap {
            filter: self.filter,
            snaplen: self.snaplen,
            left: self.left,
            until: self.until,
            out: self.out.clone(),
            dropped: self.dropped.clone(),
            stash: Vec::new(),
        }
    }

    /// Take a frame if it matches. False once the session is over (budget spent, deadline
    /// passed, consumer gone): the owner drops the tap.
    #[inline]
    pub fn frame(&mut self, frame: &[u8]) -> bool {
        if !self.filter.matches_frame(frame) {
            return true;
        }
        let take = frame.len().min(self.snaplen);
        self.record(frame.len(), |v| v.extend_from_slice(&frame[..take]))
    }

    /// Take a GENEVE datagram `src` -> `dst` whose clear form is `clear` and whose bytes on the
    /// wire are `wire` (sealed, or the same bytes through a ring), if the inner packet matches.
    pub fn datagram(
        &mut self,
        src: SocketAddr,
        dst: SocketAddr,
        clear: &[u8],
        wire: &[u8],
    ) -> bool {
        if !self.filter.matches_geneve(clear) {
            return true;
        }
        self.record_datagram(src, dst, wire)
    }

    /// Keep a received datagram as on the wire, before it is opened in place.
    pub fn stash(&mut self, wire: &[u8]) {
        self.stash.clear();
        self.stash.extend_from_slice(wire);
    }

    /// Take the stashed datagram if `clear` (its opened form; `None`: it failed to open) matches.
    pub fn stashed(&mut self, src: SocketAddr, dst: SocketAddr, clear: Option<&[u8]>) -> bool {
        let wanted = match clear {
            Some(c) => self.filter.matches_geneve(c),
            // Nothing to filter on: only an unfiltered capture shows what failed to open.
            None => self.filter.is_empty(),
        };
        if !wanted {
            return true;
        }
        let wire = std::mem::take(&mut self.stash);
        let more = self.record_datagram(src, dst, &wire);
        self.stash = wire;
        more
    }

    /// Take a datagram `src` -> `dst` as `payload` (already filtered by the caller), inside
    /// Ethernet + IP + UDP headers made from the real addresses (MACs are made up: the units
    /// exchange UDP, no frame of theirs exists). False once the session is over.
    pub fn record_datagram(&mut self, src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> bool {
        let v4 = matches!((src.ip(), dst.ip()), (IpAddr::V4(_), IpAddr::V4(_)));
        let ip_len = if v4 { 20 } else { 40 };
        let orig = 14 + ip_len + 8 + payload.len();
        let snaplen = self.snaplen;
        self.record(orig, |v| {
            let udp_len = (8 + payload.len()).min(usize::from(u16::MAX)) as u16;
            v.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01]);
            match (src.ip(), dst.ip()) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    v.extend_from_slice(&ethertype::IPV4.to_be_bytes());
                    let total = (20 + usize::from(udp_len)).min(usize::from(u16::MAX)) as u16;
                    let mut h = [0u8; 20];
                    h[0] = 0x45;
                    h[2..4].copy_from_slice(&total.to_be_bytes());
                    h[6] = 0x40; // DF
                    h[8] = 64;
                    h[9] = 17;
                    h[12..16].copy_from_slice(&s.octets());
                    h[16..20].copy_from_slice(&d.octets());
                    let sum = checksum(&h);
                    h[10..12].copy_from_slice(&sum.to_be_bytes());
                    v.extend_from_slice(&h);
                }
                (s, d) => {
                    let six = |a: IpAddr| match a {
                        IpAddr::V6(a) => a.octets(),
                        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
                    };
                    v.extend_from_slice(&ethertype::IPV6.to_be_bytes());
                    let mut h = [0u8; 40];
                    h[0] = 0x60;
                    h[4..6].copy_from_slice(&udp_len.to_be_bytes());
                    h[6] = 17;
                    h[7] = 64;
                    h[8..24].copy_from_slice(&six(s));
                    h[24..40].copy_from_slice(&six(d));
                    v.extend_from_slice(&h);
                }
            }
            v.extend_from_slice(&src.port().to_be_bytes());
            v.extend_from_slice(&dst.port().to_be_bytes());
            v.extend_from_slice(&udp_len.to_be_bytes());
            // No UDP checksum (allowed over IPv4; tshark does not check it by default).
            v.extend_from_slice(&[0, 0]);
            let room = snaplen.saturating_sub(v.len());
            v.extend_from_slice(&payload[..payload.len().min(room)]);
            v.truncate(snaplen);
        })
    }

    /// Queue one packet built by `fill`, unless the session is over. False once it is.
    fn record(&mut self, orig_len: usize, fill: impl FnOnce(&mut Vec<u8>)) -> bool {
        if self.left == 0 || Instant::now() >= self.until {
            return false;
        }
        let ts_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let mut data = Vec::with_capacity(orig_len.min(self.snaplen));
        fill(&mut data);
        let p = Captured {
            ts_ns,
            orig_len: orig_len.min(u32::MAX as usize) as u32,
            data,
        };
        match self.out.try_send(p) {
            Ok(()) => {
                self.left -= 1;
                self.left > 0
            }
            Err(TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(TrySendError::Disconnected(_)) => false,
        }
    }
}

/// The Internet checksum of an IPv4 header.
fn checksum(h: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in h.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Give `tap` a frame; drop the tap once its session is over.
#[inline]
pub fn tap_frame(tap: &mut Option<Tap>, frame: &[u8]) {
    if let Some(t) = tap {
        if !t.frame(frame) {
            *tap = None;
        }
    }
}

/// A device with an optional capture tap on what it receives and sends.
pub struct Tapped<D> {
    inner: D,
    tap: Option<Tap>,
}

impl<D: FrameIo> Tapped<D> {
    pub fn new(inner: D) -> Tapped<D> {
        Tapped { inner, tap: None }
    }
    pub fn inner(&self) -> &D {
        &self.inner
    }
    /// Start a session (ending the one running, if any), or end it with `None`.
    pub fn set_tap(&mut self, tap: Option<Tap>) {
        self.tap = tap;
    }
    pub fn tapping(&self) -> bool {
        self.tap.is_some()
    }
}

impl<D: FrameIo> FrameIo for Tapped<D> {
    #[inline]
    fn rx_batch<F: FnMut(&[u8], RxMeta)>(&mut self, max: usize, mut f: F) -> io::Result<usize> {
        if self.tap.is_none() {
            return self.inner.rx_batch(max, f);
        }
        let tap = &mut self.tap;
        self.inner.rx_batch(max, |frame, meta| {
            tap_frame(tap, frame);
            f(frame, meta)
        })
    }

    #[inline]
    fn tx(&mut self, frame: &[u8]) -> io::Result<()> {
        let r = self.inner.tx(frame);
        if r.is_ok() {
            tap_frame(&mut self.tap, frame);
        }
        r
    }

    fn offloads(&self) -> bool {
        self.inner.offloads()
    }

    #[inline]
    fn tx_offload(&mut self, frame: &[u8], off: &Offload) -> io::Result<()> {
        let r = self.inner.tx_offload(frame, off);
        if r.is_ok() {
            tap_frame(&mut self.tap, frame);
        }
        r
    }

    #[inline]
    fn tx_with(
        &mut self,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> Option<Offload>,
    ) -> io::Result<()> {
        if self.tap.is_none() {
            return self.inner.tx_with(len, fill);
        }
        let tap = &mut self.tap;
        self.inner.tx_with(len, |frame| {
            let off = fill(frame)?;
            tap_frame(tap, frame);
            Some(off)
        })
    }

    fn headroom(&self) -> Option<usize> {
        self.inner.headroom()
    }

    #[inline]
    unsafe fn tx_borrowed(&mut self, buf: &mut [u8], at: usize, off: &Offload) -> io::Result<()> {
        // SAFETY: the caller's contract, passed on.
        let r = unsafe { self.inner.tx_borrowed(buf, at, off) };
        if r.is_ok() {
            tap_frame(&mut self.tap, &buf[at..]);
        }
        r
    }

    fn detach(&mut self) {
        self.inner.detach()
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }

    fn as_raw_fd(&self) -> RawFd {
        self.inner.as_raw_fd()
    }

    fn poll_fds(&self) -> Vec<RawFd> {
        self.inner.poll_fds()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    fn tcp_frame(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 20];
        f[12..14].copy_from_slice(&ethertype::IPV4.to_be_bytes());
        f[14] = 0x45;
        f[14 + 9] = 6;
        f[14 + 12..14 + 16].copy_from_slice(&src);
        f[14 + 16..14 + 20].copy_from_slice(&dst);
        f[34..36].copy_from_slice(&sport.to_be_bytes());
        f[36..38].copy_from_slice(&dport.to_be_bytes());
        f
    }

    fn session(n: u64, snaplen: usize) -> (Tap, mpsc::Receiver<Captured>, Arc<AtomicU64>) {
        let (tx, rx) = mpsc::sync_channel(2);
        let dropped = Arc::new(AtomicU64::new(0));
        let until = Instant::now() + Duration::from_secs(60);
        let tap = Tap::new(
            CaptureFilter::default(),
            snaplen,
            n,
            until,
            tx,
            dropped.clone(),
        );
        (tap, rx, dropped)
    }

    #[test]
    fn filters_take_what_they_say() {
        let f = tcp_frame([198, 18, 1, 2], [198, 18, 2, 2], 40000, 80);
        let host = |h: [u8; 4]| CaptureFilter {
            host: Some(IpAddr::from(h)),
            ..Default::default()
        };
        assert!(CaptureFilter::default().matches_frame(&f));
        assert!(CaptureFilter::default().matches_frame(&[1, 2, 3]));
        assert!(host([198, 18, 2, 2]).matches_frame(&f));
        assert!(!host([198, 18, 2, 3]).matches_frame(&f));
        let port = |p| CaptureFilter {
            port: Some(p),
            proto: Some(6),
            ..Default::default()
        };
        assert!(port(80).matches_frame(&f) && port(40000).matches_frame(&f));
        assert!(!port(81).matches_frame(&f));
        assert!(
            !port(80).matches_frame(&f[..30]),
            "a short frame never panics nor matches"
        );
        // The same packet inside GENEVE (8-byte header, one 4-byte option word).
        let mut g = vec![0x01, 0, 0x08, 0x00, 0, 0, 0x2a, 0, 0, 0, 0, 0];
        g.extend_from_slice(&f[14..]);
        assert!(port(80).matches_geneve(&g));
        assert!(!host([10, 0, 0, 1]).matches_geneve(&g));
    }

    #[test]
    fn a_session_is_bounded_and_never_blocks() {
        let f = tcp_frame([198, 18, 1, 2], [198, 18, 2, 2], 40000, 80);
        let (mut tap, rx, dropped) = session(3, 40);
        assert!(tap.frame(&f));
        assert!(tap.frame(&f));
        // The queue holds 2: the third is dropped and counted, not waited for.
        assert!(tap.frame(&f));
        assert_eq!(dropped.load(Ordering::Relaxed), 1);
        let first = rx.recv().unwrap();
        assert_eq!((first.data.len(), first.orig_len), (40, f.len() as u32));
        assert_eq!(first.data[..], f[..40]);
        let _ = rx.recv().unwrap();
        assert!(!tap.frame(&f), "the budget of 3 is spent");
        let (mut tap, rx, _) = session(10, 40);
        drop(rx);
        assert!(!tap.frame(&f), "a consumer gone ends the session");
    }

    #[test]
    fn datagrams_get_real_outer_headers() {
        let (mut tap, rx, _) = session(10, 200);
        let payload = [0x01, 0, 0x08, 0, 0, 0, 0x2a, 0, 0xaa, 0xbb, 0xcc, 0xdd];
        let src: SocketAddr = "198.19.0.1:6081".parse().unwrap();
        let dst: SocketAddr = "198.19.0.11:6081".parse().unwrap();
        assert!(tap.datagram(src, dst, &payload, &payload));
        let p = rx.recv().unwrap();
        let d = &p.data;
        assert_eq!(be16(d, 12), Some(ethertype::IPV4));
        assert_eq!(checksum(&d[14..34]), 0, "a valid IPv4 header checksum");
        assert_eq!(&d[26..30], &[198, 19, 0, 1]);
        assert_eq!(be16(d, 36), Some(6081));
        assert_eq!(be16(d, 38), Some(8 + payload.len() as u16));
        assert_eq!(p.orig_len as usize, 14 + 20 + 8 + payload.len());
        assert_eq!(&d[42..], &payload[..]);
        let mut rec = Vec::new();
        pcap_record(&p, &mut rec);
        assert_eq!(rec.len(), RECORD_HEADER_LEN + p.data.len());
        assert_eq!(&pcap_header(40)[..4], &[0xd4, 0xc3, 0xb2, 0xa1]);
    }
}
