//! Byte-rate limiting for the serving side, on `governor` (GCRA, lock-free).

use std::num::NonZeroU32;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// Unit the limiter counts in: one cell is this many bytes.
const CELL: u64 = 1024;

/// A token bucket of bytes per second.
#[derive(Debug)]
pub(crate) struct ByteLimiter {
    limiter: DefaultDirectRateLimiter,
    burst_cells: u32,
}

impl ByteLimiter {
    /// A limiter of `bytes_per_sec` (at least 1 KiB/s), allowing bursts of a tenth of a second
    /// (at least one 256 KiB send piece) so that pacing stays smooth without starving a stream.
    pub(crate) fn new(bytes_per_sec: u64) -> Self {
        let per_sec = (bytes_per_sec / CELL).clamp(1, u64::from(u32::MAX)) as u32;
        let burst_cells = (per_sec / 10).max(256);
        let quota = Quota::per_second(NonZeroU32::new(per_sec).expect("at least 1"))
            .allow_burst(NonZeroU32::new(burst_cells).expect("at least 64"));
        Self {
            limiter: RateLimiter::direct(quota),
            burst_cells,
        }
    }

    /// Waits until `bytes` may be sent.
    pub(crate) async fn take(&self, bytes: usize) {
        let mut cells = (bytes as u64).div_ceil(CELL);
        while cells > 0 {
            let n = cells.min(u64::from(self.burst_cells)) as u32;
            let n = NonZeroU32::new(n).expect("n > 0");
            // `n` never exceeds the burst, so this cannot fail.
            let _ = self.limiter.until_n_ready(n).await;
            cells -= u64::from(n.get());
        }
    }
}
