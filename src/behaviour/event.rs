//! What the behaviour reports and exposes: [`Event`], its errors, [`Status`].

use std::net::SocketAddr;
use std::time::Duration;

use libp2p::{Multiaddr, PeerId};

use crate::config_error::ConfigError;
use crate::db::DbError;
use crate::discovery::{Advert, Conflict};
use crate::hash::BankHash;
use crate::snapshot::{CreateError, LoadError, Manifest, SnapshotKey, SnapshotKind, StoreError};
use crate::transfer::{DownloadError, Progress, StreamerError};

/// Why a [`super::Behaviour`] could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BehaviourError {
    /// A setting cannot work.
    #[error(transparent)]
    Config(#[from] ConfigError),
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

/// Why syncing failed. The live DB is untouched; the next tick tries again.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SyncError {
    /// A download failed.
    #[error("download failed: {0}")]
    Download(#[from] DownloadError),
    /// The snapshots did not load.
    #[error("load failed: {0}")]
    Load(#[from] LoadError),
    /// The load task ended without a result.
    #[error("the load was aborted")]
    Aborted,
}

/// What the snapsync [`super::Behaviour`] reports to the swarm's owner.
#[derive(Debug)]
#[non_exhaustive]
pub enum Event {
    /// The node asked its peers for snapshots.
    DiscoveryStarted {
        /// Number of the round.
        round: u64,
        /// The node's slot, `None` for an empty DB.
        local_slot: Option<u64>,
    },
    /// Peers advertise snapshots worth taking: the node will end at `key`.
    SnapshotFound {
        /// The snapshot the node ends at (full or incremental).
        key: SnapshotKey,
        /// The full snapshot fetched first, when the node's state is not at or past `key`'s
        /// base (or `key` is itself a full one).
        full: Option<SnapshotKey>,
        /// The peers advertising `key`.
        peers: Vec<PeerId>,
        /// Bytes to fetch, at most (resumed bytes aside).
        bytes: u64,
    },
    /// No peer advertised a snapshot that could be taken; the next tick asks again.
    NoSnapshotAvailable {
        /// Number of the round.
        round: u64,
        /// Peers whose advertisements were heard (none of them eligible).
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
        /// Bytes already on disk from an earlier attempt (resume).
        resumed_bytes: u64,
    },
    /// Download progress (bytes, rate, ETA, per peer) of the snapshot with root
    /// [`Progress::root`].
    DownloadProgress(Progress),
    /// Snapshots were downloaded, verified and loaded: the DB now holds the state at `slot`.
    SnapshotSynced {
        /// Slot now live.
        slot: u64,
        /// Bank hash now live.
        bank_hash: BankHash,
        /// Kind of the snapshot the node ended at.
        kind: SnapshotKind,
        /// Whether a full snapshot was fetched (else only an incremental one).
        with_full: bool,
        /// Archive bytes loaded (all snapshots of the sync).
        bytes: u64,
        /// Bytes fetched over the network for this sync (resumed bytes excluded).
        fetched_bytes: u64,
        /// Time from the choice to the end of the load.
        elapsed: Duration,
        /// Verified bytes each peer delivered.
        per_peer: Vec<(PeerId, u64)>,
    },
    /// Syncing failed.
    SyncFailed {
        /// The snapshot the node was syncing to.
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
    /// A peer could not be reached: every address the swarm dialed failed.
    PeerUnreachable {
        /// The peer, when the dial named one.
        peer: Option<PeerId>,
        /// Each address tried, with why it failed (refused, timed out, no transport for it).
        addresses: Vec<(Multiaddr, String)>,
    },
}

/// Message counters, read from the node's [`crate::Metrics`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DiscoveryStats {
    /// Requests this node published.
    pub requests_published: u64,
    /// Requests received from others.
    pub requests_received: u64,
    /// Direct asks this node sent to connected peers.
    pub asks_sent: u64,
    /// Direct asks received.
    pub asks_received: u64,
    /// Answers sent (to requests and asks).
    pub answers_sent: u64,
    /// Answers received.
    pub answers_received: u64,
    /// Answers dropped because they matched no request of this node.
    pub unsolicited: u64,
    /// Announcements published.
    pub announcements_published: u64,
    /// Announcements received.
    pub announcements_received: u64,
    /// Messages dropped for failing their checks.
    pub malformed: u64,
    /// Discovery rounds started.
    pub rounds: u64,
    /// Syncs started.
    pub downloads: u64,
}

/// Where the node stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Phase {
    /// Not syncing.
    Idle,
    /// Collecting answers.
    Collecting,
    /// Downloading snapshots (and, as they arrive, loading them).
    Downloading,
    /// Loading what was downloaded.
    Loading,
}

/// A summary of what the node knows and does (for status displays).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Status {
    /// Where the node stands.
    pub phase: Phase,
    /// The DB's slot.
    pub local_slot: Option<u64>,
    /// The chain's tip, when the owner said.
    pub chain_tip: Option<u64>,
    /// The highest slot of a snapshot the trust policy accepts, among those heard of.
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
