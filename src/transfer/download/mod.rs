//! The downloading side: [`Downloader`] (log target `SNAPSHOT DOWNLOAD`).
//!
//! - `config.rs`: the settings;
//! - `scheduler.rs`: which chunk from which peer, a pure state machine;
//! - `connect.rs`: connecting to a peer and the handshake;
//! - `fetch.rs`: one request, checked chunk by chunk as it arrives;
//! - `run.rs`: the loop of one download, carrying out what the scheduler commands;
//! - `report.rs`: what a download reports (progress, and at its end what each source gave);
//! - `picker.rs`: which piece a source is asked for in a crowd;
//! - `partial.rs`, `bits.rs`: the download's state on disk (open, reserve, persist, publish);
//! - `swarm.rs`: a simulator of a crowd downloading one snapshot (feature `sim`).

mod bits;
mod config;
mod connect;
mod fetch;
mod partial;
mod picker;
mod report;
mod run;
mod scheduler;
#[cfg(any(test, feature = "sim"))]
pub mod swarm;
#[cfg_attr(not(feature = "web"), path = "web_off.rs")]
mod web;

#[cfg(test)]
pub(crate) use bits::Bits;
#[cfg(any(fuzzing, test))]
pub(crate) use bits::have_from_bytes;
pub use config::DownloadConfig;
#[cfg(any(fuzzing, test))]
pub(crate) use partial::parse_progress;
#[cfg(test)]
pub(crate) use partial::progress_bytes;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use libp2p::PeerId;
use libp2p::identity::Keypair;
use tokio::sync::{mpsc, oneshot, watch};

use super::protocol::{TokenKey, close};
use super::tls::{self, EndpointError};
use super::{DOWNLOAD_TARGET, PeerAddr, Token};
use crate::chunk::{ChunkSize, ChunkTree};
use crate::config_error::ConfigError;
use crate::discovery::SnapshotAd;
use crate::hash::{BankHash, ContentRoot};
use crate::metrics::Metrics;
use crate::snapshot::{
    ArchiveSource, Base, Manifest, Snapshot, SnapshotKind, SnapshotStore, StoreError, Watermark,
};

/// The snapshot to download: its content root, size and chunk size, and whatever else is
/// known of it (slot, bank hash, kind and base, record counts). A peer whose manifest differs
/// in any field known here is not used, so a manifest that is served, loaded against and
/// published again is the snapshot that was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DownloadTarget {
    /// Content root.
    pub content_root: ContentRoot,
    /// Archive size in bytes.
    pub archive_size: u64,
    /// Chunk size.
    pub chunk_size: ChunkSize,
    /// Slot, if known.
    pub slot: Option<u64>,
    /// Bank hash, if known.
    pub bank_hash: Option<BankHash>,
    /// Kind and (for an incremental) base, if known.
    pub lineage: Option<(SnapshotKind, Option<Base>)>,
    /// Record count and uncompressed bytes, if known from a source vouched for.
    pub counts: Option<(u64, u64)>,
    /// The trust policy vouched for this root and size (a pinned root, trusted peers' adverts),
    /// beyond accepting its slot and bank hash: its partial download on disk is then never
    /// deleted to make room for a download not vouched for.
    pub vouched: bool,
}

impl DownloadTarget {
    /// The archive of `size` bytes with this root, in chunks of `chunk_size`; nothing else known.
    pub fn new(content_root: ContentRoot, archive_size: u64, chunk_size: ChunkSize) -> Self {
        Self {
            content_root,
            archive_size,
            chunk_size,
            slot: None,
            bank_hash: None,
            lineage: None,
            counts: None,
            vouched: false,
        }
    }

    /// The target described by a manifest: every field known.
    pub fn from_manifest(m: &Manifest) -> Self {
        Self {
            slot: Some(m.slot),
            bank_hash: Some(m.bank_hash),
            lineage: Some((m.kind, m.base)),
            counts: Some((m.entry_count, m.state_bytes)),
            ..Self::new(m.content_root, m.archive_size, m.chunk_size)
        }
    }

