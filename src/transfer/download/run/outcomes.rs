//! What the download's tasks report back to its loop: the files reserved, what a source holds,
//! a connection up, failed or lost, a request's end; and the manifest taken.

use std::sync::Arc;
use std::time::Instant;

use super::{InFlight, ManifestReply, Report, Reserve, Run};
use crate::snapshot::Manifest;
use crate::transfer::DOWNLOAD_TARGET;
use crate::transfer::download::DownloadError;
use crate::transfer::download::fetch::FetchError;
use crate::transfer::download::scheduler::{Lost, PeerIdx, ReqId, RequestFailure};
use crate::transfer::protocol::close;

impl Run {
    pub(super) fn handle(&mut self, report: Report) -> Result<(), DownloadError> {
        let now = Instant::now();
        match report {
            Report::Reserved(result) => {
                result?;
                self.reserved = Reserve::Done;
                self.sched.set_paused(false, now);
                tracing::debug!(target: DOWNLOAD_TARGET, bytes = self.target.archive_size, "disk reserved");
                self.offer();
            }
            Report::Have { peer, result } => {
                let result = result.map_err(|e| {
                    tracing::debug!(target: DOWNLOAD_TARGET, source = %self.sources[peer].origin, error = %e, "could not learn what the source holds");
                    let failure = match &e {
                        FetchError::Refused(_, failure) => *failure,
                        FetchError::Protocol(_) => RequestFailure::Fatal,
                        _ => RequestFailure::Transient,
                    };
                    self.sources[peer].last_error = Some(e.to_string());
                    failure
                });
                self.sched.handle_have(peer, result, now);
            }
            Report::Connected { peer, conn, reply } => self.connected(peer, conn, *reply),
            Report::ConnectFailed { peer, error } => {
                let source = &mut self.sources[peer];
                tracing::debug!(target: DOWNLOAD_TARGET, source = %source.origin, %error, "connect failed");
                if error.is_unauthorized() {
                    source.unauthorized = true;
                    tracing::warn!(target: DOWNLOAD_TARGET, source = %source.origin, "peer refused our SNAPSHOT_TOKEN");
                }
                source.last_error = Some(error.to_string());
                let failure = if self.sched.peer_report(peer).partial {
                    error.failure_of_partial()
                } else {
                    error.failure()
                };
                self.sched.handle_connect_failed(peer, failure, now);
            }
            Report::Disconnected {
                peer,
                conn_id,
                lost,
            } => {
                self.credit_all();
                let source = &mut self.sources[peer];
                if source.conn.as_ref().map(|c| c.stable_id()) == Some(conn_id) {
                    source.conn = None;
                    source.last_error = Some("connection lost".into());
                    tracing::debug!(target: DOWNLOAD_TARGET, source = %source.origin, ?lost, "connection lost");
                    self.sched.handle_disconnected(peer, lost, now);
                }
            }
            Report::Fetched { id, result } => return self.fetched(id, result, now),
            Report::WebConnected {
                peer,
                path,
                manifest,
            } => {
                let Some(take) = self.sched.handle_connected(peer) else {
                    return Ok(());
                };
                tracing::debug!(target: DOWNLOAD_TARGET, source = %self.sources[peer].origin, %path, "web source lists the snapshot");
                self.sources[peer].web = Some((
                    path,
                    Arc::new(crate::transfer::download::web::NodeCache::new()),
                ));
                if take {
                    self.take_manifest(peer, *manifest);
                }
                self.start_reserve();
            }
        }
        Ok(())
    }

    /// Takes `peer`'s manifest as the download's (the scheduler said so).
    fn take_manifest(&mut self, peer: PeerIdx, manifest: Manifest) {
        let partial = self.sched.peer_report(peer).partial;
        // A partial holder passes on the manifest it took from its own source: counts it
        // gets wrong are not proven to be its lie, so it is not named for them.
        let from = self.sources[peer].origin.peer_id().filter(|_| !partial);
        self.manifest_tx
            .send_replace(Some((manifest.clone(), from)));
        self.manifest = Some(manifest);
        // Offered again under the manifest taken.
        self.offer = None;
        self.offer();
    }

