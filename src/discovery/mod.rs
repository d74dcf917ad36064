//! Discovery and decision as a sans-IO state machine: [`Discovery`].
//!
//! No sockets, no clocks, no tasks, no gossipsub calls. The vocabulary is quinn-proto's: the
//! driver (the behaviour, or the simulator) tells it what happened, with the time
//! (`handle_*`), wakes it at [`Discovery::poll_timeout`] ([`Discovery::handle_timeout`]), and
//! carries out what it queued ([`Discovery::poll`]): publish a request or an announcement, ask
//! or answer a peer, start or extend a sync, delete a snapshot, report an event. Every rule is
//! unit-tested with injected time (`tests/`, and `decide.rs`, `outcome.rs` for the choice and
//! the end of a sync), and `sim.rs` runs thousands of machines on a simulated gossip mesh.
//! The machine's methods are kept by job: `round.rs` (asking, the answers collected, the
//! decision), `answer.rs` (answering requests), `announce.rs` (announcements) and `peers.rs`
//! (connections, the topic's subscribers, strikes); this file holds its state and entry points.
//!
//! # The rules
//! - **Ask unless current.** Every `discovery_interval` (the first at once) a node that syncs
//!   asks, unless it knows it is current: its owner told it the chain's tip lately and it is
//!   within `behind_threshold` of it, or it asked within `announce_window` (holders announce new
//!   snapshots to nodes that asked that recently) and heard of nothing newer than that. A node
//!   that restarts behind therefore asks at once.
//! - **A round** publishes a request on the topic and asks directly the connected peers not
//!   known to be on the topic, then collects answers for `answer_window` and decides (sooner
//!   once a snapshot newer than the node's state is acceptable and no answer came for a
//!   quarter of the window: nearby holders answer within milliseconds). A peer
//!   that connects while the node needs a snapshot is asked through the topic once it joins
//!   it, or directly if it has not joined a moment later (a peer restarted under the same
//!   identity gets no subscription message from a node that still holds its old connection).
//!   A request that could not be published (no peer on the topic yet) does not count: the
//!   first peer to join gets it at once.
//! - **Answers** go directly to the requester, once per `answer_cooldown`, only from nodes that
//!   hold something newer than the requester's slot; answering a peer not connected costs a
//!   dial, and at most `dial_budget` of those are made per interval. An answer must carry the
//!   nonce of a request this node made lately; others are dropped.
//! - **Trust.** Every advert is counted per snapshot as it arrives; only snapshots the
//!   [`TrustPolicy`] accepts raise the best known slot or are chosen, and none above the
//!   chain's tip (as the owner or the chain clock tells it) by more than `behind_threshold`.
//!   A node that executes the chain ([`Discovery::handle_slot`]) replaces its live state only
//!   when it was told it is behind, or with a snapshot a vouching policy accepts.
//! - **Identities are free.** Trusted peers' adverts and answers to this node's requests are
//!   never pushed out of the advert table by strangers' announcements, which hold a quarter
//!   of it at most; one connection relays at most `announcements_per_source` new announcers
//!   per interval; an announcement only one stranger vouches for is not forwarded.
//! - **Announcements.** A node that makes or loads a snapshot while someone asked within
//!   `announce_window` announces it after a random delay of up to `announce_delay`, unless it
//!   heard `announce_redundancy` announcements of the same snapshot meanwhile, so a snapshot
//!   that many nodes make at once is announced a few times, not once per node.
//! - **Strikes.** A message that fails its checks strikes its sender; at `max_strikes` the
//!   peer is ignored. A strike is forgotten after `strike_decay`. What a failed sync means
//!   (who is struck, what is cooled down or deleted) is the rule of `outcome.rs`; a peer whose
//!   chunks were proven bad is struck even when the sync succeeds from others.
//! - **During a sync** the node keeps asking every interval, and adds peers that advertise what
//!   it is fetching to the download.
//! - **Crowds.** A node that downloads a snapshot serves the chunks it verified meanwhile, and
//!   says so: its answers list its partial holdings, and when it starts serving one while
//!   others asked within `announce_window`, it announces it (after the same random delay,
//!   unless `PARTIAL_REDUNDANCY` others announced the same holding meanwhile). Other downloaders
//!   of the snapshot add such peers as partial sources. A partial holding is no vote: it never
//!   counts toward agreement on a snapshot, never makes one choosable, and adverts of nothing
//!   else stand lowest in the advert table.

