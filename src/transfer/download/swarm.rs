//! A deterministic simulator of a crowd downloading one snapshot (feature `sim`): seeds that
//! hold it and joiners that start together, each joiner running the real download
//! [`Scheduler`] (places, piece selection, availability, windows, deadlines, hedging, backoff)
//! and each node serving with the streamer's real [`UploadSlots`] (tit for tat, turns, the
//! optimistic slot, "busy" and "not held" answers, serving only what it verified) and its
//! seed suggests, in virtual time.
//!
//! The network is modelled on real shaped links, not on a server's own pacing:
//! - **Uplinks are shared.** A node's uplink is shared evenly by the responses it sends at
//!   once, one per client connection (a connection's responses go one after another), as
//!   congestion control shares a link among flows.
//! - **Queues.** A node whose uplink is busy holds what it sends in its link's queue (a `tbf`
//!   queue of `queue_delay`) before it leaves: requests, have answers and responses it sends
//!   then arrive that much later, and round trips grow under load as they do on real links.
//! - **Loss.** With random loss `p` on every host, a flow carries at most what a loss-driven
//!   congestion controller allows over its path (`1.22 MSS / (RTT sqrt(p))`, the round trip
//!   of its links), and a small message lost is sent again a retransmission timeout later.
//! - **Downlinks** take responses in one after another at their rate.
//!
//! A joiner is told the seeds and `partial_peers` other joiners at random (what discovery's
//! answers and announcements give it); a joiner asked what it holds by another downloading the
//! same snapshot takes the asker as a source in turn, as the streamer's introductions do.
//! Once complete, a joiner is a seed for the rest.
//!
//! [`SwarmReport`] has the time until every joiner completes against the lower bound
//! `max(F / U_seeds, F / d, N F / (U_seeds + N u))` (the first copy must leave the seeds, each
//! joiner must take it in, and N copies must be uploaded by someone), the share of the bytes
//! joiners served, and how many copies the seeds uploaded.
//!
//! The joiners' side is `swarm/client.rs`, what a node answers `swarm/serve.rs`, and the
//! servers' uplinks `swarm/uplink.rs`.

mod client;
mod serve;
#[cfg(test)]
mod tests;
mod uplink;

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::ops::Range;
use std::time::{Duration, Instant};

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

use super::DownloadConfig;
use super::bits::Bits;
use super::picker::Have;
use super::scheduler::{PeerIdx, ReqId, RequestFailure, Scheduler};
use crate::transfer::streamer::slots::{SeedSuggestions, UPLOAD_LINGER, UploadSlots};

/// Bytes of a QUIC packet's payload, for the loss model.
const MSS: f64 = 1200.0;

/// What one flow carries at most over a path of round trip `rtt` (its links, not the queues:
/// a flow held back by loss does not fill a queue) with random loss `loss`: the loss-driven
/// congestion controller's `1.22 MSS / (RTT sqrt(p))`; unbounded without loss.
fn flow_cap(rtt: Duration, loss: f64) -> f64 {
    if loss <= 0.0 {
        return f64::INFINITY;
    }
    1.22 * MSS / (rtt.as_secs_f64().max(1e-3) * loss.sqrt())
}

/// What to simulate.
#[derive(Debug, Clone)]
pub struct SwarmConfig {
    /// Joiners, starting empty.
    pub joiners: usize,
    /// Seeds, holding the snapshot from the start.
    pub seeds: usize,
    /// Size of the snapshot, bytes.
    pub archive_bytes: u64,
    /// Chunk size, bytes.
    pub chunk_bytes: u64,
    /// Uplink of a seed, bytes per second.
    pub seed_uplink: f64,
    /// Uplink of a joiner, bytes per second.
    pub joiner_uplink: f64,
    /// Downlink of every node, bytes per second.
    pub downlink: f64,
    /// Latency of a link, one way, drawn per link between these, milliseconds.
    pub latency_ms: (u64, u64),
    /// How long what a busy uplink sends waits in its queue (`tbf`'s `latency`).
    pub queue_delay: Duration,
    /// Share of the packets every host sends that are lost at random.
    pub loss: f64,
    /// Other joiners each joiner is told of, as partial sources.
    pub partial_peers: usize,
    /// Peers a node uploads to at once (the streamer's `max_uploads`).
    pub max_uploads: usize,
    /// How long an upload slot is held while others wait (the streamer's `upload_slot`).
    pub upload_slot: Duration,
    /// The downloaders' settings (piece size, windows, `have_interval`, timeouts, places).
    pub download: DownloadConfig,
    /// Joiners start at random within this much of each other.
    pub start_spread: Duration,
    /// The simulation stops here at the latest.
    pub horizon: Duration,
    /// Seed of every random choice.
    pub seed: u64,
}

