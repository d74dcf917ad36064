//! The snapshot archive: a zstd-compressed, canonical record stream of the state at one slot.
//!
//! ```text
//! archive = zstd( header || record* || end )
//! header  = "SNAPSYNC" || u32_le(format_version = 1) || u64_le(slot)
//! record  = u32_le(len(key)) || key || u32_le(len(value)) || value     keys strictly ascending
//! end     = u32_le(0xFFFF_FFFF) || u64_le(entry_count) || bank_hash[32]
//! ```
//!
//! The records are exactly the bytes the bank hash is computed over (see [`crate::bank_hash`]),
//! so a writer hashes what it compresses and a reader checks the trailer against what it read.
//! With the same zstd version and level, the same state gives the same archive bytes on every
//! node, hence the same content root.

use std::io::{self, BufRead, BufReader, Read, Write};

use crate::bank_hash::{self, BankHasher, MAX_KEY_LEN, MAX_VALUE_LEN};
use crate::hash::BankHash;
use crate::snapshot::FORMAT_VERSION;

/// The 8 bytes every archive starts with (after decompression).
pub const MAGIC: [u8; 8] = *b"SNAPSYNC";

/// The zstd level archives are written with unless configured otherwise. Level 1 was measured
/// fastest per byte saved on snapshot-like state (see the README's benchmark section).
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;

/// Key-length value that marks the end of the records.
const END_MARK: u32 = u32::MAX;

/// Records are gathered into a buffer of this size before they are hashed and compressed.
const RECORD_BUFFER: usize = 256 << 10;

/// One entry of the state: key and value.
pub type Entry<'a> = (&'a [u8], &'a [u8]);

/// What an archive holds, known once it is completely written or read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArchiveSummary {
    /// Slot of the state.
    pub slot: u64,
    /// Bank hash of the state.
    pub bank_hash: BankHash,
    /// Number of entries.
    pub entry_count: u64,
    /// Bytes of the uncompressed stream (header, records, end).
    pub state_bytes: u64,
}

/// An archive could not be read (or an entry could not be written).
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// Reading or decompressing failed.
    #[error("archive I/O: {0}")]
    Io(#[source] io::Error),
    /// The stream does not start with [`MAGIC`].
    #[error("not a snapsync archive (bad magic)")]
    BadMagic,
    /// A format version this crate does not read.
    #[error("archive format version {0} is not supported (this build reads {FORMAT_VERSION})")]
    UnsupportedVersion(u32),
    /// The stream ended before its end marker and trailer.
    #[error("archive is truncated")]
    Truncated,
    /// A key longer than [`bank_hash::MAX_KEY_LEN`].
    #[error("entry {index}: key of {len} bytes exceeds the limit")]
    KeyTooLong {
        /// Entry number.
        index: u64,
        /// Length claimed.
        len: u64,
    },
    /// A value longer than [`bank_hash::MAX_VALUE_LEN`].
    #[error("entry {index}: value of {len} bytes exceeds the limit")]
    ValueTooLong {
        /// Entry number.
        index: u64,
        /// Length claimed.
        len: u64,
    },
    /// A key not strictly greater than the one before it.
    #[error("entry {index}: keys are not in strictly ascending order")]
    Unsorted {
        /// Entry number.
        index: u64,
    },
    /// The trailer's entry count differs from the records read.
    #[error("trailer says {trailer} entries, the archive holds {actual}")]
    CountMismatch {
        /// Count in the trailer.
        trailer: u64,
        /// Records read.
        actual: u64,
    },
    /// The trailer's bank hash differs from the hash of the records read.
    #[error("trailer bank hash {trailer} differs from the records' bank hash {computed}")]
    BankHashMismatch {
        /// Hash in the trailer.
        trailer: BankHash,
        /// Hash of the records.
        computed: BankHash,
    },
    /// Bytes follow the trailer.
    #[error("data follows the archive trailer")]
    TrailingData,
}