mod advertise;
mod announce;
mod answer;
mod book;
mod config;
mod decide;
pub(crate) mod message;
mod outcome;
mod peers;
mod policy;
mod round;
mod signers;
#[cfg(any(test, feature = "sim"))]
pub mod sim;
#[cfg(test)]
mod tests;

pub(crate) use advertise::advertised;
pub use config::{ChainClock, DiscoveryConfig};
pub use decide::Conflict;
pub(crate) use decide::{Plan, Target};
pub use message::{Advert, PartialAd, SnapshotAd};
pub(crate) use outcome::{Failure, LegKind, SyncFailure, SyncOutcome};
pub use policy::{SnapshotVerifier, TrustPolicy};

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId};
use rand::SeedableRng;
use rand_xoshiro::Xoshiro256PlusPlus;

use self::announce::PendingAnnounce;
use self::book::{AdvertBook, PeerTable};
use self::decide::LocalState;
use self::message::Gossip;
use crate::hash::ContentRoot;
use crate::log::DISCOVERY as TARGET;
use crate::metrics::Metrics;
use crate::proto;
use crate::snapshot::{Base, SnapshotKey};

/// Lists of attestations served with one snapshot's manifest that are checked at the end of a
/// sync (one per source; the others' adverts carry the same signatures).
const MAX_SERVED_LISTS: usize = 64;

/// What an answer answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AnswerTo {
    /// A request this node published on the topic (its nonce says which).
    Request,
    /// A direct ask of this node (the response to it).
    Ask,
}

/// What discovery reports to the node's owner (the behaviour turns these into its events).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Notice {
    /// A round started.
    Started { round: u64, local_slot: Option<u64> },
    /// A plan was chosen.
    Chosen(Box<Plan>),
    /// Nothing could be taken.
    NothingToTake { round: u64, adverts: usize },
    /// Peers disagree about a slot.
    Conflict(Conflict),
    /// A peer keeps sending bad messages; it is ignored from now on.
    Misbehaved { peer: PeerId, reason: String },
}

/// What the driver should do.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Action {
    /// Publish this message on the topic, then report how that went
    /// ([`Discovery::handle_published`]).
    Publish {
        /// What it is.
        kind: Published,
        /// The encoded message.
        bytes: Vec<u8>,
    },
    /// Ask a connected peer directly.
    Ask {
        peer: PeerId,
        request: proto::SnapshotInfoRequest,
    },
    /// Answer a request seen on the topic, directly (dialing `addrs` if not connected).
    Answer {
        peer: PeerId,
        answer: proto::SnapshotInfoResponse,
        addrs: Vec<Multiaddr>,
    },
    /// Start syncing this plan.
    StartSync(Box<Plan>),
    /// Stop the sync under way, keeping its progress: it is no longer to be taken.
    CancelSync,
    /// Delete this snapshot from the node's store: its content is proven bad.
    DeleteSnapshot(ContentRoot),
    /// A peer advertises a snapshot the sync fetches: add it.
    AddSyncPeer {
        /// All of the snapshot, or part of it (it downloads the snapshot too).
        holding: crate::transfer::Holding,
        key: SnapshotKey,
        peer: PeerId,
        addrs: Vec<SocketAddr>,
    },
    /// Store these trusted peers' attestations with the held snapshot `key` (some arrived
    /// that it lacks), to relay them.
    KeepAttestations {
        key: SnapshotKey,
        attestations: Vec<crate::snapshot::Attestation>,
    },
    /// Report this.
    Notice(Notice),
}

/// What a published message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Published {
    /// A request for snapshots.
    Request,
    /// An announcement of a new snapshot.
    Announcement,
}

/// What gossipsub should do with a message: forward it, drop it as bad, or drop it quietly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Accept,
    Reject,
    Ignore,
}

/// Where discovery stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Stage {
    /// Not looking for a snapshot.
    Idle,
    /// Collecting answers until `until`.
    Collecting { round: u64, until: Instant },
    /// Syncing this plan (the one copy of it).
    Syncing { plan: Box<Plan> },
}

