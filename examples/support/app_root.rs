//! The example chain's own state root, as a real chain's consensus commits to one: a hash chain
//! over every slot's executed writes, kept in the state under [`APP_ROOT`] and, like a block
//! header's, known to a light client without the state. It is not snapsync's bank hash; the
//! node's [`check`] compares the two worlds before a synced state goes live.

use std::sync::Mutex;

use snapsync::db::{CheckedState, StateVerdict};

/// Where the state keeps its root.
pub const APP_ROOT: &[u8] = b"app/root";

/// The root of the genesis state (slot 1): it commits to the chain's seed and size.
pub fn genesis_root(seed: u64, accounts: u64) -> [u8; 32] {
    *blake3::Hasher::new()
        .update(b"snapsync-example-chain/genesis/v1")
        .update(&seed.to_le_bytes())
        .update(&accounts.to_le_bytes())
        .finalize()
        .as_bytes()
}

/// The root after `slot`'s writes (`None`: a deletion) on a state whose root was `before`.
pub fn next_root(before: &[u8; 32], slot: u64, writes: &[(Vec<u8>, Option<Vec<u8>>)]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(b"snapsync-example-chain/slot/v1")
        .update(before)
        .update(&slot.to_le_bytes());
    for (key, value) in writes {
        h.update(&(key.len() as u64).to_le_bytes()).update(key);
        match value {
            Some(v) => h
                .update(&[1])
                .update(&(v.len() as u64).to_le_bytes())
                .update(v),
            None => h.update(&[0]),
        };
    }
    *h.finalize().as_bytes()
}

/// What a light client of the chain knows: the root at every slot up to the chain's head, from
/// the headers (here, computed from the chain's writes, as every header would carry it).
pub struct LightClient {
    chain: super::Chain,
    /// The last root computed, and its slot (memory stays flat however long the chain).
    last: Mutex<Option<(u64, [u8; 32])>>,
}

impl LightClient {
    pub fn new(chain: super::Chain) -> Self {
        Self {
            chain,
            last: Mutex::new(None),
        }
    }

    /// The chain's root at `slot`, or `None` for a slot the chain has not reached yet.
    pub fn root_at(&self, slot: u64) -> Option<[u8; 32]> {
        if slot == 0 || slot > self.chain.head() {
            return None;
        }
        let mut last = self.last.lock().expect("not poisoned");
        // Headers are read forward; an older slot is read again from genesis.
        let (mut at, mut root) = match *last {
            Some((at, root)) if at <= slot => (at, root),
            _ => (1, genesis_root(self.chain.seed, self.chain.accounts())),
        };
        while at < slot {
            at += 1;
            root = next_root(&root, at, &self.chain.writes(at));
        }
        *last = Some((at, root));
        Some(root)
    }

    /// The application's state check: a synced state goes live only with the chain's root.
    pub fn check(&self, state: &CheckedState<'_>) -> StateVerdict {
        let Some(header) = self.root_at(state.slot) else {
            return StateVerdict::Undecided(format!("no header for slot {} yet", state.slot));
        };
        match state.read.get(APP_ROOT) {
            Ok(Some(root)) if root == header => StateVerdict::Accept,
            Ok(Some(_)) => StateVerdict::Refuse(format!(
                "the state root at slot {} differs from the chain's header",
                state.slot
            )),
            Ok(None) => StateVerdict::Refuse("the state holds no root".into()),
            Err(e) => StateVerdict::Undecided(format!("reading the state root: {e}")),
        }
    }
}

impl snapsync::db::StateCheck for LightClient {
    fn check(&self, state: &CheckedState<'_>) -> StateVerdict {
        LightClient::check(self, state)
    }

    /// Its headers reach the chain's slot now: nothing newer is fetched.
    fn judges_up_to(&self) -> Option<u64> {
        Some(self.chain.head())
    }
}
