//! Video rooms in the reference store: provider events and who is present.

use std::collections::BTreeSet;

use session_lifecycle::{SessionId, Timestamp};

use super::{MemoryStore, State, ready};
use crate::error::{BoxFuture, StoreError};
use crate::record::{RoomEvent, RoomEventKind, RoomState};
use crate::store::RoomStore;

impl RoomStore for MemoryStore {
    fn room_event(
        &self,
        event: RoomEvent,
        now: Timestamp,
    ) -> BoxFuture<'_, Result<Option<Vec<RoomState>>, StoreError>> {
        let mut state = self.state();
        let key = (event.provider.as_str().to_owned(), event.event_id.clone());
        if state.room_events.contains_key(&key) {
            return ready(Ok(None));
        }
        state.room_events.insert(key, now);
        let bound: Vec<SessionId> = state
            .sessions
            .iter()
            .filter(|(_, s)| {
                s.ending.is_none()
                    && s.room
                        .as_ref()
                        .is_some_and(|r| r.provider == event.provider && r.name == event.room)
                    && event.tenant.as_ref().is_none_or(|t| *t == s.tenant)
            })
            .map(|(id, _)| *id)
            .collect();
        let mut updates = Vec::with_capacity(bound.len());
        for id in bound {
            match &event.kind {
                RoomEventKind::Joined { participant } | RoomEventKind::Left { participant } => {
                    let present = matches!(event.kind, RoomEventKind::Joined { .. });
                    let people = state.participants.entry(id).or_default();
                    let entry = people
                        .entry(participant.clone())
                        .or_insert((present, event.at));
                    // The latest event by provider time wins, whatever the arrival order.
                    if event.at >= entry.1 {
                        *entry = (present, event.at);
                    }
                    if present && let Some(s) = state.sessions.get_mut(&id) {
                        s.seen(now);
                    }
                }
                RoomEventKind::Finished => {
                    if let Some(s) = state.sessions.get_mut(&id) {
                        s.room_finished = true;
                    }
                }
            }
            let (present, ever_joined) = state.room_people(&id);
            if let Some(s) = state.sessions.get_mut(&id) {
                if present > 0 || !ever_joined {
                    s.room_emptied_at = None;
                } else if s.room_emptied_at.is_none() {
                    s.room_emptied_at = Some(now);
                }
            }
            if let Some(room) = state.room_state(&id) {
                updates.push(room);
            }
        }
        ready(Ok(Some(updates)))
    }

    fn room_state(&self, id: SessionId) -> BoxFuture<'_, Result<Option<RoomState>, StoreError>> {
        ready(Ok(self.state().room_state(&id)))
    }

    fn touch_present(&self, now: Timestamp) -> BoxFuture<'_, Result<Vec<SessionId>, StoreError>> {
        let mut state = self.state();
        let present: BTreeSet<SessionId> = state
            .participants
            .iter()
            .filter(|(_, p)| p.values().any(|(here, _)| *here))
            .map(|(id, _)| *id)
            .collect();
        let mut touched = Vec::new();
        for id in present {
            if let Some(s) = state.sessions.get_mut(&id).filter(|s| s.ending.is_none()) {
                s.seen(now);
                touched.push(id);
            }
        }
        touched.sort();
        ready(Ok(touched))
    }

    fn prune_rooms(
        &self,
        ended_before: Timestamp,
        limit: u32,
    ) -> BoxFuture<'_, Result<u32, StoreError>> {
        let mut state = self.state();
        let gone: Vec<SessionId> = state
            .participants
            .keys()
            .filter(|id| {
                state
                    .sessions
                    .get(id)
                    .is_none_or(|s| s.ending.is_some_and(|(at, _)| at <= ended_before))
            })
            .take(limit as usize)
            .copied()
            .collect();
        for id in &gone {
            state.participants.remove(id);
        }
        let ended_by = |state: &State, id: &SessionId| {
            state
                .sessions
                .get(id)
                .is_none_or(|s| s.ending.is_some_and(|(at, _)| at <= ended_before))
        };
        let left: Vec<SessionId> = state
            .presence
            .keys()
            .filter(|id| ended_by(&state, id))
            .copied()
            .collect();
        for id in &left {
            state.presence.remove(id);
        }
        // Event ids are kept for deduplication as long as the retention: a provider's
        // retries come well within it.
        state
            .room_events
            .retain(|_, received| *received > ended_before);
        ready(Ok(gone.len() as u32))
    }
}
