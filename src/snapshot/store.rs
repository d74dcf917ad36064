//! [`SnapshotStore`]: the directory of published snapshots.
//!
//! ```text
//! <dir>/
//!   snapshot-<slot, 20 digits>-<first 16 hex of the content root>/   a published snapshot
//!     archive.zst      the archive
//!     outboard.bao     BLAKE3 tree nodes for serving verifiable chunks
//!     manifest.pb      the Manifest (protobuf)
//!   .tmp-*/            a snapshot being written (removed at open: an interrupted creation)
//!   .trash-*/          a snapshot being deleted (removed at open)
//!   .partial-<root>/   a download in progress, kept for resume
//! ```
//!
//! A snapshot is written completely inside a `.tmp-*` directory, every file fsynced, then the
//! directory is renamed to its final name and the parent fsynced. The rename is the commit
//! point: a crash at any moment leaves either no snapshot or a complete one, never a partial
//! snapshot that looks complete.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::hash::ContentRoot;
use crate::snapshot::{Manifest, ManifestError};

/// File name of the archive inside a snapshot directory.
pub const ARCHIVE_FILE: &str = "archive.zst";
/// File name of the outboard inside a snapshot directory.
pub const OUTBOARD_FILE: &str = "outboard.bao";
/// File name of the manifest inside a snapshot directory.
pub const MANIFEST_FILE: &str = "manifest.pb";

const SNAPSHOT_PREFIX: &str = "snapshot-";
const TMP_PREFIX: &str = ".tmp-";
const TRASH_PREFIX: &str = ".trash-";
pub(crate) const PARTIAL_PREFIX: &str = ".partial-";

