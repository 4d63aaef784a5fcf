//! AF_XDP driver: an XDP program hands every frame of each of the interface's receive queues
//! to that queue's AF_XDP socket, whose rings live in memory shared with the kernel.
//!
//! Memory: one UMEM (anonymous mmap) cut into `frame_size` chunks. The first `rx_frames`
//! chunks belong to receive, the rest to transmit, and a chunk never changes sides:
//! - RX: chunks circulate fill ring → kernel (copies a frame in) → RX ring → the caller's
//!   callback, which borrows the frame in place → back on the fill ring at the end of the
//!   batch. The fill ring is larger than the number of RX chunks, so returning them always
//!   fits.
//! - TX: `tx` copies the frame into a free chunk and queues a descriptor; `flush` publishes
//!   the queued descriptors and kicks the kernel with `sendto(MSG_DONTWAIT)` when the ring asks
//!   for it (XDP_RING_NEED_WAKEUP; always, in copy mode). The kernel returns sent chunks on the
//!   completion ring and we put them back on the free list.
//!
//! The socket is bound in copy mode (XDP_COPY): veth, the lab's only device, has no
//! zero-copy support (EOPNOTSUPP), and copy mode works on every driver. The program is
//! attached natively when the driver allows it and in generic (skb) mode otherwise.
//!
//! What AF_XDP does not carry: checksum status and a stripped VLAN tag. A veth peer that
//! leaves L4 checksums to offload (CHECKSUM_PARTIAL, the default) hands us frames with partial
//! checksums and no mark; on a veth every frame is therefore flagged `csum_unknown`, and the
//! dispatcher verifies and completes. (XDP on a veth also turns its peer's segmentation
//! offloads off, so no super-packet ever reaches this driver.) Frames longer than a chunk minus the
//! kernel's headroom are dropped by the kernel (counted in `rx_dropped`).
//!
//! Every receive queue gets its own socket and UMEM (a real NIC spreads flows over its
//! queues by RSS; a frame on a queue without a socket would reach the kernel stack unseen), and
//! the program redirects by `rx_queue_index`. One thread serves them all: `rx_batch` takes
//! turns between the queues, `poll_fds` lists every socket, and frames are sent through the
//! first queue's socket.
//!
//! Lanes ([`AfXdp::into_lanes`]): the queues' sockets split between several `AfXdp`s, one per
//! data-path thread, queue q to lane q % lanes. The device's receive-side scaling then decides
//! which lane sees a flow; each lane transmits through its own first socket.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use crate::bpf::XdpProgram;
use crate::{netif, sys, FrameIo, IoError, Offload, RxMeta};

pub use crate::bpf::XdpMode;

// Kernel ABI (include/uapi/linux/if_xdp.h).
const AF_XDP: libc::c_int = 44;
const SOL_XDP: libc::c_int = 283;
const XDP_MMAP_OFFSETS: libc::c_int = 1;
const XDP_RX_RING: libc::c_int = 2;
const XDP_TX_RING: libc::c_int = 3;
const XDP_UMEM_REG: libc::c_int = 4;
const XDP_UMEM_FILL_RING: libc::c_int = 5;
const XDP_UMEM_COMPLETION_RING: libc::c_int = 6;
const XDP_STATISTICS: libc::c_int = 7;
const XDP_COPY: u16 = 1 << 1;
const XDP_USE_NEED_WAKEUP: u16 = 1 << 3;
const XDP_RING_NEED_WAKEUP: u32 = 1;
const XDP_PGOFF_RX_RING: libc::off_t = 0;
const XDP_PGOFF_TX_RING: libc::off_t = 0x8000_0000;
const XDP_UMEM_PGOFF_FILL_RING: libc::off_t = 0x1_0000_0000;
const XDP_UMEM_PGOFF_COMPLETION_RING: libc::off_t = 0x1_8000_0000;
/// include/uapi/asm-generic/socket.h, newer than some libc versions.
const SO_PREFER_BUSY_POLL: libc::c_int = 69;
const SO_BUSY_POLL_BUDGET: libc::c_int = 70;
/// Room the kernel keeps in front of every received frame (XDP_PACKET_HEADROOM).
const XDP_PACKET_HEADROOM: usize = 256;

/// Whether the XDP program was compiled into this build (clang was there); without it
/// [`AfXdp::open`] fails with [`IoError::XdpNotBuilt`].
pub const BUILT: bool = crate::bpf::XDP_OBJECT.is_some();

/// Ethernet header: the shortest frame worth sending.
const MIN_TX_FRAME: usize = 14;

