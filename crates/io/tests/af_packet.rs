//! AfPacket across a veth pair between two throwaway namespaces (needs root).

mod common;

use std::time::Duration;

use common::*;
use dva_io::af_packet::{AfPacket, AfPacketConfig};
use dva_io::poll::Poller;
use dva_io::{netif, netns, FrameIo};

const WAIT: Duration = Duration::from_secs(3);

fn open(ns: &str, dev: &str, cfg: &AfPacketConfig) -> AfPacket {
    netns::in_netns(ns, || AfPacket::open(dev, cfg))
        .unwrap()
        .unwrap()
}

/// Frame `i` of a size sweep over 60..=1514 that hits both ends.
fn size(i: u32) -> usize {
    match i % 500 {
        0 => 60,
        1 => 1514,
        _ => 60 + (i as usize * 37) % (1514 - 60 + 1),
    }
}

#[test]
fn thousand_frames_cross_the_veth_exactly() {
    let lab = VethLab::new();
    lab.disable_offloads();
    let cfg = AfPacketConfig::default();
    let mut tx = open(&lab.ns_a, &lab.dev_a, &cfg);
    let mut rx = open(&lab.ns_b, &lab.dev_b, &cfg);
    assert_eq!(tx.ifname(), lab.dev_a);

    let sent: Vec<Vec<u8>> = (0..1000)
        .map(|i| test_frame(MAC_A, MAC_B, i, size(i)))
        .collect();
    assert!(sent.iter().any(|f| f.len() == 60) && sent.iter().any(|f| f.len() == 1514));
    for f in &sent {
        tx.tx(f).unwrap();
    }
    tx.flush().unwrap();
    assert_eq!(tx.tx_pending(), 0);

    // A small batch size makes batches stop inside ring blocks and resume there.
    let got = collect(&mut rx, sent.len(), 7, WAIT);
    assert_eq!(got.len(), sent.len(), "frames lost");
    for (i, ((frame, meta), want)) in got.iter().zip(&sent).enumerate() {
        assert_eq!(frame, want, "frame {i}");
        assert_eq!(meta.wire_len as usize, want.len());
        assert!(!meta.truncated);
    }

    // PACKET_IGNORE_OUTGOING: the sender does not see its own frames.
    assert!(collect(&mut tx, 1, 64, Duration::from_millis(50)).is_empty());

    let rs = rx.stats();
    assert_eq!(rs.drops, 0);
    assert!(rs.packets >= 1000, "{rs:?}");
    let ts = tx.stats();
    assert_eq!((ts.tx_packets, ts.tx_dropped), (1000, 0));
}

#[test]
fn both_directions_and_small_batches() {
    let lab = VethLab::new();
    let cfg = AfPacketConfig {
        block_size: 64 << 10,
        block_count: 8,
        tx_frames: 16,
        ..Default::default()
    };
    let mut a = open(&lab.ns_a, &lab.dev_a, &cfg);
    let mut b = open(&lab.ns_b, &lab.dev_b, &cfg);
    // 100 frames through a 16-frame TX queue: `tx` flushes by itself when full.
    for i in 0..100 {
        a.tx(&test_frame(MAC_A, MAC_B, i, size(i))).unwrap();
        b.tx(&test_frame(MAC_B, MAC_A, 1000 + i, size(i + 500)))
            .unwrap();
    }
    a.flush().unwrap();
    b.flush().unwrap();
    let at_b = collect(&mut b, 100, 64, WAIT);
    let at_a = collect(&mut a, 100, 64, WAIT);
    assert_eq!(at_b.len(), 100);
    assert_eq!(at_a.len(), 100);
    for i in 0..100 {
        assert_eq!(
            at_b[i].0,
            test_frame(MAC_A, MAC_B, i as u32, size(i as u32))
        );
        assert_eq!(
            at_a[i].0,
            test_frame(MAC_B, MAC_A, 1000 + i as u32, size(i as u32 + 500))
        );
    }
}

