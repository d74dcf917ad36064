//! Crowd benchmark: N joiners need the same snapshot at once from one seed, on loopback, every
//! node's uplink capped alike (the streamer's rate limit), downlinks not. Measured in one run:
//!
//! - the one-copy time: one joiner alone from the seed;
//! - the crowd: N joiners started together, each told the seed and the other joiners, every
//!   joiner serving what it has verified meanwhile;
//! - the baseline: the same crowd with serving while downloading turned off, as before.
//!
//! It prints each time against the one-copy time, the share of the bytes joiners served each
//! other, the copies the seed uploaded, CPU seconds, and the lower bound
//! `max(F / u, N F / ((N + 1) u)) / (F / u)`. The last line is one JSON object with every figure
//! (`crowd_ratio`, `joiner_bytes_share` among them).
//!
//! ```text
//! cargo run --release --example crowd_bench [-- --mib 64 --joiners 8 --cap-mbit 100]
//! ```
//!
//! With `--net` (as root), the crowd runs on real links instead: `node` processes on hosts in
//! network namespaces, every uplink shaped by `tbf` (see `support/crowd_net.rs`):
//!
//! ```text
//! cargo run --release --example crowd_bench -- --net [--joiners 8 --state-mib 128 --mbit 25 --loss 1]
//! ```

#[path = "support/crowd_net.rs"]
mod crowd_net;
#[path = "support/netns.rs"]
mod netns;
#[path = "support/mod.rs"]
mod support;

use std::time::Instant;

use libp2p::identity::Keypair;
use snapsync::Metrics;
use snapsync::layers::snapshot::{Manifest, SnapshotStore};
use snapsync::layers::transfer::{
    DownloadConfig, DownloadTarget, Downloaded, Downloader, PeerAddr, Streamer, StreamerConfig,
};
use snapsync::layers::transfer::{Holding, Origin};
use support::{arg, local, mib, usage};

/// One node: its store, identity and streamer.
struct Node {
    _dir: tempfile::TempDir,
    store: SnapshotStore,
    keypair: Keypair,
    streamer: Streamer,
}

impl Node {
    fn new(cap: u64) -> Self {
        Self::open(tempfile::tempdir().expect("tempdir"), cap)
    }

    /// A node on `dir` (its store in `dir/snapshots`).
    fn open(dir: tempfile::TempDir, cap: u64) -> Self {
        let store = SnapshotStore::open(dir.path().join("snapshots")).expect("store");
        let keypair = Keypair::generate_ed25519();
        let streamer = Streamer::bind(
            &keypair,
            store.clone(),
            StreamerConfig::default()
                .with_listen(local())
                .with_rate_limit(Some(cap)),
            None,
            Metrics::new(),
        )
        .expect("streamer");
        Self {
            _dir: dir,
            store,
            keypair,
            streamer,
        }
    }

    fn addr(&self) -> PeerAddr {
        PeerAddr {
            peer_id: self.keypair.public().to_peer_id(),
            addr: self.streamer.local_addr(),
        }
    }
}

/// What one round measured.
struct Round {
    secs: f64,
    joiner_share: f64,
    seed_copies: f64,
    cpu_secs: f64,
}

