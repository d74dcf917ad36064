//! The lower layers the [`Behaviour`](crate::Behaviour) is built from, for tools, benchmarks
//! and tests: [`snapshot`] (create, store, load), [`transfer`] (the chunk stream's server and
//! downloader), [`chunk`] (verifiable chunks and their proofs) and [`bank_hash`].
//!
//! They follow the crate's version but, unlike the root, may change in a minor release: pin an
//! exact version (`snapsync = "=x.y.z"`) to build on them.

#[path = "bank_hash.rs"]
pub mod bank_hash;
#[path = "chunk/mod.rs"]
pub mod chunk;
#[path = "snapshot/mod.rs"]
pub mod snapshot;
#[path = "transfer/mod.rs"]
pub mod transfer;
