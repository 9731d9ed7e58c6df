//! The event outbox (see [`EventOutbox`]): events are written by the session statements
//! themselves; here they are fanned out, streamed and delivered.

use std::time::Duration;

use rusqlite::{OptionalExtension, params};
use session_lifecycle::{EventKind, SessionId, Timestamp};
use session_lifecycle_store::rows::{
    DeliveryRow, EventRow, corrupt, delivery_counts, delivery_next, duration_ms, event,
    event_sequence, millis as ms, timestamp,
};
use session_lifecycle_store::sql::statements;
use session_lifecycle_store::{
    BoxFuture, Delivery, DeliveryAttempt, DeliveryCounts, DeliveryQuery, Dispatch, EventOutbox,
    SessionEvent, StoreError, TenantScope, delivery_columns, sql_due_deliveries,
};

use crate::{SqliteStore, db};

/// The sequence of usage record 0's event (`EventKind::UsageRecorded`).
const USAGE_BASE: i64 = session_lifecycle::USAGE_SEQUENCE_BASE as i64;

/// `items` as a JSON array of strings (for `json_each`).
fn json_array(items: &[String]) -> String {
    let quoted: Vec<String> = items
        .iter()
        .map(|s| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"")))
        .collect();
    format!("[{}]", quoted.join(","))
}

/// The delivery row at `row` (columns as `delivery_columns!` lists them).
fn delivery_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<DeliveryRow> {
    Ok(DeliveryRow {
        id: row.get(0)?,
        session_id: row.get(1)?,
        tenant: row.get(2)?,
        session_seq: row.get(3)?,
        event_at: row.get(4)?,
        endpoint: row.get(5)?,
        url: row.get(6)?,
        status: row.get(7)?,
        attempts: row.get(8)?,
        created_at: row.get(9)?,
        next_attempt_at: row.get(10)?,
        last_attempt_at: row.get(11)?,
        last_status: row.get(12)?,
        last_error: row.get(13)?,
    })
}

fn event_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<EventRow> {
    Ok((
        row.get(0)?,
        row.get(1)?,
        row.get(2)?,
        row.get(3)?,
        row.get(4)?,
        row.get(5)?,
    ))
}

