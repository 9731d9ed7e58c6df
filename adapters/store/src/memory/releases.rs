//! The reference store's release queue: claims per session, progress recorded, and the
//! wake-up when one may have become due.

use super::*;

impl ReleaseQueue for MemoryStore {
    fn claim_releases(
        &self,
        node: &str,
        now: Timestamp,
        lease: Duration,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<SessionRecord>, StoreError>> {
        let mut state = self.state();
        let mut due: Vec<(Timestamp, SessionId)> = state
            .sessions
            .iter()
            .filter(|(_, s)| s.node == node)
            .filter(|(_, s)| s.claimed_until.is_none_or(|until| until <= now))
            .filter_map(|(id, s)| s.release_due_at.filter(|at| *at <= now).map(|at| (at, *id)))
            .collect();
        due.sort();
        let mut out = Vec::new();
        for (_, id) in due.into_iter().take(limit as usize) {
            if let Some(s) = state.sessions.get_mut(&id) {
                s.claimed_by = Some(node.to_owned());
                s.claimed_until = Some(now.saturating_add(lease));
                match s.record(&id) {
                    Ok(record) => out.push(record),
                    Err(e) => return ready(Err(e)),
                }
            }
        }
        ready(Ok(out))
    }

    fn record_release(
        &self,
        node: &str,
        progress: ReleaseProgress,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        let mut state = self.state();
        let Some(s) = state.sessions.get_mut(&progress.session) else {
            return ready(Ok(()));
        };
        // As in the SQL stores: what happened to a resource is recorded whoever ran it (a
        // node back from the dead reports a release it did make), the session's own release
        // schedule and claim only by the node that runs it.
        let runs_it = s.node == node;
        if let Some(attempt) = progress.attempt
            && let Some(r) = s.resources.iter_mut().find(|r| {
                r.resource == attempt.resource
                    && !matches!(r.release, ReleaseState::Released { .. })
            })
        {
            r.release = attempt.release;
            if matches!(attempt.release, ReleaseState::Released { .. }) {
                r.note = Some(match (&r.note, r.lost) {
                    (Some(lost), true) => format!("{lost}{RELEASED_ON_RETURN}{}", attempt.note),
                    _ => attempt.note,
                });
                r.last_error = None;
            } else {
                r.last_error = Some(attempt.note);
            }
        }
        if runs_it {
            s.release_due_at = progress.next_release_at;
            s.claimed_until = progress.keep_claim_until;
            s.claimed_by = progress.keep_claim_until.map(|_| node.to_owned());
        }
        let last_release = s.resources.iter().filter_map(|r| match r.release {
            ReleaseState::Released { at } => Some(at),
            _ => None,
        });
        let released_at = last_release.max();
        if s.ending.is_some()
            && s.resources
                .iter()
                .all(|r| matches!(r.release, ReleaseState::Released { .. }))
            && let Some(at) = released_at
        {
            let (tenant, callback) = (s.tenant.clone(), s.callback_url.clone());
            state.outbox.event(
                progress.session,
                &tenant,
                EventKind::Released,
                at,
                callback.as_deref(),
            );
        }
        ready(Ok(()))
    }

    fn drop_claims(&self, node: &str) -> BoxFuture<'_, Result<(), StoreError>> {
        let mut state = self.state();
        for s in state.sessions.values_mut() {
            if s.claimed_by.as_deref() == Some(node) {
                s.claimed_by = None;
                s.claimed_until = None;
            }
        }
        ready(Ok(()))
    }

    fn watch_releases<'a>(
        &'a self,
        node: &'a str,
        wake: &'a (dyn Fn() + Send + Sync),
    ) -> BoxFuture<'a, ()> {
        let mut due = self.due.subscribe();
        Box::pin(async move {
            loop {
                match due.recv().await {
                    Ok(due_node) if due_node == node => wake(),
                    Ok(_) => {}
                    // Missed some: one of them may have been ours.
                    Err(broadcast::error::RecvError::Lagged(_)) => wake(),
                    Err(broadcast::error::RecvError::Closed) => std::future::pending::<()>().await,
                }
            }
        })
    }
}
