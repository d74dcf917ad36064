//! Which chunks are asked of whom, a part of the scheduler: the next command, the pieces
//! picked in order or as a swarm, have requests, hedging in the tail, and the start and end of
//! requests.

use std::time::Instant;

use super::{Command, Conn, IDLE_ASK, PeerIdx, RANDOM_FIRST, ReqId, Request, Scheduler};
use crate::transfer::download::bits::Bits;
use crate::transfer::download::picker::is_common;
use crate::transfer::download::picker::{Have, Pick};

impl Scheduler {
    pub(super) fn holders_of(&self, piece: usize) -> &[ReqId] {
        self.holders.get(&piece).map_or(&[], |h| h.as_slice())
    }

    /// The next thing to do, if any: what inputs queued first, then the roster's changes,
    /// connections, requests and have requests. Call until `None`.
    pub(crate) fn poll_command(&mut self, now: Instant) -> Option<Command> {
        if let Some(c) = self.queued.pop_front() {
            return Some(c);
        }
        if self.roster_due(now) {
            self.update_roster(now);
            if let Some(c) = self.queued.pop_front() {
                return Some(c);
            }
        }
        if let Some(i) = (0..self.peers.len()).find(|&i| self.can_connect(&self.peers[i], now)) {
            self.peers[i].conn = Conn::Connecting;
            return Some(Command::Connect(i));
        }
        if let Some(c) = self.next_request(now) {
            return Some(c);
        }
        self.next_have_ask(now)
    }

    fn next_request(&mut self, now: Instant) -> Option<Command> {
        if self.paused || self.is_complete() || self.requests.len() >= self.config.max_inflight {
            return None;
        }
        // The source with the most room in its window goes first.
        let mut ready: Vec<PeerIdx> = (0..self.peers.len())
            .filter(|&i| self.can_request(&self.peers[i], now))
            .collect();
        ready.sort_by_key(|&i| {
            std::cmp::Reverse(self.window(&self.peers[i]) - self.peers[i].inflight)
        });
        let crowd = self.is_crowd();
        for peer in ready {
            let piece = if crowd {
                self.pick(peer, now)
            } else {
                self.next_missing()
            };
            if let Some(piece) = piece {
                self.peers[peer].idle_since = None;
                return Some(self.start(peer, piece, now));
            }
            // Room, and nothing of it wanted: it is asked again soon what it holds.
            self.peers[peer].idle_since.get_or_insert(now);
            // The endgame: every missing piece is in flight.
            if self.config.hedge
                && self.open.len() == 0
                && let Some(piece) = self.hedge_candidate(peer, now)
            {
                return Some(self.start(peer, piece, now));
            }
        }
        None
    }

    /// Whether some source in a place holds only part of the snapshot: pieces are then picked
    /// as a swarm does.
    pub(super) fn is_crowd(&self) -> bool {
        self.peers
            .iter()
            .any(|p| p.place.is_active() && p.have.is_partial())
    }

    /// A piece for `peer` in a crowd (see `picker.rs`).
    fn pick(&mut self, peer: PeerIdx, now: Instant) -> Option<usize> {
        let random_first = self.random_picks < RANDOM_FIRST;
        let lowest = self.next_missing();
        let partials = self
            .peers
            .iter()
            .filter(|q| q.place.is_active() && q.have.bits().is_some())
            .count() as u32;
        let avail = &self.avail;
        let rarity = |p: usize| u32::from(avail.count(p));
        let pick = Pick {
            open: &self.open,
            rarity: &rarity,
            random_first,
            lowest: lowest.filter(|&p| is_common(rarity(p), partials)),
        };
        let picked = match &self.peers[peer].have {
            Have::All => {
                // Partial sources that could take a piece now.
                let spare: Vec<&Bits> = self
                    .peers
                    .iter()
                    .filter(|q| self.can_request(q, now))
                    .filter_map(|q| q.have.bits())
                    .collect();
                let spare = |p: usize| spare.iter().any(|b| b.get(p));
                pick.for_complete(&spare, &mut self.rng)
            }
            Have::Some(bits) => pick.for_partial(bits, &self.piece_done, &mut self.rng),
            Have::Unknown => None,
        };
        if picked.is_some() && random_first {
            self.random_picks += 1;
        }
        picked
    }

