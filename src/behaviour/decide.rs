//! Which snapshot to take, from the advertisements collected: a pure function.

use std::collections::{BTreeMap, HashMap, HashSet};

use libp2p::PeerId;

use super::protocol::Advert;
use crate::ChunkSize;
use crate::hash::{BankHash, ContentRoot};

/// What identifies a snapshot: peers agree on a snapshot when they advertise the same of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SnapshotKey {
    /// Slot.
    pub slot: u64,
    /// Bank hash.
    pub bank_hash: BankHash,
    /// Content root.
    pub content_root: ContentRoot,
    /// Archive size.
    pub archive_size: u64,
}

impl SnapshotKey {
    pub(crate) fn of(a: &Advert) -> Self {
        Self {
            slot: a.slot,
            bank_hash: a.bank_hash,
            content_root: a.content_root,
            archive_size: a.archive_size,
        }
    }
}

/// Peers that advertise different snapshots for the same slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// The slot.
    pub slot: u64,
    /// Each snapshot advertised for it, with who advertised it.
    pub variants: Vec<(BankHash, ContentRoot, Vec<PeerId>)>,
}

/// The rule the choice follows (from the [`super::Config`]).
#[derive(Debug, Clone, Default)]
pub(crate) struct Rule {
    pub(crate) min_agreeing_peers: usize,
    pub(crate) trusted_peers: HashSet<PeerId>,
    pub(crate) trusted_snapshot: Option<(u64, BankHash)>,
}

/// The snapshot chosen and the peers to fetch it from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Choice {
    pub(crate) key: SnapshotKey,
    pub(crate) chunk_size: ChunkSize,
    pub(crate) peers: Vec<Advert>,
}

/// Outcome of a decision.
#[derive(Debug, Clone, Default)]
pub(crate) struct Decision {
    pub(crate) choice: Option<Choice>,
    pub(crate) conflicts: Vec<Conflict>,
}

