//! dva-wire: the packet formats dva speaks, as zero-copy views and validated representations.
//!
//! # Contract of this layer
//!
//! - **No I/O, no allocation, no panics on input.** Every parser reads a caller-owned buffer in
//!   place. Nothing here reads a clock, makes a syscall or allocates on the parse path.
//! - **Views** (`EthernetFrame<T>`, `Ipv4Packet<T>`, `TcpPacket<T>`, …) wrap any
//!   `T: AsRef<[u8]>`. `new_unchecked` wraps without looking; `check_len` validates every length
//!   the accessors depend on (header-length fields such as IPv4 IHL, TCP data offset, GENEVE
//!   option length and option TLVs included); `new_checked` does both. **After `check_len`
//!   succeeds, no getter panics** on that buffer. Setters exist only where
//!   `T: AsRef<[u8]> + AsMut<[u8]>`; they trust the caller (as `new_unchecked` does) and panic
//!   if the buffer is too short for the field they write.
//! - **Reprs** (`Ipv4Repr`, `TcpRepr`, …) are plain validated values. `Repr::parse(&view)` runs
//!   `check_len` itself, so it is safe on an unchecked view. `parse` verifies a checksum only
//!   when the checksum is self-contained (IPv4 header, ICMPv4); checksums over a pseudo-header
//!   (TCP, UDP, ICMPv6) need the IP addresses and are checked with the view's
//!   `verify_checksum_v4/_v6`. `emit` writes a header into a buffer of at least
//!   `buffer_len()` bytes (it panics on a shorter one: that is a bug in the caller, not input)
//!   and fills the checksum whenever it has what the checksum covers.
//! - Errors are the small `Copy` [`Error`]: hot paths count drops by reason instead of
//!   building messages.
//! - Multi-byte fields are big-endian on the wire; getters and setters take host values.
//!
//! # Modules
//!
//! [`checksum`] (RFC 1071 sums, RFC 1624 incremental updates), [`ethernet`] (with one 802.1Q
//! tag), [`arp`], [`ipv4`], [`ipv6`] (with an extension-header walk), [`tcp`], [`udp`],
//! [`icmpv4`], [`icmpv6`] (with neighbour discovery), [`geneve`] (RFC 8926, plus dva's own
//! backplane option) and [`gso`] (partial checksums and software segmentation of GSO
//! super-packets). The numbers every layer above shares are defined here once: [`ip_proto`],
//! [`ethertype`], [`tcp::flags`].

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use core::fmt;

pub mod arp;
pub mod checksum;
pub mod ethernet;
pub mod geneve;
/// GSO super-packets: partial checksums, their completion, and software segmentation.
pub mod gso;
pub mod icmpv4;
pub mod icmpv6;
pub mod ipv4;
pub mod ipv6;
pub mod tcp;
pub mod udp;

pub use arp::{ArpOperation, ArpPacket, ArpRepr};
pub use ethernet::{ethertype, EthernetAddress, EthernetFrame, EthernetRepr};
pub use geneve::{dva_flags, DvaMeta, GeneveOption, GeneveOptions, GenevePacket, GeneveRepr};
pub use icmpv4::{icmpv4_type, Icmpv4Packet, Icmpv4Repr};
pub use icmpv6::{icmpv6_type, Icmpv6Packet, Icmpv6Repr, NdiscRepr};
pub use ipv4::{ip_option, ip_proto, Ipv4Packet, Ipv4Repr, OptionsError};
pub use ipv6::{Ipv6Packet, Ipv6Repr};
pub use tcp::{TcpOption, TcpOptions, TcpPacket, TcpRepr};
pub use udp::{UdpPacket, UdpRepr};

/// Why a buffer was rejected. Small and `Copy` so the packet path can count drops by reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Error {
    /// The buffer is shorter than a header, or than a length field says.
    Truncated,
    /// A field holds a value the format forbids (bad length field, malformed TLV, …).
    Malformed,
    /// A checksum does not verify.
    Checksum,
    /// Well-formed, but a variant this crate does not handle (other hardware type, IP version,
    /// an unknown critical GENEVE option, …).
    Unsupported,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Error::Truncated => "truncated packet",
            Error::Malformed => "malformed packet",
            Error::Checksum => "checksum mismatch",
            Error::Unsupported => "unsupported packet",
        })
    }
}

impl std::error::Error for Error {}

/// The result type of every fallible function in this crate.
pub type Result<T> = core::result::Result<T, Error>;

/// Field offsets are written as ranges so each module's `field` table reads like the RFC diagram.
pub(crate) mod field {
    pub type Field = core::ops::Range<usize>;
    pub type Rest = core::ops::RangeFrom<usize>;
}

// Big-endian accessors. They index like slices do: callers guarantee the bounds through
// `check_len` (getters) or through the documented setter contract.
#[inline]
pub(crate) fn get_u16(buf: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([buf[at], buf[at + 1]])
}

#[inline]
pub(crate) fn get_u32(buf: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}

#[inline]
pub(crate) fn put_u16(buf: &mut [u8], at: usize, value: u16) {
    buf[at..at + 2].copy_from_slice(&value.to_be_bytes());
}

#[inline]
pub(crate) fn put_u32(buf: &mut [u8], at: usize, value: u32) {
    buf[at..at + 4].copy_from_slice(&value.to_be_bytes());
}

#[inline]
pub(crate) fn get_ipv4(buf: &[u8], at: usize) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::new(buf[at], buf[at + 1], buf[at + 2], buf[at + 3])
}

#[inline]
pub(crate) fn get_ipv6(buf: &[u8], at: usize) -> std::net::Ipv6Addr {
    let mut octets = [0u8; 16];
    octets.copy_from_slice(&buf[at..at + 16]);
    std::net::Ipv6Addr::from(octets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_display_names_the_reason() {
        assert_eq!(Error::Truncated.to_string(), "truncated packet");
        assert_eq!(Error::Checksum.to_string(), "checksum mismatch");
        let boxed: Box<dyn std::error::Error> = Box::new(Error::Malformed);
        assert_eq!(boxed.to_string(), "malformed packet");
    }
}
