//! Presence: which nodes hold client sockets of a session, and the word that a session
//! ended.

use std::time::Duration;

use rusqlite::{Connection, params};
use session_lifecycle::{SessionId, Timestamp};
use session_lifecycle_store::PresenceStore;
use session_lifecycle_store::rows::{duration_ms, millis as ms};
use session_lifecycle_store::sql::statements;
use session_lifecycle_store::{BoxFuture, StoreError};

use crate::{SqliteStore, db};

/// The live holders of session `?1` at `?2` for the node timeout `?3` (ms), on the
/// caller's clock (which wrote the heartbeats).
const HOLDERS: &str = session_lifecycle_store::sql_holders!("n.last_heartbeat_at > ?2 - ?3");

impl PresenceStore for SqliteStore {
    fn set_presence(
        &self,
        session: SessionId,
        node: &str,
        holds: bool,
        now: Timestamp,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        let node = node.to_owned();
        Box::pin(self.inner.conns.write(move |c| {
            let id = session.to_string();
            if holds {
                c.prepare_cached(statements::HOLD)
                    .and_then(|mut s| s.execute(params![id, node]))
                    .map_err(db)?;
            } else {
                c.prepare_cached(statements::SEEN)
                    .and_then(|mut s| s.execute(params![id, ms(now)]))
                    .map_err(db)?;
                c.prepare_cached(statements::LET_GO)
                    .and_then(|mut s| s.execute(params![id, node]))
                    .map_err(db)?;
            }
            Ok(())
        }))
    }

    fn clear_presence(&self, node: &str, now: Timestamp) -> BoxFuture<'_, Result<(), StoreError>> {
        let node = node.to_owned();
        Box::pin(self.inner.conns.write(move |c| let_go_of(c, &node, now)))
    }

    fn presence(
        &self,
        session: SessionId,
        now: Timestamp,
        node_timeout: Duration,
    ) -> BoxFuture<'_, Result<Vec<String>, StoreError>> {
        Box::pin(self.inner.conns.read(move |c| {
            c.prepare_cached(HOLDERS)
                .and_then(|mut s| {
                    s.query_map(
                        params![session.to_string(), ms(now), duration_ms(node_timeout)],
                        |r| r.get(0),
                    )?
                    .collect()
                })
                .map_err(db)
        }))
    }

    fn watch_ends<'a>(&'a self, ended: &'a (dyn Fn(SessionId) + Send + Sync)) -> BoxFuture<'a, ()> {
        let mut ends = self.inner.ended.subscribe();
        Box::pin(async move {
            loop {
                match ends.recv().await {
                    Ok(id) => ended(id),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        std::future::pending::<()>().await
                    }
                }
            }
        })
    }
}

/// `node` holds no client sockets from `now` on; they were liveness until then.
pub(crate) fn let_go_of(c: &Connection, node: &str, now: Timestamp) -> Result<(), StoreError> {
    c.prepare_cached(statements::SEEN_HELD_BY)
        .and_then(|mut s| s.execute(params![node, ms(now)]))
        .map_err(db)?;
    c.prepare_cached(statements::CLEAR_PRESENCE)
        .and_then(|mut s| s.execute([node]))
        .map_err(db)?;
    Ok(())
}
