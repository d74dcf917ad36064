//! The loop of one download: a thin tokio layer over the [`Scheduler`]. It opens the
//! connections and requests the scheduler asks for, feeds their outcomes back, reserves the
//! disk once a peer proved the token and served the advertised manifest, persists progress for
//! resume, moves the verified prefix for a loader, reports progress, and publishes the archive
//! when every chunk is in.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{AbortHandle, JoinSet};

use super::connect::{ConnectError, connect};
use super::fetch::{FetchError, Sink, fetch};
use super::partial::{PART_FILE, Partial};
use super::scheduler::{Action, Failure, PeerFate, PeerIdx, ReqId, Scheduler, Stuck};
use super::{DownloadError, DownloadTarget, Downloaded, Inner, PeerProgress, PeerStatus, Progress};
use crate::chunk::ChunkTree;
use crate::disk::Writeback;
use crate::snapshot::{ARCHIVE_FILE, Manifest, OUTBOARD_FILE, Snapshot, StoreError, Watermark};
use crate::transfer::protocol::close;
use crate::transfer::{DOWNLOAD_TARGET, PeerAddr};

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
        result: Result<(), FetchError>,
    },
    Reserved(Result<(), StoreError>),
}

struct PeerSlot {
    addr: PeerAddr,
    conn: Option<quinn::Connection>,
    last_error: Option<String>,
    unauthorized: bool,
}

