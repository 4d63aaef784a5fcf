//! Stateful firewall: nftables' `ct state established,related accept`, then ordered rules, then the
//! default policy.
//!
//! Per packet ([`Firewall::process`]):
//! 1. ICMP errors quoting a tracked flow are *related*: accepted without touching any state. The
//!    quote must be a packet of the flow as it was sent, and the error must go back to the host
//!    that sent it (outer destination = quoted source), as the kernel's `nf_conntrack_inet_error`
//!    demands; an error that quotes a tracked flow but goes elsewhere is dropped as
//!    `IcmpErrorUnrelated` (else anyone who learns a flow's tuple could aim errors about it at
//!    any host behind the firewall).
//! 2. Packets of a tracked connection are *established*: accepted, and they advance the
//!    connection's state (TCP state machine, UDP "replied", timeouts, counters). A TCP segment that
//!    does not fit the connection's state is dropped as `InvalidState`, one outside its window
//!    (a blind RST, data far beyond what the receiver accepts) as `TcpOutOfWindow`; neither
//!    changes the connection.
//! 3. Anything else is *new*. With [`NewFlowPolicy::Refuse`] the answer is [`Verdict::NoState`] and
//!    nothing is created (the data plane then asks the bucket's previous owner). With
//!    [`NewFlowPolicy::Create`], a packet that can open a connection (TCP SYN, UDP, ICMP query, other
//!    protocols) goes through the rules and, if accepted, is tracked; one that cannot (TCP without a
//!    SYN, an ICMP reply) is dropped as `InvalidState`; ICMP errors and informational ICMP go
//!    through the rules without creating state.
//!
//! Changing the rules ([`Firewall::set_rules`]) leaves tracked connections alone, as nftables does.

mod index;
mod rules;

use dva_flow::FlowKey;
use dva_wire::ip_proto;
use serde::Serialize;

use crate::conntrack::{self, Conntrack, Update};
use crate::icmp::{self, IcmpClass};
use rules::CompiledRules;
pub use rules::{Action, PortRange, Rule, RuleError, RuleSet};

pub use crate::conntrack::{
    Conn, ConnState, ConntrackConfig, CreateError, TcpSegment, TcpState, Timeouts,
};

/// What the caller extracted from one IP packet (the data plane does this with the wire crate).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketInfo {
    /// Index into the appliance's interface list.
    pub ingress_if: u8,
    /// The packet's own 5-tuple (direction as sent).
    pub key: FlowKey,
    /// TCP flags byte (FIN=1 SYN=2 RST=4 PSH=8 ACK=0x10), 0 for other protocols.
    pub tcp_flags: u8,
    /// Sequence numbers, window and options for window tracking; zero for other protocols.
    pub tcp: TcpSegment,
    /// `(type, code)` for ICMPv4 / ICMPv6.
    pub icmp: Option<(u8, u8)>,
    /// For ICMP errors: the flow key of the quoted packet, as it was sent (so its reverse is the
    /// direction of the error).
    pub icmp_inner: Option<FlowKey>,
    /// IP packet length, for counters.
    pub len: u32,
}

/// What to do with a packet that belongs to no tracked connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NewFlowPolicy {
    /// Evaluate the rules and track the connection if they accept it.
    Create,
    /// Create nothing and answer [`Verdict::NoState`] (the caller will punt the packet).
    Refuse,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Drop(DropReason),
    /// Drop and answer the sender with this; no state was created.
    Reject(RejectKind),
    /// No tracked connection and the policy was [`NewFlowPolicy::Refuse`].
    NoState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    /// A rule with action `drop` matched (or `reject`, for a packet that must not be answered:
    /// an ICMP error).
    RuleDrop,
    /// No rule matched and the default action drops.
    DefaultPolicy,
    /// The packet does not fit the connection it belongs to, or cannot start one (TCP without a
    /// SYN, an ICMP reply, invalid TCP flags).
    InvalidState,
    /// The rules accepted a new connection but the table is at `max_entries`.
    TableFull,
    /// An ICMP error quoting a tracked flow, sent to a host other than the quoted packet's
    /// source.
    IcmpErrorUnrelated,
    /// A TCP segment of a tracked connection outside its window: a RST that is not in the
    /// window, data far beyond (or long before) what the receiver accepts, an ACK of data never
    /// sent.
    TcpOutOfWindow,
}

