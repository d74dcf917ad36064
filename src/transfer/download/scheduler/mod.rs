//! Which chunk from which source, and which sources hold the download's places: the download
//! scheduler, a pure state machine.
//!
//! No sockets, no clocks, no tasks. The vocabulary is quinn-proto's: the downloader's I/O layer
//! tells it what happened with the time (`handle_*`), wakes it at [`Scheduler::poll_timeout`]
//! ([`Scheduler::handle_timeout`]), and carries out what it says next
//! ([`Scheduler::poll_command`]): the commands its inputs queued (cancels, closes) first, then
//! new connections and requests. Tests drive it directly. Who holds a place is `roster.rs`.
//!
//! The rules of pieces and requests:
//! - **Pull by throughput.** Each connected source keeps up to its *window* of requests in
//!   flight and gets a new one as soon as one completes, so a faster source serves more. The
//!   window is the source's delivery rate x the connection's round-trip time (bandwidth x
//!   delay), in requests, plus one: enough to keep its link busy and no more, so that a
//!   server's queue (and a loaded link's) does not fill with this download's requests. It is
//!   bounded per source and in total (memory).
//! - **In order, or as a swarm.** While every source holds the whole snapshot, missing pieces
//!   are handed out lowest first (sequential disk writes, a loader keeps pace). Once a source
//!   holds only part of it (another downloader serving what it verified), the pieces of each
//!   source are picked as `picker.rs` says: the first few at random, then rarest first, and a
//!   complete source is spent on what no partial source with room holds. A partial source is
//!   asked what it holds when it connects and again, at most every `have_interval`, when it
//!   has room and nothing it is known to hold is open; a piece it says it does not hold after
//!   all is handed out again.
//! - **Busy is no failure.** A source that is busy uploading to others is asked again soon; a
//!   download that waits for its turn is not stuck until `4 x no_progress_timeout`.
//! - **Hedged tail.** Once nothing is missing but some pieces are still in flight, an idle
//!   source also fetches a piece another holds, when it would finish sooner or the holder is
//!   late. The first answer wins; the other request is cancelled.
//! - **Deadlines.** Every request has a deadline from its start: the time its piece takes at
//!   `min_peer_rate`, and never less than `min_request_timeout`; once the source's rate is
//!   known, at most `4 x` its expected time. Past it, the request is cancelled and its piece
//!   handed out again, so a source that trickles bytes cannot hold a piece. (The I/O layer also
//!   abandons a request that receives nothing for `min_request_timeout`.)
//! - **Retries with backoff.** A failed request or connection puts the source in exponential
//!   backoff (with jitter). Failures at the same moment count once.
//! - **Bytes add up.** Every verified byte is credited to the source whose request wrote it,
//!   when it is written (a request cut short keeps what it delivered); bytes a source delivered
//!   that another had written first are counted apart. Over a download, the sources' bytes add
//!   up to what was fetched.
//! - **Fails only when stuck.** The download fails when no source is left to try (every one
//!   banned or out), or when no verified byte has arrived for `no_progress_timeout` and every
//!   source heard of has been tried.
//! - **Verified prefix.** It tracks how far the chunks on disk reach without a gap from the
//!   start, for a loader that reads the archive while it arrives.

mod roster;
#[cfg(test)]
mod roster_tests;
#[cfg(test)]
mod tests;

pub(crate) use roster::Standing;

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use rand::SeedableRng;
use rand_xoshiro::Xoshiro256PlusPlus;

use super::bits::Bits;
use super::picker::{Availability, Have, OpenSet, Pick};
use crate::transfer::rate::Ewma;

/// Index of a source in the scheduler.
pub(crate) type PeerIdx = usize;

/// Id of a request.
pub(crate) type ReqId = u64;

/// Settings of the scheduler (part of [`super::DownloadConfig`], which documents each).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct SchedulerConfig {
    pub(crate) request_chunks: u64,
    pub(crate) initial_window: usize,
    pub(crate) max_window: usize,
    pub(crate) max_inflight: usize,
    pub(crate) min_request_timeout: Duration,
    pub(crate) min_peer_rate: u64,
    pub(crate) hedge: bool,
    pub(crate) backoff_min: Duration,
    pub(crate) backoff_max: Duration,
    pub(crate) max_peer_failures: u32,
    pub(crate) no_progress_timeout: Duration,
    pub(crate) have_interval: Duration,
    pub(crate) max_peers: usize,
    pub(crate) snub_timeout: Duration,
    pub(crate) rotate_interval: Duration,
    pub(crate) jitter_seed: Option<u64>,
}

