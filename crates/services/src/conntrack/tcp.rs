//! The TCP connection state machine, after Linux `nf_conntrack_proto_tcp.c`.
//!
//! Same states, same transition table (`tcp_conntracks`), same flag validity check
//! (`tcp_valid_flags`), and the same sequence/window tracking (`tcp_in_window`, see `in_window`
//! and `rst_effect`): a segment outside what the receiver can accept is invalid, and so is a RST
//! that is not in the window; only a RST at the exact next sequence number closes. What Linux has
//! and this does not: the "unacknowledged data" and retransmission timeouts, NAT sequence
//! adjustment (nothing here rewrites sequence numbers).

use dva_wire::tcp::flags;
use dva_wire::{TcpOption, TcpPacket};
use serde::{Deserialize, Serialize};

use super::Direction;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TcpState {
    None,
    SynSent,
    SynRecv,
    Established,
    FinWait,
    CloseWait,
    LastAck,
    TimeWait,
    Close,
    /// Simultaneous open: both ends sent a SYN.
    SynSent2,
}

impl TcpState {
    pub const ALL: [TcpState; 10] = [
        TcpState::None,
        TcpState::SynSent,
        TcpState::SynRecv,
        TcpState::Established,
        TcpState::FinWait,
        TcpState::CloseWait,
        TcpState::LastAck,
        TcpState::TimeWait,
        TcpState::Close,
        TcpState::SynSent2,
    ];

    pub fn name(self) -> &'static str {
        match self {
            TcpState::None => "none",
            TcpState::SynSent => "syn_sent",
            TcpState::SynRecv => "syn_recv",
            TcpState::Established => "established",
            TcpState::FinWait => "fin_wait",
            TcpState::CloseWait => "close_wait",
            TcpState::LastAck => "last_ack",
            TcpState::TimeWait => "time_wait",
            TcpState::Close => "close",
            TcpState::SynSent2 => "syn_sent2",
        }
    }
}

/// What a segment's flags mean to the state machine (Linux `get_conntrack_index`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TcpEvent {
    Syn,
    SynAck,
    Fin,
    Ack,
    Rst,
    None,
}

impl TcpEvent {
    pub(crate) fn of(f: u8) -> TcpEvent {
        if f & flags::RST != 0 {
            TcpEvent::Rst
        } else if f & flags::SYN != 0 {
            if f & flags::ACK != 0 {
                TcpEvent::SynAck
            } else {
                TcpEvent::Syn
            }
        } else if f & flags::FIN != 0 {
            TcpEvent::Fin
        } else if f & flags::ACK != 0 {
            TcpEvent::Ack
        } else {
            TcpEvent::None
        }
    }
}

/// Flag combinations a real TCP stack sends (Linux `tcp_valid_flags`); PSH, ECE and CWR are
/// ignored. Anything else (SYN|FIN, FIN without ACK, no flags, ...) is a scan or garbage.
pub fn valid_flags(f: u8) -> bool {
    let f = f & !(flags::PSH | flags::ECE | flags::CWR);
    // SYN, SYN|URG, SYN|ACK, RST, RST|ACK, FIN|ACK, FIN|ACK|URG, ACK, ACK|URG
    matches!(
        f,
        0x02 | 0x22 | 0x12 | 0x04 | 0x14 | 0x11 | 0x31 | 0x10 | 0x30
    )
}

/// A segment can open a connection: a plain SYN (no ACK, RST or FIN).
pub fn starts_connection(f: u8) -> bool {
    valid_flags(f) && TcpEvent::of(f) == TcpEvent::Syn
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    To(TcpState),
    /// Accept the segment, keep the state (Linux `sIG`).
    Ignore,
    /// Not part of this connection's life (Linux `sIV`).
    Invalid,
}

use Next::{Ignore as IG, Invalid as IV};
use TcpState as S;
const SS: Next = Next::To(S::SynSent);
const SR: Next = Next::To(S::SynRecv);
const ES: Next = Next::To(S::Established);
const FW: Next = Next::To(S::FinWait);
const CW: Next = Next::To(S::CloseWait);
const LA: Next = Next::To(S::LastAck);
const TW: Next = Next::To(S::TimeWait);
const CL: Next = Next::To(S::Close);
const S2: Next = Next::To(S::SynSent2);

