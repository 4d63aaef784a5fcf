//! A sampled stream of flow and drop events from the data path (`dva monitor`, issue #15), in
//! the manner of `cilium monitor` / `hubble observe`.
//!
//! A [`Session`] is handed to the data path like a capture tap (through the inspection queue)
//! and lives in an `Option` there: with no session, each event site costs one predictable
//! branch and nothing is allocated. With one, an event that passes the [`EventFilter`] spends
//! a token of the session's bucket (`rate` events a second per unit) and is queued without
//! waiting; an event over the rate or meeting a full queue is dropped and counted in `lost`,
//! which the control socket reports in the stream as `{"type":"lost","count":N}` lines. The
//! packet path never waits on the reader.
//!
//! On the wire each [`MonitorEvent`] is one JSON object per line (`application/x-ndjson`),
//! unit → `dva serve` → CLI.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use dva_flow::FlowKey;

use crate::inspect::{
    parse_duration, parse_host, parse_port, parse_proto, parse_unit, percent_encode, query_pairs,
    Tuple,
};
use crate::reply::TokenBucket;

/// Events a second per unit when the request does not say, and at most.
pub const DEFAULT_RATE: u32 = 1000;
pub const MAX_RATE: u32 = 100_000;
/// How long a session runs when the request does not say (the CLI runs until Ctrl-C), and at
/// most: an abandoned session ends by itself.
pub const MAX_SECS: u64 = 3600;
/// Events queued between the data path and the thread writing the stream.
pub const QUEUE: usize = 4096;

/// Which events a session wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Types {
    Flow,
    Drop,
    #[default]
    All,
}

impl Types {
    pub fn name(self) -> &'static str {
        match self {
            Types::Flow => "flow",
            Types::Drop => "drop",
            Types::All => "all",
        }
    }
    fn flows(self) -> bool {
        self != Types::Drop
    }
    fn drops(self) -> bool {
        self != Types::Flow
    }
}

/// Which events pass: all conditions must hold; an empty filter passes everything. An event
/// with no tuple (a datagram that did not parse) passes only an empty filter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EventFilter {
    pub host: Option<IpAddr>,
    pub port: Option<u16>,
    pub proto: Option<u8>,
}

impl EventFilter {
    pub fn is_empty(&self) -> bool {
        self.host.is_none() && self.port.is_none() && self.proto.is_none()
    }

    pub fn matches(&self, key: Option<&FlowKey>) -> bool {
        if self.is_empty() {
            return true;
        }
        let Some(k) = key else {
            return false;
        };
        self.host.is_none_or(|h| k.src == h || k.dst == h)
            && self.proto.is_none_or(|p| k.proto == p)
            && self.port.is_none_or(|p| k.src_port == p || k.dst_port == p)
    }
}

/// A monitor request: what, how much, how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MonitorSpec {
    pub types: Types,
    /// Only this unit (the management tool's business; a unit ignores it).
    pub unit: Option<u32>,
    pub rate: u32,
    pub filter: EventFilter,
    pub duration: Duration,
}

impl Default for MonitorSpec {
    fn default() -> Self {
        MonitorSpec {
            types: Types::All,
            unit: None,
            rate: DEFAULT_RATE,
            filter: EventFilter::default(),
            duration: Duration::from_secs(MAX_SECS),
        }
    }
}

const KEYS: [&str; 7] = ["type", "unit", "rate", "host", "port", "proto", "duration"];

impl MonitorSpec {
    /// Parse `type=drop|flow|all&unit=..&rate=..&host=..&port=..&proto=..&duration=30s`; each
    /// value is checked, with a message naming the one that is wrong.
    pub fn from_query(query: &str) -> Result<MonitorSpec, String> {
        let mut m = MonitorSpec::default();
        for (k, v) in query_pairs(query, &KEYS)? {
            match k.as_str() {
                "type" => {
                    m.types = match v.as_str() {
                        "flow" => Types::Flow,
                        "drop" => Types::Drop,
                        "all" | "" => Types::All,
                        _ => return Err(format!("type {v:?}: use flow, drop or all")),
                    }
                }
                "unit" => m.unit = Some(parse_unit(&v)?),
                "rate" => {
                    m.rate = v
                        .parse()
                        .ok()
                        .filter(|n| (1..=MAX_RATE).contains(n))
                        .ok_or_else(|| {
                            format!("rate {v:?} is outside 1..={MAX_RATE} events a second")
                        })?
                }
                "host" => m.filter.host = Some(parse_host(&v)?),
                "port" => m.filter.port = Some(parse_port(&v)?),
                "proto" => m.filter.proto = Some(parse_proto(&v)?),
                "duration" => m.duration = parse_duration(&v, MAX_SECS)?,
                _ => {}
            }
        }
        Ok(m)
    }

