//! Packet I/O for dva on Linux: the only layer that touches interfaces, sockets and
//! shared rings.
//!
//! Contract of this layer:
//! - Every packet driver implements [`FrameIo`]: non-blocking batch receive that lends
//!   frames straight out of the driver's buffers (no copy where the driver allows),
//!   queued transmit that copies into the driver's buffers (or, with [`FrameIo::tx_with`],
//!   builds the frame right there), and one syscall per batch on [`FrameIo::flush`]. A full transmit queue is an `Err(WouldBlock)` the caller
//!   counts as a drop; nothing here blocks or spins.
//! - Drivers: [`af_xdp::AfXdp`] (an XDP program redirecting to an AF_XDP socket, copy mode)
//!   and [`af_packet::AfPacket`] (TPACKET_V3 RX ring, `sendmmsg` TX) for the appliance's
//!   interfaces, with [`port::Port`] choosing between them (AF_XDP first, AF_PACKET when XDP
//!   cannot attach), [`udp::UdpEndpoint`] (`recvmmsg`/`sendmmsg`) for the GENEVE
//!   backplane, [`memory::MemoryIo`] for tests and benchmarks.
//! - [`backplane::Backplane`]: a unit's backplane endpoint, GENEVE over UDP to other machines
//!   and over [`shm`] rings (no syscall per packet) to peers on the same machine, with every
//!   UDP datagram [`seal`]ed (authenticated for its receiver, its packet encrypted).
//! - [`capture`]: packet capture inside the data path (a tap on any device or on the
//!   backplane, bounded, never blocking), written out as pcap.
//! - Helpers around them: [`netif`] (interface index, MAC, MTU, admin up, the device holding
//!   an address), [`netns`] (enter a named network namespace), [`poll`] (wait for readability
//!   without allocating), [`local`] (file modes and peer credentials of what dva creates on
//!   the machine).
//! - Setup errors are [`IoError`]s naming the syscall, the interface or address and the
//!   errno. Data-path errors are plain `std::io::Error`s so the hot path stays cheap.
//! - The packet path's `unsafe` (mmap, ring access, raw socket syscalls, the bpf(2) calls that
//!   load the XDP program) lives in this crate. Outside it, `unsafe` is confined to a few
//!   process and CPU syscalls: in `dva-unit` prctl, sched_setaffinity, flock, sysconf and
//!   getrlimit; in `dva-mgmt` pidfd_open, pidfd_send_signal, kill and a zero-timeout poll; in
//!   the `dva` binary kill and sysconf. `wire`, `flow`, `services`, `proto` and `lab` forbid
//!   it. Every block has a `// SAFETY:` comment (workspace lint
//!   `clippy::undocumented_unsafe_blocks`).
//!
//! Sockets belong to the network namespace of the thread that creates them: the caller
//! enters the namespace first ([`netns::enter`] or [`netns::in_netns`]), then opens.
//!
//! A receive loop, the way a dispatcher uses this layer:
//!
//! ```no_run
//! use dva_io::af_packet::{AfPacket, AfPacketConfig};
//! use dva_io::{poll::Poller, udp::UdpEndpoint, FrameIo};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut port = AfPacket::open("out0", &AfPacketConfig::default())?;
//! let mut backplane = UdpEndpoint::bind("198.18.0.1:6081".parse()?)?;
//! let dst = "198.18.0.2:6081".parse()?;
//! let mut poller = Poller::new(&[port.as_raw_fd(), backplane.as_raw_fd()]);
//! loop {
//!     let n = port.rx_batch(64, |frame, _meta| {
//!         if let Some(slot) = backplane.tx_slot() {
//!             slot[..frame.len()].copy_from_slice(frame); // really: GENEVE header + packet
//!             backplane.commit_slot(frame.len(), dst);
//!         }
//!     })?;
//!     backplane.flush()?;
//!     if n == 0 {
//!         poller.wait(20)?;
//!     }
//! }
//! # }
//! ```

