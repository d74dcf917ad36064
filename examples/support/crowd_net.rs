//! The crowd on real links (`crowd_bench --net`): the `node` example as a user runs it, one
//! process per host, hosts in network namespaces on one bridge, every uplink shaped by `tbf`
//! (and, with `--loss`, random loss on every host). One seed executes a chain and makes a
//! snapshot; then, on the same network:
//!
//! - one joiner alone syncs from it: the measured one-copy time;
//! - N joiners start together, each told the seed and up to three joiners started before it
//!   (which may not listen yet: a dial that fails is not retried), as operators list a few
//!   peers; discovery and the joiners' own introductions find the rest.
//!
//! Printed: each round's last and median `synced` time against the one-copy time `size /
//! uplink`, the share of the bytes joiners took from each other, the copies the seed served (by
//! its own count) and those the joiners credit it with, CPU seconds per joiner; last, one JSON
//! object with every figure. Needs root.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::netns::{Link, Net};
use crate::support::{arg, flag};

/// Where the node's libp2p and chunk stream listen on every host.
const P2P_PORT: u16 = 4001;
const STREAM_PORT: u16 = 4433;

/// One `node` process on a host, its JSON lines read as they come.
struct NodeProc {
    host: usize,
    child: Child,
}

/// What a round's processes said, in the order it came.
type Lines = mpsc::Receiver<(usize, serde_json::Value)>;

/// The `node` example beside this benchmark, built when missing.
fn node_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("examples dir");
    let bin = dir.join("node");
    if !bin.exists() {
        let release = dir.to_string_lossy().contains("/release/");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = std::process::Command::new(cargo);
        build.args(["build", "--example", "node"]);
        if release {
            build.arg("--release");
        }
        let ok = build.status().map(|s| s.success()).unwrap_or(false);
        assert!(ok && bin.exists(), "cannot build the node example");
    }
    bin
}

/// A data directory with a fresh identity; returns the peer id.
fn data_dir(root: &Path, name: &str) -> (PathBuf, String) {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).expect("data dir");
    let key = libp2p::identity::Keypair::generate_ed25519();
    std::fs::write(
        dir.join("identity.key"),
        key.to_protobuf_encoding().expect("encodes"),
    )
    .expect("identity");
    (dir, key.public().to_peer_id().to_string())
}

struct Bench {
    net: Net,
    node: PathBuf,
    root: tempfile::TempDir,
    logs: Option<PathBuf>,
    tx: mpsc::Sender<(usize, serde_json::Value)>,
}

impl Bench {
    fn addr(&self, host: usize, peer: &str) -> String {
        format!(
            "/ip4/{}/udp/{P2P_PORT}/quic-v1/p2p/{peer}",
            self.net.ip(host)
        )
    }

    /// Starts `node` on `host` with `args` (besides its data dir and listen addresses).
    fn start(&self, host: usize, dir: &Path, name: &str, args: &[String]) -> NodeProc {
        let ip = self.net.ip(host);
        let mut cmd = self.net.command(host, &self.node);
        cmd.arg("--data-dir")
            .arg(dir)
            .args(["--listen", &format!("/ip4/{ip}/udp/{P2P_PORT}/quic-v1")])
            .args(["--streamer", &format!("{ip}:{STREAM_PORT}")])
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::piped());
        match &self.logs {
            Some(logs) => {
                let file = std::fs::File::create(logs.join(format!("{name}.log"))).expect("log");
                cmd.stderr(file);
            }
            None => {
                cmd.stderr(Stdio::null());
            }
        }
        let mut child = cmd.spawn().expect("start node");
        let out = BufReader::new(child.stdout.take().expect("piped"));
        let tx = self.tx.clone();
        // Its JSON lines are kept beside its log.
        let mut copy = self
            .logs
            .as_ref()
            .map(|logs| std::fs::File::create(logs.join(format!("{name}.jsonl"))).expect("jsonl"));
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                if let Some(f) = copy.as_mut() {
                    use std::io::Write;
                    let _ = writeln!(f, "{line}");
                }
                if let Ok(v) = serde_json::from_str(&line)
                    && tx.send((host, v)).is_err()
                {
                    return;
                }
            }
        });
        NodeProc { host, child }
    }
}

