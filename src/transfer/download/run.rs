//! The loop of one download: a thin tokio layer over the [`Scheduler`]. It hands the scheduler
//! every source it hears of, opens and closes the connections and runs the requests the
//! scheduler commands, feeds their outcomes back, moves the verified prefix for a loader and
//! reports progress (`report.rs`). Which sources hold a place, and when the download is done,
//! are the scheduler's rules; every disk step (open, reserve, persist, publish) is the
//! [`Partial`]'s.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{AbortHandle, JoinSet};

use super::connect::{ConnectError, connect};
use super::fetch::{FetchError, Sink, ask_have, fetch};
use super::partial::{PART_FILE, Partial, Persister};
use super::scheduler::{Command, Failure, PeerIdx, ReqId, Scheduler, Standing, Stuck};
use super::{DownloadContext, DownloadError, DownloadTarget, Downloaded, Progress};
use crate::chunk::{ChunkSource, ChunkTree, VerifiedChunks};
use crate::disk::Writeback;
use crate::snapshot::{
    Introducer, Manifest, OUTBOARD_FILE, OfferGuard, PartialClaim, PartialOffer, StoreError,
    Watermark,
};
use crate::transfer::protocol::close;
use crate::transfer::rate::Ewma;
use crate::transfer::{DOWNLOAD_TARGET, PeerAddr};

/// EWMA weight of a new sample of the download's overall rate.
const RATE_ALPHA: f64 = 0.3;

/// Askers a download remembers having taken as sources (each is passed on once).
const INTRODUCED: std::num::NonZeroUsize = std::num::NonZeroUsize::new(1024).expect("not zero");

/// What the request and connection tasks report to the download's loop.
enum Report {
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
        /// The server closed it as idle or to make room: it may be reconnected, no failure.
        benign: bool,
    },
    Fetched {
        id: ReqId,
        result: Result<(), FetchError>,
    },
    Have {
        peer: PeerIdx,
        result: Result<super::picker::Have, FetchError>,
    },
    /// A web source lists the snapshot in `path`, with this manifest.
    #[cfg(feature = "web")]
    WebConnected {
        peer: PeerIdx,
        path: String,
        manifest: Box<Manifest>,
    },
    Reserved(Result<(), DownloadError>),
}

/// Where a source of a download is: a peer's chunk stream, or a web server.
#[derive(Debug, Clone)]
pub(super) enum Origin {
    Peer(PeerAddr),
    #[cfg(feature = "web")]
    Web(Arc<crate::transfer::web::WebSource>),
}

/// What tells two sources apart.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum SourceId {
    Peer(libp2p::PeerId),
    #[cfg(feature = "web")]
    Web(String),
}

impl Origin {
    /// The peer, for a peer.
    pub(super) fn peer_id(&self) -> Option<libp2p::PeerId> {
        match self {
            Origin::Peer(a) => Some(a.peer_id),
            #[cfg(feature = "web")]
            Origin::Web(_) => None,
        }
    }

    fn id(&self) -> SourceId {
        match self {
            Origin::Peer(a) => SourceId::Peer(a.peer_id),
            #[cfg(feature = "web")]
            Origin::Web(w) => SourceId::Web(w.base().to_string()),
        }
    }
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Peer(a) => write!(f, "{} at {}", a.peer_id, a.addr),
            #[cfg(feature = "web")]
            Origin::Web(w) => write!(f, "{w}"),
        }
    }
}

/// One source of a download: where it is, its connection, and what went wrong last.
pub(super) struct Source {
    pub(super) origin: Origin,
    conn: Option<quinn::Connection>,
    /// A web source: the snapshot's directory there (once found), and the proof nodes read.
    #[cfg(feature = "web")]
    web: Option<(String, Arc<super::web::NodeCache>)>,
    pub(super) last_error: Option<String>,
    unauthorized: bool,
}

/// A source to take on: where it is, and whether it holds part of the snapshot only.
pub(super) type NewPeer = (Origin, bool);

/// Where a download talks back to its handle.
pub(super) struct Channels {
    pub(super) progress: watch::Sender<Progress>,
    pub(super) manifest: watch::Sender<Option<(Manifest, Option<libp2p::PeerId>)>>,
    pub(super) watermark: Arc<Watermark>,
    pub(super) new_peers: mpsc::Receiver<NewPeer>,
    /// Where the streamer introduces the downloaders that ask this node what it holds.
    pub(super) introduce: mpsc::Sender<NewPeer>,
    pub(super) cancel: oneshot::Receiver<()>,
}

