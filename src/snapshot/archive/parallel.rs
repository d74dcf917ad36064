//! [`ParallelDecoder`]: decodes an archive on several threads and hands its segments back in
//! order. One thread splits the input into frames (and hashes every byte for the content root);
//! workers decompress and parse frames, and for a full archive sum the records' lattice, the
//! costly part; the caller takes the segments in archive order. Memory is bounded whatever the
//! archive holds: a frame is handed to a worker only while the frames handed out and not yet
//! taken by the caller declare at most `memory` decompressed bytes (one frame always goes), so
//! frames that decode fast cannot pile up behind one that decodes slowly.

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;

use super::frames::{Frame, FrameReader};
use super::segment::{Segment, decode_segment};
use super::{ArchiveError, SnapshotKind};
use crate::hash::ContentRoot;

/// What the splitter reports once the input ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Finished {
    /// BLAKE3 of every byte read: the content root.
    pub root: ContentRoot,
    /// Bytes read.
    pub bytes: u64,
}

enum Out {
    /// A decoded frame: its number, its declared decompressed size, the segment.
    Segment(u64, u64, Result<Segment, ArchiveError>),
    /// The splitter is done: it read this many frames, then ended cleanly or failed.
    End(u64, Result<Finished, ArchiveError>),
}

/// Decompressed bytes of frames handed out and not yet taken, with the most there ever were.
#[derive(Debug, Default)]
struct InFlight {
    bytes: u64,
    peak: u64,
    closed: bool,
}

/// The decompressed bytes frames in flight may declare (see the module docs).
struct Budget {
    limit: u64,
    state: Mutex<InFlight>,
    freed: Condvar,
}

impl Budget {
    fn lock(&self) -> std::sync::MutexGuard<'_, InFlight> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until a frame of `bytes` may go; `false` once the decoder is gone.
    fn take(&self, bytes: u64) -> bool {
        let mut s = self.lock();
        while !s.closed && s.bytes > 0 && s.bytes + bytes > self.limit {
            s = self.freed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.bytes += bytes;
        s.peak = s.peak.max(s.bytes);
        !s.closed
    }

    fn give(&self, bytes: u64) {
        let mut s = self.lock();
        s.bytes = s.bytes.saturating_sub(bytes);
        self.freed.notify_all();
    }

    fn close(&self) {
        self.lock().closed = true;
        self.freed.notify_all();
    }
}

/// Decodes an archive on several threads (see the module docs).
pub(crate) struct ParallelDecoder {
    rx: Receiver<Out>,
    budget: Arc<Budget>,
    pending: BTreeMap<u64, (u64, Result<Segment, ArchiveError>)>,
    next: u64,
    total: Option<u64>,
    finished: Option<Result<Finished, ArchiveError>>,
}

impl ParallelDecoder {
    /// Starts decoding `input` with `workers` threads (at least one), `memory` decompressed
    /// bytes in flight at most (besides one frame). With `lattice`, a full archive's records
    /// are summed into their lattice on the workers.
    pub(crate) fn start<R: Read + Send + 'static>(
        input: R,
        workers: usize,
        lattice: bool,
        memory: u64,
    ) -> Self {
        let workers = workers.max(1);
        let budget = Arc::new(Budget {
            limit: memory,
            state: Mutex::new(InFlight::default()),
            freed: Condvar::new(),
        });
        let (out_tx, rx) = sync_channel::<Out>(workers * 2 + 2);
        let (job_tx, job_rx) = sync_channel::<(Frame, Option<SnapshotKind>)>(workers * 2);
        let job_rx = Arc::new(Mutex::new(job_rx));
        for _ in 0..workers {
            let (job_rx, out_tx) = (job_rx.clone(), out_tx.clone());
            let _ = thread::Builder::new()
                .name("snapsync-decode".into())
                .spawn(move || worker(job_rx, out_tx, lattice));
        }
        let splitter_budget = budget.clone();
        let spawned = thread::Builder::new()
            .name("snapsync-read".into())
            .spawn(move || splitter(input, job_tx, out_tx, &splitter_budget));
        if let Err(e) = spawned {
            tracing::error!(target: crate::log::DISCOVERY, error = %e, "cannot start an archive reading thread");
        }
        Self {
            rx,
            budget,
            pending: BTreeMap::new(),
            next: 0,
            total: None,
            finished: None,
        }
    }

