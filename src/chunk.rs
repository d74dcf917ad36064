//! Chunk size ([`ChunkSize`], `SNAPSHOT_CHUNK_SIZE`) and the verifiable chunks of an archive.
//!
//! An archive is served and checked in chunks of [`ChunkSize`] bytes. Every chunk, or range of
//! chunks, travels with the BLAKE3 tree nodes that link it to the archive's [`ContentRoot`], so a
//! downloader checks each chunk against the root it was told in advance, never against anything
//! the serving peer made up. The tree is BLAKE3's own (via `bao-tree`), so the root is the plain
//! BLAKE3 hash of the archive and `b3sum` agrees with it.
//!
//! A serving peer keeps an *outboard* beside each archive: the tree's inner nodes down to the
//! chunk level, 64 bytes per chunk (0.39% of the archive at 16 KiB). A range of `n` chunks costs
//! `64 * (n - 1)` bytes of inner nodes plus `64` per tree level above the range: 0.4-0.5% for
//! the default request of 64 chunks of 16 KiB.

use std::fmt;
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::ops::Range;
use std::path::Path;

use bao_tree::io::outboard::PostOrderOutboard;
use bao_tree::io::sync::{ReadAt, truncate_ranges};
use bao_tree::iter::{BaoChunk, ResponseIterRef};
use bao_tree::{BaoTree, BlockSize, ChunkNum, ChunkRanges};
use positioned_io::RandomAccessFile;

use crate::hash::ContentRoot;

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
            Ok(v) if !v.trim().is_empty() => Self::parse(&v),
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
    fn blake3_chunks(self) -> u64 {
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
        let cs = u64::from(self.chunk_size.bytes());
        (range.start * cs).min(self.size)..(range.end * cs).min(self.size)
    }

    /// Size of the outboard file in bytes.
    pub fn outboard_size(&self) -> u64 {
        self.bao().outboard_size()
    }

    fn bao(&self) -> BaoTree {
        BaoTree::new(self.size, self.chunk_size.block_size())
    }

    fn check_range(&self, range: &Range<u64>) -> Result<(), ChunkError> {
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

    fn bao_ranges(&self, range: &Range<u64>) -> ChunkRanges {
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

/// An archive and its outboard, opened for serving verifiable chunks.
#[derive(Debug)]
pub struct ChunkSource {
    tree: ChunkTree,
    archive: RandomAccessFile,
    outboard: RandomAccessFile,
}

impl ChunkSource {
    /// Opens `archive` and `outboard` as the files of `tree`. Checks their sizes, not their bytes:
    /// the downloader checks every chunk it gets.
    pub fn open(tree: ChunkTree, archive: &Path, outboard: &Path) -> io::Result<Self> {
        let archive_file = File::open(archive)?;
        let outboard_file = File::open(outboard)?;
        for (file, path, want) in [
            (&archive_file, archive, tree.size),
            (&outboard_file, outboard, tree.outboard_size()),
        ] {
            let got = file.metadata()?.len();
            if got != want {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} is {got} bytes, expected {want}", path.display()),
                ));
            }
        }
        Ok(Self {
            tree,
            archive: RandomAccessFile::try_new(archive_file)?,
            outboard: RandomAccessFile::try_new(outboard_file)?,
        })
    }

    /// The tree this source serves.
    pub fn tree(&self) -> &ChunkTree {
        &self.tree
    }

    /// Appends the encoding of chunks `range` (data plus proof, see [`ChunkTree::decode`]) to
    /// `out`, reading the data and the nodes straight into it. Blocking file I/O. The bytes are
    /// not checked here: the downloader checks every one of them.
    pub fn encode(&self, range: Range<u64>, out: &mut Vec<u8>) -> Result<(), ChunkError> {
        self.tree.check_range(&range)?;
        let tree = self.tree.bao();
        let ranges = self.tree.bao_ranges(&range);
        let ranges = truncate_ranges(&ranges, self.tree.size);
        for item in ResponseIterRef::new(tree, ranges) {
            let start = out.len();
            match item {
                BaoChunk::Parent { node, .. } => {
                    let offset = tree.post_order_offset(node).ok_or_else(|| {
                        io::Error::new(io::ErrorKind::InvalidData, "outboard lacks a tree node")
                    })?;
                    out.resize(start + 64, 0);
                    self.outboard
                        .read_exact_at(offset.value() * 64, &mut out[start..])?;
                }
                BaoChunk::Leaf {
                    start_chunk, size, ..
                } => {
                    out.resize(start + size, 0);
                    self.archive
                        .read_exact_at(start_chunk.to_bytes(), &mut out[start..])?;
                }
            }
        }
        Ok(())
    }
}

/// Computes the content root and the outboard of data pushed to it in order, in one pass and
/// constant memory, without knowing the size in advance.
///
/// The outboard is the BLAKE3 tree's parent nodes above the chunk level, each as
/// `left_cv || right_cv` (64 bytes), in post-order (children before parents), as `bao-tree`'s
/// `PostOrderOutboard` reads them.
pub struct TreeBuilder<O: Write> {
    outboard: O,
    chunk: usize,
    /// Bytes of the chunk not hashed yet. A full chunk is hashed only once more data follows,
    /// because the last chunk of a one-chunk archive is the root and is hashed differently.
    buf: Vec<u8>,
    chunks_done: u64,
    stack: Vec<blake3::hazmat::ChainingValue>,
    size: u64,
}

impl<O: Write> TreeBuilder<O> {
    /// A builder for chunks of `chunk_size`, writing the outboard to `outboard`.
    pub fn new(chunk_size: ChunkSize, outboard: O) -> Self {
        Self {
            outboard,
            chunk: chunk_size.bytes() as usize,
            buf: Vec::with_capacity(chunk_size.bytes() as usize),
            chunks_done: 0,
            stack: Vec::with_capacity(64),
            size: 0,
        }
    }