/// `TABLE[direction][event][state]`, columns in `TcpState` order:
/// None, SynSent, SynRecv, Established, FinWait, CloseWait, LastAck, TimeWait, Close, SynSent2.
#[rustfmt::skip]
const TABLE: [[[Next; 10]; 6]; 2] = [
    [
        // ORIGINAL
        /* syn    */ [SS, SS, IG, IG, IG, IG, IG, SS, SS, S2],
        /* synack */ [IV, IV, SR, IV, IV, IV, IV, IV, IV, SR],
        /* fin    */ [IV, IV, FW, FW, LA, LA, LA, TW, CL, IV],
        /* ack    */ [ES, IV, ES, ES, CW, CW, TW, TW, CL, IV],
        /* rst    */ [IV, CL, CL, CL, CL, CL, CL, CL, CL, CL],
        /* none   */ [IV, IV, IV, IV, IV, IV, IV, IV, IV, IV],
    ],
    [
        // REPLY
        /* syn    */ [IV, S2, IV, IV, IV, IV, IV, SS, IV, S2],
        /* synack */ [IV, SR, IG, IG, IG, IG, IG, IG, IG, SR],
        /* fin    */ [IV, IV, FW, FW, LA, LA, LA, TW, CL, IV],
        /* ack    */ [IV, IG, SR, ES, CW, CW, TW, TW, CL, IG],
        /* rst    */ [IV, CL, CL, CL, CL, CL, CL, CL, CL, CL],
        /* none   */ [IV, IV, IV, IV, IV, IV, IV, IV, IV, IV],
    ],
];

pub(crate) fn transition(state: TcpState, dir: Direction, tcp_flags: u8) -> Next {
    if !valid_flags(tcp_flags) {
        return Next::Invalid;
    }
    let d = match dir {
        Direction::Original => 0,
        Direction::Reply => 1,
    };
    let e = match TcpEvent::of(tcp_flags) {
        TcpEvent::Syn => 0,
        TcpEvent::SynAck => 1,
        TcpEvent::Fin => 2,
        TcpEvent::Ack => 3,
        TcpEvent::Rst => 4,
        TcpEvent::None => 5,
    };
    TABLE[d][e][state as usize]
}

/// What window tracking reads from a TCP header. Filled once per packet by [`TcpSegment::parse`]
/// (the options only on SYNs and when SACK blocks may be present); all zero for other protocols.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpSegment {
    pub seq: u32,
    pub ack: u32,
    /// The window field as sent (scaled by the sender's shift unless on a SYN).
    pub window: u16,
    /// Payload bytes (SYN and FIN take one sequence number each on top).
    pub payload_len: u32,
    /// Window scale option (read on SYNs only).
    pub wscale: Option<u8>,
    /// SACK-permitted option (read on SYNs only).
    pub sack_perm: bool,
    /// Highest right edge of the SACK blocks, if the segment carries any.
    pub sack: Option<u32>,
}

impl TcpSegment {
    /// Read a TCP header (`l4`: from the TCP header to the end of the IP payload). `None` if the
    /// header does not fit.
    pub fn parse(l4: &[u8]) -> Option<TcpSegment> {
        let t = TcpPacket::new_checked(l4).ok()?;
        let mut seg = TcpSegment {
            seq: t.seq_number(),
            ack: t.ack_number(),
            window: t.window_len(),
            payload_len: u32::try_from(t.payload().len()).unwrap_or(u32::MAX),
            ..TcpSegment::default()
        };
        // Past the SYNs only SACK blocks matter (10 bytes at least). A bare header, or the usual
        // ACK with timestamps only (NOP NOP TS), skips the option walk.
        let options = t.options();
        if !t.syn()
            && (options.len() < 10 || (options.len() == 12 && options[..4] == [1, 1, 8, 10]))
        {
            return Some(seg);
        }
        for o in t.option_iter() {
            match o {
                TcpOption::WindowScale(s) if t.syn() => seg.wscale = Some(s),
                TcpOption::SackPermitted if t.syn() => seg.sack_perm = true,
                TcpOption::Unknown { kind: 5, data } => {
                    // Blocks of (left, right) edges; the highest right edge bounds the ACK
                    // (Linux `tcp_sack`).
                    for b in data.chunks_exact(8) {
                        let right = u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
                        if seg.sack.is_none_or(|s| after(right, s)) {
                            seg.sack = Some(right);
                        }
                    }
                }
                _ => {}
            }
        }
        Some(seg)
    }
}

