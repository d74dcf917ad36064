//! Generations: one LMDB file each, its tables and what `meta` says, how they are named,
//! opened and removed.

use std::path::{Path, PathBuf};

use heed::types::Bytes;
use heed::{Database, Env, EnvFlags, EnvOpenOptions, RwTxn, WithoutTls};

use super::{GEN_PREFIX, GEN_SUFFIX, LOCK_SUFFIX, LmdbOptions, backend};
use crate::bank_hash::{Lattice, MAX_KEY_LEN, MAX_VALUE_LEN};
use crate::db::DbError;
use crate::disk;

const META_SLOT: &[u8] = b"slot";

const META_LATTICE: &[u8] = b"lattice";

/// The `touched` table holds every key written after this slot (or since the DB was created).
const META_TRACKED_FROM: &[u8] = b"tracked_from";

/// One open generation: the environment and its tables.
#[derive(Clone)]
pub(super) struct Generation {
    pub(super) number: u64,
    pub(super) env: Env<WithoutTls>,
    pub(super) state: Database<Bytes, Bytes>,
    pub(super) meta: Database<Bytes, Bytes>,
    pub(super) touched: Database<Bytes, Bytes>,
}

/// What `meta` says.
#[derive(Debug, Clone, Default)]
pub(super) struct Meta {
    pub(super) slot: Option<u64>,
    pub(super) lattice: Lattice,
    pub(super) tracked_from: u64,
}

pub(super) fn u64_of(bytes: &[u8]) -> Result<u64, DbError> {
    <[u8; 8]>::try_from(bytes)
        .map(u64::from_le_bytes)
        .map_err(|_| DbError::Inconsistent(format!("{} bytes where a u64 was", bytes.len())))
}

impl Generation {
    /// The file name of generation `number`, as `CURRENT` names it.
    pub(super) fn name(number: u64) -> String {
        format!("{GEN_PREFIX}{number:08}{GEN_SUFFIX}")
    }

    pub(super) fn path(dir: &Path, number: u64) -> PathBuf {
        dir.join(Self::name(number))
    }

    pub(super) fn open(
        dir: &Path,
        number: u64,
        options: &LmdbOptions,
        import: bool,
    ) -> Result<Self, DbError> {
        let path = Self::path(dir, number);
        let mut open = EnvOpenOptions::new().read_txn_without_tls();
        open.map_size(options.map_size)
            .max_readers(options.max_readers)
            .max_dbs(4);
        // An import is made durable once, at its end (force_sync); the live DB at every commit.
        let flags = if import {
            EnvFlags::NO_SUB_DIR | EnvFlags::NO_SYNC | EnvFlags::NO_READ_AHEAD
        } else {
            EnvFlags::NO_SUB_DIR | EnvFlags::NO_READ_AHEAD
        };
        // SAFETY: LMDB maps the file; it must not be modified by anything but LMDB while mapped.
        // Generation files are private to this DB directory and are only ever written through
        // this environment, each path is opened once per process (heed checks), and a
        // generation is deleted only after it is no longer live, when only readers remain.
        let env = unsafe {
            open.flags(flags);
            open.open(&path)
        }
        .map_err(|e| match e {
            heed::Error::Io(source) => DbError::Io {
                path: path.clone(),
                source,
            },
            heed::Error::EnvAlreadyOpened => DbError::AlreadyOpen {
                path: dir.to_path_buf(),
            },
            other => backend(other),
        })?;
        let _ = env.clear_stale_readers();
        let mut txn = env.write_txn().map_err(backend)?;
        let state = env
            .create_database(&mut txn, Some("state"))
            .map_err(backend)?;
        let meta = env
            .create_database(&mut txn, Some("meta"))
            .map_err(backend)?;
        let touched = env
            .create_database(&mut txn, Some("touched"))
            .map_err(backend)?;
        txn.commit().map_err(backend)?;
        Ok(Self {
            number,
            env,
            state,
            meta,
            touched,
        })
    }

    pub(super) fn read_meta(&self, txn: &heed::RoTxn) -> Result<Meta, DbError> {
        let slot = match self.meta.get(txn, META_SLOT).map_err(backend)? {
            Some(b) => Some(u64_of(b)?),
            None => None,
        };
        let lattice = match self.meta.get(txn, META_LATTICE).map_err(backend)? {
            Some(b) => Lattice::from_bytes(b)
                .ok_or_else(|| DbError::Inconsistent("lattice of the wrong size".into()))?,
            None => Lattice::new(),
        };
        let tracked_from = match self.meta.get(txn, META_TRACKED_FROM).map_err(backend)? {
            Some(b) => u64_of(b)?,
            None => 0,
        };
        Ok(Meta {
            slot,
            lattice,
            tracked_from,
        })
    }

    pub(super) fn write_meta(&self, txn: &mut RwTxn, meta: &Meta) -> Result<(), DbError> {
        if let Some(slot) = meta.slot {
            self.meta
                .put(txn, META_SLOT, &slot.to_le_bytes())
                .map_err(backend)?;
        }
        self.meta
            .put(txn, META_LATTICE, &meta.lattice.to_bytes())
            .map_err(backend)?;
        self.meta
            .put(txn, META_TRACKED_FROM, &meta.tracked_from.to_le_bytes())
            .map_err(backend)
    }

    pub(super) fn max_key(&self) -> usize {
        self.env.max_key_size().min(MAX_KEY_LEN)
    }

    pub(super) fn check_entry(&self, key: &[u8], value: &[u8]) -> Result<(), DbError> {
        let max_key = self.max_key();
        if key.len() > max_key || key.is_empty() || value.len() > MAX_VALUE_LEN {
            return Err(DbError::EntryTooLarge {
                key: key.len(),
                value: value.len(),
                max_key,
                max_value: MAX_VALUE_LEN,
            });
        }
        Ok(())
    }
}

pub(super) fn parse_gen(name: &str) -> Option<u64> {
    name.strip_prefix(GEN_PREFIX)?
        .strip_suffix(GEN_SUFFIX)?
        .parse()
        .ok()
}

pub(super) fn remove_generation(dir: &Path, number: u64) {
    let path = Generation::path(dir, number);
    let mut lock = path.as_os_str().to_owned();
    lock.push(LOCK_SUFFIX);
    for p in [path, PathBuf::from(lock)] {
        if let Err(e) = disk::remove_path(&p) {
            tracing::warn!(target: crate::log::DISCOVERY, path = %p.display(), error = %e, "could not remove an old state DB generation");
        }
    }
}
