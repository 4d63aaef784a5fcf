//! Looking inside a running unit (issue #15): its connection table (`GET /flows` on the control
//! socket), the role config it runs (`GET /config`) and packet capture (`GET /capture`).
//!
//! Capture ([`CaptureSpec`]) installs a [`Tap`] on the dispatcher's chosen interface or on its
//! backplane endpoint; the control socket streams what the tap queues as pcap, on a thread of
//! its own (one capture at a time per unit), until the packet budget or the deadline.
//!
//! The control thread never touches the data path's state: it sends a [`Request`] through a
//! small bounded queue that the data path polls once per turn (one `try_recv`, like config
//! pushes) and waits for the answer with a timeout. The data path answers between batches and
//! never waits on the control side; a full queue is "busy", a unit not yet running a role has
//! nobody polling and the asker times out.
//!
//! Every request is bounded: the query is at most [`MAX_QUERY`] bytes, a flow listing at most
//! [`MAX_LIMIT`] entries (the data plane stops walking its table once it has `limit` and says
//! the listing was cut).

use std::net::IpAddr;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use dva_flow::FlowKey;
use dva_io::capture::{CaptureFilter, Tap, MAX_SNAPLEN};
use dva_services::conntrack::{ConnState, TcpState};
use dva_wire::ip_proto;

/// Longest query string accepted (the filters are a handful of short values).
pub const MAX_QUERY: usize = 1024;
/// Flows listed when the request does not say.
pub const DEFAULT_LIMIT: usize = 1000;
/// Most flows one listing may ask for: the answer is built in memory on the data path's turn.
pub const MAX_LIMIT: usize = 100_000;
/// Requests waiting for the data path; more are refused as busy (the API is not a queue).
const QUEUE: usize = 4;

/// What a flow listing selects. Addresses and ports are those of the connection's original
/// direction (the packet that opened it), as `conntrack -L` filters them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowFilter {
    pub src: Option<IpNet>,
    pub dst: Option<IpNet>,
    /// Either end's port.
    pub port: Option<u16>,
    pub proto: Option<u8>,
    /// A TCP state name (`established`, `syn_sent`...) or `replied` / `unreplied`.
    pub state: Option<String>,
    /// Only this data plane (the management tool asks only it; a unit checks it is itself).
    pub unit: Option<u32>,
    /// Also list the copies held for failover (marked `replica`).
    pub replicas: bool,
    pub limit: usize,
}

impl Default for FlowFilter {
    fn default() -> Self {
        FlowFilter {
            src: None,
            dst: None,
            port: None,
            proto: None,
            state: None,
            unit: None,
            replicas: false,
            limit: DEFAULT_LIMIT,
        }
    }
}

/// Every value `state=` accepts.
pub fn state_names() -> Vec<&'static str> {
    let mut v: Vec<&'static str> = TcpState::ALL.iter().map(|s| s.name()).collect();
    v.extend(["replied", "unreplied"]);
    v
}

/// How a connection's state is shown and filtered: the TCP state, else whether a reply came.
pub fn state_name(s: ConnState) -> &'static str {
    match s {
        ConnState::Tcp(t) => t.name(),
        _ if s.replied() => "replied",
        _ => "unreplied",
    }
}

/// `tcp`, `udp`, `icmp`, `icmpv6`, `sctp`, `udplite` or a protocol number.
pub fn parse_proto(s: &str) -> Result<u8, String> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "tcp" => ip_proto::TCP,
        "udp" => ip_proto::UDP,
        "icmp" => ip_proto::ICMP,
        "icmpv6" | "ipv6-icmp" => ip_proto::ICMPV6,
        "sctp" => ip_proto::SCTP,
        "udplite" => ip_proto::UDPLITE,
        n => n.parse::<u8>().map_err(|_| {
            format!("proto {s:?}: use tcp, udp, icmp, icmpv6, sctp, udplite or a number 0..=255")
        })?,
    })
}

/// The name of a protocol number, for tables.
pub fn proto_name(p: u8) -> String {
    match p {
        ip_proto::TCP => "tcp".into(),
        ip_proto::UDP => "udp".into(),
        ip_proto::ICMP => "icmp".into(),
        ip_proto::ICMPV6 => "icmpv6".into(),
        ip_proto::SCTP => "sctp".into(),
        ip_proto::UDPLITE => "udplite".into(),
        n => n.to_string(),
    }
}

