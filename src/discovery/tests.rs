//! Every discovery rule, driven with injected time.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use libp2p::PeerId;

use super::message::{self, AdvertLimits};
use super::*;
use crate::chunk::ChunkSize;
use crate::hash::{BankHash, ContentRoot};
use crate::snapshot::{Base, SnapshotKind};

const SEC: Duration = Duration::from_secs(1);

fn config() -> DiscoveryConfig {
    DiscoveryConfig {
        discovery_interval: 30 * SEC,
        answer_window: SEC,
        behind_threshold: 10,
        announce_window: 60 * SEC,
        announce_delay: SEC,
        announce_redundancy: 2,
        answer_cooldown: SEC,
        min_request_interval: Duration::from_millis(500),
        max_strikes: 3,
        max_message_bytes: 16 << 10,
        limits: AdvertLimits {
            max_archive_bytes: 1 << 30,
            max_chunks: 1 << 20,
        },
        sync_enabled: true,
        policy: TrustPolicy::default(),
        failed_cooldown: 600 * SEC,
        max_tracked_peers: 64,
        dial_budget: 2,
        max_direct_asks: 16,
        strike_decay: 600 * SEC,
        announcements_per_source: 16,
        chain_clock: None,
        // The rules of a node that follows snapshots; those of one that executes from its
        // start are tested apart.
        executes: false,
    }
}

fn machine(config: DiscoveryConfig, now: Instant) -> Discovery {
    let mut d = Discovery::new(config, PeerId::random(), Metrics::new(), now, 7);
    d.handle_streamer_addrs(vec!["127.0.0.1:9000".parse().unwrap()]);
    d
}

fn full(slot: u64, hash: u8) -> SnapshotAd {
    SnapshotAd {
        key: SnapshotKey {
            kind: SnapshotKind::Full,
            slot,
            bank_hash: BankHash([hash; 32]),
            content_root: ContentRoot([hash; 32]),
            archive_size: 1 << 20,
            base: None,
        },
        chunk_size: ChunkSize::DEFAULT,
        entry_count: 10,
        state_bytes: 1 << 21,
    }
}

fn incremental(slot: u64, hash: u8, base: &SnapshotAd) -> SnapshotAd {
    SnapshotAd {
        key: SnapshotKey {
            kind: SnapshotKind::Incremental,
            slot,
            bank_hash: BankHash([hash; 32]),
            content_root: ContentRoot([hash; 32]),
            archive_size: 1 << 12,
            base: Some(Base {
                slot: base.key.slot,
                bank_hash: base.key.bank_hash,
                content_root: base.key.content_root,
            }),
        },
        chunk_size: ChunkSize::DEFAULT,
        entry_count: 2,
        state_bytes: 1 << 13,
    }
}

fn addr() -> Vec<SocketAddr> {
    vec!["127.0.0.1:7000".parse().unwrap()]
}

/// `peer`'s advertisement of `snaps`, answering `nonce`.
fn answer(peer: PeerId, snaps: &[SnapshotAd], nonce: u64) -> crate::proto::SnapshotInfoResponse {
    message::advert(peer, snaps, &[], &addr(), None, 0, nonce)
}

fn drain(d: &mut Discovery) -> Vec<Action> {
    std::iter::from_fn(|| d.poll()).collect()
}

fn publishes(actions: &[Action]) -> usize {
    actions
        .iter()
        .filter(|a| matches!(a, Action::Publish { .. }))
        .count()
}

fn started(actions: &[Action]) -> bool {
    actions
        .iter()
        .any(|a| matches!(a, Action::Notice(Notice::Started { .. })))
}

/// The nonce of the last request the machine published.
fn last_nonce(actions: &[Action]) -> u64 {
    use prost::Message;
    actions
        .iter()
        .rev()
        .find_map(|a| match a {
            Action::Publish { bytes, .. } => {
                match crate::proto::DiscoveryMessage::decode(&bytes[..])
                    .ok()?
                    .body?
                {
                    crate::proto::discovery_message::Body::Request(r) => Some(r.nonce),
                    _ => None,
                }
            }
            Action::Ask { request, .. } => Some(request.nonce),
            _ => None,
        })
        .expect("a request")
}

fn plan_of(actions: &[Action]) -> Option<Plan> {
    actions.iter().find_map(|a| match a {
        Action::StartSync(p) => Some((**p).clone()),
        _ => None,
    })
}

fn local(slot: Option<u64>, snaps: Vec<SnapshotAd>) -> Local {
    Local {
        chunk_size: None,
        slot,
        snapshots: snaps,
        modified_time: 0,
    }
}

#[test]
fn the_first_tick_is_at_once_and_rounds_end_with_the_answer_window() {
    let t0 = Instant::now();
    let mut d = machine(config(), t0);
    assert_eq!(d.poll_timeout(), Some(t0));
    d.handle_timeout(t0);
    let a = drain(&mut d);
    assert_eq!(publishes(&a), 1, "an empty node asks at once");
    assert!(started(&a));
    assert!(matches!(d.stage(), Stage::Collecting { round: 1, .. }));
    assert_eq!(d.poll_timeout(), Some(t0 + SEC), "the answer window");
    d.handle_timeout(t0 + SEC);
    let a = drain(&mut d);
    assert!(a.iter().any(|a| matches!(
        a,
        Action::Notice(Notice::NothingToTake {
            round: 1,
            adverts: 0
        })
    )));
    assert_eq!(*d.stage(), Stage::Idle);
    assert_eq!(d.poll_timeout(), Some(t0 + 30 * SEC), "the next tick");
    d.handle_timeout(t0 + 30 * SEC);
    assert_eq!(publishes(&drain(&mut d)), 1, "and asks again");
}

