//! The snapshot archive: a zstd-compressed, canonical record stream of the state at one slot.
//!
//! ```text
//! archive = zstd_frame(segment_0) || ... || zstd_frame(segment_n) || zstd_frame(end)
//! segment_i = bytes [i * SEGMENT_BYTES, (i + 1) * SEGMENT_BYTES) of  header || record*
//!             (the last one shorter; none is empty)
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
use std::sync::{Arc, Mutex, mpsc};
use std::thread;

use crate::bank_hash::{BankHasher, MAX_KEY_LEN, MAX_VALUE_LEN};
use crate::hash::BankHash;
use crate::snapshot::FORMAT_VERSION;

/// The 8 bytes every archive starts with (after decompression).
pub const MAGIC: [u8; 8] = *b"SNAPSYNC";

/// The zstd level archives are written with unless configured otherwise. Level 1 was measured
/// fastest per byte saved on snapshot-like state (see the README's benchmark section).
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;

/// Key-length value that marks the end of the records.
const END_MARK: u32 = u32::MAX;

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
    /// A key longer than [`crate::bank_hash::MAX_KEY_LEN`].
    #[error("entry {index}: key of {len} bytes exceeds the limit")]
    KeyTooLong {
        /// Entry number.
        index: u64,
        /// Length claimed.
        len: u64,
    },
    /// A value longer than [`crate::bank_hash::MAX_VALUE_LEN`].
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

/// Size of one segment of the uncompressed stream. Each segment is compressed as its own zstd
/// frame, so segments compress in parallel and the archive bytes do not depend on how many
/// threads made them. 2 MiB costs under 1% of compression ratio against one frame.
pub const SEGMENT_BYTES: usize = 2 << 20;

/// Segments queued for compression beyond those being compressed; bounds a writer's memory to
/// about `(2 * workers + SEGMENT_QUEUE + 2) * 2 * SEGMENT_BYTES`.
const SEGMENT_QUEUE: usize = 2;

/// A pool of segment-sized buffers, so a writer allocates a few and reuses them.
#[derive(Default)]
struct BufferPool(Mutex<Vec<Vec<u8>>>);

impl BufferPool {
    fn take(&self, capacity: usize) -> Vec<u8> {
        let reused = self.0.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut buf = reused.unwrap_or_default();
        buf.clear();
        buf.reserve_exact(capacity);
        buf
    }

    fn give(&self, buf: Vec<u8>) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(buf);
    }
}

/// Length of the header at the start of the stream.
const HEADER_LEN: usize = 20;

/// Work for the compression threads, numbered in stream order.
enum Job {
    /// A segment to compress.
    Segment(u64, Vec<u8>),
    /// All records have been sent: the writer answers with their bank hash once it has seen
    /// every segment before this one.
    Barrier(u64, mpsc::SyncSender<BankHash>),
}

/// What the compression threads hand to the writer.
enum Compressed {
    /// A compressed segment and its input.
    Segment(u64, Vec<u8>, Vec<u8>),
    /// See [`Job::Barrier`].
    Barrier(u64, mpsc::SyncSender<BankHash>),
}

impl Compressed {
    fn seq(&self) -> u64 {
        match self {
            Compressed::Segment(seq, ..) | Compressed::Barrier(seq, _) => *seq,
        }
    }
}

/// Writes an archive, entry by entry, in one pass and bounded memory.
///
/// Records are encoded on the caller's thread; segments are compressed by a few worker threads
/// and written, in order, by another that also computes the bank hash of the records. Reading
/// the DB, compressing, hashing and writing overlap and use every core.
pub struct ArchiveWriter<W: Write + Send + 'static> {
    slot: u64,
    entries: u64,
    segment: Vec<u8>,
    next_seq: u64,
    last_key: Vec<u8>,
    state_bytes: u64,
    pool: Arc<BufferPool>,
    jobs: Option<mpsc::SyncSender<Job>>,
    workers: Vec<thread::JoinHandle<io::Result<()>>>,
    writer: Option<thread::JoinHandle<io::Result<W>>>,
}

