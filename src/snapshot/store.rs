//! [`SnapshotStore`]: the directory of published snapshots.
//!
//! ```text
//! <dir>/
//!   full-<slot, 20 digits>-<first 16 hex of the content root>/   a published full snapshot
//!   incr-<slot, 20 digits>-<first 16 hex of the content root>/   a published incremental one
//!     archive.zst      the archive
//!     outboard.bao     BLAKE3 tree nodes for serving verifiable chunks
//!     manifest.pb      the Manifest (protobuf)
//!   .tmp-*/            a snapshot being written (removed at open: an interrupted creation)
//!   .trash-*/          a snapshot being deleted (removed at open)
//!   .partial-<root>-<size>/   a download in progress, kept for resume (see
//!                    `transfer/download/partial.rs`): the root and size fix its bytes
//! ```
//!
//! The directory itself is locked (flock) by the one process that has the store open: a second
//! process opening a store in use is refused at once, naming the directory (its open would
//! otherwise sweep away the first one's snapshot being written).
//!
//! A snapshot is written completely inside a `.tmp-*` directory, every file fsynced, then the
//! directory is renamed to its final name and the parent fsynced. The rename is the commit
//! point: a crash at any moment leaves either no snapshot or a complete one, never a partial
//! snapshot that looks complete.
//!
//! Retention keeps the newest full snapshots and the newest incremental ones on them (see
//! [`Retention`]); a snapshot being served ([`SnapshotStore::pin`]) or served a moment ago is
//! kept until it is no longer, so a long download never loses its source half-way.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::disk;
use crate::hash::ContentRoot;
use crate::snapshot::archive::SnapshotKind;
use crate::snapshot::exchange::Exchange;
use crate::snapshot::{Manifest, ManifestError};

/// File name of the archive inside a snapshot directory.
pub const ARCHIVE_FILE: &str = "archive.zst";
/// File name of the outboard inside a snapshot directory.
pub const OUTBOARD_FILE: &str = "outboard.bao";
/// File name of the manifest inside a snapshot directory.
pub const MANIFEST_FILE: &str = "manifest.pb";

pub(super) const FULL_PREFIX: &str = "full-";
pub(super) const INCR_PREFIX: &str = "incr-";
const TMP_PREFIX: &str = ".tmp-";
const TRASH_PREFIX: &str = ".trash-";
pub(crate) const PARTIAL_PREFIX: &str = ".partial-";
/// A file in a partial directory whose download the trust policy vouched for: only a download
/// vouched for too may delete it to make room.
pub(crate) const VOUCHED_FILE: &str = "vouched";

/// Log target of the store (snapshots are part of discovery's story).
const TARGET: &str = crate::log::DISCOVERY;

/// A file-system operation of the snapshot store failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The directory or file cannot be written (permissions, read-only or immutable).
    #[error("snapshot directory is not writable: {path}: {source}")]
    NotWritable {
        /// The path that could not be written.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A path that must be a directory is a file (or lies under one).
    #[error("not a directory: {path} is a file, where a directory is needed")]
    NotADirectory {
        /// The file in the way.
        path: PathBuf,
    },
    /// The disk (or quota) is full, or has less room than needed.
    #[error("disk full while writing {path}: {source}")]
    DiskFull {
        /// The path being written.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Another I/O error.
    #[error("snapshot store I/O error at {path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Another process has the snapshot directory open.
    #[error("snapshot directory is in use by another process: {path}")]
    InUse {
        /// The directory.
        path: PathBuf,
    },
    /// A published snapshot's manifest cannot be read.
    #[error("invalid manifest {path}: {source}")]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// Why it is invalid.
        #[source]
        source: ManifestError,
    },
}

impl StoreError {
    /// Classifies an I/O error at `path`: full disk, not writable, not a directory, or other.
    pub(crate) fn at(path: &Path, source: io::Error) -> Self {
        let path = path.to_path_buf();
        match source.kind() {
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => {
                StoreError::DiskFull { path, source }
            }
            io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => {
                StoreError::NotWritable { path, source }
            }
            io::ErrorKind::NotADirectory => StoreError::NotADirectory { path },
            _ => StoreError::Io { path, source },
        }
    }

