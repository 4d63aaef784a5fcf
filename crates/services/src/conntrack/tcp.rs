//! The TCP connection state machine, after Linux `nf_conntrack_proto_tcp.c`.
//!
//! Same states, same transition table (`tcp_conntracks`), same flag validity check
//! (`tcp_valid_flags`). What Linux adds on top and this does not (yet): sequence/window tracking
//! (`tcp_in_window`), so an in-window check cannot reject a spoofed RST or FIN; and the
//! "unacknowledged data" and retransmission timeouts.

use serde::{Deserialize, Serialize};

use super::Direction;

/// TCP header flag bits (the flags byte, offset 13).
pub mod flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
    pub const URG: u8 = 0x20;
    pub const ECE: u8 = 0x40;
    pub const CWR: u8 = 0x80;
}

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
