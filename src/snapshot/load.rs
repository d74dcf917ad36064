//! Loading a snapshot into the state DB: [`load_snapshot`].

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::db::{DbError, StateDb};
use crate::hash::{BankHash, ContentRoot};
use crate::snapshot::Manifest;
use crate::snapshot::archive::{ArchiveError, ArchiveReader};

/// Where a bank hash was found to differ from the manifest's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashStage {
    /// In the archive's trailer (checked against its records while reading).
    Archive,
    /// Recomputed from the imported DB.
    ImportedDb,
}

impl std::fmt::Display for HashStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HashStage::Archive => "the archive",
            HashStage::ImportedDb => "the imported DB",
        })
    }
}

/// A snapshot could not be loaded. The live DB is exactly as it was.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The archive file cannot be read.
    #[error("reading the archive {path}: {source}")]
    Io {
        /// The archive.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The archive's size differs from the manifest's.
    #[error("archive is {actual} bytes, the manifest says {expected}")]
    SizeMismatch {
        /// Size in the manifest.
        expected: u64,
        /// Size of the file.
        actual: u64,
    },
    /// The archive's BLAKE3 hash differs from the manifest's content root.
    #[error("archive content root {actual} differs from the manifest's {expected}")]
    ContentRootMismatch {
        /// Root in the manifest.
        expected: ContentRoot,
        /// Root of the file.
        actual: ContentRoot,
    },
    /// The archive is malformed.
    #[error("archive is invalid: {0}")]
    Archive(#[from] ArchiveError),
    /// The archive (or the DB imported from it) holds another slot than the manifest says.
    #[error("archive holds slot {actual}, the manifest says {expected}")]
    SlotMismatch {
        /// Slot in the manifest.
        expected: u64,
        /// Slot in the archive.
        actual: u64,
    },
    /// A bank hash differs from the manifest's.
    #[error("bank hash of {stage} is {actual}, the manifest says {expected}")]
    BankHashMismatch {
        /// Where the difference was found.
        stage: HashStage,
        /// Hash in the manifest.
        expected: BankHash,
        /// Hash found.
        actual: BankHash,
    },
    /// The DB failed while importing or swapping.
    #[error("state DB: {0}")]
    Db(#[from] DbError),
}

/// What a successful load did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadReport {
    /// Slot now live.
    pub slot: u64,
    /// Bank hash now live (recomputed from the DB).
    pub bank_hash: BankHash,
    /// Entries loaded.
    pub entries: u64,
    /// Archive bytes read.
    pub archive_bytes: u64,
    /// Uncompressed bytes read.
    pub state_bytes: u64,
    /// Time taken.
    pub elapsed: Duration,
}

/// Hashes everything read through it.
struct HashingReader<R> {
    inner: R,
    hasher: blake3::Hasher,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Loads the archive at `archive`, described by `manifest`, into `db`.
///
/// Reads the archive once: its BLAKE3 hash is checked against the content root while its
/// records are decompressed into a fresh DB beside the live one ([`StateDb::begin_import`]).
/// Then the bank hash is recomputed from that fresh DB and compared with the manifest, and only
/// then is it swapped in atomically. On any failure the live DB is untouched and the error says
/// what failed; a content root mismatch is reported in preference to the archive errors it
/// causes.
pub fn load_snapshot(
    db: &dyn StateDb,
    archive: &Path,
    manifest: &Manifest,
) -> Result<LoadReport, LoadError> {
    let started = Instant::now();
    let _span =
        tracing::info_span!(target: "NETWORK:SNAPSHOT", "load_snapshot", slot = manifest.slot)
            .entered();
    let io_err = |source| LoadError::Io {
        path: archive.to_path_buf(),
        source,
    };
    let file = File::open(archive).map_err(io_err)?;
    let actual_size = file.metadata().map_err(io_err)?.len();
    if actual_size != manifest.archive_size {
        return Err(LoadError::SizeMismatch {
            expected: manifest.archive_size,
            actual: actual_size,
        });
    }
    let hashing = HashingReader {
        inner: file,
        hasher: blake3::Hasher::new(),
    };
    let input = BufReader::with_capacity(1 << 20, hashing);

    // Import, remembering the first failure; then always finish hashing the file so that a
    // corrupt archive is reported as such.
    let mut reader = None;
    let imported = (|| {
        let r = reader.insert(ArchiveReader::new(input)?);
        if r.slot() != manifest.slot {
            return Err(LoadError::SlotMismatch {
                expected: manifest.slot,
                actual: r.slot(),
            });
        }
        let mut import = db.begin_import(manifest.slot)?;
        while let Some((k, v)) = r.next_entry()? {
            import.put(k, v)?;
        }
        let summary = r.summary().expect("summary after the last entry");
        if summary.bank_hash != manifest.bank_hash {
            return Err(LoadError::BankHashMismatch {
                stage: HashStage::Archive,
                expected: manifest.bank_hash,
                actual: summary.bank_hash,
            });
        }
        Ok((import, summary))
    })();

    let root = match reader {
        Some(r) => {
            let mut rest = r.into_inner();
            io::copy(&mut rest, &mut io::sink()).map_err(io_err)?;
            rest.into_inner().hasher.finalize()
        }
        None => {
            // The header could not be read: hash the file from the start.
            let mut hasher = blake3::Hasher::new();
            let mut file = File::open(archive).map_err(io_err)?;
            io::copy(&mut file, &mut hasher).map_err(io_err)?;
            hasher.finalize()
        }
    };
    let root = ContentRoot::from(root);
    if root != manifest.content_root {
        return Err(LoadError::ContentRootMismatch {
            expected: manifest.content_root,
            actual: root,
        });
    }
    let (import, summary) = imported?;

    let staged = import.finish()?;
    let view = staged.view()?;
    if view.slot() != Some(manifest.slot) {
        return Err(LoadError::SlotMismatch {
            expected: manifest.slot,
            actual: view.slot().unwrap_or_default(),
        });
    }
    let bank_hash = view.bank_hash()?;
    if bank_hash != manifest.bank_hash {
        return Err(LoadError::BankHashMismatch {
            stage: HashStage::ImportedDb,
            expected: manifest.bank_hash,
            actual: bank_hash,
        });
    }
    drop(view);
    staged.commit()?;
    let report = LoadReport {
        slot: manifest.slot,
        bank_hash,
        entries: summary.entry_count,
        archive_bytes: actual_size,
        state_bytes: summary.state_bytes,
        elapsed: started.elapsed(),
    };
    tracing::info!(
        target: "NETWORK:SNAPSHOT",
        slot = report.slot,
        bank_hash = %bank_hash.short(),
        entries = report.entries,
        secs = report.elapsed.as_secs_f64(),
        "snapshot loaded"
    );
    Ok(report)
}