#[repr(C)]
#[derive(Default)]
struct UmemReg {
    addr: u64,
    len: u64,
    chunk_size: u32,
    headroom: u32,
    flags: u32,
    tx_metadata_len: u32,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct RingOffset {
    producer: u64,
    consumer: u64,
    desc: u64,
    flags: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct MmapOffsets {
    rx: RingOffset,
    tx: RingOffset,
    fr: RingOffset,
    cr: RingOffset,
}

#[repr(C)]
struct SockaddrXdp {
    family: u16,
    flags: u16,
    ifindex: u32,
    queue_id: u32,
    shared_umem_fd: u32,
}

/// `struct xdp_desc`: an RX or TX descriptor.
#[repr(C)]
#[derive(Clone, Copy)]
struct XdpDesc {
    addr: u64,
    len: u32,
    options: u32,
}

#[repr(C)]
#[derive(Default)]
struct XdpStatistics {
    rx_dropped: u64,
    rx_invalid_descs: u64,
    tx_invalid_descs: u64,
    rx_ring_full: u64,
    rx_fill_ring_empty_descs: u64,
    tx_ring_empty_descs: u64,
}

/// Sizes for [`AfXdp::open`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AfXdpConfig {
    /// UMEM chunk size: 2048 or 4096. A received frame must fit in it after the kernel's 256
    /// bytes of headroom.
    pub frame_size: u32,
    /// Entries of the RX, TX and completion rings (a power of two). The fill ring gets twice
    /// as many, so it always has room for every RX chunk.
    pub ring_size: u32,
    /// Chunks lent to the kernel for receiving (at most `ring_size`).
    pub rx_frames: u32,
    /// Chunks for transmitting (at most `ring_size`): how many frames may be queued or in
    /// flight before `tx` reports `WouldBlock`.
    pub tx_frames: u32,
    /// Attach modes to try, in order.
    pub modes: Vec<XdpMode>,
    /// Busy polling (0: off): each socket gets SO_PREFER_BUSY_POLL, SO_BUSY_POLL of this many
    /// microseconds and a budget of one batch, and a receive that finds its ring empty asks
    /// the kernel to run the device's NAPI poll right away in our context (`recvfrom`)
    /// instead of waiting for the softirq. Trades a spinning core for latency.
    pub busy_poll_us: u32,
}

impl Default for AfXdpConfig {
    fn default() -> Self {
        AfXdpConfig {
            frame_size: 2048,
            ring_size: 2048,
            rx_frames: 2048,
            tx_frames: 2048,
            modes: vec![XdpMode::Native, XdpMode::Generic],
            busy_poll_us: 0,
        }
    }
}

impl AfXdpConfig {
    /// Check the values the kernel (or the ring arithmetic) would reject.
    pub fn validate(&self) -> Result<(), IoError> {
        let bad = |field, value: u32, reason| {
            Err(IoError::InvalidConfig {
                field,
                value: value as usize,
                reason,
            })
        };
        if self.frame_size != 2048 && self.frame_size != 4096 {
            return bad("frame_size", self.frame_size, "must be 2048 or 4096");
        }
        if !self.ring_size.is_power_of_two() || !(64..=1 << 16).contains(&self.ring_size) {
            return bad(
                "ring_size",
                self.ring_size,
                "must be a power of two in 64..=65536",
            );
        }
        if self.rx_frames == 0 || self.rx_frames > self.ring_size {
            return bad("rx_frames", self.rx_frames, "must be in 1..=ring_size");
        }
        if self.tx_frames == 0 || self.tx_frames > self.ring_size {
            return bad("tx_frames", self.tx_frames, "must be in 1..=ring_size");
        }
        if self.modes.is_empty() {
            return bad("modes", 0, "must name at least one attach mode");
        }
        Ok(())
    }

    fn fill_size(&self) -> u32 {
        self.ring_size * 2
    }

    fn umem_len(&self) -> usize {
        (self.rx_frames as usize + self.tx_frames as usize) * self.frame_size as usize
    }
}

/// Counters of one [`AfXdp`]. The kernel's come from XDP_STATISTICS, which counts from the
/// socket's creation (reading does not reset them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AfXdpStats {
    /// Frames delivered to the caller.
    pub rx_packets: u64,
    /// Frames the kernel accepted from us (their chunks came back on the completion ring).
    pub tx_packets: u64,
    /// Frames the kernel dropped for lack of a fill-ring chunk or because they were longer than
    /// a chunk.
    pub rx_dropped: u64,
    /// Frames the kernel dropped because the RX ring was full (we were too slow).
    pub rx_ring_full: u64,
    /// Times the kernel found the fill ring empty.
    pub rx_fill_ring_empty_descs: u64,
    /// Descriptors the kernel rejected on the TX ring (never expected: we write them).
    pub tx_invalid_descs: u64,
    /// RX descriptors pointing outside the UMEM, skipped (never expected).
    pub rx_invalid_descs: u64,
}

impl AfXdpStats {
    /// Frames lost on the way in, in the sense of AF_PACKET's ring drops.
    pub fn drops(&self) -> u64 {
        self.rx_dropped + self.rx_ring_full
    }
}

/// One mmap'ed ring: producer and consumer indices, flags, and `size` descriptors of `T`.
/// The side we own (producer for fill/TX, consumer for RX/completion) is kept locally in
/// `head` and published with Release; the kernel's side is read with Acquire.
struct Ring<T> {
    map: NonNull<u8>,
    map_len: usize,
    producer: NonNull<AtomicU32>,
    consumer: NonNull<AtomicU32>,
    flags: NonNull<AtomicU32>,
    desc: NonNull<T>,
    mask: u32,
    /// Our index: next slot to produce into (producer rings) or consume from (consumer rings).
    head: u32,
    /// Last seen kernel index (consumer for producer rings, producer for consumer rings).
    seen: u32,
}

