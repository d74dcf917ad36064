//! A runnable snapsync node for the examples: a persistent identity, the LMDB state DB, a swarm
//! (QUIC, and TCP when asked) composing the node's own chat gossipsub, snapsync and optional
//! mDNS, a deterministic chain producer, graceful shutdown, and a Prometheus endpoint. Each
//! node runs in its own task; the caller talks to it through a [`NodeHandle`].
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, gossipsub, mdns, noise, tcp, yamux};
use rand::{RngCore, SeedableRng};
use rand_xoshiro::SplitMix64;
use snapsync::db::{LmdbState, StateDb};
use snapsync::layers::snapshot::{CreatorConfig, Retention};
use snapsync::layers::transfer::StreamerConfig;
use tokio::sync::{mpsc, oneshot};

/// The chat topic of the node's own gossipsub.
pub const CHAT_TOPIC: &str = "snapsync-chat";

#[path = "app_root.rs"]
pub mod app_root;

/// The chain a producer executes: every node executing the same chain (same seed, same
/// genesis, same slot length, same initial state) holds the same state at the same slot.
#[derive(Debug, Clone, Copy)]
pub struct Chain {
    /// What the chain's writes derive from.
    pub seed: u64,
    /// Synthetic state written at slot 1, in MiB.
    pub state_mib: u64,
    /// Milliseconds per slot.
    pub slot_ms: u64,
    /// When slot 0 was, milliseconds since the Unix epoch.
    pub genesis_unix_ms: u64,
}

impl Chain {
    /// Accounts written at slot 1.
    pub fn accounts(&self) -> u64 {
        (self.state_mib * 1024).max(64)
    }

    /// The slot the chain is at now, by its clock.
    pub fn head(&self) -> u64 {
        now_unix_ms().saturating_sub(self.genesis_unix_ms) / self.slot_ms.max(1)
    }

    /// What `slot` (after the first) writes, in order (`None`: a deletion): a few accounts
    /// updated, and churn (a key created, deleted three slots later, some re-created).
    pub fn writes(&self, slot: u64) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
        let accounts = self.accounts();
        let r = mix(self.seed ^ slot.rotate_left(17));
        let mut w = Vec::with_capacity(10);
        for k in 0..8u64 {
            let i = mix(r.wrapping_add(k)) % accounts;
            w.push((account(i), Some(account_value(self.seed, i, slot))));
        }
        w.push((
            format!("churn/{slot:012}").into_bytes(),
            Some(slot.to_le_bytes().to_vec()),
        ));
        if slot > 3 {
            w.push((format!("churn/{:012}", slot - 3).into_bytes(), None));
        }
        if slot > 10 && slot.is_multiple_of(7) {
            w.push((
                format!("churn/{:012}", slot - 7).into_bytes(),
                Some(b"again".to_vec()),
            ));
        }
        w
    }
}

/// How a node is set up.
#[derive(Debug, Clone)]
pub struct Options {
    /// State DB, snapshots and identity live here.
    pub data_dir: PathBuf,
    /// libp2p listen addresses.
    pub listen: Vec<Multiaddr>,
    /// Chunk-stream UDP address.
    pub streamer: SocketAddr,
    /// Peers to dial at start.
    pub peers: Vec<Multiaddr>,
    /// Find peers on the LAN by mDNS.
    pub mdns: bool,
    /// Execute this chain (and make snapshots); `None`: do not produce, sync instead. A node
    /// that executes a chain and is empty or behind it by the chain's clock (by more than
    /// `behind_threshold` slots) syncs from its peers first, under its trust settings, then
    /// executes on from the synced slot; it replays the chain from its own state only when it
    /// is close to the tip or no peer offers a snapshot.
    pub chain: Option<Chain>,
    /// Stop producing at this slot.
    pub stop_at_slot: Option<u64>,
    /// Slots between snapshots (`RangeForSnapshot`).
    pub range_for_snapshot: u64,
    /// Slots between full snapshots.
    pub full_interval: u64,
    /// Serving cap per downloading peer, bytes per second.
    pub rate_limit_per_peer: Option<u64>,
    /// Discovery interval.
    pub discovery_interval: Duration,
    /// Slots behind the newest snapshot known before syncing.
    pub behind_threshold: u64,
    /// Which snapshots to take.
    pub trust: snapsync::TrustPolicy,
    /// Prometheus endpoint address.
    pub metrics: Option<SocketAddr>,
    /// Base URLs of published snapshot directories on web servers.
    pub web_sources: Vec<String>,
    /// CA bundles web sources are checked against besides the usual roots.
    pub web_ca_files: Vec<PathBuf>,
    /// Mirror the node's snapshots into this directory, for a static web server.
    pub publish_dir: Option<PathBuf>,
}