/// The node itself, as discovery needs to know it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Local {
    /// Its state's slot.
    pub(crate) slot: Option<u64>,
    /// The snapshots it holds and serves, newest first.
    pub(crate) snapshots: Vec<SnapshotAd>,
    /// The attestations stored with them (carried in its adverts).
    pub(crate) attestations: HashMap<SnapshotKey, Vec<crate::snapshot::Attestation>>,
    /// When its newest snapshot was made, seconds since the Unix epoch.
    pub(crate) modified_time: u64,
    /// The chunk size it serves its snapshots in.
    pub(crate) chunk_size: Option<crate::chunk::ChunkSize>,
}

/// Nonces and delays come from a seeded generator: the driver seeds it, a simulation replays it.
type Rng = Xoshiro256PlusPlus;

/// Most refused states remembered.
const MAX_REFUSED: usize = 1024;

/// How long a newly connected peer has to join the topic before it is asked directly.
const SUBSCRIBE_GRACE: Duration = Duration::from_millis(250);

/// Discovery and decision (see the module docs).
#[derive(Debug)]
pub(crate) struct Discovery {
    config: DiscoveryConfig,
    /// The owner's verifier's verdicts, when the policy has one.
    verdicts: Option<std::sync::Arc<policy::Verdicts>>,
    me: PeerId,
    metrics: Metrics,
    rng: Rng,
    local: Local,
    /// The highest slot the application's state check can judge, when it says.
    judged_up_to: Option<u64>,
    streamer_addrs: Vec<SocketAddr>,
    listen_addrs: Vec<Multiaddr>,
    tip: Option<(u64, Instant)>,
    /// Whether the owner executes the chain (it said so at construction, or reported a
    /// committed slot).
    executing: bool,
    /// The wall clock at an instant, to read the chain clock from.
    wall: Option<(Instant, u64)>,
    stage: Stage,
    /// The rounds of requests: when, which, and the answers awaited.
    requests: Requests,
    /// What this node knows of the peers it meets: connections, the topic's subscribers,
    /// strikes, who was answered or asked lately, who waits for announcements.
    peers: Peers,
    book: AdvertBook,
    failed: HashMap<SnapshotKey, Instant>,
    /// States the application's check refused (slot, bank hash): not the chain's, whatever
    /// archive holds them, so never chosen again (the most recent [`MAX_REFUSED`] kept).
    refused: lru::LruCache<(u64, crate::hash::BankHash), ()>,
    /// Trusted signatures of held snapshots the driver was asked to store.
    keep_asked: lru::LruCache<(SnapshotKey, [u8; 32]), ()>,
    not_on: Option<Base>,
    announce: Option<PendingAnnounce>,
    dials: (Instant, u32),
    actions: VecDeque<Action>,
    /// The snapshots this node downloads and serves the verified chunks of meanwhile.
    partials: Vec<PartialAd>,
}

/// Discovery's rounds of requests.
#[derive(Debug)]
pub(super) struct Requests {
    /// The rounds started so far.
    pub(super) round: u64,
    /// When the next tick is due.
    pub(super) next_tick: Instant,
    /// When the latest request was published.
    pub(super) last_request: Option<Instant>,
    /// When the last advert was taken in (a round with an acceptable snapshot decides once
    /// the answers have gone quiet, before its window ends).
    pub(super) last_advert: Option<Instant>,
    /// `last_request` before the newest request, restored should its publishing fail.
    pub(super) previous_request: Option<Instant>,
    /// A request asked of the driver and not yet reported published, since when.
    pub(super) request_pending: Option<Instant>,
    /// The nonces of the requests whose answers are still taken, and when each went out.
    pub(super) outstanding: VecDeque<(u64, Instant)>,
}

/// What discovery knows of the peers it meets (every table bounded).
#[derive(Debug)]
pub(super) struct Peers {
    /// Per connection that relays announcements: how many new announcers this interval.
    pub(super) relayed: PeerTable<u32>,
    /// Strikes per peer (messages that failed their checks, bytes proven wrong).
    pub(super) strikes: PeerTable<u32>,
    /// Peers this node answered lately (one answer per cooldown).
    pub(super) answered: PeerTable<()>,
    /// Peers this node asked directly lately.
    pub(super) asked: PeerTable<()>,
    /// Peers that asked and wait for an announcement of a newer snapshot.
    pub(super) waiting: PeerTable<()>,
    /// Connected peers, and since when.
    pub(super) connected: HashMap<PeerId, Instant>,
    /// Newly connected peers to ask directly unless they join the topic by then.
    pub(super) ask_due: VecDeque<(PeerId, Instant)>,
    /// Connected peers subscribed to the topic.
    pub(super) subscribed: HashSet<PeerId>,
    /// Connected peers that do not speak snapsync's direct protocol.
    pub(super) not_snapsync: HashSet<PeerId>,
}