impl<T: Copy> Ring<T> {
    /// Map ring `pgoff` of socket `fd` with `size` entries at the kernel's offsets `off`.
    fn map(fd: RawFd, pgoff: libc::off_t, off: RingOffset, size: u32) -> io::Result<Ring<T>> {
        let map_len = off.desc as usize + size as usize * size_of::<T>();
        // SAFETY: no address hint; a fresh shared mapping of the socket's ring, which the kernel
        // sized with the setsockopt that preceded this.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd,
                pgoff,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave 0"))?;
        let at = |o: u64| {
            // SAFETY: the kernel's offsets lie inside the mapping it sized for this ring.
            unsafe { base.add(o as usize) }
        };
        let mut ring = Ring {
            map: base,
            map_len,
            producer: at(off.producer).cast(),
            consumer: at(off.consumer).cast(),
            flags: at(off.flags).cast(),
            desc: at(off.desc).cast(),
            mask: size - 1,
            head: 0,
            seen: 0,
        };
        // Rings start empty, but read the indices rather than assume it.
        ring.head = ring.producer().load(Ordering::Relaxed);
        ring.seen = ring.head;
        Ok(ring)
    }

    fn producer(&self) -> &AtomicU32 {
        // SAFETY: a 4-byte aligned u32 inside the mapping, shared with the kernel (hence atomic);
        // the reference cannot outlive `&self`, which keeps the mapping.
        unsafe { self.producer.as_ref() }
    }

    fn consumer(&self) -> &AtomicU32 {
        // SAFETY: as for `producer`.
        unsafe { self.consumer.as_ref() }
    }

    fn needs_wakeup(&self) -> bool {
        // SAFETY: as for `producer`.
        unsafe { self.flags.as_ref() }.load(Ordering::Relaxed) & XDP_RING_NEED_WAKEUP != 0
    }

    fn slot(&self, index: u32) -> *mut T {
        // SAFETY: masked index < size, so the pointer stays inside the descriptor array.
        unsafe { self.desc.as_ptr().add((index & self.mask) as usize) }
    }

    fn read(&self, index: u32) -> T {
        // SAFETY: the slot is in the mapping (see `slot`) and, for a consumer ring, between our
        // consumer and the producer we loaded with Acquire, so the kernel finished writing it.
        unsafe { std::ptr::read_volatile(self.slot(index)) }
    }

    fn write(&mut self, index: u32, value: T) {
        // SAFETY: the slot is in the mapping and, for a producer ring, between the producer we
        // own and the kernel's consumer, so the kernel does not read it until we publish.
        unsafe { std::ptr::write_volatile(self.slot(index), value) }
    }

    /// Producer ring: free slots, refreshing the kernel's consumer only when needed.
    fn free(&mut self, want: u32) -> u32 {
        let size = self.mask + 1;
        let mut free = size - self.head.wrapping_sub(self.seen);
        if free < want {
            self.seen = self.consumer().load(Ordering::Acquire);
            free = size - self.head.wrapping_sub(self.seen);
        }
        free
    }

    /// Producer ring: make slots up to `head` visible to the kernel.
    fn publish(&self) {
        self.producer().store(self.head, Ordering::Release);
    }

    /// Consumer ring: entries the kernel has produced past our consumer.
    fn ready(&mut self) -> u32 {
        self.seen = self.producer().load(Ordering::Acquire);
        self.seen.wrapping_sub(self.head)
    }

    /// Consumer ring: give the slots up to `head` back to the kernel.
    fn release(&self) {
        self.consumer().store(self.head, Ordering::Release);
    }
}

impl<T> Drop for Ring<T> {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `Ring::map`; nothing borrowed from it outlives the
        // ring (descriptors are copied out, frames live in the UMEM).
        unsafe { libc::munmap(self.map.as_ptr().cast(), self.map_len) };
    }
}

/// The UMEM: frames shared with the kernel. Unmapped on drop, after the socket is closed.
struct Umem {
    base: NonNull<u8>,
    len: usize,
}

