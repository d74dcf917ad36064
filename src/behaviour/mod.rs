//! [`Behaviour`]: snapsync as a libp2p `NetworkBehaviour`, a thin driver.
//!
//! It feeds the swarm's events and the clock to the [`Discovery`] state machine and carries out
//! what the machine asks: gossip, direct asks and answers, syncs. The rest lives elsewhere:
//! `event.rs` (what it reports), `config.rs` (its settings), `sync_job.rs` (one sync, a child
//! it polls), `addr.rs` (which addresses), `direct.rs` (the direct protocol's codec).

mod addr;
mod config;
mod direct;
mod event;
mod sync_job;

pub use config::Config;
pub use event::{BehaviourError, DiscoveryStats, Event, Phase, Status, SyncError};

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use libp2p::core::transport::PortUse;
use libp2p::core::{Endpoint, Multiaddr};
use libp2p::identity::Keypair;
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, DialError, FromSwarm, NetworkBehaviour, THandler,
    THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::{PeerId, gossipsub, request_response};

use self::direct::{DirectCodec, PROTOCOL};
use self::sync_job::{JobEvent, SyncJob};
use crate::db::StateDb;
use crate::discovery::{
    Action, Discovery, Local, Notice, Phase as DiscoveryPhase, SnapshotAd, SyncOutcome, Verdict,
};
use crate::log::DISCOVERY as TARGET;
use crate::metrics::{MessageKind, Metrics};
use crate::proto;
use crate::snapshot::{CreationTask, Creator, SnapshotStore};
use crate::transfer::{Downloader, PeerAddr, Streamer};

/// Most events waiting to be taken by the swarm; progress updates are the first dropped.
const MAX_PENDING_EVENTS: usize = 1024;

/// Most direct asks awaiting their response.
const MAX_PENDING_ASKS: usize = 256;

/// Most peers whose connection address is remembered (to pick their chunk-stream address).
const MAX_PEER_IPS: usize = 4096;

/// snapsync's own gossipsub and direct protocol. Public only because the behaviour's
/// connection handler type names it; not part of the API.
#[doc(hidden)]
#[allow(unreachable_pub, missing_docs)]
pub mod inner {
    use libp2p::{gossipsub, request_response};

    use super::direct::DirectCodec;

    #[derive(libp2p::swarm::NetworkBehaviour)]
    #[behaviour(prelude = "libp2p::swarm::derive_prelude")]
    pub struct Inner {
        pub(crate) gossipsub: gossipsub::Behaviour,
        pub(crate) direct: request_response::Behaviour<DirectCodec>,
    }
}

use inner::{Inner, InnerEvent};

/// Gossipsub protocol prefix of snapsync's own gossipsub, so it never meets the owner's.
const GOSSIP_PROTOCOL_PREFIX: &str = "/snapsync/meshsub";

/// snapsync as a libp2p [`NetworkBehaviour`], a building block a node composes into its own
/// swarm next to whatever else it runs.
///
/// - **Discovery** (log target `NETWORK:SNAPSHOT`): every `discovery_interval` (first tick at
///   once) a node that is not known to be current asks over snapsync's own gossipsub topic and
///   directly asks connected peers; holders of a newer snapshot answer the requester directly,
///   so a round costs a number of messages linear in the number of nodes. A node that makes or
///   loads a snapshot while others wait announces it.
/// - **Decision** under the configured [`crate::TrustPolicy`]: a full snapshot, an incremental
///   one on a full base the node's state is at or past, or both.
/// - **Download and load**: from every peer that advertises the chosen snapshots, over the QUIC
///   chunk stream, loaded as it arrives, checked, then swapped in; then served and announced.
///
/// snapsync's gossipsub uses its own protocol id prefix (`/snapsync/meshsub`), so a node's own
/// gossipsub (chat, blocks, ...) in the same swarm never sees its messages, nor it theirs.
///
/// # Example
///
/// ```no_run
/// use std::sync::Arc;
/// use snapsync::libp2p::{gossipsub, swarm::NetworkBehaviour};
///
/// #[derive(NetworkBehaviour)]
/// #[behaviour(prelude = "snapsync::libp2p::swarm::derive_prelude")]
/// struct Node {
///     chat: gossipsub::Behaviour,
///     snapsync: snapsync::Behaviour,
/// }
///
/// # async fn run(keypair: snapsync::libp2p::identity::Keypair, chat: gossipsub::Behaviour) -> Result<(), Box<dyn std::error::Error>> {
/// let db = Arc::new(snapsync::db::LmdbState::open("data/state")?);
/// let config = snapsync::Config::from_env("data/snapshots")?;
/// let node = Node {
///     chat,
///     snapsync: snapsync::Behaviour::new(&keypair, db, config)?,
/// };
/// # let _ = node;
/// # Ok(())
/// # }
/// ```
pub struct Behaviour {
    inner: Inner,
    config: Config,
    metrics: Metrics,
    topic: gossipsub::IdentTopic,
    db: Arc<dyn StateDb>,
    store: SnapshotStore,
    creator: Creator,
    streamer: Streamer,
    downloader: Downloader,
    discovery: Discovery,
    job: Option<SyncJob>,
    creating: Vec<CreationTask>,
    events: VecDeque<Event>,
    timer: Pin<Box<tokio::time::Sleep>>,
    /// Direct asks awaiting their response.
    asks: HashMap<request_response::OutboundRequestId, PeerId>,
    listen_addrs: Vec<Multiaddr>,
    /// The IP each connected peer is reached on, to pick its chunk-stream address.
    peer_ips: HashMap<PeerId, IpAddr>,
    chain_tip: Option<u64>,
}

