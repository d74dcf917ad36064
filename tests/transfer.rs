//! The QUIC chunk stream over real sockets on 127.0.0.1: streamer and multi-peer downloader.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::relay::{Impairment, Relay};
use common::wire::*;
use common::*;
use snapsync::Metrics;
use snapsync::layers::transfer::{
    DownloadError, DownloadTarget, Downloader, EndpointError, PeerAddr, PeerStatus, Streamer,
    StreamerConfig, StreamerError, Token, TransportTuning,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_peer() {
    init_tracing();
    let (server, snap) = Node::with_snapshot(2048, 50, 1);
    let streamer = serve(&server, StreamerConfig::default());
    let client = Node::new();
    let got = fetch_from(&client, fast(), snap.manifest(), &server, &streamer)
        .await
        .unwrap();
    assert_exact(&got, &snap, &client);
    assert_eq!(got.fetched_bytes, snap.manifest().archive_size);
    assert_eq!(got.resumed_bytes, 0);
    let stats = streamer.stats();
    assert_eq!(stats.bytes_served, snap.manifest().archive_size);
    assert!(stats.chunks_served >= snap.manifest().chunk_tree().chunk_count());
    // The published snapshot is found again after a restart of the store.
    let store = snapsync::layers::snapshot::SnapshotStore::open(client.store.dir()).unwrap();
    assert_eq!(store.latest().unwrap().manifest(), snap.manifest());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_attestations_kept_with_a_snapshot_are_served_with_its_manifest() {
    init_tracing();
    let (server, snap) = Node::with_snapshot(256, 50, 7);
    let key = snap.manifest().key();
    let bare = Node::holding(&snap);
    let mut signed: Vec<snapsync::layers::snapshot::Attestation> = (0..2)
        .map(|_| {
            let k = libp2p::identity::Keypair::generate_ed25519();
            snapsync::layers::snapshot::Attestation::sign(&k, "net", &key).unwrap()
        })
        .collect();
    server
        .store
        .attest(&key.content_root, "net", &signed)
        .unwrap();
    let streamer = serve(&server, StreamerConfig::default());
    let client = Node::new();
    let got = fetch_from(&client, fast(), snap.manifest(), &server, &streamer)
        .await
        .unwrap();
    assert_exact(&got, &snap, &client);
    signed.sort();
    assert_eq!(got.attestations, vec![signed]);
    // A holder that keeps none serves none.
    let streamer = serve(&bare, StreamerConfig::default());
    let again = Node::new();
    let got = fetch_from(&again, fast(), snap.manifest(), &bare, &streamer)
        .await
        .unwrap();
    assert!(got.attestations.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_capped_peers_all_serve() {
    init_tracing();
    let (a, snap) = Node::with_snapshot(4096, 50, 2);
    let (b, c) = (Node::holding(&snap), Node::holding(&snap));
    let cap = Some(1_500_000);
    let streamers: Vec<Streamer> = [&a, &b, &c]
        .iter()
        .map(|n| serve(n, StreamerConfig::default().with_rate_limit(cap)))
        .collect();
    let peers = vec![
        peer(&a, &streamers[0]),
        peer(&b, &streamers[1]),
        peer(&c, &streamers[2]),
    ];
    let client = Node::new();
    let started = Instant::now();
    let handle =
        downloader(&client, fast()).start(DownloadTarget::from_manifest(snap.manifest()), peers);
    let progress = handle.progress();
    let got = handle.wait().await.unwrap();
    let secs = started.elapsed().as_secs_f64();
    assert_exact(&got, &snap, &client);
    for (peer, bytes) in &got.per_peer {
        assert!(*bytes > 0, "peer {peer} served nothing: {:?}", got.per_peer);
    }
    for s in &streamers {
        assert!(s.stats().bytes_served > 0);
    }
    // Three peers at 1.5 MB/s each: clearly faster than one could be.
    let size = snap.manifest().archive_size as f64;
    assert!(secs < size / 1_500_000.0, "{secs} s for {size} bytes");
    let last = progress.borrow().clone();
    assert!(last.finished);
    assert_eq!(last.done_bytes, snap.manifest().archive_size);
    assert_eq!(last.peers.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_killed_mid_transfer() {
    init_tracing();
    let (a, snap) = Node::with_snapshot(4096, 50, 3);
    let (b, c) = (Node::holding(&snap), Node::holding(&snap));
    let cap = Some(1_000_000);
    let sa = serve(&a, StreamerConfig::default().with_rate_limit(cap));
    let sb = serve(&b, StreamerConfig::default().with_rate_limit(cap));
    let sc = serve(&c, StreamerConfig::default().with_rate_limit(cap));
    let peers = vec![peer(&a, &sa), peer(&b, &sb), peer(&c, &sc)];
    let client = Node::new();
    let handle =
        downloader(&client, fast()).start(DownloadTarget::from_manifest(snap.manifest()), peers);
    let mut progress = handle.progress();
    let total = snap.manifest().archive_size;
    // A quarter done, and B has served something (its figures count whole responses).
    while progress.borrow().done_bytes < total / 4 || sb.stats().bytes_served == 0 {
        let _ = tokio::time::timeout(Duration::from_millis(50), progress.changed()).await;
    }
    let served_before = sb.stats().bytes_served;
    assert!(served_before > 0);
    drop(sb); // peer B dies
    let got = handle.wait().await.unwrap();
    assert_exact(&got, &snap, &client);
    let b_bytes = got
        .per_peer
        .iter()
        .find(|(p, _)| *p == b.peer_id())
        .unwrap()
        .1;
    assert!(b_bytes <= served_before, "B served after it died");
    assert!(b_bytes < total / 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_serving_corrupt_chunks_is_caught_and_banned() {
    init_tracing();
    let (a, snap) = Node::with_snapshot(3072, 50, 4);
    let bad = Node::holding(&snap);
    // Corrupt bad's archive in several places; its manifest and outboard stay honest-looking.
    let bad_snap = bad.store.latest().unwrap();
    let mut bytes = std::fs::read(bad_snap.archive_path()).unwrap();
    for pos in (1000..bytes.len()).step_by(200_000) {
        bytes[pos] ^= 0xFF;
    }
    std::fs::write(bad_snap.archive_path(), &bytes).unwrap();
    let sa = serve(
        &a,
        StreamerConfig::default().with_rate_limit(Some(2_000_000)),
    );
    let sbad = serve(&bad, StreamerConfig::default());
    let client = Node::new();
    let handle = downloader(&client, fast()).start(
        DownloadTarget::from_manifest(snap.manifest()),
        vec![peer(&bad, &sbad), peer(&a, &sa)],
    );
    let progress = handle.progress();
    let got = handle.wait().await.unwrap();
    assert_exact(&got, &snap, &client);
    let report = progress.borrow().clone();
    let bad_report = report
        .peers
        .iter()
        .find(|p| p.peer_id == bad.peer_id())
        .unwrap();
    assert_eq!(bad_report.status, PeerStatus::Banned);
    assert!(
        sbad.stats().requests_served >= 1,
        "the bad peer did send data"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_or_missing_token_is_refused_with_no_data_sent() {
    init_tracing();
    let (server, snap) = Node::with_snapshot(256, 50, 5);
    let streamer = serve_token(
        &server,
        StreamerConfig::default(),
        Some(Token::new("correct horse")),
    );
    let target = DownloadTarget::from_manifest(snap.manifest());
    for token in [Some(Token::new("battery staple")), None] {
        let client = Node::new();
        let err = downloader_token(&client, fast(), token)
            .download(target, vec![peer(&server, &streamer)])
            .await
            .unwrap_err();
        assert!(err.is_unauthorized(), "{err}");
        assert!(err.to_string().contains("SNAPSHOT_TOKEN"), "{err}");
        assert!(client.store.latest().is_none());
    }
    let stats = streamer.stats();
    assert_eq!(stats.refused_unauthorized, 2);
    assert_eq!(stats.connections_accepted, 0);
    assert_eq!(stats.requests_served, 0);
    assert_eq!(stats.bytes_served, 0);
    // The right token works.
    let client = Node::new();
    let got = downloader_token(&client, fast(), Some(Token::new("correct horse")))
        .download(target, vec![peer(&server, &streamer)])
        .await
        .unwrap();
    assert_exact(&got, &snap, &client);
    assert_eq!(format!("{:?}", Token::new("secret")), "Token(<redacted>)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_snapshot_fails_with_a_typed_error() {
    init_tracing();
    let (server, snap) = Node::with_snapshot(128, 50, 6);
    let streamer = serve(&server, StreamerConfig::default());
    let mut target = DownloadTarget::from_manifest(snap.manifest());
    target.content_root.0[0] ^= 1;
    let client = Node::new();
    let err = downloader(&client, fast())
        .download(target, vec![peer(&server, &streamer)])
        .await
        .unwrap_err();
    match &err {
        DownloadError::NoPeers { reasons, .. } => {
            assert!(reasons.contains("UNKNOWN_SNAPSHOT"), "{reasons}")
        }
        other => panic!("unexpected {other}"),
    }
    // A peer advertising the right root but another bank hash is not used either.
    let mut lying = DownloadTarget::from_manifest(snap.manifest());
    lying.bank_hash.as_mut().unwrap().0[0] ^= 1;
    let err = downloader(&client, fast())
        .download(lying, vec![peer(&server, &streamer)])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("bank hash"), "{err}");
}

/// A QUIC server with a libp2p identity that accepts connections and streams and never
/// answers.
async fn stalled_server() -> (libp2p::PeerId, SocketAddr, tokio::task::JoinHandle<()>) {
    let (peer_id, addr, endpoint) = common::wire::hostile_endpoint();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some(incoming) = endpoint.accept().await {
            if let Ok(conn) = incoming.await {
                let conn2 = conn.clone();
                held.push(conn);
                tokio::spawn(async move {
                    let mut streams = Vec::new();
                    while let Ok(s) = conn2.accept_bi().await {
                        streams.push(s); // read nothing, answer nothing
                    }
                });
            }
        }
    });
    (peer_id, addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_peer_does_not_stop_the_download_and_alone_fails_in_time() {
    init_tracing();
    let (server, snap) = Node::with_snapshot(1024, 50, 7);
    let streamer = serve(&server, StreamerConfig::default());
    let (stalled_id, stalled_addr, _task) = stalled_server().await;
    let stalled = PeerAddr {
        peer_id: stalled_id,
        addr: stalled_addr,
    };
    let target = DownloadTarget::from_manifest(snap.manifest());
    let config = fast()
        .with_connect_timeout(Duration::from_millis(500))
        .with_max_peer_failures(3);
    // With an honest peer beside it: completes.
    let client = Node::new();
    let got = downloader(&client, config)
        .download(target, vec![stalled, peer(&server, &streamer)])
        .await
        .unwrap();
    assert_exact(&got, &snap, &client);
    // Alone: fails, typed, without hanging (it is tried again meanwhile, as an unreachable
    // source may come back, until nothing came for the no-progress limit).
    let client = Node::new();
    let started = Instant::now();
    let config = config.with_no_progress_timeout(Duration::from_secs(5));
    let err = downloader(&client, config)
        .download(target, vec![stalled])
        .await
        .unwrap_err();
    assert!(matches!(err, DownloadError::NoPeers { .. }), "{err}");
    assert!(err.to_string().contains("timed out"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(15));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_lossy_slow_network() {
    init_tracing();
    let (server, snap) = Node::with_snapshot(1024, 50, 8);
    let streamer = serve(&server, StreamerConfig::default());
    // 5% loss and 20 ms each way, with some reordering (2 ms jitter), duplication and a
    // rate limit with a bounded queue on top.
    let relay = Relay::start(
        streamer.local_addr(),
        Impairment {
            loss: 0.05,
            delay: Duration::from_millis(20),
            jitter: Duration::from_millis(2),
            duplicate: 0.01,
            rate: Some(8_000_000),
            ..Impairment::default()
        },
        42,
    )
    .await;
    let client = Node::new();
    let got = downloader(&client, fast())
        .download(
            DownloadTarget::from_manifest(snap.manifest()),
            vec![PeerAddr {
                peer_id: server.peer_id(),
                addr: relay.addr,
            }],
        )
        .await
        .unwrap();
    assert_exact(&got, &snap, &client);
    let dropped = relay
        .stats
        .dropped
        .load(std::sync::atomic::Ordering::Relaxed);
    let duplicated = relay
        .stats
        .duplicated
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(dropped > 10, "the relay dropped only {dropped} datagrams");
    assert!(duplicated > 0, "the relay duplicated nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_dropped_mid_download_is_reopened_and_the_download_completes() {
    init_tracing();
    let (server, snap) = Node::with_snapshot(2048, 50, 12);
    let streamer = serve(
        &server,
        StreamerConfig::default().with_rate_limit(Some(1_000_000)),
    );
    let relay = Relay::start(streamer.local_addr(), Impairment::default(), 7).await;
    let client = Node::new();
    // The connection is declared dead after a second of silence.
    let config = fast().with_max_peer_failures(50).with_transport(
        TransportTuning::default()
            .with_idle_timeout(Duration::from_secs(1))
            .with_keep_alive(Duration::from_millis(250)),
    );
    let handle = downloader(&client, config).start(
        DownloadTarget::from_manifest(snap.manifest()),
        vec![PeerAddr {
            peer_id: server.peer_id(),
            addr: relay.addr,
        }],
    );
    let mut progress = handle.progress();
    let total = snap.manifest().archive_size;
    while progress.borrow().done_bytes < total / 3 {
        progress.changed().await.unwrap();
    }
    // The link goes down for longer than the idle timeout: the connection dies.
    relay.cut(true);
    let at_cut = progress.borrow().done_bytes;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        progress.borrow().done_bytes < total,
        "finished during the cut"
    );
    relay.cut(false);
    let got = handle.wait().await.unwrap();
    assert_exact(&got, &snap, &client);
    let accepted = streamer.stats().connections_accepted;
    println!("done at the cut {at_cut} of {total}; connections accepted {accepted}");
    assert!(
        accepted >= 2,
        "the connection was not re-opened ({accepted})"
    );
    assert_eq!(
        got.fetched_bytes, total,
        "nothing fetched twice counts twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_in_use_is_a_typed_error_naming_the_address() {
    let node = Node::new();
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let err = Streamer::bind(
        &node.keypair,
        node.store.clone(),
        StreamerConfig::default().with_listen(addr),
        None,
        Metrics::new(),
    )
    .unwrap_err();
    match &err {
        StreamerError::Endpoint(EndpointError::AddrInUse { addr: a }) => assert_eq!(*a, addr),
        other => panic!("unexpected {other:?}"),
    }
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
    assert!(err.to_string().contains("already in use"), "{err}");
}

/// Run as a child process by `a_killed_downloader_resumes_where_it_was`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "child process of a_killed_downloader_resumes_where_it_was"]
async fn child_download() {
    let var = |k: &str| std::env::var(k).expect("run by the parent test");
    let store =
        snapsync::layers::snapshot::SnapshotStore::open(var("SNAPSYNC_CHILD_STORE")).unwrap();
    let keypair = libp2p::identity::Keypair::generate_ed25519();
    let target = DownloadTarget::new(
        var("SNAPSYNC_CHILD_ROOT").parse().unwrap(),
        var("SNAPSYNC_CHILD_SIZE").parse().unwrap(),
        snapsync::layers::chunk::ChunkSize::DEFAULT,
    );
    let peer = PeerAddr {
        peer_id: var("SNAPSYNC_CHILD_PEER").parse().unwrap(),
        addr: var("SNAPSYNC_CHILD_ADDR").parse().unwrap(),
    };
    let d = Downloader::new(
        keypair,
        store,
        fast().with_persist_interval(Duration::from_millis(200)),
        None,
        Metrics::new(),
    )
    .unwrap();
    d.download(target, vec![peer]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_downloader_resumes_where_it_was() {
    init_tracing();
    let (server, snap) = Node::with_snapshot(4096, 50, 9);
    let streamer = serve(
        &server,
        StreamerConfig::default().with_rate_limit(Some(2_000_000)),
    );
    // The child has the client's store to itself (a store is one process's): the client opens
    // it once the child is gone.
    let client_dir = tempfile::tempdir().unwrap();
    let client_store = client_dir.path().join("snapshots");
    let m = snap.manifest();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["child_download", "--exact", "--ignored", "--nocapture"])
        .env("SNAPSYNC_CHILD_STORE", &client_store)
        .env("SNAPSYNC_CHILD_ROOT", m.content_root.to_hex())
        .env("SNAPSYNC_CHILD_SIZE", m.archive_size.to_string())
        .env("SNAPSYNC_CHILD_PEER", server.peer_id().to_string())
        .env("SNAPSYNC_CHILD_ADDR", streamer.local_addr().to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once about half has been served.
    let deadline = Instant::now() + Duration::from_secs(30);
    while streamer.stats().bytes_served < m.archive_size / 2 {
        assert!(Instant::now() < deadline, "child made no progress");
        assert!(child.try_wait().unwrap().is_none(), "child ended early");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let served_to_child = streamer.stats().bytes_served;
    assert!(
        served_to_child < m.archive_size,
        "child finished before it was killed"
    );

    // Restart: only what was not yet durable is fetched again.
    let client = Node {
        db: snapsync::db::LmdbState::open(client_dir.path().join("state")).unwrap(),
        store: snapsync::layers::snapshot::SnapshotStore::open(&client_store).unwrap(),
        keypair: libp2p::identity::Keypair::generate_ed25519(),
        dir: client_dir,
    };
    let got = fetch_from(&client, fast(), m, &server, &streamer)
        .await
        .unwrap();
    assert_exact(&got, &snap, &client);
    assert!(got.resumed_bytes > 0, "nothing resumed");
    assert_eq!(got.resumed_bytes + got.fetched_bytes, m.archive_size);
    // The streamer counts a response once it is whole, and the downloader keeps every verified
    // chunk of a response cut short, so more may be resumed than was counted as served: what
    // matters is how much of the counted part was lost.
    let lost = served_to_child.saturating_sub(got.resumed_bytes);
    println!(
        "served before the kill {served_to_child}, resumed {}, fetched after {}, lost {lost}",
        got.resumed_bytes, got.fetched_bytes
    );
    // At most what one persist interval plus the requests in flight hold (2 MB/s x 0.2 s +
    // 16 MiB of windows, far less in practice at this rate).
    assert!(
        lost < m.archive_size / 4,
        "lost {lost} of {} served",
        served_to_child
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_found_complete_on_disk_only_fetches_the_manifest() {
    init_tracing();
    let (server, snap) = Node::with_snapshot(512, 50, 11);
    let streamer = serve(&server, StreamerConfig::default());
    let client = Node::new();
    let m = snap.manifest();
    // What a crash right after the last chunk, before publishing, leaves: every chunk and
    // proof node on disk and a progress file marking them all (docs/FORMAT.md, section 8).
    let partial = client
        .store
        .dir()
        .join(format!(".partial-{}", m.content_root.to_hex()));
    std::fs::create_dir_all(&partial).unwrap();
    std::fs::copy(snap.archive_path(), partial.join("archive.part")).unwrap();
    std::fs::copy(snap.outboard_path(), partial.join("outboard.bao")).unwrap();
    let count = m.chunk_tree().chunk_count();
    let mut progress = b"SNAPPROG".to_vec();
    progress.extend_from_slice(&1u32.to_le_bytes());
    progress.extend_from_slice(m.content_root.as_bytes());
    progress.extend_from_slice(&m.archive_size.to_le_bytes());
    progress.extend_from_slice(&m.chunk_size.bytes().to_le_bytes());
    progress.extend_from_slice(&count.to_le_bytes());
    progress.extend(std::iter::repeat_n(0xffu8, count.div_ceil(8) as usize));
    std::fs::write(partial.join("progress"), &progress).unwrap();

    let got = fetch_from(&client, fast(), m, &server, &streamer)
        .await
        .unwrap();
    assert_eq!(got.fetched_bytes, 0);
    assert_eq!(got.resumed_bytes, m.archive_size);
    assert_eq!(streamer.stats().bytes_served, 0);
    assert_exact(&got, &snap, &client);
}
