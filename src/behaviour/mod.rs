//! [`Behaviour`]: snapsync as a libp2p [`NetworkBehaviour`]; discovery, decision, download
//! and load tasks.

mod config;
mod decide;
mod protocol;

pub use config::Config;
pub use decide::{Conflict, SnapshotKey};
pub use protocol::{Advert, MessageError};

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::BoxStream;

use libp2p::core::transport::PortUse;
use libp2p::core::{Endpoint, Multiaddr, multiaddr::Protocol};
use libp2p::identity::Keypair;
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm,
};
use libp2p::{PeerId, gossipsub, request_response};
use prost::Message;

use self::decide::{Choice, Rule};
use self::protocol::{
    ANSWER_PROTOCOL, AnswerCodec, GOSSIP_PROTOCOL_PREFIX, InfoRequest, REQUEST_TYPE, RESPONSE_TYPE,
};
use crate::db::{DbError, StateDb};
use crate::hash::BankHash;
use crate::metrics::MessageKind;
use crate::proto;
use crate::snapshot::{
    CreateError, CreationTask, Creator, LoadError, LoadReport, Manifest, SnapshotStore, StoreError,
};
use crate::transfer::{
    DownloadError, DownloadHandle, DownloadTarget, Downloaded, Downloader, PeerAddr, Progress,
    Streamer, StreamerError,
};

/// Log target of discovery and decisions.
pub const TARGET: &str = "NETWORK:SNAPSHOT";

/// Most events waiting to be taken by the swarm; progress updates are the first dropped.
const MAX_PENDING_EVENTS: usize = 1024;

/// Most peers remembered per table (adverts, waiting requesters, strikes, answer cooldowns).
const MAX_TRACKED_PEERS: usize = 4096;

/// snapsync's own gossipsub and answer protocol. Public only because the behaviour's
/// connection handler type names it; not part of the API.
#[doc(hidden)]
#[allow(unreachable_pub, missing_docs)]
pub mod inner {
    use libp2p::{gossipsub, request_response};

    use super::protocol::AnswerCodec;

    #[derive(libp2p::swarm::NetworkBehaviour)]
    #[behaviour(prelude = "libp2p::swarm::derive_prelude")]
    pub struct Inner {
        pub(crate) gossipsub: gossipsub::Behaviour,
        pub(crate) answers: request_response::Behaviour<AnswerCodec>,
    }
}

use inner::{Inner, InnerEvent};

