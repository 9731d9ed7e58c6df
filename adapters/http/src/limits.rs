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

type Bucket = RateLimiter<governor::state::NotKeyed, governor::state::InMemoryState, DefaultClock>;

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
/// of its cells as there are live nodes: this instance then admits the rate divided by the
/// nodes, exactly (a share of 1/s over two nodes is one request every 2 s), and a change in
/// the node count keeps what the bucket holds instead of handing out a fresh burst.
#[derive(Debug, Default)]
pub struct RateLimits {
    /// The live nodes the limits are split by (at least 1).
    nodes: AtomicU32,
    /// Per tenant.
    buckets: Mutex<HashMap<String, TenantBucket>>,
}

/// A tenant's bucket, with the limit and capacity it was made with.
#[derive(Debug)]
struct TenantBucket {
    limit: RateLimit,
    capacity: u32,
    bucket: Arc<Bucket>,
}

impl RateLimits {
    /// Limits split over one node until told otherwise.
    pub fn new() -> RateLimits {
        RateLimits {
            nodes: AtomicU32::new(1),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// The live nodes now sharing each limit.
    pub fn set_nodes(&self, nodes: u32) {
        self.nodes.store(nodes.max(1), Ordering::Relaxed);
    }

    /// The live nodes sharing each limit.
    pub fn nodes(&self) -> u32 {
        self.nodes.load(Ordering::Relaxed).max(1)
    }

    /// Admits one request of `tenant` under `limit`, or says how long to wait.
    pub fn admit(&self, tenant: &str, limit: RateLimit) -> Result<(), Duration> {
        let nodes = self.nodes();
        // A node admits at least one request at once, so the bucket holds at least one
        // request's cells; it is made anew only when that floor moves.
        let capacity = limit.burst.max(nodes).max(1);
        let bucket = {
            let mut buckets = session_lifecycle_runtime::lock(&self.buckets);
            match buckets.get(tenant) {
                Some(t) if t.limit == limit && t.capacity == capacity => Arc::clone(&t.bucket),
                _ => {
                    let bucket = Arc::new(RateLimiter::direct(quota(limit, capacity)));
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
            Ok(Err(not_until)) => Err(not_until.wait_time_from(DefaultClock::default().now())),
            // Not reached: the capacity covers a request's cells.
            Err(_) => Err(Duration::from_secs(1)),
        }
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

    #[test]
    fn a_burst_is_admitted_then_the_rate_and_shares_split_by_nodes() {
        let limits = RateLimits::new();
        let limit = RateLimit {
            per_second: 10,
            burst: 4,
        };
        let admitted = (0..20).filter(|_| limits.admit("a", limit).is_ok()).count();
        assert_eq!(admitted, 4, "the burst, then nothing at once");
        let wait = limits.admit("a", limit).unwrap_err();
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
        assert!(
            limits.admit("b", limit).is_ok(),
            "another tenant has its own"
        );
        limits.set_nodes(2);
        let admitted = (0..20).filter(|_| limits.admit("c", limit).is_ok()).count();
        assert_eq!(admitted, 2, "half the burst on each of two nodes");
        let wait = limits.admit("c", limit).unwrap_err();
        assert!(
            wait > Duration::from_millis(150) && wait <= Duration::from_millis(200),
            "a request every 200 ms, half of 10/s: {wait:?}"
        );
    }

    #[test]
    fn a_share_below_one_request_a_second_is_kept_exactly() {
        let limits = RateLimits::new();
        limits.set_nodes(2);
        let limit = RateLimit {
            per_second: 1,
            burst: 1,
        };
        assert!(limits.admit("a", limit).is_ok(), "one request at once");
        let wait = limits.admit("a", limit).unwrap_err();
        assert!(
            wait > Duration::from_millis(1900),
            "1/s over two nodes: one request every 2 s here, {wait:?}"
        );
    }

    #[test]
    fn a_change_in_the_node_count_hands_out_no_fresh_burst() {
        let limits = RateLimits::new();
        let limit = RateLimit {
            per_second: 5,
            burst: 10,
        };
        let admitted = (0..20).filter(|_| limits.admit("a", limit).is_ok()).count();
        assert_eq!(admitted, 10);
        limits.set_nodes(2);
        assert!(limits.admit("a", limit).is_err(), "still drained");
        limits.set_nodes(1);
        assert!(limits.admit("a", limit).is_err(), "still drained");
    }
}