impl Options {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            listen: vec!["/ip4/0.0.0.0/udp/0/quic-v1".parse().unwrap()],
            streamer: "0.0.0.0:0".parse().unwrap(),
            peers: Vec::new(),
            mdns: false,
            chain: None,
            stop_at_slot: None,
            range_for_snapshot: snapsync::layers::snapshot::DEFAULT_RANGE_FOR_SNAPSHOT,
            full_interval: snapsync::layers::snapshot::DEFAULT_FULL_INTERVAL,
            rate_limit_per_peer: None,
            discovery_interval: Duration::from_secs(30),
            behind_threshold: 100,
            trust: snapsync::TrustPolicy::default(),
            metrics: None,
            web_sources: Vec::new(),
            web_ca_files: Vec::new(),
            publish_dir: None,
        }
    }
}

#[derive(NetworkBehaviour)]
pub struct NodeBehaviour {
    pub chat: gossipsub::Behaviour,
    pub snapsync: snapsync::Behaviour,
    pub mdns: Toggle<mdns::tokio::Behaviour>,
}

/// What a node reports. (A few events a second move through it: boxing the large variant
/// would buy nothing.)
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum NodeEvent {
    /// The node listens on these addresses, `/p2p/<peer id>` included (reported once, before
    /// any other event).
    Listening { addrs: Vec<Multiaddr> },
    /// A snapsync event.
    Snap(snapsync::Event),
    /// A chat line.
    Chat { from: PeerId, text: String },
    /// The first connection to a peer.
    Connected(PeerId),
    /// The last connection to a peer closed.
    Disconnected(PeerId),
    /// The producer advanced to a slot.
    Slot(u64),
}

type Command = Box<dyn FnOnce(&mut Swarm<NodeBehaviour>, &mut Producer) + Send>;

/// A running node.
pub struct NodeHandle {
    pub peer_id: PeerId,
    pub db: LmdbState,
    pub events: mpsc::Receiver<NodeEvent>,
    commands: mpsc::Sender<Command>,
    task: tokio::task::JoinHandle<()>,
}

impl NodeHandle {
    /// Runs `f` on the node's swarm and producer, in its task, and returns what it returns.
    pub async fn query<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Swarm<NodeBehaviour>, &mut Producer) -> T + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        let cmd: Command = Box::new(move |s, p| {
            let _ = tx.send(f(s, p));
        });
        self.commands.send(cmd).await.ok()?;
        rx.await.ok()
    }

    /// Publishes a chat line (and, on a producer, writes it into the next slot).
    pub async fn chat(&self, text: String) {
        self.query(move |s, p| {
            let topic = gossipsub::IdentTopic::new(CHAT_TOPIC);
            let line = format!("{}: {text}", s.local_peer_id());
            p.pending.push(line);
            s.behaviour_mut().chat.publish(topic, text.into_bytes())
        })
        .await;
    }

    /// Stops the node at once (as a crash would).
    pub fn stop(&self) {
        self.task.abort();
    }

    /// Shuts the node down gracefully: its sync's progress made durable, every chunk-stream and
    /// swarm connection closed with word to the peer; then stops it.
    pub async fn shutdown(&self) {
        let closing = self
            .query(|s, _| {
                let peers: Vec<PeerId> = s.connected_peers().copied().collect();
                for p in peers {
                    let _ = s.disconnect_peer_id(p);
                }
                s.behaviour_mut().snapsync.shutdown()
            })
            .await;
        if let Some(closing) = closing {
            closing.await;
        }
        // Let the swarm send its closes.
        tokio::time::sleep(Duration::from_millis(200)).await;
        self.task.abort();
    }
}