/// Window state of one direction (Linux `ip_ct_tcp_state`), all sequence numbers as that
/// direction sends them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TcpPeer {
    /// `td_end`: highest sequence number sent, plus the segment's length.
    pub end: u32,
    /// `td_maxend`: highest sequence number the other side's window lets this one send.
    pub maxend: u32,
    /// `td_maxwin`: largest window (scaled) the other side has seen from this one; 0: nothing
    /// known yet, learn from the next segment (a connection picked up mid-stream).
    pub maxwin: u32,
    /// `td_maxack`: highest ACK sent (valid with [`peer_flags::MAXACK_SET`]).
    pub maxack: u32,
    /// Window scale shift (valid with [`peer_flags::SYN_SEEN`]).
    pub scale: u8,
    /// [`peer_flags`].
    pub flags: u8,
}

/// Bits of [`TcpPeer::flags`].
pub mod peer_flags {
    /// The SYN carried a window scale option.
    pub const WINDOW_SCALE: u8 = 0x01;
    /// The SYN carried SACK-permitted.
    pub const SACK_PERM: u8 = 0x02;
    /// `maxack` holds an ACK this direction sent.
    pub const MAXACK_SET: u8 = 0x04;
    /// This direction's SYN was seen, so `scale` is known. Without it (an entry from an exporter
    /// that predates window tracking) windows are taken at the largest shift, 14: too generous
    /// rather than dropping a scaled connection's traffic.
    pub const SYN_SEEN: u8 = 0x08;
    /// The connection moved here from another data plane (handover, failover) and this
    /// direction has not yet sent a segment that fits the relearned window: until both
    /// directions have, the window is learned but not enforced (as the kernel does for a
    /// connection it picks up mid-stream, `IP_CT_TCP_FLAG_BE_LIBERAL`). A replica's positions
    /// are as old as its last copy, and the first segments the new owner sees are often
    /// retransmissions below what the other side already acknowledged through the old owner:
    /// enforcing the window on the ACKs that follow dropped them and stalled the connection
    /// (e2e_ha: killing a data plane broke connections).
    pub const BE_LIBERAL: u8 = 0x10;
}

/// Window state of a TCP connection, both directions. It moves with the connection (export,
/// import, replication); a receiving data plane relearns the positions ([`TcpWindow::relearn`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TcpWindow {
    pub original: TcpPeer,
    pub reply: TcpPeer,
}

/// Linux `MAXACKWINCONST`: how far below the receiver's end an ACK may be, at least.
const MAX_ACK_WINDOW: u32 = 66_000;
/// Largest window scale shift (RFC 7323).
const MAX_SCALE: u8 = 14;

