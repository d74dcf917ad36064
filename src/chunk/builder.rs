//! [`TreeBuilder`]: the content root and outboard of an archive, computed in one pass as it is
//! written.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::Path;

use super::ChunkSize;
use crate::hash::ContentRoot;

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
    use crate::chunk::ChunkTree;
    use bao_tree::BaoTree;

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
}
