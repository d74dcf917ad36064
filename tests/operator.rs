//! An operator's first hour, with real processes of the `node` example: a node killed with
//! SIGKILL and restarted at once, a graceful stop seen by the holder, dead peer addresses, data
//! directory mistakes, and the metrics endpoint.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::process::{Proc, on_loopback};

/// A producer of an 8 MiB state, serving each peer at 1.5 MB/s: a full download takes several
/// seconds.
fn slow_producer(dir: &std::path::Path, extra: &[&str]) -> (Proc, String) {
    let mut args = on_loopback(
        dir.to_str().unwrap(),
        &[
            "--produce",
            "--state-mib",
            "8",
            "--slot-ms",
            "20",
            "--range-for-snapshot",
            "25",
            "--rate-limit-per-peer",
            "1500000",
        ],
    );
    args.extend_from_slice(extra);
    let p = Proc::start(&args, "");
    let listening = p.wait_event("listening");
    let addr = listening["addrs"][0].as_str().unwrap().to_string();
    p.wait_event("snapshot_created");
    (p, addr)
}

fn syncer_args<'a>(dir: &'a str, peer: &'a str) -> Vec<&'a str> {
    on_loopback(
        dir,
        &["--peer", peer, "--exit-after-sync", "--timeout", "90"],
    )
}

/// Waits until the node has downloaded some of its snapshot.
fn mid_download(node: &Proc) {
    loop {
        let p = node.wait_event("progress");
        if p["done"].as_u64().unwrap() > 0 && p["done"] != p["total"] {
            return;
        }
    }
}

#[test]
fn a_node_killed_with_sigkill_and_restarted_at_once_syncs() {
    let tmp = tempfile::tempdir().unwrap();
    let (producer, addr) = slow_producer(&tmp.path().join("producer"), &[]);
    let dir = tmp.path().join("node");
    let args = syncer_args(dir.to_str().unwrap(), &addr);
    let first = Proc::start(&args, "");
    let identity = first.wait_event("listening")["peer_id"].clone();
    mid_download(&first);
    // Killed: no goodbye to the holder, which still holds the dead connection.
    first.signal(libc::SIGKILL);
    drop(first);
    let started = Instant::now();
    let mut again = Proc::start(&args, "");
    assert_eq!(
        again.wait_event("listening")["peer_id"],
        identity,
        "same identity"
    );
    let resumed = again.wait_event("download_started");
    let synced = again.wait_event("synced");
    println!(
        "synced {:.1} s after the restart; resumed {} bytes; {synced}",
        started.elapsed().as_secs_f64(),
        resumed["resumed_bytes"]
    );
    assert_eq!(again.exit_code(Duration::from_secs(10)), Some(0));
    let made = producer.find_event("snapshot_created", |v| v["slot"] == synced["slot"]);
    assert_eq!(made["bank_hash"], synced["bank_hash"]);
}

#[test]
fn a_graceful_stop_closes_everything_and_the_holder_sees_it_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_tcp_port();
    let metrics = format!("127.0.0.1:{port}");
    let (producer, addr) = slow_producer(&tmp.path().join("producer"), &["--metrics", &metrics]);
    let dir = tmp.path().join("node");
    let node = Proc::start(&syncer_args(dir.to_str().unwrap(), &addr), "");
    let me = node.wait_event("listening")["peer_id"].clone();
    mid_download(&node);
    assert_eq!(metric(&metrics, "snapsync_active_transfers"), 1);
    let stopped = Instant::now();
    node.signal(libc::SIGINT);
    node.wait_event("shutdown");
    let mut node = node;
    assert_eq!(node.exit_code(Duration::from_secs(10)), Some(0));
    // The holder learns at once, not after an idle timeout.
    let gone = producer.find_event("peer_disconnected", |v| v["peer_id"] == me);
    println!(
        "holder saw the disconnect {:?} after the signal: {gone}",
        stopped.elapsed()
    );
    let deadline = Instant::now() + Duration::from_secs(3);
    while metric(&metrics, "snapsync_active_transfers") != 0 {
        assert!(
            Instant::now() < deadline,
            "the holder still counts a transfer"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(stopped.elapsed() < Duration::from_secs(5));
    // Progress was made durable: the next start resumes.
    let mut again = Proc::start(&syncer_args(dir.to_str().unwrap(), &addr), "");
    // The full snapshot's download resumes; the incremental on it may be a newer one (the
    // producer makes one every 25 slots), started afresh, and its event may come first.
    let started = again.find_event("download_started", |v| v["kind"] == "full");
    assert!(started["resumed_bytes"].as_u64().unwrap() > 0, "{started}");
    again.wait_event("synced");
    assert_eq!(again.exit_code(Duration::from_secs(10)), Some(0));
}

#[test]
fn unreachable_peers_are_reported_with_the_address_and_why() {
    let tmp = tempfile::tempdir().unwrap();
    // Nothing listens; nothing answers; no transport for it.
    let refused = "/ip4/127.0.0.1/tcp/1";
    let dead = "/ip4/127.0.0.1/udp/1/quic-v1";
    let unsupported = "/ip4/127.0.0.1/tcp/1/ws";
    let mut node = Proc::start(
        &on_loopback(
            tmp.path().to_str().unwrap(),
            &[
                "--peer",
                refused,
                "--peer",
                dead,
                "--peer",
                unsupported,
                "--exit-after-sync",
                "--timeout",
                "15",
            ],
        ),
        "",
    );
    let mut reported = std::collections::BTreeMap::new();
    while reported.len() < 3 {
        let v = node.wait_event("dial_failed");
        for a in v["addresses"].as_array().unwrap() {
            reported.insert(
                a["addr"].as_str().unwrap().to_string(),
                a["error"].as_str().unwrap().to_string(),
            );
        }
    }
    println!("{reported:?}");
    assert!(reported[refused].contains("refused"), "{reported:?}");
    assert!(reported[dead].contains("timed out"), "{reported:?}");
    assert!(
        reported[unsupported].contains("no transport"),
        "{reported:?}"
    );
    assert_eq!(node.exit_code(Duration::from_secs(30)), Some(2));
    let err = node.stderr_text();
    assert!(err.contains("could not reach"), "{err}");
    for addr in [refused, dead, unsupported] {
        assert!(err.contains(addr), "{addr} not named: {err}");
    }
}

#[test]
fn data_directory_mistakes_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let fs = common::Tmpfs::mount(1024);
    let ro = fs.path.join("node");
    std::fs::create_dir(&ro).unwrap();
    fs.make_read_only();
    let under_file = file.join("sub");
    // (The path, what is said, the path named.)
    for (dir, expect, named) in [
        (file.as_path(), "not a directory", file.as_path()),
        (under_file.as_path(), "not a directory", file.as_path()),
        (
            ro.as_path(),
            "snapshot directory is not writable",
            ro.as_path(),
        ),
    ] {
        let mut node = Proc::start(
            &[
                "--data-dir",
                dir.to_str().unwrap(),
                "--peer",
                "/ip4/127.0.0.1/udp/9/quic-v1",
            ],
            "",
        );
        assert_eq!(node.exit_code(Duration::from_secs(20)), Some(2), "{dir:?}");
        let err = node.stderr_text();
        assert!(err.contains(expect), "{dir:?}: {err}");
        assert!(
            err.contains(named.to_str().unwrap()),
            "names the path: {err}"
        );
    }
}

