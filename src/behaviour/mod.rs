//! [`Behaviour`]: snapsync as a libp2p `NetworkBehaviour`, a thin driver.
//!
//! It feeds the swarm's events and the clock to the [`Discovery`] state machine and carries out
//! what the machine queued: gossip, direct asks and answers, syncs. `poll` dispatches; the rest
//! lives elsewhere: `event.rs` (what it reports, and how notices and dial errors become events),
//! `config.rs` (its settings), `protocols.rs` (its gossipsub and direct protocol), `sync_job.rs`
//! (one sync, a child it polls), `addr.rs` (which addresses), `direct.rs` (the direct codec),
//! `actions.rs` (carrying out what discovery queued), `messages.rs` (what peers send),
//! `syncing.rs` (starting, stopping and following the sync job), `holdings.rs` (what the node
//! holds, snapshots made here included, told to discovery).

mod actions;
mod addr;
mod config;
mod direct;
mod event;
mod holdings;
mod messages;
mod protocols;
mod sync_job;
mod syncing;
#[cfg_attr(not(feature = "web"), path = "web_off.rs")]
mod web;

pub use config::Config;
pub use event::{BehaviourError, DialFailure, DiscoveryStats, Event, Phase, Status, SyncError};
#[doc(hidden)]
pub use protocols::wire;

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroUsize;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use libp2p::core::transport::PortUse;
use libp2p::core::{Endpoint, Multiaddr};
use libp2p::identity::Keypair;
use libp2p::swarm::behaviour::{ExternalAddresses, ListenAddresses};
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm,
};
use libp2p::{PeerId, gossipsub, request_response};
use lru::LruCache;

use self::protocols::Protocols;
use self::sync_job::SyncJob;
use crate::config_error::ConfigError;
use crate::db::StateDb;
use crate::discovery::{Discovery, Plan, Stage, SyncOutcome, TrustPolicy};
use crate::log::DISCOVERY as TARGET;
use crate::metrics::Metrics;
use crate::snapshot::{CreationTask, Creator, SnapshotStore};
use crate::transfer::{Downloader, Origin, PeerAddr, Streamer};

/// Most events waiting to be taken by the swarm; progress updates are the first dropped.
const MAX_PENDING_EVENTS: usize = 1024;

/// Most direct asks awaiting their response; beyond it the oldest is forgotten.
const MAX_PENDING_ASKS: NonZeroUsize = NonZeroUsize::new(256).expect("not zero");

/// Most peers whose connection address is remembered (to pick their chunk-stream address);
/// beyond it the least recently connected is forgotten.
const MAX_PEER_IPS: NonZeroUsize = NonZeroUsize::new(4096).expect("not zero");

/// Most snapshots proven bad remembered, to delete one a download publishes after the
/// judgement.
const MAX_CONDEMNED: NonZeroUsize = NonZeroUsize::new(256).expect("not zero");

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
    protocols: Protocols,
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
    /// A cancelled job still stopping: no sync starts until it has (it may still hold the DB).
    stopping: Option<tokio::task::JoinHandle<()>>,
    /// A plan chosen while a cancelled job was stopping, started once it has.
    deferred: Option<Plan>,
    creating: Vec<CreationTask>,
    events: std::collections::VecDeque<Event>,
    timer: Pin<Box<tokio::time::Sleep>>,
    /// Direct asks awaiting their response.
    asks: LruCache<request_response::OutboundRequestId, PeerId>,
    /// The swarm's listen and confirmed external addresses, as libp2p tracks them.
    listen: ListenAddresses,
    external: ExternalAddresses,
    /// The IP each connected peer is reached on, to pick its chunk-stream address.
    peer_ips: LruCache<PeerId, IpAddr>,
    chain_tip: Option<u64>,
    /// The web sources, each standing as an identity of its own.
    web: web::WebSources,
    /// Mirroring the store into the publish directory.
    publishing: Arc<holdings::Publishing>,
    /// Snapshots proven bad (their content, or the application's check): deleted from the
    /// store, also when a download of one publishes after the judgement.
    condemned: LruCache<crate::hash::ContentRoot, ()>,
}

