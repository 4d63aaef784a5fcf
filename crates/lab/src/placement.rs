//! The lab as a place for units: [`LabHosts`] is the management tool's
//! [`Topology`](dva_mgmt::Topology) for a lab's hosts, handed to
//! [`Mgmt::open_in`](dva_mgmt::Mgmt::open_in) by `dva run`, `dva serve`, the demo, the benches and
//! the tests. It lives here, beside the lab, so the management tool knows nothing of labs.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use dva_mgmt::{Host, Hosts, Place, Topology};

use crate::Lab;

/// How often the lab's shape is read again (it runs `ip netns list`).
const LAB_EVERY: Duration = Duration::from_secs(2);

/// A lab's hosts (`dva lab up`): dispatchers on its dispatcher hosts, managers and data planes on
/// its appliance hosts, each in its network namespace.
pub struct LabHosts {
    prefix: String,
    lab: Option<Lab>,
    read_at: Option<Instant>,
}

impl LabHosts {
    pub fn new(prefix: &str) -> LabHosts {
        LabHosts {
            prefix: prefix.to_string(),
            lab: None,
            read_at: None,
        }
    }
}

impl Topology for LabHosts {
    fn hosts(&mut self) -> Option<Hosts> {
        // A missing lab is looked for every pass: it may come up any time.
        if self.lab.is_none() || self.read_at.is_none_or(|t| t.elapsed() >= LAB_EVERY) {
            self.lab = Lab::discover(&self.prefix).ok().flatten();
            self.read_at = Some(Instant::now());
        }
        let lab = self.lab.as_ref()?;
        // A lab host is a namespace, named after it.
        let host = |ns: String, addr| Host {
            name: ns.clone(),
            backplane: IpAddr::V4(addr),
            netns: Some(ns),
            cpus: 1,
            running: Vec::new(),
            labels: Default::default(),
        };
        let dispatchers = (1..=lab.dispatchers.max(1))
            .map(|d| host(lab.dispatcher_ns(d), Lab::dispatcher_backplane_addr(d)))
            .collect();
        let dataplanes: Vec<Host> = (1..=lab.hosts.max(1))
            .map(|m| host(lab.host_ns(m), Lab::host_backplane_addr(m)))
            .collect();
        Some(Hosts {
            dispatchers,
            managers: dataplanes.clone(),
            dataplanes,
            place: Place::Lab {
                prefix: lab.prefix.clone(),
            },
            upstream: lab.dispatchers > 1,
        })
    }

    fn set_upstream(&self, dispatchers: &[usize]) -> Result<(), String> {
        match &self.lab {
            Some(lab) => lab.set_ecmp(dispatchers).map_err(|e| e.to_string()),
            None => Err(format!("no lab with prefix {:?}", self.prefix)),
        }
    }
}
