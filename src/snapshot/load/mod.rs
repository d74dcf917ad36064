//! Loading snapshots into the state DB: [`load_snapshot`] (one archive on disk) and
//! [`load_chain`] (a full snapshot, an incremental one on it, or both, from files or from
//! downloads still arriving).
//!
//! Loading is a pipeline: one thread reads the archive and hashes it for the content root,
//! workers decompress and parse its segments and compute their share of the bank hash, and the
//! caller's thread writes them into the DB in key order. A full snapshot is imported into a
//! fresh DB beside the live one; an incremental one is applied in one transaction, to the live
//! DB or to the freshly imported one. The bank hash of the result is checked before anything
//! becomes live, and on any failure the live DB is exactly as it was.

mod apply;
mod import;
mod read;
mod source;

pub use source::{ArchiveSource, Watermark};

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::db::{CheckedState, DbError, StateCheck, StateDb, StateVerdict, ViewRead};
use crate::hash::{BankHash, ContentRoot};
use crate::snapshot::Manifest;
use crate::snapshot::archive::{ArchiveError, SnapshotKind};

/// Log target of loading.
const TARGET: &str = crate::log::DISCOVERY;

/// Where a bank hash was found to differ from the manifest's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum HashStage {
    /// In the archive's end record.
    Archive,
    /// Recomputed from a full archive's records.
    Records,
    /// Of the state once an incremental snapshot was applied.
    Applied,
}

impl std::fmt::Display for HashStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HashStage::Archive => "the archive's end record",
            HashStage::Records => "the archive's records",
            HashStage::Applied => "the state after applying the incremental snapshot",
        })
    }
}

/// A snapshot could not be loaded. The live DB is exactly as it was.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The archive file cannot be read.
    #[error("reading the archive {path}: {source}")]
    Io {
        /// The archive.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The archive's size differs from the manifest's.
    #[error("archive is {actual} bytes, the manifest says {expected}")]
    SizeMismatch {
        /// Size in the manifest.
        expected: u64,
        /// Size of the file.
        actual: u64,
    },
    /// The archive's BLAKE3 hash differs from the manifest's content root.
    #[error("archive content root {actual} differs from the manifest's {expected}")]
    ContentRootMismatch {
        /// Root in the manifest.
        expected: ContentRoot,
        /// Root of the file.
        actual: ContentRoot,
    },
    /// The archive is malformed, or holds more than its manifest or the limits allow.
    #[error("archive is invalid: {0}")]
    Archive(#[from] ArchiveError),
    /// The archive holds another slot than the manifest says.
    #[error("archive holds slot {actual}, the manifest says {expected}")]
    SlotMismatch {
        /// Slot in the manifest.
        expected: u64,
        /// Slot in the archive.
        actual: u64,
    },
    /// The archive is of another kind than the manifest says, or an incremental's base is not
    /// the full snapshot given.
    #[error("archive does not match its manifest: {0}")]
    ManifestMismatch(String),
    /// A bank hash differs from the manifest's.
    #[error("bank hash of {stage} is {actual}, the manifest says {expected}")]
    BankHashMismatch {
        /// Where the difference was found.
        stage: HashStage,
        /// Hash in the manifest.
        expected: BankHash,
        /// Hash found.
        actual: BankHash,
    },
    /// An incremental snapshot cannot apply to this state: its slot is not between the
    /// snapshot's base and the snapshot's own slot.
    #[error(
        "the incremental snapshot at slot {slot} applies to states from slot {base_slot}, and this state is at {local:?}"
    )]
    NotApplicable {
        /// The incremental's slot.
        slot: u64,
        /// Its base's slot.
        base_slot: u64,
        /// The state's slot.
        local: Option<u64>,
    },
    /// Not enough free disk for the import.
    #[error("not enough free disk to load: {needed} bytes needed, {available} available")]
    NoSpace {
        /// Bytes the load needs.
        needed: u64,
        /// Bytes free.
        available: u64,
    },
    /// The DB failed while importing or swapping.
    #[error("state DB: {0}")]
    Db(#[from] DbError),
    /// The load was asked to stop (the sync was cancelled or the node shuts down).
    #[error("the load was stopped")]
    Stopped,
    /// Nothing to load.
    #[error("nothing to load")]
    Nothing,
    /// The application's [`StateCheck`] refused the state: it is not the chain's.
    #[error("the application's state check refused the state at slot {slot}: {reason}")]
    StateRefused {
        /// The state's slot.
        slot: u64,
        /// What the check said.
        reason: String,
    },
    /// The application's [`StateCheck`] could not tell whether the state is the chain's.
    #[error("the application's state check could not judge the state at slot {slot}: {reason}")]
    StateUndecided {
        /// The state's slot.
        slot: u64,
        /// What the check said.
        reason: String,
    },
}

