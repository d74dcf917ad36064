//! A crowd feeds itself, over real QUIC on 127.0.0.1: a node that downloads a snapshot serves
//! the chunks it has verified meanwhile, a joiner takes from such partial holders only what
//! they hold, works around one that lies, and a crowd of joiners from one capped seed trades
//! most of the bytes among itself.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::wire::*;
use common::*;
use snapsync::layers::snapshot::{Manifest, Snapshot};
use snapsync::layers::transfer::{Holding, Origin};
use snapsync::proto;
/// Download settings for a crowd: quick retries, and requests given the time a capped seed
/// shared by many needs.
fn crowd_config() -> DownloadConfig {
    fast()
        .with_min_request_timeout(Duration::from_secs(10))
        .with_no_progress_timeout(Duration::from_secs(60))
}

use snapsync::layers::transfer::{
    DownloadConfig, DownloadHandle, DownloadTarget, Downloaded, PeerAddr, PeerStatus, Streamer,
    StreamerConfig,
};

/// Sends `request` on a new stream of `conn`; returns the header and the body.
async fn ask(
    conn: &quinn::Connection,
    request: proto::Request,
) -> (proto::ResponseHeader, Vec<u8>) {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&frame(&request)).await.unwrap();
    send.finish().unwrap();
    let header: proto::ResponseHeader = read(&mut recv).await.unwrap();
    let mut body = vec![0u8; header.encoded_len as usize];
    recv.read_exact(&mut body).await.unwrap();
    (header, body)
}

/// Waits until `handle` has at least `bytes` verified (and is not finished).
async fn until_done_bytes(handle: &DownloadHandle, bytes: u64) {
    let mut progress = handle.progress();
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            {
                let p = progress.borrow_and_update();
                assert!(!p.finished, "finished before {bytes} bytes were seen");
                if p.done_bytes >= bytes {
                    return;
                }
            }
            progress.changed().await.unwrap();
        }
    })
    .await
    .expect("progress in time");
}

/// A seed capped at `rate` bytes/s and a node downloading from it (serving what it verified),
/// stopped half way through.
struct HalfWay {
    seed: Node,
    snap: Arc<Snapshot>,
    seed_streamer: Streamer,
    holder: Node,
    holder_streamer: Streamer,
    handle: DownloadHandle,
}

