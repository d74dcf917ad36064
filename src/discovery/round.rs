//! Rounds: when a node asks, how it asks (the topic, directly), the answers it collects and
//! the decision that ends a round.

use std::time::{Duration, Instant};

use libp2p::PeerId;
use rand::Rng as _;

use super::book::Standing;
use super::message;
use super::{Action, Advert, Discovery, Notice, Published, SUBSCRIBE_GRACE, Stage, decide};
use crate::log::DISCOVERY as TARGET;
use crate::metrics::MessageKind;
use crate::proto;
use crate::snapshot::SnapshotKey;

/// Most request nonces remembered (besides the age limit); answers to older requests are
/// dropped. Requests are spaced by `min_request_interval`, so at the defaults this is well
/// over the two discovery intervals a nonce is kept for.
const MAX_OUTSTANDING: usize = 256;

impl Discovery {
    /// The chain's tip, as the owner knows it (from its consensus, say). A node behind it by
    /// more than `behind_threshold` asks at once.
    pub(crate) fn handle_chain_tip(&mut self, tip: u64, now: Instant) {
        self.tip = Some((tip, now));
        if self.stage == Stage::Idle && !self.knows_current(now) {
            self.start_round(now);
        }
    }

    /// Asks peers now, whether or not the node needs a snapshot.
    pub(crate) fn handle_sync_now(&mut self, now: Instant) {
        if self.stage == Stage::Idle {
            self.start_round(now);
        }
    }

    /// How publishing a message went: a request that reached no peer does not count as asked,
    /// so the first peer to join the topic gets it at once.
    pub(crate) fn handle_published(&mut self, kind: Published, delivered: bool) {
        match (kind, delivered) {
            (Published::Request, true) => self.metrics.message(MessageKind::RequestSent),
            (Published::Announcement, true) => self.metrics.message(MessageKind::AnnouncementSent),
            (Published::Request, false) => {
                self.requests.last_request = self.requests.previous_request
            }
            (Published::Announcement, false) => {}
        }
    }

    /// `peer` answered this node: a request it published (its nonce is checked), or in the
    /// response to an ask.
    pub(crate) fn handle_answer(
        &mut self,
        peer: PeerId,
        answer: &proto::SnapshotInfoResponse,
        to: super::AnswerTo,
        now: Instant,
    ) {
        if self.ignores(&peer, now) {
            return;
        }
        let horizon = self.config.discovery_interval * 2;
        let solicited = to == super::AnswerTo::Ask
            || self.requests.outstanding.iter().any(|(n, t)| {
                *n == answer.request_nonce && now.saturating_duration_since(*t) < horizon
            });
        if !solicited {
            self.metrics.message(MessageKind::Unsolicited);
            tracing::debug!(target: TARGET, %peer, "dropped an answer to no request of ours");
            return;
        }
        if !answer.has_snapshot && answer.snapshots.is_empty() && answer.partial.is_empty() {
            return;
        }
        match message::check_advert(answer, peer, self.config.limits) {
            Ok(a) => {
                self.metrics.message(MessageKind::AnswerReceived);
                self.on_advert(a, Standing::Answered, now);
            }
            Err(e) => self.strike(peer, &e, now),
        }
    }

    /// A web source's index, read as the advert of the identity it stands as: recorded like an
    /// untrusted peer's answer to this node (it vouches for nothing more), so strangers'
    /// announcements cannot push out a source the owner configured.
    pub(crate) fn handle_web_advert(&mut self, mut advert: Advert, now: Instant) {
        if self.ignores(&advert.peer, now) {
            return;
        }
        // Held to the limits of any advert: a web server's bytes are as hostile as a peer's.
        // Each snapshot once, with the attestations listed beside it.
        let limits = self.config.limits;
        let listed: Vec<_> = std::mem::take(&mut advert.snapshots)
            .into_iter()
            .zip(
                std::mem::take(&mut advert.attestations)
                    .into_iter()
                    .chain(std::iter::repeat_with(Vec::new)),
            )
            .collect();
        for (ad, attestations) in listed {
            if let Err(e) = limits.check(&ad) {
                tracing::debug!(target: TARGET, peer = %advert.peer, error = %e, "a web source lists a snapshot beyond the limits");
                continue;
            }
            if advert.snapshots.iter().any(|s| s.key == ad.key) {
                continue;
            }
            advert.snapshots.push(ad);
            advert.attestations.push(attestations);
        }
        if advert.snapshots.is_empty() {
            return;
        }
        self.on_advert(advert, Standing::Answered, now);
    }

