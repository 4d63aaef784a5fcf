//! AF_PACKET driver: a TPACKET_V3 memory-mapped RX ring and `sendmmsg` batches for TX.
//!
//! RX: the kernel fills fixed-size *blocks* with variable-length frames and hands a block to us
//! by setting TP_STATUS_USER in its header (when it is full or after `block_timeout_ms`). We
//! walk the frames of the block in place, lend each one to the caller, and give the block back
//! (TP_STATUS_KERNEL) once every frame in it has been seen. A batch may stop in the middle of
//! a block; the next batch resumes there.
//!
//! TX: frames are copied into a preallocated buffer and sent by one `sendmmsg(MSG_DONTWAIT)`
//! per flush, not through PACKET_TX_RING. Why:
//! - per-frame errors come back as errnos (EMSGSIZE for an oversize frame, ENETDOWN for a
//!   downed link) instead of ring slots stuck in TP_STATUS_WRONG_FORMAT that we would have to
//!   find and reclaim;
//! - there is no second shared-memory protocol with the kernel: a TX ring slot is owned by the
//!   kernel until the skb built on it is freed, which on some paths (qdisc backlog, a slow
//!   peer) is long after `send`, so reuse needs status polling and stalls when a slot leaks;
//! - TPACKET_V3 TX rings need Linux >= 4.11 and demand `tp_next_offset == 0` quirks, while
//!   `sendmmsg` behaves the same everywhere, and its one copy per frame is the same copy
//!   `tx()` already makes (the caller's frame is not in the ring either way);
//! - it is still one syscall per batch, which is what matters at our rates.
//!
//! When the kernel's queue is full (EAGAIN/ENOBUFS) the unsent frames stay queued for the next
//! flush and `tx` reports `WouldBlock` once the queue is full, so a short burst is absorbed and
//! a sustained overload becomes counted drops at the caller, never a spin.

use std::io;
use std::mem::{offset_of, size_of, zeroed};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::sys::{self, MsgBatch};
use crate::{netif, FrameIo, GsoType, IoError, Offload, RxMeta};

// Kernel ABI (include/uapi/linux/if_packet.h) not exported by every libc version.
const PACKET_QDISC_BYPASS: libc::c_int = 20;
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;
const TPACKET_V3: libc::c_int = 2;
const PACKET_VNET_HDR: libc::c_int = 15;
/// `struct virtio_net_hdr`: flags u8, gso_type u8, hdr_len, gso_size, csum_start,
/// csum_offset (u16 each, in the host's byte order for AF_PACKET).
const VNET_HDR_LEN: usize = 10;
const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
const VIRTIO_NET_HDR_GSO_ECN: u8 = 0x80;
const TP_STATUS_KERNEL: u32 = 0;
const TP_STATUS_USER: u32 = 1 << 0;
const TP_STATUS_CSUMNOTREADY: u32 = 1 << 3;
const TP_STATUS_VLAN_VALID: u32 = 1 << 4;
const TP_STATUS_CSUM_VALID: u32 = 1 << 7;
const TPACKET_ALIGNMENT: usize = 16;
/// TPACKET3_HDRLEN: the smallest frame slot the kernel accepts.
const TPACKET3_HDRLEN: usize = size_of::<libc::tpacket3_hdr>().next_multiple_of(TPACKET_ALIGNMENT)
    + size_of::<libc::sockaddr_ll>();

/// Offsets into `struct tpacket_block_desc`: `version`, `offset_to_priv`, then the
/// `tpacket_hdr_v1` union member (8-byte aligned) starting with these three u32s.
const BLOCK_HDR: usize = 8;
const BLOCK_STATUS: usize = BLOCK_HDR;
const BLOCK_NUM_PKTS: usize = BLOCK_HDR + 4;
const BLOCK_FIRST_PKT: usize = BLOCK_HDR + 8;
const _: () = assert!(offset_of!(libc::tpacket_block_desc, hdr) == BLOCK_HDR);
const _: () = assert!(size_of::<libc::tpacket3_hdr>() == 48);

