use super::frames::FrameReader;
use super::segment::decode_segment;
use super::*;
use crate::bank_hash::{BankHasher, MAX_KEY_LEN};

fn full(entries: &[(&[u8], &[u8])], slot: u64) -> (Vec<u8>, ArchiveSummary) {
    let mut h = BankHasher::new();
    let mut w = ArchiveWriter::new(Vec::new(), Header::full(slot), DEFAULT_ZSTD_LEVEL).unwrap();
    for (k, v) in entries {
        w.push(k, Some(v)).unwrap();
        h.update(k, v);
    }
    w.finish(h.finalize(slot)).unwrap()
}

/// Records as owned pairs (a deletion has no value).
type Owned = Vec<(Vec<u8>, Option<Vec<u8>>)>;

fn read_all(bytes: &[u8]) -> Result<(Owned, ArchiveSummary), ArchiveError> {
    let mut r = ArchiveReader::new(bytes)?;
    let mut got = Vec::new();
    while let Some(rec) = r.next_record()? {
        got.push((rec.key.to_vec(), rec.value.map(<[u8]>::to_vec)));
    }
    Ok((got, r.summary().unwrap()))
}

#[test]
fn full_and_incremental_round_trip() {
    let (bytes, summary) = full(&[(b"a", b""), (b"b", b"2"), (b"c", b"three")], 9);
    let (got, read) = read_all(&bytes).unwrap();
    assert_eq!(read, summary);
    assert_eq!(got.len(), 3);
    assert_eq!(got[2], (b"c".to_vec(), Some(b"three".to_vec())));
    assert_eq!(summary.header.kind, SnapshotKind::Full);
    assert_eq!(
        summary.state_bytes,
        (HEADER_LEN + 8 + 1 + 8 + 2 + 8 + 6 + END_LEN) as u64
    );

    let header = Header::incremental(20, 9, summary.bank_hash);
    let mut w = ArchiveWriter::new(Vec::new(), header, 1).unwrap();
    w.push(b"a", None).unwrap();
    w.push(b"d", Some(b"new")).unwrap();
    let target = crate::hash::BankHash([5; 32]);
    let (bytes, summary) = w.finish(target).unwrap();
    let (got, read) = read_all(&bytes).unwrap();
    assert_eq!(read, summary);
    assert_eq!(
        got,
        vec![
            (b"a".to_vec(), None),
            (b"d".to_vec(), Some(b"new".to_vec()))
        ]
    );
    assert_eq!(read.header, header);
    assert_eq!(
        read.bank_hash, target,
        "an incremental's hash is checked when applied"
    );
}

#[test]
fn segments_are_cut_at_records_and_oversized_records_stand_alone() {
    let big = vec![7u8; SEGMENT_BYTES * 2 + 123];
    let mut entries: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    for round in 0..3u32 {
        for i in 0..5_000u32 {
            entries.push((
                (round * 10_000 + i).to_be_bytes().to_vec(),
                i.to_le_bytes().repeat(50),
            ));
        }
        entries.push(((round * 10_000 + 9_999).to_be_bytes().to_vec(), big.clone()));
    }
    let refs: Vec<(&[u8], &[u8])> = entries.iter().map(|(k, v)| (&k[..], &v[..])).collect();
    let (bytes, summary) = full(&refs, 3);
    assert_eq!(summary.record_count, entries.len() as u64);
    // Every frame holds whole records: parse each on its own.
    let mut frames = FrameReader::new(&bytes[..]);
    let mut d = zstd::bulk::Decompressor::new().unwrap();
    let mut kind = None;
    let mut n = 0;
    while let Some(f) = frames.next_frame().unwrap() {
        match decode_segment(&f, kind, true, &mut d).unwrap() {
            Segment::Header(h) => kind = Some(h.kind),
            Segment::Records(r) => {
                assert!(r.len() == 1 || r.bytes() <= SEGMENT_BYTES);
                n += r.len();
            }
            Segment::End { count, .. } => assert_eq!(count as usize, n),
        }
    }
    assert_eq!(n, entries.len());
    let (got, _) = read_all(&bytes).unwrap();
    assert_eq!(got.len(), entries.len());
    assert_eq!(got[5_000].1.as_deref(), Some(&big[..]));
    // Same records, same bytes.
    assert_eq!(full(&refs, 3).0, bytes);
}

