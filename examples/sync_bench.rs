//! Time to synced on a ~1 GiB state over loopback, each stage beside the others and beside a
//! baseline, all measured in the same run:
//!
//! - (a) **download** alone: the chunk stream from one streamer to disk, every chunk checked;
//! - (b) **load** alone: the downloaded archive into a fresh DB, bank hash recomputed;
//! - (c) **sync**: both at once, as a node does it: the loader imports the verified prefix of
//!   the download as it lands, from "snapshot chosen" to "live DB swapped in";
//! - (d) **baseline**: what "download, then extract" costs without a DB: zstd-decompress the
//!   same archive, BLAKE3 the stream, write it to a file and fsync it.
//!
//! ```text
//! cargo run --release --example sync_bench [-- --mib 1024 --rounds 3 --dir DIR]
//! ```
//!
//! Goals: (c) <= 1.2 x max((a), (b)); (b)'s rate in MiB of state per second >= 0.4 x (d)'s.
//! Each stage runs as its own process, so its CPU time and peak RSS are its own; the streamer
//! runs in the parent. Medians over `--rounds` rounds (peaks over all of them). The last line
//! printed is one JSON object with every figure.

#[path = "support/mod.rs"]
mod support;

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use libp2p::identity::Keypair;
use snapsync::Metrics;
use snapsync::db::{LmdbState, StateDb};
use snapsync::layers::snapshot::{
    CreateOptions, LoadLimits, Manifest, SnapshotStore, create_snapshot, load_chain, load_snapshot,
};
use snapsync::layers::transfer::{
    DownloadConfig, DownloadTarget, Downloader, PeerAddr, Streamer, StreamerConfig,
};
use support::state::{open_db, populate};
use support::{arg, field, local, mib, run_phase, usage};

/// The slot of the snapshot.
const SLOT: u64 = 1_000;

/// Where the create phase leaves a copy of the holder's manifest: the streamer of the main
/// process holds the store itself, so the phases read the copy instead of opening the store.
fn manifest_copy(dir: &Path) -> std::path::PathBuf {
    dir.join("holder-manifest.pb")
}

/// The holder's snapshot.
fn holder_manifest(dir: &Path) -> Manifest {
    Manifest::decode(&std::fs::read(manifest_copy(dir)).unwrap()).unwrap()
}

/// The holder's state and its full snapshot.
fn phase_create(dir: &Path) {
    let holder = dir.join("holder");
    let db = open_db(&holder);
    let store = SnapshotStore::open(holder.join("snapshots")).unwrap();
    let started = Instant::now();
    let view = db.view().unwrap();
    let snap = create_snapshot(&store, view.as_ref(), &CreateOptions::default()).unwrap();
    let m = snap.manifest();
    std::fs::write(manifest_copy(dir), m.encode()).unwrap();
    println!(
        "{{\"secs\":{},\"state_bytes\":{},\"archive_bytes\":{},\"entries\":{}}}",
        started.elapsed().as_secs_f64(),
        m.state_bytes,
        m.archive_size,
        m.entry_count
    );
}

fn downloader(store: &Path) -> Downloader {
    Downloader::new(
        Keypair::generate_ed25519(),
        SnapshotStore::open(store).unwrap(),
        DownloadConfig::default().with_bind(local()),
        None,
        Metrics::new(),
    )
    .unwrap()
}

fn peer_arg() -> PeerAddr {
    PeerAddr {
        peer_id: arg("--peer").expect("--peer").parse().unwrap(),
        addr: arg("--addr").expect("--addr").parse().unwrap(),
    }
}

fn print_stage(started: Instant, before: support::Usage, extra: &str) {
    let secs = started.elapsed().as_secs_f64();
    let after = usage();
    println!(
        "{{\"secs\":{secs},\"cpu\":{},\"peak_rss_mib\":{},\"peak_anon_mib\":{}{extra}}}",
        (after.cpu - before.cpu).as_secs_f64(),
        after.peak_rss_mib,
        after.peak_anon_mib
    );
}

/// (a) The download alone, to `dir/a`.
async fn phase_download(dir: &Path) {
    let m = holder_manifest(dir);
    let d = downloader(&dir.join("a"));
    let before = usage();
    let started = Instant::now();
    let got = d
        .download(DownloadTarget::from_manifest(&m), vec![peer_arg()])
        .await
        .unwrap();
    assert_eq!(got.fetched_bytes, m.archive_size);
    print_stage(started, before, "");
}

