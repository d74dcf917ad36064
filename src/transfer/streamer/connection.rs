//! One served connection: the handshake (the client proves the token, the server proves it
//! back), refusals, the per-peer and per-address limits, and the request loop, which closes a
//! connection that opens no request for `idle_close`.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use libp2p::PeerId;
use quinn::VarInt;
use tokio::task::JoinSet;

use super::admission::ConnId;
use super::{ConnGuard, ServeError, Shared, serve};
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
    /// Its id in the rules.
    pub(super) id: ConnId,
    /// The peer's rate limiter, shared by its connections.
    pub(super) limit: Option<Arc<ByteLimiter>>,
    /// The peer it serves.
    pub(super) peer: PeerId,
    /// Where the connection comes from.
    pub(super) remote: std::net::SocketAddr,
    /// The connection, for its send window.
    pub(super) conn: quinn::Connection,
    /// Its share of the send memory: the most its send window may be.
    pub(super) send_share: Arc<AtomicU64>,
    /// Responses are sent one at a time, in the order their requests came: each goes out at
    /// the connection's whole rate, and a response's deadline counts from its turn, not from
    /// the time it waited behind the others (a busy uplink is not a slow client).
    pub(super) turn: tokio::sync::Mutex<()>,
}

/// Serves one connection until it ends. `guard` holds its places in the rules until then.
pub(super) async fn serve(
    incoming: quinn::Incoming,
    mut guard: ConnGuard,
    shared: &Arc<Shared>,
) -> Result<(), ServeError> {
    let (conn, peer, mut send, hello) = handshake(incoming, shared).await?;
    let send_share = guard.hold(&conn);
    let (proof, limit) = match admit(shared, &conn, peer, &hello, guard.id) {
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
    guard.peer = Some(peer).filter(|_| limit.is_some());
    let allowance = Arc::new(Allowance {
        id: guard.id,
        limit,
        peer,
        remote: conn.remote_address(),
        conn: conn.clone(),
        send_share,
        turn: tokio::sync::Mutex::new(()),
    });
    shared.metrics.accepted_connections.inc();
    shared.metrics.active_transfers.inc();
    let _active = scopeguard(|| {
        shared.metrics.active_transfers.dec();
    });
    write_frame(&mut send, &protocol::welcome(Ok(proof))).await?;
    send.finish()?;
    // Proven: now it may open its requests.
    conn.set_max_concurrent_bi_streams(VarInt::from_u32(shared.config.max_streams_per_connection));
    tracing::debug!(target: STREAMER_TARGET, %peer, remote = %conn.remote_address(), "downloader connected");
    serve_requests(&conn, peer, shared, &allowance).await
}

/// Runs `f` when dropped.
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
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
    let result = serve::request(send, recv, &shared, &allowance).await;
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

/// The checks a hello passes: version, token proof, then the places of the peer and its
/// address (the rules'). Returns the server's own proof and the peer's rate limiter.
fn admit(
    shared: &Shared,
    conn: &quinn::Connection,
    peer: PeerId,
    hello: &proto::Hello,
    id: ConnId,
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
    let limit = shared.authenticated(id, peer).map_err(|_| Refusal::Busy)?;
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