impl std::fmt::Debug for Behaviour {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Behaviour")
            .field("store", &self.store.dir())
            .field("streamer", &self.streamer.local_addr())
            .finish()
    }
}

/// The snapshots a node advertises: its full snapshots, newest first, each followed by the
/// newest incremental one on it, at most eight.
fn own_snapshots(store: &SnapshotStore) -> (Vec<SnapshotAd>, u64) {
    let list = store.list();
    let mut out = Vec::new();
    for full in list.iter().rev().filter(|s| s.manifest().is_full()) {
        if let Some(inc) = store.latest_incremental_on(&full.manifest().content_root) {
            out.push(SnapshotAd::of(inc.manifest()));
        }
        out.push(SnapshotAd::of(full.manifest()));
    }
    out.truncate(crate::discovery::message::MAX_SNAPSHOTS);
    let modified = list
        .last()
        .map(|s| s.manifest().created_unix_ms / 1000)
        .unwrap_or(0);
    (out, modified)
}

impl Behaviour {
    /// A snapsync behaviour for the node with `keypair`, over its state `db`. Checks the
    /// settings, opens the snapshot store and starts the chunk streamer and downloader; must be
    /// called within a tokio runtime.
    pub fn new(
        keypair: &Keypair,
        db: Arc<dyn StateDb>,
        config: Config,
    ) -> Result<Self, BehaviourError> {
        config.validate()?;
        let me = keypair.public().to_peer_id();
        let metrics = config.metrics().clone();
        let store = SnapshotStore::open(config.snapshot_dir())?;
        let streamer = Streamer::bind(
            keypair,
            store.clone(),
            *config.streamer(),
            config.token(),
            metrics.clone(),
        )?;
        let downloader = Downloader::new(
            keypair.clone(),
            store.clone(),
            *config.download(),
            config.token(),
            metrics.clone(),
        )?;
        let creator = Creator::new(store.clone(), db.clone(), *config.creator());
        let gossip_config = gossipsub::ConfigBuilder::default()
            .protocol_id_prefix(GOSSIP_PROTOCOL_PREFIX)
            .max_transmit_size(config.max_message_bytes())
            .heartbeat_interval(config.heartbeat_interval())
            .heartbeat_initial_delay(
                config
                    .heartbeat_interval()
                    .min(std::time::Duration::from_secs(1)),
            )
            .validation_mode(gossipsub::ValidationMode::Strict)
            .validate_messages()
            .build()
            .map_err(|e| BehaviourError::Gossipsub(e.to_string()))?;
        let mut gossip = gossipsub::Behaviour::new(
            gossipsub::MessageAuthenticity::Signed(keypair.clone()),
            gossip_config,
        )
        .map_err(|e| BehaviourError::Gossipsub(e.to_string()))?;
        let topic = gossipsub::IdentTopic::new(config.topic());
        gossip
            .subscribe(&topic)
            .map_err(|e| BehaviourError::Gossipsub(e.to_string()))?;
        let direct = request_response::Behaviour::with_codec(
            DirectCodec {
                max_bytes: config.max_message_bytes(),
            },
            [(PROTOCOL, request_response::ProtocolSupport::Full)],
            request_response::Config::default()
                .with_request_timeout(std::time::Duration::from_secs(10)),
        );
        let now = Instant::now();
        let mut discovery =
            Discovery::new(config.discovery(), me, metrics.clone(), now, rand::random());
        let local_slot = db.slot()?;
        let (snapshots, modified_time) = own_snapshots(&store);
        discovery.set_local(Local {
            slot: local_slot,
            snapshots,
            modified_time,
        });
        if config.trust().is_untrusted() && config.sync_enabled() {
            tracing::warn!(target: TARGET, policy = %config.trust().describe(), "no trust configured: any peer that advertises a snapshot alone (or with as many identities as required) can choose what this node loads");
        }
        tracing::info!(
            target: TARGET,
            peer = %me,
            streamer = %streamer.local_addr(),
            snapshots = store.list().len(),
            trust = %config.trust().describe(),
            "snapsync started"
        );
        let mut b = Self {
            inner: Inner {
                gossipsub: gossip,
                direct,
            },
            metrics,
            topic,
            db,
            store,
            creator,
            streamer,
            downloader,
            discovery,
            job: None,
            creating: Vec::new(),
            events: VecDeque::new(),
            timer: Box::pin(tokio::time::sleep_until(now.into())),
            asks: HashMap::new(),
            listen_addrs: Vec::new(),
            peer_ips: HashMap::new(),
            chain_tip: None,
            config,
        };
        b.refresh_local();
        Ok(b)
    }

