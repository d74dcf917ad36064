//! Partial downloads in the store: where a download keeps its state for resume, the ones on
//! disk, their claims by a download (one at a time) or pins by a server of their chunks, and
//! trimming the others to the disk budget.

use std::collections::HashMap;
use std::fs;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use super::{IoAt, PARTIAL_PREFIX, SnapshotStore, StoreError, VOUCHED_FILE};
use crate::disk;
use crate::hash::ContentRoot;

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
pub(super) struct Holds {
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

impl SnapshotStore {
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
}
