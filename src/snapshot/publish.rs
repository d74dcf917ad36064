//! Publishing snapshots for static web servers and object stores: [`publish`] puts a snapshot
//! into a directory in the store's own layout and rewrites the directory's index, so that any
//! server of plain files (nginx, a CDN, an S3-compatible bucket) serves it with no code of its
//! own; a downloader reads the index, the manifest, the outboard and archive ranges from it and
//! checks every chunk against the content root, as it does a peer's.
//!
//! The layout under the published directory (the base URL of a web source):
//!
//! ```text
//! index.json                                   what the directory holds (below)
//! full-<slot, 20 digits>-<root, 16 hex>/       one directory per snapshot, as in the store:
//!     manifest.pb                              its manifest (protobuf)
//!     archive.zst                              the archive
//!     outboard.bao                             the BLAKE3 tree's inner nodes
//! incr-<slot>-<root>/ ...
//! ```
//!
//! `index.json` is one JSON object: `{"format": 1, "snapshots": [...]}`, each snapshot an
//! object with `path` (its directory), `kind` (`"full"` or `"incremental"`), `slot`,
//! `bank_hash`, `content_root` (64 hex digits each), `archive_size`, `chunk_size`,
//! `entry_count`, `state_bytes` and `base` (`null`, or `{"slot", "bank_hash",
//! "content_root"}` for an incremental). It is written to a temporary file, fsynced and renamed
//! over the old one, so a server never serves half of one. What it lists is a claim: a node
//! takes it as a candidate, the trust policy decides, and every byte is checked.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::SnapshotKind;
use super::attestation::Attestation;
use super::manifest::Manifest;
use super::store::{
    ARCHIVE_FILE, ATTESTATIONS_FILE, FULL_PREFIX, INCR_PREFIX, MANIFEST_FILE, OUTBOARD_FILE,
    Snapshot, SnapshotStore,
};
use crate::disk;

/// The index of a published directory.
pub const INDEX_FILE: &str = "index.json";

/// Version of the index format.
pub const INDEX_FORMAT: u32 = 1;

/// Publishing failed. What was published before stays as it was.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
}

fn at(path: &Path) -> impl FnOnce(io::Error) -> PublishError + '_ {
    move |source| PublishError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Puts `snapshot` into the directory `dir` (created if needed) in the store's layout, hard
/// linked where the file system allows and copied where not, and rewrites the index. A snapshot
/// published already is left alone, but for its manifest, rewritten if the store's changed
/// (counts corrected after a load). The files are fsynced and renamed into place before the
/// index names them; a failure (a full disk, say) leaves nothing half made behind. Returns the
/// snapshot's directory there.
pub fn publish(snapshot: &Snapshot, dir: &Path) -> Result<PathBuf, PublishError> {
    fs::create_dir_all(dir).map_err(at(dir))?;
    let target = place(snapshot, dir)?;
    write_index(dir)?;
    Ok(target)
}

/// Puts `snapshot`'s files in place under `dir`, without touching the index.
fn place(snapshot: &Snapshot, dir: &Path) -> Result<PathBuf, PublishError> {
    let name = snapshot
        .dir()
        .file_name()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(snapshot.manifest().content_root.to_hex()));
    let target = dir.join(&name);
    let manifest = snapshot.manifest().encode();
    let placed = target.join(MANIFEST_FILE);
    if let Ok(old) = fs::read(&placed) {
        if old != manifest {
            disk::replace_synced(&placed, &manifest).map_err(at(&placed))?;
        }
        // Attestations gathered since (a node relays those it synced with, and adds its own).
        let attested = target.join(ATTESTATIONS_FILE);
        if snapshot.attestations().is_empty() {
            disk::remove_path(&attested).map_err(at(&attested))?;
        } else {
            let now = Attestation::encode_file(snapshot.attestations());
            if fs::read(&attested).ok().as_ref() != Some(&now) {
                disk::replace_synced(&attested, &now).map_err(at(&attested))?;
            }
        }
        return Ok(target);
    }
    let mut staging = dir.join(STAGING_PREFIX);
    staging.as_mut_os_string().push(&name);
    let made = stage(snapshot, &staging).and_then(|()| {
        fs::rename(&staging, &target).map_err(at(&target))?;
        disk::sync_dir(dir).map_err(at(dir))
    });
    if made.is_err() {
        let _ = disk::remove_path(&staging);
    }
    made.map(|()| target)
}

/// The snapshot's files in `staging`, fsynced.
fn stage(snapshot: &Snapshot, staging: &Path) -> Result<(), PublishError> {
    disk::remove_path(staging).map_err(at(staging))?;
    fs::create_dir_all(staging).map_err(at(staging))?;
    for file in [
        ARCHIVE_FILE,
        OUTBOARD_FILE,
        MANIFEST_FILE,
        ATTESTATIONS_FILE,
    ] {
        let from = snapshot.dir().join(file);
        let to = staging.join(file);
        if file == ATTESTATIONS_FILE && !from.exists() {
            continue;
        }
        if fs::hard_link(&from, &to).is_err() {
            fs::copy(&from, &to).map_err(at(&to))?;
            fs::File::open(&to)
                .and_then(|f| f.sync_all())
                .map_err(at(&to))?;
        }
    }
    disk::sync_dir(staging).map_err(at(staging))
}

