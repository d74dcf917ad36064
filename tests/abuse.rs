//! The chunk stream under abuse, over real sockets: clients that do not read, connections that
//! never authenticate, hostile requests, lying adverts, a fake streamer fishing for the token,
//! damaged files. Each test names the weakness it guards against.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::wire::*;
use common::*;
use snapsync::ContentRoot;
use snapsync::layers::snapshot::Manifest;
use snapsync::layers::transfer::{DownloadError, DownloadTarget, PeerAddr, StreamerConfig, Token};
use snapsync::proto;

/// A raw client whose receive windows are small, so that a response it does not read blocks the
/// server's writes (a default window would swallow a whole response).
fn small_windows() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.stream_receive_window(16_384u32.into());
    t.receive_window(65_536u32.into());
    t.max_idle_timeout(Some(Duration::from_secs(10).try_into().unwrap()));
    t
}

/// Streamer finding: a response's memory was held while writing to a client that never reads,
/// with no deadline, so a few such requests starved everyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_loses_its_memory_and_its_connection() {
    init_tracing();
    let (server, snap) = Node::with_snapshot(4096, 50, 21);
    let streamer = serve(
        &server,
        StreamerConfig::default()
            .with_response_memory(2 << 20)
            .with_max_request_bytes(1 << 20)
            .with_write_timeout(Duration::from_secs(1)),
    );
    let m = snap.manifest();
    let chunk = m.chunk_size.bytes();
    let per_request = (1 << 20) / u64::from(chunk);
    // The hog: authenticated, asks for 4 MiB in four requests, reads none of it.
    let hog = RawClient::new();
    let conn = hog
        .hello_with(server.peer_id(), streamer.local_addr(), small_windows())
        .await;
    let mut held = Vec::new();
    for i in 0..4 {
        let (mut send, recv) = conn.open_bi().await.unwrap();
        send.write_all(&get_chunks(
            m.content_root,
            i * per_request,
            (i + 1) * per_request,
            chunk,
        ))
        .await
        .unwrap();
        send.finish().unwrap();
        held.push((send, recv));
    }
    // An honest downloader is served all the same.
    let client = Node::new();
    let started = Instant::now();
    let got = fetch_from(&client, fast(), m, &server, &streamer)
        .await
        .unwrap();
    assert_exact(&got, &snap, &client);
    println!("honest download beside the hog: {:?}", started.elapsed());
    // The hog's connection is closed for being too slow.
    let closed = tokio::time::timeout(Duration::from_secs(10), conn.closed())
        .await
        .expect("the hog's connection was not closed");
    match closed {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(c.error_code, quinn::VarInt::from_u32(0x15), "{c:?}")
        }
        other => panic!("closed otherwise: {other}"),
    }
    assert!(streamer.stats().closed_too_slow >= 1);
}

/// Streamer finding: an unauthenticated connection got 32 streams and a slot with no deadline
/// (and 4 MiB / 16 MiB receive windows: see the unit tests of `transfer::tls`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthenticated_connection_gets_one_small_stream_and_a_deadline() {
    init_tracing();
    let (server, _snap) = Node::with_snapshot(256, 50, 22);
    let streamer = serve(
        &server,
        StreamerConfig::default().with_auth_timeout(Duration::from_secs(1)),
    );
    let raw = RawClient::new();
    let started = Instant::now();
    let conn = raw
        .connect(server.peer_id(), streamer.local_addr())
        .await
        .unwrap();
    // The handshake stream, opened and left silent (the server's receive windows before
    // authentication are checked in `transfer::tls`'s unit tests).
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(&[0, 0]).await.unwrap();
    // A second stream is not granted.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), conn.open_bi())
            .await
            .is_err(),
        "a second stream before authentication"
    );
    // And the connection is closed at the deadline.
    let closed = tokio::time::timeout(Duration::from_secs(5), conn.closed())
        .await
        .expect("not closed at the deadline");
    println!("closed after {:?}: {closed}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(4));
    assert_eq!(streamer.stats().connections_open, 0);
}