#[test]
fn frames_longer_than_a_block_arrive_truncated_and_flagged() {
    let lab = VethLab::new();
    lab.disable_offloads();
    lab.set_mtu(9000);
    let small = AfPacketConfig {
        block_size: 4096,
        block_count: 4,
        frame_size: 2048,
        ..Default::default()
    };
    let mut tx = open(&lab.ns_a, &lab.dev_a, &AfPacketConfig::default());
    let mut rx = open(&lab.ns_b, &lab.dev_b, &small);
    let big = test_frame(MAC_A, MAC_B, 1, 6000);
    let after = test_frame(MAC_A, MAC_B, 2, 100);
    tx.tx(&big).unwrap();
    tx.tx(&after).unwrap();
    tx.flush().unwrap();
    let got = collect(&mut rx, 2, 64, WAIT);
    assert_eq!(got.len(), 2);
    let (frame, meta) = &got[0];
    assert!(meta.truncated);
    assert_eq!(meta.wire_len, 6000);
    assert!(frame.len() < 4096);
    assert_eq!(frame[..], big[..frame.len()]);
    assert_eq!(got[1].0, after);
    assert!(!got[1].1.truncated);
}

#[test]
fn partial_checksums_from_the_stack_are_reported() {
    let lab = VethLab::new();
    // The kernel stack in a sends UDP to b; veth keeps checksum offload on by default, so the
    // frame reaches b's ring with CHECKSUM_PARTIAL.
    lab.address_a_towards_b();
    let mut rx = open(&lab.ns_b, &lab.dev_b, &AfPacketConfig::default());
    netns::in_netns(&lab.ns_a, || {
        let s = std::net::UdpSocket::bind("198.18.0.1:0").unwrap();
        s.send_to(b"checksum please", "198.18.0.2:9").unwrap();
    })
    .unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    let mut poller = Poller::new(&[rx.as_raw_fd()]);
    let mut seen = None;
    while seen.is_none() && std::time::Instant::now() < deadline {
        rx.rx_batch(64, |f, m| {
            // IPv4, UDP, destination port 9.
            if f.len() >= 42 && f[12..14] == [0x08, 0x00] && f[23] == 17 && f[36..38] == [0, 9] {
                seen = Some(m);
            }
        })
        .unwrap();
        poller.wait(10).unwrap();
    }
    let meta = seen.expect("UDP datagram not seen");
    assert!(meta.csum_not_ready, "{meta:?}");
}

#[test]
fn bad_frames_are_rejected_without_blocking_the_rest() {
    let lab = VethLab::new();
    let mut tx = open(&lab.ns_a, &lab.dev_a, &AfPacketConfig::default());
    let mut rx = open(&lab.ns_b, &lab.dev_b, &AfPacketConfig::default());
    assert_eq!(
        tx.tx(&[0; 10]).unwrap_err().kind(),
        std::io::ErrorKind::InvalidInput
    );
    tx.tx(&test_frame(MAC_A, MAC_B, 1, 100)).unwrap();
    // Longer than the 1500-byte MTU allows: the kernel refuses this one frame (EMSGSIZE).
    tx.tx(&test_frame(MAC_A, MAC_B, 2, 3000)).unwrap();
    tx.tx(&test_frame(MAC_A, MAC_B, 3, 200)).unwrap();
    let err = tx.flush().unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EMSGSIZE), "{err}");
    assert_eq!(tx.tx_pending(), 0);
    let st = tx.stats();
    assert_eq!((st.tx_packets, st.tx_dropped), (2, 1));
    let got = collect(&mut rx, 2, 64, WAIT);
    let seqs: Vec<u8> = got.iter().map(|(f, _)| f[17]).collect();
    assert_eq!(seqs, vec![1, 3]);
}

