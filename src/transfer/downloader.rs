//! The downloading side: [`Downloader`] (log target `SNAPSHOT DOWNLOAD`).
//!
//! A thin tokio layer over the [`Scheduler`](super::scheduler): it opens the connections and
//! requests the scheduler asks for, checks every chunk against the content root before writing
//! it at its offset in `.partial-<root>/archive.part`, persists which chunks are on disk for
//! resume, and reports progress. When every chunk is in, it checks the whole archive against the
//! root once more, builds the outboard and publishes the snapshot in the store.

use crate::macros::setter;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use libp2p::identity::Keypair;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{AbortHandle, JoinSet};

use super::partial::{PART_FILE, Partial};
use super::scheduler::{
    Action, Failure, PeerFate, PeerIdx, ReqId, Scheduler, SchedulerConfig, Stuck,
};
use super::tls::{self, EndpointError, TransportTuning};
use super::wire::{self, FrameError, PROTOCOL_VERSION, close};
use super::{DOWNLOAD_TARGET, PeerAddr, Token};
use crate::chunk::{ChunkError, ChunkSize, ChunkTree};
use crate::hash::{BankHash, ContentRoot};
use crate::proto;
use crate::snapshot::{ARCHIVE_FILE, Manifest, OUTBOARD_FILE, Snapshot, SnapshotStore, StoreError};

/// Settings of a [`Downloader`]. Every limit, timeout and interval is here.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DownloadConfig {
    /// Token presented to every streamer (`SNAPSHOT_TOKEN`).
    pub token: Option<Token>,
    /// Local UDP address of the downloader's endpoint (default `0.0.0.0:0`).
    pub bind: SocketAddr,
    /// Chunks per request (default 32: 512 KiB at 16 KiB chunks, under 0.6% of proof).
    pub request_chunks: u64,
    /// Requests in flight to a peer before its rate is known (default 4).
    pub initial_window: usize,
    /// Most requests in flight to one peer (default 16).
    pub max_window: usize,
    /// Most requests in flight in all; with `request_chunks`, bounds the memory of a download
    /// (default 32, i.e. 16 MiB at the defaults).
    pub max_inflight: usize,
    /// A request that receives nothing for this long is abandoned and retried elsewhere; once
    /// a peer's rate is known, a request also gets at most 4x its expected time, and never less
    /// than this (default 10 s).
    pub min_request_timeout: Duration,
    /// Fetch the last pieces from a second peer when their holder is slow (default on).
    pub hedge: bool,
    /// First retry delay after a failure (default 200 ms); doubles, with jitter.
    pub backoff_min: Duration,
    /// Longest retry delay (default 10 s).
    pub backoff_max: Duration,
    /// Failures in a row after which a peer is dropped from the download (default 8).
    pub max_peer_failures: u32,
    /// The download fails when no byte has arrived for this long (default 120 s).
    pub no_progress_timeout: Duration,
    /// Time to connect and authenticate to a peer (default 10 s).
    pub connect_timeout: Duration,
    /// How often progress is made durable for resume (default 1 s).
    pub persist_interval: Duration,
    /// How often progress updates are published (default 250 ms).
    pub progress_interval: Duration,
    /// QUIC transport settings.
    pub transport: TransportTuning,
    /// Where to count what is downloaded, failed and banned.
    pub metrics: crate::Metrics,
}

impl Default for DownloadConfig {
    fn default() -> Self {
        Self {
            token: None,
            bind: SocketAddr::from(([0, 0, 0, 0], 0)),
            request_chunks: 32,
            initial_window: 4,
            max_window: 16,
            max_inflight: 32,
            min_request_timeout: Duration::from_secs(10),
            hedge: true,
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(10),
            max_peer_failures: 8,
            no_progress_timeout: Duration::from_secs(120),
            connect_timeout: Duration::from_secs(10),
            persist_interval: Duration::from_secs(1),
            progress_interval: Duration::from_millis(250),
            transport: TransportTuning::default(),
            metrics: crate::Metrics::default(),
        }
    }
}

impl DownloadConfig {
    setter!(
        /// Sets the token.
        with_token, token: Option<Token>
    );
    setter!(
        /// Sets the local UDP address.
        with_bind, bind: SocketAddr
    );
    setter!(
        /// Sets the chunks per request.
        with_request_chunks, request_chunks: u64
    );
    setter!(
        /// Sets the initial per-peer window.
        with_initial_window, initial_window: usize
    );
    setter!(
        /// Sets the largest per-peer window.
        with_max_window, max_window: usize
    );
    setter!(
        /// Sets the total in-flight limit.
        with_max_inflight, max_inflight: usize
    );
    setter!(
        /// Sets the shortest request timeout.
        with_min_request_timeout, min_request_timeout: Duration
    );
    setter!(
        /// Turns tail hedging on or off.
        with_hedge, hedge: bool
    );
    setter!(
        /// Sets the first retry delay.
        with_backoff_min, backoff_min: Duration
    );
    setter!(
        /// Sets the longest retry delay.
        with_backoff_max, backoff_max: Duration
    );
    setter!(
        /// Sets the failures after which a peer is dropped.
        with_max_peer_failures, max_peer_failures: u32
    );
    setter!(
        /// Sets the no-progress limit.
        with_no_progress_timeout, no_progress_timeout: Duration
    );
    setter!(
        /// Sets the connect timeout.
        with_connect_timeout, connect_timeout: Duration
    );
    setter!(
        /// Sets the persist interval.
        with_persist_interval, persist_interval: Duration
    );
    setter!(
        /// Sets the progress interval.
        with_progress_interval, progress_interval: Duration
    );
    setter!(
        /// Sets the QUIC transport settings.
        with_transport, transport: TransportTuning
    );
    setter!(
        /// Sets where to count what is downloaded.
        with_metrics, metrics: crate::Metrics
    );