impl Discovery {
    /// A machine for node `me`; its first tick is at `now`.
    pub(crate) fn new(
        config: DiscoveryConfig,
        me: PeerId,
        metrics: Metrics,
        now: Instant,
        seed: u64,
    ) -> Self {
        let cap = config.max_tracked_peers;
        let (policy, verdicts) = policy::Verdicts::wrap(config.policy.clone());
        let config = DiscoveryConfig { policy, ..config };
        Self {
            verdicts,
            me,
            metrics,
            rng: Rng::seed_from_u64(seed),
            local: Local::default(),
            judged_up_to: None,
            streamer_addrs: Vec::new(),
            listen_addrs: Vec::new(),
            tip: None,
            executing: config.executes,
            wall: None,
            stage: Stage::Idle,
            requests: Requests {
                round: 0,
                next_tick: now,
                last_request: None,
                last_advert: None,
                previous_request: None,
                request_pending: None,
                outstanding: VecDeque::new(),
            },
            peers: Peers {
                relayed: PeerTable::new(cap),
                strikes: PeerTable::new(cap),
                answered: PeerTable::new(cap),
                asked: PeerTable::new(cap),
                waiting: PeerTable::new(cap),
                connected: HashMap::new(),
                ask_due: VecDeque::new(),
                subscribed: HashSet::new(),
                not_snapsync: HashSet::new(),
            },
            book: AdvertBook::new(cap, &config.network, &config.policy),
            failed: HashMap::new(),
            refused: lru::LruCache::new(std::num::NonZeroUsize::new(MAX_REFUSED).expect("nonzero")),
            keep_asked: lru::LruCache::new(
                std::num::NonZeroUsize::new(MAX_REFUSED).expect("nonzero"),
            ),
            not_on: None,
            announce: None,
            dials: (now, 0),
            actions: VecDeque::new(),
            partials: Vec::new(),
            config,
        }
    }

    // ---- what the driver reads ----

    /// The next thing to do, if any. Call until `None`.
    pub(crate) fn poll(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When to call [`Discovery::handle_timeout`] next.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        let mut next = self.requests.next_tick;
        if let Stage::Collecting { until, .. } = self.stage {
            next = next.min(until);
            if let Some(at) = self.requests.last_advert {
                next = next.min(until.min(at + self.quiet_period()));
            }
        }
        if let Some(at) = self.requests.request_pending {
            next = next.min(at);
        }
        if let Some(a) = &self.announce {
            next = next.min(a.at);
        }
        if let Some((_, at)) = self.peers.ask_due.front() {
            next = next.min(*at);
        }
        Some(next)
    }

    /// Where discovery stands.
    pub(crate) fn stage(&self) -> &Stage {
        &self.stage
    }

    /// Every advert heard lately.
    pub(crate) fn adverts(&self) -> impl Iterator<Item = &Advert> {
        self.book.adverts()
    }

    /// The highest slot of a snapshot the policy accepts, among those advertised.
    pub(crate) fn best_known_slot(&self, now: Instant) -> Option<u64> {
        let local = self.local_state(now);
        self.book
            .keys()
            .filter(|(k, _)| !self.refused.contains(&(k.slot, k.bank_hash)))
            .filter(|(k, e)| decide::acceptable(k, e, &local, &self.config.policy))
            .map(|(k, _)| k.slot)
            .max()
    }

    /// The chain's tip as far as this node knows: what the owner told it lately, or what the
    /// chain clock says, whichever is higher.
    fn tip(&self, now: Instant) -> Option<u64> {
        let told = self
            .tip
            .filter(|(_, at)| {
                now.saturating_duration_since(*at) < self.config.discovery_interval * 2
            })
            .map(|(t, _)| t);
        let clock = match (self.config.chain_clock, self.wall) {
            (Some(clock), Some((at, unix_ms))) => {
                let ms =
                    unix_ms.saturating_add(now.saturating_duration_since(at).as_millis() as u64);
                Some(clock.slot_at(ms))
            }
            _ => None,
        };
        told.max(clock)
    }

