//! State handover between data planes over the backplane: how a draining data plane past its
//! deadline gives its remaining flows to the current owners of their buckets without losing or
//! reordering a packet (OpenNF's loss-free, order-preserving move, on our punt path).
//!
//! For each bucket `b` the leaving data plane X still holds flows of, towards `b`'s owner O:
//! 1. X → O `State{b, conns}` (one or more datagrams, the last one marked). O imports them.
//! 2. On the last chunk O starts *holding* bucket `b` (packets of `b` are buffered, not
//!    processed or punted) and sends X a `Marker{b}` on the same socket pair its punts use, so the
//!    marker arrives after every packet O punted to X before.
//! 3. X, on the marker, has processed all of those punts; it answers `Done{b}` and forgets `b`.
//! 4. O, on `Done{b}`, replays the held packets in arrival order against the imported state and
//!    stops holding. A lost message is covered by X resending the state and O releasing a hold
//!    after [`HOLD_LIMIT`].
//!
//! O times each bucket from its first `State` to the end of its hold (`dva_handover_seconds`):
//! it sees both ends, and it is still there to be scraped once X has been stopped.
//!
//! Messages travel as GENEVE with protocol type [`PROTO_HANDOVER`] and a JSON body: rare control
//! traffic, readable in a capture. The exception is `Replicate`, sent for every change of every
//! replicated flow: a compact versioned binary body ([`binary`]). [`decode`] takes either.

pub mod binary;

use std::time::Duration;

use dva_flow::UnitId;
use dva_services::conntrack::Conn;
use dva_services::nat::Binding;
use serde::{Deserialize, Serialize};

/// GENEVE protocol type of handover messages (IEEE 802 local experimental ethertype).
pub const PROTO_HANDOVER: u16 = 0x88b5;

/// Longest a bucket is held waiting for the previous owner's `Done`.
pub const HOLD_LIMIT: Duration = Duration::from_millis(250);
/// Packets held per data plane at most (beyond that they are processed at once).
pub const HOLD_MAX_PACKETS: usize = 16_384;
/// Bytes held per data plane at most: 16 384 wire frames, or a few hundred super-packets.
pub const HOLD_MAX_BYTES: usize = 32 << 20;
/// The state of a bucket is sent again if no marker came back within this long.
pub const RESEND_AFTER: Duration = Duration::from_millis(300);
pub const MAX_RESENDS: u32 = 10;
/// Handover datagrams stay well under the backplane's 9000-byte MTU.
pub const MAX_BODY: usize = 8000;

/// Flow state of one kind or another: connection tracking entries and, when the chain has them,
/// NAT bindings and load-balancer flows. Each moves with its bucket; each stage adds and takes
/// its own ([`dva_services::stage::Stage::export_bucket`], `import`).
pub use dva_services::stage::FlowSet as Flows;