/// One download's loop state.
pub(super) struct Run {
    inner: Arc<Inner>,
    target: DownloadTarget,
    tree: ChunkTree,
    partial: Partial,
    sink: Arc<Sink>,
    sched: Scheduler,
    peers: Vec<PeerSlot>,
    manifest: Option<Manifest>,
    /// Whether the files have their full size: until then no chunk is requested.
    reserved: Reserve,
    tasks: Tasks,
    /// Requests under way: their peer, their task, and the end of the chunks they have checked
    /// and written so far.
    requests: HashMap<ReqId, InFlight>,
    events_tx: mpsc::Sender<Event>,
    events_rx: mpsc::Receiver<Event>,
    progress_tx: watch::Sender<Progress>,
    watermark: Arc<Watermark>,
    started: Instant,
    resumed_bytes: u64,
    fetched_bytes: u64,
    persisted_done: u64,
    /// A background persist under way, giving the done bytes it recorded.
    persisting: Option<tokio::task::JoinHandle<Result<u64, StoreError>>>,
    rate: f64,
    last_tick: (Instant, u64),
    _writeback: Writeback,
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
    written: Arc<AtomicU64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reserve {
    No,
    Running,
    Done,
}

impl Run {
    pub(super) async fn start(
        inner: Arc<Inner>,
        target: DownloadTarget,
        peers: Vec<PeerAddr>,
        progress_tx: watch::Sender<Progress>,
        watermark: Arc<Watermark>,
    ) -> Result<Self, DownloadError> {
        let tree = target.tree();
        let max = inner.config.max_chunks;
        if tree.chunk_count() > max {
            return Err(DownloadError::TooManyChunks {
                chunks: tree.chunk_count(),
                max,
            });
        }
        let store = inner.store.clone();
        // Partials of other snapshots stay, within the disk budget.
        let budget = inner.config.partial_budget;
        let root = target.content_root;
        let dir = store.partial_dir(&root);
        let (partial, done) = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || {
                store.trim_partials(&[root], budget)?;
                Partial::open(dir, tree)
            })
            .await
            .map_err(|_| DownloadError::Cancelled)??
        };
        let reserved = if done.ones() > 0 {
            Reserve::Done
        } else {
            Reserve::No
        };
        let now = Instant::now();
        let mut sched = Scheduler::new(
            inner.config.scheduler(target.chunk_size),
            target.archive_size,
            tree.chunk_count(),
            &done,
            now,
        );
        sched.set_paused(reserved != Reserve::Done);
        let resumed_bytes = sched.done_bytes();
        // A loader may start on what a previous run left verified on disk.
        watermark.advance(sched.verified_prefix());
        let clone = |f: &std::fs::File| f.try_clone().map_err(|e| StoreError::at(&dir, e));
        let writeback = Writeback::start(clone(partial.file())?);
        let sink = Arc::new(Sink {
            archive: clone(partial.file())?,
            outboard: clone(partial.outboard())?,
            dir: dir.clone(),
        });
        let capacity = inner.config.max_inflight + 4 * inner.config.max_peers + 64;
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
            reserved,
            tasks: Tasks::default(),
            requests: HashMap::new(),
            events_tx,
            events_rx,
            progress_tx,
            watermark,
            started: now,
            resumed_bytes,
            fetched_bytes: 0,
            persisted_done: resumed_bytes,
            persisting: None,
            rate: 0.0,
            last_tick: (now, resumed_bytes),
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
        // The first update says what was resumed.
        run.publish_progress(false);
        Ok(run)
    }

    fn add_peer(&mut self, addr: PeerAddr) {
        if self.peers.iter().any(|p| p.addr.peer_id == addr.peer_id) {
            return;
        }
        if self.peers.len() >= self.inner.config.max_peers {
            tracing::debug!(target: DOWNLOAD_TARGET, peer = %addr.peer_id, "peer limit of the download reached; not adding");
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

    pub(super) async fn run(
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
            if let Some(stuck) = self.sched.stuck(now) {
                self.persist().await?;
                return Err(self.stuck_error(stuck));
            }
            let deadline = tokio::time::Instant::from_std(self.sched.next_deadline(now));
            tokio::select! {
                biased;
                _ = &mut cancel => {
                    self.close_connections(b"cancelled");
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
                    self.credit_all();
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
                let written = Arc::new(AtomicU64::new(chunks.start));
                let progress = written.clone();
                let task = self.tasks.spawn(async move {
                    let result = fetch(conn, tree, chunks, &sink, stall, &progress).await;
                    let _ = events.send(Event::Fetched { id, result }).await;
                });
                self.requests.insert(
                    id,
                    InFlight {
                        peer,
                        task,
                        written,
                    },
                );
            }
            Action::Cancel(id) => {
                if let Some(r) = self.requests.remove(&id) {
                    r.task.abort();
                }
            }
        }
    }

    /// A peer proved the token and served the advertised manifest: the files get their full
    /// size now (after a free-space check), in the background.
    fn start_reserve(&mut self) {
        if self.reserved != Reserve::No {
            return;
        }
        self.reserved = Reserve::Running;
        let (store, root) = (self.inner.store.clone(), self.target.content_root);
        let headroom = self.inner.config.disk_headroom;
        let events = self.events_tx.clone();
        let partial = Partial::reopen(&self.partial);
        self.tasks.spawn(async move {
            let result = match partial {
                Ok(partial) => tokio::task::spawn_blocking(move || {
                    match partial.reserve(headroom) {
                        Err(StoreError::DiskFull { .. }) => {
                            // Make room from other partial downloads before giving up.
                            store.trim_partials(&[root], 0)?;
                            partial.reserve(headroom)
                        }
                        other => other,
                    }
                })
                .await
                .unwrap_or_else(|_| {
                    Err(StoreError::at(
                        std::path::Path::new("."),
                        std::io::Error::other("reserve aborted"),
                    ))
                }),
                Err(e) => Err(e),
            };
            let _ = events.send(Event::Reserved(result)).await;
        });
    }

    fn handle(&mut self, event: Event) -> Result<(), DownloadError> {
        let now = Instant::now();
        match event {
            Event::Reserved(result) => {
                result?;
                self.reserved = Reserve::Done;
                self.sched.set_paused(false);
                tracing::debug!(target: DOWNLOAD_TARGET, bytes = self.target.archive_size, "disk reserved");
            }
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
                self.start_reserve();
            }
            Event::ConnectFailed { peer, error } => {
                let slot = &mut self.peers[peer];
                tracing::debug!(target: DOWNLOAD_TARGET, peer = %slot.addr.peer_id, addr = %slot.addr.addr, %error, "connect failed");
                if error.is_unauthorized() {
                    slot.unauthorized = true;
                    tracing::warn!(target: DOWNLOAD_TARGET, peer = %slot.addr.peer_id, "peer refused our SNAPSHOT_TOKEN");
                }
                slot.last_error = Some(error.to_string());
                self.sched.on_connect_failed(peer, error.failure(), now);
            }
            Event::Disconnected { peer, conn_id } => {
                self.credit_all();
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
                // What it delivered counts, however it ended.
                self.credit(id);
                let Some(InFlight { peer, .. }) = self.requests.remove(&id) else {
                    return Ok(());
                };
                match result {
                    Ok(()) => {
                        for action in self.sched.on_success(id, now) {
                            self.apply(action);
                        }
                    }
                    Err(FetchError::Corrupt(e)) => {
                        let m = &self.inner.metrics;
                        m.verification_failures.inc();
                        m.peer_bans.inc();
                        let slot = &mut self.peers[peer];
                        tracing::warn!(target: DOWNLOAD_TARGET, peer = %slot.addr.peer_id, error = %e, "peer sent a chunk that does not match the content root; banned for this download");
                        slot.last_error = Some(format!("banned: {e}"));
                        if let Some(conn) = &slot.conn {
                            conn.close(close::DONE, b"bad data");
                        }
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
                banned: (0..self.peers.len())
                    .filter(|i| self.sched.peer_report(*i).fate == PeerFate::Banned)
                    .count(),
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

    /// Counts the chunks request `id` has checked and written so far as on disk.
    fn credit(&mut self, id: ReqId) {
        let Some(r) = self.requests.get(&id) else {
            return;
        };
        let upto = r.written.load(Ordering::Acquire);
        let added = self.sched.on_written(id, upto, Instant::now());
        if added > 0 {
            self.fetched_bytes += added;
            self.inner.metrics.downloaded_bytes.inc_by(added);
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
    /// background, unless that is already under way or nothing is new. The download goes on
    /// meanwhile.
    fn start_persist(&mut self) -> Result<(), DownloadError> {
        self.credit_all();
        let done = self.sched.done_bytes();
        if self.persisting.is_some()
            || done == self.persisted_done
            || self.reserved != Reserve::Done
        {
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
            root: self.target.content_root,
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

    fn close_connections(&self, why: &[u8]) {
        for slot in &self.peers {
            if let Some(conn) = &slot.conn {
                conn.close(close::DONE, why);
            }
        }
    }

    /// Every chunk is in, each checked against the root, and the proofs' nodes make the
    /// outboard: check the outboard is whole, make it all durable and publish it. (A loader
    /// hashes the whole archive against the root as it reads it.)
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
            }
        }
        self.close_connections(b"done");
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
                    let _ = crate::disk::remove_path(&dir);
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
        self.watermark.advance(self.target.archive_size);
        let per_peer: Vec<_> = (0..self.peers.len())
            .map(|i| (self.peers[i].addr.peer_id, self.sched.peer_report(i).bytes))
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
            elapsed,
            per_peer,
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
