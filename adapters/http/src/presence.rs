//! Open WebSockets per session, on this instance.
//!
//! Per instance, not shared: when a session's last socket *on this instance* goes (and
//! stays gone for the grace period), this instance ends the session. A session whose
//! sockets are spread over several instances therefore ends when the last socket on any
//! one of them goes: route one session's sockets to one instance (sticky load balancing
//! by session id). Two instances ending the same session is harmless: the first end
//! commits, the other returns it.

use std::collections::HashMap;
use std::sync::Mutex;

use session_lifecycle::SessionId;

/// Open sockets per session.
#[derive(Debug, Default)]
pub struct Presence {
    open: Mutex<HashMap<SessionId, usize>>,
}

impl Presence {
    /// One more socket for `id`.
    pub fn join(&self, id: SessionId) {
        *self
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id)
            .or_default() += 1;
    }

    /// One socket of `id` fewer; returns how many it still has.
    pub fn leave(&self, id: SessionId) -> usize {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let left = open.get(&id).map_or(0, |n| n.saturating_sub(1));
        if left == 0 {
            open.remove(&id);
        } else {
            open.insert(id, left);
        }
        left
    }

    /// How many sockets `id` has.
    pub fn count(&self, id: SessionId) -> usize {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .copied()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use session_lifecycle::Timestamp;

    use super::*;

    #[test]
    fn sockets_are_counted_per_session() {
        let t0 = Timestamp::from_millis(0);
        let (a, b) = (
            SessionId::from_ulid_parts(t0, 1),
            SessionId::from_ulid_parts(t0, 2),
        );
        let presence = Presence::default();
        presence.join(a);
        presence.join(a);
        presence.join(b);
        assert_eq!(presence.leave(a), 1);
        assert_eq!(presence.count(b), 1);
        assert_eq!(presence.leave(a), 0);
        assert_eq!(presence.leave(a), 0, "never below zero");
        assert_eq!(presence.count(a), 0);
    }
}
