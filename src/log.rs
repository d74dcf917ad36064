//! The log targets users filter on (`RUST_LOG="NETWORK:SNAPSHOT=debug"`), one constant each,
//! used by every module that logs.

/// Discovery, decisions, snapshot creation and loading.
pub const DISCOVERY: &str = "NETWORK:SNAPSHOT";

/// The downloading side of the chunk stream.
pub const DOWNLOAD: &str = "SNAPSHOT DOWNLOAD";

/// The serving side of the chunk stream.
pub const STREAMER: &str = "SNAPSHOT:STREAMER";
