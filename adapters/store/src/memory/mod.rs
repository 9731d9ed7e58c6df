//! The reference store: every capability, in memory, behind one lock.
//!
//! It keeps nothing across a restart of the process, so it is not for production; it is
//! the executable statement of what the store traits mean (the conformance suite passes on
//! it, as on SQLite and PostgreSQL), and it runs the engine's own tests and simulations in
//! milliseconds, without a database.

mod idempotency;
mod nodes;
mod outbox;
mod presence;
mod releases;
mod rooms;
mod usage;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Duration;

use session_lifecycle::{
    EndReason, EventKind, HeldResource, HeldResources, MAX_RESOURCES, ReleaseState, Resource,
    Session, SessionId, SessionParts, Status, Timestamp, Transition,
};
use tokio::sync::broadcast;

use crate::error::{BoxFuture, StoreError, TenantScope};
use crate::record::{
    AttachOutcome, CreateOutcome, EndCount, ListQuery, NewSession, ReleaseClaim, ReleaseProgress,
    RoomBinding, RoomState, SessionRecord, SessionTimeouts, TouchOutcome,
};
use crate::rows::RELEASED_ON_RETURN;
use crate::store::{ReleaseQueue, SessionStore, StoreHealth};

/// A resource as the store keeps it.
#[derive(Debug, Clone)]
struct ResourceRow {
    resource: Resource,
    release: ReleaseState,
    note: Option<String>,
    last_error: Option<String>,
    lost: bool,
}

/// A session as the store keeps it.
#[derive(Debug, Clone)]
struct SessionRow {
    tenant: String,
    started_at: Timestamp,
    expires_at: Timestamp,
    last_seen_at: Timestamp,
    ending: Option<(Timestamp, EndReason)>,
    metadata: Option<String>,
    room: Option<RoomBinding>,
    room_finished: bool,
    room_emptied_at: Option<Timestamp>,
    node: String,
    timeouts: SessionTimeouts,
    resources: Vec<ResourceRow>,
    release_due_at: Option<Timestamp>,
    claimed_by: Option<String>,
    claimed_until: Option<Timestamp>,
    callback_url: Option<String>,
    ready_at: Option<Timestamp>,
    billing: session_lifecycle::usage::BillingRule,
    /// For a session ended `node_lost`: its node's last heartbeat.
    node_last_seen: Option<Timestamp>,
    usage_closed_to: Option<Timestamp>,
}

#[derive(Debug, Default)]
struct State {
    sessions: BTreeMap<SessionId, SessionRow>,
    /// Per session, the nodes holding client sockets of it.
    presence: BTreeMap<SessionId, BTreeSet<String>>,
    nodes: BTreeMap<String, Timestamp>,
    /// Each node's last report of itself.
    node_reports: BTreeMap<String, String>,
    /// Room events applied: (provider, event id) -> when received.
    room_events: BTreeMap<(String, String), Timestamp>,
    /// Per session: participant identity -> (present, time of its latest event).
    participants: BTreeMap<SessionId, BTreeMap<String, (bool, Timestamp)>>,
    outbox: outbox::Outbox,
    /// Idempotency keys by (tenant, key).
    idempotency: BTreeMap<(String, String), crate::idempotency::StoredKey>,
    /// Per session, its usage records in the order written.
    usage: BTreeMap<SessionId, Vec<crate::usage::UsageRecord>>,
}

impl State {
    /// Session `id` just ended: its `session.ended` event, `session.released` if it held
    /// nothing to release, and its usage settled (at `now`).
    fn ended_events(&mut self, id: SessionId, now: Timestamp) {
        self.settle_usage(id, None, now);
        let Some(s) = self.sessions.get(&id) else {
            return;
        };
        let Some((at, _)) = s.ending else { return };
        let callback = s.callback_url.as_deref();
        self.outbox
            .event(id, &s.tenant, EventKind::Ended, at, callback);
        if s.release_due_at.is_none()
            && s.resources
                .iter()
                .all(|r| matches!(r.release, ReleaseState::Released { .. }))
        {
            self.outbox
                .event(id, &s.tenant, EventKind::Released, at, callback);
        }
    }

    /// Participants present in the room of `id`, and whether anyone ever joined it (a
    /// leave implies a join, even one delivered later).
    fn room_people(&self, id: &SessionId) -> (u32, bool) {
        let people = self.participants.get(id);
        (
            people.map_or(0, |p| p.values().filter(|(here, _)| *here).count()) as u32,
            people.is_some_and(|p| !p.is_empty()),
        )
    }