/// `n` joiners fetch `manifest` from `seed` at once; with `swarm`, each also from the others
/// as partial holders, and each serves what it verified.
async fn round(seed: &Node, manifest: &Manifest, n: usize, cap: u64, swarm: bool) -> Round {
    let joiners: Vec<Node> = (0..n).map(|_| Node::new(cap)).collect();
    let sent_before = seed.streamer.stats().bytes_served;
    let cpu_before = usage().cpu;
    let started = Instant::now();
    let handles: Vec<_> = joiners
        .iter()
        .map(|j| {
            let config = DownloadConfig::default()
                .with_bind(local())
                .with_serve_partial(swarm);
            let downloader = Downloader::new(
                j.keypair.clone(),
                j.store.clone(),
                config,
                None,
                Metrics::new(),
            )
            .expect("downloader");
            let handle =
                downloader.start(DownloadTarget::from_manifest(manifest), vec![seed.addr()]);
            if swarm {
                for other in joiners
                    .iter()
                    .filter(|o| o.addr().peer_id != j.addr().peer_id)
                {
                    handle.add_source(Origin::Peer(other.addr()), Holding::Partial);
                }
            }
            (downloader, handle)
        })
        .collect();
    let mut results: Vec<Downloaded> = Vec::new();
    for (_downloader, handle) in handles {
        results.push(handle.wait().await.expect("download"));
    }
    let secs = started.elapsed().as_secs_f64();
    let seed_id = seed.addr().peer_id;
    let (mut from_joiners, mut all) = (0u64, 0u64);
    for r in &results {
        for (p, b) in &r.per_peer {
            all += b;
            if *p != seed_id {
                from_joiners += b;
            }
        }
    }
    Round {
        secs,
        joiner_share: from_joiners as f64 / all.max(1) as f64,
        seed_copies: (seed.streamer.stats().bytes_served - sent_before) as f64
            / manifest.archive_size as f64,
        cpu_secs: (usage().cpu - cpu_before).as_secs_f64(),
    }
}

#[tokio::main]
async fn main() {
    if support::flag("--net") {
        return crowd_net::main();
    }
    let size_mib: u64 = arg("--mib").map_or(64, |v| v.parse().expect("--mib"));
    let n: usize = arg("--joiners").map_or(8, |v| v.parse().expect("--joiners"));
    let cap_mbit: u64 = arg("--cap-mbit").map_or(100, |v| v.parse().expect("--cap-mbit"));
    let cap = cap_mbit * 1_000_000 / 8;
    let dir = tempfile::tempdir().expect("tempdir");
    let manifest = support::random_snapshot(&dir.path().join("snapshots"), size_mib << 20);
    let seed = Node::open(dir, cap);
    println!(
        "crowd benchmark: a {} MiB snapshot, one seed, {n} joiners, every uplink capped at {cap_mbit} Mbit/s",
        size_mib
    );
    let one = round(&seed, &manifest, 1, cap, false).await;
    println!(
        "  one copy            {:>7.2} s  (the seed's uplink: {:.1} MiB/s)",
        one.secs,
        mib(manifest.archive_size) / one.secs
    );
    let crowd = round(&seed, &manifest, n, cap, true).await;
    let baseline = round(&seed, &manifest, n, cap, false).await;
    // max(F / u, N F / ((N + 1) u)) in one-copy times: the first copy must leave the seed.
    let bound = (n as f64 / (n as f64 + 1.0)).max(1.0);
    for (name, r) in [
        ("crowd (swarming)", &crowd),
        ("crowd (seed only)", &baseline),
    ] {
        println!(
            "  {name:<19} {:>7.2} s  = {:.2} x one copy; {:.0}% of the bytes from other joiners; the seed sent {:.2} copies; {:.1} CPU-s",
            r.secs,
            r.secs / one.secs,
            100.0 * r.joiner_share,
            r.seed_copies,
            r.cpu_secs
        );
    }
    println!(
        "  lower bound         {bound:.2} x one copy; without swarming, {n} x (each copy leaves the seed)"
    );
    println!(
        "{{\"mib\":{size_mib},\"joiners\":{n},\"cap_mbit\":{cap_mbit},\"one_copy_secs\":{:.3},\"crowd_secs\":{:.3},\"crowd_ratio\":{:.3},\"joiner_bytes_share\":{:.3},\"seed_copies\":{:.3},\"crowd_cpu_secs\":{:.2},\"baseline_secs\":{:.3},\"baseline_ratio\":{:.3},\"baseline_seed_copies\":{:.3},\"baseline_cpu_secs\":{:.2},\"bound_ratio\":{bound:.3}}}",
        one.secs,
        crowd.secs,
        crowd.secs / one.secs,
        crowd.joiner_share,
        crowd.seed_copies,
        crowd.cpu_secs,
        baseline.secs,
        baseline.secs / one.secs,
        baseline.seed_copies,
        baseline.cpu_secs,
    );
}
