//! Active health checks of load-balancer backends, run by the dispatcher from the appliance's own
//! address on the backends' network (the dispatcher is the unit at the network's edge; data
//! planes have no interface there).
//!
//! A probe is a tiny TCP client written over raw segments: SYN; on SYN-ACK a `tcp` check has
//! succeeded (we reset the connection), an `http` check sends `GET path` on the ACK and succeeds
//! on a `HTTP/1.x 2xx/3xx` status line; a RST or the timeout is a failure. `rise` successes in a
//! row bring a backend up, `fall` failures take it down (HAProxy's semantics). Probe source ports
//! come from [`PORT_FIRST`]..=[`PORT_LAST`], which NAT never allocates.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use dva_proto::role::{HealthCheckConfig, HealthKind};
use dva_wire::tcp::flags::{ACK, PSH, RST, SYN};

use crate::classify::Classified;
use crate::reply;

pub const PORT_FIRST: u16 = 65000;
pub const PORT_LAST: u16 = 65535;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    SynSent,
    RequestSent,
}

#[derive(Debug)]
struct Probe {
    port: u16,
    isn: u32,
    sent: Instant,
    stage: Stage,
    request_len: u32,
}

#[derive(Debug)]
struct Target {
    cfg: HealthCheckConfig,
    up: bool,
    successes: u32,
    failures: u32,
    probe: Option<Probe>,
    next_at: Instant,
    last_error: Option<String>,
}

/// (service, backend, up, last failure)
pub type HealthState = (String, String, bool, Option<String>);

#[derive(Debug, Default)]
pub struct HealthChecker {
    targets: Vec<Target>,
    next_port: u16,
    /// State changes since the last call to [`HealthChecker::take_changes`] (for the log).
    changes: Vec<String>,
}

impl HealthChecker {
    /// Take a new set of checks; targets that stay keep their state.
    pub fn configure(&mut self, checks: &[HealthCheckConfig], now: Instant) {
        let mut old = std::mem::take(&mut self.targets);
        for (i, c) in checks.iter().enumerate() {
            let kept = old
                .iter()
                .position(|t| t.cfg.service == c.service && t.cfg.backend == c.backend);
            let t = match kept {
                Some(p) => {
                    let mut t = old.swap_remove(p);
                    t.cfg = c.clone();
                    t
                }
                None => Target {
                    cfg: c.clone(),
                    // Backends start up (as HAProxy's do): a dead one is out after `fall` probes.
                    up: true,
                    successes: 0,
                    failures: 0,
                    probe: None,
                    // Spread the first probes over the interval.
                    next_at: now
                        + Duration::from_millis(
                            c.interval_ms * i as u64 / checks.len().max(1) as u64,
                        ),
                    last_error: None,
                },
            };
            self.targets.push(t);
        }
    }

    pub fn states(&self) -> Vec<HealthState> {
        self.targets
            .iter()
            .map(|t| {
                (
                    t.cfg.service.clone(),
                    t.cfg.backend.clone(),
                    t.up,
                    t.last_error.clone(),
                )
            })
            .collect()
    }

    pub fn take_changes(&mut self) -> Vec<String> {
        std::mem::take(&mut self.changes)
    }

    pub fn is_probe_port(port: u16) -> bool {
        (PORT_FIRST..=PORT_LAST).contains(&port)
    }