/// An address (a host) or a prefix.
pub fn parse_net(what: &str, s: &str) -> Result<IpNet, String> {
    if let Ok(n) = s.parse::<IpNet>() {
        return Ok(n.trunc());
    }
    s.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("{what} {s:?} is neither an IP address nor a prefix (a.b.c.d/len)"))
}

/// `unit=` of a query: a unit id.
pub fn parse_unit(s: &str) -> Result<u32, String> {
    s.parse()
        .map_err(|_| format!("unit {s:?} is not a unit id"))
}

/// `port=` of a query: either end's port.
pub fn parse_port(s: &str) -> Result<u16, String> {
    s.parse()
        .map_err(|_| format!("port {s:?} is not a number 0..=65535"))
}

/// `host=` of a query: one address.
pub fn parse_host(s: &str) -> Result<IpAddr, String> {
    s.parse()
        .map_err(|_| format!("host {s:?} is not an IP address"))
}

/// `duration=` of a query (`10s`, `500ms`, ...): more than 0 and at most `max_secs`.
pub fn parse_duration(s: &str, max_secs: u64) -> Result<Duration, String> {
    let ms = dva_proto::spec::parse_duration_ms(s).map_err(|e| format!("duration {s:?}: {e}"))?;
    if ms == 0 || ms > max_secs * 1000 {
        return Err(format!("duration {s:?} is outside (0, {max_secs}s]"));
    }
    Ok(Duration::from_millis(ms))
}

/// The `key=value` pairs of a query string, percent-decoded, each key at most once and from
/// `known`. Bounded: the whole query is at most [`MAX_QUERY`] bytes.
pub fn query_pairs(query: &str, known: &[&str]) -> Result<Vec<(String, String)>, String> {
    if query.len() > MAX_QUERY {
        return Err(format!(
            "query of {} bytes: at most {MAX_QUERY}",
            query.len()
        ));
    }
    let mut out: Vec<(String, String)> = Vec::new();
    for item in query.split('&').filter(|i| !i.is_empty()) {
        let (k, v) = item.split_once('=').unwrap_or((item, ""));
        let (k, v) = (percent_decode(k)?, percent_decode(v)?);
        if !known.contains(&k.as_str()) {
            return Err(format!(
                "unknown parameter {k:?} (known: {})",
                known.join(", ")
            ));
        }
        if out.iter().any(|(seen, _)| *seen == k) {
            return Err(format!("parameter {k:?} given twice"));
        }
        out.push((k, v));
    }
    Ok(out)
}

fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = b
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("bad percent escape in {s:?}"))?;
                out.push(hex);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not UTF-8 once decoded"))
}

/// `a%3Ab` for values that carry characters with a meaning in a query.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.bytes() {
        match c {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b':' | b'/' => {
                out.push(c as char)
            }
            _ => out.push_str(&format!("%{c:02X}")),
        }
    }
    out
}

fn parse_bool(k: &str, v: &str) -> Result<bool, String> {
    match v {
        "" | "1" | "true" | "yes" => Ok(true),
        "0" | "false" | "no" => Ok(false),
        _ => Err(format!("{k}={v:?}: use true or false")),
    }
}

const FLOW_KEYS: [&str; 8] = [
    "src", "dst", "port", "proto", "state", "unit", "replicas", "limit",
];

impl FlowFilter {
    /// Parse `src=..&dst=..&port=..&proto=..&state=..&unit=..&replicas=true&limit=..`; each
    /// value is checked, with a message naming the one that is wrong.
    pub fn from_query(query: &str) -> Result<FlowFilter, String> {
        let mut f = FlowFilter::default();
        for (k, v) in query_pairs(query, &FLOW_KEYS)? {
            match k.as_str() {
                "src" => f.src = Some(parse_net("src", &v)?),
                "dst" => f.dst = Some(parse_net("dst", &v)?),
                "port" => f.port = Some(parse_port(&v)?),
                "proto" => f.proto = Some(parse_proto(&v)?),
                "state" => {
                    let s = v.to_ascii_lowercase();
                    if !state_names().contains(&s.as_str()) {
                        return Err(format!(
                            "state {v:?}: use one of {}",
                            state_names().join(", ")
                        ));
                    }
                    f.state = Some(s);
                }
                "unit" => f.unit = Some(parse_unit(&v)?),
                "replicas" => f.replicas = parse_bool("replicas", &v)?,
                "limit" => {
                    f.limit = v
                        .parse()
                        .ok()
                        .filter(|n| (1..=MAX_LIMIT).contains(n))
                        .ok_or_else(|| format!("limit {v:?} is outside 1..={MAX_LIMIT}"))?
                }
                _ => {}
            }
        }
        Ok(f)
    }

