//! Creating snapshots: [`create_snapshot`] (one, now) and [`Creator`] (every
//! `range_for_snapshot` slots, in the background, with retention).

use crate::macros::setter;
use std::fs::File;
use std::future::Future;
use std::io::{self, BufWriter};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use futures::channel::oneshot;

use crate::chunk::{ChunkSize, TreeBuilder, TreeWriter};
use crate::db::{DbError, StateDb, StateView, VisitError};
use crate::snapshot::archive::{ArchiveWriter, DEFAULT_ZSTD_LEVEL};
use crate::snapshot::store::{ARCHIVE_FILE, IoAt, OUTBOARD_FILE, WritebackFile, now_unix_ms};
use crate::snapshot::{FORMAT_VERSION, Manifest, Snapshot, SnapshotStore, StoreError};

/// Default number of slots between two snapshots (the design's `RangeForSnapshot`).
pub const DEFAULT_RANGE_FOR_SNAPSHOT: u64 = 50;

/// Default number of snapshots kept.
pub const DEFAULT_RETAIN: usize = 2;

/// A snapshot could not be created. Nothing was published and existing snapshots are intact.
#[derive(Debug, thiserror::Error)]
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
    /// The background creation ended without a result (its thread panicked).
    #[error("snapshot creation was aborted")]
    Aborted,
}

/// How archives are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct CreateOptions {
    /// Chunk size the archive is served and checked in.
    pub chunk_size: ChunkSize,
    /// zstd level (1 to 22; higher is smaller and slower).
    pub zstd_level: i32,
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
    setter!(
        /// Sets the chunk size.
        with_chunk_size, chunk_size: ChunkSize
    );

    setter!(
        /// Sets the zstd level.
        with_zstd_level, zstd_level: i32
    );
}

/// Writes a snapshot of `view` into `store` and publishes it atomically (see
/// [`SnapshotStore`]). Blocking; runs in bounded memory whatever the state size. If a snapshot of
/// the same slot is already published, returns it without writing another.
pub fn create_snapshot(
    store: &SnapshotStore,
    view: &dyn StateView,
    options: &CreateOptions,
) -> Result<Arc<Snapshot>, CreateError> {
    let slot = view.slot().ok_or(CreateError::NoState)?;
    let _span = tracing::info_span!(target: "NETWORK:SNAPSHOT", "create_snapshot", slot).entered();
    if let Some(existing) = store.list().into_iter().find(|s| s.manifest().slot == slot) {
        return Ok(existing);
    }
    let started = Instant::now();
    let staging = store.staging()?;
    let archive_path = staging.path().join(ARCHIVE_FILE);
    let outboard_path = staging.path().join(OUTBOARD_FILE);
    // The archive and its outboard are written in the same pass: the writer thread hashes the
    // compressed bytes into the BLAKE3 tree as it writes them.
    let archive = File::create(&archive_path).at(&archive_path)?;
    let outboard = File::create(&outboard_path).at(&outboard_path)?;
    let out = TreeWriter {
        inner: BufWriter::with_capacity(1 << 20, WritebackFile::new(archive)),
        tree: TreeBuilder::new(
            options.chunk_size,
            BufWriter::with_capacity(1 << 16, outboard),
        ),
    };
    let mut writer = ArchiveWriter::new(out, slot, options.zstd_level).at(&archive_path)?;
    view.visit(&mut |k, v| writer.push(k, v))
        .map_err(|e| match e {
            VisitError::Db(e) => CreateError::Db(e),
            VisitError::Visitor(e) if e.kind() == io::ErrorKind::InvalidInput => {
                CreateError::NotCanonical(e)
            }
            VisitError::Visitor(e) => StoreError::at(&archive_path, e).into(),
        })?;
    let (out, summary) = writer.finish().at(&archive_path)?;
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
        slot,
        bank_hash: summary.bank_hash,
        content_root,
        archive_size,
        chunk_size: options.chunk_size,
        created_unix_ms: now_unix_ms(),
        entry_count: summary.entry_count,
        state_bytes: summary.state_bytes,
        zstd_level: options.zstd_level,
    };
    let snap = staging.publish(store, manifest)?;
    tracing::info!(
        target: "NETWORK:SNAPSHOT",
        slot,
        bank_hash = %summary.bank_hash.short(),
        root = %content_root.short(),
        entries = summary.entry_count,
        bytes = archive_size,
        secs = started.elapsed().as_secs_f64(),
        "snapshot created"
    );
    Ok(snap)
}

