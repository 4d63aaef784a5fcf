//! Floods: raw Ethernet frames written from a lab namespace with AF_PACKET, bounded in count
//! and rate, for the flood test (`tests/e2e_flood.rs`) and `dva bench flood`.
//!
//! - [`syn_flood`]: TCP SYNs from random sources (or one source) to one address and port, what
//!   fills a stateful firewall with half-open connections;
//! - [`udp_flood`]: UDP datagrams on a new 5-tuple each (the ports count up), what fills it
//!   with connections a policy lets through.
//!
//! Frames are built here, checksums complete, and sent to the MAC the caller names: the next
//! hop (dva's dispatcher and the kernel router both answer for the lab's gateways with the
//! MAC of their `out0` / `in0`, see [`device_mac`]). Nothing goes through the sender's IP
//! stack, so spoofed sources need no route, and the sender never answers what comes back.

use std::net::Ipv4Addr;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dva_io::af_packet::{AfPacket, AfPacketConfig};
use dva_io::FrameIo;
use dva_wire::checksum;

use super::Xorshift;
use crate::LabError;

/// Frames queued between two flushes and two looks at the clock.
const BURST: usize = 256;
/// How long to wait for the kernel to drain a full TX ring.
const TX_BACKOFF: Duration = Duration::from_micros(200);
/// 60-byte frames (64 on a wire with the FCS): the cheapest to send, the dearest per byte to
/// handle.
const MIN_FRAME: usize = 60;
/// UDP ports the unique tuples are drawn from: 1024..65535.
const PORT_BASE: u64 = 1024;
const PORTS: u64 = 65536 - PORT_BASE;

/// The source address of the frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloodSource {
    /// Random unicast addresses with a first octet in 11..=100: never martian (a kernel
    /// router would drop those before its firewall), never the lab's 198.18.0.0/15.
    Random,
    /// One address (the sender's own, say: a compromised host behind the firewall).
    Fixed(Ipv4Addr),
}

/// What to send, from where, to whom, how much and how fast.
#[derive(Debug, Clone)]
pub struct FloodOptions {
    /// Namespace and interface the frames leave from.
    pub ns: String,
    pub dev: String,
    /// Destination MAC: the next hop, as [`device_mac`] reads it.
    pub next_hop_mac: [u8; 6],
    pub src: FloodSource,
    pub dst: Ipv4Addr,
    /// Frames to send.
    pub frames: usize,
    /// Frames per second at most; 0 sends as fast as the ring takes them.
    pub pps: u32,
    /// Seeds the random sources, ports and sequence numbers: the same seed, the same flood.
    pub seed: u64,
}

/// What a flood sent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FloodReport {
    pub sent: usize,
    pub elapsed: Duration,
}

