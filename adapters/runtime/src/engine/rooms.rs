//! Room webhook events: presence, liveness, and ending a session whose room emptied (after
//! its wait after the last participant leaves) or that nobody joined in time. Each wait is
//! a tracked task on the engine's clock, and decides on the store's word when it ends: the
//! events may reach any instance.

use std::time::Duration;

use session_lifecycle::{EndReason, SessionId, Status, Timestamp, Transition};

use super::{Engine, EngineError, RoomEventReport, STORE_RETRY};
use session_lifecycle_store::{RoomEvent, RoomState};

impl Engine {
    /// Applies a verified room webhook event: joins and leaves update who is present in
    /// the room of each started session bound to it (a join is liveness), and a session
    /// ends with `room_empty` when the room finishes, or when it empties after someone had
    /// joined (after the session's wait after the last participant leaves, if any).
    pub async fn room_event(&self, event: RoomEvent) -> Result<RoomEventReport, EngineError> {
        let inner = &self.inner;
        let now = inner.clock.now();
        let Some(updates) = inner.store.room_event(event, now).await? else {
            return Ok(RoomEventReport {
                duplicate: true,
                ended: Vec::new(),
            });
        };
        let mut report = RoomEventReport::default();
        for room in updates {
            if room.present > 0 {
                let _ = self.timers().touch(now, &room.session);
                inner.timers_changed.notify_one();
            }
            let grace = self.left_grace(&room);
            if room.finished || (room.emptied_at.is_some() && grace.is_zero()) {
                if let (_, Transition::Committed) = self
                    .end_internal(room.session, EndReason::RoomEmpty)
                    .await?
                {
                    report.ended.push(room.session);
                }
            } else if let Some(emptied_at) = room.emptied_at {
                self.spawn_room_grace(room.session, emptied_at.saturating_add(grace));
            }
        }
        Ok(report)
    }

    /// The wait after the last participant leaves the room of this session.
    fn left_grace(&self, room: &RoomState) -> Duration {
        room.participant_left
            .unwrap_or(self.inner.config.room_grace)
    }

    /// Waits until `until` in a tracked task, then ends `session` if its room has stayed
    /// empty for the session's whole wait since it last emptied (someone who joined and
    /// left meanwhile restarts the wait). Shutdown cancels the wait.
    pub(super) fn spawn_room_grace(&self, session: SessionId, until: Timestamp) {
        let engine = self.clone();
        self.spawn_tracked(async move {
            let mut until = until;
            loop {
                engine.inner.clock.sleep_until(until).await;
                let room = match engine.inner.store.room_state(session).await {
                    Ok(Some(room)) => room,
                    Ok(None) => return,
                    Err(e) => {
                        tracing::warn!(session = %session, error = %e, "checking a room failed; trying again");
                        until = engine.inner.clock.now().saturating_add(STORE_RETRY);
                        continue;
                    }
                };
                let Some(emptied_at) = room.emptied_at.filter(|_| room.present == 0) else {
                    return; // Someone is present.
                };
                let due = emptied_at.saturating_add(engine.left_grace(&room));
                if due > engine.inner.clock.now() {
                    until = due; // Emptied again since: wait from then.
                    continue;
                }
                match engine.end_internal(session, EndReason::RoomEmpty).await {
                    Ok(_) | Err(EngineError::NotFound) => return,
                    Err(e) => {
                        tracing::warn!(session = %session, error = %e, "ending an empty room's session failed");
                        until = engine.inner.clock.now().saturating_add(STORE_RETRY);
                    }
                }
            }
        });
    }

    /// Waits until `until` in a tracked task, then ends `session` with `nobody_joined` if
    /// nobody has joined its room. Shutdown cancels the wait.
    pub(super) fn spawn_join_wait(&self, session: SessionId, until: Timestamp) {
        let engine = self.clone();
        self.spawn_tracked(async move {
            let mut until = until;
            loop {
                engine.inner.clock.sleep_until(until).await;
                match engine.inner.store.room_state(session).await {
                    Ok(Some(room)) if !room.ever_joined => {}
                    Ok(_) => return,
                    Err(e) => {
                        tracing::warn!(session = %session, error = %e, "checking a room failed; trying again");
                        until = engine.inner.clock.now().saturating_add(STORE_RETRY);
                        continue;
                    }
                }
                match engine.end_internal(session, EndReason::NobodyJoined).await {
                    Ok(_) | Err(EngineError::NotFound) => return,
                    Err(e) => {
                        tracing::warn!(session = %session, error = %e, "ending a session nobody joined failed");
                        until = engine.inner.clock.now().saturating_add(STORE_RETRY);
                    }
                }
            }
        });
    }

    /// After a restart: the room waits of this node's started `sessions` that were under
    /// way.
    pub(super) async fn resume_room_waits(&self, sessions: &[crate::SessionRecord]) {
        for record in sessions {
            if record.room.is_none() || record.session.status() != Status::Started {
                continue;
            }
            let id = *record.session.id();
            let Ok(Some(room)) = self.inner.store.room_state(id).await else {
                continue;
            };
            if let Some(emptied_at) = room.emptied_at.filter(|_| room.present == 0) {
                self.spawn_room_grace(id, emptied_at.saturating_add(self.left_grace(&room)));
            }
            let allowance = self.timeouts_of(&record.timeouts).participant_absent;
            if let (false, Some(allowance)) = (room.ever_joined, allowance) {
                self.spawn_join_wait(id, record.session.started_at().saturating_add(allowance));
            }
        }
    }
}
