//! [`Manifest`]: what a snapshot is, in one small protobuf message.

use prost::Message;

use super::archive::SnapshotKind;
use crate::chunk::{ChunkSize, ChunkSizeError, ChunkTree};
use crate::hash::{BankHash, ContentRoot, DigestError};
use crate::proto;

/// Version of the archive format this crate writes and reads.
pub const FORMAT_VERSION: u32 = super::archive::VERSION;

/// Largest encoded manifest accepted (4 KiB); a real one is about 200 bytes.
pub const MAX_MANIFEST_BYTES: usize = 4096;

/// The full snapshot an incremental one applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Base {
    /// Its slot.
    pub slot: u64,
    /// Its bank hash.
    pub bank_hash: BankHash,
    /// Its content root.
    pub content_root: ContentRoot,
}

impl Base {
    /// The base an incremental snapshot on the full snapshot `full` names.
    pub fn of(full: &SnapshotKey) -> Self {
        Self {
            slot: full.slot,
            bank_hash: full.bank_hash,
            content_root: full.content_root,
        }
    }

    /// Whether `key` is the full snapshot this base names.
    pub fn is(&self, key: &SnapshotKey) -> bool {
        key.is_full() && *self == Self::of(key)
    }
}

/// What identifies a snapshot: peers agree on a snapshot when they advertise the same of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SnapshotKey {
    /// Full or incremental.
    pub kind: SnapshotKind,
    /// Slot.
    pub slot: u64,
    /// Bank hash of the state at the slot.
    pub bank_hash: BankHash,
    /// Content root of the archive.
    pub content_root: ContentRoot,
    /// Archive size in bytes.
    pub archive_size: u64,
    /// For an incremental: its full base.
    pub base: Option<Base>,
}

impl SnapshotKey {
    /// Whether this is a full snapshot.
    pub fn is_full(&self) -> bool {
        self.kind == SnapshotKind::Full
    }
}

/// The manifest of one snapshot: everything needed to fetch, check and load its archive.
///
/// Stored as `manifest.pb` in the snapshot's directory and served first on the chunk stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// Version of the archive format ([`FORMAT_VERSION`]).
    pub format_version: u32,
    /// Full or incremental.
    pub kind: SnapshotKind,
    /// Slot whose state the snapshot holds (an incremental: the state once applied).
    pub slot: u64,
    /// Bank hash of that state.
    pub bank_hash: BankHash,
    /// BLAKE3 hash of the archive bytes.
    pub content_root: ContentRoot,
    /// Archive size in bytes.
    pub archive_size: u64,
    /// Chunk size the archive is served and checked in.
    pub chunk_size: ChunkSize,
    /// Creation time, milliseconds since the Unix epoch. Not part of the snapshot's identity.
    pub created_unix_ms: u64,
    /// Number of records in the archive.
    pub entry_count: u64,
    /// Bytes of the uncompressed record stream.
    pub state_bytes: u64,
    /// zstd level the archive was compressed with.
    pub zstd_level: i32,
    /// For an incremental: its full base.
    pub base: Option<Base>,
    /// Version of the zstd library that compressed it (informational).
    pub zstd_version: u32,
}