    /// The path the error is about.
    pub fn path(&self) -> &Path {
        match self {
            StoreError::NotWritable { path, .. }
            | StoreError::NotADirectory { path }
            | StoreError::DiskFull { path, .. }
            | StoreError::Io { path, .. }
            | StoreError::InUse { path }
            | StoreError::Manifest { path, .. } => path,
        }
    }
}

/// Extension to attach a path to an I/O result.
pub(crate) trait IoAt<T> {
    fn at(self, path: &Path) -> Result<T, StoreError>;
}

impl<T> IoAt<T> for io::Result<T> {
    fn at(self, path: &Path) -> Result<T, StoreError> {
        self.map_err(|e| StoreError::at(path, e))
    }
}

/// Creates directory `dir` (and its parents), saying clearly what is in the way: a file where a
/// directory should be, or a place that cannot be written.
pub(crate) fn ensure_dir(dir: &Path) -> Result<(), StoreError> {
    for ancestor in dir.ancestors() {
        match fs::metadata(ancestor) {
            Ok(m) if m.is_dir() => break,
            Ok(_) => {
                return Err(StoreError::NotADirectory {
                    path: ancestor.to_path_buf(),
                });
            }
            Err(_) => continue,
        }
    }
    fs::create_dir_all(dir).at(dir)
}

/// A published snapshot: its manifest and where its files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    manifest: Manifest,
    dir: PathBuf,
}

impl Snapshot {
    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The snapshot's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of the archive.
    pub fn archive_path(&self) -> PathBuf {
        self.dir.join(ARCHIVE_FILE)
    }

    /// Path of the outboard.
    pub fn outboard_path(&self) -> PathBuf {
        self.dir.join(OUTBOARD_FILE)
    }

    /// Opens the archive and outboard for serving chunks (their sizes are checked).
    pub fn chunk_source(&self) -> io::Result<crate::chunk::ChunkSource> {
        crate::chunk::ChunkSource::open(
            self.manifest.chunk_tree(),
            &self.archive_path(),
            &self.outboard_path(),
        )
    }
}

/// How many snapshots [`SnapshotStore::retain`] keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Full snapshots kept, newest first (at least 1).
    pub full: usize,
    /// Incremental snapshots kept, newest first, among those whose base is kept.
    pub incremental: usize,
    /// A snapshot served this recently is kept past its turn (a download that lasts longer than
    /// a retention period keeps its source).
    pub serve_grace: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            full: 2,
            incremental: 4,
            serve_grace: Duration::from_secs(300),
        }
    }
}

type Index = BTreeMap<(u64, ContentRoot), Arc<Snapshot>>;

/// The directory of published snapshots, shared by the creator, the chunk streamer and the
/// downloader. Cloning is cheap; every clone sees the same directory.
#[derive(Debug, Clone)]
pub struct SnapshotStore {
    inner: Arc<StoreInner>,
}

#[derive(Debug)]
struct StoreInner {
    dir: PathBuf,
    _lock: Arc<StoreLock>,
    index: Mutex<Index>,
    /// Per content root: transfers serving it now, and when it was last served.
    serving: Mutex<HashMap<ContentRoot, (usize, Instant)>>,
    /// Partial downloads a download (or a server of its chunks) holds: never trimmed, and
    /// worked on by one download at a time.
    claimed: Mutex<Holds>,
    /// Woken when a claim ends.
    released: tokio::sync::Notify,
    /// What the streamer and the downloads share.
    exchange: Arc<Exchange>,
}

static UNIQUE: AtomicU64 = AtomicU64::new(0);

fn unique_suffix() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{}-{}-{}",
        std::process::id(),
        nanos,
        UNIQUE.fetch_add(1, Ordering::Relaxed)
    )
}

pub(crate) fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A partial download on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PartialInfo {
    pub(crate) root: Option<ContentRoot>,
    /// Its download was vouched for (see [`VOUCHED_FILE`]).
    pub(crate) vouched: bool,
    pub(crate) path: PathBuf,
    pub(crate) bytes: u64,
    pub(crate) modified: SystemTime,
}

