//! Announcements: of new snapshots and new partial holdings, to the nodes that wait for them,
//! unless enough others announced the same meanwhile.

use std::time::{Duration, Instant};

use libp2p::PeerId;
use rand::Rng as _;

use super::book::Standing;
use super::message;
use super::{Action, Advert, Discovery, PartialAd, Published, Rng, Verdict};
use crate::log::DISCOVERY as TARGET;
use crate::metrics::MessageKind;
use crate::proto;
use crate::snapshot::SnapshotKey;

/// A random duration below `d`.
fn below(rng: &mut Rng, d: Duration) -> Duration {
    let nanos = d.as_nanos() as u64;
    if nanos == 0 {
        return Duration::ZERO;
    }
    Duration::from_nanos(rng.random_range(0..nanos))
}

/// An announcement waiting for its moment.
#[derive(Debug, Clone)]
pub(super) struct PendingAnnounce {
    pub(super) at: Instant,
    pub(super) key: SnapshotKey,
    pub(super) heard: u32,
    /// It announces a partial holding (new snapshots go out whatever their number).
    pub(super) partial: bool,
}

/// Announcements of the same partial holding heard after which a node does not announce its
/// own: enough sources to start with, and answers bring in more.
const PARTIAL_REDUNDANCY: u32 = 16;

impl Discovery {
    /// The snapshots this node downloads and serves part of now, with how much. A holding new
    /// since the last call is announced if someone waits (see the module docs).
    pub(crate) fn handle_partials(&mut self, partials: Vec<PartialAd>, now: Instant) {
        let new = partials
            .iter()
            .find(|p| !self.partials.iter().any(|q| q.ad.key == p.ad.key))
            .map(|p| p.ad.key);
        self.partials = partials;
        if let Some(key) = new
            && self.announce.is_none()
        {
            self.peers.waiting.expire(now, self.config.announce_window);
            if self.peers.waiting.len() > 0 {
                let delay = below(&mut self.rng, self.config.announce_delay);
                self.announce = Some(PendingAnnounce {
                    at: now + delay,
                    key,
                    heard: 0,
                    partial: true,
                });
            }
        }
    }

    /// The node made or loaded a snapshot (after [`Discovery::handle_local`]).
    pub(crate) fn handle_snapshot_created(&mut self, now: Instant) {
        self.schedule_announce(now);
    }

    /// An announcement: recorded (within what its relay may bring in), and forwarded only when
    /// someone besides its one stranger vouches for its snapshot.
    pub(super) fn on_announcement(&mut self, a: Advert, relay: PeerId, now: Instant) -> Verdict {
        self.metrics.message(MessageKind::AnnouncementReceived);
        if let Some(p) = self.announce.as_mut()
            && (a.snapshots.iter().any(|s| s.key == p.key)
                || (p.partial && a.partial.iter().any(|h| h.ad.key == p.key)))
        {
            p.heard += 1;
        }
        let trusted = self.config.policy.trusts(&a.peer);
        let known = |key: &SnapshotKey| {
            self.local.snapshots.iter().any(|s| s.key == *key)
                || self
                    .book
                    .entry(key)
                    .is_some_and(|e| e.peers.iter().any(|p| *p != a.peer))
        };
        // Forwarded when its newest snapshot, or (for partial holdings only) a snapshot it
        // holds part of, is vouched for by someone else.
        let vouched = trusted
            || match a.newest() {
                Some(n) => known(&n.key),
                None => a.partial.iter().any(|h| known(&h.ad.key)),
            };
        // A relay brings in a bounded number of new announcers per interval.
        let known = self.book.standing(&a.peer).is_some();
        if !trusted && !known {
            if self
                .peers
                .relayed
                .at(&relay)
                .is_some_and(|t| now.saturating_duration_since(t) >= self.config.discovery_interval)
            {
                self.peers.relayed.insert(relay, 0, now);
            }
            let brought = self.peers.relayed.get(&relay).copied().unwrap_or(0);
            if brought >= self.config.announcements_per_source {
                tracing::debug!(target: TARGET, %relay, "this relay brought in its share of new announcers; dropping");
                return Verdict::Ignore;
            }
            let since = self.peers.relayed.at(&relay).unwrap_or(now);
            self.peers.relayed.insert(relay, brought + 1, since);
        }
        self.on_advert(a, Standing::Announced, now);
        if vouched {
            Verdict::Accept
        } else {
            Verdict::Ignore
        }
    }

    pub(super) fn schedule_announce(&mut self, now: Instant) {
        self.peers.waiting.expire(now, self.config.announce_window);
        if self.peers.waiting.len() == 0 {
            return;
        }
        let Some(newest) = self.local.snapshots.iter().max_by_key(|s| s.key.slot) else {
            return;
        };
        let delay = below(&mut self.rng, self.config.announce_delay);
        self.announce = Some(PendingAnnounce {
            at: now + delay,
            key: newest.key,
            heard: 0,
            partial: false,
        });
    }

    pub(super) fn fire_announce(&mut self, now: Instant) {
        let Some(pending) = self.announce.take() else {
            return;
        };
        let redundancy = if pending.partial {
            PARTIAL_REDUNDANCY
        } else {
            self.config.announce_redundancy
        };
        if pending.heard >= redundancy {
            tracing::debug!(target: TARGET, heard = pending.heard, "enough peers announced the same snapshot; not announcing");
            return;
        }
        self.peers.waiting.expire(now, self.config.announce_window);
        if self.peers.waiting.len() == 0 || self.streamer_addrs.is_empty() {
            return;
        }
        let advert = self.own_advert(0);
        tracing::info!(target: TARGET, waiting = self.peers.waiting.len(), slot = pending.key.slot, "announcing a new snapshot");
        self.actions.push_back(Action::Publish {
            kind: Published::Announcement,
            bytes: message::gossip(proto::discovery_message::Body::Announcement(advert)),
        });
    }
}
