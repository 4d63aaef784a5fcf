//! Real servers and clients run inside lab namespaces: nginx and iperf3 servers as guards,
//! curl, ping, iperf3 and a bare TCP connect as clients, and floods of raw frames.
//!
//! Servers: `start` returns once the server accepts connections (polled from inside its
//! namespace, with a deadline), and dropping the guard kills the server and removes its
//! temp dir. A server that dies while starting is an error carrying its log.
//!
//! Clients: each runs with a bound on its run time; "the network said no" (refused, timed
//! out, no reply) is `Ok(false)` where the function returns a bool, and an `Err` is kept for
//! the client not running at all (missing tool, missing namespace, bad arguments).

mod flood;
mod haproxy;
mod impair;
mod iperf3;
mod nft;
mod nginx;
mod streams;
mod udp_streams;
mod udpgen;
mod wrk;

use std::fs::File;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub use flood::{device_mac, syn_flood, udp_flood, Flood, FloodOptions, FloodReport, FloodSource};
pub use haproxy::Haproxy;
pub use impair::{ImpairStats, Impaired, Impairment};
pub use iperf3::{iperf3_client, Iperf3Report, Iperf3Server};
pub use nft::NftTable;
pub use nginx::{Nginx, BIG_BYTES};
pub use streams::{start_streams, StreamResult, StreamServer};
pub use udp_streams::{start_udp_streams, UdpEchoServer, UdpStreamResult};
pub use udpgen::{udpgen, UdpGenOptions, UdpGenReport, UdpSink};
pub use wrk::{wrk, WrkReport};

use crate::cmd;
use crate::{netns_command, LabError};

/// How long a server may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(10);
const START_POLL: Duration = Duration::from_millis(20);
/// Added to a client's own timeout before it is killed from outside: the client's own
/// timeout should fire first and explain itself.
const CLIENT_GRACE: Duration = Duration::from_secs(5);

/// Poll `f` every `poll` until it returns true (→ true) or `deadline` has passed since the call
/// (→ false). `f` runs at least once, and once more at the deadline.
pub fn wait_until(deadline: Duration, poll: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    loop {
        if f() {
            return true;
        }
        let now = Instant::now();
        if now >= end {
            return false;
        }
        std::thread::sleep(poll.min(end - now));
    }
}

fn at_least_one(what: &'static str, value: u32) -> Result<(), LabError> {
    if value == 0 {
        // 0 means "no limit" to curl, ping and timeout, and "forever" to iperf3.
        return Err(LabError::InvalidArgument {
            what,
            value: value.to_string(),
            reason: "must be at least 1",
        });
    }
    Ok(())
}

/// `curl -sS --fail --max-time T URL` in `ns`: the response body. An HTTP error status is an
/// error too (`--fail`), as is anything curl reports; the error carries curl's exit code and
/// stderr. Proxy variables from the environment are ignored: lab URLs are never proxied.
pub fn curl(ns: &str, url: &str, timeout_secs: u32) -> Result<String, LabError> {
    at_least_one("curl timeout (seconds)", timeout_secs)?;
    curl_ms(ns, url, timeout_secs.saturating_mul(1000))
}