#[test]
fn a_round_with_an_acceptable_snapshot_decides_once_the_answers_have_gone_quiet() {
    let t0 = Instant::now();
    let mut d = machine(config(), t0);
    d.handle_timeout(t0);
    let nonce = last_nonce(&drain(&mut d));
    let ms = |n: u64| Duration::from_millis(n);
    let (a, b) = (PeerId::random(), PeerId::random());
    d.handle_answer(a, &answer(a, &[full(100, 1)], nonce), false, t0 + ms(5));
    // Another answer within a quarter of the window keeps the round open.
    assert_eq!(d.poll_timeout(), Some(t0 + ms(255)));
    d.handle_answer(b, &answer(b, &[full(120, 2)], nonce), false, t0 + ms(200));
    d.handle_timeout(t0 + ms(255));
    assert!(
        plan_of(&drain(&mut d)).is_none(),
        "an answer came 55 ms ago"
    );
    assert_eq!(d.poll_timeout(), Some(t0 + ms(450)));
    d.handle_timeout(t0 + ms(450));
    let plan = plan_of(&drain(&mut d)).expect("quiet for a quarter of the window: decided");
    assert_eq!(plan.last().ad.key.slot, 120, "the best of what came");
    // With nothing acceptable, the round waits for its whole window.
    let mut d = machine(config(), t0);
    d.handle_local(local(Some(1000), vec![]));
    d.handle_timeout(t0);
    let nonce = last_nonce(&drain(&mut d));
    d.handle_answer(a, &answer(a, &[full(900, 1)], nonce), false, t0 + ms(5));
    d.handle_timeout(t0 + ms(500));
    assert!(matches!(d.stage(), Stage::Collecting { .. }));
}

#[test]
fn a_node_that_restarts_behind_asks_by_itself() {
    // Its DB holds a slot, it has heard no advert: it does not know it is current.
    let t0 = Instant::now();
    let mut d = machine(config(), t0);
    d.handle_local(local(Some(500), vec![]));
    d.handle_timeout(t0);
    assert_eq!(publishes(&drain(&mut d)), 1);
}

#[test]
fn a_node_that_asked_lately_and_heard_nothing_newer_is_current_until_the_announce_window_ends() {
    let t0 = Instant::now();
    let mut d = machine(config(), t0);
    d.handle_local(local(Some(100), vec![]));
    d.handle_timeout(t0);
    let nonce = last_nonce(&drain(&mut d));
    // A peer answers with what the node already has.
    let p = PeerId::random();
    d.handle_answer(p, &answer(p, &[full(100, 1)], nonce), false, t0);
    d.handle_timeout(t0 + SEC);
    drain(&mut d);
    // Next tick, 30 s later: within the 60 s announce window, nothing newer heard: quiet.
    d.handle_timeout(t0 + 30 * SEC);
    assert_eq!(publishes(&drain(&mut d)), 0);
    // 60 s after its request, holders no longer announce to it: it asks again.
    d.handle_timeout(t0 + 60 * SEC);
    assert_eq!(publishes(&drain(&mut d)), 1);
}

#[test]
fn the_chain_tip_tells_a_node_it_is_behind_or_current() {
    let t0 = Instant::now();
    let mut d = machine(config(), t0);
    d.handle_local(local(Some(100), vec![]));
    // Told the tip is close: current, no round at the first tick.
    d.handle_chain_tip(105, t0);
    d.handle_timeout(t0);
    assert_eq!(publishes(&drain(&mut d)), 0);
    // Told the tip is far ahead: asks at once, without waiting for a tick.
    d.handle_chain_tip(1000, t0 + 5 * SEC);
    let a = drain(&mut d);
    assert_eq!(publishes(&a), 1);
    assert!(started(&a));
}

#[test]
fn requests_are_spaced_by_the_minimum_interval() {
    let t0 = Instant::now();
    let mut d = machine(config(), t0);
    d.handle_timeout(t0);
    drain(&mut d);
    // A peer joins the topic 100 ms later: the request waits until 500 ms.
    d.handle_subscribed(PeerId::random(), t0 + Duration::from_millis(100));
    assert_eq!(publishes(&drain(&mut d)), 0);
    assert_eq!(d.poll_timeout(), Some(t0 + Duration::from_millis(500)));
    d.handle_timeout(t0 + Duration::from_millis(500));
    assert_eq!(publishes(&drain(&mut d)), 1);
}

/// A holder at slot 100 and a request from `peer` at `slot`, as gossip.
fn gossip_request(peer: PeerId, nonce: u64, slot: Option<u64>) -> Vec<u8> {
    message::gossip(crate::proto::discovery_message::Body::Request(
        message::request(
            peer,
            nonce,
            slot,
            &["/ip4/127.0.0.1/tcp/1".parse().unwrap()],
        ),
    ))
}

fn holder(t0: Instant) -> Discovery {
    let mut c = config();
    c.sync_enabled = false;
    let mut d = machine(c, t0);
    d.handle_local(local(Some(100), vec![full(100, 1)]));
    d
}

fn answers(actions: &[Action]) -> Vec<PeerId> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Answer { peer, .. } => Some(*peer),
            _ => None,
        })
        .collect()
}

