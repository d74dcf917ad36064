//! What the I/O layer tells the scheduler happened, a part of the scheduler: chunks written,
//! requests that succeeded, failed or delivered corrupt chunks, what a source holds, and
//! connections up, failed or lost, and time passing.

use std::ops::Range;
use std::time::Instant;

use super::{BUSY_RETRY, Command, Conn, Lost, PeerIdx, ReqId, RequestFailure, Scheduler, roster};
use crate::transfer::download::picker::Have;

impl Scheduler {
    /// Request `id` has verified and written its chunks below `upto` (it goes on, or has just
    /// ended). They count as on disk from now on, and as delivered by its source, so that a
    /// request cut short keeps what it delivered and saved progress includes the chunks of
    /// requests under way. Returns the data bytes newly on disk.
    pub(crate) fn handle_written(&mut self, id: ReqId, upto: u64, now: Instant) -> u64 {
        let (req, ended) = match self.requests.get_mut(&id) {
            Some(req) => (req, false),
            None => match self.unsettled.get_mut(&id) {
                Some(req) => (req, true),
                None => return 0,
            },
        };
        let upto = upto.clamp(req.credited, req.chunks.end);
        let (peer, piece, range) = (req.peer, req.piece, req.credited..upto);
        req.credited = upto;
        let added = self.credit(peer, range, now);
        // A request ended here (cancelled, late) may have completed its piece meanwhile.
        if ended
            && added > 0
            && !self.piece_done.get(piece)
            && self
                .chunks_of(piece)
                .all(|c| self.chunk_done.get(c as usize))
        {
            self.piece_finished(piece);
            for other in self.holders_of(piece).to_vec() {
                self.cancel(other);
            }
        }
        added
    }

    /// The I/O layer abandoned request `id` (a [`Command::Cancel`] carried out), after its
    /// last [`Scheduler::handle_written`]: nothing more of it will be credited.
    pub(crate) fn handle_abandoned(&mut self, id: ReqId) {
        self.unsettled.remove(&id);
    }

    /// Marks `chunks` on disk as delivered by `peer`: new bytes are its, the others
    /// duplicates. Returns the new bytes.
    fn credit(&mut self, peer: PeerIdx, chunks: Range<u64>, now: Instant) -> u64 {
        let mut added = 0;
        let mut seen = 0;
        for c in chunks {
            let bytes = self.bytes_of(c..c + 1);
            if self.chunk_done.get(c as usize) {
                seen += bytes;
            } else {
                self.chunk_done.set(c as usize);
                added += bytes;
            }
        }
        self.done_bytes += added;
        let p = &mut self.peers[peer];
        p.bytes += added;
        p.recent_bytes += added;
        p.duplicate_bytes += seen;
        if added + seen > 0 {
            p.last_byte = Some(now);
        }
        if added > 0 {
            self.last_progress = now;
            p.last_delivery = Some(now);
        }
        added
    }

    /// Request `id` delivered its chunks, all verified and written. Duplicates of its piece
    /// are cancelled. Returns the data bytes newly on disk.
    pub(crate) fn handle_success(&mut self, id: ReqId, now: Instant) -> u64 {
        let Some(req) = self.requests.get(&id) else {
            return 0;
        };
        let (peer, started) = (req.peer, req.started);
        // Chunks its progress reports did not credit yet.
        let unseen = req.credited..req.chunks.end;
        let added = self.credit(peer, unseen, now);
        let Some(req) = self.finish_request(id) else {
            return added;
        };
        let bytes = self.bytes_of(req.chunks.clone());
        let p = &mut self.peers[peer];
        let since = p.last_rate_sample.map_or(started, |t| t.max(started));
        let interval = now.saturating_duration_since(since).as_secs_f64().max(1e-6);
        p.rate.update(bytes as f64 / interval);
        p.last_rate_sample = Some(now);
        let latency = now.saturating_duration_since(started);
        p.min_latency = Some(p.min_latency.map_or(latency, |m| m.min(latency)));
        p.tally.delivered += 1;
        p.failures = 0;
        p.not_held = 0;
        p.backoff_until = None;
        if !self.piece_done.get(req.piece) {
            let full = self.chunks_of(req.piece);
            if full.clone().all(|c| self.chunk_done.get(c as usize)) {
                self.piece_finished(req.piece);
            }
        }
        // The piece is on disk (maybe completed already by what its duplicates delivered):
        // they are not needed any more.
        if self.piece_done.get(req.piece) {
            for other in self.holders_of(req.piece).to_vec() {
                self.cancel(other);
            }
        }
        added
    }

