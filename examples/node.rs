//! A headless snapsync node for scripts: one JSON object per line on stdout for each event a
//! script needs (`listening` always first), human logs on stderr.
//!
//! ```text
//! # a producer executing a chain (several producers with the same --genesis-unix-ms and
//! # --state-mib execute the same chain and make byte-identical snapshots; one that starts
//! # empty or behind the chain's clock syncs from the others first, then executes on)
//! cargo run --example node -- --data-dir /tmp/a --produce --state-mib 64
//! # a node that syncs from it and exits
//! cargo run --example node -- --data-dir /tmp/b --peer /ip4/127.0.0.1/udp/PORT/quic-v1/p2p/ID --exit-after-sync
//! ```
//!
//! `SNAPSHOT_TOKEN` and `SNAPSHOT_CHUNK_SIZE` are read from the environment. With
//! `--exit-after-sync` the node exits 0 right after its `synced` event, and 2 with a message on
//! stderr when syncing is impossible (a wrong token, or nothing to sync before `--timeout`: the
//! message then names the peers that could not be reached). SIGINT and SIGTERM shut it down
//! gracefully: the download's progress is made durable and every connection closed.

#[path = "support/node.rs"]
mod node;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use libp2p::{Multiaddr, PeerId};
use node::{Chain, NodeEvent, Options};
use serde_json::json;
use snapsync::{Event, SyncError, TrustPolicy};

/// A headless snapsync node.
#[derive(Parser, Debug)]
struct Args {
    /// Directory of the state DB, snapshots and identity.
    #[arg(long)]
    data_dir: PathBuf,
    /// libp2p listen address (default: QUIC on every interface, an OS-chosen port).
    #[arg(long, default_value = "/ip4/0.0.0.0/udp/0/quic-v1")]
    listen: Vec<Multiaddr>,
    /// Chunk-stream UDP address.
    #[arg(long, default_value = "0.0.0.0:0")]
    streamer: SocketAddr,
    /// A peer to dial (repeatable); without any, peers are found on the LAN by mDNS.
    #[arg(long)]
    peer: Vec<Multiaddr>,
    /// Execute the chain and make snapshots. Empty or behind the chain (by its clock: see
    /// --genesis-unix-ms, --slot-ms), the node syncs from its peers first, then executes on.
    #[arg(long)]
    produce: bool,
    /// The chain's initial state, in MiB.
    #[arg(long, default_value_t = 0)]
    state_mib: u64,
    /// Milliseconds per slot.
    #[arg(long, default_value_t = 400)]
    slot_ms: u64,
    /// When the chain's slot 0 was, milliseconds since the Unix epoch (default: now). Producers
    /// of one chain must agree on it.
    #[arg(long)]
    genesis_unix_ms: Option<u64>,
    /// What the chain's writes derive from.
    #[arg(long, default_value_t = 1)]
    chain_seed: u64,
    /// Stop producing at this slot.
    #[arg(long)]
    stop_at_slot: Option<u64>,
    /// Slots between snapshots (RangeForSnapshot).
    #[arg(long, default_value_t = 50)]
    range_for_snapshot: u64,
    /// Slots between full snapshots (the snapshots between are incremental).
    #[arg(long, default_value_t = snapsync::layers::snapshot::DEFAULT_FULL_INTERVAL)]
    full_interval: u64,
    /// Serving cap per downloading peer, bytes per second.
    #[arg(long)]
    rate_limit_per_peer: Option<u64>,
    /// Discovery interval in seconds.
    #[arg(long, default_value_t = 30)]
    discovery_secs: u64,
    /// A trusted peer (repeatable): only snapshots `--trust-quorum` of them vouch for are taken,
    /// each by advertising it or by its signature that any holder or web source relays.
    #[arg(long)]
    trust_peer: Vec<PeerId>,
    /// How many trusted peers must vouch for the same snapshot (default 1).
    #[arg(long, default_value_t = 1)]
    trust_quorum: usize,
    /// Without trusted peers: how many distinct peers must advertise the same snapshot.
    #[arg(long, default_value_t = 1)]
    min_agreeing: usize,
    /// Exit right after the first successful sync.
    #[arg(long)]
    exit_after_sync: bool,
    /// With --exit-after-sync: give up after this many seconds.
    #[arg(long)]
    timeout: Option<u64>,
    /// Serve Prometheus metrics on this address (at /metrics).
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// A web source (repeatable): the base URL of a directory of published snapshots on a
    /// static HTTP(S) server or bucket. What it lists counts as one untrusted peer's advert.
    #[arg(long)]
    web_source: Vec<String>,
    /// A CA bundle (PEM, repeatable) HTTPS web sources are checked against, beside the Mozilla
    /// roots and the OS's trust store: a mirror behind a private CA.
    #[arg(long)]
    web_ca: Vec<PathBuf>,
    /// Mirror this node's snapshots into this directory, for a static web server to serve.
    #[arg(long)]
    publish_dir: Option<PathBuf>,
    /// Print a `stats` line (what the chunk stream served, CPU time) every this many seconds.
    #[arg(long)]
    stats_secs: Option<u64>,
}

