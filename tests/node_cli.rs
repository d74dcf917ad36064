//! The headless node example, driven as processes: a producer and a fresh node with
//! `--exit-after-sync` reach the same bank hash; a wrong token ends in a non-zero exit and a
//! clear message.

mod common;

use std::time::Duration;

use common::process::{Proc, on_loopback};

fn producer(dir: &std::path::Path, token: &str) -> (Proc, String) {
    producer_with(dir, token, &[])
}

/// [`producer`] with `more` arguments.
fn producer_with(dir: &std::path::Path, token: &str, more: &[&str]) -> (Proc, String) {
    let mut args = vec![
        "--produce",
        "--state-mib",
        "2",
        "--slot-ms",
        "20",
        "--range-for-snapshot",
        "25",
    ];
    args.extend_from_slice(more);
    let p = Proc::start(&on_loopback(dir.to_str().unwrap(), &args), token);
    let listening = p.wait_event("listening");
    let addr = listening["addrs"][0].as_str().unwrap().to_string();
    p.wait_event("snapshot_created");
    (p, addr)
}

fn syncer(dir: &std::path::Path, peer: &str, token: &str) -> Proc {
    Proc::start(
        &on_loopback(
            dir.to_str().unwrap(),
            &["--peer", peer, "--exit-after-sync", "--timeout", "60"],
        ),
        token,
    )
}

#[test]
fn a_fresh_node_syncs_the_producers_state_and_exits() {
    let tmp = tempfile::tempdir().unwrap();
    let (producer, addr) = producer(&tmp.path().join("producer"), "shared secret");
    let mut fresh = syncer(&tmp.path().join("fresh"), &addr, "shared secret");
    let synced = fresh.wait_event("synced");
    let status = fresh.child.wait().unwrap();
    assert!(status.success(), "{status}");
    let slot = synced["slot"].as_u64().unwrap();
    assert!(synced["bytes"].as_u64().unwrap() > 1 << 20);
    assert_eq!(synced["peers"].as_u64(), Some(1));
    // The producer made that very snapshot: same slot, same bank hash.
    let made = producer.find_event("snapshot_created", |v| {
        let made = v["slot"].as_u64().unwrap();
        assert!(made < slot + 100, "never saw slot {slot}");
        made == slot
    });
    assert_eq!(made["bank_hash"], synced["bank_hash"]);
}

/// The validator-set case with the examples: a producer signs what it makes and publishes it to
/// a directory a static web server serves (a bucket), then goes away; a node that trusts it
/// alone (`--trust-peer`) reaches no peer and syncs from the bucket, on the producer's
/// signature.
#[test]
fn a_node_trusting_a_gone_producer_syncs_from_its_bucket_on_its_signature() {
    let tmp = tempfile::tempdir().unwrap();
    let bucket = tmp.path().join("bucket");
    let bucket_arg = bucket.to_str().unwrap().to_string();
    let (producer, _) = producer_with(
        &tmp.path().join("producer"),
        "shared secret",
        &["--publish-dir", &bucket_arg],
    );
    let id = producer.find_event("listening", |_| true)["peer_id"]
        .as_str()
        .unwrap()
        .to_string();
    producer.wait_event("snapshot_created");
    let index = bucket.join("index.json");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&index).is_ok_and(|i| i.contains("\"signer\"")) {
        assert!(
            std::time::Instant::now() < deadline,
            "the bucket lists no signature"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(producer);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = rt.block_on(common::web::WebServer::start(
        bucket.clone(),
        common::web::Fault::None,
        None,
    ));
    let mut fresh = Proc::start(
        &on_loopback(
            tmp.path().join("fresh").to_str().unwrap(),
            &[
                "--trust-peer",
                &id,
                "--web-source",
                &server.url(),
                "--exit-after-sync",
                "--timeout",
                "60",
            ],
        ),
        "shared secret",
    );
    let synced = fresh.wait_event("synced");
    assert!(fresh.child.wait().unwrap().success());
    // A state the producer made and signed: its bucket lists it.
    let listed = std::fs::read_to_string(&index).unwrap();
    assert!(
        listed.contains(synced["bank_hash"].as_str().unwrap()),
        "{synced}"
    );
    drop(server);
}

#[test]
fn a_wrong_token_exits_non_zero_with_a_clear_message() {
    let tmp = tempfile::tempdir().unwrap();
    let (_producer, addr) = producer(&tmp.path().join("producer"), "right");
    let mut fresh = syncer(&tmp.path().join("fresh"), &addr, "wrong");
    let status = fresh.child.wait().unwrap();
    assert_eq!(status.code(), Some(2));
    // Let the stderr reader finish.
    std::thread::sleep(Duration::from_millis(200));
    let err = fresh.stderr.lock().unwrap().clone();
    assert!(err.contains("error: cannot sync"), "{err}");
    assert!(err.contains("SNAPSHOT_TOKEN"), "{err}");
}

#[test]
fn a_bad_chunk_size_is_refused_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let mut node = Proc::start_with(
        &[
            "--data-dir",
            tmp.path().to_str().unwrap(),
            "--peer",
            "/ip4/127.0.0.1/udp/9/quic-v1",
        ],
        &[("SNAPSHOT_CHUNK_SIZE", "3000")],
    );
    let status = node.child.wait().unwrap();
    assert_eq!(status.code(), Some(2));
    std::thread::sleep(Duration::from_millis(200));
    let err = node.stderr.lock().unwrap().clone();
    assert!(
        err.contains("chunk size 3000 is not a power of two"),
        "{err}"
    );
}

