//! A deterministic simulator of discovery at scale (feature `sim`): `N` nodes running the real
//! [`Discovery`] state machine on a simulated gossip mesh, in virtual time.
//!
//! Each node links to `mesh_degree` others at random (as gossipsub's mesh degree `D`), each link
//! with its own latency. Gossip floods the mesh (each node forwards a message it has not seen
//! to its other links, as gossipsub does); direct messages (asks, their responses, answers and
//! their acknowledgements) go straight to their peer. Holders serve a full snapshot and an
//! incremental one on it; joiners start empty, ask, choose, and once their (simulated) sync ends,
//! hold the snapshots too and answer in turn. The report counts every message sent over a
//! link or directly, their bytes, the rounds, and the time until every joiner has chosen.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use prost::Message;
use rand::{RngCore, SeedableRng};
use rand_xoshiro::SplitMix64;

use super::{Action, Discovery, DiscoveryConfig, Local, Notice, SnapshotAd, SyncOutcome};
use crate::chunk::ChunkSize;
use crate::hash::{BankHash, ContentRoot};
use crate::metrics::Metrics;
use crate::snapshot::{Base, SnapshotKey, SnapshotKind};

/// What to simulate.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Nodes in all.
    pub nodes: usize,
    /// Of them, nodes that start empty and need a snapshot (the rest hold one).
    pub joiners: usize,
    /// Links each node makes (gossipsub's `D`, 6).
    pub mesh_degree: usize,
    /// Latency of a link, drawn per link between these, milliseconds.
    pub latency_ms: (u64, u64),
    /// How long a simulated sync takes once chosen.
    pub sync_time: Duration,
    /// The simulation stops here at the latest.
    pub horizon: Duration,
    /// Seed of every random choice.
    pub seed: u64,
}

impl SimConfig {
    /// `nodes` nodes of which a tenth (at least one) join, on a mesh of degree 6, 5-50 ms links.
    pub fn new(nodes: usize) -> Self {
        Self {
            nodes,
            joiners: (nodes / 10).max(1),
            mesh_degree: 6,
            latency_ms: (5, 50),
            sync_time: Duration::from_secs(2),
            horizon: Duration::from_secs(120),
            seed: 1,
        }
    }
}

/// What a simulation measured.
#[derive(Debug, Clone, PartialEq)]
pub struct SimReport {
    /// Nodes.
    pub nodes: usize,
    /// Joiners.
    pub joiners: usize,
    /// Discovery rounds started, all nodes.
    pub rounds: u64,
    /// Messages sent (over a link or directly).
    pub messages: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Messages per round.
    pub messages_per_round: f64,
    /// Bytes per round.
    pub bytes_per_round: f64,
    /// Joiners that chose a snapshot.
    pub chosen: usize,
    /// Virtual time until the last joiner chose one.
    pub time_to_all_chosen: Option<Duration>,
}

#[derive(Debug)]
enum Ev {
    Wake(usize),
    Gossip {
        to: usize,
        from: usize,
        origin: usize,
        id: u64,
        bytes: std::rc::Rc<Vec<u8>>,
    },
    Ask {
        to: usize,
        from: usize,
        request: crate::proto::SnapshotInfoRequest,
    },
    AskResponse {
        to: usize,
        from: usize,
        answer: Option<crate::proto::SnapshotInfoResponse>,
    },
    Answer {
        to: usize,
        from: usize,
        answer: crate::proto::SnapshotInfoResponse,
    },
    SyncDone(usize),
}

struct SimNode {
    disc: Discovery,
    links: Vec<usize>,
    seen: HashSet<(usize, u64)>,
    next_id: u64,
    wake: Option<Duration>,
    joiner: bool,
    chosen: Option<Duration>,
}

struct Sim {
    base: Instant,
    now: Duration,
    nodes: Vec<SimNode>,
    index: HashMap<PeerId, usize>,
    queue: BinaryHeap<Reverse<(Duration, u64, usize)>>,
    events: HashMap<usize, Ev>,
    seq: u64,
    config: SimConfig,
    rng: SplitMix64,
    messages: u64,
    bytes: u64,
    rounds: u64,
    snapshots: Vec<SnapshotAd>,
}

/// A well-mixed function of `z` (one SplitMix64 step): per-link latencies and keys.
fn mix(z: u64) -> u64 {
    SplitMix64::seed_from_u64(z).next_u64()
}

