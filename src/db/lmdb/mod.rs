//! [`LmdbState`]: the embedded default state DB, on LMDB (through `heed`).
//!
//! Chosen by measurement (1 M sorted entries of 1 KiB, one machine, one run): LMDB's append mode
//! loaded 348 MiB/s into a 1.3 GiB file, where redb managed 97-129 MiB/s into 2.1 GiB; an LSM
//! (fjall) ingested 356 MiB/s but brings background compaction and slower point reads, which the
//! lattice and incremental snapshots need. LMDB is a copy-on-write B-tree: read transactions are
//! MVCC snapshots that stay consistent while writes go on (the consistent view a background
//! snapshot needs), commits are atomic and crash-safe, and sorted keys can be appended at disk
//! speed, which is how a snapshot is imported.
//!
//! # Layout
//!
//! ```text
//! <dir>/CURRENT              the name of the live generation, replaced atomically
//! <dir>/gen-<n>.mdb          a generation: one LMDB file (and its `-lock` file)
//! <dir>/LOCK                 locked (flock) by the one process that has the DB open
//! ```
//!
//! A second process opening a DB in use is refused at once, naming the directory: its open
//! would otherwise delete the first one's import in progress, and both would write slots.
//!
//! A full import writes a new generation beside the live one and makes it live by replacing
//! `CURRENT`; the old generation is deleted (views still reading it keep their open map).
//! Generations `CURRENT` does not name are leftovers of an interrupted import and are deleted
//! when the DB is opened.
//!
//! # Tables
//!
//! - `state`: key -> value.
//! - `meta`: the slot, the [`Lattice`] (kept up to date by every write), from which slot on the
//!   `touched` table is complete, and up to which slot it was pruned.
//! - `touched`: key -> the last slot that wrote it (8 bytes, little-endian): what an incremental
//!   snapshot reads, in time proportional to the changes.
//!
//! [`Lattice`]: crate::bank_hash::Lattice

mod generation;
mod import;
mod lock;
mod staged;
mod view;
mod write;

pub use self::write::SlotWriter;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use self::generation::{Generation, parse_gen, remove_generation, u64_of};
use self::import::LmdbImport;
use self::lock::DirLock;
use self::view::LmdbView;
use self::write::apply_on;
use super::{ApplyFn, DbError, StateDb, StateImport, StateView};
use crate::disk;

const CURRENT: &str = "CURRENT";
const LOCK: &str = "LOCK";
const GEN_PREFIX: &str = "gen-";
const GEN_SUFFIX: &str = ".mdb";
const LOCK_SUFFIX: &str = "-lock";

/// Settings of an [`LmdbState`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct LmdbOptions {
    map_size: usize,
    max_readers: u32,
}

impl Default for LmdbOptions {
    fn default() -> Self {
        Self {
            map_size: 1 << 40,
            max_readers: 126,
        }
    }
}

impl LmdbOptions {
    /// Sets the largest size the DB may grow to, bytes (default 1 TiB). Address space only: the
    /// file grows as the state does. Each open generation maps this much.
    pub fn with_map_size(mut self, bytes: usize) -> Self {
        self.map_size = bytes;
        self
    }

    /// The value [`with_map_size`](Self::with_map_size) sets.
    pub fn map_size(&self) -> usize {
        self.map_size
    }

    /// Sets the most read transactions open at once (default 126).
    pub fn with_max_readers(mut self, readers: u32) -> Self {
        self.max_readers = readers;
        self
    }

    /// The value [`with_max_readers`](Self::with_max_readers) sets.
    pub fn max_readers(&self) -> u32 {
        self.max_readers
    }
}

fn backend(e: heed::Error) -> DbError {
    DbError::Backend(Box::new(e))
}

/// The embedded default [`StateDb`]: an LMDB environment in a directory (see the module docs).
///
/// Cloning is cheap and every clone is the same DB. Keys are 1 to [`LmdbState::max_key_len`]
/// bytes (LMDB's limit, about 2 KiB with 4 KiB pages; snapsync's own format allows 1 MiB);
/// values up to 64 MiB.
#[derive(Clone)]
pub struct LmdbState {
    generations: Arc<Generations>,
}

