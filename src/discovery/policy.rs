//! [`TrustPolicy`]: which snapshots a node may take, and what each mode protects against.
//!
//! Identities are free, so counting peers protects against a few liars, not against one
//! attacker with many identities. A policy is applied to every advertisement as it arrives: a
//! snapshot the policy does not accept moves nothing (not the best known slot, not the choice),
//! and a node never loads one.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use libp2p::PeerId;

use crate::config_error::ConfigError;
use crate::hash::{BankHash, ContentRoot};
use crate::snapshot::SnapshotKey;

/// Checks a snapshot's (slot, bank hash) against the node's own knowledge of its chain: its
/// finalized headers, a light client, a checkpoint. Implemented by the node's owner.
pub trait SnapshotVerifier: Send + Sync + fmt::Debug {
    /// Whether the state at `slot` has bank hash `bank_hash` on the node's chain. A verifier
    /// that cannot tell yet says `false`; the snapshot is asked about again later.
    fn verify(&self, slot: u64, bank_hash: &BankHash) -> bool;

    /// The peers whose [`Attestation`](crate::snapshot::Attestation)s the verifier wants to be
    /// shown (a chain's validator set, say): read when the policy is set (again by
    /// [`Behaviour::set_trust`](crate::Behaviour::set_trust) when the set changes). Only their
    /// signatures are ever verified. None by default.
    fn attesters(&self) -> Vec<PeerId> {
        Vec::new()
    }

    /// [`SnapshotVerifier::verify`], shown `signers`: those of
    /// [`SnapshotVerifier::attesters`] whose valid attestation of the snapshot an advert
    /// carries (for a stake-weighted quorum, say). By default the signers are not looked at.
    fn verify_attested(&self, slot: u64, bank_hash: &BankHash, signers: &[PeerId]) -> bool {
        let _ = signers;
        self.verify(slot, bank_hash)
    }
}

/// Which snapshots a node accepts.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum TrustPolicy {
    /// A snapshot that at least this many distinct peers advertise, alike.
    ///
    /// Protects against fewer liars than that, and nothing more: an attacker with that many
    /// identities is believed. For test networks and networks of known, honest operators;
    /// the behaviour logs a warning when it starts in this mode, as it does for a missing token.
    Untrusted {
        /// Distinct peers that must advertise the same snapshot.
        min_agreeing_peers: usize,
    },
    /// A snapshot that at least `quorum` of these peers advertise, alike: the validator-set
    /// case. Other peers may serve it, but never choose it.
    ///
    /// Protects against any number of other identities, and against fewer than `quorum` of
    /// the trusted ones lying or being taken over.
    TrustedPeers {
        /// The trusted peers.
        peers: HashSet<PeerId>,
        /// How many of them must advertise the same snapshot.
        quorum: usize,
    },
    /// Only this snapshot: a slot and bank hash (and, when given, the content root) known from
    /// elsewhere, as a checkpoint. An incremental snapshot with this hash is taken with the
    /// full snapshot it names as its base; the state they give is checked against the hash
    /// before anything becomes live.
    ///
    /// Protects against everyone: only the pinned state is ever loaded.
    TrustedSnapshot {
        /// Its slot.
        slot: u64,
        /// Its bank hash.
        bank_hash: BankHash,
        /// Its content root, pinning the archive bytes too.
        content_root: Option<ContentRoot>,
    },
    /// A snapshot the owner's [`SnapshotVerifier`] accepts (checked against the node's own
    /// view of its chain).
    ///
    /// Protects as well as the verifier does.
    Verifier(Arc<dyn SnapshotVerifier>),
}

/// Most verdicts [`Verdicts`] keeps.
const MAX_VERDICTS: usize = 4096;

/// The owner's verifier, asked once per snapshot and set of signers: its acceptances are kept
/// (a state it found on its chain stays there), its refusals until the next round (it may not
/// know yet, or more signers may come). Adverts arrive by the thousand; the verifier may read a
/// light client or a DB.
#[derive(Debug)]
pub(crate) struct Verdicts {
    inner: Arc<dyn SnapshotVerifier>,
    kept: std::sync::Mutex<Kept>,
}