#[test]
fn holders_answer_newer_snapshots_once_per_cooldown_and_dial_within_a_budget() {
    let t0 = Instant::now();
    let mut d = holder(t0);
    let r = PeerId::random();
    d.handle_connected(r, t0);
    assert_eq!(
        d.handle_gossip(Some(r), r, &gossip_request(r, 5, Some(50)), t0),
        Verdict::Accept
    );
    let a = drain(&mut d);
    assert_eq!(answers(&a), vec![r]);
    match &a[0] {
        Action::Answer { answer, .. } => assert_eq!(answer.request_nonce, 5),
        other => panic!("{other:?}"),
    }
    // Again within the cooldown: no answer.
    d.handle_gossip(
        Some(r),
        r,
        &gossip_request(r, 6, Some(50)),
        t0 + Duration::from_millis(10),
    );
    assert!(answers(&drain(&mut d)).is_empty());
    // A requester already at the holder's slot gets nothing.
    let q = PeerId::random();
    d.handle_connected(q, t0);
    d.handle_gossip(Some(q), q, &gossip_request(q, 7, Some(100)), t0);
    assert!(answers(&drain(&mut d)).is_empty());
    // Requesters not connected cost a dial each: two per interval here.
    let far: Vec<PeerId> = (0..4).map(|_| PeerId::random()).collect();
    for p in &far {
        d.handle_gossip(Some(*p), *p, &gossip_request(*p, 8, None), t0 + 2 * SEC);
    }
    assert_eq!(answers(&drain(&mut d)).len(), 2);
    // The budget comes back with the next interval.
    let late = PeerId::random();
    d.handle_gossip(
        Some(late),
        late,
        &gossip_request(late, 9, None),
        t0 + 33 * SEC,
    );
    assert_eq!(answers(&drain(&mut d)), vec![late]);
}

#[test]
fn a_direct_ask_is_answered_in_its_response() {
    let t0 = Instant::now();
    let mut d = holder(t0);
    let p = PeerId::random();
    let got = d
        .handle_ask(p, &message::request(p, 3, Some(10), &[]), t0)
        .expect("an answer");
    assert_eq!(got.request_nonce, 3);
    assert_eq!(got.snapshots.len(), 1);
    // Nothing newer than what the asker has: nothing.
    let q = PeerId::random();
    assert!(
        d.handle_ask(q, &message::request(q, 4, Some(100), &[]), t0)
            .is_none()
    );
    // A spoofed ask strikes its sender.
    let r = PeerId::random();
    assert!(
        d.handle_ask(r, &message::request(q, 4, None, &[]), t0)
            .is_none()
    );
    assert_eq!(d.strikes.get(&r), Some(&1));
}

#[test]
fn answers_to_no_request_of_ours_are_dropped_and_change_nothing() {
    let t0 = Instant::now();
    let mut d = machine(config(), t0);
    d.handle_local(local(Some(100), vec![]));
    let p = PeerId::random();
    // Before any request: unsolicited.
    d.handle_answer(p, &answer(p, &[full(1 << 40, 1)], 77), false, t0);
    assert_eq!(d.best_known_slot(t0), None);
    d.handle_timeout(t0);
    let nonce = last_nonce(&drain(&mut d));
    // With a wrong nonce: still unsolicited.
    d.handle_answer(p, &answer(p, &[full(1 << 40, 1)], nonce ^ 2), false, t0);
    assert_eq!(d.best_known_slot(t0), None);
    // With the right one: heard.
    d.handle_answer(p, &answer(p, &[full(300, 1)], nonce), false, t0);
    assert_eq!(d.best_known_slot(t0), Some(300));
    // And much later, the nonce has expired.
    d.handle_answer(p, &answer(p, &[full(400, 1)], nonce), false, t0 + 61 * SEC);
    assert_eq!(d.best_known_slot(t0), Some(300));
}

#[test]
fn adverts_the_policy_rejects_move_neither_the_best_slot_nor_the_choice() {
    let t0 = Instant::now();
    let trusted: Vec<PeerId> = (0..3).map(|_| PeerId::random()).collect();
    let mut c = config();
    c.policy = TrustPolicy::TrustedPeers {
        peers: trusted.iter().copied().collect(),
        quorum: 2,
    };
    let mut d = machine(c, t0);
    d.handle_local(local(Some(1000), vec![]));
    d.handle_timeout(t0);
    let nonce = last_nonce(&drain(&mut d));
    // An attacker with many identities races ahead.
    for _ in 0..10 {
        let p = PeerId::random();
        d.handle_answer(p, &answer(p, &[full(1 << 60, 9)], nonce), false, t0);
    }
    assert_eq!(d.best_known_slot(t0), None);
    // One trusted peer is not a quorum of two.
    d.handle_answer(
        trusted[0],
        &answer(trusted[0], &[full(1200, 1)], nonce),
        false,
        t0,
    );
    assert_eq!(d.best_known_slot(t0), None);
    d.handle_answer(
        trusted[1],
        &answer(trusted[1], &[full(1200, 1)], nonce),
        false,
        t0,
    );
    assert_eq!(d.best_known_slot(t0), Some(1200));
    d.handle_timeout(t0 + SEC);
    let plan = plan_of(&drain(&mut d)).expect("a plan");
    assert_eq!(plan.last().ad.key.slot, 1200);
}

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
            false,
            t0 + Duration::from_millis(i),
        );
        d.handle_gossip(Some(p), p, b"junk", t0);
    }
    assert_eq!(d.book.len(), 8);
    assert!(d.strikes.len() <= 8);
    // The newest adverts stayed.
    assert_eq!(d.best_known_slot(t0), Some(109));
}

#[test]
fn announcements_go_to_waiting_nodes_after_a_delay_unless_enough_were_heard() {
    let t0 = Instant::now();
    let mut d = holder(t0);
    // Nobody asked: a new snapshot is not announced.
    d.handle_snapshot_created(t0);
    assert!(d.announce.is_none());
    // Someone asked: it is, after a delay of up to a second.
    let r = PeerId::random();
    d.handle_gossip(Some(r), r, &gossip_request(r, 1, Some(10)), t0);
    drain(&mut d);
    d.handle_local(local(Some(150), vec![full(150, 2), full(100, 1)]));
    d.handle_snapshot_created(t0 + SEC);
    let at = d.announce.as_ref().unwrap().at;
    assert!(at >= t0 + SEC && at < t0 + 2 * SEC);
    d.handle_timeout(at);
    assert_eq!(publishes(&drain(&mut d)), 1);
    // Another: two others announce the same snapshot first (the redundancy is 2): quiet.
    d.handle_local(local(Some(200), vec![full(200, 3)]));
    d.handle_snapshot_created(t0 + 2 * SEC);
    for _ in 0..2 {
        let p = PeerId::random();
        let ann = message::gossip(crate::proto::discovery_message::Body::Announcement(answer(
            p,
            &[full(200, 3)],
            0,
        )));
        assert_eq!(
            d.handle_gossip(Some(p), p, &ann, t0 + 2 * SEC),
            Verdict::Accept
        );
    }
    d.handle_timeout(t0 + 4 * SEC);
    assert_eq!(publishes(&drain(&mut d)), 0);
    // Once the announce window has passed since the request, nobody waits.
    d.handle_local(local(Some(250), vec![full(250, 4)]));
    d.handle_snapshot_created(t0 + 61 * SEC);
    assert!(d.announce.is_none());
}

