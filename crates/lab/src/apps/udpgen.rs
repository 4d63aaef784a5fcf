//! A small-packet UDP load: a generator that sends short datagrams as fast as it can (or at a
//! set rate) over many flows for a set time, and a sink that counts what arrives. Packets per
//! second, not bytes, is what stresses a per-packet path such as a firewall's.
//!
//! Both ends are threads of the calling process placed in lab namespaces (setns on their own
//! thread, as in [`super::start_streams`]), and both use dva-io's batched UDP endpoint
//! (`sendmmsg`/`recvmmsg`, 8 MiB socket buffers), so one syscall moves up to 64 datagrams and
//! neither end is the first bottleneck of a kernel path. The sink sleeps in poll(2) when idle.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dva_io::poll::Poller;
use dva_io::udp::{UdpConfig, UdpEndpoint};

/// First bytes of every generated datagram, so the sink counts ours only.
const MAGIC: [u8; 4] = *b"dvaG";
/// Datagrams per `sendmmsg`/`recvmmsg`.
const BATCH: usize = 64;

/// Counts the generator's datagrams arriving at one UDP port in a lab namespace; stops on drop.
pub struct UdpSink {
    stop: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
    handle: Option<JoinHandle<()>>,
    port: u16,
}

impl UdpSink {
    /// Binds 0.0.0.0:`port` in `ns` and counts from then on.
    pub fn start(ns: &str, port: u16) -> std::io::Result<UdpSink> {
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(0));
        let (tx, rx) = std::sync::mpsc::channel();
        let ns = ns.to_string();
        let (s, r) = (stop.clone(), received.clone());
        let handle = std::thread::Builder::new()
            .name(format!("udp-sink-{ns}"))
            .spawn(move || {
                let ep = dva_io::netns::enter(&ns)
                    .map_err(|e| std::io::Error::other(e.to_string()))
                    .and_then(|()| {
                        endpoint(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port))
                    });
                let mut ep = match ep {
                    Ok(ep) => {
                        let _ = tx.send(Ok(()));
                        ep
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let mut poller = Poller::new(&[ep.as_raw_fd()]);
                while !s.load(Ordering::Relaxed) {
                    let mut n = 0u64;
                    let got = ep.recv_batch(BATCH * 4, |d, _| {
                        n += u64::from(d.starts_with(&MAGIC));
                    });
                    r.fetch_add(n, Ordering::Relaxed);
                    if matches!(got, Ok(0) | Err(_)) {
                        let _ = poller.wait(50);
                    }
                }
            })?;
        rx.recv()
            .map_err(|_| std::io::Error::other("udp sink thread died"))??;
        Ok(UdpSink {
            stop,
            received,
            handle: Some(handle),
            port,
        })
    }

    /// Generator datagrams received so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for UdpSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// What to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpGenOptions {
    /// The sink's address.
    pub dst: SocketAddr,
    /// Distinct flows (source ports, one socket each), sent to round-robin: a flow-hashing
    /// path spreads them over its workers, one flow would land on one.
    pub flows: usize,
    /// UDP payload bytes (at least 4). 18 gives 60-byte frames, 64 on the wire with the FCS.
    pub payload: usize,
    pub duration: Duration,
    /// Datagrams per second; `None`: as fast as the sending thread can.
    pub rate: Option<u64>,
}

/// What the generator did.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct UdpGenReport {
    /// Datagrams the kernel accepted.
    pub sent: u64,
    /// Datagrams the kernel refused (socket buffer full, no route).
    pub send_dropped: u64,
    pub elapsed: Duration,
}

impl UdpGenReport {
    pub fn sent_pps(&self) -> f64 {
        self.sent as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Runs the generator in `ns` on a thread of its own (the caller's thread keeps its namespace)
/// and returns when it is done.
pub fn udpgen(ns: &str, opts: &UdpGenOptions) -> std::io::Result<UdpGenReport> {
    if opts.flows == 0 || opts.payload < MAGIC.len() || opts.duration.is_zero() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "udpgen: need at least 1 flow, a payload of at least {} bytes and a duration (got {opts:?})",
                MAGIC.len()
            ),
        ));
    }
    let ns = ns.to_string();
    let opts = opts.clone();
    std::thread::Builder::new()
        .name(format!("udpgen-{ns}"))
        .spawn(move || {
            dva_io::netns::enter(&ns).map_err(|e| std::io::Error::other(e.to_string()))?;
            generate(&opts)
        })?
        .join()
        .map_err(|_| std::io::Error::other("udpgen thread panicked"))?
}

fn endpoint(addr: SocketAddr) -> std::io::Result<UdpEndpoint> {
    UdpEndpoint::bind_with(
        addr,
        &UdpConfig {
            rx_batch: BATCH,
            tx_batch: BATCH,
            socket_buffer: 8 << 20,
        },
    )
    .map_err(|e| std::io::Error::other(e.to_string()))
}

fn generate(opts: &UdpGenOptions) -> std::io::Result<UdpGenReport> {
    let any = match opts.dst.ip() {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    let mut socks = (0..opts.flows)
        .map(|_| endpoint(SocketAddr::new(any, 0)))
        .collect::<std::io::Result<Vec<_>>>()?;
    let mut payload = vec![0u8; opts.payload];
    payload[..MAGIC.len()].copy_from_slice(&MAGIC);
    let start = Instant::now();
    let end = start + opts.duration;
    let mut queued = 0u64;
    let mut flow = 0;
    // The clock is read every 16 batches (1024 datagrams), not per datagram.
    let mut batches = 0u32;
    loop {
        // A whole batch per flow, then the next flow: each sendmmsg carries one flow's datagrams.
        for _ in 0..BATCH {
            let _ = socks[flow].send_to(&payload, opts.dst);
        }
        queued += BATCH as u64;
        flow = (flow + 1) % socks.len();
        batches += 1;
        if batches < 16 {
            continue;
        }
        batches = 0;
        let now = Instant::now();
        if now >= end {
            break;
        }
        if let Some(rate) = opts.rate {
            let due = start + Duration::from_secs_f64(queued as f64 / rate.max(1) as f64);
            if due > now {
                std::thread::sleep((due - now).min(end - now));
            }
        }
    }
    for s in &mut socks {
        let _ = s.flush();
    }
    let elapsed = start.elapsed();
    let (sent, send_dropped) = socks.iter().fold((0, 0), |(s, d), ep| {
        let st = ep.stats();
        (s + st.tx_datagrams, d + st.tx_dropped)
    });
    Ok(UdpGenReport {
        sent,
        send_dropped,
        elapsed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_options_are_rejected_before_any_thread_starts() {
        let base = UdpGenOptions {
            dst: "198.18.1.2:9".parse().unwrap(),
            flows: 1,
            payload: 18,
            duration: Duration::from_secs(1),
            rate: None,
        };
        for bad in [
            UdpGenOptions {
                flows: 0,
                ..base.clone()
            },
            UdpGenOptions {
                payload: 3,
                ..base.clone()
            },
            UdpGenOptions {
                duration: Duration::ZERO,
                ..base.clone()
            },
        ] {
            let e = udpgen("nowhere", &bad).unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{e}");
        }
    }
}