    /// The snapshot store.
    pub fn store(&self) -> &SnapshotStore {
        &self.store
    }

    /// Where the chunk streamer is bound.
    pub fn streamer_local_addr(&self) -> SocketAddr {
        self.streamer.local_addr()
    }

    /// The chunk streamer's counters.
    pub fn streamer_stats(&self) -> crate::transfer::StreamerStats {
        self.streamer.stats()
    }

    /// Message counters (read from the node's metrics).
    pub fn stats(&self) -> DiscoveryStats {
        let m = &self.metrics;
        DiscoveryStats {
            requests_published: m.messages(MessageKind::RequestSent),
            requests_received: m.messages(MessageKind::RequestReceived),
            asks_sent: m.messages(MessageKind::AskSent),
            asks_received: m.messages(MessageKind::AskReceived),
            answers_sent: m.messages(MessageKind::AnswerSent),
            answers_received: m.messages(MessageKind::AnswerReceived),
            unsolicited: m.messages(MessageKind::Unsolicited),
            announcements_published: m.messages(MessageKind::AnnouncementSent),
            announcements_received: m.messages(MessageKind::AnnouncementReceived),
            malformed: m.messages(MessageKind::Malformed),
            rounds: m.discovery_rounds.get(),
            downloads: m.syncs_started.get(),
        }
    }

    /// The settings.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Where the node stands.
    pub fn phase(&self) -> Phase {
        match (self.discovery.phase(), &self.job) {
            (_, Some(job)) if job.loading() => Phase::Loading,
            (_, Some(_)) => Phase::Downloading,
            (DiscoveryPhase::Collecting { .. }, _) => Phase::Collecting,
            _ => Phase::Idle,
        }
    }

    /// What the node knows and does.
    pub fn status(&self) -> Status {
        let mut adverts: Vec<_> = self.discovery.adverts().cloned().collect();
        adverts.sort_by_key(|a| std::cmp::Reverse(a.newest().map_or(0, |s| s.key.slot)));
        Status {
            phase: self.phase(),
            local_slot: self.db.slot().ok().flatten(),
            chain_tip: self.chain_tip,
            best_known_slot: self.discovery.best_known_slot(),
            snapshots: self
                .store
                .list()
                .iter()
                .map(|s| s.manifest().clone())
                .collect(),
            adverts,
            streamer_addrs: self.streamer_addrs(),
            stats: self.stats(),
        }
    }

    /// Call right after committing `slot` to the DB, before committing the next one: starts a
    /// background snapshot of the state at `slot` when one is due.
    pub fn on_slot(&mut self, slot: u64) {
        self.metrics
            .local_slot
            .set(slot.min(i64::MAX as u64) as i64);
        if let Some(task) = self.creator.on_slot(slot) {
            self.creating.push(task);
        }
        self.refresh_local();
    }

