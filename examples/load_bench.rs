//! One streamer under load: 32 downloaders at once over real sockets, each from its own
//! loopback address (127.0.0.2, 127.0.0.3, ...) with its own endpoint and store, beside one
//! downloader alone in the same run.
//!
//! ```text
//! cargo run --release --example load_bench [-- --clients 32 --mib 32]
//! ```
//!
//! It reports the aggregate rate against the lone client's, when the clients finished (the
//! streamer uploads to `max_uploads` peers at a time and the others take their turns in the
//! order they asked, so finishing times spread evenly from the first turn to the last), and
//! the streamer's peak RSS (it runs as its own process; the parent reads its `VmHWM`). Every
//! download must complete exactly.
//!
//! Cases of attack follow. **Held slots**: 64 connections under fresh identities, from
//! four more addresses, prove the token (none is set), keep themselves alive and never ask for
//! anything, or ask and never read; then an honest downloader, allowed one failure, must be
//! served at its first try. **Crafted archive**: a loader (its own process) reads an archive
//! whose first record is 64 MiB of random bytes and whose next 32 are 64 MiB each of one
//! repeated byte in zstd RLE blocks (about a kilobyte each on the wire), declared as holding
//! one record: the decoding threads race ahead while the first is written; the loader's peak
//! memory is reported against its decode budget. **A request for a whole huge snapshot**: the
//! streamer also holds a snapshot declared 64 GiB (sparse files); 2000 requests for every one
//! of its chunks are refused for their size, and the server's CPU per request (from
//! `/proc/PID/stat`) is printed beside that of 2000 requests for one chunk of the small
//! snapshot, served. **One identity, four slow connections**: one PeerId asks on each of four
//! connections for the largest range a request may name, every quarter second, and reads
//! nothing, while an honest downloader fetches the whole small snapshot; its time is printed
//! beside the lone client's. The last line printed is one JSON object.

#[path = "support/mod.rs"]
mod support;

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use libp2p::identity::Keypair;
use snapsync::Metrics;
use snapsync::layers::snapshot::{Manifest, SnapshotStore};
use snapsync::layers::transfer::{
    DownloadConfig, DownloadTarget, Downloader, PeerAddr, Streamer, StreamerConfig,
};
use support::{arg, mib};

/// The streamer's role: serves `--store` until its stdin closes.
async fn serve(store: &Path) {
    let keypair = Keypair::generate_ed25519();
    let config = StreamerConfig::default().with_listen("127.0.0.1:0".parse().unwrap());
    let s = Streamer::bind(
        &keypair,
        SnapshotStore::open(store).unwrap(),
        config,
        None,
        Metrics::new(),
    )
    .unwrap();
    println!(
        "{{\"peer_id\":\"{}\",\"addr\":\"{}\"}}",
        keypair.public().to_peer_id(),
        s.local_addr()
    );
    std::io::stdout().flush().unwrap();
    tokio::task::spawn_blocking(|| std::io::copy(&mut std::io::stdin(), &mut std::io::sink()))
        .await
        .unwrap()
        .unwrap();
    // The parent reads this process's peak memory from /proc before closing the pipe.
    drop(s);
}

/// The crafted-archive role: loads `--archive` (described by `--manifest`) into a fresh DB
/// and reports how it ended.
fn load_crafted(archive: &Path, manifest: &Path, db: &Path) {
    let m = Manifest::decode(&std::fs::read(manifest).unwrap()).unwrap();
    let db = snapsync::db::LmdbState::open(db).unwrap();
    let err = snapsync::layers::snapshot::load_snapshot(&db, archive, &m).unwrap_err();
    println!("{{\"error\":\"{}\"}}", err.to_string().replace('"', "'"));
    std::io::stdout().flush().unwrap();
    std::io::copy(&mut std::io::stdin(), &mut std::io::sink()).unwrap();
}

