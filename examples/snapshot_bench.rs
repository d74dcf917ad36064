//! Snapshot creation and loading of a ~1 GiB state, beside a baseline measured in the same run
//! on the same bytes: compressing them with zstd at the same level and hashing them with BLAKE3,
//! single-threaded, from memory-cached input to nowhere.
//!
//! ```text
//! cargo run --release --example snapshot_bench [-- --mib 1024 --rounds 3 --dir DIR]
//! ```
//!
//! It then touches 1% of the entries over 50 slots and measures an incremental snapshot on the
//! full one: its creation and load times as ratios to the full one's, and its size beside the
//! touched records compressed alone.
//!
//! Each phase runs as its own process so its CPU time and peak memory are its own (peak anonymous
//! memory: what the process holds, not the DB map's page-cache pages it touched). The last line
//! printed is one JSON object with every figure.

#[path = "support/mod.rs"]
mod support;

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use snapsync::db::{LmdbState, StateDb};
use snapsync::layers::snapshot::{ArchiveReader, DEFAULT_ZSTD_LEVEL};
use snapsync::layers::snapshot::{
    CreateOptions, SnapshotStore, create_incremental, create_snapshot, load_snapshot,
};
use support::state::{VALUE_LEN, entries_for, key, open_db, populate, value};
use support::{arg, field, mib, run_phase, usage};

/// The zstd level under test (`--level`, default the crate's default).
fn level() -> i32 {
    arg("--level")
        .map(|l| l.parse().expect("--level N"))
        .unwrap_or(DEFAULT_ZSTD_LEVEL)
}

/// The slot of the full base.
const BASE_SLOT: u64 = 1_000;
/// The slot of the incremental snapshot.
const INCR_SLOT: u64 = 1_050;

/// Touches 1% of the entries over 50 slots after the base: values changed (most), keys deleted
/// and new keys created. Returns the records an incremental holds, as the archive encodes them,
/// for the compressed-size comparison.
fn touch(dir: &Path, target_mib: u64) -> Vec<u8> {
    let db = open_db(dir);
    let entries = entries_for(target_mib);
    let touched = (entries / 100).max(1);
    let mut v = Vec::with_capacity(VALUE_LEN);
    let mut records: std::collections::BTreeMap<Vec<u8>, Option<Vec<u8>>> = Default::default();
    let per_slot = touched.div_ceil(INCR_SLOT - BASE_SLOT);
    let mut n = 0u64;
    for slot in BASE_SLOT + 1..=INCR_SLOT {
        db.commit_slot(slot, |w| {
            for _ in 0..per_slot {
                if n >= touched {
                    break;
                }
                let i = (n.wrapping_mul(0x9E37_79B9) ^ slot) % entries;
                match n % 10 {
                    // A deletion.
                    0 => {
                        w.delete(&key(i))?;
                        records.insert(key(i).to_vec(), None);
                    }
                    // A new key.
                    1 => {
                        let k = key(entries + n);
                        value(entries + n, &mut v);
                        w.put(&k, &v)?;
                        records.insert(k.to_vec(), Some(v.clone()));
                    }
                    _ => {
                        value(i ^ (slot << 32), &mut v);
                        w.put(&key(i), &v)?;
                        records.insert(key(i).to_vec(), Some(v.clone()));
                    }
                }
                n += 1;
            }
            Ok(())
        })
        .unwrap();
    }
    let mut raw = Vec::new();
    for (k, val) in &records {
        raw.extend_from_slice(&(k.len() as u32).to_le_bytes());
        raw.extend_from_slice(k);
        match val {
            Some(val) => {
                raw.extend_from_slice(&(val.len() as u32).to_le_bytes());
                raw.extend_from_slice(val);
            }
            None => raw.extend_from_slice(&u32::MAX.to_le_bytes()),
        }
    }
    raw
}

fn phase_create(dir: &Path, incremental: bool) {
    let db = open_db(dir);
    let store = SnapshotStore::open(dir.join("snapshots")).unwrap();
    let options = CreateOptions::default().with_zstd_level(level());
    let base = store.latest_full();
    if incremental {
        // A round starts from the full base alone.
        for s in store.list() {
            if !s.manifest().is_full() {
                store.remove(&s).unwrap();
            }
        }
    }
    let before = usage();
    let started = Instant::now();
    let view = db.view().unwrap();
    let snap = if incremental {
        create_incremental(&store, view.as_ref(), &base.expect("a full base"), &options).unwrap()
    } else {
        create_snapshot(&store, view.as_ref(), &options).unwrap()
    };
    let secs = started.elapsed().as_secs_f64();
    let after = usage();
    let m = snap.manifest();
    println!(
        "{{\"secs\":{secs},\"cpu\":{},\"peak_rss_mib\":{},\"peak_rss_with_db_map_mib\":{},\"state_bytes\":{},\"archive_bytes\":{},\"entries\":{}}}",
        (after.cpu - before.cpu).as_secs_f64(),
        after.peak_anon_mib,
        after.peak_rss_mib,
        m.state_bytes,
        m.archive_size,
        m.entry_count
    );
}