/// The DB's directory and its generations: the live one and the number of the next.
struct Generations {
    dir: PathBuf,
    options: LmdbOptions,
    /// The live generation. Writers hold the read side for the length of a transaction; a
    /// committed import takes the write side to swap generations.
    live: RwLock<Generation>,
    /// The next generation number for an import.
    next_gen: Mutex<u64>,
    /// Set when a swap could not be made durable: what is live on disk is then uncertain, so
    /// nothing more is written until the DB is opened again (which reads what `CURRENT`
    /// names).
    poisoned: std::sync::atomic::AtomicBool,
    _lock: DirLock,
}

impl std::fmt::Debug for LmdbState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LmdbState")
            .field("dir", &self.generations.dir)
            .finish()
    }
}

fn map_write(e: heed::Error) -> DbError {
    match e {
        heed::Error::Io(source) => DbError::Io {
            path: PathBuf::from("(state DB)"),
            source,
        },
        other => backend(other),
    }
}

fn io_at(path: &Path) -> impl Fn(io::Error) -> DbError + '_ {
    move |source| DbError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl LmdbState {
    /// Opens (or creates) the DB in directory `dir` with the default options, and removes
    /// leftovers of interrupted imports.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, DbError> {
        Self::open_with(dir, LmdbOptions::default())
    }

    /// Like [`LmdbState::open`] with `options`.
    pub fn open_with(dir: impl Into<PathBuf>, options: LmdbOptions) -> Result<Self, DbError> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(io_at(&dir))?;
        let lock = DirLock::take(&dir)?;
        let current_path = dir.join(CURRENT);
        let current = match fs::read_to_string(&current_path) {
            Ok(text) => Some(parse_gen(text.trim()).ok_or_else(|| {
                DbError::Inconsistent(format!(
                    "{} does not name a generation: {text:?}",
                    current_path.display()
                ))
            })?),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_at(&current_path)(e)),
        };
        let mut highest = current.unwrap_or(0);
        for entry in fs::read_dir(&dir).map_err(io_at(&dir))? {
            let name = entry.map_err(io_at(&dir))?.file_name();
            let name = name.to_string_lossy();
            let base = name.strip_suffix(LOCK_SUFFIX).unwrap_or(&name);
            if let Some(n) = parse_gen(base) {
                highest = highest.max(n);
                if Some(n) != current && !name.ends_with(LOCK_SUFFIX) {
                    tracing::info!(target: crate::log::DISCOVERY, generation = n, "removing an interrupted state import");
                    remove_generation(&dir, n);
                }
            }
        }
        let number = match current {
            Some(n) => n,
            None => {
                let n = highest + 1;
                // A brand-new DB: its first generation, made live before anything is written.
                let g = Generation::open(&dir, n, &options, false)?;
                drop(g);
                disk::replace_synced(&current_path, Generation::name(n).as_bytes())
                    .map_err(io_at(&current_path))?;
                n
            }
        };
        let live = Generation::open(&dir, number, &options, false)?;
        Ok(Self {
            generations: Arc::new(Generations {
                dir,
                options,
                live: RwLock::new(live),
                next_gen: Mutex::new(highest.max(number) + 1),
                poisoned: std::sync::atomic::AtomicBool::new(false),
                _lock: lock,
            }),
        })
    }

    /// Refuses writes once a swap could not be made durable.
    fn check_usable(&self) -> Result<(), DbError> {
        if self
            .generations
            .poisoned
            .load(std::sync::atomic::Ordering::Acquire)
        {
            return Err(DbError::NotDurable(
                "an earlier swap's directory sync failed".into(),
            ));
        }
        Ok(())
    }

    /// The live generation, held (a swap waits) for a write, once writes are allowed.
    fn writable(&self) -> Result<std::sync::RwLockReadGuard<'_, Generation>, DbError> {
        self.check_usable()?;
        Ok(self
            .generations
            .live
            .read()
            .unwrap_or_else(|p| p.into_inner()))
    }

    /// The DB's directory.
    pub fn dir(&self) -> &Path {
        &self.generations.dir
    }

    /// Largest key this DB accepts, bytes.
    pub fn max_key_len(&self) -> usize {
        self.live().max_key()
    }

    fn live(&self) -> Generation {
        self.generations
            .live
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Advances the state to `slot`: runs `writes` and records the slot in one durable
    /// transaction. A slot lower than the current one is refused.
    pub fn commit_slot<F>(&self, slot: u64, writes: F) -> Result<(), DbError>
    where
        F: FnOnce(&mut SlotWriter<'_, '_>) -> Result<(), DbError>,
    {
        // Hold the read side for the whole transaction so that an import's swap waits.
        let guard = self.writable()?;
        let g = &*guard;
        let mut txn = g.env.write_txn().map_err(backend)?;
        let mut meta = g.read_meta(&txn)?;
        if let Some(current) = meta.slot
            && slot < current
        {
            return Err(DbError::SlotBehind { slot, current });
        }
        {
            let mut writer = SlotWriter {
                generation: g,
                txn: &mut txn,
                lattice: &mut meta.lattice,
                slot,
            };
            writes(&mut writer)?;
        }
        meta.slot = Some(slot);
        g.write_meta(&mut txn, &meta)?;
        txn.commit().map_err(map_write)
    }

    /// The value of `key` in the latest committed state.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, DbError> {
        let g = self.live();
        let txn = g.env.read_txn().map_err(backend)?;
        Ok(g.state.get(&txn, key).map_err(backend)?.map(<[u8]>::to_vec))
    }

    /// Number of entries in the latest committed state.
    pub fn len(&self) -> Result<u64, DbError> {
        let g = self.live();
        let txn = g.env.read_txn().map_err(backend)?;
        g.state.len(&txn).map_err(backend)
    }

    /// Whether the latest committed state holds no entries.
    pub fn is_empty(&self) -> Result<bool, DbError> {
        Ok(self.len()? == 0)
    }

    /// Number of keys in the `touched` table (what an incremental snapshot reads).
    pub fn touched_len(&self) -> Result<u64, DbError> {
        let g = self.live();
        let txn = g.env.read_txn().map_err(backend)?;
        g.touched.len(&txn).map_err(backend)
    }
}

