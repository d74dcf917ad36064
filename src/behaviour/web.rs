//! Web sources of a node (feature `web`): each base URL stands in discovery as an identity of
//! its own that nobody holds the key of, and what its index lists is an advert of that identity
//! like an untrusted peer's: a candidate the trust policy weighs, never more. The indexes are
//! read when the node asks its peers, one request at a time per source.

use std::task::{Context, Poll};
use std::time::Duration;

use libp2p::PeerId;
use tokio::sync::mpsc;

use super::Config;
use crate::config_error::ConfigError;
use crate::discovery::{Advert, SnapshotAd};
use crate::log::DISCOVERY as TARGET;
use crate::transfer::{WebError, WebListing, WebRoots, WebSource};

/// Most snapshots of one index taken as an advert (the newest).
const MAX_LISTED: usize = 8;

/// A node's web sources and the index reads under way.
pub(super) struct WebSources {
    sources: Vec<(PeerId, WebSource, bool)>,
    tx: mpsc::Sender<(usize, Result<Vec<WebListing>, WebError>)>,
    rx: mpsc::Receiver<(usize, Result<Vec<WebListing>, WebError>)>,
    timeout: Duration,
}

impl WebSources {
    /// The sources `config` names, HTTPS servers checked against the roots it trusts; an URL
    /// that is not one, or a CA bundle that cannot be used, is an error naming it.
    pub(super) fn new(config: &Config) -> Result<Self, ConfigError> {
        let (urls, ca_files) = (config.web_sources(), config.web_ca_files());
        let timeout = config.download().connect_timeout();
        if urls.is_empty() && ca_files.is_empty() {
            // No web source: the trust stores are not read at all.
            let (tx, rx) = mpsc::channel(1);
            return Ok(Self {
                sources: Vec::new(),
                tx,
                rx,
                timeout,
            });
        }
        let roots = WebRoots::new(ca_files).map_err(|e| {
            ConfigError::new("web_ca_files", "readable PEM CA bundles", e.to_string())
        })?;
        let sources = urls
            .iter()
            .map(|u| Ok((PeerId::random(), WebSource::with_roots(u, &roots)?, false)))
            .collect::<Result<Vec<_>, WebError>>()
            .map_err(|e| ConfigError::new("web_sources", "http(s) URLs", e.to_string()))?;
        let (tx, rx) = mpsc::channel(sources.len().max(1));
        Ok(Self {
            sources,
            tx,
            rx,
            timeout,
        })
    }

    /// The web source that stands as `peer`, if one does.
    pub(super) fn get(&self, peer: &PeerId) -> Option<WebSource> {
        self.sources
            .iter()
            .find(|(p, ..)| p == peer)
            .map(|(_, s, _)| s.clone())
    }

    /// Reads every index not being read already.
    pub(super) fn ask_all(&mut self) {
        for (i, (_, source, busy)) in self.sources.iter_mut().enumerate() {
            if *busy {
                continue;
            }
            *busy = true;
            let (source, tx, timeout) = (source.clone(), self.tx.clone(), self.timeout);
            tokio::spawn(async move {
                let result = source.index(timeout).await;
                let _ = tx.send((i, result)).await;
            });
        }
    }

    /// An index read that ended, as the advert of its source's identity.
    pub(super) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Option<Advert>> {
        let Poll::Ready(Some((i, result))) = self.rx.poll_recv(cx) else {
            return Poll::Pending;
        };
        let (peer, source, busy) = &mut self.sources[i];
        *busy = false;
        match result {
            Ok(listed) => {
                let mut listed = listed;
                listed.sort_by_key(|l| std::cmp::Reverse(l.ad.key.slot));
                listed.truncate(MAX_LISTED);
                let (snapshots, attestations): (Vec<SnapshotAd>, Vec<_>) =
                    listed.into_iter().map(|l| (l.ad, l.attestations)).unzip();
                tracing::debug!(target: TARGET, %source, snapshots = snapshots.len(), "read a web source's index");
                if snapshots.is_empty() {
                    return Poll::Ready(None);
                }
                Poll::Ready(Some(Advert {
                    peer: *peer,
                    modified_time: 0,
                    holder_slot: None,
                    streamer_addrs: Vec::new(),
                    partial: Vec::new(),
                    partial_attestations: Vec::new(),
                    snapshots,
                    attestations,
                }))
            }
            Err(e) => {
                tracing::warn!(target: TARGET, %source, error = %e, "cannot read a web source's index");
                Poll::Ready(None)
            }
        }
    }
}
