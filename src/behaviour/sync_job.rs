//! [`SyncJob`]: one sync, from a chosen plan to a loaded state, as a child the behaviour polls.
//!
//! Its downloads (a full snapshot, an incremental one, or both, all at once) and its load run
//! side by side: a full snapshot is imported while it arrives, reading only its verified
//! prefix, and an incremental one is applied on top before anything becomes live. An
//! incremental one alone is applied once it has arrived, so the live DB's write lock is held
//! for the apply only. The load reads each snapshot against the manifest its download checked.
//!
//! The job holds no copy of the plan (discovery keeps the one copy): only what each download
//! needs. How it ended is reported as facts (which leg, what kind of failure, which peers sent
//! bytes proven wrong); discovery judges what follows.
//!
//! Record counts no policy vouched for bound nothing: the load is bounded by its limits and
//! the disk, and once it is done, a manifest that declared other counts than its archive holds
//! is corrected in the store (so the node never serves it on) and its peer is struck.
//!
//! Cancelling stops the load within one segment and waits for it: nothing is swapped in after
//! a cancel returns, and no second import runs beside the first.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::BoxStream;
use libp2p::PeerId;

use super::event::SyncError;
use crate::db::{StateCheck, StateDb};
use crate::discovery::{Failure, LegKind, Plan, SyncFailure, Target};
use crate::log::DISCOVERY as TARGET;
use crate::snapshot::{
    ArchiveSource, Attestation, HashStage, LoadError, LoadLimits, LoadReport, Loaded, Manifest,
    SnapshotKey, SnapshotKind, SnapshotStore, load_chain_legs,
};
use crate::transfer::{
    DownloadError, DownloadHandle, DownloadTarget, Downloaded, Downloader, Holding, Origin,
    PeerAddr, PeerStatus, Progress,
};

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
    /// The job ended: the plan's last snapshot is live.
    Synced(Box<Synced>),
    /// The job ended: it failed.
    Failed(Box<Failed>),
}

/// A sync that worked.
#[derive(Debug)]
pub(crate) struct Synced {
    pub(crate) report: LoadReport,
    pub(crate) with_full: bool,
    pub(crate) bytes: u64,
    pub(crate) fetched_bytes: u64,
    pub(crate) served_bytes: u64,
    pub(crate) per_peer: Vec<(PeerId, u64)>,
    pub(crate) elapsed: Duration,
    /// Peers that sent chunks proven wrong on the way (the others served the rest).
    pub(crate) bad_peers: Vec<PeerId>,
    /// The lists of attestations the sources served with each snapshot's manifest (claims).
    pub(crate) served_attestations: Vec<(SnapshotKey, Vec<Vec<Attestation>>)>,
}

/// A sync that failed: the snapshot it was syncing to, why, and the facts discovery judges.
#[derive(Debug)]
pub(crate) struct Failed {
    pub(crate) key: SnapshotKey,
    pub(crate) error: SyncError,
    pub(crate) outcome: SyncFailure,
}

/// One download of the job.
struct Leg {
    kind: LegKind,
    key: SnapshotKey,
    counts_vouched: bool,
    /// Trusted peers' attestations of it, stored with it once it is loaded.
    attestations: Vec<Attestation>,
    handle: DownloadHandle,
    progress: BoxStream<'static, Progress>,
    initial: Vec<PeerId>,
    /// The sources sent to the download, as complete or partial holders: each is sent again
    /// only when it holds more (discovery hears each holder every round).
    sent: lru::LruCache<PeerId, Holding>,
    /// The identities the web sources stand as, by base URL (to credit their bytes).
    web_ids: Vec<(String, PeerId)>,
    announced: bool,
    done: Option<Downloaded>,
}