    fn room_state(&self, id: &SessionId) -> Option<RoomState> {
        let s = self.sessions.get(id)?;
        let (present, ever_joined) = self.room_people(id);
        Some(RoomState {
            session: *id,
            present,
            ever_joined,
            finished: s.room_finished,
            emptied_at: s.room_emptied_at,
            participant_left: s.timeouts.participant_left,
        })
    }

    /// `node` holds no client sockets from `now` on; they were liveness until then.
    fn let_go_of(&mut self, node: &str, now: Timestamp) {
        let held: Vec<SessionId> = self
            .presence
            .iter()
            .filter(|(_, holders)| holders.contains(node))
            .map(|(id, _)| *id)
            .collect();
        for id in held {
            if let Some(s) = self.sessions.get_mut(&id).filter(|s| s.ending.is_none()) {
                s.seen(now);
            }
        }
        self.presence.retain(|_, holders| {
            holders.remove(node);
            !holders.is_empty()
        });
    }

    /// The nodes alive at `now` (a heartbeat within `node_timeout`) holding sockets of `id`.
    fn live_holders(&self, id: &SessionId, now: Timestamp, node_timeout: Duration) -> Vec<String> {
        let cutoff = now.saturating_sub(node_timeout);
        let mut holders: Vec<String> = self
            .presence
            .get(id)
            .into_iter()
            .flatten()
            .filter(|node| self.nodes.get(*node).is_some_and(|seen| *seen > cutoff))
            .cloned()
            .collect();
        holders.sort();
        holders
    }
}

/// The in-memory reference store.
#[derive(Debug)]
pub struct MemoryStore {
    state: Mutex<State>,
    /// Sessions ended (for [`PresenceStore::watch_ends`](crate::store::PresenceStore::watch_ends)).
    ended: broadcast::Sender<SessionId>,
    /// Nodes whose releases may have become due (for [`ReleaseQueue::watch_releases`]).
    due: broadcast::Sender<String>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new()
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> MemoryStore {
        MemoryStore {
            state: Mutex::new(State::default()),
            ended: broadcast::channel(1024).0,
            due: broadcast::channel(1024).0,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        crate::sync::lock(&self.state)
    }
}

fn corrupt(id: &SessionId, detail: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        id: id.to_string(),
        detail: detail.to_string(),
    }
}

impl SessionRow {
    /// Liveness at `now` (never backwards).
    fn seen(&mut self, now: Timestamp) {
        self.last_seen_at = self.last_seen_at.max(now);
    }

    fn record(&self, id: &SessionId) -> Result<SessionRecord, StoreError> {
        let mut resources = HeldResources::new();
        let mut release_notes = Vec::new();
        let mut release_errors = Vec::new();
        for r in &self.resources {
            resources
                .push(HeldResource {
                    resource: r.resource,
                    release: r.release,
                })
                .map_err(|_| corrupt(id, "more resources than a session can hold"))?;
            if let Some(note) = &r.note {
                release_notes.push((r.resource, note.clone()));
            }
            if let (Some(error), ReleaseState::Pending { .. }) = (&r.last_error, r.release) {
                release_errors.push((r.resource, error.clone()));
            }
        }
        let session = Session::try_from(SessionParts {
            session_id: *id,
            status: if self.ending.is_some() {
                Status::Ended
            } else {
                Status::Started
            },
            started_at: self.started_at,
            ended_at: self.ending.map(|(at, _)| at),
            end_reason: self.ending.map(|(_, why)| why),
            expires_at: self.expires_at,
            last_seen_at: self.last_seen_at,
            resources,
        })
        .map_err(|e| corrupt(id, e))?;
        Ok(SessionRecord {
            session,
            tenant: self.tenant.clone(),
            metadata: self.metadata.clone(),
            room: self.room.clone(),
            node: self.node.clone(),
            timeouts: self.timeouts,
            release_notes,
            release_errors,
            ready_at: self.ready_at,
        })
    }

    fn in_scope(&self, tenant: TenantScope<'_>) -> bool {
        tenant.is_none_or(|t| t == self.tenant)
    }

    /// What the core's end does, recorded: ended at `max(now, started_at)`, every held
    /// resource a pending release due then, the next release due then if it holds any.
    fn end(&mut self, now: Timestamp, reason: EndReason) -> Timestamp {
        let at = now.max(self.started_at);
        self.ending = Some((at, reason));
        for r in &mut self.resources {
            if r.release == ReleaseState::Held {
                r.release = ReleaseState::Pending {
                    attempts: 0,
                    retry_at: at,
                };
            }
        }
        if !self.resources.is_empty() {
            self.release_due_at = Some(at);
        }
        at
    }

