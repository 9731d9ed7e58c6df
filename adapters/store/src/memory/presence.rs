//! Client socket presence in the reference store, and the ends it tells of.

use std::time::Duration;

use session_lifecycle::{SessionId, Timestamp};
use tokio::sync::broadcast;

use super::{MemoryStore, ready};
use crate::error::{BoxFuture, StoreError};
use crate::store::PresenceStore;

impl PresenceStore for MemoryStore {
    fn set_presence(
        &self,
        session: SessionId,
        node: &str,
        holds: bool,
        now: Timestamp,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        let mut state = self.state();
        if !holds && let Some(s) = state.sessions.get_mut(&session) {
            s.seen(now);
        }
        let holders = state.presence.entry(session).or_default();
        if holds {
            holders.insert(node.to_owned());
        } else {
            holders.remove(node);
            if holders.is_empty() {
                state.presence.remove(&session);
            }
        }
        ready(Ok(()))
    }

    fn clear_presence(&self, node: &str, now: Timestamp) -> BoxFuture<'_, Result<(), StoreError>> {
        self.state().let_go_of(node, now);
        ready(Ok(()))
    }

    fn presence(
        &self,
        session: SessionId,
        now: Timestamp,
        node_timeout: Duration,
    ) -> BoxFuture<'_, Result<Vec<String>, StoreError>> {
        let state = self.state();
        ready(Ok(state.live_holders(&session, now, node_timeout)))
    }

    fn watch_ends<'a>(&'a self, ended: &'a (dyn Fn(SessionId) + Send + Sync)) -> BoxFuture<'a, ()> {
        let mut ends = self.ended.subscribe();
        Box::pin(async move {
            loop {
                match ends.recv().await {
                    Ok(id) => ended(id),
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => std::future::pending::<()>().await,
                }
            }
        })
    }
}