impl Leg {
    fn start(
        kind: LegKind,
        target: &Target,
        downloader: &Downloader,
        addr_of: &mut dyn FnMut(PeerId, &[SocketAddr]) -> Option<Origin>,
    ) -> Self {
        let mut peers: Vec<PeerAddr> = Vec::new();
        let mut others: Vec<(PeerId, Origin, Holding)> = Vec::new();
        for (p, addrs) in &target.peers {
            match addr_of(*p, addrs) {
                Some(Origin::Peer(a)) => peers.push(a),
                // A web source (with the feature `web`).
                #[allow(unreachable_patterns)]
                Some(other) => others.push((*p, other, Holding::Complete)),
                None => {}
            }
        }
        // Peers downloading it too, as sources of what they verified.
        for (p, addrs) in &target.partial_peers {
            if let Some(origin @ Origin::Peer(_)) = addr_of(*p, addrs) {
                others.push((*p, origin, Holding::Partial));
            }
        }
        let handle = downloader.start(
            DownloadTarget::of(&target.ad, target.counts_vouched, target.vouched),
            peers.clone(),
        );
        let progress = handle.progress_stream();
        // The identities the web sources stand as, by base URL (to credit their bytes).
        let web_ids = others
            .iter()
            .filter_map(|(p, origin, _)| Some((origin.web_base()?.to_string(), *p)))
            .collect();
        let mut sent = lru::LruCache::new(MAX_SENT);
        for p in &peers {
            sent.put(p.peer_id, Holding::Complete);
        }
        for (p, origin, holding) in others {
            if handle.add_source(origin, holding) {
                sent.put(p, holding);
            }
        }
        let initial: Vec<PeerId> = peers.iter().map(|p| p.peer_id).collect();
        Leg {
            kind,
            key: target.ad.key,
            counts_vouched: target.counts_vouched,
            attestations: target.attestations.clone(),
            handle,
            progress,
            initial,
            sent,
            web_ids,
            announced: false,
            done: None,
        }
    }

    /// The manifest its download checked, once it has one.
    fn manifest(&self) -> Option<Manifest> {
        match &self.done {
            Some(d) => Some(d.snapshot.manifest().clone()),
            None => self.handle.manifest(),
        }
    }

    /// What a loader reads: the published file once downloaded, else the arriving bytes.
    fn source(&self, manifest: &Manifest) -> ArchiveSource {
        match &self.done {
            Some(d) => ArchiveSource::file(d.snapshot.archive_path(), manifest.archive_size),
            None => self.handle.source(),
        }
    }

    /// Peers the download banned for chunks that did not match the content root.
    fn banned(&self) -> Vec<PeerId> {
        self.handle
            .progress()
            .borrow()
            .peers
            .iter()
            .filter(|p| p.status == PeerStatus::Banned)
            .map(|p| p.peer_id)
            .collect()
    }
}

/// Most sources a leg remembers having sent to its download.
const MAX_SENT: std::num::NonZeroUsize = std::num::NonZeroUsize::new(1024).expect("nonzero");

type LoadTask = tokio::task::JoinHandle<Result<Loaded, (SnapshotKind, LoadError)>>;

/// One sync in progress.
pub(crate) struct SyncJob {
    legs: Vec<Leg>,
    load: Option<LoadTask>,
    loaded: Option<Loaded>,
    /// Set to stop the load.
    stop: Arc<AtomicBool>,
    db: Arc<dyn StateDb>,
    store: SnapshotStore,
    /// The network attestations are checked for.
    network: String,
    limits: LoadLimits,
    check: Option<Arc<dyn StateCheck>>,
    started: Instant,
    queued: std::collections::VecDeque<JobEvent>,
    finished: bool,
}

impl SyncJob {
    /// Starts the downloads of `plan`; `addr_of` picks each peer's chunk-stream address.
    pub(crate) fn start(
        plan: &Plan,
        downloader: &Downloader,
        db: Arc<dyn StateDb>,
        (store, network): (SnapshotStore, &str),
        (limits, check): (LoadLimits, Option<Arc<dyn StateCheck>>),
        addr_of: &mut dyn FnMut(PeerId, &[SocketAddr]) -> Option<Origin>,
    ) -> Self {
        let mut legs = Vec::new();
        if let Some(t) = &plan.full {
            legs.push(Leg::start(LegKind::Full, t, downloader, addr_of));
        }
        if let Some(t) = &plan.incremental {
            legs.push(Leg::start(LegKind::Incremental, t, downloader, addr_of));
        }
        Self {
            legs,
            load: None,
            loaded: None,
            stop: Arc::new(AtomicBool::new(false)),
            db,
            store,
            network: network.to_string(),
            limits,
            check,
            started: Instant::now(),
            queued: Default::default(),
            finished: false,
        }
    }

    fn has_full(&self) -> bool {
        self.legs.first().is_some_and(|l| l.kind == LegKind::Full)
    }

