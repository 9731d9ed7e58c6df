//! Room webhook events: presence, liveness, and ending a session whose room emptied (after
//! the room grace, a wait that is a tracked task on the engine's clock).

use session_lifecycle::{EndReason, SessionId, Transition};

use super::{Engine, EngineError, RoomEventReport};
use crate::store::RoomEvent;

impl Engine {
    /// Applies a verified room webhook event: joins and leaves update who is present in
    /// the room of each started session bound to it (a join is liveness), and a session
    /// ends with `room_empty` when the room finishes, or when it empties after someone had
    /// joined (after the room grace, if any).
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
        for update in updates {
            if update.present > 0 {
                let _ = self.timers().touch(now, &update.session);
                inner.timers_changed.notify_one();
            }
            let empty = update.ever_joined && update.present == 0;
            if !(update.finished || empty) {
                continue;
            }
            if update.finished || inner.config.room_grace.is_zero() {
                if let (_, Transition::Committed) = self
                    .end_internal(update.session, EndReason::RoomEmpty)
                    .await?
                {
                    report.ended.push(update.session);
                }
            } else {
                self.spawn_room_grace(update.session);
            }
        }
        Ok(report)
    }

    /// Waits out the room grace of `session` in a tracked task, then ends it if its room
    /// is still empty. Shutdown cancels the wait.
    fn spawn_room_grace(&self, session: SessionId) {
        let inner = &self.inner;
        let until = inner.clock.now().saturating_add(inner.config.room_grace);
        let engine = self.clone();
        self.spawn_tracked(async move {
            engine.inner.clock.sleep_until(until).await;
            match engine.inner.store.room_presence(session).await {
                Ok(0) => {
                    if let Err(e) = engine.end_internal(session, EndReason::RoomEmpty).await {
                        tracing::warn!(session = %session, error = %e, "ending an empty room's session failed");
                    }
                }
                Ok(_) => {}
                // The sweeper ends it as an orphan if its room stays empty.
                Err(e) => tracing::warn!(session = %session, error = %e, "checking a room failed"),
            }
        });
    }
}