#[test]
fn a_full_ring_counts_drops_and_recovers() {
    let lab = VethLab::new();
    let tiny = AfPacketConfig {
        block_size: 4096,
        block_count: 2,
        frame_size: 2048,
        ..Default::default()
    };
    let mut tx = open(&lab.ns_a, &lab.dev_a, &AfPacketConfig::default());
    let mut rx = open(&lab.ns_b, &lab.dev_b, &tiny);
    for i in 0..100 {
        tx.tx(&test_frame(MAC_A, MAC_B, i, 1000)).unwrap();
    }
    tx.flush().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let st = rx.stats();
    assert!(st.drops >= 90, "{st:?}");
    assert!(st.packets >= st.drops);
    // Drain what fit, then the ring works again.
    let first = collect(&mut rx, 100, 64, Duration::from_millis(50));
    assert!(!first.is_empty() && first.len() <= 10, "{}", first.len());
    tx.tx(&test_frame(MAC_A, MAC_B, 500, 300)).unwrap();
    tx.flush().unwrap();
    let again = collect(&mut rx, 1, 64, WAIT);
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].0, test_frame(MAC_A, MAC_B, 500, 300));
    // Counters accumulate across reads although the kernel resets its own.
    assert!(rx.stats().drops >= st.drops);
}

#[test]
fn poller_wakes_when_the_ring_has_frames() {
    let lab = VethLab::new();
    let mut tx = open(&lab.ns_a, &lab.dev_a, &AfPacketConfig::default());
    let mut rx = open(&lab.ns_b, &lab.dev_b, &AfPacketConfig::default());
    let mut poller = Poller::new(&[rx.as_raw_fd()]);
    // Drain anything the kernel sent when the link came up.
    while poller.wait(20).unwrap()[0] {
        rx.rx_batch(usize::MAX, |_, _| {}).unwrap();
    }
    tx.tx(&test_frame(MAC_A, MAC_B, 7, 64)).unwrap();
    tx.flush().unwrap();
    assert!(poller.wait(1000).unwrap()[0]);
    let mut n = 0;
    rx.rx_batch(64, |f, _| n += usize::from(is_test_frame(f)))
        .unwrap();
    assert_eq!(n, 1);
}

#[test]
fn netif_helpers_see_the_namespace() {
    let lab = VethLab::new();
    lab.ip_in(&lab.ns_a, &["link", "set", &lab.dev_a, "down"]);
    let (index, mac, mtu, up_before, up_after) = netns::in_netns(&lab.ns_a, || {
        let before = netif::is_up(&lab.dev_a).unwrap();
        netif::set_up(&lab.dev_a).unwrap();
        netif::set_up(&lab.dev_a).unwrap();
        (
            netif::ifindex(&lab.dev_a).unwrap(),
            netif::mac_address(&lab.dev_a).unwrap(),
            netif::mtu(&lab.dev_a).unwrap(),
            before,
            netif::is_up(&lab.dev_a).unwrap(),
        )
    })
    .unwrap();
    assert!(index > 1);
    assert_eq!(mac, MAC_A);
    assert_eq!(mtu, 1500);
    assert!(!up_before && up_after);
    // The device lives only in its namespace.
    assert!(netif::ifindex(&lab.dev_a).is_err());
    assert!(netns::netns_exists(&lab.ns_a));
    let tx = open(&lab.ns_a, &lab.dev_a, &AfPacketConfig::default());
    assert_eq!(tx.ifindex(), index);
}

#[test]
fn lab_namespaces_are_removed_by_the_guard() {
    let name = {
        let lab = VethLab::new();
        assert!(netns::netns_exists(&lab.ns_b));
        lab.ns_b.clone()
    };
    assert!(!netns::netns_exists(&name));
}

/// A TCP/IPv4 super-packet of `payload` bytes, its checksum partial (pseudo-header only, as
/// the kernel leaves it for offload), from MAC_A to MAC_B.
fn tcp_super_packet(payload: usize) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&MAC_B);
    f.extend_from_slice(&MAC_A);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + 20 + payload) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[6] = 0x40; // DF, as TCP sends it
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&[198, 18, 0, 1]);
    ip[16..20].copy_from_slice(&[198, 18, 0, 2]);
    let ck = !fold(
        ip.chunks(2)
            .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
            .sum(),
    );
    ip[10..12].copy_from_slice(&ck.to_be_bytes());
    f.extend_from_slice(&ip);
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&5201u16.to_be_bytes());
    tcp[4..8].copy_from_slice(&1u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x18; // PSH|ACK
    tcp[14..16].copy_from_slice(&64000u16.to_be_bytes());
    // Partial: the folded pseudo-header sum, not complemented.
    let pseudo = 198 * 256 + 18 + 1 + 198 * 256 + 18 + 2 + 6 + u32::from(total - 20);
    tcp[16..18].copy_from_slice(&fold(pseudo).to_be_bytes());
    f.extend_from_slice(&tcp);
    f.extend((0..payload).map(|i| (i % 251) as u8));
    f
}

