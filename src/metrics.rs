//! Prometheus metrics ([`Metrics`]), with `prometheus-client`, the crate libp2p's own metrics
//! use, so they go in the same registry.
//!
//! Every event is counted once, here: the counters the behaviour's and the streamer's stats
//! report are these same values. Every series, labelled ones included, exists from the start
//! (at zero), label values are snake_case, and units end the names
//! (`snapsync_served_bytes_total`).

use std::fmt::Write;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

macro_rules! label_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
        pub(crate) enum $name {
            $($(#[$vdoc])* $variant),+
        }

        impl $name {
            /// Every value, for initialising the labelled series.
            pub(crate) const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The label value.
            pub(crate) fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl EncodeLabelValue for $name {
            fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
                encoder.write_str(self.as_str())
            }
        }
    };
}

label_enum!(
    /// Why a streamer refused a connection.
    RefusedReason {
        /// Wrong or missing token proof.
        Unauthorized => "unauthorized",
        /// A connection limit was reached.
        Busy => "busy",
        /// Unsupported protocol version, or no hello in time.
        Protocol => "protocol",
        /// The client did not read its responses in time.
        TooSlow => "too_slow",
        /// Asked to prove its address first (QUIC Retry), under load.
        Retry => "retry",
        /// Closed to make room: it served least (idle or slow) when the streamer was full.
        Evicted => "evicted",
        /// Closed after opening no request for the idle limit.
        Idle => "idle",
    }
);

label_enum!(
    /// Kind of a discovery message.
    MessageKind {
        /// `snapshot_info_request` published.
        RequestSent => "request_sent",
        /// `snapshot_info_request` received.
        RequestReceived => "request_received",
        /// Direct answer sent.
        AnswerSent => "answer_sent",
        /// Direct answer received.
        AnswerReceived => "answer_received",
        /// Announcement published.
        AnnouncementSent => "announcement_sent",
        /// Announcement received.
        AnnouncementReceived => "announcement_received",
        /// A connected peer asked directly.
        AskSent => "ask_sent",
        /// A peer asked this node directly.
        AskReceived => "ask_received",
        /// Message dropped for failing its checks.
        Malformed => "malformed",
        /// Answer that matched no request of this node: dropped.
        Unsolicited => "unsolicited",
    }
);

label_enum!(
    /// Full or incremental.
    KindLabel {
        /// A full snapshot.
        Full => "full",
        /// An incremental snapshot.
        Incremental => "incremental",
    }
);

label_enum!(
    /// How a served request ended.
    Outcome {
        /// Answered with data.
        Ok => "ok",
        /// Answered with an error status.
        Refused => "refused",
    }
);

/// A label set of one label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReasonLabel {
    /// Why.
    pub(crate) reason: RefusedReason,
}

/// A label set of one label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct MessageLabel {
    /// Kind of message.
    pub(crate) kind: MessageKind,
}

/// A label set of one label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct SnapshotLabel {
    /// Kind of snapshot.
    pub(crate) kind: KindLabel,
}

/// A label set of one label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct OutcomeLabel {
    /// How it ended.
    pub(crate) outcome: Outcome,
}

impl From<crate::snapshot::SnapshotKind> for KindLabel {
    fn from(k: crate::snapshot::SnapshotKind) -> Self {
        match k {
            crate::snapshot::SnapshotKind::Full => KindLabel::Full,
            crate::snapshot::SnapshotKind::Incremental => KindLabel::Incremental,
        }
    }
}

