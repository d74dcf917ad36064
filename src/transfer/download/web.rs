//! A web source of a download (feature `web`): finding the snapshot in the source's index, its
//! manifest, and one request's chunks from `Range` reads of the outboard (the proof nodes) and
//! the archive, checked against the content root as a peer's are. The proof nodes near the
//! root serve every request: a bounded cache per source keeps them.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use super::DownloadTarget;
use super::fetch::{FetchError, Landing, Sink};
use crate::chunk::{ChunkTree, Part};
use crate::snapshot::{ARCHIVE_FILE, Manifest, OUTBOARD_FILE};
use crate::transfer::web::{WebError, WebSource};

/// Proof nodes kept per web source (64 bytes each: 1 MiB).
const NODE_CACHE: usize = 16 * 1024;

/// Outboard reads merge nodes this close to each other into one request.
const NODE_GAP: u64 = 4096;

/// Most bytes one outboard read asks for.
const NODE_SPAN: u64 = 256 * 1024;

/// The proof nodes read from one web source, by outboard offset.
pub(super) struct NodeCache(Mutex<lru::LruCache<u64, [u8; 64]>>);

impl NodeCache {
    pub(super) fn new() -> Self {
        Self(Mutex::new(lru::LruCache::new(
            std::num::NonZeroUsize::new(NODE_CACHE).expect("not zero"),
        )))
    }

    fn get(&self, offset: u64) -> Option<[u8; 64]> {
        self.0.lock().ok()?.get(&offset).copied()
    }

    fn put(&self, offset: u64, node: [u8; 64]) {
        if let Ok(mut c) = self.0.lock() {
            c.put(offset, node);
        }
    }
}

/// Finds `target` in the source's index and reads its manifest, which must be the target's.
/// Returns the snapshot's directory there and the manifest.
pub(super) async fn connect_web(
    web: &WebSource,
    target: DownloadTarget,
    timeout: Duration,
) -> Result<(String, Manifest), super::connect::ConnectError> {
    use super::connect::ConnectError;
    let listing = web
        .index(timeout)
        .await?
        .into_iter()
        .find(|l| l.ad.key.content_root == target.content_root)
        .ok_or_else(|| ConnectError::Unknown(format!("{web} does not list the snapshot")))?;
    let manifest = web.manifest(&listing.path, timeout).await?;
    if let Some(what) = target.mismatch(&manifest) {
        return Err(ConnectError::Mismatch(what));
    }
    Ok((listing.path, manifest))
}

/// Fetches chunks `chunks` of the snapshot in `path` on `web`: the proof nodes it lacks (from
/// `nodes`, else in merged outboard reads), then the archive bytes in one range read, fed to the
/// decoder in encoding order, so that every chunk is checked before it is written, as from a
/// peer. Holds at most one outboard read and one body piece in memory.
#[allow(clippy::too_many_arguments)]
pub(super) async fn fetch_web(
    web: &WebSource,
    path: &str,
    nodes: &NodeCache,
    tree: ChunkTree,
    chunks: Range<u64>,
    sink: &Sink,
    stall: Duration,
    written: &AtomicU64,
) -> Result<(), FetchError> {
    let protocol = |e: crate::chunk::ChunkError| FetchError::Protocol(e.to_string());
    let parts = tree.encoding(chunks.clone()).map_err(protocol)?;
    let (mut have, missing) = cached_nodes(&parts, nodes);
    let data = parts.iter().filter_map(|p| match p {
        Part::Data { offset, len } => Some((*offset, *len as u64)),
        Part::Node { .. } => None,
    });
    let Some(span) = data.fold(None, |span: Option<Range<u64>>, (offset, len)| {
        Some(span.map_or(offset, |s| s.start)..offset + len)
    }) else {
        return Err(FetchError::Protocol("a range without data".into()));
    };
    // The proof nodes and the archive bytes are asked for at once.
    let outboard = format!("{path}/{OUTBOARD_FILE}");
    let archive = format!("{path}/{ARCHIVE_FILE}");
    let (read, body) = tokio::join!(
        read_nodes(web, &outboard, &missing, nodes, &mut have, stall),
        web.range(&archive, span, stall)
    );
    read?;
    let mut body = body?;
    let mut decoder = tree.range_decoder(chunks).map_err(protocol)?;
    let landing = Landing::new(sink, tree, written);
    let result = feed(&parts, &have, &mut body, &mut decoder, &landing).await?;
    let result = result.and_then(|()| decoder.finish());
    landing.finish(result)
}

