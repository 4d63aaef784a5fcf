//! Waiting for readability on a fixed set of descriptors with poll(2).

use std::io;
use std::os::fd::RawFd;

use crate::sys;

/// A reusable poll(2) set: the descriptor list and the result buffer are allocated once, so an
/// idle data-path loop can sleep in [`Poller::wait`] without touching the allocator.
#[derive(Debug, Clone)]
pub struct Poller {
    fds: Vec<libc::pollfd>,
    ready: Vec<bool>,
}

/// Events that mean "call the receive path": data, or an error/hangup that only a receive
/// call will report and clear.
const READY: libc::c_short = libc::POLLIN | libc::POLLERR | libc::POLLHUP;

impl Poller {
    /// Poll `fds` for readability. Negative descriptors are ignored by poll(2) and never
    /// reported ready, which lets a caller keep positions stable while a slot is empty.
    pub fn new(fds: &[RawFd]) -> Poller {
        Poller {
            fds: fds
                .iter()
                .map(|&fd| libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect(),
            ready: vec![false; fds.len()],
        }
    }

    /// Wait up to `timeout_ms` (negative: forever, 0: just check) until at least one descriptor
    /// is readable. Entry `i` of the result is true when `fds[i]` is. A signal interrupting the
    /// wait returns all false rather than an error: the caller's loop simply goes round again.
    pub fn wait(&mut self, timeout_ms: i32) -> io::Result<&[bool]> {
        for fd in &mut self.fds {
            fd.revents = 0;
        }
        // SAFETY: `fds` is a live, exclusively borrowed array of `len` pollfd structs; the kernel
        // writes only their `revents` fields.
        let r = unsafe {
            libc::poll(
                self.fds.as_mut_ptr(),
                self.fds.len() as libc::nfds_t,
                timeout_ms,
            )
        };
        match sys::cvt(r) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        for (ready, fd) in self.ready.iter_mut().zip(&self.fds) {
            *ready = r > 0 && fd.fd >= 0 && fd.revents & READY != 0;
        }
        Ok(&self.ready)
    }

    /// The descriptors being polled, in order.
    pub fn fds(&self) -> impl Iterator<Item = RawFd> + '_ {
        self.fds.iter().map(|p| p.fd)
    }
}

/// One-shot form of [`Poller::wait`]; allocates, so prefer a [`Poller`] in loops.
pub fn poll_readable(fds: &[RawFd], timeout_ms: i32) -> io::Result<Vec<bool>> {
    Poller::new(fds).wait(timeout_ms).map(<[bool]>::to_vec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn reports_only_the_readable_descriptor() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let (c, _d) = UnixStream::pair().unwrap();
        let mut poller = Poller::new(&[b.as_raw_fd(), c.as_raw_fd(), -1]);
        assert_eq!(poller.wait(0).unwrap(), &[false, false, false]);
        a.write_all(b"x").unwrap();
        assert_eq!(poller.wait(1000).unwrap(), &[true, false, false]);
        assert_eq!(
            poll_readable(&[c.as_raw_fd(), b.as_raw_fd()], 0).unwrap(),
            vec![false, true]
        );
        assert_eq!(
            poller.fds().collect::<Vec<_>>(),
            vec![b.as_raw_fd(), c.as_raw_fd(), -1]
        );
    }

    #[test]
    fn hangup_counts_as_ready() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(a);
        assert_eq!(poll_readable(&[b.as_raw_fd()], 0).unwrap(), vec![true]);
    }
}