/// Why a [`Behaviour`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BehaviourError {
    /// The snapshot directory cannot be used.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The chunk streamer could not start (port in use, ...).
    #[error(transparent)]
    Streamer(#[from] StreamerError),
    /// The downloader could not start.
    #[error(transparent)]
    Download(#[from] DownloadError),
    /// The gossipsub settings are not valid.
    #[error("gossipsub settings: {0}")]
    Gossipsub(String),
    /// The state DB failed.
    #[error(transparent)]
    Db(#[from] DbError),
}

/// Why syncing a snapshot failed. The live DB is untouched; the next tick tries again.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The download failed.
    #[error("download failed: {0}")]
    Download(#[from] DownloadError),
    /// The downloaded snapshot did not load.
    #[error("load failed: {0}")]
    Load(#[from] LoadError),
    /// The load task ended without a result.
    #[error("the load was aborted")]
    Aborted,
}

/// What the snapsync [`Behaviour`] reports to the swarm's owner.
#[derive(Debug)]
pub enum Event {
    /// The node asked its peers for snapshots.
    DiscoveryStarted {
        /// Number of the round.
        round: u64,
        /// The node's slot, `None` for an empty DB.
        local_slot: Option<u64>,
    },
    /// Peers advertise a snapshot worth taking.
    SnapshotFound {
        /// The snapshot.
        key: SnapshotKey,
        /// The peers advertising it.
        peers: Vec<PeerId>,
    },
    /// No peer advertised a snapshot that could be taken; the next tick asks again.
    NoSnapshotAvailable {
        /// Number of the round.
        round: u64,
        /// Advertisements received (none of them eligible).
        adverts: usize,
    },
    /// Peers advertise different snapshots for the same slot.
    ConflictingSnapshots(Conflict),
    /// A download started.
    DownloadStarted {
        /// The snapshot.
        key: SnapshotKey,
        /// The peers it is fetched from.
        peers: Vec<PeerId>,
    },
    /// Download progress (bytes, rate, ETA, per peer).
    DownloadProgress(Progress),
    /// A snapshot was downloaded, verified and loaded: the DB now holds its state.
    SnapshotSynced {
        /// Slot now live.
        slot: u64,
        /// Bank hash now live (recomputed from the DB).
        bank_hash: BankHash,
        /// Archive size.
        bytes: u64,
        /// Time from the start of the download to the end of the load.
        elapsed: Duration,
        /// Verified bytes each peer delivered.
        per_peer: Vec<(PeerId, u64)>,
    },
    /// Syncing failed.
    SyncFailed {
        /// The snapshot that was being synced.
        key: SnapshotKey,
        /// Why.
        error: SyncError,
    },
    /// The node made a snapshot.
    SnapshotCreated {
        /// Its manifest.
        manifest: Manifest,
    },
    /// Making a snapshot failed.
    CreationFailed(CreateError),
    /// A peer sent messages that failed their checks too often; it is ignored from now on.
    PeerMisbehaved {
        /// The peer.
        peer: PeerId,
        /// The last thing it did wrong.
        reason: String,
    },
}

/// Message counters, for tests and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DiscoveryStats {
    /// Requests this node published.
    pub requests_published: u64,
    /// Requests received from others.
    pub requests_received: u64,
    /// Direct answers sent.
    pub answers_sent: u64,
    /// Direct answers received.
    pub answers_received: u64,
    /// Announcements published.
    pub announcements_published: u64,
    /// Announcements received.
    pub announcements_received: u64,
    /// Messages dropped for failing their checks.
    pub malformed: u64,
    /// Discovery rounds started.
    pub rounds: u64,
    /// Downloads started.
    pub downloads: u64,
}

/// Where the node stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Not syncing.
    Idle,
    /// Collecting answers.
    Collecting,
    /// Downloading a snapshot.
    Downloading,
    /// Loading a downloaded snapshot.
    Loading,
}

/// A summary of what the node knows and does (for status displays).
#[derive(Debug, Clone)]
pub struct Status {
    /// Where the node stands.
    pub phase: Phase,
    /// The DB's slot.
    pub local_slot: Option<u64>,
    /// The highest snapshot slot heard of.
    pub best_known_slot: Option<u64>,
    /// The node's own snapshots, oldest first.
    pub snapshots: Vec<Manifest>,
    /// Recent advertisements from peers.
    pub adverts: Vec<Advert>,
    /// Where the chunk streamer listens (as advertised).
    pub streamer_addrs: Vec<SocketAddr>,
    /// Message counters.
    pub stats: DiscoveryStats,
}

enum State {
    Idle,
    Collecting {
        round: u64,
        deadline: Pin<Box<tokio::time::Sleep>>,
    },
    Downloading {
        key: SnapshotKey,
        handle: DownloadHandle,
        progress: BoxStream<'static, Progress>,
        peers: HashSet<PeerId>,
        started: Instant,
    },
    Loading {
        key: SnapshotKey,
        task: tokio::task::JoinHandle<Result<LoadReport, LoadError>>,
        downloaded: Downloaded,
        started: Instant,
    },
}

/// snapsync as a libp2p [`NetworkBehaviour`], a building block a node composes into its own
/// swarm next to whatever else it runs.
///
/// - **Discovery** (log target `NETWORK:SNAPSHOT`): every `discovery_interval` (first tick at
///   once), and as soon as a peer that speaks snapsync joins the topic, a node that needs a
///   snapshot (empty DB, or too far behind the best snapshot it knows of) publishes a
///   `snapshot_info_request` on snapsync's own gossipsub topic. Peers holding a newer snapshot
///   answer the requester directly over request-response, not on the topic, so a round costs a
///   number of messages linear in the number of nodes. A node that makes or loads a snapshot
///   while others are waiting announces it on the topic.
/// - **Decision**: answers are collected for `answer_window`; the highest slot that enough
///   peers (or a trusted peer, or a trusted hash) agree on is chosen. Conflicting claims for
///   one slot are reported.
/// - **Download and load**: one download at a time, from every peer that advertised the chosen
///   snapshot, over the QUIC chunk stream; then the snapshot is loaded into the DB, served and
///   announced.
///
/// snapsync's gossipsub uses its own protocol id prefix (`/snapsync/meshsub`), so a node's own
/// gossipsub (chat, blocks, ...) in the same swarm never sees its messages, nor it theirs.
///
/// # Example
///
/// ```no_run
/// use std::sync::Arc;
/// use libp2p::{gossipsub, swarm::NetworkBehaviour};
///
/// #[derive(NetworkBehaviour)]
/// struct Node {
///     chat: gossipsub::Behaviour,
///     snapsync: snapsync::Behaviour,
/// }
///
/// # async fn run(keypair: libp2p::identity::Keypair, chat: gossipsub::Behaviour) -> Result<(), Box<dyn std::error::Error>> {
/// let db = Arc::new(snapsync::db::RedbState::open("data/state.redb")?);
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
    local_peer: PeerId,
    topic: gossipsub::IdentTopic,
    db: Arc<dyn StateDb>,
    store: SnapshotStore,
    creator: Creator,
    streamer: Streamer,
    downloader: Downloader,
    state: State,
    events: VecDeque<Event>,
    tick: tokio::time::Interval,
    /// A request held back by `min_request_interval`, to publish when it allows.
    ask_timer: Option<Pin<Box<tokio::time::Sleep>>>,
    creating: Option<CreationTask>,
    round: u64,
    last_request: Option<Instant>,
    adverts: HashMap<PeerId, (Advert, Instant)>,
    best_known_slot: Option<u64>,
    waiting: HashMap<PeerId, Instant>,
    answered: HashMap<PeerId, Instant>,
    strikes: HashMap<PeerId, u32>,
    listen_addrs: Vec<Multiaddr>,
    /// The IP each connected peer is reached on, to pick its chunk-stream address.
    peer_ips: HashMap<PeerId, (IpAddr, Instant)>,
    stats: DiscoveryStats,
}