/// Runs the application's check on a state about to go live; an error unless it accepts.
fn run_check(check: &dyn StateCheck, state: &CheckedState<'_>) -> Result<(), LoadError> {
    let started = Instant::now();
    let verdict = check.check(state);
    tracing::info!(
        target: TARGET,
        slot = state.slot,
        bank_hash = %state.bank_hash.short(),
        ?verdict,
        ms = started.elapsed().as_millis() as u64,
        "the application's state check ran"
    );
    match verdict {
        StateVerdict::Accept => Ok(()),
        StateVerdict::Refuse(reason) => Err(LoadError::StateRefused {
            slot: state.slot,
            reason,
        }),
        StateVerdict::Undecided(reason) => Err(LoadError::StateUndecided {
            slot: state.slot,
            reason,
        }),
    }
}

/// Limits a loader applies on top of what the manifest declares (a manifest comes from a peer
/// too: these cap what any snapshot may make a node write).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct LoadLimits {
    max_entries: u64,
    max_state_bytes: u64,
    headroom_bytes: u64,
    workers: usize,
    decode_memory: u64,
    /// Whether the manifest's record counts bound the load (they come from a source the
    /// caller vouches for); when not, only these limits and the disk do.
    declared_counts: bool,
}

impl Default for LoadLimits {
    fn default() -> Self {
        Self {
            max_entries: 1 << 40,
            max_state_bytes: 4 << 40,
            headroom_bytes: 1 << 30,
            workers: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
                .clamp(1, 8),
            decode_memory: 64 << 20,
            declared_counts: true,
        }
    }
}

impl LoadLimits {
    /// Sets the most records a snapshot may hold (default 2^40).
    pub fn with_max_entries(mut self, n: u64) -> Self {
        self.max_entries = n;
        self
    }

    /// Sets the most bytes of uncompressed records a snapshot may hold (default 4 TiB).
    pub fn with_max_state_bytes(mut self, bytes: u64) -> Self {
        self.max_state_bytes = bytes;
        self
    }

    /// Sets the free disk left over after a load, beyond what it needs (default 1 GiB).
    pub fn with_headroom_bytes(mut self, bytes: u64) -> Self {
        self.headroom_bytes = bytes;
        self
    }

    /// Sets the decoding threads (default: the CPUs, at most 8).
    pub fn with_workers(mut self, n: usize) -> Self {
        self.workers = n.max(1);
        self
    }

    /// Sets the most decompressed bytes of segments in flight between the decoding threads and
    /// the writer (default 64 MiB; one segment always goes, however large, up to the 65 MiB a
    /// record of the largest value makes). Bounds a load's memory whatever an archive holds.
    pub fn with_decode_memory(mut self, bytes: u64) -> Self {
        self.decode_memory = bytes;
        self
    }

    /// The most decompressed bytes of segments in flight.
    pub fn decode_memory(&self) -> u64 {
        self.decode_memory
    }

    /// The most records a snapshot may hold.
    pub fn max_entries(&self) -> u64 {
        self.max_entries
    }

    /// The most uncompressed bytes a snapshot may hold.
    pub fn max_state_bytes(&self) -> u64 {
        self.max_state_bytes
    }

    /// These limits, with the manifests' record counts bounding nothing: they are one peer's
    /// claim, which a load must not fail on (the loaded counts are checked after).
    pub(crate) fn ignoring_declared_counts(self) -> Self {
        Self {
            declared_counts: false,
            ..self
        }
    }

    fn for_manifest(&self, m: &Manifest) -> (u64, u64) {
        if !self.declared_counts {
            return (self.max_entries, self.max_state_bytes);
        }
        (
            m.entry_count.min(self.max_entries),
            m.state_bytes.min(self.max_state_bytes),
        )
    }