    fn scheduler(&self, chunk_size: ChunkSize) -> SchedulerConfig {
        SchedulerConfig {
            piece_chunks: self.request_chunks.max(1),
            chunk_bytes: u64::from(chunk_size.bytes()),
            initial_window: self.initial_window.max(1),
            max_window: self.max_window.max(1),
            max_inflight: self.max_inflight.max(1),
            min_request_timeout: self.min_request_timeout,
            hedge: self.hedge,
            backoff_min: self.backoff_min,
            backoff_max: self.backoff_max,
            max_peer_failures: self.max_peer_failures.max(1),
            no_progress_timeout: self.no_progress_timeout,
            jitter_seed: None,
        }
    }
}

/// The snapshot to download, as advertised: its content root, size and chunk size, and, when
/// known, its slot and bank hash (a peer whose manifest says otherwise is not used).
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
}

impl DownloadTarget {
    /// The target described by a manifest.
    pub fn from_manifest(m: &Manifest) -> Self {
        Self {
            content_root: m.content_root,
            archive_size: m.archive_size,
            chunk_size: m.chunk_size,
            slot: Some(m.slot),
            bank_hash: Some(m.bank_hash),
        }
    }

    fn tree(&self) -> ChunkTree {
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
        } else {
            None
        }
    }
}

/// How a peer stands in a download.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerStatus {
    /// Serving, or will be retried.
    Active,
    /// Sent a chunk that does not match the content root; not used again in this download.
    Banned,
    /// Cannot serve this download (refused, unreachable, failed too often).
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
}

/// A progress update of a download.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Progress {
    /// Verified bytes on disk, including those resumed.
    pub done_bytes: u64,
    /// Archive size.
    pub total_bytes: u64,
    /// Bytes that were already on disk when the download started (resume).
    pub resumed_bytes: u64,
    /// Recent download rate, bytes per second.
    pub rate: f64,
    /// Estimated time left at that rate.
    pub eta: Option<Duration>,
    /// Every peer's part.
    pub peers: Vec<PeerProgress>,
    /// Whether the download has finished (successfully or not).
    pub finished: bool,
}

/// A finished download.
#[derive(Debug, Clone)]
pub struct Downloaded {
    /// The snapshot, published in the store, ready for [`crate::snapshot::load_snapshot`].
    pub snapshot: Arc<Snapshot>,
    /// Data bytes fetched over the network in this run.
    pub fetched_bytes: u64,
    /// Bytes resumed from a previous run.
    pub resumed_bytes: u64,
    /// Wall time of this run.
    pub elapsed: Duration,
    /// Verified bytes each peer delivered.
    pub per_peer: Vec<(PeerId, u64)>,
}

/// A download failed.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    /// The downloader's QUIC endpoint could not be set up.
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    /// Writing the download to disk failed (not writable, disk full, other I/O). Chunks already
    /// on disk are kept for resume.
    #[error(transparent)]
    Store(#[from] StoreError),
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
        /// Why each peer is out, one per peer.
        reasons: String,
    },
    /// Nothing arrived for the configured time.
    #[error("no chunk arrived for {0:?}; giving up")]
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
}

/// Fetches snapshots from many peers at once over QUIC. One endpoint serves every download.
#[derive(Clone)]
pub struct Downloader {
    inner: Arc<Inner>,
}

struct Inner {
    endpoint: quinn::Endpoint,
    keypair: Keypair,
    store: SnapshotStore,
    config: DownloadConfig,
}

impl std::fmt::Debug for Downloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Downloader")
            .field("store", &self.inner.store.dir())
            .finish()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.endpoint.close(close::DONE, b"done");
    }
}

/// A download in progress. Dropping it cancels the download (chunks on disk are kept).
#[derive(Debug)]
pub struct DownloadHandle {
    progress: watch::Receiver<Progress>,
    peers: mpsc::Sender<PeerAddr>,
    cancel: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<Downloaded, DownloadError>>,
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

    /// Adds a peer to the download (one that advertised the same snapshot later).
    pub fn add_peer(&self, peer: PeerAddr) -> bool {
        self.peers.try_send(peer).is_ok()
    }

    /// Stops the download; [`DownloadHandle::wait`] then returns [`DownloadError::Cancelled`].
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
        std::pin::Pin::new(&mut self.task)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(DownloadError::Cancelled)))
    }
}

impl Drop for DownloadHandle {
    fn drop(&mut self) {
        self.cancel();
    }
}

