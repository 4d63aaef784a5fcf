//! A throwaway lab for integration tests: two network namespaces joined by a veth pair,
//! deleted again when the guard drops (also when the test panics).

#![allow(dead_code)]

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dva_io::poll::Poller;
use dva_io::FrameIo;

/// Ethertype of test frames (IEEE 802 local experimental), so stray kernel traffic (IPv6
/// neighbour discovery and the like) can be told apart from ours.
pub const TEST_ETHERTYPE: u16 = 0x88b5;
pub const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
pub const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];

pub struct VethLab {
    pub ns_a: String,
    pub ns_b: String,
    pub dev_a: String,
    pub dev_b: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl VethLab {
    /// Namespaces `iot-<pid>-<n>-a`/`-b` with veth `va<n>` (MAC_A) in a and `vb<n>` (MAC_B) in b,
    /// both up, IPv6 address generation off, offloads off where ethtool exists.
    pub fn new() -> VethLab {
        VethLab::with_queues(1)
    }

    /// As [`VethLab::new`], with `queues` receive and transmit queues on each end.
    pub fn with_queues(queues: u32) -> VethLab {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let lab = VethLab {
            ns_a: format!("iot-{pid}-{n}-a"),
            ns_b: format!("iot-{pid}-{n}-b"),
            dev_a: format!("va{n}"),
            dev_b: format!("vb{n}"),
        };
        let q = queues.to_string();
        // The guard exists before anything is created, so a failure half-way still cleans up.
        ip(&["netns", "add", &lab.ns_a]);
        ip(&["netns", "add", &lab.ns_b]);
        ip(&[
            "link",
            "add",
            &lab.dev_a,
            "netns",
            &lab.ns_a,
            "address",
            "02:00:00:00:00:0a",
            "numtxqueues",
            &q,
            "numrxqueues",
            &q,
            "type",
            "veth",
            "peer",
            "name",
            &lab.dev_b,
            "netns",
            &lab.ns_b,
            "address",
            "02:00:00:00:00:0b",
            "numtxqueues",
            &q,
            "numrxqueues",
            &q,
        ]);
        for (ns, dev) in [(&lab.ns_a, &lab.dev_a), (&lab.ns_b, &lab.dev_b)] {
            ip(&["-n", ns, "link", "set", dev, "addrgenmode", "none"]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
        lab
    }

    /// Turn off offloads on both ends if ethtool is installed; silently skip otherwise.
    pub fn disable_offloads(&self) {
        for (ns, dev) in [(&self.ns_a, &self.dev_a), (&self.ns_b, &self.dev_b)] {
            let _ = Command::new("ip")
                .args([
                    "netns", "exec", ns, "ethtool", "-K", dev, "tso", "off", "gso", "off", "gro",
                    "off", "tx", "off",
                ])
                .output();
        }
    }

    pub fn set_mtu(&self, mtu: u32) {
        let mtu = mtu.to_string();
        ip(&["-n", &self.ns_a, "link", "set", &self.dev_a, "mtu", &mtu]);
        ip(&["-n", &self.ns_b, "link", "set", &self.dev_b, "mtu", &mtu]);
    }

    /// Give a's end 198.18.0.1/30 and a static neighbour entry for 198.18.0.2 at MAC_B, so
    /// the kernel stack in a sends IP straight to b's end.
    pub fn address_a_towards_b(&self) {
        self.ip_in(
            &self.ns_a,
            &["addr", "add", "198.18.0.1/30", "dev", &self.dev_a],
        );
        self.ip_in(
            &self.ns_a,
            &[
                "neigh",
                "add",
                "198.18.0.2",
                "lladdr",
                "02:00:00:00:00:0b",
                "dev",
                &self.dev_a,
            ],
        );
    }

    pub fn ip_in(&self, ns: &str, args: &[&str]) {
        let mut all = vec!["-n", ns];
        all.extend_from_slice(args);
        ip(&all);
    }
}

impl Drop for VethLab {
    fn drop(&mut self) {
        // Deleting a namespace destroys the veth end inside it, and with it the peer.
        for ns in [&self.ns_a, &self.ns_b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// An Ethernet frame of exactly `len` bytes from `src` to `dst` carrying `seq` and a pattern
/// derived from it.
pub fn test_frame(src: [u8; 6], dst: [u8; 6], seq: u32, len: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&TEST_ETHERTYPE.to_be_bytes());
    f.extend_from_slice(&seq.to_be_bytes());
    let mut x = seq.wrapping_mul(2654435761);
    while f.len() < len {
        x = x.wrapping_mul(1103515245).wrapping_add(12345);
        f.push((x >> 16) as u8);
    }
    f.truncate(len);
    f
}

pub fn is_test_frame(frame: &[u8]) -> bool {
    frame.len() >= 18 && frame[12..14] == TEST_ETHERTYPE.to_be_bytes()
}

/// Receive test frames from `io` until `want` arrived or `timeout` passed, `max` per batch.
pub fn collect<T: FrameIo>(
    io: &mut T,
    want: usize,
    max: usize,
    timeout: Duration,
) -> Vec<(Vec<u8>, dva_io::RxMeta)> {
    let deadline = Instant::now() + timeout;
    let mut poller = Poller::new(&[io.as_raw_fd()]);
    let mut got = Vec::new();
    while got.len() < want && Instant::now() < deadline {
        let n = io
            .rx_batch(max, |f, m| {
                if is_test_frame(f) {
                    got.push((f.to_vec(), m));
                }
            })
            .unwrap();
        if n == 0 {
            poller.wait(10).unwrap();
        }
    }
    got
}

/// Queue and flush `frames` on `io`, flushing again (briefly) while the device pushes back.
pub fn send_all<T: FrameIo, F: AsRef<[u8]>>(io: &mut T, frames: impl IntoIterator<Item = F>) {
    for f in frames {
        let mut tries = 0;
        while let Err(e) = io.tx(f.as_ref()) {
            assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "{e}");
            tries += 1;
            assert!(tries < 1000, "TX stuck");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    for _ in 0..1000 {
        if io.flush().is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    panic!("flush never completed");
}

/// Whether `dev` in namespace `ns` has an XDP program attached.
pub fn xdp_attached(ns: &str, dev: &str) -> bool {
    let out = Command::new("ip")
        .args(["-n", ns, "-d", "link", "show", dev])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).contains("prog/xdp")
}
