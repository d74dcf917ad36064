//! [`StreamerConfig`]: every limit, deadline and cap of the serving side.

use crate::macros::setting;
use std::net::SocketAddr;
use std::time::Duration;

use crate::config_error::ConfigError;
use crate::transfer::TransportTuning;

/// Settings of a [`super::Streamer`]. Values are checked when the streamer is bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct StreamerConfig {
    pub(super) listen: SocketAddr,
    pub(super) max_connections: usize,
    pub(super) max_connections_per_peer: usize,
    pub(super) max_connections_per_ip: usize,
    pub(super) max_pending_per_ip: usize,
    pub(super) retry_after_pending: usize,
    pub(super) max_streams_per_connection: u32,
    pub(super) max_request_bytes: u64,
    pub(super) response_memory: u64,
    pub(super) send_memory: u64,
    pub(super) rate_limit: Option<u64>,
    pub(super) rate_limit_per_peer: Option<u64>,
    pub(super) auth_timeout: Duration,
    pub(super) request_timeout: Duration,
    pub(super) write_timeout: Duration,
    pub(super) transport: TransportTuning,
}

impl Default for StreamerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 0)),
            max_connections: 64,
            max_connections_per_peer: 4,
            max_connections_per_ip: 16,
            max_pending_per_ip: 4,
            retry_after_pending: 8,
            max_streams_per_connection: 32,
            max_request_bytes: 8 << 20,
            response_memory: 32 << 20,
            send_memory: 64 << 20,
            rate_limit: None,
            rate_limit_per_peer: None,
            auth_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            transport: TransportTuning::default(),
        }
    }
}

impl StreamerConfig {
    setting!(
        /// UDP address to listen on (default `0.0.0.0:0`: every interface, a port the OS picks;
        /// [`super::Streamer::local_addr`] tells which).
        with_listen, listen: SocketAddr
    );
    setting!(
        /// Most connections at once, authenticated or not (default 64). Beyond it, new ones
        /// are refused before the handshake.
        with_max_connections, max_connections: usize
    );
    setting!(
        /// Most authenticated connections from one peer (default 4).
        with_max_connections_per_peer, max_connections_per_peer: usize
    );
    setting!(
        /// Most authenticated connections from one IP address (default 16): identities are
        /// free, addresses less so.
        with_max_connections_per_ip, max_connections_per_ip: usize
    );
    setting!(
        /// Most connections from one IP address still in their handshake (default 4).
        with_max_pending_per_ip, max_pending_per_ip: usize
    );
    setting!(
        /// Once this many connections are in their handshake, a new one must first prove it can
        /// receive at its address (a QUIC Retry) before the server does any work for it
        /// (default 8).
        with_retry_after_pending, retry_after_pending: usize
    );
    setting!(
        /// Most concurrent requests (streams) per authenticated connection (default 32). Before
        /// it proves the token, a connection may open only its handshake stream.
        with_max_streams_per_connection, max_streams_per_connection: u32
    );
    setting!(
        /// Largest chunk range served by one request, in bytes of data (default 8 MiB). Bounds
        /// the memory one request can take.
        with_max_request_bytes, max_request_bytes: u64
    );
    setting!(
        /// Memory for responses being prepared and sent, across all connections (default
        /// 32 MiB). Requests wait for their share, so memory stays bounded whatever the number of
        /// clients.
        with_response_memory, response_memory: u64
    );
    setting!(
        /// QUIC send-buffer memory shared by every authenticated connection (default 64 MiB):
        /// each gets an equal share as its send window, at most `transport.send_window` and at
        /// least 256 KiB, rebalanced as connections come and go. Data handed to QUIC stays
        /// buffered until acknowledged, so this, with `response_memory`, bounds what serving
        /// holds whatever the number of clients.
        with_send_memory, send_memory: u64
    );
    setting!(
        /// Serving rate cap across all peers, bytes per second (default none).
        with_rate_limit, rate_limit: Option<u64>
    );
    setting!(
        /// Serving rate cap per peer, bytes per second (default none).
        with_rate_limit_per_peer, rate_limit_per_peer: Option<u64>
    );
    setting!(
        /// How long a new connection may take to finish its handshake and prove the token
        /// (default 5 s).
        with_auth_timeout, auth_timeout: Duration
    );
    setting!(
        /// How long a request may take to arrive once its stream is open (default 10 s).
        with_request_timeout, request_timeout: Duration
    );
    setting!(
        /// How long one piece of a response (256 KiB) may wait for the client to take it
        /// (default 10 s). A client that does not read loses its response memory and its
        /// connection.
        with_write_timeout, write_timeout: Duration
    );
    setting!(
        /// QUIC transport settings.
        with_transport, transport: TransportTuning
    );

    /// Checks the values.
    pub fn validate(&self) -> Result<(), ConfigError> {
        ConfigError::nonzero("streamer.max_connections", self.max_connections as u64)?;
        ConfigError::nonzero(
            "streamer.max_connections_per_peer",
            self.max_connections_per_peer as u64,
        )?;
        ConfigError::nonzero(
            "streamer.max_connections_per_ip",
            self.max_connections_per_ip as u64,
        )?;
        ConfigError::nonzero(
            "streamer.max_pending_per_ip",
            self.max_pending_per_ip as u64,
        )?;
        ConfigError::nonzero(
            "streamer.max_streams_per_connection",
            u64::from(self.max_streams_per_connection),
        )?;
        if self.max_request_bytes < 1024 {
            return Err(ConfigError::new(
                "streamer.max_request_bytes",
                "at least 1024",
                self.max_request_bytes,
            ));
        }
        if self.response_memory < 1 << 20 || self.response_memory < self.max_request_bytes {
            return Err(ConfigError::new(
                "streamer.response_memory",
                "at least 1 MiB and at least max_request_bytes",
                self.response_memory,
            ));
        }
        if self.send_memory < 1 << 20 {
            return Err(ConfigError::new(
                "streamer.send_memory",
                "at least 1 MiB",
                self.send_memory,
            ));
        }
        for (name, rate) in [
            ("streamer.rate_limit", self.rate_limit),
            ("streamer.rate_limit_per_peer", self.rate_limit_per_peer),
        ] {
            if rate.is_some_and(|r| r < 1024) {
                return Err(ConfigError::new(
                    name,
                    "none, or at least 1024 bytes/s",
                    rate,
                ));
            }
        }
        ConfigError::nonzero_duration("streamer.auth_timeout", self.auth_timeout)?;
        ConfigError::nonzero_duration("streamer.request_timeout", self.request_timeout)?;
        ConfigError::nonzero_duration("streamer.write_timeout", self.write_timeout)?;
        self.transport.validate()
    }
}
