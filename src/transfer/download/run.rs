//! The loop of one download: a thin tokio layer over the [`Scheduler`]. It opens the
//! connections and requests the scheduler commands, feeds their outcomes back, moves the
//! verified prefix for a loader and reports progress. Every disk step (open, reserve, persist,
//! publish) is the [`Partial`]'s.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{AbortHandle, JoinSet};

use super::connect::{ConnectError, connect};
use super::fetch::{FetchError, Sink, ask_have, fetch};
use super::partial::{PART_FILE, Partial, Persister};
use super::picker::Have;
use super::scheduler::{Command, Failure, PeerFate, PeerIdx, ReqId, Scheduler, Stuck};
use super::{
    DownloadContext, DownloadError, DownloadTarget, Downloaded, PeerProgress, PeerStatus, Progress,
    WebProgress,
};
use crate::chunk::{ChunkSource, ChunkTree, VerifiedChunks};
use crate::disk::Writeback;
use crate::snapshot::{
    Manifest, OUTBOARD_FILE, OfferGuard, PartialClaim, PartialOffer, StoreError, Watermark,
};
use crate::transfer::protocol::close;
use crate::transfer::rate::Ewma;
use crate::transfer::{DOWNLOAD_TARGET, PeerAddr};

/// How a source stands, for progress reports.
fn status(fate: PeerFate) -> PeerStatus {
    match fate {
        PeerFate::Alive => PeerStatus::Active,
        PeerFate::Banned => PeerStatus::Banned,
        PeerFate::Dropped => PeerStatus::Dropped,
    }
}

/// EWMA weight of a new sample of the download's overall rate.
const RATE_ALPHA: f64 = 0.3;

/// Most source entries one download keeps, those that gave their places up included: beyond
/// it, busy sources are no longer rotated out.
const MAX_SOURCES: usize = 256;

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
        result: Result<Have, FetchError>,
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

impl Origin {
    /// The peer, for a peer.
    fn peer_id(&self) -> Option<libp2p::PeerId> {
        match self {
            Origin::Peer(a) => Some(a.peer_id),
            #[cfg(feature = "web")]
            Origin::Web(_) => None,
        }
    }

