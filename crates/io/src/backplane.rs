//! The backplane endpoint of a unit: GENEVE datagrams over UDP between machines, and over
//! shared-memory rings ([`crate::shm`]) to peers on the same machine, chosen per peer.
//!
//! Same interface as [`UdpEndpoint`] (`recv_batch`, `tx_slot` + `commit_slot`, `flush`), so the
//! roles do not care which way a datagram goes:
//! - A unit that *consumes* rings ([`Backplane::accept_rings_from`]) creates one ring per peer
//!   it expects datagrams from, in the ring directory (the appliance's run directory, on tmpfs),
//!   and a doorbell socket there. `recv_batch` drains its rings first, then the UDP socket.
//! - A unit that *produces* (`produce` in [`Backplane::enable_rings`]) looks for the ring a
//!   destination made for it when it first sends there (and again now and then); found,
//!   datagrams go into it (a large one over several slots). A full ring makes the producer wait
//!   up to [`RING_WAIT`] for its consumer before a datagram detours over UDP.
//!   [`Backplane::send_with`] builds a datagram in place, where it goes: in the ring (written
//!   once), else in the UDP batch buffer; TCP GSO super-packets (up to 64 KiB and a GENEVE
//!   header) only rings carry whole, and the caller segments what it refuses. `commit_slot`
//!   copies a datagram built in the UDP batch buffer into the ring instead (control messages,
//!   built as for UDP).
//! - A ring is between one producer and one consumer: the file name carries both addresses.
//!
//! - Over UDP every datagram is sealed ([`crate::seal`]: authenticated, its inner packet
//!   encrypted) once the unit has its keys ([`Backplane::set_auth`]): `commit_slot`, `send_to`
//!   and `send_with` seal what goes out, `recv_batch` opens what comes in and delivers only
//!   what verified, decrypted, with the unit that sent it ([`Origin`]). A ring names its producer itself (the consumer made it for that peer, in
//!   a directory only the appliance's user can enter).
//!
//! - A capture session ([`Backplane::set_tap`], [`crate::capture`]) sees every datagram sent and
//!   received, as on the wire (sealed over UDP), filtered on the packet it carries.
//!
//! Only the roles decide which peers use rings. The data planes' handover protocol relies on
//! punts and markers between two data planes taking one path in order, so data planes keep UDP
//! between themselves; dispatchers and data planes exchange packets over rings.

use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::capture::Tap;
use crate::seal::{self, AuthStats, EpochKey, Sealer};
use crate::shm::{self, Consumer, Doorbell, Producer};
use crate::udp::UdpEndpoint;
use crate::IoError;

/// Counters of the ring side (the UDP side has [`crate::udp::UdpStats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RingStats {
    pub rx: u64,
    pub tx: u64,
    /// Datagrams that went over UDP although the peer has a ring: full, or too large for it.
    pub tx_fallback: u64,
    pub doorbells: u64,
    /// Times a full ring made us wait for its consumer (see `RING_WAIT`).
    pub ring_waits: u64,
}

/// Who a received datagram is from: the address it came from (to answer to) and the unit that
/// authenticated it (over UDP: the sealed sender; through a ring: the peer the ring was made
/// for). `unit` is 0 on a backplane without authentication (tests of this crate only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    pub addr: SocketAddr,
    pub unit: u32,
}

enum Outbound {
    Ring {
        producer: Producer,
        bell: PathBuf,
        dirty: bool,
    },
    /// No ring (yet) for this destination; look again after `retry`.
    Udp { retry: Instant },
}

struct Rings {
    dir: PathBuf,
    /// Our identity in ring names (the listen address peers know us by).
    me: String,
    inbound: Vec<(Origin, Consumer)>,
    bell: Option<Doorbell>,
    produce: bool,
    /// Per destination. A few peers at most (the appliance's dispatchers or data planes), looked
    /// up once a packet: a linear scan beats hashing the address.
    outbound: Vec<(SocketAddr, Outbound)>,
    ringer: Option<UnixDatagram>,
    stats: RingStats,
    /// The time as of the last flush: per-packet decisions (is a ring still current, is it
    /// time to look for one again) need no fresher clock, and reading it per packet costs.
    clock: Instant,
}

