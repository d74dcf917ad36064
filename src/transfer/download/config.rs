//! [`DownloadConfig`]: every limit, timeout and interval of the downloading side.

use crate::macros::setting;
use std::net::SocketAddr;
use std::time::Duration;

use super::scheduler::SchedulerConfig;
use crate::chunk::ChunkSize;
use crate::config_error::ConfigError;
use crate::transfer::TransportTuning;

/// Settings of a [`super::Downloader`]. Values are checked when the downloader is built.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct DownloadConfig {
    pub(super) bind: SocketAddr,
    pub(super) request_chunks: u64,
    pub(super) initial_window: usize,
    pub(super) max_window: usize,
    pub(super) max_inflight: usize,
    pub(super) min_request_timeout: Duration,
    pub(super) min_peer_rate: u64,
    pub(super) hedge: bool,
    pub(super) backoff_min: Duration,
    pub(super) backoff_max: Duration,
    pub(super) max_peer_failures: u32,
    pub(super) max_peers: usize,
    pub(super) no_progress_timeout: Duration,
    pub(super) connect_timeout: Duration,
    pub(super) persist_interval: Duration,
    pub(super) progress_interval: Duration,
    pub(super) partial_budget: u64,
    pub(super) disk_headroom: u64,
    pub(super) max_chunks: u64,
    pub(super) transport: TransportTuning,
}

impl Default for DownloadConfig {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([0, 0, 0, 0], 0)),
            request_chunks: 32,
            initial_window: 4,
            max_window: 16,
            max_inflight: 32,
            min_request_timeout: Duration::from_secs(10),
            min_peer_rate: 64 << 10,
            hedge: true,
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(10),
            max_peer_failures: 8,
            max_peers: 16,
            no_progress_timeout: Duration::from_secs(120),
            connect_timeout: Duration::from_secs(10),
            persist_interval: Duration::from_secs(1),
            progress_interval: Duration::from_millis(250),
            partial_budget: 16 << 30,
            disk_headroom: 1 << 30,
            max_chunks: 1 << 26,
            transport: TransportTuning::default(),
        }
    }
}

impl DownloadConfig {
    setting!(
        /// Local UDP address of the downloader's endpoint (default `0.0.0.0:0`).
        with_bind, bind: SocketAddr
    );
    setting!(
        /// Chunks per request (default 32: 512 KiB at 16 KiB chunks, under 0.6% of proof).
        with_request_chunks, request_chunks: u64
    );
    setting!(
        /// Requests in flight to a peer before its rate is known (default 4).
        with_initial_window, initial_window: usize
    );
    setting!(
        /// Most requests in flight to one peer (default 16).
        with_max_window, max_window: usize
    );
    setting!(
        /// Most requests in flight in all; with `request_chunks`, bounds the memory of a
        /// download (default 32, i.e. 16 MiB at the defaults).
        with_max_inflight, max_inflight: usize
    );
    setting!(
        /// A request that receives nothing for this long is abandoned and retried elsewhere
        /// (default 10 s); every request also has a deadline from its start (see
        /// `min_peer_rate`) that is never shorter than this.
        with_min_request_timeout, min_request_timeout: Duration
    );
    setting!(
        /// The slowest a peer may deliver verified data, bytes per second (default 64 KiB/s):
        /// a request gets at most the time this rate needs for it, so a peer that trickles
        /// bytes loses its requests to others and, failing again and again, is dropped.
        with_min_peer_rate, min_peer_rate: u64
    );
    setting!(
        /// Fetch the last pieces from a second peer when their holder is slow (default on).
        with_hedge, hedge: bool
    );
    setting!(
        /// First retry delay after a failure (default 200 ms); doubles, with jitter.
        with_backoff_min, backoff_min: Duration
    );
    setting!(
        /// Longest retry delay (default 10 s).
        with_backoff_max, backoff_max: Duration
    );
    setting!(
        /// Failures in a row after which a peer is dropped from the download (default 8); it
        /// bounds the connection attempts made to any address too.
        with_max_peer_failures, max_peer_failures: u32
    );
    setting!(
        /// Most peers one download uses (default 16); others that advertise it are ignored.
        with_max_peers, max_peers: usize
    );
    setting!(
        /// The download fails when no verified byte has arrived for this long (default 120 s).
        with_no_progress_timeout, no_progress_timeout: Duration
    );
    setting!(
        /// Time to connect to a peer and for both to prove the token (default 10 s).
        with_connect_timeout, connect_timeout: Duration
    );
    setting!(
        /// How often progress is made durable for resume (default 1 s).
        with_persist_interval, persist_interval: Duration
    );
    setting!(
        /// How often progress updates are published (default 250 ms).
        with_progress_interval, progress_interval: Duration
    );
    setting!(
        /// Disk kept for partial downloads of other snapshots (default 16 GiB), so that a
        /// download interrupted for another keeps its progress; the least recently used go
        /// first.
        with_partial_budget, partial_budget: u64
    );
    setting!(
        /// Free disk left over once a download's files are reserved (default 1 GiB).
        with_disk_headroom, disk_headroom: u64
    );
    setting!(
        /// Most chunks a download may have (default 2^26: 1 TiB at 16 KiB); bounds the
        /// bookkeeping a single advertisement can make the node allocate (8 MiB per bitmap).
        with_max_chunks, max_chunks: u64
    );
    setting!(
        /// QUIC transport settings.
        with_transport, transport: TransportTuning
    );

    /// Checks the values.
    pub fn validate(&self) -> Result<(), ConfigError> {
        ConfigError::nonzero("download.request_chunks", self.request_chunks)?;
        ConfigError::nonzero("download.initial_window", self.initial_window as u64)?;
        ConfigError::nonzero("download.max_inflight", self.max_inflight as u64)?;
        ConfigError::nonzero(
            "download.max_peer_failures",
            u64::from(self.max_peer_failures),
        )?;
        ConfigError::nonzero("download.max_peers", self.max_peers as u64)?;
        ConfigError::nonzero("download.min_peer_rate", self.min_peer_rate)?;
        ConfigError::nonzero("download.max_chunks", self.max_chunks)?;
        if self.max_window < self.initial_window {
            return Err(ConfigError::new(
                "download.max_window",
                "at least initial_window",
                self.max_window,
            ));
        }
        for (name, d) in [
            ("download.min_request_timeout", self.min_request_timeout),
            ("download.backoff_min", self.backoff_min),
            ("download.no_progress_timeout", self.no_progress_timeout),
            ("download.connect_timeout", self.connect_timeout),
            ("download.persist_interval", self.persist_interval),
            ("download.progress_interval", self.progress_interval),
        ] {
            ConfigError::nonzero_duration(name, d)?;
        }
        if self.backoff_max < self.backoff_min {
            return Err(ConfigError::new(
                "download.backoff_max",
                "at least backoff_min",
                self.backoff_max,
            ));
        }
        self.transport.validate()
    }

    pub(super) fn scheduler(&self, chunk_size: ChunkSize) -> SchedulerConfig {
        SchedulerConfig {
            piece_chunks: self.request_chunks,
            chunk_bytes: u64::from(chunk_size.bytes()),
            initial_window: self.initial_window,
            max_window: self.max_window,
            max_inflight: self.max_inflight,
            min_request_timeout: self.min_request_timeout,
            min_peer_rate: self.min_peer_rate,
            hedge: self.hedge,
            backoff_min: self.backoff_min,
            backoff_max: self.backoff_max,
            max_peer_failures: self.max_peer_failures,
            no_progress_timeout: self.no_progress_timeout,
            jitter_seed: None,
        }
    }
}
