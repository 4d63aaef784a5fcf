//! Provisioners start and stop compute units on hosts. `local` starts them as processes of this
//! machine, each inside its host's network namespace (in the lab, a host is a namespace); a cloud
//! provisioner would start VMs or containers behind the same trait.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;

use anyhow::Context;

use crate::model::UnitRole;
use crate::pki::{self, Issued};

/// Everything needed to start one unit.
#[derive(Debug, Clone)]
pub struct UnitLaunch {
    pub appliance: String,
    pub id: u32,
    pub role: UnitRole,
    /// Host to place it on (its name, as `dva get` shows it).
    pub host: String,
    /// The network namespace to start it in (a lab host); `None`: the provisioner's own.
    pub netns: Option<String>,
    /// Where the appliance's managers may listen (`tcp://ADDR:PORT,...`): other roles connect
    /// to the one that leads.
    pub managers: String,
    /// A manager's own channel address (`tcp://ADDR:PORT`).
    pub listen: Option<String>,
    /// The unit's private directory: its certificate, key and the CA go there (0700/0600).
    pub tls_dir: PathBuf,
    /// The credentials to hand over at start (issued only when the unit is about to start).
    pub credentials: Option<Issued>,
    /// The unit's control socket.
    pub control: PathBuf,
    pub log: PathBuf,
}

/// One process, as the store remembers it: the pid and the process's start time (clock ticks
/// after boot, field 22 of `/proc/PID/stat`). A pid alone may name another process once the unit
/// has exited (pids are reused); the pair does not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnitProcess {
    pub pid: u32,
    /// `None` for records written before start times were kept: then only the command line
    /// identifies the unit.
    pub start: Option<u64>,
}

pub trait Provisioner: Send + Sync {
    /// Start the unit; returns its process.
    fn start(&self, unit: &UnitLaunch) -> anyhow::Result<UnitProcess>;
    /// Ask it to stop (SIGTERM: it finishes its current batch and exits). Does nothing when the
    /// process is no longer this unit.
    fn stop(&self, p: UnitProcess, unit: &UnitLaunch);
    /// Stop it now (same check).
    fn kill(&self, p: UnitProcess, unit: &UnitLaunch);
    /// Whether the process is still this unit (not dead, not a zombie, not a reused pid).
    fn alive(&self, p: UnitProcess, unit: &UnitLaunch) -> bool;
    /// The running processes that are this unit, oldest first: how a restarted management tool
    /// finds a unit it started but had not yet recorded the pid of.
    fn find(&self, unit: &UnitLaunch) -> Vec<UnitProcess>;
    /// `GET path` on the unit's control socket: on this machine the socket itself; on an agent's
    /// host the agent relays it (the socket is a file of that machine).
    fn control_get(
        &self,
        unit: &UnitLaunch,
        path: &str,
        timeout: std::time::Duration,
    ) -> std::io::Result<(u16, String)> {
        dva_unit::control::get(&unit.control, path, timeout)
    }
}

/// A child we started, with a pidfd on it: signals through the pidfd reach this very process
/// or nothing, whatever became of its pid.
struct Started {
    child: Child,
    pidfd: Option<OwnedFd>,
}

pub struct LocalProvisioner {
    exe: PathBuf,
    /// Units we started ourselves, so their exit status is collected (no zombies). Units adopted
    /// after a restart of the management tool are not our children and are probed through /proc.
    children: Mutex<HashMap<u32, Started>>,
    /// Exit codes of children reaped (`-signal` when killed by one), for the agent's status.
    exits: Mutex<HashMap<u32, i32>>,
}

impl LocalProvisioner {
    pub fn new(exe: PathBuf) -> LocalProvisioner {
        LocalProvisioner {
            exe,
            children: Mutex::new(HashMap::new()),
            exits: Mutex::new(HashMap::new()),
        }
    }

    /// How a child of ours that exited ended: its exit code, or minus the signal that ended it.
    pub fn exit_code(&self, pid: u32) -> Option<i32> {
        self.exits.lock().ok()?.get(&pid).copied()
    }

    /// Signal the unit's process, and only it.
    fn signal(&self, p: UnitProcess, u: &UnitLaunch, sig: libc::c_int) {
        if let Ok(mut c) = self.children.lock() {
            if let Some(started) = c.get_mut(&p.pid) {
                // Not reaped yet (we reap only in `alive`, which then forgets it), so the pid is
                // still this child's even without a pidfd.
                match &started.pidfd {
                    Some(fd) => pidfd_send_signal(fd, sig),
                    None => kill(p.pid, sig),
                }
                return;
            }
        }
        // Not our child. Open a pidfd first, then check the process is the unit: if the pid was
        // reused between the two, the pidfd names the old (gone) process and the signal goes
        // nowhere, so what was checked is what gets signalled.
        match pidfd_open(p.pid) {
            Some(fd) => {
                if is_unit(p.pid, p.start, u) {
                    pidfd_send_signal(&fd, sig);
                }
            }
            // No pidfds (kernel before 5.3) or the process is gone: check, then signal by pid.
            None => {
                if is_unit(p.pid, p.start, u) {
                    kill(p.pid, sig);
                }
            }
        }
    }
}

