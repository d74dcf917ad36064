//! What a node's streamer and its downloads share, through the store handle both hold: the
//! snapshots being downloaded whose verified chunks may be served meanwhile, and how much each
//! peer gave this node lately (the streamer serves first those that give).

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use lru::LruCache;

use crate::hash::ContentRoot;
use crate::snapshot::Manifest;

/// How long what a peer gave counts: its weight halves over this.
const GIVEN_HALF_LIFE: Duration = Duration::from_secs(20);

/// Peers whose gifts are remembered; beyond, the least recently credited is forgotten.
const GIVERS: NonZeroUsize = NonZeroUsize::new(4096).expect("not zero");

/// A partial download whose verified chunks may be served: its checked manifest, its files
/// opened for serving, and which chunks are verified on disk (with their proof nodes).
#[derive(Debug)]
pub(crate) struct PartialOffer {
    pub(crate) manifest: Manifest,
    pub(crate) source: Arc<crate::chunk::ChunkSource>,
    pub(crate) verified: Arc<crate::chunk::VerifiedChunks>,
    /// Data bytes served from it.
    pub(crate) served: Arc<AtomicU64>,
    /// Takes a peer that asked what it holds, and downloads it too, as a source of the
    /// download (its PeerId and where it serves); whether it was passed on.
    pub(crate) introduce: Introducer,
}

/// See [`PartialOffer::introduce`].
pub(crate) struct Introducer(
    pub(crate) Box<dyn Fn(PeerId, std::net::SocketAddr) -> bool + Send + Sync>,
);

impl std::fmt::Debug for Introducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Introducer")
    }
}

/// What a peer gave, decaying.
#[derive(Debug, Clone, Copy)]
struct Given {
    bytes: f64,
    at: Instant,
}

impl Given {
    fn at(self, now: Instant) -> f64 {
        let halves =
            now.saturating_duration_since(self.at).as_secs_f64() / GIVEN_HALF_LIFE.as_secs_f64();
        self.bytes * 0.5f64.powf(halves)
    }
}

/// See the module docs.
#[derive(Debug)]
pub(crate) struct Exchange {
    offers: Mutex<HashMap<ContentRoot, Arc<PartialOffer>>>,
    given: Mutex<LruCache<PeerId, Given>>,
}

impl Default for Exchange {
    fn default() -> Self {
        Self {
            offers: Mutex::new(HashMap::new()),
            given: Mutex::new(LruCache::new(GIVERS)),
        }
    }
}

impl Exchange {
    fn offers(&self) -> std::sync::MutexGuard<'_, HashMap<ContentRoot, Arc<PartialOffer>>> {
        self.offers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Offers a partial download's verified chunks for serving until the guard is dropped.
    pub(crate) fn offer(self: &Arc<Self>, offer: PartialOffer) -> OfferGuard {
        let root = offer.manifest.content_root;
        self.offers().insert(root, Arc::new(offer));
        OfferGuard {
            exchange: self.clone(),
            root,
        }
    }

    /// The partial download of `root` offered for serving, if any.
    pub(crate) fn offered(&self, root: &ContentRoot) -> Option<Arc<PartialOffer>> {
        self.offers().get(root).cloned()
    }

    /// Every partial download offered for serving.
    pub(crate) fn all_offered(&self) -> Vec<Arc<PartialOffer>> {
        self.offers().values().cloned().collect()
    }

    /// `peer` delivered `bytes` verified bytes to one of this node's downloads.
    pub(crate) fn credit(&self, peer: PeerId, bytes: u64, now: Instant) {
        let mut given = self.given.lock().unwrap_or_else(|p| p.into_inner());
        let was = given.get(&peer).map_or(0.0, |g| g.at(now));
        given.put(
            peer,
            Given {
                bytes: was + bytes as f64,
                at: now,
            },
        );
    }

    /// How much `peer` gave lately: bytes, each counting for less as it ages (by half every
    /// twenty seconds).
    pub(crate) fn given(&self, peer: &PeerId, now: Instant) -> f64 {
        let given = self.given.lock().unwrap_or_else(|p| p.into_inner());
        given.peek(peer).map_or(0.0, |g| g.at(now))
    }
}

/// Withdraws a partial offer when dropped.
#[derive(Debug)]
pub(crate) struct OfferGuard {
    exchange: Arc<Exchange>,
    root: ContentRoot,
}

impl Drop for OfferGuard {
    fn drop(&mut self) {
        self.exchange.offers().remove(&self.root);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_peer_gave_counts_for_less_as_it_ages() {
        let x = Exchange::default();
        let (a, b) = (PeerId::random(), PeerId::random());
        let t0 = Instant::now();
        x.credit(a, 1000, t0);
        x.credit(a, 1000, t0);
        assert_eq!(x.given(&a, t0), 2000.0);
        assert_eq!(x.given(&b, t0), 0.0);
        let later = x.given(&a, t0 + GIVEN_HALF_LIFE);
        assert!((later - 1000.0).abs() < 1e-6, "{later}");
    }
}
