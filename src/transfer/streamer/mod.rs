//! The serving side of the chunk stream: [`Streamer`] (log target `SNAPSHOT:STREAMER`).
//!
//! - `admission.rs`: the rules, a pure state machine: connection limits before any work, QUIC
//!   Retry under load, per-address and per-peer places, room made for a newcomer, send and
//!   response memory shares, upload slots.
//! - `mod.rs`: binding, the accept loop, and the driver that carries out what the rules ask.
//! - `connection.rs`: one connection: handshake and token proofs, refusals.
//! - `serve.rs`: one request: a manifest, a chunk range or which chunks it holds, written
//!   through one response path with pacing and write deadlines; a snapshot this node is still
//!   downloading is served from its verified chunks, and a range it does not hold yet is
//!   refused with its own status; a bounded number of peers is uploaded to at once.
//! - `slots.rs`: who is uploaded to: a bounded set of upload slots, each kept for a while
//!   others wait, and the blocks a contended holder suggests each slot holder (those it has sent
//!   least), so that its uplink goes into distinct pieces a crowd then copies among itself.

mod admission;
mod config;
mod connection;
mod serve;
pub(crate) mod slots;

pub use config::StreamerConfig;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use libp2p::PeerId;
use libp2p::identity::Keypair;
use tokio::sync::Notify;
use tokio::task::JoinSet;

use self::admission::{Admission, ConnId, Incoming, Output};
use self::slots::Suggestions;
use super::limit::ByteLimiter;
use super::protocol::{TokenKey, close};
use super::tls::{self, EndpointError};
use super::{STREAMER_TARGET, Token};
use crate::chunk::ChunkSource;
use crate::config_error::ConfigError;
use crate::hash::ContentRoot;
use crate::metrics::{Metrics, Outcome, RefusedReason};
use crate::snapshot::{ServingPin, SnapshotStore};

/// Counters of a [`Streamer`] since it started (read from its [`Metrics`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StreamerStats {
    /// Connections that proved the token.
    pub connections_accepted: u64,
    /// Connections refused for a wrong or missing token proof.
    pub refused_unauthorized: u64,
    /// Connections refused because a limit was reached.
    pub refused_busy: u64,
    /// Connections closed because the client did not read its responses.
    pub closed_too_slow: u64,
    /// Connections open now (authenticated or not).
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

/// Why a [`Streamer`] could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StreamerError {
    /// A setting cannot work.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Setting up the QUIC endpoint failed (address in use, bind error, certificate).
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    /// The endpoint could not be created on the bound socket.
    #[error("cannot start the QUIC endpoint: {0}")]
    Io(#[from] std::io::Error),
}

/// Open chunk sources, so that a download keeps going from the same open files even if
/// retention deletes the snapshot meanwhile, and files are not reopened per request.
const OPEN_SOURCES: usize = 4;

/// A connection the driver holds: the connection, and the most its send window may be.
struct Held {
    conn: quinn::Connection,
    send_share: Arc<AtomicU64>,
}

/// A snapshot being served: its chunk source, and the pin that keeps retention off it.
type OpenSource = (ContentRoot, Arc<ChunkSource>, Arc<ServingPin>);

/// What the streamer's tasks share: the rules ([`Admission`]) and what carries them out.
pub(crate) struct Shared {
    store: SnapshotStore,
    local: PeerId,
    token: Option<TokenKey>,
    config: StreamerConfig,
    metrics: Metrics,
    global_limit: Option<ByteLimiter>,
    sources: Mutex<Vec<OpenSource>>,
    /// The rules: who is let in, the places, the memory, the upload slots.
    admission: Mutex<Admission>,
    /// Woken when response memory is given back.
    memory_freed: Notify,
    /// The connections let in, for what the rules ask of them.
    held: Mutex<HashMap<ConnId, Held>>,
    /// Each peer's rate limiter, shared by its connections (with their count).
    limiters: Mutex<HashMap<PeerId, (usize, Arc<ByteLimiter>)>>,
    /// What this node suggests of the snapshots it seeds, when many ask.
    suggestions: Mutex<Suggestions>,
}

