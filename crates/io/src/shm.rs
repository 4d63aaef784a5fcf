//! Shared-memory rings between units on the same machine: the backplane without a syscall per
//! packet (memif's idea: a single-producer single-consumer ring of fixed slots in a shared file,
//! plus a doorbell for a consumer that went to sleep).
//!
//! A ring is a file (on tmpfs: the appliance's run directory) that the *consumer* creates and
//! both ends map. Layout: a header (magic, slot count and size, then `head`, `tail` and
//! `sleeping`, each on its own cache line), then `slots` slots of `slot_size` bytes. `head`
//! and `tail` count slots (they only grow; a slot's place is the count modulo `slots`).
//!
//! Records: a datagram of `L` bytes takes `k = ceil((4 + L) / slot_size)` consecutive slots: a
//! `u32` length (native byte order: both ends are on one machine) at the start of the first,
//! the datagram right after it, contiguous across the slot boundaries. Most datagrams (a frame
//! of the usual MTU with its GENEVE header) take one slot; TCP GSO super-packets (64 KiB and a
//! header) take a few dozen. A record never wraps: when its `k` slots would run past the last
//! slot, the producer writes a padding marker (length `u32::MAX`) in the slot at `head` and
//! skips to slot 0; the skipped slots count as used until the consumer passes them. Records
//! are at most [`Producer::max_len`] bytes (a quarter of the ring, so padding never wastes
//! more than a quarter of it and several large records fit).
//!
//! - The producer writes records past `head`, then publishes the new `head` (one store per
//!   batch, on [`Producer::publish`]). It never waits: a full ring or a datagram larger than
//!   `max_len` is refused and the caller sends it another way or counts a drop.
//! - The consumer reads records from `tail` to `head`, each as one contiguous slice, and stores
//!   the new `tail` once per batch. It trusts no length it reads: a record (or padding) that
//!   would run past the last slot or past the published `head` means a broken producer, and
//!   the consumer skips everything up to `head` rather than read outside what it was given.
//! - Sleeping: before blocking in poll(2), the consumer sets `sleeping` and checks the ring
//!   once more ([`Consumer::prepare_sleep`]); a producer that publishes while `sleeping` is set
//!   clears it and rings the consumer's doorbell, a Unix datagram socket next to the rings,
//!   which is in the consumer's poll set. Both sides use sequentially consistent operations on
//!   `head` and `sleeping`, so either the consumer sees the new head or the producer sees it
//!   sleeping: no wakeup is lost, and a busy consumer costs the producer no syscall at all.
//!
//! A consumer that restarts creates its rings anew (a new file at the same path); producers
//! notice the new inode within [`RECHECK`] and map the new ring. A dead consumer's ring fills
//! up and further datagrams are refused, as a dead peer's socket would drop them.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const MAGIC: u64 = 0x6476_615f_7269_6e67; // "dva_ring"
const HEAD: usize = 64;
const TAIL: usize = 128;
const SLEEPING: usize = 192;
const SLOTS_AT: usize = 256;
/// Bytes of a record before the datagram: its length.
const SLOT_HEADER: usize = 4;
/// The length that marks padding: the slots from here to the end of the slot area are unused.
const PADDING: u32 = u32::MAX;

/// Default slots per ring and slot size: a slot of 2 KiB holds a frame of the lab's 1500-byte
/// MTU with its GENEVE header; 4096 of them (8 MiB a ring, on tmpfs) hold a whole batch of 64
/// GSO super-packets (33 slots each) and more in flight.
pub const DEFAULT_SLOTS: u32 = 4096;
pub const DEFAULT_SLOT_SIZE: u32 = 2048;
/// How often a producer checks that the ring file it maps is still the consumer's.
pub const RECHECK: Duration = Duration::from_millis(100);

/// A mapped ring file.
struct Mapping {
    base: NonNull<u8>,
    len: usize,
    slots: u32,
    slot_size: u32,
}

// SAFETY: the mapping is plain shared memory; all cross-process access goes through atomics
// (head, tail, sleeping) or through slots that the ring protocol gives to one side at a time.
unsafe impl Send for Mapping {}

impl Mapping {
    fn map(file: &File, len: usize) -> io::Result<Mapping> {
        // SAFETY: a fresh shared mapping of `len` bytes of an open file; the kernel picks the
        // address. The file is at least `len` bytes long (checked or set by the callers).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap: null"))?;
        let mut m = Mapping {
            base,
            len,
            slots: 0,
            slot_size: 0,
        };
        m.slots = m.u32_at(8);
        m.slot_size = m.u32_at(12);
        Ok(m)
    }

