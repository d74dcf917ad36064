//! Discovery and decision as a sans-IO state machine: [`Discovery`].
//!
//! No sockets, no clocks, no tasks, no gossipsub calls. The vocabulary is quinn-proto's: the
//! driver (the behaviour, or the simulator) tells it what happened, with the time
//! (`handle_*`), wakes it at [`Discovery::poll_timeout`] ([`Discovery::handle_timeout`]), and
//! carries out what it queued ([`Discovery::poll`]): publish a request or an announcement, ask
//! or answer a peer, start or extend a sync, delete a snapshot, report an event. Every rule is
//! unit-tested with injected time (`tests.rs`, and `decide.rs`, `outcome.rs` for the choice and
//! the end of a sync), and `sim.rs` runs thousands of machines on a simulated gossip mesh.
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
mod book;
mod config;
mod decide;
pub(crate) mod message;
mod outcome;
mod policy;
#[cfg(any(test, feature = "sim"))]
pub mod sim;
#[cfg(test)]
mod tests;

pub(crate) use advertise::advertised;
pub use config::{ChainClock, DiscoveryConfig};
pub use decide::Conflict;
pub(crate) use decide::{Plan, Target};
pub use message::{Advert, PartialAd, SnapshotAd};
pub(crate) use outcome::{Failure, Leg, SyncFailure, SyncOutcome};
pub use policy::{SnapshotVerifier, TrustPolicy};

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId};
use rand::{Rng as _, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

use self::book::{AdvertBook, PeerTable, Standing};
use self::decide::LocalState;
use self::message::{Gossip, InfoRequest};
use crate::hash::ContentRoot;
use crate::log::DISCOVERY as TARGET;
use crate::metrics::{MessageKind, Metrics};
use crate::proto;
use crate::snapshot::{Base, SnapshotKey};

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
        /// It downloads the snapshot too and serves part of it.
        partial: bool,
        key: SnapshotKey,
        peer: PeerId,
        addrs: Vec<SocketAddr>,
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
    /// When its newest snapshot was made, seconds since the Unix epoch.
    pub(crate) modified_time: u64,
    /// The chunk size it serves its snapshots in.
    pub(crate) chunk_size: Option<crate::chunk::ChunkSize>,
}

/// Nonces and delays come from a seeded generator: the driver seeds it, a simulation replays it.
type Rng = Xoshiro256PlusPlus;

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
struct PendingAnnounce {
    at: Instant,
    key: SnapshotKey,
    heard: u32,
    /// It announces a partial holding (new snapshots go out whatever their number).
    partial: bool,
}

/// Announcements of the same partial holding heard after which a node does not announce its
/// own: enough sources to start with, and answers bring in more.
const PARTIAL_REDUNDANCY: u32 = 16;

