//! `dva bench compare`: dva against what the Linux kernel and HAProxy do with the same traffic,
//! in one lab and one run, printed as one table.
//!
//! Paths, all through the lab's dispatcher host `{P}disp1`:
//! - **kernel + nftables firewall** (the baseline of the firewall workloads): `{P}disp1` made a
//!   plain router ([`Lab::set_kernel_router`]) with a ruleset equivalent to
//!   `examples/edge-firewall.yaml`: `ct state established,related accept`, `ct state invalid
//!   drop`, outside → 198.18.2.0/24 TCP 80/5201 (SYN) and ICMP echo, inside → anything, default
//!   drop;
//! - **dva edge-fw with 1 and 2 data planes**: `dva run` as a child, as `dva bench forwarding`
//!   starts it;
//! - **kernel nftables DNAT load balancer** (the baseline of the load-balancing workload): a VIP
//!   198.18.1.100:80 (an address on the router's outside interface, so the client reaches it
//!   on-link) DNAT'd round-robin (`numgen inc mod 3`) to nginx on server1..3;
//! - **HAProxy** in TCP mode on the same VIP in the same namespace, round-robin to the same
//!   nginx servers.
//!
//! Workloads: iperf3 TCP client → server1 (1 and 8 streams); 60-byte UDP frames over 16 flows,
//! server1 → client (the edge firewall lets anything out but no UDP in), received packets/s;
//! new TCP connections/s with wrk and `Connection: close` (client → nginx on server1 through
//! the firewalls, client → VIP for the load balancers).
//!
//! CPU per packet: the frames the dispatcher host sent on (tx of `out0` + `in0`: what was
//! forwarded, both directions, on every path) against (1) the path's own CPU time: user+sys of the dva units
//! (`/proc/PID/stat`), of HAProxy, or for the kernel paths the softirq time of all CPUs
//! (`/proc/stat`), where forwarding runs, though that also counts the endpoints' receive
//! processing; and (2) the whole machine's busy time (all CPUs, all processes: the load
//! generators and servers too), the one figure measured the same way on every path.
//!
//! Each path starts on a freshly built lab: a kernel connection table or TIME_WAIT sockets left
//! by the previous path (the same client ports to the same servers within 120 s) would clash
//! with the next path's connections and cost it SYN retransmissions.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use dva_lab::apps::{self, Haproxy, Iperf3Server, NftTable, Nginx, UdpGenOptions, UdpSink};
use dva_lab::{Lab, LabSpec};
use dva_proto::spec::{DriverSpec, RuntimeSpec};

use crate::bench_lab::{
    conntrack_count, machine_cpu, render_table, unit_pids, Appliance, PathCpu, NFT_EDGE_FIREWALL,
};
use crate::demo::{spec_path, LabGuard};

pub struct Options {
    /// Lab prefix (the lab is built for the run and removed afterwards).
    pub prefix: String,
    /// Seconds per measurement (there are 14 of them).
    pub secs: u32,
    /// Also print the table as Markdown (what docs/PERFORMANCE.md holds).
    pub markdown: bool,
    /// Also draw the ratios into this SVG file (docs/performance.svg).
    pub svg: Option<std::path::PathBuf>,
    /// The dva rows' runtime section (driver, backplane); rows that compare drivers set their own.
    pub runtime: RuntimeSpec,
}

/// The address the load balancers serve, on the router's outside interface.
const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 100);
const IPERF_PORT: u16 = 5201;
const UDP_PORT: u16 = 9000;
const UDP_FLOWS: usize = 16;
/// 18 bytes of UDP payload: 60-byte frames, 64 on a wire with the FCS.
const UDP_PAYLOAD: usize = 18;
const WRK_THREADS: u32 = 2;
const WRK_CONNECTIONS: u32 = 64;

fn nft_load_balancer(backends: &[Ipv4Addr]) -> String {
    let map: Vec<String> = backends
        .iter()
        .enumerate()
        .map(|(i, b)| format!("{i} : {b}"))
        .collect();
    format!(
        "    chain prerouting {{\n        type nat hook prerouting priority dstnat; policy accept;\n        \
         ip daddr {VIP} tcp dport 80 dnat to numgen inc mod {} map {{ {} }}\n    }}",
        backends.len(),
        map.join(", ")
    )
}

