//! The reference store's usage records.

use std::time::Duration;

use session_lifecycle::{SessionId, Timestamp};

use super::{MemoryStore, State, ready};
use crate::error::{BoxFuture, StoreError};
use crate::usage::{
    SessionPage, SessionUsage, UsageGrouping, UsageLedger, UsageRecord, UsageState, UsageTotals,
    period_boundary, settle, totals,
};

impl State {
    /// The usage state of session `id`, if there is one.
    fn usage_state(&self, id: SessionId) -> Option<UsageState> {
        let s = self.sessions.get(&id)?;
        Some(UsageState {
            session: id,
            tenant: s.tenant.clone(),
            rule: s.billing,
            metered: session_lifecycle::usage::MeteredSession {
                started_at: s.started_at,
                ready_at: s.ready_at,
                ended: s.ending,
                node_last_seen: s.node_last_seen,
            },
            closed_to: s.usage_closed_to,
        })
    }

    /// Settles the usage of session `id` after its cause at `now` (see
    /// [`settle`]), closing its periods up to `close` if given.
    pub(super) fn settle_usage(
        &mut self,
        id: SessionId,
        close: Option<(Timestamp, Duration)>,
        now: Timestamp,
    ) {
        let Some(state) = self.usage_state(id) else {
            return;
        };
        let records = self.usage.entry(id).or_default();
        let settled = settle(&state, records, close, now);
        for (old, by) in settled.superseded {
            if let Some(r) = records.iter_mut().find(|r| r.seq == old) {
                r.superseded_by = Some(by);
            }
        }
        for r in &settled.records {
            self.outbox.event(
                id,
                &r.tenant,
                session_lifecycle::EventKind::UsageRecorded(r.seq),
                r.recorded_at,
                None,
            );
        }
        let records = self.usage.entry(id).or_default();
        records.extend(settled.records);
        if let (Some(to), Some(s)) = (settled.closed_to, self.sessions.get_mut(&id)) {
            s.usage_closed_to = Some(to);
        }
    }
}

impl UsageLedger for MemoryStore {
    fn close_usage<'a>(
        &'a self,
        node: &'a str,
        now: Timestamp,
        period: Duration,
        limit: u32,
    ) -> BoxFuture<'a, Result<u32, StoreError>> {
        let mut state = self.state();
        let boundary = period_boundary(now, period);
        let due: Vec<SessionId> = state
            .sessions
            .iter()
            .filter(|(_, s)| {
                s.node == node
                    && s.ending.is_none()
                    && s.started_at < boundary
                    && s.usage_closed_to.is_none_or(|c| c < boundary)
            })
            .map(|(id, _)| *id)
            .take(limit as usize)
            .collect();
        for id in &due {
            state.settle_usage(*id, Some((boundary, period)), now);
        }
        ready(Ok(due.len() as u32))
    }

    fn usage_totals(
        &self,
        tenant: Option<String>,
        from: Timestamp,
        to: Timestamp,
        grouping: Option<UsageGrouping>,
        page: SessionPage,
    ) -> BoxFuture<'_, Result<UsageTotals, StoreError>> {
        let state = self.state();
        let records = state
            .usage
            .values()
            .flatten()
            .filter(|r| tenant.as_ref().is_none_or(|t| *t == r.tenant));
        ready(Ok(totals(records, from, to, grouping, page)))
    }

    fn session_usage(
        &self,
        session: SessionId,
    ) -> BoxFuture<'_, Result<Vec<UsageRecord>, StoreError>> {
        let state = self.state();
        ready(Ok(state.usage.get(&session).cloned().unwrap_or_default()))
    }

    fn usage_record(
        &self,
        session: SessionId,
        seq: u32,
    ) -> BoxFuture<'_, Result<Option<UsageRecord>, StoreError>> {
        let state = self.state();
        let record = state
            .usage
            .get(&session)
            .and_then(|records| records.iter().find(|r| r.seq == seq).cloned());
        ready(Ok(record))
    }

    fn usage_states(
        &self,
        from: Timestamp,
        to: Timestamp,
        after: Option<SessionId>,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<SessionUsage>, StoreError>> {
        let state = self.state();
        let states = state
            .sessions
            .iter()
            .filter(|(id, _)| after.is_none_or(|a| **id > a))
            .filter(|(_, s)| {
                s.started_at < to
                    && s.ending
                        .is_none_or(|(at, _)| at.saturating_add(Duration::from_secs(60)) >= from)
            })
            .take(limit as usize)
            .filter_map(|(id, _)| {
                let usage = state.usage_state(*id)?;
                Some(SessionUsage {
                    session: *id,
                    tenant: usage.tenant.clone(),
                    state: Ok(usage),
                    records: Ok(state.usage.get(id).cloned().unwrap_or_default()),
                })
            })
            .collect();
        ready(Ok(states))
    }
}