/// `a` comes before `b` in sequence space.
#[inline]
fn before(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

#[inline]
fn after(a: u32, b: u32) -> bool {
    before(b, a)
}

impl TcpPeer {
    #[inline]
    fn shift(&self) -> u8 {
        if self.flags & peer_flags::SYN_SEEN != 0 {
            self.scale
        } else {
            MAX_SCALE
        }
    }

    fn max_ack_window(&self) -> u32 {
        self.maxwin.max(MAX_ACK_WINDOW)
    }

    /// Take this direction's SYN (or SYN-ACK): positions and options start over (Linux
    /// `tcp_options` plus the start of `tcp_in_window`).
    fn init_from_syn(&mut self, seg: &TcpSegment, end: u32) {
        self.end = end;
        self.maxend = end;
        self.maxwin = u32::from(seg.window).max(1);
        self.maxack = 0;
        self.flags = peer_flags::SYN_SEEN;
        self.scale = 0;
        if let Some(s) = seg.wscale {
            self.flags |= peer_flags::WINDOW_SCALE;
            self.scale = s.min(MAX_SCALE);
        }
        if seg.sack_perm {
            self.flags |= peer_flags::SACK_PERM;
        }
    }
}

/// Sequence space a segment ends at: seq + payload + SYN + FIN.
fn segment_end(f: u8, seg: &TcpSegment) -> u32 {
    seg.seq
        .wrapping_add(seg.payload_len)
        .wrapping_add(u32::from(f & flags::SYN != 0))
        .wrapping_add(u32::from(f & flags::FIN != 0))
}

impl TcpWindow {
    /// A connection opened by `seg` (a SYN, original direction).
    pub fn from_syn(f: u8, seg: &TcpSegment) -> TcpWindow {
        let mut w = TcpWindow::default();
        w.original.init_from_syn(seg, segment_end(f, seg));
        w
    }

    /// Forget the positions, keep what the handshake negotiated (scale, SACK): the next segment
    /// of each direction sets them again, as for a connection picked up mid-stream. For a copy
    /// taken from another data plane: it is stale by whatever was sent since, and a stale window
    /// would drop live traffic.
    pub fn relearn(&mut self) {
        for p in [&mut self.original, &mut self.reply] {
            p.maxwin = 0;
            p.flags &= !peer_flags::MAXACK_SET;
            p.flags |= peer_flags::BE_LIBERAL;
        }
    }

    /// Tracked liberally: the connection moved here and has not resynchronised both ways (see
    /// [`peer_flags::BE_LIBERAL`]).
    pub fn is_liberal(&self) -> bool {
        (self.original.flags | self.reply.flags) & peer_flags::BE_LIBERAL != 0
    }

    /// A moved connection's segment sent `dir` did not fit: learn that direction again from
    /// its next segment (a replica's stale positions must not keep it out of sync for good).
    pub fn relearn_dir(&mut self, dir: Direction) {
        let p = self.split(dir).0;
        p.maxwin = 0;
        p.flags &= !peer_flags::MAXACK_SET;
    }

    /// A segment sent `dir` fitted the window: that direction is in sync again.
    pub fn synced(&mut self, dir: Direction) {
        self.split(dir).0.flags &= !peer_flags::BE_LIBERAL;
    }

    fn split(&mut self, dir: Direction) -> (&mut TcpPeer, &mut TcpPeer) {
        match dir {
            Direction::Original => (&mut self.original, &mut self.reply),
            Direction::Reply => (&mut self.reply, &mut self.original),
        }
    }

    fn peers(&self, dir: Direction) -> (&TcpPeer, &TcpPeer) {
        match dir {
            Direction::Original => (&self.original, &self.reply),
            Direction::Reply => (&self.reply, &self.original),
        }
    }
}

/// Linux `tcp_in_window`: whether a segment sent `dir` fits what each side has seen of the
/// other, updating the window state if so. On `false` the caller must discard `w` (work on a copy):
/// an invalid segment changes nothing.
pub(crate) fn in_window(
    w: &mut TcpWindow,
    state: TcpState,
    dir: Direction,
    f: u8,
    seg: &TcpSegment,
) -> bool {
    let (sender, receiver) = w.split(dir);
    let (syn, rst, has_ack) = (
        f & flags::SYN != 0,
        f & flags::RST != 0,
        f & flags::ACK != 0,
    );
    let mut seq = seg.seq;
    let mut ack = seg.ack;
    let mut sack = ack;
    let mut win = u32::from(seg.window);
    let mut end = segment_end(f, seg);
    if receiver.flags & peer_flags::SACK_PERM != 0 {
        if let Some(s) = seg.sack.filter(|&s| after(s, sack)) {
            sack = s;
        }
    }

    if sender.maxwin == 0 {
        if syn {
            // The SYN-ACK answering the SYN, or the reply's SYN of a simultaneous open.
            sender.init_from_syn(seg, end);
            // RFC 7323: scaling only if both ends offered it.
            if sender.flags & receiver.flags & peer_flags::WINDOW_SCALE == 0 {
                sender.scale = 0;
                receiver.scale = 0;
            }
            if !has_ack {
                return true;
            }
        } else {
            // Mid-stream: this direction's history is unknown; take it from this segment.
            sender.end = end;
            let swin = win << sender.shift();
            sender.maxwin = swin.max(1);
            sender.maxend = end.wrapping_add(sender.maxwin);
            if receiver.maxwin == 0 {
                // Nothing known the other way either: what this side acknowledges is where
                // the other side is.
                receiver.end = sack;
                receiver.maxend = sack;
            } else if sack == receiver.end.wrapping_add(1) {
                // Likely the answer to a keepalive.
                receiver.end = receiver.end.wrapping_add(1);
            }
        }
    } else if syn
        && after(end, sender.end)
        && matches!(state, TcpState::SynSent | TcpState::SynRecv)
    {
        // A restarted handshake (RFC 793: a new SYN with higher sequence numbers).
        sender.init_from_syn(seg, end);
        if sender.flags & receiver.flags & peer_flags::WINDOW_SCALE == 0 {
            sender.scale = 0;
            receiver.scale = 0;
        }
        if dir == Direction::Reply && !has_ack {
            return true;
        }
    }

    if !has_ack || (rst && ack == 0) {
        // No ACK (or a RST|ACK with a zero ACK, from broken stacks): as if it acked the end.
        ack = receiver.end;
        sack = ack;
    }
    if rst && seq == 0 && state == TcpState::SynSent {
        // RST answering a SYN.
        seq = sender.end;
        end = sender.end;
    }

    if after(seq, sender.maxend) {
        // Past what the receiver's window allows. Linux lets through a sender that overshoots
        // by no more than the receiver's largest window, while its ACK is sane.
        let overshot = end.wrapping_sub(sender.maxend).wrapping_add(1);
        let ack_ok = after(
            sack,
            receiver
                .end
                .wrapping_sub(sender.max_ack_window())
                .wrapping_sub(1),
        );
        let in_recv_win = receiver.maxwin != 0
            && after(
                end,
                sender.end.wrapping_sub(receiver.maxwin).wrapping_sub(1),
            );
        if !(in_recv_win && ack_ok && overshot <= receiver.maxwin && !after(sack, receiver.end)) {
            return false;
        }
        sender.maxend = sender.maxend.wrapping_add(overshot);
        sender.maxwin = sender.maxwin.wrapping_add(overshot);
    }
    // ACKs data not sent yet.
    if after(sack, receiver.end) {
        return false;
    }
    // Ends below what the receiver's window reaches back to (data long acknowledged).
    if receiver.maxwin != 0
        && !after(
            end,
            sender.end.wrapping_sub(receiver.maxwin).wrapping_sub(1),
        )
    {
        return false;
    }
    // An ACK far below what was acknowledged already.
    if !after(
        sack,
        receiver
            .end
            .wrapping_sub(sender.max_ack_window())
            .wrapping_sub(1),
    ) {
        return false;
    }

    if !syn {
        win <<= sender.shift();
    }
    let swin = win.wrapping_add(sack.wrapping_sub(ack));
    sender.maxwin = sender.maxwin.max(swin);
    if after(end, sender.end) {
        sender.end = end;
    }
    if has_ack && (sender.flags & peer_flags::MAXACK_SET == 0 || after(ack, sender.maxack)) {
        sender.maxack = ack;
        sender.flags |= peer_flags::MAXACK_SET;
    }
    if receiver.maxwin != 0 && after(end, sender.maxend) {
        receiver.maxwin = receiver
            .maxwin
            .wrapping_add(end.wrapping_sub(sender.maxend));
    }
    if after(sack.wrapping_add(win), receiver.maxend.wrapping_sub(1)) {
        receiver.maxend = sack.wrapping_add(win);
        if win == 0 {
            receiver.maxend = receiver.maxend.wrapping_add(1);
        }
    }
    true
}

/// What an in-window RST does (Linux `nf_conntrack_tcp_packet`, the RST case; `w` as before the
/// segment).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RstEffect {
    /// Exactly where the receiver expects the next byte: the connection is over.
    Close,
    /// In the window but not exact: let it through and keep the state, so the receiver can
    /// answer with a challenge ACK (RFC 5961) and a blind attacker gains nothing.
    Keep,
    /// Below what the receiver already acknowledged.
    Invalid,
}

