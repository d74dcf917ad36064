//! Strikes, and the bounds that hold whatever the number of identities: tables, announcers
//! per connection, partial holders, request nonces and the size of an advert.

use super::*;

#[test]
fn strikes_lead_to_being_ignored() {
    let t0 = Instant::now();
    let mut d = machine(config(), t0);
    let p = PeerId::random();
    for i in 0..3 {
        assert_eq!(
            d.handle_gossip(Some(p), p, b"\xff\xfe junk", t0),
            Verdict::Reject,
            "{i}"
        );
    }
    let misbehaved: Vec<_> = drain(&mut d)
        .into_iter()
        .filter(|a| matches!(a, Action::Notice(Notice::Misbehaved { .. })))
        .collect();
    assert_eq!(misbehaved.len(), 1);
    assert!(d.ignores(&p, t0));
    assert_eq!(
        d.handle_gossip(Some(p), p, b"\xff\xfe junk", t0),
        Verdict::Ignore
    );
    assert_eq!(
        d.metrics.messages(MessageKind::Malformed),
        3,
        "the fourth is not counted"
    );
}

#[test]
fn strikes_decay() {
    let t0 = Instant::now();
    let mut c = config();
    c.strike_decay = 60 * SEC;
    let mut d = machine(c, t0);
    let p = PeerId::random();
    for _ in 0..3 {
        d.handle_gossip(Some(p), p, b"\xff\xfe junk", t0);
    }
    assert!(d.ignores(&p, t0));
    assert!(d.ignores(&p, t0 + 59 * SEC));
    // One strike is forgotten a minute after the last: below the three that ignore.
    assert!(!d.ignores(&p, t0 + 60 * SEC));
    // A strike then counts on what is left.
    d.handle_gossip(Some(p), p, b"\xff\xfe junk", t0 + 60 * SEC);
    assert!(d.ignores(&p, t0 + 60 * SEC));
}

#[test]
fn a_peer_whose_chunks_were_bad_is_struck_even_when_the_sync_succeeds() {
    let t0 = Instant::now();
    let (mut d, nonce) = asking(config(), t0, None);
    let (good, bad) = (PeerId::random(), PeerId::random());
    for p in [good, bad] {
        d.handle_answer(p, &answer(p, &[full(100, 1)], nonce), AnswerTo::Request, t0);
    }
    d.handle_timeout(t0 + SEC);
    assert!(plan_of(&drain(&mut d)).is_some());
    d.handle_sync_ended(
        SyncOutcome::Synced {
            bad_peers: vec![bad],
            served: vec![],
        },
        t0 + 2 * SEC,
    );
    assert_eq!(d.peers.strikes.get(&bad), Some(&1));
    assert_eq!(d.peers.strikes.get(&good), None);
}

#[test]
fn tables_are_bounded_whatever_the_number_of_identities() {
    let t0 = Instant::now();
    let mut c = config();
    c.max_tracked_peers = 8;
    let mut d = machine(c, t0);
    d.handle_timeout(t0);
    let nonce = last_nonce(&drain(&mut d));
    for i in 0..100u64 {
        let p = PeerId::random();
        d.handle_answer(
            p,
            &answer(p, &[full(10 + i, 1)], nonce),
            AnswerTo::Request,
            t0 + Duration::from_millis(i),
        );
        d.handle_gossip(Some(p), p, b"junk", t0);
    }
    assert_eq!(d.book.len(), 8);
    assert!(d.peers.strikes.len() <= 8);
    // The newest adverts stayed.
    assert_eq!(d.best_known_slot(t0), Some(109));
}

#[test]
fn thousands_of_announcing_identities_leave_the_trusted_adverts_in_place() {
    let t0 = Instant::now();
    let trusted: Vec<PeerId> = (0..3).map(|_| PeerId::random()).collect();
    let mut c = trusted_config(&trusted, 2);
    c.max_tracked_peers = 4096;
    let (mut d, nonce) = asking(c, t0, None);
    for p in &trusted {
        d.handle_answer(
            *p,
            &answer(*p, &[full(500, 1)], nonce),
            AnswerTo::Request,
            t0,
        );
    }
    // 4,096 fresh identities announce right after, relayed by 64 connections.
    let relays: Vec<PeerId> = (0..64).map(|_| PeerId::random()).collect();
    for i in 0..4096u64 {
        let p = PeerId::random();
        let ann = message::gossip(crate::proto::discovery_message::Body::Announcement(answer(
            p,
            &[full(600 + i, 7)],
            0,
        )));
        d.handle_gossip(Some(p), relays[i as usize % 64], &ann, t0);
    }
    d.handle_timeout(t0 + SEC);
    let plan = plan_of(&drain(&mut d)).expect("not NoSnapshotAvailable");
    assert_eq!(plan.last().ad.key, full(500, 1).key);
    assert!(d.book.len() <= 3 + 4096 / 4);
}

