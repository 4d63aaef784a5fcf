//! `dva bench flood`: what a flood does to legitimate connections through dva and through the
//! kernel with an equivalent nftables ruleset, in one lab and one run, printed as one table
//! (issue #16).
//!
//! Paths, both through the lab's dispatcher host `{P}disp1`:
//! - **kernel + nftables firewall**: `{P}disp1` made a plain router
//!   ([`dva_lab::Lab::set_kernel_router`]) with the ruleset `dva bench compare` uses, equivalent
//!   to `examples/edge-firewall.yaml`, and the kernel's connection tracking at its defaults
//!   (its `nf_conntrack_max` is printed);
//! - **dva edge-fw with 2 data planes**: `dva run -f examples/edge-firewall.yaml`.
//!
//! Floods ([`dva_lab::apps::syn_flood`], [`dva_lab::apps::udp_flood`]), the same frames on both
//! paths at the same rate: `--pps`, or less if the kernel path's flood could not go that fast
//! (see [`matched_rate`]), so both paths get the same load, whatever they make of it:
//! - **SYN**: TCP SYNs from random spoofed sources, client → server1:80, which the policy lets
//!   in: every one is a half-open connection to track;
//! - **UDP**: datagrams on a new 5-tuple each, server1 → client (inside → outside, which the
//!   policy lets out: a compromised inside host), every one a new connection to track. From
//!   outside, unsolicited UDP is refused before any state exists, on both paths.
//!
//! The probe: from the client, `--probe-hz` times a second, a new TCP connection to nginx on
//! server1, `GET /` and the whole response, on a thread of its own each (a stalled probe never
//! delays the next: no coordinated omission), 3 s at most each. Latency is that exchange's,
//! in ms; probes are counted by when they started: during the flood, or within 1 s after it.
//!
//! CPU over the flood and the second after it, in % of one core: the dva units' user+sys,
//! or for the kernel the softirq time of all CPUs (where it forwards and tracks, though that
//! includes the endpoints' receive work).
//!
//! Each (path, flood) runs on a freshly built lab: the kernel keeps a SYN flood's half-open
//! entries for minutes, and the UDP flood must not find a table someone else filled.
//! `--quick` floods a few thousand frames and builds one lab per path (for the test).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use dva_lab::apps::{self, FloodOptions, FloodReport, FloodSource, NftTable, Nginx};
use dva_lab::{Lab, LabSpec};
use dva_proto::spec::RuntimeSpec;

use crate::bench_lab::{
    machine_cpu, netfilter_sysctl, render_table, runqueue_wait, unit_pids, unit_stats, Appliance,
    PathCpu, NFT_EDGE_FIREWALL,
};
use crate::demo::{spec_path, LabGuard};

#[derive(clap::Args)]
pub struct Options {
    /// Lab prefix (the lab is built for the run and removed afterwards).
    #[arg(long, default_value = "dva-bench-")]
    pub prefix: String,
    /// Frames per flood.
    #[arg(long, default_value_t = 300_000)]
    pub frames: usize,
    /// Flood rate, frames/s (0: as fast as the generator goes).
    #[arg(long, default_value_t = 100_000)]
    pub pps: u32,
    /// Probes (new TCP connection + GET /) per second.
    #[arg(long, default_value_t = 50)]
    pub probe_hz: u32,
    /// A tiny flood (5 000 frames at 20 000/s) and one lab per path: checks that the bench
    /// works, measures nothing worth quoting.
    #[arg(long)]
    pub quick: bool,
    /// Also print the table as Markdown (what docs/SECURITY.md holds).
    #[arg(long)]
    pub markdown: bool,
}

/// What `--quick` floods.
const QUICK_FRAMES: usize = 5_000;
const QUICK_PPS: u32 = 20_000;

const DATAPLANES: u32 = 2;
const APPLIANCE: &str = "edge-fw";
const WEB_PORT: u16 = 80;
/// A probe that takes longer failed: one lost SYN (retransmitted after 1 s) still fits.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// Probes before the flood (the idle latency) and after it (does the path recover at once?).
const BEFORE: Duration = Duration::from_secs(1);
const AFTER: Duration = Duration::from_secs(1);
/// The path must carry a connection before it is flooded, or what we measure is a broken lab.
const WARMUP_TIMEOUT: Duration = Duration::from_secs(10);
const SEED: u64 = 0x9e37_79b9_7f4a_7c15;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PathKind {
    Kernel,
    Dva,
}