fn emit(value: serde_json::Value) {
    println!("{value}");
}

fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    emit(json!({"event": "error", "message": message}));
    std::process::exit(2);
}

/// CPU seconds this process has used.
fn cpu_secs() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    ((tv(ru.ru_utime) + tv(ru.ru_stime)) * 1000.0).round() / 1000.0
}

/// Seconds, to the millisecond.
fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

fn kind_of(full: bool) -> &'static str {
    if full { "full" } else { "incremental" }
}

/// Waits for SIGINT or SIGTERM.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// The node's settings, as the command line gives them.
fn options(args: &Args) -> Options {
    let mut opts = Options::new(&args.data_dir);
    opts.listen = args.listen.clone();
    opts.streamer = args.streamer;
    opts.peers = args.peer.clone();
    opts.mdns = args.peer.is_empty();
    opts.chain = args.produce.then(|| Chain {
        seed: args.chain_seed,
        state_mib: args.state_mib,
        slot_ms: args.slot_ms,
        genesis_unix_ms: args.genesis_unix_ms.unwrap_or_else(node::now_unix_ms),
    });
    opts.stop_at_slot = args.stop_at_slot;
    opts.range_for_snapshot = args.range_for_snapshot;
    opts.full_interval = args.full_interval;
    opts.rate_limit_per_peer = args.rate_limit_per_peer;
    opts.discovery_interval = Duration::from_secs(args.discovery_secs.max(1));
    opts.trust = if args.trust_peer.is_empty() {
        TrustPolicy::Untrusted {
            min_agreeing_peers: args.min_agreeing,
        }
    } else {
        TrustPolicy::TrustedPeers {
            peers: args.trust_peer.iter().copied().collect(),
            quorum: args.trust_quorum,
        }
    };
    opts.metrics = args.metrics;
    opts.web_sources = args.web_source.clone();
    opts.web_ca_files = args.web_ca.clone();
    opts.publish_dir = args.publish_dir.clone();
    opts
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    let mut node = match node::start(options(&args)).await {
        Ok(n) => n,
        Err(e) => fail(&format!("cannot start the node: {e}")),
    };
    let deadline = args
        .timeout
        .map(|t| tokio::time::Instant::now() + Duration::from_secs(t));
    let mut lines = Lines::default();
    let signal = shutdown_signal();
    tokio::pin!(signal);
    let mut stats =
        tokio::time::interval(Duration::from_secs(args.stats_secs.unwrap_or(3600).max(1)));
    loop {
        let next = async {
            match deadline {
                Some(d) => tokio::time::timeout_at(d, node.events.recv()).await.ok(),
                None => Some(node.events.recv().await),
            }
        };
        let event = tokio::select! {
            _ = &mut signal => {
                node.shutdown().await;
                emit(json!({"event": "shutdown"}));
                std::process::exit(0);
            }
            _ = stats.tick(), if args.stats_secs.is_some() => {
                emit_stats(&node).await;
                continue;
            }
            event = next => event,
        };
        match event {
            None => fail(&lines.timed_out()),
            Some(None) => return,
            Some(Some(NodeEvent::Snap(event))) => {
                if let Some(exit) = lines.snap(event, args.exit_after_sync) {
                    node.shutdown().await;
                    std::process::exit(exit);
                }
            }
            Some(Some(event)) => lines.node(&node, event).await,
        }
    }
}

