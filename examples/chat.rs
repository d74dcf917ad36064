//! A chat-style snapsync peer: every run is a node that finds the others on the LAN by mDNS (or
//! `--peer MULTIADDR`), sends each line typed on stdin to the chat topic of its own gossipsub,
//! composed beside `snapsync::Behaviour`, and syncs state snapshots with the others.
//!
//! ```text
//! cargo run --release --example chat -- --produce --state-mib 32   # a producer
//! cargo run --release --example chat                               # a peer that syncs
//! ```
//!
//! A producer advances slots: chat lines become part of its state, beside synthetic state of
//! `--state-mib` MiB, and it makes a snapshot every `--range-for-snapshot` slots. A node
//! started later syncs that state, with a progress bar, then shows the loaded slot and bank
//! hash. Commands: `/peers`, `/snapshots`, `/sync`, `/status`, `/quit`.

#[path = "support/node.rs"]
mod node;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use libp2p::Multiaddr;
use node::{NodeEvent, Options};
use snapsync::Event;
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
    /// Advance slots and make snapshots.
    #[arg(long)]
    produce: bool,
    /// Synthetic state to write before producing, in MiB.
    #[arg(long, default_value_t = 16)]
    state_mib: u64,
    /// Milliseconds per slot when producing.
    #[arg(long, default_value_t = 200)]
    slot_ms: u64,
    /// Slots between snapshots (RangeForSnapshot).
    #[arg(long, default_value_t = 50)]
    range_for_snapshot: u64,
    /// Serve Prometheus metrics on this address.
    #[arg(long)]
    metrics: Option<SocketAddr>,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
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
    let mut opts = Options::new(&data_dir);
    opts.listen = vec![
        "/ip4/0.0.0.0/udp/0/quic-v1".parse()?,
        "/ip4/0.0.0.0/tcp/0".parse()?,
    ];
    opts.peers = args.peer.clone();
    opts.mdns = true;
    opts.produce_slot_ms = args.produce.then_some(args.slot_ms);
    opts.state_mib = args.state_mib;
    opts.range_for_snapshot = args.range_for_snapshot;
    opts.discovery_interval = Duration::from_secs(10);
    opts.metrics = args.metrics;
    let mut node = node::start(opts).await?;
    println!("peer {} ({})", node.peer_id, data_dir.display());
    println!("type a line to chat; /peers /snapshots /sync /status /quit");

    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let mut bar: Option<indicatif::ProgressBar> = None;
    let say = |bar: &Option<indicatif::ProgressBar>, line: String| match bar {
        Some(b) => b.println(line),
        None => println!("{line}"),
    };
    loop {
        tokio::select! {
            line = stdin.next_line() => {
                let Some(line) = line? else { break };
                let line = line.trim().to_string();
                match line.as_str() {
                    "" => {}
                    "/quit" => break,
                    "/peers" => {
                        let (peers, status) = node
                            .query(|s, _| (s.connected_peers().copied().collect::<Vec<_>>(), s.behaviour().snapsync.status()))
                            .await
                            .ok_or("node stopped")?;
                        say(&bar, format!("{} connected peers", peers.len()));
                        for p in peers {
                            let advert = status.adverts.iter().find(|a| a.peer == p);
                            let snap = advert.map(|a| format!("snapshot at slot {} ({} bytes)", a.slot, a.archive_size)).unwrap_or_else(|| "no snapshot heard of".into());
                            say(&bar, format!("  {p}: {snap}"));
                        }
                    }
                    "/snapshots" => {
                        let status = node.query(|s, _| s.behaviour().snapsync.status()).await.ok_or("node stopped")?;
                        say(&bar, format!("local slot {:?}, best known snapshot slot {:?}", status.local_slot, status.best_known_slot));
                        for m in status.snapshots {
                            say(&bar, format!("  slot {}: bank hash {}, {} bytes, root {}", m.slot, m.bank_hash.short(), m.archive_size, m.content_root.short()));
                        }
                    }
                    "/sync" => {
                        node.query(|s, _| s.behaviour_mut().snapsync.sync_now()).await;
                        say(&bar, "asking peers for snapshots".into());
                    }
                    "/status" => {
                        let status = node.query(|s, _| s.behaviour().snapsync.status()).await.ok_or("node stopped")?;
                        say(&bar, format!("{:?}, chunk stream on {:?}, {:?}", status.phase, status.streamer_addrs, status.stats));
                    }
                    text if text.starts_with('/') => say(&bar, format!("unknown command {text}")),
                    text => node.chat(text.to_string()).await,
                }
            }
            event = node.events.recv() => {
                let Some(event) = event else { break };
                match event {
                    NodeEvent::Listening { addrs } => {
                        for a in addrs {
                            say(&bar, format!("listening on {a}"));
                        }
                    }
                    NodeEvent::Chat { from, text } => say(&bar, format!("<{}> {text}", node::short(&from))),
                    NodeEvent::Connected(p) => say(&bar, format!("* connected to {p}")),
                    NodeEvent::Disconnected(p) => say(&bar, format!("* disconnected from {p}")),
                    NodeEvent::Slot(_) => {}
                    NodeEvent::Snap(event) => match event {
                        Event::SnapshotCreated { manifest } => say(&bar, format!("* snapshot at slot {}: bank hash {}, {} bytes", manifest.slot, manifest.bank_hash.short(), manifest.archive_size)),
                        Event::SnapshotFound { key, peers } => say(&bar, format!("* found a snapshot at slot {} on {} peers", key.slot, peers.len())),
                        Event::NoSnapshotAvailable { .. } => say(&bar, "* no snapshot to sync yet".into()),
                        Event::DownloadStarted { key, .. } => bar = Some(node::progress_bar(key.archive_size)),
                        Event::DownloadProgress(p) => {
                            if let Some(b) = &bar {
                                node::update_bar(b, &p);
                            }
                        }
                        Event::SnapshotSynced { slot, bank_hash, bytes, elapsed, per_peer } => {
                            if let Some(b) = bar.take() {
                                b.finish_and_clear();
                            }
                            say(&bar, format!("* synced slot {slot}: bank hash {bank_hash}, {bytes} bytes in {:.2} s, verified and loaded", elapsed.as_secs_f64()));
                            for (p, b) in per_peer.iter().filter(|(_, b)| *b > 0) {
                                say(&bar, format!("    {b} bytes from {p}"));
                            }
                        }
                        Event::SyncFailed { error, .. } => {
                            if let Some(b) = bar.take() {
                                b.abandon();
                            }
                            say(&bar, format!("* sync failed: {error}"));
                        }
                        Event::ConflictingSnapshots(c) => say(&bar, format!("* peers disagree about slot {}", c.slot)),
                        Event::PeerMisbehaved { peer, reason } => say(&bar, format!("* ignoring {peer}: {reason}")),
                        Event::CreationFailed(e) => say(&bar, format!("* snapshot failed: {e}")),
                        Event::DiscoveryStarted { .. } => {}
                    },
                }
            }
        }
    }
    Ok(())
}