/// A zstd frame of one record: a 4-byte key and `value`, or `len` copies of one byte in RLE
/// blocks when `value` is `None`.
fn record_frame(key: &[u8; 4], value: Option<&[u8]>, len: usize) -> Vec<u8> {
    let mut head = Vec::new();
    head.extend_from_slice(&4u32.to_le_bytes());
    head.extend_from_slice(key);
    head.extend_from_slice(&(len as u32).to_le_bytes());
    let mut f = vec![0x28, 0xB5, 0x2F, 0xFD, 0xE0];
    f.extend_from_slice(&((head.len() + len) as u64).to_le_bytes());
    let block = |f: &mut Vec<u8>, last: bool, kind: u32, size: usize| {
        let h = u32::from(last) | kind << 1 | (size as u32) << 3;
        f.extend_from_slice(&h.to_le_bytes()[..3]);
    };
    block(&mut f, false, 0, head.len());
    f.extend_from_slice(&head);
    let mut at = 0;
    while at < len {
        let n = (len - at).min(128 << 10);
        let last = at + n == len;
        match value {
            Some(v) => {
                block(&mut f, last, 0, n);
                f.extend_from_slice(&v[at..at + n]);
            }
            None => {
                block(&mut f, last, 1, n);
                f.push(b'x');
            }
        }
        at += n;
    }
    f
}

/// Writes the crafted archive and its manifest into `dir`; returns their paths.
fn craft(dir: &Path) -> (PathBuf, PathBuf) {
    const VALUE: usize = 64 << 20;
    let mut archive = Vec::new();
    // The header frame (docs/FORMAT.md section 2): a full archive at slot 1, in one raw block.
    let mut header = b"SNAPSYNC".to_vec();
    header.extend_from_slice(&2u32.to_le_bytes());
    header.push(0);
    header.extend_from_slice(&1u64.to_le_bytes());
    header.extend_from_slice(&1u64.to_le_bytes());
    header.extend_from_slice(&[0; 32]);
    archive.extend_from_slice(&[0x28, 0xB5, 0x2F, 0xFD, 0x20, header.len() as u8]);
    archive.extend_from_slice(&(1 | (header.len() as u32) << 3).to_le_bytes()[..3]);
    archive.extend_from_slice(&header);
    let mut random = vec![0u8; VALUE];
    blake3::Hasher::new()
        .update(b"slow")
        .finalize_xof()
        .fill(&mut random);
    archive.extend(record_frame(b"k001", Some(&random), VALUE));
    for i in 2..34u32 {
        let key = format!("k{i:03}");
        archive.extend(record_frame(
            key.as_bytes().try_into().unwrap(),
            None,
            VALUE,
        ));
    }
    let path = dir.join("crafted.zst");
    std::fs::write(&path, &archive).unwrap();
    let root = snapsync::ContentRoot::from(blake3::hash(&archive));
    let m = Manifest {
        format_version: snapsync::layers::snapshot::FORMAT_VERSION,
        slot: 1,
        bank_hash: snapsync::BankHash([0; 32]),
        content_root: root,
        archive_size: archive.len() as u64,
        chunk_size: snapsync::layers::chunk::ChunkSize::DEFAULT,
        created_unix_ms: 0,
        entry_count: 1,
        state_bytes: 34 * VALUE as u64,
        zstd_level: 1,
        kind: snapsync::layers::snapshot::SnapshotKind::Full,
        base: None,
        zstd_version: 0,
    };
    let manifest = dir.join("crafted.pb");
    std::fs::write(&manifest, m.encode()).unwrap();
    (path, manifest)
}

