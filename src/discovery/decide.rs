//! Which snapshots to take: a pure function of what peers advertise, the node's slot, the trust
//! policy and what failed lately.
//!
//! - Only snapshots the policy accepts are candidates, and of those only ones newer than the
//!   node's state, not above what the chain's tip makes plausible, and not failed lately. A
//!   node that executes the chain and was not told it is behind takes only what a vouching
//!   policy accepts: its live state is never replaced on the word of untrusted peers.
//! - A full snapshot is taken alone. An incremental one is taken alone when the node's state is
//!   at or past its base (and has not proven not to descend from it); otherwise with its base,
//!   which some peer must advertise.
//! - The highest resulting slot wins; then the cheaper path (an incremental alone), then the
//!   weight the policy gives its advertisers (peers when untrusted, trusted peers when trusted,
//!   none for a pinned snapshot or a verifier, where identities prove nothing), then the one
//!   heard of first (so fresh identities announcing fresh roots under the same slot and bank
//!   hash do not keep the one heard of earlier from being tried), then the more peers, then
//!   the lowest content root, so every node settles ties alike.
//! - What an advert says beyond the key (chunk size, record counts) is taken from the peers
//!   the policy vouches for; counts no policy vouches for are not used to bound the load.
//!   Sources are ordered trusted first, then those that answered this node, oldest first.
//! - Peers that advertise different bank hashes for one slot are reported.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::Instant;

use libp2p::PeerId;

use super::book::{AdvertBook, KeyEntry};
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
    /// The snapshot, with the chunk size and counts of the peers the policy vouches for.
    pub ad: SnapshotAd,
    /// Whether the policy vouches for the counts (else they are one peer's claim).
    pub counts_vouched: bool,
    /// Whether the policy vouches for the root and size themselves (see
    /// [`TrustPolicy::vouches_root`]).
    pub vouched: bool,
    /// Peers advertising it in the chunk size most of them serve, with their chunk-stream
    /// addresses.
    pub peers: Vec<(PeerId, Vec<SocketAddr>)>,
    /// Peers downloading it too that serve what they verified, in the same chunk size, most
    /// held first (at most [`MAX_PARTIAL_SOURCES`]): sources only, they vouched for nothing.
    pub partial_peers: Vec<(PeerId, Vec<SocketAddr>)>,
    /// Trusted peers' valid attestations of it that adverts carried.
    pub attestations: Vec<crate::snapshot::Attestation>,
}

/// Most partial holders a target lists.
pub(crate) const MAX_PARTIAL_SOURCES: usize = 32;

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
    /// No snapshot above this slot is plausible (the chain's tip, and a margin).
    pub(crate) ceiling: Option<u64>,
    /// Only what a vouching policy accepts may be taken: the node executes the chain and was
    /// not told it is behind.
    pub(crate) vouched_only: bool,
    /// The chunk size this node serves in, preferred among those advertised.
    pub(crate) chunk_size: Option<ChunkSize>,
}

/// Whether `key`, advertised as `entry` says, may be taken at all.
pub(crate) fn acceptable(
    key: &SnapshotKey,
    entry: &KeyEntry<'_>,
    local: &LocalState,
    policy: &TrustPolicy,
) -> bool {
    // The cheap bounds first: a verifier is not asked about what they rule out.
    local.ceiling.is_none_or(|c| key.slot <= c)
        && !(local.vouched_only && policy.is_untrusted())
        && policy.accepts(key, entry.peers.len(), entry.trusted(), &entry.signers())
}

/// The fetch of `key`: its sources, best first, in the chunk size the trusted ones serve (else
/// this node's own, else the one most serve), with the counts the policy vouches for.
pub(super) fn target(
    book: &AdvertBook,
    key: &SnapshotKey,
    local: &LocalState,
    policy: &TrustPolicy,
) -> Option<Target> {
    let entry = book.entry(key)?;
    let mut by_size: HashMap<ChunkSize, Vec<(PeerId, &SnapshotAd)>> = HashMap::new();
    for peer in entry.peers {
        if let Some(ad) = book.ad_of(peer, key) {
            by_size.entry(ad.chunk_size).or_default().push((*peer, ad));
        }
    }
    let (_, mut chosen) = by_size.into_iter().max_by_key(|(size, peers)| {
        let trusted = peers.iter().filter(|(p, _)| policy.trusts(p)).count();
        let ours = local.chunk_size == Some(*size);
        (trusted, ours, peers.len(), std::cmp::Reverse(*size))
    })?;
    // Trusted first, then those that answered this node, then those heard of longest.
    chosen.sort_by_key(|(p, _)| (std::cmp::Reverse(book.standing(p)), book.since(p), *p));
    let (counts, counts_vouched) = vouched_counts(&entry, book, key, policy);
    let mut ad = *chosen[0].1;
    (ad.entry_count, ad.state_bytes) = counts;
    Some(Target {
        ad,
        counts_vouched,
        vouched: policy.vouches_root(key, entry.trusted()),
        peers: chosen.iter().map(|(p, _)| (*p, book.addrs(p))).collect(),
        partial_peers: partial_sources(book, key, ad.chunk_size, entry.peers),
        attestations: book.attestations(key),
    })
}

