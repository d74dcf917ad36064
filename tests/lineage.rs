//! Full and incremental snapshots on a network where every producer executes the same chain:
//! late joiners served by every producer at once, catch-up by incremental after a restart,
//! exact state after churn, and byte-identical archives on independent nodes.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::chain::{Chain, HOT, Running, churn};
use common::net::*;
use common::{entries, init_tracing};
use snapsync::db::StateDb;
use snapsync::layers::snapshot::SnapshotKind;
use snapsync::layers::snapshot::{
    CreatorConfig, Manifest, SnapshotStore, create_incremental, create_snapshot,
};
use snapsync::{ContentRoot, Event};

const LONG: Duration = Duration::from_secs(60);
const RANGE: u64 = 10;
const SLOT: Duration = Duration::from_millis(25);

const CHAIN: Chain = Chain {
    seed: 7,
    accounts: 3072,
    value_len: 1024,
};

/// Lineage settings: a snapshot every 10 slots, a full one every 1,000 (so the genesis base at
/// slot 10 and incrementals on it for the whole test); a node more than 5 slots behind the
/// newest snapshot syncs (it does not execute the chain itself).
fn lineage_config(dir: &std::path::Path) -> snapsync::Config {
    let cfg = test_config(dir);
    // Requests of 128 KiB: a 1.6 MB full in a dozen pieces, enough to share among three peers.
    let download = cfg.download().with_request_chunks(8);
    tune(cfg.with_download(download), |d| d.with_behind_threshold(5)).with_creator(
        CreatorConfig::default()
            .with_range_for_snapshot(RANGE)
            .with_full_interval(1000),
    )
}

/// Producers: they execute the chain and serve, each capped so that a full download takes
/// several snapshot intervals.
async fn producers(events: &Events, n: usize, cap: u64) -> Vec<TestNode> {
    start_producers(events, 0, n, |dir| {
        let cfg = lineage_config(dir);
        let streamer = cfg.streamer().with_rate_limit(Some(cap));
        cfg.with_streamer(streamer)
    })
    .await
}

/// Starts node `index`, a syncing node on `dir` and `db`, dialing `peers`.
async fn start_syncing(
    events: &Events,
    index: usize,
    (dir, db): &(std::sync::Arc<tempfile::TempDir>, snapsync::db::LmdbState),
    peers: &[&TestNode],
) -> TestNode {
    // A node that follows snapshots and does not execute the chain itself.
    let follower = tune(lineage_config(dir.path()), |d| d.with_executes(false));
    let node = start_node(index, dir.clone(), db.clone(), follower, events.tx.clone()).await;
    for p in peers {
        node.dial(p.addr.clone());
    }
    node
}

/// Waits until every producer in `0..n` made its snapshot at `slot`; checks they are the same
/// bytes (one content root) and returns the manifest.
async fn made_by_all(events: &mut Events, n: usize, slot: u64) -> Manifest {
    let mut roots: BTreeMap<usize, Manifest> = BTreeMap::new();
    while roots.len() < n {
        let (i, m) = events
            .wait(LONG, "the producers' snapshots", |i, e| match e {
                Ev::Snap(Event::SnapshotCreated { manifest }) if i < n && manifest.slot == slot => {
                    Some((i, manifest.clone()))
                }
                _ => None,
            })
            .await;
        roots.insert(i, m);
    }
    let distinct: BTreeSet<ContentRoot> = roots.values().map(|m| m.content_root).collect();
    assert_eq!(
        distinct.len(),
        1,
        "producers made different archives at slot {slot}"
    );
    roots.remove(&0).expect("producer 0")
}

/// A joiner's `SnapshotSynced`.
#[derive(Debug)]
struct Done {
    slot: u64,
    bank_hash: snapsync::BankHash,
    kind: SnapshotKind,
    with_full: bool,
    fetched_bytes: u64,
    per_peer: Vec<(libp2p::PeerId, u64)>,
}

async fn synced(events: &mut Events, node: usize) -> Done {
    events
        .wait(LONG, "a sync", |i, e| match e {
            Ev::Snap(Event::SnapshotSynced {
                slot,
                bank_hash,
                kind,
                with_full,
                fetched_bytes,
                per_peer,
                ..
            }) if i == node => Some(Done {
                slot: *slot,
                bank_hash: *bank_hash,
                kind: *kind,
                with_full: *with_full,
                fetched_bytes: *fetched_bytes,
                per_peer: per_peer.clone(),
            }),
            Ev::Snap(Event::SyncFailed { error, .. }) if i == node => panic!("node {i}: {error}"),
            _ => None,
        })
        .await
}

