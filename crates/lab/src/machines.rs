//! A lab of machines (`dva lab up --machines`): every appliance host of the lab becomes a machine
//! of its own, as in a real installation, and the lab's links are all they share.
//!
//! * The control host `{P}ctl` (198.19.0.10 on the backplane) runs `dva serve --local` with its
//!   API on [`SERVE_PORT`]; each dispatcher host (labelled `dispatcher=true`) and each data-plane
//!   host runs `dva agent`, its API on [`AGENT_PORT`] of its backplane address, joined with a
//!   one-time token from `dva join-token`. The management tool places units through the agents.
//! * Each of those processes runs in a mount namespace of its own with tmpfs over
//!   [`PRIVATE_DIRS`] (`/run/dva`, `/var/lib/dva`, `/etc/dva`): what it and its units write there
//!   (state, certificates, sockets, unit logs) stays on that host and vanishes with its last
//!   process. Nothing passes between hosts but what crosses the lab's links.
//! * The processes outlive `dva lab up` (their own session, stdin from /dev/null). Their output
//!   goes to `/run/dva-lab/{P}/{namespace}.log` on this machine's own filesystem (dir 0700,
//!   files 0600), where the user reads it; `dva serve` writes its client file there too
//!   (`client.json`: server URL and API token), which the CLI reads through
//!   `DVA_CLIENT_CONFIG`. `dva lab down` kills them all and removes that directory.
//! * With etcd ([`Machines::with_etcd`], `dva lab up --machines --etcd`), the control host also
//!   runs three etcd members on its loopback ([`ETCD_PORTS`]; plain HTTP, which nothing outside
//!   that host can reach, so the lab spares itself etcd's certificates) and a second `dva serve`
//!   replica on port [`SERVE_PORT`] + 1; both keep their records there and one leads.
//! * The API is served over TLS (`--tls-auto`): the agents join and are called over the
//!   backplane as between real machines, never in clear.
//!
//! The join tokens and the installation's CA (`ca.pem` in that directory) go from the control
//! host to the agents the way an operator carries them: on the agent's command line and in a
//! file. The tokens are one-time, valid for an hour, and used at once.

use std::fs::OpenOptions;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::cmd::{self, show};
use crate::topology::{self, Tools};
use crate::{Lab, LabError};

/// `dva serve`'s API port on the control host.
pub const SERVE_PORT: u16 = 17080;
/// Each agent's API port, on its host's backplane address.
pub const AGENT_PORT: u16 = 17070;
/// Where each machines lab keeps its logs and client file on this machine's own filesystem.
pub const RUN_ROOT: &str = "/run/dva-lab";
/// What each machine has of its own: a tmpfs over each, in its own mount namespace.
pub const PRIVATE_DIRS: [&str; 3] = ["/run/dva", "/var/lib/dva", "/etc/dva"];
/// `dva serve`'s state on the control host's private filesystem.
const SERVE_STATE: &str = "/var/lib/dva/serve";
/// Each agent's state on its host's private filesystem.
const AGENT_STATE: &str = "/var/lib/dva/agent";
/// How long a host's agent may be silent before its units are replaced elsewhere: short, so that
/// `dva lab cut` shows a machine's loss within seconds.
pub const HOST_LOST_AFTER: &str = "5s";
/// How long `dva serve` may take to listen (and write its client file).
const SERVE_TIMEOUT: Duration = Duration::from_secs(15);
/// How long every agent may take to join and be polled `ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Client ports of the control host's etcd members with `--etcd` (peer ports: these + 10).
pub const ETCD_PORTS: [u16; 3] = [23791, 23792, 23793];
/// One CLI call against the management tool.
const CLI_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(100);
/// Lines of a log quoted in an error.
const LOG_TAIL: usize = 30;

/// The machines of a lab built with a control host: where their files are, and the CLI against
/// their management tool.
#[derive(Debug, Clone)]
pub struct Machines {
    lab: Lab,
    dva: PathBuf,
    etcd: bool,
}

/// A process `dva lab up --machines` started: what it is, its host, the name of its log.
struct Started {
    what: &'static str,
    ns: String,
    log: String,
    child: Child,
}

/// An agent's host: its namespace, backplane address and labels.
struct AgentHost {
    ns: String,
    addr: std::net::Ipv4Addr,
    dispatcher: bool,
}

