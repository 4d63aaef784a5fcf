//! The backplane socket: a non-blocking UDP endpoint that receives with `recvmmsg` and sends
//! with `sendmmsg`, both into preallocated buffers.
//!
//! Sending has two forms. [`UdpEndpoint::send_to`] copies a finished datagram into the batch.
//! [`UdpEndpoint::tx_slot`] + [`UdpEndpoint::commit_slot`] let the caller build the datagram
//! (GENEVE header, then the inner packet) directly in the batch buffer, saving that copy.
//! A full batch is flushed automatically; [`UdpEndpoint::flush`] sends whatever is queued.
//!
//! A datagram is fire-and-forget: when the kernel will not take one (socket buffer full,
//! unreachable destination) it is dropped and counted in [`UdpEndpoint::tx_dropped`]; the
//! batch is always empty after a flush, and a flush never retries in a loop.

use std::io;
use std::mem::zeroed;
use std::net::{IpAddr, SocketAddr, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use crate::sys::{self, MsgBatch};
use crate::IoError;

/// Largest datagram a slot holds: the backplane MTU is 9000, and jumbo frames plus headers
/// fit in 9216.
pub const MAX_DATAGRAM: usize = 9216;

/// Batch and buffer sizes for [`UdpEndpoint::bind_with`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpConfig {
    /// Datagrams received per `recvmmsg` call.
    pub rx_batch: usize,
    /// Datagrams queued before the batch is sent with one `sendmmsg`.
    pub tx_batch: usize,
    /// SO_RCVBUF/SO_SNDBUF in bytes (forced past the sysctl cap when we are root).
    pub socket_buffer: usize,
}

impl Default for UdpConfig {
    fn default() -> Self {
        UdpConfig {
            rx_batch: 64,
            tx_batch: 64,
            socket_buffer: 8 << 20,
        }
    }
}

/// Counters of one [`UdpEndpoint`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UdpStats {
    pub rx_datagrams: u64,
    /// Datagrams longer than [`MAX_DATAGRAM`], discarded on receive.
    pub rx_oversize: u64,
    pub tx_datagrams: u64,
    /// Datagrams dropped on send: kernel queue full, rejected by the kernel, or too long.
    pub tx_dropped: u64,
}

/// A non-blocking UDP socket with batched receive and send.
pub struct UdpEndpoint {
    fd: OwnedFd,
    local: SocketAddr,
    /// The socket is IPv6, so IPv4 destinations are sent as v4-mapped addresses.
    v6: bool,
    rx_buf: Vec<u8>,
    rx_names: Vec<libc::sockaddr_storage>,
    rx_batch: MsgBatch,
    tx_buf: Vec<u8>,
    tx_lens: Vec<usize>,
    tx_names: Vec<libc::sockaddr_storage>,
    tx_name_lens: Vec<libc::socklen_t>,
    tx_queued: usize,
    tx_batch: MsgBatch,
    stats: UdpStats,
}