impl SwarmConfig {
    /// `joiners` joiners and `seeds` seeds sharing a 512 MiB snapshot over 100 Mbit/s uplinks
    /// with 50 ms queues, 400 Mbit/s downlinks and 5-40 ms links, each joiner told of 12
    /// others, with the streamer's and the downloader's defaults, starting within half a
    /// second, no loss.
    pub fn new(joiners: usize, seeds: usize) -> Self {
        let mbit = 1e6 / 8.0;
        Self {
            joiners,
            seeds,
            archive_bytes: 512 << 20,
            chunk_bytes: 16 << 10,
            seed_uplink: 100.0 * mbit,
            joiner_uplink: 100.0 * mbit,
            downlink: 400.0 * mbit,
            latency_ms: (5, 40),
            queue_delay: Duration::from_millis(50),
            loss: 0.0,
            partial_peers: 12,
            max_uploads: 4,
            upload_slot: Duration::from_secs(10),
            download: DownloadConfig::default(),
            start_spread: Duration::from_millis(500),
            horizon: Duration::from_secs(3600),
            seed: 1,
        }
    }

    /// The lower bound on the time until every joiner completes (see the module docs), with
    /// each uplink counted for what `max_uploads` flows can carry under the loss.
    pub fn bound(&self) -> Duration {
        let f = self.archive_bytes as f64;
        let seeds = self.seeds as f64 * self.usable(self.seed_uplink);
        let n = self.joiners as f64;
        let secs = (f / seeds)
            .max(f / self.downlink)
            .max(n * f / (seeds + n * self.usable(self.joiner_uplink)));
        Duration::from_secs_f64(secs)
    }

    /// What an uplink of `rate` carries in `max_uploads` flows over a link of the middle
    /// latency, under the loss.
    fn usable(&self, rate: f64) -> f64 {
        let (lo, hi) = self.latency_ms;
        let rtt = Duration::from_millis(lo + hi);
        rate.min(self.max_uploads as f64 * flow_cap(rtt, self.loss))
    }
}

/// What a simulation measured.
#[derive(Debug, Clone, PartialEq)]
pub struct SwarmReport {
    /// Joiners in all.
    pub joiners: usize,
    /// Joiners that completed within the horizon.
    pub completed: usize,
    /// Time from the first start until every joiner completed.
    pub all_done: Option<Duration>,
    /// Time until half the joiners completed.
    pub half_done: Option<Duration>,
    /// The lower bound.
    pub bound: Duration,
    /// The time one copy takes over one seed's uplink.
    pub one_copy: Duration,
    /// Share of the useful bytes that joiners served (the rest came from seeds).
    pub joiner_bytes_share: f64,
    /// Copies of the snapshot the seeds uploaded (useful or not).
    pub seed_copies: f64,
    /// Bytes sent that were not needed (hedged duplicates, responses given up on), as a share
    /// of all bytes sent.
    pub wasted_share: f64,
    /// When every chunk had left the seeds at least once.
    pub first_copy_out: Option<Duration>,
    /// Requests answered "busy" and "not held".
    pub busy: u64,
    /// See `busy`.
    pub not_held: u64,
    /// Have requests made.
    pub have_asks: u64,
    /// Events simulated.
    pub events: u64,
}

impl SwarmReport {
    /// `all_done` over the bound (`None` if not every joiner completed).
    pub fn ratio(&self) -> Option<f64> {
        Some(self.all_done?.as_secs_f64() / self.bound.as_secs_f64())
    }

    /// `all_done` over the one-copy time (`None` if not every joiner completed).
    pub fn copies(&self) -> Option<f64> {
        Some(self.all_done?.as_secs_f64() / self.one_copy.as_secs_f64())
    }
}

type NodeId = usize;

#[derive(Debug)]
enum Ev {
    Start(NodeId),
    Wake(NodeId, u64),
    Connected(NodeId, PeerIdx),
    Have(NodeId, PeerIdx, Have),
    Arrive(Job),
    Refused {
        client: NodeId,
        id: ReqId,
        failure: RequestFailure,
    },
    /// The uplink of a node may have finished a response (if this is its latest tick).
    Uplink(NodeId, u64),
    Delivered {
        client: NodeId,
        from: NodeId,
        id: ReqId,
        chunks: Range<u64>,
    },
}

