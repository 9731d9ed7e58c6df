//! The engine's view of its store: every call goes through here, which keeps the memory of
//! outages ([`Reachability`]) that liveness judgements rely on.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::Instrument;

use session_lifecycle::{EndReason, Resource, SessionId, Timestamp, Transition};

use super::health::Reachability;
use super::lock;
use crate::clock::RuntimeClock;
use session_lifecycle_store::{
    AttachOutcome, BoxFuture, CreateOutcome, EndCount, ListQuery, NewSession, NodeMembership,
    NodeRow, PresenceStore, ReleaseClaim, ReleaseProgress, ReleaseQueue, RoomEvent, RoomState,
    RoomStore, SessionRecord, SessionStore, Store, StoreError, StoreHealth, TenantScope,
    TouchOutcome,
};

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

impl SessionStore for WatchedStore {
    fn create(&self, new: NewSession) -> BoxFuture<'_, Result<CreateOutcome, StoreError>> {
        watched!(self, "create", self.inner.create(new))
    }
    fn attach(
        &self,
        id: SessionId,
        resource: Resource,
    ) -> BoxFuture<'_, Result<AttachOutcome, StoreError>> {
        watched!(self, "attach", self.inner.attach(id, resource))
    }
    fn end<'a>(
        &'a self,
        id: SessionId,
        tenant: TenantScope<'a>,
        now: Timestamp,
        reason: EndReason,
        claim: Option<ReleaseClaim>,
    ) -> BoxFuture<'a, Result<Option<(SessionRecord, Transition)>, StoreError>> {
        watched!(self, "end", self.inner.end(id, tenant, now, reason, claim))
    }
    fn get(&self, id: SessionId) -> BoxFuture<'_, Result<Option<SessionRecord>, StoreError>> {
        watched!(self, "get", self.inner.get(id))
    }
    fn list(&self, query: ListQuery) -> BoxFuture<'_, Result<Vec<SessionRecord>, StoreError>> {
        watched!(self, "list", self.inner.list(query))
    }
    fn ended_since(
        &self,
        tenant: Option<String>,
        since: Timestamp,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<SessionRecord>, StoreError>> {
        watched!(
            self,
            "ended_since",
            self.inner.ended_since(tenant, since, limit)
        )
    }
    fn count_ends(
        &self,
        tenant: Option<String>,
        since: Timestamp,
        until: Timestamp,
        bucket: Duration,
    ) -> BoxFuture<'_, Result<Vec<EndCount>, StoreError>> {
        watched!(
            self,
            "count_ends",
            self.inner.count_ends(tenant, since, until, bucket)
        )
    }
    fn touch<'a>(
        &'a self,
        id: SessionId,
        tenant: TenantScope<'a>,
        now: Timestamp,
    ) -> BoxFuture<'a, Result<TouchOutcome, StoreError>> {
        watched!(self, "touch", self.inner.touch(id, tenant, now))
    }
    fn due(
        &self,
        now: Timestamp,
        orphan_timeout: Duration,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<(SessionId, EndReason)>, StoreError>> {
        watched!(self, "due", self.inner.due(now, orphan_timeout, limit))
    }
}

impl ReleaseQueue for WatchedStore {
    fn claim_releases(
        &self,
        node: &str,
        now: Timestamp,
        lease: Duration,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<SessionRecord>, StoreError>> {
        let node = node.to_owned();
        watched!(
            self,
            "claim_releases",
            self.inner.claim_releases(&node, now, lease, limit)
        )
    }
    fn record_release(
        &self,
        node: &str,
        progress: ReleaseProgress,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        let node = node.to_owned();
        watched!(
            self,
            "record_release",
            self.inner.record_release(&node, progress)
        )
    }
    fn drop_claims(&self, node: &str) -> BoxFuture<'_, Result<(), StoreError>> {
        let node = node.to_owned();
        watched!(self, "drop_claims", self.inner.drop_claims(&node))
    }
    fn watch_releases<'a>(
        &'a self,
        node: &'a str,
        wake: &'a (dyn Fn() + Send + Sync),
    ) -> BoxFuture<'a, ()> {
        self.inner.watch_releases(node, wake)
    }
}

