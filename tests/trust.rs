//! Trust in a real network: an attacker on another chain that races far ahead, with one
//! identity, against honest producers executing the chain.

mod common;

use std::time::Duration;

use common::chain::{Chain, Running};
use common::init_tracing;
use common::net::*;
use snapsync::Event;
use snapsync::db::StateDb;
use snapsync::layers::snapshot::{CreatorConfig, Manifest};

const LONG: Duration = Duration::from_secs(60);

const HONEST: Chain = Chain {
    seed: 1,
    accounts: 256,
    value_len: 512,
};

/// The attacker's chain: another state, at a slot far ahead.
const FORGED: Chain = Chain {
    seed: 666,
    accounts: 256,
    value_len: 512,
};
const FORGED_SLOT: u64 = 1 << 40;

fn config(dir: &std::path::Path) -> snapsync::Config {
    tune(test_config(dir), |d| d.with_behind_threshold(0)).with_creator(
        CreatorConfig::default()
            .with_range_for_snapshot(10)
            .with_full_interval(10),
    )
}

/// `n` serve-only producers executing the honest chain to slot 25, connected to each other.
async fn producers(n: usize, events: &Events) -> (Vec<TestNode>, Running) {
    let nodes = start_producers(events, 0, n, config).await;
    let chain = Running::start(
        HONEST,
        nodes.iter().map(|p| p.ctl()).collect(),
        0,
        Duration::from_millis(20),
    );
    chain.stop_at(25);
    (nodes, chain)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attacker_chain_racing_ahead_is_never_loaded() {
    init_tracing();
    let mut events = Events::new();
    // Two honest producers of the chain.
    let (honest, _chain) = producers(2, &events).await;
    // The attacker: its own state, a self-consistent full snapshot at a slot far ahead.
    let (dir, db) = node_dir(0, 0, 0);
    for s in 1..=3 {
        FORGED.commit(&db, s, 1024);
    }
    db.commit_slot(FORGED_SLOT, |w| w.put(b"stolen", b"everything"))
        .unwrap();
    let cfg = serve_only(config(dir.path())).with_creator(
        CreatorConfig::default()
            .with_range_for_snapshot(1 << 20)
            .with_full_interval(1 << 20),
    );
    let attacker = start_node(2, dir.clone(), db, cfg, events.tx.clone()).await;
    attacker.run(|s| s.behaviour_mut().snapsync.on_slot(FORGED_SLOT));
    let mut made: Vec<(usize, Manifest)> = Vec::new();
    while !(made.iter().any(|(i, m)| *i == 2 && m.slot == FORGED_SLOT)
        && made.iter().filter(|(i, m)| *i < 2 && m.slot == 20).count() == 2)
    {
        made.push(
            events
                .wait(LONG, "the snapshots", |i, e| match e {
                    Ev::Snap(Event::SnapshotCreated { manifest }) => Some((i, manifest.clone())),
                    _ => None,
                })
                .await,
        );
    }
    let forged = made
        .iter()
        .find(|(i, _)| *i == 2)
        .map(|(_, m)| m.clone())
        .unwrap();
    let honest_20 = made
        .iter()
        .find(|(i, m)| *i == 0 && m.slot == 20)
        .map(|(_, m)| m.clone())
        .unwrap();

    // A node that trusts the honest producers, and one that asks for two agreeing peers (the
    // attacker has one identity). Both hear the attacker first.
    let (dir_t, db_t) = node_dir(0, 0, 0);
    let trusting = start_node(
        10,
        dir_t.clone(),
        db_t,
        config(dir_t.path()).with_trusted_peers([honest[0].peer_id, honest[1].peer_id], 1),
        events.tx.clone(),
    )
    .await;
    let (dir_u, db_u) = node_dir(0, 0, 0);
    let counting = start_node(
        11,
        dir_u.clone(),
        db_u,
        config(dir_u.path()).with_min_agreeing_peers(2),
        events.tx.clone(),
    )
    .await;
    for n in [&trusting, &counting] {
        n.dial(attacker.addr.clone());
        n.dial(honest[0].addr.clone());
        n.dial(honest[1].addr.clone());
    }
    let mut synced = std::collections::BTreeMap::new();
    let mut heard_attacker = [false, false];
    // Both sync the honest chain; neither ever loads the attacker's snapshot (several rounds).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
    while tokio::time::Instant::now() < deadline {
        // (Adverts are forgotten after two discovery intervals: look while they are fresh.)
        for (k, n) in [&trusting, &counting].into_iter().enumerate() {
            let status = n.query(|s| s.behaviour().snapsync.status()).await;
            heard_attacker[k] |= status.adverts.iter().any(|a| a.peer == attacker.peer_id);
            assert!(
                status.best_known_slot.is_none_or(|s| s < FORGED_SLOT),
                "the forged slot moved node {}'s idea of the chain",
                n.index
            );
        }
        let left = deadline - tokio::time::Instant::now();
        let Ok(got) = tokio::time::timeout(
            left.min(Duration::from_millis(200)),
            events.wait(LONG, "", |i, e| match e {
                Ev::Snap(Event::SnapshotSynced {
                    slot, bank_hash, ..
                }) if i >= 10 => Some((i, *slot, *bank_hash)),
                Ev::Snap(Event::SnapshotFound { key, .. }) if i >= 10 => {
                    assert_ne!(
                        key.slot, FORGED_SLOT,
                        "node {i} chose the attacker's snapshot"
                    );
                    None
                }
                _ => None,
            }),
        )
        .await
        else {
            continue;
        };
        assert_ne!(
            got.2, forged.bank_hash,
            "node {} loaded the forged state",
            got.0
        );
        synced.insert(got.0, (got.1, got.2));
    }
    println!("synced: {synced:?}");
    assert_eq!(synced.get(&10), Some(&(20, honest_20.bank_hash)));
    assert_eq!(synced.get(&11), Some(&(20, honest_20.bank_hash)));
    for n in [&trusting, &counting] {
        assert_eq!(n.db.slot().unwrap(), Some(20));
    }
    // The forged advert was heard (the test would prove nothing otherwise).
    assert_eq!(heard_attacker, [true, true], "the attacker was not heard");
}

/// What one snapshot directory in a node's store is, once `edit` has rewritten its manifest
/// (the store checks files' sizes, not what a manifest claims).
fn doctor_manifest(store_dir: &std::path::Path, edit: impl Fn(&mut Manifest)) {
    for entry in std::fs::read_dir(store_dir).unwrap() {
        let dir = entry.unwrap().path();
        let path = dir.join(snapsync::layers::snapshot::MANIFEST_FILE);
        if let Ok(bytes) = std::fs::read(&path) {
            let mut m = Manifest::decode(&bytes).unwrap();
            edit(&mut m);
            std::fs::write(&path, m.encode()).unwrap();
        }
    }
}

/// Flips a byte in every chunk of every archive in a store: whatever range it serves fails.
fn corrupt_archives(store_dir: &std::path::Path, chunk: usize) {
    for entry in std::fs::read_dir(store_dir).unwrap() {
        let path = entry
            .unwrap()
            .path()
            .join(snapsync::layers::snapshot::ARCHIVE_FILE);
        if let Ok(mut bytes) = std::fs::read(&path) {
            for at in (0..bytes.len()).step_by(chunk) {
                bytes[at] ^= 0xff;
            }
            std::fs::write(&path, bytes).unwrap();
        }
    }
}

/// Waits for `n` producers' snapshots at `slot`; returns one's manifest.
async fn made_at(events: &mut Events, slot: u64, n: usize) -> Manifest {
    let mut made = Vec::new();
    while made.len() < n {
        made.push(
            events
                .wait(LONG, "the snapshots", |_, e| match e {
                    Ev::Snap(Event::SnapshotCreated { manifest }) if manifest.slot == slot => {
                        Some(manifest.clone())
                    }
                    _ => None,
                })
                .await,
        );
    }
    made.remove(0)
}

/// Trust finding 1: with the default policy, one peer's advert of a valid archive at a slot
/// near `u64::MAX` replaced the live state of a producer whose sync is on, and every slot it
/// committed after failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attacker_announcing_a_slot_near_the_end_of_time_does_not_replace_a_producers_state() {
    init_tracing();
    let mut events = Events::new();
    // The attacker: a self-consistent snapshot of its own state at u64::MAX - 1.
    let (adir, adb) = node_dir(0, 0, 0);
    FORGED.commit(&adb, 1, 1024);
    adb.commit_slot(u64::MAX - 1, |w| w.put(b"mine", b"now"))
        .unwrap();
    let cfg = serve_only(config(adir.path()));
    let attacker = start_node(1, adir.clone(), adb, cfg, events.tx.clone()).await;
    attacker.run(|s| s.behaviour_mut().snapsync.create_snapshot_now());
    events
        .wait(LONG, "the attacker's snapshot", |i, e| match e {
            Ev::Snap(Event::SnapshotCreated { manifest }) if i == 1 => Some(manifest.slot),
            _ => None,
        })
        .await;
    // A producer executing the chain, sync on, default trust policy.
    let (pdir, pdb) = node_dir(0, 0, 0);
    let producer = start_node(0, pdir.clone(), pdb, config(pdir.path()), events.tx.clone()).await;
    let mut chain = Running::start(HONEST, vec![producer.ctl()], 0, Duration::from_millis(20));
    chain.reached(5).await;
    producer.dial(attacker.addr.clone());
    // Several rounds go by while the attacker answers every request (the producer asks every
    // second here).
    let asking = {
        let p = producer.ctl();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                p.query(|s| s.behaviour_mut().snapsync.sync_now()).await;
            }
        })
    };
    events
        .none_for(Duration::from_secs(6), |i, e| match e {
            Ev::Snap(Event::SnapshotFound { key, .. } | Event::DownloadStarted { key, .. })
                if i == 0 =>
            {
                panic!(
                    "the producer went for the attacker's snapshot at {}",
                    key.slot
                )
            }
            Ev::Snap(Event::SnapshotSynced { slot, .. }) if i == 0 => {
                panic!("the producer loaded a snapshot at {slot}")
            }
            _ => {}
        })
        .await;
    let heard = producer
        .query(move |s| {
            s.behaviour()
                .snapsync
                .status()
                .adverts
                .iter()
                .any(|a| a.newest().is_some_and(|n| n.key.slot == u64::MAX - 1))
        })
        .await;
    assert!(heard, "the attacker's advert was heard");
    asking.abort();
    // Its state is its own and its slot loop goes on.
    let now = chain.now();
    chain.reached(now + 5).await;
    assert!(producer.db.slot().unwrap().unwrap() >= now + 5);
    assert!(producer.db.slot().unwrap().unwrap() < 1 << 32);
}