    /// The earlier of its two deadlines while started, last seen at `seen`, and why it
    /// would end then.
    fn deadline(&self, seen: Timestamp, orphan_timeout: Duration) -> (Timestamp, EndReason) {
        let orphan_at = seen.saturating_add(orphan_timeout);
        if self.expires_at <= orphan_at {
            (self.expires_at, EndReason::Expired)
        } else {
            (orphan_at, EndReason::Orphaned)
        }
    }
}

fn ready<T: Send + 'static>(value: T) -> BoxFuture<'static, T> {
    Box::pin(std::future::ready(value))
}

impl SessionStore for MemoryStore {
    fn create(&self, new: NewSession) -> BoxFuture<'_, Result<CreateOutcome, StoreError>> {
        let mut state = self.state();
        if state.sessions.contains_key(&new.id) {
            return ready(Err(StoreError::DuplicateId(new.id)));
        }
        if let Some(max) = new.max_concurrent {
            let running = state
                .sessions
                .values()
                .filter(|s| s.tenant == new.tenant && s.ending.is_none())
                .count();
            if running >= max as usize {
                return ready(Ok(CreateOutcome::LimitReached));
            }
        }
        state.outbox.event(
            new.id,
            &new.tenant,
            EventKind::Started,
            new.started_at,
            new.callback_url.as_deref(),
        );
        state.sessions.insert(
            new.id,
            SessionRow {
                tenant: new.tenant,
                started_at: new.started_at,
                expires_at: new.expires_at.max(new.started_at),
                last_seen_at: new.started_at,
                ending: None,
                metadata: new.metadata,
                room: new.room,
                room_finished: false,
                room_emptied_at: None,
                node: new.node,
                timeouts: new.timeouts,
                resources: Vec::new(),
                release_due_at: None,
                claimed_by: None,
                claimed_until: None,
                callback_url: new.callback_url,
                ready_at: None,
                billing: new.billing,
                node_last_seen: None,
                usage_closed_to: None,
            },
        );
        ready(Ok(CreateOutcome::Created))
    }

    fn attach(
        &self,
        id: SessionId,
        resource: Resource,
    ) -> BoxFuture<'_, Result<AttachOutcome, StoreError>> {
        let mut state = self.state();
        let outcome = match state.sessions.get_mut(&id) {
            Some(s)
                if s.ending.is_none()
                    && s.resources.len() < MAX_RESOURCES
                    && !s.resources.iter().any(|r| r.resource == resource) =>
            {
                s.resources.push(ResourceRow {
                    resource,
                    release: ReleaseState::Held,
                    note: None,
                    last_error: None,
                    lost: false,
                });
                AttachOutcome::Attached
            }
            _ => AttachOutcome::Refused,
        };
        ready(Ok(outcome))
    }

    fn end<'a>(
        &'a self,
        id: SessionId,
        tenant: TenantScope<'a>,
        now: Timestamp,
        reason: EndReason,
        claim: Option<ReleaseClaim>,
    ) -> BoxFuture<'a, Result<Option<(SessionRecord, Transition)>, StoreError>> {
        let mut state = self.state();
        let Some(s) = state.sessions.get_mut(&id).filter(|s| s.in_scope(tenant)) else {
            return ready(Ok(None));
        };
        if s.ending.is_some() {
            return ready(s.record(&id).map(|r| Some((r, Transition::AlreadyEnded))));
        }
        s.end(now, reason);
        let _ = self.ended.send(id);
        let due = s.release_due_at.is_some();
        match claim {
            Some(claim) if due && claim.node == s.node => {
                s.claimed_by = Some(claim.node);
                s.claimed_until = Some(claim.until);
            }
            _ if due => {
                let _ = self.due.send(s.node.clone());
            }
            _ => {}
        }
        let record = s.record(&id);
        state.ended_events(id, now);
        ready(record.map(|r| Some((r, Transition::Committed))))
    }

    fn get(&self, id: SessionId) -> BoxFuture<'_, Result<Option<SessionRecord>, StoreError>> {
        let state = self.state();
        ready(state.sessions.get(&id).map(|s| s.record(&id)).transpose())
    }

    fn list(&self, query: ListQuery) -> BoxFuture<'_, Result<Vec<SessionRecord>, StoreError>> {
        let state = self.state();
        let matching = state
            .sessions
            .iter()
            .rev()
            .filter(|(id, _)| query.before.is_none_or(|b| **id < b))
            .filter(|(_, s)| query.tenant.as_ref().is_none_or(|t| *t == s.tenant))
            .filter(|(_, s)| query.node.as_ref().is_none_or(|n| *n == s.node))
            .filter(|(_, s)| {
                query
                    .status
                    .is_none_or(|status| (status == Status::Ended) == s.ending.is_some())
            })
            .take(query.limit as usize)
            .map(|(id, s)| s.record(id))
            .collect();
        ready(matching)
    }

    fn ended_since(
        &self,
        tenant: Option<String>,
        since: Timestamp,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<SessionRecord>, StoreError>> {
        let state = self.state();
        // Owing first, then by the latest end.
        let mut ended: Vec<(bool, std::cmp::Reverse<(Timestamp, SessionId)>)> = state
            .sessions
            .iter()
            .filter(|(_, s)| tenant.as_ref().is_none_or(|t| *t == s.tenant))
            .filter_map(|(id, s)| {
                let (at, _) = s.ending?;
                let owing = s.release_due_at.is_some();
                (at >= since || owing).then_some((!owing, std::cmp::Reverse((at, *id))))
            })
            .collect();
        ended.sort();
        let records = ended
            .into_iter()
            .take(limit as usize)
            .filter_map(|(_, std::cmp::Reverse((_, id)))| {
                state.sessions.get(&id).map(|s| s.record(&id))
            })
            .collect();
        ready(records)
    }

    fn count_ends(
        &self,
        tenant: Option<String>,
        since: Timestamp,
        until: Timestamp,
        bucket: Duration,
    ) -> BoxFuture<'_, Result<Vec<EndCount>, StoreError>> {
        let width = u64::try_from(bucket.as_millis()).unwrap_or(u64::MAX).max(1);
        let state = self.state();
        // By span, then reason name: the SQL stores' order.
        let mut counts: BTreeMap<(u64, &'static str), (EndReason, u64)> = BTreeMap::new();
        for s in state.sessions.values() {
            let Some((at, reason)) = s.ending else {
                continue;
            };
            if tenant.as_ref().is_some_and(|t| *t != s.tenant) || at < since || at > until {
                continue;
            }
            let span = (at.as_millis() - since.as_millis()) / width;
            counts
                .entry((span, reason.as_str()))
                .or_insert((reason, 0))
                .1 += 1;
        }
        let counts = counts
            .into_iter()
            .map(|((bucket, _), (reason, count))| EndCount {
                bucket,
                reason,
                count,
            })
            .collect();
        ready(Ok(counts))
    }

    fn touch<'a>(
        &'a self,
        id: SessionId,
        tenant: TenantScope<'a>,
        now: Timestamp,
    ) -> BoxFuture<'a, Result<TouchOutcome, StoreError>> {
        let mut state = self.state();
        let Some(s) = state.sessions.get_mut(&id).filter(|s| s.in_scope(tenant)) else {
            return ready(Ok(TouchOutcome::NotFound));
        };
        if s.ending.is_some() {
            return ready(s.record(&id).map(TouchOutcome::Ended));
        }
        s.seen(now);
        ready(s.record(&id).map(TouchOutcome::Touched))
    }

    fn due(
        &self,
        now: Timestamp,
        orphan_timeout: Duration,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<(SessionId, EndReason)>, StoreError>> {
        let state = self.state();
        let mut due: Vec<(Timestamp, SessionId, EndReason)> = state
            .sessions
            .iter()
            .filter(|(_, s)| s.ending.is_none())
            .map(|(id, s)| {
                // A held client socket is liveness as of now.
                let held = state.presence.contains_key(id);
                let seen = if held { now } else { s.last_seen_at };
                let (at, why) = s.deadline(seen, orphan_timeout);
                (at, *id, why)
            })
            .filter(|(at, _, _)| *at <= now)
            .collect();
        due.sort_by_key(|(at, id, _)| (*at, *id));
        ready(Ok(due
            .into_iter()
            .take(limit as usize)
            .map(|(_, id, why)| (id, why))
            .collect()))
    }
}

/// One machine: every session runs where it was created.
impl crate::FleetPlacement for MemoryStore {}

impl StoreHealth for MemoryStore {
    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        ready(Ok(()))
    }
}

#[cfg(test)]
mod tests;
