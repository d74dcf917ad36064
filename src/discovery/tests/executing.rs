//! A node that executes the chain keeps its live state unless it is told it is behind or a
//! vouching policy accepts what it is offered.

use super::*;

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
        AnswerTo::Request,
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
        AnswerTo::Request,
        t0 + 2 * SEC,
    );
    d.handle_answer(
        attacker,
        &answer(attacker, &[full(u64::MAX - 1, 9)], nonce),
        AnswerTo::Request,
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
        AnswerTo::Request,
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
        AnswerTo::Request,
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
    d.handle_answer(
        peer,
        &answer(peer, &[full(400, 1)], nonce),
        AnswerTo::Request,
        t0,
    );
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
        d.handle_answer(
            *p,
            &answer(*p, &[full(400, 1)], nonce),
            AnswerTo::Request,
            t0,
        );
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
        d.handle_answer(
            *p,
            &answer(*p, &[full(400, 1)], nonce),
            AnswerTo::Request,
            t0,
        );
    }
    d.handle_timeout(t0 + SEC);
    assert_eq!(plan_of(&drain(&mut d)).unwrap().last().ad.key.slot, 400);
}
