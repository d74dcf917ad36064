//! [`ChunkSource`]: an archive and its outboard, opened for serving verifiable chunks.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::path::Path;

use bao_tree::io::sync::ReadAt;
use positioned_io::RandomAccessFile;

use super::tree::Part;
use super::{ChunkError, ChunkTree};

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
            (&archive_file, archive, tree.size()),
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
        for part in self.tree.encoding(range)? {
            let start = out.len();
            match part {
                Part::Node { offset } => {
                    out.resize(start + 64, 0);
                    self.outboard.read_exact_at(offset, &mut out[start..])?;
                }
                Part::Data { offset, len } => {
                    out.resize(start + len, 0);
                    self.archive.read_exact_at(offset, &mut out[start..])?;
                }
            }
        }
        Ok(())
    }
}