    /// The target an advertisement describes; its counts only when `counts_vouched`; its
    /// root and size `vouched` for or not.
    pub fn of(ad: &SnapshotAd, counts_vouched: bool, vouched: bool) -> Self {
        let k = ad.key;
        Self {
            slot: Some(k.slot),
            bank_hash: Some(k.bank_hash),
            lineage: Some((k.kind, k.base)),
            counts: counts_vouched.then_some((ad.entry_count, ad.state_bytes)),
            vouched,
            ..Self::new(k.content_root, k.archive_size, ad.chunk_size)
        }
    }

    pub(crate) fn tree(&self) -> ChunkTree {
        ChunkTree::new(self.archive_size, self.chunk_size, self.content_root)
    }

    /// Why `m` is not this snapshot, if it is not.
    fn mismatch(&self, m: &Manifest) -> Option<&'static str> {
        if m.content_root != self.content_root {
            Some("content root")
        } else if m.archive_size != self.archive_size {
            Some("archive size")
        } else if m.chunk_size != self.chunk_size {
            Some("chunk size")
        } else if self.slot.is_some_and(|s| s != m.slot) {
            Some("slot")
        } else if self.bank_hash.is_some_and(|h| h != m.bank_hash) {
            Some("bank hash")
        } else if self.lineage.is_some_and(|(kind, _)| kind != m.kind) {
            Some("kind")
        } else if self.lineage.is_some_and(|(_, base)| base != m.base) {
            Some("base")
        } else if self
            .counts
            .is_some_and(|counts| counts != (m.entry_count, m.state_bytes))
        {
            Some("record counts")
        } else {
            None
        }
    }
}

/// Where a download fetches from: a peer's chunk stream, or a web source (feature `web`).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Origin {
    /// A peer's chunk stream.
    Peer(PeerAddr),
    /// A directory of published snapshots on an HTTP(S) server: it serves like a peer that
    /// holds the snapshot, its every chunk checked against the content root.
    Web(Arc<crate::transfer::web::WebSource>),
}

impl Origin {
    /// The peer, for a peer.
    pub fn peer_id(&self) -> Option<PeerId> {
        match self {
            Origin::Peer(a) => Some(a.peer_id),
            Origin::Web(_) => None,
        }
    }

    /// The base URL, for a web source.
    pub fn web_base(&self) -> Option<&str> {
        match self {
            Origin::Peer(_) => None,
            Origin::Web(w) => Some(w.base()),
        }
    }
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Peer(a) => write!(f, "{} at {}", a.peer_id, a.addr),
            Origin::Web(w) => write!(f, "{w}"),
        }
    }
}

/// How much of the snapshot a source holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holding {
    /// All of it.
    Complete,
    /// Part: it downloads the snapshot too and serves the chunks it has verified. It is asked
    /// what it holds, and pieces are picked as a swarm does (see
    /// [`DownloadConfig::with_have_interval`]).
    Partial,
}

/// How a peer stands in a download.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PeerStatus {
    /// Serving, or will be retried.
    Active,
    /// Waits for a place in the download: it gave its place up (it delivered nothing for a
    /// while, failed again and again, or delivered least while untried sources waited), and
    /// may be tried again.
    Waiting,
    /// Sent a chunk that does not match the content root; not used again in this download.
    Banned,
    /// Cannot serve this download (it refused it: unknown snapshot, wrong token or chunk size).
    Dropped,
}

/// One peer's part in a download.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerProgress {
    /// The peer.
    pub peer_id: PeerId,
    /// Verified data bytes it delivered.
    pub bytes: u64,
    /// Its delivery rate, bytes per second.
    pub rate: f64,
    /// Requests in flight to it.
    pub inflight: usize,
    /// How it stands.
    pub status: PeerStatus,
    /// It downloads the snapshot too and serves what it has verified (a partial holder).
    pub partial: bool,
}

/// One web source's part in a download.
#[derive(Debug, Clone, PartialEq)]
pub struct WebProgress {
    /// Its base URL.
    pub url: String,
    /// Verified data bytes it delivered.
    pub bytes: u64,
    /// Its delivery rate, bytes per second.
    pub rate: f64,
    /// Requests in flight to it.
    pub inflight: usize,
    /// How it stands.
    pub status: PeerStatus,
}

