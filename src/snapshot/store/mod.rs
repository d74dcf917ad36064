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
//!
//! The directory lock is `store/lock.rs`, the partial downloads (their claims, trimming them to
//! the disk budget) `store/partial.rs`, and the store's errors `store/error.rs`.

mod error;
mod lock;
mod partial;
#[cfg(test)]
mod tests;

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
use crate::snapshot::merge_attestations;
use crate::snapshot::{Attestation, AttestationError, Manifest};
use crate::transfer::exchange::Exchange;

pub(crate) use error::IoAt;
pub use error::StoreError;
use error::ensure_dir;
use lock::StoreLock;
use partial::Holds;
pub(crate) use partial::PartialClaim;

/// File name of the archive inside a snapshot directory.
pub const ARCHIVE_FILE: &str = "archive.zst";
/// File name of the outboard inside a snapshot directory.
pub const OUTBOARD_FILE: &str = "outboard.bao";
/// File name of the manifest inside a snapshot directory.
pub const MANIFEST_FILE: &str = "manifest.pb";
/// Name of the attestations file in a snapshot directory (absent when none was given).
pub const ATTESTATIONS_FILE: &str = "attestations.pb";

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

/// A published snapshot: its manifest and where its files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    manifest: Manifest,
    dir: PathBuf,
    attestations: Vec<Attestation>,
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

    /// The attestations stored with it, one per signer (at most
    /// [`MAX_ATTESTATIONS`](crate::snapshot::MAX_ATTESTATIONS)). Those this node stored were
    /// verified when stored; the file is read as it is on disk, so whoever counts them checks
    /// the signatures of the keys it trusts (as it does for any peer's).
    pub fn attestations(&self) -> &[Attestation] {
        &self.attestations
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
    full: usize,
    incremental: usize,
    serve_grace: Duration,
}

impl Retention {
    /// Sets how many full snapshots are kept, newest first (default 2; at least 1 always is).
    pub fn with_full(mut self, value: usize) -> Self {
        self.full = value;
        self
    }

    /// The value [`with_full`](Self::with_full) sets.
    pub fn full(&self) -> usize {
        self.full
    }

    /// Sets how many incremental snapshots are kept, newest first, among those whose base is
    /// kept (default 4).
    pub fn with_incremental(mut self, value: usize) -> Self {
        self.incremental = value;
        self
    }

    /// The value [`with_incremental`](Self::with_incremental) sets.
    pub fn incremental(&self) -> usize {
        self.incremental
    }

    /// Sets how recently a snapshot must have been served to be kept past its turn (default
    /// 5 min): a download that lasts longer than a retention period keeps its source.
    pub fn with_serve_grace(mut self, value: Duration) -> Self {
        self.serve_grace = value;
        self
    }

    /// The value [`with_serve_grace`](Self::with_serve_grace) sets.
    pub fn serve_grace(&self) -> Duration {
        self.serve_grace
    }
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
    /// What the streamer and the downloads share (the chunk stream's business: the store only
    /// carries it, as both hold the store).
    exchange: Arc<Exchange>,
    /// Held while a published snapshot's manifest or attestations are read, changed and
    /// written (the creator's thread and the behaviour both add attestations).
    changing: Mutex<()>,
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
                changing: Mutex::new(()),
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

    /// A fresh staging directory (`.tmp-*`) to write a snapshot into.
    pub(crate) fn staging(&self) -> Result<StagingDir, StoreError> {
        let path = self
            .inner
            .dir
            .join(format!("{TMP_PREFIX}{}", unique_suffix()));
        fs::create_dir(&path).at(&path)?;
        Ok(StagingDir { path: Some(path) })
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
        let attestations = read_attestations(&target);
        let snap = Arc::new(Snapshot {
            manifest,
            dir: target,
            attestations,
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
        self.change_published(root, |snap| {
            let manifest = Manifest {
                entry_count,
                state_bytes,
                ..snap.manifest.clone()
            };
            let path = snap.dir.join(MANIFEST_FILE);
            disk::replace_synced(&path, &manifest.encode()).at(&path)?;
            Ok(Some(Snapshot {
                manifest,
                ..snap.clone()
            }))
        })
    }

    /// Stores `attestations` with the published snapshot with `root`, beside those it has (one
    /// per signer, at most [`MAX_ATTESTATIONS`](crate::snapshot::MAX_ATTESTATIONS) in all; the
    /// file is replaced atomically). Each must verify for the snapshot on `network`, else
    /// nothing is stored and the error says whose did not.
    pub fn attest(
        &self,
        root: &ContentRoot,
        network: &str,
        attestations: &[Attestation],
    ) -> Result<Arc<Snapshot>, StoreError> {
        self.change_published(root, |snap| {
            let key = snap.manifest.key();
            if let Some(bad) = attestations.iter().find(|a| !a.verify(network, &key)) {
                return Err(StoreError::Attestation {
                    path: snap.dir.clone(),
                    source: AttestationError::Invalid {
                        signer: bad.signer(),
                    },
                });
            }
            let mut list = snap.attestations.clone();
            if !merge_attestations(&mut list, attestations) {
                return Ok(None);
            }
            let path = snap.dir.join(ATTESTATIONS_FILE);
            disk::replace_synced(&path, &Attestation::encode_file(&list)).at(&path)?;
            Ok(Some(Snapshot {
                attestations: list,
                ..snap.clone()
            }))
        })
    }

    /// Changes the published snapshot with `root` by `change` (which writes its files and
    /// returns it as it is now, or `None` when nothing changed): one change of a published
    /// snapshot at once (the creator's thread and the behaviour both make some), and one
    /// deleted meanwhile is not put back.
    fn change_published(
        &self,
        root: &ContentRoot,
        change: impl FnOnce(&Snapshot) -> Result<Option<Snapshot>, StoreError>,
    ) -> Result<Arc<Snapshot>, StoreError> {
        let _one = self
            .inner
            .changing
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let snap = self.get(root).ok_or_else(|| StoreError::Io {
            path: self.inner.dir.clone(),
            source: io::Error::new(io::ErrorKind::NotFound, "no such snapshot"),
        })?;
        let Some(changed) = change(&snap)? else {
            return Ok(snap);
        };
        let changed = Arc::new(changed);
        let m = &changed.manifest;
        if let Some(held) = self.index().get_mut(&(m.slot, m.content_root)) {
            *held = changed.clone();
        }
        Ok(changed)
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
        attestations: read_attestations(dir),
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

/// The attestations stored in snapshot directory `dir`: none when there is no file; a file that
/// cannot be read counts as none (logged), it never hides the snapshot.
fn read_attestations(dir: &Path) -> Vec<Attestation> {
    let path = dir.join(ATTESTATIONS_FILE);
    let read = disk::read_bounded(&path, crate::snapshot::MAX_ATTESTATIONS_BYTES as u64);
    match read {
        Ok(Some(bytes)) => match Attestation::decode_file(&bytes) {
            Ok(read) => {
                // One per signer, as stored.
                let mut list = Vec::new();
                merge_attestations(&mut list, &read);
                list
            }
            Err(e) => {
                tracing::warn!(target: TARGET, path = %path.display(), error = %e, "ignoring an unreadable attestations file");
                Vec::new()
            }
        },
        Ok(None) => Vec::new(),
        Err(e) => {
            tracing::warn!(target: TARGET, path = %path.display(), error = %e, "ignoring an unreadable attestations file");
            Vec::new()
        }
    }
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