/// Downloads `target` from `peers` (and those added meanwhile) until every chunk is in.
pub(super) async fn run(
    ctx: Arc<DownloadContext>,
    target: DownloadTarget,
    peers: Vec<PeerAddr>,
    mut channels: Channels,
) -> Result<Downloaded, DownloadError> {
    let mut run = Run::open(ctx, target, &channels).await?;
    for p in peers {
        run.add_source(Origin::Peer(p), false);
    }
    tracing::info!(
        target: DOWNLOAD_TARGET,
        root = %target.content_root.short(),
        bytes = target.archive_size,
        resumed = run.resumed_bytes,
        peers = run.sources.len(),
        "download started"
    );
    // The first update says what was resumed.
    run.publish_progress(false);
    run.drive(&mut channels).await
}

/// One download's loop state.
pub(super) struct Run {
    pub(super) ctx: Arc<DownloadContext>,
    pub(super) target: DownloadTarget,
    tree: ChunkTree,
    partial: Partial,
    persister: Persister,
    sink: Arc<Sink>,
    pub(super) sched: Scheduler,
    /// Every source heard of, by the scheduler's index.
    pub(super) sources: Vec<Source>,
    known: HashMap<SourceId, PeerIdx>,
    manifest: Option<Manifest>,
    /// Which chunks are on disk, verified, with their proof nodes: what may be served.
    verified: Arc<VerifiedChunks>,
    /// The verified chunks are offered to the streamer while this is held.
    offer: Option<OfferGuard>,
    /// Where the streamer introduces downloaders of this snapshot that ask what it holds.
    introduce: mpsc::Sender<NewPeer>,
    /// Data bytes served from this download while it ran.
    pub(super) served: Arc<AtomicU64>,
    /// Whether the files have their full size: until then no chunk is requested.
    reserved: Reserve,
    tasks: Tasks,
    /// Requests under way: their source, their task, and the end of the chunks they have
    /// checked and written so far.
    requests: HashMap<ReqId, InFlight>,
    reports_tx: mpsc::Sender<Report>,
    reports_rx: mpsc::Receiver<Report>,
    progress_tx: watch::Sender<Progress>,
    manifest_tx: watch::Sender<Option<(Manifest, Option<libp2p::PeerId>)>>,
    watermark: Arc<Watermark>,
    pub(super) started: Instant,
    pub(super) resumed_bytes: u64,
    pub(super) fetched_bytes: u64,
    pub(super) rate: Ewma,
    pub(super) last_tick: (Instant, u64),
    _writeback: Writeback,
    /// The partial download is this run's until it ends.
    _claim: PartialClaim,
}

/// The download's tasks (requests, connections, watchers), reaped as they end: finished ones
/// are dropped whenever one is started, so the set holds only what runs.
#[derive(Debug, Default)]
struct Tasks(JoinSet<()>);

