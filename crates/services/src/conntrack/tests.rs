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
    let id = t.create(0, 3, &key, SYN, 60).unwrap();
    assert_eq!(t.lookup(0, &key), Some((id, Direction::Original)));
    assert_eq!(t.lookup(0, &key.reversed()), Some((id, Direction::Reply)));
    assert!(t.lookup(0, &k(6, 40001, 80)).is_none());
    assert!(
        t.lookup(0, &k(17, 40000, 80)).is_none(),
        "protocol is part of the key"
    );
    assert!(matches!(
        t.create(0, 3, &key.reversed(), SYN, 60),
        Err(CreateError::Exists { .. })
    ));
    assert_eq!(t.len(), 1);
}

#[test]
fn create_refuses_non_openers() {
    let mut t = ct();
    for f in [ACK, SYN | ACK, RST, FIN | ACK, SYN | FIN, 0] {
        assert_eq!(
            t.create(0, 0, &k(6, 1, 2), f, 40),
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
        let id = t.create(0, 0, &key, first, 1).unwrap();
        for &(d, f) in rest {
            assert_ne!(t.update(0, id, d, f, 1), Update::Invalid, "case {i}");
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
    let id = t.create(0, 0, &k(17, 1, 2), 0, 1).unwrap();
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
    let id = t.create(0, 0, &key, 0, 1).unwrap();
    for i in 0..100_000u64 {
        let dir = if i % 2 == 0 {
            Direction::Reply
        } else {
            Direction::Original
        };
        t.update(i * 1_000_000, id, dir, 0, 1);
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
    let id = t.create(0, 0, &key, SYN, 1).unwrap();
    t.update(0, id, Direction::Reply, SYN | ACK, 1);
    t.update(0, id, Direction::Original, ACK, 1);
    t.update(10 * SEC, id, Direction::Original, FIN | ACK, 1);
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
    let id = t.create(0, 0, &key, 0, 1).unwrap();
    t.update(20 * SEC, id, Direction::Original, 0, 1);
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
            t.create(now, 0, &k(17, p, 53), 0, 1).unwrap();
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
        t.create(0, 0, &k(17, p, 53), 0, 1).unwrap();
    }
    assert_eq!(
        t.create(SEC, 0, &k(17, 9, 53), 0, 1),
        Err(CreateError::TableFull { max: 3 })
    );
    let id = t.lookup(SEC, &k(17, 0, 53)).unwrap().0;
    t.remove(id).unwrap();
    assert!(t.create(SEC, 0, &k(17, 9, 53), 0, 1).is_ok());
    // Past every deadline, creation collects dead entries by itself.
    assert!(t.create(100 * SEC, 0, &k(17, 10, 53), 0, 1).is_ok());
    assert_eq!(t.len(), 1);
}

#[test]
fn per_bucket_counts_follow_removal() {
    let mut t = ct();
    let a = t.create(0, 1, &k(17, 1, 53), 0, 1).unwrap();
    t.create(0, 1, &k(17, 2, 53), 0, 1).unwrap();
    t.create(0, 2, &k(17, 3, 53), 0, 1).unwrap();
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
    let id = t.create(5, 4, &k(6, 1, 2), SYN, 60).unwrap();
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
    let id = a.create(SEC, 0, &k(17, 1, 53), 0, 1).unwrap();
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
    let id = t.create(0, 0, &key, SYN, 1).unwrap();
    t.update(0, id, Direction::Reply, SYN | ACK, 1);
    t.update(0, id, Direction::Original, ACK, 1);
    t.update(0, id, Direction::Reply, FIN | ACK, 1);
    t.update(0, id, Direction::Original, FIN | ACK, 1);
    assert_eq!(t.get(id).unwrap().state, ConnState::Tcp(TcpState::LastAck));
    // A late SYN/ACK retransmission is accepted but does not extend last_ack's 30 s.
    assert_eq!(
        t.update(20 * SEC, id, Direction::Reply, SYN | ACK, 1),
        Update::Ignored
    );
    assert_eq!(t.expires_at(id), Some(30 * SEC));
    assert_eq!(t.get(id).unwrap().reply_packets, 3);
}
