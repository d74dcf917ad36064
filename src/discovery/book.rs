//! The bounded tables discovery keeps about peers: their advertisements (indexed by snapshot, so
//! that agreement is counted as adverts arrive, not recounted), strikes, answer cooldowns and
//! who is waiting for announcements. Every table has a fixed capacity and forgets its oldest
//! entry when full, so no number of identities can grow them.
//!
//! Identities are free, so the advert table keeps what strangers announce apart from the rest:
//! an advert is held at a [`Standing`], and a full table makes room for an advert by forgetting
//! the oldest of the lowest standing below it, never one above. Trusted peers' adverts are
//! never pushed out by others, answers to this node's own requests not by announcements, and
//! announcements by strangers hold at most a quarter of the table (those relaying the trusted
//! signatures of the newest signed snapshot another quarter, above the other announcements). Adverts of partial holdings
//! only (peers downloading a snapshot and serving what they verified) stand lowest, hold at
//! most a quarter of the table too, and are indexed apart: they make sources, never agreement.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use libp2p::PeerId;

use super::message::{Advert, SnapshotAd};
use super::policy::TrustPolicy;
use super::signers::{Listed, MAX_INVALID_CHECKED, Signed, Signers};
use crate::hash::ContentRoot;
use crate::snapshot::{Attestation, Base, MAX_ATTESTATIONS, SnapshotKey};

/// A per-peer table of at most `cap` entries; the oldest entry goes when a new peer arrives
/// at a full table.
#[derive(Debug, Clone)]
pub(crate) struct PeerTable<V> {
    cap: usize,
    map: HashMap<PeerId, (V, Instant)>,
}

impl<V> PeerTable<V> {
    pub(crate) fn new(cap: usize) -> Self {
        Self {
            cap: cap.max(1),
            map: HashMap::new(),
        }
    }

    /// Sets `peer`'s value; returns the entry evicted to make room, if any.
    pub(crate) fn insert(&mut self, peer: PeerId, value: V, now: Instant) -> Option<PeerId> {
        let mut evicted = None;
        if self.map.len() >= self.cap && !self.map.contains_key(&peer) {
            let oldest = self
                .map
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(p, _)| *p);
            if let Some(oldest) = oldest {
                self.map.remove(&oldest);
                evicted = Some(oldest);
            }
        }
        self.map.insert(peer, (value, now));
        evicted
    }

    pub(crate) fn get(&self, peer: &PeerId) -> Option<&V> {
        self.map.get(peer).map(|(v, _)| v)
    }

    pub(crate) fn at(&self, peer: &PeerId) -> Option<Instant> {
        self.map.get(peer).map(|(_, t)| *t)
    }

    /// Forgets entries older than `age`.
    pub(crate) fn expire(&mut self, now: Instant, age: Duration) -> Vec<PeerId> {
        let old: Vec<PeerId> = self
            .map
            .iter()
            .filter(|(_, (_, t))| now.saturating_duration_since(*t) >= age)
            .map(|(p, _)| *p)
            .collect();
        for p in &old {
            self.map.remove(p);
        }
        old
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
}

/// How much an advert is worth keeping, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Standing {
    /// Partial holdings only, from a peer the policy does not trust.
    Partial,
    /// Announced on the topic by a peer the policy does not trust.
    Announced,
    /// An announcement carrying trusted signatures that make the newest signed snapshot of its
    /// kind acceptable: announcements of other snapshots cannot push it out, and it pushes out
    /// no answer (the signatures are public: anyone can replay them, from any number of
    /// identities). It holds at most a quarter of the table, and stands so only while its
    /// latest advert carries such signatures.
    Relayed,
    /// An answer to a request or ask of this node.
    Answered,
    /// Of a snapshot the policy accepts on its own (the pinned one, one the owner's verifier
    /// accepts), from a peer it does not trust: identities advertising other snapshots, in
    /// any number, cannot push it out.
    Vouched,
    /// From a peer the policy trusts.
    Trusted,
}

/// Who advertises one snapshot.
#[derive(Debug, Clone)]
struct Holders {
    peers: HashSet<PeerId>,
    /// How many of `peers` the policy trusts.
    trusted_peers: usize,
    /// When some peer first advertised it (kept while anyone does).
    first_seen: Instant,
}

/// Who vouches for one snapshot: the peers that advertise it, and the trusted signers whose
/// valid attestations of it some advert carries (a holder's, a partial holder's).
#[derive(Debug, Clone, Copy)]
pub(crate) struct KeyEntry<'a> {
    pub(crate) peers: &'a HashSet<PeerId>,
    /// How many of `peers` the policy trusts.
    trusted_peers: usize,
    /// Trusted signers whose valid attestation of it some advert carries, with how many do.
    attested: Option<&'a HashMap<PeerId, u32>>,
    /// When some peer first advertised it (kept while anyone does): a snapshot heard of
    /// earlier is tried before one that appeared later under the same slot and bank hash.
    pub(crate) first_seen: Instant,
}

