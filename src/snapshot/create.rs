//! Creating snapshots: [`create_snapshot`] (a full one, now), [`create_incremental`] (what
//! changed since a full one) and [`Creator`] (every `range_for_snapshot` slots in the
//! background: full ones at full-snapshot slots, incremental ones between them, with retention).

use std::fs::File;
use std::future::Future;
use std::io::{self, BufWriter};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use futures::channel::oneshot;

use crate::chunk::{ChunkSize, TreeBuilder, TreeWriter};
use crate::db::{DbError, StateDb, StateView, VisitError};
use crate::disk::WritebackFile;
use crate::snapshot::archive::{
    ArchiveReader, ArchiveWriter, DEFAULT_ZSTD_LEVEL, Header, SnapshotKind,
};
use crate::snapshot::manifest::{Base, zstd_version};
use crate::snapshot::store::{ARCHIVE_FILE, IoAt, OUTBOARD_FILE, Retention, now_unix_ms};
use crate::snapshot::{FORMAT_VERSION, Manifest, Snapshot, SnapshotStore, StoreError};

/// Log target of creation.
const TARGET: &str = crate::log::DISCOVERY;

/// Default number of slots between two snapshots (the design's `RangeForSnapshot`).
pub const DEFAULT_RANGE_FOR_SNAPSHOT: u64 = 50;

/// Default number of slots between two full snapshots: 25,000 slots, as Agave's incremental
/// snapshot scheme uses, is about 2.8 hours at 400 ms slots. With two full snapshots kept, a full
/// snapshot is served for at least that long after the next one appears: long enough to download
/// 1 TiB at 1 Gbit/s (about 2.4 hours), so a download of a large state is not left without a
/// source half-way.
pub const DEFAULT_FULL_INTERVAL: u64 = 25_000;

/// A snapshot could not be created. Nothing was published and existing snapshots are intact.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CreateError {
    /// Writing to the snapshot directory failed (not writable, disk full, other I/O).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Reading the state failed.
    #[error("reading the state: {0}")]
    Db(#[from] DbError),
    /// The DB has never been advanced to a slot: there is nothing to snapshot.
    #[error("the state DB holds no slot yet; nothing to snapshot")]
    NoState,
    /// The DB's view broke the [`StateView::visit`] contract (keys not ascending, too large).
    #[error("the state DB's view is not canonical: {0}")]
    NotCanonical(#[source] io::Error),
    /// The base of an incremental snapshot does not fit: not a full snapshot, not below the
    /// state's slot, or its archive cannot be read for the comparison.
    #[error("cannot make an incremental snapshot on this base: {0}")]
    BadBase(String),
    /// The background creation ended without a result (its thread panicked).
    #[error("snapshot creation was aborted")]
    Aborted,
}

/// How archives are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct CreateOptions {
    chunk_size: ChunkSize,
    zstd_level: i32,
}

impl Default for CreateOptions {
    fn default() -> Self {
        Self {
            chunk_size: ChunkSize::DEFAULT,
            zstd_level: DEFAULT_ZSTD_LEVEL,
        }
    }
}

impl CreateOptions {
    /// The chunk size the archive is served and checked in.
    pub fn with_chunk_size(mut self, value: ChunkSize) -> Self {
        self.chunk_size = value;
        self
    }

    /// The value [`with_chunk_size`](Self::with_chunk_size) sets.
    pub fn chunk_size(&self) -> ChunkSize {
        self.chunk_size
    }

    /// The zstd level (1 to 22; higher is smaller and slower). Part of what makes archives
    /// byte-identical across nodes: every node of a network must use the same level.
    pub fn with_zstd_level(mut self, value: i32) -> Self {
        self.zstd_level = value;
        self
    }

    /// The value [`with_zstd_level`](Self::with_zstd_level) sets.
    pub fn zstd_level(&self) -> i32 {
        self.zstd_level
    }
}

/// The archive, its outboard and its manifest, written into a staging directory and published.
struct Writing {
    staging: crate::snapshot::store::StagingDir,
    archive_path: std::path::PathBuf,
    outboard_path: std::path::PathBuf,
    writer: ArchiveWriter<TreeWriter<BufWriter<WritebackFile>, BufWriter<File>>>,
}

