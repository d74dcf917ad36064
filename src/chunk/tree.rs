//! [`ChunkTree`]: the verifiable-chunk geometry of one archive, the exact length of an encoded
//! chunk range, and the [`RangeDecoder`] that checks one against the content root as it arrives.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::path::Path;

use bao_tree::io::outboard::PostOrderOutboard;
use bao_tree::io::sync::truncate_ranges;
use bao_tree::iter::{BaoChunk, ResponseIterRef};
use bao_tree::{BaoTree, ChunkNum, ChunkRanges};
use positioned_io::RandomAccessFile;

use super::{ChunkError, ChunkSize};
use crate::hash::ContentRoot;

/// The verifiable-chunk geometry of one archive: its size, chunk size and content root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkTree {
    size: u64,
    chunk_size: ChunkSize,
    root: ContentRoot,
}

impl ChunkTree {
    /// The tree of an archive of `size` bytes with this root, in chunks of `chunk_size`.
    pub fn new(size: u64, chunk_size: ChunkSize, root: ContentRoot) -> Self {
        Self {
            size,
            chunk_size,
            root,
        }
    }

    /// Archive size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The chunk size.
    pub fn chunk_size(&self) -> ChunkSize {
        self.chunk_size
    }

    /// The content root.
    pub fn root(&self) -> ContentRoot {
        self.root
    }

    /// Number of chunks (the last may be short). An empty archive has one empty chunk.
    pub fn chunk_count(&self) -> u64 {
        self.size
            .div_ceil(u64::from(self.chunk_size.bytes()))
            .max(1)
    }

    /// Byte range of the archive covered by chunks `range`.
    pub fn byte_range(&self, range: Range<u64>) -> Range<u64> {
        // Saturating: a range from a peer is measured before it is checked.
        let cs = u64::from(self.chunk_size.bytes());
        range.start.saturating_mul(cs).min(self.size)..range.end.saturating_mul(cs).min(self.size)
    }

    /// Size of the outboard file in bytes.
    pub fn outboard_size(&self) -> u64 {
        self.bao().outboard_size()
    }

    pub(super) fn bao(&self) -> BaoTree {
        BaoTree::new(self.size, self.chunk_size.block_size())
    }

    pub(super) fn check_range(&self, range: &Range<u64>) -> Result<(), ChunkError> {
        let count = self.chunk_count();
        if range.start >= range.end || range.end > count {
            return Err(ChunkError::OutOfRange {
                start: range.start,
                end: range.end,
                count,
            });
        }
        Ok(())
    }

    pub(super) fn bao_ranges(&self, range: &Range<u64>) -> ChunkRanges {
        let per = self.chunk_size.blake3_chunks();
        ChunkRanges::from(ChunkNum(range.start * per)..ChunkNum(range.end * per))
    }

    fn chunk_of(&self, blake3_chunk: ChunkNum) -> u64 {
        blake3_chunk.0 / self.chunk_size.blake3_chunks()
    }

    /// Exact length of the encoding of chunks `range`: their bytes plus 64 bytes per tree node
    /// on the way from the root.
    pub fn encoded_len(&self, range: Range<u64>) -> Result<u64, ChunkError> {
        self.check_range(&range)?;
        let ranges = self.bao_ranges(&range);
        let ranges = truncate_ranges(&ranges, self.size);
        Ok(ResponseIterRef::new(self.bao(), ranges)
            .map(|item| match item {
                BaoChunk::Parent { .. } => 64,
                BaoChunk::Leaf { size, .. } => size as u64,
            })
            .sum())
    }

    /// Checks an encoded range of chunks against the root and hands each verified piece of data
    /// to `sink` with its offset in the archive, in order. `sink` never sees a byte that has not
    /// been checked.
    pub fn decode(
        &self,
        range: Range<u64>,
        encoded: &[u8],
        sink: impl FnMut(u64, &[u8]) -> io::Result<()>,
    ) -> Result<(), ChunkError> {
        self.decode_with_proof(range, encoded, sink, |_, _| Ok(()))
    }

    /// Like [`ChunkTree::decode`], and also hands each verified tree node of the proof to
    /// `outboard` with its byte offset in the outboard file: once every chunk of an archive
    /// has been decoded this way, those nodes make its complete outboard.
    pub fn decode_with_proof(
        &self,
        range: Range<u64>,
        encoded: &[u8],
        mut sink: impl FnMut(u64, &[u8]) -> io::Result<()>,
        mut outboard: impl FnMut(u64, &[u8]) -> io::Result<()>,
    ) -> Result<(), ChunkError> {
        let mut decoder = self.range_decoder(range)?;
        decoder.feed(encoded, &mut sink, &mut outboard)?;
        decoder.finish()
    }

