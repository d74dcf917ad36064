//! Liveness against free identities, over real nodes: holders that announce the right snapshot
//! first and then deliver nothing (chunks "not held" and empty have bitfields, "busy" to
//! everything, requests never answered) give their places up to the honest holder behind them,
//! and nobody honest is blamed.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use common::chain::{Chain, Running};
use common::init_tracing;
use common::net::*;
use common::wire::{LiarStats, Lie, liar_server};
use prost::Message;
use snapsync::db::StateDb;
use snapsync::layers::snapshot::{CreatorConfig, Manifest};
use snapsync::{BankHash, Event, SnapshotVerifier, TrustPolicy};

const HONEST: Chain = Chain {
    seed: 1,
    accounts: 256,
    value_len: 8192,
};

/// Identities in front of the honest holder: as many as a download has places.
const LIARS: usize = 16;

/// The honest holder's upload rate, bytes per second: its snapshot (about 2 MiB) takes
/// seconds, long enough for every liar to be heard of and to hold a place in turn.
const HONEST_RATE: u64 = 256 * 1024;

fn config(dir: &std::path::Path) -> snapsync::Config {
    let config = tune(test_config(dir), |d| d.with_behind_threshold(0)).with_creator(
        CreatorConfig::default()
            .with_range_for_snapshot(10)
            .with_full_interval(10),
    );
    // Places turn over within seconds here (20 s by default).
    let download = config
        .download()
        .with_snub_timeout(Duration::from_secs(4))
        .with_rotate_interval(Duration::from_secs(6));
    config.with_download(download)
}

/// Accepts the one state it was told of.
#[derive(Debug)]
struct Checkpoint(u64, BankHash);

impl SnapshotVerifier for Checkpoint {
    fn verify(&self, slot: u64, bank_hash: &BankHash) -> bool {
        (slot, *bank_hash) == (self.0, self.1)
    }
}

/// The stored manifest (its protobuf) of the snapshot at `slot` in `store`.
fn stored_manifest(store: &std::path::Path, slot: u64) -> snapsync::proto::Manifest {
    for entry in std::fs::read_dir(store).unwrap() {
        let path = entry.unwrap().path().join("manifest.pb");
        if let Ok(bytes) = std::fs::read(&path) {
            let m = snapsync::proto::Manifest::decode(bytes.as_slice()).unwrap();
            if m.slot == slot {
                return m;
            }
        }
    }
    panic!("no snapshot at slot {slot} in {}", store.display())
}

/// A node holding a copy of `from`'s snapshots whose chunk stream is a liar's: it announces
/// and answers like any holder, and delivers nothing.
async fn liar(
    from: &std::path::Path,
    manifest: &snapsync::proto::Manifest,
    lie: Lie,
    index: usize,
    events: &Events,
) -> (TestNode, Arc<LiarStats>, quinn::Endpoint) {
    let (dir, db) = node_dir(0, 0, 0);
    let store = dir.path().join("snapshots");
    for entry in std::fs::read_dir(from).unwrap() {
        let snapshot = entry.unwrap().path();
        let target = store.join(snapshot.file_name().unwrap());
        std::fs::create_dir_all(&target).unwrap();
        for file in std::fs::read_dir(&snapshot).unwrap() {
            let file = file.unwrap();
            std::fs::copy(file.path(), target.join(file.file_name())).unwrap();
        }
    }
    let keypair = libp2p::identity::Keypair::generate_ed25519();
    let (addr, stats, endpoint) = liar_server(&keypair, manifest.clone(), lie);
    let cfg = serve_only(config(dir.path())).with_advertise_addrs(vec![addr]);
    let node = start_node_keyed(index, dir.clone(), db, cfg, events.tx.clone(), keypair).await;
    (node, stats, endpoint)
}