/// Streamer finding: connection slots were taken before the handshake, without address
/// validation. Hundreds of connections that never authenticate, from another address, while an
/// honest client downloads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_connections_that_never_authenticate_do_not_starve_an_honest_client() {
    init_tracing();
    let (server, snap) = Node::with_snapshot(2048, 50, 23);
    let streamer = serve(
        &server,
        StreamerConfig::default().with_auth_timeout(Duration::from_secs(2)),
    );
    let (server_id, addr) = (server.peer_id(), streamer.local_addr());
    let stop = Arc::new(AtomicBool::new(false));
    let attempts = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut attackers = Vec::new();
    for _ in 0..4 {
        let (stop, attempts) = (stop.clone(), attempts.clone());
        attackers.push(tokio::spawn(async move {
            // From 127.0.0.2: limits per source address apply to it, not to the honest client.
            let endpoint = quinn::Endpoint::client("127.0.0.2:0".parse().unwrap()).unwrap();
            let raw = RawClient::with_endpoint(endpoint);
            let mut held = Vec::new();
            while !stop.load(Ordering::Acquire) {
                let mut batch = Vec::new();
                for _ in 0..50 {
                    attempts.fetch_add(1, Ordering::Relaxed);
                    batch.push(raw.connect(server_id, addr));
                }
                for c in futures::future::join_all(batch).await.into_iter().flatten() {
                    held.push(c); // connected, never says hello
                }
                held.retain(|c: &quinn::Connection| c.close_reason().is_none());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let client = Node::new();
    let got = fetch_from(&client, fast(), snap.manifest(), &server, &streamer)
        .await
        .unwrap();
    assert_exact(&got, &snap, &client);
    let open_during = streamer.stats().connections_open;
    stop.store(true, Ordering::Release);
    for a in attackers {
        let _ = a.await;
    }
    let stats = streamer.stats();
    println!(
        "{} attempts; {} refused busy; {open_during} connections open at the end of the download",
        attempts.load(Ordering::Relaxed),
        stats.refused_busy
    );
    assert!(attempts.load(Ordering::Relaxed) >= 200);
    assert!(stats.refused_busy > 0, "nothing refused: {stats:?}");
    assert!(open_during <= 64, "{open_during} connections open");
}

/// Finding 9: `start_chunk * chunk_size` overflowed on a hostile request before the range was
/// checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_chunk_ranges_are_refused_and_the_connection_still_serves() {
    init_tracing();
    let (server, snap) = Node::with_snapshot(256, 50, 24);
    let streamer = serve(&server, StreamerConfig::default());
    let m = snap.manifest();
    let chunk = m.chunk_size.bytes();
    let raw = RawClient::new();
    let conn = raw.hello(server.peer_id(), streamer.local_addr()).await;
    let ask = |start: u64, end: u64, size: u32| {
        let conn = conn.clone();
        async move {
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            send.write_all(&get_chunks(m.content_root, start, end, size))
                .await
                .unwrap();
            send.finish().unwrap();
            read::<proto::ResponseHeader>(&mut recv).await.unwrap()
        }
    };
    for (start, end, size) in [
        (u64::MAX - 1, u64::MAX, chunk),
        (1 << 60, (1 << 60) + 1, chunk),
        (5, 2, chunk),
        (0, 1, 3000),
        (0, u64::MAX, chunk),
    ] {
        let h = ask(start, end, size).await;
        assert_ne!(h.status, proto::Status::Ok as i32, "{start}..{end}: {h:?}");
        assert!(!h.message.is_empty());
    }
    let ok = ask(0, 1, chunk).await;
    assert_eq!(ok.status, proto::Status::Ok as i32, "{ok:?}");
    assert!(ok.encoded_len > 0);
}

/// Finding 12: the store checked sizes only when it opened; a snapshot damaged on disk since
/// must not be served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_damaged_on_disk_after_start_is_not_served() {
    init_tracing();
    let (server, snap) = Node::with_snapshot(512, 50, 25);
    let streamer = serve(&server, StreamerConfig::default());
    let archive = snap.archive_path();
    let len = std::fs::metadata(&archive).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&archive)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let client = Node::new();
    let err = fetch_from(
        &client,
        fast().with_max_peer_failures(2),
        snap.manifest(),
        &server,
        &streamer,
    )
    .await
    .unwrap_err();
    println!("{err}");
    assert!(matches!(err, DownloadError::NoPeers { .. }), "{err}");
    assert!(err.to_string().contains("unavailable"), "{err}");
    assert_eq!(streamer.stats().chunks_served, 0);
    assert!(streamer.stats().requests_refused >= 1);
}

/// Bytes of regular files under `dir`, allocated on disk.
fn allocated_bytes(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let md = entry.metadata().unwrap();
        if md.is_dir() {
            total += allocated_bytes(&entry.path());
        } else {
            total += md.blocks() * 512;
        }
    }
    total
}

