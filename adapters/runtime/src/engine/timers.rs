//! This node's timers: the expiry and orphan deadlines of the started sessions it runs, in
//! a core table. The table hands out a session whose deadline passed; the engine ends it in
//! the store, and only then in the table. A store that cannot be reached leaves the timer
//! armed for a later try; a session that proves alive elsewhere gets its timer back.

use session_lifecycle::{EndReason, ReleaseOutcome, SessionId, Status, Timestamp, Work};

use super::{DueReport, Engine, EngineError, STORE_RETRY};

/// A node timeout no node exceeds: every holder counts, dead or alive.
const ANY_HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(100 * 365 * 24 * 3600);

/// What the store says of a session whose orphan timer fired here.
enum Liveness {
    /// Started, and not silent for the orphan timeout: a liveness signal reached another
    /// instance, or part of the silence was an outage of this instance's store. Alive as if
    /// last seen at this time.
    SeenElsewhere(Timestamp),
    /// Ended already (elsewhere), for this reason.
    Ended(EndReason),
    /// No newer signal: an orphan.
    Silent,
    /// The store could not say.
    Unknown,
}

impl Engine {
    /// Ends the sessions whose timers are due now, durably first. The timer loop runs this
    /// at every deadline; [`run_due`](Engine::run_due) too.
    pub(super) async fn timers_once(&self) -> DueReport {
        let now = self.inner.clock.now();
        let due: Vec<(SessionId, EndReason)> = {
            let mut timers = self.timers();
            let mut due = Vec::new();
            while let Some(work) = timers.poll(now) {
                match work {
                    Work::End { session, reason } => due.push((session, reason)),
                    // The table holds no resources; nothing is ever handed out for release.
                    Work::Release { session, resource } => {
                        let _ = timers.handle_release(
                            now,
                            &session,
                            resource,
                            ReleaseOutcome::Released,
                        );
                    }
                }
            }
            due
        };
        let mut report = DueReport::default();
        let judging = self.may_judge(now).await;
        for (id, reason) in due {
            if reason == EndReason::Orphaned {
                if !judging {
                    // Silence is not judged during an outage or while it settles.
                    self.retry_timer_later(id, now);
                    continue;
                }
                match self.liveness(id, now).await {
                    Liveness::SeenElsewhere(last_seen) => {
                        let mut timers = self.timers();
                        let _ = timers.touch(last_seen, &id);
                        let _ = timers.defer_end(&id, now);
                        continue;
                    }
                    Liveness::Ended(reason) => {
                        let _ = self.timers().end(now, &id, reason);
                        continue;
                    }
                    Liveness::Unknown => {
                        self.retry_timer_later(id, now);
                        continue;
                    }
                    Liveness::Silent => {}
                }
            }
            match self.end_internal(id, reason).await {
                Ok((_, session_lifecycle::Transition::Committed)) => {
                    report.count(reason, &self.inner.metrics);
                }
                Ok(_) => {}
                Err(EngineError::NotFound) => {
                    // Gone from the store: nothing left to time.
                    let _ = self.timers().end(now, &id, reason);
                }
                Err(e) => {
                    tracing::warn!(session = %id, error = %e, "ending a due session failed; its timer stays armed");
                    self.retry_timer_later(id, now);
                }
            }
        }
        if !report.is_empty() {
            self.inner.timers_changed.notify_one();
        }
        report
    }

    /// Puts back the timer of a session the store could not end or judge now.
    fn retry_timer_later(&self, id: SessionId, now: Timestamp) {
        let _ = self
            .timers()
            .defer_end(&id, now.saturating_add(STORE_RETRY));
    }

    /// Whether a session whose orphan timer fired here had a liveness signal the timer did
    /// not see (a heartbeat or WebSocket served by another instance), or ended elsewhere.
    async fn liveness(&self, id: SessionId, now: Timestamp) -> Liveness {
        let record = match self.inner.store.get(id).await {
            Ok(Some(record)) => record,
            Ok(None) => return Liveness::Silent,
            Err(_) => return Liveness::Unknown,
        };
        let session = record.session;
        if let Some(reason) = session.end_reason() {
            return Liveness::Ended(reason);
        }
        // Time during which this instance could not reach the store is not silence.
        let last_seen = session.last_seen_at();
        let unreachable = self.unreachable_within(last_seen, now);
        let silence = now
            .saturating_duration_since(last_seen)
            .saturating_sub(unreachable);
        let timeout = self.inner.config.policy.orphan_timeout;
        if session.status() == Status::Started && silence >= timeout {
            // A client socket held by a live node, here or elsewhere, is liveness now.
            if self.holds_socket(&id) {
                return Liveness::SeenElsewhere(now);
            }
            // Any node's hold counts, a dead node's too, as it does for the store's sweep
            // (`due`): its holds are liveness until it is taken over, which lets go of them
            // and counts the session as seen then.
            return match self.inner.store.presence(id, now, ANY_HEARTBEAT).await {
                Ok(holders) if holders.is_empty() => Liveness::Silent,
                Ok(_) => Liveness::SeenElsewhere(now),
                Err(_) => Liveness::Unknown,
            };
        }
        if session.status() == Status::Started && silence < timeout {
            // Alive until its silence reaches the timeout: as if last seen that much later.
            Liveness::SeenElsewhere(now.saturating_sub(silence))
        } else {
            Liveness::Silent
        }
    }

    /// The timer loop: sleeps until the table's next deadline (or a change), then ends
    /// what is due.
    pub(super) async fn run_timers(&self) {
        loop {
            let next = self.timers().next_deadline();
            let changed = self.inner.timers_changed.notified();
            match next {
                Some(deadline) => {
                    tokio::select! {
                        biased;
                        _ = self.inner.clock.sleep_until(deadline) => {}
                        _ = changed => continue,
                    }
                }
                None => {
                    changed.await;
                    continue;
                }
            }
            self.timers_once().await;
        }
    }
}

impl DueReport {
    pub(super) fn count(&mut self, reason: EndReason, metrics: &crate::metrics::Metrics) {
        match reason {
            EndReason::Expired => self.expired += 1,
            EndReason::Orphaned => {
                self.orphaned += 1;
                metrics.orphan_found();
            }
            _ => {}
        }
    }

    fn is_empty(&self) -> bool {
        *self == DueReport::default()
    }
}
