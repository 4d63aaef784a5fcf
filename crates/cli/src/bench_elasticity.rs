//! `dva bench elasticity`: how much a scale event disturbs traffic. In the lab, long-lived TCP
//! connections (every byte checked), short HTTP connections (wrk, `Connection: close`) and paced
//! UDP echo streams (sequence numbers, round-trip times) run while the appliance goes 1 -> 4 -> 1
//! data planes, first by hand (several cycles), then by its autoscaling policy. It prints flows
//! broken, HTTP errors, UDP datagrams lost and reordered, the largest latency added during the
//! run, and how long each scale-in took; `--plot FILE` draws data planes and packet rate over time
//! as an SVG.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use dva_lab::apps::{self, Nginx, StreamServer, UdpEchoServer};
use dva_lab::{Lab, LabSpec};
use dva_mgmt::{ApplianceStatus, ApplianceView, Mgmt, MgmtOptions, ScaleRequest, UnitRole};

pub struct Options {
    pub prefix: String,
    pub cycles: u32,
    pub plot: Option<PathBuf>,
}

/// One point of the timeline.
#[derive(Clone, Copy, Debug)]
struct Sample {
    t: f64,
    desired: u32,
    ready: u32,
    draining: u32,
    pps: f64,
}

#[derive(Debug, Default)]
pub(crate) struct PhaseResult {
    pub(crate) name: String,
    pub(crate) events: String,
    pub(crate) tcp_total: usize,
    pub(crate) tcp_broken: usize,
    pub(crate) http_requests: u64,
    pub(crate) http_errors: u64,
    pub(crate) udp_sent: u64,
    pub(crate) udp_lost: u64,
    pub(crate) udp_reordered: u64,
    pub(crate) rtt_p50_us: u64,
    pub(crate) rtt_max_us: u64,
    pub(crate) scale_ins: Vec<Duration>,
    /// What went wrong with each broken TCP connection.
    pub(crate) broken_detail: Vec<String>,
}

pub(crate) fn spec(autoscale: bool) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(crate::demo::spec_path("edge-firewall.yaml")?)?;
    let mut out = text.replacen(
        "          - name: ping-in",
        "          - name: udp-echo-in\n            from: outside\n            dst: 198.18.2.0/24\n            proto: udp\n            dport: 5300\n            action: accept\n          - name: ping-in",
        1,
    );
    let layout = if autoscale {
        "    dataplanes: { min: 1, initial: 1, max: 4 }\n    buckets: 4096\n    drain_deadline: 2s\n    autoscale:\n      scale_out: [{ metric: pps, above: 1500, for: 2s }]\n      scale_in: [{ metric: pps, below: 400, for: 3s }]\n      cooldown: 4s"
    } else {
        "    dataplanes: { min: 1, initial: 1, max: 4 }\n    buckets: 4096\n    drain_deadline: 2s"
    };
    out = out.replacen(
        "    dataplanes: { min: 1, initial: 2, max: 8 }\n    buckets: 4096",
        layout,
        1,
    );
    if !out.contains("udp-echo-in") || !out.contains("drain_deadline") {
        bail!("examples/edge-firewall.yaml changed shape; the benchmark cannot derive its spec");
    }
    Ok(out)
}

pub(crate) fn get(mgmt: &Mgmt) -> anyhow::Result<ApplianceView> {
    mgmt.get("edge-fw").map_err(|e| anyhow!("{e}"))
}

