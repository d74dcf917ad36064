//! [`DownloadConfig`]: every limit, timeout and interval of the downloading side.

use std::net::SocketAddr;
use std::time::Duration;

use super::scheduler::SchedulerConfig;
use crate::config_error::ConfigError;
use crate::transfer::TransportTuning;

/// Settings of a [`super::Downloader`]. Values are checked when the downloader is built.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct DownloadConfig {
    pub(super) bind: SocketAddr,
    /// What the scheduler of each download runs with.
    pub(super) schedule: SchedulerConfig,
    pub(super) connect_timeout: Duration,
    pub(super) persist_interval: Duration,
    pub(super) progress_interval: Duration,
    pub(super) partial_budget: u64,
    pub(super) disk_headroom: u64,
    pub(super) max_chunks: u64,
    pub(super) serve_partial: bool,
    pub(super) serve_port: u16,
    pub(super) transport: TransportTuning,
}

impl Default for DownloadConfig {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([0, 0, 0, 0], 0)),
            schedule: SchedulerConfig {
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
                no_progress_timeout: Duration::from_secs(120),
                have_interval: Duration::from_secs(1),
                max_peers: 16,
                snub_timeout: Duration::from_secs(20),
                rotate_interval: Duration::from_secs(30),
                jitter_seed: None,
            },
            connect_timeout: Duration::from_secs(10),
            persist_interval: Duration::from_secs(1),
            progress_interval: Duration::from_millis(250),
            partial_budget: 16 << 30,
            disk_headroom: 1 << 30,
            max_chunks: 1 << 26,
            serve_partial: true,
            serve_port: 0,
            transport: TransportTuning::default(),
        }
    }
}

impl DownloadConfig {
    /// Local UDP address of the downloader's endpoint (default `0.0.0.0:0`).
    pub fn with_bind(mut self, value: SocketAddr) -> Self {
        self.bind = value;
        self
    }

    /// The value [`with_bind`](Self::with_bind) sets.
    pub fn bind(&self) -> SocketAddr {
        self.bind
    }

    /// Chunks per request (default 32: 512 KiB at 16 KiB chunks, under 0.6% of proof).
    pub fn with_request_chunks(mut self, value: u64) -> Self {
        self.schedule.request_chunks = value;
        self
    }

    /// The value [`with_request_chunks`](Self::with_request_chunks) sets.
    pub fn request_chunks(&self) -> u64 {
        self.schedule.request_chunks
    }

    /// Requests in flight to a peer before its rate is known (default 4).
    pub fn with_initial_window(mut self, value: usize) -> Self {
        self.schedule.initial_window = value;
        self
    }

    /// The value [`with_initial_window`](Self::with_initial_window) sets.
    pub fn initial_window(&self) -> usize {
        self.schedule.initial_window
    }

    /// Most requests in flight to one peer (default 16).
    pub fn with_max_window(mut self, value: usize) -> Self {
        self.schedule.max_window = value;
        self
    }

    /// The value [`with_max_window`](Self::with_max_window) sets.
    pub fn max_window(&self) -> usize {
        self.schedule.max_window
    }

    /// Most requests in flight in all; with `request_chunks`, bounds the memory of a
    /// download (default 32, i.e. 16 MiB at the defaults).
    pub fn with_max_inflight(mut self, value: usize) -> Self {
        self.schedule.max_inflight = value;
        self
    }

    /// The value [`with_max_inflight`](Self::with_max_inflight) sets.
    pub fn max_inflight(&self) -> usize {
        self.schedule.max_inflight
    }

    /// A request that receives nothing for this long is abandoned and retried elsewhere
    /// (default 10 s); every request also has a deadline from its start (see
    /// `min_peer_rate`) that is never shorter than this. A source whose requests together
    /// bring no verified byte for a quarter of it (at least eight round trips and two chunks'
    /// time at `min_peer_rate`), unless every source with requests in flight is as silent, has
    /// gone quiet: its requests go to others at once.
    pub fn with_min_request_timeout(mut self, value: Duration) -> Self {
        self.schedule.min_request_timeout = value;
        self
    }

    /// The value [`with_min_request_timeout`](Self::with_min_request_timeout) sets.
    pub fn min_request_timeout(&self) -> Duration {
        self.schedule.min_request_timeout
    }