/// Most request nonces remembered (besides the age limit); answers to older requests are
/// dropped. Requests are spaced by `min_request_interval`, so at the defaults this is well
/// over the two discovery intervals a nonce is kept for.
const MAX_OUTSTANDING: usize = 256;

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
    streamer_addrs: Vec<SocketAddr>,
    listen_addrs: Vec<Multiaddr>,
    tip: Option<(u64, Instant)>,
    /// Whether the owner executes the chain (it said so at construction, or reported a
    /// committed slot).
    executing: bool,
    /// The wall clock at an instant, to read the chain clock from.
    wall: Option<(Instant, u64)>,
    /// Per connection that relays announcements: how many new announcers this interval.
    relayed: PeerTable<u32>,
    stage: Stage,
    round: u64,
    next_tick: Instant,
    last_request: Option<Instant>,
    /// When the last advert was taken in (a round with an acceptable snapshot decides once
    /// the answers have gone quiet, before its window ends).
    last_advert: Option<Instant>,
    /// `last_request` before the newest request, restored should its publishing fail.
    previous_request: Option<Instant>,
    request_pending: Option<Instant>,
    outstanding: VecDeque<(u64, Instant)>,
    book: AdvertBook,
    strikes: PeerTable<u32>,
    answered: PeerTable<()>,
    asked: PeerTable<()>,
    waiting: PeerTable<()>,
    /// Connected peers, and since when.
    connected: HashMap<PeerId, Instant>,
    /// Newly connected peers to ask directly unless they join the topic by then.
    ask_due: VecDeque<(PeerId, Instant)>,
    subscribed: HashSet<PeerId>,
    not_snapsync: HashSet<PeerId>,
    failed: HashMap<SnapshotKey, Instant>,
    not_on: Option<Base>,
    announce: Option<PendingAnnounce>,
    dials: (Instant, u32),
    actions: VecDeque<Action>,
    /// The snapshots this node downloads and serves the verified chunks of meanwhile.
    partials: Vec<PartialAd>,
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
            streamer_addrs: Vec::new(),
            listen_addrs: Vec::new(),
            tip: None,
            executing: config.executes,
            wall: None,
            relayed: PeerTable::new(cap),
            stage: Stage::Idle,
            round: 0,
            next_tick: now,
            last_request: None,
            last_advert: None,
            previous_request: None,
            request_pending: None,
            outstanding: VecDeque::new(),
            book: AdvertBook::new(cap),
            strikes: PeerTable::new(cap),
            answered: PeerTable::new(cap),
            asked: PeerTable::new(cap),
            waiting: PeerTable::new(cap),
            connected: HashMap::new(),
            ask_due: VecDeque::new(),
            subscribed: HashSet::new(),
            not_snapsync: HashSet::new(),
            failed: HashMap::new(),
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
        let mut next = self.next_tick;
        if let Stage::Collecting { until, .. } = self.stage {
            next = next.min(until);
            if let Some(at) = self.last_advert {
                next = next.min(until.min(at + self.quiet_period()));
            }
        }
        if let Some(at) = self.request_pending {
            next = next.min(at);
        }
        if let Some(a) = &self.announce {
            next = next.min(a.at);
        }
        if let Some((_, at)) = self.ask_due.front() {
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
            .filter(|(k, e)| decide::acceptable(k, e, &local, &self.config.policy))
            .map(|(k, _)| k.slot)
            .max()
    }

    /// Whether `peer` is ignored for misbehaving.
    pub(crate) fn ignores(&self, peer: &PeerId, now: Instant) -> bool {
        self.strikes_of(peer, now) >= self.config.max_strikes
    }

    /// `peer`'s strikes now: one is forgotten every `strike_decay` since the last.
    fn strikes_of(&self, peer: &PeerId, now: Instant) -> u32 {
        let (Some(count), Some(at)) = (self.strikes.get(peer), self.strikes.at(peer)) else {
            return 0;
        };
        let decay = self.config.strike_decay.as_nanos().max(1);
        let forgotten = now.saturating_duration_since(at).as_nanos() / decay;
        count.saturating_sub(forgotten.min(u128::from(u32::MAX)) as u32)
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
        LocalState {
            slot: self.local.slot,
            not_on: self.not_on,
            ceiling: tip.map(|t| t.saturating_add(self.config.behind_threshold)),
            vouched_only: self.executing && self.local.slot.is_some() && !told_behind,
            chunk_size: self.local.chunk_size,
        }
    }

    // ---- what the driver tells ----

    /// The node's own state and snapshots changed.
    pub(crate) fn handle_local(&mut self, local: Local) {
        self.local = local;
    }

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
            self.waiting.expire(now, self.config.announce_window);
            if self.waiting.len() > 0 {
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

    /// The wall clock reads `unix_ms` at `now` (for the chain clock).
    pub(crate) fn handle_wall_clock(&mut self, unix_ms: u64, now: Instant) {
        self.wall = Some((now, unix_ms));
    }

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

    /// A connection to `peer` was established (also a second one, to a peer restarted under the
    /// same identity).
    pub(crate) fn handle_connected(&mut self, peer: PeerId, now: Instant) {
        let cap = self.config.max_tracked_peers;
        if !self.connected.contains_key(&peer) && self.connected.len() >= cap {
            return; // beyond the table's bound: reached through the topic only
        }
        self.connected.insert(peer, now);
        if self.wants_answers(now) && !self.ignores(&peer, now) {
            if self.ask_due.len() >= cap {
                self.ask_due.pop_front();
            }
            let grace = SUBSCRIBE_GRACE.min(self.config.answer_window / 4);
            self.ask_due.push_back((peer, now + grace));
            if self.stage == Stage::Idle {
                self.start_round(now);
            }
        }
    }

    /// How publishing a message went: a request that reached no peer does not count as asked,
    /// so the first peer to join the topic gets it at once.
    pub(crate) fn handle_published(&mut self, kind: Published, delivered: bool) {
        match (kind, delivered) {
            (Published::Request, true) => self.metrics.message(MessageKind::RequestSent),
            (Published::Announcement, true) => self.metrics.message(MessageKind::AnnouncementSent),
            (Published::Request, false) => self.last_request = self.previous_request,
            (Published::Announcement, false) => {}
        }
    }

    /// The last connection to `peer` closed.
    pub(crate) fn handle_disconnected(&mut self, peer: PeerId) {
        self.connected.remove(&peer);
        self.subscribed.remove(&peer);
        self.not_snapsync.remove(&peer);
    }

    /// `peer` joined snapsync's topic.
    pub(crate) fn handle_subscribed(&mut self, peer: PeerId, now: Instant) {
        if self.subscribed.len() < self.config.max_tracked_peers {
            self.subscribed.insert(peer);
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

    /// `peer` answered a request of this node (directly, or in the response to an ask, which
    /// `asked` says).
    pub(crate) fn handle_answer(
        &mut self,
        peer: PeerId,
        answer: &proto::SnapshotInfoResponse,
        asked: bool,
        now: Instant,
    ) {
        if self.ignores(&peer, now) {
            return;
        }
        let horizon = self.config.discovery_interval * 2;
        let solicited = asked
            || self.outstanding.iter().any(|(n, t)| {
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
    #[cfg_attr(not(feature = "web"), allow(dead_code))]
    pub(crate) fn handle_web_advert(&mut self, mut advert: Advert, now: Instant) {
        if self.ignores(&advert.peer, now) {
            return;
        }
        // Held to the limits of any advert: a web server's bytes are as hostile as a peer's.
        let limits = self.config.limits;
        advert.snapshots.retain(|ad| match limits.check(ad) {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(target: TARGET, peer = %advert.peer, error = %e, "a web source lists a snapshot beyond the limits");
                false
            }
        });
        if advert.snapshots.is_empty() {
            return;
        }
        self.on_advert(advert, Standing::Answered, now);
    }

    /// An announcement: recorded (within what its relay may bring in), and forwarded only when
    /// someone besides its one stranger vouches for its snapshot.
    fn on_announcement(&mut self, a: Advert, relay: PeerId, now: Instant) -> Verdict {
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
                .relayed
                .at(&relay)
                .is_some_and(|t| now.saturating_duration_since(t) >= self.config.discovery_interval)
            {
                self.relayed.insert(relay, 0, now);
            }
            let brought = self.relayed.get(&relay).copied().unwrap_or(0);
            if brought >= self.config.announcements_per_source {
                tracing::debug!(target: TARGET, %relay, "this relay brought in its share of new announcers; dropping");
                return Verdict::Ignore;
            }
            let since = self.relayed.at(&relay).unwrap_or(now);
            self.relayed.insert(relay, brought + 1, since);
        }
        self.on_advert(a, Standing::Announced, now);
        if vouched {
            Verdict::Accept
        } else {
            Verdict::Ignore
        }
    }

    /// An ask of this node failed because `peer` does not speak snapsync: it is not asked again
    /// while it stays connected.
    pub(crate) fn handle_not_snapsync(&mut self, peer: PeerId) {
        if self.connected.contains_key(&peer) {
            self.not_snapsync.insert(peer);
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
            SyncOutcome::Synced { bad_peers } => {
                self.not_on = None;
                for peer in bad_peers {
                    self.strike(peer, &outcome::Offence::BadChunks, now);
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

    /// The node made or loaded a snapshot (after [`Discovery::handle_local`]).
    pub(crate) fn handle_snapshot_created(&mut self, now: Instant) {
        self.schedule_announce(now);
    }

    /// Time passed: ticks, the end of an answer window, a held-back request, an announcement.
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        while let Some(&(peer, at)) = self.ask_due.front()
            && at <= now
        {
            self.ask_due.pop_front();
            let missing = self.connected.contains_key(&peer) && !self.subscribed.contains(&peer);
            if missing && self.wants_answers(now) && !self.ignores(&peer, now) {
                self.ask(peer, now);
                if self.stage == Stage::Idle {
                    self.start_round(now);
                }
            }
        }
        if self.request_pending.is_some_and(|t| t <= now) {
            self.request_pending = None;
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
        if self.next_tick <= now {
            self.next_tick = now + self.config.discovery_interval;
            self.tick(now);
        }
    }

    // ---- the rules ----

    fn tick(&mut self, now: Instant) {
        // Forget what peers said long ago; what is current comes back in the answers.
        let horizon = self.config.discovery_interval * 2;
        self.book.expire(now, horizon, &self.config.policy);
        self.waiting.expire(now, self.config.announce_window);
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
    fn best_newer(&self, now: Instant) -> bool {
        match (self.local.slot, self.best_known_slot(now)) {
            (None, Some(_)) => true,
            (Some(local), Some(best)) => best > local.saturating_add(self.config.behind_threshold),
            _ => false,
        }
    }

    /// Whether the node looks for snapshots now: it is in a round or a sync, or it syncs and
    /// does not know it is current.
    fn wants_answers(&self, now: Instant) -> bool {
        match &self.stage {
            Stage::Syncing { .. } | Stage::Collecting { .. } => true,
            Stage::Idle => self.config.sync_enabled && !self.knows_current(now),
        }
    }

    /// Whether the node knows it is current (see the module docs).
    fn knows_current(&self, now: Instant) -> bool {
        let Some(local) = self.local.slot else {
            return false;
        };
        if let Some(tip) = self.tip(now) {
            return local.saturating_add(self.config.behind_threshold) >= tip;
        }
        let informed = self
            .last_request
            .is_some_and(|t| now.saturating_duration_since(t) < self.config.announce_window);
        informed && !self.best_newer(now)
    }

    /// How long answers must have been quiet for a round to decide early.
    fn quiet_period(&self) -> Duration {
        self.config.answer_window / 4
    }

    /// Whether the round may decide before its window ends: an acceptable snapshot newer than
    /// the node's state is known and no answer came for a quarter of the window (on a LAN, the
    /// answers of everyone asked are in within milliseconds; the window is for the far ones).
    fn quiet(&self, now: Instant) -> bool {
        let Stage::Collecting { until, .. } = self.stage else {
            return false;
        };
        let started = until - self.config.answer_window;
        let quiet = self.quiet_period();
        now.saturating_duration_since(started) >= quiet
            && self
                .last_advert
                .is_some_and(|t| now.saturating_duration_since(t) >= quiet)
            && self.best_newer(now)
    }

    fn start_round(&mut self, now: Instant) {
        if let Some(v) = &self.verdicts {
            v.forget_refusals();
        }
        self.request(now);
        // Peers connected but not seen on the topic are asked directly: gossip may not reach
        // them (a peer restarted under the same identity gets no subscription message).
        // (Peers that connected a moment ago are left the grace to join.)
        let grace = SUBSCRIBE_GRACE.min(self.config.answer_window / 4);
        let direct: Vec<PeerId> = self
            .connected
            .iter()
            .filter(|(p, since)| {
                now.saturating_duration_since(**since) >= grace
                    && !self.subscribed.contains(*p)
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
        self.round += 1;
        self.metrics.discovery_rounds.inc();
        let local_slot = self.local.slot;
        tracing::info!(target: TARGET, round = self.round, ?local_slot, "asking peers for snapshots");
        self.stage = Stage::Collecting {
            round: self.round,
            until: now + self.config.answer_window,
        };
        self.actions.push_back(Action::Notice(Notice::Started {
            round: self.round,
            local_slot,
        }));
    }

    /// A nonce for a published request, remembered for two discovery intervals so that late
    /// answers are taken. (Never 0: that is the nonce of announcements.)
    fn new_nonce(&mut self, now: Instant) -> u64 {
        let nonce = self.rng.random::<u64>() | 1;
        let horizon = self.config.discovery_interval * 2;
        while self
            .outstanding
            .front()
            .is_some_and(|(_, t)| now.saturating_duration_since(*t) >= horizon)
            || self.outstanding.len() >= MAX_OUTSTANDING
        {
            self.outstanding.pop_front();
        }
        self.outstanding.push_back((nonce, now));
        nonce
    }

    /// Publishes a request now, or, if the last one was too recent, as soon as allowed.
    fn request(&mut self, now: Instant) {
        if let Some(last) = self.last_request
            && now.saturating_duration_since(last) < self.config.min_request_interval
        {
            self.request_pending = Some(last + self.config.min_request_interval);
            return;
        }
        self.request_pending = None;
        self.previous_request = self.last_request;
        self.last_request = Some(now);
        let nonce = self.new_nonce(now);
        let msg = message::request(self.me, nonce, self.local.slot, &self.listen_addrs);
        self.actions.push_back(Action::Publish {
            kind: Published::Request,
            bytes: message::gossip(proto::discovery_message::Body::Request(msg)),
        });
    }

    /// Asks `peer` directly, unless it was asked a moment ago.
    fn ask(&mut self, peer: PeerId, now: Instant) {
        if self.not_snapsync.contains(&peer) {
            return;
        }
        if self
            .asked
            .at(&peer)
            .is_some_and(|t| now.saturating_duration_since(t) < self.config.answer_cooldown)
        {
            return;
        }
        self.asked.insert(peer, (), now);
        // The answer comes back as the ask's response: no nonce to remember.
        let nonce = self.rng.random::<u64>() | 1;
        let request = message::request(self.me, nonce, self.local.slot, &[]);
        self.metrics.message(MessageKind::AskSent);
        self.actions.push_back(Action::Ask { peer, request });
    }

    /// A request from `peer`: note that it waits, and answer it if this node holds something
    /// newer. Gossip requests are answered with a message of their own (`via_gossip`); a direct
    /// ask gets the answer as its response.
    fn on_request(
        &mut self,
        peer: PeerId,
        r: InfoRequest,
        via_gossip: bool,
        now: Instant,
    ) -> Option<proto::SnapshotInfoResponse> {
        if via_gossip {
            self.metrics.message(MessageKind::RequestReceived);
        }
        self.waiting.insert(peer, (), now);
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
            .answered
            .at(&peer)
            .is_some_and(|t| now.saturating_duration_since(t) < self.config.answer_cooldown)
        {
            return None;
        }
        if via_gossip && !self.connected.contains_key(&peer) && !self.take_dial(now) {
            tracing::debug!(target: TARGET, %peer, "dial budget spent; not answering a peer we are not connected to");
            return None;
        }
        self.answered.insert(peer, (), now);
        let answer = message::advert(
            self.me,
            &self.local.snapshots,
            &self.partials,
            &self.streamer_addrs,
            self.local.slot,
            self.local.modified_time,
            r.nonce,
        );
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

    fn on_advert(&mut self, advert: Advert, standing: Standing, now: Instant) {
        self.last_advert = Some(now);
        let peer = advert.peer;
        let addrs = advert.streamer_addrs.clone();
        let keys: Vec<(SnapshotKey, bool)> = advert
            .snapshots
            .iter()
            .map(|s| (s.key, false))
            .chain(advert.partial.iter().map(|h| (h.ad.key, true)))
            .collect();
        if !self.book.insert(advert, standing, now, &self.config.policy) {
            return;
        }
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
                    partial: *partial,
                });
            }
        }
        if self.stage == Stage::Idle && self.config.sync_enabled && !self.knows_current(now) {
            self.start_round(now);
        }
    }

    /// The answer window closed: choose, and start the sync or say there is nothing.
    fn decide(&mut self, round: u64, now: Instant) {
        let local = self.local_state(now);
        let failed = |k: &SnapshotKey| self.failed.get(k).is_some_and(|until| *until > now);
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

    fn schedule_announce(&mut self, now: Instant) {
        self.waiting.expire(now, self.config.announce_window);
        if self.waiting.len() == 0 {
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

    fn fire_announce(&mut self, now: Instant) {
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
        self.waiting.expire(now, self.config.announce_window);
        if self.waiting.len() == 0 || self.streamer_addrs.is_empty() {
            return;
        }
        let advert = message::advert(
            self.me,
            &self.local.snapshots,
            &self.partials,
            &self.streamer_addrs,
            self.local.slot,
            self.local.modified_time,
            0,
        );
        tracing::info!(target: TARGET, waiting = self.waiting.len(), slot = pending.key.slot, "announcing a new snapshot");
        self.actions.push_back(Action::Publish {
            kind: Published::Announcement,
            bytes: message::gossip(proto::discovery_message::Body::Announcement(advert)),
        });
    }

    fn strike(&mut self, peer: PeerId, error: &dyn std::fmt::Display, now: Instant) {
        self.metrics.message(MessageKind::Malformed);
        let strikes = self.strikes_of(&peer, now) + 1;
        self.strikes.insert(peer, strikes, now);
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