/// Waits until `node` synced to `slot` (later syncs may come first).
async fn synced_to(events: &mut Events, node: usize, slot: u64) -> Done {
    loop {
        let done = synced(events, node).await;
        assert!(done.slot <= slot, "synced past {slot}: {done:?}");
        if done.slot == slot {
            return done;
        }
    }
}

/// The node's state is the chain's at `slot`, entry for entry, including the keys churned
/// since the base.
fn assert_state_is_chain_at(db: &dyn StateDb, slot: u64) {
    let (_dir, reference) = CHAIN.reference(slot);
    let got = entries(db);
    let want = entries(&reference);
    assert_eq!(got.len(), want.len(), "entry count at slot {slot}");
    assert!(got == want, "state differs from the chain at slot {slot}");
    let get = |k: &[u8]| db.view().unwrap().get(k).unwrap();
    assert_eq!(get(HOT), Some(slot.to_le_bytes().to_vec()), "the hot key");
    assert_eq!(get(&churn(slot)), Some(slot.to_le_bytes().to_vec()));
    assert_eq!(
        get(&churn(slot - 3)),
        None,
        "created and deleted after the base"
    );
    // Deleted three slots after its creation, re-created at the next multiple of 7.
    let again = (RANGE + 1..=slot)
        .rev()
        .find(|s| s.is_multiple_of(7))
        .unwrap()
        - 7;
    assert_eq!(
        get(&churn(again)),
        Some(b"again".to_vec()),
        "deleted, then re-created"
    );
    assert_eq!(db.view().unwrap().slot(), Some(slot));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_joiner_among_three_producers_is_served_by_all_and_ends_at_the_newest_incremental() {
    init_tracing();
    let mut events = Events::new();
    let ps = producers(&events, 3, 600_000).await;
    let mut chain = Running::start(CHAIN, ps.iter().map(|p| p.ctl()).collect(), 0, SLOT);
    let full = made_by_all(&mut events, 3, RANGE).await;
    assert_eq!(full.kind, SnapshotKind::Full, "the genesis base");
    let first_incr = made_by_all(&mut events, 3, 3 * RANGE).await;
    assert_eq!(first_incr.kind, SnapshotKind::Incremental);
    assert_eq!(first_incr.base.unwrap().content_root, full.content_root);

    // The joiner arrives while the chain moves on; the full takes several intervals.
    let joiner = start_syncing(
        &events,
        10,
        &node_dir(0, 0, 0),
        &ps.iter().collect::<Vec<_>>(),
    )
    .await;
    let first = synced(&mut events, 10).await;
    println!("first sync: {first:?}");
    assert!(
        first.with_full && first.kind == SnapshotKind::Incremental,
        "{first:?}"
    );
    let serving: Vec<_> = first.per_peer.iter().filter(|(_, b)| *b > 0).collect();
    assert_eq!(
        serving.len(),
        3,
        "every producer served: {:?}",
        first.per_peer
    );
    assert!(
        chain.now() >= first.slot + 2 * RANGE,
        "the download outlasted several snapshot intervals (chain at {}, synced {})",
        chain.now(),
        first.slot
    );

    // The chain stops; the joiner catches up to the newest incremental by itself.
    // (At the next snapshot slot: those already made were reported while waiting above.)
    let newest = (chain.now() / RANGE + 1) * RANGE;
    let end = newest + 5;
    chain.stop_at(end);
    chain.reached(end).await;
    let last = made_by_all(&mut events, 3, newest).await;
    let done = synced_to(&mut events, 10, newest).await;
    println!("caught up: {done:?}");
    assert!(!done.with_full, "only the incremental: {done:?}");
    assert_eq!(done.bank_hash, last.bank_hash);
    assert_state_is_chain_at(&joiner.db, newest);

    // It holds and serves what it loaded: a second joiner that dials only it is served by it.
    let held: Vec<(SnapshotKind, u64)> = joiner
        .query(|s| {
            s.behaviour()
                .snapsync
                .store()
                .list()
                .iter()
                .map(|s| (s.manifest().kind, s.manifest().slot))
                .collect()
        })
        .await;
    assert!(held.contains(&(SnapshotKind::Full, RANGE)), "{held:?}");
    assert!(
        held.contains(&(SnapshotKind::Incremental, newest)),
        "{held:?}"
    );
    let second = start_syncing(&events, 11, &node_dir(0, 0, 0), &[&joiner]).await;
    let done2 = synced_to(&mut events, 11, newest).await;
    assert_eq!(done2.bank_hash, last.bank_hash);
    // (The producers, hearing its request, answer it too.)
    let from_joiner = done2
        .per_peer
        .iter()
        .find(|(p, _)| *p == joiner.peer_id)
        .map_or(0, |(_, b)| *b);
    assert!(
        from_joiner > 0,
        "the first joiner served nothing: {:?}",
        done2.per_peer
    );
    assert_state_is_chain_at(&second.db, newest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_behind_asks_by_itself_and_fetches_only_the_incremental() {
    init_tracing();
    let mut events = Events::new();
    let ps = producers(&events, 2, 4_000_000).await;
    let chain = Running::start(CHAIN, ps.iter().map(|p| p.ctl()).collect(), 0, SLOT);
    let full = made_by_all(&mut events, 2, RANGE).await;
    chain.stop_at(3 * RANGE + 5);
    let at = made_by_all(&mut events, 2, 3 * RANGE).await;

    let dir = node_dir(0, 0, 0);
    let producers_of: Vec<&TestNode> = ps.iter().collect();
    let node = start_syncing(&events, 10, &dir, &producers_of).await;
    let done = synced_to(&mut events, 10, 3 * RANGE).await;
    assert_eq!(done.bank_hash, at.bank_hash);

    // Stopped while the chain moves on by less than a full interval.
    node.stop();
    drop(node);
    chain.stop_at(8 * RANGE + 5);
    let newest = made_by_all(&mut events, 2, 8 * RANGE).await;

    // Restarted on the same data dir: no one tells it to sync; it asks at its first tick.
    let _node = start_syncing(&events, 20, &dir, &producers_of).await;
    events
        .wait(LONG, "the restarted node's first round", |i, e| match e {
            Ev::Snap(Event::DiscoveryStarted { local_slot, .. }) if i == 20 => {
                assert_eq!(*local_slot, Some(3 * RANGE));
                Some(())
            }
            _ => None,
        })
        .await;
    let done = synced_to(&mut events, 20, 8 * RANGE).await;
    println!(
        "after the restart: fetched {} bytes; the full is {}",
        done.fetched_bytes, full.archive_size
    );
    assert!(!done.with_full, "{done:?}");
    assert_eq!(done.kind, SnapshotKind::Incremental);
    assert!(done.fetched_bytes > 0);
    assert!(
        done.fetched_bytes * 10 < full.archive_size,
        "fetched {} bytes, the full is {}",
        done.fetched_bytes,
        full.archive_size
    );
    assert_eq!(done.bank_hash, newest.bank_hash);
    assert_state_is_chain_at(&dir.1, 8 * RANGE);
}

/// One node's archives: (kind, slot) -> (content root, archive bytes).
type Archives = BTreeMap<(SnapshotKind, u64), (ContentRoot, Vec<u8>)>;

/// Executes the chain through slot 40 on a fresh node, its genesis written in batches of
/// `batch`, and snapshots it as the creator would: the full base at 10, incrementals at 20, 30
/// and 40.
fn independent_node(batch: u64) -> Archives {
    let dir = tempfile::tempdir().unwrap();
    let db = snapsync::db::LmdbState::open(dir.path().join("state")).unwrap();
    let store = SnapshotStore::open(dir.path().join("snapshots")).unwrap();
    let options = CreatorConfig::default().options();
    let mut out = Archives::new();
    let mut base: Option<std::sync::Arc<snapsync::layers::snapshot::Snapshot>> = None;
    for slot in 1..=4 * RANGE {
        CHAIN.commit(&db, slot, batch);
        if !slot.is_multiple_of(RANGE) {
            continue;
        }
        let view = db.view().unwrap();
        let snap = match &base {
            None => create_snapshot(&store, view.as_ref(), &options).unwrap(),
            Some(b) => create_incremental(&store, view.as_ref(), b, &options).unwrap(),
        };
        let m = snap.manifest();
        let bytes = std::fs::read(snap.archive_path()).unwrap();
        out.insert((m.kind, m.slot), (m.content_root, bytes));
        if base.is_none() {
            base = Some(snap);
        }
    }
    out
}

#[test]
fn two_independent_nodes_make_byte_identical_full_and_incremental_archives() {
    // Different write batching gives different DB pages, not different archives.
    let a = independent_node(64);
    let b = independent_node(5000);
    assert_eq!(a.len(), 4);
    for (key, (root, bytes)) in &a {
        let (other_root, other_bytes) = &b[key];
        assert_eq!(root, other_root, "{key:?}");
        assert!(bytes == other_bytes, "{key:?}: archives differ");
    }
    // The format is fixed: these bytes are what every version of this format writes for this
    // chain (a change here is a format change; see docs/FORMAT.md).
    let golden = [
        (
            (SnapshotKind::Full, 10),
            "ad5d96d71e9654807448d60658ea7974eb05978df5cd07ce903c7b2c14218f0e",
        ),
        (
            (SnapshotKind::Incremental, 40),
            "67171f4fd58486bd78cba9fbca6eb083b866405b53b90aacf60d7cdb8073ff9b",
        ),
    ];
    for (key, hex) in golden {
        assert_eq!(a[&key].0.to_hex(), hex, "{key:?}");
    }
}