/// Frames and bytes the dispatcher host sent on out0 and in0: the forwarded ones, both
/// directions.
fn router_tx(ns: &str) -> anyhow::Result<(u64, u64)> {
    let (mut frames, mut bytes) = (0, 0);
    for dev in ["out0", "in0"] {
        let out = Command::new("ip")
            .args(["-n", ns, "-s", "-j", "link", "show", "dev", dev])
            .output()
            .context("running ip -s link")?;
        if !out.status.success() {
            bail!(
                "ip -n {ns} -s link show dev {dev}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let counter = |what: &str| {
            v.pointer(&format!("/0/stats64/tx/{what}"))
                .and_then(serde_json::Value::as_u64)
                .ok_or_else(|| anyhow!("no tx {what} counter for {dev} in {ns}"))
        };
        frames += counter("packets")?;
        bytes += counter("bytes")?;
    }
    Ok((frames, bytes))
}

#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    frames: u64,
    /// Bytes of those frames (Ethernet header included).
    bytes: u64,
    path_cpu_s: f64,
    machine_cpu_s: f64,
}

/// Runs `f`, returning its result and the frames and CPU time spent meanwhile.
fn measured<T>(
    router_ns: &str,
    cpu: &PathCpu,
    f: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<(T, Usage)> {
    let (frames0, bytes0) = router_tx(router_ns)?;
    let (busy0, soft0) = machine_cpu()?;
    let path0 = cpu.read(soft0);
    let r = f()?;
    let (busy1, soft1) = machine_cpu()?;
    let path1 = cpu.read(soft1);
    let (frames1, bytes1) = router_tx(router_ns)?;
    Ok((
        r,
        Usage {
            frames: frames1.saturating_sub(frames0),
            bytes: bytes1.saturating_sub(bytes0),
            path_cpu_s: path1 - path0,
            machine_cpu_s: busy1 - busy0,
        },
    ))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Workload {
    Tcp1,
    Tcp8,
    UdpPps,
    ConnPerSec,
    LbConnPerSec,
    /// TCP with the lab's offloads on (a Linux host's defaults): 64 KB super-packets.
    Tcp1Offload,
    Tcp8Offload,
}

/// TCP with the lab's offloads on.
const OFFLOAD_WORKLOADS: [Workload; 2] = [Workload::Tcp1Offload, Workload::Tcp8Offload];

/// What runs on the firewall paths (the kernel's and dva's).
const FIREWALL_WORKLOADS: [Workload; 4] = [
    Workload::Tcp1,
    Workload::Tcp8,
    Workload::UdpPps,
    Workload::ConnPerSec,
];

impl Workload {
    const ALL: [Workload; 7] = [
        Workload::Tcp1,
        Workload::Tcp8,
        Workload::UdpPps,
        Workload::ConnPerSec,
        Workload::LbConnPerSec,
        Workload::Tcp1Offload,
        Workload::Tcp8Offload,
    ];

    /// Measured with super-packets: the frame counters count those, so CPU is shown per GB.
    fn offloaded(self) -> bool {
        matches!(self, Workload::Tcp1Offload | Workload::Tcp8Offload)
    }

    fn name(self) -> &'static str {
        match self {
            Workload::Tcp1 => "TCP throughput, 1 stream (iperf3)",
            Workload::Tcp8 => "TCP throughput, 8 streams (iperf3)",
            Workload::UdpPps => "UDP 60-byte frames, 16 flows, received",
            Workload::ConnPerSec => "new TCP conn/s to server1 (wrk, close)",
            Workload::LbConnPerSec => "new TCP conn/s via VIP to 3 nginx (wrk)",
            Workload::Tcp1Offload => "TCP, 1 stream, offloads on (iperf3)",
            Workload::Tcp8Offload => "TCP, 8 streams, offloads on (iperf3)",
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Workload::Tcp1 | Workload::Tcp8 | Workload::Tcp1Offload | Workload::Tcp8Offload => {
                "Gbit/s"
            }
            Workload::UdpPps => "kpps",
            Workload::ConnPerSec | Workload::LbConnPerSec => "conn/s",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PathKind {
    KernelFirewall,
    Dva(u32),
    KernelLb,
    DvaLb(u32),
    Haproxy,
    /// dva with the AF_PACKET driver and GSO super-packets (offloads on): data planes,
    /// dispatcher threads (lanes) and threads per data plane.
    DvaGso(u32, u16, u16),
    /// dva with the default driver (AF_XDP) and the lab's offloads on: wire-sized frames, the
    /// peers' partial checksums completed by the dispatcher.
    DvaXdpOffload(u32),
    /// dva edge-fw with AF_XDP and dispatcher threads on veths with that many queues, and
    /// threads per data plane.
    DvaXdpLanes(u32, u16, u16),
}

impl PathKind {
    fn name(self) -> String {
        match self {
            PathKind::KernelFirewall => "kernel + nftables fw".into(),
            PathKind::Dva(n) => format!("dva edge-fw, {n} DP"),
            PathKind::KernelLb => "kernel nftables DNAT LB".into(),
            PathKind::DvaLb(n) => format!("dva web-lb, {n} DP"),
            PathKind::Haproxy => "HAProxy 2.x, TCP mode".into(),
            PathKind::DvaGso(n, 1, 1) => format!("dva edge-fw, {n} DP, AF_PACKET+GSO"),
            PathKind::DvaGso(n, t, 1) => {
                format!("dva edge-fw, {n} DP, AF_PACKET+GSO, {t} disp. threads")
            }
            PathKind::DvaGso(n, t, d) => {
                format!("dva edge-fw, {n} DP, AF_PACKET+GSO, {t} disp. threads, {d} DP threads")
            }
            PathKind::DvaXdpOffload(n) => format!("dva edge-fw, {n} DP, AF_XDP"),
            PathKind::DvaXdpLanes(n, t, 1) => {
                format!("dva edge-fw, {n} DP, AF_XDP, {t} disp. threads, {t}-queue veths")
            }
            PathKind::DvaXdpLanes(n, t, d) => format!(
                "dva edge-fw, {n} DP, AF_XDP, {t} disp. threads, {t}-queue veths, {d} DP threads"
            ),
        }
    }

    fn is_baseline(self) -> bool {
        matches!(self, PathKind::KernelFirewall | PathKind::KernelLb)
    }
}

struct Row {
    workload: Workload,
    path: PathKind,
    result: anyhow::Result<(f64, Usage)>,
    note: String,
}

/// The lab's servers and the measurements that need them.
struct Bench {
    lab: Lab,
    secs: u32,
    rows: Vec<Row>,
}

/// The servers every path is measured against; dropping them stops them.
struct Servers {
    _nginx: Vec<Nginx>,
    _iperf3: Iperf3Server,
}

/// Removes the lab (if any) and builds it again, with nginx on every server and iperf3 on
/// server1: no connection state survives from the path measured before.
fn fresh_lab(prefix: &str) -> anyhow::Result<(Lab, Servers)> {
    Lab::down(prefix)?;
    let lab = Lab::up(&LabSpec {
        prefix: prefix.to_string(),
        servers: 3,
        hosts: 2,
        dispatchers: 1,
        control: false,
    })?;
    let mut nginx = Vec::new();
    for k in 1..=lab.servers {
        nginx.push(Nginx::start(
            &lab.server_ns(k),
            &[80],
            &format!("hello from server{k}\n"),
        )?);
    }
    let iperf3 = Iperf3Server::start(&lab.server_ns(1), IPERF_PORT)?;
    Ok((
        lab,
        Servers {
            _nginx: nginx,
            _iperf3: iperf3,
        },
    ))
}

impl Bench {
    fn router(&self) -> String {
        self.lab.dispatcher_ns(1)
    }

    fn record(
        &mut self,
        workload: Workload,
        path: PathKind,
        cpu: &PathCpu,
        f: impl FnOnce() -> anyhow::Result<(f64, String)>,
    ) {
        print!("  {:<42} {:<26} ", workload.name(), path.name());
        let _ = std::io::Write::flush(&mut std::io::stdout());
        let mut note = String::new();
        let result = measured(&self.router(), cpu, f).map(|((v, n), u)| {
            note = n;
            (v, u)
        });
        if matches!(path, PathKind::KernelFirewall | PathKind::KernelLb) {
            if let Some(n) = conntrack_count(&self.router()) {
                note = format!("{note}; conntrack {n} entries");
            }
        }
        match &result {
            Ok((v, _)) => println!("{v:>10.2} {}", workload.unit()),
            Err(e) => println!("FAILED: {e:#}"),
        }
        self.rows.push(Row {
            workload,
            path,
            result,
            note,
        });
    }

    /// Rows for measurements that could not run at all (their path failed to start).
    fn not_run(&mut self, workloads: &[Workload], path: PathKind, why: &anyhow::Error) {
        for &workload in workloads {
            if !self
                .rows
                .iter()
                .any(|r| r.workload == workload && r.path == path)
            {
                self.rows.push(Row {
                    workload,
                    path,
                    result: Err(anyhow!("not run: {why:#}")),
                    note: String::new(),
                });
            }
        }
    }

    /// iperf3 with 1 and 8 streams, client -> server1, as workloads `w`.
    fn tcp_workloads(&mut self, w: [Workload; 2], path: PathKind, cpu: &PathCpu) {
        let client = self.lab.client_ns();
        let s1 = IpAddr::V4(Lab::server_addr(1));
        let secs = self.secs;
        for (w, streams) in [(w[0], 1), (w[1], 8)] {
            self.record(w, path, cpu, || {
                let r = apps::iperf3_client(&client, s1, IPERF_PORT, secs, streams, false, None)?;
                Ok((
                    r.received_bps / 1e9,
                    format!("{} retransmits", r.retransmits),
                ))
            });
        }
    }

    /// The firewall workloads (iperf3 1 and 8 streams, UDP packets/s, new connections/s) on the
    /// path that is set up now.
    fn firewall_workloads(&mut self, path: PathKind, cpu: &PathCpu) {
        let client = self.lab.client_ns();
        let server1 = self.lab.server_ns(1);
        let s1 = IpAddr::V4(Lab::server_addr(1));
        let secs = self.secs;
        self.tcp_workloads([Workload::Tcp1, Workload::Tcp8], path, cpu);
        self.record(Workload::UdpPps, path, cpu, || {
            let sink = UdpSink::start(&client, UDP_PORT)?;
            let before = sink.received();
            let gen = apps::udpgen(
                &server1,
                &UdpGenOptions {
                    dst: SocketAddr::new(IpAddr::V4(Lab::client_addr()), UDP_PORT),
                    flows: UDP_FLOWS,
                    payload: UDP_PAYLOAD,
                    duration: Duration::from_secs(u64::from(secs)),
                    rate: None,
                },
            )?;
            // Let the datagrams still queued on the path arrive.
            std::thread::sleep(Duration::from_millis(500));
            let received = sink.received() - before;
            let secs = gen.elapsed.as_secs_f64();
            Ok((
                received as f64 / secs / 1e3,
                format!(
                    "sent {:.0} kpps, {:.1}% arrived",
                    gen.sent_pps() / 1e3,
                    100.0 * received as f64 / gen.sent.max(1) as f64
                ),
            ))
        });
        let url = format!("http://{s1}/");
        self.record(Workload::ConnPerSec, path, cpu, || {
            wrk_close(&client, &url, secs)
        });
    }
}

fn wrk_close(ns: &str, url: &str, secs: u32) -> anyhow::Result<(f64, String)> {
    let r = apps::wrk(ns, url, WRK_THREADS, WRK_CONNECTIONS, secs, true)?;
    if r.requests == 0 {
        bail!("wrk completed no request ({} errors)", r.errors());
    }
    Ok((
        r.requests_per_sec,
        format!(
            "{} errors, latency avg {:.0} us",
            r.errors(),
            r.latency_avg_us
        ),
    ))
}

/// `ip -n NS ADDR-COMMAND`.
fn ip_addr(ns: &str, verb: &str, addr: &str, dev: &str) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(["-n", ns, "addr", verb, addr, "dev", dev])
        .output()
        .context("running ip addr")?;
    if !out.status.success() {
        bail!(
            "ip -n {ns} addr {verb} {addr} dev {dev}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    if opts.secs == 0 {
        bail!("--secs must be at least 1");
    }
    let spec = spec_path("edge-firewall.yaml")?;
    // The rows that compare drivers: the runtime asked for, with their driver.
    let with_driver = |driver| RuntimeSpec {
        driver,
        ..opts.runtime.clone()
    };
    println!(
        "lab {}: client, 3 servers (nginx, iperf3 on server1), dispatcher host, 2 data-plane hosts, \
         rebuilt before each path; {} s per measurement; offloads off on every veth (see README)",
        opts.prefix, opts.secs
    );
    let _lab_guard = LabGuard(opts.prefix.clone());
    let (lab, servers) = fresh_lab(&opts.prefix)?;
    let router = lab.dispatcher_ns(1);
    let mut bench = Bench {
        lab,
        secs: opts.secs,
        rows: Vec::new(),
    };

    println!("\nkernel router + nftables firewall (table inet dva_bench_fw in {router})");
    bench.lab.set_kernel_router(true)?;
    match NftTable::load(&router, "inet", "dva_bench_fw", NFT_EDGE_FIREWALL) {
        Ok(fw) => {
            bench.firewall_workloads(PathKind::KernelFirewall, &PathCpu::Softirq);
            println!("  (offloads on)");
            match bench.lab.set_offloads(true) {
                Ok(()) => bench.tcp_workloads(
                    [Workload::Tcp1Offload, Workload::Tcp8Offload],
                    PathKind::KernelFirewall,
                    &PathCpu::Softirq,
                ),
                Err(e) => {
                    let e = anyhow::Error::from(e);
                    bench.not_run(&OFFLOAD_WORKLOADS, PathKind::KernelFirewall, &e);
                }
            }
            drop(fw);
        }
        Err(e) => {
            println!("  FAILED: {e}");
            let e = anyhow::Error::from(e);
            bench.not_run(&FIREWALL_WORKLOADS, PathKind::KernelFirewall, &e);
            bench.not_run(&OFFLOAD_WORKLOADS, PathKind::KernelFirewall, &e);
        }
    }
    drop(servers);

    // The kernel's DNAT load balancer and HAProxy each on a lab of their own, like every other
    // path: one after the other in one lab, the second would meet the first's client ports in
    // TIME_WAIT and its connection-tracking entries.
    println!("\nkernel nftables DNAT load balancer (table ip dva_bench_lb in {router})");
    lb_baseline(&mut bench, opts, PathKind::KernelLb, |router, backends| {
        let table = NftTable::load(router, "ip", "dva_bench_lb", &nft_load_balancer(backends))?;
        Ok((table, PathCpu::Softirq))
    });
    println!("\nHAProxy in {router}");
    lb_baseline(&mut bench, opts, PathKind::Haproxy, |router, backends| {
        let backends: Vec<SocketAddr> = backends
            .iter()
            .map(|b| SocketAddr::new(IpAddr::V4(*b), 80))
            .collect();
        let proxy = Haproxy::start(router, SocketAddr::new(IpAddr::V4(VIP), 80), &backends, 0)?;
        let cpu = PathCpu::Processes(vec![proxy.pid()]);
        Ok((proxy, cpu))
    });

    for dps in [1u32, 2] {
        println!("\ndva run -f examples/edge-firewall.yaml --dataplanes {dps}");
        let path = PathKind::Dva(dps);
        dva_path(
            &mut bench,
            opts,
            &spec,
            "edge-fw",
            dps,
            false,
            &opts.runtime,
            path,
            &FIREWALL_WORKLOADS,
            |b, cpu| b.firewall_workloads(path, cpu),
        )?;
    }

    // The scaling figure for small packets and new connections: AF_XDP with two dispatcher
    // threads, each on a receive queue of its own, against the one-thread row above; then the
    // data plane on two threads as well.
    for dp_threads in [1u16, 2] {
        println!(
            "\ndva run -f examples/edge-firewall.yaml --dataplanes 1 (driver: af_xdp, dispatcher_threads: 2, dataplane_threads: {dp_threads}), 2-queue veths"
        );
        let path = PathKind::DvaXdpLanes(1, 2, dp_threads);
        dva_path(
            &mut bench,
            opts,
            &spec,
            "edge-fw",
            1,
            false,
            &RuntimeSpec {
                dispatcher_threads: Some(2),
                dataplane_threads: Some(dp_threads),
                ..with_driver(DriverSpec::AfXdp)
            },
            path,
            &FIREWALL_WORKLOADS,
            |b, cpu| b.firewall_workloads(path, cpu),
        )?;
    }

    // TCP with offloads on: the AF_PACKET driver reads and writes super-packets (AF_XDP
    // cannot: XDP on a veth turns its peer's segmentation off).
    for dps in [1u32, 2] {
        println!(
            "\ndva run -f examples/edge-firewall.yaml --dataplanes {dps} (driver: af_packet), offloads on"
        );
        let path = PathKind::DvaGso(dps, 1, 1);
        dva_path(
            &mut bench,
            opts,
            &spec,
            "edge-fw",
            dps,
            true,
            &with_driver(DriverSpec::AfPacket),
            path,
            &OFFLOAD_WORKLOADS,
            |b, cpu| b.tcp_workloads(OFFLOAD_WORKLOADS, path, cpu),
        )?;
    }

    // The scaling figure: the dispatcher on two data-path threads (AF_PACKET fanout), against
    // the one-thread row above; then the data plane on two threads as well.
    for dp_threads in [1u16, 2] {
        println!(
            "\ndva run -f examples/edge-firewall.yaml --dataplanes 1 (driver: af_packet, dispatcher_threads: 2, dataplane_threads: {dp_threads}), offloads on"
        );
        let path = PathKind::DvaGso(1, 2, dp_threads);
        dva_path(
            &mut bench,
            opts,
            &spec,
            "edge-fw",
            1,
            true,
            &RuntimeSpec {
                dispatcher_threads: Some(2),
                dataplane_threads: Some(dp_threads),
                ..with_driver(DriverSpec::AfPacket)
            },
            path,
            &OFFLOAD_WORKLOADS,
            |b, cpu| b.tcp_workloads(OFFLOAD_WORKLOADS, path, cpu),
        )?;
    }

    // The default driver in the same setting: AF_XDP on veths whose peers keep offloads on.
    println!("\ndva run -f examples/edge-firewall.yaml --dataplanes 1 (AF_XDP), offloads on");
    let path = PathKind::DvaXdpOffload(1);
    dva_path(
        &mut bench,
        opts,
        &spec,
        "edge-fw",
        1,
        true,
        &with_driver(DriverSpec::AfXdp),
        path,
        &OFFLOAD_WORKLOADS,
        |b, cpu| b.tcp_workloads(OFFLOAD_WORKLOADS, path, cpu),
    )?;

    // dva as the load balancer: the web-lb example (firewall -> LB, full NAT, health checks) in
    // front of the same three nginx.
    let lb_spec = spec_path("web-lb.yaml")?;
    for dps in [1u32, 2] {
        println!("\ndva run -f examples/web-lb.yaml --dataplanes {dps}");
        let path = PathKind::DvaLb(dps);
        dva_path(
            &mut bench,
            opts,
            &lb_spec,
            "web-lb",
            dps,
            false,
            &opts.runtime,
            path,
            &[Workload::LbConnPerSec],
            |b, cpu| {
                let client = b.lab.client_ns();
                let url = format!("http://{VIP}/");
                b.record(Workload::LbConnPerSec, path, cpu, || {
                    wrk_close(&client, &url, opts.secs)
                });
            },
        )?;
    }

    let table = render(&bench.rows, opts.secs, false);
    println!("\n{table}");
    if opts.markdown {
        println!("{}", render(&bench.rows, opts.secs, true));
    }
    if let Some(path) = &opts.svg {
        std::fs::write(path, chart(&bench.rows))
            .with_context(|| format!("writing {}", path.display()))?;
        println!("chart: {}", path.display());
    }
    let failed = bench.rows.iter().filter(|r| r.result.is_err()).count();
    if failed > 0 {
        bail!("{failed} measurement(s) failed (see the table)");
    }
    Ok(())
}

/// One load-balancer baseline on a fresh lab: the dispatcher host a kernel router with the VIP on
/// its outside interface, `start` sets the balancer up there (given the router's namespace and
/// the backends; what it returns is kept running while measured) and says whose CPU is the
/// path's, then wrk against the VIP. A path that fails becomes a "not run" row.
fn lb_baseline<Running>(
    bench: &mut Bench,
    opts: &Options,
    path: PathKind,
    start: impl FnOnce(&str, &[Ipv4Addr]) -> anyhow::Result<(Running, PathCpu)>,
) {
    let measured = (|| -> anyhow::Result<Servers> {
        let (lab, servers) = fresh_lab(&opts.prefix)?;
        bench.lab = lab;
        bench.lab.set_kernel_router(true)?;
        let router = bench.router();
        ip_addr(&router, "replace", &format!("{VIP}/32"), "out0")?;
        let backends: Vec<Ipv4Addr> = (1..=bench.lab.servers).map(Lab::server_addr).collect();
        let (_running, cpu) = start(&router, &backends)?;
        let client = bench.lab.client_ns();
        let url = format!("http://{VIP}/");
        bench.record(Workload::LbConnPerSec, path, &cpu, || {
            wrk_close(&client, &url, opts.secs)
        });
        Ok(servers)
    })();
    if let Err(e) = &measured {
        println!("  FAILED: {e:#}");
        bench.not_run(&[Workload::LbConnPerSec], path, e);
    }
}

/// One dva path: a fresh lab (its offloads on if asked), `dva run` of `spec` with `runtime` as
/// its runtime section, then `measure` with the units' CPU as the path's. A path that does not start becomes
/// "not run" rows for `workloads`; only a lab that cannot be built stops the bench.
#[allow(clippy::too_many_arguments)]
fn dva_path(
    bench: &mut Bench,
    opts: &Options,
    spec: &Path,
    appliance: &str,
    dps: u32,
    offloads: bool,
    runtime: &RuntimeSpec,
    path: PathKind,
    workloads: &[Workload],
    measure: impl FnOnce(&mut Bench, &PathCpu),
) -> anyhow::Result<()> {
    let (lab, servers) = fresh_lab(&opts.prefix)?;
    bench.lab = lab;
    // Dispatcher lanes on AF_XDP take a receive queue each.
    let queues = match path {
        PathKind::DvaXdpLanes(_, t, _) => u32::from(t),
        _ => 1,
    };
    let started = if offloads {
        bench.lab.set_offloads(true).map_err(anyhow::Error::from)
    } else {
        Ok(())
    }
    .and_then(|()| {
        if queues > 1 {
            bench.lab.set_queues(queues).map_err(anyhow::Error::from)
        } else {
            Ok(())
        }
    })
    .and_then(|()| Appliance::start_with(spec, &opts.prefix, dps, runtime));
    let app = match started {
        Ok(a) => a,
        Err(e) => {
            println!("  FAILED to start: {e:#}");
            bench.not_run(workloads, path, &e);
            return Ok(());
        }
    };
    let cpu = match unit_pids(&opts.prefix, appliance) {
        Ok(p) => PathCpu::Processes(p),
        Err(e) => {
            println!("  cannot read the units' pids ({e:#}); path CPU will read 0");
            PathCpu::Processes(Vec::new())
        }
    };
    measure(bench, &cpu);
    drop(app);
    drop(servers);
    Ok(())
}

/// CPU seconds per million frames, or "-" when there were too few frames to say.
fn per_mpkt(cpu_s: f64, frames: u64) -> String {
    if frames < 1000 {
        return "-".into();
    }
    format!("{:.2}", cpu_s / (frames as f64 / 1e6))
}

/// CPU seconds per GB forwarded (10^9 bytes on the wire, Ethernet headers included), or "-"
/// when less than a megabyte crossed.
fn per_gb(cpu_s: f64, bytes: u64) -> String {
    if bytes < 1_000_000 {
        return "-".into();
    }
    format!("{:.2}", cpu_s / (bytes as f64 / 1e9))
}

/// The ratios to each workload's baseline as bars (`--svg`).
fn chart(rows: &[Row]) -> String {
    let mut bars = Vec::new();
    for w in Workload::ALL {
        let base = rows
            .iter()
            .find(|r| r.workload == w && r.path.is_baseline())
            .and_then(|r| r.result.as_ref().ok())
            .map(|(v, _)| *v)
            .filter(|b| *b > 0.0);
        for r in rows.iter().filter(|r| r.workload == w) {
            let ratio = match (&r.result, base) {
                (Ok((v, _)), Some(b)) => v / b,
                _ => f64::NAN,
            };
            bars.push(crate::chart::Bar {
                group: w.name().to_string(),
                label: r.path.name(),
                ratio,
                baseline: r.path.is_baseline(),
            });
        }
    }
    crate::chart::ratio_bars(
        &format!(
            "dva bench compare: result / the kernel's ({} cores)",
            crate::bench_elasticity::num_cpus()
        ),
        &bars,
    )
}

fn render(rows: &[Row], secs: u32, markdown: bool) -> String {
    let header = [
        "workload",
        "path",
        "result",
        "vs kernel",
        "path CPU s/Mpkt",
        "machine CPU s/Mpkt",
        "path CPU s/GB",
        "machine CPU s/GB",
        "frames/s",
        "notes",
    ];
    let mut lines: Vec<[String; 10]> = Vec::new();
    for w in Workload::ALL {
        let base = rows
            .iter()
            .find(|r| r.workload == w && r.path.is_baseline())
            .and_then(|r| r.result.as_ref().ok())
            .map(|(v, _)| *v);
        for r in rows.iter().filter(|r| r.workload == w) {
            let cells = match &r.result {
                Ok((v, u)) => [
                    w.name().to_string(),
                    r.path.name(),
                    format!("{v:.2} {}", w.unit()),
                    base.filter(|b| *b > 0.0)
                        .map_or("-".into(), |b| format!("{:.2}x", v / b)),
                    per_mpkt(u.path_cpu_s, u.frames),
                    per_mpkt(u.machine_cpu_s, u.frames),
                    per_gb(u.path_cpu_s, u.bytes),
                    per_gb(u.machine_cpu_s, u.bytes),
                    format!("{:.0}k", u.frames as f64 / f64::from(secs) / 1e3),
                    if w.offloaded() {
                        // Frames here are super-packets of any size: CPU per GB compares.
                        let frames = if matches!(r.path, PathKind::DvaXdpOffload(_)) {
                            "wire-sized frames"
                        } else {
                            "frames are super-packets"
                        };
                        format!("{}; {frames}", r.note)
                    } else {
                        r.note.clone()
                    },
                ],
                Err(e) => [
                    w.name().to_string(),
                    r.path.name(),
                    "FAILED".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    format!("{e:#}").replace('\n', " "),
                ],
            };
            lines.push(cells);
        }
    }
    let lines: Vec<Vec<String>> = lines.into_iter().map(Vec::from).collect();
    let figures = |i: usize| (2..9).contains(&i);
    if markdown {
        return render_table(&header, &lines, figures, true);
    }
    let mut out = render_table(&header, &lines, figures, false);
    let _ = writeln!(
        out,
        "vs kernel: against kernel + nftables fw (firewall workloads) or the nftables DNAT LB (VIP workload).\n\
         path CPU: dva units' user+sys / HAProxy's user+sys / the kernel's softirq time (all CPUs, endpoints' receive work included);\n\
         machine CPU: busy time of all CPUs (load generators and servers included); per million frames and per GB forwarded (sent, both directions) by the dispatcher host."
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_load_balancer_maps_every_backend() {
        let lb = nft_load_balancer(&[Ipv4Addr::new(198, 18, 2, 2), Ipv4Addr::new(198, 18, 2, 3)]);
        assert!(lb.contains("numgen inc mod 2 map { 0 : 198.18.2.2, 1 : 198.18.2.3 }"));
        assert!(lb.contains("ip daddr 198.18.1.100 tcp dport 80"));
    }

    #[test]
    fn the_table_compares_each_workload_with_its_own_baseline() {
        let u = Usage {
            frames: 2_000_000,
            bytes: 5_000_000_000,
            path_cpu_s: 1.0,
            machine_cpu_s: 4.0,
        };
        let rows = vec![
            Row {
                workload: Workload::Tcp1,
                path: PathKind::KernelFirewall,
                result: Ok((10.0, u)),
                note: String::new(),
            },
            Row {
                workload: Workload::Tcp1,
                path: PathKind::Dva(1),
                result: Ok((2.5, u)),
                note: "n".into(),
            },
            Row {
                workload: Workload::LbConnPerSec,
                path: PathKind::Haproxy,
                result: Err(anyhow!("boom")),
                note: String::new(),
            },
        ];
        let t = render(&rows, 10, false);
        assert!(t.contains("0.25x"), "{t}");
        assert!(t.contains("1.00x"), "{t}");
        assert!(t.contains("0.50"), "path CPU per Mpkt: {t}");
        assert!(t.contains("2.00"), "machine CPU per Mpkt: {t}");
        assert!(t.contains("200k"), "frames/s: {t}");
        assert!(t.contains("0.20") && t.contains("0.80"), "CPU per GB: {t}");
        assert!(t.contains("FAILED") && t.contains("boom"), "{t}");
        let md = render(&rows, 10, true);
        assert!(md.lines().all(|l| l.starts_with('|')), "{md}");
    }

    #[test]
    fn per_mpkt_needs_enough_frames() {
        assert_eq!(per_mpkt(1.0, 10), "-");
        assert_eq!(per_mpkt(1.0, 1_000_000), "1.00");
        assert_eq!(per_gb(1.0, 1000), "-");
        assert_eq!(per_gb(3.0, 2_000_000_000), "1.50");
    }
}
