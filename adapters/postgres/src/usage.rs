//! Usage records in PostgreSQL: settled in the transaction of their cause, periods closed
//! by node under row locks (a session is settled by one transaction at a time: its end,
//! its readiness or a close, whichever locks its row first; the others see what it wrote).

use std::collections::HashMap;
use std::time::Duration;

use deadpool_postgres::GenericClient;
use session_lifecycle::{EventKind, SessionId, Timestamp};
use session_lifecycle_store::rows::{event_sequence, millis as ms, parse_id};
use session_lifecycle_store::sql::{postgres as pg, statements};
use session_lifecycle_store::usage::sql::{UsageRow, UsageStateRow, totals_of_rows, totals_query};
use session_lifecycle_store::usage::{
    SessionPage, SessionUsage, UsageGrouping, UsageLedger, UsageRecord, UsageState, UsageTotals,
    period_boundary, settle,
};
use session_lifecycle_store::{BoxFuture, StoreError};
use tokio_postgres::{IsolationLevel, Row};

use crate::PostgresStore;
use crate::error::unavailable;
use crate::rows::col;

fn state_row(r: &Row) -> Result<UsageStateRow, StoreError> {
    Ok(UsageStateRow {
        id: col(r, 0)?,
        tenant: col(r, 1)?,
        started_at: col(r, 2)?,
        ready_at: col(r, 3)?,
        ended_at: col(r, 4)?,
        end_reason: col(r, 5)?,
        node_last_seen_at: col(r, 6)?,
        bill_meter: col(r, 7)?,
        bill_rounding: col(r, 8)?,
        usage_closed_to: col(r, 9)?,
    })
}

fn usage_row(r: &Row) -> Result<UsageRow, StoreError> {
    Ok(UsageRow {
        session_id: col(r, 0)?,
        tenant: col(r, 1)?,
        seq: col(r, 2)?,
        span_from: col(r, 3)?,
        span_to: col(r, 4)?,
        from_ms: col(r, 5)?,
        to_ms: col(r, 6)?,
        revision: col(r, 7)?,
        superseded: col(r, 8)?,
        recorded_at: col(r, 9)?,
    })
}

// PostgreSQL keeps the usage records' identifier columns (`id`, `corrects`,
// `superseded_by`) that SQLite dropped (its migration 11): instances of the previous
// release, still running during a rolling deploy, write and read them. So its statements
// write them too and read "superseded" from `superseded_by`. They can go once no instance
// that reads them runs (a later release's migration).

/// `usage::sql::UsageRow`'s columns.
macro_rules! usage_row_columns {
    () => {
        "session_id, tenant, seq, span_from, span_to, from_ms, to_ms, revision,
         superseded_by IS NOT NULL, recorded_at"
    };
}

/// Every usage record of session `$1`, in the order written.
const SESSION_USAGE: &str = concat!(
    "SELECT ",
    usage_row_columns!(),
    " FROM usage_records WHERE session_id = $1 ORDER BY seq"
);

/// Usage record `$2` of session `$1`.
const USAGE_RECORD: &str = concat!(
    "SELECT ",
    usage_row_columns!(),
    " FROM usage_records WHERE session_id = $1 AND seq = $2"
);

/// Every usage record of the sessions `$1` names, by session and in the order written.
const PAGE_USAGE: &str = concat!(
    "SELECT ",
    usage_row_columns!(),
    " FROM usage_records WHERE session_id = ANY($1) ORDER BY session_id, seq"
);

/// A new usage record: `usage::sql::UsageRow`'s columns but `superseded` (a new record is
/// the latest), its billable milliseconds, its identifier and the one it corrects.
const INSERT_USAGE: &str = "INSERT INTO usage_records (session_id, tenant, seq, span_from,
        span_to, from_ms, to_ms, revision, recorded_at, millis, id, corrects)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)";

/// Record `$2` of session `$1` is replaced by the correction `$3`.
const SUPERSEDE_USAGE: &str = "UPDATE usage_records SET superseded_by = $3
     WHERE session_id = $1 AND seq = $2 AND superseded_by IS NULL";

fn records(rows: &[Row]) -> Result<Vec<UsageRecord>, StoreError> {
    rows.iter().map(|r| usage_row(r)?.into_record()).collect()
}

