//! The snapshot archive: a zstd-compressed, canonical record stream of the state at one slot
//! (a *full* archive) or of what changed since a full one (an *incremental* archive).
//!
//! ```text
//! archive = zstd(header) || zstd(segment_1) || ... || zstd(segment_n) || zstd(end)
//! header  = "SNAPSYNC" || u32_le(version = 2) || u8(kind: 0 full, 1 incremental)
//!           || u64_le(slot) || u64_le(base_slot) || base_bank_hash[32]          61 bytes
//! segment = record+, keys strictly ascending across the whole archive
//! record  = u32_le(len(k)) || k || u32_le(len(v)) || v        k holds v
//!         | u32_le(len(k)) || k || u32_le(0xFFFF_FFFF)         k is deleted (incremental only)
//! end     = u32_le(0xFFFF_FFFF) || u64_le(record_count) || bank_hash[32]       44 bytes
//! ```
//!
//! - A full archive holds every entry of the state at `slot`; its `base_slot` is `slot` and its
//!   `base_bank_hash` is 32 zero bytes. An incremental archive holds, for every key written
//!   after its base (the full snapshot at `base_slot`, whose bank hash is `base_bank_hash`), the
//!   key's value at `slot`, or a deletion. Applied to any state of the same chain at a slot from
//!   `base_slot` to `slot`, it gives the state at `slot`.
//! - Segments are cut at record boundaries: records are added to a segment while it stays within
//!   [`SEGMENT_BYTES`]; a record that does not fit starts the next one; a record larger than
//!   that is a segment of its own. Each frame is therefore decompressed and parsed on its own,
//!   in parallel, and the cuts, like the bytes, depend only on the records.
//! - Each `zstd(x)` is one zstd frame with the content size in its header and no checksum (the
//!   content root covers the bytes), compressed at the level in the manifest.
//! - `bank_hash` is the bank hash of the state at `slot` (for an incremental: after applying
//!   it). A reader of a full archive recomputes it from the records and refuses a mismatch.

mod frames;
mod parallel;
mod reader;
mod segment;
mod writer;

pub(crate) use parallel::ParallelDecoder;
pub use reader::ArchiveReader;
pub(crate) use reader::Assembler;
pub(crate) use segment::{Record, Records, Segment};
pub(crate) use writer::ArchiveWriter;

use std::io;

use crate::hash::BankHash;

/// The 8 bytes every archive starts with (after decompression).
pub(crate) const MAGIC: [u8; 8] = *b"SNAPSYNC";

/// Version of the archive format this crate writes and reads.
pub(crate) const VERSION: u32 = 2;

/// The zstd level archives are written with unless configured otherwise. Level 1 was measured
/// fastest per byte saved on snapshot-like state (see the README's benchmark section).
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;

/// Largest uncompressed segment made of several records (2 MiB). Costs under 1% of compression
/// ratio against one frame, and bounds what one decoding thread holds.
pub(crate) const SEGMENT_BYTES: usize = 2 << 20;

/// Length of the header.
pub(crate) const HEADER_LEN: usize = 61;

/// Length of the end record.
pub(crate) const END_LEN: usize = 44;

/// Marks the end record (in the key length) and a deletion (in the value length).
pub(crate) const MARK: u32 = u32::MAX;

/// Full or incremental.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SnapshotKind {
    /// The whole state at a slot.
    Full,
    /// What changed since a full snapshot, up to a slot.
    Incremental,
}

impl SnapshotKind {
    pub(crate) fn code(self) -> u8 {
        match self {
            SnapshotKind::Full => 0,
            SnapshotKind::Incremental => 1,
        }
    }

    pub(crate) fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(SnapshotKind::Full),
            1 => Some(SnapshotKind::Incremental),
            _ => None,
        }
    }

    /// `"full"` or `"incremental"`.
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotKind::Full => "full",
            SnapshotKind::Incremental => "incremental",
        }
    }
}

impl std::fmt::Display for SnapshotKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The archive header: what the archive is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Full or incremental.
    pub kind: SnapshotKind,
    /// Slot of the state.
    pub slot: u64,
    /// For an incremental: the slot of its full base (for a full: `slot`).
    pub base_slot: u64,
    /// For an incremental: the bank hash of its full base (for a full: zeros).
    pub base_bank_hash: BankHash,
}

impl Header {
    /// The header of a full archive of the state at `slot`.
    pub fn full(slot: u64) -> Self {
        Self {
            kind: SnapshotKind::Full,
            slot,
            base_slot: slot,
            base_bank_hash: BankHash([0; 32]),
        }
    }

    /// The header of an incremental archive at `slot` on the full snapshot at `base_slot`.
    pub fn incremental(slot: u64, base_slot: u64, base_bank_hash: BankHash) -> Self {
        Self {
            kind: SnapshotKind::Incremental,
            slot,
            base_slot,
            base_bank_hash,
        }
    }