    /// The slowest a peer may deliver verified data, bytes per second (default 64 KiB/s):
    /// a request gets at most the time this rate needs for it, so a peer that trickles
    /// bytes loses its requests to others and, failing again and again, is dropped.
    pub fn with_min_peer_rate(mut self, value: u64) -> Self {
        self.schedule.min_peer_rate = value;
        self
    }

    /// The value [`with_min_peer_rate`](Self::with_min_peer_rate) sets.
    pub fn min_peer_rate(&self) -> u64 {
        self.schedule.min_peer_rate
    }

    /// Fetch the last pieces from a second peer when their holder is slow (default on).
    pub fn with_hedge(mut self, value: bool) -> Self {
        self.schedule.hedge = value;
        self
    }

    /// The value [`with_hedge`](Self::with_hedge) sets.
    pub fn hedge(&self) -> bool {
        self.schedule.hedge
    }

    /// First retry delay after a failure (default 200 ms); doubles, with jitter.
    pub fn with_backoff_min(mut self, value: Duration) -> Self {
        self.schedule.backoff_min = value;
        self
    }

    /// The value [`with_backoff_min`](Self::with_backoff_min) sets.
    pub fn backoff_min(&self) -> Duration {
        self.schedule.backoff_min
    }

    /// Longest retry delay (default 10 s).
    pub fn with_backoff_max(mut self, value: Duration) -> Self {
        self.schedule.backoff_max = value;
        self
    }

    /// The value [`with_backoff_max`](Self::with_backoff_max) sets.
    pub fn backoff_max(&self) -> Duration {
        self.schedule.backoff_max
    }

    /// Failures in a row after which a peer is dropped from the download (default 8); it
    /// bounds the connection attempts made to any address too.
    pub fn with_max_peer_failures(mut self, value: u32) -> Self {
        self.schedule.max_peer_failures = value;
        self
    }

    /// The value [`with_max_peer_failures`](Self::with_max_peer_failures) sets.
    pub fn max_peer_failures(&self) -> u32 {
        self.schedule.max_peer_failures
    }

    /// Most peers one download uses (default 16); others that advertise it are ignored.
    pub fn with_max_peers(mut self, value: usize) -> Self {
        self.schedule.max_peers = value;
        self
    }

    /// The value [`with_max_peers`](Self::with_max_peers) sets.
    pub fn max_peers(&self) -> usize {
        self.schedule.max_peers
    }

    /// A source in a place that has delivered no verified byte for this long (busy, "not
    /// held", an empty bitfield, a stall) gives its place to a waiting one (default 20 s).
    /// Shorter turns places over faster, at the cost of dropping sources that would have
    /// delivered after a pause.
    pub fn with_snub_timeout(mut self, value: Duration) -> Self {
        self.schedule.snub_timeout = value;
        self
    }

    /// How often the sources that delivered least give their places to sources never tried,
    /// while some wait (default 30 s): how soon a fast newcomer gets tried.
    pub fn with_rotate_interval(mut self, value: Duration) -> Self {
        self.schedule.rotate_interval = value;
        self
    }

    /// The download fails when no verified byte has arrived for this long (default 120 s).
    pub fn with_no_progress_timeout(mut self, value: Duration) -> Self {
        self.schedule.no_progress_timeout = value;
        self
    }

    /// The value [`with_no_progress_timeout`](Self::with_no_progress_timeout) sets.
    pub fn no_progress_timeout(&self) -> Duration {
        self.schedule.no_progress_timeout
    }

    /// Whether the chunks verified so far are served to other downloaders while the download
    /// runs, by the node's streamer over the same store (default on): in a crowd that needs
    /// the same snapshot, each downloader's uplink adds to the few holders'.
    pub fn with_serve_partial(mut self, value: bool) -> Self {
        self.serve_partial = value;
        self
    }

    /// Whether the chunks verified so far are served while the download runs.
    pub fn serve_partial(&self) -> bool {
        self.serve_partial
    }

    /// The UDP port this node's streamer listens on (default none). A downloader that serves
    /// what it verifies tells the sources it asks what they hold, so that one downloading the
    /// same snapshot takes it as a source in turn, as BitTorrent peers trade both ways: a
    /// crowd's uplinks are found without waiting for discovery.
    pub fn with_serve_port(mut self, port: Option<u16>) -> Self {
        self.serve_port = port.unwrap_or(0);
        self
    }

