//! Where a packet leaves the appliance: the connected subnets of its interfaces and static routes,
//! longest prefix first.

use std::net::IpAddr;

use dva_proto::{InterfaceConfig, RouteConfig};
use ipnet::IpNet;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NextHop {
    pub interface: u8,
    /// The neighbour to send to: the destination itself on a connected subnet, else the route's gateway.
    pub addr: IpAddr,
}

#[derive(Debug, Clone)]
struct Entry {
    net: IpNet,
    interface: u8,
    via: Option<IpAddr>,
}

#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    /// Sorted by prefix length, longest first, so the first match wins.
    entries: Vec<Entry>,
}

impl RouteTable {
    pub fn new(interfaces: &[InterfaceConfig], routes: &[RouteConfig]) -> Self {
        let mut entries: Vec<Entry> = interfaces
            .iter()
            .flat_map(|i| {
                i.addresses.iter().map(move |a| Entry {
                    net: a.trunc(),
                    interface: i.id,
                    via: None,
                })
            })
            .chain(routes.iter().map(|r| Entry {
                net: r.to,
                interface: r.interface,
                via: Some(r.via),
            }))
            .collect();
        entries.sort_by_key(|e| std::cmp::Reverse(e.net.prefix_len()));
        RouteTable { entries }
    }

    /// A linear scan: appliances have a handful of routes. A trie replaces it when that stops being true.
    #[inline]
    pub fn lookup(&self, dst: IpAddr) -> Option<NextHop> {
        self.entries
            .iter()
            .find(|e| e.net.contains(&dst))
            .map(|e| NextHop {
                interface: e.interface,
                addr: e.via.unwrap_or(dst),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connected_then_static_longest_first() {
        let ifs = vec![
            InterfaceConfig {
                id: 0,
                name: "outside".into(),
                device: "out0".into(),
                addresses: vec!["198.18.1.1/24".parse().unwrap()],
            },
            InterfaceConfig {
                id: 1,
                name: "inside".into(),
                device: "in0".into(),
                addresses: vec!["198.18.2.1/24".parse().unwrap()],
            },
        ];
        let routes = vec![RouteConfig {
            to: "0.0.0.0/0".parse().unwrap(),
            via: "198.18.1.254".parse().unwrap(),
            interface: 0,
        }];
        let t = RouteTable::new(&ifs, &routes);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            t.lookup(ip("198.18.2.7")),
            Some(NextHop {
                interface: 1,
                addr: ip("198.18.2.7")
            })
        );
        assert_eq!(
            t.lookup(ip("203.0.113.1")),
            Some(NextHop {
                interface: 0,
                addr: ip("198.18.1.254")
            })
        );
        assert_eq!(RouteTable::new(&ifs, &[]).lookup(ip("203.0.113.1")), None);
    }
}
