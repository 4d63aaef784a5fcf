//! An in-memory [`FrameIo`] for tests and benchmarks: frames pushed with
//! [`MemoryIo::push_rx`] come out of `rx_batch`, frames sent with `tx` are collected for
//! [`MemoryIo::take_tx`].

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::{FrameIo, RxMeta};

/// In-memory packet driver. Its descriptor (an eventfd) polls readable exactly while frames
/// are waiting, so a data-path loop that sleeps in [`crate::poll::Poller`] runs unchanged
/// against it.
#[derive(Debug)]
pub struct MemoryIo {
    rx: VecDeque<(Vec<u8>, RxMeta)>,
    tx: Vec<Vec<u8>>,
    tx_capacity: usize,
    flushes: u64,
    event: Option<OwnedFd>,
}

impl Default for MemoryIo {
    fn default() -> Self {
        MemoryIo::new()
    }
}

impl MemoryIo {
    /// A driver with an unbounded transmit queue.
    pub fn new() -> MemoryIo {
        MemoryIo::with_tx_capacity(usize::MAX)
    }

    /// A driver whose `tx` returns `WouldBlock` once `capacity` frames are waiting in
    /// [`MemoryIo::take_tx`]'s queue, to exercise the caller's drop accounting.
    pub fn with_tx_capacity(capacity: usize) -> MemoryIo {
        // SAFETY: eventfd(2) takes no pointers; -1 on failure.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        // SAFETY: a non-negative `fd` was just returned by eventfd(2) and nothing else owns it.
        // Without an eventfd (fd limit reached) the driver still works, it just never polls
        // readable.
        let event = (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) });
        MemoryIo {
            rx: VecDeque::new(),
            tx: Vec::new(),
            tx_capacity: capacity,
            flushes: 0,
            event,
        }
    }

    /// Queue a received frame with default metadata (`wire_len` = its length).
    pub fn push_rx(&mut self, frame: Vec<u8>) {
        let meta = RxMeta {
            wire_len: u32::try_from(frame.len()).unwrap_or(u32::MAX),
            ..RxMeta::default()
        };
        self.push_rx_with_meta(frame, meta);
    }

    /// Queue a received frame with explicit metadata (e.g. `csum_not_ready`).
    pub fn push_rx_with_meta(&mut self, frame: Vec<u8>, meta: RxMeta) {
        if self.rx.is_empty() {
            self.signal(true);
        }
        self.rx.push_back((frame, meta));
    }

    /// Frames waiting to be received.
    pub fn rx_pending(&self) -> usize {
        self.rx.len()
    }

    /// Every frame transmitted since the last call, flushed or not, in order.
    pub fn take_tx(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.tx)
    }

    /// How many times `flush` was called.
    pub fn flushes(&self) -> u64 {
        self.flushes
    }

    fn signal(&self, readable: bool) {
        let Some(event) = &self.event else { return };
        let mut value: u64 = 1;
        let buf = (&mut value as *mut u64).cast();
        // SAFETY: eventfd reads and writes exactly 8 bytes; `value` is a live u64. Errors
        // (counter already at zero or saturated) leave the readiness we want, so are ignored.
        unsafe {
            if readable {
                libc::write(event.as_raw_fd(), buf, 8);
            } else {
                libc::read(event.as_raw_fd(), buf, 8);
            }
        }
    }
}

impl FrameIo for MemoryIo {
    fn rx_batch<F: FnMut(&[u8], RxMeta)>(&mut self, max: usize, mut f: F) -> io::Result<usize> {
        let mut n = 0;
        while n < max {
            let Some((frame, meta)) = self.rx.pop_front() else {
                break;
            };
            f(&frame, meta);
            n += 1;
        }
        if n > 0 && self.rx.is_empty() {
            self.signal(false);
        }
        Ok(n)
    }

    fn tx(&mut self, frame: &[u8]) -> io::Result<()> {
        if self.tx.len() >= self.tx_capacity {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.tx.push(frame.to_vec());
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.flushes += 1;
        Ok(())
    }

    fn as_raw_fd(&self) -> RawFd {
        self.event.as_ref().map_or(-1, AsRawFd::as_raw_fd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::poll::Poller;

    #[test]
    fn frames_come_out_in_order_in_batches() {
        let mut io = MemoryIo::new();
        for i in 0..5u8 {
            io.push_rx(vec![i; 60 + usize::from(i)]);
        }
        let mut seen = Vec::new();
        assert_eq!(
            io.rx_batch(3, |f, m| seen.push((f.to_vec(), m.wire_len)))
                .unwrap(),
            3
        );
        assert_eq!(io.rx_pending(), 2);
        assert_eq!(
            io.rx_batch(10, |f, m| seen.push((f.to_vec(), m.wire_len)))
                .unwrap(),
            2
        );
        assert_eq!(io.rx_batch(10, |_, _| panic!("empty")).unwrap(), 0);
        for (i, (frame, wire_len)) in seen.iter().enumerate() {
            assert_eq!(frame, &vec![i as u8; 60 + i]);
            assert_eq!(*wire_len as usize, 60 + i);
        }
    }

    #[test]
    fn metadata_is_passed_through() {
        let mut io = MemoryIo::new();
        let meta = RxMeta {
            csum_not_ready: true,
            wire_len: 9000,
            truncated: true,
            ..RxMeta::default()
        };
        io.push_rx_with_meta(vec![1, 2, 3], meta);
        io.rx_batch(1, |_, m| assert_eq!(m, meta)).unwrap();
    }

    #[test]
    fn tx_collects_and_reports_a_full_queue() {
        let mut io = MemoryIo::with_tx_capacity(2);
        io.tx(b"one").unwrap();
        io.tx(b"two").unwrap();
        assert_eq!(
            io.tx(b"three").unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        io.flush().unwrap();
        assert_eq!(io.flushes(), 1);
        assert_eq!(io.take_tx(), vec![b"one".to_vec(), b"two".to_vec()]);
        io.tx(b"four").unwrap();
        assert_eq!(io.take_tx(), vec![b"four".to_vec()]);
    }

    #[test]
    fn descriptor_is_readable_exactly_while_frames_wait() {
        let mut io = MemoryIo::new();
        let mut poller = Poller::new(&[FrameIo::as_raw_fd(&io)]);
        assert_eq!(poller.wait(0).unwrap(), &[false]);
        io.push_rx(vec![0; 60]);
        io.push_rx(vec![0; 60]);
        assert_eq!(poller.wait(0).unwrap(), &[true]);
        io.rx_batch(1, |_, _| {}).unwrap();
        assert_eq!(poller.wait(0).unwrap(), &[true]);
        io.rx_batch(1, |_, _| {}).unwrap();
        assert_eq!(poller.wait(0).unwrap(), &[false]);
    }
}
