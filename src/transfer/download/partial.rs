//! A download's state on disk, for resume: `.partial-<root>/archive.part` (the archive being
//! filled in at chunk offsets), `.partial-<root>/outboard.bao` (the tree nodes that came with
//! the chunks' proofs) and `.partial-<root>/progress` (which chunks are on disk). Every disk
//! step of a download is here: opening (within the budget left to other partial downloads),
//! reserving, making progress durable in the background ([`Persister`]), and publishing the
//! completed archive; the download's loop only schedules and moves bytes.
//!
//! The files are created empty when a download starts and given their full size (the disk
//! space reserved, after checking there is room) only once a peer that proved the token has
//! served a manifest matching the advertisement: an advertisement alone reserves nothing. The
//! progress file is only ever written after both files have been fsynced with every chunk it
//! marks, and it is replaced atomically (write, fsync, rename), so after a crash every chunk it
//! marks is on disk, with its proof nodes, and was verified before it was written.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use super::DownloadError;
use super::bits::Bits;
use crate::chunk::ChunkTree;
use crate::disk;
use crate::snapshot::{
    ARCHIVE_FILE, IoAt, Manifest, OUTBOARD_FILE, Snapshot, SnapshotStore, StoreError,
};

const MAGIC: &[u8; 8] = b"SNAPPROG";
const VERSION: u32 = 1;
const HEADER: usize = 8 + 4 + 32 + 8 + 4 + 8;

/// File names inside a partial directory.
pub(crate) const PART_FILE: &str = "archive.part";
const PROGRESS_FILE: &str = "progress";

/// The partial download of one archive.
#[derive(Debug)]
pub(crate) struct Partial {
    dir: PathBuf,
    tree: ChunkTree,
    file: File,
    outboard: File,
}

fn open_rw(path: &Path) -> Result<File, StoreError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .at(path)
}

/// Runs blocking disk work off the async threads; a task that ends without a result is a
/// cancelled download.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, DownloadError> + Send + 'static,
) -> Result<T, DownloadError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|_| DownloadError::Cancelled)?
}

impl Partial {
    /// Opens the partial download of `tree` in `store`, first keeping the partial downloads of
    /// other snapshots within `budget` bytes (the least recently touched go first). Returns it
    /// with the chunks already on disk.
    pub(crate) async fn open_in(
        store: &SnapshotStore,
        tree: ChunkTree,
        budget: u64,
    ) -> Result<(Self, Bits), DownloadError> {
        let store = store.clone();
        blocking(move || {
            let root = tree.root();
            store.trim_partials(&[root], budget)?;
            Ok(Partial::open(store.partial_dir(&root), tree)?)
        })
        .await
    }

    /// [`Partial::reserve`] in the background; a disk too full first makes room by deleting
    /// the partial downloads of other snapshots.
    pub(crate) async fn reserve_in(
        &self,
        store: &SnapshotStore,
        headroom: u64,
    ) -> Result<(), DownloadError> {
        let (partial, store) = (Partial::reopen(self)?, store.clone());
        blocking(move || match partial.reserve(headroom) {
            Err(StoreError::DiskFull { .. }) => {
                store.trim_partials(&[partial.tree.root()], 0)?;
                Ok(partial.reserve(headroom)?)
            }
            other => Ok(other?),
        })
        .await
    }

    /// Every chunk is in, each checked against the root before it was written, and the proofs'
    /// nodes make the outboard: checks the outboard is whole, makes it all durable and
    /// publishes it in `store` with `manifest`. A partial download whose outboard is not whole
    /// (local disk corruption) is discarded.
    pub(crate) async fn publish_in(
        self,
        store: &SnapshotStore,
        manifest: Manifest,
    ) -> Result<Arc<Snapshot>, DownloadError> {
        let store = store.clone();
        blocking(move || {
            let outboard = self.dir.join(OUTBOARD_FILE);
            self.sync()?;
            let complete = self
                .tree
                .outboard_is_complete(&outboard)
                .map_err(|e| StoreError::at(&outboard, e))?;
            if !complete {
                let _ = disk::remove_path(&self.dir);
                return Err(DownloadError::Corrupted {
                    expected: self.tree.root(),
                });
            }
            let archive = self.dir.join(ARCHIVE_FILE);
            fs::rename(self.dir.join(PART_FILE), &archive).at(&archive)?;
            self.forget_progress()?;
            Ok(store.publish(&self.dir, manifest)?)
        })
        .await
    }