    /// The query [`FlowFilter::from_query`] reads back into this filter.
    pub fn to_query(&self) -> String {
        let mut q = vec![format!("limit={}", self.limit)];
        if let Some(n) = self.src {
            q.push(format!("src={}", percent_encode(&n.to_string())));
        }
        if let Some(n) = self.dst {
            q.push(format!("dst={}", percent_encode(&n.to_string())));
        }
        if let Some(p) = self.port {
            q.push(format!("port={p}"));
        }
        if let Some(p) = self.proto {
            q.push(format!("proto={p}"));
        }
        if let Some(s) = &self.state {
            q.push(format!("state={}", percent_encode(s)));
        }
        if let Some(u) = self.unit {
            q.push(format!("unit={u}"));
        }
        if self.replicas {
            q.push("replicas=true".into());
        }
        q.join("&")
    }

    /// Whether a connection opened by a packet with tuple `key`, in state `state`, is listed.
    pub fn matches(&self, key: &FlowKey, state: &str) -> bool {
        self.src.is_none_or(|n| n.contains(&key.src))
            && self.dst.is_none_or(|n| n.contains(&key.dst))
            && self
                .port
                .is_none_or(|p| key.src_port == p || key.dst_port == p)
            && self.proto.is_none_or(|p| key.proto == p)
            && self.state.as_deref().is_none_or(|s| s == state)
    }
}

/// One end-to-end tuple (a translated one: how the flow's first packet left).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tuple {
    pub src: IpAddr,
    pub src_port: u16,
    pub dst: IpAddr,
    pub dst_port: u16,
}

impl From<&FlowKey> for Tuple {
    fn from(k: &FlowKey) -> Tuple {
        Tuple {
            src: k.src,
            src_port: k.src_port,
            dst: k.dst,
            dst_port: k.dst_port,
        }
    }
}

/// One tracked connection as `dva flows` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlowEntry {
    /// The data plane holding it.
    pub unit: u32,
    pub proto: u8,
    /// The original direction (the packet that opened the connection), as it arrived.
    pub src: IpAddr,
    pub src_port: u16,
    pub dst: IpAddr,
    pub dst_port: u16,
    pub bucket: u16,
    pub state: String,
    /// A copy held for failover, not a flow this data plane serves.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replica: bool,
    /// Held by a previous owner of its bucket (after a handover or a scale-out it answers for
    /// packets the new owner has no state for); the listing keeps it only when no current
    /// owner lists the same connection, or with `replicas`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub previous_owner: bool,
    /// Source NAT / destination NAT: how the first packet left.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat: Option<Tuple>,
    /// Load balancer: the backend (address:port) the flow was sent to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    pub orig_packets: u64,
    pub orig_bytes: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
    /// Since the connection was created (on this data plane: a moved one restarts).
    pub age_secs: f64,
    /// Since its last packet.
    pub idle_secs: f64,
}

/// A data plane's answer to a flow listing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FlowList {
    pub flows: Vec<FlowEntry>,
    /// More connections matched than the limit: the listing was cut.
    #[serde(default)]
    pub truncated: bool,
}

/// What the control thread asks the data path.
pub enum Request {
    Flows {
        filter: FlowFilter,
        reply: SyncSender<Result<FlowList, String>>,
    },
    /// The role config being served, with the backplane keys redacted.
    Config {
        reply: SyncSender<serde_json::Value>,
    },
    /// Start a capture session on `interface` (a spec interface name, `backplane`, or `None`:
    /// the first interface), replacing any running one. The answer names where it taps.
    Capture {
        interface: Option<String>,
        tap: Tap,
        reply: SyncSender<Result<String, String>>,
    },
    /// Start a monitor session (data planes), replacing any running one.
    Monitor {
        session: crate::monitor::Session,
        reply: SyncSender<Result<(), String>>,
    },
}

/// Where a capture taps besides the interfaces: the datagrams to and from data planes.
pub const BACKPLANE: &str = "backplane";
/// Packets a capture takes when the request does not say, and at most.
pub const DEFAULT_CAPTURE_COUNT: u64 = 1000;
pub const MAX_CAPTURE_COUNT: u64 = 1_000_000;
/// How long a capture runs when the request does not say, and at most.
pub const DEFAULT_CAPTURE_SECS: u64 = 10;
pub const MAX_CAPTURE_SECS: u64 = 600;