/// The lock of a snapshot directory, shared by every open of it in this process.
#[derive(Debug)]
struct StoreLock {
    dir: PathBuf,
    _file: fs::File,
}

/// The snapshot directories open in this process, and their locks.
static OPEN_STORES: Mutex<Vec<std::sync::Weak<StoreLock>>> = Mutex::new(Vec::new());

impl StoreLock {
    /// This process's lock of `dir`: the one already held, or a new one (refused when another
    /// process holds it).
    fn take(dir: &Path) -> Result<Arc<Self>, StoreError> {
        let canonical = fs::canonicalize(dir).at(dir)?;
        let mut open = OPEN_STORES.lock().unwrap_or_else(|p| p.into_inner());
        open.retain(|w| w.strong_count() > 0);
        if let Some(held) = open
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .find(|l| l.dir == canonical)
        {
            return Ok(held);
        }
        let file = fs::File::open(dir).at(dir)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(StoreError::InUse {
                    path: dir.to_path_buf(),
                });
            }
            Err(fs::TryLockError::Error(e)) => return Err(StoreError::at(dir, e)),
        }
        let lock = Arc::new(Self {
            dir: canonical,
            _file: file,
        });
        open.push(Arc::downgrade(&lock));
        Ok(lock)
    }
}

/// A partial download claimed by a download, or pinned by a server of its chunks (see
/// [`SnapshotStore::claim_partial`]); released on drop.
#[derive(Debug)]
pub(crate) struct PartialClaim {
    store: SnapshotStore,
    root: ContentRoot,
    download: bool,
}

/// Who holds partial downloads: the download working on each, and the pins of servers.
#[derive(Debug, Default)]
struct Holds {
    downloads: std::collections::HashSet<ContentRoot>,
    pins: HashMap<ContentRoot, usize>,
}

impl Drop for PartialClaim {
    fn drop(&mut self) {
        let mut holds = self.store.claims();
        if self.download {
            holds.downloads.remove(&self.root);
        } else if let Some(n) = holds.pins.get_mut(&self.root) {
            *n -= 1;
            if *n == 0 {
                holds.pins.remove(&self.root);
            }
        }
        drop(holds);
        self.store.inner.released.notify_waiters();
    }
}

/// Keeps a snapshot from being deleted while it is served; see [`SnapshotStore::pin`].
#[derive(Debug)]
pub struct ServingPin {
    store: SnapshotStore,
    root: ContentRoot,
}

impl Drop for ServingPin {
    fn drop(&mut self) {
        let mut serving = self.store.serving();
        if let Some((n, at)) = serving.get_mut(&self.root) {
            *n = n.saturating_sub(1);
            *at = Instant::now();
        }
    }
}