/// The archive is exactly what the format description says, built here independently.
#[test]
fn bytes_follow_the_format_description() {
    let entries: Vec<(Vec<u8>, Vec<u8>)> = (0..40_000u32)
        .map(|i| (i.to_be_bytes().to_vec(), (i % 7).to_le_bytes().repeat(30)))
        .collect();
    let refs: Vec<(&[u8], &[u8])> = entries.iter().map(|(k, v)| (&k[..], &v[..])).collect();
    let mut h = BankHasher::new();
    let mut w = ArchiveWriter::new(Vec::new(), Header::full(77), 3).unwrap();
    for (k, v) in &refs {
        w.push(k, Some(v)).unwrap();
        h.update(k, v);
    }
    let (bytes, _) = w.finish(h.finalize(77)).unwrap();

    let mut header = MAGIC.to_vec();
    header.extend_from_slice(&2u32.to_le_bytes());
    header.push(0);
    header.extend_from_slice(&77u64.to_le_bytes());
    header.extend_from_slice(&77u64.to_le_bytes());
    header.extend_from_slice(&[0u8; 32]);
    let mut expected = zstd::bulk::compress(&header, 3).unwrap();
    let mut segment = Vec::new();
    for (k, v) in &refs {
        let len = 8 + k.len() + v.len();
        if !segment.is_empty() && segment.len() + len > SEGMENT_BYTES {
            expected.extend(zstd::bulk::compress(&segment, 3).unwrap());
            segment.clear();
        }
        segment.extend_from_slice(&(k.len() as u32).to_le_bytes());
        segment.extend_from_slice(k);
        segment.extend_from_slice(&(v.len() as u32).to_le_bytes());
        segment.extend_from_slice(v);
    }
    expected.extend(zstd::bulk::compress(&segment, 3).unwrap());
    let mut end = u32::MAX.to_le_bytes().to_vec();
    end.extend_from_slice(&40_000u64.to_le_bytes());
    end.extend_from_slice(h.finalize(77).as_bytes());
    expected.extend(zstd::bulk::compress(&end, 3).unwrap());
    assert_eq!(bytes, expected);
}

#[test]
fn the_writer_refuses_what_the_format_does_not_allow() {
    let mut w = ArchiveWriter::new(Vec::new(), Header::full(1), 1).unwrap();
    w.push(b"b", Some(b"")).unwrap();
    let kind = |e: io::Error| e.kind();
    assert_eq!(
        kind(w.push(b"a", Some(b"")).unwrap_err()),
        io::ErrorKind::InvalidInput
    );
    assert_eq!(
        kind(w.push(b"b", Some(b"")).unwrap_err()),
        io::ErrorKind::InvalidInput
    );
    assert_eq!(
        kind(w.push(b"c", None).unwrap_err()),
        io::ErrorKind::InvalidInput
    );
    assert_eq!(
        kind(w.push(b"", Some(b"")).unwrap_err()),
        io::ErrorKind::InvalidInput
    );
    let long = vec![1u8; MAX_KEY_LEN + 1];
    assert_eq!(
        kind(w.push(&long, Some(b"")).unwrap_err()),
        io::ErrorKind::InvalidInput
    );
}

/// Frames of raw stream bytes, each compressed on its own.
fn framed(parts: &[&[u8]]) -> Vec<u8> {
    parts
        .iter()
        .flat_map(|p| zstd::bulk::compress(p, 1).unwrap())
        .collect()
}

fn end(count: u64, hash: [u8; 32]) -> Vec<u8> {
    let mut e = u32::MAX.to_le_bytes().to_vec();
    e.extend_from_slice(&count.to_le_bytes());
    e.extend_from_slice(&hash);
    e
}

