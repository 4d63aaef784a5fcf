//! iperf3 server (guard) and client (one test, parsed from `iperf3 -J`).

use std::net::IpAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{at_least_one, listening, Daemon, Scratch, CLIENT_GRACE};
use crate::{cmd, netns_command, LabError};

/// How long iperf3 may take to connect its control channel, on top of the test itself.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// `iperf3 -s -p PORT` in one namespace; serves one test after another until dropped.
#[derive(Debug)]
pub struct Iperf3Server {
    daemon: Daemon,
    port: u16,
}

impl Iperf3Server {
    /// Starts the server; returns once it listens. Readiness is read with `ss` rather than by
    /// connecting: iperf3 would take a probe connection for a client and log an error.
    pub fn start(ns: &str, port: u16) -> Result<Iperf3Server, LabError> {
        if port == 0 {
            return Err(LabError::InvalidArgument {
                what: "iperf3 port",
                value: "0".into(),
                reason: "must be a real port",
            });
        }
        let program = cmd::tool("iperf3")?;
        let scratch = Scratch::new("iperf3")?;
        let mut c = netns_command(ns, &program.to_string_lossy());
        c.args(["-s", "-p", &port.to_string()]);
        let mut daemon = Daemon::spawn("iperf3", ns, c, scratch)?;
        let pid = daemon.pid();
        daemon.wait_ready(&[], || matches!(listening(ns, port, pid), Ok(true)))?;
        Ok(Iperf3Server { daemon, port })
    }

    pub fn ns(&self) -> &str {
        &self.daemon.ns
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> u32 {
        self.daemon.pid()
    }
}

/// The totals of one iperf3 test, as the sender and the receiver saw them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Iperf3Report {
    /// `end.sum_sent.bits_per_second`
    pub sent_bps: f64,
    /// `end.sum_received.bits_per_second`: the throughput that made it through.
    pub received_bps: f64,
    pub sent_bytes: u64,
    pub received_bytes: u64,
    /// TCP retransmissions by the sender (0 for UDP).
    pub retransmits: u64,
    /// UDP only: datagrams the receiver missed, in percent.
    pub lost_percent: Option<f64>,
    /// UDP only: the receiver's jitter.
    pub jitter_ms: Option<f64>,
}

