//! The unit's local control socket: a Unix socket speaking just enough HTTP/1.0 for `curl
//! --unix-socket` and for the tools that start units (`dva run`).
//!
//! Unix sockets live in the filesystem, not in a network namespace, so a unit placed in a lab host
//! namespace is reachable from the root namespace without any route. Endpoints:
//! `GET /ready` (200 once the data path is set up), `GET /stats` (JSON [`UnitStats`]),
//! `GET /metrics` (Prometheus text, [`crate::metrics`]), and the [`crate::inspect`] requests the
//! data path answers: `GET /flows?<filter>` (JSON [`FlowList`]), `GET /config` (the role config,
//! backplane keys redacted), `GET /capture?<spec>` (dispatchers: a pcap stream, see
//! `stream_capture`), `GET /monitor?<spec>` (data planes: flow and drop events, one JSON
//! object per line, see [`stream_monitor`]).
//!
//! Only root and the user the unit runs as are served (SO_PEERCRED); anyone else's connection
//! is closed unanswered and counted as `control_peer_refused`.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crate::inspect::{CaptureSpec, FlowFilter, FlowList, Inspector, Request};
use crate::stats::{StatsCell, UnitStats};

/// Biggest request we read; anything larger is answered 400 and closed.
const MAX_REQUEST: usize = 8 * 1024;

pub struct ControlServer {
    path: PathBuf,
}

impl ControlServer {
    /// Bind the socket (replacing a stale one) and serve on a background thread.
    pub fn start(
        path: &Path,
        stats: StatsCell,
        ready: Arc<AtomicBool>,
        inspector: Inspector,
    ) -> io::Result<ControlServer> {
        if let Some(dir) = path.parent() {
            dva_io::local::create_private_dir_all(dir)?;
        }
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = UnixListener::bind(path)?;
        dva_io::local::restrict_socket(path)?;
        let refused = AtomicU64::new(0);
        let capturing = Arc::new(AtomicBool::new(false));
        thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    let Ok(conn) = conn else { continue };
                    if !admit(&conn, &refused, "control socket") {
                        continue;
                    }
                    // One request per connection, served inline: requests are tiny and rare.
                    let _ = serve_one(
                        conn,
                        &stats,
                        &ready,
                        &inspector,
                        &capturing,
                        refused.load(Ordering::Relaxed),
                    );
                }
            })?;
        Ok(ControlServer {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Whether to serve a connection accepted on one of the unit's local sockets: only root and our
/// own user are (SO_PEERCRED). A refused connection is dropped unanswered, counted in
/// `refused`, and logged at the 1st, 2nd, 4th, 8th... refusal so a peer retrying in a loop
/// cannot flood the log. A peer whose credentials cannot be read is refused too.
pub(crate) fn admit(conn: &UnixStream, refused: &AtomicU64, socket: &str) -> bool {
    match dva_io::local::peer_allowed(conn) {
        Ok(true) => true,
        verdict => {
            let n = refused.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                let why = match verdict {
                    Err(e) => format!("its credentials are unreadable: {e}"),
                    Ok(_) => "it is neither root nor our user".to_string(),
                };
                tracing::warn!(%socket, refused = n, "refused a connection: {why}");
            }
            false
        }
    }
}

fn serve_one(
    conn: UnixStream,
    stats: &StatsCell,
    ready: &AtomicBool,
    inspector: &Inspector,
    capturing: &Arc<AtomicBool>,
    refused: u64,
) -> io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    conn.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut reader = BufReader::new(conn.try_clone()?.take(MAX_REQUEST as u64));
    let mut line = String::new();
    reader.read_line(&mut line)?;
    // Drain headers so the client sees a clean close.
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
    }
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let snapshot = || {
        let mut s = stats.snapshot();
        s.version = env!("CARGO_PKG_VERSION").to_string();
        s.process = crate::metrics::ProcessStats::read_self();
        if refused > 0 {
            s.counters
                .insert("control_peer_refused".to_string(), refused);
        }
        s
    };
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let json = |v: Result<String, String>, bad: u16| match v {
        Ok(body) => (200, "application/json", body),
        Err(e) => (bad, "text/plain", e + "\n"),
    };
    if (method, path) == ("GET", "/capture") {
        return start_capture(conn, query, inspector, capturing);
    }
    if (method, path) == ("GET", "/monitor") {
        return start_monitor(conn, query, inspector);
    }
    let (status, ctype, body) = match (method, path) {
        ("GET", "/flows") => match FlowFilter::from_query(query) {
            Ok(filter) => json(
                inspector
                    .ask(|reply| Request::Flows { filter, reply })
                    .and_then(|r| r)
                    .map(|list: FlowList| serde_json::to_string(&list).unwrap_or_default()),
                503,
            ),
            Err(e) => (400, "text/plain", e + "\n"),
        },
        ("GET", "/config") => json(
            inspector
                .ask(|reply| Request::Config { reply })
                .map(|v| v.to_string()),
            503,
        ),
        ("GET", "/ready") if ready.load(Ordering::Acquire) => {
            (200, "text/plain", "ready\n".to_string())
        }
        ("GET", "/ready") => (503, "text/plain", "starting\n".to_string()),
        ("GET", "/stats") => (
            200,
            "application/json",
            serde_json::to_string(&snapshot()).unwrap_or_default(),
        ),
        ("GET", "/metrics") => (
            200,
            crate::metrics::CONTENT_TYPE,
            crate::metrics::unit_exposition(&snapshot()),
        ),
        ("GET", _) => (
            404,
            "text/plain",
            format!("no such endpoint {path:?}; try /ready, /stats, /metrics, /flows, /config\n"),
        ),
        _ => (
            405,
            "text/plain",
            format!("method {method:?} not allowed\n"),
        ),
    };
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        409 => "Conflict",
        422 => "Unprocessable Content",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let mut w = conn;
    write!(w, "HTTP/1.0 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())?;
    w.flush()
}

