//! Snapshots on a node's own disk: the [`archive`] format and its [`Manifest`], the
//! [`SnapshotStore`] directory, creating ([`create_snapshot`], [`Creator`]) and loading
//! ([`load_snapshot`]).

pub mod archive;
mod create;
mod load;
mod manifest;
mod store;

pub use create::{
    CreateError, CreateOptions, CreationTask, Creator, CreatorConfig, DEFAULT_RANGE_FOR_SNAPSHOT,
    DEFAULT_RETAIN, create_snapshot,
};
pub use load::{HashStage, LoadError, LoadReport, load_snapshot};
pub use manifest::{FORMAT_VERSION, MAX_MANIFEST_BYTES, Manifest, ManifestError};
pub use store::{ARCHIVE_FILE, MANIFEST_FILE, OUTBOARD_FILE, Snapshot, SnapshotStore, StoreError};
pub(crate) use store::{IoAt, sync_dir, write_synced};
