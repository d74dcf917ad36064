//! The loop of one download: a thin tokio layer over the [`Scheduler`]. It hands the scheduler
//! every source it hears of, opens and closes the connections and runs the requests the
//! scheduler commands, feeds their outcomes back, moves the verified prefix for a loader and
//! reports progress (`report.rs`). Which sources hold a place, and when the download is done,
//! are the scheduler's rules; every disk step (open, reserve, persist, publish) is the
//! [`Partial`]'s.
//!
//! What the loop does at the scheduler's command is `commands.rs`, what its tasks report back
//! `outcomes.rs`, what it holds so far (credits, durable progress, the offer to the streamer)
//! `progress.rs`, and how it ends `finish.rs`.

mod commands;
mod finish;
mod outcomes;
mod progress;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{AbortHandle, JoinSet};

use super::bits::Bits;
use super::connect::{ConnectError, ManifestReply};
use super::fetch::{FetchError, Sink};
use super::partial::{Partial, Persister};
use super::scheduler::{Command, Lost, PeerIdx, ReqId, Scheduler};
use super::{
    DownloadContext, DownloadError, DownloadTarget, Downloaded, Holding, Origin, Progress,
};
use crate::chunk::{ChunkTree, VerifiedChunks};
use crate::disk::Writeback;
use crate::snapshot::{Manifest, PartialClaim, StoreError, Watermark};
use crate::transfer::exchange::OfferGuard;
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
        reply: Box<ManifestReply>,
    },
    ConnectFailed {
        peer: PeerIdx,
        error: ConnectError,
    },
    Disconnected {
        peer: PeerIdx,
        conn_id: usize,
        /// How it ended (closed as idle or to make room, the server leaving, a failure).
        lost: Lost,
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
    WebConnected {
        peer: PeerIdx,
        path: String,
        manifest: Box<Manifest>,
    },
    Reserved(Result<(), DownloadError>),
}

/// What tells two sources apart.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum SourceId {
    Peer(libp2p::PeerId),
    Web(String),
}

fn source_id(origin: &Origin) -> SourceId {
    match origin {
        Origin::Peer(a) => SourceId::Peer(a.peer_id),
        Origin::Web(w) => SourceId::Web(w.base().to_string()),
    }
}

/// One source of a download: where it is, its connection, and what went wrong last.
pub(super) struct Source {
    pub(super) origin: Origin,
    conn: Option<quinn::Connection>,
    /// A web source: the snapshot's directory there (once found), and the proof nodes read.
    web: Option<(String, Arc<super::web::NodeCache>)>,
    pub(super) last_error: Option<String>,
    unauthorized: bool,
    /// The attestations it served with the manifest (at most
    /// [`MAX_ATTESTATIONS`](crate::snapshot::MAX_ATTESTATIONS); they go with its entry).
    pub(super) attestations: Vec<crate::snapshot::Attestation>,
}

/// A source to take on: where it is, and whether it holds part of the snapshot only.
pub(super) type NewPeer = (Origin, Holding);

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
        run.add_source(Origin::Peer(p), Holding::Complete);
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

/// The chunks of `partial` served from the start: those on disk (`done`) whose proof nodes are
/// on disk too.
fn verified_on_disk(partial: &Partial, tree: ChunkTree, done: &Bits) -> Arc<VerifiedChunks> {
    let verified = Arc::new(VerifiedChunks::new(tree.chunk_count()));
    if !partial.derived() {
        for c in 0..tree.chunk_count() {
            if done.get(c as usize) {
                verified.set(c);
            }
        }
    }
    verified
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
        let verified = verified_on_disk(&partial, tree, &done);
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
    fn add_source(&mut self, origin: Origin, holding: Holding) {
        let partial = holding == Holding::Partial;
        let id = source_id(&origin);
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
            web: None,
            last_error: None,
            unauthorized: false,
            attestations: Vec::new(),
        };
        if peer == self.sources.len() {
            self.sources.push(source);
        } else {
            // It takes the entry of a source that delivered nothing.
            let old = std::mem::replace(&mut self.sources[peer], source);
            self.known.remove(&source_id(&old.origin));
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
                    self.sched.handle_abandoned(id);
                    if let Some(r) = self.requests.remove(&id) {
                        r.task.abort();
                        tracing::trace!(target: DOWNLOAD_TARGET, source = %self.sources[r.peer].origin, after_ms = r.sent.elapsed().as_millis() as u64, "request abandoned");
                    }
                }
                Command::AskHave(peer) => self.ask_have(peer),
            }
        }
    }
}