    /// A source that downloads the snapshot too is asked again what it holds at most this
    /// often, and only when it has room for requests and holds nothing still wanted (default
    /// 1 s).
    pub fn with_have_interval(mut self, value: Duration) -> Self {
        self.schedule.have_interval = value;
        self
    }

    /// How often, at most, a source that downloads the snapshot too is asked what it holds.
    pub fn have_interval(&self) -> Duration {
        self.schedule.have_interval
    }

    /// Time to connect to a peer and for both to prove the token (default 10 s).
    pub fn with_connect_timeout(mut self, value: Duration) -> Self {
        self.connect_timeout = value;
        self
    }

    /// The value [`with_connect_timeout`](Self::with_connect_timeout) sets.
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// How often progress is made durable for resume (default 1 s).
    pub fn with_persist_interval(mut self, value: Duration) -> Self {
        self.persist_interval = value;
        self
    }

    /// The value [`with_persist_interval`](Self::with_persist_interval) sets.
    pub fn persist_interval(&self) -> Duration {
        self.persist_interval
    }

    /// How often progress updates are published (default 250 ms).
    pub fn with_progress_interval(mut self, value: Duration) -> Self {
        self.progress_interval = value;
        self
    }

    /// The value [`with_progress_interval`](Self::with_progress_interval) sets.
    pub fn progress_interval(&self) -> Duration {
        self.progress_interval
    }

    /// Disk kept for partial downloads of other snapshots (default 16 GiB), so that a
    /// download interrupted for another keeps its progress; the least recently used go
    /// first.
    pub fn with_partial_budget(mut self, value: u64) -> Self {
        self.partial_budget = value;
        self
    }

    /// The value [`with_partial_budget`](Self::with_partial_budget) sets.
    pub fn partial_budget(&self) -> u64 {
        self.partial_budget
    }

    /// Free disk left over once a download's files are reserved (default 1 GiB).
    pub fn with_disk_headroom(mut self, value: u64) -> Self {
        self.disk_headroom = value;
        self
    }

    /// The value [`with_disk_headroom`](Self::with_disk_headroom) sets.
    pub fn disk_headroom(&self) -> u64 {
        self.disk_headroom
    }

    /// Most chunks a download may have (default 2^26: 1 TiB at 16 KiB); bounds the
    /// bookkeeping a single advertisement can make the node allocate (8 MiB per bitmap).
    pub fn with_max_chunks(mut self, value: u64) -> Self {
        self.max_chunks = value;
        self
    }

    /// The value [`with_max_chunks`](Self::with_max_chunks) sets.
    pub fn max_chunks(&self) -> u64 {
        self.max_chunks
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
        ConfigError::nonzero("download.request_chunks", self.schedule.request_chunks)?;
        ConfigError::nonzero(
            "download.initial_window",
            self.schedule.initial_window as u64,
        )?;
        ConfigError::nonzero("download.max_inflight", self.schedule.max_inflight as u64)?;
        ConfigError::nonzero(
            "download.max_peer_failures",
            u64::from(self.schedule.max_peer_failures),
        )?;
        ConfigError::nonzero("download.max_peers", self.schedule.max_peers as u64)?;
        ConfigError::nonzero("download.min_peer_rate", self.schedule.min_peer_rate)?;
        ConfigError::nonzero("download.max_chunks", self.max_chunks)?;
        if self.schedule.max_window < self.schedule.initial_window {
            return Err(ConfigError::new(
                "download.max_window",
                "at least initial_window",
                self.schedule.max_window,
            ));
        }
        for (name, d) in [
            (
                "download.min_request_timeout",
                self.schedule.min_request_timeout,
            ),
            ("download.backoff_min", self.schedule.backoff_min),
            (
                "download.no_progress_timeout",
                self.schedule.no_progress_timeout,
            ),
            ("download.have_interval", self.schedule.have_interval),
            ("download.snub_timeout", self.schedule.snub_timeout),
            ("download.rotate_interval", self.schedule.rotate_interval),
            ("download.connect_timeout", self.connect_timeout),
            ("download.persist_interval", self.persist_interval),
            ("download.progress_interval", self.progress_interval),
        ] {
            ConfigError::nonzero_duration(name, d)?;
        }
        if self.schedule.backoff_max < self.schedule.backoff_min {
            return Err(ConfigError::new(
                "download.backoff_max",
                "at least backoff_min",
                self.schedule.backoff_max,
            ));
        }
        self.transport.validate()
    }
}
