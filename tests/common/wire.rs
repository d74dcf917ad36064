//! The chunk stream in tests: streamers and downloaders over 127.0.0.1, and a raw client that
//! speaks the wire directly, as an attacker would.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use libp2p::PeerId;
use libp2p::identity::Keypair;
use prost::Message;
use snapsync::Metrics;
use snapsync::db::StateDb;
use snapsync::layers::snapshot::{Manifest, Snapshot, load_snapshot};
use snapsync::layers::transfer::{
    DownloadConfig, DownloadError, DownloadTarget, Downloaded, Downloader, PeerAddr, Streamer,
    StreamerConfig, Token,
};
use snapsync::proto;

use super::Node;

pub fn local() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

pub fn serve(node: &Node, config: StreamerConfig) -> Streamer {
    serve_token(node, config, None)
}

pub fn serve_token(node: &Node, config: StreamerConfig, token: Option<Token>) -> Streamer {
    Streamer::bind(
        &node.keypair,
        node.store.clone(),
        config.with_listen(local()),
        token.as_ref(),
        Metrics::new(),
    )
    .unwrap()
}

pub fn peer(node: &Node, streamer: &Streamer) -> PeerAddr {
    PeerAddr {
        peer_id: node.peer_id(),
        addr: streamer.local_addr(),
    }
}

/// Download settings for tests: quick retries and timeouts.
pub fn fast() -> DownloadConfig {
    DownloadConfig::default()
        .with_bind(local())
        .with_backoff_min(Duration::from_millis(50))
        .with_backoff_max(Duration::from_millis(500))
        .with_connect_timeout(Duration::from_secs(3))
        .with_min_request_timeout(Duration::from_secs(3))
        .with_no_progress_timeout(Duration::from_secs(20))
}

pub fn downloader(node: &Node, config: DownloadConfig) -> Downloader {
    downloader_token(node, config, None)
}

pub fn downloader_token(node: &Node, config: DownloadConfig, token: Option<Token>) -> Downloader {
    Downloader::new(
        node.keypair.clone(),
        node.store.clone(),
        config,
        token.as_ref(),
        Metrics::new(),
    )
    .unwrap()
}

/// Downloads the snapshot of `manifest` into `client` from one `server`'s `streamer`.
pub async fn fetch_from(
    client: &Node,
    config: DownloadConfig,
    manifest: &Manifest,
    server: &Node,
    streamer: &Streamer,
) -> Result<Downloaded, DownloadError> {
    downloader(client, config)
        .download(
            DownloadTarget::from_manifest(manifest),
            vec![peer(server, streamer)],
        )
        .await
}

/// The download is the snapshot, byte for byte, and it loads to the same bank hash.
pub fn assert_exact(got: &Downloaded, want: &Snapshot, into: &Node) {
    assert_eq!(
        got.snapshot.manifest().content_root,
        want.manifest().content_root
    );
    assert_eq!(
        std::fs::read(got.snapshot.archive_path()).unwrap(),
        std::fs::read(want.archive_path()).unwrap()
    );
    assert_eq!(
        std::fs::read(got.snapshot.outboard_path()).unwrap(),
        std::fs::read(want.outboard_path()).unwrap()
    );
    let report = load_snapshot(
        &into.db,
        &got.snapshot.archive_path(),
        got.snapshot.manifest(),
    )
    .unwrap();
    assert_eq!(report.bank_hash, want.manifest().bank_hash);
    assert_eq!(into.db.slot().unwrap(), Some(want.manifest().slot));
}

/// A chunk-stream client that speaks the wire by hand.
pub struct RawClient {
    pub endpoint: quinn::Endpoint,
    pub keypair: Keypair,
}

/// ALPN of the chunk stream.
pub const ALPN: &[u8] = b"snapsync/chunks/2";

/// A bare QUIC server endpoint on 127.0.0.1 with a fresh libp2p identity and the chunk
/// stream's ALPN: the start of any hostile server. Returns its PeerId and address too.
pub fn hostile_endpoint() -> (PeerId, SocketAddr, quinn::Endpoint) {
    let keypair = Keypair::generate_ed25519();
    let mut tls = libp2p_tls::make_server_config(&keypair).unwrap();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
    let endpoint =
        quinn::Endpoint::server(quinn::ServerConfig::with_crypto(Arc::new(crypto)), local())
            .unwrap();
    let addr = endpoint.local_addr().unwrap();
    (keypair.public().to_peer_id(), addr, endpoint)
}

impl RawClient {
    pub fn new() -> Self {
        Self::with_endpoint(quinn::Endpoint::client(local()).unwrap())
    }