impl Drop for Umem {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `AfXdp::open`. The kernel pins its own reference
        // to the pages while the socket lives, and the socket is closed before (field order).
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// The AF_XDP sockets of one interface, one per receive queue (or a lane's share of them),
/// with the XDP program that feeds them.
pub struct AfXdp {
    // Field order is drop order: let go of the program before the sockets close. With one
    // lane that detaches it first. With several, the last lane to go detaches it, and an
    // earlier lane's sockets close under a program still attached: the kernel takes a closing
    // socket out of the XSKMAP, so the redirect of its queues misses and their frames go to the
    // kernel stack (XDP_PASS) until the last lane goes, as they would with no program at all.
    program: Arc<XdpProgram>,
    xsks: Vec<Xsk>,
    ifname: String,
    ifindex: u32,
    /// The socket the next receive batch starts with (turns rotate, so no queue starves).
    next: usize,
}

/// One AF_XDP socket bound to one queue, with its own UMEM.
struct Xsk {
    // Field order is drop order: unmap the rings, close the socket, free the UMEM last.
    fill: Ring<u64>,
    comp: Ring<u64>,
    rx: Ring<XdpDesc>,
    txr: Ring<XdpDesc>,
    fd: OwnedFd,
    umem: Umem,
    ifname: String,
    queue: u32,
    frame_mask: u64,
    frame_size: usize,
    busy_poll: bool,
    /// A veth: frames may carry partial checksums (see `RxMeta::csum_unknown`).
    csum_unknown: bool,
    /// TX chunks neither queued nor in flight.
    tx_free: Vec<u64>,
    /// TX descriptors written but not yet published (published on `flush`).
    tx_unpublished: u32,
    /// TX descriptors published, not yet completed.
    tx_in_flight: u32,
    rx_packets: u64,
    tx_packets: u64,
    rx_invalid_descs: u64,
}

// SAFETY: the rings and the UMEM are memory owned by this value alone, reached only through
// `&mut self` (or atomics for the indices); nothing is tied to the thread that mapped them.
unsafe impl Send for Xsk {}
// SAFETY: `&self` methods only read the socket's statistics through the fd and plain fields.
unsafe impl Sync for Xsk {}

impl AfXdp {
    /// Open an AF_XDP socket on every receive queue of `ifname` (copy mode), attach the XDP
    /// program that redirects every frame of a queue to its socket, and fill the fill rings.
    /// Needs CAP_NET_ADMIN and CAP_BPF (root). Fails if dva-io was built without clang
    /// ([`IoError::XdpNotBuilt`]), if the device has more queues than the program's map
    /// holds, or if the kernel refuses a step.
    pub fn open(ifname: &str, cfg: &AfXdpConfig) -> Result<AfXdp, IoError> {
        cfg.validate()?;
        let ifindex = netif::ifindex(ifname)?;
        if !BUILT {
            return Err(IoError::XdpNotBuilt);
        }
        let queues = netif::rx_queues(ifname)?;
        if queues > crate::bpf::MAX_QUEUES {
            return Err(IoError::Xdp {
                on: ifname.into(),
                reason: format!(
                    "the device has {queues} receive queues; the XDP program serves {}",
                    crate::bpf::MAX_QUEUES
                ),
            });
        }
        // Every queue gets a socket before the program is attached: a frame on a queue
        // without one would reach the kernel stack instead (XDP_PASS), unseen.
        let xsks = (0..queues as u32)
            .map(|q| Xsk::open(ifname, ifindex, q, cfg))
            .collect::<Result<Vec<_>, _>>()?;
        let bound: Vec<(u32, RawFd)> = xsks.iter().map(|x| (x.queue, x.fd.as_raw_fd())).collect();
        let program = Arc::new(XdpProgram::attach(ifname, ifindex, &bound, &cfg.modes)?);
        Ok(AfXdp {
            program,
            xsks,
            ifname: ifname.to_string(),
            ifindex,
            next: 0,
        })
    }

    /// [`AfXdp::open`] and [`AfXdp::into_lanes`], refusing before anything is attached when
    /// the device has fewer receive queues than `lanes`.
    pub fn open_lanes(
        ifname: &str,
        cfg: &AfXdpConfig,
        lanes: usize,
    ) -> Result<Vec<AfXdp>, IoError> {
        cfg.validate()?;
        if lanes != 1 {
            check_lanes(ifname, netif::rx_queues(ifname)?, lanes)?;
        }
        AfXdp::open(ifname, cfg)?.into_lanes(lanes)
    }

    /// Split the sockets into `lanes` drivers, one per data-path thread: lane i gets the
    /// sockets of the queues q with q % lanes == i and transmits through the first of them. The
    /// XDP program stays attached until the last lane is dropped. Fails (dropping everything)
    /// if there are fewer queues than lanes: a lane without a queue would receive nothing.
    pub fn into_lanes(self, lanes: usize) -> Result<Vec<AfXdp>, IoError> {
        check_lanes(&self.ifname, self.xsks.len(), lanes)?;
        let AfXdp {
            program,
            xsks,
            ifname,
            ifindex,
            next: _,
        } = self;
        let mut split: Vec<Vec<Xsk>> = (0..lanes).map(|_| Vec::new()).collect();
        for x in xsks {
            split[x.queue as usize % lanes].push(x);
        }
        Ok(split
            .into_iter()
            .map(|xsks| AfXdp {
                program: Arc::clone(&program),
                xsks,
                ifname: ifname.clone(),
                ifindex,
                next: 0,
            })
            .collect())
    }

    /// The receive queues this driver serves, in order.
    pub fn queue_ids(&self) -> Vec<u32> {
        self.xsks.iter().map(|x| x.queue).collect()
    }

    /// The interface these sockets are bound to.
    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// The kernel index of that interface.
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// How the XDP program ended up attached.
    pub fn mode(&self) -> XdpMode {
        self.program.mode()
    }

    /// Receive queues served (one socket each).
    pub fn queues(&self) -> usize {
        self.xsks.len()
    }