/// (b) The load alone: the archive (a) downloaded into a fresh DB.
fn phase_load(dir: &Path) {
    let store = SnapshotStore::open(dir.join("a")).unwrap();
    let snap = store.latest_full().expect("the downloaded snapshot");
    let db = LmdbState::open(dir.join("b-db")).unwrap();
    let before = usage();
    let started = Instant::now();
    let report = load_snapshot(&db, &snap.archive_path(), snap.manifest()).unwrap();
    assert_eq!(report.bank_hash, snap.manifest().bank_hash);
    assert_eq!(db.slot().unwrap(), Some(SLOT));
    print_stage(started, before, "");
}

/// (c) The sync: download into `dir/c` while importing its verified prefix into a fresh DB.
async fn phase_sync(dir: &Path) {
    let m = holder_manifest(dir);
    let d = downloader(&dir.join("c"));
    let db = Arc::new(LmdbState::open(dir.join("c-db")).unwrap());
    let before = usage();
    let started = Instant::now();
    let handle = d.start(DownloadTarget::from_manifest(&m), vec![peer_arg()]);
    let source = handle.source();
    let (load_db, load_m) = (db.clone(), m.clone());
    let load = tokio::task::spawn_blocking(move || {
        load_chain(
            load_db.as_ref(),
            Some((&source, &load_m)),
            None,
            &LoadLimits::default(),
        )
    });
    let got = handle.await.unwrap();
    let download_secs = started.elapsed().as_secs_f64();
    let report = load.await.unwrap().unwrap();
    assert_eq!(report.bank_hash, m.bank_hash);
    assert_eq!(got.fetched_bytes, m.archive_size);
    assert_eq!(db.slot().unwrap(), Some(SLOT));
    print_stage(
        started,
        before,
        &format!(",\"download_done_secs\":{download_secs}"),
    );
}