impl DropReason {
    pub const ALL: [DropReason; 6] = [
        DropReason::RuleDrop,
        DropReason::DefaultPolicy,
        DropReason::InvalidState,
        DropReason::TableFull,
        DropReason::IcmpErrorUnrelated,
        DropReason::TcpOutOfWindow,
    ];

    pub fn name(self) -> &'static str {
        match self {
            DropReason::RuleDrop => "rule_drop",
            DropReason::DefaultPolicy => "default_policy",
            DropReason::InvalidState => "invalid_state",
            DropReason::TableFull => "table_full",
            DropReason::IcmpErrorUnrelated => "icmp_error_unrelated",
            DropReason::TcpOutOfWindow => "tcp_out_of_window",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectKind {
    /// Answer with a TCP RST.
    TcpReset,
    /// Answer with ICMP / ICMPv6 destination (port) unreachable.
    IcmpPortUnreachable,
    /// Answer with ICMP administratively prohibited (not produced by the current actions; for a
    /// future `reject with admin-prohibited`).
    IcmpAdminProhibited,
}

/// Packet counters of one firewall instance (one per data-path thread; sum them to report).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FirewallStats {
    /// Packets of tracked connections.
    pub established: u64,
    /// ICMP errors about tracked connections.
    pub related: u64,
    /// Connections created.
    pub created: u64,
    /// Packets accepted by the rules without creating state (ICMP errors, informational ICMP).
    pub accepted_stateless: u64,
    pub rejected: u64,
    pub no_state: u64,
    /// TCP SYNs that re-opened a connection in TIME_WAIT / CLOSE.
    pub reopened: u64,
    /// Indexed like [`DropReason::ALL`].
    pub drops: [u64; DropReason::ALL.len()],
}

/// How a packet relates to connection tracking, from its protocol fields alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Can open a connection (TCP SYN, UDP, ICMP query, other protocols).
    Opener,
    /// Only valid within a connection (TCP without SYN, ICMP replies).
    FollowerOnly,
    /// ICMP error: related to the quoted flow; never creates state.
    IcmpError,
    /// Informational ICMP: rules only, never creates state.
    Stateless,
}

#[inline]
fn kind_of(pkt: &PacketInfo) -> Kind {
    match pkt.key.proto {
        ip_proto::TCP => {
            if conntrack::tcp::starts_connection(pkt.tcp_flags) {
                Kind::Opener
            } else {
                Kind::FollowerOnly
            }
        }
        p @ (ip_proto::ICMP | ip_proto::ICMPV6) => match pkt.icmp {
            Some((ty, _)) => match icmp::classify(p == ip_proto::ICMPV6, ty) {
                IcmpClass::Error => Kind::IcmpError,
                IcmpClass::Request => Kind::Opener,
                IcmpClass::Reply => Kind::FollowerOnly,
                IcmpClass::Other => Kind::Stateless,
            },
            // The caller could not read the ICMP header: judge it by the rules alone.
            None => Kind::Stateless,
        },
        _ => Kind::Opener,
    }
}

/// Whether `pkt` can open a connection (TCP SYN without ACK, UDP, an ICMP query, other
/// protocols), as connection tracking judges it.
pub fn starts_flow(pkt: &PacketInfo) -> bool {
    kind_of(pkt) == Kind::Opener
}

/// The stateful firewall of one data-path thread.
#[derive(Debug)]
pub struct Firewall {
    rules: CompiledRules,
    rule_hits: Vec<u64>,
    default_hits: u64,
    /// The rule the last rule evaluation matched (`None`: the default action), for the data
    /// plane's event stream to name; one store per evaluated packet.
    last_rule: Option<usize>,
    ct: Conntrack,
    stats: FirewallStats,
}

