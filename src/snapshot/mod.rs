//! Snapshots on a node's own disk: the [`archive`] format and its [`Manifest`], the
//! [`SnapshotStore`] directory, creating ([`create_snapshot`], [`create_incremental`],
//! [`Creator`]) and loading ([`load_snapshot`], [`load_chain`]).

pub mod archive;
mod create;
mod load;
pub(crate) mod manifest;
mod store;

pub use archive::SnapshotKind;
pub use create::{
    CreateError, CreateOptions, CreationTask, Creator, CreatorConfig, CreatorConfigError,
    DEFAULT_FULL_INTERVAL, DEFAULT_RANGE_FOR_SNAPSHOT, create_incremental, create_snapshot,
};
pub use load::{
    ArchiveSource, HashStage, LoadError, LoadLimits, LoadReport, Watermark, load_chain,
    load_snapshot,
};
pub use manifest::{
    Base, FORMAT_VERSION, MAX_MANIFEST_BYTES, Manifest, ManifestError, SnapshotKey,
};
pub(crate) use store::IoAt;
pub use store::{
    ARCHIVE_FILE, MANIFEST_FILE, OUTBOARD_FILE, Retention, ServingPin, Snapshot, SnapshotStore,
    StoreError,
};