/// Runs one iperf3 test from `ns` to `server:port` for `secs` seconds with `streams` parallel
/// streams; `reverse` makes the server send (`-R`); `udp_bitrate` (`"100M"`, `"1G"`, ...)
/// switches to UDP at that rate (`-u -b`). Any failure iperf3 reports (refused, server busy,
/// ...) is an [`LabError::Iperf3`] carrying iperf3's own message.
pub fn iperf3_client(
    ns: &str,
    server: IpAddr,
    port: u16,
    secs: u32,
    streams: u32,
    reverse: bool,
    udp_bitrate: Option<&str>,
) -> Result<Iperf3Report, LabError> {
    at_least_one("iperf3 duration (seconds)", secs)?;
    at_least_one("iperf3 streams", streams)?;
    let program = cmd::tool("iperf3")?;
    let mut c = netns_command(ns, &program.to_string_lossy());
    c.args(["-c", &server.to_string(), "-p", &port.to_string(), "-J"])
        .args(["-t", &secs.to_string(), "-P", &streams.to_string()])
        .args([
            "--connect-timeout",
            &CONNECT_TIMEOUT.as_millis().to_string(),
        ]);
    if reverse {
        c.arg("-R");
    }
    if let Some(rate) = udp_bitrate {
        c.args(["-u", "-b", rate]);
    }
    // The test itself, connecting, and the exchange of results at the end.
    let limit = Duration::from_secs(u64::from(secs)) + CONNECT_TIMEOUT + CLIENT_GRACE * 2;
    let out = cmd::output_within(&mut c, limit)?;
    let fail = |message: String| LabError::Iperf3 {
        ns: ns.to_string(),
        server,
        port,
        message,
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    match parse_report(&stdout) {
        Ok(report) if out.status.success() => Ok(report),
        Ok(_) => Err(fail(format!(
            "exit status {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))),
        Err(message) => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let stderr = stderr.trim();
            Err(fail(if stderr.is_empty() {
                message
            } else {
                format!("{message}; stderr: {stderr}")
            }))
        }
    }
}

#[derive(Deserialize)]
struct Output {
    #[serde(default)]
    end: Option<End>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Deserialize)]
struct End {
    sum_sent: Option<Sum>,
    sum_received: Option<Sum>,
    /// UDP: the client's view; older iperf3 versions have only this one.
    sum: Option<Sum>,
}

/// Numbers are read as f64: iperf3 (cJSON) may print large integers in exponent form.
#[derive(Deserialize, Clone, Copy, Default)]
struct Sum {
    #[serde(default)]
    bytes: f64,
    #[serde(default)]
    bits_per_second: f64,
    #[serde(default)]
    retransmits: Option<f64>,
    #[serde(default)]
    lost_percent: Option<f64>,
    #[serde(default)]
    jitter_ms: Option<f64>,
}

/// The report in `iperf3 -J` output, or iperf3's own error message.
fn parse_report(json: &str) -> Result<Iperf3Report, String> {
    let out: Output = serde_json::from_str(json).map_err(|e| {
        let head: String = json.chars().take(200).collect();
        format!("iperf3 -J output is not the expected JSON ({e}): {head:?}")
    })?;
    if let Some(error) = out.error {
        return Err(error);
    }
    let end = out.end.ok_or("iperf3 -J output has no `end` section")?;
    let (sent, received) = match (end.sum_sent, end.sum_received, end.sum) {
        (Some(s), Some(r), _) => (s, r),
        (_, _, Some(sum)) => (sum, sum),
        _ => {
            return Err(
                "iperf3 -J output has neither end.sum_sent/sum_received nor end.sum".to_string(),
            )
        }
    };
    // `as` saturates: a negative or NaN count becomes 0 rather than a panic.
    Ok(Iperf3Report {
        sent_bps: sent.bits_per_second,
        received_bps: received.bits_per_second,
        sent_bytes: sent.bytes as u64,
        received_bytes: received.bytes as u64,
        retransmits: sent.retransmits.unwrap_or(0.0) as u64,
        lost_percent: received
            .lost_percent
            .or(end.sum.and_then(|s| s.lost_percent)),
        jitter_ms: received.jitter_ms.or(end.sum.and_then(|s| s.jitter_ms)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_tcp_report() {
        let r = parse_report(include_str!("../../tests/fixtures/iperf3-tcp.json")).unwrap();
        assert_eq!(r.sent_bytes, 3_204_710_400);
        assert_eq!(r.received_bytes, 3_204_710_400);
        assert!((r.sent_bps - 25_634_709_573.689_453).abs() < 1.0);
        assert!((r.received_bps - 25_633_940_644.665_88).abs() < 1.0);
        assert_eq!(r.retransmits, 0);
        assert_eq!(r.lost_percent, None);
    }

    #[test]
    fn parses_a_udp_report() {
        let r = parse_report(include_str!("../../tests/fixtures/iperf3-udp.json")).unwrap();
        assert_eq!(r.sent_bytes, 1_277_952);
        assert!((r.received_bps - 10_221_418.395_045_064).abs() < 1.0);
        assert_eq!(r.lost_percent, Some(0.0));
        assert!(
            r.jitter_ms
                .is_some_and(|j| (j - 0.007_117_710_098).abs() < 1e-9),
            "{:?}",
            r.jitter_ms
        );
    }

    #[test]
    fn reports_iperf3s_own_error() {
        let e = parse_report(include_str!("../../tests/fixtures/iperf3-refused.json")).unwrap_err();
        assert_eq!(e, "unable to connect to server: Connection refused");
    }

    #[test]
    fn survives_odd_output() {
        assert!(parse_report("")
            .unwrap_err()
            .contains("not the expected JSON"));
        assert!(parse_report("iperf3: error - unable to connect")
            .unwrap_err()
            .contains("not the expected JSON"));
        assert!(parse_report("{}").unwrap_err().contains("no `end`"));
        assert!(parse_report(r#"{"end":{}}"#)
            .unwrap_err()
            .contains("neither"));
        // Exponent-form integers and an older UDP layout with only `sum`.
        let r = parse_report(
            r#"{"end":{"sum":{"bytes":1.5e10,"bits_per_second":1e9,"lost_percent":2.5}}}"#,
        )
        .unwrap();
        assert_eq!(
            (r.sent_bytes, r.received_bytes, r.lost_percent),
            (15_000_000_000, 15_000_000_000, Some(2.5))
        );
        let r = parse_report(r#"{"end":{"sum_sent":{"bytes":-1,"bits_per_second":1,"retransmits":7},"sum_received":{}}}"#).unwrap();
        assert_eq!((r.sent_bytes, r.retransmits, r.received_bps), (0, 7, 0.0));
    }

    #[test]
    fn zero_duration_or_streams_are_rejected() {
        let s: IpAddr = "198.18.2.2".parse().unwrap();
        assert!(matches!(
            iperf3_client("nowhere", s, 5201, 0, 1, false, None),
            Err(LabError::InvalidArgument { .. })
        ));
        assert!(matches!(
            iperf3_client("nowhere", s, 5201, 1, 0, false, None),
            Err(LabError::InvalidArgument { .. })
        ));
        assert!(matches!(
            Iperf3Server::start("nowhere", 0),
            Err(LabError::InvalidArgument { .. })
        ));
    }
}
