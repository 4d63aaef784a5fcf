//! Thin wrappers over the raw syscalls the drivers share: errno handling, socket options,
//! socket address conversion, interface names.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use crate::IoError;

/// Turn a `-1`-on-error return value into the errno.
pub(crate) fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A new socket, close-on-exec, owned so that every error path closes it.
pub(crate) fn socket(
    domain: libc::c_int,
    ty: libc::c_int,
    protocol: libc::c_int,
) -> io::Result<OwnedFd> {
    // SAFETY: socket(2) takes no pointers; a failure is reported as -1.
    let fd = cvt(unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, protocol) })?;
    // SAFETY: `fd` was just returned by socket(2) and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// setsockopt(2) with a value of type `T` (an integer or a `#[repr(C)]` kernel struct).
pub(crate) fn setsockopt<T>(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> io::Result<()> {
    // SAFETY: `value` points to a live, initialised `T` of exactly the length we pass; the
    // kernel only reads it during the call.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

/// getsockopt(2) for an integer option.
pub(crate) fn getsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are live locals; the kernel writes at most `len` bytes.
    cvt(unsafe {
        libc::getsockopt(
            fd,
            level,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    })?;
    Ok(value)
}

/// Size a socket buffer: the *FORCE option lifts the rmem_max/wmem_max cap (we run as root);
/// without CAP_NET_ADMIN fall back to the plain option, which the kernel silently caps.
pub(crate) fn set_socket_buffer(
    fd: RawFd,
    force: libc::c_int,
    plain: libc::c_int,
    bytes: usize,
) -> io::Result<()> {
    let bytes = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    match setsockopt(fd, libc::SOL_SOCKET, force, &bytes) {
        Ok(()) => Ok(()),
        Err(_) => setsockopt(fd, libc::SOL_SOCKET, plain, &bytes),
    }
}

/// A socket address in the kernel's form, with its length.
pub(crate) fn to_raw_addr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain old data; all-zero is a valid (AF_UNSPEC) value.
    let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for every sockaddr_*.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// The `SocketAddr` in a kernel-filled sockaddr, or `None` for families other than IPv4/IPv6
/// or a length too short for the family.
pub(crate) fn from_raw_addr(
    storage: &libc::sockaddr_storage,
    len: libc::socklen_t,
) -> Option<SocketAddr> {
    let len = len as usize;
    match libc::c_int::from(storage.ss_family) {
        libc::AF_INET if len >= size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says the storage holds a sockaddr_in, the length covers it, and
            // sockaddr_storage is aligned for it.
            let sin =
                unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            Some(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 if len >= size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe {
                &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// An interface name as the NUL-terminated array `struct ifreq` wants.
pub(crate) fn ifname_array(name: &str) -> Result<[libc::c_char; libc::IFNAMSIZ], IoError> {
    let invalid = |reason| IoError::InvalidIfName {
        name: name.to_string(),
        reason,
    };
    if name.is_empty() {
        return Err(invalid("empty"));
    }
    if name.len() >= libc::IFNAMSIZ {
        return Err(invalid("longer than 15 bytes"));
    }
    if name
        .bytes()
        .any(|b| b == 0 || b == b'/' || b.is_ascii_whitespace())
    {
        return Err(invalid("contains NUL, '/' or whitespace"));
    }
    let mut out = [0 as libc::c_char; libc::IFNAMSIZ];
    for (dst, src) in out.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(out)
}

/// Preallocated `mmsghdr`/`iovec` arrays for one `sendmmsg`/`recvmmsg` call, one buffer per
/// message. The pointers inside are rewritten by [`MsgBatch::set`] before every call, so they
/// never outlive the buffers they describe.
pub(crate) struct MsgBatch {
    iov: Vec<libc::iovec>,
    msgs: Vec<libc::mmsghdr>,
}

// SAFETY: the raw pointers in `iov`/`msgs` are only scratch for the duration of one syscall made
// by the owner of the batch; they are reset before each use and never dereferenced by us, so
// moving the batch to another thread cannot create aliasing.
unsafe impl Send for MsgBatch {}
// SAFETY: the pointers are only used by syscalls made through `&mut self`; `&MsgBatch` gives
// access to plain integers (lengths and flags) only.
unsafe impl Sync for MsgBatch {}

impl MsgBatch {
    pub(crate) fn new(len: usize) -> MsgBatch {
        // SAFETY: iovec and mmsghdr are plain old data; all-zero (null pointers, zero lengths)
        // is valid.
        let (iov, msgs) = unsafe { (vec![zeroed(); len], vec![zeroed(); len]) };
        MsgBatch { iov, msgs }
    }

    pub(crate) fn len(&self) -> usize {
        self.msgs.len()
    }

    /// Describe message `i`: one buffer, and an optional socket address (name) buffer.
    pub(crate) fn set(
        &mut self,
        i: usize,
        buf: *mut u8,
        len: usize,
        name: *mut libc::sockaddr_storage,
        name_len: libc::socklen_t,
    ) {
        self.iov[i] = libc::iovec {
            iov_base: buf.cast(),
            iov_len: len,
        };
        // SAFETY: msghdr is a C struct of integers and pointers; all-zero (null pointers, zero
        // lengths) is a valid value. The iov and name are set below; msg_control stays null with
        // length 0, which the kernel reads as "no control data".
        let mut hdr: libc::msghdr = unsafe { zeroed() };
        hdr.msg_iov = &mut self.iov[i];
        hdr.msg_iovlen = 1;
        hdr.msg_name = name.cast();
        hdr.msg_namelen = if name.is_null() { 0 } else { name_len };
        self.msgs[i] = libc::mmsghdr {
            msg_hdr: hdr,
            msg_len: 0,
        };
    }

    /// Bytes the kernel transferred for message `i` in the last call.
    pub(crate) fn transferred(&self, i: usize) -> usize {
        self.msgs[i].msg_len as usize
    }

    /// Flags (e.g. MSG_TRUNC) the kernel reported for message `i` in the last `recvmmsg`.
    pub(crate) fn flags(&self, i: usize) -> libc::c_int {
        self.msgs[i].msg_hdr.msg_flags
    }

    /// Address length the kernel wrote for message `i` in the last `recvmmsg`.
    pub(crate) fn name_len(&self, i: usize) -> libc::socklen_t {
        self.msgs[i].msg_hdr.msg_namelen
    }

    /// `sendmmsg(fd, msgs[start..end], MSG_DONTWAIT)`: how many messages the kernel took.
    pub(crate) fn send(&mut self, fd: RawFd, start: usize, end: usize) -> io::Result<usize> {
        let batch = &mut self.msgs[start..end];
        // SAFETY: every message in `batch` was set by `set` to buffers the caller keeps alive and
        // unaliased for this call; the kernel reads them and writes only `msg_len`.
        let r = unsafe {
            libc::sendmmsg(
                fd,
                batch.as_mut_ptr(),
                batch.len() as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        cvt(r).map(|n| n as usize)
    }

    /// `recvmmsg(fd, msgs[..n], MSG_DONTWAIT)`: how many messages the kernel filled.
    pub(crate) fn recv(&mut self, fd: RawFd, n: usize) -> io::Result<usize> {
        let batch = &mut self.msgs[..n];
        // SAFETY: every message in `batch` was set by `set` to writable buffers of the given
        // lengths that the caller keeps alive and unaliased for this call; a null timeout means
        // none.
        let r = unsafe {
            libc::recvmmsg(
                fd,
                batch.as_mut_ptr(),
                batch.len() as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        cvt(r).map(|n| n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_addr_round_trips_through_kernel_form() {
        for addr in [
            "198.18.0.1:6081".parse::<SocketAddr>().unwrap(),
            "0.0.0.0:0".parse().unwrap(),
            "[2001:db8::1]:6081".parse().unwrap(),
            SocketAddr::V6(SocketAddrV6::new("fe80::1".parse().unwrap(), 443, 7, 3)),
        ] {
            let (raw, len) = to_raw_addr(&addr);
            assert_eq!(from_raw_addr(&raw, len), Some(addr));
        }
    }

    #[test]
    fn short_or_foreign_sockaddr_is_rejected() {
        let (raw, len) = to_raw_addr(&"10.0.0.1:1".parse().unwrap());
        assert_eq!(from_raw_addr(&raw, len - 1), None);
        // SAFETY: sockaddr_storage is a C struct of integers only; all-zero is a valid value.
        let mut unix: libc::sockaddr_storage = unsafe { zeroed() };
        unix.ss_family = libc::AF_UNIX as libc::sa_family_t;
        assert_eq!(
            from_raw_addr(
                &unix,
                size_of::<libc::sockaddr_storage>() as libc::socklen_t
            ),
            None
        );
    }

    #[test]
    fn interface_names_are_checked() {
        assert!(ifname_array("eth0").is_ok());
        assert!(ifname_array("fifteen-chars-x").is_ok());
        for bad in ["", "sixteen-chars-xx", "a/b", "a b", "a\0b"] {
            let err = ifname_array(bad).unwrap_err();
            assert!(err.to_string().contains("invalid interface name"), "{err}");
        }
    }
}