/// Finding 6: one advert reserved disk (the advertised size, up to 1 TiB) and bitmap memory
/// before anyone was contacted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_advert_reserves_nothing_before_an_authenticated_peer_serves_its_manifest() {
    init_tracing();
    let (server, snap) = Node::with_snapshot(256, 50, 26);
    let streamer = serve_token(
        &server,
        StreamerConfig::default(),
        Some(Token::new("right")),
    );
    let client = Node::new();
    // An advert of the real root with a size of 256 GiB.
    let mut lie = DownloadTarget::from_manifest(snap.manifest());
    lie.archive_size = 256 << 30;
    // A peer that refuses our token: nothing is reserved.
    let err = downloader_token(&client, fast(), Some(Token::new("wrong")))
        .download(lie, vec![peer(&server, &streamer)])
        .await
        .unwrap_err();
    assert!(err.is_unauthorized(), "{err}");
    assert!(allocated_bytes(client.store.dir()) < 1 << 20);
    // A peer that proves the token but whose manifest differs from the advert: nothing either.
    let err = downloader_token(&client, fast(), Some(Token::new("right")))
        .download(lie, vec![peer(&server, &streamer)])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("manifest"), "{err}");
    assert!(allocated_bytes(client.store.dir()) < 1 << 20);
    // A chunk count beyond what a download may track is refused before any connection.
    let mut huge = DownloadTarget::from_manifest(snap.manifest());
    huge.archive_size = 1 << 50;
    let before = streamer.stats().connections_accepted + streamer.stats().refused_unauthorized;
    let err = downloader_token(&client, fast(), Some(Token::new("right")))
        .download(huge, vec![peer(&server, &streamer)])
        .await
        .unwrap_err();
    assert!(matches!(err, DownloadError::TooManyChunks { .. }), "{err}");
    let after = streamer.stats().connections_accepted + streamer.stats().refused_unauthorized;
    assert_eq!(before, after, "a peer was contacted");
}

/// A QUIC server with a libp2p identity that records every byte its clients send, answers the
/// hello with a welcome that claims to accept (with a made-up proof), and serves nothing.
async fn recording_server() -> (libp2p::PeerId, SocketAddr, Arc<Mutex<Vec<u8>>>) {
    let (peer_id, addr, endpoint) = hostile_endpoint();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            let Ok(conn) = incoming.await else { continue };
            let record = record.clone();
            tokio::spawn(async move {
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    let mut buf = vec![0u8; 4096];
                    while let Ok(Some(n)) = recv.read(&mut buf).await {
                        record.lock().unwrap().extend_from_slice(&buf[..n]);
                    }
                    let _ = send
                        .write_all(&frame(&proto::Welcome {
                            protocol_version: 2,
                            refused: proto::Refusal::None as i32,
                            message: String::new(),
                            proof: vec![7u8; 32].into(),
                        }))
                        .await;
                    let _ = send.finish();
                }
            });
        }
    });
    (peer_id, addr, seen)
}

/// Finding 2: the token was sent to whoever advertised. A fake streamer that records every
/// byte learns nothing of it, and the downloader refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fake_streamer_that_records_every_byte_never_sees_the_token() {
    init_tracing();
    let secret = "correct horse battery staple 2026";
    let (fake, addr, seen) = recording_server().await;
    let client = Node::new();
    let target = DownloadTarget::new(
        ContentRoot([9; 32]),
        1 << 20,
        snapsync::layers::chunk::ChunkSize::DEFAULT,
    );
    let err = downloader_token(&client, fast(), Some(Token::new(secret)))
        .download(
            target,
            vec![PeerAddr {
                peer_id: fake,
                addr,
            }],
        )
        .await
        .unwrap_err();
    println!("{err}");
    assert!(err.to_string().contains("SNAPSHOT_TOKEN"), "{err}");
    let seen = seen.lock().unwrap().clone();
    assert!(!seen.is_empty(), "the fake streamer saw nothing at all");
    let contains = |needle: &[u8]| seen.windows(needle.len()).any(|w| w == needle);
    assert!(!contains(secret.as_bytes()), "the token itself");
    assert!(!contains(&secret.as_bytes()[..8]), "a part of the token");
    assert!(
        !contains(blake3::hash(secret.as_bytes()).as_bytes()),
        "its hash"
    );
    let key = blake3::derive_key("snapsync 2026-11 chunk stream token", secret.as_bytes());
    assert!(!contains(&key), "the key derived from it");
}

