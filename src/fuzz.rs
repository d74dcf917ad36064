//! Entry points for the fuzz targets in `fuzz/`: every decoder that takes bytes from a peer or
//! from disk. Not part of the API.
#![allow(missing_docs)]

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::OnceLock;

use libp2p::PeerId;
use prost::Message;

use crate::chunk::{ChunkSize, ChunkTree, TreeBuilder};
use crate::discovery::message::{self, AdvertLimits};
use crate::hash::ContentRoot;
pub use crate::proto;

const LIMITS: AdvertLimits = AdvertLimits {
    max_archive_bytes: 1 << 40,
    max_chunks: 1 << 26,
};

/// The peer every fuzzed message comes from (fixed, so that inputs are reproducible and
/// seeds can name it).
pub fn sender() -> PeerId {
    static SENDER: OnceLock<PeerId> = OnceLock::new();
    *SENDER.get_or_init(|| {
        let key = libp2p::identity::Keypair::ed25519_from_bytes([7u8; 32]).expect("32 bytes");
        key.public().to_peer_id()
    })
}

/// A gossip message from a peer.
pub fn discovery_gossip(data: &[u8]) {
    let _ = message::check_gossip(data, sender(), 16 << 10, LIMITS);
}

/// A direct request or response from a peer.
pub fn discovery_direct(data: &[u8]) {
    let peer = sender();
    if let Ok(req) = proto::DirectRequest::decode(data) {
        match req.body {
            Some(proto::direct_request::Body::Ask(a)) => {
                let _ = message::check_request(&a, peer);
            }
            Some(proto::direct_request::Body::Answer(a)) => {
                let _ = message::check_advert(&a, peer, LIMITS);
            }
            None => {}
        }
    }
    if let Ok(resp) = proto::DirectResponse::decode(data)
        && let Some(a) = resp.answer
    {
        let _ = message::check_advert(&a, peer, LIMITS);
    }
}

/// Chunk-stream frames: hello, welcome, requests, response headers (with a manifest and the
/// attestations served beside it).
pub fn chunk_frames(data: &[u8]) {
    let _ = proto::Hello::decode(data);
    let _ = proto::Welcome::decode(data);
    let _ = proto::Request::decode(data);
    if let Ok(h) = proto::ResponseHeader::decode(data) {
        if let Some(m) = h.manifest {
            let _ = crate::snapshot::Manifest::from_proto(&m);
        }
        if let Ok(list) = crate::snapshot::Attestation::decode_list(&h.attestations) {
            assert!(list.len() <= crate::snapshot::MAX_ATTESTATIONS);
        }
    }
}

/// A manifest file.
pub fn manifest(data: &[u8]) {
    let _ = crate::snapshot::Manifest::decode(data);
}

/// Bytes of the archive the chunk-range target decodes against: a fixed pattern.
fn pattern(size: usize) -> Vec<u8> {
    (0..size).map(|i| (i * 7 % 251) as u8).collect()
}

/// The tree of the pattern of `size` bytes in chunks of `chunk` (cached: few geometries).
fn pattern_tree(size: u64, chunk: ChunkSize) -> ChunkTree {
    thread_local! {
        static TREES: RefCell<HashMap<(u64, u32), ChunkTree>> = RefCell::new(HashMap::new());
    }
    TREES.with(|t| {
        *t.borrow_mut()
            .entry((size, chunk.bytes()))
            .or_insert_with(|| {
                let mut b = TreeBuilder::new(chunk, std::io::sink());
                b.update(&pattern(size as usize)).expect("a sink takes all");
                let (root, size, _) = b.finish().expect("a sink takes all");
                ChunkTree::new(size, chunk, root)
            })
    })
}

/// The geometry header of a chunk-range input: archive size in KiB (1 to 64), chunk size
/// selector, first chunk, chunk count. The rest of the input is the encoding.
const RANGE_HEADER: usize = 5;