/// A `stats` line: what the chunk stream served, and CPU time.
async fn emit_stats(node: &node::NodeHandle) {
    if let Some(s) = node
        .query(|s, _| s.behaviour().snapsync.streamer_stats())
        .await
    {
        emit(json!({
            "event": "stats",
            "served_bytes": s.bytes_served,
            "requests_served": s.requests_served,
            "connections_accepted": s.connections_accepted,
            "closed_too_slow": s.closed_too_slow,
            "cpu_secs": cpu_secs(),
        }));
    }
}

/// The JSON lines of the events, with what they need to remember.
#[derive(Default)]
struct Lines {
    /// When the first download of the sync under way started.
    sync_started: Option<Instant>,
    /// When a progress line was last written (one a second at most).
    last_progress: Option<Instant>,
    /// The addresses that could not be dialled, and why.
    unreachable: BTreeMap<String, String>,
}

impl Lines {
    /// The message of a node that gave up waiting for a sync.
    fn timed_out(&self) -> String {
        let mut message = "timed out before a snapshot was synced".to_string();
        if !self.unreachable.is_empty() {
            let list: Vec<String> = (self.unreachable.iter())
                .map(|(a, why)| format!("{a} ({why})"))
                .collect();
            message.push_str(&format!("; could not reach: {}", list.join(", ")));
        }
        message
    }

    /// The lines of the node's own events (its addresses, its connections).
    async fn node(&mut self, node: &node::NodeHandle, event: NodeEvent) {
        match event {
            NodeEvent::Listening { addrs } => {
                let streamer = node
                    .query(|s, _| s.behaviour().snapsync.status().streamer_addrs)
                    .await
                    .unwrap_or_default();
                emit(json!({
                    "event": "listening",
                    "peer_id": node.peer_id.to_string(),
                    "addrs": addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                    "streamer": streamer.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                }));
            }
            NodeEvent::Connected(peer) => {
                emit(json!({"event": "peer_connected", "peer_id": peer.to_string()}))
            }
            NodeEvent::Disconnected(peer) => {
                emit(json!({"event": "peer_disconnected", "peer_id": peer.to_string()}))
            }
            NodeEvent::Chat { .. } | NodeEvent::Slot(_) | NodeEvent::Snap(_) => {}
        }
    }

    /// The line of one of snapsync's events; `Some(code)` when the node should exit with it
    /// (`exit_after_sync`: 0 once synced, 2 when syncing cannot work).
    fn snap(&mut self, event: Event, exit_after_sync: bool) -> Option<i32> {
        match event {
            Event::DownloadStarted {
                key,
                peers,
                resumed_bytes,
            } => {
                self.sync_started.get_or_insert_with(Instant::now);
                emit(json!({
                    "event": "download_started",
                    "kind": key.kind.as_str(),
                    "slot": key.slot,
                    "bytes": key.archive_size,
                    "resumed_bytes": resumed_bytes,
                    "peers": peers.len(),
                }));
            }
            Event::DownloadProgress(p) => {
                let due = self
                    .last_progress
                    .is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
                if due || p.finished {
                    self.last_progress = Some(Instant::now());
                    emit(json!({
                        "event": "progress",
                        "root": p.root.to_hex(),
                        "done": p.done_bytes,
                        "total": p.total_bytes,
                        "rate": p.rate as u64,
                        "eta_secs": p.eta.map(secs),
                        "served": p.served_bytes,
                        "peers": p.peers.iter().map(|pp| json!({"peer_id": pp.peer_id.to_string(), "bytes": pp.bytes, "partial": pp.partial})).collect::<Vec<_>>(),
                    }));
                }
            }
            Event::SnapshotSynced { elapsed, .. } => {
                let took = (self.sync_started.take())
                    .map(|s| s.elapsed())
                    .unwrap_or(elapsed);
                emit(synced_line(&event, took));
                if exit_after_sync {
                    return Some(0);
                }
            }
            Event::SyncFailed { key, error } => {
                emit(json!({
                    "event": "sync_failed",
                    "kind": key.kind.as_str(),
                    "slot": key.slot,
                    "error": error.to_string(),
                }));
                let unauthorized = matches!(&error, SyncError::Download(e) if e.is_unauthorized());
                if exit_after_sync && unauthorized {
                    fail(&format!("cannot sync: {error}"));
                }
            }
            Event::PeerUnreachable { peer, addresses } => {
                for (addr, why) in &addresses {
                    self.unreachable.insert(addr.to_string(), why.to_string());
                }
                emit(json!({
                    "event": "dial_failed",
                    "peer_id": peer.map(|p| p.to_string()),
                    "addresses": addresses.iter().map(|(a, why)| json!({"addr": a.to_string(), "error": why.to_string()})).collect::<Vec<_>>(),
                }));
            }
            other => {
                if let Some(line) = line_of(&other) {
                    emit(line);
                }
            }
        }
        None
    }
}