#[test]
fn a_sync_adds_peers_that_advertise_what_it_fetches_and_keeps_asking() {
    let t0 = Instant::now();
    let mut d = machine(config(), t0);
    d.handle_timeout(t0);
    let nonce = last_nonce(&drain(&mut d));
    let f = full(100, 1);
    let a = PeerId::random();
    d.handle_answer(a, &answer(a, &[f], nonce), false, t0);
    d.handle_timeout(t0 + SEC);
    let plan = plan_of(&drain(&mut d)).unwrap();
    assert_eq!(plan.full.as_ref().unwrap().peers.len(), 1);
    // A late answer for the same snapshot joins the download.
    let b = PeerId::random();
    d.handle_answer(b, &answer(b, &[f], nonce), false, t0 + 2 * SEC);
    let added: Vec<_> = drain(&mut d)
        .into_iter()
        .filter_map(|a| match a {
            Action::AddSyncPeer { key, peer, .. } => Some((key, peer)),
            _ => None,
        })
        .collect();
    assert_eq!(added, vec![(f.key, b)]);
    // Every tick of a long download asks again, to learn of more holders.
    d.handle_timeout(t0 + 30 * SEC);
    assert_eq!(publishes(&drain(&mut d)), 1);
    d.handle_timeout(t0 + 60 * SEC);
    assert_eq!(publishes(&drain(&mut d)), 1);
}

#[test]
fn a_failed_snapshot_is_not_chosen_again_for_a_while_and_its_advertisers_are_struck() {
    let t0 = Instant::now();
    let mut d = machine(config(), t0);
    d.handle_timeout(t0);
    let nonce = last_nonce(&drain(&mut d));
    let bad = full(200, 6);
    let good = full(100, 1);
    let (liar, honest) = (PeerId::random(), PeerId::random());
    d.handle_answer(liar, &answer(liar, &[bad], nonce), false, t0);
    d.handle_answer(honest, &answer(honest, &[good], nonce), false, t0);
    d.handle_timeout(t0 + SEC);
    assert_eq!(plan_of(&drain(&mut d)).unwrap().last().ad.key, bad.key);
    d.handle_sync_ended(
        SyncOutcome::Failed(SyncFailure {
            leg: Leg::Full,
            failure: Failure::Content,
            bad_peers: vec![],
        }),
        t0 + 2 * SEC,
    );
    assert_eq!(d.strikes.get(&liar), Some(&1));
    assert_eq!(d.strikes.get(&honest), None);
    // Still behind: it asks again at once, and this round takes the other one.
    assert!(started(&drain(&mut d)));
    d.handle_timeout(t0 + 3 * SEC);
    assert_eq!(plan_of(&drain(&mut d)).unwrap().last().ad.key, good.key);
}

#[test]
fn an_incremental_alone_when_at_or_past_its_base_else_with_its_base() {
    let t0 = Instant::now();
    let base = full(1000, 1);
    let inc = incremental(1300, 2, &base);
    for (slot, with_full) in [
        (Some(1000), false),
        (Some(1100), false),
        (Some(900), true),
        (None, true),
    ] {
        let mut d = machine(config(), t0);
        d.handle_local(local(slot, vec![]));
        d.handle_timeout(t0);
        let nonce = last_nonce(&drain(&mut d));
        let p = PeerId::random();
        d.handle_answer(p, &answer(p, &[inc, base], nonce), false, t0);
        d.handle_timeout(t0 + SEC);
        let plan = plan_of(&drain(&mut d)).unwrap_or_else(|| panic!("{slot:?}"));
        assert_eq!(plan.incremental.as_ref().unwrap().ad.key, inc.key);
        assert_eq!(plan.full.is_some(), with_full, "{slot:?}");
    }
}

#[test]
fn a_state_that_did_not_take_an_incremental_fetches_its_base() {
    let t0 = Instant::now();
    let base = full(1000, 1);
    let inc = incremental(1300, 2, &base);
    let mut d = machine(config(), t0);
    d.handle_local(local(Some(1100), vec![]));
    d.handle_timeout(t0);
    let nonce = last_nonce(&drain(&mut d));
    let p = PeerId::random();
    d.handle_answer(p, &answer(p, &[inc, base], nonce), false, t0);
    d.handle_timeout(t0 + SEC);
    assert!(plan_of(&drain(&mut d)).unwrap().full.is_none());
    // The apply did not check out: the state is not on that base (a fork, say).
    d.handle_sync_ended(
        SyncOutcome::Failed(SyncFailure {
            leg: Leg::Incremental,
            failure: Failure::NotOnBase,
            bad_peers: vec![],
        }),
        t0 + 2 * SEC,
    );
    assert!(started(&drain(&mut d)), "still behind: asks again at once");
    d.handle_timeout(t0 + 3 * SEC);
    let plan = plan_of(&drain(&mut d)).unwrap();
    assert_eq!(plan.full.unwrap().ad.key, base.key);
}

fn asked(actions: &[Action], who: PeerId) -> bool {
    actions
        .iter()
        .any(|a| matches!(a, Action::Ask { peer, .. } if *peer == who))
}

