//! The end of a sync: what the driver saw ([`SyncOutcome`]) and what it means ([`judge`]), a
//! pure rule over the plan, the failure and who advertised what.
//!
//! - **Blame follows proof.** A peer is struck only when bytes it sent were proven wrong: chunks
//!   that did not match the content root (the download names those peers), or an advert of a
//!   snapshot whose verified content contradicts the advert (its bank hash, slot or kind). A
//!   snapshot that could not be fetched, a local disk or DB failure, or an incremental that
//!   does not apply to this node's own state is nobody's fault.
//! - **What failed is not chosen again for a while**: the snapshot whose download or load
//!   failed is cooled down for `failed_cooldown`. An incremental that did not apply is not: it
//!   is fine, the node's state is simply not on its base, so the next choice takes it with its
//!   base.
//! - **What is proven bad is not served**: a snapshot whose content contradicts its key is
//!   deleted from the node's own store.

use libp2p::PeerId;

use super::book::AdvertBook;
use super::decide::Plan;
use crate::hash::ContentRoot;
use crate::snapshot::{Base, SnapshotKey};

/// Which snapshot of a plan a failure is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LegKind {
    /// The plan's full snapshot.
    Full,
    /// The plan's incremental snapshot.
    Incremental,
}

/// What went wrong, in the terms that say whose fault it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The bytes could not be had: every peer refused, was unreachable, stalled or was dropped,
    /// or no verified byte arrived for too long.
    Unavailable,
    /// Every peer refused this node's token.
    Unauthorized,
    /// This node's own disk or DB failed (not writable, full, an I/O error).
    Local,
    /// The snapshot's verified bytes contradict its key: a bank hash, slot or kind that differs
    /// from the advertised one, a malformed archive, more records than declared.
    Content,
    /// An incremental snapshot does not apply to this node's state: the state is not on its
    /// base (its slot is outside the snapshot's range, or the result's bank hash differs).
    NotOnBase,
    /// The load stopped without a result.
    Aborted,
    /// The application's state check refused the state: the snapshot is not the chain's.
    NotTheChain,
    /// The application's state check could not tell whether the state is the chain's.
    Undecided,
}

/// A failed sync, as the driver saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SyncFailure {
    /// Which download or load failed.
    pub(crate) leg: LegKind,
    /// What went wrong.
    pub(crate) failure: Failure,
    /// Peers that sent bytes proven wrong (chunks that did not match the content root).
    pub(crate) bad_peers: Vec<PeerId>,
}

/// How a sync ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SyncOutcome {
    /// The plan's last snapshot is loaded. `bad_peers` sent chunks proven wrong on the way;
    /// `served` are the lists of attestations the sources served with each snapshot's
    /// manifest (claims; a list per source).
    Synced {
        bad_peers: Vec<PeerId>,
        served: Vec<(SnapshotKey, Vec<Vec<crate::snapshot::Attestation>>)>,
    },
    /// It failed.
    Failed(SyncFailure),
    /// It was cancelled (by the owner, or by shutting down).
    Cancelled,
}

/// Why a peer is struck.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Offence {
    /// It sent chunks that do not match the content root.
    BadChunks,
    /// It advertised a snapshot whose content contradicts the advert.
    FalseAdvert {
        /// The snapshot's slot.
        slot: u64,
    },
    /// It advertised a state the application's check proved is not the chain's.
    NotTheChain {
        /// The snapshot's slot.
        slot: u64,
    },
}

impl std::fmt::Display for Offence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Offence::BadChunks => f.write_str("sent chunks that do not match the content root"),
            Offence::FalseAdvert { slot } => write!(
                f,
                "advertised a snapshot whose content contradicts its advert (slot {slot})"
            ),
            Offence::NotTheChain { slot } => write!(
                f,
                "advertised a state the application's check refused (slot {slot})"
            ),
        }
    }
}

/// What follows a failed sync.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Consequences {
    /// Snapshots not to choose again for `failed_cooldown`.
    pub(crate) cool_down: Vec<SnapshotKey>,
    /// Peers to strike, and why.
    pub(crate) strike: Vec<(PeerId, Offence)>,
    /// Snapshots of the node's own store to delete: their content is proven bad.
    pub(crate) delete: Vec<ContentRoot>,
    /// The full snapshot the node's state proved not to descend from.
    pub(crate) not_on: Option<Base>,
    /// The state (slot, bank hash) the application's check refused: never to be taken again.
    pub(crate) refused: Option<(u64, crate::hash::BankHash)>,
}

