//! The process lock on the DB's directory: one process, and one open in it, at a time.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{LOCK, io_at};
use crate::db::DbError;

/// The DB's directories open in this process (a second open is refused as already open).
static OPEN: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// The DB's directory held by this process: the lock that keeps other processes out, and the
/// entry that keeps a second open in this process out. Released on drop.
pub(super) struct DirLock {
    dir: PathBuf,
    _file: fs::File,
}

impl DirLock {
    pub(super) fn take(dir: &Path) -> Result<Self, DbError> {
        let canonical = fs::canonicalize(dir).map_err(io_at(dir))?;
        let mut open = OPEN.lock().unwrap_or_else(|p| p.into_inner());
        if open.contains(&canonical) {
            return Err(DbError::AlreadyOpen {
                path: dir.to_path_buf(),
            });
        }
        let path = dir.join(LOCK);
        let Some(file) = crate::disk::lock_exclusive(&path, true).map_err(io_at(&path))? else {
            return Err(DbError::Locked {
                path: dir.to_path_buf(),
            });
        };
        open.push(canonical.clone());
        Ok(Self {
            dir: canonical,
            _file: file,
        })
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        OPEN.lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|d| *d != self.dir);
    }
}
