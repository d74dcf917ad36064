//! Test support shared by the integration tests.
#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::process::Command;

use rand::{RngCore, SeedableRng};
use rand_xoshiro::SplitMix64;
use snapsync::db::{LmdbState, StateDb};

/// A deterministic pseudo-random byte stream: SplitMix64, eight bytes of each output in turn
/// (a last part of fewer takes the first bytes of one), so the bytes of a seed never change.
pub struct Rng(SplitMix64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(SplitMix64::seed_from_u64(seed))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.fill(&mut v);
        v
    }
}

/// Key number `i` of the synthetic state.
pub fn key(i: u64) -> Vec<u8> {
    format!("account/{i:08}").into_bytes()
}

/// Value of key `i` at `version`: half random, half a repeating pattern (compressible).
pub fn value(i: u64, version: u64, len: usize) -> Vec<u8> {
    let mut rng = Rng::new(i.wrapping_mul(31).wrapping_add(version));
    let mut v = rng.bytes(len / 2);
    v.extend(std::iter::repeat_n((i % 251) as u8, len - len / 2));
    v
}

/// Opens the LMDB state in `dir/state`.
pub fn open_db(dir: &Path) -> LmdbState {
    LmdbState::open(dir.join("state")).expect("open state DB")
}

/// Writes `n` keys (values of `len` bytes) at `slot`, in batches of 1,000 per commit.
pub fn populate(db: &LmdbState, slot: u64, n: u64, len: usize) {
    let mut i = 0;
    while i < n {
        let end = (i + 1000).min(n);
        db.commit_slot(slot, |w| {
            for j in i..end {
                w.put(&key(j), &value(j, slot, len))?;
            }
            Ok(())
        })
        .expect("populate");
        i = end;
    }
}

/// Every entry of the DB's current state.
pub fn entries(db: &dyn StateDb) -> Vec<(Vec<u8>, Vec<u8>)> {
    let view = db.view().expect("view");
    let mut out = Vec::new();
    view.visit(&mut |k, v| {
        out.push((k.to_vec(), v.to_vec()));
        Ok(())
    })
    .expect("visit");
    out
}

/// Bank hash and slot of the DB's current state.
pub fn state_id(db: &dyn StateDb) -> (Option<u64>, snapsync::BankHash) {
    let view = db.view().expect("view");
    (view.slot(), view.bank_hash().expect("bank hash"))
}

/// Names of the entries of a directory, sorted.
pub fn dir_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Generations (LMDB files) in an `LmdbState` directory: one when no import is left over.
pub fn generations(dir: &Path) -> usize {
    dir_names(dir)
        .iter()
        .filter(|n| n.starts_with("gen-") && n.ends_with(".mdb"))
        .count()
}

/// A small tmpfs mounted for the length of a test (to fill a disk or make it read-only for
/// real, root or not). Unmounted on drop.
pub struct Tmpfs {
    pub path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    pub fn mount(size_kib: u64) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("mnt");
        std::fs::create_dir(&path).expect("mkdir");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_kib}k"), "tmpfs"])
            .arg(&path)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mounting a tmpfs needs root (CAP_SYS_ADMIN); these tests fill or write-protect a real file system"
        );
        Self { path, _dir: dir }
    }

    /// Remounts the file system read-only.
    pub fn make_read_only(&self) {
        let status = Command::new("mount")
            .args(["-o", "remount,ro"])
            .arg(&self.path)
            .status()
            .expect("run mount");
        assert!(status.success(), "remount read-only");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

pub mod chain;
pub mod net;
pub mod process;
pub mod relay;
pub mod web;
pub mod wire;

use std::sync::Arc;

use libp2p::identity::Keypair;
use snapsync::layers::snapshot::{CreateOptions, Snapshot, SnapshotStore, create_snapshot};

/// A node's disk: a state DB and a snapshot store in a temporary directory, and an identity.
pub struct Node {
    pub dir: tempfile::TempDir,
    pub db: LmdbState,
    pub store: SnapshotStore,
    pub keypair: Keypair,
}

impl Node {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = LmdbState::open(dir.path().join("state")).expect("db");
        let store = SnapshotStore::open(dir.path().join("snapshots")).expect("store");
        Self {
            dir,
            db,
            store,
            keypair: Keypair::generate_ed25519(),
        }
    }

    pub fn peer_id(&self) -> libp2p::PeerId {
        self.keypair.public().to_peer_id()
    }

    /// Fills the DB with about `kib` KiB of incompressible state at `slot` and snapshots it.
    pub fn with_snapshot(kib: u64, slot: u64, seed: u64) -> (Self, Arc<Snapshot>) {
        let node = Self::new();
        let mut rng = Rng::new(seed);
        let entries = kib / 4;
        let mut i = 0;
        while i < entries {
            let end = (i + 256).min(entries);
            node.db
                .commit_slot(slot, |w| {
                    for j in i..end {
                        w.put(&key(j), &rng.bytes(4096))?;
                    }
                    Ok(())
                })
                .unwrap();
            i = end;
        }
        let view = node.db.view().unwrap();
        let snap = create_snapshot(&node.store, view.as_ref(), &CreateOptions::default()).unwrap();
        (node, snap)
    }

    /// A node that holds a copy of `snap` (as if it had made or downloaded it).
    pub fn holding(snap: &Snapshot) -> Self {
        let node = Self::new();
        copy_snapshot(snap, node.store.dir());
        let store = SnapshotStore::open(node.store.dir()).unwrap();
        Self { store, ..node }
    }
}

impl Default for Node {
    fn default() -> Self {
        Self::new()
    }
}

/// Copies a published snapshot's directory into another store directory.
pub fn copy_snapshot(snap: &Snapshot, store_dir: &Path) {
    let target = store_dir.join(snap.dir().file_name().unwrap());
    std::fs::create_dir_all(&target).unwrap();
    for entry in std::fs::read_dir(snap.dir()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), target.join(entry.file_name())).unwrap();
    }
}

/// Installs a log subscriber for a test (RUST_LOG applies); repeated calls are harmless.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}