/// The proof nodes of `parts` the cache holds, and the offsets of those it lacks (sorted).
fn cached_nodes(parts: &[Part], nodes: &NodeCache) -> (HashMap<u64, [u8; 64]>, Vec<u64>) {
    let mut have = HashMap::new();
    let mut missing = Vec::new();
    for part in parts {
        if let Part::Node { offset } = part {
            match nodes.get(*offset) {
                Some(n) => {
                    have.insert(*offset, n);
                }
                None => missing.push(*offset),
            }
        }
    }
    missing.sort_unstable();
    missing.dedup();
    (have, missing)
}

/// Reads the nodes at `missing` from the outboard, in merged spans, into `have` and the cache.
async fn read_nodes(
    web: &WebSource,
    outboard: &str,
    missing: &[u64],
    nodes: &NodeCache,
    have: &mut HashMap<u64, [u8; 64]>,
    stall: Duration,
) -> Result<(), WebError> {
    for span in spans(missing) {
        let mut body = web.range(outboard, span.clone(), stall).await?;
        let mut bytes = Vec::with_capacity((span.end - span.start) as usize);
        while let Some(piece) = body.next().await? {
            bytes.extend_from_slice(&piece);
        }
        for offset in missing.iter().filter(|o| span.contains(o)) {
            let at = (offset - span.start) as usize;
            // The body is exactly the span (checked as it is read): every node is in it.
            let Some(node) = bytes
                .get(at..at + 64)
                .and_then(|b| <[u8; 64]>::try_from(b).ok())
            else {
                return Err(WebError::Truncated {
                    url: web.url(outboard),
                    got: bytes.len() as u64,
                    expected: span.end - span.start,
                });
            };
            nodes.put(*offset, node);
            have.insert(*offset, node);
        }
    }
    Ok(())
}

/// Feeds the decoder in encoding order: each node from `have`, the data from `body`. Returns
/// the landing's verdict (a chunk that fails its proof, a write that fails), or the body's
/// error.
async fn feed(
    parts: &[Part],
    have: &HashMap<u64, [u8; 64]>,
    body: &mut crate::transfer::web::Body,
    decoder: &mut crate::chunk::RangeDecoder,
    landing: &Landing<'_>,
) -> Result<Result<(), crate::chunk::ChunkError>, FetchError> {
    let mut piece = prost::bytes::Bytes::new();
    for part in parts {
        match part {
            Part::Node { offset } => {
                let node = have.get(offset).expect("every node read above");
                if let Err(e) = landing.feed(decoder, node) {
                    return Ok(Err(e));
                }
            }
            Part::Data { len, .. } => {
                let mut left = *len;
                while left > 0 {
                    if piece.is_empty() {
                        piece = match body.next().await {
                            Ok(Some(p)) => p,
                            Ok(None) => return Ok(Ok(())),
                            Err(e) => return Err(e.into()),
                        };
                    }
                    let take = left.min(piece.len());
                    let bytes = piece.split_to(take);
                    left -= take;
                    if let Err(e) = landing.feed(decoder, &bytes) {
                        return Ok(Err(e));
                    }
                }
            }
        }
    }
    Ok(Ok(()))
}

/// Outboard reads covering `offsets` (sorted): nodes close together share one read.
fn spans(offsets: &[u64]) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for &o in offsets {
        match out.last_mut() {
            Some(s) if o <= s.end + NODE_GAP && o + 64 - s.start <= NODE_SPAN => s.end = o + 64,
            _ => out.push(o..o + 64),
        }
    }
    out
}

impl From<WebError> for FetchError {
    fn from(e: WebError) -> Self {
        FetchError::Web(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_close_together_are_read_at_once() {
        assert_eq!(spans(&[0, 64, 128]), vec![0..192]);
        assert_eq!(spans(&[0, 64, 100_000]), vec![0..128, 100_000..100_064]);
        let far: Vec<u64> = (0..10_000).map(|i| i * 64).collect();
        let s = spans(&far);
        assert!(s.iter().all(|r| r.end - r.start <= NODE_SPAN));
        assert_eq!(
            s.iter().map(|r| (r.end - r.start) / 64).sum::<u64>(),
            10_000
        );
    }
}