/// The `synced` line of a [`Event::SnapshotSynced`] that took `took` since its download started.
fn synced_line(event: &Event, took: Duration) -> serde_json::Value {
    let Event::SnapshotSynced {
        slot,
        bank_hash,
        kind,
        with_full,
        bytes,
        fetched_bytes,
        served_bytes,
        per_peer,
        ..
    } = event
    else {
        return serde_json::Value::Null;
    };
    json!({
        "event": "synced",
        "slot": slot,
        "bank_hash": bank_hash.to_hex(),
        "kind": kind.as_str(),
        "fetched": if *with_full { "full+incremental" } else { kind_of(false) },
        "with_full": with_full,
        "bytes": bytes,
        "fetched_bytes": fetched_bytes,
        "served_bytes": served_bytes,
        "secs": secs(took),
        "cpu_secs": cpu_secs(),
        "peers": per_peer.iter().filter(|(_, b)| *b > 0).count(),
        "per_peer": per_peer.iter().map(|(p, b)| json!({"peer_id": p.to_string(), "bytes": b})).collect::<Vec<_>>(),
    })
}

/// The line of an event that needs nothing remembered.
fn line_of(event: &Event) -> Option<serde_json::Value> {
    Some(match event {
        Event::SnapshotCreated { manifest } => json!({
            "event": "snapshot_created",
            "kind": manifest.kind.as_str(),
            "slot": manifest.slot,
            "bank_hash": manifest.bank_hash.to_hex(),
            "content_root": manifest.content_root.to_hex(),
            "base_slot": manifest.base.map(|b| b.slot),
            "bytes": manifest.archive_size,
        }),
        Event::DiscoveryStarted { round, local_slot } => json!({
            "event": "discovery_started", "round": round, "local_slot": local_slot,
        }),
        Event::NoSnapshotAvailable { round, adverts } => json!({
            "event": "no_snapshot", "round": round, "adverts": adverts,
        }),
        Event::SnapshotFound {
            key,
            full,
            peers,
            bytes,
        } => json!({
            "event": "snapshot_found",
            "kind": key.kind.as_str(),
            "slot": key.slot,
            "bank_hash": key.bank_hash.to_hex(),
            "with_full_slot": full.map(|f| f.slot),
            "bytes": bytes,
            "peers": peers.len(),
        }),
        Event::ConflictingSnapshots(c) => json!({
            "event": "conflict", "slot": c.slot, "variants": c.variants.len(),
        }),
        Event::CreationFailed(e) => json!({"event": "creation_failed", "error": e.to_string()}),
        Event::PeerMisbehaved { peer, reason } => json!({
            "event": "peer_misbehaved", "peer_id": peer.to_string(), "reason": reason,
        }),
        _ => return None,
    })
}
