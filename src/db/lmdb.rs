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

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use heed::types::Bytes;
use heed::{Database, Env, EnvFlags, EnvOpenOptions, PutFlags, RoTxn, RwTxn, WithoutTls};

use super::{
    ApplyFn, ChangeWriter, DbError, Decision, StagedState, StateDb, StateImport, StateView,
    TouchedVisitor, VisitError, Visitor,
};
use crate::bank_hash::{Lattice, MAX_KEY_LEN, MAX_VALUE_LEN};
use crate::disk;

const CURRENT: &str = "CURRENT";
const LOCK: &str = "LOCK";
const GEN_PREFIX: &str = "gen-";
const GEN_SUFFIX: &str = ".mdb";
const LOCK_SUFFIX: &str = "-lock";

const META_SLOT: &[u8] = b"slot";
const META_LATTICE: &[u8] = b"lattice";
/// The `touched` table holds every key written after this slot (or since the DB was created).
const META_TRACKED_FROM: &[u8] = b"tracked_from";

/// Entries an import appends per transaction: large enough that commits are rare, small enough
/// that LMDB's dirty page list stays far below its limit.
const IMPORT_TXN_BYTES: usize = 64 << 20;

/// Settings of an [`LmdbState`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct LmdbOptions {
    /// Largest size the DB may grow to, bytes (default 1 TiB). Address space only: the file
    /// grows as the state does. Each open generation maps this much.
    pub map_size: usize,
    /// Most read transactions open at once (default 126).
    pub max_readers: u32,
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
    /// Sets the largest DB size, bytes.
    pub fn with_map_size(mut self, bytes: usize) -> Self {
        self.map_size = bytes;
        self
    }

    /// Sets the most read transactions open at once.
    pub fn with_max_readers(mut self, readers: u32) -> Self {
        self.max_readers = readers;
        self
    }
}

fn backend(e: heed::Error) -> DbError {
    DbError::Backend(Box::new(e))
}

/// One open generation: the environment and its tables.
#[derive(Clone)]
struct Generation {
    number: u64,
    env: Env<WithoutTls>,
    state: Database<Bytes, Bytes>,
    meta: Database<Bytes, Bytes>,
    touched: Database<Bytes, Bytes>,
}

/// What `meta` says.
#[derive(Debug, Clone, Default)]
struct Meta {
    slot: Option<u64>,
    lattice: Lattice,
    tracked_from: u64,
}

fn u64_of(bytes: &[u8]) -> Result<u64, DbError> {
    <[u8; 8]>::try_from(bytes)
        .map(u64::from_le_bytes)
        .map_err(|_| DbError::Inconsistent(format!("{} bytes where a u64 was", bytes.len())))
}

impl Generation {
    /// The file name of generation `number`, as `CURRENT` names it.
    fn name(number: u64) -> String {
        format!("{GEN_PREFIX}{number:08}{GEN_SUFFIX}")
    }

    fn path(dir: &Path, number: u64) -> PathBuf {
        dir.join(Self::name(number))
    }

    fn open(dir: &Path, number: u64, options: &LmdbOptions, import: bool) -> Result<Self, DbError> {
        let path = Self::path(dir, number);
        let mut open = EnvOpenOptions::new().read_txn_without_tls();
        open.map_size(options.map_size)
            .max_readers(options.max_readers)
            .max_dbs(4);
        // An import is made durable once, at its end (force_sync); the live DB at every commit.
        let flags = if import {
            EnvFlags::NO_SUB_DIR | EnvFlags::NO_SYNC | EnvFlags::NO_READ_AHEAD
        } else {
            EnvFlags::NO_SUB_DIR | EnvFlags::NO_READ_AHEAD
        };
        // SAFETY: LMDB maps the file; it must not be modified by anything but LMDB while mapped.
        // Generation files are private to this DB directory and are only ever written through
        // this environment, each path is opened once per process (heed checks), and a
        // generation is deleted only after it is no longer live, when only readers remain.
        let env = unsafe {
            open.flags(flags);
            open.open(&path)
        }
        .map_err(|e| match e {
            heed::Error::Io(source) => DbError::Io {
                path: path.clone(),
                source,
            },
            heed::Error::EnvAlreadyOpened => DbError::AlreadyOpen {
                path: dir.to_path_buf(),
            },
            other => backend(other),
        })?;
        let _ = env.clear_stale_readers();
        let mut txn = env.write_txn().map_err(backend)?;
        let state = env
            .create_database(&mut txn, Some("state"))
            .map_err(backend)?;
        let meta = env
            .create_database(&mut txn, Some("meta"))
            .map_err(backend)?;
        let touched = env
            .create_database(&mut txn, Some("touched"))
            .map_err(backend)?;
        txn.commit().map_err(backend)?;
        Ok(Self {
            number,
            env,
            state,
            meta,
            touched,
        })
    }

