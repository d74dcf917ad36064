//! [`ParallelDecoder`]: decodes an archive on several threads and hands its segments back in
//! order. One thread splits the input into frames (and hashes every byte for the content root);
//! workers decompress and parse frames, and for a full archive sum the records' lattice, the
//! costly part; the caller takes the segments in archive order. Memory is bounded by the frames
//! in flight, whatever the archive's size.

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
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
    Segment(u64, Result<Segment, ArchiveError>),
    /// The splitter is done: it read this many frames, then ended cleanly or failed.
    End(u64, Result<Finished, ArchiveError>),
}

/// Decodes an archive on several threads (see the module docs).
pub(crate) struct ParallelDecoder {
    rx: Receiver<Out>,
    pending: BTreeMap<u64, Result<Segment, ArchiveError>>,
    next: u64,
    total: Option<u64>,
    finished: Option<Result<Finished, ArchiveError>>,
}

impl ParallelDecoder {
    /// Starts decoding `input` with `workers` threads (at least one). With `lattice`, a full
    /// archive's records are summed into their lattice on the workers.
    pub(crate) fn start<R: Read + Send + 'static>(input: R, workers: usize, lattice: bool) -> Self {
        let workers = workers.max(1);
        let (out_tx, rx) = sync_channel::<Out>(workers * 2 + 2);
        let (job_tx, job_rx) = sync_channel::<(Frame, Option<SnapshotKind>)>(workers * 2);
        let job_rx = Arc::new(Mutex::new(job_rx));
        for _ in 0..workers {
            let (job_rx, out_tx) = (job_rx.clone(), out_tx.clone());
            let _ = thread::Builder::new()
                .name("snapsync-decode".into())
                .spawn(move || worker(job_rx, out_tx, lattice));
        }
        let spawned = thread::Builder::new()
            .name("snapsync-read".into())
            .spawn(move || splitter(input, job_tx, out_tx));
        if let Err(e) = spawned {
            tracing::error!(target: crate::log::DISCOVERY, error = %e, "cannot start an archive reading thread");
        }
        Self {
            rx,
            pending: BTreeMap::new(),
            next: 0,
            total: None,
            finished: None,
        }
    }

    /// The next segment in archive order, or `None` once every frame has been handed out.
    pub(crate) fn next_segment(&mut self) -> Option<Result<Segment, ArchiveError>> {
        loop {
            if let Some(s) = self.pending.remove(&self.next) {
                self.next += 1;
                return Some(s);
            }
            if self.total.is_some_and(|t| self.next >= t) {
                return None;
            }
            match self.rx.recv() {
                Ok(Out::Segment(seq, s)) => {
                    self.pending.insert(seq, s);
                }
                Ok(Out::End(frames, result)) => {
                    self.total = Some(frames);
                    if let Err(e) = &result {
                        // A splitter error comes after the frames it did read; it is handed out
                        // after them, in the place of the frame it could not read.
                        self.pending.insert(frames, Err(clone_error(e)));
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

// Dropping the decoder drops its receiver: the workers and the splitter stop at their next
// send (the splitter at the latest when its input ends or is cancelled). They are not joined:
// a splitter waiting on a slow input must not hold up whoever dropped the decoder.

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
                if out.send(Out::Segment(0, seg)).is_err() {
                    return;
                }
            }
            Ok(Some(frame)) => {
                count += 1;
                if jobs.send((frame, kind)).is_err() {
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
        if out.send(Out::Segment(frame.index, seg)).is_err() {
            return;
        }
    }
}
