//! [`ChunkSize`]: the size of the verifiable chunks an archive is served and checked in
//! (`SNAPSHOT_CHUNK_SIZE`).

use std::fmt;

use bao_tree::BlockSize;

/// Environment variable that sets the chunk size, in bytes (`16384`) or with a binary suffix
/// (`16KiB`, `16k`, `1MiB`).
pub const CHUNK_SIZE_ENV: &str = "SNAPSHOT_CHUNK_SIZE";

/// Size of the verifiable chunks an archive is served and checked in.
///
/// A power of two from [`ChunkSize::MIN`] (1 KiB, BLAKE3's own chunk) to [`ChunkSize::MAX`]
/// (1 MiB). Smaller chunks catch bad data sooner and cost more proof bytes and outboard; larger
/// ones the opposite. The default, 16 KiB, keeps proofs under 0.5% of the data.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkSize(u32);

/// A chunk size was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkSizeError {
    /// The text is not a size.
    #[error("chunk size {value:?} is not a size in bytes (try 16384 or 16KiB)")]
    NotASize {
        /// The text given.
        value: String,
    },
    /// The size is outside [`ChunkSize::MIN`]..=[`ChunkSize::MAX`].
    #[error("chunk size {value} is out of bounds: it must be between {min} and {max} bytes")]
    OutOfBounds {
        /// The size given.
        value: u64,
        /// Smallest allowed.
        min: u32,
        /// Largest allowed.
        max: u32,
    },
    /// The size is not a power of two.
    #[error("chunk size {value} is not a power of two (BLAKE3 tree nodes cover powers of two)")]
    NotPowerOfTwo {
        /// The size given.
        value: u64,
    },
    /// The environment variable holds a chunk size that is refused.
    #[error("{variable}={value:?} is refused: {source}")]
    Env {
        /// The variable ([`CHUNK_SIZE_ENV`]).
        variable: &'static str,
        /// Its value.
        value: String,
        /// Why it is refused.
        #[source]
        source: Box<ChunkSizeError>,
    },
}

impl ChunkSize {
    /// Smallest chunk: 1 KiB, one BLAKE3 chunk.
    pub const MIN: ChunkSize = ChunkSize(1024);
    /// Largest chunk: 1 MiB.
    pub const MAX: ChunkSize = ChunkSize(1 << 20);
    /// The default: 16 KiB.
    pub const DEFAULT: ChunkSize = ChunkSize(16 * 1024);

    /// A chunk size of `bytes`, checked against the bounds.
    pub fn new(bytes: u64) -> Result<Self, ChunkSizeError> {
        if bytes < u64::from(Self::MIN.0) || bytes > u64::from(Self::MAX.0) {
            return Err(ChunkSizeError::OutOfBounds {
                value: bytes,
                min: Self::MIN.0,
                max: Self::MAX.0,
            });
        }
        if !bytes.is_power_of_two() {
            return Err(ChunkSizeError::NotPowerOfTwo { value: bytes });
        }
        Ok(Self(bytes as u32))
    }

    /// Parses `16384`, `16k`, `16KiB`, `1m`, `1MiB` (binary units, case-insensitive).
    pub fn parse(text: &str) -> Result<Self, ChunkSizeError> {
        let trimmed = text.trim();
        let lower = trimmed.to_ascii_lowercase();
        let (digits, unit) = match lower.find(|c: char| !c.is_ascii_digit()) {
            Some(i) => lower.split_at(i),
            None => (lower.as_str(), ""),
        };
        let multiplier: u64 = match unit.trim() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => 1 << 10,
            "m" | "mb" | "mib" => 1 << 20,
            _ => {
                return Err(ChunkSizeError::NotASize {
                    value: text.to_string(),
                });
            }
        };
        let n: u64 = digits.parse().map_err(|_| ChunkSizeError::NotASize {
            value: text.to_string(),
        })?;
        Self::new(n.saturating_mul(multiplier))
    }

    /// The chunk size from [`CHUNK_SIZE_ENV`], or the default when it is unset or empty.
    pub fn from_env() -> Result<Self, ChunkSizeError> {
        match std::env::var(CHUNK_SIZE_ENV) {
            Ok(v) if !v.trim().is_empty() => Self::parse(&v).map_err(|e| ChunkSizeError::Env {
                variable: CHUNK_SIZE_ENV,
                value: v.clone(),
                source: Box::new(e),
            }),
            _ => Ok(Self::DEFAULT),
        }
    }

    /// The size in bytes.
    pub fn bytes(self) -> u32 {
        self.0
    }

    pub(crate) fn block_size(self) -> BlockSize {
        BlockSize::from_chunk_log((self.0.trailing_zeros() - 10) as u8)
    }

    /// How many BLAKE3 chunks (1 KiB) one of these chunks spans.
    pub(crate) fn blake3_chunks(self) -> u64 {
        u64::from(self.0 >> 10)
    }
}

impl Default for ChunkSize {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl fmt::Debug for ChunkSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkSize({})", self.0)
    }
}

impl fmt::Display for ChunkSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 >= 1 << 20 {
            write!(f, "{} MiB", self.0 >> 20)
        } else {
            write!(f, "{} KiB", self.0 >> 10)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_sizes() {
        assert_eq!(ChunkSize::parse("16384").unwrap().bytes(), 16384);
        assert_eq!(ChunkSize::parse("16KiB").unwrap().bytes(), 16384);
        assert_eq!(ChunkSize::parse(" 16k ").unwrap().bytes(), 16384);
        assert_eq!(ChunkSize::parse("1MiB").unwrap().bytes(), 1 << 20);
        assert_eq!(ChunkSize::parse("1024").unwrap(), ChunkSize::MIN);
        assert!(matches!(
            ChunkSize::parse("512"),
            Err(ChunkSizeError::OutOfBounds { value: 512, .. })
        ));
        assert!(matches!(
            ChunkSize::parse("2MiB"),
            Err(ChunkSizeError::OutOfBounds { .. })
        ));
        assert!(matches!(
            ChunkSize::parse("3000"),
            Err(ChunkSizeError::NotPowerOfTwo { value: 3000 })
        ));
        assert!(matches!(
            ChunkSize::parse("lots"),
            Err(ChunkSizeError::NotASize { .. })
        ));
        assert!(matches!(
            ChunkSize::parse("-1"),
            Err(ChunkSizeError::NotASize { .. })
        ));
        assert!(matches!(
            ChunkSize::parse("16 parsecs"),
            Err(ChunkSizeError::NotASize { .. })
        ));
        assert_eq!(
            ChunkSize::DEFAULT.block_size(),
            BlockSize::from_chunk_log(4)
        );
        let e = ChunkSize::parse("3000").unwrap_err().to_string();
        assert!(e.contains("3000") && e.contains("power of two"), "{e}");
    }
}