impl Drop for NodeHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Checks the data directory before anything is written to it, so that what is wrong is said
/// plainly: a file where a directory should be, or a place that cannot be written.
pub fn check_data_dir(dir: &Path) -> Result<(), String> {
    snapsync::layers::snapshot::SnapshotStore::open(dir.join("snapshots"))
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The node's identity, kept in `data_dir/identity.key` so that it survives restarts.
pub fn identity(data_dir: &Path) -> std::io::Result<libp2p::identity::Keypair> {
    let path = data_dir.join("identity.key");
    if let Ok(bytes) = std::fs::read(&path)
        && let Ok(k) = libp2p::identity::Keypair::from_protobuf_encoding(&bytes)
    {
        return Ok(k);
    }
    let k = libp2p::identity::Keypair::generate_ed25519();
    std::fs::write(&path, k.to_protobuf_encoding().expect("ed25519 encodes"))?;
    Ok(k)
}

pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A well-mixed function of `z`: one SplitMix64 step.
fn mix(z: u64) -> u64 {
    SplitMix64::seed_from_u64(z).next_u64()
}

fn account(i: u64) -> Vec<u8> {
    format!("acct/{i:010}").into_bytes()
}

fn account_value(seed: u64, i: u64, slot: u64) -> Vec<u8> {
    // Half random (balances, hashes), half structure (small integers, padding).
    let mut v = vec![0u8; 1024];
    let mut xof = blake3::Hasher::new()
        .update(&seed.to_le_bytes())
        .update(&i.to_le_bytes())
        .update(&slot.to_le_bytes())
        .finalize_xof();
    xof.fill(&mut v[..512]);
    for (n, b) in v[512..].iter_mut().enumerate() {
        *b = ((i as usize + n) % 7) as u8;
    }
    v
}

/// Executes a chain, one slot at a time: every write derives from the chain's seed and the slot
/// alone (and, on a chat producer, the lines typed), so every node executing it holds the same
/// state at the same slot.
pub struct Producer {
    db: LmdbState,
    slot: u64,
    chain: Option<Chain>,
    /// Chat lines to write into the next slot.
    pub pending: Vec<String>,
    /// Production stops at this slot (raise it to go on).
    pub stop_at: u64,
}

impl Producer {
    pub fn new(db: LmdbState, chain: Option<Chain>) -> Self {
        let slot = db.slot().ok().flatten().unwrap_or(0);
        Self {
            db,
            slot,
            chain,
            pending: Vec::new(),
            stop_at: u64::MAX,
        }
    }

    /// The slot the state is at.
    pub fn slot(&self) -> u64 {
        self.slot
    }

    /// The state was replaced (by a sync): execution goes on from its slot.
    pub fn reload(&mut self) {
        self.slot = self.db.slot().ok().flatten().unwrap_or(0);
    }

    /// Whether the state is behind the chain's clock by more than `threshold` slots.
    pub fn behind(&self, threshold: u64) -> bool {
        self.chain.is_some() && self.chain_slot() > self.slot.saturating_add(threshold)
    }

    /// The slot the chain is at now, by the clock.
    pub fn chain_slot(&self) -> u64 {
        self.chain.map_or(self.slot, |c| c.head())
    }

    /// Commits the next slot. Slot 1 writes the chain's initial state; every later slot the
    /// chain's writes ([`Chain::writes`]) and the chat lines typed, and the chain's own state
    /// root over the chain's writes ([`app_root`]).
    pub fn step(&mut self) -> Result<u64, snapsync::db::DbError> {
        let chain = self.chain.expect("a chain to execute");
        let slot = self.slot + 1;
        if slot == 1 {
            let accounts = chain.accounts();
            let mut i = 0;
            while i < accounts {
                let end = (i + 2048).min(accounts);
                self.db.commit_slot(1, |w| {
                    for j in i..end {
                        w.put(&account(j), &account_value(chain.seed, j, 1))?;
                    }
                    if end == accounts {
                        w.put(
                            app_root::APP_ROOT,
                            &app_root::genesis_root(chain.seed, accounts),
                        )?;
                    }
                    Ok(())
                })?;
                i = end;
            }
            self.slot = 1;
            return Ok(1);
        }
        let lines = std::mem::take(&mut self.pending);
        let writes = chain.writes(slot);
        let before: [u8; 32] = self
            .db
            .get(app_root::APP_ROOT)?
            .and_then(|r| r.try_into().ok())
            .unwrap_or([0; 32]);
        let root = app_root::next_root(&before, slot, &writes);
        self.db.commit_slot(slot, |w| {
            for (key, value) in &writes {
                match value {
                    Some(v) => w.put(key, v)?,
                    None => w.delete(key)?,
                }
            }
            for (n, line) in lines.iter().enumerate() {
                w.put(format!("chat/{slot:012}/{n}").as_bytes(), line.as_bytes())?;
            }
            w.put(app_root::APP_ROOT, &root)
        })?;
        self.slot = slot;
        Ok(slot)
    }
}

fn chat_gossipsub(keypair: &libp2p::identity::Keypair) -> gossipsub::Behaviour {
    let config = gossipsub::ConfigBuilder::default()
        .heartbeat_interval(Duration::from_secs(1))
        .build()
        .expect("valid gossipsub config");
    let mut g = gossipsub::Behaviour::new(
        gossipsub::MessageAuthenticity::Signed(keypair.clone()),
        config,
    )
    .expect("valid gossipsub");
    g.subscribe(&gossipsub::IdentTopic::new(CHAT_TOPIC))
        .expect("subscribe");
    g
}

/// Discovery rounds with nothing to take after which a node behind the chain replays it from
/// its own state instead of waiting for a snapshot.
const REPLAY_AFTER_ROUNDS: u32 = 3;

/// Most slots executed per loop turn when catching up, so the node stays responsive.
const CATCH_UP_BATCH: u64 = 64;

type StartError = Box<dyn std::error::Error + Send + Sync>;

/// Starts a node in its own task.
pub async fn start(opts: Options) -> Result<NodeHandle, StartError> {
    check_data_dir(&opts.data_dir)?;
    let keypair = identity(&opts.data_dir).map_err(|e| {
        format!(
            "cannot keep the identity in {}: {e}",
            opts.data_dir.display()
        )
    })?;
    let db = LmdbState::open(opts.data_dir.join("state"))?;
    let mut producer = Producer::new(db.clone(), opts.chain);
    producer.stop_at = opts.stop_at_slot.unwrap_or(u64::MAX);
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = snapsync::Metrics::new();
    metrics.register(&mut registry);
    let config = snapsync_config(&opts, metrics)?;
    let state: Arc<dyn StateDb> = Arc::new(db.clone());
    let mut swarm = build_swarm(keypair, state, config, opts.mdns, &mut registry)?;
    let libp2p_metrics = libp2p::metrics::Metrics::new(&mut registry);
    for addr in &opts.listen {
        swarm.listen_on(addr.clone())?;
    }
    if let Some(addr) = opts.metrics {
        serve_metrics(addr, registry).await?;
    }
    for addr in &opts.peers {
        let _ = swarm.dial(addr.clone());
    }
    let peer_id = *swarm.local_peer_id();
    let (events_tx, events) = mpsc::channel(1024);
    let (commands, commands_rx) = mpsc::channel::<Command>(64);
    let driver = Driver::new(swarm, producer, &opts, libp2p_metrics, events_tx);
    let task = tokio::spawn(driver.run(commands_rx));
    Ok(NodeHandle {
        peer_id,
        db,
        events,
        commands,
        task,
    })
}

/// snapsync's settings for a node with `opts`: the environment's (`SNAPSHOT_TOKEN`,
/// `SNAPSHOT_CHUNK_SIZE`), then the node's own.
fn snapsync_config(
    opts: &Options,
    metrics: snapsync::Metrics,
) -> Result<snapsync::Config, StartError> {
    // Every node syncs when behind; one that executes the chain knows the tip by its clock.
    let clock = opts.chain.map(|c| {
        snapsync::ChainClock::new(c.genesis_unix_ms, Duration::from_millis(c.slot_ms.max(1)))
    });
    let discovery = snapsync::DiscoveryConfig::default()
        .with_discovery_interval(opts.discovery_interval)
        .with_behind_threshold(opts.behind_threshold)
        .with_chain_clock(clock)
        .with_executes(opts.chain.is_some())
        .with_sync_enabled(true);
    let mut config = snapsync::Config::from_env(opts.data_dir.join("snapshots"))?
        .with_discovery(discovery)
        .with_trust(opts.trust.clone())
        .with_metrics(metrics)
        .with_web_sources(opts.web_sources.clone())
        .with_web_ca_files(opts.web_ca_files.clone())
        .with_publish_dir(opts.publish_dir.clone());
    // A node that knows the chain checks a synced state's own root against the chain's.
    if let Some(chain) = opts.chain {
        config = config.with_state_check(app_root::LightClient::new(chain));
    }
    // The chunk size stays the environment's.
    let chunk_size = config.chunk_size();
    let creator = CreatorConfig::default()
        .with_range_for_snapshot(opts.range_for_snapshot)
        .with_full_interval(opts.full_interval)
        .with_retention(Retention::default());
    Ok(config
        .with_creator(creator)
        .with_chunk_size(chunk_size)
        .with_streamer(
            StreamerConfig::default()
                .with_listen(opts.streamer)
                .with_rate_limit_per_peer(opts.rate_limit_per_peer),
        ))
}

/// The node's swarm: QUIC and TCP, the chat gossipsub, snapsync, and mDNS when `mdns`.
fn build_swarm(
    keypair: libp2p::identity::Keypair,
    state: Arc<dyn StateDb>,
    config: snapsync::Config,
    mdns: bool,
    registry: &mut prometheus_client::registry::Registry,
) -> Result<Swarm<NodeBehaviour>, StartError> {
    Ok(libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )?
        .with_quic()
        .with_bandwidth_metrics(registry)
        .with_behaviour(|key| {
            let mdns = if mdns {
                Some(mdns::tokio::Behaviour::new(
                    mdns::Config::default(),
                    key.public().to_peer_id(),
                )?)
            } else {
                None
            };
            Ok(NodeBehaviour {
                chat: chat_gossipsub(key),
                snapsync: snapsync::Behaviour::new(key, state, config)?,
                mdns: Toggle::from(mdns),
            })
        })?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
        .build())
}

