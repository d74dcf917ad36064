//! A deterministic chain, executed by every producer of a test as every full node of a real
//! network executes the blocks: the same writes at the same slots, so the same state and the
//! same snapshots everywhere.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::{RngCore, SeedableRng};
use rand_xoshiro::SplitMix64;
use snapsync::db::LmdbState;
use tokio::sync::watch;

use super::net::NodeCtl;

/// The chain: `accounts` accounts of `value_len` bytes written at slot 1, then at every slot a
/// few updates, one hot account rewritten, and churn (a key created, deleted three slots later,
/// every seventh re-created).
#[derive(Debug, Clone, Copy)]
pub struct Chain {
    pub seed: u64,
    pub accounts: u64,
    pub value_len: usize,
}

/// The key every slot rewrites.
pub const HOT: &[u8] = b"hot";

/// Account `i`'s key.
pub fn account(i: u64) -> Vec<u8> {
    format!("account/{i:08}").into_bytes()
}

/// A churn key created at `slot`.
pub fn churn(slot: u64) -> Vec<u8> {
    format!("churn/{slot:08}").into_bytes()
}

/// A well-mixed function of `z`: one SplitMix64 step.
fn mix(z: u64) -> u64 {
    SplitMix64::seed_from_u64(z).next_u64()
}

impl Chain {
    /// Account `i`'s value as written at `slot`: half pseudo-random, half a pattern.
    pub fn value(&self, i: u64, slot: u64) -> Vec<u8> {
        let mut rng = super::Rng::new(mix(self.seed ^ i.rotate_left(32) ^ slot));
        let mut v = rng.bytes(self.value_len / 2);
        v.extend(std::iter::repeat_n(
            (i % 251) as u8,
            self.value_len - self.value_len / 2,
        ));
        v
    }

    /// Commits `slot`'s writes to `db` (slot 1 writes the initial state, in batches of
    /// `batch` accounts: how a node batches its writes does not change its state).
    pub fn commit(&self, db: &LmdbState, slot: u64, batch: u64) {
        if slot == 1 {
            let mut i = 0;
            while i < self.accounts {
                let end = (i + batch.max(1)).min(self.accounts);
                db.commit_slot(1, |w| {
                    for j in i..end {
                        w.put(&account(j), &self.value(j, 1))?;
                    }
                    Ok(())
                })
                .expect("genesis");
                i = end;
            }
            return;
        }
        let r = mix(self.seed ^ slot.rotate_left(17));
        db.commit_slot(slot, |w| {
            for k in 0..4u64 {
                let i = mix(r.wrapping_add(k)) % self.accounts;
                w.put(&account(i), &self.value(i, slot))?;
            }
            w.put(HOT, &slot.to_le_bytes())?;
            w.put(&churn(slot), &slot.to_le_bytes())?;
            if slot > 3 {
                w.delete(&churn(slot - 3))?;
            }
            if slot > 10 && slot.is_multiple_of(7) {
                w.put(&churn(slot - 7), b"again")?;
            }
            Ok(())
        })
        .expect("slot");
    }

    /// A DB with the chain executed through `slot`.
    pub fn reference(&self, slot: u64) -> (tempfile::TempDir, LmdbState) {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = LmdbState::open(dir.path().join("state")).expect("db");
        for s in 1..=slot {
            self.commit(&db, s, 4096);
        }
        (dir, db)
    }
}

/// The chain running on a set of producers: each slot is committed to each producer's DB and
/// reported to its behaviour (`on_slot`) before the next one.
pub struct Running {
    /// The slot every producer is at.
    pub slot: watch::Receiver<u64>,
    stop_at: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Starts the chain after slot `from` on `producers`, a slot every `slot_time`.
    pub fn start(chain: Chain, producers: Vec<NodeCtl>, from: u64, slot_time: Duration) -> Self {
        let (tx, slot) = watch::channel(from);
        let stop_at = Arc::new(AtomicU64::new(u64::MAX));
        let stop = stop_at.clone();
        let task = tokio::spawn(async move {
            let mut s = from;
            let mut tick = tokio::time::interval(slot_time);
            loop {
                tick.tick().await;
                if s >= stop.load(Ordering::Acquire) {
                    continue;
                }
                s += 1;
                for p in &producers {
                    let db = p.db.clone();
                    tokio::task::spawn_blocking(move || chain.commit(&db, s, 1024))
                        .await
                        .expect("commit");
                    p.query(move |sw| sw.behaviour_mut().snapsync.on_slot(s))
                        .await;
                }
                let _ = tx.send(s);
            }
        });
        Self {
            slot,
            stop_at,
            task,
        }
    }

    /// Stops after `slot` (or at once if past it); lets it go on with `u64::MAX`.
    pub fn stop_at(&self, slot: u64) {
        self.stop_at.store(slot, Ordering::Release);
    }

    /// The slot now.
    pub fn now(&self) -> u64 {
        *self.slot.borrow()
    }

    /// Waits until the chain is at `slot` at least.
    pub async fn reached(&mut self, slot: u64) {
        self.slot
            .wait_for(|s| *s >= slot)
            .await
            .expect("chain running");
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}
