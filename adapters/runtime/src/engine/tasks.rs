//! Everything the engine runs in the background, tracked: each loop is a `run_*` over a
//! `*_once` step that [`Engine::run_due`] calls too; every task (loops, release runs,
//! room-grace waits) is spawned on a [`TaskTracker`](tokio_util::task::TaskTracker) and
//! stops when the engine's cancellation token fires. [`Engine::shutdown`] cancels and waits
//! for all of them: nothing the engine started acts after it returns.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::time::Duration;

use session_lifecycle::{EndReason, SessionId, Status, Transition};

use super::{Background, DueReport, Engine, EngineError, Readiness, lock};
use crate::backend::{ResourceEvent, ResourceEventKind};

impl Engine {
    /// Spawns `task` as a tracked task that stops when the engine shuts down. Nothing is
    /// spawned once shutdown has begun cancelling.
    pub(super) fn spawn_tracked<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let cancel = self.inner.cancel.clone();
        if cancel.is_cancelled() {
            return;
        }
        self.inner.tasks.spawn(async move {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => {}
                _ = task => {}
            }
        });
    }

    /// Starts the background tasks: timers (sleeping until the next deadline), the
    /// periodic store sweep, the heartbeat, the release worker, the store's notifications
    /// of releases due here and of ends (for the sockets held here), and the resource
    /// event listener.
    pub fn spawn_background(&self) -> Background {
        let engine = self.clone();
        self.spawn_tracked(async move { engine.run_timers().await });
        let engine = self.clone();
        self.spawn_tracked(async move { engine.run_sweeper().await });
        let engine = self.clone();
        self.spawn_tracked(async move { engine.run_heartbeat().await });
        let engine = self.clone();
        self.spawn_tracked(async move { engine.run_reports().await });
        let engine = self.clone();
        self.spawn_tracked(async move { engine.run_usage_periods().await });
        let engine = self.clone();
        self.spawn_tracked(async move { engine.run_releases().await });
        // Ends on other instances of this node's sessions, pushed by the store.
        let engine = self.clone();
        self.spawn_tracked(async move {
            let inner = &engine.inner;
            let wake = || inner.releases_due.notify_one();
            inner.store.watch_releases(&inner.config.node, &wake).await;
        });
        // Sessions other instances place on this node, and the outcomes of those this
        // node's creates placed elsewhere, pushed by a store that places.
        if self.inner.store.places() {
            let engine = self.clone();
            self.spawn_tracked(async move { engine.run_placed_starts().await });
            let engine = self.clone();
            self.spawn_tracked(async move {
                let inner = &engine.inner;
                let wake = || inner.starts_due.notify_one();
                inner.store.watch_starts(&inner.config.node, &wake).await;
            });
            let engine = self.clone();
            self.spawn_tracked(async move {
                let inner = &engine.inner;
                let heard = |_: SessionId| inner.placed_changed.notify_waiters();
                inner.store.watch_placed(&heard).await;
            });
        }
        let engine = self.clone();
        self.spawn_tracked(async move { engine.run_events().await });
        let engine = self.clone();
        self.spawn_tracked(async move { engine.run_end_watch().await });
        // Releases left by an earlier run go first.
        self.inner.releases_due.notify_one();
        Background {
            tasks: self.inner.tasks.clone(),
        }
    }

    /// Ends the sessions whose resources reported events so far (an avatar server that
    /// exited on its own). Part of [`run_due`](Self::run_due).
    async fn events_once(&self) -> Result<u32, EngineError> {
        let mut handled = 0;
        loop {
            let event = {
                let mut rx = lock(&self.inner.events_rx);
                match rx.as_mut().map(|rx| rx.try_recv()) {
                    Some(Ok(event)) => event,
                    _ => break,
                }
            };
            self.handle_event(event).await?;
            handled += 1;
        }
        Ok(handled)
    }

    /// The resource event listener.
    async fn run_events(&self) {
        let Some(mut rx) = lock(&self.inner.events_rx).take() else {
            return;
        };
        while let Some(event) = rx.recv().await {
            if let Err(e) = self.handle_event(event).await {
                tracing::warn!(session = %event.session, error = %e, "handling a resource event failed");
            }
        }
    }

    /// What a resource event does: ends its session, or records it ready (`ready_at` and
    /// its `session.ready` event, once, while it is started).
    async fn handle_event(&self, event: ResourceEvent) -> Result<(), EngineError> {
        match event.kind {
            ResourceEventKind::Ends(reason) => {
                self.end_internal(event.session, reason).await.map(|_| ())
            }
            ResourceEventKind::Ready => {
                // Ready as of now, written however long the store takes: retried (in a
                // task of its own, so other events do not wait) until it is written or
                // the session is gone.
                let now = self.inner.clock.now();
                let engine = self.clone();
                self.inner.tasks.spawn(async move {
                    let mut wait = Duration::from_millis(250);
                    loop {
                        match engine.inner.store.record_ready(event.session, now).await {
                            Ok(written) => {
                                if written {
                                    tracing::info!(session = %event.session, "avatar server ready");
                                }
                                return;
                            }
                            Err(e) if e.is_unavailable() && !engine.inner.closing.load(Ordering::SeqCst) => {
                                tracing::warn!(session = %event.session, error = %e, "recording readiness failed; retrying");
                                engine.inner.clock.sleep(wait).await;
                                wait = (wait * 2).min(Duration::from_secs(5));
                            }
                            Err(e) => {
                                tracing::warn!(session = %event.session, error = %e, "recording readiness failed");
                                return;
                            }
                        }
                    }
                });
                Ok(())
            }
        }
    }

    /// Does everything due now, and waits for it: ends sessions whose resources reported
    /// events (an avatar server that exited), ends sessions whose timers are due, ends
    /// what the store sweep finds (expired, orphaned: also sessions this engine had no
    /// timer for), and runs every due release. The same steps the background loops run;
    /// tests with a [`ManualClock`](crate::ManualClock) call this instead.
    pub async fn run_due(&self) -> Result<DueReport, EngineError> {
        self.events_once().await?;
        let mut report = self.timers_once().await;
        report.add(self.sweep_once().await?);
        report.add(self.releases_once().await?);
        report.usage_closed += self.usage_once().await?;
        Ok(report)
    }

    /// Stops taking sessions, ends every started session this engine tracks with
    /// `shutdown`, waits (up to `deadline`, on the engine's clock) for this node's releases
    /// to finish, then cancels every task and waits for them all. Nothing the engine
    /// started acts after this returns; releases left unfinished run on the node's next
    /// start. Returns the number of sessions it ended.
    pub async fn shutdown(&self, deadline: Duration) -> Result<u32, EngineError> {
        let inner = &self.inner;
        inner.closing.store(true, Ordering::SeqCst);
        // Counted from now, as time passes.
        let give_up = inner.clock.sleep(deadline);
        let ids: Vec<SessionId> = self
            .timers()
            .iter()
            .filter(|s| s.status() == Status::Started)
            .map(|s| *s.id())
            .collect();
        let mut ended = 0;
        let mut result = Ok(());
        for id in ids {
            match self.end_internal(id, EndReason::Shutdown).await {
                Ok((_, Transition::Committed)) => ended += 1,
                Ok(_) | Err(EngineError::NotFound) => {}
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        if result.is_ok() {
            result = tokio::select! {
                biased;
                r = self.settle_releases() => r,
                _ = give_up => {
                    tracing::warn!("shutdown deadline passed with releases still running; they run on the next start");
                    Ok(())
                }
            };
        }
        inner.cancel.cancel();
        for tracker in [&inner.tasks, &inner.release_tasks] {
            tracker.close();
            tracker.wait().await;
        }
        // Stopped on purpose: the cluster does not miss its heartbeat.
        self.report_within(true).await;
        result.map(|()| ended)
    }

    /// Starts draining: no new sessions start here (they answer
    /// [`EngineError::Draining`]); running ones continue, end as usual and release as
    /// usual. A load balancer reading readiness sends new sessions elsewhere.
    pub fn drain(&self) {
        self.inner.draining.store(true, Ordering::SeqCst);
        self.inner.closing.store(true, Ordering::SeqCst);
        tracing::info!(
            sessions = self.active_sessions(),
            "draining: no new sessions here; running ones continue"
        );
        // Said at once, not at the next heartbeat: the fleet's creates stop coming here.
        let engine = self.clone();
        self.spawn_tracked(async move { engine.report_within(false).await });
    }

    /// Whether this node can take a new session of the default size now: not draining,
    /// its store reachable, and every backend with room (see
    /// [`ResourceBackend::room_for`](crate::ResourceBackend::room_for)).
    pub async fn readiness(&self) -> Readiness {
        if self.is_draining() {
            return Readiness::Draining;
        }
        if let Err(e) = self.inner.store.ping().await {
            return Readiness::StoreUnreachable(e.to_string());
        }
        for backend in &self.inner.backends {
            match backend.room_for(Default::default()).await {
                Ok(()) => {}
                Err(crate::AcquireError::CapacityExhausted(why)) => {
                    return Readiness::NoCapacity(why);
                }
                Err(crate::AcquireError::Failed(why)) => {
                    return Readiness::NoCapacity(format!("{}: {why}", backend.name()));
                }
            }
        }
        Readiness::Ready
    }

    /// Whether this node is draining.
    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::SeqCst)
    }

    /// Waits until this node runs no started session, or `timeout` passes on the engine's
    /// clock. Whether it drained.
    pub async fn wait_drained(&self, timeout: Duration) -> bool {
        let inner = &self.inner;
        let give_up = inner.clock.now().saturating_add(timeout);
        loop {
            if self.active_sessions() == 0 {
                return true;
            }
            let now = inner.clock.now();
            if now >= give_up {
                return false;
            }
            let next = now.saturating_add(Duration::from_millis(100)).min(give_up);
            inner.clock.sleep_until(next).await;
        }
    }

    /// Stops for an in-place upgrade: takes no new sessions, ends none, releases nothing,
    /// and stops every task the engine started. The avatar servers and everything the
    /// sessions hold stay as they are; the next run of the same node (same node id, same
    /// store) takes them back before it serves: timers, processes, GPU shares and the
    /// releases it owes. It must come back within the node timeout, or other instances
    /// take its sessions over (`node_lost`). Returns the number of sessions left running.
    pub async fn handover(&self) -> usize {
        let inner = &self.inner;
        inner.closing.store(true, Ordering::SeqCst);
        inner.cancel.cancel();
        for tracker in [&inner.tasks, &inner.release_tasks] {
            tracker.close();
            tracker.wait().await;
        }
        let running = self.active_sessions();
        // Stopped on purpose, its sessions still running: missed if it does not return.
        self.report_within(true).await;
        tracing::info!(
            sessions = running,
            "handed over: sessions and their resources keep running for the next start"
        );
        running
    }

    /// Runs this node's due releases until none is due or running; waits for a pending
    /// retry's time when one is left.
    async fn settle_releases(&self) -> Result<(), EngineError> {
        let inner = &self.inner;
        loop {
            let pass = self.releases_once().await?;
            // Runs the background worker claimed before this pass.
            inner.release_tasks.close();
            inner.release_tasks.wait().await;
            inner.release_tasks.reopen();
            let retry = lock(&inner.releases).next_retry.take();
            match retry {
                Some(at) => inner.clock.sleep_until(at).await,
                None if pass.released + pass.release_failures > 0 => {}
                None => return Ok(()),
            }
        }
    }
}
