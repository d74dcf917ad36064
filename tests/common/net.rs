//! Swarms for the network tests: each node runs its swarm in its own task, with the owner's
//! own gossipsub (a chat topic) beside snapsync, and reports its events on a channel.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, gossipsub};
use libp2p_swarm_test::SwarmExt;
use snapsync::DiscoveryConfig;
use snapsync::db::LmdbState;
use snapsync::layers::snapshot::CreatorConfig;
use snapsync::layers::transfer::{DownloadConfig, StreamerConfig};
use tokio::sync::mpsc;

/// A node's behaviour: its own chat gossipsub and snapsync, composed by derive.
#[derive(NetworkBehaviour)]
pub struct TestBehaviour {
    pub chat: gossipsub::Behaviour,
    pub snapsync: snapsync::Behaviour,
}

pub const CHAT_TOPIC: &str = "chat";

/// What a node reports.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // a few events a second
pub enum Ev {
    Snap(snapsync::Event),
    Chat { from: PeerId, text: String },
    Connected(PeerId),
}

pub type Cmd = Box<dyn FnOnce(&mut Swarm<TestBehaviour>) + Send>;

/// A running node.
pub struct TestNode {
    pub index: usize,
    pub peer_id: PeerId,
    pub addr: Multiaddr,
    pub db: LmdbState,
    pub dir: Arc<tempfile::TempDir>,
    cmd: mpsc::UnboundedSender<Cmd>,
    task: tokio::task::JoinHandle<()>,
}

/// What drives a node from another task: its DB and its swarm.
#[derive(Clone)]
pub struct NodeCtl {
    pub db: LmdbState,
    cmd: mpsc::UnboundedSender<Cmd>,
}

impl NodeCtl {
    /// Runs `f` on the node's swarm and returns what it returns (`None` once the node stopped).
    pub async fn try_query<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Swarm<TestBehaviour>) -> T + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let _ = self.cmd.send(Box::new(move |s: &mut Swarm<TestBehaviour>| {
            let _ = tx.send(f(s));
        }));
        rx.await.ok()
    }

    /// [`NodeCtl::try_query`], ignoring a stopped node.
    pub async fn query(&self, f: impl FnOnce(&mut Swarm<TestBehaviour>) + Send + 'static) {
        let _ = self.try_query(f).await;
    }
}

impl TestNode {
    /// A handle to drive the node from another task.
    pub fn ctl(&self) -> NodeCtl {
        NodeCtl {
            db: self.db.clone(),
            cmd: self.cmd.clone(),
        }
    }

    /// Runs `f` on the node's swarm (in its task).
    pub fn run(&self, f: impl FnOnce(&mut Swarm<TestBehaviour>) + Send + 'static) {
        let _ = self.cmd.send(Box::new(f));
    }

    /// Runs `f` on the node's swarm and returns what it returns.
    pub async fn query<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Swarm<TestBehaviour>) -> T + Send + 'static,
    ) -> T {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.run(move |s| {
            let _ = tx.send(f(s));
        });
        rx.await.expect("node alive")
    }

    pub fn dial(&self, addr: Multiaddr) {
        self.run(move |s| {
            s.dial(addr).expect("dial");
        });
    }

    pub fn chat(&self, text: &str) {
        let text = text.to_string();
        self.run(move |s| {
            let _ = s
                .behaviour_mut()
                .chat
                .publish(gossipsub::IdentTopic::new(CHAT_TOPIC), text.into_bytes());
        });
    }

    /// Stops the node: its swarm, streamer and downloads go away.
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Settings for tests: quick ticks and windows, loopback chunk streams, a snapshot every 10
/// slots, every one of them full (tests of lineage set their own full interval).
pub fn test_config(dir: &std::path::Path) -> snapsync::Config {
    snapsync::Config::new(dir.join("snapshots"))
        .with_discovery(
            DiscoveryConfig::default()
                .with_discovery_interval(Duration::from_secs(2))
                .with_answer_window(Duration::from_millis(400))
                .with_min_request_interval(Duration::from_millis(100))
                .with_answer_cooldown(Duration::from_millis(100))
                .with_announce_delay(Duration::from_millis(200)),
        )
        .with_heartbeat_interval(Duration::from_millis(100))
        .with_creator(
            CreatorConfig::default()
                .with_range_for_snapshot(10)
                .with_full_interval(10),
        )
        .with_streamer(StreamerConfig::default().with_listen("127.0.0.1:0".parse().unwrap()))
        .with_download(
            DownloadConfig::default()
                .with_bind("127.0.0.1:0".parse().unwrap())
                .with_backoff_min(Duration::from_millis(50))
                .with_backoff_max(Duration::from_millis(500))
                .with_connect_timeout(Duration::from_secs(3))
                .with_min_request_timeout(Duration::from_secs(3))
                .with_no_progress_timeout(Duration::from_secs(20)),
        )
}