impl KeyEntry<'_> {
    /// The policy's attesters whose valid attestation of it some advert carries, in order.
    pub(crate) fn signers(&self) -> Vec<PeerId> {
        let mut s: Vec<PeerId> = self
            .attested
            .into_iter()
            .flat_map(|a| a.keys())
            .copied()
            .collect();
        s.sort();
        s
    }

    /// Whether `peer`'s valid attestation of it some advert carries.
    fn signed_by(&self, peer: &PeerId) -> bool {
        self.attested.is_some_and(|a| a.contains_key(peer))
    }

    /// Distinct trusted peers that vouch for it: by advertising it, or by an attestation of
    /// theirs that anyone's advert carries.
    pub(crate) fn trusted(&self) -> usize {
        self.trusted_peers
            + self
                .attested
                .into_iter()
                .flat_map(|a| a.keys())
                .filter(|p| !self.peers.contains(p))
                .count()
    }
}

#[derive(Debug, Clone)]
struct Stored {
    advert: Advert,
    /// The trusted signers of its snapshots' valid attestations.
    signed: Vec<Signed>,
    standing: Standing,
    /// The standing it came with (an answer, an announcement), before the policy raised it:
    /// what a changed policy places it by.
    given: Standing,
    /// When its latest advert came.
    at: Instant,
    /// When its first advert came (kept while it stays in the table).
    first: Instant,
}

/// Peers' advertisements, by peer and by snapshot.
#[derive(Debug, Clone)]
pub(crate) struct AdvertBook {
    cap: usize,
    adverts: HashMap<PeerId, Stored>,
    /// The adverts of each standing, oldest first.
    order: HashMap<Standing, BTreeSet<(Instant, PeerId)>>,
    by_key: HashMap<SnapshotKey, Holders>,
    /// The trusted signers of each snapshot whose valid attestations adverts carry (whoever
    /// lists it, holding it or part of it), with how many adverts do.
    attested: HashMap<SnapshotKey, HashMap<PeerId, u32>>,
    /// The full snapshots advertised, by content root (to find an incremental's base at once).
    fulls: HashMap<ContentRoot, HashSet<SnapshotKey>>,
    /// Who holds part of each snapshot (counts toward nothing).
    partials: HashMap<SnapshotKey, HashSet<PeerId>>,
    /// The trusted keys, and the verdicts on their attestations.
    signers: Signers,
    /// The highest slot whose snapshot signatures made acceptable, of each kind (full,
    /// incremental): relays of older ones do not stand raised (old signatures are public, and
    /// free to replay).
    best_signed_slot: [u64; 2],
    /// No snapshot above this slot is plausible (the chain's tip and a margin, or what the
    /// application's check can judge): signatures of one above it raise nothing.
    ceiling: Option<u64>,
}

impl AdvertBook {
    /// A table of at most `cap` adverts, counting the attestations of `policy`'s trusted peers
    /// for `network`.
    pub(crate) fn new(cap: usize, network: &str, policy: &TrustPolicy) -> Self {
        Self {
            cap: cap.max(4),
            adverts: HashMap::new(),
            order: HashMap::new(),
            by_key: HashMap::new(),
            attested: HashMap::new(),
            fulls: HashMap::new(),
            partials: HashMap::new(),
            signers: Signers::new(network, policy),
            best_signed_slot: [0; 2],
            ceiling: None,
        }
    }

    /// Most adverts of `standing` the table holds.
    fn cap_of(&self, standing: Standing) -> usize {
        match standing {
            Standing::Partial | Standing::Announced | Standing::Relayed => self.cap / 4,
            Standing::Answered | Standing::Vouched | Standing::Trusted => self.cap,
        }
    }

    fn count(&self, standing: Standing) -> usize {
        self.order.get(&standing).map_or(0, BTreeSet::len)
    }

    fn index(&mut self, advert: &Advert, signed: &[Signed], policy: &TrustPolicy, now: Instant) {
        for p in &advert.partial {
            self.partials
                .entry(p.ad.key)
                .or_default()
                .insert(advert.peer);
        }
        let trusted = policy.trusts(&advert.peer);
        for s in &advert.snapshots {
            let e = self.by_key.entry(s.key).or_insert_with(|| Holders {
                peers: HashSet::new(),
                trusted_peers: 0,
                first_seen: now,
            });
            if e.peers.insert(advert.peer) && trusted {
                e.trusted_peers += 1;
            }
            if s.key.is_full() {
                self.fulls
                    .entry(s.key.content_root)
                    .or_default()
                    .insert(s.key);
            }
        }
        // Each (snapshot, signer) once per advert.
        for sig in signed {
            *self
                .attested
                .entry(sig.key)
                .or_default()
                .entry(sig.signer)
                .or_default() += 1;
        }
    }

    fn unindex(&mut self, advert: &Advert, signed: &[Signed], policy: &TrustPolicy) {
        for sig in signed {
            if let Some(signers) = self.attested.get_mut(&sig.key)
                && let Some(n) = signers.get_mut(&sig.signer)
            {
                *n -= 1;
                if *n == 0 {
                    signers.remove(&sig.signer);
                    if signers.is_empty() {
                        self.attested.remove(&sig.key);
                    }
                }
            }
        }
        for p in &advert.partial {
            if let Some(peers) = self.partials.get_mut(&p.ad.key) {
                peers.remove(&advert.peer);
                if peers.is_empty() {
                    self.partials.remove(&p.ad.key);
                }
            }
        }
        for s in &advert.snapshots {
            if let Some(e) = self.by_key.get_mut(&s.key)
                && e.peers.remove(&advert.peer)
            {
                if policy.trusts(&advert.peer) {
                    e.trusted_peers -= 1;
                }
                if e.peers.is_empty() {
                    self.by_key.remove(&s.key);
                    if let Some(keys) = self.fulls.get_mut(&s.key.content_root) {
                        keys.remove(&s.key);
                        if keys.is_empty() {
                            self.fulls.remove(&s.key.content_root);
                        }
                    }
                }
            }
        }
    }