/// Settles the usage of session `id` after its cause at `now`, in the caller's transaction
/// (see `session_lifecycle_store::usage::settle`); closes its periods up to `close` if
/// given. The caller holds the session's row lock (its cause updated or locked the row).
/// A usage state or record whose values are not ours (corrupt, or written by a newer
/// release) never keeps its cause (an end above all: the session's resources wait on it)
/// from committing: the session is left unsettled (`false`), with a warning, for
/// `sessiond usage reconcile` to report. A column that does not read as its type (a
/// schema this code does not know) or a failing database still fails the cause.
pub(crate) async fn settle_usage(
    tx: &impl GenericClient,
    id: &str,
    close: Option<(Timestamp, Duration)>,
    now: Timestamp,
) -> Result<bool, StoreError> {
    let skipped = |e: StoreError| match e {
        StoreError::Corrupt { .. } => {
            tracing::warn!(error = %e, "usage not recorded: its session's usage is corrupt");
            Ok(false)
        }
        e => Err(e),
    };
    let Some(row) = tx
        .query_opt(pg(statements::USAGE_STATE), &[&id])
        .await
        .map_err(unavailable)?
    else {
        return Ok(true);
    };
    let state = match state_row(&row)?.into_state() {
        Ok(state) => state,
        Err(e) => return skipped(e),
    };
    // Nothing is recorded of a session before its first close or end.
    let existing = match state.closed_to {
        Some(_) => {
            let rows = tx.query(SESSION_USAGE, &[&id]).await.map_err(unavailable)?;
            let rows = rows.iter().map(usage_row).collect::<Result<Vec<_>, _>>()?;
            match rows.into_iter().map(UsageRow::into_record).collect() {
                Ok(records) => records,
                Err(e) => return skipped(e),
            }
        }
        None => Vec::new(),
    };
    write_settled(tx, &state, &existing, close, now).await?;
    Ok(true)
}

async fn write_settled(
    tx: &impl GenericClient,
    state: &UsageState,
    existing: &[UsageRecord],
    close: Option<(Timestamp, Duration)>,
    now: Timestamp,
) -> Result<(), StoreError> {
    let id = state.session.to_string();
    let id = id.as_str();
    let settled = settle(state, existing, close, now);
    for record in &settled.records {
        let r = UsageRow::of(record);
        tx.execute(
            INSERT_USAGE,
            &[
                &r.session_id,
                &r.tenant,
                &r.seq,
                &r.span_from,
                &r.span_to,
                &r.from_ms,
                &r.to_ms,
                &r.revision,
                &r.recorded_at,
                &(record.millis() as i64),
                &record.id,
                &record.corrects,
            ],
        )
        .await
        .map_err(unavailable)?;
        // Its `usage.recorded` event, in the same transaction.
        tx.execute(
            pg(statements::INSERT_EVENT),
            &[
                &r.session_id,
                &r.tenant,
                &event_sequence(EventKind::UsageRecorded(record.seq)),
                &r.recorded_at,
            ],
        )
        .await
        .map_err(unavailable)?;
    }
    for (old, by) in &settled.superseded {
        tx.execute(SUPERSEDE_USAGE, &[&id, &i64::from(*old), by])
            .await
            .map_err(unavailable)?;
    }
    if let Some(to) = settled.closed_to {
        tx.execute(pg(statements::CLOSE_USAGE_TO), &[&id, &ms(to)])
            .await
            .map_err(unavailable)?;
    }
    Ok(())
}

/// One snapshot for several reads: a read-only REPEATABLE READ transaction.
async fn snapshot(
    client: &mut deadpool_postgres::Object,
) -> Result<deadpool_postgres::Transaction<'_>, StoreError> {
    client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(unavailable)
}

