//! A chat-style snapsync peer: every run is a node that finds the others on the LAN by mDNS (or
//! `--peer MULTIADDR`), sends each line typed on stdin to the chat topic of its own gossipsub,
//! composed beside `snapsync::Behaviour`, and syncs state snapshots with the others.
//!
//! ```text
//! cargo run --example chat -- --produce --state-mib 32 --genesis-unix-ms G   # a validator
//! cargo run --example chat -- --produce --state-mib 32 --genesis-unix-ms G   # another: it syncs
//!                                                        # from the first, then executes on
//! cargo run --example chat                               # a peer that syncs
//! ```
//!
//! A producer executes a chain: chat lines become part of its state, beside synthetic state of
//! `--state-mib` MiB, and it makes a snapshot every `--range-for-snapshot` slots, a full one
//! every `--full-interval` slots and incremental ones between. A node started later syncs the
//! full snapshot and the newest incremental one, with a progress bar per download; later it
//! catches up by incremental snapshots only. Commands: `/peers`, `/snapshots`, `/sync`,
//! `/status`, `/quit`. With `--trust-peer ID` (repeatable) and `--trust-quorum K` it takes only
//! what K of those peers vouch for, by advertising it or by their signatures that any holder
//! relays: the validator-set case.

#[path = "support/node.rs"]
mod node;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use libp2p::{Multiaddr, PeerId};
use node::{Chain, NodeEvent, Options, human_bytes, plural};
use snapsync::event::Phase;
use snapsync::{ContentRoot, Event, TrustPolicy};
use tokio::io::{AsyncBufReadExt, BufReader};

/// A chat-style snapsync peer.
#[derive(Parser, Debug)]
struct Args {
    /// Directory of the state DB, snapshots and identity (default: a new temporary one).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// A peer to dial (repeatable); mDNS finds peers on the LAN either way.
    #[arg(long)]
    peer: Vec<Multiaddr>,
    /// Execute the chain and make snapshots. Empty or behind the chain (by its clock: see
    /// --genesis-unix-ms, --slot-ms), the node syncs from its peers first, then executes on.
    #[arg(long)]
    produce: bool,
    /// When the chain's slot 0 was, milliseconds since the Unix epoch (default: now). Nodes
    /// executing one chain must agree on it.
    #[arg(long)]
    genesis_unix_ms: Option<u64>,
    /// The chain's initial state, in MiB.
    #[arg(long, default_value_t = 16)]
    state_mib: u64,
    /// Milliseconds per slot when producing.
    #[arg(long, default_value_t = 200)]
    slot_ms: u64,
    /// Slots between snapshots (RangeForSnapshot).
    #[arg(long, default_value_t = 50)]
    range_for_snapshot: u64,
    /// Slots between full snapshots.
    #[arg(long, default_value_t = 500)]
    full_interval: u64,
    /// A trusted peer (repeatable).
    #[arg(long)]
    trust_peer: Vec<PeerId>,
    /// How many trusted peers must vouch for the same snapshot (advertise it, or sign it).
    #[arg(long, default_value_t = 1)]
    trust_quorum: usize,
    /// Serve Prometheus metrics on this address (at /metrics).
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// A web source (repeatable): the base URL of a directory of published snapshots on a
    /// static HTTP(S) server or bucket. What it lists counts as one untrusted peer's advert.
    #[arg(long)]
    web_source: Vec<String>,
    /// Mirror this node's snapshots into this directory, for a static web server to serve.
    #[arg(long)]
    publish_dir: Option<PathBuf>,
}

fn phase_words(p: Phase) -> &'static str {
    match p {
        Phase::Idle => "idle",
        Phase::Collecting => "collecting answers",
        Phase::Downloading => "downloading",
        Phase::Loading => "loading",
        _ => "busy",
    }
}

/// One download's bar and figures.
struct Bar {
    bar: indicatif::ProgressBar,
    started: Instant,
    resumed: u64,
    /// When it finished, and the bytes it fetched.
    finished: Option<(Instant, u64)>,
}