#[test]
fn one_connection_brings_in_a_bounded_number_of_announcers_and_lone_strangers_are_not_forwarded() {
    let t0 = Instant::now();
    let mut c = config();
    c.announcements_per_source = 4;
    let mut d = machine(c, t0);
    let relay = PeerId::random();
    let announce = |p: PeerId, slot: u64| {
        message::gossip(crate::proto::discovery_message::Body::Announcement(answer(
            p,
            &[full(slot, 3)],
            0,
        )))
    };
    let mut verdicts = Vec::new();
    for i in 0..10u64 {
        let p = PeerId::random();
        verdicts.push(d.handle_gossip(Some(p), relay, &announce(p, 100 + i), t0));
    }
    assert_eq!(d.book.len(), 4, "four new announcers from one relay");
    assert!(
        verdicts.iter().all(|v| *v == Verdict::Ignore),
        "what one stranger alone vouches for is not forwarded: {verdicts:?}"
    );
    // Another relay, another share; and a snapshot someone else vouches for is forwarded.
    let (p, q) = (PeerId::random(), PeerId::random());
    let other = PeerId::random();
    assert_eq!(
        d.handle_gossip(Some(p), other, &announce(p, 200), t0),
        Verdict::Ignore
    );
    assert_eq!(
        d.handle_gossip(Some(q), other, &announce(q, 200), t0),
        Verdict::Accept
    );
    // The share comes back with the next interval.
    let r = PeerId::random();
    d.handle_gossip(Some(r), relay, &announce(r, 300), t0 + 30 * SEC);
    assert!(d.book.standing(&r).is_some());
}

#[test]
fn churning_connections_do_not_push_out_the_nonce_of_a_request() {
    let t0 = Instant::now();
    let mut d = machine(config(), t0);
    d.handle_local(local(Some(100), vec![]));
    d.handle_timeout(t0);
    let nonce = last_nonce(&drain(&mut d));
    // Hundreds of identities connect and are asked directly.
    for i in 0..500u64 {
        let p = PeerId::random();
        let at = t0 + Duration::from_millis(i);
        d.handle_connected(p, at);
        d.handle_timeout(at + SEC);
        drain(&mut d);
    }
    // A late answer to the published request still counts.
    let late = PeerId::random();
    d.handle_answer(
        late,
        &answer(late, &[full(900, 1)], nonce),
        AnswerTo::Request,
        t0 + 20 * SEC,
    );
    assert_eq!(d.best_known_slot(t0 + 20 * SEC), Some(900));
}

#[test]
fn a_flood_of_partial_holders_cannot_push_complete_holders_out_of_the_book() {
    let t0 = Instant::now();
    let mut c = config();
    c.max_tracked_peers = 16;
    let (mut d, nonce) = asking(c, t0, None);
    let f = full(100, 1);
    let seeds: Vec<PeerId> = (0..2).map(|_| PeerId::random()).collect();
    for s in &seeds {
        d.handle_answer(*s, &answer(*s, &[f], nonce), AnswerTo::Request, t0);
    }
    for i in 0..1000 {
        let p = PeerId::random();
        let at = t0 + Duration::from_millis(i);
        d.handle_answer(p, &partial_answer(p, &[f], nonce), AnswerTo::Request, at);
    }
    let entry = d.book.entry(&f.key).expect("the seeds' adverts stay");
    assert_eq!(entry.peers.len(), 2);
    assert!(
        d.book.partial_holders(&f.key).count() <= 4,
        "a quarter of the table at most"
    );
}

#[test]
fn a_web_listing_is_held_to_the_limits_of_any_advert() {
    let t0 = Instant::now();
    let mut d = machine(config(), t0);
    let web = PeerId::random();
    let mut huge = full(100, 1);
    // 64 TiB in 16 KiB chunks: beyond the 1 GiB and 2^20 chunks of the limits.
    huge.key.archive_size = 64 << 40;
    let mut orphan = incremental(120, 3, &full(100, 1));
    orphan.key.base = None;
    let fine = full(90, 2);
    d.handle_web_advert(
        Advert {
            attestations: Vec::new(),
            peer: web,
            snapshots: vec![orphan, huge, fine],
            partial: Vec::new(),
            partial_attestations: Vec::new(),
            streamer_addrs: Vec::new(),
            holder_slot: None,
            modified_time: 0,
        },
        t0,
    );
    let listed: Vec<SnapshotKey> = d
        .adverts()
        .flat_map(|a| a.snapshots.iter().map(|s| s.key))
        .collect();
    assert_eq!(listed, vec![fine.key]);
}

#[test]
fn a_web_listings_attestations_stay_with_their_snapshot_when_others_are_dropped() {
    use crate::snapshot::Attestation;
    use libp2p::identity::Keypair;
    let t0 = Instant::now();
    let key = Keypair::generate_ed25519();
    let (mut d, _) = asking(trusted_config(&[key.public().to_peer_id()], 1), t0, None);
    let mut huge = full(100, 1);
    huge.key.archive_size = 64 << 40;
    let fine = full(90, 2);
    let signed = Attestation::sign(&key, "n", &fine.key).unwrap();
    let of_huge = Attestation::sign(&key, "n", &huge.key).unwrap();
    d.handle_web_advert(
        Advert {
            attestations: vec![vec![of_huge], vec![signed.clone()], vec![signed]],
            peer: PeerId::random(),
            // The same snapshot twice is listed once.
            snapshots: vec![huge, fine, fine],
            partial: Vec::new(),
            partial_attestations: Vec::new(),
            streamer_addrs: Vec::new(),
            holder_slot: None,
            modified_time: 0,
        },
        t0,
    );
    assert_eq!(
        d.best_known_slot(t0),
        Some(90),
        "its signature came with it"
    );
    let advert = d.adverts().next().unwrap().clone();
    assert_eq!(advert.snapshots.len(), 1);
    assert_eq!(advert.attestations.len(), 1);
}
