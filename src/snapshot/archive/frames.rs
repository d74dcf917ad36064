//! [`FrameReader`]: splits an archive into its zstd frames without decompressing them, hashing
//! every byte for the content root, so frames can be decompressed on other threads.
//!
//! Only the subset of the zstd frame format that archives use is accepted: a regular frame
//! (magic `28 B5 2F FD`) with its content size in the header, no dictionary, no checksum, and
//! blocks of at most 128 KiB. Sizes are checked before anything is allocated, so a hostile
//! archive cannot make a reader hold more than one bounded frame.

use std::io::{self, Read};

use super::ArchiveError;
use crate::bank_hash::{MAX_KEY_LEN, MAX_VALUE_LEN};
use crate::hash::ContentRoot;

/// zstd frame magic number, little-endian.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];

/// Largest block of a zstd frame.
const MAX_BLOCK: usize = 128 << 10;

/// Largest decompressed frame: a segment holding one record of the largest key and value.
pub(crate) const MAX_FRAME_BYTES: usize = 8 + MAX_KEY_LEN + MAX_VALUE_LEN;

/// One zstd frame of an archive, still compressed.
#[derive(Debug, Clone)]
pub(crate) struct Frame {
    /// Frame number: 0 is the header, the last is the end record.
    pub index: u64,
    /// The compressed frame.
    pub bytes: Vec<u8>,
    /// Its decompressed size, from its header (at most [`MAX_FRAME_BYTES`]).
    pub content_size: usize,
}

/// Reads an archive frame by frame (see the module docs).
#[derive(Debug)]
pub(crate) struct FrameReader<R> {
    input: R,
    hasher: blake3::Hasher,
    next_index: u64,
    read: u64,
}

fn bad(frame: u64, reason: impl Into<String>) -> ArchiveError {
    ArchiveError::BadFrame {
        frame,
        reason: reason.into(),
    }
}

impl<R: Read> FrameReader<R> {
    /// Reads frames from `input` (buffer it: frames are read in small pieces).
    pub(crate) fn new(input: R) -> Self {
        Self {
            input,
            hasher: blake3::Hasher::new(),
            next_index: 0,
            read: 0,
        }
    }

