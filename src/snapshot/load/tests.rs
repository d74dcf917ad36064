//! Loading, rule by rule, on the real embedded DB.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::*;
use crate::db::LmdbState;
use crate::snapshot::{CreateOptions, SnapshotStore, create_snapshot};

/// A DB of about `mib` MiB of incompressible values at slot 10, and its full snapshot.
fn snapshot_of(dir: &Path, mib: u32) -> (SnapshotStore, std::sync::Arc<crate::snapshot::Snapshot>) {
    let db = LmdbState::open(dir.join("source")).unwrap();
    for batch in 0..mib {
        db.commit_slot(10, |w| {
            for i in 0..256u32 {
                let k = (batch * 256 + i).to_be_bytes();
                let v: Vec<u8> = (0..4096u32)
                    .map(|j| (j.wrapping_mul(2_654_435_761) ^ (batch * 256 + i)) as u8)
                    .collect();
                w.put(&k, &v)?;
            }
            Ok(())
        })
        .unwrap();
    }
    let store = SnapshotStore::open(dir.join("snapshots")).unwrap();
    let view = db.view().unwrap();
    let snap = create_snapshot(&store, view.as_ref(), &CreateOptions::default()).unwrap();
    (store, snap)
}

#[test]
fn a_load_asked_to_stop_stops_and_swaps_nothing_in() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, snap) = snapshot_of(dir.path(), 64);
    let m = snap.manifest();
    let source = ArchiveSource::file(snap.archive_path(), m.archive_size);
    let target = LmdbState::open(dir.path().join("target")).unwrap();
    target.commit_slot(1, |w| w.put(b"old", b"x")).unwrap();
    let limits = LoadLimits::default();
    // Asked to stop before it starts: it reads a segment at most, and swaps nothing in.
    let stop = AtomicBool::new(true);
    let err = load_chain_legs(
        &target,
        Some((&source, m)),
        None,
        &limits,
        Some(&stop),
        None,
    )
    .unwrap_err();
    assert!(
        matches!(err, (SnapshotKind::Full, LoadError::Stopped)),
        "{err:?}"
    );
    // Asked while it runs: it stops within a moment.
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    let result = std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(20));
            stop.store(true, Ordering::Release);
        });
        load_chain_legs(
            &target,
            Some((&source, m)),
            None,
            &limits,
            Some(&stop),
            None,
        )
    });
    assert!(
        matches!(result, Err((_, LoadError::Stopped))),
        "{:?}",
        result.map(|l| l.report)
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(target.slot().unwrap(), Some(1), "the live DB is as it was");
    assert_eq!(target.get(b"old").unwrap(), Some(b"x".to_vec()));
    assert_eq!(crate::db::StateDb::slot(&target).unwrap(), Some(1));
    // Not asked: it loads.
    let loaded = load_chain_legs(&target, Some((&source, m)), None, &limits, None, None).unwrap();
    assert_eq!(loaded.report.slot, 10);
    assert_eq!(
        loaded.counts,
        vec![(SnapshotKind::Full, m.entry_count, m.state_bytes)]
    );
}

#[test]
fn counts_nobody_vouched_for_bound_nothing_and_the_disk_is_watched_instead() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, snap) = snapshot_of(dir.path(), 4);
    let honest = snap.manifest().clone();
    let source = ArchiveSource::file(snap.archive_path(), honest.archive_size);
    // A peer's manifest claims one record and the largest state: trusted, the claim fails
    // the load (too few records declared, no room for the state declared)...
    let lying = Manifest {
        entry_count: 1,
        state_bytes: u64::MAX / 4,
        ..honest.clone()
    };
    let target = LmdbState::open(dir.path().join("target")).unwrap();
    let limits = LoadLimits::default().with_headroom_bytes(0);
    let err = load_chain(&target, Some((&source, &lying)), None, &limits).unwrap_err();
    assert!(matches!(err, LoadError::NoSpace { .. }), "{err}");
    let few = Manifest {
        entry_count: 1,
        ..honest.clone()
    };
    let err = load_chain(&target, Some((&source, &few)), None, &limits).unwrap_err();
    assert!(matches!(err, LoadError::Archive(_)), "{err}");
    // ...as a claim nobody vouched for, it bounds nothing; what the archive held is said.
    let unvouched = limits.ignoring_declared_counts();
    let loaded = load_chain_legs(
        &target,
        Some((&source, &lying)),
        None,
        &unvouched,
        None,
        None,
    )
    .unwrap();
    assert_eq!(loaded.report.slot, honest.slot);
    assert_eq!(
        loaded.counts,
        vec![(SnapshotKind::Full, honest.entry_count, honest.state_bytes)]
    );
}