    fn u32_at(&self, off: usize) -> u32 {
        // SAFETY: off + 4 <= SLOTS_AT <= len (the callers map at least the header).
        unsafe { self.base.as_ptr().add(off).cast::<u32>().read_volatile() }
    }

    fn u64_at(&self, off: usize) -> u64 {
        // SAFETY: as above, 8-byte aligned header fields of a page-aligned mapping.
        unsafe { self.base.as_ptr().add(off).cast::<u64>().read_volatile() }
    }

    fn atomic64(&self, off: usize) -> &AtomicU64 {
        // SAFETY: `off` is one of HEAD/TAIL: 8-byte aligned, inside the mapping, and only ever
        // accessed atomically by either process.
        unsafe { &*self.base.as_ptr().add(off).cast::<AtomicU64>() }
    }

    fn sleeping(&self) -> &AtomicU32 {
        // SAFETY: as for `atomic64`, at SLEEPING.
        unsafe { &*self.base.as_ptr().add(SLEEPING).cast::<AtomicU32>() }
    }

    /// The place in the slot area of slot number `i` (a `head` or `tail` value).
    fn index(&self, i: u64) -> usize {
        (i % u64::from(self.slots)) as usize
    }

    /// Slot `idx` (< slots) as a raw pointer; the slot area runs on from it for
    /// `(slots - idx) * slot_size` bytes.
    fn slot(&self, idx: usize) -> *mut u8 {
        debug_assert!(idx < self.slots as usize);
        // SAFETY: SLOTS_AT + slots * slot_size == len (validated on map) and idx < slots, so
        // the slot is inside the mapping.
        unsafe {
            self.base
                .as_ptr()
                .add(SLOTS_AT + idx * self.slot_size as usize)
        }
    }

    /// Slots a record of `len` bytes takes. One length check for the usual one-slot record;
    /// the division only for larger ones.
    #[inline]
    fn slots_for(&self, len: usize) -> usize {
        let need = SLOT_HEADER + len;
        let size = self.slot_size as usize;
        if need <= size {
            1
        } else {
            need.div_ceil(size)
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the region `map` mapped; nothing borrows it any more.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len);
        }
    }
}

fn ring_len(slots: u32, slot_size: u32) -> usize {
    SLOTS_AT + slots as usize * slot_size as usize
}

/// The largest record of a ring: what a slot holds, or up to a quarter of the slot area if
/// that is more (a record of `k` slots may need up to `k - 1` slots of padding before it, and
/// the ring should still hold a few), and never `u32::MAX`, the padding marker.
fn max_record(slots: u32, slot_size: u32) -> usize {
    let quarter = slots as usize * slot_size as usize / 4;
    (slot_size as usize)
        .max(quarter)
        .saturating_sub(SLOT_HEADER)
        .min(PADDING as usize - 1)
}

/// The receiving end of a ring; it owns the file (and removes it on drop).
pub struct Consumer {
    map: Mapping,
    path: PathBuf,
    tail: u64,
}