    /// Whether both are the same source.
    fn same(&self, other: &Origin) -> bool {
        match (self, other) {
            (Origin::Peer(a), Origin::Peer(b)) => a.peer_id == b.peer_id,
            #[cfg(feature = "web")]
            (Origin::Web(a), Origin::Web(b)) => a.base() == b.base(),
            #[cfg(feature = "web")]
            _ => false,
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
struct Source {
    origin: Origin,
    /// It downloads the snapshot too (it holds part of it).
    partial: bool,
    conn: Option<quinn::Connection>,
    /// A web source: the snapshot's directory there (once found), and the proof nodes read.
    #[cfg(feature = "web")]
    web: Option<(String, Arc<super::web::NodeCache>)>,
    last_error: Option<String>,
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
        run.add_peer(Origin::Peer(p), false);
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
struct Run {
    ctx: Arc<DownloadContext>,
    target: DownloadTarget,
    tree: ChunkTree,
    partial: Partial,
    persister: Persister,
    sink: Arc<Sink>,
    sched: Scheduler,
    sources: Vec<Source>,
    /// Peers beyond the active ones, taken on as active ones are banned or dropped (bounded):
    /// a few peers that misbehave cannot leave the download without sources.
    spares: std::collections::VecDeque<NewPeer>,
    manifest: Option<Manifest>,
    /// The manifest came from a partial holder: a complete holder's replaces it.
    manifest_partial: bool,
    /// Which chunks are on disk, verified, with their proof nodes: what may be served.
    verified: Arc<VerifiedChunks>,
    /// The verified chunks are offered to the streamer while this is held.
    offer: Option<OfferGuard>,
    /// Data bytes served from this download while it ran.
    served: Arc<AtomicU64>,
    /// Whether the files have their full size: until then no chunk is requested.
    reserved: Reserve,
    tasks: Tasks,
    /// Requests under way: their peer, their task, and the end of the chunks they have checked
    /// and written so far.
    requests: HashMap<ReqId, InFlight>,
    reports_tx: mpsc::Sender<Report>,
    reports_rx: mpsc::Receiver<Report>,
    progress_tx: watch::Sender<Progress>,
    manifest_tx: watch::Sender<Option<(Manifest, Option<libp2p::PeerId>)>>,
    watermark: Arc<Watermark>,
    started: Instant,
    resumed_bytes: u64,
    fetched_bytes: u64,
    rate: Ewma,
    last_tick: (Instant, u64),
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
        // Partials of other snapshots stay, within the disk budget.
        let (partial, done) = Partial::open_in(&ctx.store, tree, ctx.config.partial_budget).await?;
        let reserved = if done.ones() > 0 {
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
        sched.set_paused(reserved != Reserve::Done);
        let resumed_bytes = sched.done_bytes();
        // A loader may start on what a previous run left verified on disk.
        channels.watermark.advance(sched.verified_prefix());
        let (writeback, sink) = sink_of(&partial)?;
        let persister = Persister::new(&partial, resumed_bytes)?;
        let verified = Arc::new(VerifiedChunks::new(tree.chunk_count()));
        for c in 0..tree.chunk_count() {
            if done.get(c as usize) {
                verified.set(c);
            }
        }
        let capacity = ctx.config.schedule.max_inflight + 4 * ctx.config.max_peers + 64;
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
            spares: Default::default(),
            manifest: None,
            manifest_partial: false,
            verified,
            offer: None,
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

    /// Takes a peer on: active when fewer than `max_peers` are, else a spare (up to three times
    /// `max_peers` of those; beyond, it is ignored). Partial holders take at most three
    /// quarters of the active places, and a complete holder is taken on beyond the limit while
    /// fewer than a quarter of the active peers are complete: a crowd of downloaders cannot
    /// crowd out the peers that hold the whole snapshot.
    fn add_peer(&mut self, addr: Origin, partial: bool) {
        let known = |a: &Origin| a.same(&addr);
        if self.sources.iter().any(|p| known(&p.origin))
            || self.spares.iter().any(|(a, _)| known(a))
        {
            return;
        }
        if self.has_room(partial) {
            self.activate(addr, partial);
        } else if self.spares.len() < 3 * self.ctx.config.max_peers {
            self.spares.push_back((addr, partial));
        } else {
            tracing::debug!(target: DOWNLOAD_TARGET, source = %addr, "peer limit of the download reached; not adding");
        }
    }

    /// Whether a complete (or a partial) holder may be made active now.
    fn has_room(&self, partial: bool) -> bool {
        let max = self.ctx.config.max_peers;
        let alive = |want_partial: bool| {
            (0..self.sources.len())
                .filter(|&i| self.sources[i].partial == want_partial)
                .filter(|&i| self.sched.peer_report(i).fate == PeerFate::Alive)
                .count()
        };
        let (complete, partials) = (alive(false), alive(true));
        if partial {
            complete + partials < max && partials < (max * 3 / 4).max(1)
        } else {
            complete + partials < max || complete < max.div_ceil(4)
        }
    }

    /// Sources that have answered only "busy" for a while give their places to spares that
    /// wait, and wait at the back of the spares themselves (see the scheduler's docs). Bounded:
    /// a download keeps at most `MAX_SOURCES` entries of sources, retired ones included.
    fn retire_busy(&mut self, now: Instant) {
        // (Run on every turn of the loop: nothing is looked at while no spare waits.)
        if self.spares.is_empty() {
            return;
        }
        let busy = self.sched.poll_busy_too_long(now);
        if busy.is_empty() {
            return;
        }
        // Spares never tried yet, of each kind (complete, partial): a retired source waits
        // at the back, and does not count as one to give a place to.
        let fresh = |partial: bool| {
            self.spares
                .iter()
                .filter(|(a, p)| *p == partial && !self.sources.iter().any(|s| s.origin.same(a)))
                .count()
        };
        let mut waiting = [fresh(false), fresh(true)];
        // What arrived so far counts before a place is given up.
        self.credit_all();
        let mut retired = Vec::new();
        for peer in busy {
            let partial = self.sources[peer].partial;
            let room = &mut waiting[usize::from(partial)];
            if *room == 0 || self.sources.len() + retired.len() >= MAX_SOURCES {
                continue;
            }
            *room -= 1;
            let source = &mut self.sources[peer];
            tracing::debug!(target: DOWNLOAD_TARGET, source = %source.origin, "busy for long: giving its place to a waiting peer");
            if let Some(conn) = source.conn.take() {
                conn.close(close::DONE, b"busy");
            }
            retired.push((source.origin.clone(), partial));
            self.sched.handle_retired(peer);
        }
        for spare in retired {
            if self.spares.len() < 3 * self.ctx.config.max_peers {
                self.spares.push_back(spare);
            }
        }
    }

    /// Active peers that were banned or dropped are replaced by spares.
    fn take_on_spares(&mut self) {
        while let Some(i) = self
            .spares
            .iter()
            .position(|(_, partial)| self.has_room(*partial))
        {
            let (addr, partial) = self.spares.remove(i).expect("a spare at i");
            tracing::debug!(target: DOWNLOAD_TARGET, source = %addr, partial, "taking on a spare peer");
            self.activate(addr, partial);
        }
    }

    fn activate(&mut self, addr: Origin, partial: bool) {
        let idx = if partial {
            self.sched.add_partial_peer()
        } else {
            self.sched.add_peer()
        };
        debug_assert_eq!(idx, self.sources.len());
        self.sources.push(Source {
            origin: addr,
            partial,
            conn: None,
            #[cfg(feature = "web")]
            web: None,
            last_error: None,
            unauthorized: false,
        });
    }

    /// Runs the download until every chunk is in (and a peer served the manifest), it is
    /// stuck, or it is cancelled.
    async fn drive(mut self, channels: &mut Channels) -> Result<Downloaded, DownloadError> {
        let mut persist = tokio::time::interval(self.ctx.config.persist_interval);
        let mut progress = tokio::time::interval(self.ctx.config.progress_interval);
        let mut peers_open = true;
        loop {
            let now = Instant::now();
            self.retire_busy(now);
            self.take_on_spares();
            self.carry_out_commands(now);
            // Every chunk may be on disk already (a resumed download that was complete): the
            // manifest still has to come from a peer.
            if self.sched.is_complete() && self.manifest.is_some() {
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
                    Some((peer, partial)) => self.add_peer(peer, partial),
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
                Command::Request { id, peer, chunks } => self.request(id, peer, chunks),
                Command::Cancel(id) => {
                    if let Some(r) = self.requests.remove(&id) {
                        r.task.abort();
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
        self.tasks.spawn(async move {
            let result = ask_have(conn, tree, piece, done, timeout).await;
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
            },
        );
    }

    /// A peer proved the token and served the advertised manifest: the files get their full
    /// size now (after a free-space check), in the background.
    fn start_reserve(&mut self) {
        if self.reserved != Reserve::No {
            return;
        }
        self.reserved = Reserve::Running;
        let reports = self.reports_tx.clone();
        let (store, headroom) = (self.ctx.store.clone(), self.ctx.config.disk_headroom);
        let partial = Partial::reopen(&self.partial);
        self.tasks.spawn(async move {
            let result = match partial {
                Ok(partial) => partial.reserve_in(&store, headroom).await,
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
                self.sched.set_paused(false);
                tracing::debug!(target: DOWNLOAD_TARGET, bytes = self.target.archive_size, "disk reserved");
                self.offer();
            }
            Report::Have { peer, result } => {
                let result = result.map_err(|e| {
                    tracing::debug!(target: DOWNLOAD_TARGET, source = %self.sources[peer].origin, error = %e, "could not learn what the peer holds");
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
                let failure = if source.partial {
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
                if self.sched.peer_report(peer).fate != PeerFate::Alive {
                    return Ok(());
                }
                tracing::debug!(target: DOWNLOAD_TARGET, source = %self.sources[peer].origin, %path, "web source lists the snapshot");
                self.sources[peer].web = Some((path, Arc::new(super::web::NodeCache::new())));
                self.take_manifest(peer, *manifest);
                self.sched.handle_connected(peer);
                self.start_reserve();
            }
        }
        Ok(())
    }

    /// The manifest of the first holder; a complete holder's replaces a partial one's (both
    /// match the target; only a complete holder has served the snapshot it publishes).
    fn take_manifest(&mut self, peer: PeerIdx, manifest: Manifest) {
        let partial = self.sources[peer].partial;
        if self.manifest.is_none() || (self.manifest_partial && !partial) {
            // A partial holder passes on the manifest it took from its own source: counts it
            // gets wrong are not proven to be its lie, so it is not named for them.
            let from = self.sources[peer].origin.peer_id().filter(|_| !partial);
            self.manifest_tx
                .send_replace(Some((manifest.clone(), from)));
            self.manifest = Some(manifest);
            self.manifest_partial = partial;
            // Offered again under the manifest taken.
            self.offer = None;
            self.offer();
        }
    }

    fn connected(&mut self, peer: PeerIdx, conn: quinn::Connection, manifest: Manifest) {
        if self.sched.peer_report(peer).fate != PeerFate::Alive {
            // Dropped or retired while connecting: the connection is not used.
            conn.close(close::DONE, b"not needed");
            return;
        }
        tracing::debug!(target: DOWNLOAD_TARGET, source = %self.sources[peer].origin, "connected");
        self.take_manifest(peer, manifest);
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
        self.sources[peer].conn = Some(conn);
        self.sched.handle_connected(peer);
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
        let Some(InFlight { peer, .. }) = self.requests.remove(&id) else {
            return Ok(());
        };
        match result {
            Ok(()) => self.sched.handle_success(id, now),
            Err(FetchError::Corrupt(e)) => {
                let m = &self.ctx.metrics;
                m.verification_failures.inc();
                m.peer_bans.inc();
                let source = &mut self.sources[peer];
                tracing::warn!(target: DOWNLOAD_TARGET, source = %source.origin, error = %e, "a source sent a chunk that does not match the content root; banned for this download");
                source.last_error = Some(format!("banned: {e}"));
                if let Some(conn) = &source.conn {
                    conn.close(close::DONE, b"bad data");
                }
                self.sched.handle_corrupt(id);
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
            Stuck::NoProgress => {
                DownloadError::NoProgress(self.ctx.config.schedule.no_progress_timeout)
            }
            Stuck::NoPeers
                if !self.sources.is_empty() && self.sources.iter().all(|p| p.unauthorized) =>
            {
                DownloadError::Unauthorized {
                    peers: self.sources.len(),
                }
            }
            Stuck::NoPeers => DownloadError::NoPeers {
                missing_bytes,
                banned: (0..self.sources.len())
                    .filter(|i| self.sched.peer_report(*i).fate == PeerFate::Banned)
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
                self.offer = Some(self.ctx.store.offer_partial(PartialOffer {
                    manifest,
                    source: Arc::new(source),
                    verified: self.verified.clone(),
                    served: self.served.clone(),
                }));
                tracing::debug!(target: DOWNLOAD_TARGET, verified = self.verified.count(), "serving the verified chunks meanwhile");
            }
            Err(e) => {
                tracing::warn!(target: DOWNLOAD_TARGET, error = %e, "cannot serve the partial download");
            }
        }
    }

    /// Counts the chunks request `id` has checked and written so far as on disk.
    fn credit(&mut self, id: ReqId) {
        let Some(r) = self.requests.get(&id) else {
            return;
        };
        let upto = r.written.load(Ordering::Acquire);
        // Written with their proof nodes and checked: they may be served from now on.
        for c in r.start..upto {
            self.verified.set(c);
        }
        let added = self.sched.handle_written(id, upto, Instant::now());
        if added > 0 {
            self.fetched_bytes += added;
            self.ctx.metrics.downloaded_bytes.inc_by(added);
            self.watermark.advance(self.sched.verified_prefix());
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

    fn progress(&mut self, finished: bool) -> Progress {
        let now = Instant::now();
        let done = self.sched.done_bytes();
        let (t0, d0) = self.last_tick;
        let dt = now.duration_since(t0).as_secs_f64();
        if dt > 0.05 {
            self.rate.update((done - d0) as f64 / dt);
            self.last_tick = (now, done);
        }
        let rate = self.rate.get().unwrap_or(0.0);
        let remaining = self.target.archive_size - done;
        Progress {
            root: self.target.content_root,
            done_bytes: done,
            total_bytes: self.target.archive_size,
            resumed_bytes: self.resumed_bytes,
            served_bytes: self.served.load(Ordering::Relaxed),
            rate,
            eta: (rate > 0.0).then(|| Duration::from_secs_f64(remaining as f64 / rate)),
            peers: (0..self.sources.len())
                .filter_map(|i| {
                    let r = self.sched.peer_report(i);
                    Some(PeerProgress {
                        peer_id: self.sources[i].origin.peer_id()?,
                        bytes: r.bytes,
                        rate: r.rate,
                        inflight: r.inflight,
                        partial: r.partial,
                        status: status(r.fate),
                    })
                })
                .collect(),
            web: self.web_progress(),
            finished,
        }
    }

    /// The web sources' parts.
    fn web_progress(&self) -> Vec<WebProgress> {
        #[cfg(feature = "web")]
        {
            (0..self.sources.len())
                .filter_map(|i| match &self.sources[i].origin {
                    Origin::Web(w) => {
                        let r = self.sched.peer_report(i);
                        Some(WebProgress {
                            url: w.base().to_string(),
                            bytes: r.bytes,
                            rate: r.rate,
                            inflight: r.inflight,
                            status: status(r.fate),
                        })
                    }
                    Origin::Peer(_) => None,
                })
                .collect()
        }
        #[cfg(not(feature = "web"))]
        Vec::new()
    }

    fn publish_progress(&mut self, finished: bool) {
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
        for source in &self.sources {
            if let Some(conn) = &source.conn {
                let path = conn.stats().path;
                tracing::debug!(
                    target: DOWNLOAD_TARGET,
                    source = %source.origin,
                    mtu = path.current_mtu,
                    rtt_us = path.rtt.as_micros() as u64,
                    cwnd = path.cwnd,
                    lost_packets = path.lost_packets,
                    "connection figures"
                );
            }
        }
    }

    /// Every chunk is in: stops the remaining (hedged) requests, closes the connections and
    /// publishes the archive.
    async fn finish(mut self) -> Result<Downloaded, DownloadError> {
        let finish_started = Instant::now();
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
        let per_peer: Vec<_> = (0..self.sources.len())
            .filter_map(|i| {
                let peer = self.sources[i].origin.peer_id()?;
                Some((peer, self.sched.peer_report(i).bytes))
            })
            .collect();
        let per_web: Vec<_> = self
            .web_progress()
            .into_iter()
            .map(|w| (w.url, w.bytes))
            .collect();
        let elapsed = self.started.elapsed();
        tracing::debug!(
            target: DOWNLOAD_TARGET,
            finish_secs = finish_started.elapsed().as_secs_f64(),
            "made durable and published"
        );
        self.publish_progress(true);
        tracing::info!(
            target: DOWNLOAD_TARGET,
            slot = snapshot.manifest().slot,
            kind = %snapshot.manifest().kind,
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
            served_bytes: self.served.load(Ordering::Relaxed),
            elapsed,
            per_peer,
            per_web,
        })
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