    /// The next segment in archive order, or `None` once every frame has been handed out.
    pub(crate) fn next_segment(&mut self) -> Option<Result<Segment, ArchiveError>> {
        loop {
            if let Some((bytes, s)) = self.pending.remove(&self.next) {
                self.next += 1;
                self.budget.give(bytes);
                return Some(s);
            }
            if self.total.is_some_and(|t| self.next >= t) {
                return None;
            }
            match self.rx.recv() {
                Ok(Out::Segment(seq, bytes, s)) => {
                    self.pending.insert(seq, (bytes, s));
                }
                Ok(Out::End(frames, result)) => {
                    self.total = Some(frames);
                    if let Err(e) = &result {
                        // A splitter error comes after the frames it did read; it is handed out
                        // after them, in the place of the frame it could not read.
                        self.pending.insert(frames, (0, Err(clone_error(e))));
                        self.total = Some(frames + 1);
                    }
                    self.finished = Some(result);
                }
                Err(_) => {
                    return Some(Err(ArchiveError::Io(std::io::Error::other(
                        "archive decoding threads stopped",
                    ))));
                }
            }
        }
    }

    /// The most decompressed bytes that were ever in flight at once.
    #[cfg(test)]
    pub(crate) fn peak_in_flight(&self) -> u64 {
        self.budget.lock().peak
    }

    /// Once [`ParallelDecoder::next_segment`] has returned `None`: the content root and size of
    /// everything read.
    pub(crate) fn finish(mut self) -> Result<Finished, ArchiveError> {
        while self.finished.is_none() {
            match self.rx.recv() {
                Ok(Out::End(_, r)) => self.finished = Some(r),
                Ok(Out::Segment(..)) => {}
                Err(_) => {
                    return Err(ArchiveError::Io(std::io::Error::other(
                        "archive decoding threads stopped",
                    )));
                }
            }
        }
        self.finished.take().expect("set above")
    }
}

// Dropping the decoder drops its receiver and closes its budget: the workers and the splitter
// stop at their next send or wait (the splitter at the latest when its input ends or is
// cancelled). They are not joined: a splitter waiting on a slow input must not hold up whoever
// dropped the decoder.
impl Drop for ParallelDecoder {
    fn drop(&mut self) {
        self.budget.close();
    }
}

fn clone_error(e: &ArchiveError) -> ArchiveError {
    match e {
        ArchiveError::Truncated => ArchiveError::Truncated,
        ArchiveError::BadFrame { frame, reason } => ArchiveError::BadFrame {
            frame: *frame,
            reason: reason.clone(),
        },
        other => ArchiveError::Io(std::io::Error::other(other.to_string())),
    }
}

fn splitter<R: Read>(
    input: R,
    jobs: SyncSender<(Frame, Option<SnapshotKind>)>,
    out: SyncSender<Out>,
    budget: &Budget,
) {
    let mut frames = FrameReader::new(input);
    let mut decompressor = match zstd::bulk::Decompressor::new() {
        Ok(d) => d,
        Err(e) => {
            let _ = out.send(Out::End(0, Err(e.into())));
            return;
        }
    };
    let mut count = 0u64;
    let mut kind = None;
    loop {
        match frames.next_frame() {
            Ok(Some(frame)) if frame.index == 0 => {
                count += 1;
                // The header is tiny and tells the kind every other frame is parsed as.
                let seg = decode_segment(&frame, None, false, &mut decompressor);
                if let Ok(Segment::Header(h)) = &seg {
                    kind = Some(h.kind);
                }
                if !budget.take(0) || out.send(Out::Segment(0, 0, seg)).is_err() {
                    return;
                }
            }
            Ok(Some(frame)) => {
                count += 1;
                if !budget.take(frame.content_size as u64) || jobs.send((frame, kind)).is_err() {
                    return;
                }
            }
            Ok(None) => {
                drop(jobs);
                let _ = out.send(Out::End(
                    count,
                    Ok(Finished {
                        root: frames.root(),
                        bytes: frames.bytes_read(),
                    }),
                ));
                return;
            }
            Err(e) => {
                drop(jobs);
                let _ = out.send(Out::End(count, Err(e)));
                return;
            }
        }
    }
}

/// Frames to decode, shared by the workers (with the archive's kind, once the header is read).
type Jobs = Arc<Mutex<Receiver<(Frame, Option<SnapshotKind>)>>>;

fn worker(jobs: Jobs, out: SyncSender<Out>, lattice: bool) {
    let Ok(mut decompressor) = zstd::bulk::Decompressor::new() else {
        return;
    };
    loop {
        let job = jobs.lock().unwrap_or_else(|p| p.into_inner()).recv();
        let Ok((frame, kind)) = job else {
            return;
        };
        let seg = decode_segment(&frame, kind, lattice, &mut decompressor);
        let (index, bytes) = (frame.index, frame.content_size as u64);
        drop(frame);
        if out.send(Out::Segment(index, bytes, seg)).is_err() {
            return;
        }
    }
}
