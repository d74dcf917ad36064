//! A runnable snapsync node for the examples: a persistent identity, the redb state DB, a
//! swarm (TCP and QUIC) composing the node's own chat gossipsub, snapsync and optional mDNS, a
//! slot producer, a progress bar and a Prometheus endpoint. Each node runs in its own task; the
//! caller talks to it through a [`NodeHandle`].
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, gossipsub, mdns, noise, tcp, yamux};
use snapsync::db::{RedbState, StateDb};
use tokio::sync::{mpsc, oneshot};

/// The chat topic of the node's own gossipsub.
pub const CHAT_TOPIC: &str = "snapsync-chat";

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
    /// Advance slots (and write state) every this many milliseconds; `None`: do not produce.
    pub produce_slot_ms: Option<u64>,
    /// Synthetic state to write before producing, MiB.
    pub state_mib: u64,
    /// Stop producing at this slot.
    pub stop_at_slot: Option<u64>,
    /// Slots between snapshots (`RangeForSnapshot`).
    pub range_for_snapshot: u64,
    /// Serving cap per downloading peer, bytes per second.
    pub rate_limit_per_peer: Option<u64>,
    /// Discovery interval.
    pub discovery_interval: Duration,
    /// Prometheus endpoint address.
    pub metrics: Option<SocketAddr>,
}

impl Options {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            listen: vec!["/ip4/0.0.0.0/udp/0/quic-v1".parse().unwrap()],
            streamer: "0.0.0.0:0".parse().unwrap(),
            peers: Vec::new(),
            mdns: false,
            produce_slot_ms: None,
            state_mib: 0,
            stop_at_slot: None,
            range_for_snapshot: snapsync::snapshot::DEFAULT_RANGE_FOR_SNAPSHOT,
            rate_limit_per_peer: None,
            discovery_interval: Duration::from_secs(30),
            metrics: None,
        }
    }
}

#[derive(NetworkBehaviour)]
pub struct NodeBehaviour {
    pub chat: gossipsub::Behaviour,
    pub snapsync: snapsync::Behaviour,
    pub mdns: Toggle<mdns::tokio::Behaviour>,
}

/// What a node reports.
#[derive(Debug)]
pub enum NodeEvent {
    /// The node listens on these addresses (reported once, shortly after start).
    Listening { addrs: Vec<Multiaddr> },
    /// A snapsync event.
    Snap(snapsync::Event),
    /// A chat line.
    Chat { from: PeerId, text: String },
    /// A connection to a peer.
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
    pub db: RedbState,
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

