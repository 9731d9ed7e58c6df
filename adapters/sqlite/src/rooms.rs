//! Rooms: provider events applied once, who is in a session's room, since when it is
//! empty, and pruning after the retention.

use rusqlite::{Connection, OptionalExtension, params};
use session_lifecycle::{SessionId, Timestamp};
use session_lifecycle_store::rows::{millis as ms, parse_id, stored_duration, timestamp};
use session_lifecycle_store::sql::statements;
use session_lifecycle_store::{BoxFuture, StoreError};
use session_lifecycle_store::{RoomEvent, RoomEventKind, RoomState, RoomStore};

use crate::{SqliteStore, db};

impl RoomStore for SqliteStore {
    fn room_event(
        &self,
        event: RoomEvent,
        now: Timestamp,
    ) -> BoxFuture<'_, Result<Option<Vec<RoomState>>, StoreError>> {
        Box::pin(self.inner.conns.write(move |c| {
            let fresh = c
                .prepare_cached(statements::INSERT_ROOM_EVENT)
                .and_then(|mut s| {
                    s.execute(params![event.provider.as_str(), event.event_id, ms(now)])
                })
                .map_err(db)?;
            if fresh == 0 {
                return Ok(None);
            }
            let sessions: Vec<String> = c
                .prepare_cached(
                    "SELECT id FROM sessions
                     WHERE room_provider = ?1 AND room_name = ?2 AND status = 'started'
                       AND (?3 IS NULL OR tenant = ?3)",
                )
                .and_then(|mut s| {
                    s.query_map(
                        params![event.provider.as_str(), event.room, event.tenant],
                        |r| r.get(0),
                    )?
                    .collect()
                })
                .map_err(db)?;
            let mut updates = Vec::with_capacity(sessions.len());
            for id in sessions {
                match &event.kind {
                    RoomEventKind::Joined { participant } | RoomEventKind::Left { participant } => {
                        let present = matches!(event.kind, RoomEventKind::Joined { .. });
                        c.prepare_cached(statements::UPSERT_PARTICIPANT)
                            .and_then(|mut s| {
                                s.execute(params![id, participant, present, ms(event.at)])
                            })
                            .map_err(db)?;
                        if present {
                            c.prepare_cached(statements::SEEN)
                                .and_then(|mut s| s.execute(params![id, ms(now)]))
                                .map_err(db)?;
                        }
                    }
                    RoomEventKind::Finished => {
                        c.prepare_cached(statements::ROOM_FINISHED)
                            .and_then(|mut s| s.execute(params![id, true]))
                            .map_err(db)?;
                    }
                }
                c.prepare_cached(statements::ROOM_EMPTIED)
                    .and_then(|mut s| s.execute(params![id, ms(now), true]))
                    .map_err(db)?;
                if let Some(room) = room_state(c, &id)? {
                    updates.push(room);
                }
            }
            Ok(Some(updates))
        }))
    }

    fn room_state(&self, id: SessionId) -> BoxFuture<'_, Result<Option<RoomState>, StoreError>> {
        Box::pin(
            self.inner
                .conns
                .read(move |c| room_state(c, &id.to_string())),
        )
    }

    fn prune_rooms(
        &self,
        ended_before: Timestamp,
        limit: u32,
    ) -> BoxFuture<'_, Result<u32, StoreError>> {
        Box::pin(self.inner.conns.write(move |c| {
            let pruned = c
                .prepare_cached(statements::PRUNE_PARTICIPANTS)
                .and_then(|mut s| s.execute(params![ms(ended_before), i64::from(limit)]))
                .map_err(db)?;
            c.prepare_cached(statements::PRUNE_ROOM_EVENTS)
                .and_then(|mut s| s.execute([ms(ended_before)]))
                .map_err(db)?;
            c.prepare_cached(statements::PRUNE_PRESENCE)
                .and_then(|mut s| s.execute([ms(ended_before)]))
                .map_err(db)?;
            Ok(u32::try_from(pruned).unwrap_or(u32::MAX))
        }))
    }

    fn touch_present(&self, now: Timestamp) -> BoxFuture<'_, Result<Vec<SessionId>, StoreError>> {
        Box::pin(self.inner.conns.write(move |c| {
            let ids: Vec<String> = c
                .prepare_cached(statements::TOUCH_PRESENT)
                .and_then(|mut s| s.query_map(params![ms(now), true], |r| r.get(0))?.collect())
                .map_err(db)?;
            ids.iter().map(|id| parse_id(id)).collect()
        }))
    }
}

/// Where the room of session `id` stands.
pub(crate) fn room_state(c: &Connection, id: &str) -> Result<Option<RoomState>, StoreError> {
    let session = parse_id(id)?;
    c.prepare_cached(statements::ROOM_STATE)
        .and_then(|mut s| {
            s.query_row(params![id, true], |r| {
                let present: i64 = r.get(0)?;
                let ever: i64 = r.get(1)?;
                Ok(RoomState {
                    session,
                    present: u32::try_from(present).unwrap_or(u32::MAX),
                    // A leave implies a join, even one delivered later.
                    ever_joined: ever > 0,
                    finished: r.get(2)?,
                    emptied_at: r.get::<_, Option<i64>>(3)?.map(timestamp),
                    participant_left: r.get::<_, Option<i64>>(4)?.map(stored_duration),
                })
            })
            .optional()
        })
        .map_err(db)
}
