//! The peers around: connections, who is on the topic, who does not speak snapsync, and
//! strikes.

use std::time::Instant;

use libp2p::PeerId;

use super::{Action, Discovery, Notice, SUBSCRIBE_GRACE, Stage};
use crate::log::DISCOVERY as TARGET;
use crate::metrics::MessageKind;

impl Discovery {
    /// A connection to `peer` was established (also a second one, to a peer restarted under the
    /// same identity).
    pub(crate) fn handle_connected(&mut self, peer: PeerId, now: Instant) {
        let cap = self.config.max_tracked_peers;
        if !self.peers.connected.contains_key(&peer) && self.peers.connected.len() >= cap {
            return; // beyond the table's bound: reached through the topic only
        }
        self.peers.connected.insert(peer, now);
        if self.wants_answers(now) && !self.ignores(&peer, now) {
            if self.peers.ask_due.len() >= cap {
                self.peers.ask_due.pop_front();
            }
            let grace = SUBSCRIBE_GRACE.min(self.config.answer_window / 4);
            self.peers.ask_due.push_back((peer, now + grace));
            if self.stage == Stage::Idle {
                self.start_round(now);
            }
        }
    }

    /// The last connection to `peer` closed.
    pub(crate) fn handle_disconnected(&mut self, peer: PeerId) {
        self.peers.connected.remove(&peer);
        self.peers.subscribed.remove(&peer);
        self.peers.not_snapsync.remove(&peer);
    }

    /// `peer` joined snapsync's topic.
    pub(crate) fn handle_subscribed(&mut self, peer: PeerId, now: Instant) {
        if self.peers.subscribed.len() < self.config.max_tracked_peers {
            self.peers.subscribed.insert(peer);
        }
        match self.stage {
            Stage::Idle if self.config.sync_enabled && !self.knows_current(now) => {
                self.start_round(now)
            }
            // Ask the newcomer too: its answer joins the round, or the download.
            Stage::Collecting { .. } | Stage::Syncing { .. } => self.request(now),
            Stage::Idle => {}
        }
    }

    /// An ask of this node failed because `peer` does not speak snapsync: it is not asked again
    /// while it stays connected.
    pub(crate) fn handle_not_snapsync(&mut self, peer: PeerId) {
        if self.peers.connected.contains_key(&peer) {
            self.peers.not_snapsync.insert(peer);
        }
    }

    /// Whether `peer` is ignored for misbehaving.
    pub(crate) fn ignores(&self, peer: &PeerId, now: Instant) -> bool {
        self.strikes_of(peer, now) >= self.config.max_strikes
    }

    /// `peer`'s strikes now: one is forgotten every `strike_decay` since the last.
    fn strikes_of(&self, peer: &PeerId, now: Instant) -> u32 {
        let (Some(count), Some(at)) = (self.peers.strikes.get(peer), self.peers.strikes.at(peer))
        else {
            return 0;
        };
        let decay = self.config.strike_decay.as_nanos().max(1);
        let forgotten = now.saturating_duration_since(at).as_nanos() / decay;
        count.saturating_sub(forgotten.min(u128::from(u32::MAX)) as u32)
    }

    pub(super) fn strike(&mut self, peer: PeerId, error: &dyn std::fmt::Display, now: Instant) {
        self.metrics.message(MessageKind::Malformed);
        let strikes = self.strikes_of(&peer, now) + 1;
        self.peers.strikes.insert(peer, strikes, now);
        tracing::debug!(target: TARGET, %peer, %error, strikes, "dropped a bad message");
        if strikes == self.config.max_strikes {
            tracing::warn!(target: TARGET, %peer, %error, "peer keeps sending bad messages; ignoring it");
            self.book.forget(&peer, &self.config.policy);
            self.actions.push_back(Action::Notice(Notice::Misbehaved {
                peer,
                reason: error.to_string(),
            }));
        }
    }
}