impl Sim {
    fn rand(&mut self) -> u64 {
        self.rng.next_u64()
    }

    fn latency(&self, a: usize, b: usize) -> Duration {
        let (lo, hi) = self.config.latency_ms;
        let pair = (a.min(b) as u64) << 32 | b.max(a) as u64;
        Duration::from_millis(lo + mix(pair ^ self.config.seed) % (hi - lo + 1))
    }

    fn at(&self, d: Duration) -> Instant {
        self.base + d
    }

    fn push(&mut self, when: Duration, ev: Ev) {
        self.seq += 1;
        let node = match &ev {
            Ev::Wake(n) | Ev::SyncDone(n) => *n,
            Ev::Gossip { to, .. }
            | Ev::Ask { to, .. }
            | Ev::AskResponse { to, .. }
            | Ev::Answer { to, .. } => *to,
        };
        self.events.insert(self.seq as usize, ev);
        self.queue.push(Reverse((when, self.seq, node)));
    }

    fn count(&mut self, bytes: usize) {
        self.messages += 1;
        self.bytes += bytes as u64;
    }

    /// Carries out node `n`'s actions and schedules its next wake.
    fn drain(&mut self, n: usize) {
        while let Some(action) = self.nodes[n].disc.poll() {
            match action {
                Action::Publish { bytes, .. } => {
                    let id = self.nodes[n].next_id;
                    self.nodes[n].next_id += 1;
                    self.nodes[n].seen.insert((n, id));
                    let bytes = std::rc::Rc::new(bytes);
                    self.flood(n, n, n, id, bytes);
                }
                Action::Ask { peer, request } => {
                    let to = self.index[&peer];
                    self.count(request.encoded_len());
                    let when = self.now + self.latency(n, to);
                    self.push(
                        when,
                        Ev::Ask {
                            to,
                            from: n,
                            request,
                        },
                    );
                }
                Action::Answer { peer, answer, .. } => {
                    let to = self.index[&peer];
                    self.count(answer.encoded_len());
                    let when = self.now + self.latency(n, to);
                    self.push(
                        when,
                        Ev::Answer {
                            to,
                            from: n,
                            answer,
                        },
                    );
                }
                Action::StartSync(_) => {
                    let node = &mut self.nodes[n];
                    if node.chosen.is_none() {
                        node.chosen = Some(self.now);
                    }
                    let when = self.now + self.config.sync_time;
                    self.push(when, Ev::SyncDone(n));
                }
                Action::Notice(Notice::Started { .. }) => self.rounds += 1,
                Action::Notice(_)
                | Action::AddSyncPeer { .. }
                | Action::DeleteSnapshot(_)
                | Action::KeepAttestations { .. }
                | Action::CancelSync => {}
            }
        }
        if let Some(t) = self.nodes[n].disc.poll_timeout() {
            let when = t.saturating_duration_since(self.base);
            let node = &mut self.nodes[n];
            if node.wake.is_none_or(|w| when < w || w <= self.now) {
                node.wake = Some(when);
                self.push(when.max(self.now), Ev::Wake(n));
            }
        }
    }

    /// Sends a gossip message from `at` to its links (but `from`), as gossipsub forwards.
    fn flood(
        &mut self,
        at: usize,
        from: usize,
        origin: usize,
        id: u64,
        bytes: std::rc::Rc<Vec<u8>>,
    ) {
        let links = self.nodes[at].links.clone();
        for to in links {
            if to == from || to == origin {
                continue;
            }
            self.count(bytes.len());
            let when = self.now + self.latency(at, to);
            self.push(
                when,
                Ev::Gossip {
                    to,
                    from: at,
                    origin,
                    id,
                    bytes: bytes.clone(),
                },
            );
        }
    }

