//! [`Config`] of the snapsync [`Behaviour`](super::Behaviour).

use crate::macros::setter;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use libp2p::PeerId;

use crate::hash::BankHash;
use crate::snapshot::CreatorConfig;
use crate::transfer::{DownloadConfig, StreamerConfig, Token};
use crate::{ChunkSize, ChunkSizeError};

/// Settings of a snapsync [`Behaviour`](super::Behaviour). Every interval, window, limit and
/// threshold is one of these, with consuming `with_*` setters.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// Directory of the node's snapshots.
    pub snapshot_dir: PathBuf,
    /// Name of the network; nodes only sync with nodes of the same name (it is part of the
    /// gossip topic). Default `"default"`.
    pub network: String,
    /// How often the node checks whether it needs a snapshot (default 30 s; the first check is
    /// right after start).
    pub discovery_interval: Duration,
    /// How long answers are collected before the choice is made (default 1 s).
    pub answer_window: Duration,
    /// A node whose DB is behind the best snapshot it knows of by more than this many slots
    /// needs a snapshot (default 100). An empty DB always does.
    pub behind_threshold: u64,
    /// The highest slot advertised by at least this many peers with the same (slot, bank hash,
    /// content root) is chosen (default 1). Raise it so that a single lying peer cannot pick
    /// the snapshot; it does not apply when trusted peers or a trusted snapshot are set.
    pub min_agreeing_peers: usize,
    /// When not empty, only snapshots advertised by one of these peers are taken (then fetched
    /// from every peer advertising the same snapshot).
    pub trusted_peers: HashSet<PeerId>,
    /// When set, only this (slot, bank hash) is taken.
    pub trusted_snapshot: Option<(u64, BankHash)>,
    /// Whether the node downloads snapshots itself (default true). A producer that only serves
    /// turns this off.
    pub sync_enabled: bool,
    /// Nodes that asked within this window are waiting: a snapshot made or loaded meanwhile is
    /// announced on the topic (default 60 s). With nobody waiting, nothing is published.
    pub announce_window: Duration,
    /// Shortest time between two answers to the same requester (default 1 s).
    pub answer_cooldown: Duration,
    /// Shortest time between two requests of this node (default 500 ms).
    pub min_request_interval: Duration,
    /// Malformed or lying messages after which a peer's messages are ignored (default 5).
    pub max_strikes: u32,
    /// Largest archive an advertisement may claim (default 1 TiB).
    pub max_archive_bytes: u64,
    /// Largest discovery message accepted (default 16 KiB).
    pub max_message_bytes: usize,
    /// Gossipsub heartbeat interval for the snapsync topic (default 1 s).
    pub heartbeat_interval: Duration,
    /// Chunk-stream addresses to advertise; when empty they are derived from the swarm's
    /// listen and external addresses and the streamer's port.
    pub advertise_addrs: Vec<SocketAddr>,
    /// The shared token (`SNAPSHOT_TOKEN`), for serving and for downloading.
    pub token: Option<Token>,
    /// Snapshot creation (`range_for_snapshot`, retention, chunk size, zstd level).
    pub creator: CreatorConfig,
    /// The serving side of the chunk stream.
    pub streamer: StreamerConfig,
    /// The downloading side of the chunk stream.
    pub download: DownloadConfig,
    /// Where to count what the node does (see [`crate::Metrics::register`]).
    pub metrics: crate::Metrics,
}

impl Config {
    /// Settings with the defaults, keeping snapshots in `snapshot_dir`.
    pub fn new(snapshot_dir: impl Into<PathBuf>) -> Self {
        Self {
            snapshot_dir: snapshot_dir.into(),
            network: "default".into(),
            discovery_interval: Duration::from_secs(30),
            answer_window: Duration::from_secs(1),
            behind_threshold: 100,
            min_agreeing_peers: 1,
            trusted_peers: HashSet::new(),
            trusted_snapshot: None,
            sync_enabled: true,
            announce_window: Duration::from_secs(60),
            answer_cooldown: Duration::from_secs(1),
            min_request_interval: Duration::from_millis(500),
            max_strikes: 5,
            max_archive_bytes: 1 << 40,
            max_message_bytes: 16 * 1024,
            heartbeat_interval: Duration::from_secs(1),
            advertise_addrs: Vec::new(),
            token: None,
            creator: CreatorConfig::default(),
            streamer: StreamerConfig::default(),
            download: DownloadConfig::default(),
            metrics: crate::Metrics::default(),
        }
    }