    /// The snapshot the node ends at.
    fn last_key(&self) -> SnapshotKey {
        self.legs.last().expect("a plan fetches something").key
    }

    /// Whether the downloads are done and only the load runs.
    pub(crate) fn loading(&self) -> bool {
        self.legs.iter().all(|l| l.done.is_some())
    }

    /// Adds `peer`, a source of one of the job's snapshots, to its download, unless it was
    /// added already holding as much.
    pub(crate) fn add_source(
        &mut self,
        key: &SnapshotKey,
        peer: PeerId,
        origin: Origin,
        holding: Holding,
    ) {
        let Some(leg) = self.legs.iter_mut().find(|l| l.key == *key) else {
            return;
        };
        let known = leg.sent.get(&peer).copied();
        if leg.done.is_some() || known == Some(Holding::Complete) || known == Some(holding) {
            return;
        }
        if leg.handle.add_source(origin, holding) {
            leg.sent.put(peer, holding);
        }
    }

    /// Cancels the downloads (their chunks stay on disk for resume) and the load, and waits
    /// until each download has made its progress durable and the load has stopped: once this
    /// returns, nothing of the job touches the DB.
    pub(crate) async fn cancel(mut self) {
        self.stop.store(true, Ordering::Release);
        for leg in &mut self.legs {
            leg.handle.cancel();
        }
        // (A leg that ended was awaited already.)
        for leg in self.legs.into_iter().filter(|l| l.done.is_none()) {
            let _ = leg.handle.wait().await;
        }
        if let Some(load) = self.load.take() {
            let _ = load.await;
        }
    }

    /// Starts the load once every download has its checked manifest: a full snapshot is loaded
    /// as it arrives; an incremental one alone once it has arrived.
    fn start_load(&mut self) {
        if self.load.is_some() || self.loaded.is_some() || (!self.has_full() && !self.loading()) {
            return;
        }
        let Some(manifests) = self
            .legs
            .iter()
            .map(Leg::manifest)
            .collect::<Option<Vec<Manifest>>>()
        else {
            return;
        };
        let sources: Vec<(ArchiveSource, Manifest)> = self
            .legs
            .iter()
            .zip(manifests)
            .map(|(l, m)| (l.source(&m), m))
            .collect();
        let limits = if self.legs.iter().all(|l| l.counts_vouched) {
            self.limits
        } else {
            self.limits.ignoring_declared_counts()
        };
        let (db, stop, has_full) = (self.db.clone(), self.stop.clone(), self.has_full());
        let check = self.check.clone();
        self.load = Some(tokio::task::spawn_blocking(move || {
            let full = has_full.then(|| (&sources[0].0, &sources[0].1));
            let incremental = sources.get(usize::from(has_full)).map(|(s, m)| (s, m));
            let check = check.as_deref();
            load_chain_legs(db.as_ref(), full, incremental, &limits, Some(&stop), check)
        }));
    }

    fn fail(&mut self, leg: LegKind, error: SyncError, failure: Failure) -> JobEvent {
        for l in &mut self.legs {
            l.handle.cancel();
        }
        self.finished = true;
        let bad_peers = self.legs.iter().flat_map(Leg::banned).collect();
        JobEvent::Failed(Box::new(Failed {
            key: self.last_key(),
            error,
            outcome: SyncFailure {
                leg,
                failure,
                bad_peers,
            },
        }))
    }

    /// Reports a download's progress: the first update says what was resumed; later ones are
    /// reported as they come (a few per poll).
    fn poll_progress(&mut self, cx: &mut Context<'_>) {
        for leg in &mut self.legs {
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
        }
    }

    /// A download that ended; `Some` when the job fails with it.
    fn poll_downloads(&mut self, cx: &mut Context<'_>) -> Option<JobEvent> {
        for i in 0..self.legs.len() {
            let leg = &mut self.legs[i];
            if leg.done.is_none()
                && let Poll::Ready(result) = std::pin::Pin::new(&mut leg.handle).poll(cx)
            {
                match result {
                    Ok(d) => leg.done = Some(d),
                    Err(e) => {
                        let (kind, failure) = (leg.kind, download_failure(&e));
                        return Some(self.fail(kind, SyncError::Download(e), failure));
                    }
                }
            }
        }
        None
    }

