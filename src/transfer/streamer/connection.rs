//! One served connection: the handshake (the client proves the token, the server proves it
//! back), refusals, the per-peer and per-address limits, and the request loop, which closes a
//! connection that opens no request for `idle_close`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use libp2p::PeerId;
use quinn::VarInt;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::{Activity, PeerUsage, ServeError, Served, Shared, Slot, serve};
use crate::metrics::RefusedReason;
use crate::proto;
use crate::transfer::STREAMER_TARGET;
use crate::transfer::limit::ByteLimiter;
use crate::transfer::protocol::{
    self, MAX_HELLO, PROTOCOL_VERSION, Refusal, Role, close, read_frame, write_frame,
};
use crate::transfer::tls;

/// How long a refused client is given to read its refusal and close before the streamer closes
/// the connection itself.
const REFUSAL_GRACE: Duration = Duration::from_secs(2);

/// What one authenticated connection may use while it is served.
pub(super) struct Allowance {
    /// The peer's rate limiter, shared by its connections.
    pub(super) limit: Option<Arc<ByteLimiter>>,
    /// The connection's share of the response memory, in KiB permits: a few connections
    /// cannot take all of it.
    pub(super) memory: Semaphore,
    /// How many permits the share has.
    pub(super) memory_kib: u32,
    /// What it did, for choosing whom to close when full.
    pub(super) activity: Arc<Activity>,
    /// The peer it serves.
    pub(super) peer: PeerId,
    /// Where the connection comes from.
    pub(super) remote: std::net::SocketAddr,
    /// The connection, for its send window.
    pub(super) conn: quinn::Connection,
    /// Responses are sent one at a time, in the order their requests came: each goes out at
    /// the connection's whole rate, and a response's deadline counts from its turn, not from
    /// the time it waited behind the others (a busy uplink is not a slow client).
    pub(super) turn: tokio::sync::Mutex<()>,
}

/// Serves one connection until it ends. `slot` holds its place in the limits until then.
pub(super) async fn serve(
    incoming: quinn::Incoming,
    mut slot: Slot,
    shared: &Arc<Shared>,
) -> Result<(), ServeError> {
    let (conn, peer, mut send, hello) = handshake(incoming, shared).await?;
    let (proof, limit) = match admit(shared, &conn, peer, &hello, &mut slot) {
        Ok(v) => v,
        Err(refusal) => {
            let reason = match refusal {
                Refusal::Unauthorized => RefusedReason::Unauthorized,
                Refusal::Busy => RefusedReason::Busy,
                Refusal::Version => RefusedReason::Protocol,
            };
            shared.metrics.refused(reason);
            refuse(&conn, send, refusal).await;
            return Err(ServeError::Refused(refusal.message()));
        }
    };
    let share = per_connection_kib(shared);
    let allowance = Arc::new(Allowance {
        limit,
        memory: Semaphore::new(share as usize),
        memory_kib: share,
        activity: Arc::new(Activity::new()),
        peer,
        remote: conn.remote_address(),
        conn: conn.clone(),
        turn: tokio::sync::Mutex::new(()),
    });
    let _guard = PeerGuard {
        shared,
        peer,
        conn: conn.stable_id(),
    };
    enter_serving(shared, &conn, &slot, &allowance.activity);
    shared.metrics.accepted_connections.inc();
    shared.metrics.active_transfers.inc();
    write_frame(&mut send, &protocol::welcome(Ok(proof))).await?;
    send.finish()?;
    // Proven: now it may open its requests.
    conn.set_max_concurrent_bi_streams(VarInt::from_u32(shared.config.max_streams_per_connection));
    tracing::debug!(target: STREAMER_TARGET, %peer, remote = %conn.remote_address(), "downloader connected");
    serve_requests(&conn, peer, shared, &allowance).await
}

/// The TLS handshake and the client's hello, within one deadline: a client that stalls
/// anywhere before proving the token holds its slot for at most `auth_timeout`.
async fn handshake(
    incoming: quinn::Incoming,
    shared: &Shared,
) -> Result<(quinn::Connection, PeerId, quinn::SendStream, proto::Hello), ServeError> {
    let deadline = tokio::time::Instant::now() + shared.config.auth_timeout;
    let conn = match tokio::time::timeout_at(deadline, async { incoming.accept()?.await }).await {
        Ok(conn) => conn?,
        Err(_) => {
            shared.metrics.refused(RefusedReason::Protocol);
            return Err(ServeError::AuthTimeout);
        }
    };
    let Some(peer) = tls::remote_peer_id(&conn) else {
        conn.close(close::PROTOCOL, b"no libp2p certificate");
        return Err(ServeError::Refused("no libp2p certificate"));
    };
    let hello = tokio::time::timeout_at(deadline, async {
        let (send, mut recv) = conn.accept_bi().await?;
        let hello: proto::Hello = read_frame(&mut recv, MAX_HELLO).await?;
        Ok::<_, ServeError>((send, hello))
    })
    .await;
    match hello {
        Ok(Ok((send, hello))) => Ok((conn, peer, send, hello)),
        Ok(Err(e)) => {
            shared.metrics.refused(RefusedReason::Protocol);
            conn.close(close::PROTOCOL, b"bad hello");
            Err(e)
        }
        Err(_) => {
            shared.metrics.refused(RefusedReason::Protocol);
            conn.close(close::PROTOCOL, b"no hello in time");
            Err(ServeError::AuthTimeout)
        }
    }
}

