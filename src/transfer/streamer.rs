//! The serving side of the chunk stream: [`Streamer`] (log target `SNAPSHOT:STREAMER`).

use crate::macros::setter;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::PeerId;
use libp2p::identity::Keypair;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::limit::ByteLimiter;
use super::tls::{self, EndpointError, TransportTuning};
use super::wire::{self, FrameError, MAX_FRAME, PROTOCOL_VERSION, close};
use super::{STREAMER_TARGET, Token};
use crate::chunk::{ChunkError, ChunkSource};
use crate::hash::ContentRoot;
use crate::metrics::RefusedReason;
use crate::proto;
use crate::snapshot::SnapshotStore;

/// Settings of a [`Streamer`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct StreamerConfig {
    /// UDP address to listen on (default `0.0.0.0:0`: every interface, a port the OS picks;
    /// [`Streamer::local_addr`] tells which).
    pub listen: SocketAddr,
    /// Token every downloader must present (`SNAPSHOT_TOKEN`); `None` serves anyone.
    pub token: Option<Token>,
    /// Most connections served at once (default 64). Beyond it, new ones are refused at once.
    pub max_connections: usize,
    /// Most connections from one peer at once (default 4).
    pub max_connections_per_peer: usize,
    /// Most concurrent requests (streams) per connection (default 32).
    pub max_streams_per_connection: u32,
    /// Largest chunk range served by one request, in bytes of data (default 8 MiB). Bounds the
    /// memory one request can take.
    pub max_request_bytes: u64,
    /// Memory for responses being prepared and sent, across all connections (default 32 MiB).
    /// Requests wait for their share, so memory stays bounded whatever the number of clients.
    pub response_memory: u64,
    /// Serving rate cap across all peers, bytes per second (default none).
    pub rate_limit: Option<u64>,
    /// Serving rate cap per peer, bytes per second (default none).
    pub rate_limit_per_peer: Option<u64>,
    /// How long a new connection may take to present its token (default 5 s).
    pub auth_timeout: Duration,
    /// How long a request may take to arrive once its stream is open (default 10 s).
    pub request_timeout: Duration,
    /// QUIC transport settings.
    pub transport: TransportTuning,
    /// Where to count what is served and refused.
    pub metrics: crate::Metrics,
}

impl Default for StreamerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 0)),
            token: None,
            max_connections: 64,
            max_connections_per_peer: 4,
            max_streams_per_connection: 32,
            max_request_bytes: 8 << 20,
            response_memory: 32 << 20,
            rate_limit: None,
            rate_limit_per_peer: None,
            auth_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            transport: TransportTuning::default(),
            metrics: crate::Metrics::default(),
        }
    }
}

impl StreamerConfig {
    setter!(
        /// Sets the listen address.
        with_listen, listen: SocketAddr
    );

    setter!(
        /// Sets the token.
        with_token, token: Option<Token>
    );

    setter!(
        /// Sets the connection limit.
        with_max_connections, max_connections: usize, |n| n.max(1)
    );

    setter!(
        /// Sets the per-peer connection limit.
        with_max_connections_per_peer, max_connections_per_peer: usize, |n| n.max(1)
    );

    setter!(
        /// Sets the per-connection stream limit.
        with_max_streams_per_connection, max_streams_per_connection: u32, |n| n.max(1)
    );

    setter!(
        /// Sets the largest request served.
        with_max_request_bytes, max_request_bytes: u64, |bytes| bytes.max(1024)
    );

    setter!(
        /// Sets the response memory budget.
        with_response_memory, response_memory: u64, |bytes| bytes.max(1 << 20)
    );

    setter!(
        /// Sets the global serving rate cap, bytes per second.
        with_rate_limit, rate_limit: Option<u64>
    );

    setter!(
        /// Sets the per-peer serving rate cap, bytes per second.
        with_rate_limit_per_peer, rate_limit_per_peer: Option<u64>
    );

    setter!(
        /// Sets the authentication timeout.
        with_auth_timeout, auth_timeout: Duration
    );

    setter!(
        /// Sets the QUIC transport settings.
        with_transport, transport: TransportTuning
    );

    setter!(
        /// Sets where to count what is served and refused.
        with_metrics, metrics: crate::Metrics
    );
}

