//! The bounded tables discovery keeps about peers: their advertisements (indexed by snapshot, so
//! that agreement is counted as adverts arrive, not recounted), strikes, answer cooldowns and
//! who is waiting for announcements. Every table has a fixed capacity and forgets its oldest
//! entry when full, so no number of identities can grow them.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use libp2p::PeerId;

use super::message::{Advert, SnapshotAd};
use super::policy::TrustPolicy;
use crate::hash::ContentRoot;
use crate::snapshot::{Base, SnapshotKey};

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

    pub(crate) fn remove(&mut self, peer: &PeerId) -> Option<V> {
        self.map.remove(peer).map(|(v, _)| v)
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

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&PeerId, &V)> {
        self.map.iter().map(|(p, (v, _))| (p, v))
    }
}

/// Who advertises one snapshot.
#[derive(Debug, Clone)]
pub(crate) struct KeyEntry {
    pub(crate) peers: HashSet<PeerId>,
    pub(crate) trusted: usize,
}

/// Peers' advertisements, by peer and by snapshot.
#[derive(Debug, Clone)]
pub(crate) struct AdvertBook {
    adverts: PeerTable<Advert>,
    by_key: HashMap<SnapshotKey, KeyEntry>,
    /// The full snapshots advertised, by content root (to find an incremental's base at once).
    fulls: HashMap<ContentRoot, HashSet<SnapshotKey>>,
}

impl AdvertBook {
    pub(crate) fn new(cap: usize) -> Self {
        Self {
            adverts: PeerTable::new(cap),
            by_key: HashMap::new(),
            fulls: HashMap::new(),
        }
    }

    fn unindex(&mut self, advert: &Advert, policy: &TrustPolicy) {
        for s in &advert.snapshots {
            if let Some(e) = self.by_key.get_mut(&s.key)
                && e.peers.remove(&advert.peer)
            {
                if policy.trusts(&advert.peer) {
                    e.trusted -= 1;
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

    /// Records `advert`, replacing what its peer said before.
    pub(crate) fn insert(&mut self, advert: Advert, now: Instant, policy: &TrustPolicy) {
        if let Some(old) = self.adverts.remove(&advert.peer) {
            self.unindex(&old, policy);
        }
        let trusted = policy.trusts(&advert.peer);
        for s in &advert.snapshots {
            let e = self.by_key.entry(s.key).or_insert_with(|| KeyEntry {
                peers: HashSet::new(),
                trusted: 0,
            });
            if e.peers.insert(advert.peer) && trusted {
                e.trusted += 1;
            }
            if s.key.is_full() {
                self.fulls
                    .entry(s.key.content_root)
                    .or_default()
                    .insert(s.key);
            }
        }
        let peer = advert.peer;
        // A full table forgets its oldest advert; its snapshots lose that peer.
        if self.adverts.len() >= self.adverts.cap
            && let Some((&oldest, _)) = self
                .adverts
                .map
                .iter()
                .filter(|(p, _)| **p != peer)
                .min_by_key(|(_, (_, t))| *t)
            && let Some(gone) = self.adverts.remove(&oldest)
        {
            self.unindex(&gone, policy);
        }
        self.adverts.insert(peer, advert, now);
    }

    /// Forgets adverts older than `age`.
    pub(crate) fn expire(&mut self, now: Instant, age: Duration, policy: &TrustPolicy) {
        let old: Vec<PeerId> = self
            .adverts
            .map
            .iter()
            .filter(|(_, (_, t))| now.saturating_duration_since(*t) >= age)
            .map(|(p, _)| *p)
            .collect();
        for p in old {
            if let Some(a) = self.adverts.remove(&p) {
                self.unindex(&a, policy);
            }
        }
    }

    /// Forgets everything `peer` said.
    pub(crate) fn forget(&mut self, peer: &PeerId, policy: &TrustPolicy) {
        if let Some(a) = self.adverts.remove(peer) {
            self.unindex(&a, policy);
        }
    }

    /// Every snapshot advertised, with who advertises it.
    pub(crate) fn keys(&self) -> impl Iterator<Item = (&SnapshotKey, &KeyEntry)> {
        self.by_key.iter()
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

    /// Who advertises `key`.
    pub(crate) fn entry(&self, key: &SnapshotKey) -> Option<&KeyEntry> {
        self.by_key.get(key)
    }

    /// What `peer` says of `key` (its chunk size and counts).
    pub(crate) fn ad_of(&self, peer: &PeerId, key: &SnapshotKey) -> Option<&SnapshotAd> {
        self.adverts
            .get(peer)?
            .snapshots
            .iter()
            .find(|s| s.key == *key)
    }

    /// Every advert.
    pub(crate) fn adverts(&self) -> impl Iterator<Item = &Advert> {
        self.adverts.iter().map(|(_, a)| a)
    }

    /// Number of peers with an advert.
    pub(crate) fn len(&self) -> usize {
        self.adverts.len()
    }

    /// The chunk-stream addresses of `peer`.
    pub(crate) fn addrs(&self, peer: &PeerId) -> Vec<SocketAddr> {
        self.adverts
            .get(peer)
            .map(|a| a.streamer_addrs.clone())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::ChunkSize;
    use crate::hash::{BankHash, ContentRoot};
    use crate::snapshot::SnapshotKind;

    fn advert(peer: PeerId, slot: u64) -> Advert {
        Advert {
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
        let mut book = AdvertBook::new(2);
        let now = Instant::now();
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        book.insert(advert(a, 10), now, &policy);
        book.insert(advert(b, 10), now + Duration::from_secs(1), &policy);
        let key = advert(a, 10).snapshots[0].key;
        assert_eq!(book.entry(&key).unwrap().peers.len(), 2);
        // a moves on to another snapshot: it no longer counts for the first.
        book.insert(advert(a, 20), now + Duration::from_secs(2), &policy);
        assert_eq!(book.entry(&key).unwrap().peers.len(), 1);
        // A third peer on a full table evicts the oldest advert (b's), and its count.
        book.insert(advert(c, 20), now + Duration::from_secs(3), &policy);
        assert!(book.entry(&key).is_none());
        assert_eq!(book.len(), 2);
        book.expire(
            now + Duration::from_secs(10),
            Duration::from_secs(5),
            &policy,
        );
        assert_eq!(book.len(), 0);
        assert_eq!(book.keys().count(), 0);
    }
}
