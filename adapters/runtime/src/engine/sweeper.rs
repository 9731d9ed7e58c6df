//! The safety net: the store sweep ends what in-memory timers cannot see (sessions of
//! other instances, of dead nodes, of a crashed run), and this node's heartbeat keeps other
//! instances from taking its sessions over.

use session_lifecycle::{EndReason, Transition};

use super::{DueReport, Engine, EngineError};

impl Engine {
    /// One sweep: refreshes room presence as liveness, takes over dead nodes, and ends the
    /// sessions the store finds due (expired, orphaned), most overdue first.
    pub(super) async fn sweep_once(&self) -> Result<DueReport, EngineError> {
        let inner = &self.inner;
        let mut report = DueReport::default();
        // Room presence is liveness: refresh it before looking for orphans.
        let now = inner.clock.now();
        let present = inner.store.touch_present(now).await?;
        if !present.is_empty() {
            let mut timers = self.timers();
            for id in &present {
                let _ = timers.touch(now, id);
            }
            drop(timers);
            inner.timers_changed.notify_one();
        }
        let taken_over = inner
            .store
            .end_dead_nodes(
                &inner.config.node,
                now,
                inner.config.node_timeout,
                inner.config.sweep_batch,
            )
            .await?;
        if !taken_over.is_empty() {
            tracing::warn!(
                sessions = taken_over.len(),
                "ended the sessions of a dead node (orphaned); its resources are recorded as lost with it"
            );
            for _ in &taken_over {
                report.count(EndReason::Orphaned, &inner.metrics);
                inner.metrics.session_ended(EndReason::Orphaned);
            }
        }
        loop {
            let now = inner.clock.now();
            let due = inner
                .store
                .due(
                    now,
                    inner.config.policy.orphan_timeout,
                    inner.config.sweep_batch,
                )
                .await?;
            let full = due.len() >= inner.config.sweep_batch as usize;
            for (id, reason) in due {
                if let (_, Transition::Committed) = self.end_internal(id, reason).await? {
                    report.count(reason, &inner.metrics);
                }
            }
            if !full {
                return Ok(report);
            }
        }
    }

    /// Records that this node is alive.
    pub(super) async fn heartbeat_once(&self) -> Result<(), EngineError> {
        let inner = &self.inner;
        inner
            .store
            .node_alive(&inner.config.node, inner.clock.now())
            .await?;
        Ok(())
    }

    /// The sweep loop: a sweep every `sweep_interval`, then a look for releases (retries
    /// whose wake-up was lost, and releases owed from other runs).
    pub(super) async fn run_sweeper(&self) {
        let inner = &self.inner;
        loop {
            let next = inner
                .clock
                .now()
                .saturating_add(inner.config.policy.sweep_interval);
            inner.clock.sleep_until(next).await;
            if let Err(e) = self.sweep_once().await {
                tracing::warn!(error = %e, "sweep failed");
            }
            inner.releases_due.notify_one();
        }
    }

    /// The heartbeat loop.
    pub(super) async fn run_heartbeat(&self) {
        let inner = &self.inner;
        loop {
            let next = inner
                .clock
                .now()
                .saturating_add(inner.config.node_heartbeat);
            if let Err(e) = self.heartbeat_once().await {
                tracing::warn!(error = %e, "recording this node's heartbeat failed");
            }
            inner.clock.sleep_until(next).await;
        }
    }
}
