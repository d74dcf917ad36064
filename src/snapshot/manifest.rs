//! [`Manifest`]: what a snapshot is, in one small protobuf message.

use prost::Message;

use crate::chunk::{ChunkSize, ChunkSizeError, ChunkTree};
use crate::hash::{BankHash, ContentRoot, DigestError};
use crate::proto;

/// Version of the archive format this crate writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// Largest encoded manifest accepted (4 KiB); a real one is about 120 bytes.
pub const MAX_MANIFEST_BYTES: usize = 4096;

/// The manifest of one snapshot: everything needed to fetch, check and load its archive.
///
/// Stored as `manifest.pb` in the snapshot's directory and served first on the chunk stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// Version of the archive format ([`FORMAT_VERSION`]).
    pub format_version: u32,
    /// Slot whose state the snapshot holds.
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
    /// Number of entries in the state.
    pub entry_count: u64,
    /// Bytes of the uncompressed record stream.
    pub state_bytes: u64,
    /// zstd level the archive was compressed with.
    pub zstd_level: i32,
}

/// A manifest could not be read.
#[derive(Debug, thiserror::Error)]
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
}

impl Manifest {
    /// The protobuf form.
    pub fn to_proto(&self) -> proto::Manifest {
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
        }
    }

    /// Checks and converts the protobuf form.
    pub fn from_proto(p: &proto::Manifest) -> Result<Self, ManifestError> {
        if p.format_version != FORMAT_VERSION {
            return Err(ManifestError::UnsupportedVersion(p.format_version));
        }
        Ok(Self {
            format_version: p.format_version,
            slot: p.slot,
            bank_hash: BankHash::from_slice(&p.bank_hash).map_err(|source| {
                ManifestError::Digest {
                    field: "bank_hash",
                    source,
                }
            })?,
            content_root: ContentRoot::from_slice(&p.content_root).map_err(|source| {
                ManifestError::Digest {
                    field: "content_root",
                    source,
                }
            })?,
            archive_size: p.archive_size,
            chunk_size: ChunkSize::new(u64::from(p.chunk_size))?,
            created_unix_ms: p.created_unix_ms,
            entry_count: p.entry_count,
            state_bytes: p.state_bytes,
            zstd_level: p.zstd_level,
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
}
