//! Tracked writes: every write keeps the lattice and the `touched` table up to date, whether
//! it commits a slot ([`SlotWriter`]) or applies a set of changes snapsync may still abort.

use heed::RwTxn;

use super::generation::{Generation, Meta};
use super::{backend, map_write};
use crate::bank_hash::Lattice;
use crate::db::{ApplyFn, ChangeWriter, DbError, Decision};

/// Writes of one slot, applied atomically by [`LmdbState::commit_slot`].
///
/// [`LmdbState::commit_slot`]: super::LmdbState::commit_slot
pub struct SlotWriter<'t, 'e> {
    pub(super) generation: &'t Generation,
    pub(super) txn: &'t mut RwTxn<'e>,
    pub(super) lattice: &'t mut Lattice,
    pub(super) slot: u64,
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

/// Runs `changes` in one write transaction on `g`, taking the state to `slot`, committing only
/// if it says so. Every key it writes is recorded in `touched` at `slot`.
pub(super) fn apply_on(
    g: &Generation,
    slot: u64,
    changes: &mut ApplyFn<'_>,
) -> Result<(), DbError> {
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