/// A node's task: the swarm, the chain it executes, and the events it reports.
struct Driver {
    swarm: Swarm<NodeBehaviour>,
    producer: Producer,
    /// It executes the chain.
    producing: bool,
    /// A sync is awaited or under way: execution waits for it.
    syncing: bool,
    /// Discovery rounds in a row with nothing to take, while syncing.
    empty_rounds: u32,
    slots: tokio::time::Interval,
    libp2p_metrics: libp2p::metrics::Metrics,
    events: mpsc::Sender<NodeEvent>,
    /// The addresses listened on so far.
    listen_addrs: Vec<Multiaddr>,
    /// When to report `listening` (a moment after the first address, for the others to come).
    listening_at: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    /// Events waiting until `listening` is out: it is always the first.
    held: Vec<NodeEvent>,
    announced: bool,
}

impl Driver {
    fn new(
        swarm: Swarm<NodeBehaviour>,
        producer: Producer,
        opts: &Options,
        libp2p_metrics: libp2p::metrics::Metrics,
        events: mpsc::Sender<NodeEvent>,
    ) -> Self {
        let producing = opts.chain.is_some();
        // Behind the chain at start: sync first, execute after.
        let syncing = producing && producer.behind(opts.behind_threshold);
        if syncing {
            tracing::info!(
                slot = producer.slot(),
                chain_slot = producer.chain_slot(),
                "behind the chain: syncing from peers before executing"
            );
        }
        let slot_ms = opts.chain.map_or(1_000_000, |c| c.slot_ms.max(1));
        let mut slots = tokio::time::interval(Duration::from_millis(slot_ms));
        slots.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self {
            swarm,
            producer,
            producing,
            syncing,
            empty_rounds: 0,
            slots,
            libp2p_metrics,
            events,
            listen_addrs: Vec::new(),
            listening_at: None,
            held: Vec::new(),
            announced: false,
        }
    }