fn compress_worker(
    level: i32,
    jobs: Arc<Mutex<mpsc::Receiver<Job>>>,
    done: mpsc::SyncSender<Compressed>,
    pool: Arc<BufferPool>,
) -> io::Result<()> {
    let mut compressor = zstd::bulk::Compressor::new(level)?;
    loop {
        let job = jobs.lock().unwrap_or_else(|p| p.into_inner()).recv();
        let compressed = match job {
            Err(_) => return Ok(()),
            Ok(Job::Barrier(seq, reply)) => Compressed::Barrier(seq, reply),
            Ok(Job::Segment(seq, input)) => {
                let mut output = pool.take(zstd::zstd_safe::compress_bound(input.len()));
                compressor.compress_to_buffer(&input, &mut output)?;
                Compressed::Segment(seq, output, input)
            }
        };
        if done.send(compressed).is_err() {
            return Ok(());
        }
    }
}

/// Writes the compressed segments in order and hashes the records they hold.
fn ordered_writer<W: Write>(
    mut out: W,
    slot: u64,
    done: mpsc::Receiver<Compressed>,
    pool: Arc<BufferPool>,
) -> io::Result<W> {
    let mut hasher = Some(BankHasher::new(slot));
    let mut pending = std::collections::BTreeMap::new();
    let mut next = 0u64;
    for item in done {
        pending.insert(item.seq(), item);
        while let Some(item) = pending.remove(&next) {
            match item {
                Compressed::Segment(seq, output, input) => {
                    out.write_all(&output)?;
                    if let Some(h) = hasher.as_mut() {
                        let skip = if seq == 0 { HEADER_LEN } else { 0 };
                        h.update_raw(&input[skip..]);
                    }
                    pool.give(output);
                    pool.give(input);
                }
                Compressed::Barrier(_, reply) => {
                    if let Some(h) = hasher.take() {
                        let _ = reply.send(h.finalize());
                    }
                }
            }
            next += 1;
        }
    }
    if !pending.is_empty() {
        return Err(io::Error::other("archive segments missing"));
    }
    Ok(out)
}

