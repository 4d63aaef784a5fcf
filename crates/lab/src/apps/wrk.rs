//! wrk, the HTTP load generator, as a lab client: short connections (`Connection: close`) or
//! keep-alive, and its summary parsed into numbers.

use std::time::Duration;

use crate::cmd;
use crate::{netns_command, LabError};

#[derive(Debug, Clone, Default, PartialEq)]
pub struct WrkReport {
    pub requests: u64,
    pub requests_per_sec: f64,
    pub connect_errors: u64,
    pub read_errors: u64,
    pub write_errors: u64,
    pub timeouts: u64,
    pub non_2xx_3xx: u64,
    /// Average and maximum latency, microseconds.
    pub latency_avg_us: f64,
    pub latency_max_us: f64,
}

impl WrkReport {
    pub fn errors(&self) -> u64 {
        self.connect_errors
            + self.read_errors
            + self.write_errors
            + self.timeouts
            + self.non_2xx_3xx
    }
}

/// `wrk -t THREADS -c CONNS -d SECS URL` from `ns`; with `close`, every request opens a new
/// connection (the load a firewall's connection setup path sees).
pub fn wrk(
    ns: &str,
    url: &str,
    threads: u32,
    connections: u32,
    secs: u32,
    close: bool,
) -> Result<WrkReport, LabError> {
    let program = cmd::tool("wrk")?;
    let mut c = netns_command(ns, &program.to_string_lossy());
    c.args([
        "-t",
        &threads.max(1).to_string(),
        "-c",
        &connections.max(threads.max(1)).to_string(),
        "-d",
        &format!("{}s", secs.max(1)),
        "--timeout",
        "5s",
    ]);
    if close {
        c.args(["-H", "Connection: close"]);
    }
    c.arg(url);
    let out = cmd::output_within(&mut c, Duration::from_secs(u64::from(secs) + 15))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(LabError::CommandFailed {
            command: format!("wrk {url}"),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    parse(&text).ok_or_else(|| LabError::BadOutput {
        command: format!("wrk {url}"),
        reason: format!("no summary in: {text}"),
    })
}

fn duration_us(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1e6)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60e6)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|v| v * mult)
}

/// The parts of wrk's text summary we use.
pub fn parse(text: &str) -> Option<WrkReport> {
    let mut r = WrkReport::default();
    let mut seen = false;
    for line in text.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("Latency") {
            let f: Vec<&str> = rest.split_whitespace().collect();
            r.latency_avg_us = f.first().and_then(|v| duration_us(v)).unwrap_or(0.0);
            r.latency_max_us = f.get(2).and_then(|v| duration_us(v)).unwrap_or(0.0);
        } else if t.contains("requests in") {
            r.requests = t.split_whitespace().next()?.parse().ok()?;
            seen = true;
        } else if let Some(rest) = t.strip_prefix("Socket errors:") {
            for part in rest.split(',') {
                let mut it = part.split_whitespace();
                let (Some(k), Some(v)) = (it.next(), it.next()) else {
                    continue;
                };
                let v: u64 = v.parse().unwrap_or(0);
                match k {
                    "connect" => r.connect_errors = v,
                    "read" => r.read_errors = v,
                    "write" => r.write_errors = v,
                    "timeout" => r.timeouts = v,
                    _ => {}
                }
            }
        } else if let Some(rest) = t.strip_prefix("Non-2xx or 3xx responses:") {
            r.non_2xx_3xx = rest.trim().parse().unwrap_or(0);
        } else if let Some(rest) = t.strip_prefix("Requests/sec:") {
            r.requests_per_sec = rest.trim().parse().unwrap_or(0.0);
        }
    }
    seen.then_some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_summary_with_errors() {
        let text = "Running 10s test @ http://198.18.2.2/\n  2 threads and 8 connections\n  Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency   512.30us  200.10us   8.20ms   90.00%\n    Req/Sec     4.00k   300.00     5.00k    70.00%\n  80000 requests in 10.00s, 20.00MB read\n  Socket errors: connect 0, read 3, write 0, timeout 1\n  Non-2xx or 3xx responses: 2\nRequests/sec:   8000.00\nTransfer/sec:      2.00MB\n";
        let r = parse(text).expect("parsed");
        assert_eq!(r.requests, 80000);
        assert_eq!((r.read_errors, r.timeouts, r.non_2xx_3xx), (3, 1, 2));
        assert_eq!(r.errors(), 6);
        assert!((r.requests_per_sec - 8000.0).abs() < 1e-9);
        assert!((r.latency_avg_us - 512.3).abs() < 1e-6);
        assert!((r.latency_max_us - 8200.0).abs() < 1e-6);
        assert!(parse("garbage").is_none());
    }
}