/// What the downloads of one sync fetched, and over how long: from the first one's start to
/// the last one's end, the same clock the bars' averages use.
fn fetched_over(bars: &HashMap<ContentRoot, Bar>) -> Option<(u64, f64)> {
    let start = bars.values().map(|b| b.started).min()?;
    let end = bars
        .values()
        .filter_map(|b| b.finished.map(|f| f.0))
        .max()?;
    let bytes = bars.values().filter_map(|b| b.finished.map(|f| f.1)).sum();
    Some((bytes, end.duration_since(start).as_secs_f64().max(1e-3)))
}

type Error = Box<dyn std::error::Error + Send + Sync>;

/// The node's settings, as the command line gives them.
fn options(args: &Args, data_dir: &std::path::Path) -> Result<Options, Error> {
    let mut opts = Options::new(data_dir);
    opts.listen = vec![
        "/ip4/0.0.0.0/udp/0/quic-v1".parse()?,
        "/ip4/0.0.0.0/tcp/0".parse()?,
    ];
    opts.peers = args.peer.clone();
    opts.mdns = true;
    opts.chain = args.produce.then(|| Chain {
        seed: 1,
        state_mib: args.state_mib,
        slot_ms: args.slot_ms,
        genesis_unix_ms: args.genesis_unix_ms.unwrap_or_else(node::now_unix_ms),
    });
    opts.range_for_snapshot = args.range_for_snapshot;
    opts.full_interval = args.full_interval;
    opts.discovery_interval = Duration::from_secs(10);
    opts.metrics = args.metrics;
    opts.web_sources = args.web_source.clone();
    opts.publish_dir = args.publish_dir.clone();
    if !args.trust_peer.is_empty() {
        opts.trust = TrustPolicy::TrustedPeers {
            peers: args.trust_peer.iter().copied().collect(),
            quorum: args.trust_quorum,
        };
    }
    Ok(opts)
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let _tmp;
    let data_dir = match &args.data_dir {
        Some(d) => d.clone(),
        None => {
            let t = tempfile::tempdir()?;
            let d = t.path().to_path_buf();
            _tmp = t;
            d
        }
    };
    let node = node::start(options(&args, &data_dir)?).await?;
    println!("peer {} ({})", node.peer_id, data_dir.display());
    println!("type a line to chat; /peers /snapshots /sync /status /quit");
    let mut chat = Chat {
        node,
        bars: indicatif::MultiProgress::new(),
        downloads: HashMap::new(),
        asked_to_sync: false,
    };
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    loop {
        tokio::select! {
            line = stdin.next_line() => {
                let Some(line) = line? else { break };
                if !chat.command(line.trim()).await? {
                    break;
                }
            }
            event = chat.node.events.recv() => {
                let Some(event) = event else { break };
                chat.event(event).await?;
            }
        }
    }
    chat.node.shutdown().await;
    Ok(())
}

/// The chat session: the node, and the download bars on screen.
struct Chat {
    node: node::NodeHandle,
    bars: indicatif::MultiProgress,
    downloads: HashMap<ContentRoot, Bar>,
    /// `/sync` was typed: the next round's answer is said.
    asked_to_sync: bool,
}

impl Chat {
    /// Prints a line above the bars.
    fn say(&self, line: String) {
        self.bars.suspend(|| println!("{line}"));
    }

    async fn status(&self) -> Result<snapsync::Status, Error> {
        let status = self.node.query(|s, _| s.behaviour().snapsync.status());
        Ok(status.await.ok_or("node stopped")?)
    }