impl<W: Write + Send + 'static> ArchiveWriter<W> {
    /// Starts an archive of the state at `slot`, compressed at `zstd_level`.
    pub fn new(out: W, slot: u64, zstd_level: i32) -> io::Result<Self> {
        // Check the level here, where the error can be returned, not in a worker.
        zstd::bulk::Compressor::new(zstd_level)?;
        let workers_n = thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .clamp(1, 4);
        let pool = Arc::new(BufferPool::default());
        let (jobs_tx, jobs_rx) = mpsc::sync_channel::<Job>(SEGMENT_QUEUE);
        let (done_tx, done_rx) = mpsc::sync_channel::<Compressed>(workers_n + SEGMENT_QUEUE);
        let jobs_rx = Arc::new(Mutex::new(jobs_rx));
        let mut workers = Vec::with_capacity(workers_n);
        for _ in 0..workers_n {
            let (jobs_rx, done_tx, pool) = (jobs_rx.clone(), done_tx.clone(), pool.clone());
            workers.push(
                thread::Builder::new()
                    .name("snapsync-compress".into())
                    .spawn(move || compress_worker(zstd_level, jobs_rx, done_tx, pool))?,
            );
        }
        drop(done_tx);
        let writer_pool = pool.clone();
        let writer = thread::Builder::new()
            .name("snapsync-write".into())
            .spawn(move || ordered_writer(out, slot, done_rx, writer_pool))?;
        let mut segment = pool.take(SEGMENT_BYTES);
        segment.extend_from_slice(&MAGIC);
        segment.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        segment.extend_from_slice(&slot.to_le_bytes());
        debug_assert_eq!(segment.len(), HEADER_LEN);
        Ok(Self {
            slot,
            entries: 0,
            state_bytes: segment.len() as u64,
            segment,
            next_seq: 0,
            last_key: Vec::new(),
            pool,
            jobs: Some(jobs_tx),
            workers,
            writer: Some(writer),
        })
    }

    /// Appends one entry. Keys must be strictly ascending; an entry out of order or over the
    /// size limits is refused with [`io::ErrorKind::InvalidInput`].
    pub fn push(&mut self, key: &[u8], value: &[u8]) -> io::Result<()> {
        let index = self.entries;
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
        self.append(&(key.len() as u32).to_le_bytes())?;
        self.append(key)?;
        self.append(&(value.len() as u32).to_le_bytes())?;
        self.append(value)?;
        self.entries += 1;
        self.state_bytes += 8 + key.len() as u64 + value.len() as u64;
        Ok(())
    }

    /// Appends record bytes, sending every segment that fills up.
    fn append(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            let room = SEGMENT_BYTES - self.segment.len();
            let n = room.min(bytes.len());
            self.segment.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.segment.len() == SEGMENT_BYTES {
                let next = self.pool.take(SEGMENT_BYTES);
                let full = std::mem::replace(&mut self.segment, next);
                self.send_segment(full)?;
            }
        }
        Ok(())
    }

    fn send_segment(&mut self, segment: Vec<u8>) -> io::Result<()> {
        let seq = self.next_seq;
        self.send(Job::Segment(seq, segment))
    }

    fn send(&mut self, job: Job) -> io::Result<()> {
        self.next_seq += 1;
        let sent = self.jobs.as_ref().map(|tx| tx.send(job));
        if matches!(sent, Some(Ok(()))) {
            return Ok(());
        }
        Err(self.stopped())
    }

    /// The compression or writer threads stopped: joins them and says why.
    fn stopped(&mut self) -> io::Error {
        self.join()
            .err()
            .unwrap_or_else(|| io::Error::other("archive compression stopped"))
    }

    fn join(&mut self) -> io::Result<W> {
        self.jobs = None;
        let mut first_error = None;
        for worker in self.workers.drain(..) {
            let result = worker
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("archive compression thread panicked")));
            if let Err(e) = result {
                first_error.get_or_insert(e);
            }
        }
        let written = match self.writer.take().map(|h| h.join()) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(io::Error::other("archive writer thread panicked")),
            None => Err(io::Error::other("archive writer already stopped")),
        };
        match first_error {
            Some(e) => Err(e),
            None => written,
        }
    }

    /// Writes the end marker and trailer (as the archive's last zstd frame) and finishes.
    /// Returns the output and what the archive holds.
    pub fn finish(mut self) -> io::Result<(W, ArchiveSummary)> {
        if !self.segment.is_empty() {
            let last = std::mem::take(&mut self.segment);
            self.send_segment(last)?;
        }
        let (reply_tx, reply_rx) = mpsc::sync_channel(1);
        self.send(Job::Barrier(self.next_seq, reply_tx))?;
        let Ok(bank_hash) = reply_rx.recv() else {
            return Err(self.stopped());
        };
        let entry_count = self.entries;
        let mut end = self.pool.take(44);
        end.extend_from_slice(&END_MARK.to_le_bytes());
        end.extend_from_slice(&entry_count.to_le_bytes());
        end.extend_from_slice(bank_hash.as_bytes());
        self.state_bytes += end.len() as u64;
        self.send_segment(end)?;
        let out = self.join()?;
        Ok((
            out,
            ArchiveSummary {
                slot: self.slot,
                bank_hash,
                entry_count,
                state_bytes: self.state_bytes,
            },
        ))
    }
}

