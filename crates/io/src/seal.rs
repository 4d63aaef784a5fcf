//! Sealing of backplane datagrams: every GENEVE datagram a unit sends over UDP carries a
//! trailer that proves it was made by a unit of the appliance, for this receiver, and not
//! before; the packet it carries is encrypted.
//!
//! ```text
//!  | GENEVE header + dva option (24 B) | inner packet     | tag (16) | epoch | sender | instance | seq |
//!  |  in clear, authenticated          | encrypted        |          |  u32     u32      u32      u64  |
//! ```
//!
//! - AES-256-GCM under the appliance's key of `epoch`: the GENEVE header and dva's option
//!   ([`CLEAR_LEN`] bytes, what an operator's tshark reads on port 6081) and the trailer's
//!   fields are associated data, the inner packet is encrypted in place. Encrypting costs less
//!   than authenticating the same bytes as associated data (ring's stitched AES-GCM runs the
//!   cipher and the hash in one pass; GHASH over associated data alone is several times
//!   slower per byte), and keeps the appliance's traffic private between machines. The manager
//!   creates the keys, rotates them and hands them to units over their authenticated channel; a
//!   receiver holds the previous, current and next epochs' keys, so a rotation never has a
//!   moment where two units disagree.
//! - The nonce is `instance ^ fold(destination) || seq`: `instance` is random per sending
//!   process and `seq` counts every datagram it sends, so no two datagrams of a key share a
//!   nonce; folding in the destination address (which the receiver knows as its own) makes a
//!   datagram captured on its way to one unit fail at any other.
//! - `seq` starts at the wall-clock time in nanoseconds, so a restarted unit continues above
//!   every number its previous life used and receivers need no reset; each receiver keeps a
//!   sliding window of [`WINDOW`] numbers per sender (IPsec / WireGuard style) and drops a
//!   datagram it has seen or that is older than the window.
//! - [`Sealer::open`] checks all of this, and decrypts in place, before the caller parses a
//!   byte of the datagram: what fails is counted and never delivered.
//!
//! Rings between units on one machine carry no trailer: they are files only their owner can
//! open (0600 in a 0700 directory), and the ring itself names the producer.

use std::net::{IpAddr, SocketAddr};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use ring::rand::{SecureRandom, SystemRandom};

/// Bytes a sealed datagram carries after its payload.
pub const TRAILER_LEN: usize = TAG_LEN + HEADER_LEN;
/// The trailer's fields after the tag.
const HEADER_LEN: usize = 4 + 4 + 4 + 8;
/// Leading bytes left in clear (and authenticated): GENEVE's fixed header and dva's option.
pub const CLEAR_LEN: usize = 24;
const TAG_LEN: usize = 16;
/// Length of a backplane key.
pub const KEY_LEN: usize = 32;
/// How far behind the newest sequence number of a sender a datagram may arrive (reordering
/// on the network) and still be accepted once.
pub const WINDOW: u64 = 4096;
const WORDS: usize = (WINDOW / 64) as usize;
/// Senders whose replay windows a receiver keeps; only datagrams that authenticated make one,
/// so this is the number of units of the appliance, with room to spare.
const MAX_SENDERS: usize = 4096;

/// The sender field is the unit's id, with the sending thread (a dispatcher's lane) in its top
/// [`32 - LANE_SHIFT`] bits: each lane seals with its own count, so each needs a replay window
/// of its own, and lane 0 is the unit id itself. Unit ids stay below `1 << LANE_SHIFT`.
pub const LANE_SHIFT: u32 = 24;
const UNIT_MASK: u32 = (1 << LANE_SHIFT) - 1;

/// The sender id lane `lane` of unit `unit` seals with.
pub fn lane_sender(unit: u32, lane: u16) -> u32 {
    (unit & UNIT_MASK) | (u32::from(lane) << LANE_SHIFT)
}

/// One epoch's key as the manager hands it out.
#[derive(Clone, PartialEq, Eq)]
pub struct EpochKey {
    pub epoch: u32,
    pub key: [u8; KEY_LEN],
}

impl std::fmt::Debug for EpochKey {
    // Keys never reach a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EpochKey {{ epoch: {}, key: <redacted> }}", self.epoch)
    }
}

/// Why a datagram was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// Shorter than a trailer.
    Short,
    /// Sealed under an epoch this receiver holds no key for.
    UnknownEpoch,
    /// The tag does not verify: forged, altered, or meant for another receiver.
    BadTag,
    /// Seen before, or older than the replay window.
    Replayed,
}