/// A chain's genesis: now, in milliseconds since the Unix epoch.
fn genesis_now() -> String {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        .to_string()
}

/// A node started in `dir` with `args`, and its first listen address.
fn validator(dir: &std::path::Path, args: &[&str]) -> (Proc, String) {
    let node = Proc::start(&on_loopback(dir.to_str().unwrap(), args), "t");
    let addr = node.wait_event("listening")["addrs"][0]
        .as_str()
        .unwrap()
        .to_string();
    (node, addr)
}

/// Chain arguments every validator of one chain shares.
fn chain_args(genesis: &str) -> Vec<&str> {
    vec![
        "--produce",
        "--state-mib",
        "2",
        "--slot-ms",
        "20",
        "--range-for-snapshot",
        "25",
        "--full-interval",
        "100",
        "--genesis-unix-ms",
        genesis,
        "--discovery-secs",
        "2",
    ]
}

#[test]
fn a_validator_started_behind_syncs_then_executes_and_makes_the_producers_snapshots() {
    let tmp = tempfile::tempdir().unwrap();
    let genesis = genesis_now();
    let (first, addr) = validator(&tmp.path().join("first"), &chain_args(&genesis));
    // The chain runs well past what a node may replay by itself (100 slots behind).
    first.find_event("snapshot_created", |v| v["slot"].as_u64().unwrap() >= 200);
    let dir = tmp.path().join("late");
    let mut args = chain_args(&genesis);
    args.extend(["--peer", &addr]);
    let late = Proc::start(&on_loopback(dir.to_str().unwrap(), &args), "t");
    let synced = late.wait_event("synced");
    let synced_slot = synced["slot"].as_u64().unwrap();
    assert!(synced_slot >= 200, "{synced}");
    // Then it executes on, and makes the same snapshots as the validator it synced from: an
    // incremental and a full one at least, same slots, bank hashes and content roots.
    let mut kinds = std::collections::HashSet::new();
    while kinds.len() < 2 {
        let made = late.wait_event("snapshot_created");
        let slot = made["slot"].as_u64().unwrap();
        if slot <= synced_slot {
            continue;
        }
        let theirs = first.find_event("snapshot_created", |v| v["slot"].as_u64() == Some(slot));
        for field in ["kind", "bank_hash", "content_root", "base_slot", "bytes"] {
            assert_eq!(made[field], theirs[field], "{field} at slot {slot}");
        }
        kinds.insert(made["kind"].as_str().unwrap().to_string());
    }
}

#[test]
fn a_validator_refuses_another_chains_state_by_its_own_state_root() {
    let tmp = tempfile::tempdir().unwrap();
    let genesis = genesis_now();
    // A producer of another chain (another seed) on the same clock: valid snapshots, their bank
    // hashes proven, of a state that is not this chain's.
    let mut args = chain_args(&genesis);
    args.extend(["--chain-seed", "2"]);
    let (other, addr) = validator(&tmp.path().join("other"), &args);
    other.find_event("snapshot_created", |v| v["slot"].as_u64().unwrap() >= 200);
    // A validator of this chain, behind, told only that peer: the chain's root (a light client
    // of its own) refuses every state it offers, and nothing is swapped in.
    let dir = tmp.path().join("late");
    let mut args = chain_args(&genesis);
    args.extend(["--peer", &addr]);
    let late = Proc::start(&on_loopback(dir.to_str().unwrap(), &args), "t");
    let failed = late.wait_event("sync_failed");
    let error = failed["error"].as_str().unwrap();
    assert!(error.contains("state check refused"), "{failed}");
    assert!(
        error.contains("differs from the chain's header"),
        "{failed}"
    );
    assert!(!late.saw("synced"), "it loaded the other chain's state");
}
