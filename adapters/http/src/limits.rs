//! Fair limits: each tenant's request rate, as a token bucket (GCRA, `governor`), held
//! for the cluster: every instance admits its share of the tenant's rate, the rate split
//! by the live nodes it sees (so N instances do not allow N times the limit).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{Quota, RateLimiter};

type Bucket<C> = RateLimiter<
    governor::state::NotKeyed,
    governor::state::InMemoryState,
    C,
    governor::middleware::NoOpMiddleware<<C as Clock>::Instant>,
>;

/// A tenant's request rate limit, for the whole cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Requests per second, sustained.
    pub per_second: u32,
    /// Requests it may make at once after a quiet spell.
    pub burst: u32,
}

/// The buckets of one instance: a share of each tenant's limit.
///
/// Each tenant has one bucket of its whole rate and burst, and a request here takes as many
/// of its cells as there are serving nodes: this instance then admits the rate divided by
/// the nodes, exactly (a share of 1/s over two nodes is one request every 2 s), and a
/// change in the node count keeps what the bucket holds instead of handing out a fresh
/// burst.
#[derive(Debug)]
pub struct RateLimits<C: Clock = DefaultClock> {
    /// The serving nodes the limits are split by (at least 1).
    nodes: AtomicU32,
    /// Per tenant.
    buckets: Mutex<HashMap<String, TenantBucket<C>>>,
    clock: C,
}

/// A tenant's bucket, with the limit and capacity it was made with.
#[derive(Debug)]
struct TenantBucket<C: Clock> {
    limit: RateLimit,
    capacity: u32,
    bucket: Arc<Bucket<C>>,
}

impl RateLimits {
    /// Limits split over one node until told otherwise, on the real clock.
    pub fn new() -> RateLimits {
        RateLimits::with_clock(DefaultClock::default())
    }
}

impl Default for RateLimits {
    fn default() -> RateLimits {
        RateLimits::new()
    }
}

impl<C: Clock + Clone> RateLimits<C> {
    /// Limits split over one node until told otherwise, on `clock`.
    pub fn with_clock(clock: C) -> RateLimits<C> {
        RateLimits {
            nodes: AtomicU32::new(1),
            buckets: Mutex::new(HashMap::new()),
            clock,
        }
    }

    /// The serving nodes now sharing each limit.
    pub fn set_nodes(&self, nodes: u32) {
        self.nodes.store(nodes.max(1), Ordering::Relaxed);
    }

    /// The serving nodes sharing each limit.
    pub fn nodes(&self) -> u32 {
        self.nodes.load(Ordering::Relaxed).max(1)
    }

    /// Admits one request of `tenant` under `limit`, or says how long to wait.
    pub fn admit(&self, tenant: &str, limit: RateLimit) -> Result<(), Duration> {
        let nodes = self.nodes();
        // A node admits at least one request at once, so the bucket holds at least one
        // request's cells; when that floor moves, the bucket is made anew, as far from full
        // as the old one was.
        let capacity = limit.burst.max(nodes).max(1);
        let bucket = {
            let mut buckets = session_lifecycle_runtime::lock(&self.buckets);
            match buckets.get(tenant) {
                Some(t) if t.limit == limit && t.capacity == capacity => Arc::clone(&t.bucket),
                old => {
                    let bucket = Arc::new(RateLimiter::direct_with_clock(
                        quota(limit, capacity),
                        self.clock.clone(),
                    ));
                    if let Some(old) = old {
                        carry_over(&old.bucket, old.capacity, &bucket, capacity);
                    }
                    let made = TenantBucket {
                        limit,
                        capacity,
                        bucket: Arc::clone(&bucket),
                    };
                    buckets.insert(tenant.to_owned(), made);
                    bucket
                }
            }
        };
        let cells = NonZeroU32::new(nodes).unwrap_or(NonZeroU32::MIN);
        match bucket.check_n(cells) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(not_until.wait_time_from(self.clock.now())),
            // Not reached: the capacity covers a request's cells.
            Err(_) => Err(Duration::from_secs(1)),
        }
    }
}

