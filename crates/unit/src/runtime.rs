//! Process entry for `dva unit`: enter the host's namespace, start the control socket, then
//! either run the manager, or connect to the manager and wait for a role config, set up the data
//! path from it, and apply later pushes until SIGTERM/SIGINT.
//!
//! A unit is generic until configured: a dispatcher or data plane owns no interface and binds no
//! backplane socket before its first config arrives (and is ACKed only once that worked).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use dva_proto::RoleConfig;

use crate::channel::{ChannelArgs, ChannelClient, Update};
use crate::control::ControlServer;
use crate::dataplane::Dataplane;
use crate::dispatcher::Dispatcher;
use crate::inspect::Requests;
use crate::lanes::Lane;
use crate::manager::{self, ManagerArgs};
use crate::stats::{StatsCell, UnitStats};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Manager,
    Dispatcher,
    Dataplane,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Manager => "manager",
            Role::Dispatcher => "dispatcher",
            Role::Dataplane => "dataplane",
        }
    }
}

#[derive(Debug, Clone)]
pub struct UnitArgs {
    pub role: Role,
    pub id: u32,
    /// Where managers may listen, `tcp://ADDR:PORT[,tcp://...]`: other roles connect there.
    pub manager: String,
    /// The manager's own channel address, `tcp://ADDR:PORT` (managers only).
    pub listen: Option<String>,
    /// The unit's certificate, key and the installation's CA (the manager channel's mTLS).
    pub tls: crate::tls::TlsFiles,
    /// Control socket path (`/ready`, `/stats`, `/metrics`).
    pub control: PathBuf,
    /// Network namespace (a lab host) to run in.
    pub netns: Option<String>,
    /// Exit when the parent that started us dies (for a foreground `dva run`).
    pub die_with_parent: bool,
}

/// The managers' leader-election lock, in the appliance's run directory.
pub const MANAGER_LOCK: &str = "manager.lock";

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
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    let ready = Arc::new(AtomicBool::new(false));
    let stats = StatsCell::new(UnitStats {
        unit: args.id,
        role: args.role.as_str().into(),
        ..Default::default()
    });
    // Inspection requests (flows, config, capture) go from the control thread to the data path
    // through this queue; the manager has no data path and drops its end (it answers "does not
    // serve").
    let (inspector, requests) = crate::inspect::channel();
    let _control = ControlServer::start(&args.control, stats.clone(), ready.clone(), inspector)
        .with_context(|| format!("control socket {}", args.control.display()))?;
    if args.role == Role::Manager {
        drop(requests);
        let listen = args
            .listen
            .as_deref()
            .context("a manager needs --listen tcp://ADDR:PORT")?;
        let listen = crate::tls::parse_endpoint(listen).context("--listen")?;
        // The election's lock sits in the appliance's run directory, beside the control socket.
        let lock = args
            .control
            .parent()
            .map(|d| d.join(MANAGER_LOCK))
            .context("the control socket has no directory")?;
        return manager::run(ManagerArgs {
            unit: args.id,
            listen,
            lock,
            tls: args.tls.clone(),
            stop,
            stats,
            ready,
        });
    }
    let managers = crate::tls::parse_endpoints(&args.manager).context("--manager")?;
    let (_client, updates) = ChannelClient::start(ChannelArgs {
        managers,
        tls: args.tls.clone(),
        unit: args.id,
        role: args.role.as_str(),
        stats: stats.clone(),
        stop: stop.clone(),
    })?;
    // Shared-memory rings between dispatchers and data planes on this machine live in the
    // appliance's run directory (tmpfs, removed with the appliance).
    let run_dir = args.control.parent();
    let serving = Serving {
        id: args.id,
        stop: &stop,
        stats: &stats,
        ready: &ready,
        updates: &updates,
        requests: &requests,
    };
    // Wait for a first config this unit can run; a bad one is NACKed and we keep waiting.
    while !stop.load(Ordering::Relaxed) {
        let Some(u) = next_update(&updates, &stop) else {
            break;
        };
        let version = u.config.version();
        // The spec's `runtime` is set up here, with the first config, and kept (later ones
        // that change it are refused: see RuntimeConfig).
        let runtime = u.config.runtime().clone();
        let rings = run_dir.filter(|_| runtime.rings);
        match (args.role, u.config) {
            (Role::Dispatcher, RoleConfig::Dispatcher(c)) if c.unit == args.id => {
                let opened = Dispatcher::open(c, rings);
                let role = "dispatcher";
                if let Some(done) = serving.serve(opened, role, version, u.reply, &runtime.cpus) {
                    return done;
                }
            }
            (Role::Dataplane, RoleConfig::Dataplane(c)) if c.unit == args.id => {
                let opened = Dataplane::open(c, rings);
                let role = "data plane";
                if let Some(done) = serving.serve(opened, role, version, u.reply, &runtime.cpus) {
                    return done;
                }
            }
            (role, cfg) => {
                let _ = u.reply.send(Err(format!(
                    "unit {} is a {}; got a config for {} {}",
                    args.id,
                    role.as_str(),
                    match cfg {
                        RoleConfig::Dispatcher(_) => "dispatcher",
                        RoleConfig::Dataplane(_) => "data plane",
                    },
                    cfg.unit()
                )));
            }
        }
    }
    Ok(())
}