impl Provisioner for LocalProvisioner {
    fn start(&self, u: &UnitLaunch) -> anyhow::Result<UnitProcess> {
        // The run directory and the log are for root and our user only (the log may quote
        // traffic and configs).
        if let Some(dir) = u.log.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&u.log)
            .with_context(|| format!("opening {}", u.log.display()))?;
        // A log kept from an earlier run keeps its mode through open(): tighten it.
        log.set_permissions(std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("restricting {}", u.log.display()))?;
        // The unit's credentials go into its own directory, passed by path: an agent on another
        // machine hands them over the same way.
        let issued = u
            .credentials
            .as_ref()
            .with_context(|| format!("unit {} has no credentials to start with", u.id))?;
        let tls = pki::write_unit_files(&u.tls_dir, issued)?;
        let mut cmd = Command::new(&self.exe);
        cmd.arg("unit")
            .args(["--role", u.role.as_str()])
            .args(["--id", &u.id.to_string()])
            .args(["--manager", &u.managers])
            .args(u.listen.iter().flat_map(|l| ["--listen", l.as_str()]))
            .arg("--tls-cert")
            .arg(&tls.cert)
            .arg("--tls-key")
            .arg(&tls.key)
            .arg("--tls-ca")
            .arg(&tls.ca)
            .arg("--control")
            .arg(&u.control)
            .args(u.netns.iter().flat_map(|ns| ["--netns", ns.as_str()]))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own process group: a Ctrl-C meant for `dva serve` must not stop the appliance,
            // and a restarted `dva serve` adopts the units that kept running.
            .process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {} unit {} on {}", u.role.as_str(), u.id, u.host))?;
        let pid = child.id();
        // The child is not reaped yet, so this pid is certainly it.
        let pidfd = pidfd_open(pid);
        let start = start_time(pid);
        if let Ok(mut c) = self.children.lock() {
            c.insert(pid, Started { child, pidfd });
        }
        Ok(UnitProcess { pid, start })
    }

    fn stop(&self, p: UnitProcess, u: &UnitLaunch) {
        self.signal(p, u, libc::SIGTERM);
    }

    fn kill(&self, p: UnitProcess, u: &UnitLaunch) {
        self.signal(p, u, libc::SIGKILL);
    }

    fn alive(&self, p: UnitProcess, u: &UnitLaunch) -> bool {
        if let Ok(mut c) = self.children.lock() {
            if let Some(started) = c.get_mut(&p.pid) {
                return match started.child.try_wait() {
                    Ok(None) => true,
                    Ok(Some(status)) => {
                        use std::os::unix::process::ExitStatusExt;
                        let code = status.code().or(status.signal().map(|s| -s));
                        if let (Some(code), Ok(mut e)) = (code, self.exits.lock()) {
                            e.insert(p.pid, code);
                        }
                        c.remove(&p.pid);
                        false
                    }
                    Err(_) => {
                        c.remove(&p.pid);
                        false
                    }
                };
            }
        }
        is_unit(p.pid, p.start, u)
    }

    fn find(&self, u: &UnitLaunch) -> Vec<UnitProcess> {
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        let mut found: Vec<UnitProcess> = dir
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|&pid| is_unit(pid, None, u))
            .map(|pid| UnitProcess {
                pid,
                start: start_time(pid),
            })
            .collect();
        found.sort_by_key(|p| (p.start.unwrap_or(u64::MAX), p.pid));
        found
    }
}

/// Fields of `/proc/PID/stat` after the command name (which may hold spaces and parentheses, so
/// the split is at the last `)`): index 0 is field 3 (the state).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// The process's start time in clock ticks after boot (field 22 of `/proc/PID/stat`).
pub fn start_time(pid: u32) -> Option<u64> {
    stat_fields(pid)?.get(22 - 3)?.parse().ok()
}

/// Whether `pid` is a live (not zombie) process running this unit's command line
/// (`dva unit ... --id N ... --control <its socket>`, the socket path naming the appliance), and,
/// when a start time is known, the very process that was started then.
fn is_unit(pid: u32, start: Option<u64>, u: &UnitLaunch) -> bool {
    if pid == 0 || pid > i32::MAX as u32 {
        return false;
    }
    let Some(fields) = stat_fields(pid) else {
        return false;
    };
    if matches!(
        fields.first().map(String::as_str),
        Some("Z") | Some("X") | None
    ) {
        return false;
    }
    if start.is_some() && fields.get(22 - 3).and_then(|s| s.parse().ok()) != start {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let has = |flag: &str, value: &[u8]| {
        args.windows(2)
            .any(|w| w[0] == flag.as_bytes() && w[1] == value)
    };
    args.contains(&&b"unit"[..])
        && has("--id", u.id.to_string().as_bytes())
        && has("--control", u.control.as_os_str().as_encoded_bytes())
}

fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    if pid == 0 || pid > i32::MAX as u32 {
        return None;
    }
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new fd or -1; nothing is borrowed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0 as libc::c_uint) };
    if fd < 0 {
        return None;
    }
    // SAFETY: the kernel just returned this fd to us and nothing else owns it.
    Some(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn pidfd_send_signal(fd: &OwnedFd, sig: libc::c_int) {
    // SAFETY: pidfd_send_signal(2) on an fd we own, a valid signal, no siginfo, no flags.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0 as libc::c_uint,
        );
    }
}

fn kill(pid: u32, sig: libc::c_int) {
    if pid == 0 || pid > i32::MAX as u32 {
        return;
    }
    // SAFETY: kill(2) with a positive pid and a valid signal number.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}