impl From<io::Error> for ArchiveError {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            ArchiveError::Truncated
        } else {
            ArchiveError::Io(e)
        }
    }
}

/// Writes an archive, entry by entry, in one pass and bounded memory.
pub struct ArchiveWriter<W: Write> {
    encoder: zstd::stream::write::Encoder<'static, W>,
    hasher: BankHasher,
    slot: u64,
    buf: Vec<u8>,
    buffered: u64,
    last_key: Vec<u8>,
    state_bytes: u64,
}

impl<W: Write> ArchiveWriter<W> {
    /// Starts an archive of the state at `slot`, compressed at `zstd_level`.
    pub fn new(out: W, slot: u64, zstd_level: i32) -> io::Result<Self> {
        let mut encoder = zstd::stream::write::Encoder::new(out, zstd_level)?;
        encoder.include_checksum(false)?;
        let mut header = Vec::with_capacity(20);
        header.extend_from_slice(&MAGIC);
        header.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        header.extend_from_slice(&slot.to_le_bytes());
        encoder.write_all(&header)?;
        Ok(Self {
            encoder,
            hasher: BankHasher::new(slot),
            slot,
            buf: Vec::with_capacity(RECORD_BUFFER + 4096),
            buffered: 0,
            last_key: Vec::new(),
            state_bytes: header.len() as u64,
        })
    }

    /// Appends one entry. Keys must be strictly ascending; an entry out of order or over the
    /// size limits is refused with [`io::ErrorKind::InvalidInput`].
    pub fn push(&mut self, key: &[u8], value: &[u8]) -> io::Result<()> {
        let index = self.hasher.entries() + self.buffered;
        if key.len() > MAX_KEY_LEN || value.len() > MAX_VALUE_LEN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "entry {index} is too large (key {} bytes, value {} bytes)",
                    key.len(),
                    value.len()
                ),
            ));
        }
        if index > 0 && key <= self.last_key.as_slice() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                ArchiveError::Unsorted { index },
            ));
        }
        self.last_key.clear();
        self.last_key.extend_from_slice(key);
        bank_hash::encode_record(&mut self.buf, key, value);
        self.buffered += 1;
        if self.buf.len() >= RECORD_BUFFER {
            self.flush_records()?;
        }
        Ok(())
    }

    fn flush_records(&mut self) -> io::Result<()> {
        self.hasher.update_records(&self.buf, self.buffered);
        self.encoder.write_all(&self.buf)?;
        self.state_bytes += self.buf.len() as u64;
        self.buf.clear();
        self.buffered = 0;
        Ok(())
    }

    /// Writes the end marker and trailer and finishes compression. Returns the output and what
    /// the archive holds.
    pub fn finish(mut self) -> io::Result<(W, ArchiveSummary)> {
        self.flush_records()?;
        let bank_hash = self.hasher.finalize();
        let entry_count = self.hasher.entries();
        let mut end = Vec::with_capacity(44);
        end.extend_from_slice(&END_MARK.to_le_bytes());
        end.extend_from_slice(&entry_count.to_le_bytes());
        end.extend_from_slice(bank_hash.as_bytes());
        self.encoder.write_all(&end)?;
        let out = self.encoder.finish()?;
        Ok((
            out,
            ArchiveSummary {
                slot: self.slot,
                bank_hash,
                entry_count,
                state_bytes: self.state_bytes + end.len() as u64,
            },
        ))
    }
}

/// Reads an archive entry by entry, checking order, limits, the trailer and the bank hash.
pub struct ArchiveReader<R: BufRead> {
    stream: BufReader<zstd::stream::read::Decoder<'static, R>>,
    slot: u64,
    hasher: BankHasher,
    key: Vec<u8>,
    value: Vec<u8>,
    state_bytes: u64,
    summary: Option<ArchiveSummary>,
}