/// Ethernet header: the shortest frame the kernel accepts on a SOCK_RAW send.
const MIN_TX_FRAME: usize = 14;
/// The largest frame we send: an Ethernet header and the largest IP packet (a GSO
/// super-packet; without GSO the interface's MTU is the real limit, enforced by the kernel).
const MAX_TX_FRAME: usize = 14 + 65535;

/// Ring and queue sizes for [`AfPacket::open`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AfPacketConfig {
    /// RX ring block size in bytes: a multiple of the page size. A block is handed to us when
    /// full or after `block_timeout_ms`, so it bounds the batch, not the latency. Frames longer
    /// than a block (minus its header) arrive truncated.
    pub block_size: usize,
    /// Number of RX ring blocks. The ring holds `block_size * block_count` bytes; at low rates
    /// every timeout retires a block however little it holds, so more blocks also means more
    /// time the process may be descheduled before the kernel drops frames.
    pub block_count: usize,
    /// Nominal ring frame slot, a multiple of 16 of at least 80 bytes. TPACKET_V3 packs
    /// variable-length frames into blocks, so this only has to satisfy the kernel's checks; it
    /// also sizes the TX buffer (`tx_frames * frame_size` bytes, at least 64 KiB).
    pub frame_size: usize,
    /// Frames the TX queue holds before `tx` flushes on its own (and, if the kernel will not
    /// take them, reports `WouldBlock`).
    pub tx_frames: usize,
    /// Kernel block retire timeout in milliseconds (tp_retire_blk_tov): the worst-case extra
    /// latency of a frame on a quiet link.
    pub block_timeout_ms: u32,
    /// Put the interface in promiscuous mode (PACKET_MR_PROMISC) for as long as the socket is
    /// open.
    pub promiscuous: bool,
    /// Send straight to the driver, skipping the qdisc (PACKET_QDISC_BYPASS). Faster, but our
    /// frames then no longer show up in tcpdump on the interface; off by default.
    pub qdisc_bypass: bool,
    /// Exchange a virtio-net header with every frame (PACKET_VNET_HDR): received GSO/GRO
    /// super-packets and partial checksums come with their description ([`crate::Offload`])
    /// instead of looking like oversize or corrupt frames, and `tx_offload` can hand the kernel
    /// a super-packet to segment or a checksum to finish. On by default.
    pub vnet_hdr: bool,
}

impl Default for AfPacketConfig {
    fn default() -> Self {
        AfPacketConfig {
            block_size: 1 << 20,
            block_count: 16,
            frame_size: 2048,
            tx_frames: 512,
            block_timeout_ms: 1,
            promiscuous: true,
            qdisc_bypass: false,
            vnet_hdr: true,
        }
    }
}

impl AfPacketConfig {
    /// Check the values the kernel would reject, with an error naming the value.
    pub fn validate(&self) -> Result<(), IoError> {
        let bad = |field, value, reason| {
            Err(IoError::InvalidConfig {
                field,
                value,
                reason,
            })
        };
        let page = page_size();
        if self.block_size == 0 || !self.block_size.is_multiple_of(page) {
            return bad(
                "block_size",
                self.block_size,
                "must be a non-zero multiple of the page size",
            );
        }
        if u32::try_from(self.block_size).is_err() {
            return bad("block_size", self.block_size, "must fit in 32 bits");
        }
        if self.frame_size < TPACKET3_HDRLEN || !self.frame_size.is_multiple_of(TPACKET_ALIGNMENT) {
            return bad(
                "frame_size",
                self.frame_size,
                "must be a multiple of 16 of at least 80",
            );
        }
        if self.frame_size > self.block_size {
            return bad("frame_size", self.frame_size, "must not exceed block_size");
        }
        if self.block_count == 0 {
            return bad("block_count", self.block_count, "must be at least 1");
        }
        let frames = (self.block_size / self.frame_size).checked_mul(self.block_count);
        if frames.is_none_or(|f| u32::try_from(f).is_err()) || self.ring_bytes().is_none() {
            return bad("block_count", self.block_count, "makes the ring too large");
        }
        if self.tx_frames == 0 {
            return bad("tx_frames", self.tx_frames, "must be at least 1");
        }
        if self.tx_frames.checked_mul(self.frame_size).is_none() {
            return bad("tx_frames", self.tx_frames, "makes the TX buffer too large");
        }
        if self.block_timeout_ms == 0 {
            return bad(
                "block_timeout_ms",
                0,
                "must be at least 1 (0 asks the kernel for ~8 ms)",
            );
        }
        Ok(())
    }