pub(crate) fn wait(
    mgmt: &Mgmt,
    what: &str,
    timeout: Duration,
    f: impl Fn(&ApplianceView) -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let v = get(mgmt)?;
        if f(&v) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{what}: not within {timeout:?} ({:?}, {:?})",
                v.dataplanes,
                v.error
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub(crate) fn settled(v: &ApplianceView, n: u32) -> bool {
    v.status == ApplianceStatus::Ready
        && v.dataplanes.ready == n
        && v.dataplanes.desired == n
        && v.dataplanes.draining == 0
        && v.units
            .iter()
            .all(|u| u.state != dva_mgmt::UnitState::Stopped)
}

fn scale(mgmt: &Mgmt, t0: Instant, n: u32) -> anyhow::Result<()> {
    println!(
        "  t={:>6.1}s  dva scale edge-fw --dataplanes {n}",
        t0.elapsed().as_secs_f64()
    );
    mgmt.scale(
        "edge-fw",
        &ScaleRequest {
            dataplanes: n,
            drain_deadline: None,
        },
    )
    .map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

/// The window packets/s are measured over (see `start_sampler`).
const RATE_WINDOW: Duration = Duration::from_secs(1);

/// Samples the appliance every 250 ms into a timeline.
fn start_sampler(
    mgmt: Mgmt,
    t0: Instant,
    stop: Arc<AtomicBool>,
) -> (Arc<Mutex<Vec<Sample>>>, std::thread::JoinHandle<()>) {
    let samples = Arc::new(Mutex::new(Vec::new()));
    let out = samples.clone();
    let h = std::thread::spawn(move || {
        // Units publish their counters every 250 ms (the report period), as often as we sample:
        // a rate from consecutive samples aliases (0, then twice the rate). Over a window of a
        // second (four reports) it is smooth.
        let mut history: std::collections::VecDeque<(Instant, u64)> = Default::default();
        while !stop.load(Ordering::Relaxed) {
            if let Ok(v) = mgmt.get("edge-fw") {
                let now = Instant::now();
                // Packets received by the dispatcher: every packet through the appliance once.
                let rx: u64 = v
                    .units
                    .iter()
                    .filter(|u| u.role == UnitRole::Dispatcher)
                    .map(|u| u.packets)
                    .sum();
                history.push_back((now, rx));
                while history.len() > 2
                    && history
                        .get(1)
                        .is_some_and(|(t, _)| now.duration_since(*t) >= RATE_WINDOW)
                {
                    history.pop_front();
                }
                let pps = match history.front() {
                    Some(&(t, r)) if now > t && rx >= r => {
                        (rx - r) as f64 / now.duration_since(t).as_secs_f64()
                    }
                    _ => 0.0,
                };
                if let Ok(mut s) = out.lock() {
                    s.push(Sample {
                        t: now.duration_since(t0).as_secs_f64(),
                        desired: v.dataplanes.desired,
                        ready: v.dataplanes.ready,
                        draining: v.dataplanes.draining,
                        pps,
                    });
                }
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    });
    (samples, h)
}

pub(crate) struct Traffic {
    tcp: std::thread::JoinHandle<Vec<apps::StreamResult>>,
    udp: std::thread::JoinHandle<Vec<apps::UdpStreamResult>>,
    http: Option<std::thread::JoinHandle<Result<apps::WrkReport, dva_lab::LabError>>>,
    tcp_n: usize,
}

pub(crate) fn start_traffic(
    client: &str,
    secs: u64,
    tcp_n: usize,
    udp_n: usize,
    udp_pps: u32,
    http: bool,
) -> Traffic {
    let s1 = IpAddr::V4(Lab::server_addr(1));
    let s2 = IpAddr::V4(Lab::server_addr(2));
    let s3 = IpAddr::V4(Lab::server_addr(3));
    let d = Duration::from_secs(secs);
    let tcp = apps::start_streams(client, SocketAddr::new(s2, 5201), tcp_n, d, 20_000);
    let udp = apps::start_udp_streams(client, SocketAddr::new(s3, 5300), udp_n, d, udp_pps);
    let http = http.then(|| {
        let client = client.to_string();
        std::thread::spawn(move || {
            apps::wrk(&client, &format!("http://{s1}/"), 2, 8, secs as u32, true)
        })
    });
    Traffic {
        tcp,
        udp,
        http,
        tcp_n,
    }
}

pub(crate) fn finish(
    name: &str,
    events: &str,
    t: Traffic,
    scale_ins: Vec<Duration>,
) -> anyhow::Result<PhaseResult> {
    let tcp = t
        .tcp
        .join()
        .map_err(|_| anyhow!("TCP stream threads panicked"))?;
    let udp = t
        .udp
        .join()
        .map_err(|_| anyhow!("UDP stream threads panicked"))?;
    let http = match t.http {
        Some(h) => Some(h.join().map_err(|_| anyhow!("wrk thread panicked"))??),
        None => None,
    };
    let mut p50s: Vec<u64> = udp.iter().map(|r| r.rtt_p50_us).collect();
    p50s.sort_unstable();
    Ok(PhaseResult {
        name: name.to_string(),
        events: events.to_string(),
        tcp_total: t.tcp_n,
        tcp_broken: tcp.iter().filter(|r| !r.intact()).count(),
        broken_detail: tcp
            .iter()
            .filter(|r| !r.intact())
            .map(|r| {
                format!(
                    "connection {}: sent {} received {} first bad {:?} error {:?}",
                    r.index, r.sent, r.received, r.first_bad, r.error
                )
            })
            .collect(),
        http_requests: http.as_ref().map_or(0, |h| h.requests),
        http_errors: http.as_ref().map_or(0, |h| h.errors()),
        udp_sent: udp.iter().map(|r| r.sent).sum(),
        udp_lost: udp.iter().map(|r| r.lost).sum(),
        udp_reordered: udp.iter().map(|r| r.reordered).sum(),
        rtt_p50_us: p50s.get(p50s.len() / 2).copied().unwrap_or(0),
        rtt_max_us: udp.iter().map(|r| r.rtt_max_us).max().unwrap_or(0),
        scale_ins,
    })
}

/// Scale in to 1 and time it until the removed data planes have exited.
fn scale_in_timed(mgmt: &Mgmt, t0: Instant) -> anyhow::Result<Duration> {
    let start = Instant::now();
    scale(mgmt, t0, 1)?;
    wait(mgmt, "scale-in", Duration::from_secs(60), |v| settled(v, 1))?;
    let took = start.elapsed();
    println!(
        "  t={:>6.1}s  back to 1 data plane, scale-in took {:.2} s",
        t0.elapsed().as_secs_f64(),
        took.as_secs_f64()
    );
    Ok(took)
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    let prefix = opts.prefix.as_str();
    let cycles = opts.cycles.clamp(1, 10);
    let lab = Lab::up(&LabSpec {
        prefix: prefix.to_string(),
        servers: 3,
        hosts: 2,
        dispatchers: 1,
        control: false,
    })?;
    let _lab_guard = crate::demo::LabGuard(prefix.to_string());
    let _web = Nginx::start(&lab.server_ns(1), &[80], "ok\n")?;
    let _streams = StreamServer::start(&lab.server_ns(2), 5201).context("stream server")?;
    let _echo = UdpEchoServer::start(&lab.server_ns(3), 5300).context("udp echo server")?;
    let client = lab.client_ns();

    let state = PathBuf::from("/run/dva").join(format!("{prefix}bench.state"));
    let _ = std::fs::remove_dir_all(&state);
    let mgmt = Mgmt::open_in(
        MgmtOptions::new(state.clone(), prefix)?,
        Box::new(dva_lab::LabHosts::new(prefix)),
    )?;
    let _guard = crate::demo::MgmtGuard(mgmt.clone(), state);
    mgmt.apply(&spec(false)?).map_err(|e| anyhow!("{e}"))?;
    wait(&mgmt, "ready", Duration::from_secs(30), |v| settled(v, 1))?;

    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let (samples, sampler) = start_sampler(mgmt.clone(), t0, stop.clone());
    let mut results = Vec::new();

    // Phase 1: by hand.
    let secs = u64::from(cycles) * 16 + 4;
    println!(
        "\n== by hand: {cycles} x (1 -> 4 -> 1) under 30 checked TCP connections, wrk (short \
         connections) and 10 UDP echo streams at 200/s, {secs} s"
    );
    let traffic = start_traffic(&client, secs, 30, 10, 200, true);
    let mut scale_ins = Vec::new();
    std::thread::sleep(Duration::from_secs(2));
    for _ in 0..cycles {
        scale(&mgmt, t0, 4)?;
        wait(&mgmt, "scale-out", Duration::from_secs(30), |v| {
            settled(v, 4)
        })?;
        println!(
            "  t={:>6.1}s  4 data planes serving",
            t0.elapsed().as_secs_f64()
        );
        std::thread::sleep(Duration::from_secs(4));
        scale_ins.push(scale_in_timed(&mgmt, t0)?);
        std::thread::sleep(Duration::from_secs(3));
    }
    results.push(finish(
        "by hand",
        &format!("{cycles} x 1->4->1"),
        traffic,
        scale_ins,
    )?);

    // Phase 2: by policy.
    println!("\n== by policy: the same spec with autoscaling (pps > 1500 per data plane for 2 s: out; < 400 for 3 s: in; cooldown 4 s)");
    mgmt.apply(&spec(true)?).map_err(|e| anyhow!("{e}"))?;
    wait(&mgmt, "ready", Duration::from_secs(30), |v| settled(v, 1))?;
    let calm = start_traffic(&client, 34, 20, 0, 1, false);
    let burst = start_traffic(&client, 12, 0, 10, 400, true);
    let start = Instant::now();
    wait(&mgmt, "scale-out by policy", Duration::from_secs(30), |v| {
        v.dataplanes.desired > 1
    })?;
    let out_to = get(&mgmt)?.dataplanes.desired;
    println!(
        "  t={:>6.1}s  the autoscaler scaled out to {out_to}",
        t0.elapsed().as_secs_f64()
    );
    wait(&mgmt, "scale-in by policy", Duration::from_secs(60), |v| {
        v.dataplanes.desired == 1
    })?;
    let in_at = Instant::now();
    println!(
        "  t={:>6.1}s  the autoscaler scaled in to 1 ({:.1} s after the burst started)",
        t0.elapsed().as_secs_f64(),
        in_at.duration_since(start).as_secs_f64()
    );
    wait(
        &mgmt,
        "scale-in by policy done",
        Duration::from_secs(60),
        |v| settled(v, 1),
    )?;
    let policy_in = in_at.elapsed();
    let burst_r = finish("burst", "", burst, Vec::new())?;
    let mut calm_r = finish(
        "by policy",
        &format!("1->{out_to}->1 by policy"),
        calm,
        vec![policy_in],
    )?;
    calm_r.http_requests = burst_r.http_requests;
    calm_r.http_errors = burst_r.http_errors;
    calm_r.udp_sent = burst_r.udp_sent;
    calm_r.udp_lost = burst_r.udp_lost;
    calm_r.udp_reordered = burst_r.udp_reordered;
    calm_r.rtt_p50_us = burst_r.rtt_p50_us;
    calm_r.rtt_max_us = burst_r.rtt_max_us;
    results.push(calm_r);
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.join();

    println!(
        "\n== results (dva bench elasticity, lab {prefix}, {} cores)",
        num_cpus()
    );
    println!(
        "{:<10} {:<22} {:>12} {:>9} {:>8} {:>9} {:>6} {:>9} {:>9} {:>11} scale-in completion",
        "phase",
        "scale events",
        "TCP broken",
        "HTTP req",
        "HTTP err",
        "UDP sent",
        "lost",
        "reordered",
        "RTT p50",
        "RTT max",
    );
    let mut total_bad = 0;
    for r in &results {
        total_bad += r.tcp_broken as u64 + r.http_errors + r.udp_lost;
        println!(
            "{:<10} {:<22} {:>12} {:>9} {:>8} {:>9} {:>6} {:>9} {:>7}us {:>9}us {}",
            r.name,
            r.events,
            format!("{}/{}", r.tcp_broken, r.tcp_total),
            r.http_requests,
            r.http_errors,
            r.udp_sent,
            r.udp_lost,
            r.udp_reordered,
            r.rtt_p50_us,
            r.rtt_max_us,
            r.scale_ins
                .iter()
                .map(|d| format!("{:.2}s", d.as_secs_f64()))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    let worst_added = results
        .iter()
        .map(|r| r.rtt_max_us.saturating_sub(r.rtt_p50_us))
        .max()
        .unwrap_or(0);
    println!(
        "largest latency added during the run (worst UDP round trip minus median): {:.1} ms",
        worst_added as f64 / 1000.0
    );
    let events = mgmt.events("edge-fw").map_err(|e| anyhow!("{e}"))?;
    println!("\nautoscaler decisions:");
    for e in events.iter().filter(|e| e.reason == "autoscale") {
        println!("  {}", e.message);
    }
    if let Some(path) = &opts.plot {
        let s = samples
            .lock()
            .map_err(|_| anyhow!("sampler poisoned"))?
            .clone();
        write_svg(path, &s)?;
        println!("plot: {}", path.display());
    }
    if total_bad > 0 {
        bail!("{total_bad} broken flows, HTTP errors or lost UDP datagrams");
    }
    Ok(())
}

pub(crate) fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Data planes (desired, ready, draining) and packets/s over time, as a plain SVG.
fn write_svg(path: &Path, s: &[Sample]) -> anyhow::Result<()> {
    let (w, h, pad) = (900.0, 360.0, 50.0);
    let tmax = s.last().map_or(1.0, |x| x.t).max(1.0);
    let pmax = s.iter().map(|x| x.pps).fold(1.0, f64::max) * 1.1;
    let nmax = 5.0;
    let x = |t: f64| pad + t / tmax * (w - 2.0 * pad);
    let yp = |p: f64| h - pad - p / pmax * (h - 2.0 * pad);
    let yn = |n: f64| h - pad - n / nmax * (h - 2.0 * pad);
    let line = |f: &dyn Fn(&Sample) -> (f64, f64)| {
        s.iter()
            .map(|p| {
                let (a, b) = f(p);
                format!("{a:.1},{b:.1}")
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut svg = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-family='sans-serif' font-size='12'>\n\
         <rect width='100%' height='100%' fill='white'/>\n\
         <text x='{pad}' y='20'>dva bench elasticity: data planes (right axis) and packets/s through the dispatcher (left axis)</text>\n\
         <line x1='{pad}' y1='{y0}' x2='{x1}' y2='{y0}' stroke='black'/>\n\
         <line x1='{pad}' y1='{pad}' x2='{pad}' y2='{y0}' stroke='black'/>\n\
         <line x1='{x1}' y1='{pad}' x2='{x1}' y2='{y0}' stroke='black'/>\n",
        y0 = h - pad,
        x1 = w - pad
    );
    for i in 0..=5 {
        let p = pmax * f64::from(i) / 5.0;
        svg += &format!("<text x='5' y='{:.1}'>{:.0}</text>\n", yp(p) + 4.0, p);
    }
    for n in 0..=4 {
        svg += &format!(
            "<text x='{:.1}' y='{:.1}'>{n}</text>\n",
            w - pad + 8.0,
            yn(f64::from(n)) + 4.0
        );
    }
    let mut t = 0.0;
    while t <= tmax {
        svg += &format!(
            "<text x='{:.1}' y='{:.1}'>{t:.0}s</text>\n",
            x(t) - 8.0,
            h - pad + 16.0
        );
        t += 10.0;
    }
    svg += &format!(
        "<polyline fill='none' stroke='#999' stroke-width='1' points='{}'/>\n",
        line(&|p| (x(p.t), yp(p.pps)))
    );
    svg += &format!(
        "<polyline fill='none' stroke='#1f77b4' stroke-width='2' points='{}'/>\n",
        line(&|p| (x(p.t), yn(f64::from(p.ready))))
    );
    svg += &format!(
        "<polyline fill='none' stroke='#d62728' stroke-width='2' stroke-dasharray='4 3' points='{}'/>\n",
        line(&|p| (x(p.t), yn(f64::from(p.ready + p.draining))))
    );
    svg += &format!(
        "<polyline fill='none' stroke='#2ca02c' stroke-width='1' stroke-dasharray='2 2' points='{}'/>\n",
        line(&|p| (x(p.t), yn(f64::from(p.desired))))
    );
    svg += "<text x='560' y='40' fill='#1f77b4'>ready data planes</text>\n\
            <text x='560' y='54' fill='#d62728'>ready + draining</text>\n\
            <text x='700' y='40' fill='#2ca02c'>desired</text>\n\
            <text x='700' y='54' fill='#999'>packets/s</text>\n</svg>\n";
    std::fs::write(path, svg).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
