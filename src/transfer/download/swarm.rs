//! A deterministic simulator of a crowd downloading one snapshot (feature `sim`): seeds that
//! hold it and joiners that start together, each joiner running the real download
//! [`Scheduler`] (piece selection, availability, windows, deadlines, hedging, backoff) and each
//! node serving as the streamer does (upload slots, "busy" and "not held" answers, serving only
//! what it verified), in virtual time.
//!
//! The network: every node has an uplink and a downlink capacity and every link a latency.
//! A server sends one response at a time at its uplink rate (a response is a piece, so pieces
//! leave it in the order asked); a receiver takes responses in at its downlink rate, one after
//! another. A joiner is told the seeds and `partial_peers` other joiners at random (what
//! discovery's answers and announcements give it), asks those what they hold when it connects
//! and again as the scheduler says, and once complete is a seed for the rest.
//!
//! [`SwarmReport`] has the time until every joiner completes against the lower bound
//! `max(F / U_seeds, F / d, N F / (U_seeds + N u))` (the first copy must leave the seeds, each
//! joiner must take it in, and N copies must be uploaded by someone), the share of the bytes
//! joiners served, and how many copies the seeds uploaded.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashSet, VecDeque};
use std::ops::Range;
use std::time::{Duration, Instant};

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

use super::DownloadConfig;
use super::bits::Bits;
use super::picker::Have;
use super::scheduler::{Command, Failure, PeerIdx, ReqId, Scheduler};
use crate::transfer::streamer::slots::{OFFER_BLOCKS, SeedOffers, UPLOAD_LINGER, UploadSlots};

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
    /// Other joiners each joiner is told of, as partial sources.
    pub partial_peers: usize,
    /// Peers a node uploads to at once (the streamer's `max_uploads`).
    pub max_uploads: usize,
    /// How long an upload slot is held while others wait (the streamer's `upload_slot`).
    pub upload_slot: Duration,
    /// The downloaders' settings (piece size, windows, `have_interval`, timeouts).
    pub download: DownloadConfig,
    /// Joiners start at random within this much of each other.
    pub start_spread: Duration,
    /// The simulation stops here at the latest.
    pub horizon: Duration,
    /// Seed of every random choice.
    pub seed: u64,
}

impl SwarmConfig {
    /// `joiners` joiners and `seeds` seeds sharing a 512 MiB snapshot over 100 Mbit/s uplinks,
    /// 400 Mbit/s downlinks and 5-40 ms links, each joiner told of 12 others, with the
    /// streamer's and the downloader's defaults, starting within half a second.
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
            partial_peers: 12,
            max_uploads: 4,
            upload_slot: Duration::from_secs(10),
            download: DownloadConfig::default(),
            start_spread: Duration::from_millis(500),
            horizon: Duration::from_secs(3600),
            seed: 1,
        }
    }

    /// The lower bound on the time until every joiner completes (see the module docs).
    pub fn bound(&self) -> Duration {
        let f = self.archive_bytes as f64;
        let seeds = self.seeds as f64 * self.seed_uplink;
        let n = self.joiners as f64;
        let secs = (f / seeds)
            .max(f / self.downlink)
            .max(n * f / (seeds + n * self.joiner_uplink));
        Duration::from_secs_f64(secs)
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
    /// Bytes delivered that were not needed any more (hedged duplicates), as a share of all.
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
}

type NodeId = usize;

