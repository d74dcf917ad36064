//! The behaviour's sync job: started on discovery's plan (once a cancelled one has stopped),
//! stopped in the background, and what it reports turned into events.

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::Context;
use std::time::Instant;

use libp2p::PeerId;

use super::sync_job::{JobEvent, SyncJob};
use super::{Behaviour, Event, TARGET};
use crate::discovery::{Plan, SyncOutcome};
use crate::transfer::Origin;

impl Behaviour {
    /// Stops the sync job, if any, in the background (progress is kept).
    pub(super) fn stop_job(&mut self) {
        if let Some(job) = self.job.take() {
            self.stopping = Some(tokio::spawn(job.cancel()));
        }
    }

    /// Starts syncing `plan`, once a cancelled job has stopped.
    pub(super) fn start_sync(&mut self, plan: Plan) {
        if self.stopping.as_ref().is_some_and(|t| !t.is_finished()) {
            self.deferred = Some(plan);
            return;
        }
        self.stopping = None;
        self.metrics.syncs_started.inc();
        // Each source of the plan resolved once: the web source it stands for, or its chunk
        // stream's address.
        let mut origins: std::collections::HashMap<PeerId, Option<Origin>> = Default::default();
        for t in plan.full.iter().chain(&plan.incremental) {
            for (peer, addrs) in t.peers.iter().chain(&t.partial_peers) {
                if !origins.contains_key(peer) {
                    let origin = self.origin_of(*peer, addrs);
                    origins.insert(*peer, origin);
                }
            }
        }
        let mut peers = |peer: PeerId, _: &[SocketAddr]| origins.get(&peer).cloned().flatten();
        let job = SyncJob::start(
            &plan,
            &self.downloader,
            self.db.clone(),
            (self.store.clone(), self.config.network()),
            (
                *self.config.load_limits(),
                self.config.state_check().cloned(),
            ),
            &mut peers,
        );
        self.job = Some(job);
    }

    /// A cancelled job stopped: a plan chosen meanwhile starts now.
    pub(super) fn poll_stopping(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(stopping) = &mut self.stopping else {
            return false;
        };
        if Pin::new(stopping).poll(cx).is_pending() {
            return false;
        }
        self.stopping = None;
        match self.deferred.take() {
            Some(plan) => {
                self.start_sync(plan);
                true
            }
            None => false,
        }
    }

    pub(super) fn handle_job(&mut self, event: JobEvent) {
        match event {
            JobEvent::Started {
                key,
                peers,
                resumed_bytes,
            } => self.push_event(Event::DownloadStarted {
                key,
                peers,
                resumed_bytes,
            }),
            JobEvent::Progress(p) => {
                self.refresh_partials();
                self.push_event(Event::DownloadProgress(p));
            }
            JobEvent::Synced(synced) => {
                self.job = None;
                let r = synced.report;
                self.metrics.synced(r.kind);
                if let Err(e) = self.creator.synced(r.slot) {
                    tracing::warn!(target: TARGET, error = %e, "could not delete old snapshots");
                }
                tracing::info!(target: TARGET, slot = r.slot, kind = %r.kind, with_full = synced.with_full, bank_hash = %r.bank_hash.short(), fetched = synced.fetched_bytes, secs = synced.elapsed.as_secs_f64(), "synced");
                self.refresh_local();
                self.discovery.handle_sync_ended(
                    SyncOutcome::Synced {
                        bad_peers: synced.bad_peers,
                        served: synced.served_attestations,
                    },
                    Instant::now(),
                );
                self.push_event(Event::SnapshotSynced {
                    slot: r.slot,
                    bank_hash: r.bank_hash,
                    kind: r.kind,
                    with_full: synced.with_full,
                    bytes: synced.bytes,
                    fetched_bytes: synced.fetched_bytes,
                    served_bytes: synced.served_bytes,
                    elapsed: synced.elapsed,
                    per_peer: synced.per_peer,
                });
            }
            JobEvent::Failed(failed) => {
                self.job = None;
                let failed = *failed;
                self.metrics.sync_failures.inc();
                tracing::warn!(target: TARGET, slot = failed.key.slot, kind = %failed.key.kind, error = %failed.error, "sync failed");
                self.refresh_local();
                self.discovery
                    .handle_sync_ended(SyncOutcome::Failed(failed.outcome), Instant::now());
                self.push_event(Event::SyncFailed {
                    key: failed.key,
                    error: failed.error,
                });
            }
        }
    }
}