    /// Tells snapsync the chain's tip, as the node's consensus knows it: a node behind it by
    /// more than `behind_threshold` asks at once rather than at its next tick, and a node
    /// within it knows it is current.
    pub fn set_chain_tip(&mut self, slot: u64) {
        self.chain_tip = Some(slot);
        self.discovery.set_chain_tip(slot, Instant::now());
    }

    /// Starts a full snapshot of the current state now (unless one is being made).
    pub fn create_snapshot_now(&mut self) {
        if let Some(task) = self.creator.create_now() {
            self.creating.push(task);
        }
    }

    /// Asks peers for snapshots now, whether or not the node needs one; a newer snapshot
    /// found is synced. Does nothing while a sync is under way.
    pub fn sync_now(&mut self) {
        self.discovery.sync_now(Instant::now());
    }

    /// Cancels a sync in progress (downloaded chunks are kept for resume).
    pub fn cancel_sync(&mut self) {
        if let Some(job) = self.job.take() {
            self.discovery
                .on_sync_ended(SyncOutcome::Cancelled, Instant::now());
            tokio::spawn(job.cancel());
        }
    }

    /// Shuts snapsync down gracefully: cancels the sync in progress and waits until its
    /// progress is durable, then closes every chunk-stream connection, telling each peer. The
    /// swarm's own connections are the owner's to close.
    pub fn shutdown(&mut self) -> impl std::future::Future<Output = ()> + Send + use<> {
        let job = self.job.take();
        let streamer = self.streamer.close();
        let downloader = self.downloader.clone();
        async move {
            if let Some(job) = job {
                job.cancel().await;
            }
            downloader.close().await;
            streamer.await;
        }
    }

    fn push_event(&mut self, event: Event) {
        if self.events.len() >= MAX_PENDING_EVENTS {
            if matches!(event, Event::DownloadProgress(_)) {
                return;
            }
            match self
                .events
                .iter()
                .position(|e| matches!(e, Event::DownloadProgress(_)))
            {
                Some(i) => {
                    self.events.remove(i);
                }
                None => {
                    self.events.pop_front();
                }
            }
        }
        self.events.push_back(event);
    }

    /// Tells discovery what the node holds now.
    fn refresh_local(&mut self) {
        let slot = self.db.slot().unwrap_or_else(|e| {
            tracing::warn!(target: TARGET, error = %e, "cannot read the DB's slot");
            None
        });
        let (snapshots, modified_time) = own_snapshots(&self.store);
        if let Some(newest) = snapshots.iter().map(|s| s.key.slot).max() {
            self.metrics
                .newest_snapshot_slot
                .set(newest.min(i64::MAX as u64) as i64);
        }
        if let Some(s) = slot {
            self.metrics.local_slot.set(s.min(i64::MAX as u64) as i64);
        }
        self.discovery.set_local(Local {
            slot,
            snapshots,
            modified_time,
        });
    }

    fn streamer_addrs(&self) -> Vec<SocketAddr> {
        addr::streamer_addrs(
            self.config.advertise_addrs(),
            self.streamer.local_addr(),
            &self.listen_addrs,
        )
    }

    fn addresses_changed(&mut self) {
        self.discovery.set_streamer_addrs(self.streamer_addrs());
        self.discovery.set_listen_addrs(self.listen_addrs.clone());
    }