/// A progress update of a download.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Progress {
    /// Content root of the snapshot being downloaded.
    pub root: ContentRoot,
    /// Verified bytes on disk, including those resumed.
    pub done_bytes: u64,
    /// Archive size.
    pub total_bytes: u64,
    /// Bytes that were already on disk when the download started (resume).
    pub resumed_bytes: u64,
    /// Data bytes of this snapshot served to other downloaders meanwhile.
    pub served_bytes: u64,
    /// Recent download rate of verified bytes, bytes per second.
    pub rate: f64,
    /// Estimated time left at that rate.
    pub eta: Option<Duration>,
    /// Every peer's part.
    pub peers: Vec<PeerProgress>,
    /// Every web source's part (feature `web`).
    pub web: Vec<WebProgress>,
    /// Whether the download has finished (successfully or not).
    pub finished: bool,
}

/// A finished download.
#[derive(Debug, Clone)]
pub struct Downloaded {
    /// The snapshot, published in the store.
    pub snapshot: Arc<Snapshot>,
    /// Data bytes fetched over the network in this run (new, verified bytes: the per-source
    /// figures add up to it).
    pub fetched_bytes: u64,
    /// Verified bytes sources delivered that another source had delivered first (the hedged
    /// tail's duplicates), not counted in `fetched_bytes`.
    pub duplicate_bytes: u64,
    /// Bytes resumed from a previous run.
    pub resumed_bytes: u64,
    /// Data bytes of the snapshot served to other downloaders while it was downloaded.
    pub served_bytes: u64,
    /// Wall time of this run.
    pub elapsed: Duration,
    /// Verified bytes each peer delivered.
    pub per_peer: Vec<(PeerId, u64)>,
    /// Verified bytes each web source delivered, by base URL.
    pub per_web: Vec<(String, u64)>,
    /// The lists of attestations the sources served with the manifest, each list once (at
    /// most [`MAX_ATTESTATIONS`](crate::snapshot::MAX_ATTESTATIONS) in each; a list per
    /// source, so one source's junk cannot hide another's). Claims: whoever counts them checks
    /// the signatures of the keys it trusts.
    pub attestations: Vec<Vec<crate::snapshot::Attestation>>,
}

/// A download failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DownloadError {
    /// A setting cannot work.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The downloader's QUIC endpoint could not be set up.
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    /// Writing the download to disk failed (not writable, disk full or too small for it, other
    /// I/O). Chunks already on disk are kept for resume.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The snapshot has more chunks than a download may track.
    #[error("the snapshot has {chunks} chunks, more than the {max} allowed")]
    TooManyChunks {
        /// Chunks it has.
        chunks: u64,
        /// Most allowed.
        max: u64,
    },
    /// Every peer refused the token.
    #[error("every peer refused the token: wrong or missing SNAPSHOT_TOKEN ({peers} peers)")]
    Unauthorized {
        /// How many peers refused.
        peers: usize,
    },
    /// No peer can serve the missing chunks.
    #[error("no peer can serve the missing {missing_bytes} bytes: {reasons}")]
    NoPeers {
        /// Bytes still missing.
        missing_bytes: u64,
        /// Peers banned for sending chunks that did not match the content root.
        banned: usize,
        /// Why each peer is out, one per peer.
        reasons: String,
    },
    /// No verified byte arrived for the configured time, and every source heard of was tried.
    #[error("no verified chunk arrived for {0:?} from any source; giving up")]
    NoProgress(Duration),
    /// The assembled download does not add up to the content root (local disk corruption:
    /// every chunk and proof was checked before it was written). The partial download is
    /// discarded.
    #[error("the assembled download does not match content root {expected}; discarded")]
    Corrupted {
        /// The root asked for.
        expected: ContentRoot,
    },
    /// The download was cancelled; chunks on disk are kept for resume.
    #[error("download cancelled")]
    Cancelled,
}

impl DownloadError {
    /// Whether the failure is a refused token.
    pub fn is_unauthorized(&self) -> bool {
        matches!(self, DownloadError::Unauthorized { .. })
    }

    /// Whether peers proved to serve bad data (chunks that did not match the root).
    pub fn proves_bad_data(&self) -> bool {
        matches!(self, DownloadError::NoPeers { banned, .. } if *banned > 0)
    }
}