    /// Refuses a load the disk cannot hold: about 1.5 bytes of DB per byte of records (B-tree
    /// pages and, for changes, their copies), plus the headroom. Undeclared counts are not
    /// checked ahead: the disk is watched as the load goes ([`Progress`]).
    fn check_space(&self, db: &dyn StateDb, state_bytes: u64) -> Result<(), LoadError> {
        if !self.declared_counts {
            return Ok(());
        }
        let Some(available) = db.free_space() else {
            return Ok(());
        };
        let needed = state_bytes
            .saturating_add(state_bytes / 2)
            .saturating_add(self.headroom_bytes);
        if needed > available {
            return Err(LoadError::NoSpace { needed, available });
        }
        Ok(())
    }
}

/// How often (in uncompressed bytes written) a load looks at the free disk.
const SPACE_CHECK_BYTES: u64 = 64 << 20;

/// A load under way, as its reading loop sees it: whether it was asked to stop, and the disk,
/// watched every [`SPACE_CHECK_BYTES`] written so that a load never fills it, whatever its
/// manifest declared.
pub(crate) struct Progress<'a> {
    db: &'a dyn StateDb,
    stop: Option<&'a std::sync::atomic::AtomicBool>,
    headroom: u64,
    written: u64,
    next_check: u64,
}

impl<'a> Progress<'a> {
    pub(crate) fn new(
        db: &'a dyn StateDb,
        limits: &LoadLimits,
        stop: Option<&'a std::sync::atomic::AtomicBool>,
    ) -> Self {
        Self {
            db,
            stop,
            headroom: limits.headroom_bytes,
            written: 0,
            next_check: SPACE_CHECK_BYTES,
        }
    }

    /// `bytes` more were written; fails when asked to stop or the disk runs low.
    pub(crate) fn wrote(&mut self, bytes: u64) -> Result<(), LoadError> {
        self.check_stop()?;
        self.written += bytes;
        if self.written < self.next_check {
            return Ok(());
        }
        self.next_check = self.written + SPACE_CHECK_BYTES;
        if let Some(available) = self.db.free_space()
            && available < self.headroom
        {
            return Err(LoadError::NoSpace {
                needed: self.written.saturating_add(self.headroom),
                available,
            });
        }
        Ok(())
    }

    /// Fails when the load was asked to stop.
    pub(crate) fn check_stop(&self) -> Result<(), LoadError> {
        match self.stop {
            Some(stop) if stop.load(std::sync::atomic::Ordering::Acquire) => {
                Err(LoadError::Stopped)
            }
            _ => Ok(()),
        }
    }
}

/// What a successful load did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadReport {
    /// Slot now live.
    pub slot: u64,
    /// Bank hash now live.
    pub bank_hash: BankHash,
    /// Kind of the last snapshot loaded.
    pub kind: SnapshotKind,
    /// Records loaded (all archives).
    pub entries: u64,
    /// Archive bytes read.
    pub archive_bytes: u64,
    /// Uncompressed bytes read.
    pub state_bytes: u64,
    /// Time taken.
    pub elapsed: Duration,
}

/// What reading one archive gave.
#[derive(Debug, Clone, Copy)]
struct Read {
    entries: u64,
    archive_bytes: u64,
    state_bytes: u64,
    bank_hash: BankHash,
}

/// Loads the archive at `archive`, described by `manifest`, into `db`: a full snapshot is
/// imported beside the live DB and swapped in; an incremental one is applied to the live DB,
/// whose state must be between the snapshot's base and its slot. Default limits.
pub fn load_snapshot(
    db: &dyn StateDb,
    archive: &Path,
    manifest: &Manifest,
) -> Result<LoadReport, LoadError> {
    let source = ArchiveSource::file(archive, manifest.archive_size);
    let limits = LoadLimits::default();
    if manifest.is_full() {
        load_chain(db, Some((&source, manifest)), None, &limits)
    } else {
        load_chain(db, None, Some((&source, manifest)), &limits)
    }
}