/// What the I/O layer should do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Command {
    /// Open a connection to the source (it has taken a place).
    Connect(PeerIdx),
    /// Close the source's connection: it gave its place up (it stays a spare).
    Close(PeerIdx),
    /// Fetch these chunks from the source.
    Request {
        id: ReqId,
        peer: PeerIdx,
        chunks: Range<u64>,
    },
    /// Abandon this request (its piece is done elsewhere, it timed out, or its source left).
    Cancel(ReqId),
    /// Ask the source which pieces it holds; answer with [`Scheduler::handle_have`].
    AskHave(PeerIdx),
}

/// How a request or connection failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// Worth retrying after a backoff (connection lost, timeout, refused for load).
    Transient,
    /// The source cannot serve this download (unknown snapshot, wrong token, wrong chunk size).
    Fatal,
    /// The source is busy serving others: ask again soon, but it counts as no failure.
    Busy,
    /// The source (a partial holder) does not hold these chunks yet.
    NotHeld,
}

/// Why a download cannot go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stuck {
    /// No source is left to try: every one is banned or out.
    NoPeers,
    /// Nothing verified arrived for `no_progress_timeout`.
    NoProgress,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Conn {
    Disconnected,
    Connecting,
    Connected,
}

#[derive(Debug)]
struct Peer {
    place: roster::Place,
    /// Added as a holder of part of the snapshot only.
    added_partial: bool,
    /// When it was first heard of, in order.
    order: u64,
    conn: Conn,
    inflight: usize,
    /// Delivery rate, bytes per second.
    rate: Ewma,
    /// The connection's round-trip time, once known.
    rtt: Option<Duration>,
    /// Smallest request latency seen (the round-trip time's stand-in until one is known).
    min_latency: Option<Duration>,
    /// When it last delivered a new verified byte.
    last_delivery: Option<Instant>,
    /// When its delivery rate was last sampled (a request's end).
    last_rate_sample: Option<Instant>,
    failures: u32,
    backoff_until: Option<Instant>,
    backoff: ExponentialBackoff,
    /// Verified bytes it delivered that were new.
    bytes: u64,
    /// Verified bytes it delivered that another source had written first (hedging).
    duplicate_bytes: u64,
    /// New verified bytes since the roster last compared the places.
    recent_bytes: u64,
    /// What it holds.
    have: Have,
    /// A have request is under way.
    have_pending: bool,
    /// When it last said what it holds.
    have_at: Option<Instant>,
    /// Requests it answered "not held" in a row.
    not_held: u32,
    /// Since when it has had room and nothing it is known to hold was wanted.
    idle_since: Option<Instant>,
    /// What became of its requests, for the download's log.
    tally: Tally,
}

/// What became of a source's requests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Tally {
    pub(crate) requests: u32,
    pub(crate) delivered: u32,
    pub(crate) busy: u32,
    pub(crate) not_held: u32,
    pub(crate) failed: u32,
    pub(crate) haves: u32,
}

#[derive(Debug, Clone)]
struct Request {
    peer: PeerIdx,
    piece: usize,
    chunks: Range<u64>,
    /// Its chunks below this are credited to its source already.
    credited: u64,
    started: Instant,
    deadline: Option<Instant>,
}

/// Per-source figures for progress reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct PeerReport {
    pub(crate) bytes: u64,
    pub(crate) duplicate_bytes: u64,
    pub(crate) rate: f64,
    pub(crate) inflight: usize,
    pub(crate) standing: Standing,
    /// It held a place at some time.
    pub(crate) tried: bool,
    /// It holds part of the snapshot only (it downloads it too).
    pub(crate) partial: bool,
    /// What became of its requests.
    pub(crate) tally: Tally,
}

/// The scheduler of one download.
#[derive(Debug)]
pub(crate) struct Scheduler {
    config: SchedulerConfig,
    /// Bytes of a chunk, and chunks of a piece (a request).
    chunk_bytes: u64,
    piece_chunks: u64,
    chunk_count: u64,
    size: u64,
    /// Pieces done.
    piece_done: Bits,
    /// Requests in flight for each piece that has any.
    holders: HashMap<usize, Vec<ReqId>>,
    /// Chunks on disk (for resume).
    chunk_done: Bits,
    cursor: usize,
    peers: Vec<Peer>,
    requests: HashMap<ReqId, Request>,
    next_id: ReqId,
    done_bytes: u64,
    last_progress: Instant,
    /// Chunks on disk without a gap from chunk 0.
    prefix_chunks: u64,
    /// While paused, sources are connected but no chunk is requested.
    paused: bool,
    /// Commands queued by inputs, handed out first.
    queued: VecDeque<Command>,
    /// Pieces neither done nor in flight.
    open: OpenSet,
    /// How many partial sources hold each piece.
    avail: Availability,
    /// Pieces picked at random so far (the first few are).
    random_picks: usize,
    /// The last time a source said it is busy (waiting for a turn is not being stuck).
    last_busy: Option<Instant>,
    /// The places: who holds them, when they are looked at again.
    roster: roster::Roster,
    rng: Xoshiro256PlusPlus,
}

