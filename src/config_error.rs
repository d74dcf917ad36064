//! [`ConfigError`]: a setting refused when a component is built, naming the setting, what it
//! must be, and the value it had.

use std::fmt;

/// A setting has a value that cannot work (a zero interval, an empty window, a limit of 0, ...).
/// Refused when the component is built, never clamped silently.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid setting {setting}: must be {requirement}, got {value}")]
pub struct ConfigError {
    /// The setting, as its `with_*` setter names it (`discovery_interval`, ...).
    pub setting: &'static str,
    /// What it must be.
    pub requirement: &'static str,
    /// The value it had.
    pub value: String,
}

impl ConfigError {
    pub(crate) fn new(
        setting: &'static str,
        requirement: &'static str,
        value: impl fmt::Debug,
    ) -> Self {
        Self {
            setting,
            requirement,
            value: format!("{value:?}"),
        }
    }

    /// Refuses a zero duration.
    pub(crate) fn nonzero_duration(
        setting: &'static str,
        value: std::time::Duration,
    ) -> Result<(), Self> {
        if value.is_zero() {
            return Err(Self::new(setting, "longer than zero", value));
        }
        Ok(())
    }

    /// Refuses a zero count.
    pub(crate) fn nonzero(setting: &'static str, value: u64) -> Result<(), Self> {
        if value == 0 {
            return Err(Self::new(setting, "at least 1", value));
        }
        Ok(())
    }
}