impl SnapshotStore {
    /// Opens (creating it if needed) the snapshot directory `dir`: removes what interrupted
    /// creations and deletions left behind, and indexes the published snapshots. A published
    /// snapshot whose files do not match its manifest is removed with a warning.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let dir = dir.into();
        ensure_dir(&dir)?;
        let lock = StoreLock::take(&dir)?;
        let mut index = Index::new();
        for entry in fs::read_dir(&dir).at(&dir)? {
            let entry = entry.at(&dir)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if name.starts_with(TMP_PREFIX) || name.starts_with(TRASH_PREFIX) {
                tracing::info!(target: TARGET, path = %path.display(), "removing leftovers of an interrupted snapshot write");
                disk::remove_path(&path).at(&path)?;
            } else if name.starts_with(FULL_PREFIX) || name.starts_with(INCR_PREFIX) {
                match read_published(&path) {
                    Ok(snap) => {
                        let m = &snap.manifest;
                        index.insert((m.slot, m.content_root), Arc::new(snap));
                    }
                    Err(e) => {
                        tracing::warn!(target: TARGET, path = %path.display(), error = %e, "removing an invalid snapshot");
                        disk::remove_path(&path).at(&path)?;
                    }
                }
            }
        }
        let store = Self {
            inner: Arc::new(StoreInner {
                dir,
                _lock: lock,
                index: Mutex::new(index),
                serving: Mutex::new(HashMap::new()),
                claimed: Mutex::new(Holds::default()),
                released: tokio::sync::Notify::new(),
                exchange: Arc::new(Exchange::default()),
            }),
        };
        // Make sure the directory is writable now rather than at the first snapshot.
        let probe = store
            .inner
            .dir
            .join(format!("{TMP_PREFIX}probe-{}", unique_suffix()));
        fs::create_dir(&probe).at(&store.inner.dir)?;
        fs::remove_dir(&probe).at(&probe)?;
        Ok(store)
    }

    /// The snapshot directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.inner.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn serving(&self) -> std::sync::MutexGuard<'_, HashMap<ContentRoot, (usize, Instant)>> {
        self.inner.serving.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Published snapshots, oldest slot first.
    pub fn list(&self) -> Vec<Arc<Snapshot>> {
        self.index().values().cloned().collect()
    }

    /// The published snapshot with the highest slot, full or incremental.
    pub fn latest(&self) -> Option<Arc<Snapshot>> {
        self.index().values().next_back().cloned()
    }

    /// The published full snapshot with the highest slot.
    pub fn latest_full(&self) -> Option<Arc<Snapshot>> {
        self.index()
            .values()
            .rev()
            .find(|s| s.manifest.is_full())
            .cloned()
    }

    /// The newest published incremental snapshot on the full one with this content root.
    pub fn latest_incremental_on(&self, base: &ContentRoot) -> Option<Arc<Snapshot>> {
        self.index()
            .values()
            .rev()
            .find(|s| s.manifest.base.is_some_and(|b| b.content_root == *base))
            .cloned()
    }

    /// The published snapshot with this content root.
    pub fn get(&self, root: &ContentRoot) -> Option<Arc<Snapshot>> {
        self.index()
            .values()
            .find(|s| s.manifest.content_root == *root)
            .cloned()
    }

    /// Whether a snapshot of `slot` is published.
    pub fn has_slot(&self, slot: u64) -> bool {
        self.index()
            .range((slot, ContentRoot([0; 32]))..)
            .next()
            .map(|((s, _), _)| *s)
            == Some(slot)
    }

    /// Marks the snapshot with `root` as being served until the pin is dropped: retention keeps
    /// it meanwhile, and for [`Retention::serve_grace`] after.
    pub fn pin(&self, root: ContentRoot) -> ServingPin {
        let mut serving = self.serving();
        let entry = serving.entry(root).or_insert((0, Instant::now()));
        entry.0 += 1;
        entry.1 = Instant::now();
        // Forget snapshots served long ago, so the table stays as small as what is served.
        if serving.len() > 256 {
            let horizon = Duration::from_secs(3600);
            serving.retain(|_, (n, at)| *n > 0 || at.elapsed() < horizon);
        }
        ServingPin {
            store: self.clone(),
            root,
        }
    }

    fn in_use(&self, root: &ContentRoot, grace: Duration) -> bool {
        self.serving()
            .get(root)
            .is_some_and(|(n, at)| *n > 0 || at.elapsed() < grace)
    }

    /// What the streamer and the downloads over this store share.
    pub(crate) fn exchange(&self) -> &Arc<Exchange> {
        &self.inner.exchange
    }

    fn claims(&self) -> std::sync::MutexGuard<'_, Holds> {
        self.inner.claimed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Claims the partial download of `root` for a download, waiting while another download
    /// (a cancelled one still making its progress durable, say) holds it. While claimed it is
    /// never trimmed.
    pub(crate) async fn claim_partial(&self, root: ContentRoot) -> PartialClaim {
        loop {
            let released = self.inner.released.notified();
            {
                if self.claims().downloads.insert(root) {
                    return PartialClaim {
                        store: self.clone(),
                        root,
                        download: true,
                    };
                }
            }
            // Woken when a claim ends; looked at again every second regardless.
            let _ = tokio::time::timeout(Duration::from_secs(1), released).await;
        }
    }

    fn is_claimed(&self, root: &ContentRoot) -> bool {
        let holds = self.claims();
        holds.downloads.contains(root) || holds.pins.contains_key(root)
    }

    /// A fresh staging directory (`.tmp-*`) to write a snapshot into.
    pub(crate) fn staging(&self) -> Result<StagingDir, StoreError> {
        let path = self
            .inner
            .dir
            .join(format!("{TMP_PREFIX}{}", unique_suffix()));
        fs::create_dir(&path).at(&path)?;
        Ok(StagingDir { path: Some(path) })
    }

    /// Directory a download of the archive with `root` and `size` keeps its state in (for
    /// resume): keyed by what fixes the archive's bytes, so that no other archive (another
    /// size claimed for the same root, another root for the same slot) ever touches it, and
    /// any chunk size of the same archive finds it.
    pub(crate) fn partial_dir(&self, root: &ContentRoot, size: u64) -> PathBuf {
        self.inner
            .dir
            .join(format!("{PARTIAL_PREFIX}{}-{size}", root.to_hex()))
    }

    /// The directory earlier versions kept a download of `root` in (keyed by the root alone).
    pub(crate) fn legacy_partial_dir(&self, root: &ContentRoot) -> PathBuf {
        self.inner
            .dir
            .join(format!("{PARTIAL_PREFIX}{}", root.to_hex()))
    }

    /// The partial downloads on disk.
    pub(crate) fn partials(&self) -> Result<Vec<PartialInfo>, StoreError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.inner.dir).at(&self.inner.dir)?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(key) = name.strip_prefix(PARTIAL_PREFIX) else {
                continue;
            };
            let hex = key.split_once('-').map_or(key, |(hex, _)| hex);
            let path = entry.path();
            let (mut bytes, mut modified) = (0u64, SystemTime::UNIX_EPOCH);
            if let Ok(files) = fs::read_dir(&path) {
                for f in files.flatten() {
                    if let Ok(m) = f.metadata() {
                        // Allocated bytes: a preallocated file counts in full.
                        bytes += std::os::unix::fs::MetadataExt::blocks(&m) * 512;
                        modified = modified.max(m.modified().unwrap_or(SystemTime::UNIX_EPOCH));
                    }
                }
            }
            out.push(PartialInfo {
                root: hex.parse().ok(),
                vouched: path.join(VOUCHED_FILE).exists(),
                path,
                bytes,
                modified,
            });
        }
        Ok(out)
    }

    /// Keeps the partial downloads of roots other than `keep` (and those claimed) within
    /// `budget` bytes on disk, deleting the least recently touched first; ones that are not
    /// partial downloads of a root are deleted. A download the policy did not vouch for
    /// (`vouched` false) never deletes one it vouched for: a snapshot anyone can advertise
    /// cannot wipe the progress of one the node's trust chose. Returns the roots deleted.
    pub(crate) fn trim_partials(
        &self,
        keep: &ContentRoot,
        budget: u64,
        vouched: bool,
    ) -> Result<Vec<ContentRoot>, StoreError> {
        let mut others: Vec<PartialInfo> = self
            .partials()?
            .into_iter()
            .filter(|p| vouched || !p.vouched)
            .filter(|p| p.root.is_none_or(|r| r != *keep && !self.is_claimed(&r)))
            .collect();
        // Newest first: the oldest are dropped once the budget is spent.
        others.sort_by_key(|p| std::cmp::Reverse(p.modified));
        let mut used = 0u64;
        let mut removed = Vec::new();
        for p in others {
            used = used.saturating_add(p.bytes);
            if p.root.is_none() || used > budget {
                tracing::info!(target: crate::log::DOWNLOAD, path = %p.path.display(), bytes = p.bytes, "removing a partial download beyond the disk budget");
                disk::remove_path(&p.path).at(&p.path)?;
                removed.extend(p.root);
            }
        }
        Ok(removed)
    }

    /// Publishes the snapshot in `dir` (which holds [`ARCHIVE_FILE`] and [`OUTBOARD_FILE`],
    /// both fsynced): writes the manifest, fsyncs, renames the directory into place. If the same
    /// snapshot is already published, `dir` is removed and the published one returned.
    pub(crate) fn publish(
        &self,
        dir: &Path,
        manifest: Manifest,
    ) -> Result<Arc<Snapshot>, StoreError> {
        if let Some(existing) = self.get(&manifest.content_root) {
            disk::remove_path(dir).at(dir)?;
            return Ok(existing);
        }
        let archive = dir.join(ARCHIVE_FILE);
        let size = fs::metadata(&archive).at(&archive)?.len();
        if size != manifest.archive_size {
            return Err(StoreError::Io {
                path: archive,
                source: io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{size} bytes, the manifest says {}", manifest.archive_size),
                ),
            });
        }
        let manifest_path = dir.join(MANIFEST_FILE);
        disk::write_synced(&manifest_path, &manifest.encode()).at(&manifest_path)?;
        disk::sync_dir(dir).at(dir)?;
        let prefix = match manifest.kind {
            SnapshotKind::Full => FULL_PREFIX,
            SnapshotKind::Incremental => INCR_PREFIX,
        };
        let name = format!(
            "{prefix}{:020}-{}",
            manifest.slot,
            &manifest.content_root.to_hex()[..16]
        );
        let target = self.inner.dir.join(name);
        fs::rename(dir, &target).at(&target)?;
        disk::sync_dir(&self.inner.dir).at(&self.inner.dir)?;
        let snap = Arc::new(Snapshot {
            manifest,
            dir: target,
        });
        let m = &snap.manifest;
        self.index().insert((m.slot, m.content_root), snap.clone());
        Ok(snap)
    }

    /// Corrects the record counts in the manifest of the published snapshot with `root` (a
    /// download took them from a peer; loading its archive counted them): the manifest file is
    /// replaced atomically, so the snapshot is never served on with counts its archive
    /// contradicts.
    pub(crate) fn correct_counts(
        &self,
        root: &ContentRoot,
        entry_count: u64,
        state_bytes: u64,
    ) -> Result<Arc<Snapshot>, StoreError> {
        let snap = self.get(root).ok_or_else(|| StoreError::Io {
            path: self.inner.dir.clone(),
            source: io::Error::new(io::ErrorKind::NotFound, "no such snapshot"),
        })?;
        let manifest = Manifest {
            entry_count,
            state_bytes,
            ..snap.manifest.clone()
        };
        let path = snap.dir.join(MANIFEST_FILE);
        disk::replace_synced(&path, &manifest.encode()).at(&path)?;
        let fixed = Arc::new(Snapshot {
            manifest,
            dir: snap.dir.clone(),
        });
        let m = &fixed.manifest;
        self.index().insert((m.slot, m.content_root), fixed.clone());
        Ok(fixed)
    }

    /// Applies `retention`: keeps the newest `full` full snapshots and the newest `incremental`
    /// incremental ones whose base is kept, and deletes the others, except those being served
    /// or served within the grace period (deleted by a later call). At least one full snapshot
    /// is always kept. Returns the manifests of the deleted ones.
    pub fn retain(&self, retention: Retention) -> Result<Vec<Manifest>, StoreError> {
        let doomed: Vec<Arc<Snapshot>> = {
            let index = self.index();
            let fulls: Vec<&Arc<Snapshot>> = index
                .values()
                .rev()
                .filter(|s| s.manifest.is_full())
                .collect();
            let kept_fulls: Vec<ContentRoot> = fulls
                .iter()
                .take(retention.full.max(1))
                .map(|s| s.manifest.content_root)
                .collect();
            let mut kept_incr = 0usize;
            index
                .values()
                .rev()
                .filter(|s| {
                    let m = &s.manifest;
                    let keep = match m.base {
                        None => kept_fulls.contains(&m.content_root),
                        Some(base) => {
                            let keep = kept_fulls.contains(&base.content_root)
                                && kept_incr < retention.incremental;
                            kept_incr += usize::from(keep);
                            keep
                        }
                    };
                    !keep
                })
                .cloned()
                .collect()
        };
        let mut removed = Vec::new();
        for snap in doomed {
            if self.in_use(&snap.manifest.content_root, retention.serve_grace) {
                tracing::debug!(target: TARGET, slot = snap.manifest.slot, "keeping a snapshot being served past its retention");
                continue;
            }
            self.remove(&snap)?;
            removed.push(snap.manifest.clone());
        }
        Ok(removed)
    }

    /// Deletes one published snapshot. Files already opened for serving stay readable until
    /// closed.
    pub fn remove(&self, snap: &Snapshot) -> Result<(), StoreError> {
        let m = &snap.manifest;
        self.index().remove(&(m.slot, m.content_root));
        // Rename first so that a crash mid-delete never leaves a half-deleted snapshot that
        // looks published.
        let trash = self
            .inner
            .dir
            .join(format!("{TRASH_PREFIX}{}", unique_suffix()));
        match fs::rename(&snap.dir, &trash) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(StoreError::at(&snap.dir, e)),
        }
        disk::sync_dir(&self.inner.dir).at(&self.inner.dir)?;
        disk::remove_path(&trash).at(&trash)?;
        tracing::info!(target: TARGET, kind = %m.kind, slot = m.slot, root = %m.content_root.short(), "deleted old snapshot");
        Ok(())
    }
}

