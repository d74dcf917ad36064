//! What the node holds, told to discovery: the DB's slot and the snapshots in the store (made
//! here, or synced), mirrored into the publish directory, and what it serves of the snapshots
//! it downloads.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use super::{Behaviour, Event, TARGET};
use crate::discovery::Local;

/// What the publish directory reflects of the store: each snapshot's manifest (a count
/// correction rewrites it) and the attestations kept with it, by content root.
type Listing = Vec<(crate::snapshot::Manifest, Vec<crate::snapshot::Attestation>)>;

/// The listing of `held`.
fn listing(held: &[std::sync::Arc<crate::snapshot::Snapshot>]) -> Listing {
    let mut l: Listing = (held.iter())
        .map(|s| (s.manifest().clone(), s.attestations().to_vec()))
        .collect();
    l.sort_by_key(|(m, _)| m.content_root);
    l
}

/// Mirroring the store into the publish directory: one mirror at a time, and the listing the
/// directory reflects.
#[derive(Debug, Default)]
pub(super) struct Publishing {
    /// What the last mirror that worked left in the directory (none after one that failed).
    mirrored: std::sync::Mutex<Option<Listing>>,
    /// A mirror runs.
    running: std::sync::atomic::AtomicBool,
    /// The store changed while it ran: it goes again.
    again: std::sync::atomic::AtomicBool,
}

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
            chunk_size: Some(self.config.chunk_size()),
        });
        self.refresh_partials();
        self.mirror(&held);
    }

    /// Mirrors the store into the publish directory, if one is set and the store's listing
    /// changed since the last mirror that worked, in the background: one task at a time, which
    /// goes again while the store changed under it (a slow copy never piles up tasks).
    fn mirror(&self, held: &[std::sync::Arc<crate::snapshot::Snapshot>]) {
        use std::sync::atomic::Ordering;
        let Some(dir) = self.config.publish_dir().map(|d| d.to_path_buf()) else {
            return;
        };
        let p = self.publishing.clone();
        // Made only for a node that publishes (refresh_local runs at every slot).
        let held = listing(held);
        if (p.mirrored.try_lock()).is_ok_and(|m| m.as_ref() == Some(&held)) {
            return;
        }
        p.again.store(true, Ordering::Release);
        if p.running.swap(true, Ordering::AcqRel) {
            return;
        }
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            loop {
                p.again.store(false, Ordering::Release);
                let mut last = p.mirrored.lock().unwrap_or_else(|e| e.into_inner());
                match crate::snapshot::mirror(&store, &dir) {
                    // What the directory holds now, as the mirror read the store.
                    Ok(held) => *last = Some(listing(&held)),
                    Err(e) => {
                        *last = None;
                        tracing::warn!(target: TARGET, dir = %dir.display(), error = %e, "could not publish the snapshots");
                    }
                }
                drop(last);
                p.running.store(false, Ordering::Release);
                // A change that came while it ran: go again, unless another task took it.
                if !p.again.load(Ordering::Acquire) || p.running.swap(true, Ordering::AcqRel) {
                    return;
                }
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

    /// The publish directory is written when what the store holds changes, not at every slot.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_publish_directory_is_written_only_when_the_store_changes() {
        let dir = tempfile::tempdir().unwrap();
        let db = LmdbState::open(dir.path().join("db")).unwrap();
        db.commit_slot(10, |w| w.put(b"k", b"v")).unwrap();
        let bucket = dir.path().join("bucket");
        let config = crate::Config::new(dir.path().join("snapshots"))
            .with_publish_dir(Some(bucket.clone()))
            .with_streamer(StreamerConfig::default().with_listen("127.0.0.1:0".parse().unwrap()));
        let db: Arc<dyn StateDb> = Arc::new(db);
        let keypair = libp2p::identity::Keypair::generate_ed25519();
        let mut b = crate::Behaviour::new(&keypair, db.clone(), config).unwrap();
        let index = bucket.join(crate::snapshot::INDEX_FILE);
        let view = db.view().unwrap();
        let snap = create_snapshot(&b.store, view.as_ref(), &Default::default()).unwrap();
        let root = snap.manifest().content_root.to_hex();
        // The index lists the snapshot (an index of the empty store may come first).
        let appears = || async {
            for _ in 0..500 {
                if std::fs::read_to_string(&index).is_ok_and(|i| i.contains(&root)) {
                    return true;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            false
        };
        b.refresh_local();
        assert!(appears().await, "published");
        // Gone from the directory (an operator's hand): the same listing writes nothing again.
        std::fs::remove_file(&index).unwrap();
        for _ in 0..5 {
            b.refresh_local();
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(!index.exists(), "an unchanged store is not mirrored again");
        // A signature kept with the snapshot changes the listing: mirrored again.
        let key = snap.manifest().key();
        let signed = crate::snapshot::Attestation::sign(&keypair, "snapsync", &key).unwrap();
        b.store
            .attest(&key.content_root, "snapsync", &[signed])
            .unwrap();
        b.refresh_local();
        assert!(appears().await, "published again");
        // A manifest corrected after a sync (same root, same signatures) is mirrored too.
        let placed = bucket
            .join(snap.dir().file_name().unwrap())
            .join(crate::snapshot::MANIFEST_FILE);
        let counts = |m: &crate::snapshot::Manifest| (m.entry_count, m.state_bytes);
        let read = || crate::snapshot::Manifest::decode(&std::fs::read(&placed).unwrap()).unwrap();
        assert_eq!(counts(&read()), counts(snap.manifest()));
        let corrected = (snap.manifest().entry_count, snap.manifest().state_bytes - 1);
        b.store
            .correct_counts(&key.content_root, corrected.0, corrected.1)
            .unwrap();
        b.refresh_local();
        let mut seen = false;
        for _ in 0..500 {
            if counts(&read()) == corrected {
                seen = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(seen, "the corrected manifest is published");
    }
}
