//! What a holder does for others: answering requests and direct asks, and announcing new
//! holdings to the nodes that wait for them.

use super::*;

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
    assert_eq!(d.peers.strikes.get(&r), Some(&1));
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
