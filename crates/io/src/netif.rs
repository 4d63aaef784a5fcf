//! Interface queries and admin state through `ioctl(2)` on a throwaway socket.
//!
//! Every function acts in the network namespace of the calling thread (the namespace the
//! helper socket is created in), so call them after [`crate::netns::enter`] or inside
//! [`crate::netns::in_netns`].

use std::io;
use std::mem::zeroed;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};

use crate::sys;
use crate::IoError;

/// The kernel's index of interface `name`.
pub fn ifindex(name: &str) -> Result<u32, IoError> {
    let req = query(name, libc::SIOCGIFINDEX, "ioctl SIOCGIFINDEX")?;
    // SAFETY: SIOCGIFINDEX filled the `ifru_ifindex` member of the union.
    let index = unsafe { req.ifr_ifru.ifru_ifindex };
    u32::try_from(index).map_err(|_| {
        IoError::syscall(
            "ioctl SIOCGIFINDEX",
            name,
            io::Error::new(io::ErrorKind::InvalidData, "negative ifindex"),
        )
    })
}

/// The MAC address of Ethernet interface `name` (loopback reports all zeros).
pub fn mac_address(name: &str) -> Result<[u8; 6], IoError> {
    let req = query(name, libc::SIOCGIFHWADDR, "ioctl SIOCGIFHWADDR")?;
    // SAFETY: SIOCGIFHWADDR filled the `ifru_hwaddr` member of the union.
    let hw = unsafe { req.ifr_ifru.ifru_hwaddr };
    if hw.sa_family != libc::ARPHRD_ETHER && hw.sa_family != libc::ARPHRD_LOOPBACK {
        return Err(IoError::NotEthernet {
            name: name.to_string(),
            hw_type: hw.sa_family,
        });
    }
    let mut mac = [0u8; 6];
    for (dst, src) in mac.iter_mut().zip(hw.sa_data.iter()) {
        *dst = *src as u8;
    }
    Ok(mac)
}

/// The MTU of interface `name` (L3 bytes, without the Ethernet header).
pub fn mtu(name: &str) -> Result<u32, IoError> {
    let req = query(name, libc::SIOCGIFMTU, "ioctl SIOCGIFMTU")?;
    // SAFETY: SIOCGIFMTU filled the `ifru_mtu` member of the union.
    let mtu = unsafe { req.ifr_ifru.ifru_mtu };
    u32::try_from(mtu).map_err(|_| {
        IoError::syscall(
            "ioctl SIOCGIFMTU",
            name,
            io::Error::new(io::ErrorKind::InvalidData, "negative MTU"),
        )
    })
}

/// Whether interface `name` is administratively up (IFF_UP).
pub fn is_up(name: &str) -> Result<bool, IoError> {
    let req = query(name, libc::SIOCGIFFLAGS, "ioctl SIOCGIFFLAGS")?;
    // SAFETY: SIOCGIFFLAGS filled the `ifru_flags` member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    Ok(i32::from(flags) & libc::IFF_UP != 0)
}