pub(crate) fn rst_effect(w: &TcpWindow, state: TcpState, dir: Direction, seq: u32) -> RstEffect {
    let (sender, receiver) = w.peers(dir);
    if receiver.flags & peer_flags::MAXACK_SET == 0 {
        // The receiver never acknowledged anything here (answer to a SYN, or picked up
        // mid-stream): the window check is all there is.
        return RstEffect::Close;
    }
    if seq == 0 && state != TcpState::Established {
        // Most likely the answer to a SYN let through.
        return RstEffect::Close;
    }
    if before(seq, receiver.maxack) {
        return RstEffect::Invalid;
    }
    // Exact: what the receiver acknowledged last, or right after the sender's last byte (a RST
    // that follows its own data, "P 235946583:235946602(19) then R 235946602").
    if state != TcpState::Established || seq == receiver.maxack || seq == sender.end {
        return RstEffect::Close;
    }
    RstEffect::Keep
}

#[cfg(test)]
mod tests {
    use super::flags::*;
    use super::*;
    use Direction::{Original as O, Reply as R};

    #[test]
    fn flag_validity() {
        for (f, ok) in [
            (SYN, true),
            (SYN | ACK, true),
            (SYN | PSH | ECE | CWR, true),
            (ACK, true),
            (ACK | PSH, true),
            (FIN | ACK, true),
            (RST, true),
            (RST | ACK, true),
            (0, false),
            (FIN, false),
            (SYN | FIN, false),
            (SYN | RST, false),
            (FIN | RST | ACK, false),
            (0xff, false),
        ] {
            assert_eq!(valid_flags(f), ok, "{f:#04x}");
        }
        assert!(starts_connection(SYN));
        assert!(starts_connection(SYN | ECE | CWR));
        assert!(!starts_connection(SYN | ACK));
        assert!(!starts_connection(SYN | FIN));
        assert!(!starts_connection(ACK));
    }

