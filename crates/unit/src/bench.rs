//! The role cores driven without sockets, for this crate's benchmarks (`benches/`, feature
//! `bench`) and the conformance harness: what the unit runs per packet, measured as it runs,
//! with backplanes that keep datagrams in memory. Not an API.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use dva_io::backplane::{BackplaneTx, Origin};
use dva_io::{FrameIo, RxMeta};
use dva_proto::{DataplaneConfig, DispatcherConfig};
use dva_wire::EthernetAddress;

use crate::stats::UnitStats;
use crate::{dataplane, dispatcher};

/// Room for the largest datagram a slot takes (the backplane MTU is 9000).
pub const SLOT_LEN: usize = 9000;

/// A backplane that keeps the last datagram sent, in place (no allocation per datagram): a
/// benchmark reads it back or hands it to the next core.
#[derive(Debug)]
pub struct SlotTx {
    buf: Vec<u8>,
    len: usize,
    dst: Option<SocketAddr>,
    /// Datagrams sent so far.
    pub sent: u64,
}

impl Default for SlotTx {
    fn default() -> Self {
        SlotTx {
            buf: vec![0; SLOT_LEN],
            len: 0,
            dst: None,
            sent: 0,
        }
    }
}

impl SlotTx {
    /// The last datagram sent and where to.
    pub fn last(&self) -> Option<(SocketAddr, &[u8])> {
        self.dst.map(|d| (d, &self.buf[..self.len]))
    }
}

impl BackplaneTx for SlotTx {
    #[inline]
    fn tx_slot(&mut self) -> Option<&mut [u8]> {
        Some(&mut self.buf)
    }
    #[inline]
    fn commit_slot(&mut self, len: usize, dst: SocketAddr) {
        self.len = len;
        self.dst = Some(dst);
        self.sent += 1;
    }
    fn send_with(&mut self, len: usize, dst: SocketAddr, fill: impl FnOnce(&mut [u8])) -> bool {
        let Some(buf) = self.buf.get_mut(..len) else {
            return false;
        };
        fill(buf);
        self.commit_slot(len, dst);
        true
    }
}

/// An interface that counts what is sent on it and receives nothing.
#[derive(Debug, Default)]
pub struct NullPort {
    /// Frames sent so far.
    pub sent: u64,
    /// Where frames built in place are built (reused, as a driver's buffer is).
    frame: Vec<u8>,
}

impl FrameIo for NullPort {
    fn rx_batch<F: FnMut(&[u8], RxMeta)>(&mut self, _max: usize, _f: F) -> std::io::Result<usize> {
        Ok(0)
    }
    #[inline]
    fn tx(&mut self, _frame: &[u8]) -> std::io::Result<()> {
        self.sent += 1;
        Ok(())
    }
    #[inline]
    fn tx_with(
        &mut self,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> Option<dva_io::Offload>,
    ) -> std::io::Result<()> {
        self.frame.resize(len, 0);
        fill(&mut self.frame).ok_or(std::io::ErrorKind::InvalidData)?;
        self.sent += 1;
        Ok(())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        -1
    }
}

/// A data plane's core sending into a [`SlotTx`].
pub struct Dataplane {
    core: dataplane::Core<SlotTx>,
}

impl Dataplane {
    pub fn new(cfg: DataplaneConfig, now: Instant) -> anyhow::Result<Dataplane> {
        Ok(Dataplane {
            core: dataplane::Core::new(cfg, SlotTx::default(), now)?,
        })
    }

    /// A turn's work before its batch, at `now` (see the unit's loop).
    pub fn begin_turn(&mut self, now: Instant) {
        self.core.begin_turn(now)
    }

    /// A turn's work after its batch.
    pub fn end_turn(&mut self) {
        self.core.end_turn()
    }

    /// One datagram, as the backplane delivers it.
    #[inline]
    pub fn on_packet(&mut self, datagram: &[u8], from: Origin) {
        self.core.on_packet(datagram, from)
    }

    pub fn tx(&self) -> &SlotTx {
        &self.core.tx
    }

    pub fn snapshot(&self) -> UnitStats {
        self.core.snapshot()
    }
}

/// A dispatcher's core; interface `i` has the MAC and MTU of `links[i]`.
pub struct Dispatcher {
    core: dispatcher::Core,
}

impl Dispatcher {
    pub fn new(
        cfg: DispatcherConfig,
        links: &[(EthernetAddress, usize)],
        now: Instant,
    ) -> anyhow::Result<Dispatcher> {
        Ok(Dispatcher {
            core: dispatcher::Core::with_links(Arc::new(cfg), links, now)?,
        })
    }

    pub fn set_now(&mut self, now: Instant) {
        self.core.set_now(now)
    }

    /// A frame received on interface `port`.
    #[inline]
    pub fn on_frame(&mut self, port: usize, frame: &[u8], meta: RxMeta, bp: &mut impl BackplaneTx) {
        self.core.on_frame(port, frame, meta, bp)
    }

    /// A datagram from a data plane, to route out of `ports`.
    #[inline]
    pub fn on_backplane(&mut self, datagram: &[u8], from: Origin, ports: &mut [impl FrameIo]) {
        self.core.on_backplane(datagram, from, ports)
    }

    /// Frames answered during `on_frame` (ARP, ND), sent now.
    pub fn send_deferred(&mut self, ports: &mut [impl FrameIo]) {
        self.core.send_deferred(ports)
    }

    pub fn snapshot(&self) -> UnitStats {
        self.core.snapshot()
    }
}
