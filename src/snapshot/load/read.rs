//! Reading one archive for a load, whatever is done with its records: decoded in parallel,
//! its header checked against the manifest, its end checked against the content root and the
//! manifest's bank hash.

use super::{ArchiveSource, HashStage, LoadError, LoadLimits, prefer_root_mismatch};
use crate::snapshot::Manifest;
use crate::snapshot::archive::{
    ArchiveError, ArchiveSummary, Assembler, Header, ParallelDecoder, Records, Segment,
};

/// An archive read to its end and checked.
pub(super) struct ReadArchive {
    /// Its records' lattice and its summary.
    pub(super) assembler: Assembler,
    pub(super) summary: ArchiveSummary,
    /// Its size, as hashed.
    pub(super) bytes: u64,
}

/// Reads `source`, described by `m`, handing each segment of records to `records` in order.
/// Checks the header (slot, kind, base) against the manifest before any record is handed over,
/// and at the end the content root and the bank hash of the end record. On any failure the
/// decoding threads are stopped; a complete file whose bytes are not the advertised ones is
/// reported as such, whatever error its decoding met first.
pub(super) fn read_archive(
    source: &ArchiveSource,
    m: &Manifest,
    limits: &LoadLimits,
    records: &mut dyn FnMut(&Records) -> Result<(), LoadError>,
) -> Result<ReadArchive, LoadError> {
    let input = source.open().map_err(|e| LoadError::Io {
        path: source.path().to_path_buf(),
        source: e,
    })?;
    let input = std::io::BufReader::with_capacity(1 << 20, input);
    // Workers also sum the lattice elements of the values they decode.
    let mut decoder = ParallelDecoder::start(input, limits.workers, true, limits.decode_memory);
    let (max_records, max_bytes) = limits.for_manifest(m);
    let mut assembler = Assembler::new(max_records, max_bytes);
    let result = (|| -> Result<(), LoadError> {
        while let Some(segment) = decoder.next_segment() {
            let segment = segment?;
            assembler.push(&segment)?;
            match &segment {
                Segment::Header(h) => check_header(h, m)?,
                Segment::Records(r) => records(r)?,
                Segment::End { .. } => {}
            }
        }
        Ok(())
    })();
    if let Err(e) = result {
        // Dropping the decoder stops its threads.
        drop(decoder);
        return Err(prefer_root_mismatch(source, m, e));
    }
    let finished = decoder
        .finish()
        .map_err(|e| prefer_root_mismatch(source, m, e.into()))?;
    if finished.root != m.content_root {
        return Err(LoadError::ContentRootMismatch {
            expected: m.content_root,
            actual: finished.root,
        });
    }
    let summary = assembler
        .summary()
        .ok_or(LoadError::Archive(ArchiveError::Truncated))?;
    // The end record's hash was checked against the records by the assembler where it could
    // be; now against the manifest.
    if summary.bank_hash != m.bank_hash {
        return Err(LoadError::BankHashMismatch {
            stage: HashStage::Archive,
            expected: m.bank_hash,
            actual: summary.bank_hash,
        });
    }
    Ok(ReadArchive {
        assembler,
        summary,
        bytes: finished.bytes,
    })
}

/// The archive must be the snapshot its manifest describes: slot, kind and base.
fn check_header(h: &Header, m: &Manifest) -> Result<(), LoadError> {
    if h.slot != m.slot {
        return Err(LoadError::SlotMismatch {
            expected: m.slot,
            actual: h.slot,
        });
    }
    let base_differs = m
        .base
        .is_some_and(|b| h.base_slot != b.slot || h.base_bank_hash != b.bank_hash);
    if h.kind != m.kind || base_differs {
        let on = |slot: Option<u64>| slot.map(|s| format!(" on base {s}")).unwrap_or_default();
        let header_base = (h.kind != crate::snapshot::SnapshotKind::Full).then_some(h.base_slot);
        return Err(LoadError::ManifestMismatch(format!(
            "the archive holds a {} snapshot at slot {}{}, the manifest a {} one at {}{}",
            h.kind,
            h.slot,
            on(header_base),
            m.kind,
            m.slot,
            on(m.base.map(|b| b.slot)),
        )));
    }
    Ok(())
}
