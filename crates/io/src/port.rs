//! The appliance's interface driver, chosen at open time per interface. `auto`: AF_PACKET with
//! virtio-net headers on a veth whose segmentation offload is on (its peer sends 64 KB
//! super-packets, which AF_PACKET takes whole; attaching XDP would turn the peer's segmentation
//! off and cost every super-packet ~45 wire-sized frames), AF_XDP everywhere else it attaches
//! (small frames, NICs), AF_PACKET where it does not.
//!
//! Lanes ([`Port::open_lanes`]): several ports on one interface, one per data-path thread,
//! whose receive sides share the interface's frames. AF_XDP gives each lane its own receive
//! queues, so the device's RSS spreads the flows; AF_PACKET puts the lanes' sockets in one
//! fanout group that spreads them by a symmetric flow hash. Under `auto`, a device with fewer
//! receive queues than lanes takes AF_PACKET.
//!
//! An enum rather than `Box<dyn FrameIo>`: `FrameIo::rx_batch` is generic over the callback
//! (so the per-frame call inlines), which makes the trait not object-safe, and a two-way match
//! per batch costs nothing next to the batch itself.

use std::fmt;
use std::io;
use std::os::fd::RawFd;
use std::str::FromStr;

use crate::af_packet::{AfPacket, AfPacketConfig};
use crate::af_xdp::{AfXdp, AfXdpConfig};
use crate::{FrameIo, IoError, Offload, RxMeta};

/// Which driver to use for an interface.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DriverChoice {
    /// AF_PACKET on a veth with segmentation offload on, else AF_XDP, falling back to
    /// AF_PACKET (with the reason) when it cannot be set up.
    #[default]
    Auto,
    /// AF_XDP or fail.
    AfXdp,
    /// AF_PACKET only.
    AfPacket,
}

impl FromStr for DriverChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" | "" => Ok(DriverChoice::Auto),
            "af_xdp" | "xdp" => Ok(DriverChoice::AfXdp),
            "af_packet" | "packet" => Ok(DriverChoice::AfPacket),
            other => Err(format!(
                "unknown driver {other:?}: expected af_xdp, af_packet or auto"
            )),
        }
    }
}

/// An open interface with whichever driver it got.
// One per interface and lane, so its size does not matter; boxing the larger driver would add
// an indirection to every packet.
#[allow(clippy::large_enum_variant)]
pub enum Port {
    AfXdp(AfXdp),
    AfPacket(AfPacket),
}

/// What `Port::open` did, for the caller's log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    /// `Port::driver()` of the result.
    pub driver: &'static str,
    /// Why AF_XDP was not used under `Auto`, if it was not (it did not attach, the device
    /// carries super-packets, or it has fewer receive queues than lanes were asked for).
    pub fallback: Option<String>,
}

impl fmt::Display for Opened {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.fallback {
            None => f.write_str(self.driver),
            Some(why) => write!(f, "{} (not AF_XDP: {why})", self.driver),
        }
    }
}

impl Port {
    /// Open `ifname` with `choice` and default driver settings.
    pub fn open(ifname: &str, choice: DriverChoice) -> Result<(Port, Opened), IoError> {
        Port::open_with(ifname, choice, 0)
    }

    /// As [`Port::open`], with AF_XDP busy polling of `busy_poll_us` microseconds (0: off;
    /// see [`AfXdpConfig::busy_poll_us`]).
    pub fn open_with(
        ifname: &str,
        choice: DriverChoice,
        busy_poll_us: u32,
    ) -> Result<(Port, Opened), IoError> {
        let (ports, opened) = Port::open_lanes(ifname, choice, busy_poll_us, 1)?;
        match ports.into_iter().next() {
            Some(port) => Ok((port, opened)),
            None => Err(no_lanes()),
        }
    }

    /// Open `ifname` as `lanes` ports (`lanes` >= 1) whose receive sides together take every
    /// frame once, each port for one data-path thread; each port can transmit any frame.
    /// Both directions of a flow reach the same lane under AF_PACKET (a symmetric flow hash);
    /// under AF_XDP the device's receive-side scaling decides, as for any queue. AF_XDP needs
    /// a receive queue per lane: with fewer, `AfXdp` fails and `Auto` takes AF_PACKET (saying
    /// why in [`Opened::fallback`]). One lane is exactly [`Port::open_with`].
    pub fn open_lanes(
        ifname: &str,
        choice: DriverChoice,
        busy_poll_us: u32,
        lanes: usize,
    ) -> Result<(Vec<Port>, Opened), IoError> {
        if lanes == 0 {
            return Err(no_lanes());
        }
        let cfg = AfXdpConfig {
            busy_poll_us,
            ..AfXdpConfig::default()
        };
        let xdp = || {
            AfXdp::open_lanes(ifname, &cfg, lanes)
                .map(|l| l.into_iter().map(Port::AfXdp).collect::<Vec<_>>())
        };
        let packet = || {
            AfPacket::open_lanes(ifname, &AfPacketConfig::default(), lanes)
                .map(|l| l.into_iter().map(Port::AfPacket).collect::<Vec<_>>())
        };
        let (ports, fallback) = match choice {
            DriverChoice::AfXdp => (xdp()?, None),
            DriverChoice::AfPacket => (packet()?, None),
            DriverChoice::Auto if carries_super_packets(ifname) => (
                packet()?,
                Some(
                    "a veth with segmentation offload on: its peer sends 64 KB super-packets, \
                     which AF_PACKET takes whole"
                        .into(),
                ),
            ),
            DriverChoice::Auto => match xdp() {
                Ok(p) => (p, None),
                Err(e) => (packet()?, Some(e.to_string())),
            },
        };
        let Some(driver) = ports.first().map(Port::driver) else {
            return Err(no_lanes());
        };
        Ok((ports, Opened { driver, fallback }))
    }