impl std::fmt::Debug for UdpEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpEndpoint")
            .field("local", &self.local)
            .field("fd", &self.fd)
            .field("tx_queued", &self.tx_queued)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl UdpEndpoint {
    /// Bind a backplane socket to `addr` (port 0 picks one; see [`UdpEndpoint::local_addr`])
    /// with the default batch and buffer sizes.
    pub fn bind(addr: SocketAddr) -> Result<UdpEndpoint, IoError> {
        UdpEndpoint::bind_with(addr, &UdpConfig::default())
    }

    /// Bind with explicit sizes.
    pub fn bind_with(addr: SocketAddr, cfg: &UdpConfig) -> Result<UdpEndpoint, IoError> {
        for (field, value) in [("rx_batch", cfg.rx_batch), ("tx_batch", cfg.tx_batch)] {
            if value == 0 || value > 1024 {
                return Err(IoError::InvalidConfig {
                    field,
                    value,
                    reason: "must be 1..=1024 (UIO_MAXIOV)",
                });
            }
        }
        let on = addr.to_string();
        let err = |call| {
            let on = on.clone();
            move |e| IoError::syscall(call, on, e)
        };
        let domain = if addr.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        let fd = sys::socket(domain, libc::SOCK_DGRAM | libc::SOCK_NONBLOCK, 0)
            .map_err(err("socket"))?;
        let raw = fd.as_raw_fd();
        // No SO_REUSEADDR: for UDP it lets any local user bind the same address and port and
        // take a share of the datagrams meant for the unit.
        //
        // Bound to the device that holds the address, so a datagram that arrives on another
        // interface (say, one spoofed from the appliance's outside segment; Linux accepts a
        // packet for any local address on any interface) never reaches the socket. Not for an
        // unspecified address, which names no device, nor for loopback, where the peers are
        // local and a datagram to a local address arrives on `lo` whatever device holds it.
        // An address no device holds is left for bind(2) to refuse.
        let ip = addr.ip().to_canonical();
        if !ip.is_unspecified() && !ip.is_loopback() {
            let scope = match addr {
                SocketAddr::V6(a) => a.scope_id(),
                SocketAddr::V4(_) => 0,
            };
            if let Some(dev) = crate::netif::device_with_address(ip, scope)? {
                let name = sys::ifname_array(&dev)?;
                sys::setsockopt(raw, libc::SOL_SOCKET, libc::SO_BINDTODEVICE, &name)
                    .map_err(err("setsockopt SO_BINDTODEVICE"))?;
            }
        }
        sys::set_socket_buffer(
            raw,
            libc::SO_RCVBUFFORCE,
            libc::SO_RCVBUF,
            cfg.socket_buffer,
        )
        .map_err(err("setsockopt SO_RCVBUF"))?;
        sys::set_socket_buffer(
            raw,
            libc::SO_SNDBUFFORCE,
            libc::SO_SNDBUF,
            cfg.socket_buffer,
        )
        .map_err(err("setsockopt SO_SNDBUF"))?;
        let (name, len) = sys::to_raw_addr(&addr);
        // SAFETY: `name` holds a sockaddr of length `len` for the socket's family.
        sys::cvt(unsafe { libc::bind(raw, (&name as *const libc::sockaddr_storage).cast(), len) })
            .map_err(err("bind"))?;
        let local = local_addr(raw).map_err(|e| match e {
            LocalAddrError::Io(e) => IoError::syscall("getsockname", on.clone(), e),
            LocalAddrError::Family(family) => IoError::AddressFamily {
                call: "getsockname",
                on: on.clone(),
                family,
            },
        })?;

        // SAFETY: sockaddr_storage is a C struct of integers only; all-zero is a valid
        // (AF_UNSPEC) value.
        let zero_name: libc::sockaddr_storage = unsafe { zeroed() };
        Ok(UdpEndpoint {
            fd,
            local,
            v6: !addr.is_ipv4(),
            rx_buf: vec![0; cfg.rx_batch * MAX_DATAGRAM],
            rx_names: vec![zero_name; cfg.rx_batch],
            rx_batch: MsgBatch::new(cfg.rx_batch),
            tx_buf: vec![0; cfg.tx_batch * MAX_DATAGRAM],
            tx_lens: vec![0; cfg.tx_batch],
            tx_names: vec![zero_name; cfg.tx_batch],
            tx_name_lens: vec![0; cfg.tx_batch],
            tx_queued: 0,
            tx_batch: MsgBatch::new(cfg.tx_batch),
            stats: UdpStats::default(),
        })
    }

    /// The bound address (with the kernel-chosen port if bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The socket, to poll(2) for readability.
    pub fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Datagrams dropped on send so far.
    pub fn tx_dropped(&self) -> u64 {
        self.stats.tx_dropped
    }

    /// All counters.
    pub fn stats(&self) -> UdpStats {
        self.stats
    }

    /// The receive and send buffer sizes the kernel granted (it reports double the requested
    /// value, its bookkeeping overhead included).
    pub fn socket_buffer_sizes(&self) -> io::Result<(usize, usize)> {
        let fd = self.fd.as_raw_fd();
        let rcv = sys::getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF)?;
        let snd = sys::getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF)?;
        Ok((
            usize::try_from(rcv).unwrap_or(0),
            usize::try_from(snd).unwrap_or(0),
        ))
    }

    /// Datagrams queued and not yet flushed.
    pub fn tx_queued(&self) -> usize {
        self.tx_queued
    }

    /// Receive up to `max` datagrams, calling `f(payload, source)` for each, straight from the
    /// receive buffers. Never blocks; returns how many were delivered. Datagrams too long for
    /// a slot are discarded and counted, not delivered truncated.
    pub fn recv_batch<F: FnMut(&[u8], SocketAddr)>(
        &mut self,
        max: usize,
        mut f: F,
    ) -> io::Result<usize> {
        self.recv_batch_mut(max, |d, src| f(d, src))
    }

    /// As [`UdpEndpoint::recv_batch`], lending each datagram mutably (to decrypt it in place).
    pub fn recv_batch_mut<F: FnMut(&mut [u8], SocketAddr)>(
        &mut self,
        max: usize,
        mut f: F,
    ) -> io::Result<usize> {
        let fd = self.fd.as_raw_fd();
        let mut delivered = 0;
        while delivered < max {
            let want = (max - delivered).min(self.rx_batch.len());
            let base = self.rx_buf.as_mut_ptr();
            for i in 0..want {
                // SAFETY: slot i lies inside rx_buf (rx_batch.len() slots of MAX_DATAGRAM bytes).
                let buf = unsafe { base.add(i * MAX_DATAGRAM) };
                let name = &mut self.rx_names[i] as *mut libc::sockaddr_storage;
                let name_len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
                self.rx_batch.set(i, buf, MAX_DATAGRAM, name, name_len);
            }
            let got = match self.rx_batch.recv(fd, want) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return if delivered > 0 { Ok(delivered) } else { Err(e) },
            };
            for i in 0..got {
                if self.rx_batch.flags(i) & libc::MSG_TRUNC != 0 {
                    self.stats.rx_oversize += 1;
                    continue;
                }
                let Some(src) = sys::from_raw_addr(&self.rx_names[i], self.rx_batch.name_len(i))
                else {
                    continue;
                };
                let len = self.rx_batch.transferred(i).min(MAX_DATAGRAM);
                let start = i * MAX_DATAGRAM;
                f(&mut self.rx_buf[start..start + len], unmap(src));
                delivered += 1;
            }
            self.stats.rx_datagrams += got as u64;
            if got < want {
                break;
            }
        }
        Ok(delivered)
    }

    /// Queue a copy of `buf` for `dst`. Flushes first if the batch is full. A datagram longer
    /// than [`MAX_DATAGRAM`] is counted as dropped and reported as `InvalidInput`.
    pub fn send_to(&mut self, buf: &[u8], dst: SocketAddr) -> io::Result<()> {
        if buf.len() > MAX_DATAGRAM {
            self.stats.tx_dropped += 1;
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "datagram of {} bytes to {dst}: longer than {MAX_DATAGRAM}",
                    buf.len()
                ),
            ));
        }
        let Some(slot) = self.tx_slot() else {
            self.stats.tx_dropped += 1;
            return Err(io::ErrorKind::WouldBlock.into());
        };
        slot[..buf.len()].copy_from_slice(buf);
        self.commit_slot(buf.len(), dst);
        Ok(())
    }

    /// The next free send buffer ([`MAX_DATAGRAM`] bytes) to build a datagram in, to be
    /// queued with [`UdpEndpoint::commit_slot`]. Writing without committing leaves nothing
    /// queued. Flushes first if the batch is full; `None` is reserved for a batch that cannot
    /// be emptied, which the current drop-on-failure flush never produces.
    pub fn tx_slot(&mut self) -> Option<&mut [u8]> {
        if self.tx_queued == self.tx_lens.len() {
            let _ = self.flush();
        }
        let i = self.tx_queued;
        if i == self.tx_lens.len() {
            return None;
        }
        Some(&mut self.tx_buf[i * MAX_DATAGRAM..(i + 1) * MAX_DATAGRAM])
    }

    /// The first `len` bytes of the slot last returned by [`UdpEndpoint::tx_slot`], not
    /// committed (for a caller that sends the datagram another way).
    pub fn uncommitted(&self, len: usize) -> Option<&[u8]> {
        let i = self.tx_queued;
        if len > MAX_DATAGRAM || i >= self.tx_lens.len() {
            return None;
        }
        Some(&self.tx_buf[i * MAX_DATAGRAM..i * MAX_DATAGRAM + len])
    }

    /// The whole slot last returned by [`UdpEndpoint::tx_slot`], not committed (for a caller
    /// that appends to the datagram built in it, such as the backplane's authentication
    /// trailer).
    pub fn uncommitted_mut(&mut self) -> Option<&mut [u8]> {
        let i = self.tx_queued;
        if i >= self.tx_lens.len() {
            return None;
        }
        Some(&mut self.tx_buf[i * MAX_DATAGRAM..(i + 1) * MAX_DATAGRAM])
    }

    /// Queue the first `len` bytes of the slot last returned by [`UdpEndpoint::tx_slot`] for
    /// `dst`, flushing when the batch becomes full. A `len` over [`MAX_DATAGRAM`] is counted as
    /// dropped.
    pub fn commit_slot(&mut self, len: usize, dst: SocketAddr) {
        let i = self.tx_queued;
        if len > MAX_DATAGRAM || i == self.tx_lens.len() {
            self.stats.tx_dropped += 1;
            return;
        }
        let dst = if self.v6 { map_v6(dst) } else { dst };
        let (name, name_len) = sys::to_raw_addr(&dst);
        self.tx_lens[i] = len;
        self.tx_names[i] = name;
        self.tx_name_lens[i] = name_len;
        self.tx_queued += 1;
        if self.tx_queued == self.tx_lens.len() {
            let _ = self.flush();
        }
    }

    /// Send the queued datagrams with `sendmmsg`, as few calls as the kernel allows. The batch
    /// is empty afterwards whatever happens: a full socket buffer (EAGAIN/ENOBUFS) drops the
    /// rest, a datagram the kernel rejects (no route, wrong family, too big) drops that one and
    /// the others are still tried; all drops are counted in [`UdpEndpoint::tx_dropped`]. Returns
    /// the first rejection error, or `WouldBlock` if the buffer was full, after counting.
    pub fn flush(&mut self) -> io::Result<()> {
        let n = self.tx_queued;
        if n == 0 {
            return Ok(());
        }
        let base = self.tx_buf.as_mut_ptr();
        for i in 0..n {
            // SAFETY: slot i lies inside tx_buf (tx_lens.len() slots of MAX_DATAGRAM bytes).
            let buf = unsafe { base.add(i * MAX_DATAGRAM) };
            let name = &mut self.tx_names[i] as *mut libc::sockaddr_storage;
            self.tx_batch
                .set(i, buf, self.tx_lens[i], name, self.tx_name_lens[i]);
        }
        let fd = self.fd.as_raw_fd();
        let mut done = 0;
        let mut result = Ok(());
        while done < n {
            match self.tx_batch.send(fd, done, n) {
                Ok(sent) if sent > 0 => {
                    done += sent;
                    self.stats.tx_datagrams += sent as u64;
                }
                Ok(_) => {
                    self.stats.tx_dropped += (n - done) as u64;
                    result = Err(io::ErrorKind::WouldBlock.into());
                    break;
                }
                Err(e) => match e.raw_os_error() {
                    Some(libc::EINTR) => {}
                    Some(libc::EAGAIN | libc::ENOBUFS) => {
                        self.stats.tx_dropped += (n - done) as u64;
                        if result.is_ok() {
                            result = Err(io::ErrorKind::WouldBlock.into());
                        }
                        break;
                    }
                    _ => {
                        self.stats.tx_dropped += 1;
                        done += 1;
                        if result.is_ok() {
                            result = Err(e);
                        }
                    }
                },
            }
        }
        self.tx_queued = 0;
        result
    }
}

