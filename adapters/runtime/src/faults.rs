//! A store wrapper that fails on purpose, for testing how callers survive store faults.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use session_lifecycle::{EndReason, Resource, SessionId, Timestamp, Transition};

use crate::store::{
    AttachOutcome, BoxFuture, CreateOutcome, ListQuery, NewSession, NodeMembership, PresenceStore,
    ReleaseClaim, ReleaseProgress, ReleaseQueue, RoomEvent, RoomState, RoomStore, SessionRecord,
    SessionStore, Store, StoreError, StoreHealth, TenantScope, TouchOutcome,
};

/// The error of a call a [`FaultyStore`] failed on purpose: the k-th call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("injected fault at call {0}")]
pub struct InjectedFault(pub u64);

/// When a [`FaultyStore`] fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultPlan {
    /// Never.
    None,
    /// The k-th call (counting from 1, every method alike) fails, once.
    Once(u64),
    /// Every call from the k-th on fails, until [`FaultyStore::restore`].
    From(u64),
}

/// Wraps a store and fails calls per its [`FaultPlan`]. A failed call does not reach the
/// inner store, so it changes nothing, as a lost connection would.
pub struct FaultyStore {
    inner: Arc<dyn Store>,
    plan: FaultPlan,
    calls: AtomicU64,
    failures: AtomicU64,
    restored: AtomicBool,
    down: AtomicBool,
}

impl FaultyStore {
    /// Wraps `inner` with `plan`.
    pub fn new(inner: Arc<dyn Store>, plan: FaultPlan) -> FaultyStore {
        FaultyStore {
            inner,
            plan,
            calls: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            restored: AtomicBool::new(false),
            down: AtomicBool::new(false),
        }
    }

    /// Calls made so far, failed ones included.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    /// Calls failed on purpose so far.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::SeqCst)
    }

    /// Ends the faults: every later call goes through.
    pub fn restore(&self) {
        self.down.store(false, Ordering::SeqCst);
        self.restored.store(true, Ordering::SeqCst);
    }

    /// Makes every call fail from now on, whatever the plan, until [`restore`](Self::restore).
    pub fn take_down(&self) {
        self.restored.store(false, Ordering::SeqCst);
        self.down.store(true, Ordering::SeqCst);
    }

    fn check(&self) -> Result<(), StoreError> {
        let k = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        if self.restored.load(Ordering::SeqCst) {
            return Ok(());
        }
        let fail = self.down.load(Ordering::SeqCst)
            || match self.plan {
                FaultPlan::None => false,
                FaultPlan::Once(n) => k == n,
                FaultPlan::From(n) => k >= n,
            };
        if fail {
            self.failures.fetch_add(1, Ordering::SeqCst);
            Err(StoreError::unavailable(InjectedFault(k)))
        } else {
            Ok(())
        }
    }
}

macro_rules! guarded {
    ($self:ident, $call:expr) => {
        Box::pin(async move {
            $self.check()?;
            $call.await
        })
    };
}

impl SessionStore for FaultyStore {
    fn create(&self, new: NewSession) -> BoxFuture<'_, Result<CreateOutcome, StoreError>> {
        guarded!(self, self.inner.create(new))
    }
    fn attach(
        &self,
        id: SessionId,
        resource: Resource,
    ) -> BoxFuture<'_, Result<AttachOutcome, StoreError>> {
        guarded!(self, self.inner.attach(id, resource))
    }
    fn end<'a>(
        &'a self,
        id: SessionId,
        tenant: TenantScope<'a>,
        now: Timestamp,
        reason: EndReason,
        claim: Option<ReleaseClaim>,
    ) -> BoxFuture<'a, Result<Option<(SessionRecord, Transition)>, StoreError>> {
        guarded!(self, self.inner.end(id, tenant, now, reason, claim))
    }
    fn get(&self, id: SessionId) -> BoxFuture<'_, Result<Option<SessionRecord>, StoreError>> {
        guarded!(self, self.inner.get(id))
    }
    fn list(&self, query: ListQuery) -> BoxFuture<'_, Result<Vec<SessionRecord>, StoreError>> {
        guarded!(self, self.inner.list(query))
    }
    fn touch<'a>(
        &'a self,
        id: SessionId,
        tenant: TenantScope<'a>,
        now: Timestamp,
    ) -> BoxFuture<'a, Result<TouchOutcome, StoreError>> {
        guarded!(self, self.inner.touch(id, tenant, now))
    }
    fn due(
        &self,
        now: Timestamp,
        orphan_timeout: Duration,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<(SessionId, EndReason)>, StoreError>> {
        guarded!(self, self.inner.due(now, orphan_timeout, limit))
    }
}

