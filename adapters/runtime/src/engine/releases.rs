//! The release worker: drives the core's release rules against the store and the
//! backends.
//!
//! It claims *sessions* with a release due on this node (never single resources), loads
//! each into a core [`Session`], asks the core which resource is next, runs that release
//! with its deadline, hands the outcome back to the core and records what the core decided,
//! and goes on until the core says wait (a failure's backoff) or done. Different sessions
//! release in parallel; one session's resources never do. A crash at any point resumes at
//! the same resource: the claim lapses (or is dropped when the node restarts) and the
//! store still names that resource as the next one.

use std::time::Duration;

use session_lifecycle::{ReleaseOutcome, ReleaseStep, Resource, Session, SessionId, Timestamp};
use tokio::task::JoinHandle;

use super::{DueReport, Engine, EngineError, lock};
use crate::backend::{ReleaseError, ReleaseNote};
use session_lifecycle_store::{ReleaseAttempt, ReleaseProgress, SessionRecord};

/// Marks a session's release run as going on this node; dropped when the run ends, however
/// it ends.
pub(super) struct Running {
    engine: Engine,
    session: SessionId,
}

impl Drop for Running {
    fn drop(&mut self) {
        lock(&self.engine.inner.releases)
            .running
            .remove(&self.session);
    }
}

/// What one session's release run did.
#[derive(Debug, Clone, Copy, Default)]
struct RunReport {
    released: u32,
    failed: u32,
}

impl Engine {
    /// Claims the sessions with a release due on this node and starts a release run for
    /// each (tracked). Returns the runs, for callers that wait for them.
    pub(super) async fn claim_and_spawn_releases(
        &self,
    ) -> Result<Vec<JoinHandle<DueReport>>, EngineError> {
        let inner = &self.inner;
        self.write_unrecorded().await?;
        let now = inner.clock.now();
        let claimed = inner
            .store
            .claim_releases(
                &inner.config.node,
                now,
                inner.config.release_lease,
                inner.config.release_batch,
            )
            .await?;
        // A session still starting here (or releasing what it acquired last and never
        // recorded) is left claimed: its claim runs out and it is claimed again later, so
        // that no run waits here for it.
        let starting = lock(&inner.starting);
        let ready: Vec<SessionRecord> = claimed
            .into_iter()
            .filter(|record| !starting.contains_key(record.session.id()))
            .collect();
        drop(starting);
        Ok(ready
            .into_iter()
            .filter_map(|record| self.spawn_run(record))
            .collect())
    }

    /// Starts the release run of a session whose releases this node claimed, tracked;
    /// `None` if a run of that session is still going here. One run per session at a
    /// time, whatever the claim says: a claim's lease is on the wall clock, which may step
    /// forward past it while the run is still releasing.
    fn spawn_run(&self, record: SessionRecord) -> Option<JoinHandle<DueReport>> {
        let id = *record.session.id();
        if !lock(&self.inner.releases).running.insert(id) {
            return None;
        }
        let running = Running {
            engine: self.clone(),
            session: id,
        };
        Some(self.spawn_unguarded_run(record, Some(running)))
    }

    /// Spawns a release run; `running` marks it as the session's one run here until it
    /// ends (the planted bug [`PlantedBug::ReleaseWithoutClaim`] passes none).
    ///
    /// [`PlantedBug::ReleaseWithoutClaim`]: crate::simulation::PlantedBug
    pub(super) fn spawn_unguarded_run(
        &self,
        record: SessionRecord,
        running: Option<Running>,
    ) -> JoinHandle<DueReport> {
        let engine = self.clone();
        let cancel = self.inner.cancel.clone();
        self.inner.release_tasks.spawn(async move {
            let _running = running;
            tokio::select! {
                biased;
                // Cut short by shutdown: the claim is dropped when the node next starts,
                // and the (repeatable) release runs again then.
                _ = cancel.cancelled() => DueReport::default(),
                report = engine.release_session(record) => report,
            }
        })
    }