impl Tasks {
    fn spawn(
        &mut self,
        task: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> AbortHandle {
        while self.0.try_join_next().is_some() {}
        self.0.spawn(task)
    }

    fn abort_all(&mut self) {
        self.0.abort_all();
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.len()
    }
}

#[derive(Debug)]
struct InFlight {
    peer: PeerIdx,
    task: AbortHandle,
    /// The first chunk asked for.
    start: u64,
    written: Arc<AtomicU64>,
    /// When it was sent.
    sent: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reserve {
    No,
    Running,
    Done,
}

/// Where verified chunks of `partial` are written, and the writeback that follows them.
fn sink_of(partial: &Partial) -> Result<(Writeback, Arc<Sink>), StoreError> {
    let dir = partial.dir().to_path_buf();
    let clone = |f: &std::fs::File| f.try_clone().map_err(|e| StoreError::at(&dir, e));
    let writeback = Writeback::start(clone(partial.file())?);
    let sink = Arc::new(Sink {
        archive: clone(partial.file())?,
        outboard: clone(partial.outboard())?,
        dir: dir.clone(),
    });
    Ok((writeback, sink))
}

impl Run {
    /// Opens the download's partial state on disk and its scheduler.
    async fn open(
        ctx: Arc<DownloadContext>,
        target: DownloadTarget,
        channels: &Channels,
    ) -> Result<Self, DownloadError> {
        let tree = target.tree();
        let max = ctx.config.max_chunks;
        if tree.chunk_count() > max {
            return Err(DownloadError::TooManyChunks {
                chunks: tree.chunk_count(),
                max,
            });
        }
        // One download of a snapshot at a time (a cancelled one may still be making its
        // progress durable), and no other download trims this one's partial.
        let claim = ctx.store.claim_partial(target.content_root).await;
        let (partial, done) = Partial::open_in(&ctx.store, tree, target.vouched).await?;
        let reserved = if done.ones() > 0 && partial.is_reserved()? {
            Reserve::Done
        } else {
            Reserve::No
        };
        let now = Instant::now();
        let mut sched = Scheduler::new(
            ctx.config.schedule,
            target.archive_size,
            u64::from(target.chunk_size.bytes()),
            tree.chunk_count(),
            &done,
            now,
        );
        sched.set_paused(reserved != Reserve::Done, now);
        let resumed_bytes = sched.done_bytes();
        // A loader may start on what a previous run left verified on disk.
        channels.watermark.advance(sched.verified_prefix());
        let (writeback, sink) = sink_of(&partial)?;
        let persister = Persister::new(&partial, resumed_bytes)?;
        let verified = Arc::new(VerifiedChunks::new(tree.chunk_count()));
        // Served from the start: the chunks whose proof nodes are on disk.
        if !partial.derived() {
            for c in 0..tree.chunk_count() {
                if done.get(c as usize) {
                    verified.set(c);
                }
            }
        }
        let capacity = ctx.config.schedule.max_inflight + 4 * ctx.config.schedule.max_peers + 64;
        let (reports_tx, reports_rx) = mpsc::channel(capacity);
        Ok(Self {
            ctx,
            target,
            tree,
            partial,
            persister,
            sink,
            sched,
            sources: Vec::new(),
            known: HashMap::new(),
            manifest: None,
            verified,
            offer: None,
            introduce: channels.introduce.clone(),
            served: Arc::new(AtomicU64::new(0)),
            reserved,
            tasks: Tasks::default(),
            requests: HashMap::new(),
            reports_tx,
            reports_rx,
            progress_tx: channels.progress.clone(),
            manifest_tx: channels.manifest.clone(),
            watermark: channels.watermark.clone(),
            started: now,
            resumed_bytes,
            fetched_bytes: 0,
            rate: Ewma::new(RATE_ALPHA),
            last_tick: (now, resumed_bytes),
            _writeback: writeback,
            _claim: claim,
        })
    }

    /// A source heard of goes to the scheduler, which decides when it takes a place. One heard
    /// of again changes nothing, unless it holds all of the snapshot now.
    fn add_source(&mut self, origin: Origin, partial: bool) {
        let id = origin.id();
        if let Some(&peer) = self.known.get(&id) {
            if !partial {
                self.sched.handle_source_complete(peer);
            }
            return;
        }
        let Some(peer) = self.sched.handle_source(partial, Instant::now()) else {
            tracing::debug!(target: DOWNLOAD_TARGET, source = %origin, "too many sources known; not keeping this one");
            return;
        };
        let source = Source {
            origin,
            conn: None,
            #[cfg(feature = "web")]
            web: None,
            last_error: None,
            unauthorized: false,
        };
        if peer == self.sources.len() {
            self.sources.push(source);
        } else {
            // It takes the entry of a source that delivered nothing.
            let old = std::mem::replace(&mut self.sources[peer], source);
            self.known.remove(&old.origin.id());
        }
        self.known.insert(id, peer);
    }

