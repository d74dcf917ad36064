//! [`DiscoveryConfig`]: how often a node asks, how long it listens, whom it answers, when it
//! gives up on a peer or a snapshot.

use std::time::Duration;

use super::message::AdvertLimits;
use super::policy::TrustPolicy;
use crate::config_error::ConfigError;

/// Settings of discovery and decision (a part of [`crate::Config`]). Values are checked when
/// the behaviour is built.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DiscoveryConfig {
    pub(crate) discovery_interval: Duration,
    pub(crate) answer_window: Duration,
    pub(crate) behind_threshold: u64,
    pub(crate) announce_window: Duration,
    pub(crate) announce_delay: Duration,
    pub(crate) announce_redundancy: u32,
    pub(crate) answer_cooldown: Duration,
    pub(crate) min_request_interval: Duration,
    pub(crate) max_strikes: u32,
    pub(crate) max_message_bytes: usize,
    pub(crate) limits: AdvertLimits,
    pub(crate) sync_enabled: bool,
    pub(crate) failed_cooldown: Duration,
    pub(crate) max_tracked_peers: usize,
    pub(crate) dial_budget: u32,
    pub(crate) max_direct_asks: usize,
    pub(crate) strike_decay: Duration,
    pub(crate) announcements_per_source: u32,
    pub(crate) chain_clock: Option<ChainClock>,
    pub(crate) executes: bool,
    /// Set from [`crate::Config::with_trust`], where the trust settings live.
    pub(crate) policy: TrustPolicy,
    /// The network name attestations are checked for (the behaviour's).
    pub(crate) network: String,
}

/// The chain's clock: when slot 0 was and how long a slot lasts, so that a node knows which
/// slot the chain is at without asking anyone, and refuses snapshots of slots the chain cannot
/// have reached yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainClock {
    genesis_unix_ms: u64,
    slot: Duration,
}

impl ChainClock {
    /// A clock whose slot 0 began at `genesis_unix_ms` (milliseconds since the Unix epoch) and
    /// whose slots last `slot` each.
    pub fn new(genesis_unix_ms: u64, slot: Duration) -> Self {
        Self {
            genesis_unix_ms,
            slot,
        }
    }

    /// When slot 0 began, milliseconds since the Unix epoch.
    pub fn genesis_unix_ms(&self) -> u64 {
        self.genesis_unix_ms
    }

    /// How long a slot lasts.
    pub fn slot(&self) -> Duration {
        self.slot
    }

    /// The slot the chain is at when the wall clock reads `unix_ms`.
    pub fn slot_at(&self, unix_ms: u64) -> u64 {
        let slot_ms = (self.slot.as_millis() as u64).max(1);
        unix_ms.saturating_sub(self.genesis_unix_ms) / slot_ms
    }
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        Self {
            discovery_interval: Duration::from_secs(30),
            answer_window: Duration::from_secs(1),
            behind_threshold: 100,
            announce_window: Duration::from_secs(60),
            announce_delay: Duration::from_secs(1),
            announce_redundancy: 3,
            answer_cooldown: Duration::from_secs(1),
            min_request_interval: Duration::from_millis(500),
            max_strikes: 5,
            max_message_bytes: 16 << 10,
            limits: AdvertLimits {
                max_archive_bytes: 1 << 40,
                max_chunks: 1 << 26,
            },
            sync_enabled: true,
            failed_cooldown: Duration::from_secs(600),
            max_tracked_peers: 4096,
            dial_budget: 16,
            max_direct_asks: 16,
            strike_decay: Duration::from_secs(600),
            announcements_per_source: 16,
            chain_clock: None,
            executes: true,
            policy: TrustPolicy::default(),
            network: "default".into(),
        }
    }
}

impl DiscoveryConfig {
    /// Sets how often the node checks whether it needs a snapshot (default 30 s; the first
    /// check is right after start).
    pub fn with_discovery_interval(mut self, interval: Duration) -> Self {
        self.discovery_interval = interval;
        self
    }

    /// How often the node checks whether it needs a snapshot.
    pub fn discovery_interval(&self) -> Duration {
        self.discovery_interval
    }

    /// Sets how long answers are collected before the choice is made (default 1 s): long
    /// enough for holders a few round trips away, short enough not to delay a sync. A round
    /// that knows an acceptable newer snapshot decides once no answer came for a quarter of it.
    pub fn with_answer_window(mut self, window: Duration) -> Self {
        self.answer_window = window;
        self
    }