    fn remove(&mut self, peer: &PeerId, policy: &TrustPolicy) -> Option<Stored> {
        let stored = self.adverts.remove(peer)?;
        if let Some(order) = self.order.get_mut(&stored.standing) {
            order.remove(&(stored.at, *peer));
        }
        self.unindex(&stored.advert, &stored.signed, policy);
        Some(stored)
    }

    /// The oldest advert of `standing` or below (lowest standing first), other than `peer`'s.
    fn victim(&self, standing: Standing, peer: &PeerId) -> Option<PeerId> {
        [
            Standing::Partial,
            Standing::Announced,
            Standing::Relayed,
            Standing::Answered,
            Standing::Vouched,
            Standing::Trusted,
        ]
        .into_iter()
        .filter(|s| *s <= standing)
        .find_map(|s| {
            self.order
                .get(&s)?
                .iter()
                .find(|(_, p)| p != peer)
                .map(|(_, p)| *p)
        })
    }

    /// Records `advert` at `standing` (a trusted peer's is always trusted), replacing what its
    /// peer said before. Room is made by forgetting the oldest advert of the lowest standing
    /// not above it; an advert that would push out only adverts above it is not recorded.
    /// Returns whether it was recorded.
    pub(crate) fn insert(
        &mut self,
        advert: Advert,
        standing: Standing,
        now: Instant,
        policy: &TrustPolicy,
    ) -> bool {
        let peer = advert.peer;
        let given = self
            .adverts
            .get(&peer)
            .map_or(standing, |old| old.given.max(standing));
        let signed = self.signers.of_advert(&advert);
        let relayed = !advert.snapshots.is_empty() && self.signatures_vouch(&signed, policy);
        let standing = if policy.trusts(&peer) {
            Standing::Trusted
        } else if advert.snapshots.is_empty() {
            Standing::Partial
        } else if (advert.snapshots.iter()).any(|s| policy.accepts_alone(&s.key)) {
            Standing::Vouched
        } else if relayed {
            standing.max(Standing::Relayed)
        } else {
            standing
        };
        // A peer's own newer advert keeps the better of its standings (but not a relay's:
        // it stands so only while it carries the signatures).
        let standing = match self.adverts.get(&peer) {
            Some(old) if old.standing != Standing::Relayed => standing.max(old.standing),
            _ => standing,
        };
        let before = self.adverts.get(&peer).map(|old| old.standing);
        // A newcomer needs room in the table and in its standing's share; a peer whose
        // standing rises (partial holdings, then an announcement) needs room in its new share.
        let full = match before {
            None => self.adverts.len() >= self.cap || self.count(standing) >= self.cap_of(standing),
            Some(old) => old != standing && self.count(standing) >= self.cap_of(standing),
        };
        if full {
            // Within its own standing's share, or in a full table: the oldest below or at it.
            let within = self.count(standing) >= self.cap_of(standing);
            let victim = if within {
                self.order
                    .get(&standing)
                    .and_then(|o| o.iter().next())
                    .map(|(_, p)| *p)
            } else {
                self.victim(standing, &peer)
            };
            match victim {
                Some(v) => {
                    self.remove(&v, policy);
                }
                None => return false,
            }
        }
        let first = self.adverts.get(&peer).map_or(now, |old| old.first);
        self.remove(&peer, policy);
        self.index(&advert, &signed, policy, now);
        self.order.entry(standing).or_default().insert((now, peer));
        self.adverts.insert(
            peer,
            Stored {
                advert,
                signed,
                standing,
                given,
                at: now,
                first,
            },
        );
        true
    }

    /// No snapshot above `slot` is plausible now: signatures of one above it raise no relay
    /// (nor the newest signed slot).
    pub(crate) fn set_ceiling(&mut self, slot: Option<u64>) {
        self.ceiling = slot;
    }

    /// Whether the signatures `signed` (of one advert) make one of the snapshots it holds
    /// acceptable to `policy`, with the voices counted already, at a slot no lower than any
    /// signatures made acceptable before: a relay of the newest signed state stands with what
    /// the policy vouches for; replays of older signatures do not. (What a partial holder
    /// relays counts for the snapshot, not for the relay's place.)
    fn signatures_vouch(&mut self, signed: &[Signed], policy: &TrustPolicy) -> bool {
        let mut raised = false;
        let held = signed
            .iter()
            .filter(|s| matches!(s.at.0, Listed::Held(_)))
            .map(|s| s.key);
        for key in held {
            let kind = usize::from(!key.is_full());
            if key.slot < self.best_signed_slot[kind] || self.ceiling.is_some_and(|c| key.slot > c)
            {
                continue;
            }
            let new: Vec<PeerId> = signed
                .iter()
                .filter(|s| s.key == key)
                .map(|s| s.signer)
                .collect();
            let (peers, voices, mut signers) = match self.entry(&key) {
                Some(e) => {
                    let fresh = new
                        .iter()
                        .filter(|p| !e.signed_by(p) && !e.peers.contains(p))
                        .count();
                    let mut all = e.signers();
                    all.extend(&new);
                    (e.peers.len() + 1, e.trusted() + fresh, all)
                }
                None => (1, new.len(), new),
            };
            signers.sort();
            signers.dedup();
            if policy.accepts(&key, peers, voices, &signers) {
                self.best_signed_slot[kind] = self.best_signed_slot[kind].max(key.slot);
                raised = true;
            }
        }
        raised
    }