/// Directories being made (hidden: never listed).
const STAGING_PREFIX: &str = ".publishing-";

/// Directories being removed (hidden: never listed).
const REMOVING_PREFIX: &str = ".removing-";

/// Makes `dir` hold exactly the snapshots of `store`: removes those the store no longer holds
/// (once the index stops naming them: renamed out of sight at once, then deleted), then
/// publishes those missing (and the manifests and attestations of those placed that changed),
/// then rewrites the index. Removing first frees the disk the new ones need; leftovers of an
/// interrupted run are cleared first. Returns the snapshots the directory now holds.
pub fn mirror(store: &SnapshotStore, dir: &Path) -> Result<Vec<Arc<Snapshot>>, PublishError> {
    fs::create_dir_all(dir).map_err(at(dir))?;
    clear_leftovers(dir)?;
    let held = store.list();
    let keep: Vec<_> = held
        .iter()
        .filter_map(|s| s.dir().file_name().map(|n| n.to_owned()))
        .collect();
    // Every snapshot directory not held, whether or not its manifest still reads.
    let gone: Vec<String> = snapshot_dirs(dir)?
        .into_iter()
        .filter(|name| !keep.iter().any(|k| k.to_string_lossy() == name.as_str()))
        .collect();
    if !gone.is_empty() {
        let paths: Vec<PathBuf> = gone.iter().map(|n| dir.join(n)).collect();
        write_index_except(dir, &paths)?;
        for name in &gone {
            let hidden = dir.join(format!("{REMOVING_PREFIX}{name}"));
            fs::rename(dir.join(name), &hidden).map_err(at(&hidden))?;
        }
        disk::sync_dir(dir).map_err(at(dir))?;
        clear_leftovers(dir)?;
    }
    for snap in &held {
        place(snap, dir)?;
    }
    write_index(dir)?;
    Ok(held)
}