    pub(super) fn on_advert(&mut self, advert: Advert, standing: Standing, now: Instant) {
        self.requests.last_advert = Some(now);
        let peer = advert.peer;
        let addrs = advert.streamer_addrs.clone();
        let keys: Vec<(SnapshotKey, bool)> = advert
            .snapshots
            .iter()
            .map(|s| (s.key, false))
            .chain(advert.partial.iter().map(|h| (h.ad.key, true)))
            .collect();
        let ceiling = self.local_state(now).ceiling;
        self.book.set_ceiling(ceiling);
        if !self.book.insert(advert, standing, now, &self.config.policy) {
            return;
        }
        self.keep_new_attestations(&keys);
        if let Stage::Syncing { plan } = &self.stage {
            let mut added: Vec<SnapshotKey> = Vec::new();
            for (key, partial) in keys.iter().filter(|(k, _)| plan.fetches(k)) {
                // A peer that holds a snapshot whole and part of it is a complete holder.
                if added.contains(key) {
                    continue;
                }
                added.push(*key);
                self.actions.push_back(Action::AddSyncPeer {
                    key: *key,
                    peer,
                    addrs: addrs.clone(),
                    holding: if *partial {
                        crate::transfer::Holding::Partial
                    } else {
                        crate::transfer::Holding::Complete
                    },
                });
            }
        }
        if self.stage == Stage::Idle && self.config.sync_enabled && !self.knows_current(now) {
            self.start_round(now);
        }
    }

    /// Asks the driver to store the trusted attestations the book holds for the snapshots of
    /// `keys` this node holds and lacks them for (a validator keeps the others' signatures of
    /// what it made too, and its published index lists them).
    fn keep_new_attestations(&mut self, keys: &[(SnapshotKey, bool)]) {
        for (key, _) in keys {
            let carried = self.book.attestations(key);
            self.keep_attestations(key, carried);
        }
    }

    /// Asks the driver to store those of `trusted` (trusted peers' valid attestations of
    /// `key`) it lacks, if it holds `key`.
    pub(super) fn keep_attestations(
        &mut self,
        key: &SnapshotKey,
        trusted: Vec<crate::snapshot::Attestation>,
    ) {
        if trusted.is_empty() || !self.local.snapshots.iter().any(|s| s.key == *key) {
            return;
        }
        let held = self
            .local
            .attestations
            .get(key)
            .map_or(&[][..], Vec::as_slice);
        if held.len() >= crate::snapshot::MAX_ATTESTATIONS {
            return;
        }
        // Each (snapshot, signer) asked for once: a store that failed is not asked again at
        // every advert.
        let new: Vec<crate::snapshot::Attestation> = trusted
            .into_iter()
            .filter(|a| held.iter().all(|h| h.signer_key() != a.signer_key()))
            .filter(|a| self.keep_asked.put((*key, *a.signer_key()), ()).is_none())
            .collect();
        if !new.is_empty() {
            self.actions.push_back(Action::KeepAttestations {
                key: *key,
                attestations: new,
            });
        }
    }

    // ---- the rules ----

