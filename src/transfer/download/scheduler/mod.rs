//! Which chunk from which source, and which sources hold the download's places: the download
//! scheduler, a pure state machine.
//!
//! No sockets, no clocks, no tasks. The vocabulary is quinn-proto's: the downloader's I/O layer
//! tells it what happened with the time (`handle_*`), wakes it at [`Scheduler::poll_timeout`]
//! ([`Scheduler::handle_timeout`]), and carries out what it says next
//! ([`Scheduler::poll_command`]): the commands its inputs queued (cancels, closes) first, then
//! new connections and requests. Tests drive it directly. Who holds a place is `roster.rs`;
//! what the I/O layer reports is handled in `inputs.rs`, the chunks asked of whom are picked in
//! `requests.rs`, and windows and deadlines are `timing.rs`.
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
//! - **Quiet sources.** A source with requests in flight that delivers no verified byte for
//!   a quarter of `min_request_timeout` (at least eight round trips, and two chunks' time at
//!   `min_peer_rate`) has gone quiet (it vanished without closing, its link died), unless
//!   every source with requests in flight is as silent (then the cause is more likely here):
//!   its requests are handed to others at once, and it is not asked again for as long (no
//!   failure is counted). Its requests as a whole are timed, not each one: a connection's
//!   responses come one after another, so a request may wait behind others while its source
//!   delivers.
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

mod inputs;
mod requests;
mod roster;
#[cfg(test)]
mod roster_tests;
#[cfg(test)]
mod tests;
mod timing;

pub(crate) use roster::Standing;

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use rand::SeedableRng;
use rand_xoshiro::Xoshiro256PlusPlus;

use super::bits::Bits;
use super::picker::{Availability, Have, OpenSet};
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
pub(crate) enum RequestFailure {
    /// Worth retrying after a backoff (connection lost, timeout, refused for load).
    Transient,
    /// The source cannot serve this download (unknown snapshot, wrong token, wrong chunk size).
    Fatal,
    /// The source is busy serving others: ask again soon, but it counts as no failure.
    Busy,
    /// The source (a partial holder) does not hold these chunks yet.
    NotHeld,
}

/// How a connection to a source ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lost {
    /// The server closed it on purpose (idle, or to make room): no failure.
    Benign,
    /// The server said it is shutting down, or closed it with no code (its side of the
    /// connection dropped, as when its node stops): the source leaves.
    Left,
    /// It failed (timed out, reset, closed for another reason).
    Failed,
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
    /// When it last delivered a verified byte, new or already on disk.
    last_byte: Option<Instant>,
    /// Since when it has had requests in flight without a break (`None`: it has none).
    asked_since: Option<Instant>,
    /// It gave its place up for delivering nothing (snubbed), and has not taken one since.
    snubbed: bool,
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
    /// Times its requests were handed to others because it went quiet.
    pub(crate) quiet: u32,
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
    /// Requests ended here that the I/O layer has not abandoned yet: what they wrote before
    /// it does is still credited (see [`Scheduler::handle_abandoned`]).
    unsettled: HashMap<ReqId, Request>,
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
/// holds (a partial holder's holdings grow; a seed suggests more), when sooner than
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
            unsettled: HashMap::new(),
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
            last_byte: None,
            asked_since: None,
            snubbed: false,
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

    /// Whether every chunk is on disk and a manifest was taken: the download is done.
    pub(crate) fn is_finished(&self) -> bool {
        self.is_complete() && self.roster.has_manifest()
    }
}