impl ReleaseQueue for FaultyStore {
    fn claim_releases(
        &self,
        node: &str,
        now: Timestamp,
        lease: Duration,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<SessionRecord>, StoreError>> {
        let node = node.to_owned();
        guarded!(self, self.inner.claim_releases(&node, now, lease, limit))
    }
    fn record_release(
        &self,
        node: &str,
        progress: ReleaseProgress,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        let node = node.to_owned();
        guarded!(self, self.inner.record_release(&node, progress))
    }
    fn drop_claims(&self, node: &str) -> BoxFuture<'_, Result<(), StoreError>> {
        let node = node.to_owned();
        guarded!(self, self.inner.drop_claims(&node))
    }
    fn watch_releases<'a>(
        &'a self,
        node: &'a str,
        wake: &'a (dyn Fn() + Send + Sync),
    ) -> BoxFuture<'a, ()> {
        self.inner.watch_releases(node, wake)
    }
}

impl NodeMembership for FaultyStore {
    fn node_alive(&self, node: &str, now: Timestamp) -> BoxFuture<'_, Result<(), StoreError>> {
        let node = node.to_owned();
        guarded!(self, self.inner.node_alive(&node, now))
    }
    fn end_dead_nodes(
        &self,
        except: &str,
        now: Timestamp,
        node_timeout: Duration,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<SessionId>, StoreError>> {
        let except = except.to_owned();
        guarded!(
            self,
            self.inner.end_dead_nodes(&except, now, node_timeout, limit)
        )
    }
}

impl RoomStore for FaultyStore {
    fn room_event(
        &self,
        event: RoomEvent,
        now: Timestamp,
    ) -> BoxFuture<'_, Result<Option<Vec<RoomState>>, StoreError>> {
        guarded!(self, self.inner.room_event(event, now))
    }
    fn room_state(&self, id: SessionId) -> BoxFuture<'_, Result<Option<RoomState>, StoreError>> {
        guarded!(self, self.inner.room_state(id))
    }
    fn touch_present(&self, now: Timestamp) -> BoxFuture<'_, Result<Vec<SessionId>, StoreError>> {
        guarded!(self, self.inner.touch_present(now))
    }
    fn prune_rooms(
        &self,
        ended_before: Timestamp,
        limit: u32,
    ) -> BoxFuture<'_, Result<u32, StoreError>> {
        guarded!(self, self.inner.prune_rooms(ended_before, limit))
    }
}

impl PresenceStore for FaultyStore {
    fn set_presence(
        &self,
        session: SessionId,
        node: &str,
        holds: bool,
        now: Timestamp,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        let node = node.to_owned();
        guarded!(self, self.inner.set_presence(session, &node, holds, now))
    }
    fn clear_presence(&self, node: &str, now: Timestamp) -> BoxFuture<'_, Result<(), StoreError>> {
        let node = node.to_owned();
        guarded!(self, self.inner.clear_presence(&node, now))
    }
    fn presence(
        &self,
        session: SessionId,
        now: Timestamp,
        node_timeout: Duration,
    ) -> BoxFuture<'_, Result<Vec<String>, StoreError>> {
        guarded!(self, self.inner.presence(session, now, node_timeout))
    }
    fn watch_ends<'a>(&'a self, ended: &'a (dyn Fn(SessionId) + Send + Sync)) -> BoxFuture<'a, ()> {
        self.inner.watch_ends(ended)
    }
}

impl StoreHealth for FaultyStore {
    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        guarded!(self, self.inner.ping())
    }
}
