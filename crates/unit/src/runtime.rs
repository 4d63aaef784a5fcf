//! Process entry for `dva unit`: enter the host's namespace, read the role config, set up the data
//! path, then mark ready on the control socket and run until SIGTERM/SIGINT.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use dva_proto::RoleConfig;

use crate::control::ControlServer;
use crate::dataplane::Dataplane;
use crate::dispatcher::Dispatcher;
use crate::stats::{StatsCell, UnitStats};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Dispatcher,
    Dataplane,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Dispatcher => "dispatcher",
            Role::Dataplane => "dataplane",
        }
    }
}

#[derive(Debug, Clone)]
pub struct UnitArgs {
    pub role: Role,
    /// JSON [`RoleConfig`].
    pub config: PathBuf,
    /// Control socket path.
    pub control: PathBuf,
    /// Network namespace (a lab host) to run in.
    pub netns: Option<String>,
    /// Exit when the parent that started us dies, so a killed `dva run` leaves no orphan units.
    pub die_with_parent: bool,
}

pub fn run_unit(args: &UnitArgs) -> anyhow::Result<()> {
    if args.die_with_parent {
        // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number and no pointers.
        unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
        }
    }
    // Enter the namespace before any other thread exists: setns changes only the calling thread,
    // and every thread started later inherits it.
    if let Some(ns) = &args.netns {
        dva_io::netns::enter(ns).with_context(|| format!("entering network namespace {ns}"))?;
    }
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading {}", args.config.display()))?;
    let cfg: RoleConfig = serde_json::from_str(&text).with_context(|| {
        format!(
            "config {} is not a valid role config",
            args.config.display()
        )
    })?;
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    let ready = Arc::new(AtomicBool::new(false));
    let initial = UnitStats {
        unit: cfg.unit(),
        config_version: cfg.version(),
        role: args.role.as_str().into(),
        ..Default::default()
    };
    let stats = StatsCell::new(initial);
    let _control = ControlServer::start(&args.control, stats.clone(), ready.clone())
        .with_context(|| format!("control socket {}", args.control.display()))?;
    match (args.role, cfg) {
        (Role::Dispatcher, RoleConfig::Dispatcher(c)) => {
            let mut d = Dispatcher::new(c)?;
            stats.try_publish(d.snapshot());
            ready.store(true, Ordering::Release);
            d.run(&stop, &stats)
        }
        (Role::Dataplane, RoleConfig::Dataplane(c)) => {
            let mut d = Dataplane::new(c)?;
            stats.try_publish(d.snapshot());
            ready.store(true, Ordering::Release);
            d.run(&stop, &stats)
        }
        (role, cfg) => anyhow::bail!(
            "started as {} but the config is for a {}",
            role.as_str(),
            match cfg {
                RoleConfig::Dispatcher(_) => "dispatcher",
                RoleConfig::Dataplane(_) => "dataplane",
            }
        ),
    }
}