/// Split into parts whose JSON stays under [`MAX_BODY`] with room for the envelope (an
/// entry larger than that goes alone: it still fits a datagram). Always at least one part.
fn split(flows: Flows) -> Vec<Flows> {
    let mut parts = vec![Flows::default()];
    let mut size = 0;
    let budget = MAX_BODY - 150;
    let mut room = |parts: &mut Vec<Flows>, len: usize| {
        let last = parts.len() - 1;
        if !parts[last].is_empty() && size + len > budget {
            parts.push(Flows::default());
            size = 0;
        }
        size += len;
    };
    let len = |v: Result<Vec<u8>, serde_json::Error>| v.map_or(0, |v| v.len()) + 1;
    for c in flows.conns {
        room(&mut parts, len(serde_json::to_vec(&c)) + 10);
        if let Some(p) = parts.last_mut() {
            p.conns.push(c);
        }
    }
    for b in flows.nat {
        room(&mut parts, len(serde_json::to_vec(&b)) + 10);
        if let Some(p) = parts.last_mut() {
            p.nat.push(b);
        }
    }
    for b in flows.lb {
        room(&mut parts, len(serde_json::to_vec(&b)) + 10);
        if let Some(p) = parts.last_mut() {
            p.lb.push(b);
        }
    }
    parts
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Handover {
    State {
        from: UnitId,
        bucket: u16,
        last: bool,
        #[serde(default)]
        conns: Vec<Conn>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        nat: Vec<Binding>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        lb: Vec<Binding>,
    },
    Marker {
        from: UnitId,
        bucket: u16,
    },
    Done {
        from: UnitId,
        bucket: u16,
    },
    /// Copies of flows created or changed at `from`, for the buckets whose backup the receiver
    /// is (it takes them over if `from` dies).
    Replicate {
        from: UnitId,
        #[serde(default)]
        conns: Vec<Conn>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        nat: Vec<Binding>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        lb: Vec<Binding>,
    },
}

/// `Replicate` bodies of at most [`MAX_BODY`] bytes, in the binary encoding.
pub fn replicate_bodies(from: UnitId, flows: Flows) -> Vec<Vec<u8>> {
    binary::replicate_bodies(from, &flows, MAX_BODY)
}

/// A handover message from its body: binary (`Replicate`) or JSON (any, including a `Replicate`
/// from a peer that predates the binary encoding). `None` if it is neither.
pub fn decode(body: &[u8]) -> Option<Handover> {
    if body.first() == Some(&binary::MAGIC) {
        let (from, f) = binary::decode_replicate(body)?;
        return Some(Handover::Replicate {
            from,
            conns: f.conns,
            nat: f.nat,
            lb: f.lb,
        });
    }
    serde_json::from_slice(body).ok()
}

/// Split a bucket's flows into `State` bodies of at most [`MAX_BODY`] bytes, the last one marked
/// (an empty bucket still gets one, so the receiver can answer).
pub fn state_bodies(from: UnitId, bucket: u16, flows: Flows) -> Vec<Vec<u8>> {
    let parts = split(flows);
    let n = parts.len();
    parts
        .into_iter()
        .enumerate()
        .map(|(i, f)| {
            serde_json::to_vec(&Handover::State {
                from,
                bucket,
                last: i + 1 == n,
                conns: f.conns,
                nat: f.nat,
                lb: f.lb,
            })
            .unwrap_or_default()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use dva_flow::FlowKey;
    use dva_services::conntrack::ConnState;

    fn conn(i: u16) -> Conn {
        Conn {
            key: FlowKey {
                proto: 17,
                src: "198.18.1.2".parse().unwrap(),
                dst: "198.18.2.2".parse().unwrap(),
                src_port: 1000 + i,
                dst_port: 53,
            },
            bucket: 7,
            state: ConnState::Udp { replied: true },
            created: 1,
            last_seen: 2,
            orig_packets: 3,
            orig_bytes: 4,
            reply_packets: 5,
            reply_bytes: 6,
            tcp_window: Default::default(),
        }
    }

    #[test]
    fn bodies_fit_and_only_the_last_is_marked() {
        let conns: Vec<Conn> = (0..500).map(conn).collect();
        let bodies = state_bodies(
            3,
            7,
            Flows {
                conns: conns.clone(),
                ..Default::default()
            },
        );
        assert!(bodies.len() > 1);
        let mut back = Vec::new();
        for (i, b) in bodies.iter().enumerate() {
            assert!(b.len() <= MAX_BODY, "{}", b.len());
            match serde_json::from_slice::<Handover>(b).unwrap() {
                Handover::State {
                    from,
                    bucket,
                    last,
                    conns,
                    ..
                } => {
                    assert_eq!((from, bucket), (3, 7));
                    assert_eq!(last, i == bodies.len() - 1);
                    back.extend(conns);
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(back, conns);
        // An empty bucket still gets its (last) message, so the receiver can answer.
        assert_eq!(state_bodies(3, 7, Flows::default()).len(), 1);
        assert!(replicate_bodies(3, Flows::default()).is_empty());
    }

    #[test]
    fn decode_takes_binary_replicate_and_json_messages() {
        let flows = Flows {
            conns: (0..3).map(conn).collect(),
            ..Default::default()
        };
        let bin = replicate_bodies(4, flows.clone());
        assert_eq!(bin.len(), 1);
        let msg = Handover::Replicate {
            from: 4,
            conns: flows.conns,
            nat: Vec::new(),
            lb: Vec::new(),
        };
        assert_eq!(decode(&bin[0]), Some(msg.clone()));
        // An older peer's JSON Replicate, and the JSON control messages.
        assert_eq!(decode(&serde_json::to_vec(&msg).unwrap()), Some(msg));
        let done = Handover::Done { from: 2, bucket: 9 };
        assert_eq!(decode(&serde_json::to_vec(&done).unwrap()), Some(done));
        assert_eq!(decode(b"\xd1garbage"), None);
        assert_eq!(decode(b""), None);
    }
}
