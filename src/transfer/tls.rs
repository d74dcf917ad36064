//! QUIC endpoints bound to a libp2p identity, and the transport tuning they share.
//!
//! TLS certificates are made by `libp2p-tls` from the node's libp2p [`Keypair`] and checked as
//! the libp2p TLS specification says (one self-signed certificate carrying a signed libp2p
//! public-key extension), the same way libp2p's own QUIC transport does: a downloader pins the
//! [`PeerId`] that advertised the snapshot and the handshake fails against anyone else, and the
//! streamer learns the downloader's `PeerId` from its (mandatory) client certificate.
//!
//! The one difference from `libp2p-tls`'s ready-made configs is the cipher suite order:
//! AES-GCM first, ChaCha20-Poly1305 last. The chunk stream is bulk transfer, where the cipher is
//! most of the CPU cost, and AES-GCM with the AES instructions every server CPU has is several
//! times cheaper than ChaCha20-Poly1305; libp2p's order suits CPUs without them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use libp2p::PeerId;
use libp2p::identity::Keypair;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, MtuDiscoveryConfig, TransportConfig, VarInt};

use super::protocol::ALPN;

/// QUIC transport settings of the chunk stream. The defaults suit anything from loopback to a
/// long fat WAN link; every window is an upper bound on memory, not an allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct TransportTuning {
    /// Per-stream receive window. A request's whole response fits, so one stream never waits on
    /// flow control (default 4 MiB).
    pub(crate) stream_window: u64,
    /// Per-connection receive window: caps the bytes in flight from one peer, so size it at
    /// bandwidth x round-trip time (default 16 MiB: 1 Gbit/s at 130 ms).
    pub(crate) connection_window: u64,
    /// Per-connection send window (default 16 MiB), the same reasoning on the serving side.
    pub(crate) send_window: u64,
    /// Largest UDP payload accepted and probed for by path MTU discovery (default 1472, what a
    /// 1500-byte Ethernet frame carries). Larger datagrams looked like a win on loopback and
    /// jumbo-frame links, but measured here they were slower: with segmentation offload the
    /// kernel already batches 1472-byte datagrams, and 1 GiB over loopback took 2.7 s at 1472
    /// against 3.3 s at 9,000 and 3.4 s at 65,000 (see the README's benchmark section).
    pub(crate) max_udp_payload: u16,
    /// Kernel socket buffer size requested for each direction (default 4 MiB), so bursts at high
    /// rates are not dropped by the kernel before quinn reads them.
    pub(crate) socket_buffer: usize,
    /// Idle timeout of a connection (default 10 s): a peer that vanishes (killed, unplugged) is
    /// noticed within this long.
    pub(crate) idle_timeout: Duration,
    /// Keep-alive interval, so idle connections survive between requests (default 3 s).
    pub(crate) keep_alive: Duration,
}

impl Default for TransportTuning {
    fn default() -> Self {
        Self {
            stream_window: 4 << 20,
            connection_window: 16 << 20,
            send_window: 16 << 20,
            max_udp_payload: 1472,
            socket_buffer: 4 << 20,
            idle_timeout: Duration::from_secs(10),
            keep_alive: Duration::from_secs(3),
        }
    }
}

/// Receive windows of the serving side, which only ever receives requests (a few dozen bytes
/// each): small, so that no client, authenticated or not, can make a server buffer much.
const SERVER_STREAM_WINDOW: u32 = 64 << 10;
const SERVER_CONNECTION_WINDOW: u32 = 256 << 10;

impl TransportTuning {
    /// Per-stream receive window, bytes.
    pub fn with_stream_window(mut self, value: u64) -> Self {
        self.stream_window = value;
        self
    }

    /// The value [`with_stream_window`](Self::with_stream_window) sets.
    pub fn stream_window(&self) -> u64 {
        self.stream_window
    }

    /// Per-connection receive window, bytes.
    pub fn with_connection_window(mut self, value: u64) -> Self {
        self.connection_window = value;
        self
    }

    /// The value [`with_connection_window`](Self::with_connection_window) sets.
    pub fn connection_window(&self) -> u64 {
        self.connection_window
    }

    /// Per-connection send window, bytes.
    pub fn with_send_window(mut self, value: u64) -> Self {
        self.send_window = value;
        self
    }

    /// The value [`with_send_window`](Self::with_send_window) sets.
    pub fn send_window(&self) -> u64 {
        self.send_window
    }

    /// Largest UDP payload, bytes.
    pub fn with_max_udp_payload(mut self, value: u16) -> Self {
        self.max_udp_payload = value;
        self
    }

    /// The value [`with_max_udp_payload`](Self::with_max_udp_payload) sets.
    pub fn max_udp_payload(&self) -> u16 {
        self.max_udp_payload
    }

    /// Socket buffer size requested, bytes.
    pub fn with_socket_buffer(mut self, value: usize) -> Self {
        self.socket_buffer = value;
        self
    }