#[test]
fn a_peer_that_connects_while_the_node_needs_a_snapshot_is_asked_directly_unless_it_joins() {
    let t0 = Instant::now();
    let mut d = machine(config(), t0);
    d.handle_local(local(Some(100), vec![]));
    let p = PeerId::random();
    d.handle_connected(p, t0);
    let a = drain(&mut d);
    assert!(started(&a), "a round starts at once");
    assert!(!asked(&a, p), "the peer has a moment to join the topic");
    // It never joins (a peer restarted under the same identity): asked directly.
    d.handle_timeout(t0); // the first tick: the round is on already
    let due = d.poll_timeout().unwrap();
    assert_eq!(due, t0 + SUBSCRIBE_GRACE);
    d.handle_timeout(due);
    assert!(asked(&drain(&mut d), p));
    // Reconnecting a moment later (a restart under the same identity) does not ask twice.
    d.handle_connected(p, t0 + Duration::from_millis(10));
    d.handle_timeout(t0 + Duration::from_millis(10) + SUBSCRIBE_GRACE);
    assert!(
        !drain(&mut d)
            .iter()
            .any(|a| matches!(a, Action::Ask { .. }))
    );
    // A peer that joins the topic within the grace gets the request through it instead.
    let j = PeerId::random();
    let t1 = t0 + 5 * SEC;
    d.handle_connected(j, t1);
    d.handle_subscribed(j, t1 + Duration::from_millis(5));
    d.handle_timeout(t1 + SUBSCRIBE_GRACE);
    let a = drain(&mut d);
    assert!(!asked(&a, j));
    assert_eq!(publishes(&a), 1);
    // A node that knows it is current asks nobody.
    let mut c = machine(config(), t0);
    c.handle_local(local(Some(100), vec![]));
    c.handle_chain_tip(100, t0);
    drain(&mut c);
    c.handle_connected(PeerId::random(), t0);
    assert!(drain(&mut c).is_empty());
    // Nor does a peer that turned out not to speak snapsync get asked again.
    let q = PeerId::random();
    d.handle_connected(q, t0 + 2 * SEC);
    d.handle_timeout(t0 + 2 * SEC + SUBSCRIBE_GRACE);
    drain(&mut d);
    d.handle_not_snapsync(q);
    d.handle_connected(q, t0 + 4 * SEC);
    d.handle_timeout(t0 + 4 * SEC + SUBSCRIBE_GRACE);
    assert!(!asked(&drain(&mut d), q));
}

#[test]
fn a_request_that_reached_nobody_goes_to_the_first_peer_that_joins() {
    let t0 = Instant::now();
    let mut d = machine(
        DiscoveryConfig {
            min_request_interval: 30 * SEC,
            ..config()
        },
        t0,
    );
    d.handle_local(local(None, vec![]));
    d.handle_timeout(t0);
    let a = drain(&mut d);
    assert_eq!(publishes(&a), 1);
    // Gossipsub had no peer on the topic.
    d.handle_published(Published::Request, false);
    d.handle_subscribed(PeerId::random(), t0 + Duration::from_millis(50));
    assert_eq!(publishes(&drain(&mut d)), 1, "published again at once");
    d.handle_published(Published::Request, true);
    // A request that went out holds the next one back for the interval.
    d.handle_subscribed(PeerId::random(), t0 + Duration::from_millis(60));
    assert_eq!(publishes(&drain(&mut d)), 0);
}

#[test]
fn a_producer_never_asks() {
    let t0 = Instant::now();
    let mut d = holder(t0);
    d.handle_timeout(t0);
    d.handle_timeout(t0 + 30 * SEC);
    d.handle_connected(PeerId::random(), t0 + 31 * SEC);
    assert_eq!(publishes(&drain(&mut d)), 0);
}

// ---- Free identities (issue: free identities cannot overwrite, stall or discredit a node) ----

/// A machine that asked once; returns it with the nonce of its request.
fn asking(config: DiscoveryConfig, t0: Instant, slot: Option<u64>) -> (Discovery, u64) {
    let mut d = machine(config, t0);
    d.handle_local(local(slot, vec![]));
    d.handle_timeout(t0);
    let nonce = last_nonce(&drain(&mut d));
    (d, nonce)
}

fn trusted_config(trusted: &[PeerId], quorum: usize) -> DiscoveryConfig {
    let mut c = config();
    c.policy = TrustPolicy::TrustedPeers {
        peers: trusted.iter().copied().collect(),
        quorum,
    };
    c
}

#[test]
fn a_node_that_executes_the_chain_keeps_its_live_state_unless_told_it_is_behind() {
    let t0 = Instant::now();
    let (mut d, nonce) = asking(config(), t0, Some(100));
    d.handle_slot(100, t0);
    // One peer advertises a valid-looking snapshot near the end of time.
    let attacker = PeerId::random();
    d.handle_answer(
        attacker,
        &answer(attacker, &[full(u64::MAX - 1, 9)], nonce),
        false,
        t0,
    );
    assert_eq!(d.best_known_slot(t0), None, "moves nothing");
    d.handle_timeout(t0 + SEC);
    assert!(
        plan_of(&drain(&mut d)).is_none(),
        "an executing node takes nothing"
    );
    // Told it is far behind (its consensus says the tip is at 5000): it syncs, but only to
    // what the tip makes plausible.
    let honest = PeerId::random();
    d.handle_chain_tip(5000, t0 + 2 * SEC);
    let nonce = last_nonce(&drain(&mut d));
    d.handle_answer(
        honest,
        &answer(honest, &[full(4990, 1)], nonce),
        false,
        t0 + 2 * SEC,
    );
    d.handle_answer(
        attacker,
        &answer(attacker, &[full(u64::MAX - 1, 9)], nonce),
        false,
        t0 + 2 * SEC,
    );
    d.handle_timeout(t0 + 3 * SEC);
    let plan = plan_of(&drain(&mut d)).expect("told it is behind, it syncs");
    assert_eq!(plan.last().ad.key.slot, 4990);
}

