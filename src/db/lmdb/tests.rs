use super::*;
use crate::bank_hash::Lattice;
use crate::db::{Decision, StagedState};

fn entries(view: &dyn StateView) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    view.visit(&mut |k, v| {
        out.push((k.to_vec(), v.to_vec()));
        Ok(())
    })
    .unwrap();
    out
}

#[test]
fn the_lattice_follows_every_write() {
    let dir = tempfile::tempdir().unwrap();
    let db = LmdbState::open(dir.path().join("db")).unwrap();
    db.commit_slot(1, |w| {
        w.put(b"a", b"1")?;
        w.put(b"b", b"2")?;
        w.put(b"c", b"3")
    })
    .unwrap();
    db.commit_slot(2, |w| {
        w.put(b"a", b"9")?;
        w.delete(b"b")?;
        w.delete(b"zz")
    })
    .unwrap();
    let view = db.view().unwrap();
    assert_eq!(view.slot(), Some(2));
    let kept = view.lattice().unwrap();
    let mut fresh = Lattice::new();
    for (k, v) in entries(view.as_ref()) {
        fresh.insert(&k, &v);
    }
    assert_eq!(kept, fresh);
    assert_eq!(view.bank_hash().unwrap(), fresh.bank_hash(2));
    assert!(matches!(
        db.commit_slot(1, |_| Ok(())),
        Err(DbError::SlotBehind {
            slot: 1,
            current: 2
        })
    ));
    assert!(matches!(
        db.commit_slot(3, |w| w.put(&vec![1u8; 100_000], b"")),
        Err(DbError::EntryTooLarge { .. })
    ));
}

#[test]
fn touched_keys_are_those_written_after_a_slot_and_pruning_forgets_them() {
    let dir = tempfile::tempdir().unwrap();
    let db = LmdbState::open(dir.path().join("db")).unwrap();
    db.commit_slot(10, |w| {
        w.put(b"a", b"1")?;
        w.put(b"b", b"1")
    })
    .unwrap();
    db.commit_slot(11, |w| {
        w.put(b"c", b"1")?;
        w.delete(b"a")
    })
    .unwrap();
    db.commit_slot(12, |w| w.put(b"b", b"2")).unwrap();
    let touched = |since| {
        let view = db.view().unwrap();
        let mut got = Vec::new();
        let known = view
            .visit_touched_since(since, &mut |k, v| {
                got.push((k.to_vec(), v.map(<[u8]>::to_vec)));
                Ok(())
            })
            .unwrap();
        known.then_some(got)
    };
    assert_eq!(
        touched(10).unwrap(),
        vec![
            (b"a".to_vec(), None),
            (b"b".to_vec(), Some(b"2".to_vec())),
            (b"c".to_vec(), Some(b"1".to_vec())),
        ]
    );
    assert_eq!(touched(11).unwrap().len(), 1);
    db.prune_touched(11).unwrap();
    assert_eq!(db.touched_len().unwrap(), 1);
    assert_eq!(touched(10), None, "pruned: no longer known");
    assert_eq!(
        touched(11).unwrap(),
        vec![(b"b".to_vec(), Some(b"2".to_vec()))]
    );
}

#[test]
fn an_import_swaps_in_atomically_and_leftovers_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let db = LmdbState::open(&path).unwrap();
    db.commit_slot(1, |w| w.put(b"old", b"x")).unwrap();
    let mut import = db.begin_import(5).unwrap();
    let mut lattice = Lattice::new();
    let rows: Vec<(Vec<u8>, Vec<u8>)> = (0..1000u32)
        .map(|i| (i.to_be_bytes().to_vec(), vec![1; 100]))
        .collect();
    for (k, v) in &rows {
        lattice.insert(k, v);
    }
    import
        .put_sorted(&mut rows.iter().map(|(k, v)| (k.as_slice(), v.as_slice())))
        .unwrap();
    // Out of order is refused.
    assert!(
        import
            .put_sorted(&mut [(b"\0".as_slice(), b"".as_slice())].into_iter())
            .is_err()
    );
    let staged = import.finish(&lattice).unwrap();
    assert_eq!(
        staged.view().unwrap().bank_hash().unwrap(),
        lattice.bank_hash(5)
    );
    // A view of the old state keeps reading it across the swap.
    let old_view = db.view().unwrap();
    staged.commit().unwrap();
    assert_eq!(old_view.get(b"old").unwrap(), Some(b"x".to_vec()));
    assert_eq!(db.slot().unwrap(), Some(5));
    assert_eq!(db.len().unwrap(), 1000);
    assert_eq!(db.get(b"old").unwrap(), None);
    drop(old_view);
    // Writes go on in the new generation, durable, and survive a reopen.
    db.commit_slot(6, |w| w.put(b"new", b"y")).unwrap();
    drop(db);
    // An import cut off by a crash leaves a generation (and its lock file) that the next
    // open removes.
    fs::write(path.join("gen-00000042.mdb"), b"half an import").unwrap();
    fs::write(path.join("gen-00000042.mdb-lock"), b"").unwrap();
    let db = LmdbState::open(&path).unwrap();
    assert!(matches!(
        LmdbState::open(&path),
        Err(DbError::AlreadyOpen { .. })
    ));
    assert_eq!(db.slot().unwrap(), Some(6));
    assert_eq!(db.get(b"new").unwrap(), Some(b"y".to_vec()));
    let gens = fs::read_dir(&path)
        .unwrap()
        .filter(|e| {
            let n = e.as_ref().unwrap().file_name();
            n.to_string_lossy().starts_with(GEN_PREFIX)
        })
        .count();
    assert_eq!(gens, 2, "the live generation and its lock file");
    // A staged state that is not above the live one is refused and the live one stays.
    let import = db.begin_import(6).unwrap();
    let staged = import.finish(&Lattice::new()).unwrap();
    assert!(matches!(
        staged.commit(),
        Err(DbError::SlotBehind {
            slot: 6,
            current: 6
        })
    ));
    assert_eq!(db.get(b"new").unwrap(), Some(b"y".to_vec()));
}