impl<W: Write + Send + 'static> Drop for ArchiveWriter<W> {
    fn drop(&mut self) {
        if self.writer.is_some() {
            let _ = self.join();
        }
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
    fn many_segments_and_entries_larger_than_a_segment() {
        let big = vec![7u8; SEGMENT_BYTES * 2 + 123];
        let mut w = ArchiveWriter::new(Vec::new(), 3, 1).unwrap();
        let mut h = BankHasher::new(3);
        let mut keys = 0u32;
        for round in 0..3u32 {
            for i in 0..5_000u32 {
                let k = (round * 10_000 + i).to_be_bytes();
                let v = i.to_le_bytes().repeat(50);
                w.push(&k, &v).unwrap();
                h.update(&k, &v);
                keys += 1;
            }
            let k = (round * 10_000 + 9_999).to_be_bytes();
            w.push(&k, &big).unwrap();
            h.update(&k, &big);
            keys += 1;
        }
        let (bytes, summary) = w.finish().unwrap();
        assert_eq!(summary.bank_hash, h.finalize());
        assert_eq!(summary.entry_count, u64::from(keys));
        let mut r = ArchiveReader::new(&bytes[..]).unwrap();
        let mut n = 0u32;
        while let Some((_, v)) = r.next_entry().unwrap() {
            if n % 5_001 == 5_000 {
                assert_eq!(v, &big[..]);
            }
            n += 1;
        }
        assert_eq!(n, keys);
        assert_eq!(r.summary(), Some(summary));
        // Same entries, same bytes.
        let mut again = ArchiveWriter::new(Vec::new(), 3, 1).unwrap();
        for round in 0..3u32 {
            for i in 0..5_000u32 {
                again
                    .push(
                        &(round * 10_000 + i).to_be_bytes(),
                        &i.to_le_bytes().repeat(50),
                    )
                    .unwrap();
            }
            again
                .push(&(round * 10_000 + 9_999).to_be_bytes(), &big)
                .unwrap();
        }
        assert_eq!(again.finish().unwrap().0, bytes);
    }

    /// The archive is exactly what the format description says, built here independently.
    #[test]
    fn bytes_follow_the_format_description() {
        let entries: Vec<(Vec<u8>, Vec<u8>)> = (0..40_000u32)
            .map(|i| (i.to_be_bytes().to_vec(), (i % 7).to_le_bytes().repeat(30)))
            .collect();
        let mut w = ArchiveWriter::new(Vec::new(), 77, 3).unwrap();
        let mut stream = MAGIC.to_vec();
        stream.extend_from_slice(&1u32.to_le_bytes());
        stream.extend_from_slice(&77u64.to_le_bytes());
        let mut h = BankHasher::new(77);
        for (k, v) in &entries {
            w.push(k, v).unwrap();
            crate::bank_hash::encode_record(&mut stream, k, v);
            h.update(k, v);
        }
        let (bytes, summary) = w.finish().unwrap();
        let mut expected = Vec::new();
        for segment in stream.chunks(SEGMENT_BYTES) {
            expected.extend(zstd::bulk::compress(segment, 3).unwrap());
        }
        let mut end = END_MARK.to_le_bytes().to_vec();
        end.extend_from_slice(&40_000u64.to_le_bytes());
        end.extend_from_slice(h.finalize().as_bytes());
        expected.extend(zstd::bulk::compress(&end, 3).unwrap());
        assert!(stream.len() > 2 * SEGMENT_BYTES);
        assert_eq!(bytes, expected);
        assert_eq!(summary.state_bytes, (stream.len() + end.len()) as u64);
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
        crate::bank_hash::encode_record(&mut unsorted, b"b", b"");
        crate::bank_hash::encode_record(&mut unsorted, b"a", b"");
        let bytes = raw(&unsorted);
        let mut r = ArchiveReader::new(&bytes[..]).unwrap();
        r.next_entry().unwrap();
        assert!(matches!(
            r.next_entry(),
            Err(ArchiveError::Unsorted { index: 1 })
        ));

        // A trailer with a wrong hash.
        let mut lying = header.clone();
        crate::bank_hash::encode_record(&mut lying, b"a", b"1");
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
