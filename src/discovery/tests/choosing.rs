//! What a round takes from the answers it hears: when it decides, which snapshots (an
//! incremental, its base), who serves them, and what a failed sync leaves behind.

use super::*;

#[test]
fn a_round_with_an_acceptable_snapshot_decides_once_the_answers_have_gone_quiet() {
    let t0 = Instant::now();
    let mut d = machine(config(), t0);
    d.handle_timeout(t0);
    let nonce = last_nonce(&drain(&mut d));
    let ms = |n: u64| Duration::from_millis(n);
    let (a, b) = (PeerId::random(), PeerId::random());
    d.handle_answer(
        a,
        &answer(a, &[full(100, 1)], nonce),
        AnswerTo::Request,
        t0 + ms(5),
    );
    // Another answer within a quarter of the window keeps the round open.
    assert_eq!(d.poll_timeout(), Some(t0 + ms(255)));
    d.handle_answer(
        b,
        &answer(b, &[full(120, 2)], nonce),
        AnswerTo::Request,
        t0 + ms(200),
    );
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
    d.handle_answer(
        a,
        &answer(a, &[full(900, 1)], nonce),
        AnswerTo::Request,
        t0 + ms(5),
    );
    d.handle_timeout(t0 + ms(500));
    assert!(matches!(d.stage(), Stage::Collecting { .. }));
}

#[test]
fn answers_to_no_request_of_ours_are_dropped_and_change_nothing() {
    let t0 = Instant::now();
    let mut d = machine(config(), t0);
    d.handle_local(local(Some(100), vec![]));
    let p = PeerId::random();
    // Before any request: unsolicited.
    d.handle_answer(
        p,
        &answer(p, &[full(1 << 40, 1)], 77),
        AnswerTo::Request,
        t0,
    );
    assert_eq!(d.best_known_slot(t0), None);
    d.handle_timeout(t0);
    let nonce = last_nonce(&drain(&mut d));
    // With a wrong nonce: still unsolicited.
    d.handle_answer(
        p,
        &answer(p, &[full(1 << 40, 1)], nonce ^ 2),
        AnswerTo::Request,
        t0,
    );
    assert_eq!(d.best_known_slot(t0), None);
    // With the right one: heard.
    d.handle_answer(p, &answer(p, &[full(300, 1)], nonce), AnswerTo::Request, t0);
    assert_eq!(d.best_known_slot(t0), Some(300));
    // And much later, the nonce has expired.
    d.handle_answer(
        p,
        &answer(p, &[full(400, 1)], nonce),
        AnswerTo::Request,
        t0 + 61 * SEC,
    );
    assert_eq!(d.best_known_slot(t0), Some(300));
}

#[test]
fn a_sync_adds_peers_that_advertise_what_it_fetches_and_keeps_asking() {
    let t0 = Instant::now();
    let mut d = machine(config(), t0);
    d.handle_timeout(t0);
    let nonce = last_nonce(&drain(&mut d));
    let f = full(100, 1);
    let a = PeerId::random();
    d.handle_answer(a, &answer(a, &[f], nonce), AnswerTo::Request, t0);
    d.handle_timeout(t0 + SEC);
    let plan = plan_of(&drain(&mut d)).unwrap();
    assert_eq!(plan.full.as_ref().unwrap().peers.len(), 1);
    // A late answer for the same snapshot joins the download.
    let b = PeerId::random();
    d.handle_answer(b, &answer(b, &[f], nonce), AnswerTo::Request, t0 + 2 * SEC);
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
    d.handle_answer(liar, &answer(liar, &[bad], nonce), AnswerTo::Request, t0);
    d.handle_answer(
        honest,
        &answer(honest, &[good], nonce),
        AnswerTo::Request,
        t0,
    );
    d.handle_timeout(t0 + SEC);
    assert_eq!(plan_of(&drain(&mut d)).unwrap().last().ad.key, bad.key);
    d.handle_sync_ended(
        SyncOutcome::Failed(SyncFailure {
            leg: LegKind::Full,
            failure: Failure::Content,
            bad_peers: vec![],
        }),
        t0 + 2 * SEC,
    );
    assert_eq!(d.peers.strikes.get(&liar), Some(&1));
    assert_eq!(d.peers.strikes.get(&honest), None);
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
        d.handle_answer(p, &answer(p, &[inc, base], nonce), AnswerTo::Request, t0);
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
    d.handle_answer(p, &answer(p, &[inc, base], nonce), AnswerTo::Request, t0);
    d.handle_timeout(t0 + SEC);
    assert!(plan_of(&drain(&mut d)).unwrap().full.is_none());
    // The apply did not check out: the state is not on that base (a fork, say).
    d.handle_sync_ended(
        SyncOutcome::Failed(SyncFailure {
            leg: LegKind::Incremental,
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

#[test]
fn partial_holders_are_sources_of_a_chosen_snapshot_never_a_reason_to_choose_it() {
    let t0 = Instant::now();
    let (mut d, nonce) = asking(config(), t0, None);
    let f = full(100, 1);
    // Many peers say they download the snapshot: nothing is chosen on their word.
    let partials: Vec<PeerId> = (0..5).map(|_| PeerId::random()).collect();
    for p in &partials {
        d.handle_answer(*p, &partial_answer(*p, &[f], nonce), AnswerTo::Request, t0);
    }
    d.handle_timeout(t0 + SEC);
    let actions = drain(&mut d);
    assert!(plan_of(&actions).is_none());
    assert_eq!(d.best_known_slot(t0 + SEC), None);
    // One holder of the whole snapshot: it is chosen, with the partial holders as sources.
    d.handle_timeout(t0 + 30 * SEC);
    let nonce = last_nonce(&drain(&mut d));
    for p in &partials {
        d.handle_answer(
            *p,
            &partial_answer(*p, &[f], nonce),
            AnswerTo::Request,
            t0 + 30 * SEC,
        );
    }
    let seed = PeerId::random();
    d.handle_answer(
        seed,
        &answer(seed, &[f], nonce),
        AnswerTo::Request,
        t0 + 30 * SEC,
    );
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
        AnswerTo::Request,
        t0 + 32 * SEC,
    );
    let added: Vec<_> = drain(&mut d)
        .into_iter()
        .filter_map(|a| match a {
            Action::AddSyncPeer { peer, holding, .. } => Some((peer, holding)),
            _ => None,
        })
        .collect();
    assert_eq!(added, vec![(late, crate::transfer::Holding::Partial)]);
}