/// Pieces picked at random before rarest first.
const RANDOM_FIRST: usize = 4;

/// How soon a source with room and nothing known to be wanted of it is asked again what it
/// holds (a partial holder's holdings grow; a seed offers more), when sooner than
/// `have_interval`.
pub(crate) const IDLE_ASK: Duration = Duration::from_millis(250);

/// How soon a source that answered "busy" is asked again (at most `have_interval`).
pub(crate) const BUSY_RETRY: Duration = Duration::from_millis(250);

/// EWMA weight of a new rate sample.
const RATE_ALPHA: f64 = 0.3;

impl Scheduler {
    /// A scheduler for an archive of `size` bytes in `chunk_count` chunks of `chunk_bytes`, of
    /// which those in `already_done` are on disk.
    pub(crate) fn new(
        config: SchedulerConfig,
        size: u64,
        chunk_bytes: u64,
        chunk_count: u64,
        already_done: &Bits,
        now: Instant,
    ) -> Self {
        let piece_chunks = config.request_chunks.max(1);
        let n = chunk_count.div_ceil(piece_chunks) as usize;
        let mut chunk_done = Bits::new(chunk_count as usize);
        let mut done_bytes = 0;
        for i in 0..chunk_count as usize {
            if already_done.get(i) {
                chunk_done.set(i);
                let start = i as u64 * chunk_bytes;
                done_bytes += (start + chunk_bytes).min(size) - start.min(size);
            }
        }
        let mut s = Self {
            config,
            chunk_bytes,
            piece_chunks,
            chunk_count,
            size,
            piece_done: Bits::new(n),
            holders: HashMap::new(),
            chunk_done,
            cursor: 0,
            peers: Vec::new(),
            requests: HashMap::new(),
            next_id: 0,
            done_bytes,
            last_progress: now,
            prefix_chunks: 0,
            paused: false,
            queued: VecDeque::new(),
            open: OpenSet::full(n),
            avail: Availability::new(n),
            random_picks: 0,
            last_busy: None,
            roster: roster::Roster::new(now, config.rotate_interval),
            rng: match config.jitter_seed {
                Some(seed) => Xoshiro256PlusPlus::seed_from_u64(seed),
                None => Xoshiro256PlusPlus::from_os_rng(),
            },
        };
        for p in 0..n {
            let range = s.chunks_of(p);
            if range.clone().all(|c| s.chunk_done.get(c as usize)) {
                s.piece_done.set(p);
                s.open.remove(p);
            }
        }
        s
    }

    fn chunks_of(&self, piece: usize) -> Range<u64> {
        let start = piece as u64 * self.piece_chunks;
        start..(start + self.piece_chunks).min(self.chunk_count)
    }

    /// Data bytes of a chunk range.
    fn bytes_of(&self, chunks: Range<u64>) -> u64 {
        let cb = self.chunk_bytes;
        (chunks.end * cb).min(self.size) - (chunks.start * cb).min(self.size)
    }

    /// The chunks of `piece` still missing (a sub-range: resumed pieces may be partly done).
    fn missing_chunks(&self, piece: usize) -> Range<u64> {
        let r = self.chunks_of(piece);
        let first = r
            .clone()
            .find(|c| !self.chunk_done.get(*c as usize))
            .unwrap_or(r.start);
        let last = r
            .clone()
            .rev()
            .find(|c| !self.chunk_done.get(*c as usize))
            .unwrap_or(r.start);
        first..last + 1
    }

