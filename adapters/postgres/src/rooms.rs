//! Rooms: provider events applied once, who is in a session's room, since when it is
//! empty, and pruning after the retention.

use deadpool_postgres::GenericClient;
use session_lifecycle::{SessionId, Timestamp};
use session_lifecycle_store::rows::{millis as ms, parse_id, stored_duration, timestamp};
use session_lifecycle_store::sql::{postgres as pg, statements};
use session_lifecycle_store::{BoxFuture, StoreError};
use session_lifecycle_store::{RoomEvent, RoomEventKind, RoomState, RoomStore};

use crate::{PostgresStore, col, unavailable};

impl RoomStore for PostgresStore {
    fn room_event(
        &self,
        event: RoomEvent,
        now: Timestamp,
    ) -> BoxFuture<'_, Result<Option<Vec<RoomState>>, StoreError>> {
        Box::pin(async move {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(unavailable)?;
            let fresh = tx
                .execute(
                    pg(statements::INSERT_ROOM_EVENT),
                    &[&event.provider.as_str(), &event.event_id, &ms(now)],
                )
                .await
                .map_err(unavailable)?;
            if fresh == 0 {
                return Ok(None);
            }
            let sessions = tx
                .query(
                    "SELECT id FROM sessions
                     WHERE room_provider = $1 AND room_name = $2 AND status = 'started'
                       AND ($3::TEXT IS NULL OR tenant = $3)
                     FOR UPDATE",
                    &[&event.provider.as_str(), &event.room, &event.tenant],
                )
                .await
                .map_err(unavailable)?;
            let mut updates = Vec::with_capacity(sessions.len());
            for row in sessions {
                let id: String = col(&row, 0)?;
                match &event.kind {
                    RoomEventKind::Joined { participant } | RoomEventKind::Left { participant } => {
                        let present = matches!(event.kind, RoomEventKind::Joined { .. });
                        // The latest event by provider time wins, whatever the arrival order.
                        tx.execute(
                            pg(statements::UPSERT_PARTICIPANT),
                            &[&id, participant, &present, &ms(event.at)],
                        )
                        .await
                        .map_err(unavailable)?;
                        if present {
                            tx.execute(pg(statements::SEEN), &[&id, &ms(now)])
                                .await
                                .map_err(unavailable)?;
                        }
                    }
                    RoomEventKind::Finished => {
                        tx.execute(pg(statements::ROOM_FINISHED), &[&id, &true])
                            .await
                            .map_err(unavailable)?;
                    }
                }
                tx.execute(pg(statements::ROOM_EMPTIED), &[&id, &ms(now), &true])
                    .await
                    .map_err(unavailable)?;
                if let Some(room) = room_state(&tx, &id).await? {
                    updates.push(room);
                }
            }
            tx.commit().await.map_err(unavailable)?;
            Ok(Some(updates))
        })
    }

    fn room_state(&self, id: SessionId) -> BoxFuture<'_, Result<Option<RoomState>, StoreError>> {
        Box::pin(async move {
            let client = self.client().await?;
            room_state(&client, &id.to_string()).await
        })
    }

    fn prune_rooms(
        &self,
        ended_before: Timestamp,
        limit: u32,
    ) -> BoxFuture<'_, Result<u32, StoreError>> {
        Box::pin(async move {
            let client = self.client().await?;
            let pruned = client
                .execute(
                    pg(statements::PRUNE_PARTICIPANTS),
                    &[&ms(ended_before), &i64::from(limit)],
                )
                .await
                .map_err(unavailable)?;
            client
                .execute(pg(statements::PRUNE_ROOM_EVENTS), &[&ms(ended_before)])
                .await
                .map_err(unavailable)?;
            client
                .execute(pg(statements::PRUNE_PRESENCE), &[&ms(ended_before)])
                .await
                .map_err(unavailable)?;
            Ok(u32::try_from(pruned).unwrap_or(u32::MAX))
        })
    }

    fn touch_present(&self, now: Timestamp) -> BoxFuture<'_, Result<Vec<SessionId>, StoreError>> {
        Box::pin(async move {
            let client = self.client().await?;
            let rows = client
                .query(pg(statements::TOUCH_PRESENT), &[&ms(now), &true])
                .await
                .map_err(unavailable)?;
            rows.iter()
                .map(|r| parse_id(&col::<String>(r, 0)?))
                .collect()
        })
    }
}

/// Where the room of session `id` stands.
pub(crate) async fn room_state<C: GenericClient>(
    c: &C,
    id: &str,
) -> Result<Option<RoomState>, StoreError> {
    let Some(row) = c
        .query_opt(pg(statements::ROOM_STATE), &[&id, &true])
        .await
        .map_err(unavailable)?
    else {
        return Ok(None);
    };
    Ok(Some(RoomState {
        session: parse_id(id)?,
        present: u32::try_from(col::<i64>(&row, 0)?).unwrap_or(u32::MAX),
        // A leave implies a join, even one delivered later.
        ever_joined: col::<i64>(&row, 1)? > 0,
        finished: col(&row, 2)?,
        emptied_at: col::<Option<i64>>(&row, 3)?.map(timestamp),
        participant_left: col::<Option<i64>>(&row, 4)?.map(stored_duration),
    }))
}
