//! The bank hash: a deterministic commitment to the state at a slot, kept up to date in time
//! proportional to the changes.
//!
//! # Definition (version 2)
//!
//! The state is an ordered map from byte-string keys to byte-string values. Each entry maps to
//! an element of the lattice `(Z / 2^16)^1024`:
//!
//! ```text
//! element(k, v) = BLAKE3-XOF(derive_key("snapsync 2026-11 lattice entry v2",
//!                                        u32_le(len(k)) || k || u32_le(len(v)) || v)),
//!                 first 2048 bytes, read as 1024 little-endian u16
//! lattice(state) = sum of element(k, v) over every entry, each u16 coordinate modulo 2^16
//! bank_hash(slot, state) = BLAKE3-derive_key("snapsync 2026-11 bank hash v2",
//!                                            u64_le(slot) || lattice as 1024 u16_le)
//! ```
//!
//! This is the lattice hash (LtHash, n = 1024, d = 16) that Solana's accounts lattice hash
//! (SIMD-0215) uses. A sum does not depend on the order of its terms, so the bank hash depends
//! only on the entries and the slot. It is *homomorphic*: changing the value of `k` from `a` to
//! `b` changes the lattice by `element(k, b) - element(k, a)`, so a DB keeps it up to date per
//! write, and a node applying an incremental snapshot checks the resulting state by updating
//! its own lattice with the changed entries only, never rescanning the state. Finding two
//! different states with one lattice reduces to a short-integer-solution lattice problem
//! believed to need well over 2^128 work at these parameters.
//!
//! The empty state's lattice is all zeros.

use std::fmt;

use crate::hash::BankHash;

/// The `blake3::derive_key` context of a lattice element.
pub const ELEMENT_CONTEXT: &str = "snapsync 2026-11 lattice entry v2";

/// The `blake3::derive_key` context of the bank hash.
pub const CONTEXT: &str = "snapsync 2026-11 bank hash v2";

/// Largest key a state may hold (1 MiB). Bounds what a loader holds in memory per entry.
pub const MAX_KEY_LEN: usize = 1 << 20;

/// Largest value a state may hold (64 MiB). Bounds what a loader holds in memory per entry.
pub const MAX_VALUE_LEN: usize = 64 << 20;

/// Number of 16-bit coordinates of a [`Lattice`].
pub const LATTICE_LEN: usize = 1024;

/// The lattice hash of a state: 1024 coordinates modulo 2^16 (see the module docs).
#[derive(Clone, PartialEq, Eq)]
pub struct Lattice([u16; LATTICE_LEN]);

impl Default for Lattice {
    fn default() -> Self {
        Self([0; LATTICE_LEN])
    }
}

impl fmt::Debug for Lattice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let digest = blake3::hash(&self.to_bytes());
        write!(f, "Lattice({})", &digest.to_hex()[..8])
    }
}

impl Lattice {
    /// The lattice of the empty state.
    pub fn new() -> Self {
        Self::default()
    }

    /// The lattice element of one entry.
    pub fn element(key: &[u8], value: &[u8]) -> Self {
        let mut hasher = blake3::Hasher::new_derive_key(ELEMENT_CONTEXT);
        hasher.update(&(key.len() as u32).to_le_bytes());
        hasher.update(key);
        hasher.update(&(value.len() as u32).to_le_bytes());
        hasher.update(value);
        let mut bytes = [0u8; LATTICE_LEN * 2];
        hasher.finalize_xof().fill(&mut bytes);
        let mut out = [0u16; LATTICE_LEN];
        for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
            *o = u16::from_le_bytes([c[0], c[1]]);
        }
        Self(out)
    }

    /// Adds the element of an entry (the entry joins the state).
    pub fn insert(&mut self, key: &[u8], value: &[u8]) {
        self.add(&Self::element(key, value));
    }

    /// Subtracts the element of an entry (the entry leaves the state).
    pub fn remove(&mut self, key: &[u8], value: &[u8]) {
        self.sub(&Self::element(key, value));
    }

    /// Accounts for `key` changing from `old` to `new` (`None`: absent).
    pub fn replace(&mut self, key: &[u8], old: Option<&[u8]>, new: Option<&[u8]>) {
        if old == new {
            return;
        }
        if let Some(old) = old {
            self.remove(key, old);
        }
        if let Some(new) = new {
            self.insert(key, new);
        }
    }

    /// Adds another lattice, coordinate by coordinate.
    pub fn add(&mut self, other: &Lattice) {
        for (a, b) in self.0.iter_mut().zip(other.0.iter()) {
            *a = a.wrapping_add(*b);
        }
    }

    /// Subtracts another lattice, coordinate by coordinate.
    pub fn sub(&mut self, other: &Lattice) {
        for (a, b) in self.0.iter_mut().zip(other.0.iter()) {
            *a = a.wrapping_sub(*b);
        }
    }

    /// The 2048-byte encoding: each coordinate as u16 little-endian.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.iter().flat_map(|c| c.to_le_bytes()).collect()
    }

    /// The inverse of [`Lattice::to_bytes`]; `None` when `bytes` is not 2048 bytes long.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != LATTICE_LEN * 2 {
            return None;
        }
        let mut out = [0u16; LATTICE_LEN];
        for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
            *o = u16::from_le_bytes([c[0], c[1]]);
        }
        Some(Self(out))
    }

    /// The bank hash of a state with this lattice at `slot`.
    pub fn bank_hash(&self, slot: u64) -> BankHash {
        let mut hasher = blake3::Hasher::new_derive_key(CONTEXT);
        hasher.update(&slot.to_le_bytes());
        hasher.update(&self.to_bytes());
        BankHash::from(hasher.finalize())
    }
}