/// Removes what an interrupted publish or removal left (hidden directories of ours).
fn clear_leftovers(dir: &Path) -> Result<(), PublishError> {
    for entry in fs::read_dir(dir).map_err(at(dir))? {
        let entry = entry.map_err(at(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(STAGING_PREFIX) || name.starts_with(REMOVING_PREFIX) {
            disk::remove_path(&entry.path()).map_err(at(&entry.path()))?;
        }
    }
    Ok(())
}

/// The names of the snapshot directories in `dir` (as the store names them).
fn snapshot_dirs(dir: &Path) -> Result<Vec<String>, PublishError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(at(dir))? {
        let entry = entry.map_err(at(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if (name.starts_with(FULL_PREFIX) || name.starts_with(INCR_PREFIX)) && entry.path().is_dir()
        {
            out.push(name);
        }
    }
    Ok(out)
}

/// One snapshot as an index lists it: its directory's name, its manifest, its attestations.
pub(crate) type Listed = (String, Manifest, Vec<Attestation>);

/// The snapshots published in `dir`: each subdirectory (not hidden) with a manifest that reads,
/// with the attestations beside it (none when they do not read).
fn published(dir: &Path) -> Result<Vec<Listed>, PublishError> {
    let mut out = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(at(dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(at(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !entry.path().is_dir() {
            continue;
        }
        let path = entry.path().join(MANIFEST_FILE);
        let Ok(bytes) = fs::read(&path) else { continue };
        if let Ok(m) = Manifest::decode(&bytes) {
            let attestations = disk::read_bounded(
                &entry.path().join(ATTESTATIONS_FILE),
                super::MAX_ATTESTATIONS_BYTES as u64,
            )
            .ok()
            .flatten()
            .and_then(|b| Attestation::decode_file(&b).ok())
            .unwrap_or_default();
            out.push((name, m, attestations));
        }
    }
    out.sort_by(|a, b| (a.1.slot, &a.0).cmp(&(b.1.slot, &b.0)));
    Ok(out)
}

/// Rewrites `dir`'s index from what it holds, atomically; an index that says that already is
/// left as it is (a node mirrors at every slot: nothing is written, nothing synced, when the
/// listing did not change).
pub fn write_index(dir: &Path) -> Result<(), PublishError> {
    write_index_except(dir, &[])
}

fn write_index_except(dir: &Path, except: &[PathBuf]) -> Result<(), PublishError> {
    let listed: Vec<Listed> = published(dir)?
        .into_iter()
        .filter(|(name, ..)| !except.iter().any(|p| p.ends_with(name)))
        .collect();
    let path = dir.join(INDEX_FILE);
    let index = index_json(&listed);
    let same_len = fs::metadata(&path).is_ok_and(|m| m.len() == index.len() as u64);
    if same_len && fs::read(&path).is_ok_and(|old| old == index.as_bytes()) {
        return Ok(());
    }
    disk::replace_synced(&path, index.as_bytes()).map_err(at(&path))
}

/// The index of `snapshots` (directory name, manifest), as JSON.
pub(crate) fn index_json(snapshots: &[Listed]) -> String {
    let entries: Vec<String> = snapshots
        .iter()
        .map(|(path, m, attestations)| {
            let attestations: Vec<String> = attestations
                .iter()
                .map(|a| {
                    let (signer, signature) = a.to_hex();
                    format!("{{\"signer\":\"{signer}\",\"signature\":\"{signature}\"}}")
                })
                .collect();
            let base = match &m.base {
                None => "null".to_string(),
                Some(b) => format!(
                    "{{\"slot\":{},\"bank_hash\":\"{}\",\"content_root\":\"{}\"}}",
                    b.slot,
                    b.bank_hash.to_hex(),
                    b.content_root.to_hex()
                ),
            };
            format!(
                "{{\"path\":{},\"kind\":\"{}\",\"slot\":{},\"bank_hash\":\"{}\",\"content_root\":\"{}\",\"archive_size\":{},\"chunk_size\":{},\"entry_count\":{},\"state_bytes\":{},\"base\":{},\"attestations\":[{}]}}",
                json_string(path),
                match m.kind {
                    SnapshotKind::Full => "full",
                    SnapshotKind::Incremental => "incremental",
                },
                m.slot,
                m.bank_hash.to_hex(),
                m.content_root.to_hex(),
                m.archive_size,
                m.chunk_size.bytes(),
                m.entry_count,
                m.state_bytes,
                base,
                attestations.join(",")
            )
        })
        .collect();
    format!(
        "{{\"format\":{INDEX_FORMAT},\"snapshots\":[\n{}\n]}}\n",
        entries.join(",\n")
    )
}

/// `s` as a JSON string (directory names are plain ASCII; anything else is escaped).
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 || !c.is_ascii() => {
                out.push_str(&format!("\\u{:04x}", c as u32 & 0xffff))
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::{LmdbState, StateDb};
    use crate::snapshot::{CreateOptions, create_snapshot};

    #[test]
    fn a_published_directory_holds_the_store_layout_and_an_index_naming_it() {
        let tmp = tempfile::tempdir().unwrap();
        let db = LmdbState::open(tmp.path().join("db")).unwrap();
        db.commit_slot(7, |w| w.put(b"k", b"v")).unwrap();
        let store = SnapshotStore::open(tmp.path().join("store")).unwrap();
        let view = db.view().unwrap();
        let snap = create_snapshot(&store, view.as_ref(), &CreateOptions::default()).unwrap();
        let out = tmp.path().join("www");
        let dir = publish(&snap, &out).unwrap();
        for f in [ARCHIVE_FILE, OUTBOARD_FILE, MANIFEST_FILE] {
            assert_eq!(
                fs::read(dir.join(f)).unwrap(),
                fs::read(snap.dir().join(f)).unwrap()
            );
        }
        let index = fs::read_to_string(out.join(INDEX_FILE)).unwrap();
        let m = snap.manifest();
        assert!(index.contains(&m.content_root.to_hex()), "{index}");
        assert!(index.contains(&format!("\"slot\":{}", m.slot)));
        assert!(index.contains("\"base\":null"));
        // Publishing or mirroring again writes nothing: the index is the same file.
        let inode = |p: &Path| std::os::unix::fs::MetadataExt::ino(&fs::metadata(p).unwrap());
        let before = inode(&out.join(INDEX_FILE));
        publish(&snap, &out).unwrap();
        mirror(&store, &out).unwrap();
        assert_eq!(inode(&out.join(INDEX_FILE)), before);
        // ...but a manifest the store corrected since is written, and the index with it.
        store
            .correct_counts(&m.content_root, m.entry_count + 1, m.state_bytes + 100)
            .unwrap();
        let corrected = store.get(&m.content_root).unwrap();
        publish(&corrected, &out).unwrap();
        assert_eq!(
            fs::read(dir.join(MANIFEST_FILE)).unwrap(),
            corrected.manifest().encode()
        );
        assert_ne!(corrected.manifest().encode(), m.encode());
        // Leftovers of an interrupted run go; mirroring an emptied store empties the directory.
        let leftovers = [out.join(".publishing-x"), out.join(".removing-y")];
        for l in &leftovers {
            fs::create_dir_all(l.join("inner")).unwrap();
        }
        store.remove(&corrected).unwrap();
        mirror(&store, &out).unwrap();
        assert!(!dir.exists());
        let index = fs::read_to_string(out.join(INDEX_FILE)).unwrap();
        assert!(!index.contains(&m.content_root.to_hex()));
        assert!(leftovers.iter().all(|l| !l.exists()));
        assert_eq!(json_string("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
    }
}