    /// Request `id` failed. The piece is handed out again. A partial source that does not hold
    /// it is no longer counted on for it (and is asked again what it holds).
    pub(crate) fn handle_failure(&mut self, id: ReqId, failure: RequestFailure, now: Instant) {
        let Some(req) = self.finish_request(id) else {
            return;
        };
        let tally = &mut self.peers[req.peer].tally;
        match failure {
            RequestFailure::Busy => tally.busy += 1,
            RequestFailure::NotHeld => tally.not_held += 1,
            RequestFailure::Transient | RequestFailure::Fatal => tally.failed += 1,
        }
        if failure == RequestFailure::NotHeld {
            self.not_held(req.peer, req.piece, now);
        } else {
            self.peer_failed(req.peer, failure, now);
        }
    }

    fn not_held(&mut self, peer: PeerIdx, piece: usize, now: Instant) {
        let p = &mut self.peers[peer];
        p.not_held += 1;
        if p.not_held >= roster::MAX_NOT_HELD {
            self.give_place_up(peer, roster::Why::NothingDelivered, now);
            return;
        }
        match &mut p.have {
            Have::Some(bits) => {
                let old = Have::Some(bits.clone());
                bits.clear(piece);
                let new = p.have.clone();
                self.avail.update(&old, &new);
            }
            // A source that holds everything says it does not: it is a partial one after all.
            Have::All => {
                p.have = Have::Unknown;
                p.have_at = None;
            }
            Have::Unknown => {}
        }
    }

    /// `peer` said what it holds (`Have::All`: everything), or could not say, and how that
    /// failed. Pieces are counted for rarity.
    pub(crate) fn handle_have(
        &mut self,
        peer: PeerIdx,
        have: Result<Have, RequestFailure>,
        now: Instant,
    ) {
        let p = &mut self.peers[peer];
        p.have_pending = false;
        p.have_at = Some(now);
        p.tally.haves += 1;
        let have = match have {
            Ok(have) => have,
            Err(failure) => {
                let failure = if failure == RequestFailure::NotHeld {
                    RequestFailure::Transient
                } else {
                    failure
                };
                self.peer_failed(peer, failure, now);
                return;
            }
        };
        if !p.place.is_active() {
            return;
        }
        self.set_have(peer, have);
    }

    pub(super) fn set_have(&mut self, peer: PeerIdx, have: Have) {
        let old = std::mem::replace(&mut self.peers[peer].have, have);
        let new = self.peers[peer].have.clone();
        self.avail.update(&old, &new);
    }

    /// Request `id` delivered a chunk that does not match the content root: its source is
    /// banned and everything it holds is cancelled and handed out again.
    pub(crate) fn handle_corrupt(&mut self, id: ReqId, now: Instant) {
        if let Some(req) = self.finish_request(id) {
            self.give_place_up(req.peer, roster::Why::Banned, now);
        }
    }

    fn peer_failed(&mut self, peer: PeerIdx, failure: RequestFailure, now: Instant) {
        let max = self.config.max_peer_failures;
        let p = &mut self.peers[peer];
        // A late report of a source that left its place changes nothing.
        if !p.place.is_active() {
            return;
        }
        match failure {
            RequestFailure::Fatal => {
                self.give_place_up(peer, roster::Why::Refused, now);
                return;
            }
            RequestFailure::Busy => {
                // Its slots turn over within seconds: asked again soon.
                self.last_busy = Some(now);
                if p.backoff_until.is_none_or(|t| t <= now) {
                    p.backoff_until = Some(now + BUSY_RETRY.min(self.config.have_interval));
                }
                return;
            }
            RequestFailure::NotHeld | RequestFailure::Transient => {}
        }
        // Failures while already backing off (e.g. every request of a lost connection) count
        // once.
        if p.backoff_until.is_some_and(|t| t > now) {
            return;
        }
        p.failures += 1;
        if p.failures >= max {
            self.give_place_up(peer, roster::Why::Failing, now);
            return;
        }
        let delay = p.backoff.next().unwrap_or(self.config.backoff_max);
        p.backoff_until = Some(now + delay);
    }

