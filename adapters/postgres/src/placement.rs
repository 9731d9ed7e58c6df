//! Fleet placement on the shared database: the node of each create chosen in the
//! transaction that records it (see [`session_lifecycle_store::placement`]).
//!
//! Lock order: a tenant's advisory lock (its limit), then the live nodes' rows, in id
//! order, then a session's row. Every placing transaction takes the rows of all live
//! nodes, so two creates racing for a node's last slot take turns and the second counts
//! the first one's session.

use std::collections::HashMap;
use std::time::Duration;

use session_lifecycle::SessionId;
use session_lifecycle_store::rows::{duration_ms, parse_id};
use session_lifecycle_store::{
    BoxFuture, Candidate, ClaimedStart, FleetPlacement, NewSession, NodeReport, PlaceOutcome,
    PlacedState, PlacementAsk, StartState, StoreError, choose_node,
};

use crate::{
    PLACED_CHANNEL, PostgresStore, STARTS_CHANNEL, col, get_record, insert_session,
    tenant_at_limit, unavailable,
};

/// The node `ask` places a session on, judged in `tx` with the live nodes' rows locked
/// until it ends (see the module docs); `None` if none has room.
async fn choose_in(
    tx: &tokio_postgres::Transaction<'_>,
    ask: &PlacementAsk,
) -> Result<Option<String>, StoreError> {
    let nodes = tx
        .query(
            concat!(
                "SELECT n.id, n.report FROM nodes n WHERE ",
                node_alive!("$1"),
                " ORDER BY n.id FOR UPDATE"
            ),
            &[&duration_ms(ask.node_timeout)],
        )
        .await
        .map_err(unavailable)?;
    let mut candidates = Vec::with_capacity(nodes.len() + 1);
    for row in &nodes {
        let node: String = col(row, 0)?;
        let report: Option<String> = col(row, 1)?;
        candidates.push(Candidate {
            node,
            report: report.as_deref().and_then(NodeReport::from_json),
            started: 0,
        });
    }
    if !candidates.iter().any(|c| c.node == ask.receiving) {
        // The receiving node vouches for itself (`receiving_has_room`).
        candidates.push(Candidate {
            node: ask.receiving.clone(),
            report: None,
            started: 0,
        });
    }
    let ids: Vec<&str> = candidates.iter().map(|c| c.node.as_str()).collect();
    let counts = tx
        .query(
            "SELECT node, COUNT(*) FROM sessions
             WHERE status = 'started' AND node = ANY($1) GROUP BY node",
            &[&ids],
        )
        .await
        .map_err(unavailable)?;
    let mut started = HashMap::new();
    for row in &counts {
        let node: String = col(row, 0)?;
        let count: i64 = col(row, 1)?;
        started.insert(node, u64::try_from(count).unwrap_or(0));
    }
    for candidate in &mut candidates {
        candidate.started = started.get(&candidate.node).copied().unwrap_or(0);
    }
    Ok(choose_node(&candidates, ask))
}

/// Wakes `node`: a session was assigned to it (sent when `tx` commits).
async fn wake_node(tx: &tokio_postgres::Transaction<'_>, node: &str) -> Result<(), StoreError> {
    tx.execute("SELECT pg_notify($1, $2)", &[&STARTS_CHANNEL, &node])
        .await
        .map_err(unavailable)?;
    Ok(())
}

impl FleetPlacement for PostgresStore {
    fn places(&self) -> bool {
        true
    }

