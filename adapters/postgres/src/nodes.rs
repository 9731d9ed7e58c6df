//! Node membership: heartbeats, and taking over the sessions of nodes that died.

use std::time::Duration;

use session_lifecycle::{EventKind, SessionId, Timestamp};
use session_lifecycle_store::rows::{
    LOST_WITH_NODE, duration_ms, event_sequence, millis as ms, parse_id, timestamp,
};
use session_lifecycle_store::sql::{postgres as pg, statements};
use session_lifecycle_store::{BoxFuture, NodeMembership, NodeRow, StoreError};
use session_lifecycle_store::{sql_ended_at, sql_release_due_at};

use crate::presence::let_go_of;
use crate::{ENDS_CHANNEL, PostgresStore, col, unavailable};

impl NodeMembership for PostgresStore {
    fn live_nodes(
        &self,
        _now: Timestamp,
        node_timeout: Duration,
    ) -> BoxFuture<'_, Result<u32, StoreError>> {
        Box::pin(async move {
            let client = self.client().await?;
            // Judged as takeovers judge: on the database's clock, counting only its uptime.
            let row = client
                .query_one(
                    concat!("SELECT COUNT(*) FROM nodes n WHERE ", node_alive!("$1")),
                    &[&duration_ms(node_timeout)],
                )
                .await
                .map_err(unavailable)?;
            let live: i64 = col(&row, 0)?;
            Ok(u32::try_from(live).unwrap_or(u32::MAX))
        })
    }

    fn node_alive(&self, node: &str, _now: Timestamp) -> BoxFuture<'_, Result<(), StoreError>> {
        let node = node.to_owned();
        Box::pin(async move {
            let client = self.client().await?;
            client
                .execute(
                    concat!(
                        "INSERT INTO nodes (id, last_heartbeat_at) VALUES ($1, ",
                        db_now_ms!(),
                        ") ON CONFLICT (id) DO UPDATE
                         SET last_heartbeat_at = GREATEST(nodes.last_heartbeat_at, excluded.last_heartbeat_at)"
                    ),
                    &[&node],
                )
                .await
                .map_err(unavailable)?;
            Ok(())
        })
    }

    fn report_node<'a>(
        &'a self,
        node: &'a str,
        report: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let client = self.client().await?;
            client
                .execute(
                    "UPDATE nodes SET report = $2 WHERE id = $1",
                    &[&node, &report],
                )
                .await
                .map_err(unavailable)?;
            Ok(())
        })
    }

    fn nodes(
        &self,
        _now: Timestamp,
        node_timeout: Duration,
        window: Duration,
    ) -> BoxFuture<'_, Result<Vec<NodeRow>, StoreError>> {
        Box::pin(async move {
            let client = self.client().await?;
            // Judged on the database's clock, as takeovers are.
            let rows = client
                .query(
                    concat!(
                        "SELECT n.id, n.last_heartbeat_at, ",
                        node_alive!("$1"),
                        ", n.report FROM nodes n WHERE n.last_heartbeat_at > ",
                        db_now_ms!(),
                        " - $2::BIGINT ORDER BY n.id"
                    ),
                    &[&duration_ms(node_timeout), &duration_ms(window)],
                )
                .await
                .map_err(unavailable)?;
            rows.iter()
                .map(|row| {
                    Ok(NodeRow {
                        node: col(row, 0)?,
                        last_heartbeat_at: timestamp(col(row, 1)?),
                        alive: col(row, 2)?,
                        report: col(row, 3)?,
                    })
                })
                .collect()
        })
    }

    fn end_dead_nodes(
        &self,
        except: &str,
        now: Timestamp,
        node_timeout: Duration,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<SessionId>, StoreError>> {
        let except = except.to_owned();
        Box::pin(async move {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(unavailable)?;
            // Judged on the database's clock, which also wrote the heartbeats: the
            // instances' clocks never meet. And only time the database was up counts: no
            // node could write a heartbeat while it was down. Row locks on the dead nodes:
            // two sweepers taking over at once take turns.
            let dead = tx
                .query(
                    concat!(
                        "SELECT id FROM nodes
                         WHERE id <> $1
                           AND GREATEST(last_heartbeat_at, ",
                        db_start_ms!(),
                        ") <= ",
                        db_now_ms!(),
                        " - $2::BIGINT
                         ORDER BY id FOR UPDATE"
                    ),
                    &[&except, &duration_ms(node_timeout)],
                )
                .await
                .map_err(unavailable)?;
            let mut ended = Vec::new();
            for row in dead {
                let node: String = col(&row, 0)?;
                let room = i64::from(limit).saturating_sub(ended.len() as i64);
                let ids = tx
                    .query(
                        concat!(
                            // A session its node had not finished starting (a placed one) never
                            // ran: it ends `start_failed`, not `node_lost`.
                            "UPDATE sessions SET status = 'ended',
                                    end_reason = CASE WHEN start_state IS NULL THEN 'node_lost'
                                                      ELSE 'start_failed' END,
                                    ended_at = ",
                            sql_ended_at!("$2"),
                            // Its last heartbeat, as this instance's clock (which wrote
                            // `ended_at` and the usage periods) saw it: its age on the
                            // database's clock, back from `now`.
                            ", node_last_seen_at = $2::BIGINT - GREATEST(0, ",
                            db_now_ms!(),
                            " - (SELECT last_heartbeat_at FROM nodes WHERE id = $1))
                             WHERE id IN (SELECT id FROM sessions
                                      WHERE node = $1 AND status = 'started'
                                      ORDER BY id LIMIT $3 FOR UPDATE)
                           AND status = 'started'
                         RETURNING id"
                        ),
                        &[&node, &ms(now), &room],
                    )
                    .await
                    .map_err(unavailable)?;
                let ids: Vec<String> = ids.iter().map(|r| col(r, 0)).collect::<Result<_, _>>()?;
                // What the core's end does to their resources (see `end`).
                tx.execute(
                    "UPDATE resources SET state = 'pending', attempts = 0,
                            retry_at = (SELECT ended_at FROM sessions WHERE id = session_id)
                     WHERE session_id = ANY($1) AND state = 'held'",
                    &[&ids],
                )
                .await
                .map_err(unavailable)?;
                tx.execute(
                    concat!(
                        "UPDATE sessions SET release_due_at = ",
                        sql_release_due_at!("ended_at"),
                        " WHERE id = ANY($1)"
                    ),
                    &[&ids],
                )
                .await
                .map_err(unavailable)?;
                // Their events, with their ends.
                tx.execute(
                    "INSERT INTO events (session_id, tenant, session_seq, at)
                     SELECT id, tenant, $2::BIGINT, ended_at FROM sessions WHERE id = ANY($1)
                     UNION ALL
                     SELECT id, tenant, $3::BIGINT, ended_at FROM sessions
                     WHERE id = ANY($1) AND resource_count = 0
                     ON CONFLICT DO NOTHING",
                    &[
                        &ids,
                        &event_sequence(EventKind::Ended),
                        &event_sequence(EventKind::Released),
                    ],
                )
                .await
                .map_err(unavailable)?;
                tx.execute(
                    pg(statements::MARK_LOST),
                    &[&node, &ms(now), &LOST_WITH_NODE],
                )
                .await
                .map_err(unavailable)?;
                let_go_of(&tx, &node, now).await?;
                // Announced when this commits.
                tx.execute(
                    "SELECT pg_notify($1, id) FROM unnest($2::TEXT[]) AS id",
                    &[&ENDS_CHANNEL, &ids],
                )
                .await
                .map_err(unavailable)?;
                for id in &ids {
                    crate::usage::settle_usage(&tx, id, None, now).await?;
                    ended.push(parse_id(id)?);
                }
            }
            tx.commit().await.map_err(unavailable)?;
            Ok(ended)
        })
    }
}