    /// The connection to `peer` is up, and it served a manifest that matches the target.
    /// Returns `None` when the connection is not wanted (the source left its place meanwhile:
    /// close it), else whether its manifest is the one the download takes (see the roster).
    pub(crate) fn handle_connected(&mut self, peer: PeerIdx) -> Option<bool> {
        let p = &mut self.peers[peer];
        if !p.place.is_active() || p.conn != Conn::Connecting {
            return None;
        }
        p.conn = Conn::Connected;
        let partial = p.added_partial;
        Some(self.roster.take_manifest(partial))
    }

    /// Connecting to `peer` failed.
    pub(crate) fn handle_connect_failed(
        &mut self,
        peer: PeerIdx,
        failure: RequestFailure,
        now: Instant,
    ) {
        if self.peers[peer].conn == Conn::Connecting {
            self.peers[peer].conn = Conn::Disconnected;
        }
        self.peer_failed(peer, failure, now);
        // A server too full to take the connection is tried again after a have interval,
        // not as soon as a busy request: each attempt costs it a handshake.
        if failure == RequestFailure::Busy {
            let p = &mut self.peers[peer];
            p.backoff_until = p.backoff_until.max(Some(now + self.config.have_interval));
        }
    }

    /// The connection to `peer` was lost (`lost` says how): its requests are cancelled and
    /// handed out again. A connection that failed is reconnected after a backoff; one the
    /// server closed on purpose (as idle, or to make room) is reconnected when wanted, and
    /// counts as no failure; a source that said it is shutting down gives its place up (to
    /// come back as a spare after a while, should it return).
    pub(crate) fn handle_disconnected(&mut self, peer: PeerIdx, lost: Lost, now: Instant) {
        self.peers[peer].conn = Conn::Disconnected;
        self.peers[peer].have_pending = false;
        self.cancel_requests_of(peer);
        match lost {
            Lost::Benign => {}
            Lost::Failed => self.peer_failed(peer, RequestFailure::Transient, now),
            Lost::Left => {
                if self.peers[peer].place.is_active() {
                    self.give_place_up(peer, roster::Why::Left, now);
                }
            }
        }
    }

    /// Time passed: requests past their deadline are cancelled, counted as failures and their
    /// pieces handed out again, as are those of sources gone quiet; the roster looks at the
    /// places.
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        let quiet: Vec<PeerIdx> = (0..self.peers.len())
            .filter(|&i| self.quiet_since(i).is_some_and(|t| t <= now))
            .collect();
        for peer in quiet {
            let wait = self.quiet_window(&self.peers[peer]);
            self.peers[peer].tally.quiet += 1;
            self.cancel_requests_of(peer);
            // It waits a quiet window before it is asked again, and no failure is counted: when the
            // cause was here (a disk that stalled), no source loses its place for it; one that
            // stays silent is snubbed like any that delivers nothing.
            let p = &mut self.peers[peer];
            p.backoff_until = p.backoff_until.max(Some(now + wait));
            // Nothing may be in flight any more: the roster looks (see its starving rule).
            self.roster.look_again();
        }
        let late: Vec<ReqId> = self
            .requests
            .iter()
            .filter(|(_, r)| r.deadline.is_some_and(|d| d <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in late {
            let req = self.requests.get(&id).cloned();
            self.handle_failure(id, RequestFailure::Transient, now);
            if let Some(req) = req {
                self.unsettled.insert(id, req);
            }
            self.queued.push_back(Command::Cancel(id));
        }
        if self.roster_due(now) {
            self.update_roster(now);
        }
    }
}