/// A capture request: where, what, how much.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureSpec {
    pub interface: Option<String>,
    /// The dispatcher to capture on (the management tool's business; a unit ignores it).
    pub unit: Option<u32>,
    pub filter: CaptureFilter,
    pub count: u64,
    pub duration: Duration,
    pub snaplen: usize,
}

impl Default for CaptureSpec {
    fn default() -> Self {
        CaptureSpec {
            interface: None,
            unit: None,
            filter: CaptureFilter::default(),
            count: DEFAULT_CAPTURE_COUNT,
            duration: Duration::from_secs(DEFAULT_CAPTURE_SECS),
            snaplen: MAX_SNAPLEN,
        }
    }
}

const CAPTURE_KEYS: [&str; 8] = [
    "interface",
    "unit",
    "count",
    "duration",
    "snaplen",
    "host",
    "port",
    "proto",
];

impl CaptureSpec {
    /// Parse `interface=..&unit=..&count=..&duration=10s&snaplen=..&host=..&port=..&proto=..`.
    pub fn from_query(query: &str) -> Result<CaptureSpec, String> {
        let mut c = CaptureSpec::default();
        for (k, v) in query_pairs(query, &CAPTURE_KEYS)? {
            match k.as_str() {
                "interface" => {
                    let ok =
                        !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_graphic());
                    if !ok {
                        return Err(format!(
                            "interface {v:?}: a spec interface name or backplane"
                        ));
                    }
                    c.interface = Some(v);
                }
                "unit" => c.unit = Some(parse_unit(&v)?),
                "count" => {
                    c.count = v
                        .parse()
                        .ok()
                        .filter(|n| (1..=MAX_CAPTURE_COUNT).contains(n))
                        .ok_or_else(|| format!("count {v:?} is outside 1..={MAX_CAPTURE_COUNT}"))?
                }
                "duration" => c.duration = parse_duration(&v, MAX_CAPTURE_SECS)?,
                "snaplen" => {
                    c.snaplen = v
                        .parse()
                        .ok()
                        .filter(|n| (64..=MAX_SNAPLEN).contains(n))
                        .ok_or_else(|| format!("snaplen {v:?} is outside 64..={MAX_SNAPLEN}"))?
                }
                "host" => c.filter.host = Some(parse_host(&v)?),
                "port" => c.filter.port = Some(parse_port(&v)?),
                "proto" => c.filter.proto = Some(parse_proto(&v)?),
                _ => {}
            }
        }
        Ok(c)
    }

    /// The query [`CaptureSpec::from_query`] reads back into this spec.
    pub fn to_query(&self) -> String {
        let mut q = vec![
            format!("count={}", self.count),
            format!("duration={}ms", self.duration.as_millis()),
            format!("snaplen={}", self.snaplen),
        ];
        if let Some(i) = &self.interface {
            q.push(format!("interface={}", percent_encode(i)));
        }
        if let Some(u) = self.unit {
            q.push(format!("unit={u}"));
        }
        if let Some(h) = self.filter.host {
            q.push(format!("host={}", percent_encode(&h.to_string())));
        }
        if let Some(p) = self.filter.port {
            q.push(format!("port={p}"));
        }
        if let Some(p) = self.filter.proto {
            q.push(format!("proto={p}"));
        }
        q.join("&")
    }
}

/// The control side's end of the request queue.
#[derive(Clone)]
pub struct Inspector {
    tx: SyncSender<Request>,
}

/// The data path's end: polled with `try_recv` once a turn.
pub type Requests = Receiver<Request>;

pub fn channel() -> (Inspector, Requests) {
    let (tx, rx) = mpsc::sync_channel(QUEUE);
    (Inspector { tx }, rx)
}

/// How long the control side waits for the data path (a turn is well under a millisecond; a
/// listing of [`MAX_LIMIT`] flows takes some).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(3);