fn answer(mut w: UnixStream, status: u16, reason: &str, body: &str) -> io::Result<()> {
    write!(w, "HTTP/1.0 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())?;
    w.flush()
}

/// Packets queued between the data path and the thread writing the pcap stream: a burst of
/// this many fits, beyond that the tap drops and counts.
const CAPTURE_QUEUE: usize = 4096;

/// `GET /capture`: validate, then stream on a thread of its own so that stats and readiness
/// keep being served meanwhile. One capture at a time (409 while one runs).
fn start_capture(
    conn: UnixStream,
    query: &str,
    inspector: &Inspector,
    capturing: &Arc<AtomicBool>,
) -> io::Result<()> {
    let spec = match CaptureSpec::from_query(query) {
        Ok(s) => s,
        Err(e) => return answer(conn, 400, "Bad Request", &(e + "\n")),
    };
    if capturing.swap(true, Ordering::AcqRel) {
        return answer(
            conn,
            409,
            "Conflict",
            "a capture is already running on this unit\n",
        );
    }
    let (inspector, flag) = (inspector.clone(), capturing.clone());
    let spawned = thread::Builder::new()
        .name("capture".into())
        .spawn(move || {
            let _ = stream_capture(conn, &spec, &inspector);
            flag.store(false, Ordering::Release);
        });
    if spawned.is_err() {
        capturing.store(false, Ordering::Release);
    }
    Ok(())
}

/// Install a tap on the data path and write what it takes as a pcap stream (HTTP/1.0, no
/// length: the stream ends when the connection closes) until `spec.count` packets or
/// `spec.duration`, or until the reader goes away (a write that times out ends it too: a
/// slow reader costs the data path drops, never waits).
fn stream_capture(conn: UnixStream, spec: &CaptureSpec, inspector: &Inspector) -> io::Result<()> {
    use dva_io::capture::{pcap_header, pcap_record, Tap};
    let (tx, rx) = std::sync::mpsc::sync_channel(CAPTURE_QUEUE);
    let dropped = Arc::new(AtomicU64::new(0));
    let until = std::time::Instant::now() + spec.duration;
    let tap = Tap::new(
        spec.filter,
        spec.snaplen,
        spec.count,
        until,
        tx,
        dropped.clone(),
    );
    let interface = spec.interface.clone();
    let point = match inspector
        .ask(|reply| Request::Capture {
            interface,
            tap,
            reply,
        })
        .and_then(|r| r)
    {
        Ok(p) => p,
        Err(e) => return answer(conn, 422, "Unprocessable Content", &(e + "\n")),
    };
    let mut w = io::BufWriter::new(conn);
    write!(w, "HTTP/1.0 200 OK\r\nContent-Type: application/vnd.tcpdump.pcap\r\nX-Dva-Capture: {point}\r\nConnection: close\r\n\r\n")?;
    w.write_all(&pcap_header(spec.snaplen as u32))?;
    w.flush()?;
    let mut taken = 0u64;
    let mut record = Vec::with_capacity(2048);
    let result = 'stream: loop {
        let left = until.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() || taken >= spec.count {
            break Ok(());
        }
        let first = match rx.recv_timeout(left.min(Duration::from_millis(100))) {
            Ok(p) => p,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
            // The data path ended the session (budget, deadline, or a newer capture).
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break Ok(()),
        };
        // Write what a burst queued, then flush once.
        let mut next = Some(first);
        while let Some(p) = next.take() {
            record.clear();
            pcap_record(&p, &mut record);
            if let Err(e) = w.write_all(&record) {
                break 'stream Err(e);
            }
            taken += 1;
            if taken < spec.count {
                next = rx.try_recv().ok();
            }
        }
        if let Err(e) = w.flush() {
            break Err(e);
        }
    };
    let _ = w.flush();
    tracing::info!(
        %point,
        packets = taken,
        dropped = dropped.load(Ordering::Relaxed),
        "capture ended (dropped: the reader was too slow)"
    );
    result
}