#[test]
fn a_restarted_node_that_executes_keeps_its_state_before_its_first_slot() {
    let t0 = Instant::now();
    let config = DiscoveryConfig {
        executes: true,
        ..config()
    };
    // Restarted with state at 100; the first tick asks at once, before any slot is committed.
    let (mut d, nonce) = asking(config, t0, Some(100));
    let attacker = PeerId::random();
    d.handle_answer(
        attacker,
        &answer(attacker, &[full(u64::MAX - 1, 9), full(150, 8)], nonce),
        false,
        t0,
    );
    d.handle_timeout(t0 + SEC);
    assert!(
        plan_of(&drain(&mut d)).is_none(),
        "one advert takes nothing"
    );
    // Told it is behind, it syncs within what the tip makes plausible.
    d.handle_chain_tip(150, t0 + 2 * SEC);
    let nonce = last_nonce(&drain(&mut d));
    d.handle_answer(
        attacker,
        &answer(attacker, &[full(150, 8)], nonce),
        false,
        t0 + 2 * SEC,
    );
    d.handle_timeout(t0 + 3 * SEC);
    assert_eq!(plan_of(&drain(&mut d)).unwrap().last().ad.key.slot, 150);
}

#[test]
fn a_sync_chosen_before_the_node_executes_is_cancelled_when_it_does() {
    let t0 = Instant::now();
    let (mut d, nonce) = asking(config(), t0, Some(100));
    let peer = PeerId::random();
    d.handle_answer(peer, &answer(peer, &[full(400, 1)], nonce), false, t0);
    d.handle_timeout(t0 + SEC);
    assert!(plan_of(&drain(&mut d)).is_some(), "a follower takes it");
    // The owner commits a slot of its own: the untrusted choice no longer stands.
    d.handle_slot(101, t0 + 2 * SEC);
    assert!(drain(&mut d).contains(&Action::CancelSync));
    assert_eq!(d.stage(), &Stage::Idle);
    // A choice a vouching policy made stands.
    let trusted: Vec<PeerId> = (0..2).map(|_| PeerId::random()).collect();
    let (mut d, nonce) = asking(trusted_config(&trusted, 2), t0, Some(100));
    for p in &trusted {
        d.handle_answer(*p, &answer(*p, &[full(400, 1)], nonce), false, t0);
    }
    d.handle_timeout(t0 + SEC);
    assert!(plan_of(&drain(&mut d)).is_some());
    d.handle_slot(101, t0 + 2 * SEC);
    assert!(!drain(&mut d).contains(&Action::CancelSync));
}

#[test]
fn an_executing_node_takes_what_a_vouching_policy_accepts_without_being_told() {
    let t0 = Instant::now();
    let trusted: Vec<PeerId> = (0..3).map(|_| PeerId::random()).collect();
    let (mut d, nonce) = asking(trusted_config(&trusted, 2), t0, Some(100));
    d.handle_slot(100, t0);
    for p in &trusted[..2] {
        d.handle_answer(*p, &answer(*p, &[full(400, 1)], nonce), false, t0);
    }
    d.handle_timeout(t0 + SEC);
    assert_eq!(plan_of(&drain(&mut d)).unwrap().last().ad.key.slot, 400);
}

#[test]
fn the_chain_clock_makes_far_future_slots_implausible_for_every_node() {
    let t0 = Instant::now();
    let mut c = config();
    // Slot 0 a thousand seconds ago, one slot a second: the chain is at slot 1000.
    c.chain_clock = Some(ChainClock::new(1_000_000, SEC));
    let mut d = machine(c, t0);
    d.handle_wall_clock(2_000_000, t0);
    d.handle_timeout(t0);
    let nonce = last_nonce(&drain(&mut d));
    let (liar, honest) = (PeerId::random(), PeerId::random());
    d.handle_answer(liar, &answer(liar, &[full(1 << 40, 9)], nonce), false, t0);
    d.handle_answer(honest, &answer(honest, &[full(990, 1)], nonce), false, t0);
    assert_eq!(d.best_known_slot(t0), Some(990));
    // Ten slots later the clock reads 1010: still within the threshold (10) of it.
    assert_eq!(d.best_known_slot(t0 + 10 * SEC), Some(990));
    d.handle_timeout(t0 + SEC);
    assert_eq!(plan_of(&drain(&mut d)).unwrap().last().ad.key.slot, 990);
}

#[test]
fn what_lies_outside_the_key_comes_from_the_trusted_and_they_are_tried_first() {
    let t0 = Instant::now();
    let trusted: Vec<PeerId> = (0..3).map(|_| PeerId::random()).collect();
    let (mut d, nonce) = asking(trusted_config(&trusted, 2), t0, None);
    let honest = full(500, 1);
    // Identities that sort anywhere advertise the same key with counts that cannot load.
    let mut lying = honest;
    lying.entry_count = 1;
    lying.state_bytes = u64::MAX;
    for _ in 0..20 {
        let p = PeerId::random();
        d.handle_answer(p, &answer(p, &[lying], nonce), false, t0);
    }
    for p in &trusted {
        d.handle_answer(
            *p,
            &answer(*p, &[honest], nonce),
            false,
            t0 + Duration::from_millis(1),
        );
    }
    d.handle_timeout(t0 + SEC);
    let plan = plan_of(&drain(&mut d)).unwrap();
    let t = plan.last();
    assert!(t.counts_vouched);
    assert_eq!((t.ad.entry_count, t.ad.state_bytes), (10, 1 << 21));
    let first: Vec<PeerId> = t.peers.iter().take(3).map(|(p, _)| *p).collect();
    for p in &trusted {
        assert!(first.contains(p), "trusted peers come first: {first:?}");
    }
    assert_eq!(t.peers.len(), 23, "the others serve too, after them");
}

