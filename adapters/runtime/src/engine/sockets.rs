//! Client WebSockets held on this node: presence shared through the store, and the word
//! that a session ended, for every socket of it at once.
//!
//! A node writes only its own transitions: its first socket of a session opened (it holds
//! the session), and, once its last one has stayed closed for the session's WebSocket
//! grace, that it lets go. A held socket is liveness by itself, with no write per ping. A
//! node that lets go ends the session `websocket_disconnected` only if no live node holds
//! a socket of it any more: a client that reconnected to another instance within the
//! grace keeps its session.

use std::sync::Arc;
use std::time::Duration;

use session_lifecycle::{EndReason, SessionId, Status};
use tokio::sync::watch;

use super::held::{Held, Recorded};
use super::{Engine, EngineError, STORE_RETRY, lock};
use session_lifecycle_store::SessionRecord;

/// One client socket of a session, held on this node. Dropping it closes it: when the
/// session's last socket here closes, its grace starts (see the module docs).
pub struct SocketHold {
    engine: Engine,
    session: SessionId,
    ended: watch::Receiver<bool>,
    /// Closed because this service is stopping: the close decides nothing.
    abandoned: bool,
}

impl std::fmt::Debug for SocketHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SocketHold")
            .field("session", &self.session)
            .finish_non_exhaustive()
    }
}

impl SocketHold {
    /// The session this socket belongs to.
    pub fn session(&self) -> SessionId {
        self.session
    }

    /// Closes this socket because the service is stopping (a handover or a shutdown): no
    /// grace starts and nothing is written. What becomes of the session is the stop's
    /// business; its client can reconnect to another instance, or to this node's next run
    /// (which lets go of what it held, see [`PresenceStore::clear_presence`](
    /// crate::PresenceStore::clear_presence)).
    pub fn abandon(mut self) {
        self.abandoned = true;
    }

