//! The serving side of the chunk stream: [`Streamer`] (log target `SNAPSHOT:STREAMER`).
//!
//! - `mod.rs`: binding, the accept loop and its admission rules (connection limits before any
//!   work, QUIC Retry under load, per-address limits before authentication, an IPv6 address
//!   counting as its /64), room made for a newcomer by closing the authenticated connection
//!   that serves least (idle or slow) when full, counters.
//! - `connection.rs`: one connection: handshake and token proofs, refusals, per-peer guards.
//! - `serve.rs`: one request: a manifest, a chunk range or which chunks it holds, written
//!   through one response path with pacing and write deadlines; a snapshot this node is still
//!   downloading is served from its verified chunks, and a range it does not hold yet is
//!   refused with its own status; a bounded number of peers is uploaded to at once.
//! - `slots.rs`: who is uploaded to: a bounded set of upload slots, each kept for a while
//!   others wait, and the blocks a contended holder offers each slot holder (those it has sent
//!   least), so that its uplink goes into distinct pieces a crowd then copies among itself.

mod config;
mod connection;
mod serve;
pub(crate) mod slots;

pub use config::StreamerConfig;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use libp2p::PeerId;
use libp2p::identity::Keypair;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use self::slots::{SeedOffers, UploadSlots};
use super::limit::ByteLimiter;
use super::protocol::{MAX_HAVE_BITS, TokenKey, close};
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

/// The block a seed counts what it sent in: a default request's worth of chunks.
const SEED_BLOCK_CHUNKS: u64 = 32;

/// Connections per address.
#[derive(Debug, Default, Clone, Copy)]
struct IpSlot {
    pending: usize,
    authenticated: usize,
}

/// What one peer uses of the streamer: its connections and its rate limiter.
struct PeerUsage {
    connections: usize,
    limit: Option<Arc<ByteLimiter>>,
}

/// The address group limits count by: an IPv4 address, or an IPv6 address's /64 (a host is
/// given a /64, so any of its 2^64 addresses is the same host).
pub(crate) fn ip_group(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut o = v6.octets();
                o[8..].fill(0);
                IpAddr::V6(o.into())
            }
        },
    }
}

/// What an authenticated connection did, for choosing whom to close when full.
#[derive(Debug)]
pub(crate) struct Activity {
    /// Requests being served now.
    pub(crate) requests: AtomicUsize,
    /// Data bytes served.
    pub(crate) served: std::sync::atomic::AtomicU64,
    /// Its share of the send memory: the most its send window may be.
    pub(crate) send_share: std::sync::atomic::AtomicU64,
    since: std::time::Instant,
}

impl Activity {
    fn new() -> Self {
        Self {
            requests: AtomicUsize::new(0),
            served: std::sync::atomic::AtomicU64::new(0),
            send_share: std::sync::atomic::AtomicU64::new(0),
            since: std::time::Instant::now(),
        }
    }

    /// Data bytes per second served since it was authenticated.
    fn rate(&self, now: std::time::Instant) -> f64 {
        let secs = now
            .saturating_duration_since(self.since)
            .as_secs_f64()
            .max(1e-3);
        self.served.load(Ordering::Relaxed) as f64 / secs
    }
}

/// An authenticated connection: its id, the connection, its address group and what it did.
pub(crate) struct Served {
    id: usize,
    conn: quinn::Connection,
    group: IpAddr,
    activity: Arc<Activity>,
}

impl Shared {
    fn uploads(&self) -> std::sync::MutexGuard<'_, UploadSlots<PeerId>> {
        self.uploads.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether more peers want uploads than there are slots.
    pub(crate) fn uploads_contended(&self) -> bool {
        self.uploads().contended(std::time::Instant::now())
    }

    /// What this seed offers `peer` of the snapshot `root` (of `chunks` chunks), in blocks of
    /// `block`, given what it holds: a few blocks if it gets an upload slot, none if not.
    pub(crate) fn offer(
        &self,
        root: &ContentRoot,
        chunks: u64,
        block: u64,
        holding: &[u8],
        peer: PeerId,
    ) -> Vec<u8> {
        let now = std::time::Instant::now();
        let n = chunks.div_ceil(block.max(1)).div_ceil(8) as usize;
        if self.upload_slot(peer).is_none() {
            return vec![0; n];
        }
        let mut offers = self.seed_offers.lock().unwrap_or_else(|p| p.into_inner());
        if !offers.contains_key(root) && offers.len() >= OPEN_SOURCES {
            let any = *offers.keys().next().expect("not empty");
            offers.remove(&any);
        }
        // The seed counts in blocks of its own choosing (a default request's worth of chunks,
        // or coarser for a huge snapshot), whatever block size this asker picked.
        let own_block = SEED_BLOCK_CHUNKS.max(chunks.div_ceil(MAX_HAVE_BITS));
        offers
            .entry(*root)
            .or_insert_with(|| {
                SeedOffers::new(chunks, own_block, rand::random::<u64>() as usize, now)
            })
            .answer(slots::OFFER_BLOCKS, block, Some(holding), now)
    }