/// Trust finding 10: a second `node --data-dir D` beside a running one ran, and both then
/// failed every slot (and its open could delete an import in progress).
#[test]
fn a_second_node_on_a_data_directory_in_use_is_refused_at_once_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("node");
    let (first, _addr) = slow_producer(&dir, &[]);
    let started = Instant::now();
    let mut second = Proc::start(&on_loopback(dir.to_str().unwrap(), &["--produce"]), "");
    assert_eq!(second.exit_code(Duration::from_secs(20)), Some(2));
    assert!(started.elapsed() < Duration::from_secs(10), "at once");
    let err = second.stderr_text();
    assert!(err.contains("in use by another process"), "{err}");
    assert!(
        err.contains(dir.to_str().unwrap()),
        "names the directory: {err}"
    );
    // The first goes on making snapshots.
    first.wait_event("snapshot_created");
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One HTTP GET: status line, headers, body.
fn get(addr: &str, path: &str) -> (String, String, String) {
    let mut sock = std::net::TcpStream::connect(addr).unwrap();
    sock.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .unwrap();
    let mut response = String::new();
    sock.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let (status, headers) = head.split_once("\r\n").unwrap();
    (status.to_string(), headers.to_string(), body.to_string())
}

/// The value of an unlabelled series.
fn metric(addr: &str, name: &str) -> u64 {
    let (_, _, body) = get(addr, "/metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} missing:\n{body}"))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn metrics_are_openmetrics_on_slash_metrics_only_with_libp2p_beside() {
    let tmp = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_tcp_port());
    let p = Proc::start(
        &on_loopback(
            tmp.path().to_str().unwrap(),
            &[
                "--produce",
                "--slot-ms",
                "10",
                "--range-for-snapshot",
                "10",
                "--metrics",
                &addr,
            ],
        ),
        "",
    );
    p.wait_event("snapshot_created");
    let (status, headers, body) = get(&addr, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        headers.contains("Content-Type: application/openmetrics-text; version=1.0.0"),
        "{headers}"
    );
    assert!(
        body.trim_end().ends_with("# EOF"),
        "OpenMetrics ends with # EOF"
    );
    // Every documented series is there from the start, counters labelled in snake_case.
    for series in [
        "snapsync_served_bytes_total 0",
        "snapsync_downloaded_bytes_total 0",
        "snapsync_refused_connections_total{reason=\"too_slow\"} 0",
        "snapsync_active_transfers 0",
        "snapsync_snapshots_created_total{kind=\"full\"}",
        "snapsync_local_slot ",
        "snapsync_newest_snapshot_slot ",
    ] {
        assert!(body.contains(series), "{series} missing:\n{body}");
    }
    assert!(metric(&addr, "snapsync_local_slot") >= 10);
    // One series per kind (full, incremental): their sum.
    let created: u64 = body
        .lines()
        .filter(|l| l.starts_with("snapsync_snapshots_created_total"))
        .map(|l| l.split_whitespace().last().unwrap().parse::<u64>().unwrap())
        .sum();
    assert!(created >= 1, "{body}");
    // libp2p's own metrics share the registry.
    assert!(body.contains("libp2p_"), "no libp2p series:\n{body}");
    let (status, _, _) = get(&addr, "/");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    let (status, _, _) = get(&addr, "/metrics/extra");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
}
