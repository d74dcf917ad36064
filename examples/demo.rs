//! The quick start: a small snapsync network on 127.0.0.1 in one process, showing the whole
//! flow. A producer writes some state and makes a snapshot; three peers discover it over
//! gossipsub and sync it; then a late joiner discovers all four and syncs from all of them at
//! once, with a progress bar, and prints a summary.
//!
//! ```text
//! cargo run --release --example demo [-- --state-mib 128 --peers 3 --cap-mibs 25]
//! ```

#[path = "support/node.rs"]
mod node;

use std::collections::HashMap;
use std::time::Instant;

use clap::Parser;
use libp2p::{Multiaddr, PeerId};
use node::{NodeEvent, NodeHandle, Options};
use snapsync::Event;
use tokio::sync::mpsc;

/// A small snapsync network on loopback.
#[derive(Parser, Debug)]
struct Args {
    /// State the producer writes, in MiB.
    #[arg(long, default_value_t = 128)]
    state_mib: u64,
    /// Peers that sync from the producer before the late joiner comes.
    #[arg(long, default_value_t = 3)]
    peers: usize,
    /// Serving cap per downloading peer, MiB/s (so the progress can be watched).
    #[arg(long, default_value_t = 25)]
    cap_mibs: u64,
}

const MIB: f64 = 1024.0 * 1024.0;

struct Net {
    names: HashMap<PeerId, String>,
    events: mpsc::Receiver<(usize, NodeEvent)>,
    tx: mpsc::Sender<(usize, NodeEvent)>,
}

impl Net {
    async fn start(&mut self, index: usize, name: &str, opts: Options) -> (NodeHandle, Multiaddr) {
        let mut handle = node::start(opts).await.expect("node starts");
        self.names.insert(handle.peer_id, name.to_string());
        let mut rx = std::mem::replace(&mut handle.events, mpsc::channel(1).1);
        let tx = self.tx.clone();
        tokio::spawn(async move {
            while let Some(e) = rx.recv().await {
                if tx.send((index, e)).await.is_err() {
                    return;
                }
            }
        });
        let addr = self
            .wait(|i, e| match e {
                NodeEvent::Listening { addrs } if i == index => addrs.first().cloned(),
                _ => None,
            })
            .await;
        (handle, addr)
    }

    async fn wait<T>(&mut self, mut f: impl FnMut(usize, &NodeEvent) -> Option<T>) -> T {
        loop {
            let (i, e) = self.events.recv().await.expect("nodes alive");
            if let Some(t) = f(i, &e) {
                return t;
            }
        }
    }

    fn name(&self, p: &PeerId) -> String {
        self.names.get(p).cloned().unwrap_or_else(|| node::short(p))
    }
}