impl PathKind {
    fn name(self) -> String {
        match self {
            PathKind::Kernel => "kernel + nftables fw".into(),
            PathKind::Dva => format!("dva edge-fw, {DATAPLANES} DP"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FloodKind {
    Syn,
    Udp,
}

impl FloodKind {
    const ALL: [FloodKind; 2] = [FloodKind::Syn, FloodKind::Udp];

    fn name(self) -> &'static str {
        match self {
            FloodKind::Syn => "SYN, random sources",
            FloodKind::Udp => "UDP, unique tuples",
        }
    }
}

/// Probes of one window: how many started, how many completed, the latencies of those.
#[derive(Debug, Clone, PartialEq, Default)]
struct ProbeSummary {
    attempted: usize,
    ok: usize,
    /// Why probes failed, and how many for each reason.
    failures: BTreeMap<String, usize>,
    /// Milliseconds, sorted.
    latencies_ms: Vec<f64>,
}

impl ProbeSummary {
    fn of<'a>(probes: impl Iterator<Item = &'a ProbeResult>) -> ProbeSummary {
        let mut s = ProbeSummary::default();
        for p in probes {
            s.attempted += 1;
            match &p.outcome {
                Ok(d) => {
                    s.ok += 1;
                    s.latencies_ms.push(d.as_secs_f64() * 1e3);
                }
                Err(why) => *s.failures.entry(why.clone()).or_insert(0) += 1,
            }
        }
        s.latencies_ms.sort_by(f64::total_cmp);
        s
    }

    fn percentile(&self, p: f64) -> Option<f64> {
        percentile(&self.latencies_ms, p)
    }

    fn ratio(&self) -> String {
        format!("{}/{}", self.ok, self.attempted)
    }
}

/// The nearest-rank percentile `p` (0-100] of `sorted`: the smallest value with at least p%
/// of the values at or below it.
fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

/// What one flood on one path did.
#[derive(Debug, Clone, PartialEq)]
struct Measured {
    flood: FloodReport,
    idle: ProbeSummary,
    during: ProbeSummary,
    after: ProbeSummary,
    /// What the path counted as dropped, by reason (and the state it kept).
    drops: String,
    /// CPU over the flood and the second after it, % of one core.
    path_cpu_pct: f64,
    machine_cpu_pct: f64,
    /// dva: how long its units' threads waited for a CPU while runnable, % of the window
    /// (summed over threads). The kernel's softirq work does not queue behind processes.
    waited_pct: Option<f64>,
}

struct Row {
    path: PathKind,
    flood: FloodKind,
    result: anyhow::Result<Measured>,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    let (frames, pps) = if opts.quick {
        (QUICK_FRAMES, QUICK_PPS)
    } else {
        (opts.frames, opts.pps)
    };
    if frames == 0 || opts.probe_hz == 0 {
        bail!("--frames and --probe-hz must be at least 1");
    }
    let spec = spec_path("edge-firewall.yaml")?;
    println!(
        "lab {}: client, server1 (nginx), dispatcher host, 2 data-plane hosts, rebuilt for each {}; \
         floods of {frames} frames at {} (dva at the rate the kernel path's flood achieved, if \
         lower); probes {}/s (new TCP connection + GET /)",
        opts.prefix,
        if opts.quick { "path" } else { "path and flood" },
        if pps == 0 { "full speed".to_string() } else { format!("{pps} frames/s") },
        opts.probe_hz,
    );
    let _lab_guard = LabGuard(opts.prefix.clone());
    let bench = Bench {
        prefix: opts.prefix.clone(),
        frames,
        pps,
        probe_hz: opts.probe_hz,
    };
    let mut rows = Vec::new();
    for path in [PathKind::Kernel, PathKind::Dva] {
        println!("\n{}", path.name());
        let mut setup: Option<PathSetup> = None;
        for flood in FloodKind::ALL {
            if !opts.quick || setup.is_none() {
                // The previous lab and its path go first: one lab prefix at a time.
                setup = None;
                match bench.set_up(path, &spec) {
                    Ok(s) => setup = Some(s),
                    Err(e) => {
                        println!("  FAILED to set up: {e:#}");
                        rows.push(Row {
                            path,
                            flood,
                            result: Err(e),
                        });
                        continue;
                    }
                }
            }
            let Some(s) = &setup else { continue };
            print!("  {:<22} ", flood.name());
            let _ = std::io::stdout().flush();
            let pps = matched_rate(bench.pps, &rows, flood);
            let result = bench.measure(s, flood, pps);
            match &result {
                Ok(m) => {
                    println!(
                        "{:.0} kpps; probes p99 {} ms, ok {} during, {} after; {}",
                        m.flood.pps() / 1e3,
                        ms(m.during.percentile(99.0)),
                        m.during.ratio(),
                        m.after.ratio(),
                        m.drops
                    );
                    for (when, probes) in [("during", &m.during), ("after", &m.after)] {
                        for (why, n) in &probes.failures {
                            println!("    {n} probe(s) {when} the flood failed: {why}");
                        }
                    }
                }
                Err(e) => println!("FAILED: {e:#}"),
            }
            rows.push(Row {
                path,
                flood,
                result,
            });
        }
    }
    println!("\n{}", render(&rows, false));
    if opts.markdown {
        println!("{}", render(&rows, true));
    }
    let failed = rows.iter().filter(|r| r.result.is_err()).count();
    if failed > 0 {
        bail!("{failed} measurement(s) failed (see the table)");
    }
    Ok(())
}

/// The rate to flood dva at: the rate the kernel path's flood of the same kind achieved, if
/// lower than asked. On a veth the sender does the receiver's work: each frame the generator
/// writes is bridged, forwarded and tracked by the kernel in the generator's own system call,
/// so the kernel path slows its flood down, while dva reads frames in its own processes.
/// Matching the rates gives both paths the same load, frame for frame and second for second.
fn matched_rate(asked: u32, rows: &[Row], flood: FloodKind) -> u32 {
    let kernel = rows
        .iter()
        .find(|r| r.path == PathKind::Kernel && r.flood == flood)
        .and_then(|r| r.result.as_ref().ok())
        .map(|m| m.flood.pps());
    match kernel {
        // Whole thousands: a rate that reads the same in the table.
        // Within 5 %, the kernel's flood kept up (pacing costs a little): the rate asked.
        Some(k) if asked == 0 || k < 0.95 * f64::from(asked) => {
            ((k / 1e3).floor() * 1e3).max(1e3) as u32
        }
        _ => asked,
    }
}

struct Bench {
    prefix: String,
    frames: usize,
    pps: u32,
    probe_hz: u32,
}

/// A lab with one path set up in it; dropping it stops the path and the server.
struct PathSetup {
    lab: Lab,
    path: PathKind,
    cpu: PathCpu,
    // Dropped in this order: the appliance or the ruleset first, then the server.
    _appliance: Option<Appliance>,
    _firewall: Option<NftTable>,
    _nginx: Nginx,
}

impl PathSetup {
    /// Seconds the path's processes have waited for a CPU so far (none for the kernel).
    fn waited(&self) -> Option<f64> {
        match &self.cpu {
            PathCpu::Processes(pids) => Some(runqueue_wait(pids)),
            PathCpu::Softirq => None,
        }
    }
}

impl Bench {
    fn set_up(&self, path: PathKind, spec: &std::path::Path) -> anyhow::Result<PathSetup> {
        Lab::down(&self.prefix)?;
        let lab = Lab::up(&LabSpec {
            prefix: self.prefix.clone(),
            servers: 1,
            hosts: 2,
            dispatchers: 1,
            control: false,
        })?;
        let nginx = Nginx::start(&lab.server_ns(1), &[WEB_PORT], "hello from server1\n")?;
        let router = lab.dispatcher_ns(1);
        let (appliance, firewall, cpu) = match path {
            PathKind::Kernel => {
                lab.set_kernel_router(true)?;
                let fw = NftTable::load(&router, "inet", "dva_bench_fw", NFT_EDGE_FIREWALL)?;
                println!(
                    "  (table inet dva_bench_fw in {router}; nf_conntrack_max there: {})",
                    netfilter_sysctl(&router, "nf_conntrack_max")
                        .map_or("unknown".into(), |n| n.to_string())
                );
                (None, Some(fw), PathCpu::Softirq)
            }
            PathKind::Dva => {
                let app =
                    Appliance::start_with(spec, &self.prefix, DATAPLANES, &RuntimeSpec::default())?;
                let pids = unit_pids(&self.prefix, APPLIANCE)?;
                (Some(app), None, PathCpu::Processes(pids))
            }
        };
        let server = web_server();
        let warm = apps::wait_until(WARMUP_TIMEOUT, Duration::from_millis(200), || {
            dva_io::netns::in_netns(&lab.client_ns(), || probe(server, PROBE_TIMEOUT))
                .is_ok_and(|r| r.is_ok())
        });
        if !warm {
            bail!("no connection to {server} through the path within {WARMUP_TIMEOUT:?}");
        }
        Ok(PathSetup {
            lab,
            path,
            cpu,
            _appliance: appliance,
            _firewall: firewall,
            _nginx: nginx,
        })
    }

    fn measure(&self, s: &PathSetup, flood: FloodKind, pps: u32) -> anyhow::Result<Measured> {
        let router = s.lab.dispatcher_ns(1);
        let server1 = Lab::server_addr(1);
        let opts = match flood {
            FloodKind::Syn => FloodOptions {
                ns: s.lab.client_ns(),
                dev: "eth0".into(),
                next_hop_mac: apps::device_mac(&router, "out0")?,
                src: FloodSource::Random,
                dst: server1,
                frames: self.frames,
                pps,
                seed: SEED,
            },
            FloodKind::Udp => FloodOptions {
                ns: s.lab.server_ns(1),
                dev: "eth0".into(),
                next_hop_mac: apps::device_mac(&router, "in0")?,
                src: FloodSource::Fixed(server1),
                dst: Lab::client_addr(),
                frames: self.frames,
                pps,
                seed: SEED,
            },
        };
        let counted0 = self.counters(s)?;
        let prober = Prober::start(&s.lab.client_ns(), web_server(), self.probe_hz);
        std::thread::sleep(BEFORE);
        let (busy0, soft0) = machine_cpu()?;
        let cpu0 = s.cpu.read(soft0);
        let wait0 = s.waited();
        let t0 = Instant::now();
        let sent = match flood {
            FloodKind::Syn => apps::syn_flood(&opts, WEB_PORT),
            FloodKind::Udp => apps::udp_flood(&opts),
        }
        .and_then(apps::Flood::join);
        let t1 = Instant::now();
        let report = match sent {
            Ok(r) => r,
            Err(e) => {
                let _ = prober.stop();
                return Err(e.into());
            }
        };
        // The state the flood left, read while it is there (dva ages half-open entries fast
        // under pressure).
        let state = self.state(s);
        std::thread::sleep(AFTER);
        let (busy1, soft1) = machine_cpu()?;
        let cpu1 = s.cpu.read(soft1);
        let wait1 = s.waited();
        let window = (Instant::now() - t0).as_secs_f64();
        let probes = prober.stop()?;
        let counted1 = self.counters(s)?;
        Ok(Measured {
            flood: report,
            idle: ProbeSummary::of(probes.iter().filter(|p| p.at < t0)),
            during: ProbeSummary::of(probes.iter().filter(|p| p.at >= t0 && p.at < t1)),
            after: ProbeSummary::of(probes.iter().filter(|p| p.at >= t1 && p.at < t1 + AFTER)),
            drops: describe_drops(&counted0, &counted1, &state),
            path_cpu_pct: 100.0 * (cpu1 - cpu0) / window,
            machine_cpu_pct: 100.0 * (busy1 - busy0) / window,
            waited_pct: wait0.zip(wait1).map(|(a, b)| 100.0 * (b - a) / window),
        })
    }

    /// Drops by reason (dva: every unit's drop counters and the data planes' early drops of
    /// half-open entries; kernel: the conntrack statistics of the router's namespace).
    fn counters(&self, s: &PathSetup) -> anyhow::Result<BTreeMap<String, u64>> {
        match s.path {
            PathKind::Dva => {
                let mut all = BTreeMap::new();
                for (_, st) in unit_stats(&self.prefix, APPLIANCE)? {
                    for (reason, n) in st.drops {
                        *all.entry(reason).or_insert(0) += n;
                    }
                    // Frames the kernel dropped before dva could read them (a full ring).
                    for i in &st.interfaces {
                        *all.entry(format!("ring-full {}", i.device)).or_insert(0) += i.ring_drops;
                    }
                    if let Some(n) = st.counters.get("conntrack_early_drops") {
                        *all.entry("early drop of half-open".into()).or_insert(0) += n;
                    }
                }
                Ok(all)
            }
            PathKind::Kernel => {
                let ns = s.lab.dispatcher_ns(1);
                let mut all = kernel_conntrack_stats(&ns)?;
                all.extend(kernel_ip_drops(&ns)?);
                Ok(all)
            }
        }
    }

    /// Connections the path tracks now.
    fn state(&self, s: &PathSetup) -> String {
        match s.path {
            PathKind::Dva => unit_stats(&self.prefix, APPLIANCE)
                .map(|units| {
                    let flows: u64 = units
                        .iter()
                        .filter(|(role, _)| role == "dataplane")
                        .map(|(_, st)| st.flows)
                        .sum();
                    format!("{flows} flows tracked")
                })
                .unwrap_or_else(|e| format!("flows unknown ({e})")),
            PathKind::Kernel => {
                let ns = s.lab.dispatcher_ns(1);
                let n = |k| netfilter_sysctl(&ns, k).map_or("?".into(), |v| v.to_string());
                format!(
                    "conntrack {}/{}",
                    n("nf_conntrack_count"),
                    n("nf_conntrack_max")
                )
            }
        }
    }
}

fn web_server() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Lab::server_addr(1)), WEB_PORT)
}

