//! [`Bits`]: one bit per chunk or piece, so a download's bookkeeping is 1/131,072 of the
//! archive at 16 KiB chunks.

/// A fixed-length set of bits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Bits {
    words: Vec<u64>,
    len: usize,
    ones: usize,
}

impl Bits {
    /// `len` bits, all clear.
    pub(crate) fn new(len: usize) -> Self {
        Self {
            words: vec![0; len.div_ceil(64)],
            len,
            ones: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Number of bits set.
    pub(crate) fn ones(&self) -> usize {
        self.ones
    }

    pub(crate) fn get(&self, i: usize) -> bool {
        i < self.len && self.words[i / 64] & (1 << (i % 64)) != 0
    }

    pub(crate) fn set(&mut self, i: usize) {
        if i < self.len && !self.get(i) {
            self.words[i / 64] |= 1 << (i % 64);
            self.ones += 1;
        }
    }

    /// Clears bit `i`.
    pub(crate) fn clear(&mut self, i: usize) {
        if self.get(i) {
            self.words[i / 64] &= !(1 << (i % 64));
            self.ones -= 1;
        }
    }

    /// Word `w`: bits `64 w` to `64 w + 63` (0 past the end).
    pub(crate) fn word(&self, w: usize) -> u64 {
        self.words.get(w).copied().unwrap_or(0)
    }

    /// Number of words.
    pub(crate) fn words(&self) -> usize {
        self.words.len()
    }

    /// The bits as bytes: bit `i` is bit `i % 8` of byte `i / 8`.
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        let mut bytes: Vec<u8> = self.words.iter().flat_map(|w| w.to_le_bytes()).collect();
        bytes.truncate(self.len.div_ceil(8));
        bytes
    }

    /// The inverse of [`Bits::to_bytes`]; `None` when `bytes` is not `len` bits long.
    pub(crate) fn from_bytes(bytes: &[u8], len: usize) -> Option<Self> {
        if bytes.len() != len.div_ceil(8) {
            return None;
        }
        let mut bits = Self::new(len);
        for i in 0..len {
            if bytes[i / 8] & (1 << (i % 8)) != 0 {
                bits.set(i);
            }
        }
        Some(bits)
    }
}

/// A have-bitfield a peer sent: one bit per block of `per_block` pieces (the last block may be
/// short), `blocks` bits in `bytes`; the pieces it holds, `pieces` bits. `None` when `bytes` is
/// not `blocks` bits long or the block count does not cover the pieces.
pub(crate) fn have_from_bytes(
    bytes: &[u8],
    blocks: usize,
    pieces: usize,
    per_block: usize,
) -> Option<Bits> {
    let per_block = per_block.max(1);
    if blocks != pieces.div_ceil(per_block) {
        return None;
    }
    let held = Bits::from_bytes(bytes, blocks)?;
    if per_block == 1 {
        return Some(held);
    }
    let mut out = Bits::new(pieces);
    for p in 0..pieces {
        if held.get(p / per_block) {
            out.set(p);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_and_bytes() {
        let mut b = Bits::new(130);
        for i in [0, 7, 63, 64, 129] {
            b.set(i);
        }
        b.set(7);
        b.set(500); // out of range: ignored
        assert_eq!(b.ones(), 5);
        b.set(3);
        b.clear(3);
        b.clear(3);
        assert_eq!(
            (b.ones(), b.word(0), b.word(9)),
            (5, 1 | 1 << 7 | 1 << 63, 0)
        );
        assert!(b.get(63) && b.get(64) && !b.get(65) && !b.get(500));
        let bytes = b.to_bytes();
        assert_eq!(bytes.len(), 17);
        assert_eq!(bytes[0], 0b1000_0001);
        assert_eq!(Bits::from_bytes(&bytes, 130), Some(b));
        assert_eq!(Bits::from_bytes(&bytes, 200), None);
    }

    #[test]
    fn a_have_bitfield_of_blocks_gives_the_pieces_of_the_blocks_held() {
        // 10 pieces in blocks of 4: blocks 0 and 2 (the short last one) held.
        let held = have_from_bytes(&[0b101], 3, 10, 4).unwrap();
        let got: Vec<usize> = (0..10).filter(|&p| held.get(p)).collect();
        assert_eq!(got, vec![0, 1, 2, 3, 8, 9]);
        assert_eq!(held.len(), 10);
        // Wrong lengths: refused.
        assert_eq!(have_from_bytes(&[0b101, 0], 3, 10, 4), None);
        assert_eq!(have_from_bytes(&[0b101], 2, 10, 4), None);
        assert_eq!(have_from_bytes(&[0b11], 2, 2, 1).map(|b| b.ones()), Some(2));
    }
}