/// Serves the snapshots of a [`SnapshotStore`] over QUIC to downloaders that prove the token.
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
    /// `token` is the shared token (`None`: serve any peer, with a warning); `metrics` counts
    /// what is served and refused. Must be called within a tokio runtime.
    pub fn bind(
        keypair: &Keypair,
        store: SnapshotStore,
        config: StreamerConfig,
        token: Option<&Token>,
        metrics: Metrics,
    ) -> Result<Self, StreamerError> {
        config.validate()?;
        let server = tls::server_config(keypair, &config.transport)?;
        let socket = tls::bind_socket(config.listen, &config.transport)?;
        let endpoint = quinn::Endpoint::new(
            tls::endpoint_config(&config.transport),
            Some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )?;
        let local_addr = endpoint.local_addr()?;
        if token.is_none() {
            tracing::warn!(target: STREAMER_TARGET, %local_addr, "no SNAPSHOT_TOKEN configured: serving snapshots to any peer");
        }
        let shared = Arc::new(Shared {
            store,
            local: keypair.public().to_peer_id(),
            token: token.map(TokenKey::new),
            global_limit: config.rate_limit.map(ByteLimiter::new),
            metrics,
            sources: Mutex::new(Vec::new()),
            admission: Mutex::new(Admission::new(config.limits())),
            memory_freed: Notify::new(),
            held: Mutex::new(HashMap::new()),
            limiters: Mutex::new(HashMap::new()),
            suggestions: Mutex::new(Suggestions::new(OPEN_SOURCES)),
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
        let m = &self.shared.metrics;
        StreamerStats {
            connections_accepted: m.accepted_connections.get(),
            refused_unauthorized: m.refusals(RefusedReason::Unauthorized),
            refused_busy: m.refusals(RefusedReason::Busy),
            closed_too_slow: m.refusals(RefusedReason::TooSlow),
            connections_open: self.shared.admission().counts().1 as u64,
            requests_served: m.served_count(Outcome::Ok),
            requests_refused: m.served_count(Outcome::Refused),
            chunks_served: m.served_chunks.get(),
            bytes_served: m.served_bytes.get(),
        }
    }

    /// Closes every connection (telling each client why) and stops serving; waits, briefly,
    /// for the closes to go out.
    pub async fn shutdown(self) {
        self.close().await;
    }

    /// Closes every connection (telling each client why) and stops accepting; the returned
    /// future waits, briefly, for the closes to go out.
    pub fn close(&self) -> impl std::future::Future<Output = ()> + Send + use<> {
        self.endpoint.close(close::SHUTDOWN, b"shutting down");
        self.task.abort();
        let endpoint = self.endpoint.clone();
        async move {
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(1), endpoint.wait_idle()).await;
        }
    }
}

impl Drop for Streamer {
    fn drop(&mut self) {
        self.endpoint.close(close::SHUTDOWN, b"shutting down");
        self.task.abort();
    }
}