    /// The query [`MonitorSpec::from_query`] reads back into this spec.
    pub fn to_query(&self) -> String {
        let mut q = vec![
            format!("type={}", self.types.name()),
            format!("rate={}", self.rate),
            format!("duration={}ms", self.duration.as_millis()),
        ];
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

/// What happened to a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlowEvent {
    /// A connection was created (the rule named accepted its first packet).
    New,
    /// A connection timed out of the table (closed TCP ones leave this way too, after their
    /// short TIME_WAIT/CLOSE timeout).
    Expired,
}

/// The kind of a line in the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventType {
    Flow,
    Drop,
    /// `count` events were dropped (over the rate, or the reader too slow) since the last one.
    Lost,
}

/// One event: flat, the fields that do not apply left out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MonitorEvent {
    #[serde(rename = "type")]
    pub kind: EventType,
    /// Milliseconds since the Unix epoch.
    pub ts_ms: u64,
    pub unit: u32,
    /// Flow events: new or expired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<FlowEvent>,
    /// Drop events: the data plane's drop reason (`dva stats` counts them under these names).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The firewall rule that accepted (flow) or dropped (drop) it: its name, `#<index>` when
    /// unnamed, `(default)` for the default policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proto: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src_port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst_port: Option<u16>,
    /// The spec interface the packet came in on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bucket: Option<u16>,
    /// Source / destination NAT: how the flow's first packet left.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat: Option<Tuple>,
    /// Load balancer: the backend (address:port) chosen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// Expired flows: packets and bytes each way, and how long the flow lived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orig_packets: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orig_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_packets: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_secs: Option<f64>,
    /// Lost events: how many since the last report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
}

impl MonitorEvent {
    /// An event of `kind` from `unit`, now, with the tuple of `key` when there is one.
    pub fn new(kind: EventType, unit: u32, key: Option<&FlowKey>) -> MonitorEvent {
        MonitorEvent {
            kind,
            ts_ms: now_ms(),
            unit,
            event: None,
            reason: None,
            rule: None,
            proto: key.map(|k| k.proto),
            src: key.map(|k| k.src),
            src_port: key.map(|k| k.src_port),
            dst: key.map(|k| k.dst),
            dst_port: key.map(|k| k.dst_port),
            interface: None,
            bucket: None,
            nat: None,
            backend: None,
            orig_packets: None,
            orig_bytes: None,
            reply_packets: None,
            reply_bytes: None,
            duration_secs: None,
            count: None,
        }
    }

