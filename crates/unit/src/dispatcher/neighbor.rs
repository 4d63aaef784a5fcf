//! Neighbour table of one appliance interface (ARP for IPv4, neighbour discovery for IPv6).
//!
//! Packets towards a next hop whose link-layer address is unknown wait in a short per-neighbour queue
//! while we probe; they are sent when the answer arrives and counted as dropped if none does.
//!
//! The table is bounded ([`MAX_ENTRIES`]: stale entries are collected first, then new
//! neighbours are refused, as Linux does past gc_thresh3), and an address confirmed less than
//! [`LOCK_TIME`] ago keeps its MAC against an unsolicited claim (ARP spoofing races a real
//! answer; Linux's `locktime` is the same idea, at 1 s).

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
/// Entries per interface (Linux: gc_thresh3 = 1024).
pub const MAX_ENTRIES: usize = 1024;
/// How long a confirmed address cannot be moved to another MAC.
pub const LOCK_TIME: Duration = Duration::from_secs(5);

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
    /// Claims refused: another MAC for a fresh entry.
    pub overrides_refused: u64,
    /// New neighbours refused: the table was full of live entries.
    pub table_full: u64,
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
        let locked = match self.entries.get(&ip) {
            Some(Entry::Reachable { mac: old, until }) => {
                *old != mac && *until > now + REACHABLE_TIME - LOCK_TIME
            }
            Some(Entry::Incomplete { .. }) => false,
            None => {
                if !self.make_room(now) {
                    return Vec::new();
                }
                false
            }
        };
        if locked {
            self.overrides_refused += 1;
            return Vec::new();
        }
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
            found => {
                if found.is_none() && !self.make_room(now) {
                    return (false, false);
                }
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

    /// Whether a new entry fits: if the table is full, forget expired entries first.
    fn make_room(&mut self, now: Instant) -> bool {
        if self.entries.len() < MAX_ENTRIES {
            return true;
        }
        self.entries
            .retain(|_, e| !matches!(e, Entry::Reachable { until, .. } if *until <= now));
        if self.entries.len() < MAX_ENTRIES {
            return true;
        }
        self.table_full += 1;
        false
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

    #[test]
    fn a_fresh_entry_keeps_its_mac() {
        let mut t = NeighborTable::default();
        let now = Instant::now();
        let ip: IpAddr = "198.18.1.2".parse().unwrap();
        let (real, spoof) = (
            EthernetAddress([2, 0, 0, 0, 0, 1]),
            EthernetAddress([2, 0, 0, 0, 0, 66]),
        );
        t.learn(ip, real, now);
        t.learn(ip, spoof, now + Duration::from_secs(1));
        assert_eq!(t.lookup(&ip, now), Some(real));
        assert_eq!(t.overrides_refused, 1);
        // The same MAC refreshes; once the entry is older than the lock, a move is taken.
        t.learn(ip, real, now + Duration::from_secs(2));
        t.learn(ip, spoof, now + Duration::from_secs(2) + LOCK_TIME);
        assert_eq!(t.lookup(&ip, now + LOCK_TIME * 2), Some(spoof));
    }

    #[test]
    fn the_table_is_bounded_and_collects_stale_entries() {
        let mut t = NeighborTable::default();
        let now = Instant::now();
        let mac = EthernetAddress([2, 0, 0, 0, 0, 1]);
        for k in 0..MAX_ENTRIES as u32 {
            t.learn(IpAddr::from((0x0a00_0000 + k).to_be_bytes()), mac, now);
        }
        let extra: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(t.enqueue(extra, vec![1], now), (false, false));
        t.learn(extra, mac, now);
        assert_eq!(t.lookup(&extra, now), None);
        assert_eq!(t.table_full, 2);
        // Once the others have expired, room is made.
        let later = now + REACHABLE_TIME;
        assert_eq!(t.enqueue(extra, vec![1], later), (true, true));
        assert_eq!(t.len(), 1);
    }
}