fn read_published(dir: &Path) -> Result<Snapshot, StoreError> {
    let manifest_path = dir.join(MANIFEST_FILE);
    let bytes = fs::read(&manifest_path).at(&manifest_path)?;
    let manifest = Manifest::decode(&bytes).map_err(|source| StoreError::Manifest {
        path: manifest_path.clone(),
        source,
    })?;
    let snap = Snapshot {
        manifest,
        dir: dir.to_path_buf(),
    };
    let tree = snap.manifest.chunk_tree();
    for (path, want) in [
        (snap.archive_path(), tree.size()),
        (snap.outboard_path(), tree.outboard_size()),
    ] {
        let got = fs::metadata(&path).at(&path)?.len();
        if got != want {
            return Err(StoreError::Io {
                path,
                source: io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{got} bytes, the manifest says {want}"),
                ),
            });
        }
    }
    Ok(snap)
}

/// A `.tmp-*` directory a snapshot is written in; removed on drop unless published.
#[derive(Debug)]
pub(crate) struct StagingDir {
    path: Option<PathBuf>,
}

impl StagingDir {
    pub(crate) fn path(&self) -> &Path {
        self.path
            .as_deref()
            .expect("staging dir present until published")
    }

    /// Publishes the directory's contents as a snapshot.
    pub(crate) fn publish(
        mut self,
        store: &SnapshotStore,
        manifest: Manifest,
    ) -> Result<Arc<Snapshot>, StoreError> {
        let path = self
            .path
            .take()
            .expect("staging dir present until published");
        let result = store.publish(&path, manifest);
        if result.is_err() {
            let _ = disk::remove_path(&path);
        }
        result
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        if let Some(path) = self.path.take()
            && let Err(e) = disk::remove_path(&path)
        {
            tracing::warn!(target: TARGET, path = %path.display(), error = %e, "could not remove a staging directory");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn partial(store: &SnapshotStore, root: ContentRoot, mib: usize) {
        let dir = store.partial_dir(&root, (mib as u64) << 20);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("archive.part"), vec![1u8; mib << 20]).unwrap();
        // Distinct modification times, oldest first.
        std::thread::sleep(std::time::Duration::from_millis(20));
    }

    #[test]
    fn partials_of_other_snapshots_are_kept_within_the_budget_newest_first() {
        let tmp = tempfile::tempdir().unwrap();
        let store = SnapshotStore::open(tmp.path()).unwrap();
        let (old, mid, new, current) = (
            ContentRoot([1; 32]),
            ContentRoot([2; 32]),
            ContentRoot([3; 32]),
            ContentRoot([4; 32]),
        );
        for root in [old, mid, new, current] {
            partial(&store, root, 1);
        }
        fs::create_dir(tmp.path().join(format!("{PARTIAL_PREFIX}not-a-root"))).unwrap();
        // Room for two of the others besides the download under way.
        let removed = store
            .trim_partials(&current, (2 << 20) + 4096, false)
            .unwrap();
        assert_eq!(removed, vec![old]);
        let roots_left = || -> Vec<_> {
            store
                .partials()
                .unwrap()
                .into_iter()
                .map(|p| p.root)
                .collect()
        };
        let left = roots_left();
        assert_eq!(left.len(), 3, "{left:?}");
        for root in [mid, new, current] {
            assert!(left.contains(&Some(root)));
        }
        // Within the budget, another attempt deletes nothing.
        assert!(
            store
                .trim_partials(&current, (2 << 20) + 4096, false)
                .unwrap()
                .is_empty()
        );
        // With no budget, only the download under way stays.
        store.trim_partials(&current, 0, false).unwrap();
        assert_eq!(roots_left(), vec![Some(current)]);
    }

    #[test]
    fn a_store_another_process_holds_is_refused_naming_its_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let store = SnapshotStore::open(tmp.path()).unwrap();
        // Opened again in this process: the same lock.
        let again = SnapshotStore::open(tmp.path()).unwrap();
        drop(store);
        drop(again);
        // Another process's lock (taken here on a file description of its own).
        let other = fs::File::open(tmp.path()).unwrap();
        other.lock().unwrap();
        let err = SnapshotStore::open(tmp.path()).unwrap_err();
        assert!(matches!(err, StoreError::InUse { .. }), "{err}");
        assert!(err.to_string().contains(&tmp.path().display().to_string()));
        other.unlock().unwrap();
        SnapshotStore::open(tmp.path()).unwrap();
    }