/// The description of [`tcp_super_packet`]'s offload work: TCP over IPv4 in 1448-byte
/// segments, its checksum partial.
fn super_packet_offload() -> dva_io::Offload {
    dva_io::Offload {
        gso: dva_io::GsoType::TcpV4,
        ecn: false,
        gso_size: 1448,
        needs_csum: true,
        csum_start: 34,
        csum_offset: 16,
    }
}

/// Up to `want` frames addressed to MAC_B, whatever they carry (`collect` keeps test frames
/// only), for at most WAIT; the kernel's own (the new link's IPv6 neighbour discovery) are
/// left out.
fn collect_to_b(rx: &mut AfPacket, want: usize) -> Vec<(Vec<u8>, dva_io::RxMeta)> {
    let deadline = std::time::Instant::now() + WAIT;
    let mut poller = Poller::new(&[rx.as_raw_fd()]);
    let mut got = Vec::new();
    while got.len() < want && std::time::Instant::now() < deadline {
        rx.rx_batch(64, |f, m| {
            if f[..6] == MAC_B {
                got.push((f.to_vec(), m))
            }
        })
        .unwrap();
        poller.wait(10).unwrap();
    }
    got
}

fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

#[test]
fn gso_super_packets_cross_the_veth_whole_with_their_description() {
    use dva_io::GsoType;
    // Offloads stay on (the veth default): the pair passes a GSO skb through unsegmented,
    // which is what a kernel TCP sender's 64 KB segments look like to the dispatcher.
    let lab = VethLab::new();
    let mut tx = open(&lab.ns_a, &lab.dev_a, &AfPacketConfig::default());
    let mut rx = open(&lab.ns_b, &lab.dev_b, &AfPacketConfig::default());
    assert!(tx.offloads());
    let frame = tcp_super_packet(20_000);
    let off = super_packet_offload();
    tx.tx_offload(&frame, &off).unwrap();
    // An ordinary frame after it still goes out (zero virtio-net header).
    tx.tx(&test_frame(MAC_A, MAC_B, 7, 100)).unwrap();
    tx.flush().unwrap();
    let got = collect_to_b(&mut rx, 2);
    assert_eq!(got.len(), 2, "{got:?}");
    let (f, m) = &got[0];
    assert_eq!(
        f.len(),
        frame.len(),
        "one frame, not {} segments",
        20_000 / 1448 + 1
    );
    assert_eq!(f[..], frame[..]);
    assert_eq!(m.offload.gso, GsoType::TcpV4, "{m:?}");
    assert_eq!(m.offload.gso_size, 1448);
    assert!(m.offload.needs_csum && m.csum_not_ready);
    assert_eq!((m.offload.csum_start, m.offload.csum_offset), (34, 16));
    assert!(!m.truncated);
    assert!(is_test_frame(&got[1].0));
    assert!(got[1].1.offload.is_none(), "{:?}", got[1].1);

    // Without the header the same socket type refuses offload work instead of sending a
    // super-packet the kernel would take for a malformed frame.
    let plain = AfPacketConfig {
        vnet_hdr: false,
        ..Default::default()
    };
    let mut tx2 = open(&lab.ns_a, &lab.dev_a, &plain);
    assert!(!tx2.offloads());
    let err = tx2.tx_offload(&frame, &off).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::Unsupported);
}