    /// Carries out what discovery asks. Returns whether there was anything.
    fn act(&mut self) -> bool {
        let mut any = false;
        while let Some(action) = self.discovery.poll_action() {
            any = true;
            match action {
                Action::Publish { kind, bytes } => {
                    let delivered = match self.inner.gossipsub.publish(self.topic.clone(), bytes) {
                        Ok(_) => true,
                        // Normal at start: the first peer to join gets the request.
                        Err(gossipsub::PublishError::NoPeersSubscribedToTopic) => {
                            tracing::debug!(target: TARGET, ?kind, "no snapsync peer on the topic yet");
                            false
                        }
                        Err(e) => {
                            tracing::warn!(target: TARGET, ?kind, error = %e, "cannot publish on the topic");
                            false
                        }
                    };
                    self.discovery.on_published(kind, delivered);
                }
                Action::Ask { peer, request } => {
                    let id = self.inner.direct.send_request(
                        &peer,
                        proto::DirectRequest {
                            body: Some(proto::direct_request::Body::Ask(request)),
                        },
                    );
                    if self.asks.len() >= MAX_PENDING_ASKS {
                        self.asks.clear();
                    }
                    self.asks.insert(id, peer);
                }
                Action::Answer {
                    peer,
                    answer,
                    addrs,
                } => {
                    self.inner.direct.send_request_with_addresses(
                        &peer,
                        proto::DirectRequest {
                            body: Some(proto::direct_request::Body::Answer(answer)),
                        },
                        addrs,
                    );
                }
                Action::StartSync(plan) => {
                    self.metrics.syncs_started.inc();
                    let ips = self.peer_ips.clone();
                    let job = SyncJob::start(
                        plan,
                        &self.downloader,
                        self.db.clone(),
                        self.store.clone(),
                        *self.config.load_limits(),
                        &|p: &PeerId| ips.get(p).copied(),
                    );
                    self.job = Some(job);
                }
                Action::AddSyncPeer { key, peer, addrs } => {
                    if let Some(job) = &mut self.job
                        && !addrs.is_empty()
                    {
                        let addr = addr::pick_addr(&addrs, self.peer_ips.get(&peer).copied());
                        job.add_peer(
                            &key,
                            PeerAddr {
                                peer_id: peer,
                                addr,
                            },
                        );
                    }
                }
                Action::Notice(n) => {
                    let event = match n {
                        Notice::Started { round, local_slot } => {
                            Event::DiscoveryStarted { round, local_slot }
                        }
                        Notice::Chosen(plan) => {
                            let last = plan.last();
                            Event::SnapshotFound {
                                key: last.ad.key,
                                full: plan.full.as_ref().map(|t| t.ad.key),
                                peers: last.peers.iter().map(|(p, _)| *p).collect(),
                                bytes: plan.bytes(),
                            }
                        }
                        Notice::NothingToTake { round, adverts } => {
                            Event::NoSnapshotAvailable { round, adverts }
                        }
                        Notice::Conflict(c) => Event::ConflictingSnapshots(c),
                        Notice::Misbehaved { peer, reason } => {
                            Event::PeerMisbehaved { peer, reason }
                        }
                    };
                    self.push_event(event);
                }
            }
        }
        any
    }

    fn on_job(&mut self, event: JobEvent) {
        match event {
            JobEvent::Started {
                key,
                peers,
                resumed_bytes,
            } => self.push_event(Event::DownloadStarted {
                key,
                peers,
                resumed_bytes,
            }),
            JobEvent::Progress(p) => self.push_event(Event::DownloadProgress(p)),
            JobEvent::Done(result) => {
                let job = self.job.take();
                let now = Instant::now();
                match *result {
                    Ok(synced) => {
                        let r = synced.report;
                        self.metrics.synced(r.kind);
                        if let Err(e) = self.store.retain(self.config.creator().retention()) {
                            tracing::warn!(target: TARGET, error = %e, "could not delete old snapshots");
                        }
                        tracing::info!(target: TARGET, slot = r.slot, kind = %r.kind, with_full = synced.with_full, bank_hash = %r.bank_hash.short(), fetched = synced.fetched_bytes, secs = synced.elapsed.as_secs_f64(), "synced");
                        self.refresh_local();
                        self.discovery.on_sync_ended(SyncOutcome::Synced, now);
                        self.push_event(Event::SnapshotSynced {
                            slot: r.slot,
                            bank_hash: r.bank_hash,
                            kind: r.kind,
                            with_full: synced.with_full,
                            bytes: synced.bytes,
                            fetched_bytes: synced.fetched_bytes,
                            elapsed: synced.elapsed,
                            per_peer: synced.per_peer,
                        });
                    }
                    Err(failed) => {
                        self.metrics.sync_failures.inc();
                        let key = job
                            .as_ref()
                            .map(|j| j.plan().last().ad.key)
                            .expect("a job ends once");
                        tracing::warn!(target: TARGET, slot = key.slot, kind = %key.kind, error = %failed.error, "sync failed");
                        self.refresh_local();
                        self.discovery.on_sync_ended(failed.outcome, now);
                        self.push_event(Event::SyncFailed {
                            key,
                            error: failed.error,
                        });
                    }
                }
            }
        }
    }

