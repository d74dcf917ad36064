//! What a download reports: its progress while it runs and, at its end, what each source
//! delivered. A source is listed once it has held a place (spares never tried are not); the
//! bytes listed add up to what was fetched.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::Origin;
use super::run::Run;
use super::scheduler::{PeerIdx, PeerReport, Standing};
use super::{Downloaded, PeerProgress, PeerStatus, Progress, WebProgress};
use crate::snapshot::Snapshot;
use crate::transfer::DOWNLOAD_TARGET;

/// How a source stands, for progress reports.
fn status(standing: Standing) -> PeerStatus {
    match standing {
        Standing::Active => PeerStatus::Active,
        Standing::Waiting => PeerStatus::Waiting,
        Standing::Banned => PeerStatus::Banned,
        Standing::Out => PeerStatus::Dropped,
    }
}

/// Whether a source is worth listing.
fn listed(r: &PeerReport) -> bool {
    r.tried || r.bytes > 0
}

impl Run {
    /// The sources worth listing, with their figures.
    fn listed(&self) -> impl Iterator<Item = (PeerIdx, PeerReport)> + '_ {
        (0..self.sources.len())
            .map(|i| (i, self.sched.peer_report(i)))
            .filter(|(_, r)| listed(r))
    }

    pub(super) fn progress(&mut self, finished: bool) -> Progress {
        let now = Instant::now();
        let done = self.sched.done_bytes();
        let (t0, d0) = self.last_tick;
        let dt = now.duration_since(t0).as_secs_f64();
        if dt > 0.05 {
            self.rate.update((done - d0) as f64 / dt);
            self.last_tick = (now, done);
        }
        let rate = self.rate.get().unwrap_or(0.0);
        let remaining = self.target.archive_size - done;
        Progress {
            root: self.target.content_root,
            done_bytes: done,
            total_bytes: self.target.archive_size,
            resumed_bytes: self.resumed_bytes,
            served_bytes: self.served.load(Ordering::Relaxed),
            rate,
            eta: (rate > 0.0).then(|| Duration::from_secs_f64(remaining as f64 / rate)),
            peers: self
                .listed()
                .filter_map(|(i, r)| {
                    Some(PeerProgress {
                        peer_id: self.sources[i].origin.peer_id()?,
                        bytes: r.bytes,
                        rate: r.rate,
                        inflight: r.inflight,
                        partial: r.partial,
                        status: status(r.standing),
                    })
                })
                .collect(),
            web: self.web_progress(),
            finished,
        }
    }

    /// The web sources' parts.
    fn web_progress(&self) -> Vec<WebProgress> {
        self.listed()
            .filter_map(|(i, r)| match &self.sources[i].origin {
                Origin::Web(w) => Some(WebProgress {
                    url: w.base().to_string(),
                    bytes: r.bytes,
                    rate: r.rate,
                    inflight: r.inflight,
                    status: status(r.standing),
                }),
                Origin::Peer(_) => {
                    let _ = r;
                    None
                }
            })
            .collect()
    }

    /// The end of a download that published `snapshot`: what was fetched, from whom.
    pub(super) fn downloaded(&self, snapshot: Arc<Snapshot>) -> Downloaded {
        let per_peer: Vec<_> = self
            .listed()
            .filter_map(|(i, r)| Some((self.sources[i].origin.peer_id()?, r.bytes)))
            .collect();
        let per_web: Vec<_> = self
            .web_progress()
            .into_iter()
            .map(|w| (w.url, w.bytes))
            .collect();
        let duplicate: u64 = (0..self.sources.len())
            .map(|i| self.sched.peer_report(i).duplicate_bytes)
            .sum();
        let elapsed = self.started.elapsed();
        tracing::info!(
            target: DOWNLOAD_TARGET,
            slot = snapshot.manifest().slot,
            kind = %snapshot.manifest().kind,
            root = %self.target.content_root.short(),
            fetched = self.fetched_bytes,
            duplicate,
            resumed = self.resumed_bytes,
            secs = elapsed.as_secs_f64(),
            peers = per_peer.iter().filter(|(_, b)| *b > 0).count(),
            "download complete and verified"
        );
        Downloaded {
            snapshot,
            fetched_bytes: self.fetched_bytes,
            duplicate_bytes: duplicate,
            resumed_bytes: self.resumed_bytes,
            served_bytes: self.served.load(Ordering::Relaxed),
            elapsed,
            per_peer,
            per_web,
            attestations: self.served_attestations(),
        }
    }

    /// The lists of attestations the sources served with the manifest, each list once.
    fn served_attestations(&self) -> Vec<Vec<crate::snapshot::Attestation>> {
        let mut all: Vec<Vec<crate::snapshot::Attestation>> = (self.sources.iter())
            .filter(|s| !s.attestations.is_empty())
            .map(|s| {
                let mut list = s.attestations.clone();
                list.sort();
                list
            })
            .collect();
        all.sort();
        all.dedup();
        all
    }
}
