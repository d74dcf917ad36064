//! Answering requests: who gets an answer, when, and at what cost in dials.

use std::time::Instant;

use libp2p::PeerId;

use super::message::{self, InfoRequest};
use super::{Action, Discovery, Stage};
use crate::log::DISCOVERY as TARGET;
use crate::metrics::MessageKind;
use crate::proto;
use crate::snapshot::SnapshotKey;

impl Discovery {
    /// `peer` asked this node directly: the answer to send back (`None`: nothing newer, or
    /// not now).
    pub(crate) fn handle_ask(
        &mut self,
        peer: PeerId,
        request: &proto::SnapshotInfoRequest,
        now: Instant,
    ) -> Option<proto::SnapshotInfoResponse> {
        if self.ignores(&peer, now) {
            return None;
        }
        self.metrics.message(MessageKind::AskReceived);
        match message::check_request(request, peer) {
            Ok(r) => self.on_request(peer, r, false, now),
            Err(e) => {
                self.strike(peer, &e, now);
                None
            }
        }
    }

    /// A request from `peer`: note that it waits, and answer it if this node holds something
    /// newer. Gossip requests are answered with a message of their own (`via_gossip`); a direct
    /// ask gets the answer as its response.
    pub(super) fn on_request(
        &mut self,
        peer: PeerId,
        r: InfoRequest,
        via_gossip: bool,
        now: Instant,
    ) -> Option<proto::SnapshotInfoResponse> {
        if via_gossip {
            self.metrics.message(MessageKind::RequestReceived);
        }
        self.peers.waiting.insert(peer, (), now);
        let newest = self
            .local
            .snapshots
            .iter()
            .map(|s| s.key.slot)
            .chain(self.partials.iter().map(|p| p.ad.key.slot))
            .max()?;
        if r.slot.is_some_and(|s| newest <= s) || self.streamer_addrs.is_empty() {
            return None;
        }
        if self
            .peers
            .answered
            .at(&peer)
            .is_some_and(|t| now.saturating_duration_since(t) < self.config.answer_cooldown)
        {
            return None;
        }
        if via_gossip && !self.peers.connected.contains_key(&peer) && !self.take_dial(now) {
            tracing::debug!(target: TARGET, %peer, "dial budget spent; not answering a peer we are not connected to");
            return None;
        }
        self.peers.answered.insert(peer, (), now);
        let answer = self.own_advert(r.nonce);
        self.metrics.message(MessageKind::AnswerSent);
        if via_gossip {
            self.actions.push_back(Action::Answer {
                peer,
                answer,
                addrs: r.addrs,
            });
            None
        } else {
            Some(answer)
        }
    }

    /// What this node holds and serves, as an advert (an answer to the request with `nonce`, or
    /// an announcement with 0).
    pub(super) fn own_advert(&self, nonce: u64) -> proto::SnapshotInfoResponse {
        message::advert(
            self.me,
            &self.local.snapshots,
            &|k| self.relayed_attestations(k),
            &self.partials,
            &self.streamer_addrs,
            self.local.slot,
            self.local.modified_time,
            nonce,
        )
    }

    /// The attestations its adverts carry with `key`, one per signer, at most
    /// [`MAX_ATTESTATIONS`](crate::snapshot::MAX_ATTESTATIONS): its own signature first, then
    /// those of the keys its policy names now (stored with the snapshot, carried by adverts,
    /// those its sync was chosen with), then the rest of what it stored (signers trusted once:
    /// a set that changed by epoch is relayed as it is now).
    fn relayed_attestations(&self, key: &SnapshotKey) -> Vec<crate::snapshot::Attestation> {
        use crate::snapshot::merge_attestations as merge;
        let stored = self
            .local
            .attestations
            .get(key)
            .map_or(&[][..], Vec::as_slice);
        let mine = crate::snapshot::ed25519_key_of(&self.me);
        let (own, others): (Vec<_>, Vec<_>) =
            (stored.iter().cloned()).partition(|a| Some(*a.signer_key()) == mine);
        let (named, rest): (Vec<_>, Vec<_>) = others.into_iter().partition(|a| self.book.names(a));
        let mut list = own;
        merge(&mut list, &named);
        merge(&mut list, &self.book.attestations(key));
        if let Stage::Syncing { plan } = &self.stage {
            let chosen = plan.full.iter().chain(&plan.incremental);
            for t in chosen.filter(|t| t.ad.key == *key) {
                merge(&mut list, &t.attestations);
            }
        }
        merge(&mut list, &rest);
        list
    }

    /// One dial (to answer a peer not connected) out of the interval's budget.
    fn take_dial(&mut self, now: Instant) -> bool {
        if now.saturating_duration_since(self.dials.0) >= self.config.discovery_interval {
            self.dials = (now, 0);
        }
        if self.dials.1 >= self.config.dial_budget {
            return false;
        }
        self.dials.1 += 1;
        true
    }
}