impl Firewall {
    pub fn new(rules: RuleSet, limits: ConntrackConfig) -> Firewall {
        let compiled = CompiledRules::new(&rules);
        Firewall {
            rule_hits: vec![0; compiled.len()],
            rules: compiled,
            default_hits: 0,
            last_rule: None,
            ct: Conntrack::new(limits),
            stats: FirewallStats::default(),
        }
    }

    /// Install a new rule snapshot. Tracked connections keep going; rule hit counters restart.
    pub fn set_rules(&mut self, rules: RuleSet) {
        self.rules = CompiledRules::new(&rules);
        self.rule_hits = vec![0; self.rules.len()];
        self.default_hits = 0;
    }

    /// Classify one packet (see the module doc). `bucket` is the flow bucket the packet was
    /// dispatched to; a connection created here is tagged with it.
    pub fn process(
        &mut self,
        now: u64,
        bucket: u16,
        pkt: &PacketInfo,
        policy: NewFlowPolicy,
    ) -> Verdict {
        let found = if kind_of(pkt) == Kind::IcmpError {
            None
        } else {
            self.ct.lookup(now, &pkt.key)
        };
        self.process_found(now, bucket, pkt, policy, found)
    }

    /// [`Firewall::process`] with the connection-table lookup of `pkt.key` already made
    /// (`found`; ignored for ICMP errors, which are matched by the flow they quote).
    #[inline]
    pub fn process_found(
        &mut self,
        now: u64,
        bucket: u16,
        pkt: &PacketInfo,
        policy: NewFlowPolicy,
        found: Option<(conntrack::ConnId, conntrack::Direction)>,
    ) -> Verdict {
        let kind = kind_of(pkt);
        if kind == Kind::IcmpError {
            return self.icmp_error(now, pkt, policy);
        }
        if let Some((id, dir)) = found {
            match self
                .ct
                .update(now, id, dir, pkt.tcp_flags, &pkt.tcp, pkt.len)
            {
                Update::Tracked | Update::Ignored => {
                    self.stats.established += 1;
                    return Verdict::Accept;
                }
                Update::Invalid => return self.drop(DropReason::InvalidState),
                Update::OutOfWindow => return self.drop(DropReason::TcpOutOfWindow),
                Update::Reopen => {
                    // The old connection is over; the SYN opens a new one, maybe the other way
                    // round, and the rules must allow that one.
                    self.ct.remove(id);
                    self.stats.reopened += 1;
                }
            }
        }
        if policy == NewFlowPolicy::Refuse {
            self.stats.no_state += 1;
            return Verdict::NoState;
        }
        match kind {
            Kind::FollowerOnly => self.drop(DropReason::InvalidState),
            // (ICMP errors were handled above; were one to get here, stateless is right for it.)
            Kind::Stateless | Kind::IcmpError => {
                let v = self.evaluate(pkt, kind == Kind::Stateless);
                if v == Verdict::Accept {
                    self.stats.accepted_stateless += 1;
                }
                v
            }
            Kind::Opener => match self.evaluate(pkt, true) {
                Verdict::Accept => {
                    match self
                        .ct
                        .create(now, bucket, &pkt.key, pkt.tcp_flags, &pkt.tcp, pkt.len)
                    {
                        Ok(_) => {
                            self.stats.created += 1;
                            Verdict::Accept
                        }
                        Err(CreateError::TableFull { .. }) => self.drop(DropReason::TableFull),
                        // Unreachable as classified (openers only); drop rather than trust that.
                        Err(CreateError::NotAStart { .. } | CreateError::Exists { .. }) => {
                            self.drop(DropReason::InvalidState)
                        }
                    }
                }
                v => v,
            },
        }
    }

    fn icmp_error(&mut self, now: u64, pkt: &PacketInfo, policy: NewFlowPolicy) -> Verdict {
        if let Some(inner) = pkt.icmp_inner {
            // The table matches a key in either direction; a quote that is the flow's original
            // or its reply, as sent, was sent by `inner.src`, and only that host may be told.
            if self.ct.contains(now, &inner) {
                if pkt.key.dst != inner.src {
                    return self.drop(DropReason::IcmpErrorUnrelated);
                }
                self.stats.related += 1;
                return Verdict::Accept;
            }
        }
        if policy == NewFlowPolicy::Refuse {
            self.stats.no_state += 1;
            return Verdict::NoState;
        }
        // Never answer an error with an error (RFC 1122 3.2.2): a reject becomes a drop.
        match self.evaluate(pkt, false) {
            Verdict::Accept => {
                self.stats.accepted_stateless += 1;
                Verdict::Accept
            }
            v => v,
        }
    }