    /// Runs the node until its handle goes (or aborts it).
    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        loop {
            let listening = async {
                match self.listening_at.as_mut() {
                    Some(t) => t.await,
                    None => std::future::pending().await,
                }
            };
            let executing =
                self.producing && !self.syncing && self.producer.slot() < self.producer.stop_at;
            let event = tokio::select! {
                _ = self.slots.tick(), if executing => self.execute(),
                Some(cmd) = commands.recv() => {
                    cmd(&mut self.swarm, &mut self.producer);
                    None
                }
                _ = listening => {
                    if !self.announce().await {
                        return;
                    }
                    None
                }
                event = self.swarm.select_next_some() => self.on_swarm(event),
            };
            if let Some(event) = event
                && !self.report(event).await
            {
                return;
            }
        }
    }

    /// Executes the slots the chain's clock is ahead by (a batch at most, so the node stays
    /// responsive); the last one executed, if any.
    fn execute(&mut self) -> Option<NodeEvent> {
        let producer = &mut self.producer;
        let target = producer.chain_slot().max(1).min(producer.stop_at);
        let mut last = None;
        for _ in 0..CATCH_UP_BATCH {
            if producer.slot() >= target {
                break;
            }
            match producer.step() {
                Ok(slot) => {
                    self.swarm.behaviour_mut().snapsync.on_slot(slot);
                    last = Some(slot);
                }
                Err(e) => {
                    tracing::error!("cannot advance the state: {e}");
                    break;
                }
            }
        }
        if producer.slot() < target {
            // Still catching up: come back at once.
            self.slots.reset_immediately();
        }
        last.map(NodeEvent::Slot)
    }

    /// Reports `listening`, then what waited for it. Returns whether anyone still listens.
    async fn announce(&mut self) -> bool {
        self.listening_at = None;
        self.announced = true;
        let peer_id = *self.swarm.local_peer_id();
        let addrs = (self.listen_addrs.iter())
            .map(|a| a.clone().with_p2p(peer_id).unwrap_or_else(|a| a))
            .collect();
        if self
            .events
            .send(NodeEvent::Listening { addrs })
            .await
            .is_err()
        {
            return false;
        }
        for e in std::mem::take(&mut self.held) {
            if self.events.send(e).await.is_err() {
                return false;
            }
        }
        true
    }

    /// What a swarm event means to the node, if anything to report.
    fn on_swarm(&mut self, event: SwarmEvent<NodeBehaviourEvent>) -> Option<NodeEvent> {
        use libp2p::metrics::Recorder;
        self.libp2p_metrics.record(&event);
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                self.listen_addrs.push(address);
                if self.listening_at.is_none() && !self.announced {
                    self.listening_at =
                        Some(Box::pin(tokio::time::sleep(Duration::from_millis(200))));
                }
                None
            }
            SwarmEvent::Behaviour(NodeBehaviourEvent::Snapsync(e)) => {
                self.on_snapsync(&e);
                Some(NodeEvent::Snap(e))
            }
            SwarmEvent::Behaviour(NodeBehaviourEvent::Chat(gossipsub::Event::Message {
                message,
                ..
            })) => {
                let from = message.source?;
                let text = String::from_utf8_lossy(&message.data).into_owned();
                self.producer.pending.push(format!("{from}: {text}"));
                Some(NodeEvent::Chat { from, text })
            }
            SwarmEvent::Behaviour(NodeBehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                for (peer, addr) in found {
                    if !self.swarm.is_connected(&peer) {
                        let _ = self.swarm.dial(addr);
                    }
                }
                None
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                num_established,
                ..
            } if num_established.get() == 1 => Some(NodeEvent::Connected(peer_id)),
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => Some(NodeEvent::Disconnected(peer_id)),
            _ => None,
        }
    }

    /// A producer executes only while it does not sync.
    fn on_snapsync(&mut self, e: &snapsync::Event) {
        if !self.producing {
            return;
        }
        match e {
            // A sync replaces the state: execution waits for it.
            snapsync::Event::SnapshotFound { .. } => self.syncing = true,
            snapsync::Event::SnapshotSynced { .. } => {
                self.producer.reload();
                self.syncing = false;
                self.slots.reset_immediately();
            }
            // Nothing to sync from, round after round (or the sync failed): replay the chain
            // from the node's own state.
            snapsync::Event::NoSnapshotAvailable { .. } if self.syncing => {
                self.empty_rounds += 1;
                if self.empty_rounds >= REPLAY_AFTER_ROUNDS {
                    tracing::info!(
                        rounds = self.empty_rounds,
                        "no peer offers a snapshot: replaying the chain from the node's own state"
                    );
                    self.syncing = false;
                    self.slots.reset_immediately();
                }
            }
            snapsync::Event::SyncFailed { .. } if self.syncing => {
                self.syncing = false;
                self.slots.reset_immediately();
            }
            _ => {}
        }
    }

    /// Hands `event` to the handle (held until `listening` is out). Progress updates and
    /// slots are dropped rather than block the node when nobody reads. Returns whether anyone
    /// still listens.
    async fn report(&mut self, event: NodeEvent) -> bool {
        if !self.announced {
            if self.held.len() < 1024 {
                self.held.push(event);
            }
            return true;
        }
        if matches!(
            event,
            NodeEvent::Snap(snapsync::Event::DownloadProgress(_)) | NodeEvent::Slot(_)
        ) {
            let _ = self.events.try_send(event);
            true
        } else {
            self.events.send(event).await.is_ok()
        }
    }
}

