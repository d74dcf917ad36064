//! A unit test per admission rule.

use super::*;

const MIB: u64 = 1 << 20;

fn limits() -> Limits {
    Limits {
        max_connections: 4,
        max_pending_per_ip: 2,
        max_connections_per_ip: 3,
        max_connections_per_peer: 2,
        retry_after_pending: 3,
        min_client_rate: 1000,
        response_memory: 8 * MIB,
        largest_response: MIB,
        send_memory: 4 * MIB,
        send_window: 2 * MIB,
        max_uploads: 4,
        upload_slot: Duration::from_secs(5),
    }
}

fn ip(last: u8) -> IpAddr {
    IpAddr::from([10, 0, 0, last])
}

fn accept(a: &mut Admission, ip: IpAddr, now: Instant) -> ConnId {
    match a.handle_incoming(ip, true, false, now) {
        Incoming::Accept(id) => id,
        other => panic!("refused: {other:?}"),
    }
}

/// A connection from `ip` authenticated as `peer`.
fn open(a: &mut Admission, ip: IpAddr, peer: PeerId, now: Instant) -> ConnId {
    let id = accept(a, ip, now);
    a.handle_authenticated(id, peer, now).expect("room");
    id
}

fn outputs(a: &mut Admission) -> Vec<Output> {
    std::iter::from_fn(|| a.poll_output()).collect()
}

#[test]
fn under_load_an_unproven_address_is_asked_to_prove_itself_first() {
    let mut a = Admission::new(limits());
    let t = Instant::now();
    for i in 0..3 {
        assert!(matches!(
            a.handle_incoming(ip(i), false, true, t),
            Incoming::Accept(_)
        ));
    }
    // Three handshakes under way: the next unproven one gets a Retry, costing no state...
    assert_eq!(a.handle_incoming(ip(9), false, true, t), Incoming::Retry);
    assert_eq!(a.counts(), (3, 3));
    // ...unless it already proved its address, or a Retry can no longer be asked.
    assert!(matches!(
        a.handle_incoming(ip(9), true, false, t),
        Incoming::Accept(_)
    ));
}

#[test]
fn one_address_group_holds_few_handshakes_an_ipv6_64_is_one_group() {
    let mut a = Admission::new(Limits {
        retry_after_pending: 100,
        ..limits()
    });
    let t = Instant::now();
    let v6 = |last: u16| IpAddr::from([0x2001, 0xdb8, 0, 1, 0, 0, 0, last]);
    accept(&mut a, v6(1), t);
    accept(&mut a, v6(2), t);
    assert_eq!(
        a.handle_incoming(v6(3), true, false, t),
        Incoming::Refuse(RefusedReason::Busy)
    );
    // Another /64 is another host.
    accept(&mut a, IpAddr::from([0x2001, 0xdb8, 0, 2, 0, 0, 0, 1]), t);
    // A mapped IPv4 address is its IPv4 group.
    let mapped: IpAddr = "::ffff:10.0.0.7".parse().unwrap();
    assert_eq!(ip_group(mapped), ip(7));
}

#[test]
fn a_full_streamer_refuses_while_every_connection_serves_or_is_new() {
    let mut a = Admission::new(limits());
    let t = Instant::now();
    let ids: Vec<_> = (0..4)
        .map(|i| open(&mut a, ip(i), PeerId::random(), t))
        .collect();
    // All new (within their grace): none can make room.
    assert_eq!(
        a.handle_incoming(ip(9), true, false, t),
        Incoming::Refuse(RefusedReason::Busy)
    );
    // Past the grace, all serving above the floor rate: still none.
    let later = t + EVICTION_GRACE * 2;
    for id in &ids {
        a.handle_served(*id, 1_000_000);
    }
    assert_eq!(
        a.handle_incoming(ip(9), true, false, later),
        Incoming::Refuse(RefusedReason::Busy)
    );
}

#[test]
fn a_full_streamer_closes_the_one_that_takes_least_the_most_crowded_group_first() {
    let mut a = Admission::new(Limits {
        max_connections_per_ip: 4,
        max_connections_per_peer: 4,
        ..limits()
    });
    let t = Instant::now();
    // One idle connection from a lone address, two idle ones from a crowded address.
    let lone = open(&mut a, ip(1), PeerId::random(), t);
    let crowd_a = open(&mut a, ip(2), PeerId::random(), t);
    let crowd_b = open(&mut a, ip(2), PeerId::random(), t);
    let busy = open(&mut a, ip(3), PeerId::random(), t);
    outputs(&mut a);
    let later = t + EVICTION_GRACE * 2;
    a.handle_served(busy, 10_000_000);
    a.handle_served(crowd_b, 100);
    assert!(matches!(
        a.handle_incoming(ip(9), true, false, later),
        Incoming::Accept(_)
    ));
    // The crowded group's idler goes, not the lone one, nor one that is served.
    assert_eq!(outputs(&mut a), vec![Output::Evict(crowd_a)]);
    // The evicted one does not count as room twice: the next newcomer makes its own.
    assert!(matches!(
        a.handle_incoming(ip(8), true, false, later),
        Incoming::Accept(_)
    ));
    assert_eq!(outputs(&mut a), vec![Output::Evict(crowd_b)]);
    assert!(matches!(
        a.handle_incoming(ip(7), true, false, later),
        Incoming::Accept(_)
    ));
    assert_eq!(outputs(&mut a), vec![Output::Evict(lone)]);
    // Handshakes under way are never closed for room: the streamer is full now.
    assert_eq!(
        a.handle_incoming(ip(6), true, false, later),
        Incoming::Refuse(RefusedReason::Busy)
    );
}

