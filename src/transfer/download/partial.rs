//! A download's state on disk, for resume, in `.partial-<root>-<size>/`: the directory is keyed
//! by what fixes the archive's bytes, so no other archive touches it (another size claimed for
//! the same root, another root for the same slot), and every chunk size of this archive shares
//! it. Inside: `archive.part` (the archive being filled in at chunk offsets), `outboard.bao`
//! (the tree nodes that came with the chunks' proofs, for the chunk size of the progress),
//! `progress` (which chunks are on disk, and in which chunk size) and, when the trust policy
//! vouched for the download, `vouched` (see [`SnapshotStore::trim_partials`]). Every disk step
//! of a download is here: opening, reserving (within the budget left to other partial
//! downloads), making progress durable in the background ([`Persister`]), and publishing the
//! completed archive; the download's loop only schedules and moves bytes.
//!
//! The files are created empty when a download starts and given their full size (the disk
//! space reserved, after checking there is room) only once a peer that proved the token has
//! served a manifest matching the advertisement: an advertisement alone reserves nothing, and
//! nothing is ever truncated (the bytes at an offset are the same whoever asks). The progress
//! file is only ever written after both files have been fsynced with every chunk it marks, and
//! it is replaced atomically (write, fsync, rename), so after a crash every chunk it marks is
//! on disk, with its proof nodes, and was verified before it was written.
//!
//! The same archive chosen in another chunk size keeps its bytes: the chunks wholly covered by
//! chunks on disk count as done, and the outboard (whose nodes depend on the chunk size) is
//! then made from the archive at the end, which must hash to the root. A crash between moving
//! the completed archive into place and publishing it leaves `archive.zst` in the directory:
//! it is taken back as it is.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use super::DownloadError;
use super::bits::Bits;
use crate::chunk::{ChunkSize, ChunkTree};
use crate::disk;
use crate::snapshot::{
    ARCHIVE_FILE, IoAt, Manifest, OUTBOARD_FILE, Snapshot, SnapshotStore, StoreError, VOUCHED_FILE,
};

const MAGIC: &[u8; 8] = b"SNAPPROG";
/// Version 2 adds the flags; version 1 (without them) is still read.
const VERSION: u32 = 2;
const HEADER_V1: usize = 8 + 4 + 32 + 8 + 4 + 8;
const HEADER: usize = HEADER_V1 + 4;
/// Flag: some chunks marked came from another chunk size's progress, so the outboard lacks
/// their nodes (it is made from the archive at the end, and they are not served meanwhile).
const DERIVED: u32 = 1;

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
    /// Chunks came from another chunk size's progress (see [`DERIVED`]).
    derived: bool,
}

/// Saved progress, as read from disk.
#[derive(Debug, PartialEq)]
pub(crate) struct Progress {
    chunk_size: ChunkSize,
    done: Bits,
    derived: bool,
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

/// The directory of the download of `tree`'s archive in `store`; one an earlier version kept
/// by the root alone is moved there first.
pub(crate) fn dir_of(store: &SnapshotStore, tree: &ChunkTree) -> PathBuf {
    let dir = store.partial_dir(&tree.root(), tree.size());
    let legacy = store.legacy_partial_dir(&tree.root());
    if !dir.exists() && legacy.is_dir() {
        // Its progress names its size: read for another size, it is not taken.
        let _ = fs::rename(&legacy, &dir);
    }
    dir
}

/// The archive file a reader of the download in `dir` opens: `archive.part`, or the completed
/// `archive.zst` a crash left before publishing (the same file once it is taken back).
pub(crate) fn archive_in(dir: &Path) -> io::Result<File> {
    let (part, complete) = (dir.join(PART_FILE), dir.join(ARCHIVE_FILE));
    if !part.exists() && complete.exists() {
        return OpenOptions::new().read(true).open(complete);
    }
    fs::create_dir_all(dir)?;
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(part)
}

impl Partial {
    /// Opens the partial download of `tree` in `store` (`vouched`: the trust policy vouched
    /// for it). Returns it with the chunks already on disk. Nothing else on disk is touched.
    pub(crate) async fn open_in(
        store: &SnapshotStore,
        tree: ChunkTree,
        vouched: bool,
    ) -> Result<(Self, Bits), DownloadError> {
        let store = store.clone();
        blocking(move || {
            let dir = dir_of(&store, &tree);
            let opened = Partial::open(dir.clone(), tree)?;
            if vouched {
                let marker = dir.join(VOUCHED_FILE);
                disk::write_synced(&marker, b"").at(&marker)?;
            }
            Ok(opened)
        })
        .await
    }

