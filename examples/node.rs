//! A headless snapsync node for scripts: one JSON object per line on stdout for each event a
//! script needs, human logs on stderr.
//!
//! ```text
//! cargo run --release --example node -- --data-dir /tmp/a --produce --state-mib 64
//! cargo run --release --example node -- --data-dir /tmp/b --peer /ip4/127.0.0.1/udp/PORT/quic-v1 --exit-after-sync
//! ```
//!
//! `SNAPSHOT_TOKEN` and `SNAPSHOT_CHUNK_SIZE` are read from the environment. With
//! `--exit-after-sync` the node exits 0 right after its `synced` event, and 2 with a message on
//! stderr when syncing is impossible (a wrong token, or nothing to sync before `--timeout`).

#[path = "support/node.rs"]
mod node;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use libp2p::Multiaddr;
use node::{NodeEvent, Options};
use serde_json::json;
use snapsync::{Event, SyncError};

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
    /// Advance slots and make snapshots (a producer does not sync).
    #[arg(long)]
    produce: bool,
    /// Synthetic state to write before producing, in MiB.
    #[arg(long, default_value_t = 0)]
    state_mib: u64,
    /// Milliseconds per slot when producing.
    #[arg(long, default_value_t = 400)]
    slot_ms: u64,
    /// Slots between snapshots (RangeForSnapshot).
    #[arg(long, default_value_t = 50)]
    range_for_snapshot: u64,
    /// Serving cap per downloading peer, bytes per second.
    #[arg(long)]
    rate_limit_per_peer: Option<u64>,
    /// Discovery interval in seconds.
    #[arg(long, default_value_t = 30)]
    discovery_secs: u64,
    /// Exit right after the first successful sync.
    #[arg(long)]
    exit_after_sync: bool,
    /// With --exit-after-sync: give up after this many seconds.
    #[arg(long)]
    timeout: Option<u64>,
    /// Serve Prometheus metrics on this address.
    #[arg(long)]
    metrics: Option<SocketAddr>,
}

fn emit(value: serde_json::Value) {
    println!("{value}");
}

fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    emit(json!({"event": "error", "message": message}));
    std::process::exit(2);
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
    let mut opts = Options::new(&args.data_dir);
    opts.listen = args.listen.clone();
    opts.streamer = args.streamer;
    opts.peers = args.peer.clone();
    opts.mdns = args.peer.is_empty();
    opts.produce_slot_ms = args.produce.then_some(args.slot_ms);
    opts.state_mib = args.state_mib;
    opts.range_for_snapshot = args.range_for_snapshot;
    opts.rate_limit_per_peer = args.rate_limit_per_peer;
    opts.discovery_interval = Duration::from_secs(args.discovery_secs.max(1));
    opts.metrics = args.metrics;
    let mut node = match node::start(opts).await {
        Ok(n) => n,
        Err(e) => fail(&format!("cannot start the node: {e}")),
    };
    let deadline = args
        .timeout
        .map(|t| tokio::time::Instant::now() + Duration::from_secs(t));
    let mut sync_started: Option<Instant> = None;
    let mut last_progress = Instant::now();
    loop {
        let next = async {
            match deadline {
                Some(d) => tokio::time::timeout_at(d, node.events.recv()).await.ok(),
                None => Some(node.events.recv().await),
            }
        };
        let Some(event) = next.await else {
            fail("timed out before a snapshot was synced");
        };
        let Some(event) = event else { return };
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
            NodeEvent::Chat { .. } | NodeEvent::Slot(_) => {}
            NodeEvent::Snap(event) => match event {
                Event::SnapshotCreated { manifest } => emit(json!({
                    "event": "snapshot_created",
                    "slot": manifest.slot,
                    "bank_hash": manifest.bank_hash.to_hex(),
                    "content_root": manifest.content_root.to_hex(),
                    "bytes": manifest.archive_size,
                })),
                Event::DiscoveryStarted { round, local_slot } => emit(json!({
                    "event": "discovery_started", "round": round, "local_slot": local_slot,
                })),
                Event::NoSnapshotAvailable { round, adverts } => emit(json!({
                    "event": "no_snapshot", "round": round, "adverts": adverts,
                })),
                Event::SnapshotFound { key, peers } => emit(json!({
                    "event": "snapshot_found",
                    "slot": key.slot,
                    "bank_hash": key.bank_hash.to_hex(),
                    "bytes": key.archive_size,
                    "peers": peers.len(),
                })),
                Event::DownloadStarted { key, peers } => {
                    sync_started = Some(Instant::now());
                    emit(
                        json!({"event": "download_started", "slot": key.slot, "peers": peers.len()}),
                    );
                }
                Event::DownloadProgress(p) => {
                    if last_progress.elapsed() >= Duration::from_secs(1) || p.finished {
                        last_progress = Instant::now();
                        emit(json!({
                            "event": "progress",
                            "done": p.done_bytes,
                            "total": p.total_bytes,
                            "rate": p.rate as u64,
                            "eta_secs": p.eta.map(|e| e.as_secs_f64()),
                            "peers": p.peers.iter().map(|pp| json!({"peer_id": pp.peer_id.to_string(), "bytes": pp.bytes})).collect::<Vec<_>>(),
                        }));
                    }
                }
                Event::SnapshotSynced {
                    slot,
                    bank_hash,
                    bytes,
                    elapsed,
                    per_peer,
                } => {
                    let secs = sync_started
                        .map(|s| s.elapsed())
                        .unwrap_or(elapsed)
                        .as_secs_f64();
                    emit(json!({
                        "event": "synced",
                        "slot": slot,
                        "bank_hash": bank_hash.to_hex(),
                        "bytes": bytes,
                        "secs": secs,
                        "peers": per_peer.iter().filter(|(_, b)| *b > 0).count(),
                        "per_peer": per_peer.iter().map(|(p, b)| json!({"peer_id": p.to_string(), "bytes": b})).collect::<Vec<_>>(),
                    }));
                    if args.exit_after_sync {
                        std::process::exit(0);
                    }
                }
                Event::SyncFailed { key, error } => {
                    emit(
                        json!({"event": "sync_failed", "slot": key.slot, "error": error.to_string()}),
                    );
                    let unauthorized =
                        matches!(&error, SyncError::Download(e) if e.is_unauthorized());
                    if args.exit_after_sync && unauthorized {
                        fail(&format!("cannot sync: {error}"));
                    }
                }
                Event::ConflictingSnapshots(c) => emit(json!({
                    "event": "conflict", "slot": c.slot, "variants": c.variants.len(),
                })),
                Event::CreationFailed(e) => {
                    emit(json!({"event": "creation_failed", "error": e.to_string()}))
                }
                Event::PeerMisbehaved { peer, reason } => emit(json!({
                    "event": "peer_misbehaved", "peer_id": peer.to_string(), "reason": reason,
                })),
            },
        }
    }
}
