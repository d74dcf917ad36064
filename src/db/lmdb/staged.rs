//! A staged state, and the swap that makes it live.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::RwLockWriteGuard;

use super::generation::{Generation, Meta, remove_generation};
use super::view::LmdbView;
use super::write::apply_on;
use super::{CURRENT, Generations, LmdbState, backend, io_at, map_write};
use crate::db::{ApplyFn, DbError, StagedState, StateView};
use crate::disk;

pub(super) struct LmdbStaged {
    pub(super) owner: LmdbState,
    pub(super) generation: Option<Generation>,
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
        // Writers of the live DB finish first; new ones wait for the swap.
        let mut live = generations.live.write().unwrap_or_else(|p| p.into_inner());
        let live_slot = {
            let txn = live.env.read_txn().map_err(backend)?;
            live.read_meta(&txn)?.slot
        };
        let staged = generations.refuse_unless_newer(staged, staged_meta.slot, live_slot)?;
        let reopened = generations.reopen_durable(staged, &staged_meta)?;
        let reopened = generations.swap_current(&mut live, reopened)?;
        generations.retire_old(live, reopened);
        Ok(())
    }
}

/// The steps of [`LmdbStaged`]'s commit, made while holding the live generation's write side.
impl Generations {
    /// `staged`, when its slot is past the live state's `live_slot`; otherwise it is removed
    /// and the commit refused.
    fn refuse_unless_newer(
        &self,
        staged: Generation,
        staged_slot: Option<u64>,
        live_slot: Option<u64>,
    ) -> Result<Generation, DbError> {
        let staged_slot = staged_slot.unwrap_or(0);
        if let Some(current) = live_slot
            && current >= staged_slot
        {
            let n = staged.number;
            drop(staged);
            remove_generation(&self.dir, n);
            return Err(DbError::SlotBehind {
                slot: staged_slot,
                current,
            });
        }
        Ok(staged)
    }

    /// `staged`, reopened with the live flags and checked to be what was staged (`staged_meta`);
    /// removed if it cannot be.
    fn reopen_durable(
        &self,
        staged: Generation,
        staged_meta: &Meta,
    ) -> Result<Generation, DbError> {
        // Reopen with the live flags (durable commits) before it becomes live: the import's
        // environment was opened without sync. Only this handle and none other exists.
        let number = staged.number;
        let closing = staged.env.clone().prepare_for_closing();
        drop(staged);
        closing.wait();
        // What is reopened must be what was staged: a file removed or replaced meanwhile
        // would otherwise become the live state.
        let reopened = Generation::open(&self.dir, number, &self.options, false).and_then(|g| {
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
                remove_generation(&self.dir, number);
                return Err(e);
            }
        };
        Ok(reopened)
    }

    /// Points `CURRENT` at `reopened`, handing it back once that is durable. If `CURRENT` was
    /// not renamed, `reopened` is removed; if it was but perhaps not durably, `reopened`
    /// becomes `live` and the DB is poisoned.
    fn swap_current(
        &self,
        live: &mut Generation,
        reopened: Generation,
    ) -> Result<Generation, DbError> {
        let number = reopened.number;
        let current_path = self.dir.join(CURRENT);
        if let Err(e) = point_current_at(&current_path, number) {
            return match e {
                // Not renamed: the old generation stays live.
                Swap::NotRenamed(e) => {
                    drop(reopened);
                    remove_generation(&self.dir, number);
                    Err(io_at(&current_path)(e))
                }
                // Renamed but perhaps not durably: `CURRENT` names the new generation now, so
                // the process goes on with it in memory too, keeps both files for the next
                // open to settle, and writes nothing more until then.
                Swap::NotDurable(e) => {
                    *live = reopened;
                    self.poisoned
                        .store(true, std::sync::atomic::Ordering::Release);
                    Err(DbError::NotDurable(e.to_string()))
                }
            };
        }
        Ok(reopened)
    }

    /// Makes `reopened` the live generation, releases `live`, and removes the old generation.
    fn retire_old(&self, mut live: RwLockWriteGuard<'_, Generation>, reopened: Generation) {
        // The swap is durable; from here on the new generation is the live one, whatever else
        // happens. The old one is deleted: views still reading it keep their open map.
        let old = std::mem::replace(&mut *live, reopened);
        drop(live);
        let old_number = old.number;
        drop(old);
        remove_generation(&self.dir, old_number);
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