/// Sixteen identities (as many as a download has places) announce the pinned snapshot before
/// its honest holder does, serve its true manifest, and then deliver nothing, each as `lies`
/// says: a node pinned to the snapshot and one whose verifier knows it both sync it, the
/// liars were asked, and the honest holder is not blamed.
async fn liars_in_front(lies: impl Fn(usize) -> Lie) {
    init_tracing();
    let mut events = Events::new();
    let (pdir, pdb) = node_dir(0, 0, 0);
    // The honest holder serves slowly (the snapshot takes seconds, not milliseconds): every
    // liar is heard of and in the way before the download could end without asking them.
    let pcfg = serve_only(config(pdir.path()));
    let streamer = pcfg.streamer().with_rate_limit(Some(HONEST_RATE));
    let producer = start_node(
        0,
        pdir.clone(),
        pdb,
        pcfg.with_streamer(streamer),
        events.tx.clone(),
    )
    .await;
    let mut chain = Running::start(HONEST, vec![producer.ctl()], 0, Duration::from_millis(20));
    chain.stop_at(25);
    chain.reached(25).await;
    let honest: Manifest = events
        .wait(
            Duration::from_secs(60),
            "the snapshot at 20",
            |_, e| match e {
                Ev::Snap(Event::SnapshotCreated { manifest }) if manifest.slot == 20 => {
                    Some(manifest.clone())
                }
                _ => None,
            },
        )
        .await;
    println!(
        "the snapshot: {} bytes, {:.1} s at the honest holder's rate",
        honest.archive_size,
        honest.archive_size as f64 / HONEST_RATE as f64
    );
    let store = pdir.path().join("snapshots");
    let stored = stored_manifest(&store, 20);
    let mut liars = Vec::new();
    for i in 0..LIARS {
        liars.push(liar(&store, &stored, lies(i), 100 + i, &events).await);
    }
    let pinned = TrustPolicy::TrustedSnapshot {
        slot: 20,
        bank_hash: honest.bank_hash,
        content_root: Some(honest.content_root),
    };
    let verified = TrustPolicy::Verifier(Arc::new(Checkpoint(20, honest.bank_hash)));
    let mut joiners = Vec::new();
    for (i, policy) in [(10, pinned), (11, verified)] {
        let (dir, db) = node_dir(0, 0, 0);
        let cfg = config(dir.path()).with_trust(policy);
        let node = start_node(i, dir.clone(), db, cfg, events.tx.clone()).await;
        // The liars first: their adverts are heard before the honest one.
        for (l, _, _) in &liars {
            node.dial(l.addr.clone());
        }
        joiners.push(node);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for j in &joiners {
        j.dial(producer.addr.clone());
    }
    let started = tokio::time::Instant::now();
    let mut synced = Vec::new();
    while synced.len() < joiners.len() {
        let (i, slot, hash) = events
            .wait(
                Duration::from_secs(120),
                "both joiners synced",
                |i, e| match e {
                    Ev::Snap(Event::SnapshotSynced {
                        slot, bank_hash, ..
                    }) if (10..12).contains(&i) => Some((i, *slot, *bank_hash)),
                    Ev::Snap(Event::PeerMisbehaved { peer, reason })
                        if *peer == producer.peer_id =>
                    {
                        panic!("the honest producer was blamed: {reason}")
                    }
                    _ => None,
                },
            )
            .await;
        println!(
            "joiner {i} synced slot {slot} after {:?}",
            started.elapsed()
        );
        assert_eq!((slot, hash), (20, honest.bank_hash));
        synced.push(i);
    }
    for j in &joiners {
        assert_eq!(j.db.slot().unwrap(), Some(20));
    }
    // The liars were in the way: each was asked for its manifest, and asked for chunks or
    // for what it holds.
    let asked = liars
        .iter()
        .filter(|(_, s, _)| s.manifests.load(Relaxed) > 0)
        .count();
    let refused = liars
        .iter()
        .filter(|(_, s, _)| s.chunks.load(Relaxed) + s.haves.load(Relaxed) > 0)
        .count();
    println!("{asked} liars served their manifest, {refused} were asked for chunks or holdings");
    assert_eq!(asked, LIARS, "every liar held a place");
    assert_eq!(
        refused, LIARS,
        "every liar was asked for chunks or holdings"
    );
}

/// The way a place was kept before places went by delivery: "not held" to the first chunk
/// request, an empty bitfield to every question of what it holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identities_that_say_they_hold_nothing_cannot_keep_a_pinned_node_from_syncing() {
    liars_in_front(|_| Lie::NotHeld).await;
}

/// Every way of delivering nothing at once: "not held" with an empty bitfield, "not held" with
/// a full one, "busy" to everything, requests never answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_way_of_delivering_nothing_keeps_a_place() {
    liars_in_front(|i| match i % 4 {
        0 => Lie::NotHeld,
        1 => Lie::Stale,
        2 => Lie::Busy,
        _ => Lie::Stall,
    })
    .await;
}