    fn handle(&mut self, ev: Ev) {
        let now = self.at(self.now);
        match ev {
            Ev::Wake(n) => {
                if self.nodes[n].wake.is_some_and(|w| w <= self.now) {
                    self.nodes[n].wake = None;
                }
                self.nodes[n].disc.handle_timeout(now);
                self.drain(n);
            }
            Ev::Gossip {
                to,
                from,
                origin,
                id,
                bytes,
            } => {
                if !self.nodes[to].seen.insert((origin, id)) {
                    return;
                }
                let (source, relay) = (self.peer(origin), self.peer(from));
                let verdict = self.nodes[to]
                    .disc
                    .handle_gossip(Some(source), relay, &bytes, now);
                self.drain(to);
                if verdict == super::Verdict::Accept {
                    self.flood(to, from, origin, id, bytes);
                }
            }
            Ev::Ask { to, from, request } => {
                let peer = self.peer(from);
                let answer = self.nodes[to].disc.handle_ask(peer, &request, now);
                self.drain(to);
                let len = answer.as_ref().map_or(2, |a| a.encoded_len() + 2);
                self.count(len);
                let when = self.now + self.latency(from, to);
                self.push(
                    when,
                    Ev::AskResponse {
                        to: from,
                        from: to,
                        answer,
                    },
                );
            }
            Ev::AskResponse { to, from, answer } => {
                if let Some(answer) = answer {
                    let peer = self.peer(from);
                    self.nodes[to].disc.handle_answer(
                        peer,
                        &answer,
                        crate::discovery::AnswerTo::Ask,
                        now,
                    );
                    self.drain(to);
                }
            }
            Ev::Answer { to, from, answer } => {
                let peer = self.peer(from);
                self.nodes[to].disc.handle_answer(
                    peer,
                    &answer,
                    crate::discovery::AnswerTo::Request,
                    now,
                );
                // The acknowledgement.
                self.count(2);
                self.drain(to);
            }
            Ev::SyncDone(n) => {
                let snapshots = self.snapshots.clone();
                let node = &mut self.nodes[n].disc;
                node.handle_local(Local {
                    attestations: Default::default(),
                    slot: Some(snapshots[0].key.slot),
                    snapshots,
                    modified_time: 0,
                    chunk_size: None,
                });
                node.handle_sync_ended(
                    SyncOutcome::Synced {
                        bad_peers: vec![],
                        served: vec![],
                    },
                    now,
                );
                self.drain(n);
            }
        }
    }

    fn peer(&self, n: usize) -> PeerId {
        self.nodes[n].disc.me
    }
}

/// The snapshots holders serve: a full one at slot 25,000 and an incremental one on it.
fn snapshots() -> Vec<SnapshotAd> {
    let full = SnapshotAd {
        key: SnapshotKey {
            kind: SnapshotKind::Full,
            slot: 25_000,
            bank_hash: BankHash([1; 32]),
            content_root: ContentRoot([1; 32]),
            archive_size: 1 << 30,
            base: None,
        },
        chunk_size: ChunkSize::DEFAULT,
        entry_count: 1 << 20,
        state_bytes: 1 << 31,
    };
    let incremental = SnapshotAd {
        key: SnapshotKey {
            kind: SnapshotKind::Incremental,
            slot: 25_300,
            bank_hash: BankHash([2; 32]),
            content_root: ContentRoot([2; 32]),
            archive_size: 1 << 24,
            base: Some(Base {
                slot: 25_000,
                bank_hash: BankHash([1; 32]),
                content_root: ContentRoot([1; 32]),
            }),
        },
        chunk_size: ChunkSize::DEFAULT,
        entry_count: 1 << 14,
        state_bytes: 1 << 25,
    };
    vec![incremental, full]
}

/// Runs a simulation.
pub fn run(config: &SimConfig) -> SimReport {
    let n = config.nodes.max(2);
    let joiners = config.joiners.min(n - 1);
    let mut sim = Sim::new(config);
    for i in 0..n {
        sim.add_node(i < joiners);
    }
    sim.link(config.mesh_degree.min(n - 1));
    sim.run_until_chosen(config.horizon);
    sim.report(joiners)
}

impl Sim {
    /// A simulation with no node yet.
    fn new(config: &SimConfig) -> Self {
        Sim {
            base: Instant::now(),
            now: Duration::ZERO,
            nodes: Vec::with_capacity(config.nodes),
            index: HashMap::new(),
            queue: BinaryHeap::new(),
            events: HashMap::new(),
            seq: 0,
            config: config.clone(),
            rng: SplitMix64::seed_from_u64(config.seed),
            messages: 0,
            bytes: 0,
            rounds: 0,
            snapshots: snapshots(),
        }
    }

