//! Availability against cheap identities, over real sockets and files: no small request
//! freezes a streamer, no peer holds the memory everyone shares, no crash or variant wipes a
//! download's progress.

mod common;

use std::time::Duration;

use common::wire::*;
use common::*;
use snapsync::layers::chunk::ChunkSize;
use snapsync::layers::chunk::ChunkTree;
use snapsync::layers::snapshot::{Manifest, SnapshotStore};
use snapsync::layers::transfer::{DownloadTarget, StreamerConfig};
use snapsync::proto;
use snapsync::{BankHash, ContentRoot};

/// A receive window so small that a response nobody reads holds its memory on the server.
fn small_windows() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.stream_receive_window(16_384u32.into());
    t.receive_window(65_536u32.into());
    t.max_idle_timeout(Some(Duration::from_secs(30).try_into().unwrap()));
    t
}

/// Sends `request` (a framed request) on a new stream and reads the response header.
async fn ask(conn: &quinn::Connection, request: &[u8]) -> proto::ResponseHeader {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(request).await.unwrap();
    send.finish().unwrap();
    read(&mut recv).await.unwrap()
}

fn get_manifest(root: ContentRoot) -> Vec<u8> {
    frame(&proto::Request {
        kind: Some(proto::request::Kind::Manifest(proto::GetManifest {
            content_root: root.0.to_vec().into(),
        })),
    })
}

/// A node whose store holds a published snapshot declared `size` bytes in chunks of 1 KiB:
/// its archive and outboard are sparse files of the sizes the manifest says (nothing is
/// served from them here, only asked about).
fn huge(size: u64) -> (Node, Manifest) {
    let node = Node::new();
    let chunk = ChunkSize::new(1024).unwrap();
    let root = ContentRoot([0x5a; 32]);
    let tree = ChunkTree::new(size, chunk, root);
    let m = Manifest {
        format_version: snapsync::layers::snapshot::FORMAT_VERSION,
        slot: 1,
        bank_hash: BankHash([0; 32]),
        content_root: root,
        archive_size: size,
        chunk_size: chunk,
        created_unix_ms: 0,
        entry_count: 0,
        state_bytes: size,
        zstd_level: 1,
        kind: snapsync::layers::snapshot::SnapshotKind::Full,
        base: None,
        zstd_version: 0,
    };
    let dir = node
        .store
        .dir()
        .join(format!("full-{:020}-{}", m.slot, &root.to_hex()[..16]));
    std::fs::create_dir_all(&dir).unwrap();
    let sparse = |name: &str, len: u64| {
        std::fs::File::create(dir.join(name))
            .unwrap()
            .set_len(len)
            .unwrap();
    };
    sparse(snapsync::layers::snapshot::ARCHIVE_FILE, size);
    sparse(
        snapsync::layers::snapshot::OUTBOARD_FILE,
        tree.outboard_size(),
    );
    std::fs::write(
        dir.join(snapsync::layers::snapshot::MANIFEST_FILE),
        m.encode(),
    )
    .unwrap();
    let store = SnapshotStore::open(node.store.dir()).unwrap();
    (Node { store, ..node }, m)
}

/// A request for every chunk of a snapshot declared 1 TiB (2^30 chunks of 1 KiB) is refused
/// for its size before anything proportional to it is done, and the streamer's runtime goes
/// on answering meanwhile: walking the range first took tens of seconds of a worker thread
/// shared with the owner's swarm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_for_a_whole_huge_snapshot_is_refused_at_once_and_freezes_nothing() {
    init_tracing();
    let (server, m) = huge(1 << 40);
    let streamer = serve(&server, StreamerConfig::default());
    let client = RawClient::new();
    let conn = client.hello(server.peer_id(), streamer.local_addr()).await;
    let chunks = m.archive_size / 1024;
    // Several at once, as an attacker would send them.
    let mut asks = Vec::new();
    for _ in 0..4 {
        let conn = conn.clone();
        let request = get_chunks(m.content_root, 0, chunks, 1024);
        asks.push(tokio::spawn(async move { ask(&conn, &request).await }));
    }
    // Meanwhile another client is answered: the runtime is not busy walking ranges.
    let other = RawClient::new();
    let conn2 = other.hello(server.peer_id(), streamer.local_addr()).await;
    let header = tokio::time::timeout(
        Duration::from_secs(5),
        ask(&conn2, &get_manifest(m.content_root)),
    )
    .await
    .expect("the streamer answered nobody while the huge requests were checked");
    assert_eq!(header.status, proto::Status::Ok as i32);
    for a in asks {
        let header = tokio::time::timeout(Duration::from_secs(5), a)
            .await
            .expect("refused at once")
            .unwrap();
        assert_eq!(header.status, proto::Status::TooLarge as i32, "{header:?}");
    }
}