/// What a check saw: the slot, the bank hash and the value of `root`.
type Seen = std::sync::Mutex<Vec<(u64, BankHash, Option<Vec<u8>>)>>;

/// A check that records what it sees and answers `verdict`.
fn recording(seen: &std::sync::Arc<Seen>, verdict: StateVerdict) -> impl StateCheck + use<> {
    let seen = seen.clone();
    move |state: &CheckedState<'_>| {
        let root = state.read.get(b"root").unwrap();
        seen.lock()
            .unwrap()
            .push((state.slot, state.bank_hash, root));
        verdict.clone()
    }
}

/// A full snapshot at slot 10 and an incremental one at 20 on it, of a state whose `root`
/// says which slot it is at.
fn full_and_incremental(
    dir: &Path,
) -> (
    std::sync::Arc<crate::snapshot::Snapshot>,
    std::sync::Arc<crate::snapshot::Snapshot>,
) {
    let store = SnapshotStore::open(dir.join("snapshots")).unwrap();
    let source_db = LmdbState::open(dir.join("source")).unwrap();
    source_db
        .commit_slot(10, |w| {
            for i in 0..1000u32 {
                w.put(&i.to_be_bytes(), &[i as u8; 100])?;
            }
            w.put(b"root", b"chain at 10")
        })
        .unwrap();
    let view = source_db.view().unwrap();
    let full = create_snapshot(&store, view.as_ref(), &CreateOptions::default()).unwrap();
    drop(view);
    source_db
        .commit_slot(20, |w| w.put(b"root", b"chain at 20"))
        .unwrap();
    let view = source_db.view().unwrap();
    let inc = crate::snapshot::create_incremental(
        &store,
        view.as_ref(),
        &full,
        &CreateOptions::default(),
    )
    .unwrap();
    (full, inc)
}