    /// Walk a sequence of (direction, flags, expected next) from a state.
    fn walk(mut s: TcpState, steps: &[(Direction, u8, Next)]) -> TcpState {
        for (i, &(d, f, want)) in steps.iter().enumerate() {
            let got = transition(s, d, f);
            assert_eq!(got, want, "step {i}: {s:?} {d:?} {f:#04x}");
            if let Next::To(n) = got {
                s = n;
            }
        }
        s
    }

    #[test]
    fn handshake_data_and_active_close() {
        let end = walk(
            TcpState::None,
            &[
                (O, SYN, SS),
                (O, SYN, SS), // retransmitted SYN
                (R, SYN | ACK, SR),
                (O, ACK, ES),
                (O, ACK | PSH, ES),
                (R, ACK | PSH, ES),
                (R, SYN | ACK, IG), // late retransmitted SYN/ACK
                (O, FIN | ACK, FW),
                (R, FIN | ACK, LA),
                (O, ACK, TW),
                (O, ACK, TW),
            ],
        );
        assert_eq!(end, TcpState::TimeWait);
    }

    #[test]
    fn close_with_separate_ack_and_fin() {
        let end = walk(
            TcpState::Established,
            &[
                (R, FIN | ACK, FW),
                (O, ACK, CW),
                (O, ACK | PSH, CW),
                (O, FIN | ACK, LA),
                (R, ACK, TW),
            ],
        );
        assert_eq!(end, TcpState::TimeWait);
    }

    #[test]
    fn simultaneous_open() {
        let end = walk(
            TcpState::SynSent,
            &[(R, SYN, S2), (R, SYN | ACK, SR), (O, ACK, ES)],
        );
        assert_eq!(end, TcpState::Established);
    }

    #[test]
    fn invalid_segments() {
        assert_eq!(
            transition(TcpState::SynSent, O, ACK),
            IV,
            "ACK before SYN/ACK"
        );
        assert_eq!(
            transition(TcpState::SynSent, O, SYN | ACK),
            IV,
            "client sending SYN/ACK"
        );
        assert_eq!(transition(TcpState::SynSent, R, FIN | ACK), IV);
        assert_eq!(transition(TcpState::Established, R, SYN), IV);
        assert_eq!(transition(TcpState::Established, O, 0), IV);
        assert_eq!(transition(TcpState::Established, O, SYN | FIN), IV);
        assert_eq!(transition(TcpState::None, O, ACK | SYN), IV);
    }

    #[test]
    fn rst_closes_every_state_but_none() {
        for s in TcpState::ALL {
            for d in [O, R] {
                let want = if s == TcpState::None { IV } else { CL };
                assert_eq!(transition(s, d, RST), want, "{s:?} {d:?}");
                assert_eq!(transition(s, d, RST | ACK), want, "{s:?} {d:?}");
            }
        }
    }

    #[test]
    fn syn_reopens_time_wait_and_close() {
        assert_eq!(transition(TcpState::TimeWait, O, SYN), SS);
        assert_eq!(transition(TcpState::Close, O, SYN), SS);
        assert_eq!(transition(TcpState::TimeWait, R, SYN), SS);
        assert_eq!(transition(TcpState::Established, O, SYN), IG);
    }

    #[test]
    fn names_are_distinct() {
        let mut n: Vec<_> = TcpState::ALL.iter().map(|s| s.name()).collect();
        n.sort_unstable();
        n.dedup();
        assert_eq!(n.len(), TcpState::ALL.len());
    }
}
