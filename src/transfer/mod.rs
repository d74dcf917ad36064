//! The QUIC chunk stream: the [`Streamer`] that serves snapshots and the [`Downloader`] that
//! fetches one snapshot from many peers at once, checking every chunk against its content root.
//!
//! Both run over quinn with TLS bound to the node's libp2p identity (see [`TransportTuning`]).
//! Each side of a connection proves it knows the shared [`Token`] (`SNAPSHOT_TOKEN`) without
//! sending it, before anything is served. The wire protocol is specified in `docs/FORMAT.md`.

mod download;
#[cfg(feature = "sim")]
pub use download::swarm;
/// What the streamer and the downloads share: partial downloads offered for serving, and
/// what each peer gave lately.
pub(crate) mod exchange;
mod limit;
mod protocol;
mod rate;
mod streamer;
mod tls;
// Without the feature `web` the web source type exists with no values: a download names one
// kind of source either way.
#[cfg_attr(not(feature = "web"), path = "web_off.rs")]
mod web;
#[cfg(feature = "web")]
mod web_roots;
pub use web::WebSource;
#[cfg(feature = "web")]
pub use {
    web::{MAX_INDEX_BYTES, MAX_INDEX_SNAPSHOTS, WebError, WebListing},
    web_roots::{RootsError, WebRoots},
};

pub use download::{
    DownloadConfig, DownloadError, DownloadHandle, DownloadTarget, Downloaded, Downloader, Holding,
    Origin, PeerProgress, PeerStatus, Progress, WebProgress,
};

#[cfg(test)]
pub(crate) use download::{Bits, progress_bytes};
#[cfg(any(fuzzing, test))]
pub(crate) use download::{have_from_bytes, parse_progress};
pub use streamer::{Streamer, StreamerConfig, StreamerError, StreamerStats};
pub use tls::{EndpointError, TransportTuning};
#[cfg(all(feature = "web", any(fuzzing, test)))]
pub(crate) use web::parse_index;

use std::fmt;
use std::net::SocketAddr;

use libp2p::PeerId;

use crate::log::{DOWNLOAD as DOWNLOAD_TARGET, STREAMER as STREAMER_TARGET};

/// Environment variable holding the shared token.
pub const TOKEN_ENV: &str = "SNAPSHOT_TOKEN";

/// The shared secret the chunk stream's two sides prove they know (`SNAPSHOT_TOKEN`). It never
/// leaves the node: the handshake sends proofs bound to each TLS session, not the token. Never
/// printed: its `Debug` shows `Token(<redacted>)`.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(Vec<u8>);

impl Token {
    /// A token of these bytes.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Self(bytes.into())
    }

    /// A new random token: 32 random bytes as 64 hex characters, fit for `SNAPSHOT_TOKEN`. A
    /// recorded proof lets anyone try guesses offline, so a token should be this strong.
    pub fn generate() -> Self {
        let bytes: [u8; 32] = rand::random();
        Self(blake3::Hash::from_bytes(bytes).to_hex().as_bytes().to_vec())
    }

    /// The token in `SNAPSHOT_TOKEN`, or `None` when it is unset or empty.
    pub fn from_env() -> Option<Self> {
        match std::env::var_os(TOKEN_ENV) {
            Some(v) if !v.is_empty() => Some(Self(v.into_encoded_bytes())),
            _ => None,
        }
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// A peer's chunk stream: who it is and where it listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerAddr {
    /// The peer's libp2p identity; the TLS handshake fails against anyone else.
    pub peer_id: PeerId,
    /// Its streamer's UDP address.
    pub addr: SocketAddr,
}
