//! Snapshot creation and loading of a ~1 GiB state, beside a baseline measured in the same run
//! on the same bytes: compressing them with zstd at the same level and hashing them with BLAKE3,
//! single-threaded, from memory-cached input to nowhere.
//!
//! ```text
//! cargo run --release --example snapshot_bench [-- --mib 1024]
//! ```
//!
//! Each phase runs as its own process so its CPU time and peak RSS are its own. The last line
//! printed is one JSON object with every figure.

#[path = "support/mod.rs"]
mod support;

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use snapsync::db::{RedbState, StateDb};
use snapsync::snapshot::archive::{ArchiveReader, DEFAULT_ZSTD_LEVEL};
use snapsync::snapshot::{CreateOptions, SnapshotStore, create_snapshot, load_snapshot};
use support::{field, mib, run_phase, usage};

const VALUE_LEN: usize = 1000;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// Key `i`: 8 bytes of `i` (ascending) and 24 pseudo-random bytes, like an account address.
fn key(i: u64) -> [u8; 32] {
    let mut k = [0u8; 32];
    k[..8].copy_from_slice(&i.to_be_bytes());
    let h = blake3::hash(&i.to_le_bytes());
    k[8..].copy_from_slice(&h.as_bytes()[..24]);
    k
}

/// Value of `i`: 40% random (balances, hashes), 60% structured (small integers, padding).
fn value(i: u64, out: &mut Vec<u8>) {
    out.clear();
    let mut xof = blake3::Hasher::new()
        .update(&i.to_le_bytes())
        .finalize_xof();
    let mut random = [0u8; VALUE_LEN * 2 / 5];
    xof.fill(&mut random);
    out.extend_from_slice(&random);
    while out.len() < VALUE_LEN {
        let n = out.len() as u64;
        out.extend_from_slice(&((i * 7 + n) % 97).to_le_bytes()[..4]);
    }
    out.truncate(VALUE_LEN);
}

/// The zstd level under test (`--level`, default the crate's default).
fn level() -> i32 {
    arg("--level")
        .map(|l| l.parse().expect("--level N"))
        .unwrap_or(DEFAULT_ZSTD_LEVEL)
}

