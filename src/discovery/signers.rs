//! [`Signers`]: which attestations carried in adverts are trusted signers' valid signatures.
//!
//! Only attestations whose key the policy names are verified at all (a lookup of the key's
//! bytes, no cryptography, rules out the rest: identities are free, and so are keys), and each
//! (snapshot, attestation) at most once: the verdicts are kept.

use std::collections::HashMap;
use std::num::NonZeroUsize;

use libp2p::PeerId;
use lru::LruCache;

use super::message::Advert;
use super::policy::TrustPolicy;
use crate::snapshot::{Attestation, SnapshotKey, ed25519_key_of};

/// Most valid signatures remembered. A trusted signer attests a few snapshots per interval; the
/// cache holds hours of them for a validator set of hundreds.
const MAX_CHECKED: usize = 16_384;

/// Most invalid signatures remembered, apart (junk cannot push out the valid ones).
const MAX_INVALID: usize = 1024;

/// Invalid signatures of trusted keys one list (an advert's, a download's) is checked for
/// before the rest of it is ignored: forging costs the sender nothing, checking costs this node
/// a signature verification each.
pub(crate) const MAX_INVALID_CHECKED: usize = 2;

/// Where in an advert a snapshot is listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Listed {
    /// `snapshots[i]`: the advertiser holds it.
    Held(usize),
    /// `partial[i]`: the advertiser downloads it.
    Partial(usize),
}

impl Listed {
    /// The attestations `advert` carries with the snapshot listed here.
    pub(crate) fn attestations(self, advert: &Advert) -> &[Attestation] {
        match self {
            Self::Held(i) => advert.attestations_of(i),
            Self::Partial(i) => advert.partial_attestations_of(i),
        }
    }
}

/// A trusted signer's valid attestation of one of the snapshots an advert lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Signed {
    /// The snapshot.
    pub(crate) key: SnapshotKey,
    /// Who signed it.
    pub(crate) signer: PeerId,
    /// Where the attestation is: where the snapshot is listed, its place in the list there.
    pub(crate) at: (Listed, usize),
}

/// The trusted keys and the verdicts on their signatures.
#[derive(Debug, Clone)]
pub(crate) struct Signers {
    network: String,
    /// The ed25519 keys of the policy's trusted peers.
    keys: HashMap<[u8; 32], PeerId>,
    valid: LruCache<(SnapshotKey, Attestation), ()>,
    invalid: LruCache<(SnapshotKey, Attestation), ()>,
    /// Signatures verified (for tests).
    #[cfg(test)]
    verified: u64,
}

impl Signers {
    /// Signers of `policy`'s trusted peers, checked for `network`.
    pub(crate) fn new(network: &str, policy: &TrustPolicy) -> Self {
        let mut s = Self {
            network: network.to_string(),
            keys: HashMap::new(),
            valid: LruCache::new(NonZeroUsize::new(MAX_CHECKED).expect("nonzero")),
            invalid: LruCache::new(NonZeroUsize::new(MAX_INVALID).expect("nonzero")),
            #[cfg(test)]
            verified: 0,
        };
        s.set_policy(policy);
        s
    }

    /// The policy changed: its trusted peers' keys are the ones counted now (verdicts on
    /// signatures stay true).
    pub(crate) fn set_policy(&mut self, policy: &TrustPolicy) {
        self.keys = policy
            .attesters()
            .iter()
            .filter_map(|p| Some((ed25519_key_of(p)?, *p)))
            .collect();
    }

    /// The trusted peer `a` names as its signer, if it names one (nothing is verified).
    pub(crate) fn named(&self, a: &Attestation) -> Option<PeerId> {
        self.keys.get(a.signer_key()).copied()
    }

