//! Neighbour table of one appliance interface (ARP for IPv4, neighbour discovery for IPv6).
//!
//! Packets towards a next hop whose link-layer address is unknown wait in a short per-neighbour queue
//! while we probe; they are sent when the answer arrives and counted as dropped if none does.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use dva_wire::EthernetAddress;

/// How long a learned address is trusted before it must be learned again.
pub const REACHABLE_TIME: Duration = Duration::from_secs(300);
/// Probe interval and count before giving up on a neighbour (Linux: 1 s, 3 probes).
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
pub const MAX_PROBES: u32 = 3;
/// Packets held per unresolved neighbour (Linux's unres_qlen is in this range).
pub const QUEUE_LEN: usize = 64;

enum Entry {
    Reachable {
        mac: EthernetAddress,
        until: Instant,
    },
    Incomplete {
        last_probe: Instant,
        probes: u32,
        queue: Vec<Vec<u8>>,
    },
}

#[derive(Default)]
pub struct NeighborTable {
    entries: HashMap<IpAddr, Entry>,
}

/// What `tick` asks the caller to do.
#[derive(Default)]
pub struct TickResult {
    pub probe: Vec<IpAddr>,
    pub dropped: u64,
}

impl NeighborTable {
    #[inline]
    pub fn lookup(&self, ip: &IpAddr, now: Instant) -> Option<EthernetAddress> {
        match self.entries.get(ip) {
            Some(Entry::Reachable { mac, until }) if *until > now => Some(*mac),
            _ => None,
        }
    }

    /// Record an address seen in an ARP/ND message; returns the frames that waited for it (their
    /// destination MAC still to be filled in by the caller).
    pub fn learn(&mut self, ip: IpAddr, mac: EthernetAddress, now: Instant) -> Vec<Vec<u8>> {
        let old = self.entries.insert(
            ip,
            Entry::Reachable {
                mac,
                until: now + REACHABLE_TIME,
            },
        );
        match old {
            Some(Entry::Incomplete { queue, .. }) => queue,
            _ => Vec::new(),
        }
    }

    /// Hold `frame` until `ip` resolves. Returns (queued, probe_now).
    pub fn enqueue(&mut self, ip: IpAddr, frame: Vec<u8>, now: Instant) -> (bool, bool) {
        match self.entries.get_mut(&ip) {
            Some(Entry::Incomplete { queue, .. }) => {
                if queue.len() >= QUEUE_LEN {
                    return (false, false);
                }
                queue.push(frame);
                (true, false)
            }
            _ => {
                self.entries.insert(
                    ip,
                    Entry::Incomplete {
                        last_probe: now,
                        probes: 1,
                        queue: vec![frame],
                    },
                );
                (true, true)
            }
        }
    }

    /// Periodic work: re-probe unresolved neighbours, give up on silent ones, forget stale entries.
    pub fn tick(&mut self, now: Instant) -> TickResult {
        let mut r = TickResult::default();
        self.entries.retain(|ip, e| match e {
            Entry::Reachable { until, .. } => *until > now,
            Entry::Incomplete {
                last_probe,
                probes,
                queue,
            } => {
                if now.duration_since(*last_probe) < PROBE_INTERVAL {
                    return true;
                }
                if *probes >= MAX_PROBES {
                    r.dropped += queue.len() as u64;
                    return false;
                }
                *probes += 1;
                *last_probe = now;
                r.probe.push(*ip);
                true
            }
        });
        r
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queues_until_learned_then_releases() {
        let mut t = NeighborTable::default();
        let now = Instant::now();
        let ip: IpAddr = "198.18.1.2".parse().unwrap();
        assert_eq!(t.enqueue(ip, vec![1], now), (true, true));
        assert_eq!(t.enqueue(ip, vec![2], now), (true, false));
        assert!(t.lookup(&ip, now).is_none());
        let mac = EthernetAddress([2, 0, 0, 0, 0, 1]);
        assert_eq!(t.learn(ip, mac, now), vec![vec![1], vec![2]]);
        assert_eq!(t.lookup(&ip, now), Some(mac));
        assert!(t
            .lookup(&ip, now + REACHABLE_TIME + Duration::from_secs(1))
            .is_none());
    }

    #[test]
    fn gives_up_after_probes() {
        let mut t = NeighborTable::default();
        let now = Instant::now();
        let ip: IpAddr = "198.18.1.9".parse().unwrap();
        t.enqueue(ip, vec![1], now);
        let mut probes = 0;
        let mut dropped = 0;
        for s in 1..=5 {
            let r = t.tick(now + Duration::from_secs(s));
            probes += r.probe.len();
            dropped += r.dropped;
        }
        assert_eq!(probes as u32, MAX_PROBES - 1);
        assert_eq!(dropped, 1);
        assert!(t.is_empty());
    }
}