/// Loads a full snapshot, an incremental one on it, or both, atomically:
/// - a full one is imported into a fresh DB beside the live one while its records are checked
///   against its bank hash;
/// - with both, the incremental one is applied to that fresh DB and the result checked against
///   the incremental's bank hash before anything becomes live;
/// - an incremental one alone is applied to the live DB in one transaction, committed only if
///   the resulting bank hash matches; checking it costs time proportional to the changes, not
///   to the state.
///
/// Sources may be downloads still arriving ([`ArchiveSource::growing`]): loading then keeps
/// pace with the download. On any failure the live DB is untouched.
pub fn load_chain(
    db: &dyn StateDb,
    full: Option<(&ArchiveSource, &Manifest)>,
    incremental: Option<(&ArchiveSource, &Manifest)>,
    limits: &LoadLimits,
) -> Result<LoadReport, LoadError> {
    load_chain_legs(db, full, incremental, limits, None, None)
        .map(|l| l.report)
        .map_err(|(_, e)| e)
}

/// What [`load_chain_legs`] loaded: the report, and the record counts each archive held.
#[derive(Debug, Clone)]
pub(crate) struct Loaded {
    pub(crate) report: LoadReport,
    /// Per archive (full first): its kind, records and uncompressed bytes.
    pub(crate) counts: Vec<(SnapshotKind, u64, u64)>,
}

/// [`load_chain`], saying which snapshot a failure is about (the full one: its import, or the
/// two not fitting together; the incremental one: its apply), stopping when `stop` is set
/// (never swapping in anything after), swapping in only a state `check` accepts, and saying
/// what each archive held.
pub(crate) fn load_chain_legs(
    db: &dyn StateDb,
    full: Option<(&ArchiveSource, &Manifest)>,
    incremental: Option<(&ArchiveSource, &Manifest)>,
    limits: &LoadLimits,
    stop: Option<&std::sync::atomic::AtomicBool>,
    check: Option<&dyn StateCheck>,
) -> Result<Loaded, (SnapshotKind, LoadError)> {
    let on_full = |e: LoadError| (SnapshotKind::Full, e);
    let started = Instant::now();
    let last = incremental
        .or(full)
        .ok_or((SnapshotKind::Full, LoadError::Nothing))?
        .1;
    let _span =
        tracing::info_span!(target: TARGET, "load", slot = last.slot, kind = %last.kind).entered();
    if let (Some((_, f)), Some((_, i))) = (full, incremental) {
        let fits = i.base.is_some_and(|b| {
            (b.slot, b.bank_hash, b.content_root) == (f.slot, f.bank_hash, f.content_root)
        });
        if !fits || !f.is_full() {
            return Err((
                SnapshotKind::Incremental,
                LoadError::ManifestMismatch(
                    "the incremental snapshot is not based on this full one".into(),
                ),
            ));
        }
    }
    let mut progress = Progress::new(db, limits, stop);
    let reads = match (full, incremental) {
        (Some(full), inc) => load_on_full(db, full, inc, limits, &mut progress, check)?,
        (None, Some(inc)) => vec![(
            SnapshotKind::Incremental,
            apply_alone(db, inc, limits, &mut progress, check)
                .map_err(|e| (SnapshotKind::Incremental, e))?,
        )],
        (None, None) => return Err(on_full(LoadError::Nothing)),
    };
    let bank_hash = reads.last().expect("something was read").1.bank_hash;
    let total = |f: fn(&Read) -> u64| reads.iter().map(|(_, r)| f(r)).sum();
    let report = LoadReport {
        slot: last.slot,
        bank_hash,
        kind: last.kind,
        entries: total(|r| r.entries),
        archive_bytes: total(|r| r.archive_bytes),
        state_bytes: total(|r| r.state_bytes),
        elapsed: started.elapsed(),
    };
    tracing::info!(
        target: TARGET,
        slot = report.slot,
        kind = %report.kind,
        bank_hash = %bank_hash.short(),
        entries = report.entries,
        secs = report.elapsed.as_secs_f64(),
        "snapshot loaded"
    );
    Ok(Loaded {
        report,
        counts: reads
            .iter()
            .map(|(k, r)| (*k, r.entries, r.state_bytes))
            .collect(),
    })
}