    fn ring_bytes(&self) -> Option<usize> {
        self.block_size.checked_mul(self.block_count)
    }

    fn tx_bytes(&self) -> usize {
        self.tx_frames
            .saturating_mul(self.frame_size)
            .max(VNET_HDR_LEN + MAX_TX_FRAME + 1)
    }
}

/// Counters of one [`AfPacket`]. The kernel ones accumulate across reads (PACKET_STATISTICS
/// resets on every read).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AfPacketStats {
    /// Frames the kernel accepted for the ring, including the dropped ones (tp_packets).
    pub packets: u64,
    /// Frames the kernel dropped because the ring was full (tp_drops).
    pub drops: u64,
    /// Times the kernel froze the ring queue for lack of a free block (tp_freeze_q_cnt).
    pub freeze_q_cnt: u64,
    /// Frames the kernel accepted from us.
    pub tx_packets: u64,
    /// Frames we dropped at flush because the kernel rejected them (bad size, link down).
    pub tx_dropped: u64,
    /// Ring blocks abandoned because their frame layout was inconsistent (never expected).
    pub rx_malformed_blocks: u64,
}

/// The mmap'ed RX ring. Unmapped on drop.
struct Ring {
    base: NonNull<u8>,
    len: usize,
    block_size: usize,
    block_count: usize,
}