/// Serves `registry` on `addr` at `/metrics`, in the OpenMetrics text format with its content
/// type; any other path is 404.
pub async fn serve_metrics(
    addr: SocketAddr,
    registry: prometheus_client::registry::Registry,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let registry = Arc::new(registry);
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let registry = registry.clone();
            tokio::spawn(async move {
                // The request head, up to its blank line (at most 4 KiB, within 5 s).
                let mut buf = Vec::with_capacity(512);
                let read_head = async {
                    let mut piece = [0u8; 512];
                    while buf.len() < 4096 && !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match sock.read(&mut piece).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => buf.extend_from_slice(&piece[..n]),
                        }
                    }
                };
                let _ = tokio::time::timeout(Duration::from_secs(5), read_head).await;
                let head = String::from_utf8_lossy(&buf);
                let path = head.split_whitespace().nth(1).unwrap_or("");
                let response = if path == "/metrics" {
                    let mut body = String::new();
                    let _ = prometheus_client::encoding::text::encode(&mut body, &registry);
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                } else {
                    let body = "not found: metrics are at /metrics\n";
                    format!(
                        "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                };
                let _ = sock.write_all(response.as_bytes()).await;
            });
        }
    });
    Ok(())
}

/// A progress bar for a download of `total` bytes.
pub fn progress_bar(total: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix:>12} [{bar:40}] {bytes}/{total_bytes} {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar
}

