//! How a download ends: done (the archive published), or stuck (and why), its connections
//! closed and what each measured logged.

use std::time::Instant;

use super::Run;
use crate::transfer::DOWNLOAD_TARGET;
use crate::transfer::download::partial::Partial;
use crate::transfer::download::scheduler::{Standing, Stuck};
use crate::transfer::download::{DownloadError, Downloaded};
use crate::transfer::protocol::close;

impl Run {
    pub(super) fn stuck_error(&self, stuck: Stuck) -> DownloadError {
        let missing_bytes = self.target.archive_size - self.sched.done_bytes();
        match stuck {
            // Something came, then nothing for too long.
            Stuck::NoProgress if self.fetched_bytes > 0 => {
                DownloadError::NoProgress(self.ctx.config.schedule.no_progress_timeout)
            }
            // Nothing at all came: why each source could not serve says more.
            Stuck::NoPeers | Stuck::NoProgress
                if !self.sources.is_empty() && self.sources.iter().all(|p| p.unauthorized) =>
            {
                DownloadError::Unauthorized {
                    peers: self.sources.len(),
                }
            }
            Stuck::NoPeers | Stuck::NoProgress => DownloadError::NoPeers {
                missing_bytes,
                banned: (0..self.sources.len())
                    .filter(|i| self.sched.peer_report(*i).standing == Standing::Banned)
                    .count(),
                reasons: if self.sources.is_empty() {
                    "no peers".into()
                } else {
                    self.sources
                        .iter()
                        .map(|p| {
                            format!(
                                "{}: {}",
                                p.origin,
                                p.last_error.as_deref().unwrap_or("unavailable")
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("; ")
                },
            },
        }
    }

    pub(super) fn close_connections(&self, why: &[u8]) {
        for source in &self.sources {
            if let Some(conn) = &source.conn {
                conn.close(close::DONE, why);
            }
        }
    }

    /// Logs what each connection measured of its path.
    fn log_connections(&self) {
        for (i, source) in self.sources.iter().enumerate() {
            let r = self.sched.peer_report(i);
            if !r.tried {
                continue;
            }
            let t = r.tally;
            let path = source.conn.as_ref().map(|c| c.stats().path);
            tracing::debug!(
                target: DOWNLOAD_TARGET,
                source = %source.origin,
                bytes = r.bytes,
                requests = t.requests,
                delivered = t.delivered,
                busy = t.busy,
                not_held = t.not_held,
                failed = t.failed,
                quiet = t.quiet,
                haves = t.haves,
                rtt_us = path.map(|p| p.rtt.as_micros() as u64),
                lost_packets = path.map(|p| p.lost_packets),
                "source figures"
            );
        }
    }

    /// Every chunk is in: stops the remaining (hedged) requests, closes the connections and
    /// publishes the archive.
    pub(super) async fn finish(mut self) -> Result<Downloaded, DownloadError> {
        let finish_started = Instant::now();
        // What the requests still under way delivered counts, before they are stopped.
        self.credit_all();
        self.tasks.abort_all();
        self.log_connections();
        self.close_connections(b"done");
        self.publish_progress(false);
        let manifest = self
            .manifest
            .clone()
            .expect("a manifest from the first connection");
        let partial = Partial::reopen(&self.partial)?;
        let snapshot = partial.publish_in(&self.ctx.store, manifest).await?;
        // Served as a published snapshot from now on (the store is looked in first); until
        // here, from the verified chunks, so downloaders fetching from this node never see a
        // moment where it holds nothing.
        self.offer = None;
        self.watermark.advance(self.target.archive_size);
        tracing::debug!(
            target: DOWNLOAD_TARGET,
            finish_secs = finish_started.elapsed().as_secs_f64(),
            "made durable and published"
        );
        self.publish_progress(true);
        Ok(self.downloaded(snapshot))
    }
}