    /// Runs the download until every chunk is in (and a source served the manifest), it is
    /// stuck, or it is cancelled.
    async fn drive(mut self, channels: &mut Channels) -> Result<Downloaded, DownloadError> {
        let mut persist = tokio::time::interval(self.ctx.config.persist_interval);
        let mut progress = tokio::time::interval(self.ctx.config.progress_interval);
        let mut peers_open = true;
        loop {
            let now = Instant::now();
            self.carry_out_commands(now);
            // Every chunk may be on disk already (a resumed download that was complete): the
            // manifest still has to come from a source.
            if self.sched.is_finished() {
                break;
            }
            if let Some(stuck) = self.sched.stuck(now) {
                self.flush_progress().await?;
                return Err(self.stuck_error(stuck));
            }
            let deadline = tokio::time::Instant::from_std(self.sched.poll_timeout(now));
            tokio::select! {
                biased;
                _ = &mut channels.cancel => {
                    self.close_connections(b"cancelled");
                    self.flush_progress().await?;
                    tracing::info!(target: DOWNLOAD_TARGET, root = %self.target.content_root.short(), "download cancelled; progress kept for resume");
                    return Err(DownloadError::Cancelled);
                }
                Some(report) = self.reports_rx.recv() => self.handle(report)?,
                peer = channels.new_peers.recv(), if peers_open => match peer {
                    Some((peer, partial)) => self.add_source(peer, partial),
                    None => peers_open = false,
                },
                _ = tokio::time::sleep_until(deadline) => {
                    self.credit_all();
                    self.sched.handle_timeout(Instant::now());
                }
                _ = persist.tick() => self.start_persist()?,
                done = self.persister.wait(), if self.persister.is_running() => done?,
                _ = progress.tick() => self.publish_progress(false),
            }
        }
        self.finish().await
    }

    /// Carries out what the scheduler commands: the one place it is drained.
    fn carry_out_commands(&mut self, now: Instant) {
        while let Some(command) = self.sched.poll_command(now) {
            match command {
                Command::Connect(peer) => self.connect(peer),
                Command::Close(peer) => self.close(peer),
                Command::Request { id, peer, chunks } => self.request(id, peer, chunks),
                Command::Cancel(id) => {
                    // What it delivered counts, however it ended.
                    self.credit(id);
                    if let Some(r) = self.requests.remove(&id) {
                        r.task.abort();
                        tracing::trace!(target: DOWNLOAD_TARGET, source = %self.sources[r.peer].origin, after_ms = r.sent.elapsed().as_millis() as u64, "request abandoned");
                    }
                }
                Command::AskHave(peer) => self.ask_have(peer),
            }
        }
    }

    fn connect(&mut self, peer: PeerIdx) {
        let ctx = self.ctx.clone();
        let addr = match &self.sources[peer].origin {
            Origin::Peer(addr) => *addr,
            #[cfg(feature = "web")]
            Origin::Web(web) => return self.connect_web(peer, web.clone()),
        };
        tracing::debug!(target: DOWNLOAD_TARGET, source = %self.sources[peer].origin, "taking a place: connecting");
        let target = self.target;
        let reports = self.reports_tx.clone();
        let timeout = self.ctx.config.connect_timeout;
        self.tasks.spawn(async move {
            let result = tokio::time::timeout(timeout, connect(&ctx, addr, target))
                .await
                .unwrap_or(Err(ConnectError::Timeout));
            let report = match result {
                Ok((conn, manifest)) => Report::Connected {
                    peer,
                    conn,
                    manifest: Box::new(manifest),
                },
                Err(error) => Report::ConnectFailed { peer, error },
            };
            let _ = reports.send(report).await;
        });
    }

    /// `peer` gave its place up: its connection is closed (the scheduler still knows it).
    fn close(&mut self, peer: PeerIdx) {
        let source = &mut self.sources[peer];
        tracing::debug!(target: DOWNLOAD_TARGET, source = %source.origin, "giving its place up");
        if let Some(conn) = source.conn.take() {
            conn.close(close::DONE, b"place given up");
        }
        #[cfg(feature = "web")]
        {
            source.web = None;
        }
    }

    #[cfg(feature = "web")]
    fn connect_web(&mut self, peer: PeerIdx, web: Arc<crate::transfer::web::WebSource>) {
        let reports = self.reports_tx.clone();
        let (target, timeout) = (self.target, self.ctx.config.connect_timeout);
        self.tasks.spawn(async move {
            let report = match super::web::connect_web(&web, target, timeout).await {
                Ok((path, manifest)) => Report::WebConnected {
                    peer,
                    path,
                    manifest: Box::new(manifest),
                },
                Err(error) => Report::ConnectFailed { peer, error },
            };
            let _ = reports.send(report).await;
        });
    }