pub mod af_packet;
pub mod af_xdp;
pub mod backplane;
mod bpf;
pub mod capture;
mod error;
pub mod local;
pub mod memory;
pub mod netif;
pub mod netns;
pub mod poll;
pub mod port;
pub mod seal;
pub mod shm;
mod sys;
pub mod udp;

pub use error::IoError;

use std::os::fd::RawFd;

/// A packet driver: batch receive with frames borrowed from the driver's buffers, batch transmit.
pub trait FrameIo {
    /// Receive up to `max` frames, calling `f(frame, meta)` for each; frames are borrowed (no copy)
    /// where the driver allows. Never blocks. Returns how many frames were delivered.
    fn rx_batch<F: FnMut(&[u8], RxMeta)>(&mut self, max: usize, f: F) -> std::io::Result<usize>;

    /// Queue one frame for transmission (copied into the driver's tx buffer). Returns
    /// `Err(WouldBlock)` when the tx queue is full (caller counts a drop). Does not necessarily
    /// send until `flush`.
    fn tx(&mut self, frame: &[u8]) -> std::io::Result<()>;

    /// Push queued frames to the kernel (one syscall per batch).
    fn flush(&mut self) -> std::io::Result<()>;

    /// Whether [`FrameIo::tx_offload`] can hand the kernel a super-packet or a partial
    /// checksum to finish (AF_PACKET with a virtio-net header can; AF_XDP cannot).
    fn offloads(&self) -> bool {
        false
    }

    /// Queue one frame with offload work for the kernel: segmentation of a super-packet
    /// (`off.gso`) and/or completion of a partial L4 checksum (`off.needs_csum`). Drivers
    /// without offloads answer `Unsupported`; the caller segments or completes in software.
    fn tx_offload(&mut self, frame: &[u8], off: &Offload) -> std::io::Result<()> {
        if off.is_none() {
            return self.tx(frame);
        }
        Err(std::io::ErrorKind::Unsupported.into())
    }

    /// Queue one frame of `len` bytes built in place: `fill` writes every byte of it straight
    /// into the driver's transmit buffer (one copy fewer than building it elsewhere and calling
    /// [`FrameIo::tx`]: a forwarded super-packet is 64 KB) and answers the offload work it
    /// leaves to the kernel (`Offload::default()` for none; other work only where
    /// [`FrameIo::offloads`]), or `None` to take the frame back: nothing is queued and the
    /// answer is `InvalidData`. Full queue: `WouldBlock`, and `fill` is not called.
    fn tx_with(
        &mut self,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> Option<Offload>,
    ) -> std::io::Result<()> {
        // Drivers without a buffer of their own to build in (tests, benchmarks).
        let mut frame = vec![0; len];
        let off = fill(&mut frame).ok_or(std::io::ErrorKind::InvalidData)?;
        self.tx_offload(&frame, &off)
    }

    /// Whether the driver can send a frame from where the caller keeps it
    /// ([`FrameIo::tx_borrowed`]), and how many bytes in front of it it needs for a header of
    /// its own; `None`: it copies every frame.
    fn headroom(&self) -> Option<usize> {
        None
    }

    /// Queue the frame `buf[at..]` to be sent from where it lies, not copied (a super-packet
    /// forwarded from a backplane ring is then written by nobody but the kernel); the driver
    /// may write its own header into the [`FrameIo::headroom`] bytes before `at`. Errors as
    /// [`FrameIo::tx_offload`]; a driver that cannot borrow copies it.
    ///
    /// # Safety
    /// The bytes of `buf` must stay valid and unchanged until [`FrameIo::flush`] has sent the
    /// frame or [`FrameIo::detach`] has copied it (before they are given back or reused).
    unsafe fn tx_borrowed(
        &mut self,
        buf: &mut [u8],
        at: usize,
        off: &Offload,
    ) -> std::io::Result<()> {
        self.tx_offload(&buf[at..], off)
    }