    /// Chunks `range` of the published snapshot `root` were sent (for the offers).
    pub(crate) fn offered_sent(&self, root: &ContentRoot, range: std::ops::Range<u64>) {
        let mut offers = self.seed_offers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(o) = offers.get_mut(root) {
            o.sent(range);
        }
    }

    /// `peer` has no connection left: its upload slot, if it holds one, is free.
    pub(crate) fn release_upload(&self, peer: PeerId) {
        self.uploads().release(peer);
    }

    /// An upload slot for one response to `peer`, if it may be sent chunks now (see
    /// `slots.rs`); held until the guard is dropped.
    pub(crate) fn upload_slot(&self, peer: PeerId) -> Option<UploadGuard<'_>> {
        // (The lock is released before a guard exists: dropping one takes it.)
        let now = std::time::Instant::now();
        let exchange = self.store.exchange();
        let admitted = self.uploads().admit(peer, now, |p| exchange.given(p, now));
        admitted.then(|| UploadGuard {
            shared: self,
            peer,
            sent: 0,
        })
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
            .uploads()
            .done(self.peer, self.sent, std::time::Instant::now());
    }
}

/// How long a connection is given before it can be judged idle or slow.
const EVICTION_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// A snapshot being served: its chunk source, and the pin that keeps retention off it.
type OpenSource = (ContentRoot, Arc<ChunkSource>, Arc<ServingPin>);

