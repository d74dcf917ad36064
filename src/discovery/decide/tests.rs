use std::time::Instant;

use super::*;
use crate::discovery::book::Standing;
use crate::discovery::message::Advert;
use crate::snapshot::{Base, SnapshotKind};

fn ad(kind: SnapshotKind, slot: u64, hash: u8, base: Option<&SnapshotAd>) -> SnapshotAd {
    SnapshotAd {
        key: SnapshotKey {
            kind,
            slot,
            bank_hash: BankHash([hash; 32]),
            content_root: ContentRoot([hash; 32]),
            archive_size: if kind == SnapshotKind::Full { 1000 } else { 10 },
            base: base.map(|b| Base {
                slot: b.key.slot,
                bank_hash: b.key.bank_hash,
                content_root: b.key.content_root,
            }),
        },
        chunk_size: ChunkSize::DEFAULT,
        entry_count: 1,
        state_bytes: 200,
    }
}

fn book(adverts: &[(PeerId, Vec<SnapshotAd>)]) -> AdvertBook {
    let mut b = AdvertBook::new(64, "n", &TrustPolicy::default());
    let now = Instant::now();
    for (peer, snaps) in adverts {
        b.insert(
            Advert {
                attestations: Vec::new(),
                peer: *peer,
                snapshots: snaps.clone(),
                partial: Vec::new(),
                partial_attestations: Vec::new(),
                streamer_addrs: vec!["127.0.0.1:1".parse().unwrap()],
                holder_slot: None,
                modified_time: 0,
            },
            Standing::Answered,
            now,
            &TrustPolicy::default(),
        );
    }
    b
}

fn untrusted(n: usize) -> TrustPolicy {
    TrustPolicy::Untrusted {
        min_agreeing_peers: n,
    }
}

const NONE_FAILED: &dyn Fn(&SnapshotKey) -> bool = &|_| false;

fn at(slot: Option<u64>) -> LocalState {
    LocalState {
        slot,
        ..LocalState::default()
    }
}

#[test]
fn the_highest_agreed_slot_wins_and_forgers_are_reported() {
    let peers: Vec<PeerId> = (0..5).map(|_| PeerId::random()).collect();
    let honest = ad(SnapshotKind::Full, 100, 1, None);
    let b = book(&[
        (peers[0], vec![honest]),
        (peers[1], vec![honest]),
        (peers[2], vec![honest]),
        (peers[3], vec![ad(SnapshotKind::Full, 100, 9, None)]),
        (peers[4], vec![ad(SnapshotKind::Full, 150, 7, None)]),
    ]);
    let d = decide(&b, at(None), &untrusted(2), NONE_FAILED);
    let plan = d.plan.unwrap();
    assert_eq!(plan.last().ad.key, honest.key);
    assert_eq!(plan.last().peers.len(), 3);
    assert_eq!(d.conflicts.len(), 1);
    assert_eq!(d.conflicts[0].slot, 100);
    assert_eq!(d.conflicts[0].variants[0].2.len(), 3, "majority first");
    assert_eq!(d.conflicts[0].variants[1].2, vec![peers[3]]);
    // With one peer enough, the newest claim wins.
    let d = decide(&b, at(None), &untrusted(1), NONE_FAILED);
    assert_eq!(d.plan.unwrap().last().ad.key.slot, 150);
}

#[test]
fn the_same_state_in_two_encodings_is_no_conflict() {
    // Same slot and bank hash, another content root (another zstd version): not a fork.
    let (a, b) = (PeerId::random(), PeerId::random());
    let mut other = ad(SnapshotKind::Full, 100, 1, None);
    other.key.content_root = ContentRoot([2; 32]);
    let bk = book(&[
        (a, vec![ad(SnapshotKind::Full, 100, 1, None)]),
        (b, vec![other]),
    ]);
    assert!(
        decide(&bk, at(None), &untrusted(1), NONE_FAILED)
            .conflicts
            .is_empty()
    );
}

#[test]
fn nothing_at_or_below_the_local_slot_and_nothing_failed_is_chosen() {
    let p = PeerId::random();
    let f = ad(SnapshotKind::Full, 50, 1, None);
    let b = book(&[(p, vec![f])]);
    assert!(
        decide(&b, at(Some(50)), &untrusted(1), NONE_FAILED)
            .plan
            .is_none()
    );
    assert!(
        decide(&b, at(Some(49)), &untrusted(1), NONE_FAILED)
            .plan
            .is_some()
    );
    let failed = |k: &SnapshotKey| *k == f.key;
    assert!(decide(&b, at(None), &untrusted(1), &failed).plan.is_none());
    assert!(
        decide(&book(&[]), at(None), &untrusted(1), NONE_FAILED)
            .plan
            .is_none()
    );
}

#[test]
fn ties_prefer_the_cheaper_path_then_more_peers_then_the_lower_root() {
    let peers: Vec<PeerId> = (0..4).map(|_| PeerId::random()).collect();
    let base = ad(SnapshotKind::Full, 100, 1, None);
    let inc = ad(SnapshotKind::Incremental, 150, 2, Some(&base));
    let full150 = ad(SnapshotKind::Full, 150, 3, None);
    let b = book(&[
        (peers[0], vec![inc, base]),
        (peers[1], vec![full150]),
        (peers[2], vec![full150]),
    ]);
    // At the base: the incremental alone is cheaper than the full at the same slot, even with
    // fewer peers.
    let plan = decide(&b, at(Some(120)), &untrusted(1), NONE_FAILED)
        .plan
        .unwrap();
    assert_eq!(plan.last().ad.key, inc.key);
    assert!(plan.full.is_none());
    // Below the base: both need a full download; the full at 150 has more peers.
    let plan = decide(&b, at(Some(50)), &untrusted(1), NONE_FAILED)
        .plan
        .unwrap();
    assert_eq!(plan.last().ad.key, full150.key);
    // The same whatever the order the adverts came in.
    let reversed = book(&[
        (peers[2], vec![full150]),
        (peers[1], vec![full150]),
        (peers[0], vec![inc, base]),
    ]);
    assert_eq!(
        decide(&reversed, at(Some(50)), &untrusted(1), NONE_FAILED).plan,
        Some(plan)
    );
}

#[test]
fn an_incremental_whose_base_nobody_offers_is_not_taken_below_its_base() {
    let p = PeerId::random();
    let base = ad(SnapshotKind::Full, 100, 1, None);
    let inc = ad(SnapshotKind::Incremental, 150, 2, Some(&base));
    let b = book(&[(p, vec![inc])]);
    assert!(
        decide(&b, at(Some(90)), &untrusted(1), NONE_FAILED)
            .plan
            .is_none()
    );
    assert!(
        decide(&b, at(Some(100)), &untrusted(1), NONE_FAILED)
            .plan
            .is_some()
    );
}

#[test]
fn peers_are_those_serving_the_chunk_size_most_serve() {
    let peers: Vec<PeerId> = (0..3).map(|_| PeerId::random()).collect();
    let f = ad(SnapshotKind::Full, 10, 1, None);
    let mut odd = f;
    odd.chunk_size = ChunkSize::MIN;
    let b = book(&[
        (peers[0], vec![f]),
        (peers[1], vec![f]),
        (peers[2], vec![odd]),
    ]);
    let plan = decide(&b, at(None), &untrusted(1), NONE_FAILED)
        .plan
        .unwrap();
    assert_eq!(plan.last().ad.chunk_size, ChunkSize::DEFAULT);
    assert_eq!(plan.last().peers.len(), 2);
}