/// snapsync's metrics. Cloning is cheap and every clone counts into the same values; they
/// count whether or not they are registered (nothing is exported until [`Metrics::register`]).
/// Give each node its own: the stats of a behaviour and a streamer read these counters.
#[derive(Debug, Clone)]
pub struct Metrics {
    pub(crate) snapshots_created: Family<SnapshotLabel, Counter>,
    pub(crate) snapshots_synced: Family<SnapshotLabel, Counter>,
    pub(crate) sync_failures: Counter,
    pub(crate) syncs_started: Counter,
    pub(crate) served_bytes: Counter,
    pub(crate) served_partial_bytes: Counter,
    pub(crate) served_chunks: Counter,
    pub(crate) served_requests: Family<OutcomeLabel, Counter>,
    pub(crate) accepted_connections: Counter,
    pub(crate) downloaded_bytes: Counter,
    pub(crate) active_downloads: Gauge,
    pub(crate) active_transfers: Gauge,
    pub(crate) verification_failures: Counter,
    pub(crate) peer_bans: Counter,
    pub(crate) discovery_rounds: Counter,
    pub(crate) dial_failures: Counter,
    pub(crate) refused_connections: Family<ReasonLabel, Counter>,
    pub(crate) discovery_messages: Family<MessageLabel, Counter>,
    pub(crate) local_slot: Gauge,
    pub(crate) newest_snapshot_slot: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let m = Self {
            snapshots_created: Family::default(),
            snapshots_synced: Family::default(),
            sync_failures: Counter::default(),
            syncs_started: Counter::default(),
            served_bytes: Counter::default(),
            served_partial_bytes: Counter::default(),
            served_chunks: Counter::default(),
            served_requests: Family::default(),
            accepted_connections: Counter::default(),
            downloaded_bytes: Counter::default(),
            active_downloads: Gauge::default(),
            active_transfers: Gauge::default(),
            verification_failures: Counter::default(),
            peer_bans: Counter::default(),
            discovery_rounds: Counter::default(),
            dial_failures: Counter::default(),
            refused_connections: Family::default(),
            discovery_messages: Family::default(),
            local_slot: Gauge::default(),
            newest_snapshot_slot: Gauge::default(),
        };
        // Every labelled series exists from the start, at zero.
        for kind in KindLabel::ALL {
            let _ = m
                .snapshots_created
                .get_or_create(&SnapshotLabel { kind: *kind });
            let _ = m
                .snapshots_synced
                .get_or_create(&SnapshotLabel { kind: *kind });
        }
        for outcome in Outcome::ALL {
            let _ = m
                .served_requests
                .get_or_create(&OutcomeLabel { outcome: *outcome });
        }
        for reason in RefusedReason::ALL {
            let _ = m
                .refused_connections
                .get_or_create(&ReasonLabel { reason: *reason });
        }
        for kind in MessageKind::ALL {
            let _ = m
                .discovery_messages
                .get_or_create(&MessageLabel { kind: *kind });
        }
        m
    }
}