    /// What a decision needs to know of this node.
    fn local_state(&self, now: Instant) -> LocalState {
        let tip = self.tip(now);
        let told_behind = match (self.local.slot, tip) {
            (Some(local), Some(tip)) => local.saturating_add(self.config.behind_threshold) < tip,
            _ => false,
        };
        let plausible = tip.map(|t| t.saturating_add(self.config.behind_threshold));
        let ceiling = match (plausible, self.judged_up_to) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        LocalState {
            slot: self.local.slot,
            not_on: self.not_on,
            ceiling,
            vouched_only: self.executing && self.local.slot.is_some() && !told_behind,
            chunk_size: self.local.chunk_size,
        }
    }

    // ---- what the driver tells ----

    /// The node's own state and snapshots changed.
    pub(crate) fn handle_local(&mut self, local: Local) {
        self.local = local;
    }

    /// Where this node's chunk stream is reached.
    pub(crate) fn handle_streamer_addrs(&mut self, addrs: Vec<SocketAddr>) {
        self.streamer_addrs = addrs;
    }

    /// Where this node is reached (carried in requests, for holders to answer).
    pub(crate) fn handle_listen_addrs(&mut self, addrs: Vec<Multiaddr>) {
        self.listen_addrs = addrs;
    }

    /// The owner committed `slot`: this node executes the chain (see the module docs). A sync
    /// chosen before, which the policy would not take from an executing node, is cancelled:
    /// the choice is checked again before anything replaces the live state.
    pub(crate) fn handle_slot(&mut self, slot: u64, now: Instant) {
        self.executing = true;
        let local = self.local_state(now);
        if let Stage::Syncing { plan } = &self.stage
            && local.vouched_only
            && self.config.policy.is_untrusted()
        {
            tracing::warn!(target: TARGET, slot, plan_slot = plan.last().ad.key.slot, "the node executes the chain now: cancelling a sync no vouching policy chose");
            self.stage = Stage::Idle;
            self.actions.push_back(Action::CancelSync);
        }
    }

    /// The owner changed the trust policy (a validator set that changes by epoch): adverts
    /// are counted again under it, a sync the new policy would not choose is cancelled, and
    /// the next tick comes at once, so a snapshot it now accepts is taken.
    pub(crate) fn handle_policy(&mut self, policy: TrustPolicy, now: Instant) {
        let (policy, verdicts) = policy::Verdicts::wrap(policy);
        self.config.policy = policy;
        self.verdicts = verdicts;
        self.book.retrust(&self.config.policy);
        let local = self.local_state(now);
        if let Stage::Syncing { plan } = &self.stage {
            let key = plan.last().ad.key;
            let policy = &self.config.policy;
            let accepted = self
                .book
                .entry(&key)
                .is_some_and(|e| decide::acceptable(&key, &e, &local, policy));
            // What the old policy vouched for (the counts that bound the load, the root a
            // partial may evict others for) must be what the new one vouches for.
            let same_judgement = plan.full.iter().chain(&plan.incremental).all(|t| {
                decide::target(&self.book, &t.ad.key, &local, policy).is_some_and(|now| {
                    (now.ad, now.counts_vouched, now.vouched) == (t.ad, t.counts_vouched, t.vouched)
                })
            });
            if !(accepted && same_judgement) {
                tracing::warn!(target: TARGET, slot = key.slot, accepted, "the new trust policy does not take the sync under way as it was chosen: cancelling (progress is kept) and choosing again");
                self.stage = Stage::Idle;
                self.actions.push_back(Action::CancelSync);
            }
        }
        self.requests.next_tick = now;
    }

    /// The application's state check can judge states up to `slot` (`None`: any): nothing
    /// above it is chosen.
    pub(crate) fn handle_check_ceiling(&mut self, slot: Option<u64>) {
        self.judged_up_to = slot;
    }

    /// The wall clock reads `unix_ms` at `now` (for the chain clock).
    pub(crate) fn handle_wall_clock(&mut self, unix_ms: u64, now: Instant) {
        self.wall = Some((now, unix_ms));
    }

