//! What goes wrong in the store: [`StoreError`], the path an I/O error happened at, and
//! creating a directory that says what is in the way.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::snapshot::ManifestError;

/// A file-system operation of the snapshot store failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The directory or file cannot be written (permissions, read-only or immutable).
    #[error("snapshot directory is not writable: {path}: {source}")]
    NotWritable {
        /// The path that could not be written.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A path that must be a directory is a file (or lies under one).
    #[error("not a directory: {path} is a file, where a directory is needed")]
    NotADirectory {
        /// The file in the way.
        path: PathBuf,
    },
    /// The disk (or quota) is full, or has less room than needed.
    #[error("disk full while writing {path}: {source}")]
    DiskFull {
        /// The path being written.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Another I/O error.
    #[error("snapshot store I/O error at {path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Another process has the snapshot directory open.
    #[error("snapshot directory is in use by another process: {path}")]
    InUse {
        /// The directory.
        path: PathBuf,
    },
    /// A published snapshot's manifest cannot be read.
    #[error("invalid manifest {path}: {source}")]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// Why it is invalid.
        #[source]
        source: ManifestError,
    },
    /// An attestation given for a snapshot does not verify for it.
    #[error("attestation refused for {path}: {source}")]
    Attestation {
        /// The snapshot's directory.
        path: PathBuf,
        /// Why it is refused.
        #[source]
        source: crate::snapshot::AttestationError,
    },
}

impl StoreError {
    /// Classifies an I/O error at `path`: full disk, not writable, not a directory, or other.
    pub(crate) fn at(path: &Path, source: io::Error) -> Self {
        let path = path.to_path_buf();
        match source.kind() {
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => {
                StoreError::DiskFull { path, source }
            }
            io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => {
                StoreError::NotWritable { path, source }
            }
            io::ErrorKind::NotADirectory => StoreError::NotADirectory { path },
            _ => StoreError::Io { path, source },
        }
    }

    /// The path the error is about.
    pub fn path(&self) -> &Path {
        match self {
            StoreError::NotWritable { path, .. }
            | StoreError::NotADirectory { path }
            | StoreError::DiskFull { path, .. }
            | StoreError::Io { path, .. }
            | StoreError::InUse { path }
            | StoreError::Manifest { path, .. }
            | StoreError::Attestation { path, .. } => path,
        }
    }
}

/// Extension to attach a path to an I/O result.
pub(crate) trait IoAt<T> {
    fn at(self, path: &Path) -> Result<T, StoreError>;
}

impl<T> IoAt<T> for io::Result<T> {
    fn at(self, path: &Path) -> Result<T, StoreError> {
        self.map_err(|e| StoreError::at(path, e))
    }
}

/// Creates directory `dir` (and its parents), saying clearly what is in the way: a file where a
/// directory should be, or a place that cannot be written.
pub(crate) fn ensure_dir(dir: &Path) -> Result<(), StoreError> {
    for ancestor in dir.ancestors() {
        match fs::metadata(ancestor) {
            Ok(m) if m.is_dir() => break,
            Ok(_) => {
                return Err(StoreError::NotADirectory {
                    path: ancestor.to_path_buf(),
                });
            }
            Err(_) => continue,
        }
    }
    fs::create_dir_all(dir).at(dir)
}