/// (d) The baseline: decompress the archive, hash the stream, write it to a file, fsync.
fn phase_baseline(dir: &Path) {
    let store = SnapshotStore::open(dir.join("a")).unwrap();
    let snap = store.latest_full().expect("the downloaded snapshot");
    // Warm the page cache, as the download leaves the archive in it.
    std::io::copy(
        &mut File::open(snap.archive_path()).unwrap(),
        &mut std::io::sink(),
    )
    .unwrap();
    let before = usage();
    let started = Instant::now();
    let input = BufReader::new(File::open(snap.archive_path()).unwrap());
    let mut decoder = zstd::stream::read::Decoder::with_buffer(input).unwrap();
    let mut out = File::create(dir.join("baseline.bin")).unwrap();
    let total = support::hash_through(&mut decoder, &mut out);
    out.sync_all().unwrap();
    print_stage(started, before, &format!(",\"bytes\":{total}"));
    drop(out);
    let _ = std::fs::remove_file(dir.join("baseline.bin"));
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn main() {
    if let Some(phase) = arg("--phase") {
        let dir = PathBuf::from(arg("--dir").expect("--dir"));
        match phase.as_str() {
            "create" => phase_create(&dir),
            "download" => runtime().block_on(phase_download(&dir)),
            "load" => phase_load(&dir),
            "sync" => runtime().block_on(phase_sync(&dir)),
            "baseline" => phase_baseline(&dir),
            other => panic!("unknown phase {other}"),
        }
        return;
    }
    let target_mib: u64 = arg("--mib").map(|m| m.parse().unwrap()).unwrap_or(1024);
    let rounds: usize = arg("--rounds").map_or(3, |r| r.parse().unwrap());
    let tmp = tempfile::tempdir_in(arg("--dir").unwrap_or_else(|| ".".into())).unwrap();
    let runs = measure(tmp.path(), target_mib, rounds);
    report(&runs, rounds);
}

/// What the stages measured: the snapshot's creation and, over the rounds, each stage's runs.
struct Runs {
    created: String,
    downloads: Vec<String>,
    loads: Vec<String>,
    syncs: Vec<String>,
    baselines: Vec<String>,
}

/// Builds a state of about `target_mib` MiB in `root`, snapshots it, serves it from this
/// process and runs each stage `rounds` times, alternating them.
fn measure(root: &std::path::Path, target_mib: u64, rounds: usize) -> Runs {
    let dir = root.to_str().unwrap().to_string();
    eprintln!("building a ~{target_mib} MiB state in {dir} ...");
    populate(&root.join("holder"), target_mib, SLOT);
    let created = run_phase(&["--phase", "create", "--dir", &dir]);
    eprintln!("created: {created}");

    // The streamer serves from this process for the whole run.
    let rt = runtime();
    let keypair = Keypair::generate_ed25519();
    let streamer = rt.block_on(async {
        let store = SnapshotStore::open(root.join("holder").join("snapshots")).unwrap();
        Streamer::bind(
            &keypair,
            store,
            StreamerConfig::default().with_listen(local()),
            None,
            Metrics::new(),
        )
        .unwrap()
    });
    let peer = keypair.public().to_peer_id().to_string();
    let addr = streamer.local_addr().to_string();
    let net = |phase: &str| {
        run_phase(&[
            "--phase", phase, "--dir", &dir, "--peer", &peer, "--addr", &addr,
        ])
    };

    // The stages alternate over a few rounds and the medians are reported, so one noisy
    // moment of a shared disk does not decide the figures.
    let mut runs = Runs {
        created,
        downloads: vec![],
        loads: vec![],
        syncs: vec![],
        baselines: vec![],
    };
    for round in 0..rounds {
        for stale in ["a", "b-db", "c", "c-db"] {
            let _ = std::fs::remove_dir_all(root.join(stale));
        }
        runs.downloads.push(net("download"));
        runs.loads
            .push(run_phase(&["--phase", "load", "--dir", &dir]));
        runs.syncs.push(net("sync"));
        runs.baselines
            .push(run_phase(&["--phase", "baseline", "--dir", &dir]));
        eprintln!(
            "round {round}:\n  (a) {}\n  (b) {}\n  (c) {}\n  (d) {}",
            runs.downloads[round], runs.loads[round], runs.syncs[round], runs.baselines[round]
        );
    }
    drop(streamer);
    runs
}

/// The table of the medians, the ratios and the JSON line.
fn report(runs: &Runs, rounds: usize) {
    let Runs {
        created,
        downloads,
        loads,
        syncs,
        baselines,
    } = runs;
    let (download, load, sync, baseline) = (
        support::median(downloads),
        support::median(loads),
        support::median(syncs),
        support::median(baselines),
    );
    let state_bytes = field(created, "state_bytes") as u64;
    let archive_bytes = field(created, "archive_bytes") as u64;
    let (download_secs, load_secs, sync_secs) = (
        field(&download, "secs"),
        field(&load, "secs"),
        field(&sync, "secs"),
    );
    let load_mibs = mib(state_bytes) / load_secs;
    let baseline_mibs = mib(field(&baseline, "bytes") as u64) / field(&baseline, "secs");
    let sync_ratio = sync_secs / download_secs.max(load_secs);
    let load_ratio = load_mibs / baseline_mibs;
    let peak = |name: &str| {
        downloads
            .iter()
            .chain(loads)
            .chain(syncs)
            .map(|s| field(s, name))
            .fold(0.0, f64::max)
    };
    let (peak_anon, peak_total) = (peak("peak_anon_mib"), peak("peak_rss_mib"));

    println!(
        "state: {:.0} MiB uncompressed, archive {:.0} MiB, one streamer on 127.0.0.1; medians of {rounds} rounds",
        mib(state_bytes),
        mib(archive_bytes)
    );
    println!(
        "{:<44} {:>8} {:>8} {:>8} {:>10} {:>10}",
        "", "secs", "MiB/s", "CPU s", "anon MiB", "RSS MiB"
    );
    let row = |name: &str, run: &str, bytes: u64| {
        let secs = field(run, "secs");
        println!(
            "{:<44} {:>8.2} {:>8.0} {:>8.2} {:>10.0} {:>10.0}",
            name,
            secs,
            mib(bytes) / secs,
            field(run, "cpu"),
            field(run, "peak_anon_mib"),
            field(run, "peak_rss_mib")
        );
    };
    row(
        "(a) download alone (archive MiB/s)",
        &download,
        archive_bytes,
    );
    row("(b) load alone (state MiB/s)", &load, state_bytes);
    row(
        "(c) sync, import while downloading (state)",
        &sync,
        state_bytes,
    );
    row(
        "(d) baseline: unzstd + BLAKE3 + write + fsync",
        &baseline,
        field(&baseline, "bytes") as u64,
    );
    println!(
        "peak memory: anon = what the process holds (heap, buffers); RSS adds the DB map's pages it touched (page cache)"
    );
    println!(
        "(c) / max((a), (b)) = {sync_ratio:.2} (goal <= 1.2); (b) / (d) = {load_ratio:.2} (goal >= 0.4); download done in (c) after {:.2} s",
        field(&sync, "download_done_secs")
    );
    println!(
        "{{\"sync_secs\":{sync_secs:.3},\"download_secs\":{download_secs:.3},\"load_secs\":{load_secs:.3},\"load_mibs\":{load_mibs:.1},\"baseline_mibs\":{baseline_mibs:.1},\"peak_rss_mib\":{peak_anon:.1},\"peak_rss_with_db_map_mib\":{peak_total:.1},\"sync_ratio\":{sync_ratio:.3},\"load_ratio\":{load_ratio:.3},\"state_bytes\":{state_bytes},\"archive_bytes\":{archive_bytes}}}"
    );
}