// SAFETY: the ring is plain shared memory owned by this value alone; nothing in it is tied to the
// thread that mapped it.
unsafe impl Send for Ring {}
// SAFETY: through `&Ring` only the block status words are reachable, and only as atomics; frames
// are read solely by `AfPacket::rx_batch`, which takes `&mut self`.
unsafe impl Sync for Ring {}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` are exactly the mapping created in `AfPacket::open`, and no frame
        // borrowed from it can outlive `&mut self` borrows of the owning `AfPacket`.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

impl Ring {
    fn block(&self, i: usize) -> *mut u8 {
        // SAFETY: i < block_count (callers keep the index modulo block_count), so the offset
        // stays inside the mapping.
        unsafe { self.base.as_ptr().add(i * self.block_size) }
    }

    fn status(&self, i: usize) -> &AtomicU32 {
        // SAFETY: block_status is a u32 at offset 8 of every block; blocks start page-aligned, so
        // it is 4-byte aligned. The kernel writes it concurrently, hence the atomic view; the
        // reference lives no longer than `&self`, which keeps the mapping alive.
        unsafe { AtomicU32::from_ptr(self.block(i).add(BLOCK_STATUS).cast()) }
    }
}

/// Where a batch stopped inside a block we own.
#[derive(Debug, Clone, Copy)]
struct Cursor {
    left: u32,
    offset: usize,
}

/// A bound AF_PACKET socket with a TPACKET_V3 RX ring on one interface.
pub struct AfPacket {
    ring: Ring,
    fd: OwnedFd,
    ifname: String,
    ifindex: u32,
    /// Block the next frame comes from, and where in it if we already own it.
    block: usize,
    cursor: Option<Cursor>,
    tx_buf: Vec<u8>,
    tx_used: usize,
    tx_queue: Vec<(usize, usize)>,
    tx_max: usize,
    tx_batch: MsgBatch,
    tx_packets: u64,
    tx_dropped: u64,
    rx_malformed_blocks: u64,
    /// Frames carry a virtio-net header (PACKET_VNET_HDR), before the frame in RX and TX.
    vnet: bool,
    /// Running totals of PACKET_STATISTICS (packets, drops, freeze_q_cnt), which the kernel
    /// resets on every read; atomics so `stats` works through `&self`.
    kernel: [AtomicU64; 3],
}

impl std::fmt::Debug for AfPacket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AfPacket")
            .field("ifname", &self.ifname)
            .field("ifindex", &self.ifindex)
            .field("fd", &self.fd)
            .field("block", &self.block)
            .field("tx_pending", &self.tx_queue.len())
            .finish_non_exhaustive()
    }
}

impl AfPacket {
    /// Open interface `ifname` in the calling thread's network namespace: a SOCK_RAW ETH_P_ALL
    /// socket bound to it, with the RX ring mapped, our own transmissions ignored and (per
    /// `cfg`) promiscuous mode on. The interface need not be up.
    pub fn open(ifname: &str, cfg: &AfPacketConfig) -> Result<AfPacket, IoError> {
        cfg.validate()?;
        let ifindex = netif::ifindex(ifname)?;
        let err = |call| move |e| IoError::syscall(call, ifname, e);

        // Protocol 0: the socket receives nothing until `bind` below, so no frame from another
        // interface can slip into the ring before it is bound to ours.
        let fd = sys::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_NONBLOCK, 0)
            .map_err(err("socket AF_PACKET"))?;
        let raw = fd.as_raw_fd();
        sys::setsockopt(raw, libc::SOL_PACKET, libc::PACKET_VERSION, &TPACKET_V3)
            .map_err(err("setsockopt PACKET_VERSION"))?;
        // Before the ring: the kernel refuses to change the header size once a ring exists.
        if cfg.vnet_hdr {
            sys::setsockopt(raw, libc::SOL_PACKET, PACKET_VNET_HDR, &1 as &libc::c_int)
                .map_err(err("setsockopt PACKET_VNET_HDR"))?;
        }
        // SAFETY: tpacket_req3 is a C struct of integers only; all-zero is a valid value.
        let mut req: libc::tpacket_req3 = unsafe { zeroed() };
        // The casts cannot truncate: `validate` checked these fit in 32 bits.
        req.tp_block_size = cfg.block_size as u32;
        req.tp_block_nr = cfg.block_count as u32;
        req.tp_frame_size = cfg.frame_size as u32;
        req.tp_frame_nr = ((cfg.block_size / cfg.frame_size) * cfg.block_count) as u32;
        req.tp_retire_blk_tov = cfg.block_timeout_ms;
        sys::setsockopt(raw, libc::SOL_PACKET, libc::PACKET_RX_RING, &req)
            .map_err(err("setsockopt PACKET_RX_RING"))?;

        let len = cfg.ring_bytes().unwrap_or(0);
        // SAFETY: mapping a packet socket's ring is the documented way to reach it; we ask for
        // exactly the size we configured and check for MAP_FAILED.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                raw,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(IoError::syscall(
                "mmap PACKET_RX_RING",
                ifname,
                io::Error::last_os_error(),
            ));
        }
        let Some(base) = NonNull::new(base.cast::<u8>()) else {
            return Err(IoError::syscall(
                "mmap PACKET_RX_RING",
                ifname,
                io::Error::other("null mapping"),
            ));
        };
        let ring = Ring {
            base,
            len,
            block_size: cfg.block_size,
            block_count: cfg.block_count,
        };

        // Without this we would receive every frame we transmit and loop it back.
        sys::setsockopt(
            raw,
            libc::SOL_PACKET,
            PACKET_IGNORE_OUTGOING,
            &1 as &libc::c_int,
        )
        .map_err(err("setsockopt PACKET_IGNORE_OUTGOING"))?;
        if cfg.qdisc_bypass {
            sys::setsockopt(
                raw,
                libc::SOL_PACKET,
                PACKET_QDISC_BYPASS,
                &1 as &libc::c_int,
            )
            .map_err(err("setsockopt PACKET_QDISC_BYPASS"))?;
        }
        // A deep send buffer turns short TX bursts into queued skbs instead of EAGAIN.
        sys::set_socket_buffer(raw, libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, 4 << 20)
            .map_err(err("setsockopt SO_SNDBUF"))?;

        // SAFETY: sockaddr_ll is a C struct of integers and byte arrays; all-zero is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { zeroed() };
        sll.sll_family = libc::AF_PACKET as libc::c_ushort;
        sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        sll.sll_ifindex = ifindex as libc::c_int;
        // SAFETY: `sll` is a live sockaddr_ll and we pass its exact size.
        sys::cvt(unsafe {
            libc::bind(
                raw,
                (&sll as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        })
        .map_err(err("bind AF_PACKET"))?;

        if cfg.promiscuous {
            // SAFETY: packet_mreq is a C struct of integers and a byte array; all-zero is valid.
            let mut mreq: libc::packet_mreq = unsafe { zeroed() };
            mreq.mr_ifindex = ifindex as libc::c_int;
            mreq.mr_type = libc::PACKET_MR_PROMISC as libc::c_ushort;
            sys::setsockopt(raw, libc::SOL_PACKET, libc::PACKET_ADD_MEMBERSHIP, &mreq)
                .map_err(err("setsockopt PACKET_ADD_MEMBERSHIP PACKET_MR_PROMISC"))?;
        }

        Ok(AfPacket {
            ring,
            fd,
            ifname: ifname.to_string(),
            ifindex,
            block: 0,
            cursor: None,
            tx_buf: vec![0; cfg.tx_bytes()],
            tx_used: 0,
            tx_queue: Vec::with_capacity(cfg.tx_frames),
            tx_max: cfg.tx_frames,
            tx_batch: MsgBatch::new(cfg.tx_frames),
            tx_packets: 0,
            tx_dropped: 0,
            rx_malformed_blocks: 0,
            vnet: cfg.vnet_hdr,
            kernel: Default::default(),
        })
    }

    /// The interface this socket is bound to.
    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// The kernel index of that interface.
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// The socket, to poll(2) for readability (same as [`FrameIo::as_raw_fd`]).
    pub fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Frames queued by `tx` and not yet accepted by the kernel.
    pub fn tx_pending(&self) -> usize {
        self.tx_queue.len()
    }

    /// Ring and TX counters. Reads (and so resets) the kernel's PACKET_STATISTICS and adds them
    /// to the running totals; if that read fails, the totals so far are returned.
    pub fn stats(&self) -> AfPacketStats {
        // SAFETY: tpacket_stats_v3 is a C struct of integers only; all-zero is a valid value.
        let mut st: libc::tpacket_stats_v3 = unsafe { zeroed() };
        let mut len = size_of::<libc::tpacket_stats_v3>() as libc::socklen_t;
        // SAFETY: `st` and `len` are live locals; the kernel writes at most `len` bytes.
        let r = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_STATISTICS,
                (&mut st as *mut libc::tpacket_stats_v3).cast(),
                &mut len,
            )
        };
        if r == 0 {
            let read = [st.tp_packets, st.tp_drops, st.tp_freeze_q_cnt];
            for (total, n) in self.kernel.iter().zip(read) {
                total.fetch_add(u64::from(n), Ordering::Relaxed);
            }
        }
        let [packets, drops, freeze] = [0, 1, 2].map(|i| self.kernel[i].load(Ordering::Relaxed));
        AfPacketStats {
            packets,
            drops,
            freeze_q_cnt: freeze,
            tx_packets: self.tx_packets,
            tx_dropped: self.tx_dropped,
            rx_malformed_blocks: self.rx_malformed_blocks,
        }
    }

    /// The frame at `offset` in block `base`, its metadata and the offset of the next one, or
    /// `None` if the header points outside the block.
    ///
    /// # Safety
    /// `base` must be the start of a block we own (TP_STATUS_USER observed with Acquire and not
    /// yet released), and the returned slice must not be used after the block is released.
    unsafe fn frame<'a>(
        &self,
        base: *const u8,
        offset: usize,
    ) -> Option<(&'a [u8], RxMeta, usize)> {
        let block_size = self.ring.block_size;
        if offset.checked_add(size_of::<libc::tpacket3_hdr>())? > block_size {
            return None;
        }
        // SAFETY: the header lies inside the block (checked above); the kernel finished writing
        // it before releasing the block to us (caller contract).
        let hdr =
            unsafe { std::ptr::read_unaligned(base.add(offset).cast::<libc::tpacket3_hdr>()) };
        let start = offset.checked_add(usize::from(hdr.tp_mac))?;
        let end = start.checked_add(hdr.tp_snaplen as usize)?;
        if end > block_size {
            return None;
        }
        // SAFETY: [start, end) lies inside the block, which the kernel does not touch until we
        // release it, after the caller is done with the slice.
        let frame = unsafe { std::slice::from_raw_parts(base.add(start), end - start) };
        let status = hdr.tp_status;
        let mut meta = RxMeta {
            csum_not_ready: status & TP_STATUS_CSUMNOTREADY != 0,
            wire_len: hdr.tp_len,
            truncated: hdr.tp_snaplen < hdr.tp_len,
            csum_valid: status & TP_STATUS_CSUM_VALID != 0,
            vlan_tci: (status & TP_STATUS_VLAN_VALID != 0).then_some(hdr.hv1.tp_vlan_tci as u16),
            csum_unknown: false,
            offload: Default::default(),
        };
        if self.vnet {
            // The kernel writes the virtio-net header right before the frame (tp_mac leaves
            // room for it); one that would overlap the tpacket header is a malformed block.
            let at = start.checked_sub(VNET_HDR_LEN)?;
            if at < offset + size_of::<libc::tpacket3_hdr>() {
                return None;
            }
            // SAFETY: [at, start) lies inside the block, after the frame's tpacket header.
            let v = unsafe { std::slice::from_raw_parts(base.add(at), VNET_HDR_LEN) };
            meta.offload = decode_vnet(v);
            meta.csum_not_ready |= meta.offload.needs_csum;
        }
        Some((frame, meta, offset + hdr.tp_next_offset as usize))
    }

    fn release_block(&mut self) {
        self.ring
            .status(self.block)
            .store(TP_STATUS_KERNEL, Ordering::Release);
        self.block = (self.block + 1) % self.ring.block_count;
        self.cursor = None;
    }

    /// Queue `frame` behind `vnet` (the virtio-net header, when the socket uses one).
    fn enqueue(&mut self, frame: &[u8], vnet: &[u8; VNET_HDR_LEN]) -> io::Result<()> {
        if !(MIN_TX_FRAME..=MAX_TX_FRAME).contains(&frame.len()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "frame of {} bytes for {}: must be {MIN_TX_FRAME}..={MAX_TX_FRAME}",
                    frame.len(),
                    self.ifname
                ),
            ));
        }
        let hdr = if self.vnet { &vnet[..] } else { &[][..] };
        let len = hdr.len() + frame.len();
        if !self.tx_has_room(len) {
            // Errors are accounted for inside flush; what matters here is whether room was made.
            let _ = self.flush();
            if !self.tx_has_room(len) {
                return Err(io::ErrorKind::WouldBlock.into());
            }
        }
        let start = self.tx_used;
        self.tx_buf[start..start + hdr.len()].copy_from_slice(hdr);
        self.tx_buf[start + hdr.len()..start + len].copy_from_slice(frame);
        self.tx_used += len;
        self.tx_queue.push((start, len));
        Ok(())
    }

    fn tx_has_room(&self, len: usize) -> bool {
        self.tx_queue.len() < self.tx_max && self.tx_buf.len() - self.tx_used >= len
    }

    /// Drop the first `sent` queued frames (sent or rejected), keeping the rest at the front.
    fn tx_consume(&mut self, sent: usize) {
        if sent >= self.tx_queue.len() {
            self.tx_queue.clear();
            self.tx_used = 0;
            return;
        }
        let first = self.tx_queue[sent].0;
        self.tx_buf.copy_within(first..self.tx_used, 0);
        self.tx_used -= first;
        self.tx_queue.drain(..sent);
        for (offset, _) in &mut self.tx_queue {
            *offset -= first;
        }
    }
}

impl FrameIo for AfPacket {
    fn rx_batch<F: FnMut(&[u8], RxMeta)>(&mut self, max: usize, mut f: F) -> io::Result<usize> {
        let mut delivered = 0;
        while delivered < max {
            let base = self.ring.block(self.block);
            let mut cursor = match self.cursor {
                Some(c) => c,
                None => {
                    // Acquire pairs with the kernel's release of the block: everything it wrote
                    // into the block is visible once we see TP_STATUS_USER.
                    if self.ring.status(self.block).load(Ordering::Acquire) & TP_STATUS_USER == 0 {
                        break;
                    }
                    // SAFETY: the block is ours (status checked); the header fields are u32s at
                    // aligned offsets inside it.
                    unsafe {
                        Cursor {
                            left: std::ptr::read(base.add(BLOCK_NUM_PKTS).cast::<u32>()),
                            offset: std::ptr::read(base.add(BLOCK_FIRST_PKT).cast::<u32>())
                                as usize,
                        }
                    }
                }
            };
            while cursor.left > 0 && delivered < max {
                // SAFETY: the block is ours until `release_block`, and `f` cannot keep the slice
                // (it is only borrowed for the call).
                match unsafe { self.frame(base, cursor.offset) } {
                    Some((frame, meta, next)) => {
                        f(frame, meta);
                        delivered += 1;
                        cursor.left -= 1;
                        if cursor.left > 0 && next == cursor.offset {
                            self.rx_malformed_blocks += 1;
                            cursor.left = 0;
                        }
                        cursor.offset = next;
                    }
                    None => {
                        self.rx_malformed_blocks += 1;
                        cursor.left = 0;
                    }
                }
            }
            if cursor.left == 0 {
                self.release_block();
            } else {
                self.cursor = Some(cursor);
            }
        }
        Ok(delivered)
    }

    fn tx(&mut self, frame: &[u8]) -> io::Result<()> {
        self.enqueue(frame, &[0; VNET_HDR_LEN])
    }

    fn offloads(&self) -> bool {
        self.vnet
    }

    fn tx_offload(&mut self, frame: &[u8], off: &Offload) -> io::Result<()> {
        if !self.vnet && !off.is_none() {
            return Err(io::ErrorKind::Unsupported.into());
        }
        self.enqueue(frame, &encode_vnet(off))
    }

    /// Send every queued frame with as few `sendmmsg` calls as the kernel allows. A frame the
    /// kernel rejects is dropped and counted (the first such error is returned after the rest
    /// were tried); a full kernel queue keeps the remainder queued and returns `WouldBlock`.
    fn flush(&mut self) -> io::Result<()> {
        let n = self.tx_queue.len();
        if n == 0 {
            return Ok(());
        }
        let base = self.tx_buf.as_mut_ptr();
        for (i, &(offset, len)) in self.tx_queue.iter().enumerate() {
            // SAFETY: offset + len <= tx_used <= tx_buf.len(), so the pointer stays in the buffer.
            let buf = unsafe { base.add(offset) };
            // No address: the socket's bind supplies the interface.
            self.tx_batch.set(i, buf, len, std::ptr::null_mut(), 0);
        }
        let fd = self.fd.as_raw_fd();
        let mut done = 0;
        let mut result = Ok(());
        while done < n {
            match self.tx_batch.send(fd, done, n) {
                Ok(0) => {
                    result = Err(io::ErrorKind::WouldBlock.into());
                    break;
                }
                Ok(sent) => {
                    done += sent;
                    self.tx_packets += sent as u64;
                }
                Err(e) => match e.raw_os_error() {
                    Some(libc::EINTR) => {}
                    Some(libc::EAGAIN | libc::ENOBUFS) => {
                        result = Err(io::ErrorKind::WouldBlock.into());
                        break;
                    }
                    // The link is gone: every remaining frame would fail the same way.
                    Some(libc::ENETDOWN | libc::ENXIO | libc::ENODEV) => {
                        self.tx_dropped += (n - done) as u64;
                        done = n;
                        if result.is_ok() {
                            result = Err(e);
                        }
                    }
                    // This frame alone is bad (e.g. EMSGSIZE): drop it, keep going.
                    _ => {
                        self.tx_dropped += 1;
                        done += 1;
                        if result.is_ok() {
                            result = Err(e);
                        }
                    }
                },
            }
        }
        self.tx_consume(done);
        result
    }

    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsRawFd for AfPacket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for AfPacket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// The offload description in a received virtio-net header.
fn decode_vnet(v: &[u8]) -> Offload {
    let u16_at = |i: usize| u16::from_ne_bytes([v[i], v[i + 1]]);
    let gso_size = u16_at(4);
    Offload {
        gso: if gso_size == 0 {
            GsoType::None
        } else {
            GsoType::from_virtio(v[1] & !VIRTIO_NET_HDR_GSO_ECN)
        },
        ecn: v[1] & VIRTIO_NET_HDR_GSO_ECN != 0,
        gso_size,
        needs_csum: v[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0,
        csum_start: u16_at(6),
        csum_offset: u16_at(8),
    }
}

/// The virtio-net header that asks the kernel for `off`. `hdr_len` is left 0: the kernel
/// derives it from the checksum offsets (and, for GSO, from the headers themselves).
fn encode_vnet(off: &Offload) -> [u8; VNET_HDR_LEN] {
    let mut v = [0u8; VNET_HDR_LEN];
    if off.needs_csum {
        v[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
        v[6..8].copy_from_slice(&off.csum_start.to_ne_bytes());
        v[8..10].copy_from_slice(&off.csum_offset.to_ne_bytes());
    }
    if off.gso != GsoType::None {
        v[1] = off.gso.to_virtio() | if off.ecn { VIRTIO_NET_HDR_GSO_ECN } else { 0 };
        v[4..6].copy_from_slice(&off.gso_size.to_ne_bytes());
    }
    v
}

fn page_size() -> usize {
    // SAFETY: sysconf(3) takes a constant, touches no memory of ours, and -1 is its error.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(page)
        .ok()
        .filter(|&p| p > 0)
        .unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drivers_can_move_and_be_shared_across_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<AfPacket>();
        send_sync::<crate::udp::UdpEndpoint>();
        fn send<T: Send>() {}
        send::<crate::memory::MemoryIo>();
    }

    #[test]
    fn default_config_is_valid() {
        AfPacketConfig::default().validate().unwrap();
        assert_eq!(TPACKET3_HDRLEN, 68);
    }

    #[test]
    fn bad_configs_name_the_value() {
        let cases = [
            (
                AfPacketConfig {
                    block_size: 1000,
                    ..Default::default()
                },
                "invalid block_size 1000",
            ),
            (
                AfPacketConfig {
                    frame_size: 64,
                    ..Default::default()
                },
                "invalid frame_size 64",
            ),
            (
                AfPacketConfig {
                    frame_size: 2050,
                    ..Default::default()
                },
                "invalid frame_size 2050",
            ),
            (
                AfPacketConfig {
                    block_size: 4096,
                    frame_size: 8192,
                    ..Default::default()
                },
                "invalid frame_size 8192",
            ),
            (
                AfPacketConfig {
                    block_count: 0,
                    ..Default::default()
                },
                "invalid block_count 0",
            ),
            (
                AfPacketConfig {
                    block_count: usize::MAX,
                    ..Default::default()
                },
                "invalid block_count",
            ),
            (
                AfPacketConfig {
                    tx_frames: 0,
                    ..Default::default()
                },
                "invalid tx_frames 0",
            ),
            (
                AfPacketConfig {
                    block_timeout_ms: 0,
                    ..Default::default()
                },
                "invalid block_timeout_ms 0",
            ),
        ];
        for (cfg, want) in cases {
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.starts_with(want), "{err} (want {want})");
            // open() validates before touching the system.
            assert!(AfPacket::open("lo", &cfg)
                .unwrap_err()
                .to_string()
                .starts_with(want));
        }
    }

    #[test]
    fn missing_interface_is_named() {
        let err = AfPacket::open("dva-nosuch0", &AfPacketConfig::default()).unwrap_err();
        assert!(err.to_string().contains("dva-nosuch0"), "{err}");
    }
}