    fn connected(&mut self, peer: PeerIdx, conn: quinn::Connection, reply: ManifestReply) {
        let Some(take) = self.sched.handle_connected(peer) else {
            // It gave its place up while connecting: the connection is not used.
            conn.close(close::DONE, b"not needed");
            return;
        };
        tracing::debug!(target: DOWNLOAD_TARGET, source = %self.sources[peer].origin, attestations = reply.attestations.len(), "connected");
        self.sources[peer].attestations = reply.attestations;
        if take {
            self.take_manifest(peer, reply.manifest);
        }
        let reports = self.reports_tx.clone();
        let watched = conn.clone();
        let conn_id = conn.stable_id();
        self.tasks.spawn(async move {
            let why = watched.closed().await;
            let lost = match &why {
                quinn::ConnectionError::ApplicationClosed(c)
                    if c.error_code == close::IDLE || c.error_code == close::EVICTED =>
                {
                    Lost::Benign
                }
                // Shutting down, or closed with no code: the server's side of the connection
                // was dropped (its node stopping aborts the tasks that hold it).
                quinn::ConnectionError::ApplicationClosed(c)
                    if c.error_code == close::SHUTDOWN || c.error_code == 0u32.into() =>
                {
                    Lost::Left
                }
                _ => Lost::Failed,
            };
            tracing::trace!(target: DOWNLOAD_TARGET, %why, ?lost, "connection closed");
            let report = Report::Disconnected {
                peer,
                conn_id,
                lost,
            };
            let _ = reports.send(report).await;
        });
        self.sched.handle_rtt(peer, conn.rtt());
        self.sources[peer].conn = Some(conn);
        self.start_reserve();
    }

    fn fetched(
        &mut self,
        id: ReqId,
        result: Result<(), FetchError>,
        now: Instant,
    ) -> Result<(), DownloadError> {
        // What it delivered counts, however it ended.
        self.credit(id);
        let Some(InFlight { peer, sent, .. }) = self.requests.remove(&id) else {
            return Ok(());
        };
        if let Err(e) = &result {
            tracing::trace!(target: DOWNLOAD_TARGET, source = %self.sources[peer].origin, after_ms = sent.elapsed().as_millis() as u64, error = %e, "request ended without its chunks");
        }
        match result {
            Ok(()) => {
                if let Some(conn) = &self.sources[peer].conn {
                    self.sched.handle_rtt(peer, conn.rtt());
                }
                let added = self.sched.handle_success(id, now);
                self.count_fetched(peer, added);
            }
            Err(FetchError::Corrupt(e)) => {
                let m = &self.ctx.metrics;
                m.verification_failures.inc();
                m.peer_bans.inc();
                let source = &mut self.sources[peer];
                tracing::warn!(target: DOWNLOAD_TARGET, source = %source.origin, error = %e, "a source sent a chunk that does not match the content root; banned for this download");
                source.last_error = Some(format!("banned: {e}"));
                self.sched.handle_corrupt(id, now);
            }
            Err(FetchError::Local(e)) => return Err(e.into()),
            Err(FetchError::Refused(why, failure)) => {
                self.sources[peer].last_error = Some(why);
                self.sched.handle_failure(id, failure, now);
            }
            Err(FetchError::Web(e)) => {
                tracing::debug!(target: DOWNLOAD_TARGET, source = %self.sources[peer].origin, error = %e, "web request failed");
                let failure = if e.is_transient() {
                    RequestFailure::Transient
                } else {
                    RequestFailure::Fatal
                };
                self.sources[peer].last_error = Some(e.to_string());
                self.sched.handle_failure(id, failure, now);
            }
            Err(e) => {
                tracing::debug!(target: DOWNLOAD_TARGET, source = %self.sources[peer].origin, error = %e, "request failed");
                self.sources[peer].last_error = Some(e.to_string());
                self.sched
                    .handle_failure(id, RequestFailure::Transient, now);
            }
        }
        Ok(())
    }
}