impl Consumer {
    /// Create (or replace) the ring at `path`. The file appears complete: it is built under a
    /// temporary name and renamed into place, so a producer never maps a half-made ring.
    pub fn create(path: &Path, slots: u32, slot_size: u32) -> io::Result<Consumer> {
        if slots == 0 || slot_size as usize <= SLOT_HEADER || !slot_size.is_multiple_of(8) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("ring of {slots} slots of {slot_size} bytes"),
            ));
        }
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        // 0600: the ring carries the appliance's traffic. Set again on the open file in case
        // a stale temporary file of another mode was in the way.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(crate::local::FILE_MODE)
            .open(&tmp)?;
        file.set_permissions(fs::Permissions::from_mode(crate::local::FILE_MODE))?;
        let len = ring_len(slots, slot_size);
        file.set_len(len as u64)?;
        let mut map = Mapping::map(&file, len)?;
        // SAFETY: the header of a mapping nobody else has yet (the file is not at its name).
        unsafe {
            let b = map.base.as_ptr();
            b.cast::<u64>().write_volatile(MAGIC);
            b.add(8).cast::<u32>().write_volatile(slots);
            b.add(12).cast::<u32>().write_volatile(slot_size);
        }
        map.slots = slots;
        map.slot_size = slot_size;
        fs::rename(&tmp, path)?;
        Ok(Consumer {
            map,
            path: path.to_path_buf(),
            tail: 0,
        })
    }

    /// Deliver up to `max` datagrams to `f`, in order, each as one slice. Returns how many
    /// (padding is skipped and not counted).
    pub fn pop_batch(&mut self, max: usize, mut f: impl FnMut(&[u8])) -> usize {
        let n = self.pop_batch_held(max, |d| f(d));
        self.release();
        n
    }

    /// As [`Consumer::pop_batch`], but each datagram is lent mutably and its slots stay ours
    /// until [`Consumer::release`]: the producer cannot reuse them before, so a datagram may be
    /// referenced (handed to `sendmmsg`, say) after `f` returns, and changed in place.
    pub fn pop_batch_held(&mut self, max: usize, mut f: impl FnMut(&mut [u8])) -> usize {
        let head = self.map.atomic64(HEAD).load(Ordering::Acquire);
        let slots = u64::from(self.map.slots);
        let mut n = 0;
        while n < max && self.tail != head {
            // Slots published but not yet read; more than the ring holds (or a head behind
            // our tail) is a broken producer: give up on what it wrote.
            let avail = head.wrapping_sub(self.tail);
            if avail > slots {
                self.tail = head;
                break;
            }
            let idx = self.map.index(self.tail);
            let slot = self.map.slot(idx);
            // SAFETY: the first slot of a record is inside the slot area (idx < slots) and was
            // published by the producer (Acquire above).
            let len = unsafe { slot.cast::<u32>().read_unaligned() };
            // Slots the record (or padding) claims, which must lie before both the end of the
            // slot area and the published head.
            let (k, padding) = if len == PADDING {
                (slots - idx as u64, true)
            } else {
                (self.map.slots_for(len as usize) as u64, false)
            };
            if k > avail || k > slots - idx as u64 {
                self.tail = head;
                break;
            }
            if !padding {
                // SAFETY: the record's k slots are inside the slot area and before the
                // published head (checked just above), so its bytes are in the mapping and
                // were written by the producer before publishing; they are not rewritten
                // until `release` publishes a tail past them, and nothing else of ours refers
                // to them while `f` runs.
                let data =
                    unsafe { std::slice::from_raw_parts_mut(slot.add(SLOT_HEADER), len as usize) };
                f(data);
                n += 1;
            }
            self.tail = self.tail.wrapping_add(k);
        }
        n
    }

    /// Give the slots of every datagram delivered so far back to the producer.
    pub fn release(&mut self) {
        let published = self.map.atomic64(TAIL);
        if published.load(Ordering::Relaxed) != self.tail {
            published.store(self.tail, Ordering::Release);
        }
    }

    /// Whether datagrams are waiting.
    pub fn is_empty(&self) -> bool {
        self.map.atomic64(HEAD).load(Ordering::SeqCst) == self.tail
    }

    /// About to block in poll(2): ask producers for a doorbell. Returns false (and withdraws
    /// the request) when datagrams arrived meanwhile, so the caller must not block.
    pub fn prepare_sleep(&self) -> bool {
        self.map.sleeping().store(1, Ordering::SeqCst);
        if self.is_empty() {
            true
        } else {
            self.map.sleeping().store(0, Ordering::SeqCst);
            false
        }
    }

    /// Awake again (whether or not a doorbell came).
    pub fn awake(&self) {
        self.map.sleeping().store(0, Ordering::Relaxed);
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// The sending end of a ring, mapped from the consumer's file.
pub struct Producer {
    map: Mapping,
    path: PathBuf,
    ino: u64,
    checked: Instant,
    /// Next slot to write; published to the consumer by [`Producer::publish`].
    head: u64,
    /// The consumer's tail as last read (refreshed when the ring looks full).
    tail: u64,
    /// The largest record this ring takes.
    max_len: usize,
}

impl Producer {
    /// Map the ring the consumer made at `path`.
    pub fn open(path: &Path) -> io::Result<Producer> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let meta = file.metadata()?;
        if (meta.len() as usize) < SLOTS_AT {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "ring too short"));
        }
        let header = Mapping::map(&file, SLOTS_AT)?;
        let (magic, slots, slot_size) = (header.u64_at(0), header.slots, header.slot_size);
        drop(header);
        let len = ring_len(slots, slot_size);
        if magic != MAGIC
            || slots == 0
            || slot_size as usize <= SLOT_HEADER
            || meta.len() as usize != len
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is not a dva ring", path.display()),
            ));
        }
        let map = Mapping::map(&file, len)?;
        let head = map.atomic64(HEAD).load(Ordering::Acquire);
        let tail = map.atomic64(TAIL).load(Ordering::Acquire);
        Ok(Producer {
            map,
            path: path.to_path_buf(),
            ino: meta.ino(),
            checked: Instant::now(),
            head,
            tail,
            max_len: max_record(slots, slot_size),
        })
    }

    /// The largest datagram [`Producer::push`] takes (a full slot's worth at least; with the
    /// default sizes 512 KiB less the length).
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Copy `data` into the next record (not yet visible to the consumer). False: the ring is
    /// full or `data` is longer than [`Producer::max_len`].
    pub fn push(&mut self, data: &[u8]) -> bool {
        self.push_with(data.len(), |b| b.copy_from_slice(data))
    }

    /// Reserve the next record, of `len` bytes, and have `fill` write the datagram in place
    /// (it gets exactly `len` bytes, with whatever the slots held before), so a large datagram
    /// is built once, in the ring. Not yet visible to the consumer. False, without calling
    /// `fill`: the ring is full or `len` is over [`Producer::max_len`].
    pub fn push_with(&mut self, len: usize, fill: impl FnOnce(&mut [u8])) -> bool {
        let k = self.map.slots_for(len);
        let slots = u64::from(self.map.slots);
        let mut idx = self.map.index(self.head);
        // A record that would run past the last slot starts over at slot 0, after padding.
        let mut pad = 0;
        if k > 1 {
            if len > self.max_len {
                return false;
            }
            if idx + k > slots as usize {
                pad = slots as usize - idx;
            }
        }
        let need = (pad + k) as u64;
        if self.head.wrapping_sub(self.tail).saturating_add(need) > slots {
            self.tail = self.map.atomic64(TAIL).load(Ordering::Acquire);
            if self.head.wrapping_sub(self.tail).saturating_add(need) > slots {
                return false;
            }
        }
        if pad > 0 {
            // SAFETY: the slot at head is ours until published (the consumer stops at the
            // published head, and tail shows it has read the slot's previous content).
            unsafe { self.map.slot(idx).cast::<u32>().write_unaligned(PADDING) };
            self.head = self.head.wrapping_add(pad as u64);
            idx = 0;
        }
        let slot = self.map.slot(idx);
        // SAFETY: the k slots from idx are ours until published (as above: the room check
        // counted them) and inside the slot area (idx + k <= slots, by the padding rule), and
        // 4 + len <= k * slot_size; len <= max_len < u32::MAX, so it is no padding marker.
        // Nothing else references these bytes while `fill` runs.
        unsafe {
            slot.cast::<u32>().write_unaligned(len as u32);
            fill(std::slice::from_raw_parts_mut(slot.add(SLOT_HEADER), len));
        }
        self.head = self.head.wrapping_add(k as u64);
        true
    }

    /// Make the pushed datagrams visible. Returns true if the consumer was asleep and must be
    /// woken (its doorbell rung).
    pub fn publish(&mut self) -> bool {
        let published = self.map.atomic64(HEAD);
        if published.load(Ordering::Relaxed) == self.head {
            return false;
        }
        published.store(self.head, Ordering::SeqCst);
        self.map.sleeping().load(Ordering::SeqCst) != 0
            && self.map.sleeping().swap(0, Ordering::SeqCst) != 0
    }

    /// Whether the file at the ring's path is still the one mapped (checked at most every
    /// [`RECHECK`]; a consumer that restarted made a new one).
    pub fn is_current(&mut self, now: Instant) -> bool {
        if now.duration_since(self.checked) < RECHECK {
            return true;
        }
        self.checked = now;
        fs::metadata(&self.path).is_ok_and(|m| m.ino() == self.ino)
    }
}