impl<R: BufRead> ArchiveReader<R> {
    /// Opens an archive and reads its header.
    pub fn new(input: R) -> Result<Self, ArchiveError> {
        let decoder = zstd::stream::read::Decoder::with_buffer(input)?;
        let mut stream = BufReader::with_capacity(256 << 10, decoder);
        let mut header = [0u8; 20];
        stream.read_exact(&mut header)?;
        if header[..8] != MAGIC {
            return Err(ArchiveError::BadMagic);
        }
        let version = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
        if version != FORMAT_VERSION {
            return Err(ArchiveError::UnsupportedVersion(version));
        }
        let slot = u64::from_le_bytes(header[12..20].try_into().expect("8 bytes"));
        Ok(Self {
            stream,
            slot,
            hasher: BankHasher::new(slot),
            key: Vec::new(),
            value: Vec::new(),
            state_bytes: header.len() as u64,
            summary: None,
        })
    }

    /// Slot named in the header.
    pub fn slot(&self) -> u64 {
        self.slot
    }

    /// The next entry, or `None` after the last one (the trailer has then been checked).
    pub fn next_entry(&mut self) -> Result<Option<Entry<'_>>, ArchiveError> {
        if self.summary.is_some() {
            return Ok(None);
        }
        let index = self.hasher.entries();
        let key_len = self.read_u32()?;
        if key_len == END_MARK {
            self.read_trailer()?;
            return Ok(None);
        }
        if key_len as usize > MAX_KEY_LEN {
            return Err(ArchiveError::KeyTooLong {
                index,
                len: key_len.into(),
            });
        }
        // The previous key is still in `self.key`; read the new one beside it to compare.
        let mut key = std::mem::take(&mut self.value);
        key.resize(key_len as usize, 0);
        self.stream.read_exact(&mut key)?;
        if index > 0 && key <= self.key {
            return Err(ArchiveError::Unsorted { index });
        }
        let value_len = self.read_u32()?;
        if value_len as usize > MAX_VALUE_LEN {
            return Err(ArchiveError::ValueTooLong {
                index,
                len: value_len.into(),
            });
        }
        let mut value = std::mem::replace(&mut self.key, key);
        value.resize(value_len as usize, 0);
        self.stream.read_exact(&mut value)?;
        self.value = value;
        self.hasher.update(&self.key, &self.value);
        self.state_bytes += 8 + u64::from(key_len) + u64::from(value_len);
        Ok(Some((&self.key, &self.value)))
    }

    fn read_u32(&mut self) -> Result<u32, ArchiveError> {
        let mut b = [0u8; 4];
        self.stream.read_exact(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn read_trailer(&mut self) -> Result<(), ArchiveError> {
        let mut t = [0u8; 40];
        self.stream.read_exact(&mut t)?;
        let trailer_count = u64::from_le_bytes(t[..8].try_into().expect("8 bytes"));
        let trailer_hash = BankHash::from_slice(&t[8..]).expect("32 bytes");
        let actual = self.hasher.entries();
        if trailer_count != actual {
            return Err(ArchiveError::CountMismatch {
                trailer: trailer_count,
                actual,
            });
        }
        let computed = self.hasher.finalize();
        if computed != trailer_hash {
            return Err(ArchiveError::BankHashMismatch {
                trailer: trailer_hash,
                computed,
            });
        }
        let mut probe = [0u8; 1];
        if self.stream.read(&mut probe)? != 0 {
            return Err(ArchiveError::TrailingData);
        }
        self.summary = Some(ArchiveSummary {
            slot: self.slot,
            bank_hash: computed,
            entry_count: actual,
            state_bytes: self.state_bytes + 4 + 40,
        });
        Ok(())
    }

    /// What the archive holds, once [`ArchiveReader::next_entry`] has returned `None`.
    pub fn summary(&self) -> Option<ArchiveSummary> {
        self.summary
    }

    /// Gives back the input, positioned somewhere after what was read.
    pub fn into_inner(self) -> R {
        self.stream.into_inner().finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(entries: &[(&[u8], &[u8])]) -> (Vec<u8>, ArchiveSummary) {
        let mut w = ArchiveWriter::new(Vec::new(), 9, DEFAULT_ZSTD_LEVEL).unwrap();
        for (k, v) in entries {
            w.push(k, v).unwrap();
        }
        w.finish().unwrap()
    }

    #[test]
    fn round_trip() {
        let (bytes, summary) = archive(&[(b"", b"empty key"), (b"a", b""), (b"b", b"2")]);
        let mut r = ArchiveReader::new(&bytes[..]).unwrap();
        assert_eq!(r.slot(), 9);
        let mut got = Vec::new();
        while let Some((k, v)) = r.next_entry().unwrap() {
            got.push((k.to_vec(), v.to_vec()));
        }
        assert_eq!(got.len(), 3);
        assert_eq!(got[0], (b"".to_vec(), b"empty key".to_vec()));
        assert_eq!(r.summary(), Some(summary));
        let mut h = BankHasher::new(9);
        h.update(b"", b"empty key");
        h.update(b"a", b"");
        h.update(b"b", b"2");
        assert_eq!(summary.bank_hash, h.finalize());
    }

    #[test]
    fn writer_refuses_unsorted_and_duplicate_keys() {
        let mut w = ArchiveWriter::new(Vec::new(), 1, 1).unwrap();
        w.push(b"b", b"").unwrap();
        assert_eq!(
            w.push(b"a", b"").unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        assert_eq!(
            w.push(b"b", b"").unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
    }

    #[test]
    fn reader_refuses_bad_streams() {
        let raw = |body: &[u8]| zstd::encode_all(body, 1).unwrap();
        let mut header = MAGIC.to_vec();
        header.extend_from_slice(&1u32.to_le_bytes());
        header.extend_from_slice(&5u64.to_le_bytes());

        assert!(matches!(
            ArchiveReader::new(&raw(b"NOTSNAPSxxxxxxxxxxxx")[..]),
            Err(ArchiveError::BadMagic)
        ));
        let mut v2 = header.clone();
        v2[8] = 2;
        assert!(matches!(
            ArchiveReader::new(&raw(&v2)[..]),
            Err(ArchiveError::UnsupportedVersion(2))
        ));

        // Truncated: header and half a record.
        let mut cut = header.clone();
        cut.extend_from_slice(&3u32.to_le_bytes());
        cut.extend_from_slice(b"ab");
        let bytes = raw(&cut);
        let mut r = ArchiveReader::new(&bytes[..]).unwrap();
        assert!(matches!(r.next_entry(), Err(ArchiveError::Truncated)));

        // A key length over the limit.
        let mut big = header.clone();
        big.extend_from_slice(&(MAX_KEY_LEN as u32 + 1).to_le_bytes());
        let bytes = raw(&big);
        let mut r = ArchiveReader::new(&bytes[..]).unwrap();
        assert!(matches!(
            r.next_entry(),
            Err(ArchiveError::KeyTooLong { index: 0, .. })
        ));

        // Unsorted records.
        let mut unsorted = header.clone();
        bank_hash::encode_record(&mut unsorted, b"b", b"");
        bank_hash::encode_record(&mut unsorted, b"a", b"");
        let bytes = raw(&unsorted);
        let mut r = ArchiveReader::new(&bytes[..]).unwrap();
        r.next_entry().unwrap();
        assert!(matches!(
            r.next_entry(),
            Err(ArchiveError::Unsorted { index: 1 })
        ));

        // A trailer with a wrong hash.
        let mut lying = header.clone();
        bank_hash::encode_record(&mut lying, b"a", b"1");
        lying.extend_from_slice(&END_MARK.to_le_bytes());
        lying.extend_from_slice(&1u64.to_le_bytes());
        lying.extend_from_slice(&[0u8; 32]);
        let bytes = raw(&lying);
        let mut r = ArchiveReader::new(&bytes[..]).unwrap();
        r.next_entry().unwrap();
        assert!(matches!(
            r.next_entry(),
            Err(ArchiveError::BankHashMismatch { .. })
        ));
    }
}
