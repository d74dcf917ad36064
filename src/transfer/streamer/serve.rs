//! One request: a manifest, a range of verifiable chunks, or which chunks the server holds.
//! Every response goes through [`Responder::respond`]: header, body in paced pieces, each under
//! the write deadline and all of it within the time `min_client_rate` allows, finish.
//!
//! What is served comes from a published snapshot, or from a snapshot this node is still
//! downloading: its checked manifest, and of its chunks only those verified on disk with their
//! proof nodes. A range of it not wholly verified yet is refused as not held, which is no
//! misbehaviour of anyone.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use prost::bytes::Bytes;
use tokio::time::Instant;

use super::admission::send_window_now;
use super::connection::Allowance;
use super::slots::{HaveReply, have_reply};
use super::{OPEN_SOURCES, ServeError, Shared};
use crate::chunk::{ChunkError, ChunkSource};
use crate::hash::ContentRoot;
use crate::metrics::Outcome;
use crate::proto;
use crate::transfer::STREAMER_TARGET;
use crate::transfer::exchange::PartialOffer;
use crate::transfer::protocol::{self, CANCELLED, HAVE_WAIT, MAX_FRAME, MAX_HAVE_BITS, read_frame};

/// Most have questions kept waiting for news of one snapshot being downloaded.
const MAX_NEWS_WAITERS: usize = 64;

/// Pieces a response is sent in, each paced by the rate limits. 256 KiB keeps QUIC's send
/// batches large under a cap (measured: steadier and a few percent faster than 64 KiB).
const SEND_PIECE: usize = 256 << 10;

/// A request answered with an error status.
struct Refusal {
    status: proto::Status,
    message: String,
}

/// A snapshot served: published, or being downloaded (its verified chunks only).
#[derive(Clone)]
enum ServedSnapshot {
    Complete(Arc<ChunkSource>),
    Partial(Arc<PartialOffer>),
}

impl ServedSnapshot {
    fn source(&self) -> &Arc<ChunkSource> {
        match self {
            ServedSnapshot::Complete(s) => s,
            ServedSnapshot::Partial(p) => &p.source,
        }
    }

    /// Whether every chunk of `range` is held.
    fn holds(&self, range: &Range<u64>) -> bool {
        match self {
            ServedSnapshot::Complete(_) => true,
            ServedSnapshot::Partial(p) => p.verified.all(range.clone()),
        }
    }
}

fn refusal(status: proto::Status, message: impl Into<String>) -> Refusal {
    Refusal {
        status,
        message: message.into(),
    }
}

impl Refusal {
    fn header(self) -> proto::ResponseHeader {
        proto::ResponseHeader {
            status: self.status as i32,
            message: self.message,
            manifest: None,
            encoded_len: 0,
            complete: false,
            attestations: Vec::new(),
        }
    }
}

/// An OK header for a body of `encoded_len` bytes.
fn ok(encoded_len: u64) -> proto::ResponseHeader {
    proto::ResponseHeader {
        status: proto::Status::Ok as i32,
        message: String::new(),
        manifest: None,
        encoded_len,
        complete: false,
        attestations: Vec::new(),
    }
}

/// What one response carries beyond its header.
struct Body {
    bytes: Bytes,
    chunks: u64,
    data_bytes: u64,
}

/// A response on its way: its stream, what it may use and by when it must be taken.
struct Responder<'a> {
    send: quinn::SendStream,
    shared: &'a Shared,
    allowance: &'a Allowance,
    /// Data bytes of the response's body handed to QUIC so far.
    handed: u64,
}

