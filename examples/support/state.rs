//! The benchmarks' synthetic state: account-like keys and values that compress like real ones,
//! written to an LMDB state in large transactions.

use std::path::Path;
use std::time::Instant;

use snapsync::db::{LmdbState, StateDb};

/// Length of every value, bytes.
pub const VALUE_LEN: usize = 1000;

/// Key `i`: 8 bytes of `i` (ascending) and 24 pseudo-random bytes, like an account address.
pub fn key(i: u64) -> [u8; 32] {
    let mut k = [0u8; 32];
    k[..8].copy_from_slice(&i.to_be_bytes());
    let h = blake3::hash(&i.to_le_bytes());
    k[8..].copy_from_slice(&h.as_bytes()[..24]);
    k
}

/// Value of `i`: 40% random (balances, hashes), 60% structured (small integers, padding).
pub fn value(i: u64, out: &mut Vec<u8>) {
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

/// The state DB under `dir`.
pub fn open_db(dir: &Path) -> LmdbState {
    LmdbState::open(dir.join("state")).unwrap()
}

/// Entries of a state of `target_mib`.
pub fn entries_for(target_mib: u64) -> u64 {
    (target_mib << 20) / (32 + VALUE_LEN as u64 + 8)
}

/// Writes a state of about `target_mib` at `slot` into the DB under `dir`, then forgets the
/// keys written, as the creator does once a full snapshot is made.
pub fn populate(dir: &Path, target_mib: u64, slot: u64) {
    let db = open_db(dir);
    let entries = entries_for(target_mib);
    let mut v = Vec::with_capacity(VALUE_LEN);
    let mut i = 0;
    let started = Instant::now();
    while i < entries {
        let end = (i + 20_000).min(entries);
        db.commit_slot(slot, |w| {
            for j in i..end {
                value(j, &mut v);
                w.put(&key(j), &v)?;
            }
            Ok(())
        })
        .unwrap();
        i = end;
    }
    db.prune_touched(slot).unwrap();
    eprintln!(
        "populated {entries} entries in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
