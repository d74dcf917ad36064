use super::*;

fn partial(store: &SnapshotStore, root: ContentRoot, mib: usize) {
    let dir = store.partial_dir(&root, (mib as u64) << 20);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("archive.part"), vec![1u8; mib << 20]).unwrap();
    // Distinct modification times, oldest first.
    std::thread::sleep(std::time::Duration::from_millis(20));
}

#[test]
fn partials_of_other_snapshots_are_kept_within_the_budget_newest_first() {
    let tmp = tempfile::tempdir().unwrap();
    let store = SnapshotStore::open(tmp.path()).unwrap();
    let (old, mid, new, current) = (
        ContentRoot([1; 32]),
        ContentRoot([2; 32]),
        ContentRoot([3; 32]),
        ContentRoot([4; 32]),
    );
    for root in [old, mid, new, current] {
        partial(&store, root, 1);
    }
    fs::create_dir(tmp.path().join(format!("{PARTIAL_PREFIX}not-a-root"))).unwrap();
    // Room for two of the others besides the download under way.
    let removed = store
        .trim_partials(&current, (2 << 20) + 4096, false)
        .unwrap();
    assert_eq!(removed, vec![old]);
    let roots_left = || -> Vec<_> {
        store
            .partials()
            .unwrap()
            .into_iter()
            .map(|p| p.root)
            .collect()
    };
    let left = roots_left();
    assert_eq!(left.len(), 3, "{left:?}");
    for root in [mid, new, current] {
        assert!(left.contains(&Some(root)));
    }
    // Within the budget, another attempt deletes nothing.
    assert!(
        store
            .trim_partials(&current, (2 << 20) + 4096, false)
            .unwrap()
            .is_empty()
    );
    // With no budget, only the download under way stays.
    store.trim_partials(&current, 0, false).unwrap();
    assert_eq!(roots_left(), vec![Some(current)]);
}

#[test]
fn a_store_another_process_holds_is_refused_naming_its_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let store = SnapshotStore::open(tmp.path()).unwrap();
    // Opened again in this process: the same lock.
    let again = SnapshotStore::open(tmp.path()).unwrap();
    drop(store);
    drop(again);
    // Another process's lock (taken here on a file description of its own).
    let other = fs::File::open(tmp.path()).unwrap();
    other.lock().unwrap();
    let err = SnapshotStore::open(tmp.path()).unwrap_err();
    assert!(matches!(err, StoreError::InUse { .. }), "{err}");
    assert!(err.to_string().contains(&tmp.path().display().to_string()));
    other.unlock().unwrap();
    SnapshotStore::open(tmp.path()).unwrap();
}

#[tokio::test]
async fn claimed_partials_are_never_trimmed_and_a_claim_waits_for_the_one_before() {
    let tmp = tempfile::tempdir().unwrap();
    let store = SnapshotStore::open(tmp.path()).unwrap();
    let (full, incremental) = (ContentRoot([1; 32]), ContentRoot([2; 32]));
    partial(&store, full, 1);
    partial(&store, incremental, 1);
    // The two legs of one sync: each trims with no budget, keeping only itself, but the
    // other's claim keeps it too.
    let full_claim = store.claim_partial(full).await;
    let inc_claim = store.claim_partial(incremental).await;
    assert!(
        store
            .trim_partials(&incremental, 0, true)
            .unwrap()
            .is_empty()
    );
    assert!(store.trim_partials(&full, 0, true).unwrap().is_empty());
    assert_eq!(store.partials().unwrap().len(), 2);
    // A second download of the same snapshot waits until the first lets go.
    let second = {
        let store = store.clone();
        tokio::spawn(async move { store.claim_partial(full).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!second.is_finished(), "waits while the first holds it");
    drop(full_claim);
    let again = tokio::time::timeout(Duration::from_secs(5), second)
        .await
        .expect("taken once released")
        .unwrap();
    drop(again);
    drop(inc_claim);
    // Released: trimmed like any other.
    assert_eq!(
        store
            .trim_partials(&ContentRoot([9; 32]), 0, true)
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn a_download_not_vouched_for_never_deletes_one_that_was() {
    let tmp = tempfile::tempdir().unwrap();
    let store = SnapshotStore::open(tmp.path()).unwrap();
    let (chosen, other, fake) = (
        ContentRoot([1; 32]),
        ContentRoot([2; 32]),
        ContentRoot([3; 32]),
    );
    partial(&store, chosen, 1);
    fs::write(store.partial_dir(&chosen, 1 << 20).join(VOUCHED_FILE), b"").unwrap();
    partial(&store, other, 1);
    // A root anyone may advertise, with no room at all: only the unvouched one goes.
    assert_eq!(store.trim_partials(&fake, 0, false).unwrap(), vec![other]);
    assert_eq!(store.partials().unwrap().len(), 1);
    // Another size claimed for the chosen root is another directory: it deletes nothing
    // of its own root.
    assert!(store.trim_partials(&chosen, 0, true).unwrap().is_empty());
    // One vouched for may.
    assert_eq!(store.trim_partials(&fake, 0, true).unwrap(), vec![chosen]);
}

#[test]
fn a_published_snapshot_deleted_while_it_is_changed_is_not_put_back() {
    let dir = tempfile::tempdir().unwrap();
    let db = crate::db::LmdbState::open(dir.path().join("db")).unwrap();
    db.commit_slot(10, |w| w.put(b"k", b"v")).unwrap();
    let store = SnapshotStore::open(dir.path().join("snapshots")).unwrap();
    let view = crate::db::StateDb::view(&db).unwrap();
    let snap =
        crate::snapshot::create_snapshot(&store, view.as_ref(), &Default::default()).unwrap();
    let root = snap.manifest().content_root;
    // Retention deletes it while its attestations are being written.
    let changed = store
        .change_published(&root, |s| {
            store.remove(s)?;
            Ok(Some(s.clone()))
        })
        .unwrap();
    assert_eq!(changed.manifest().content_root, root);
    assert!(store.get(&root).is_none(), "not listed again");
    assert!(store.list().is_empty());
}
