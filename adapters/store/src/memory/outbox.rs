//! The reference store's event outbox.

use std::collections::BTreeMap;
use std::time::Duration;

use session_lifecycle::{EventKind, SessionId, Timestamp};

use super::{MemoryStore, ready};
use crate::error::{BoxFuture, StoreError, TenantScope};
use crate::outbox::{
    Delivery, DeliveryAttempt, DeliveryCounts, DeliveryNext, DeliveryQuery, DeliveryStatus,
    Dispatch, EventOutbox, SessionEvent,
};

/// Events and deliveries as the reference store keeps them.
#[derive(Debug, Default)]
pub(super) struct Outbox {
    /// Events by (session, kind), at most one of each kind per session, each with its
    /// order of writing.
    events: BTreeMap<(SessionId, EventKind), (u64, SessionEvent)>,
    written: u64,
    /// Fanned out events by stream position.
    stream: BTreeMap<u64, (SessionId, EventKind)>,
    /// Deliveries with their claim.
    deliveries: BTreeMap<u64, (Delivery, Option<(String, Timestamp)>)>,
    /// Each delivery's origin.
    origins: BTreeMap<u64, String>,
}

impl Outbox {
    /// Records the `kind` event of `session` at `at`, unless it was recorded before.
    pub(super) fn event(
        &mut self,
        session: SessionId,
        tenant: &str,
        kind: EventKind,
        at: Timestamp,
        callback_url: Option<&str>,
    ) {
        if self.events.contains_key(&(session, kind)) {
            return;
        }
        self.written += 1;
        let event = SessionEvent {
            position: None,
            session,
            tenant: tenant.to_owned(),
            kind,
            at,
            callback_url: callback_url.map(str::to_owned),
        };
        self.events.insert((session, kind), (self.written, event));
    }
}

