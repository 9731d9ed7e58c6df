//! Counters the engine keeps for its operators.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use session_lifecycle::EndReason;

/// Upper bounds (seconds) of the release latency histogram's buckets.
pub const RELEASE_LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0,
];

/// Engine counters, updated lock-free.
#[derive(Debug, Default)]
pub struct Metrics {
    started: AtomicU64,
    ended: [AtomicU64; EndReason::ALL.len()],
    orphans_found: AtomicU64,
    releases: AtomicU64,
    release_failures: AtomicU64,
    release_latency_buckets: [AtomicU64; RELEASE_LATENCY_BUCKETS.len()],
    release_latency_micros: AtomicU64,
    presence_writes: AtomicU64,
    store_unavailable: AtomicU64,
    store_failures: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsSnapshot {
    /// Sessions started.
    pub started: u64,
    /// Sessions ended, per reason, in [`EndReason::ALL`] order.
    pub ended: [(EndReason, u64); EndReason::ALL.len()],
    /// Orphans the sweeper or timers ended.
    pub orphans_found: u64,
    /// Releases that succeeded.
    pub releases: u64,
    /// Release attempts that failed.
    pub release_failures: u64,
    /// Cumulative counts of releases at or under each bound of
    /// [`RELEASE_LATENCY_BUCKETS`].
    pub release_latency_buckets: [u64; RELEASE_LATENCY_BUCKETS.len()],
    /// Sum of release latencies, in seconds.
    pub release_latency_sum: f64,
    /// Store writes of client socket presence this node made (one when it first holds a
    /// session's sockets, one when it lets go; none per ping).
    pub presence_writes: u64,
    /// Store calls that failed because the store could not be reached.
    pub store_unavailable: u64,
    /// Store calls that failed otherwise (a corrupt row, a constraint, a bug).
    pub store_failures: u64,
}

impl Metrics {
    pub(crate) fn session_started(&self) {
        self.started.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn session_ended(&self, reason: EndReason) {
        if let Some(i) = EndReason::ALL.iter().position(|r| *r == reason) {
            self.ended[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn orphan_found(&self) {
        self.orphans_found.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn release_done(&self, took: Duration) {
        self.releases.fetch_add(1, Ordering::Relaxed);
        let secs = took.as_secs_f64();
        for (i, bound) in RELEASE_LATENCY_BUCKETS.iter().enumerate() {
            if secs <= *bound {
                self.release_latency_buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.release_latency_micros
            .fetch_add(micros, Ordering::Relaxed);
    }

    pub(crate) fn presence_written(&self) {
        self.presence_writes.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn store_failed(&self, unavailable: bool) {
        let counter = if unavailable {
            &self.store_unavailable
        } else {
            &self.store_failures
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn release_failed(&self) {
        self.release_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters now.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        MetricsSnapshot {
            started: load(&self.started),
            ended: std::array::from_fn(|i| (EndReason::ALL[i], load(&self.ended[i]))),
            orphans_found: load(&self.orphans_found),
            releases: load(&self.releases),
            release_failures: load(&self.release_failures),
            release_latency_buckets: std::array::from_fn(|i| {
                load(&self.release_latency_buckets[i])
            }),
            release_latency_sum: load(&self.release_latency_micros) as f64 / 1e6,
            presence_writes: load(&self.presence_writes),
            store_unavailable: load(&self.store_unavailable),
            store_failures: load(&self.store_failures),
        }
    }
}
