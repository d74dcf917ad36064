//! [`SyncJob`]: one sync, from a chosen [`Plan`] to a loaded state, as a child the behaviour
//! polls.
//!
//! Its downloads (a full snapshot, an incremental one, or both, all at once) and its load run
//! side by side: a full snapshot is imported while it arrives, reading only its verified
//! prefix, and an incremental one is applied on top before anything becomes live. An
//! incremental one alone is applied once it has arrived, so the live DB's write lock is held
//! for the apply only.

use std::collections::{HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::BoxStream;
use libp2p::PeerId;

use super::addr::pick_addr;
use super::event::SyncError;
use crate::db::StateDb;
use crate::discovery::{Plan, SyncOutcome, Target};
use crate::snapshot::{
    ArchiveSource, FORMAT_VERSION, HashStage, LoadError, LoadLimits, LoadReport, Manifest,
    SnapshotKey, SnapshotStore,
};
use crate::transfer::{DownloadHandle, DownloadTarget, Downloaded, Downloader, PeerAddr, Progress};

/// What a job reports to the behaviour.
#[derive(Debug)]
pub(crate) enum JobEvent {
    /// A download started (after reading what an earlier attempt left on disk).
    Started {
        key: SnapshotKey,
        peers: Vec<PeerId>,
        resumed_bytes: u64,
    },
    /// A download moved on.
    Progress(Progress),
    /// The job ended.
    Done(Box<Result<Synced, Failed>>),
}

/// A sync that worked.
#[derive(Debug)]
pub(crate) struct Synced {
    pub(crate) report: LoadReport,
    pub(crate) with_full: bool,
    pub(crate) bytes: u64,
    pub(crate) fetched_bytes: u64,
    pub(crate) per_peer: Vec<(PeerId, u64)>,
    pub(crate) elapsed: Duration,
}

/// A sync that failed, and what discovery should make of it.
#[derive(Debug)]
pub(crate) struct Failed {
    pub(crate) error: SyncError,
    pub(crate) outcome: SyncOutcome,
}

/// One download of the job.
struct Leg {
    key: SnapshotKey,
    manifest: Manifest,
    handle: DownloadHandle,
    progress: BoxStream<'static, Progress>,
    peers: HashSet<PeerId>,
    initial: Vec<PeerId>,
    announced: bool,
    done: Option<Downloaded>,
}

/// The manifest a loader checks an advertised snapshot against (its counts bound the load;
/// the archive itself is fixed by its content root).
fn manifest_of(t: &Target) -> Manifest {
    let k = t.ad.key;
    Manifest {
        format_version: FORMAT_VERSION,
        kind: k.kind,
        slot: k.slot,
        bank_hash: k.bank_hash,
        content_root: k.content_root,
        archive_size: k.archive_size,
        chunk_size: t.ad.chunk_size,
        created_unix_ms: 0,
        entry_count: t.ad.entry_count,
        state_bytes: t.ad.state_bytes,
        zstd_level: 0,
        base: k.base,
        zstd_version: 0,
    }
}

/// How the behaviour picks a peer's address.
pub(crate) type AddrOf<'a> = &'a dyn Fn(&PeerId) -> Option<IpAddr>;

/// One sync in progress.
pub(crate) struct SyncJob {
    plan: Plan,
    legs: Vec<Leg>,
    load: Option<tokio::task::JoinHandle<Result<LoadReport, LoadError>>>,
    loaded: Option<LoadReport>,
    db: Arc<dyn StateDb>,
    limits: LoadLimits,
    store: SnapshotStore,
    started: Instant,
    queued: VecDeque<JobEvent>,
    finished: bool,
}

impl SyncJob {
    /// Starts the downloads of `plan` (and, for a full snapshot, its load as it arrives).
    pub(crate) fn start(
        plan: Plan,
        downloader: &Downloader,
        db: Arc<dyn StateDb>,
        store: SnapshotStore,
        limits: LoadLimits,
        addr_of: AddrOf<'_>,
    ) -> Self {
        let legs: Vec<Leg> = plan
            .full
            .iter()
            .chain(&plan.incremental)
            .map(|t| {
                let manifest = manifest_of(t);
                let target = DownloadTarget::from_manifest(&manifest);
                let peers: Vec<PeerAddr> = t
                    .peers
                    .iter()
                    .filter(|(_, addrs)| !addrs.is_empty())
                    .map(|(p, addrs)| PeerAddr {
                        peer_id: *p,
                        addr: pick_addr(addrs, addr_of(p)),
                    })
                    .collect();
                let handle = downloader.start(target, peers.clone());
                let progress = handle.progress_stream();
                Leg {
                    key: t.ad.key,
                    manifest,
                    handle,
                    progress,
                    peers: peers.iter().map(|p| p.peer_id).collect(),
                    initial: peers.iter().map(|p| p.peer_id).collect(),
                    announced: false,
                    done: None,
                }
            })
            .collect();
        let mut job = Self {
            plan,
            legs,
            load: None,
            loaded: None,
            db,
            limits,
            store,
            started: Instant::now(),
            queued: VecDeque::new(),
            finished: false,
        };
        if job.plan.full.is_some() {
            job.start_load();
        }
        job
    }

    /// The plan.
    pub(crate) fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Whether the downloads are done and only the load runs.
    pub(crate) fn loading(&self) -> bool {
        self.legs.iter().all(|l| l.done.is_some())
    }

    /// Adds a peer that advertises one of the job's snapshots.
    pub(crate) fn add_peer(&mut self, key: &SnapshotKey, peer: PeerAddr) {
        if let Some(leg) = self.legs.iter_mut().find(|l| l.key == *key)
            && leg.done.is_none()
            && leg.peers.insert(peer.peer_id)
        {
            leg.handle.add_peer(peer);
        }
    }

    /// Cancels the downloads (their chunks stay on disk for resume) and waits until each has
    /// made its progress durable.
    pub(crate) async fn cancel(mut self) {
        for leg in &mut self.legs {
            leg.handle.cancel();
        }
        // (A leg that ended was awaited already.)
        for leg in self.legs.into_iter().filter(|l| l.done.is_none()) {
            let _ = leg.handle.wait().await;
        }
    }

    fn start_load(&mut self) {
        let sources: Vec<(ArchiveSource, Manifest)> = self
            .legs
            .iter()
            .map(|l| match &l.done {
                Some(d) => (
                    ArchiveSource::file(d.snapshot.archive_path(), l.manifest.archive_size),
                    l.manifest.clone(),
                ),
                None => (l.handle.source(), l.manifest.clone()),
            })
            .collect();
        let (db, limits) = (self.db.clone(), self.limits);
        let has_full = self.plan.full.is_some();
        self.load = Some(tokio::task::spawn_blocking(move || {
            let full = has_full.then(|| (&sources[0].0, &sources[0].1));
            let incremental = sources.get(usize::from(has_full)).map(|(s, m)| (s, m));
            crate::snapshot::load_chain(db.as_ref(), full, incremental, &limits)
        }));
    }

    fn fail(&mut self, error: SyncError, failed: Vec<SnapshotKey>, blame: bool) -> JobEvent {
        for leg in &mut self.legs {
            leg.handle.cancel();
        }
        let not_on = self.not_on(&error);
        self.finished = true;
        JobEvent::Done(Box::new(Err(Failed {
            error,
            outcome: SyncOutcome::Failed {
                failed,
                blame,
                not_on,
            },
        })))
    }

    /// When an incremental snapshot alone did not apply, the node's state is not on its base.
    fn not_on(&self, error: &SyncError) -> Option<SnapshotKey> {
        if self.plan.full.is_some() {
            return None;
        }
        let applies = matches!(
            error,
            SyncError::Load(LoadError::NotApplicable { .. })
                | SyncError::Load(LoadError::BankHashMismatch {
                    stage: HashStage::Applied,
                    ..
                })
        );
        let base = self.plan.incremental.as_ref()?.ad.key.base?;
        applies.then_some(SnapshotKey {
            kind: crate::snapshot::SnapshotKind::Full,
            slot: base.slot,
            bank_hash: base.bank_hash,
            content_root: base.content_root,
            archive_size: 0,
            base: None,
        })
    }

    fn load_failed(&mut self, e: LoadError) -> JobEvent {
        // Which snapshot the failure proves bad: with a full one, what did not check out; an
        // incremental alone that did not apply may be the node's own state's fault.
        let last = self.plan.last().ad.key;
        let (failed, blame) = match &e {
            LoadError::NotApplicable { .. } | LoadError::NoSpace { .. } | LoadError::Db(_) => {
                (vec![last], false)
            }
            LoadError::BankHashMismatch {
                stage: HashStage::Applied,
                ..
            } if self.plan.full.is_none() => (vec![last], false),
            _ => {
                let mut keys = vec![last];
                keys.extend(self.plan.full.as_ref().map(|t| t.ad.key));
                (keys, true)
            }
        };
        if blame {
            // What does not load is not served either.
            for key in &failed {
                if let Some(snap) = self.store.get(&key.content_root) {
                    let _ = self.store.remove(&snap);
                }
            }
        }
        self.fail(SyncError::Load(e), failed, blame)
    }

    /// Drives the job: its downloads' progress and ends, and its load.
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<JobEvent> {
        if let Some(e) = self.queued.pop_front() {
            return Poll::Ready(e);
        }
        if self.finished {
            return Poll::Pending;
        }
        for i in 0..self.legs.len() {
            let leg = &mut self.legs[i];
            // Progress: the first update says what was resumed; later ones are reported as
            // they come (a few per poll).
            for _ in 0..16 {
                match leg.progress.poll_next_unpin(cx) {
                    Poll::Ready(Some(p)) => {
                        if !leg.announced {
                            leg.announced = true;
                            self.queued.push_back(JobEvent::Started {
                                key: leg.key,
                                peers: leg.initial.clone(),
                                resumed_bytes: p.resumed_bytes,
                            });
                        }
                        self.queued.push_back(JobEvent::Progress(p));
                    }
                    _ => break,
                }
            }
            if leg.done.is_none()
                && let Poll::Ready(result) = std::pin::Pin::new(&mut leg.handle).poll(cx)
            {
                match result {
                    Ok(d) => leg.done = Some(d),
                    Err(e) => {
                        let blame = e.proves_bad_data();
                        let key = leg.key;
                        return Poll::Ready(self.fail(SyncError::Download(e), vec![key], blame));
                    }
                }
            }
        }
        if self.load.is_none() && self.loading() {
            self.start_load();
        }
        if let Some(load) = &mut self.load
            && let Poll::Ready(result) = std::pin::Pin::new(load).poll(cx)
        {
            self.load = None;
            match result {
                Ok(Ok(report)) => self.loaded = Some(report),
                Ok(Err(e)) => {
                    // A download that stops makes its load stop too: the download's own error,
                    // which says more, comes next. (Should the download go on, the load is
                    // started again once it is complete.)
                    if self.legs.iter().any(|l| l.done.is_none())
                        && matches!(e, LoadError::Archive(_) | LoadError::Io { .. })
                    {
                        return Poll::Pending;
                    }
                    return Poll::Ready(self.load_failed(e));
                }
                Err(_) => {
                    let last = self.plan.last().ad.key;
                    return Poll::Ready(self.fail(SyncError::Aborted, vec![last], false));
                }
            }
        }
        if let Some(report) = self.loaded
            && self.loading()
        {
            self.finished = true;
            let mut per_peer: Vec<(PeerId, u64)> = Vec::new();
            let (mut bytes, mut fetched) = (0, 0);
            for d in self.legs.iter().filter_map(|l| l.done.as_ref()) {
                bytes += d.snapshot.manifest().archive_size;
                fetched += d.fetched_bytes;
                for (p, b) in &d.per_peer {
                    match per_peer.iter_mut().find(|(q, _)| q == p) {
                        Some(e) => e.1 += b,
                        None => per_peer.push((*p, *b)),
                    }
                }
            }
            return Poll::Ready(JobEvent::Done(Box::new(Ok(Synced {
                report,
                with_full: self.plan.full.is_some(),
                bytes,
                fetched_bytes: fetched,
                per_peer,
                elapsed: self.started.elapsed(),
            }))));
        }
        match self.queued.pop_front() {
            Some(e) => Poll::Ready(e),
            None => Poll::Pending,
        }
    }
}
