//! What a node advertises of its own snapshots.

use super::message::{MAX_SNAPSHOTS, SnapshotAd};
use crate::snapshot::Manifest;

/// The snapshots a node holding `held` (any order) advertises, and when its newest was made
/// (seconds since the Unix epoch): its full snapshots, newest first, each followed by the
/// newest incremental one on it, at most [`MAX_SNAPSHOTS`]. Older incrementals are not
/// advertised: a node that can take an incremental takes the newest.
pub(crate) fn advertised<'a>(
    held: impl IntoIterator<Item = &'a Manifest>,
) -> (Vec<SnapshotAd>, u64) {
    let mut held: Vec<&Manifest> = held.into_iter().collect();
    held.sort_by_key(|m| std::cmp::Reverse((m.slot, m.content_root)));
    let mut out = Vec::new();
    for full in held.iter().filter(|m| m.is_full()) {
        if let Some(inc) = held
            .iter()
            .find(|m| m.base.is_some_and(|b| b.content_root == full.content_root))
        {
            out.push(SnapshotAd::of(inc));
        }
        out.push(SnapshotAd::of(full));
    }
    out.truncate(MAX_SNAPSHOTS);
    let modified = held.first().map_or(0, |m| m.created_unix_ms / 1000);
    (out, modified)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::ChunkSize;
    use crate::hash::{BankHash, ContentRoot};
    use crate::snapshot::{Base, FORMAT_VERSION, SnapshotKind};

    fn manifest(slot: u64, base: Option<&Manifest>) -> Manifest {
        Manifest {
            format_version: FORMAT_VERSION,
            kind: if base.is_some() {
                SnapshotKind::Incremental
            } else {
                SnapshotKind::Full
            },
            slot,
            bank_hash: BankHash([slot as u8; 32]),
            content_root: ContentRoot([slot as u8; 32]),
            archive_size: 10,
            chunk_size: ChunkSize::DEFAULT,
            created_unix_ms: slot * 1000,
            entry_count: 1,
            state_bytes: 1,
            zstd_level: 1,
            base: base.map(|b| Base::of(&b.key())),
            zstd_version: 0,
        }
    }

    #[test]
    fn fulls_newest_first_each_with_its_newest_incremental() {
        let f1 = manifest(100, None);
        let f2 = manifest(200, None);
        let i1a = manifest(150, Some(&f1));
        let i1b = manifest(170, Some(&f1));
        let i2 = manifest(250, Some(&f2));
        let (ads, modified) = advertised([&f1, &i2, &i1a, &f2, &i1b]);
        let slots: Vec<u64> = ads.iter().map(|a| a.key.slot).collect();
        assert_eq!(slots, vec![250, 200, 170, 100]);
        assert_eq!(modified, 250);
        assert_eq!(advertised([]).0, Vec::new());
        // Never more than a message may carry.
        let many: Vec<Manifest> = (1..=20).map(|s| manifest(s * 10, None)).collect();
        assert_eq!(advertised(&many).0.len(), MAX_SNAPSHOTS);
    }
}