    /// The value [`with_socket_buffer`](Self::with_socket_buffer) sets.
    pub fn socket_buffer(&self) -> usize {
        self.socket_buffer
    }

    /// Idle timeout of a connection.
    pub fn with_idle_timeout(mut self, value: Duration) -> Self {
        self.idle_timeout = value;
        self
    }

    /// The value [`with_idle_timeout`](Self::with_idle_timeout) sets.
    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }

    /// Keep-alive interval (shorter than the idle timeout).
    pub fn with_keep_alive(mut self, value: Duration) -> Self {
        self.keep_alive = value;
        self
    }

    /// The value [`with_keep_alive`](Self::with_keep_alive) sets.
    pub fn keep_alive(&self) -> Duration {
        self.keep_alive
    }

    /// Checks the values: windows and buffers non-zero, keep-alive shorter than the idle
    /// timeout.
    pub fn validate(&self) -> Result<(), crate::config_error::ConfigError> {
        use crate::config_error::ConfigError;
        for (name, v) in [
            ("transport.stream_window", self.stream_window),
            ("transport.connection_window", self.connection_window),
            ("transport.send_window", self.send_window),
            ("transport.socket_buffer", self.socket_buffer as u64),
        ] {
            if v == 0 {
                return Err(ConfigError::new(name, "more than 0", v));
            }
        }
        if self.max_udp_payload < 1200 {
            return Err(ConfigError::new(
                "transport.max_udp_payload",
                "at least 1200 (QUIC's minimum)",
                self.max_udp_payload,
            ));
        }
        if self.idle_timeout.is_zero() || self.keep_alive >= self.idle_timeout {
            return Err(ConfigError::new(
                "transport.keep_alive",
                "shorter than a non-zero idle timeout",
                format!(
                    "{:?} (idle timeout {:?})",
                    self.keep_alive, self.idle_timeout
                ),
            ));
        }
        Ok(())
    }

    /// The transport of the serving side: small receive windows (it receives only requests),
    /// until a client proves the token one stream, and no keep-alive: a client that sends
    /// nothing is gone at the idle timeout, the server never holds a connection open for it.
    pub(crate) fn server_transport(&self) -> TransportConfig {
        let mut t = self.transport_config(1);
        t.stream_receive_window(VarInt::from_u32(SERVER_STREAM_WINDOW))
            .receive_window(VarInt::from_u32(SERVER_CONNECTION_WINDOW))
            .keep_alive_interval(None);
        t
    }

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

/// The endpoint settings: accept datagrams up to `max_udp_payload` (quinn's default accepts
/// 1472 bytes at most, which caps path MTU discovery whatever the link could carry).
pub(crate) fn endpoint_config(tuning: &TransportTuning) -> quinn::EndpointConfig {
    let mut config = quinn::EndpointConfig::default();
    // In bounds by construction: clamped to quinn's accepted range.
    let _ = config.max_udp_payload_size(tuning.max_udp_payload.clamp(1200, 65_527));
    config
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

/// TLS 1.3 with aws-lc-rs, AES-GCM preferred (see the module docs).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::aws_lc_rs::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    };
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.cipher_suites = vec![
        TLS13_AES_128_GCM_SHA256,
        TLS13_AES_256_GCM_SHA384,
        TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(provider)
}

/// The node's certificate and key, made from its libp2p identity, as a rustls resolver. (The
/// certificate carries a critical libp2p extension that generic X.509 checks refuse, so it is
/// handed to rustls as is rather than through `with_single_cert`.)
fn identity(
    keypair: &Keypair,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<Arc<rustls::sign::SingleCertAndKey>, EndpointError> {
    let (cert, key) = libp2p_tls::certificate::generate(keypair).map_err(certificate_error)?;
    let key = provider
        .key_provider
        .load_private_key(key)
        .map_err(certificate_error)?;
    Ok(Arc::new(
        rustls::sign::CertifiedKey::new(vec![cert], key).into(),
    ))
}

/// The quinn server config for the node's identity.
pub(crate) fn server_config(
    keypair: &Keypair,
    tuning: &TransportTuning,
) -> Result<quinn::ServerConfig, EndpointError> {
    let crypto = QuicServerConfig::try_from(server_tls(keypair)?).map_err(certificate_error)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(tuning.server_transport()));
    Ok(config)
}

/// The TLS side of [`server_config`].
fn server_tls(keypair: &Keypair) -> Result<rustls::ServerConfig, EndpointError> {
    let provider = provider();
    let resolver = identity(keypair, &provider)?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(certificate_error)?
        .with_client_cert_verifier(Arc::new(Libp2pVerifier { remote: None }))
        .with_cert_resolver(resolver);
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.key_log = Arc::new(rustls::NoKeyLog);
    // No session resumption: every connection is a full handshake bound to both identities,
    // and no ticket outlives its connection.
    tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    tls.send_tls13_tickets = 0;
    Ok(tls)
}

/// The quinn client config that only accepts `remote` as the server.
pub(crate) fn client_config(
    keypair: &Keypair,
    remote: PeerId,
    tuning: &TransportTuning,
) -> Result<quinn::ClientConfig, EndpointError> {
    let tls = client_tls(keypair, remote)?;
    let crypto = QuicClientConfig::try_from(tls).map_err(certificate_error)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(tuning.transport_config(0)));
    Ok(config)
}

