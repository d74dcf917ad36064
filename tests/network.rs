//! snapsync as a libp2p behaviour, in real swarms (memory transport) with real chunk streams
//! (quinn on 127.0.0.1): discovery, decision, multi-peer download, load.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::net::*;
use common::{copy_snapshot, init_tracing, state_id};
use snapsync::Event;
use snapsync::db::StateDb;
use snapsync::layers::transfer::Token;

const LONG: Duration = Duration::from_secs(60);

/// The producer: a node with state at slot 10 that makes a snapshot of it and does not sync.
async fn producer(
    events: &mut Events,
    kib: u64,
    config: impl FnOnce(snapsync::Config) -> snapsync::Config,
) -> (TestNode, snapsync::layers::snapshot::Manifest) {
    let (dir, db) = node_dir(kib, 10, 42);
    let cfg = config(serve_only(test_config(dir.path())));
    let node = start_node(0, dir.clone(), db, cfg, events.tx.clone()).await;
    node.run(|s| s.behaviour_mut().snapsync.on_slot(10));
    let manifest = events
        .wait(LONG, "the producer's snapshot", |i, e| match e {
            Ev::Snap(Event::SnapshotCreated { manifest }) if i == 0 => Some(manifest.clone()),
            _ => None,
        })
        .await;
    (node, manifest)
}

