//! [`RedbState`]: the embedded default state DB, on redb.
//!
//! redb is pure Rust (no C toolchain, no system library), ACID, crash-safe by default, and its
//! read transactions are MVCC snapshots that stay consistent across any number of later commits:
//! exactly the consistent view a background snapshot needs while the node keeps writing.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, mpsc};
use std::thread;
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use super::{DbError, StagedState, StateDb, StateImport, StateView, VisitError, Visitor};

const STATE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("snapsync_state");
const META: TableDefinition<&str, u64> = TableDefinition::new("snapsync_meta");
const SLOT_KEY: &str = "slot";

/// Page cache of the live DB when none is given: enough for fast writes, small enough that a
/// node's memory stays predictable.
pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;

/// How many bytes an import buffers before it writes them in one (non-durable) transaction.
/// Bounds the memory of an import whatever the state size; 4 MiB was measured fastest (larger
/// batches fall out of the CPU caches, smaller ones commit more often).
const IMPORT_BATCH_BYTES: usize = 4 << 20;

/// Page cache of the staging DB an import writes.
const IMPORT_CACHE_BYTES: usize = 32 << 20;

/// Infix of the staging files an import writes beside the live DB.
const IMPORT_INFIX: &str = ".import-";

fn backend(e: impl Into<redb::Error>) -> DbError {
    let e: redb::Error = e.into();
    DbError::Backend(Box::new(e))
}

fn open_error(path: &Path, e: redb::DatabaseError) -> DbError {
    match e {
        redb::DatabaseError::Storage(redb::StorageError::Io(source)) => DbError::Io {
            path: path.to_path_buf(),
            source,
        },
        other => backend(other),
    }
}

/// The embedded default [`StateDb`]: one redb file holding the state table and the slot.
///
/// Cloning is cheap and every clone is the same DB. [`StateImport`]s are written to a file beside
/// the live one (`<file>.import-<id>`) and renamed over it on [`StagedState::commit`]; leftovers
/// of an interrupted import are removed by [`RedbState::open`].
#[derive(Clone)]
pub struct RedbState {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    cache_bytes: usize,
    /// The live DB. Writers hold the read side for the length of a transaction; a committed
    /// import takes the write side to swap the file.
    db: RwLock<Arc<Database>>,
}

impl std::fmt::Debug for RedbState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbState")
            .field("path", &self.inner.path)
            .finish()
    }
}

/// Writes of one slot, applied atomically by [`RedbState::commit_slot`].
pub struct SlotWriter<'t> {
    table: redb::Table<'t, &'static [u8], &'static [u8]>,
}

impl SlotWriter<'_> {
    /// Sets `key` to `value`.
    pub fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), DbError> {
        check_entry(key, value)?;
        self.table.insert(key, value).map_err(backend)?;
        Ok(())
    }

    /// Removes `key`, if present.
    pub fn delete(&mut self, key: &[u8]) -> Result<(), DbError> {
        self.table.remove(key).map_err(backend)?;
        Ok(())
    }
}

fn check_entry(key: &[u8], value: &[u8]) -> Result<(), DbError> {
    if key.len() > crate::bank_hash::MAX_KEY_LEN || value.len() > crate::bank_hash::MAX_VALUE_LEN {
        return Err(DbError::Inconsistent(format!(
            "entry too large (key {} bytes, value {} bytes; limits {} and {})",
            key.len(),
            value.len(),
            crate::bank_hash::MAX_KEY_LEN,
            crate::bank_hash::MAX_VALUE_LEN
        )));
    }
    Ok(())
}