/// Fetches snapshots from many peers at once over QUIC. One endpoint serves every download.
#[derive(Clone)]
pub struct Downloader {
    ctx: Arc<DownloadContext>,
}

/// What every download of a [`Downloader`] shares: the endpoint, the identity and token, the
/// store, the settings and the metrics.
pub(crate) struct DownloadContext {
    endpoint: quinn::Endpoint,
    keypair: Keypair,
    local: PeerId,
    token: Option<TokenKey>,
    store: SnapshotStore,
    config: DownloadConfig,
    metrics: Metrics,
}

impl std::fmt::Debug for Downloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Downloader")
            .field("store", &self.ctx.store.dir())
            .finish()
    }
}

impl Drop for DownloadContext {
    fn drop(&mut self) {
        self.endpoint.close(close::DONE, b"done");
    }
}

/// A download in progress. Dropping it cancels the download (chunks on disk are kept).
#[derive(Debug)]
pub struct DownloadHandle {
    progress: watch::Receiver<Progress>,
    manifest: watch::Receiver<Option<(Manifest, Option<PeerId>)>>,
    peers: mpsc::Sender<run::NewPeer>,
    cancel: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<Downloaded, DownloadError>>,
    /// The task's result was taken.
    ended: bool,
    source: ArchiveSource,
    watermark: Arc<Watermark>,
}

impl DownloadHandle {
    /// Progress updates (the latest value; a UI renders it on change).
    pub fn progress(&self) -> watch::Receiver<Progress> {
        self.progress.clone()
    }

    /// Progress updates as a stream (each change once; it ends with the download).
    pub fn progress_stream(&self) -> futures::stream::BoxStream<'static, Progress> {
        use futures::StreamExt;
        futures::stream::unfold(self.progress(), |mut rx| async move {
            rx.changed().await.ok()?;
            let p = rx.borrow_and_update().clone();
            Some((p, rx))
        })
        // A stream polled again after it ends must not panic.
        .fuse()
        .boxed()
    }

    /// The snapshot's manifest, once a peer has served it and it matched the target.
    pub fn manifest(&self) -> Option<Manifest> {
        self.manifest.borrow().as_ref().map(|(m, _)| m.clone())
    }

    /// The peer whose manifest the download took (`None` before, or from a web source).
    pub fn manifest_from(&self) -> Option<PeerId> {
        self.manifest.borrow().as_ref().and_then(|(_, p)| *p)
    }

    /// Adds a source to the download (one heard of later), holding all of the snapshot or part
    /// of it. It vouches for nothing: every chunk is checked against the content root. A
    /// source known already changes nothing (unless it holds all of the snapshot now); beyond
    /// the download's limits it is ignored. Returns whether the download took the news.
    pub fn add_source(&self, origin: Origin, holding: Holding) -> bool {
        self.peers.try_send((origin, holding)).is_ok()
    }

    /// The archive as it arrives: a loader reading it gets only verified bytes, waiting for
    /// the rest, so loading overlaps downloading.
    pub fn source(&self) -> ArchiveSource {
        self.source.clone()
    }

    /// How far the verified, gap-free prefix of the archive reaches, bytes.
    pub fn verified_prefix(&self) -> u64 {
        self.watermark.verified()
    }

    /// Stops the download; [`DownloadHandle::wait`] then returns [`DownloadError::Cancelled`].
    /// Progress is made durable first.
    pub fn cancel(&mut self) {
        if let Some(tx) = self.cancel.take() {
            let _ = tx.send(());
        }
    }

    /// Waits for the download to end (the handle is also a future of the same).
    pub async fn wait(self) -> Result<Downloaded, DownloadError> {
        self.await
    }
}

impl std::future::Future for DownloadHandle {
    type Output = Result<Downloaded, DownloadError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        // Polled again once it ended: the result was taken; say the download is over.
        if self.ended {
            return std::task::Poll::Ready(Err(DownloadError::Cancelled));
        }
        let result = std::pin::Pin::new(&mut self.task)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(DownloadError::Cancelled)));
        self.ended = result.is_ready();
        result
    }
}