fn options(dir: &std::path::Path, cap_mibs: u64) -> Options {
    let mut o = Options::new(dir);
    o.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    o.streamer = "127.0.0.1:0".parse().unwrap();
    o.rate_limit_per_peer = Some(cap_mibs << 20);
    o
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let tmp = tempfile::tempdir().expect("temporary directory");
    let (tx, events) = mpsc::channel(4096);
    let mut net = Net {
        names: HashMap::new(),
        events,
        tx,
    };
    println!(
        "snapsync demo: a producer, {} peers and a late joiner on 127.0.0.1 (data in {})\n",
        args.peers,
        tmp.path().display()
    );

    // The producer: state, then slots up to the first snapshot.
    println!("[producer] writing {} MiB of state ...", args.state_mib);
    let mut p = options(&tmp.path().join("producer"), args.cap_mibs);
    p.produce_slot_ms = Some(10);
    p.state_mib = args.state_mib;
    p.stop_at_slot = Some(snapsync::snapshot::DEFAULT_RANGE_FOR_SNAPSHOT);
    let (_producer, producer_addr) = net.start(0, "producer", p).await;
    let manifest = net
        .wait(|i, e| match e {
            NodeEvent::Snap(Event::SnapshotCreated { manifest }) if i == 0 => {
                Some(manifest.clone())
            }
            _ => None,
        })
        .await;
    println!(
        "[producer] slot {}: snapshot made, bank hash {}, {:.1} MiB archive ({:.1} MiB of state), content root {}\n",
        manifest.slot,
        manifest.bank_hash.short(),
        manifest.archive_size as f64 / MIB,
        manifest.state_bytes as f64 / MIB,
        manifest.content_root.short()
    );

    // Peers join; each discovers the producer's snapshot and syncs it.
    let bars = indicatif::MultiProgress::new();
    let mut peers = Vec::new();
    let mut addrs = vec![producer_addr.clone()];
    for i in 1..=args.peers {
        let mut o = options(&tmp.path().join(format!("peer-{i}")), args.cap_mibs);
        o.peers = vec![producer_addr.clone()];
        let (h, addr) = net.start(i, &format!("peer-{i}"), o).await;
        peers.push(h);
        addrs.push(addr);
    }
    let mut progress: HashMap<usize, indicatif::ProgressBar> = HashMap::new();
    let mut synced = 0;
    while synced < args.peers {
        let (i, e) = net.events.recv().await.expect("nodes alive");
        let name = if i == 0 {
            "producer".into()
        } else {
            format!("peer-{i}")
        };
        match e {
            NodeEvent::Snap(Event::DiscoveryStarted { .. }) => {
                bars.suspend(|| println!("[{name}] asking peers for snapshots"));
            }
            NodeEvent::Snap(Event::SnapshotFound { key, peers }) => {
                let from: Vec<String> = peers.iter().map(|p| net.name(p)).collect();
                bars.suspend(|| {
                    println!(
                        "[{name}] found slot {} on {}: downloading",
                        key.slot,
                        from.join(", ")
                    )
                });
                let bar = bars.add(node::progress_bar(key.archive_size));
                bar.set_prefix(name.clone());
                progress.insert(i, bar);
            }
            NodeEvent::Snap(Event::DownloadProgress(p)) => {
                if let Some(bar) = progress.get(&i) {
                    node::update_bar(bar, &p);
                }
            }
            NodeEvent::Snap(Event::SnapshotSynced {
                slot,
                bank_hash,
                elapsed,
                ..
            }) => {
                if let Some(bar) = progress.remove(&i) {
                    bar.finish_and_clear();
                }
                bars.suspend(|| println!(
                    "[{name}] synced slot {slot} in {:.2} s: every chunk checked against the content root, bank hash {} recomputed from the loaded DB",
                    elapsed.as_secs_f64(),
                    bank_hash.short()
                ));
                synced += 1;
            }
            NodeEvent::Snap(Event::SyncFailed { error, .. }) => {
                bars.suspend(|| {
                    println!("[{name}] sync failed: {error}; retrying at the next tick")
                });
            }
            _ => {}
        }
    }

    // The late joiner: connected to everyone, it fetches from all of them at once.
    println!(
        "\n[late-joiner] joining, connected to the producer and {} peers",
        args.peers
    );
    let mut o = options(&tmp.path().join("late-joiner"), args.cap_mibs);
    o.peers = addrs;
    let late_index = 99;
    let (late, _) = net.start(late_index, "late-joiner", o).await;
    let mut bar = None;
    let mut download_started = Instant::now();
    let mut downloaded_at = None;
    let (slot, bank_hash, bytes, secs, per_peer) = loop {
        let (i, e) = net.events.recv().await.expect("nodes alive");
        if i != late_index {
            continue;
        }
        match e {
            NodeEvent::Snap(Event::SnapshotFound { key, peers }) => {
                let from: Vec<String> = peers.iter().map(|p| net.name(p)).collect();
                println!(
                    "[late-joiner] found slot {} on {} peers: {}",
                    key.slot,
                    peers.len(),
                    from.join(", ")
                );
                download_started = Instant::now();
                let b = node::progress_bar(key.archive_size);
                b.set_prefix("late-joiner");
                bar = Some(b);
            }
            NodeEvent::Snap(Event::DownloadProgress(p)) => {
                if let Some(b) = &bar {
                    node::update_bar(b, &p);
                }
                if p.done_bytes == p.total_bytes && downloaded_at.is_none() {
                    downloaded_at = Some(Instant::now());
                }
            }
            NodeEvent::Snap(Event::SnapshotSynced {
                slot,
                bank_hash,
                bytes,
                elapsed,
                per_peer,
            }) => {
                if let Some(b) = bar.take() {
                    b.finish();
                }
                println!(
                    "[late-joiner] verified every chunk, loaded, recomputed the bank hash: it matches"
                );
                break (slot, bank_hash, bytes, elapsed.as_secs_f64(), per_peer);
            }
            NodeEvent::Snap(Event::SyncFailed { error, .. }) => {
                println!("[late-joiner] sync failed: {error}; retrying at the next tick");
            }
            _ => {}
        }
    };
    let download_secs = downloaded_at
        .map(|t| t.duration_since(download_started).as_secs_f64())
        .unwrap_or(secs);
    assert_eq!(bank_hash, manifest.bank_hash);
    let loaded = snapsync::db::StateDb::view(&late.db)
        .and_then(|v| v.bank_hash())
        .expect("read the loaded state");
    assert_eq!(loaded, manifest.bank_hash);
    println!("\nsummary (late joiner)");
    println!("  slot           {slot}");
    println!("  bank hash      {bank_hash}");
    println!("  bytes          {bytes} ({:.1} MiB)", bytes as f64 / MIB);
    println!(
        "  seconds        {secs:.2} ({download_secs:.2} downloading and checking, {:.2} loading)",
        secs - download_secs
    );
    println!(
        "  MiB/s          {:.1} (download)",
        bytes as f64 / MIB / download_secs
    );
    println!("  bytes per peer");
    let mut per_peer = per_peer;
    per_peer.sort_by_key(|(_, b)| std::cmp::Reverse(*b));
    for (p, b) in per_peer {
        println!("    {:<12} {:>6.1} MiB", net.name(&p), b as f64 / MIB);
    }
    drop(peers);
}
