//! What the download's loop does at the scheduler's command: connecting to a source (a peer or
//! a web server) and closing the connection, asking a source what it holds, running a request,
//! and reserving the files' full size.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use super::{InFlight, Origin, Report, Reserve, Run};
use crate::transfer::DOWNLOAD_TARGET;
use crate::transfer::download::connect::{ConnectError, connect};
use crate::transfer::download::fetch::{FetchError, ask_have, fetch};
use crate::transfer::download::partial::Partial;
use crate::transfer::download::scheduler::{PeerIdx, ReqId, RequestFailure};
use crate::transfer::protocol::close;

impl Run {
    pub(super) fn connect(&mut self, peer: PeerIdx) {
        let ctx = self.ctx.clone();
        let addr = match &self.sources[peer].origin {
            Origin::Peer(addr) => *addr,
            Origin::Web(web) => return self.connect_web(peer, web.clone()),
        };
        tracing::debug!(target: DOWNLOAD_TARGET, source = %self.sources[peer].origin, "taking a place: connecting");
        let target = self.target;
        let reports = self.reports_tx.clone();
        let timeout = self.ctx.config.connect_timeout;
        self.tasks.spawn(async move {
            let result = tokio::time::timeout(timeout, connect(&ctx, addr, target))
                .await
                .unwrap_or(Err(ConnectError::Timeout));
            let report = match result {
                Ok((conn, reply)) => Report::Connected {
                    peer,
                    conn,
                    reply: Box::new(reply),
                },
                Err(error) => Report::ConnectFailed { peer, error },
            };
            let _ = reports.send(report).await;
        });
    }

    /// `peer` gave its place up: its connection is closed (the scheduler still knows it).
    pub(super) fn close(&mut self, peer: PeerIdx) {
        let source = &mut self.sources[peer];
        tracing::debug!(target: DOWNLOAD_TARGET, source = %source.origin, "giving its place up");
        if let Some(conn) = source.conn.take() {
            conn.close(close::DONE, b"place given up");
        }
        source.web = None;
    }

    fn connect_web(&mut self, peer: PeerIdx, web: Arc<crate::transfer::web::WebSource>) {
        let reports = self.reports_tx.clone();
        let (target, timeout) = (self.target, self.ctx.config.connect_timeout);
        self.tasks.spawn(async move {
            let report =
                match crate::transfer::download::web::connect_web(&web, target, timeout).await {
                    Ok((path, manifest)) => Report::WebConnected {
                        peer,
                        path,
                        manifest: Box::new(manifest),
                    },
                    Err(error) => Report::ConnectFailed { peer, error },
                };
            let _ = reports.send(report).await;
        });
    }

    pub(super) fn ask_have(&mut self, peer: PeerIdx) {
        // A web source holds the whole snapshot.
        if matches!(self.sources[peer].origin, Origin::Web(_)) {
            self.sched.handle_have(
                peer,
                Ok(crate::transfer::download::picker::Have::All),
                Instant::now(),
            );
            return;
        }
        let Some(conn) = self.sources[peer].conn.clone() else {
            self.sched
                .handle_have(peer, Err(RequestFailure::Transient), Instant::now());
            return;
        };
        let reports = self.reports_tx.clone();
        let tree = self.tree;
        let (piece, timeout) = (
            self.ctx.config.schedule.request_chunks,
            self.ctx.config.schedule.min_request_timeout,
        );
        let done = self.sched.pieces_done().clone();
        let serve_port = self.ctx.config.serve_port;
        self.tasks.spawn(async move {
            let result = ask_have(conn, tree, piece, done, serve_port, timeout).await;
            let _ = reports.send(Report::Have { peer, result }).await;
        });
    }

    pub(super) fn request(&mut self, id: ReqId, peer: PeerIdx, chunks: std::ops::Range<u64>) {
        let (tree, sink) = (self.tree, self.sink.clone());
        let stall = self.ctx.config.schedule.min_request_timeout;
        let written = Arc::new(AtomicU64::new(chunks.start));
        let progress = written.clone();
        if let (Origin::Web(web), Some((path, nodes))) =
            (&self.sources[peer].origin, &self.sources[peer].web)
        {
            let (web, path, nodes) = (web.clone(), path.clone(), nodes.clone());
            let start = chunks.start;
            return self.spawn_fetch(id, peer, start, written, async move {
                crate::transfer::download::web::fetch_web(
                    &web, &path, &nodes, tree, chunks, &sink, stall, &progress,
                )
                .await
            });
        }
        let Some(conn) = self.sources[peer].conn.clone() else {
            self.sched
                .handle_failure(id, RequestFailure::Transient, Instant::now());
            return;
        };
        let start = chunks.start;
        self.spawn_fetch(id, peer, start, written, async move {
            fetch(conn, tree, chunks, &sink, stall, &progress).await
        });
    }

    /// Runs the fetch of request `id` from `peer` (chunks from `start` on), its progress
    /// followed through `written`; its end is reported.
    fn spawn_fetch(
        &mut self,
        id: ReqId,
        peer: PeerIdx,
        start: u64,
        written: Arc<AtomicU64>,
        fetch: impl std::future::Future<Output = Result<(), FetchError>> + Send + 'static,
    ) {
        let reports = self.reports_tx.clone();
        let task = self.tasks.spawn(async move {
            let result = fetch.await;
            let _ = reports.send(Report::Fetched { id, result }).await;
        });
        self.requests.insert(
            id,
            InFlight {
                peer,
                task,
                start,
                written,
                sent: Instant::now(),
            },
        );
    }

    /// A source proved the token and served the advertised manifest: the files get their full
    /// size now (after a free-space check), in the background.
    pub(super) fn start_reserve(&mut self) {
        if self.reserved != Reserve::No {
            return;
        }
        self.reserved = Reserve::Running;
        let reports = self.reports_tx.clone();
        let (store, headroom) = (self.ctx.store.clone(), self.ctx.config.disk_headroom);
        let (budget, vouched) = (self.ctx.config.partial_budget, self.target.vouched);
        let partial = Partial::reopen(&self.partial);
        self.tasks.spawn(async move {
            let result = match partial {
                Ok(partial) => partial.reserve_in(&store, headroom, budget, vouched).await,
                Err(e) => Err(e.into()),
            };
            let _ = reports.send(Report::Reserved(result)).await;
        });
    }
}
