//! The quick start: a small snapsync network on 127.0.0.1 in one process, showing the whole
//! flow. A producer executes a chain and makes a full snapshot; three peers discover it over
//! gossipsub and sync it; a late joiner discovers all four and syncs from all of them at once,
//! with a progress bar. Then the chain moves on, the producer makes an incremental snapshot,
//! and every node catches up by fetching only what changed. A summary follows. Last, a cluster
//! restart: the chain's two signers (the producer and an archive node that executes the chain
//! beside it) each publish their snapshots, signed, to a bucket of their own (a local static web
//! server); validators that trust the two (a quorum of both) start empty, behind the chain's
//! clock, reaching neither: they take the snapshot on the strength of the two signatures that
//! came with it from the buckets, sync it from the buckets and from each other (each serving the
//! others the chunks it has verified meanwhile), then execute the chain on and make the same
//! snapshots as the producer.
//!
//! ```text
//! cargo run --example demo [-- --state-mib 128 --peers 3 --cap-mibs 25 --validators 4]
//! ```

#[path = "support/node.rs"]
mod node;
#[path = "support/static_web.rs"]
mod static_web;

use std::collections::HashMap;
use std::time::Instant;

use clap::Parser;
use libp2p::{Multiaddr, PeerId};
use node::{Chain, NodeEvent, NodeHandle, Options, human_bytes, plural};
use snapsync::{ContentRoot, Event};
use tokio::sync::mpsc;

/// A small snapsync network on loopback.
#[derive(Parser, Debug)]
struct Args {
    /// The chain's initial state, in MiB.
    #[arg(long, default_value_t = 128)]
    state_mib: u64,
    /// Peers that sync from the producer before the late joiner comes.
    #[arg(long, default_value_t = 3)]
    peers: usize,
    /// Serving cap per downloading peer, MiB/s (so the progress can be watched).
    #[arg(long, default_value_t = 25)]
    cap_mibs: u64,
    /// Validators restarted together at the end.
    #[arg(long, default_value_t = 4)]
    validators: usize,
}

/// The node index of the archive node (the chain's second signer).
const ARCHIVE: usize = 98;

const MIB: f64 = 1024.0 * 1024.0;

/// Slots between snapshots in the demo; the first snapshot (the chain's genesis base) is full.
const RANGE: u64 = 50;

struct Net {
    names: HashMap<PeerId, String>,
    events: mpsc::Receiver<(usize, NodeEvent)>,
    tx: mpsc::Sender<(usize, NodeEvent)>,
    /// Every snapshot each node made, by node.
    created: HashMap<usize, Vec<snapsync::layers::snapshot::Manifest>>,
}

impl Net {
    /// The next event of any node (the snapshots made are noted on the way).
    async fn next(&mut self) -> (usize, NodeEvent) {
        let (i, e) = self.events.recv().await.expect("nodes alive");
        if let NodeEvent::Snap(Event::SnapshotCreated { manifest }) = &e {
            self.created.entry(i).or_default().push(manifest.clone());
        }
        (i, e)
    }

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
            let (i, e) = self.next().await;
            if let Some(t) = f(i, &e) {
                return t;
            }
        }
    }

    fn name(&self, p: &PeerId) -> String {
        // Every node of the demo is named; the identities a node's web sources stand as are not.
        self.names
            .get(p)
            .cloned()
            .unwrap_or_else(|| format!("bucket {}", node::short(p)))
    }
}

fn options(dir: &std::path::Path, cap_mibs: u64) -> Options {
    let mut o = Options::new(dir);
    o.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    o.streamer = "127.0.0.1:0".parse().unwrap();
    o.rate_limit_per_peer = Some(cap_mibs << 20);
    o.range_for_snapshot = RANGE;
    o.full_interval = 100 * RANGE;
    o.behind_threshold = RANGE / 2;
    o
}

/// What one sync did, for the summary.
struct Synced {
    slot: u64,
    bank_hash: snapsync::BankHash,
    kind: &'static str,
    fetched: u64,
    served: u64,
    secs: f64,
    download_secs: f64,
    per_peer: Vec<(PeerId, u64)>,
}

