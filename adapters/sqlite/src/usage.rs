//! Usage records in SQLite: settled in the step of their cause, periods closed by node.

use std::time::Duration;

use rusqlite::{Connection, params};
use session_lifecycle::{EventKind, SessionId, Timestamp};
use session_lifecycle_store::rows::{event_sequence, millis as ms, parse_id};
use session_lifecycle_store::sql::statements;
use session_lifecycle_store::usage::sql::{UsageRow, UsageStateRow, totals_of_rows, totals_query};
use session_lifecycle_store::usage::{
    SessionPage, SessionUsage, UsageGrouping, UsageLedger, UsageRecord, UsageState, UsageTotals,
    period_boundary, settle,
};
use session_lifecycle_store::{BoxFuture, StoreError};

use crate::SqliteStore;
use crate::error::db;

pub(crate) fn state_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<UsageStateRow> {
    Ok(UsageStateRow {
        id: r.get(0)?,
        tenant: r.get(1)?,
        started_at: r.get(2)?,
        ready_at: r.get(3)?,
        ended_at: r.get(4)?,
        end_reason: r.get(5)?,
        node_last_seen_at: r.get(6)?,
        bill_meter: r.get(7)?,
        bill_rounding: r.get(8)?,
        usage_closed_to: r.get(9)?,
    })
}

fn usage_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<UsageRow> {
    Ok(UsageRow {
        session_id: r.get(0)?,
        tenant: r.get(1)?,
        seq: r.get(2)?,
        span_from: r.get(3)?,
        span_to: r.get(4)?,
        from_ms: r.get(5)?,
        to_ms: r.get(6)?,
        revision: r.get(7)?,
        superseded: r.get(8)?,
        recorded_at: r.get(9)?,
    })
}

fn session_records(c: &Connection, id: &str) -> Result<Vec<UsageRecord>, StoreError> {
    let rows: Vec<UsageRow> = c
        .prepare_cached(statements::SESSION_USAGE)
        .and_then(|mut s| s.query_map([id], usage_row)?.collect())
        .map_err(db)?;
    rows.into_iter().map(UsageRow::into_record).collect()
}

/// Settles the usage of session `id` after its cause at `now`, in the caller's step (see
/// `session_lifecycle_store::usage::settle`); closes its periods up to `close` if given.
/// `false`: its usage is corrupt and was left as it was (see [`settle_row`]).
pub(crate) fn settle_usage(
    c: &Connection,
    id: &str,
    close: Option<(Timestamp, Duration)>,
    now: Timestamp,
) -> Result<bool, StoreError> {
    let row = c
        .prepare_cached(statements::USAGE_STATE)
        .and_then(|mut s| s.query_map([id], state_row)?.next().transpose())
        .map_err(db)?;
    match row {
        Some(row) => Ok(settle_row(c, row, close, now, UsageEvents::InStep)?.sound),
        None => Ok(true),
    }
}

/// When a new usage record's `usage.recorded` event is written.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum UsageEvents {
    /// In the step that writes the record.
    InStep,
    /// With the fan-out of its session's `ended` event, which names the first record its
    /// end wrote (see `statements::UNDISPATCHED`): an end's commit writes no event row
    /// for its usage.
    WithEnded,
}

/// What settling a session's usage did.
pub(crate) struct Settled {
    /// `false`: its usage is corrupt and was left as it was (see [`settle_row`]).
    pub sound: bool,
    /// The sequence number of the first record written, if any was.
    pub first_new: Option<u32>,
}

/// [`settle_usage`] of a session whose usage state after its cause is `row` (read by the
/// cause's own statement). A usage state or record whose values are not ours (corrupt, or
/// written by a newer release) never keeps its cause (an end above all: the session's
/// resources wait on it) from committing: the session is left unsettled (`false`), with a
/// warning, for `sessiond usage reconcile` to report. A failing database still fails it.
pub(crate) fn settle_row(
    c: &Connection,
    row: UsageStateRow,
    close: Option<(Timestamp, Duration)>,
    now: Timestamp,
    events: UsageEvents,
) -> Result<Settled, StoreError> {
    match row
        .into_state()
        .and_then(|state| settle_state(c, &state, close, now, events))
    {
        Ok(first_new) => Ok(Settled {
            sound: true,
            first_new,
        }),
        Err(e @ StoreError::Corrupt { .. }) => {
            tracing::warn!(error = %e, "usage not recorded: its session's usage is corrupt");
            Ok(Settled {
                sound: false,
                first_new: None,
            })
        }
        Err(e) => Err(e),
    }
}

/// Writes what [`settle`] makes of `state`; the first new record's sequence number.
fn settle_state(
    c: &Connection,
    state: &UsageState,
    close: Option<(Timestamp, Duration)>,
    now: Timestamp,
    events: UsageEvents,
) -> Result<Option<u32>, StoreError> {
    let id = state.session.to_string();
    let id = id.as_str();
    // Nothing is recorded of a session before its first close or end.
    let records = match state.closed_to {
        Some(_) => session_records(c, id)?,
        None => Vec::new(),
    };
    let settled = settle(state, &records, close, now);
    for record in &settled.records {
        let r = UsageRow::of(record);
        c.prepare_cached(statements::INSERT_USAGE)
            .and_then(|mut s| {
                s.execute(params![
                    r.session_id,
                    r.tenant,
                    r.seq,
                    r.span_from,
                    r.span_to,
                    r.from_ms,
                    r.to_ms,
                    r.revision,
                    r.superseded,
                    r.recorded_at,
                    record.millis() as i64
                ])
            })
            .map_err(db)?;
        if events == UsageEvents::WithEnded {
            continue;
        }
        // Its `usage.recorded` event, in the same step.
        c.prepare_cached(statements::INSERT_EVENT)
            .and_then(|mut s| {
                s.execute(params![
                    r.session_id,
                    r.tenant,
                    event_sequence(EventKind::UsageRecorded(record.seq)),
                    r.recorded_at
                ])
            })
            .map_err(db)?;
    }
    for (old, _) in &settled.superseded {
        c.prepare_cached(statements::SUPERSEDE_USAGE)
            .and_then(|mut s| s.execute(params![id, old]))
            .map_err(db)?;
    }
    if let Some(to) = settled.closed_to {
        c.prepare_cached(statements::CLOSE_USAGE_TO)
            .and_then(|mut s| s.execute(params![id, ms(to)]))
            .map_err(db)?;
    }
    Ok(settled.records.first().map(|r| r.seq))
}

