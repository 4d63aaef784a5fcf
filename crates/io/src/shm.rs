//! Shared-memory rings between units on the same machine: the backplane without a syscall per
//! packet (memif's idea: a single-producer single-consumer ring of fixed slots in a shared file,
//! plus a doorbell for a consumer that went to sleep).
//!
//! A ring is a file (on tmpfs: the appliance's run directory) that the *consumer* creates and
//! both ends map. Layout: a header (magic, slot count and size, then `head`, `tail` and
//! `sleeping`, each on its own cache line), then `slots` slots of `slot_size` bytes, each a
//! `u32` length and the datagram.
//!
//! - The producer writes slots past `head`, then publishes the new `head` (one store per
//!   batch, on [`Producer::publish`]). It never waits: a full ring or a datagram larger than a
//!   slot is refused and the caller sends it another way or counts a drop.
//! - The consumer reads slots from `tail` to `head` and stores the new `tail` once per batch.
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
use std::os::unix::fs::MetadataExt;
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
/// Bytes of a slot before the datagram: its length.
const SLOT_HEADER: usize = 4;

/// Default slots per ring and slot size: 1024 slots of 2 KiB (2 MiB a ring) hold a frame of the
/// lab's 1500-byte MTU with its GENEVE header, and several batches in flight.
pub const DEFAULT_SLOTS: u32 = 1024;
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

    /// Slot `i mod slots` as a raw pointer to `slot_size` bytes.
    fn slot(&self, i: u64) -> *mut u8 {
        let idx = (i % u64::from(self.slots)) as usize;
        // SAFETY: SLOTS_AT + slots * slot_size == len (validated on map), so the slot is inside.
        unsafe {
            self.base
                .as_ptr()
                .add(SLOTS_AT + idx * self.slot_size as usize)
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
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
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

    /// Deliver up to `max` datagrams to `f`, in order. Returns how many.
    pub fn pop_batch(&mut self, max: usize, mut f: impl FnMut(&[u8])) -> usize {
        let head = self.map.atomic64(HEAD).load(Ordering::Acquire);
        let avail = head.wrapping_sub(self.tail).min(u64::from(self.map.slots)) as usize;
        let n = avail.min(max);
        for _ in 0..n {
            let slot = self.map.slot(self.tail);
            // SAFETY: slots from tail to head were published by the producer (Acquire above)
            // and are not rewritten until we advance `tail`; a length is clamped to the slot.
            let data = unsafe {
                let len = (slot.cast::<u32>().read_unaligned() as usize)
                    .min(self.map.slot_size as usize - SLOT_HEADER);
                std::slice::from_raw_parts(slot.add(SLOT_HEADER), len)
            };
            f(data);
            self.tail = self.tail.wrapping_add(1);
        }
        if n > 0 {
            self.map.atomic64(TAIL).store(self.tail, Ordering::Release);
        }
        n
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
        })
    }

    /// Copy `data` into the next slot (not yet visible to the consumer). False: the ring is
    /// full or `data` is larger than a slot.
    pub fn push(&mut self, data: &[u8]) -> bool {
        if data.len() > self.map.slot_size as usize - SLOT_HEADER {
            return false;
        }
        if self.head.wrapping_sub(self.tail) >= u64::from(self.map.slots) {
            self.tail = self.map.atomic64(TAIL).load(Ordering::Acquire);
            if self.head.wrapping_sub(self.tail) >= u64::from(self.map.slots) {
                return false;
            }
        }
        let slot = self.map.slot(self.head);
        // SAFETY: the slot at head is ours until published (the consumer stops at the published
        // head, and tail shows it has read the slot's previous content); len fits the slot.
        unsafe {
            slot.cast::<u32>().write_unaligned(data.len() as u32);
            std::ptr::copy_nonoverlapping(data.as_ptr(), slot.add(SLOT_HEADER), data.len());
        }
        self.head = self.head.wrapping_add(1);
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
        assert!(!p.push(&[0; 61]), "larger than a slot");
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
}