    /// A client on `endpoint` (bound to another loopback address, say).
    pub fn with_endpoint(endpoint: quinn::Endpoint) -> Self {
        Self {
            endpoint,
            keypair: Keypair::generate_ed25519(),
        }
    }

    /// A QUIC connection (TLS done, nothing said yet).
    pub async fn connect(
        &self,
        server: PeerId,
        addr: SocketAddr,
    ) -> Result<quinn::Connection, quinn::ConnectionError> {
        let mut transport = quinn::TransportConfig::default();
        transport.max_idle_timeout(Some(Duration::from_secs(10).try_into().unwrap()));
        self.connect_with(server, addr, transport).await
    }

    /// [`RawClient::connect`] with these transport settings.
    pub async fn connect_with(
        &self,
        server: PeerId,
        addr: SocketAddr,
        transport: quinn::TransportConfig,
    ) -> Result<quinn::Connection, quinn::ConnectionError> {
        let mut tls = libp2p_tls::make_client_config(&self.keypair, Some(server)).unwrap();
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(Arc::new(transport));
        self.endpoint
            .connect_with(config, addr, "snapsync")
            .unwrap()
            .await
    }

    /// A connection past the handshake, in the open (no token) mode.
    pub async fn hello(&self, server: PeerId, addr: SocketAddr) -> quinn::Connection {
        let mut transport = quinn::TransportConfig::default();
        transport.max_idle_timeout(Some(Duration::from_secs(10).try_into().unwrap()));
        self.hello_with(server, addr, transport).await
    }

    /// [`RawClient::hello`] with these transport settings.
    pub async fn hello_with(
        &self,
        server: PeerId,
        addr: SocketAddr,
        transport: quinn::TransportConfig,
    ) -> quinn::Connection {
        let conn = self.connect_with(server, addr, transport).await.unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&frame(&proto::Hello {
            protocol_version: 2,
            proof: Default::default(),
        }))
        .await
        .unwrap();
        send.finish().unwrap();
        let welcome: proto::Welcome = read(&mut recv).await.unwrap();
        assert_eq!(welcome.refused, proto::Refusal::None as i32, "{welcome:?}");
        conn
    }
}

impl Default for RawClient {
    fn default() -> Self {
        Self::new()
    }
}

/// A framed message: u32 big-endian length, then the protobuf.
pub fn frame<M: Message>(msg: &M) -> Vec<u8> {
    let mut out = (msg.encoded_len() as u32).to_be_bytes().to_vec();
    msg.encode(&mut out).unwrap();
    out
}

/// Reads one framed message.
pub async fn read<M: Message + Default>(recv: &mut quinn::RecvStream) -> Result<M, String> {
    let mut len = [0u8; 4];
    recv.read_exact(&mut len).await.map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
    recv.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
    M::decode(buf.as_slice()).map_err(|e| e.to_string())
}

/// A request for chunks `start..end` of `root`, framed.
pub fn get_chunks(root: snapsync::ContentRoot, start: u64, end: u64, chunk_size: u32) -> Vec<u8> {
    frame(&chunks_request(root, start..end, chunk_size))
}

/// A request for chunks `range` of `root` in chunks of `chunk_size`.
pub fn chunks_request(
    root: snapsync::ContentRoot,
    range: std::ops::Range<u64>,
    chunk_size: u32,
) -> proto::Request {
    proto::Request {
        kind: Some(proto::request::Kind::Chunks(proto::GetChunks {
            content_root: root.0.to_vec().into(),
            start_chunk: range.start,
            end_chunk: range.end,
            chunk_size,
        })),
    }
}

/// A request for which blocks of `block_chunks` chunks of `root` the server holds.
pub fn have_request(root: snapsync::ContentRoot, block_chunks: u32) -> proto::Request {
    proto::Request {
        kind: Some(proto::request::Kind::Have(proto::GetHave {
            content_root: root.0.to_vec().into(),
            block_chunks,
            ..Default::default()
        })),
    }
}

/// A request for the manifest of `root`.
pub fn manifest_request(root: snapsync::ContentRoot) -> proto::Request {
    proto::Request {
        kind: Some(proto::request::Kind::Manifest(proto::GetManifest {
            content_root: root.0.to_vec().into(),
        })),
    }
}

/// How a lying chunk server delivers nothing while looking like a holder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lie {
    /// Chunks: "not held"; have requests: an empty bitfield.
    NotHeld,
    /// Chunks: "not held"; have requests: every block held (a stale or false bitfield).
    Stale,
    /// Everything but the manifest: "busy".
    Busy,
    /// Chunk and have requests are read and never answered.
    Stall,
    /// Chunks: bytes of the right length that do not check out; have requests: every block
    /// held.
    Garbage,
}