#[test]
fn after_the_token_an_address_and_a_peer_hold_few_connections() {
    let mut a = Admission::new(Limits {
        max_connections: 10,
        max_pending_per_ip: 10,
        retry_after_pending: 10,
        ..limits()
    });
    let t = Instant::now();
    let peer = PeerId::random();
    open(&mut a, ip(1), peer, t);
    let second = open(&mut a, ip(2), peer, t);
    // The same PeerId from a third address: over its two.
    let third = accept(&mut a, ip(3), t);
    assert_eq!(
        a.handle_authenticated(third, peer, t),
        Err(RefusedReason::Busy)
    );
    // Three identities from one address: over its three.
    for _ in 0..2 {
        open(&mut a, ip(4), PeerId::random(), t);
    }
    open(&mut a, ip(4), PeerId::random(), t);
    let fourth = accept(&mut a, ip(4), t);
    assert_eq!(
        a.handle_authenticated(fourth, PeerId::random(), t),
        Err(RefusedReason::Busy)
    );
    // A closed connection gives its place back.
    a.handle_closed(second);
    a.handle_closed(third);
    let again = accept(&mut a, ip(3), t);
    assert_eq!(a.handle_authenticated(again, peer, t), Ok(()));
}

#[test]
fn response_memory_is_shared_by_peer_and_by_address_whole_or_not_at_all() {
    let mut a = Admission::new(Limits {
        max_connections: 10,
        max_pending_per_ip: 10,
        retry_after_pending: 10,
        max_connections_per_ip: 10,
        ..limits()
    });
    let t = Instant::now();
    // 8 MiB over 4 uploads: 2 MiB for a peer, and for an address group.
    assert_eq!(a.memory_share(), 2 * MIB);
    let peer = PeerId::random();
    let c1 = open(&mut a, ip(1), peer, t);
    let c2 = open(&mut a, ip(2), peer, t);
    assert!(a.reserve_memory(c1, MIB));
    assert!(a.reserve_memory(c2, MIB));
    // The peer's share is taken, whatever connection asks.
    assert!(!a.reserve_memory(c2, 1));
    // Identities from one address share one group's share.
    let s1 = open(&mut a, ip(3), PeerId::random(), t);
    let s2 = open(&mut a, ip(3), PeerId::random(), t);
    assert!(a.reserve_memory(s1, 2 * MIB - 10));
    assert!(!a.reserve_memory(s2, 11));
    assert!(a.reserve_memory(s2, 10));
    // Others still have room, up to the total.
    let o1 = open(&mut a, ip(4), PeerId::random(), t);
    let o2 = open(&mut a, ip(5), PeerId::random(), t);
    let o3 = open(&mut a, ip(6), PeerId::random(), t);
    assert!(a.reserve_memory(o1, 2 * MIB));
    assert!(a.reserve_memory(o2, 2 * MIB));
    assert!(!a.reserve_memory(o3, 1), "over the 8 MiB in all");
    // Released memory is room again; a closed connection releases what it held.
    a.release_memory(c1, MIB);
    assert!(a.reserve_memory(o3, MIB));
    a.handle_closed(o1);
    assert!(a.reserve_memory(c2, MIB));
    // An unknown connection, or one that releases more than it holds, changes nothing.
    assert!(!a.reserve_memory(999, 1));
    a.release_memory(c2, 100 * MIB);
    assert!(a.reserve_memory(c1, 2 * MIB));
}

#[test]
fn every_share_holds_one_largest_response() {
    let a = Admission::new(Limits {
        max_uploads: 64,
        ..limits()
    });
    // 8 MiB / 64 would be 128 KiB, less than one 1 MiB response.
    assert_eq!(a.memory_share(), MIB);
}

