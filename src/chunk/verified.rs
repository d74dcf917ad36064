//! [`VerifiedChunks`]: which chunks of an archive being downloaded are on disk, verified, with
//! their proof nodes: set by the download as it writes them, read by the streamer that serves
//! them meanwhile. One bit per chunk, set only, shared without a lock.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

/// A set of chunk numbers that only grows, shared between threads.
#[derive(Debug)]
pub(crate) struct VerifiedChunks {
    words: Vec<AtomicU64>,
    len: u64,
}

impl VerifiedChunks {
    /// `len` chunks, none verified.
    pub(crate) fn new(len: u64) -> Self {
        Self {
            words: (0..len.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            len,
        }
    }

    /// Chunk `i` is on disk, verified, with its proof nodes (set after they were written).
    pub(crate) fn set(&self, i: u64) {
        if i < self.len {
            self.words[(i / 64) as usize].fetch_or(1 << (i % 64), Ordering::Release);
        }
    }

    /// Whether chunk `i` is.
    #[cfg(test)]
    pub(crate) fn get(&self, i: u64) -> bool {
        i < self.len && self.words[(i / 64) as usize].load(Ordering::Acquire) & (1 << (i % 64)) != 0
    }

    /// Whether every chunk of `range` is (an empty range is not). A word of 64 at a time.
    pub(crate) fn all(&self, range: Range<u64>) -> bool {
        if range.is_empty() || range.end > self.len {
            return false;
        }
        let mut i = range.start;
        while i < range.end {
            let (w, bit) = ((i / 64) as usize, i % 64);
            let n = (64 - bit).min(range.end - i);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            if self.words[w].load(Ordering::Acquire) & mask != mask {
                return false;
            }
            i += n;
        }
        true
    }

    /// Chunks verified.
    pub(crate) fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum()
    }

    /// Which blocks of `block` chunks are whole: bit `b` (bit `b % 8` of byte `b / 8`) is set
    /// when every chunk of block `b` is (the last block may be short).
    pub(crate) fn blocks(&self, block: u64) -> Vec<u8> {
        let block = block.max(1);
        let n = self.len.div_ceil(block);
        let mut out = vec![0u8; n.div_ceil(8) as usize];
        for b in 0..n {
            let range = b * block..((b + 1) * block).min(self.len);
            if self.all(range) {
                out[(b / 8) as usize] |= 1 << (b % 8);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_set_once_and_blocks_are_whole_or_not() {
        let v = VerifiedChunks::new(70);
        for i in [0, 1, 2, 3, 64, 65, 66, 67, 68, 69] {
            v.set(i);
        }
        v.set(500);
        assert!(v.get(3) && !v.get(4) && !v.get(500));
        assert_eq!(v.count(), 10);
        assert!(v.all(0..4) && !v.all(0..5) && !v.all(3..3) && !v.all(64..71));
        assert!(v.all(64..70) && v.all(65..67) && !v.all(60..66));
        let full = VerifiedChunks::new(200);
        (0..200).for_each(|i| full.set(i));
        assert!(full.all(0..200) && full.all(63..129) && full.all(128..192));
        assert_eq!(full.count(), 200);
        // Blocks of 4: 0 is whole, 16 (64..68) is, 17 (68..70, short) is.
        let b = v.blocks(4);
        assert_eq!(b.len(), 3);
        assert_eq!(b[0], 0b0000_0001);
        assert_eq!(b[2], 0b0000_0011);
    }
}