impl Writing {
    fn start(
        store: &SnapshotStore,
        header: Header,
        options: &CreateOptions,
    ) -> Result<Self, CreateError> {
        let staging = store.staging()?;
        let archive_path = staging.path().join(ARCHIVE_FILE);
        let outboard_path = staging.path().join(OUTBOARD_FILE);
        // The archive and its outboard are written in the same pass: the writer thread hashes
        // the compressed bytes into the BLAKE3 tree as it writes them.
        let archive = File::create(&archive_path).at(&archive_path)?;
        let outboard = File::create(&outboard_path).at(&outboard_path)?;
        let out = TreeWriter {
            inner: BufWriter::with_capacity(1 << 20, WritebackFile::new(archive)),
            tree: TreeBuilder::new(
                options.chunk_size,
                BufWriter::with_capacity(1 << 16, outboard),
            ),
        };
        let writer = ArchiveWriter::new(out, header, options.zstd_level).at(&archive_path)?;
        Ok(Self {
            staging,
            archive_path,
            outboard_path,
            writer,
        })
    }

    fn visit_error(&self, e: VisitError) -> CreateError {
        match e {
            VisitError::Db(e) => CreateError::Db(e),
            VisitError::Visitor(e) if e.kind() == io::ErrorKind::InvalidInput => {
                CreateError::NotCanonical(e)
            }
            VisitError::Visitor(e) => StoreError::at(&self.archive_path, e).into(),
        }
    }

    fn finish(
        self,
        store: &SnapshotStore,
        bank_hash: crate::hash::BankHash,
        base: Option<Base>,
        options: &CreateOptions,
    ) -> Result<Arc<Snapshot>, CreateError> {
        let Writing {
            staging,
            archive_path,
            outboard_path,
            writer,
        } = self;
        let (out, summary) = writer.finish(bank_hash).at(&archive_path)?;
        let TreeWriter { inner, tree } = out;
        let (content_root, archive_size, outboard) = tree.finish().at(&outboard_path)?;
        let archive = inner
            .into_inner()
            .map_err(|e| StoreError::at(&archive_path, e.into_error()))?;
        archive.sync().at(&archive_path)?;
        outboard
            .into_inner()
            .map_err(|e| StoreError::at(&outboard_path, e.into_error()))?
            .sync_all()
            .at(&outboard_path)?;
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            kind: summary.header.kind,
            slot: summary.header.slot,
            bank_hash,
            content_root,
            archive_size,
            chunk_size: options.chunk_size,
            created_unix_ms: now_unix_ms(),
            entry_count: summary.record_count,
            state_bytes: summary.state_bytes,
            zstd_level: options.zstd_level,
            base,
            zstd_version: zstd_version(),
        };
        Ok(staging.publish(store, manifest)?)
    }
}

/// Writes a full snapshot of `view` into `store` and publishes it atomically (see
/// [`SnapshotStore`]). Blocking; runs in bounded memory whatever the state size. If a full
/// snapshot of the same slot is already published, returns it without writing another.
pub fn create_snapshot(
    store: &SnapshotStore,
    view: &dyn StateView,
    options: &CreateOptions,
) -> Result<Arc<Snapshot>, CreateError> {
    let slot = view.slot().ok_or(CreateError::NoState)?;
    let _span = tracing::info_span!(target: TARGET, "create_snapshot", slot).entered();
    if let Some(existing) = store
        .list()
        .into_iter()
        .find(|s| s.manifest().slot == slot && s.manifest().is_full())
    {
        return Ok(existing);
    }
    let started = Instant::now();
    let bank_hash = view.bank_hash()?;
    let mut writing = Writing::start(store, Header::full(slot), options)?;
    let writer = &mut writing.writer;
    let visited = view.visit(&mut |k, v| writer.push(k, Some(v)));
    if let Err(e) = visited {
        return Err(writing.visit_error(e));
    }
    let snap = writing.finish(store, bank_hash, None, options)?;
    let m = snap.manifest();
    tracing::info!(
        target: TARGET,
        kind = "full",
        slot,
        bank_hash = %m.bank_hash.short(),
        root = %m.content_root.short(),
        entries = m.entry_count,
        bytes = m.archive_size,
        secs = started.elapsed().as_secs_f64(),
        "snapshot created"
    );
    Ok(snap)
}

