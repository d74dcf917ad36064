//! The store's directory lock (flock): one process has a store open; every open of it in this
//! process shares the one lock.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{IoAt, StoreError};

/// The lock of a snapshot directory, shared by every open of it in this process.
#[derive(Debug)]
pub(super) struct StoreLock {
    dir: PathBuf,
    _file: fs::File,
}

/// The snapshot directories open in this process, and their locks.
static OPEN_STORES: Mutex<Vec<std::sync::Weak<StoreLock>>> = Mutex::new(Vec::new());

impl StoreLock {
    /// This process's lock of `dir`: the one already held, or a new one (refused when another
    /// process holds it).
    pub(super) fn take(dir: &Path) -> Result<Arc<Self>, StoreError> {
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
        let Some(file) = crate::disk::lock_exclusive(dir, false).at(dir)? else {
            return Err(StoreError::InUse {
                path: dir.to_path_buf(),
            });
        };
        let lock = Arc::new(Self {
            dir: canonical,
            _file: file,
        });
        open.push(Arc::downgrade(&lock));
        Ok(lock)
    }
}