    /// How long answers are collected before the choice is made.
    pub fn answer_window(&self) -> Duration {
        self.answer_window
    }

    /// Sets how far behind the newest snapshot it knows of (or the chain's tip) a node's
    /// state may be before it syncs, in slots (default 100). An empty DB always syncs.
    pub fn with_behind_threshold(mut self, slots: u64) -> Self {
        self.behind_threshold = slots;
        self
    }

    /// How far behind a node's state may be before it syncs, in slots.
    pub fn behind_threshold(&self) -> u64 {
        self.behind_threshold
    }

    /// Sets whether the node executes the chain from its start (default true): a node with
    /// state then keeps it, taking only what a vouching policy accepts, until it is told it is
    /// behind (a chain tip, the chain clock), from the first moment after a restart rather
    /// than from its first committed slot. A node that only follows snapshots turns this
    /// off; it counts as executing once it reports a committed slot, and a sync it chose
    /// before that which the policy would no longer take is cancelled then.
    pub fn with_executes(mut self, executes: bool) -> Self {
        self.executes = executes;
        self
    }

    /// Sets whether the node downloads snapshots itself (default true). A node that only
    /// serves turns this off.
    pub fn with_sync_enabled(mut self, enabled: bool) -> Self {
        self.sync_enabled = enabled;
        self
    }

    /// Whether the node downloads snapshots itself.
    pub fn sync_enabled(&self) -> bool {
        self.sync_enabled
    }

    /// Sets the window in which nodes that asked count as waiting (default 60 s): a snapshot
    /// made or loaded meanwhile is announced on the topic. A node that asked within it and
    /// heard of nothing newer knows it is current.
    pub fn with_announce_window(mut self, window: Duration) -> Self {
        self.announce_window = window;
        self
    }

    /// The window in which nodes that asked count as waiting.
    pub fn announce_window(&self) -> Duration {
        self.announce_window
    }

    /// Sets the longest random delay before an announcement (default 1 s), so that when many
    /// nodes make the same snapshot, a few announce it.
    pub fn with_announce_delay(mut self, delay: Duration) -> Self {
        self.announce_delay = delay;
        self
    }

    /// The longest random delay before an announcement.
    pub fn announce_delay(&self) -> Duration {
        self.announce_delay
    }

    /// Sets how many announcements of the same snapshot, heard during the delay, make this
    /// node's own unnecessary (default 3).
    pub fn with_announce_redundancy(mut self, announcements: u32) -> Self {
        self.announce_redundancy = announcements;
        self
    }

    /// How many announcements heard make this node's own unnecessary.
    pub fn announce_redundancy(&self) -> u32 {
        self.announce_redundancy
    }

    /// Sets the shortest time between two answers to the same requester (default 1 s).
    pub fn with_answer_cooldown(mut self, cooldown: Duration) -> Self {
        self.answer_cooldown = cooldown;
        self
    }

    /// The shortest time between two answers to the same requester.
    pub fn answer_cooldown(&self) -> Duration {
        self.answer_cooldown
    }

    /// Sets the shortest time between two requests of this node (default 500 ms).
    pub fn with_min_request_interval(mut self, interval: Duration) -> Self {
        self.min_request_interval = interval;
        self
    }

    /// The shortest time between two requests of this node.
    pub fn min_request_interval(&self) -> Duration {
        self.min_request_interval
    }

    /// Sets how many bad messages make a peer ignored (default 5).
    pub fn with_max_strikes(mut self, strikes: u32) -> Self {
        self.max_strikes = strikes;
        self
    }

    /// How many bad messages make a peer ignored.
    pub fn max_strikes(&self) -> u32 {
        self.max_strikes
    }

    /// Sets the largest discovery message accepted (default 16 KiB; gossipsub's limit too).
    pub fn with_max_message_bytes(mut self, bytes: usize) -> Self {
        self.max_message_bytes = bytes;
        self
    }

    /// The largest discovery message accepted.
    pub fn max_message_bytes(&self) -> usize {
        self.max_message_bytes
    }

    /// Sets the largest archive an advertisement may claim (default 1 TiB); larger claims are
    /// refused as malformed.
    pub fn with_max_archive_bytes(mut self, bytes: u64) -> Self {
        self.limits.max_archive_bytes = bytes;
        self
    }

    /// The largest archive an advertisement may claim.
    pub fn max_archive_bytes(&self) -> u64 {
        self.limits.max_archive_bytes
    }

    /// Sets how long a snapshot that failed to download or load is not chosen again (default
    /// 10 min).
    pub fn with_failed_cooldown(mut self, cooldown: Duration) -> Self {
        self.failed_cooldown = cooldown;
        self
    }