    /// What the encoding of chunks `range` is made of, in order: tree nodes (64 bytes at an
    /// offset of the outboard) and pieces of data (at an offset of the archive).
    pub(crate) fn encoding(&self, range: Range<u64>) -> Result<Vec<Part>, ChunkError> {
        self.check_range(&range)?;
        let tree = self.bao();
        let ranges = self.bao_ranges(&range);
        let ranges = truncate_ranges(&ranges, self.size);
        ResponseIterRef::new(tree, ranges)
            .map(|item| match item {
                BaoChunk::Parent { node, .. } => tree
                    .post_order_offset(node)
                    .map(|o| Part::Node {
                        offset: o.value() * 64,
                    })
                    .ok_or_else(|| {
                        io::Error::new(io::ErrorKind::InvalidData, "a tree node without a place")
                            .into()
                    }),
                BaoChunk::Leaf {
                    start_chunk, size, ..
                } => Ok(Part::Data {
                    offset: start_chunk.to_bytes(),
                    len: size,
                }),
            })
            .collect()
    }

    /// A decoder that checks an encoded range of chunks as it arrives, in pieces of any size,
    /// holding at most one chunk in memory.
    pub fn range_decoder(&self, range: Range<u64>) -> Result<RangeDecoder, ChunkError> {
        self.check_range(&range)?;
        let ranges = self.bao_ranges(&range);
        let ranges = truncate_ranges(&ranges, self.size);
        let items: Vec<BaoChunk> = ResponseIterRef::new(self.bao(), ranges).collect();
        let mut expected = Vec::with_capacity(64);
        expected.push(self.root.to_blake3());
        Ok(RangeDecoder {
            tree: *self,
            items,
            next: 0,
            expected,
            pending: Vec::new(),
        })
    }
}

/// One part of an encoded chunk range (see [`ChunkTree::encoding`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part {
    /// A tree node: 64 bytes at this offset of the outboard.
    Node { offset: u64 },
    /// Data: `len` bytes at this offset of the archive.
    Data { offset: u64, len: usize },
}

/// Checks an encoded range of chunks against the content root as its bytes arrive (see
/// [`ChunkTree::range_decoder`]). Each chunk and proof node is handed on as soon as it is
/// complete and checked; nothing unchecked ever is.
#[derive(Debug)]
pub struct RangeDecoder {
    tree: ChunkTree,
    items: Vec<BaoChunk>,
    next: usize,
    /// Expected hashes of the nodes still to come, the next on top.
    expected: Vec<blake3::Hash>,
    /// The start of an item whose bytes straddle two pieces.
    pending: Vec<u8>,
}

impl RangeDecoder {
    fn item_len(item: &BaoChunk) -> usize {
        match item {
            BaoChunk::Parent { .. } => 64,
            BaoChunk::Leaf { size, .. } => *size,
        }
    }

    /// Takes the next bytes of the encoding. Calls `sink(offset, data)` for each checked chunk
    /// and `outboard(offset, pair)` for each checked proof node.
    pub fn feed(
        &mut self,
        mut data: &[u8],
        sink: &mut impl FnMut(u64, &[u8]) -> io::Result<()>,
        outboard: &mut impl FnMut(u64, &[u8]) -> io::Result<()>,
    ) -> Result<(), ChunkError> {
        while !data.is_empty() {
            let Some(item) = self.items.get(self.next).copied() else {
                return Err(ChunkError::TrailingBytes { extra: data.len() });
            };
            let need = Self::item_len(&item);
            if self.pending.is_empty() && data.len() >= need {
                // The whole item is in this piece: check it in place.
                self.check(item, &data[..need], sink, outboard)?;
                data = &data[need..];
            } else {
                let take = (need - self.pending.len()).min(data.len());
                self.pending.extend_from_slice(&data[..take]);
                data = &data[take..];
                if self.pending.len() == need {
                    let bytes = std::mem::take(&mut self.pending);
                    self.check(item, &bytes, sink, outboard)?;
                    self.pending = bytes;
                    self.pending.clear();
                }
            }
        }
        Ok(())
    }

    /// Ends the encoding: every chunk must have arrived.
    pub fn finish(&self) -> Result<(), ChunkError> {
        match self.items.get(self.next) {
            None => Ok(()),
            Some(item) => Err(ChunkError::Truncated {
                chunk: self.tree.chunk_of(match item {
                    BaoChunk::Parent { node, .. } => node.chunk_range().start,
                    BaoChunk::Leaf { start_chunk, .. } => *start_chunk,
                }),
            }),
        }
    }