/// Counters of a [`Sealer`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AuthStats {
    pub sealed: u64,
    pub opened: u64,
    pub short: u64,
    pub unknown_epoch: u64,
    pub bad_tag: u64,
    pub replayed: u64,
}

impl AuthStats {
    /// Every datagram refused, whatever the reason.
    pub fn rejected(&self) -> u64 {
        self.short + self.unknown_epoch + self.bad_tag + self.replayed
    }
}

/// Per-sender replay window: the highest sequence number accepted and a bitmap of the
/// [`WINDOW`] numbers below it.
struct Window {
    top: u64,
    bits: [u64; WORDS],
}

impl Window {
    fn new() -> Window {
        Window {
            top: 0,
            bits: [0; WORDS],
        }
    }

    fn fresh(&self, seq: u64) -> bool {
        if seq > self.top {
            return true;
        }
        if self.top - seq >= WINDOW {
            return false;
        }
        let i = (seq % WINDOW) as usize;
        self.bits[i / 64] & (1 << (i % 64)) == 0
    }

    fn mark(&mut self, seq: u64) {
        if seq > self.top {
            // Clear the numbers the window slides past (all of them after a long gap).
            let gap = seq - self.top;
            if gap >= WINDOW {
                self.bits = [0; WORDS];
            } else {
                for s in self.top + 1..seq {
                    let i = (s % WINDOW) as usize;
                    self.bits[i / 64] &= !(1 << (i % 64));
                }
            }
            self.top = seq;
        }
        let i = (seq % WINDOW) as usize;
        self.bits[i / 64] |= 1 << (i % 64);
    }
}

/// Seals what a unit sends and opens what it receives.
pub struct Sealer {
    me: u32,
    instance: u32,
    seq: u64,
    send: Option<(u32, LessSafeKey)>,
    keys: Vec<(u32, LessSafeKey)>,
    windows: Vec<(u32, Window)>,
    stats: AuthStats,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("me", &self.me)
            .field("send_epoch", &self.send.as_ref().map(|(e, _)| *e))
            .field(
                "epochs",
                &self.keys.iter().map(|(e, _)| *e).collect::<Vec<_>>(),
            )
            .field("stats", &self.stats)
            .finish()
    }
}

/// A fresh random key (for the manager).
pub fn random_key() -> std::io::Result<[u8; KEY_LEN]> {
    let mut k = [0u8; KEY_LEN];
    SystemRandom::new()
        .fill(&mut k)
        .map_err(|_| std::io::Error::other("no randomness from the system"))?;
    Ok(k)
}

/// The destination as a 32-bit value for the nonce; IPv4-mapped IPv6 counts as IPv4, so a
/// dual-stack socket and an IPv4 one agree.
fn fold(addr: SocketAddr) -> u32 {
    let ip = match addr.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    // FNV-1a: not for secrecy (the nonce is public), only to spread the address.
    let mut h: u32 = 0x811c_9dc5;
    let mut eat = |b: u8| {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    };
    match ip {
        IpAddr::V4(a) => a.octets().into_iter().for_each(&mut eat),
        IpAddr::V6(a) => a.octets().into_iter().for_each(&mut eat),
    }
    addr.port().to_be_bytes().into_iter().for_each(eat);
    h
}