    /// [`Partial::reserve`] in the background, first keeping the partial downloads of other
    /// archives within `budget` bytes; a disk too full then makes room by deleting them all.
    /// Only a download the policy vouched for (`vouched`) deletes one it vouched for.
    pub(crate) async fn reserve_in(
        &self,
        store: &SnapshotStore,
        headroom: u64,
        budget: u64,
        vouched: bool,
    ) -> Result<(), DownloadError> {
        let (partial, store) = (Partial::reopen(self)?, store.clone());
        blocking(move || {
            let root = partial.tree.root();
            store.trim_partials(&root, budget, vouched)?;
            match partial.reserve(headroom) {
                Err(StoreError::DiskFull { .. }) => {
                    store.trim_partials(&root, 0, vouched)?;
                    Ok(partial.reserve(headroom)?)
                }
                other => Ok(other?),
            }
        })
        .await
    }

    /// Every chunk is in, each checked against the root before it was written: makes it all
    /// durable and publishes it in `store` with `manifest`. The outboard is the proofs' nodes;
    /// when they do not make it whole (chunks kept from another chunk size, or local disk
    /// damage), it is made from the archive, which must hash to the root, else the partial
    /// download is discarded.
    pub(crate) async fn publish_in(
        self,
        store: &SnapshotStore,
        manifest: Manifest,
    ) -> Result<Arc<Snapshot>, DownloadError> {
        let store = store.clone();
        blocking(move || {
            let outboard = self.dir.join(OUTBOARD_FILE);
            let part = self.dir.join(PART_FILE);
            self.sync()?;
            let complete = !self.derived
                && self
                    .tree
                    .outboard_is_complete(&outboard)
                    .map_err(|e| StoreError::at(&outboard, e))?;
            if !complete {
                let made = crate::chunk::write_outboard(&part, self.tree.chunk_size(), &outboard)
                    .map_err(|e| StoreError::at(&outboard, e))?;
                if made != (self.tree.root(), self.tree.size()) {
                    let _ = disk::remove_path(&self.dir);
                    return Err(DownloadError::Corrupted {
                        expected: self.tree.root(),
                    });
                }
            }
            let archive = self.dir.join(ARCHIVE_FILE);
            fs::rename(&part, &archive).at(&archive)?;
            self.forget_progress()?;
            let marker = self.dir.join(VOUCHED_FILE);
            if let Err(e) = fs::remove_file(&marker)
                && e.kind() != io::ErrorKind::NotFound
            {
                return Err(StoreError::at(&marker, e).into());
            }
            Ok(store.publish(&self.dir, manifest)?)
        })
        .await
    }