/// A validator restarted on its state is executing from its first moment, before it commits
/// a slot: its first tick asks at once, and one advert of any higher slot, under the default
/// policy, used to be chosen in that first round and replace its state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_validator_keeps_its_state_before_its_first_slot() {
    init_tracing();
    let mut events = Events::new();
    let (adir, adb) = node_dir(0, 0, 0);
    FORGED.commit(&adb, 1, 1024);
    adb.commit_slot(1_000, |w| w.put(b"mine", b"now")).unwrap();
    let attacker = start_node(
        1,
        adir.clone(),
        adb,
        serve_only(config(adir.path())),
        events.tx.clone(),
    )
    .await;
    attacker.run(|s| s.behaviour_mut().snapsync.create_snapshot_now());
    events
        .wait(LONG, "the attacker's snapshot", |i, e| match e {
            Ev::Snap(Event::SnapshotCreated { manifest }) if i == 1 => Some(manifest.slot),
            _ => None,
        })
        .await;
    // The validator's state, as a restart finds it: slots 1..=5 committed, no slot since.
    let (vdir, vdb) = node_dir(0, 0, 0);
    for slot in 1..=5 {
        HONEST.commit(&vdb, slot, 1024);
    }
    let validator = start_node(0, vdir.clone(), vdb, config(vdir.path()), events.tx.clone()).await;
    validator.dial(attacker.addr.clone());
    let asking = {
        let v = validator.ctl();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                v.query(|s| s.behaviour_mut().snapsync.sync_now()).await;
            }
        })
    };
    events
        .none_for(Duration::from_secs(4), |i, e| match e {
            Ev::Snap(Event::SnapshotFound { key, .. } | Event::DownloadStarted { key, .. })
                if i == 0 =>
            {
                panic!(
                    "the restarted validator went for a snapshot at {}",
                    key.slot
                )
            }
            _ => {}
        })
        .await;
    asking.abort();
    let heard = validator
        .query(|s| {
            s.behaviour()
                .snapsync
                .status()
                .adverts
                .iter()
                .any(|a| a.newest().is_some_and(|n| n.key.slot == 1_000))
        })
        .await;
    assert!(heard, "the attacker's advert was heard");
    assert_eq!(validator.db.slot().unwrap(), Some(5));
}