/// What a liar was asked.
#[derive(Debug, Default)]
pub struct LiarStats {
    pub manifests: std::sync::atomic::AtomicU64,
    pub chunks: std::sync::atomic::AtomicU64,
    pub haves: std::sync::atomic::AtomicU64,
}

/// A chunk server under `keypair`'s identity that proves nothing (open mode), serves the
/// true `manifest` of the snapshot (its protobuf, as stored in `manifest.pb`) and then lies as
/// `lie` says. Runs until the endpoint is dropped.
pub fn liar_server(
    keypair: &Keypair,
    manifest: snapsync::proto::Manifest,
    lie: Lie,
) -> (SocketAddr, Arc<LiarStats>, quinn::Endpoint) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut tls = libp2p_tls::make_server_config(keypair).unwrap();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
    let endpoint =
        quinn::Endpoint::server(quinn::ServerConfig::with_crypto(Arc::new(crypto)), local())
            .unwrap();
    let addr = endpoint.local_addr().unwrap();
    let stats = Arc::new(LiarStats::default());
    let (ep, st) = (endpoint.clone(), stats.clone());
    tokio::spawn(async move {
        while let Some(incoming) = ep.accept().await {
            let (manifest, st) = (manifest.clone(), st.clone());
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                let Ok((mut send, mut recv)) = conn.accept_bi().await else {
                    return;
                };
                let Ok(_hello) = read::<proto::Hello>(&mut recv).await else {
                    return;
                };
                let welcome = proto::Welcome {
                    protocol_version: 2,
                    ..Default::default()
                };
                let _ = send.write_all(&frame(&welcome)).await;
                let _ = send.finish();
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    let (manifest, st) = (manifest.clone(), st.clone());
                    tokio::spawn(async move {
                        let Ok(request) = read::<proto::Request>(&mut recv).await else {
                            return;
                        };
                        let status = |s: proto::Status| proto::ResponseHeader {
                            status: s as i32,
                            message: "no".into(),
                            ..Default::default()
                        };
                        let (header, body) = match request.kind {
                            Some(proto::request::Kind::Manifest(_)) => {
                                st.manifests.fetch_add(1, Relaxed);
                                let header = proto::ResponseHeader {
                                    manifest: Some(manifest),
                                    ..Default::default()
                                };
                                (header, Vec::new())
                            }
                            Some(proto::request::Kind::Chunks(get)) => {
                                st.chunks.fetch_add(1, Relaxed);
                                match lie {
                                    Lie::NotHeld | Lie::Stale => {
                                        (status(proto::Status::NotHeld), Vec::new())
                                    }
                                    Lie::Busy => (status(proto::Status::Busy), Vec::new()),
                                    Lie::Stall => {
                                        std::future::pending::<()>().await;
                                        unreachable!()
                                    }
                                    Lie::Garbage => {
                                        let tree = snapsync::layers::chunk::ChunkTree::new(
                                            manifest.archive_size,
                                            snapsync::layers::chunk::ChunkSize::new(u64::from(
                                                manifest.chunk_size,
                                            ))
                                            .unwrap(),
                                            snapsync::ContentRoot::from_slice(
                                                &manifest.content_root,
                                            )
                                            .unwrap(),
                                        );
                                        let len = tree
                                            .encoded_len(get.start_chunk..get.end_chunk)
                                            .unwrap_or(0);
                                        let header = proto::ResponseHeader {
                                            encoded_len: len,
                                            ..Default::default()
                                        };
                                        (header, vec![0x5a; len as usize])
                                    }
                                }
                            }
                            Some(proto::request::Kind::Have(get)) => {
                                st.haves.fetch_add(1, Relaxed);
                                match lie {
                                    Lie::NotHeld | Lie::Stale | Lie::Garbage => {
                                        let chunk = u64::from(manifest.chunk_size);
                                        let chunks = manifest.archive_size.div_ceil(chunk);
                                        let block = u64::from(get.block_chunks.max(1));
                                        let n = chunks.div_ceil(block).div_ceil(8);
                                        let header = proto::ResponseHeader {
                                            encoded_len: n,
                                            ..Default::default()
                                        };
                                        let fill = if lie == Lie::NotHeld { 0 } else { 0xff };
                                        (header, vec![fill; n as usize])
                                    }
                                    Lie::Busy => (status(proto::Status::Busy), Vec::new()),
                                    Lie::Stall => {
                                        std::future::pending::<()>().await;
                                        unreachable!()
                                    }
                                }
                            }
                            None => return,
                        };
                        let _ = send.write_all(&frame(&header)).await;
                        let _ = send.write_all(&body).await;
                        let _ = send.finish();
                        // Keep the stream until the client has read it.
                        let _ = send.stopped().await;
                    });
                }
            });
        }
    });
    (addr, stats, endpoint)
}
