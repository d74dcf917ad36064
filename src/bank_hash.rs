//! The bank hash: a deterministic commitment to the state at a slot.
//!
//! # Definition (version 1)
//!
//! The state is an ordered map from byte-string keys to byte-string values. Its bank hash at
//! slot `s` is
//!
//! ```text
//! bank_hash = BLAKE3-derive_key("snapsync 2026-11 bank hash v1",
//!                               u64_le(s) || record(k1, v1) || record(k2, v2) || ...)
//! record(k, v) = u32_le(len(k)) || k || u32_le(len(v)) || v
//! ```
//!
//! where `k1 < k2 < ...` in plain byte-wise (lexicographic) order. The encoding is
//! prefix-free, so different states never feed the hash the same bytes. Because the entries are
//! taken in key order, the hash depends only on the entries and the slot, never on the order the
//! writes came in. The same `record` encoding is what the snapshot archive stores (see
//! `docs/FORMAT.md`), so a creator hashes the very bytes it compresses.

use crate::hash::BankHash;

/// The `blake3::derive_key` context of bank hash version 1.
pub const CONTEXT: &str = "snapsync 2026-11 bank hash v1";

/// Largest key a state may hold (1 MiB). Bounds what a loader holds in memory per entry.
pub const MAX_KEY_LEN: usize = 1 << 20;

/// Largest value a state may hold (64 MiB). Bounds what a loader holds in memory per entry.
pub const MAX_VALUE_LEN: usize = 64 << 20;

/// Records are gathered into a buffer of this size before they are hashed, so that BLAKE3 hashes
/// many 1 KiB chunks at once (SIMD) instead of one small entry at a time.
const HASH_BUFFER: usize = 64 << 10;

/// Computes a bank hash over entries given in ascending key order.
#[derive(Debug, Clone)]
pub struct BankHasher {
    hasher: blake3::Hasher,
    buf: Vec<u8>,
    entries: u64,
}

impl BankHasher {
    /// Starts the bank hash of the state at `slot`.
    pub fn new(slot: u64) -> Self {
        let mut hasher = blake3::Hasher::new_derive_key(CONTEXT);
        hasher.update(&slot.to_le_bytes());
        Self {
            hasher,
            buf: Vec::new(),
            entries: 0,
        }
    }

    /// Adds one entry. Entries must come in strictly ascending key order; the caller checks it.
    pub fn update(&mut self, key: &[u8], value: &[u8]) {
        if self.buf.capacity() == 0 {
            self.buf.reserve_exact(HASH_BUFFER + 1024);
        }
        if key.len() + value.len() + 8 > HASH_BUFFER - self.buf.len() {
            self.hasher.update(&self.buf);
            self.buf.clear();
        }
        if key.len() + value.len() + 8 > HASH_BUFFER {
            // Large entries go straight to the hasher.
            self.hasher.update(&(key.len() as u32).to_le_bytes());
            self.hasher.update(key);
            self.hasher.update(&(value.len() as u32).to_le_bytes());
            self.hasher.update(value);
        } else {
            encode_record(&mut self.buf, key, value);
        }
        self.entries += 1;
    }

    /// Adds already encoded record bytes (`record(k, v)` above, possibly a part of one); the
    /// caller counts the entries.
    pub(crate) fn update_raw(&mut self, records: &[u8]) {
        if !self.buf.is_empty() {
            self.hasher.update(&self.buf);
            self.buf.clear();
        }
        self.hasher.update(records);
    }

    /// Number of entries added so far.
    pub fn entries(&self) -> u64 {
        self.entries
    }

    /// The bank hash of the entries added so far.
    pub fn finalize(&self) -> BankHash {
        let mut hasher = self.hasher.clone();
        hasher.update(&self.buf);
        BankHash::from(hasher.finalize())
    }
}

/// Appends `record(key, value)` to `out`.
pub(crate) fn encode_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    out.extend_from_slice(&(key.len() as u32).to_le_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    out.extend_from_slice(value);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_entries_agree() {
        let mut a = BankHasher::new(7);
        a.update(b"k1", b"v1");
        a.update(b"k2", b"");
        let mut buf = Vec::new();
        encode_record(&mut buf, b"k1", b"v1");
        encode_record(&mut buf, b"k2", b"");
        let mut b = BankHasher::new(7);
        b.update_raw(&buf[..5]);
        b.update_raw(&buf[5..]);
        assert_eq!(a.finalize(), b.finalize());
        assert_eq!(a.entries(), 2);
    }

    #[test]
    fn buffering_does_not_change_the_hash() {
        // Entries of every size around the buffer boundary, hashed entry by entry and as one
        // encoded stream.
        let mut by_entry = BankHasher::new(3);
        let mut stream = Vec::new();
        let mut n = 0;
        for (i, len) in [
            0usize,
            1,
            1000,
            HASH_BUFFER - 9,
            HASH_BUFFER,
            3 * HASH_BUFFER,
            5,
        ]
        .into_iter()
        .enumerate()
        {
            let key = [i as u8; 3];
            let value = vec![i as u8; len];
            by_entry.update(&key, &value);
            encode_record(&mut stream, &key, &value);
            n += 1;
        }
        let mut raw = blake3::Hasher::new_derive_key(CONTEXT);
        raw.update(&3u64.to_le_bytes());
        raw.update(&stream);
        assert_eq!(by_entry.finalize(), BankHash::from(raw.finalize()));
        assert_eq!(by_entry.entries(), n);
    }

    #[test]
    fn slot_and_boundaries_matter() {
        let hash = |slot: u64, entries: &[(&[u8], &[u8])]| {
            let mut h = BankHasher::new(slot);
            for (k, v) in entries {
                h.update(k, v);
            }
            h.finalize()
        };
        let base = hash(1, &[(b"ab", b"c")]);
        assert_ne!(base, hash(2, &[(b"ab", b"c")]));
        assert_ne!(base, hash(1, &[(b"a", b"bc")]));
        assert_ne!(hash(1, &[]), hash(2, &[]));
    }
}