    fn create_placed<'a>(
        &'a self,
        mut new: NewSession,
        ask: &'a PlacementAsk,
        request: &'a str,
    ) -> BoxFuture<'a, Result<PlaceOutcome, StoreError>> {
        Box::pin(async move {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(unavailable)?;
            if tenant_at_limit(&tx, &new).await? {
                return Ok(PlaceOutcome::LimitReached);
            }
            let Some(node) = choose_in(&tx, ask).await? else {
                return Ok(PlaceOutcome::NoRoom);
            };
            new.node = node.clone();
            insert_session(&tx, &new).await?;
            if node != ask.receiving {
                tx.execute(
                    "UPDATE sessions SET start_state = 'assigned', start_request = $2
                     WHERE id = $1",
                    &[&new.id.to_string(), &request],
                )
                .await
                .map_err(unavailable)?;
                wake_node(&tx, &node).await?;
            }
            tx.commit().await.map_err(unavailable)?;
            Ok(PlaceOutcome::Placed { node })
        })
    }

    fn place_again<'a>(
        &'a self,
        id: SessionId,
        from: &'a str,
        ask: &'a PlacementAsk,
    ) -> BoxFuture<'a, Result<Option<PlaceOutcome>, StoreError>> {
        Box::pin(async move {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(unavailable)?;
            let mut ask = ask.clone();
            if !ask.exclude.iter().any(|n| n == from) {
                ask.exclude.push(from.to_owned());
            }
            // The nodes first, then the session: the lock order of the module docs.
            let choice = choose_in(&tx, &ask).await?;
            let waiting = tx
                .query_opt(
                    "SELECT 1 FROM sessions
                     WHERE id = $1 AND status = 'started' AND node = $2
                       AND start_state IN ('assigned', 'refused')
                     FOR UPDATE",
                    &[&id.to_string(), &from],
                )
                .await
                .map_err(unavailable)?;
            if waiting.is_none() {
                return Ok(None);
            }
            let Some(node) = choice else {
                return Ok(Some(PlaceOutcome::NoRoom));
            };
            tx.execute(
                "UPDATE sessions SET node = $2, start_state = 'assigned', start_note = NULL
                 WHERE id = $1",
                &[&id.to_string(), &node],
            )
            .await
            .map_err(unavailable)?;
            wake_node(&tx, &node).await?;
            tx.commit().await.map_err(unavailable)?;
            Ok(Some(PlaceOutcome::Placed { node }))
        })
    }

    fn claim_starts<'a>(
        &'a self,
        node: &'a str,
        limit: u32,
    ) -> BoxFuture<'a, Result<Vec<ClaimedStart>, StoreError>> {
        Box::pin(async move {
            let client = self.client().await?;
            let claimed = client
                .query(
                    "UPDATE sessions SET start_state = 'starting'
                     WHERE id IN (SELECT id FROM sessions
                                  WHERE node = $1 AND status = 'started'
                                    AND start_state = 'assigned'
                                  ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED)
                       AND start_state = 'assigned'
                     RETURNING id, start_request",
                    &[&node, &i64::from(limit)],
                )
                .await
                .map_err(unavailable)?;
            let mut out = Vec::with_capacity(claimed.len());
            for row in &claimed {
                let id: String = col(row, 0)?;
                let request: Option<String> = col(row, 1)?;
                // Ended since the claim (another instance ended it): nothing to start.
                if let Some(record) = get_record(&client, &id).await? {
                    out.push(ClaimedStart {
                        record,
                        request: request.unwrap_or_default(),
                    });
                }
            }
            Ok(out)
        })
    }

    fn finish_start<'a>(
        &'a self,
        id: SessionId,
        node: &'a str,
        refused: Option<&'a str>,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let client = self.client().await?;
            let state = refused.map(|_| "refused");
            // One statement: the report and its announcement, sent when it commits.
            let rows = client
                .query(
                    "WITH done AS (
                        UPDATE sessions SET start_state = $3, start_note = $4
                        WHERE id = $1 AND node = $2 AND status = 'started'
                          AND start_state = 'starting'
                        RETURNING id)
                     SELECT pg_notify($5, id) FROM done",
                    &[&id.to_string(), &node, &state, &refused, &PLACED_CHANNEL],
                )
                .await
                .map_err(unavailable)?;
            Ok(!rows.is_empty())
        })
    }

    fn placed_state(
        &self,
        id: SessionId,
    ) -> BoxFuture<'_, Result<Option<PlacedState>, StoreError>> {
        Box::pin(async move {
            let client = self.client().await?;
            let row = client
                .query_opt(
                    "SELECT node, status, start_state, start_note FROM sessions WHERE id = $1",
                    &[&id.to_string()],
                )
                .await
                .map_err(unavailable)?;
            let Some(row) = row else { return Ok(None) };
            let status: String = col(&row, 1)?;
            let state: Option<String> = col(&row, 2)?;
            let note: Option<String> = col(&row, 3)?;
            let start = match state.as_deref() {
                None => StartState::Started,
                Some("assigned") => StartState::Assigned,
                Some("starting") => StartState::Starting,
                Some("refused") => StartState::Refused(note.unwrap_or_default()),
                Some(other) => {
                    return Err(StoreError::Corrupt {
                        id: id.to_string(),
                        detail: format!("unknown start state {other:?}"),
                    });
                }
            };
            Ok(Some(PlacedState {
                node: col(&row, 0)?,
                ended: status == "ended",
                start,
            }))
        })
    }

    fn interrupted_starts<'a>(
        &'a self,
        node: &'a str,
    ) -> BoxFuture<'a, Result<Vec<SessionId>, StoreError>> {
        Box::pin(async move {
            let client = self.client().await?;
            let rows = client
                .query(
                    "SELECT id FROM sessions
                     WHERE node = $1 AND status = 'started' AND start_state = 'starting'
                     ORDER BY id",
                    &[&node],
                )
                .await
                .map_err(unavailable)?;
            rows.iter()
                .map(|row| parse_id(&col::<String>(row, 0)?))
                .collect()
        })
    }

    fn watch_starts<'a>(
        &'a self,
        node: &'a str,
        wake: &'a (dyn Fn() + Send + Sync),
    ) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let heard = |assigned_to: &str| {
                if assigned_to == node {
                    wake();
                }
            };
            loop {
                if let Err(e) = self.listen(STARTS_CHANNEL, &heard, wake).await {
                    tracing::warn!(error = %e, "listening for placed starts failed; reconnecting");
                }
                wake();
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    }

    fn watch_placed<'a>(
        &'a self,
        heard: &'a (dyn Fn(SessionId) + Send + Sync),
    ) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let payload = |id: &str| {
                if let Ok(id) = parse_id(id) {
                    heard(id);
                }
            };
            loop {
                if let Err(e) = self.listen(PLACED_CHANNEL, &payload, &|| {}).await {
                    tracing::warn!(error = %e, "listening for placed starts' outcomes failed; reconnecting");
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    }
}
