//! The full import: every segment of a full archive, decoded in parallel, appended to a fresh
//! DB beside the live one while its lattice is summed and checked.

use super::read::read_archive;
use super::{ArchiveSource, HashStage, LoadError, LoadLimits, Progress, Read, check_source};
use crate::db::{StagedState, StateDb};
use crate::snapshot::Manifest;

/// Imports the full archive `source` into a fresh DB beside the live one and checks it: its
/// content root, its records against its bank hash, the manifest. Returns the staged DB, not
/// yet live.
pub(super) fn import_full(
    db: &dyn StateDb,
    source: &ArchiveSource,
    m: &Manifest,
    limits: &LoadLimits,
    progress: &mut Progress<'_>,
) -> Result<(Box<dyn StagedState>, Read), LoadError> {
    check_source(source, m)?;
    // Dropped on failure: the import is discarded.
    let mut import = db.begin_import(m.slot)?;
    let read = read_archive(source, m, limits, &mut |r| {
        import.put_sorted(&mut r.iter().map(|rec| (rec.key, rec.value.unwrap_or_default())))?;
        progress.wrote(r.bytes() as u64)
    })?;
    let lattice = read.assembler.lattice().clone();
    let computed = lattice.bank_hash(m.slot);
    if computed != m.bank_hash {
        return Err(LoadError::BankHashMismatch {
            stage: HashStage::Records,
            expected: m.bank_hash,
            actual: computed,
        });
    }
    let staged = import.finish(&lattice)?;
    Ok((
        staged,
        Read {
            entries: read.summary.record_count,
            archive_bytes: read.bytes,
            state_bytes: read.summary.state_bytes,
            bank_hash: computed,
        },
    ))
}