/// The partial holders of `key` serving it in `chunk_size` that are not among `complete`
/// holders: those that answered this node first, then those heard of longest. (How much each
/// says it holds is a claim: ranking by it would let fresh identities claiming everything take
/// every place.)
pub(crate) fn partial_sources(
    book: &AdvertBook,
    key: &SnapshotKey,
    chunk_size: ChunkSize,
    complete: &std::collections::HashSet<PeerId>,
) -> Vec<(PeerId, Vec<SocketAddr>)> {
    let mut holders: Vec<PeerId> = book
        .partial_holders(key)
        .filter(|(p, h)| h.ad.chunk_size == chunk_size && !complete.contains(p))
        .map(|(p, _)| p)
        .collect();
    holders.sort_by_key(|p| (std::cmp::Reverse(book.standing(p)), book.since(p), *p));
    holders
        .into_iter()
        .take(MAX_PARTIAL_SOURCES)
        .map(|p| (p, book.addrs(&p)))
        .collect()
}

/// The record counts of `key` most of the peers that count for the policy advertise, and
/// whether as many agree on them as the policy needs.
fn vouched_counts(
    entry: &KeyEntry<'_>,
    book: &AdvertBook,
    key: &SnapshotKey,
    policy: &TrustPolicy,
) -> ((u64, u64), bool) {
    let mut agreeing: HashMap<(u64, u64), (usize, usize)> = HashMap::new();
    for peer in entry.peers {
        if let Some(ad) = book.ad_of(peer, key) {
            let e = agreeing
                .entry((ad.entry_count, ad.state_bytes))
                .or_default();
            e.0 += 1;
            e.1 += usize::from(policy.trusts(peer));
        }
    }
    let best = agreeing
        .into_iter()
        .max_by_key(|(counts, (all, trusted))| (*trusted, *all, std::cmp::Reverse(*counts)));
    match best {
        Some((counts, (all, trusted))) => (counts, policy.vouches_counts(all, trusted)),
        None => ((0, 0), false),
    }
}

/// The full snapshot an incremental on `base` is fetched with, when several keys claim to be
/// it: the best vouched for, then the one heard of first.
fn base_of(
    book: &AdvertBook,
    base: &Base,
    failed: &dyn Fn(&SnapshotKey) -> bool,
) -> Option<SnapshotKey> {
    book.fulls_named(base)
        .filter(|k| !failed(k))
        .filter_map(|k| Some((*k, book.entry(k)?)))
        .max_by_key(|(k, e)| {
            (
                e.trusted(),
                std::cmp::Reverse(e.first_seen),
                e.peers.len(),
                std::cmp::Reverse(k.archive_size),
            )
        })
        .map(|(k, _)| k)
}

/// How a candidate plan ranks (see the module docs).
type Rank = (
    u64,
    bool,
    usize,
    std::cmp::Reverse<Instant>,
    usize,
    std::cmp::Reverse<ContentRoot>,
);

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
            || !acceptable(key, &entry, &local, policy)
        {
            continue;
        }
        let plan = match key.base {
            None => target(book, key, &local, policy).map(|t| Plan {
                full: Some(t),
                incremental: None,
            }),
            Some(base) => {
                let alone =
                    local.slot.is_some_and(|s| s >= base.slot) && local.not_on != Some(base);
                let full = if alone {
                    None
                } else {
                    match base_of(book, &base, failed)
                        .and_then(|k| target(book, &k, &local, policy))
                    {
                        Some(t) => Some(t),
                        // Its base is needed and nobody offers it.
                        None => continue,
                    }
                };
                target(book, key, &local, policy).map(|t| Plan {
                    full,
                    incremental: Some(t),
                })
            }
        };
        let Some(plan) = plan else { continue };
        let rank = (
            key.slot,
            plan.full.is_none(),
            policy.weight(entry.peers.len(), entry.trusted()),
            std::cmp::Reverse(entry.first_seen),
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