    /// The first queue's socket (the one that transmits), to poll(2) for readability; see
    /// [`FrameIo::poll_fds`] for all of them.
    pub fn as_raw_fd(&self) -> RawFd {
        self.xsks[0].fd.as_raw_fd()
    }

    /// Frames queued by `tx` or handed to the kernel and not yet completed.
    pub fn tx_pending(&self) -> usize {
        self.xsks.iter().map(Xsk::tx_pending).sum()
    }

    /// Frames received on each queue, in queue order.
    pub fn rx_per_queue(&self) -> Vec<u64> {
        self.xsks.iter().map(|x| x.rx_packets).collect()
    }

    /// Our counters and the kernel's XDP_STATISTICS, summed over the queues.
    pub fn stats(&self) -> AfXdpStats {
        let mut t = AfXdpStats::default();
        for x in &self.xsks {
            let s = x.stats();
            t.rx_packets += s.rx_packets;
            t.tx_packets += s.tx_packets;
            t.rx_dropped += s.rx_dropped;
            t.rx_ring_full += s.rx_ring_full;
            t.rx_fill_ring_empty_descs += s.rx_fill_ring_empty_descs;
            t.tx_invalid_descs += s.tx_invalid_descs;
            t.rx_invalid_descs += s.rx_invalid_descs;
        }
        t
    }
}

/// Refuse `lanes` lanes over `queues` receive queues unless each lane gets one.
fn check_lanes(ifname: &str, queues: usize, lanes: usize) -> Result<(), IoError> {
    if lanes == 0 {
        return Err(IoError::InvalidConfig {
            field: "lanes",
            value: 0,
            reason: "must be at least 1",
        });
    }
    if queues < lanes {
        let s = if queues == 1 { "" } else { "s" };
        return Err(IoError::Xdp {
            on: ifname.into(),
            reason: format!(
                "the device has {queues} receive queue{s}; {lanes} dispatcher threads need one \
                 each (`ethtool -L` or a veth made with numrxqueues)"
            ),
        });
    }
    Ok(())
}

impl FrameIo for AfXdp {
    fn rx_batch<F: FnMut(&[u8], RxMeta)>(&mut self, max: usize, mut f: F) -> io::Result<usize> {
        let n = self.xsks.len();
        let mut delivered = 0;
        for k in 0..n {
            if delivered >= max {
                break;
            }
            let i = (self.next + k) % n;
            delivered += self.xsks[i].rx_batch(max - delivered, &mut f)?;
        }
        self.next = (self.next + 1) % n;
        Ok(delivered)
    }

    /// Transmits through the first queue's socket: which queue a frame leaves by does not
    /// matter to the wire, and one TX pool keeps `WouldBlock` meaningful.
    fn tx(&mut self, frame: &[u8]) -> io::Result<()> {
        self.xsks[0].tx(frame)
    }

    fn tx_with(
        &mut self,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> Option<Offload>,
    ) -> io::Result<()> {
        self.xsks[0].tx_with(len, fill)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.xsks[0].flush()
    }

    fn as_raw_fd(&self) -> RawFd {
        self.xsks[0].fd.as_raw_fd()
    }

    fn poll_fds(&self) -> Vec<RawFd> {
        self.xsks.iter().map(|x| x.fd.as_raw_fd()).collect()
    }
}

impl Xsk {
    fn open(ifname: &str, ifindex: u32, queue: u32, cfg: &AfXdpConfig) -> Result<Xsk, IoError> {
        // The kernel drops longer frames (rx_dropped); better to stay on AF_PACKET than to
        // lose every full-size frame.
        let mtu = netif::mtu(ifname)? as usize;
        let room = cfg.frame_size as usize - XDP_PACKET_HEADROOM;
        if mtu + 18 > room {
            return Err(IoError::Xdp {
                on: ifname.into(),
                reason: format!(
                    "MTU {mtu} does not fit a {}-byte frame ({room} bytes after the headroom)",
                    cfg.frame_size
                ),
            });
        }
        let err = |call| move |e| IoError::syscall(call, ifname, e);

        let umem_len = cfg.umem_len();
        // SAFETY: anonymous private mapping, no address hint; the result is checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                umem_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(err("mmap UMEM")(io::Error::last_os_error()));
        }
        let umem = Umem {
            base: NonNull::new(p.cast()).ok_or_else(|| err("mmap UMEM")(io::Error::other("0")))?,
            len: umem_len,
        };