    pub(crate) fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[..8].copy_from_slice(&MAGIC);
        out[8..12].copy_from_slice(&VERSION.to_le_bytes());
        out[12] = self.kind.code();
        out[13..21].copy_from_slice(&self.slot.to_le_bytes());
        out[21..29].copy_from_slice(&self.base_slot.to_le_bytes());
        out[29..61].copy_from_slice(self.base_bank_hash.as_bytes());
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, ArchiveError> {
        if bytes.len() < 12 || bytes[..8] != MAGIC {
            return Err(ArchiveError::BadMagic);
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        if version != VERSION {
            return Err(ArchiveError::UnsupportedVersion(version));
        }
        if bytes.len() != HEADER_LEN {
            return Err(ArchiveError::BadHeader("wrong length"));
        }
        let kind = SnapshotKind::from_code(bytes[12]).ok_or(ArchiveError::BadHeader("kind"))?;
        let u64_at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
        let header = Self {
            kind,
            slot: u64_at(13),
            base_slot: u64_at(21),
            base_bank_hash: BankHash::from_slice(&bytes[29..61]).expect("32 bytes"),
        };
        let consistent = match kind {
            SnapshotKind::Full => {
                header.base_slot == header.slot && header.base_bank_hash == BankHash([0; 32])
            }
            SnapshotKind::Incremental => header.base_slot < header.slot,
        };
        if !consistent {
            return Err(ArchiveError::BadHeader("base does not fit the kind"));
        }
        Ok(header)
    }
}

/// What an archive holds, known once it is completely written or read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArchiveSummary {
    /// The header.
    pub header: Header,
    /// Bank hash of the state at the header's slot (from the end record).
    pub bank_hash: BankHash,
    /// Number of records.
    pub record_count: u64,
    /// Bytes of the uncompressed stream (header, records, end).
    pub state_bytes: u64,
}

/// An archive could not be read (or a record could not be written).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ArchiveError {
    /// Reading or decompressing failed.
    #[error("archive I/O: {0}")]
    Io(#[source] io::Error),
    /// The stream does not start with the archive magic, `SNAPSYNC`.
    #[error("not a snapsync archive (bad magic)")]
    BadMagic,
    /// A format version this crate does not read.
    #[error("archive format version {0} is not supported (this build reads {VERSION})")]
    UnsupportedVersion(u32),
    /// The header is malformed.
    #[error("archive header is malformed: {0}")]
    BadHeader(&'static str),
    /// A zstd frame is malformed, too large, or not as the format requires.
    #[error("archive frame {frame} is malformed: {reason}")]
    BadFrame {
        /// Frame number (0 is the header).
        frame: u64,
        /// What is wrong.
        reason: String,
    },
    /// The stream ended before its end record.
    #[error("archive is truncated")]
    Truncated,
    /// A key longer than [`crate::bank_hash::MAX_KEY_LEN`] or empty.
    #[error("record {index}: key of {len} bytes is out of bounds")]
    KeyOutOfBounds {
        /// Record number.
        index: u64,
        /// Length claimed.
        len: u64,
    },
    /// A value longer than [`crate::bank_hash::MAX_VALUE_LEN`].
    #[error("record {index}: value of {len} bytes exceeds the limit")]
    ValueTooLong {
        /// Record number.
        index: u64,
        /// Length claimed.
        len: u64,
    },
    /// A deletion in a full archive.
    #[error("record {index}: a deletion in a full archive")]
    DeletionInFull {
        /// Record number.
        index: u64,
    },
    /// A key not strictly greater than the one before it.
    #[error("record {index}: keys are not in strictly ascending order")]
    Unsorted {
        /// Record number.
        index: u64,
    },
    /// A segment that is not cut where the format cuts segments.
    #[error("frame {frame}: segment is not cut at the canonical place")]
    NonCanonicalSegment {
        /// Frame number.
        frame: u64,
    },
    /// The end record's count differs from the records read.
    #[error("end record says {trailer} records, the archive holds {actual}")]
    CountMismatch {
        /// Count in the end record.
        trailer: u64,
        /// Records read.
        actual: u64,
    },
    /// A full archive's end-record bank hash differs from the bank hash of its records.
    #[error("end record bank hash {trailer} differs from the records' bank hash {computed}")]
    BankHashMismatch {
        /// Hash in the end record.
        trailer: BankHash,
        /// Hash of the records.
        computed: BankHash,
    },
    /// Bytes follow the end record.
    #[error("data follows the archive's end record")]
    TrailingData,
    /// More records or bytes than the manifest (or the loader's limits) allow.
    #[error("archive holds more than the {limit} allowed ({what})")]
    OverLimit {
        /// What was counted.
        what: &'static str,
        /// The limit.
        limit: u64,
    },
}

impl From<io::Error> for ArchiveError {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            ArchiveError::Truncated
        } else {
            ArchiveError::Io(e)
        }
    }
}

/// Bytes a record takes in the stream.
pub(crate) fn record_len(key: &[u8], value: Option<&[u8]>) -> usize {
    8 + key.len() + value.map_or(0, <[u8]>::len)
}

/// Appends one record to `out`.
pub(crate) fn encode_record(out: &mut Vec<u8>, key: &[u8], value: Option<&[u8]>) {
    out.extend_from_slice(&(key.len() as u32).to_le_bytes());
    out.extend_from_slice(key);
    match value {
        Some(v) => {
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
            out.extend_from_slice(v);
        }
        None => out.extend_from_slice(&MARK.to_le_bytes()),
    }
}

#[cfg(test)]
mod tests;
