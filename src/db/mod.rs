//! The seam between snapsync and a node's state DB.
//!
//! snapsync never touches a node's DB directly; it goes through [`StateDb`]. A node on another
//! DB (RocksDB, MDBX, ...) implements these traits and keeps the rest of snapsync as it is.
//! [`LmdbState`] is the embedded default, used by the examples and tests.
//!
//! The state model is an ordered map from byte-string keys to byte-string values, plus the slot
//! it was last advanced to. What snapsync needs of a DB:
//! - the current slot ([`StateDb::slot`]),
//! - a consistent, read-only view of the state that stays unchanged while writes go on
//!   ([`StateDb::view`], [`StateView::visit`]),
//! - the state's [`Lattice`] ([`StateView::lattice`]), from which its bank hash follows. A DB
//!   that keeps it up to date per write (as [`LmdbState`] does) answers at once; the default
//!   computes it by visiting every entry, in time proportional to the state,
//! - the keys written since a slot ([`StateView::visit_touched_since`]), so that an incremental
//!   snapshot costs time proportional to the changes. A DB that cannot tell returns `false` and
//!   snapsync falls back to comparing the state with the base snapshot's archive, in time
//!   proportional to the state,
//! - a full import into a fresh DB beside the live one ([`StateDb::begin_import`]), checked
//!   before it is swapped in atomically ([`StagedState::commit`]),
//! - a set of changes applied in one atomic transaction that snapsync may still abort after
//!   seeing the result ([`StateDb::apply_changes`]): how an incremental snapshot is loaded,
//! - reads of a state before it goes live, for the application's own [`StateCheck`]
//!   ([`StateView::get`], [`ChangeWriter::get`]).

mod check;
mod lmdb;

pub use self::check::{CheckedState, StateCheck, StateRead, StateVerdict};
pub(crate) use self::check::{ViewRead, WriterRead};
pub use self::lmdb::{LmdbOptions, LmdbState, SlotWriter};

use std::io;
use std::path::PathBuf;

use crate::bank_hash::{BankHasher, Lattice};
use crate::hash::BankHash;

/// An error of the state DB.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DbError {
    /// A file operation of the DB failed.
    #[error("state DB I/O error at {path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The DB engine reported an error.
    #[error("state DB error: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// An entry is larger than this DB accepts.
    #[error(
        "entry too large for this state DB: key {key} bytes (at most {max_key}), value {value} bytes (at most {max_value})"
    )]
    EntryTooLarge {
        /// Key length.
        key: usize,
        /// Value length.
        value: usize,
        /// Largest key the DB accepts.
        max_key: usize,
        /// Largest value the DB accepts.
        max_value: usize,
    },
    /// A slot lower than the DB's was written, or a staged state is not above the live one.
    #[error("slot {slot} is not above the DB's slot {current}")]
    SlotBehind {
        /// The slot written.
        slot: u64,
        /// The DB's slot.
        current: u64,
    },
    /// The DB is open already in this process (open it once and share the handle).
    #[error("the state DB at {path} is already open in this process")]
    AlreadyOpen {
        /// The DB's directory.
        path: PathBuf,
    },
    /// Another process has the DB open.
    #[error("the state DB at {path} is in use by another process")]
    Locked {
        /// The DB's directory.
        path: PathBuf,
    },
    /// A swap of the live state could not be made durable (the directory could not be
    /// synced): nothing more is written until the DB is opened again.
    #[error("a swap of the state DB could not be made durable: {0}; open the DB again")]
    NotDurable(String),
    /// The DB holds data snapsync cannot interpret.
    #[error("state DB is inconsistent: {0}")]
    Inconsistent(String),
}

/// Why a [`StateView::visit`] stopped.
#[derive(Debug, thiserror::Error)]
pub enum VisitError {
    /// The DB failed while reading.
    #[error(transparent)]
    Db(#[from] DbError),
    /// The visitor returned an error; the visit stopped there.
    #[error("while visiting the state: {0}")]
    Visitor(#[source] io::Error),
}

/// Receives the entries of a [`StateView`], one call per entry; an error stops the visit.
pub type Visitor<'a> = dyn FnMut(&[u8], &[u8]) -> io::Result<()> + 'a;

/// Receives the keys written since a slot with their value now (`None`: deleted), in ascending
/// key order; an error stops the visit.
pub type TouchedVisitor<'a> = dyn FnMut(&[u8], Option<&[u8]>) -> io::Result<()> + 'a;

/// A node's state DB, as snapsync sees it.
///
/// Implementations are shared between threads (`Arc<dyn StateDb>`): snapshots are created and
/// loaded on background threads while the node keeps writing.
pub trait StateDb: Send + Sync + 'static {
    /// The slot the state was last advanced to, or `None` for a DB that holds no state yet.
    fn slot(&self) -> Result<Option<u64>, DbError>;

    /// A consistent view of the latest committed state. Writes committed after this call are not
    /// visible through it, however long it is kept.
    fn view(&self) -> Result<Box<dyn StateView>, DbError>;

    /// Starts importing the full state at `slot` into a fresh DB beside the live one. The live
    /// DB is untouched until [`StagedState::commit`].
    fn begin_import(&self, slot: u64) -> Result<Box<dyn StateImport>, DbError>;

    /// Applies a set of changes that takes the live state to `slot`, in one atomic transaction:
    /// calls `changes` with a writer, and commits only if it returns [`Decision::Commit`]. Other
    /// writers wait meanwhile. Refused when the state is already past `slot`.
    fn apply_changes(&self, slot: u64, changes: &mut ApplyFn<'_>) -> Result<(), DbError>;

    /// Forgets which keys were written at or before `slot` (no incremental snapshot will be made
    /// on a base that old any more). The default does nothing.
    fn prune_touched(&self, slot: u64) -> Result<(), DbError> {
        let _ = slot;
        Ok(())
    }

    /// Bytes free for an import on the DB's file system, when the DB can tell.
    fn free_space(&self) -> Option<u64> {
        None
    }
}

/// What [`StateDb::apply_changes`] does once the changes are written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Commit them: the state is now at the slot given, with this lattice.
    Commit(Box<Lattice>),
    /// Discard them; the state stays as it was.
    Abort,
}

/// The function that writes a set of changes (see [`StateDb::apply_changes`]).
pub type ApplyFn<'a> = dyn FnMut(&mut dyn ChangeWriter) -> Result<Decision, DbError> + 'a;

/// Writes changes inside one transaction of [`StateDb::apply_changes`].
pub trait ChangeWriter {
    /// The slot and lattice of the state before these changes.
    fn before(&self) -> Result<(Option<u64>, Lattice), DbError>;