/// The TLS side of [`client_config`].
fn client_tls(keypair: &Keypair, remote: PeerId) -> Result<rustls::ClientConfig, EndpointError> {
    let provider = provider();
    let resolver = identity(keypair, &provider)?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(certificate_error)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Libp2pVerifier {
            remote: Some(remote),
        }))
        .with_client_cert_resolver(resolver);
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.key_log = Arc::new(rustls::NoKeyLog);
    tls.resumption = rustls::client::Resumption::disabled();
    Ok(tls)
}

/// Checks certificates as the libp2p TLS specification requires: exactly one, self-signed,
/// with a valid libp2p extension; and, when `remote` is set, that it belongs to that peer.
#[derive(Debug)]
struct Libp2pVerifier {
    remote: Option<PeerId>,
}

impl Libp2pVerifier {
    fn check_chain(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
    ) -> Result<(), rustls::Error> {
        if !intermediates.is_empty() {
            return Err(rustls::Error::General(
                "libp2p TLS requires exactly one certificate".into(),
            ));
        }
        let cert = libp2p_tls::certificate::parse(end_entity).map_err(|_| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
        })?;
        if self.remote.is_some_and(|r| r != cert.peer_id()) {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ));
        }
        Ok(())
    }

    fn check_signature(
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
        message: &[u8],
    ) -> Result<(), rustls::Error> {
        libp2p_tls::certificate::parse(cert)
            .map_err(|_| rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding))?
            .verify_signature(dss.scheme, message, dss.signature())
            .map_err(|_| rustls::Error::InvalidCertificate(rustls::CertificateError::BadSignature))
    }

    fn schemes() -> Vec<rustls::SignatureScheme> {
        use rustls::SignatureScheme::*;
        vec![
            ECDSA_NISTP384_SHA384,
            ECDSA_NISTP256_SHA256,
            ED25519,
            RSA_PSS_SHA512,
            RSA_PSS_SHA384,
            RSA_PSS_SHA256,
            RSA_PKCS1_SHA512,
            RSA_PKCS1_SHA384,
            RSA_PKCS1_SHA256,
        ]
    }

    fn tls12_refused() -> rustls::Error {
        rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls13RequiredForQuic)
    }
}

impl rustls::client::danger::ServerCertVerifier for Libp2pVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        self.check_chain(end_entity, intermediates)?;
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &rustls::pki_types::CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(Self::tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Self::check_signature(cert, dss, message)?;
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        Self::schemes()
    }
}

impl rustls::server::danger::ClientCertVerifier for Libp2pVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        self.check_chain(end_entity, intermediates)?;
        Ok(rustls::server::danger::ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &rustls::pki_types::CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(Self::tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Self::check_signature(cert, dss, message)?;
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        Self::schemes()
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_session_outlives_its_connection() {
        let keypair = Keypair::generate_ed25519();
        let server = server_tls(&keypair).unwrap();
        assert_eq!(server.send_tls13_tickets, 0, "no tickets");
        assert!(!server.session_storage.can_cache(), "no server-side cache");
        let client = client_tls(&keypair, PeerId::random()).unwrap();
        let resumption = format!("{:?}", client.resumption);
        assert!(
            resumption.contains("NoClientSessionStorage"),
            "{resumption}"
        );
        assert!(!client.enable_early_data);
    }

    #[test]
    fn before_authentication_a_connection_gets_one_stream_and_small_windows() {
        let t = format!("{:?}", TransportTuning::default().server_transport());
        let field = |name: &str| -> u64 {
            let at = t
                .find(&format!(" {name}: "))
                .unwrap_or_else(|| panic!("{name} in {t}"))
                + 1;
            t[at + name.len() + 2..]
                .chars()
                .skip_while(|c| !c.is_ascii_digit())
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse()
                .unwrap()
        };
        assert_eq!(field("max_concurrent_bidi_streams"), 1);
        assert_eq!(field("max_concurrent_uni_streams"), 0);
        assert_eq!(
            field("stream_receive_window"),
            u64::from(SERVER_STREAM_WINDOW)
        );
        assert_eq!(field("receive_window"), u64::from(SERVER_CONNECTION_WINDOW));
        assert!(u64::from(SERVER_CONNECTION_WINDOW) <= 256 << 10);
    }
}
