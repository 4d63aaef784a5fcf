//! UdpEndpoint batches over loopback.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use dva_io::poll::Poller;
use dva_io::udp::{UdpConfig, UdpEndpoint, MAX_DATAGRAM};

fn endpoint() -> UdpEndpoint {
    UdpEndpoint::bind("127.0.0.1:0".parse().unwrap()).unwrap()
}

fn payload(seq: u32, len: usize) -> Vec<u8> {
    let mut p: Vec<u8> = seq
        .to_be_bytes()
        .iter()
        .copied()
        .cycle()
        .take(len.max(4))
        .collect();
    for (i, b) in p.iter_mut().enumerate().skip(4) {
        *b = b.wrapping_add(i as u8);
    }
    p.truncate(len);
    p
}

/// Receive until `want` datagrams arrived or a few seconds passed.
fn collect(rx: &mut UdpEndpoint, want: usize) -> Vec<(Vec<u8>, SocketAddr)> {
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut poller = Poller::new(&[rx.as_raw_fd()]);
    let mut got = Vec::new();
    while got.len() < want && Instant::now() < deadline {
        if rx
            .recv_batch(want - got.len(), |b, src| got.push((b.to_vec(), src)))
            .unwrap()
            == 0
        {
            poller.wait(10).unwrap();
        }
    }
    got
}

#[test]
fn thousand_datagrams_round_trip_in_batches() {
    let mut a = endpoint();
    let mut b = endpoint();
    let dst = b.local_addr();
    assert_ne!(dst.port(), 0);
    let sent: Vec<Vec<u8>> = (0..1000u32)
        .map(|i| payload(i, 1 + (i as usize * 131) % 1400))
        .collect();
    for p in &sent {
        a.send_to(p, dst).unwrap();
    }
    a.flush().unwrap();
    assert_eq!(a.tx_queued(), 0);
    let got = collect(&mut b, sent.len());
    assert_eq!(got.len(), sent.len());
    for (i, ((data, src), want)) in got.iter().zip(&sent).enumerate() {
        assert_eq!(data, want, "datagram {i}");
        assert_eq!(*src, a.local_addr());
    }
    assert_eq!(a.tx_dropped(), 0);
    assert_eq!(a.stats().tx_datagrams, 1000);
    assert_eq!(b.stats().rx_datagrams, 1000);
}

#[test]
fn jumbo_datagrams_fit_a_slot() {
    let mut a = endpoint();
    let mut b = endpoint();
    for i in 0..50 {
        a.send_to(&payload(i, MAX_DATAGRAM), b.local_addr())
            .unwrap();
    }
    a.flush().unwrap();
    let got = collect(&mut b, 50);
    assert_eq!(got.len(), 50);
    assert!(got
        .iter()
        .enumerate()
        .all(|(i, (d, _))| *d == payload(i as u32, MAX_DATAGRAM)));
}

#[test]
fn slots_build_datagrams_in_place_and_flush_when_full() {
    let cfg = UdpConfig {
        tx_batch: 8,
        rx_batch: 4,
        ..Default::default()
    };
    let mut a = UdpEndpoint::bind_with("127.0.0.1:0".parse().unwrap(), &cfg).unwrap();
    let mut b = endpoint();
    for i in 0..8u8 {
        let slot = a.tx_slot().unwrap();
        assert_eq!(slot.len(), MAX_DATAGRAM);
        slot[..8].copy_from_slice(&[0x00, 0x00, 0x65, 0x58, 0, 0, 42, 0]);
        slot[8] = i;
        a.commit_slot(9, b.local_addr());
    }
    // The eighth commit filled the batch and sent it.
    assert_eq!(a.tx_queued(), 0);
    assert_eq!(a.stats().tx_datagrams, 8);
    // Written but never committed: nothing is sent.
    a.tx_slot().unwrap()[0] = 0xff;
    a.flush().unwrap();
    let got = collect(&mut b, 8);
    assert_eq!(got.len(), 8);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(b.recv_batch(64, |_, _| {}).unwrap(), 0);
    for (i, (d, _)) in got.iter().enumerate() {
        assert_eq!(d[..], [0x00, 0x00, 0x65, 0x58, 0, 0, 42, 0, i as u8]);
    }
    // A receive batch of 4 still drains everything over several recvmmsg calls.
    for i in 0..10u32 {
        a.send_to(&payload(i, 100), b.local_addr()).unwrap();
    }
    a.flush().unwrap();
    assert_eq!(collect(&mut b, 10).len(), 10);
}

