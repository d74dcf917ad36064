//! Which chunk from which peer: the download scheduler, a pure state machine.
//!
//! No sockets, no clocks, no tasks. The vocabulary is quinn-proto's: the downloader's I/O layer
//! tells it what happened with the time (`handle_*`), wakes it at [`Scheduler::poll_timeout`]
//! ([`Scheduler::handle_timeout`]), and carries out what it says next
//! ([`Scheduler::poll_command`]): the commands its inputs queued (cancels) first, then new
//! connections and requests. Tests drive it directly.
//!
//! The rules:
//! - **Pull by throughput.** Each connected peer keeps up to its *window* of requests in flight
//!   and gets a new one as soon as one completes, so a faster peer serves more. The window is the
//!   peer's measured delivery rate x its best request latency (bandwidth x delay), in requests,
//!   plus slack; bounded per peer and in total (memory).
//! - **In order, or as a swarm.** While every source holds the whole snapshot, missing pieces
//!   are handed out lowest first (sequential disk writes, a loader keeps pace). Once a source
//!   holds only part of it (another downloader serving what it verified), the pieces of each
//!   source are picked as `picker.rs` says: the first few at random, then rarest first, and a
//!   complete source is spent on what no partial source with room holds. A partial source is
//!   asked what it holds when it connects and again, at most every `have_interval`, when it
//!   has room and nothing it is known to hold is open; a piece it says it does not hold after
//!   all is handed out again, and after `MAX_NOT_HELD` of those in a row it is dropped.
//! - **Busy is no failure.** A source that is busy uploading to others is asked again after a
//!   backoff, but never dropped for it; a download that waits for its turn is not stuck until
//!   `4 x no_progress_timeout`. One that has answered only "busy" for `BUSY_TURN` while
//!   other sources wait for a place gives its place up to them (`poll_busy_too_long`,
//!   `handle_retired`), so identities that only ever say "busy" cannot hold every
//!   place of a download.
//! - **Hedged tail.** Once nothing is missing but some pieces are still in flight, an idle peer
//!   also fetches a piece another peer holds, when it would finish sooner or the holder is late.
//!   The first answer wins; the other request is cancelled.
//! - **Deadlines.** Every request has a deadline from its start: the time its piece takes at
//!   `min_peer_rate`, and never less than `min_request_timeout`; once the peer's rate is known,
//!   at most `4 x` its expected time. Past it, the request is cancelled and its piece handed
//!   out again, so a peer that trickles bytes cannot hold a piece. (The I/O layer also abandons
//!   a request that receives nothing for `min_request_timeout`.)
//! - **Retries with backoff.** A failed request or connection puts the peer in exponential
//!   backoff (with jitter); after `max_peer_failures` failures in a row it is dropped. Failures
//!   at the same moment count once.
//! - **Bans.** A peer that sends a chunk that does not match the content root is banned for the
//!   download; everything it holds is handed out again.
//! - **Fails only when stuck.** The download fails when every peer is banned or dropped, or when
//!   no verified byte has arrived for `no_progress_timeout` (bytes that do not complete a
//!   checked request are not progress).
//! - **Verified prefix.** It tracks how far the chunks on disk reach without a gap from the
//!   start, for a loader that reads the archive while it arrives.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use rand::SeedableRng;
use rand_xoshiro::Xoshiro256PlusPlus;

use super::bits::Bits;
use super::picker::{Availability, Have, OpenSet, Pick};
use crate::transfer::rate::Ewma;

/// Index of a peer in the scheduler.
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
    pub(crate) jitter_seed: Option<u64>,
}

/// What the I/O layer should do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Command {
    /// Open a connection to the peer.
    Connect(PeerIdx),
    /// Fetch these chunks from the peer.
    Request {
        id: ReqId,
        peer: PeerIdx,
        chunks: Range<u64>,
    },
    /// Abandon this request (its piece is done elsewhere, it timed out, or its peer is banned).
    Cancel(ReqId),
    /// Ask the (partial) peer which pieces it holds; answer with [`Scheduler::handle_have`].
    AskHave(PeerIdx),
}

/// How a request or connection failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// Worth retrying after a backoff (connection lost, timeout, refused for load).
    Transient,
    /// The peer cannot serve this download (unknown snapshot, wrong token, wrong chunk size).
    Fatal,
    /// The peer is busy serving others: ask again after a backoff, but it counts as no failure.
    Busy,
    /// The peer (a partial holder) does not hold these chunks yet.
    NotHeld,
}

/// Why a download cannot go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stuck {
    /// Every peer is banned or dropped.
    NoPeers,
    /// Nothing completed for `no_progress_timeout`.
    NoProgress,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Conn {
    Disconnected,
    Connecting,
    Connected,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PeerFate {
    Alive,
    Banned,
    Dropped,
}

#[derive(Debug)]
struct Peer {
    conn: Conn,
    fate: PeerFate,
    inflight: usize,
    /// Delivery rate, bytes per second.
    rate: Ewma,
    /// Smallest request latency seen.
    min_latency: Option<Duration>,
    last_delivery: Option<Instant>,
    failures: u32,
    backoff_until: Option<Instant>,
    backoff: ExponentialBackoff,
    bytes: u64,
    /// What it holds.
    have: Have,
    /// A have request is under way.
    have_pending: bool,
    /// When it last said what it holds.
    have_at: Option<Instant>,
    /// Requests it answered "not held" in a row.
    not_held: u32,
    /// Since when it has answered only "busy" (cleared by a delivery).
    busy_since: Option<Instant>,
}

#[derive(Debug, Clone)]
struct Request {
    peer: PeerIdx,
    piece: usize,
    chunks: Range<u64>,
    started: Instant,
    deadline: Option<Instant>,
}

/// Per-peer figures for progress reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct PeerReport {
    pub(crate) bytes: u64,
    pub(crate) rate: f64,
    pub(crate) inflight: usize,
    pub(crate) fate: PeerFate,
    /// It holds part of the snapshot only (it downloads it too).
    pub(crate) partial: bool,
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
    /// While paused, peers are connected but no chunk is requested.
    paused: bool,
    /// Commands queued by inputs, handed out first.
    queued: VecDeque<Command>,
    /// Pieces neither done nor in flight.
    open: OpenSet,
    /// How many partial peers hold each piece.
    avail: Availability,
    /// Pieces picked at random so far (the first few are).
    random_picks: usize,
    /// The last time a peer said it is busy (waiting for a turn is not being stuck).
    last_busy: Option<Instant>,
    rng: Xoshiro256PlusPlus,
}