/// Bring interface `name` administratively up. A no-op if it already is.
pub fn set_up(name: &str) -> Result<(), IoError> {
    let (sock, mut req) = request(name, "socket for ioctl SIOCSIFFLAGS")?;
    ioctl(&sock, libc::SIOCGIFFLAGS, &mut req)
        .map_err(|e| IoError::syscall("ioctl SIOCGIFFLAGS", name, e))?;
    // SAFETY: SIOCGIFFLAGS filled the `ifru_flags` member; writing the same member back is
    // what SIOCSIFFLAGS reads.
    unsafe {
        if i32::from(req.ifr_ifru.ifru_flags) & libc::IFF_UP != 0 {
            return Ok(());
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
    }
    ioctl(&sock, libc::SIOCSIFFLAGS, &mut req)
        .map_err(|e| IoError::syscall("ioctl SIOCSIFFLAGS", name, e))
}

/// The name of the interface that holds address `ip`, or `None` if no interface does. For an
/// IPv6 link-local address with a scope id, only the interface with that index counts (several
/// interfaces may hold the same link-local address).
pub fn device_with_address(ip: IpAddr, scope_id: u32) -> Result<Option<String>, IoError> {
    // An IPv4 address written as v4-mapped IPv6 is held by an interface as plain IPv4.
    let ip = ip.to_canonical();
    let on = ip.to_string();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a pointer to a list it allocated into `list`; we free it below.
    sys::cvt(unsafe { libc::getifaddrs(&mut list) })
        .map_err(|e| IoError::syscall("getifaddrs", on, e))?;
    let mut found = None;
    let mut cur = list;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: a non-null ifa_addr points at a sockaddr whose family says which sockaddr_*
        // it is; we read the family first and only then the matching struct.
        let held = unsafe {
            match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let sin = &*ifa.ifa_addr.cast::<libc::sockaddr_in>();
                    IpAddr::from(sin.sin_addr.s_addr.to_ne_bytes())
                }
                libc::AF_INET6 => {
                    let sin6 = &*ifa.ifa_addr.cast::<libc::sockaddr_in6>();
                    if scope_id != 0 && sin6.sin6_scope_id != scope_id {
                        continue;
                    }
                    IpAddr::from(sin6.sin6_addr.s6_addr)
                }
                _ => continue,
            }
        };
        if held == ip {
            // SAFETY: ifa_name is a NUL-terminated string owned by the list, copied out here.
            let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
            found = Some(name.to_string_lossy().into_owned());
            break;
        }
    }
    // SAFETY: `list` came from getifaddrs and is freed once; nothing borrowed from it survives.
    unsafe { libc::freeifaddrs(list) };
    Ok(found)
}

/// `struct ethtool_channels` (linux/ethtool.h).
#[repr(C)]
#[derive(Default)]
struct EthtoolChannels {
    cmd: u32,
    max_rx: u32,
    max_tx: u32,
    max_other: u32,
    max_combined: u32,
    rx_count: u32,
    tx_count: u32,
    other_count: u32,
    combined_count: u32,
}

const ETHTOOL_GCHANNELS: u32 = 0x3c;
const SIOCETHTOOL: libc::Ioctl = 0x8946;

/// Receive queues of `name` in the calling thread's network namespace: what
/// `ethtool -l` calls RX plus combined channels. Read through the ethtool ioctl because sysfs
/// shows the namespace it was mounted in, not ours. A driver without channel support
/// (EOPNOTSUPP) has one queue as far as we can tell.
pub fn rx_queues(name: &str) -> Result<usize, IoError> {
    let (sock, mut req) = request(name, "ioctl SIOCETHTOOL ETHTOOL_GCHANNELS")?;
    let mut ch = EthtoolChannels {
        cmd: ETHTOOL_GCHANNELS,
        ..Default::default()
    };
    req.ifr_ifru.ifru_data = (&mut ch as *mut EthtoolChannels).cast();
    match ioctl(&sock, SIOCETHTOOL, &mut req) {
        Ok(()) => Ok((ch.rx_count + ch.combined_count).max(1) as usize),
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(1),
        Err(e) => Err(IoError::syscall(
            "ioctl SIOCETHTOOL ETHTOOL_GCHANNELS",
            name,
            e,
        )),
    }
}

/// `struct ethtool_drvinfo` (linux/ethtool.h).
#[repr(C)]
struct EthtoolDrvinfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    counts: [u32; 5],
}

const ETHTOOL_GDRVINFO: u32 = 0x3;

