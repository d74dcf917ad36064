//! Web sources without the feature `web`: the types exist and have no values, so a download
//! names one kind of source ([`Origin`](crate::transfer::Origin)) whether the feature is on or
//! not, and no web source can be made.

/// A web source of snapshots. Without the feature `web` there is none: this type has no values.
#[derive(Debug, Clone)]
pub enum WebSource {}

impl WebSource {
    /// The base URL.
    pub fn base(&self) -> &str {
        match *self {}
    }
}

impl std::fmt::Display for WebSource {
    fn fmt(&self, _: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {}
    }
}

/// A web source failed (never, without the feature `web`).
#[derive(Debug)]
pub(crate) enum WebError {}

impl WebError {
    pub(crate) fn is_transient(&self) -> bool {
        match *self {}
    }
}

impl std::fmt::Display for WebError {
    fn fmt(&self, _: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {}
    }
}

impl std::error::Error for WebError {}