#[test]
fn changes_commit_or_abort_as_told() {
    let dir = tempfile::tempdir().unwrap();
    let db = LmdbState::open(dir.path().join("db")).unwrap();
    db.commit_slot(3, |w| w.put(b"a", b"1")).unwrap();
    let before = db.view().unwrap().bank_hash().unwrap();
    db.apply_changes(4, &mut |w| {
        w.put(b"a", b"2")?;
        Ok(Decision::Abort)
    })
    .unwrap();
    assert_eq!(db.view().unwrap().bank_hash().unwrap(), before);
    db.apply_changes(9, &mut |w| {
        let (slot, mut lattice) = w.before()?;
        assert_eq!(slot, Some(3));
        let old = w.put(b"a", b"2")?;
        lattice.replace(b"a", old.as_deref(), Some(b"2"));
        let old = w.delete(b"a")?;
        lattice.replace(b"a", old.as_deref(), None);
        Ok(Decision::Commit(Box::new(lattice)))
    })
    .unwrap();
    let view = db.view().unwrap();
    assert_eq!(view.slot(), Some(9));
    assert!(entries(view.as_ref()).is_empty());
    assert_eq!(view.lattice().unwrap(), Lattice::new());
}

/// A staged import of `n` entries at `slot`, ready to commit.
fn staged(db: &LmdbState, slot: u64, n: u32) -> Box<dyn StagedState> {
    let mut import = db.begin_import(slot).unwrap();
    let rows: Vec<(Vec<u8>, Vec<u8>)> = (0..n)
        .map(|i| (i.to_be_bytes().to_vec(), vec![2; 10]))
        .collect();
    let mut lattice = Lattice::new();
    for (k, v) in &rows {
        lattice.insert(k, v);
    }
    import
        .put_sorted(&mut rows.iter().map(|(k, v)| (k.as_slice(), v.as_slice())))
        .unwrap();
    import.finish(&lattice).unwrap()
}

fn generation_numbers(path: &Path) -> Vec<u64> {
    let mut n: Vec<u64> = fs::read_dir(path)
        .unwrap()
        .filter_map(|e| parse_gen(&e.unwrap().file_name().to_string_lossy()))
        .collect();
    n.sort();
    n
}

#[test]
fn a_staged_state_removed_before_the_swap_never_becomes_live() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let db = LmdbState::open(&path).unwrap();
    db.commit_slot(1, |w| w.put(b"old", b"x")).unwrap();
    let staged = staged(&db, 5, 100);
    // Something deletes the staged file: reopened by its path it would be an empty state.
    let live = db.generations.live.read().unwrap().number;
    let gone = *generation_numbers(&path)
        .iter()
        .find(|n| **n != live)
        .unwrap();
    fs::remove_file(Generation::path(&path, gone)).unwrap();
    let err = staged.commit().unwrap_err();
    assert!(matches!(err, DbError::Inconsistent(_)), "{err}");
    assert_eq!(db.slot().unwrap(), Some(1));
    assert_eq!(db.get(b"old").unwrap(), Some(b"x".to_vec()));
    db.commit_slot(2, |w| w.put(b"old", b"y")).unwrap();
}

#[test]
fn a_swap_that_could_not_be_made_durable_stops_every_write_until_reopened() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let db = LmdbState::open(&path).unwrap();
    db.commit_slot(1, |w| w.put(b"old", b"x")).unwrap();
    let staged = staged(&db, 5, 100);
    crate::disk::FAIL_DIR_SYNC.with(|f| f.set(true));
    let err = staged.commit().unwrap_err();
    assert!(matches!(err, DbError::NotDurable(_)), "{err}");
    // What CURRENT names now is what the process reads, and nothing more is written.
    assert_eq!(db.slot().unwrap(), Some(5));
    assert!(matches!(
        db.commit_slot(6, |w| w.put(b"a", b"b")),
        Err(DbError::NotDurable(_))
    ));
    assert!(matches!(db.begin_import(7), Err(DbError::NotDurable(_))));
    // Opened again, the DB is what CURRENT names, and writes go on.
    drop(db);
    let db = LmdbState::open(&path).unwrap();
    assert_eq!(db.slot().unwrap(), Some(5));
    assert_eq!(db.len().unwrap(), 100);
    db.commit_slot(6, |w| w.put(b"a", b"b")).unwrap();
    assert_eq!(
        generation_numbers(&path).len(),
        1,
        "the other generation is gone"
    );
}

#[test]
fn a_db_another_process_holds_is_refused_at_once_naming_its_directory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    drop(LmdbState::open(&path).unwrap());
    // Another process's lock (taken here on a file description of its own).
    let other = fs::OpenOptions::new()
        .write(true)
        .open(path.join(LOCK))
        .unwrap();
    other.lock().unwrap();
    let err = LmdbState::open(&path).expect_err("refused");
    assert!(matches!(err, DbError::Locked { .. }), "{err}");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
    other.unlock().unwrap();
    LmdbState::open(&path).unwrap();
}
