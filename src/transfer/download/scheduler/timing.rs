//! Windows and deadlines, a part of the scheduler: how many requests a source may have in
//! flight, how long a request may take, whether a source may connect or be asked now, when the
//! scheduler is due to look again, and when the download is stuck.

use std::time::{Duration, Instant};

use super::{Conn, IDLE_ASK, Peer, PeerIdx, Scheduler, Stuck};

impl Scheduler {
    /// The round-trip time of `peer`'s connection, as the I/O layer measured it.
    pub(crate) fn handle_rtt(&mut self, peer: PeerIdx, rtt: Duration) {
        self.peers[peer].rtt = Some(rtt);
    }

    /// Requests `peer` may have in flight: its bandwidth x delay in pieces, plus one.
    pub(super) fn window(&self, peer: &Peer) -> usize {
        let piece_bytes = (self.piece_chunks * self.chunk_bytes) as f64;
        let delay = peer.rtt.or(peer.min_latency);
        let w = match (peer.rate.get(), delay) {
            // One more than the link holds (at least two), so the server always has the next.
            (Some(rate), Some(delay)) => {
                ((rate * delay.as_secs_f64() / piece_bytes).ceil() as usize + 1).max(2)
            }
            _ => self.config.initial_window,
        };
        w.clamp(1, self.config.max_window.max(1))
    }

    /// Time `peer` is expected to take for one more request, from its rate and queue.
    pub(super) fn expected_duration(&self, peer: &Peer) -> Option<Duration> {
        let piece_bytes = (self.piece_chunks * self.chunk_bytes) as f64;
        let rate = peer.rate.get()?;
        let queued = peer.inflight.max(1) as f64;
        Some(Duration::from_secs_f64(
            piece_bytes * queued / rate.max(1.0),
        ))
    }

    /// A request's time from its start: what its piece takes at the slowest acceptable rate
    /// (never less than the minimum timeout), and, once the source's rate is known, at most
    /// four times what it is expected to take.
    pub(super) fn request_timeout(&self, peer: &Peer) -> Duration {
        let piece_bytes = (self.piece_chunks * self.chunk_bytes) as f64;
        let floor = self.config.min_request_timeout;
        let cap = floor.max(Duration::from_secs_f64(
            piece_bytes / self.config.min_peer_rate.max(1) as f64,
        ));
        match self.expected_duration(peer) {
            Some(expected) => cap.min(floor.max(expected * 4)),
            None => cap,
        }
    }

    /// When `peer`, with requests in flight, counts as quiet if it delivers nothing more: a
    /// quarter of the minimum request timeout after its last verified byte (or after its
    /// requests began, if it delivered none since), and at least eight round trips and the
    /// time two chunks take at `min_peer_rate`. Not while every source with requests in flight
    /// is silent (nothing new arrived from anyone since): the cause is then more likely here
    /// (a disk that stalls) than in each of them. A source left alone with requests in flight
    /// (the others gone or waiting) is quiet on its own.
    pub(super) fn quiet_since(&self, peer: PeerIdx) -> Option<Instant> {
        let p = &self.peers[peer];
        let asked = p.asked_since?;
        if !p.place.is_active() || p.conn != Conn::Connected {
            return None;
        }
        let basis = p.last_byte.map_or(asked, |b| b.max(asked));
        // Every source with requests in flight silent at once: more likely a stall here.
        let others_silent_too = self.peers.iter().enumerate().any(|(i, q)| {
            i != peer && q.inflight > 0 && q.place.is_active() && q.conn == Conn::Connected
        });
        if others_silent_too && self.last_progress <= basis {
            return None;
        }
        Some(basis + self.quiet_window(p))
    }

    /// How long a source with requests in flight may deliver nothing before it is quiet: a
    /// quarter of the minimum request timeout, at least eight round trips and two chunks'
    /// time at `min_peer_rate`.
    pub(super) fn quiet_window(&self, p: &Peer) -> Duration {
        let rtt = p.rtt.or(p.min_latency).unwrap_or_default();
        let chunks = Duration::from_secs_f64(
            2.0 * self.chunk_bytes as f64 / self.config.min_peer_rate.max(1) as f64,
        );
        (self.config.min_request_timeout / 4)
            .max(rtt * 8)
            .max(chunks)
    }