    /// Starts the release run of a session this node just ended and claimed with its end;
    /// [`releases_once`](Self::releases_once) waits for it too.
    pub(super) fn spawn_release_run(&self, record: SessionRecord) {
        if let Some(run) = self.spawn_run(record) {
            lock(&self.inner.releases).local_runs.push(run);
        }
    }

    /// Claims and runs every release due on this node now, and waits for the runs; claims
    /// again while a pass filled its batch. Part of [`run_due`](Engine::run_due).
    pub(super) async fn releases_once(&self) -> Result<DueReport, EngineError> {
        let mut report = DueReport::default();
        let local = std::mem::take(&mut lock(&self.inner.releases).local_runs);
        for run in local {
            match run.await {
                Ok(r) => report.add(r),
                Err(e) => tracing::error!(error = %e, "a release run died"),
            }
        }
        loop {
            let runs = self.claim_and_spawn_releases().await?;
            let full = runs.len() >= self.inner.config.release_batch as usize;
            for run in runs {
                match run.await {
                    Ok(r) => report.add(r),
                    Err(e) => tracing::error!(error = %e, "a release run died"),
                }
            }
            if !full {
                return Ok(report);
            }
        }
    }

    /// Runs the releases of one claimed session, one at a time in the core's order, until
    /// the core says wait or done.
    async fn release_session(&self, record: SessionRecord) -> DueReport {
        let inner = &self.inner;
        let mut session = record.session;
        let id = *session.id();
        // A start still acquiring this session's resources here finishes first: what it
        // acquires last is released first.
        let starting = lock(&inner.starting).get(&id).cloned();
        if let Some(starting) = starting {
            drop(starting.lock().await);
            // What the start attached meanwhile may be newer than the claimed record.
            match inner.store.get(id).await {
                Ok(Some(fresh)) => session = fresh.session,
                Ok(None) => return DueReport::default(),
                // The claim lapses and the session is claimed again.
                Err(_) => return DueReport::default(),
            }
        }
        let mut run = RunReport::default();
        loop {
            let now = inner.clock.now();
            let Some(resource) = session.poll_release(now) else {
                // Claimed for a time that has since moved (the store's due time was older
                // than the core's answer): record the core's answer and give the claim up.
                let progress = ReleaseProgress {
                    session: id,
                    attempt: None,
                    next_release_at: session.next_release_at(),
                    keep_claim_until: None,
                };
                self.record_progress(progress).await;
                self.after_run(&session, now);
                break;
            };
            let started = now;
            let result = self.run_backend_release(id, resource).await;
            let now = inner.clock.now();
            let (outcome, note) = match result {
                Ok(note) => {
                    run.released += 1;
                    inner
                        .metrics
                        .release_done(now.saturating_duration_since(started));
                    lock(&inner.releases).failing.remove(&(id, resource));
                    tracing::info!(session = %id, ?resource, %note, "resource released");
                    (ReleaseOutcome::Released, note.to_string())
                }
                Err(e) => {
                    run.failed += 1;
                    inner.metrics.release_failed();
                    lock(&inner.releases).failing.insert((id, resource));
                    if e.is_permanent() {
                        tracing::error!(session = %id, ?resource, error = %e, "release failed and cannot work as things are; retrying after the backoff, the resource stays held");
                    } else {
                        tracing::warn!(session = %id, ?resource, error = %e, "release failed; retrying after the backoff");
                    }
                    (ReleaseOutcome::Failed, e.to_string())
                }
            };
            // The core decides what the outcome means: released for good, or pending with
            // its backoff; and what comes next.
            if session
                .handle_release(now, resource, outcome, &inner.config.policy)
                .is_err()
            {
                tracing::error!(session = %id, ?resource, "a release outcome was refused by the core");
                break;
            }
            let next = session.release_step(now);
            let go_on = matches!(next, ReleaseStep::Due(_));
            let release = session
                .resources()
                .iter()
                .find(|r| r.resource == resource)
                .map(|r| r.release);
            let Some(release) = release else { break };
            let keep_claim_until = go_on.then(|| now.saturating_add(inner.config.release_lease));
            let progress = ReleaseProgress {
                session: id,
                attempt: Some(ReleaseAttempt {
                    resource,
                    release,
                    note,
                }),
                next_release_at: session.next_release_at(),
                keep_claim_until,
            };
            if !self.record_progress(progress).await {
                // Written before the next claim, which picks the session up again.
                break;
            }
            if keep_claim_until.is_none() {
                self.after_run(&session, now);
                break;
            }
        }
        DueReport {
            released: run.released,
            release_failures: run.failed,
            ..DueReport::default()
        }
    }

