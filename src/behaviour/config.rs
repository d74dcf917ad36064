//! [`Config`] of the snapsync [`Behaviour`](super::Behaviour): one source of truth.
//!
//! Every setting has a `with_*` setter and a getter; none is clamped. The parts are nested, one
//! settings type each: discovery ([`DiscoveryConfig`]), creation ([`CreatorConfig`]), serving
//! ([`StreamerConfig`]), downloading ([`DownloadConfig`]) and loading ([`LoadLimits`]). Values
//! that cannot work (a zero interval, an empty window, a limit of 0) are refused with a
//! [`ConfigError`] naming the setting when the behaviour is built. The token, the trust policy
//! and the metrics are given once here and shared by every part.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use libp2p::PeerId;

use crate::chunk::{ChunkSize, ChunkSizeError};
use crate::config_error::ConfigError;
use crate::db::StateCheck;
use crate::discovery::{DiscoveryConfig, TrustPolicy};
use crate::hash::BankHash;
use crate::metrics::Metrics;
use crate::snapshot::{CreatorConfig, LoadLimits};
use crate::transfer::{DownloadConfig, StreamerConfig, Token};

/// Settings of a snapsync [`Behaviour`](super::Behaviour).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    snapshot_dir: PathBuf,
    network: String,
    discovery: DiscoveryConfig,
    heartbeat_interval: Duration,
    advertise_addrs: Vec<SocketAddr>,
    token: Option<Token>,
    creator: CreatorConfig,
    streamer: StreamerConfig,
    download: DownloadConfig,
    load: LoadLimits,
    state_check: AppCheck,
    metrics: Metrics,
    web_sources: Vec<String>,
    web_ca_files: Vec<PathBuf>,
    publish_dir: Option<PathBuf>,
    attest: bool,
}

/// The application's state check, if any (a closure has no `Debug`).
#[derive(Clone, Default)]
struct AppCheck(Option<Arc<dyn StateCheck>>);

impl std::fmt::Debug for AppCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Some(..)" } else { "None" })
    }
}

impl Config {
    /// Settings with the defaults, keeping snapshots in `snapshot_dir`.
    pub fn new(snapshot_dir: impl Into<PathBuf>) -> Self {
        Self {
            snapshot_dir: snapshot_dir.into(),
            network: "default".into(),
            attest: true,
            discovery: DiscoveryConfig::default(),
            heartbeat_interval: Duration::from_secs(1),
            advertise_addrs: Vec::new(),
            token: None,
            creator: CreatorConfig::default(),
            streamer: StreamerConfig::default(),
            download: DownloadConfig::default(),
            load: LoadLimits::default(),
            state_check: AppCheck::default(),
            metrics: Metrics::default(),
            web_sources: Vec::new(),
            web_ca_files: Vec::new(),
            publish_dir: None,
        }
    }

    /// [`Config::new`] with `SNAPSHOT_TOKEN` and `SNAPSHOT_CHUNK_SIZE` from the environment.
    /// A chunk size that is not valid is an error naming the variable, not a silent default.
    pub fn from_env(snapshot_dir: impl Into<PathBuf>) -> Result<Self, ChunkSizeError> {
        let chunk_size = ChunkSize::from_env()?;
        Ok(Self::new(snapshot_dir)
            .with_token(Token::from_env())
            .with_chunk_size(chunk_size))
    }