    /// The report of `count` lost events.
    pub fn lost(unit: u32, count: u64) -> MonitorEvent {
        MonitorEvent {
            count: Some(count),
            ..MonitorEvent::new(EventType::Lost, unit, None)
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One monitor session on the data path (see the module doc).
pub struct Session {
    types: Types,
    filter: EventFilter,
    budget: TokenBucket,
    until: Instant,
    out: SyncSender<MonitorEvent>,
    /// Events that passed the filter but were over the rate or found the queue full.
    lost: Arc<AtomicU64>,
    /// Set by the stream's writer when it stops (the reader went away).
    closed: Arc<AtomicBool>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("types", &self.types)
            .field("filter", &self.filter)
            .finish()
    }
}

impl Session {
    pub fn new(
        spec: &MonitorSpec,
        now: Instant,
        out: SyncSender<MonitorEvent>,
        lost: Arc<AtomicU64>,
        closed: Arc<AtomicBool>,
    ) -> Session {
        let rate = f64::from(spec.rate.max(1));
        Session {
            types: spec.types,
            filter: spec.filter,
            // A second's worth of burst: a short spike is seen whole, a flood is sampled.
            budget: TokenBucket::new(rate, rate, now),
            until: now + spec.duration,
            out,
            lost,
            closed,
        }
    }

    /// The same session for one of a dispatcher's `lanes` (threads): same filter, deadline and
    /// stream, and a share of the event rate, so that together they stay within the session's.
    pub fn fork(&self, lanes: u32) -> Session {
        Session {
            types: self.types,
            filter: self.filter,
            budget: self.budget.share(lanes),
            until: self.until,
            out: self.out.clone(),
            lost: self.lost.clone(),
            closed: self.closed.clone(),
        }
    }

    /// Whether the session is over (deadline passed, or its writer stopped): the owner then
    /// drops it. Checked once per turn.
    pub fn over(&self, now: Instant) -> bool {
        now >= self.until || self.closed.load(Ordering::Relaxed)
    }

    /// Whether flow events about `key` are wanted (then build one and [`Session::offer`] it).
    #[inline]
    pub fn wants_flow(&self, key: Option<&FlowKey>) -> bool {
        self.types.flows() && self.filter.matches(key)
    }

    #[inline]
    pub fn wants_drop(&self, key: Option<&FlowKey>) -> bool {
        self.types.drops() && self.filter.matches(key)
    }

    /// Queue the event `make` builds if the rate allows, else count it lost. Never waits.
    /// False once the reader is gone.
    pub fn offer(&mut self, now: Instant, make: impl FnOnce() -> MonitorEvent) -> bool {
        if !self.budget.take(now) {
            self.lost.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        match self.out.try_send(make()) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                self.lost.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(TrySendError::Disconnected(_)) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn key(dport: u16) -> FlowKey {
        FlowKey {
            proto: 6,
            src: "198.18.1.2".parse().unwrap(),
            dst: "198.18.2.2".parse().unwrap(),
            src_port: 40000,
            dst_port: dport,
        }
    }

    #[test]
    fn events_beyond_the_rate_are_dropped_and_counted_as_lost() {
        let spec = MonitorSpec {
            rate: 10,
            ..Default::default()
        };
        let (tx, rx) = mpsc::sync_channel(100);
        let lost = Arc::new(AtomicU64::new(0));
        let now = Instant::now();
        let mut s = Session::new(&spec, now, tx, lost.clone(), Default::default());
        let k = key(80);
        for _ in 0..25 {
            assert!(s.offer(now, || MonitorEvent::new(EventType::Drop, 1, Some(&k))));
        }
        // The bucket starts with a second's worth (10); the other 15 are lost, not queued.
        assert_eq!(rx.try_iter().count(), 10);
        assert_eq!(lost.load(Ordering::Relaxed), 15);
        // Half a second later, half a second's worth more.
        let later = now + Duration::from_millis(500);
        for _ in 0..10 {
            s.offer(later, || MonitorEvent::new(EventType::Drop, 1, Some(&k)));
        }
        assert_eq!(rx.try_iter().count(), 5);
        assert_eq!(lost.load(Ordering::Relaxed), 20);
    }

    #[test]
    fn a_full_queue_loses_events_and_a_gone_reader_ends_the_session() {
        let (tx, rx) = mpsc::sync_channel(2);
        let lost = Arc::new(AtomicU64::new(0));
        let now = Instant::now();
        let mut s = Session::new(
            &MonitorSpec::default(),
            now,
            tx,
            lost.clone(),
            Default::default(),
        );
        for _ in 0..5 {
            assert!(s.offer(now, || MonitorEvent::lost(1, 0)));
        }
        assert_eq!(lost.load(Ordering::Relaxed), 3);
        drop(rx);
        assert!(!s.offer(now, || MonitorEvent::lost(1, 0)));
        assert!(s.over(now + Duration::from_secs(MAX_SECS)));
    }

    #[test]
    fn specs_parse_round_trip_and_refuse_nonsense() {
        let m = MonitorSpec::from_query(
            "type=drop&unit=3&rate=50&host=198.18.2.2&port=8080&proto=tcp&duration=8s",
        )
        .unwrap();
        assert_eq!((m.types, m.unit, m.rate), (Types::Drop, Some(3), 50));
        assert_eq!(m.duration, Duration::from_secs(8));
        assert_eq!(MonitorSpec::from_query(&m.to_query()).unwrap(), m);
        assert_eq!(MonitorSpec::from_query("").unwrap(), MonitorSpec::default());
        for (q, says) in [
            ("type=trace", "type"),
            ("rate=0", "rate"),
            ("rate=100001", "rate"),
            ("duration=2h", "duration"),
            ("duration=0s", "duration"),
            ("host=x", "host"),
            ("port=-1", "port"),
            ("proto=gre2", "proto"),
            ("verdict=drop", "unknown parameter"),
        ] {
            let e = MonitorSpec::from_query(q).unwrap_err();
            assert!(e.contains(says), "{q}: {e}");
        }
    }

    #[test]
    fn filters_and_types_select_events() {
        let f = |q: &str| MonitorSpec::from_query(q).unwrap();
        let (tx, _rx) = mpsc::sync_channel(1);
        let s = |m: MonitorSpec| {
            Session::new(
                &m,
                Instant::now(),
                tx.clone(),
                Default::default(),
                Default::default(),
            )
        };
        let k = key(8080);
        assert!(s(f("")).wants_drop(Some(&k)) && s(f("")).wants_flow(None));
        assert!(!s(f("type=flow")).wants_drop(Some(&k)));
        assert!(!s(f("type=drop")).wants_flow(Some(&k)));
        assert!(s(f("port=8080&host=198.18.1.2&proto=tcp")).wants_drop(Some(&k)));
        assert!(!s(f("port=80")).wants_drop(Some(&k)));
        assert!(!s(f("port=80")).wants_drop(None), "no tuple: no match");
        let line = serde_json::to_string(&MonitorEvent::lost(2, 7)).unwrap();
        assert!(line.contains(r#""type":"lost""#) && line.contains(r#""count":7"#));
    }
}
