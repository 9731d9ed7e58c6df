//! The event outbox (see [`EventOutbox`]): events are written by the session statements
//! themselves; here they are fanned out, streamed and delivered. Fan-outs take turns on
//! the stream's one counter row, so stream places commit in order; deliveries are claimed
//! with `FOR UPDATE SKIP LOCKED` and a lease, so each attempt happens once in the cluster.

use std::time::Duration;

use session_lifecycle::{EventKind, SessionId, Timestamp};
use session_lifecycle_store::rows::{
    DeliveryRow, delivery_counts, delivery_next, duration_ms, event, event_sequence, millis as ms,
};
use session_lifecycle_store::sql::{postgres as pg, statements};
use session_lifecycle_store::{
    BoxFuture, Delivery, DeliveryAttempt, DeliveryCounts, DeliveryQuery, Dispatch, EventOutbox,
    SessionEvent, StoreError, TenantScope, delivery_columns, sql_due_deliveries,
};
use tokio_postgres::Row;

use crate::{EVENTS_CHANNEL, PostgresStore, col, unavailable};

fn delivery(row: &Row) -> Result<Delivery, StoreError> {
    DeliveryRow {
        id: col(row, 0)?,
        session_id: col(row, 1)?,
        tenant: col(row, 2)?,
        session_seq: col(row, 3)?,
        event_at: col(row, 4)?,
        endpoint: col(row, 5)?,
        url: col(row, 6)?,
        status: col(row, 7)?,
        attempts: col(row, 8)?,
        created_at: col(row, 9)?,
        next_attempt_at: col(row, 10)?,
        last_attempt_at: col(row, 11)?,
        last_status: col(row, 12)?,
        last_error: col(row, 13)?,
    }
    .into_delivery()
}

fn events(rows: &[Row]) -> Result<Vec<SessionEvent>, StoreError> {
    rows.iter()
        .map(|row| {
            event((
                col(row, 0)?,
                col(row, 1)?,
                col(row, 2)?,
                col(row, 3)?,
                col(row, 4)?,
                col(row, 5)?,
            ))
        })
        .collect()
}