/// A connection under `keypair` that proves the token (none is set) and is let in.
async fn connect_raw(
    endpoint: &quinn::Endpoint,
    peer: PeerAddr,
    keypair: &Keypair,
    transport: quinn::TransportConfig,
) -> quinn::Connection {
    let mut tls = libp2p_tls::make_client_config(keypair, Some(peer.peer_id)).unwrap();
    tls.alpn_protocols = vec![b"snapsync/chunks/2".to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut config = quinn::ClientConfig::new(std::sync::Arc::new(crypto));
    config.transport_config(std::sync::Arc::new(transport));
    let conn = endpoint
        .connect_with(config, peer.addr, "snapsync")
        .unwrap()
        .await
        .unwrap();
    let hello = snapsync::proto::Hello {
        protocol_version: 2,
        proof: Default::default(),
    };
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&frame(&hello)).await.unwrap();
    send.finish().unwrap();
    let mut len = [0u8; 4];
    recv.read_exact(&mut len).await.unwrap();
    conn
}

/// A connection that proves the token (none is set) under a fresh identity and then holds its
/// slot: keeps itself alive, asks for nothing.
async fn hold_slot(endpoint: &quinn::Endpoint, peer: PeerAddr) -> quinn::Connection {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(1)));
    connect_raw(endpoint, peer, &Keypair::generate_ed25519(), t).await
}

/// `msg` with its length in front, as the chunk stream frames it.
fn frame(msg: &impl prost::Message) -> Vec<u8> {
    let mut out = (msg.encoded_len() as u32).to_be_bytes().to_vec();
    msg.encode(&mut out).unwrap();
    out
}

/// A request for chunks `start..end` of `m`'s snapshot.
fn get_chunks(m: &Manifest, start: u64, end: u64) -> Vec<u8> {
    use snapsync::proto::{GetChunks, Request, request::Kind};
    frame(&Request {
        kind: Some(Kind::Chunks(GetChunks {
            content_root: m.content_root.0.to_vec().into(),
            start_chunk: start,
            end_chunk: end,
            chunk_size: m.chunk_size.bytes(),
        })),
    })
}

/// Sends `request` on a new stream and reads the whole answer: its status and its length.
async fn ask(conn: &quinn::Connection, request: &[u8]) -> (i32, usize) {
    use prost::Message;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(request).await.unwrap();
    send.finish().unwrap();
    let answer = recv.read_to_end(64 << 20).await.unwrap_or_default();
    let status = answer
        .get(..4)
        .map(|l| u32::from_be_bytes(l.try_into().unwrap()) as usize)
        .and_then(|l| answer.get(4..4 + l))
        .and_then(|h| snapsync::proto::ResponseHeader::decode(h).ok())
        .map_or(-1, |h| h.status);
    (status, answer.len())
}

/// CPU seconds (user and system, every thread) process `pid` has used (Linux counts them in
/// hundredths of a second).
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name: state is the first, utime the 12th, stime the 13th.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (ticks(11) + ticks(12)) as f64 / 100.0
}

/// Has the server answer `requests` copies of `request` (50 to a connection, each under a
/// fresh identity, as one after another an attacker would send them): the server's CPU
/// seconds per request, the client's mean seconds per answer, and the statuses seen.
async fn cpu_per_request(
    server: u32,
    peer: PeerAddr,
    request: &[u8],
    requests: usize,
) -> (f64, f64, Vec<i32>) {
    let endpoint = quinn::Endpoint::client("127.0.1.30:0".parse().unwrap()).unwrap();
    let mut statuses = Vec::new();
    let cpu = cpu_secs(server);
    let started = Instant::now();
    for _ in 0..requests.div_ceil(50) {
        let key = Keypair::generate_ed25519();
        let conn = connect_raw(&endpoint, peer, &key, quinn::TransportConfig::default()).await;
        for _ in 0..50 {
            let (status, _) = ask(&conn, request).await;
            if !statuses.contains(&status) {
                statuses.push(status);
            }
        }
        conn.close(0u32.into(), b"done");
    }
    let n = (requests.div_ceil(50) * 50) as f64;
    let wall = started.elapsed().as_secs_f64() / n;
    endpoint.wait_idle().await;
    ((cpu_secs(server) - cpu) / n, wall, statuses)
}