/// Serves one request stream.
pub(super) async fn request(
    send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    shared: &Shared,
    allowance: &Allowance,
) -> Result<(), ServeError> {
    let mut out = Responder {
        send,
        shared,
        allowance,
        handed: 0,
    };
    let read = tokio::time::timeout(
        shared.config.request_timeout,
        read_frame::<proto::Request>(&mut recv, MAX_FRAME),
    )
    .await;
    let request = match read {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            let header = refusal(proto::Status::BadRequest, format!("malformed request: {e}"));
            out.respond(header.header(), None).await?;
            return Err(e.into());
        }
        Err(_) => {
            let _ = out.send.reset(CANCELLED);
            return Err(ServeError::Refused("request timed out"));
        }
    };
    match request.kind {
        Some(proto::request::Kind::Manifest(get)) => {
            let header = manifest_header(&get, shared);
            out.respond(header, None).await
        }
        Some(proto::request::Kind::Chunks(get)) => out.chunks(&get).await,
        Some(proto::request::Kind::Have(get)) => out.have(&get).await,
        None => {
            let header = refusal(proto::Status::BadRequest, "empty request");
            out.respond(header.header(), None).await
        }
    }
}

/// The response to a manifest request.
fn manifest_header(get: &proto::GetManifest, shared: &Shared) -> proto::ResponseHeader {
    let Ok(root) = ContentRoot::from_slice(&get.content_root) else {
        return refusal(proto::Status::BadRequest, "content root must be 32 bytes").header();
    };
    // A snapshot held is served with the attestations kept beside it.
    let (manifest, attestations) = match shared.store.get(&root) {
        Some(snap) => (snap.manifest().clone(), snap.attestations().to_vec()),
        None => match shared.store.exchange().offered(&root) {
            Some(offer) => (offer.manifest.clone(), Vec::new()),
            None => {
                return refusal(
                    proto::Status::UnknownSnapshot,
                    "no snapshot with this content root",
                )
                .header();
            }
        },
    };
    proto::ResponseHeader {
        manifest: Some(manifest.to_proto()),
        attestations: (attestations.iter())
            .take(crate::snapshot::MAX_ATTESTATIONS)
            .map(crate::snapshot::Attestation::to_proto)
            .collect(),
        ..ok(0)
    }
}

