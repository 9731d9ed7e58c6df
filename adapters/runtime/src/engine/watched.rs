//! The engine's view of its store: every call goes through here, which keeps the memory of
//! outages ([`Reachability`]) that liveness judgements rely on.

use std::sync::{Arc, Mutex};
use tracing::Instrument;

use super::health::Reachability;
use super::lock;
use crate::clock::RuntimeClock;
use session_lifecycle_store::{Store, StoreError};

/// Wraps the engine's store and records, after each call, whether the store could be
/// reached.
pub(crate) struct WatchedStore {
    inner: Arc<dyn Store>,
    health: Arc<Mutex<Reachability>>,
    clock: Arc<dyn RuntimeClock>,
    metrics: Arc<crate::Metrics>,
}

impl WatchedStore {
    pub(crate) fn new(
        inner: Arc<dyn Store>,
        health: Arc<Mutex<Reachability>>,
        clock: Arc<dyn RuntimeClock>,
        metrics: Arc<crate::Metrics>,
    ) -> WatchedStore {
        WatchedStore {
            inner,
            health,
            clock,
            metrics,
        }
    }

    fn observe<T>(&self, result: &Result<T, StoreError>) {
        let reachable = !result.as_ref().is_err_and(StoreError::is_unavailable);
        if result.is_err() {
            self.metrics.store_failed(!reachable);
        }
        let now = self.clock.now();
        let mut health = lock(&self.health);
        health.observe_clock(now, self.clock.monotonic());
        health.observe(reachable, now);
    }
}

/// Runs one store call in a `store` span of its own (named by the call), and records
/// whether the store could be reached.
macro_rules! watched {
    ($self:ident, $name:literal, $call:expr) => {
        Box::pin(
            async move {
                let result = $call.await;
                $self.observe(&result);
                result
            }
            .instrument(tracing::debug_span!("store", call = $name)),
        )
    };
}

session_lifecycle_store::delegate_store!(WatchedStore, watched);