fn nonce(instance: u32, dst: SocketAddr, seq: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[..4].copy_from_slice(&(instance ^ fold(dst)).to_be_bytes());
    n[4..].copy_from_slice(&seq.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

/// The associated data: the clear head of the datagram, then the trailer's fields (one
/// contiguous slice, as the AEAD takes it).
fn associated(head: &[u8], fields: &[u8; HEADER_LEN]) -> ([u8; CLEAR_LEN + HEADER_LEN], usize) {
    let mut a = [0u8; CLEAR_LEN + HEADER_LEN];
    a[..head.len()].copy_from_slice(head);
    a[head.len()..head.len() + HEADER_LEN].copy_from_slice(fields);
    (a, head.len() + HEADER_LEN)
}

fn wall_clock_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

impl Sealer {
    /// A sealer for unit `me`, holding no key yet (it refuses everything until
    /// [`Sealer::set_keys`]).
    pub fn new(me: u32) -> std::io::Result<Sealer> {
        let mut r = [0u8; 4];
        SystemRandom::new()
            .fill(&mut r)
            .map_err(|_| std::io::Error::other("no randomness from the system"))?;
        Ok(Sealer {
            me,
            instance: u32::from_be_bytes(r),
            seq: wall_clock_ns(),
            send: None,
            keys: Vec::new(),
            windows: Vec::new(),
            stats: AuthStats::default(),
        })
    }

    /// The keys to accept, and the epoch to seal with (which must be one of them).
    /// Refused (no key for `send_epoch`, a key the cipher cannot take), nothing changes.
    pub fn set_keys(&mut self, send_epoch: u32, keys: &[EpochKey]) -> Result<(), String> {
        let mk = |k: &EpochKey| {
            UnboundKey::new(&AES_256_GCM, &k.key)
                .map(LessSafeKey::new)
                .map_err(|_| format!("backplane key of epoch {}: unusable", k.epoch))
        };
        let send = keys
            .iter()
            .find(|k| k.epoch == send_epoch)
            .ok_or_else(|| format!("no backplane key for the send epoch {send_epoch}"))?;
        let send = (send.epoch, mk(send)?);
        let keys = keys
            .iter()
            .map(|k| Ok((k.epoch, mk(k)?)))
            .collect::<Result<Vec<_>, String>>()?;
        self.send = Some(send);
        self.keys = keys;
        Ok(())
    }

    /// Whether [`Sealer::set_keys`] would take `keys`, changing nothing: a config is checked
    /// whole before any of it is applied.
    pub fn check_keys(send_epoch: u32, keys: &[EpochKey]) -> Result<(), String> {
        Sealer {
            me: 0,
            instance: 0,
            seq: 0,
            send: None,
            keys: Vec::new(),
            windows: Vec::new(),
            stats: AuthStats::default(),
        }
        .set_keys(send_epoch, keys)
    }

    pub fn me(&self) -> u32 {
        self.me
    }

    pub fn stats(&self) -> AuthStats {
        self.stats
    }

    /// Seal the `len` bytes at the start of `buf` for `dst`: encrypt what follows the first
    /// [`CLEAR_LEN`] bytes in place and write the trailer after them. Returns the sealed
    /// length, or `None` if `buf` has no room for the trailer or there is no key yet (the
    /// datagram must not be sent).
    pub fn seal(&mut self, buf: &mut [u8], len: usize, dst: SocketAddr) -> Option<usize> {
        let total = len.checked_add(TRAILER_LEN)?;
        if buf.len() < total {
            return None;
        }
        let (epoch, key) = self.send.as_ref()?;
        self.seq += 1;
        let seq = self.seq;
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&epoch.to_be_bytes());
        h[4..8].copy_from_slice(&self.me.to_be_bytes());
        h[8..12].copy_from_slice(&self.instance.to_be_bytes());
        h[12..20].copy_from_slice(&seq.to_be_bytes());
        let clear = len.min(CLEAR_LEN);
        let (head, rest) = buf[..total].split_at_mut(clear);
        let aad = associated(head, &h);
        let t = key
            .seal_in_place_separate_tag(
                nonce(self.instance, dst, seq),
                Aad::from(&aad.0[..aad.1]),
                &mut rest[..len - clear],
            )
            .ok()?;
        rest[len - clear..len - clear + TAG_LEN].copy_from_slice(t.as_ref());
        rest[len - clear + TAG_LEN..].copy_from_slice(&h);
        self.stats.sealed += 1;
        Some(total)
    }

    /// Authenticate and decrypt (in place) a datagram received by `local` (the address it was
    /// sent to). On success: the payload's length (the trailer cut off) and the sending unit;
    /// `buf[..length]` is the datagram as its sender built it (the unit, whichever of its lanes
    /// sealed it). On failure `buf` is garbage.
    pub fn open(&mut self, buf: &mut [u8], local: SocketAddr) -> Result<(usize, u32), Reject> {
        let r = self.check(buf, local);
        match r {
            Ok(_) => self.stats.opened += 1,
            Err(Reject::Short) => self.stats.short += 1,
            Err(Reject::UnknownEpoch) => self.stats.unknown_epoch += 1,
            Err(Reject::BadTag) => self.stats.bad_tag += 1,
            Err(Reject::Replayed) => self.stats.replayed += 1,
        }
        r
    }

    fn check(&mut self, buf: &mut [u8], local: SocketAddr) -> Result<(usize, u32), Reject> {
        let len = buf.len().checked_sub(TRAILER_LEN).ok_or(Reject::Short)?;
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(&buf[len + TAG_LEN..]);
        let word = |i: usize| u32::from_be_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        let (epoch, sender, instance) = (word(0), word(4), word(8));
        let mut s = [0u8; 8];
        s.copy_from_slice(&h[12..20]);
        let seq = u64::from_be_bytes(s);
        let key = self
            .keys
            .iter()
            .find(|(e, _)| *e == epoch)
            .map(|(_, k)| k)
            .ok_or(Reject::UnknownEpoch)?;
        // The window first: a replay costs no cryptography.
        let w = self.windows.iter().position(|(u, _)| *u == sender);
        if let Some(i) = w {
            if !self.windows[i].1.fresh(seq) {
                return Err(Reject::Replayed);
            }
        }
        let clear = len.min(CLEAR_LEN);
        let (head, rest) = buf.split_at_mut(clear);
        let aad = associated(head, &h);
        key.open_in_place(
            nonce(instance, local, seq),
            Aad::from(&aad.0[..aad.1]),
            &mut rest[..len - clear + TAG_LEN],
        )
        .map_err(|_| Reject::BadTag)?;
        let i = match w {
            Some(i) => i,
            None => {
                if self.windows.len() >= MAX_SENDERS {
                    self.windows.remove(0);
                }
                self.windows.push((sender, Window::new()));
                self.windows.len() - 1
            }
        };
        self.windows[i].1.mark(seq);
        Ok((len, sender & UNIT_MASK))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(epoch: u32, b: u8) -> EpochKey {
        EpochKey {
            epoch,
            key: [b; KEY_LEN],
        }
    }

    fn pair() -> (Sealer, Sealer, SocketAddr) {
        let mut a = Sealer::new(7).expect("a");
        let mut b = Sealer::new(9).expect("b");
        a.set_keys(1, &[key(1, 0xaa)]).expect("keys a");
        b.set_keys(1, &[key(1, 0xaa)]).expect("keys b");
        (a, b, "198.19.0.11:6081".parse().unwrap())
    }

    fn sealed(a: &mut Sealer, payload: &[u8], dst: SocketAddr) -> Vec<u8> {
        let mut buf = vec![0u8; payload.len() + TRAILER_LEN];
        buf[..payload.len()].copy_from_slice(payload);
        let n = a.seal(&mut buf, payload.len(), dst).expect("seal");
        assert_eq!(n, buf.len());
        buf
    }

    /// Open a copy (opening decrypts in place), returning the result and what it opened to.
    fn open(b: &mut Sealer, d: &[u8], local: SocketAddr) -> Result<(usize, u32), Reject> {
        let mut x = d.to_vec();
        b.open(&mut x, local)
    }

    #[test]
    fn the_head_stays_in_clear_the_packet_does_not_and_opens_to_what_was_sent() {
        let (mut a, mut b, dst) = pair();
        let payload: Vec<u8> = (0..100u8).collect();
        let d = sealed(&mut a, &payload, dst);
        assert_eq!(d[..CLEAR_LEN], payload[..CLEAR_LEN]);
        assert_ne!(d[CLEAR_LEN..100], payload[CLEAR_LEN..]);
        let mut x = d.clone();
        assert_eq!(b.open(&mut x, dst), Ok((100, 7)));
        assert_eq!(x[..100], payload[..]);
        // Shorter than the clear head: all of it in clear, still sealed.
        let d = sealed(&mut a, b"tiny", dst);
        let mut x = d.clone();
        assert_eq!(b.open(&mut x, dst), Ok((4, 7)));
        assert_eq!(&x[..4], b"tiny");
    }

    #[test]
    fn a_sealed_datagram_opens_once_at_its_destination_only() {
        let (mut a, mut b, dst) = pair();
        let d = sealed(&mut a, b"geneve and a packet", dst);
        assert_eq!(open(&mut b, &d, dst), Ok((19, 7)));
        assert_eq!(open(&mut b, &d, dst), Err(Reject::Replayed));
        // The same bytes captured and sent to another unit's address.
        let d2 = sealed(&mut a, b"another", dst);
        let other: SocketAddr = "198.19.0.12:6081".parse().unwrap();
        assert_eq!(open(&mut b, &d2, other), Err(Reject::BadTag));
        // An IPv4-mapped local address is the same destination.
        let mapped: SocketAddr = "[::ffff:198.19.0.11]:6081".parse().unwrap();
        assert_eq!(open(&mut b, &d2, mapped), Ok((7, 7)));
        assert_eq!(b.stats().opened, 2);
        assert_eq!(b.stats().rejected(), 2);
    }

    #[test]
    fn any_altered_bit_and_any_other_key_fail() {
        let (mut a, mut b, dst) = pair();
        let d = sealed(&mut a, &[0x5a; 100], dst);
        for i in 0..d.len() {
            let mut x = d.clone();
            x[i] ^= 0x01;
            let r = open(&mut b, &x, dst);
            // Flipping the epoch names a key b does not hold; anything else breaks the tag
            // (or, in the sequence number, may first look like a replay).
            assert!(r.is_err(), "bit flip at {i} accepted");
        }
        let mut c = Sealer::new(7).expect("c");
        c.set_keys(1, &[key(1, 0xbb)]).expect("keys c");
        let forged = sealed(&mut c, &[0x5a; 100], dst);
        assert_eq!(open(&mut b, &forged, dst), Err(Reject::BadTag));
        assert_eq!(
            open(&mut b, &d, dst),
            Ok((100, 7)),
            "the original still opens"
        );
        assert_eq!(open(&mut b, &d[..10], dst), Err(Reject::Short));
    }

    #[test]
    fn no_key_no_datagram() {
        let mut a = Sealer::new(1).expect("a");
        let mut buf = [0u8; 64];
        assert_eq!(a.seal(&mut buf, 10, "127.0.0.1:1".parse().unwrap()), None);
        assert!(
            a.set_keys(2, &[key(1, 1)]).is_err(),
            "send epoch must be held"
        );
        let mut b = Sealer::new(2).expect("b");
        assert_eq!(
            b.open(&mut [0u8; 64], "127.0.0.1:1".parse().unwrap()),
            Err(Reject::UnknownEpoch)
        );
    }

    #[test]
    fn rotation_overlaps_old_current_and_next() {
        let (mut a, mut b, dst) = pair();
        // b already rotated: it holds 1 (previous), 2 (current), 3 (next); a still seals with 1.
        b.set_keys(2, &[key(1, 0xaa), key(2, 0xcc), key(3, 0xdd)])
            .expect("b");
        let d = sealed(&mut a, b"old epoch", dst);
        assert_eq!(open(&mut b, &d, dst), Ok((9, 7)));
        // a moves on to 3 before b did: still accepted.
        a.set_keys(3, &[key(2, 0xcc), key(3, 0xdd), key(4, 0xee)])
            .expect("a");
        let d = sealed(&mut a, b"next epoch", dst);
        assert_eq!(open(&mut b, &d, dst), Ok((10, 7)));
        // Epoch 4 is one b has not heard of yet.
        a.set_keys(4, &[key(4, 0xee)]).expect("a");
        let d = sealed(&mut a, b"too new", dst);
        assert_eq!(open(&mut b, &d, dst), Err(Reject::UnknownEpoch));
    }

    #[test]
    fn reordering_within_the_window_passes_and_older_is_refused() {
        let (mut a, mut b, dst) = pair();
        let ds: Vec<Vec<u8>> = (0..WINDOW + 10)
            .map(|_| sealed(&mut a, b"x", dst))
            .collect();
        // The newest first, then the rest backwards: all within the window but the oldest 10.
        let last = ds.len() - 1;
        assert!(open(&mut b, &ds[last], dst).is_ok());
        for (i, d) in ds[..last].iter().enumerate().rev() {
            let r = open(&mut b, d, dst);
            if (last - i) as u64 >= WINDOW {
                assert_eq!(r, Err(Reject::Replayed), "datagram {i}");
            } else {
                assert!(r.is_ok(), "datagram {i}: {r:?}");
                assert_eq!(open(&mut b, d, dst), Err(Reject::Replayed));
            }
        }
    }

    #[test]
    fn a_restarted_sender_continues_above_its_old_numbers() {
        let (mut a, mut b, dst) = pair();
        let d = sealed(&mut a, b"before", dst);
        assert!(open(&mut b, &d, dst).is_ok());
        // The same unit id in a new process: new instance, clock-based sequence numbers.
        let mut a2 = Sealer::new(7).expect("a2");
        a2.set_keys(1, &[key(1, 0xaa)]).expect("keys");
        let d2 = sealed(&mut a2, b"after", dst);
        assert!(open(&mut b, &d2, dst).is_ok());
        assert_eq!(open(&mut b, &d, dst), Err(Reject::Replayed));
    }

    #[test]
    fn lanes_of_one_unit_each_keep_their_own_window() {
        // Two lanes of unit 7: one sends far more than the other, so its numbers run ahead by
        // more than a window; the slow lane is still accepted, and both open as unit 7.
        let (mut fast, mut b, dst) = pair();
        let mut slow = Sealer::new(lane_sender(7, 1)).expect("slow");
        slow.set_keys(1, &[key(1, 0xaa)]).expect("keys");
        let first = sealed(&mut slow, b"slow", dst);
        for _ in 0..WINDOW * 2 {
            let d = sealed(&mut fast, b"fast", dst);
            assert!(open(&mut b, &d, dst).is_ok());
        }
        assert_eq!(open(&mut b, &first, dst), Ok((4, 7)));
        assert_eq!(open(&mut b, &first, dst), Err(Reject::Replayed));
    }
}