/// Trust finding 2: what an advert says beyond its key was taken from whichever advertiser's
/// PeerId sorted first, its peers were the first 16 by PeerId, and a failure struck every
/// advertiser, trusted ones included. One identity ground to sort first, advertising the
/// trusted producers' snapshot with counts that cannot load and serving bad chunks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_ground_identity_among_three_trusted_producers_cannot_stall_or_discredit_them() {
    init_tracing();
    let mut events = Events::new();
    let (producers, _chain) = producers(3, &events).await;
    let honest = made_at(&mut events, 20, 3).await;
    // The attacker's identity sorts below every producer's.
    let lowest = producers.iter().map(|p| p.peer_id).min().unwrap();
    let key = loop {
        let k = libp2p::identity::Keypair::generate_ed25519();
        if k.public().to_peer_id() < lowest {
            break k;
        }
    };
    let (adir, adb) = node_dir(0, 0, 0);
    let astore = adir.path().join("snapshots");
    std::fs::create_dir_all(&astore).unwrap();
    let held = producers[0]
        .query(move |s| {
            s.behaviour()
                .snapsync
                .store()
                .get(&honest.content_root)
                .unwrap()
        })
        .await;
    common::copy_snapshot(&held, &astore);
    doctor_manifest(&astore, |m| {
        m.entry_count = 1;
        m.state_bytes = u64::MAX / 4;
    });
    corrupt_archives(&astore, honest.chunk_size.bytes() as usize);
    let attacker = start_node_keyed(
        9,
        adir.clone(),
        adb,
        serve_only(config(adir.path())),
        events.tx.clone(),
        key,
    )
    .await;
    // A joiner that trusts the three producers, two of them needed.
    let trusted: Vec<_> = producers.iter().map(|p| p.peer_id).collect();
    let (jdir, jdb) = node_dir(0, 0, 0);
    let cfg = config(jdir.path()).with_trusted_peers(trusted.clone(), 2);
    let joiner = start_node(10, jdir.clone(), jdb, cfg, events.tx.clone()).await;
    joiner.dial(attacker.addr.clone());
    for p in &producers {
        joiner.dial(p.addr.clone());
    }
    // It syncs the producers' snapshot within two rounds (the interval is 2 s), and strikes
    // none of them.
    let started = tokio::time::Instant::now();
    let synced = events
        .wait(
            Duration::from_secs(20),
            "the joiner's sync",
            |i, e| match e {
                Ev::Snap(Event::SnapshotSynced {
                    slot, bank_hash, ..
                }) if i == 10 => Some((*slot, *bank_hash)),
                Ev::Snap(Event::PeerMisbehaved { peer, .. }) if i == 10 => {
                    assert!(!trusted.contains(peer), "a trusted producer was struck");
                    None
                }
                _ => None,
            },
        )
        .await;
    println!("synced {synced:?} after {:?}", started.elapsed());
    assert_eq!(synced, (20, honest.bank_hash));
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "within two rounds"
    );
    let stored = joiner
        .query(move |s| {
            s.behaviour()
                .snapsync
                .store()
                .get(&honest.content_root)
                .unwrap()
        })
        .await;
    assert_eq!(stored.manifest().entry_count, honest.entry_count);
    assert_eq!(stored.manifest().state_bytes, honest.state_bytes);
}