/// Writes an incremental snapshot of `view` on the full snapshot `base`: every key written
/// since the base's slot, with its value in `view` or a deletion. Costs time proportional to
/// the keys written since the base when the DB can list them
/// ([`StateView::visit_touched_since`]); otherwise compares `view` with the base's archive,
/// in time proportional to the state (the archive then holds only the keys whose value
/// differs, so it may differ from the one a DB that lists written keys makes).
pub fn create_incremental(
    store: &SnapshotStore,
    view: &dyn StateView,
    base: &Snapshot,
    options: &CreateOptions,
) -> Result<Arc<Snapshot>, CreateError> {
    let slot = view.slot().ok_or(CreateError::NoState)?;
    let bm = base.manifest();
    if !bm.is_full() || bm.slot >= slot {
        return Err(CreateError::BadBase(format!(
            "base at slot {} ({}) for a state at slot {slot}",
            bm.slot, bm.kind
        )));
    }
    let _span =
        tracing::info_span!(target: TARGET, "create_incremental", slot, base = bm.slot).entered();
    if let Some(existing) = store.list().into_iter().find(|s| {
        let m = s.manifest();
        m.slot == slot && m.base.is_some_and(|b| b.content_root == bm.content_root)
    }) {
        return Ok(existing);
    }
    let started = Instant::now();
    let bank_hash = view.bank_hash()?;
    let header = Header::incremental(slot, bm.slot, bm.bank_hash);
    let mut writing = Writing::start(store, header, options)?;
    let writer = &mut writing.writer;
    let known = view.visit_touched_since(bm.slot, &mut |k, v| writer.push(k, v));
    let by = match known {
        Ok(true) => "written keys",
        Ok(false) => {
            compare_with_base(view, base, writer).map_err(|e| match e {
                Compared::Visit(e) => writing.visit_error(e),
                Compared::Base(e) => CreateError::BadBase(e),
            })?;
            "full comparison"
        }
        Err(e) => return Err(writing.visit_error(e)),
    };
    let snap = writing.finish(
        store,
        bank_hash,
        Some(Base {
            slot: bm.slot,
            bank_hash: bm.bank_hash,
            content_root: bm.content_root,
        }),
        options,
    )?;
    let m = snap.manifest();
    tracing::info!(
        target: TARGET,
        kind = "incremental",
        slot,
        base = bm.slot,
        by,
        bank_hash = %m.bank_hash.short(),
        root = %m.content_root.short(),
        entries = m.entry_count,
        bytes = m.archive_size,
        secs = started.elapsed().as_secs_f64(),
        "snapshot created"
    );
    Ok(snap)
}

enum Compared {
    Visit(VisitError),
    Base(String),
}

/// The fallback of [`create_incremental`]: merges the base's archive with `view`, both in key
/// order, and writes every difference.
fn compare_with_base<W: io::Write + Send + 'static>(
    view: &dyn StateView,
    base: &Snapshot,
    writer: &mut ArchiveWriter<W>,
) -> Result<(), Compared> {
    let file = File::open(base.archive_path())
        .map_err(|e| Compared::Base(format!("{}: {e}", base.archive_path().display())))?;
    let mut old = ArchiveReader::new(io::BufReader::with_capacity(1 << 20, file))
        .map_err(|e| Compared::Base(e.to_string()))?;
    let base_error = |e: crate::snapshot::archive::ArchiveError| {
        io::Error::new(io::ErrorKind::InvalidData, format!("base archive: {e}"))
    };
    // The base's current record, owned, since the reader lends one record at a time.
    let mut pending: Option<(Vec<u8>, Vec<u8>)> = old
        .next_record()
        .map_err(|e| Compared::Base(e.to_string()))?
        .map(|r| (r.key.to_vec(), r.value.unwrap_or_default().to_vec()));
    let visited = view.visit(&mut |k, v| {
        loop {
            match &pending {
                Some((bk, _)) if bk.as_slice() < k => {
                    writer.push(bk, None)?;
                }
                Some((bk, bv)) if bk.as_slice() == k => {
                    if bv.as_slice() != v {
                        writer.push(k, Some(v))?;
                    }
                    pending = None;
                    break;
                }
                _ => {
                    writer.push(k, Some(v))?;
                    return Ok(());
                }
            }
            pending = old
                .next_record()
                .map_err(base_error)?
                .map(|r| (r.key.to_vec(), r.value.unwrap_or_default().to_vec()));
        }
        pending = old
            .next_record()
            .map_err(base_error)?
            .map(|r| (r.key.to_vec(), r.value.unwrap_or_default().to_vec()));
        Ok(())
    });
    visited.map_err(Compared::Visit)?;
    while let Some((bk, _)) = pending.take() {
        writer
            .push(&bk, None)
            .map_err(|e| Compared::Visit(VisitError::Visitor(e)))?;
        pending = old
            .next_record()
            .map_err(|e| Compared::Base(e.to_string()))?
            .map(|r| (r.key.to_vec(), r.value.unwrap_or_default().to_vec()));
    }
    Ok(())
}

