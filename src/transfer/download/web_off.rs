//! A download's web sources without the feature `web`: there are none, so these are never
//! called (each takes a [`WebSource`], which has no values).

use std::ops::Range;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use super::DownloadTarget;
use super::connect::ConnectError;
use super::fetch::{FetchError, Sink};
use crate::chunk::ChunkTree;
use crate::snapshot::Manifest;
use crate::transfer::web::{WebError, WebSource};

/// The proof nodes read from one web source (none).
pub(super) struct NodeCache;

impl NodeCache {
    pub(super) fn new() -> Self {
        Self
    }
}

pub(super) async fn connect_web(
    web: &WebSource,
    _: DownloadTarget,
    _: Duration,
) -> Result<(String, Manifest), ConnectError> {
    match *web {}
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn fetch_web(
    web: &WebSource,
    _: &str,
    _: &NodeCache,
    _: ChunkTree,
    _: Range<u64>,
    _: &Sink,
    _: Duration,
    _: &AtomicU64,
) -> Result<(), FetchError> {
    match *web {}
}

impl From<WebError> for FetchError {
    fn from(e: WebError) -> Self {
        FetchError::Web(e)
    }
}
