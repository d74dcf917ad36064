//! One request: a range of chunks from one peer, each checked against the content root before
//! a byte of it is written at its offset.

use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::bits::{Bits, have_from_bytes};
use super::connect::status_text;
use super::partial::PART_FILE;
use super::picker::Have;
use super::scheduler::RequestFailure;
use crate::chunk::{ChunkError, ChunkTree};
use crate::proto;
use crate::snapshot::{OUTBOARD_FILE, StoreError};
use crate::transfer::protocol::{FrameError, HAVE_WAIT, MAX_FRAME, read_frame, write_frame};

/// Why a chunk request failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum FetchError {
    #[error("the peer sent bad data: {0}")]
    Corrupt(ChunkError),
    #[error("writing the chunk: {0}")]
    Local(StoreError),
    #[error("refused: {0}")]
    Refused(String, RequestFailure),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("{0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("{0}")]
    Read(#[from] quinn::ReadError),
    #[error("nothing received for {0:?}")]
    Stalled(Duration),
    #[error("{0}")]
    Closed(#[from] quinn::ClosedStream),
    /// A web source's answer was not what was asked for.
    #[error("{0}")]
    Web(crate::transfer::web::WebError),
}

/// A refusal, with what it means for the peer: busy or not holding the range yet are no
/// failure of it, an internal error may pass, anything else means it cannot serve this.
fn refused(header: &proto::ResponseHeader) -> FetchError {
    let failure = match proto::Status::try_from(header.status) {
        Ok(proto::Status::Busy) => RequestFailure::Busy,
        Ok(proto::Status::NotHeld) => RequestFailure::NotHeld,
        Ok(proto::Status::Internal) => RequestFailure::Transient,
        _ => RequestFailure::Fatal,
    };
    FetchError::Refused(status_text(header), failure)
}

/// Asks a peer which pieces of `piece_chunks` chunks it holds (or, a seed in a crowd, offers),
/// telling it which this download holds (`done`) and where this node serves them
/// (`serve_port`, 0 for nowhere), within `timeout`. Its answer is checked for
/// its exact length before a byte is read; a piece counts as held when the block it falls in
/// is held whole.
pub(super) async fn ask_have(
    conn: quinn::Connection,
    tree: ChunkTree,
    piece_chunks: u64,
    done: Bits,
    serve_port: u16,
    timeout: Duration,
) -> Result<Have, FetchError> {
    let ask = ask_have_inner(conn, tree, piece_chunks, done, serve_port, timeout);
    tokio::time::timeout(timeout, ask)
        .await
        .unwrap_or(Err(FetchError::Stalled(timeout)))
}

async fn ask_have_inner(
    conn: quinn::Connection,
    tree: ChunkTree,
    piece_chunks: u64,
    done: Bits,
    serve_port: u16,
    timeout: Duration,
) -> Result<Have, FetchError> {
    let piece_chunks = piece_chunks.max(1);
    let chunks = tree.chunk_count();
    let pieces = chunks.div_ceil(piece_chunks);
    // Pieces per block: as few as keep the asker's holding within its limit (a block is 16
    // MiB of a 1 TiB snapshot, a piece of anything under 32 GiB).
    let per_block = pieces.div_ceil(MAX_HOLDING_BYTES as u64 * 8).max(1);
    let block_chunks = u32::try_from(piece_chunks * per_block)
        .map_err(|_| FetchError::Protocol("pieces too large to ask about".into()))?;
    let blocks = chunks.div_ceil(u64::from(block_chunks));
    // What this download holds, in the same blocks: a block when all its pieces are done.
    let holding = if per_block == 1 {
        done
    } else {
        let mut held = Bits::new(blocks as usize);
        for b in 0..blocks as usize {
            let first = b * per_block as usize;
            let last = (first + per_block as usize).min(pieces as usize);
            if (first..last).all(|p| done.get(p)) {
                held.set(b);
            }
        }
        held
    };
    let (mut send, mut recv) = conn.open_bi().await?;
    // A holder that has nothing new for it may keep the question a while and answer at its
    // next block: news of a downloading holder arrive without polling, well within `timeout`.
    let wait = (timeout / 4).min(HAVE_WAIT);
    let request = have_request(&tree, block_chunks, &holding, serve_port, wait);
    write_frame(&mut send, &request).await?;
    send.finish()?;
    let header: proto::ResponseHeader = read_frame(&mut recv, MAX_FRAME).await?;
    if header.status != proto::Status::Ok as i32 {
        return Err(refused(&header));
    }
    if header.complete {
        return Ok(Have::All);
    }
    let expected = blocks.div_ceil(8);
    if header.encoded_len != expected {
        return Err(FetchError::Protocol(format!(
            "a have bitfield of {} bytes, expected {expected}",
            header.encoded_len
        )));
    }
    let mut bytes = vec![0u8; expected as usize];
    recv.read_exact(&mut bytes)
        .await
        .map_err(|e| FetchError::Protocol(format!("have bitfield: {e}")))?;
    let held = have_from_bytes(&bytes, blocks as usize, pieces as usize, per_block as usize)
        .ok_or_else(|| FetchError::Protocol("have bitfield length".into()))?;
    Ok(Have::Some(held))
}

/// The largest holding a have request carries: with the rest of the request it stays well
/// within one frame. Blocks are asked for coarse enough that it fits; a holding that did not
/// would be left out (a contended seed then answers as an uncontended one, with no offer).
const MAX_HOLDING_BYTES: usize = 8 * 1024;

/// A have request for blocks of `block_chunks` chunks, with what this download holds in them
/// when that fits.
fn have_request(
    tree: &ChunkTree,
    block_chunks: u32,
    holding: &Bits,
    serve_port: u16,
    wait: Duration,
) -> proto::Request {
    let mut holding = holding.to_bytes();
    if holding.len() > MAX_HOLDING_BYTES {
        holding.clear();
    }
    proto::Request {
        kind: Some(proto::request::Kind::Have(proto::GetHave {
            content_root: tree.root().0.to_vec().into(),
            block_chunks,
            holding: holding.into(),
            serve_port: u32::from(serve_port),
            wait_ms: wait.as_millis().min(u128::from(u32::MAX)) as u32,
        })),
    }
}

/// Where a download's verified bytes go.
#[derive(Debug)]
pub(super) struct Sink {
    pub(super) archive: std::fs::File,
    pub(super) outboard: std::fs::File,
    pub(super) dir: PathBuf,
}

/// Fetches chunks `chunks`, checks each against the root and writes it at its offset, holding
/// at most one chunk in memory. `written` follows the end of the chunks checked and written so
/// far (they stay good whatever happens to the rest).
pub(super) async fn fetch(
    conn: quinn::Connection,
    tree: ChunkTree,
    chunks: Range<u64>,
    sink: &Sink,
    stall: Duration,
    written: &AtomicU64,
) -> Result<(), FetchError> {
    let expected = tree
        .encoded_len(chunks.clone())
        .map_err(|e| FetchError::Protocol(e.to_string()))?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let request = proto::Request {
        kind: Some(proto::request::Kind::Chunks(proto::GetChunks {
            content_root: tree.root().0.to_vec().into(),
            start_chunk: chunks.start,
            end_chunk: chunks.end,
            chunk_size: tree.chunk_size().bytes(),
        })),
    };
    write_frame(&mut send, &request).await?;
    send.finish()?;
    let header: proto::ResponseHeader = read_frame(&mut recv, MAX_FRAME).await?;
    if header.status != proto::Status::Ok as i32 {
        return Err(refused(&header));
    }
    if header.encoded_len != expected {
        return Err(FetchError::Protocol(format!(
            "announced {} encoded bytes, expected {expected}",
            header.encoded_len
        )));
    }
    let landing = Landing::new(sink, tree, written);
    let mut decoder = tree
        .range_decoder(chunks.clone())
        .map_err(|e| FetchError::Protocol(e.to_string()))?;
    let mut received = 0u64;
    let result = loop {
        if received == expected {
            break decoder.finish();
        }
        let want = (expected - received) as usize;
        match tokio::time::timeout(stall, recv.read_chunk(want, true)).await {
            Err(_) => return Err(FetchError::Stalled(stall)),
            Ok(Ok(Some(piece))) => {
                received += piece.bytes.len() as u64;
                if let Err(e) = landing.feed(&mut decoder, &piece.bytes) {
                    break Err(e);
                }
            }
            // A stream that ends early is as bad as a bad chunk: the data does not check out.
            Ok(Ok(None)) => break decoder.finish(),
            Ok(Err(e)) => return Err(e.into()),
        }
    };
    landing.finish(result)
}

/// Where a request's checked bytes land: each chunk at its offset of the archive, each proof
/// node at its offset of the outboard, and how far the chunks written reach.
pub(super) struct Landing<'a> {
    sink: &'a Sink,
    written: &'a AtomicU64,
    chunk_bytes: u64,
    /// Which file a local write failed on (the decoder's error does not say).
    write_error: std::sync::Mutex<Option<(&'static str, std::io::Error)>>,
}

impl<'a> Landing<'a> {
    pub(super) fn new(sink: &'a Sink, tree: ChunkTree, written: &'a AtomicU64) -> Self {
        Self {
            sink,
            written,
            chunk_bytes: u64::from(tree.chunk_size().bytes()),
            write_error: std::sync::Mutex::new(None),
        }
    }

    fn failed(&self, file: &'static str, e: &std::io::Error) {
        if let Ok(mut slot) = self.write_error.lock() {
            *slot = Some((file, std::io::Error::new(e.kind(), e.to_string())));
        }
    }

    /// Feeds `bytes` of the encoding to `decoder`, landing what it checks.
    pub(super) fn feed(
        &self,
        decoder: &mut crate::chunk::RangeDecoder,
        bytes: &[u8],
    ) -> Result<(), ChunkError> {
        let mut to_archive = |offset: u64, data: &[u8]| {
            self.sink
                .archive
                .write_all_at(data, offset)
                .inspect_err(|e| self.failed(PART_FILE, e))?;
            // A whole chunk, checked (its proof nodes came before it).
            let end = (offset + data.len() as u64).div_ceil(self.chunk_bytes);
            self.written.fetch_max(end, Ordering::Release);
            Ok(())
        };
        let mut to_outboard = |offset: u64, pair: &[u8]| {
            self.sink
                .outboard
                .write_all_at(pair, offset)
                .inspect_err(|e| self.failed(OUTBOARD_FILE, e))
        };
        decoder.feed(bytes, &mut to_archive, &mut to_outboard)
    }

    /// What the decoding's end means: done, bad data from the source, or a local write that
    /// failed (named with its file).
    pub(super) fn finish(self, result: Result<(), ChunkError>) -> Result<(), FetchError> {
        match result {
            Ok(()) => Ok(()),
            Err(e) if e.is_corrupt_data() => Err(FetchError::Corrupt(e)),
            Err(e) => {
                let (file, error) = self
                    .write_error
                    .into_inner()
                    .ok()
                    .flatten()
                    .unwrap_or((PART_FILE, std::io::Error::other(e.to_string())));
                Err(FetchError::Local(StoreError::at(
                    &self.sink.dir.join(file),
                    error,
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::chunk::ChunkSize;
    use crate::hash::ContentRoot;
    use crate::transfer::protocol::MAX_HAVE_BITS;

    #[test]
    fn a_have_request_fits_one_frame_for_the_largest_snapshot() {
        // The most chunks a download may have, at the smallest chunk size, asked about in
        // the finest blocks the answer allows.
        let chunks: u64 = 1 << 26;
        let size = ChunkSize::new(1024).unwrap();
        let tree = ChunkTree::new(chunks * 1024, size, ContentRoot([7; 32]));
        let blocks = MAX_HAVE_BITS as usize;
        let block_chunks = u32::try_from(chunks / MAX_HAVE_BITS).unwrap();
        for held in [Bits::new(blocks), {
            let mut all = Bits::new(blocks);
            (0..blocks).for_each(|b| all.set(b));
            all
        }] {
            let request = have_request(&tree, block_chunks, &held, 0, HAVE_WAIT);
            assert!(
                request.encoded_len() + 4 <= MAX_FRAME,
                "{}",
                request.encoded_len()
            );
        }
        // A small holding goes along whole.
        let mut small = Bits::new(100);
        small.set(3);
        let request = have_request(&tree, block_chunks, &small, 0, Duration::ZERO);
        let Some(proto::request::Kind::Have(have)) = request.kind else {
            panic!("a have request")
        };
        assert_eq!(have.holding.as_ref(), small.to_bytes().as_slice());
    }
}