/// An encoded chunk range received for a snapshot, decoded against the root of a known
/// archive, so that valid encodings (the seeds) reach the end and mutations of them are caught
/// wherever they land.
pub fn chunk_range(data: &[u8]) {
    if data.len() < RANGE_HEADER {
        return;
    }
    let size = 1024 * (1 + u64::from(data[0] % 64));
    let chunk = ChunkSize::new(1024 << (data[1] % 4)).expect("in bounds");
    let tree = pattern_tree(size, chunk);
    let count = tree.chunk_count();
    let start = u64::from(u16::from_le_bytes([data[2], data[3]])) % count;
    let end = (start + 1 + u64::from(data[4]) % 8).min(count);
    let expected = pattern(size as usize);
    let _ = tree.decode(start..end, &data[RANGE_HEADER..], |offset, bytes| {
        // Whatever is delivered was checked: it is the archive's.
        let at = offset as usize;
        assert_eq!(
            bytes,
            &expected[at..at + bytes.len()],
            "unchecked bytes delivered"
        );
        Ok(())
    });
}

/// An archive's records.
pub fn archive(data: &[u8]) {
    if let Ok(mut r) = crate::snapshot::archive::ArchiveReader::with_limits(data, 1 << 20, 64 << 20)
    {
        while let Ok(Some(_)) = r.next_record() {}
    }
}

/// A download's resume progress file, for an archive whose size the first two bytes give.
pub fn progress(data: &[u8]) {
    if data.len() < 2 {
        return;
    }
    let size = u64::from(u16::from_le_bytes([data[0], data[1]])) * 1024;
    let tree = ChunkTree::new(size, ChunkSize::MIN, ContentRoot([0; 32]));
    let _ = crate::transfer::parse_progress(&data[2..], &tree);
}

/// A have-bitfield from a peer, for a download whose shape the first bytes give.
pub fn have_bitfield(data: &[u8]) {
    if data.len() < 3 {
        return;
    }
    let pieces = 1 + usize::from(u16::from_le_bytes([data[0], data[1]]));
    let per_block = 1 + usize::from(data[2] % 16);
    let blocks = pieces.div_ceil(per_block);
    if let Some(held) = crate::transfer::have_from_bytes(&data[3..], blocks, pieces, per_block) {
        // Whatever is taken is the download's shape, and follows the blocks held.
        assert_eq!(held.len(), pieces);
        assert!(held.ones() <= pieces);
        for p in 0..pieces {
            let block = data[3 + p / per_block / 8] & (1 << (p / per_block % 8)) != 0;
            assert_eq!(held.get(p), block, "piece {p}");
        }
    }
}

/// An `attestations.pb` from disk (or a list a peer or an index carries): what decodes is
/// bounded and verifies against nothing it was not signed for.
pub fn attestations(data: &[u8]) {
    if let Ok(list) = crate::snapshot::Attestation::decode_file(data) {
        assert!(list.len() <= crate::snapshot::MAX_ATTESTATIONS);
        assert!(data.len() <= crate::snapshot::MAX_ATTESTATIONS_BYTES);
        let key = crate::snapshot::SnapshotKey {
            kind: crate::snapshot::SnapshotKind::Full,
            slot: 40,
            bank_hash: crate::hash::BankHash([1; 32]),
            content_root: ContentRoot([2; 32]),
            archive_size: 1000,
            base: None,
        };
        for a in &list {
            // Nobody holds the fixed key's secret but the seed: a fuzzed signature of
            // another key, network or snapshot never verifies.
            let _ = a.verify("fuzz", &key);
            let _ = a.signer();
        }
    }
}