    pub(super) fn tick(&mut self, now: Instant) {
        // Forget what peers said long ago; what is current comes back in the answers.
        let horizon = self.config.discovery_interval * 2;
        self.book.expire(now, horizon, &self.config.policy);
        self.peers.waiting.expire(now, self.config.announce_window);
        self.failed.retain(|_, until| *until > now);
        if !self.config.sync_enabled {
            return;
        }
        match self.stage {
            Stage::Idle if !self.knows_current(now) => self.start_round(now),
            // A long download keeps learning holders of what it fetches.
            Stage::Syncing { .. } => self.request(now),
            _ => {}
        }
    }

    /// Whether a policy-accepted snapshot newer than the node's state by more than the
    /// threshold is known.
    pub(super) fn best_newer(&self, now: Instant) -> bool {
        match (self.local.slot, self.best_known_slot(now)) {
            (None, Some(_)) => true,
            (Some(local), Some(best)) => best > local.saturating_add(self.config.behind_threshold),
            _ => false,
        }
    }

    /// Whether the node looks for snapshots now: it is in a round or a sync, or it syncs and
    /// does not know it is current.
    pub(super) fn wants_answers(&self, now: Instant) -> bool {
        match &self.stage {
            Stage::Syncing { .. } | Stage::Collecting { .. } => true,
            Stage::Idle => self.config.sync_enabled && !self.knows_current(now),
        }
    }

    /// Whether the node knows it is current (see the module docs).
    pub(super) fn knows_current(&self, now: Instant) -> bool {
        let Some(local) = self.local.slot else {
            return false;
        };
        if let Some(tip) = self.tip(now) {
            return local.saturating_add(self.config.behind_threshold) >= tip;
        }
        let informed = self
            .requests
            .last_request
            .is_some_and(|t| now.saturating_duration_since(t) < self.config.announce_window);
        informed && !self.best_newer(now)
    }

    /// How long answers must have been quiet for a round to decide early.
    pub(super) fn quiet_period(&self) -> Duration {
        self.config.answer_window / 4
    }

    /// Whether the round may decide before its window ends: an acceptable snapshot newer than
    /// the node's state is known and no answer came for a quarter of the window (on a LAN, the
    /// answers of everyone asked are in within milliseconds; the window is for the far ones).
    pub(super) fn quiet(&self, now: Instant) -> bool {
        let Stage::Collecting { until, .. } = self.stage else {
            return false;
        };
        let started = until - self.config.answer_window;
        let quiet = self.quiet_period();
        now.saturating_duration_since(started) >= quiet
            && self
                .requests
                .last_advert
                .is_some_and(|t| now.saturating_duration_since(t) >= quiet)
            && self.best_newer(now)
    }

    pub(super) fn start_round(&mut self, now: Instant) {
        if let Some(v) = &self.verdicts {
            v.forget_refusals();
        }
        self.request(now);
        // Peers connected but not seen on the topic are asked directly: gossip may not reach
        // them (a peer restarted under the same identity gets no subscription message).
        // (Peers that connected a moment ago are left the grace to join.)
        let grace = SUBSCRIBE_GRACE.min(self.config.answer_window / 4);
        let direct: Vec<PeerId> = self
            .peers
            .connected
            .iter()
            .filter(|(p, since)| {
                now.saturating_duration_since(**since) >= grace
                    && !self.peers.subscribed.contains(*p)
                    && !self.ignores(p, now)
            })
            .map(|(p, _)| *p)
            .take(self.config.max_direct_asks)
            .collect();
        for p in direct {
            self.ask(p, now);
        }
        if self.stage != Stage::Idle {
            return;
        }
        self.requests.round += 1;
        self.metrics.discovery_rounds.inc();
        let local_slot = self.local.slot;
        tracing::info!(target: TARGET, round = self.requests.round, ?local_slot, "asking peers for snapshots");
        self.stage = Stage::Collecting {
            round: self.requests.round,
            until: now + self.config.answer_window,
        };
        self.actions.push_back(Action::Notice(Notice::Started {
            round: self.requests.round,
            local_slot,
        }));
    }