    #[tokio::test]
    async fn claimed_partials_are_never_trimmed_and_a_claim_waits_for_the_one_before() {
        let tmp = tempfile::tempdir().unwrap();
        let store = SnapshotStore::open(tmp.path()).unwrap();
        let (full, incremental) = (ContentRoot([1; 32]), ContentRoot([2; 32]));
        partial(&store, full, 1);
        partial(&store, incremental, 1);
        // The two legs of one sync: each trims with no budget, keeping only itself, but the
        // other's claim keeps it too.
        let full_claim = store.claim_partial(full).await;
        let inc_claim = store.claim_partial(incremental).await;
        assert!(
            store
                .trim_partials(&incremental, 0, true)
                .unwrap()
                .is_empty()
        );
        assert!(store.trim_partials(&full, 0, true).unwrap().is_empty());
        assert_eq!(store.partials().unwrap().len(), 2);
        // A second download of the same snapshot waits until the first lets go.
        let second = {
            let store = store.clone();
            tokio::spawn(async move { store.claim_partial(full).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!second.is_finished(), "waits while the first holds it");
        drop(full_claim);
        let again = tokio::time::timeout(Duration::from_secs(5), second)
            .await
            .expect("taken once released")
            .unwrap();
        drop(again);
        drop(inc_claim);
        // Released: trimmed like any other.
        assert_eq!(
            store
                .trim_partials(&ContentRoot([9; 32]), 0, true)
                .unwrap()
                .len(),
            2
        );
    }

    #[test]
    fn a_download_not_vouched_for_never_deletes_one_that_was() {
        let tmp = tempfile::tempdir().unwrap();
        let store = SnapshotStore::open(tmp.path()).unwrap();
        let (chosen, other, fake) = (
            ContentRoot([1; 32]),
            ContentRoot([2; 32]),
            ContentRoot([3; 32]),
        );
        partial(&store, chosen, 1);
        fs::write(store.partial_dir(&chosen, 1 << 20).join(VOUCHED_FILE), b"").unwrap();
        partial(&store, other, 1);
        // A root anyone may advertise, with no room at all: only the unvouched one goes.
        assert_eq!(store.trim_partials(&fake, 0, false).unwrap(), vec![other]);
        assert_eq!(store.partials().unwrap().len(), 1);
        // Another size claimed for the chosen root is another directory: it deletes nothing
        // of its own root.
        assert!(store.trim_partials(&chosen, 0, true).unwrap().is_empty());
        // One vouched for may.
        assert_eq!(store.trim_partials(&fake, 0, true).unwrap(), vec![chosen]);
    }
}