fn populate(dir: &Path, target_mib: u64) {
    let db = RedbState::open(dir.join("state.redb")).unwrap();
    let entries = (target_mib << 20) / (32 + VALUE_LEN as u64 + 8);
    let mut v = Vec::with_capacity(VALUE_LEN);
    let mut i = 0;
    let started = Instant::now();
    while i < entries {
        let end = (i + 20_000).min(entries);
        db.commit_slot(1_000, |w| {
            for j in i..end {
                value(j, &mut v);
                w.put(&key(j), &v)?;
            }
            Ok(())
        })
        .unwrap();
        i = end;
    }
    eprintln!(
        "populated {entries} entries in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

fn phase_create(dir: &Path) {
    let db = RedbState::open(dir.join("state.redb")).unwrap();
    let store = SnapshotStore::open(dir.join("snapshots")).unwrap();
    let before = usage();
    let started = Instant::now();
    let view = db.view().unwrap();
    let options = CreateOptions::default().with_zstd_level(level());
    let snap = create_snapshot(&store, view.as_ref(), &options).unwrap();
    let secs = started.elapsed().as_secs_f64();
    let after = usage();
    let m = snap.manifest();
    println!(
        "{{\"secs\":{secs},\"cpu\":{},\"peak_rss_mib\":{},\"state_bytes\":{},\"archive_bytes\":{}}}",
        (after.cpu - before.cpu).as_secs_f64(),
        after.peak_rss_mib,
        m.state_bytes,
        m.archive_size
    );
}

/// Writes the uncompressed record stream of the snapshot to `raw` (the baseline's input).
fn phase_raw(dir: &Path, raw: &Path) {
    let store = SnapshotStore::open(dir.join("snapshots")).unwrap();
    let snap = store.latest().unwrap();
    let input = BufReader::new(File::open(snap.archive_path()).unwrap());
    let mut decoder = zstd::stream::read::Decoder::with_buffer(input).unwrap();
    let mut out = BufWriter::new(File::create(raw).unwrap());
    std::io::copy(&mut decoder, &mut out).unwrap();
    out.flush().unwrap();
    // Check the stream is the archive's.
    let mut r =
        ArchiveReader::new(BufReader::new(File::open(snap.archive_path()).unwrap())).unwrap();
    while r.next_entry().unwrap().is_some() {}
    println!("{{\"ok\":1}}");
}

fn phase_baseline(raw: &Path) {
    let mut input = File::open(raw).unwrap();
    // Warm the page cache so the baseline does not pay for disk reads.
    std::io::copy(&mut input, &mut std::io::sink()).unwrap();
    let mut input = File::open(raw).unwrap();
    let before = usage();
    let started = Instant::now();
    let mut encoder = zstd::stream::write::Encoder::new(std::io::sink(), level()).unwrap();
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut total = 0u64;
    loop {
        let n = input.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        encoder.write_all(&buf[..n]).unwrap();
        total += n as u64;
    }
    encoder.finish().unwrap();
    std::hint::black_box(hasher.finalize());
    let secs = started.elapsed().as_secs_f64();
    let after = usage();
    println!(
        "{{\"secs\":{secs},\"cpu\":{},\"bytes\":{total}}}",
        (after.cpu - before.cpu).as_secs_f64()
    );
}

fn phase_load(dir: &Path) {
    let store = SnapshotStore::open(dir.join("snapshots")).unwrap();
    let snap = store.latest().unwrap();
    let target = Arc::new(RedbState::open(dir.join("loaded.redb")).unwrap());
    let before = usage();
    let started = Instant::now();
    let report = load_snapshot(target.as_ref(), &snap.archive_path(), snap.manifest()).unwrap();
    let secs = started.elapsed().as_secs_f64();
    let after = usage();
    assert_eq!(report.bank_hash, snap.manifest().bank_hash);
    assert_eq!(target.slot().unwrap(), Some(snap.manifest().slot));
    println!(
        "{{\"secs\":{secs},\"cpu\":{},\"peak_rss_mib\":{}}}",
        (after.cpu - before.cpu).as_secs_f64(),
        after.peak_rss_mib
    );
}

fn main() {
    if let Some(phase) = arg("--phase") {
        let dir = PathBuf::from(arg("--dir").expect("--dir"));
        match phase.as_str() {
            "create" => phase_create(&dir),
            "raw" => phase_raw(&dir, &dir.join("raw.bin")),
            "baseline" => phase_baseline(&dir.join("raw.bin")),
            "load" => phase_load(&dir),
            other => panic!("unknown phase {other}"),
        }
        return;
    }
    let target_mib: u64 = arg("--mib").map(|m| m.parse().unwrap()).unwrap_or(1024);
    // `--reuse DIR` keeps the state between runs (for profiling); by default a temporary
    // directory is used and removed.
    let (_tmp, root) = match arg("--reuse") {
        Some(dir) => (None, PathBuf::from(dir)),
        None => {
            let tmp = tempfile::tempdir().unwrap();
            let root = tmp.path().to_path_buf();
            (Some(tmp), root)
        }
    };
    let dir = root.to_str().unwrap().to_string();
    if !root.join("state.redb").exists() {
        eprintln!("building a ~{target_mib} MiB state in {dir} ...");
        std::fs::create_dir_all(&root).unwrap();
        populate(&root, target_mib);
    }
    for stale in ["snapshots", "loaded.redb"] {
        let _ = std::fs::remove_dir_all(root.join(stale));
        let _ = std::fs::remove_file(root.join(stale));
    }

    // Creation and baseline alternate for a few rounds; the medians are reported, so one
    // noisy moment on a shared machine does not decide the figures.
    let rounds: usize = arg("--rounds").map(|r| r.parse().unwrap()).unwrap_or(3);
    let level_arg = level().to_string();
    let mut creates = Vec::new();
    let mut baselines = Vec::new();
    for round in 0..rounds {
        let _ = std::fs::remove_dir_all(root.join("snapshots"));
        let create = run_phase(&["--phase", "create", "--dir", &dir, "--level", &level_arg]);
        if round == 0 {
            run_phase(&["--phase", "raw", "--dir", &dir]);
        }
        let baseline = run_phase(&["--phase", "baseline", "--dir", &dir, "--level", &level_arg]);
        eprintln!("round {round}: create {create}\n         baseline {baseline}");
        creates.push(create);
        baselines.push(baseline);
    }
    let load = run_phase(&["--phase", "load", "--dir", &dir]);
    let median = |runs: &[String]| {
        let mut sorted: Vec<&String> = runs.iter().collect();
        sorted.sort_by(|a, b| field(a, "secs").total_cmp(&field(b, "secs")));
        sorted[sorted.len() / 2].clone()
    };
    let create = median(&creates);
    let baseline = median(&baselines);

    let state_bytes = field(&create, "state_bytes") as u64;
    let archive_bytes = field(&create, "archive_bytes") as u64;
    let create_mibs = mib(state_bytes) / field(&create, "secs");
    let baseline_mibs = mib(field(&baseline, "bytes") as u64) / field(&baseline, "secs");
    let load_mibs = mib(state_bytes) / field(&load, "secs");
    let peak = creates
        .iter()
        .map(|c| field(c, "peak_rss_mib"))
        .fold(field(&load, "peak_rss_mib"), f64::max);
    let level = level();
    println!(
        "state: {:.0} MiB uncompressed, archive {:.0} MiB (zstd level {level}); medians of {rounds} rounds",
        mib(state_bytes),
        mib(archive_bytes)
    );
    println!(
        "{:<28} {:>10} {:>10} {:>12}",
        "", "MiB/s", "CPU s", "peak RSS MiB"
    );
    println!(
        "{:<28} {:>10.0} {:>10.2} {:>12.0}",
        "create (DB -> published)",
        create_mibs,
        field(&create, "cpu"),
        field(&create, "peak_rss_mib")
    );
    println!(
        "{:<28} {:>10.0} {:>10.2} {:>12}",
        "baseline (zstd + BLAKE3)",
        baseline_mibs,
        field(&baseline, "cpu"),
        "-"
    );
    println!(
        "{:<28} {:>10.0} {:>10.2} {:>12.0}",
        "load (archive -> live DB)",
        load_mibs,
        field(&load, "cpu"),
        field(&load, "peak_rss_mib")
    );
    println!(
        "create / baseline = {:.2}x (goal >= 0.80x)",
        create_mibs / baseline_mibs
    );
    println!(
        "{{\"create_mibs\":{create_mibs:.1},\"baseline_mibs\":{baseline_mibs:.1},\"create_vs_baseline\":{:.3},\"load_mibs\":{load_mibs:.1},\"peak_rss_mib\":{peak:.1},\"create_cpu_s\":{:.2},\"baseline_cpu_s\":{:.2},\"load_cpu_s\":{:.2},\"state_mib\":{:.1},\"archive_mib\":{:.1},\"zstd_level\":{level},\"db_cache_mib\":{}}}",
        create_mibs / baseline_mibs,
        field(&create, "cpu"),
        field(&baseline, "cpu"),
        field(&load, "cpu"),
        mib(state_bytes),
        mib(archive_bytes),
        snapsync::db::DEFAULT_CACHE_BYTES >> 20
    );
}