/// What a failed sync of `plan` means (see the module docs). `book` tells who advertised what.
pub(crate) fn judge(plan: &Plan, failed: &SyncFailure, book: &AdvertBook) -> Consequences {
    let target = match failed.leg {
        LegKind::Full => plan.full.as_ref(),
        LegKind::Incremental => plan.incremental.as_ref(),
    }
    .unwrap_or_else(|| plan.last());
    let key = target.ad.key;
    let mut c = Consequences::default();
    for peer in &failed.bad_peers {
        if !c.strike.iter().any(|(p, _)| p == peer) {
            c.strike.push((*peer, Offence::BadChunks));
        }
    }
    match failed.failure {
        Failure::Unavailable
        | Failure::Unauthorized
        | Failure::Local
        | Failure::Aborted
        | Failure::Undecided => {
            c.cool_down.push(key);
        }
        Failure::Content | Failure::NotTheChain => {
            c.cool_down.push(key);
            c.delete.push(key.content_root);
            let offence = if failed.failure == Failure::Content {
                Offence::FalseAdvert { slot: key.slot }
            } else {
                c.refused = Some((key.slot, key.bank_hash));
                Offence::NotTheChain { slot: key.slot }
            };
            if let Some(entry) = book.entry(&key) {
                let mut liars: Vec<PeerId> = entry.peers.iter().copied().collect();
                liars.sort();
                for peer in liars {
                    if !c.strike.iter().any(|(p, _)| *p == peer) {
                        c.strike.push((peer, offence));
                    }
                }
            }
        }
        // An incremental alone that does not apply: the node's state is not on its base.
        // (With its full snapshot, the state is the full one's: then the incremental lies.)
        Failure::NotOnBase if plan.full.is_none() => c.not_on = key.base,
        Failure::NotOnBase => {
            return judge(
                plan,
                &SyncFailure {
                    failure: Failure::Content,
                    ..failed.clone()
                },
                book,
            );
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::chunk::ChunkSize;
    use crate::discovery::book::Standing;
    use crate::discovery::decide::Target;
    use crate::discovery::message::{Advert, SnapshotAd};
    use crate::discovery::policy::TrustPolicy;
    use crate::hash::BankHash;
    use crate::snapshot::SnapshotKind;

    fn ad(kind: SnapshotKind, slot: u64, base: Option<Base>) -> SnapshotAd {
        SnapshotAd {
            key: SnapshotKey {
                kind,
                slot,
                bank_hash: BankHash([slot as u8; 32]),
                content_root: ContentRoot([slot as u8; 32]),
                archive_size: 100,
                base,
            },
            chunk_size: ChunkSize::DEFAULT,
            entry_count: 1,
            state_bytes: 10,
        }
    }

    fn target(ad: SnapshotAd) -> Target {
        Target {
            ad,
            counts_vouched: true,
            vouched: false,
            peers: Vec::new(),
            partial_peers: Vec::new(),
            attestations: Vec::new(),
        }
    }

    /// A plan of a full snapshot at 100 and an incremental one at 150 on it, both advertised
    /// by `holders`.
    fn setup(holders: &[PeerId], with_full: bool) -> (Plan, AdvertBook) {
        let full = ad(SnapshotKind::Full, 100, None);
        let inc = ad(SnapshotKind::Incremental, 150, Some(Base::of(&full.key)));
        let mut book = AdvertBook::new(16, "n", &TrustPolicy::default());
        for p in holders {
            book.insert(
                Advert {
                    attestations: Vec::new(),
                    peer: *p,
                    snapshots: vec![inc, full],
                    partial: Vec::new(),
                    partial_attestations: Vec::new(),
                    streamer_addrs: vec!["127.0.0.1:1".parse().unwrap()],
                    holder_slot: None,
                    modified_time: 0,
                },
                Standing::Answered,
                Instant::now(),
                &TrustPolicy::default(),
            );
        }
        let plan = Plan {
            full: with_full.then(|| target(full)),
            incremental: Some(target(inc)),
        };
        (plan, book)
    }

    fn failure(leg: LegKind, failure: Failure, bad_peers: Vec<PeerId>) -> SyncFailure {
        SyncFailure {
            leg,
            failure,
            bad_peers,
        }
    }

    #[test]
    fn a_snapshot_nobody_could_serve_is_cooled_down_and_nobody_is_struck() {
        let holders = [PeerId::random(), PeerId::random()];
        let (plan, book) = setup(&holders, true);
        let c = judge(
            &plan,
            &failure(LegKind::Full, Failure::Unavailable, vec![]),
            &book,
        );
        assert_eq!(c.cool_down, vec![plan.full.as_ref().unwrap().ad.key]);
        assert!(c.strike.is_empty() && c.delete.is_empty() && c.not_on.is_none());
    }

    #[test]
    fn only_peers_whose_chunks_were_proven_bad_are_struck() {
        let holders = [PeerId::random(), PeerId::random(), PeerId::random()];
        let (plan, book) = setup(&holders, true);
        let bad = holders[1];
        let c = judge(
            &plan,
            &failure(LegKind::Incremental, Failure::Unavailable, vec![bad, bad]),
            &book,
        );
        assert_eq!(c.strike, vec![(bad, Offence::BadChunks)]);
        assert_eq!(c.cool_down, vec![plan.last().ad.key]);
    }

    #[test]
    fn a_local_failure_blames_nobody() {
        let holders = [PeerId::random()];
        let (plan, book) = setup(&holders, false);
        for f in [Failure::Local, Failure::Aborted, Failure::Unauthorized] {
            let c = judge(&plan, &failure(LegKind::Incremental, f, vec![]), &book);
            assert!(c.strike.is_empty(), "{f:?}");
            assert!(c.delete.is_empty(), "{f:?}");
        }
    }

    #[test]
    fn content_that_contradicts_its_key_strikes_its_advertisers_and_is_deleted() {
        let holders = [PeerId::random(), PeerId::random()];
        let (plan, book) = setup(&holders, true);
        let full = plan.full.as_ref().unwrap().ad.key;
        let c = judge(
            &plan,
            &failure(LegKind::Full, Failure::Content, vec![]),
            &book,
        );
        assert_eq!(c.cool_down, vec![full]);
        assert_eq!(c.delete, vec![full.content_root]);
        let mut struck: Vec<PeerId> = c.strike.iter().map(|(p, _)| *p).collect();
        struck.sort();
        let mut want = holders.to_vec();
        want.sort();
        assert_eq!(struck, want);
        assert!(
            c.strike
                .iter()
                .all(|(_, o)| *o == Offence::FalseAdvert { slot: 100 })
        );
    }

    #[test]
    fn a_state_the_applications_check_refuses_strikes_its_advertisers_and_is_deleted() {
        let holders = [PeerId::random(), PeerId::random()];
        let (plan, book) = setup(&holders, true);
        let inc = plan.last().ad.key;
        let c = judge(
            &plan,
            &failure(LegKind::Incremental, Failure::NotTheChain, vec![]),
            &book,
        );
        assert_eq!(c.cool_down, vec![inc]);
        assert_eq!(c.delete, vec![inc.content_root]);
        assert_eq!(c.strike.len(), 2);
        assert!(
            c.strike
                .iter()
                .all(|(p, o)| holders.contains(p) && *o == Offence::NotTheChain { slot: 150 })
        );
        assert!(c.not_on.is_none());
        assert_eq!(
            c.refused,
            Some((inc.slot, inc.bank_hash)),
            "refused for good"
        );
    }

    #[test]
    fn a_state_the_applications_check_cannot_judge_is_cooled_down_and_blames_nobody() {
        let holders = [PeerId::random()];
        let (plan, book) = setup(&holders, true);
        let c = judge(
            &plan,
            &failure(LegKind::Full, Failure::Undecided, vec![]),
            &book,
        );
        assert_eq!(c.cool_down, vec![plan.full.as_ref().unwrap().ad.key]);
        assert!(c.strike.is_empty() && c.delete.is_empty() && c.not_on.is_none());
    }

    #[test]
    fn an_incremental_that_does_not_apply_to_the_state_marks_its_base_and_is_not_cooled_down() {
        let holders = [PeerId::random()];
        let (plan, book) = setup(&holders, false);
        let c = judge(
            &plan,
            &failure(LegKind::Incremental, Failure::NotOnBase, vec![]),
            &book,
        );
        assert_eq!(c.not_on, plan.last().ad.key.base);
        assert!(c.cool_down.is_empty() && c.strike.is_empty() && c.delete.is_empty());
    }

    #[test]
    fn an_incremental_that_does_not_apply_to_its_own_full_snapshot_lies() {
        let holders = [PeerId::random()];
        let (plan, book) = setup(&holders, true);
        let c = judge(
            &plan,
            &failure(LegKind::Incremental, Failure::NotOnBase, vec![]),
            &book,
        );
        assert_eq!(c.not_on, None);
        assert_eq!(c.delete, vec![plan.last().ad.key.content_root]);
        assert_eq!(c.strike.len(), 1);
    }
}