    /// Opens (or starts, with empty files) the partial download of `tree` in `dir`, reserving
    /// nothing yet. Returns it with the chunks already on disk: those of saved progress for this
    /// very archive with files of the right sizes, else none.
    pub(crate) fn open(dir: PathBuf, tree: ChunkTree) -> Result<(Self, Bits), StoreError> {
        fs::create_dir_all(&dir).at(&dir)?;
        let part = dir.join(PART_FILE);
        let ob = dir.join(OUTBOARD_FILE);
        let file = open_rw(&part)?;
        let outboard = open_rw(&ob)?;
        let count = tree.chunk_count() as usize;
        let p = Self {
            dir,
            tree,
            file,
            outboard,
        };
        let done = match read_progress(&p.dir.join(PROGRESS_FILE), &tree) {
            Some(done) if done.ones() > 0 && p.is_reserved()? => done,
            _ => Bits::new(count),
        };
        Ok((p, done))
    }

    /// Whether both files have their full sizes.
    pub(crate) fn is_reserved(&self) -> Result<bool, StoreError> {
        let len = self.file.metadata().at(&self.dir.join(PART_FILE))?.len();
        let ob_len = self
            .outboard
            .metadata()
            .at(&self.dir.join(OUTBOARD_FILE))?
            .len();
        Ok(len == self.tree.size() && ob_len == self.tree.outboard_size())
    }

    /// Gives both files their full sizes, reserving the disk space, once the disk is known to
    /// have room for them and `headroom` bytes more. Starts over: any saved progress is dropped.
    pub(crate) fn reserve(&self, headroom: u64) -> Result<(), StoreError> {
        let need = self.tree.size() + self.tree.outboard_size();
        let free = disk::free_space(&self.dir).at(&self.dir)?;
        if free < need.saturating_add(headroom) {
            return Err(StoreError::DiskFull {
                path: self.dir.clone(),
                source: io::Error::new(
                    io::ErrorKind::StorageFull,
                    format!(
                        "the download needs {need} bytes and {headroom} to spare; {free} are free"
                    ),
                ),
            });
        }
        self.forget_progress()?;
        let part = self.dir.join(PART_FILE);
        disk::preallocate(&self.file, self.tree.size()).at(&part)?;
        let ob = self.dir.join(OUTBOARD_FILE);
        disk::preallocate(&self.outboard, self.tree.outboard_size()).at(&ob)
    }

    /// Another handle on the same partial download (for blocking work on another thread).
    pub(crate) fn reopen(other: &Partial) -> Result<Self, StoreError> {
        Ok(Self {
            dir: other.dir.clone(),
            tree: other.tree,
            file: other.file.try_clone().at(&other.dir.join(PART_FILE))?,
            outboard: other
                .outboard
                .try_clone()
                .at(&other.dir.join(OUTBOARD_FILE))?,
        })
    }

    pub(crate) fn outboard(&self) -> &File {
        &self.outboard
    }

    /// Makes both files durable.
    pub(crate) fn sync(&self) -> Result<(), StoreError> {
        self.file.sync_data().at(&self.dir.join(PART_FILE))?;
        self.outboard.sync_data().at(&self.dir.join(OUTBOARD_FILE))
    }

    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Makes the archive durable, then records `done` as the chunks on disk.
    pub(crate) fn persist(&self, done: &Bits) -> Result<(), StoreError> {
        self.sync()?;
        let target = self.dir.join(PROGRESS_FILE);
        disk::replace_synced(&target, &progress_bytes(&self.tree, done)).at(&target)
    }

    /// Removes the saved progress (before the directory is published as a snapshot).
    pub(crate) fn forget_progress(&self) -> Result<(), StoreError> {
        let p = self.dir.join(PROGRESS_FILE);
        match fs::remove_file(&p) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(StoreError::at(&p, e)),
            _ => Ok(()),
        }
    }
}

/// Makes a download's progress durable in the background, one write at a time, remembering how
/// far the last one reached.
#[derive(Debug)]
pub(crate) struct Persister {
    partial: Partial,
    running: Option<tokio::task::JoinHandle<Result<u64, StoreError>>>,
    persisted: u64,
}

impl Persister {
    /// A persister of `partial`'s progress, of which `persisted` bytes are durable already.
    pub(crate) fn new(partial: &Partial, persisted: u64) -> Result<Self, StoreError> {
        Ok(Self {
            partial: Partial::reopen(partial)?,
            running: None,
            persisted,
        })
    }

