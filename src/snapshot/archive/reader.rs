//! [`Assembler`]: the checks that span segments (order across them, canonical cuts, counts,
//! limits, the end record and the bank hash), and [`ArchiveReader`], a one-thread reader on top.

use std::io::Read;

use super::frames::FrameReader;
use super::segment::{Records, Segment, decode_segment};
use super::{
    ArchiveError, ArchiveSummary, END_LEN, HEADER_LEN, Header, Record, SEGMENT_BYTES, SnapshotKind,
};
use crate::bank_hash::Lattice;
use crate::hash::ContentRoot;

/// Checks decoded segments, fed in archive order, against each other and the end record.
#[derive(Debug)]
pub(crate) struct Assembler {
    header: Option<Header>,
    last_key: Vec<u8>,
    last_segment_bytes: Option<usize>,
    records: u64,
    state_bytes: u64,
    max_records: u64,
    max_state_bytes: u64,
    lattice: Lattice,
    summary: Option<ArchiveSummary>,
}

impl Assembler {
    /// An assembler that refuses more than `max_records` records or `max_state_bytes` bytes of
    /// uncompressed stream (from the manifest, or a loader's limits).
    pub(crate) fn new(max_records: u64, max_state_bytes: u64) -> Self {
        Self {
            header: None,
            last_key: Vec::new(),
            last_segment_bytes: None,
            records: 0,
            state_bytes: 0,
            max_records,
            max_state_bytes,
            lattice: Lattice::new(),
            summary: None,
        }
    }

    /// The header, once the first segment is in.
    pub(crate) fn header(&self) -> Option<&Header> {
        self.header.as_ref()
    }

    /// The archive's kind, once the header is in.
    pub(crate) fn kind(&self) -> Option<SnapshotKind> {
        self.header.map(|h| h.kind)
    }

    /// The summary, once the end record is in and checked.
    pub(crate) fn summary(&self) -> Option<ArchiveSummary> {
        self.summary
    }

    /// For a full archive: the lattice of the records so far.
    pub(crate) fn lattice(&self) -> &Lattice {
        &self.lattice
    }

    fn count_bytes(&mut self, n: usize) -> Result<(), ArchiveError> {
        self.state_bytes += n as u64;
        if self.state_bytes > self.max_state_bytes {
            return Err(ArchiveError::OverLimit {
                what: "bytes of records",
                limit: self.max_state_bytes,
            });
        }
        Ok(())
    }

    /// Takes the next segment. For records, checks them against what came before; a full
    /// archive's records are summed into its lattice (unless the decoder already did).
    pub(crate) fn push(&mut self, segment: &Segment) -> Result<(), ArchiveError> {
        if self.summary.is_some() {
            return Err(ArchiveError::TrailingData);
        }
        match segment {
            Segment::Header(h) => {
                if self.header.is_some() {
                    return Err(ArchiveError::BadHeader("a second header"));
                }
                self.count_bytes(HEADER_LEN)?;
                self.header = Some(*h);
                Ok(())
            }
            Segment::Records(r) => {
                let header = self.header.ok_or(ArchiveError::BadHeader("missing"))?;
                self.push_records(header.kind, r)
            }
            Segment::End { count, bank_hash } => {
                let header = self.header.ok_or(ArchiveError::BadHeader("missing"))?;
                self.count_bytes(END_LEN)?;
                if *count != self.records {
                    return Err(ArchiveError::CountMismatch {
                        trailer: *count,
                        actual: self.records,
                    });
                }
                if header.kind == SnapshotKind::Full {
                    let computed = self.lattice.bank_hash(header.slot);
                    if computed != *bank_hash {
                        return Err(ArchiveError::BankHashMismatch {
                            trailer: *bank_hash,
                            computed,
                        });
                    }
                }
                self.summary = Some(ArchiveSummary {
                    header,
                    bank_hash: *bank_hash,
                    record_count: self.records,
                    state_bytes: self.state_bytes,
                });
                Ok(())
            }
        }
    }