pub(crate) struct Shared {
    store: SnapshotStore,
    local: PeerId,
    token: Option<TokenKey>,
    config: StreamerConfig,
    metrics: Metrics,
    /// Connections open, authenticated or not.
    connections: AtomicUsize,
    /// Connections still in their handshake.
    pending: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, IpSlot>>,
    per_peer: Mutex<HashMap<PeerId, PeerUsage>>,
    global_limit: Option<ByteLimiter>,
    sources: Mutex<Vec<OpenSource>>,
    /// The peers uploaded to now.
    uploads: Mutex<UploadSlots<PeerId>>,
    /// What this node offers of the snapshots it seeds, when many ask (a few at most).
    seed_offers: Mutex<HashMap<ContentRoot, SeedOffers>>,
    /// Authenticated connections, each with its share of `send_memory` as its send window.
    serving: Mutex<Vec<Served>>,
    /// Response memory, in KiB permits.
    memory: Semaphore,
    memory_kib: u32,
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
        let memory_kib =
            (config.response_memory / 1024).clamp(1024, u64::from(u32::MAX >> 3)) as u32;
        if token.is_none() {
            tracing::warn!(target: STREAMER_TARGET, %local_addr, "no SNAPSHOT_TOKEN configured: serving snapshots to any peer");
        }
        let shared = Arc::new(Shared {
            store,
            local: keypair.public().to_peer_id(),
            token: token.map(TokenKey::new),
            global_limit: config.rate_limit.map(ByteLimiter::new),
            metrics,
            connections: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
            per_peer: Mutex::new(HashMap::new()),
            sources: Mutex::new(Vec::new()),
            seed_offers: Mutex::new(HashMap::new()),
            uploads: Mutex::new(UploadSlots::new(
                config.max_uploads,
                config.upload_slot,
                slots::UPLOAD_LINGER,
                config.min_client_rate,
            )),
            serving: Mutex::new(Vec::new()),
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
        let m = &self.shared.metrics;
        StreamerStats {
            connections_accepted: m.accepted_connections.get(),
            refused_unauthorized: m.refusals(RefusedReason::Unauthorized),
            refused_busy: m.refusals(RefusedReason::Busy),
            closed_too_slow: m.refusals(RefusedReason::TooSlow),
            connections_open: self.shared.connections.load(Ordering::Relaxed) as u64,
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

impl Shared {
    fn lock_ips(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, IpSlot>> {
        self.per_ip.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a new connection from `ip` before any work is done for it, or says why not. A
    /// full streamer makes room by closing the connection that serves least, when one serves
    /// less than `min_client_rate` (idle, or reading slowly): connections that hold slots and
    /// take nothing cannot keep honest downloaders out.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, RefusedReason> {
        let ip = ip_group(ip);
        if self.connections.load(Ordering::Acquire) >= self.config.max_connections
            && !self.evict_one()
        {
            return Err(RefusedReason::Busy);
        }
        {
            let mut ips = self.lock_ips();
            let slot = ips.entry(ip).or_default();
            if slot.pending >= self.config.max_pending_per_ip {
                return Err(RefusedReason::Busy);
            }
            slot.pending += 1;
        }
        self.connections.fetch_add(1, Ordering::AcqRel);
        self.pending.fetch_add(1, Ordering::AcqRel);
        Ok(Slot {
            shared: self.clone(),
            ip,
            authenticated: false,
        })
    }

    /// Closes the authenticated connection that serves least, if one serves less than
    /// `min_client_rate` after its grace (the most crowded address group first). Returns
    /// whether one was closed.
    fn evict_one(&self) -> bool {
        let now = std::time::Instant::now();
        let serving = self.serving.lock().unwrap_or_else(|p| p.into_inner());
        let mut per_group: HashMap<IpAddr, usize> = HashMap::new();
        for s in serving.iter() {
            *per_group.entry(s.group).or_default() += 1;
        }
        let min_rate = self.config.min_client_rate as f64;
        let victim = serving
            .iter()
            .filter(|s| now.saturating_duration_since(s.activity.since) >= EVICTION_GRACE)
            .map(|s| (s, s.activity.rate(now)))
            .filter(|(_, rate)| *rate < min_rate)
            .min_by(|(a, ra), (b, rb)| {
                per_group[&b.group]
                    .cmp(&per_group[&a.group])
                    .then(ra.total_cmp(rb))
            })
            .map(|(s, _)| s.conn.clone());
        drop(serving);
        match victim {
            Some(conn) => {
                self.metrics.refused(RefusedReason::Evicted);
                tracing::debug!(target: STREAMER_TARGET, remote = %conn.remote_address(), "full: closing the connection that serves least to make room");
                conn.close(close::EVICTED, b"busy: made room for another downloader");
                true
            }
            None => false,
        }
    }
}

/// A connection's place in the limits, released on every path (drop).
pub(crate) struct Slot {
    shared: Arc<Shared>,
    ip: IpAddr,
    authenticated: bool,
}

impl Slot {
    /// The connection proved the token: from pending to authenticated, if its address has room.
    fn authenticate(&mut self) -> bool {
        let mut ips = self.shared.lock_ips();
        let slot = ips.entry(self.ip).or_default();
        if slot.authenticated >= self.shared.config.max_connections_per_ip {
            return false;
        }
        slot.pending = slot.pending.saturating_sub(1);
        slot.authenticated += 1;
        self.authenticated = true;
        self.shared.pending.fetch_sub(1, Ordering::AcqRel);
        true
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        {
            let mut ips = self.shared.lock_ips();
            if let Some(slot) = ips.get_mut(&self.ip) {
                if self.authenticated {
                    slot.authenticated = slot.authenticated.saturating_sub(1);
                } else {
                    slot.pending = slot.pending.saturating_sub(1);
                }
                if slot.pending == 0 && slot.authenticated == 0 {
                    ips.remove(&self.ip);
                }
            }
        }
        if !self.authenticated {
            self.shared.pending.fetch_sub(1, Ordering::AcqRel);
        }
        self.shared.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn accept_loop(endpoint: quinn::Endpoint, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let remote = incoming.remote_address();
                // Under load, a client must first show it receives at its address: a spoofed
                // source costs the server one small Retry packet and no state.
                if shared.pending.load(Ordering::Acquire) >= shared.config.retry_after_pending
                    && !incoming.remote_address_validated()
                    && incoming.may_retry()
                {
                    shared.metrics.refused(RefusedReason::Retry);
                    let _ = incoming.retry();
                    continue;
                }
                let slot = match shared.admit(remote.ip()) {
                    Ok(slot) => slot,
                    Err(reason) => {
                        shared.metrics.refused(reason);
                        tracing::debug!(target: STREAMER_TARGET, %remote, "connection limit reached; refusing");
                        incoming.refuse();
                        continue;
                    }
                };
                let shared = shared.clone();
                let span = tracing::debug_span!(target: STREAMER_TARGET, "connection", %remote);
                connections.spawn(tracing::Instrument::instrument(async move {
                    if let Err(e) = connection::serve(incoming, slot, &shared).await {
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