    /// Copy every frame still queued by reference (a flush that met a full kernel queue) into
    /// the driver's own buffer: the caller is about to give their memory back.
    fn detach(&mut self) {}

    /// File descriptor to poll(2) for readability.
    fn as_raw_fd(&self) -> RawFd;

    /// Every descriptor to poll(2) for readability (a driver with a socket per receive queue
    /// has several).
    fn poll_fds(&self) -> Vec<RawFd> {
        vec![self.as_raw_fd()]
    }
}

/// What the driver knows about a received frame besides its bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RxMeta {
    /// Kernel said the L4 checksum is not filled in (TP_STATUS_CSUMNOTREADY: offload left it
    /// partial). The frame is locally generated or came over a veth; the checksum field holds
    /// only the pseudo-header sum.
    pub csum_not_ready: bool,
    /// Frame length on the wire as the kernel saw it (may exceed the captured length).
    pub wire_len: u32,
    /// Captured bytes were truncated by the ring's frame size (tp_snaplen < tp_len).
    pub truncated: bool,
    /// The kernel (or NIC) already verified the L4 checksum (TP_STATUS_CSUM_VALID).
    pub csum_valid: bool,
    /// A VLAN tag the kernel stripped from the frame before it reached the ring
    /// (TP_STATUS_VLAN_VALID): the bytes handed to the callback no longer contain it.
    pub vlan_tci: Option<u16>,
    /// The driver cannot tell whether the L4 checksum is complete: AF_XDP on a veth, whose
    /// peer may have left it partial (CHECKSUM_PARTIAL) with no way to say so. The consumer
    /// verifies TCP/UDP checksums of such frames and completes the ones that do not verify.
    pub csum_unknown: bool,
    /// Offload state of the frame (AF_PACKET with a virtio-net header only): a GSO/GRO
    /// super-packet larger than the MTU, and where its partial checksum is.
    pub offload: Offload,
}

/// What a GSO super-packet is made of (virtio-net `gso_type`, without the ECN bit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum GsoType {
    /// An ordinary frame.
    #[default]
    None,
    TcpV4,
    TcpV6,
    /// UDP segmentation offload (one UDP header per segment).
    UdpL4,
    /// A type dva does not segment (UFO's IP fragmentation, or unknown): dropped, counted.
    Other(u8),
}

impl GsoType {
    /// Decode virtio-net's `gso_type` (ECN bit excluded).
    pub fn from_virtio(t: u8) -> GsoType {
        match t {
            0 => GsoType::None,
            1 => GsoType::TcpV4,
            4 => GsoType::TcpV6,
            5 => GsoType::UdpL4,
            other => GsoType::Other(other),
        }
    }

    /// virtio-net's `gso_type` (ECN bit excluded).
    pub fn to_virtio(self) -> u8 {
        match self {
            GsoType::None => 0,
            GsoType::TcpV4 => 1,
            GsoType::TcpV6 => 4,
            GsoType::UdpL4 => 5,
            GsoType::Other(t) => t,
        }
    }
}

/// The offload metadata of a frame, as in `struct virtio_net_hdr`: how the kernel (or we)
/// must cut a super-packet into wire-sized frames, and which checksum is still to be
/// finished. Offsets count from the start of the Ethernet frame.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Offload {
    pub gso: GsoType,
    /// The sender set CWR on a segment (VIRTIO_NET_HDR_GSO_ECN): only the first segment
    /// carries it.
    pub ecn: bool,
    /// Payload bytes per segment (the MSS for TCP).
    pub gso_size: u16,
    /// The L4 checksum field holds only the pseudo-header sum (CHECKSUM_PARTIAL): sum from
    /// `csum_start` to the end and store the result at `csum_start + csum_offset`.
    pub needs_csum: bool,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl Offload {
    /// Nothing for the kernel to do.
    pub fn is_none(&self) -> bool {
        self.gso == GsoType::None && !self.needs_csum
    }
}