    /// Checks every value, the nested settings' too.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.network.is_empty() || self.network.contains('/') || self.network.len() > 64 {
            return Err(ConfigError::new(
                "network",
                "1 to 64 characters, without '/'",
                &self.network,
            ));
        }
        self.discovery.validate()?;
        ConfigError::nonzero_duration("heartbeat_interval", self.heartbeat_interval)?;
        self.creator
            .validate()
            .map_err(|e| ConfigError::new("creator", "valid", e.to_string()))?;
        self.streamer.validate()?;
        self.download.validate()?;
        if self.download.max_chunks() > self.discovery.limits.max_chunks {
            return Err(ConfigError::new(
                "download.max_chunks",
                "at most the discovery limit",
                self.download.max_chunks(),
            ));
        }
        Ok(())
    }

    /// Sets the snapshot directory.
    pub fn with_snapshot_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.snapshot_dir = dir.into();
        self
    }

    /// The snapshot directory.
    pub fn snapshot_dir(&self) -> &Path {
        &self.snapshot_dir
    }

    /// Sets the network name (default `"default"`): nodes only sync with nodes of the same
    /// name, which is part of the gossip topic.
    pub fn with_network(mut self, network: impl Into<String>) -> Self {
        self.network = network.into();
        self
    }

    /// The network name.
    pub fn network(&self) -> &str {
        &self.network
    }

    /// Whether the node signs the snapshots it makes from its own state with its identity key
    /// (default: it does), so that nodes trusting it can take them from anyone who relays the
    /// [`Attestation`](crate::snapshot::Attestation).
    pub fn with_attesting(mut self, attest: bool) -> Self {
        self.attest = attest;
        self
    }

    /// Whether the node signs the snapshots it makes.
    pub fn attests(&self) -> bool {
        self.attest
    }

    /// Sets discovery and decision: intervals, windows, thresholds, bounds. The trust policy is
    /// not part of it: it is set with [`Config::with_trust`] (before or after) and kept.
    pub fn with_discovery(mut self, discovery: DiscoveryConfig) -> Self {
        let policy = std::mem::take(&mut self.discovery.policy);
        self.discovery = DiscoveryConfig {
            policy,
            ..discovery
        };
        self
    }

    /// Discovery and decision.
    pub fn discovery(&self) -> &DiscoveryConfig {
        &self.discovery
    }

    /// Sets the trust policy (default: [`TrustPolicy::Untrusted`] with one peer, which logs a
    /// warning at start). See [`TrustPolicy`] for what each mode protects against.
    pub fn with_trust(mut self, policy: TrustPolicy) -> Self {
        self.discovery.policy = policy;
        self
    }

    /// The trust policy.
    pub fn trust(&self) -> &TrustPolicy {
        &self.discovery.policy
    }

    /// Untrusted mode: a snapshot `n` distinct peers advertise alike.
    pub fn with_min_agreeing_peers(self, n: usize) -> Self {
        self.with_trust(TrustPolicy::Untrusted {
            min_agreeing_peers: n,
        })
    }

    /// Trusted peers: a snapshot `quorum` of `peers` advertise alike.
    pub fn with_trusted_peers(
        self,
        peers: impl IntoIterator<Item = PeerId>,
        quorum: usize,
    ) -> Self {
        self.with_trust(TrustPolicy::TrustedPeers {
            peers: peers.into_iter().collect::<HashSet<_>>(),
            quorum,
        })
    }

    /// A trusted snapshot: only this slot and bank hash.
    pub fn with_trusted_snapshot(self, slot: u64, bank_hash: BankHash) -> Self {
        self.with_trust(TrustPolicy::TrustedSnapshot {
            slot,
            bank_hash,
            content_root: None,
        })
    }

    /// Sets the gossipsub heartbeat interval of snapsync's topic (default 1 s).
    pub fn with_heartbeat_interval(mut self, interval: Duration) -> Self {
        self.heartbeat_interval = interval;
        self
    }

    /// The gossipsub heartbeat interval.
    pub fn heartbeat_interval(&self) -> Duration {
        self.heartbeat_interval
    }

    /// Sets the chunk-stream addresses to advertise; when empty (the default) they are derived
    /// from the swarm's listen and external addresses and the streamer's port.
    pub fn with_advertise_addrs(mut self, addrs: Vec<SocketAddr>) -> Self {
        self.advertise_addrs = addrs;
        self
    }

    /// The chunk-stream addresses to advertise.
    pub fn advertise_addrs(&self) -> &[SocketAddr] {
        &self.advertise_addrs
    }

    /// Sets the shared token (`SNAPSHOT_TOKEN`), for serving and downloading both.
    pub fn with_token(mut self, token: Option<Token>) -> Self {
        self.token = token;
        self
    }

    /// The shared token.
    pub fn token(&self) -> Option<&Token> {
        self.token.as_ref()
    }

    /// Sets snapshot creation (`range_for_snapshot`, full interval, retention, chunk size, zstd
    /// level).
    pub fn with_creator(mut self, creator: CreatorConfig) -> Self {
        self.creator = creator;
        self
    }

    /// Snapshot creation.
    pub fn creator(&self) -> &CreatorConfig {
        &self.creator
    }

    /// Sets `SNAPSHOT_CHUNK_SIZE`, the chunk size this node makes and serves its snapshots in
    /// (default 16 KiB; part of snapshot creation, set here so that a creation setting made
    /// before it is kept).
    pub fn with_chunk_size(mut self, size: ChunkSize) -> Self {
        self.creator = self
            .creator
            .with_options(self.creator.options().with_chunk_size(size));
        self
    }

    /// The chunk size this node makes and serves its snapshots in.
    pub fn chunk_size(&self) -> ChunkSize {
        self.creator.options().chunk_size()
    }

    /// Sets the serving side of the chunk stream.
    pub fn with_streamer(mut self, streamer: StreamerConfig) -> Self {
        self.streamer = streamer;
        self
    }

    /// The serving side of the chunk stream.
    pub fn streamer(&self) -> &StreamerConfig {
        &self.streamer
    }

    /// Sets the downloading side of the chunk stream.
    pub fn with_download(mut self, download: DownloadConfig) -> Self {
        self.download = download;
        self
    }

    /// The downloading side of the chunk stream.
    pub fn download(&self) -> &DownloadConfig {
        &self.download
    }

    /// Sets the limits loading applies on top of what manifests declare.
    pub fn with_load_limits(mut self, load: LoadLimits) -> Self {
        self.load = load;
        self
    }

    /// Loading limits.
    pub fn load_limits(&self) -> &LoadLimits {
        &self.load
    }

    /// Sets the application's check of every state before it goes live (see [`StateCheck`]):
    /// how a chain compares a loaded state with the state root its light client or finalized
    /// headers know. None by default: a state whose bank hash is proven goes live.
    pub fn with_state_check(mut self, check: impl StateCheck) -> Self {
        self.state_check = AppCheck(Some(Arc::new(check)));
        self
    }

    /// The application's state check, if one is set.
    pub fn state_check(&self) -> Option<&Arc<dyn StateCheck>> {
        self.state_check.0.as_ref()
    }

    /// Sets where to count what the node does (see [`Metrics::register`]); shared by
    /// discovery, the streamer and the downloader.
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Where the node counts.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Sets the web sources (feature `web`): base URLs of directories of published snapshots
    /// (see [`crate::snapshot::publish`]) on static HTTP(S) servers or object stores. What a
    /// source's index lists counts as one untrusted peer's advert: the trust policy decides
    /// whether it may be taken (a pinned snapshot or trusted peers make a web source safe to use
    /// alone); once chosen, a web source serves chunks like a peer, each checked against the
    /// content root.
    #[cfg(feature = "web")]
    pub fn with_web_sources(mut self, urls: Vec<String>) -> Self {
        self.web_sources = urls;
        self
    }

    /// The web sources' base URLs.
    pub fn web_sources(&self) -> &[String] {
        &self.web_sources
    }

    /// Sets CA bundles (PEM files) HTTPS web sources are checked against, beside the Mozilla
    /// roots and the OS's trust store (see [`crate::transfer::WebRoots`]): a mirror behind a
    /// private CA. A bundle that cannot be read is an error naming it when the behaviour is
    /// built.
    #[cfg(feature = "web")]
    pub fn with_web_ca_files(mut self, files: Vec<PathBuf>) -> Self {
        self.web_ca_files = files;
        self
    }

    /// The CA bundles web sources are checked against besides the usual roots.
    pub fn web_ca_files(&self) -> &[PathBuf] {
        &self.web_ca_files
    }

    /// Sets a directory that mirrors the node's snapshots for a static web server or an object
    /// store (default none): after each snapshot made or synced, the directory holds exactly
    /// the snapshots the store retains, in the store's layout, with an index (see
    /// [`crate::snapshot::publish`]).
    pub fn with_publish_dir(mut self, dir: Option<PathBuf>) -> Self {
        self.publish_dir = dir;
        self
    }

    /// The directory the snapshots are mirrored to, if any.
    pub fn publish_dir(&self) -> Option<&Path> {
        self.publish_dir.as_deref()
    }

    /// The gossip topic of this network.
    pub fn topic(&self) -> String {
        format!("snapsync/{}/discovery/2", self.network)
    }

    /// What the discovery machine runs with: its settings, the trust policy, and advert limits
    /// no looser than what a download may track.
    pub(crate) fn discovery_rules(&self) -> DiscoveryConfig {
        let mut d = self.discovery.clone();
        d.network = self.network.clone();
        d.limits.max_chunks = self.download.max_chunks().min(d.limits.max_chunks);
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_that_cannot_work_are_refused_naming_the_setting() {
        let ok = Config::new("x");
        ok.validate().unwrap();
        let refused = |c: Config| c.validate().unwrap_err().setting;
        let discovery = |d: DiscoveryConfig| ok.clone().with_discovery(d);
        let d = DiscoveryConfig::default();
        assert_eq!(
            refused(discovery(d.clone().with_discovery_interval(Duration::ZERO))),
            "discovery_interval"
        );
        assert_eq!(
            refused(discovery(d.clone().with_answer_window(Duration::ZERO))),
            "answer_window"
        );
        assert_eq!(
            refused(discovery(
                d.clone().with_answer_window(Duration::from_secs(60))
            )),
            "answer_window"
        );
        assert_eq!(refused(discovery(d.with_max_strikes(0))), "max_strikes");
        assert_eq!(
            refused(ok.clone().with_min_agreeing_peers(0)),
            "trust.min_agreeing_peers"
        );
        assert_eq!(
            refused(ok.clone().with_trusted_peers([PeerId::random()], 2)),
            "trust.quorum"
        );
        assert_eq!(refused(ok.clone().with_network("a/b")), "network");
        assert_eq!(
            refused(
                ok.clone()
                    .with_streamer(StreamerConfig::default().with_max_connections(0))
            ),
            "streamer.max_connections"
        );
        assert_eq!(
            refused(
                ok.clone()
                    .with_download(DownloadConfig::default().with_connect_timeout(Duration::ZERO))
            ),
            "download.connect_timeout"
        );
        let e = ok
            .with_heartbeat_interval(Duration::ZERO)
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("heartbeat_interval"), "{e}");
    }
}