impl RedbState {
    /// Opens (or creates) the DB file at `path` with the default page cache, and removes
    /// leftovers of interrupted imports beside it.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, DbError> {
        Self::open_with_cache(path, DEFAULT_CACHE_BYTES)
    }

    /// Like [`RedbState::open`] with a page cache of `cache_bytes`.
    pub fn open_with_cache(path: impl Into<PathBuf>, cache_bytes: usize) -> Result<Self, DbError> {
        let path = path.into();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).map_err(|source| DbError::Io {
                path: parent.to_path_buf(),
                source,
            })?;
            remove_stale_imports(&path)?;
        }
        let db = open_db(&path, cache_bytes)?;
        Ok(Self {
            inner: Arc::new(Inner {
                path,
                cache_bytes,
                db: RwLock::new(Arc::new(db)),
            }),
        })
    }

    /// Path of the live DB file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    fn current(&self) -> Arc<Database> {
        self.inner
            .db
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Advances the state to `slot`: runs `writes` and records the slot in one durable
    /// transaction. A slot lower than the current one is refused.
    pub fn commit_slot<F>(&self, slot: u64, writes: F) -> Result<(), DbError>
    where
        F: FnOnce(&mut SlotWriter<'_>) -> Result<(), DbError>,
    {
        // Hold the read side for the whole transaction so a concurrent import commit waits.
        let guard = self.inner.db.read().unwrap_or_else(|p| p.into_inner());
        let txn = guard.begin_write().map_err(backend)?;
        {
            let mut meta = txn.open_table(META).map_err(backend)?;
            let current = meta.get(SLOT_KEY).map_err(backend)?.map(|v| v.value());
            if let Some(current) = current
                && slot < current
            {
                return Err(DbError::Inconsistent(format!(
                    "slot {slot} is behind the DB's slot {current}"
                )));
            }
            meta.insert(SLOT_KEY, slot).map_err(backend)?;
            let table = txn.open_table(STATE).map_err(backend)?;
            let mut writer = SlotWriter { table };
            writes(&mut writer)?;
        }
        txn.commit().map_err(backend)?;
        Ok(())
    }

    /// The value of `key` in the latest committed state.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, DbError> {
        let txn = self.current().begin_read().map_err(backend)?;
        let table = match txn.open_table(STATE) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(backend(e)),
        };
        Ok(table.get(key).map_err(backend)?.map(|v| v.value().to_vec()))
    }

    /// Number of entries in the latest committed state.
    pub fn len(&self) -> Result<u64, DbError> {
        let txn = self.current().begin_read().map_err(backend)?;
        match txn.open_table(STATE) {
            Ok(t) => redb::ReadableTableMetadata::len(&t).map_err(backend),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
            Err(e) => Err(backend(e)),
        }
    }

    /// Whether the latest committed state holds no entries.
    pub fn is_empty(&self) -> Result<bool, DbError> {
        Ok(self.len()? == 0)
    }
}

fn open_db(path: &Path, cache_bytes: usize) -> Result<Database, DbError> {
    redb::Builder::new()
        .set_cache_size(cache_bytes)
        .create(path)
        .map_err(|e| open_error(path, e))
}

fn remove_stale_imports(path: &Path) -> Result<(), DbError> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Ok(());
    };
    let prefix = format!("{}{IMPORT_INFIX}", name.to_string_lossy());
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(DbError::Io {
                path: dir.to_path_buf(),
                source,
            });
        }
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            let stale = entry.path();
            tracing::info!(target: "NETWORK:SNAPSHOT", path = %stale.display(), "removing an interrupted import");
            fs::remove_file(&stale).map_err(|source| DbError::Io {
                path: stale.clone(),
                source,
            })?;
        }
    }
    Ok(())
}

fn read_slot(txn: &redb::ReadTransaction) -> Result<Option<u64>, DbError> {
    match txn.open_table(META) {
        Ok(meta) => Ok(meta.get(SLOT_KEY).map_err(backend)?.map(|v| v.value())),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(backend(e)),
    }
}

impl StateDb for RedbState {
    fn slot(&self) -> Result<Option<u64>, DbError> {
        let txn = self.current().begin_read().map_err(backend)?;
        read_slot(&txn)
    }

