//! Setup errors: each one says which call failed, on what, and why.

use std::io;

/// An error opening or configuring a driver, an interface or a namespace.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IoError {
    /// A syscall failed. `on` names the interface, address or namespace it was about, e.g.
    /// "setsockopt PACKET_RX_RING on out0: Invalid argument (os error 22)".
    #[error("{call} on {on}: {source}")]
    Syscall {
        call: &'static str,
        on: String,
        #[source]
        source: io::Error,
    },
    /// An interface name the kernel cannot accept (empty, too long, or with a NUL byte).
    #[error("invalid interface name {name:?}: {reason}")]
    InvalidIfName { name: String, reason: &'static str },
    /// A network namespace name that is not a plain file name under /run/netns.
    #[error("invalid network namespace name {name:?}: {reason}")]
    InvalidNetnsName { name: String, reason: &'static str },
    /// A driver configuration value the kernel would reject.
    #[error("invalid {field} {value}: {reason}")]
    InvalidConfig {
        field: &'static str,
        value: usize,
        reason: &'static str,
    },
    /// The interface is not Ethernet-like, so it has no MAC address in the sense dva needs.
    #[error("interface {name} is not Ethernet (ARP hardware type {hw_type})")]
    NotEthernet { name: String, hw_type: u16 },
    /// The AF_XDP driver is unavailable because its XDP program was not compiled into dva-io
    /// (clang was missing at build time).
    #[error("AF_XDP driver not built: clang was not found when dva-io was compiled")]
    XdpNotBuilt,
    /// The AF_XDP driver cannot run on this interface (the program did not load or attach, or
    /// the device does not fit the driver); `reason` says which step and why.
    #[error("AF_XDP on {on}: {reason}")]
    Xdp { on: String, reason: String },
    /// The kernel returned an address family we do not handle.
    #[error("{call} on {on}: unexpected address family {family}")]
    AddressFamily {
        call: &'static str,
        on: String,
        family: i32,
    },
}

impl IoError {
    pub(crate) fn syscall(call: &'static str, on: impl Into<String>, source: io::Error) -> IoError {
        IoError::Syscall {
            call,
            on: on.into(),
            source,
        }
    }

    /// The errno behind this error, if a syscall failed.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            IoError::Syscall { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

impl From<IoError> for io::Error {
    fn from(e: IoError) -> io::Error {
        let kind = match &e {
            IoError::Syscall { source, .. } => source.kind(),
            IoError::InvalidIfName { .. }
            | IoError::InvalidNetnsName { .. }
            | IoError::InvalidConfig { .. } => io::ErrorKind::InvalidInput,
            IoError::NotEthernet { .. }
            | IoError::AddressFamily { .. }
            | IoError::XdpNotBuilt
            | IoError::Xdp { .. } => io::ErrorKind::Unsupported,
        };
        io::Error::new(kind, e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syscall_error_names_call_interface_and_errno() {
        let e = IoError::syscall(
            "setsockopt PACKET_RX_RING",
            "out0",
            io::Error::from_raw_os_error(libc::EINVAL),
        );
        let msg = e.to_string();
        assert!(
            msg.starts_with("setsockopt PACKET_RX_RING on out0: Invalid argument"),
            "{msg}"
        );
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
        let io: io::Error = e.into();
        assert_eq!(io.kind(), io::ErrorKind::InvalidInput);
    }
}