/// `config` with its discovery settings changed by `f`.
pub fn tune(
    config: snapsync::Config,
    f: impl FnOnce(DiscoveryConfig) -> DiscoveryConfig,
) -> snapsync::Config {
    let discovery = f(config.discovery().clone());
    config.with_discovery(discovery)
}

/// `config` for a node that serves and never syncs.
pub fn serve_only(config: snapsync::Config) -> snapsync::Config {
    tune(config, |d| d.with_sync_enabled(false))
}

fn chat_gossipsub(keypair: &libp2p::identity::Keypair) -> gossipsub::Behaviour {
    let config = gossipsub::ConfigBuilder::default()
        .heartbeat_interval(Duration::from_millis(100))
        .heartbeat_initial_delay(Duration::from_millis(100))
        .build()
        .unwrap();
    let mut g = gossipsub::Behaviour::new(
        gossipsub::MessageAuthenticity::Signed(keypair.clone()),
        config,
    )
    .unwrap();
    g.subscribe(&gossipsub::IdentTopic::new(CHAT_TOPIC))
        .unwrap();
    g
}

/// Starts a node over `db` in `dir`, with `config` (see [`test_config`]); its events go to
/// `events` tagged with `index`.
pub async fn start_node(
    index: usize,
    dir: Arc<tempfile::TempDir>,
    db: LmdbState,
    config: snapsync::Config,
    events: mpsc::UnboundedSender<(usize, Ev)>,
) -> TestNode {
    let state: Arc<dyn snapsync::db::StateDb> = Arc::new(db.clone());
    let swarm = Swarm::new_ephemeral_tokio(|keypair| TestBehaviour {
        chat: chat_gossipsub(&keypair),
        snapsync: snapsync::Behaviour::new(&keypair, state, config).expect("snapsync"),
    });
    run_node(index, dir, db, swarm, events).await
}

/// `n` producers: serve-only nodes (indexes `first` to `first + n - 1`) with the settings
/// `config` gives for each one's directory, each connected to every one started before it.
pub async fn start_producers(
    events: &Events,
    first: usize,
    n: usize,
    config: impl Fn(&std::path::Path) -> snapsync::Config,
) -> Vec<TestNode> {
    let mut nodes: Vec<TestNode> = Vec::new();
    for i in first..first + n {
        let (dir, db) = node_dir(0, 0, 0);
        let cfg = serve_only(config(dir.path()));
        let node = start_node(i, dir.clone(), db, cfg, events.tx.clone()).await;
        for before in &nodes {
            node.dial(before.addr.clone());
        }
        nodes.push(node);
    }
    nodes
}

/// [`start_node`] with the identity `keypair` (one ground to sort first, say). The swarm is
/// the one `libp2p-swarm-test` makes (memory and TCP, plaintext, yamux).
pub async fn start_node_keyed(
    index: usize,
    dir: Arc<tempfile::TempDir>,
    db: LmdbState,
    config: snapsync::Config,
    events: mpsc::UnboundedSender<(usize, Ev)>,
    keypair: libp2p::identity::Keypair,
) -> TestNode {
    use libp2p::Transport as _;
    use libp2p::core::transport::MemoryTransport;
    use libp2p::core::upgrade::Version;
    let state: Arc<dyn snapsync::db::StateDb> = Arc::new(db.clone());
    let transport = MemoryTransport::default()
        .or_transport(libp2p::tcp::tokio::Transport::default())
        .upgrade(Version::V1)
        .authenticate(libp2p::plaintext::Config::new(&keypair))
        .multiplex(libp2p::yamux::Config::default())
        .timeout(Duration::from_secs(20))
        .boxed();
    let behaviour = TestBehaviour {
        chat: chat_gossipsub(&keypair),
        snapsync: snapsync::Behaviour::new(&keypair, state, config).expect("snapsync"),
    };
    let peer_id = keypair.public().to_peer_id();
    let swarm = Swarm::new(
        transport,
        behaviour,
        peer_id,
        libp2p::swarm::Config::with_tokio_executor(),
    );
    run_node(index, dir, db, swarm, events).await
}