/// Trust finding 3: with a pinned slot and bank hash but no content root, candidates were
/// ranked by their advertisers, so an attacker announcing the pinned state under a fresh root
/// from fresh identities after each failure kept the node from ever trying the honest root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_node_syncs_despite_an_attacker_rotating_fake_roots() {
    init_tracing();
    let mut events = Events::new();
    let (pdir, pdb) = node_dir(0, 0, 0);
    let producer = start_node(
        0,
        pdir.clone(),
        pdb,
        serve_only(config(pdir.path())),
        events.tx.clone(),
    )
    .await;
    let chain = Running::start(HONEST, vec![producer.ctl()], 0, Duration::from_millis(20));
    chain.stop_at(25);
    let honest = made_at(&mut events, 20, 1).await;
    // A fake: another state at slot 20, its manifest claiming the pinned bank hash; two
    // identities serve each fake root, one more than serve the honest one.
    let fake = |n: u64| {
        let (dir, db) = node_dir(0, 0, 0);
        let chain = Chain {
            seed: 1000 + n,
            ..FORGED
        };
        for s in 1..=20 {
            chain.commit(&db, s, 1024);
        }
        let store =
            snapsync::layers::snapshot::SnapshotStore::open(dir.path().join("snapshots")).unwrap();
        let view = db.view().unwrap();
        snapsync::layers::snapshot::create_snapshot(&store, view.as_ref(), &Default::default())
            .unwrap();
        doctor_manifest(&dir.path().join("snapshots"), |m| {
            m.bank_hash = honest.bank_hash
        });
        (dir, db)
    };
    let mut attackers = Vec::new();
    let (fdir, _fdb) = fake(1);
    for k in 0..2 {
        attackers.push(serving_copy(&fdir, 20 + k, &events).await);
    }
    let pin = snapsync::TrustPolicy::TrustedSnapshot {
        slot: 20,
        bank_hash: honest.bank_hash,
        content_root: None,
    };
    let (ndir, ndb) = node_dir(0, 0, 0);
    let node = start_node(
        10,
        ndir.clone(),
        ndb,
        config(ndir.path()).with_trust(pin),
        events.tx.clone(),
    )
    .await;
    for a in &attackers {
        node.dial(a.addr.clone());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    node.dial(producer.addr.clone());
    // The honest holder is heard (after the first fake, which may be tried and fail already):
    // the rounds below go fast, and a loaded machine must not make them outrun its answer.
    let honest_peer = producer.peer_id;
    let heard = tokio::time::Instant::now();
    while !node
        .query(move |s| {
            let status = s.behaviour().snapsync.status();
            status.adverts.iter().any(|a| a.peer == honest_peer)
        })
        .await
    {
        assert!(
            heard.elapsed() < Duration::from_secs(30),
            "the producer is heard"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // After each failure, a fresh root from fresh identities.
    let started = tokio::time::Instant::now();
    let mut round = 1;
    let synced = loop {
        let got = events
            .wait(
                Duration::from_secs(30),
                "the pinned node's sync",
                |i, e| match e {
                    Ev::Snap(Event::SnapshotSynced {
                        slot, bank_hash, ..
                    }) if i == 10 => Some(Ok((*slot, *bank_hash))),
                    Ev::Snap(Event::SyncFailed { .. }) if i == 10 => Some(Err(())),
                    _ => None,
                },
            )
            .await;
        match got {
            Ok(s) => break s,
            Err(()) => {
                round += 1;
                assert!(round < 6, "never tried the honest root");
                let (fdir, _fdb) = fake(round);
                for k in 0..2 {
                    let a = serving_copy(&fdir, 20 + 2 * round as usize + k, &events).await;
                    node.dial(a.addr.clone());
                    attackers.push(a);
                }
            }
        }
    };
    println!(
        "synced {synced:?} after {:?} and {round} tries",
        started.elapsed()
    );
    assert_eq!(synced, (20, honest.bank_hash));
    assert_eq!(node.db.slot().unwrap(), Some(20));
}

/// A node (empty DB, serving only) whose store holds a copy of the snapshots in `from`'s.
async fn serving_copy(from: &tempfile::TempDir, index: usize, events: &Events) -> TestNode {
    serving_edited_copy(from, index, events, |_| {}).await
}

/// [`serving_copy`], each copied snapshot's directory changed by `edit` before the node starts.
async fn serving_edited_copy(
    from: &tempfile::TempDir,
    index: usize,
    events: &Events,
    edit: impl Fn(&std::path::Path),
) -> TestNode {
    let (dir, db) = node_dir(0, 0, 0);
    let store = dir.path().join("snapshots");
    std::fs::create_dir_all(&store).unwrap();
    for entry in std::fs::read_dir(from.path().join("snapshots")).unwrap() {
        let snapshot = entry.unwrap().path();
        let target = store.join(snapshot.file_name().unwrap());
        std::fs::create_dir_all(&target).unwrap();
        for file in std::fs::read_dir(&snapshot).unwrap() {
            let file = file.unwrap();
            std::fs::copy(file.path(), target.join(file.file_name())).unwrap();
        }
        edit(&target);
    }
    let cfg = serve_only(config(dir.path()));
    start_node(index, dir.clone(), db, cfg, events.tx.clone()).await
}

/// A chain's own state root, as its light client knows it for each slot: here a hash of the
/// hot key and every account (distinct from snapsync's bank hash).
fn app_root(read: &dyn Fn(&[u8]) -> Option<Vec<u8>>, chain: &Chain) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    h.update(&read(common::chain::HOT).unwrap_or_default());
    for i in 0..chain.accounts {
        h.update(&read(&common::chain::account(i)).unwrap_or_default());
    }
    h.finalize()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_applications_state_check_refuses_another_chains_state_and_the_next_candidate_is_taken()
{
    use snapsync::db::{CheckedState, StateVerdict};
    init_tracing();
    let mut events = Events::new();
    // The light client: the honest chain's root at every slot, from its headers (here, by
    // executing it).
    let (_ldir, ldb) = node_dir(0, 0, 0);
    let mut roots = std::collections::HashMap::new();
    for s in 1..=25 {
        HONEST.commit(&ldb, s, 1024);
        roots.insert(s, app_root(&|k| ldb.get(k).unwrap(), &HONEST));
    }
    let (honest, _chain) = producers(2, &events).await;
    let honest_20 = made_at(&mut events, 20, 2).await;
    // Two identities serve another chain's state at slot 25: a valid snapshot, newer than the
    // honest one, its bank hash proven, at a slot the chain has: only the application can tell.
    let (fdir, fdb) = node_dir(0, 0, 0);
    for s in 1..=3 {
        FORGED.commit(&fdb, s, 1024);
    }
    fdb.commit_slot(25, |w| w.put(common::chain::HOT, &25u64.to_le_bytes()))
        .unwrap();
    let store =
        snapsync::layers::snapshot::SnapshotStore::open(fdir.path().join("snapshots")).unwrap();
    let view = fdb.view().unwrap();
    let forged =
        snapsync::layers::snapshot::create_snapshot(&store, view.as_ref(), &Default::default())
            .unwrap();
    drop(view);
    let liars = [
        serving_copy(&fdir, 20, &events).await,
        serving_copy(&fdir, 21, &events).await,
    ];
    // The joiner's check compares the state's root with the light client's.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let check = {
        let seen = seen.clone();
        move |state: &CheckedState<'_>| {
            let root = app_root(&|k| state.read.get(k).unwrap(), &HONEST);
            let verdict = match roots.get(&state.slot) {
                None => StateVerdict::Undecided(format!("no header for slot {}", state.slot)),
                Some(r) if *r == root => StateVerdict::Accept,
                Some(_) => StateVerdict::Refuse("the state root differs from the header's".into()),
            };
            seen.lock().unwrap().push((state.slot, verdict.clone()));
            verdict
        }
    };
    let (ndir, ndb) = node_dir(0, 0, 0);
    let node = start_node(
        10,
        ndir.clone(),
        ndb,
        // One strike is enough to be ignored: a strike shows as an event.
        tune(config(ndir.path()), |d| d.with_max_strikes(1)).with_state_check(check),
        events.tx.clone(),
    )
    .await;
    // First only the liars: their snapshot is chosen, loaded, refused.
    for l in &liars {
        node.dial(l.addr.clone());
    }
    enum Heard {
        Synced(u64, snapsync::BankHash),
        Failed(u64, String),
        Struck(snapsync::libp2p::PeerId),
    }
    let watch = |i: usize, e: &Ev| match e {
        Ev::Snap(Event::SnapshotSynced {
            slot, bank_hash, ..
        }) if i == 10 => Some(Heard::Synced(*slot, *bank_hash)),
        Ev::Snap(Event::SyncFailed { key, error }) if i == 10 => {
            Some(Heard::Failed(key.slot, error.to_string()))
        }
        Ev::Snap(Event::PeerMisbehaved { peer, reason }) if i == 10 => {
            assert!(reason.contains("check refused"), "{reason}");
            Some(Heard::Struck(*peer))
        }
        _ => None,
    };
    let mut struck = std::collections::HashSet::new();
    let mut failed = 0;
    while failed == 0 {
        match events.wait(LONG, "the refusal", watch).await {
            Heard::Synced(slot, _) => panic!("synced slot {slot} from the liars"),
            Heard::Struck(peer) => {
                struck.insert(peer);
            }
            Heard::Failed(slot, error) => {
                failed += 1;
                assert_eq!(slot, 25, "{error}");
                assert!(error.contains("state check refused"), "{error}");
                assert_eq!(node.db.slot().unwrap(), None, "nothing was swapped in");
            }
        }
    }
    // Then the honest producers: the next candidate is theirs.
    for h in &honest {
        node.dial(h.addr.clone());
    }
    let synced = loop {
        match events.wait(LONG, "the node's sync", watch).await {
            Heard::Synced(slot, hash) => break (slot, hash),
            Heard::Struck(peer) => {
                struck.insert(peer);
            }
            Heard::Failed(slot, error) => panic!("failed again at slot {slot}: {error}"),
        }
    };
    assert_eq!(synced, (20, honest_20.bank_hash));
    assert_eq!(node.db.slot().unwrap(), Some(20));
    assert_eq!(failed, 1);
    // The check saw the forged state first, then the honest one.
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![
            (
                25,
                StateVerdict::Refuse("the state root differs from the header's".into())
            ),
            (20, StateVerdict::Accept)
        ]
    );
    // Both advertisers of the refused state were struck, no honest one.
    tokio::time::sleep(Duration::from_millis(200)).await;
    while let Ok(Some((i, e))) =
        tokio::time::timeout(Duration::from_millis(10), events.rx.recv()).await
    {
        if let (10, Ev::Snap(Event::PeerMisbehaved { peer, .. })) = (i, e) {
            struck.insert(peer);
        }
    }
    let liar_ids: std::collections::HashSet<_> = liars.iter().map(|l| l.peer_id).collect();
    assert_eq!(struck, liar_ids);
    // It keeps nothing of the refused snapshot to serve.
    let kept =
        snapsync::layers::snapshot::SnapshotStore::open(ndir.path().join("snapshots")).unwrap();
    assert!(
        kept.list()
            .iter()
            .all(|s| s.manifest().content_root != forged.manifest().content_root),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_trusted_set_takes_effect_without_a_restart() {
    init_tracing();
    let mut events = Events::new();
    let (honest, _chain) = producers(1, &events).await;
    let made = made_at(&mut events, 20, 1).await;
    // A node that trusts last epoch's validator, gone now: the producer's snapshot is heard
    // but not taken.
    let gone = snapsync::libp2p::PeerId::random();
    let (dir, db) = node_dir(0, 0, 0);
    let node = start_node(
        10,
        dir.clone(),
        db,
        config(dir.path()).with_trusted_peers([gone], 1),
        events.tx.clone(),
    )
    .await;
    node.dial(honest[0].addr.clone());
    events
        .wait(LONG, "a round with nothing to take", |i, e| {
            matches!(
                e,
                Ev::Snap(Event::NoSnapshotAvailable { adverts, .. }) if i == 10 && *adverts > 0
            )
            .then_some(())
        })
        .await;
    assert_eq!(node.db.slot().unwrap(), None);
    // A policy that cannot work is refused, and changes nothing.
    let producer = honest[0].peer_id;
    let refused = node
        .query(move |s| {
            s.behaviour_mut()
                .snapsync
                .set_trust(snapsync::TrustPolicy::TrustedPeers {
                    peers: [producer].into(),
                    quorum: 2,
                })
                .map_err(|e| e.to_string())
        })
        .await;
    assert!(refused.unwrap_err().contains("quorum"));
    // The new epoch's set names the producer: it syncs, without a restart.
    let changed = tokio::time::Instant::now();
    node.query(move |s| {
        s.behaviour_mut()
            .snapsync
            .set_trust(snapsync::TrustPolicy::TrustedPeers {
                peers: [producer].into(),
                quorum: 1,
            })
            .unwrap()
    })
    .await;
    let synced = events.synced(Some(10)).await;
    println!("synced {:?} after the change", changed.elapsed());
    assert_eq!((synced.slot, synced.bank_hash), (20, made.bank_hash));
    let kept = node
        .query(move |s| {
            matches!(
                s.behaviour().snapsync.config().trust(),
                snapsync::TrustPolicy::TrustedPeers { peers, quorum: 1 } if peers.contains(&producer)
            )
        })
        .await;
    assert!(kept, "the config says the policy in force");
}

/// Waits for a round of node `index` that heard adverts and took nothing; a download it starts
/// meanwhile fails the test.
async fn nothing_taken(events: &mut Events, index: usize) {
    events
        .wait(LONG, "a round with nothing to take", |i, e| match e {
            Ev::Snap(Event::NoSnapshotAvailable { adverts, .. }) if i == index && *adverts > 0 => {
                Some(())
            }
            Ev::Snap(Event::DownloadStarted { key, .. }) if i == index => {
                panic!("node {index} took slot {} without a quorum", key.slot)
            }
            _ => None,
        })
        .await;
}

/// The signers of the attestations stored with `node`'s snapshot at `slot`.
async fn signers_at(node: &TestNode, slot: u64) -> Vec<snapsync::libp2p::PeerId> {
    let mut signers = node
        .query(move |s| {
            s.behaviour()
                .snapsync
                .store()
                .list()
                .iter()
                .filter(|snap| snap.manifest().slot == slot)
                .flat_map(|snap| snap.attestations().iter().filter_map(|a| a.signer()))
                .collect::<Vec<_>>()
        })
        .await;
    signers.sort();
    signers
}

/// Attestations: two validators sign what they make; a node that trusts them (quorum 2) and
/// reaches none of them syncs from a stranger that relays both signatures, and from a web
/// mirror of the stranger's store; a stranger relaying one signature is not enough.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_of_signatures_travels_with_the_snapshot_to_strangers_and_web_mirrors() {
    use common::web::{Fault, WebServer};
    init_tracing();
    let mut events = Events::new();
    let (validators, _chain) = producers(2, &events).await;
    let made = made_at(&mut events, 20, 2).await;
    let ids: Vec<_> = validators.iter().map(|v| v.peer_id).collect();
    for v in &validators {
        assert_eq!(
            signers_at(v, 20).await,
            vec![v.peer_id],
            "a producer signs what it makes"
        );
    }
    // A node of the validators' network syncs from them and keeps their signatures.
    let elsewhere = snapsync::libp2p::PeerId::random();
    let trusting =
        |dir: &std::path::Path| config(dir).with_trusted_peers([ids[0], ids[1], elsewhere], 2);
    let (dir, db) = node_dir(0, 0, 0);
    let relay = start_node(10, dir.clone(), db, trusting(dir.path()), events.tx.clone()).await;
    relay.dial(validators[0].addr.clone());
    let synced = events.synced(Some(10)).await;
    assert_eq!(synced.slot, 20);
    let mut both = ids.clone();
    both.sort();
    assert_eq!(
        signers_at(&relay, 20).await,
        both,
        "the signatures are stored to relay"
    );
    // The validators go away (a cluster restart).
    for v in &validators {
        v.stop();
    }
    // From the stranger alone.
    let (dir, db) = node_dir(0, 0, 0);
    let joiner = start_node(11, dir.clone(), db, trusting(dir.path()), events.tx.clone()).await;
    joiner.dial(relay.addr.clone());
    let synced = events.synced(Some(11)).await;
    assert_eq!((synced.slot, synced.bank_hash), (20, made.bank_hash));
    // From a web mirror of the stranger's store alone.
    let www = tempfile::tempdir().unwrap();
    let www_path = www.path().to_path_buf();
    relay
        .query(move |s| {
            snapsync::layers::snapshot::mirror(s.behaviour().snapsync.store(), &www_path).unwrap()
        })
        .await;
    let index = std::fs::read_to_string(www.path().join("index.json")).unwrap();
    assert!(index.contains("\"attestations\":[{\"signer\""), "{index}");
    let server = WebServer::start(www.path().to_path_buf(), Fault::None, None).await;
    let (dir, db) = node_dir(0, 0, 0);
    let web_joiner = start_node(
        12,
        dir.clone(),
        db,
        trusting(dir.path()).with_web_sources(vec![server.url()]),
        events.tx.clone(),
    )
    .await;
    let synced = events.synced(Some(12)).await;
    assert_eq!((synced.slot, synced.bank_hash), (20, made.bank_hash));
    // A stranger holding the same snapshot with one validator's signature: heard, not taken.
    let one = serving_copy(&validators[0].dir, 13, &events).await;
    let (dir, db) = node_dir(0, 0, 0);
    let wary = start_node(14, dir.clone(), db, trusting(dir.path()), events.tx.clone()).await;
    wary.dial(one.addr.clone());
    nothing_taken(&mut events, 14).await;
    assert_eq!(wary.db.slot().unwrap(), None);
    drop((joiner, web_joiner, wary, one, relay));
}