/// How often the monitor stream reports lost events and checks that its reader is still there.
const MONITOR_TICK: Duration = Duration::from_secs(1);

/// `GET /monitor`: validate, then stream on a thread of its own. A newer session replaces the
/// running one on the data path (whose stream then ends).
fn start_monitor(conn: UnixStream, query: &str, inspector: &Inspector) -> io::Result<()> {
    let spec = match crate::monitor::MonitorSpec::from_query(query) {
        Ok(s) => s,
        Err(e) => return answer(conn, 400, "Bad Request", &(e + "\n")),
    };
    let inspector = inspector.clone();
    thread::Builder::new()
        .name("monitor".into())
        .spawn(move || {
            let _ = stream_monitor(conn, &spec, &inspector);
        })?;
    Ok(())
}

/// Start a monitor session on the data path and write its events, one JSON object per line,
/// until the deadline, the data path ends the session, or the reader goes away (seen at a
/// failed write or, when there is nothing to write, at the end of its side of the connection,
/// checked every `MONITOR_TICK`). Lost events are reported as `{"type":"lost"}` lines.
pub fn stream_monitor(
    conn: UnixStream,
    spec: &crate::monitor::MonitorSpec,
    inspector: &Inspector,
) -> io::Result<()> {
    use crate::monitor::{MonitorEvent, Session, QUEUE};
    use std::sync::mpsc::RecvTimeoutError;
    use std::time::Instant;
    let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
    let lost = Arc::new(AtomicU64::new(0));
    let closed = Arc::new(AtomicBool::new(false));
    let now = Instant::now();
    let until = now + spec.duration;
    let session = Session::new(spec, now, tx, lost.clone(), closed.clone());
    if let Err(e) = inspector
        .ask(|reply| Request::Monitor { session, reply })
        .and_then(|r| r)
    {
        return answer(conn, 422, "Unprocessable Content", &(e + "\n"));
    }
    // Whatever ends the stream ends the session on the data path at its next turn.
    struct Close(Arc<AtomicBool>);
    impl Drop for Close {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let _close = Close(closed);
    let mut probe = conn.try_clone()?;
    // The reader sends nothing after its request: a read answers at once with the end of the
    // stream once it has gone, else times out.
    probe.set_read_timeout(Some(Duration::from_millis(1)))?;
    let mut w = io::BufWriter::new(conn);
    write!(
        w,
        "HTTP/1.0 200 OK\r\nContent-Type: application/x-ndjson\r\nConnection: close\r\n\r\n"
    )?;
    w.flush()?;
    let mut reported = 0u64;
    let mut next_tick = Instant::now() + MONITOR_TICK;
    let mut line = Vec::with_capacity(512);
    let mut write_event = |w: &mut io::BufWriter<UnixStream>, e: &MonitorEvent| {
        line.clear();
        serde_json::to_writer(&mut line, e).map_err(io::Error::other)?;
        line.push(b'\n');
        w.write_all(&line)
    };
    let unit = spec.unit.unwrap_or(0);
    let result = loop {
        let now = Instant::now();
        if now >= until {
            break Ok(());
        }
        if now >= next_tick {
            next_tick = now + MONITOR_TICK;
            let n = lost.load(Ordering::Relaxed);
            if n > reported {
                if let Err(e) = write_event(&mut w, &MonitorEvent::lost(unit, n - reported))
                    .and_then(|()| w.flush())
                {
                    break Err(e);
                }
                reported = n;
            }
            if matches!(probe.read(&mut [0u8; 64]), Ok(0)) {
                break Ok(());
            }
        }
        let wait = until.min(next_tick).saturating_duration_since(now);
        let first = match rx.recv_timeout(wait) {
            Ok(e) => e,
            Err(RecvTimeoutError::Timeout) => continue,
            // The data path ended the session (a newer one replaced it, or the unit stops).
            Err(RecvTimeoutError::Disconnected) => break Ok(()),
        };
        // Write what a burst queued, then flush once.
        let mut next = Some(first);
        let mut failed = None;
        while let Some(e) = next.take() {
            if let Err(err) = write_event(&mut w, &e) {
                failed = Some(err);
                break;
            }
            next = rx.try_recv().ok();
        }
        if let Some(e) = failed {
            break Err(e);
        }
        if let Err(e) = w.flush() {
            break Err(e);
        }
    };
    let n = lost.load(Ordering::Relaxed);
    if result.is_ok() && n > reported {
        let _ = write_event(&mut w, &MonitorEvent::lost(unit, n - reported));
    }
    let _ = w.flush();
    result
}

/// `GET path` over the unit's control socket. Returns (status, body).
pub fn get(socket: &Path, target: &str, timeout: Duration) -> io::Result<(u16, String)> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(s, "GET {target} HTTP/1.0\r\nHost: unit\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp.split_once("\r\n\r\n").ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "control socket sent no HTTP header",
        )
    })?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad status line {head:?}"),
            )
        })?;
    Ok((status, body.to_string()))
}

