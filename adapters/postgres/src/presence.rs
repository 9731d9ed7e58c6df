//! Presence: which nodes hold client sockets of a session, and the word that a session
//! ended.

use std::time::Duration;

use deadpool_postgres::GenericClient;
use session_lifecycle::{SessionId, Timestamp};
use session_lifecycle_store::PresenceStore;
use session_lifecycle_store::rows::{duration_ms, millis as ms};
use session_lifecycle_store::sql::{postgres as pg, statements};
use session_lifecycle_store::{BoxFuture, StoreError};

use crate::{ENDS_CHANNEL, PostgresStore, col, unavailable};

/// The live holders of session `?1` for the node timeout `?2` (ms).
const HOLDERS: &str = session_lifecycle_store::sql_holders!(node_alive!("?2"));

impl PresenceStore for PostgresStore {
    fn set_presence(
        &self,
        session: SessionId,
        node: &str,
        holds: bool,
        now: Timestamp,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        let node = node.to_owned();
        Box::pin(async move {
            let client = self.client().await?;
            let id = session.to_string();
            if holds {
                client
                    .execute(pg(statements::HOLD), &[&id, &node])
                    .await
                    .map_err(unavailable)?;
            } else {
                // Seen first: never a moment where neither the hold nor its liveness counts.
                client
                    .execute(pg(statements::SEEN), &[&id, &ms(now)])
                    .await
                    .map_err(unavailable)?;
                client
                    .execute(pg(statements::LET_GO), &[&id, &node])
                    .await
                    .map_err(unavailable)?;
            }
            Ok(())
        })
    }

    fn clear_presence(&self, node: &str, now: Timestamp) -> BoxFuture<'_, Result<(), StoreError>> {
        let node = node.to_owned();
        Box::pin(async move {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(unavailable)?;
            let_go_of(&tx, &node, now).await?;
            tx.commit().await.map_err(unavailable)
        })
    }

    fn presence(
        &self,
        session: SessionId,
        _now: Timestamp,
        node_timeout: Duration,
    ) -> BoxFuture<'_, Result<Vec<String>, StoreError>> {
        Box::pin(async move {
            let client = self.client().await?;
            let rows = client
                .query(
                    pg(HOLDERS),
                    &[&session.to_string(), &duration_ms(node_timeout)],
                )
                .await
                .map_err(unavailable)?;
            rows.iter().map(|r| col::<String>(r, 0)).collect()
        })
    }

    fn watch_ends<'a>(&'a self, ended: &'a (dyn Fn(SessionId) + Send + Sync)) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let heard = |payload: &str| {
                if let Ok(id) = payload.parse::<SessionId>() {
                    ended(id);
                }
            };
            loop {
                if let Err(e) = self.listen(ENDS_CHANNEL, &heard, &|| {}).await {
                    tracing::warn!(error = %e, "listening for ends failed; reconnecting");
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    }
}

/// `node` holds no client sockets from `now` on; they were liveness until then.
pub(crate) async fn let_go_of<C: GenericClient>(
    c: &C,
    node: &str,
    now: Timestamp,
) -> Result<(), StoreError> {
    c.execute(pg(statements::SEEN_HELD_BY), &[&node, &ms(now)])
        .await
        .map_err(unavailable)?;
    c.execute(pg(statements::CLEAR_PRESENCE), &[&node])
        .await
        .map_err(unavailable)?;
    Ok(())
}
