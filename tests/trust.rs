//! Trust in a real network: an attacker on another chain that races far ahead, with one
//! identity, against honest producers executing the chain.

mod common;

use std::time::Duration;

use common::chain::{Chain, Running};
use common::init_tracing;
use common::net::*;
use snapsync::Event;
use snapsync::db::StateDb;
use snapsync::snapshot::{CreatorConfig, Manifest};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attacker_chain_racing_ahead_is_never_loaded() {
    init_tracing();
    let mut events = Events::new();
    // Two honest producers of the chain.
    let mut honest = Vec::new();
    for i in 0..2 {
        let (dir, db) = node_dir(0, 0, 0);
        let cfg = serve_only(config(dir.path()));
        honest.push(start_node(i, dir.clone(), db, cfg, events.tx.clone()).await);
    }
    honest[0].dial(honest[1].addr.clone());
    let chain = Running::start(
        HONEST,
        honest.iter().map(|p| p.ctl()).collect(),
        0,
        Duration::from_millis(20),
    );
    chain.stop_at(25);
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