/// Waits until `host` says `event` (what else comes meanwhile is kept in `other`).
fn wait_for(
    lines: &Lines,
    host: usize,
    event: &str,
    timeout: Duration,
    other: &mut Vec<(usize, serde_json::Value)>,
) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let (h, v) = lines
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("host {host} did not say {event} in {timeout:?}"));
        if h == host && v["event"] == event {
            return v;
        }
        other.push((h, v));
    }
}

/// What one round measured.
struct Round {
    /// Seconds from the round's start to each joiner's `synced`.
    synced: Vec<f64>,
    /// Bytes each joiner fetched, and those of them it credits the seed with.
    fetched: u64,
    from_seed: u64,
    /// Bytes the seed's streamer served meanwhile, by its own count.
    seed_served: u64,
    /// CPU seconds of each joiner.
    cpu: Vec<f64>,
    /// Per-source bytes that did not add up to what a joiner fetched.
    mismatches: usize,
}

impl Round {
    fn last(&self) -> f64 {
        self.synced.iter().copied().fold(0.0, f64::max)
    }

    fn median(&self) -> f64 {
        let mut s = self.synced.clone();
        s.sort_by(f64::total_cmp);
        s[s.len() / 2]
    }
}

/// The seed's latest count of bytes served.
fn seed_served(lines: &Lines, other: &mut Vec<(usize, serde_json::Value)>) -> u64 {
    // A stats line comes every second: wait for a fresh one.
    let v = wait_for(lines, 0, "stats", Duration::from_secs(5), other);
    v["served_bytes"].as_u64().unwrap_or(0)
}

/// `n` joiners on hosts `1..=n` sync from the seed (host 0) at once.
fn round(bench: &Bench, lines: &Lines, seed_peer: &str, n: usize, tag: &str) -> Round {
    let mut other = Vec::new();
    let served_before = seed_served(lines, &mut other);
    let mut peers: Vec<String> = Vec::new();
    let mut procs = Vec::new();
    let started = Instant::now();
    for j in 1..=n {
        let (dir, peer) = data_dir(bench.root.path(), &format!("{tag}-j{j}"));
        let mut args: Vec<String> =
            vec!["--exit-after-sync".into(), "--timeout".into(), "900".into()];
        args.extend(["--peer".into(), bench.addr(0, seed_peer)]);
        for (k, p) in peers.iter().enumerate().rev().take(3) {
            args.extend(["--peer".into(), bench.addr(k + 1, p)]);
        }
        procs.push(bench.start(j, &dir, &format!("{tag}-j{j}"), &args));
        peers.push(peer);
    }
    let mut synced = HashMap::new();
    let (mut fetched, mut from_seed, mut mismatches) = (0u64, 0u64, 0usize);
    let mut cpu = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(900);
    while synced.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok((h, v)) = lines.recv_timeout(left) else {
            panic!("{} of {n} joiners synced in time", synced.len());
        };
        match v["event"].as_str() {
            Some("synced") if h > 0 && !synced.contains_key(&h) => {
                synced.insert(h, started.elapsed().as_secs_f64());
                let f = v["fetched_bytes"].as_u64().unwrap_or(0);
                fetched += f;
                let mut sum = 0;
                for p in v["per_peer"].as_array().into_iter().flatten() {
                    let b = p["bytes"].as_u64().unwrap_or(0);
                    sum += b;
                    if p["peer_id"] == seed_peer {
                        from_seed += b;
                    }
                }
                if sum != f {
                    mismatches += 1;
                    eprintln!("  joiner {h}: sources credited {sum} bytes, fetched {f}");
                }
                cpu.push(v["cpu_secs"].as_f64().unwrap_or(0.0));
            }
            Some("sync_failed") => eprintln!("  joiner {h}: sync failed: {}", v["error"]),
            Some("error") => panic!("joiner {h}: {}", v["message"]),
            _ => {}
        }
    }
    for mut p in procs {
        let _ = p.child.wait();
        let _ = p.host;
    }
    // The next stats line counts everything served to this round.
    std::thread::sleep(Duration::from_millis(1100));
    let served = seed_served(lines, &mut other) - served_before;
    let mut synced: Vec<(usize, f64)> = synced.into_iter().collect();
    synced.sort_by_key(|(h, _)| *h);
    Round {
        synced: synced.into_iter().map(|(_, s)| s).collect(),
        fetched,
        from_seed,
        seed_served: served,
        cpu,
        mismatches,
    }
}