    fn ask_have(&mut self, peer: PeerIdx) {
        // A web source holds the whole snapshot.
        #[cfg(feature = "web")]
        if matches!(self.sources[peer].origin, Origin::Web(_)) {
            self.sched
                .handle_have(peer, Ok(super::picker::Have::All), Instant::now());
            return;
        }
        let Some(conn) = self.sources[peer].conn.clone() else {
            self.sched
                .handle_have(peer, Err(Failure::Transient), Instant::now());
            return;
        };
        let reports = self.reports_tx.clone();
        let tree = self.tree;
        let (piece, timeout) = (
            self.ctx.config.schedule.request_chunks,
            self.ctx.config.schedule.min_request_timeout,
        );
        let done = self.sched.pieces_done().clone();
        let serve_port = self.ctx.config.serve_port;
        self.tasks.spawn(async move {
            let result = ask_have(conn, tree, piece, done, serve_port, timeout).await;
            let _ = reports.send(Report::Have { peer, result }).await;
        });
    }

    fn request(&mut self, id: ReqId, peer: PeerIdx, chunks: std::ops::Range<u64>) {
        let (tree, sink) = (self.tree, self.sink.clone());
        let stall = self.ctx.config.schedule.min_request_timeout;
        let written = Arc::new(AtomicU64::new(chunks.start));
        let progress = written.clone();
        #[cfg(feature = "web")]
        if let (Origin::Web(web), Some((path, nodes))) =
            (&self.sources[peer].origin, &self.sources[peer].web)
        {
            let (web, path, nodes) = (web.clone(), path.clone(), nodes.clone());
            let start = chunks.start;
            return self.spawn_fetch(id, peer, start, written, async move {
                super::web::fetch_web(&web, &path, &nodes, tree, chunks, &sink, stall, &progress)
                    .await
            });
        }
        let Some(conn) = self.sources[peer].conn.clone() else {
            self.sched
                .handle_failure(id, Failure::Transient, Instant::now());
            return;
        };
        let start = chunks.start;
        self.spawn_fetch(id, peer, start, written, async move {
            fetch(conn, tree, chunks, &sink, stall, &progress).await
        });
    }

    /// Runs the fetch of request `id` from `peer` (chunks from `start` on), its progress
    /// followed through `written`; its end is reported.
    fn spawn_fetch(
        &mut self,
        id: ReqId,
        peer: PeerIdx,
        start: u64,
        written: Arc<AtomicU64>,
        fetch: impl std::future::Future<Output = Result<(), FetchError>> + Send + 'static,
    ) {
        let reports = self.reports_tx.clone();
        let task = self.tasks.spawn(async move {
            let result = fetch.await;
            let _ = reports.send(Report::Fetched { id, result }).await;
        });
        self.requests.insert(
            id,
            InFlight {
                peer,
                task,
                start,
                written,
                sent: Instant::now(),
            },
        );
    }

    /// A source proved the token and served the advertised manifest: the files get their full
    /// size now (after a free-space check), in the background.
    fn start_reserve(&mut self) {
        if self.reserved != Reserve::No {
            return;
        }
        self.reserved = Reserve::Running;
        let reports = self.reports_tx.clone();
        let (store, headroom) = (self.ctx.store.clone(), self.ctx.config.disk_headroom);
        let (budget, vouched) = (self.ctx.config.partial_budget, self.target.vouched);
        let partial = Partial::reopen(&self.partial);
        self.tasks.spawn(async move {
            let result = match partial {
                Ok(partial) => partial.reserve_in(&store, headroom, budget, vouched).await,
                Err(e) => Err(e.into()),
            };
            let _ = reports.send(Report::Reserved(result)).await;
        });
    }