/// Follows the syncs of the nodes `names` (index, name) to their ends, with a progress bar per
/// download; returns what each did.
/// The next snapshot the producer (node 0) makes.
async fn created_by_producer(net: &mut Net) -> snapsync::layers::snapshot::Manifest {
    net.wait(|i, e| match e {
        NodeEvent::Snap(Event::SnapshotCreated { manifest }) if i == 0 => Some(manifest.clone()),
        _ => None,
    })
    .await
}

async fn follow(net: &mut Net, names: &[(usize, String)]) -> HashMap<usize, Synced> {
    let bars = indicatif::MultiProgress::new();
    let mut progress: HashMap<(usize, ContentRoot), indicatif::ProgressBar> = HashMap::new();
    let mut started: HashMap<usize, Instant> = HashMap::new();
    let mut downloaded_at: HashMap<usize, Instant> = HashMap::new();
    let mut done = HashMap::new();
    while done.len() < names.len() {
        let (i, e) = net.next().await;
        let Some((_, name)) = names.iter().find(|(n, _)| *n == i) else {
            continue;
        };
        if done.contains_key(&i) {
            continue;
        }
        match e {
            NodeEvent::Snap(Event::SnapshotFound {
                key,
                full,
                peers,
                bytes,
            }) => {
                let from: Vec<String> = peers.iter().map(|p| net.name(p)).collect();
                let what = match full {
                    Some(f) if f != key => format!(
                        "full snapshot at slot {} + incremental at {}",
                        f.slot, key.slot
                    ),
                    Some(_) => format!("full snapshot at slot {}", key.slot),
                    None => format!(
                        "incremental snapshot at slot {} (its full base is already here)",
                        key.slot
                    ),
                };
                bars.suspend(|| {
                    println!(
                        "[{name}] found the {what}: {} from {}: {}",
                        human_bytes(bytes),
                        plural(peers.len(), "peer"),
                        from.join(", ")
                    )
                });
            }
            NodeEvent::Snap(Event::DownloadStarted { key, .. }) => {
                started.entry(i).or_insert_with(Instant::now);
                let bar = bars.add(node::progress_bar(key.archive_size));
                bar.set_prefix(format!("{name} {}", key.kind.as_str()));
                progress.insert((i, key.content_root), bar);
            }
            NodeEvent::Snap(Event::DownloadProgress(p)) => {
                if let Some(bar) = progress.get(&(i, p.root)) {
                    node::update_bar(bar, &p);
                }
                if p.finished {
                    downloaded_at.insert(i, Instant::now());
                }
            }
            NodeEvent::Snap(Event::SnapshotSynced {
                slot,
                bank_hash,
                kind,
                with_full,
                fetched_bytes,
                served_bytes,
                elapsed,
                per_peer,
                ..
            }) => {
                progress.retain(|(n, _), bar| {
                    if *n == i {
                        bar.finish_and_clear();
                    }
                    *n != i
                });
                let secs = elapsed.as_secs_f64();
                let download_secs = match (started.get(&i), downloaded_at.get(&i)) {
                    (Some(s), Some(d)) => d.duration_since(*s).as_secs_f64(),
                    _ => secs,
                };
                let kind = node::sync_words(kind, with_full);
                bars.suspend(|| println!(
                    "[{name}] synced slot {slot} ({kind}) in {secs:.2} s: {} fetched, every chunk checked against its content root, bank hash {} recomputed and matching",
                    human_bytes(fetched_bytes),
                    bank_hash.short()
                ));
                done.insert(
                    i,
                    Synced {
                        slot,
                        bank_hash,
                        kind,
                        fetched: fetched_bytes,
                        served: served_bytes,
                        secs,
                        download_secs,
                        per_peer,
                    },
                );
            }
            NodeEvent::Snap(Event::SyncFailed { error, .. }) => {
                bars.suspend(|| {
                    println!("[{name}] sync failed: {error}; retrying at the next round")
                });
            }
            _ => {}
        }
    }
    done
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
        created: HashMap::new(),
    };
    println!(
        "snapsync demo: a producer, {} and a late joiner on 127.0.0.1 (data in {})\n",
        plural(args.peers, "peer"),
        tmp.path().display()
    );
    let genesis = node::now_unix_ms();
    let (producer, producer_addr, manifest) = start_producer(&mut net, &tmp, &args, genesis).await;
    let (archive, peers, addrs) = peers_join(&mut net, &tmp, &args, &producer_addr, genesis).await;
    let (late, first, catch_up) = late_joiner(
        &mut net,
        &tmp,
        &args,
        addrs,
        &manifest,
        [&producer, &archive],
    )
    .await;
    summary(&net, &first, &catch_up);
    // Everyone but the signers leaves; the cluster restart follows.
    for p in peers {
        p.shutdown().await;
    }
    late.shutdown().await;
    restart(&mut net, &tmp, &args, [&producer, &archive], genesis).await;
    producer.shutdown().await;
    archive.shutdown().await;
}