    fn check(
        &mut self,
        item: BaoChunk,
        bytes: &[u8],
        sink: &mut impl FnMut(u64, &[u8]) -> io::Result<()>,
        outboard: &mut impl FnMut(u64, &[u8]) -> io::Result<()>,
    ) -> Result<(), ChunkError> {
        use blake3::hazmat::{HasherExt, Mode, merge_subtrees_non_root, merge_subtrees_root};
        self.next += 1;
        match item {
            BaoChunk::Parent {
                node,
                is_root,
                left,
                right,
                ..
            } => {
                let l: [u8; 32] = bytes[..32].try_into().expect("32 bytes");
                let r: [u8; 32] = bytes[32..].try_into().expect("32 bytes");
                let actual = if is_root {
                    merge_subtrees_root(&l, &r, Mode::Hash)
                } else {
                    blake3::Hash::from(merge_subtrees_non_root(&l, &r, Mode::Hash))
                };
                if self.expected.pop() != Some(actual) {
                    return Err(ChunkError::ProofMismatch {
                        chunk: self.tree.chunk_of(node.chunk_range().start),
                    });
                }
                if right {
                    self.expected.push(blake3::Hash::from(r));
                }
                if left {
                    self.expected.push(blake3::Hash::from(l));
                }
                if let Some(offset) = self.tree.bao().post_order_offset(node) {
                    outboard(offset.value() * 64, bytes)?;
                }
            }
            BaoChunk::Leaf {
                start_chunk,
                is_root,
                ..
            } => {
                let actual = if is_root {
                    blake3::hash(bytes)
                } else {
                    let mut hasher = blake3::Hasher::new();
                    hasher.set_input_offset(start_chunk.to_bytes());
                    hasher.update(bytes);
                    blake3::Hash::from(hasher.finalize_non_root())
                };
                if self.expected.pop() != Some(actual) {
                    return Err(ChunkError::Mismatch {
                        chunk: self.tree.chunk_of(start_chunk),
                    });
                }
                sink(start_chunk.to_bytes(), bytes)?;
            }
        }
        Ok(())
    }
}

impl ChunkTree {
    /// Whether the outboard at `path` holds every tree node of this archive and they all hash
    /// up to the content root (a few milliseconds per GiB: parents only, no data).
    pub fn outboard_is_complete(&self, path: &Path) -> io::Result<bool> {
        let file = RandomAccessFile::try_new(File::open(path)?)?;
        let outboard = PostOrderOutboard {
            root: self.root.to_blake3(),
            tree: self.bao(),
            data: file,
        };
        let mut covered = 0u64;
        for range in bao_tree::io::sync::valid_outboard_ranges(outboard, &ChunkRanges::all()) {
            let range = range?;
            if range.start.0 != covered {
                return Ok(false);
            }
            covered = range.end.0;
        }
        Ok(covered >= self.size.div_ceil(1024))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::{ChunkSource, write_outboard};

    /// Decoding every range of an archive rebuilds its outboard exactly, from the proofs.
    #[test]
    fn proofs_rebuild_the_outboard() {
        let tmp = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..300_001u32).map(|i| (i * 31 % 253) as u8).collect();
        let archive = tmp.path().join("a");
        std::fs::write(&archive, &data).unwrap();
        for chunk in [ChunkSize::MIN, ChunkSize::new(4096).unwrap()] {
            let ob = tmp.path().join("ob");
            let (root, size) = write_outboard(&archive, chunk, &ob).unwrap();
            let tree = ChunkTree::new(size, chunk, root);
            let source = ChunkSource::open(tree, &archive, &ob).unwrap();
            let mut rebuilt = vec![0u8; tree.outboard_size() as usize];
            let mut copy = vec![0u8; data.len()];
            let n = tree.chunk_count();
            for start in (0..n).step_by(7) {
                let range = start..(start + 7).min(n);
                let mut encoded = Vec::new();
                source.encode(range.clone(), &mut encoded).unwrap();
                tree.decode_with_proof(
                    range,
                    &encoded,
                    |off, d| {
                        copy[off as usize..off as usize + d.len()].copy_from_slice(d);
                        Ok(())
                    },
                    |off, pair| {
                        rebuilt[off as usize..off as usize + 64].copy_from_slice(pair);
                        Ok(())
                    },
                )
                .unwrap();
            }
            assert_eq!(copy, data);
            assert_eq!(rebuilt, std::fs::read(&ob).unwrap(), "chunk {chunk}");
            assert!(tree.outboard_is_complete(&ob).unwrap());
            // One node missing (zeros, as in a sparse file) and it is not.
            let mut holed = rebuilt.clone();
            holed[64..128].fill(0);
            std::fs::write(tmp.path().join("holed"), &holed).unwrap();
            assert!(
                !tree
                    .outboard_is_complete(&tmp.path().join("holed"))
                    .unwrap()
            );
            // A flipped proof byte is a proof mismatch; a cut encoding is truncated.
            let mut encoded = Vec::new();
            source.encode(3..10, &mut encoded).unwrap();
            let mut bad = encoded.clone();
            bad[5] ^= 1;
            assert!(matches!(
                tree.decode(3..10, &bad, |_, _| Ok(())),
                Err(ChunkError::ProofMismatch { .. })
            ));
            assert!(matches!(
                tree.decode(3..10, &encoded[..encoded.len() - 1], |_, _| Ok(())),
                Err(ChunkError::Truncated { chunk: 9 })
            ));
            let mut long = encoded.clone();
            long.push(0);
            assert!(matches!(
                tree.decode(3..10, &long, |_, _| Ok(())),
                Err(ChunkError::TrailingBytes { extra: 1 })
            ));
        }
    }