    /// Reads exactly `buf.len()` bytes, hashing them. `Ok(false)` on a clean end of input
    /// before the first byte when `eof_ok`.
    fn fill(&mut self, buf: &mut [u8], eof_ok: bool) -> Result<bool, ArchiveError> {
        let mut at = 0;
        while at < buf.len() {
            match self.input.read(&mut buf[at..]) {
                Ok(0) if at == 0 && eof_ok => return Ok(false),
                Ok(0) => return Err(ArchiveError::Truncated),
                Ok(n) => at += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.hasher.update(buf);
        self.read += buf.len() as u64;
        Ok(true)
    }

    /// The next frame, or `None` at the end of the input (exactly at a frame boundary).
    pub(crate) fn next_frame(&mut self) -> Result<Option<Frame>, ArchiveError> {
        let index = self.next_index;
        let mut head = [0u8; 5];
        if !self.fill(&mut head[..4], true)? {
            return Ok(None);
        }
        if head[..4] != ZSTD_MAGIC {
            return Err(bad(index, "not a zstd frame"));
        }
        self.fill(&mut head[4..5], false)?;
        let fhd = head[4];
        let fcs_flag = fhd >> 6;
        let single_segment = fhd & 0x20 != 0;
        if fhd & 0x08 != 0 {
            return Err(bad(index, "reserved bit set"));
        }
        if fhd & 0x04 != 0 {
            return Err(bad(index, "has a checksum"));
        }
        if fhd & 0x03 != 0 {
            return Err(bad(index, "uses a dictionary"));
        }
        let window_len = usize::from(!single_segment);
        let fcs_len = match fcs_flag {
            0 if single_segment => 1,
            0 => return Err(bad(index, "no content size in its header")),
            1 => 2,
            2 => 4,
            _ => 8,
        };
        let mut rest = [0u8; 9];
        let rest = &mut rest[..window_len + fcs_len];
        self.fill(rest, false)?;
        let fcs = &rest[window_len..];
        let mut le = [0u8; 8];
        le[..fcs.len()].copy_from_slice(fcs);
        let mut content_size = u64::from_le_bytes(le);
        if fcs_len == 2 {
            content_size += 256;
        }
        if content_size > MAX_FRAME_BYTES as u64 {
            return Err(bad(
                index,
                format!("content size {content_size} over the limit"),
            ));
        }
        let content_size = content_size as usize;
        let mut bytes = Vec::with_capacity(5 + rest.len() + content_size.min(SEGMENT_HINT) + 64);
        bytes.extend_from_slice(&head);
        bytes.extend_from_slice(rest);
        self.read_blocks(index, &mut bytes, content_size)?;
        self.next_index += 1;
        Ok(Some(Frame {
            index,
            bytes,
            content_size,
        }))
    }

    /// Reads frame `index`'s blocks into `bytes` (which holds its header), up to the last one,
    /// refusing a frame larger than its `content_size` allows.
    fn read_blocks(
        &mut self,
        index: u64,
        bytes: &mut Vec<u8>,
        content_size: usize,
    ) -> Result<(), ArchiveError> {
        // Each block stores at most 128 KiB and costs a 3-byte header, so a frame of honest
        // blocks is never much larger than its content.
        let max_len = bytes.len() + content_size + 3 * (content_size / MAX_BLOCK + 2);
        loop {
            let mut bh = [0u8; 3];
            self.fill(&mut bh, false)?;
            bytes.extend_from_slice(&bh);
            let header = u32::from(bh[0]) | u32::from(bh[1]) << 8 | u32::from(bh[2]) << 16;
            let last = header & 1 != 0;
            let block_type = (header >> 1) & 3;
            let size = (header >> 3) as usize;
            if size > MAX_BLOCK {
                return Err(bad(index, "block larger than 128 KiB"));
            }
            let stored = match block_type {
                0 | 2 => size,
                1 => 1,
                _ => return Err(bad(index, "reserved block type")),
            };
            if bytes.len() + stored > max_len {
                return Err(bad(index, "frame larger than its content allows"));
            }
            let start = bytes.len();
            bytes.resize(start + stored, 0);
            self.fill(&mut bytes[start..], false)?;
            if last {
                break;
            }
        }
        Ok(())
    }

    /// The BLAKE3 hash of every byte read so far: the content root, once all is read.
    pub(crate) fn root(&self) -> ContentRoot {
        ContentRoot::from(self.hasher.finalize())
    }

    /// Bytes read so far.
    pub(crate) fn bytes_read(&self) -> u64 {
        self.read
    }

    /// Reads and hashes whatever follows, to the end of the input; returns how many bytes.
    pub(crate) fn drain(&mut self) -> Result<u64, ArchiveError> {
        let mut buf = vec![0u8; 1 << 16];
        let mut n = 0u64;
        loop {
            match self.input.read(&mut buf) {
                Ok(0) => return Ok(n),
                Ok(k) => {
                    self.hasher.update(&buf[..k]);
                    self.read += k as u64;
                    n += k as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Capacity reserved up front for a frame's bytes, however large its header says it is; the
/// rest grows as blocks arrive, so a lying header costs nothing.
const SEGMENT_HINT: usize = 256 << 10;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_split_exactly_and_hashed() {
        let a = zstd::bulk::compress(&vec![7u8; 300_000], 1).unwrap();
        let b = zstd::bulk::compress(b"hello", 3).unwrap();
        let c = zstd::bulk::compress(b"", 1).unwrap();
        let mut all = a.clone();
        all.extend_from_slice(&b);
        all.extend_from_slice(&c);
        let mut r = FrameReader::new(&all[..]);
        let f = r.next_frame().unwrap().unwrap();
        assert_eq!(
            (f.index, f.bytes.len(), f.content_size),
            (0, a.len(), 300_000)
        );
        let f = r.next_frame().unwrap().unwrap();
        assert_eq!((f.bytes, f.content_size), (b.clone(), 5));
        let f = r.next_frame().unwrap().unwrap();
        assert_eq!((f.bytes, f.content_size), (c, 0));
        assert!(r.next_frame().unwrap().is_none());
        assert_eq!(r.root(), ContentRoot::from(blake3::hash(&all)));
    }

    #[test]
    fn malformed_frames_are_refused_without_allocating_what_they_claim() {
        let good = zstd::bulk::compress(b"hello", 1).unwrap();
        let refuse = |bytes: &[u8]| FrameReader::new(bytes).next_frame().unwrap_err();
        assert!(matches!(refuse(b"nope"), ArchiveError::BadFrame { .. }));
        assert!(matches!(
            refuse(&good[..good.len() - 1]),
            ArchiveError::Truncated
        ));
        // A header claiming a content size of 2^60.
        let mut huge = vec![0x28, 0xB5, 0x2F, 0xFD, 0xE0];
        huge.extend_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(matches!(refuse(&huge), ArchiveError::BadFrame { .. }));
        // With a checksum.
        let mut c = zstd::bulk::Compressor::new(1).unwrap();
        c.include_checksum(true).unwrap();
        let summed = c.compress(b"hello").unwrap();
        assert!(matches!(refuse(&summed), ArchiveError::BadFrame { .. }));
        // A block claiming far more than the content size.
        let mut lying = good[..good.len() - 8].to_vec();
        lying.extend_from_slice(&[0xF9, 0xFF, 0x0F]);
        assert!(matches!(
            FrameReader::new(&lying[..]).next_frame(),
            Err(ArchiveError::BadFrame { .. } | ArchiveError::Truncated)
        ));
    }
}