    fn handle(&mut self, report: Report) -> Result<(), DownloadError> {
        let now = Instant::now();
        match report {
            Report::Reserved(result) => {
                result?;
                self.reserved = Reserve::Done;
                self.sched.set_paused(false, now);
                tracing::debug!(target: DOWNLOAD_TARGET, bytes = self.target.archive_size, "disk reserved");
                self.offer();
            }
            Report::Have { peer, result } => {
                let result = result.map_err(|e| {
                    tracing::debug!(target: DOWNLOAD_TARGET, source = %self.sources[peer].origin, error = %e, "could not learn what the source holds");
                    let failure = match &e {
                        FetchError::Refused(_, failure) => *failure,
                        FetchError::Protocol(_) => Failure::Fatal,
                        _ => Failure::Transient,
                    };
                    self.sources[peer].last_error = Some(e.to_string());
                    failure
                });
                self.sched.handle_have(peer, result, now);
            }
            Report::Connected {
                peer,
                conn,
                manifest,
            } => self.connected(peer, conn, *manifest),
            Report::ConnectFailed { peer, error } => {
                let source = &mut self.sources[peer];
                tracing::debug!(target: DOWNLOAD_TARGET, source = %source.origin, %error, "connect failed");
                if error.is_unauthorized() {
                    source.unauthorized = true;
                    tracing::warn!(target: DOWNLOAD_TARGET, source = %source.origin, "peer refused our SNAPSHOT_TOKEN");
                }
                source.last_error = Some(error.to_string());
                let failure = if self.sched.peer_report(peer).partial {
                    error.failure_of_partial()
                } else {
                    error.failure()
                };
                self.sched.handle_connect_failed(peer, failure, now);
            }
            Report::Disconnected {
                peer,
                conn_id,
                benign,
            } => {
                self.credit_all();
                let source = &mut self.sources[peer];
                if source.conn.as_ref().map(|c| c.stable_id()) == Some(conn_id) {
                    source.conn = None;
                    source.last_error = Some("connection lost".into());
                    tracing::debug!(target: DOWNLOAD_TARGET, source = %source.origin, benign, "connection lost");
                    self.sched.handle_disconnected(peer, !benign, now);
                }
            }
            Report::Fetched { id, result } => return self.fetched(id, result, now),
            #[cfg(feature = "web")]
            Report::WebConnected {
                peer,
                path,
                manifest,
            } => {
                let Some(take) = self.sched.handle_connected(peer) else {
                    return Ok(());
                };
                tracing::debug!(target: DOWNLOAD_TARGET, source = %self.sources[peer].origin, %path, "web source lists the snapshot");
                self.sources[peer].web = Some((path, Arc::new(super::web::NodeCache::new())));
                if take {
                    self.take_manifest(peer, *manifest);
                }
                self.start_reserve();
            }
        }
        Ok(())
    }

    /// Takes `peer`'s manifest as the download's (the scheduler said so).
    fn take_manifest(&mut self, peer: PeerIdx, manifest: Manifest) {
        let partial = self.sched.peer_report(peer).partial;
        // A partial holder passes on the manifest it took from its own source: counts it
        // gets wrong are not proven to be its lie, so it is not named for them.
        let from = self.sources[peer].origin.peer_id().filter(|_| !partial);
        self.manifest_tx
            .send_replace(Some((manifest.clone(), from)));
        self.manifest = Some(manifest);
        // Offered again under the manifest taken.
        self.offer = None;
        self.offer();
    }

    fn connected(&mut self, peer: PeerIdx, conn: quinn::Connection, manifest: Manifest) {
        let Some(take) = self.sched.handle_connected(peer) else {
            // It gave its place up while connecting: the connection is not used.
            conn.close(close::DONE, b"not needed");
            return;
        };
        tracing::debug!(target: DOWNLOAD_TARGET, source = %self.sources[peer].origin, "connected");
        if take {
            self.take_manifest(peer, manifest);
        }
        let reports = self.reports_tx.clone();
        let watched = conn.clone();
        let conn_id = conn.stable_id();
        self.tasks.spawn(async move {
            let why = watched.closed().await;
            let benign = matches!(
                &why,
                quinn::ConnectionError::ApplicationClosed(c)
                    if c.error_code == close::IDLE || c.error_code == close::EVICTED
            );
            let report = Report::Disconnected {
                peer,
                conn_id,
                benign,
            };
            let _ = reports.send(report).await;
        });
        self.sched.handle_rtt(peer, conn.rtt());
        self.sources[peer].conn = Some(conn);
        self.start_reserve();
    }