    /// The load, once it ends; `Some` when the job fails with it.
    fn poll_load(&mut self, cx: &mut Context<'_>) -> Option<JobEvent> {
        let load = self.load.as_mut()?;
        let Poll::Ready(result) = std::pin::Pin::new(load).poll(cx) else {
            return None;
        };
        self.load = None;
        match result {
            Ok(Ok(loaded)) => {
                self.loaded = Some(loaded);
                None
            }
            // A download that stops makes its load stop too: the download's own error, which
            // says more, comes next. (Should the download go on, the load is started again
            // once it is complete.)
            Ok(Err((_, LoadError::Archive(_) | LoadError::Io { .. })))
                if self.legs.iter().any(|l| l.done.is_none()) =>
            {
                None
            }
            Ok(Err((kind, e))) => {
                let leg = match kind {
                    SnapshotKind::Full => LegKind::Full,
                    SnapshotKind::Incremental => LegKind::Incremental,
                };
                let failure = load_failure(&e, self.has_full());
                Some(self.fail(leg, SyncError::Load(e), failure))
            }
            Err(_) => {
                let leg = self.legs.last().expect("a leg").kind;
                Some(self.fail(leg, SyncError::Aborted, Failure::Aborted))
            }
        }
    }

    /// Corrects the stored manifests whose counts the archives contradict, and names the peers
    /// that served them.
    fn correct_counts(&self, loaded: &Loaded) -> Vec<PeerId> {
        let mut liars = Vec::new();
        for (leg, (_, entries, state_bytes)) in self.legs.iter().zip(&loaded.counts) {
            let Some(done) = &leg.done else { continue };
            let m = done.snapshot.manifest();
            if (m.entry_count, m.state_bytes) == (*entries, *state_bytes) {
                continue;
            }
            tracing::warn!(target: TARGET, slot = m.slot, declared = m.entry_count, held = entries, "a peer served a manifest whose record counts its archive contradicts; correcting it");
            if let Err(e) = self
                .store
                .correct_counts(&m.content_root, *entries, *state_bytes)
            {
                tracing::warn!(target: TARGET, error = %e, "could not correct a manifest; removing the snapshot");
                let _ = self.store.remove(&done.snapshot);
            }
            liars.extend(leg.handle.manifest_from());
        }
        liars
    }

    /// Stores the trusted peers' attestations with the snapshots loaded, for this node to relay.
    fn keep_attestations(&self) {
        for leg in self.legs.iter().filter(|l| !l.attestations.is_empty()) {
            let root = leg.key.content_root;
            if let Err(e) = self.store.attest(&root, &self.network, &leg.attestations) {
                tracing::warn!(target: TARGET, slot = leg.key.slot, error = %e, "could not store the snapshot's attestations");
            }
        }
    }

    fn synced(&mut self, loaded: Loaded) -> JobEvent {
        self.finished = true;
        let report = loaded.report;
        let mut bad_peers: Vec<PeerId> = self.legs.iter().flat_map(Leg::banned).collect();
        bad_peers.extend(self.correct_counts(&loaded));
        self.keep_attestations();
        let mut per_peer: Vec<(PeerId, u64)> = Vec::new();
        let (mut bytes, mut fetched, mut served) = (0, 0, 0);
        for leg in &self.legs {
            let Some(d) = leg.done.as_ref() else { continue };
            bytes += d.snapshot.manifest().archive_size;
            fetched += d.fetched_bytes;
            served += d.served_bytes;
            // Web sources are credited under the identities they stand as.
            let web = d.per_web.iter().filter_map(|(url, b)| {
                let (_, p) = leg.web_ids.iter().find(|(u, _)| u == url)?;
                Some((*p, *b))
            });
            for (p, b) in d.per_peer.iter().copied().chain(web) {
                match per_peer.iter_mut().find(|(q, _)| *q == p) {
                    Some(e) => e.1 += b,
                    None => per_peer.push((p, b)),
                }
            }
        }
        JobEvent::Synced(Box::new(Synced {
            report,
            with_full: self.has_full(),
            bytes,
            fetched_bytes: fetched,
            served_bytes: served,
            per_peer,
            elapsed: self.started.elapsed(),
            bad_peers,
            served_attestations: (self.legs.iter())
                .filter_map(|l| Some((l.key, l.done.as_ref()?.attestations.clone())))
                .filter(|(_, list)| !list.is_empty())
                .collect(),
        }))
    }