impl Rings {
    /// The ring to `dst` if it has made one for us (and we produce into rings): looked for on
    /// the first datagram to `dst` and again every [`shm::RECHECK`] while missing; mapped anew
    /// when the consumer replaced it. Returns the producer and its `dirty` flag (set it after
    /// pushing, so that `flush` publishes).
    fn ring_to(&mut self, dst: SocketAddr) -> Option<(&mut Producer, &mut bool, &Path)> {
        if !self.produce {
            return None;
        }
        let now = self.clock;
        let i = match self.outbound.iter().position(|(d, _)| *d == dst) {
            Some(i) => i,
            None => {
                self.outbound.push((dst, Outbound::Udp { retry: now }));
                self.outbound.len() - 1
            }
        };
        let out = &mut self.outbound[i].1;
        if let Outbound::Ring { producer, .. } = out {
            if !producer.is_current(now) {
                *out = Outbound::Udp { retry: now };
            }
        }
        if let Outbound::Udp { retry } = out {
            if now >= *retry {
                let path = self.dir.join(shm::ring_name(&dst.to_string(), &self.me));
                *out = match Producer::open(&path) {
                    Ok(producer) => Outbound::Ring {
                        producer,
                        bell: self.dir.join(shm::bell_name(&dst.to_string())),
                        dirty: false,
                    },
                    Err(_) => Outbound::Udp {
                        retry: now + shm::RECHECK,
                    },
                };
            }
        }
        match out {
            Outbound::Ring {
                producer,
                dirty,
                bell,
            } => Some((producer, dirty, bell.as_path())),
            Outbound::Udp { .. } => None,
        }
    }

    /// Push a record of `len` bytes that `fill` builds into `dst`'s ring. `None`: no ring to
    /// `dst`; `Some(false)`: refused (too large, or still full after [`RING_WAIT`]).
    ///
    /// A full ring is a consumer that is behind, not one that is gone: we publish what we
    /// have (waking it if it sleeps) and give it up to `RING_WAIT` to make room. That is
    /// backpressure, as a kernel queue would apply; the alternative, a detour over UDP,
    /// reorders the flow behind the ring's backlog, and a TCP sender takes reordering of
    /// super-packets for loss.
    fn push_or_wait(
        &mut self,
        dst: SocketAddr,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8]),
    ) -> Option<bool> {
        let mut deadline = None;
        loop {
            let (producer, dirty, _) = self.ring_to(dst)?;
            if producer.push_with(len, &mut *fill) {
                *dirty = true;
                self.stats.tx += 1;
                return Some(true);
            }
            if len > producer.max_len() {
                return Some(false);
            }
            let now = Instant::now();
            let until = *deadline.get_or_insert_with(|| {
                self.stats.ring_waits += 1;
                now + RING_WAIT
            });
            if now >= until {
                return Some(false);
            }
            let (producer, dirty, bell) = self.ring_to(dst)?;
            *dirty = false;
            if producer.publish() {
                let bell = bell.to_path_buf();
                if let Some(s) = &self.ringer {
                    shm::ring(s, &bell);
                    self.stats.doorbells += 1;
                }
            }
            std::thread::yield_now();
        }
    }
}

/// What a role's core sends through: the transmit side of a backplane endpoint, the boundary
/// between the sans-IO cores (which build datagrams) and the endpoint that seals and carries
/// them (UDP or a ring). [`Backplane`] is the real one; tests and benchmarks hand a core one
/// that keeps what it is given. Datagrams are built in place: `send_with` builds one where it
/// goes (straight in the destination's ring, else in the UDP batch); `tx_slot` lends a UDP
/// batch buffer and `commit_slot` sends its first `len` bytes (copied into a ring if the
/// destination has one); nothing here blocks beyond a ring's bounded wait.
pub trait BackplaneTx {
    /// A buffer to build the next datagram in (its length is the most it may carry); `None`
    /// when the send batch is full (the caller counts a drop).
    fn tx_slot(&mut self) -> Option<&mut [u8]>;

    /// Send the first `len` bytes of the buffer [`BackplaneTx::tx_slot`] lent last to `dst`.
    fn commit_slot(&mut self, len: usize, dst: SocketAddr);

    /// Send a datagram of `len` bytes that `fill` builds in place, where it goes: in `dst`'s
    /// ring (no copy after it; a TCP super-packet fits only there), else in the UDP batch.
    /// False, without calling `fill`, when no path takes it whole (the batch is full, or it is
    /// larger than a UDP datagram and no ring takes it): the caller segments or drops it.
    fn send_with(&mut self, len: usize, dst: SocketAddr, fill: impl FnOnce(&mut [u8])) -> bool;

    /// Datagrams the endpoint failed to send (for the unit's counters).
    fn tx_dropped(&self) -> u64 {
        0
    }

    /// Counters of the ring side (all zero without rings).
    fn ring_stats(&self) -> RingStats {
        RingStats::default()
    }
}

impl BackplaneTx for Backplane {
    #[inline]
    fn tx_slot(&mut self) -> Option<&mut [u8]> {
        Backplane::tx_slot(self)
    }
    #[inline]
    fn commit_slot(&mut self, len: usize, dst: SocketAddr) {
        Backplane::commit_slot(self, len, dst)
    }
    #[inline]
    fn send_with(&mut self, len: usize, dst: SocketAddr, fill: impl FnOnce(&mut [u8])) -> bool {
        Backplane::send_with(self, len, dst, fill)
    }
    fn tx_dropped(&self) -> u64 {
        Backplane::tx_dropped(self)
    }
    fn ring_stats(&self) -> RingStats {
        Backplane::ring_stats(self)
    }
}