    /// "af_xdp (native)", "af_xdp (generic)" or "af_packet".
    pub fn driver(&self) -> &'static str {
        match self {
            Port::AfXdp(p) => match p.mode() {
                crate::af_xdp::XdpMode::Native => "af_xdp (native)",
                crate::af_xdp::XdpMode::Generic => "af_xdp (generic)",
            },
            Port::AfPacket(_) => "af_packet",
        }
    }

    /// Frames the kernel dropped on the way in (ring full, no buffer, too long).
    pub fn rx_drops(&self) -> u64 {
        match self {
            Port::AfXdp(p) => p.stats().drops(),
            Port::AfPacket(p) => p.stats().drops,
        }
    }
}

fn no_lanes() -> IoError {
    IoError::InvalidConfig {
        field: "lanes",
        value: 0,
        reason: "must be at least 1",
    }
}

/// Whether `ifname` is a veth whose peer hands it super-packets: TSO on (see
/// [`crate::netif::tso_enabled`]). A device that cannot say is taken as not.
fn carries_super_packets(ifname: &str) -> bool {
    crate::netif::driver(ifname).is_ok_and(|d| d == "veth")
        && crate::netif::tso_enabled(ifname).unwrap_or(false)
}

impl FrameIo for Port {
    #[inline]
    fn rx_batch<F: FnMut(&[u8], RxMeta)>(&mut self, max: usize, f: F) -> io::Result<usize> {
        match self {
            Port::AfXdp(p) => p.rx_batch(max, f),
            Port::AfPacket(p) => p.rx_batch(max, f),
        }
    }

    #[inline]
    fn tx(&mut self, frame: &[u8]) -> io::Result<()> {
        match self {
            Port::AfXdp(p) => p.tx(frame),
            Port::AfPacket(p) => p.tx(frame),
        }
    }

    fn offloads(&self) -> bool {
        match self {
            Port::AfXdp(p) => p.offloads(),
            Port::AfPacket(p) => p.offloads(),
        }
    }

    #[inline]
    fn tx_offload(&mut self, frame: &[u8], off: &Offload) -> io::Result<()> {
        match self {
            Port::AfXdp(p) => p.tx_offload(frame, off),
            Port::AfPacket(p) => p.tx_offload(frame, off),
        }
    }

    #[inline]
    fn tx_with(
        &mut self,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> Option<Offload>,
    ) -> io::Result<()> {
        match self {
            Port::AfXdp(p) => p.tx_with(len, fill),
            Port::AfPacket(p) => p.tx_with(len, fill),
        }
    }

    fn headroom(&self) -> Option<usize> {
        match self {
            Port::AfXdp(p) => p.headroom(),
            Port::AfPacket(p) => p.headroom(),
        }
    }

    #[inline]
    unsafe fn tx_borrowed(&mut self, buf: &mut [u8], at: usize, off: &Offload) -> io::Result<()> {
        // SAFETY: the caller's contract, passed on.
        unsafe {
            match self {
                Port::AfXdp(p) => p.tx_borrowed(buf, at, off),
                Port::AfPacket(p) => p.tx_borrowed(buf, at, off),
            }
        }
    }

    fn detach(&mut self) {
        match self {
            Port::AfXdp(p) => p.detach(),
            Port::AfPacket(p) => p.detach(),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Port::AfXdp(p) => p.flush(),
            Port::AfPacket(p) => p.flush(),
        }
    }

    fn as_raw_fd(&self) -> RawFd {
        match self {
            Port::AfXdp(p) => p.as_raw_fd(),
            Port::AfPacket(p) => p.as_raw_fd(),
        }
    }

    fn poll_fds(&self) -> Vec<RawFd> {
        match self {
            Port::AfXdp(p) => p.poll_fds(),
            Port::AfPacket(p) => p.poll_fds(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_names_parse() {
        assert_eq!("auto".parse(), Ok(DriverChoice::Auto));
        assert_eq!("af_xdp".parse(), Ok(DriverChoice::AfXdp));
        assert_eq!("af_packet".parse(), Ok(DriverChoice::AfPacket));
        let err = "dpdk".parse::<DriverChoice>().unwrap_err();
        assert!(err.contains("dpdk") && err.contains("af_xdp"), "{err}");
    }

    #[test]
    fn missing_interface_fails_under_every_choice() {
        for c in [
            DriverChoice::Auto,
            DriverChoice::AfXdp,
            DriverChoice::AfPacket,
        ] {
            let err = Port::open("dva-nosuch0", c).err().unwrap();
            assert!(err.to_string().contains("dva-nosuch0"), "{err}");
            let err = Port::open_lanes("dva-nosuch0", c, 0, 2).err().unwrap();
            assert!(err.to_string().contains("dva-nosuch0"), "{err}");
        }
    }

    #[test]
    fn zero_lanes_is_refused() {
        let err = Port::open_lanes("lo", DriverChoice::AfPacket, 0, 0)
            .err()
            .unwrap();
        assert!(err.to_string().starts_with("invalid lanes 0"), "{err}");
    }
}
