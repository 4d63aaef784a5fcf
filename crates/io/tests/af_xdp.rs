//! AfXdp across a veth pair between two throwaway namespaces (needs root, and dva-io built
//! with clang so the XDP program is in it).

mod common;

use std::time::Duration;

use common::*;
use dva_io::af_packet::{AfPacket, AfPacketConfig};
use dva_io::af_xdp::{AfXdp, AfXdpConfig, XdpMode, BUILT};
use dva_io::port::{DriverChoice, Port};
use dva_io::{netns, FrameIo};

const WAIT: Duration = Duration::from_secs(3);

/// dva-io without clang has no AF_XDP driver; say so instead of failing.
fn built() -> bool {
    if !BUILT {
        eprintln!("skipped: dva-io was built without clang, so without the XDP program");
    }
    BUILT
}

fn open(ns: &str, dev: &str, cfg: &AfXdpConfig) -> AfXdp {
    netns::in_netns(ns, || AfXdp::open(dev, cfg))
        .unwrap()
        .unwrap()
}

fn open_packet(ns: &str, dev: &str) -> AfPacket {
    netns::in_netns(ns, || AfPacket::open(dev, &AfPacketConfig::default()))
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

fn frames(src: [u8; 6], dst: [u8; 6], n: u32) -> Vec<Vec<u8>> {
    (0..n).map(|i| test_frame(src, dst, i, size(i))).collect()
}

fn assert_same(got: &[(Vec<u8>, dva_io::RxMeta)], sent: &[Vec<u8>]) {
    assert_eq!(got.len(), sent.len(), "frames lost");
    for (i, ((frame, meta), want)) in got.iter().zip(sent).enumerate() {
        assert_eq!(frame, want, "frame {i}");
        assert_eq!(meta.wire_len as usize, want.len());
    }
}

#[test]
fn af_xdp_to_af_packet_and_back() {
    if !built() {
        return;
    }
    let lab = VethLab::new();
    lab.disable_offloads();
    let mut x = open(&lab.ns_a, &lab.dev_a, &AfXdpConfig::default());
    eprintln!("{} attached in {} mode", lab.dev_a, x.mode().as_str());
    assert!(xdp_attached(&lab.ns_a, &lab.dev_a));
    let mut p = open_packet(&lab.ns_b, &lab.dev_b);

    // Out through the AF_XDP socket.
    let out = frames(MAC_A, MAC_B, 1000);
    send_all(&mut x, &out);
    assert_same(&collect(&mut p, out.len(), 64, WAIT), &out);

    // In through the XDP program and the AF_XDP socket; small batches.
    let back = frames(MAC_B, MAC_A, 1000);
    send_all(&mut p, &back);
    assert_same(&collect(&mut x, back.len(), 7, WAIT), &back);

    // Frames built in place in a TX chunk go out as built; one taken back by its builder, or
    // asking for offload work AF_XDP cannot do, leaves nothing behind.
    let built_here = frames(MAC_A, MAC_B, 3);
    for f in &built_here {
        x.tx_with(f.len(), |chunk| {
            chunk.copy_from_slice(f);
            Some(dva_io::Offload::default())
        })
        .unwrap();
        let back = x.tx_with(f.len(), |_| None).unwrap_err();
        assert_eq!(back.kind(), std::io::ErrorKind::InvalidData);
        let gso = dva_io::Offload {
            gso: dva_io::GsoType::TcpV4,
            gso_size: 1448,
            ..Default::default()
        };
        let refused = x.tx_with(f.len(), |_| Some(gso)).unwrap_err();
        assert_eq!(refused.kind(), std::io::ErrorKind::Unsupported);
    }
    x.flush().unwrap();
    assert_same(&collect(&mut p, built_here.len(), 64, WAIT), &built_here);

    // Chunks of sent frames come back on the completion ring (maybe a little later).
    for _ in 0..100 {
        x.flush().unwrap();
        if x.tx_pending() == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let st = x.stats();
    assert_eq!(x.tx_pending(), 0, "{st:?}");
    assert_eq!(st.tx_packets, 1003, "{st:?}");
    assert!(st.rx_packets >= 1000, "{st:?}");
    assert_eq!(
        (st.drops(), st.tx_invalid_descs, st.rx_invalid_descs),
        (0, 0, 0)
    );

    // Dropping the driver takes the program off the interface.
    drop(x);
    assert!(!xdp_attached(&lab.ns_a, &lab.dev_a));
}

#[test]
fn af_xdp_on_both_ends_many_rounds() {
    if !built() {
        return;
    }
    let lab = VethLab::new();
    lab.disable_offloads();
    let cfg = AfXdpConfig {
        ring_size: 256,
        rx_frames: 256,
        tx_frames: 64,
        ..Default::default()
    };
    let mut a = open(&lab.ns_a, &lab.dev_a, &cfg);
    let mut b = open(&lab.ns_b, &lab.dev_b, &cfg);
    // More frames than chunks on either side: RX chunks go round the fill ring and TX chunks
    // come back from the completion ring many times.
    for round in 0..10u32 {
        let ab: Vec<Vec<u8>> = (0..200)
            .map(|i| test_frame(MAC_A, MAC_B, round * 1000 + i, size(i + round)))
            .collect();
        send_all(&mut a, &ab);
        assert_same(&collect(&mut b, ab.len(), 64, WAIT), &ab);
        let ba: Vec<Vec<u8>> = (0..200)
            .map(|i| test_frame(MAC_B, MAC_A, round * 1000 + i, size(i + 2 * round)))
            .collect();
        send_all(&mut b, &ba);
        assert_same(&collect(&mut a, ba.len(), 64, WAIT), &ba);
    }
    assert_eq!(a.stats().drops() + b.stats().drops(), 0);
}

#[test]
fn oversize_frames_are_refused_not_sent() {
    if !built() {
        return;
    }
    let lab = VethLab::new();
    let mut x = open(&lab.ns_a, &lab.dev_a, &AfXdpConfig::default());
    let err = x.tx(&[0u8; 2049]).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    assert!(err.to_string().contains(&lab.dev_a), "{err}");
    assert!(x.tx(&[0u8; 10]).is_err());
}

#[test]
fn generic_mode_and_port_choice() {
    if !built() {
        return;
    }
    let lab = VethLab::new();
    lab.disable_offloads();
    let cfg = AfXdpConfig {
        modes: vec![XdpMode::Generic],
        ..Default::default()
    };
    let mut x = open(&lab.ns_a, &lab.dev_a, &cfg);
    assert_eq!(x.mode(), XdpMode::Generic);
    let (mut p, opened) = netns::in_netns(&lab.ns_b, || Port::open(&lab.dev_b, DriverChoice::Auto))
        .unwrap()
        .unwrap();
    assert!(opened.fallback.is_none(), "{opened}");
    assert!(p.driver().starts_with("af_xdp"), "{}", p.driver());
    let out = frames(MAC_A, MAC_B, 300);
    send_all(&mut x, &out);
    assert_same(&collect(&mut p, out.len(), 64, WAIT), &out);
    let back = frames(MAC_B, MAC_A, 300);
    send_all(&mut p, &back);
    assert_same(&collect(&mut x, back.len(), 64, WAIT), &back);

    // Queue 0 of the interface already has a socket (and a program): AF_XDP cannot be set
    // up, so Auto falls back and says why.
    let (q, opened) = netns::in_netns(&lab.ns_a, || Port::open(&lab.dev_a, DriverChoice::Auto))
        .unwrap()
        .unwrap();
    assert_eq!(q.driver(), "af_packet");
    assert!(opened.fallback.is_some());
    eprintln!("fallback: {opened}");
    let forced =
        netns::in_netns(&lab.ns_a, || Port::open(&lab.dev_a, DriverChoice::AfXdp)).unwrap();
    assert!(forced.is_err());
}

#[test]
fn auto_takes_af_packet_where_a_veth_carries_super_packets() {
    if !built() {
        return;
    }
    // A veth as the kernel creates it (and a Linux host leaves it): segmentation offload on.
    let lab = VethLab::new();
    let (p, opened) = netns::in_netns(&lab.ns_b, || Port::open(&lab.dev_b, DriverChoice::Auto))
        .unwrap()
        .unwrap();
    assert_eq!(p.driver(), "af_packet");
    assert!(
        p.offloads(),
        "virtio-net headers: super-packets taken whole"
    );
    assert!(
        opened
            .fallback
            .as_deref()
            .is_some_and(|w| w.contains("super-packets")),
        "{opened}"
    );
    assert!(!xdp_attached(&lab.ns_b, &lab.dev_b));
    drop(p);
    // Offloads off: wire-sized frames, AF_XDP.
    lab.disable_offloads();
    let tso = netns::in_netns(&lab.ns_b, || dva_io::netif::tso_enabled(&lab.dev_b))
        .unwrap()
        .unwrap();
    if tso {
        eprintln!("skipped the second half: ethtool could not turn TSO off");
        return;
    }
    let (p, opened) = netns::in_netns(&lab.ns_b, || Port::open(&lab.dev_b, DriverChoice::Auto))
        .unwrap()
        .unwrap();
    assert!(p.driver().starts_with("af_xdp"), "{opened}");
    assert!(opened.fallback.is_none(), "{opened}");
}

#[test]
fn every_receive_queue_gets_a_socket() {
    if !built() {
        return;
    }
    // A 4-queue veth: the sending kernel spreads flows over its TX queues by hash, and each
    // lands on the peer's RX queue of the same number, as RSS spreads them on a NIC.
    let lab = VethLab::with_queues(4);
    let mut x = open(&lab.ns_b, &lab.dev_b, &AfXdpConfig::default());
    assert_eq!(x.queues(), 4);
    assert_eq!(x.poll_fds().len(), 4);
    lab.address_a_towards_b();
    const FLOWS: u16 = 64;
    netns::in_netns(&lab.ns_a, || {
        for i in 0..FLOWS {
            let s = std::net::UdpSocket::bind(("198.18.0.1", 20000 + i)).unwrap();
            s.send_to(b"which queue?", "198.18.0.2:9").unwrap();
        }
    })
    .unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    let mut poller = dva_io::poll::Poller::new(&x.poll_fds());
    let mut ports = std::collections::BTreeSet::new();
    while ports.len() < usize::from(FLOWS) && std::time::Instant::now() < deadline {
        x.rx_batch(64, |f, _| {
            // IPv4, UDP, to port 9: note the source port.
            if f.len() >= 42 && f[12..14] == [0x08, 0x00] && f[23] == 17 && f[36..38] == [0, 9] {
                ports.insert(u16::from_be_bytes([f[34], f[35]]));
            }
        })
        .unwrap();
        poller.wait(10).unwrap();
    }
    assert_eq!(
        ports.len(),
        usize::from(FLOWS),
        "every flow's datagram arrived"
    );
    let per_queue = x.rx_per_queue();
    let used = per_queue.iter().filter(|n| **n > 0).count();
    eprintln!("frames per queue: {per_queue:?}");
    assert!(used >= 2, "flows spread over the queues: {per_queue:?}");
}

#[test]
fn busy_polling_sockets_receive_and_send() {
    if !built() {
        return;
    }
    let lab = VethLab::new();
    lab.disable_offloads();
    let cfg = AfXdpConfig {
        busy_poll_us: 20,
        ..Default::default()
    };
    let mut x = open(&lab.ns_a, &lab.dev_a, &cfg);
    let mut p = open_packet(&lab.ns_b, &lab.dev_b);
    let back = frames(MAC_B, MAC_A, 200);
    send_all(&mut p, &back);
    assert_same(&collect(&mut x, back.len(), 16, WAIT), &back);
    let out = frames(MAC_A, MAC_B, 200);
    send_all(&mut x, &out);
    assert_same(&collect(&mut p, out.len(), 64, WAIT), &out);
}

#[test]
fn frames_from_a_veth_are_flagged_as_maybe_partial() {
    if !built() {
        return;
    }
    // The peer keeps TX checksumming on (a veth's default): its kernel leaves UDP checksums
    // partial, and AF_XDP hands them over unmarked, so the driver flags every veth frame.
    let lab = VethLab::new();
    let mut x = open(&lab.ns_b, &lab.dev_b, &AfXdpConfig::default());
    lab.address_a_towards_b();
    netns::in_netns(&lab.ns_a, || {
        let s = std::net::UdpSocket::bind(("198.18.0.1", 20000)).unwrap();
        s.send_to(&[7u8; 300], "198.18.0.2:9").unwrap();
    })
    .unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    let mut poller = dva_io::poll::Poller::new(&x.poll_fds());
    let mut got = None;
    while got.is_none() && std::time::Instant::now() < deadline {
        x.rx_batch(64, |f, m| {
            if f.len() >= 42 && f[12..14] == [0x08, 0x00] && f[23] == 17 {
                got = Some(m);
            }
        })
        .unwrap();
        poller.wait(10).unwrap();
    }
    let meta = got.expect("the datagram arrived");
    assert!(meta.csum_unknown, "{meta:?}");
}