    fn read_meta(&self, txn: &heed::RoTxn) -> Result<Meta, DbError> {
        let slot = match self.meta.get(txn, META_SLOT).map_err(backend)? {
            Some(b) => Some(u64_of(b)?),
            None => None,
        };
        let lattice = match self.meta.get(txn, META_LATTICE).map_err(backend)? {
            Some(b) => Lattice::from_bytes(b)
                .ok_or_else(|| DbError::Inconsistent("lattice of the wrong size".into()))?,
            None => Lattice::new(),
        };
        let tracked_from = match self.meta.get(txn, META_TRACKED_FROM).map_err(backend)? {
            Some(b) => u64_of(b)?,
            None => 0,
        };
        Ok(Meta {
            slot,
            lattice,
            tracked_from,
        })
    }

    fn write_meta(&self, txn: &mut RwTxn, meta: &Meta) -> Result<(), DbError> {
        if let Some(slot) = meta.slot {
            self.meta
                .put(txn, META_SLOT, &slot.to_le_bytes())
                .map_err(backend)?;
        }
        self.meta
            .put(txn, META_LATTICE, &meta.lattice.to_bytes())
            .map_err(backend)?;
        self.meta
            .put(txn, META_TRACKED_FROM, &meta.tracked_from.to_le_bytes())
            .map_err(backend)
    }

    fn max_key(&self) -> usize {
        self.env.max_key_size().min(MAX_KEY_LEN)
    }

    fn check_entry(&self, key: &[u8], value: &[u8]) -> Result<(), DbError> {
        let max_key = self.max_key();
        if key.len() > max_key || key.is_empty() || value.len() > MAX_VALUE_LEN {
            return Err(DbError::EntryTooLarge {
                key: key.len(),
                value: value.len(),
                max_key,
                max_value: MAX_VALUE_LEN,
            });
        }
        Ok(())
    }
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

/// The DB's directories open in this process (a second open is refused as already open).
static OPEN: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// The DB's directory held by this process: the lock that keeps other processes out, and the
/// entry that keeps a second open in this process out. Released on drop.
struct DirLock {
    dir: PathBuf,
    _file: fs::File,
}

impl DirLock {
    fn take(dir: &Path) -> Result<Self, DbError> {
        let canonical = fs::canonicalize(dir).map_err(io_at(dir))?;
        let mut open = OPEN.lock().unwrap_or_else(|p| p.into_inner());
        if open.contains(&canonical) {
            return Err(DbError::AlreadyOpen {
                path: dir.to_path_buf(),
            });
        }
        let path = dir.join(LOCK);
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_at(&path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(DbError::Locked {
                    path: dir.to_path_buf(),
                });
            }
            Err(fs::TryLockError::Error(e)) => return Err(io_at(&path)(e)),
        }
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

/// Writes of one slot, applied atomically by [`LmdbState::commit_slot`].
pub struct SlotWriter<'t, 'e> {
    generation: &'t Generation,
    txn: &'t mut RwTxn<'e>,
    lattice: &'t mut Lattice,
    slot: u64,
}

impl SlotWriter<'_, '_> {
    /// Sets `key` to `value`.
    pub fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), DbError> {
        put_tracked(
            self.generation,
            self.txn,
            Some(self.lattice),
            self.slot,
            key,
            value,
        )
        .map(|_| ())
    }