        let fd = sys::socket(AF_XDP, libc::SOCK_RAW, 0).map_err(err("socket AF_XDP"))?;
        let raw = fd.as_raw_fd();
        if cfg.busy_poll_us > 0 {
            let opts = [
                (SO_PREFER_BUSY_POLL, 1, "setsockopt SO_PREFER_BUSY_POLL"),
                (
                    libc::SO_BUSY_POLL,
                    cfg.busy_poll_us as libc::c_int,
                    "setsockopt SO_BUSY_POLL",
                ),
                (SO_BUSY_POLL_BUDGET, 64, "setsockopt SO_BUSY_POLL_BUDGET"),
            ];
            for (opt, v, call) in opts {
                sys::setsockopt(raw, libc::SOL_SOCKET, opt, &v).map_err(err(call))?;
            }
        }
        let reg = UmemReg {
            addr: umem.base.as_ptr() as u64,
            len: umem_len as u64,
            chunk_size: cfg.frame_size,
            ..Default::default()
        };
        sys::setsockopt(raw, SOL_XDP, XDP_UMEM_REG, &reg)
            .map_err(err("setsockopt XDP_UMEM_REG"))?;
        let sizes = [
            (
                XDP_UMEM_FILL_RING,
                cfg.fill_size(),
                "setsockopt XDP_UMEM_FILL_RING",
            ),
            (
                XDP_UMEM_COMPLETION_RING,
                cfg.ring_size,
                "setsockopt XDP_UMEM_COMPLETION_RING",
            ),
            (XDP_RX_RING, cfg.ring_size, "setsockopt XDP_RX_RING"),
            (XDP_TX_RING, cfg.ring_size, "setsockopt XDP_TX_RING"),
        ];
        for (opt, size, call) in sizes {
            sys::setsockopt(raw, SOL_XDP, opt, &size).map_err(err(call))?;
        }
        let mut off = MmapOffsets::default();
        let mut len = size_of::<MmapOffsets>() as libc::socklen_t;
        // SAFETY: `off` and `len` are live locals; the kernel writes at most `len` bytes.
        sys::cvt(unsafe {
            libc::getsockopt(
                raw,
                SOL_XDP,
                XDP_MMAP_OFFSETS,
                (&mut off as *mut MmapOffsets).cast(),
                &mut len,
            )
        })
        .map_err(err("getsockopt XDP_MMAP_OFFSETS"))?;
        if len as usize != size_of::<MmapOffsets>() {
            return Err(IoError::Xdp {
                on: ifname.into(),
                reason: format!("XDP_MMAP_OFFSETS of {len} bytes (kernel without ring flags?)"),
            });
        }
        let mut fill = Ring::<u64>::map(raw, XDP_UMEM_PGOFF_FILL_RING, off.fr, cfg.fill_size())
            .map_err(err("mmap fill ring"))?;
        let comp = Ring::<u64>::map(raw, XDP_UMEM_PGOFF_COMPLETION_RING, off.cr, cfg.ring_size)
            .map_err(err("mmap completion ring"))?;
        let rx = Ring::<XdpDesc>::map(raw, XDP_PGOFF_RX_RING, off.rx, cfg.ring_size)
            .map_err(err("mmap RX ring"))?;
        let txr = Ring::<XdpDesc>::map(raw, XDP_PGOFF_TX_RING, off.tx, cfg.ring_size)
            .map_err(err("mmap TX ring"))?;

        let frame = u64::from(cfg.frame_size);
        for i in 0..u64::from(cfg.rx_frames) {
            let h = fill.head;
            fill.write(h, i * frame);
            fill.head = h.wrapping_add(1);
        }
        fill.publish();
        let tx_free = (u64::from(cfg.rx_frames)..u64::from(cfg.rx_frames + cfg.tx_frames))
            .map(|i| i * frame)
            .collect();

        let sxdp = SockaddrXdp {
            family: AF_XDP as u16,
            flags: XDP_COPY | XDP_USE_NEED_WAKEUP,
            ifindex,
            queue_id: queue,
            shared_umem_fd: 0,
        };
        // SAFETY: `sxdp` is a live sockaddr_xdp and we pass its exact size.
        sys::cvt(unsafe {
            libc::bind(
                raw,
                (&sxdp as *const SockaddrXdp).cast(),
                size_of::<SockaddrXdp>() as libc::socklen_t,
            )
        })
        .map_err(err("bind AF_XDP (copy mode)"))?;

        Ok(Xsk {
            queue,
            fill,
            comp,
            rx,
            txr,
            fd,
            umem,
            ifname: ifname.to_string(),
            frame_mask: !(frame - 1),
            frame_size: cfg.frame_size as usize,
            busy_poll: cfg.busy_poll_us > 0,
            // A veth peer with TX checksumming on (its default) hands XDP frames whose TCP and
            // UDP checksums hold only the pseudo-header sum; a NIC's frames come off the wire
            // complete.
            csum_unknown: netif::driver(ifname).is_ok_and(|d| d == "veth"),
            tx_free,
            tx_unpublished: 0,
            tx_in_flight: 0,
            rx_packets: 0,
            tx_packets: 0,
            rx_invalid_descs: 0,
        })
    }

    fn tx_pending(&self) -> usize {
        (self.tx_unpublished + self.tx_in_flight) as usize
    }