/// Chooses among `adverts` (one per peer) a snapshot newer than `local_slot`:
/// - with a trusted snapshot, only that (slot, bank hash);
/// - with trusted peers, only snapshots one of them advertises;
/// - otherwise only snapshots at least `min_agreeing_peers` peers agree on;
///
/// and of those the highest slot (then the most peers, then the lowest root, so every node
/// chooses alike). The peers to fetch from are those advertising it in the chunk size most of
/// them serve.
pub(crate) fn decide(adverts: &[Advert], local_slot: Option<u64>, rule: &Rule) -> Decision {
    let mut groups: HashMap<SnapshotKey, Vec<&Advert>> = HashMap::new();
    let mut by_slot: BTreeMap<u64, HashMap<(BankHash, ContentRoot), Vec<PeerId>>> = BTreeMap::new();
    for a in adverts {
        groups.entry(SnapshotKey::of(a)).or_default().push(a);
        by_slot
            .entry(a.slot)
            .or_default()
            .entry((a.bank_hash, a.content_root))
            .or_default()
            .push(a.peer);
    }
    let conflicts = by_slot
        .into_iter()
        .filter(|(_, variants)| variants.len() > 1)
        .map(|(slot, variants)| {
            let mut variants: Vec<_> = variants
                .into_iter()
                .map(|((h, r), mut peers)| {
                    peers.sort();
                    (h, r, peers)
                })
                .collect();
            variants.sort_by_key(|v| std::cmp::Reverse(v.2.len()));
            Conflict { slot, variants }
        })
        .collect();

    let trust_configured = rule.trusted_snapshot.is_some() || !rule.trusted_peers.is_empty();
    let eligible = groups.into_iter().filter(|(key, peers)| {
        if local_slot.is_some_and(|s| key.slot <= s) {
            return false;
        }
        if let Some((slot, hash)) = rule.trusted_snapshot
            && (key.slot, key.bank_hash) != (slot, hash)
        {
            return false;
        }
        if !rule.trusted_peers.is_empty()
            && !peers.iter().any(|a| rule.trusted_peers.contains(&a.peer))
        {
            return false;
        }
        trust_configured || peers.len() >= rule.min_agreeing_peers.max(1)
    });
    let best = eligible.max_by(|(ka, pa), (kb, pb)| {
        ka.slot
            .cmp(&kb.slot)
            .then(pa.len().cmp(&pb.len()))
            .then(kb.content_root.cmp(&ka.content_root))
    });
    let choice = best.map(|(key, peers)| {
        let mut sizes: HashMap<ChunkSize, usize> = HashMap::new();
        for a in &peers {
            *sizes.entry(a.chunk_size).or_default() += 1;
        }
        let chunk_size = sizes
            .into_iter()
            .max_by_key(|(size, n)| (*n, std::cmp::Reverse(*size)))
            .map(|(size, _)| size)
            .expect("a group is never empty");
        let mut peers: Vec<Advert> = peers
            .into_iter()
            .filter(|a| a.chunk_size == chunk_size)
            .cloned()
            .collect();
        peers.sort_by_key(|a| a.peer);
        Choice {
            key,
            chunk_size,
            peers,
        }
    });
    Decision { choice, conflicts }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn advert(peer: PeerId, slot: u64, hash: u8, root: u8) -> Advert {
        Advert {
            peer,
            slot,
            bank_hash: BankHash([hash; 32]),
            content_root: ContentRoot([root; 32]),
            archive_size: 1000,
            chunk_size: ChunkSize::DEFAULT,
            modified_time: 0,
            streamer_addrs: vec!["127.0.0.1:1".parse().unwrap()],
        }
    }

    fn rule(min: usize) -> Rule {
        Rule {
            min_agreeing_peers: min,
            ..Rule::default()
        }
    }

    #[test]
    fn highest_agreed_slot_wins_and_forgers_are_reported() {
        let peers: Vec<PeerId> = (0..5).map(|_| PeerId::random()).collect();
        let adverts = vec![
            advert(peers[0], 100, 1, 1),
            advert(peers[1], 100, 1, 1),
            advert(peers[2], 100, 1, 1),
            advert(peers[3], 100, 9, 9), // a forged hash for the same slot
            advert(peers[4], 150, 7, 7), // a lone, newer claim
        ];
        let d = decide(&adverts, None, &rule(2));
        let c = d.choice.unwrap();
        assert_eq!(c.key.slot, 100);
        assert_eq!(c.key.bank_hash, BankHash([1; 32]));
        assert_eq!(c.peers.len(), 3);
        assert_eq!(d.conflicts.len(), 1);
        assert_eq!(d.conflicts[0].slot, 100);
        assert_eq!(d.conflicts[0].variants[0].2.len(), 3, "majority first");
        assert_eq!(d.conflicts[0].variants[1].2, vec![peers[3]]);
        // With one peer enough, the newest claim wins.
        assert_eq!(
            decide(&adverts, None, &rule(1)).choice.unwrap().key.slot,
            150
        );
    }

    #[test]
    fn nothing_newer_than_local_is_chosen() {
        let p = PeerId::random();
        assert!(
            decide(&[advert(p, 50, 1, 1)], Some(50), &rule(1))
                .choice
                .is_none()
        );
        assert!(
            decide(&[advert(p, 51, 1, 1)], Some(50), &rule(1))
                .choice
                .is_some()
        );
        assert!(decide(&[], None, &rule(1)).choice.is_none());
    }

    #[test]
    fn trusted_peers_and_snapshots_override_agreement() {
        let (t, a, b) = (PeerId::random(), PeerId::random(), PeerId::random());
        let adverts = vec![
            advert(t, 100, 1, 1),
            advert(a, 100, 1, 1),
            advert(b, 200, 2, 2),
            advert(PeerId::random(), 200, 2, 2),
        ];
        let trusted = Rule {
            trusted_peers: [t].into(),
            ..rule(3)
        };
        let c = decide(&adverts, None, &trusted).choice.unwrap();
        assert_eq!(c.key.slot, 100);
        assert_eq!(
            c.peers.len(),
            2,
            "fetched from every peer with the same snapshot"
        );
        let pinned = Rule {
            trusted_snapshot: Some((200, BankHash([2; 32]))),
            ..rule(5)
        };
        assert_eq!(
            decide(&adverts, None, &pinned).choice.unwrap().key.slot,
            200
        );
        let missing = Rule {
            trusted_snapshot: Some((300, BankHash([3; 32]))),
            ..rule(1)
        };
        assert!(decide(&adverts, None, &missing).choice.is_none());
    }

    #[test]
    fn ties_and_chunk_sizes_are_settled_alike() {
        let peers: Vec<PeerId> = (0..4).map(|_| PeerId::random()).collect();
        let mut odd = advert(peers[2], 10, 1, 1);
        odd.chunk_size = ChunkSize::MIN;
        let adverts = vec![
            advert(peers[0], 10, 1, 1),
            advert(peers[1], 10, 1, 1),
            odd,
            advert(peers[3], 10, 2, 2),
        ];
        let c = decide(&adverts, None, &rule(1)).choice.unwrap();
        assert_eq!(c.key.bank_hash, BankHash([1; 32]), "more peers win a tie");
        assert_eq!(c.chunk_size, ChunkSize::DEFAULT);
        assert_eq!(
            c.peers.len(),
            2,
            "the peer with another chunk size is left out"
        );
        // The same whatever the order.
        let mut reversed = adverts.clone();
        reversed.reverse();
        assert_eq!(decide(&reversed, None, &rule(1)).choice.unwrap(), c);
    }
}