/// A node pinned to the state at slot 500 of `full(500, 1)`, any root.
fn pinned_500() -> DiscoveryConfig {
    let mut c = config();
    c.policy = TrustPolicy::TrustedSnapshot {
        slot: 500,
        bank_hash: BankHash([1; 32]),
        content_root: None,
    };
    c
}

#[test]
fn counts_no_policy_vouches_for_are_marked_as_claims() {
    let t0 = Instant::now();
    let (mut d, nonce) = asking(pinned_500(), t0, None);
    let p = PeerId::random();
    d.handle_answer(p, &answer(p, &[full(500, 1)], nonce), false, t0);
    d.handle_timeout(t0 + SEC);
    assert!(!plan_of(&drain(&mut d)).unwrap().last().counts_vouched);
}

#[test]
fn fresh_roots_for_a_pinned_state_do_not_keep_the_one_heard_first_from_being_tried() {
    let t0 = Instant::now();
    let (mut d, nonce) = asking(pinned_500(), t0, None);
    let honest = full(500, 1);
    for _ in 0..3 {
        let p = PeerId::random();
        d.handle_answer(p, &answer(p, &[honest], nonce), false, t0);
    }
    // After each failure the attacker brings a fresh, lower root from more fresh identities.
    for round in 0..3u8 {
        let mut fake = honest;
        fake.key.content_root = ContentRoot([0; 32]);
        fake.key.content_root.0[31] = round;
        let at = t0 + Duration::from_secs(2 + u64::from(round));
        for _ in 0..10 {
            let p = PeerId::random();
            d.handle_answer(p, &answer(p, &[fake], nonce), false, at);
        }
        d.handle_sync_now(at);
        drain(&mut d);
        d.handle_timeout(at + SEC);
        let plan = plan_of(&drain(&mut d)).expect("a plan");
        assert_eq!(
            plan.last().ad.key.content_root,
            honest.key.content_root,
            "round {round}"
        );
        d.handle_sync_ended(SyncOutcome::Cancelled, at + SEC);
    }
}

#[test]
fn thousands_of_announcing_identities_leave_the_trusted_adverts_in_place() {
    let t0 = Instant::now();
    let trusted: Vec<PeerId> = (0..3).map(|_| PeerId::random()).collect();
    let mut c = trusted_config(&trusted, 2);
    c.max_tracked_peers = 4096;
    let (mut d, nonce) = asking(c, t0, None);
    for p in &trusted {
        d.handle_answer(*p, &answer(*p, &[full(500, 1)], nonce), false, t0);
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
        d.handle_answer(p, &answer(p, &[full(100, 1)], nonce), false, t0);
    }
    d.handle_timeout(t0 + SEC);
    assert!(plan_of(&drain(&mut d)).is_some());
    d.handle_sync_ended(
        SyncOutcome::Synced {
            bad_peers: vec![bad],
        },
        t0 + 2 * SEC,
    );
    assert_eq!(d.strikes.get(&bad), Some(&1));
    assert_eq!(d.strikes.get(&good), None);
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
        false,
        t0 + 20 * SEC,
    );
    assert_eq!(d.best_known_slot(t0 + 20 * SEC), Some(900));
}

/// `peer`'s advertisement of partial holdings only, answering `nonce`.
fn partial_answer(
    peer: PeerId,
    held: &[SnapshotAd],
    nonce: u64,
) -> crate::proto::SnapshotInfoResponse {
    let partial: Vec<PartialAd> = held
        .iter()
        .map(|ad| PartialAd {
            ad: *ad,
            verified_bytes: ad.key.archive_size / 2,
        })
        .collect();
    message::advert(peer, &[], &partial, &addr(), None, 0, nonce)
}

#[test]
fn partial_holders_are_sources_of_a_chosen_snapshot_never_a_reason_to_choose_it() {
    let t0 = Instant::now();
    let (mut d, nonce) = asking(config(), t0, None);
    let f = full(100, 1);
    // Many peers say they download the snapshot: nothing is chosen on their word.
    let partials: Vec<PeerId> = (0..5).map(|_| PeerId::random()).collect();
    for p in &partials {
        d.handle_answer(*p, &partial_answer(*p, &[f], nonce), false, t0);
    }
    d.handle_timeout(t0 + SEC);
    let actions = drain(&mut d);
    assert!(plan_of(&actions).is_none());
    assert_eq!(d.best_known_slot(t0 + SEC), None);
    // One holder of the whole snapshot: it is chosen, with the partial holders as sources.
    d.handle_timeout(t0 + 30 * SEC);
    let nonce = last_nonce(&drain(&mut d));
    for p in &partials {
        d.handle_answer(*p, &partial_answer(*p, &[f], nonce), false, t0 + 30 * SEC);
    }
    let seed = PeerId::random();
    d.handle_answer(seed, &answer(seed, &[f], nonce), false, t0 + 30 * SEC);
    d.handle_timeout(t0 + 31 * SEC);
    let plan = plan_of(&drain(&mut d)).expect("a plan");
    let target = plan.full.unwrap();
    assert_eq!(
        target.peers.iter().map(|p| p.0).collect::<Vec<_>>(),
        vec![seed]
    );
    let mut sources: Vec<PeerId> = target.partial_peers.iter().map(|p| p.0).collect();
    sources.sort();
    let mut expected = partials.clone();
    expected.sort();
    assert_eq!(sources, expected);
    // One that answers later joins the download as a partial source.
    let late = PeerId::random();
    d.handle_answer(
        late,
        &partial_answer(late, &[f], nonce),
        false,
        t0 + 32 * SEC,
    );
    let added: Vec<_> = drain(&mut d)
        .into_iter()
        .filter_map(|a| match a {
            Action::AddSyncPeer { peer, partial, .. } => Some((peer, partial)),
            _ => None,
        })
        .collect();
    assert_eq!(added, vec![(late, true)]);
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
        d.handle_answer(*s, &answer(*s, &[f], nonce), false, t0);
    }
    for i in 0..1000 {
        let p = PeerId::random();
        let at = t0 + Duration::from_millis(i);
        d.handle_answer(p, &partial_answer(p, &[f], nonce), false, at);
    }
    let entry = d.book.entry(&f.key).expect("the seeds' adverts stay");
    assert_eq!(entry.peers.len(), 2);
    assert!(
        d.book.partial_holders(&f.key).count() <= 4,
        "a quarter of the table at most"
    );
}

