//! A consistent view of one generation: a read transaction held open.

use heed::{RoTxn, WithoutTls};

use super::backend;
use super::generation::{Generation, Meta, u64_of};
use crate::bank_hash::Lattice;
use crate::db::{DbError, StateView, TouchedVisitor, VisitError, Visitor};

pub(super) struct LmdbView {
    generation: Generation,
    txn: RoTxn<'static, WithoutTls>,
    meta: Meta,
}

impl LmdbView {
    pub(super) fn new(generation: Generation) -> Result<Self, DbError> {
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
