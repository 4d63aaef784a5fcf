use super::*;
use flags::*;

const SEC: u64 = 1_000_000_000;

fn k(proto: u8, sp: u16, dp: u16) -> FlowKey {
    FlowKey {
        proto,
        src: "198.18.1.2".parse().unwrap(),
        dst: "198.18.2.2".parse().unwrap(),
        src_port: sp,
        dst_port: dp,
    }
}

fn ct() -> Conntrack {
    Conntrack::new(ConntrackConfig::default())
}

#[test]
fn both_directions_find_one_entry() {
    let mut t = ct();
    let key = k(6, 40000, 80);
    let id = t
        .create(0, 3, &key, SYN, &TcpSegment::default(), 60)
        .unwrap();
    assert_eq!(t.lookup(0, &key), Some((id, Direction::Original)));
    assert_eq!(t.lookup(0, &key.reversed()), Some((id, Direction::Reply)));
    assert!(t.lookup(0, &k(6, 40001, 80)).is_none());
    assert!(
        t.lookup(0, &k(17, 40000, 80)).is_none(),
        "protocol is part of the key"
    );
    assert!(matches!(
        t.create(0, 3, &key.reversed(), SYN, &TcpSegment::default(), 60),
        Err(CreateError::Exists { .. })
    ));
    assert_eq!(t.len(), 1);
}

#[test]
fn create_refuses_non_openers() {
    let mut t = ct();
    for f in [ACK, SYN | ACK, RST, FIN | ACK, SYN | FIN, 0] {
        assert_eq!(
            t.create(0, 0, &k(6, 1, 2), f, &TcpSegment::default(), 40),
            Err(CreateError::NotAStart { flags: f })
        );
    }
    assert!(t.is_empty());
    let e = CreateError::NotAStart { flags: 0x12 }.to_string();
    assert!(e.contains("0x12"), "{e}");
}

