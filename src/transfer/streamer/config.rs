//! [`StreamerConfig`]: every limit, deadline and cap of the serving side.

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
    pub(super) min_client_rate: u64,
    pub(super) idle_close: Duration,
    pub(super) max_uploads: usize,
    pub(super) upload_slot: Duration,
    pub(super) transport: TransportTuning,
}

impl StreamerConfig {
    /// The limits the admission rules apply.
    pub(crate) fn limits(&self) -> super::admission::Limits {
        super::admission::Limits {
            max_connections: self.max_connections,
            max_pending_per_ip: self.max_pending_per_ip,
            max_connections_per_ip: self.max_connections_per_ip,
            max_connections_per_peer: self.max_connections_per_peer,
            retry_after_pending: self.retry_after_pending,
            min_client_rate: self.min_client_rate,
            response_memory: self.response_memory,
            // A largest request's data, its proof (at most a sixteenth of it, at 1 KiB chunks)
            // and the framing.
            largest_response: self.max_request_bytes + self.max_request_bytes / 16 + (64 << 10),
            send_memory: self.send_memory,
            send_window: self.transport.send_window,
            max_uploads: self.max_uploads,
            upload_slot: self.upload_slot,
        }
    }
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
            min_client_rate: 64 << 10,
            idle_close: Duration::from_secs(30),
            max_uploads: 4,
            upload_slot: Duration::from_secs(10),
            transport: TransportTuning::default(),
        }
    }
}

impl StreamerConfig {
    /// UDP address to listen on (default `0.0.0.0:0`: every interface, a port the OS picks;
    /// [`super::Streamer::local_addr`] tells which).
    pub fn with_listen(mut self, value: SocketAddr) -> Self {
        self.listen = value;
        self
    }

    /// The value [`with_listen`](Self::with_listen) sets.
    pub fn listen(&self) -> SocketAddr {
        self.listen
    }

    /// Most connections at once, authenticated or not (default 64). Beyond it, new ones
    /// are refused before the handshake.
    pub fn with_max_connections(mut self, value: usize) -> Self {
        self.max_connections = value;
        self
    }

    /// The value [`with_max_connections`](Self::with_max_connections) sets.
    pub fn max_connections(&self) -> usize {
        self.max_connections
    }

    /// Most authenticated connections from one peer (default 4).
    pub fn with_max_connections_per_peer(mut self, value: usize) -> Self {
        self.max_connections_per_peer = value;
        self
    }

    /// The value [`with_max_connections_per_peer`](Self::with_max_connections_per_peer) sets.
    pub fn max_connections_per_peer(&self) -> usize {
        self.max_connections_per_peer
    }

    /// Most authenticated connections from one IP address (default 16): identities are
    /// free, addresses less so.
    pub fn with_max_connections_per_ip(mut self, value: usize) -> Self {
        self.max_connections_per_ip = value;
        self
    }

    /// The value [`with_max_connections_per_ip`](Self::with_max_connections_per_ip) sets.
    pub fn max_connections_per_ip(&self) -> usize {
        self.max_connections_per_ip
    }

    /// Most connections from one IP address still in their handshake (default 4).
    pub fn with_max_pending_per_ip(mut self, value: usize) -> Self {
        self.max_pending_per_ip = value;
        self
    }

    /// The value [`with_max_pending_per_ip`](Self::with_max_pending_per_ip) sets.
    pub fn max_pending_per_ip(&self) -> usize {
        self.max_pending_per_ip
    }

    /// Once this many connections are in their handshake, a new one must first prove it can
    /// receive at its address (a QUIC Retry) before the server does any work for it
    /// (default 8).
    pub fn with_retry_after_pending(mut self, value: usize) -> Self {
        self.retry_after_pending = value;
        self
    }

    /// The value [`with_retry_after_pending`](Self::with_retry_after_pending) sets.
    pub fn retry_after_pending(&self) -> usize {
        self.retry_after_pending
    }

    /// Most concurrent requests (streams) per authenticated connection (default 32). Before
    /// it proves the token, a connection may open only its handshake stream.
    pub fn with_max_streams_per_connection(mut self, value: u32) -> Self {
        self.max_streams_per_connection = value;
        self
    }

    /// The value [`with_max_streams_per_connection`](Self::with_max_streams_per_connection) sets.
    pub fn max_streams_per_connection(&self) -> u32 {
        self.max_streams_per_connection
    }

    /// Largest chunk range served by one request, in bytes of data (default 8 MiB). Bounds
    /// the memory one request can take.
    pub fn with_max_request_bytes(mut self, value: u64) -> Self {
        self.max_request_bytes = value;
        self
    }

    /// The value [`with_max_request_bytes`](Self::with_max_request_bytes) sets.
    pub fn max_request_bytes(&self) -> u64 {
        self.max_request_bytes
    }

    /// Memory for responses being prepared and sent, across all connections (default
    /// 32 MiB). Requests wait for their share, so memory stays bounded whatever the number of
    /// clients.
    pub fn with_response_memory(mut self, value: u64) -> Self {
        self.response_memory = value;
        self
    }