/// Leaves `new` (of `new_capacity` cells, full) as far from full as `old` is now: the
/// same time until it is full again (GCRA's own state), so a bucket made anew hands out no
/// fresh burst, and one that was full stays full. `old` is being replaced, so it is
/// measured by taking: the most cells it can give at once (a failed take takes nothing).
/// Capacities move only while the burst is below the node count, so they are small.
fn carry_over<C: Clock>(old: &Bucket<C>, old_capacity: u32, new: &Bucket<C>, new_capacity: u32) {
    let held = (1..=old_capacity)
        .rev()
        .find(|n| NonZeroU32::new(*n).is_some_and(|n| matches!(old.check_n(n), Ok(Ok(())))))
        .unwrap_or(0);
    let missing = old_capacity.saturating_sub(held).min(new_capacity);
    if let Some(missing) = NonZeroU32::new(missing) {
        let _ = new.check_n(missing);
    }
}

/// A tenant's whole bucket: `limit`'s rate, holding `capacity` cells.
fn quota(limit: RateLimit, capacity: u32) -> Quota {
    let at_least_one = |n: u32| NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
    Quota::per_second(at_least_one(limit.per_second)).allow_burst(at_least_one(capacity))
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn limits() -> (RateLimits<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        (RateLimits::with_clock(clock.clone()), clock)
    }

    fn admitted(limits: &RateLimits<FakeRelativeClock>, tenant: &str, limit: RateLimit) -> usize {
        (0..50)
            .filter(|_| limits.admit(tenant, limit).is_ok())
            .count()
    }

    #[test]
    fn a_burst_is_admitted_then_the_rate_and_shares_split_by_nodes() {
        let (limits, clock) = limits();
        let limit = RateLimit {
            per_second: 10,
            burst: 4,
        };
        assert_eq!(admitted(&limits, "a", limit), 4, "the burst, then nothing");
        assert_eq!(limits.admit("a", limit), Err(Duration::from_millis(100)));
        clock.advance(Duration::from_millis(100));
        assert_eq!(admitted(&limits, "a", limit), 1, "then 10/s");
        assert!(
            limits.admit("b", limit).is_ok(),
            "another tenant has its own"
        );
        limits.set_nodes(2);
        assert_eq!(
            admitted(&limits, "c", limit),
            2,
            "half the burst on each of two"
        );
        assert_eq!(
            limits.admit("c", limit),
            Err(Duration::from_millis(200)),
            "a request every 200 ms, half of 10/s"
        );
    }

    #[test]
    fn a_share_below_one_request_a_second_is_kept_exactly() {
        let (limits, clock) = limits();
        limits.set_nodes(2);
        let limit = RateLimit {
            per_second: 1,
            burst: 1,
        };
        assert_eq!(admitted(&limits, "a", limit), 1, "one request at once");
        assert_eq!(limits.admit("a", limit), Err(Duration::from_secs(2)));
        clock.advance(Duration::from_millis(1999));
        assert!(limits.admit("a", limit).is_err());
        clock.advance(Duration::from_millis(1));
        assert!(
            limits.admit("a", limit).is_ok(),
            "1/s over two: every 2 s here"
        );
    }

    #[test]
    fn a_change_in_the_node_count_hands_out_no_fresh_burst() {
        let (limits, clock) = limits();
        // A burst above the node count: the same bucket throughout.
        let wide = RateLimit {
            per_second: 5,
            burst: 10,
        };
        assert_eq!(admitted(&limits, "a", wide), 10);
        limits.set_nodes(2);
        assert!(limits.admit("a", wide).is_err(), "still drained");
        limits.set_nodes(1);
        assert!(limits.admit("a", wide).is_err(), "still drained");

        // A burst below it: a bucket made anew is as far from full as the old one was.
        let narrow = RateLimit {
            per_second: 1,
            burst: 1,
        };
        assert_eq!(admitted(&limits, "b", narrow), 1);
        for nodes in [2, 3, 1] {
            limits.set_nodes(nodes);
            assert!(
                limits.admit("b", narrow).is_err(),
                "drained on {nodes} nodes"
            );
        }
        // Refilled while idle, a made-anew bucket is full too.
        clock.advance(Duration::from_secs(10));
        limits.set_nodes(3);
        assert_eq!(admitted(&limits, "b", narrow), 1, "one request at once");
    }
}