impl std::fmt::Debug for Behaviour {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Behaviour")
            .field("local_peer", &self.local_peer)
            .field("store", &self.store.dir())
            .field("streamer", &self.streamer.local_addr())
            .finish()
    }
}

/// Inserts into a per-peer table, forgetting the oldest entry when it is full.
fn remember<V>(
    table: &mut HashMap<PeerId, V>,
    peer: PeerId,
    value: V,
    age: impl Fn(&V) -> Instant,
) {
    if table.len() >= MAX_TRACKED_PEERS && !table.contains_key(&peer) {
        let oldest = table.iter().min_by_key(|(_, v)| age(v)).map(|(p, _)| *p);
        if let Some(oldest) = oldest {
            table.remove(&oldest);
        }
    }
    table.insert(peer, value);
}

impl Behaviour {
    /// A snapsync behaviour for the node with `keypair`, over its state `db`. Opens the snapshot
    /// store and starts the chunk streamer and downloader; must be called within a tokio
    /// runtime.
    pub fn new(
        keypair: &Keypair,
        db: Arc<dyn StateDb>,
        config: Config,
    ) -> Result<Self, BehaviourError> {
        let local_peer = keypair.public().to_peer_id();
        let store = SnapshotStore::open(&config.snapshot_dir)?;
        let streamer = Streamer::bind(
            keypair,
            store.clone(),
            config
                .streamer
                .clone()
                .with_token(config.token.clone())
                .with_metrics(config.metrics.clone()),
        )?;
        let downloader = Downloader::new(
            keypair.clone(),
            store.clone(),
            config
                .download
                .clone()
                .with_token(config.token.clone())
                .with_metrics(config.metrics.clone()),
        )?;
        let creator = Creator::new(store.clone(), db.clone(), config.creator);

        let gossip_config = gossipsub::ConfigBuilder::default()
            .protocol_id_prefix(GOSSIP_PROTOCOL_PREFIX)
            .max_transmit_size(config.max_message_bytes)
            .heartbeat_interval(config.heartbeat_interval)
            .heartbeat_initial_delay(config.heartbeat_interval.min(Duration::from_secs(1)))
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
        let answers = request_response::Behaviour::with_codec(
            AnswerCodec {
                max_bytes: config.max_message_bytes,
            },
            [(ANSWER_PROTOCOL, request_response::ProtocolSupport::Full)],
            request_response::Config::default().with_request_timeout(Duration::from_secs(10)),
        );
        let mut tick = tokio::time::interval(config.discovery_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tracing::info!(
            target: TARGET,
            peer = %local_peer,
            streamer = %streamer.local_addr(),
            snapshots = store.list().len(),
            "snapsync started"
        );
        Ok(Self {
            inner: Inner {
                gossipsub: gossip,
                answers,
            },
            local_peer,
            topic,
            db,
            store,
            creator,
            streamer,
            downloader,
            state: State::Idle,
            events: VecDeque::new(),
            tick,
            ask_timer: None,
            creating: None,
            round: 0,
            last_request: None,
            adverts: HashMap::new(),
            best_known_slot: None,
            waiting: HashMap::new(),
            answered: HashMap::new(),
            strikes: HashMap::new(),
            listen_addrs: Vec::new(),
            peer_ips: HashMap::new(),
            stats: DiscoveryStats::default(),
            config,
        })
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

    /// Message counters.
    pub fn stats(&self) -> DiscoveryStats {
        self.stats
    }

    /// The settings.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Where the node stands.
    pub fn phase(&self) -> Phase {
        match self.state {
            State::Idle => Phase::Idle,
            State::Collecting { .. } => Phase::Collecting,
            State::Downloading { .. } => Phase::Downloading,
            State::Loading { .. } => Phase::Loading,
        }
    }

    /// What the node knows and does.
    pub fn status(&self) -> Status {
        let mut adverts: Vec<Advert> = self.adverts.values().map(|(a, _)| a.clone()).collect();
        adverts.sort_by_key(|a| std::cmp::Reverse(a.slot));
        Status {
            phase: self.phase(),
            local_slot: self.db.slot().ok().flatten(),
            best_known_slot: self.best_known_slot,
            snapshots: self
                .store
                .list()
                .iter()
                .map(|s| s.manifest().clone())
                .collect(),
            adverts,
            streamer_addrs: self.streamer_addrs(),
            stats: self.stats,
        }
    }

    /// Call after committing `slot` to the DB: starts a background snapshot when one is due.
    pub fn on_slot(&mut self, slot: u64) {
        if !self.creator.is_due(slot) {
            return;
        }
        if self.creating.is_some() {
            tracing::warn!(target: TARGET, slot, "snapshot creation still in progress; skipping this one");
            return;
        }
        self.creating = self.creator.on_slot(slot);
    }

    /// Starts a snapshot of the current state now (unless one is being made).
    pub fn create_snapshot_now(&mut self) {
        if self.creating.is_none()
            && let Some(task) = self.creator.create_now()
        {
            self.creating = Some(task);
        }
    }

    /// Asks peers for snapshots now, whether or not the node needs one; a newer snapshot
    /// found is synced. Does nothing while a download is under way.
    pub fn sync_now(&mut self) {
        if matches!(self.state, State::Idle) {
            self.start_round();
        }
    }

    /// Cancels a download in progress (its chunks are kept for resume).
    pub fn cancel_sync(&mut self) {
        if let State::Downloading { .. } = self.state {
            self.state = State::Idle;
        }
    }

    fn push_event(&mut self, event: Event) {
        if self.events.len() >= MAX_PENDING_EVENTS {
            if matches!(event, Event::DownloadProgress(_)) {
                return;
            }
            if let Some(i) = self
                .events
                .iter()
                .position(|e| matches!(e, Event::DownloadProgress(_)))
            {
                self.events.remove(i);
            } else {
                self.events.pop_front();
            }
        }
        self.events.push_back(event);
    }

    fn local_slot(&self) -> Option<u64> {
        match self.db.slot() {
            Ok(slot) => slot,
            Err(e) => {
                tracing::warn!(target: TARGET, error = %e, "cannot read the DB's slot");
                None
            }
        }
    }

    /// The node's policy: an empty DB, or one behind the best known snapshot by more than
    /// `behind_threshold` slots, needs a snapshot.
    fn needs_snapshot(&self) -> bool {
        if !self.config.sync_enabled {
            return false;
        }
        match self.local_slot() {
            None => true,
            Some(local) => self
                .best_known_slot
                .is_some_and(|best| best > local.saturating_add(self.config.behind_threshold)),
        }
    }

    /// The chunk-stream addresses to advertise.
    fn streamer_addrs(&self) -> Vec<SocketAddr> {
        if !self.config.advertise_addrs.is_empty() {
            return self.config.advertise_addrs.clone();
        }
        let bound = self.streamer.local_addr();
        if !bound.ip().is_unspecified() {
            return vec![bound];
        }
        let mut ips: Vec<IpAddr> = Vec::new();
        for addr in &self.listen_addrs {
            for p in addr.iter() {
                let ip = match p {
                    Protocol::Ip4(ip) => IpAddr::V4(ip),
                    Protocol::Ip6(ip) => IpAddr::V6(ip),
                    _ => continue,
                };
                if !ip.is_unspecified() && !ips.contains(&ip) && ip.is_ipv4() == bound.is_ipv4() {
                    ips.push(ip);
                }
            }
        }
        // Loopback last: peers on other hosts cannot use it.
        ips.sort_by_key(|ip| ip.is_loopback());
        ips.truncate(protocol::MAX_ADDRS);
        ips.into_iter()
            .map(|ip| SocketAddr::new(ip, bound.port()))
            .collect()
    }

    fn pick_addr(&self, advert: &Advert) -> SocketAddr {
        pick_addr(
            &advert.streamer_addrs,
            self.peer_ips.get(&advert.peer).map(|(ip, _)| *ip),
        )
    }

    /// This node's advertisement of its newest snapshot, if it has one.
    fn own_advert(&self, request_nonce: u64) -> Option<proto::SnapshotInfoResponse> {
        let latest = self.store.latest()?;
        let addrs = self.streamer_addrs();
        if addrs.is_empty() {
            tracing::warn!(target: TARGET, "no address to advertise the chunk stream on: set Config::advertise_addrs or listen on an IP address");
            return None;
        }
        let m = latest.manifest();
        Some(proto::SnapshotInfoResponse {
            r#type: RESPONSE_TYPE.into(),
            has_snapshot: true,
            peer_id: self.local_peer.to_string(),
            file_size: m.archive_size,
            modified_time: m.created_unix_ms / 1000,
            slot: m.slot,
            bank_hash: m.bank_hash.0.to_vec().into(),
            content_root: m.content_root.0.to_vec().into(),
            chunk_size: m.chunk_size.bytes(),
            streamer_addrs: addrs.iter().map(|a| a.to_string()).collect(),
            request_nonce,
        })
    }

    /// Publishes a discovery message on the topic.
    fn publish(
        &mut self,
        body: proto::discovery_message::Body,
    ) -> Result<(), gossipsub::PublishError> {
        let msg = proto::DiscoveryMessage { body: Some(body) };
        self.inner
            .gossipsub
            .publish(self.topic.clone(), msg.encode_to_vec())
            .map(|_| ())
    }

    /// Publishes a request now, or, if the last one was too recent, as soon as allowed.
    fn request(&mut self) {
        let now = Instant::now();
        if let Some(last) = self.last_request
            && now.duration_since(last) < self.config.min_request_interval
        {
            let at = last + self.config.min_request_interval;
            self.ask_timer = Some(Box::pin(tokio::time::sleep_until(at.into())));
            return;
        }
        self.ask_timer = None;
        let request = proto::DiscoveryMessage {
            body: Some(proto::discovery_message::Body::Request(
                proto::SnapshotInfoRequest {
                    r#type: REQUEST_TYPE.into(),
                    requester_id: self.local_peer.to_string(),
                    nonce: rand::random(),
                    requester_slot: self.local_slot(),
                    requester_addrs: self
                        .listen_addrs
                        .iter()
                        .take(protocol::MAX_ADDRS)
                        .map(|a| a.to_vec().into())
                        .collect(),
                },
            )),
        };
        match self
            .inner
            .gossipsub
            .publish(self.topic.clone(), request.encode_to_vec())
        {
            Ok(_) => {
                self.stats.requests_published += 1;
                self.config.metrics.message(MessageKind::RequestSent);
                self.last_request = Some(now);
            }
            // Normal at start: the next tick, or the next peer to join the topic, asks again.
            Err(gossipsub::PublishError::NoPeersSubscribedToTopic) => {
                tracing::debug!(target: TARGET, "no snapsync peer to ask yet");
            }
            Err(e) => {
                tracing::warn!(target: TARGET, error = %e, "cannot publish a snapshot request")
            }
        }
    }

    /// Asks for snapshots and, unless already collecting, opens an answer window.
    fn start_round(&mut self) {
        let now = Instant::now();
        // Forget what peers said long ago; what is current comes back in the answers.
        let horizon = self.config.discovery_interval * 2;
        self.adverts
            .retain(|_, (_, at)| now.duration_since(*at) < horizon);
        self.request();
        if !matches!(self.state, State::Idle) {
            return;
        }
        let local_slot = self.local_slot();
        self.round += 1;
        self.stats.rounds += 1;
        self.config.metrics.discovery_rounds.inc();
        tracing::info!(target: TARGET, round = self.round, ?local_slot, "asking peers for snapshots");
        self.state = State::Collecting {
            round: self.round,
            deadline: Box::pin(tokio::time::sleep(self.config.answer_window)),
        };
        self.push_event(Event::DiscoveryStarted {
            round: self.round,
            local_slot,
        });
    }

    fn rule(&self) -> Rule {
        Rule {
            min_agreeing_peers: self.config.min_agreeing_peers,
            trusted_peers: self.config.trusted_peers.clone(),
            trusted_snapshot: self.config.trusted_snapshot,
        }
    }

    /// The answer window closed: choose, and start the download or say there is nothing.
    fn decide(&mut self, round: u64) {
        let adverts: Vec<Advert> = self.adverts.values().map(|(a, _)| a.clone()).collect();
        let local_slot = self.local_slot();
        let decision = decide::decide(&adverts, local_slot, &self.rule());
        for conflict in decision.conflicts {
            tracing::warn!(target: TARGET, slot = conflict.slot, variants = conflict.variants.len(), "peers advertise different snapshots for the same slot");
            self.push_event(Event::ConflictingSnapshots(conflict));
        }
        self.state = State::Idle;
        match decision.choice {
            Some(choice) => self.start_download(choice),
            None => {
                tracing::info!(target: TARGET, round, adverts = adverts.len(), "no snapshot to take; asking again next tick");
                self.push_event(Event::NoSnapshotAvailable {
                    round,
                    adverts: adverts.len(),
                });
            }
        }
    }

    fn start_download(&mut self, choice: Choice) {
        let key = choice.key;
        let peers: Vec<PeerId> = choice.peers.iter().map(|a| a.peer).collect();
        tracing::info!(
            target: TARGET,
            slot = key.slot,
            bank_hash = %key.bank_hash.short(),
            root = %key.content_root.short(),
            bytes = key.archive_size,
            peers = peers.len(),
            "snapshot chosen; downloading"
        );
        self.push_event(Event::SnapshotFound {
            key,
            peers: peers.clone(),
        });
        let target = DownloadTarget {
            content_root: key.content_root,
            archive_size: key.archive_size,
            chunk_size: choice.chunk_size,
            slot: Some(key.slot),
            bank_hash: Some(key.bank_hash),
        };
        let addrs = choice
            .peers
            .iter()
            .map(|a| PeerAddr {
                peer_id: a.peer,
                addr: self.pick_addr(a),
            })
            .collect();
        let handle = self.downloader.start(target, addrs);
        let progress = handle.progress_stream();
        self.stats.downloads += 1;
        self.push_event(Event::DownloadStarted {
            key,
            peers: peers.clone(),
        });
        self.state = State::Downloading {
            key,
            handle,
            progress,
            peers: peers.into_iter().collect(),
            started: Instant::now(),
        };
    }

    /// Publishes this node's newest snapshot on the topic, if anyone asked recently.
    fn announce(&mut self) {
        let now = Instant::now();
        let window = self.config.announce_window;
        self.waiting
            .retain(|_, at| now.duration_since(*at) < window);
        if self.waiting.is_empty() {
            return;
        }
        let Some(advert) = self.own_advert(0) else {
            return;
        };
        match self.publish(proto::discovery_message::Body::Announcement(advert)) {
            Ok(_) => {
                self.stats.announcements_published += 1;
                self.config.metrics.message(MessageKind::AnnouncementSent);
                tracing::info!(target: TARGET, waiting = self.waiting.len(), "announced a new snapshot");
            }
            Err(e) => tracing::debug!(target: TARGET, error = %e, "cannot announce"),
        }
    }

    fn strike(&mut self, peer: PeerId, error: &dyn std::fmt::Display) {
        self.stats.malformed += 1;
        self.config.metrics.message(MessageKind::Malformed);
        let strikes = self.strikes.get(&peer).copied().unwrap_or(0) + 1;
        remember(&mut self.strikes, peer, strikes, |_| Instant::now());
        tracing::debug!(target: TARGET, %peer, %error, strikes, "dropped a bad message");
        if strikes == self.config.max_strikes {
            tracing::warn!(target: TARGET, %peer, %error, "peer keeps sending bad messages; ignoring it");
            self.push_event(Event::PeerMisbehaved {
                peer,
                reason: error.to_string(),
            });
        }
    }

    fn ignored(&self, peer: &PeerId) -> bool {
        self.strikes
            .get(peer)
            .is_some_and(|s| *s >= self.config.max_strikes)
    }

    fn on_request(&mut self, source: PeerId, request: InfoRequest) {
        self.stats.requests_received += 1;
        self.config.metrics.message(MessageKind::RequestReceived);
        let now = Instant::now();
        remember(&mut self.waiting, source, now, |t| *t);
        let Some(latest) = self.store.latest() else {
            return;
        };
        if request.slot.is_some_and(|s| latest.manifest().slot <= s) {
            return;
        }
        if self
            .answered
            .get(&source)
            .is_some_and(|t| now.duration_since(*t) < self.config.answer_cooldown)
        {
            return;
        }
        let Some(answer) = self.own_advert(request.nonce) else {
            return;
        };
        remember(&mut self.answered, source, now, |t| *t);
        self.inner
            .answers
            .send_request_with_addresses(&source, answer, request.addrs);
        self.stats.answers_sent += 1;
        self.config.metrics.message(MessageKind::AnswerSent);
        tracing::debug!(target: TARGET, requester = %source, slot = latest.manifest().slot, "answered a snapshot request");
    }

    fn on_advert(&mut self, advert: Advert) {
        let now = Instant::now();
        self.best_known_slot = self.best_known_slot.max(Some(advert.slot));
        let key = SnapshotKey::of(&advert);
        let pick = self.pick_addr(&advert);
        if let State::Downloading {
            key: current,
            handle,
            peers,
            ..
        } = &mut self.state
            && *current == key
            && peers.insert(advert.peer)
        {
            handle.add_peer(PeerAddr {
                peer_id: advert.peer,
                addr: pick,
            });
        }
        remember(&mut self.adverts, advert.peer, (advert, now), |(_, t)| *t);
        if matches!(self.state, State::Idle) && self.needs_snapshot() {
            self.start_round();
        }
    }

    fn on_gossip(&mut self, event: gossipsub::Event) {
        match event {
            gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            } => {
                let acceptance = self.check_gossip(&message);
                self.inner.gossipsub.report_message_validation_result(
                    &message_id,
                    &propagation_source,
                    acceptance,
                );
            }
            gossipsub::Event::Subscribed { peer_id, topic } if topic == self.topic.hash() => {
                tracing::debug!(target: TARGET, peer = %peer_id, "a snapsync peer joined");
                match self.state {
                    // Ask at once rather than at the next tick.
                    State::Idle if self.needs_snapshot() => self.start_round(),
                    // Ask the newcomer too: its answer joins the round, or the download.
                    State::Collecting { .. } | State::Downloading { .. } => self.request(),
                    _ => {}
                }
            }
            _ => {}
        }
    }

    fn check_gossip(&mut self, message: &gossipsub::Message) -> gossipsub::MessageAcceptance {
        use gossipsub::MessageAcceptance::{Accept, Ignore, Reject};
        let Some(source) = message.source else {
            return Reject;
        };
        if message.topic != self.topic.hash() || self.ignored(&source) {
            return Ignore;
        }
        if message.data.len() > self.config.max_message_bytes {
            self.strike(source, &MessageError::TooLarge(message.data.len()));
            return Reject;
        }
        let body = match proto::DiscoveryMessage::decode(message.data.as_slice()) {
            Ok(m) => m.body,
            Err(e) => {
                self.strike(source, &MessageError::Decode(e));
                return Reject;
            }
        };
        match body {
            Some(proto::discovery_message::Body::Request(r)) => {
                match protocol::check_request(&r, source) {
                    Ok(request) => {
                        self.on_request(source, request);
                        Accept
                    }
                    Err(e) => {
                        self.strike(source, &e);
                        Reject
                    }
                }
            }
            Some(proto::discovery_message::Body::Announcement(a)) => {
                match protocol::check_advert(&a, source, self.config.max_archive_bytes) {
                    Ok(advert) => {
                        self.stats.announcements_received += 1;
                        self.config
                            .metrics
                            .message(MessageKind::AnnouncementReceived);
                        self.on_advert(advert);
                        Accept
                    }
                    Err(e) => {
                        self.strike(source, &e);
                        Reject
                    }
                }
            }
            None => {
                self.strike(source, &MessageError::Empty);
                Reject
            }
        }
    }

    fn on_answer(
        &mut self,
        event: request_response::Event<proto::SnapshotInfoResponse, proto::Ack>,
    ) {
        match event {
            request_response::Event::Message {
                peer,
                message:
                    request_response::Message::Request {
                        request, channel, ..
                    },
                ..
            } => {
                if self.ignored(&peer) {
                    return;
                }
                let _ = self.inner.answers.send_response(channel, proto::Ack {});
                match protocol::check_advert(&request, peer, self.config.max_archive_bytes) {
                    Ok(advert) => {
                        self.stats.answers_received += 1;
                        self.config.metrics.message(MessageKind::AnswerReceived);
                        self.on_advert(advert);
                    }
                    Err(e) => self.strike(peer, &e),
                }
            }
            request_response::Event::OutboundFailure { peer, error, .. } => {
                tracing::debug!(target: TARGET, %peer, %error, "could not deliver an answer");
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(target: TARGET, %peer, %error, "could not read an answer");
            }
            _ => {}
        }
    }

    /// Drives the node's own work: the discovery tick, the answer window, the download and load,
    /// snapshot creation. Returns whether anything happened.
    fn poll_work(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progressed = false;
        if self.tick.poll_tick(cx).is_ready() {
            progressed = true;
            if matches!(self.state, State::Idle) && self.needs_snapshot() {
                self.start_round();
            }
        }
        if let Some(timer) = &mut self.ask_timer
            && timer.as_mut().poll(cx).is_ready()
        {
            progressed = true;
            self.ask_timer = None;
            if matches!(
                self.state,
                State::Collecting { .. } | State::Downloading { .. }
            ) {
                self.request();
            }
        }
        if let Some(task) = &mut self.creating
            && let Poll::Ready(result) = Pin::new(task).poll(cx)
        {
            progressed = true;
            self.creating = None;
            match result {
                Ok(snap) => {
                    self.config.metrics.snapshots_created.inc();
                    self.push_event(Event::SnapshotCreated {
                        manifest: snap.manifest().clone(),
                    });
                    self.announce();
                }
                Err(e) => self.push_event(Event::CreationFailed(e)),
            }
        }
        // What the current state's futures produced; acted on once the borrow ends.
        let mut decide_round = None;
        let mut updates = Vec::new();
        let mut finished = None;
        match &mut self.state {
            State::Idle | State::Loading { .. } => {}
            State::Collecting { round, deadline } => {
                if deadline.as_mut().poll(cx).is_ready() {
                    decide_round = Some(*round);
                }
            }
            State::Downloading {
                key,
                handle,
                progress,
                started,
                ..
            } => {
                while updates.len() < 64 {
                    match progress.poll_next_unpin(cx) {
                        Poll::Ready(Some(p)) => updates.push(p),
                        _ => break,
                    }
                }
                if let Poll::Ready(result) = Pin::new(handle).poll(cx) {
                    finished = Some((*key, *started, result));
                }
            }
        }
        if let Some(round) = decide_round {
            progressed = true;
            self.decide(round);
        }
        for p in updates {
            progressed = true;
            self.push_event(Event::DownloadProgress(p));
        }
        if let Some((key, started, result)) = finished {
            progressed = true;
            match result {
                Ok(downloaded) => {
                    let db = self.db.clone();
                    let snap = downloaded.snapshot.clone();
                    let task = tokio::task::spawn_blocking(move || {
                        crate::snapshot::load_snapshot(
                            db.as_ref(),
                            &snap.archive_path(),
                            snap.manifest(),
                        )
                    });
                    self.state = State::Loading {
                        key,
                        task,
                        downloaded,
                        started,
                    };
                }
                Err(e) => {
                    tracing::warn!(target: TARGET, slot = key.slot, error = %e, "snapshot download failed");
                    self.config.metrics.sync_failures.inc();
                    self.state = State::Idle;
                    self.push_event(Event::SyncFailed {
                        key,
                        error: SyncError::Download(e),
                    });
                }
            }
        }
        if let State::Loading {
            key,
            task,
            downloaded,
            started,
        } = &mut self.state
            && let Poll::Ready(result) = Pin::new(task).poll(cx)
        {
            progressed = true;
            let key = *key;
            let elapsed = started.elapsed();
            let per_peer = downloaded.per_peer.clone();
            let bytes = downloaded.snapshot.manifest().archive_size;
            self.state = State::Idle;
            match result {
                Ok(Ok(report)) => {
                    self.config.metrics.snapshots_synced.inc();
                    // Synced snapshots count against the retention like created ones.
                    if let Err(e) = self.store.retain(self.config.creator.retain) {
                        tracing::warn!(target: TARGET, error = %e, "could not delete old snapshots");
                    }
                    tracing::info!(target: TARGET, slot = report.slot, bank_hash = %report.bank_hash.short(), secs = elapsed.as_secs_f64(), "snapshot synced and loaded");
                    self.push_event(Event::SnapshotSynced {
                        slot: report.slot,
                        bank_hash: report.bank_hash,
                        bytes,
                        elapsed,
                        per_peer,
                    });
                    self.announce();
                }
                Ok(Err(e)) => {
                    tracing::warn!(target: TARGET, slot = key.slot, error = %e, "snapshot load failed");
                    self.config.metrics.sync_failures.inc();
                    // A snapshot that does not load must not be served either.
                    if let Some(snap) = self.store.get(&key.content_root) {
                        let _ = self.store.remove(&snap);
                    }
                    self.push_event(Event::SyncFailed {
                        key,
                        error: SyncError::Load(e),
                    });
                }
                Err(_) => self.push_event(Event::SyncFailed {
                    key,
                    error: SyncError::Aborted,
                }),
            }
        }
        progressed
    }
}

/// Which of a peer's chunk-stream addresses (never empty) to use: the one on the IP the node is
/// connected to the peer on, else the first that is not loopback, else the first.
fn pick_addr(addrs: &[SocketAddr], connected: Option<IpAddr>) -> SocketAddr {
    addrs
        .iter()
        .find(|a| Some(a.ip()) == connected)
        .or_else(|| addrs.iter().find(|a| !a.ip().is_loopback()))
        .copied()
        .unwrap_or(addrs[0])
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
        match &event {
            FromSwarm::NewListenAddr(e) if !self.listen_addrs.contains(e.addr) => {
                self.listen_addrs.push(e.addr.clone());
            }
            FromSwarm::ExternalAddrConfirmed(e) if !self.listen_addrs.contains(e.addr) => {
                self.listen_addrs.insert(0, e.addr.clone());
            }
            FromSwarm::ExpiredListenAddr(e) => self.listen_addrs.retain(|a| a != e.addr),
            FromSwarm::ConnectionEstablished(e) => {
                let ip = e
                    .endpoint
                    .get_remote_address()
                    .iter()
                    .find_map(|p| match p {
                        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
                        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
                        _ => None,
                    });
                if let Some(ip) = ip {
                    remember(
                        &mut self.peer_ips,
                        e.peer_id,
                        (ip, Instant::now()),
                        |(_, t)| *t,
                    );
                }
            }
            FromSwarm::ExternalAddrExpired(e) => self.listen_addrs.retain(|a| a != e.addr),
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
            match self.inner.poll(cx) {
                Poll::Ready(ToSwarm::GenerateEvent(event)) => {
                    match event {
                        InnerEvent::Gossipsub(e) => self.on_gossip(e),
                        InnerEvent::Answers(e) => self.on_answer(e),
                    }
                    continue;
                }
                Poll::Ready(other) => {
                    return Poll::Ready(
                        other.map_out(|_| unreachable!("events are handled above")),
                    );
                }
                Poll::Pending => {}
            }
            if self.poll_work(cx) {
                continue;
            }
            return Poll::Pending;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chunk_stream_address_follows_the_connection() {
        let addrs: Vec<SocketAddr> = vec![
            "127.0.0.1:9".parse().unwrap(),
            "10.0.0.5:9".parse().unwrap(),
            "192.0.2.7:9".parse().unwrap(),
        ];
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        assert_eq!(pick_addr(&addrs, ip("192.0.2.7")), addrs[2]);
        assert_eq!(pick_addr(&addrs, ip("127.0.0.1")), addrs[0]);
        assert_eq!(pick_addr(&addrs, None), addrs[1], "not loopback");
        assert_eq!(pick_addr(&addrs, ip("203.0.113.1")), addrs[1]);
        assert_eq!(pick_addr(&addrs[..1], None), addrs[0]);
    }
}