#[test]
fn have_answers_have_their_own_memory_shared_by_peer_and_address() {
    let mut a = Admission::new(Limits {
        max_connections: 20,
        max_pending_per_ip: 20,
        retry_after_pending: 20,
        max_connections_per_ip: 20,
        max_connections_per_peer: 20,
        ..limits()
    });
    let t = Instant::now();
    let peer = PeerId::random();
    let c = open(&mut a, ip(1), peer, t);
    let c2 = open(&mut a, ip(2), peer, t);
    assert!(a.reserve_have(c, HAVE_SHARE));
    assert!(!a.reserve_have(c2, 1), "the peer's share is taken");
    // Chunk responses do not wait on have answers.
    assert!(a.reserve_memory(c, MIB));
    a.release_have(c, HAVE_SHARE);
    assert!(a.reserve_have(c2, HAVE_SHARE));
    // The budget in all: four groups fill it.
    for i in 3..6 {
        let o = open(&mut a, ip(i), PeerId::random(), t);
        assert!(a.reserve_have(o, HAVE_SHARE));
    }
    let last = open(&mut a, ip(9), PeerId::random(), t);
    assert!(!a.reserve_have(last, 1));
    a.handle_closed(c2);
    assert!(a.reserve_have(last, HAVE_SHARE));
}

#[test]
fn the_send_memory_is_shared_as_connections_come_and_go() {
    let mut a = Admission::new(limits());
    let t = Instant::now();
    let c1 = open(&mut a, ip(1), PeerId::random(), t);
    assert_eq!(outputs(&mut a), vec![Output::SendShare(c1, 2 * MIB)]);
    // Handshakes under way get none.
    let pending = accept(&mut a, ip(3), t);
    assert!(outputs(&mut a).is_empty());
    let c2 = open(&mut a, ip(2), PeerId::random(), t);
    let c3 = open(&mut a, ip(4), PeerId::random(), t);
    let mut out = outputs(&mut a);
    out.retain(|o| matches!(o, Output::SendShare(..)));
    // The last rebalance: three authenticated connections share 4 MiB.
    assert_eq!(
        &out[out.len() - 3..],
        &[
            Output::SendShare(c1, 4 * MIB / 3),
            Output::SendShare(c2, 4 * MIB / 3),
            Output::SendShare(c3, 4 * MIB / 3)
        ]
    );
    a.handle_closed(pending);
    assert!(outputs(&mut a).is_empty());
    a.handle_closed(c3);
    assert_eq!(
        outputs(&mut a),
        vec![
            Output::SendShare(c1, 2 * MIB),
            Output::SendShare(c2, 2 * MIB)
        ]
    );
}

#[test]
fn a_gone_peer_frees_its_upload_slot_once_its_last_connection_closes() {
    let mut a = Admission::new(Limits {
        max_uploads: 1,
        ..limits()
    });
    let t = Instant::now();
    let (holder, waiter) = (PeerId::random(), PeerId::random());
    let h1 = open(&mut a, ip(1), holder, t);
    let h2 = open(&mut a, ip(2), holder, t);
    open(&mut a, ip(3), waiter, t);
    assert!(a.upload_slot(holder, t, |_| 0.0));
    assert!(!a.upload_slot(waiter, t, |_| 0.0));
    a.upload_done(holder, 0, t);
    assert!(a.contended(t));
    a.handle_closed(h1);
    assert!(
        !a.upload_slot(waiter, t, |_| 0.0),
        "it still has a connection"
    );
    a.handle_closed(h2);
    assert!(a.upload_slot(waiter, t, |_| 0.0));
}

#[test]
fn the_send_memory_is_shared_within_bounds() {
    // Alone, a connection gets the transport's window, not the whole budget.
    assert_eq!(send_share(64 * MIB, 16 * MIB, 1), 16 * MIB);
    assert_eq!(send_share(64 * MIB, 16 * MIB, 4), 16 * MIB);
    // Many share the budget: the total stays within it.
    assert_eq!(send_share(64 * MIB, 16 * MIB, 32), 2 * MIB);
    assert!(send_share(64 * MIB, 16 * MIB, 64) * 64 <= 64 * MIB);
    // Never below the floor, nor above a window smaller than it.
    assert_eq!(send_share(64 * MIB, 16 * MIB, 10_000), 256 << 10);
    assert_eq!(send_share(64 * MIB, 64 << 10, 10_000), 64 << 10);
}

#[test]
fn a_response_is_sent_with_what_the_path_carries_not_the_whole_share() {
    // Twice the congestion window, within the share.
    assert_eq!(send_window_now(1 << 20, 16 * MIB), 2 * MIB);
    assert_eq!(send_window_now(32 * MIB, 16 * MIB), 16 * MIB);
    // A fresh path (small window) still gets the floor, unless the share is smaller.
    assert_eq!(send_window_now(12_000, 16 * MIB), MIN_SEND_WINDOW);
    assert_eq!(send_window_now(12_000, 64 << 10), 64 << 10);
}