/// Settings of a [`Creator`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct CreatorConfig {
    range_for_snapshot: u64,
    full_interval: u64,
    retention: Retention,
    options: CreateOptions,
}

impl Default for CreatorConfig {
    fn default() -> Self {
        Self {
            range_for_snapshot: DEFAULT_RANGE_FOR_SNAPSHOT,
            full_interval: DEFAULT_FULL_INTERVAL,
            retention: Retention::default(),
            options: CreateOptions::default(),
        }
    }
}

/// A [`CreatorConfig`] value is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CreatorConfigError {
    /// `range_for_snapshot` is zero.
    #[error("range_for_snapshot must be at least 1 slot")]
    ZeroRange,
    /// `full_interval` is not a positive multiple of `range_for_snapshot`.
    #[error("full_interval {full} must be a positive multiple of range_for_snapshot {range}")]
    FullInterval {
        /// The full interval.
        full: u64,
        /// The range.
        range: u64,
    },
    /// No full snapshot would be kept.
    #[error("at least one full snapshot must be kept")]
    NoFullKept,
    /// The zstd level is out of zstd's range.
    #[error("zstd level {0} is out of range (1 to 22, or negative for the fast levels)")]
    ZstdLevel(i32),
}

impl CreatorConfig {
    /// `RangeForSnapshot`: a snapshot is due at every slot that is a multiple of it
    /// (default 50). Larger means less I/O and staler snapshots.
    pub fn with_range_for_snapshot(mut self, value: u64) -> Self {
        self.range_for_snapshot = value;
        self
    }

    /// The value [`with_range_for_snapshot`](Self::with_range_for_snapshot) sets.
    pub fn range_for_snapshot(&self) -> u64 {
        self.range_for_snapshot
    }

    /// Slots between full snapshots; a multiple of `range_for_snapshot` (default
    /// [`DEFAULT_FULL_INTERVAL`]). The snapshots due between them are incremental. Setting
    /// it to `range_for_snapshot` makes every snapshot a full one.
    pub fn with_full_interval(mut self, value: u64) -> Self {
        self.full_interval = value;
        self
    }

    /// The value [`with_full_interval`](Self::with_full_interval) sets.
    pub fn full_interval(&self) -> u64 {
        self.full_interval
    }

    /// How many snapshots are kept.
    pub fn with_retention(mut self, value: Retention) -> Self {
        self.retention = value;
        self
    }

    /// The value [`with_retention`](Self::with_retention) sets.
    pub fn retention(&self) -> Retention {
        self.retention
    }

    /// How archives are written.
    pub fn with_options(mut self, value: CreateOptions) -> Self {
        self.options = value;
        self
    }

    /// The value [`with_options`](Self::with_options) sets.
    pub fn options(&self) -> CreateOptions {
        self.options
    }

    /// Checks the values.
    pub fn validate(&self) -> Result<(), CreatorConfigError> {
        if self.range_for_snapshot == 0 {
            return Err(CreatorConfigError::ZeroRange);
        }
        if self.full_interval == 0 || !self.full_interval.is_multiple_of(self.range_for_snapshot) {
            return Err(CreatorConfigError::FullInterval {
                full: self.full_interval,
                range: self.range_for_snapshot,
            });
        }
        if self.retention.full() == 0 {
            return Err(CreatorConfigError::NoFullKept);
        }
        let level = self.options.zstd_level;
        if !zstd::compression_level_range().contains(&level) || level == 0 {
            return Err(CreatorConfigError::ZstdLevel(level));
        }
        Ok(())
    }