/// Writes the uncompressed record stream of the full snapshot to `raw` (the baseline's input).
fn phase_raw(dir: &Path, raw: &Path) {
    let store = SnapshotStore::open(dir.join("snapshots")).unwrap();
    let snap = store.latest_full().unwrap();
    let input = BufReader::new(File::open(snap.archive_path()).unwrap());
    let mut decoder = zstd::stream::read::Decoder::with_buffer(input).unwrap();
    let mut out = BufWriter::new(File::create(raw).unwrap());
    std::io::copy(&mut decoder, &mut out).unwrap();
    out.flush().unwrap();
    // Check the stream is the archive's.
    let mut r =
        ArchiveReader::new(BufReader::new(File::open(snap.archive_path()).unwrap())).unwrap();
    while r.next_record().unwrap().is_some() {}
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
    let total = support::hash_through(&mut input, &mut encoder);
    encoder.finish().unwrap();
    let secs = started.elapsed().as_secs_f64();
    let after = usage();
    println!(
        "{{\"secs\":{secs},\"cpu\":{},\"bytes\":{total}}}",
        (after.cpu - before.cpu).as_secs_f64()
    );
}

/// Loads the full snapshot into a fresh DB (`loaded`), or the incremental one onto it.
fn phase_load(dir: &Path, incremental: bool) {
    let store = SnapshotStore::open(dir.join("snapshots")).unwrap();
    let snap = if incremental {
        store.latest().unwrap()
    } else {
        store.latest_full().unwrap()
    };
    assert_eq!(snap.manifest().is_full(), !incremental);
    let target = Arc::new(LmdbState::open(dir.join("loaded")).unwrap());
    let before = usage();
    let started = Instant::now();
    let report = load_snapshot(target.as_ref(), &snap.archive_path(), snap.manifest()).unwrap();
    let secs = started.elapsed().as_secs_f64();
    let after = usage();
    assert_eq!(report.bank_hash, snap.manifest().bank_hash);
    assert_eq!(target.slot().unwrap(), Some(snap.manifest().slot));
    println!(
        "{{\"secs\":{secs},\"cpu\":{},\"peak_rss_mib\":{},\"peak_rss_with_db_map_mib\":{}}}",
        (after.cpu - before.cpu).as_secs_f64(),
        after.peak_anon_mib,
        after.peak_rss_mib
    );
}

fn main() {
    if let Some(phase) = arg("--phase") {
        let dir = PathBuf::from(arg("--dir").expect("--dir"));
        match phase.as_str() {
            "create" => phase_create(&dir, false),
            "create-incremental" => phase_create(&dir, true),
            "raw" => phase_raw(&dir, &dir.join("raw.bin")),
            "baseline" => phase_baseline(&dir.join("raw.bin")),
            "load" => phase_load(&dir, false),
            "load-incremental" => phase_load(&dir, true),
            other => panic!("unknown phase {other}"),
        }
        return;
    }
    let target_mib: u64 = arg("--mib").map(|m| m.parse().unwrap()).unwrap_or(1024);
    let rounds: usize = arg("--rounds").map(|r| r.parse().unwrap()).unwrap_or(3);
    let tmp = tempfile::tempdir_in(arg("--dir").unwrap_or_else(|| ".".into())).unwrap();
    let runs = measure(tmp.path(), target_mib, rounds);
    report(&runs, rounds);
}

/// What the phases measured over the rounds.
struct Runs {
    creates: Vec<String>,
    baselines: Vec<String>,
    load: String,
    incr_creates: Vec<String>,
    incr_load: String,
    /// The touched records alone, compressed at the same level.
    touched_compressed: u64,
}

/// Builds a state of about `target_mib` MiB in `root` and runs each phase in a process of its
/// own: full creation and the baseline alternating over `rounds`, a full load, then with 1% of
/// the entries touched, incremental creations and an incremental load.
fn measure(root: &std::path::Path, target_mib: u64, rounds: usize) -> Runs {
    let dir = root.to_str().unwrap().to_string();
    eprintln!("building a ~{target_mib} MiB state in {dir} ...");
    populate(root, target_mib, BASE_SLOT);

    // Creation and baseline alternate for a few rounds; the medians are reported, so one
    // noisy moment on a shared machine does not decide the figures.
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
    let _ = std::fs::remove_file(root.join("raw.bin"));
    let load = run_phase(&["--phase", "load", "--dir", &dir]);

    // The incremental case: 1% of the entries touched since the base.
    let touched = touch(root, target_mib);
    let touched_compressed = zstd::bulk::compress(&touched, level()).unwrap().len() as u64;
    let mut incr_creates = Vec::new();
    for round in 0..rounds {
        let c = run_phase(&[
            "--phase",
            "create-incremental",
            "--dir",
            &dir,
            "--level",
            &level_arg,
        ]);
        eprintln!("round {round}: incremental create {c}");
        incr_creates.push(c);
    }
    let incr_load = run_phase(&["--phase", "load-incremental", "--dir", &dir]);
    Runs {
        creates,
        baselines,
        load,
        incr_creates,
        incr_load,
        touched_compressed,
    }
}