impl Drop for DownloadHandle {
    fn drop(&mut self) {
        self.cancel();
    }
}

impl Downloader {
    /// A downloader with the node's identity, publishing into `store`. `token` is the shared
    /// token (`None`: present none); `metrics` counts what is downloaded. Must be called within
    /// a tokio runtime.
    pub fn new(
        keypair: Keypair,
        store: SnapshotStore,
        config: DownloadConfig,
        token: Option<&Token>,
        metrics: Metrics,
    ) -> Result<Self, DownloadError> {
        config.validate()?;
        let socket = tls::bind_socket(config.bind, &config.transport)?;
        let endpoint = quinn::Endpoint::new(
            tls::endpoint_config(&config.transport),
            None,
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|source| EndpointError::Bind {
            addr: config.bind,
            source,
        })?;
        Ok(Self {
            ctx: Arc::new(DownloadContext {
                endpoint,
                local: keypair.public().to_peer_id(),
                keypair,
                token: token.map(TokenKey::new),
                store,
                config,
                metrics,
            }),
        })
    }

    /// The settings.
    pub fn config(&self) -> &DownloadConfig {
        &self.ctx.config
    }

    /// The local address of the downloader's endpoint.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.ctx.endpoint.local_addr().ok()
    }

    /// Closes every connection of every download, telling each server, and waits briefly for
    /// the closes to go out. Downloads in progress end (their chunks stay on disk).
    pub async fn close(&self) {
        self.ctx.endpoint.close(close::DONE, b"shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.ctx.endpoint.wait_idle()).await;
    }

    /// Starts downloading `target` from `peers` (more can be added to the handle).
    pub fn start(&self, target: DownloadTarget, peers: Vec<PeerAddr>) -> DownloadHandle {
        let (progress_tx, progress) = watch::channel(Progress {
            root: target.content_root,
            total_bytes: target.archive_size,
            ..Progress::default()
        });
        let (manifest_tx, manifest) = watch::channel(None);
        let (peers_tx, peers_rx) = mpsc::channel(64);
        let (cancel_tx, cancel_rx) = oneshot::channel();
        let introduce = peers_tx.clone();
        let watermark = Arc::new(Watermark::new());
        let source = self.source(&target, watermark.clone());
        let channels = run::Channels {
            progress: progress_tx,
            manifest: manifest_tx,
            watermark: watermark.clone(),
            new_peers: peers_rx,
            introduce,
            cancel: cancel_rx,
        };
        let ctx = self.ctx.clone();
        let span = tracing::info_span!(target: DOWNLOAD_TARGET, "download", root = %target.content_root.short());
        let task = tokio::spawn(tracing::Instrument::instrument(
            async move {
                let active = ctx.metrics.active_downloads.clone();
                active.inc();
                // Whatever ends the download, a loader waiting on it learns so.
                let stop = channels.watermark.clone();
                let _active = scopeguard(move || {
                    active.dec();
                    stop.stop();
                });
                let progress = channels.progress.clone();
                let result = run::run(ctx, target, peers, channels).await;
                progress.send_modify(|p| p.finished = true);
                result
            },
            span,
        ));
        DownloadHandle {
            progress,
            manifest,
            peers: peers_tx,
            cancel: Some(cancel_tx),
            task,
            ended: false,
            source,
            watermark,
        }
    }

    /// The archive of `target` as it arrives. The file is opened now, so that a loader reads it
    /// through this handle even once the completed download has been renamed into a published
    /// snapshot. (Creating an empty file reserves nothing.)
    fn source(&self, target: &DownloadTarget, watermark: Arc<Watermark>) -> ArchiveSource {
        let dir = partial::dir_of(&self.ctx.store, &target.tree());
        let file = partial::archive_in(&dir);
        let path = dir.join(partial::PART_FILE);
        ArchiveSource::growing(path, file.ok(), target.archive_size, watermark)
    }

    /// Downloads `target` from `peers` and waits for the result.
    pub async fn download(
        &self,
        target: DownloadTarget,
        peers: Vec<PeerAddr>,
    ) -> Result<Downloaded, DownloadError> {
        self.start(target, peers).wait().await
    }
}

/// Runs `f` when dropped (also when the task is aborted).
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}