    /// The trust policy changed to `policy`: every advert is counted and placed again under it,
    /// in the order the adverts came, keeping when each was heard and when each snapshot was
    /// first heard of. What the old policy raised (a trusted peer's advert, one of a snapshot
    /// it vouched for) stands as it came (an answer, an announcement), unless the new policy
    /// raises it again.
    pub(crate) fn retrust(&mut self, policy: &TrustPolicy) {
        self.signers.set_policy(policy);
        self.best_signed_slot = [0; 2];
        let first_seen: HashMap<SnapshotKey, Instant> = self
            .by_key
            .iter()
            .map(|(k, e)| (*k, e.first_seen))
            .collect();
        let mut stored: Vec<Stored> = self.adverts.drain().map(|(_, s)| s).collect();
        stored.sort_by_key(|s| (s.at, s.advert.peer));
        self.order.clear();
        self.by_key.clear();
        self.attested.clear();
        self.fulls.clear();
        self.partials.clear();
        for s in stored {
            let peer = s.advert.peer;
            if self.insert(s.advert, s.given, s.at, policy)
                && let Some(kept) = self.adverts.get_mut(&peer)
            {
                kept.first = s.first;
            }
        }
        for (key, e) in &mut self.by_key {
            if let Some(t) = first_seen.get(key) {
                e.first_seen = e.first_seen.min(*t);
            }
        }
    }

    /// Forgets adverts older than `age`.
    pub(crate) fn expire(&mut self, now: Instant, age: Duration, policy: &TrustPolicy) {
        let old: Vec<PeerId> = self
            .adverts
            .iter()
            .filter(|(_, s)| now.saturating_duration_since(s.at) >= age)
            .map(|(p, _)| *p)
            .collect();
        for p in old {
            self.remove(&p, policy);
        }
    }

    /// Forgets everything `peer` said.
    pub(crate) fn forget(&mut self, peer: &PeerId, policy: &TrustPolicy) {
        self.remove(peer, policy);
    }

    /// The valid attestations of `key` by trusted peers that adverts carry (a holder's, a
    /// partial holder's), one per signer (ordered by signer), at most [`MAX_ATTESTATIONS`]:
    /// what a node that takes it stores with it and relays.
    pub(crate) fn attestations(&self, key: &SnapshotKey) -> Vec<Attestation> {
        let mut out: Vec<(PeerId, Attestation)> = Vec::new();
        if !self.attested.contains_key(key) {
            return Vec::new();
        }
        let holders = self.by_key.get(key).into_iter().flat_map(|e| &e.peers);
        let partial = self.partials.get(key).into_iter().flatten();
        for stored in holders.chain(partial).filter_map(|p| self.adverts.get(p)) {
            for sig in stored.signed.iter().filter(|s| s.key == *key) {
                let (listed, j) = sig.at;
                if let Some(a) = listed.attestations(&stored.advert).get(j)
                    && out.iter().all(|(p, _)| *p != sig.signer)
                {
                    out.push((sig.signer, a.clone()));
                }
            }
        }
        out.sort_by_key(|(p, _)| *p);
        out.into_iter()
            .take(MAX_ATTESTATIONS)
            .map(|(_, a)| a)
            .collect()
    }

    /// Those of `list` (attestations of `key` from anywhere: a manifest's) that are trusted
    /// peers' valid signatures, one per signer, at most [`MAX_ATTESTATIONS`]. Only the keys
    /// the policy names and not found yet are verified, each (snapshot, attestation) once, and
    /// none after [`MAX_INVALID_CHECKED`] invalid ones.
    pub(crate) fn trusted_attestations(
        &mut self,
        key: &SnapshotKey,
        list: &[Attestation],
    ) -> Vec<Attestation> {
        let mut out: Vec<(PeerId, Attestation)> = Vec::new();
        let mut invalid = 0;
        for a in list {
            if out.len() >= MAX_ATTESTATIONS || invalid >= MAX_INVALID_CHECKED {
                break;
            }
            let Some(named) = self.signers.named(a) else {
                continue;
            };
            if out.iter().any(|(p, _)| *p == named) {
                continue;
            }
            match self.signers.trusted_signer(key, a) {
                Some(signer) => out.push((signer, a.clone())),
                None => invalid += 1,
            }
        }
        out.into_iter().map(|(_, a)| a).collect()
    }

    /// Whether `a` names a key the policy counts (nothing is verified).
    pub(crate) fn names(&self, a: &Attestation) -> bool {
        self.signers.named(a).is_some()
    }

    /// Who vouches for `key`, as `holders` and the carried signatures say.
    fn view<'a>(&'a self, key: &SnapshotKey, holders: &'a Holders) -> KeyEntry<'a> {
        KeyEntry {
            peers: &holders.peers,
            trusted_peers: holders.trusted_peers,
            attested: self.attested.get(key),
            first_seen: holders.first_seen,
        }
    }

    /// Every snapshot advertised, with who vouches for it.
    pub(crate) fn keys(&self) -> impl Iterator<Item = (&SnapshotKey, KeyEntry<'_>)> {
        self.by_key.iter().map(|(k, h)| (k, self.view(k, h)))
    }

