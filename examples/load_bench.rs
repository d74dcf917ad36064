//! One streamer under load: 32 downloaders at once over real sockets, each from its own
//! loopback address (127.0.0.2, 127.0.0.3, ...) with its own endpoint and store, beside one
//! downloader alone in the same run.
//!
//! ```text
//! cargo run --release --example load_bench [-- --clients 32 --mib 32]
//! ```
//!
//! It reports the aggregate rate against the lone client's, every client's share while all are
//! active (its rate over the window from the moment the last one received its first byte until
//! the first one finished, as a ratio to the mean), and the streamer's peak RSS (it runs as its
//! own process; the parent reads its `VmHWM`). Every download must complete exactly. The last line printed is one JSON object.

#[path = "support/mod.rs"]
mod support;

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use libp2p::identity::Keypair;
use snapsync::Metrics;
use snapsync::snapshot::{Manifest, SnapshotStore};
use snapsync::transfer::{
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

/// What one round measured.
struct Round {
    secs: f64,
    /// Each client's rate over the window when all were active, bytes per second.
    shares: Vec<f64>,
    window_secs: f64,
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
    // The window: from the last client's first byte to the first client's last.
    let from = samples
        .iter()
        .position(|(_, d)| d.iter().all(|&b| b > 0))
        .expect("every client received something");
    let to = samples
        .iter()
        .rposition(|(_, d)| d.iter().all(|&b| b < m.archive_size))
        .unwrap_or(from);
    let (t0, d0) = &samples[from];
    let (t1, d1) = &samples[to.max(from)];
    let window_secs = t1 - t0;
    let shares = d0
        .iter()
        .zip(d1)
        .map(|(a, b)| (b - a) as f64 / window_secs.max(1e-9))
        .collect();
    Round {
        secs,
        shares,
        window_secs,
    }
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
    let clients: usize = arg("--clients").map_or(32, |c| c.parse().unwrap());
    let size_mib: u64 = arg("--mib").map_or(32, |m| m.parse().unwrap());
    assert!((1..=250).contains(&clients), "--clients 1..=250");
    let tmp = tempfile::tempdir_in(arg("--dir").unwrap_or_else(|| ".".into())).unwrap();
    let server_store = tmp.path().join("server");
    let m = support::random_snapshot(&server_store, size_mib << 20);
    let store_arg = server_store.to_str().unwrap().to_string();
    let (mut server, lines) = support::start_server(&["--role", "serve", "--store", &store_arg], 1);
    let peer = PeerAddr {
        peer_id: support::text(&lines[0], "peer_id").parse().unwrap(),
        addr: support::text(&lines[0], "addr").parse().unwrap(),
    };
    let rss_idle = peak_rss_mib(server.id());

    support::quiesce();
    let alone = rt.block_on(round(tmp.path(), 1, peer, &m));
    support::quiesce();
    let all = rt.block_on(round(tmp.path(), clients, peer, &m));
    let server_peak = peak_rss_mib(server.id());
    drop(server.stdin.take());
    let _ = server.wait();

    let alone_rate = mib(m.archive_size) / alone.secs;
    let aggregate = mib(m.archive_size * clients as u64) / all.secs;
    let mean = all.shares.iter().sum::<f64>() / all.shares.len() as f64;
    let ratios: Vec<f64> = all.shares.iter().map(|s| s / mean).collect();
    let min = ratios.iter().copied().fold(f64::INFINITY, f64::min);
    let max = ratios.iter().copied().fold(0.0, f64::max);
    let within = ratios.iter().filter(|r| (0.75..=1.25).contains(*r)).count();
    println!(
        "{clients} clients x {:.0} MiB from one streamer: all complete and exact",
        mib(m.archive_size)
    );
    println!(
        "one client alone:   {:.2} s, {alone_rate:.0} MiB/s",
        alone.secs
    );
    println!(
        "{clients} clients at once: {:.2} s, {aggregate:.0} MiB/s in all, {:.1} MiB/s mean share",
        all.secs,
        mib(mean as u64)
    );
    println!(
        "shares while all active ({:.2} s window): min {min:.2}x, max {max:.2}x of the mean; {within} of {clients} within +-25%",
        all.window_secs
    );
    println!("streamer peak RSS: {server_peak:.0} MiB ({rss_idle:.0} MiB idle)");
    println!(
        "{{\"clients\":{clients},\"archive_mib\":{:.1},\"alone_mibs\":{alone_rate:.1},\"aggregate_mibs\":{aggregate:.1},\"all_secs\":{:.3},\"window_secs\":{:.3},\"share_min\":{min:.3},\"share_max\":{max:.3},\"within_25pct\":{within},\"server_peak_rss_mib\":{server_peak:.1},\"server_idle_rss_mib\":{rss_idle:.1}}}",
        mib(m.archive_size),
        all.secs,
        all.window_secs
    );
}