#[test]
fn frames_built_in_place_go_out_as_built() {
    use dva_io::{GsoType, Offload};
    let lab = VethLab::new();
    let mut tx = open(&lab.ns_a, &lab.dev_a, &AfPacketConfig::default());
    let mut rx = open(&lab.ns_b, &lab.dev_b, &AfPacketConfig::default());
    // A super-packet written straight into the TX buffer, with its offload work.
    let frame = tcp_super_packet(20_000);
    let off = super_packet_offload();
    tx.tx_with(frame.len(), |f| {
        f.copy_from_slice(&frame);
        Some(off)
    })
    .unwrap();
    // Taken back by its builder: nothing queued, and the next frame is not disturbed by it.
    let err = tx
        .tx_with(1000, |f| {
            f.fill(0xee);
            None
        })
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    let small = test_frame(MAC_A, MAC_B, 9, 200);
    tx.tx_with(small.len(), |f| {
        f.copy_from_slice(&small);
        Some(Offload::default())
    })
    .unwrap();
    assert_eq!(tx.tx_pending(), 2);
    tx.flush().unwrap();
    let got = collect_to_b(&mut rx, 2);
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0].0, frame, "the super-packet whole");
    assert_eq!(got[0].1.offload.gso, GsoType::TcpV4);
    assert_eq!(got[0].1.offload.gso_size, 1448);
    assert_eq!(got[1].0, small);
    assert!(got[1].1.offload.is_none());
    // Too long for any frame: refused before the builder runs.
    let mut called = false;
    let err = tx
        .tx_with(1 << 20, |_| {
            called = true;
            Some(Offload::default())
        })
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    assert!(!called);
}

#[test]
fn frames_sent_from_where_they_lie_and_detached_when_kept() {
    use dva_io::Offload;
    let lab = VethLab::new();
    let mut tx = open(&lab.ns_a, &lab.dev_a, &AfPacketConfig::default());
    let mut rx = open(&lab.ns_b, &lab.dev_b, &AfPacketConfig::default());
    let room = tx
        .headroom()
        .expect("AF_PACKET sends from the caller's memory");
    let frames: Vec<Vec<u8>> = (0..3).map(|i| test_frame(MAC_A, MAC_B, i, 300)).collect();
    // Each frame behind `room` bytes of headroom (and 24 more the driver must leave alone).
    let mut bufs: Vec<Vec<u8>> = frames
        .iter()
        .map(|f| {
            let mut b = vec![0xaa; 24 + room];
            b.extend_from_slice(f);
            b
        })
        .collect();
    let own = test_frame(MAC_A, MAC_B, 7, 200);
    for (i, b) in bufs.iter_mut().enumerate() {
        // SAFETY: the buffers outlive the flush below, unchanged until `detach` copied them.
        unsafe { tx.tx_borrowed(b, 24 + room, &Offload::default()) }.unwrap();
        if i == 0 {
            // An own frame between borrowed ones keeps its place in the queue.
            tx.tx(&own).unwrap();
        }
    }
    assert_eq!(tx.tx_pending(), 4);
    // Not yet sent: `detach` copies them, after which the caller may reuse its memory.
    tx.detach();
    for b in &mut bufs {
        assert!(
            b[..24].iter().all(|&x| x == 0xaa),
            "the driver wrote outside its headroom"
        );
        b.fill(0x55);
    }
    tx.flush().unwrap();
    let got = collect(&mut rx, 4, 64, WAIT);
    let want = [&frames[0], &own, &frames[1], &frames[2]];
    assert_eq!(got.len(), 4, "{got:?}");
    for (g, w) in got.iter().zip(want) {
        assert_eq!(&g.0, w);
    }
    // Sent straight from the caller's memory (no detach): arrives as it lay.
    let mut b = vec![0u8; room];
    b.extend_from_slice(&frames[0]);
    // SAFETY: `b` lives until after the flush.
    unsafe { tx.tx_borrowed(&mut b, room, &Offload::default()) }.unwrap();
    tx.flush().unwrap();
    let got = collect(&mut rx, 1, 64, WAIT);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, frames[0]);
    // No room for the driver's header: refused, nothing queued.
    if room > 0 {
        let mut short = frames[1].clone();
        // SAFETY: refused before anything is queued.
        let err = unsafe { tx.tx_borrowed(&mut short, 0, &Offload::default()) }.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
        assert_eq!(tx.tx_pending(), 0);
    }
}