/// Takes a lock, whether or not a task panicked while holding it.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn admission(&self) -> MutexGuard<'_, Admission> {
        lock(&self.admission)
    }

    /// Carries out what the rules asked: closes to make room, send windows.
    fn carry_out(&self) {
        loop {
            let Some(output) = self.admission().poll_output() else {
                return;
            };
            let held = lock(&self.held);
            match output {
                Output::Evict(id) => {
                    if let Some(h) = held.get(&id) {
                        self.metrics.refused(RefusedReason::Evicted);
                        tracing::debug!(target: STREAMER_TARGET, remote = %h.conn.remote_address(), "full: closing the connection that serves least to make room");
                        h.conn
                            .close(close::EVICTED, b"busy: made room for another downloader");
                    }
                }
                Output::SendShare(id, share) => {
                    if let Some(h) = held.get(&id) {
                        h.send_share.store(share, Ordering::Relaxed);
                        h.conn.set_send_window(share);
                    }
                }
            }
        }
    }

    /// Whether more peers want uploads than there are slots.
    pub(crate) fn uploads_contended(&self) -> bool {
        self.admission().contended(Instant::now())
    }

    /// What this seed suggests an asker that holds an upload slot of the snapshot `root` (of
    /// `chunks` chunks), in blocks of `block`, given what the asker holds: a few blocks.
    pub(crate) fn suggest(
        &self,
        root: &ContentRoot,
        chunks: u64,
        block: u64,
        holding: &[u8],
        asker: PeerId,
    ) -> Vec<u8> {
        lock(&self.suggestions).answer(root, chunks, block, holding, &asker, Instant::now())
    }

    /// `asker` was let through with a request for chunks `range` of the published snapshot
    /// `root` (for the suggestions).
    pub(crate) fn suggested_requested(
        &self,
        root: &ContentRoot,
        chunks: u64,
        range: std::ops::Range<u64>,
        asker: PeerId,
    ) {
        lock(&self.suggestions).requested(root, chunks, range, &asker);
    }

    /// Chunks `range` of the published snapshot `root` were sent (for the suggestions).
    pub(crate) fn suggested_sent(
        &self,
        root: &ContentRoot,
        chunks: u64,
        range: std::ops::Range<u64>,
    ) {
        let first = lock(&self.suggestions).sent(root, chunks, range);
        if let Some(c) = first {
            tracing::info!(target: STREAMER_TARGET, root = %root.short(), secs = c.after.as_secs_f64(),
                blocks = c.blocks, repeated = c.repeated,
                "one whole copy sent: every block left this node at least once");
        }
    }

    /// An upload slot for one response to `peer`, if it may be sent chunks now (see
    /// `slots.rs`); held until the guard is dropped.
    pub(crate) fn upload_slot(&self, peer: PeerId) -> Option<UploadGuard<'_>> {
        let now = Instant::now();
        let exchange = self.store.exchange();
        let admitted = self
            .admission()
            .upload_slot(peer, now, |p| exchange.given(p, now));
        admitted.then(|| UploadGuard {
            shared: self,
            peer,
            sent: 0,
        })
    }

    /// `bytes` of response memory for a response on `conn`, waited for within the request
    /// timeout (taken whole when its peer's, its address group's and the streamer's shares
    /// have room); `None` if it did not come in time.
    pub(crate) async fn memory(&self, conn: ConnId, bytes: u64) -> Option<MemoryGuard<'_>> {
        let deadline = tokio::time::Instant::now() + self.config.request_timeout;
        loop {
            let freed = self.memory_freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if self.admission().reserve_memory(conn, bytes) {
                return Some(MemoryGuard {
                    shared: self,
                    conn,
                    bytes,
                });
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return None;
            }
        }
    }

    /// `bytes` of have-answer memory for `conn`, if there is room now.
    pub(crate) fn have_memory(&self, conn: ConnId, bytes: u64) -> Option<HaveGuard<'_>> {
        self.admission()
            .reserve_have(conn, bytes)
            .then_some(HaveGuard {
                shared: self,
                conn,
                bytes,
            })
    }

    /// `conn` handed `bytes` data bytes to its client.
    pub(crate) fn served_on(&self, conn: ConnId, bytes: u64) {
        self.admission().handle_served(conn, bytes);
    }

    /// `conn` proved the token as `peer`: its places are taken (or it is busy), and its peer's
    /// rate limiter is returned.
    fn authenticated(
        &self,
        conn: ConnId,
        peer: PeerId,
    ) -> Result<Option<Arc<ByteLimiter>>, RefusedReason> {
        let taken = self
            .admission()
            .handle_authenticated(conn, peer, Instant::now());
        self.carry_out();
        taken?;
        let Some(rate) = self.config.rate_limit_per_peer else {
            return Ok(None);
        };
        let mut limiters = lock(&self.limiters);
        let entry = limiters
            .entry(peer)
            .or_insert_with(|| (0, Arc::new(ByteLimiter::new(rate))));
        entry.0 += 1;
        Ok(Some(entry.1.clone()))
    }
}