/// The unit's stats, read over its control socket.
pub fn fetch_stats(socket: &Path) -> io::Result<UnitStats> {
    let (status, body) = get(socket, "/stats", Duration::from_secs(2))?;
    if status != 200 {
        return Err(io::Error::other(format!("stats: HTTP {status}")));
    }
    serde_json::from_str(&body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serves_ready_stats_metrics() {
        let dir = std::env::temp_dir().join(format!("dva-ctl-test-{}", std::process::id()));
        let path = dir.join("u.sock");
        let cell = StatsCell::new(UnitStats {
            appliance: "a".into(),
            unit: 3,
            role: "dataplane".into(),
            ..Default::default()
        });
        let ready = Arc::new(AtomicBool::new(false));
        let (inspector, requests) = crate::inspect::channel();
        let _srv = ControlServer::start(&path, cell.clone(), ready.clone(), inspector).unwrap();
        assert_eq!(get(&path, "/ready", Duration::from_secs(2)).unwrap().0, 503);
        ready.store(true, Ordering::Release);
        assert_eq!(get(&path, "/ready", Duration::from_secs(2)).unwrap().0, 200);
        let mut s = cell.snapshot();
        s.rx_packets = 42;
        s.drops.insert("malformed".into(), 2);
        assert!(cell.try_publish(s));
        let got = fetch_stats(&path).unwrap();
        assert_eq!(got.rx_packets, 42);
        let (st, m) = get(&path, "/metrics", Duration::from_secs(2)).unwrap();
        assert_eq!(st, 200);
        assert!(
            m.contains("dva_rx_packets_total{appliance=\"a\",unit=\"3\",role=\"dataplane\"} 42"),
            "{m}"
        );
        assert!(m.contains("reason=\"malformed\"} 2"), "{m}");
        assert_eq!(get(&path, "/nope", Duration::from_secs(2)).unwrap().0, 404);
        // Inspection: a bad filter is refused before the data path is asked; a good one is
        // answered by whoever polls the queue (here: this thread).
        let (st, why) = get(&path, "/flows?port=x", Duration::from_secs(2)).unwrap();
        assert_eq!(st, 400, "{why}");
        assert!(why.contains("port"), "{why}");
        let answer = std::thread::spawn(move || {
            if let Ok(Request::Config { reply }) = requests.recv_timeout(Duration::from_secs(5)) {
                let _ = reply.send(serde_json::json!({"role": "dataplane"}));
            }
        });
        let (st, body) = get(&path, "/config", Duration::from_secs(5)).unwrap();
        assert_eq!((st, body.as_str()), (200, r#"{"role":"dataplane"}"#));
        answer.join().unwrap();
        let _ = std::fs::remove_dir_all(dir);
    }
}