/// Serves the requests of an authenticated connection, each on its own stream, until the
/// connection ends; closes it once no request has been open for `idle_close`.
async fn serve_requests(
    conn: &quinn::Connection,
    peer: PeerId,
    shared: &Arc<Shared>,
    allowance: &Arc<Allowance>,
) -> Result<(), ServeError> {
    let mut requests = JoinSet::new();
    let idle = tokio::time::sleep(shared.config.idle_close);
    tokio::pin!(idle);
    loop {
        tokio::select! {
            stream = conn.accept_bi() => {
                let (send, recv) = match stream {
                    Ok(s) => s,
                    Err(quinn::ConnectionError::ApplicationClosed(_))
                    | Err(quinn::ConnectionError::LocallyClosed) => return Ok(()),
                    Err(e) => return Err(e.into()),
                };
                requests.spawn(handle_request(send, recv, conn.clone(), peer, shared.clone(), allowance.clone()));
            }
            Some(_) = requests.join_next(), if !requests.is_empty() => {}
            () = &mut idle, if requests.is_empty() => {
                shared.metrics.refused(RefusedReason::Idle);
                tracing::debug!(target: STREAMER_TARGET, %peer, "no request for the idle limit; closing");
                conn.close(close::IDLE, b"idle");
                return Ok(());
            }
        }
        // Any request opened or ended: the idle limit counts from now.
        idle.as_mut()
            .reset(tokio::time::Instant::now() + shared.config.idle_close);
    }
}

/// Serves one request stream of `peer`'s connection, counting it as the connection's activity.
async fn handle_request(
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    conn: quinn::Connection,
    peer: PeerId,
    shared: Arc<Shared>,
    allowance: Arc<Allowance>,
) {
    allowance.activity.requests.fetch_add(1, Ordering::AcqRel);
    let result = serve::request(send, recv, &shared, &allowance).await;
    allowance.activity.requests.fetch_sub(1, Ordering::AcqRel);
    match result {
        Err(ServeError::TooSlow) => {
            shared.metrics.refused(RefusedReason::TooSlow);
            tracing::debug!(target: STREAMER_TARGET, %peer, "client does not read its responses; closing");
            conn.close(close::TOO_SLOW, b"responses not read in time");
        }
        Err(e) => tracing::debug!(target: STREAMER_TARGET, %peer, error = %e, "request ended"),
        Ok(()) => {}
    }
}

/// One connection's share of the response memory, in KiB: a quarter of it, and never less
/// than the largest request.
fn per_connection_kib(shared: &Shared) -> u32 {
    let quarter = shared.memory_kib / 4;
    let largest = (shared.config.max_request_bytes.div_ceil(1024) as u32).min(shared.memory_kib);
    quarter.max(largest)
}

/// The checks a hello passes: version, token proof, then the limits of the peer and its
/// address. Returns the server's own proof and the peer's rate limiter.
fn admit(
    shared: &Shared,
    conn: &quinn::Connection,
    peer: PeerId,
    hello: &proto::Hello,
    slot: &mut Slot,
) -> Result<(Option<blake3::Hash>, Option<Arc<ByteLimiter>>), Refusal> {
    if hello.protocol_version != PROTOCOL_VERSION {
        return Err(Refusal::Version);
    }
    let proof = match &shared.token {
        Some(key) => {
            if !key.check(conn, Role::Client, &peer, &shared.local, &hello.proof) {
                tracing::warn!(target: STREAMER_TARGET, %peer, "refused: wrong or missing SNAPSHOT_TOKEN");
                return Err(Refusal::Unauthorized);
            }
            Some(
                key.proof(conn, Role::Server, &peer, &shared.local)
                    .ok_or(Refusal::Unauthorized)?,
            )
        }
        None => None,
    };
    if !slot.authenticate() {
        return Err(Refusal::Busy);
    }
    let limit = enter_peer(shared, peer).ok_or(Refusal::Busy)?;
    Ok((proof, limit))
}