async fn half_way(kib: u64, rate: u64) -> HalfWay {
    let (seed, snap) = Node::with_snapshot(kib, 50, 11);
    let seed_streamer = serve(&seed, StreamerConfig::default().with_rate_limit(Some(rate)));
    let holder = Node::new();
    let holder_streamer = serve(&holder, StreamerConfig::default());
    let handle = downloader(&holder, crowd_config()).start(
        DownloadTarget::from_manifest(snap.manifest()),
        vec![peer(&seed, &seed_streamer)],
    );
    until_done_bytes(&handle, snap.manifest().archive_size / 3).await;
    HalfWay {
        seed,
        snap,
        seed_streamer,
        holder,
        holder_streamer,
        handle,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_downloading_node_serves_exactly_the_chunks_it_has_verified() {
    init_tracing();
    let h = half_way(4096, 600_000).await;
    let m = h.snap.manifest();
    let (root, size) = (m.content_root, m.chunk_size.bytes());
    let client = RawClient::new();
    let conn = client
        .hello(h.holder.peer_id(), h.holder_streamer.local_addr())
        .await;
    // The manifest it checked.
    let (header, _) = ask(&conn, manifest_request(root)).await;
    assert_eq!(header.status, proto::Status::Ok as i32);
    assert_eq!(
        Manifest::from_proto(header.manifest.as_ref().unwrap()).unwrap(),
        *m
    );
    // What it holds: some blocks, not all.
    let tree = m.chunk_tree();
    let blocks = tree.chunk_count().div_ceil(32);
    let (header, bits) = ask(&conn, have_request(root, 32)).await;
    assert_eq!(header.status, proto::Status::Ok as i32);
    assert!(!header.complete);
    assert_eq!(bits.len() as u64, blocks.div_ceil(8));
    let held = |b: u64| bits[(b / 8) as usize] & (1 << (b % 8)) != 0;
    let first_held = (0..blocks).find(|b| held(*b)).expect("a block held");
    let first_missing = (0..blocks).find(|b| !held(*b)).expect("a block missing");
    // A block it holds is served, and checks against the root.
    let range = first_held * 32..((first_held + 1) * 32).min(tree.chunk_count());
    let (header, body) = ask(&conn, chunks_request(root, range.clone(), size)).await;
    assert_eq!(
        header.status,
        proto::Status::Ok as i32,
        "{}",
        header.message
    );
    let mut decoder = tree.range_decoder(range.clone()).unwrap();
    let mut data = Vec::new();
    decoder
        .feed(
            &body,
            &mut |_, d: &[u8]| {
                data.extend_from_slice(d);
                Ok(())
            },
            &mut |_, _: &[u8]| Ok(()),
        )
        .unwrap();
    decoder.finish().unwrap();
    let archive = std::fs::read(h.snap.archive_path()).unwrap();
    let start = (range.start * u64::from(size)) as usize;
    assert_eq!(data, archive[start..start + data.len()]);
    // One it does not hold yet is refused as not held: no misbehaviour, the connection stays.
    let range = first_missing * 32..((first_missing + 1) * 32).min(tree.chunk_count());
    let (header, body) = ask(&conn, chunks_request(root, range, size)).await;
    assert_eq!(header.status, proto::Status::NotHeld as i32);
    assert!(body.is_empty());
    let (header, _) = ask(&conn, have_request(root, 32)).await;
    assert_eq!(header.status, proto::Status::Ok as i32);
    // Once published, it holds everything.
    let got = h.handle.wait().await.unwrap();
    assert_exact(&got, &h.snap, &h.holder);
    let (header, body) = ask(&conn, have_request(root, 32)).await;
    assert!(header.complete && body.is_empty());
    assert!(got.served_bytes > 0);
    drop(h.seed_streamer);
    drop(h.seed);
}

/// A have question that says what the asker holds and how long it may wait.
fn waiting_have(
    root: snapsync::ContentRoot,
    block_chunks: u32,
    holding: &[u8],
    wait_ms: u32,
) -> proto::Request {
    proto::Request {
        kind: Some(proto::request::Kind::Have(proto::GetHave {
            content_root: root.0.to_vec().into(),
            block_chunks,
            holding: holding.to_vec().into(),
            wait_ms,
            ..Default::default()
        })),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_downloading_holder_keeps_a_have_question_until_it_has_news_for_the_asker() {
    init_tracing();
    let h = half_way(4096, 600_000).await;
    let root = h.snap.manifest().content_root;
    let client = RawClient::new();
    let conn = client
        .hello(h.holder.peer_id(), h.holder_streamer.local_addr())
        .await;
    let (_, now_held) = ask(&conn, have_request(root, 4)).await;
    let count = |bits: &[u8]| bits.iter().map(|b| b.count_ones()).sum::<u32>();
    // An asker that holds all it holds, and lets it wait: the answer carries a block more.
    let (header, news) = ask(&conn, waiting_have(root, 4, &now_held, 1000)).await;
    assert_eq!(
        header.status,
        proto::Status::Ok as i32,
        "{}",
        header.message
    );
    assert!(
        news.iter().zip(&now_held).any(|(n, a)| n & !a != 0),
        "no block beyond what the asker holds: {} then {}",
        count(&now_held),
        count(&news)
    );
    // One that holds everything gets no news: it is answered when its wait is over, and a
    // wait longer than the server's longest is cut to it.
    let all = vec![0xff; now_held.len()];
    for (wait_ms, least) in [(300, 300), (60_000, 1000)] {
        let asked = std::time::Instant::now();
        let (header, _) = ask(&conn, waiting_have(root, 4, &all, wait_ms)).await;
        assert_eq!(header.status, proto::Status::Ok as i32);
        let took = asked.elapsed();
        assert!(
            took >= Duration::from_millis(least),
            "answered after {took:?}"
        );
        assert!(took < Duration::from_secs(30), "kept {took:?}");
    }
    // Without a wait, at once as before (whatever it holds).
    let (header, _) = ask(&conn, waiting_have(root, 4, &all, 0)).await;
    assert_eq!(header.status, proto::Status::Ok as i32);
    h.handle.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joiner_takes_from_a_partial_holder_what_it_holds_and_the_rest_from_the_seed() {
    init_tracing();
    let h = half_way(4096, 400_000).await;
    let joiner = Node::new();
    let handle = downloader(&joiner, crowd_config()).start(
        DownloadTarget::from_manifest(h.snap.manifest()),
        vec![peer(&h.seed, &h.seed_streamer)],
    );
    assert!(handle.add_source(
        Origin::Peer(peer(&h.holder, &h.holder_streamer)),
        Holding::Partial
    ));
    let got = handle.wait().await.unwrap();
    assert_exact(&got, &h.snap, &joiner);
    let from_holder = got
        .per_peer
        .iter()
        .find(|(p, _)| *p == h.holder.peer_id())
        .map_or(0, |(_, b)| *b);
    let from_seed = got
        .per_peer
        .iter()
        .find(|(p, _)| *p == h.seed.peer_id())
        .map_or(0, |(_, b)| *b);
    println!("from the partial holder {from_holder} B, from the seed {from_seed} B");
    assert!(from_holder > 0, "the partial holder served nothing");
    assert!(
        from_seed > 0,
        "the partial holder cannot have held everything"
    );
    let served = h.holder_streamer.stats().bytes_served;
    assert!(served >= from_holder);
    h.handle.wait().await.unwrap();
}

/// A fake partial holder of `manifest` that lies as `lie` says, and what it was asked.
fn liar(manifest: &Manifest, lie: Lie) -> (PeerAddr, Arc<LiarStats>, quinn::Endpoint) {
    let keypair = libp2p::identity::Keypair::generate_ed25519();
    let (addr, stats, endpoint) = liar_server(&keypair, manifest.to_proto(), lie);
    let peer_id = keypair.public().to_peer_id();
    (PeerAddr { peer_id, addr }, stats, endpoint)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_holder_that_lies_about_what_it_holds_is_worked_around_and_blamed_only_for_bad_bytes()
 {
    init_tracing();
    let (seed, snap) = Node::with_snapshot(2048, 50, 12);
    let seed_streamer = serve(
        &seed,
        StreamerConfig::default().with_rate_limit(Some(2_000_000)),
    );
    // One says it holds everything and refuses every range; one sends bytes that do not
    // check out.
    let (says_not_held, not_held_asked, _e1) = liar(snap.manifest(), Lie::Stale);
    let (sends_garbage, garbage_asked, _e2) = liar(snap.manifest(), Lie::Garbage);
    let joiner = Node::new();
    let handle = downloader(&joiner, crowd_config()).start(
        DownloadTarget::from_manifest(snap.manifest()),
        vec![peer(&seed, &seed_streamer)],
    );
    assert!(handle.add_source(Origin::Peer(says_not_held), Holding::Partial));
    assert!(handle.add_source(Origin::Peer(sends_garbage), Holding::Partial));
    let progress = handle.progress();
    let got = handle.wait().await.unwrap();
    assert_exact(&got, &snap, &joiner);
    let status = |p: &PeerAddr| {
        progress
            .borrow()
            .peers
            .iter()
            .find(|q| q.peer_id == p.peer_id)
            .map(|q| q.status)
    };
    // The one that only said "not held" is no longer asked, but not blamed: it sent no byte
    // that was wrong.
    assert_ne!(status(&says_not_held), Some(PeerStatus::Banned));
    // The one whose bytes did not check out is banned for them.
    assert_eq!(status(&sends_garbage), Some(PeerStatus::Banned));
    assert!(
        got.per_peer
            .iter()
            .filter(|(p, _)| *p != seed.peer_id())
            .all(|(_, b)| *b == 0),
        "the liars delivered nothing"
    );
    // Both were asked for chunks: what is asserted above was shown, not assumed.
    let asked = |s: &LiarStats| s.chunks.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        asked(&not_held_asked) > 0,
        "the one saying 'not held' was never asked"
    );
    assert!(
        asked(&garbage_asked) > 0,
        "the one sending garbage was never asked"
    );
}

/// One joiner of a crowd: its disk, its streamer and its download.
struct Joiner {
    node: Node,
    streamer: Streamer,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crowd_of_eight_from_one_capped_seed_feeds_itself() {
    init_tracing();
    let (seed, snap) = Node::with_snapshot(8192, 50, 13);
    let size = snap.manifest().archive_size;
    let seed_streamer = serve(
        &seed,
        StreamerConfig::default().with_rate_limit(Some(2_000_000)),
    );
    let joiners: Vec<Joiner> = (0..8)
        .map(|_| {
            let node = Node::new();
            let streamer = serve(&node, StreamerConfig::default());
            Joiner { node, streamer }
        })
        .collect();
    let config = crowd_config();
    let handles: Vec<DownloadHandle> = joiners
        .iter()
        .map(|j| {
            let handle = downloader(&j.node, config).start(
                DownloadTarget::from_manifest(snap.manifest()),
                vec![peer(&seed, &seed_streamer)],
            );
            for other in joiners
                .iter()
                .filter(|o| o.node.peer_id() != j.node.peer_id())
            {
                assert!(handle.add_source(
                    Origin::Peer(peer(&other.node, &other.streamer)),
                    Holding::Partial
                ));
            }
            handle
        })
        .collect();
    let results: Vec<Downloaded> = futures::future::join_all(handles)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    let mut from_joiners = 0;
    for (j, got) in joiners.iter().zip(&results) {
        assert_exact(got, &snap, &j.node);
        from_joiners += got
            .per_peer
            .iter()
            .filter(|(p, _)| *p != seed.peer_id())
            .map(|(_, b)| b)
            .sum::<u64>();
    }
    let total: u64 = results.iter().map(|r| r.fetched_bytes).sum();
    let seed_sent = seed_streamer.stats().bytes_served;
    let share = from_joiners as f64 / total as f64;
    println!(
        "8 joiners: {:.0}% of {} bytes from other joiners; the seed sent {:.2} copies",
        100.0 * share,
        total,
        seed_sent as f64 / size as f64
    );
    assert_eq!(total, 8 * size);
    assert!(share > 0.5, "only {:.0}% from other joiners", 100.0 * share);
    assert!(
        seed_sent <= 2 * size,
        "the seed sent {:.2} copies",
        seed_sent as f64 / size as f64
    );
}

/// Waits until `handle`'s progress shows `peer` in `status` (and is not finished).
async fn until_status(handle: &DownloadHandle, peer: libp2p::PeerId, status: PeerStatus) {
    let mut progress = handle.progress();
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            {
                let p = progress.borrow_and_update();
                assert!(!p.finished, "finished before {peer} was {status:?}");
                if p.peers
                    .iter()
                    .any(|s| s.peer_id == peer && s.status == status)
                {
                    return;
                }
            }
            progress.changed().await.unwrap();
        }
    })
    .await
    .expect("status in time");
}

/// Bytes add up: with one place, a source cut off gives it to the other, which is cut off in
/// turn and gives it back; the first reconnects and finishes. What the download credits each
/// source adds up to what it fetched, and no source is credited more than its streamer says
/// it served (what it served beyond is what was in flight when its link was cut).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bytes_credited_to_sources_add_up_across_a_place_given_up_and_taken_again() {
    use common::relay::{Impairment, Relay};
    init_tracing();
    let (a, snap) = Node::with_snapshot(8 * 1024, 50, 21);
    let b = Node::holding(&snap);
    let capped = || StreamerConfig::default().with_rate_limit(Some(1_500_000));
    let (a_streamer, b_streamer) = (serve(&a, capped()), serve(&b, capped()));
    let a_relay = Relay::start(a_streamer.local_addr(), Impairment::default(), 1).await;
    let b_relay = Relay::start(b_streamer.local_addr(), Impairment::default(), 2).await;
    let via = |node: &Node, relay: &Relay| PeerAddr {
        peer_id: node.peer_id(),
        addr: relay.addr,
    };
    let client = Node::new();
    let config = crowd_config()
        .with_max_peers(1)
        .with_snub_timeout(Duration::from_secs(1))
        .with_min_request_timeout(Duration::from_millis(800));
    let size = snap.manifest().archive_size;
    let handle = downloader(&client, config).start(
        DownloadTarget::from_manifest(snap.manifest()),
        vec![via(&a, &a_relay), via(&b, &b_relay)],
    );
    // A holds the place; cut off, it gives it to B.
    until_done_bytes(&handle, size / 4).await;
    a_relay.cut(true);
    until_status(&handle, b.peer_id(), PeerStatus::Active).await;
    until_done_bytes(&handle, size / 2).await;
    // B is cut off in turn; A, back, takes the place again and finishes.
    a_relay.cut(false);
    b_relay.cut(true);
    let got = handle.wait().await.unwrap();
    assert_exact(&got, &snap, &client);
    let credited = |peer: libp2p::PeerId| {
        got.per_peer
            .iter()
            .find(|(p, _)| *p == peer)
            .map_or(0, |(_, b)| *b)
    };
    let (from_a, from_b) = (credited(a.peer_id()), credited(b.peer_id()));
    println!(
        "fetched {}, from A {from_a} (it served {}), from B {from_b} (it served {}), {} duplicate",
        got.fetched_bytes,
        a_streamer.stats().bytes_served,
        b_streamer.stats().bytes_served,
        got.duplicate_bytes
    );
    assert!(from_a > size / 4 && from_b > 0, "both delivered");
    assert_eq!(
        from_a + from_b,
        got.fetched_bytes,
        "per-source bytes add up"
    );
    assert_eq!(got.fetched_bytes, size);
    for (credit, streamer) in [(from_a, &a_streamer), (from_b, &b_streamer)] {
        let served = streamer.stats().bytes_served;
        assert!(credit <= served, "credited {credit}, served {served}");
        assert!(
            served - credit <= 2 << 20,
            "served {served}, credited {credit}: more lost than a cut link held"
        );
    }
}