impl Metrics {
    /// New metrics, at zero, unregistered.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers every metric in `registry`, prefixed `snapsync_`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("snapsync");
        self.register_syncs(r);
        self.register_transfers(r);
        self.register_discovery(r);
    }

    /// Snapshots made, syncs started, done and failed.
    fn register_syncs(&self, r: &mut Registry) {
        r.register(
            "snapshots_created",
            "Snapshots this node created, by kind",
            self.snapshots_created.clone(),
        );
        r.register(
            "snapshots_synced",
            "Snapshots downloaded, verified and loaded, by kind",
            self.snapshots_synced.clone(),
        );
        r.register(
            "sync_failures",
            "Syncs that failed (download or load)",
            self.sync_failures.clone(),
        );
        r.register(
            "syncs_started",
            "Syncs started (a choice made, its downloads begun)",
            self.syncs_started.clone(),
        );
    }

    /// The chunk stream: what was served and downloaded, connections, bad chunks.
    fn register_transfers(&self, r: &mut Registry) {
        r.register_with_unit(
            "served",
            "Archive bytes served to downloaders",
            Unit::Bytes,
            self.served_bytes.clone(),
        );
        r.register_with_unit(
            "served_partial",
            "Archive bytes served from snapshots still being downloaded (part of served)",
            Unit::Bytes,
            self.served_partial_bytes.clone(),
        );
        r.register(
            "served_chunks",
            "Chunks served to downloaders",
            self.served_chunks.clone(),
        );
        r.register(
            "served_requests",
            "Chunk-stream requests answered, by outcome",
            self.served_requests.clone(),
        );
        r.register(
            "accepted_connections",
            "Chunk-stream connections that proved the token",
            self.accepted_connections.clone(),
        );
        r.register_with_unit(
            "downloaded",
            "Verified archive bytes downloaded",
            Unit::Bytes,
            self.downloaded_bytes.clone(),
        );
        r.register(
            "active_downloads",
            "Downloads in progress",
            self.active_downloads.clone(),
        );
        r.register(
            "active_transfers",
            "Chunk-stream connections being served",
            self.active_transfers.clone(),
        );
        r.register(
            "chunk_verification_failures",
            "Chunks that did not match the content root",
            self.verification_failures.clone(),
        );
        r.register(
            "peer_bans",
            "Peers banned from a download for bad chunks",
            self.peer_bans.clone(),
        );
    }

    /// Discovery and the node's state.
    fn register_discovery(&self, r: &mut Registry) {
        r.register(
            "discovery_rounds",
            "Discovery rounds started",
            self.discovery_rounds.clone(),
        );
        r.register(
            "dial_failures",
            "Dials of peers that failed",
            self.dial_failures.clone(),
        );
        r.register(
            "refused_connections",
            "Chunk-stream connections refused, by reason",
            self.refused_connections.clone(),
        );
        r.register(
            "discovery_messages",
            "Discovery messages, by kind",
            self.discovery_messages.clone(),
        );
        r.register(
            "local_slot",
            "Slot of the node's state",
            self.local_slot.clone(),
        );
        r.register(
            "newest_snapshot_slot",
            "Slot of the newest snapshot the node holds",
            self.newest_snapshot_slot.clone(),
        );
    }

    /// Counts a discovery message.
    pub(crate) fn message(&self, kind: MessageKind) {
        self.discovery_messages
            .get_or_create(&MessageLabel { kind })
            .inc();
    }

    /// Discovery messages of one kind counted so far.
    pub(crate) fn messages(&self, kind: MessageKind) -> u64 {
        self.discovery_messages
            .get_or_create(&MessageLabel { kind })
            .get()
    }

    /// Counts a refused connection.
    pub(crate) fn refused(&self, reason: RefusedReason) {
        self.refused_connections
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Connections refused for one reason so far.
    pub(crate) fn refusals(&self, reason: RefusedReason) -> u64 {
        self.refused_connections
            .get_or_create(&ReasonLabel { reason })
            .get()
    }

    /// Counts a request served.
    pub(crate) fn served(&self, outcome: Outcome) {
        self.served_requests
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }

    /// Requests served with one outcome so far.
    pub(crate) fn served_count(&self, outcome: Outcome) -> u64 {
        self.served_requests
            .get_or_create(&OutcomeLabel { outcome })
            .get()
    }

    /// Counts a snapshot created.
    pub(crate) fn created(&self, kind: crate::snapshot::SnapshotKind) {
        self.snapshots_created
            .get_or_create(&SnapshotLabel { kind: kind.into() })
            .inc();
    }

    /// Counts a snapshot synced.
    pub(crate) fn synced(&self, kind: crate::snapshot::SnapshotKind) {
        self.snapshots_synced
            .get_or_create(&SnapshotLabel { kind: kind.into() })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_is_there_from_the_start_in_snake_case_with_units() {
        let metrics = Metrics::new();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        metrics.served_bytes.inc_by(42);
        metrics.refused(RefusedReason::Unauthorized);
        metrics.message(MessageKind::AnswerSent);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("snapsync_served_bytes_total 42"), "{text}");
        assert!(
            text.contains("snapsync_refused_connections_total{reason=\"unauthorized\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("snapsync_refused_connections_total{reason=\"busy\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("snapsync_discovery_messages_total{kind=\"answer_sent\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("snapsync_snapshots_created_total{kind=\"incremental\"} 0"),
            "{text}"
        );
        assert!(text.contains("snapsync_local_slot 0"), "{text}");
        assert_eq!(metrics.messages(MessageKind::AnswerSent), 1);
    }
}
