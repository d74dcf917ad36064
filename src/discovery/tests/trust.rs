//! The trust policy and the chain clock: what a node accepts, whose word it takes for what
//! lies outside the key, and how often it asks its owner's verifier.

use super::*;

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
        d.handle_answer(
            p,
            &answer(p, &[full(1 << 60, 9)], nonce),
            AnswerTo::Request,
            t0,
        );
    }
    assert_eq!(d.best_known_slot(t0), None);
    // One trusted peer is not a quorum of two.
    d.handle_answer(
        trusted[0],
        &answer(trusted[0], &[full(1200, 1)], nonce),
        AnswerTo::Request,
        t0,
    );
    assert_eq!(d.best_known_slot(t0), None);
    d.handle_answer(
        trusted[1],
        &answer(trusted[1], &[full(1200, 1)], nonce),
        AnswerTo::Request,
        t0,
    );
    assert_eq!(d.best_known_slot(t0), Some(1200));
    d.handle_timeout(t0 + SEC);
    let plan = plan_of(&drain(&mut d)).expect("a plan");
    assert_eq!(plan.last().ad.key.slot, 1200);
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
    d.handle_answer(
        liar,
        &answer(liar, &[full(1 << 40, 9)], nonce),
        AnswerTo::Request,
        t0,
    );
    d.handle_answer(
        honest,
        &answer(honest, &[full(990, 1)], nonce),
        AnswerTo::Request,
        t0,
    );
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
        d.handle_answer(p, &answer(p, &[lying], nonce), AnswerTo::Request, t0);
    }
    for p in &trusted {
        d.handle_answer(
            *p,
            &answer(*p, &[honest], nonce),
            AnswerTo::Request,
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
    d.handle_answer(p, &answer(p, &[full(500, 1)], nonce), AnswerTo::Request, t0);
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
        d.handle_answer(p, &answer(p, &[honest], nonce), AnswerTo::Request, t0);
    }
    // After each failure the attacker brings a fresh, lower root from more fresh identities.
    for round in 0..3u8 {
        let mut fake = honest;
        fake.key.content_root = ContentRoot([0; 32]);
        fake.key.content_root.0[31] = round;
        let at = t0 + Duration::from_secs(2 + u64::from(round));
        for _ in 0..10 {
            let p = PeerId::random();
            d.handle_answer(p, &answer(p, &[fake], nonce), AnswerTo::Request, at);
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
            d.handle_answer(*p, &answer(*p, &snaps, nonce), AnswerTo::Request, t0);
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
    d.handle_answer(
        honest,
        &answer(honest, &[pinned], nonce),
        AnswerTo::Request,
        t0,
    );
    // Twelve fresh identities answer after it, each with a snapshot of its own.
    for i in 0..12u8 {
        let p = PeerId::random();
        d.handle_answer(
            p,
            &answer(p, &[full(300 + u64::from(i), 50 + i)], nonce),
            AnswerTo::Request,
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

#[test]
fn a_changed_trusted_set_takes_effect_at_once_and_cancels_a_sync_it_no_longer_accepts() {
    let t0 = Instant::now();
    let (old, new) = (PeerId::random(), PeerId::random());
    let mut c = config();
    c.policy = TrustPolicy::TrustedPeers {
        peers: [old].into(),
        quorum: 1,
    };
    let mut d = machine(c, t0);
    d.handle_local(local(None, vec![]));
    d.handle_timeout(t0);
    let nonce = last_nonce(&drain(&mut d));
    // Only the new validator answers: under the old set, nothing is acceptable.
    d.handle_answer(
        new,
        &answer(new, &[full(500, 1)], nonce),
        AnswerTo::Request,
        t0,
    );
    d.handle_timeout(t0 + SEC);
    assert!(plan_of(&drain(&mut d)).is_none());
    assert_eq!(d.best_known_slot(t0 + SEC), None);
    // The set changes (an epoch): the advert already heard counts, and the node decides at
    // once, without waiting for its next interval.
    let t1 = t0 + 2 * SEC;
    d.handle_policy(
        TrustPolicy::TrustedPeers {
            peers: [new].into(),
            quorum: 1,
        },
        t1,
    );
    assert_eq!(d.best_known_slot(t1), Some(500));
    let mut plan = None;
    for ms in (0..=2000).step_by(100) {
        d.handle_timeout(t1 + Duration::from_millis(ms));
        if let Some(p) = plan_of(&drain(&mut d)) {
            plan = Some(p);
            break;
        }
    }
    assert_eq!(plan.expect("a plan").last().ad.key.slot, 500);
    // The set changes again, dropping that validator: the sync it chose is cancelled.
    d.handle_policy(
        TrustPolicy::TrustedPeers {
            peers: [old].into(),
            quorum: 1,
        },
        t1 + 3 * SEC,
    );
    assert!(
        drain(&mut d)
            .iter()
            .any(|a| matches!(a, Action::CancelSync))
    );
    assert_eq!(d.best_known_slot(t1 + 3 * SEC), None);
}

#[test]
fn a_sync_under_way_is_kept_only_while_the_new_policy_judges_it_as_the_old_one_did() {
    let t0 = Instant::now();
    let (a, b, stranger) = (PeerId::random(), PeerId::random(), PeerId::random());
    let mut c = config();
    c.policy = TrustPolicy::TrustedPeers {
        peers: [a].into(),
        quorum: 1,
    };
    let mut d = machine(c, t0);
    d.handle_local(local(None, vec![]));
    d.handle_timeout(t0);
    let nonce = last_nonce(&drain(&mut d));
    for p in [a, stranger] {
        d.handle_answer(p, &answer(p, &[full(500, 1)], nonce), AnswerTo::Request, t0);
    }
    d.handle_timeout(t0 + SEC);
    let plan = plan_of(&drain(&mut d)).expect("a plan");
    assert!(plan.last().vouched && plan.last().counts_vouched);
    // Another validator joins the set: the sync is judged as before, and kept.
    let t1 = t0 + 2 * SEC;
    d.handle_policy(
        TrustPolicy::TrustedPeers {
            peers: [a, b].into(),
            quorum: 1,
        },
        t1,
    );
    assert!(
        !drain(&mut d)
            .iter()
            .any(|a| matches!(a, Action::CancelSync))
    );
    // Counting peers instead: the snapshot is still acceptable, but nobody vouches for its
    // root any more: the sync is chosen again rather than kept on the old judgement.
    d.handle_policy(
        TrustPolicy::Untrusted {
            min_agreeing_peers: 1,
        },
        t1 + SEC,
    );
    assert!(
        drain(&mut d)
            .iter()
            .any(|a| matches!(a, Action::CancelSync))
    );
}

/// An answer of `peer` listing `snaps`, each carrying the attestations `signed` gives for it.
fn attested_answer(
    peer: PeerId,
    snaps: &[SnapshotAd],
    signed: &dyn Fn(&SnapshotKey) -> Vec<crate::snapshot::Attestation>,
    nonce: u64,
) -> crate::proto::SnapshotInfoResponse {
    message::advert(peer, snaps, signed, &[], &addr(), None, 0, nonce)
}

#[test]
fn trusted_signatures_carried_by_strangers_make_a_quorum_and_nothing_else_does() {
    use crate::snapshot::Attestation;
    use libp2p::identity::Keypair;
    let t0 = Instant::now();
    let keys: Vec<Keypair> = (0..3).map(|_| Keypair::generate_ed25519()).collect();
    let trusted: Vec<PeerId> = keys.iter().map(|k| k.public().to_peer_id()).collect();
    let (mut d, nonce) = asking(trusted_config(&trusted, 2), t0, None);
    let snap = full(1200, 1);
    let other = full(1300, 2);
    let sign =
        |k: &Keypair, network: &str, key: &SnapshotKey| Attestation::sign(k, network, key).unwrap();
    // One trusted signature, strangers' keys, another network's, another snapshot's replayed:
    // no quorum, whoever relays them.
    let outsider = Keypair::generate_ed25519();
    let cases: Vec<Vec<Attestation>> = vec![
        vec![sign(&keys[0], "n", &snap.key)],
        vec![
            sign(&outsider, "n", &snap.key),
            sign(&keys[0], "n", &snap.key),
        ],
        vec![
            sign(&keys[0], "n", &snap.key),
            sign(&keys[1], "other", &snap.key),
        ],
        vec![
            sign(&keys[0], "n", &snap.key),
            sign(&keys[1], "n", &other.key),
        ],
        // The same trusted signature twice counts once.
        vec![
            sign(&keys[0], "n", &snap.key),
            sign(&keys[0], "n", &snap.key),
        ],
    ];
    for atts in cases {
        let p = PeerId::random();
        let msg = attested_answer(p, &[snap], &|_| atts.clone(), nonce);
        d.handle_answer(p, &msg, AnswerTo::Request, t0);
        assert_eq!(d.best_known_slot(t0), None, "no quorum");
    }
    // A stranger relaying a second trusted signature makes the quorum: the snapshot is chosen.
    let relay = PeerId::random();
    let msg = attested_answer(
        relay,
        &[snap],
        &|_| vec![sign(&keys[1], "n", &snap.key)],
        nonce,
    );
    d.handle_answer(relay, &msg, AnswerTo::Request, t0);
    assert_eq!(d.best_known_slot(t0), Some(1200));
    d.handle_timeout(t0 + SEC);
    let plan = plan_of(&drain(&mut d)).expect("a plan");
    let target = plan.last();
    assert_eq!(target.ad.key, snap.key);
    assert!(target.vouched, "the signatures vouch for the root");
    let mut signers: Vec<PeerId> = target
        .attestations
        .iter()
        .filter_map(|a| a.signer())
        .collect();
    signers.sort();
    let mut want = vec![trusted[0], trusted[1]];
    want.sort();
    assert_eq!(
        signers, want,
        "the valid trusted signatures travel with the plan"
    );
}

#[test]
fn a_changed_trusted_set_counts_the_signatures_it_names() {
    use crate::snapshot::Attestation;
    use libp2p::identity::Keypair;
    let t0 = Instant::now();
    let keys: Vec<Keypair> = (0..2).map(|_| Keypair::generate_ed25519()).collect();
    let signers: Vec<PeerId> = keys.iter().map(|k| k.public().to_peer_id()).collect();
    let others: Vec<PeerId> = (0..2).map(|_| PeerId::random()).collect();
    let (mut d, nonce) = asking(trusted_config(&others, 2), t0, None);
    let snap = full(1200, 1);
    let atts: Vec<Attestation> = keys
        .iter()
        .map(|k| Attestation::sign(k, "n", &snap.key).unwrap())
        .collect();
    let relay = PeerId::random();
    d.handle_answer(
        relay,
        &attested_answer(relay, &[snap], &|_| atts.clone(), nonce),
        AnswerTo::Request,
        t0,
    );
    assert_eq!(d.best_known_slot(t0), None, "signed by keys not trusted");
    d.handle_policy(
        TrustPolicy::TrustedPeers {
            peers: signers.iter().copied().collect(),
            quorum: 2,
        },
        t0,
    );
    assert_eq!(
        d.best_known_slot(t0),
        Some(1200),
        "the same adverts, counted again"
    );
}

/// A light client that knows the validator set and accepts what two thirds of it signed.
#[derive(Debug)]
struct Committee(Vec<PeerId>);

impl crate::SnapshotVerifier for Committee {
    fn verify(&self, _slot: u64, _bank_hash: &BankHash) -> bool {
        false
    }

    fn attesters(&self) -> Vec<PeerId> {
        self.0.clone()
    }

    fn verify_attested(&self, _slot: u64, _bank_hash: &BankHash, signers: &[PeerId]) -> bool {
        3 * signers.iter().filter(|s| self.0.contains(s)).count() >= 2 * self.0.len()
    }
}

#[test]
fn the_owners_verifier_is_shown_the_valid_signatures_of_the_attesters_it_names() {
    use crate::snapshot::Attestation;
    use libp2p::identity::Keypair;
    let t0 = Instant::now();
    let keys: Vec<Keypair> = (0..3).map(|_| Keypair::generate_ed25519()).collect();
    let committee: Vec<PeerId> = keys.iter().map(|k| k.public().to_peer_id()).collect();
    let config = DiscoveryConfig {
        policy: TrustPolicy::Verifier(std::sync::Arc::new(Committee(committee))),
        ..config()
    };
    let (mut d, nonce) = asking(config, t0, None);
    let snap = full(1200, 1);
    let sign = |k: &Keypair| Attestation::sign(k, "n", &snap.key).unwrap();
    let mut forged = sign(&keys[1]).to_proto();
    forged.signature = sign(&Keypair::generate_ed25519()).to_proto().signature;
    let forged = Attestation::from_proto(&forged).unwrap();
    let relay = PeerId::random();
    let one = vec![sign(&keys[0]), forged];
    d.handle_answer(
        relay,
        &attested_answer(relay, &[snap], &|_| one.clone(), nonce),
        AnswerTo::Request,
        t0,
    );
    assert_eq!(d.best_known_slot(t0), None, "one valid signature of three");
    // The same relay's next advert carries a second valid one: two of three.
    let two = vec![sign(&keys[0]), sign(&keys[1])];
    d.handle_answer(
        relay,
        &attested_answer(relay, &[snap], &|_| two.clone(), nonce),
        AnswerTo::Request,
        t0,
    );
    assert_eq!(d.best_known_slot(t0), Some(1200));
}

#[test]
fn a_holder_keeps_the_trusted_signatures_it_hears_of_what_it_holds() {
    use crate::snapshot::Attestation;
    use libp2p::identity::Keypair;
    let t0 = Instant::now();
    let keys: Vec<Keypair> = (0..2).map(|_| Keypair::generate_ed25519()).collect();
    let ids: Vec<PeerId> = keys.iter().map(|k| k.public().to_peer_id()).collect();
    let mut c = trusted_config(&ids, 2);
    c.sync_enabled = false;
    let mut d = machine(c, t0);
    let snap = full(100, 1);
    let mine = Attestation::sign(&keys[0], "n", &snap.key).unwrap();
    let theirs = Attestation::sign(&keys[1], "n", &snap.key).unwrap();
    let mut held = local(Some(100), vec![snap]);
    held.attestations.insert(snap.key, vec![mine.clone()]);
    d.handle_local(held.clone());
    drain(&mut d);
    let kept = |actions: &[Action]| -> Vec<Vec<Attestation>> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::KeepAttestations { key, attestations } if *key == snap.key => {
                    Some(attestations.clone())
                }
                _ => None,
            })
            .collect()
    };
    // The other validator announces the same snapshot, signed.
    let announce = |d: &mut Discovery, atts: Vec<Attestation>| {
        let msg = attested_answer(ids[1], &[snap], &|_| atts.clone(), 0);
        d.handle_gossip(
            Some(ids[1]),
            ids[1],
            &message::gossip(crate::proto::discovery_message::Body::Announcement(msg)),
            t0,
        );
    };
    announce(&mut d, vec![theirs.clone()]);
    let asked = kept(&drain(&mut d));
    assert_eq!(asked.len(), 1);
    assert!(asked[0].contains(&theirs));
    // Once stored, hearing it again asks nothing.
    held.attestations
        .insert(snap.key, vec![mine, theirs.clone()]);
    d.handle_local(held);
    announce(&mut d, vec![theirs]);
    assert!(kept(&drain(&mut d)).is_empty());
}

#[test]
fn nothing_above_what_the_state_check_can_judge_is_chosen() {
    let t0 = Instant::now();
    let (mut d, nonce) = asking(config(), t0, None);
    d.handle_check_ceiling(Some(100));
    let p = PeerId::random();
    d.handle_answer(
        p,
        &answer(p, &[full(150, 1), full(90, 2)], nonce),
        AnswerTo::Request,
        t0,
    );
    d.handle_timeout(t0 + SEC);
    let plan = plan_of(&drain(&mut d)).expect("a plan");
    assert_eq!(
        plan.last().ad.key.slot,
        90,
        "150 could only be found undecided"
    );
    // The light client catches up: the newer one is taken next.
    d.handle_sync_ended(SyncOutcome::Cancelled, t0 + SEC);
    d.handle_check_ceiling(Some(200));
    d.handle_timeout(t0 + 2 * SEC);
    assert_eq!(
        plan_of(&drain(&mut d)).expect("a plan").last().ad.key.slot,
        150
    );
}

#[test]
fn a_state_the_application_refused_is_never_taken_again_under_any_root() {
    let t0 = Instant::now();
    let (mut d, nonce) = asking(config(), t0, None);
    let refused = full(200, 6);
    let good = full(100, 1);
    let (a, b) = (PeerId::random(), PeerId::random());
    d.handle_answer(a, &answer(a, &[refused], nonce), AnswerTo::Request, t0);
    d.handle_answer(b, &answer(b, &[good], nonce), AnswerTo::Request, t0);
    d.handle_timeout(t0 + SEC);
    assert_eq!(plan_of(&drain(&mut d)).unwrap().last().ad.key, refused.key);
    d.handle_sync_ended(
        SyncOutcome::Failed(SyncFailure {
            leg: LegKind::Full,
            failure: Failure::NotTheChain,
            bad_peers: vec![],
        }),
        t0 + 2 * SEC,
    );
    // It asks again at once and takes the honest one.
    assert!(started(&drain(&mut d)));
    d.handle_timeout(t0 + 3 * SEC);
    assert_eq!(plan_of(&drain(&mut d)).unwrap().last().ad.key, good.key);
    let mut synced = local(Some(100), vec![good]);
    synced.attestations.clear();
    d.handle_sync_ended(
        SyncOutcome::Synced {
            bad_peers: vec![],
            served: vec![],
        },
        t0 + 4 * SEC,
    );
    d.handle_local(synced);
    // Long after any cooldown, the refused state, under its root and under a fresh one from a
    // fresh identity, is still not taken.
    let later = t0 + 10 * config().failed_cooldown;
    d.handle_timeout(later);
    let mut acts = drain(&mut d);
    let nonce = last_nonce(&acts);
    let mut fresh = refused;
    fresh.key.content_root = ContentRoot([66; 32]);
    let c = PeerId::random();
    d.handle_answer(
        c,
        &answer(c, &[refused, fresh], nonce),
        AnswerTo::Request,
        later,
    );
    assert!(d.book.entry(&fresh.key).is_some(), "heard");
    assert_eq!(
        d.best_known_slot(later),
        None,
        "a refused state is no newer snapshot"
    );
    d.handle_timeout(later + SEC);
    acts.extend(drain(&mut d));
    assert!(plan_of(&acts).is_none(), "{acts:?}");
}

#[test]
fn signatures_a_partial_holder_relays_make_a_quorum_and_a_downloading_node_relays_them_on() {
    use crate::snapshot::Attestation;
    use libp2p::identity::Keypair;
    let t0 = Instant::now();
    let keys: Vec<Keypair> = (0..2).map(|_| Keypair::generate_ed25519()).collect();
    let trusted: Vec<PeerId> = keys.iter().map(|k| k.public().to_peer_id()).collect();
    let (mut d, nonce) = asking(trusted_config(&trusted, 2), t0, None);
    let snap = full(1200, 1);
    let signed: Vec<Attestation> = keys
        .iter()
        .map(|k| Attestation::sign(k, "n", &snap.key).unwrap())
        .collect();
    // A stranger holds it, unsigned: no quorum.
    let holder = PeerId::random();
    d.handle_answer(
        holder,
        &answer(holder, &[snap], nonce),
        AnswerTo::Request,
        t0,
    );
    assert_eq!(d.best_known_slot(t0), None);
    // A partial holder of it relays both trusted signatures: the quorum is there.
    let relay = PeerId::random();
    let held = PartialAd {
        ad: snap,
        verified_bytes: 1 << 16,
    };
    let msg = message::advert(
        relay,
        &[],
        &|_| signed.clone(),
        &[held],
        &addr(),
        None,
        0,
        nonce,
    );
    d.handle_answer(relay, &msg, AnswerTo::Request, t0);
    assert_eq!(d.best_known_slot(t0), Some(1200));
    d.handle_timeout(t0 + SEC);
    let plan = plan_of(&drain(&mut d)).expect("a plan");
    assert_eq!(plan.last().ad.key, snap.key);
    assert_eq!(plan.last().attestations.len(), 2);
    // Downloading it, this node serves part of it: its answers carry the signatures on.
    d.handle_partials(vec![held], t0 + 2 * SEC);
    drain(&mut d);
    let mut want = trusted.clone();
    want.sort();
    let relayed_signers = |d: &mut Discovery, nonce: u64, at: Instant| -> Vec<PeerId> {
        let q = PeerId::random();
        d.handle_gossip(Some(q), q, &gossip_request(q, nonce, None), at);
        let answered = drain(d)
            .into_iter()
            .find_map(|a| match a {
                Action::Answer { answer, .. } => Some(answer),
                _ => None,
            })
            .expect("an answer");
        let carried = message::check_advert(&answered, d.me, d.config.limits)
            .unwrap()
            .partial_attestations;
        assert_eq!(carried.len(), 1);
        let mut signers: Vec<PeerId> = carried[0].iter().filter_map(Attestation::signer).collect();
        signers.sort();
        signers
    };
    assert_eq!(relayed_signers(&mut d, 7, t0 + 3 * SEC), want);
    // Long after the adverts that carried them are gone, the download's own choice still
    // carries them on.
    let policy = d.config.policy.clone();
    d.book.forget(&relay, &policy);
    d.book.forget(&holder, &policy);
    assert!(d.book.attestations(&snap.key).is_empty());
    assert_eq!(relayed_signers(&mut d, 8, t0 + 4 * SEC), want);
}

#[test]
fn the_trusted_signatures_served_with_a_manifest_are_kept_with_the_snapshot_synced() {
    use crate::snapshot::Attestation;
    use libp2p::identity::Keypair;
    let t0 = Instant::now();
    let keys: Vec<Keypair> = (0..3).map(|_| Keypair::generate_ed25519()).collect();
    let ids: Vec<PeerId> = keys.iter().map(|k| k.public().to_peer_id()).collect();
    let (mut d, nonce) = asking(trusted_config(&ids, 1), t0, None);
    let snap = full(1200, 1);
    let sign = |k: &Keypair| Attestation::sign(k, "n", &snap.key).unwrap();
    // Chosen on one trusted signature carried in an advert.
    let p = PeerId::random();
    d.handle_answer(
        p,
        &attested_answer(p, &[snap], &|_| vec![sign(&keys[0])], nonce),
        AnswerTo::Request,
        t0,
    );
    d.handle_timeout(t0 + SEC);
    let plan = plan_of(&drain(&mut d)).expect("a plan");
    assert_eq!(plan.last().attestations, vec![sign(&keys[0])]);
    // Synced: the job stored the plan's signature; the sources served others with the
    // manifest: another trusted key's, a stranger's, one forged, one of another snapshot.
    let mut held = local(Some(1200), vec![snap]);
    held.attestations.insert(snap.key, vec![sign(&keys[0])]);
    d.handle_local(held);
    drain(&mut d);
    let mut forged = sign(&keys[2]).to_proto();
    forged.signature = sign(&Keypair::generate_ed25519()).to_proto().signature;
    // One source's list: junk, two invalid signatures of trusted keys (then nothing more of it
    // is checked), a valid one behind them. Another's: the valid one.
    let junk = vec![
        sign(&keys[0]),
        sign(&Keypair::generate_ed25519()),
        Attestation::from_proto(&forged).unwrap(),
        Attestation::sign(&keys[2], "n", &full(1100, 2).key).unwrap(),
        sign(&keys[1]),
    ];
    d.handle_sync_ended(
        SyncOutcome::Synced {
            bad_peers: vec![],
            served: vec![(snap.key, vec![junk, vec![sign(&keys[1])]])],
        },
        t0 + 2 * SEC,
    );
    let kept: Vec<Vec<Attestation>> = drain(&mut d)
        .into_iter()
        .filter_map(|a| match a {
            Action::KeepAttestations { key, attestations } if key == snap.key => Some(attestations),
            _ => None,
        })
        .collect();
    assert_eq!(
        kept,
        vec![vec![sign(&keys[1])]],
        "only the new valid trusted one"
    );
}

#[test]
fn a_holder_relays_the_signatures_of_the_set_trusted_now_before_those_it_stored_earlier() {
    use crate::snapshot::{Attestation, MAX_ATTESTATIONS};
    use libp2p::identity::Keypair;
    let t0 = Instant::now();
    let new: Vec<Keypair> = (0..2).map(|_| Keypair::generate_ed25519()).collect();
    let ids: Vec<PeerId> = new.iter().map(|k| k.public().to_peer_id()).collect();
    let mut c = trusted_config(&ids, 2);
    c.sync_enabled = false;
    let mut d = machine(c, t0);
    let snap = full(100, 1);
    // It stored a full list, signed by the set trusted an epoch ago.
    let old: Vec<Attestation> = (0..MAX_ATTESTATIONS)
        .map(|_| Attestation::sign(&Keypair::generate_ed25519(), "n", &snap.key).unwrap())
        .collect();
    let mut held = local(Some(100), vec![snap]);
    held.attestations.insert(snap.key, old.clone());
    d.handle_local(held);
    drain(&mut d);
    // The set trusted now signed it too; a stranger's announcement carries their signatures.
    let theirs: Vec<Attestation> = new
        .iter()
        .map(|k| Attestation::sign(k, "n", &snap.key).unwrap())
        .collect();
    let relay = PeerId::random();
    let msg = attested_answer(relay, &[snap], &|_| theirs.clone(), 0);
    d.handle_gossip(
        Some(relay),
        relay,
        &message::gossip(crate::proto::discovery_message::Body::Announcement(msg)),
        t0,
    );
    drain(&mut d);
    let q = PeerId::random();
    d.handle_gossip(Some(q), q, &gossip_request(q, 7, None), t0 + SEC);
    let answered = drain(&mut d)
        .into_iter()
        .find_map(|a| match a {
            Action::Answer { answer, .. } => Some(answer),
            _ => None,
        })
        .expect("an answer");
    let advert = message::check_advert(&answered, d.me, d.config.limits).unwrap();
    let carried = advert.attestations_of(0);
    assert_eq!(carried.len(), MAX_ATTESTATIONS);
    assert!(
        theirs.iter().all(|a| carried.contains(a)),
        "the set trusted now"
    );
    assert_eq!(
        carried.iter().filter(|a| old.contains(a)).count(),
        MAX_ATTESTATIONS - 2
    );
}
