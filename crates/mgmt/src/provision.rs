//! Provisioners start and stop compute units on hosts. `local` starts them as processes of this
//! machine, each inside its host's network namespace (in the lab, a host is a namespace); a cloud
//! provisioner would start VMs or containers behind the same trait.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;

use anyhow::Context;

use crate::model::UnitRole;

/// Everything needed to start one unit.
#[derive(Debug, Clone)]
pub struct UnitLaunch {
    pub appliance: String,
    pub id: u32,
    pub role: UnitRole,
    /// Host to place it on (for `local`: a network namespace name).
    pub host: String,
    /// The manager's channel socket (the manager listens on it; other roles connect to it).
    pub manager: PathBuf,
    /// The unit's control socket.
    pub control: PathBuf,
    pub log: PathBuf,
}

pub trait Provisioner: Send + Sync {
    /// Start the unit; returns its pid.
    fn start(&self, unit: &UnitLaunch) -> anyhow::Result<u32>;
    /// Ask it to stop (SIGTERM: it finishes its current batch and exits).
    fn stop(&self, pid: u32);
    /// Stop it now.
    fn kill(&self, pid: u32);
    /// Whether the process is still this unit (not dead, not a zombie, not a reused pid).
    fn alive(&self, pid: u32, unit: &UnitLaunch) -> bool;
}

pub struct LocalProvisioner {
    exe: PathBuf,
    /// Units we started ourselves, so their exit status is collected (no zombies). Units adopted
    /// after a restart of the management tool are not our children and are probed through /proc.
    children: Mutex<HashMap<u32, Child>>,
}

impl LocalProvisioner {
    pub fn new(exe: PathBuf) -> LocalProvisioner {
        LocalProvisioner {
            exe,
            children: Mutex::new(HashMap::new()),
        }
    }
}

impl Provisioner for LocalProvisioner {
    fn start(&self, u: &UnitLaunch) -> anyhow::Result<u32> {
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
        let mut cmd = Command::new(&self.exe);
        cmd.arg("unit")
            .args(["--role", u.role.as_str()])
            .args(["--id", &u.id.to_string()])
            .arg("--manager")
            .arg(&u.manager)
            .arg("--control")
            .arg(&u.control)
            .args(["--netns", &u.host])
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
        if let Ok(mut c) = self.children.lock() {
            c.insert(pid, child);
        }
        Ok(pid)
    }

    fn stop(&self, pid: u32) {
        signal(pid, libc::SIGTERM);
    }

    fn kill(&self, pid: u32) {
        signal(pid, libc::SIGKILL);
    }

    fn alive(&self, pid: u32, u: &UnitLaunch) -> bool {
        if let Ok(mut c) = self.children.lock() {
            if let Some(child) = c.get_mut(&pid) {
                return match child.try_wait() {
                    Ok(None) => true,
                    _ => {
                        c.remove(&pid);
                        false
                    }
                };
            }
        }
        // Not our child: it must exist, not be a zombie, and be this very unit.
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return false;
        };
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next());
        if matches!(state, Some("Z") | Some("X") | None) {
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
        has("--id", u.id.to_string().as_bytes())
            && has("--control", u.control.as_os_str().as_encoded_bytes())
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    if pid == 0 || pid > i32::MAX as u32 {
        return;
    }
    // SAFETY: kill(2) with a positive pid and a valid signal number.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}