/// A file-system operation of the snapshot store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The directory or file cannot be written (permissions, read-only file system).
    #[error("snapshot directory is not writable: {path}: {source}")]
    NotWritable {
        /// The path that could not be written.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The disk (or quota) is full.
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
    /// Classifies an I/O error at `path`: full disk, not writable, or other.
    pub(crate) fn at(path: &Path, source: io::Error) -> Self {
        let path = path.to_path_buf();
        match source.kind() {
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => {
                StoreError::DiskFull { path, source }
            }
            io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => {
                StoreError::NotWritable { path, source }
            }
            _ => StoreError::Io { path, source },
        }
    }

    /// The path the error is about.
    pub fn path(&self) -> &Path {
        match self {
            StoreError::NotWritable { path, .. }
            | StoreError::DiskFull { path, .. }
            | StoreError::Io { path, .. }
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

    /// Opens the archive and outboard for serving chunks.
    pub fn chunk_source(&self) -> io::Result<crate::chunk::ChunkSource> {
        crate::chunk::ChunkSource::open(
            self.manifest.chunk_tree(),
            &self.archive_path(),
            &self.outboard_path(),
        )
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
    index: Mutex<Index>,
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

/// Writes `bytes` to `path` and fsyncs it.
pub(crate) fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let mut f = fs::File::create(path).at(path)?;
    f.write_all(bytes).at(path)?;
    f.sync_all().at(path)
}

/// A file being written sequentially that asks the kernel to start writing back every
/// [`WRITEBACK_BYTES`] as it goes (Linux `sync_file_range`), so that the final fsync finds
/// little left to do and the disk works while the data is still being produced.
pub(crate) struct WritebackFile {
    file: fs::File,
    written: u64,
    flushed_to: u64,
}

/// How much a [`WritebackFile`] writes before it starts writeback of it.
const WRITEBACK_BYTES: u64 = 16 << 20;

impl WritebackFile {
    pub(crate) fn new(file: fs::File) -> Self {
        Self {
            file,
            written: 0,
            flushed_to: 0,
        }
    }

    /// Fsyncs the file and returns it.
    pub(crate) fn sync(self) -> io::Result<fs::File> {
        self.file.sync_all()?;
        Ok(self.file)
    }

    #[cfg(target_os = "linux")]
    fn start_writeback(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: sync_file_range only reads its integer arguments; a failure is harmless
        // because the final fsync writes everything anyway.
        unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                self.flushed_to as libc::off64_t,
                (self.written - self.flushed_to) as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
        self.flushed_to = self.written;
    }

    #[cfg(not(target_os = "linux"))]
    fn start_writeback(&mut self) {
        self.flushed_to = self.written;
    }
}

impl Write for WritebackFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.written += n as u64;
        if self.written - self.flushed_to >= WRITEBACK_BYTES {
            self.start_writeback();
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// Fsyncs a directory so that renames and unlinks in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    fs::File::open(dir).and_then(|d| d.sync_all()).at(dir)
}

impl SnapshotStore {
    /// Opens (creating it if needed) the snapshot directory `dir`: removes what interrupted
    /// creations and deletions left behind, and indexes the published snapshots. A published
    /// snapshot whose files do not match its manifest is removed with a warning.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let dir = dir.into();
        fs::create_dir_all(&dir).at(&dir)?;
        let mut index = Index::new();
        for entry in fs::read_dir(&dir).at(&dir)? {
            let entry = entry.at(&dir)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if name.starts_with(TMP_PREFIX) || name.starts_with(TRASH_PREFIX) {
                tracing::info!(target: "NETWORK:SNAPSHOT", path = %path.display(), "removing leftovers of an interrupted snapshot write");
                remove_path(&path)?;
            } else if name.starts_with(SNAPSHOT_PREFIX) {
                match read_published(&path) {
                    Ok(snap) => {
                        let m = &snap.manifest;
                        index.insert((m.slot, m.content_root), Arc::new(snap));
                    }
                    Err(e) => {
                        tracing::warn!(target: "NETWORK:SNAPSHOT", path = %path.display(), error = %e, "removing an invalid snapshot");
                        remove_path(&path)?;
                    }
                }
            }
        }
        let store = Self {
            inner: Arc::new(StoreInner {
                dir,
                index: Mutex::new(index),
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

    /// Published snapshots, oldest slot first.
    pub fn list(&self) -> Vec<Arc<Snapshot>> {
        self.index().values().cloned().collect()
    }

    /// The published snapshot with the highest slot.
    pub fn latest(&self) -> Option<Arc<Snapshot>> {
        self.index().values().next_back().cloned()
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

    /// A fresh staging directory (`.tmp-*`) to write a snapshot into.
    pub(crate) fn staging(&self) -> Result<StagingDir, StoreError> {
        let path = self
            .inner
            .dir
            .join(format!("{TMP_PREFIX}{}", unique_suffix()));
        fs::create_dir(&path).at(&path)?;
        Ok(StagingDir { path: Some(path) })
    }

    /// Directory a download of `root` keeps its partial archive in (for resume).
    pub(crate) fn partial_dir(&self, root: &ContentRoot) -> PathBuf {
        self.inner
            .dir
            .join(format!("{PARTIAL_PREFIX}{}", root.to_hex()))
    }

    /// Removes the partial downloads of archives other than `keep` (one download at a time).
    pub(crate) fn remove_other_partials(&self, keep: &ContentRoot) -> Result<(), StoreError> {
        let keep = format!("{PARTIAL_PREFIX}{}", keep.to_hex());
        for entry in fs::read_dir(&self.inner.dir).at(&self.inner.dir)?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(PARTIAL_PREFIX) && name != keep {
                tracing::info!(target: "SNAPSHOT DOWNLOAD", path = %entry.path().display(), "removing an abandoned partial download");
                remove_path(&entry.path())?;
            }
        }
        Ok(())
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
            remove_path(dir)?;
            return Ok(existing);
        }
        write_synced(&dir.join(MANIFEST_FILE), &manifest.encode())?;
        sync_dir(dir)?;
        let name = format!(
            "{SNAPSHOT_PREFIX}{:020}-{}",
            manifest.slot,
            &manifest.content_root.to_hex()[..16]
        );
        let target = self.inner.dir.join(name);
        fs::rename(dir, &target).at(&target)?;
        sync_dir(&self.inner.dir)?;
        let snap = Arc::new(Snapshot {
            manifest,
            dir: target,
        });
        let m = &snap.manifest;
        self.index().insert((m.slot, m.content_root), snap.clone());
        Ok(snap)
    }

    /// Keeps the `keep` snapshots with the highest slots and deletes the others (at least one is
    /// always kept). Returns the manifests of the deleted ones.
    pub fn retain(&self, keep: usize) -> Result<Vec<Manifest>, StoreError> {
        let keep = keep.max(1);
        let doomed: Vec<Arc<Snapshot>> = {
            let index = self.index();
            let n = index.len().saturating_sub(keep);
            index.values().take(n).cloned().collect()
        };
        let mut removed = Vec::new();
        for snap in doomed {
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
        sync_dir(&self.inner.dir)?;
        remove_path(&trash)?;
        tracing::info!(target: "NETWORK:SNAPSHOT", slot = m.slot, root = %m.content_root.short(), "deleted old snapshot");
        Ok(())
    }
}

fn remove_path(path: &Path) -> Result<(), StoreError> {
    let result = if path.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    };
    match result {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(StoreError::at(path, e)),
        _ => Ok(()),
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
            let _ = remove_path(&path);
        }
        result
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        if let Some(path) = self.path.take()
            && let Err(e) = remove_path(&path)
        {
            tracing::warn!(path = %path.display(), error = %e, "could not remove a staging directory");
        }
    }
}
