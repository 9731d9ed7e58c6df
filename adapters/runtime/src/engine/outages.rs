//! What the engine does about store outages: liveness kept in memory meanwhile is written
//! first when the store is back, timers of sessions that ended elsewhere meanwhile are
//! dropped, releases owed are looked for at once, and no silence is judged until the
//! outage has settled (see `health`).

use std::time::Duration;

use session_lifecycle::{SessionId, Status, Timestamp};

use super::{Engine, lock};
use crate::simulation::PlantedBug;
use session_lifecycle_store::ListQuery;

impl Engine {
    /// Whether silence may be judged now: the store is reachable, the outage (if any) has
    /// settled, and the liveness kept during it is written.
    pub(super) async fn may_judge(&self, now: Timestamp) -> bool {
        let inner = &self.inner;
        if crate::simulation::planted(PlantedBug::JudgeDuringOutage) {
            return true;
        }
        let judging = {
            let mut health = lock(&inner.health);
            // Both clocks read together: `now` may be a while old.
            health.observe_clock(inner.clock.now(), inner.clock.monotonic());
            health.may_judge(now, inner.config.outage_settle)
        };
        if !judging {
            return false;
        }
        self.write_pending_touches().await
    }

    /// How far back from `now` silence of `silence` reaches once time this instance could
    /// not reach the store is left out (see `health`).
    pub(super) fn reachable_cover(&self, now: Timestamp, silence: Duration) -> Duration {
        if crate::simulation::planted(PlantedBug::JudgeDuringOutage) {
            return silence;
        }
        lock(&self.inner.health).cover(now, silence)
    }

    /// Time within `from..to` during which this instance could not reach the store.
    pub(super) fn unreachable_within(&self, from: Timestamp, to: Timestamp) -> Duration {
        if crate::simulation::planted(PlantedBug::JudgeDuringOutage) {
            return Duration::ZERO;
        }
        lock(&self.inner.health).unreachable_within(from, to)
    }

    /// Writes the liveness received while the store was unreachable. Whether all of it is
    /// written.
    async fn write_pending_touches(&self) -> bool {
        let inner = &self.inner;
        let pending: Vec<(SessionId, Timestamp)> = lock(&inner.pending_touches)
            .iter()
            .map(|(id, at)| (*id, *at))
            .collect();
        for (id, at) in pending {
            match inner.store.touch(id, None, at).await {
                Ok(_) => {
                    let mut touches = lock(&inner.pending_touches);
                    if touches.get(&id) == Some(&at) {
                        touches.remove(&id);
                    }
                }
                Err(e) => {
                    tracing::warn!(session = %id, error = %e, "writing liveness kept during an outage failed");
                    return false;
                }
            }
        }
        true
    }

    /// After an outage: writes the liveness kept meanwhile, drops the timers of this node's
    /// sessions that ended elsewhere meanwhile (a takeover), and wakes the release worker:
    /// what other instances ended here is released at once.
    pub(super) async fn after_outage(&self) {
        let inner = &self.inner;
        if !lock(&inner.health).take_recovery() {
            return;
        }
        tracing::info!("the store is reachable again");
        self.write_pending_touches().await;
        self.record_holds_again().await;
        let tracked: Vec<SessionId> = self
            .timers()
            .iter()
            .filter(|s| s.status() == Status::Started)
            .map(|s| *s.id())
            .collect();
        let mut started = std::collections::BTreeSet::new();
        let mut before = None;
        loop {
            let page = match inner
                .store
                .list(ListQuery {
                    tenant: None,
                    status: Some(Status::Started),
                    limit: 500,
                    before,
                    node: Some(inner.config.node.clone()),
                })
                .await
            {
                Ok(page) => page,
                Err(e) => {
                    tracing::warn!(error = %e, "looking at this node's sessions after an outage failed");
                    return;
                }
            };
            let Some(last) = page.last() else { break };
            before = Some(*last.session.id());
            started.extend(page.iter().map(|r| *r.session.id()));
        }
        let now = inner.clock.now();
        let mut gone = 0;
        for id in tracked.into_iter().filter(|id| !started.contains(id)) {
            if let Ok(Some(record)) = inner.store.get(id).await
                && let Some(reason) = record.session.end_reason()
            {
                let _ = self.timers().end(now, &id, reason);
                gone += 1;
            }
        }
        if gone > 0 {
            tracing::warn!(
                sessions = gone,
                "sessions of this node ended elsewhere while it could not reach the store; releasing their resources now"
            );
        }
        inner.timers_changed.notify_one();
        inner.releases_due.notify_one();
    }
}