    /// Sets `key` to `value`; returns the value it had.
    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<Option<Vec<u8>>, DbError>;

    /// Removes `key`; returns the value it had.
    fn delete(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, DbError>;

    /// The value of `key` with the changes written so far in this transaction, for the
    /// application's [`StateCheck`]. The default says the DB cannot read here (a check then
    /// sees an error for every key; [`LmdbState`] reads).
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, DbError> {
        let _ = key;
        Err(DbError::Backend(
            "this state DB does not read inside a write transaction".into(),
        ))
    }
}

/// A consistent, read-only view of the state at one slot.
pub trait StateView: Send {
    /// The slot of this view, `None` for an empty DB that was never advanced.
    fn slot(&self) -> Option<u64>;

    /// Calls `visitor` for every entry in strictly ascending key order (byte-wise). Stops at the
    /// first error the visitor returns.
    fn visit(&self, visitor: &mut Visitor<'_>) -> Result<(), VisitError>;

    /// The value of `key`.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, DbError>;

    /// The lattice of this view (see [`crate::bank_hash`]). The default visits every entry; a DB
    /// that maintains it must return the same value.
    fn lattice(&self) -> Result<Lattice, DbError> {
        let mut hasher = BankHasher::new();
        self.visit(&mut |k, v| {
            hasher.update(k, v);
            Ok(())
        })
        .map_err(|e| match e {
            VisitError::Db(e) => e,
            VisitError::Visitor(e) => DbError::Backend(Box::new(e)),
        })?;
        Ok(hasher.lattice().clone())
    }

    /// The bank hash of this view.
    fn bank_hash(&self) -> Result<BankHash, DbError> {
        Ok(self.lattice()?.bank_hash(self.slot().unwrap_or(0)))
    }

    /// Calls `visitor`, in ascending key order, for every key written after `slot` (with its
    /// value in this view, `None` if it is now absent) and returns `true`; or returns `false`
    /// without calling it when the DB does not know every key written since `slot`. The default
    /// returns `false`.
    fn visit_touched_since(
        &self,
        slot: u64,
        visitor: &mut TouchedVisitor<'_>,
    ) -> Result<bool, VisitError> {
        let _ = (slot, visitor);
        Ok(false)
    }
}

/// A full import in progress into a fresh DB beside the live one.
///
/// Dropping it without [`StateImport::finish`] discards what was imported.
pub trait StateImport: Send {
    /// Adds entries. snapsync calls this with keys in strictly ascending order, across calls
    /// too, so a DB can append rather than insert.
    fn put_sorted(
        &mut self,
        entries: &mut dyn Iterator<Item = (&[u8], &[u8])>,
    ) -> Result<(), DbError>;

    /// Makes the imported state durable beside the live DB, not yet live, recording its lattice
    /// (which snapsync computed while importing).
    fn finish(self: Box<Self>, lattice: &Lattice) -> Result<Box<dyn StagedState>, DbError>;
}

/// A fully imported state, durable but not live yet.
///
/// Dropping it without [`StagedState::commit`] discards it; the live DB is untouched.
pub trait StagedState: Send {
    /// A view of the staged state, to check it before it goes live.
    fn view(&self) -> Result<Box<dyn StateView>, DbError>;

    /// Applies a set of changes to the staged state (an incremental snapshot on top of the full
    /// one just imported), as [`StateDb::apply_changes`] does to the live one.
    fn apply_changes(&mut self, slot: u64, changes: &mut ApplyFn<'_>) -> Result<(), DbError>;

    /// Atomically replaces the live state with this one. A crash at any moment leaves either the
    /// old state or the new one. Refused when the live state is not below the staged one.
    fn commit(self: Box<Self>) -> Result<(), DbError>;
}