impl AsFd for UdpEndpoint {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for UdpEndpoint {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

enum LocalAddrError {
    Io(io::Error),
    Family(i32),
}

fn local_addr(fd: RawFd) -> Result<SocketAddr, LocalAddrError> {
    // SAFETY: sockaddr_storage is a C struct of integers only; all-zero is a valid
    // (AF_UNSPEC) value.
    let mut name: libc::sockaddr_storage = unsafe { zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `name`/`len` are live locals; the kernel writes at most `len` bytes.
    sys::cvt(unsafe {
        libc::getsockname(
            fd,
            (&mut name as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    })
    .map_err(LocalAddrError::Io)?;
    sys::from_raw_addr(&name, len).ok_or(LocalAddrError::Family(i32::from(name.ss_family)))
}

/// An IPv4 destination as seen by an IPv6 socket.
fn map_v6(dst: SocketAddr) -> SocketAddr {
    match dst {
        SocketAddr::V4(a) => {
            SocketAddr::V6(SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0))
        }
        v6 => v6,
    }
}

/// A v4-mapped source as the IPv4 address it is, so callers compare against configured IPv4
/// unit addresses.
fn unmap(src: SocketAddr) -> SocketAddr {
    match src {
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => src,
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_destinations_are_mapped_for_v6_sockets_and_back() {
        let v4: SocketAddr = "198.18.0.1:6081".parse().unwrap();
        let mapped = map_v6(v4);
        assert_eq!(mapped, "[::ffff:198.18.0.1]:6081".parse().unwrap());
        assert_eq!(unmap(mapped), v4);
        let v6: SocketAddr = "[2001:db8::1]:6081".parse().unwrap();
        assert_eq!(map_v6(v6), v6);
        assert_eq!(unmap(v6), v6);
    }

    #[test]
    fn batch_sizes_are_checked() {
        let cfg = UdpConfig {
            tx_batch: 0,
            ..Default::default()
        };
        let err = UdpEndpoint::bind_with("127.0.0.1:0".parse().unwrap(), &cfg).unwrap_err();
        assert!(err.to_string().starts_with("invalid tx_batch 0"), "{err}");
    }

    #[test]
    fn bind_error_names_the_address() {
        // 192.0.2.0/24 (TEST-NET-1) is on no interface here.
        let err = UdpEndpoint::bind("192.0.2.1:0".parse().unwrap()).unwrap_err();
        assert!(
            err.to_string().starts_with("bind on 192.0.2.1:0: "),
            "{err}"
        );
        assert_eq!(err.raw_os_error(), Some(libc::EADDRNOTAVAIL));
    }
}