    fn new_peer(&mut self, partial: bool, now: Instant) -> Peer {
        let mut builder = ExponentialBuilder::default()
            .with_min_delay(self.config.backoff_min)
            .with_max_delay(self.config.backoff_max)
            .with_factor(2.0)
            .without_max_times()
            .with_jitter();
        if let Some(seed) = self.config.jitter_seed {
            builder = builder.with_jitter_seed(seed.wrapping_add(self.peers.len() as u64));
        }
        Peer {
            place: roster::Place::spare(now),
            added_partial: partial,
            order: self.peers.len() as u64,
            conn: Conn::Disconnected,
            inflight: 0,
            rate: Ewma::new(RATE_ALPHA),
            rtt: None,
            min_latency: None,
            last_delivery: None,
            last_rate_sample: None,
            failures: 0,
            backoff_until: None,
            backoff: builder.build(),
            bytes: 0,
            duplicate_bytes: 0,
            recent_bytes: 0,
            have: if partial { Have::Unknown } else { Have::All },
            have_pending: false,
            have_at: None,
            not_held: 0,
            idle_since: None,
            tally: Tally::default(),
        }
    }

    pub(crate) fn is_complete(&self) -> bool {
        self.piece_done.ones() == self.piece_done.len()
    }

    pub(crate) fn done_bytes(&self) -> u64 {
        self.done_bytes
    }

    pub(crate) fn chunk_done(&self) -> &Bits {
        &self.chunk_done
    }

    /// Pieces done.
    pub(crate) fn pieces_done(&self) -> &Bits {
        &self.piece_done
    }

    /// Bytes on disk without a gap from the start of the archive.
    pub(crate) fn verified_prefix(&mut self) -> u64 {
        while self.prefix_chunks < self.chunk_count
            && self.chunk_done.get(self.prefix_chunks as usize)
        {
            self.prefix_chunks += 1;
        }
        (self.prefix_chunks * self.chunk_bytes).min(self.size)
    }

    fn holders_of(&self, piece: usize) -> &[ReqId] {
        self.holders.get(&piece).map_or(&[], |h| h.as_slice())
    }

    pub(crate) fn peer_report(&self, peer: PeerIdx) -> PeerReport {
        let p = &self.peers[peer];
        PeerReport {
            bytes: p.bytes,
            duplicate_bytes: p.duplicate_bytes,
            rate: p.rate.get().unwrap_or(0.0),
            inflight: p.inflight,
            standing: p.place.standing(),
            tried: !p.place.is_untried(),
            partial: p.have.is_partial(),
            tally: p.tally,
        }
    }

    /// The round-trip time of `peer`'s connection, as the I/O layer measured it.
    pub(crate) fn handle_rtt(&mut self, peer: PeerIdx, rtt: Duration) {
        self.peers[peer].rtt = Some(rtt);
    }