/// Starts the seed: it executes a chain of `state_mib` MiB up to the slot of its first
/// snapshot, then serves it. Returns it, its PeerId and the snapshot's archive size.
fn start_seed(
    bench: &Bench,
    lines: &mpsc::Receiver<(usize, serde_json::Value)>,
    state_mib: u64,
) -> (NodeProc, String, u64) {
    let (seed_dir, seed_peer) = data_dir(bench.root.path(), "seed");
    let seed_args: Vec<String> = [
        "--produce",
        "--state-mib",
        &state_mib.to_string(),
        "--slot-ms",
        "100",
        "--range-for-snapshot",
        "20",
        "--stop-at-slot",
        "20",
        "--stats-secs",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let seed = bench.start(0, &seed_dir, "seed", &seed_args);
    let mut other = Vec::new();
    let created = wait_for(
        lines,
        0,
        "snapshot_created",
        Duration::from_secs(600),
        &mut other,
    );
    let size = created["bytes"].as_u64().expect("bytes");
    (seed, seed_peer, size)
}

/// The same crowd in the simulator: `n` joiners and a seed on links like the bridge's.
fn simulate(size: u64, n: usize, link: Link) -> snapsync::swarm::SwarmReport {
    let byte_rate = link.mbit as f64 * 1e6 / 8.0;
    snapsync::swarm::run(&snapsync::swarm::SwarmConfig {
        archive_bytes: size,
        seed_uplink: byte_rate,
        joiner_uplink: byte_rate,
        downlink: 100.0 * byte_rate,
        latency_ms: (0, 1),
        loss: link.loss_pct / 100.0,
        partial_peers: 3,
        ..snapsync::swarm::SwarmConfig::new(n, 1)
    })
}

/// `crowd_bench --net [--joiners N] [--state-mib M] [--mbit R] [--loss PCT] [--log-dir DIR]`.
pub fn main() {
    let n: usize = arg("--joiners").map_or(8, |v| v.parse().expect("--joiners"));
    let state_mib: u64 = arg("--state-mib").map_or(128, |v| v.parse().expect("--state-mib"));
    let mbit: u64 = arg("--mbit").map_or(25, |v| v.parse().expect("--mbit"));
    let loss_pct: f64 = arg("--loss").map_or(0.0, |v| v.parse().expect("--loss"));
    let logs = arg("--log-dir").map(PathBuf::from);
    if let Some(l) = &logs {
        std::fs::create_dir_all(l).expect("log dir");
    }
    let skip_alone = flag("--skip-alone");
    let net = Net::new("snb", n + 1, Link { mbit, loss_pct }).unwrap_or_else(|e| {
        eprintln!("cannot make the network: {e}");
        std::process::exit(2)
    });
    let (tx, lines) = mpsc::channel();
    let bench = Bench {
        net,
        node: node_bin(),
        root: tempfile::tempdir().expect("tempdir"),
        logs,
        tx,
    };
    println!(
        "crowd on real links: one seed, {n} joiners, {state_mib} MiB of state, every uplink {mbit} Mbit/s (tbf){}",
        if loss_pct > 0.0 {
            format!(", {loss_pct}% random loss on every host")
        } else {
            String::new()
        }
    );
    // The seed executes a chain up to the slot of its first snapshot, then serves it.
    let (mut seed, seed_peer, size) = start_seed(&bench, &lines, state_mib);
    let one_copy = size as f64 * 8.0 / (mbit as f64 * 1e6);
    println!(
        "  snapshot: {:.1} MiB archive; one copy over one uplink (size / uplink) {one_copy:.2} s",
        size as f64 / (1 << 20) as f64
    );
    let alone = (!skip_alone).then(|| round(&bench, &lines, &seed_peer, 1, "alone"));
    if let Some(a) = &alone {
        println!(
            "  one joiner alone     {:>7.2} s  = {:.2} x one copy (the measured one-copy time); the seed served {:.2} copies; {:.1} CPU-s",
            a.last(),
            a.last() / one_copy,
            a.seed_served as f64 / size as f64,
            a.cpu.iter().sum::<f64>()
        );
    }
    let crowd = round(&bench, &lines, &seed_peer, n, "crowd");
    let joiner_share = 1.0 - crowd.from_seed as f64 / crowd.fetched.max(1) as f64;
    let cpu_per_joiner = crowd.cpu.iter().sum::<f64>() / n as f64;
    println!(
        "  crowd of {n:<3}         {:>7.2} s  = {:.2} x one copy (median joiner {:.2} s = {:.2} x); {:.0}% of the bytes from other joiners",
        crowd.last(),
        crowd.last() / one_copy,
        crowd.median(),
        crowd.median() / one_copy,
        100.0 * joiner_share
    );
    println!(
        "                         the seed served {:.2} copies by its own count; the joiners credit it with {:.2}; {:.1} CPU-s per joiner; per-source bytes that did not add up: {}",
        crowd.seed_served as f64 / size as f64,
        crowd.from_seed as f64 / size as f64,
        cpu_per_joiner,
        crowd.mismatches
    );
    let _ = seed.child.kill();
    let _ = seed.child.wait();
    let _ = seed.host;
    // The same crowd in the simulator: links of the bridge, the same uplinks and queues.
    let sim = simulate(size, n, Link { mbit, loss_pct });
    let sim_ratio = sim.copies().unwrap_or(f64::NAN);
    // The harness counts from the processes' start to their last `synced`: start-up, discovery
    // and the load's end, which the simulator does not model, are what one joiner alone
    // spends beyond one copy.
    let overhead = alone.as_ref().map_or(0.0, |a| a.last() / one_copy - 1.0);
    let net_transfer = crowd.last() / one_copy - overhead;
    println!(
        "  simulated           {:>7.2} s  = {sim_ratio:.2} x one copy; the harness, less the start-up and load one joiner alone spends ({overhead:.2}), {net_transfer:.2} x: the simulator is {:+.0}% off; the seed sent {:.2} copies there",
        sim.all_done.map_or(f64::NAN, |d| d.as_secs_f64()),
        100.0 * (sim_ratio / net_transfer - 1.0),
        sim.seed_copies,
    );
    let alone_secs = alone.as_ref().map_or(f64::NAN, |a| a.last());
    println!(
        "{{\"mode\":\"net\",\"joiners\":{n},\"state_mib\":{state_mib},\"archive_bytes\":{size},\"mbit\":{mbit},\"loss_pct\":{loss_pct},\"one_copy_secs\":{one_copy:.3},\"alone_secs\":{alone_secs:.3},\"alone_ratio\":{:.3},\"crowd_last_secs\":{:.3},\"crowd_ratio\":{:.3},\"crowd_median_ratio\":{:.3},\"joiner_bytes_share\":{joiner_share:.3},\"seed_copies_served\":{:.3},\"seed_copies_credited\":{:.3},\"cpu_secs_per_joiner\":{cpu_per_joiner:.2},\"mismatches\":{},\"sim_ratio\":{sim_ratio:.3},\"harness_transfer_ratio\":{net_transfer:.3}}}",
        alone_secs / one_copy,
        crowd.last(),
        crowd.last() / one_copy,
        crowd.median() / one_copy,
        crowd.seed_served as f64 / size as f64,
        crowd.from_seed as f64 / size as f64,
        crowd.mismatches
    );
}
