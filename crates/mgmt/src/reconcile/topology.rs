//! Where a reconciler pass may place units. A [`Topology`] gives the [`Hosts`] of the moment
//! (plain data that [`plan`](super::plan::plan) decides on) and does what only it can do (point
//! upstream routers at the dispatchers that serve). The agents' host registry and this machine
//! are topologies of this crate; the lab's (`dva lab up`) lives with the lab (`dva_lab`) and is
//! handed in by whoever opens the management tool ([`Mgmt::open_in`](crate::Mgmt::open_in)), so
//! the management tool does not depend on the lab.

use std::net::IpAddr;

use super::plan::{Host, Hosts, Place};
use crate::hosts::{HostState, Placeable, Registry};

pub trait Topology: Send {
    /// The hosts units may go on now; `None` when there are none to speak of (no lab).
    fn hosts(&mut self) -> Option<Hosts>;
    /// Spread upstream flows over these dispatcher hosts (1-based, in [`Hosts::dispatchers`]'
    /// order); only asked of hosts with [`Hosts::upstream`].
    fn set_upstream(&self, dispatchers: &[usize]) -> Result<(), String>;
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

/// No hosts at all: the management tool was opened for a lab it was not given, or before any
/// agent registered. Passes still run (records, deletes), placing nothing.
pub(crate) struct Nowhere;

impl Topology for Nowhere {
    fn hosts(&mut self) -> Option<Hosts> {
        None
    }

    fn set_upstream(&self, _: &[usize]) -> Result<(), String> {
        Err("there are no hosts".into())
    }
}