    /// Requests `peer` may have in flight: its bandwidth x delay in pieces, plus one.
    fn window(&self, peer: &Peer) -> usize {
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
    fn expected_duration(&self, peer: &Peer) -> Option<Duration> {
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
    fn request_timeout(&self, peer: &Peer) -> Duration {
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

    fn can_connect(&self, p: &Peer, now: Instant) -> bool {
        p.place.is_active()
            && p.conn == Conn::Disconnected
            && p.backoff_until.is_none_or(|t| t <= now)
    }

    fn can_request(&self, p: &Peer, now: Instant) -> bool {
        p.place.is_active()
            && p.conn == Conn::Connected
            && p.backoff_until.is_none_or(|t| t <= now)
            && p.inflight < self.window(p)
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
    fn is_crowd(&self) -> bool {
        self.peers
            .iter()
            .any(|p| p.place.is_active() && p.have.is_partial())
    }

    /// A piece for `peer` in a crowd (see `picker.rs`).
    fn pick(&mut self, peer: PeerIdx, now: Instant) -> Option<usize> {
        let random_first = self.random_picks < RANDOM_FIRST;
        let avail = &self.avail;
        let rarity = |p: usize| u32::from(avail.count(p));
        let pick = Pick {
            open: &self.open,
            rarity: &rarity,
            random_first,
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
        self.peers[peer].inflight += 1;
        self.peers[peer].tally.requests += 1;
        Command::Request { id, peer, chunks }
    }

    /// Every chunk of `piece` is on disk.
    fn piece_finished(&mut self, piece: usize) {
        self.piece_done.set(piece);
        self.open.remove(piece);
    }

    fn finish_request(&mut self, id: ReqId) -> Option<Request> {
        let req = self.requests.remove(&id)?;
        self.peers[req.peer].inflight -= 1;
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

    /// Request `id` has verified and written its chunks below `upto` (it goes on, or has just
    /// ended). They count as on disk from now on, and as delivered by its source, so that a
    /// request cut short keeps what it delivered and saved progress includes the chunks of
    /// requests under way. Returns the data bytes newly on disk.
    pub(crate) fn handle_written(&mut self, id: ReqId, upto: u64, now: Instant) -> u64 {
        let Some(req) = self.requests.get_mut(&id) else {
            return 0;
        };
        let upto = upto.clamp(req.credited, req.chunks.end);
        let (peer, range) = (req.peer, req.credited..upto);
        req.credited = upto;
        self.credit(peer, range, now)
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

    /// Ends request `id` and tells the I/O layer to abandon it.
    fn cancel(&mut self, id: ReqId) {
        if self.finish_request(id).is_some() {
            self.queued.push_back(Command::Cancel(id));
        }
    }

    /// Request `id` failed. The piece is handed out again. A partial source that does not hold
    /// it is no longer counted on for it (and is asked again what it holds).
    pub(crate) fn handle_failure(&mut self, id: ReqId, failure: Failure, now: Instant) {
        let Some(req) = self.finish_request(id) else {
            return;
        };
        let tally = &mut self.peers[req.peer].tally;
        match failure {
            Failure::Busy => tally.busy += 1,
            Failure::NotHeld => tally.not_held += 1,
            Failure::Transient | Failure::Fatal => tally.failed += 1,
        }
        if failure == Failure::NotHeld {
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
    pub(crate) fn handle_have(&mut self, peer: PeerIdx, have: Result<Have, Failure>, now: Instant) {
        let p = &mut self.peers[peer];
        p.have_pending = false;
        p.have_at = Some(now);
        p.tally.haves += 1;
        let have = match have {
            Ok(have) => have,
            Err(failure) => {
                let failure = if failure == Failure::NotHeld {
                    Failure::Transient
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

    fn set_have(&mut self, peer: PeerIdx, have: Have) {
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

    fn cancel_requests_of(&mut self, peer: PeerIdx) {
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

    fn peer_failed(&mut self, peer: PeerIdx, failure: Failure, now: Instant) {
        let max = self.config.max_peer_failures;
        let p = &mut self.peers[peer];
        // A late report of a source that left its place changes nothing.
        if !p.place.is_active() {
            return;
        }
        match failure {
            Failure::Fatal => {
                self.give_place_up(peer, roster::Why::Refused, now);
                return;
            }
            Failure::Busy => {
                // Its slots turn over within seconds: asked again soon.
                self.last_busy = Some(now);
                if p.backoff_until.is_none_or(|t| t <= now) {
                    p.backoff_until = Some(now + BUSY_RETRY.min(self.config.have_interval));
                }
                return;
            }
            Failure::NotHeld | Failure::Transient => {}
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
    pub(crate) fn handle_connect_failed(&mut self, peer: PeerIdx, failure: Failure, now: Instant) {
        if self.peers[peer].conn == Conn::Connecting {
            self.peers[peer].conn = Conn::Disconnected;
        }
        self.peer_failed(peer, failure, now);
        // A server too full to take the connection is tried again after a have interval,
        // not as soon as a busy request: each attempt costs it a handshake.
        if failure == Failure::Busy {
            let p = &mut self.peers[peer];
            p.backoff_until = p.backoff_until.max(Some(now + self.config.have_interval));
        }
    }

    /// The connection to `peer` was lost: its requests are cancelled and handed out again, and
    /// it will be reconnected after a backoff. A connection the server closed on purpose (as
    /// idle, or to make room) is reconnected when wanted, and counts as no failure.
    pub(crate) fn handle_disconnected(&mut self, peer: PeerIdx, failed: bool, now: Instant) {
        self.peers[peer].conn = Conn::Disconnected;
        self.peers[peer].have_pending = false;
        self.cancel_requests_of(peer);
        if failed {
            self.peer_failed(peer, Failure::Transient, now);
        }
    }

    /// Time passed: requests past their deadline are cancelled, counted as failures and their
    /// pieces handed out again; the roster looks at the places.
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        let late: Vec<ReqId> = self
            .requests
            .iter()
            .filter(|(_, r)| r.deadline.is_some_and(|d| d <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in late {
            self.handle_failure(id, Failure::Transient, now);
            self.queued.push_back(Command::Cancel(id));
        }
        if self.roster_due(now) {
            self.update_roster(now);
        }
    }

    /// Whether every chunk is on disk and a manifest was taken: the download is done.
    pub(crate) fn is_finished(&self) -> bool {
        self.is_complete() && self.roster.has_manifest()
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
        for d in self.requests.values().filter_map(|r| r.deadline) {
            next = next.min(d);
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