impl Inspector {
    /// Send the request `make` builds around a reply channel and wait for the answer.
    pub fn ask<T>(&self, make: impl FnOnce(SyncSender<T>) -> Request) -> Result<T, String> {
        let (tx, rx) = mpsc::sync_channel(1);
        match self.tx.try_send(make(tx)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err("the unit is busy with other inspection requests; retry".into())
            }
            Err(TrySendError::Disconnected(_)) => {
                return Err("this unit does not serve inspection requests".into())
            }
        }
        match rx.recv_timeout(ANSWER_TIMEOUT) {
            Ok(v) => Ok(v),
            Err(RecvTimeoutError::Timeout) => Err(format!(
                "the data path did not answer within {ANSWER_TIMEOUT:?} (is the unit configured yet?)"
            )),
            Err(RecvTimeoutError::Disconnected) => Err("the data path dropped the request".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_parse_round_trip_and_refuse_nonsense() {
        let f = FlowFilter::from_query(
            "src=198.18.1.2&dst=198.18.2.0/24&port=80&proto=tcp&state=ESTABLISHED&unit=3&replicas&limit=5",
        )
        .unwrap();
        assert_eq!(f.src, Some("198.18.1.2/32".parse().unwrap()));
        assert_eq!(f.dst, Some("198.18.2.0/24".parse().unwrap()));
        assert_eq!(
            (f.port, f.proto, f.unit, f.limit),
            (Some(80), Some(6), Some(3), 5)
        );
        assert_eq!(f.state.as_deref(), Some("established"));
        assert!(f.replicas);
        assert_eq!(FlowFilter::from_query(&f.to_query()).unwrap(), f);
        let v6 = FlowFilter::from_query("src=2001%3adb8%3A%3A1").unwrap();
        assert_eq!(v6.src, Some("2001:db8::1/128".parse().unwrap()));
        assert_eq!(FlowFilter::from_query("").unwrap(), FlowFilter::default());
        for (q, says) in [
            ("src=nope", "src"),
            ("port=70000", "port"),
            ("proto=gre2", "proto"),
            ("state=open", "state"),
            ("limit=0", "limit"),
            ("limit=100001", "limit"),
            ("colour=red", "unknown parameter"),
            ("port=1&port=2", "twice"),
            ("src=%zz", "percent"),
            ("replicas=maybe", "replicas"),
        ] {
            let e = FlowFilter::from_query(q).unwrap_err();
            assert!(e.contains(says), "{q}: {e}");
        }
        assert!(FlowFilter::from_query(&"a".repeat(MAX_QUERY + 1)).is_err());
    }

    #[test]
    fn filters_match_the_original_tuple() {
        let k = FlowKey {
            proto: 6,
            src: "198.18.1.2".parse().unwrap(),
            dst: "198.18.2.2".parse().unwrap(),
            src_port: 40000,
            dst_port: 80,
        };
        let f = |q: &str| FlowFilter::from_query(q).unwrap();
        assert!(f("").matches(&k, "established"));
        assert!(f("src=198.18.1.0/24&port=40000&proto=tcp").matches(&k, "established"));
        assert!(f("dst=198.18.2.2&port=80&state=established").matches(&k, "established"));
        assert!(!f("src=198.18.2.2").matches(&k, "established"));
        assert!(!f("proto=udp").matches(&k, "established"));
        assert!(!f("port=81").matches(&k, "established"));
        assert!(!f("state=syn_sent").matches(&k, "established"));
    }

    #[test]
    fn capture_specs_parse_round_trip_and_are_bounded() {
        let c = CaptureSpec::from_query(
            "interface=backplane&unit=1&count=5&duration=2s&snaplen=128&host=198.18.1.2&port=80&proto=tcp",
        )
        .unwrap();
        assert_eq!(c.interface.as_deref(), Some("backplane"));
        assert_eq!((c.unit, c.count, c.snaplen), (Some(1), 5, 128));
        assert_eq!(c.duration, Duration::from_secs(2));
        assert_eq!(c.filter.port, Some(80));
        assert_eq!(CaptureSpec::from_query(&c.to_query()).unwrap(), c);
        assert_eq!(CaptureSpec::from_query("").unwrap(), CaptureSpec::default());
        for (q, says) in [
            ("count=0", "count"),
            ("count=1000001", "count"),
            ("duration=11m", "duration"),
            ("duration=0s", "duration"),
            ("snaplen=10", "snaplen"),
            ("host=example.com", "host"),
            ("interface=a%20b", "interface"),
            ("bpf=tcp", "unknown parameter"),
        ] {
            let e = CaptureSpec::from_query(q).unwrap_err();
            assert!(e.contains(says), "{q}: {e}");
        }
    }

    #[test]
    fn an_unserved_queue_is_an_error_not_a_hang() {
        let (ins, rx) = channel();
        drop(rx);
        let e = ins.ask(|reply| Request::Config { reply }).unwrap_err();
        assert!(e.contains("does not serve"), "{e}");
    }
}