impl Responder<'_> {
    /// Answers a chunk request: validates it, waits (within the request timeout) for its
    /// share of the response memory, encodes the range with its proof and sends it.
    async fn chunks(&mut self, get: &proto::GetChunks) -> Result<(), ServeError> {
        let shared = self.shared;
        let (served, range, encoded_len, data_bytes) = match prepare_chunks(get, shared) {
            Ok(v) => v,
            Err(r) => return self.respond(r.header(), None).await,
        };
        if !served.holds(&range) {
            let not_held = refusal(proto::Status::NotHeld, "this range is not held yet");
            return self.respond(not_held.header(), None).await;
        }
        let Some(mut slot) = shared.upload_slot(self.allowance.peer) else {
            let busy = refusal(proto::Status::Busy, "uploading to others; try again");
            return self.respond(busy.header(), None).await;
        };
        let source = served.source().clone();
        let asked = Instant::now();
        // Memory first, from the connection's share and the streamer's, within the request
        // timeout: held until the response is handed to QUIC or abandoned.
        let Some(_memory) = shared.memory(self.allowance.id, encoded_len).await else {
            let busy = refusal(proto::Status::Busy, "no response memory free; try again");
            return self.respond(busy.header(), None).await;
        };
        // Under way now (its memory is held): a seed keeps these blocks for this asker.
        if let ServedSnapshot::Complete(c) = &served {
            let chunks = c.tree().chunk_count();
            shared.suggested_requested(
                &c.tree().root(),
                chunks,
                range.clone(),
                self.allowance.peer,
            );
        }
        let encode_range = range.clone();
        let root = source.tree().root();
        let encoded = tokio::task::spawn_blocking(move || {
            let mut out = Vec::with_capacity(encoded_len as usize);
            source.encode(encode_range, &mut out).map(|()| out)
        })
        .await
        .map_err(|_| ServeError::Refused("encoder panicked"))?;
        match encoded {
            Ok(e) if e.len() as u64 == encoded_len => {
                let header = ok(encoded_len);
                let body = Body {
                    bytes: Bytes::from(e),
                    chunks: range.end - range.start,
                    data_bytes,
                };
                let memory_ms = asked.elapsed().as_millis() as u64;
                let result = self.respond(header, Some(body)).await;
                // What was handed to QUIC counts, however the response ended.
                let handed = self.handed;
                slot.sent = handed;
                tracing::trace!(target: STREAMER_TARGET, peer = %self.allowance.peer, memory_ms, total_ms = asked.elapsed().as_millis() as u64, handed, "chunks handed to QUIC");
                match &served {
                    ServedSnapshot::Partial(offer) => {
                        offer.served.fetch_add(handed, Ordering::Relaxed);
                        shared.metrics.served_partial_bytes.inc_by(handed);
                    }
                    // Counted as sent however it ended: a response cut short is mostly one a
                    // client cancelled having the blocks from elsewhere, and counting only
                    // whole responses would suggest those blocks again.
                    ServedSnapshot::Complete(c) => {
                        shared.suggested_sent(&root, c.tree().chunk_count(), range)
                    }
                }
                result
            }
            Ok(_) | Err(_) => {
                tracing::warn!(target: STREAMER_TARGET, root = %root.short(), "cannot read a served snapshot");
                let header = refusal(proto::Status::Internal, "cannot read the snapshot");
                self.respond(header.header(), None).await
            }
        }
    }

    /// Answers which blocks of chunks this node holds of a snapshot: all of a published one,
    /// the verified ones of one it downloads.
    async fn have(&mut self, get: &proto::GetHave) -> Result<(), ServeError> {
        self.wait_for_news(get).await;
        // Its memory first, from the small budget of have answers (not the chunk responses'):
        // the bitfield is held until it is sent.
        let bytes = have_bytes(get, self.shared);
        let Some(_memory) = self.shared.have_memory(self.allowance.id, bytes) else {
            let busy = refusal(proto::Status::Busy, "no memory for have answers; try again");
            return self.respond(busy.header(), None).await;
        };
        let (header, body) = match have_answer(get, self.shared, self.allowance.peer) {
            Ok(HaveAnswer::Ready(header, body)) => (*header, body),
            Ok(HaveAnswer::Summarize(offer, block)) => {
                let bits = tokio::task::spawn_blocking(move || offer.verified.summarize(block))
                    .await
                    .map_err(|_| ServeError::Refused("summary panicked"))?;
                have_body(bits)
            }
            Err(r) => return self.respond(r.header(), None).await,
        };
        self.introduce(get);
        self.respond(header, body).await
    }

    /// A holder that downloads the snapshot itself, asked by a peer that holds every block it
    /// holds and lets it wait (`wait_ms`, at most [`HAVE_WAIT`]), answers once it has verified
    /// a new block or when the wait is over: news travel without the asker polling. No
    /// response memory is reserved while it waits (the request and its stream are held, the
    /// stream counting against the connection's streams), and at most [`MAX_NEWS_WAITERS`]
    /// questions wait on one snapshot (each block made whole wakes them all).
    async fn wait_for_news(&self, get: &proto::GetHave) {
        let wait = Duration::from_millis(u64::from(get.wait_ms)).min(HAVE_WAIT);
        if wait.is_zero() {
            return;
        }
        let Ok(root) = ContentRoot::from_slice(&get.content_root) else {
            return;
        };
        let Ok(ServedSnapshot::Partial(offer)) = self.shared.served(&root) else {
            return;
        };
        let Some(_waiting) = offer.verified.waiter(MAX_NEWS_WAITERS) else {
            return;
        };
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Armed before the check, so that a block verified in between wakes it.
            let grown = offer.verified.grown();
            tokio::pin!(grown);
            grown.as_mut().enable();
            let Some(held) = offer.verified.blocks(u64::from(get.block_chunks)) else {
                return;
            };
            let news = held.len() != get.holding.len()
                || held.iter().zip(&get.holding[..]).any(|(h, a)| h & !a != 0);
            if news || tokio::time::timeout_at(deadline, grown).await.is_err() {
                return;
            }
        }
    }

    /// An asker that downloads a snapshot this node downloads too, and serves it, becomes a
    /// source of this node's download in turn.
    fn introduce(&self, get: &proto::GetHave) {
        let (Ok(port), Ok(root)) = (
            u16::try_from(get.serve_port),
            ContentRoot::from_slice(&get.content_root),
        ) else {
            return;
        };
        if port == 0 || self.shared.store.get(&root).is_some() {
            return;
        }
        if let Some(offer) = self.shared.store.exchange().offered(&root) {
            let addr = std::net::SocketAddr::new(self.allowance.remote.ip(), port);
            (offer.introduce.0)(self.allowance.peer, addr);
        }
    }

    /// The one response path: the header, then the body in pieces paced by the rate limits,
    /// each under the write deadline and the whole within the time `min_client_rate` needs
    /// for it, then the end of the stream; counts what was served.
    async fn respond(
        &mut self,
        header: proto::ResponseHeader,
        body: Option<Body>,
    ) -> Result<(), ServeError> {
        let shared = self.shared;
        let ok = header.status == proto::Status::Ok as i32;
        let len = body.as_ref().map_or(0, |b| b.bytes.len() as u64);
        // Its turn first: the responses of a connection go out one after another.
        let allowance = self.allowance;
        let _turn = match &body {
            Some(b) if b.data_bytes > 0 => Some(allowance.turn.lock().await),
            _ => None,
        };
        let whole = Duration::from_secs_f64(len as f64 / shared.config.min_client_rate as f64)
            .max(shared.config.write_timeout);
        let deadline = Instant::now() + whole;
        let header = Bytes::from(protocol::encode_frame(&header));
        if let Err(e) = self.write_body(header, body.as_ref(), deadline).await {
            // Reset, never finished: a client must not read a response cut short as whole.
            let _ = self.send.reset(CANCELLED);
            return Err(e);
        }
        let m = &shared.metrics;
        m.served(if ok { Outcome::Ok } else { Outcome::Refused });
        if let Some(body) = &body {
            m.served_chunks.inc_by(body.chunks);
        }
        self.send.finish()?;
        Ok(())
    }

    /// Writes the header, then the body in pieces paced by the rate limits; counts the data
    /// bytes of each piece as served as it is handed to QUIC, so that what a client credits
    /// this server with (the chunks it verified) never exceeds what was counted.
    async fn write_body(
        &mut self,
        header: Bytes,
        body: Option<&Body>,
        deadline: Instant,
    ) -> Result<(), ServeError> {
        self.write_within(header, deadline).await?;
        let Some(body) = body else {
            return Ok(());
        };
        let shared = self.shared;
        let len = body.bytes.len() as u64;
        let mut at = 0;
        while at < body.bytes.len() {
            let end = (at + SEND_PIECE).min(body.bytes.len());
            if let Some(limit) = &shared.global_limit {
                limit.take(end - at).await;
            }
            if let Some(limit) = &self.allowance.limit {
                limit.take(end - at).await;
            }
            // Handed to QUIC without another copy: each piece is a view of the same buffer.
            self.write_within(body.bytes.slice(at..end), deadline)
                .await?;
            at = end;
            let upto = body.data_bytes * at as u64 / len.max(1);
            let piece = upto - self.handed;
            self.handed = upto;
            shared.metrics.served_bytes.inc_by(piece);
            shared.served_on(self.allowance.id, piece);
        }
        Ok(())
    }

    /// Writes `data` within the write deadline and by `deadline`: a client that does not take
    /// it in time is too slow.
    async fn write_within(&mut self, data: Bytes, deadline: Instant) -> Result<(), ServeError> {
        let a = self.allowance;
        let share = a.send_share.load(Ordering::Relaxed);
        let cwnd = a.conn.stats().path.cwnd;
        a.conn.set_send_window(send_window_now(cwnd, share));
        let by = deadline.min(Instant::now() + self.shared.config.write_timeout);
        match tokio::time::timeout_at(by, self.send.write_chunk(data)).await {
            Ok(r) => r.map_err(ServeError::from),
            Err(_) => Err(ServeError::TooSlow),
        }
    }
}