impl UsageLedger for SqliteStore {
    fn close_usage<'a>(
        &'a self,
        node: &'a str,
        now: Timestamp,
        period: Duration,
        limit: u32,
    ) -> BoxFuture<'a, Result<u32, StoreError>> {
        let node = node.to_owned();
        let usage = self.usage_on();
        Box::pin(self.inner.conns.write(move |c| {
            if !usage {
                return Ok(0);
            }
            let boundary = period_boundary(now, period);
            // Past the sessions whose usage is corrupt (they stay due): counted, they
            // would fill every batch and keep the others from ever closing.
            let (mut closed, mut after) = (0u32, String::new());
            while closed < limit {
                let want = limit - closed;
                let ids: Vec<String> = c
                    .prepare_cached(statements::USAGE_TO_CLOSE)
                    .and_then(|mut s| {
                        s.query_map(params![node, ms(boundary), after, i64::from(want)], |r| {
                            r.get(0)
                        })?
                        .collect()
                    })
                    .map_err(db)?;
                for id in &ids {
                    if settle_usage(c, id, Some((boundary, period)), now)? {
                        closed += 1;
                    }
                }
                match ids.last() {
                    Some(last) if ids.len() == want as usize => after = last.clone(),
                    _ => break,
                }
            }
            Ok(closed)
        }))
    }

    fn usage_totals(
        &self,
        tenant: Option<String>,
        from: Timestamp,
        to: Timestamp,
        grouping: Option<UsageGrouping>,
        page: SessionPage,
    ) -> BoxFuture<'_, Result<UsageTotals, StoreError>> {
        let scoped = tenant.is_some();
        let sql = totals_query(grouping, scoped, false);
        // A page of session groups leaves sessions out: the total is a query of its own
        // (in the same snapshot: a read is one).
        let paged = grouping == Some(UsageGrouping::Session);
        let total_sql = paged.then(|| totals_query(None, scoped, false));
        let after = page.after.map(|a| a.to_string()).unwrap_or_default();
        let limit = i64::from(page.limit);
        Box::pin(self.inner.conns.read(move |c| {
            let row = |r: &rusqlite::Row<'_>| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?));
            let rows = c
                .prepare_cached(&sql)
                .and_then(|mut s| {
                    if paged {
                        s.query_map(params![tenant, ms(from), ms(to), after, limit], row)?
                            .collect()
                    } else {
                        s.query_map(params![tenant, ms(from), ms(to)], row)?
                            .collect()
                    }
                })
                .map_err(db)?;
            let mut out = totals_of_rows(rows, grouping)?;
            if let Some(total_sql) = &total_sql {
                let rows = c
                    .prepare_cached(total_sql)
                    .and_then(|mut s| {
                        s.query_map(params![tenant, ms(from), ms(to)], row)?
                            .collect()
                    })
                    .map_err(db)?;
                out.total_ms = totals_of_rows(rows, None)?.total_ms;
            }
            Ok(out)
        }))
    }

    fn session_usage(
        &self,
        session: SessionId,
    ) -> BoxFuture<'_, Result<Vec<UsageRecord>, StoreError>> {
        Box::pin(
            self.inner
                .conns
                .read(move |c| session_records(c, &session.to_string())),
        )
    }

    fn usage_record(
        &self,
        session: SessionId,
        seq: u32,
    ) -> BoxFuture<'_, Result<Option<UsageRecord>, StoreError>> {
        let id = session.to_string();
        Box::pin(self.inner.conns.read(move |c| {
            c.prepare_cached(statements::USAGE_RECORD)
                .and_then(|mut s| {
                    s.query_map(params![id, i64::from(seq)], usage_row)?
                        .next()
                        .transpose()
                })
                .map_err(db)?
                .map(UsageRow::into_record)
                .transpose()
        }))
    }

    fn usage_states(
        &self,
        from: Timestamp,
        to: Timestamp,
        after: Option<SessionId>,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<SessionUsage>, StoreError>> {
        Box::pin(self.inner.conns.read(move |c| {
            // A read is one snapshot (see `Connections::read`): states and records agree.
            let after = after.map(|a| a.to_string()).unwrap_or_default();
            let rows: Vec<UsageStateRow> = c
                .prepare_cached(statements::USAGE_STATES)
                .and_then(|mut s| {
                    s.query_map(
                        params![ms(from), ms(to), after, i64::from(limit)],
                        state_row,
                    )?
                    .collect()
                })
                .map_err(db)?;
            rows.into_iter()
                .map(|row| {
                    Ok(SessionUsage {
                        session: parse_id(&row.id)?,
                        tenant: row.tenant.clone(),
                        records: session_records(c, &row.id),
                        state: row.into_state(),
                    })
                })
                .collect()
        }))
    }
}