impl UsageLedger for PostgresStore {
    fn close_usage<'a>(
        &'a self,
        node: &'a str,
        now: Timestamp,
        period: Duration,
        limit: u32,
    ) -> BoxFuture<'a, Result<u32, StoreError>> {
        Box::pin(async move {
            let boundary = period_boundary(now, period);
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(unavailable)?;
            // Locked, so that an end or a readiness report of one of them waits for this
            // close (and then sees its records); one locked elsewhere is closed next time.
            // Past the sessions whose usage is corrupt (they stay due): counted, they
            // would fill every batch and keep the others from ever closing.
            let (mut closed, mut after) = (0u32, String::new());
            while closed < limit {
                let want = limit - closed;
                let ids = tx
                    .query(
                        "SELECT id FROM sessions
                         WHERE node = $1 AND status = 'started' AND started_at < $2
                           AND (usage_closed_to IS NULL OR usage_closed_to < $2) AND id > $3
                         ORDER BY id LIMIT $4 FOR UPDATE SKIP LOCKED",
                        &[&node, &ms(boundary), &after, &i64::from(want)],
                    )
                    .await
                    .map_err(unavailable)?;
                let ids: Vec<String> = ids.iter().map(|r| col(r, 0)).collect::<Result<_, _>>()?;
                for id in &ids {
                    if settle_usage(&tx, id, Some((boundary, period)), now).await? {
                        closed += 1;
                    }
                }
                match ids.last() {
                    Some(last) if ids.len() == want as usize => after = last.clone(),
                    _ => break,
                }
            }
            tx.commit().await.map_err(unavailable)?;
            Ok(closed)
        })
    }

    fn usage_totals(
        &self,
        tenant: Option<String>,
        from: Timestamp,
        to: Timestamp,
        grouping: Option<UsageGrouping>,
        page: SessionPage,
    ) -> BoxFuture<'_, Result<UsageTotals, StoreError>> {
        Box::pin(async move {
            let scoped = tenant.is_some();
            let read = |rows: Vec<Row>| {
                rows.iter()
                    .map(|r| Ok((col(r, 0)?, col(r, 1)?, col(r, 2)?, col(r, 3)?)))
                    .collect::<Result<Vec<_>, StoreError>>()
            };
            let mut client = self.client().await?;
            if grouping != Some(UsageGrouping::Session) {
                let rows = client
                    .query(
                        &totals_query(grouping, scoped, true),
                        &[&tenant, &ms(from), &ms(to)],
                    )
                    .await
                    .map_err(unavailable)?;
                return totals_of_rows(read(rows)?, grouping);
            }
            // A page of session groups leaves sessions out: the total is a query of its
            // own, in the same snapshot.
            let snapshot = snapshot(&mut client).await?;
            let after = page.after.map(|a| a.to_string()).unwrap_or_default();
            let rows = snapshot
                .query(
                    &totals_query(grouping, scoped, true),
                    &[&tenant, &ms(from), &ms(to), &after, &i64::from(page.limit)],
                )
                .await
                .map_err(unavailable)?;
            let mut out = totals_of_rows(read(rows)?, grouping)?;
            let rows = snapshot
                .query(
                    &totals_query(None, scoped, true),
                    &[&tenant, &ms(from), &ms(to)],
                )
                .await
                .map_err(unavailable)?;
            out.total_ms = totals_of_rows(read(rows)?, None)?.total_ms;
            snapshot.commit().await.map_err(unavailable)?;
            Ok(out)
        })
    }

    fn session_usage(
        &self,
        session: SessionId,
    ) -> BoxFuture<'_, Result<Vec<UsageRecord>, StoreError>> {
        Box::pin(async move {
            let client = self.client().await?;
            let rows = client
                .query(SESSION_USAGE, &[&session.to_string()])
                .await
                .map_err(unavailable)?;
            records(&rows)
        })
    }

    fn usage_record(
        &self,
        session: SessionId,
        seq: u32,
    ) -> BoxFuture<'_, Result<Option<UsageRecord>, StoreError>> {
        Box::pin(async move {
            let client = self.client().await?;
            let row = client
                .query_opt(USAGE_RECORD, &[&session.to_string(), &i64::from(seq)])
                .await
                .map_err(unavailable)?;
            row.map(|r| usage_row(&r)?.into_record()).transpose()
        })
    }

    fn usage_states(
        &self,
        from: Timestamp,
        to: Timestamp,
        after: Option<SessionId>,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<SessionUsage>, StoreError>> {
        Box::pin(async move {
            let mut client = self.client().await?;
            // One snapshot of the states and their records.
            let snapshot = snapshot(&mut client).await?;
            let after = after.map(|a| a.to_string()).unwrap_or_default();
            let rows = snapshot
                .query(
                    pg(statements::USAGE_STATES),
                    &[&ms(from), &ms(to), &after, &i64::from(limit)],
                )
                .await
                .map_err(unavailable)?;
            let states = rows
                .iter()
                .map(state_row)
                .collect::<Result<Vec<UsageStateRow>, StoreError>>()?;
            let ids: Vec<&str> = states.iter().map(|s| s.id.as_str()).collect();
            let record_rows = snapshot
                .query(PAGE_USAGE, &[&ids])
                .await
                .map_err(unavailable)?;
            let mut by_session: HashMap<String, Vec<UsageRow>> = HashMap::new();
            for r in &record_rows {
                let row = usage_row(r)?;
                by_session
                    .entry(row.session_id.clone())
                    .or_default()
                    .push(row);
            }
            snapshot.commit().await.map_err(unavailable)?;
            states
                .into_iter()
                .map(|row| {
                    let records = by_session
                        .remove(&row.id)
                        .unwrap_or_default()
                        .into_iter()
                        .map(UsageRow::into_record)
                        .collect();
                    Ok(SessionUsage {
                        session: parse_id(&row.id)?,
                        tenant: row.tenant.clone(),
                        state: row.into_state(),
                        records,
                    })
                })
                .collect()
        })
    }
}