impl NodeMembership for WatchedStore {
    fn node_alive(&self, node: &str, now: Timestamp) -> BoxFuture<'_, Result<(), StoreError>> {
        let node = node.to_owned();
        watched!(self, "node_alive", self.inner.node_alive(&node, now))
    }
    fn live_nodes(
        &self,
        now: Timestamp,
        node_timeout: Duration,
    ) -> BoxFuture<'_, Result<u32, StoreError>> {
        watched!(self, "live_nodes", self.inner.live_nodes(now, node_timeout))
    }
    fn report_node<'a>(
        &'a self,
        node: &'a str,
        report: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        watched!(self, "report_node", self.inner.report_node(node, report))
    }
    fn nodes(
        &self,
        now: Timestamp,
        node_timeout: Duration,
        window: Duration,
    ) -> BoxFuture<'_, Result<Vec<NodeRow>, StoreError>> {
        watched!(self, "nodes", self.inner.nodes(now, node_timeout, window))
    }
    fn end_dead_nodes(
        &self,
        except: &str,
        now: Timestamp,
        node_timeout: Duration,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<SessionId>, StoreError>> {
        let except = except.to_owned();
        watched!(
            self,
            "end_dead_nodes",
            self.inner.end_dead_nodes(&except, now, node_timeout, limit)
        )
    }
}

impl RoomStore for WatchedStore {
    fn room_event(
        &self,
        event: RoomEvent,
        now: Timestamp,
    ) -> BoxFuture<'_, Result<Option<Vec<RoomState>>, StoreError>> {
        watched!(self, "room_event", self.inner.room_event(event, now))
    }
    fn room_state(&self, id: SessionId) -> BoxFuture<'_, Result<Option<RoomState>, StoreError>> {
        watched!(self, "room_state", self.inner.room_state(id))
    }
    fn touch_present(&self, now: Timestamp) -> BoxFuture<'_, Result<Vec<SessionId>, StoreError>> {
        watched!(self, "touch_present", self.inner.touch_present(now))
    }
    fn prune_rooms(
        &self,
        ended_before: Timestamp,
        limit: u32,
    ) -> BoxFuture<'_, Result<u32, StoreError>> {
        watched!(
            self,
            "prune_rooms",
            self.inner.prune_rooms(ended_before, limit)
        )
    }
}

impl PresenceStore for WatchedStore {
    fn set_presence(
        &self,
        session: SessionId,
        node: &str,
        holds: bool,
        now: Timestamp,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        let node = node.to_owned();
        watched!(
            self,
            "set_presence",
            self.inner.set_presence(session, &node, holds, now)
        )
    }
    fn clear_presence(&self, node: &str, now: Timestamp) -> BoxFuture<'_, Result<(), StoreError>> {
        let node = node.to_owned();
        watched!(
            self,
            "clear_presence",
            self.inner.clear_presence(&node, now)
        )
    }
    fn presence(
        &self,
        session: SessionId,
        now: Timestamp,
        node_timeout: Duration,
    ) -> BoxFuture<'_, Result<Vec<String>, StoreError>> {
        watched!(
            self,
            "presence",
            self.inner.presence(session, now, node_timeout)
        )
    }
    fn watch_ends<'a>(&'a self, ended: &'a (dyn Fn(SessionId) + Send + Sync)) -> BoxFuture<'a, ()> {
        self.inner.watch_ends(ended)
    }
}

impl StoreHealth for WatchedStore {
    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        watched!(self, "ping", self.inner.ping())
    }
}

session_lifecycle_store::delegate_outbox!(WatchedStore, watched);
session_lifecycle_store::delegate_idempotency!(WatchedStore, watched);