/// Settings of a [`Creator`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct CreatorConfig {
    /// A snapshot is due at every slot that is a multiple of this (the design's
    /// `RangeForSnapshot`, default 50). Larger means less I/O and staler snapshots.
    pub range_for_snapshot: u64,
    /// How many snapshots to keep (default 2); older ones are deleted after each creation.
    pub retain: usize,
    /// How archives are written.
    pub options: CreateOptions,
}

impl Default for CreatorConfig {
    fn default() -> Self {
        Self {
            range_for_snapshot: DEFAULT_RANGE_FOR_SNAPSHOT,
            retain: DEFAULT_RETAIN,
            options: CreateOptions::default(),
        }
    }
}

impl CreatorConfig {
    setter!(
        /// Sets the number of slots between snapshots (at least 1).
        with_range_for_snapshot, range_for_snapshot: u64, |slots| slots.max(1)
    );

    setter!(
        /// Sets how many snapshots are kept (at least 1).
        with_retain, retain: usize, |keep| keep.max(1)
    );

    setter!(
        /// Sets how archives are written.
        with_options, options: CreateOptions
    );
}

/// Creates a snapshot every `range_for_snapshot` slots, in the background.
///
/// The node calls [`Creator::on_slot`] after committing each slot. When a snapshot is due, the
/// creator takes a consistent view of the DB (cheap) and writes the snapshot on its own thread;
/// the node's writes and slot processing never wait for it. At most one creation runs at a time:
/// if one is still running when the next is due, that one is skipped with a log line.
#[derive(Clone)]
pub struct Creator {
    store: SnapshotStore,
    db: Arc<dyn StateDb>,
    config: CreatorConfig,
    busy: Arc<AtomicBool>,
}

impl std::fmt::Debug for Creator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Creator")
            .field("store", &self.store.dir())
            .field("config", &self.config)
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
            busy: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The settings.
    pub fn config(&self) -> &CreatorConfig {
        &self.config
    }

    /// The store snapshots are written to.
    pub fn store(&self) -> &SnapshotStore {
        &self.store
    }

    /// Whether a snapshot is due at `slot`.
    pub fn is_due(&self, slot: u64) -> bool {
        slot > 0 && slot.is_multiple_of(self.config.range_for_snapshot)
    }

    /// Whether a creation is running.
    pub fn is_busy(&self) -> bool {
        self.busy.load(Ordering::Acquire)
    }

    /// Call after committing `slot`. Starts a background creation if one is due and none is
    /// running; returns a handle to its result.
    pub fn on_slot(&self, slot: u64) -> Option<CreationTask> {
        if !self.is_due(slot) {
            return None;
        }
        self.create_now()
    }

    /// Starts a background creation of the current state now, unless one is running.
    pub fn create_now(&self) -> Option<CreationTask> {
        if self.busy.swap(true, Ordering::AcqRel) {
            tracing::warn!(target: "NETWORK:SNAPSHOT", "snapshot creation still in progress; skipping this one");
            return None;
        }
        let busy = BusyGuard(self.busy.clone());
        let (tx, rx) = oneshot::channel();
        let view = match self.db.view() {
            Ok(view) => view,
            Err(e) => {
                let _ = tx.send(Err(CreateError::Db(e)));
                return Some(CreationTask { rx });
            }
        };
        let store = self.store.clone();
        let config = self.config;
        let spawned = std::thread::Builder::new()
            .name("snapsync-create".into())
            .spawn(move || {
                let result = create_snapshot(&store, view.as_ref(), &config.options);
                drop(view);
                if result.is_ok()
                    && let Err(e) = store.retain(config.retain)
                {
                    tracing::warn!(target: "NETWORK:SNAPSHOT", error = %e, "could not delete old snapshots");
                }
                if let Err(e) = &result {
                    tracing::error!(target: "NETWORK:SNAPSHOT", error = %e, "snapshot creation failed");
                }
                // Free the slot before reporting, so that whoever sees the result can start
                // the next creation at once.
                drop(busy);
                let _ = tx.send(result);
            });
        if let Err(e) = spawned {
            tracing::error!(target: "NETWORK:SNAPSHOT", error = %e, "could not start the snapshot thread");
        }
        Some(CreationTask { rx })
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
