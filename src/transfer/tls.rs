//! QUIC endpoints bound to a libp2p identity, and the transport tuning they share.
//!
//! TLS certificates are made by `libp2p-tls` from the node's libp2p [`Keypair`], the same way
//! libp2p's own QUIC transport does: a downloader pins the [`PeerId`] that advertised the
//! snapshot and the handshake fails against anyone else, and the streamer learns the
//! downloader's `PeerId` from its (mandatory) client certificate.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use libp2p::PeerId;
use libp2p::identity::Keypair;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, MtuDiscoveryConfig, TransportConfig, VarInt};

use super::wire::ALPN;

/// QUIC transport settings of the chunk stream. The defaults suit anything from loopback to a
/// long fat WAN link; every window is an upper bound on memory, not an allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct TransportTuning {
    /// Per-stream receive window. A request's whole response fits, so one stream never waits on
    /// flow control (default 4 MiB).
    pub stream_window: u64,
    /// Per-connection receive window: caps the bytes in flight from one peer, so size it at
    /// bandwidth x round-trip time (default 16 MiB: 1 Gbit/s at 130 ms).
    pub connection_window: u64,
    /// Per-connection send window (default 16 MiB), the same reasoning on the serving side.
    pub send_window: u64,
    /// Largest UDP payload path MTU discovery may probe up to. Loopback and jumbo-frame links
    /// carry far more than 1500 bytes per datagram, which divides per-packet costs; on other
    /// paths the probes simply fail and the MTU stays where it is (default 65,000).
    pub max_udp_payload: u16,
    /// Kernel socket buffer size requested for each direction (default 4 MiB), so bursts at high
    /// rates are not dropped by the kernel before quinn reads them.
    pub socket_buffer: usize,
    /// Idle timeout of a connection (default 30 s).
    pub idle_timeout: Duration,
    /// Keep-alive interval, so idle connections survive between requests (default 5 s).
    pub keep_alive: Duration,
}

impl Default for TransportTuning {
    fn default() -> Self {
        Self {
            stream_window: 4 << 20,
            connection_window: 16 << 20,
            send_window: 16 << 20,
            max_udp_payload: 65_000,
            socket_buffer: 4 << 20,
            idle_timeout: Duration::from_secs(30),
            keep_alive: Duration::from_secs(5),
        }
    }
}

impl TransportTuning {
    pub(crate) fn transport_config(&self, max_streams: u32) -> TransportConfig {
        let mut t = TransportConfig::default();
        t.max_concurrent_bidi_streams(VarInt::from_u32(max_streams))
            .max_concurrent_uni_streams(VarInt::from_u32(0))
            .stream_receive_window(VarInt::from_u64(self.stream_window).unwrap_or(VarInt::MAX))
            .receive_window(VarInt::from_u64(self.connection_window).unwrap_or(VarInt::MAX))
            .send_window(self.send_window)
            .keep_alive_interval(Some(self.keep_alive))
            .max_idle_timeout(IdleTimeout::try_from(self.idle_timeout).ok());
        let mut mtu = MtuDiscoveryConfig::default();
        mtu.upper_bound(self.max_udp_payload.max(1200));
        t.mtu_discovery_config(Some(mtu));
        t
    }
}

/// Why a QUIC endpoint could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The UDP address is already taken by another socket.
    #[error("UDP address {addr} is already in use")]
    AddrInUse {
        /// The address asked for.
        addr: SocketAddr,
    },
    /// Binding the UDP socket failed for another reason.
    #[error("cannot bind UDP socket on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The TLS certificate could not be made from the keypair.
    #[error("cannot make a TLS certificate from the node's keypair: {0}")]
    Certificate(String),
}

/// Binds a UDP socket with the tuned buffer sizes.
pub(crate) fn bind_socket(
    addr: SocketAddr,
    tuning: &TransportTuning,
) -> Result<std::net::UdpSocket, EndpointError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let map = |source: std::io::Error| {
        if source.kind() == std::io::ErrorKind::AddrInUse {
            EndpointError::AddrInUse { addr }
        } else {
            EndpointError::Bind { addr, source }
        }
    };
    let socket =
        Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(map)?;
    if addr.is_ipv6() {
        // Dual-stack where the OS allows it; failure leaves it IPv6-only, which is fine.
        let _ = socket.set_only_v6(false);
    }
    // Best effort: the kernel caps these at net.core.{r,w}mem_max.
    let _ = socket.set_recv_buffer_size(tuning.socket_buffer);
    let _ = socket.set_send_buffer_size(tuning.socket_buffer);
    socket.bind(&addr.into()).map_err(map)?;
    Ok(socket.into())
}

fn certificate_error(e: impl std::fmt::Display) -> EndpointError {
    EndpointError::Certificate(e.to_string())
}

/// The quinn server config for the node's identity.
pub(crate) fn server_config(
    keypair: &Keypair,
    tuning: &TransportTuning,
    max_streams: u32,
) -> Result<quinn::ServerConfig, EndpointError> {
    let mut tls = libp2p_tls::make_server_config(keypair).map_err(certificate_error)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.key_log = Arc::new(rustls::NoKeyLog);
    let crypto = QuicServerConfig::try_from(tls).map_err(certificate_error)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(tuning.transport_config(max_streams)));
    Ok(config)
}

/// The quinn client config that only accepts `remote` as the server.
pub(crate) fn client_config(
    keypair: &Keypair,
    remote: PeerId,
    tuning: &TransportTuning,
) -> Result<quinn::ClientConfig, EndpointError> {
    let mut tls =
        libp2p_tls::make_client_config(keypair, Some(remote)).map_err(certificate_error)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.key_log = Arc::new(rustls::NoKeyLog);
    let crypto = QuicClientConfig::try_from(tls).map_err(certificate_error)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(tuning.transport_config(0)));
    Ok(config)
}

/// The libp2p `PeerId` of the other side of a connection, from its certificate.
pub(crate) fn remote_peer_id(conn: &quinn::Connection) -> Option<PeerId> {
    let identity = conn.peer_identity()?;
    let certs = identity
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    let cert = libp2p_tls::certificate::parse(certs.first()?).ok()?;
    Some(cert.peer_id())
}