    /// Resolves once the session has ended, on any instance sharing the store (within
    /// about a second of the end; see [`PresenceStore::watch_ends`](crate::PresenceStore)).
    pub async fn ended(&mut self) {
        // An error means the engine went away: nothing will end it from here any more.
        if self.ended.wait_for(|ended| *ended).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for SocketHold {
    fn drop(&mut self) {
        if self.abandoned {
            self.engine.socket_abandoned(self.session);
        } else {
            self.engine.socket_closed(self.session);
        }
    }
}

impl Engine {
    /// Opens a client socket of session `id` on this node if it is started and belongs
    /// to `tenant` (any tenant's when `None`); returns the hold and the session as it
    /// stands. The first socket of a session here records in the store that this node
    /// holds it (one write); later ones write nothing.
    pub async fn hold_socket(
        &self,
        tenant: Option<&str>,
        id: SessionId,
    ) -> Result<(SocketHold, SessionRecord), EngineError> {
        // Registered before the session is read: an end from now on is heard.
        let (ended, recorded) = self.socket_opened(id);
        let hold = SocketHold {
            engine: self.clone(),
            session: id,
            ended,
            abandoned: false,
        };
        let record = self.get(tenant, id).await?;
        if record.session.status() != Status::Started {
            return Err(EngineError::SessionEnded);
        }
        let grace = self
            .timeouts_of(&record.timeouts)
            .websocket_grace
            .unwrap_or_default();
        if let Some(held) = lock(&self.inner.sockets.held).get_mut(&id) {
            held.grace = grace;
        }
        let mut recorded = recorded.lock().await;
        if *recorded != Recorded::Yes {
            let now = self.inner.clock.now();
            // A write whose answer is lost may have committed, and a hold left in the store
            // would keep the session alive for ever: it is deleted when the socket closes.
            *recorded = Recorded::Unsure;
            // A node whose heartbeat is overdue (back from an outage) may be taken for dead
            // any moment, and a takeover lets go of its holds: its heartbeat goes first, so
            // that a takeover comes before this hold or not at all.
            if self.heartbeat_overdue(now) {
                self.inner
                    .store
                    .node_alive(&self.inner.config.node, now)
                    .await?;
            }
            self.inner
                .store
                .set_presence(id, &self.inner.config.node, true, now)
                .await?;
            self.inner.metrics.presence_written();
            *recorded = Recorded::Yes;
        }
        drop(recorded);
        Ok((hold, record))
    }

    /// Records again every hold of this node, after an outage: another instance may have
    /// taken this node for dead meanwhile and let go of its holds, while its clients stayed
    /// connected. One write per session held; none while nothing went wrong.
    pub(super) async fn record_holds_again(&self) {
        let inner = &self.inner;
        let held: Vec<(SessionId, Arc<tokio::sync::Mutex<Recorded>>)> = lock(&inner.sockets.held)
            .iter()
            .filter(|(_, h)| h.open > 0)
            .map(|(id, h)| (*id, Arc::clone(&h.recorded)))
            .collect();
        for (id, recorded) in held {
            let recorded = recorded.lock().await;
            if *recorded != Recorded::Yes {
                continue;
            }
            let now = inner.clock.now();
            if let Err(e) = inner
                .store
                .set_presence(id, &inner.config.node, true, now)
                .await
            {
                tracing::warn!(session = %id, error = %e, "recording a hold again after an outage failed");
                return;
            }
            inner.metrics.presence_written();
        }
    }

    /// Whether this node holds (or waits out the grace of) sockets of `id`.
    pub(super) fn holds_socket(&self, id: &SessionId) -> bool {
        lock(&self.inner.sockets.held).contains_key(id)
    }

    /// Counts a socket of `id` opened; its end watch and the lock on its store record.
    fn socket_opened(
        &self,
        id: SessionId,
    ) -> (watch::Receiver<bool>, Arc<tokio::sync::Mutex<Recorded>>) {
        let mut held = lock(&self.inner.sockets.held);
        let entry = held.entry(id).or_insert_with(|| Held {
            open: 0,
            opened: 0,
            grace: Duration::ZERO,
            ended: watch::channel(false).0,
            recorded: Arc::new(tokio::sync::Mutex::new(Recorded::No)),
        });
        entry.open += 1;
        entry.opened += 1;
        (entry.ended.subscribe(), Arc::clone(&entry.recorded))
    }

    /// Counts a socket of `id` closed by a stopping service: the last one only forgets it.
    fn socket_abandoned(&self, id: SessionId) {
        let mut held = lock(&self.inner.sockets.held);
        if let Some(entry) = held.get_mut(&id) {
            entry.open = entry.open.saturating_sub(1);
            if entry.open == 0 {
                held.remove(&id);
            }
        }
    }

    /// Counts a socket of `id` closed; the last one starts the session's grace.
    fn socket_closed(&self, id: SessionId) {
        let (opened, grace) = {
            let mut held = lock(&self.inner.sockets.held);
            let Some(entry) = held.get_mut(&id) else {
                return;
            };
            entry.open = entry.open.saturating_sub(1);
            if entry.open > 0 {
                return;
            }
            (entry.opened, entry.grace)
        };
        let engine = self.clone();
        // The grace is time for the client to come back, as time passes: a step of the
        // wall clock neither cuts it short nor stretches it.
        let waited = self.inner.clock.sleep(grace);
        self.spawn_tracked(async move {
            waited.await;
            engine.let_go(id, opened).await;
        });
    }

    /// After the grace: unless a socket of `id` opened here since (`opened` counts), lets
    /// go of the session in the store and ends it `websocket_disconnected` if no live node
    /// holds a socket of it. Retried while the store cannot be reached: nothing is judged
    /// without it.
    async fn let_go(&self, id: SessionId, opened: u64) {
        let inner = &self.inner;
        loop {
            let recorded = {
                let held = lock(&inner.sockets.held);
                match held.get(&id) {
                    Some(entry) if entry.open == 0 && entry.opened == opened => {
                        Arc::clone(&entry.recorded)
                    }
                    _ => return, // Reopened here, or let go already.
                }
            };
            let mut recorded = recorded.lock().await;
            let was = *recorded;
            let now = inner.clock.now();
            // A hold that may have been written is deleted too.
            if was != Recorded::No {
                if let Err(e) = inner
                    .store
                    .set_presence(id, &inner.config.node, false, now)
                    .await
                {
                    drop(recorded);
                    tracing::warn!(session = %id, error = %e, "letting go of a session's sockets failed; trying again");
                    inner.clock.sleep(STORE_RETRY).await;
                    continue;
                }
                if was == Recorded::Yes {
                    inner.metrics.presence_written();
                }
                *recorded = Recorded::No;
            }
            if was != Recorded::Yes {
                // Never held in the store for sure (the socket was refused, or could not
                // record itself): nothing is judged.
                let mut held = lock(&inner.sockets.held);
                if held.get(&id).is_some_and(|e| e.open == 0) {
                    held.remove(&id);
                }
                return;
            }
            let holders = match inner
                .store
                .presence(id, now, inner.config.node_timeout)
                .await
            {
                Ok(holders) => holders,
                Err(e) => {
                    drop(recorded);
                    tracing::warn!(session = %id, error = %e, "reading a session's presence failed; trying again");
                    inner.clock.sleep(STORE_RETRY).await;
                    continue;
                }
            };
            {
                let mut held = lock(&inner.sockets.held);
                if held.get(&id).is_some_and(|e| e.open > 0) {
                    return; // Reopened meanwhile: it records itself again.
                }
                held.remove(&id);
            }
            drop(recorded);
            if !holders.is_empty() {
                return; // Another instance holds a socket: its close decides.
            }
            match self
                .end_internal(id, EndReason::WebsocketDisconnected)
                .await
            {
                Ok(_) | Err(EngineError::NotFound) => {}
                Err(e) => {
                    // The orphan timeout still applies.
                    tracing::warn!(session = %id, error = %e, "ending a disconnected session failed");
                }
            }
            return;
        }
    }

    /// Session `id` ended (anywhere): every socket of it here hears so.
    pub(super) fn session_ended(&self, id: SessionId) {
        if let Some(entry) = lock(&self.inner.sockets.held).get(&id) {
            entry.ended.send_replace(true);
        }
    }

    /// Hears of every end the store reports, for the sockets held here. Runs until
    /// shutdown.
    pub(super) async fn run_end_watch(&self) {
        let ended = |id| self.session_ended(id);
        self.inner.store.watch_ends(&ended).await;
    }
}