/// How long a producer waits for a full ring's consumer to make room (see
/// `Rings::push_or_wait`).
pub const RING_WAIT: std::time::Duration = std::time::Duration::from_micros(500);

pub struct Backplane {
    udp: UdpEndpoint,
    rings: Option<Rings>,
    /// Authentication of the UDP side; `None` only before the unit has its keys (then
    /// nothing is sent or accepted over UDP) or in this crate's tests.
    seal: Option<Sealer>,
    /// Refuse unauthenticated UDP (set with the first keys, never cleared).
    require_auth: bool,
    /// A capture session, if one runs: one `Option` check per datagram when none does.
    tap: Option<Tap>,
}

impl std::fmt::Debug for Backplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backplane")
            .field("udp", &self.udp)
            .field("rings", &self.rings.as_ref().map(|r| r.dir.clone()))
            .finish()
    }
}

impl Backplane {
    pub fn bind(addr: SocketAddr) -> Result<Backplane, IoError> {
        Ok(Backplane {
            udp: UdpEndpoint::bind(addr)?,
            rings: None,
            seal: None,
            require_auth: false,
            tap: None,
        })
    }

    /// Authenticate every UDP datagram from now on as unit `me`: seal with the key of
    /// `send_epoch`, accept datagrams sealed under any of `keys`. Called again for each key
    /// rotation (replay windows are kept).
    /// All or nothing: refused (bad keys, no randomness), the running authentication stays.
    pub fn set_auth(&mut self, me: u32, send_epoch: u32, keys: &[EpochKey]) -> Result<(), String> {
        match self.seal.as_mut() {
            // `set_keys` changes nothing when it refuses.
            Some(s) if s.me() == me => s.set_keys(send_epoch, keys)?,
            _ => {
                let mut s =
                    Sealer::new(me).map_err(|e| format!("backplane authentication: {e}"))?;
                s.set_keys(send_epoch, keys)?;
                self.seal = Some(s);
            }
        }
        self.require_auth = true;
        Ok(())
    }

    /// Start a capture session (ending the one running, if any), or end it with `None`.
    pub fn set_tap(&mut self, tap: Option<Tap>) {
        self.tap = tap;
    }

    /// Counters of the authentication (all zero without it).
    pub fn auth_stats(&self) -> AuthStats {
        self.seal.as_ref().map(|s| s.stats()).unwrap_or_default()
    }

    /// Queue the datagram built in the current UDP slot: sealed first where authentication is
    /// on (a datagram that cannot be sealed is not sent, and counted as a send drop).
    fn udp_commit(&mut self, len: usize, dst: SocketAddr) {
        // The filter reads the inner packet before sealing encrypts it.
        let tapped = self.tap.as_ref().is_some_and(|t| {
            self.udp
                .uncommitted(len)
                .is_some_and(|d| t.filter().matches_geneve(d))
        });
        let len = match self.seal.as_mut() {
            Some(s) => match self.udp.uncommitted_mut().and_then(|b| s.seal(b, len, dst)) {
                Some(n) => n,
                None => return self.udp.commit_slot(usize::MAX, dst),
            },
            None if self.require_auth => return self.udp.commit_slot(usize::MAX, dst),
            None => len,
        };
        if tapped {
            let src = self.udp.local_addr();
            if let (Some(t), Some(d)) = (self.tap.as_mut(), self.udp.uncommitted(len)) {
                if !t.record_datagram(src, dst, d) {
                    self.tap = None;
                }
            }
        }
        self.udp.commit_slot(len, dst);
    }

    /// Room the UDP path leaves for a datagram (a slot less the trailer).
    fn udp_max(&self) -> usize {
        if self.seal.is_some() || self.require_auth {
            crate::udp::MAX_DATAGRAM - seal::TRAILER_LEN
        } else {
            crate::udp::MAX_DATAGRAM
        }
    }

    /// Use rings in `dir`, where we are known as `me` (our listen address). Creates the
    /// doorbell if this endpoint will consume rings.
    pub fn enable_rings(
        &mut self,
        dir: &Path,
        me: SocketAddr,
        consume: bool,
        produce: bool,
    ) -> io::Result<()> {
        let me = me.to_string();
        let bell = if consume {
            Some(Doorbell::bind(&dir.join(shm::bell_name(&me)))?)
        } else {
            None
        };
        self.rings = Some(Rings {
            dir: dir.to_path_buf(),
            me,
            inbound: Vec::new(),
            bell,
            produce,
            outbound: Vec::new(),
            ringer: if produce {
                Some(UnixDatagram::unbound()?)
            } else {
                None
            },
            stats: RingStats::default(),
            clock: Instant::now(),
        });
        Ok(())
    }