#[derive(Debug)]
enum Ev {
    Start(NodeId),
    Wake(NodeId, u64),
    Connected(NodeId, PeerIdx),
    Have(NodeId, PeerIdx, Have),
    Arrive {
        server: NodeId,
        client: NodeId,
        id: ReqId,
        chunks: Range<u64>,
    },
    Refused {
        client: NodeId,
        id: ReqId,
        failure: Failure,
    },
    ServerDone(NodeId),
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

struct Job {
    client: NodeId,
    id: ReqId,
    chunks: Range<u64>,
}

struct Node {
    seed: bool,
    uplink: f64,
    sched: Option<Scheduler>,
    /// The node behind each of the scheduler's peers.
    peers: Vec<NodeId>,
    queue: VecDeque<Job>,
    current: Option<Job>,
    slots: UploadSlots<NodeId>,
    /// What it offers once complete, when many ask.
    offers: SeedOffers,
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
    piece_chunks: u64,
    chunk_count: u64,
    useful_from_seeds: u64,
    useful_from_joiners: u64,
    wasted: u64,
    seed_uploaded: u64,
    /// Chunks that have left the seeds, and when the last of them did.
    seed_sent: Bits,
    first_copy_out: Option<Duration>,
    busy: u64,
    not_held: u64,
    have_asks: u64,
    events: u64,
}

/// Runs a simulation.
pub fn run(config: &SwarmConfig) -> SwarmReport {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(config.seed);
    let chunk_count = config.archive_bytes.div_ceil(config.chunk_bytes);
    let mut sim = Sim {
        config,
        base: Instant::now(),
        now: Duration::ZERO,
        seq: 0,
        heap: BinaryHeap::new(),
        nodes: Vec::new(),
        cancelled: HashSet::new(),
        piece_chunks: config.download.request_chunks().max(1),
        chunk_count,
        useful_from_seeds: 0,
        useful_from_joiners: 0,
        wasted: 0,
        seed_uploaded: 0,
        seed_sent: Bits::new(chunk_count as usize),
        first_copy_out: None,
        busy: 0,
        not_held: 0,
        have_asks: 0,
        events: 0,
    };
    let total = config.seeds + config.joiners;
    let sim_base = sim.base;
    for i in 0..total {
        let seed = i < config.seeds;
        sim.nodes.push(Node {
            seed,
            uplink: if seed {
                config.seed_uplink
            } else {
                config.joiner_uplink
            },
            sched: None,
            peers: Vec::new(),
            queue: VecDeque::new(),
            current: None,
            slots: UploadSlots::new(config.max_uploads, config.upload_slot, UPLOAD_LINGER),
            offers: SeedOffers::new(
                chunk_count,
                config.download.request_chunks(),
                rng.random_range(0..usize::MAX),
                sim_base,
            ),
            recv_free: Duration::ZERO,
            done_at: None,
            wake: None,
            wake_gen: 0,
        });
    }
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
    fn latency(&self, a: NodeId, b: NodeId) -> Duration {
        let (lo, hi) = self.config.latency_ms;
        let (x, y) = (a.min(b) as u64, a.max(b) as u64);
        let mut h = x.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ y.wrapping_add(self.config.seed);
        h ^= h >> 31;
        h = h.wrapping_mul(0xBF58_476D_1CE4_E5B9);
        h ^= h >> 29;
        Duration::from_millis(lo + h % (hi.saturating_sub(lo) + 1))
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
                if let Some(s) = self.nodes[j].sched.as_mut() {
                    s.handle_connected(p);
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
            Ev::Arrive {
                server,
                client,
                id,
                chunks,
            } => self.arrive(server, client, id, chunks),
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
            Ev::ServerDone(server) => self.server_done(server),
            Ev::Delivered {
                client,
                from,
                id,
                chunks,
            } => {
                let now = self.instant();
                let bytes = self.bytes_of(&chunks);
                let Some(s) = self.nodes[client].sched.as_mut() else {
                    return;
                };
                let added = s.handle_written(id, chunks.end, now);
                s.handle_success(id, now);
                self.wasted += bytes - added;
                if self.nodes[from].seed {
                    self.useful_from_seeds += added;
                } else {
                    self.useful_from_joiners += added;
                }
                self.drive(client);
            }
        }
    }

    fn start(&mut self, j: NodeId) {
        let mut download = self.config.download;
        download.schedule.jitter_seed = Some(self.config.seed ^ (j as u64) << 20);
        let mut s = Scheduler::new(
            download.schedule,
            self.config.archive_bytes,
            self.config.chunk_bytes,
            self.chunk_count,
            &Bits::new(0),
            self.instant(),
        );
        for &p in &self.nodes[j].peers {
            if self.nodes[p].seed {
                s.add_peer();
            } else {
                s.add_partial_peer();
            }
        }
        self.nodes[j].sched = Some(s);
        self.drive(j);
    }

    /// Carries out what `j`'s scheduler commands, and sets its next wake-up.
    fn drive(&mut self, j: NodeId) {
        let now = self.instant();
        let Some(s) = self.nodes[j].sched.as_mut() else {
            return;
        };
        let commands: Vec<Command> = std::iter::from_fn(|| s.poll_command(now)).collect();
        let complete = s.is_complete();
        let wake = s.poll_timeout(now).saturating_duration_since(self.base);
        for c in commands {
            match c {
                Command::Connect(p) => {
                    let at = self.now + 2 * self.latency(j, self.nodes[j].peers[p]);
                    self.push(at, Ev::Connected(j, p));
                }
                Command::Request { id, peer, chunks } => {
                    let server = self.nodes[j].peers[peer];
                    let at = self.now + self.latency(j, server);
                    self.push(
                        at,
                        Ev::Arrive {
                            server,
                            client: j,
                            id,
                            chunks,
                        },
                    );
                }
                Command::Cancel(id) => {
                    self.cancelled.insert((j, id));
                }
                Command::AskHave(p) => {
                    self.have_asks += 1;
                    let server = self.nodes[j].peers[p];
                    let have = self.have_of(server, j);
                    let at = self.now + 2 * self.latency(j, server);
                    self.push(at, Ev::Have(j, p, have));
                }
            }
        }
        if complete && self.nodes[j].done_at.is_none() {
            self.nodes[j].done_at = Some(self.now);
        }
        let node = &mut self.nodes[j];
        if !complete && node.wake.is_none_or(|w| w != wake) && wake > self.now {
            node.wake_gen += 1;
            node.wake = Some(wake);
            let generation = node.wake_gen;
            self.push(wake, Ev::Wake(j, generation));
        }
    }

    /// What `node` says it holds to `asker`: everything once complete (or, when more ask than
    /// it has upload slots for, the few pieces it offers this asker if it holds a slot, none
    /// if not), else its pieces on disk.
    fn have_of(&mut self, node: NodeId, asker: NodeId) -> Have {
        let now = self.instant();
        let pieces = self.chunk_count.div_ceil(self.piece_chunks) as usize;
        let holding = self.nodes[asker]
            .sched
            .as_ref()
            .map(|s| s.pieces_done().to_bytes());
        let n = &mut self.nodes[node];
        if (n.seed || n.done_at.is_some()) && n.slots.contended(now) {
            if !n.slots.admit(asker, now) {
                return Have::Some(Bits::new(pieces));
            }
            n.slots.done(asker, now);
            let offer = n
                .offers
                .answer(OFFER_BLOCKS, self.piece_chunks, holding.as_deref(), now);
            return Have::Some(Bits::from_bytes(&offer, pieces).expect("the length asked"));
        }
        match &n.sched {
            _ if n.seed || n.done_at.is_some() => Have::All,
            None => Have::Some(Bits::new(pieces)),
            Some(s) => {
                let done = s.chunk_done();
                let mut bits = Bits::new(pieces);
                for p in 0..pieces {
                    let start = p as u64 * self.piece_chunks;
                    let end = (start + self.piece_chunks).min(self.chunk_count);
                    if (start..end).all(|c| done.get(c as usize)) {
                        bits.set(p);
                    }
                }
                Have::Some(bits)
            }
        }
    }

    /// A request reaches `server`: refused when it does not hold the range or has no upload
    /// slot for the client, else queued.
    fn arrive(&mut self, server: NodeId, client: NodeId, id: ReqId, chunks: Range<u64>) {
        if self.cancelled.contains(&(client, id)) {
            return;
        }
        let back = self.now + self.latency(server, client);
        let n = &self.nodes[server];
        let holds = n.seed
            || n.done_at.is_some()
            || n.sched
                .as_ref()
                .is_some_and(|s| chunks.clone().all(|c| s.chunk_done().get(c as usize)));
        if !holds {
            self.not_held += 1;
            let failure = Failure::NotHeld;
            self.push(
                back,
                Ev::Refused {
                    client,
                    id,
                    failure,
                },
            );
            return;
        }
        let now = self.instant();
        if !self.nodes[server].slots.admit(client, now) {
            self.busy += 1;
            let failure = Failure::Busy;
            self.push(
                back,
                Ev::Refused {
                    client,
                    id,
                    failure,
                },
            );
            return;
        }
        self.nodes[server]
            .queue
            .push_back(Job { client, id, chunks });
        if self.nodes[server].current.is_none() {
            self.serve_next(server);
        }
    }

    fn serve_next(&mut self, server: NodeId) {
        while let Some(job) = self.nodes[server].queue.pop_front() {
            if self.cancelled.contains(&(job.client, job.id)) {
                let now = self.instant();
                self.nodes[server].slots.done(job.client, now);
                continue;
            }
            let secs = self.bytes_of(&job.chunks) as f64 / self.nodes[server].uplink;
            self.nodes[server].current = Some(job);
            let at = self.now + Duration::from_secs_f64(secs);
            self.push(at, Ev::ServerDone(server));
            return;
        }
    }

    fn server_done(&mut self, server: NodeId) {
        let Some(job) = self.nodes[server].current.take() else {
            return;
        };
        let bytes = self.bytes_of(&job.chunks);
        if self.nodes[server].seed || self.nodes[server].done_at.is_some() {
            self.nodes[server].offers.sent(job.chunks.clone());
        }
        if self.nodes[server].seed {
            self.seed_uploaded += bytes;
            for c in job.chunks.clone() {
                self.seed_sent.set(c as usize);
            }
            if self.first_copy_out.is_none() && self.seed_sent.ones() == self.seed_sent.len() {
                self.first_copy_out = Some(self.now);
            }
        }
        let c = job.client;
        let now = self.instant();
        self.nodes[server].slots.done(c, now);
        let take_in = Duration::from_secs_f64(bytes as f64 / self.config.downlink);
        let arrival = (self.now + self.latency(server, c)).max(self.nodes[c].recv_free + take_in);
        self.nodes[c].recv_free = arrival;
        self.push(
            arrival,
            Ev::Delivered {
                client: c,
                from: server,
                id: job.id,
                chunks: job.chunks,
            },
        );
        self.serve_next(server);
    }

    fn report(&self) -> SwarmReport {
        let c = self.config;
        let mut done: Vec<Duration> = self.nodes.iter().filter_map(|n| n.done_at).collect();
        done.sort();
        let completed = done.len();
        let useful = self.useful_from_seeds + self.useful_from_joiners;
        let delivered = useful + self.wasted;
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
            seed_copies: self.seed_uploaded as f64 / c.archive_bytes as f64,
            wasted_share: self.wasted as f64 / delivered.max(1) as f64,
            first_copy_out: self.first_copy_out,
            busy: self.busy,
            not_held: self.not_held,
            have_asks: self.have_asks,
            events: self.events,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(joiners: usize, seeds: usize) -> SwarmReport {
        let started = std::time::Instant::now();
        let r = run(&SwarmConfig::new(joiners, seeds));
        println!(
            "swarm: {joiners} joiners from {seeds} seed(s): all done in {:.1} s, bound {:.1} s \
             (ratio {:.2}), half done {:.1} s, one copy {:.1} s, out of the seeds {:.1} s; \
             joiners served {:.0}% of the bytes, seeds uploaded {:.2} copies, {:.1}% wasted, {} \
             busy, {} not held, {} have asks, {} events in {:.1} s",
            r.all_done.map_or(f64::NAN, |d| d.as_secs_f64()),
            r.bound.as_secs_f64(),
            r.ratio().unwrap_or(f64::NAN),
            r.half_done.map_or(f64::NAN, |d| d.as_secs_f64()),
            r.one_copy.as_secs_f64(),
            r.first_copy_out.map_or(f64::NAN, |d| d.as_secs_f64()),
            100.0 * r.joiner_bytes_share,
            r.seed_copies,
            100.0 * r.wasted_share,
            r.busy,
            r.not_held,
            r.have_asks,
            r.events,
            started.elapsed().as_secs_f64(),
        );
        assert_eq!(r.completed, joiners, "every joiner completes");
        let ratio = r.ratio().unwrap();
        assert!(
            ratio <= 1.5,
            "{joiners} joiners from {seeds}: {ratio:.2} x the bound"
        );
        r
    }

    #[test]
    fn ten_joiners_from_one_seed_finish_within_one_and_a_half_times_the_bound() {
        let r = check(10, 1);
        assert!(r.joiner_bytes_share > 0.5);
    }

    #[test]
    fn ten_joiners_from_three_seeds() {
        check(10, 3);
    }

    #[test]
    fn a_hundred_joiners_from_one_seed() {
        let r = check(100, 1);
        assert!(r.joiner_bytes_share > 0.9);
    }

    #[test]
    fn a_hundred_joiners_from_three_seeds() {
        check(100, 3);
    }

    #[test]
    fn a_thousand_joiners_from_one_seed() {
        let r = check(1000, 1);
        assert!(r.seed_copies < 3.0, "{} copies", r.seed_copies);
    }

    #[test]
    fn a_thousand_joiners_from_three_seeds() {
        check(1000, 3);
    }
}