fn rec(k: &[u8], v: Option<&[u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    encode_record(&mut out, k, v);
    out
}

#[test]
fn the_reader_refuses_bad_streams() {
    let header = Header::full(5).encode();
    let ok_hash = |entries: &[(&[u8], &[u8])]| {
        let mut h = BankHasher::new();
        for (k, v) in entries {
            h.update(k, v);
        }
        h.finalize(5).0
    };
    let refuse = |bytes: Vec<u8>| read_all(&bytes).unwrap_err();

    let mut bad_magic = header;
    bad_magic[0] = b'X';
    assert!(matches!(
        refuse(framed(&[&bad_magic])),
        ArchiveError::BadMagic
    ));
    let mut v3 = header;
    v3[8] = 3;
    assert!(matches!(
        refuse(framed(&[&v3])),
        ArchiveError::UnsupportedVersion(3)
    ));
    // Cut off: no end record.
    assert!(matches!(
        refuse(framed(&[&header, &rec(b"a", Some(b"1"))])),
        ArchiveError::Truncated
    ));
    // A key over the limit, an empty key.
    let mut huge = (MAX_KEY_LEN as u32 + 1).to_le_bytes().to_vec();
    huge.extend_from_slice(&[0; 16]);
    assert!(matches!(
        refuse(framed(&[&header, &huge])),
        ArchiveError::KeyOutOfBounds { index: 0, .. } | ArchiveError::BadFrame { .. }
    ));
    assert!(matches!(
        refuse(framed(&[&header, &rec(b"", Some(b"1"))])),
        ArchiveError::KeyOutOfBounds { index: 0, len: 0 }
    ));
    // Unsorted within a segment and across two.
    let mut two = rec(b"b", Some(b""));
    two.extend(rec(b"a", Some(b"")));
    assert!(matches!(
        refuse(framed(&[&header, &two])),
        ArchiveError::Unsorted { index: 1 }
    ));
    let big = vec![0u8; SEGMENT_BYTES];
    assert!(matches!(
        refuse(framed(&[
            &header,
            &rec(b"b", Some(&big)),
            &rec(b"a", Some(b""))
        ])),
        ArchiveError::Unsorted { .. }
    ));
    // Two small segments that the writer would have made one: not canonical.
    assert!(matches!(
        refuse(framed(&[
            &header,
            &rec(b"a", Some(b"")),
            &rec(b"b", Some(b"")),
            &end(2, [0; 32])
        ])),
        ArchiveError::NonCanonicalSegment { frame: 2 }
    ));
    // A deletion in a full archive.
    assert!(matches!(
        refuse(framed(&[&header, &rec(b"a", None)])),
        ArchiveError::DeletionInFull { index: 0 }
    ));
    // An end record with a wrong count, or a wrong bank hash.
    let one = rec(b"a", Some(b"1"));
    assert!(matches!(
        refuse(framed(&[&header, &one, &end(2, ok_hash(&[(b"a", b"1")]))])),
        ArchiveError::CountMismatch {
            trailer: 2,
            actual: 1
        }
    ));
    assert!(matches!(
        refuse(framed(&[&header, &one, &end(1, [0; 32])])),
        ArchiveError::BankHashMismatch { .. }
    ));
    // Something after the end.
    let good = framed(&[&header, &one, &end(1, ok_hash(&[(b"a", b"1")]))]);
    read_all(&good).unwrap();
    let mut trailing = good.clone();
    trailing.push(0);
    assert!(matches!(refuse(trailing), ArchiveError::TrailingData));
    // An incremental whose base is not below it.
    let inc = Header {
        kind: SnapshotKind::Incremental,
        slot: 5,
        base_slot: 5,
        base_bank_hash: crate::hash::BankHash([1; 32]),
    }
    .encode();
    assert!(matches!(
        refuse(framed(&[&inc])),
        ArchiveError::BadHeader(_)
    ));
}

#[test]
fn limits_stop_a_reader_before_it_reads_on() {
    let entries: Vec<(Vec<u8>, Vec<u8>)> = (0..100u32)
        .map(|i| (i.to_be_bytes().to_vec(), vec![0u8; 1000]))
        .collect();
    let refs: Vec<(&[u8], &[u8])> = entries.iter().map(|(k, v)| (&k[..], &v[..])).collect();
    let (bytes, summary) = full(&refs, 1);
    let drain = |mut r: ArchiveReader<&[u8]>| -> Result<(), ArchiveError> {
        while r.next_record()?.is_some() {}
        Ok(())
    };
    assert!(matches!(
        drain(ArchiveReader::with_limits(&bytes[..], 99, u64::MAX).unwrap()),
        Err(ArchiveError::OverLimit {
            what: "records",
            limit: 99
        })
    ));
    assert!(matches!(
        drain(ArchiveReader::with_limits(&bytes[..], 100, 50_000).unwrap()),
        Err(ArchiveError::OverLimit { .. })
    ));
    drain(ArchiveReader::with_limits(&bytes[..], 100, summary.state_bytes).unwrap()).unwrap();
}

/// A zstd frame holding one record whose value is `len` copies of one byte, in RLE blocks: a
/// few bytes per 128 KiB on the wire, `len` bytes once decoded.
fn rle_record_frame(key: &[u8; 4], len: usize) -> Vec<u8> {
    let mut head = Vec::new();
    head.extend_from_slice(&4u32.to_le_bytes());
    head.extend_from_slice(key);
    head.extend_from_slice(&(len as u32).to_le_bytes());
    let content = (head.len() + len) as u64;
    // Magic, a single-segment frame with an 8-byte content size, no checksum.
    let mut f = vec![0x28, 0xB5, 0x2F, 0xFD, 0xE0];
    f.extend_from_slice(&content.to_le_bytes());
    let block = |f: &mut Vec<u8>, last: bool, kind: u32, size: usize| {
        let h = u32::from(last) | kind << 1 | (size as u32) << 3;
        f.extend_from_slice(&h.to_le_bytes()[..3]);
    };
    block(&mut f, false, 0, head.len());
    f.extend_from_slice(&head);
    let mut left = len;
    while left > 0 {
        let n = left.min(128 << 10);
        left -= n;
        block(&mut f, left == 0, 1, n);
        f.push(b'x');
    }
    f
}

#[test]
fn frames_that_decode_fast_do_not_pile_up_behind_the_one_the_reader_waits_for() {
    // A header, then 24 frames of 32 MiB each that cost about a kilobyte each on the wire.
    let (real, _) = full(&[], 1);
    let header = FrameReader::new(&real[..]).next_frame().unwrap().unwrap();
    let mut archive = header.bytes.clone();
    const VALUE: usize = 32 << 20;
    for i in 0..24u32 {
        let key = format!("k{i:03}");
        archive.extend(rle_record_frame(key.as_bytes().try_into().unwrap(), VALUE));
    }
    assert!(archive.len() < 64 << 10, "{} bytes", archive.len());
    const MEMORY: u64 = 64 << 20;
    let mut d = ParallelDecoder::start(std::io::Cursor::new(archive), 2, false, MEMORY);
    // The reader is slow to take what comes first: the workers go as far as they may.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut segments = 0;
    while let Some(seg) = d.next_segment() {
        if seg.is_err() {
            break; // (no end record: the archive is cut there)
        }
        segments += 1;
        if segments % 6 == 0 {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
    assert_eq!(segments, 25, "header and every frame decoded");
    let peak = d.peak_in_flight();
    assert!(
        peak <= MEMORY + VALUE as u64 + 64,
        "{} MiB in flight at most, not the 768 MiB of every frame at once",
        peak >> 20
    );
    println!("peak decompressed bytes in flight: {} MiB", peak >> 20);
}