    fn fetched(
        &mut self,
        id: ReqId,
        result: Result<(), FetchError>,
        now: Instant,
    ) -> Result<(), DownloadError> {
        // What it delivered counts, however it ended.
        self.credit(id);
        let Some(InFlight { peer, sent, .. }) = self.requests.remove(&id) else {
            return Ok(());
        };
        if let Err(e) = &result {
            tracing::trace!(target: DOWNLOAD_TARGET, source = %self.sources[peer].origin, after_ms = sent.elapsed().as_millis() as u64, error = %e, "request ended without its chunks");
        }
        match result {
            Ok(()) => {
                if let Some(conn) = &self.sources[peer].conn {
                    self.sched.handle_rtt(peer, conn.rtt());
                }
                let added = self.sched.handle_success(id, now);
                self.count_fetched(peer, added);
            }
            Err(FetchError::Corrupt(e)) => {
                let m = &self.ctx.metrics;
                m.verification_failures.inc();
                m.peer_bans.inc();
                let source = &mut self.sources[peer];
                tracing::warn!(target: DOWNLOAD_TARGET, source = %source.origin, error = %e, "a source sent a chunk that does not match the content root; banned for this download");
                source.last_error = Some(format!("banned: {e}"));
                self.sched.handle_corrupt(id, now);
            }
            Err(FetchError::Local(e)) => return Err(e.into()),
            Err(FetchError::Refused(why, failure)) => {
                self.sources[peer].last_error = Some(why);
                self.sched.handle_failure(id, failure, now);
            }
            #[cfg(feature = "web")]
            Err(FetchError::Web(e)) => {
                tracing::debug!(target: DOWNLOAD_TARGET, source = %self.sources[peer].origin, error = %e, "web request failed");
                let failure = if e.is_transient() {
                    Failure::Transient
                } else {
                    Failure::Fatal
                };
                self.sources[peer].last_error = Some(e.to_string());
                self.sched.handle_failure(id, failure, now);
            }
            Err(e) => {
                tracing::debug!(target: DOWNLOAD_TARGET, source = %self.sources[peer].origin, error = %e, "request failed");
                self.sources[peer].last_error = Some(e.to_string());
                self.sched.handle_failure(id, Failure::Transient, now);
            }
        }
        Ok(())
    }