    fn push_records(&mut self, kind: SnapshotKind, r: &Records) -> Result<(), ArchiveError> {
        if self.records > 0 && r.first_key() <= self.last_key.as_slice() {
            return Err(ArchiveError::Unsorted {
                index: self.records,
            });
        }
        if let Some(prev) = self.last_segment_bytes
            && prev + r.first_record_len() <= SEGMENT_BYTES
        {
            return Err(ArchiveError::NonCanonicalSegment { frame: r.index });
        }
        self.records += r.len() as u64;
        if self.records > self.max_records {
            return Err(ArchiveError::OverLimit {
                what: "records",
                limit: self.max_records,
            });
        }
        self.count_bytes(r.bytes())?;
        if kind == SnapshotKind::Full {
            match &r.lattice {
                Some(sum) => self.lattice.add(sum),
                None => {
                    for rec in r.iter() {
                        self.lattice.insert(rec.key, rec.value.unwrap_or_default());
                    }
                }
            }
        }
        self.last_key.clear();
        self.last_key.extend_from_slice(r.last_key());
        self.last_segment_bytes = Some(r.bytes());
        Ok(())
    }
}

/// Reads an archive on one thread, record by record, with every check of the format.
pub struct ArchiveReader<R: Read> {
    frames: FrameReader<R>,
    decompressor: zstd::bulk::Decompressor<'static>,
    assembler: Assembler,
    current: Option<Records>,
    next: usize,
}

impl<R: Read> ArchiveReader<R> {
    /// Opens an archive and reads its header. No limits beyond the format's.
    pub fn new(input: R) -> Result<Self, ArchiveError> {
        Self::with_limits(input, u64::MAX, u64::MAX)
    }

    /// Opens an archive, refusing more than `max_records` records or `max_state_bytes` bytes.
    pub fn with_limits(
        input: R,
        max_records: u64,
        max_state_bytes: u64,
    ) -> Result<Self, ArchiveError> {
        let mut reader = Self {
            frames: FrameReader::new(input),
            decompressor: zstd::bulk::Decompressor::new()?,
            assembler: Assembler::new(max_records, max_state_bytes),
            current: None,
            next: 0,
        };
        let frame = reader.frames.next_frame()?.ok_or(ArchiveError::Truncated)?;
        let segment = decode_segment(&frame, None, false, &mut reader.decompressor)?;
        reader.assembler.push(&segment)?;
        Ok(reader)
    }

    /// The header.
    pub fn header(&self) -> Header {
        *self.assembler.header().expect("read by new")
    }

    /// The next record, or `None` after the last one (the end record has then been checked).
    pub fn next_record(&mut self) -> Result<Option<Record<'_>>, ArchiveError> {
        loop {
            if let Some(seg) = &self.current
                && self.next < seg.len()
            {
                break;
            }
            self.current = None;
            if self.assembler.summary().is_some() {
                return Ok(None);
            }
            let frame = self.frames.next_frame()?.ok_or(ArchiveError::Truncated)?;
            let segment =
                decode_segment(&frame, self.assembler.kind(), false, &mut self.decompressor)?;
            self.assembler.push(&segment)?;
            if let Segment::Records(r) = segment {
                self.current = Some(r);
                self.next = 0;
            } else if self.frames.drain()? > 0 {
                return Err(ArchiveError::TrailingData);
            }
        }
        let i = self.next;
        self.next += 1;
        Ok(self.current.as_ref().map(|s| s.get(i)))
    }

    /// What the archive holds, once [`ArchiveReader::next_record`] has returned `None`.
    pub fn summary(&self) -> Option<ArchiveSummary> {
        self.assembler.summary()
    }

    /// The content root of everything read so far (the whole archive, once it is all read).
    pub fn root(&self) -> ContentRoot {
        self.frames.root()
    }

    /// Reads (and hashes) whatever is left of the input.
    pub fn drain(&mut self) -> Result<u64, ArchiveError> {
        self.frames.drain()
    }
}