/// Writes into `store` a published snapshot declared `size` bytes: its archive and outboard
/// are sparse files of the sizes its manifest says (it is only asked about, never read).
fn huge(store: &Path, size: u64) -> Manifest {
    let chunk = snapsync::layers::chunk::ChunkSize::DEFAULT;
    let root = snapsync::ContentRoot([0x5a; 32]);
    let tree = snapsync::layers::chunk::ChunkTree::new(size, chunk, root);
    let m = Manifest {
        format_version: snapsync::layers::snapshot::FORMAT_VERSION,
        slot: 1,
        bank_hash: snapsync::BankHash([0; 32]),
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
    let dir = store.join(format!("full-{:020}-{}", m.slot, &root.to_hex()[..16]));
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
    m
}

/// One identity with four connections (the most a peer may have) from one address asks, on
/// each, for the largest range a request may name every quarter second and reads nothing,
/// while an honest downloader fetches the whole snapshot: whether it got it, and in how long.
async fn hog_and_honest(dir: &Path, peer: PeerAddr, m: &Manifest) -> (bool, f64) {
    let endpoint = quinn::Endpoint::client("127.0.1.40:0".parse().unwrap()).unwrap();
    let hog = Keypair::generate_ed25519();
    let mut conns = Vec::new();
    for _ in 0..4 {
        let mut t = quinn::TransportConfig::default();
        t.stream_receive_window(16_384u32.into());
        t.receive_window(65_536u32.into());
        conns.push(connect_raw(&endpoint, peer, &hog, t).await);
    }
    let most = StreamerConfig::default().max_request_bytes() / u64::from(m.chunk_size.bytes());
    let request = get_chunks(
        m,
        0,
        most.min(m.archive_size.div_ceil(m.chunk_size.bytes().into())),
    );
    let hogging = tokio::spawn(async move {
        let mut streams = Vec::new();
        loop {
            for conn in &conns {
                let open = tokio::time::timeout(Duration::from_millis(50), conn.open_bi());
                if let Ok(Ok((mut send, recv))) = open.await {
                    let _ = send.write_all(&request).await;
                    let _ = send.finish();
                    streams.push((send, recv));
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let store = dir.join("hog-client");
    let d = Downloader::new(
        Keypair::generate_ed25519(),
        SnapshotStore::open(&store).unwrap(),
        DownloadConfig::default().with_bind("127.0.1.41:0".parse().unwrap()),
        None,
        Metrics::new(),
    )
    .unwrap();
    let started = Instant::now();
    let got = d
        .download(DownloadTarget::from_manifest(m), vec![peer])
        .await;
    let secs = started.elapsed().as_secs_f64();
    hogging.abort();
    let _ = std::fs::remove_dir_all(&store);
    (got.is_ok(), secs)
}

/// Holds every connection slot of the streamer, then has an honest downloader (allowed one
/// failure) fetch: whether it was served at its first try, and in how long.
async fn held_slots(dir: &Path, peer: PeerAddr, m: &Manifest) -> (bool, f64, usize) {
    let mut held = Vec::new();
    for host in 0..4u8 {
        let bind: SocketAddr = format!("127.0.1.{}:0", 2 + host).parse().unwrap();
        let endpoint = quinn::Endpoint::client(bind).unwrap();
        for _ in 0..16 {
            held.push(hold_slot(&endpoint, peer).await);
        }
    }
    // Past the grace a connection is given before it can be judged.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let store = dir.join("held-slots-client");
    let d = Downloader::new(
        Keypair::generate_ed25519(),
        SnapshotStore::open(&store).unwrap(),
        DownloadConfig::default()
            .with_bind("127.0.1.10:0".parse().unwrap())
            .with_max_peer_failures(1),
        None,
        Metrics::new(),
    )
    .unwrap();
    let started = Instant::now();
    let got = d
        .download(DownloadTarget::from_manifest(m), vec![peer])
        .await;
    let secs = started.elapsed().as_secs_f64();
    let closed = held.iter().filter(|c| c.close_reason().is_some()).count();
    let _ = std::fs::remove_dir_all(&store);
    (got.is_ok(), secs, closed)
}

/// What one round measured.
struct Round {
    secs: f64,
    /// When each client finished, seconds from the start, in order.
    finished: Vec<f64>,
}

/// Downloads the snapshot into `clients` fresh stores at once, sampling progress.
async fn round(dir: &Path, clients: usize, peer: PeerAddr, m: &Manifest) -> Round {
    let mut handles = Vec::new();
    let mut downloaders = Vec::new();
    for i in 0..clients {
        let bind: SocketAddr = format!("127.0.0.{}:0", 2 + i).parse().unwrap();
        let store = dir.join(format!("client-{clients}-{i}"));
        let d = Downloader::new(
            Keypair::generate_ed25519(),
            SnapshotStore::open(&store).unwrap(),
            DownloadConfig::default().with_bind(bind),
            None,
            Metrics::new(),
        )
        .unwrap();
        downloaders.push((d, store));
    }
    let started = Instant::now();
    for (d, _) in &downloaders {
        handles.push(Some(d.start(DownloadTarget::from_manifest(m), vec![peer])));
    }
    let progress: Vec<_> = handles
        .iter()
        .map(|h| h.as_ref().unwrap().progress())
        .collect();
    // (time, verified bytes of each client), every 100 ms until all finished.
    let mut samples: Vec<(f64, Vec<u64>)> = Vec::new();
    loop {
        let now = started.elapsed().as_secs_f64();
        let done: Vec<u64> = progress.iter().map(|p| p.borrow().done_bytes).collect();
        let all_done = done.iter().all(|&d| d == m.archive_size);
        samples.push((now, done));
        if all_done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for h in handles.iter_mut() {
        let got = h.take().unwrap().await.unwrap();
        assert_eq!(got.fetched_bytes, m.archive_size);
        assert_eq!(got.snapshot.manifest().content_root, m.content_root);
        let on_disk = std::fs::metadata(got.snapshot.archive_path())
            .unwrap()
            .len();
        assert_eq!(on_disk, m.archive_size, "archive size on disk");
    }
    let secs = started.elapsed().as_secs_f64();
    for (_, store) in &downloaders {
        let _ = std::fs::remove_dir_all(store);
    }
    // When each client's last byte was seen (to the sampling's 100 ms).
    let mut finished: Vec<f64> = (0..clients)
        .map(|i| {
            samples
                .iter()
                .find(|(_, d)| d[i] == m.archive_size)
                .map_or(secs, |(t, _)| *t)
        })
        .collect();
    finished.sort_by(f64::total_cmp);
    Round { secs, finished }
}

/// Peak RSS of process `pid`, MiB (Linux).
fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    if arg("--role").as_deref() == Some("serve") {
        rt.block_on(serve(&PathBuf::from(arg("--store").unwrap())));
        return;
    }
    if arg("--role").as_deref() == Some("load") {
        let path = |name: &str| PathBuf::from(arg(name).unwrap());
        load_crafted(&path("--archive"), &path("--manifest"), &path("--db"));
        return;
    }
    let clients: usize = arg("--clients").map_or(32, |c| c.parse().unwrap());
    let size_mib: u64 = arg("--mib").map_or(32, |m| m.parse().unwrap());
    assert!((1..=250).contains(&clients), "--clients 1..=250");
    let tmp = tempfile::tempdir_in(arg("--dir").unwrap_or_else(|| ".".into())).unwrap();
    let serving = measure_serving(&rt, tmp.path(), clients, size_mib);
    let crafted = measure_crafted(tmp.path());
    report(clients, &serving, &crafted);
}

/// What one streamer process did under the scenarios.
struct Serving {
    m: snapsync::layers::snapshot::Manifest,
    big: snapsync::layers::snapshot::Manifest,
    alone: Round,
    all: Round,
    rss_idle: f64,
    server_peak: f64,
    first_try: bool,
    held_secs: f64,
    evicted: usize,
    huge_cpu: f64,
    huge_wall: f64,
    one_cpu: f64,
    one_wall: f64,
    hog_ok: bool,
    hog_secs: f64,
}

/// Serves a snapshot of `size_mib` MiB (and a 64 GiB one) from a streamer process, and runs the
/// scenarios against it: one client, `clients` at once, held slots, oversized requests, a hog.
fn measure_serving(
    rt: &tokio::runtime::Runtime,
    dir: &std::path::Path,
    clients: usize,
    size_mib: u64,
) -> Serving {
    let server_store = dir.join("server");
    let m = support::random_snapshot(&server_store, size_mib << 20);
    let big = huge(&server_store, 64 << 30);
    let store_arg = server_store.to_str().unwrap().to_string();
    let (mut server, lines) = support::start_server(&["--role", "serve", "--store", &store_arg], 1);
    let peer = PeerAddr {
        peer_id: support::text(&lines[0], "peer_id").parse().unwrap(),
        addr: support::text(&lines[0], "addr").parse().unwrap(),
    };
    let rss_idle = peak_rss_mib(server.id());

    support::quiesce();
    let alone = rt.block_on(round(dir, 1, peer, &m));
    support::quiesce();
    let all = rt.block_on(round(dir, clients, peer, &m));
    let server_peak = peak_rss_mib(server.id());
    support::quiesce();
    let (first_try, held_secs, evicted) = rt.block_on(held_slots(dir, peer, &m));
    support::quiesce();
    // Every chunk of the 64 GiB snapshot in one request, against one chunk of the small one.
    let whole = get_chunks(
        &big,
        0,
        big.archive_size.div_ceil(big.chunk_size.bytes().into()),
    );
    let (huge_cpu, huge_wall, huge_statuses) =
        rt.block_on(cpu_per_request(server.id(), peer, &whole, 2000));
    let (one_cpu, one_wall, one_statuses) = rt.block_on(cpu_per_request(
        server.id(),
        peer,
        &get_chunks(&m, 0, 1),
        2000,
    ));
    let too_large = snapsync::proto::Status::TooLarge as i32;
    let ok = snapsync::proto::Status::Ok as i32;
    assert_eq!(huge_statuses, vec![too_large], "the whole-range requests");
    assert_eq!(one_statuses, vec![ok], "the one-chunk requests");
    support::quiesce();
    let (hog_ok, hog_secs) = rt.block_on(hog_and_honest(dir, peer, &m));
    drop(server.stdin.take());
    let _ = server.wait();
    Serving {
        m,
        big,
        alone,
        all,
        rss_idle,
        server_peak,
        first_try,
        held_secs,
        evicted,
        huge_cpu,
        huge_wall,
        one_cpu,
        one_wall,
        hog_ok,
        hog_secs,
    }
}

/// The crafted archive, loaded by a process of its own: its peak RSS, the loader's error and
/// the archive's size in KiB.
fn measure_crafted(dir: &std::path::Path) -> (f64, String, u64) {
    let (archive, manifest) = craft(dir);
    let db = dir.join("crafted-db");
    let (mut loader, lines) = support::start_server(
        &[
            "--role",
            "load",
            "--archive",
            archive.to_str().unwrap(),
            "--manifest",
            manifest.to_str().unwrap(),
            "--db",
            db.to_str().unwrap(),
        ],
        1,
    );
    let loader_peak = peak_rss_mib(loader.id());
    drop(loader.stdin.take());
    let _ = loader.wait();
    let kib = std::fs::metadata(&archive).map_or(0, |m| m.len() >> 10);
    (loader_peak, support::text(&lines[0], "error"), kib)
}

/// The figures, and the JSON line.
fn report(clients: usize, s: &Serving, crafted: &(f64, String, u64)) {
    let Serving {
        m,
        big,
        alone,
        all,
        rss_idle,
        server_peak,
        first_try,
        held_secs,
        evicted,
        huge_cpu,
        huge_wall,
        one_cpu,
        one_wall,
        hog_ok,
        hog_secs,
    } = s;
    let (loader_peak, crafted_error, crafted_kib) = crafted;
    let budget_mib = mib(snapsync::layers::snapshot::LoadLimits::default().decode_memory());
    let alone_rate = mib(m.archive_size) / alone.secs;
    let aggregate = mib(m.archive_size * clients as u64) / all.secs;
    let (first, median, last) = (
        all.finished[0],
        all.finished[all.finished.len() / 2],
        all.finished[all.finished.len() - 1],
    );
    let slots = snapsync::layers::transfer::StreamerConfig::default().max_uploads();
    println!(
        "{clients} clients x {:.0} MiB from one streamer: all complete and exact",
        mib(m.archive_size)
    );
    println!(
        "one client alone:   {:.2} s, {alone_rate:.0} MiB/s",
        alone.secs
    );
    println!(
        "{clients} clients at once: {:.2} s, {aggregate:.0} MiB/s in all",
        all.secs
    );
    println!(
        "turns ({slots} upload slots): the first finished at {first:.1} s, the median at {median:.1} s, the last at {last:.1} s"
    );
    println!("streamer peak RSS: {server_peak:.0} MiB ({rss_idle:.0} MiB idle)");
    println!(
        "held slots: 64 idle connections under fresh identities from 4 addresses; an honest downloader allowed one failure was {} in {held_secs:.2} s ({evicted} of the 64 closed to make room)",
        if *first_try {
            "served at its first try"
        } else {
            "NOT served"
        }
    );
    println!(
        "a request for all {} chunks of a {:.0} GiB snapshot: refused (too large) with {:.1} us of server CPU each, {:.0} us to the answer (2000 requests, 50 to a connection); one chunk of the small snapshot, served: {:.1} us of CPU, {:.0} us",
        big.archive_size.div_ceil(big.chunk_size.bytes().into()),
        big.archive_size as f64 / f64::from(1u32 << 30),
        huge_cpu * 1e6,
        huge_wall * 1e6,
        one_cpu * 1e6,
        one_wall * 1e6,
    );
    println!(
        "one identity, four connections asking for 8 MiB each every 250 ms and reading nothing: an honest downloader {} the {:.0} MiB in {hog_secs:.2} s ({:.2} s alone)",
        if *hog_ok { "fetched" } else { "did NOT fetch" },
        mib(m.archive_size),
        alone.secs,
    );
    println!(
        "crafted archive (33 x 64 MiB records, ~{} KiB on the wire, declared as 1 record): the loader stopped with \"{crafted_error}\"; its peak RSS {loader_peak:.0} MiB (decode budget {budget_mib:.0} MiB, plus a frame of 64 MiB being written and one being decoded)",
        crafted_kib
    );
    println!(
        "{{\"clients\":{clients},\"archive_mib\":{:.1},\"alone_mibs\":{alone_rate:.1},\"aggregate_mibs\":{aggregate:.1},\"all_secs\":{:.3},\"upload_slots\":{slots},\"first_done_secs\":{first:.3},\"median_done_secs\":{median:.3},\"last_done_secs\":{last:.3},\"server_peak_rss_mib\":{server_peak:.1},\"server_idle_rss_mib\":{rss_idle:.1},\"held_slots_first_try\":{first_try},\"held_slots_secs\":{held_secs:.3},\"held_slots_evicted\":{evicted},\"crafted_loader_peak_rss_mib\":{loader_peak:.1},\"decode_budget_mib\":{budget_mib:.0},\"huge_request_cpu_us\":{:.2},\"one_chunk_cpu_us\":{:.2},\"hog_honest_ok\":{hog_ok},\"hog_honest_secs\":{hog_secs:.3}}}",
        mib(m.archive_size),
        all.secs,
        huge_cpu * 1e6,
        one_cpu * 1e6,
    );
}
