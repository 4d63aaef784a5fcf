//! Paced UDP streams with sequence numbers, echoed back by a server: what proves that moving a
//! connectionless flow between data planes loses and reorders nothing, and how much latency a
//! scale event adds. Every datagram carries (stream, seq, send time); the server echoes it; the
//! client counts echoes lost, echoes out of order, and the round-trip times.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const MAGIC: u32 = 0xd7a0_0dd5;
const LEN: usize = 64;

/// An echo server in a lab namespace; stops on drop.
pub struct UdpEchoServer {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl UdpEchoServer {
    pub fn start(ns: &str, port: u16) -> std::io::Result<UdpEchoServer> {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let ns = ns.to_string();
        let s = stop.clone();
        let handle = std::thread::Builder::new()
            .name(format!("udp-echo-{ns}"))
            .spawn(move || {
                let sock = dva_io::netns::enter(&ns)
                    .map_err(|e| std::io::Error::other(e.to_string()))
                    .and_then(|()| UdpSocket::bind(("0.0.0.0", port)))
                    .and_then(|u| {
                        u.set_read_timeout(Some(Duration::from_millis(100)))
                            .map(|()| u)
                    });
                let sock = match sock {
                    Ok(u) => {
                        let _ = tx.send(Ok(()));
                        u
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let mut buf = [0u8; 2048];
                while !s.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = sock.recv_from(&mut buf) {
                        let _ = sock.send_to(&buf[..n], from);
                    }
                }
            })?;
        rx.recv()
            .map_err(|_| std::io::Error::other("udp echo thread died"))??;
        Ok(UdpEchoServer {
            stop,
            handle: Some(handle),
        })
    }
}

impl Drop for UdpEchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct UdpStreamResult {
    pub index: usize,
    pub sent: u64,
    pub received: u64,
    /// Echoes that arrived after a later one.
    pub reordered: u64,
    pub lost: u64,
    /// Round-trip times, microseconds: median and worst.
    pub rtt_p50_us: u64,
    pub rtt_max_us: u64,
    /// (time since start, rtt) of the worst echo.
    pub worst_at: Duration,
    pub error: Option<String>,
}

/// `n` UDP streams from `ns` to `dst` (an echo server), each `pps` datagrams per second for
/// `duration`; after the last send, echoes are awaited for 1 s. Returns at once; join for results.
pub fn start_udp_streams(
    ns: &str,
    dst: SocketAddr,
    n: usize,
    duration: Duration,
    pps: u32,
) -> JoinHandle<Vec<UdpStreamResult>> {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        if let Err(e) = dva_io::netns::enter(&ns) {
            return (0..n)
                .map(|index| UdpStreamResult {
                    index,
                    error: Some(format!("entering {ns}: {e}")),
                    ..Default::default()
                })
                .collect();
        }
        let workers: Vec<_> = (0..n)
            .map(|i| std::thread::spawn(move || one(i, dst, duration, pps)))
            .collect();
        workers
            .into_iter()
            .enumerate()
            .map(|(index, w)| {
                w.join().unwrap_or_else(|_| UdpStreamResult {
                    index,
                    error: Some("udp stream thread panicked".into()),
                    ..Default::default()
                })
            })
            .collect()
    })
}

fn one(index: usize, dst: SocketAddr, duration: Duration, pps: u32) -> UdpStreamResult {
    let mut r = UdpStreamResult {
        index,
        ..Default::default()
    };
    let sock = match UdpSocket::bind(("0.0.0.0", 0)) {
        Ok(s) => s,
        Err(e) => {
            r.error = Some(e.to_string());
            return r;
        }
    };
    let _ = sock.set_read_timeout(Some(Duration::from_millis(1)));
    let start = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / f64::from(pps.max(1)));
    let mut next_send = start;
    let mut highest: Option<u64> = None;
    let mut rtts = Vec::new();
    let mut buf = [0u8; 2048];
    let end_send = start + duration;
    let end_recv = end_send + Duration::from_secs(1);
    let mut seen = std::collections::HashSet::new();
    loop {
        let now = Instant::now();
        if now >= end_recv {
            break;
        }
        if now >= next_send && now < end_send {
            let mut p = [0u8; LEN];
            p[..4].copy_from_slice(&MAGIC.to_be_bytes());
            p[4..8].copy_from_slice(&(index as u32).to_be_bytes());
            p[8..16].copy_from_slice(&r.sent.to_be_bytes());
            p[16..24].copy_from_slice(&(now.duration_since(start).as_nanos() as u64).to_be_bytes());
            if sock.send_to(&p, dst).is_ok() {
                r.sent += 1;
            }
            next_send += interval;
            continue;
        }
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            if n < 24 || buf[..4] != MAGIC.to_be_bytes() {
                continue;
            }
            let seq = u64::from_be_bytes(buf[8..16].try_into().unwrap_or([0; 8]));
            let sent_ns = u64::from_be_bytes(buf[16..24].try_into().unwrap_or([0; 8]));
            if !seen.insert(seq) {
                continue;
            }
            r.received += 1;
            if highest.is_some_and(|h| seq < h) {
                r.reordered += 1;
            }
            highest = Some(highest.map_or(seq, |h| h.max(seq)));
            let at = Instant::now().duration_since(start);
            let rtt = at.as_nanos() as u64 - sent_ns.min(at.as_nanos() as u64);
            if rtt / 1000 > r.rtt_max_us {
                r.rtt_max_us = rtt / 1000;
                r.worst_at = at;
            }
            rtts.push(rtt / 1000);
        }
    }
    r.lost = r.sent.saturating_sub(r.received);
    rtts.sort_unstable();
    r.rtt_p50_us = rtts.get(rtts.len() / 2).copied().unwrap_or(0);
    r
}