/// One response's hold on its peer's upload slot.
pub(crate) struct UploadGuard<'a> {
    shared: &'a Shared,
    peer: PeerId,
    /// Data bytes the response sent.
    pub(crate) sent: u64,
}

impl Drop for UploadGuard<'_> {
    fn drop(&mut self) {
        self.shared
            .admission()
            .upload_done(self.peer, self.sent, Instant::now());
    }
}

/// Response memory a response holds, given back when dropped.
pub(crate) struct MemoryGuard<'a> {
    shared: &'a Shared,
    conn: ConnId,
    bytes: u64,
}

impl Drop for MemoryGuard<'_> {
    fn drop(&mut self) {
        self.shared
            .admission()
            .release_memory(self.conn, self.bytes);
        self.shared.memory_freed.notify_waiters();
    }
}

/// Have-answer memory a response holds, given back when dropped.
pub(crate) struct HaveGuard<'a> {
    shared: &'a Shared,
    conn: ConnId,
    bytes: u64,
}

impl Drop for HaveGuard<'_> {
    fn drop(&mut self) {
        self.shared.admission().release_have(self.conn, self.bytes);
    }
}

/// A connection's places in the rules, given back on every path (drop).
pub(crate) struct ConnGuard {
    shared: Arc<Shared>,
    pub(crate) id: ConnId,
    /// Its peer, once authenticated (its limiter's count).
    peer: Option<PeerId>,
}

impl ConnGuard {
    /// The connection is let in: it is held for what the rules may ask of it.
    fn hold(&self, conn: &quinn::Connection) -> Arc<AtomicU64> {
        let send_share = Arc::new(AtomicU64::new(0));
        lock(&self.shared.held).insert(
            self.id,
            Held {
                conn: conn.clone(),
                send_share: send_share.clone(),
            },
        );
        send_share
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        lock(&self.shared.held).remove(&self.id);
        self.shared.admission().handle_closed(self.id);
        self.shared.carry_out();
        if let Some(peer) = self.peer {
            let mut limiters = lock(&self.shared.limiters);
            if let Some(entry) = limiters.get_mut(&peer) {
                entry.0 -= 1;
                if entry.0 == 0 {
                    limiters.remove(&peer);
                }
            }
        }
    }
}

async fn accept_loop(endpoint: quinn::Endpoint, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let remote = incoming.remote_address();
                let decision = shared.admission().handle_incoming(
                    remote.ip(),
                    incoming.remote_address_validated(),
                    incoming.may_retry(),
                    Instant::now(),
                );
                shared.carry_out();
                let id = match decision {
                    Incoming::Accept(id) => id,
                    // Under load, a client must first show it receives at its address: a
                    // spoofed source costs the server one small Retry packet and no state.
                    Incoming::Retry => {
                        shared.metrics.refused(RefusedReason::Retry);
                        let _ = incoming.retry();
                        continue;
                    }
                    Incoming::Refuse(reason) => {
                        shared.metrics.refused(reason);
                        tracing::debug!(target: STREAMER_TARGET, %remote, "connection limit reached; refusing");
                        incoming.refuse();
                        continue;
                    }
                };
                let guard = ConnGuard { shared: shared.clone(), id, peer: None };
                let shared = shared.clone();
                let span = tracing::debug_span!(target: STREAMER_TARGET, "connection", %remote);
                connections.spawn(tracing::Instrument::instrument(async move {
                    if let Err(e) = connection::serve(incoming, guard, &shared).await {
                        tracing::debug!(target: STREAMER_TARGET, error = %e, "connection ended");
                    }
                }, span));
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Why a connection or request ended early (logged, never sent as snapshot data).
#[derive(Debug, thiserror::Error)]
pub(crate) enum ServeError {
    #[error("handshake: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("no handshake and token proof within the auth timeout")]
    AuthTimeout,
    #[error("frame: {0}")]
    Frame(#[from] crate::frame::FrameError),
    #[error("write: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("stream closed: {0}")]
    Closed(#[from] quinn::ClosedStream),
    #[error("refused: {0}")]
    Refused(&'static str),
    #[error("the client did not take a response within the write deadline")]
    TooSlow,
}