fn next_update(updates: &Receiver<Update>, stop: &AtomicBool) -> Option<Update> {
    while !stop.load(Ordering::Relaxed) {
        match updates.recv_timeout(Duration::from_millis(100)) {
            Ok(u) => return Some(u),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return None,
        }
    }
    None
}

/// Pin the data path (this thread; the control and channel threads stay free) to unit `id`'s CPU
/// of `cpus` (the `id mod len`-th); an empty list pins nothing. Done once the role's data path
/// is set up, so a first config that fails leaves the thread as it was for the next one.
/// What serving a role's data path takes from the unit, besides its lanes.
struct Serving<'a> {
    id: u32,
    stop: &'a Arc<AtomicBool>,
    stats: &'a StatsCell,
    ready: &'a AtomicBool,
    updates: &'a Receiver<Update>,
    requests: &'a Requests,
}

impl Serving<'_> {
    /// Serve `opened`, the lanes a role opened from its first config (`version`, answered on
    /// `reply`), until the unit stops: one lane on this thread, pinned as the unit; several
    /// under [`crate::lanes`], lane i pinned as unit id + i would be (consecutive CPUs of the
    /// list). `None`: the config cannot be served here (NACKed with the reason); the unit waits
    /// for the next.
    fn serve<L: Lane>(
        &self,
        opened: anyhow::Result<Vec<L>>,
        role: &str,
        version: u64,
        reply: Sender<Result<(), String>>,
        cpus: &[usize],
    ) -> Option<anyhow::Result<()>> {
        let nack = |e: anyhow::Error| {
            let _ = reply.send(Err(format!("{e:#}")));
            None
        };
        let mut lanes = match opened {
            Ok(lanes) => lanes,
            Err(e) => return nack(e),
        };
        if lanes.len() == 1 {
            if let Err(e) = pin(self.id, cpus) {
                return nack(e);
            }
            let mut lane = lanes.pop()?;
            self.stats.try_publish(lane.snapshot());
            let _ = reply.send(Ok(()));
            self.ready.store(true, Ordering::Release);
            tracing::info!(version, "{role} serving its first config");
            return Some(lane.run(self.stop, self.stats, self.updates, self.requests));
        }
        let _ = reply.send(Ok(()));
        self.ready.store(true, Ordering::Release);
        tracing::info!(
            version,
            lanes = lanes.len(),
            "{role} serving its first config"
        );
        let (id, cpus) = (self.id, cpus.to_vec());
        let pin_lane = move |lane: usize| pin(id.wrapping_add(lane as u32), &cpus);
        Some(crate::lanes::run(
            lanes,
            self.stop,
            self.stats,
            self.updates,
            self.requests,
            pin_lane,
        ))
    }
}

fn pin(id: u32, cpus: &[usize]) -> anyhow::Result<()> {
    if cpus.is_empty() {
        return Ok(());
    }
    let cpu = cpus[id as usize % cpus.len()];
    pin_to(cpu).with_context(|| format!("pinning unit {id} to CPU {cpu} (spec.runtime.cpus)"))?;
    tracing::info!(cpu, "data path pinned");
    Ok(())
}

/// Pin the calling thread to `cpu`.
fn pin_to(cpu: usize) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain old data (a bit array); all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if cpu >= dva_proto::spec::MAX_CPUS {
        // The spec's parser bounds CPU numbers already; a config from elsewhere is refused here.
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    }
    // SAFETY: CPU_SET writes one bit inside `set`: cpu is below MAX_CPUS (1024), the size of
    // cpu_set_t in bits.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is the calling thread; `set` is a live cpu_set_t of the size we pass.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinning_to_a_cpu_this_process_may_use_works() {
        // CPU 0 always exists; the thread's affinity afterwards is exactly it.
        std::thread::spawn(|| {
            pin_to(0).expect("pin");
            // SAFETY: cpu_set_t is a bit array; all-zero is the empty set.
            let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
            // SAFETY: pid 0, a live cpu_set_t of the size we pass.
            let r = unsafe {
                libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set)
            };
            assert_eq!(r, 0);
            // SAFETY: CPU_ISSET reads bit 0 of a live, initialised cpu_set_t.
            assert!(unsafe { libc::CPU_ISSET(0, &set) });
            // SAFETY: CPU_COUNT reads a live, initialised cpu_set_t.
            assert_eq!(unsafe { libc::CPU_COUNT(&set) }, 1);
        })
        .join()
        .expect("thread");
    }
}