    /// The value [`with_response_memory`](Self::with_response_memory) sets.
    pub fn response_memory(&self) -> u64 {
        self.response_memory
    }

    /// QUIC send-buffer memory shared by every authenticated connection (default 64 MiB):
    /// each gets an equal share as its send window, at most `transport.send_window` and at
    /// least 256 KiB, rebalanced as connections come and go. Data handed to QUIC stays
    /// buffered until acknowledged, so this, with `response_memory`, bounds what serving
    /// holds whatever the number of clients.
    pub fn with_send_memory(mut self, value: u64) -> Self {
        self.send_memory = value;
        self
    }

    /// The value [`with_send_memory`](Self::with_send_memory) sets.
    pub fn send_memory(&self) -> u64 {
        self.send_memory
    }

    /// Serving rate cap across all peers, bytes per second (default none).
    pub fn with_rate_limit(mut self, value: Option<u64>) -> Self {
        self.rate_limit = value;
        self
    }

    /// The value [`with_rate_limit`](Self::with_rate_limit) sets.
    pub fn rate_limit(&self) -> Option<u64> {
        self.rate_limit
    }

    /// Serving rate cap per peer, bytes per second (default none).
    pub fn with_rate_limit_per_peer(mut self, value: Option<u64>) -> Self {
        self.rate_limit_per_peer = value;
        self
    }

    /// The value [`with_rate_limit_per_peer`](Self::with_rate_limit_per_peer) sets.
    pub fn rate_limit_per_peer(&self) -> Option<u64> {
        self.rate_limit_per_peer
    }

    /// How long a new connection may take to finish its handshake and prove the token
    /// (default 5 s).
    pub fn with_auth_timeout(mut self, value: Duration) -> Self {
        self.auth_timeout = value;
        self
    }

    /// The value [`with_auth_timeout`](Self::with_auth_timeout) sets.
    pub fn auth_timeout(&self) -> Duration {
        self.auth_timeout
    }

    /// How long a request may take to arrive once its stream is open (default 10 s).
    pub fn with_request_timeout(mut self, value: Duration) -> Self {
        self.request_timeout = value;
        self
    }

    /// The value [`with_request_timeout`](Self::with_request_timeout) sets.
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// How long one piece of a response (256 KiB) may wait for the client to take it
    /// (default 10 s). A client that does not read loses its response memory and its
    /// connection.
    pub fn with_write_timeout(mut self, value: Duration) -> Self {
        self.write_timeout = value;
        self
    }

    /// The value [`with_write_timeout`](Self::with_write_timeout) sets.
    pub fn write_timeout(&self) -> Duration {
        self.write_timeout
    }

    /// The slowest a client may take data, bytes per second (default 64 KiB/s): a response
    /// must be taken within the time this rate needs for it (never less than
    /// `write_timeout`), and when the streamer is full, a connection that has taken less than
    /// this on average since it proved the token is closed to make room for a newcomer. Slots
    /// and response memory cannot be held by clients that do not read.
    pub fn with_min_client_rate(mut self, value: u64) -> Self {
        self.min_client_rate = value;
        self
    }

    /// The slowest a client may take data, bytes per second.
    pub fn min_client_rate(&self) -> u64 {
        self.min_client_rate
    }

    /// How long an authenticated connection may stay open without a request (default 30 s);
    /// then it is closed with word that it may come back. The server itself never keeps a
    /// connection alive: a client that sends nothing is gone at the transport's idle timeout.
    pub fn with_idle_close(mut self, value: Duration) -> Self {
        self.idle_close = value;
        self
    }

    /// How long an authenticated connection may stay open without a request.
    pub fn idle_close(&self) -> Duration {
        self.idle_close
    }

    /// Sets how many peers are sent chunks at once (default 4); others are told the server is
    /// busy and fetch elsewhere, then take their turn. An uplink split among a few peers gets
    /// each piece out sooner, which in a crowd is what lets the others fetch it from them.
    pub fn with_max_uploads(mut self, value: usize) -> Self {
        self.max_uploads = value;
        self
    }

    /// How many peers are sent chunks at once.
    pub fn max_uploads(&self) -> usize {
        self.max_uploads
    }

    /// Sets how long a peer keeps its upload slot while others wait (default 10 s): then the
    /// slot goes to one of them.
    pub fn with_upload_slot(mut self, value: Duration) -> Self {
        self.upload_slot = value;
        self
    }

    /// How long a peer keeps its upload slot while others wait.
    pub fn upload_slot(&self) -> Duration {
        self.upload_slot
    }

    /// QUIC transport settings.
    pub fn with_transport(mut self, value: TransportTuning) -> Self {
        self.transport = value;
        self
    }

    /// The value [`with_transport`](Self::with_transport) sets.
    pub fn transport(&self) -> TransportTuning {
        self.transport
    }

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
        ConfigError::nonzero_duration("streamer.idle_close", self.idle_close)?;
        ConfigError::nonzero("streamer.max_uploads", self.max_uploads as u64)?;
        ConfigError::nonzero_duration("streamer.upload_slot", self.upload_slot)?;
        ConfigError::nonzero("streamer.min_client_rate", self.min_client_rate)?;
        self.transport.validate()
    }
}