/// A consumer's doorbell: a Unix datagram socket at a path next to its rings.
pub struct Doorbell {
    sock: UnixDatagram,
    path: PathBuf,
}

impl Doorbell {
    pub fn bind(path: &Path) -> io::Result<Doorbell> {
        let _ = fs::remove_file(path);
        let sock = UnixDatagram::bind(path)?;
        crate::local::restrict_socket(path)?;
        sock.set_nonblocking(true)?;
        Ok(Doorbell {
            sock,
            path: path.to_path_buf(),
        })
    }

    pub fn as_raw_fd(&self) -> i32 {
        self.sock.as_raw_fd()
    }

    /// Empty the socket (any number of rings counts as one wakeup).
    pub fn drain(&self) {
        let mut b = [0u8; 16];
        while self.sock.recv(&mut b).is_ok() {}
    }
}

impl Drop for Doorbell {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Ring a doorbell at `path` (from any unbound datagram socket). A full or missing doorbell is
/// not an error: the consumer is then either awake already or gone.
pub fn ring(sock: &UnixDatagram, path: &Path) {
    let _ = sock.send_to(&[1], path);
}

/// A socket address as text, safe in a file name.
fn file_safe(addr: &str) -> String {
    addr.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// A file name for the ring from `from` to `to` (socket addresses as text).
pub fn ring_name(to: &str, from: &str) -> String {
    format!("bp-{}-from-{}.ring", file_safe(to), file_safe(from))
}

/// A file name for the doorbell of the consumer at `to`.
pub fn bell_name(to: &str) -> String {
    format!("bp-{}.bell", file_safe(to))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("dva-shm-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).expect("temp dir");
        d
    }

    #[test]
    fn datagrams_arrive_in_order_and_a_full_ring_refuses() {
        let d = dir("order");
        let path = d.join(ring_name("10.0.0.1:6081", "10.0.0.2:6081"));
        let mut c = Consumer::create(&path, 8, 64).expect("create");
        let mut p = Producer::open(&path).expect("open");
        for i in 0..8u8 {
            assert!(p.push(&[i; 10]), "slot {i}");
        }
        assert!(!p.push(&[9; 10]), "a full ring refuses");
        assert!(!p.push(&[0; 61]), "nor takes a two-slot record");
        assert!(c.is_empty(), "nothing visible before publish");
        p.publish();
        let mut got = Vec::new();
        assert_eq!(c.pop_batch(5, |d| got.push(d.to_vec())), 5);
        assert!(p.push(&[8; 3]), "room again after the consumer moved on");
        p.publish();
        assert_eq!(c.pop_batch(100, |d| got.push(d.to_vec())), 4);
        let want: Vec<Vec<u8>> = (0..8u8)
            .map(|i| vec![i; 10])
            .chain([vec![8u8; 3]])
            .collect();
        assert_eq!(got, want);
        drop(c);
        assert!(!path.exists(), "the consumer removes its ring");
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn held_datagrams_keep_their_slots_until_released() {
        let d = dir("held");
        let path = d.join("r.ring");
        let mut c = Consumer::create(&path, 4, 64).expect("create");
        let mut p = Producer::open(&path).expect("open");
        for i in 0..4u8 {
            assert!(p.push(&[i; 10]));
        }
        p.publish();
        // Taken, changed in place and kept: the producer may not write over them.
        let mut kept: Vec<(*const u8, usize)> = Vec::new();
        assert_eq!(
            c.pop_batch_held(4, |d| {
                d[0] ^= 0xff;
                kept.push((d.as_ptr(), d.len()));
            }),
            4
        );
        assert!(!p.push(&[9; 10]), "held slots are not free");
        for (i, (ptr, len)) in kept.iter().enumerate() {
            // SAFETY: the records are held (not released), so still in the mapping, unchanged.
            let d = unsafe { std::slice::from_raw_parts(*ptr, *len) };
            assert_eq!(d[0], i as u8 ^ 0xff);
            assert!(d[1..].iter().all(|&x| x == i as u8));
        }
        c.release();
        assert!(p.push(&[9; 10]), "released: room again");
        p.publish();
        let mut got = Vec::new();
        assert_eq!(c.pop_batch(4, |d| got.push(d.to_vec())), 1);
        assert_eq!(got, vec![vec![9u8; 10]]);
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn rings_and_doorbells_are_for_their_owner_only() {
        // Whatever the umask: a ring holds the appliance's traffic, passwords included.
        let d = dir("mode");
        let path = d.join("r.ring");
        let bell_path = d.join("r.bell");
        let _c = Consumer::create(&path, 8, 64).expect("create");
        let _bell = Doorbell::bind(&bell_path).expect("bell");
        for p in [&path, &bell_path] {
            let mode = fs::metadata(p).expect("stat").mode() & 0o7777;
            assert_eq!(mode, 0o600, "{}: {mode:o}", p.display());
        }
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn a_sleeping_consumer_is_woken_once_and_a_busy_one_never() {
        let d = dir("sleep");
        let path = d.join("r.ring");
        let bell_path = d.join("r.bell");
        let c = Consumer::create(&path, 16, 64).expect("create");
        let bell = Doorbell::bind(&bell_path).expect("bell");
        let mut p = Producer::open(&path).expect("open");
        assert!(p.push(b"a"));
        assert!(!p.publish(), "awake consumer: no doorbell");
        assert!(!c.prepare_sleep(), "data waiting: do not sleep");
        let mut c = c;
        c.pop_batch(16, |_| {});
        assert!(c.prepare_sleep());
        assert!(p.push(b"b"));
        assert!(p.publish(), "sleeping consumer: ring the bell");
        let tx = UnixDatagram::unbound().expect("socket");
        ring(&tx, &bell_path);
        let mut poller = crate::poll::Poller::new(&[bell.as_raw_fd()]);
        assert_eq!(poller.wait(1000).expect("poll"), &[true]);
        bell.drain();
        c.awake();
        assert!(p.push(b"c"));
        assert!(!p.publish(), "the flag was cleared: one doorbell per sleep");
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn two_processes_worth_of_threads_move_a_million_datagrams() {
        let d = dir("threads");
        let path = d.join("r.ring");
        let mut c = Consumer::create(&path, 256, 64).expect("create");
        let p = Producer::open(&path).expect("open");
        const N: u64 = 1_000_000;
        let t = std::thread::spawn(move || {
            let mut p = p;
            let mut i = 0u64;
            while i < N {
                if p.push(&i.to_le_bytes()) {
                    i += 1;
                    if i.is_multiple_of(32) {
                        p.publish();
                    }
                } else {
                    p.publish();
                    std::thread::yield_now();
                }
            }
            p.publish();
        });
        let mut next = 0u64;
        while next < N {
            let n = c.pop_batch(64, |d| {
                let v = u64::from_le_bytes(d.try_into().expect("8 bytes"));
                assert_eq!(v, next);
                next += 1;
            });
            if n == 0 {
                std::thread::yield_now();
            }
        }
        t.join().expect("producer");
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn a_replaced_ring_is_noticed_and_garbage_is_refused() {
        let d = dir("replace");
        let path = d.join("r.ring");
        let c1 = Consumer::create(&path, 8, 64).expect("create");
        let mut p = Producer::open(&path).expect("open");
        assert!(p.is_current(Instant::now() + RECHECK));
        drop(c1);
        let _c2 = Consumer::create(&path, 8, 64).expect("create again");
        assert!(!p.is_current(Instant::now() + RECHECK * 2));
        fs::write(d.join("junk.ring"), vec![7u8; 4096]).expect("write");
        assert!(Producer::open(&d.join("junk.ring")).is_err());
        fs::write(d.join("short.ring"), [1u8; 10]).expect("write");
        assert!(Producer::open(&d.join("short.ring")).is_err());
        assert!(Consumer::create(&d.join("bad.ring"), 0, 64).is_err());
        let _ = fs::remove_dir_all(&d);
    }

    /// A deterministic xorshift64 (no crates for tests' randomness).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// The content of record `seq` of `len` bytes: every byte depends on both, so a record
    /// cut short, shifted or swapped with another shows.
    fn pattern(seq: u64, len: usize) -> Vec<u8> {
        (0..len)
            .map(|j| (seq.wrapping_mul(131) as usize).wrapping_add(j * 7 + j / 251) as u8)
            .collect()
    }

    #[test]
    fn multi_slot_records_of_assorted_sizes_round_trip() {
        let d = dir("sizes");
        let path = d.join("r.ring");
        let mut c = Consumer::create(&path, DEFAULT_SLOTS, DEFAULT_SLOT_SIZE).expect("create");
        let mut p = Producer::open(&path).expect("open");
        assert_eq!(
            p.max_len(),
            (DEFAULT_SLOTS * DEFAULT_SLOT_SIZE / 4) as usize - SLOT_HEADER
        );
        let slot = DEFAULT_SLOT_SIZE as usize;
        let sizes = [
            1,
            slot - SLOT_HEADER,
            slot - SLOT_HEADER + 1,
            3 * slot - SLOT_HEADER,
            3 * slot,
            65_600,
            0,
            65_600,
        ];
        // Three times round the ring, with padding before a record at the wraps.
        for round in 0..40u64 {
            for (i, &len) in sizes.iter().enumerate() {
                assert!(
                    p.push(&pattern(round * 10 + i as u64, len)),
                    "{round}: {len}"
                );
            }
            p.publish();
            let mut got = Vec::new();
            while c.pop_batch(3, |d| got.push(d.to_vec())) > 0 {}
            assert!(c.is_empty());
            let want: Vec<Vec<u8>> = sizes
                .iter()
                .enumerate()
                .map(|(i, &len)| pattern(round * 10 + i as u64, len))
                .collect();
            assert!(got == want, "round {round}");
        }
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn random_records_wrap_a_small_ring_many_times() {
        let d = dir("wrap");
        let path = d.join("r.ring");
        let mut c = Consumer::create(&path, 16, 256).expect("create");
        let mut p = Producer::open(&path).expect("open");
        assert_eq!(p.max_len(), 16 * 256 / 4 - SLOT_HEADER);
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut queued = std::collections::VecDeque::new();
        let (mut sent, mut seq) = (0u64, 0u64);
        while sent < 20_000 {
            // Push until the ring refuses (or a few records), sizes from empty to max_len,
            // one-slot records as often as the rest.
            for _ in 0..1 + rng.below(6) {
                let len = match rng.below(4) {
                    0 => rng.below(253),
                    1 => 252 + rng.below(3),
                    _ => rng.below(p.max_len() + 1),
                };
                if !p.push(&pattern(seq, len)) {
                    break;
                }
                queued.push_back((seq, len));
                seq += 1;
            }
            p.publish();
            let max = 1 + rng.below(4);
            let mut got = 0;
            let n = c.pop_batch(max, |d| {
                let (s, len) = queued.pop_front().expect("a record we sent");
                assert_eq!(d.len(), len, "record {s}");
                assert!(d == pattern(s, len).as_slice(), "record {s}");
                got += 1;
            });
            assert_eq!(n, got);
            assert!(n <= max);
            sent += n as u64;
        }
        while c.pop_batch(64, |d| {
            let (s, len) = queued.pop_front().expect("a record we sent");
            assert!(d == pattern(s, len).as_slice(), "record {s}");
        }) > 0
        {}
        assert!(queued.is_empty());
        // Far more slots than the ring has went through it.
        assert!(p.head > 200 * 16, "head {}", p.head);
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn multi_slot_records_are_refused_when_full_or_too_large() {
        let d = dir("full");
        let path = d.join("r.ring");
        let mut c = Consumer::create(&path, 16, 256).expect("create");
        let mut p = Producer::open(&path).expect("open");
        let three = 2 * 256; // 3 slots with the length
        for i in 0..5 {
            assert!(p.push(&pattern(i, three)), "record {i}");
        }
        assert!(!p.push(&pattern(5, three)), "15 of 16 slots used");
        assert!(p.push(&pattern(5, 10)), "the last slot takes a small one");
        assert!(!p.push(&[1]), "full");
        p.publish();
        let mut got = Vec::new();
        assert_eq!(c.pop_batch(1, |d| got.push(d.to_vec())), 1);
        assert!(p.push(&pattern(6, three)), "room again for 3 slots");
        p.publish();
        assert_eq!(c.pop_batch(100, |d| got.push(d.to_vec())), 6);
        let want: Vec<Vec<u8>> = (0..5)
            .map(|i| pattern(i, three))
            .chain([pattern(5, 10), pattern(6, three)])
            .collect();
        assert!(got == want);

        // Head at slot 3 now, the ring empty. Up to slot 14, then 5 slots free: enough for a
        // 4-slot record, but not for it and the 2 slots of padding it needs at the end.
        for i in 0..11 {
            assert!(p.push(&[i]));
        }
        assert_eq!(p.head % 16, 14);
        assert!(!p.push(&pattern(7, 3 * 256)), "padding counts");
        assert!(
            p.push(&pattern(8, 20)),
            "a one-slot record needs no padding"
        );
        p.publish();
        assert_eq!(c.pop_batch(100, |_| {}), 12);
        assert!(
            p.push(&pattern(9, three)),
            "after a slot of padding, at slot 0"
        );
        assert_eq!(p.head % 16, 3);
        p.publish();
        got.clear();
        assert_eq!(c.pop_batch(100, |d| got.push(d.to_vec())), 1);
        assert!(got == [pattern(9, three)]);

        let max = p.max_len();
        assert!(!p.push(&vec![0; max + 1]), "longer than max_len");
        assert!(!p.push_with(100_000, |_| panic!("fill of a refused record")));
        assert!(
            p.push(&pattern(10, max)),
            "max_len itself fits an empty ring"
        );
        p.publish();
        got.clear();
        assert_eq!(c.pop_batch(100, |d| got.push(d.to_vec())), 1);
        assert!(got == [pattern(10, max)]);
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn push_with_builds_the_record_in_place() {
        let d = dir("inplace");
        let path = d.join("r.ring");
        let mut c = Consumer::create(&path, 64, 256).expect("create");
        let mut p = Producer::open(&path).expect("open");
        for (i, len) in [0usize, 5, 252, 1000, 4000].into_iter().enumerate() {
            let mut seen = None;
            assert!(p.push_with(len, |b| {
                seen = Some(b.len());
                b.copy_from_slice(&pattern(i as u64, len));
            }));
            assert_eq!(seen, Some(len), "fill gets exactly len bytes");
        }
        // The bytes fill wrote are the ring's: the record sits in the mapping.
        let first = p.map.slot(p.map.index(p.head - 16));
        // SAFETY: the slot area of a ring this test owns; the last record (4000 bytes) took the
        // 16 slots before head, and nothing writes it concurrently.
        let in_ring = unsafe { std::slice::from_raw_parts(first, 4004) };
        assert_eq!(&in_ring[..4], &4000u32.to_ne_bytes());
        assert!(in_ring[4..] == pattern(4, 4000));
        p.publish();
        let mut got = Vec::new();
        assert_eq!(c.pop_batch(100, |d| got.push(d.to_vec())), 5);
        let want: Vec<Vec<u8>> = [0usize, 5, 252, 1000, 4000]
            .into_iter()
            .enumerate()
            .map(|(i, len)| pattern(i as u64, len))
            .collect();
        assert!(got == want);
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn threads_move_records_of_mixed_sizes() {
        let d = dir("mixed");
        let path = d.join("r.ring");
        let mut c = Consumer::create(&path, 128, 256).expect("create");
        let p = Producer::open(&path).expect("open");
        const N: u64 = 200_000;
        const SEED: u64 = 0x2545_f491_4f6c_dd1d;
        // Both ends draw the same sizes: the consumer knows each record's length.
        fn size(rng: &mut Rng, max: usize) -> usize {
            match rng.below(8) {
                0 => rng.below(max + 1),
                1 => 256 + rng.below(1024),
                _ => 8 + rng.below(245),
            }
        }
        let max = p.max_len();
        let t = std::thread::spawn(move || {
            let mut p = p;
            let mut rng = Rng(SEED);
            let mut i = 0u64;
            let mut len = size(&mut rng, max);
            while i < N {
                let pushed = p.push_with(len, |b| {
                    b.fill((i as u8).wrapping_mul(3));
                    if len >= 8 {
                        b[..8].copy_from_slice(&i.to_le_bytes());
                    }
                });
                if pushed {
                    i += 1;
                    len = size(&mut rng, max);
                    if i.is_multiple_of(16) {
                        p.publish();
                    }
                } else {
                    p.publish();
                    std::thread::yield_now();
                }
            }
            p.publish();
        });
        let mut rng = Rng(SEED);
        let mut next = 0u64;
        while next < N {
            let n = c.pop_batch(32, |d| {
                assert_eq!(d.len(), size(&mut rng, max), "record {next}");
                let fill = (next as u8).wrapping_mul(3);
                if d.len() >= 8 {
                    assert_eq!(d[..8], next.to_le_bytes());
                    assert!(d[8..].iter().all(|b| *b == fill), "record {next}");
                } else {
                    assert!(d.iter().all(|b| *b == fill), "record {next}");
                }
                next += 1;
            });
            if n == 0 {
                std::thread::yield_now();
            }
        }
        t.join().expect("producer");
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn a_corrupt_ring_is_skipped_not_read_outside() {
        let d = dir("corrupt");
        let path = d.join("r.ring");
        let mut c = Consumer::create(&path, 16, 256).expect("create");
        let mut p = Producer::open(&path).expect("open");
        let poke = |c: &Consumer, idx: usize, v: u32| {
            // SAFETY: the first bytes of a slot of the test's own ring; the producer is idle.
            unsafe { c.map.slot(idx).cast::<u32>().write_unaligned(v) }
        };
        // A length past the end of the slot area, one past head but inside the area, padding
        // past head, and a huge one: each time nothing is delivered, the consumer catches up
        // with head, and the ring keeps working.
        for (at, bad) in [(13, 10_000), (0, 600), (5, PADDING), (2, 0x7fff_fff0)] {
            while p.head % 16 != at {
                assert!(p.push(b"x"));
            }
            p.publish();
            c.pop_batch(100, |_| {});
            assert!(p.push(&[7; 100]));
            p.publish();
            poke(&c, at as usize, bad);
            let mut got = 0;
            assert_eq!(c.pop_batch(100, |_| got += 1), 0, "at {at}: {bad}");
            assert_eq!(got, 0);
            assert!(c.is_empty());
            assert_eq!(c.map.atomic64(TAIL).load(Ordering::SeqCst), p.head);
            assert!(p.push(b"fine"));
            p.publish();
            let mut got = Vec::new();
            assert_eq!(c.pop_batch(100, |d| got.push(d.to_vec())), 1);
            assert_eq!(got, [b"fine".to_vec()]);
        }

        // A record that claims more than was published: the record before it still arrives.
        assert!(p.push(b"good"));
        assert!(p.push(b"bad"));
        p.publish();
        poke(&c, ((p.head - 1) % 16) as usize, 300);
        let mut got = Vec::new();
        assert_eq!(c.pop_batch(100, |d| got.push(d.to_vec())), 1);
        assert_eq!(got, [b"good".to_vec()]);
        assert!(c.is_empty());

        // A head that runs more than a ring ahead of tail, or behind it.
        for head in [c.tail + 17, c.tail.wrapping_sub(1)] {
            c.map.atomic64(HEAD).store(head, Ordering::SeqCst);
            assert_eq!(c.pop_batch(100, |_| panic!("delivered garbage")), 0);
            assert_eq!(c.tail, head);
        }
        let _ = fs::remove_dir_all(&d);
    }
}