impl Machines {
    /// The machines of `lab` (which must have its control host), driven with the `dva` binary
    /// at `dva`. Starts nothing: see [`Machines::up`].
    pub fn new(lab: &Lab, dva: &Path) -> Result<Machines, LabError> {
        if !lab.control {
            return Err(LabError::NoControlHost {
                prefix: lab.prefix.clone(),
            });
        }
        Ok(Machines {
            lab: lab.clone(),
            dva: dva.to_path_buf(),
            etcd: false,
        })
    }

    /// With `on`, the control host also runs a 3-member etcd cluster (plain HTTP on its
    /// loopback: nothing else reaches it) and two `dva serve` replicas on it.
    pub fn with_etcd(mut self, on: bool) -> Machines {
        self.etcd = on;
        self
    }

    /// `/run/dva-lab/{P}`: logs and the client file.
    pub fn dir(&self) -> PathBuf {
        dir(&self.lab.prefix)
    }

    /// The client file `dva serve` writes (server URL and API token), for `DVA_CLIENT_CONFIG`.
    pub fn client_config(&self) -> PathBuf {
        self.dir().join("client.json")
    }

    /// The log `name`: a host's namespace for its agent or, on the control host, for `dva
    /// serve` (its second replica's is `{P}ctl-serve2`, etcd member N's `{P}ctl-etcdN`).
    pub fn log(&self, name: &str) -> PathBuf {
        self.dir().join(format!("{name}.log"))
    }

    /// Where the management API listens (reachable from the lab's backplane only), over TLS
    /// with a certificate of the installation's CA (in the client file).
    pub fn api_url() -> String {
        format!("https://{}:{SERVE_PORT}", Lab::ctl_backplane_addr())
    }

    /// The hosts that run an agent: the dispatcher hosts, then the data-plane hosts.
    pub fn agent_hosts(&self) -> Vec<String> {
        self.agents().into_iter().map(|a| a.ns).collect()
    }

    fn agents(&self) -> Vec<AgentHost> {
        let lab = &self.lab;
        let disps = (1..=lab.dispatchers).map(|d| AgentHost {
            ns: lab.dispatcher_ns(d),
            addr: Lab::dispatcher_backplane_addr(d),
            dispatcher: true,
        });
        let hosts = (1..=lab.hosts).map(|m| AgentHost {
            ns: lab.host_ns(m),
            addr: Lab::host_backplane_addr(m),
            dispatcher: false,
        });
        disps.chain(hosts).collect()
    }

    /// Whether machines were started for this lab (their directory exists).
    pub fn started(&self) -> bool {
        self.dir().is_dir()
    }