/// A light client that has finalized headers up to `known` and accepts any state at or below.
struct Headers {
    known: std::sync::Arc<std::sync::atomic::AtomicU64>,
    asked: std::sync::Arc<std::sync::Mutex<Vec<u64>>>,
}

impl snapsync::db::StateCheck for Headers {
    fn check(&self, state: &snapsync::db::CheckedState<'_>) -> snapsync::db::StateVerdict {
        self.asked.lock().unwrap().push(state.slot);
        if state.slot <= self.known.load(std::sync::atomic::Ordering::SeqCst) {
            snapsync::db::StateVerdict::Accept
        } else {
            snapsync::db::StateVerdict::Undecided(format!("no header for slot {}", state.slot))
        }
    }

    fn judges_up_to(&self) -> Option<u64> {
        Some(self.known.load(std::sync::atomic::Ordering::SeqCst))
    }
}

/// The state check says how far its light client is: a snapshot above is not fetched (it
/// could only be found undecided), the newest below is; once the headers catch up, the newer
/// one is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_the_light_client_cannot_judge_yet_is_fetched() {
    use std::sync::atomic::Ordering;
    init_tracing();
    let mut events = Events::new();
    let (honest, _chain) = producers(1, &events).await;
    made_at(&mut events, 20, 1).await;
    let known = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(15));
    let asked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let check = Headers {
        known: known.clone(),
        asked: asked.clone(),
    };
    let (dir, db) = node_dir(0, 0, 0);
    let node = start_node(
        10,
        dir.clone(),
        db,
        // A node that follows snapshots only (it does not execute the chain itself).
        tune(config(dir.path()), |d| d.with_executes(false)).with_state_check(check),
        events.tx.clone(),
    )
    .await;
    node.dial(honest[0].addr.clone());
    let first = events.synced(Some(10)).await;
    assert_eq!(first.slot, 10, "20 is beyond the headers");
    known.store(30, Ordering::SeqCst);
    let synced = events.synced(Some(10)).await;
    assert_eq!(synced.slot, 20);
    assert_eq!(
        *asked.lock().unwrap(),
        vec![10, 20],
        "never asked about what it cannot judge"
    );
}