    /// Whether a snapshot is due at `slot`.
    pub fn is_due(&self, slot: u64) -> bool {
        slot > 0 && slot.is_multiple_of(self.range_for_snapshot.max(1))
    }

    /// Whether the snapshot due at `slot` is a full one: at every multiple of the full interval,
    /// and, so that a network younger than one full interval has a base to sync from, at the
    /// first due slot (`range_for_snapshot`): the *genesis base*. Every node of a chain computes
    /// the same.
    pub fn is_full_slot(&self, slot: u64) -> bool {
        self.is_due(slot)
            && (slot.is_multiple_of(self.full_interval.max(1)) || slot == self.range_for_snapshot)
    }
}

/// Creates snapshots every `range_for_snapshot` slots, in the background.
///
/// The node calls [`Creator::on_slot`] after committing each slot. When a snapshot is due, the
/// creator takes a consistent view of the DB (cheap) and writes the snapshot on its own thread;
/// the node's writes and slot processing never wait for it. At full-snapshot slots it writes a
/// full snapshot; between them an incremental one on the newest full one it holds (or a full one
/// if it holds none). One full and one incremental creation may run at once; a due snapshot of a
/// kind still being made is skipped with a log line.
#[derive(Clone)]
pub struct Creator {
    store: SnapshotStore,
    db: Arc<dyn StateDb>,
    config: CreatorConfig,
    busy_full: Arc<AtomicBool>,
    busy_incremental: Arc<AtomicBool>,
    /// The key and network it signs the snapshots it makes with.
    attester: Option<Arc<(libp2p::identity::Keypair, String)>>,
    /// The highest slot the DB's state was loaded at from a snapshot (not executed): nothing
    /// at or below it is signed.
    loaded: Arc<AtomicU64>,
}

impl std::fmt::Debug for Creator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Creator")
            .field("store", &self.store.dir())
            .field("config", &self.config)
            .field(
                "attests_as",
                &self.attester.as_ref().map(|a| a.0.public().to_peer_id()),
            )
            .finish()
    }
}