    /// Have a ring for each of `peers` (and none for others): the peers that may send to us
    /// through shared memory, which are also the peers we send to. Existing rings of peers
    /// that stay are kept, with their contents.
    pub fn accept_rings_from(&mut self, peers: &[(u32, SocketAddr)]) -> io::Result<()> {
        let Some(r) = self.rings.as_mut() else {
            return Ok(());
        };
        if r.bell.is_none() {
            return Ok(());
        }
        // Every ring a new peer needs is made before anything changes: a failure (tmpfs full)
        // leaves the rings as they were, and the caller refuses the config that asked.
        let mut made = Vec::new();
        for &(unit, addr) in peers {
            let kept = r
                .inbound
                .iter()
                .any(|(o, _)| o.addr == addr && o.unit == unit);
            if kept
                || made
                    .iter()
                    .any(|(o, _): &(Origin, Consumer)| o.addr == addr)
            {
                continue;
            }
            let path = r.dir.join(shm::ring_name(&r.me, &addr.to_string()));
            let c = Consumer::create(&path, shm::DEFAULT_SLOTS, shm::DEFAULT_SLOT_SIZE)?;
            made.push((Origin { addr, unit }, c));
        }
        r.inbound
            .retain(|(o, _)| peers.iter().any(|(u, a)| *u == o.unit && *a == o.addr));
        // Rings we fed to peers that left: a dead consumer cannot remove the ring it made, so
        // its last producer does (files on tmpfs are memory).
        let me = r.me.clone();
        let dir = r.dir.clone();
        r.outbound.retain(|(dst, o)| {
            let keep = peers.iter().any(|(_, a)| a == dst);
            if !keep && matches!(o, Outbound::Ring { .. }) {
                let _ = std::fs::remove_file(dir.join(shm::ring_name(&dst.to_string(), &me)));
            }
            keep
        });
        r.inbound.extend(made);
        Ok(())
    }

    /// Receive up to `max` datagrams: the rings' first, then the socket's. Returns how many
    /// were taken off the rings and the socket, including UDP datagrams that failed
    /// authentication (counted in [`Backplane::auth_stats`], never delivered to `f`).
    pub fn recv_batch<F: FnMut(&[u8], Origin)>(
        &mut self,
        max: usize,
        mut f: F,
    ) -> io::Result<usize> {
        let n = self.recv_inner(max, |d, o, _| f(d, o));
        self.release_rings();
        n
    }

    /// As [`Backplane::recv_batch`], each datagram lent mutably with whether it sits in a ring
    /// (`true`): such a datagram stays valid and unchanged until [`Backplane::release_rings`],
    /// so it may be referenced after `f` returns (sent from where it lies). A UDP datagram
    /// (`false`) is only valid during `f`.
    pub fn recv_batch_held<F: FnMut(&mut [u8], Origin, bool)>(
        &mut self,
        max: usize,
        f: F,
    ) -> io::Result<usize> {
        self.recv_inner(max, f)
    }

    /// Give the rings' datagrams delivered so far back to their producers.
    pub fn release_rings(&mut self) {
        if let Some(r) = self.rings.as_mut() {
            for (_, c) in &mut r.inbound {
                c.release();
            }
        }
    }

    fn recv_inner<F: FnMut(&mut [u8], Origin, bool)>(
        &mut self,
        max: usize,
        mut f: F,
    ) -> io::Result<usize> {
        let mut n = 0;
        let local = self.udp.local_addr();
        let tap = &mut self.tap;
        if let Some(r) = self.rings.as_mut() {
            for (from, c) in &mut r.inbound {
                if n >= max {
                    break;
                }
                let from = *from;
                n += c.pop_batch_held(max - n, |d| {
                    if let Some(t) = tap.as_mut() {
                        // Rings carry datagrams in clear: what the filter reads is the wire.
                        if !t.datagram(from.addr, local, d, d) {
                            *tap = None;
                        }
                    }
                    f(d, from, true)
                });
            }
            r.stats.rx += n as u64;
        }
        if n < max {
            let require = self.require_auth;
            let seal = &mut self.seal;
            n += self.udp.recv_batch_mut(max - n, |d, addr| {
                // Opening decrypts in place: a capture keeps the sealed bytes first.
                if let Some(t) = tap.as_mut() {
                    t.stash(d);
                }
                let opened = match seal.as_mut() {
                    Some(s) => s.open(d, local).ok(),
                    None if require => None,
                    None => Some((d.len(), 0)),
                };
                if let Some(t) = tap.as_mut() {
                    if !t.stashed(addr, local, opened.map(|(len, _)| &d[..len])) {
                        *tap = None;
                    }
                }
                if let Some((len, unit)) = opened {
                    f(&mut d[..len], Origin { addr, unit }, false);
                }
            })?;
        }
        Ok(n)
    }

    /// A buffer to build the next datagram in; see [`UdpEndpoint::tx_slot`].
    #[inline]
    pub fn tx_slot(&mut self) -> Option<&mut [u8]> {
        // Leave room for the trailer the UDP path appends (rings take the same datagram).
        let max = self.udp_max();
        self.udp.tx_slot().map(|s| &mut s[..max])
    }