/// What [`Verdicts`] keeps.
#[derive(Debug)]
struct Kept {
    accepted: lru::LruCache<(u64, BankHash), ()>,
    refused: lru::LruCache<(u64, BankHash, Vec<PeerId>), ()>,
}

impl Verdicts {
    /// `policy` with its verifier, if it has one, asked through a cache; and the cache.
    pub(crate) fn wrap(policy: TrustPolicy) -> (TrustPolicy, Option<Arc<Verdicts>>) {
        match policy {
            TrustPolicy::Verifier(inner) => {
                let cap = std::num::NonZeroUsize::new(MAX_VERDICTS).expect("nonzero");
                let cache = Arc::new(Verdicts {
                    inner,
                    kept: std::sync::Mutex::new(Kept {
                        accepted: lru::LruCache::new(cap),
                        refused: lru::LruCache::new(cap),
                    }),
                });
                (TrustPolicy::Verifier(cache.clone()), Some(cache))
            }
            other => (other, None),
        }
    }

    /// Forgets the refusals: the verifier is asked about them again.
    pub(crate) fn forget_refusals(&self) {
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        kept.refused.clear();
    }
}

impl SnapshotVerifier for Verdicts {
    fn verify(&self, slot: u64, bank_hash: &BankHash) -> bool {
        self.verify_attested(slot, bank_hash, &[])
    }

    fn attesters(&self) -> Vec<PeerId> {
        self.inner.attesters()
    }

    fn verify_attested(&self, slot: u64, bank_hash: &BankHash, signers: &[PeerId]) -> bool {
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        if kept.accepted.get(&(slot, *bank_hash)).is_some() {
            return true;
        }
        let asked = (slot, *bank_hash, signers.to_vec());
        if kept.refused.get(&asked).is_some() {
            return false;
        }
        let v = self.inner.verify_attested(slot, bank_hash, signers);
        if v {
            kept.accepted.put((slot, *bank_hash), ());
        } else {
            kept.refused.put(asked, ());
        }
        v
    }
}

impl Default for TrustPolicy {
    fn default() -> Self {
        TrustPolicy::Untrusted {
            min_agreeing_peers: 1,
        }
    }
}

