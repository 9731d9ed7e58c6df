//! Releases claimed per session on its node, their progress recorded, and the wake-up when
//! one may have become due.

use super::*;

impl ReleaseQueue for SqliteStore {
    fn claim_releases(
        &self,
        node: &str,
        now: Timestamp,
        lease: Duration,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<SessionRecord>, StoreError>> {
        let node = node.to_owned();
        Box::pin(self.inner.conns.write(move |c| {
            let lease_ms = duration_ms(lease);
            let mut ids: Vec<(i64, String)> = c
                .prepare_cached(
                    "UPDATE sessions SET release_claimed_by = ?2, release_claimed_until = ?1 + ?3
                     WHERE id IN (
                        SELECT id FROM sessions
                        WHERE node = ?2 AND release_due_at <= ?1
                          AND (release_claimed_until IS NULL OR release_claimed_until <= ?1)
                        ORDER BY release_due_at, id LIMIT ?4)
                     RETURNING release_due_at, id",
                )
                .and_then(|mut s| {
                    s.query_map(params![ms(now), node, lease_ms, i64::from(limit)], |r| {
                        Ok((r.get(0)?, r.get(1)?))
                    })?
                    .collect()
                })
                .map_err(db)?;
            // RETURNING keeps no order: most overdue first, then by id.
            ids.sort_unstable();
            let mut out = Vec::with_capacity(ids.len());
            for (_, id) in ids {
                if let Some(record) = get_record(c, &id)? {
                    out.push(record);
                }
            }
            Ok(out)
        }))
    }

    fn record_release(
        &self,
        node: &str,
        progress: ReleaseProgress,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        let node = node.to_owned();
        Box::pin(self.inner.conns.write(move |c| {
            let id = progress.session.to_string();
            if let Some(attempt) = &progress.attempt {
                let (kind, handle) = resource_key(&attempt.resource);
                let (state, attempts, retry_at, released_at) = release_columns(attempt.release);
                let released = state == "released";
                let released_at_time = match attempt.release {
                    session_lifecycle::ReleaseState::Released { at } => Some(at),
                    _ => None,
                };
                c.prepare_cached(statements::RECORD_ATTEMPT)
                    .and_then(|mut s| {
                        s.execute(params![
                            id,
                            kind,
                            handle,
                            state,
                            attempts,
                            retry_at,
                            released_at,
                            released,
                            attempt.note,
                            RELEASED_ON_RETURN,
                        ])
                    })
                    .map_err(db)?;
                if let Some(at) = released_at_time {
                    released_event(c, &id, at)?;
                }
            }
            let claimed_until = progress.keep_claim_until.map(ms);
            c.prepare_cached(statements::RECORD_SESSION)
                .and_then(|mut s| {
                    s.execute(params![
                        id,
                        node,
                        progress.next_release_at.map(ms),
                        claimed_until
                    ])
                })
                .map_err(db)?;
            Ok(())
        }))
    }

    fn watch_releases<'a>(
        &'a self,
        node: &'a str,
        wake: &'a (dyn Fn() + Send + Sync),
    ) -> BoxFuture<'a, ()> {
        let mut due = self.inner.releases_due.subscribe();
        Box::pin(async move {
            loop {
                match due.recv().await {
                    Ok(due_node) if due_node == node => wake(),
                    Ok(_) => {}
                    // Missed some: one of them may have been ours.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => wake(),
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        std::future::pending::<()>().await
                    }
                }
            }
        })
    }

    fn drop_claims(&self, node: &str) -> BoxFuture<'_, Result<(), StoreError>> {
        let node = node.to_owned();
        Box::pin(self.inner.conns.write(move |c| {
            c.prepare_cached(statements::DROP_CLAIMS)
                .and_then(|mut s| s.execute([&node]))
                .map_err(db)?;
            Ok(())
        }))
    }
}
