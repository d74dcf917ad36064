//! Which snapshots to take: a pure function of what peers advertise, the node's slot, the trust
//! policy and what failed lately.
//!
//! - Only snapshots the policy accepts are candidates, and of those only ones newer than the
//!   node's state and not failed lately.
//! - A full snapshot is taken alone. An incremental one is taken alone when the node's state is
//!   at or past its base (and has not proven not to descend from it); otherwise with its base,
//!   which some peer must advertise.
//! - The highest resulting slot wins; then the cheaper path (an incremental alone), then the
//!   more peers, then the lowest content root, so every node settles ties alike.
//! - Peers that advertise different bank hashes for one slot are reported.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;

use libp2p::PeerId;

use super::book::AdvertBook;
use super::message::SnapshotAd;
use super::policy::TrustPolicy;
use crate::chunk::ChunkSize;
use crate::hash::{BankHash, ContentRoot};
use crate::snapshot::{Base, SnapshotKey};

/// Peers that advertise different snapshots (bank hashes) for the same slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// The slot.
    pub slot: u64,
    /// Each snapshot advertised for it, with who advertised it, most advertised first.
    pub variants: Vec<(BankHash, ContentRoot, Vec<PeerId>)>,
}

/// A snapshot to fetch and the peers to fetch it from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    /// The snapshot.
    pub ad: SnapshotAd,
    /// Peers advertising it in the chunk size most of them serve, with their chunk-stream
    /// addresses.
    pub peers: Vec<(PeerId, Vec<SocketAddr>)>,
}

/// What to fetch: a full snapshot, an incremental one, or a full one and an incremental one on
/// it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Plan {
    /// The full snapshot to fetch, if any.
    pub full: Option<Target>,
    /// The incremental snapshot to fetch, if any.
    pub incremental: Option<Target>,
}

impl Plan {
    /// The snapshot the node ends at.
    pub(crate) fn last(&self) -> &Target {
        self.incremental
            .as_ref()
            .or(self.full.as_ref())
            .expect("a plan fetches something")
    }

    /// Bytes to fetch, at most (resumed bytes aside).
    pub(crate) fn bytes(&self) -> u64 {
        self.full
            .iter()
            .chain(&self.incremental)
            .map(|t| t.ad.key.archive_size)
            .sum()
    }

    /// Whether `key` is one of the plan's snapshots.
    pub(crate) fn fetches(&self, key: &SnapshotKey) -> bool {
        self.full
            .iter()
            .chain(&self.incremental)
            .any(|t| t.ad.key == *key)
    }
}

/// What was chosen, and the conflicts seen on the way.
#[derive(Debug, Clone, Default)]
pub(crate) struct Choice {
    pub(crate) plan: Option<Plan>,
    pub(crate) conflicts: Vec<Conflict>,
}

/// Most conflicts reported per decision (a flood of forgeries reports a few).
const MAX_CONFLICTS: usize = 4;

/// What the node knows of its own state, for a decision.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct LocalState {
    pub(crate) slot: Option<u64>,
    /// A full snapshot the node's state proved not to descend from (an incremental on it failed
    /// to apply): incrementals on it are taken with it.
    pub(crate) not_on: Option<Base>,
}

fn target(book: &AdvertBook, key: &SnapshotKey) -> Option<Target> {
    let entry = book.entry(key)?;
    let mut by_size: HashMap<ChunkSize, Vec<(PeerId, &SnapshotAd)>> = HashMap::new();
    for peer in &entry.peers {
        if let Some(ad) = book.ad_of(peer, key) {
            by_size.entry(ad.chunk_size).or_default().push((*peer, ad));
        }
    }
    let (_, mut chosen) = by_size
        .into_iter()
        .max_by_key(|(size, peers)| (peers.len(), std::cmp::Reverse(*size)))?;
    chosen.sort_by_key(|(p, _)| *p);
    let ad = *chosen[0].1;
    Some(Target {
        ad,
        peers: chosen.iter().map(|(p, _)| (*p, book.addrs(p))).collect(),
    })
}

/// How a candidate plan ranks: newest slot, then on the node's own state, then most peers,
/// then the smallest content root (so that every node breaks ties the same way).
type Rank = (u64, bool, usize, std::cmp::Reverse<ContentRoot>);

/// Chooses what to fetch (see the module docs).
pub(crate) fn decide(
    book: &AdvertBook,
    local: LocalState,
    policy: &TrustPolicy,
    failed: &dyn Fn(&SnapshotKey) -> bool,
) -> Choice {
    let conflicts = conflicts(book);
    let mut best: Option<(Plan, Rank)> = None;
    for (key, entry) in book.keys() {
        if local.slot.is_some_and(|s| key.slot <= s)
            || failed(key)
            || !policy.accepts(key, entry.peers.len(), entry.trusted)
        {
            continue;
        }
        let plan = match key.base {
            None => target(book, key).map(|t| Plan {
                full: Some(t),
                incremental: None,
            }),
            Some(base) => {
                let alone =
                    local.slot.is_some_and(|s| s >= base.slot) && local.not_on != Some(base);
                let full = if alone {
                    None
                } else {
                    let full_key = book.fulls_named(&base).find(|k| !failed(k));
                    match full_key.and_then(|k| target(book, k)) {
                        Some(t) => Some(t),
                        // Its base is needed and nobody offers it.
                        None => continue,
                    }
                };
                target(book, key).map(|t| Plan {
                    full,
                    incremental: Some(t),
                })
            }
        };
        let Some(plan) = plan else { continue };
        let rank = (
            key.slot,
            plan.full.is_none(),
            entry.peers.len(),
            std::cmp::Reverse(key.content_root),
        );
        if best.as_ref().is_none_or(|(_, r)| rank > *r) {
            best = Some((plan, rank));
        }
    }
    Choice {
        plan: best.map(|(p, _)| p),
        conflicts,
    }
}

/// Slots for which peers advertise different bank hashes.
fn conflicts(book: &AdvertBook) -> Vec<Conflict> {
    let mut by_slot: BTreeMap<u64, BTreeMap<(BankHash, ContentRoot), Vec<PeerId>>> =
        BTreeMap::new();
    for (key, entry) in book.keys() {
        let v = by_slot
            .entry(key.slot)
            .or_default()
            .entry((key.bank_hash, key.content_root))
            .or_default();
        v.extend(entry.peers.iter().copied());
    }
    by_slot
        .into_iter()
        .rev()
        .filter(|(_, variants)| {
            let mut hashes: Vec<&BankHash> = variants.keys().map(|(h, _)| h).collect();
            hashes.dedup();
            hashes.len() > 1
        })
        .take(MAX_CONFLICTS)
        .map(|(slot, variants)| {
            let mut variants: Vec<_> = variants
                .into_iter()
                .map(|((h, r), mut peers)| {
                    peers.sort();
                    peers.dedup();
                    (h, r, peers)
                })
                .collect();
            variants.sort_by_key(|v| std::cmp::Reverse(v.2.len()));
            Conflict { slot, variants }
        })
        .collect()
}

#[cfg(test)]
mod tests;