    /// A nonce for a published request, remembered for two discovery intervals so that late
    /// answers are taken. (Never 0: that is the nonce of announcements.)
    fn new_nonce(&mut self, now: Instant) -> u64 {
        let nonce = self.rng.random::<u64>() | 1;
        let horizon = self.config.discovery_interval * 2;
        while self
            .requests
            .outstanding
            .front()
            .is_some_and(|(_, t)| now.saturating_duration_since(*t) >= horizon)
            || self.requests.outstanding.len() >= MAX_OUTSTANDING
        {
            self.requests.outstanding.pop_front();
        }
        self.requests.outstanding.push_back((nonce, now));
        nonce
    }

    /// Publishes a request now, or, if the last one was too recent, as soon as allowed.
    pub(super) fn request(&mut self, now: Instant) {
        if let Some(last) = self.requests.last_request
            && now.saturating_duration_since(last) < self.config.min_request_interval
        {
            self.requests.request_pending = Some(last + self.config.min_request_interval);
            return;
        }
        self.requests.request_pending = None;
        self.requests.previous_request = self.requests.last_request;
        self.requests.last_request = Some(now);
        let nonce = self.new_nonce(now);
        let msg = message::request(self.me, nonce, self.local.slot, &self.listen_addrs);
        self.actions.push_back(Action::Publish {
            kind: Published::Request,
            bytes: message::gossip(proto::discovery_message::Body::Request(msg)),
        });
    }

    /// Asks `peer` directly, unless it was asked a moment ago.
    pub(super) fn ask(&mut self, peer: PeerId, now: Instant) {
        if self.peers.not_snapsync.contains(&peer) {
            return;
        }
        if self
            .peers
            .asked
            .at(&peer)
            .is_some_and(|t| now.saturating_duration_since(t) < self.config.answer_cooldown)
        {
            return;
        }
        self.peers.asked.insert(peer, (), now);
        // The answer comes back as the ask's response: no nonce to remember.
        let nonce = self.rng.random::<u64>() | 1;
        let request = message::request(self.me, nonce, self.local.slot, &[]);
        self.metrics.message(MessageKind::AskSent);
        self.actions.push_back(Action::Ask { peer, request });
    }

    /// The answer window closed: choose, and start the sync or say there is nothing.
    pub(super) fn decide(&mut self, round: u64, now: Instant) {
        let local = self.local_state(now);
        let failed = |k: &SnapshotKey| {
            self.failed.get(k).is_some_and(|until| *until > now)
                || self.refused.contains(&(k.slot, k.bank_hash))
        };
        let decision = decide::decide(&self.book, local, &self.config.policy, &failed);
        for conflict in decision.conflicts {
            tracing::warn!(target: TARGET, slot = conflict.slot, variants = conflict.variants.len(), "peers advertise different snapshots for the same slot");
            self.actions
                .push_back(Action::Notice(Notice::Conflict(conflict)));
        }
        match decision.plan {
            Some(plan) => {
                let last = plan.last().ad.key;
                tracing::info!(
                    target: TARGET,
                    kind = %last.kind,
                    slot = last.slot,
                    bank_hash = %last.bank_hash.short(),
                    with_full = plan.full.is_some(),
                    bytes = plan.bytes(),
                    peers = plan.last().peers.len(),
                    "snapshot chosen"
                );
                self.actions
                    .push_back(Action::Notice(Notice::Chosen(Box::new(plan.clone()))));
                self.actions
                    .push_back(Action::StartSync(Box::new(plan.clone())));
                self.stage = Stage::Syncing {
                    plan: Box::new(plan),
                };
            }
            None => {
                let adverts = self.book.len();
                tracing::info!(target: TARGET, round, adverts, "no snapshot to take; asking again next tick");
                self.stage = Stage::Idle;
                self.actions
                    .push_back(Action::Notice(Notice::NothingToTake { round, adverts }));
            }
        }
    }
}
