//! The safety net: the store sweep ends what in-memory timers cannot see (sessions of
//! other instances, of dead nodes, of a crashed run), and this node's heartbeat keeps other
//! instances from taking its sessions over.

use std::time::Duration;

use session_lifecycle::{EndReason, Timestamp, Transition};

use super::{DueReport, Engine, EngineError, lock};

/// An orphan timeout no session reaches: the sweep then finds expiries only.
const NEVER_ORPHANED: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

impl Engine {
    /// One sweep: refreshes room presence as liveness, takes over dead nodes, prunes the
    /// room rows of long-ended sessions, and ends the sessions the store finds due
    /// (expired, orphaned), most overdue first.
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
        // Silence is judged only with the store reachable and settled, and never counts
        // time this instance could not reach it (see `health`).
        let judging = self.may_judge(now).await;
        if judging {
            let node_timeout = self.reachable_cover(now, inner.config.node_timeout);
            let taken_over = inner
                .store
                .end_dead_nodes(
                    &inner.config.node,
                    now,
                    node_timeout,
                    inner.config.sweep_batch,
                )
                .await?;
            if !taken_over.is_empty() {
                tracing::warn!(
                    sessions = taken_over.len(),
                    "ended the sessions of a dead node (node_lost); its resources are recorded as lost with it"
                );
                for _ in &taken_over {
                    inner.metrics.session_ended(EndReason::NodeLost);
                }
                report.node_lost += taken_over.len() as u32;
            }
        }
        // Room rows of sessions ended longer than the retention ago: bounded tables.
        let cutoff = now.saturating_sub(inner.config.room_retention);
        inner
            .store
            .prune_rooms(cutoff, inner.config.sweep_batch)
            .await?;
        loop {
            let now = inner.clock.now();
            let orphan_timeout = if judging {
                self.reachable_cover(now, inner.config.policy.orphan_timeout)
            } else {
                // Expiries only.
                NEVER_ORPHANED
            };
            let due = inner
                .store
                .due(now, orphan_timeout, inner.config.sweep_batch)
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

    /// Records that this node is alive; after an outage, does what a recovery calls for.
    pub(super) async fn heartbeat_once(&self) -> Result<(), EngineError> {
        let inner = &self.inner;
        let now = inner.clock.now();
        inner.store.node_alive(&inner.config.node, now).await?;
        lock(&inner.node_self).last_heartbeat = Some(now);
        self.after_outage().await;
        Ok(())
    }

    /// The report loop: what this node says of itself, every `node_heartbeat`, on its own
    /// so that a slow GPU query or store write never delays the heartbeat.
    pub(super) async fn run_reports(&self) {
        let inner = &self.inner;
        loop {
            let next = inner.clock.sleep(inner.config.node_heartbeat);
            self.report_within(false).await;
            next.await;
        }
    }

    /// Writes this node's report, giving up after a heartbeat interval (at least 1 s);
    /// `stopped` marks the last one before a shutdown or a handover.
    pub(super) async fn report_within(&self, stopped: bool) {
        let limit = self.inner.config.node_heartbeat.max(Duration::from_secs(1));
        match tokio::time::timeout(limit, self.report_once(stopped)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "writing this node's report failed"),
            Err(_) => tracing::warn!("this node's report took over {limit:?}; skipped"),
        }
    }

    /// Works out what this node says of itself and writes it when it changed (or was not
    /// written yet): the live page of every instance reads it.
    async fn report_once(&self, stopped: bool) -> Result<(), EngineError> {
        let inner = &self.inner;
        let mut report = crate::NodeReport {
            draining: self.is_draining(),
            sessions: self.active_sessions() as u64,
            slots: inner.config.max_node_sessions.map(u64::from),
            stopped,
            ..Default::default()
        };
        for backend in &inner.backends {
            if report.full.is_none()
                && let Err(e) = backend.room_for(Default::default()).await
            {
                report.full = Some(match e {
                    crate::AcquireError::CapacityExhausted(why) => why,
                    crate::AcquireError::Failed(why) => format!("{}: {why}", backend.name()),
                });
            }
            report.devices.extend(backend.devices().await);
        }
        let unchanged = {
            let last = lock(&inner.node_self);
            last.report_stored && last.report == report
        };
        if unchanged {
            return Ok(());
        }
        {
            let mut last = lock(&inner.node_self);
            last.report = report.clone();
            last.report_stored = false;
        }
        inner
            .store
            .report_node(&inner.config.node, &report.to_json())
            .await?;
        let mut last = lock(&inner.node_self);
        if last.report == report {
            last.report_stored = true;
        }
        Ok(())
    }

    /// What this node last worked out about itself (its heartbeat does, every
    /// `node_heartbeat`).
    pub fn node_report(&self) -> crate::NodeReport {
        lock(&self.inner.node_self).report.clone()
    }

    /// Whether this node's last heartbeat written is older than two intervals (or there
    /// was none): other instances may be about to take it for dead.
    pub(super) fn heartbeat_overdue(&self, now: Timestamp) -> bool {
        let inner = &self.inner;
        lock(&inner.node_self)
            .last_heartbeat
            .is_none_or(|at| now.saturating_duration_since(at) > inner.config.node_heartbeat * 2)
    }

    /// The sweep loop: a sweep every `sweep_interval`, then a look for releases (retries
    /// whose wake-up was lost, and releases owed from other runs).
    pub(super) async fn run_sweeper(&self) {
        let inner = &self.inner;
        loop {
            inner.clock.sleep(inner.config.policy.sweep_interval).await;
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
            let next = inner.clock.sleep(inner.config.node_heartbeat);
            if let Err(e) = self.heartbeat_once().await {
                tracing::warn!(error = %e, "recording this node's heartbeat failed");
            }
            next.await;
        }
    }

    /// Closes the usage periods of this node's started sessions as they end, looking once
    /// a heartbeat interval (closing is idempotent: a look that finds nothing due writes
    /// nothing).
    pub(super) async fn run_usage_periods(&self) {
        let inner = &self.inner;
        loop {
            let next = inner.clock.sleep(inner.config.node_heartbeat);
            if let Err(e) = self.usage_once().await {
                tracing::warn!(error = %e, "closing usage periods failed");
            }
            next.await;
        }
    }

    /// Closes every usage period of this node's started sessions that ended by now, batch
    /// by batch; returns how many sessions had periods closed.
    pub(super) async fn usage_once(&self) -> Result<u32, EngineError> {
        let inner = &self.inner;
        let now = inner.clock.now();
        let mut closed = 0;
        loop {
            let batch = inner
                .store
                .close_usage(
                    &inner.config.node,
                    now,
                    inner.config.usage_period,
                    inner.config.sweep_batch,
                )
                .await?;
            closed += batch;
            if batch < inner.config.sweep_batch {
                return Ok(closed);
            }
        }
    }
}