#[test]
fn timeouts_per_state() {
    let to = Timeouts::default();
    type Case = (FlowKey, u8, &'static [(Direction, u8)], u64);
    let cases: [Case; 6] = [
        (k(6, 1, 2), SYN, &[], to.tcp_syn_sent),
        (
            k(6, 1, 2),
            SYN,
            &[(Direction::Reply, SYN | ACK)],
            to.tcp_syn_recv,
        ),
        (
            k(6, 1, 2),
            SYN,
            &[(Direction::Reply, SYN | ACK), (Direction::Original, ACK)],
            to.tcp_established,
        ),
        (k(6, 1, 2), SYN, &[(Direction::Reply, RST)], to.tcp_close),
        (k(17, 1, 2), 0, &[(Direction::Reply, 0)], to.udp_replied),
        (k(50, 0, 0), 0, &[], to.generic),
    ];
    for (i, (key, first, rest, secs)) in cases.into_iter().enumerate() {
        let mut t = ct();
        let id = t
            .create(0, 0, &key, first, &TcpSegment::default(), 1)
            .unwrap();
        for &(d, f) in rest {
            assert_ne!(
                t.update(0, id, d, f, &TcpSegment::default(), 1),
                Update::Invalid,
                "case {i}"
            );
        }
        assert_eq!(t.expires_at(id), Some(secs * SEC), "case {i}");
        assert!(t.lookup(secs * SEC - 1, &key).is_some(), "case {i}");
        assert!(t.lookup(secs * SEC, &key).is_none(), "case {i}");
        assert!(
            t.is_empty(),
            "case {i}: an expired entry found by lookup is removed"
        );
    }
}

#[test]
fn custom_timeouts() {
    let cfg = ConntrackConfig {
        timeouts: Timeouts {
            udp_unreplied: 5,
            ..Timeouts::default()
        },
        ..Default::default()
    };
    let cfg: ConntrackConfig = serde_json::from_str(&serde_json::to_string(&cfg).unwrap()).unwrap();
    let mut t = Conntrack::new(cfg);
    let id = t
        .create(0, 0, &k(17, 1, 2), 0, &TcpSegment::default(), 1)
        .unwrap();
    assert_eq!(t.expires_at(id), Some(5 * SEC));
    let partial: ConntrackConfig = serde_json::from_str(r#"{"timeouts": {"icmp": 7}}"#).unwrap();
    assert_eq!(partial.max_entries, DEFAULT_MAX_ENTRIES);
    assert_eq!(partial.timeouts.icmp, 7);
    assert_eq!(partial.timeouts.tcp_established, 432_000);
    assert!(serde_json::from_str::<ConntrackConfig>(r#"{"timeouts": {"icmpp": 7}}"#).is_err());
}

#[test]
fn busy_connection_holds_one_record() {
    let mut t = ct();
    let key = k(17, 1, 2);
    let id = t.create(0, 0, &key, 0, &TcpSegment::default(), 1).unwrap();
    for i in 0..100_000u64 {
        let dir = if i % 2 == 0 {
            Direction::Reply
        } else {
            Direction::Original
        };
        t.update(i * 1_000_000, id, dir, 0, &TcpSegment::default(), 1);
    }
    // One record for the creation, one when it moved to the "replied" class (longer: no push),
    // and nothing per packet.
    assert!(t.pending_records() <= 2, "{}", t.pending_records());
    let c = t.get(id).unwrap();
    assert_eq!((c.orig_packets, c.reply_packets), (50_001, 50_000));
}

#[test]
fn shorter_timeout_state_is_expired_on_time() {
    // Established (5 days) -> fin_wait (120 s): the 5-day record must not keep it around.
    let mut t = ct();
    let key = k(6, 1, 2);
    let id = t
        .create(0, 0, &key, SYN, &TcpSegment::default(), 1)
        .unwrap();
    t.update(
        0,
        id,
        Direction::Reply,
        SYN | ACK,
        &TcpSegment::default(),
        1,
    );
    t.update(0, id, Direction::Original, ACK, &TcpSegment::default(), 1);
    t.update(
        10 * SEC,
        id,
        Direction::Original,
        FIN | ACK,
        &TcpSegment::default(),
        1,
    );
    assert_eq!(t.get(id).unwrap().state, ConnState::Tcp(TcpState::FinWait));
    assert_eq!(t.expire(129 * SEC, 100), 0);
    assert_eq!(t.expire(130 * SEC, 100), 1);
    assert!(t.is_empty());
    // Stale records (the 5-day one) are skipped, then the queues drain completely.
    t.expire(u64::MAX, 100);
    assert_eq!(t.pending_records(), 0);
}

#[test]
fn refreshed_entry_survives_its_first_deadline() {
    let mut t = ct();
    let key = k(17, 1, 2);
    let id = t.create(0, 0, &key, 0, &TcpSegment::default(), 1).unwrap();
    t.update(
        20 * SEC,
        id,
        Direction::Original,
        0,
        &TcpSegment::default(),
        1,
    );
    // The creation record comes due at 30 s, finds the entry alive until 50 s and re-queues it.
    assert_eq!(t.expire(30 * SEC, 10), 0);
    assert_eq!(t.len(), 1);
    assert_eq!(t.expire(49 * SEC, 10), 0);
    assert_eq!(t.expire(50 * SEC, 10), 1);
    assert!(t.lookup(50 * SEC, &key).is_none());
}

#[test]
fn slots_are_reused() {
    let mut t = ct();
    for round in 0..3u64 {
        let now = round * 100 * SEC;
        for p in 0..100 {
            t.create(now, 0, &k(17, p, 53), 0, &TcpSegment::default(), 1)
                .unwrap();
        }
        assert_eq!(t.len(), 100);
        assert_eq!(t.expire(now + 31 * SEC, 1000), 100);
    }
    assert!(t.slots.len() <= 100);
}

#[test]
fn table_full_and_recovery() {
    let mut t = Conntrack::new(ConntrackConfig {
        max_entries: 3,
        ..Default::default()
    });
    for p in 0..3 {
        let id = t
            .create(0, 0, &k(17, p, 53), 0, &TcpSegment::default(), 1)
            .unwrap();
        // Replied: not evictable, so a full table refuses.
        t.update(0, id, Direction::Reply, 0, &TcpSegment::default(), 1);
    }
    assert_eq!(
        t.create(SEC, 0, &k(17, 9, 53), 0, &TcpSegment::default(), 1),
        Err(CreateError::TableFull { max: 3 })
    );
    assert_eq!(t.early_drops(), 0);
    let id = t.lookup(SEC, &k(17, 0, 53)).unwrap().0;
    t.remove(id).unwrap();
    assert!(t
        .create(SEC, 0, &k(17, 9, 53), 0, &TcpSegment::default(), 1)
        .is_ok());
    // Past every deadline, creation collects dead entries by itself.
    assert!(t
        .create(200 * SEC, 0, &k(17, 10, 53), 0, &TcpSegment::default(), 1)
        .is_ok());
    assert_eq!(t.len(), 1);
}

#[test]
fn per_bucket_counts_follow_removal() {
    let mut t = ct();
    let a = t
        .create(0, 1, &k(17, 1, 53), 0, &TcpSegment::default(), 1)
        .unwrap();
    t.create(0, 1, &k(17, 2, 53), 0, &TcpSegment::default(), 1)
        .unwrap();
    t.create(0, 2, &k(17, 3, 53), 0, &TcpSegment::default(), 1)
        .unwrap();
    assert_eq!(
        t.flows_per_bucket().collect::<Vec<_>>(),
        vec![(1, 2), (2, 1)]
    );
    t.remove(a);
    assert_eq!(
        t.flows_per_bucket().collect::<Vec<_>>(),
        vec![(1, 1), (2, 1)]
    );
    assert!(t.remove(a).is_none(), "removing twice is harmless");
    assert_eq!(t.remove_bucket(1), 1);
    assert_eq!(t.flows_per_bucket().collect::<Vec<_>>(), vec![(2, 1)]);
    assert_eq!(t.iter().count(), 1);
}

#[test]
fn conn_serde_shape() {
    let mut t = ct();
    let id = t
        .create(5, 4, &k(6, 1, 2), SYN, &TcpSegment::default(), 60)
        .unwrap();
    let c = t.get(id).unwrap().clone();
    let v: serde_json::Value = serde_json::to_value(&c).unwrap();
    assert_eq!(v["state"], serde_json::json!({"tcp": "syn_sent"}));
    assert_eq!(v["bucket"], 4);
    let back: Conn = serde_json::from_value(v).unwrap();
    assert_eq!(back, c);
}

#[test]
fn import_rebases_time() {
    let mut a = ct();
    let id = a
        .create(SEC, 0, &k(17, 1, 53), 0, &TcpSegment::default(), 1)
        .unwrap();
    let c = a.get(id).unwrap().clone();
    let mut b = ct();
    let id = b.import(5 * SEC, c).unwrap();
    let c = b.get(id).unwrap();
    assert_eq!((c.created, c.last_seen), (5 * SEC, 5 * SEC));
    assert_eq!(b.expires_at(id), Some(35 * SEC));
}

#[test]
fn ignored_segments_do_not_refresh() {
    let mut t = ct();
    let key = k(6, 1, 2);
    let id = t
        .create(0, 0, &key, SYN, &TcpSegment::default(), 1)
        .unwrap();
    t.update(
        0,
        id,
        Direction::Reply,
        SYN | ACK,
        &TcpSegment::default(),
        1,
    );
    t.update(0, id, Direction::Original, ACK, &TcpSegment::default(), 1);
    t.update(
        0,
        id,
        Direction::Reply,
        FIN | ACK,
        &TcpSegment::default(),
        1,
    );
    t.update(
        0,
        id,
        Direction::Original,
        FIN | ACK,
        &TcpSegment::default(),
        1,
    );
    assert_eq!(t.get(id).unwrap().state, ConnState::Tcp(TcpState::LastAck));
    // A late SYN/ACK retransmission is accepted but does not extend last_ack's 30 s.
    assert_eq!(
        t.update(
            20 * SEC,
            id,
            Direction::Reply,
            SYN | ACK,
            &TcpSegment::default(),
            1
        ),
        Update::Ignored
    );
    assert_eq!(t.expires_at(id), Some(30 * SEC));
    assert_eq!(t.get(id).unwrap().reply_packets, 3);
}

/// TCP window tracking (`tcp_in_window`): a handshake with window scaling, then what a spoofer
/// can and cannot do.
mod window {
    use super::*;

    const C_ISN: u32 = 1_000_000;
    const S_ISN: u32 = 3_000_000_000;
    /// Client shifts by 7, server by 9 (both offer scaling, so both apply).
    const C_SCALE: u8 = 7;
    const S_SCALE: u8 = 9;

    fn seg(seq: u32, ack: u32, window: u16, payload_len: u32) -> TcpSegment {
        TcpSegment {
            seq,
            ack,
            window,
            payload_len,
            ..TcpSegment::default()
        }
    }

    fn syn(seq: u32, ack: u32, window: u16, scale: u8) -> TcpSegment {
        TcpSegment {
            wscale: Some(scale),
            sack_perm: true,
            ..seg(seq, ack, window, 0)
        }
    }

    fn state(t: &Conntrack, id: ConnId) -> ConnState {
        t.get(id).unwrap().state
    }

    /// An established connection: SYN, SYN-ACK, ACK, then 1000 bytes each way. Next client seq
    /// is `C_ISN + 1001`, next server seq `S_ISN + 1001`.
    fn established(cfg: ConntrackConfig) -> (Conntrack, ConnId) {
        let mut t = Conntrack::new(cfg);
        let key = k(6, 40000, 80);
        let id = t
            .create(0, 0, &key, SYN, &syn(C_ISN, 0, 64240, C_SCALE), 60)
            .unwrap();
        let (o, r) = (Direction::Original, Direction::Reply);
        let steps = [
            (r, SYN | ACK, syn(S_ISN, C_ISN + 1, 65160, S_SCALE)),
            // 502 << 7 = 64256 bytes of receive window from here on.
            (o, ACK, seg(C_ISN + 1, S_ISN + 1, 502, 0)),
            (o, ACK | PSH, seg(C_ISN + 1, S_ISN + 1, 502, 1000)),
            (r, ACK, seg(S_ISN + 1, C_ISN + 1001, 128, 0)),
            (r, ACK | PSH, seg(S_ISN + 1, C_ISN + 1001, 128, 1000)),
            (o, ACK, seg(C_ISN + 1001, S_ISN + 1001, 502, 0)),
        ];
        for (i, (d, f, s)) in steps.iter().enumerate() {
            assert_eq!(t.update(0, id, *d, *f, s, 60), Update::Tracked, "step {i}");
        }
        assert_eq!(state(&t, id), ConnState::Tcp(TcpState::Established));
        (t, id)
    }

    #[test]
    fn handshake_learns_scale_and_sack() {
        let (t, id) = established(ConntrackConfig::default());
        let w = t.get(id).unwrap().tcp_window;
        assert_eq!((w.original.scale, w.reply.scale), (C_SCALE, S_SCALE));
        assert_eq!(w.original.end, C_ISN + 1001);
        assert_eq!(w.reply.end, S_ISN + 1001);
        // The server may send up to what the client acked plus its scaled window.
        assert_eq!(w.reply.maxend, S_ISN + 1001 + (502 << C_SCALE));
        assert_eq!(w.original.maxend, C_ISN + 1001 + (128 << S_SCALE));
        assert_ne!(w.original.flags & tcp::peer_flags::SACK_PERM, 0);
    }

    #[test]
    fn exact_rst_closes() {
        for (dir, seq) in [
            (Direction::Original, C_ISN + 1001),
            (Direction::Reply, S_ISN + 1001),
        ] {
            let (mut t, id) = established(ConntrackConfig::default());
            assert_eq!(
                t.update(0, id, dir, RST, &seg(seq, 0, 0, 0), 40),
                Update::Tracked
            );
            assert_eq!(state(&t, id), ConnState::Tcp(TcpState::Close), "{dir:?}");
        }
    }

    #[test]
    fn blind_rst_is_out_of_window_and_changes_nothing() {
        let (mut t, id) = established(ConntrackConfig::default());
        let before = t.get(id).unwrap().clone();
        for seq in [
            C_ISN + 1001 + (1 << 30),
            (C_ISN + 1001).wrapping_add(1 << 31),
            C_ISN,
            C_ISN - 100_000,
            0x1234_5678,
        ] {
            for f in [RST, RST | ACK] {
                assert_eq!(
                    t.update(
                        0,
                        id,
                        Direction::Original,
                        f,
                        &seg(seq, S_ISN + 1001, 0, 0),
                        40
                    ),
                    Update::OutOfWindow,
                    "seq {seq} flags {f:#x}"
                );
            }
        }
        assert_eq!(t.get(id).unwrap(), &before, "entry untouched");
        // In the window but not exact: let through (the endpoint answers with a challenge
        // ACK), the connection stays.
        assert_eq!(
            t.update(
                0,
                id,
                Direction::Original,
                RST,
                &seg(C_ISN + 5001, 0, 0, 0),
                40
            ),
            Update::Tracked
        );
        assert_eq!(state(&t, id), ConnState::Tcp(TcpState::Established));
    }

    #[test]
    fn data_far_out_of_window_is_invalid() {
        let (mut t, id) = established(ConntrackConfig::default());
        let before = t.get(id).unwrap().clone();
        let far = seg(C_ISN + 1001 + (1 << 30), S_ISN + 1001, 502, 1000);
        assert_eq!(
            t.update(0, id, Direction::Original, ACK | PSH, &far, 1040),
            Update::OutOfWindow
        );
        // Long acknowledged data, and an ACK of data the server never sent.
        let old = seg(
            (C_ISN + 1001).wrapping_sub(1 << 30),
            S_ISN + 1001,
            502,
            1000,
        );
        assert_eq!(
            t.update(0, id, Direction::Original, ACK | PSH, &old, 1040),
            Update::OutOfWindow
        );
        let ack_unsent = seg(C_ISN + 1001, S_ISN + 1001 + 500_000, 502, 0);
        assert_eq!(
            t.update(0, id, Direction::Original, ACK, &ack_unsent, 40),
            Update::OutOfWindow
        );
        // A FIN far out of window does not start the close either.
        let fin = seg(C_ISN + 1001 + (1 << 30), S_ISN + 1001, 502, 0);
        assert_eq!(
            t.update(0, id, Direction::Original, FIN | ACK, &fin, 40),
            Update::OutOfWindow
        );
        assert_eq!(t.get(id).unwrap(), &before, "entry untouched");
    }

    #[test]
    fn scaled_windows_and_sack_pass() {
        let (mut t, id) = established(ConntrackConfig::default());
        let (o, r) = (Direction::Original, Direction::Reply);
        // The server fills the client's scaled window (64256 bytes, far past the raw 502)...
        let mut sseq = S_ISN + 1001;
        for _ in 0..44 {
            assert_eq!(
                t.update(0, id, r, ACK, &seg(sseq, C_ISN + 1001, 128, 1448), 1500),
                Update::Tracked
            );
            sseq += 1448;
        }
        // ...the client acks the first segment and SACKs the rest (one segment lost)...
        let sacked = TcpSegment {
            sack: Some(sseq),
            ..seg(C_ISN + 1001, S_ISN + 1001 + 1448, 502, 0)
        };
        assert_eq!(t.update(0, id, o, ACK, &sacked, 52), Update::Tracked);
        // ...the server retransmits the hole, the client acks everything.
        assert_eq!(
            t.update(
                0,
                id,
                r,
                ACK,
                &seg(S_ISN + 2449, C_ISN + 1001, 128, 1448),
                1500
            ),
            Update::Tracked
        );
        assert_eq!(
            t.update(0, id, o, ACK, &seg(C_ISN + 1001, sseq, 502, 0), 40),
            Update::Tracked
        );
        // The client sends 60 kB in one window of the server's (128 << 9 = 65536).
        let mut cseq = C_ISN + 1001;
        for _ in 0..40 {
            assert_eq!(
                t.update(0, id, o, ACK, &seg(cseq, sseq, 502, 1448), 1500),
                Update::Tracked
            );
            cseq += 1448;
        }
        assert_eq!(state(&t, id), ConnState::Tcp(TcpState::Established));
    }

    #[test]
    fn sack_beyond_sent_data_is_invalid() {
        let (mut t, id) = established(ConntrackConfig::default());
        let bogus = TcpSegment {
            sack: Some(S_ISN + 1001 + 100_000),
            ..seg(C_ISN + 1001, S_ISN + 1001, 502, 0)
        };
        assert_eq!(
            t.update(0, id, Direction::Original, ACK, &bogus, 52),
            Update::OutOfWindow
        );
    }

    #[test]
    fn liberal_accepts_what_strict_refuses() {
        let cfg = ConntrackConfig {
            tcp_liberal: true,
            ..ConntrackConfig::default()
        };
        let (mut t, id) = established(cfg);
        let far = seg(C_ISN + 1001 + (1 << 30), S_ISN + 1001, 502, 1000);
        assert_eq!(
            t.update(0, id, Direction::Original, ACK, &far, 1040),
            Update::Tracked
        );
        let blind = seg((C_ISN + 1001).wrapping_add(1 << 31), 0, 0, 0);
        assert_eq!(
            t.update(0, id, Direction::Original, RST, &blind, 40),
            Update::Tracked
        );
        assert_eq!(state(&t, id), ConnState::Tcp(TcpState::Close));
    }

    #[test]
    fn a_moved_entry_takes_retransmissions_and_acks_from_before_the_move() {
        // Failover: the replica is as old as its last copy. The client's first segment here is a
        // retransmission far below what the server already acknowledged through the old
        // owner; the server's ACK of it acknowledges more than this data plane ever saw. Both
        // must pass (the kernel's mid-stream pickup is liberal too), or the connection stalls.
        let (a, id) = established(ConntrackConfig::default());
        let conn = a.get(id).unwrap().clone();
        let mut t = ct();
        let id = t.upsert(SEC, conn).unwrap();
        let (o, r) = (Direction::Original, Direction::Reply);
        let (cseq, sseq) = (C_ISN + 5_000_000, S_ISN + 5_000_000);
        let acked = cseq + 200_000;
        assert_eq!(
            t.update(SEC, id, o, ACK, &seg(cseq, sseq, 502, 1448), 1500),
            Update::Tracked,
            "a retransmission"
        );
        assert_eq!(
            t.update(SEC, id, r, ACK, &seg(sseq, acked, 128, 0), 52),
            Update::Tracked,
            "an ACK of data sent through the old owner"
        );
        // The client goes on from where the server is; both directions fit again, and the
        // window holds from then on.
        assert_eq!(
            t.update(SEC, id, o, ACK, &seg(acked, sseq, 502, 1448), 1500),
            Update::Tracked
        );
        assert_eq!(
            t.update(SEC, id, r, ACK, &seg(sseq, acked + 1448, 128, 0), 52),
            Update::Tracked
        );
        assert_eq!(
            t.update(SEC, id, o, ACK, &seg(acked + 1448, sseq, 502, 1448), 1500),
            Update::Tracked
        );
        assert!(
            !t.get(id).unwrap().tcp_window.is_liberal(),
            "in sync both ways"
        );
        let far = seg(acked + 2 * 1448 + (1 << 30), sseq, 502, 100);
        assert_eq!(t.update(SEC, id, o, ACK, &far, 140), Update::OutOfWindow);
    }

    #[test]
    fn an_entry_whose_bucket_came_back_relearns() {
        // Scale-out then scale-in: this data plane tracked the flow, the bucket moved to another
        // data plane (which carried it on for megabytes), then came back. The entry here is
        // found before any imported copy; frozen at the move, it would drop every segment.
        let (mut t, id) = established(ConntrackConfig::default());
        let bucket = t.get(id).unwrap().bucket;
        let (o, r) = (Direction::Original, Direction::Reply);
        let (cseq, sseq) = (C_ISN + 5_000_000, S_ISN + 5_000_000);
        assert_eq!(
            t.update(SEC, id, o, ACK, &seg(cseq, sseq, 502, 1448), 1500),
            Update::OutOfWindow,
            "frozen positions refuse the flow's current segments"
        );
        assert_eq!(t.relearn_where(|b| b != bucket), 0, "other buckets only");
        assert_eq!(t.relearn_where(|b| b == bucket), 1);
        assert!(t.get(id).unwrap().tcp_window.is_liberal());
        assert_eq!(
            t.update(SEC, id, o, ACK, &seg(cseq, sseq, 502, 1448), 1500),
            Update::Tracked
        );
        assert_eq!(
            t.update(SEC, id, r, ACK, &seg(sseq, cseq + 1448, 128, 0), 52),
            Update::Tracked
        );
        assert_eq!(
            t.update(SEC, id, o, ACK, &seg(cseq + 1448, sseq, 502, 1448), 1500),
            Update::Tracked
        );
        assert!(!t.get(id).unwrap().tcp_window.is_liberal(), "in sync again");
    }

    #[test]
    fn mid_stream_entry_learns_then_checks() {
        // Exported after the handshake, imported elsewhere: positions are relearned from the
        // next segments, the negotiated scale stays.
        let (a, id) = established(ConntrackConfig::default());
        let conn = a.get(id).unwrap().clone();
        let mut t = ct();
        let id = t.import(SEC, conn).unwrap();
        let (o, r) = (Direction::Original, Direction::Reply);
        // Both sides moved on by 5 MB meanwhile.
        let (cseq, sseq) = (C_ISN + 5_000_000, S_ISN + 5_000_000);
        assert_eq!(
            t.update(SEC, id, r, ACK, &seg(sseq, cseq, 128, 1448), 1500),
            Update::Tracked
        );
        assert_eq!(
            t.update(SEC, id, o, ACK, &seg(cseq, sseq + 1448, 502, 1448), 1500),
            Update::Tracked
        );
        for i in 1..30 {
            assert_eq!(
                t.update(
                    SEC,
                    id,
                    r,
                    ACK,
                    &seg(sseq + i * 1448, cseq + 1448, 128, 1448),
                    1500
                ),
                Update::Tracked,
                "server segment {i}"
            );
        }
        // Learnt: the window holds again.
        let far = seg(cseq + 1448 + (1 << 30), sseq, 502, 100);
        assert_eq!(t.update(SEC, id, o, ACK, &far, 140), Update::OutOfWindow);
        let blind = seg(cseq.wrapping_add(1 << 31), 0, 0, 0);
        assert_eq!(t.update(SEC, id, o, RST, &blind, 40), Update::OutOfWindow);
        assert_eq!(state(&t, id), ConnState::Tcp(TcpState::Established));
        assert_eq!(
            t.update(SEC, id, o, RST, &seg(cseq + 1448, 0, 0, 0), 40),
            Update::Tracked
        );
        assert_eq!(state(&t, id), ConnState::Tcp(TcpState::Close));
    }

    #[test]
    fn entry_from_an_older_exporter_learns() {
        // No window fields at all (an exporter that predates them): scale unknown, taken large.
        let (a, id) = established(ConntrackConfig::default());
        let mut v = serde_json::to_value(a.get(id).unwrap()).unwrap();
        v.as_object_mut().unwrap().remove("tcp_window");
        let conn: Conn = serde_json::from_value(v).unwrap();
        assert_eq!(conn.tcp_window, TcpWindow::default());
        let mut t = ct();
        let id = t.import(SEC, conn).unwrap();
        let (cseq, sseq) = (C_ISN + 7_000_000, S_ISN + 7_000_000);
        let (o, r) = (Direction::Original, Direction::Reply);
        assert_eq!(
            t.update(SEC, id, o, ACK, &seg(cseq, sseq, 502, 0), 40),
            Update::Tracked
        );
        // 40 segments, 58 kB: past 502 bytes unscaled, within 502 << 7.
        for i in 0..40 {
            assert_eq!(
                t.update(
                    SEC,
                    id,
                    r,
                    ACK,
                    &seg(sseq + i * 1448, cseq, 128, 1448),
                    1500
                ),
                Update::Tracked,
                "server segment {i}"
            );
        }
    }

    #[test]
    fn window_survives_export_and_import() {
        let (a, id) = established(ConntrackConfig::default());
        let conn = a.get(id).unwrap().clone();
        let json = serde_json::to_string(&conn).unwrap();
        assert!(json.contains("tcp_window"), "{json}");
        let back: Conn = serde_json::from_str(&json).unwrap();
        assert_eq!(back, conn);
        assert_eq!(back.tcp_window.original.scale, C_SCALE);
        assert_eq!(back.tcp_window.reply.scale, S_SCALE);
        let mut b = ct();
        let id = b.import(SEC, back).unwrap();
        let w = b.get(id).unwrap().tcp_window;
        assert_eq!((w.original.scale, w.reply.scale), (C_SCALE, S_SCALE));
        assert_eq!(w.original.maxwin, 0, "positions relearned");
    }

    #[test]
    fn segment_parse_reads_options_only_where_needed() {
        // SYN: MSS 1460, SACK-permitted, timestamps, NOP, window scale 7.
        let mut syn = vec![
            0x9c, 0x40, 0x00, 0x50, // ports 40000 -> 80
            0x00, 0x0f, 0x42, 0x40, // seq 1000000
            0x00, 0x00, 0x00, 0x00, // ack
            0xa0, 0x02, 0xfa, 0xf0, // data offset 10, SYN, window 64240
            0x00, 0x00, 0x00, 0x00, // checksum, urgent
            0x02, 0x04, 0x05, 0xb4, 0x04, 0x02, 0x08, 0x0a, 0, 0, 0, 1, 0, 0, 0, 0, 0x01, 0x03,
            0x03, 0x07,
        ];
        let s = TcpSegment::parse(&syn).unwrap();
        assert_eq!(
            (s.seq, s.window, s.wscale, s.sack_perm, s.payload_len),
            (1_000_000, 64240, Some(7), true, 0)
        );
        // The same options on an ACK are not read.
        syn[13] = 0x10;
        let s = TcpSegment::parse(&syn).unwrap();
        assert_eq!((s.wscale, s.sack_perm), (None, false));
        // ACK with NOP NOP SACK of two blocks, the second one wrapping past 2^32, and 3 bytes
        // of payload.
        let mut ack = vec![
            0x00, 0x50, 0x9c, 0x40, 0, 0, 0, 1, 0, 0, 0, 2, 0xa0, 0x10, 0x01, 0x00, 0, 0, 0, 0,
            0x01, 0x01, 0x05, 0x12, //
            0xff, 0xff, 0xff, 0x00, 0xff, 0xff, 0xff, 0xf0, // block 1
            0xff, 0xff, 0xff, 0xf0, 0x00, 0x00, 0x00,
            0x10, // block 2: right edge after block 1
        ];
        ack.extend_from_slice(b"abc");
        let s = TcpSegment::parse(&ack).unwrap();
        assert_eq!((s.ack, s.window, s.payload_len), (2, 256, 3));
        assert_eq!(s.sack, Some(0x10));
        assert!(TcpSegment::parse(&ack[..19]).is_none());
    }
}

fn syn_to(t: &mut Conntrack, now: u64, sp: u16) -> Result<ConnId, CreateError> {
    t.create(now, 0, &k(6, sp, 80), SYN, &TcpSegment::default(), 60)
}

/// A full three-way handshake on `sp` (window tracking off the point here: liberal).
fn established(t: &mut Conntrack, now: u64, sp: u16) -> ConnId {
    let id = syn_to(t, now, sp).unwrap();
    let seg = TcpSegment::default();
    t.update(now, id, Direction::Reply, SYN | ACK, &seg, 60);
    t.update(now, id, Direction::Original, ACK, &seg, 52);
    assert_eq!(
        t.get(id).unwrap().state,
        ConnState::Tcp(TcpState::Established)
    );
    id
}

fn small(max_entries: usize) -> Conntrack {
    Conntrack::new(ConntrackConfig {
        max_entries,
        tcp_liberal: true,
        ..Default::default()
    })
}

#[test]
fn early_drop_evicts_a_half_open_entry_and_admits_the_new_one() {
    let mut t = small(4);
    let est = established(&mut t, 0, 1);
    for p in 2..=4 {
        syn_to(&mut t, SEC, p).unwrap();
    }
    assert_eq!(t.own_len(), 4);
    // Full: the next SYN takes the oldest half-open entry's place.
    let new = syn_to(&mut t, 2 * SEC, 5).unwrap();
    assert_eq!(t.early_drops(), 1);
    assert_eq!(t.len(), 4);
    assert!(t.find(&k(6, 2, 80)).is_none(), "the oldest half-open went");
    assert!(t.find(&k(6, 3, 80)).is_some());
    assert_eq!(t.get(new).unwrap().key, k(6, 5, 80));
    assert!(t.get(est).is_some());
    // An unreplied UDP flow is as evictable.
    let mut u = small(1);
    u.create(0, 0, &k(17, 1, 53), 0, &TcpSegment::default(), 1)
        .unwrap();
    u.create(SEC, 0, &k(17, 2, 53), 0, &TcpSegment::default(), 1)
        .unwrap();
    assert_eq!((u.len(), u.early_drops()), (1, 1));
}

#[test]
fn established_entries_are_never_evicted() {
    let mut t = small(3);
    let ids: Vec<ConnId> = (1..=3).map(|p| established(&mut t, 0, p)).collect();
    for p in 10..200 {
        assert_eq!(
            syn_to(&mut t, SEC, p),
            Err(CreateError::TableFull { max: 3 })
        );
    }
    assert_eq!(t.early_drops(), 0);
    for (id, p) in ids.iter().zip(1..) {
        assert_eq!(t.get(*id).unwrap().key, k(6, p, 80));
    }
    // Mixed: a flood of SYNs only ever replaces SYNs.
    let mut t = small(3);
    let est = established(&mut t, 0, 1);
    for p in 10..10_000 {
        syn_to(&mut t, SEC, p).unwrap();
    }
    assert_eq!(t.len(), 3);
    assert_eq!(t.early_drops(), 10_000 - 10 - 2);
    assert!(t.get(est).is_some_and(|c| c.key == k(6, 1, 80)));
    // Bounded work per eviction: records left over stay few.
    assert!(t.pending_records() < 100, "{}", t.pending_records());
}

#[test]
fn replicas_do_not_count_against_the_owners_limit() {
    let mut t = small(3);
    for p in 100..103 {
        let mut c = t_conn(p);
        c.state = ConnState::Tcp(TcpState::Established);
        t.upsert(0, c).unwrap();
    }
    assert_eq!((t.own_len(), t.replica_len()), (0, 3));
    // The owner's full limit is still there.
    for p in 1..=3 {
        established(&mut t, 0, p);
    }
    assert_eq!((t.own_len(), t.replica_len()), (3, 3));
    assert_eq!(t.early_drops(), 0);
    // Replicas have a cap of their own, and an own connection never makes room for one.
    let mut c = t_conn(200);
    c.state = ConnState::Tcp(TcpState::Established);
    assert_eq!(t.upsert(0, c), Err(CreateError::TableFull { max: 3 }));
    // A packet of a replica makes it our own (failover).
    let (id, dir) = t.lookup(SEC, &k(6, 100, 80)).unwrap();
    t.update(SEC, id, dir, ACK, &TcpSegment::default(), 52);
    assert_eq!((t.own_len(), t.replica_len()), (4, 2));
    let id = t.lookup(SEC, &k(6, 101, 80)).unwrap().0;
    t.remove(id);
    assert_eq!((t.own_len(), t.replica_len()), (4, 1));
}

fn t_conn(sp: u16) -> Conn {
    Conn {
        key: k(6, sp, 80),
        bucket: 0,
        state: ConnState::Tcp(TcpState::SynSent),
        created: 0,
        last_seen: 0,
        orig_packets: 1,
        orig_bytes: 60,
        reply_packets: 0,
        reply_bytes: 0,
        tcp_window: TcpWindow::default(),
    }
}

#[test]
fn half_open_entries_time_out_early_under_pressure() {
    let mut t = small(10);
    let to = Timeouts::default();
    for p in 1..=8 {
        syn_to(&mut t, 0, p).unwrap();
    }
    // 8 of 10: normal timeout.
    let calm = syn_to(&mut t, 0, 9).unwrap();
    assert_eq!(t.expires_at(calm), Some(to.tcp_syn_sent * SEC));
    // 9 of 10 (90 %): short.
    let pressed = syn_to(&mut t, 0, 10).unwrap();
    assert_eq!(t.expires_at(pressed), Some(to.half_open_pressure * SEC));
    // Collected in memory on time, not only hidden from lookups.
    assert_eq!(t.expire((to.half_open_pressure + 1) * SEC, 1000), 1);
    assert!(t.find(&k(6, 10, 80)).is_none());
    // Established connections keep their timeout whatever the pressure.
    for p in 10..=11 {
        syn_to(&mut t, 0, p).unwrap();
    }
    let est = established(&mut t, 0, 12);
    assert_eq!(t.expires_at(est), Some(to.tcp_established * SEC));
}

#[test]
fn half_open_entries_are_not_journaled() {
    let mut t = small(10);
    t.set_journal(true);
    let id = syn_to(&mut t, 0, 1).unwrap();
    t.update(
        0,
        id,
        Direction::Reply,
        SYN | ACK,
        &TcpSegment::default(),
        60,
    );
    assert!(t.take_journal().is_empty(), "SYN_SENT, SYN_RECV: no copy");
    t.update(0, id, Direction::Original, ACK, &TcpSegment::default(), 52);
    assert_eq!(t.take_journal(), vec![k(6, 1, 80)]);
    let u = t
        .create(0, 0, &k(17, 1, 53), 0, &TcpSegment::default(), 1)
        .unwrap();
    assert!(t.take_journal().is_empty());
    t.update(0, u, Direction::Reply, 0, &TcpSegment::default(), 1);
    assert_eq!(t.take_journal(), vec![k(17, 1, 53)]);
}

#[test]
fn slices_walk_the_whole_table() {
    let mut t = small(100);
    for p in 0..50 {
        syn_to(&mut t, 0, p).unwrap();
    }
    let (mut seen, mut at) = (0, 0);
    loop {
        let (it, next) = t.slice(at, 7);
        seen += it.count();
        if next == 0 {
            break;
        }
        at = next;
    }
    assert_eq!(seen, 50);
}