impl TrustPolicy {
    /// Checks the values.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match self {
            TrustPolicy::Untrusted { min_agreeing_peers } => {
                ConfigError::nonzero("trust.min_agreeing_peers", *min_agreeing_peers as u64)
            }
            TrustPolicy::TrustedPeers { peers, quorum } => {
                if *quorum == 0 || *quorum > peers.len() {
                    return Err(ConfigError::new(
                        "trust.quorum",
                        "between 1 and the number of trusted peers",
                        format!("{quorum} of {} peers", peers.len()),
                    ));
                }
                Ok(())
            }
            TrustPolicy::TrustedSnapshot { .. } | TrustPolicy::Verifier(_) => Ok(()),
        }
    }

    /// Whether this policy trusts anyone at all blindly: the untrusted mode.
    pub fn is_untrusted(&self) -> bool {
        matches!(self, TrustPolicy::Untrusted { .. })
    }

    /// Whether `peer` is one of the trusted peers.
    pub(crate) fn trusts(&self, peer: &PeerId) -> bool {
        matches!(self, TrustPolicy::TrustedPeers { peers, .. } if peers.contains(peer))
    }

    /// Whether the snapshot `key`, advertised by `peers` of which `trusted` are trusted peers
    /// (or attested it), its valid attestations signed by `signers` (the keys the policy
    /// names), is accepted.
    pub(crate) fn accepts(
        &self,
        key: &SnapshotKey,
        peers: usize,
        trusted: usize,
        signers: &[PeerId],
    ) -> bool {
        match self {
            TrustPolicy::Untrusted { min_agreeing_peers } => peers >= (*min_agreeing_peers).max(1),
            TrustPolicy::TrustedPeers { quorum, .. } => trusted >= (*quorum).max(1),
            TrustPolicy::TrustedSnapshot {
                slot,
                bank_hash,
                content_root,
            } => {
                key.slot == *slot
                    && key.bank_hash == *bank_hash
                    && content_root.is_none_or(|r| r == key.content_root)
            }
            TrustPolicy::Verifier(v) => v.verify_attested(key.slot, &key.bank_hash, signers),
        }
    }

    /// The peers whose attestations count for this policy: the trusted peers, or those the
    /// verifier names.
    pub(crate) fn attesters(&self) -> Vec<PeerId> {
        match self {
            TrustPolicy::TrustedPeers { peers, .. } => peers.iter().copied().collect(),
            TrustPolicy::Verifier(v) => v.attesters(),
            TrustPolicy::Untrusted { .. } | TrustPolicy::TrustedSnapshot { .. } => Vec::new(),
        }
    }

    /// Whether the policy accepts `key` whoever advertises it: a pinned snapshot, one the
    /// owner's verifier accepts.
    pub(crate) fn accepts_alone(&self, key: &SnapshotKey) -> bool {
        match self {
            TrustPolicy::TrustedSnapshot { .. } | TrustPolicy::Verifier(_) => {
                self.accepts(key, 0, 0, &[])
            }
            TrustPolicy::Untrusted { .. } | TrustPolicy::TrustedPeers { .. } => false,
        }
    }

    /// How much the advertisers of a snapshot weigh for this policy when snapshots of one slot
    /// compete: distinct peers when untrusted, trusted peers when trusted, nothing for a
    /// pinned snapshot or a verifier (identities are free).
    pub(crate) fn weight(&self, peers: usize, trusted: usize) -> usize {
        match self {
            TrustPolicy::Untrusted { .. } => peers,
            TrustPolicy::TrustedPeers { .. } => trusted,
            TrustPolicy::TrustedSnapshot { .. } | TrustPolicy::Verifier(_) => 0,
        }
    }

    /// Whether `peers` agreeing on what an advert says beyond the key (of which `trusted` are
    /// trusted) is as much as the policy needs to believe it: what it needs for the key itself.
    /// A pinned snapshot or a verifier vouch for the key alone.
    pub(crate) fn vouches_counts(&self, peers: usize, trusted: usize) -> bool {
        match self {
            TrustPolicy::Untrusted { min_agreeing_peers } => peers >= (*min_agreeing_peers).max(1),
            TrustPolicy::TrustedPeers { quorum, .. } => trusted >= (*quorum).max(1),
            TrustPolicy::TrustedSnapshot { .. } | TrustPolicy::Verifier(_) => false,
        }
    }

    /// Whether the policy vouches for `key`'s root and size themselves, `trusted` trusted
    /// peers advertising it: trusted peers in quorum, or a pinned root. Counting free
    /// identities vouches for nothing, and a pinned bank hash or a verifier vouch for the
    /// state, not for which archive claims to hold it.
    pub(crate) fn vouches_root(&self, key: &SnapshotKey, trusted: usize) -> bool {
        match self {
            TrustPolicy::TrustedPeers { quorum, .. } => trusted >= (*quorum).max(1),
            TrustPolicy::TrustedSnapshot { content_root, .. } => {
                content_root.is_some_and(|r| r == key.content_root)
            }
            TrustPolicy::Untrusted { .. } | TrustPolicy::Verifier(_) => false,
        }
    }

    /// Words for the log line at start.
    pub(crate) fn describe(&self) -> String {
        match self {
            TrustPolicy::Untrusted { min_agreeing_peers } => {
                format!("untrusted: {min_agreeing_peers} agreeing peer(s)")
            }
            TrustPolicy::TrustedPeers { peers, quorum } => {
                format!("trusted peers: {quorum} of {}", peers.len())
            }
            TrustPolicy::TrustedSnapshot {
                slot, bank_hash, ..
            } => {
                format!(
                    "trusted snapshot: slot {slot}, bank hash {}",
                    bank_hash.short()
                )
            }
            TrustPolicy::Verifier(_) => "the owner's verifier".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::SnapshotKind;

    fn key(slot: u64, hash: u8) -> SnapshotKey {
        SnapshotKey {
            kind: SnapshotKind::Full,
            slot,
            bank_hash: BankHash([hash; 32]),
            content_root: ContentRoot([hash; 32]),
            archive_size: 10,
            base: None,
        }
    }

    #[derive(Debug)]
    struct Chain;

    impl SnapshotVerifier for Chain {
        fn verify(&self, slot: u64, bank_hash: &BankHash) -> bool {
            slot == 100 && *bank_hash == BankHash([1; 32])
        }
    }

    #[test]
    fn each_mode_accepts_what_it_says() {
        let k = key(100, 1);
        let untrusted = TrustPolicy::Untrusted {
            min_agreeing_peers: 2,
        };
        assert!(!untrusted.accepts(&k, 1, 0, &[]));
        assert!(untrusted.accepts(&k, 2, 0, &[]));
        let a = PeerId::random();
        let trusted = TrustPolicy::TrustedPeers {
            peers: [a, PeerId::random(), PeerId::random()].into(),
            quorum: 2,
        };
        assert!(trusted.trusts(&a) && !trusted.trusts(&PeerId::random()));
        assert!(
            !trusted.accepts(&k, 50, 1, &[]),
            "many untrusted identities do not count"
        );
        assert!(trusted.accepts(&k, 2, 2, &[]));
        let pinned = TrustPolicy::TrustedSnapshot {
            slot: 100,
            bank_hash: BankHash([1; 32]),
            content_root: Some(ContentRoot([9; 32])),
        };
        assert!(!pinned.accepts(&k, 9, 9, &[]), "the root is pinned too");
        let pinned_hash = TrustPolicy::TrustedSnapshot {
            slot: 100,
            bank_hash: BankHash([1; 32]),
            content_root: None,
        };
        assert!(pinned_hash.accepts(&k, 1, 0, &[]));
        assert!(!pinned_hash.accepts(&key(101, 1), 1, 0, &[]));
        let verified = TrustPolicy::Verifier(Arc::new(Chain));
        assert!(verified.accepts(&k, 1, 0, &[]));
        assert!(!verified.accepts(&key(100, 2), 100, 100, &[]));
    }

    #[test]
    fn only_trusted_peers_or_a_pinned_root_vouch_for_an_archive() {
        let k = key(100, 1);
        let untrusted = TrustPolicy::Untrusted {
            min_agreeing_peers: 3,
        };
        assert!(!untrusted.vouches_root(&k, 100));
        let peers = TrustPolicy::TrustedPeers {
            peers: [PeerId::random(), PeerId::random()].into(),
            quorum: 2,
        };
        assert!(!peers.vouches_root(&k, 1));
        assert!(peers.vouches_root(&k, 2));
        let pin = |content_root| TrustPolicy::TrustedSnapshot {
            slot: 100,
            bank_hash: BankHash([1; 32]),
            content_root,
        };
        assert!(pin(Some(k.content_root)).vouches_root(&k, 0));
        assert!(!pin(Some(ContentRoot([9; 32]))).vouches_root(&k, 0));
        assert!(!pin(None).vouches_root(&k, 0), "the state, not the archive");
        assert!(!TrustPolicy::Verifier(Arc::new(Chain)).vouches_root(&k, 0));
    }

    #[test]
    fn impossible_quorums_are_refused() {
        let p = TrustPolicy::TrustedPeers {
            peers: [PeerId::random()].into(),
            quorum: 2,
        };
        assert!(p.validate().is_err());
        assert!(
            TrustPolicy::Untrusted {
                min_agreeing_peers: 0
            }
            .validate()
            .is_err()
        );
    }
}
