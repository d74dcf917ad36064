//! What the node holds, told to discovery: the DB's slot and the snapshots in the store (made
//! here, or synced), mirrored into the publish directory, and what it serves of the snapshots
//! it downloads.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use super::{Behaviour, Event, TARGET};
use crate::discovery::Local;

impl Behaviour {
    /// Tells discovery what the node holds now.
    pub(super) fn refresh_local(&mut self) {
        let slot = self.db.slot().unwrap_or_else(|e| {
            tracing::warn!(target: TARGET, error = %e, "cannot read the DB's slot");
            None
        });
        let mut held = self.store.list();
        // A download may publish a snapshot after it was judged bad: it goes now.
        let condemned = |s: &std::sync::Arc<crate::snapshot::Snapshot>| {
            self.condemned.contains(&s.manifest().content_root)
        };
        if held.iter().any(condemned) {
            for snap in held.iter().filter(|s| condemned(s)) {
                if let Err(e) = self.store.remove(snap) {
                    tracing::warn!(target: TARGET, root = %snap.manifest().content_root.short(), error = %e, "could not delete a snapshot proven bad");
                }
            }
            held = self.store.list();
        }
        let (snapshots, modified_time) =
            crate::discovery::advertised(held.iter().map(|s| s.manifest()));
        if let Some(newest) = snapshots.iter().map(|s| s.key.slot).max() {
            self.metrics
                .newest_snapshot_slot
                .set(newest.min(i64::MAX as u64) as i64);
        }
        if let Some(s) = slot {
            self.metrics.local_slot.set(s.min(i64::MAX as u64) as i64);
        }
        let attestations = held
            .iter()
            .filter(|s| !s.attestations().is_empty())
            .map(|s| (s.manifest().key(), s.attestations().to_vec()))
            .collect();
        self.discovery.handle_local(Local {
            slot,
            snapshots,
            attestations,
            modified_time,
            chunk_size: Some(self.config.creator().options().chunk_size()),
        });
        self.refresh_partials();
        self.mirror();
    }

    /// Mirrors the store into the publish directory, if one is set, in the background.
    fn mirror(&self) {
        let Some(dir) = self.config.publish_dir().map(|d| d.to_path_buf()) else {
            return;
        };
        let (store, lock) = (self.store.clone(), self.publishing.clone());
        tokio::task::spawn_blocking(move || {
            let _one = lock.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = crate::snapshot::mirror(&store, &dir) {
                tracing::warn!(target: TARGET, dir = %dir.display(), error = %e, "could not publish the snapshots");
            }
        });
    }

    /// What this node serves of the snapshots it downloads.
    pub(super) fn partial_holdings(&self) -> Vec<crate::discovery::PartialAd> {
        self.store
            .exchange()
            .all_offered()
            .iter()
            .map(|o| crate::discovery::PartialAd {
                ad: crate::discovery::SnapshotAd::of(&o.manifest),
                verified_bytes: (o.verified.count() * u64::from(o.manifest.chunk_size.bytes()))
                    .min(o.manifest.archive_size),
            })
            .collect()
    }

    /// Tells discovery what this node serves of the snapshots it downloads.
    pub(super) fn refresh_partials(&mut self) {
        let partials = self.partial_holdings();
        self.discovery.handle_partials(partials, Instant::now());
    }

    /// A snapshot being made ended.
    pub(super) fn poll_creating(&mut self, cx: &mut Context<'_>) -> bool {
        for i in 0..self.creating.len() {
            if let Poll::Ready(result) = Pin::new(&mut self.creating[i]).poll(cx) {
                drop(self.creating.swap_remove(i));
                match result {
                    Ok(snap) => {
                        self.metrics.created(snap.manifest().kind);
                        self.refresh_local();
                        self.discovery.handle_snapshot_created(Instant::now());
                        self.push_event(Event::SnapshotCreated {
                            manifest: snap.manifest().clone(),
                        });
                    }
                    Err(e) => self.push_event(Event::CreationFailed(e)),
                }
                return true;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::db::{LmdbState, StateDb};
    use crate::discovery::Action;
    use crate::snapshot::create_snapshot;
    use crate::transfer::StreamerConfig;

    /// A load can be refused while its archive still arrives, so the judgement (delete this
    /// snapshot) may come before the download publishes it: the snapshot goes when it appears.
    #[tokio::test]
    async fn a_snapshot_condemned_before_it_is_published_goes_when_it_appears() {
        let dir = tempfile::tempdir().unwrap();
        let db = LmdbState::open(dir.path().join("db")).unwrap();
        db.commit_slot(10, |w| w.put(b"k", b"v")).unwrap();
        let config = crate::Config::new(dir.path().join("snapshots"))
            .with_streamer(StreamerConfig::default().with_listen("127.0.0.1:0".parse().unwrap()));
        let db: Arc<dyn StateDb> = Arc::new(db);
        let keypair = libp2p::identity::Keypair::generate_ed25519();
        let mut b = crate::Behaviour::new(&keypair, db.clone(), config).unwrap();
        // The same snapshot made elsewhere names the root the refusal is about.
        let elsewhere = crate::snapshot::SnapshotStore::open(dir.path().join("other")).unwrap();
        let view = db.view().unwrap();
        let root = create_snapshot(&elsewhere, view.as_ref(), &Default::default())
            .unwrap()
            .manifest()
            .content_root;
        b.carry_out(Action::DeleteSnapshot(root));
        assert!(b.store.get(&root).is_none(), "nothing to delete yet");
        // The download publishes it afterwards.
        let published = create_snapshot(&b.store, view.as_ref(), &Default::default()).unwrap();
        assert_eq!(published.manifest().content_root, root);
        assert!(b.store.get(&root).is_some());
        b.refresh_local();
        assert!(b.store.get(&root).is_none(), "removed once it appeared");
        assert!(!published.dir().exists());
    }
}