    /// Send the first `len` bytes of the last slot to `dst`: into `dst`'s ring if it has one
    /// for us and the datagram fits, else over UDP.
    pub fn commit_slot(&mut self, len: usize, dst: SocketAddr) {
        if let Some(r) = self.rings.as_mut() {
            if let Some(data) = self.udp.uncommitted(len) {
                match r.push_or_wait(dst, len, &mut |b| b.copy_from_slice(data)) {
                    Some(true) => {
                        if let Some(t) = self.tap.as_mut() {
                            if !t.datagram(self.udp.local_addr(), dst, data, data) {
                                self.tap = None;
                            }
                        }
                        return;
                    }
                    Some(false) => r.stats.tx_fallback += 1,
                    None => {}
                }
            }
        }
        self.udp_commit(len, dst);
    }

    /// Send a datagram of `len` bytes that `fill` builds in place (it gets exactly `len`
    /// bytes): directly in `dst`'s ring if it has one for us with room (the datagram is then
    /// written once: what [`Backplane::commit_slot`] copies); else, if it fits
    /// [`crate::udp::MAX_DATAGRAM`], in the UDP batch buffer and sent over UDP. False, without
    /// calling `fill`: it fits neither (a TCP super-packet and no ring), and the caller
    /// segments the packet itself (or drops it: the batch is full).
    pub fn send_with(&mut self, len: usize, dst: SocketAddr, fill: impl FnOnce(&mut [u8])) -> bool {
        // `push_with` consumes its closure even when it refuses; keep `fill` for the UDP way.
        let mut fill = Some(fill);
        let mut fallback = false;
        let local = self.udp.local_addr();
        if let Some(r) = self.rings.as_mut() {
            let tap = &mut self.tap;
            let mut once = |b: &mut [u8]| {
                if let Some(fill) = fill.take() {
                    fill(b);
                    if let Some(t) = tap.as_mut() {
                        if !t.datagram(local, dst, b, b) {
                            *tap = None;
                        }
                    }
                }
            };
            match r.push_or_wait(dst, len, &mut once) {
                Some(true) => return true,
                Some(false) => fallback = true,
                None => {}
            }
        }
        if len > self.udp_max() {
            return false;
        }
        let (Some(fill), Some(slot)) = (fill, self.udp.tx_slot()) else {
            return false;
        };
        fill(&mut slot[..len]);
        self.udp_commit(len, dst);
        if fallback {
            if let Some(r) = self.rings.as_mut() {
                r.stats.tx_fallback += 1;
            }
        }
        true
    }

    /// Publish what went into rings (ringing the doorbell of a consumer that sleeps), then
    /// send the UDP batch.
    pub fn flush(&mut self) -> io::Result<()> {
        if let Some(r) = self.rings.as_mut() {
            r.clock = Instant::now();
            for (_, out) in r.outbound.iter_mut() {
                if let Outbound::Ring {
                    producer,
                    bell,
                    dirty,
                } = out
                {
                    if std::mem::take(dirty) && producer.publish() {
                        if let Some(s) = &r.ringer {
                            shm::ring(s, bell);
                            r.stats.doorbells += 1;
                        }
                    }
                }
            }
        }
        self.udp.flush()
    }

