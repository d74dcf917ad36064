//! A node's web sources without the feature `web`: none (the settings that name them need the
//! feature).

use std::task::{Context, Poll};

use libp2p::PeerId;

use super::Config;
use crate::config_error::ConfigError;
use crate::discovery::Advert;
use crate::transfer::WebSource;

/// No web sources.
pub(super) struct WebSources;

impl WebSources {
    pub(super) fn new(_: &Config) -> Result<Self, ConfigError> {
        Ok(Self)
    }

    pub(super) fn get(&self, _: &PeerId) -> Option<WebSource> {
        None
    }

    pub(super) fn ask_all(&mut self) {}

    pub(super) fn poll(&mut self, _: &mut Context<'_>) -> Poll<Option<Advert>> {
        Poll::Pending
    }
}