    /// Fed in pieces of any size, the decoder gives the same data, and catches the same bad
    /// chunk before handing on anything after it.
    #[test]
    fn piecewise_decoding_matches_whole_decoding() {
        let tmp = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let archive = tmp.path().join("a");
        std::fs::write(&archive, &data).unwrap();
        let chunk = ChunkSize::new(4096).unwrap();
        let ob = tmp.path().join("ob");
        let (root, size) = write_outboard(&archive, chunk, &ob).unwrap();
        let tree = ChunkTree::new(size, chunk, root);
        let source = ChunkSource::open(tree, &archive, &ob).unwrap();
        let mut encoded = Vec::new();
        source.encode(2..20, &mut encoded).unwrap();
        for split in [1usize, 7, 63, 64, 65, 4095, 4096, 5000, encoded.len()] {
            let mut got = Vec::new();
            let mut d = tree.range_decoder(2..20).unwrap();
            for piece in encoded.chunks(split) {
                d.feed(
                    piece,
                    &mut |off, bytes| {
                        assert_eq!(off as usize, 2 * 4096 + got.len());
                        got.extend_from_slice(bytes);
                        Ok(())
                    },
                    &mut |_, _| Ok(()),
                )
                .unwrap();
            }
            d.finish().unwrap();
            assert_eq!(got, &data[2 * 4096..20 * 4096], "split {split}");
            // A flipped byte in chunk 9's data stops delivery at chunk 9.
            let mut bad = encoded.clone();
            let last = bad.len() - 1;
            let pos = (0..bad.len())
                .find(|&i| i > last / 2 && bad[i] != 0)
                .unwrap();
            bad[pos] ^= 0x40;
            let mut delivered = 0;
            let mut d = tree.range_decoder(2..20).unwrap();
            let mut err = None;
            for piece in bad.chunks(split) {
                if let Err(e) = d.feed(
                    piece,
                    &mut |_, b| {
                        delivered += b.len();
                        Ok(())
                    },
                    &mut |_, _| Ok(()),
                ) {
                    err = Some(e);
                    break;
                }
            }
            assert!(err.is_some_and(|e| e.is_corrupt_data()), "split {split}");
            assert!(delivered < 18 * 4096);
        }
        // Too little is truncated; too much is trailing.
        let mut d = tree.range_decoder(2..20).unwrap();
        d.feed(&encoded[..100], &mut |_, _| Ok(()), &mut |_, _| Ok(()))
            .unwrap();
        assert!(matches!(d.finish(), Err(ChunkError::Truncated { .. })));
    }

    #[test]
    fn proof_overhead_is_under_one_percent() {
        // A 1 GiB archive in 16 KiB chunks, fetched 64 chunks at a time.
        let tree = ChunkTree::new(1 << 30, ChunkSize::DEFAULT, ContentRoot([0; 32]));
        let data = 64 * 16 * 1024;
        for start in [0u64, 64, 4096, tree.chunk_count() - 64] {
            let len = tree.encoded_len(start..start + 64).unwrap();
            let overhead = (len - data) as f64 / data as f64;
            assert!(overhead < 0.01, "overhead {overhead} at {start}");
        }
        assert!((tree.outboard_size() as f64) < 0.004 * (1u64 << 30) as f64);
    }
}
