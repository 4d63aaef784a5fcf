//! The backplane socket keeps its datagrams to itself: no other socket may bind its address and
//! port, and it hears only datagrams that arrive on the device holding its address (issue #13).

mod common;

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use common::VethLab;
use dva_io::netns::in_netns;
use dva_io::poll::Poller;
use dva_io::udp::UdpEndpoint;

/// What an unprivileged local user tries: a UDP socket with SO_REUSEADDR bound to `addr`.
fn bind_reusing(addr: SocketAddr) -> io::Result<OwnedFd> {
    let SocketAddr::V4(v4) = addr else {
        panic!("IPv4 only in this test");
    };
    // SAFETY: socket(2) takes no pointers.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and nothing else owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let on: libc::c_int = 1;
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(v4.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: `on` and `sin` are live locals of the sizes passed; the kernel only reads them.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        libc::bind(
            fd,
            (&sin as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(owned)
}

/// Datagrams `ep` receives until `want` arrived or a few seconds passed.
fn collect(ep: &mut UdpEndpoint, want: usize) -> Vec<Vec<u8>> {
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut poller = Poller::new(&[ep.as_raw_fd()]);
    let mut got = Vec::new();
    while got.len() < want && Instant::now() < deadline {
        if ep.recv_batch(want, |b, _| got.push(b.to_vec())).unwrap() == 0 {
            poller.wait(10).unwrap();
        }
    }
    got
}

#[test]
fn nobody_else_binds_the_backplane_address_and_port() {
    let ep = UdpEndpoint::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let err = bind_reusing(ep.local_addr()).expect_err("a second socket bound the backplane port");
    assert_eq!(err.raw_os_error(), Some(libc::EADDRINUSE), "{err}");
}

#[test]
fn datagrams_arriving_on_another_device_do_not_reach_the_socket() {
    // a (va) 10.77.0.1/24 ---- b (vb) 10.77.0.2/24; a also holds 10.78.0.1 on x<n>, a second
    // device that leads nowhere, like an appliance interface holding an address of its own.
    let lab = VethLab::new();
    let other = format!("x{}", lab.dev_a);
    // Local delivery needs lo up, as it is in the lab's hosts.
    lab.ip_in(&lab.ns_a, &["link", "set", "lo", "up"]);
    lab.ip_in(
        &lab.ns_a,
        &["addr", "add", "10.77.0.1/24", "dev", &lab.dev_a],
    );
    lab.ip_in(
        &lab.ns_b,
        &["addr", "add", "10.77.0.2/24", "dev", &lab.dev_b],
    );
    lab.ip_in(
        &lab.ns_a,
        &[
            "link",
            "add",
            &other,
            "type",
            "veth",
            "peer",
            "name",
            &format!("{other}p"),
        ],
    );
    lab.ip_in(&lab.ns_a, &["addr", "add", "10.78.0.1/32", "dev", &other]);
    lab.ip_in(&lab.ns_a, &["link", "set", &other, "up"]);
    lab.ip_in(&lab.ns_a, &["link", "set", &format!("{other}p"), "up"]);
    lab.ip_in(
        &lab.ns_b,
        &["route", "add", "10.78.0.1/32", "via", "10.77.0.1"],
    );

    let (mut on_link, mut on_other, mut local) = in_netns(&lab.ns_a, || {
        (
            UdpEndpoint::bind("10.77.0.1:6081".parse().unwrap()).unwrap(),
            UdpEndpoint::bind("10.78.0.1:6081".parse().unwrap()).unwrap(),
            UdpEndpoint::bind("10.77.0.1:0".parse().unwrap()).unwrap(),
        )
    })
    .unwrap();
    let peer = in_netns(&lab.ns_b, || UdpSocket::bind("10.77.0.2:0").unwrap()).unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();

    // Through the device that holds the address: delivered.
    peer.send_to(b"legit", "10.77.0.1:6081").unwrap();
    assert_eq!(collect(&mut on_link, 1), vec![b"legit".to_vec()]);

    // To 10.78.0.1, but in through va: the kernel finds no socket for it and answers port
    // unreachable, which a connected UDP socket reports as ECONNREFUSED on its next receive.
    peer.connect("10.78.0.1:6081").unwrap();
    peer.send(b"spoofed").unwrap();
    let err = peer
        .recv(&mut [0u8; 64])
        .expect_err("no answer expected, only an ICMP error");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
    assert_eq!(on_other.recv_batch(8, |_, _| {}).unwrap(), 0);

    // Units on one host still reach each other by their device addresses (the kernel carries
    // such datagrams over lo, marked with the sender's bound device).
    local.send_to(b"same host", on_link.local_addr()).unwrap();
    local.flush().unwrap();
    assert_eq!(collect(&mut on_link, 1), vec![b"same host".to_vec()]);
}