struct Queued {
    at: Duration,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Queued {
    fn cmp(&self, other: &Self) -> Ordering {
        // The earliest first, from a max-heap.
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

#[derive(Debug)]
struct Job {
    server: NodeId,
    client: NodeId,
    id: ReqId,
    chunks: Range<u64>,
}

/// A response being sent, and the bytes it has left.
struct Sending {
    job: Job,
    left: f64,
    /// Its flow's rate limit under loss, bytes per second.
    cap: f64,
}

/// What a node gave another lately (decaying, as the exchange's ledger).
#[derive(Debug, Clone, Copy)]
struct Given {
    bytes: f64,
    at: Duration,
}

struct Node {
    seed: bool,
    uplink: f64,
    sched: Option<Scheduler>,
    /// The node behind each of the scheduler's sources.
    peers: Vec<NodeId>,
    /// Each client connection's responses, one after another.
    queues: HashMap<NodeId, VecDeque<Job>>,
    /// The responses on the wire, one per client at most.
    sending: Vec<Sending>,
    sending_since: Duration,
    uplink_gen: u64,
    slots: UploadSlots<NodeId>,
    /// What each peer gave this node lately.
    given: HashMap<NodeId, Given>,
    /// What it offers once complete, when many ask.
    suggestions: SeedSuggestions,
    /// When its downlink is free again.
    recv_free: Duration,
    done_at: Option<Duration>,
    wake: Option<Duration>,
    wake_gen: u64,
}

struct Sim<'a> {
    config: &'a SwarmConfig,
    base: Instant,
    now: Duration,
    seq: u64,
    heap: BinaryHeap<Queued>,
    nodes: Vec<Node>,
    cancelled: HashSet<(NodeId, ReqId)>,
    rng: Xoshiro256PlusPlus,
    piece_chunks: u64,
    chunk_count: u64,
    useful_from_seeds: u64,
    useful_from_joiners: u64,
    sent_bytes: f64,
    wasted: f64,
    seed_uploaded: f64,
    /// Chunks that have left the seeds, and when the last of them did.
    seed_sent: Bits,
    first_copy_out: Option<Duration>,
    busy: u64,
    not_held: u64,
    have_asks: u64,
    events: u64,
}

/// The seeds (the first `config.seeds`) and the joiners, none started yet.
fn new_nodes(
    config: &SwarmConfig,
    chunk_count: u64,
    piece_chunks: u64,
    base: Instant,
) -> Vec<Node> {
    (0..config.seeds + config.joiners)
        .map(|i| {
            let seed = i < config.seeds;
            Node {
                seed,
                uplink: if seed {
                    config.seed_uplink
                } else {
                    config.joiner_uplink
                },
                sched: None,
                peers: Vec::new(),
                queues: HashMap::new(),
                sending: Vec::new(),
                sending_since: Duration::ZERO,
                uplink_gen: 0,
                slots: UploadSlots::new(config.max_uploads, config.upload_slot, UPLOAD_LINGER, 0),
                given: HashMap::new(),
                suggestions: SeedSuggestions::new(chunk_count, piece_chunks, base),
                recv_free: Duration::ZERO,
                done_at: None,
                wake: None,
                wake_gen: 0,
            }
        })
        .collect()
}

/// Runs a simulation.
pub fn run(config: &SwarmConfig) -> SwarmReport {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(config.seed);
    let chunk_count = config.archive_bytes.div_ceil(config.chunk_bytes);
    let piece_chunks = config.download.request_chunks().max(1);
    let total = config.seeds + config.joiners;
    let base = Instant::now();
    let nodes = new_nodes(config, chunk_count, piece_chunks, base);
    let mut sim = Sim {
        config,
        base,
        now: Duration::ZERO,
        seq: 0,
        heap: BinaryHeap::new(),
        nodes,
        cancelled: HashSet::new(),
        rng: Xoshiro256PlusPlus::seed_from_u64(config.seed ^ 0x5eed),
        piece_chunks,
        chunk_count,
        useful_from_seeds: 0,
        useful_from_joiners: 0,
        sent_bytes: 0.0,
        wasted: 0.0,
        seed_uploaded: 0.0,
        seed_sent: Bits::new(chunk_count as usize),
        first_copy_out: None,
        busy: 0,
        not_held: 0,
        have_asks: 0,
        events: 0,
    };
    let joiners: Vec<NodeId> = (config.seeds..total).collect();
    for &j in &joiners {
        let mut others: Vec<NodeId> = joiners.iter().copied().filter(|o| *o != j).collect();
        others.shuffle(&mut rng);
        others.truncate(config.partial_peers);
        let mut peers: Vec<NodeId> = (0..config.seeds).collect();
        peers.extend(others);
        sim.nodes[j].peers = peers;
        let spread = config.start_spread.as_nanos() as u64;
        let at = Duration::from_nanos(if spread == 0 {
            0
        } else {
            rng.random_range(0..spread)
        });
        sim.push(at, Ev::Start(j));
    }
    while let Some(q) = sim.heap.pop() {
        if q.at > config.horizon {
            break;
        }
        sim.now = q.at;
        sim.events += 1;
        sim.handle(q.ev);
    }
    sim.report()
}

impl Sim<'_> {
    fn push(&mut self, at: Duration, ev: Ev) {
        self.seq += 1;
        self.heap.push(Queued {
            at,
            seq: self.seq,
            ev,
        });
    }

    fn instant(&self) -> Instant {
        self.base + self.now
    }

    /// One-way latency between two nodes (the same both ways, fixed per link).
    fn link(&self, a: NodeId, b: NodeId) -> Duration {
        let (lo, hi) = self.config.latency_ms;
        let (x, y) = (a.min(b) as u64, a.max(b) as u64);
        let mut h = x.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ y.wrapping_add(self.config.seed);
        h ^= h >> 31;
        h = h.wrapping_mul(0xBF58_476D_1CE4_E5B9);
        h ^= h >> 29;
        Duration::from_millis(lo + h % (hi.saturating_sub(lo) + 1))
    }

    /// How long `from`'s queue holds what it sends now.
    fn queued(&self, from: NodeId) -> Duration {
        if self.nodes[from].sending.is_empty() {
            Duration::ZERO
        } else {
            self.config.queue_delay
        }
    }

    /// When a small message `from` sends now reaches `to`: the link, the sender's queue, and
    /// a retransmission timeout when it is lost.
    fn message(&mut self, from: NodeId, to: NodeId) -> Duration {
        let mut at = self.now + self.link(from, to) + self.queued(from);
        if self.config.loss > 0.0 && self.rng.random_bool(self.config.loss.min(1.0)) {
            at += self.rtt(from, to) * 2 + Duration::from_millis(25);
        }
        at
    }

    /// The round trip between two nodes now, queues included.
    fn rtt(&self, a: NodeId, b: NodeId) -> Duration {
        self.link(a, b) * 2 + self.queued(a) + self.queued(b)
    }

    fn bytes_of(&self, chunks: &Range<u64>) -> u64 {
        let cb = self.config.chunk_bytes;
        let size = self.config.archive_bytes;
        (chunks.end * cb).min(size) - (chunks.start * cb).min(size)
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Start(j) => self.start(j),
            Ev::Wake(j, generation) => {
                if self.nodes[j].wake_gen == generation {
                    self.nodes[j].wake = None;
                    let now = self.instant();
                    if let Some(s) = self.nodes[j].sched.as_mut() {
                        s.handle_timeout(now);
                    }
                    self.drive(j);
                }
            }
            Ev::Connected(j, p) => {
                let rtt = self.rtt(j, self.nodes[j].peers[p]);
                if let Some(s) = self.nodes[j].sched.as_mut() {
                    s.handle_connected(p);
                    s.handle_rtt(p, rtt);
                }
                self.drive(j);
            }
            Ev::Have(j, p, have) => {
                let now = self.instant();
                if let Some(s) = self.nodes[j].sched.as_mut() {
                    s.handle_have(p, Ok(have), now);
                }
                self.drive(j);
            }
            Ev::Arrive(job) => self.arrive(job),
            Ev::Refused {
                client,
                id,
                failure,
            } => {
                let now = self.instant();
                if let Some(s) = self.nodes[client].sched.as_mut() {
                    s.handle_failure(id, failure, now);
                }
                self.drive(client);
            }
            Ev::Uplink(server, generation) => {
                if self.nodes[server].uplink_gen == generation {
                    self.uplink(server);
                }
            }
            Ev::Delivered {
                client,
                from,
                id,
                chunks,
            } => self.delivered(client, from, id, chunks),
        }
    }

    fn report(&self) -> SwarmReport {
        let c = self.config;
        let mut done: Vec<Duration> = self.nodes.iter().filter_map(|n| n.done_at).collect();
        done.sort();
        let completed = done.len();
        let useful = self.useful_from_seeds + self.useful_from_joiners;
        SwarmReport {
            joiners: c.joiners,
            completed,
            all_done: (completed == c.joiners)
                .then(|| done.last().copied())
                .flatten(),
            half_done: done.get(c.joiners.div_ceil(2).saturating_sub(1)).copied(),
            bound: c.bound(),
            one_copy: Duration::from_secs_f64(c.archive_bytes as f64 / c.seed_uplink),
            joiner_bytes_share: self.useful_from_joiners as f64 / useful.max(1) as f64,
            seed_copies: self.seed_uploaded / c.archive_bytes as f64,
            wasted_share: self.wasted / self.sent_bytes.max(1.0),
            first_copy_out: self.first_copy_out,
            busy: self.busy,
            not_held: self.not_held,
            have_asks: self.have_asks,
            events: self.events,
        }
    }
}