/// Pieces picked at random before rarest first.
const RANDOM_FIRST: usize = 4;

/// "Not held" answers in a row after which a partial peer is dropped.
pub(crate) const MAX_NOT_HELD: u32 = 8;

/// How soon a source that answered "busy" is asked again (at most `have_interval`).
pub(crate) const BUSY_RETRY: Duration = Duration::from_millis(250);

/// How long a source may answer only "busy" before it gives its place to a waiting spare:
/// three turns of a default upload slot.
pub(crate) const BUSY_TURN: Duration = Duration::from_secs(30);

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

    /// Adds a peer that holds the whole snapshot; it will be connected by a later
    /// [`Command::Connect`].
    pub(crate) fn add_peer(&mut self) -> PeerIdx {
        self.add(Have::All)
    }

    /// Adds a peer that holds part of the snapshot (it downloads it too): it is asked what it
    /// holds once connected.
    pub(crate) fn add_partial_peer(&mut self) -> PeerIdx {
        self.add(Have::Unknown)
    }

    fn add(&mut self, have: Have) -> PeerIdx {
        let mut builder = ExponentialBuilder::default()
            .with_min_delay(self.config.backoff_min)
            .with_max_delay(self.config.backoff_max)
            .with_factor(2.0)
            .without_max_times()
            .with_jitter();
        if let Some(seed) = self.config.jitter_seed {
            builder = builder.with_jitter_seed(seed.wrapping_add(self.peers.len() as u64));
        }
        self.peers.push(Peer {
            conn: Conn::Disconnected,
            fate: PeerFate::Alive,
            inflight: 0,
            rate: Ewma::new(RATE_ALPHA),
            min_latency: None,
            last_delivery: None,
            failures: 0,
            backoff_until: None,
            backoff: builder.build(),
            bytes: 0,
            have,
            have_pending: false,
            have_at: None,
            not_held: 0,
            busy_since: None,
        });
        self.peers.len() - 1
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

    /// Pauses or resumes requests (connections go on either way): a download requests nothing
    /// until its files are reserved.
    pub(crate) fn set_paused(&mut self, paused: bool) {
        self.paused = paused;
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

    /// Live peers that have answered only "busy" for `BUSY_TURN`: the driver gives their
    /// places to spares, when some wait (see the module docs).
    pub(crate) fn poll_busy_too_long(&self, now: Instant) -> Vec<PeerIdx> {
        (0..self.peers.len())
            .filter(|&i| {
                let p = &self.peers[i];
                p.fate == PeerFate::Alive
                    && p.busy_since
                        .is_some_and(|t| now.saturating_duration_since(t) >= BUSY_TURN)
            })
            .collect()
    }

    /// `peer` gives its place up (it may come back as another peer later): dropped from this
    /// download, its requests handed out again. No blame: it was only busy.
    pub(crate) fn handle_retired(&mut self, peer: PeerIdx) {
        self.cancel_requests_of(peer);
        let p = &mut self.peers[peer];
        p.fate = PeerFate::Dropped;
        let old = std::mem::replace(&mut p.have, Have::Unknown);
        self.avail.update(&old, &Have::Unknown);
    }

    pub(crate) fn peer_report(&self, peer: PeerIdx) -> PeerReport {
        let p = &self.peers[peer];
        PeerReport {
            bytes: p.bytes,
            rate: p.rate.get().unwrap_or(0.0),
            inflight: p.inflight,
            fate: p.fate,
            partial: p.have.is_partial(),
        }
    }

    fn window(&self, peer: &Peer) -> usize {
        let piece_bytes = (self.piece_chunks * self.chunk_bytes) as f64;
        let w = match (peer.rate.get(), peer.min_latency) {
            (Some(rate), Some(latency)) => {
                (rate * latency.as_secs_f64() / piece_bytes).ceil() as usize + 2
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
    /// (never less than the minimum timeout), and, once the peer's rate is known, at most four
    /// times what it is expected to take.
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
        p.fate == PeerFate::Alive
            && p.conn == Conn::Disconnected
            && p.backoff_until.is_none_or(|t| t <= now)
    }

    fn can_request(&self, p: &Peer, now: Instant) -> bool {
        p.fate == PeerFate::Alive
            && p.conn == Conn::Connected
            && p.backoff_until.is_none_or(|t| t <= now)
            && p.inflight < self.window(p)
    }

    /// The next thing to do, if any: what inputs queued first, then connections, requests
    /// and have requests. Call until `None`.
    pub(crate) fn poll_command(&mut self, now: Instant) -> Option<Command> {
        if let Some(c) = self.queued.pop_front() {
            return Some(c);
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
        // The peer with the most room in its window goes first.
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
                return Some(self.start(peer, piece, now));
            }
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

    /// Whether some source alive holds only part of the snapshot: pieces are then picked as a
    /// swarm does.
    fn is_crowd(&self) -> bool {
        self.peers
            .iter()
            .any(|p| p.fate == PeerFate::Alive && p.have.is_partial())
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
                // Partial peers that could take a piece now.
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

    /// A partial peer to ask what it holds: one never asked, or one with room that was asked
    /// over `have_interval` ago (its holdings grow as it downloads).
    fn next_have_ask(&mut self, now: Instant) -> Option<Command> {
        if self.is_complete() {
            return None;
        }
        let interval = self.config.have_interval;
        // In a crowd, complete peers are asked too: a seed that many ask offers each a few
        // pieces it has sent least (see the streamer's `slots.rs`).
        let crowd = self.is_crowd();
        let due = (0..self.peers.len()).find(|&i| {
            let p = &self.peers[i];
            p.fate == PeerFate::Alive
                && p.conn == Conn::Connected
                && (crowd || p.have.is_partial())
                && !p.have_pending
                && match p.have_at {
                    None => true,
                    Some(at) => at + interval <= now && p.inflight < self.window(p),
                }
        })?;
        self.peers[due].have_pending = true;
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
                started: now,
                deadline,
            },
        );
        self.holders.entry(piece).or_default().push(id);
        self.open.remove(piece);
        self.peers[peer].inflight += 1;
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
    /// ended). They count as on disk from now on, so that a request cut short keeps what it
    /// delivered and saved progress includes the chunks of requests under way. Returns the data
    /// bytes newly on disk.
    pub(crate) fn handle_written(&mut self, id: ReqId, upto: u64, now: Instant) -> u64 {
        let Some(req) = self.requests.get(&id) else {
            return 0;
        };
        let (peer, range) = (req.peer, req.chunks.start..upto.min(req.chunks.end));
        let added = self.mark(range);
        if added > 0 {
            self.last_progress = now;
            // Its turn has come: it delivers.
            self.peers[peer].busy_since = None;
        }
        added
    }

    /// Marks `chunks` on disk; returns the data bytes newly marked.
    fn mark(&mut self, chunks: Range<u64>) -> u64 {
        let mut added = 0;
        for c in chunks {
            if !self.chunk_done.get(c as usize) {
                self.chunk_done.set(c as usize);
                added += self.bytes_of(c..c + 1);
            }
        }
        self.done_bytes += added;
        added
    }

    /// Request `id` delivered its chunks, all verified and written. Duplicates of its piece
    /// are cancelled.
    pub(crate) fn handle_success(&mut self, id: ReqId, now: Instant) {
        let Some(req) = self.finish_request(id) else {
            return;
        };
        let bytes = self.bytes_of(req.chunks.clone());
        if self.mark(req.chunks.clone()) > 0 {
            self.last_progress = now;
        }
        let peer = &mut self.peers[req.peer];
        let since = peer
            .last_delivery
            .map_or(req.started, |t| t.max(req.started));
        let interval = now.saturating_duration_since(since).as_secs_f64().max(1e-6);
        peer.rate.update(bytes as f64 / interval);
        let latency = now.saturating_duration_since(req.started);
        peer.min_latency = Some(peer.min_latency.map_or(latency, |m| m.min(latency)));
        peer.last_delivery = Some(now);
        peer.bytes += bytes;
        peer.failures = 0;
        peer.not_held = 0;
        peer.busy_since = None;
        peer.backoff_until = None;
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
    }

    /// Ends request `id` and tells the I/O layer to abandon it.
    fn cancel(&mut self, id: ReqId) {
        if self.finish_request(id).is_some() {
            self.queued.push_back(Command::Cancel(id));
        }
    }

    /// Request `id` failed. The piece is handed out again. A partial peer that does not hold
    /// it is no longer counted on for it (and is asked again what it holds).
    pub(crate) fn handle_failure(&mut self, id: ReqId, failure: Failure, now: Instant) {
        let Some(req) = self.finish_request(id) else {
            return;
        };
        if failure == Failure::NotHeld {
            self.not_held(req.peer, req.piece);
        } else {
            self.peer_failed(req.peer, failure, now);
        }
    }

    fn not_held(&mut self, peer: PeerIdx, piece: usize) {
        let p = &mut self.peers[peer];
        p.not_held += 1;
        if p.not_held >= MAX_NOT_HELD {
            p.fate = PeerFate::Dropped;
            let old = std::mem::replace(&mut p.have, Have::Unknown);
            self.avail.update(&old, &Have::Unknown);
            self.cancel_requests_of(peer);
            return;
        }
        match &mut p.have {
            Have::Some(bits) => {
                let old = Have::Some(bits.clone());
                bits.clear(piece);
                let new = p.have.clone();
                self.avail.update(&old, &new);
            }
            // A peer that holds everything says it does not: it is a partial peer after all.
            Have::All => {
                p.have = Have::Unknown;
                p.have_at = None;
            }
            Have::Unknown => {}
        }
    }

    /// `peer` said what it holds (`Have::All`: everything), or could not say, and how that
    /// failed (a peer that no longer serves the snapshot is dropped, one that may be asked
    /// again backs off). Pieces are counted for rarity.
    pub(crate) fn handle_have(&mut self, peer: PeerIdx, have: Result<Have, Failure>, now: Instant) {
        let p = &mut self.peers[peer];
        p.have_pending = false;
        p.have_at = Some(now);
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
        if p.fate != PeerFate::Alive {
            return;
        }
        let old = std::mem::replace(&mut p.have, have);
        let new = p.have.clone();
        self.avail.update(&old, &new);
    }

    /// Request `id` delivered a chunk that does not match the content root: its peer is banned
    /// and everything it holds is cancelled and handed out again.
    pub(crate) fn handle_corrupt(&mut self, id: ReqId) {
        if let Some(req) = self.finish_request(id) {
            let p = &mut self.peers[req.peer];
            p.fate = PeerFate::Banned;
            let old = std::mem::replace(&mut p.have, Have::Unknown);
            self.avail.update(&old, &Have::Unknown);
            self.cancel_requests_of(req.peer);
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
        // A late report of a peer already banned, dropped or retired changes nothing.
        if p.fate != PeerFate::Alive {
            return;
        }
        match failure {
            Failure::Fatal => {
                p.fate = PeerFate::Dropped;
                let old = std::mem::replace(&mut p.have, Have::Unknown);
                self.avail.update(&old, &Have::Unknown);
                return;
            }
            Failure::Busy => {
                // Its slots turn over within seconds, and turns go in the order peers asked:
                // asked again soon.
                self.last_busy = Some(now);
                p.busy_since.get_or_insert(now);
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
            p.fate = PeerFate::Dropped;
            let old = std::mem::replace(&mut p.have, Have::Unknown);
            self.avail.update(&old, &Have::Unknown);
            return;
        }
        let delay = p.backoff.next().unwrap_or(self.config.backoff_max);
        p.backoff_until = Some(now + delay);
    }

    /// The connection to `peer` is up.
    pub(crate) fn handle_connected(&mut self, peer: PeerIdx) {
        if self.peers[peer].conn == Conn::Connecting {
            self.peers[peer].conn = Conn::Connected;
        }
    }

    /// Connecting to `peer` failed.
    pub(crate) fn handle_connect_failed(&mut self, peer: PeerIdx, failure: Failure, now: Instant) {
        self.peers[peer].conn = Conn::Disconnected;
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
        if failed && self.peers[peer].fate == PeerFate::Alive {
            self.peer_failed(peer, Failure::Transient, now);
        }
    }

    /// Time passed: requests past their deadline are cancelled, counted as failures and their
    /// pieces handed out again.
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
    }

    /// Whether the download cannot go on: no peer left (or none ever given, for
    /// `no_progress_timeout`), or nothing arrived for too long. (A complete download can still
    /// be stuck without peers: its manifest comes from one.)
    pub(crate) fn stuck(&self, now: Instant) -> Option<Stuck> {
        // A download given no source yet waits for one (added right after it starts, say) as
        // long as it would wait for progress.
        if self.peers.is_empty() {
            let quiet = now.saturating_duration_since(self.last_progress);
            return (quiet >= self.config.no_progress_timeout).then_some(Stuck::NoPeers);
        }
        if self.peers.iter().all(|p| p.fate != PeerFate::Alive) {
            return Some(Stuck::NoPeers);
        }
        if self.is_complete() {
            return None;
        }
        let limit = self.config.no_progress_timeout;
        let quiet = now.saturating_duration_since(self.last_progress);
        // Peers that said lately they are busy serving others: this download waits its turn,
        // for a while.
        let waiting = self
            .last_busy
            .is_some_and(|t| t > self.last_progress && now.saturating_duration_since(t) < limit);
        if quiet >= limit && !(waiting && quiet < limit * 4) {
            return Some(Stuck::NoProgress);
        }
        None
    }

    /// When to call [`Scheduler::handle_timeout`] next: a deadline, a backoff ending, a hedge
    /// becoming worth it, the no-progress limit.
    pub(crate) fn poll_timeout(&self, now: Instant) -> Instant {
        let mut next = self.last_progress + self.config.no_progress_timeout;
        if next <= now {
            // Waiting for a busy peer's turn: look again at the end of the wait.
            next = now.max(self.last_progress + self.config.no_progress_timeout * 4);
        }
        for d in self.requests.values().filter_map(|r| r.deadline) {
            next = next.min(d);
        }
        for p in &self.peers {
            if p.fate == PeerFate::Alive
                && let Some(t) = p.backoff_until
                && t > now
            {
                next = next.min(t);
            }
        }
        if !self.is_complete() {
            let crowd = self.is_crowd();
            for p in &self.peers {
                if p.fate == PeerFate::Alive
                    && p.conn == Conn::Connected
                    && (crowd || p.have.is_partial())
                    && let Some(at) = p.have_at
                    && at + self.config.have_interval > now
                {
                    next = next.min(at + self.config.have_interval);
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

#[cfg(test)]
mod tests {
    use super::*;

    const CHUNK: u64 = 16 * 1024;

    fn config() -> SchedulerConfig {
        SchedulerConfig {
            request_chunks: 4,
            initial_window: 2,
            max_window: 8,
            max_inflight: 64,
            min_request_timeout: Duration::from_secs(2),
            min_peer_rate: 64 * 1024,
            hedge: true,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
            max_peer_failures: 3,
            no_progress_timeout: Duration::from_secs(30),
            have_interval: Duration::from_secs(1),
            jitter_seed: Some(1),
        }
    }

    /// What the inputs since the last call queued (cancels), drained.
    fn queued(s: &mut Scheduler) -> Vec<Command> {
        s.queued.drain(..).collect()
    }

    fn success(s: &mut Scheduler, id: ReqId, now: Instant) -> Vec<Command> {
        s.handle_success(id, now);
        queued(s)
    }

    fn corrupt(s: &mut Scheduler, id: ReqId) -> Vec<Command> {
        s.handle_corrupt(id);
        queued(s)
    }

    fn disconnected(s: &mut Scheduler, peer: PeerIdx, now: Instant) -> Vec<Command> {
        s.handle_disconnected(peer, true, now);
        queued(s)
    }

    fn timeouts(s: &mut Scheduler, now: Instant) -> Vec<Command> {
        s.handle_timeout(now);
        queued(s)
    }

    fn sched(chunks: u64) -> (Scheduler, Instant) {
        let now = Instant::now();
        (
            Scheduler::new(config(), chunks * CHUNK, CHUNK, chunks, &Bits::new(0), now),
            now,
        )
    }

    fn drain(s: &mut Scheduler, now: Instant) -> Vec<Command> {
        std::iter::from_fn(|| s.poll_command(now)).collect()
    }

    fn requests(actions: &[Command]) -> Vec<(ReqId, PeerIdx, Range<u64>)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Command::Request { id, peer, chunks } => Some((*id, *peer, chunks.clone())),
                _ => None,
            })
            .collect()
    }

    fn connect_all(s: &mut Scheduler, n: usize, now: Instant) {
        for _ in 0..n {
            s.add_peer();
        }
        let actions = drain(s, now);
        for a in &actions {
            if let Command::Connect(p) = a {
                s.handle_connected(*p);
            }
        }
    }

    #[test]
    fn connects_then_requests_in_order_within_the_window() {
        let (mut s, now) = sched(40);
        s.add_peer();
        assert_eq!(s.poll_command(now), Some(Command::Connect(0)));
        assert_eq!(s.poll_command(now), None, "nothing until connected");
        s.handle_connected(0);
        let reqs = requests(&drain(&mut s, now));
        assert_eq!(reqs.len(), 2, "initial window");
        assert_eq!(reqs[0].2, 0..4);
        assert_eq!(reqs[1].2, 4..8);
    }

    #[test]
    fn a_request_cut_short_keeps_the_chunks_it_delivered() {
        let (mut s, now) = sched(8);
        connect_all(&mut s, 1, now);
        let reqs = requests(&drain(&mut s, now));
        let (id, _, chunks) = reqs[0].clone();
        assert_eq!(chunks, 0..4);
        // Two chunks verified and written, then the connection drops.
        assert_eq!(s.handle_written(id, 2, now), 2 * CHUNK);
        assert_eq!(s.handle_written(id, 2, now), 0, "counted once");
        assert_eq!(s.verified_prefix(), 2 * CHUNK);
        s.handle_failure(id, Failure::Transient, now);
        assert_eq!(s.chunk_done().ones(), 2, "kept for resume");
        // Only the rest of the piece is asked for again.
        let later = now + Duration::from_secs(5);
        let again = requests(&drain(&mut s, later));
        assert!(again.iter().any(|r| r.2 == (2..4)), "{again:?}");
        assert!(!again.iter().any(|r| r.2.start < 2));
        // A request no longer in flight credits nothing.
        assert_eq!(s.handle_written(id, 4, now), 0);
    }

    #[test]
    fn completes_and_reports_bytes() {
        let (mut s, mut now) = sched(10);
        connect_all(&mut s, 1, now);
        while !s.is_complete() {
            let reqs = requests(&drain(&mut s, now));
            assert!(!reqs.is_empty());
            now += Duration::from_millis(10);
            for (id, ..) in reqs {
                assert!(success(&mut s, id, now).is_empty());
            }
        }
        assert_eq!(s.done_bytes(), 10 * CHUNK);
        assert_eq!(s.peer_report(0).bytes, 10 * CHUNK);
        assert_eq!(s.chunk_done().ones(), 10);
        assert_eq!(s.stuck(now), None);
    }

    #[test]
    fn a_faster_peer_gets_more_pieces() {
        let (mut s, start) = sched(400);
        connect_all(&mut s, 2, start);
        // Peer 0 answers in 1 ms, peer 1 in 10 ms; simulate in 1 ms steps.
        let mut inflight: Vec<(ReqId, PeerIdx, Instant)> = Vec::new();
        let mut now = start;
        while !s.is_complete() {
            for (id, peer, _) in requests(&drain(&mut s, now)) {
                inflight.push((id, peer, now));
            }
            now += Duration::from_millis(1);
            let (due, rest): (Vec<_>, Vec<_>) = inflight.into_iter().partition(|(_, p, t)| {
                let latency = if *p == 0 { 1 } else { 10 };
                now.duration_since(*t) >= Duration::from_millis(latency)
            });
            inflight = rest;
            for (id, ..) in due {
                for c in success(&mut s, id, now) {
                    if let Command::Cancel(c) = c {
                        inflight.retain(|(i, ..)| *i != c);
                    }
                }
            }
        }
        let fast = s.peer_report(0).bytes;
        let slow = s.peer_report(1).bytes;
        assert!(slow > 0, "both serve");
        assert!(fast > 3 * slow, "fast {fast} slow {slow}");
        assert!(s.peer_report(0).rate > s.peer_report(1).rate);
    }

    #[test]
    fn the_window_follows_bandwidth_times_delay() {
        let (mut s, mut now) = sched(4000);
        connect_all(&mut s, 1, now);
        // A peer delivering 64 KiB pieces every 50 ms with 200 ms latency: ~1.3 MB/s x 0.2 s,
        // about 4 pieces in flight to fill the pipe.
        let mut inflight = std::collections::VecDeque::new();
        for _ in 0..200 {
            for (id, ..) in requests(&drain(&mut s, now)) {
                inflight.push_back((id, now));
            }
            now += Duration::from_millis(50);
            if let Some((id, t)) = inflight.front().copied()
                && now.duration_since(t) >= Duration::from_millis(200)
            {
                inflight.pop_front();
                success(&mut s, id, now);
            }
        }
        let w = s.window(&s.peers[0]);
        assert!((4..=8).contains(&w), "window {w}");
        assert!(s.peer_report(0).inflight >= 4);
    }

    #[test]
    fn total_inflight_is_bounded() {
        let now = Instant::now();
        let mut s = Scheduler::new(
            SchedulerConfig {
                max_inflight: 3,
                ..config()
            },
            1000 * CHUNK,
            CHUNK,
            1000,
            &Bits::new(0),
            now,
        );
        connect_all(&mut s, 4, now);
        assert_eq!(requests(&drain(&mut s, now)).len(), 3);
    }

    #[test]
    fn a_failed_request_is_retried_elsewhere_and_the_peer_backs_off() {
        let (mut s, now) = sched(8);
        connect_all(&mut s, 2, now);
        let reqs = requests(&drain(&mut s, now));
        let (id, peer, chunks) = reqs.iter().find(|r| r.1 == 0).cloned().unwrap();
        s.handle_failure(id, Failure::Transient, now);
        let again = requests(&drain(&mut s, now));
        assert_eq!(again.len(), 1, "{again:?}");
        assert_eq!(again[0].2, chunks, "same chunks handed out again");
        assert_ne!(
            again[0].1, peer,
            "to the other peer: the failed one backs off"
        );
        // After its backoff the failed peer is used again.
        let later = now + Duration::from_secs(3);
        assert!(s.poll_timeout(now) <= now + Duration::from_millis(200));
        let others: Vec<_> = reqs.iter().filter(|r| r.1 == 0 && r.0 != id).collect();
        for r in others {
            success(&mut s, r.0, now);
        }
        let _ = drain(&mut s, later);
        assert!(s.peer_report(0).inflight > 0 || s.is_complete());
    }

    #[test]
    fn repeated_failures_drop_a_peer_and_simultaneous_ones_count_once() {
        let (mut s, mut now) = sched(100);
        connect_all(&mut s, 1, now);
        // Two requests failing at once count as one failure.
        let reqs = requests(&drain(&mut s, now));
        for (id, ..) in &reqs {
            s.handle_failure(*id, Failure::Transient, now);
        }
        assert_eq!(s.peers[0].failures, 1);
        for _ in 0..2 {
            now += Duration::from_secs(5);
            let reqs = requests(&drain(&mut s, now));
            assert!(!reqs.is_empty());
            s.handle_failure(reqs[0].0, Failure::Transient, now);
        }
        assert_eq!(s.peer_report(0).fate, PeerFate::Dropped);
        assert_eq!(s.stuck(now), Some(Stuck::NoPeers));
    }

    #[test]
    fn a_fatal_failure_drops_the_peer_at_once() {
        let (mut s, now) = sched(8);
        s.add_peer();
        assert_eq!(s.poll_command(now), Some(Command::Connect(0)));
        s.handle_connect_failed(0, Failure::Fatal, now);
        assert_eq!(s.poll_command(now), None);
        assert_eq!(s.stuck(now), Some(Stuck::NoPeers));
    }

    #[test]
    fn a_corrupt_chunk_bans_the_peer_and_reassigns_all_it_held() {
        let (mut s, now) = sched(40);
        connect_all(&mut s, 2, now);
        let reqs = requests(&drain(&mut s, now));
        let bad: Vec<_> = reqs.iter().filter(|r| r.1 == 1).cloned().collect();
        assert!(bad.len() >= 2);
        let cancels = corrupt(&mut s, bad[0].0);
        assert_eq!(
            cancels.len(),
            bad.len() - 1,
            "its other requests are cancelled"
        );
        assert_eq!(s.peer_report(1).fate, PeerFate::Banned);
        assert_eq!(s.peer_report(1).inflight, 0);
        // Everything goes to peer 0 from now on, starting with what peer 1 held.
        let mut now = now;
        for r in reqs.iter().filter(|r| r.1 == 0) {
            success(&mut s, r.0, now);
        }
        let mut first = true;
        while !s.is_complete() {
            let reqs = requests(&drain(&mut s, now));
            if first {
                assert_eq!(reqs[0].2, bad[0].2, "the banned peer's piece comes first");
                first = false;
            }
            assert!(reqs.iter().all(|r| r.1 == 0));
            now += Duration::from_millis(5);
            for (id, ..) in reqs {
                success(&mut s, id, now);
            }
        }
    }

    #[test]
    fn a_lost_connection_hands_out_its_pieces_and_reconnects_after_backoff() {
        let (mut s, now) = sched(40);
        connect_all(&mut s, 2, now);
        let reqs = requests(&drain(&mut s, now));
        let held: Vec<_> = reqs.iter().filter(|r| r.1 == 0).cloned().collect();
        let cancels = disconnected(&mut s, 0, now);
        assert_eq!(cancels.len(), held.len());
        // Peer 1 gets them (within its window), peer 0 does not reconnect yet.
        let next = drain(&mut s, now + Duration::from_millis(1));
        assert!(!next.contains(&Command::Connect(0)));
        let reqs1 = requests(&next);
        // Peer 1's window is full until it completes something.
        for (id, ..) in requests(&drain(&mut s, now)).into_iter().chain(reqs1) {
            success(&mut s, id, now + Duration::from_millis(2));
        }
        for r in reqs.iter().filter(|r| r.1 == 1) {
            success(&mut s, r.0, now + Duration::from_millis(2));
        }
        let after = drain(&mut s, now + Duration::from_secs(3));
        assert!(after.contains(&Command::Connect(0)), "{after:?}");
        let reassigned = requests(&after);
        assert!(
            reassigned.iter().any(|r| r.2 == held[0].2)
                || s.chunk_done().get(held[0].2.start as usize)
        );
    }

    #[test]
    fn a_stalled_request_times_out_and_is_handed_out_again() {
        let (mut s, now) = sched(40);
        connect_all(&mut s, 2, now);
        // Both peers answer at first, so their rates are known...
        let mut t = now;
        for r in requests(&drain(&mut s, now)) {
            t += Duration::from_millis(1);
            success(&mut s, r.0, t);
        }
        // ...then peer 1 stops answering; peer 0 goes on.
        let reqs = requests(&drain(&mut s, t));
        let stalled: Vec<_> = reqs.iter().filter(|r| r.1 == 1).cloned().collect();
        assert!(!stalled.is_empty());
        for r in reqs.iter().filter(|r| r.1 == 0) {
            t += Duration::from_millis(1);
            success(&mut s, r.0, t);
        }
        let deadline = s.poll_timeout(t);
        assert!(deadline <= t + Duration::from_secs(2), "{:?}", deadline - t);
        let cancels = timeouts(&mut s, t + Duration::from_secs(2));
        assert_eq!(cancels.len(), stalled.len());
        // The stalled pieces go to the peer that answers.
        let mut t = t + Duration::from_secs(2);
        while !s.is_complete() {
            let reqs = requests(&drain(&mut s, t));
            assert!(reqs.iter().all(|r| r.1 == 0), "{reqs:?}");
            t += Duration::from_millis(1);
            for (id, ..) in reqs {
                success(&mut s, id, t);
            }
        }
    }

    #[test]
    fn the_tail_is_hedged_and_the_loser_cancelled() {
        let (mut s, now) = sched(8);
        connect_all(&mut s, 2, now);
        // Teach the scheduler that peer 0 is fast: complete its requests quickly.
        let reqs = requests(&drain(&mut s, now));
        let slow_piece = reqs.iter().find(|r| r.1 == 1).cloned().unwrap();
        let mut t = now;
        for r in reqs.iter().filter(|r| r.1 == 0) {
            t += Duration::from_millis(1);
            success(&mut s, r.0, t);
        }
        // Nothing is missing any more; peer 1 still holds its pieces. Peer 0 hedges.
        let hedges = requests(&drain(&mut s, t + Duration::from_millis(600)));
        assert!(!hedges.is_empty(), "no hedge");
        assert!(hedges.iter().all(|h| h.1 == 0));
        let hedge = hedges
            .iter()
            .find(|h| h.2 == slow_piece.2)
            .cloned()
            .unwrap();
        // The hedge wins; the slow request is cancelled.
        let before = s.peer_report(1).inflight;
        let cancels = success(&mut s, hedge.0, t + Duration::from_millis(601));
        assert_eq!(cancels, vec![Command::Cancel(slow_piece.0)]);
        assert_eq!(s.peer_report(1).inflight, before - 1);
        assert!(s.chunk_done().get(slow_piece.2.start as usize));
    }

    #[test]
    fn no_progress_for_too_long_is_stuck_and_resume_skips_done_chunks() {
        let now = Instant::now();
        let mut done = Bits::new(12);
        for i in 0..8 {
            done.set(i);
        }
        done.set(9);
        let mut s = Scheduler::new(config(), 12 * CHUNK, CHUNK, 12, &done, now);
        assert_eq!(s.done_bytes(), 9 * CHUNK, "every chunk on disk counts");
        connect_all(&mut s, 1, now);
        let reqs = requests(&drain(&mut s, now));
        assert_eq!(reqs.len(), 1, "only the last piece is missing");
        assert_eq!(reqs[0].2, 8..12, "from its first to its last missing chunk");
        assert_eq!(s.stuck(now + Duration::from_secs(29)), None);
        assert_eq!(
            s.stuck(now + Duration::from_secs(30)),
            Some(Stuck::NoProgress)
        );
    }

    #[test]
    fn a_peer_that_trickles_loses_its_piece_at_the_minimum_rate_deadline() {
        // Pieces of 64 chunks of 16 KiB (1 MiB) at 64 KiB/s: 16 s, over the 2 s floor.
        let now = Instant::now();
        let cfg = SchedulerConfig {
            request_chunks: 64,
            ..config()
        };
        let mut s = Scheduler::new(cfg, 256 * CHUNK, CHUNK, 256, &Bits::new(0), now);
        connect_all(&mut s, 2, now);
        let first = requests(&drain(&mut s, now));
        assert!(!first.is_empty());
        // Nothing completes: the deadline of a peer whose rate is unknown is the min-rate one.
        assert_eq!(s.poll_timeout(now), now + Duration::from_secs(16));
        assert!(timeouts(&mut s, now + Duration::from_secs(15)).is_empty());
        let cancels = timeouts(&mut s, now + Duration::from_secs(16));
        assert_eq!(cancels.len(), first.len());
        // And nothing verified arrived meanwhile, whatever trickled in: no progress.
        assert_eq!(
            s.stuck(now + Duration::from_secs(30)),
            Some(Stuck::NoProgress)
        );
    }

    #[test]
    fn the_verified_prefix_reaches_the_first_gap() {
        let (mut s, now) = sched(12);
        assert_eq!(s.verified_prefix(), 0);
        connect_all(&mut s, 1, now);
        let reqs = requests(&drain(&mut s, now));
        // Complete the second piece first: the prefix does not move past the gap.
        success(&mut s, reqs[1].0, now);
        assert_eq!(s.verified_prefix(), 0);
        success(&mut s, reqs[0].0, now);
        assert_eq!(s.verified_prefix(), 8 * CHUNK);
    }

    fn pieces(n: usize, held: impl Fn(usize) -> bool) -> Have {
        let mut b = Bits::new(n);
        (0..n).filter(|p| held(*p)).for_each(|p| b.set(p));
        Have::Some(b)
    }

    fn has_asks(actions: &[Command]) -> Vec<PeerIdx> {
        actions
            .iter()
            .filter_map(|a| match a {
                Command::AskHave(p) => Some(*p),
                _ => None,
            })
            .collect()
    }

    /// A scheduler with `complete` seeds and `partial` partial peers, all connected.
    fn crowd(chunks: u64, complete: usize, partial: usize) -> (Scheduler, Instant, Vec<Command>) {
        let (mut s, now) = sched(chunks);
        for _ in 0..complete {
            s.add_peer();
        }
        for _ in 0..partial {
            s.add_partial_peer();
        }
        let mut first = Vec::new();
        for a in drain(&mut s, now) {
            match a {
                Command::Connect(p) => s.handle_connected(p),
                other => first.push(other),
            }
        }
        first.extend(drain(&mut s, now));
        (s, now, first)
    }

    #[test]
    fn a_partial_peer_is_asked_what_it_holds_and_asked_only_for_that() {
        let (mut s, now, first) = crowd(64, 0, 1);
        assert_eq!(has_asks(&first), vec![0]);
        assert!(requests(&first).is_empty(), "nothing asked before it says");
        // It holds pieces 3 and 9 of 16.
        s.handle_have(0, Ok(pieces(16, |p| p == 3 || p == 9)), now);
        let reqs = requests(&drain(&mut s, now));
        let mut got: Vec<u64> = reqs.iter().map(|r| r.2.start / 4).collect();
        got.sort();
        assert_eq!(got, vec![3, 9]);
        assert!(reqs.iter().all(|r| r.1 == 0));
    }

    #[test]
    fn a_seed_in_a_crowd_is_spent_on_what_no_partial_peer_with_room_holds() {
        let (mut s, now, first) = crowd(64, 1, 2);
        let seed_first: Vec<ReqId> = requests(&first).iter().map(|r| r.0).collect();
        assert_eq!(seed_first.len(), 2, "the seed starts at once");
        // Peer 2 holds pieces 8 to 15 and fills its window; peer 1 holds 0 to 7, with room.
        s.handle_have(2, Ok(pieces(16, |p| p >= 8)), now);
        let to_2 = requests(&drain(&mut s, now));
        assert!(to_2.iter().all(|r| r.1 == 2 && r.2.start / 4 >= 8));
        s.handle_have(1, Ok(pieces(16, |p| p < 8)), now);
        for id in seed_first {
            s.handle_success(id, now);
        }
        // Every piece is as rare as any other: the seed still takes none peer 1 could give.
        let reqs = requests(&drain(&mut s, now));
        assert!(
            reqs.iter().any(|r| r.1 == 0) && reqs.iter().any(|r| r.1 == 1),
            "{reqs:?}"
        );
        for (_, peer, chunks) in &reqs {
            let piece = chunks.start / 4;
            match peer {
                0 => assert!(
                    piece >= 8,
                    "the seed is asked for {piece}, which peer 1 holds"
                ),
                _ => assert!(piece < 8),
            }
        }
    }

    #[test]
    fn the_first_pieces_of_a_crowd_are_random_then_the_rarest_go_first() {
        // Two runs with different seeds start on different pieces: a crowd starting together
        // holds different pieces at once.
        let firsts: Vec<Vec<u64>> = [1, 2]
            .iter()
            .map(|seed| {
                let mut cfg = config();
                cfg.jitter_seed = Some(*seed);
                let now = Instant::now();
                let mut s = Scheduler::new(cfg, 256 * CHUNK, CHUNK, 256, &Bits::new(0), now);
                s.add_peer();
                s.add_partial_peer();
                for a in drain(&mut s, now) {
                    if let Command::Connect(p) = a {
                        s.handle_connected(p);
                    }
                }
                s.handle_have(1, Ok(pieces(64, |_| false)), now);
                requests(&drain(&mut s, now))
                    .iter()
                    .map(|r| r.2.start / 4)
                    .collect()
            })
            .collect();
        assert_eq!(firsts[0].len(), 2);
        assert_ne!(firsts[0], firsts[1]);
        assert_ne!(firsts[0], vec![0, 1], "not in order");
        // Then rarest first: piece 5 is held by one partial peer, the rest by two.
        let (mut s, now, _) = crowd(64, 0, 2);
        s.random_picks = RANDOM_FIRST;
        s.handle_have(0, Ok(pieces(16, |_| true)), now);
        s.handle_have(1, Ok(pieces(16, |p| p != 5)), now);
        let reqs = requests(&drain(&mut s, now));
        let from_0: Vec<u64> = reqs
            .iter()
            .filter(|r| r.1 == 0)
            .map(|r| r.2.start / 4)
            .collect();
        assert!(from_0.contains(&5), "{from_0:?}");
    }

    #[test]
    fn a_piece_not_held_goes_elsewhere_and_a_peer_that_keeps_saying_so_is_dropped() {
        let (mut s, now, first) = crowd(64, 1, 1);
        s.handle_have(1, Ok(pieces(16, |_| true)), now);
        let reqs = requests(&drain(&mut s, now));
        let (id, _, chunks) = reqs.iter().find(|r| r.1 == 1).cloned().unwrap();
        let reqs = requests(&first);
        s.handle_failure(id, Failure::NotHeld, now);
        // No backoff, no failure counted: the peer is asked for something else at once, and
        // the piece goes to the seed once it has room (now the rarest piece).
        let again = requests(&drain(&mut s, now));
        assert!(again.iter().all(|r| r.2 != chunks) && again.iter().any(|r| r.1 == 1));
        assert_eq!(s.peer_report(1).fate, PeerFate::Alive);
        assert!(!s.peers[1].have.has(chunks.start as usize / 4));
        for (id, ..) in reqs.iter().filter(|r| r.1 == 0) {
            s.handle_success(*id, now);
        }
        let seed = requests(&drain(&mut s, now));
        assert!(seed.iter().any(|r| r.2 == chunks && r.1 == 0), "{seed:?}");
        // A peer that says "not held" to everything it is asked is dropped, not banned.
        for _ in 0..MAX_NOT_HELD {
            let mine: Vec<ReqId> = s
                .requests
                .iter()
                .filter(|(_, r)| r.peer == 1)
                .map(|(id, _)| *id)
                .collect();
            for id in mine {
                s.handle_failure(id, Failure::NotHeld, now);
            }
            let _ = drain(&mut s, now);
        }
        assert_eq!(s.peer_report(1).fate, PeerFate::Dropped);
        assert_eq!(
            s.avail.count(0),
            0,
            "a dropped peer's pieces no longer count"
        );
    }

    #[test]
    fn busy_backs_off_but_never_drops_and_waiting_for_a_turn_is_not_being_stuck() {
        let (mut s, now) = sched(16);
        connect_all(&mut s, 1, now);
        let mut t = now;
        for _ in 0..3 * config().max_peer_failures {
            for (id, ..) in requests(&drain(&mut s, t)) {
                s.handle_failure(id, Failure::Busy, t);
            }
            assert_eq!(s.peer_report(0).fate, PeerFate::Alive);
            t = s.poll_timeout(t).max(t + Duration::from_millis(1));
            s.handle_timeout(t);
        }
        // Past the no-progress limit while the peer keeps saying it is busy: not stuck yet.
        let later = now + config().no_progress_timeout + Duration::from_secs(1);
        for (id, ..) in requests(&drain(&mut s, later)) {
            s.handle_failure(id, Failure::Busy, later);
        }
        assert_eq!(s.stuck(later), None);
        // It cannot hold the download forever.
        assert_eq!(
            s.stuck(now + config().no_progress_timeout * 4),
            Some(Stuck::NoProgress)
        );
    }

    #[test]
    fn a_peer_only_ever_busy_gives_its_place_up_and_one_that_delivers_keeps_it() {
        let (mut s, now) = sched(16);
        connect_all(&mut s, 2, now);
        // Peer 0 only ever says it is busy; peer 1 is busy too, then delivers.
        let mut t = now;
        let mut delivered = false;
        while t < now + BUSY_TURN + Duration::from_secs(1) {
            for (id, peer, ..) in requests(&drain(&mut s, t)) {
                if peer == 1 && t >= now + BUSY_TURN / 2 && !delivered {
                    success(&mut s, id, t);
                    delivered = true;
                } else {
                    s.handle_failure(id, Failure::Busy, t);
                }
            }
            assert!(
                t >= now + BUSY_TURN || s.poll_busy_too_long(t).is_empty(),
                "not before its turn has passed"
            );
            t = s.poll_timeout(t).max(t + Duration::from_millis(100));
            s.handle_timeout(t);
        }
        assert!(delivered);
        assert_eq!(s.poll_busy_too_long(t), vec![0]);
        s.handle_retired(0);
        assert_eq!(s.peer_report(0).fate, PeerFate::Dropped);
        assert!(s.poll_busy_too_long(t).is_empty());
        assert!(
            requests(&drain(&mut s, t))
                .iter()
                .all(|(_, peer, ..)| *peer == 1),
            "its work goes to the others"
        );
    }

    #[test]
    fn a_partial_peer_with_room_and_nothing_wanted_is_asked_again_after_the_interval() {
        let (mut s, now, _) = crowd(64, 0, 1);
        s.handle_have(0, Ok(pieces(16, |p| p == 0)), now);
        let reqs = requests(&drain(&mut s, now));
        assert_eq!(reqs.len(), 1);
        success(&mut s, reqs[0].0, now);
        // Nothing more it is known to hold: it is asked again, once the interval has passed.
        assert!(has_asks(&drain(&mut s, now)).is_empty());
        let wake = s.poll_timeout(now);
        assert_eq!(wake, now + config().have_interval);
        assert_eq!(has_asks(&drain(&mut s, wake)), vec![0]);
        assert!(has_asks(&drain(&mut s, wake)).is_empty(), "one at a time");
        // It now holds everything: a complete peer from then on.
        s.handle_have(0, Ok(Have::All), wake);
        assert!(!s.peer_report(0).partial);
        assert_eq!(requests(&drain(&mut s, wake)).len(), 2);
    }
}