/// The state left and the reasons that grew, largest first (the first three).
fn describe_drops(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
    state: &str,
) -> String {
    let mut grown: Vec<(&str, u64)> = after
        .iter()
        .map(|(k, v)| {
            (
                k.as_str(),
                v.saturating_sub(before.get(k).copied().unwrap_or(0)),
            )
        })
        .filter(|(_, d)| *d > 0)
        .collect();
    grown.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let reasons: Vec<String> = grown
        .iter()
        .take(3)
        .map(|(k, d)| format!("{k} {}", count(*d)))
        .collect();
    if reasons.is_empty() {
        format!("{state}; no drops")
    } else {
        format!("{state}; {}", reasons.join(", "))
    }
}

fn count(n: u64) -> String {
    if n >= 10_000 {
        format!("{:.0}k", n as f64 / 1e3)
    } else {
        n.to_string()
    }
}

/// `cat FILE` in namespace `ns` (/proc/net shows the reader's namespace).
fn read_in_netns(ns: &str, file: &str) -> anyhow::Result<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "cat", file])
        .output()
        .with_context(|| format!("reading {file} in {ns}"))?;
    if !out.status.success() {
        bail!(
            "{file} in {ns}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The kernel's IP drop counters in `ns`: what it drops outside the firewall (a SYN-ACK to a
/// spoofed source has no route back; dva counts the same as `no-route`).
fn kernel_ip_drops(ns: &str) -> anyhow::Result<BTreeMap<String, u64>> {
    let mut text = read_in_netns(ns, "/proc/net/snmp")?;
    text.push_str(&read_in_netns(ns, "/proc/net/netstat")?);
    Ok(parse_proc_net_counters(
        &text,
        &[
            ("IpExt:", "InNoRoutes"),
            ("Ip:", "InAddrErrors"),
            ("Ip:", "InDiscards"),
            ("Ip:", "OutDiscards"),
        ],
    ))
}

/// /proc/net/snmp and /proc/net/netstat hold pairs of lines, `Group: names...` then
/// `Group: values...`; returns the `wanted` (group, name) counters found, as "ip NAME".
fn parse_proc_net_counters(text: &str, wanted: &[(&str, &str)]) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let lines: Vec<&str> = text.lines().collect();
    for pair in lines.chunks(2) {
        let [names, values] = pair else { continue };
        let mut names = names.split_whitespace();
        let mut values = values.split_whitespace();
        let (Some(group), Some(group2)) = (names.next(), values.next()) else {
            continue;
        };
        if group != group2 {
            continue;
        }
        for (name, value) in names.zip(values) {
            if wanted.contains(&(group, name)) {
                if let Ok(v) = value.parse() {
                    out.insert(format!("ip {name}"), v);
                }
            }
        }
    }
    out
}

/// The drop counters of /proc/net/stat/nf_conntrack in `ns` (one line of hex values per CPU
/// under a line of names), summed over the CPUs.
fn kernel_conntrack_stats(ns: &str) -> anyhow::Result<BTreeMap<String, u64>> {
    parse_conntrack_stats(&read_in_netns(ns, "/proc/net/stat/nf_conntrack")?)
}

fn parse_conntrack_stats(text: &str) -> anyhow::Result<BTreeMap<String, u64>> {
    let mut lines = text.lines();
    let names: Vec<&str> = lines
        .next()
        .ok_or_else(|| anyhow!("empty conntrack statistics"))?
        .split_whitespace()
        .collect();
    let mut sums = BTreeMap::new();
    for line in lines {
        for (name, v) in names.iter().zip(line.split_whitespace()) {
            // What is dropped, not what is tracked ("entries" is the table size on every line).
            if matches!(*name, "drop" | "early_drop" | "insert_failed" | "invalid") {
                let v = u64::from_str_radix(v, 16)
                    .with_context(|| format!("conntrack statistic {name} = {v:?}"))?;
                *sums.entry(format!("nf_conntrack {name}")).or_insert(0) += v;
            }
        }
    }
    Ok(sums)
}

/// One probe: when it started and how long it took, or why it failed.
#[derive(Debug)]
struct ProbeResult {
    at: Instant,
    outcome: Result<Duration, String>,
}

/// A new TCP connection to `server`, `GET /` over HTTP/1.0 and the response to its end (the
/// server closes); `timeout` for all of it.
fn probe(server: SocketAddr, timeout: Duration) -> Result<Duration, String> {
    let t = Instant::now();
    let mut s =
        TcpStream::connect_timeout(&server, timeout).map_err(|e| format!("connect: {e}"))?;
    let left = timeout
        .saturating_sub(t.elapsed())
        .max(Duration::from_millis(1));
    s.set_read_timeout(Some(left))
        .and_then(|()| s.set_write_timeout(Some(left)))
        .and_then(|()| s.write_all(b"GET / HTTP/1.0\r\nHost: server1\r\n\r\n"))
        .map_err(|e| format!("request: {e}"))?;
    let mut response = Vec::new();
    s.read_to_end(&mut response)
        .map_err(|e| format!("response: {e}"))?;
    if !response.starts_with(b"HTTP/1.1 200") && !response.starts_with(b"HTTP/1.0 200") {
        let head = String::from_utf8_lossy(&response[..response.len().min(40)]).into_owned();
        return Err(format!("unexpected response {head:?}"));
    }
    if t.elapsed() > timeout {
        return Err(format!("took {:?}", t.elapsed()));
    }
    Ok(t.elapsed())
}

/// Probes `hz` times a second from namespace `ns` until stopped.
struct Prober {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<anyhow::Result<Vec<ProbeResult>>>,
}

impl Prober {
    fn start(ns: &str, server: SocketAddr, hz: u32) -> Prober {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let ns = ns.to_string();
        let thread = std::thread::spawn(move || {
            dva_io::netns::in_netns(&ns, move || {
                let period = Duration::from_secs_f64(1.0 / f64::from(hz));
                let start = Instant::now();
                let mut running = Vec::new();
                let mut i = 0u32;
                while !stopped.load(Ordering::Relaxed) {
                    let due = start + period * i;
                    i += 1;
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let at = Instant::now();
                    // A thread per probe: a probe stuck on a lost SYN must not hold back the
                    // next ones, or the stall would hide from the figures. Threads started here
                    // live in this thread's network namespace.
                    let spawned = std::thread::Builder::new()
                        .name("flood-probe".into())
                        .spawn(move || probe(server, PROBE_TIMEOUT));
                    running.push((at, spawned));
                }
                running
                    .into_iter()
                    .map(|(at, spawned)| ProbeResult {
                        at,
                        outcome: match spawned {
                            Ok(h) => h
                                .join()
                                .unwrap_or_else(|_| Err("probe thread panicked".into())),
                            Err(e) => Err(format!("no thread for the probe: {e}")),
                        },
                    })
                    .collect()
            })
            .map_err(anyhow::Error::from)
        });
        Prober { stop, thread }
    }

    /// Stops probing and returns every probe, once the last one has ended.
    fn stop(self) -> anyhow::Result<Vec<ProbeResult>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow!("the prober panicked"))?
    }
}