    /// `dva ARGS` on the control host against its management tool, found through the client
    /// file: the way the user runs the CLI there.
    pub fn ctl_command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(cmd::ip_program());
        c.args(["netns", "exec", &self.lab.ctl_ns()])
            .arg(&self.dva)
            .args(args)
            .env("DVA_CLIENT_CONFIG", self.client_config());
        // They would win over the client file and point the CLI at another server.
        for var in ["DVA_SERVER", "DVA_TOKEN", "DVA_CA_FILE"] {
            c.env_remove(var);
        }
        c
    }

    /// (name, state) of every host `dva get hosts` lists.
    pub fn hosts(&self) -> Result<Vec<(String, String)>, LabError> {
        let mut c = self.ctl_command(&["get", "hosts", "-o", "json"]);
        let out = cmd::run_within(&mut c, CLI_TIMEOUT)?;
        let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| LabError::BadOutput {
            command: show(&c),
            reason: format!("not JSON: {e}"),
        })?;
        let Some(hosts) = v.as_array() else {
            return Err(LabError::BadOutput {
                command: show(&c),
                reason: "not a JSON array of hosts".into(),
            });
        };
        Ok(hosts
            .iter()
            .map(|h| {
                let field = |k: &str| h.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                (field("name"), field("state"))
            })
            .collect())
    }

    /// Whether every agent's host is registered and `ready`.
    fn all_ready(&self) -> Result<bool, LabError> {
        let hosts = self.hosts()?;
        Ok(self.agent_hosts().iter().all(|ns| {
            hosts
                .iter()
                .any(|(name, state)| name == ns && state == "ready")
        }))
    }

    /// Start the management tool and the agents, and wait until every agent's host is `ready`.
    /// Machines that already run with every host ready are left as they are; otherwise every
    /// process in the lab is killed and they start afresh (a half-started set of machines has
    /// no state worth keeping). On failure, the processes started are killed and the error
    /// quotes their logs (the files stay until `dva lab down`).
    pub fn up(lab: &Lab, dva: &Path, etcd: bool) -> Result<Machines, LabError> {
        let m = Machines::new(lab, dva)?.with_etcd(etcd);
        // Checked before anything starts, so a missing package fails fast.
        for tool in ["setsid", "unshare", "mount", "sh", "curl"] {
            cmd::tool(tool)?;
        }
        if etcd {
            cmd::tool("etcd")?;
        }
        if m.started() && matches!(m.all_ready(), Ok(true)) {
            return Ok(m);
        }
        let tools = Tools::find()?;
        let names = lab.namespaces();
        topology::stop_processes(&tools, &names)?;
        remove_dir(&lab.prefix)?;
        let started = m.start();
        if started.is_err() {
            let _ = topology::stop_processes(&tools, &names);
        }
        started.map(|()| m)
    }

    fn start(&self) -> Result<(), LabError> {
        let root = PathBuf::from(RUN_ROOT);
        for d in [&root, &self.dir()] {
            // 0700: the client file holds the API token.
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(d)
                .map_err(|source| LabError::Io {
                    path: d.clone(),
                    source,
                })?;
        }
        // The tmpfs mounts need mountpoints; where this machine lacks them they are made (empty,
        // 0700) and left: another lab may be using them in its own mount namespaces.
        for d in PRIVATE_DIRS {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(d)
                .map_err(|source| LabError::Io {
                    path: d.into(),
                    source,
                })?;
        }

        let ctl = self.lab.ctl_ns();
        let mut procs = Vec::new();
        let store = if self.etcd {
            Some(self.start_etcd(&mut procs)?)
        } else {
            None
        };
        let serve = |port: u16| {
            let mut args = vec![
                "serve".to_string(),
                "--local".into(),
                "--state".into(),
                SERVE_STATE.into(),
                "--listen".into(),
                format!("{}:{port}", Lab::ctl_backplane_addr()),
                "--host-lost-after".into(),
                HOST_LOST_AFTER.into(),
                // The agents' join sends the token up and brings their keys back: over TLS,
                // as between real machines. The client file carries the CA for the CLI.
                "--tls-auto".into(),
            ];
            if let Some(store) = &store {
                args.extend(["--store".into(), store.clone()]);
            }
            args
        };
        // serve writes its client file (URL and token) where this machine's CLI reads it: the
        // cleanest way out of its private filesystem, through the mechanism every `dva serve`
        // has, rather than reaching into its mount namespace for the token.
        let args = serve(SERVE_PORT);
        procs.push(self.start_private(
            "dva serve",
            &ctl,
            &ctl,
            &self.dva,
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
            Some(self.client_config().as_path()),
        )?);
        let (server, ca) = self.wait_for_client_file(&mut procs)?;
        if self.etcd {
            // Started once the first has put the API token and the installation's CA in etcd:
            // the second takes them. It forwards API calls to whichever leads.
            let mut args = serve(SERVE_PORT + 1);
            args.push("--no-client-config".into());
            procs.push(self.start_private(
                "dva serve (second replica)",
                &ctl,
                &format!("{ctl}-serve2"),
                &self.dva,
                &args.iter().map(String::as_str).collect::<Vec<_>>(),
                None,
            )?);
        }
        // The agents trust the installation CA from a file, as an operator hands it over with
        // the join token.
        let ca_file = self.dir().join("ca.pem");
        if let Some(pem) = &ca {
            write_private(&ca_file, pem.as_bytes())?;
        }
        let ca_arg = ca_file.to_string_lossy().into_owned();

        for host in self.agents() {
            let mut c = self.ctl_command(&["join-token"]);
            let out = cmd::run_within(&mut c, CLI_TIMEOUT)?;
            let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if token.is_empty() {
                return Err(LabError::BadOutput {
                    command: show(&c),
                    reason: "no join token printed".into(),
                });
            }
            let listen = format!("{}:{AGENT_PORT}", host.addr);
            let backplane = host.addr.to_string();
            let mut args: Vec<&str> = vec![
                "agent",
                "--server",
                server.as_str(),
                "--join-token",
                token.as_str(),
                "--name",
                host.ns.as_str(),
                "--listen",
                listen.as_str(),
                "--backplane",
                backplane.as_str(),
                "--state",
                AGENT_STATE,
                "--run-dir",
                "/run/dva",
            ];
            if ca.is_some() {
                args.extend(["--ca", ca_arg.as_str()]);
            }
            if host.dispatcher {
                args.extend(["--label", "dispatcher=true"]);
            }
            procs.push(self.start_private(
                "dva agent",
                &host.ns,
                &host.ns,
                &self.dva,
                &args,
                None,
            )?);
        }

        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            for p in procs.iter_mut() {
                self.check_running(p)?;
            }
            if matches!(self.all_ready(), Ok(true)) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let seen = self
                    .hosts()
                    .map(|h| format!("{h:?}"))
                    .unwrap_or_else(|e| e.to_string());
                let mut log = format!("dva get hosts: {seen}\n");
                for p in &procs {
                    log.push_str(&format!(
                        "--- {}\n{}",
                        self.log(&p.log).display(),
                        self.tail(&p.log)
                    ));
                }
                return Err(LabError::NotReady {
                    what: "every agent's host",
                    ns: ctl,
                    timeout: READY_TIMEOUT,
                    log,
                });
            }
            std::thread::sleep(POLL);
        }
    }

    /// Three etcd members on the control host's loopback, each on its own private filesystem;
    /// once every one answers healthy, the `--store` value that reaches them.
    fn start_etcd(&self, procs: &mut Vec<Started>) -> Result<String, LabError> {
        let ctl = self.lab.ctl_ns();
        let etcd = cmd::tool("etcd")?;
        let url = |port: u16| format!("http://127.0.0.1:{port}");
        let cluster: Vec<String> = ETCD_PORTS
            .iter()
            .enumerate()
            .map(|(i, p)| format!("m{}={}", i + 1, url(p + 10)))
            .collect();
        let cluster = cluster.join(",");
        let token = format!("{}lab", self.lab.prefix);
        for (i, port) in ETCD_PORTS.into_iter().enumerate() {
            let (name, client, peer) = (format!("m{}", i + 1), url(port), url(port + 10));
            let args = [
                "--name",
                name.as_str(),
                "--data-dir",
                "/var/lib/dva/etcd",
                "--listen-client-urls",
                client.as_str(),
                "--advertise-client-urls",
                client.as_str(),
                "--listen-peer-urls",
                peer.as_str(),
                "--initial-advertise-peer-urls",
                peer.as_str(),
                "--initial-cluster",
                cluster.as_str(),
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                token.as_str(),
            ];
            procs.push(self.start_private(
                "etcd",
                &ctl,
                &format!("{ctl}-etcd{}", i + 1),
                &etcd,
                &args,
                None,
            )?);
        }
        let curl = cmd::tool("curl")?;
        let deadline = Instant::now() + READY_TIMEOUT;
        for port in ETCD_PORTS {
            loop {
                for p in procs.iter_mut() {
                    self.check_running(p)?;
                }
                let mut c = crate::netns_command(&ctl, &curl.to_string_lossy());
                c.args(["-sS", "--max-time", "2"])
                    .arg(format!("{}/health", url(port)));
                let healthy = cmd::output_within(&mut c, CLI_TIMEOUT).is_ok_and(|o| {
                    String::from_utf8_lossy(&o.stdout).contains("\"health\":\"true\"")
                });
                if healthy {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(LabError::NotReady {
                        what: "etcd",
                        ns: ctl.clone(),
                        timeout: READY_TIMEOUT,
                        log: self.tail(&format!("{ctl}-etcd1")),
                    });
                }
                std::thread::sleep(POLL);
            }
        }
        let endpoints: Vec<String> = ETCD_PORTS
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        Ok(format!("etcd://{}", endpoints.join(",")))
    }

    /// Run `PROGRAM ARGS` on host `ns` in a mount namespace of its own with tmpfs over
    /// [`PRIVATE_DIRS`], in a session of its own (it outlives `dva lab up` and its terminal),
    /// output to the log `log`. `client_file`: where `dva serve` writes its client file.
    fn start_private(
        &self,
        what: &'static str,
        ns: &str,
        log: &str,
        program: &Path,
        args: &[&str],
        client_file: Option<&Path>,
    ) -> Result<Started, LabError> {
        let name = log.to_string();
        let path = self.log(log);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .map_err(|source| LabError::Io {
                path: path.clone(),
                source,
            })?;
        let err = log.try_clone().map_err(|source| LabError::Io {
            path: path.clone(),
            source,
        })?;
        // `ip netns exec`, setsid, unshare (without --fork), sh and dva each exec the next: the
        // child's pid is dva's. setsid does not fork either: the child leads no process group.
        let mut c = Command::new(cmd::ip_program());
        c.args(["netns", "exec", ns])
            .arg(cmd::tool("setsid")?)
            .arg(cmd::tool("unshare")?)
            .args(["--mount", "--propagation", "private"])
            .arg(cmd::tool("sh")?)
            .args(["-c", &private_script(), "sh"])
            .arg(cmd::tool("mount")?)
            .arg(program)
            .args(args);
        // A host knows only what crosses the lab's links: nothing of this shell's dva settings.
        for var in [
            "DVA_CLIENT_CONFIG",
            "DVA_SERVER",
            "DVA_TOKEN",
            "DVA_CA_FILE",
        ] {
            c.env_remove(var);
        }
        if let Some(file) = client_file {
            c.env("DVA_CLIENT_CONFIG", file);
        }
        c.stdin(Stdio::null()).stdout(log).stderr(err);
        let child = c.spawn().map_err(|source| LabError::Spawn {
            command: show(&c),
            source,
        })?;
        Ok(Started {
            what,
            ns: ns.to_string(),
            log: name,
            child,
        })
    }

    /// Wait until `dva serve` has written its client file; the server URL and CA in it.
    fn wait_for_client_file(
        &self,
        procs: &mut [Started],
    ) -> Result<(String, Option<String>), LabError> {
        let ctl = self.lab.ctl_ns();
        let path = self.client_config();
        let deadline = Instant::now() + SERVE_TIMEOUT;
        loop {
            for p in procs.iter_mut() {
                self.check_running(p)?;
            }
            // Written whole by one write: a partial file fails to parse and is read again.
            let file = std::fs::read_to_string(&path)
                .ok()
                .and_then(|t| serde_json::from_str::<Value>(&t).ok());
            let field = |k: &str| {
                file.as_ref()
                    .and_then(|v| v.get(k))
                    .and_then(Value::as_str)
                    .map(str::to_string)
            };
            if let Some(server) = field("server") {
                return Ok((server, field("ca")));
            }
            if Instant::now() >= deadline {
                return Err(LabError::NotReady {
                    what: "dva serve (its client file)",
                    ns: ctl.clone(),
                    timeout: SERVE_TIMEOUT,
                    log: self.tail(&ctl),
                });
            }
            std::thread::sleep(POLL);
        }
    }

    /// An error if the process has exited.
    fn check_running(&self, p: &mut Started) -> Result<(), LabError> {
        match p.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(LabError::Exited {
                what: p.what,
                ns: p.ns.clone(),
                status: status.to_string(),
                log: self.tail(&p.log),
            }),
            Err(source) => Err(LabError::Io {
                path: format!("/proc/{}", p.child.id()).into(),
                source,
            }),
        }
    }

    /// The last lines of the log `name`.
    fn tail(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.log(name)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let mut out = lines[lines.len().saturating_sub(LOG_TAIL)..].join("\n");
        out.push('\n');
        out
    }

    /// How to use the machines: what `dva lab up --machines` and `dva lab show` print.
    pub fn usage(&self) -> String {
        let lab = &self.lab;
        let p = if lab.prefix == crate::DEFAULT_PREFIX {
            String::new()
        } else {
            format!(" --prefix {}", lab.prefix)
        };
        let ctl = lab.ctl_ns();
        let agents: Vec<String> = self
            .agents()
            .iter()
            .map(|a| {
                if a.dispatcher {
                    format!("{} (dispatcher=true)", a.ns)
                } else {
                    a.ns.clone()
                }
            })
            .collect();
        format!(
            "machines: dva serve on {ctl} ({api}, on the lab's backplane only); dva agent on {agents}; \
             each with its own {dirs} (tmpfs, gone with its processes)\n\
             logs: {dir}/<namespace>.log ({ctl}.log: dva serve; the others: each host's agent)\n\
             use it: the CLI runs on {ctl} and reads the server and token from the client file \
             (DVA_SERVER and DVA_TOKEN, if set, win over it):\n  \
             export DVA_CLIENT_CONFIG={client}\n  \
             ip netns exec {ctl} dva get hosts\n  \
             ip netns exec {ctl} dva apply -f examples/edge-firewall.yaml\n  \
             ip netns exec {client_ns} curl http://{server}/\n\
             partition a host: dva lab cut host1{p}   (heal it: dva lab heal host1{p})\n{etcd}",
            api = Machines::api_url(),
            agents = agents.join(", "),
            dirs = PRIVATE_DIRS.join(", "),
            dir = self.dir().display(),
            client = self.client_config().display(),
            client_ns = lab.client_ns(),
            server = Lab::server_addr(1),
            etcd = if self.etcd || self.log(&format!("{ctl}-etcd1")).exists() {
                format!(
                    "etcd: 3 members on {ctl}'s loopback (127.0.0.1:{}-{}, plain HTTP: nothing \
                     else reaches it), a second dva serve replica at {}:{} (logs {ctl}-etcdN.log, \
                     {ctl}-serve2.log)\n",
                    ETCD_PORTS[0],
                    ETCD_PORTS[2],
                    Lab::ctl_backplane_addr(),
                    SERVE_PORT + 1
                )
            } else {
                String::new()
            },
        )
    }
}