    fn chunk_cv(&self, data: &[u8]) -> blake3::hazmat::ChainingValue {
        use blake3::hazmat::HasherExt;
        let mut hasher = blake3::Hasher::new();
        hasher.set_input_offset(self.chunks_done * self.chunk as u64);
        hasher.update(data);
        hasher.finalize_non_root()
    }

    fn write_pair(
        &mut self,
        left: &blake3::hazmat::ChainingValue,
        right: &blake3::hazmat::ChainingValue,
    ) -> io::Result<()> {
        self.outboard.write_all(left)?;
        self.outboard.write_all(right)
    }

    /// Adds a full chunk that is known not to be the last.
    fn push_chunk(&mut self, mut cv: blake3::hazmat::ChainingValue) -> io::Result<()> {
        self.chunks_done += 1;
        let mut total = self.chunks_done;
        while total & 1 == 0 {
            let left = self
                .stack
                .pop()
                .expect("a left subtree for every even count");
            self.write_pair(&left, &cv)?;
            cv = blake3::hazmat::merge_subtrees_non_root(&left, &cv, blake3::hazmat::Mode::Hash);
            total >>= 1;
        }
        self.stack.push(cv);
        Ok(())
    }

    /// Adds the next bytes of the data.
    pub fn update(&mut self, mut data: &[u8]) -> io::Result<()> {
        self.size += data.len() as u64;
        while !data.is_empty() {
            if self.buf.len() == self.chunk {
                // More data follows, so the buffered chunk is not the last one.
                let cv = self.chunk_cv(&self.buf);
                self.buf.clear();
                self.push_chunk(cv)?;
            }
            if self.buf.is_empty() && data.len() > self.chunk {
                let cv = self.chunk_cv(&data[..self.chunk]);
                self.push_chunk(cv)?;
                data = &data[self.chunk..];
                continue;
            }
            let take = (self.chunk - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
        }
        Ok(())
    }

    /// Finishes: returns the content root, the data size and the outboard writer.
    pub fn finish(mut self) -> io::Result<(ContentRoot, u64, O)> {
        let root = if self.chunks_done == 0 {
            blake3::hash(&self.buf)
        } else {
            let mut cv = self.chunk_cv(&self.buf);
            loop {
                let left = self
                    .stack
                    .pop()
                    .expect("at least one full chunk before the last");
                self.write_pair(&left, &cv)?;
                if self.stack.is_empty() {
                    break blake3::hazmat::merge_subtrees_root(
                        &left,
                        &cv,
                        blake3::hazmat::Mode::Hash,
                    );
                }
                cv =
                    blake3::hazmat::merge_subtrees_non_root(&left, &cv, blake3::hazmat::Mode::Hash);
            }
        };
        Ok((ContentRoot::from(root), self.size, self.outboard))
    }
}

/// A writer that passes everything to `inner` and to a [`TreeBuilder`].
pub(crate) struct TreeWriter<W: Write, O: Write> {
    pub(crate) inner: W,
    pub(crate) tree: TreeBuilder<O>,
}

impl<W: Write, O: Write> Write for TreeWriter<W, O> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.tree.update(&buf[..n])?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()?;
        self.tree.outboard.flush()
    }
}

/// Hashes `archive` and writes its outboard (see [`TreeBuilder`]) to `outboard`, fsynced.
/// Returns the content root and the archive size. One sequential read of the archive.
pub fn write_outboard(
    archive: &Path,
    chunk_size: ChunkSize,
    outboard: &Path,
) -> io::Result<(ContentRoot, u64)> {
    let mut file = File::open(archive)?;
    let out = BufWriter::with_capacity(1 << 20, File::create(outboard)?);
    let mut tree = TreeBuilder::new(chunk_size, out);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        tree.update(&buf[..n])?;
    }
    let (root, size, mut out) = tree.finish()?;
    out.flush()?;
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok((root, size))
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

    /// The streaming builder agrees with bao-tree's own outboard, byte for byte, and with
    /// `blake3::hash` for the root, whatever the size and however the data is split.
    #[test]
    fn tree_builder_matches_bao_tree() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        for chunk in [
            ChunkSize::MIN,
            ChunkSize::new(4096).unwrap(),
            ChunkSize::DEFAULT,
        ] {
            let c = chunk.bytes() as usize;
            let sizes = [
                0,
                1,
                1023,
                1024,
                1025,
                c - 1,
                c,
                c + 1,
                2 * c,
                3 * c,
                3 * c + 5,
                5 * c,
                6 * c + 1,
                7 * c,
                8 * c,
                9 * c - 1,
                data.len(),
            ];
            for size in sizes {
                let input = &data[..size];
                let mut expected = Vec::new();
                let tree = BaoTree::new(size as u64, chunk.block_size());
                let want_root =
                    bao_tree::io::sync::outboard_post_order(input, tree, &mut expected).unwrap();
                for split in [1usize, 7, 1000, c, c + 3, 1 << 20] {
                    let mut b = TreeBuilder::new(chunk, Vec::new());
                    for piece in input.chunks(split) {
                        b.update(piece).unwrap();
                    }
                    let (root, got_size, outboard) = b.finish().unwrap();
                    assert_eq!(root.0, *want_root.as_bytes(), "size {size} chunk {c}");
                    assert_eq!(root.0, *blake3::hash(input).as_bytes());
                    assert_eq!(got_size, size as u64);
                    assert_eq!(outboard, expected, "size {size} chunk {c} split {split}");
                    assert_eq!(
                        outboard.len() as u64,
                        ChunkTree::new(size as u64, chunk, root).outboard_size()
                    );
                }
            }
        }
    }

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
