//! Fair limits: each tenant's request rate, as a token bucket (GCRA, `governor`), held
//! for the cluster: every instance admits its share of the tenant's rate, the rate split
//! by the live nodes it sees (so N instances do not allow N times the limit).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
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
#[derive(Debug, Default)]
pub struct RateLimits {
    /// The live nodes the limits are split by (at least 1).
    nodes: AtomicU32,
    /// Per tenant: the node count its bucket was made for, and the bucket.
    buckets: Mutex<HashMap<String, (u32, std::sync::Arc<Bucket>)>>,
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
        let bucket = {
            let mut buckets = session_lifecycle_runtime::lock(&self.buckets);
            match buckets.get(tenant) {
                Some((made_for, bucket)) if *made_for == nodes => std::sync::Arc::clone(bucket),
                _ => {
                    let bucket = std::sync::Arc::new(RateLimiter::direct(share(limit, nodes)));
                    buckets.insert(tenant.to_owned(), (nodes, std::sync::Arc::clone(&bucket)));
                    bucket
                }
            }
        };
        bucket
            .check()
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }
}

/// This node's share of `limit` when `nodes` share it: the rate and the burst divided,
/// rounded up, at least one.
fn share(limit: RateLimit, nodes: u32) -> Quota {
    let part = |n: u32| NonZeroU32::new(n.div_ceil(nodes).max(1)).unwrap_or(NonZeroU32::MIN);
    let per_request = Duration::from_secs(1) / part(limit.per_second).get();
    Quota::with_period(per_request)
        .unwrap_or_else(|| Quota::per_second(part(limit.per_second)))
        .allow_burst(part(limit.burst))
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
    }
}
