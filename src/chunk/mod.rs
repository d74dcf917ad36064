//! Chunk size ([`ChunkSize`], `SNAPSHOT_CHUNK_SIZE`) and the verifiable chunks of an archive.
//!
//! An archive is served and checked in chunks of [`ChunkSize`] bytes. Every chunk, or range of
//! chunks, travels with the BLAKE3 tree nodes that link it to the archive's [`ContentRoot`](crate::hash::ContentRoot), so a
//! downloader checks each chunk against the root it was told in advance, never against anything
//! the serving peer made up. The tree is BLAKE3's own (via `bao-tree`), so the root is the plain
//! BLAKE3 hash of the archive and `b3sum` agrees with it.
//!
//! A serving peer keeps an *outboard* beside each archive: the tree's inner nodes down to the
//! chunk level, 64 bytes per chunk (0.39% of the archive at 16 KiB). A range of `n` chunks costs
//! `64 * (n - 1)` bytes of inner nodes plus `64` per tree level above the range: 0.4-0.5% for
//! the default request of 64 chunks of 16 KiB.

mod builder;
pub(crate) mod size;
mod source;
mod tree;
mod verified;

pub(crate) use builder::TreeWriter;
pub use builder::{TreeBuilder, write_outboard};
pub use size::{CHUNK_SIZE_ENV, ChunkSize, ChunkSizeError};
pub use source::ChunkSource;
#[cfg(feature = "web")]
pub(crate) use tree::Part;
pub use tree::{ChunkTree, RangeDecoder};
pub(crate) use verified::VerifiedChunks;

use std::io;

/// A chunk failed its check against the content root.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    /// The chunk's bytes do not hash to what the tree says: the data is corrupt or forged.
    #[error("chunk {chunk} does not match the content root")]
    Mismatch {
        /// Index of the first bad chunk (in units of the chunk size).
        chunk: u64,
    },
    /// A tree node that should lead to the chunk does not match the content root: the proof is
    /// corrupt or forged.
    #[error("the proof for chunk {chunk} does not match the content root")]
    ProofMismatch {
        /// Index of the first chunk the bad node covers.
        chunk: u64,
    },
    /// The encoded range ended before chunk `chunk` was complete.
    #[error("the encoded range ends early, at chunk {chunk}")]
    Truncated {
        /// Index of the chunk that was cut off.
        chunk: u64,
    },
    /// More bytes followed the encoded range than it should have.
    #[error("{extra} unexpected bytes after the encoded range")]
    TrailingBytes {
        /// How many.
        extra: usize,
    },
    /// The range asked for lies outside the archive.
    #[error("chunk range {start}..{end} is outside the archive's {count} chunks")]
    OutOfRange {
        /// First chunk asked for.
        start: u64,
        /// One past the last chunk asked for.
        end: u64,
        /// Chunks in the archive.
        count: u64,
    },
    /// Reading or writing the data failed.
    #[error("chunk I/O: {0}")]
    Io(#[from] io::Error),
}

impl ChunkError {
    /// Whether the error proves the sender sent bad data (as opposed to a local failure).
    pub fn is_corrupt_data(&self) -> bool {
        matches!(
            self,
            ChunkError::Mismatch { .. }
                | ChunkError::ProofMismatch { .. }
                | ChunkError::Truncated { .. }
                | ChunkError::TrailingBytes { .. }
        )
    }
}
