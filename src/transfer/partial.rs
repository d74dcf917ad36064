//! A download's state on disk, for resume: `.partial-<root>/archive.part` (the archive being
//! filled in at chunk offsets), `.partial-<root>/outboard.bao` (the tree nodes that came with
//! the chunks' proofs) and `.partial-<root>/progress` (which chunks are on disk).
//!
//! Both files are preallocated, so a disk too small fails at once rather than half-way. The
//! progress file is only ever written after both files have been fsynced with every chunk it
//! marks, and it is replaced atomically (write, fsync, rename), so after a crash every chunk it
//! marks is on disk, with its proof nodes, and was verified before it was written.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use super::bits::Bits;
use crate::chunk::ChunkTree;
use crate::snapshot::{IoAt, OUTBOARD_FILE, StoreError, sync_dir, write_synced};

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

/// Gives `file` exactly `len` bytes, with the disk space reserved where the file system allows.
fn preallocate(file: &File, path: &Path, len: u64) -> Result<(), StoreError> {
    file.set_len(0).at(path)?;
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        if len > 0 {
            // SAFETY: fallocate only reads its integer arguments.
            let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len as libc::off_t) };
            if rc != 0 {
                let e = io::Error::last_os_error();
                // File systems without fallocate get a sparse file; a full disk is an error.
                if e.kind() != io::ErrorKind::Unsupported
                    && e.raw_os_error() != Some(libc::EOPNOTSUPP)
                {
                    return Err(StoreError::at(path, e));
                }
            }
        }
    }
    file.set_len(len).at(path)
}

impl Partial {
    /// Opens (or starts) the partial download of `tree` in `dir`. Returns it with the chunks
    /// already on disk (all false for a new one, or if the saved progress is for another
    /// archive or unreadable).
    pub(crate) fn open(dir: PathBuf, tree: ChunkTree) -> Result<(Self, Bits), StoreError> {
        fs::create_dir_all(&dir).at(&dir)?;
        let part = dir.join(PART_FILE);
        let ob = dir.join(OUTBOARD_FILE);
        let file = open_rw(&part)?;
        let outboard = open_rw(&ob)?;
        let count = tree.chunk_count() as usize;
        let saved = read_progress(&dir.join(PROGRESS_FILE), &tree);
        let len = file.metadata().at(&part)?.len();
        let ob_len = outboard.metadata().at(&ob)?.len();
        let mut done = saved.unwrap_or_else(|| Bits::new(count));
        if done.ones() == 0 || len != tree.size() || ob_len != tree.outboard_size() {
            done = Bits::new(count);
            preallocate(&file, &part, tree.size())?;
            preallocate(&outboard, &ob, tree.outboard_size())?;
        }
        Ok((
            Self {
                dir,
                tree,
                file,
                outboard,
            },
            done,
        ))
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
        let mut bytes = Vec::with_capacity(HEADER + done.len().div_ceil(8));
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&VERSION.to_le_bytes());
        bytes.extend_from_slice(self.tree.root().as_bytes());
        bytes.extend_from_slice(&self.tree.size().to_le_bytes());
        bytes.extend_from_slice(&self.tree.chunk_size().bytes().to_le_bytes());
        bytes.extend_from_slice(&(done.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&done.to_bytes());
        let tmp = self.dir.join(format!("{PROGRESS_FILE}.tmp"));
        write_synced(&tmp, &bytes)?;
        let target = self.dir.join(PROGRESS_FILE);
        fs::rename(&tmp, &target).at(&target)?;
        sync_dir(&self.dir)
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

fn read_progress(path: &Path, tree: &ChunkTree) -> Option<Bits> {
    let bytes = fs::read(path).ok()?;
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
    use crate::{ChunkSize, ContentRoot};

    #[test]
    fn progress_round_trips_and_other_archives_start_over() {
        let tmp = tempfile::tempdir().unwrap();
        let tree = ChunkTree::new(100_000, ChunkSize::MIN, ContentRoot([3; 32]));
        let dir = tmp.path().join("p");
        let (p, done) = Partial::open(dir.clone(), tree).unwrap();
        assert_eq!(done, Bits::new(98));
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
