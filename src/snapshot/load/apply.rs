//! The incremental apply: every record of an incremental archive written in one transaction,
//! with the bank hash of the result computed from the DB's own lattice and the changed entries
//! only, and the transaction committed only if it matches.

use super::read::read_archive;
use super::{
    ArchiveSource, HashStage, LoadError, LoadLimits, Progress, Read, check_source, run_check,
};
use crate::bank_hash::Lattice;
use crate::db::{ApplyFn, ChangeWriter, CheckedState, DbError, Decision, StateCheck, WriterRead};
use crate::snapshot::Manifest;

/// Applies the incremental archive `source` through `apply` (the live DB's or a staged one's
/// [`crate::db::StateDb::apply_changes`]). Commits only if the resulting state's bank hash is
/// the manifest's and `check`, when given, accepts the result.
pub(super) fn apply_incremental(
    apply: &mut dyn FnMut(u64, &mut ApplyFn<'_>) -> Result<(), DbError>,
    source: &ArchiveSource,
    m: &Manifest,
    limits: &LoadLimits,
    progress: &mut Progress<'_>,
    check: Option<&dyn StateCheck>,
) -> Result<Read, LoadError> {
    let base = m
        .base
        .ok_or_else(|| LoadError::ManifestMismatch("expected an incremental snapshot".into()))?;
    check_source(source, m)?;
    let mut outcome: Option<Result<Read, LoadError>> = None;
    apply(m.slot, &mut |writer: &mut dyn ChangeWriter| {
        let (local, lattice) = writer.before()?;
        if local.is_none_or(|s| s < base.slot || s > m.slot) {
            outcome = Some(Err(LoadError::NotApplicable {
                slot: m.slot,
                base_slot: base.slot,
                local,
            }));
            return Ok(Decision::Abort);
        }
        let result = write_changes(writer, lattice, source, m, limits, progress)
            // Asked to stop while writing: nothing is committed.
            .and_then(|r| progress.check_stop().map(|()| r))
            .and_then(|r| {
                if let Some(check) = check {
                    let state = CheckedState {
                        slot: m.slot,
                        bank_hash: r.0.bank_hash,
                        read: &WriterRead(&*writer),
                    };
                    run_check(check, &state)?;
                    // A stop asked while the check ran still commits nothing.
                    progress.check_stop()?;
                }
                Ok(r)
            });
        let decision = match &result {
            Ok((_, lattice)) => Decision::Commit(Box::new(lattice.clone())),
            Err(_) => Decision::Abort,
        };
        outcome = Some(result.map(|(read, _)| read));
        Ok(decision)
    })?;
    outcome.unwrap_or(Err(LoadError::Nothing))
}

/// Writes every record and returns what was read and the new lattice, once the new bank hash
/// has been checked.
fn write_changes(
    writer: &mut dyn ChangeWriter,
    mut lattice: Lattice,
    source: &ArchiveSource,
    m: &Manifest,
    limits: &LoadLimits,
    progress: &mut Progress<'_>,
) -> Result<(Read, Lattice), LoadError> {
    // Workers sum the elements of the new values; the old ones are subtracted here, as the
    // DB hands them back.
    let read = read_archive(source, m, limits, &mut |r| {
        for rec in r.iter() {
            let old = match rec.value {
                Some(v) => writer.put(rec.key, v)?,
                None => writer.delete(rec.key)?,
            };
            if let Some(old) = old {
                lattice.remove(rec.key, &old);
            }
        }
        match &r.lattice {
            Some(added) => lattice.add(added),
            None => {
                for rec in r.iter() {
                    if let Some(v) = rec.value {
                        lattice.insert(rec.key, v);
                    }
                }
            }
        }
        progress.wrote(r.bytes() as u64)
    })?;
    let applied = lattice.bank_hash(m.slot);
    if applied != m.bank_hash {
        return Err(LoadError::BankHashMismatch {
            stage: HashStage::Applied,
            expected: m.bank_hash,
            actual: applied,
        });
    }
    Ok((
        Read {
            entries: read.summary.record_count,
            archive_bytes: read.bytes,
            state_bytes: read.summary.state_bytes,
            bank_hash: applied,
        },
        lattice,
    ))
}
