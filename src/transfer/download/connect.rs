//! Connecting to a peer's streamer: QUIC with its PeerId pinned, the handshake in which each
//! side proves the token, and the manifest, which must be the advertised snapshot.

use super::scheduler::RequestFailure;
use super::{DownloadContext, DownloadTarget};
use crate::proto;
use crate::snapshot::{Attestation, Manifest};
use crate::transfer::PeerAddr;
use crate::transfer::protocol::{
    self, FrameError, MAX_FRAME, MAX_HELLO, PROTOCOL_VERSION, Refusal, Role, close, read_frame,
    write_frame,
};
use crate::transfer::tls::{self, EndpointError};

/// Why connecting to a peer failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum ConnectError {
    #[error("connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("{}", .0.message())]
    Refused(Refusal),
    #[error("the server did not prove it knows SNAPSHOT_TOKEN")]
    ServerUnauthenticated,
    #[error("timed out")]
    Timeout,
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("stream: {0}")]
    Closed(#[from] quinn::ClosedStream),
    #[error("refused: {0}")]
    Status(String),
    /// It does not serve this snapshot (a partial holder may soon).
    #[error("refused: {0}")]
    Unknown(String),
    #[error("its manifest differs in {0}")]
    Mismatch(&'static str),
    #[error("bad manifest: {0}")]
    Manifest(String),
    #[error("{0}")]
    Endpoint(#[from] EndpointError),
    /// A web source's index or manifest could not be read.
    #[error("{0}")]
    Web(#[from] crate::transfer::web::WebError),
}

impl ConnectError {
    /// Whether retrying this peer can help.
    pub(super) fn failure(&self) -> RequestFailure {
        match self {
            ConnectError::Refused(Refusal::Busy) => RequestFailure::Busy,
            ConnectError::Refused(_)
            | ConnectError::ServerUnauthenticated
            | ConnectError::Mismatch(_)
            | ConnectError::Manifest(_)
            | ConnectError::Endpoint(_)
            | ConnectError::Unknown(_)
            | ConnectError::Status(_) => RequestFailure::Fatal,
            ConnectError::Connection(quinn::ConnectionError::TransportError(_)) => {
                RequestFailure::Fatal
            }
            ConnectError::Web(e) if e.is_transient() => RequestFailure::Transient,
            ConnectError::Web(_) => RequestFailure::Fatal,
            _ => RequestFailure::Transient,
        }
    }

    /// Whether retrying a peer that downloads the snapshot too can help: one that does not
    /// serve it yet (it has no manifest, or its disk is not reserved) may soon.
    pub(super) fn failure_of_partial(&self) -> RequestFailure {
        match self {
            ConnectError::Unknown(_) => RequestFailure::Transient,
            _ => self.failure(),
        }
    }

    /// Whether the peer refused this node's token proof.
    pub(super) fn is_unauthorized(&self) -> bool {
        matches!(self, ConnectError::Refused(Refusal::Unauthorized))
    }

    /// Reads a close by the server into a typed error.
    fn from_connection(e: quinn::ConnectionError) -> Self {
        if let quinn::ConnectionError::ApplicationClosed(c) = &e
            && let Some(r) = Refusal::from_code(c.error_code)
        {
            return ConnectError::Refused(r);
        }
        // The streamer refuses a connection before the handshake when it is full.
        if let quinn::ConnectionError::ConnectionClosed(c) = &e
            && c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED
        {
            return ConnectError::Refused(Refusal::Busy);
        }
        ConnectError::Connection(e)
    }

    fn from_frame(e: FrameError) -> Self {
        match e.connection() {
            Some(c) => Self::from_connection(c.clone()),
            None => ConnectError::Frame(e),
        }
    }
}

/// A peer's manifest of the target, with the attestations it serves beside it (claims: the
/// lengths are checked, the signatures by whoever counts them).
pub(super) struct ManifestReply {
    pub(super) manifest: Manifest,
    pub(super) attestations: Vec<Attestation>,
}

/// Connects, proves the token both ways, and checks the peer's manifest.
pub(super) async fn connect(
    ctx: &DownloadContext,
    peer: PeerAddr,
    target: DownloadTarget,
) -> Result<(quinn::Connection, ManifestReply), ConnectError> {
    let conn = handshake(ctx, &peer).await?;
    let reply = manifest_of(&conn, target).await?;
    Ok((conn, reply))
}

/// The connection, once both sides proved the token and agreed on the protocol.
async fn handshake(
    ctx: &DownloadContext,
    peer: &PeerAddr,
) -> Result<quinn::Connection, ConnectError> {
    let config = tls::client_config(&ctx.keypair, peer.peer_id, &ctx.config.transport)?;
    let conn = ctx
        .endpoint
        .connect_with(config, peer.addr, "snapsync")?
        .await
        .map_err(ConnectError::from_connection)?;
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(ConnectError::from_connection)?;
    let proof = ctx
        .token
        .as_ref()
        .and_then(|k| k.proof(&conn, Role::Client, &ctx.local, &peer.peer_id));
    write_frame(&mut send, &protocol::hello(proof))
        .await
        .map_err(ConnectError::from_frame)?;
    send.finish()?;
    let welcome: proto::Welcome = read_frame(&mut recv, MAX_HELLO)
        .await
        .map_err(ConnectError::from_frame)?;
    if let Some(refusal) = Refusal::from_proto(welcome.refused) {
        conn.close(close::DONE, b"refused");
        return Err(ConnectError::Refused(refusal));
    }
    if welcome.refused != proto::Refusal::None as i32 {
        conn.close(close::PROTOCOL, b"unknown refusal");
        return Err(ConnectError::Status(
            welcome.message.chars().take(200).collect(),
        ));
    }
    if welcome.protocol_version != PROTOCOL_VERSION {
        conn.close(close::PROTOCOL, b"version");
        return Err(ConnectError::Status(format!(
            "speaks chunk-stream version {}",
            welcome.protocol_version
        )));
    }
    // With a token, the server must show it knows it too: a peer that merely advertises
    // cannot pose as a holder of the private network.
    if let Some(key) = &ctx.token
        && !key.check(
            &conn,
            Role::Server,
            &ctx.local,
            &peer.peer_id,
            &welcome.proof,
        )
    {
        conn.close(close::SERVER_UNAUTHENTICATED, b"no token proof");
        return Err(ConnectError::ServerUnauthenticated);
    }
    Ok(conn)
}

/// The peer's manifest of the target, which must be the advertised snapshot, and the
/// attestations it serves with it (a list that does not read counts as none: the manifest
/// is what the download needs).
async fn manifest_of(
    conn: &quinn::Connection,
    target: DownloadTarget,
) -> Result<ManifestReply, ConnectError> {
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(ConnectError::from_connection)?;
    let request = proto::Request {
        kind: Some(proto::request::Kind::Manifest(proto::GetManifest {
            content_root: target.content_root.0.to_vec().into(),
        })),
    };
    write_frame(&mut send, &request)
        .await
        .map_err(ConnectError::from_frame)?;
    send.finish()?;
    let header: proto::ResponseHeader = read_frame(&mut recv, MAX_FRAME)
        .await
        .map_err(ConnectError::from_frame)?;
    if header.status == proto::Status::UnknownSnapshot as i32 {
        return Err(ConnectError::Unknown(status_text(&header)));
    }
    if header.status != proto::Status::Ok as i32 {
        return Err(ConnectError::Status(status_text(&header)));
    }
    let manifest = header
        .manifest
        .as_ref()
        .ok_or_else(|| ConnectError::Manifest("missing".into()))
        .and_then(|m| Manifest::from_proto(m).map_err(|e| ConnectError::Manifest(e.to_string())))?;
    if let Some(what) = target.mismatch(&manifest) {
        return Err(ConnectError::Mismatch(what));
    }
    let attestations = Attestation::decode_list(&header.attestations).unwrap_or_else(|e| {
        tracing::debug!(target: crate::transfer::DOWNLOAD_TARGET, error = %e, "the attestations served with a manifest do not read; ignoring them");
        Vec::new()
    });
    Ok(ManifestReply {
        manifest,
        attestations,
    })
}

/// A response header's status and message, for error text.
pub(super) fn status_text(header: &proto::ResponseHeader) -> String {
    let status = proto::Status::try_from(header.status)
        .map(|s| s.as_str_name().to_string())
        .unwrap_or_else(|_| format!("status {}", header.status));
    let message: String = header.message.chars().take(200).collect();
    format!("{status}: {message}")
}