/// A web server's `index.json`.
#[cfg(feature = "web")]
pub fn web_index(data: &[u8]) {
    if let Ok(listings) = crate::transfer::parse_index(data) {
        assert!(listings.len() <= crate::transfer::MAX_INDEX_SNAPSHOTS);
        for l in &listings {
            assert!(!l.path.is_empty() && l.path.len() <= 128);
            assert_eq!(l.ad.key.base.is_some(), !l.ad.key.is_full());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::ChunkSource;
    use crate::hash::BankHash;
    use crate::snapshot::archive::{ArchiveWriter, Header};

    /// One valid input per target (and a few more), as the library writes them.
    fn seeds() -> Vec<(&'static str, Vec<u8>)> {
        let mut out = Vec::new();
        let me = sender();
        // Discovery.
        let request = message::request(
            me,
            5,
            Some(40),
            &["/ip4/1.2.3.4/udp/9/quic-v1".parse().unwrap()],
        );
        out.push((
            "discovery_gossip",
            message::gossip(proto::discovery_message::Body::Request(request.clone())),
        ));
        let (archive, m) = small_archive();
        let ad = crate::discovery::SnapshotAd::of(&m);
        let advert = message::advert(
            me,
            &[ad],
            &|_| Vec::new(),
            &[],
            &["10.0.0.1:9000".parse().unwrap()],
            Some(90),
            1,
            0,
        );
        out.push((
            "discovery_gossip",
            message::gossip(proto::discovery_message::Body::Announcement(advert.clone())),
        ));
        out.push((
            "discovery_direct",
            proto::DirectRequest {
                body: Some(proto::direct_request::Body::Ask(request)),
            }
            .encode_to_vec(),
        ));
        out.push((
            "discovery_direct",
            proto::DirectResponse {
                answer: Some(advert),
            }
            .encode_to_vec(),
        ));
        // Chunk stream.
        out.push((
            "chunk_frames",
            proto::Hello {
                protocol_version: 2,
                proof: vec![1u8; 32].into(),
            }
            .encode_to_vec(),
        ));
        out.push((
            "chunk_frames",
            proto::ResponseHeader {
                status: proto::Status::Ok as i32,
                message: String::new(),
                manifest: Some(m.to_proto()),
                encoded_len: 0,
                complete: false,
                attestations: vec![
                    crate::snapshot::Attestation::sign(
                        &libp2p::identity::Keypair::generate_ed25519(),
                        "seed",
                        &m.key(),
                    )
                    .unwrap()
                    .to_proto(),
                ],
            }
            .encode_to_vec(),
        ));
        out.push(("manifest", m.encode()));
        out.push(("archive", archive));
        // A chunk range: 40 KiB of the pattern in 2 KiB chunks, chunks 3 to 7.
        let tmp = tempfile::tempdir().unwrap();
        let (size, chunk) = (40 * 1024, ChunkSize::new(2048).unwrap());
        let path = tmp.path().join("a");
        std::fs::write(&path, pattern(size)).unwrap();
        let ob = tmp.path().join("ob");
        let (root, _) = crate::chunk::write_outboard(&path, chunk, &ob).unwrap();
        let source =
            ChunkSource::open(ChunkTree::new(size as u64, chunk, root), &path, &ob).unwrap();
        let mut range = vec![39, 1, 3, 0, 3];
        source.encode(3..7, &mut range).unwrap();
        out.push(("chunk_range", range));
        // A progress file: 64 KiB archive in 1 KiB chunks, every other chunk done.
        let tree = ChunkTree::new(64 * 1024, ChunkSize::MIN, ContentRoot([0; 32]));
        let mut done = crate::transfer::Bits::new(tree.chunk_count() as usize);
        for i in (0..tree.chunk_count() as usize).step_by(2) {
            done.set(i);
        }
        let mut progress = vec![64, 0];
        progress.extend(crate::transfer::progress_bytes(&tree, &done, false));
        out.push(("progress", progress));
        // A have-bitfield: 20 pieces in blocks of 3, blocks 0, 2 and 6 held.
        out.push(("have_bitfield", vec![19, 0, 2, 0b0100_0101]));
        // A web index naming the small archive's snapshot.
        let index =
            crate::snapshot::publish::index_json(&[("full-40".to_string(), m.clone(), Vec::new())]);
        out.push(("web_index", index.into_bytes()));
        // An attestations file: the fixed sender's signature of a snapshot.
        let key = libp2p::identity::Keypair::ed25519_from_bytes([7u8; 32]).unwrap();
        let signed = crate::snapshot::Attestation::sign(&key, "fuzz", &m.key()).unwrap();
        out.push((
            "attestations",
            crate::snapshot::Attestation::encode_file(&[signed]),
        ));
        out
    }

    /// A small full archive and its manifest.
    fn small_archive() -> (Vec<u8>, crate::snapshot::Manifest) {
        let mut w = ArchiveWriter::new(Vec::new(), Header::full(40), 3).unwrap();
        let mut lattice = crate::bank_hash::Lattice::new();
        for i in 0..50u32 {
            let (k, v) = (format!("key/{i:04}"), vec![i as u8; 40]);
            w.push(k.as_bytes(), Some(&v)).unwrap();
            lattice.insert(k.as_bytes(), &v);
        }
        let bank_hash: BankHash = lattice.bank_hash(40);
        let (bytes, summary) = w.finish(bank_hash).unwrap();
        let mut b = TreeBuilder::new(ChunkSize::MIN, std::io::sink());
        b.update(&bytes).unwrap();
        let (content_root, archive_size, _) = b.finish().unwrap();
        let m = crate::snapshot::Manifest {
            format_version: crate::snapshot::FORMAT_VERSION,
            kind: summary.header.kind,
            slot: summary.header.slot,
            bank_hash,
            content_root,
            archive_size,
            chunk_size: ChunkSize::MIN,
            created_unix_ms: 1,
            entry_count: summary.record_count,
            state_bytes: summary.state_bytes,
            zstd_level: 3,
            base: None,
            zstd_version: crate::snapshot::manifest::zstd_version(),
        };
        (bytes, m)
    }

    /// Every seed is accepted by its decoder; with `SNAPSYNC_FUZZ_SEEDS=<dir>` they are also
    /// written there, one directory per target (as `fuzz/seeds` holds them).
    #[test]
    fn seeds_are_accepted_by_their_decoders() {
        for (target, bytes) in seeds() {
            match target {
                "discovery_gossip" => {
                    message::check_gossip(&bytes, sender(), 16 << 10, LIMITS).unwrap();
                }
                "discovery_direct" => {
                    if let Ok(proto::DirectRequest {
                        body: Some(proto::direct_request::Body::Ask(a)),
                    }) = proto::DirectRequest::decode(bytes.as_slice())
                    {
                        message::check_request(&a, sender()).unwrap();
                    } else {
                        let r = proto::DirectResponse::decode(bytes.as_slice()).unwrap();
                        message::check_advert(&r.answer.unwrap(), sender(), LIMITS).unwrap();
                    }
                }
                "chunk_frames" => {
                    if let Ok(h) = proto::ResponseHeader::decode(bytes.as_slice())
                        && let Some(m) = h.manifest
                    {
                        crate::snapshot::Manifest::from_proto(&m).unwrap();
                        crate::snapshot::Attestation::decode_list(&h.attestations).unwrap();
                    }
                }
                "manifest" => {
                    crate::snapshot::Manifest::decode(&bytes).unwrap();
                }
                "archive" => {
                    let mut r =
                        crate::snapshot::archive::ArchiveReader::new(bytes.as_slice()).unwrap();
                    let mut n = 0;
                    while r.next_record().unwrap().is_some() {
                        n += 1;
                    }
                    assert_eq!(n, 50);
                }
                "chunk_range" => {
                    let size = 1024 * (1 + u64::from(bytes[0] % 64));
                    let tree = pattern_tree(size, ChunkSize::new(2048).unwrap());
                    let mut got = 0;
                    tree.decode(3..7, &bytes[RANGE_HEADER..], |_, b| {
                        got += b.len();
                        Ok(())
                    })
                    .unwrap();
                    assert_eq!(got, 4 * 2048);
                    chunk_range(&bytes);
                }
                "progress" => {
                    let tree = ChunkTree::new(64 * 1024, ChunkSize::MIN, ContentRoot([0; 32]));
                    assert!(crate::transfer::parse_progress(&bytes[2..], &tree).is_some());
                }
                "have_bitfield" => {
                    let held = crate::transfer::have_from_bytes(&bytes[3..], 7, 20, 3).unwrap();
                    assert_eq!(held.ones(), 3 + 3 + 2);
                    have_bitfield(&bytes);
                }
                "web_index" => {
                    assert_eq!(crate::transfer::parse_index(&bytes).unwrap().len(), 1);
                    web_index(&bytes);
                }
                "attestations" => {
                    let list = crate::snapshot::Attestation::decode_file(&bytes).unwrap();
                    assert_eq!(list.len(), 1);
                    assert_eq!(list[0].signer(), Some(sender()));
                    attestations(&bytes);
                }
                other => panic!("{other}"),
            }
        }
        if let Ok(dir) = std::env::var("SNAPSYNC_FUZZ_SEEDS") {
            for (i, (target, bytes)) in seeds().into_iter().enumerate() {
                let d = std::path::Path::new(&dir).join(target);
                std::fs::create_dir_all(&d).unwrap();
                std::fs::write(d.join(format!("seed-{i}")), bytes).unwrap();
            }
        }
    }
}