    /// A source to ask what it holds: one never asked, or one with room that was asked over
    /// `have_interval` ago (a partial holder's holdings grow as it downloads).
    fn next_have_ask(&mut self, now: Instant) -> Option<Command> {
        if self.is_complete() {
            return None;
        }
        let interval = self.config.have_interval;
        // In a crowd, complete sources are asked too: a seed that many ask offers each a few
        // pieces it has sent least (see the streamer's `slots.rs`).
        let crowd = self.is_crowd();
        // A complete source in a crowd is asked at every interval, busy or not: what it
        // offers is what should be asked of it.
        let due = (0..self.peers.len()).find(|&i| {
            let p = &self.peers[i];
            p.place.is_active()
                && p.conn == Conn::Connected
                && (crowd || p.have.is_partial())
                && !p.have_pending
                && match p.have_at {
                    None => true,
                    Some(at) => {
                        at + interval <= now
                            && (p.inflight < self.window(p) || !p.have.is_partial())
                            || p.idle_since.is_some_and(|t| t.max(at) + IDLE_ASK <= now)
                    }
                }
        })?;
        self.peers[due].have_pending = true;
        self.peers[due].idle_since = None;
        Some(Command::AskHave(due))
    }

    fn next_missing(&mut self) -> Option<usize> {
        while self.cursor < self.piece_done.len() {
            if self.open.contains(self.cursor) {
                return Some(self.cursor);
            }
            self.cursor += 1;
        }
        None
    }

    /// An in-flight piece worth fetching from `peer` too: one not already held twice or by
    /// `peer`, whose holder is late or slower than `peer` would be. The oldest goes first.
    fn hedge_candidate(&self, peer: PeerIdx, now: Instant) -> Option<usize> {
        let mine = &self.peers[peer];
        let my_time = self.expected_duration(mine);
        let mut best: Option<(Instant, usize)> = None;
        for req in self.requests.values() {
            let holders = self.holders_of(req.piece);
            if self.piece_done.get(req.piece)
                || holders.len() >= 2
                || holders.iter().any(|h| self.requests[h].peer == peer)
                || !mine.have.has(req.piece)
            {
                continue;
            }
            let holder = &self.peers[req.peer];
            let age = now.saturating_duration_since(req.started);
            let worth = match (self.expected_duration(holder), my_time) {
                // The holder is late: it has taken twice what it should.
                (Some(theirs), _) if age > theirs * 2 => true,
                // I would finish before the holder is expected to.
                (Some(theirs), Some(mine)) => mine < theirs.saturating_sub(age),
                // Nothing known of the holder yet: give it the minimum timeout's quarter.
                (None, _) => age > self.config.min_request_timeout / 4,
                (Some(_), None) => false,
            };
            if worth && best.is_none_or(|(t, _)| req.started < t) {
                best = Some((req.started, req.piece));
            }
        }
        best.map(|(_, piece)| piece)
    }

    fn start(&mut self, peer: PeerIdx, piece: usize, now: Instant) -> Command {
        debug_assert!(!self.piece_done.get(piece), "piece {piece} is done");
        let id = self.next_id;
        self.next_id += 1;
        let chunks = self.missing_chunks(piece);
        let deadline = Some(now + self.request_timeout(&self.peers[peer]));
        self.requests.insert(
            id,
            Request {
                peer,
                piece,
                chunks: chunks.clone(),
                credited: chunks.start,
                started: now,
                deadline,
            },
        );
        self.holders.entry(piece).or_default().push(id);
        self.open.remove(piece);
        if self.peers[peer].inflight == 0 {
            self.peers[peer].asked_since = Some(now);
        }
        self.peers[peer].inflight += 1;
        self.peers[peer].tally.requests += 1;
        Command::Request { id, peer, chunks }
    }

    /// Every chunk of `piece` is on disk.
    pub(super) fn piece_finished(&mut self, piece: usize) {
        self.piece_done.set(piece);
        self.open.remove(piece);
    }

    pub(super) fn finish_request(&mut self, id: ReqId) -> Option<Request> {
        let req = self.requests.remove(&id)?;
        self.peers[req.peer].inflight -= 1;
        if self.peers[req.peer].inflight == 0 {
            self.peers[req.peer].asked_since = None;
        }
        let holders = self.holders.entry(req.piece).or_default();
        holders.retain(|h| *h != id);
        if holders.is_empty() {
            self.holders.remove(&req.piece);
        }
        // Requests cut short may have completed the piece between them.
        if self
            .chunks_of(req.piece)
            .all(|c| self.chunk_done.get(c as usize))
        {
            self.piece_finished(req.piece);
        }
        if !self.piece_done.get(req.piece) && self.holders_of(req.piece).is_empty() {
            self.cursor = self.cursor.min(req.piece);
            self.open.insert(req.piece);
        }
        Some(req)
    }

    /// Ends request `id` and tells the I/O layer to abandon it; what it wrote until then is
    /// still credited (it is unsettled until [`Scheduler::handle_abandoned`]).
    pub(super) fn cancel(&mut self, id: ReqId) {
        if let Some(req) = self.finish_request(id) {
            self.unsettled.insert(id, req);
            self.queued.push_back(Command::Cancel(id));
        }
    }

    pub(super) fn cancel_requests_of(&mut self, peer: PeerIdx) {
        let ids: Vec<ReqId> = self
            .requests
            .iter()
            .filter(|(_, r)| r.peer == peer)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.cancel(id);
        }
    }
}