    /// Starts recording `marks` (`done` bytes) as the chunks on disk, unless a write is under
    /// way or nothing is new. Every chunk marked was written before the fsync this makes.
    pub(crate) fn start(&mut self, marks: &Bits, done: u64) -> Result<(), StoreError> {
        if self.running.is_some() || done == self.persisted {
            return Ok(());
        }
        let (partial, marks) = (Partial::reopen(&self.partial)?, marks.clone());
        self.running = Some(tokio::task::spawn_blocking(move || {
            partial.persist(&marks).map(|()| done)
        }));
        Ok(())
    }

    /// Whether a write is under way.
    pub(crate) fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Waits for the write under way, if any, and records how far it reached.
    pub(crate) async fn wait(&mut self) -> Result<(), DownloadError> {
        if let Some(running) = self.running.as_mut() {
            let result = running.await;
            self.running = None;
            let done = result.map_err(|_| DownloadError::Cancelled)??;
            self.persisted = self.persisted.max(done);
        }
        Ok(())
    }

    /// Makes `marks` durable now: waits for the write under way, then writes them.
    pub(crate) async fn flush(&mut self, marks: &Bits, done: u64) -> Result<(), DownloadError> {
        self.wait().await?;
        self.start(marks, done)?;
        self.wait().await
    }
}

/// The progress file of `tree`'s archive with chunks `done` on disk.
pub(crate) fn progress_bytes(tree: &ChunkTree, done: &Bits) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(HEADER + done.len().div_ceil(8));
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&VERSION.to_le_bytes());
    bytes.extend_from_slice(tree.root().as_bytes());
    bytes.extend_from_slice(&tree.size().to_le_bytes());
    bytes.extend_from_slice(&tree.chunk_size().bytes().to_le_bytes());
    bytes.extend_from_slice(&(done.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&done.to_bytes());
    bytes
}

fn read_progress(path: &Path, tree: &ChunkTree) -> Option<Bits> {
    // The file is read only if it has exactly the size this archive's progress takes.
    let expected = HEADER as u64 + tree.chunk_count().div_ceil(8);
    if fs::metadata(path).ok()?.len() != expected {
        return None;
    }
    parse_progress(&fs::read(path).ok()?, tree)
}

/// Parses a progress file's bytes; `None` unless they are the progress of `tree`'s archive.
pub(crate) fn parse_progress(bytes: &[u8], tree: &ChunkTree) -> Option<Bits> {
    if bytes.len() < HEADER || &bytes[..8] != MAGIC {
        return None;
    }
    let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
    let u64_at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
    if u32_at(8) != VERSION
        || bytes[12..44] != tree.root().0
        || u64_at(44) != tree.size()
        || u32_at(52) != tree.chunk_size().bytes()
    {
        return None;
    }
    let count = u64_at(56) as usize;
    if count != tree.chunk_count() as usize {
        return None;
    }
    Bits::from_bytes(&bytes[HEADER..], count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::ChunkSize;
    use crate::hash::ContentRoot;

    #[test]
    fn progress_round_trips_and_other_archives_start_over() {
        let tmp = tempfile::tempdir().unwrap();
        let tree = ChunkTree::new(100_000, ChunkSize::MIN, ContentRoot([3; 32]));
        let dir = tmp.path().join("p");
        let (p, done) = Partial::open(dir.clone(), tree).unwrap();
        assert_eq!(done, Bits::new(98));
        assert!(
            !p.is_reserved().unwrap(),
            "nothing reserved before it is asked for"
        );
        p.reserve(0).unwrap();
        assert!(p.is_reserved().unwrap());
        // A disk too small for the download and its headroom is refused before anything.
        assert!(matches!(
            p.reserve(u64::MAX / 2),
            Err(StoreError::DiskFull { .. })
        ));
        let mut marks = done.clone();
        for i in [0, 7, 8, 50, 97] {
            marks.set(i);
        }
        p.persist(&marks).unwrap();
        drop(p);
        let (_p, again) = Partial::open(dir.clone(), tree).unwrap();
        assert_eq!(again, marks);
        assert_eq!(
            std::fs::metadata(tmp.path().join("p").join(OUTBOARD_FILE))
                .unwrap()
                .len(),
            tree.outboard_size()
        );
        // Another root: the saved progress is not trusted.
        let other = ChunkTree::new(100_000, ChunkSize::MIN, ContentRoot([4; 32]));
        let (_p, fresh) = Partial::open(dir, other).unwrap();
        assert_eq!(fresh.ones(), 0);
    }
}