impl Creator {
    /// A creator writing snapshots of `db` into `store`.
    pub fn new(store: SnapshotStore, db: Arc<dyn StateDb>, config: CreatorConfig) -> Self {
        Self {
            store,
            db,
            config,
            busy_full: Arc::new(AtomicBool::new(false)),
            busy_incremental: Arc::new(AtomicBool::new(false)),
            attester: None,
            loaded: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The DB's state was loaded from a snapshot at `slot` (or found there at start, when it
    /// may have been loaded before a restart): the node did not execute the chain to it, so no
    /// snapshot at or below `slot` is signed (one of a later slot is: the node executed the
    /// chain from there).
    pub fn loaded_at(&self, slot: u64) {
        self.loaded.fetch_max(slot, Ordering::AcqRel);
    }

    /// A sync loaded the state at `slot` and published its snapshots in the store: as after a
    /// snapshot this creator makes, those beyond the retention go (one rule, in one place),
    /// and nothing at or below `slot` is signed ([`Creator::loaded_at`]).
    pub fn synced(&self, slot: u64) -> Result<(), StoreError> {
        self.loaded_at(slot);
        self.store.retain(self.config.retention).map(|_| ())
    }

    /// Signs every snapshot it makes from the DB's state with `keypair` (an ed25519 identity)
    /// for `network`, and stores the [`Attestation`](crate::snapshot::Attestation) with it. A
    /// snapshot it finds made already (one the node synced), or one at or below the slot the
    /// state was loaded at ([`Creator::loaded_at`]), is not signed: the node did not execute
    /// the chain to it.
    pub fn attesting(mut self, keypair: libp2p::identity::Keypair, network: &str) -> Self {
        self.attester = Some(Arc::new((keypair, network.to_string())));
        self
    }

    /// The settings.
    pub fn config(&self) -> &CreatorConfig {
        &self.config
    }

    /// The store snapshots are written to.
    pub fn store(&self) -> &SnapshotStore {
        &self.store
    }

    /// Whether its settings make a snapshot due at `slot`.
    pub fn is_due(&self, slot: u64) -> bool {
        self.config.is_due(slot)
    }

    /// Whether a creation is running.
    pub fn is_busy(&self) -> bool {
        self.busy_full.load(Ordering::Acquire) || self.busy_incremental.load(Ordering::Acquire)
    }

    /// Call right after committing `slot`, before committing the next one. Starts a background
    /// creation if one is due (of the DB's state at `slot`; none if the DB is at another
    /// slot); returns a handle to its result.
    pub fn on_slot(&self, slot: u64) -> Option<CreationTask> {
        if !self.is_due(slot) {
            return None;
        }
        if self.config.is_full_slot(slot) {
            return self.start(None, Some(slot));
        }
        match self.store.latest_full() {
            Some(base) if base.manifest().slot < slot => self.start(Some(base), Some(slot)),
            _ => {
                tracing::info!(target: TARGET, slot, "no full snapshot to base an incremental one on: making a full one");
                self.start(None, Some(slot))
            }
        }
    }

    /// Starts a background creation of a full snapshot of the current state now, unless one is
    /// running.
    pub fn create_now(&self) -> Option<CreationTask> {
        self.start(None, None)
    }

    /// Starts a creation of the DB's state, which must be at `slot` when one is given.
    fn start(&self, base: Option<Arc<Snapshot>>, slot: Option<u64>) -> Option<CreationTask> {
        let busy = if base.is_none() {
            &self.busy_full
        } else {
            &self.busy_incremental
        };
        let kind = if base.is_none() {
            SnapshotKind::Full
        } else {
            SnapshotKind::Incremental
        };
        if busy.swap(true, Ordering::AcqRel) {
            tracing::warn!(target: TARGET, %kind, "a snapshot of this kind is still being made; skipping this one");
            return None;
        }
        let busy = BusyGuard(busy.clone());
        let (tx, rx) = oneshot::channel();
        let view = match self.db.view() {
            Ok(view) => view,
            Err(e) => {
                let _ = tx.send(Err(CreateError::Db(e)));
                return Some(CreationTask { rx });
            }
        };
        // Snapshots are made at the due slots only, so that every node of the chain makes the
        // same ones: a DB already past the slot is not snapshotted under another slot.
        if let Some(slot) = slot
            && view.slot() != Some(slot)
        {
            tracing::warn!(target: TARGET, slot, db_slot = ?view.slot(), "the DB is not at the slot given to on_slot (call it right after committing the slot, before the next one); no snapshot this time");
            return None;
        }
        let (store, db, config) = (self.store.clone(), self.db.clone(), self.config);
        let attester = self.attester.clone();
        let loaded = self.loaded.clone();
        let spawned = std::thread::Builder::new()
            .name("snapsync-create".into())
            .spawn(move || {
                let held_before = store.list();
                let result = match &base {
                    None => create_snapshot(&store, view.as_ref(), &config.options),
                    Some(base) => create_incremental(&store, view.as_ref(), base, &config.options),
                };
                drop(view);
                let result = match (result, attester) {
                    (Ok(snap), Some(attester))
                        if snap.manifest().slot > loaded.load(Ordering::Acquire)
                            && !held_before.iter().any(|h| {
                                h.manifest().content_root == snap.manifest().content_root
                            }) =>
                    {
                        Ok(attest(&store, snap, &attester.0, &attester.1))
                    }
                    (other, _) => other,
                };
                if let Ok(snap) = &result {
                    if let Err(e) = store.retain(config.retention) {
                        tracing::warn!(target: TARGET, error = %e, "could not delete old snapshots");
                    }
                    // Incremental snapshots are made on the newest full one only: what was
                    // written before it is no longer needed.
                    if snap.manifest().is_full()
                        && let Err(e) = db.prune_touched(snap.manifest().slot)
                    {
                        tracing::warn!(target: TARGET, error = %e, "could not prune the written-key records");
                    }
                }
                if let Err(e) = &result {
                    tracing::error!(target: TARGET, error = %e, "snapshot creation failed");
                }
                // Free the slot before reporting, so that whoever sees the result can start
                // the next creation at once.
                drop(busy);
                let _ = tx.send(result);
            });
        if let Err(e) = spawned {
            tracing::error!(target: TARGET, error = %e, "could not start the snapshot thread");
        }
        Some(CreationTask { rx })
    }
}

/// `snap` with this node's attestation stored (as it was, logged, if signing or storing
/// fails: the snapshot itself is good).
fn attest(
    store: &SnapshotStore,
    snap: Arc<Snapshot>,
    keypair: &libp2p::identity::Keypair,
    network: &str,
) -> Arc<Snapshot> {
    let m = snap.manifest();
    let signed = crate::snapshot::Attestation::sign(keypair, network, &m.key())
        .map_err(|e| e.to_string())
        .and_then(|a| {
            store
                .attest(&m.content_root, network, &[a])
                .map_err(|e| e.to_string())
        });
    match signed {
        Ok(attested) => attested,
        Err(error) => {
            tracing::warn!(target: TARGET, slot = m.slot, %error, "could not attest the snapshot made");
            snap
        }
    }
}

struct BusyGuard(Arc<AtomicBool>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// The result of a background creation, as a future (or [`CreationTask::wait`] to block).
#[derive(Debug)]
#[must_use = "dropping the task does not stop the creation, but loses its result"]
pub struct CreationTask {
    rx: oneshot::Receiver<Result<Arc<Snapshot>, CreateError>>,
}

impl CreationTask {
    /// Blocks until the creation ends.
    pub fn wait(self) -> Result<Arc<Snapshot>, CreateError> {
        futures::executor::block_on(self)
    }
}

impl Future for CreationTask {
    type Output = Result<Arc<Snapshot>, CreateError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.rx)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(CreateError::Aborted)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_creator_signs_what_it_made_by_executing_not_what_was_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::db::LmdbState::open(dir.path().join("db")).unwrap();
        db.commit_slot(10, |w| w.put(b"k", b"10")).unwrap();
        let store = SnapshotStore::open(dir.path().join("snapshots")).unwrap();
        let keypair = libp2p::identity::Keypair::generate_ed25519();
        let me = keypair.public().to_peer_id();
        let creator = Creator::new(store, Arc::new(db.clone()), CreatorConfig::default())
            .attesting(keypair, "n");
        // The state at 10 came from a snapshot.
        creator.loaded_at(10);
        let loaded = creator.create_now().unwrap().wait().unwrap();
        assert!(loaded.attestations().is_empty(), "not executed here");
        // Slot 20 the node executed itself.
        db.commit_slot(20, |w| w.put(b"k", b"20")).unwrap();
        let made = creator.create_now().unwrap().wait().unwrap();
        let signers: Vec<_> = made
            .attestations()
            .iter()
            .filter_map(|a| a.signer())
            .collect();
        assert_eq!(signers, vec![me]);
        assert!(made.attestations()[0].verify("n", &made.manifest().key()));
    }

    #[test]
    fn full_slots_follow_the_interval_and_the_genesis_base() {
        let c = CreatorConfig::default()
            .with_range_for_snapshot(50)
            .with_full_interval(1000);
        c.validate().unwrap();
        assert!(!c.is_due(0) && !c.is_full_slot(0));
        assert!(c.is_full_slot(50), "the genesis base");
        assert!(c.is_due(100) && !c.is_full_slot(100));
        assert!(c.is_full_slot(1000) && c.is_full_slot(2000));
        assert!(!c.is_due(1001));
        assert!(matches!(
            CreatorConfig::default().with_full_interval(75).validate(),
            Err(CreatorConfigError::FullInterval {
                full: 75,
                range: 50
            })
        ));
        assert!(matches!(
            CreatorConfig::default()
                .with_range_for_snapshot(0)
                .validate(),
            Err(CreatorConfigError::ZeroRange)
        ));
        assert!(matches!(
            CreatorConfig::default()
                .with_options(CreateOptions::default().with_zstd_level(99))
                .validate(),
            Err(CreatorConfigError::ZstdLevel(99))
        ));
    }
}