    /// Carries out a line typed; `false` to quit.
    async fn command(&mut self, line: &str) -> Result<bool, Error> {
        match line {
            "" => {}
            "/quit" => return Ok(false),
            "/peers" => self.peers().await?,
            "/snapshots" => self.snapshots().await?,
            "/sync" => {
                self.asked_to_sync = true;
                self.node
                    .query(|s, _| s.behaviour_mut().snapsync.sync_now())
                    .await;
                self.say("asking peers for newer snapshots".into());
            }
            "/status" => {
                let status = self.status().await?;
                let addrs: Vec<String> = status
                    .streamer_addrs
                    .iter()
                    .map(|a| a.to_string())
                    .collect();
                self.say(format!(
                    "{}; chunk stream on {}",
                    phase_words(status.phase),
                    addrs.join(", ")
                ));
                let st = status.stats;
                self.say(format!(
                    "  {}, {} sent, {} received; {} received; {} dropped as malformed",
                    plural(st.rounds as usize, "discovery round"),
                    plural(st.requests_published as usize, "request"),
                    plural(st.answers_received as usize, "answer"),
                    plural(st.announcements_received as usize, "announcement"),
                    plural(st.malformed as usize, "message"),
                ));
            }
            text if text.starts_with('/') => self.say(format!("unknown command {text}")),
            text => self.node.chat(text.to_string()).await,
        }
        Ok(true)
    }

    /// `/peers`: the peers connected, and the newest snapshot each advertises.
    async fn peers(&self) -> Result<(), Error> {
        let (peers, status) = self
            .node
            .query(|s, _| {
                let peers: Vec<PeerId> = s.connected_peers().copied().collect();
                (peers, s.behaviour().snapsync.status())
            })
            .await
            .ok_or("node stopped")?;
        self.say(format!("{} connected", plural(peers.len(), "peer")));
        for p in peers {
            let advert = status.adverts.iter().find(|a| a.peer == p);
            let snap = advert
                .and_then(|a| a.newest())
                .map(|s| {
                    format!(
                        "{} snapshot at slot {} ({})",
                        s.key.kind,
                        s.key.slot,
                        human_bytes(s.key.archive_size)
                    )
                })
                .unwrap_or_else(|| "no snapshot heard of".into());
            self.say(format!("  {p}  {snap}"));
        }
        Ok(())
    }

    /// `/snapshots`: the state's slot, and the snapshots this node holds.
    async fn snapshots(&self) -> Result<(), Error> {
        let status = self.status().await?;
        let slot = status
            .local_slot
            .map_or("empty".to_string(), |s| format!("at slot {s}"));
        let best = status
            .best_known_slot
            .map_or("none heard of".to_string(), |s| {
                format!("newest heard of at slot {s}")
            });
        self.say(format!("state {slot}; snapshots: {best}"));
        if status.snapshots.is_empty() {
            self.say("  this node holds no snapshot".into());
            return Ok(());
        }
        self.say(format!(
            "  {:<12} {:>10} {:>10}  {:<8}  {:<8}",
            "kind", "slot", "size", "bank", "root"
        ));
        for m in status.snapshots {
            self.say(format!(
                "  {:<12} {:>10} {:>10}  {:<8}  {:<8}",
                m.kind.as_str(),
                m.slot,
                human_bytes(m.archive_size),
                m.bank_hash.short(),
                m.content_root.short()
            ));
        }
        Ok(())
    }

    /// Says what the node reports.
    async fn event(&mut self, event: NodeEvent) -> Result<(), Error> {
        match event {
            NodeEvent::Listening { addrs } => {
                for a in addrs {
                    self.say(format!("listening on {a}"));
                }
            }
            NodeEvent::Chat { from, text } => self.say(format!("<{}> {text}", node::short(&from))),
            NodeEvent::Connected(p) => self.say(format!("* connected to {p}")),
            NodeEvent::Disconnected(p) => self.say(format!("* disconnected from {p}")),
            NodeEvent::Slot(_) => {}
            NodeEvent::Snap(event) => self.snap(event).await?,
        }
        Ok(())
    }

