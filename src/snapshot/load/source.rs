//! Where a loader reads an archive from: a complete file, or the verified prefix of a download
//! still arriving ([`Watermark`]), so that loading overlaps downloading.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

/// How far the verified, contiguous prefix of a download reaches, shared between the
/// downloader (which advances it as chunks are checked and written) and a loader (which reads
/// no further).
#[derive(Debug, Default)]
pub struct Watermark {
    state: Mutex<Mark>,
    moved: Condvar,
}

#[derive(Debug, Default, Clone, Copy)]
struct Mark {
    verified: u64,
    stopped: bool,
}

impl Watermark {
    /// A watermark at 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// The prefix now reaches `bytes` (never moves back).
    pub fn advance(&self, bytes: u64) {
        let mut m = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if bytes > m.verified {
            m.verified = bytes;
            self.moved.notify_all();
        }
    }

    /// The download stopped: a reader waiting for more gets an error.
    pub fn stop(&self) {
        let mut m = self.state.lock().unwrap_or_else(|p| p.into_inner());
        m.stopped = true;
        self.moved.notify_all();
    }

    /// How far the prefix reaches now.
    pub fn verified(&self) -> u64 {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .verified
    }

    /// Waits until the prefix reaches past `pos`; returns how far it reaches. Fails when the
    /// download stopped before that.
    fn wait_past(&self, pos: u64) -> io::Result<u64> {
        let mut m = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if m.verified > pos {
                return Ok(m.verified);
            }
            if m.stopped {
                // Not `Interrupted`: readers retry that kind.
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "the download stopped before this part arrived",
                ));
            }
            m = self.moved.wait(m).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// An archive to load: a file of `size` bytes, complete, or filling up behind a [`Watermark`].
#[derive(Debug, Clone)]
pub struct ArchiveSource {
    path: PathBuf,
    size: u64,
    /// The file, already open (a download's file is renamed when it completes).
    file: Option<Arc<File>>,
    watermark: Option<Arc<Watermark>>,
}

impl ArchiveSource {
    /// A complete archive file.
    pub fn file(path: impl Into<PathBuf>, size: u64) -> Self {
        Self {
            path: path.into(),
            size,
            file: None,
            watermark: None,
        }
    }

    /// An archive being downloaded into `file` (at `path`): only bytes below the watermark are
    /// read. Reading goes through `file` even after the download renames it.
    pub fn growing(
        path: impl Into<PathBuf>,
        file: Option<File>,
        size: u64,
        watermark: Arc<Watermark>,
    ) -> Self {
        Self {
            path: path.into(),
            size,
            file: file.map(Arc::new),
            watermark: Some(watermark),
        }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether every byte is there already.
    pub fn is_complete(&self) -> bool {
        self.watermark.is_none()
    }

    /// The archive's size.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub(crate) fn open(&self) -> io::Result<SourceReader> {
        let file = match &self.file {
            Some(f) => f.try_clone()?,
            None => File::open(&self.path)?,
        };
        Ok(SourceReader {
            file,
            pos: 0,
            size: self.size,
            watermark: self.watermark.clone(),
        })
    }
}

/// Reads an [`ArchiveSource`] from its start.
#[derive(Debug)]
pub(crate) struct SourceReader {
    file: File,
    pos: u64,
    size: u64,
    watermark: Option<Arc<Watermark>>,
}

impl Read for SourceReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.size || buf.is_empty() {
            return Ok(0);
        }
        let until = match &self.watermark {
            Some(w) => w.wait_past(self.pos)?.min(self.size),
            None => self.size,
        };
        let n = (until - self.pos).min(buf.len() as u64) as usize;
        let n = self.file.read_at(&mut buf[..n], self.pos)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the archive file is shorter than its size",
            ));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_growing_source_reads_only_what_is_verified_and_fails_when_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a");
        std::fs::write(&path, vec![7u8; 1000]).unwrap();
        let mark = Arc::new(Watermark::new());
        let source = ArchiveSource::growing(&path, None, 1000, mark.clone());
        let mut r = source.open().unwrap();
        mark.advance(300);
        let mut buf = vec![0u8; 1000];
        assert_eq!(r.read(&mut buf).unwrap(), 300);
        let writer = {
            let mark = mark.clone();
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(50));
                mark.advance(1000);
            })
        };
        assert_eq!(r.read(&mut buf).unwrap(), 700, "waited for the rest");
        assert_eq!(r.read(&mut buf).unwrap(), 0);
        writer.join().unwrap();
        let mark = Arc::new(Watermark::new());
        let file = Some(File::open(&path).unwrap());
        let mut r = ArchiveSource::growing(&path, file, 1000, mark.clone())
            .open()
            .unwrap();
        mark.stop();
        assert_eq!(
            r.read(&mut buf).unwrap_err().kind(),
            io::ErrorKind::ConnectionAborted
        );
        // A reader that retries interrupted reads gives up too.
        let mut exact = [0u8; 10];
        assert!(io::BufReader::new(r).read_exact(&mut exact).is_err());
    }
}