/// One PeerId with four connections (the most a peer may have), asking on each for many
/// ranges and reading nothing, cannot hold the response memory every peer shares: an honest
/// downloader on another address, asking at the same time, is served, not told the server is
/// busy. (Small send buffers, as a server with many connections has: a response waits in its
/// memory until the client takes it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_peer_with_four_slow_connections_cannot_hold_the_response_memory() {
    init_tracing();
    let (server, snap) = Node::with_snapshot(9 * 1024, 50, 41);
    let m = snap.manifest();
    // 16 MiB shared by 4 upload slots: one peer holds at most 4 MiB of responses of 1 MiB.
    let streamer = serve(
        &server,
        StreamerConfig::default()
            .with_write_timeout(Duration::from_secs(30))
            .with_request_timeout(Duration::from_secs(3))
            .with_max_request_bytes(1 << 20)
            .with_response_memory(16 << 20)
            .with_send_memory(1 << 20),
    );
    let chunk = m.chunk_size.bytes();
    let per_request = (1u64 << 20) / u64::from(chunk) - 1;
    let chunks = m.archive_size.div_ceil(u64::from(chunk));
    assert!(chunks > per_request, "the snapshot holds a full request");
    // The hog: one identity, four connections, a request of nearly 1 MiB on each every 100 ms
    // (enough for all the memory in a second), none read.
    let hog = RawClient::new();
    let mut held = Vec::new();
    for _ in 0..4 {
        let conn = hog
            .hello_with(server.peer_id(), streamer.local_addr(), small_windows())
            .await;
        held.push(conn);
    }
    let root = m.content_root;
    let conns = held.clone();
    let hog_task = tokio::spawn(async move {
        let mut streams = Vec::new();
        loop {
            for conn in &conns {
                let open = tokio::time::timeout(Duration::from_millis(20), conn.open_bi());
                if let Ok(Ok((mut send, recv))) = open.await {
                    let start = (streams.len() as u64 * 7) % (chunks - per_request);
                    let _ = send
                        .write_all(&get_chunks(root, start, start + per_request, chunk))
                        .await;
                    let _ = send.finish();
                    streams.push((send, recv));
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // An honest client on another address asks for half a MiB, and is served.
    let endpoint = quinn::Endpoint::client("127.0.0.2:0".parse().unwrap()).unwrap();
    let honest = RawClient::with_endpoint(endpoint);
    let conn = honest.hello(server.peer_id(), streamer.local_addr()).await;
    let want = (512u64 << 10) / u64::from(chunk);
    let header = ask(&conn, &get_chunks(m.content_root, 0, want, chunk)).await;
    assert_eq!(
        header.status,
        proto::Status::Ok as i32,
        "the honest client was refused: {}",
        header.message
    );
    hog_task.abort();
}

/// A complete download whose node was killed between moving the archive into place and
/// publishing it is recognised when the download opens again: nothing is fetched again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_download_left_unpublished_by_a_crash_is_taken_as_it_is() {
    init_tracing();
    let (server, snap) = Node::with_snapshot(1024, 50, 43);
    let streamer = serve(&server, StreamerConfig::default());
    let client = Node::new();
    // What the crash left: the whole verified archive and outboard in the partial directory.
    let partial = client.store.dir().join(format!(
        ".partial-{}-{}",
        snap.manifest().content_root.to_hex(),
        snap.manifest().archive_size
    ));
    std::fs::create_dir_all(&partial).unwrap();
    std::fs::copy(
        snap.archive_path(),
        partial.join(snapsync::layers::snapshot::ARCHIVE_FILE),
    )
    .unwrap();
    std::fs::copy(
        snap.outboard_path(),
        partial.join(snapsync::layers::snapshot::OUTBOARD_FILE),
    )
    .unwrap();
    let got = fetch_from(&client, fast(), snap.manifest(), &server, &streamer)
        .await
        .unwrap();
    assert_exact(&got, &snap, &client);
    assert_eq!(
        streamer.stats().bytes_served,
        0,
        "the archive was fetched again"
    );
}

/// A download of a snapshot in chunks of one size, cut part way, resumes when the same
/// snapshot (the same root and size) is chosen again in chunks of another size: the bytes it
/// verified are the same bytes. Keyed by the root alone, the first progress was deleted and
/// its archive truncated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_survives_a_variant_of_the_snapshot_in_other_chunks() {
    init_tracing();
    let (server, snap) = Node::with_snapshot(4096, 50, 47);
    let m16 = snap.manifest().clone();
    // The same archive served in 64 KiB chunks: another store, the same bytes.
    let wide = Node::new();
    let chunk64 = ChunkSize::new(64 << 10).unwrap();
    let dir = wide.store.dir().join(snap.dir().file_name().unwrap());
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        snap.archive_path(),
        dir.join(snapsync::layers::snapshot::ARCHIVE_FILE),
    )
    .unwrap();
    let (root, size) = snapsync::layers::chunk::write_outboard(
        &dir.join(snapsync::layers::snapshot::ARCHIVE_FILE),
        chunk64,
        &dir.join(snapsync::layers::snapshot::OUTBOARD_FILE),
    )
    .unwrap();
    assert_eq!((root, size), (m16.content_root, m16.archive_size));
    let mut m64 = m16.clone();
    m64.chunk_size = chunk64;
    std::fs::write(
        dir.join(snapsync::layers::snapshot::MANIFEST_FILE),
        m64.encode(),
    )
    .unwrap();
    let wide = Node {
        store: SnapshotStore::open(wide.store.dir()).unwrap(),
        ..wide
    };
    let capped = StreamerConfig::default().with_rate_limit(Some(2_000_000));
    let (narrow_streamer, wide_streamer) = (serve(&server, capped), serve(&wide, capped));
    // A third of it in 16 KiB chunks, then the download stops.
    let client = Node::new();
    let mut handle = downloader(&client, fast()).start(
        DownloadTarget::from_manifest(&m16),
        vec![peer(&server, &narrow_streamer)],
    );
    let mut progress = handle.progress();
    tokio::time::timeout(Duration::from_secs(60), async {
        while progress.borrow_and_update().done_bytes < m16.archive_size / 3 {
            progress.changed().await.unwrap();
        }
    })
    .await
    .unwrap();
    handle.cancel();
    let _ = handle.wait().await;
    // The same snapshot in 64 KiB chunks: what is on disk counts.
    let got = downloader(&client, fast())
        .download(
            DownloadTarget::from_manifest(&m64),
            vec![peer(&wide, &wide_streamer)],
        )
        .await
        .unwrap();
    assert!(
        got.resumed_bytes >= m16.archive_size / 4,
        "resumed {} of {}",
        got.resumed_bytes,
        m16.archive_size
    );
    assert_eq!(
        std::fs::read(got.snapshot.archive_path()).unwrap(),
        std::fs::read(snap.archive_path()).unwrap()
    );
}

/// A response the server gives up on (its client took too long to read) ends in a reset of
/// the stream and the close of the connection, never in a clean end of stream: a client must
/// not take a response cut short as whole, find it wrong and blame an honest server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_given_up_on_never_ends_cleanly() {
    init_tracing();
    let (server, snap) = Node::with_snapshot(4 * 1024, 50, 45);
    let m = snap.manifest();
    let streamer = serve(
        &server,
        StreamerConfig::default().with_write_timeout(Duration::from_secs(1)),
    );
    let client = RawClient::new();
    let conn = client
        .hello_with(server.peer_id(), streamer.local_addr(), small_windows())
        .await;
    let chunk = m.chunk_size.bytes();
    let chunks = ((2u64 << 20) / u64::from(chunk)).min(m.archive_size / u64::from(chunk));
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&get_chunks(m.content_root, 0, chunks, chunk))
        .await
        .unwrap();
    send.finish().unwrap();
    // Nothing read for longer than the server waits for a write to go out.
    tokio::time::sleep(Duration::from_secs(3)).await;
    use quinn::{ReadError, ReadToEndError};
    match recv.read_to_end(64 << 20).await {
        Err(ReadToEndError::Read(ReadError::Reset(_) | ReadError::ConnectionLost(_))) => {}
        other => panic!(
            "the response ended otherwise than cut: {:?}",
            other.map(|bytes| format!("a clean end after {} bytes", bytes.len()))
        ),
    }
}