    /// Stops the node.
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for NodeHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The node's identity, kept in `data_dir/identity.key` so that it survives restarts.
pub fn identity(data_dir: &std::path::Path) -> std::io::Result<libp2p::identity::Keypair> {
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

/// Advances the state: writes synthetic accounts and chat lines, one slot at a time.
pub struct Producer {
    db: RedbState,
    slot: u64,
    seed: u64,
    /// Chat lines to write into the next slot.
    pub pending: Vec<String>,
}

fn account(i: u64) -> Vec<u8> {
    format!("acct/{i:010}").into_bytes()
}

fn account_value(i: u64, slot: u64) -> Vec<u8> {
    // Half random (balances, hashes), half structure (small integers, padding).
    let mut v = vec![0u8; 1024];
    let mut xof = blake3::Hasher::new()
        .update(&i.to_le_bytes())
        .update(&slot.to_le_bytes())
        .finalize_xof();
    xof.fill(&mut v[..512]);
    for (n, b) in v[512..].iter_mut().enumerate() {
        *b = ((i as usize + n) % 7) as u8;
    }
    v
}

impl Producer {
    pub fn new(db: RedbState) -> Self {
        let slot = db.slot().ok().flatten().unwrap_or(0);
        Self {
            db,
            slot,
            seed: 1,
            pending: Vec::new(),
        }
    }

    /// The slot the state is at.
    pub fn slot(&self) -> u64 {
        self.slot
    }

    /// Writes about `mib` MiB of accounts, unless the DB already holds state.
    pub fn fill(&mut self, mib: u64) -> Result<(), snapsync::db::DbError> {
        if self.slot > 0 || mib == 0 {
            return Ok(());
        }
        let accounts = mib * 1024;
        let mut i = 0;
        while i < accounts {
            let end = (i + 2048).min(accounts);
            self.db.commit_slot(1, |w| {
                for j in i..end {
                    w.put(&account(j), &account_value(j, 1))?;
                }
                Ok(())
            })?;
            i = end;
        }
        self.slot = 1;
        Ok(())
    }

    /// Commits the next slot: a few account updates and the pending chat lines.
    pub fn step(&mut self) -> Result<u64, snapsync::db::DbError> {
        let slot = self.slot + 1;
        let lines = std::mem::take(&mut self.pending);
        let accounts = self.db.len()?.max(1);
        self.seed = self
            .seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(slot);
        let seed = self.seed;
        self.db.commit_slot(slot, |w| {
            for k in 0..8u64 {
                let i = (seed.rotate_left(k as u32 * 8)) % accounts;
                w.put(&account(i), &account_value(i, slot))?;
            }
            for (n, line) in lines.iter().enumerate() {
                w.put(format!("chat/{slot:012}/{n}").as_bytes(), line.as_bytes())?;
            }
            Ok(())
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

/// Starts a node in its own task.
pub async fn start(opts: Options) -> Result<NodeHandle, Box<dyn std::error::Error + Send + Sync>> {
    std::fs::create_dir_all(&opts.data_dir)
        .map_err(|e| format!("cannot create {}: {e}", opts.data_dir.display()))?;
    let keypair = identity(&opts.data_dir).map_err(|e| {
        format!(
            "cannot keep the identity in {}: {e}",
            opts.data_dir.display()
        )
    })?;
    let db = RedbState::open(opts.data_dir.join("state.redb"))?;
    let mut producer = Producer::new(db.clone());
    if opts.produce_slot_ms.is_some() {
        producer.fill(opts.state_mib)?;
    }
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = snapsync::Metrics::new();
    metrics.register(&mut registry);
    let mut config = snapsync::Config::from_env(opts.data_dir.join("snapshots"))?
        .with_discovery_interval(opts.discovery_interval)
        .with_sync_enabled(opts.produce_slot_ms.is_none())
        .with_metrics(metrics);
    let creator = config
        .creator
        .with_range_for_snapshot(opts.range_for_snapshot);
    let streamer = config
        .streamer
        .clone()
        .with_listen(opts.streamer)
        .with_rate_limit_per_peer(opts.rate_limit_per_peer);
    config = config.with_creator(creator).with_streamer(streamer);
    let state: Arc<dyn StateDb> = Arc::new(db.clone());
    let mdns_on = opts.mdns;
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )?
        .with_quic()
        .with_behaviour(|key| {
            let mdns = if mdns_on {
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
        .build();
    for addr in &opts.listen {
        swarm.listen_on(addr.clone())?;
    }
    for peer in &opts.peers {
        swarm.dial(peer.clone())?;
    }
    if let Some(addr) = opts.metrics {
        serve_metrics(addr, registry).await?;
    }
    let peer_id = *swarm.local_peer_id();
    let (events_tx, events) = mpsc::channel(1024);
    let (commands, mut commands_rx) = mpsc::channel::<Command>(64);
    let slot_ms = opts.produce_slot_ms;
    let stop_at = opts.stop_at_slot.unwrap_or(u64::MAX);
    let task = tokio::spawn(async move {
        let mut slots = tokio::time::interval(Duration::from_millis(slot_ms.unwrap_or(1_000_000)));
        let mut listen_addrs = Vec::new();
        let mut listening_timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
        loop {
            let listening = async {
                match listening_timer.as_mut() {
                    Some(t) => t.await,
                    None => std::future::pending().await,
                }
            };
            let event = tokio::select! {
                _ = slots.tick(), if slot_ms.is_some() && producer.slot() < stop_at => match producer.step() {
                    Ok(slot) => {
                        swarm.behaviour_mut().snapsync.on_slot(slot);
                        NodeEvent::Slot(slot)
                    }
                    Err(e) => {
                        tracing::error!("cannot advance the state: {e}");
                        continue;
                    }
                },
                Some(cmd) = commands_rx.recv() => {
                    cmd(&mut swarm, &mut producer);
                    continue;
                }
                _ = listening => {
                    listening_timer = None;
                    NodeEvent::Listening { addrs: listen_addrs.clone() }
                }
                event = swarm.select_next_some() => match event {
                    SwarmEvent::NewListenAddr { address, .. } => {
                        listen_addrs.push(address);
                        if listening_timer.is_none() && listen_addrs.len() == 1 {
                            listening_timer = Some(Box::pin(tokio::time::sleep(Duration::from_millis(200))));
                        }
                        continue;
                    }
                    SwarmEvent::Behaviour(NodeBehaviourEvent::Snapsync(e)) => NodeEvent::Snap(e),
                    SwarmEvent::Behaviour(NodeBehaviourEvent::Chat(gossipsub::Event::Message { message, .. })) => {
                        let from = message.source.unwrap_or(PeerId::random());
                        let text = String::from_utf8_lossy(&message.data).into_owned();
                        producer.pending.push(format!("{from}: {text}"));
                        NodeEvent::Chat { from, text }
                    }
                    SwarmEvent::Behaviour(NodeBehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                        for (peer, addr) in found {
                            if !swarm.is_connected(&peer) {
                                let _ = swarm.dial(addr);
                            }
                        }
                        continue;
                    }
                    SwarmEvent::ConnectionEstablished { peer_id, num_established, .. } if num_established.get() == 1 => {
                        NodeEvent::Connected(peer_id)
                    }
                    SwarmEvent::ConnectionClosed { peer_id, num_established: 0, .. } => NodeEvent::Disconnected(peer_id),
                    _ => continue,
                },
            };
            // Progress updates are dropped rather than block the node when nobody reads.
            if matches!(
                event,
                NodeEvent::Snap(snapsync::Event::DownloadProgress(_)) | NodeEvent::Slot(_)
            ) {
                let _ = events_tx.try_send(event);
            } else if events_tx.send(event).await.is_err() {
                return;
            }
        }
    });
    Ok(NodeHandle {
        peer_id,
        db,
        events,
        commands,
        task,
    })
}

/// Serves `registry` in the Prometheus text format on `addr` (any path).
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
                let mut buf = [0u8; 1024];
                let _ = sock.read(&mut buf).await;
                let mut body = String::new();
                let _ = prometheus_client::encoding::text::encode(&mut body, &registry);
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
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
            "{spinner} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar
}

/// Moves `bar` to `progress`, with the peers serving in its message.
pub fn update_bar(bar: &indicatif::ProgressBar, progress: &snapsync::transfer::Progress) {
    bar.set_length(progress.total_bytes);
    bar.set_position(progress.done_bytes);
    let serving = progress.peers.iter().filter(|p| p.bytes > 0).count();
    bar.set_message(format!("from {serving} of {} peers", progress.peers.len()));
}

/// Short form of a peer id for display.
pub fn short(peer: &PeerId) -> String {
    let s = peer.to_string();
    s[s.len().saturating_sub(8)..].to_string()
}