impl std::fmt::Debug for Behaviour {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Behaviour")
            .field("store", &self.store.dir())
            .field("streamer", &self.streamer.local_addr())
            .finish()
    }
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
        let (streamer, downloader) = transfer(keypair, &store, &config, &metrics)?;
        let mut creator = Creator::new(store.clone(), db.clone(), *config.creator());
        if config.attests() {
            creator = creator.attesting(keypair.clone(), config.network());
        }
        // The state found at start may have been loaded before a restart: it is not signed
        // (the snapshots made as the node executes on are).
        if let Ok(Some(slot)) = db.slot() {
            creator.loaded_at(slot);
        }
        let (protocols, topic) = protocols::build(keypair, &config)?;
        let now = Instant::now();
        let mut discovery = Discovery::new(
            config.discovery_rules(),
            me,
            metrics.clone(),
            now,
            rand::random(),
        );
        discovery.handle_wall_clock(crate::snapshot::now_unix_ms(), now);
        if config.trust().is_untrusted() && config.discovery().sync_enabled() {
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
        let web = web::WebSources::new(&config)?;
        let mut b = Self {
            web,
            publishing: Arc::default(),
            condemned: LruCache::new(MAX_CONDEMNED),
            protocols,
            metrics,
            topic,
            db,
            store,
            creator,
            streamer,
            downloader,
            discovery,
            job: None,
            stopping: None,
            deferred: None,
            creating: Vec::new(),
            events: Default::default(),
            timer: Box::pin(tokio::time::sleep_until(now.into())),
            asks: LruCache::new(MAX_PENDING_ASKS),
            listen: ListenAddresses::default(),
            external: ExternalAddresses::default(),
            peer_ips: LruCache::new(MAX_PEER_IPS),
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
        DiscoveryStats::of(&self.metrics)
    }

    /// The settings.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Where the node stands.
    pub fn phase(&self) -> Phase {
        match (self.discovery.stage(), &self.job) {
            (_, Some(job)) if job.loading() => Phase::Loading,
            (_, Some(_)) => Phase::Downloading,
            (Stage::Collecting { .. }, _) => Phase::Collecting,
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
            best_known_slot: self.discovery.best_known_slot(Instant::now()),
            snapshots: self
                .store
                .list()
                .iter()
                .map(|s| s.manifest().clone())
                .collect(),
            partial: self.partial_holdings(),
            adverts,
            streamer_addrs: self.streamer_addrs(),
            stats: self.stats(),
        }
    }

    /// Call right after committing `slot` to the DB, before committing the next one: starts a
    /// background snapshot of the state at `slot` when one is due.
    pub fn on_slot(&mut self, slot: u64) {
        self.discovery.handle_slot(slot, Instant::now());
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
        self.discovery.handle_chain_tip(slot, Instant::now());
    }

    /// Changes the trust policy while the node runs (a validator set that changes by epoch):
    /// what peers advertised is counted again under the new policy, a sync it would not
    /// choose is cancelled (its progress kept), and the node decides again at once. A policy
    /// that cannot work is refused with the same error [`Behaviour::new`] gives, and nothing
    /// changes.
    pub fn set_trust(&mut self, policy: TrustPolicy) -> Result<(), ConfigError> {
        policy.validate()?;
        tracing::info!(target: TARGET, trust = %policy.describe(), "trust policy changed");
        self.config = self.config.clone().with_trust(policy.clone());
        self.discovery.handle_policy(policy, Instant::now());
        Ok(())
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
        self.discovery.handle_sync_now(Instant::now());
    }

    /// Cancels a sync in progress (downloaded chunks are kept for resume).
    pub fn cancel_sync(&mut self) {
        if self.job.is_some() {
            self.discovery
                .handle_sync_ended(SyncOutcome::Cancelled, Instant::now());
            self.stop_job();
        }
    }

    /// Shuts snapsync down gracefully: cancels the sync in progress and waits until its
    /// progress is durable, then closes every chunk-stream connection, telling each peer. The
    /// swarm's own connections are the owner's to close.
    pub fn shutdown(&mut self) -> impl std::future::Future<Output = ()> + Send + use<> {
        let job = self.job.take();
        let stopping = self.stopping.take();
        self.deferred = None;
        let streamer = self.streamer.close();
        let downloader = self.downloader.clone();
        async move {
            if let Some(job) = job {
                job.cancel().await;
            }
            if let Some(stopping) = stopping {
                let _ = stopping.await;
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

    /// The node's addresses: the confirmed external ones (most recent first), then the listen
    /// addresses (in a stable order).
    fn own_addrs(&self) -> Vec<Multiaddr> {
        let mut listen: Vec<&Multiaddr> = self
            .listen
            .iter()
            .filter(|a| !self.external.as_slice().contains(a))
            .collect();
        listen.sort_by_key(|a| a.to_string());
        self.external.iter().chain(listen).cloned().collect()
    }

    fn streamer_addrs(&self) -> Vec<SocketAddr> {
        addr::streamer_addrs(
            self.config.advertise_addrs(),
            self.streamer.local_addr(),
            &self.own_addrs(),
        )
    }

    fn addresses_changed(&mut self) {
        self.discovery.handle_streamer_addrs(self.streamer_addrs());
        self.discovery.handle_listen_addrs(self.own_addrs());
    }

    /// A web source's index was read: its listing goes to discovery as that source's advert.
    fn poll_web(&mut self, _cx: &mut Context<'_>) -> bool {
        if let Poll::Ready(advert) = self.web.poll(_cx) {
            if let Some(advert) = advert {
                self.discovery.handle_web_advert(advert, Instant::now());
            }
            return true;
        }
        false
    }

    /// Discovery's timer, set to its next deadline.
    fn poll_timer(&mut self, cx: &mut Context<'_>) -> bool {
        if let Some(at) = self.discovery.poll_timeout() {
            let at = tokio::time::Instant::from_std(at);
            if self.timer.deadline() != at {
                self.timer.as_mut().reset(at);
            }
        }
        if self.timer.as_mut().poll(cx).is_ready() {
            if let Some(check) = self.config.state_check() {
                self.discovery.handle_check_ceiling(check.judges_up_to());
            }
            self.discovery.handle_timeout(Instant::now());
            // Fired: wait for the next deadline (set above on the next turn).
            let far = tokio::time::Instant::now() + std::time::Duration::from_secs(3600);
            self.timer.as_mut().reset(far);
            return true;
        }
        false
    }
}

/// The chunk streamer, bound, and the downloader (whose downloads tell the sources they ask
/// where the streamer serves what they verified).
fn transfer(
    keypair: &Keypair,
    store: &SnapshotStore,
    config: &Config,
    metrics: &Metrics,
) -> Result<(Streamer, Downloader), BehaviourError> {
    let token = config.token();
    let streamer = Streamer::bind(
        keypair,
        store.clone(),
        *config.streamer(),
        token,
        metrics.clone(),
    )?;
    // Downloads tell the sources they ask where this node serves what it verified.
    let serve_port = config
        .download()
        .serve_partial()
        .then(|| streamer.local_addr().port());
    let downloader = Downloader::new(
        keypair.clone(),
        store.clone(),
        config.download().with_serve_port(serve_port),
        token,
        metrics.clone(),
    )?;
    Ok((streamer, downloader))
}

impl Behaviour {
    /// Where to fetch from `peer`: the web source it stands as, or its chunk stream, at the
    /// address of `addrs` picked by the IP it is connected on.
    fn origin_of(&mut self, peer: PeerId, addrs: &[SocketAddr]) -> Option<Origin> {
        if let Some(source) = self.web.get(&peer) {
            return Some(Origin::Web(Arc::new(source)));
        }
        let connected = self.peer_ips.get(&peer).copied();
        (!addrs.is_empty()).then(|| {
            Origin::Peer(PeerAddr {
                peer_id: peer,
                addr: addr::pick_addr(addrs, connected),
            })
        })
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = <Protocols as NetworkBehaviour>::ConnectionHandler;
    type ToSwarm = Event;

    fn handle_pending_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.protocols
            .handle_pending_inbound_connection(connection_id, local_addr, remote_addr)
    }

    fn handle_established_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.protocols.handle_established_inbound_connection(
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
        self.protocols.handle_pending_outbound_connection(
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
        self.protocols.handle_established_outbound_connection(
            connection_id,
            peer,
            addr,
            role_override,
            port_use,
        )
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        let now = Instant::now();
        let listen = self.listen.on_swarm_event(&event);
        if self.external.on_swarm_event(&event) | listen {
            self.addresses_changed();
        }
        match &event {
            FromSwarm::ConnectionEstablished(e) => {
                if let Some(ip) = addr::ip_of(e.endpoint.get_remote_address()) {
                    self.peer_ips.push(e.peer_id, ip);
                }
                self.discovery.handle_connected(e.peer_id, now);
            }
            FromSwarm::ConnectionClosed(e) if e.remaining_established == 0 => {
                self.discovery.handle_disconnected(e.peer_id);
            }
            FromSwarm::DialFailure(e) => {
                self.metrics.dial_failures.inc();
                tracing::info!(target: TARGET, peer = ?e.peer_id, error = %e.error, "could not reach a peer");
                self.push_event(Event::PeerUnreachable {
                    peer: e.peer_id,
                    addresses: DialFailure::of(e.error),
                });
            }
            _ => {}
        }
        self.protocols.on_swarm_event(event);
    }

    fn on_connection_handler_event(
        &mut self,
        peer_id: PeerId,
        connection_id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        self.protocols
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
            // Local work before remote work: the sync, snapshots being made, discovery.
            if let Some(job) = &mut self.job
                && let Poll::Ready(event) = job.poll(cx)
            {
                self.handle_job(event);
                continue;
            }
            if self.poll_stopping(cx)
                | self.poll_web(cx)
                | self.poll_creating(cx)
                | self.poll_timer(cx)
                | self.carry_out_actions()
            {
                continue;
            }
            match self.protocols.poll(cx) {
                Poll::Ready(ToSwarm::GenerateEvent(event)) => self.handle_protocols(event),
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
