//! [`VerifiedChunks`]: which chunks of an archive being downloaded are on disk, verified, with
//! their proof nodes: set by the download as it writes them, read by the streamer that serves
//! them meanwhile. One bit per chunk, set only, shared without a lock; and, for the few block
//! sizes askers use, which blocks are whole, kept up to date as chunks are set, so that
//! answering what this node holds costs the answer's size, never a scan of the snapshot.

use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Block sizes whose whole blocks are kept up to date (the least recently asked is dropped).
const SUMMARIES: usize = 4;

/// Which blocks of `block` chunks are whole, kept up to date.
#[derive(Debug)]
struct Summary {
    block: u64,
    /// Chunks set in each block.
    counts: Vec<u32>,
    /// Bit `b` (bit `b % 8` of byte `b / 8`): block `b` is whole.
    bits: Vec<u8>,
}

/// A set of chunk numbers that only grows, shared between threads.
#[derive(Debug)]
pub(crate) struct VerifiedChunks {
    words: Vec<AtomicU64>,
    len: u64,
    /// Whole blocks, for the block sizes asked lately, most recent last.
    summaries: Mutex<Vec<Summary>>,
    /// Woken when a block of a kept size becomes whole.
    grown: tokio::sync::Notify,
    /// Questions waiting on `grown`.
    waiters: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

/// A place among the waiters of a [`VerifiedChunks`], given back when dropped.
pub(crate) struct Waiter(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Waiter {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl VerifiedChunks {
    /// `len` chunks, none verified.
    pub(crate) fn new(len: u64) -> Self {
        Self {
            words: (0..len.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            len,
            summaries: Mutex::new(Vec::new()),
            grown: tokio::sync::Notify::new(),
            waiters: Default::default(),
        }
    }

    /// Chunk `i` is on disk, verified, with its proof nodes (set after they were written).
    pub(crate) fn set(&self, i: u64) {
        if i >= self.len {
            return;
        }
        let bit = 1 << (i % 64);
        let was = self.words[(i / 64) as usize].fetch_or(bit, Ordering::AcqRel);
        if was & bit != 0 {
            return;
        }
        let mut summaries = self.summaries.lock().unwrap_or_else(|p| p.into_inner());
        let mut whole = false;
        for s in summaries.iter_mut() {
            let b = (i / s.block) as usize;
            s.counts[b] += 1;
            let len = (((b as u64) + 1) * s.block).min(self.len) - b as u64 * s.block;
            if u64::from(s.counts[b]) == len {
                s.bits[b / 8] |= 1 << (b % 8);
                whole = true;
            }
        }
        drop(summaries);
        if whole {
            self.grown.notify_waiters();
        }
    }

    /// A place among at most `max` waiters, if one is free.
    pub(crate) fn waiter(&self, max: usize) -> Option<Waiter> {
        let n = self.waiters.fetch_add(1, Ordering::AcqRel);
        let place = Waiter(self.waiters.clone());
        (n < max).then_some(place)
    }

    /// Completes when a block of a kept size next becomes whole: made (and enabled) before
    /// what is held is read, then awaited.
    pub(crate) fn grown(&self) -> tokio::sync::futures::Notified<'_> {
        self.grown.notified()
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

    /// Which blocks of `block` chunks are whole, if that block size is kept up to date: bit
    /// `b` (bit `b % 8` of byte `b / 8`) is set when every chunk of block `b` is (the last
    /// block may be short). Costs the answer's size.
    pub(crate) fn blocks(&self, block: u64) -> Option<Vec<u8>> {
        let block = block.max(1);
        let mut summaries = self.summaries.lock().unwrap_or_else(|p| p.into_inner());
        let i = summaries.iter().position(|s| s.block == block)?;
        let s = summaries.remove(i);
        let bits = s.bits.clone();
        summaries.push(s);
        Some(bits)
    }

    /// Starts keeping the whole blocks of `block` chunks up to date (a scan of the set, once:
    /// run it off the async runtime), and returns them as [`VerifiedChunks::blocks`] does.
    pub(crate) fn summarize(&self, block: u64) -> Vec<u8> {
        let block = block.max(1);
        if let Some(bits) = self.blocks(block) {
            return bits;
        }
        let n = self.len.div_ceil(block);
        let mut counts = vec![0u32; n as usize];
        let mut bits = vec![0u8; n.div_ceil(8) as usize];
        let mut summaries = self.summaries.lock().unwrap_or_else(|p| p.into_inner());
        // Counted under the lock: no chunk set meanwhile is missed or counted twice.
        for (w, word) in self.words.iter().enumerate() {
            let mut v = word.load(Ordering::Acquire);
            while v != 0 {
                let i = w as u64 * 64 + u64::from(v.trailing_zeros());
                v &= v - 1;
                counts[(i / block) as usize] += 1;
            }
        }
        for (b, count) in counts.iter().enumerate() {
            let len = ((b as u64 + 1) * block).min(self.len) - b as u64 * block;
            if u64::from(*count) == len {
                bits[b / 8] |= 1 << (b % 8);
            }
        }
        if summaries.len() >= SUMMARIES {
            summaries.remove(0);
        }
        summaries.push(Summary {
            block,
            counts,
            bits: bits.clone(),
        });
        bits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_max_wait_for_news_and_a_place_is_given_back() {
        let v = VerifiedChunks::new(8);
        let a = v.waiter(2).expect("first");
        let _b = v.waiter(2).expect("second");
        assert!(v.waiter(2).is_none(), "a third waits not");
        drop(a);
        assert!(v.waiter(2).is_some(), "the first's place is free again");
    }

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
        assert_eq!(v.blocks(4), None, "not kept before it is asked for");
        let b = v.summarize(4);
        assert_eq!(b.len(), 3);
        assert_eq!(b[0], 0b0000_0001);
        assert_eq!(b[2], 0b0000_0011);
        // Kept up to date from then on, without a scan.
        for i in 4..8 {
            v.set(i);
        }
        assert_eq!(v.blocks(4).unwrap()[0], 0b0000_0011);
        // A few block sizes at most.
        for block in 1..=SUMMARIES as u64 {
            v.summarize(block + 4);
        }
        assert_eq!(v.blocks(4), None, "the least recently asked is dropped");
    }
}