#[test]
fn the_applications_check_sees_each_state_before_it_goes_live_and_only_an_accepted_one_does() {
    let dir = tempfile::tempdir().unwrap();
    let (full, inc) = full_and_incremental(dir.path());
    let (fm, im) = (full.manifest(), inc.manifest());
    let fs = ArchiveSource::file(full.archive_path(), fm.archive_size);
    let is = ArchiveSource::file(inc.archive_path(), im.archive_size);
    let target = LmdbState::open(dir.path().join("target")).unwrap();
    target.commit_slot(1, |w| w.put(b"root", b"old")).unwrap();
    let limits = LoadLimits::default();
    let seen = std::sync::Arc::new(Seen::default());
    let untouched = |target: &LmdbState, slot, root: &[u8]| {
        assert_eq!(target.slot().unwrap(), Some(slot));
        assert_eq!(target.get(b"root").unwrap().as_deref(), Some(root));
    };

    // A full and an incremental on it: the check sees the last state, staged; a refusal
    // is about the last snapshot and swaps nothing in.
    let refuse = recording(&seen, StateVerdict::Refuse("not our root".into()));
    let err = load_chain_legs(
        &target,
        Some((&fs, fm)),
        Some((&is, im)),
        &limits,
        None,
        Some(&refuse),
    )
    .unwrap_err();
    assert!(
        matches!(&err, (SnapshotKind::Incremental, LoadError::StateRefused { slot: 20, reason }) if reason == "not our root"),
        "{err:?}"
    );
    untouched(&target, 1, b"old");
    // The full one alone: undecided swaps nothing in either.
    let undecided = recording(&seen, StateVerdict::Undecided("light client behind".into()));
    let err = load_chain_legs(
        &target,
        Some((&fs, fm)),
        None,
        &limits,
        None,
        Some(&undecided),
    )
    .unwrap_err();
    assert!(
        matches!(
            &err,
            (
                SnapshotKind::Full,
                LoadError::StateUndecided { slot: 10, .. }
            )
        ),
        "{err:?}"
    );
    untouched(&target, 1, b"old");
    // Accepted: it goes live.
    let accept = recording(&seen, StateVerdict::Accept);
    load_chain_legs(&target, Some((&fs, fm)), None, &limits, None, Some(&accept)).unwrap();
    untouched(&target, 10, b"chain at 10");
    // The incremental alone on the live state: the check reads the transaction's writes; a
    // refusal aborts it.
    let err =
        load_chain_legs(&target, None, Some((&is, im)), &limits, None, Some(&refuse)).unwrap_err();
    assert!(
        matches!(
            &err,
            (
                SnapshotKind::Incremental,
                LoadError::StateRefused { slot: 20, .. }
            )
        ),
        "{err:?}"
    );
    untouched(&target, 10, b"chain at 10");
    load_chain_legs(&target, None, Some((&is, im)), &limits, None, Some(&accept)).unwrap();
    untouched(&target, 20, b"chain at 20");
    // What each check saw: the state it judged, with the proven bank hash.
    let at = |slot: u64, root: &[u8]| {
        let m = if slot == 10 { fm } else { im };
        (slot, m.bank_hash, Some(root.to_vec()))
    };
    assert_eq!(
        *seen.lock().unwrap(),
        vec![
            at(20, b"chain at 20"),
            at(10, b"chain at 10"),
            at(10, b"chain at 10"),
            at(20, b"chain at 20"),
            at(20, b"chain at 20"),
        ]
    );
}

#[test]
fn a_stop_asked_while_the_check_runs_swaps_nothing_in() {
    let dir = tempfile::tempdir().unwrap();
    let (full, inc) = full_and_incremental(dir.path());
    let (fm, im) = (full.manifest(), inc.manifest());
    let fs = ArchiveSource::file(full.archive_path(), fm.archive_size);
    let is = ArchiveSource::file(inc.archive_path(), im.archive_size);
    let target = LmdbState::open(dir.path().join("target")).unwrap();
    let limits = LoadLimits::default();
    // The sync is cancelled while the application looks at the state, and it accepts.
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let cancelling = {
        let stop = stop.clone();
        move |_: &CheckedState<'_>| {
            stop.store(true, Ordering::Release);
            StateVerdict::Accept
        }
    };
    let err = load_chain_legs(
        &target,
        Some((&fs, fm)),
        None,
        &limits,
        Some(&stop),
        Some(&cancelling),
    )
    .unwrap_err();
    assert!(matches!(err, (_, LoadError::Stopped)), "{err:?}");
    assert_eq!(target.slot().unwrap(), None, "nothing went live");
    load_chain_legs(&target, Some((&fs, fm)), None, &limits, None, None).unwrap();
    stop.store(false, Ordering::Release);
    let err = load_chain_legs(
        &target,
        None,
        Some((&is, im)),
        &limits,
        Some(&stop),
        Some(&cancelling),
    )
    .unwrap_err();
    assert!(matches!(err, (_, LoadError::Stopped)), "{err:?}");
    assert_eq!(
        target.slot().unwrap(),
        Some(10),
        "the transaction was not committed"
    );
    assert_eq!(
        target.get(b"root").unwrap().as_deref(),
        Some(&b"chain at 10"[..])
    );
}