    /// How long a snapshot that failed is not chosen again.
    pub fn failed_cooldown(&self) -> Duration {
        self.failed_cooldown
    }

    /// Sets how many dials per discovery interval this node makes to answer requesters it is
    /// not connected to (default 16); beyond it, those get their answers from others.
    pub fn with_dial_budget(mut self, dials: u32) -> Self {
        self.dial_budget = dials;
        self
    }

    /// How many dials per interval this node makes to answer requesters.
    pub fn dial_budget(&self) -> u32 {
        self.dial_budget
    }

    /// Sets how many peers each table remembers (adverts, strikes, cooldowns; default 4096).
    /// Identities are free: every table has a bound.
    pub fn with_max_tracked_peers(mut self, peers: usize) -> Self {
        self.max_tracked_peers = peers;
        self
    }

    /// How many peers each table remembers.
    pub fn max_tracked_peers(&self) -> usize {
        self.max_tracked_peers
    }

    /// Sets how many connected peers not on the topic a round asks directly (default 16).
    pub fn with_max_direct_asks(mut self, peers: usize) -> Self {
        self.max_direct_asks = peers;
        self
    }

    /// How many connected peers not on the topic a round asks directly.
    pub fn max_direct_asks(&self) -> usize {
        self.max_direct_asks
    }

    /// Sets how long until a strike is forgotten (default 10 min): a peer struck for a bad
    /// message or bad bytes is ignored while its strikes reach `max_strikes`, and comes back
    /// as they decay, so that a passing fault, or blame an attacker arranged, does not shut a
    /// peer out for good.
    pub fn with_strike_decay(mut self, decay: Duration) -> Self {
        self.strike_decay = decay;
        self
    }

    /// How long until a strike is forgotten.
    pub fn strike_decay(&self) -> Duration {
        self.strike_decay
    }

    /// Sets how many new announcers one connected peer may bring in per discovery interval by
    /// relaying their announcements (default 16). One connection can carry messages signed by
    /// any number of fresh identities; this bounds what it can make the node record.
    pub fn with_announcements_per_source(mut self, announcers: u32) -> Self {
        self.announcements_per_source = announcers;
        self
    }

    /// How many new announcers one connected peer may bring in per interval.
    pub fn announcements_per_source(&self) -> u32 {
        self.announcements_per_source
    }

    /// Sets the chain's clock (default none). With it, a node knows the chain's tip by itself:
    /// it refuses snapshots more than `behind_threshold` slots ahead of it, and a node that
    /// executes the chain and falls behind it syncs (see [`crate::Behaviour::set_chain_tip`]
    /// for a tip the owner's consensus knows).
    pub fn with_chain_clock(mut self, clock: Option<ChainClock>) -> Self {
        self.chain_clock = clock;
        self
    }

    /// The chain's clock.
    pub fn chain_clock(&self) -> Option<ChainClock> {
        self.chain_clock
    }

    /// Checks the values.
    pub fn validate(&self) -> Result<(), ConfigError> {
        ConfigError::nonzero_duration("strike_decay", self.strike_decay)?;
        ConfigError::nonzero(
            "announcements_per_source",
            u64::from(self.announcements_per_source),
        )?;
        if let Some(clock) = self.chain_clock {
            ConfigError::nonzero_duration("chain_clock.slot", clock.slot)?;
        }
        ConfigError::nonzero_duration("discovery_interval", self.discovery_interval)?;
        ConfigError::nonzero_duration("answer_window", self.answer_window)?;
        ConfigError::nonzero_duration("announce_window", self.announce_window)?;
        ConfigError::nonzero_duration("failed_cooldown", self.failed_cooldown)?;
        ConfigError::nonzero("max_strikes", u64::from(self.max_strikes))?;
        ConfigError::nonzero("announce_redundancy", u64::from(self.announce_redundancy))?;
        ConfigError::nonzero("max_tracked_peers", self.max_tracked_peers as u64)?;
        ConfigError::nonzero("max_archive_bytes", self.limits.max_archive_bytes)?;
        if self.max_message_bytes < 1024 {
            return Err(ConfigError::new(
                "max_message_bytes",
                "at least 1024",
                self.max_message_bytes,
            ));
        }
        if self.answer_window > self.discovery_interval {
            return Err(ConfigError::new(
                "answer_window",
                "no longer than discovery_interval",
                self.answer_window,
            ));
        }
        self.policy.validate()
    }
}