/// Signatures that are not two trusted ones for this snapshot on this network count for
/// nothing, whoever relays them: a stranger carrying a trusted signature for another network,
/// one for another snapshot replayed onto this one, one of a key nobody trusts and the
/// validator's own valid one is heard and not taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signatures_for_another_network_or_snapshot_or_of_other_keys_count_for_nothing() {
    use snapsync::layers::snapshot::Attestation;
    use snapsync::libp2p::identity::Keypair;
    init_tracing();
    let mut events = Events::new();
    let (validators, _chain) = producers(1, &events).await;
    let made = made_at(&mut events, 20, 1).await;
    let other_validator = Keypair::generate_ed25519();
    let outsider = Keypair::generate_ed25519();
    let edit = |snapshot: &std::path::Path| {
        let m = Manifest::decode(&std::fs::read(snapshot.join("manifest.pb")).unwrap()).unwrap();
        let mut replayed = m.key();
        replayed.slot += 1;
        let path = snapshot.join("attestations.pb");
        let mut list = Attestation::decode_file(&std::fs::read(&path).unwrap()).unwrap();
        list.extend([
            Attestation::sign(&other_validator, "another-network", &m.key()).unwrap(),
            Attestation::sign(&other_validator, "default", &replayed).unwrap(),
            Attestation::sign(&outsider, "default", &m.key()).unwrap(),
        ]);
        std::fs::write(&path, Attestation::encode_file(&list)).unwrap();
    };
    let stranger = serving_edited_copy(&validators[0].dir, 13, &events, edit).await;
    let trusted = [validators[0].peer_id, other_validator.public().to_peer_id()];
    let (dir, db) = node_dir(0, 0, 0);
    let wary = start_node(
        14,
        dir.clone(),
        db,
        config(dir.path()).with_trusted_peers(trusted, 2),
        events.tx.clone(),
    )
    .await;
    wary.dial(stranger.addr.clone());
    for _ in 0..2 {
        nothing_taken(&mut events, 14).await;
    }
    assert_eq!(wary.db.slot().unwrap(), None);
    // The second validator's valid signature, relayed by another stranger, makes the quorum.
    let signed = move |snapshot: &std::path::Path| {
        let m = Manifest::decode(&std::fs::read(snapshot.join("manifest.pb")).unwrap()).unwrap();
        let path = snapshot.join("attestations.pb");
        let valid = Attestation::sign(&other_validator, "default", &m.key()).unwrap();
        std::fs::write(&path, Attestation::encode_file(&[valid])).unwrap();
    };
    let second = serving_edited_copy(&validators[0].dir, 15, &events, signed).await;
    wary.dial(second.addr.clone());
    let synced = events.synced(Some(14)).await;
    assert_eq!((synced.slot, synced.bank_hash), (20, made.bank_hash));
}
