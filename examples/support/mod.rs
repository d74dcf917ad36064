//! Helpers shared by the benchmark examples: resource usage of this process and phases run as
//! child processes, so each phase's peak memory and CPU time are its own.
#![allow(dead_code)]

pub mod state;

/// Whether `name` is on the command line.
pub fn flag(name: &str) -> bool {
    std::env::args().any(|a| a == name)
}

use std::io::Write;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use snapsync::BankHash;
use snapsync::layers::chunk::ChunkSize;
use snapsync::layers::snapshot::{FORMAT_VERSION, Manifest};

/// The value after `name` on the command line.
pub fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// An address on loopback, any port.
pub fn local() -> std::net::SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// The run whose `secs` is the median.
pub fn median(runs: &[String]) -> String {
    let mut sorted: Vec<&String> = runs.iter().collect();
    sorted.sort_by(|a, b| field(a, "secs").total_cmp(&field(b, "secs")));
    sorted[sorted.len() / 2].clone()
}

/// Copies `input` to `output` through a 1 MiB buffer, hashing every byte with BLAKE3 (the
/// baselines' work); returns the bytes copied.
pub fn hash_through(mut input: impl std::io::Read, mut output: impl Write) -> u64 {
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = input.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        output.write_all(&buf[..n]).unwrap();
        total += n as u64;
    }
    std::hint::black_box(hasher.finalize());
    total
}

/// CPU time and peak memory of this process so far.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    pub cpu: Duration,
    /// Peak resident memory of this process (`VmHWM`): its heap and stacks, and the pages of
    /// files it maps that it touched (an LMDB map's pages count here, though they are the page
    /// cache's and reclaimable).
    pub peak_rss_mib: f64,
    /// Peak anonymous resident memory (`RssAnon`, sampled every 10 ms from the first call of
    /// [`usage`]): what the process itself holds, beyond any cache.
    pub peak_anon_mib: f64,
}

/// Largest `RssAnon` sampled so far, KiB.
static PEAK_ANON_KIB: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A field of `/proc/self/status`, KiB.
fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn sample_anon() {
    PEAK_ANON_KIB.fetch_max(status_kib("RssAnon:"), std::sync::atomic::Ordering::Relaxed);
}

/// CPU time and peak memory so far. (Not `getrusage`'s `ru_maxrss`: Linux carries it over
/// `exec`, so a phase would report its parent's peak.) The first call starts the sampler.
pub fn usage() -> Usage {
    static SAMPLER: std::sync::Once = std::sync::Once::new();
    SAMPLER.call_once(|| {
        std::thread::spawn(|| {
            loop {
                sample_anon();
                std::thread::sleep(Duration::from_millis(10));
            }
        });
    });
    sample_anon();
    // SAFETY: getrusage only writes the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    Usage {
        cpu: tv(ru.ru_utime) + tv(ru.ru_stime),
        peak_rss_mib: status_kib("VmHWM:") as f64 / 1024.0,
        peak_anon_mib: PEAK_ANON_KIB.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1024.0,
    }
}

/// Runs this example again as `args`, and returns the last line it printed (a JSON object).
pub fn run_phase(args: &[&str]) -> String {
    quiesce();
    let exe = std::env::current_exe().expect("current exe");
    let out = Command::new(exe)
        .args(args)
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("run phase");
    assert!(out.status.success(), "phase {args:?} failed");
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .lines()
        .last()
        .expect("phase printed nothing")
        .to_string()
}

/// Reads a number field from a flat JSON object printed by a phase.
pub fn field(json: &str, name: &str) -> f64 {
    let pat = format!("\"{name}\":");
    let start = json
        .find(&pat)
        .unwrap_or_else(|| panic!("no {name} in {json}"))
        + pat.len();
    let rest = &json[start..];
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    rest[..end]
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{name} in {json}"))
}

pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Writes back dirty pages and lets the disk settle, so that one phase's writeback does not
/// land on the next phase's clock.
pub fn quiesce() {
    // SAFETY: sync has no arguments and no failure mode.
    unsafe { libc::sync() };
    std::thread::sleep(Duration::from_millis(500));
}

/// Writes a published snapshot of `bytes` pseudo-random bytes into `store_dir` (the transfer
/// does not care what the archive holds) and returns its manifest.
pub fn random_snapshot(store_dir: &Path, bytes: u64) -> Manifest {
    let staging = store_dir.join("bench-staging");
    std::fs::create_dir_all(&staging).unwrap();
    let archive = staging.join(snapsync::layers::snapshot::ARCHIVE_FILE);
    let mut out =
        std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&archive).unwrap());
    let mut xof = blake3::Hasher::new()
        .update(b"transfer bench")
        .finalize_xof();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        xof.fill(&mut buf[..n]);
        out.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
    out.into_inner().unwrap().sync_all().unwrap();
    let (root, size) = snapsync::layers::chunk::write_outboard(
        &archive,
        ChunkSize::DEFAULT,
        &staging.join(snapsync::layers::snapshot::OUTBOARD_FILE),
    )
    .unwrap();
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        slot: 1,
        bank_hash: BankHash([0; 32]),
        content_root: root,
        archive_size: size,
        chunk_size: ChunkSize::DEFAULT,
        created_unix_ms: 0,
        entry_count: 0,
        state_bytes: size,
        zstd_level: 1,
        kind: snapsync::layers::snapshot::SnapshotKind::Full,
        base: None,
        zstd_version: 0,
    };
    std::fs::write(
        staging.join(snapsync::layers::snapshot::MANIFEST_FILE),
        manifest.encode(),
    )
    .unwrap();
    let name = format!("full-{:020}-{}", 1, &root.to_hex()[..16]);
    std::fs::rename(&staging, store_dir.join(name)).unwrap();
    manifest
}

/// Starts a server role and reads its listener lines. Its stdin is a pipe: closing it tells a
/// role that waits on it to finish.
pub fn start_server(args: &[&str], lines: usize) -> (Child, Vec<String>) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut got = Vec::new();
    for _ in 0..lines {
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        got.push(line.trim().to_string());
    }
    (child, got)
}

pub fn text(json: &str, name: &str) -> String {
    let pat = format!("\"{name}\":\"");
    let start = json.find(&pat).unwrap() + pat.len();
    json[start..json[start..].find('"').unwrap() + start].to_string()
}