/// Computes the bank hash of a state from its entries, in any order.
#[derive(Debug, Clone, Default)]
pub struct BankHasher {
    lattice: Lattice,
    entries: u64,
}

impl BankHasher {
    /// An empty state.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one entry.
    pub fn update(&mut self, key: &[u8], value: &[u8]) {
        self.lattice.insert(key, value);
        self.entries += 1;
    }

    /// Number of entries added.
    pub fn entries(&self) -> u64 {
        self.entries
    }

    /// The lattice so far.
    pub fn lattice(&self) -> &Lattice {
        &self.lattice
    }

    /// The bank hash of the entries added so far, at `slot`.
    pub fn finalize(&self, slot: u64) -> BankHash {
        self.lattice.bank_hash(slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash_of(slot: u64, entries: &[(&[u8], &[u8])]) -> BankHash {
        let mut h = BankHasher::new();
        for (k, v) in entries {
            h.update(k, v);
        }
        h.finalize(slot)
    }

    #[test]
    fn order_does_not_matter_and_slot_and_boundaries_do() {
        let a = hash_of(1, &[(b"k1", b"v1"), (b"k2", b"")]);
        assert_eq!(a, hash_of(1, &[(b"k2", b""), (b"k1", b"v1")]));
        assert_ne!(a, hash_of(2, &[(b"k1", b"v1"), (b"k2", b"")]));
        assert_ne!(
            hash_of(1, &[(b"ab", b"c")]),
            hash_of(1, &[(b"a", b"bc")]),
            "length prefixes separate key and value"
        );
        assert_ne!(hash_of(1, &[]), hash_of(2, &[]));
        assert_eq!(Lattice::new().bank_hash(7), hash_of(7, &[]));
    }

    #[test]
    fn updates_in_place_equal_a_recomputation() {
        let mut live = Lattice::new();
        live.insert(b"a", b"1");
        live.insert(b"b", b"2");
        live.replace(b"a", Some(b"1"), Some(b"3"));
        live.replace(b"b", Some(b"2"), None);
        live.replace(b"c", None, Some(b"4"));
        live.replace(b"d", None, None);
        let mut fresh = Lattice::new();
        fresh.insert(b"c", b"4");
        fresh.insert(b"a", b"3");
        assert_eq!(live, fresh);
        let mut back = fresh.clone();
        back.remove(b"a", b"3");
        back.remove(b"c", b"4");
        assert_eq!(back, Lattice::new());
        assert_eq!(Lattice::from_bytes(&fresh.to_bytes()), Some(fresh));
        assert_eq!(Lattice::from_bytes(&[0; 3]), None);
    }

    #[test]
    fn the_definition_is_the_documented_one() {
        // Built here from the definition, independently of Lattice::element.
        let mut xof = blake3::Hasher::new_derive_key(ELEMENT_CONTEXT);
        xof.update(&2u32.to_le_bytes());
        xof.update(b"k1");
        xof.update(&2u32.to_le_bytes());
        xof.update(b"v1");
        let mut bytes = [0u8; 2048];
        xof.finalize_xof().fill(&mut bytes);
        let mut h = blake3::Hasher::new_derive_key(CONTEXT);
        h.update(&9u64.to_le_bytes());
        h.update(&bytes);
        assert_eq!(hash_of(9, &[(b"k1", b"v1")]), BankHash::from(h.finalize()));
    }
}