/// The producer: the chain's state, then slots up to the first snapshot, which it publishes
/// (signed) to its bucket. Returns it, its address and that snapshot's manifest.
async fn start_producer(
    net: &mut Net,
    tmp: &tempfile::TempDir,
    args: &Args,
    genesis: u64,
) -> (NodeHandle, Multiaddr, snapsync::layers::snapshot::Manifest) {
    println!("[producer] writing {} MiB of state ...", args.state_mib);
    let mut p = options(&tmp.path().join("producer"), args.cap_mibs);
    p.chain = p_chain(args.state_mib, genesis);
    p.stop_at_slot = Some(RANGE);
    p.publish_dir = Some(tmp.path().join("bucket-producer"));
    let (producer, producer_addr) = net.start(0, "producer", p).await;
    let manifest = created_by_producer(net).await;
    println!(
        "[producer] slot {}: {} snapshot made, bank hash {}, {:.1} MiB archive ({:.1} MiB of state), content root {}\n",
        manifest.slot,
        manifest.kind.as_str(),
        manifest.bank_hash.short(),
        manifest.archive_size as f64 / MIB,
        manifest.state_bytes as f64 / MIB,
        manifest.content_root.short()
    );
    (producer, producer_addr, manifest)
}

/// The archive node (it syncs to the producer, then executes the chain beside it and signs
/// what it makes) and the peers join; each discovers the producer's snapshot and syncs it.
/// Returns the archive, the peers and every address so far.
async fn peers_join(
    net: &mut Net,
    tmp: &tempfile::TempDir,
    args: &Args,
    producer_addr: &Multiaddr,
    genesis: u64,
) -> (NodeHandle, Vec<NodeHandle>, Vec<Multiaddr>) {
    let mut a = options(&tmp.path().join("archive"), args.cap_mibs);
    a.chain = p_chain(args.state_mib, genesis);
    a.stop_at_slot = Some(RANGE);
    a.peers = vec![producer_addr.clone()];
    a.publish_dir = Some(tmp.path().join("bucket-archive"));
    let (archive, archive_addr) = net.start(ARCHIVE, "archive", a).await;
    let mut peers = Vec::new();
    let mut addrs = vec![producer_addr.clone(), archive_addr];
    for i in 1..=args.peers {
        let mut o = options(&tmp.path().join(format!("peer-{i}")), args.cap_mibs);
        o.peers = vec![producer_addr.clone()];
        let (h, addr) = net.start(i, &format!("peer-{i}"), o).await;
        peers.push(h);
        addrs.push(addr);
    }
    let mut names: Vec<(usize, String)> =
        (1..=args.peers).map(|i| (i, format!("peer-{i}"))).collect();
    names.push((ARCHIVE, "archive".to_string()));
    follow(net, &names).await;
    (archive, peers, addrs)
}