/// Moves `bar` to `progress`: the rate is the download's own (verified bytes per second, the
/// figure the summary uses too), with the peers serving.
pub fn update_bar(bar: &indicatif::ProgressBar, progress: &snapsync::layers::transfer::Progress) {
    bar.set_length(progress.total_bytes);
    bar.set_position(progress.done_bytes);
    let serving = progress.peers.iter().filter(|p| p.bytes > 0).count();
    let eta = progress
        .eta
        .map(|e| format!(", {}s left", e.as_secs()))
        .unwrap_or_default();
    bar.set_message(format!(
        "{}/s{eta}, from {}",
        human_bytes(progress.rate as u64),
        plural(serving, "peer")
    ));
}

/// Short form of a peer id for display.
pub fn short(peer: &PeerId) -> String {
    let s = peer.to_string();
    s[s.len().saturating_sub(8)..].to_string()
}

/// What a sync fetched, in words: `full`, `incremental`, or `full + incremental`.
pub fn sync_words(kind: snapsync::layers::snapshot::SnapshotKind, with_full: bool) -> &'static str {
    match (with_full, kind) {
        (true, snapsync::layers::snapshot::SnapshotKind::Incremental) => "full + incremental",
        (_, kind) => kind.as_str(),
    }
}

/// `n thing` or `n things`.
pub fn plural(n: usize, thing: &str) -> String {
    if n == 1 {
        format!("1 {thing}")
    } else {
        format!("{n} {thing}s")
    }
}

/// Bytes in binary units, for people.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