/// Counters of a [`Streamer`] since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StreamerStats {
    /// Connections that presented a valid token.
    pub connections_accepted: u64,
    /// Connections refused for a wrong or missing token.
    pub refused_unauthorized: u64,
    /// Connections refused because a limit was reached.
    pub refused_busy: u64,
    /// Connections open now.
    pub connections_open: u64,
    /// Requests answered successfully.
    pub requests_served: u64,
    /// Requests answered with an error status.
    pub requests_refused: u64,
    /// Chunks sent.
    pub chunks_served: u64,
    /// Archive data bytes sent (not counting proofs and headers).
    pub bytes_served: u64,
}

#[derive(Default)]
struct Counters {
    connections_accepted: AtomicU64,
    refused_unauthorized: AtomicU64,
    refused_busy: AtomicU64,
    requests_served: AtomicU64,
    requests_refused: AtomicU64,
    chunks_served: AtomicU64,
    bytes_served: AtomicU64,
}

/// Open chunk sources, so that a download keeps going from the same open files even if
/// retention deletes the snapshot meanwhile, and files are not reopened per request.
const OPEN_SOURCES: usize = 4;

struct Shared {
    store: SnapshotStore,
    token_hash: Option<blake3::Hash>,
    config: StreamerConfig,
    counters: Counters,
    connections: AtomicUsize,
    global_limit: Option<ByteLimiter>,
    per_peer: Mutex<HashMap<PeerId, PeerSlot>>,
    sources: Mutex<Vec<(ContentRoot, Arc<ChunkSource>)>>,
    /// Response memory, in KiB permits.
    memory: Semaphore,
    memory_kib: u32,
}

struct PeerSlot {
    connections: usize,
    limit: Option<Arc<ByteLimiter>>,
}

/// Why a [`Streamer`] could not start.
#[derive(Debug, thiserror::Error)]
pub enum StreamerError {
    /// Setting up the QUIC endpoint failed (address in use, bind error, certificate).
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    /// The endpoint could not be created on the bound socket.
    #[error("cannot start the QUIC endpoint: {0}")]
    Io(#[from] std::io::Error),
}

/// Serves the snapshots of a [`SnapshotStore`] over QUIC to downloaders that present the token.
///
/// Serves, per request, a snapshot's manifest or a range of its chunks encoded with the BLAKE3
/// tree proof the downloader checks each chunk with. Runs on the current tokio runtime until
/// dropped or [`Streamer::shutdown`].
pub struct Streamer {
    endpoint: quinn::Endpoint,
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Streamer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streamer")
            .field("local_addr", &self.local_addr)
            .finish()
    }
}

impl Streamer {
    /// Binds the streamer on `config.listen` with the node's identity and starts serving.
    /// Must be called within a tokio runtime.
    pub fn bind(
        keypair: &Keypair,
        store: SnapshotStore,
        config: StreamerConfig,
    ) -> Result<Self, StreamerError> {
        let server = tls::server_config(
            keypair,
            &config.transport,
            config.max_streams_per_connection,
        )?;
        let socket = tls::bind_socket(config.listen, &config.transport)?;
        let endpoint = quinn::Endpoint::new(
            tls::endpoint_config(&config.transport),
            Some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )?;
        let local_addr = endpoint.local_addr()?;
        let memory_kib =
            (config.response_memory / 1024).clamp(1024, u64::from(u32::MAX >> 3)) as u32;
        if config.token.is_none() {
            tracing::warn!(target: STREAMER_TARGET, %local_addr, "no SNAPSHOT_TOKEN configured: serving snapshots to any peer");
        }
        let shared = Arc::new(Shared {
            token_hash: config.token.as_ref().map(Token::digest),
            global_limit: config.rate_limit.map(ByteLimiter::new),
            store,
            counters: Counters::default(),
            connections: AtomicUsize::new(0),
            per_peer: Mutex::new(HashMap::new()),
            sources: Mutex::new(Vec::new()),
            memory: Semaphore::new(memory_kib as usize),
            memory_kib,
            config,
        });
        tracing::info!(target: STREAMER_TARGET, %local_addr, "chunk streamer listening");
        let task = tokio::spawn(accept_loop(endpoint.clone(), shared.clone()));
        Ok(Self {
            endpoint,
            local_addr,
            shared,
            task,
        })
    }

