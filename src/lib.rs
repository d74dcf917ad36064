//! # snapsync
//!
//! Peer-to-peer state snapshot sync for libp2p nodes, with no bootstrap node. A node's state
//! lives in a key-value DB that advances in numbered slots; snapsync lets nodes bootstrap and
//! catch up from each other's snapshots:
//!
//! - **Create** ([`snapshot::Creator`]): every `range_for_snapshot` slots a snapshot is written
//!   in the background from a consistent view of the DB and published atomically: a full one
//!   every `full_interval` slots, and between them incremental ones holding what changed since
//!   the full one, made in time proportional to the changes.
//! - **Discover and decide** ([`Behaviour`]): a [`libp2p::swarm::NetworkBehaviour`] that
//!   composes into any swarm. A node that is not known to be current asks over its own
//!   gossipsub topic and directly asks its connected peers; holders answer directly; the
//!   snapshots the [`TrustPolicy`] accepts are chosen. The rules are a sans-IO state machine.
//! - **Transfer** ([`transfer`]): a QUIC chunk stream; the [`transfer::Downloader`] fetches one
//!   snapshot from many peers at once and checks every chunk against the snapshot's
//!   [`ContentRoot`] (the BLAKE3 hash of the archive) with a tree proof ([`chunk`]); it resumes
//!   after a restart. Both sides prove a shared token without ever sending it.
//! - **Load** ([`snapshot::load_chain`]): a full snapshot is imported into a fresh DB beside
//!   the live one while it downloads, an incremental one applied in one transaction; the
//!   [`BankHash`] of the result is checked (for an incremental, in time proportional to the
//!   changes: the bank hash is a lattice hash, see [`bank_hash`]) before anything goes live.
//!
//! The DB is reached only through the [`db::StateDb`] trait; [`db::LmdbState`] is the embedded
//! default. Formats and protocols are specified in `docs/FORMAT.md`.
//!
//! # Use it in your swarm
//!
//! ```toml
//! [dependencies]
//! snapsync = { version = "0.2", features = ["quic"] }   # "quic", "tcp", "mdns": for your swarm
//! tokio = { version = "1", features = ["rt-multi-thread", "macros"] }
//! ```
//!
//! Use libp2p through `snapsync::libp2p`, so the versions cannot drift apart:
//!
//! ```no_run
//! use std::sync::Arc;
//!
//! use snapsync::libp2p::futures::StreamExt;
//! use snapsync::libp2p::swarm::{NetworkBehaviour, SwarmEvent};
//! use snapsync::libp2p::{SwarmBuilder, gossipsub};
//!
//! #[derive(NetworkBehaviour)]
//! #[behaviour(prelude = "snapsync::libp2p::swarm::derive_prelude")]
//! struct MyNode {
//!     chat: gossipsub::Behaviour,
//!     snapsync: snapsync::Behaviour,
//! }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//!     // Your state DB (or your own `snapsync::db::StateDb` implementation).
//!     let db = Arc::new(snapsync::db::LmdbState::open("data/state")?);
//!     // Defaults, plus SNAPSHOT_TOKEN and SNAPSHOT_CHUNK_SIZE from the environment.
//!     let config = snapsync::Config::from_env("data/snapshots")?;
//!     let mut swarm = SwarmBuilder::with_new_identity()
//!         .with_tokio()
//!         .with_quic()
//!         .with_behaviour(|key| {
//!             let chat = gossipsub::Behaviour::new(
//!                 gossipsub::MessageAuthenticity::Signed(key.clone()),
//!                 gossipsub::Config::default(),
//!             )?;
//!             let snapsync = snapsync::Behaviour::new(key, db.clone(), config)?;
//!             Ok(MyNode { chat, snapsync })
//!         })?
//!         .build();
//!     swarm.listen_on("/ip4/0.0.0.0/udp/0/quic-v1".parse()?)?;
//!     loop {
//!         // After committing slot `n` to the DB, your slot loop calls
//!         // `swarm.behaviour_mut().snapsync.on_slot(n)`; a snapshot is made when one is due.
//!         if let SwarmEvent::Behaviour(MyNodeEvent::Snapsync(event)) = swarm.select_next_some().await {
//!             println!("{event:?}");
//!         }
//!     }
//! }
//! ```
//!
//! # What is where
//!
//! The root holds what a node needs: the [`Behaviour`], its [`Config`] (with
//! [`DiscoveryConfig`] and the [`TrustPolicy`], a [`SnapshotVerifier`] and a [`ChainClock`]),
//! its [`Event`]s and [`Status`] (what they carry is in [`event`]), the errors, the two hashes
//! ([`BankHash`], [`ContentRoot`]) and [`Metrics`]; [`db`] is the seam to the state DB. Semver
//! covers these. The lower layers the behaviour is built from are in [`layers`] (snapshots,
//! the chunk stream, proofs, the bank hash), public for tools, benchmarks and tests, with a
//! semver note of their own.
//!
//! In debug builds, build the dependencies optimized (QUIC crypto, BLAKE3, zstd and LMDB are
//! ten times slower without): `[profile.dev.package."*"] opt-level = 3`.
#![warn(missing_docs, unreachable_pub)]

mod behaviour;
mod config_error;
pub mod db;
mod discovery;
mod disk;
mod frame;
mod hash;
pub mod log;
mod metrics;

pub mod layers;
pub(crate) use layers::{bank_hash, chunk, snapshot, transfer};

/// The libp2p snapsync is built on, re-exported so that a node uses the very same version.
pub use libp2p;

/// Protobuf messages of `proto/snapsync.proto` (generated by `prost`): wire types, not API. Hidden
/// from the documentation and outside semver; reachable only so that the fuzz targets and the
/// wire-level tests can build hostile messages.
#[doc(hidden)]
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/snapsync.v2.rs"));
}

/// Entry points of the fuzz targets in `fuzz/` (built with `--cfg fuzzing`), and of the test
/// that checks their seeds.
#[cfg(any(fuzzing, test))]
#[doc(hidden)]
pub mod fuzz;

/// The behaviour's own protocols, named by its connection handler type; not part of the API.
#[doc(hidden)]
pub use behaviour::wire;
pub use behaviour::{Behaviour, BehaviourError, Config, Event, Status, SyncError};
pub use config_error::ConfigError;
#[cfg(feature = "sim")]
pub use discovery::sim;
pub use discovery::{ChainClock, DiscoveryConfig, SnapshotVerifier, TrustPolicy};
pub use hash::{BankHash, ContentRoot, DigestError};
pub use metrics::Metrics;

/// What [`Event`]s and [`Status`] carry: the phase of a sync, what peers advertise, why a dial
/// failed, discovery's counters.
pub mod event {
    pub use crate::behaviour::{DialFailure, DiscoveryStats, Phase};
    pub use crate::discovery::{Advert, Conflict, PartialAd, SnapshotAd};
}
#[cfg(feature = "sim")]
pub use transfer::swarm;
