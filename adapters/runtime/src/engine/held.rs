//! The client sockets this node holds, per session: the data the `sockets` module's
//! operations keep (under `Sockets::held`, one lock) and nothing of the engine.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use session_lifecycle::SessionId;
use tokio::sync::watch;

/// This node's sockets of one session.
pub(super) struct Held {
    /// Sockets open now.
    pub(super) open: usize,
    /// Counts every open: a grace wait acts only if nothing opened since it began.
    pub(super) opened: u64,
    /// The session's WebSocket grace.
    pub(super) grace: Duration,
    /// Set once the session ended (anywhere).
    pub(super) ended: watch::Sender<bool>,
    /// Whether the store records this node as holding the session. Its writes are made
    /// one at a time, in order, under this lock.
    pub(super) recorded: Arc<tokio::sync::Mutex<Recorded>>,
}

/// Whether the store records this node as holding a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Recorded {
    /// It does not.
    No,
    /// The write failed without an answer: it may have committed. Letting go deletes it,
    /// and judges nothing (no socket of the session was ever open here for sure).
    Unsure,
    /// It does.
    Yes,
}

/// Every session this node holds sockets of (or waits out the grace of).
#[derive(Default)]
pub(crate) struct Sockets {
    pub(super) held: Mutex<BTreeMap<SessionId, Held>>,
}