/// The most bytes the bitfield answering `get` can take (0 when it will be refused).
fn have_bytes(get: &proto::GetHave, shared: &Shared) -> u64 {
    let (Ok(root), block) = (
        ContentRoot::from_slice(&get.content_root),
        u64::from(get.block_chunks),
    ) else {
        return 0;
    };
    match shared.served(&root) {
        // An uncontended seed answers "complete", with no bitfield.
        Ok(ServedSnapshot::Complete(_)) if !shared.uploads_contended() => 0,
        Ok(served) if block > 0 => served
            .source()
            .tree()
            .chunk_count()
            .div_ceil(block)
            .min(MAX_HAVE_BITS)
            .div_ceil(8),
        _ => 0,
    }
}

/// The answer to a have request: its header and bitfield.
fn have_answer(
    get: &proto::GetHave,
    shared: &Shared,
    peer: libp2p::PeerId,
) -> Result<HaveAnswer, Refusal> {
    let root = ContentRoot::from_slice(&get.content_root)
        .map_err(|_| refusal(proto::Status::BadRequest, "content root must be 32 bytes"))?;
    let block = u64::from(get.block_chunks);
    let served = shared.served(&root)?;
    let chunks = served.source().tree().chunk_count();
    if block == 0 || chunks.div_ceil(block) > MAX_HAVE_BITS {
        return Err(refusal(
            proto::Status::TooLarge,
            format!(
                "blocks of at least {} chunks",
                chunks.div_ceil(MAX_HAVE_BITS)
            ),
        ));
    }
    let len = chunks.div_ceil(block).div_ceil(8);
    let holding = (!get.holding.is_empty()).then_some(&get.holding[..]);
    if holding.is_some_and(|h| h.len() as u64 != len) {
        return Err(refusal(
            proto::Status::BadRequest,
            format!("a holding bitfield of {len} bytes"),
        ));
    }
    let complete = matches!(served, ServedSnapshot::Complete(_));
    let slot = || shared.upload_slot(peer).is_some();
    let bits = match (
        have_reply(
            complete,
            shared.uploads_contended(),
            holding.is_some(),
            slot,
        ),
        served,
    ) {
        (HaveReply::Verified, ServedSnapshot::Partial(offer)) => match offer.verified.blocks(block)
        {
            Some(bits) => bits,
            // A block size nobody asked lately: its summary is built off the runtime.
            None => return Ok(HaveAnswer::Summarize(offer, block)),
        },
        // A seed in a crowd offers an asker with a slot a few blocks (see `slots.rs`).
        (HaveReply::Suggest, _) => {
            shared.suggest(&root, chunks, block, holding.unwrap_or_default(), peer)
        }
        (HaveReply::Nothing, _) => vec![0; len as usize],
        (HaveReply::Everything | HaveReply::Verified, _) => {
            let complete = proto::ResponseHeader {
                complete: true,
                ..ok(0)
            };
            return Ok(HaveAnswer::Ready(Box::new(complete), None));
        }
    };
    let (header, body) = have_body(bits);
    Ok(HaveAnswer::Ready(Box::new(header), body))
}