/// Refuses a connection in band (the client reads why on its hello stream), then closes it.
/// The refusal goes out as stream data rather than only as a connection close, so it reaches
/// the client even when a close would be lost or held back.
async fn refuse(conn: &quinn::Connection, mut send: quinn::SendStream, refusal: Refusal) {
    let welcome = protocol::welcome(Err(refusal));
    if write_frame(&mut send, &welcome).await.is_ok() && send.finish().is_ok() {
        let _ = tokio::time::timeout(REFUSAL_GRACE, conn.closed()).await;
    }
    conn.close(refusal.code(), refusal.message().as_bytes());
}

/// Registers a connection of `peer`; `None` when it has too many.
fn enter_peer(shared: &Shared, peer: PeerId) -> Option<Option<Arc<ByteLimiter>>> {
    let mut peers = shared.per_peer.lock().unwrap_or_else(|p| p.into_inner());
    let slot = peers.entry(peer).or_insert_with(|| PeerUsage {
        connections: 0,
        limit: shared
            .config
            .rate_limit_per_peer
            .map(|r| Arc::new(ByteLimiter::new(r))),
    });
    if slot.connections >= shared.config.max_connections_per_peer {
        if slot.connections == 0 {
            peers.remove(&peer);
        }
        return None;
    }
    slot.connections += 1;
    Some(slot.limit.clone())
}

/// The send window of each of `connections` authenticated connections: an equal share of
/// `send_memory`, at most the transport's send window, at least [`MIN_SEND_WINDOW`].
pub(super) fn send_share(send_memory: u64, max_window: u64, connections: usize) -> u64 {
    (send_memory / connections.max(1) as u64).clamp(MIN_SEND_WINDOW.min(max_window), max_window)
}

/// The smallest send window a connection is given however many there are.
const MIN_SEND_WINDOW: u64 = 256 << 10;

/// Gives every authenticated connection its share of the send memory.
fn rebalance(shared: &Shared, serving: &[Served]) {
    let share = send_share(
        shared.config.send_memory,
        shared.config.transport.send_window,
        serving.len(),
    );
    for s in serving {
        s.activity.send_share.store(share, Ordering::Relaxed);
        s.conn.set_send_window(share);
    }
}

/// The send window of a connection about to be sent a response: what its path carries in
/// one round trip, twice over (what is in flight, and as much waiting to go), within its
/// share of the send memory. More would only queue inside this server, where a response
/// waits behind the others for seconds while its client counts the time, and a client that
/// gives up on it has made the uplink carry bytes nobody takes.
pub(super) fn send_window_now(conn: &quinn::Connection, share: u64) -> u64 {
    let cwnd = conn.stats().path.cwnd;
    (2 * cwnd).clamp(MIN_SEND_WINDOW.min(share), share.max(1))
}

/// Adds an authenticated connection to those sharing the send memory (and those that may be
/// closed to make room).
fn enter_serving(shared: &Shared, conn: &quinn::Connection, slot: &Slot, activity: &Arc<Activity>) {
    let mut serving = shared.serving.lock().unwrap_or_else(|p| p.into_inner());
    serving.push(Served {
        id: conn.stable_id(),
        conn: conn.clone(),
        group: slot.ip,
        activity: activity.clone(),
    });
    rebalance(shared, &serving);
}

/// An authenticated connection of a peer; leaves the peer's table, the send-memory share and
/// the gauge on drop.
struct PeerGuard<'a> {
    shared: &'a Shared,
    peer: PeerId,
    conn: usize,
}

impl Drop for PeerGuard<'_> {
    fn drop(&mut self) {
        {
            let mut serving = self
                .shared
                .serving
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            serving.retain(|s| s.id != self.conn);
            rebalance(self.shared, &serving);
        }
        self.shared.metrics.active_transfers.dec();
        let mut peers = self
            .shared
            .per_peer
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = peers.get_mut(&self.peer) {
            slot.connections = slot.connections.saturating_sub(1);
            if slot.connections == 0 {
                peers.remove(&self.peer);
                // Gone: its upload slot goes to the next in line at once.
                drop(peers);
                self.shared.release_upload(self.peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::send_share;

    #[test]
    fn the_send_memory_is_shared_within_bounds() {
        const MIB: u64 = 1 << 20;
        // Alone, a connection gets the transport's window, not the whole budget.
        assert_eq!(send_share(64 * MIB, 16 * MIB, 1), 16 * MIB);
        assert_eq!(send_share(64 * MIB, 16 * MIB, 4), 16 * MIB);
        // Many share the budget: the total stays within it.
        assert_eq!(send_share(64 * MIB, 16 * MIB, 32), 2 * MIB);
        assert!(send_share(64 * MIB, 16 * MIB, 64) * 64 <= 64 * MIB);
        // Never below the floor, nor above a window smaller than it.
        assert_eq!(send_share(64 * MIB, 16 * MIB, 10_000), 256 << 10);
        assert_eq!(send_share(64 * MIB, 64 << 10, 10_000), 64 << 10);
    }
}