    /// After a run stops: a session waiting for a retry wakes the worker at that time.
    fn after_run(&self, session: &Session, now: Timestamp) {
        if let ReleaseStep::WaitUntil(at) = session.release_step(now) {
            let mut book = lock(&self.inner.releases);
            book.next_retry = Some(book.next_retry.map_or(at, |t| t.min(at)));
            drop(book);
            self.inner.releases_due.notify_one();
        }
    }

    /// Runs one release through its backend, bounded by the kind's release deadline.
    pub(super) async fn run_backend_release(
        &self,
        session: SessionId,
        resource: Resource,
    ) -> Result<ReleaseNote, ReleaseError> {
        let inner = &self.inner;
        let Some(backend) = inner.by_kind.get(&resource.kind) else {
            return Err(ReleaseError::permanent(format!(
                "no backend for resource kind {}",
                resource.kind.0
            )));
        };
        let deadline = inner
            .release_deadlines
            .get(&resource.kind)
            .copied()
            .unwrap_or(Duration::from_secs(30));
        tokio::select! {
            biased;
            result = backend.release(session, resource) => result,
            _ = inner.clock.sleep(deadline) => Err(ReleaseError::transient(format!(
                "{} release gave no answer within {} ms",
                backend.name(),
                deadline.as_millis()
            ))),
        }
    }

    /// Records a run's progress. When the store cannot take it (it may be restarting), the
    /// progress is kept in memory, with the claim given up, and written before the next
    /// claim; the run stops meanwhile. Whether it was recorded now.
    async fn record_progress(&self, progress: ReleaseProgress) -> bool {
        let inner = &self.inner;
        match inner
            .store
            .record_release(&inner.config.node, progress.clone())
            .await
        {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(session = %progress.session, error = %e, "recording a release failed; it is written before the next claim");
                lock(&inner.releases).unrecorded.push(ReleaseProgress {
                    keep_claim_until: None,
                    ..progress
                });
                false
            }
        }
    }

    /// Writes the progress that could not be recorded earlier. Fails, keeping the rest,
    /// while the store is still unreachable.
    async fn write_unrecorded(&self) -> Result<(), EngineError> {
        let inner = &self.inner;
        let pending = std::mem::take(&mut lock(&inner.releases).unrecorded);
        let mut left = pending.into_iter();
        while let Some(progress) = left.next() {
            if let Err(e) = inner
                .store
                .record_release(&inner.config.node, progress.clone())
                .await
            {
                let mut book = lock(&inner.releases);
                book.unrecorded.push(progress);
                book.unrecorded.extend(left);
                return Err(e.into());
            }
        }
        Ok(())
    }

    /// The release worker: claims whenever woken (an end here, a notification from the
    /// store, a retry time) or every `release_poll`.
    pub(super) async fn run_releases(&self) {
        let inner = &self.inner;
        loop {
            if let Err(e) = self.claim_and_spawn_releases().await {
                tracing::warn!(error = %e, "claiming releases failed");
            }
            let now = inner.clock.now();
            let mut wake = now.saturating_add(inner.config.release_poll);
            {
                let mut book = lock(&inner.releases);
                let next = &mut book.next_retry;
                match *next {
                    Some(at) if at <= now => *next = None,
                    Some(at) => wake = wake.min(at),
                    None => {}
                }
            }
            tokio::select! {
                biased;
                _ = inner.releases_due.notified() => {}
                _ = inner.clock.sleep(wake.saturating_duration_since(now)) => {}
            }
        }
    }
}