fn ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.1}"))
}

const HEADER: [&str; 11] = [
    "path",
    "flood",
    "flood kpps",
    "idle p50 ms",
    "p50 ms",
    "p99 ms",
    "max ms",
    "ok during",
    "ok 1 s after",
    "path CPU %",
    "drops counted (reason), state after the flood",
];

fn render(rows: &[Row], markdown: bool) -> String {
    let lines: Vec<Vec<String>> = rows
        .iter()
        .map(|r| match &r.result {
            Ok(m) => vec![
                r.path.name(),
                r.flood.name().into(),
                format!("{:.0}", m.flood.pps() / 1e3),
                ms(m.idle.percentile(50.0)),
                ms(m.during.percentile(50.0)),
                ms(m.during.percentile(99.0)),
                ms(m.during.latencies_ms.last().copied()),
                m.during.ratio(),
                m.after.ratio(),
                match m.waited_pct {
                    Some(w) => format!(
                        "{:.0} (waited {w:.0}; machine {:.0})",
                        m.path_cpu_pct, m.machine_cpu_pct
                    ),
                    None => format!("{:.0} (machine {:.0})", m.path_cpu_pct, m.machine_cpu_pct),
                },
                m.drops.clone(),
            ],
            Err(e) => {
                let mut l = vec![r.path.name(), r.flood.name().into()];
                l.extend(std::iter::repeat_n("-".to_string(), HEADER.len() - 3));
                l.push(format!("FAILED: {e:#}").replace('\n', " "));
                l
            }
        })
        .collect();
    let mut out = render_table(&HEADER, &lines, |i| (2..10).contains(&i), markdown);
    if !markdown {
        out.push_str(
            "probe: new TCP connection + GET / + close, client -> nginx on server1; p50/p99/max over \
             the probes started during the flood that completed (3 s at most), ok = completed/started.\n\
             path CPU: dva units' user+sys / the kernel's softirq time, over the flood and 1 s after, \
             % of one core; waited: time dva's threads were runnable but had no CPU; machine: all CPUs busy.\n",
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&v, 100.0), Some(100.0));
        assert_eq!(percentile(&[3.0], 99.0), Some(3.0));
        assert_eq!(percentile(&[1.0, 2.0], 50.0), Some(1.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    fn result(at: Instant, ms: Option<u64>) -> ProbeResult {
        ProbeResult {
            at,
            outcome: ms.map(Duration::from_millis).ok_or("refused".to_string()),
        }
    }

    #[test]
    fn a_summary_counts_failures_but_times_only_successes() {
        let now = Instant::now();
        let probes = [
            result(now, Some(30)),
            result(now, None),
            result(now, Some(10)),
        ];
        let s = ProbeSummary::of(probes.iter());
        assert_eq!((s.ok, s.attempted), (2, 3));
        assert_eq!(s.latencies_ms, vec![10.0, 30.0]);
        assert_eq!(s.ratio(), "2/3");
        assert_eq!(s.failures.get("refused"), Some(&1));
    }

    #[test]
    fn drops_show_the_largest_growth_first() {
        let before = BTreeMap::from([("a".to_string(), 5), ("b".to_string(), 0)]);
        let after = BTreeMap::from([
            ("a".to_string(), 7),
            ("b".to_string(), 25_000),
            ("c".to_string(), 0),
        ]);
        assert_eq!(
            describe_drops(&before, &after, "9 flows"),
            "9 flows; b 25k, a 2"
        );
        assert_eq!(describe_drops(&after, &after, "x"), "x; no drops");
    }

    #[test]
    fn kernel_statistics_are_summed_over_cpus() {
        let text = "entries  clashres found new invalid ignore delete chainlength insert insert_failed drop early_drop icmp_error  expect_new\n\
                    00000010  00000000 00000000 00000000 00000001 00000000 00000000 00000000 00000000 00000000 0000000a 00000002 00000000  00000000\n\
                    00000010  00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000006 00000000 00000000  00000000\n";
        let s = parse_conntrack_stats(text).unwrap();
        assert_eq!(s.get("nf_conntrack drop"), Some(&16));
        assert_eq!(s.get("nf_conntrack early_drop"), Some(&2));
        assert_eq!(s.get("nf_conntrack invalid"), Some(&1));
        assert!(!s.contains_key("nf_conntrack entries"));
        assert!(parse_conntrack_stats("").is_err());
        assert!(parse_conntrack_stats("drop\nzz\n").is_err());
    }

    fn row(path: PathKind, flood: FloodKind, pps: u32) -> Row {
        let s = ProbeSummary::default();
        Row {
            path,
            flood,
            result: Ok(Measured {
                flood: FloodReport {
                    sent: pps as usize,
                    elapsed: Duration::from_secs(1),
                },
                idle: s.clone(),
                during: s.clone(),
                after: s,
                drops: String::new(),
                path_cpu_pct: 0.0,
                machine_cpu_pct: 0.0,
                waited_pct: None,
            }),
        }
    }

    #[test]
    fn dva_is_flooded_at_the_rate_the_kernel_path_achieved() {
        let rows = [
            row(PathKind::Kernel, FloodKind::Syn, 23_456),
            row(PathKind::Kernel, FloodKind::Udp, 150_000),
        ];
        assert_eq!(matched_rate(100_000, &rows, FloodKind::Syn), 23_000);
        assert_eq!(matched_rate(0, &rows, FloodKind::Syn), 23_000);
        assert_eq!(matched_rate(100_000, &rows, FloodKind::Udp), 100_000);
        assert_eq!(matched_rate(100_000, &[], FloodKind::Syn), 100_000);
        let kept_up = [row(PathKind::Kernel, FloodKind::Syn, 9_990)];
        assert_eq!(matched_rate(10_000, &kept_up, FloodKind::Syn), 10_000);
    }

    #[test]
    fn ip_counters_are_read_from_their_group() {
        let text = "Ip: Forwarding InAddrErrors InDiscards\nIp: 1 7 3\n\
                    IpExt: InNoRoutes InTruncatedPkts\nIpExt: 42 0\n\
                    Tcp: InAddrErrors\nTcp: 99\n";
        let c = parse_proc_net_counters(text, &[("Ip:", "InAddrErrors"), ("IpExt:", "InNoRoutes")]);
        assert_eq!(c.get("ip InAddrErrors"), Some(&7));
        assert_eq!(c.get("ip InNoRoutes"), Some(&42));
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn the_table_has_both_paths_and_failures_in_place() {
        let now = Instant::now();
        let probes = [result(now, Some(2)), result(now, Some(40))];
        let m = Measured {
            flood: FloodReport {
                sent: 300_000,
                elapsed: Duration::from_secs(3),
            },
            idle: ProbeSummary::of(probes[..1].iter()),
            during: ProbeSummary::of(probes.iter()),
            after: ProbeSummary::of(probes[..1].iter()),
            drops: "conntrack 5/262144; no drops".into(),
            path_cpu_pct: 42.0,
            machine_cpu_pct: 150.0,
            waited_pct: None,
        };
        let rows = vec![
            Row {
                path: PathKind::Kernel,
                flood: FloodKind::Syn,
                result: Ok(m.clone()),
            },
            Row {
                path: PathKind::Dva,
                flood: FloodKind::Syn,
                result: Ok(Measured {
                    waited_pct: Some(61.0),
                    ..m.clone()
                }),
            },
            Row {
                path: PathKind::Dva,
                flood: FloodKind::Udp,
                result: Err(anyhow!("boom")),
            },
        ];
        let t = render(&rows, false);
        assert!(
            t.contains("kernel + nftables fw") && t.contains("dva edge-fw, 2 DP"),
            "{t}"
        );
        assert!(t.contains("100"), "kpps: {t}");
        assert!(t.contains("40.0") && t.contains("2.0"), "p99 and p50: {t}");
        assert!(t.contains("2/2") && t.contains("1/1"), "{t}");
        assert!(t.contains("42 (machine 150)"), "{t}");
        assert!(t.contains("42 (waited 61; machine 150)"), "{t}");
        assert!(t.contains("FAILED: boom"), "{t}");
        let md = render(&rows, true);
        assert_eq!(md.lines().count(), 5, "{md}");
        assert!(md.lines().all(|l| l.starts_with('|')), "{md}");
    }
}
