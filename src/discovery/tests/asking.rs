//! When a node asks: its ticks and rounds, what tells it it is behind or current, how
//! requests are spaced, and the peers it asks directly.

use super::*;

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
    d.handle_answer(p, &answer(p, &[full(100, 1)], nonce), AnswerTo::Request, t0);
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