impl EventOutbox for PostgresStore {
    fn record_ready(
        &self,
        session: SessionId,
        at: Timestamp,
    ) -> BoxFuture<'_, Result<bool, StoreError>> {
        Box::pin(async move {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(unavailable)?;
            let id = session.to_string();
            let n = tx
                .execute(pg(statements::RECORD_READY), &[&id, &ms(at)])
                .await
                .map_err(unavailable)?;
            if n == 1 {
                tx.execute(
                    pg(statements::EVENT_READY),
                    &[&id, &event_sequence(EventKind::Ready)],
                )
                .await
                .map_err(unavailable)?;
                crate::usage::settle_usage(&tx, &id, None, at).await?;
            }
            tx.commit().await.map_err(unavailable)?;
            Ok(n == 1)
        })
    }

    fn undispatched_events(
        &self,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<SessionEvent>, StoreError>> {
        Box::pin(async move {
            let client = self.client().await?;
            let rows = client
                .query(
                    "SELECT NULL::BIGINT, e.session_id, e.tenant, e.session_seq, e.at, s.callback_url
                     FROM events e JOIN sessions s ON s.id = e.session_id
                     WHERE e.position IS NULL ORDER BY e.id LIMIT $1",
                    &[&i64::from(limit)],
                )
                .await
                .map_err(unavailable)?;
            events(&rows)
        })
    }

    fn dispatch_events(
        &self,
        events: Vec<Dispatch>,
        now: Timestamp,
    ) -> BoxFuture<'_, Result<u32, StoreError>> {
        Box::pin(async move {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(unavailable)?;
            // The stream's counter row first, held to the commit: fan-outs take turns, and
            // never lock events in two orders.
            tx.execute("SELECT 1 FROM event_stream FOR UPDATE", &[])
                .await
                .map_err(unavailable)?;
            let mut dispatched = 0;
            for Dispatch { session, kind, to } in &events {
                let id = session.to_string();
                let sequence = event_sequence(*kind);
                // Placed only if not placed yet (another instance's fan-out committed
                // before this one took the counter).
                let Some(placed) = tx
                    .query_opt(
                        "SELECT id, tenant, at FROM events
                         WHERE session_id = $1 AND session_seq = $2 AND position IS NULL
                         FOR UPDATE",
                        &[&id, &sequence],
                    )
                    .await
                    .map_err(unavailable)?
                else {
                    continue;
                };
                // The counter row's lock, held to the commit, orders the fan-outs.
                let position: i64 = col(
                    &tx.query_one(pg(statements::NEXT_POSITION), &[])
                        .await
                        .map_err(unavailable)?,
                    0,
                )?;
                tx.execute(pg(statements::PLACE_EVENT), &[&id, &sequence, &position])
                    .await
                    .map_err(unavailable)?;
                dispatched += 1;
                let (event_id, tenant, at): (i64, String, i64) =
                    (col(&placed, 0)?, col(&placed, 1)?, col(&placed, 2)?);
                for fanout in to {
                    tx.execute(
                        pg(statements::INSERT_DELIVERY),
                        &[
                            &event_id,
                            &id,
                            &sequence,
                            &tenant,
                            &at,
                            &fanout.endpoint,
                            &fanout.url,
                            &ms(now),
                            &fanout.origin,
                        ],
                    )
                    .await
                    .map_err(unavailable)?;
                }
            }
            if dispatched > 0 {
                // Heard at the commit by every instance's event streams.
                tx.execute("SELECT pg_notify($1, '')", &[&EVENTS_CHANNEL])
                    .await
                    .map_err(unavailable)?;
            }
            tx.commit().await.map_err(unavailable)?;
            Ok(dispatched)
        })
    }

    fn watch_events<'a>(&'a self, wake: &'a (dyn Fn() + Send + Sync)) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let heard = |_: &str| wake();
            loop {
                // Events placed while no one listened are found by the readers' polls.
                if let Err(e) = self.listen(EVENTS_CHANNEL, &heard, &|| {}).await {
                    tracing::warn!(error = %e, "listening for events failed; reconnecting");
                }
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        })
    }

    fn events_after<'a>(
        &'a self,
        tenant: TenantScope<'a>,
        session: Option<SessionId>,
        after: u64,
        limit: u32,
    ) -> BoxFuture<'a, Result<Vec<SessionEvent>, StoreError>> {
        Box::pin(async move {
            let client = self.client().await?;
            let after = i64::try_from(after).unwrap_or(i64::MAX);
            let session = session.map(|s| s.to_string());
            let rows = client
                .query(
                    pg(statements::EVENTS_AFTER),
                    &[&after, &tenant, &i64::from(limit), &session],
                )
                .await
                .map_err(unavailable)?;
            events(&rows)
        })
    }

    fn last_position(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(async move {
            let client = self.client().await?;
            let row = client
                .query_one(pg(statements::LAST_POSITION), &[])
                .await
                .map_err(unavailable)?;
            let last: i64 = col(&row, 0)?;
            Ok(u64::try_from(last).unwrap_or(0))
        })
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
        Box::pin(async move {
            let client = self.client().await?;
            let rows = client
                .query(
                    concat!(
                        "UPDATE deliveries SET claimed_by = $1, claimed_until = $2 + $3
                         WHERE id IN (",
                        sql_due_deliveries!(
                            "$2",
                            "$4",
                            "$5",
                            "$4::BIGINT * 4",
                            "NOT (d.origin = ANY($6::TEXT[]))",
                            "FOR UPDATE OF d SKIP LOCKED"
                        ),
                        ") AND status = 'pending'
                           AND (claimed_until IS NULL OR claimed_until <= $2)
                         RETURNING ",
                        delivery_columns!()
                    ),
                    &[
                        &node,
                        &ms(now),
                        &duration_ms(lease),
                        &i64::from(limit),
                        &i64::from(per_origin),
                        &busy,
                    ],
                )
                .await
                .map_err(unavailable)?;
            let mut claimed = rows.iter().map(delivery).collect::<Result<Vec<_>, _>>()?;
            claimed.sort_by_key(|d| (d.next_attempt_at, d.id));
            Ok(claimed)
        })
    }

    fn record_deliveries(
        &self,
        node: &str,
        attempts: Vec<DeliveryAttempt>,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        let node = node.to_owned();
        Box::pin(async move {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(unavailable)?;
            for attempt in attempts {
                let (status, next) = delivery_next(attempt.next);
                tx.execute(
                    pg(statements::RECORD_DELIVERY),
                    &[
                        &(attempt.id as i64),
                        &node,
                        &status,
                        &ms(attempt.at),
                        &attempt.status_code.map(i64::from),
                        &attempt.error,
                        &next,
                    ],
                )
                .await
                .map_err(unavailable)?;
            }
            tx.commit().await.map_err(unavailable)
        })
    }

    fn unclaim_delivery(&self, node: &str, id: u64) -> BoxFuture<'_, Result<(), StoreError>> {
        let node = node.to_owned();
        Box::pin(async move {
            let client = self.client().await?;
            client
                .execute(pg(statements::UNCLAIM_DELIVERY), &[&(id as i64), &node])
                .await
                .map_err(unavailable)?;
            Ok(())
        })
    }

    fn deliveries(&self, query: DeliveryQuery) -> BoxFuture<'_, Result<Vec<Delivery>, StoreError>> {
        Box::pin(async move {
            let client = self.client().await?;
            let rows = client
                .query(
                    pg(statements::LIST_DELIVERIES),
                    &[
                        &query.tenant,
                        &query.session.map(|s| s.to_string()),
                        &query.status.map(|s| s.as_str()),
                        &i64::from(query.limit),
                    ],
                )
                .await
                .map_err(unavailable)?;
            rows.iter().map(delivery).collect()
        })
    }

    fn retry_delivery<'a>(
        &'a self,
        tenant: TenantScope<'a>,
        id: u64,
        now: Timestamp,
    ) -> BoxFuture<'a, Result<Option<Delivery>, StoreError>> {
        Box::pin(async move {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(unavailable)?;
            let id = id as i64;
            tx.execute(pg(statements::RETRY_DELIVERY), &[&id, &tenant, &ms(now)])
                .await
                .map_err(unavailable)?;
            let row = tx
                .query_opt(pg(statements::GET_DELIVERY), &[&id, &tenant])
                .await
                .map_err(unavailable)?;
            tx.commit().await.map_err(unavailable)?;
            row.as_ref().map(delivery).transpose()
        })
    }

    fn prune_outbox(
        &self,
        events_before: Timestamp,
        keys_before: Timestamp,
        limit: u32,
    ) -> BoxFuture<'_, Result<u32, StoreError>> {
        Box::pin(async move {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(unavailable)?;
            let mut gone = 0;
            for (sql, before) in [
                (statements::PRUNE_DELIVERIES, events_before),
                (statements::PRUNE_EVENTS, events_before),
                (statements::PRUNE_KEYS, keys_before),
            ] {
                gone += tx
                    .execute(pg(sql), &[&ms(before), &i64::from(limit)])
                    .await
                    .map_err(unavailable)?;
            }
            tx.commit().await.map_err(unavailable)?;
            Ok(gone as u32)
        })
    }

    fn delivery_counts(&self) -> BoxFuture<'_, Result<DeliveryCounts, StoreError>> {
        Box::pin(async move {
            let client = self.client().await?;
            let rows = client
                .query(pg(statements::COUNT_DELIVERIES), &[])
                .await
                .map_err(unavailable)?;
            let rows = rows
                .iter()
                .map(|r| Ok((col(r, 0)?, col(r, 1)?, col(r, 2)?, col(r, 3)?)))
                .collect::<Result<Vec<(String, i64, i64, Option<i64>)>, StoreError>>()?;
            Ok(delivery_counts(rows))
        })
    }
}