    /// Says what snapsync reports, and draws the downloads' bars.
    async fn snap(&mut self, event: Event) -> Result<(), Error> {
        match event {
            Event::SnapshotCreated { manifest } => self.say(format!(
                "* made {} snapshot at slot {}: {}, bank hash {}",
                if manifest.is_full() {
                    "a full"
                } else {
                    "an incremental"
                },
                manifest.slot,
                human_bytes(manifest.archive_size),
                manifest.bank_hash.short()
            )),
            Event::SnapshotFound {
                key,
                full,
                peers,
                bytes,
            } => {
                let what = match full {
                    Some(f) if f != key => format!(
                        "the full snapshot at slot {} and the incremental one at slot {}",
                        f.slot, key.slot
                    ),
                    Some(_) => format!("the full snapshot at slot {}", key.slot),
                    None => format!(
                        "the incremental snapshot at slot {} (the full base is already here)",
                        key.slot
                    ),
                };
                self.say(format!(
                    "* fetching {what}: {} from {}",
                    human_bytes(bytes),
                    plural(peers.len(), "peer")
                ));
            }
            // The answer to `/sync`, when nothing newer is offered.
            Event::NoSnapshotAvailable { .. } if std::mem::take(&mut self.asked_to_sync) => {
                match self.status().await?.local_slot {
                    Some(s) => self.say(format!(
                        "* up to date: no snapshot newer than slot {s} is offered"
                    )),
                    None => self.say("* no snapshot offered yet".into()),
                }
            }
            Event::DownloadStarted {
                key, resumed_bytes, ..
            } => {
                let bar = self.bars.add(node::progress_bar(key.archive_size));
                bar.set_prefix(key.kind.as_str().to_string());
                let bar = Bar {
                    bar,
                    started: Instant::now(),
                    resumed: resumed_bytes,
                    finished: None,
                };
                self.downloads.insert(key.content_root, bar);
            }
            Event::DownloadProgress(p) => {
                if let Some(b) = self.downloads.get_mut(&p.root) {
                    node::update_bar(&b.bar, &p);
                    if p.finished && b.finished.is_none() {
                        let fetched = p.done_bytes.saturating_sub(b.resumed);
                        let took = b.started.elapsed().as_secs_f64().max(1e-3);
                        b.finished = Some((Instant::now(), fetched));
                        b.bar.finish_with_message(format!(
                            "{}/s on average",
                            human_bytes((fetched as f64 / took) as u64)
                        ));
                    }
                }
            }
            Event::SnapshotSynced {
                slot,
                bank_hash,
                kind,
                with_full,
                fetched_bytes,
                elapsed,
                per_peer,
                ..
            } => {
                let (fetched, secs) = fetched_over(&self.downloads)
                    .unwrap_or((fetched_bytes, elapsed.as_secs_f64().max(1e-3)));
                for (_, b) in self.downloads.drain() {
                    b.bar.finish_and_clear();
                }
                let how = node::sync_words(kind, with_full);
                self.say(format!(
                    "* synced slot {slot} ({how}): fetched {} in {secs:.2} s ({}/s), live {:.2} s after the choice; every chunk verified, bank hash {} recomputed and matching",
                    human_bytes(fetched),
                    human_bytes((fetched as f64 / secs) as u64),
                    elapsed.as_secs_f64(),
                    bank_hash.short()
                ));
                for (p, b) in per_peer.iter().filter(|(_, b)| *b > 0) {
                    self.say(format!("    {:>10} from {p}", human_bytes(*b)));
                }
            }
            Event::SyncFailed { error, .. } => {
                for (_, b) in self.downloads.drain() {
                    b.bar.abandon();
                }
                self.say(format!(
                    "* sync failed: {error}; trying again at the next round"
                ));
            }
            Event::ConflictingSnapshots(c) => self.say(format!(
                "* peers disagree about slot {}: {} different states offered",
                c.slot,
                c.variants.len()
            )),
            Event::PeerMisbehaved { peer, reason } => {
                self.say(format!("* ignoring {peer}: {reason}"))
            }
            Event::PeerUnreachable { addresses, .. } => {
                for (a, why) in addresses {
                    self.say(format!("* cannot reach {a}: {why}"));
                }
            }
            Event::CreationFailed(e) => self.say(format!("* snapshot failed: {e}")),
            _ => {}
        }
        Ok(())
    }
}
