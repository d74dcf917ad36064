//! The application's own check of a state before it goes live: [`StateCheck`].
//!
//! snapsync proves that a loaded state is the one its snapshot's bank hash names. Whether that
//! state is the chain's is a question for the chain: its consensus commits to a state root of
//! its own (an app hash, a state root) that a light client or the finalized headers know. A
//! [`StateCheck`] given to the behaviour sees every state after it is fully written and its bank
//! hash proven, before it is swapped in, and can compare that root with what the chain says.

use std::fmt;

use super::{ChangeWriter, DbError, StateView};
use crate::hash::BankHash;

/// Reads a state that is about to go live (a staged import, or the live DB's transaction with
/// an incremental snapshot's changes written in it).
pub trait StateRead {
    /// The value of `key` in that state.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, DbError>;
}

/// A state, as a [`StateCheck`] sees it.
#[derive(Clone, Copy)]
pub struct CheckedState<'a> {
    /// The slot the state is at.
    pub slot: u64,
    /// Its bank hash, proven against the state's entries.
    pub bank_hash: BankHash,
    /// Its entries.
    pub read: &'a dyn StateRead,
}

impl fmt::Debug for CheckedState<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CheckedState")
            .field("slot", &self.slot)
            .field("bank_hash", &self.bank_hash)
            .finish_non_exhaustive()
    }
}

/// What a [`StateCheck`] says of a state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateVerdict {
    /// The state is the chain's: it goes live.
    Accept,
    /// The state is not the chain's at its slot. Nothing goes live, the peers that advertised
    /// the snapshot are struck (they named a state the chain does not have), the node deletes
    /// its own copy (it serves it no more) and never chooses that state (its slot and bank
    /// hash, under any root) again, and it goes on to the next candidate.
    Refuse(String),
    /// The check cannot tell yet (its light client is not at that slot). Nothing goes live and
    /// nobody is blamed; the snapshot is not chosen again for `failed_cooldown`. A check that
    /// says how far it can judge ([`StateCheck::judges_up_to`]) keeps the node from fetching
    /// such a snapshot at all.
    Undecided(String),
}

/// The application's check of a state before it goes live (see the [`db` module docs](crate::db)).
///
/// Called on a blocking thread, once per load, with the full state written: it may read as
/// many entries as it needs. It must not write to the state DB nor wait on it: an incremental
/// snapshot applied to the live state alone is checked inside the DB's write transaction (the
/// node's own writes wait meanwhile, so the check should return promptly; a view taken from
/// the DB inside it sees the state before). A stop asked while it runs (a cancelled sync)
/// still swaps nothing in. A closure `Fn(&CheckedState<'_>) -> StateVerdict` is one.
pub trait StateCheck: Send + Sync + 'static {
    /// Judges `state`.
    fn check(&self, state: &CheckedState<'_>) -> StateVerdict;

    /// The highest slot the check can judge now (its light client's latest finalized header,
    /// say), or `None` when it can judge any. Snapshots above it are not chosen: they could only
    /// be found [`StateVerdict::Undecided`] after their download. Asked every time the node
    /// decides; by default `None`.
    fn judges_up_to(&self) -> Option<u64> {
        None
    }
}

impl<F> StateCheck for F
where
    F: Fn(&CheckedState<'_>) -> StateVerdict + Send + Sync + 'static,
{
    fn check(&self, state: &CheckedState<'_>) -> StateVerdict {
        self(state)
    }
}

/// A [`StateView`] read as a [`StateRead`].
pub(crate) struct ViewRead<'a>(pub(crate) &'a dyn StateView);

impl StateRead for ViewRead<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, DbError> {
        self.0.get(key)
    }
}

/// A [`ChangeWriter`]'s transaction read as a [`StateRead`].
pub(crate) struct WriterRead<'a>(pub(crate) &'a dyn ChangeWriter);

impl StateRead for WriterRead<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, DbError> {
        self.0.get(key)
    }
}