fn events(
    c: &rusqlite::Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<SessionEvent>, StoreError> {
    let rows: Vec<EventRow> = c
        .prepare_cached(sql)
        .and_then(|mut s| s.query_map(params, event_row)?.collect())
        .map_err(db)?;
    rows.into_iter().map(event).collect()
}

fn deliveries(
    c: &rusqlite::Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<Delivery>, StoreError> {
    let rows: Vec<DeliveryRow> = c
        .prepare_cached(sql)
        .and_then(|mut s| s.query_map(params, delivery_row)?.collect())
        .map_err(db)?;
    rows.into_iter().map(DeliveryRow::into_delivery).collect()
}

impl EventOutbox for SqliteStore {
    fn record_ready(
        &self,
        session: SessionId,
        at: Timestamp,
    ) -> BoxFuture<'_, Result<bool, StoreError>> {
        let usage = self.usage_on();
        Box::pin(self.inner.conns.write(move |c| {
            let id = session.to_string();
            let n = c
                .prepare_cached(statements::RECORD_READY)
                .and_then(|mut s| s.execute(params![id, ms(at)]))
                .map_err(db)?;
            if n == 1 {
                c.prepare_cached(statements::EVENT_READY)
                    .and_then(|mut s| s.execute(params![id, event_sequence(EventKind::Ready)]))
                    .map_err(db)?;
                if usage {
                    crate::usage::settle_usage(c, &id, None, at)?;
                }
            }
            Ok(n == 1)
        }))
    }

    fn undispatched_events(
        &self,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<SessionEvent>, StoreError>> {
        Box::pin(self.inner.conns.read(move |c| {
            type Row = (EventRow, i64, Option<i64>, Option<i64>);
            let rows: Vec<Row> = c
                .prepare_cached(statements::UNDISPATCHED)
                .and_then(|mut s| {
                    s.query_map([i64::from(limit)], |r| {
                        Ok((event_row(r)?, r.get(6)?, r.get(7)?, r.get(8)?))
                    })?
                    .collect()
                })
                .map_err(db)?;
            let mut out = Vec::with_capacity(rows.len());
            let mut last = None;
            for (row, written, record, recorded_at) in rows {
                if last != Some(written) {
                    last = Some(written);
                    out.push(event(row)?);
                }
                // An ended event's usage events, not written yet: as they will be (the
                // session's, as the event before).
                if let (Some(seq), Some(at), Some(before)) = (record, recorded_at, out.last()) {
                    let seq = u32::try_from(seq)
                        .map_err(|_| corrupt(&before.session.to_string(), "usage record seq"))?;
                    let usage = SessionEvent {
                        position: None,
                        kind: EventKind::UsageRecorded(seq),
                        at: timestamp(at),
                        ..before.clone()
                    };
                    out.push(usage);
                }
            }
            // At most `limit`: usage events left out are written with their ended event's
            // fan-out, and come next time.
            out.truncate(limit as usize);
            Ok(out)
        }))
    }

    fn dispatch_events(
        &self,
        events: Vec<Dispatch>,
        now: Timestamp,
    ) -> BoxFuture<'_, Result<u32, StoreError>> {
        Box::pin(self.inner.conns.write(move |c| {
            let mut dispatched = 0;
            for Dispatch { session, kind, to } in &events {
                let (session, kind) = (*session, *kind);
                let id = session.to_string();
                let sequence = event_sequence(kind);
                // One writer: reading the next place and taking it are one step here.
                let position: i64 = c
                    .prepare_cached("SELECT last_position + 1 FROM event_stream")
                    .and_then(|mut s| s.query_row([], |r| r.get(0)))
                    .map_err(db)?;
                let placed: Option<(i64, String, i64)> = c
                    .prepare_cached(statements::PLACE_EVENT)
                    .and_then(|mut s| {
                        s.query_row(params![id, sequence, position], |r| {
                            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                        })
                        .optional()
                    })
                    .map_err(db)?;
                let Some((event_id, tenant, at)) = placed else {
                    continue;
                };
                dispatched += 1;
                if kind == EventKind::Ended {
                    // The usage events of what its end recorded: written now, in its
                    // place's step, so each is written once (see `UNDISPATCHED`).
                    c.prepare_cached(statements::MATERIALIZE_USAGE_EVENTS)
                        .and_then(|mut s| s.execute(params![event_id, USAGE_BASE]))
                        .map_err(db)?;
                }
                c.prepare_cached(statements::NEXT_POSITION)
                    .and_then(|mut s| s.query_row([], |r| r.get::<_, i64>(0)))
                    .map_err(db)?;
                for fanout in to {
                    c.prepare_cached(statements::INSERT_DELIVERY)
                        .and_then(|mut s| {
                            s.execute(params![
                                event_id,
                                id,
                                sequence,
                                tenant,
                                at,
                                fanout.endpoint,
                                fanout.url,
                                ms(now),
                                fanout.origin
                            ])
                        })
                        .map_err(db)?;
                }
            }
            Ok(dispatched)
        }))
    }

    fn events_after<'a>(
        &'a self,
        tenant: TenantScope<'a>,
        session: Option<SessionId>,
        after: u64,
        limit: u32,
    ) -> BoxFuture<'a, Result<Vec<SessionEvent>, StoreError>> {
        let tenant = tenant.map(str::to_owned);
        let session = session.map(|s| s.to_string());
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        Box::pin(self.inner.conns.read(move |c| {
            events(
                c,
                statements::EVENTS_AFTER,
                params![after, tenant, i64::from(limit), session],
            )
        }))
    }

    fn last_position(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(self.inner.conns.read(|c| {
            let last: i64 = c
                .prepare_cached(statements::LAST_POSITION)
                .and_then(|mut s| s.query_row([], |r| r.get(0)))
                .map_err(db)?;
            Ok(u64::try_from(last).unwrap_or(0))
        }))
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
        let node = node.to_owned();
        Box::pin(self.inner.conns.write(move |c| {
            let mut claimed = deliveries(
                c,
                concat!(
                    "UPDATE deliveries SET claimed_by = ?1, claimed_until = ?2 + ?3
                     WHERE id IN (",
                    sql_due_deliveries!(
                        "?2",
                        "?4",
                        "?5",
                        "?4 * 4",
                        "d.origin NOT IN (SELECT value FROM json_each(?6))",
                        ""
                    ),
                    ") RETURNING ",
                    delivery_columns!()
                ),
                params![
                    node,
                    ms(now),
                    duration_ms(lease),
                    i64::from(limit),
                    i64::from(per_origin),
                    json_array(&busy)
                ],
            )?;
            // RETURNING has no order of its own.
            claimed.sort_by_key(|d| (d.next_attempt_at, d.id));
            Ok(claimed)
        }))
    }

    fn record_deliveries(
        &self,
        node: &str,
        attempts: Vec<DeliveryAttempt>,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        let node = node.to_owned();
        Box::pin(self.inner.conns.write(move |c| {
            for attempt in &attempts {
                let (status, next) = delivery_next(attempt.next);
                c.prepare_cached(statements::RECORD_DELIVERY)
                    .and_then(|mut s| {
                        s.execute(params![
                            attempt.id as i64,
                            node,
                            status,
                            ms(attempt.at),
                            attempt.status_code.map(i64::from),
                            attempt.error,
                            next
                        ])
                    })
                    .map_err(db)?;
            }
            Ok(())
        }))
    }

    fn unclaim_delivery(&self, node: &str, id: u64) -> BoxFuture<'_, Result<(), StoreError>> {
        let node = node.to_owned();
        Box::pin(self.inner.conns.write(move |c| {
            c.prepare_cached(statements::UNCLAIM_DELIVERY)
                .and_then(|mut s| s.execute(params![id as i64, node]))
                .map_err(db)?;
            Ok(())
        }))
    }

    fn deliveries(&self, query: DeliveryQuery) -> BoxFuture<'_, Result<Vec<Delivery>, StoreError>> {
        Box::pin(self.inner.conns.read(move |c| {
            deliveries(
                c,
                statements::LIST_DELIVERIES,
                params![
                    query.tenant,
                    query.session.map(|s| s.to_string()),
                    query.status.map(|s| s.as_str()),
                    i64::from(query.limit)
                ],
            )
        }))
    }

    fn retry_delivery<'a>(
        &'a self,
        tenant: TenantScope<'a>,
        id: u64,
        now: Timestamp,
    ) -> BoxFuture<'a, Result<Option<Delivery>, StoreError>> {
        let tenant = tenant.map(str::to_owned);
        Box::pin(self.inner.conns.write(move |c| {
            c.prepare_cached(statements::RETRY_DELIVERY)
                .and_then(|mut s| s.execute(params![id as i64, tenant, ms(now)]))
                .map_err(db)?;
            Ok(deliveries(c, statements::GET_DELIVERY, params![id as i64, tenant])?.pop())
        }))
    }

    fn prune_outbox(
        &self,
        events_before: Timestamp,
        keys_before: Timestamp,
        limit: u32,
    ) -> BoxFuture<'_, Result<u32, StoreError>> {
        Box::pin(self.inner.conns.write(move |c| {
            let mut gone = 0;
            for (sql, before) in [
                (statements::PRUNE_DELIVERIES, events_before),
                (statements::PRUNE_EVENTS, events_before),
                (statements::PRUNE_KEYS, keys_before),
            ] {
                gone += c
                    .prepare_cached(sql)
                    .and_then(|mut s| s.execute(params![ms(before), i64::from(limit)]))
                    .map_err(db)?;
            }
            Ok(gone as u32)
        }))
    }

    fn delivery_counts(&self) -> BoxFuture<'_, Result<DeliveryCounts, StoreError>> {
        Box::pin(self.inner.conns.read(|c| {
            let rows: Vec<(String, i64, i64, Option<i64>)> = c
                .prepare_cached(statements::COUNT_DELIVERIES)
                .and_then(|mut s| {
                    s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
                        .collect()
                })
                .map_err(db)?;
            Ok(delivery_counts(rows))
        }))
    }
}