    fn stuck_error(&self, stuck: Stuck) -> DownloadError {
        let missing_bytes = self.target.archive_size - self.sched.done_bytes();
        match stuck {
            // Something came, then nothing for too long.
            Stuck::NoProgress if self.fetched_bytes > 0 => {
                DownloadError::NoProgress(self.ctx.config.schedule.no_progress_timeout)
            }
            // Nothing at all came: why each source could not serve says more.
            Stuck::NoPeers | Stuck::NoProgress
                if !self.sources.is_empty() && self.sources.iter().all(|p| p.unauthorized) =>
            {
                DownloadError::Unauthorized {
                    peers: self.sources.len(),
                }
            }
            Stuck::NoPeers | Stuck::NoProgress => DownloadError::NoPeers {
                missing_bytes,
                banned: (0..self.sources.len())
                    .filter(|i| self.sched.peer_report(*i).standing == Standing::Banned)
                    .count(),
                reasons: if self.sources.is_empty() {
                    "no peers".into()
                } else {
                    self.sources
                        .iter()
                        .map(|p| {
                            format!(
                                "{}: {}",
                                p.origin,
                                p.last_error.as_deref().unwrap_or("unavailable")
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("; ")
                },
            },
        }
    }

    /// Offers the verified chunks to the streamer, once the files have their size and the
    /// manifest is known (unless serving while downloading is off).
    fn offer(&mut self) {
        if self.offer.is_some() || self.reserved != Reserve::Done || !self.ctx.config.serve_partial
        {
            return;
        }
        let Some(manifest) = self.manifest.clone() else {
            return;
        };
        let dir = self.partial.dir();
        match ChunkSource::open(self.tree, &dir.join(PART_FILE), &dir.join(OUTBOARD_FILE)) {
            Ok(source) => {
                let introduce = self.introduce.clone();
                // Each asker once: the same channel brings discovery's sources.
                let seen = std::sync::Mutex::new(lru::LruCache::new(INTRODUCED));
                self.offer = Some(self.ctx.store.exchange().offer(PartialOffer {
                    manifest,
                    source: Arc::new(source),
                    verified: self.verified.clone(),
                    served: self.served.clone(),
                    introduce: Introducer(Box::new(move |peer_id, addr| {
                        let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
                        if seen.put(peer_id, ()).is_some() {
                            return false;
                        }
                        let peer = PeerAddr { peer_id, addr };
                        introduce.try_send((Origin::Peer(peer), true)).is_ok()
                    })),
                }));
                tracing::debug!(target: DOWNLOAD_TARGET, verified = self.verified.count(), "serving the verified chunks meanwhile");
            }
            Err(e) => {
                tracing::warn!(target: DOWNLOAD_TARGET, error = %e, "cannot serve the partial download");
            }
        }
    }

    /// Counts the chunks request `id` has checked and written so far as on disk, delivered by
    /// its source.
    fn credit(&mut self, id: ReqId) {
        let Some(r) = self.requests.get(&id) else {
            return;
        };
        let (peer, upto) = (r.peer, r.written.load(Ordering::Acquire));
        // Written with their proof nodes and checked: they may be served from now on.
        for c in r.start..upto {
            self.verified.set(c);
        }
        let added = self.sched.handle_written(id, upto, Instant::now());
        self.count_fetched(peer, added);
    }

    /// `peer` delivered `added` new verified bytes: counted, and credited to it (the streamer
    /// serves first the peers that give).
    fn count_fetched(&mut self, peer: PeerIdx, added: u64) {
        if added > 0 {
            self.fetched_bytes += added;
            self.ctx.metrics.downloaded_bytes.inc_by(added);
            self.watermark.advance(self.sched.verified_prefix());
            if let Some(id) = self.sources[peer].origin.peer_id() {
                self.ctx.store.exchange().credit(id, added, Instant::now());
            }
        }
    }

    fn credit_all(&mut self) {
        let ids: Vec<ReqId> = self.requests.keys().copied().collect();
        for id in ids {
            self.credit(id);
        }
    }

    /// Starts making the chunks on disk durable and recording them for resume, in the
    /// background (the download goes on meanwhile), once the files are reserved.
    fn start_persist(&mut self) -> Result<(), DownloadError> {
        self.credit_all();
        if self.reserved != Reserve::Done {
            return Ok(());
        }
        Ok(self
            .persister
            .start(self.sched.chunk_done(), self.sched.done_bytes())?)
    }

    /// Makes the chunks on disk durable and records them for resume, and waits for it.
    async fn flush_progress(&mut self) -> Result<(), DownloadError> {
        self.credit_all();
        if self.reserved != Reserve::Done {
            return self.persister.wait().await;
        }
        let done = self.sched.done_bytes();
        self.persister.flush(self.sched.chunk_done(), done).await
    }

    pub(super) fn publish_progress(&mut self, finished: bool) {
        let p = self.progress(finished);
        self.progress_tx.send_replace(p);
    }

    fn close_connections(&self, why: &[u8]) {
        for source in &self.sources {
            if let Some(conn) = &source.conn {
                conn.close(close::DONE, why);
            }
        }
    }

    /// Logs what each connection measured of its path.
    fn log_connections(&self) {
        for (i, source) in self.sources.iter().enumerate() {
            let r = self.sched.peer_report(i);
            if !r.tried {
                continue;
            }
            let t = r.tally;
            let path = source.conn.as_ref().map(|c| c.stats().path);
            tracing::debug!(
                target: DOWNLOAD_TARGET,
                source = %source.origin,
                bytes = r.bytes,
                requests = t.requests,
                delivered = t.delivered,
                busy = t.busy,
                not_held = t.not_held,
                failed = t.failed,
                haves = t.haves,
                rtt_us = path.map(|p| p.rtt.as_micros() as u64),
                lost_packets = path.map(|p| p.lost_packets),
                "source figures"
            );
        }
    }

    /// Every chunk is in: stops the remaining (hedged) requests, closes the connections and
    /// publishes the archive.
    async fn finish(mut self) -> Result<Downloaded, DownloadError> {
        let finish_started = Instant::now();
        // What the requests still under way delivered counts, before they are stopped.
        self.credit_all();
        self.tasks.abort_all();
        self.log_connections();
        self.close_connections(b"done");
        self.publish_progress(false);
        let manifest = self
            .manifest
            .clone()
            .expect("a manifest from the first connection");
        let partial = Partial::reopen(&self.partial)?;
        let snapshot = partial.publish_in(&self.ctx.store, manifest).await?;
        // Served as a published snapshot from now on (the store is looked in first); until
        // here, from the verified chunks, so downloaders fetching from this node never see a
        // moment where it holds nothing.
        self.offer = None;
        self.watermark.advance(self.target.archive_size);
        tracing::debug!(
            target: DOWNLOAD_TARGET,
            finish_secs = finish_started.elapsed().as_secs_f64(),
            "made durable and published"
        );
        self.publish_progress(true);
        Ok(self.downloaded(snapshot))
    }
}

#[cfg(test)]
mod tests {
    use super::Tasks;

    #[tokio::test]
    async fn finished_tasks_are_not_kept() {
        let mut tasks = Tasks::default();
        for _ in 0..1000 {
            tasks.spawn(async {});
            tokio::task::yield_now().await;
        }
        // Let the last ones end, then start one more: only what runs is held.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        tasks.spawn(std::future::pending());
        assert!(tasks.len() < 10, "{} tasks held", tasks.len());
    }
}