    /// Removes `key`, if present.
    pub fn delete(&mut self, key: &[u8]) -> Result<(), DbError> {
        delete_tracked(
            self.generation,
            self.txn,
            Some(self.lattice),
            self.slot,
            key,
        )
        .map(|_| ())
    }
}

/// Writes one entry, keeping the lattice and the `touched` table up to date; returns the old
/// value.
fn put_tracked(
    g: &Generation,
    txn: &mut RwTxn,
    lattice: Option<&mut Lattice>,
    slot: u64,
    key: &[u8],
    value: &[u8],
) -> Result<Option<Vec<u8>>, DbError> {
    g.check_entry(key, value)?;
    let old = g.state.get(txn, key).map_err(backend)?.map(<[u8]>::to_vec);
    if let Some(lattice) = lattice {
        lattice.replace(key, old.as_deref(), Some(value));
    }
    g.state.put(txn, key, value).map_err(map_write)?;
    g.touched
        .put(txn, key, &slot.to_le_bytes())
        .map_err(map_write)?;
    Ok(old)
}

/// Removes one entry, keeping the lattice and the `touched` table up to date; returns the old
/// value.
fn delete_tracked(
    g: &Generation,
    txn: &mut RwTxn,
    lattice: Option<&mut Lattice>,
    slot: u64,
    key: &[u8],
) -> Result<Option<Vec<u8>>, DbError> {
    if key.is_empty() || key.len() > g.max_key() {
        return Ok(None);
    }
    let old = g.state.get(txn, key).map_err(backend)?.map(<[u8]>::to_vec);
    if let Some(old) = &old {
        if let Some(lattice) = lattice {
            lattice.remove(key, old);
        }
        g.state.delete(txn, key).map_err(map_write)?;
    }
    g.touched
        .put(txn, key, &slot.to_le_bytes())
        .map_err(map_write)?;
    Ok(old)
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

fn parse_gen(name: &str) -> Option<u64> {
    name.strip_prefix(GEN_PREFIX)?
        .strip_suffix(GEN_SUFFIX)?
        .parse()
        .ok()
}

fn remove_generation(dir: &Path, number: u64) {
    let path = Generation::path(dir, number);
    let mut lock = path.as_os_str().to_owned();
    lock.push(LOCK_SUFFIX);
    for p in [path, PathBuf::from(lock)] {
        if let Err(e) = disk::remove_path(&p) {
            tracing::warn!(target: crate::log::DISCOVERY, path = %p.display(), error = %e, "could not remove an old state DB generation");
        }
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
        Ok(Box::new(LmdbImport {
            owner: self.clone(),
            generation: Some(generation),
            slot,
            uncommitted: 0,
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

/// Runs `changes` in one write transaction on `g`, taking the state to `slot`, committing only
/// if it says so. Every key it writes is recorded in `touched` at `slot`.
fn apply_on(g: &Generation, slot: u64, changes: &mut ApplyFn<'_>) -> Result<(), DbError> {
    let mut txn = g.env.write_txn().map_err(backend)?;
    let meta = g.read_meta(&txn)?;
    if let Some(current) = meta.slot
        && slot < current
    {
        return Err(DbError::SlotBehind { slot, current });
    }
    let mut writer = LmdbChanges {
        generation: g,
        txn: &mut txn,
        before: meta.clone(),
        slot,
    };
    match changes(&mut writer)? {
        Decision::Abort => Ok(()),
        Decision::Commit(lattice) => {
            let new = Meta {
                slot: Some(slot),
                lattice: *lattice,
                tracked_from: meta.tracked_from,
            };
            g.write_meta(&mut txn, &new)?;
            txn.commit().map_err(map_write)
        }
    }
}

struct LmdbChanges<'t, 'e> {
    generation: &'t Generation,
    txn: &'t mut RwTxn<'e>,
    before: Meta,
    slot: u64,
}

impl ChangeWriter for LmdbChanges<'_, '_> {
    fn before(&self) -> Result<(Option<u64>, Lattice), DbError> {
        Ok((self.before.slot, self.before.lattice.clone()))
    }

    // The caller keeps the lattice from the old values handed back.
    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<Option<Vec<u8>>, DbError> {
        put_tracked(self.generation, self.txn, None, self.slot, key, value)
    }

    fn delete(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, DbError> {
        delete_tracked(self.generation, self.txn, None, self.slot, key)
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, DbError> {
        Ok(self
            .generation
            .state
            .get(self.txn, key)
            .map_err(backend)?
            .map(<[u8]>::to_vec))
    }
}

struct LmdbView {
    generation: Generation,
    txn: RoTxn<'static, WithoutTls>,
    meta: Meta,
}

impl LmdbView {
    fn new(generation: Generation) -> Result<Self, DbError> {
        let txn = generation.env.clone().static_read_txn().map_err(backend)?;
        let meta = generation.read_meta(&txn)?;
        Ok(Self {
            generation,
            txn,
            meta,
        })
    }
}

impl StateView for LmdbView {
    fn slot(&self) -> Option<u64> {
        self.meta.slot
    }

    fn visit(&self, visitor: &mut Visitor<'_>) -> Result<(), VisitError> {
        for item in self
            .generation
            .state
            .iter(&self.txn)
            .map_err(|e| VisitError::Db(backend(e)))?
        {
            let (k, v) = item.map_err(|e| VisitError::Db(backend(e)))?;
            visitor(k, v).map_err(VisitError::Visitor)?;
        }
        Ok(())
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, DbError> {
        Ok(self
            .generation
            .state
            .get(&self.txn, key)
            .map_err(backend)?
            .map(<[u8]>::to_vec))
    }

    fn lattice(&self) -> Result<Lattice, DbError> {
        Ok(self.meta.lattice.clone())
    }

    fn visit_touched_since(
        &self,
        slot: u64,
        visitor: &mut TouchedVisitor<'_>,
    ) -> Result<bool, VisitError> {
        if slot < self.meta.tracked_from {
            return Ok(false);
        }
        let g = &self.generation;
        for item in g
            .touched
            .iter(&self.txn)
            .map_err(|e| VisitError::Db(backend(e)))?
        {
            let (k, at) = item.map_err(|e| VisitError::Db(backend(e)))?;
            if u64_of(at)? <= slot {
                continue;
            }
            let value = g
                .state
                .get(&self.txn, k)
                .map_err(|e| VisitError::Db(backend(e)))?;
            visitor(k, value).map_err(VisitError::Visitor)?;
        }
        Ok(true)
    }
}

/// A full import into a new generation, appended in key order.
struct LmdbImport {
    owner: LmdbState,
    generation: Option<Generation>,
    slot: u64,
    /// Bytes appended since the last commit.
    uncommitted: usize,
}

impl StateImport for LmdbImport {
    fn put_sorted(
        &mut self,
        entries: &mut dyn Iterator<Item = (&[u8], &[u8])>,
    ) -> Result<(), DbError> {
        let g = self.generation.as_ref().expect("present until finished");
        let mut txn = g.env.write_txn().map_err(backend)?;
        for (k, v) in entries {
            g.check_entry(k, v)?;
            // Append mode refuses a key not above the last one (across calls too).
            g.state
                .put_with_flags(&mut txn, PutFlags::APPEND, k, v)
                .map_err(|e| match e {
                    heed::Error::Mdb(heed::MdbError::KeyExist) => DbError::Inconsistent(
                        "import keys are not in strictly ascending order".into(),
                    ),
                    other => map_write(other),
                })?;
            self.uncommitted += k.len() + v.len();
            if self.uncommitted >= IMPORT_TXN_BYTES {
                txn.commit().map_err(map_write)?;
                txn = g.env.write_txn().map_err(backend)?;
                self.uncommitted = 0;
            }
        }
        txn.commit().map_err(map_write)
    }

    fn finish(mut self: Box<Self>, lattice: &Lattice) -> Result<Box<dyn StagedState>, DbError> {
        let g = self.generation.take().expect("present until finished");
        let mut txn = g.env.write_txn().map_err(backend)?;
        g.write_meta(
            &mut txn,
            &Meta {
                slot: Some(self.slot),
                lattice: lattice.clone(),
                tracked_from: self.slot,
            },
        )?;
        txn.commit().map_err(map_write)?;
        g.env.force_sync().map_err(map_write)?;
        Ok(Box::new(LmdbStaged {
            owner: self.owner.clone(),
            generation: Some(g),
        }))
    }
}

impl Drop for LmdbImport {
    fn drop(&mut self) {
        if let Some(g) = self.generation.take() {
            let number = g.number;
            drop(g);
            remove_generation(&self.owner.generations.dir, number);
        }
    }
}

struct LmdbStaged {
    owner: LmdbState,
    generation: Option<Generation>,
}

impl StagedState for LmdbStaged {
    fn view(&self) -> Result<Box<dyn StateView>, DbError> {
        let g = self.generation.clone().expect("present until committed");
        Ok(Box::new(LmdbView::new(g)?))
    }

    fn apply_changes(&mut self, slot: u64, changes: &mut ApplyFn<'_>) -> Result<(), DbError> {
        let g = self.generation.as_ref().expect("present until committed");
        apply_on(g, slot, changes)?;
        g.env.force_sync().map_err(map_write)
    }

    fn commit(mut self: Box<Self>) -> Result<(), DbError> {
        let staged = self.generation.take().expect("present until committed");
        let generations = &self.owner.generations;
        self.owner.check_usable()?;
        let staged_meta = {
            let txn = staged.env.read_txn().map_err(backend)?;
            staged.read_meta(&txn)?
        };
        let staged_slot = staged_meta.slot.unwrap_or(0);
        // Writers of the live DB finish first; new ones wait for the swap.
        let mut live = generations.live.write().unwrap_or_else(|p| p.into_inner());
        let live_slot = {
            let txn = live.env.read_txn().map_err(backend)?;
            live.read_meta(&txn)?.slot
        };
        if let Some(current) = live_slot
            && current >= staged_slot
        {
            let n = staged.number;
            drop(staged);
            remove_generation(&generations.dir, n);
            return Err(DbError::SlotBehind {
                slot: staged_slot,
                current,
            });
        }
        // Reopen with the live flags (durable commits) before it becomes live: the import's
        // environment was opened without sync. Only this handle and none other exists.
        let number = staged.number;
        let closing = staged.env.clone().prepare_for_closing();
        drop(staged);
        closing.wait();
        // What is reopened must be what was staged: a file removed or replaced meanwhile
        // would otherwise become the live state.
        let reopened = Generation::open(&generations.dir, number, &generations.options, false)
            .and_then(|g| {
                let txn = g.env.read_txn().map_err(backend)?;
                let meta = g.read_meta(&txn)?;
                drop(txn);
                if meta.slot != staged_meta.slot || meta.lattice != staged_meta.lattice {
                    return Err(DbError::Inconsistent(format!(
                        "the staged state changed on disk before the swap (slot {:?}, staged {:?})",
                        meta.slot, staged_meta.slot
                    )));
                }
                Ok(g)
            });
        let reopened = match reopened {
            Ok(g) => g,
            Err(e) => {
                remove_generation(&generations.dir, number);
                return Err(e);
            }
        };
        let current_path = generations.dir.join(CURRENT);
        if let Err(e) = point_current_at(&current_path, number) {
            return match e {
                // Not renamed: the old generation stays live.
                Swap::NotRenamed(e) => {
                    drop(reopened);
                    remove_generation(&generations.dir, number);
                    Err(io_at(&current_path)(e))
                }
                // Renamed but perhaps not durably: `CURRENT` names the new generation now, so
                // the process goes on with it in memory too, keeps both files for the next
                // open to settle, and writes nothing more until then.
                Swap::NotDurable(e) => {
                    *live = reopened;
                    generations
                        .poisoned
                        .store(true, std::sync::atomic::Ordering::Release);
                    Err(DbError::NotDurable(e.to_string()))
                }
            };
        }
        // The swap is durable; from here on the new generation is the live one, whatever else
        // happens. The old one is deleted: views still reading it keep their open map.
        let old = std::mem::replace(&mut *live, reopened);
        drop(live);
        let old_number = old.number;
        drop(old);
        remove_generation(&generations.dir, old_number);
        Ok(())
    }
}

/// How pointing `CURRENT` at a generation failed.
enum Swap {
    /// Before the rename: nothing changed.
    NotRenamed(io::Error),
    /// After it: the directory could not be synced.
    NotDurable(io::Error),
}

/// Points `CURRENT` at generation `number`: writes and syncs a new file, renames it over
/// `CURRENT`, syncs the directory.
fn point_current_at(current: &Path, number: u64) -> Result<(), Swap> {
    let mut tmp = current.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    disk::write_synced(&tmp, Generation::name(number).as_bytes()).map_err(Swap::NotRenamed)?;
    fs::rename(&tmp, current).map_err(Swap::NotRenamed)?;
    disk::sync_dir(current.parent().unwrap_or(Path::new("."))).map_err(Swap::NotDurable)
}

impl Drop for LmdbStaged {
    fn drop(&mut self) {
        if let Some(g) = self.generation.take() {
            let number = g.number;
            drop(g);
            remove_generation(&self.owner.generations.dir, number);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(view: &dyn StateView) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut out = Vec::new();
        view.visit(&mut |k, v| {
            out.push((k.to_vec(), v.to_vec()));
            Ok(())
        })
        .unwrap();
        out
    }

    #[test]
    fn the_lattice_follows_every_write() {
        let dir = tempfile::tempdir().unwrap();
        let db = LmdbState::open(dir.path().join("db")).unwrap();
        db.commit_slot(1, |w| {
            w.put(b"a", b"1")?;
            w.put(b"b", b"2")?;
            w.put(b"c", b"3")
        })
        .unwrap();
        db.commit_slot(2, |w| {
            w.put(b"a", b"9")?;
            w.delete(b"b")?;
            w.delete(b"zz")
        })
        .unwrap();
        let view = db.view().unwrap();
        assert_eq!(view.slot(), Some(2));
        let kept = view.lattice().unwrap();
        let mut fresh = Lattice::new();
        for (k, v) in entries(view.as_ref()) {
            fresh.insert(&k, &v);
        }
        assert_eq!(kept, fresh);
        assert_eq!(view.bank_hash().unwrap(), fresh.bank_hash(2));
        assert!(matches!(
            db.commit_slot(1, |_| Ok(())),
            Err(DbError::SlotBehind {
                slot: 1,
                current: 2
            })
        ));
        assert!(matches!(
            db.commit_slot(3, |w| w.put(&vec![1u8; 100_000], b"")),
            Err(DbError::EntryTooLarge { .. })
        ));
    }

    #[test]
    fn touched_keys_are_those_written_after_a_slot_and_pruning_forgets_them() {
        let dir = tempfile::tempdir().unwrap();
        let db = LmdbState::open(dir.path().join("db")).unwrap();
        db.commit_slot(10, |w| {
            w.put(b"a", b"1")?;
            w.put(b"b", b"1")
        })
        .unwrap();
        db.commit_slot(11, |w| {
            w.put(b"c", b"1")?;
            w.delete(b"a")
        })
        .unwrap();
        db.commit_slot(12, |w| w.put(b"b", b"2")).unwrap();
        let touched = |since| {
            let view = db.view().unwrap();
            let mut got = Vec::new();
            let known = view
                .visit_touched_since(since, &mut |k, v| {
                    got.push((k.to_vec(), v.map(<[u8]>::to_vec)));
                    Ok(())
                })
                .unwrap();
            known.then_some(got)
        };
        assert_eq!(
            touched(10).unwrap(),
            vec![
                (b"a".to_vec(), None),
                (b"b".to_vec(), Some(b"2".to_vec())),
                (b"c".to_vec(), Some(b"1".to_vec())),
            ]
        );
        assert_eq!(touched(11).unwrap().len(), 1);
        db.prune_touched(11).unwrap();
        assert_eq!(db.touched_len().unwrap(), 1);
        assert_eq!(touched(10), None, "pruned: no longer known");
        assert_eq!(
            touched(11).unwrap(),
            vec![(b"b".to_vec(), Some(b"2".to_vec()))]
        );
    }

    #[test]
    fn an_import_swaps_in_atomically_and_leftovers_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let db = LmdbState::open(&path).unwrap();
        db.commit_slot(1, |w| w.put(b"old", b"x")).unwrap();
        let mut import = db.begin_import(5).unwrap();
        let mut lattice = Lattice::new();
        let rows: Vec<(Vec<u8>, Vec<u8>)> = (0..1000u32)
            .map(|i| (i.to_be_bytes().to_vec(), vec![1; 100]))
            .collect();
        for (k, v) in &rows {
            lattice.insert(k, v);
        }
        import
            .put_sorted(&mut rows.iter().map(|(k, v)| (k.as_slice(), v.as_slice())))
            .unwrap();
        // Out of order is refused.
        assert!(
            import
                .put_sorted(&mut [(b"\0".as_slice(), b"".as_slice())].into_iter())
                .is_err()
        );
        let staged = import.finish(&lattice).unwrap();
        assert_eq!(
            staged.view().unwrap().bank_hash().unwrap(),
            lattice.bank_hash(5)
        );
        // A view of the old state keeps reading it across the swap.
        let old_view = db.view().unwrap();
        staged.commit().unwrap();
        assert_eq!(old_view.get(b"old").unwrap(), Some(b"x".to_vec()));
        assert_eq!(db.slot().unwrap(), Some(5));
        assert_eq!(db.len().unwrap(), 1000);
        assert_eq!(db.get(b"old").unwrap(), None);
        drop(old_view);
        // Writes go on in the new generation, durable, and survive a reopen.
        db.commit_slot(6, |w| w.put(b"new", b"y")).unwrap();
        drop(db);
        // An import cut off by a crash leaves a generation (and its lock file) that the next
        // open removes.
        fs::write(path.join("gen-00000042.mdb"), b"half an import").unwrap();
        fs::write(path.join("gen-00000042.mdb-lock"), b"").unwrap();
        let db = LmdbState::open(&path).unwrap();
        assert!(matches!(
            LmdbState::open(&path),
            Err(DbError::AlreadyOpen { .. })
        ));
        assert_eq!(db.slot().unwrap(), Some(6));
        assert_eq!(db.get(b"new").unwrap(), Some(b"y".to_vec()));
        let gens = fs::read_dir(&path)
            .unwrap()
            .filter(|e| {
                let n = e.as_ref().unwrap().file_name();
                n.to_string_lossy().starts_with(GEN_PREFIX)
            })
            .count();
        assert_eq!(gens, 2, "the live generation and its lock file");
        // A staged state that is not above the live one is refused and the live one stays.
        let import = db.begin_import(6).unwrap();
        let staged = import.finish(&Lattice::new()).unwrap();
        assert!(matches!(
            staged.commit(),
            Err(DbError::SlotBehind {
                slot: 6,
                current: 6
            })
        ));
        assert_eq!(db.get(b"new").unwrap(), Some(b"y".to_vec()));
    }

    #[test]
    fn changes_commit_or_abort_as_told() {
        let dir = tempfile::tempdir().unwrap();
        let db = LmdbState::open(dir.path().join("db")).unwrap();
        db.commit_slot(3, |w| w.put(b"a", b"1")).unwrap();
        let before = db.view().unwrap().bank_hash().unwrap();
        db.apply_changes(4, &mut |w| {
            w.put(b"a", b"2")?;
            Ok(Decision::Abort)
        })
        .unwrap();
        assert_eq!(db.view().unwrap().bank_hash().unwrap(), before);
        db.apply_changes(9, &mut |w| {
            let (slot, mut lattice) = w.before()?;
            assert_eq!(slot, Some(3));
            let old = w.put(b"a", b"2")?;
            lattice.replace(b"a", old.as_deref(), Some(b"2"));
            let old = w.delete(b"a")?;
            lattice.replace(b"a", old.as_deref(), None);
            Ok(Decision::Commit(Box::new(lattice)))
        })
        .unwrap();
        let view = db.view().unwrap();
        assert_eq!(view.slot(), Some(9));
        assert!(entries(view.as_ref()).is_empty());
        assert_eq!(view.lattice().unwrap(), Lattice::new());
    }

    /// A staged import of `n` entries at `slot`, ready to commit.
    fn staged(db: &LmdbState, slot: u64, n: u32) -> Box<dyn StagedState> {
        let mut import = db.begin_import(slot).unwrap();
        let rows: Vec<(Vec<u8>, Vec<u8>)> = (0..n)
            .map(|i| (i.to_be_bytes().to_vec(), vec![2; 10]))
            .collect();
        let mut lattice = Lattice::new();
        for (k, v) in &rows {
            lattice.insert(k, v);
        }
        import
            .put_sorted(&mut rows.iter().map(|(k, v)| (k.as_slice(), v.as_slice())))
            .unwrap();
        import.finish(&lattice).unwrap()
    }

    fn generation_numbers(path: &Path) -> Vec<u64> {
        let mut n: Vec<u64> = fs::read_dir(path)
            .unwrap()
            .filter_map(|e| parse_gen(&e.unwrap().file_name().to_string_lossy()))
            .collect();
        n.sort();
        n
    }

    #[test]
    fn a_staged_state_removed_before_the_swap_never_becomes_live() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let db = LmdbState::open(&path).unwrap();
        db.commit_slot(1, |w| w.put(b"old", b"x")).unwrap();
        let staged = staged(&db, 5, 100);
        // Something deletes the staged file: reopened by its path it would be an empty state.
        let live = db.generations.live.read().unwrap().number;
        let gone = *generation_numbers(&path)
            .iter()
            .find(|n| **n != live)
            .unwrap();
        fs::remove_file(Generation::path(&path, gone)).unwrap();
        let err = staged.commit().unwrap_err();
        assert!(matches!(err, DbError::Inconsistent(_)), "{err}");
        assert_eq!(db.slot().unwrap(), Some(1));
        assert_eq!(db.get(b"old").unwrap(), Some(b"x".to_vec()));
        db.commit_slot(2, |w| w.put(b"old", b"y")).unwrap();
    }

    #[test]
    fn a_swap_that_could_not_be_made_durable_stops_every_write_until_reopened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let db = LmdbState::open(&path).unwrap();
        db.commit_slot(1, |w| w.put(b"old", b"x")).unwrap();
        let staged = staged(&db, 5, 100);
        crate::disk::FAIL_DIR_SYNC.with(|f| f.set(true));
        let err = staged.commit().unwrap_err();
        assert!(matches!(err, DbError::NotDurable(_)), "{err}");
        // What CURRENT names now is what the process reads, and nothing more is written.
        assert_eq!(db.slot().unwrap(), Some(5));
        assert!(matches!(
            db.commit_slot(6, |w| w.put(b"a", b"b")),
            Err(DbError::NotDurable(_))
        ));
        assert!(matches!(db.begin_import(7), Err(DbError::NotDurable(_))));
        // Opened again, the DB is what CURRENT names, and writes go on.
        drop(db);
        let db = LmdbState::open(&path).unwrap();
        assert_eq!(db.slot().unwrap(), Some(5));
        assert_eq!(db.len().unwrap(), 100);
        db.commit_slot(6, |w| w.put(b"a", b"b")).unwrap();
        assert_eq!(
            generation_numbers(&path).len(),
            1,
            "the other generation is gone"
        );
    }

    #[test]
    fn a_db_another_process_holds_is_refused_at_once_naming_its_directory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        drop(LmdbState::open(&path).unwrap());
        // Another process's lock (taken here on a file description of its own).
        let other = fs::OpenOptions::new()
            .write(true)
            .open(path.join(LOCK))
            .unwrap();
        other.lock().unwrap();
        let err = LmdbState::open(&path).expect_err("refused");
        assert!(matches!(err, DbError::Locked { .. }), "{err}");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        other.unlock().unwrap();
        LmdbState::open(&path).unwrap();
    }
}
