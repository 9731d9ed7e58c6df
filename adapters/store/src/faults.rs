//! A store wrapper that fails on purpose, for testing how callers survive store faults.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use session_lifecycle::{EndReason, Resource, SessionId, Timestamp, Transition};

use crate::error::{BoxFuture, StoreError, TenantScope};
use crate::record::{
    AttachOutcome, CreateOutcome, EndCount, ListQuery, NewSession, NodeRow, ReleaseClaim,
    ReleaseProgress, RoomEvent, RoomState, SessionRecord, TouchOutcome,
};
use crate::store::{
    NodeMembership, PresenceStore, ReleaseQueue, RoomStore, SessionStore, Store, StoreHealth,
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

/// What a [`FaultyStore`] built with [`FaultyStore::deciding`] does with one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallFault {
    /// The call goes through.
    Pass,
    /// The call fails without reaching the inner store (a lost connection).
    Fail,
    /// The call reaches the inner store and commits, then its answer is lost: the caller
    /// sees the store as unreachable.
    LoseAnswer,
    /// The call goes through after this long (on tokio's clock; zero: after letting the
    /// other ready tasks run once): a slower store, and another order of events.
    Late(Duration),
}

/// Decides each call's fault from its number (counting from 1) and the method's name.
pub type FaultDecider = Box<dyn Fn(u64, &'static str) -> CallFault + Send + Sync>;

/// Wraps a store and fails calls per its [`FaultPlan`] (or its decider). A failed call does
/// not reach the inner store, so it changes nothing, as a lost connection would; a call
/// whose answer is lost changed what it changed.
pub struct FaultyStore {
    inner: Arc<dyn Store>,
    plan: FaultPlan,
    decider: Option<FaultDecider>,
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
            decider: None,
            calls: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            restored: AtomicBool::new(false),
            down: AtomicBool::new(false),
        }
    }

    /// Wraps `inner`; `decider` chooses each call's fault (while the store is not taken
    /// down, and until [`restore`](Self::restore)).
    pub fn deciding(inner: Arc<dyn Store>, decider: FaultDecider) -> FaultyStore {
        FaultyStore {
            decider: Some(decider),
            ..FaultyStore::new(inner, FaultPlan::None)
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

    /// Before a call: fails it (`Err`), or lets it through (late, if so decided), saying
    /// whether its answer is to be lost (`Some(k)`, the call's number).
    async fn check(&self, method: &'static str) -> Result<Option<u64>, StoreError> {
        let k = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        if self.restored.load(Ordering::SeqCst) {
            return Ok(None);
        }
        let fault = if self.down.load(Ordering::SeqCst) {
            CallFault::Fail
        } else if let Some(decide) = &self.decider {
            decide(k, method)
        } else {
            let fail = match self.plan {
                FaultPlan::None => false,
                FaultPlan::Once(n) => k == n,
                FaultPlan::From(n) => k >= n,
            };
            if fail {
                CallFault::Fail
            } else {
                CallFault::Pass
            }
        };
        match fault {
            CallFault::Pass => Ok(None),
            CallFault::Fail => {
                self.failures.fetch_add(1, Ordering::SeqCst);
                Err(StoreError::unavailable(InjectedFault(k)))
            }
            CallFault::LoseAnswer => Ok(Some(k)),
            CallFault::Late(by) if by.is_zero() => {
                tokio::task::yield_now().await;
                Ok(None)
            }
            CallFault::Late(by) => {
                tokio::time::sleep(by).await;
                Ok(None)
            }
        }
    }

    /// After a call let through: its answer, or the lost answer's error.
    fn answer<T>(&self, lost: Option<u64>, answer: Result<T, StoreError>) -> Result<T, StoreError> {
        match lost {
            Some(k) if answer.is_ok() => {
                self.failures.fetch_add(1, Ordering::SeqCst);
                Err(StoreError::unavailable(InjectedFault(k)))
            }
            _ => answer,
        }
    }
}

macro_rules! guarded {
    ($self:ident, $method:literal, $call:expr) => {
        Box::pin(async move {
            let lost = $self.check($method).await?;
            let answer = $call.await;
            $self.answer(lost, answer)
        })
    };
}

impl SessionStore for FaultyStore {
    fn create(&self, new: NewSession) -> BoxFuture<'_, Result<CreateOutcome, StoreError>> {
        guarded!(self, "create", self.inner.create(new))
    }
    fn attach(
        &self,
        id: SessionId,
        resource: Resource,
    ) -> BoxFuture<'_, Result<AttachOutcome, StoreError>> {
        guarded!(self, "attach", self.inner.attach(id, resource))
    }
    fn end<'a>(
        &'a self,
        id: SessionId,
        tenant: TenantScope<'a>,
        now: Timestamp,
        reason: EndReason,
        claim: Option<ReleaseClaim>,
    ) -> BoxFuture<'a, Result<Option<(SessionRecord, Transition)>, StoreError>> {
        guarded!(self, "end", self.inner.end(id, tenant, now, reason, claim))
    }
    fn get(&self, id: SessionId) -> BoxFuture<'_, Result<Option<SessionRecord>, StoreError>> {
        guarded!(self, "get", self.inner.get(id))
    }
    fn list(&self, query: ListQuery) -> BoxFuture<'_, Result<Vec<SessionRecord>, StoreError>> {
        guarded!(self, "list", self.inner.list(query))
    }
    fn ended_since(
        &self,
        tenant: Option<String>,
        since: Timestamp,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<SessionRecord>, StoreError>> {
        guarded!(
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
        guarded!(
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
        guarded!(self, "touch", self.inner.touch(id, tenant, now))
    }
    fn due(
        &self,
        now: Timestamp,
        orphan_timeout: Duration,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<(SessionId, EndReason)>, StoreError>> {
        guarded!(self, "due", self.inner.due(now, orphan_timeout, limit))
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
        guarded!(
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
        guarded!(
            self,
            "record_release",
            self.inner.record_release(&node, progress)
        )
    }
    fn drop_claims(&self, node: &str) -> BoxFuture<'_, Result<(), StoreError>> {
        let node = node.to_owned();
        guarded!(self, "drop_claims", self.inner.drop_claims(&node))
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
        guarded!(self, "node_alive", self.inner.node_alive(&node, now))
    }
    fn live_nodes(
        &self,
        now: Timestamp,
        node_timeout: Duration,
    ) -> BoxFuture<'_, Result<u32, StoreError>> {
        guarded!(self, "live_nodes", self.inner.live_nodes(now, node_timeout))
    }
    fn report_node<'a>(
        &'a self,
        node: &'a str,
        report: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        guarded!(self, "report_node", self.inner.report_node(node, report))
    }
    fn nodes(
        &self,
        now: Timestamp,
        node_timeout: Duration,
        window: Duration,
    ) -> BoxFuture<'_, Result<Vec<NodeRow>, StoreError>> {
        guarded!(self, "nodes", self.inner.nodes(now, node_timeout, window))
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
            "end_dead_nodes",
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
        guarded!(self, "room_event", self.inner.room_event(event, now))
    }
    fn room_state(&self, id: SessionId) -> BoxFuture<'_, Result<Option<RoomState>, StoreError>> {
        guarded!(self, "room_state", self.inner.room_state(id))
    }
    fn touch_present(&self, now: Timestamp) -> BoxFuture<'_, Result<Vec<SessionId>, StoreError>> {
        guarded!(self, "touch_present", self.inner.touch_present(now))
    }
    fn prune_rooms(
        &self,
        ended_before: Timestamp,
        limit: u32,
    ) -> BoxFuture<'_, Result<u32, StoreError>> {
        guarded!(
            self,
            "prune_rooms",
            self.inner.prune_rooms(ended_before, limit)
        )
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
        guarded!(
            self,
            "set_presence",
            self.inner.set_presence(session, &node, holds, now)
        )
    }
    fn clear_presence(&self, node: &str, now: Timestamp) -> BoxFuture<'_, Result<(), StoreError>> {
        let node = node.to_owned();
        guarded!(
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
        guarded!(
            self,
            "presence",
            self.inner.presence(session, now, node_timeout)
        )
    }
    fn watch_ends<'a>(&'a self, ended: &'a (dyn Fn(SessionId) + Send + Sync)) -> BoxFuture<'a, ()> {
        self.inner.watch_ends(ended)
    }
}

impl StoreHealth for FaultyStore {
    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        guarded!(self, "ping", self.inner.ping())
    }
}

crate::delegate_outbox!(FaultyStore, guarded);
crate::delegate_idempotency!(FaultyStore, guarded);
