//! Snapshots on a node's own disk: the archive format and its [`Manifest`], the
//! [`SnapshotStore`] directory, creating ([`create_snapshot`], [`create_incremental`],
//! [`Creator`]), loading ([`load_snapshot`], [`load_chain`]) and publishing for static web
//! servers ([`publish`], [`mirror`]).

pub(crate) mod archive;
mod attestation;
mod create;
mod load;
pub(crate) mod manifest;
pub(crate) mod publish;
mod store;

pub use archive::SnapshotKind;
pub use archive::{ArchiveError, ArchiveReader, DEFAULT_ZSTD_LEVEL};
pub use attestation::{Attestation, AttestationError, MAX_ATTESTATIONS, MAX_ATTESTATIONS_BYTES};
pub(crate) use attestation::{ed25519_key_of, merge as merge_attestations};
pub use create::{
    CreateError, CreateOptions, CreationTask, Creator, CreatorConfig, CreatorConfigError,
    DEFAULT_FULL_INTERVAL, DEFAULT_RANGE_FOR_SNAPSHOT, create_incremental, create_snapshot,
};
pub use load::{
    ArchiveSource, HashStage, LoadError, LoadLimits, LoadReport, Watermark, load_chain,
    load_snapshot,
};
pub(crate) use load::{Loaded, load_chain_legs};
pub use manifest::{Base, SnapshotKey};
pub use manifest::{FORMAT_VERSION, MAX_MANIFEST_BYTES, Manifest, ManifestError};
pub use publish::{INDEX_FILE, INDEX_FORMAT, PublishError, mirror, publish, write_index};
pub use store::{
    ARCHIVE_FILE, ATTESTATIONS_FILE, MANIFEST_FILE, OUTBOARD_FILE, Retention, ServingPin, Snapshot,
    SnapshotStore, StoreError,
};
pub(crate) use store::{IoAt, PartialClaim, VOUCHED_FILE, now_unix_ms};