fn capped(bytes_per_sec: u64) -> impl FnOnce(snapsync::Config) -> snapsync::Config {
    move |c| {
        let streamer = c.streamer().with_rate_limit(Some(bytes_per_sec));
        c.with_streamer(streamer)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_five_node_network_syncs_and_a_late_joiner_uses_several_peers() {
    init_tracing();
    let mut events = Events::new();
    let (p, manifest) = producer(&mut events, 3072, capped(4_000_000)).await;
    let p_state = state_id(&p.db);

    // Three nodes join and sync from the producer.
    let mut nodes = Vec::new();
    for i in 1..=3 {
        let (dir, db) = node_dir(0, 0, 0);
        let cfg = capped(4_000_000)(test_config(dir.path()));
        let n = start_node(i, dir.clone(), db, cfg, events.tx.clone()).await;
        n.dial(p.addr.clone());
        nodes.push(n);
    }
    let mut synced = HashMap::new();
    while synced.len() < 3 {
        let done = events.synced(None).await;
        assert_eq!(
            (done.slot, done.bank_hash),
            (manifest.slot, manifest.bank_hash)
        );
        synced.insert(done.index, ());
    }
    for n in &nodes {
        assert_eq!(
            state_id(&n.db),
            p_state,
            "node {} holds the producer's state",
            n.index
        );
        assert!(n.db.slot().unwrap() == Some(10));
    }

    // A late joiner connected to all of them fetches from several at once.
    let (dir, db) = node_dir(0, 0, 0);
    let late = start_node(
        9,
        dir.clone(),
        db,
        test_config(dir.path()),
        events.tx.clone(),
    )
    .await;
    for n in nodes.iter().chain([&p]) {
        late.dial(n.addr.clone());
    }
    let done = events.synced(Some(9)).await;
    assert_eq!(done.bank_hash, manifest.bank_hash);
    let per_peer = done.per_peer;
    let serving = per_peer.iter().filter(|(_, b)| *b > 0).count();
    println!("late joiner: bytes per peer {per_peer:?}");
    assert!(
        serving > 1,
        "only {serving} peer served chunks: {per_peer:?}"
    );
    assert_eq!(state_id(&late.db), p_state);

    // Synced nodes stop asking: no new discovery rounds from them for a few ticks.
    let quiet = tokio::time::timeout(
        Duration::from_secs(5),
        events.wait(LONG, "", |i, e| match e {
            Ev::Snap(Event::DiscoveryStarted { .. }) if (1..=3).contains(&i) || i == 9 => Some(i),
            _ => None,
        }),
    )
    .await;
    assert!(
        quiet.is_err(),
        "node {:?} kept asking after it synced",
        quiet.ok()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_busiest_peer_stopping_mid_sync_does_not_stop_it() {
    init_tracing();
    let mut events = Events::new();
    let (p, manifest) = producer(&mut events, 4096, capped(1_500_000)).await;
    // Two more holders of the same snapshot.
    let mut holders = vec![p];
    for i in 1..=2 {
        let (dir, db) = node_dir(0, 0, 0);
        let snap = {
            let store = snapsync::layers::snapshot::SnapshotStore::open(
                holders[0].dir.path().join("snapshots"),
            )
            .unwrap();
            store.latest().unwrap()
        };
        std::fs::create_dir_all(dir.path().join("snapshots")).unwrap();
        copy_snapshot(&snap, &dir.path().join("snapshots"));
        let cfg = capped(1_500_000)(serve_only(test_config(dir.path())));
        holders.push(start_node(i, dir.clone(), db, cfg, events.tx.clone()).await);
    }
    let (dir, db) = node_dir(0, 0, 0);
    let n = start_node(
        5,
        dir.clone(),
        db,
        test_config(dir.path()),
        events.tx.clone(),
    )
    .await;
    for h in &holders {
        n.dial(h.addr.clone());
    }
    // Once a third is in, stop whichever peer has served the most.
    let busiest = events
        .wait(LONG, "a third of the download", |i, e| match e {
            Ev::Snap(Event::DownloadProgress(p)) if i == 5 && p.done_bytes * 3 >= p.total_bytes => {
                p.peers
                    .iter()
                    .max_by_key(|pp| pp.bytes)
                    .map(|pp| pp.peer_id)
            }
            _ => None,
        })
        .await;
    let stopped = holders.iter().find(|h| h.peer_id == busiest).unwrap();
    stopped.stop();
    let done = events.synced(Some(5)).await;
    assert_eq!(done.bank_hash, manifest.bank_hash);
    let per_peer = done.per_peer;
    println!("stopped {busiest}; bytes per peer {per_peer:?}");
    assert_eq!(n.db.slot().unwrap(), Some(manifest.slot));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_snapshot_anywhere_is_reported_and_a_later_one_is_taken() {
    init_tracing();
    let mut events = Events::new();
    // A peer with state but no snapshot yet.
    let (pdir, pdb) = node_dir(256, 10, 7);
    let p = start_node(
        0,
        pdir.clone(),
        pdb,
        serve_only(test_config(pdir.path())),
        events.tx.clone(),
    )
    .await;
    let (dir, db) = node_dir(0, 0, 0);
    let n = start_node(
        1,
        dir.clone(),
        db,
        test_config(dir.path()),
        events.tx.clone(),
    )
    .await;
    n.dial(p.addr.clone());
    // Two rounds in a row find nothing: the node says so each time and keeps going.
    for _ in 0..2 {
        events
            .wait(LONG, "no snapshot available", |i, e| match e {
                Ev::Snap(Event::NoSnapshotAvailable { .. }) if i == 1 => Some(()),
                _ => None,
            })
            .await;
    }
    // The peer makes one: it announces it (someone is waiting) and the node takes it.
    p.run(|s| s.behaviour_mut().snapsync.create_snapshot_now());
    let done = events.synced(Some(1)).await;
    let (slot, hash) = (done.slot, done.bank_hash);
    assert_eq!(slot, 10);
    assert_eq!(state_id(&n.db), state_id(&p.db));
    assert_eq!(hash, state_id(&p.db).1);
    let stats = p.query(|s| s.behaviour().snapsync.stats()).await;
    assert!(stats.announcements_published >= 1, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_fails_clearly_and_accepts_no_data() {
    init_tracing();
    let mut events = Events::new();
    let metrics = snapsync::Metrics::new();
    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry);
    let m = metrics.clone();
    let (p, _) = producer(&mut events, 256, move |c| {
        c.with_token(Some(Token::new("right"))).with_metrics(m)
    })
    .await;
    let (dir, db) = node_dir(0, 0, 0);
    let n = start_node(
        1,
        dir.clone(),
        db,
        test_config(dir.path()).with_token(Some(Token::new("wrong"))),
        events.tx.clone(),
    )
    .await;
    n.dial(p.addr.clone());
    let error = events
        .wait(LONG, "the failure", |i, e| match e {
            Ev::Snap(Event::SyncFailed { error, .. }) if i == 1 => Some(error.to_string()),
            Ev::Snap(Event::SnapshotSynced { .. }) if i == 1 => panic!("synced with a wrong token"),
            _ => None,
        })
        .await;
    assert!(error.contains("SNAPSHOT_TOKEN"), "{error}");
    assert_eq!(n.db.slot().unwrap(), None, "nothing loaded");
    let served = p.query(|s| s.behaviour().snapsync.streamer_stats()).await;
    assert_eq!(served.bytes_served, 0);
    assert!(served.refused_unauthorized >= 1);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    // Series names end in their unit and label values are snake_case (Prometheus usage).
    assert!(
        text.contains("snapsync_refused_connections_total{reason=\"unauthorized\"}"),
        "{text}"
    );
    assert!(text.contains("snapsync_served_bytes_total 0"), "{text}");
    assert!(
        text.contains("snapsync_snapshots_created_total{kind=\"full\"} 1"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owners_gossipsub_keeps_delivering_while_snapsync_runs() {
    init_tracing();
    let mut events = Events::new();
    let (p, _) = producer(&mut events, 2048, capped(2_000_000)).await;
    let (dir, db) = node_dir(0, 0, 0);
    let n = start_node(
        1,
        dir.clone(),
        db,
        test_config(dir.path()),
        events.tx.clone(),
    )
    .await;
    n.dial(p.addr.clone());
    events
        .wait(LONG, "the download to start", |i, e| {
            matches!(e, Ev::Snap(Event::DownloadStarted { .. }) if i == 1).then_some(())
        })
        .await;
    // Chat both ways during the download (the chat mesh needs a heartbeat or two).
    let mut got = HashMap::new();
    let started = Instant::now();
    let mut synced = false;
    while got.len() < 2 || !synced {
        assert!(started.elapsed() < LONG, "chat {got:?} synced {synced}");
        p.chat("hello from the producer");
        n.chat("hello from the new node");
        let deadline = Instant::now() + Duration::from_millis(300);
        while let Ok(Some((i, ev))) = tokio::time::timeout(
            deadline.saturating_duration_since(Instant::now()),
            events.rx.recv(),
        )
        .await
        {
            match ev {
                Ev::Chat { text, from } => {
                    assert!(text.starts_with("hello"), "{text}");
                    got.insert(i, from);
                }
                Ev::Snap(Event::SnapshotSynced { .. }) if i == 1 => synced = true,
                Ev::Snap(Event::PeerMisbehaved { peer, reason }) => panic!("{peer}: {reason}"),
                _ => {}
            }
        }
    }
    assert_eq!(got[&0], n.peer_id);
    assert_eq!(got[&1], p.peer_id);
    // Neither instance saw the other's messages: snapsync dropped no bad message.
    let stats = n.query(|s| s.behaviour().snapsync.stats()).await;
    assert_eq!(stats.malformed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_peer_on_the_topic_triggers_a_request_without_waiting_for_the_tick() {
    init_tracing();
    let mut events = Events::new();
    let (p, _) = producer(&mut events, 256, |c| c).await;
    let (dir, db) = node_dir(0, 0, 0);
    // A tick far away: only the subscription of a new snapsync peer can start the round.
    let cfg = tune(test_config(dir.path()), |d| {
        d.with_discovery_interval(Duration::from_secs(600))
    });
    let n = start_node(1, dir.clone(), db, cfg, events.tx.clone()).await;
    // Let the first (immediate) tick pass with nobody to ask.
    events
        .wait(LONG, "the first round", |i, e| {
            matches!(e, Ev::Snap(Event::NoSnapshotAvailable { .. }) if i == 1).then_some(())
        })
        .await;
    let connected_at = Instant::now();
    n.dial(p.addr.clone());
    events
        .wait(Duration::from_secs(60), "the download to start", |i, e| {
            matches!(e, Ev::Snap(Event::DownloadStarted { .. }) if i == 1).then_some(())
        })
        .await;
    let latency = connected_at.elapsed();
    println!(
        "download under way {:.0} ms after the first snapsync peer connected",
        latency.as_secs_f64() * 1000.0
    );
    // Far inside the 600 s tick: it was the new peer that triggered it.
    assert!(latency < Duration::from_secs(60));
}

/// A holder of a copy of `snap`, serving it and not syncing itself.
async fn holder(
    index: usize,
    snap: &snapsync::layers::snapshot::Snapshot,
    events: &Events,
    config: impl FnOnce(snapsync::Config) -> snapsync::Config,
) -> TestNode {
    let (dir, db) = node_dir(0, 0, 0);
    std::fs::create_dir_all(dir.path().join("snapshots")).unwrap();
    copy_snapshot(snap, &dir.path().join("snapshots"));
    let cfg = config(serve_only(test_config(dir.path())));
    start_node(index, dir.clone(), db, cfg, events.tx.clone()).await
}

fn latest(node: &TestNode) -> std::sync::Arc<snapsync::layers::snapshot::Snapshot> {
    snapsync::layers::snapshot::SnapshotStore::open(node.dir.path().join("snapshots"))
        .unwrap()
        .latest()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_snapshots_are_not_chosen_and_a_lying_archive_is_caught() {
    init_tracing();
    let mut events = Events::new();
    let (p, manifest) = producer(&mut events, 1024, |c| c).await;
    let honest = latest(&p);
    let h2 = holder(1, &honest, &events, |c| c).await;
    // A forger with another state at the same slot, and one with a lone, newer claim.
    let (fdir, fdb) = node_dir(1024, 10, 999);
    let forger = start_node(
        2,
        fdir.clone(),
        fdb,
        serve_only(test_config(fdir.path())),
        events.tx.clone(),
    )
    .await;
    forger.run(|s| s.behaviour_mut().snapsync.create_snapshot_now());
    let (gdir, gdb) = node_dir(512, 30, 998);
    let newer = start_node(
        3,
        gdir.clone(),
        gdb,
        serve_only(test_config(gdir.path())),
        events.tx.clone(),
    )
    .await;
    newer.run(|s| s.behaviour_mut().snapsync.create_snapshot_now());
    for _ in 0..2 {
        events
            .wait(LONG, "the forgers' snapshots", |i, e| {
                matches!(e, Ev::Snap(Event::SnapshotCreated { .. }) if i == 2 || i == 3)
                    .then_some(())
            })
            .await;
    }
    // A node that wants two peers to agree.
    let (dir, db) = node_dir(0, 0, 0);
    let n = start_node(
        4,
        dir.clone(),
        db,
        test_config(dir.path()).with_min_agreeing_peers(2),
        events.tx.clone(),
    )
    .await;
    for other in [&p, &h2, &forger, &newer] {
        n.dial(other.addr.clone());
    }
    let mut conflict = None;
    let hash = events
        .wait(LONG, "the sync", |i, e| match e {
            Ev::Snap(Event::ConflictingSnapshots(c)) if i == 4 => {
                conflict = Some(c.clone());
                None
            }
            Ev::Snap(Event::SnapshotSynced { bank_hash, .. }) if i == 4 => Some(*bank_hash),
            Ev::Snap(Event::SyncFailed { error, .. }) if i == 4 => panic!("{error}"),
            _ => None,
        })
        .await;
    assert_eq!(hash, manifest.bank_hash, "the honest majority's snapshot");
    assert_eq!(n.db.slot().unwrap(), Some(10), "not the lone newer claim");
    let conflict = conflict.expect("the forged hash was reported");
    assert_eq!(conflict.slot, 10);
    assert_eq!(conflict.variants.len(), 2);
    assert_eq!(conflict.variants[0].2.len(), 2, "honest variant first");
    assert_eq!(conflict.variants[1].2, vec![forger.peer_id]);

    // A liar advertises the honest snapshot but serves corrupt bytes. On a network of their
    // own, so that the node fetches from exactly the liar and one honest (slower) peer, in
    // small pieces so that both serve some.
    let liars = |c: snapsync::Config| c.with_network("liars");
    let honest_peer = holder(5, &honest, &events, |c| capped(1_000_000)(liars(c))).await;
    let liar = holder(7, &honest, &events, liars).await;
    let liar_snap = latest(&liar);
    let mut bytes = std::fs::read(liar_snap.archive_path()).unwrap();
    for pos in (500..bytes.len()).step_by(10_000) {
        bytes[pos] ^= 0x55;
    }
    std::fs::write(liar_snap.archive_path(), &bytes).unwrap();
    let (dir, db) = node_dir(0, 0, 0);
    let base = liars(test_config(dir.path()));
    let download = base.download().with_request_chunks(4);
    let cfg = base.with_download(download);
    let m = start_node(6, dir.clone(), db, cfg, events.tx.clone()).await;
    m.dial(liar.addr.clone());
    m.dial(honest_peer.addr.clone());
    let mut banned = false;
    let hash = events
        .wait(LONG, "the sync past the liar", |i, e| match e {
            Ev::Snap(Event::DownloadProgress(pr)) if i == 6 => {
                banned |= pr.peers.iter().any(|pp| {
                    pp.peer_id == liar.peer_id
                        && pp.status == snapsync::layers::transfer::PeerStatus::Banned
                });
                None
            }
            Ev::Snap(Event::SnapshotSynced { bank_hash, .. }) if i == 6 => Some(*bank_hash),
            Ev::Snap(Event::SyncFailed { error, .. }) if i == 6 => panic!("{error}"),
            _ => None,
        })
        .await;
    assert_eq!(hash, manifest.bank_hash);
    assert!(banned, "the liar was not banned");
    assert_eq!(state_id(&m.db), state_id(&p.db));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_lying_messages_are_dropped_and_counted() {
    use futures::StreamExt;
    use libp2p::gossipsub;
    use libp2p::swarm::SwarmEvent;
    use libp2p_swarm_test::SwarmExt;
    use prost::Message;
    use snapsync::proto;

    init_tracing();
    let mut events = Events::new();
    let (dir, db) = node_dir(0, 0, 0);
    let n = start_node(
        1,
        dir.clone(),
        db,
        tune(test_config(dir.path()), |d| d.with_max_strikes(5)),
        events.tx.clone(),
    )
    .await;
    // A raw peer speaking snapsync's gossipsub, sending junk.
    let mut raw = libp2p::Swarm::new_ephemeral_tokio(|kp| {
        let config = gossipsub::ConfigBuilder::default()
            .protocol_id_prefix("/snapsync/meshsub")
            .heartbeat_interval(Duration::from_millis(100))
            .build()
            .unwrap();
        gossipsub::Behaviour::<gossipsub::IdentityTransform, gossipsub::AllowAllSubscriptionFilter>::new(
            gossipsub::MessageAuthenticity::Signed(kp),
            config,
        )
        .unwrap()
    });
    let topic = gossipsub::IdentTopic::new("snapsync/default/discovery/2");
    raw.behaviour_mut().subscribe(&topic).unwrap();
    raw.dial(n.addr.clone()).unwrap();
    let raw_id = *raw.local_peer_id();
    loop {
        if let SwarmEvent::Behaviour(gossipsub::Event::Subscribed { .. }) =
            raw.select_next_some().await
        {
            break;
        }
    }
    let advert = |f: &dyn Fn(&mut proto::SnapshotInfoResponse)| {
        let mut a = proto::SnapshotInfoResponse {
            r#type: "snapshot_info_response".into(),
            has_snapshot: true,
            peer_id: raw_id.to_string(),
            file_size: 1000,
            modified_time: 1,
            streamer_addrs: vec!["127.0.0.1:9".into()],
            request_nonce: 0,
            snapshots: vec![proto::SnapshotDescriptor {
                kind: proto::Kind::Full as i32,
                slot: 5,
                bank_hash: vec![1; 32].into(),
                content_root: vec![2; 32].into(),
                archive_size: 1000,
                chunk_size: 16384,
                ..Default::default()
            }],
            holder_slot: Some(5),
            partial: Vec::new(),
        };
        f(&mut a);
        proto::DiscoveryMessage {
            body: Some(proto::discovery_message::Body::Announcement(a)),
        }
        .encode_to_vec()
    };
    let junk: Vec<Vec<u8>> = vec![
        b"\xff\xfe garbage".to_vec(),
        advert(&|a| a.snapshots[0].chunk_size = 3),
        advert(&|a| a.peer_id = libp2p::PeerId::random().to_string()),
        advert(&|a| a.streamer_addrs = vec!["not an address".into()]),
        proto::DiscoveryMessage { body: None }.encode_to_vec(),
        b"more garbage after the limit".to_vec(),
    ];
    for j in junk {
        raw.behaviour_mut().publish(topic.clone(), j).unwrap();
    }
    let raw_task = tokio::spawn(async move {
        loop {
            raw.select_next_some().await;
        }
    });
    let (peer, reason) = events
        .wait(LONG, "the peer to be flagged", |i, e| match e {
            Ev::Snap(Event::PeerMisbehaved { peer, reason }) if i == 1 => {
                Some((*peer, reason.clone()))
            }
            _ => None,
        })
        .await;
    assert_eq!(peer, raw_id);
    println!("flagged: {reason}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stats = n.query(|s| s.behaviour().snapsync.stats()).await;
    assert_eq!(
        stats.malformed, 5,
        "the sixth message was ignored, not counted: {stats:?}"
    );
    assert_eq!(stats.announcements_received, 0);
    // The node is fine and still working.
    let status = n.query(|s| s.behaviour().snapsync.status()).await;
    assert!(status.adverts.is_empty());
    raw_task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_discovery_round_costs_messages_linear_in_the_nodes() {
    init_tracing();
    const HOLDERS: usize = 20;
    let mut events = Events::new();
    let (p, manifest) = producer(&mut events, 128, |c| c).await;
    let snap = latest(&p);
    p.stop();
    let mut holders = Vec::new();
    for i in 0..HOLDERS {
        holders.push(holder(10 + i, &snap, &events, |c| c).await);
    }
    // A sparse topology: a ring, plus a chord from each node.
    for i in 0..HOLDERS {
        holders[i].dial(holders[(i + 1) % HOLDERS].addr.clone());
        holders[i].dial(holders[(i + 7) % HOLDERS].addr.clone());
    }
    tokio::time::sleep(Duration::from_secs(2)).await; // meshes form
    // The requester reaches two holders directly; the rest answer by dialing it.
    let (dir, db) = node_dir(0, 0, 0);
    let cfg = tune(test_config(dir.path()), |d| {
        d.with_min_request_interval(Duration::from_secs(30))
            .with_answer_window(Duration::from_secs(2))
    });
    let r = start_node(1, dir.clone(), db, cfg, events.tx.clone()).await;
    r.dial(holders[0].addr.clone());
    r.dial(holders[10].addr.clone());
    assert_eq!(events.synced(Some(1)).await.bank_hash, manifest.bank_hash);
    let mine = r.query(|s| s.behaviour().snapsync.stats()).await;
    let mut received = 0;
    let mut answered = 0;
    for h in &holders {
        let st = h.query(|s| s.behaviour().snapsync.stats()).await;
        received += st.requests_received;
        answered += st.answers_sent;
    }
    let nodes = HOLDERS as u64 + 1;
    let total = mine.requests_published + received + answered + mine.announcements_published;
    println!(
        "{nodes} nodes: 1 request published, delivered to {received} nodes, {answered} answers \
         ({} received): {total} messages in the round; answers published on the topic would \
         have made {}",
        mine.answers_received,
        received + answered * (nodes - 1)
    );
    assert_eq!(mine.requests_published, 1);
    assert_eq!(
        received, HOLDERS as u64,
        "every holder got the request once"
    );
    assert_eq!(answered, HOLDERS as u64, "every holder answered once");
    assert_eq!(
        mine.answers_received, HOLDERS as u64,
        "answers reached the requester"
    );
    assert!(total <= 3 * nodes, "{total} messages for {nodes} nodes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_that_falls_behind_syncs_again_and_keeps_only_the_newest() {
    init_tracing();
    let mut events = Events::new();
    let (p, first) = producer(&mut events, 256, |c| c).await;
    let (dir, db) = node_dir(0, 0, 0);
    // No second tick during the test: after the first sync, only announcements can tell the
    // follower (it does not execute the chain) that it fell behind.
    let cfg = tune(test_config(dir.path()), |d| {
        d.with_executes(false)
            .with_behind_threshold(5)
            .with_discovery_interval(Duration::from_secs(3600))
    });
    let f = start_node(1, dir.clone(), db, cfg, events.tx.clone()).await;
    f.dial(p.addr.clone());
    let mut slots = vec![events.synced(Some(1)).await.slot];
    assert_eq!(slots[0], first.slot);
    // The producer moves on; each new snapshot is announced and taken.
    for round in 1..=3u64 {
        let target = first.slot + 10 * round;
        let db = p.db.clone();
        p.run(move |s| {
            for slot in target - 9..=target {
                db.commit_slot(slot, |w| w.put(format!("k{slot}").as_bytes(), b"v"))
                    .unwrap();
                s.behaviour_mut().snapsync.on_slot(slot);
            }
        });
        let done = events.synced(Some(1)).await;
        assert_eq!(done.slot, target);
        slots.push(done.slot);
    }
    assert_eq!(slots, vec![10, 20, 30, 40]);
    assert_eq!(state_id(&f.db), state_id(&p.db));
    // Retention (2 by default) applies to synced snapshots too.
    let kept: Vec<u64> =
        snapsync::layers::snapshot::SnapshotStore::open(f.dir.path().join("snapshots"))
            .unwrap()
            .list()
            .iter()
            .map(|s| s.manifest().slot)
            .collect();
    assert_eq!(kept, vec![30, 40]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_stopped_mid_download_closes_its_streams_and_resumes_after_restart() {
    init_tracing();
    let mut events = Events::new();
    let (p, manifest) = producer(&mut events, 3072, capped(600_000)).await;
    let (dir, db) = node_dir(0, 0, 0);
    let n = start_node(
        1,
        dir.clone(),
        db.clone(),
        test_config(dir.path()),
        events.tx.clone(),
    )
    .await;
    n.dial(p.addr.clone());
    // Stop the node once part of the snapshot is durable (persisted every second).
    events
        .wait(LONG, "part of the download", |i, e| match e {
            Ev::Snap(Event::DownloadProgress(pr))
                if i == 1 && pr.done_bytes * 2 >= pr.total_bytes =>
            {
                Some(())
            }
            _ => None,
        })
        .await;
    assert!(
        p.query(|s| s.behaviour().snapsync.streamer_stats().connections_open)
            .await
            >= 1
    );
    n.stop();
    drop(n);
    // The download is cancelled with its node: its connection closes at once, not after the
    // streamer's idle timeout.
    let stopped = Instant::now();
    loop {
        let open = p
            .query(|s| s.behaviour().snapsync.streamer_stats().connections_open)
            .await;
        if open == 0 {
            break;
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(5),
            "{open} connections still open after the downloader stopped"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("connection closed {:?} after the stop", stopped.elapsed());
    // Nothing was loaded: the live DB is as it was.
    assert_eq!(db.slot().unwrap(), None);

    // Restarted on the same directory, it resumes and fetches only the rest.
    let n = start_node(
        2,
        dir.clone(),
        db.clone(),
        test_config(dir.path()),
        events.tx.clone(),
    )
    .await;
    n.dial(p.addr.clone());
    let done = events.synced(Some(2)).await;
    assert_eq!(done.bank_hash, manifest.bank_hash);
    let fetched: u64 = done.per_peer.iter().map(|(_, b)| b).sum();
    println!(
        "fetched {fetched} of {} after the restart",
        manifest.archive_size
    );
    assert!(
        fetched < manifest.archive_size,
        "fetched {fetched} of {} again",
        manifest.archive_size
    );
    assert_eq!(state_id(&db), state_id(&p.db));
}
