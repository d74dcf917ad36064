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

    /// The trusted peer whose valid attestation of `key` `a` is, if it is one.
    pub(crate) fn trusted_signer(&mut self, key: &SnapshotKey, a: &Attestation) -> Option<PeerId> {
        let signer = *self.keys.get(a.signer_key())?;
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
    /// is checked.
    pub(crate) fn of_advert(&mut self, advert: &Advert) -> Vec<Signed> {
        let listed = (advert.snapshots.iter().enumerate())
            .map(|(i, s)| (s.key, Listed::Held(i)))
            .chain(
                (advert.partial.iter().enumerate()).map(|(i, p)| (p.ad.key, Listed::Partial(i))),
            );
        let mut out: Vec<Signed> = Vec::new();
        let mut tried: Vec<(SnapshotKey, [u8; 32])> = Vec::new();
        for (key, place) in listed {
            for (j, a) in place.attestations(advert).iter().enumerate() {
                if !self.keys.contains_key(a.signer_key())
                    || tried.contains(&(key, *a.signer_key()))
                {
                    continue;
                }
                tried.push((key, *a.signer_key()));
                if let Some(signer) = self.trusted_signer(&key, a) {
                    out.push(Signed {
                        key,
                        signer,
                        at: (place, j),
                    });
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
