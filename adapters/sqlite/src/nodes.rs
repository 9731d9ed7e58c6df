//! Node membership: heartbeats, and taking over the sessions of nodes that died.

use std::time::Duration;

use rusqlite::params;
use session_lifecycle::{SessionId, Timestamp};
use session_lifecycle_store::rows::{
    LOST_WITH_NODE, duration_ms, millis as ms, parse_id, timestamp,
};
use session_lifecycle_store::sql::statements;
use session_lifecycle_store::usage::sql::UsageStateRow;
use session_lifecycle_store::{BoxFuture, NodeMembership, NodeRow, StoreError};
use session_lifecycle_store::{
    sql_ended_at, sql_later, sql_release_due_at, sql_usage_state_columns,
};

use crate::presence::let_go_of;
use crate::usage;
use crate::{SqliteStore, db, ended_events, mark_resources_due};

impl NodeMembership for SqliteStore {
    fn live_nodes(
        &self,
        now: Timestamp,
        node_timeout: Duration,
    ) -> BoxFuture<'_, Result<u32, StoreError>> {
        let timeout_ms = duration_ms(node_timeout);
        Box::pin(self.inner.conns.read(move |c| {
            let live: i64 = c
                .prepare_cached("SELECT COUNT(*) FROM nodes WHERE last_heartbeat_at > ?1 - ?2")
                .and_then(|mut s| s.query_row(params![ms(now), timeout_ms], |r| r.get(0)))
                .map_err(db)?;
            Ok(u32::try_from(live).unwrap_or(u32::MAX))
        }))
    }

    fn node_alive(&self, node: &str, now: Timestamp) -> BoxFuture<'_, Result<(), StoreError>> {
        let node = node.to_owned();
        Box::pin(self.inner.conns.write(move |c| {
            c.prepare_cached(concat!(
                "INSERT INTO nodes (id, last_heartbeat_at) VALUES (?1, ?2)
                 ON CONFLICT (id) DO UPDATE SET last_heartbeat_at = ",
                sql_later!("nodes.last_heartbeat_at", "excluded.last_heartbeat_at")
            ))
            .and_then(|mut s| s.execute(params![node, ms(now)]))
            .map_err(db)?;
            Ok(())
        }))
    }

    fn report_node<'a>(
        &'a self,
        node: &'a str,
        report: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let (node, report) = (node.to_owned(), report.to_owned());
        Box::pin(self.inner.conns.write(move |c| {
            c.prepare_cached("UPDATE nodes SET report = ?2 WHERE id = ?1")
                .and_then(|mut s| s.execute(params![node, report]))
                .map_err(db)?;
            Ok(())
        }))
    }

    fn nodes(
        &self,
        now: Timestamp,
        node_timeout: Duration,
        window: Duration,
    ) -> BoxFuture<'_, Result<Vec<NodeRow>, StoreError>> {
        let (timeout_ms, window_ms) = (duration_ms(node_timeout), duration_ms(window));
        Box::pin(self.inner.conns.read(move |c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT id, last_heartbeat_at, last_heartbeat_at > ?1 - ?2, report
                     FROM nodes WHERE last_heartbeat_at > ?1 - ?3 ORDER BY id",
                )
                .map_err(db)?;
            let rows = stmt
                .query_map(params![ms(now), timeout_ms, window_ms], |r| {
                    Ok(NodeRow {
                        node: r.get(0)?,
                        last_heartbeat_at: timestamp(r.get(1)?),
                        alive: r.get(2)?,
                        report: r.get(3)?,
                    })
                })
                .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                .map_err(db)?;
            Ok(rows)
        }))
    }

    fn end_dead_nodes(
        &self,
        except: &str,
        now: Timestamp,
        node_timeout: Duration,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<SessionId>, StoreError>> {
        let except = except.to_owned();
        let timeout_ms = duration_ms(node_timeout);
        let usage = self.usage_on();
        Box::pin(async move {
            let ended = self.inner.conns.write(move |c| {
            let dead: Vec<String> = c
                .prepare_cached(
                    "SELECT id FROM nodes WHERE id <> ?1 AND last_heartbeat_at <= ?2 - ?3",
                )
                .and_then(|mut s| {
                    s.query_map(params![except, ms(now), timeout_ms], |r| r.get(0))?
                        .collect()
                })
                .map_err(db)?;
            let mut ended = Vec::new();
            for node in dead {
                let room = i64::from(limit).saturating_sub(ended.len() as i64);
                let rows: Vec<UsageStateRow> = c
                    .prepare_cached(
                        concat!(
                            "UPDATE sessions SET status = 'ended', end_reason = 'node_lost', ended_at = ",
                            sql_ended_at!("?2"),
                            ", release_due_at = ",
                            sql_release_due_at!(sql_ended_at!("?2")),
                            ", node_last_seen_at = (SELECT last_heartbeat_at FROM nodes WHERE id = ?1)
                             WHERE id IN (SELECT id FROM sessions
                                      WHERE node = ?1 AND status = 'started' LIMIT ?3)
                         RETURNING ",
                            sql_usage_state_columns!()
                        ),
                    )
                    .and_then(|mut s| {
                        s.query_map(params![node, ms(now), room], usage::state_row)?
                            .collect()
                    })
                    .map_err(db)?;
                for row in rows {
                    let id = row.id.clone();
                    mark_resources_due(c, &id)?;
                    ended_events(c, &id, now, Some(row).filter(|_| usage))?;
                    ended.push(parse_id(&id)?);
                }
                c.prepare_cached(statements::MARK_LOST)
                    .and_then(|mut s| s.execute(params![node, ms(now), LOST_WITH_NODE]))
                    .map_err(db)?;
                let_go_of(c, &node, now)?;
            }
            Ok(ended)
            })
            .await?;
            for id in &ended {
                let _ = self.inner.ended.send(*id);
            }
            Ok(ended)
        })
    }
}