    /// Adds a node: a joiner that syncs, or a holder of the snapshots.
    fn add_node(&mut self, joiner: bool) {
        let mut dc = DiscoveryConfig {
            sync_enabled: joiner,
            ..DiscoveryConfig::default()
        };
        dc.announce_delay = Duration::from_secs(1);
        let seed = self.rand();
        // Nodes start within the first second, not all at once.
        let start = Duration::from_millis(self.rand() % 1000);
        let key = libp2p::identity::Keypair::ed25519_from_bytes(mix(seed).to_le_bytes().repeat(4))
            .expect("32 bytes");
        let me = key.public().to_peer_id();
        let mut disc = Discovery::new(dc, me, Metrics::new(), self.base + start, seed);
        disc.handle_streamer_addrs(vec!["10.0.0.1:7000".parse().expect("an address")]);
        if !joiner {
            disc.handle_local(Local {
                attestations: Default::default(),
                slot: Some(25_310),
                snapshots: self.snapshots.clone(),
                modified_time: 0,
                chunk_size: None,
            });
        }
        self.index.insert(me, self.nodes.len());
        self.nodes.push(SimNode {
            disc,
            links: Vec::new(),
            seen: HashSet::new(),
            next_id: 0,
            wake: None,
            joiner,
            chosen: None,
        });
    }

    /// The mesh: each node links to `degree` others (links go both ways), and every node
    /// hears of its links.
    fn link(&mut self, degree: usize) {
        let n = self.nodes.len();
        for i in 0..n {
            while self.nodes[i].links.len() < degree {
                let j = (self.rand() % n as u64) as usize;
                if j != i && !self.nodes[i].links.contains(&j) {
                    self.nodes[i].links.push(j);
                    self.nodes[j].links.push(i);
                }
            }
        }
        for i in 0..n {
            let links = self.nodes[i].links.clone();
            for j in links {
                let peer = self.peer(j);
                let t = self.base;
                self.nodes[i].disc.handle_connected(peer, t);
                self.nodes[i].disc.handle_subscribed(peer, t);
            }
            self.drain(i);
        }
    }

    /// Delivers events in time order until every joiner chose, or `horizon`.
    fn run_until_chosen(&mut self, horizon: Duration) {
        while let Some(Reverse((when, seq, _))) = self.queue.pop() {
            if when > horizon {
                break;
            }
            self.now = self.now.max(when);
            let ev = self.events.remove(&(seq as usize)).expect("queued");
            self.handle(ev);
            if self
                .nodes
                .iter()
                .filter(|x| x.joiner)
                .all(|x| x.chosen.is_some())
            {
                break;
            }
        }
    }

    /// What the run cost and when the joiners chose.
    fn report(&self, joiners: usize) -> SimReport {
        let chosen: Vec<Duration> = self.nodes.iter().filter_map(|x| x.chosen).collect();
        let rounds = self.rounds.max(1);
        SimReport {
            nodes: self.nodes.len(),
            joiners,
            rounds: self.rounds,
            messages: self.messages,
            bytes: self.bytes,
            messages_per_round: self.messages as f64 / rounds as f64,
            bytes_per_round: self.bytes as f64 / rounds as f64,
            chosen: chosen.len(),
            time_to_all_chosen: (chosen.len() == joiners)
                .then(|| chosen.iter().copied().max().unwrap_or_default()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_costs_messages_linear_in_the_nodes() {
        let mut reports = Vec::new();
        for n in [20usize, 100, 1000] {
            let r = run(&SimConfig::new(n));
            println!(
                "sim N={:>4}: {} joiners chose in {:?}; {} rounds, {} messages ({:.0} per round, {:.0} per round per node), {:.1} KiB per round",
                r.nodes,
                r.joiners,
                r.time_to_all_chosen,
                r.rounds,
                r.messages,
                r.messages_per_round,
                r.messages_per_round / n as f64,
                r.bytes_per_round / 1024.0
            );
            assert_eq!(r.chosen, r.joiners, "every joiner chose a snapshot: {r:?}");
            assert!(
                r.time_to_all_chosen.unwrap() < Duration::from_secs(10),
                "within a round or two: {r:?}"
            );
            reports.push(r);
        }
        // Messages per round grow linearly: 10x the nodes, about 10x the messages (well
        // below the 100x a quadratic cost would give).
        for pair in reports.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            let growth = b.messages_per_round / a.messages_per_round;
            let nodes = b.nodes as f64 / a.nodes as f64;
            assert!(
                growth < nodes * 2.0 && growth > nodes / 4.0,
                "{} -> {} nodes: messages per round grew {growth:.1}x",
                a.nodes,
                b.nodes
            );
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_figures() {
        let c = SimConfig::new(50);
        assert_eq!(run(&c), run(&c));
    }
}