    /// Our counters and the kernel's XDP_STATISTICS. If reading those fails, they are 0.
    fn stats(&self) -> AfXdpStats {
        let mut st = XdpStatistics::default();
        let mut len = size_of::<XdpStatistics>() as libc::socklen_t;
        // SAFETY: `st` and `len` are live locals; the kernel writes at most `len` bytes.
        let r = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                SOL_XDP,
                XDP_STATISTICS,
                (&mut st as *mut XdpStatistics).cast(),
                &mut len,
            )
        };
        if r != 0 {
            st = XdpStatistics::default();
        }
        AfXdpStats {
            rx_packets: self.rx_packets,
            tx_packets: self.tx_packets,
            rx_dropped: st.rx_dropped,
            rx_ring_full: st.rx_ring_full,
            rx_fill_ring_empty_descs: st.rx_fill_ring_empty_descs,
            tx_invalid_descs: st.tx_invalid_descs,
            rx_invalid_descs: self.rx_invalid_descs + st.rx_invalid_descs,
        }
    }

    /// Take sent chunks back from the completion ring.
    fn reclaim(&mut self) {
        let n = self.comp.ready();
        if n == 0 {
            return;
        }
        for _ in 0..n {
            let addr = self.comp.read(self.comp.head);
            self.comp.head = self.comp.head.wrapping_add(1);
            self.tx_free.push(addr & self.frame_mask);
        }
        self.comp.release();
        self.tx_in_flight = self.tx_in_flight.saturating_sub(n);
        self.tx_packets += u64::from(n);
    }

    /// Ask the kernel to transmit what is on the TX ring. In copy mode each `sendto` sends at
    /// most a small batch (32 frames in current kernels) and answers EAGAIN while more are
    /// left, so call again as long as the kernel makes progress.
    fn kick(&mut self) -> io::Result<()> {
        let fd = self.fd.as_raw_fd();
        loop {
            let before = self.txr.consumer().load(Ordering::Acquire);
            if before == self.txr.head || !self.txr.needs_wakeup() {
                return Ok(());
            }
            // SAFETY: no buffers: the frames are on the TX ring; the kernel reads no pointer.
            let r = unsafe {
                libc::sendto(
                    fd,
                    std::ptr::null(),
                    0,
                    libc::MSG_DONTWAIT,
                    std::ptr::null(),
                    0,
                )
            };
            if r >= 0 {
                if self.txr.consumer().load(Ordering::Acquire) == before {
                    // Success without progress: nothing more this call can do.
                    return Ok(());
                }
                continue;
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => {}
                Some(libc::EAGAIN | libc::EBUSY | libc::ENOBUFS) => {
                    let after = self.txr.consumer().load(Ordering::Acquire);
                    if after == before {
                        // The device queue is full: the rest goes on a later flush.
                        return Err(io::ErrorKind::WouldBlock.into());
                    }
                }
                _ => return Err(e),
            }
        }
    }
}

impl Xsk {
    /// A zero-length receive: wakes the kernel's RX side (need-wakeup) and, with busy
    /// polling, runs the device's NAPI poll in our context.
    fn kick_rx(&self) {
        // SAFETY: no buffers; the kernel reads no pointer for a zero-length receive.
        unsafe {
            libc::recvfrom(
                self.fd.as_raw_fd(),
                std::ptr::null_mut(),
                0,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
        };
    }

    fn rx_batch<F: FnMut(&[u8], RxMeta)>(&mut self, max: usize, f: &mut F) -> io::Result<usize> {
        let mut ready = self.rx.ready();
        if ready == 0 && self.busy_poll {
            // Run the device's NAPI poll now, in our context (SO_BUSY_POLL), then look again.
            self.kick_rx();
            ready = self.rx.ready();
        }
        let ready = ready.min(u32::try_from(max).unwrap_or(u32::MAX));
        if ready == 0 {
            return Ok(0);
        }
        // Every RX chunk is either on the fill ring, on the RX ring or with us, and the fill
        // ring has room for all of them, so this never comes up short.
        let mut room = self.fill.free(ready);
        debug_assert!(room >= ready, "fill ring smaller than the RX chunks");
        let base = self.umem.base.as_ptr();
        let mut delivered = 0;
        for _ in 0..ready {
            let d = self.rx.read(self.rx.head);
            self.rx.head = self.rx.head.wrapping_add(1);
            let end = d.addr.checked_add(u64::from(d.len));
            if end.is_some_and(|end| end <= self.umem.len as u64) {
                // SAFETY: [addr, addr + len) lies inside the UMEM (checked); the kernel wrote the
                // frame before publishing the descriptor (Acquire in `ready`) and does not touch
                // the chunk again until we put it on the fill ring, after `f` returns.
                let frame = unsafe {
                    std::slice::from_raw_parts(base.add(d.addr as usize), d.len as usize)
                };
                f(
                    frame,
                    RxMeta {
                        wire_len: d.len,
                        csum_unknown: self.csum_unknown,
                        ..Default::default()
                    },
                );
                delivered += 1;
            } else {
                self.rx_invalid_descs += 1;
            }
            if room > 0 {
                let h = self.fill.head;
                self.fill.write(h, d.addr & self.frame_mask);
                self.fill.head = h.wrapping_add(1);
                room -= 1;
            }
        }
        self.rx.release();
        self.fill.publish();
        if self.fill.needs_wakeup() {
            // Prod the kernel to look at the fill ring again.
            self.kick_rx();
        }
        self.rx_packets += delivered as u64;
        Ok(delivered)
    }

    fn tx(&mut self, frame: &[u8]) -> io::Result<()> {
        self.tx_with(frame.len(), |chunk| {
            chunk.copy_from_slice(frame);
            Some(Offload::default())
        })
    }

    /// Queue a frame of `len` bytes that `fill` writes straight into a TX chunk of the UMEM.
    fn tx_with(
        &mut self,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> Option<Offload>,
    ) -> io::Result<()> {
        if !(MIN_TX_FRAME..=self.frame_size).contains(&len) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "frame of {len} bytes for {}: must be {MIN_TX_FRAME}..={}",
                    self.ifname, self.frame_size
                ),
            ));
        }
        if self.tx_free.is_empty() {
            self.reclaim();
        }
        if self.tx_free.is_empty() || self.txr.free(1) == 0 {
            // Errors are accounted for by the kernel's counters; what matters is whether room
            // was made.
            let _ = self.flush();
            if self.tx_free.is_empty() || self.txr.free(1) == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
        }
        let Some(addr) = self.tx_free.pop() else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        // SAFETY: `addr` is the start of a TX chunk of `frame_size` bytes inside the UMEM, owned
        // by us (on no ring, so nothing else reads or writes it), and `len <= frame_size`.
        let chunk = unsafe {
            std::slice::from_raw_parts_mut(self.umem.base.as_ptr().add(addr as usize), len)
        };
        // AF_XDP has no offloads: a frame that asks for any is taken back.
        match fill(chunk) {
            Some(off) if off.is_none() => {}
            taken_back => {
                self.tx_free.push(addr);
                return Err(match taken_back {
                    None => io::ErrorKind::InvalidData.into(),
                    Some(_) => io::ErrorKind::Unsupported.into(),
                });
            }
        }
        let h = self.txr.head;
        self.txr.write(
            h,
            XdpDesc {
                addr,
                len: len as u32,
                options: 0,
            },
        );
        self.txr.head = h.wrapping_add(1);
        self.tx_unpublished += 1;
        Ok(())
    }

    /// Publish queued frames and kick the kernel. Frames the device cannot take yet stay on
    /// the TX ring for the next flush (`WouldBlock`); sent chunks are reclaimed.
    fn flush(&mut self) -> io::Result<()> {
        if self.tx_unpublished > 0 {
            self.txr.publish();
            self.tx_in_flight += self.tx_unpublished;
            self.tx_unpublished = 0;
        }
        let result = if self.tx_in_flight > 0 {
            self.kick()
        } else {
            Ok(())
        };
        self.reclaim();
        result
    }
}