impl Downloader {
    /// A downloader with the node's identity, publishing into `store`. Must be called within a
    /// tokio runtime.
    pub fn new(
        keypair: Keypair,
        store: SnapshotStore,
        config: DownloadConfig,
    ) -> Result<Self, DownloadError> {
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
            inner: Arc::new(Inner {
                endpoint,
                keypair,
                store,
                config,
            }),
        })
    }

    /// The settings.
    pub fn config(&self) -> &DownloadConfig {
        &self.inner.config
    }

    /// Starts downloading `target` from `peers` (more can be added to the handle).
    pub fn start(&self, target: DownloadTarget, peers: Vec<PeerAddr>) -> DownloadHandle {
        let (progress_tx, progress) = watch::channel(Progress {
            total_bytes: target.archive_size,
            ..Progress::default()
        });
        let (peers_tx, peers_rx) = mpsc::channel(64);
        let (cancel_tx, cancel_rx) = oneshot::channel();
        let inner = self.inner.clone();
        let span = tracing::info_span!(target: DOWNLOAD_TARGET, "download", root = %target.content_root.short());
        let task = tokio::spawn(tracing::Instrument::instrument(
            async move {
                let active = inner.config.metrics.active_downloads.clone();
                active.inc();
                let _active = scopeguard(move || {
                    active.dec();
                });
                let result = Run::start(inner, target, peers, progress_tx.clone())
                    .await?
                    .run(peers_rx, cancel_rx)
                    .await;
                progress_tx.send_modify(|p| p.finished = true);
                result
            },
            span,
        ));
        DownloadHandle {
            progress,
            peers: peers_tx,
            cancel: Some(cancel_tx),
            task,
        }
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

/// Why connecting to a peer failed.
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error("connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("refused the token")]
    Unauthorized,
    #[error("busy")]
    Busy,
    #[error("timed out")]
    Timeout,
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("stream: {0}")]
    Closed(#[from] quinn::ClosedStream),
    #[error("refused: {0}")]
    Status(String),
    #[error("its manifest differs in {0}")]
    Mismatch(&'static str),
    #[error("bad manifest: {0}")]
    Manifest(String),
    #[error("{0}")]
    Endpoint(#[from] EndpointError),
}

impl ConnectError {
    fn failure(&self) -> Failure {
        match self {
            ConnectError::Unauthorized
            | ConnectError::Mismatch(_)
            | ConnectError::Manifest(_)
            | ConnectError::Endpoint(_)
            | ConnectError::Status(_) => Failure::Fatal,
            ConnectError::Connection(quinn::ConnectionError::TransportError(_)) => Failure::Fatal,
            _ => Failure::Transient,
        }
    }

    /// Reads a close by the server into a typed error.
    fn from_connection(e: quinn::ConnectionError) -> Self {
        match &e {
            quinn::ConnectionError::ApplicationClosed(c) if c.error_code == close::UNAUTHORIZED => {
                ConnectError::Unauthorized
            }
            quinn::ConnectionError::ApplicationClosed(c) if c.error_code == close::BUSY => {
                ConnectError::Busy
            }
            quinn::ConnectionError::ConnectionClosed(_) => ConnectError::Busy,
            _ => ConnectError::Connection(e),
        }
    }
}

fn frame_to_connect(e: FrameError) -> ConnectError {
    match e {
        FrameError::Read(quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(c)))
        | FrameError::Write(quinn::WriteError::ConnectionLost(c)) => {
            ConnectError::from_connection(c)
        }
        other => ConnectError::Frame(other),
    }
}

/// Connects, authenticates and checks the peer's manifest.
async fn connect(
    inner: &Inner,
    peer: PeerAddr,
    target: DownloadTarget,
) -> Result<(quinn::Connection, Manifest), ConnectError> {
    let config = tls::client_config(&inner.keypair, peer.peer_id, &inner.config.transport)?;
    let conn = inner
        .endpoint
        .connect_with(config, peer.addr, "snapsync")?
        .await
        .map_err(ConnectError::from_connection)?;
    // Hello, with the token; the server closes the connection if it is wrong.
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(ConnectError::from_connection)?;
    let hello = proto::Hello {
        protocol_version: PROTOCOL_VERSION,
        token: inner
            .config
            .token
            .as_ref()
            .map(|t| t.as_bytes().to_vec())
            .unwrap_or_default()
            .into(),
    };
    wire::write_frame(&mut send, &hello)
        .await
        .map_err(frame_to_connect)?;
    send.finish()?;
    let welcome: proto::Welcome = wire::read_frame(&mut recv, 1024)
        .await
        .map_err(frame_to_connect)?;
    let refused = match proto::Refusal::try_from(welcome.refused) {
        Ok(proto::Refusal::None) => None,
        Ok(proto::Refusal::Unauthorized) => Some((ConnectError::Unauthorized, close::UNAUTHORIZED)),
        Ok(proto::Refusal::Busy) => Some((ConnectError::Busy, close::BUSY)),
        _ => Some((
            ConnectError::Status(welcome.message.clone()),
            close::PROTOCOL,
        )),
    };
    if let Some((error, code)) = refused {
        conn.close(code, b"refused");
        return Err(error);
    }
    if welcome.protocol_version != PROTOCOL_VERSION {
        return Err(ConnectError::Status(format!(
            "speaks chunk-stream version {}",
            welcome.protocol_version
        )));
    }
    // The manifest, which must be the advertised snapshot.
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(ConnectError::from_connection)?;
    let request = proto::Request {
        kind: Some(proto::request::Kind::Manifest(proto::GetManifest {
            content_root: target.content_root.0.to_vec().into(),
        })),
    };
    wire::write_frame(&mut send, &request)
        .await
        .map_err(frame_to_connect)?;
    send.finish()?;
    let header: proto::ResponseHeader = wire::read_frame(&mut recv, wire::MAX_FRAME)
        .await
        .map_err(frame_to_connect)?;
    if header.status != proto::Status::Ok as i32 {
        return Err(ConnectError::Status(status_text(&header)));
    }
    let manifest = header
        .manifest
        .as_ref()
        .ok_or_else(|| ConnectError::Manifest("missing".into()))
        .and_then(|m| Manifest::from_proto(m).map_err(|e| ConnectError::Manifest(e.to_string())))?;
    if let Some(what) = target.mismatch(&manifest) {
        return Err(ConnectError::Mismatch(what));
    }
    Ok((conn, manifest))
}

fn status_text(header: &proto::ResponseHeader) -> String {
    let status = proto::Status::try_from(header.status)
        .map(|s| s.as_str_name().to_string())
        .unwrap_or_else(|_| format!("status {}", header.status));
    format!("{status}: {}", header.message)
}

/// Why a chunk request failed.
#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error("the peer sent bad data: {0}")]
    Corrupt(ChunkError),
    #[error("writing the chunk: {0}")]
    Local(StoreError),
    #[error("refused: {0}")]
    Refused(String, Failure),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("{0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("{0}")]
    Read(#[from] quinn::ReadError),
    #[error("nothing received for {0:?}")]
    Stalled(Duration),
    #[error("{0}")]
    Closed(#[from] quinn::ClosedStream),
}

/// Fetches chunks `chunks`, checks each against the root and writes it at its offset.
/// How often the writeback thread asks the kernel to start writing what has arrived.
const WRITEBACK_EVERY: Duration = Duration::from_millis(100);

/// A thread that keeps asking the kernel to start writing the archive's dirty pages to disk
/// (Linux `sync_file_range`, which may block, hence its own thread), so the disk works while the
/// rest arrives and the final fsync has little left to do. Stops when dropped.
struct Writeback {
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Writeback {
    fn start(file: std::fs::File) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        #[cfg(target_os = "linux")]
        {
            let flag = stop.clone();
            let _ = std::thread::Builder::new()
                .name("snapsync-writeback".into())
                .spawn(move || {
                    use std::os::fd::AsRawFd;
                    while !flag.load(Ordering::Relaxed) {
                        // SAFETY: only integer arguments; a failure just leaves the work to
                        // the final fsync.
                        unsafe {
                            libc::sync_file_range(
                                file.as_raw_fd(),
                                0,
                                0,
                                libc::SYNC_FILE_RANGE_WRITE,
                            );
                        }
                        std::thread::sleep(WRITEBACK_EVERY);
                    }
                });
        }
        #[cfg(not(target_os = "linux"))]
        drop(file);
        Self { stop }
    }
}

impl Drop for Writeback {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Where a download's verified bytes go.
struct Sink {
    archive: std::fs::File,
    outboard: std::fs::File,
    dir: std::path::PathBuf,
}

async fn fetch(
    conn: quinn::Connection,
    tree: ChunkTree,
    chunks: Range<u64>,
    sink: Arc<Sink>,
    stall: Duration,
    activity: Arc<AtomicU64>,
) -> Result<u64, FetchError> {
    let expected = tree
        .encoded_len(chunks.clone())
        .map_err(|e| FetchError::Protocol(e.to_string()))?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let request = proto::Request {
        kind: Some(proto::request::Kind::Chunks(proto::GetChunks {
            content_root: tree.root().0.to_vec().into(),
            start_chunk: chunks.start,
            end_chunk: chunks.end,
            chunk_size: tree.chunk_size().bytes(),
        })),
    };
    wire::write_frame(&mut send, &request).await?;
    send.finish()?;
    let header: proto::ResponseHeader = wire::read_frame(&mut recv, wire::MAX_FRAME).await?;
    if header.status != proto::Status::Ok as i32 {
        let failure = match proto::Status::try_from(header.status) {
            Ok(proto::Status::Internal) => Failure::Transient,
            _ => Failure::Fatal,
        };
        return Err(FetchError::Refused(status_text(&header), failure));
    }
    if header.encoded_len != expected {
        return Err(FetchError::Protocol(format!(
            "announced {} encoded bytes, expected {expected}",
            header.encoded_len
        )));
    }
    // Every piece is checked as it arrives; verified chunks and proof nodes go straight to
    // their offsets on disk, so a request holds at most one chunk in memory.
    // Which file a local write failed on (the decoder's error does not say).
    let write_error = std::sync::Mutex::new(None);
    let failed = |file: &'static str, e: &std::io::Error| {
        if let Ok(mut slot) = write_error.lock() {
            *slot = Some((file, std::io::Error::new(e.kind(), e.to_string())));
        }
    };
    let mut to_archive = |offset: u64, data: &[u8]| {
        sink.archive
            .write_all_at(data, offset)
            .inspect_err(|e| failed(PART_FILE, e))
    };
    let mut to_outboard = |offset: u64, pair: &[u8]| {
        sink.outboard
            .write_all_at(pair, offset)
            .inspect_err(|e| failed(OUTBOARD_FILE, e))
    };
    let mut decoder = tree
        .range_decoder(chunks.clone())
        .map_err(|e| FetchError::Protocol(e.to_string()))?;
    let mut received = 0u64;
    let result = loop {
        if received == expected {
            break decoder.finish();
        }
        let want = (expected - received) as usize;
        match tokio::time::timeout(stall, recv.read_chunk(want, true)).await {
            Err(_) => return Err(FetchError::Stalled(stall)),
            Ok(Ok(Some(piece))) => {
                received += piece.bytes.len() as u64;
                activity.fetch_add(piece.bytes.len() as u64, Ordering::Relaxed);
                if let Err(e) = decoder.feed(&piece.bytes, &mut to_archive, &mut to_outboard) {
                    break Err(e);
                }
            }
            // A stream that ends early is as bad as a bad chunk: the data does not check out.
            Ok(Ok(None)) => break decoder.finish(),
            Ok(Err(e)) => return Err(e.into()),
        }
    };
    match result {
        Ok(()) => {
            let bytes = tree.byte_range(chunks);
            Ok(bytes.end - bytes.start)
        }
        Err(e) if e.is_corrupt_data() => Err(FetchError::Corrupt(e)),
        Err(e) => {
            let (file, error) = write_error
                .into_inner()
                .ok()
                .flatten()
                .unwrap_or((PART_FILE, std::io::Error::other(e.to_string())));
            Err(FetchError::Local(StoreError::at(
                &sink.dir.join(file),
                error,
            )))
        }
    }
}

/// What the request and connection tasks report to the download loop.
enum Event {
    Connected {
        peer: PeerIdx,
        conn: quinn::Connection,
        manifest: Box<Manifest>,
    },
    ConnectFailed {
        peer: PeerIdx,
        error: ConnectError,
    },
    Disconnected {
        peer: PeerIdx,
        conn_id: usize,
    },
    Fetched {
        id: ReqId,
        result: Result<u64, FetchError>,
    },
}

struct PeerSlot {
    addr: PeerAddr,
    conn: Option<quinn::Connection>,
    last_error: Option<String>,
    unauthorized: bool,
}

/// One download's loop state.
struct Run {
    inner: Arc<Inner>,
    target: DownloadTarget,
    tree: ChunkTree,
    partial: Partial,
    sink: Arc<Sink>,
    sched: Scheduler,
    peers: Vec<PeerSlot>,
    manifest: Option<Manifest>,
    tasks: JoinSet<()>,
    requests: HashMap<ReqId, (PeerIdx, AbortHandle)>,
    events_tx: mpsc::Sender<Event>,
    events_rx: mpsc::Receiver<Event>,
    progress_tx: watch::Sender<Progress>,
    started: Instant,
    resumed_bytes: u64,
    fetched_bytes: u64,
    persisted_done: u64,
    /// A background persist under way, giving the done bytes it recorded.
    persisting: Option<tokio::task::JoinHandle<Result<u64, StoreError>>>,
    rate: f64,
    last_tick: (Instant, u64),
    /// Bytes received by all requests so far, complete or not (liveness, not progress).
    activity: Arc<AtomicU64>,
    _writeback: Writeback,
    activity_seen: u64,
}

impl Run {
    async fn start(
        inner: Arc<Inner>,
        target: DownloadTarget,
        peers: Vec<PeerAddr>,
        progress_tx: watch::Sender<Progress>,
    ) -> Result<Self, DownloadError> {
        let store = &inner.store;
        store.remove_other_partials(&target.content_root)?;
        let tree = target.tree();
        let dir = store.partial_dir(&target.content_root);
        let (partial, done) = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || Partial::open(dir, tree))
                .await
                .map_err(|_| DownloadError::Cancelled)??
        };
        let now = Instant::now();
        let sched = Scheduler::new(
            inner.config.scheduler(target.chunk_size),
            target.archive_size,
            tree.chunk_count(),
            &done,
            now,
        );
        let resumed_bytes = sched.done_bytes();
        let writeback = Writeback::start(
            partial
                .file()
                .try_clone()
                .map_err(|e| StoreError::at(&dir, e))?,
        );
        let sink = Arc::new(Sink {
            archive: partial
                .file()
                .try_clone()
                .map_err(|e| StoreError::at(&dir, e))?,
            outboard: partial
                .outboard()
                .try_clone()
                .map_err(|e| StoreError::at(&dir, e))?,
            dir: dir.clone(),
        });
        let capacity = inner.config.max_inflight + 4 * peers.len() + 64;
        let (events_tx, events_rx) = mpsc::channel(capacity);
        let mut run = Self {
            inner,
            target,
            tree,
            partial,
            sink,
            sched,
            peers: Vec::new(),
            manifest: None,
            tasks: JoinSet::new(),
            requests: HashMap::new(),
            events_tx,
            events_rx,
            progress_tx,
            started: now,
            resumed_bytes,
            fetched_bytes: 0,
            persisted_done: resumed_bytes,
            persisting: None,
            rate: 0.0,
            last_tick: (now, resumed_bytes),
            activity: Arc::new(AtomicU64::new(0)),
            activity_seen: 0,
            _writeback: writeback,
        };
        for p in peers {
            run.add_peer(p);
        }
        tracing::info!(
            target: DOWNLOAD_TARGET,
            root = %target.content_root.short(),
            bytes = target.archive_size,
            resumed = resumed_bytes,
            peers = run.peers.len(),
            "download started"
        );
        Ok(run)
    }

    fn add_peer(&mut self, addr: PeerAddr) {
        if self.peers.iter().any(|p| p.addr.peer_id == addr.peer_id) {
            return;
        }
        let idx = self.sched.add_peer();
        debug_assert_eq!(idx, self.peers.len());
        self.peers.push(PeerSlot {
            addr,
            conn: None,
            last_error: None,
            unauthorized: false,
        });
    }

    async fn run(
        mut self,
        mut new_peers: mpsc::Receiver<PeerAddr>,
        mut cancel: oneshot::Receiver<()>,
    ) -> Result<Downloaded, DownloadError> {
        let mut persist = tokio::time::interval(self.inner.config.persist_interval);
        let mut progress = tokio::time::interval(self.inner.config.progress_interval);
        let mut peers_open = true;
        loop {
            let now = Instant::now();
            while let Some(action) = self.sched.next_action(now) {
                self.apply(action);
            }
            // Every chunk may be on disk already (a resumed download that was complete): the
            // manifest still has to come from a peer.
            if self.sched.is_complete() && self.manifest.is_some() {
                break;
            }
            let received = self.activity.load(Ordering::Relaxed);
            if received != self.activity_seen {
                self.activity_seen = received;
                self.sched.note_activity(now);
            }
            if let Some(stuck) = self.sched.stuck(now) {
                self.persist().await?;
                return Err(self.stuck_error(stuck));
            }
            let deadline = tokio::time::Instant::from_std(self.sched.next_deadline(now));
            tokio::select! {
                biased;
                _ = &mut cancel => {
                    self.persist().await?;
                    tracing::info!(target: DOWNLOAD_TARGET, root = %self.target.content_root.short(), "download cancelled; progress kept for resume");
                    return Err(DownloadError::Cancelled);
                }
                Some(event) = self.events_rx.recv() => self.handle(event)?,
                peer = new_peers.recv(), if peers_open => match peer {
                    Some(peer) => self.add_peer(peer),
                    None => peers_open = false,
                },
                _ = tokio::time::sleep_until(deadline) => {
                    for action in self.sched.poll_timeouts(Instant::now()) {
                        self.apply(action);
                    }
                }
                _ = persist.tick() => self.start_persist()?,
                done = async { self.persisting.as_mut().expect("guarded").await }, if self.persisting.is_some() => {
                    self.persisting = None;
                    let done = done.map_err(|_| DownloadError::Cancelled)??;
                    self.persisted_done = self.persisted_done.max(done);
                }
                _ = progress.tick() => self.publish_progress(false),
            }
        }
        self.finish().await
    }

    fn apply(&mut self, action: Action) {
        match action {
            Action::Connect(peer) => {
                let inner = self.inner.clone();
                let addr = self.peers[peer].addr;
                let target = self.target;
                let events = self.events_tx.clone();
                let timeout = self.inner.config.connect_timeout;
                self.tasks.spawn(async move {
                    let result = tokio::time::timeout(timeout, connect(&inner, addr, target))
                        .await
                        .unwrap_or(Err(ConnectError::Timeout));
                    let event = match result {
                        Ok((conn, manifest)) => Event::Connected {
                            peer,
                            conn,
                            manifest: Box::new(manifest),
                        },
                        Err(error) => Event::ConnectFailed { peer, error },
                    };
                    let _ = events.send(event).await;
                });
            }
            Action::Request { id, peer, chunks } => {
                let Some(conn) = self.peers[peer].conn.clone() else {
                    self.sched
                        .on_failure(id, Failure::Transient, Instant::now());
                    return;
                };
                let events = self.events_tx.clone();
                let (tree, sink) = (self.tree, self.sink.clone());
                let stall = self.inner.config.min_request_timeout;
                let activity = self.activity.clone();
                let handle = self.tasks.spawn(async move {
                    let result = fetch(conn, tree, chunks, sink, stall, activity).await;
                    let _ = events.send(Event::Fetched { id, result }).await;
                });
                self.requests.insert(id, (peer, handle));
            }
            Action::Cancel(id) => {
                if let Some((_, handle)) = self.requests.remove(&id) {
                    handle.abort();
                }
            }
        }
    }

    fn handle(&mut self, event: Event) -> Result<(), DownloadError> {
        let now = Instant::now();
        match event {
            Event::Connected {
                peer,
                conn,
                manifest,
            } => {
                tracing::debug!(target: DOWNLOAD_TARGET, peer = %self.peers[peer].addr.peer_id, addr = %self.peers[peer].addr.addr, "connected");
                if self.manifest.is_none() {
                    self.manifest = Some(*manifest);
                }
                let events = self.events_tx.clone();
                let watched = conn.clone();
                let conn_id = conn.stable_id();
                self.tasks.spawn(async move {
                    watched.closed().await;
                    let _ = events.send(Event::Disconnected { peer, conn_id }).await;
                });
                self.peers[peer].conn = Some(conn);
                self.sched.on_connected(peer);
            }
            Event::ConnectFailed { peer, error } => {
                let slot = &mut self.peers[peer];
                tracing::debug!(target: DOWNLOAD_TARGET, peer = %slot.addr.peer_id, addr = %slot.addr.addr, %error, "connect failed");
                if matches!(error, ConnectError::Unauthorized) {
                    slot.unauthorized = true;
                    tracing::warn!(target: DOWNLOAD_TARGET, peer = %slot.addr.peer_id, "peer refused our SNAPSHOT_TOKEN");
                }
                slot.last_error = Some(error.to_string());
                self.sched.on_connect_failed(peer, error.failure(), now);
            }
            Event::Disconnected { peer, conn_id } => {
                let slot = &mut self.peers[peer];
                if slot.conn.as_ref().map(|c| c.stable_id()) == Some(conn_id) {
                    slot.conn = None;
                    slot.last_error = Some("connection lost".into());
                    tracing::debug!(target: DOWNLOAD_TARGET, peer = %slot.addr.peer_id, "connection lost");
                    for action in self.sched.on_disconnected(peer, now) {
                        self.apply(action);
                    }
                }
            }
            Event::Fetched { id, result } => {
                let Some((peer, _)) = self.requests.remove(&id) else {
                    return Ok(());
                };
                match result {
                    Ok(bytes) => {
                        self.fetched_bytes += bytes;
                        self.inner.config.metrics.bytes_downloaded.inc_by(bytes);
                        for action in self.sched.on_success(id, now) {
                            self.apply(action);
                        }
                    }
                    Err(FetchError::Corrupt(e)) => {
                        let m = &self.inner.config.metrics;
                        m.verification_failures.inc();
                        m.peer_bans.inc();
                        let slot = &mut self.peers[peer];
                        tracing::warn!(target: DOWNLOAD_TARGET, peer = %slot.addr.peer_id, error = %e, "peer sent a chunk that does not match the content root; banned for this download");
                        slot.last_error = Some(format!("banned: {e}"));
                        for action in self.sched.on_corrupt(id) {
                            self.apply(action);
                        }
                    }
                    Err(FetchError::Local(e)) => return Err(e.into()),
                    Err(FetchError::Refused(why, failure)) => {
                        self.peers[peer].last_error = Some(why);
                        self.sched.on_failure(id, failure, now);
                    }
                    Err(e) => {
                        tracing::debug!(target: DOWNLOAD_TARGET, peer = %self.peers[peer].addr.peer_id, error = %e, "request failed");
                        self.peers[peer].last_error = Some(e.to_string());
                        self.sched.on_failure(id, Failure::Transient, now);
                    }
                }
            }
        }
        Ok(())
    }

    fn stuck_error(&self, stuck: Stuck) -> DownloadError {
        let missing_bytes = self.target.archive_size - self.sched.done_bytes();
        match stuck {
            Stuck::NoProgress => DownloadError::NoProgress(self.inner.config.no_progress_timeout),
            Stuck::NoPeers
                if !self.peers.is_empty() && self.peers.iter().all(|p| p.unauthorized) =>
            {
                DownloadError::Unauthorized {
                    peers: self.peers.len(),
                }
            }
            Stuck::NoPeers => DownloadError::NoPeers {
                missing_bytes,
                reasons: if self.peers.is_empty() {
                    "no peers".into()
                } else {
                    self.peers
                        .iter()
                        .map(|p| {
                            format!(
                                "{} at {}: {}",
                                p.addr.peer_id,
                                p.addr.addr,
                                p.last_error.as_deref().unwrap_or("unavailable")
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("; ")
                },
            },
        }
    }

    /// Starts making the chunks on disk durable and recording them for resume, in the
    /// background, unless that is already under way or nothing is new. The download goes on
    /// meanwhile.
    fn start_persist(&mut self) -> Result<(), DownloadError> {
        let done = self.sched.done_bytes();
        if self.persisting.is_some() || done == self.persisted_done {
            return Ok(());
        }
        // Snapshot the marks first: every chunk marked now was written before the fsync.
        let marks = self.sched.chunk_done().clone();
        let partial = Partial::reopen(&self.partial)?;
        self.persisting = Some(tokio::task::spawn_blocking(move || {
            partial.persist(&marks).map(|()| done)
        }));
        Ok(())
    }

    /// Makes the chunks on disk durable and records them for resume, and waits for it.
    async fn persist(&mut self) -> Result<(), DownloadError> {
        if let Some(running) = self.persisting.take() {
            let done = running.await.map_err(|_| DownloadError::Cancelled)??;
            self.persisted_done = self.persisted_done.max(done);
        }
        self.start_persist()?;
        if let Some(running) = self.persisting.take() {
            let done = running.await.map_err(|_| DownloadError::Cancelled)??;
            self.persisted_done = self.persisted_done.max(done);
        }
        Ok(())
    }

    fn progress(&mut self, finished: bool) -> Progress {
        let now = Instant::now();
        let done = self.sched.done_bytes();
        let (t0, d0) = self.last_tick;
        let dt = now.duration_since(t0).as_secs_f64();
        if dt > 0.05 {
            let sample = (done - d0) as f64 / dt;
            self.rate = if self.rate == 0.0 {
                sample
            } else {
                self.rate + 0.3 * (sample - self.rate)
            };
            self.last_tick = (now, done);
        }
        let remaining = self.target.archive_size - done;
        Progress {
            done_bytes: done,
            total_bytes: self.target.archive_size,
            resumed_bytes: self.resumed_bytes,
            rate: self.rate,
            eta: (self.rate > 0.0).then(|| Duration::from_secs_f64(remaining as f64 / self.rate)),
            peers: (0..self.peers.len())
                .map(|i| {
                    let r = self.sched.peer_report(i);
                    PeerProgress {
                        peer_id: self.peers[i].addr.peer_id,
                        bytes: r.bytes,
                        rate: r.rate,
                        inflight: r.inflight,
                        status: match r.fate {
                            PeerFate::Alive => PeerStatus::Active,
                            PeerFate::Banned => PeerStatus::Banned,
                            PeerFate::Dropped => PeerStatus::Dropped,
                        },
                    }
                })
                .collect(),
            finished,
        }
    }

    fn publish_progress(&mut self, finished: bool) {
        let p = self.progress(finished);
        self.progress_tx.send_replace(p);
    }

    /// Every chunk is in, each checked against the root, and the proofs' nodes make the
    /// outboard: check the outboard is whole, make it all durable and publish it. (The loader
    /// hashes the whole archive once more before anything is loaded.)
    async fn finish(mut self) -> Result<Downloaded, DownloadError> {
        let finish_started = Instant::now();
        // Stop the remaining (hedged) requests and close the connections.
        self.tasks.abort_all();
        for slot in &self.peers {
            if let Some(conn) = &slot.conn {
                let path = conn.stats().path;
                tracing::debug!(
                    target: DOWNLOAD_TARGET,
                    peer = %slot.addr.peer_id,
                    mtu = path.current_mtu,
                    rtt_us = path.rtt.as_micros() as u64,
                    cwnd = path.cwnd,
                    lost_packets = path.lost_packets,
                    "connection figures"
                );
                conn.close(close::DONE, b"done");
            }
        }
        self.publish_progress(false);
        let manifest = self
            .manifest
            .clone()
            .expect("a manifest from the first connection");
        let dir = self.partial.dir().to_path_buf();
        let tree = self.tree;
        let store = self.inner.store.clone();
        let partial = Partial::reopen(&self.partial)?;
        let snapshot =
            tokio::task::spawn_blocking(move || -> Result<Arc<Snapshot>, DownloadError> {
                let part = dir.join(PART_FILE);
                let outboard = dir.join(OUTBOARD_FILE);
                partial.sync()?;
                let complete = tree
                    .outboard_is_complete(&outboard)
                    .map_err(|e| StoreError::at(&outboard, e))?;
                if !complete {
                    let _ = std::fs::remove_dir_all(&dir);
                    return Err(DownloadError::Corrupted {
                        expected: tree.root(),
                    });
                }
                let archive = dir.join(ARCHIVE_FILE);
                std::fs::rename(&part, &archive).map_err(|e| StoreError::at(&archive, e))?;
                partial.forget_progress()?;
                Ok(store.publish(&dir, manifest)?)
            })
            .await
            .map_err(|_| DownloadError::Cancelled)??;
        let per_peer: Vec<(PeerId, u64)> = (0..self.peers.len())
            .map(|i| (self.peers[i].addr.peer_id, self.sched.peer_report(i).bytes))
            .collect();
        let elapsed = self.started.elapsed();
        tracing::debug!(
            target: DOWNLOAD_TARGET,
            finish_secs = finish_started.elapsed().as_secs_f64(),
            received = self.activity.load(Ordering::Relaxed),
            "made durable and published"
        );
        self.publish_progress(true);
        tracing::info!(
            target: DOWNLOAD_TARGET,
            slot = snapshot.manifest().slot,
            root = %self.target.content_root.short(),
            fetched = self.fetched_bytes,
            resumed = self.resumed_bytes,
            secs = elapsed.as_secs_f64(),
            peers = per_peer.iter().filter(|(_, b)| *b > 0).count(),
            "download complete and verified"
        );
        Ok(Downloaded {
            snapshot,
            fetched_bytes: self.fetched_bytes,
            resumed_bytes: self.resumed_bytes,
            elapsed,
            per_peer,
        })
    }
}