impl FloodReport {
    /// The rate achieved, frames per second.
    pub fn pps(&self) -> f64 {
        self.sent as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// A flood being sent on its own thread.
#[derive(Debug)]
pub struct Flood {
    thread: JoinHandle<Result<FloodReport, LabError>>,
}

impl Flood {
    /// Waits for the flood to be sent.
    pub fn join(self) -> Result<FloodReport, LabError> {
        match self.thread.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Syn { dport: u16 },
    Udp,
}

/// `opts.frames` TCP SYNs to `opts.dst:dport`. Returns once the socket is open and the first
/// frames are on their way; [`Flood::join`] waits for the rest.
pub fn syn_flood(opts: &FloodOptions, dport: u16) -> Result<Flood, LabError> {
    start(opts, Kind::Syn { dport })
}

/// `opts.frames` UDP datagrams to `opts.dst`, each on a 5-tuple of its own (source and
/// destination ports count up over 1024..65535: 4 billion tuples before one repeats).
pub fn udp_flood(opts: &FloodOptions) -> Result<Flood, LabError> {
    start(opts, Kind::Udp)
}

/// The MAC of interface `dev` in namespace `ns`.
pub fn device_mac(ns: &str, dev: &str) -> Result<[u8; 6], LabError> {
    dva_io::netns::in_netns(ns, || dva_io::netif::mac_address(dev))
        .and_then(|r| r)
        .map_err(|source| LabError::Frames {
            ns: ns.to_string(),
            dev: dev.to_string(),
            source,
        })
}

fn start(opts: &FloodOptions, kind: Kind) -> Result<Flood, LabError> {
    let opts = opts.clone();
    let (ready_tx, ready_rx) = mpsc::sync_channel(1);
    let thread = std::thread::spawn(move || {
        let ns = opts.ns.clone();
        let dev = opts.dev.clone();
        let frames_err = |source| LabError::Frames {
            ns: ns.clone(),
            dev: dev.clone(),
            source,
        };
        dva_io::netns::in_netns(&opts.ns, || {
            let opened = dva_io::netif::mac_address(&opts.dev).and_then(|mac| {
                let cfg = AfPacketConfig {
                    // We only send: no reason to copy every frame on the link into our ring.
                    promiscuous: false,
                    ..Default::default()
                };
                AfPacket::open(&opts.dev, &cfg).map(|port| (mac, port))
            });
            match opened {
                Ok((mac, port)) => {
                    let _ = ready_tx.send(Ok(()));
                    send(&opts, kind, mac, port)
                }
                Err(e) => {
                    let msg = e.to_string();
                    let _ = ready_tx.send(Err(msg));
                    Err(e)
                }
            }
        })
        .and_then(|r| r)
        .map_err(frames_err)
    });
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(Flood { thread }),
        // The thread ended with the error: join it to return that error, not a copy.
        Ok(Err(_)) | Err(_) => Flood { thread }.join().and_then(|r| {
            Err(LabError::BadOutput {
                command: "flood".into(),
                reason: format!("the flood thread gave up before sending ({} sent)", r.sent),
            })
        }),
    }
}

fn send(
    opts: &FloodOptions,
    kind: Kind,
    src_mac: [u8; 6],
    mut port: AfPacket,
) -> Result<FloodReport, dva_io::IoError> {
    let mut rng = Xorshift::new(opts.seed);
    let mut frame = [0u8; MIN_FRAME];
    let start = Instant::now();
    let mut sent = 0;
    while sent < opts.frames {
        for _ in 0..BURST.min(opts.frames - sent) {
            let r = rng.next();
            let src = match opts.src {
                FloodSource::Random => random_source(r),
                FloodSource::Fixed(a) => a,
            };
            let hdr = Headers {
                dst_mac: opts.next_hop_mac,
                src_mac,
                src,
                dst: opts.dst,
            };
            match kind {
                Kind::Syn { dport } => {
                    // Ports from 1024 up: what a real client would use.
                    syn_frame(&mut frame, &hdr, r as u16 | 1024, dport, (r >> 16) as u32)
                }
                Kind::Udp => {
                    let (sport, dport) = unique_ports(sent as u64);
                    udp_frame(&mut frame, &hdr, sport, dport)
                }
            }
            while let Err(e) = port.tx(&frame) {
                if e.kind() != std::io::ErrorKind::WouldBlock {
                    return Err(send_error(&opts.dev, e));
                }
                std::thread::sleep(TX_BACKOFF);
                let _ = port.flush();
            }
            sent += 1;
        }
        while let Err(e) = port.flush() {
            if e.kind() != std::io::ErrorKind::WouldBlock {
                return Err(send_error(&opts.dev, e));
            }
            std::thread::sleep(TX_BACKOFF);
        }
        if opts.pps > 0 {
            let due = start + Duration::from_secs_f64(sent as f64 / f64::from(opts.pps));
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
    }
    Ok(FloodReport {
        sent,
        elapsed: start.elapsed(),
    })
}

fn send_error(dev: &str, source: std::io::Error) -> dva_io::IoError {
    dva_io::IoError::Syscall {
        call: "sendto AF_PACKET",
        on: dev.to_string(),
        source,
    }
}

fn random_source(r: u64) -> Ipv4Addr {
    let first = 11 + (r >> 56) % 90;
    Ipv4Addr::from(((first << 24) | ((r >> 32) & 0xff_ffff)) as u32)
}

/// The `i`-th pair of a walk over every (source, destination) port pair in 1024..65535.
fn unique_ports(i: u64) -> (u16, u16) {
    let sport = PORT_BASE + i % PORTS;
    let dport = PORT_BASE + (i / PORTS) % PORTS;
    (sport as u16, dport as u16)
}

struct Headers {
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
}

/// Ethernet + IPv4 (no options) for a `l4_len`-byte payload of protocol `proto`; returns the
/// offset of the payload.
fn eth_ipv4(f: &mut [u8; MIN_FRAME], h: &Headers, proto: u8, l4_len: usize) -> usize {
    f.fill(0);
    f[0..6].copy_from_slice(&h.dst_mac);
    f[6..12].copy_from_slice(&h.src_mac);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + l4_len) as u16).to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64; // TTL
    ip[9] = proto;
    ip[12..16].copy_from_slice(&h.src.octets());
    ip[16..20].copy_from_slice(&h.dst.octets());
    let c = checksum::data(ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    34
}

fn syn_frame(f: &mut [u8; MIN_FRAME], h: &Headers, sport: u16, dport: u16, seq: u32) {
    const TCP_LEN: usize = 20;
    let o = eth_ipv4(f, h, 6, TCP_LEN);
    let tcp = &mut f[o..o + TCP_LEN];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02; // SYN
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let c = checksum::fold(
        checksum::pseudo_header_v4(&h.src, &h.dst, 6, TCP_LEN as u32) + checksum::sum(tcp),
    );
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
}

fn udp_frame(f: &mut [u8; MIN_FRAME], h: &Headers, sport: u16, dport: u16) {
    // The rest of the minimum frame is the payload (zeros).
    const UDP_LEN: usize = MIN_FRAME - 34;
    let o = eth_ipv4(f, h, 17, UDP_LEN);
    let udp = &mut f[o..o + UDP_LEN];
    udp[0..2].copy_from_slice(&sport.to_be_bytes());
    udp[2..4].copy_from_slice(&dport.to_be_bytes());
    udp[4..6].copy_from_slice(&(UDP_LEN as u16).to_be_bytes());
    let c = checksum::fold(
        checksum::pseudo_header_v4(&h.src, &h.dst, 17, UDP_LEN as u32) + checksum::sum(udp),
    );
    // 0 means "no checksum" in UDP over IPv4: a computed 0 is sent as 0xffff.
    let c = if c == 0 { 0xffff } else { c };
    udp[6..8].copy_from_slice(&c.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn headers() -> Headers {
        Headers {
            dst_mac: [2, 0, 0, 0, 0, 1],
            src_mac: [2, 0, 0, 0, 0, 2],
            src: Ipv4Addr::new(50, 1, 2, 3),
            dst: Ipv4Addr::new(198, 18, 2, 2),
        }
    }

    /// A checksum over data that includes its own checksum field sums to 0 when it is right.
    fn l4_checksum_ok(f: &[u8; MIN_FRAME], proto: u8, len: usize) -> bool {
        let src = Ipv4Addr::new(f[26], f[27], f[28], f[29]);
        let dst = Ipv4Addr::new(f[30], f[31], f[32], f[33]);
        checksum::fold(
            checksum::pseudo_header_v4(&src, &dst, proto, len as u32)
                + checksum::sum(&f[34..34 + len]),
        ) == 0
    }

    #[test]
    fn syn_frames_are_well_formed() {
        let mut f = [0u8; MIN_FRAME];
        syn_frame(&mut f, &headers(), 40000, 80, 7);
        assert_eq!(&f[0..6], &[2, 0, 0, 0, 0, 1]);
        assert_eq!(&f[12..14], &[0x08, 0x00]);
        assert_eq!(checksum::data(&f[14..34]), 0, "IPv4 header checksum");
        assert_eq!(u16::from_be_bytes([f[16], f[17]]), 40);
        assert_eq!(f[23], 6);
        assert_eq!(u16::from_be_bytes([f[36], f[37]]), 80);
        assert_eq!(f[47], 0x02, "SYN only");
        assert!(l4_checksum_ok(&f, 6, 20));
    }

    #[test]
    fn udp_frames_are_well_formed() {
        let mut f = [0u8; MIN_FRAME];
        udp_frame(&mut f, &headers(), 1024, 5000);
        assert_eq!(checksum::data(&f[14..34]), 0, "IPv4 header checksum");
        assert_eq!(
            usize::from(u16::from_be_bytes([f[16], f[17]])),
            MIN_FRAME - 14
        );
        assert_eq!(f[23], 17);
        assert_eq!(u16::from_be_bytes([f[38], f[39]]), 26, "UDP length");
        assert!(l4_checksum_ok(&f, 17, 26));
    }

    #[test]
    fn udp_tuples_do_not_repeat() {
        let n = 3 * PORTS + 10;
        let tuples: HashSet<(u16, u16)> = (0..n).map(unique_ports).collect();
        assert_eq!(tuples.len() as u64, n);
        assert!(tuples.iter().all(|&(s, d)| s >= 1024 && d >= 1024));
    }

    #[test]
    fn random_sources_are_never_martian_nor_the_lab() {
        let mut rng = Xorshift::new(0x9e37_79b9_7f4a_7c15);
        for _ in 0..100_000 {
            let a = random_source(rng.next());
            let first = a.octets()[0];
            assert!((11..=100).contains(&first), "{a}");
        }
    }

    #[test]
    fn a_missing_namespace_is_an_error_not_a_flood() {
        let opts = FloodOptions {
            ns: "dva-no-such-namespace".into(),
            dev: "eth0".into(),
            next_hop_mac: [0; 6],
            src: FloodSource::Random,
            dst: Ipv4Addr::new(198, 18, 2, 2),
            frames: 1,
            pps: 0,
            seed: 1,
        };
        assert!(syn_flood(&opts, 80).is_err());
    }
}
