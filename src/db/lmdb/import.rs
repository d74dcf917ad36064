//! A full import into a new generation, appended in key order.

use heed::PutFlags;

use super::generation::{Generation, Meta, remove_generation};
use super::staged::LmdbStaged;
use super::{LmdbState, backend, map_write};
use crate::bank_hash::Lattice;
use crate::db::{DbError, StagedState, StateImport};

/// Entries an import appends per transaction: large enough that commits are rare, small enough
/// that LMDB's dirty page list stays far below its limit.
const IMPORT_TXN_BYTES: usize = 64 << 20;

/// A full import into a new generation, appended in key order.
pub(super) struct LmdbImport {
    pub(super) owner: LmdbState,
    pub(super) generation: Option<Generation>,
    pub(super) slot: u64,
    /// Bytes appended since the last commit.
    pub(super) uncommitted: usize,
    /// Keeps the disk writing the new generation as it grows, so that the fsync at its end
    /// finds little left (the import itself is not synced until then).
    pub(super) writeback: Option<crate::disk::Writeback>,
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
        self.writeback = None;
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
