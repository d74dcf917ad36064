//! [`ArchiveWriter`]: writes an archive record by record, in one pass and bounded memory.

use std::io::{self, Write};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;

use super::{
    ArchiveError, ArchiveSummary, END_LEN, HEADER_LEN, Header, MARK, SEGMENT_BYTES, SnapshotKind,
    encode_record, record_len,
};
use crate::bank_hash::{MAX_KEY_LEN, MAX_VALUE_LEN};
use crate::hash::BankHash;

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
        buf.reserve(capacity);
        buf
    }

    fn give(&self, mut buf: Vec<u8>) {
        // Oversized buffers (one huge record) are not kept.
        if buf.capacity() <= 2 * SEGMENT_BYTES {
            buf.clear();
            self.0.lock().unwrap_or_else(|p| p.into_inner()).push(buf);
        }
    }
}

/// A segment to compress, numbered in stream order.
struct Job(u64, Vec<u8>);

/// A compressed segment and its input (returned to the pool).
struct Compressed(u64, Vec<u8>, Vec<u8>);

fn compress_worker(
    level: i32,
    jobs: Arc<Mutex<mpsc::Receiver<Job>>>,
    done: mpsc::SyncSender<Compressed>,
    pool: Arc<BufferPool>,
) -> io::Result<()> {
    let mut compressor = zstd::bulk::Compressor::new(level)?;
    loop {
        let job = jobs.lock().unwrap_or_else(|p| p.into_inner()).recv();
        let Ok(Job(seq, input)) = job else {
            return Ok(());
        };
        let mut output = pool.take(zstd::zstd_safe::compress_bound(input.len()));
        compressor.compress_to_buffer(&input, &mut output)?;
        if done.send(Compressed(seq, output, input)).is_err() {
            return Ok(());
        }
    }
}

/// Writes the compressed segments in order.
fn ordered_writer<W: Write>(
    mut out: W,
    done: mpsc::Receiver<Compressed>,
    pool: Arc<BufferPool>,
) -> io::Result<W> {
    let mut pending = std::collections::BTreeMap::new();
    let mut next = 0u64;
    for item in done {
        pending.insert(item.0, item);
        while let Some(Compressed(_, output, input)) = pending.remove(&next) {
            out.write_all(&output)?;
            pool.give(output);
            pool.give(input);
            next += 1;
        }
    }
    if !pending.is_empty() {
        return Err(io::Error::other("archive segments missing"));
    }
    Ok(out)
}

/// Writes an archive, record by record, in one pass and bounded memory.
///
/// Records are encoded on the caller's thread; segments are compressed by a few worker threads
/// and written, in order, by another. Reading the DB, compressing and writing overlap.
pub(crate) struct ArchiveWriter<W: Write + Send + 'static> {
    header: Header,
    records: u64,
    segment: Vec<u8>,
    next_seq: u64,
    last_key: Vec<u8>,
    state_bytes: u64,
    pool: Arc<BufferPool>,
    jobs: Option<mpsc::SyncSender<Job>>,
    workers: Vec<thread::JoinHandle<io::Result<()>>>,
    writer: Option<thread::JoinHandle<io::Result<W>>>,
}

fn invalid(e: ArchiveError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, e)
}

impl<W: Write + Send + 'static> ArchiveWriter<W> {
    /// Starts an archive with `header`, compressed at `zstd_level`.
    pub(crate) fn new(out: W, header: Header, zstd_level: i32) -> io::Result<Self> {
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
            .spawn(move || ordered_writer(out, done_rx, writer_pool))?;
        let mut w = Self {
            header,
            records: 0,
            segment: pool.take(SEGMENT_BYTES),
            next_seq: 0,
            last_key: Vec::new(),
            state_bytes: HEADER_LEN as u64,
            pool,
            jobs: Some(jobs_tx),
            workers,
            writer: Some(writer),
        };
        let mut head = w.pool.take(HEADER_LEN);
        head.extend_from_slice(&header.encode());
        w.send(head)?;
        Ok(w)
    }

    /// Appends one record: `key` holds `value`, or (incremental archives only) `key` is deleted
    /// (`None`). Keys must be strictly ascending; a record out of order, over the size limits, or
    /// a deletion in a full archive is refused with [`io::ErrorKind::InvalidInput`].
    pub(crate) fn push(&mut self, key: &[u8], value: Option<&[u8]>) -> io::Result<()> {
        let index = self.records;
        if key.is_empty() || key.len() > MAX_KEY_LEN {
            return Err(invalid(ArchiveError::KeyOutOfBounds {
                index,
                len: key.len() as u64,
            }));
        }
        match value {
            Some(v) if v.len() > MAX_VALUE_LEN => {
                return Err(invalid(ArchiveError::ValueTooLong {
                    index,
                    len: v.len() as u64,
                }));
            }
            None if self.header.kind == SnapshotKind::Full => {
                return Err(invalid(ArchiveError::DeletionInFull { index }));
            }
            _ => {}
        }
        if index > 0 && key <= self.last_key.as_slice() {
            return Err(invalid(ArchiveError::Unsorted { index }));
        }
        self.last_key.clear();
        self.last_key.extend_from_slice(key);
        let len = record_len(key, value);
        if !self.segment.is_empty() && self.segment.len() + len > SEGMENT_BYTES {
            let next = self.pool.take(SEGMENT_BYTES.max(len));
            let full = std::mem::replace(&mut self.segment, next);
            self.send(full)?;
        }
        encode_record(&mut self.segment, key, value);
        self.records += 1;
        self.state_bytes += len as u64;
        Ok(())
    }

    fn send(&mut self, segment: Vec<u8>) -> io::Result<()> {
        let seq = self.next_seq;
        self.next_seq += 1;
        let sent = self.jobs.as_ref().map(|tx| tx.send(Job(seq, segment)));
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

    /// Writes the end record with `bank_hash`, the bank hash of the state at the archive's slot,
    /// and finishes. Returns the output and what the archive holds.
    pub(crate) fn finish(mut self, bank_hash: BankHash) -> io::Result<(W, ArchiveSummary)> {
        if !self.segment.is_empty() {
            let last = std::mem::take(&mut self.segment);
            self.send(last)?;
        }
        let mut end = self.pool.take(END_LEN);
        end.extend_from_slice(&MARK.to_le_bytes());
        end.extend_from_slice(&self.records.to_le_bytes());
        end.extend_from_slice(bank_hash.as_bytes());
        self.state_bytes += END_LEN as u64;
        self.send(end)?;
        let out = self.join()?;
        Ok((
            out,
            ArchiveSummary {
                header: self.header,
                bank_hash,
                record_count: self.records,
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