impl StateDb for LmdbState {
    fn slot(&self) -> Result<Option<u64>, DbError> {
        let g = self.live();
        let txn = g.env.read_txn().map_err(backend)?;
        Ok(g.read_meta(&txn)?.slot)
    }

    fn view(&self) -> Result<Box<dyn StateView>, DbError> {
        Ok(Box::new(LmdbView::new(self.live())?))
    }

    fn begin_import(&self, slot: u64) -> Result<Box<dyn StateImport>, DbError> {
        self.check_usable()?;
        let number = {
            let mut next = self
                .generations
                .next_gen
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let n = *next;
            *next += 1;
            n
        };
        let generation = Generation::open(
            &self.generations.dir,
            number,
            &self.generations.options,
            true,
        )?;
        // A second descriptor of the new generation's file, only to start its writeback.
        let writeback = std::fs::File::open(Generation::path(&self.generations.dir, number))
            .ok()
            .map(crate::disk::Writeback::start);
        Ok(Box::new(LmdbImport {
            owner: self.clone(),
            generation: Some(generation),
            slot,
            uncommitted: 0,
            writeback,
        }))
    }

    fn apply_changes(&self, slot: u64, changes: &mut ApplyFn<'_>) -> Result<(), DbError> {
        let guard = self.writable()?;
        apply_on(&guard, slot, changes)
    }

    fn prune_touched(&self, slot: u64) -> Result<(), DbError> {
        let guard = self
            .generations
            .live
            .read()
            .unwrap_or_else(|p| p.into_inner());
        let g = &*guard;
        let mut txn = g.env.write_txn().map_err(backend)?;
        let mut meta = g.read_meta(&txn)?;
        if meta.tracked_from >= slot {
            return Ok(());
        }
        let mut removed = 0u64;
        {
            let mut iter = g.touched.iter_mut(&mut txn).map_err(backend)?;
            while let Some(item) = iter.next() {
                let (_, at) = item.map_err(backend)?;
                if u64_of(at)? <= slot {
                    // SAFETY: no reference into the table is held across this call: the key
                    // and value of the current item are not used after it.
                    unsafe { iter.del_current() }.map_err(map_write)?;
                    removed += 1;
                }
            }
        }
        meta.tracked_from = slot;
        g.write_meta(&mut txn, &meta)?;
        txn.commit().map_err(map_write)?;
        tracing::debug!(target: crate::log::DISCOVERY, through = slot, removed, "pruned written-key records");
        Ok(())
    }

    fn free_space(&self) -> Option<u64> {
        disk::free_space(&self.generations.dir).ok()
    }
}

#[cfg(test)]
mod tests;