/// The late joiner, connected to everyone, fetches from all of them at once; then the chain
/// moves on and it catches up with the incremental snapshot alone. Returns it and its two
/// syncs.
async fn late_joiner(
    net: &mut Net,
    tmp: &tempfile::TempDir,
    args: &Args,
    addrs: Vec<Multiaddr>,
    manifest: &snapsync::layers::snapshot::Manifest,
    signers: [&NodeHandle; 2],
) -> (NodeHandle, Synced, Synced) {
    println!(
        "\n[late-joiner] joining, connected to the producer, the archive and {}",
        plural(args.peers, "peer")
    );
    let mut o = options(&tmp.path().join("late-joiner"), args.cap_mibs);
    o.peers = addrs;
    let late_index = 99;
    let (late, _) = net.start(late_index, "late-joiner", o).await;
    let late_name = vec![(late_index, "late-joiner".to_string())];
    let first = follow(net, &late_name)
        .await
        .remove(&late_index)
        .expect("synced");
    assert_eq!(first.bank_hash, manifest.bank_hash);
    println!("\n[producer] the chain moves on to slot {}", 2 * RANGE);
    advance(&signers, 2 * RANGE).await;
    let incremental = created_by_producer(net).await;
    println!(
        "[producer] slot {}: {} snapshot made: {} (the full one is {})",
        incremental.slot,
        incremental.kind.as_str(),
        human_bytes(incremental.archive_size),
        human_bytes(manifest.archive_size)
    );
    let catch_up = follow(net, &late_name)
        .await
        .remove(&late_index)
        .expect("synced");
    assert_eq!(catch_up.bank_hash, incremental.bank_hash);
    let loaded = snapsync::db::StateDb::view(&late.db)
        .and_then(|v| v.bank_hash())
        .expect("read the loaded state");
    assert_eq!(loaded, incremental.bank_hash);
    (late, first, catch_up)
}

/// The late joiner's two syncs, side by side.
fn summary(net: &Net, first: &Synced, catch_up: &Synced) {
    println!("\nsummary (late joiner)");
    for (label, s) in [("first sync", first), ("catch-up", catch_up)] {
        println!("  {label}");
        println!("    slot           {} ({})", s.slot, s.kind);
        println!("    bank hash      {}", s.bank_hash);
        println!(
            "    fetched        {} ({:.1} MiB)",
            s.fetched,
            s.fetched as f64 / MIB
        );
        println!(
            "    seconds        {:.2} ({:.2} downloading and checking, loading alongside)",
            s.secs, s.download_secs
        );
        println!(
            "    MiB/s          {:.1} (download)",
            s.fetched as f64 / MIB / s.download_secs.max(1e-3)
        );
        let mut per_peer = s.per_peer.clone();
        per_peer.sort_by_key(|(_, b)| std::cmp::Reverse(*b));
        println!("    bytes per peer");
        for (p, b) in per_peer.iter().filter(|(_, b)| *b > 0) {
            println!("      {:<12} {:>10}", net.name(p), human_bytes(*b));
        }
    }
    println!(
        "\nthe catch-up fetched {:.2}% of what the first sync did",
        100.0 * catch_up.fetched as f64 / first.fetched.max(1) as f64
    );
}

/// The demo's chain.
fn p_chain(state_mib: u64, genesis_unix_ms: u64) -> Option<Chain> {
    Some(Chain {
        seed: 1,
        state_mib,
        slot_ms: 10,
        genesis_unix_ms,
    })
}

/// Lets the executing nodes go on to `slot`.
async fn advance(nodes: &[&NodeHandle], slot: u64) {
    for n in nodes {
        n.query(move |_, p| p.stop_at = slot)
            .await
            .expect("node alive");
    }
}

