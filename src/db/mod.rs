//! The seam between snapsync and a node's state DB.
//!
//! snapsync never touches a node's DB directly; it goes through [`StateDb`]. A node on another
//! DB (RocksDB, MDBX, ...) implements these traits and keeps the rest of snapsync as it is.
//! [`RedbState`] is the embedded default, used by the examples and tests.
//!
//! The state model is an ordered map from byte-string keys to byte-string values, plus the slot
//! it was last advanced to. What snapsync needs of a DB:
//! - the current slot ([`StateDb::slot`]),
//! - a consistent, read-only view of the state that stays unchanged while writes go on
//!   ([`StateDb::view`], [`StateView::visit`]),
//! - an import into a fresh DB beside the live one ([`StateDb::begin_import`]), checked through its
//!   own view before it is swapped in atomically ([`StagedState::commit`]),
//! - the bank hash of a view ([`StateView::bank_hash`]; the default computes it by visiting).

mod redb;

pub use self::redb::{DEFAULT_CACHE_BYTES, RedbState, SlotWriter};

use std::io;
use std::path::PathBuf;

use crate::bank_hash::BankHasher;
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

    /// Starts importing the state at `slot` into a fresh DB beside the live one. The live DB is
    /// untouched until [`StagedState::commit`].
    fn begin_import(&self, slot: u64) -> Result<Box<dyn StateImport>, DbError>;
}

/// A consistent, read-only view of the state at one slot.
pub trait StateView: Send {
    /// The slot of this view, `None` for an empty DB that was never advanced.
    fn slot(&self) -> Option<u64>;

    /// Calls `visitor` for every entry in strictly ascending key order (byte-wise). Stops at the
    /// first error the visitor returns.
    fn visit(&self, visitor: &mut Visitor<'_>) -> Result<(), VisitError>;

    /// The bank hash of this view (see [`crate::bank_hash`]). The default visits every entry; a
    /// DB that maintains the hash itself may override it, and must return the same value.
    fn bank_hash(&self) -> Result<BankHash, DbError> {
        let mut hasher = BankHasher::new(self.slot().unwrap_or(0));
        self.visit(&mut |k, v| {
            hasher.update(k, v);
            Ok(())
        })
        .map_err(|e| match e {
            VisitError::Db(e) => e,
            VisitError::Visitor(e) => DbError::Backend(Box::new(e)),
        })?;
        Ok(hasher.finalize())
    }
}

/// An import in progress into a fresh DB beside the live one.
///
/// Dropping it without [`StateImport::finish`] discards what was imported.
pub trait StateImport: Send {
    /// Adds one entry. snapsync calls this in strictly ascending key order.
    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), DbError>;

    /// Makes the imported state durable beside the live DB, not yet live.
    fn finish(self: Box<Self>) -> Result<Box<dyn StagedState>, DbError>;
}

/// A fully imported state, durable but not live yet.
///
/// Dropping it without [`StagedState::commit`] discards it; the live DB is untouched.
pub trait StagedState: Send {
    /// A view of the staged state, to check it before it goes live.
    fn view(&self) -> Result<Box<dyn StateView>, DbError>;

    /// Atomically replaces the live state with this one. A crash at any moment leaves either the
    /// old state or the new one.
    fn commit(self: Box<Self>) -> Result<(), DbError>;
}