    fn view(&self) -> Result<Box<dyn StateView>, DbError> {
        Ok(Box::new(RedbView::new(&self.current())?))
    }

    fn begin_import(&self, slot: u64) -> Result<Box<dyn StateImport>, DbError> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let mut name = self.inner.path.file_name().unwrap_or_default().to_owned();
        name.push(format!("{IMPORT_INFIX}{}-{nanos}", std::process::id()));
        let path = self.inner.path.with_file_name(name);
        Ok(Box::new(RedbImport::start(self.clone(), path, slot)?))
    }
}

struct RedbView {
    txn: redb::ReadTransaction,
    slot: Option<u64>,
}

impl RedbView {
    fn new(db: &Database) -> Result<Self, DbError> {
        let txn = db.begin_read().map_err(backend)?;
        let slot = read_slot(&txn)?;
        Ok(Self { txn, slot })
    }
}

impl StateView for RedbView {
    fn slot(&self) -> Option<u64> {
        self.slot
    }

    fn visit(&self, visitor: &mut Visitor<'_>) -> Result<(), VisitError> {
        let table = match self.txn.open_table(STATE) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
            Err(e) => return Err(backend(e).into()),
        };
        for item in table.iter().map_err(backend)? {
            let (k, v) = item.map_err(backend)?;
            visitor(k.value(), v.value()).map_err(VisitError::Visitor)?;
        }
        Ok(())
    }
}

/// A staging DB file beside the live one; removed when dropped unless committed.
struct Staging {
    path: PathBuf,
    db: Database,
}

impl Staging {
    fn discard(self) {
        let Staging { path, db } = self;
        drop(db);
        remove_file_logged(&path);
    }
}

fn remove_file_logged(path: &Path) {
    if let Err(e) = fs::remove_file(path)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), error = %e, "could not remove a staging DB");
    }
}

/// Work for an import's writer thread.
enum ImportBatch {
    /// Entries to insert in one non-durable transaction.
    Entries(Vec<(Vec<u8>, Vec<u8>)>),
    /// The last entries, then the slot, in one durable transaction.
    Last(Vec<(Vec<u8>, Vec<u8>)>, u64),
}

/// Batches in flight to the writer thread; bounds an import's memory to about
/// `(IMPORT_DEPTH + 2) * IMPORT_BATCH_BYTES`.
const IMPORT_DEPTH: usize = 2;

/// Imports into a staging file. Entries are gathered into batches on the caller's thread and
/// inserted on a writer thread, so decompressing and inserting overlap.
struct RedbImport {
    owner: RedbState,
    path: PathBuf,
    slot: u64,
    batch: Vec<(Vec<u8>, Vec<u8>)>,
    batch_bytes: usize,
    tx: Option<mpsc::SyncSender<ImportBatch>>,
    writer: Option<thread::JoinHandle<Result<Database, DbError>>>,
}

fn write_batch(
    db: &Database,
    entries: Vec<(Vec<u8>, Vec<u8>)>,
    last: Option<u64>,
) -> Result<(), DbError> {
    let mut txn = db.begin_write().map_err(backend)?;
    let durability = if last.is_some() {
        Durability::Immediate
    } else {
        Durability::None
    };
    txn.set_durability(durability).map_err(backend)?;
    {
        let mut table = txn.open_table(STATE).map_err(backend)?;
        for (k, v) in entries {
            table.insert(k.as_slice(), v.as_slice()).map_err(backend)?;
        }
        if let Some(slot) = last {
            let mut meta = txn.open_table(META).map_err(backend)?;
            meta.insert(SLOT_KEY, slot).map_err(backend)?;
        }
    }
    txn.commit().map_err(backend)
}