    /// Run the rules; count the hit; map the action to a verdict (`may_answer`: a reject may
    /// send something back).
    fn evaluate(&mut self, pkt: &PacketInfo, may_answer: bool) -> Verdict {
        let (index, action) = self.rules.evaluate(pkt);
        self.last_rule = index;
        match index.and_then(|i| self.rule_hits.get_mut(i)) {
            Some(h) => *h += 1,
            None => self.default_hits += 1,
        }
        let reason = if index.is_some() {
            DropReason::RuleDrop
        } else {
            DropReason::DefaultPolicy
        };
        match action {
            Action::Accept => Verdict::Accept,
            Action::Drop => self.drop(reason),
            Action::Reject if !may_answer => self.drop(reason),
            Action::Reject => {
                self.stats.rejected += 1;
                Verdict::Reject(if pkt.key.proto == ip_proto::TCP {
                    RejectKind::TcpReset
                } else {
                    RejectKind::IcmpPortUnreachable
                })
            }
        }
    }

    fn drop(&mut self, reason: DropReason) -> Verdict {
        self.stats.drops[reason as usize] += 1;
        Verdict::Drop(reason)
    }

    /// Remove expired connections, examining at most `max` expiry records (call it every batch
    /// with a budget of a few times the batch size). Returns how many were removed.
    pub fn expire(&mut self, now: u64, max: usize) -> usize {
        self.ct.expire(now, max)
    }

    /// [`Firewall::expire`], showing each removed connection to `gone` (event streams).
    pub fn expire_with(&mut self, now: u64, max: usize, gone: impl FnMut(&Conn)) -> usize {
        self.ct.expire_with(now, max, gone)
    }

    /// The index of the rule the last evaluated packet matched; `None` when it got the default
    /// action. Meaningful right after [`Firewall::process`] returned a verdict from the rules
    /// (a new connection, a rule or default-policy drop, a reject).
    pub fn last_rule(&self) -> Option<usize> {
        self.last_rule
    }

    /// Tracked connections (expired ones count until [`Firewall::expire`] collects them).
    pub fn len(&self) -> usize {
        self.ct.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ct.is_empty()
    }

    /// `(bucket, connections)` for every bucket holding any.
    pub fn flows_per_bucket(&self) -> impl Iterator<Item = (u16, u32)> + '_ {
        self.ct.flows_per_bucket()
    }

    /// Packets that matched each rule (same order as the rule set), since the last `set_rules`.
    pub fn rule_hits(&self) -> Vec<u64> {
        self.rule_hits.clone()
    }

    /// New packets that matched no rule (got the default action), since the last `set_rules`.
    pub fn default_hits(&self) -> u64 {
        self.default_hits
    }

    /// Drops by reason.
    pub fn drops(&self) -> [(DropReason, u64); DropReason::ALL.len()] {
        DropReason::ALL.map(|r| (r, self.stats.drops[r as usize]))
    }

    pub fn stats(&self) -> &FirewallStats {
        &self.stats
    }

    /// The connection table (inspection, export).
    pub fn conntrack(&self) -> &Conntrack {
        &self.ct
    }

    /// The connection table, for state moves (`import`, `remove_bucket`).
    pub fn conntrack_mut(&mut self) -> &mut Conntrack {
        &mut self.ct
    }

    /// Copies of the live connections of `bucket` (state export on scale-in).
    pub fn export_bucket(&self, now: u64, bucket: u16) -> Vec<Conn> {
        self.ct.export_bucket(now, bucket)
    }

    /// Take over a connection another data plane exported.
    pub fn import(&mut self, now: u64, conn: Conn) -> Result<(), CreateError> {
        self.ct.import(now, conn).map(|_| ())
    }
}

mod stage;
#[cfg(test)]
mod tests;