/// A copy of `snap` in a store of its own whose manifest says something else: `edit` changes
/// it. (The store checks the files' sizes, not what the manifest claims.)
fn doctored(snap: &snapsync::layers::snapshot::Snapshot, edit: impl Fn(&mut Manifest)) -> Node {
    let node = Node::holding(snap);
    let held = node.store.get(&snap.manifest().content_root).unwrap();
    let mut m = held.manifest().clone();
    edit(&mut m);
    std::fs::write(
        held.dir().join(snapsync::layers::snapshot::MANIFEST_FILE),
        m.encode(),
    )
    .unwrap();
    let store = snapsync::layers::snapshot::SnapshotStore::open(node.store.dir()).unwrap();
    Node { store, ..node }
}

/// Trust finding 6: the first peer's manifest was taken and published again without checking
/// its kind, base or counts, so honest nodes spread a poisoned manifest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_that_differs_in_any_field_is_not_taken_nor_published() {
    init_tracing();
    let (server, snap) = Node::with_snapshot(512, 50, 31);
    let honest = snap.manifest().clone();
    let liars: Vec<(&str, Node)> = vec![
        ("record counts", doctored(&snap, |m| m.entry_count = 1)),
        (
            "kind",
            doctored(&snap, |m| {
                m.kind = snapsync::layers::snapshot::SnapshotKind::Incremental;
                m.base = Some(snapsync::layers::snapshot::Base {
                    slot: 1,
                    bank_hash: snapsync::BankHash([1; 32]),
                    content_root: ContentRoot([1; 32]),
                });
            }),
        ),
    ];
    let target = DownloadTarget::from_manifest(&honest);
    for (what, liar) in &liars {
        let streamer = serve(liar, StreamerConfig::default());
        let client = Node::new();
        let err = downloader(&client, fast())
            .download(target, vec![peer(liar, &streamer)])
            .await
            .unwrap_err();
        assert!(err.to_string().contains(what), "{what}: {err}");
        assert!(client.store.list().is_empty(), "{what}: nothing published");
    }
    // With an honest peer beside the liars, the download completes and what is published is
    // the manifest that was chosen.
    let honest_streamer = serve(&server, StreamerConfig::default());
    let liar_streamers: Vec<_> = liars
        .iter()
        .map(|(_, n)| serve(n, StreamerConfig::default()))
        .collect();
    let mut peers: Vec<PeerAddr> = liars
        .iter()
        .zip(&liar_streamers)
        .map(|((_, n), s)| peer(n, s))
        .collect();
    peers.push(peer(&server, &honest_streamer));
    let client = Node::new();
    let got = downloader(&client, fast())
        .download(target, peers)
        .await
        .unwrap();
    assert_eq!(got.snapshot.manifest().entry_count, honest.entry_count);
    assert_eq!(got.snapshot.manifest().kind, honest.kind);
    assert_exact(&got, &snap, &client);
}

/// A copy of `snap` whose archive has a byte flipped in every chunk: any range it serves fails
/// its check.
fn corrupt(snap: &snapsync::layers::snapshot::Snapshot) -> Node {
    let node = Node::holding(snap);
    let held = node.store.get(&snap.manifest().content_root).unwrap();
    let mut bytes = std::fs::read(held.archive_path()).unwrap();
    let chunk = snap.manifest().chunk_size.bytes() as usize;
    for at in (0..bytes.len()).step_by(chunk) {
        bytes[at] ^= 0xff;
    }
    std::fs::write(held.archive_path(), bytes).unwrap();
    node
}