    /// Opens (or starts, with empty files) the partial download of `tree` in `dir`, reserving
    /// nothing yet. Returns it with the chunks already on disk: those of saved progress for
    /// this archive (in its chunk size, or carried over from another) with the files of the
    /// right sizes, all of a completed archive a crash left unpublished, else none.
    pub(crate) fn open(dir: PathBuf, tree: ChunkTree) -> Result<(Self, Bits), StoreError> {
        fs::create_dir_all(&dir).at(&dir)?;
        let part = dir.join(PART_FILE);
        let complete = dir.join(ARCHIVE_FILE);
        // A crash after the completed archive was moved into place, before it was published.
        let recovered = complete.exists();
        if recovered {
            fs::rename(&complete, &part).at(&part)?;
        }
        let ob = dir.join(OUTBOARD_FILE);
        let file = open_rw(&part)?;
        let outboard = open_rw(&ob)?;
        let count = tree.chunk_count() as usize;
        let mut p = Self {
            dir,
            tree,
            file,
            outboard,
            derived: false,
        };
        let archive_full = p.file.metadata().at(&part)?.len() == tree.size();
        let done = match read_progress(&p.dir.join(PROGRESS_FILE), &tree) {
            Some(saved) if saved.done.ones() == 0 || !archive_full => Bits::new(count),
            Some(saved) if saved.chunk_size == tree.chunk_size() => {
                p.derived = saved.derived;
                if p.is_reserved()? {
                    saved.done
                } else {
                    Bits::new(count)
                }
            }
            Some(saved) => {
                // The same bytes in other chunks: what they cover counts; the outboard's nodes
                // were another tree's.
                let done = convert(&saved.done, saved.chunk_size, &tree);
                p.outboard.set_len(0).at(&ob)?;
                p.derived = true;
                p.persist(&done)?;
                done
            }
            None if recovered && archive_full && p.is_reserved()? => {
                let whole = tree
                    .outboard_is_complete(&ob)
                    .map_err(|e| StoreError::at(&ob, e))?;
                let mut done = Bits::new(count);
                if whole {
                    (0..count).for_each(|i| done.set(i));
                }
                done
            }
            None => Bits::new(count),
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

    /// Whether chunks came from another chunk size's progress: their proof nodes are not in
    /// the outboard, so they are not served before the download is published.
    pub(crate) fn derived(&self) -> bool {
        self.derived
    }

    /// Gives both files their full sizes, reserving the disk space, once the disk is known to
    /// have room for what they lack and `headroom` bytes more. What is on disk stays.
    pub(crate) fn reserve(&self, headroom: u64) -> Result<(), StoreError> {
        let (part, ob) = (self.dir.join(PART_FILE), self.dir.join(OUTBOARD_FILE));
        let lacking = |file: &File, path: &Path, len: u64| -> Result<u64, StoreError> {
            let allocated = std::os::unix::fs::MetadataExt::blocks(&file.metadata().at(path)?);
            Ok(len.saturating_sub(allocated * 512))
        };
        let need = lacking(&self.file, &part, self.tree.size())?
            + lacking(&self.outboard, &ob, self.tree.outboard_size())?;
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
        disk::preallocate(&self.file, self.tree.size()).at(&part)?;
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
            derived: other.derived,
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
        let bytes = progress_bytes(&self.tree, done, self.derived);
        disk::replace_synced(&target, &bytes).at(&target)
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

/// The chunks of `tree` wholly covered by chunks `done` of the same archive in chunks of
/// `from`.
fn convert(done: &Bits, from: ChunkSize, tree: &ChunkTree) -> Bits {
    let (old, new) = (
        u64::from(from.bytes()),
        u64::from(tree.chunk_size().bytes()),
    );
    let count = tree.chunk_count();
    let mut out = Bits::new(count as usize);
    for c in 0..count {
        let start = c * new;
        let end = ((c + 1) * new).min(tree.size()).max(start + 1);
        let covered = (start / old..end.div_ceil(old)).all(|o| done.get(o as usize));
        if covered {
            out.set(c as usize);
        }
    }
    out
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

/// The progress file of `tree`'s archive with chunks `done` on disk (`derived`: see
/// [`DERIVED`]).
pub(crate) fn progress_bytes(tree: &ChunkTree, done: &Bits, derived: bool) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(HEADER + done.len().div_ceil(8));
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&VERSION.to_le_bytes());
    bytes.extend_from_slice(tree.root().as_bytes());
    bytes.extend_from_slice(&tree.size().to_le_bytes());
    bytes.extend_from_slice(&tree.chunk_size().bytes().to_le_bytes());
    bytes.extend_from_slice(&(done.len() as u64).to_le_bytes());
    let flags = if derived { DERIVED } else { 0 };
    bytes.extend_from_slice(&flags.to_le_bytes());
    bytes.extend_from_slice(&done.to_bytes());
    bytes
}

fn read_progress(path: &Path, tree: &ChunkTree) -> Option<Progress> {
    // Read only if no longer than the progress of this archive in its smallest chunks.
    let most = HEADER as u64
        + tree
            .size()
            .div_ceil(u64::from(ChunkSize::MIN.bytes()))
            .div_ceil(8)
        + 1;
    if fs::metadata(path).ok()?.len() > most {
        return None;
    }
    parse_progress(&fs::read(path).ok()?, tree)
}

/// Parses a progress file's bytes; `None` unless they are the progress of `tree`'s archive
/// (its root and size, in any valid chunk size).
pub(crate) fn parse_progress(bytes: &[u8], tree: &ChunkTree) -> Option<Progress> {
    if bytes.len() < HEADER_V1 || &bytes[..8] != MAGIC {
        return None;
    }
    let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
    let u64_at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
    let (header, flags) = match u32_at(8) {
        1 => (HEADER_V1, 0),
        2 if bytes.len() >= HEADER => (HEADER, u32_at(HEADER_V1)),
        _ => return None,
    };
    if bytes[12..44] != tree.root().0 || u64_at(44) != tree.size() {
        return None;
    }
    let chunk_size = ChunkSize::new(u64::from(u32_at(52))).ok()?;
    let count = ChunkTree::new(tree.size(), chunk_size, tree.root()).chunk_count();
    if u64_at(56) != count || flags & !DERIVED != 0 {
        return None;
    }
    let done = Bits::from_bytes(&bytes[header..], count as usize)?;
    Some(Progress {
        chunk_size,
        done,
        derived: flags & DERIVED != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::ContentRoot;

    fn marked(count: usize, which: impl IntoIterator<Item = usize>) -> Bits {
        let mut b = Bits::new(count);
        which.into_iter().for_each(|i| b.set(i));
        b
    }

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
        let marks = marked(98, [0, 7, 8, 50, 97]);
        p.persist(&marks).unwrap();
        // Reserving again keeps what is on disk.
        p.reserve(0).unwrap();
        drop(p);
        let (_p, again) = Partial::open(dir.clone(), tree).unwrap();
        assert_eq!(again, marks);
        assert_eq!(
            std::fs::metadata(dir.join(OUTBOARD_FILE)).unwrap().len(),
            tree.outboard_size()
        );
        // Another root, or another size: the saved progress is not taken.
        for other in [
            ChunkTree::new(100_000, ChunkSize::MIN, ContentRoot([4; 32])),
            ChunkTree::new(100_001, ChunkSize::MIN, ContentRoot([3; 32])),
        ] {
            let (_p, fresh) = Partial::open(dir.clone(), other).unwrap();
            assert_eq!(fresh.ones(), 0);
        }
    }

    #[test]
    fn progress_carries_over_to_another_chunk_size_of_the_same_archive() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("p");
        let root = ContentRoot([5; 32]);
        let size = 10 * 4096 + 100;
        let small = ChunkTree::new(size, ChunkSize::MIN, root);
        let wide = ChunkTree::new(size, ChunkSize::new(4096).unwrap(), root);
        let (p, _) = Partial::open(dir.clone(), small).unwrap();
        p.reserve(0).unwrap();
        // 1 KiB chunks 0..8 (wide chunks 0 and 1), 9..12 (not all of wide chunk 2), and the
        // short tail: 40 (the last 100 bytes, wide chunk 10).
        let marks = marked(41, (0..8).chain(9..12).chain([40]));
        p.persist(&marks).unwrap();
        drop(p);
        let (p, done) = Partial::open(dir.clone(), wide).unwrap();
        assert_eq!(done, marked(11, [0, 1, 10]));
        assert!(p.derived(), "their nodes are not in the outboard");
        assert!(!p.is_reserved().unwrap(), "the outboard is another tree's");
        // The archive kept its bytes and its size.
        assert_eq!(std::fs::metadata(dir.join(PART_FILE)).unwrap().len(), size);
        p.reserve(0).unwrap();
        drop(p);
        // Saved in the new chunk size at once, flagged; and back again.
        let (p, again) = Partial::open(dir.clone(), wide).unwrap();
        assert_eq!((again, p.derived()), (marked(11, [0, 1, 10]), true));
        drop(p);
        let (p, back) = Partial::open(dir, small).unwrap();
        assert_eq!(back, marked(41, (0..8).chain([40])));
        assert!(p.derived());
    }

    #[test]
    fn progress_of_earlier_versions_is_read() {
        let tree = ChunkTree::new(100_000, ChunkSize::MIN, ContentRoot([3; 32]));
        let marks = marked(98, [1, 2, 3]);
        let mut v2 = progress_bytes(&tree, &marks, false);
        // Version 1: no flags.
        let mut v1 = v2[..HEADER_V1].to_vec();
        v1[8..12].copy_from_slice(&1u32.to_le_bytes());
        v1.extend_from_slice(&v2[HEADER..]);
        let got = parse_progress(&v1, &tree).unwrap();
        assert_eq!((got.done, got.derived), (marks.clone(), false));
        // Unknown flags are not guessed at.
        v2[HEADER_V1] = 0x80;
        assert!(parse_progress(&v2, &tree).is_none());
    }
}