/// The header and body of a have answer carrying `bits`.
fn have_body(bits: Vec<u8>) -> (proto::ResponseHeader, Option<Body>) {
    let header = ok(bits.len() as u64);
    let body = Body {
        bytes: Bytes::from(bits),
        chunks: 0,
        data_bytes: 0,
    };
    (header, Some(body))
}

/// The answer to a have request, or the block size whose summary must be built first.
enum HaveAnswer {
    Ready(Box<proto::ResponseHeader>, Option<Body>),
    Summarize(Arc<PartialOffer>, u64),
}

/// A validated chunk request: what is served, the chunk range, the encoded and the data
/// length.
type Prepared = (ServedSnapshot, Range<u64>, u64, u64);

/// Validates a chunk request: a known snapshot, the same chunk size, a range within it and
/// within the size limit. The range is checked before any arithmetic on it.
fn prepare_chunks(get: &proto::GetChunks, shared: &Shared) -> Result<Prepared, Refusal> {
    let root = ContentRoot::from_slice(&get.content_root)
        .map_err(|_| refusal(proto::Status::BadRequest, "content root must be 32 bytes"))?;
    let served = shared.served(&root)?;
    let tree = *served.source().tree();
    if get.chunk_size != tree.chunk_size().bytes() {
        return Err(refusal(
            proto::Status::ChunkSizeMismatch,
            format!(
                "this snapshot is served in chunks of {}",
                tree.chunk_size().bytes()
            ),
        ));
    }
    // Every bound in O(1) first: the walk that measures the encoding is then bounded by the
    // request's size, never by the snapshot's.
    let range = get.start_chunk..get.end_chunk;
    let count = tree.chunk_count();
    if range.start >= range.end || range.end > count {
        let e = ChunkError::OutOfRange {
            start: range.start,
            end: range.end,
            count,
        };
        return Err(refusal(proto::Status::OutOfRange, e.to_string()));
    }
    let data = tree.byte_range(range.clone());
    if data.end - data.start > shared.config.max_request_bytes {
        return Err(refusal(
            proto::Status::TooLarge,
            format!(
                "at most {} bytes per request",
                shared.config.max_request_bytes
            ),
        ));
    }
    let encoded_len = tree.encoded_len(range.clone()).map_err(|e| match e {
        ChunkError::OutOfRange { .. } => refusal(proto::Status::OutOfRange, e.to_string()),
        other => refusal(proto::Status::Internal, other.to_string()),
    })?;
    Ok((served, range, encoded_len, data.end - data.start))
}

