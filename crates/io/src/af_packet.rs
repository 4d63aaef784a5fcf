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
//!
//! Lanes: several sockets on one interface can share its frames through a PACKET_FANOUT group
//! ([`AfPacketConfig::fanout`], [`AfPacket::open_lanes`]), one socket per data-path thread. The
//! kernel gives each frame to exactly one member, chosen by [`FLOW_HASH`], a classic BPF
//! program computing a flow hash that is symmetric (both directions of a connection land on the
//! same lane, so one thread owns its state) and that keeps the fragments of a datagram
//! together.

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
const PACKET_FANOUT: libc::c_int = 18;
const PACKET_FANOUT_DATA: libc::c_int = 22;
const PACKET_FANOUT_CBPF: u32 = 6;
const PACKET_FANOUT_FLAG_UNIQUEID: u32 = 0x2000;
const PACKET_FANOUT_FLAG_IGNORE_OUTGOING: u32 = 0x4000;
const PACKET_OUTGOING: u32 = 4;
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
    /// Share the interface's frames with other sockets: each frame goes to one member of the
    /// group, by flow ([`FLOW_HASH`]). None (the default): this socket sees every frame.
    pub fanout: Option<Fanout>,
}

/// How a socket takes part in a PACKET_FANOUT group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fanout {
    /// Start a group whose id the kernel picks unique in the network namespace, so two sets
    /// of lanes on one interface (or another program's group) never merge by accident.
    New,
    /// Join a group, as [`AfPacket::fanout_group`] of its first member reports it.
    Join(FanoutGroup),
}

/// A fanout group: its id, and the flags every member must join with (the kernel refuses a
/// member whose flags differ).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FanoutGroup {
    id: u16,
    flags: u32,
}

impl FanoutGroup {
    /// The group id, unique among the namespace's groups.
    pub fn id(&self) -> u16 {
        self.id
    }

    /// The PACKET_FANOUT argument that joins this group.
    fn arg(&self) -> u32 {
        u32::from(self.id) | ((PACKET_FANOUT_CBPF | self.flags) << 16)
    }
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
            fanout: None,
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

/// A frame waiting for `sendmmsg`: in our transmit buffer, or where the caller keeps it
/// ([`FrameIo::tx_borrowed`]; an address, not a pointer, so the driver stays `Send`).
#[derive(Debug, Clone, Copy)]
enum Queued {
    Own { offset: usize, len: usize },
    Borrowed { addr: usize, len: usize },
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
    /// Where [`FrameIo::detach`] lays queued frames out again (empty until first needed).
    tx_spare: Vec<u8>,
    tx_used: usize,
    tx_queue: Vec<Queued>,
    tx_max: usize,
    tx_batch: MsgBatch,
    tx_packets: u64,
    tx_dropped: u64,
    rx_malformed_blocks: u64,
    /// Frames carry a virtio-net header (PACKET_VNET_HDR), before the frame in RX and TX.
    vnet: bool,
    /// The fanout group this socket is a member of.
    fanout: Option<FanoutGroup>,
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

        if cfg.fanout.is_some() {
            // A group's members are fed by the group's own receive hook, which ignores
            // PACKET_IGNORE_OUTGOING; PACKET_FANOUT_FLAG_IGNORE_OUTGOING does that for the group,
            // but kernels before 6.2 do not know it. A filter on the socket drops what the host
            // itself sends on the interface everywhere (our own transmissions never come back:
            // the kernel skips the group a sending member belongs to). Before bind, so no such
            // frame gets in.
            attach_filter(raw, &DROP_OUTGOING).map_err(err("setsockopt SO_ATTACH_FILTER"))?;
        }

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

        // After bind: the kernel only lets a bound (running) socket join. Until it has, this
        // socket sees every frame, and so does the group it is about to join: a frame of those
        // microseconds may reach two lanes, once, while the port is being opened.
        let fanout = match cfg.fanout {
            None => None,
            Some(how) => Some(join_fanout(raw, ifname, ifindex, how)?),
        };

        Ok(AfPacket {
            ring,
            fd,
            ifname: ifname.to_string(),
            ifindex,
            block: 0,
            cursor: None,
            tx_buf: vec![0; cfg.tx_bytes()],
            tx_spare: Vec::new(),
            tx_used: 0,
            tx_queue: Vec::with_capacity(cfg.tx_frames),
            tx_max: cfg.tx_frames,
            tx_batch: MsgBatch::new(cfg.tx_frames),
            tx_packets: 0,
            tx_dropped: 0,
            rx_malformed_blocks: 0,
            vnet: cfg.vnet_hdr,
            fanout,
            kernel: Default::default(),
        })
    }