impl RedbImport {
    fn start(owner: RedbState, path: PathBuf, slot: u64) -> Result<Self, DbError> {
        let db = open_db(&path, IMPORT_CACHE_BYTES)?;
        let (tx, rx) = mpsc::sync_channel::<ImportBatch>(IMPORT_DEPTH);
        let writer = thread::Builder::new()
            .name("snapsync-import".into())
            .spawn(move || {
                for batch in rx {
                    match batch {
                        ImportBatch::Entries(entries) => write_batch(&db, entries, None)?,
                        ImportBatch::Last(entries, slot) => {
                            write_batch(&db, entries, Some(slot))?;
                            return Ok(db);
                        }
                    }
                }
                Err(DbError::Inconsistent("import abandoned".into()))
            })
            .map_err(|source| DbError::Io {
                path: path.clone(),
                source,
            })?;
        Ok(Self {
            owner,
            path,
            slot,
            batch: Vec::new(),
            batch_bytes: 0,
            tx: Some(tx),
            writer: Some(writer),
        })
    }

    fn send(&mut self, batch: ImportBatch) -> Result<(), DbError> {
        let sent = self.tx.as_ref().map(|tx| tx.send(batch));
        if matches!(sent, Some(Ok(()))) {
            return Ok(());
        }
        // The writer stopped: report why.
        Err(match self.join() {
            Err(e) => e,
            Ok(_) => DbError::Inconsistent("import writer stopped".into()),
        })
    }

    fn join(&mut self) -> Result<Database, DbError> {
        self.tx = None;
        match self.writer.take().map(|h| h.join()) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(DbError::Inconsistent("import writer panicked".into())),
            None => Err(DbError::Inconsistent("import already finished".into())),
        }
    }
}

impl StateImport for RedbImport {
    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), DbError> {
        check_entry(key, value)?;
        self.batch.push((key.to_vec(), value.to_vec()));
        self.batch_bytes += key.len() + value.len() + 48;
        if self.batch_bytes >= IMPORT_BATCH_BYTES {
            let batch = std::mem::take(&mut self.batch);
            self.batch_bytes = 0;
            self.send(ImportBatch::Entries(batch))?;
        }
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<Box<dyn StagedState>, DbError> {
        let batch = std::mem::take(&mut self.batch);
        self.send(ImportBatch::Last(batch, self.slot))?;
        let db = self.join()?;
        Ok(Box::new(RedbStaged {
            owner: self.owner.clone(),
            staging: Some(Staging {
                path: std::mem::take(&mut self.path),
                db,
            }),
        }))
    }
}

impl Drop for RedbImport {
    fn drop(&mut self) {
        if self.writer.is_some() {
            // Closing the channel makes the writer give up; then remove its file.
            let _ = self.join();
        }
        if !self.path.as_os_str().is_empty() {
            remove_file_logged(&self.path);
        }
    }
}

struct RedbStaged {
    owner: RedbState,
    staging: Option<Staging>,
}

impl StagedState for RedbStaged {
    fn view(&self) -> Result<Box<dyn StateView>, DbError> {
        let staging = self.staging.as_ref().expect("staging present until commit");
        Ok(Box::new(RedbView::new(&staging.db)?))
    }

    fn commit(mut self: Box<Self>) -> Result<(), DbError> {
        let Staging { path, db } = self.staging.take().expect("staging present until commit");
        let inner = &self.owner.inner;
        // Wait for writers of the live DB to finish; new ones wait for the swap.
        let mut live = inner.db.write().unwrap_or_else(|p| p.into_inner());
        drop(db);
        if let Err(source) = fs::rename(&path, &inner.path) {
            let _ = fs::remove_file(&path);
            return Err(DbError::Io { path, source });
        }
        if let Some(parent) = inner.path.parent() {
            sync_dir(parent)?;
        }
        *live = Arc::new(open_db(&inner.path, inner.cache_bytes)?);
        Ok(())
    }
}

impl Drop for RedbStaged {
    fn drop(&mut self) {
        if let Some(staging) = self.staging.take() {
            staging.discard();
        }
    }
}

/// Makes a rename or unlink in `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), DbError> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| DbError::Io {
            path: dir.to_path_buf(),
            source,
        })
}