/// Listens on memory and runs `swarm` in its own task.
async fn run_node(
    index: usize,
    dir: Arc<tempfile::TempDir>,
    db: LmdbState,
    mut swarm: Swarm<TestBehaviour>,
    events: mpsc::UnboundedSender<(usize, Ev)>,
) -> TestNode {
    let listener = swarm.listen_on("/memory/0".parse().unwrap()).unwrap();
    let addr = loop {
        match swarm.select_next_some().await {
            SwarmEvent::NewListenAddr {
                listener_id,
                address,
            } if listener_id == listener => break address,
            SwarmEvent::Behaviour(TestBehaviourEvent::Snapsync(e)) => {
                let _ = events.send((index, Ev::Snap(e)));
            }
            _ => {}
        }
    };
    swarm.add_external_address(addr.clone());
    let peer_id = *swarm.local_peer_id();
    let (cmd, mut cmds) = mpsc::unbounded_channel::<Cmd>();
    let task = tokio::spawn(async move {
        loop {
            tokio::select! {
                Some(cmd) = cmds.recv() => cmd(&mut swarm),
                event = swarm.select_next_some() => {
                    let ev = match event {
                        SwarmEvent::Behaviour(TestBehaviourEvent::Snapsync(e)) => Ev::Snap(e),
                        SwarmEvent::Behaviour(TestBehaviourEvent::Chat(gossipsub::Event::Message { message, .. })) => Ev::Chat {
                            from: message.source.unwrap(),
                            text: String::from_utf8_lossy(&message.data).into_owned(),
                        },
                        SwarmEvent::ConnectionEstablished { peer_id, .. } => Ev::Connected(peer_id),
                        _ => continue,
                    };
                    if events.send((index, ev)).is_err() {
                        return;
                    }
                }
            }
        }
    });
    TestNode {
        index,
        peer_id,
        addr,
        db,
        dir,
        cmd,
        task,
    }
}

/// Events of all nodes, with a way to wait for one.
pub struct Events {
    pub rx: mpsc::UnboundedReceiver<(usize, Ev)>,
    pub tx: mpsc::UnboundedSender<(usize, Ev)>,
}

impl Events {
    pub fn new() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Self { rx, tx }
    }

    /// Waits up to `timeout` for an event `f` picks; panics with `what` if none comes.
    pub async fn wait<T>(
        &mut self,
        timeout: Duration,
        what: &str,
        mut f: impl FnMut(usize, &Ev) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.rx.recv()).await {
                Ok(Some((i, ev))) => {
                    if let Some(t) = f(i, &ev) {
                        return t;
                    }
                }
                Ok(None) => panic!("event channel closed while waiting for {what}"),
                Err(_) => panic!("timed out after {timeout:?} waiting for {what}"),
            }
        }
    }
}

impl Events {
    /// Watches the events for `period`, calling `check` on each (which panics on one that must
    /// not come).
    pub async fn none_for(&mut self, period: Duration, mut check: impl FnMut(usize, &Ev)) {
        let deadline = Instant::now() + period;
        while let Ok(Some((i, ev))) = tokio::time::timeout_at(deadline.into(), self.rx.recv()).await
        {
            check(i, &ev);
        }
    }
}

impl Default for Events {
    fn default() -> Self {
        Self::new()
    }
}

/// A node directory with a DB at `slot` holding about `kib` KiB of state.
pub fn node_dir(kib: u64, slot: u64, seed: u64) -> (Arc<tempfile::TempDir>, LmdbState) {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let db = LmdbState::open(dir.path().join("state")).unwrap();
    if kib > 0 {
        let mut rng = super::Rng::new(seed);
        let entries = kib / 4;
        let mut i = 0;
        while i < entries {
            let end = (i + 256).min(entries);
            db.commit_slot(slot, |w| {
                for j in i..end {
                    w.put(&super::key(j), &rng.bytes(4096))?;
                }
                Ok(())
            })
            .unwrap();
            i = end;
        }
    }
    (dir, db)
}

/// A node's `SnapshotSynced`.
#[derive(Debug, Clone)]
pub struct Synced {
    pub index: usize,
    pub slot: u64,
    pub bank_hash: snapsync::BankHash,
    pub per_peer: Vec<(PeerId, u64)>,
}

impl Events {
    /// Waits for node `node` (any node for `None`) to sync; its sync failing fails the test.
    pub async fn synced(&mut self, node: Option<usize>) -> Synced {
        self.wait(Duration::from_secs(60), "a sync", |i, e| match e {
            Ev::Snap(snapsync::Event::SnapshotSynced {
                slot,
                bank_hash,
                per_peer,
                ..
            }) if node.is_none_or(|n| n == i) => Some(Synced {
                index: i,
                slot: *slot,
                bank_hash: *bank_hash,
                per_peer: per_peer.clone(),
            }),
            Ev::Snap(snapsync::Event::SyncFailed { error, .. }) if node.is_none_or(|n| n == i) => {
                panic!("node {i}: {error}")
            }
            _ => None,
        })
        .await
    }
}