    /// Open `lanes` sockets on `ifname` (per `cfg`) whose receive sides together take every
    /// frame once: one PACKET_FANOUT group spreads the frames by [`FLOW_HASH`], so both
    /// directions of a flow, and every fragment of a datagram, reach the same socket. Each socket
    /// transmits on its own. One lane is a plain [`AfPacket::open`]. `cfg.fanout` of a group to
    /// join puts every lane in that group; otherwise the lanes start a new one.
    pub fn open_lanes(
        ifname: &str,
        cfg: &AfPacketConfig,
        lanes: usize,
    ) -> Result<Vec<AfPacket>, IoError> {
        if lanes == 0 {
            return Err(IoError::InvalidConfig {
                field: "lanes",
                value: 0,
                reason: "must be at least 1",
            });
        }
        if lanes == 1 {
            return Ok(vec![AfPacket::open(ifname, cfg)?]);
        }
        let mut member = AfPacketConfig {
            fanout: Some(cfg.fanout.unwrap_or(Fanout::New)),
            ..cfg.clone()
        };
        let first = AfPacket::open(ifname, &member)?;
        let Some(group) = first.fanout else {
            return Err(IoError::syscall(
                "setsockopt PACKET_FANOUT",
                ifname,
                io::Error::other("the socket is in no fanout group"),
            ));
        };
        member.fanout = Some(Fanout::Join(group));
        let mut all = Vec::with_capacity(lanes);
        all.push(first);
        for _ in 1..lanes {
            all.push(AfPacket::open(ifname, &member)?);
        }
        Ok(all)
    }