    /// Time out probes and start due ones; returns IP packets to send.
    pub fn tick(&mut self, now: Instant) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for i in 0..self.targets.len() {
            let timed_out = self.targets[i].probe.as_ref().is_some_and(|p| {
                now.duration_since(p.sent) >= Duration::from_millis(self.targets[i].cfg.timeout_ms)
            });
            if timed_out {
                self.result(i, false, "timeout".into());
            }
            if self.targets[i].probe.is_none() && now >= self.targets[i].next_at {
                let port = self.alloc_port();
                let t = &mut self.targets[i];
                // Not a security boundary (a probe lives for one round trip), just not constant.
                let clock = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.subsec_nanos());
                let isn = clock ^ u32::from(port).rotate_left(16) ^ 0x5eed_1234;
                let mut pkt = Vec::with_capacity(60);
                if reply::tcp_segment(
                    &mut pkt,
                    t.cfg.source,
                    t.cfg.addr,
                    port,
                    t.cfg.port,
                    isn,
                    0,
                    SYN,
                    &[],
                )
                .is_some()
                {
                    out.push(pkt);
                }
                t.probe = Some(Probe {
                    port,
                    isn,
                    sent: now,
                    stage: Stage::SynSent,
                    request_len: 0,
                });
                t.next_at = now + Duration::from_millis(t.cfg.interval_ms);
            }
        }
        out
    }

    fn alloc_port(&mut self) -> u16 {
        if !Self::is_probe_port(self.next_port) {
            self.next_port = PORT_FIRST;
        }
        let p = self.next_port;
        self.next_port = if p == PORT_LAST { PORT_FIRST } else { p + 1 };
        p
    }

    /// A TCP segment to one of our probe ports; returns the segment to answer with, if any.
    pub fn on_segment(&mut self, ip: &[u8], c: &Classified) -> Option<Vec<u8>> {
        let i = self.targets.iter().position(|t| {
            t.probe.as_ref().is_some_and(|p| p.port == c.key.dst_port)
                && t.cfg.addr == c.key.src
                && t.cfg.port == c.key.src_port
        })?;
        let tcp = ip.get(c.l4_offset..c.ip_len)?;
        if tcp.len() < 20 {
            return None;
        }
        let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
        let data_off = usize::from(tcp[12] >> 4) * 4;
        let payload = tcp.get(data_off..).unwrap_or(&[]);
        let flags = c.tcp_flags;
        let (src, dst) = (c.key.dst, c.key.src);
        let (sport, dport) = (c.key.dst_port, c.key.src_port);
        let t = &mut self.targets[i];
        let probe = t.probe.as_mut()?;
        if flags & RST != 0 {
            self.result(i, false, "connection refused".into());
            return None;
        }
        match probe.stage {
            Stage::SynSent if flags & (SYN | ACK) == SYN | ACK => {
                let our = probe.isn.wrapping_add(1);
                let their = seq.wrapping_add(1);
                if t.cfg.kind == HealthKind::Tcp {
                    let mut rst = Vec::new();
                    reply::tcp_segment(&mut rst, src, dst, sport, dport, our, 0, RST, &[]);
                    self.result(i, true, String::new());
                    return Some(rst);
                }
                let host = match t.cfg.addr {
                    IpAddr::V4(a) => a.to_string(),
                    IpAddr::V6(a) => format!("[{a}]"),
                };
                let req = format!(
                    "GET {} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: dva-health-check\r\nConnection: close\r\n\r\n",
                    t.cfg.path
                );
                probe.stage = Stage::RequestSent;
                probe.request_len = req.len() as u32;
                let mut pkt = Vec::new();
                reply::tcp_segment(
                    &mut pkt,
                    src,
                    dst,
                    sport,
                    dport,
                    our,
                    their,
                    PSH | ACK,
                    req.as_bytes(),
                );
                Some(pkt)
            }
            Stage::RequestSent if !payload.is_empty() => {
                let ok = payload.starts_with(b"HTTP/1.")
                    && payload.get(9).is_some_and(|d| *d == b'2' || *d == b'3');
                let status: String = String::from_utf8_lossy(payload.get(..12).unwrap_or(payload))
                    .chars()
                    .filter(|c| !c.is_control())
                    .collect();
                let our = probe.isn.wrapping_add(1).wrapping_add(probe.request_len);
                let mut rst = Vec::new();
                reply::tcp_segment(&mut rst, src, dst, sport, dport, our, 0, RST, &[]);
                self.result(i, ok, format!("HTTP status {status:?}"));
                Some(rst)
            }
            _ => None,
        }
    }

    fn result(&mut self, i: usize, ok: bool, why: String) {
        let t = &mut self.targets[i];
        t.probe = None;
        if ok {
            t.successes += 1;
            t.failures = 0;
            if !t.up && t.successes >= t.cfg.rise {
                t.up = true;
                t.last_error = None;
                self.changes.push(format!(
                    "backend {}/{} ({}:{}) is up",
                    t.cfg.service, t.cfg.backend, t.cfg.addr, t.cfg.port
                ));
            }
        } else {
            t.failures += 1;
            t.successes = 0;
            t.last_error = Some(why.clone());
            if t.up && t.failures >= t.cfg.fall {
                t.up = false;
                self.changes.push(format!(
                    "backend {}/{} ({}:{}) is down: {why}",
                    t.cfg.service, t.cfg.backend, t.cfg.addr, t.cfg.port
                ));
            }
        }
    }
}
