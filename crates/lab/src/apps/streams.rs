//! Long-lived TCP streams whose every byte is checked: the traffic that proves a scale event
//! broke no connection. Each client connection sends a deterministic byte pattern, paced, for a
//! set time, then half-closes; the server checks every byte and answers with what it received
//! and the first wrong offset. A reset, a stall past the timeout, a lost or wrong byte: a failure.
//!
//! Both ends are threads of the calling process placed in lab namespaces (setns on their own
//! thread), so results come back as values, not as logs to parse.

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The byte at `offset` of stream `seed`.
#[inline]
fn pattern(seed: u64, offset: u64) -> u8 {
    let x = offset.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed.wrapping_mul(0xff51_afd7_ed55_8ccd);
    (x >> 56) as u8 ^ (offset as u8)
}

const NO_ERROR: u64 = u64::MAX;
const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// A checking server in a lab namespace; stops (and closes its socket) on drop.
pub struct StreamServer {
    stop: Arc<AtomicBool>,
    addr: SocketAddr,
    handle: Option<JoinHandle<()>>,
}

impl StreamServer {
    pub fn start(ns: &str, port: u16) -> std::io::Result<StreamServer> {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let ns = ns.to_string();
        let s = stop.clone();
        let handle = std::thread::Builder::new()
            .name(format!("streams-{ns}"))
            .spawn(move || {
                let listener = dva_io::netns::enter(&ns)
                    .map_err(|e| std::io::Error::other(e.to_string()))
                    .and_then(|()| TcpListener::bind(("0.0.0.0", port)))
                    .and_then(|l| l.set_nonblocking(true).map(|()| l));
                let listener = match listener {
                    Ok(l) => {
                        let _ = tx.send(Ok(()));
                        l
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                while !s.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((conn, _)) => {
                            // Threads inherit this thread's namespace (not that accepted sockets care).
                            let _ = std::thread::Builder::new()
                                .name("stream-check".into())
                                .spawn(move || check_one(conn));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            })?;
        rx.recv()
            .map_err(|_| std::io::Error::other("stream server thread died"))??;
        Ok(StreamServer {
            stop,
            addr: SocketAddr::new(IpAddr::from([0, 0, 0, 0]), port),
            handle: Some(handle),
        })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

impl Drop for StreamServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Server side of one stream: an 8-byte seed, then the pattern until EOF; answer
/// (bytes received, first bad offset or u64::MAX).
fn check_one(mut conn: TcpStream) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(IO_TIMEOUT));
    let mut seed = [0u8; 8];
    if conn.read_exact(&mut seed).is_err() {
        return;
    }
    let seed = u64::from_be_bytes(seed);
    let mut buf = vec![0u8; 64 * 1024];
    let mut offset = 0u64;
    let mut bad = NO_ERROR;
    loop {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if bad == NO_ERROR {
                    for (i, b) in buf[..n].iter().enumerate() {
                        if *b != pattern(seed, offset + i as u64) {
                            bad = offset + i as u64;
                            break;
                        }
                    }
                }
                offset += n as u64;
            }
            Err(_) => return,
        }
    }
    let mut answer = [0u8; 16];
    answer[..8].copy_from_slice(&offset.to_be_bytes());
    answer[8..].copy_from_slice(&bad.to_be_bytes());
    let _ = conn.write_all(&answer);
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamResult {
    pub index: usize,
    pub sent: u64,
    /// What the server says it received, and the first offset that was wrong.
    pub received: u64,
    pub first_bad: Option<u64>,
    pub error: Option<String>,
}

impl StreamResult {
    pub fn intact(&self) -> bool {
        self.error.is_none() && self.first_bad.is_none() && self.received == self.sent
    }
}

/// `n` streams from namespace `ns` to `dst`, each sending `rate` bytes/s for `duration`.
/// Returns at once; `join` the handle for the results.
pub fn start_streams(
    ns: &str,
    dst: SocketAddr,
    n: usize,
    duration: Duration,
    rate: u64,
) -> JoinHandle<Vec<StreamResult>> {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        if let Err(e) = dva_io::netns::enter(&ns) {
            return (0..n)
                .map(|index| StreamResult {
                    index,
                    sent: 0,
                    received: 0,
                    first_bad: None,
                    error: Some(format!("entering {ns}: {e}")),
                })
                .collect();
        }
        let workers: Vec<_> = (0..n)
            .map(|index| std::thread::spawn(move || one_stream(index, dst, duration, rate)))
            .collect();
        workers
            .into_iter()
            .enumerate()
            .map(|(index, w)| {
                w.join().unwrap_or_else(|_| StreamResult {
                    index,
                    sent: 0,
                    received: 0,
                    first_bad: None,
                    error: Some("stream thread panicked".into()),
                })
            })
            .collect()
    })
}

fn one_stream(index: usize, dst: SocketAddr, duration: Duration, rate: u64) -> StreamResult {
    let seed = 0x5eed_0000 + index as u64;
    let mut r = StreamResult {
        index,
        sent: 0,
        received: 0,
        first_bad: None,
        error: None,
    };
    let result = (|| -> std::io::Result<()> {
        let mut conn = TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
        conn.set_write_timeout(Some(IO_TIMEOUT))?;
        conn.set_read_timeout(Some(IO_TIMEOUT))?;
        conn.set_nodelay(true)?;
        conn.write_all(&seed.to_be_bytes())?;
        let start = Instant::now();
        let chunk = (rate / 20).clamp(1, 64 * 1024) as usize;
        let mut buf = vec![0u8; chunk];
        while start.elapsed() < duration {
            for (i, b) in buf.iter_mut().enumerate() {
                *b = pattern(seed, r.sent + i as u64);
            }
            conn.write_all(&buf)?;
            r.sent += chunk as u64;
            // Pace to `rate`: sleep until the time this many bytes are due.
            let due = Duration::from_secs_f64(r.sent as f64 / rate.max(1) as f64);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        conn.shutdown(Shutdown::Write)?;
        let mut answer = [0u8; 16];
        conn.read_exact(&mut answer)?;
        r.received = u64::from_be_bytes(answer[..8].try_into().unwrap_or([0; 8]));
        let bad = u64::from_be_bytes(answer[8..].try_into().unwrap_or([0; 8]));
        r.first_bad = (bad != NO_ERROR).then_some(bad);
        Ok(())
    })();
    if let Err(e) = result {
        r.error = Some(e.to_string());
    }
    r
}

#[cfg(test)]
mod tests {
    use super::pattern;

    #[test]
    fn pattern_differs_between_streams_and_offsets() {
        let a: Vec<u8> = (0..64).map(|i| pattern(1, i)).collect();
        let b: Vec<u8> = (0..64).map(|i| pattern(2, i)).collect();
        assert_ne!(a, b);
        assert!(a.windows(2).any(|w| w[0] != w[1]));
    }
}