    /// The advertised full snapshots `base` names.
    pub(crate) fn fulls_named<'a>(
        &'a self,
        base: &'a Base,
    ) -> impl Iterator<Item = &'a SnapshotKey> {
        self.fulls
            .get(&base.content_root)
            .into_iter()
            .flatten()
            .filter(move |k| base.is(k))
    }

    /// Who vouches for `key`, if anyone advertises it.
    pub(crate) fn entry(&self, key: &SnapshotKey) -> Option<KeyEntry<'_>> {
        self.by_key.get(key).map(|h| self.view(key, h))
    }

    /// Who holds part of `key`, with what they say they hold.
    pub(crate) fn partial_holders<'a>(
        &'a self,
        key: &'a SnapshotKey,
    ) -> impl Iterator<Item = (PeerId, &'a super::message::PartialAd)> + 'a {
        self.partials
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(move |p| {
                let held = self
                    .adverts
                    .get(p)?
                    .advert
                    .partial
                    .iter()
                    .find(|h| h.ad.key == *key)?;
                Some((*p, held))
            })
    }

    /// What `peer` says of `key` (its chunk size and counts).
    pub(crate) fn ad_of(&self, peer: &PeerId, key: &SnapshotKey) -> Option<&SnapshotAd> {
        self.adverts
            .get(peer)?
            .advert
            .snapshots
            .iter()
            .find(|s| s.key == *key)
    }

    /// The standing of `peer`'s advert.
    pub(crate) fn standing(&self, peer: &PeerId) -> Option<Standing> {
        self.adverts.get(peer).map(|s| s.standing)
    }

    /// When `peer`'s first advert was recorded (it has been heard of since).
    pub(crate) fn since(&self, peer: &PeerId) -> Option<Instant> {
        self.adverts.get(peer).map(|s| s.first)
    }

    /// Every advert.
    pub(crate) fn adverts(&self) -> impl Iterator<Item = &Advert> {
        self.adverts.values().map(|s| &s.advert)
    }

    /// Number of peers with an advert.
    pub(crate) fn len(&self) -> usize {
        self.adverts.len()
    }

    /// The chunk-stream addresses of `peer`.
    pub(crate) fn addrs(&self, peer: &PeerId) -> Vec<SocketAddr> {
        self.adverts
            .get(peer)
            .map(|s| s.advert.streamer_addrs.clone())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::ChunkSize;
    use crate::discovery::message::PartialAd;
    use crate::hash::BankHash;
    use crate::snapshot::SnapshotKind;

    fn advert(peer: PeerId, slot: u64) -> Advert {
        Advert {
            attestations: Vec::new(),
            peer,
            snapshots: vec![SnapshotAd {
                key: SnapshotKey {
                    kind: SnapshotKind::Full,
                    slot,
                    bank_hash: BankHash([1; 32]),
                    content_root: ContentRoot([1; 32]),
                    archive_size: 10,
                    base: None,
                },
                chunk_size: ChunkSize::DEFAULT,
                entry_count: 1,
                state_bytes: 10,
            }],
            partial: Vec::new(),
            partial_attestations: Vec::new(),
            streamer_addrs: vec!["127.0.0.1:1".parse().unwrap()],
            holder_slot: None,
            modified_time: 0,
        }
    }

    #[test]
    fn tables_are_bounded_and_forget_the_oldest() {
        let mut t = PeerTable::new(2);
        let now = Instant::now();
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        t.insert(a, 1, now);
        t.insert(b, 2, now + Duration::from_secs(1));
        assert_eq!(t.insert(c, 3, now + Duration::from_secs(2)), Some(a));
        assert_eq!(t.len(), 2);
        assert_eq!(t.get(&a), None);
        // Updating a present peer evicts nobody.
        assert_eq!(t.insert(b, 4, now + Duration::from_secs(3)), None);
        assert_eq!(
            t.expire(now + Duration::from_secs(4), Duration::from_secs(2)),
            vec![c]
        );
    }

    #[test]
    fn the_book_counts_agreement_as_adverts_come_and_go() {
        let policy = TrustPolicy::default();
        let mut book = AdvertBook::new(4, "n", &policy);
        let now = Instant::now();
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        let answered = Standing::Answered;
        book.insert(advert(a, 10), answered, now, &policy);
        book.insert(
            advert(b, 10),
            answered,
            now + Duration::from_secs(1),
            &policy,
        );
        let key = advert(a, 10).snapshots[0].key;
        assert_eq!(book.entry(&key).unwrap().peers.len(), 2);
        assert_eq!(book.entry(&key).unwrap().first_seen, now);
        // a moves on to another snapshot: it no longer counts for the first.
        book.insert(
            advert(a, 20),
            answered,
            now + Duration::from_secs(2),
            &policy,
        );
        assert_eq!(book.entry(&key).unwrap().peers.len(), 1);
        for i in 0..2 {
            let p = PeerId::random();
            book.insert(
                advert(p, 30),
                answered,
                now + Duration::from_secs(3 + i),
                &policy,
            );
        }
        // A fifth peer on a full table evicts the oldest advert (b's), and its count.
        book.insert(
            advert(c, 20),
            answered,
            now + Duration::from_secs(6),
            &policy,
        );
        assert!(book.entry(&key).is_none());
        assert_eq!(book.len(), 4);
        book.expire(
            now + Duration::from_secs(20),
            Duration::from_secs(5),
            &policy,
        );
        assert_eq!(book.len(), 0);
        assert_eq!(book.keys().count(), 0);
    }

    #[test]
    fn strangers_announcements_never_push_out_trusted_or_answered_adverts() {
        let trusted: Vec<PeerId> = (0..3).map(|_| PeerId::random()).collect();
        let policy = TrustPolicy::TrustedPeers {
            peers: trusted.iter().copied().collect(),
            quorum: 2,
        };
        let mut book = AdvertBook::new(16, "n", &policy);
        let now = Instant::now();
        for p in &trusted {
            assert!(book.insert(advert(*p, 100), Standing::Answered, now, &policy));
        }
        let answerer = PeerId::random();
        book.insert(advert(answerer, 100), Standing::Answered, now, &policy);
        // Thousands of fresh identities announce after them.
        for i in 0..4096u64 {
            let p = PeerId::random();
            let at = now + Duration::from_millis(i + 1);
            book.insert(advert(p, 200 + i), Standing::Announced, at, &policy);
        }
        let key = advert(trusted[0], 100).snapshots[0].key;
        let entry = book.entry(&key).unwrap();
        assert_eq!(entry.trusted(), 3, "every trusted advert is still there");
        assert_eq!(entry.peers.len(), 4, "and the answer");
        assert_eq!(
            book.len(),
            4 + 16 / 4,
            "announcements hold a quarter of the table"
        );
        assert_eq!(book.standing(&trusted[0]), Some(Standing::Trusted));
        // Answers fill the rest of a full table, pushing out announcements, not each other's
        // betters.
        for i in 0..64u64 {
            let p = PeerId::random();
            book.insert(
                advert(p, 300),
                Standing::Answered,
                now + Duration::from_secs(10 + i),
                &policy,
            );
        }
        assert_eq!(book.len(), 16);
        assert_eq!(book.entry(&key).unwrap().trusted(), 3);
    }

    #[test]
    fn a_stranger_whose_standing_rises_needs_room_in_its_new_share() {
        let policy = TrustPolicy::default();
        let mut book = AdvertBook::new(16, "n", &policy);
        let now = Instant::now();
        let answerer = PeerId::random();
        book.insert(advert(answerer, 100), Standing::Answered, now, &policy);
        // Strangers come in with partial holdings only, then announce snapshots: the
        // announcements still hold a quarter of the table at most.
        for i in 0..64u64 {
            let p = PeerId::random();
            let at = now + Duration::from_millis(2 * i + 1);
            let mut partial_only = advert(p, 200 + i);
            let ad = partial_only.snapshots.pop().unwrap();
            partial_only.partial = vec![PartialAd {
                ad,
                verified_bytes: 1,
            }];
            book.insert(partial_only, Standing::Announced, at, &policy);
            book.insert(
                advert(p, 200 + i),
                Standing::Announced,
                at + Duration::from_millis(1),
                &policy,
            );
        }
        let announced = book
            .adverts
            .values()
            .filter(|s| s.standing == Standing::Announced)
            .count();
        assert_eq!(announced, 16 / 4);
        assert_eq!(book.standing(&answerer), Some(Standing::Answered));
    }

    #[test]
    fn a_changed_trust_policy_counts_and_places_every_advert_again() {
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        let only_a = TrustPolicy::TrustedPeers {
            peers: [a].into(),
            quorum: 1,
        };
        let t0 = Instant::now();
        let mut book = AdvertBook::new(16, "n", &only_a);
        for (i, p) in [a, b, c].into_iter().enumerate() {
            let at = t0 + Duration::from_millis(i as u64);
            assert!(book.insert(advert(p, 10), Standing::Announced, at, &only_a));
        }
        let key = advert(a, 10).snapshots[0].key;
        assert_eq!(book.entry(&key).unwrap().trusted(), 1);
        assert_eq!(book.standing(&a), Some(Standing::Trusted));
        let first_seen = book.entry(&key).unwrap().first_seen;
        // b and c are trusted now, a no longer: counts and standings follow; times stay.
        let b_and_c = TrustPolicy::TrustedPeers {
            peers: [b, c].into(),
            quorum: 2,
        };
        book.retrust(&b_and_c);
        let e = book.entry(&key).unwrap();
        assert_eq!((e.peers.len(), e.trusted()), (3, 2));
        assert_eq!(e.first_seen, first_seen);
        assert_eq!(book.standing(&a), Some(Standing::Announced));
        assert_eq!(book.standing(&b), Some(Standing::Trusted));
        assert_eq!(book.since(&c), Some(t0 + Duration::from_millis(2)));
        // Removing an advert counts down under the policy it was counted with.
        book.forget(&b, &b_and_c);
        book.forget(&a, &b_and_c);
        assert_eq!(book.entry(&key).unwrap().trusted(), 1);
    }

    #[test]
    fn only_trusted_keys_are_verified_each_once_and_counted_while_carried() {
        use crate::snapshot::Attestation;
        use libp2p::identity::Keypair;
        let keys: Vec<Keypair> = (0..2).map(|_| Keypair::generate_ed25519()).collect();
        let policy = TrustPolicy::TrustedPeers {
            peers: keys.iter().map(|k| k.public().to_peer_id()).collect(),
            quorum: 2,
        };
        let t0 = Instant::now();
        let mut book = AdvertBook::new(256, "n", &policy);
        let key = advert(PeerId::random(), 10).snapshots[0].key;
        let strangers: Vec<Attestation> = (0..8)
            .map(|_| Attestation::sign(&Keypair::generate_ed25519(), "n", &key).unwrap())
            .collect();
        let trusted: Vec<Attestation> = keys
            .iter()
            .map(|k| Attestation::sign(k, "n", &key).unwrap())
            .collect();
        let carrying = |atts: &[Attestation]| {
            let mut a = advert(PeerId::random(), 10);
            a.attestations = vec![atts.to_vec()];
            a
        };
        // Both trusted keys' signatures of `key`, as an advert of it carries them.
        let both_sign = |key: &SnapshotKey| -> Vec<Vec<Attestation>> {
            vec![
                keys.iter()
                    .map(|k| Attestation::sign(k, "n", key).unwrap())
                    .collect(),
            ]
        };
        // Strangers' keys cost no verification at all.
        let junk = carrying(&strangers);
        let junk_peer = junk.peer;
        assert!(book.insert(junk, Standing::Announced, t0, &policy));
        assert_eq!(book.signers.verified(), 0);
        assert_eq!(book.standing(&junk_peer), Some(Standing::Announced));
        // Twenty relays of the same two signatures: two verifications, two voices.
        let mut relays = Vec::new();
        for _ in 0..20 {
            let a = carrying(&trusted);
            relays.push(a.peer);
            assert!(book.insert(a, Standing::Announced, t0, &policy));
        }
        assert_eq!(book.signers.verified(), 2);
        assert_eq!(book.entry(&key).unwrap().trusted(), 2);
        assert_eq!(book.attestations(&key).len(), 2);
        // A relay of a valid trusted signature stands above other announcements.
        assert_eq!(book.standing(&relays[0]), Some(Standing::Relayed));
        // The voices stay while any advert carries them.
        for p in &relays[1..] {
            book.forget(p, &policy);
        }
        assert_eq!(book.entry(&key).unwrap().trusted(), 2);
        book.forget(&relays[0], &policy);
        assert_eq!(book.entry(&key).unwrap().trusted(), 0);
        assert!(book.attestations(&key).is_empty());
        // A relay of one signature of the pair is no quorum: it stands as it came.
        let lone = carrying(&trusted[..1]);
        let lone_peer = lone.peer;
        assert!(book.insert(lone, Standing::Announced, t0, &policy));
        assert_eq!(book.standing(&lone_peer), Some(Standing::Announced));
        book.forget(&lone_peer, &policy);
        // Replays of a quorum of signatures of an older snapshot do not stand raised once a
        // newer one was signed.
        let newer = advert(PeerId::random(), 20).snapshots[0].key;
        let mut fresh = advert(PeerId::random(), 20);
        fresh.attestations = both_sign(&newer);
        let fresh_peer = fresh.peer;
        assert!(book.insert(fresh, Standing::Announced, t0, &policy));
        assert_eq!(book.standing(&fresh_peer), Some(Standing::Relayed));
        let replay = carrying(&trusted);
        let replay_peer = replay.peer;
        assert!(book.insert(replay, Standing::Announced, t0, &policy));
        assert_eq!(book.standing(&replay_peer), Some(Standing::Announced));
        assert_eq!(book.entry(&key).unwrap().trusted(), 2, "yet it counts");
        book.forget(&replay_peer, &policy);
        // A newer incremental signed does not lower relays of the newest signed full one.
        let mut incremental = advert(PeerId::random(), 30);
        let inc = &mut incremental.snapshots[0].key;
        inc.kind = crate::snapshot::SnapshotKind::Incremental;
        inc.base = Some(Base::of(&newer));
        let inc = *inc;
        incremental.attestations = both_sign(&inc);
        let inc_peer = incremental.peer;
        assert!(book.insert(incremental, Standing::Announced, t0, &policy));
        assert_eq!(book.standing(&inc_peer), Some(Standing::Relayed));
        let mut full_relay = advert(PeerId::random(), 20);
        full_relay.attestations = both_sign(&newer);
        let full_peer = full_relay.peer;
        assert!(book.insert(full_relay, Standing::Announced, t0, &policy));
        assert_eq!(book.standing(&full_peer), Some(Standing::Relayed));
        // Signatures of a slot above what is plausible raise nothing, not even the newest
        // signed slot.
        book.set_ceiling(Some(25));
        let far = advert(PeerId::random(), 40).snapshots[0].key;
        let mut far_relay = advert(PeerId::random(), 40);
        far_relay.attestations = both_sign(&far);
        let far_peer = far_relay.peer;
        assert!(book.insert(far_relay, Standing::Announced, t0, &policy));
        assert_eq!(book.standing(&far_peer), Some(Standing::Announced));
        let mut again = advert(PeerId::random(), 20);
        again.attestations = both_sign(&newer);
        let again_peer = again.peer;
        assert!(book.insert(again, Standing::Announced, t0, &policy));
        assert_eq!(book.standing(&again_peer), Some(Standing::Relayed));
        book.set_ceiling(None);
        // A trusted peer that advertises it and whose signature is relayed is one voice.
        let own = keys[0].public().to_peer_id();
        assert!(book.insert(advert(own, 10), Standing::Answered, t0, &policy));
        assert!(book.insert(carrying(&trusted[..1]), Standing::Announced, t0, &policy));
        assert_eq!(book.entry(&key).unwrap().trusted(), 1);
    }

    #[test]
    fn signatures_a_partial_holder_relays_count_for_the_snapshot_not_for_its_place() {
        use crate::snapshot::Attestation;
        use libp2p::identity::Keypair;
        let keys: Vec<Keypair> = (0..2).map(|_| Keypair::generate_ed25519()).collect();
        let policy = TrustPolicy::TrustedPeers {
            peers: keys.iter().map(|k| k.public().to_peer_id()).collect(),
            quorum: 2,
        };
        let t0 = Instant::now();
        let mut book = AdvertBook::new(64, "n", &policy);
        let ad = advert(PeerId::random(), 10).snapshots[0];
        let key = ad.key;
        let signed: Vec<Attestation> = keys
            .iter()
            .map(|k| Attestation::sign(k, "n", &key).unwrap())
            .collect();
        // A partial holder relays both signatures before anyone holding it is heard of.
        let mut partial = advert(PeerId::random(), 10);
        partial.snapshots.clear();
        partial.partial = vec![PartialAd {
            ad,
            verified_bytes: 1,
        }];
        partial.partial_attestations = vec![signed.clone()];
        let relay = partial.peer;
        assert!(book.insert(partial, Standing::Announced, t0, &policy));
        assert_eq!(book.standing(&relay), Some(Standing::Partial));
        assert!(book.entry(&key).is_none(), "a partial holder is no holder");
        let sorted = |mut l: Vec<Attestation>| {
            l.sort();
            l
        };
        assert_eq!(
            sorted(book.attestations(&key)),
            sorted(signed.clone()),
            "yet what it relays is kept"
        );
        // A stranger holding it, unsigned, is joined by the relayed voices.
        let holder = advert(PeerId::random(), 10);
        let holder_peer = holder.peer;
        assert!(book.insert(holder, Standing::Announced, t0, &policy));
        let e = book.entry(&key).unwrap();
        assert_eq!((e.trusted(), e.signers().len(), e.peers.len()), (2, 2, 1));
        // The voices go with the relay's advert.
        book.forget(&relay, &policy);
        assert_eq!(book.entry(&key).unwrap().trusted(), 0);
        assert!(book.attestations(&key).is_empty());
        // One that holds an older snapshot and relays signatures of one it downloads stands
        // as it came: the signatures are not of what it serves whole.
        let mut mixed = advert(PeerId::random(), 5);
        mixed.partial = vec![PartialAd {
            ad,
            verified_bytes: 1,
        }];
        mixed.partial_attestations = vec![signed.clone()];
        let mixed_peer = mixed.peer;
        assert!(book.insert(mixed, Standing::Announced, t0, &policy));
        assert_eq!(book.standing(&mixed_peer), Some(Standing::Announced));
        assert_eq!(book.entry(&key).unwrap().trusted(), 2);
        book.forget(&holder_peer, &policy);
        assert!(book.entry(&key).is_none());
        assert_eq!(sorted(book.attestations(&key)), sorted(signed));
    }

    #[test]
    fn replayed_signatures_from_free_identities_push_out_no_answer_and_raise_nobody_for_good() {
        use crate::snapshot::Attestation;
        use libp2p::identity::Keypair;
        let keys: Vec<Keypair> = (0..2).map(|_| Keypair::generate_ed25519()).collect();
        let policy = TrustPolicy::TrustedPeers {
            peers: keys.iter().map(|k| k.public().to_peer_id()).collect(),
            quorum: 2,
        };
        let t0 = Instant::now();
        let mut book = AdvertBook::new(16, "n", &policy);
        let key = advert(PeerId::random(), 10).snapshots[0].key;
        let signed: Vec<Attestation> = keys
            .iter()
            .map(|k| Attestation::sign(k, "n", &key).unwrap())
            .collect();
        // Eight honest holders answered this node (one of them a web source, say).
        let answers: Vec<PeerId> = (0..8).map(|_| PeerId::random()).collect();
        for (i, p) in answers.iter().enumerate() {
            let at = t0 + Duration::from_millis(i as u64);
            assert!(book.insert(advert(*p, 10), Standing::Answered, at, &policy));
        }
        // A hundred fresh identities announce it with the public signatures.
        let mut relays = Vec::new();
        for i in 0..100u64 {
            let mut a = advert(PeerId::random(), 10);
            a.attestations = vec![signed.clone()];
            relays.push(a.peer);
            book.insert(
                a,
                Standing::Announced,
                t0 + Duration::from_secs(1 + i),
                &policy,
            );
        }
        assert!(
            answers
                .iter()
                .all(|p| book.standing(p) == Some(Standing::Answered))
        );
        assert!(book.count(Standing::Relayed) <= 4, "a quarter of the table");
        assert_eq!(
            book.entry(&key).unwrap().trusted(),
            2,
            "the signatures still count"
        );
        // A relay whose next advert carries no signature stands as what it is.
        let last = *relays.last().unwrap();
        assert_eq!(book.standing(&last), Some(Standing::Relayed));
        book.insert(
            advert(last, 10),
            Standing::Announced,
            t0 + Duration::from_secs(200),
            &policy,
        );
        assert_eq!(book.standing(&last), Some(Standing::Announced));
    }
}