    /// The fanout group this socket is a member of ([`AfPacketConfig::fanout`]).
    pub fn fanout_group(&self) -> Option<FanoutGroup> {
        self.fanout
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
    fn check_tx_len(&self, len: usize) -> io::Result<()> {
        if !(MIN_TX_FRAME..=MAX_TX_FRAME).contains(&len) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "frame of {len} bytes for {}: must be {MIN_TX_FRAME}..={MAX_TX_FRAME}",
                    self.ifname
                ),
            ));
        }
        Ok(())
    }

    /// Bytes of virtio-net header in front of each frame sent (none without `PACKET_VNET_HDR`).
    fn vnet_len(&self) -> usize {
        if self.vnet {
            VNET_HDR_LEN
        } else {
            0
        }
    }

    /// Describe `off` in the virtio-net header `hdr` ([`AfPacket::vnet_len`] bytes); without
    /// the header (`vnet` false) a frame asking for offload work is refused (`Unsupported`).
    fn put_vnet(vnet: bool, hdr: &mut [u8], off: &Offload) -> io::Result<()> {
        if vnet {
            hdr.copy_from_slice(&encode_vnet(off));
        } else if !off.is_none() {
            return Err(io::ErrorKind::Unsupported.into());
        }
        Ok(())
    }

    /// Room for `len` more bytes of queued frames, flushing once if there is not.
    fn make_tx_room(&mut self, len: usize) -> io::Result<()> {
        if !self.tx_has_room(len) {
            // Errors are accounted for inside flush; what matters here is whether room was made.
            let _ = self.flush();
            if !self.tx_has_room(len) {
                return Err(io::ErrorKind::WouldBlock.into());
            }
        }
        Ok(())
    }

    fn enqueue(&mut self, frame: &[u8], vnet: &[u8; VNET_HDR_LEN]) -> io::Result<()> {
        self.check_tx_len(frame.len())?;
        let hdr = if self.vnet { &vnet[..] } else { &[][..] };
        let len = hdr.len() + frame.len();
        self.make_tx_room(len)?;
        let start = self.tx_used;
        self.tx_buf[start..start + hdr.len()].copy_from_slice(hdr);
        self.tx_buf[start + hdr.len()..start + len].copy_from_slice(frame);
        self.tx_used += len;
        self.tx_queue.push(Queued::Own { offset: start, len });
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
        self.tx_queue.drain(..sent);
        // Our own bytes still queued start at the first own frame left (they are in order).
        let Some(first) = self.tx_queue.iter().find_map(|q| match q {
            Queued::Own { offset, .. } => Some(*offset),
            Queued::Borrowed { .. } => None,
        }) else {
            self.tx_used = 0;
            return;
        };
        self.tx_buf.copy_within(first..self.tx_used, 0);
        self.tx_used -= first;
        for q in &mut self.tx_queue {
            if let Queued::Own { offset, .. } = q {
                *offset -= first;
            }
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
    fn tx_with(
        &mut self,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> Option<Offload>,
    ) -> io::Result<()> {
        self.check_tx_len(len)?;
        let hdr = self.vnet_len();
        let total = hdr + len;
        self.make_tx_room(total)?;
        let start = self.tx_used;
        let off =
            fill(&mut self.tx_buf[start + hdr..start + total]).ok_or(io::ErrorKind::InvalidData)?;
        Self::put_vnet(self.vnet, &mut self.tx_buf[start..start + hdr], &off)?;
        self.tx_used += total;
        self.tx_queue.push(Queued::Own {
            offset: start,
            len: total,
        });
        Ok(())
    }

    fn headroom(&self) -> Option<usize> {
        Some(self.vnet_len())
    }

    unsafe fn tx_borrowed(&mut self, buf: &mut [u8], at: usize, off: &Offload) -> io::Result<()> {
        let Some(start) = at.checked_sub(self.vnet_len()) else {
            return Err(io::ErrorKind::InvalidInput.into());
        };
        self.check_tx_len(buf.len().saturating_sub(at))?;
        Self::put_vnet(self.vnet, &mut buf[start..at], off)?;
        // A queue slot is all it needs: the bytes stay where they are.
        self.make_tx_room(0)?;
        let frame = &buf[start..];
        self.tx_queue.push(Queued::Borrowed {
            addr: frame.as_ptr() as usize,
            len: frame.len(),
        });
        Ok(())
    }

    fn detach(&mut self) {
        if !self
            .tx_queue
            .iter()
            .any(|q| matches!(q, Queued::Borrowed { .. }))
        {
            return;
        }
        // Rare (the kernel's queue was full at the last flush): the frames left are laid out
        // again in queue order, ours and the borrowed ones, in a second buffer (kept for the
        // next time), so no flow's frames change order.
        let mut buf = std::mem::take(&mut self.tx_spare);
        buf.resize(self.tx_buf.len(), 0);
        let mut used = 0;
        let queue = std::mem::take(&mut self.tx_queue);
        for q in &queue {
            let src: &[u8] = match *q {
                Queued::Own { offset, len } => &self.tx_buf[offset..offset + len],
                // SAFETY: the caller of `tx_borrowed` keeps these bytes valid and unchanged
                // until this copy (its contract); they are not inside either buffer.
                Queued::Borrowed { addr, len } => unsafe {
                    std::slice::from_raw_parts(addr as *const u8, len)
                },
            };
            if buf.len() - used < src.len() {
                self.tx_dropped += 1;
                continue;
            }
            buf[used..used + src.len()].copy_from_slice(src);
            self.tx_queue.push(Queued::Own {
                offset: used,
                len: src.len(),
            });
            used += src.len();
        }
        self.tx_spare = std::mem::replace(&mut self.tx_buf, buf);
        self.tx_used = used;
    }

    fn flush(&mut self) -> io::Result<()> {
        let n = self.tx_queue.len();
        if n == 0 {
            return Ok(());
        }
        let base = self.tx_buf.as_mut_ptr();
        for (i, q) in self.tx_queue.iter().enumerate() {
            let (buf, len) = match *q {
                // SAFETY: offset + len <= tx_used <= tx_buf.len(), so the pointer stays in the
                // buffer.
                Queued::Own { offset, len } => (unsafe { base.add(offset) }, len),
                // Valid until sent or detached: the contract of `tx_borrowed`. The kernel
                // only reads it.
                Queued::Borrowed { addr, len } => (addr as *mut u8, len),
            };
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

/// Make `fd` (bound to `ifindex`) a member of a fanout group: a new one, with [`FLOW_HASH`] as
/// its program, or an existing one.
fn join_fanout(fd: RawFd, ifname: &str, ifindex: u32, how: Fanout) -> Result<FanoutGroup, IoError> {
    let err = |call| move |e| IoError::syscall(call, ifname, e);
    if let Fanout::Join(group) = how {
        sys::setsockopt(fd, libc::SOL_PACKET, PACKET_FANOUT, &group.arg())
            .map_err(err("setsockopt PACKET_FANOUT (join)"))?;
        return Ok(group);
    }
    // A kernel refuses a flag it does not know (EINVAL), so each is dropped in turn.
    // UNIQUEID (Linux 4.4) keeps our group apart from every other in the namespace; without
    // it the pid and the interface make an id unlikely to be anyone else's.
    let own = (std::process::id() as u16) ^ (ifindex as u16).rotate_left(8);
    let attempts = [
        (
            0,
            PACKET_FANOUT_FLAG_UNIQUEID | PACKET_FANOUT_FLAG_IGNORE_OUTGOING,
        ),
        (0, PACKET_FANOUT_FLAG_UNIQUEID),
        (own, PACKET_FANOUT_FLAG_IGNORE_OUTGOING),
        (own, 0),
    ];
    let mut joined = Err(io::Error::from_raw_os_error(libc::EINVAL));
    for (id, flags) in attempts {
        let arg = u32::from(id) | ((PACKET_FANOUT_CBPF | flags) << 16);
        joined = sys::setsockopt(fd, libc::SOL_PACKET, PACKET_FANOUT, &arg);
        match &joined {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => continue,
            _ => break,
        }
    }
    joined.map_err(err("setsockopt PACKET_FANOUT"))?;
    // The id the kernel chose and the flags it kept (it drops UNIQUEID once the id is picked):
    // id | type << 16 | flags >> 8 << 24.
    let v = sys::getsockopt_int(fd, libc::SOL_PACKET, PACKET_FANOUT)
        .map_err(err("getsockopt PACKET_FANOUT"))? as u32;
    let group = FanoutGroup {
        id: v as u16,
        flags: (v >> 24) << 8,
    };
    // Until this, the group sends every frame to its first member, which is all there is.
    sys::setsockopt(fd, libc::SOL_PACKET, PACKET_FANOUT_DATA, &fprog(&FLOW_HASH))
        .map_err(err("setsockopt PACKET_FANOUT_DATA"))?;
    Ok(group)
}

fn attach_filter(fd: RawFd, prog: &'static [libc::sock_filter]) -> io::Result<()> {
    sys::setsockopt(fd, libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, &fprog(prog))
}

/// The kernel copies the program during the setsockopt; `'static` only keeps the pointer
/// obviously valid until then.
fn fprog(prog: &'static [libc::sock_filter]) -> libc::sock_fprog {
    libc::sock_fprog {
        len: prog.len() as libc::c_ushort,
        filter: prog.as_ptr().cast_mut(),
    }
}

/// A classic BPF instruction that does not branch (BPF_STMT).
const fn stmt(code: u32, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    }
}

/// The conditional jump at `pc`: to `yes` if `A <code> k`, else to `no` (BPF_JUMP with the
/// relative offsets worked out from absolute positions).
const fn jump(pc: usize, code: u32, k: u32, yes: usize, no: usize) -> libc::sock_filter {
    assert!(yes > pc && no > pc && yes - pc - 1 <= 255 && no - pc - 1 <= 255);
    libc::sock_filter {
        code: (libc::BPF_JMP | code | libc::BPF_K) as u16,
        jt: (yes - pc - 1) as u8,
        jf: (no - pc - 1) as u8,
        k,
    }
}

/// The unconditional jump at `pc` to `to`.
const fn goto(pc: usize, to: usize) -> libc::sock_filter {
    assert!(to > pc);
    stmt(libc::BPF_JMP | libc::BPF_JA, (to - pc - 1) as u32)
}

/// Offsets from the start of the Ethernet header. The group runs its program before the
/// member's receive function pushes the link-layer header back, so on receive `skb->data` is
/// the network header, while on transmit it is the link-layer header; SKF_LL_OFF-relative
/// loads read the same bytes in both.
const LL: u32 = libc::SKF_LL_OFF as u32;

const LD_W: u32 = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
const LD_H: u32 = libc::BPF_LD | libc::BPF_H | libc::BPF_ABS;
const LD_B: u32 = libc::BPF_LD | libc::BPF_B | libc::BPF_ABS;
const LD_H_IND: u32 = libc::BPF_LD | libc::BPF_H | libc::BPF_IND;
const LD_MEM: u32 = libc::BPF_LD | libc::BPF_MEM;
const LDX_MEM: u32 = libc::BPF_LDX | libc::BPF_MEM;
const LDX_MSH: u32 = libc::BPF_LDX | libc::BPF_B | libc::BPF_MSH;
const ST: u32 = libc::BPF_ST;
const TAX: u32 = libc::BPF_MISC | libc::BPF_TAX;
const XOR_X: u32 = libc::BPF_ALU | libc::BPF_XOR | libc::BPF_X;
const RSH_K: u32 = libc::BPF_ALU | libc::BPF_RSH | libc::BPF_K;
const MUL_K: u32 = libc::BPF_ALU | libc::BPF_MUL | libc::BPF_K;
const RET_A: u32 = libc::BPF_RET | libc::BPF_A;
const RET_K: u32 = libc::BPF_RET | libc::BPF_K;

// Positions the program jumps to.
const V4: usize = 3;
const PORTS4: usize = 13;
const V6: usize = 22;
const PORTS6: usize = 30;
const MIX: usize = 37;
const MIXED: usize = 38;
const OTHER: usize = 44;

/// The fanout group's program: a flow hash the kernel takes modulo the number of members.
///
/// Symmetric: addresses and ports enter by XOR, so a flow and its reply hash alike and one
/// lane sees both directions. IPv4: source ^ destination address, ^ source port ^
/// destination port for TCP and UDP unless the packet is a fragment (any fragment, the first
/// included: MF or an offset), so all fragments of a datagram go where its addresses say.
/// IPv6: the last 32 bits of each address (where hosts of one prefix differ), and the ports when
/// the next header is TCP or UDP (behind extension headers, fragments included, addresses
/// only). Anything else (ARP, ...) goes to the first lane. The result is mixed so that its low
/// bits, which the modulo keeps, depend on every bit: folded to 16 bits, multiplied by an odd
/// constant (2^32 / golden ratio) and the product's bits 16–31 kept. A fold of XORs alone is
/// not enough: Linux gives `connect()` even source ports (`inet_hash_connect`), so every
/// client flow's low port bit is the same, and a parity-like fold sent all eight of iperf3's
/// streams to one of two lanes.
pub const FLOW_HASH: [libc::sock_filter; 45] = [
    /* 0 */ stmt(LD_H, LL + 12), // A = ethertype
    /* 1 */ jump(1, libc::BPF_JEQ, 0x86dd, V6, 2),
    /* 2 */ jump(2, libc::BPF_JEQ, 0x0800, V4, OTHER),
    /* 3 V4 */ stmt(LD_W, LL + 26), // source address
    /* 4 */ stmt(TAX, 0),
    /* 5 */ stmt(LD_W, LL + 30), // destination address
    /* 6 */ stmt(XOR_X, 0),
    /* 7 */ stmt(ST, 0), // M[0] = addresses
    /* 8 */ stmt(LD_H, LL + 20), // flags and fragment offset
    /* 9 */ jump(9, libc::BPF_JSET, 0x3fff, MIX, 10), // MF or an offset: a fragment
    /* 10 */ stmt(LD_B, LL + 23), // protocol
    /* 11 */ jump(11, libc::BPF_JEQ, 6, PORTS4, 12),
    /* 12 */ jump(12, libc::BPF_JEQ, 17, PORTS4, MIX),
    /* 13 PORTS4 */ stmt(LDX_MSH, LL + 14), // X = IPv4 header length
    /* 14 */ stmt(LD_H_IND, LL + 14), // source port
    /* 15 */ stmt(ST, 1),
    /* 16 */ stmt(LD_H_IND, LL + 16), // destination port
    /* 17 */ stmt(LDX_MEM, 1),
    /* 18 */ stmt(XOR_X, 0),
    /* 19 */ stmt(LDX_MEM, 0),
    /* 20 */ stmt(XOR_X, 0), // A = addresses ^ ports
    /* 21 */ goto(21, MIXED),
    /* 22 V6 */ stmt(LD_W, LL + 34), // last word of the source address
    /* 23 */ stmt(TAX, 0),
    /* 24 */ stmt(LD_W, LL + 50), // last word of the destination address
    /* 25 */ stmt(XOR_X, 0),
    /* 26 */ stmt(ST, 0), // M[0] = addresses
    /* 27 */ stmt(LD_B, LL + 20), // next header
    /* 28 */ jump(28, libc::BPF_JEQ, 6, PORTS6, 29),
    /* 29 */ jump(29, libc::BPF_JEQ, 17, PORTS6, MIX),
    /* 30 PORTS6 */ stmt(LD_H, LL + 54), // source port
    /* 31 */ stmt(TAX, 0),
    /* 32 */ stmt(LD_H, LL + 56), // destination port
    /* 33 */ stmt(XOR_X, 0),
    /* 34 */ stmt(LDX_MEM, 0),
    /* 35 */ stmt(XOR_X, 0), // A = addresses ^ ports
    /* 36 */ goto(36, MIXED),
    /* 37 MIX */ stmt(LD_MEM, 0), // A = addresses alone
    /* 38 MIXED */ stmt(TAX, 0),
    /* 39 */ stmt(RSH_K, 16),
    /* 40 */ stmt(XOR_X, 0), // A ^= A >> 16
    /* 41 */ stmt(MUL_K, 0x9e37_79b1), // A *= 2^32 / golden ratio (odd)
    /* 42 */ stmt(RSH_K, 16), // the product's upper half: every bit of A enters bit 16
    /* 43 */ stmt(RET_A, 0),
    /* 44 OTHER */ stmt(RET_K, 0),
];

/// The socket filter of a fanout member: drop what the host sends out of the interface,
/// keep the rest whole.
const DROP_OUTGOING: [libc::sock_filter; 4] = [
    /* 0 */
    stmt(LD_W, (libc::SKF_AD_OFF + libc::SKF_AD_PKTTYPE) as u32),
    /* 1 */ jump(1, libc::BPF_JEQ, PACKET_OUTGOING, 2, 3),
    /* 2 */ stmt(RET_K, 0),
    /* 3 */ stmt(RET_K, u32::MAX),
];

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

    /// A classic BPF interpreter for the opcodes of [`FLOW_HASH`] and [`DROP_OUTGOING`], with
    /// the kernel's rule that a load outside the frame ends the program with 0. `frame` starts
    /// at the Ethernet header; only SKF_LL_OFF-relative loads and the packet-type ancillary
    /// load are known (the programs use nothing else).
    fn run(prog: &[libc::sock_filter], frame: &[u8], pkttype: u32) -> u32 {
        let load = |off: u32, size: usize| -> Option<u32> {
            if off == (libc::SKF_AD_OFF + libc::SKF_AD_PKTTYPE) as u32 {
                return Some(pkttype);
            }
            let at = off.checked_sub(LL).filter(|&at| at < 0x10_0000)? as usize;
            let bytes = frame.get(at..at + size)?;
            Some(bytes.iter().fold(0, |v, &b| (v << 8) | u32::from(b)))
        };
        let (mut a, mut x, mut m) = (0u32, 0u32, [0u32; 16]);
        let mut pc = 0;
        loop {
            let i = prog[pc];
            pc += 1;
            let (code, k) = (u32::from(i.code), i.k);
            let size = match code & 0x18 {
                libc::BPF_W => 4,
                libc::BPF_H => 2,
                _ => 1,
            };
            match code {
                LD_W | LD_H | LD_B => match load(k, size) {
                    Some(v) => a = v,
                    None => return 0,
                },
                LD_H_IND => match load(x.wrapping_add(k), 2) {
                    Some(v) => a = v,
                    None => return 0,
                },
                LDX_MSH => match load(k, 1) {
                    Some(v) => x = 4 * (v & 0xf),
                    None => return 0,
                },
                LD_MEM => a = m[k as usize],
                LDX_MEM => x = m[k as usize],
                ST => m[k as usize] = a,
                TAX => x = a,
                XOR_X => a ^= x,
                RSH_K => a >>= k,
                MUL_K => a = a.wrapping_mul(k),
                RET_A => return a,
                RET_K => return k,
                c if c == libc::BPF_JMP | libc::BPF_JA => pc += k as usize,
                c if c & 0x07 == libc::BPF_JMP => {
                    let yes = match c & 0xf0 {
                        libc::BPF_JEQ => a == k,
                        libc::BPF_JSET => a & k != 0,
                        _ => panic!("jump {c:#x} not interpreted"),
                    };
                    pc += usize::from(if yes { i.jt } else { i.jf });
                }
                c => panic!("opcode {c:#x} at {} not interpreted", pc - 1),
            }
        }
    }

    fn hash(frame: &[u8]) -> u32 {
        run(&FLOW_HASH, frame, 0)
    }

    /// What FLOW_HASH should compute, written the plain way.
    fn model(addresses: u32, ports: Option<(u16, u16)>) -> u32 {
        let mut h = addresses ^ ports.map_or(0, |(s, d)| u32::from(s ^ d));
        h ^= h >> 16;
        h.wrapping_mul(0x9e37_79b1) >> 16
    }

    fn ethernet(ethertype: u16) -> Vec<u8> {
        let mut f = vec![2, 0, 0, 0, 0, 0xa, 2, 0, 0, 0, 0, 0xb];
        f.extend_from_slice(&ethertype.to_be_bytes());
        f
    }

    /// An IPv4 packet with `options` 32-bit words of IP options and `frag` as its flags and
    /// fragment offset field.
    fn ipv4(proto: u8, src: u32, dst: u32, ports: (u16, u16), frag: u16, options: u8) -> Vec<u8> {
        let mut f = ethernet(0x0800);
        f.extend_from_slice(&[0x45 + options, 0, 0, 0, 0, 0]);
        f.extend_from_slice(&frag.to_be_bytes());
        f.extend_from_slice(&[64, proto, 0, 0]);
        f.extend_from_slice(&src.to_be_bytes());
        f.extend_from_slice(&dst.to_be_bytes());
        f.extend(std::iter::repeat_n(1, 4 * usize::from(options)));
        f.extend_from_slice(&ports.0.to_be_bytes());
        f.extend_from_slice(&ports.1.to_be_bytes());
        f.extend_from_slice(&[0xee; 16]);
        f
    }

    fn ipv6(next: u8, src: [u8; 16], dst: [u8; 16], ports: (u16, u16)) -> Vec<u8> {
        let mut f = ethernet(0x86dd);
        f.extend_from_slice(&[0x60, 0, 0, 0, 0, 24, next, 64]);
        f.extend_from_slice(&src);
        f.extend_from_slice(&dst);
        f.extend_from_slice(&ports.0.to_be_bytes());
        f.extend_from_slice(&ports.1.to_be_bytes());
        f.extend_from_slice(&[0xee; 20]);
        f
    }

    /// xorshift64: reproducible test flows without a dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn v6(&mut self) -> [u8; 16] {
            let mut a = [0u8; 16];
            a[..8].copy_from_slice(&self.next().to_be_bytes());
            a[8..].copy_from_slice(&self.next().to_be_bytes());
            a
        }
    }

    fn word(a: &[u8; 16]) -> u32 {
        u32::from_be_bytes([a[12], a[13], a[14], a[15]])
    }

    #[test]
    fn flow_hash_is_symmetric_and_covers_the_ports() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..500 {
            let r = rng.next();
            let (src, dst) = (r as u32, (r >> 32) as u32);
            let r = rng.next();
            let ports = (r as u16, (r >> 16) as u16);
            let back = (ports.1, ports.0);
            for proto in [6, 17] {
                for options in [0, 3] {
                    let h = hash(&ipv4(proto, src, dst, ports, 0, options));
                    assert_eq!(h, model(src ^ dst, Some(ports)));
                    assert_eq!(h, hash(&ipv4(proto, dst, src, back, 0, options)));
                }
            }
            // Another protocol: its "ports" are not ports.
            assert_eq!(
                hash(&ipv4(47, src, dst, ports, 0, 0)),
                model(src ^ dst, None)
            );
            let (s6, d6) = (rng.v6(), rng.v6());
            for next in [6, 17] {
                let h = hash(&ipv6(next, s6, d6, ports));
                assert_eq!(h, model(word(&s6) ^ word(&d6), Some(ports)));
                assert_eq!(h, hash(&ipv6(next, d6, s6, back)));
            }
            assert_eq!(
                hash(&ipv6(58, s6, d6, ports)),
                model(word(&s6) ^ word(&d6), None)
            );
        }
    }

    #[test]
    fn flow_hash_spreads_flows_over_lanes() {
        let mut rng = Rng(42);
        let flows: Vec<Vec<u8>> = (0..1000)
            .map(|i| {
                let r = rng.next();
                let ports = (r as u16, (r >> 16) as u16);
                if i % 2 == 0 {
                    ipv4(17, (r >> 32) as u32, rng.next() as u32, ports, 0, 0)
                } else {
                    ipv6(6, rng.v6(), rng.v6(), ports)
                }
            })
            .collect();
        // Two hosts, flows apart only by the client's port: what one busy pair of hosts looks
        // like, and what the lanes integration test sends.
        let ports: Vec<Vec<u8>> = (0..1000)
            .map(|p| ipv4(6, 0xc612_0001, 0xc612_0002, (40000 + p, 443), 0, 0))
            .collect();
        // Linux gives connect() even source ports: a client's flows differ only above bit 0.
        let even: Vec<Vec<u8>> = (0..1000)
            .map(|p| ipv4(6, 0xc612_0102, 0xc612_0202, (40000 + 2 * p, 5201), 0, 0))
            .collect();
        for set in [&flows, &ports, &even] {
            for lanes in [2u32, 3, 4] {
                let mut per_lane = vec![0usize; lanes as usize];
                for f in set.iter() {
                    per_lane[(hash(f) % lanes) as usize] += 1;
                }
                // Within 40% of an even share.
                let even = set.len() / lanes as usize;
                assert!(
                    per_lane.iter().all(|&n| n * 10 >= even * 6),
                    "{lanes} lanes: {per_lane:?}"
                );
            }
        }
    }

    /// iperf3 -P 8 from one client: eight connections on consecutive even ports. A good mix
    /// puts all eight on one of two lanes for about 1 start port in 128; the XOR fold this
    /// replaced did it for every start port whose eight fit in one block of 256.
    #[test]
    fn eight_streams_of_one_client_use_both_of_two_lanes() {
        let one_lane = (0..200u16)
            .filter(|k| {
                let first = 33_000 + 2 * 37 * k;
                let lanes: Vec<u32> = (0..8)
                    .map(|i| {
                        hash(&ipv4(
                            6,
                            0xc612_0102,
                            0xc612_0202,
                            (first + 2 * i, 5201),
                            0,
                            0,
                        )) % 2
                    })
                    .collect();
                lanes.iter().all(|&l| l == lanes[0])
            })
            .count();
        assert!(one_lane <= 8, "{one_lane} of 200 clients on one lane");
    }

    #[test]
    fn fragments_hash_by_addresses_alone() {
        let (src, dst) = (0xc612_0001, 0xc612_0002);
        let whole = model(src ^ dst, None);
        // The first fragment (MF, offset 0) still carries the ports, the later ones do not;
        // all go by addresses so they meet on one lane.
        for frag in [0x2000, 0x2000 | 185, 185, 0x4000 | 0x2000] {
            let frag = frag & 0x3fff;
            assert_eq!(hash(&ipv4(17, src, dst, (1234, 53), frag, 0)), whole);
            assert_eq!(hash(&ipv4(17, dst, src, (7, 7), frag, 0)), whole);
        }
        // Don't-fragment alone is no fragment.
        assert_eq!(
            hash(&ipv4(17, src, dst, (1234, 53), 0x4000, 0)),
            model(src ^ dst, Some((1234, 53)))
        );
        // IPv6 with a fragment header (44) first.
        let (s6, d6) = ([1; 16], [2; 16]);
        assert_eq!(
            hash(&ipv6(44, s6, d6, (1234, 53))),
            model(word(&s6) ^ word(&d6), None)
        );
    }

    #[test]
    fn flow_hash_sends_other_frames_to_the_first_lane() {
        let mut arp = ethernet(0x0806);
        arp.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        arp.extend_from_slice(&[0x11; 20]);
        assert_eq!(hash(&arp), 0);
        assert_eq!(hash(&ethernet(0x88b5)), 0);
        // Cut short: the kernel ends the program with 0 at the first load past the end.
        let cut = ipv4(6, 1, 2, (3, 4), 0, 0);
        assert_eq!(hash(&cut[..30]), 0);
        assert_eq!(hash(&cut[..36]), 0);
    }

    #[test]
    fn fanout_members_drop_only_outgoing_frames() {
        let f = ipv4(6, 1, 2, (3, 4), 0, 0);
        assert_eq!(run(&DROP_OUTGOING, &f, PACKET_OUTGOING), 0);
        for host_broadcast_multicast_otherhost in 0..4 {
            assert_eq!(
                run(&DROP_OUTGOING, &f, host_broadcast_multicast_otherhost),
                u32::MAX
            );
        }
    }

    #[test]
    fn flow_hash_labels_point_at_their_instructions() {
        assert_eq!(FLOW_HASH[V4].k, LL + 26);
        assert_eq!(FLOW_HASH[PORTS4].code as u32, LDX_MSH);
        assert_eq!(FLOW_HASH[V6].k, LL + 34);
        assert_eq!(FLOW_HASH[PORTS6].k, LL + 54);
        assert_eq!(FLOW_HASH[MIX].code as u32, LD_MEM);
        assert_eq!(FLOW_HASH[MIXED].code as u32, TAX);
        assert_eq!(FLOW_HASH[OTHER].code as u32, RET_K);
        assert!(FLOW_HASH.len() <= libc::BPF_MAXINSNS as usize);
    }

    #[test]
    fn missing_interface_is_named() {
        let err = AfPacket::open("dva-nosuch0", &AfPacketConfig::default()).unwrap_err();
        assert!(err.to_string().contains("dva-nosuch0"), "{err}");
    }
}