#[test]
fn a_downloading_node_answers_with_what_it_holds_and_announces_a_new_holding() {
    let t0 = Instant::now();
    let (mut d, _) = asking(config(), t0, None);
    let f = full(100, 1);
    // Someone asks while this node has nothing: no answer.
    let r = PeerId::random();
    d.handle_gossip(Some(r), r, &gossip_request(r, 5, None), t0);
    assert!(answers(&drain(&mut d)).is_empty());
    // It starts serving part of the snapshot: it announces it (someone waits)...
    let held = PartialAd {
        ad: f,
        verified_bytes: 1 << 16,
    };
    d.handle_partials(vec![held], t0 + SEC);
    let at = d.announce.as_ref().expect("an announcement").at;
    d.handle_timeout(at);
    let actions = drain(&mut d);
    let announced = actions.iter().find_map(|a| match a {
        Action::Publish {
            kind: Published::Announcement,
            bytes,
        } => Some(bytes.clone()),
        _ => None,
    });
    use prost::Message;
    let msg = crate::proto::DiscoveryMessage::decode(&announced.expect("published")[..]).unwrap();
    let Some(crate::proto::discovery_message::Body::Announcement(a)) = msg.body else {
        panic!("an announcement");
    };
    assert!(!a.has_snapshot && a.partial.len() == 1);
    // ...once: the same holding growing is not announced again.
    d.handle_partials(
        vec![PartialAd {
            verified_bytes: 1 << 18,
            ..held
        }],
        at + SEC,
    );
    assert!(d.announce.is_none());
    // And it answers requests with it.
    let q = PeerId::random();
    d.handle_gossip(Some(q), q, &gossip_request(q, 6, None), at + 2 * SEC);
    assert_eq!(answers(&drain(&mut d)), vec![q]);
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
            peer: web,
            snapshots: vec![orphan, huge, fine],
            partial: Vec::new(),
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

/// A verifier that counts how often it is asked, accepting slots below 1000.
#[derive(Debug, Default)]
struct Counting(std::sync::atomic::AtomicU64);

impl crate::SnapshotVerifier for Counting {
    fn verify(&self, slot: u64, _bank_hash: &BankHash) -> bool {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        slot < 1000
    }
}

#[test]
fn the_owners_verifier_is_asked_once_per_snapshot_not_per_advert() {
    let t0 = Instant::now();
    let verifier = std::sync::Arc::new(Counting::default());
    let config = DiscoveryConfig {
        policy: TrustPolicy::Verifier(verifier.clone()),
        ..config()
    };
    let (mut d, nonce) = asking(config, t0, Some(10));
    // 40 identities each advertise 5 of 50 snapshots (half of them refused by the verifier),
    // twice over.
    let peers: Vec<PeerId> = (0..40).map(|_| PeerId::random()).collect();
    for _ in 0..2 {
        for (i, p) in peers.iter().enumerate() {
            let snaps: Vec<SnapshotAd> = (0..5)
                .map(|j| {
                    let n = ((i * 5 + j) % 50) as u64;
                    full(
                        if n.is_multiple_of(2) {
                            100 + n
                        } else {
                            2000 + n
                        },
                        n as u8,
                    )
                })
                .collect();
            d.handle_answer(*p, &answer(*p, &snaps, nonce), false, t0);
            d.best_known_slot(t0);
        }
    }
    let asked = verifier.0.load(std::sync::atomic::Ordering::Relaxed);
    assert!(asked <= 50, "asked {asked} times about 50 snapshots");
    // A new round asks again about those it refused, not about those it accepted.
    d.handle_timeout(t0 + SEC);
    drain(&mut d);
    d.handle_timeout(t0 + 31 * SEC);
    drain(&mut d);
    d.best_known_slot(t0 + 31 * SEC);
    let again = verifier.0.load(std::sync::atomic::Ordering::Relaxed) - asked;
    assert!(again <= 25, "asked {again} more times");
    assert_eq!(d.best_known_slot(t0 + 31 * SEC), Some(148));
}

#[test]
fn identities_advertising_other_snapshots_cannot_push_out_the_pinned_ones_holder() {
    let t0 = Instant::now();
    let pinned = full(200, 1);
    let config = DiscoveryConfig {
        max_tracked_peers: 4,
        policy: TrustPolicy::TrustedSnapshot {
            slot: 200,
            bank_hash: pinned.key.bank_hash,
            content_root: None,
        },
        ..config()
    };
    let (mut d, nonce) = asking(config, t0, None);
    let honest = PeerId::random();
    d.handle_answer(honest, &answer(honest, &[pinned], nonce), false, t0);
    // Twelve fresh identities answer after it, each with a snapshot of its own.
    for i in 0..12u8 {
        let p = PeerId::random();
        d.handle_answer(
            p,
            &answer(p, &[full(300 + u64::from(i), 50 + i)], nonce),
            false,
            t0 + SEC / 100 * u32::from(i + 1),
        );
    }
    assert!(
        d.adverts().any(|a| a.peer == honest),
        "the pinned snapshot's holder was pushed out"
    );
    d.handle_timeout(t0 + SEC);
    let plan = plan_of(&drain(&mut d)).expect("the pinned snapshot is chosen");
    assert_eq!(plan.last().peers[0].0, honest);
}