/// Write a file only root reads (mode 0600 from its creation).
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), LabError> {
    use std::io::Write;
    OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(bytes))
        .map_err(|source| LabError::Io {
            path: path.to_path_buf(),
            source,
        })
}

/// The sh script run in each host's new mount namespace: `$1` is mount(8), the rest the command.
fn private_script() -> String {
    format!(
        "set -e; m=$1; shift; for d in {}; do \"$m\" -t tmpfs -o mode=0700 tmpfs \"$d\"; done; exec \"$@\"",
        PRIVATE_DIRS.join(" ")
    )
}

fn dir(prefix: &str) -> PathBuf {
    Path::new(RUN_ROOT).join(prefix)
}

/// Remove the machines' directory of lab `prefix` (and `/run/dva-lab` once no lab uses it).
pub(crate) fn remove_dir(prefix: &str) -> Result<(), LabError> {
    let d = dir(prefix);
    match std::fs::remove_dir_all(&d) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(LabError::Io { path: d, source }),
    }
    // Fails while another lab's directory is in it, which is the point.
    let _ = std::fs::remove_dir(RUN_ROOT);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lab(control: bool) -> Lab {
        Lab {
            prefix: "m-".into(),
            servers: 1,
            hosts: 2,
            dispatchers: 1,
            control,
        }
    }

    #[test]
    fn machines_need_the_control_host() {
        let e = Machines::new(&lab(false), Path::new("/bin/dva")).unwrap_err();
        assert!(e.to_string().contains("--machines --prefix m-"), "{e}");
        let m = Machines::new(&lab(true), Path::new("/bin/dva")).unwrap();
        assert_eq!(m.agent_hosts(), ["m-disp1", "m-host1", "m-host2"]);
        assert_eq!(m.client_config(), Path::new("/run/dva-lab/m-/client.json"));
        assert_eq!(m.log("m-ctl"), Path::new("/run/dva-lab/m-/m-ctl.log"));
        assert_eq!(Machines::api_url(), "https://198.19.0.10:17080");
        let usage = m.usage();
        for needle in [
            "export DVA_CLIENT_CONFIG=/run/dva-lab/m-/client.json",
            "ip netns exec m-ctl dva get hosts",
            "m-disp1 (dispatcher=true), m-host1, m-host2",
            "dva lab cut host1 --prefix m-",
        ] {
            assert!(usage.contains(needle), "{needle} missing from:\n{usage}");
        }
    }

    #[test]
    fn the_private_script_mounts_every_private_dir_then_runs_the_command() {
        let s = private_script();
        assert!(s.starts_with("set -e;"), "{s}");
        assert!(
            s.contains("for d in /run/dva /var/lib/dva /etc/dva;"),
            "{s}"
        );
        assert!(s.ends_with("exec \"$@\""), "{s}");
    }

    #[test]
    fn the_ctl_command_reads_the_client_file_only() {
        let m = Machines::new(&lab(true), Path::new("/bin/dva")).unwrap();
        let c = m.ctl_command(&["get", "hosts"]);
        let args: Vec<_> = c
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(args, ["netns", "exec", "m-ctl", "/bin/dva", "get", "hosts"]);
        let envs: Vec<_> = c
            .get_envs()
            .map(|(k, v)| (k.to_string_lossy().into_owned(), v.is_some()))
            .collect();
        assert!(envs.contains(&("DVA_CLIENT_CONFIG".into(), true)));
        assert!(envs.contains(&("DVA_SERVER".into(), false)));
    }
}
