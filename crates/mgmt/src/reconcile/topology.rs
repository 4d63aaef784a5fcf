//! Where a reconciler pass may place units. A [`Topology`] gives the [`Hosts`] of the moment
//! (plain data that [`plan`](super::plan::plan) decides on) and does what only it can do (point
//! a lab's upstream routers at the dispatchers that serve). This is the one place the reconciler
//! names the lab: the agents' host registry and this machine are topologies too.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use dva_lab::Lab;

use super::plan::{Host, Hosts, Place};
use crate::hosts::{HostState, Placeable, Registry};

/// How often the lab's shape is read again (it runs `ip netns list`).
const LAB_EVERY: Duration = Duration::from_secs(2);

pub(crate) trait Topology {
    /// The hosts units may go on now; `None` when there are none to speak of (no lab).
    fn hosts(&mut self) -> Option<Hosts>;
    /// Spread upstream flows over these dispatcher hosts (1-based, in [`Hosts::dispatchers`]'
    /// order); only asked of hosts with [`Hosts::upstream`].
    fn set_upstream(&self, dispatchers: &[usize]) -> Result<(), String>;
}

/// A lab's hosts (`dva lab up`): dispatchers on its dispatcher hosts, managers and data planes on
/// its appliance hosts, each in its network namespace.
pub(crate) struct LabHosts {
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

/// The hosts of registered agents: dispatchers on those labelled `dispatcher=true`, data planes
/// and managers on the others (on all when every host is labelled). Only ready hosts take new
/// units; a lost one is left out of everything.
pub(crate) struct AgentHosts<'a>(pub &'a Registry);

impl Topology for AgentHosts<'_> {
    fn hosts(&mut self) -> Option<Hosts> {
        let all = self.0.placeable();
        let host = |p: &Placeable| Host {
            name: p.record.name.clone(),
            backplane: p.record.backplane,
            netns: None,
            cpus: p.record.cpus.max(1),
            running: p.appliances.clone(),
            labels: p.record.labels.clone(),
        };
        let unlabelled = all.iter().any(|p| !p.record.is_dispatcher());
        let dp_kind = |p: &Placeable| !unlabelled || !p.record.is_dispatcher();
        Some(Hosts {
            dispatchers: all
                .iter()
                .filter(|p| p.state == HostState::Ready && p.record.is_dispatcher())
                .map(host)
                .collect(),
            dataplanes: all
                .iter()
                .filter(|p| p.state == HostState::Ready && dp_kind(p))
                .map(host)
                .collect(),
            managers: all.iter().filter(|p| dp_kind(p)).map(host).collect(),
            place: Place::Agents,
            upstream: false,
        })
    }

    fn set_upstream(&self, _: &[usize]) -> Result<(), String> {
        Err("the registered hosts have no upstream routers to set".into())
    }
}

/// This machine: units in our own network namespace (where the spec's devices are), the
/// backplane on loopback (dispatchers and data planes exchange packets through rings; data
/// planes reach each other over UDP on loopback).
pub(crate) struct ThisMachine;

impl Topology for ThisMachine {
    fn hosts(&mut self) -> Option<Hosts> {
        let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".to_string());
        let host = Host {
            name,
            backplane: IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            netns: None,
            cpus: 1,
            running: Vec::new(),
            labels: Default::default(),
        };
        Some(Hosts {
            dispatchers: vec![host.clone()],
            managers: vec![host.clone()],
            dataplanes: vec![host],
            place: Place::ThisMachine,
            upstream: false,
        })
    }

    fn set_upstream(&self, _: &[usize]) -> Result<(), String> {
        Err("this machine has no upstream routers to set".into())
    }
}