/// Waits until the index of the bucket in `dir` lists the snapshot at `slot` with `signatures`
/// attestations.
async fn published(dir: &std::path::Path, slot: u64, signatures: usize) {
    let want_slot = format!("\"slot\":{slot},");
    loop {
        let index = std::fs::read_to_string(dir.join("index.json")).unwrap_or_default();
        let listed = index
            .lines()
            .find(|l| l.contains(&want_slot))
            .is_some_and(|l| l.matches("\"signer\"").count() >= signatures);
        if listed {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A cluster restart: the chain's two signers published their signed snapshots to their
/// buckets; validators that trust the two start empty and behind the chain's clock, reach
/// neither signer, sync from the buckets and from each other (serving each other what they
/// verified), then execute on and make the producer's snapshots.
async fn restart(
    net: &mut Net,
    tmp: &tempfile::TempDir,
    args: &Args,
    [producer, archive]: [&NodeHandle; 2],
    genesis_unix_ms: u64,
) {
    if args.validators == 0 {
        return;
    }
    // The signers move on to a snapshot the validators will sync, and wait there (so that the
    // demo's fast chain does not outrun their downloads); each publishes it with its signature.
    advance(&[producer, archive], 4 * RANGE).await;
    let buckets = [
        tmp.path().join("bucket-producer"),
        tmp.path().join("bucket-archive"),
    ];
    for b in &buckets {
        published(b, 4 * RANGE, 1).await;
    }
    let mut urls = Vec::new();
    for b in &buckets {
        let addr = static_web::start(b.clone())
            .await
            .expect("a static web server");
        urls.push(format!("http://{addr}/"));
    }
    println!(
        "\n[restart] the producer and the archive signed the snapshot at slot {} and published it to their buckets ({}); {} trusting the two (both signatures needed) start empty, far behind the chain's clock, and reach neither of them",
        4 * RANGE,
        urls.join(", "),
        plural(args.validators, "validator")
    );
    let signers: std::collections::HashSet<PeerId> = [producer.peer_id, archive.peer_id].into();
    let base = 200;
    let mut handles = Vec::new();
    let mut names = Vec::new();
    let mut first: Option<Multiaddr> = None;
    for v in 0..args.validators {
        let name = format!("validator-{}", v + 1);
        let mut o = options(&tmp.path().join(&name), args.cap_mibs);
        o.chain = p_chain(args.state_mib, genesis_unix_ms);
        o.trust = snapsync::TrustPolicy::TrustedPeers {
            peers: signers.clone(),
            quorum: 2,
        };
        o.web_sources = urls.clone();
        o.peers = first.iter().cloned().collect();
        o.discovery_interval = std::time::Duration::from_secs(2);
        o.stop_at_slot = Some(6 * RANGE);
        let (h, addr) = net.start(base + v, &name, o).await;
        first.get_or_insert(addr);
        handles.push(h);
        names.push((base + v, name));
    }
    let synced = follow(net, &names).await;
    println!("\n[restart] where the bytes came from");
    let validators: Vec<PeerId> = handles.iter().map(|h| h.peer_id).collect();
    for (i, name) in &names {
        let s = &synced[i];
        assert!(
            s.per_peer.iter().all(|(p, _)| !signers.contains(p)),
            "{name} reached a signer"
        );
        let from_others: u64 = s
            .per_peer
            .iter()
            .filter(|(p, _)| validators.contains(p))
            .map(|(_, b)| *b)
            .sum();
        let from_buckets: u64 = s.per_peer.iter().map(|(_, b)| *b).sum::<u64>() - from_others;
        println!(
            "  {name:<12} {} from the buckets, {} from other validators, {} served to them while downloading",
            human_bytes(from_buckets),
            human_bytes(from_others),
            human_bytes(s.served)
        );
    }
    // Then each executes on and makes the next snapshot, the producer's byte for byte.
    advance(&[producer, archive], 6 * RANGE).await;
    executing_on(net, &names, &synced).await;
    for h in handles {
        h.shutdown().await;
    }
}

/// Waits for the first snapshot each validator of `names` makes after its sync and the
/// producer's of that slot, and shows they are the same.
async fn executing_on(net: &mut Net, names: &[(usize, String)], synced: &HashMap<usize, Synced>) {
    let pairs = loop {
        let pairs: Option<Vec<_>> = names
            .iter()
            .map(|(i, _)| {
                let theirs = net
                    .created
                    .get(i)?
                    .iter()
                    .find(|m| m.slot > synced[i].slot)?;
                let mine = net
                    .created
                    .get(&0)?
                    .iter()
                    .find(|m| m.slot == theirs.slot)?;
                Some((theirs.clone(), mine.clone()))
            })
            .collect();
        if let Some(pairs) = pairs {
            break pairs;
        }
        net.next().await;
    };
    println!("\n[restart] executing on");
    for ((_, name), (m, p)) in names.iter().zip(&pairs) {
        let same = (p.kind, p.bank_hash, p.content_root) == (m.kind, m.bank_hash, m.content_root);
        println!(
            "  {name:<12} made the {} snapshot at slot {}: bank hash {}, content root {}: {}",
            m.kind.as_str(),
            m.slot,
            m.bank_hash.short(),
            m.content_root.short(),
            if same {
                "the producer's, byte for byte"
            } else {
                "DIFFERENT from the producer's"
            }
        );
        assert!(same, "{name} diverged from the producer");
    }
}