    /// The trusted peer whose valid attestation of `key` `a` is, if it is one.
    pub(crate) fn trusted_signer(&mut self, key: &SnapshotKey, a: &Attestation) -> Option<PeerId> {
        let signer = self.named(a)?;
        let id = (*key, a.clone());
        if self.valid.get(&id).is_some() {
            return Some(signer);
        }
        if self.invalid.get(&id).is_some() {
            return None;
        }
        #[cfg(test)]
        {
            self.verified += 1;
        }
        if a.verify(&self.network, key) {
            self.valid.put(id, ());
            Some(signer)
        } else {
            self.invalid.put(id, ());
            None
        }
    }

    /// The trusted signers of each snapshot `advert` lists (held or partly held), each once
    /// per snapshot. Of the attestations naming one trusted key for one snapshot, only the first
    /// is checked; after [`MAX_INVALID_CHECKED`] invalid ones, none.
    pub(crate) fn of_advert(&mut self, advert: &Advert) -> Vec<Signed> {
        let listed = (advert.snapshots.iter().enumerate())
            .map(|(i, s)| (s.key, Listed::Held(i)))
            .chain(
                (advert.partial.iter().enumerate()).map(|(i, p)| (p.ad.key, Listed::Partial(i))),
            );
        let mut out: Vec<Signed> = Vec::new();
        let mut tried: Vec<(SnapshotKey, [u8; 32])> = Vec::new();
        let mut invalid = 0;
        for (key, place) in listed {
            for (j, a) in place.attestations(advert).iter().enumerate() {
                if !self.keys.contains_key(a.signer_key())
                    || tried.contains(&(key, *a.signer_key()))
                {
                    continue;
                }
                if invalid >= MAX_INVALID_CHECKED {
                    return out;
                }
                tried.push((key, *a.signer_key()));
                match self.trusted_signer(&key, a) {
                    Some(signer) => out.push(Signed {
                        key,
                        signer,
                        at: (place, j),
                    }),
                    None => invalid += 1,
                }
            }
        }
        out
    }

    /// How many signatures were verified so far.
    #[cfg(test)]
    pub(crate) fn verified(&self) -> u64 {
        self.verified
    }
}

#[cfg(test)]
mod tests {
    use libp2p::identity::Keypair;

    use super::*;
    use crate::discovery::SnapshotAd;

    #[test]
    fn an_advert_is_checked_for_two_forged_signatures_of_trusted_keys_at_most() {
        let keys: Vec<Keypair> = (0..4).map(|_| Keypair::generate_ed25519()).collect();
        let policy = TrustPolicy::TrustedPeers {
            peers: keys.iter().map(|k| k.public().to_peer_id()).collect(),
            quorum: 1,
        };
        let mut signers = Signers::new("n", &policy);
        let ad = |slot: u64| SnapshotAd {
            key: SnapshotKey {
                kind: crate::snapshot::SnapshotKind::Full,
                slot,
                bank_hash: crate::hash::BankHash([1; 32]),
                content_root: crate::hash::ContentRoot([2; 32]),
                archive_size: 10,
                base: None,
            },
            chunk_size: crate::chunk::ChunkSize::DEFAULT,
            entry_count: 1,
            state_bytes: 1,
        };
        let (held, other) = (ad(10), ad(11));
        // Signatures of another snapshot, under three trusted keys, then a valid one.
        let mut list: Vec<Attestation> = keys[..3]
            .iter()
            .map(|k| Attestation::sign(k, "n", &other.key).unwrap())
            .collect();
        list.push(Attestation::sign(&keys[3], "n", &held.key).unwrap());
        let advert = Advert {
            peer: PeerId::random(),
            snapshots: vec![held],
            partial: Vec::new(),
            streamer_addrs: Vec::new(),
            holder_slot: None,
            modified_time: 0,
            attestations: vec![list.clone()],
            partial_attestations: Vec::new(),
        };
        assert!(signers.of_advert(&advert).is_empty());
        assert_eq!(signers.verified(), 2);
        // The valid one, carried first, counts.
        list.rotate_right(1);
        let advert = Advert {
            attestations: vec![list],
            ..advert
        };
        let signed = signers.of_advert(&advert);
        assert_eq!(signed.len(), 1);
        assert_eq!(signed[0].signer, keys[3].public().to_peer_id());
    }
}