/// A manifest could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestError {
    /// Not a valid protobuf `Manifest`.
    #[error("manifest is not a valid protobuf message: {0}")]
    Decode(#[from] prost::DecodeError),
    /// Larger than [`MAX_MANIFEST_BYTES`].
    #[error("manifest is {0} bytes, more than the {MAX_MANIFEST_BYTES} allowed")]
    TooLarge(usize),
    /// Written by a format version this crate does not read.
    #[error("archive format version {0} is not supported (this build reads {FORMAT_VERSION})")]
    UnsupportedVersion(u32),
    /// A hash field does not hold 32 bytes.
    #[error("manifest field {field}: {source}")]
    Digest {
        /// The field.
        field: &'static str,
        /// Why.
        #[source]
        source: DigestError,
    },
    /// The chunk size is out of bounds.
    #[error("manifest chunk size: {0}")]
    ChunkSize(#[from] ChunkSizeError),
    /// The kind and the base do not fit together (an incremental needs a base below its slot).
    #[error("manifest base does not fit its kind")]
    BadBase,
    /// The archive size is zero, or the counts are impossible for it.
    #[error("manifest sizes are impossible: {0}")]
    BadSize(&'static str),
}

fn digest<T>(
    field: &'static str,
    bytes: &[u8],
    parse: fn(&[u8]) -> Result<T, DigestError>,
) -> Result<T, ManifestError> {
    parse(bytes).map_err(|source| ManifestError::Digest { field, source })
}

/// The zstd library version this build compresses with.
pub(crate) fn zstd_version() -> u32 {
    zstd::zstd_safe::version_number()
}

impl Manifest {
    /// Whether it describes a full snapshot.
    pub fn is_full(&self) -> bool {
        self.kind == SnapshotKind::Full
    }

    /// The protobuf form (wire type, not API).
    #[doc(hidden)]
    pub fn to_proto(&self) -> proto::Manifest {
        let base = self.base.unwrap_or(Base {
            slot: 0,
            bank_hash: BankHash([0; 32]),
            content_root: ContentRoot([0; 32]),
        });
        let full = self.is_full();
        proto::Manifest {
            format_version: self.format_version,
            slot: self.slot,
            bank_hash: self.bank_hash.0.to_vec().into(),
            content_root: self.content_root.0.to_vec().into(),
            archive_size: self.archive_size,
            chunk_size: self.chunk_size.bytes(),
            created_unix_ms: self.created_unix_ms,
            entry_count: self.entry_count,
            state_bytes: self.state_bytes,
            zstd_level: self.zstd_level,
            kind: if full {
                proto::Kind::Full
            } else {
                proto::Kind::Incremental
            } as i32,
            base_slot: if full { 0 } else { base.slot },
            base_bank_hash: if full {
                Default::default()
            } else {
                base.bank_hash.0.to_vec().into()
            },
            base_content_root: if full {
                Default::default()
            } else {
                base.content_root.0.to_vec().into()
            },
            zstd_version: self.zstd_version,
        }
    }

    /// Checks and converts the protobuf form (wire type, not API).
    #[doc(hidden)]
    pub fn from_proto(p: &proto::Manifest) -> Result<Self, ManifestError> {
        if p.format_version != FORMAT_VERSION {
            return Err(ManifestError::UnsupportedVersion(p.format_version));
        }
        let kind = match proto::Kind::try_from(p.kind) {
            Ok(proto::Kind::Full) => SnapshotKind::Full,
            Ok(proto::Kind::Incremental) => SnapshotKind::Incremental,
            Err(_) => return Err(ManifestError::BadBase),
        };
        let base = match kind {
            SnapshotKind::Full => {
                if p.base_slot != 0
                    || !p.base_bank_hash.is_empty()
                    || !p.base_content_root.is_empty()
                {
                    return Err(ManifestError::BadBase);
                }
                None
            }
            SnapshotKind::Incremental => {
                if p.base_slot >= p.slot {
                    return Err(ManifestError::BadBase);
                }
                Some(Base {
                    slot: p.base_slot,
                    bank_hash: digest("base_bank_hash", &p.base_bank_hash, BankHash::from_slice)?,
                    content_root: digest(
                        "base_content_root",
                        &p.base_content_root,
                        ContentRoot::from_slice,
                    )?,
                })
            }
        };
        if p.archive_size == 0 {
            return Err(ManifestError::BadSize("empty archive"));
        }
        // Every record takes at least 9 bytes; the stream has a header and an end record.
        let min_stream = 105u64.saturating_add(p.entry_count.saturating_mul(9));
        if p.state_bytes < min_stream {
            return Err(ManifestError::BadSize(
                "fewer stream bytes than its records need",
            ));
        }
        Ok(Self {
            format_version: p.format_version,
            kind,
            slot: p.slot,
            bank_hash: digest("bank_hash", &p.bank_hash, BankHash::from_slice)?,
            content_root: digest("content_root", &p.content_root, ContentRoot::from_slice)?,
            archive_size: p.archive_size,
            chunk_size: ChunkSize::new(u64::from(p.chunk_size))?,
            created_unix_ms: p.created_unix_ms,
            entry_count: p.entry_count,
            state_bytes: p.state_bytes,
            zstd_level: p.zstd_level,
            base,
            zstd_version: p.zstd_version,
        })
    }

    /// Encodes to protobuf bytes.
    pub fn encode(&self) -> Vec<u8> {
        self.to_proto().encode_to_vec()
    }

    /// Decodes and checks protobuf bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, ManifestError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge(bytes.len()));
        }
        Self::from_proto(&proto::Manifest::decode(bytes)?)
    }

    /// The verifiable-chunk tree of the archive.
    pub fn chunk_tree(&self) -> ChunkTree {
        ChunkTree::new(self.archive_size, self.chunk_size, self.content_root)
    }

    /// What identifies this snapshot among peers' adverts.
    pub fn key(&self) -> SnapshotKey {
        SnapshotKey {
            kind: self.kind,
            slot: self.slot,
            bank_hash: self.bank_hash,
            content_root: self.content_root,
            archive_size: self.archive_size,
            base: self.base,
        }
    }
}