/// Trust finding 2: the first `max_peers` advertisers became the download's peers, so a few
/// identities sending one bad chunk each failed the download though honest peers advertised it
/// too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_banned_for_bad_chunks_are_replaced_by_the_others_that_advertise() {
    init_tracing();
    let (server, snap) = Node::with_snapshot(512, 50, 32);
    let bad: Vec<Node> = (0..4).map(|_| corrupt(&snap)).collect();
    let bad_streamers: Vec<_> = bad
        .iter()
        .map(|n| serve(n, StreamerConfig::default()))
        .collect();
    let honest = serve(&server, StreamerConfig::default());
    // The liars come first and fill the download's four places; the honest peer comes last.
    let mut peers: Vec<PeerAddr> = bad
        .iter()
        .zip(&bad_streamers)
        .map(|(n, s)| peer(n, s))
        .collect();
    peers.push(peer(&server, &honest));
    let client = Node::new();
    let got = downloader(&client, fast().with_max_peers(4))
        .download(DownloadTarget::from_manifest(snap.manifest()), peers)
        .await
        .unwrap();
    assert_exact(&got, &snap, &client);
    let from_honest = got
        .per_peer
        .iter()
        .find(|(p, _)| *p == server.peer_id())
        .map(|(_, b)| *b)
        .unwrap_or(0);
    assert_eq!(
        from_honest,
        snap.manifest().archive_size,
        "every byte from the honest peer"
    );
}

/// Trust finding 8: without a token anyone is admitted, and authenticated connections had no
/// idle limit (the server kept them alive itself): 64 idle connections from four addresses
/// refused every honest downloader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_holding_every_slot_make_room_for_an_honest_downloader() {
    init_tracing();
    let (server, snap) = Node::with_snapshot(1024, 50, 33);
    let streamer = serve(&server, StreamerConfig::default());
    // Four addresses, sixteen connections each (the per-address limit), each under a fresh
    // identity: all 64 slots, kept alive by the clients and never asking for anything.
    let mut held = Vec::new();
    for host in 2..=5u8 {
        let bind: SocketAddr = format!("127.0.0.{host}:0").parse().unwrap();
        let endpoint = quinn::Endpoint::client(bind).unwrap();
        for _ in 0..16 {
            let idle = RawClient::with_endpoint(endpoint.clone());
            let mut t = quinn::TransportConfig::default();
            t.max_idle_timeout(Some(Duration::from_secs(30).try_into().unwrap()));
            t.keep_alive_interval(Some(Duration::from_secs(1)));
            held.push(
                idle.hello_with(server.peer_id(), streamer.local_addr(), t)
                    .await,
            );
        }
    }
    assert!(streamer.stats().connections_open >= 64);
    // Past their grace, they serve nothing: the honest downloader is let in at its first try.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let bind: SocketAddr = "127.0.0.6:0".parse().unwrap();
    let honest = RawClient::with_endpoint(quinn::Endpoint::client(bind).unwrap());
    let conn = honest.hello(server.peer_id(), streamer.local_addr()).await;
    conn.close(0u32.into(), b"");
    let client = Node::new();
    let got = fetch_from(
        &client,
        fast()
            .with_bind("127.0.0.6:0".parse().unwrap())
            .with_max_peer_failures(1),
        snap.manifest(),
        &server,
        &streamer,
    )
    .await
    .unwrap();
    assert_exact(&got, &snap, &client);
    assert_eq!(streamer.stats().refused_busy, 0, "nobody was refused");
    drop(held);
}

/// Trust finding 5: a download trimmed every partial download but its own, so the incremental
/// leg of a full + incremental sync deleted the full leg's partial under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_downloads_at_once_keep_each_others_partial_whatever_the_budget() {
    init_tracing();
    let (full_server, full) = Node::with_snapshot(2048, 50, 34);
    let (inc_server, inc) = Node::with_snapshot(256, 60, 35);
    // The first leg is slow (1 MiB/s), so the second starts while it is half-way.
    let slow = serve(
        &full_server,
        StreamerConfig::default().with_rate_limit(Some(1 << 20)),
    );
    let quick = serve(&inc_server, StreamerConfig::default());
    let client = Node::new();
    let dl = downloader(&client, fast().with_partial_budget(0));
    let first = dl.start(
        DownloadTarget::from_manifest(full.manifest()),
        vec![peer(&full_server, &slow)],
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    let second = dl
        .download(
            DownloadTarget::from_manifest(inc.manifest()),
            vec![peer(&inc_server, &quick)],
        )
        .await
        .unwrap();
    assert_exact(&second, &inc, &client);
    let first = first.wait().await.unwrap();
    assert_eq!(
        std::fs::read(first.snapshot.archive_path()).unwrap(),
        std::fs::read(full.archive_path()).unwrap()
    );
}
