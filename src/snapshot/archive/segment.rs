//! [`decode_segment`]: one frame of an archive, decompressed and parsed on its own (any thread).

use super::frames::Frame;
use super::{ArchiveError, END_LEN, HEADER_LEN, Header, MARK, SEGMENT_BYTES, SnapshotKind};
use crate::bank_hash::{Lattice, MAX_KEY_LEN, MAX_VALUE_LEN};
use crate::hash::BankHash;

/// One record: a key and its value, or `None` for a deletion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    /// The key.
    pub key: &'a [u8],
    /// The value, `None` when the key is deleted (incremental archives only).
    pub value: Option<&'a [u8]>,
}

/// A decoded frame.
#[derive(Debug)]
pub(crate) enum Segment {
    /// Frame 0: the header.
    Header(Header),
    /// Records, checked in themselves (lengths, order, kind), not yet against their neighbours.
    Records(Records),
    /// The end record.
    End {
        /// Records in the archive, as the end record says.
        count: u64,
        /// Bank hash of the state at the archive's slot.
        bank_hash: BankHash,
    },
}

/// The records of one segment.
#[derive(Debug)]
pub(crate) struct Records {
    /// Frame number.
    pub index: u64,
    data: Vec<u8>,
    /// Per record: key offset, key length, value offset, value length (or [`MARK`]).
    spans: Vec<[u32; 4]>,
    /// When decoded with the lattice: the sum of the elements of its records that hold a value
    /// (for a full archive, its share of the state's lattice).
    pub lattice: Option<Box<Lattice>>,
}

impl Records {
    /// Number of records.
    pub(crate) fn len(&self) -> usize {
        self.spans.len()
    }

    /// Bytes of the decompressed segment.
    pub(crate) fn bytes(&self) -> usize {
        self.data.len()
    }

    /// The `i`th record.
    pub(crate) fn get(&self, i: usize) -> Record<'_> {
        let [ko, kl, vo, vl] = self.spans[i];
        let key = &self.data[ko as usize..(ko + kl) as usize];
        let value = (vl != MARK).then(|| &self.data[vo as usize..(vo + vl) as usize]);
        Record { key, value }
    }

    /// The records in order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = Record<'_>> + '_ {
        (0..self.spans.len()).map(|i| self.get(i))
    }

    /// The first key.
    pub(crate) fn first_key(&self) -> &[u8] {
        self.get(0).key
    }

    /// The last key.
    pub(crate) fn last_key(&self) -> &[u8] {
        self.get(self.spans.len() - 1).key
    }

    /// Bytes the first record takes in the stream.
    pub(crate) fn first_record_len(&self) -> usize {
        let r = self.get(0);
        super::record_len(r.key, r.value)
    }
}

fn bad(frame: u64, reason: impl Into<String>) -> ArchiveError {
    ArchiveError::BadFrame {
        frame,
        reason: reason.into(),
    }
}

/// Decompresses and parses one frame. `kind` is the archive's kind (from its header; `None`
/// for frame 0); with `lattice`, the records that hold a value are also summed into their
/// lattice (the expensive part, done here so that it runs in parallel).
pub(crate) fn decode_segment(
    frame: &Frame,
    kind: Option<SnapshotKind>,
    lattice: bool,
    decompressor: &mut zstd::bulk::Decompressor<'_>,
) -> Result<Segment, ArchiveError> {
    let mut data = Vec::with_capacity(frame.content_size);
    let n = decompressor
        .decompress_to_buffer(&frame.bytes[..], &mut data)
        .map_err(|e| bad(frame.index, format!("zstd: {e}")))?;
    if n != frame.content_size {
        return Err(bad(frame.index, "content size differs from the header"));
    }
    if frame.index == 0 {
        if data.len() != HEADER_LEN {
            return Err(ArchiveError::BadHeader("wrong length"));
        }
        return Header::decode(&data).map(Segment::Header);
    }
    let kind = kind.ok_or(ArchiveError::BadHeader("missing"))?;
    if data.len() >= 4 && data[..4] == MARK.to_le_bytes() {
        if data.len() != END_LEN {
            return Err(bad(frame.index, "end record of the wrong length"));
        }
        return Ok(Segment::End {
            count: u64::from_le_bytes(data[4..12].try_into().expect("8 bytes")),
            bank_hash: BankHash::from_slice(&data[12..44]).expect("32 bytes"),
        });
    }
    if data.is_empty() {
        return Err(bad(frame.index, "empty segment"));
    }
    let (spans, sum) = parse_records(&data, frame.index, kind, lattice)?;
    Ok(Segment::Records(Records {
        index: frame.index,
        data,
        spans,
        lattice: sum.map(Box::new),
    }))
}

/// The records of segment `frame`'s decompressed `data`: their spans (key offset and length,
/// value offset and length), each checked in itself, against the one before it and against
/// `kind`; with `lattice`, the values summed into one.
fn parse_records(
    data: &[u8],
    frame: u64,
    kind: SnapshotKind,
    lattice: bool,
) -> Result<(Vec<[u32; 4]>, Option<Lattice>), ArchiveError> {
    let u32_at = |data: &[u8], at: usize| -> Option<u32> {
        data.get(at..at + 4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    };
    let mut spans: Vec<[u32; 4]> = Vec::new();
    let mut at = 0usize;
    let mut sum = lattice.then(Lattice::new);
    while at < data.len() {
        let index = spans.len() as u64;
        let kl = u32_at(data, at).ok_or_else(|| bad(frame, "record cut short"))?;
        if kl == MARK {
            return Err(bad(frame, "end record inside a segment"));
        }
        if kl == 0 || kl as usize > MAX_KEY_LEN {
            return Err(ArchiveError::KeyOutOfBounds {
                index,
                len: kl.into(),
            });
        }
        let ko = at + 4;
        let vl_at = ko + kl as usize;
        let vl = u32_at(data, vl_at).ok_or_else(|| bad(frame, "record cut short"))?;
        let vo = vl_at + 4;
        let end = if vl == MARK {
            if kind == SnapshotKind::Full {
                return Err(ArchiveError::DeletionInFull { index });
            }
            vo
        } else {
            if vl as usize > MAX_VALUE_LEN {
                return Err(ArchiveError::ValueTooLong {
                    index,
                    len: vl.into(),
                });
            }
            vo + vl as usize
        };
        if end > data.len() {
            return Err(bad(frame, "record cut short"));
        }
        let key = &data[ko..vl_at];
        if let Some(&[pko, pkl, _, _]) = spans.last() {
            let prev = &data[pko as usize..(pko + pkl) as usize];
            if key <= prev {
                return Err(ArchiveError::Unsorted { index });
            }
        }
        if let Some(sum) = sum.as_mut()
            && vl != MARK
        {
            sum.insert(key, &data[vo..end]);
        }
        spans.push([ko as u32, kl, vo as u32, vl]);
        at = end;
    }
    if spans.len() > 1 && data.len() > SEGMENT_BYTES {
        return Err(ArchiveError::NonCanonicalSegment { frame });
    }
    Ok((spans, sum))
}