/// [`curl`] with a timeout in milliseconds (curl's `--max-time` takes fractions).
pub fn curl_ms(ns: &str, url: &str, timeout_ms: u32) -> Result<String, LabError> {
    at_least_one("curl timeout (milliseconds)", timeout_ms)?;
    let program = cmd::tool("curl")?;
    let mut c = netns_command(ns, &program.to_string_lossy());
    c.args([
        "-sS",
        "--fail",
        "--globoff",
        "--noproxy",
        "*",
        "--max-time",
        &format!("{:.3}", f64::from(timeout_ms) / 1000.0),
        url,
    ]);
    let out = cmd::output_within(
        &mut c,
        Duration::from_millis(u64::from(timeout_ms)) + CLIENT_GRACE,
    )?;
    if !out.status.success() {
        return Err(LabError::Curl {
            ns: ns.to_string(),
            url: url.to_string(),
            code: out.status.code(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ping -c COUNT -w TIMEOUT` in `ns`: true when all `count` echo replies came back within
/// `timeout_secs` (requests go out every 0.2 s), false when some did not. Works for IPv4
/// and IPv6 destinations.
pub fn ping(ns: &str, dst: IpAddr, count: u32, timeout_secs: u32) -> Result<bool, LabError> {
    at_least_one("ping count", count)?;
    at_least_one("ping timeout (seconds)", timeout_secs)?;
    let program = cmd::tool("ping")?;
    let mut c = netns_command(ns, &program.to_string_lossy());
    c.args([
        "-n",
        "-q",
        "-i",
        "0.2",
        "-c",
        &count.to_string(),
        "-w",
        &timeout_secs.to_string(),
        &dst.to_string(),
    ]);
    let command = cmd::show(&c);
    let out = cmd::output_within(
        &mut c,
        Duration::from_secs(u64::from(timeout_secs)) + CLIENT_GRACE,
    )?;
    // iputils: 0 = replies, 1 = missing replies, 2 = any other error (bad address, no route
    // from a down interface, ...); `ip netns exec` itself fails with 255.
    match out.status.code() {
        Some(0) => Ok(true),
        Some(1) => Ok(false),
        _ => Err(LabError::CommandFailed {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        }),
    }
}

/// A TCP connection from `ns` to `dst:port`: true if the handshake completed within
/// `timeout_secs`, false if it was refused, unreachable or timed out. Uses bash's `/dev/tcp`
/// under coreutils' `timeout`; the connection is closed at once.
pub fn tcp_connect(ns: &str, dst: IpAddr, port: u16, timeout_secs: u32) -> Result<bool, LabError> {
    at_least_one("TCP connect timeout (seconds)", timeout_secs)?;
    let timeout = cmd::tool("timeout")?;
    let bash = cmd::tool("bash")?;
    let mut c = netns_command(ns, &timeout.to_string_lossy());
    // Address and port go in as positional parameters, never spliced into the script.
    c.arg(timeout_secs.to_string()).arg(&bash).args([
        "-c",
        "exec 3<>\"/dev/tcp/$0/$1\"",
        &dst.to_string(),
        &port.to_string(),
    ]);
    let command = cmd::show(&c);
    let out = cmd::output_within(
        &mut c,
        Duration::from_secs(u64::from(timeout_secs)) + CLIENT_GRACE,
    )?;
    // bash exits 1 when connect() fails (refused, unreachable); timeout exits 124 when it fired.
    match out.status.code() {
        Some(0) => Ok(true),
        Some(1) | Some(124) => Ok(false),
        _ => Err(LabError::CommandFailed {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        }),
    }
}

/// xorshift64: a tiny generator, repeatable from its seed and free of dependencies; for
/// spoofed addresses and impairment decisions, never for anything secret.
struct Xorshift(u64);

impl Xorshift {
    /// A generator from `seed` (xorshift must not start at 0).
    fn new(seed: u64) -> Xorshift {
        Xorshift(seed | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A percentage in [0, 100), in steps of 0.01.
    fn pct(&mut self) -> f64 {
        (self.next() % 10_000) as f64 / 100.0
    }
}

/// A fresh directory for one server's config, pid file, logs and temp files; removed on drop.
#[derive(Debug)]
struct Scratch {
    path: PathBuf,
}

impl Scratch {
    fn new(what: &str) -> Result<Scratch, LabError> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let base = std::env::temp_dir();
        // create_dir (not create_dir_all) fails on an existing path: a stale or foreign
        // directory is never reused; try the next name instead.
        let mut last_err = None;
        for _ in 0..16 {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            let path = base.join(format!(
                "dva-lab-{what}-{}-{}-{nanos:08x}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            match std::fs::create_dir(&path) {
                Ok(()) => return Ok(Scratch { path }),
                Err(e) => last_err = Some((path, e)),
            }
        }
        let (path, source) =
            last_err.unwrap_or_else(|| (base.clone(), std::io::Error::other("no attempt made")));
        Err(LabError::Io { path, source })
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn write(&self, name: &str, contents: &[u8]) -> Result<PathBuf, LabError> {
        let path = self.path.join(name);
        std::fs::write(&path, contents).map_err(|source| LabError::Io {
            path: path.clone(),
            source,
        })?;
        Ok(path)
    }

    fn create(&self, name: &str) -> Result<File, LabError> {
        let path = self.path.join(name);
        File::create(&path).map_err(|source| LabError::Io { path, source })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A server process in a namespace, with its scratch dir. Dropping it kills the process
/// (SIGKILL: servers here keep no state worth a graceful stop) and then removes the dir.
#[derive(Debug)]
struct Daemon {
    what: &'static str,
    ns: String,
    child: Child,
    /// stdout and stderr of the process.
    log: PathBuf,
    scratch: Scratch,
}

impl Daemon {
    /// Spawns `cmd` (already wrapped in `ip netns exec`, which execs in place, so the child
    /// is the server itself) with its output going to `scratch/NAME.log`.
    fn spawn(
        what: &'static str,
        ns: &str,
        mut cmd: Command,
        scratch: Scratch,
    ) -> Result<Daemon, LabError> {
        let log = scratch.path().join(format!("{what}.log"));
        let out = scratch.create(&format!("{what}.log"))?;
        let err = out.try_clone().map_err(|source| LabError::Io {
            path: log.clone(),
            source,
        })?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|source| LabError::Spawn {
                command: cmd::show(&cmd),
                source,
            })?;
        Ok(Daemon {
            what,
            ns: ns.to_string(),
            child,
            log,
            scratch,
        })
    }

    /// Waits until `ready` holds; fails early, with the server's log, if the server exits.
    fn wait_ready(
        &mut self,
        extra_logs: &[&Path],
        mut ready: impl FnMut() -> bool,
    ) -> Result<(), LabError> {
        let mut exited = None;
        let ok = wait_until(START_TIMEOUT, START_POLL, || match self.child.try_wait() {
            Ok(Some(status)) => {
                exited = Some(status);
                true
            }
            Ok(None) => ready(),
            Err(_) => false,
        });
        let log = self.logs(extra_logs);
        match exited {
            Some(status) => Err(LabError::Exited {
                what: self.what,
                ns: self.ns.clone(),
                status: status.to_string(),
                log,
            }),
            None if ok => Ok(()),
            None => Err(LabError::NotReady {
                what: self.what,
                ns: self.ns.clone(),
                timeout: START_TIMEOUT,
                log,
            }),
        }
    }

    fn logs(&self, extra: &[&Path]) -> String {
        std::iter::once(self.log.as_path())
            .chain(extra.iter().copied())
            .filter_map(|p| std::fs::read_to_string(p).ok())
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // `scratch` is dropped after this, with the process gone.
    }
}

/// Whether process `pid` holds a listening TCP socket on `port` in `ns`, via `ss -p`. Owner
/// matters: another server already on the port would answer connections while ours is still
/// failing to bind.
fn listening(ns: &str, port: u16, pid: u32) -> Result<bool, LabError> {
    let ss = cmd::tool("ss")?;
    let mut c = netns_command(ns, &ss.to_string_lossy());
    c.args(["-H", "-l", "-t", "-n", "-p", &format!("sport = :{port}")]);
    let out = cmd::run_within(&mut c, Duration::from_secs(5))?;
    Ok(owned_by(&String::from_utf8_lossy(&out.stdout), pid))
}

/// `ss -p` lines end in `users:(("nginx",pid=123,fd=6),...)`.
fn owned_by(ss_output: &str, pid: u32) -> bool {
    let needle = format!("pid={pid},");
    ss_output.lines().any(|l| l.contains(&needle))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_until_returns_as_soon_as_true() {
        let mut n = 0;
        let t0 = Instant::now();
        assert!(wait_until(
            Duration::from_secs(5),
            Duration::from_millis(1),
            || {
                n += 1;
                n == 3
            }
        ));
        assert_eq!(n, 3);
        assert!(t0.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn wait_until_gives_up_at_the_deadline() {
        let mut n = 0;
        let t0 = Instant::now();
        assert!(!wait_until(
            Duration::from_millis(50),
            Duration::from_millis(10),
            || {
                n += 1;
                false
            }
        ));
        assert!(t0.elapsed() >= Duration::from_millis(50));
        assert!(n >= 2, "polled at least at the start and at the deadline");
        // A zero deadline still polls once.
        assert!(wait_until(
            Duration::ZERO,
            Duration::from_millis(10),
            || true
        ));
    }

    #[test]
    fn zero_timeouts_are_rejected_before_running_anything() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        assert!(matches!(
            curl("nowhere", "http://x/", 0),
            Err(LabError::InvalidArgument { .. })
        ));
        assert!(matches!(
            ping("nowhere", ip, 0, 1),
            Err(LabError::InvalidArgument { .. })
        ));
        assert!(matches!(
            ping("nowhere", ip, 1, 0),
            Err(LabError::InvalidArgument { .. })
        ));
        assert!(matches!(
            tcp_connect("nowhere", ip, 80, 0),
            Err(LabError::InvalidArgument { .. })
        ));
    }

    #[test]
    fn listener_owner_is_read_from_ss() {
        let out = "LISTEN 0 511 0.0.0.0:80 0.0.0.0:* users:((\"nginx\",pid=4321,fd=6))\n";
        assert!(owned_by(out, 4321));
        assert!(!owned_by(out, 432));
        assert!(!owned_by("", 4321));
    }

    #[test]
    fn scratch_dirs_are_fresh_and_removed() {
        let a = Scratch::new("t").unwrap();
        let b = Scratch::new("t").unwrap();
        assert_ne!(a.path(), b.path());
        let f = a.write("x", b"y").unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"y");
        let p = a.path().to_path_buf();
        drop(a);
        assert!(!p.exists());
    }
}