    /// Drives the job: its downloads' progress and ends, and its load.
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<JobEvent> {
        if let Some(e) = self.queued.pop_front() {
            return Poll::Ready(e);
        }
        if self.finished {
            return Poll::Pending;
        }
        self.poll_progress(cx);
        if let Some(failed) = self.poll_downloads(cx) {
            return Poll::Ready(failed);
        }
        self.start_load();
        if let Some(failed) = self.poll_load(cx) {
            return Poll::Ready(failed);
        }
        if self.loaded.is_some() && self.loading() {
            let loaded = self.loaded.take().expect("checked");
            return Poll::Ready(self.synced(loaded));
        }
        match self.queued.pop_front() {
            Some(e) => Poll::Ready(e),
            None => Poll::Pending,
        }
    }
}

/// Whose fault a failed download is.
fn download_failure(e: &DownloadError) -> Failure {
    match e {
        DownloadError::Unauthorized { .. } => Failure::Unauthorized,
        DownloadError::Store(_)
        | DownloadError::Corrupted { .. }
        | DownloadError::Config(_)
        | DownloadError::Endpoint(_) => Failure::Local,
        DownloadError::Cancelled => Failure::Aborted,
        _ => Failure::Unavailable,
    }
}

/// Whose fault a failed load is. Every byte loaded was checked against the content root as it
/// arrived: what the archive says is what its advertisers vouched for.
fn load_failure(e: &LoadError, with_full: bool) -> Failure {
    match e {
        LoadError::NotApplicable { .. }
        | LoadError::BankHashMismatch {
            stage: HashStage::Applied,
            ..
        } if !with_full => Failure::NotOnBase,
        LoadError::Archive(crate::snapshot::ArchiveError::Io(_)) => Failure::Local,
        LoadError::Archive(_)
        | LoadError::SlotMismatch { .. }
        | LoadError::ManifestMismatch(_)
        | LoadError::BankHashMismatch { .. }
        | LoadError::NotApplicable { .. } => Failure::Content,
        // The bytes were verified on arrival: a file that no longer hashes to its root, or has
        // another size, was damaged here.
        LoadError::ContentRootMismatch { .. }
        | LoadError::SizeMismatch { .. }
        | LoadError::Io { .. }
        | LoadError::NoSpace { .. }
        | LoadError::Db(_)
        | LoadError::Nothing => Failure::Local,
        LoadError::Stopped => Failure::Aborted,
        LoadError::StateRefused { .. } => Failure::NotTheChain,
        LoadError::StateUndecided { .. } => Failure::Undecided,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::BankHash;

    #[test]
    fn failures_are_judged_by_whose_bytes_they_prove_wrong() {
        let hash = BankHash([1; 32]);
        let applied = LoadError::BankHashMismatch {
            stage: HashStage::Applied,
            expected: hash,
            actual: hash,
        };
        assert_eq!(load_failure(&applied, false), Failure::NotOnBase);
        assert_eq!(load_failure(&applied, true), Failure::Content);
        let records = LoadError::BankHashMismatch {
            stage: HashStage::Records,
            expected: hash,
            actual: hash,
        };
        assert_eq!(load_failure(&records, false), Failure::Content);
        let io = LoadError::Io {
            path: "x".into(),
            source: std::io::Error::other("disk"),
        };
        assert_eq!(load_failure(&io, true), Failure::Local);
        let space = LoadError::NoSpace {
            needed: 2,
            available: 1,
        };
        assert_eq!(load_failure(&space, true), Failure::Local);
        let refused = LoadError::StateRefused {
            slot: 1,
            reason: "another root".into(),
        };
        assert_eq!(load_failure(&refused, false), Failure::NotTheChain);
        let undecided = LoadError::StateUndecided {
            slot: 1,
            reason: "behind".into(),
        };
        assert_eq!(load_failure(&undecided, true), Failure::Undecided);
        assert_eq!(
            download_failure(&DownloadError::Unauthorized { peers: 1 }),
            Failure::Unauthorized
        );
        assert_eq!(
            download_failure(&DownloadError::NoProgress(Duration::from_secs(1))),
            Failure::Unavailable
        );
    }
}
