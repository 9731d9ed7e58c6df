//! The simulated wall clock: tokio's paused clock plus an offset that the run steps
//! forward and back, as NTP or an operator might.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use session_lifecycle::{Clock, Timestamp};
use session_lifecycle_runtime::{BoxFuture, RuntimeClock, sleep_until_wall};

/// A wall clock over virtual time that can be stepped. Clones share the offset.
#[derive(Debug, Clone)]
pub struct SimClock {
    base: Timestamp,
    start: tokio::time::Instant,
    offset_ms: Arc<AtomicI64>,
}

impl SimClock {
    /// A clock showing `base` now. Must be made inside the simulation's runtime.
    pub fn new(base: Timestamp) -> SimClock {
        SimClock {
            base,
            start: tokio::time::Instant::now(),
            offset_ms: Arc::new(AtomicI64::new(0)),
        }
    }

    /// Steps the clock by `ms` (negative: back).
    pub fn step(&self, ms: i64) {
        self.offset_ms.fetch_add(ms, Ordering::SeqCst);
    }

    /// Virtual time since the run began: never steps.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
}

impl Clock for SimClock {
    fn now(&self) -> Timestamp {
        let mono = self.base.saturating_add(self.start.elapsed());
        let offset = self.offset_ms.load(Ordering::SeqCst);
        let by = Duration::from_millis(offset.unsigned_abs());
        if offset >= 0 {
            mono.saturating_add(by)
        } else {
            mono.saturating_sub(by)
        }
    }
}

impl RuntimeClock for SimClock {
    /// Sleeps on virtual time, looking at the stepped clock again on waking and every few
    /// seconds, as the system clock's sleeps do.
    fn sleep_until(&self, deadline: Timestamp) -> BoxFuture<'static, ()> {
        let clock = self.clone();
        Box::pin(async move { sleep_until_wall(&clock, deadline).await })
    }

    fn sleep(&self, period: Duration) -> BoxFuture<'static, ()> {
        Box::pin(tokio::time::sleep(period))
    }

    fn monotonic(&self) -> Option<Duration> {
        Some(self.start.elapsed())
    }
}
