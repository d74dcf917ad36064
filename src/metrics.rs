//! Prometheus metrics ([`Metrics`]), with `prometheus-client`, the crate libp2p's own metrics
//! use, so they can go in the same registry.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Why a streamer refused a connection.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum RefusedReason {
    /// Wrong or missing token.
    Unauthorized,
    /// A connection limit was reached.
    Busy,
}

/// Labels of `snapsync_refused_connections`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    /// Why.
    pub reason: RefusedReason,
}

/// Kind of a discovery message.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum MessageKind {
    /// `snapshot_info_request` published.
    RequestSent,
    /// `snapshot_info_request` received.
    RequestReceived,
    /// Direct answer sent.
    AnswerSent,
    /// Direct answer received.
    AnswerReceived,
    /// Announcement published.
    AnnouncementSent,
    /// Announcement received.
    AnnouncementReceived,
    /// Message dropped for failing its checks.
    Malformed,
}

/// Labels of `snapsync_discovery_messages`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MessageLabels {
    /// Kind.
    pub kind: MessageKind,
}

/// snapsync's metrics. Cloning is cheap and every clone updates the same values; a default
/// `Metrics` works unregistered (nothing is exported until [`Metrics::register`]).
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub(crate) snapshots_created: Counter,
    pub(crate) snapshots_synced: Counter,
    pub(crate) sync_failures: Counter,
    pub(crate) bytes_served: Counter,
    pub(crate) chunks_served: Counter,
    pub(crate) bytes_downloaded: Counter,
    pub(crate) active_downloads: Gauge,
    pub(crate) active_transfers: Gauge,
    pub(crate) verification_failures: Counter,
    pub(crate) peer_bans: Counter,
    pub(crate) discovery_rounds: Counter,
    pub(crate) refused_connections: Family<RefusedLabels, Counter>,
    pub(crate) discovery_messages: Family<MessageLabels, Counter>,
}

impl Metrics {
    /// New, unregistered metrics.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers every metric in `registry`, prefixed `snapsync_`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("snapsync");
        r.register(
            "snapshots_created",
            "Snapshots this node created",
            self.snapshots_created.clone(),
        );
        r.register(
            "snapshots_synced",
            "Snapshots downloaded, verified and loaded",
            self.snapshots_synced.clone(),
        );
        r.register(
            "sync_failures",
            "Syncs that failed (download or load)",
            self.sync_failures.clone(),
        );
        r.register(
            "bytes_served",
            "Archive bytes served to downloaders",
            self.bytes_served.clone(),
        );
        r.register(
            "chunks_served",
            "Chunks served to downloaders",
            self.chunks_served.clone(),
        );
        r.register(
            "bytes_downloaded",
            "Verified archive bytes downloaded",
            self.bytes_downloaded.clone(),
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
        r.register(
            "discovery_rounds",
            "Discovery rounds started",
            self.discovery_rounds.clone(),
        );
        r.register(
            "refused_connections",
            "Chunk-stream connections refused",
            self.refused_connections.clone(),
        );
        r.register(
            "discovery_messages",
            "Discovery messages by kind",
            self.discovery_messages.clone(),
        );
    }

    pub(crate) fn message(&self, kind: MessageKind) {
        self.discovery_messages
            .get_or_create(&MessageLabels { kind })
            .inc();
    }

    pub(crate) fn refused(&self, reason: RefusedReason) {
        self.refused_connections
            .get_or_create(&RefusedLabels { reason })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_metrics_are_exported() {
        let metrics = Metrics::new();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        metrics.bytes_served.inc_by(42);
        metrics.refused(RefusedReason::Unauthorized);
        metrics.message(MessageKind::AnswerSent);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("snapsync_bytes_served_total 42"), "{text}");
        assert!(
            text.contains("snapsync_refused_connections_total{reason=\"Unauthorized\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("snapsync_discovery_messages_total{kind=\"AnswerSent\"} 1"),
            "{text}"
        );
    }
}