impl Shared {
    /// The snapshot with `root`: published, else being downloaded here.
    fn served(&self, root: &ContentRoot) -> Result<ServedSnapshot, Refusal> {
        match self.source(root) {
            Ok(source) => Ok(ServedSnapshot::Complete(source)),
            Err(r) => match self.store.exchange().offered(root) {
                Some(offer) => Ok(ServedSnapshot::Partial(offer)),
                None => Err(r),
            },
        }
    }

    /// The open source of the published snapshot with `root`: kept open, and the snapshot
    /// pinned against retention, while it is among the few most recently served.
    fn source(&self, root: &ContentRoot) -> Result<Arc<ChunkSource>, Refusal> {
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = sources.iter().position(|(r, ..)| r == root) {
            let entry = sources.remove(i);
            let source = entry.1.clone();
            sources.push(entry);
            return Ok(source);
        }
        let snap = self.store.get(root).ok_or_else(|| {
            refusal(
                proto::Status::UnknownSnapshot,
                "no snapshot with this content root",
            )
        })?;
        let source = Arc::new(snap.chunk_source().map_err(|e| {
            tracing::warn!(target: STREAMER_TARGET, root = %root.short(), error = %e, "cannot open snapshot files");
            refusal(proto::Status::UnknownSnapshot, "snapshot files unavailable")
        })?);
        if sources.len() >= OPEN_SOURCES {
            sources.remove(0);
        }
        let pin = Arc::new(self.store.pin(*root));
        sources.push((*root, source.clone(), pin));
        Ok(source)
    }
}
