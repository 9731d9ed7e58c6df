//! The release queue: claiming sessions whose next release is due, recording each attempt.

use std::time::Duration;

use session_lifecycle::Timestamp;
use session_lifecycle_store::rows::{
    RELEASED_ON_RETURN, duration_ms, event_sequence, millis as ms, release_columns,
};
use session_lifecycle_store::sql::{postgres as pg, statements};
use session_lifecycle_store::{
    BoxFuture, ReleaseProgress, ReleaseQueue, SessionRecord, StoreError,
};

use crate::{PostgresStore, RELEASES_CHANNEL, records, resource_key, unavailable};

impl ReleaseQueue for PostgresStore {
    fn claim_releases(
        &self,
        node: &str,
        now: Timestamp,
        lease: Duration,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<SessionRecord>, StoreError>> {
        let node = node.to_owned();
        Box::pin(async move {
            let client = self.client().await?;
            // One statement: the claim and the claimed records, from one snapshot.
            let statement = client
                .prepare_cached(concat!(
                    "WITH claimed AS (
                        UPDATE sessions SET release_claimed_by = $2,
                                            release_claimed_until = $1 + $3
                        WHERE id IN (
                            SELECT id FROM sessions
                            WHERE node = $2 AND release_due_at <= $1
                              AND (release_claimed_until IS NULL OR release_claimed_until <= $1)
                            ORDER BY release_due_at, id LIMIT $4
                            FOR UPDATE SKIP LOCKED)
                        RETURNING *)
                     SELECT ",
                    record_columns!(),
                    " FROM claimed s
                     LEFT JOIN resources r ON r.session_id = s.id
                     ORDER BY s.release_due_at, s.id"
                ))
                .await
                .map_err(unavailable)?;
            let rows = client
                .query(
                    &statement,
                    &[&ms(now), &node, &duration_ms(lease), &i64::from(limit)],
                )
                .await
                .map_err(unavailable)?;
            records(&rows)
        })
    }

    fn record_release(
        &self,
        node: &str,
        progress: ReleaseProgress,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        let node = node.to_owned();
        Box::pin(async move {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(unavailable)?;
            let id = progress.session.to_string();
            if let Some(a) = &progress.attempt {
                let (kind, handle) = resource_key(&a.resource);
                let (state, attempts, retry_at, released_at) = release_columns(a.release);
                tx.execute(
                    pg(statements::RECORD_ATTEMPT),
                    &[
                        &id,
                        &kind,
                        &handle,
                        &state,
                        &(attempts as i32),
                        &retry_at,
                        &released_at,
                        &(state == "released"),
                        &a.note,
                        &RELEASED_ON_RETURN,
                    ],
                )
                .await
                .map_err(unavailable)?;
                if let session_lifecycle::ReleaseState::Released { at } = a.release {
                    tx.execute(
                        pg(statements::EVENT_RELEASED),
                        &[
                            &id,
                            &event_sequence(session_lifecycle::EventKind::Released),
                            &ms(at),
                        ],
                    )
                    .await
                    .map_err(unavailable)?;
                }
            }
            tx.execute(
                pg(statements::RECORD_SESSION),
                &[
                    &id,
                    &node,
                    &progress.next_release_at.map(ms),
                    &progress.keep_claim_until.map(ms),
                ],
            )
            .await
            .map_err(unavailable)?;
            tx.commit().await.map_err(unavailable)
        })
    }

    fn watch_releases<'a>(
        &'a self,
        node: &'a str,
        wake: &'a (dyn Fn() + Send + Sync),
    ) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let heard = |due_node: &str| {
                if due_node == node {
                    wake();
                }
            };
            loop {
                // Releases notified before LISTEN took effect are found by `wake`.
                if let Err(e) = self.listen(RELEASES_CHANNEL, &heard, wake).await {
                    tracing::warn!(error = %e, "listening for releases failed; reconnecting");
                }
                // Whatever was notified while not listening is found by this wake-up.
                wake();
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    }

    fn drop_claims(&self, node: &str) -> BoxFuture<'_, Result<(), StoreError>> {
        let node = node.to_owned();
        Box::pin(async move {
            let client = self.client().await?;
            client
                .execute(pg(statements::DROP_CLAIMS), &[&node])
                .await
                .map_err(unavailable)?;
            Ok(())
        })
    }
}
