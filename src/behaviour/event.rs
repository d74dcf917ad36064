//! What the behaviour reports and exposes: [`Event`] (and how discovery's notices and the
//! swarm's dial errors become events), its errors, [`Status`].

use std::net::SocketAddr;
use std::time::Duration;

use libp2p::swarm::DialError;
use libp2p::{Multiaddr, PeerId, TransportError};

use crate::config_error::ConfigError;
use crate::db::DbError;
use crate::discovery::{Advert, Conflict, Notice};
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
        /// Bytes of these snapshots served to other downloaders while they were downloaded.
        served_bytes: u64,
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
        /// Each address tried, with why it failed.
        addresses: Vec<(Multiaddr, DialFailure)>,
    },
}

impl From<Notice> for Event {
    fn from(notice: Notice) -> Self {
        match notice {
            Notice::Started { round, local_slot } => Event::DiscoveryStarted { round, local_slot },
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
            Notice::Misbehaved { peer, reason } => Event::PeerMisbehaved { peer, reason },
        }
    }
}

/// Why dialing one address of a peer failed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DialFailure {
    /// Nothing listens there: the connection was refused.
    Refused,
    /// Nothing answered in time.
    TimedOut,
    /// None of the swarm's transports speaks this address.
    NoTransport,
    /// Another peer answered there.
    WrongPeer(PeerId),
    /// Another failure, in the transport's words.
    Other(String),
}

impl std::fmt::Display for DialFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DialFailure::Refused => f.write_str("refused: nothing listens there"),
            DialFailure::TimedOut => f.write_str("timed out: nothing answered"),
            DialFailure::NoTransport => f.write_str("no transport for this address"),
            DialFailure::WrongPeer(p) => write!(f, "another peer answered there: {p}"),
            DialFailure::Other(text) => f.write_str(text),
        }
    }
}

impl DialFailure {
    /// Each address of a failed dial with why it failed.
    pub(crate) fn of(error: &DialError) -> Vec<(Multiaddr, DialFailure)> {
        match error {
            DialError::Transport(errors) => errors
                .iter()
                .map(|(addr, e)| {
                    let why = match e {
                        TransportError::MultiaddrNotSupported(_) => DialFailure::NoTransport,
                        TransportError::Other(e) => DialFailure::of_io(e),
                    };
                    (addr.clone(), why)
                })
                .collect(),
            DialError::WrongPeerId { obtained, address } => {
                vec![(address.clone(), DialFailure::WrongPeer(*obtained))]
            }
            DialError::NoAddresses => Vec::new(),
            other => vec![(Multiaddr::empty(), DialFailure::Other(other.to_string()))],
        }
    }

    /// What a transport's error says, from the typed errors in its chain.
    fn of_io(error: &std::io::Error) -> DialFailure {
        let mut next: Option<&(dyn std::error::Error + 'static)> = Some(error);
        while let Some(e) = next {
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                match io.kind() {
                    std::io::ErrorKind::ConnectionRefused => return DialFailure::Refused,
                    std::io::ErrorKind::TimedOut => return DialFailure::TimedOut,
                    _ => {}
                }
                if let Some(inner) = io.get_ref() {
                    next = Some(inner);
                    continue;
                }
            }
            #[cfg(feature = "quic")]
            if let Some(libp2p::quic::Error::HandshakeTimedOut) = e.downcast_ref() {
                return DialFailure::TimedOut;
            }
            next = e.source();
        }
        DialFailure::Other(error.to_string())
    }
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

impl DiscoveryStats {
    /// The counters in `m`.
    pub(crate) fn of(m: &crate::metrics::Metrics) -> Self {
        use crate::metrics::MessageKind;
        Self {
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
    /// The snapshots it downloads and serves the verified chunks of meanwhile.
    pub partial: Vec<crate::discovery::PartialAd>,
    /// Recent advertisements from peers.
    pub adverts: Vec<Advert>,
    /// Where the chunk streamer listens (as advertised).
    pub streamer_addrs: Vec<SocketAddr>,
    /// Message counters.
    pub stats: DiscoveryStats,
}