impl EventOutbox for MemoryStore {
    fn record_ready(
        &self,
        session: SessionId,
        at: Timestamp,
    ) -> BoxFuture<'_, Result<bool, StoreError>> {
        let mut state = self.state();
        let Some(s) = state
            .sessions
            .get_mut(&session)
            .filter(|s| s.ending.is_none() && s.ready_at.is_none())
        else {
            return ready(Ok(false));
        };
        let at = at.max(s.started_at);
        s.ready_at = Some(at);
        let (tenant, callback) = (s.tenant.clone(), s.callback_url.clone());
        state
            .outbox
            .event(session, &tenant, EventKind::Ready, at, callback.as_deref());
        state.settle_usage(session, None, at);
        ready(Ok(true))
    }

    fn undispatched_events(
        &self,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<SessionEvent>, StoreError>> {
        let state = self.state();
        // In the order they were written.
        let mut undispatched: Vec<&(u64, SessionEvent)> = state
            .outbox
            .events
            .values()
            .filter(|(_, e)| e.position.is_none())
            .collect();
        undispatched.sort_by_key(|(written, _)| *written);
        ready(Ok(undispatched
            .into_iter()
            .take(limit as usize)
            .map(|(_, e)| e.clone())
            .collect()))
    }

    fn dispatch_events(
        &self,
        events: Vec<Dispatch>,
        now: Timestamp,
    ) -> BoxFuture<'_, Result<u32, StoreError>> {
        let mut state = self.state();
        let outbox = &mut state.outbox;
        let mut dispatched = 0;
        for Dispatch { session, kind, to } in events {
            let position = outbox.stream.keys().next_back().map_or(1, |p| p + 1);
            let Some((_, event)) = outbox
                .events
                .get_mut(&(session, kind))
                .filter(|(_, e)| e.position.is_none())
            else {
                continue;
            };
            event.position = Some(position);
            dispatched += 1;
            let (tenant, event_at) = (event.tenant.clone(), event.at);
            outbox.stream.insert(position, (session, kind));
            for fanout in to {
                let id = outbox.deliveries.keys().next_back().map_or(1, |id| id + 1);
                let delivery = Delivery {
                    id,
                    session,
                    tenant: tenant.clone(),
                    kind,
                    event_at,
                    endpoint: fanout.endpoint,
                    url: fanout.url,
                    status: DeliveryStatus::Pending,
                    attempts: 0,
                    created_at: now,
                    next_attempt_at: Some(now),
                    last_attempt_at: None,
                    last_status_code: None,
                    last_error: None,
                };
                outbox.deliveries.insert(id, (delivery, None));
                outbox.origins.insert(id, fanout.origin);
            }
        }
        ready(Ok(dispatched))
    }

    fn last_position(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        let state = self.state();
        ready(Ok(state
            .outbox
            .stream
            .keys()
            .next_back()
            .copied()
            .unwrap_or(0)))
    }

    fn events_after<'a>(
        &'a self,
        tenant: TenantScope<'a>,
        session: Option<SessionId>,
        after: u64,
        limit: u32,
    ) -> BoxFuture<'a, Result<Vec<SessionEvent>, StoreError>> {
        let state = self.state();
        let outbox = &state.outbox;
        let events = outbox
            .stream
            .range(after.saturating_add(1)..)
            .filter_map(|(_, key)| outbox.events.get(key).map(|(_, e)| e))
            .filter(|e| tenant.is_none_or(|t| t == e.tenant))
            .filter(|e| session.is_none_or(|s| s == e.session))
            .take(limit as usize)
            .cloned()
            .collect();
        ready(Ok(events))
    }

    fn claim_deliveries(
        &self,
        node: &str,
        now: Timestamp,
        lease: Duration,
        limit: u32,
        per_origin: u32,
        busy: Vec<String>,
    ) -> BoxFuture<'_, Result<Vec<Delivery>, StoreError>> {
        let mut state = self.state();
        let outbox = &mut state.outbox;
        let origins = &outbox.origins;
        let origin_of = |id: u64| origins.get(&id).cloned().unwrap_or_default();
        let deliveries = &mut outbox.deliveries;
        let pending = |d: &Delivery| d.status == DeliveryStatus::Pending;
        let mut due: Vec<(Timestamp, u64)> = deliveries
            .values()
            .filter(|(d, claim)| {
                pending(d)
                    && d.next_attempt_at.is_some_and(|at| at <= now)
                    && claim.as_ref().is_none_or(|(_, until)| *until <= now)
            })
            .filter(|(d, _)| {
                // A session's earlier event to the same endpoint goes first.
                !deliveries.values().any(|(e, _)| {
                    pending(e)
                        && e.session == d.session
                        && e.tenant == d.tenant
                        && e.endpoint == d.endpoint
                        && e.kind < d.kind
                })
            })
            .filter(|(d, _)| !busy.contains(&origin_of(d.id)))
            .filter_map(|(d, _)| d.next_attempt_at.map(|at| (at, d.id)))
            .collect();
        due.sort();
        let mut claimed = Vec::new();
        let mut per: BTreeMap<String, u32> = BTreeMap::new();
        for (_, id) in due {
            if claimed.len() >= limit as usize {
                break;
            }
            if let Some((d, claim)) = deliveries.get_mut(&id) {
                let taken = per.entry(origin_of(id)).or_insert(0);
                if *taken >= per_origin {
                    continue;
                }
                *taken += 1;
                *claim = Some((node.to_owned(), now.saturating_add(lease)));
                claimed.push(d.clone());
            }
        }
        ready(Ok(claimed))
    }

    fn record_deliveries(
        &self,
        node: &str,
        attempts: Vec<DeliveryAttempt>,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        let mut state = self.state();
        for attempt in attempts {
            let Some((d, claim)) = state.outbox.deliveries.get_mut(&attempt.id) else {
                continue;
            };
            if d.status != DeliveryStatus::Pending
                || claim.as_ref().is_none_or(|(by, _)| by != node)
            {
                continue;
            }
            *claim = None;
            d.attempts = d.attempts.saturating_add(1);
            d.last_attempt_at = Some(attempt.at);
            d.last_status_code = attempt.status_code;
            d.last_error = attempt.error;
            (d.status, d.next_attempt_at) = match attempt.next {
                DeliveryNext::Delivered => (DeliveryStatus::Delivered, None),
                DeliveryNext::RetryAt(at) => (DeliveryStatus::Pending, Some(at)),
                DeliveryNext::Failed => (DeliveryStatus::Failed, None),
            };
        }
        ready(Ok(()))
    }

    fn unclaim_delivery(&self, node: &str, id: u64) -> BoxFuture<'_, Result<(), StoreError>> {
        let mut state = self.state();
        if let Some((_, claim)) = state.outbox.deliveries.get_mut(&id)
            && claim.as_ref().is_some_and(|(by, _)| by == node)
        {
            *claim = None;
        }
        ready(Ok(()))
    }

    fn deliveries(&self, query: DeliveryQuery) -> BoxFuture<'_, Result<Vec<Delivery>, StoreError>> {
        let state = self.state();
        let found = state
            .outbox
            .deliveries
            .values()
            .rev()
            .map(|(d, _)| d)
            .filter(|d| query.tenant.as_ref().is_none_or(|t| *t == d.tenant))
            .filter(|d| query.session.is_none_or(|s| s == d.session))
            .filter(|d| query.status.is_none_or(|s| s == d.status))
            .take(query.limit as usize)
            .cloned()
            .collect();
        ready(Ok(found))
    }

    fn retry_delivery<'a>(
        &'a self,
        tenant: TenantScope<'a>,
        id: u64,
        now: Timestamp,
    ) -> BoxFuture<'a, Result<Option<Delivery>, StoreError>> {
        let mut state = self.state();
        let Some((d, claim)) = state
            .outbox
            .deliveries
            .get_mut(&id)
            .filter(|(d, _)| tenant.is_none_or(|t| t == d.tenant))
        else {
            return ready(Ok(None));
        };
        if d.status != DeliveryStatus::Delivered
            && claim.as_ref().is_none_or(|(_, until)| *until <= now)
        {
            d.status = DeliveryStatus::Pending;
            d.created_at = now;
            d.next_attempt_at = Some(now);
            *claim = None;
        }
        ready(Ok(Some(d.clone())))
    }

    fn prune_outbox(
        &self,
        events_before: Timestamp,
        keys_before: Timestamp,
        limit: u32,
    ) -> BoxFuture<'_, Result<u32, StoreError>> {
        let mut state = self.state();
        let limit = limit as usize;
        let outbox = &mut state.outbox;
        let done: Vec<u64> = outbox
            .deliveries
            .values()
            .filter(|(d, _)| d.status != DeliveryStatus::Pending && d.created_at <= events_before)
            .map(|(d, _)| d.id)
            .take(limit)
            .collect();
        for id in &done {
            outbox.deliveries.remove(id);
            outbox.origins.remove(id);
        }
        let kept: std::collections::BTreeSet<(SessionId, EventKind)> = outbox
            .deliveries
            .values()
            .map(|(d, _)| (d.session, d.kind))
            .collect();
        let old: Vec<(SessionId, EventKind, u64)> = outbox
            .events
            .iter()
            .filter(|(key, (_, e))| e.at <= events_before && !kept.contains(key))
            .filter_map(|(key, (_, e))| e.position.map(|p| (key.0, key.1, p)))
            .take(limit)
            .collect();
        for (session, kind, position) in &old {
            outbox.events.remove(&(*session, *kind));
            outbox.stream.remove(position);
        }
        let keys: Vec<(String, String)> = state
            .idempotency
            .iter()
            .filter(|(_, k)| k.created_at <= keys_before)
            .map(|(slot, _)| slot.clone())
            .take(limit)
            .collect();
        for slot in &keys {
            state.idempotency.remove(slot);
        }
        ready(Ok((done.len() + old.len() + keys.len()) as u32))
    }

    fn delivery_counts(&self) -> BoxFuture<'_, Result<DeliveryCounts, StoreError>> {
        let state = self.state();
        let mut counts = DeliveryCounts::default();
        for (d, _) in state.outbox.deliveries.values() {
            match d.status {
                DeliveryStatus::Pending if d.attempts == 0 => counts.pending += 1,
                DeliveryStatus::Pending => counts.retrying += 1,
                DeliveryStatus::Delivered => counts.delivered += 1,
                DeliveryStatus::Failed => counts.failed += 1,
            }
            if d.status == DeliveryStatus::Pending {
                counts.oldest_pending_at = Some(
                    counts
                        .oldest_pending_at
                        .map_or(d.created_at, |at| at.min(d.created_at)),
                );
            }
        }
        ready(Ok(counts))
    }
}