/// A manifest for tests: a full or an incremental one (on a base at slot 50), fields set.
#[cfg(test)]
pub(crate) fn sample(kind: SnapshotKind) -> Manifest {
    Manifest {
        format_version: FORMAT_VERSION,
        kind,
        slot: 100,
        bank_hash: BankHash([1; 32]),
        content_root: ContentRoot([2; 32]),
        archive_size: 5000,
        chunk_size: ChunkSize::DEFAULT,
        created_unix_ms: 7,
        entry_count: 10,
        state_bytes: 1000,
        zstd_level: 1,
        base: (kind == SnapshotKind::Incremental).then_some(Base {
            slot: 50,
            bank_hash: BankHash([3; 32]),
            content_root: ContentRoot([4; 32]),
        }),
        zstd_version: zstd_version(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_impossible_ones() {
        for kind in [SnapshotKind::Full, SnapshotKind::Incremental] {
            let m = sample(kind);
            assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
        }
        let bad = |f: &dyn Fn(&mut proto::Manifest)| {
            let mut p = sample(SnapshotKind::Incremental).to_proto();
            f(&mut p);
            Manifest::from_proto(&p).unwrap_err()
        };
        assert!(matches!(
            bad(&|p| p.base_slot = 100),
            ManifestError::BadBase
        ));
        assert!(matches!(
            bad(&|p| p.format_version = 1),
            ManifestError::UnsupportedVersion(1)
        ));
        assert!(matches!(bad(&|p| p.kind = 7), ManifestError::BadBase));
        assert!(matches!(
            bad(&|p| p.archive_size = 0),
            ManifestError::BadSize(_)
        ));
        assert!(matches!(
            bad(&|p| p.entry_count = u64::MAX),
            ManifestError::BadSize(_)
        ));
        assert!(matches!(
            bad(&|p| p.base_bank_hash = vec![1; 3].into()),
            ManifestError::Digest {
                field: "base_bank_hash",
                ..
            }
        ));
        let mut full = sample(SnapshotKind::Full).to_proto();
        full.base_slot = 3;
        assert!(matches!(
            Manifest::from_proto(&full),
            Err(ManifestError::BadBase)
        ));
        assert!(matches!(
            Manifest::decode(&[0u8; 5000]),
            Err(ManifestError::TooLarge(5000))
        ));
    }
}
