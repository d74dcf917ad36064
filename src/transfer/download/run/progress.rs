//! What the download holds so far: chunks credited to their sources, progress made durable for
//! resume and published, and the verified chunks offered to the streamer meanwhile.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::{Holding, INTRODUCED, Origin, Reserve, Run};
use crate::chunk::ChunkSource;
use crate::snapshot::OUTBOARD_FILE;
use crate::transfer::download::DownloadError;
use crate::transfer::download::partial::PART_FILE;
use crate::transfer::download::scheduler::{PeerIdx, ReqId};
use crate::transfer::exchange::{Introducer, PartialOffer};
use crate::transfer::{DOWNLOAD_TARGET, PeerAddr};

impl Run {
    /// Offers the verified chunks to the streamer, once the files have their size and the
    /// manifest is known (unless serving while downloading is off).
    pub(super) fn offer(&mut self) {
        if self.offer.is_some() || self.reserved != Reserve::Done || !self.ctx.config.serve_partial
        {
            return;
        }
        let Some(manifest) = self.manifest.clone() else {
            return;
        };
        let dir = self.partial.dir();
        match ChunkSource::open(self.tree, &dir.join(PART_FILE), &dir.join(OUTBOARD_FILE)) {
            Ok(source) => {
                let introduce = self.introduce.clone();
                // Each asker once: the same channel brings discovery's sources.
                let seen = std::sync::Mutex::new(lru::LruCache::new(INTRODUCED));
                self.offer = Some(self.ctx.store.exchange().offer(PartialOffer {
                    manifest,
                    source: Arc::new(source),
                    verified: self.verified.clone(),
                    served: self.served.clone(),
                    introduce: Introducer(Box::new(move |peer_id, addr| {
                        let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
                        if seen.contains(&peer_id) {
                            return false;
                        }
                        // Remembered once the download took it (a full channel drops nothing
                        // for good: the asker is introduced at its next ask).
                        let peer = PeerAddr { peer_id, addr };
                        let sent = introduce
                            .try_send((Origin::Peer(peer), Holding::Partial))
                            .is_ok();
                        if sent {
                            seen.put(peer_id, ());
                        }
                        sent
                    })),
                }));
                tracing::debug!(target: DOWNLOAD_TARGET, verified = self.verified.count(), "serving the verified chunks meanwhile");
            }
            Err(e) => {
                tracing::warn!(target: DOWNLOAD_TARGET, error = %e, "cannot serve the partial download");
            }
        }
    }

    /// Counts the chunks request `id` has checked and written so far as on disk, delivered by
    /// its source.
    pub(super) fn credit(&mut self, id: ReqId) {
        let Some(r) = self.requests.get(&id) else {
            return;
        };
        let (peer, upto) = (r.peer, r.written.load(Ordering::Acquire));
        // Written with their proof nodes and checked: they may be served from now on.
        for c in r.start..upto {
            self.verified.set(c);
        }
        let added = self.sched.handle_written(id, upto, Instant::now());
        self.count_fetched(peer, added);
    }

    /// `peer` delivered `added` new verified bytes: counted, and credited to it (the streamer
    /// serves first the peers that give).
    pub(super) fn count_fetched(&mut self, peer: PeerIdx, added: u64) {
        if added > 0 {
            self.fetched_bytes += added;
            self.ctx.metrics.downloaded_bytes.inc_by(added);
            self.watermark.advance(self.sched.verified_prefix());
            if let Some(id) = self.sources[peer].origin.peer_id() {
                self.ctx.store.exchange().credit(id, added, Instant::now());
            }
        }
    }

    pub(super) fn credit_all(&mut self) {
        let ids: Vec<ReqId> = self.requests.keys().copied().collect();
        for id in ids {
            self.credit(id);
        }
    }

    /// Starts making the chunks on disk durable and recording them for resume, in the
    /// background (the download goes on meanwhile), once the files are reserved.
    pub(super) fn start_persist(&mut self) -> Result<(), DownloadError> {
        self.credit_all();
        if self.reserved != Reserve::Done {
            return Ok(());
        }
        Ok(self
            .persister
            .start(self.sched.chunk_done(), self.sched.done_bytes())?)
    }

    /// Makes the chunks on disk durable and records them for resume, and waits for it.
    pub(super) async fn flush_progress(&mut self) -> Result<(), DownloadError> {
        self.credit_all();
        if self.reserved != Reserve::Done {
            return self.persister.wait().await;
        }
        let done = self.sched.done_bytes();
        self.persister.flush(self.sched.chunk_done(), done).await
    }

    pub(super) fn publish_progress(&mut self, finished: bool) {
        let p = self.progress(finished);
        self.progress_tx.send_replace(p);
    }
}