/// The table of the medians, the ratios and the JSON line.
fn report(runs: &Runs, rounds: usize) {
    let Runs {
        creates,
        baselines,
        load,
        incr_creates,
        incr_load,
        touched_compressed,
    } = runs;
    let create = support::median(creates);
    let baseline = support::median(baselines);
    let incr = support::median(incr_creates);

    let state_bytes = field(&create, "state_bytes") as u64;
    let archive_bytes = field(&create, "archive_bytes") as u64;
    let create_mibs = mib(state_bytes) / field(&create, "secs");
    let baseline_mibs = mib(field(&baseline, "bytes") as u64) / field(&baseline, "secs");
    let load_mibs = mib(state_bytes) / field(load, "secs");
    let incr_create_ratio = field(&incr, "secs") / field(&create, "secs");
    let incr_load_ratio = field(incr_load, "secs") / field(load, "secs");
    let incr_bytes = field(&incr, "archive_bytes") as u64;
    let peak = creates
        .iter()
        .chain(incr_creates)
        .map(|c| field(c, "peak_rss_mib"))
        .fold(field(load, "peak_rss_mib"), f64::max)
        .max(field(incr_load, "peak_rss_mib"));
    let level = level();
    println!(
        "state: {:.0} MiB uncompressed, archive {:.0} MiB (zstd level {level}); medians of {rounds} rounds",
        mib(state_bytes),
        mib(archive_bytes)
    );
    println!(
        "{:<36} {:>10} {:>10} {:>10} {:>12}",
        "", "secs", "MiB/s", "CPU s", "peak anon MiB"
    );
    println!(
        "{:<36} {:>10.2} {:>10.0} {:>10.2} {:>12.0}",
        "full create (DB -> published)",
        field(&create, "secs"),
        create_mibs,
        field(&create, "cpu"),
        field(&create, "peak_rss_mib")
    );
    println!(
        "{:<36} {:>10.2} {:>10.0} {:>10.2} {:>12}",
        "baseline (zstd + BLAKE3)",
        field(&baseline, "secs"),
        baseline_mibs,
        field(&baseline, "cpu"),
        "-"
    );
    println!(
        "{:<36} {:>10.2} {:>10.0} {:>10.2} {:>12.0}",
        "full load (archive -> live DB)",
        field(load, "secs"),
        load_mibs,
        field(load, "cpu"),
        field(load, "peak_rss_mib")
    );
    println!(
        "{:<36} {:>10.3} {:>10} {:>10.2} {:>12.0}",
        format!("incremental create ({} records)", field(&incr, "entries")),
        field(&incr, "secs"),
        "-",
        field(&incr, "cpu"),
        field(&incr, "peak_rss_mib")
    );
    println!(
        "{:<36} {:>10.3} {:>10} {:>10.2} {:>12.0}",
        "incremental load (apply + check)",
        field(incr_load, "secs"),
        "-",
        field(incr_load, "cpu"),
        field(incr_load, "peak_rss_mib")
    );
    println!(
        "create / baseline = {:.2}x (goal >= 0.80x); incremental / full: create {incr_create_ratio:.3}x, load {incr_load_ratio:.3}x (goal <= 0.05x)",
        create_mibs / baseline_mibs
    );
    println!(
        "incremental archive {incr_bytes} bytes; the touched records alone, zstd {level}: {touched_compressed} bytes ({:.2}x)",
        incr_bytes as f64 / *touched_compressed as f64
    );
    println!(
        "{{\"create_mibs\":{create_mibs:.1},\"baseline_mibs\":{baseline_mibs:.1},\"create_vs_baseline\":{:.3},\"load_mibs\":{load_mibs:.1},\"peak_rss_mib\":{peak:.1},\"create_cpu_s\":{:.2},\"baseline_cpu_s\":{:.2},\"load_cpu_s\":{:.2},\"state_mib\":{:.1},\"archive_mib\":{:.1},\"zstd_level\":{level},\"incr_create_ratio\":{incr_create_ratio:.4},\"incr_load_ratio\":{incr_load_ratio:.4},\"incr_bytes\":{incr_bytes},\"touched_compressed_bytes\":{touched_compressed}}}",
        create_mibs / baseline_mibs,
        field(&create, "cpu"),
        field(&baseline, "cpu"),
        field(load, "cpu"),
        mib(state_bytes),
        mib(archive_bytes),
    );
}