impl AsRawFd for AfXdp {
    fn as_raw_fd(&self) -> RawFd {
        self.xsks[0].fd.as_raw_fd()
    }
}

impl AsFd for AfXdp {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.xsks[0].fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::zeroed;

    #[test]
    fn abi_sizes() {
        assert_eq!(size_of::<UmemReg>(), 32);
        assert_eq!(size_of::<MmapOffsets>(), 128);
        assert_eq!(size_of::<SockaddrXdp>(), 16);
        assert_eq!(size_of::<XdpDesc>(), 16);
        assert_eq!(size_of::<XdpStatistics>(), 48);
        // SAFETY: XdpDesc is a #[repr(C)] struct of integers only; all-zero is a valid value.
        let _: XdpDesc = unsafe { zeroed() };
    }

    #[test]
    fn default_config_is_valid_and_fill_ring_outsizes_rx_frames() {
        let cfg = AfXdpConfig::default();
        cfg.validate().unwrap();
        assert!(cfg.fill_size() > cfg.rx_frames);
    }

    #[test]
    fn bad_configs_name_the_value() {
        let cases = [
            (
                AfXdpConfig {
                    frame_size: 3000,
                    ..Default::default()
                },
                "invalid frame_size 3000",
            ),
            (
                AfXdpConfig {
                    ring_size: 1000,
                    ..Default::default()
                },
                "invalid ring_size 1000",
            ),
            (
                AfXdpConfig {
                    rx_frames: 4096,
                    ..Default::default()
                },
                "invalid rx_frames 4096",
            ),
            (
                AfXdpConfig {
                    tx_frames: 0,
                    ..Default::default()
                },
                "invalid tx_frames 0",
            ),
        ];
        for (cfg, want) in cases {
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.starts_with(want), "{err} (want {want})");
            assert!(AfXdp::open("lo", &cfg)
                .err()
                .unwrap()
                .to_string()
                .starts_with(want));
        }
    }

    #[test]
    fn lanes_need_a_queue_each() {
        check_lanes("x0", 4, 4).unwrap();
        check_lanes("x0", 4, 3).unwrap();
        let err = check_lanes("x0", 1, 2).unwrap_err().to_string();
        assert_eq!(
            err,
            "AF_XDP on x0: the device has 1 receive queue; 2 dispatcher threads need one each \
             (`ethtool -L` or a veth made with numrxqueues)"
        );
        assert!(check_lanes("x0", 2, 3)
            .unwrap_err()
            .to_string()
            .contains("has 2 receive queues; 3 dispatcher"));
        assert!(check_lanes("x0", 2, 0).is_err());
    }

    #[test]
    fn driver_can_move_and_be_shared_across_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<AfXdp>();
    }
}