    /// [`Config::new`] with `SNAPSHOT_TOKEN` and `SNAPSHOT_CHUNK_SIZE` from the environment.
    /// A chunk size that is not valid is an error, not a silent default.
    pub fn from_env(snapshot_dir: impl Into<PathBuf>) -> Result<Self, ChunkSizeError> {
        let chunk_size = ChunkSize::from_env()?;
        let mut config = Self::new(snapshot_dir).with_token(Token::from_env());
        config.creator = config
            .creator
            .with_options(config.creator.options.with_chunk_size(chunk_size));
        Ok(config)
    }

    setter!(
        /// Sets the network name.
        with_network, network: impl Into<String>, |network| network.into()
    );

    setter!(
        /// Sets the discovery interval.
        with_discovery_interval, discovery_interval: Duration, |interval| interval.max(Duration::from_millis(10))
    );

    setter!(
        /// Sets the answer window.
        with_answer_window, answer_window: Duration
    );

    setter!(
        /// Sets how far behind (in slots) the node may fall before it needs a snapshot.
        with_behind_threshold, behind_threshold: u64
    );

    setter!(
        /// Sets how many peers must agree on a snapshot.
        with_min_agreeing_peers, min_agreeing_peers: usize, |n| n.max(1)
    );

    setter!(
        /// Sets the trusted peers.
        with_trusted_peers, trusted_peers: impl IntoIterator<Item = PeerId>, |peers| peers.into_iter().collect()
    );

    /// Sets the trusted snapshot.
    pub fn with_trusted_snapshot(mut self, snapshot: Option<(u64, BankHash)>) -> Self {
        self.trusted_snapshot = snapshot;
        self
    }

    setter!(
        /// Turns downloading on or off.
        with_sync_enabled, sync_enabled: bool
    );

    setter!(
        /// Sets the announce window.
        with_announce_window, announce_window: Duration
    );

    setter!(
        /// Sets the per-requester answer cooldown.
        with_answer_cooldown, answer_cooldown: Duration
    );

    setter!(
        /// Sets the shortest time between two requests.
        with_min_request_interval, min_request_interval: Duration
    );

    setter!(
        /// Sets the strikes after which a peer is ignored.
        with_max_strikes, max_strikes: u32, |strikes| strikes.max(1)
    );

    setter!(
        /// Sets the largest archive an advertisement may claim.
        with_max_archive_bytes, max_archive_bytes: u64
    );

    setter!(
        /// Sets the gossipsub heartbeat interval.
        with_heartbeat_interval, heartbeat_interval: Duration, |interval| interval.max(Duration::from_millis(10))
    );

    setter!(
        /// Sets the chunk-stream addresses to advertise.
        with_advertise_addrs, advertise_addrs: Vec<SocketAddr>
    );

    setter!(
        /// Sets the shared token, for serving and downloading.
        with_token, token: Option<Token>
    );

    setter!(
        /// Sets snapshot creation.
        with_creator, creator: CreatorConfig
    );

    setter!(
        /// Sets the serving side of the chunk stream.
        with_streamer, streamer: StreamerConfig
    );

    setter!(
        /// Sets the downloading side of the chunk stream.
        with_download, download: DownloadConfig
    );

    setter!(
        /// Sets where to count what the node does.
        with_metrics, metrics: crate::Metrics
    );

    /// The gossip topic of this network.
    pub fn topic(&self) -> String {
        format!("snapsync/{}/discovery/1", self.network)
    }
}