    /// Queue a copy of `buf` for `dst` (over UDP: control messages).
    pub fn send_to(&mut self, buf: &[u8], dst: SocketAddr) -> io::Result<()> {
        if buf.len() > self.udp_max() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("datagram of {} bytes to {dst}: too long", buf.len()),
            ));
        }
        let Some(slot) = self.udp.tx_slot() else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        slot[..buf.len()].copy_from_slice(buf);
        self.udp_commit(buf.len(), dst);
        Ok(())
    }

    /// Descriptors to poll for receive: the socket and, with rings, the doorbell.
    pub fn poll_fds(&self) -> Vec<RawFd> {
        let mut v = vec![self.udp.as_raw_fd()];
        if let Some(b) = self.rings.as_ref().and_then(|r| r.bell.as_ref()) {
            v.push(b.as_raw_fd());
        }
        v
    }

    /// About to sleep in poll(2): ask producers to ring. False if a ring holds datagrams
    /// (then do not sleep).
    pub fn prepare_sleep(&mut self) -> bool {
        let Some(r) = self.rings.as_ref() else {
            return true;
        };
        let mut ok = true;
        for (_, c) in &r.inbound {
            if !c.prepare_sleep() {
                ok = false;
            }
        }
        if !ok {
            self.awake();
        }
        ok
    }

    /// Back from poll(2).
    pub fn awake(&mut self) {
        if let Some(r) = self.rings.as_ref() {
            for (_, c) in &r.inbound {
                c.awake();
            }
            if let Some(b) = &r.bell {
                b.drain();
            }
        }
    }

    pub fn as_raw_fd(&self) -> RawFd {
        self.udp.as_raw_fd()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.udp.local_addr()
    }

    pub fn tx_dropped(&self) -> u64 {
        self.udp.tx_dropped()
    }

    pub fn ring_stats(&self) -> RingStats {
        self.rings.as_ref().map(|r| r.stats).unwrap_or_default()
    }

    /// Peers whose datagrams we currently send through a ring.
    pub fn ring_peers(&self) -> usize {
        self.rings.as_ref().map_or(0, |r| {
            r.outbound
                .iter()
                .filter(|(_, o)| matches!(o, Outbound::Ring { .. }))
                .count()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("dva-bp-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("temp dir");
        d
    }

    fn send(bp: &mut Backplane, data: &[u8], dst: SocketAddr) {
        let slot = bp.tx_slot().expect("slot");
        slot[..data.len()].copy_from_slice(data);
        bp.commit_slot(data.len(), dst);
    }

    /// Everything `bp` receives within a second, with the sources.
    fn drain(bp: &mut Backplane, want: usize) -> Vec<(Vec<u8>, SocketAddr)> {
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(1);
        while got.len() < want && Instant::now() < deadline {
            bp.recv_batch(64, |d, src| got.push((d.to_vec(), src.addr)))
                .expect("recv");
        }
        got
    }

    #[test]
    fn peers_with_a_ring_get_it_the_rest_get_udp() {
        let d = dir("choose");
        let mut a = Backplane::bind("127.0.0.1:0".parse().unwrap()).expect("bind a");
        let mut b = Backplane::bind("127.0.0.1:0".parse().unwrap()).expect("bind b");
        let (a_addr, b_addr) = (a.local_addr(), b.local_addr());
        a.enable_rings(&d, a_addr, false, true).expect("rings a");
        b.enable_rings(&d, b_addr, true, false).expect("rings b");

        // b has no ring for a yet: UDP.
        send(&mut a, b"one", b_addr);
        a.flush().expect("flush");
        assert_eq!(drain(&mut b, 1), vec![(b"one".to_vec(), a_addr)]);
        assert_eq!(a.ring_stats().tx, 0);

        // b makes one; a finds it once its negative answer is older than RECHECK.
        b.accept_rings_from(&[(1, a_addr)]).expect("accept");
        std::thread::sleep(shm::RECHECK);
        a.flush().expect("flush"); // the clock a decides by moves on at each flush
        send(&mut a, b"two", b_addr);
        send(&mut a, &vec![7u8; 3000], b_addr); // larger than a slot: two of them
        a.flush().expect("flush");
        let got: Vec<(usize, SocketAddr)> = drain(&mut b, 2)
            .iter()
            .map(|(d, s)| (d.len(), *s))
            .collect();
        assert_eq!(got, vec![(3, a_addr), (3000, a_addr)]);
        assert_eq!(a.ring_stats().tx, 2);
        assert_eq!(a.ring_stats().tx_fallback, 0);
        assert_eq!(b.ring_stats().rx, 2);
        assert_eq!(a.ring_peers(), 1);

        // A sleeping b is woken through its doorbell.
        assert!(b.prepare_sleep());
        send(&mut a, b"three", b_addr);
        a.flush().expect("flush");
        let mut poller = crate::poll::Poller::new(&b.poll_fds());
        let ready = poller.wait(1000).expect("poll").to_vec();
        assert!(ready.iter().any(|r| *r), "the doorbell woke b: {ready:?}");
        b.awake();
        assert_eq!(drain(&mut b, 1), vec![(b"three".to_vec(), a_addr)]);
        assert_eq!(a.ring_stats().doorbells, 1);

        // b forgets a (a left its config): the ring goes, a falls back to UDP after RECHECK.
        b.accept_rings_from(&[]).expect("forget");
        std::thread::sleep(shm::RECHECK);
        a.flush().expect("flush");
        send(&mut a, b"four", b_addr);
        a.flush().expect("flush");
        assert_eq!(drain(&mut b, 1), vec![(b"four".to_vec(), a_addr)]);
        assert_eq!(a.ring_stats().tx, 3, "four went by UDP");
        let _ = std::fs::remove_dir_all(&d);
    }

    /// Datagrams `send_with` built: the length, then bytes from `seed` on.
    fn large(seed: u8) -> impl FnOnce(&mut [u8]) {
        move |b: &mut [u8]| {
            for (i, x) in b.iter_mut().enumerate() {
                *x = seed.wrapping_add(i as u8);
            }
        }
    }

    fn is_large(d: &[u8], seed: u8) -> bool {
        d.iter()
            .enumerate()
            .all(|(i, x)| *x == seed.wrapping_add(i as u8))
    }

    #[test]
    fn large_datagrams_go_whole_through_rings_and_udp_takes_what_fits() {
        let d = dir("large");
        let mut a = Backplane::bind("127.0.0.1:0".parse().unwrap()).expect("bind a");
        let mut b = Backplane::bind("127.0.0.1:0".parse().unwrap()).expect("bind b");
        let mut c = Backplane::bind("127.0.0.1:0".parse().unwrap()).expect("bind c");
        let (a_addr, b_addr, c_addr) = (a.local_addr(), b.local_addr(), c.local_addr());
        a.enable_rings(&d, a_addr, false, true).expect("rings a");
        b.enable_rings(&d, b_addr, true, false).expect("rings b");
        b.accept_rings_from(&[(1, a_addr)]).expect("accept");

        // b has a ring for a: a GSO-sized datagram goes whole, built in the ring.
        assert!(a.send_with(60_000, b_addr, large(1)));
        a.flush().expect("flush");
        let got = drain(&mut b, 1);
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].0.len(), got[0].1), (60_000, a_addr));
        assert!(is_large(&got[0].0, 1));
        assert_eq!(a.ring_stats().tx, 1);
        assert_eq!(b.ring_stats().rx, 1);

        // c has none: too large for UDP is refused without building it; what fits goes.
        assert!(!a.send_with(60_000, c_addr, |_| panic!("built a refused datagram")));
        assert!(a.send_with(5_000, c_addr, large(2)));
        a.flush().expect("flush");
        let got = drain(&mut c, 1);
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].0.len(), got[0].1), (5_000, a_addr));
        assert!(is_large(&got[0].0, 2));
        assert_eq!(a.ring_stats().tx, 1);
        assert_eq!(a.ring_stats().tx_fallback, 0, "c never had a ring");

        // b's ring full (b does not read): large datagrams are refused, one that fits UDP
        // falls back to it.
        // 30 slots each: 34 fit (the first took slots 0 to 29, so the last one goes to slot 0
        // after 4 slots of padding), then the ring is full.
        let per_ring = shm::DEFAULT_SLOTS as usize
            / (60_000usize + 4).div_ceil(shm::DEFAULT_SLOT_SIZE as usize);
        let mut queued = 0;
        while a.send_with(60_000, b_addr, large(3)) {
            queued += 1;
            assert!(queued <= per_ring, "more than the ring holds");
        }
        assert_eq!(queued, per_ring);
        assert!(a.send_with(9_000, b_addr, large(4)));
        assert_eq!(a.ring_stats().tx_fallback, 1);
        a.flush().expect("flush");
        let got = drain(&mut b, per_ring + 1);
        assert_eq!(got.len(), per_ring + 1);
        let (big, small): (Vec<_>, Vec<_>) = got.iter().partition(|(d, _)| d.len() == 60_000);
        assert_eq!(big.len(), per_ring);
        assert!(big.iter().all(|(d, _)| is_large(d, 3)));
        assert_eq!(small.len(), 1);
        assert_eq!(small[0].0.len(), 9_000);
        assert!(is_large(&small[0].0, 4));
        assert_eq!(a.ring_stats().tx, 1 + per_ring as u64);

        // A frame-sized one is built in the ring too (not in the UDP batch, then copied).
        assert!(a.send_with(1_500, b_addr, large(5)));
        a.flush().expect("flush");
        let got = drain(&mut b, 1);
        assert_eq!(got.len(), 1);
        assert!(got[0].0.len() == 1_500 && is_large(&got[0].0, 5));
        assert_eq!(a.ring_stats().tx, 2 + per_ring as u64);
        assert_eq!(
            a.ring_stats().tx_fallback,
            1,
            "only the one of the full ring"
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    fn keys() -> Vec<EpochKey> {
        vec![EpochKey {
            epoch: 5,
            key: [0x42; seal::KEY_LEN],
        }]
    }

    /// A GENEVE datagram (16 bytes of options, like dva's) carrying IPv4/TCP to `dport`.
    fn geneve_tcp(dport: u16) -> Vec<u8> {
        let mut d = vec![0u8; 24 + 20 + 20];
        d[0] = 4;
        d[2..4].copy_from_slice(&0x0800u16.to_be_bytes());
        d[24] = 0x45;
        d[24 + 9] = 6;
        d[44..46].copy_from_slice(&40000u16.to_be_bytes());
        d[46..48].copy_from_slice(&dport.to_be_bytes());
        d
    }

    fn tap(port: u16) -> (Tap, std::sync::mpsc::Receiver<crate::capture::Captured>) {
        let (tx, rx) = std::sync::mpsc::sync_channel(16);
        let filter = crate::capture::CaptureFilter {
            port: Some(port),
            ..Default::default()
        };
        let until = Instant::now() + Duration::from_secs(60);
        let dropped = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        (Tap::new(filter, 2048, 100, until, tx, dropped), rx)
    }

    #[test]
    fn captures_see_sealed_datagrams_as_on_the_wire_filtered_on_what_they_carry() {
        let mut a = Backplane::bind("127.0.0.1:0".parse().unwrap()).expect("bind a");
        let mut b = Backplane::bind("127.0.0.1:0".parse().unwrap()).expect("bind b");
        a.set_auth(3, 5, &keys()).expect("auth a");
        b.set_auth(4, 5, &keys()).expect("auth b");
        let (tap_a, sent) = tap(80);
        let (tap_b, received) = tap(80);
        a.set_tap(Some(tap_a));
        b.set_tap(Some(tap_b));
        let (web, other) = (geneve_tcp(80), geneve_tcp(81));
        send(&mut a, &web, b.local_addr());
        send(&mut a, &other, b.local_addr());
        a.flush().expect("flush");
        let got = drain(&mut b, 2);
        assert_eq!(got.len(), 2, "both delivered, in clear");
        assert_eq!(got[0].0, web);
        let out = sent.try_recv().expect("the port-80 datagram, sent");
        let inn = received.try_recv().expect("the port-80 datagram, received");
        assert!(
            sent.try_recv().is_err() && received.try_recv().is_err(),
            "port 81 filtered out"
        );
        // Ethernet + IPv4 + UDP, then the datagram as sealed: header in clear, the rest not.
        let wire = &out.data[42..];
        assert_eq!(wire.len(), web.len() + seal::TRAILER_LEN);
        assert_eq!(wire[..24], web[..24]);
        assert_ne!(wire[24..web.len()], web[24..]);
        assert_eq!(inn.data[42..], *wire, "the receiver saw the same bytes");
        assert_eq!(out.data[34..36], a.local_addr().port().to_be_bytes());
        assert_eq!(out.data[36..38], b.local_addr().port().to_be_bytes());
    }

    #[test]
    fn udp_delivers_only_what_authenticates_once() {
        let mut a = Backplane::bind("127.0.0.1:0".parse().unwrap()).expect("bind a");
        let mut b = Backplane::bind("127.0.0.1:0".parse().unwrap()).expect("bind b");
        let (a_addr, b_addr) = (a.local_addr(), b.local_addr());
        a.set_auth(3, 5, &keys()).expect("auth a");
        b.set_auth(4, 5, &keys()).expect("auth b");
        let capture = std::net::UdpSocket::bind("127.0.0.1:0").expect("capture");
        let cap_addr = capture.local_addr().expect("addr");

        // A plain socket's datagram: refused.
        let plain = std::net::UdpSocket::bind("127.0.0.1:0").expect("plain");
        plain.send_to(b"forged geneve", b_addr).expect("send");
        // A sealed one: delivered without its trailer, with the sender's unit.
        send(&mut a, b"real", b_addr);
        // One sealed for another address (captured there), then replayed to b.
        send(&mut a, b"meant for capture", cap_addr);
        a.flush().expect("flush");
        let mut cap = [0u8; 256];
        let (n, _) = capture.recv_from(&mut cap).expect("captured");
        plain.send_to(&cap[..n], b_addr).expect("replay elsewhere");

        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_millis(300);
        while Instant::now() < deadline {
            b.recv_batch(64, |d, o| got.push((d.to_vec(), o)))
                .expect("recv");
        }
        assert_eq!(
            got,
            vec![(
                b"real".to_vec(),
                Origin {
                    addr: a_addr,
                    unit: 3
                }
            )]
        );
        let st = b.auth_stats();
        assert_eq!((st.opened, st.rejected()), (1, 2), "{st:?}");

        // A datagram sealed for b (as a capture on the wire would hold it), delivered twice,
        // and once altered: the first is taken, the others refused.
        let mut sealer = Sealer::new(3).expect("sealer");
        sealer.set_keys(5, &keys()).expect("keys");
        let mut wire = vec![0u8; 64];
        wire[..7].copy_from_slice(b"on wire");
        let n = sealer.seal(&mut wire, 7, b_addr).expect("seal");
        let mut altered = wire[..n].to_vec();
        altered[0] ^= 1;
        for d in [&wire[..n], &wire[..n], &altered[..]] {
            plain.send_to(d, b_addr).expect("send");
        }
        let mut more = Vec::new();
        let deadline = Instant::now() + Duration::from_millis(300);
        while Instant::now() < deadline {
            b.recv_batch(64, |d, o| more.push((d.to_vec(), o.unit)))
                .expect("recv");
        }
        assert_eq!(more, vec![(b"on wire".to_vec(), 3)]);
        // The altered copy carries a sequence number already taken: refused as a replay
        // before any cryptography. (Earlier: the short plain one, the misaddressed capture.)
        let st = b.auth_stats();
        assert_eq!((st.short, st.bad_tag, st.replayed), (1, 1, 2), "{st:?}");
    }

    #[test]
    fn with_auth_on_an_unkeyed_backplane_sends_nothing() {
        let mut a = Backplane::bind("127.0.0.1:0".parse().unwrap()).expect("bind a");
        let mut b = Backplane::bind("127.0.0.1:0".parse().unwrap()).expect("bind b");
        b.set_auth(4, 5, &keys()).expect("auth b");
        let b_addr = b.local_addr();
        // a has no keys: its plain datagram is refused by b.
        send(&mut a, b"unsealed", b_addr);
        a.flush().expect("flush");
        assert!(drain(&mut b, 1).is_empty());
        assert_eq!(b.auth_stats().rejected(), 1);
        // Slots leave room for the trailer.
        assert_eq!(
            b.tx_slot().expect("slot").len(),
            crate::udp::MAX_DATAGRAM - seal::TRAILER_LEN
        );
    }
}
