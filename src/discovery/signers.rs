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

/// Most verdicts kept. A trusted signer attests a few snapshots per interval; the cache holds
/// hours of them for a validator set of hundreds.
const MAX_CHECKED: usize = 16_384;

/// The trusted keys and the verdicts on their signatures.
#[derive(Debug, Clone)]
pub(crate) struct Signers {
    network: String,
    /// The ed25519 keys of the policy's trusted peers.
    keys: HashMap<[u8; 32], PeerId>,
    checked: LruCache<(SnapshotKey, Attestation), bool>,
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
            checked: LruCache::new(NonZeroUsize::new(MAX_CHECKED).expect("nonzero")),
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
        if let Some(valid) = self.checked.get(&id) {
            return valid.then_some(signer);
        }
        #[cfg(test)]
        {
            self.verified += 1;
        }
        let valid = a.verify(&self.network, key);
        self.checked.put(id, valid);
        valid.then_some(signer)
    }

    /// The trusted signers of each snapshot `advert` lists, each once per snapshot, with the
    /// index of their attestation in its list.
    pub(crate) fn of_advert(&mut self, advert: &Advert) -> Vec<(SnapshotKey, PeerId, usize)> {
        let mut out: Vec<(SnapshotKey, PeerId, usize)> = Vec::new();
        for (i, s) in advert.snapshots.iter().enumerate() {
            for (j, a) in advert.attestations_of(i).iter().enumerate() {
                if let Some(signer) = self.trusted_signer(&s.key, a)
                    && !out.iter().any(|(k, p, _)| *k == s.key && *p == signer)
                {
                    out.push((s.key, signer, j));
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
