//! Clocks for drivers: what time it is, and sleeping until a given time, from one source.
//!
//! Every time decision of the engine (timers, leases, release retries, grace waits, the
//! sweeper's and heartbeat's intervals) reads [`RuntimeClock::now`] and waits with
//! [`RuntimeClock::sleep_until`], so a test that controls the clock controls them all:
//! [`ManualClock`] moves only when told to, [`TokioClock`] follows tokio's clock (paused in
//! tests: `tokio::time::pause`, `advance`), [`SystemClock`] is the wall clock.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use session_lifecycle::{Clock, Timestamp};

use session_lifecycle_store::BoxFuture;

/// A clock the engine reads and sleeps on.
pub trait RuntimeClock: Clock + Send + Sync + 'static {
    /// Completes once [`now`](Clock::now) is at or past `deadline` (at once if it already
    /// is). Dropping the future cancels the wait.
    fn sleep_until(&self, deadline: Timestamp) -> BoxFuture<'static, ()>;

    /// Completes once `period` has passed, as time passes: a step of the wall clock
    /// neither shortens nor stretches it. Intervals (a heartbeat, a sweep, a release's
    /// deadline, a retry's wait) sleep this way; a step back of the clock would otherwise
    /// stall a heartbeat for as long as the step, and other instances take the node for
    /// dead. The default waits until [`now`](Clock::now) plus `period`, right for clocks
    /// that do not step.
    fn sleep(&self, period: Duration) -> BoxFuture<'static, ()> {
        self.sleep_until(self.now().saturating_add(period))
    }

    /// Time elapsed on a clock that never steps (a monotonic clock), on the same scale as
    /// [`now`](Clock::now), from any fixed origin; `None` if the clock has no such reading.
    /// Comparing the two tells a step of the wall clock from time passing: the engine
    /// counts a step forward like an outage, time in which no liveness could arrive.
    fn monotonic(&self) -> Option<Duration> {
        None
    }
}

/// The system's wall clock; sleeps are tokio sleeps, re-checked against the wall clock on
/// waking (a clock stepped back makes them sleep again) and at least every
/// [`WALL_RECHECK`] (a clock stepped forward wakes them soon).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

/// The longest a wait for a wall-clock deadline sleeps before looking at the clock again:
/// the monotonic sleep underneath does not know that the wall clock stepped.
pub const WALL_RECHECK: Duration = Duration::from_secs(5);

/// Sleeps until `clock` shows `deadline`, looking at it again at least every
/// [`WALL_RECHECK`]: for clocks whose wall time can step away from tokio's clock.
pub async fn sleep_until_wall(clock: &impl Clock, deadline: Timestamp) {
    loop {
        let left = deadline.saturating_duration_since(clock.now());
        if left.is_zero() {
            return;
        }
        tokio::time::sleep(left.min(WALL_RECHECK)).await;
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let millis = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Timestamp::from_millis(millis)
    }
}

/// The origin of [`SystemClock`]'s monotonic readings.
static MONOTONIC_ORIGIN: std::sync::LazyLock<std::time::Instant> =
    std::sync::LazyLock::new(std::time::Instant::now);

impl RuntimeClock for SystemClock {
    fn monotonic(&self) -> Option<Duration> {
        Some(MONOTONIC_ORIGIN.elapsed())
    }

    fn sleep(&self, period: Duration) -> BoxFuture<'static, ()> {
        Box::pin(tokio::time::sleep(period))
    }

    fn sleep_until(&self, deadline: Timestamp) -> BoxFuture<'static, ()> {
        Box::pin(async move { sleep_until_wall(&SystemClock, deadline).await })
    }
}

/// A clock that moves only when told to. Clones share the same time; sleepers wake when it
/// is moved past their deadline.
#[derive(Debug, Clone)]
pub struct ManualClock {
    millis: Arc<tokio::sync::watch::Sender<u64>>,
    /// Time passed by [`advance`](ManualClock::advance): a [`set`](ManualClock::set) is
    /// a step, not time passing.
    passed: Arc<std::sync::atomic::AtomicU64>,
}

impl ManualClock {
    /// A clock showing `start`.
    pub fn new(start: Timestamp) -> ManualClock {
        ManualClock {
            millis: Arc::new(tokio::sync::watch::Sender::new(start.as_millis())),
            passed: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        }
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let by = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        self.passed
            .fetch_add(by, std::sync::atomic::Ordering::SeqCst);
        self.millis.send_modify(|m| *m = m.saturating_add(by));
    }

    /// Sets the clock to `to`, which may be in the past (a clock stepping back).
    pub fn set(&self, to: Timestamp) {
        self.millis.send_replace(to.as_millis());
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_millis(*self.millis.borrow())
    }
}

impl RuntimeClock for ManualClock {
    fn monotonic(&self) -> Option<Duration> {
        Some(Duration::from_millis(
            self.passed.load(std::sync::atomic::Ordering::SeqCst),
        ))
    }

    fn sleep_until(&self, deadline: Timestamp) -> BoxFuture<'static, ()> {
        let mut rx = self.millis.subscribe();
        Box::pin(async move {
            // The sender lives as long as any clone of the clock; a dropped clock never
            // reaches the deadline, so the wait simply never ends.
            if rx.wait_for(|m| *m >= deadline.as_millis()).await.is_err() {
                std::future::pending::<()>().await;
            }
        })
    }
}

/// A clock that follows tokio's time from a starting timestamp: with tokio's time paused
/// (`#[tokio::test(start_paused = true)]`), tests and simulations run hours of timeouts in
/// milliseconds, and the engine and the backends' own tokio sleeps agree on what time it is.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    base: Timestamp,
    start: tokio::time::Instant,
}

impl TokioClock {
    /// A clock showing `base` now, moving with tokio's clock.
    pub fn new(base: Timestamp) -> TokioClock {
        TokioClock {
            base,
            start: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Timestamp {
        self.base.saturating_add(self.start.elapsed())
    }
}

impl RuntimeClock for TokioClock {
    fn monotonic(&self) -> Option<Duration> {
        Some(self.start.elapsed())
    }

    fn sleep(&self, period: Duration) -> BoxFuture<'static, ()> {
        Box::pin(tokio::time::sleep(period))
    }

    fn sleep_until(&self, deadline: Timestamp) -> BoxFuture<'static, ()> {
        let at = self.start + deadline.saturating_duration_since(self.base);
        Box::pin(tokio::time::sleep_until(at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn manual_sleepers_wake_when_the_clock_passes_their_deadline() {
        let clock = ManualClock::new(Timestamp::from_millis(1_000));
        let sleep = clock.sleep_until(Timestamp::from_millis(1_500));
        let waiter = tokio::spawn(sleep);
        clock.advance(Duration::from_millis(400));
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        clock.advance(Duration::from_millis(100));
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .unwrap();
        // A deadline already past completes at once.
        clock.sleep_until(Timestamp::from_millis(10)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn tokio_clock_follows_paused_time() {
        let clock = TokioClock::new(Timestamp::from_millis(5_000));
        clock.sleep_until(Timestamp::from_millis(65_000)).await;
        assert_eq!(clock.now(), Timestamp::from_millis(65_000));
    }
}