/// Imports a full snapshot beside the live DB, applies an incremental one on it if given, and
/// swaps the result in (unless asked to stop first, or `check` does not accept it). Returns
/// what each archive gave.
fn load_on_full(
    db: &dyn StateDb,
    (fs, fm): (&ArchiveSource, &Manifest),
    incremental: Option<(&ArchiveSource, &Manifest)>,
    limits: &LoadLimits,
    progress: &mut Progress<'_>,
    check: Option<&dyn StateCheck>,
) -> Result<Vec<(SnapshotKind, Read)>, (SnapshotKind, LoadError)> {
    let on_full = |e: LoadError| (SnapshotKind::Full, e);
    if !fm.is_full() {
        return Err(on_full(LoadError::ManifestMismatch(
            "expected a full snapshot".into(),
        )));
    }
    let extra = incremental.map_or(0, |(_, m)| m.state_bytes);
    limits
        .check_space(db, fm.state_bytes.saturating_add(extra))
        .map_err(on_full)?;
    let (mut staged, read) = import::import_full(db, fs, fm, limits, progress).map_err(on_full)?;
    let mut reads = vec![(SnapshotKind::Full, read)];
    if let Some((is, im)) = incremental {
        let read = apply::apply_incremental(
            &mut |slot, f| staged.apply_changes(slot, f),
            is,
            im,
            limits,
            progress,
            None,
        )
        .map_err(|e| (SnapshotKind::Incremental, e))?;
        reads.push((SnapshotKind::Incremental, read));
    }
    progress.check_stop().map_err(on_full)?;
    if let Some(check) = check {
        // The state is the last snapshot's: a refusal is about it.
        let (kind, read) = reads.last().expect("the full snapshot was read");
        let slot = incremental.map_or(fm.slot, |(_, m)| m.slot);
        let view = staged.view().map_err(|e| on_full(e.into()))?;
        let state = CheckedState {
            slot,
            bank_hash: read.bank_hash,
            read: &ViewRead(view.as_ref()),
        };
        run_check(check, &state).map_err(|e| (*kind, e))?;
        // The check may take a while: a stop asked meanwhile still swaps nothing in.
        progress.check_stop().map_err(on_full)?;
    }
    staged.commit().map_err(|e| on_full(e.into()))?;
    Ok(reads)
}

/// Applies an incremental snapshot to the live DB in one transaction.
fn apply_alone(
    db: &dyn StateDb,
    (is, im): (&ArchiveSource, &Manifest),
    limits: &LoadLimits,
    progress: &mut Progress<'_>,
    check: Option<&dyn StateCheck>,
) -> Result<Read, LoadError> {
    limits.check_space(db, im.state_bytes)?;
    apply::apply_incremental(
        &mut |slot, f| db.apply_changes(slot, f),
        is,
        im,
        limits,
        progress,
        check,
    )
}

/// After an archive error on a complete file: hashes the whole file, so that a corrupt archive
/// is reported as such (a content root mismatch) rather than as what the corruption caused.
fn prefer_root_mismatch(source: &ArchiveSource, m: &Manifest, error: LoadError) -> LoadError {
    if !source.is_complete() {
        return error;
    }
    let hashed = std::fs::File::open(source.path()).and_then(|mut f| {
        let mut h = blake3::Hasher::new();
        io::copy(&mut f, &mut h)?;
        Ok(ContentRoot::from(h.finalize()))
    });
    match hashed {
        Ok(actual) if actual != m.content_root => LoadError::ContentRootMismatch {
            expected: m.content_root,
            actual,
        },
        _ => error,
    }
}

/// Checks an archive source against its manifest before reading it.
fn check_source(source: &ArchiveSource, m: &Manifest) -> Result<(), LoadError> {
    if source.size() != m.archive_size {
        return Err(LoadError::SizeMismatch {
            expected: m.archive_size,
            actual: source.size(),
        });
    }
    if !source.is_complete() {
        // A download still arriving: its file takes its size when the disk is reserved.
        return Ok(());
    }
    let actual = std::fs::metadata(source.path())
        .map_err(|e| LoadError::Io {
            path: source.path().to_path_buf(),
            source: e,
        })?
        .len();
    if actual != m.archive_size {
        return Err(LoadError::SizeMismatch {
            expected: m.archive_size,
            actual,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests;