    fn on_inner(&mut self, event: InnerEvent) {
        let now = Instant::now();
        match event {
            InnerEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            }) => {
                let verdict = if message.topic == self.topic.hash() {
                    self.discovery.on_gossip(message.source, &message.data, now)
                } else {
                    Verdict::Ignore
                };
                let acceptance = match verdict {
                    Verdict::Accept => gossipsub::MessageAcceptance::Accept,
                    Verdict::Reject => gossipsub::MessageAcceptance::Reject,
                    Verdict::Ignore => gossipsub::MessageAcceptance::Ignore,
                };
                self.inner.gossipsub.report_message_validation_result(
                    &message_id,
                    &propagation_source,
                    acceptance,
                );
            }
            InnerEvent::Gossipsub(gossipsub::Event::Subscribed { peer_id, topic })
                if topic == self.topic.hash() =>
            {
                tracing::debug!(target: TARGET, peer = %peer_id, "a snapsync peer joined the topic");
                self.discovery.on_subscribed(peer_id, now);
            }
            InnerEvent::Gossipsub(_) => {}
            InnerEvent::Direct(request_response::Event::Message { peer, message, .. }) => {
                match message {
                    request_response::Message::Request {
                        request, channel, ..
                    } => {
                        let answer = match request.body {
                            Some(proto::direct_request::Body::Ask(ask)) => {
                                self.discovery.on_ask(peer, &ask, now)
                            }
                            Some(proto::direct_request::Body::Answer(answer)) => {
                                self.discovery.on_answer(peer, &answer, false, now);
                                None
                            }
                            None => None,
                        };
                        let _ = self
                            .inner
                            .direct
                            .send_response(channel, proto::DirectResponse { answer });
                    }
                    request_response::Message::Response {
                        request_id,
                        response,
                    } => {
                        if self.asks.remove(&request_id).is_some()
                            && let Some(answer) = response.answer
                        {
                            self.discovery.on_answer(peer, &answer, true, now);
                        }
                    }
                }
            }
            InnerEvent::Direct(request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            }) => {
                self.asks.remove(&request_id);
                if matches!(
                    error,
                    request_response::OutboundFailure::UnsupportedProtocols
                ) {
                    self.discovery.on_not_snapsync(peer);
                }
                tracing::debug!(target: TARGET, %peer, %error, "a direct message did not go through");
            }
            InnerEvent::Direct(request_response::Event::InboundFailure { peer, error, .. }) => {
                tracing::debug!(target: TARGET, %peer, %error, "could not read a direct message");
            }
            InnerEvent::Direct(_) => {}
        }
    }

    /// Drives the node's own work: the sync job, snapshot creation, discovery's timers and
    /// actions. Returns whether anything happened.
    fn poll_work(&mut self, cx: &mut Context<'_>) -> bool {
        // Local work before remote work.
        if let Some(job) = &mut self.job
            && let Poll::Ready(event) = job.poll(cx)
        {
            self.on_job(event);
            return true;
        }
        let mut i = 0;
        while i < self.creating.len() {
            if let Poll::Ready(result) = Pin::new(&mut self.creating[i]).poll(cx) {
                drop(self.creating.swap_remove(i));
                match result {
                    Ok(snap) => {
                        self.metrics.created(snap.manifest().kind);
                        self.refresh_local();
                        self.discovery.on_snapshot_created(Instant::now());
                        self.push_event(Event::SnapshotCreated {
                            manifest: snap.manifest().clone(),
                        });
                    }
                    Err(e) => self.push_event(Event::CreationFailed(e)),
                }
                return true;
            }
            i += 1;
        }
        if self.timer.as_mut().poll(cx).is_ready() {
            self.discovery.handle_timeout(Instant::now());
        }
        if self.act() {
            return true;
        }
        if let Some(at) = self.discovery.poll_timeout() {
            let at = tokio::time::Instant::from_std(at);
            if self.timer.deadline() != at {
                self.timer.as_mut().reset(at);
            }
            if self.timer.as_mut().poll(cx).is_ready() {
                self.discovery.handle_timeout(Instant::now());
                return self.act();
            }
        }
        false
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = <Inner as NetworkBehaviour>::ConnectionHandler;
    type ToSwarm = Event;

    fn handle_pending_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.inner
            .handle_pending_inbound_connection(connection_id, local_addr, remote_addr)
    }

    fn handle_established_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.inner.handle_established_inbound_connection(
            connection_id,
            peer,
            local_addr,
            remote_addr,
        )
    }

    fn handle_pending_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        maybe_peer: Option<PeerId>,
        addresses: &[Multiaddr],
        effective_role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        self.inner.handle_pending_outbound_connection(
            connection_id,
            maybe_peer,
            addresses,
            effective_role,
        )
    }

    fn handle_established_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        role_override: Endpoint,
        port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.inner.handle_established_outbound_connection(
            connection_id,
            peer,
            addr,
            role_override,
            port_use,
        )
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        let now = Instant::now();
        match &event {
            FromSwarm::NewListenAddr(e) if !self.listen_addrs.contains(e.addr) => {
                self.listen_addrs.push(e.addr.clone());
                self.addresses_changed();
            }
            FromSwarm::ExternalAddrConfirmed(e) if !self.listen_addrs.contains(e.addr) => {
                self.listen_addrs.insert(0, e.addr.clone());
                self.addresses_changed();
            }
            FromSwarm::ExpiredListenAddr(e) => {
                self.listen_addrs.retain(|a| a != e.addr);
                self.addresses_changed();
            }
            FromSwarm::ExternalAddrExpired(e) => {
                self.listen_addrs.retain(|a| a != e.addr);
                self.addresses_changed();
            }
            FromSwarm::ConnectionEstablished(e) => {
                if let Some(ip) = addr::ip_of(e.endpoint.get_remote_address()) {
                    if self.peer_ips.len() >= MAX_PEER_IPS
                        && !self.peer_ips.contains_key(&e.peer_id)
                    {
                        self.peer_ips.clear();
                    }
                    self.peer_ips.insert(e.peer_id, ip);
                }
                self.discovery.on_connected(e.peer_id, now);
            }
            FromSwarm::ConnectionClosed(e) if e.remaining_established == 0 => {
                self.discovery.on_disconnected(e.peer_id);
            }
            FromSwarm::DialFailure(e) => {
                self.metrics.dial_failures.inc();
                let addresses = dial_failures(e.error);
                tracing::info!(target: TARGET, peer = ?e.peer_id, error = %e.error, "could not reach a peer");
                self.push_event(Event::PeerUnreachable {
                    peer: e.peer_id,
                    addresses,
                });
            }
            _ => {}
        }
        self.inner.on_swarm_event(event);
    }

    fn on_connection_handler_event(
        &mut self,
        peer_id: PeerId,
        connection_id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        self.inner
            .on_connection_handler_event(peer_id, connection_id, event);
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        loop {
            if let Some(event) = self.events.pop_front() {
                return Poll::Ready(ToSwarm::GenerateEvent(event));
            }
            if self.poll_work(cx) {
                continue;
            }
            match self.inner.poll(cx) {
                Poll::Ready(ToSwarm::GenerateEvent(event)) => {
                    self.on_inner(event);
                    continue;
                }
                Poll::Ready(other) => {
                    return Poll::Ready(
                        other.map_out(|_| unreachable!("events are handled above")),
                    );
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Each address of a failed dial with why it failed, in words an operator reads.
fn dial_failures(error: &DialError) -> Vec<(Multiaddr, String)> {
    use libp2p::TransportError;
    match error {
        DialError::Transport(errors) => errors
            .iter()
            .map(|(addr, e)| {
                let why = match e {
                    TransportError::MultiaddrNotSupported(_) => {
                        "no transport for this address".to_string()
                    }
                    TransportError::Other(e) => {
                        let text = e.to_string();
                        let lower = text.to_lowercase();
                        if lower.contains("refused") {
                            format!("refused: {text}")
                        } else if lower.contains("timed out") || lower.contains("timeout") {
                            format!("timed out: {text}")
                        } else {
                            text
                        }
                    }
                };
                (addr.clone(), why)
            })
            .collect(),
        DialError::WrongPeerId { obtained, address } => vec![(
            address.clone(),
            format!("another peer answered there: {obtained}"),
        )],
        DialError::NoAddresses => Vec::new(),
        other => vec![(Multiaddr::empty(), other.to_string())],
    }
}