/// The kernel driver behind `name` ("veth", "virtio_net", "ixgbe", ...), as `ethtool -i` shows
/// it.
pub fn driver(name: &str) -> Result<String, IoError> {
    let (sock, mut req) = request(name, "ioctl SIOCETHTOOL ETHTOOL_GDRVINFO")?;
    let mut info = EthtoolDrvinfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        version: [0; 32],
        fw_version: [0; 32],
        bus_info: [0; 32],
        erom_version: [0; 32],
        reserved2: [0; 12],
        counts: [0; 5],
    };
    req.ifr_ifru.ifru_data = (&mut info as *mut EthtoolDrvinfo).cast();
    ioctl(&sock, SIOCETHTOOL, &mut req)
        .map_err(|e| IoError::syscall("ioctl SIOCETHTOOL ETHTOOL_GDRVINFO", name, e))?;
    let end = info.driver.iter().position(|b| *b == 0).unwrap_or(32);
    Ok(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

/// `struct ethtool_value` (linux/ethtool.h): a command and one value.
#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

const ETHTOOL_GTSO: u32 = 0x1e;

/// Whether TCP segmentation offload is on for `name` (`ethtool -k`'s
/// tcp-segmentation-offload). On a veth it says whether the kernel hands the device's frames
/// over as 64 KB super-packets: a veth pair is created with the same features on both ends, and
/// a Linux host leaves them on.
pub fn tso_enabled(name: &str) -> Result<bool, IoError> {
    let (sock, mut req) = request(name, "ioctl SIOCETHTOOL ETHTOOL_GTSO")?;
    let mut v = EthtoolValue {
        cmd: ETHTOOL_GTSO,
        data: 0,
    };
    req.ifr_ifru.ifru_data = (&mut v as *mut EthtoolValue).cast();
    match ioctl(&sock, SIOCETHTOOL, &mut req) {
        Ok(()) => Ok(v.data != 0),
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(false),
        Err(e) => Err(IoError::syscall("ioctl SIOCETHTOOL ETHTOOL_GTSO", name, e)),
    }
}

fn request(name: &str, call: &'static str) -> Result<(OwnedFd, libc::ifreq), IoError> {
    let ifr_name = sys::ifname_array(name)?;
    let sock = sys::socket(libc::AF_INET, libc::SOCK_DGRAM, 0)
        .map_err(|e| IoError::syscall(call, name, e))?;
    // SAFETY: ifreq is plain old data (a name and a union of integers and sockaddrs); all-zero
    // is valid.
    let mut req: libc::ifreq = unsafe { zeroed() };
    req.ifr_name = ifr_name;
    Ok((sock, req))
}

fn query(name: &str, op: libc::Ioctl, call: &'static str) -> Result<libc::ifreq, IoError> {
    let (sock, mut req) = request(name, call)?;
    ioctl(&sock, op, &mut req).map_err(|e| IoError::syscall(call, name, e))?;
    Ok(req)
}

fn ioctl(sock: &OwnedFd, op: libc::Ioctl, req: &mut libc::ifreq) -> io::Result<()> {
    // SAFETY: every SIOC[GS]IF* request we issue takes a `struct ifreq *`; `req` is a live,
    // exclusively borrowed ifreq with a NUL-terminated name (for SIOCETHTOOL, its data pointer
    // points at a live ethtool command struct of the size that command expects).
    sys::cvt(unsafe { libc::ioctl(sock.as_raw_fd(), op, req as *mut libc::ifreq) })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_found() {
        // Every namespace has `lo`; its index is 1 in a fresh namespace but may differ in the
        // root one, so only check it exists and has the loopback's all-zero MAC.
        assert!(ifindex("lo").unwrap() >= 1);
        assert_eq!(mac_address("lo").unwrap(), [0; 6]);
        assert!(mtu("lo").unwrap() >= 1280);
        assert_eq!(rx_queues("lo").unwrap(), 1);
    }

    #[test]
    fn loopback_address_is_found_on_lo() {
        // The namespace a test runs in may lack an IPv6 loopback; 127.0.0.1 is always on lo.
        let lo = device_with_address("127.0.0.1".parse().unwrap(), 0).unwrap();
        assert_eq!(lo.as_deref(), Some("lo"));
        let mapped = device_with_address("::ffff:127.0.0.1".parse().unwrap(), 0).unwrap();
        assert_eq!(mapped.as_deref(), Some("lo"));
        // 192.0.2.0/24 (TEST-NET-1) is on no interface here.
        assert_eq!(
            device_with_address("192.0.2.1".parse().unwrap(), 0).unwrap(),
            None
        );
    }

    #[test]
    fn missing_interface_names_call_and_interface() {
        let err = ifindex("dva-nosuch0").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("ioctl SIOCGIFINDEX on dva-nosuch0: "),
            "{msg}"
        );
        assert_eq!(err.raw_os_error(), Some(libc::ENODEV));
        assert!(mtu("dva-nosuch0")
            .unwrap_err()
            .to_string()
            .contains("SIOCGIFMTU"));
        assert!(set_up("dva-nosuch0").is_err());
    }

    #[test]
    fn bad_names_are_rejected_before_any_syscall() {
        assert!(matches!(ifindex(""), Err(IoError::InvalidIfName { .. })));
        assert!(matches!(
            mac_address("much-too-long-name"),
            Err(IoError::InvalidIfName { .. })
        ));
    }
}