    /// The address the streamer listens on (with the port the OS picked).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Counters since start.
    pub fn stats(&self) -> StreamerStats {
        let c = &self.shared.counters;
        StreamerStats {
            connections_accepted: c.connections_accepted.load(Ordering::Relaxed),
            refused_unauthorized: c.refused_unauthorized.load(Ordering::Relaxed),
            refused_busy: c.refused_busy.load(Ordering::Relaxed),
            connections_open: self.shared.connections.load(Ordering::Relaxed) as u64,
            requests_served: c.requests_served.load(Ordering::Relaxed),
            requests_refused: c.requests_refused.load(Ordering::Relaxed),
            chunks_served: c.chunks_served.load(Ordering::Relaxed),
            bytes_served: c.bytes_served.load(Ordering::Relaxed),
        }
    }

    /// Closes every connection and stops serving.
    pub async fn shutdown(self) {
        self.endpoint.close(close::SHUTDOWN, b"shutting down");
        self.task.abort();
        self.endpoint.wait_idle().await;
    }
}

impl Drop for Streamer {
    fn drop(&mut self) {
        self.endpoint.close(close::SHUTDOWN, b"shutting down");
        self.task.abort();
    }
}

async fn accept_loop(endpoint: quinn::Endpoint, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                if shared.connections.load(Ordering::Acquire) >= shared.config.max_connections {
                    shared.count_refused(RefusedReason::Busy);
                    tracing::debug!(target: STREAMER_TARGET, remote = %incoming.remote_address(), "connection limit reached; refusing");
                    incoming.refuse();
                    continue;
                }
                shared.connections.fetch_add(1, Ordering::AcqRel);
                let shared = shared.clone();
                let remote = incoming.remote_address();
                let span = tracing::debug_span!(target: STREAMER_TARGET, "connection", %remote);
                connections.spawn(tracing::Instrument::instrument(async move {
                    if let Err(e) = serve_connection(incoming, &shared).await {
                        tracing::debug!(target: STREAMER_TARGET, error = %e, "connection ended");
                    }
                    shared.connections.fetch_sub(1, Ordering::AcqRel);
                }, span));
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Why a connection or request ended early (logged, never sent as snapshot data).
#[derive(Debug, thiserror::Error)]
enum ServeError {
    #[error("handshake: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("no token within the auth timeout")]
    AuthTimeout,
    #[error("frame: {0}")]
    Frame(#[from] FrameError),
    #[error("write: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("stream closed: {0}")]
    Closed(#[from] quinn::ClosedStream),
    #[error("refused: {0}")]
    Refused(&'static str),
}

async fn serve_connection(
    incoming: quinn::Incoming,
    shared: &Arc<Shared>,
) -> Result<(), ServeError> {
    let conn = incoming.accept()?.await?;
    let Some(peer) = tls::remote_peer_id(&conn) else {
        conn.close(close::PROTOCOL, b"no libp2p certificate");
        return Err(ServeError::Refused("no libp2p certificate"));
    };
    // Authenticate on the client's first stream before anything else is read.
    let hello = tokio::time::timeout(shared.config.auth_timeout, async {
        let (send, mut recv) = conn.accept_bi().await?;
        let hello: proto::Hello = wire::read_frame(&mut recv, 1024).await?;
        Ok::<_, ServeError>((send, hello))
    })
    .await;
    let (mut send, hello) = match hello {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            conn.close(close::PROTOCOL, b"bad hello");
            return Err(e);
        }
        Err(_) => {
            conn.close(close::PROTOCOL, b"no hello in time");
            return Err(ServeError::AuthTimeout);
        }
    };
    let refusal = if hello.protocol_version != PROTOCOL_VERSION {
        Some((
            proto::Refusal::Version,
            close::PROTOCOL,
            "unsupported chunk-stream protocol version",
        ))
    } else if shared
        .token_hash
        // blake3::Hash compares in constant time, and hashing first hides the length too.
        .is_some_and(|expected| blake3::hash(&hello.token) != expected)
    {
        shared.count_refused(RefusedReason::Unauthorized);
        tracing::warn!(target: STREAMER_TARGET, %peer, "refused: wrong or missing SNAPSHOT_TOKEN");
        Some((
            proto::Refusal::Unauthorized,
            close::UNAUTHORIZED,
            "unauthorized: wrong or missing SNAPSHOT_TOKEN",
        ))
    } else {
        None
    };
    let peer_limit = match refusal {
        Some(refused) => None.ok_or(refused),
        None => enter_peer(shared, peer).ok_or_else(|| {
            shared.count_refused(RefusedReason::Busy);
            (
                proto::Refusal::Busy,
                close::BUSY,
                "too many connections from this peer",
            )
        }),
    };
    let peer_limit = match peer_limit {
        Ok(limit) => limit,
        Err((refused, code, message)) => {
            refuse(&conn, send, refused, code, message).await;
            return Err(ServeError::Refused(message));
        }
    };
    let _leave = PeerGuard { shared, peer };
    shared
        .counters
        .connections_accepted
        .fetch_add(1, Ordering::Relaxed);
    shared.config.metrics.active_transfers.inc();
    let welcome = proto::Welcome {
        protocol_version: PROTOCOL_VERSION,
        refused: proto::Refusal::None as i32,
        message: String::new(),
    };
    wire::write_frame(&mut send, &welcome).await?;
    send.finish()?;
    tracing::debug!(target: STREAMER_TARGET, %peer, remote = %conn.remote_address(), "downloader connected");

    let mut requests = JoinSet::new();
    loop {
        tokio::select! {
            stream = conn.accept_bi() => {
                let (send, recv) = match stream {
                    Ok(s) => s,
                    Err(quinn::ConnectionError::ApplicationClosed(_))
                    | Err(quinn::ConnectionError::LocallyClosed) => return Ok(()),
                    Err(e) => return Err(e.into()),
                };
                let shared = shared.clone();
                let limit = peer_limit.clone();
                requests.spawn(async move {
                    if let Err(e) = serve_request(send, recv, &shared, limit.as_deref()).await {
                        tracing::debug!(target: STREAMER_TARGET, %peer, error = %e, "request ended");
                    }
                });
            }
            Some(_) = requests.join_next(), if !requests.is_empty() => {}
        }
    }
}

/// How long a refused client is given to read its refusal and close before the streamer closes
/// the connection itself.
const REFUSAL_GRACE: Duration = Duration::from_secs(2);

/// Refuses a connection in band (the client reads why on its hello stream), then closes it.
/// The refusal goes out as stream data rather than only as a connection close, so it reaches
/// the client even when a close would be lost or held back.
async fn refuse(
    conn: &quinn::Connection,
    mut send: quinn::SendStream,
    refused: proto::Refusal,
    code: quinn::VarInt,
    message: &'static str,
) {
    let welcome = proto::Welcome {
        protocol_version: PROTOCOL_VERSION,
        refused: refused as i32,
        message: message.into(),
    };
    if wire::write_frame(&mut send, &welcome).await.is_ok() && send.finish().is_ok() {
        let _ = tokio::time::timeout(REFUSAL_GRACE, conn.closed()).await;
    }
    conn.close(code, message.as_bytes());
}

/// Registers a connection of `peer`; `None` when it has too many.
fn enter_peer(shared: &Shared, peer: PeerId) -> Option<Option<Arc<ByteLimiter>>> {
    let mut peers = shared.per_peer.lock().unwrap_or_else(|p| p.into_inner());
    let slot = peers.entry(peer).or_insert_with(|| PeerSlot {
        connections: 0,
        limit: shared
            .config
            .rate_limit_per_peer
            .map(|r| Arc::new(ByteLimiter::new(r))),
    });
    if slot.connections >= shared.config.max_connections_per_peer {
        return None;
    }
    slot.connections += 1;
    Some(slot.limit.clone())
}

struct PeerGuard<'a> {
    shared: &'a Shared,
    peer: PeerId,
}

impl Drop for PeerGuard<'_> {
    fn drop(&mut self) {
        self.shared.config.metrics.active_transfers.dec();
        let mut peers = self
            .shared
            .per_peer
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = peers.get_mut(&self.peer) {
            slot.connections -= 1;
            if slot.connections == 0 {
                peers.remove(&self.peer);
            }
        }
    }
}

/// A request the streamer answers with an error status.
struct Refusal {
    status: proto::Status,
    message: String,
}

impl Refusal {
    fn header(self) -> proto::ResponseHeader {
        proto::ResponseHeader {
            status: self.status as i32,
            message: self.message,
            manifest: None,
            encoded_len: 0,
        }
    }
}

fn refusal(status: proto::Status, message: impl Into<String>) -> Refusal {
    Refusal {
        status,
        message: message.into(),
    }
}

impl Shared {
    fn count_refused(&self, reason: RefusedReason) {
        let counter = match reason {
            RefusedReason::Unauthorized => &self.counters.refused_unauthorized,
            RefusedReason::Busy => &self.counters.refused_busy,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.config.metrics.refused(reason);
    }

    fn source(&self, root: &ContentRoot) -> Result<Arc<ChunkSource>, Refusal> {
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = sources.iter().position(|(r, _)| r == root) {
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
        sources.push((*root, source.clone()));
        Ok(source)
    }
}

async fn serve_request(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    shared: &Shared,
    peer_limit: Option<&ByteLimiter>,
) -> Result<(), ServeError> {
    let request = tokio::time::timeout(
        shared.config.request_timeout,
        wire::read_frame::<proto::Request>(&mut recv, MAX_FRAME),
    )
    .await;
    let request = match request {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            shared
                .counters
                .requests_refused
                .fetch_add(1, Ordering::Relaxed);
            let header =
                refusal(proto::Status::BadRequest, format!("malformed request: {e}")).header();
            wire::write_frame(&mut send, &header).await?;
            send.finish()?;
            return Err(e.into());
        }
        Err(_) => {
            let _ = send.reset(wire::CANCELLED);
            return Err(ServeError::Refused("request timed out"));
        }
    };
    match request.kind {
        Some(proto::request::Kind::Manifest(get)) => {
            let header = match ContentRoot::from_slice(&get.content_root) {
                Err(_) => {
                    refusal(proto::Status::BadRequest, "content root must be 32 bytes").header()
                }
                Ok(root) => match shared.store.get(&root) {
                    None => refusal(
                        proto::Status::UnknownSnapshot,
                        "no snapshot with this content root",
                    )
                    .header(),
                    Some(snap) => proto::ResponseHeader {
                        status: proto::Status::Ok as i32,
                        message: String::new(),
                        manifest: Some(snap.manifest().to_proto()),
                        encoded_len: 0,
                    },
                },
            };
            count_response(shared, &header);
            wire::write_frame(&mut send, &header).await?;
            send.finish()?;
        }
        Some(proto::request::Kind::Chunks(get)) => {
            serve_chunks(&mut send, get, shared, peer_limit).await?;
        }
        None => {
            shared
                .counters
                .requests_refused
                .fetch_add(1, Ordering::Relaxed);
            let header = refusal(proto::Status::BadRequest, "empty request").header();
            wire::write_frame(&mut send, &header).await?;
            send.finish()?;
        }
    }
    Ok(())
}

fn count_response(shared: &Shared, header: &proto::ResponseHeader) {
    let counter = if header.status == proto::Status::Ok as i32 {
        &shared.counters.requests_served
    } else {
        &shared.counters.requests_refused
    };
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Pieces a response is sent in, each paced by the rate limits. 256 KiB keeps QUIC's send
/// batches large under a cap (measured: steadier and a few percent faster than 64 KiB).
const SEND_PIECE: usize = 256 << 10;

async fn serve_chunks(
    send: &mut quinn::SendStream,
    get: proto::GetChunks,
    shared: &Shared,
    peer_limit: Option<&ByteLimiter>,
) -> Result<(), ServeError> {
    let prepared = prepare_chunks(&get, shared);
    let (source, range, encoded_len, data_bytes) = match prepared {
        Ok(v) => v,
        Err(refused) => {
            let header = refused.header();
            count_response(shared, &header);
            wire::write_frame(send, &header).await?;
            send.finish()?;
            return Ok(());
        }
    };
    // Wait for a share of the response memory before allocating it.
    let kib = (encoded_len.div_ceil(1024) as u32).min(shared.memory_kib);
    let _permit = shared
        .memory
        .acquire_many(kib)
        .await
        .map_err(|_| ServeError::Refused("shutting down"))?;
    let encode_range = range.clone();
    let encoded = tokio::task::spawn_blocking(move || {
        let mut out = Vec::with_capacity(encoded_len as usize);
        source.encode(encode_range, &mut out).map(|()| out)
    })
    .await
    .map_err(|_| ServeError::Refused("encoder panicked"))?;
    let encoded = match encoded {
        Ok(e) if e.len() as u64 == encoded_len => e,
        Ok(_) | Err(_) => {
            let header = refusal(proto::Status::Internal, "cannot read the snapshot").header();
            count_response(shared, &header);
            wire::write_frame(send, &header).await?;
            send.finish()?;
            return Ok(());
        }
    };
    let header = proto::ResponseHeader {
        status: proto::Status::Ok as i32,
        message: String::new(),
        manifest: None,
        encoded_len,
    };
    wire::write_frame(send, &header).await?;
    // Handed to QUIC without another copy: each piece is a view of the same buffer.
    let encoded = prost::bytes::Bytes::from(encoded);
    let mut at = 0;
    while at < encoded.len() {
        let end = (at + SEND_PIECE).min(encoded.len());
        if let Some(limit) = &shared.global_limit {
            limit.take(end - at).await;
        }
        if let Some(limit) = peer_limit {
            limit.take(end - at).await;
        }
        send.write_chunk(encoded.slice(at..end)).await?;
        at = end;
    }
    // Counted once all is handed to QUIC, before the end of the stream can reach the client.
    let c = &shared.counters;
    c.requests_served.fetch_add(1, Ordering::Relaxed);
    c.chunks_served
        .fetch_add(range.end - range.start, Ordering::Relaxed);
    c.bytes_served.fetch_add(data_bytes, Ordering::Relaxed);
    let m = &shared.config.metrics;
    m.bytes_served.inc_by(data_bytes);
    m.chunks_served.inc_by(range.end - range.start);
    send.finish()?;
    Ok(())
}

/// A validated chunk request: the source, the chunk range, the encoded and the data length.
type Prepared = (Arc<ChunkSource>, std::ops::Range<u64>, u64, u64);

/// Validates a chunk request: a known snapshot, the same chunk size, a range within it and
/// within the size limit.
fn prepare_chunks(get: &proto::GetChunks, shared: &Shared) -> Result<Prepared, Refusal> {
    let root = ContentRoot::from_slice(&get.content_root)
        .map_err(|_| refusal(proto::Status::BadRequest, "content root must be 32 bytes"))?;
    let source = shared.source(&root)?;
    let tree = *source.tree();
    if get.chunk_size != tree.chunk_size().bytes() {
        return Err(refusal(
            proto::Status::ChunkSizeMismatch,
            format!(
                "this snapshot is served in chunks of {}",
                tree.chunk_size().bytes()
            ),
        ));
    }
    let range = get.start_chunk..get.end_chunk;
    let data = tree.byte_range(range.clone());
    if range.end > range.start && data.end - data.start > shared.config.max_request_bytes {
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
    Ok((source, range, encoded_len, data.end - data.start))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::{RedbState, StateDb};
    use crate::snapshot::{CreateOptions, Snapshot, create_snapshot};

    struct Fixture {
        _dir: tempfile::TempDir,
        keypair: Keypair,
        snap: Arc<Snapshot>,
        streamer: Streamer,
    }

    async fn fixture(config: StreamerConfig) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let db = RedbState::open(dir.path().join("db.redb")).unwrap();
        db.commit_slot(9, |w| {
            for i in 0..500u32 {
                w.put(
                    &i.to_be_bytes(),
                    &blake3::hash(&i.to_le_bytes()).as_bytes().repeat(8),
                )?;
            }
            Ok(())
        })
        .unwrap();
        let store = SnapshotStore::open(dir.path().join("snaps")).unwrap();
        let view = db.view().unwrap();
        let options = CreateOptions::default().with_chunk_size(crate::ChunkSize::MIN);
        let snap = create_snapshot(&store, view.as_ref(), &options).unwrap();
        let keypair = Keypair::generate_ed25519();
        let streamer = Streamer::bind(
            &keypair,
            store,
            config.with_listen("127.0.0.1:0".parse().unwrap()),
        )
        .unwrap();
        Fixture {
            _dir: dir,
            keypair,
            snap,
            streamer,
        }
    }

    /// A QUIC connection to the fixture's streamer, with no hello sent yet.
    async fn dial(f: &Fixture, me: &Keypair) -> Result<quinn::Connection, quinn::ConnectionError> {
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let config = tls::client_config(
            me,
            f.keypair.public().to_peer_id(),
            &TransportTuning::default(),
        )
        .unwrap();
        endpoint
            .connect_with(config, f.streamer.local_addr(), "x")
            .unwrap()
            .await
    }

    async fn connect(
        f: &Fixture,
        token: &[u8],
    ) -> Result<quinn::Connection, quinn::ConnectionError> {
        let conn = dial(f, &Keypair::generate_ed25519()).await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        let hello = proto::Hello {
            protocol_version: PROTOCOL_VERSION,
            token: token.to_vec().into(),
        };
        wire::write_frame(&mut send, &hello).await.unwrap();
        send.finish().unwrap();
        match wire::read_frame::<proto::Welcome>(&mut recv, 1024).await {
            Ok(w) if w.refused == proto::Refusal::None as i32 => Ok(conn),
            Ok(_) => {
                conn.close(close::DONE, b"refused");
                Err(conn.close_reason().expect("closed"))
            }
            Err(FrameError::Read(quinn::ReadExactError::ReadError(
                quinn::ReadError::ConnectionLost(e),
            ))) => Err(e),
            Err(e) => panic!("unexpected {e}"),
        }
    }

    async fn ask(conn: &quinn::Connection, kind: proto::request::Kind) -> proto::ResponseHeader {
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        wire::write_frame(&mut send, &proto::Request { kind: Some(kind) })
            .await
            .unwrap();
        send.finish().unwrap();
        wire::read_frame(&mut recv, MAX_FRAME).await.unwrap()
    }

    fn chunks(snap: &Snapshot, start: u64, end: u64, chunk_size: u32) -> proto::request::Kind {
        proto::request::Kind::Chunks(proto::GetChunks {
            content_root: snap.manifest().content_root.0.to_vec().into(),
            start_chunk: start,
            end_chunk: end,
            chunk_size,
        })
    }

    fn status(h: &proto::ResponseHeader) -> proto::Status {
        proto::Status::try_from(h.status).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_requests_get_typed_refusals_and_the_connection_survives() {
        let f = fixture(StreamerConfig::default().with_max_request_bytes(4096)).await;
        let conn = connect(&f, b"").await.unwrap();
        let cs = f.snap.manifest().chunk_size.bytes();
        let count = f.snap.manifest().chunk_tree().chunk_count();

        let unknown = proto::request::Kind::Manifest(proto::GetManifest {
            content_root: vec![7u8; 32].into(),
        });
        assert_eq!(
            status(&ask(&conn, unknown).await),
            proto::Status::UnknownSnapshot
        );
        // An id that tries to name a path is not a content root at all.
        let path = proto::request::Kind::Chunks(proto::GetChunks {
            content_root: b"../../../../etc/passwd".to_vec().into(),
            start_chunk: 0,
            end_chunk: 1,
            chunk_size: cs,
        });
        assert_eq!(status(&ask(&conn, path).await), proto::Status::BadRequest);
        let out = chunks(&f.snap, count, count + 1, cs);
        assert_eq!(status(&ask(&conn, out).await), proto::Status::OutOfRange);
        let empty = chunks(&f.snap, 3, 3, cs);
        assert_eq!(status(&ask(&conn, empty).await), proto::Status::OutOfRange);
        let too_big = chunks(&f.snap, 0, 5, cs);
        assert_eq!(status(&ask(&conn, too_big).await), proto::Status::TooLarge);
        let wrong_size = chunks(&f.snap, 0, 1, cs * 2);
        assert_eq!(
            status(&ask(&conn, wrong_size).await),
            proto::Status::ChunkSizeMismatch
        );

        // Garbage instead of a request: a refusal, not a crash.
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&[0, 0, 0, 5, 0xff, 0xff, 0xff, 0xff, 0xff])
            .await
            .unwrap();
        send.finish().unwrap();
        let h: proto::ResponseHeader = wire::read_frame(&mut recv, MAX_FRAME).await.unwrap();
        assert_eq!(status(&h), proto::Status::BadRequest);
        // An absurd frame length is refused without allocating it.
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&[0xff, 0xff, 0xff, 0xff]).await.unwrap();
        send.finish().unwrap();
        let h: proto::ResponseHeader = wire::read_frame(&mut recv, MAX_FRAME).await.unwrap();
        assert_eq!(status(&h), proto::Status::BadRequest);

        // Still serving on the same connection, data that checks out.
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        let request = proto::Request {
            kind: Some(chunks(&f.snap, 0, 2, cs)),
        };
        wire::write_frame(&mut send, &request).await.unwrap();
        send.finish().unwrap();
        let ok: proto::ResponseHeader = wire::read_frame(&mut recv, MAX_FRAME).await.unwrap();
        assert_eq!(status(&ok), proto::Status::Ok);
        let tree = f.snap.manifest().chunk_tree();
        assert_eq!(ok.encoded_len, tree.encoded_len(0..2).unwrap());
        let body = recv.read_to_end(1 << 20).await.unwrap();
        assert_eq!(body.len() as u64, ok.encoded_len);
        let mut data = Vec::new();
        tree.decode(0..2, &body, |_, d| {
            data.extend_from_slice(d);
            Ok(())
        })
        .unwrap();
        assert_eq!(data.len(), 2 * cs as usize);
        let stats = f.streamer.stats();
        assert_eq!(stats.requests_refused, 8);
        assert_eq!(stats.requests_served, 1);
        assert_eq!(stats.bytes_served, 2 * u64::from(cs));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connection_limits_refuse_the_excess() {
        let f = fixture(
            StreamerConfig::default()
                .with_max_connections(8)
                .with_max_connections_per_peer(1),
        )
        .await;
        // One peer, two connections: the second is refused as busy.
        let me = Keypair::generate_ed25519();
        let open = || async {
            let conn = dial(&f, &me).await.unwrap();
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            wire::write_frame(
                &mut send,
                &proto::Hello {
                    protocol_version: PROTOCOL_VERSION,
                    token: Default::default(),
                },
            )
            .await
            .unwrap();
            send.finish().unwrap();
            let welcome = wire::read_frame::<proto::Welcome>(&mut recv, 1024)
                .await
                .unwrap();
            (conn, welcome)
        };
        let (_first, w1) = open().await;
        let (second, w2) = open().await;
        assert_eq!(w1.refused, proto::Refusal::None as i32);
        assert_eq!(w2.refused, proto::Refusal::Busy as i32);
        // Without an answer from the client, the streamer closes the connection itself.
        match second.closed().await {
            quinn::ConnectionError::ApplicationClosed(c) => assert_eq!(c.error_code, close::BUSY),
            other => panic!("unexpected {other}"),
        }
        assert_eq!(f.streamer.stats().refused_busy, 1);

        // Global limit: with one slot, a second client's connection is refused outright.
        let g = fixture(StreamerConfig::default().with_max_connections(1)).await;
        let _held = connect(&g, b"").await.unwrap();
        let refused = connect(&g, b"").await;
        assert!(refused.is_err(), "second connection accepted");
        assert_eq!(g.streamer.stats().refused_busy, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_that_never_says_hello_is_dropped() {
        let f =
            fixture(StreamerConfig::default().with_auth_timeout(Duration::from_millis(300))).await;
        let conn = dial(&f, &Keypair::generate_ed25519()).await.unwrap();
        let closed = tokio::time::timeout(Duration::from_secs(5), conn.closed())
            .await
            .expect("the streamer closes the connection");
        match closed {
            quinn::ConnectionError::ApplicationClosed(c) => {
                assert_eq!(c.error_code, close::PROTOCOL)
            }
            other => panic!("unexpected {other}"),
        }
        assert_eq!(f.streamer.stats().connections_accepted, 0);
    }
}