#[test]
fn oversize_and_unsendable_datagrams_are_counted_not_fatal() {
    let mut a = endpoint();
    let mut b = endpoint();
    let err = a
        .send_to(&vec![0; MAX_DATAGRAM + 1], b.local_addr())
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    assert_eq!(a.tx_dropped(), 1);
    a.tx_slot().unwrap();
    a.commit_slot(MAX_DATAGRAM + 1, b.local_addr());
    assert_eq!(a.tx_dropped(), 2);

    // An IPv6 destination on an IPv4 socket fails alone; its batch neighbours still go out.
    a.send_to(b"first", b.local_addr()).unwrap();
    a.send_to(b"lost", "[2001:db8::1]:6081".parse().unwrap())
        .unwrap();
    a.send_to(b"last", b.local_addr()).unwrap();
    assert!(a.flush().is_err());
    assert_eq!(a.tx_dropped(), 3);
    assert_eq!(a.tx_queued(), 0);
    let got: Vec<Vec<u8>> = collect(&mut b, 2).into_iter().map(|(d, _)| d).collect();
    assert_eq!(got, vec![b"first".to_vec(), b"last".to_vec()]);
}

#[test]
fn received_datagrams_longer_than_a_slot_are_discarded() {
    let mut b = endpoint();
    let plain = UdpSocket::bind("127.0.0.1:0").unwrap();
    plain
        .send_to(&vec![7; MAX_DATAGRAM + 100], b.local_addr())
        .unwrap();
    plain.send_to(b"fits", b.local_addr()).unwrap();
    let got = collect(&mut b, 1);
    assert_eq!(got, vec![(b"fits".to_vec(), plain.local_addr().unwrap())]);
    assert_eq!(b.stats().rx_oversize, 1);
}

#[test]
fn ipv6_loopback_works() {
    let Ok(mut b) = UdpEndpoint::bind("[::1]:0".parse().unwrap()) else {
        eprintln!("no IPv6 loopback here; skipped");
        return;
    };
    let mut a = UdpEndpoint::bind("[::1]:0".parse().unwrap()).unwrap();
    a.send_to(b"over v6", b.local_addr()).unwrap();
    a.flush().unwrap();
    assert_eq!(
        collect(&mut b, 1),
        vec![(b"over v6".to_vec(), a.local_addr())]
    );
}

#[test]
fn dual_stack_socket_reports_ipv4_peers_as_ipv4() {
    let Ok(mut b) = UdpEndpoint::bind("[::]:0".parse().unwrap()) else {
        eprintln!("no IPv6 here; skipped");
        return;
    };
    let mut a = endpoint();
    let dst: SocketAddr = format!("127.0.0.1:{}", b.local_addr().port())
        .parse()
        .unwrap();
    a.send_to(b"v4 to dual", dst).unwrap();
    a.flush().unwrap();
    assert_eq!(
        collect(&mut b, 1),
        vec![(b"v4 to dual".to_vec(), a.local_addr())]
    );
    // And the reply path maps the IPv4 destination for the IPv6 socket.
    b.send_to(b"reply", a.local_addr()).unwrap();
    b.flush().unwrap();
    assert_eq!(collect(&mut a, 1), vec![(b"reply".to_vec(), dst)]);
}

#[test]
fn socket_buffers_are_large() {
    let a = endpoint();
    let (rcv, snd) = a.socket_buffer_sizes().unwrap();
    // The kernel reports twice what was set; as root SO_*BUFFORCE passes the sysctl caps.
    assert!(rcv >= 8 << 20 && snd >= 8 << 20, "{rcv} {snd}");
}

#[test]
fn recv_on_an_empty_socket_returns_at_once() {
    let mut a = endpoint();
    let start = Instant::now();
    assert_eq!(
        a.recv_batch(64, |_, _| panic!("nothing was sent")).unwrap(),
        0
    );
    assert!(start.elapsed() < Duration::from_secs(1));
}