    /// A gossip message arrived on the topic, signed by `source`, relayed by the connected peer
    /// `relay` (the source itself, or a peer forwarding it).
    pub(crate) fn handle_gossip(
        &mut self,
        source: Option<PeerId>,
        relay: PeerId,
        data: &[u8],
        now: Instant,
    ) -> Verdict {
        let Some(source) = source else {
            return Verdict::Reject;
        };
        if source == self.me {
            return Verdict::Ignore;
        }
        if self.ignores(&source, now) {
            return Verdict::Ignore;
        }
        match message::check_gossip(
            data,
            source,
            self.config.max_message_bytes,
            self.config.limits,
        ) {
            Ok(Gossip::Request(r)) => {
                self.on_request(source, r, true, now);
                Verdict::Accept
            }
            Ok(Gossip::Announcement(a)) => self.on_announcement(a, relay, now),
            Err(e) => {
                self.strike(source, &e, now);
                Verdict::Reject
            }
        }
    }

    /// The sync ended.
    pub(crate) fn handle_sync_ended(&mut self, outcome: SyncOutcome, now: Instant) {
        let plan = match std::mem::replace(&mut self.stage, Stage::Idle) {
            Stage::Syncing { plan } => Some(plan),
            other => {
                self.stage = other;
                None
            }
        };
        match outcome {
            SyncOutcome::Synced { bad_peers, served } => {
                self.not_on = None;
                for peer in bad_peers {
                    self.strike(peer, &outcome::Offence::BadChunks, now);
                }
                // The trusted signatures the sources served with the manifests are kept too
                // (the lists of the first sources: each costs verifications).
                for (key, lists) in served {
                    let mut trusted = Vec::new();
                    // Lists naming no trusted key cost nothing and count toward nothing.
                    let named: Vec<&Vec<crate::snapshot::Attestation>> = (lists.iter())
                        .filter(|l| l.iter().any(|a| self.book.names(a)))
                        .take(MAX_SERVED_LISTS)
                        .collect();
                    for list in named {
                        let valid = self.book.trusted_attestations(&key, list);
                        crate::snapshot::merge_attestations(&mut trusted, &valid);
                    }
                    self.keep_attestations(&key, trusted);
                }
                self.schedule_announce(now);
            }
            SyncOutcome::Failed(failure) => {
                if let Some(plan) = plan {
                    let consequences = outcome::judge(&plan, &failure, &self.book);
                    self.apply(consequences, now);
                }
            }
            SyncOutcome::Cancelled => {}
        }
        // Still behind (newer snapshots were heard meanwhile)? Go again at once.
        if self.config.sync_enabled && !self.knows_current(now) && self.best_newer(now) {
            self.start_round(now);
        }
    }

    /// Carries out what a failed sync means.
    fn apply(&mut self, c: outcome::Consequences, now: Instant) {
        if self.failed.len() >= 256 {
            self.failed.retain(|_, until| *until > now);
        }
        for key in c.cool_down {
            self.failed.insert(key, now + self.config.failed_cooldown);
        }
        if let Some(state) = c.refused {
            self.refused.put(state, ());
        }
        for (peer, offence) in c.strike {
            self.strike(peer, &offence, now);
        }
        for root in c.delete {
            self.actions.push_back(Action::DeleteSnapshot(root));
        }
        if c.not_on.is_some() {
            self.not_on = c.not_on;
        }
    }

    /// Time passed: ticks, the end of an answer window, a held-back request, an announcement.
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        while let Some(&(peer, at)) = self.peers.ask_due.front()
            && at <= now
        {
            self.peers.ask_due.pop_front();
            let missing =
                self.peers.connected.contains_key(&peer) && !self.peers.subscribed.contains(&peer);
            if missing && self.wants_answers(now) && !self.ignores(&peer, now) {
                self.ask(peer, now);
                if self.stage == Stage::Idle {
                    self.start_round(now);
                }
            }
        }
        if self.requests.request_pending.is_some_and(|t| t <= now) {
            self.requests.request_pending = None;
            if self.stage != Stage::Idle {
                self.request(now);
            }
        }
        if let Stage::Collecting { round, until } = self.stage
            && (until <= now || self.quiet(now))
        {
            self.decide(round, now);
        }
        if self.announce.as_ref().is_some_and(|a| a.at <= now) {
            self.fire_announce(now);
        }
        if self.requests.next_tick <= now {
            self.requests.next_tick = now + self.config.discovery_interval;
            self.tick(now);
        }
    }
}