    pub(super) fn can_connect(&self, p: &Peer, now: Instant) -> bool {
        p.place.is_active()
            && p.conn == Conn::Disconnected
            && p.backoff_until.is_none_or(|t| t <= now)
    }

    pub(super) fn can_request(&self, p: &Peer, now: Instant) -> bool {
        p.place.is_active()
            && p.conn == Conn::Connected
            && p.backoff_until.is_none_or(|t| t <= now)
            && p.inflight < self.window(p)
    }

    /// Whether the download cannot go on: no source left to try (or none ever given, for
    /// `no_progress_timeout`), or nothing arrived for too long. (A complete download can still
    /// be stuck without sources: its manifest comes from one.)
    pub(crate) fn stuck(&self, now: Instant) -> Option<Stuck> {
        let quiet = now.saturating_duration_since(self.last_progress);
        let limit = self.config.no_progress_timeout;
        // A download given no source yet waits for one (added right after it starts, say) as
        // long as it would wait for progress.
        if self.peers.is_empty() {
            return (quiet >= limit).then_some(Stuck::NoPeers);
        }
        if !self.peers.iter().any(|p| p.place.may_serve()) {
            return Some(Stuck::NoPeers);
        }
        if self.is_complete() {
            return None;
        }
        // Sources that said lately they are busy serving others: this download waits its turn,
        // for a while.
        let waiting = self
            .last_busy
            .is_some_and(|t| t > self.last_progress && now.saturating_duration_since(t) < limit);
        // Sources never tried may still have it: the download goes on while some wait (they
        // take places as the snubbed ones give theirs up), so identities in front of the
        // honest holders cannot make it fail and start over with them in front again.
        let untried = self.peers.iter().any(|p| p.place.is_untried());
        if quiet >= limit && !untried && !(waiting && quiet < limit * 4) {
            return Some(Stuck::NoProgress);
        }
        None
    }

    /// When to call [`Scheduler::handle_timeout`] next: a deadline, a backoff ending, a hedge
    /// becoming worth it, the roster's next look, the no-progress limit.
    pub(crate) fn poll_timeout(&self, now: Instant) -> Instant {
        let mut next = self.last_progress + self.config.no_progress_timeout;
        if next <= now {
            // Waiting for a busy source's turn: look again at the end of the wait.
            next = now.max(self.last_progress + self.config.no_progress_timeout * 4);
        }
        next = next.min(self.roster.next_look(now));
        if let Some(t) = self.take_back_at(now) {
            next = next.min(t.max(now));
        }
        for d in self.requests.values().filter_map(|r| r.deadline) {
            next = next.min(d);
        }
        for i in 0..self.peers.len() {
            if let Some(t) = self.quiet_since(i) {
                next = next.min(t);
            }
        }
        for p in &self.peers {
            if p.place.is_active()
                && let Some(t) = p.backoff_until
                && t > now
            {
                next = next.min(t);
            }
        }
        if !self.is_complete() {
            let crowd = self.is_crowd();
            for p in &self.peers {
                if p.place.is_active()
                    && p.conn == Conn::Connected
                    && (crowd || p.have.is_partial())
                    && let Some(at) = p.have_at
                    && at + self.config.have_interval > now
                {
                    next = next.min(at + self.config.have_interval);
                    if let Some(idle) = p.idle_since {
                        next = next.min((idle.max(at) + IDLE_ASK).max(now));
                    }
                }
            }
        }
        if self.config.hedge
            && self.open.len() == 0
            && !self.requests.is_empty()
            && self.peers.iter().any(|p| self.can_request(p, now))
        {
            // In the tail, look again soon for stragglers worth hedging.
            next = next.min(now + Duration::from_millis(20));
        }
        next
    }
}
