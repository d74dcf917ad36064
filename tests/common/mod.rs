//! Test support shared by the integration tests.
#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::process::Command;

use snapsync::db::{RedbState, StateDb};

/// A deterministic pseudo-random byte stream (SplitMix64).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
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

/// Opens a redb state at `dir/state.redb`.
pub fn open_db(dir: &Path) -> RedbState {
    RedbState::open(dir.join("state.redb")).expect("open state DB")
}

/// Writes `n` keys (values of `len` bytes) at `slot`, in batches of 1,000 per commit.
pub fn populate(db: &RedbState, slot: u64, n: u64, len: usize) {
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
