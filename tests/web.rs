//! Snapshots on the web: a published directory served by a static HTTP server on 127.0.0.1
//! (with Range support, and the faults real ones have), as a source of downloads beside peers
//! and, for a node that hears of no peer, alone.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::net::*;
use common::web::{Fault, PrivateCa, WebServer};
use common::wire::*;
use common::*;
use snapsync::layers::snapshot::{Snapshot, publish};
use snapsync::layers::transfer::{
    DownloadConfig, DownloadError, DownloadTarget, PeerStatus, StreamerConfig, WebRoots, WebSource,
};
use snapsync::layers::transfer::{Holding, Origin};

/// A node with a snapshot of about `kib` KiB, published into a directory of its own.
fn published(kib: u64, seed: u64) -> (Node, Arc<Snapshot>, tempfile::TempDir) {
    let (node, snap) = Node::with_snapshot(kib, 50, seed);
    let www = tempfile::tempdir().unwrap();
    publish(&snap, www.path()).unwrap();
    (node, snap, www)
}

fn web_config() -> DownloadConfig {
    fast()
        .with_max_peer_failures(3)
        .with_no_progress_timeout(Duration::from_secs(30))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_from_a_web_source_alone_is_the_snapshot_byte_for_byte() {
    init_tracing();
    let (_node, snap, www) = published(2048, 31);
    let server = WebServer::start(www.path().to_path_buf(), Fault::None, None).await;
    let client = Node::new();
    let handle = downloader(&client, web_config())
        .start(DownloadTarget::from_manifest(snap.manifest()), Vec::new());
    assert!(handle.add_source(
        Origin::Web(Arc::new(WebSource::new(&server.url()).unwrap())),
        Holding::Complete
    ));
    let got = handle.wait().await.unwrap();
    assert_exact(&got, &snap, &client);
    assert_eq!(got.per_web.len(), 1);
    assert_eq!(got.per_web[0].1, snap.manifest().archive_size);
    // The archive was read in ranges, not whole.
    assert!(server.requests.load(std::sync::atomic::Ordering::Relaxed) > 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capped_peer_and_a_web_source_both_serve_one_download() {
    init_tracing();
    let (node, snap, www) = published(4096, 32);
    let streamer = serve(
        &node,
        StreamerConfig::default().with_rate_limit(Some(1_000_000)),
    );
    let server = WebServer::start(www.path().to_path_buf(), Fault::None, Some(1_000_000)).await;
    let client = Node::new();
    let handle = downloader(&client, web_config()).start(
        DownloadTarget::from_manifest(snap.manifest()),
        vec![peer(&node, &streamer)],
    );
    handle.add_source(
        Origin::Web(Arc::new(WebSource::new(&server.url()).unwrap())),
        Holding::Complete,
    );
    let got = handle.wait().await.unwrap();
    assert_exact(&got, &snap, &client);
    let from_peer: u64 = got.per_peer.iter().map(|(_, b)| b).sum();
    let from_web: u64 = got.per_web.iter().map(|(_, b)| b).sum();
    println!("from the peer {from_peer} B, from the web {from_web} B");
    assert!(from_peer > 0 && from_web > 0, "{from_peer} / {from_web}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_that_ignore_range_truncate_or_flip_a_byte_are_handled_and_the_rest_completes() {
    init_tracing();
    let (node, snap, www) = published(2048, 33);
    let streamer = serve(
        &node,
        StreamerConfig::default().with_rate_limit(Some(2_000_000)),
    );
    let root = www.path().to_path_buf();
    let ignores = WebServer::start(root.clone(), Fault::IgnoreRange, None).await;
    let truncates = WebServer::start(root.clone(), Fault::Truncate, None).await;
    let unsized_cut = WebServer::start(root.clone(), Fault::TruncateUnsized, None).await;
    let flips = WebServer::start(root, Fault::FlipByte, None).await;
    let client = Node::new();
    let handle = downloader(&client, web_config()).start(
        DownloadTarget::from_manifest(snap.manifest()),
        vec![peer(&node, &streamer)],
    );
    for s in [&ignores, &truncates, &unsized_cut, &flips] {
        handle.add_source(
            Origin::Web(Arc::new(WebSource::new(&s.url()).unwrap())),
            Holding::Complete,
        );
    }
    let progress = handle.progress();
    let got = handle.wait().await.unwrap();
    // Nothing wrong was written: the download is the snapshot, byte for byte.
    assert_exact(&got, &snap, &client);
    let web = progress.borrow().web.clone();
    let status = |s: &WebServer| {
        web.iter()
            .find(|w| w.url == s.url())
            .map(|w| (w.status, w.bytes))
            .unwrap()
    };
    // The server that ignores Range cannot serve this download: dropped, no byte taken.
    assert_eq!(status(&ignores), (PeerStatus::Dropped, 0));
    // The one whose bytes do not check out is banned for them (the chunks before the bad one
    // were checked, and count as delivered).
    assert_eq!(status(&flips).0, PeerStatus::Banned);
    // The one that cuts its bodies short is credited with the chunks it got through whole
    // (checked), never banned for the cut: it is retried, then dropped (or still retried when
    // the rest completed first).
    // The same when the cut body carries no length (its end looks like the connection's).
    for cut in [&truncates, &unsized_cut] {
        assert!(status(cut).1 < snap.manifest().archive_size);
        assert_ne!(status(cut).0, PeerStatus::Banned);
        // Asked for chunks (not only its index): what is asserted was shown.
        assert!(cut.archive_reads.load(std::sync::atomic::Ordering::Relaxed) > 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_cut_midway_resumes_from_the_web_source() {
    init_tracing();
    let (_node, snap, www) = published(4096, 34);
    let server = WebServer::start(www.path().to_path_buf(), Fault::None, Some(1_000_000)).await;
    let client = Node::new();
    let target = DownloadTarget::from_manifest(snap.manifest());
    let size = snap.manifest().archive_size;
    {
        let mut handle = downloader(&client, web_config()).start(target, Vec::new());
        handle.add_source(
            Origin::Web(Arc::new(WebSource::new(&server.url()).unwrap())),
            Holding::Complete,
        );
        let mut progress = handle.progress();
        tokio::time::timeout(Duration::from_secs(60), async {
            while progress.borrow_and_update().done_bytes < size / 3 {
                progress.changed().await.unwrap();
            }
        })
        .await
        .unwrap();
        handle.cancel();
        assert!(matches!(handle.wait().await, Err(DownloadError::Cancelled)));
    }
    let handle = downloader(&client, web_config()).start(target, Vec::new());
    handle.add_source(
        Origin::Web(Arc::new(WebSource::new(&server.url()).unwrap())),
        Holding::Complete,
    );
    let got = handle.wait().await.unwrap();
    assert_exact(&got, &snap, &client);
    assert!(
        got.resumed_bytes >= size / 3,
        "{} resumed",
        got.resumed_bytes
    );
    assert_eq!(got.resumed_bytes + got.fetched_bytes, size);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_hears_of_no_peer_syncs_from_its_web_source_once_the_policy_accepts() {
    init_tracing();
    let (_node, snap, www) = published(1024, 35);
    let server = WebServer::start(www.path().to_path_buf(), Fault::None, None).await;
    let mut events = Events::new();
    // A policy that wants two advertisers: one web source alone is not enough.
    let (dir, db) = node_dir(0, 0, 0);
    let strict = test_config(dir.path())
        .with_min_agreeing_peers(2)
        .with_web_sources(vec![server.url()]);
    let strict_node = start_node(0, dir, db, strict, events.tx.clone()).await;
    events
        .wait(Duration::from_secs(20), "a round with nothing to take", |i, e| {
            matches!(
                e,
                Ev::Snap(snapsync::Event::NoSnapshotAvailable { adverts, .. }) if i == 0 && *adverts > 0
            )
            .then_some(())
        })
        .await;
    // A node that pins the snapshot takes it from the web source alone.
    let (dir, db) = node_dir(0, 0, 0);
    let m = snap.manifest();
    let pinned = test_config(dir.path())
        .with_trusted_snapshot(m.slot, m.bank_hash)
        .with_web_sources(vec![server.url()]);
    let node = start_node(1, dir, db.clone(), pinned, events.tx.clone()).await;
    let synced = events.synced(Some(1)).await;
    assert_eq!((synced.slot, synced.bank_hash), (m.slot, m.bank_hash));
    assert_eq!(state_id(&db), (Some(m.slot), m.bank_hash));
    drop((node, strict_node));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_mirror_behind_a_private_ca_is_used_with_its_bundle_and_named_without() {
    init_tracing();
    let (_node, snap, www) = published(1024, 36);
    let ca = PrivateCa::new();
    let server = WebServer::start_tls(www.path().to_path_buf(), ca.server.clone()).await;
    let url = server.url();
    assert!(url.starts_with("https://"), "{url}");
    // Without the bundle, the server's certificate is refused: the error names the URL and the
    // certificate problem.
    let plain = WebSource::new(&url).unwrap();
    let err = plain.index(Duration::from_secs(10)).await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains(&url), "{text}");
    assert!(text.contains("certificate"), "{text}");
    assert!(text.contains("UnknownIssuer"), "{text}");
    // A bundle that cannot be read is an error naming it, when the node is built.
    let pems = tempfile::tempdir().unwrap();
    let missing = pems.path().join("missing-ca.pem");
    let (dir, db) = node_dir(0, 0, 0);
    let cfg = test_config(dir.path()).with_web_ca_files(vec![missing.clone()]);
    let keypair = snapsync::libp2p::identity::Keypair::generate_ed25519();
    let state: Arc<dyn snapsync::db::StateDb> = Arc::new(db);
    let err = snapsync::Behaviour::new(&keypair, state, cfg)
        .unwrap_err()
        .to_string();
    assert!(err.contains("web_ca_files"), "{err}");
    assert!(err.contains("missing-ca.pem"), "{err}");
    // With the private CA's bundle, a pinned node syncs from the mirror alone.
    let bundle = pems.path().join("company-ca.pem");
    std::fs::write(&bundle, &ca.ca_pem).unwrap();
    let roots = WebRoots::new(std::slice::from_ref(&bundle)).unwrap();
    let listed = WebSource::with_roots(&url, &roots)
        .unwrap()
        .index(Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    let mut events = Events::new();
    let (dir, db) = node_dir(0, 0, 0);
    let m = snap.manifest();
    let pinned = test_config(dir.path())
        .with_trusted_snapshot(m.slot, m.bank_hash)
        .with_web_sources(vec![url.clone()])
        .with_web_ca_files(vec![bundle]);
    let node = start_node(1, dir, db.clone(), pinned, events.tx.clone()).await;
    let synced = events.synced(Some(1)).await;
    assert_eq!((synced.slot, synced.bank_hash), (m.slot, m.bank_hash));
    assert_eq!(state_id(&db), (Some(m.slot), m.bank_hash));
    assert!(
        server
            .archive_reads
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
    drop(node);
}
