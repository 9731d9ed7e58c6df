//! The engine: drives the core's session table with a real clock and timers, the durable
//! store, the resource backends, the release worker and the sweeper.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use session_lifecycle::{
    Clock, Effects, EndReason, Policy, ReleaseOutcome, Resource, ResourceKind, Session, SessionId,
    SessionTable, Status, Timestamp, TouchError, Transition,
};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;

use crate::backend::{
    AcquireError, AcquireRequest, EventSink, ResourceBackend, ResourceEvent, ResourceRequest,
};
use crate::metrics::Metrics;
use crate::store::{
    AttachOutcome, CreateOutcome, ListQuery, NewSession, ReleaseIntent, RoomBinding, RoomEvent,
    SessionRecord, Store, StoreError, TouchOutcome,
};

/// How many started sessions one engine tracks timers for. Starting more fails with
/// [`EngineError::CapacityExhausted`]; a node runs far fewer avatar servers than this.
pub const TIMER_SLOTS: usize = 16_384;

/// The engine's settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Timeouts: orphan timeout, sweep interval, release backoff. (The in-memory
    /// retention does not apply: the store answers repeated ends.)
    pub policy: Policy,
    /// This node's id. Sessions started here run here, their resources are held here and
    /// only this node releases them. Keep it across restarts: a node that comes back with
    /// its id settles the releases it still owes. Unique among the instances sharing a
    /// store.
    pub node: String,
    /// How often this node records that it is alive.
    pub node_heartbeat: Duration,
    /// A node whose last heartbeat is this old is dead: any other instance's sweep ends its
    /// started sessions (`orphaned`) and records its resources as lost with it.
    pub node_timeout: Duration,
    /// How often the release worker looks for due releases on its own, besides being woken
    /// by ends here and by the store's notifications of ends elsewhere.
    pub release_poll: Duration,
    /// How long a claim on a release intent lasts; longer than any release takes (a
    /// graceful process stop is 10 s by default).
    pub release_lease: Duration,
    /// The most release intents claimed in one pass.
    pub release_batch: u32,
    /// The most due sessions ended in one sweep pass.
    pub sweep_batch: u32,
    /// Wait after a room empties before ending its session (none by default); someone
    /// joining meanwhile keeps it.
    pub room_grace: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            policy: Policy::DEFAULT,
            node: "local".to_owned(),
            node_heartbeat: Duration::from_secs(5),
            node_timeout: Duration::from_secs(30),
            release_poll: Duration::from_secs(2),
            release_lease: Duration::from_secs(60),
            release_batch: 256,
            sweep_batch: 1024,
            room_grace: Duration::ZERO,
        }
    }
}

/// A tenant's plan: how many sessions it may run at once and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// The most started sessions at once; `None` for no limit.
    pub max_concurrent_sessions: Option<u32>,
    /// The longest a session may run.
    pub max_session: Duration,
}

/// What starting a session asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartRequest {
    /// The owning tenant.
    pub tenant: String,
    /// Its plan.
    pub plan: Plan,
    /// The duration the client asked for; the plan's limit caps it.
    pub duration: Option<Duration>,
    /// Opaque client metadata (a small JSON document).
    pub metadata: Option<String>,
    /// The video room the session is bound to.
    pub room: Option<RoomBinding>,
    /// What it asks of its resources (GPU memory, device).
    pub resources: ResourceRequest,
}

/// Why an engine call failed. A failed call changes nothing the caller did not see
/// acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// No such session (or another tenant's).
    #[error("session not found")]
    NotFound,
    /// The session has ended; the call does not apply to it.
    #[error("session has ended")]
    SessionEnded,
    /// The tenant runs as many sessions as its plan allows.
    #[error("plan limit reached: at most {0} concurrent sessions")]
    PlanLimit(u32),
    /// No capacity for another session; the session (if created) ended `start_failed`.
    #[error("no capacity: {0}")]
    CapacityExhausted(String),
    /// A resource could not be acquired; the session ended `start_failed` and whatever was
    /// acquired is being released.
    #[error("start failed: {0}")]
    StartFailed(String),
    /// The store failed; nothing was acknowledged. Worth retrying.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The engine is shutting down and takes no new sessions.
    #[error("shutting down")]
    ShuttingDown,
}

/// What one [`Engine::run_due`] pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DueReport {
    /// Sessions this pass ended with `expired`.
    pub expired: u32,
    /// Sessions this pass ended with `orphaned`.
    pub orphaned: u32,
    /// Releases completed.
    pub released: u32,
    /// Release attempts that failed (retried later).
    pub release_failures: u32,
}

/// What one room event did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoomEventReport {
    /// The event was applied before (a repeated delivery): nothing happened.
    pub duplicate: bool,
    /// Sessions this event ended with `room_empty`.
    pub ended: Vec<SessionId>,
}

/// Ends sessions the timer table found due; releases go through the store, not the table.
#[derive(Default)]
struct CollectEnded(Vec<(SessionId, EndReason)>);

impl Effects for CollectEnded {
    fn release(&mut self, _: &SessionId, _: Resource) -> ReleaseOutcome {
        // The table holds no resources: the store's release intents do.
        ReleaseOutcome::Released
    }
    fn ended(&mut self, session: &Session) {
        if let Some(reason) = session.end_reason() {
            self.0.push((*session.id(), reason));
        }
    }
}

struct Inner {
    store: Arc<dyn Store>,
    backends: Vec<Arc<dyn ResourceBackend>>,
    by_kind: HashMap<ResourceKind, Arc<dyn ResourceBackend>>,
    clock: Arc<dyn Clock + Send + Sync>,
    config: EngineConfig,
    /// Timers of this engine's started sessions: expiry and orphan deadlines.
    timers: Mutex<Box<SessionTable<TIMER_SLOTS>>>,
    timers_changed: Notify,
    releases_due: Notify,
    events: EventSink,
    events_rx: Mutex<Option<mpsc::UnboundedReceiver<ResourceEvent>>>,
    closing: AtomicBool,
    /// Turns `true` once, when the engine shuts down; every background task watches it.
    stop: tokio::sync::watch::Sender<bool>,
    /// Releases claimed and not yet finished (in any task).
    releases_in_flight: std::sync::atomic::AtomicUsize,
    /// Held while claiming and counting releases, so that "nothing in flight" is never
    /// read between a claim and its count.
    claim_lock: tokio::sync::Mutex<()>,
    metrics: Metrics,
}

/// The session engine a service links in: start, end, get, list and record liveness,
/// with durable state, resource release and automatic termination.
///
/// Cloning is cheap; clones share one engine.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

/// Background tasks of an engine; dropping this does not stop them, [`Engine::shutdown`]
/// does.
pub struct Background {
    tasks: Vec<JoinHandle<()>>,
}

impl Background {
    /// Waits for every background task to finish (after [`Engine::shutdown`]).
    pub async fn join(self) {
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

impl Engine {
    /// Opens an engine over `store` and `backends` (acquired in this order at start).
    /// Registers the node as alive, then recovers what a previous run of the same node
    /// left: claims it held are dropped, its started sessions get their timers back,
    /// resources acquired just before a crash are adopted, and every release it still owes
    /// (including those recorded as lost while it was away) runs before this returns.
    pub async fn open(
        store: Arc<dyn Store>,
        backends: Vec<Arc<dyn ResourceBackend>>,
        clock: Arc<dyn Clock + Send + Sync>,
        config: EngineConfig,
    ) -> Result<Engine, EngineError> {
        let table_policy = Policy {
            retention: Duration::ZERO,
            ..config.policy
        };
        let timers = boxed_table(table_policy)
            .map_err(|e| EngineError::StartFailed(format!("invalid policy: {e}")))?;
        let by_kind = backends.iter().map(|b| (b.kind(), Arc::clone(b))).collect();
        let (events, events_rx) = EventSink::channel();
        let engine = Engine {
            inner: Arc::new(Inner {
                store,
                backends,
                by_kind,
                clock,
                config,
                timers: Mutex::new(timers),
                timers_changed: Notify::new(),
                releases_due: Notify::new(),
                events,
                events_rx: Mutex::new(Some(events_rx)),
                closing: AtomicBool::new(false),
                stop: tokio::sync::watch::channel(false).0,
                releases_in_flight: std::sync::atomic::AtomicUsize::new(0),
                claim_lock: tokio::sync::Mutex::new(()),
                metrics: Metrics::default(),
            }),
        };
        engine.recover().await?;
        Ok(engine)
    }

    async fn recover(&self) -> Result<(), EngineError> {
        let inner = &self.inner;
        inner
            .store
            .node_alive(&inner.config.node, inner.clock.now())
            .await?;
        inner.store.drop_claims(&inner.config.node).await?;
        let mut started = Vec::new();
        let mut before = None;
        loop {
            let page = inner
                .store
                .list(ListQuery {
                    tenant: None,
                    status: Some(Status::Started),
                    limit: 500,
                    before,
                    node: Some(inner.config.node.clone()),
                })
                .await?;
            let Some(last) = page.last() else { break };
            before = Some(*last.session.id());
            let mut timers = self.timers();
            for record in page {
                // A full timer table leaves the rest to the store sweeper.
                let _ = timers.restore(record.session.clone());
                started.push(record.session);
            }
        }
        self.adopt_untracked(&started).await?;
        let owed = self.release_pass(true).await?;
        if owed.released + owed.release_failures > 0 {
            tracing::info!(
                released = owed.released,
                failed = owed.release_failures,
                "settled releases this node owed from its previous run"
            );
        }
        Ok(())
    }

    /// Records resources the backends hold for `sessions` that the store does not know
    /// of (acquired just before a crash), so that they are released with their session.
    async fn adopt_untracked(&self, sessions: &[Session]) -> Result<(), EngineError> {
        if sessions.is_empty() {
            return Ok(());
        }
        let ids: Vec<SessionId> = sessions.iter().map(|s| *s.id()).collect();
        for backend in &self.inner.backends {
            let found = match backend.find_held(&ids).await {
                Ok(found) => found,
                Err(e) => {
                    tracing::warn!(backend = backend.name(), error = %e, "looking for untracked resources failed");
                    continue;
                }
            };
            for (id, resource) in found {
                let known = sessions
                    .iter()
                    .find(|s| *s.id() == id)
                    .is_some_and(|s| s.resources().iter().any(|r| r.resource == resource));
                if known {
                    continue;
                }
                tracing::warn!(session = %id, ?resource, "adopting a resource acquired before a crash");
                match self.inner.store.attach(id, resource).await? {
                    AttachOutcome::Attached => {}
                    AttachOutcome::Refused => self.release_now(id, resource).await,
                }
            }
        }
        Ok(())
    }

    /// The engine's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Started sessions this engine tracks (visits every timer slot: for metrics).
    pub fn active_sessions(&self) -> usize {
        self.timers()
            .iter()
            .filter(|s| s.status() == Status::Started)
            .count()
    }

    /// The engine's store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// The engine's clock.
    pub fn now(&self) -> Timestamp {
        self.inner.clock.now()
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.inner.config.policy
    }

    fn timers(&self) -> MutexGuard<'_, Box<SessionTable<TIMER_SLOTS>>> {
        // A panic while holding the lock cannot leave the table half-changed (its methods
        // do not panic), so a poisoned lock is still usable.
        self.inner
            .timers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Starts a session for `request.tenant`: records it, then acquires its resources
    /// from every backend in order. If any acquire fails, the session ends `start_failed`
    /// and what was acquired is released.
    pub async fn start(&self, request: StartRequest) -> Result<SessionRecord, EngineError> {
        let inner = &self.inner;
        if inner.closing.load(Ordering::SeqCst) {
            return Err(EngineError::ShuttingDown);
        }
        let now = inner.clock.now();
        let lifetime = request.duration.map_or(request.plan.max_session, |d| {
            d.min(request.plan.max_session)
        });
        let id = SessionId::from_ulid_parts(now, random_u128());
        let created = inner
            .store
            .create(NewSession {
                id,
                tenant: request.tenant.clone(),
                started_at: now,
                expires_at: now.saturating_add(lifetime),
                metadata: request.metadata.clone(),
                room: request.room.clone(),
                max_concurrent: request.plan.max_concurrent_sessions,
                node: inner.config.node.clone(),
            })
            .await?;
        if created == CreateOutcome::LimitReached {
            return Err(EngineError::PlanLimit(
                request.plan.max_concurrent_sessions.unwrap_or(0),
            ));
        }
        inner.metrics.session_started();
        let session = Session::new(id, now, now.saturating_add(lifetime));
        let mut tracked = self.timers().restore(session.clone()).is_ok();
        if !tracked {
            // Ended sessions leave the table on its next timeout: make room, then retry.
            self.fire_timers().await;
            tracked = self.timers().restore(session).is_ok();
        }
        self.inner.timers_changed.notify_one();
        if !tracked {
            self.end_internal(id, EndReason::StartFailed).await?;
            return Err(EngineError::CapacityExhausted(
                "this node tracks the most sessions it can".to_owned(),
            ));
        }
        tracing::info!(session = %id, tenant = %request.tenant, "session started");

        let mut env = vec![("SESSION_LIFECYCLE_SESSION_ID".to_owned(), id.to_string())];
        for backend in &inner.backends {
            let acquired = backend
                .acquire(
                    AcquireRequest {
                        resources: request.resources,
                        session: id,
                        tenant: &request.tenant,
                        env: &env,
                    },
                    inner.events.clone(),
                )
                .await;
            let acquired = match acquired {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(session = %id, backend = backend.name(), error = %e, "acquire failed");
                    self.end_internal(id, EndReason::StartFailed).await?;
                    return Err(match e {
                        AcquireError::CapacityExhausted(m) => EngineError::CapacityExhausted(m),
                        AcquireError::Failed(m) => EngineError::StartFailed(m),
                    });
                }
            };
            match inner.store.attach(id, acquired.resource).await {
                Ok(AttachOutcome::Attached) => env.extend(acquired.env),
                Ok(AttachOutcome::Refused) => {
                    // The session ended while we were acquiring: never keep a late resource.
                    self.release_now(id, acquired.resource).await;
                    return Err(EngineError::SessionEnded);
                }
                Err(e) => {
                    self.release_now(id, acquired.resource).await;
                    let _ = self.end_internal(id, EndReason::StartFailed).await;
                    return Err(e.into());
                }
            }
        }
        inner.store.get(id).await?.ok_or(EngineError::NotFound)
    }

    /// Releases a resource that never made it into the store, at once and in place.
    async fn release_now(&self, session: SessionId, resource: Resource) {
        let Some(backend) = self.inner.by_kind.get(&resource.kind) else {
            tracing::error!(session = %session, ?resource, "no backend releases this resource kind");
            return;
        };
        if let Err(e) = backend.release(session, resource).await {
            tracing::error!(session = %session, ?resource, error = %e, "releasing an unrecorded resource failed");
        }
    }

    /// The session `id`, if it belongs to `tenant` (any tenant's when `None`).
    pub async fn get(
        &self,
        tenant: Option<&str>,
        id: SessionId,
    ) -> Result<SessionRecord, EngineError> {
        let record = self
            .inner
            .store
            .get(id)
            .await?
            .ok_or(EngineError::NotFound)?;
        match tenant {
            Some(t) if t != record.tenant => Err(EngineError::NotFound),
            _ => Ok(record),
        }
    }

    /// A page of sessions, newest first.
    pub async fn list(&self, query: ListQuery) -> Result<Vec<SessionRecord>, EngineError> {
        Ok(self.inner.store.list(query).await?)
    }

    /// Ends `id` for `reason` if it belongs to `tenant` (any tenant's when `None`).
    /// Idempotent: an ended session is returned exactly as it was first ended. The release
    /// of its resources is recorded in the same write and runs in the background.
    pub async fn end(
        &self,
        tenant: Option<&str>,
        id: SessionId,
        reason: EndReason,
    ) -> Result<SessionRecord, EngineError> {
        if let Some(t) = tenant {
            // Another tenant's session answers like an unknown one, and is never touched.
            self.get(Some(t), id).await?;
        }
        let (record, _) = self.end_internal(id, reason).await?;
        Ok(record)
    }

    async fn end_internal(
        &self,
        id: SessionId,
        reason: EndReason,
    ) -> Result<(SessionRecord, Transition), EngineError> {
        let inner = &self.inner;
        let now = inner.clock.now();
        let (record, transition) = inner
            .store
            .end(id, now, reason)
            .await?
            .ok_or(EngineError::NotFound)?;
        if transition == Transition::Committed {
            let ended_reason = record.session.end_reason().unwrap_or(reason);
            inner.metrics.session_ended(ended_reason);
            tracing::info!(session = %id, reason = %ended_reason, "session ended");
            let _ = self
                .timers()
                .end(now, &id, ended_reason, &mut CollectEnded::default());
            inner.timers_changed.notify_one();
            inner.releases_due.notify_one();
        }
        Ok((record, transition))
    }

    /// Records a liveness signal (heartbeat, WebSocket message, room presence).
    pub async fn touch(&self, tenant: Option<&str>, id: SessionId) -> Result<(), EngineError> {
        if let Some(t) = tenant {
            self.get(Some(t), id).await?;
        }
        let now = self.inner.clock.now();
        match self.inner.store.touch(id, now).await? {
            TouchOutcome::Touched => {
                match self.timers().touch(now, &id) {
                    Ok(()) | Err(TouchError::NotFound) | Err(TouchError::SessionEnded) => {}
                }
                self.inner.timers_changed.notify_one();
                Ok(())
            }
            TouchOutcome::Ended => Err(EngineError::SessionEnded),
            TouchOutcome::NotFound => Err(EngineError::NotFound),
        }
    }

    /// Applies a verified room webhook event: joins and leaves update who is present in
    /// the room of each started session bound to it (a join is liveness), and a session
    /// ends with `room_empty` when the room finishes, or when it empties after someone had
    /// joined (after the room grace, if any).
    pub async fn room_event(&self, event: RoomEvent) -> Result<RoomEventReport, EngineError> {
        let inner = &self.inner;
        let now = inner.clock.now();
        let Some(updates) = inner.store.room_event(event, now).await? else {
            return Ok(RoomEventReport {
                duplicate: true,
                ended: Vec::new(),
            });
        };
        let mut report = RoomEventReport::default();
        for update in updates {
            if update.present > 0 {
                let _ = self.timers().touch(now, &update.session);
                inner.timers_changed.notify_one();
            }
            let empty = update.ever_joined && update.present == 0;
            if !(update.finished || empty) {
                continue;
            }
            if update.finished || inner.config.room_grace.is_zero() {
                if let (_, Transition::Committed) = self
                    .end_internal(update.session, EndReason::RoomEmpty)
                    .await?
                {
                    report.ended.push(update.session);
                }
            } else {
                let engine = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(engine.inner.config.room_grace).await;
                    match engine.inner.store.room_presence(update.session).await {
                        Ok(0) => {
                            if let Err(e) = engine
                                .end_internal(update.session, EndReason::RoomEmpty)
                                .await
                            {
                                tracing::warn!(session = %update.session, error = %e, "ending an empty room's session failed");
                            }
                        }
                        Ok(_) => {}
                        // The sweeper ends it as an orphan if its room stays empty.
                        Err(e) => {
                            tracing::warn!(session = %update.session, error = %e, "checking a room failed")
                        }
                    }
                });
            }
        }
        Ok(report)
    }

    /// Does everything due now, and waits for it: ends sessions whose resources reported
    /// events (an avatar server that exited), ends sessions whose timers fired, ends
    /// what the store sweep finds (expired, orphaned: also sessions this engine had no
    /// timer for), and runs every due release. The background tasks call the same steps;
    /// tests with a [`ManualClock`](crate::ManualClock) call this instead.
    pub async fn run_due(&self) -> Result<DueReport, EngineError> {
        self.handle_events().await?;
        let mut report = self.fire_timers().await;
        let swept = self.sweep().await?;
        report.expired += swept.expired;
        report.orphaned += swept.orphaned;
        let released = self.release_pass(true).await?;
        report.released += released.released;
        report.release_failures += released.release_failures;
        Ok(report)
    }

    /// Ends the sessions whose in-memory timers are due.
    async fn fire_timers(&self) -> DueReport {
        let now = self.inner.clock.now();
        let mut due = CollectEnded::default();
        self.timers().handle_timeout(now, &mut due);
        let mut report = DueReport::default();
        for (id, reason) in due.0 {
            if reason == EndReason::Orphaned && self.alive_elsewhere(id, now).await {
                continue;
            }
            match self.end_internal(id, reason).await {
                Ok((_, Transition::Committed)) => count(&mut report, reason, &self.inner.metrics),
                Ok(_) | Err(EngineError::NotFound) => {}
                // The store sweep retries it once the store is back.
                Err(e) => tracing::warn!(session = %id, error = %e, "ending a due session failed"),
            }
        }
        report
    }

    /// Whether a session whose orphan timer fired here had a liveness signal the timer
    /// did not see (a heartbeat or WebSocket served by another instance). If so its timer
    /// is set again from the store's record.
    async fn alive_elsewhere(&self, id: SessionId, now: Timestamp) -> bool {
        let record = match self.inner.store.get(id).await {
            Ok(Some(record)) => record,
            // Gone, or the store is down: end it (or let the sweep retry) as usual.
            Ok(None) | Err(_) => return false,
        };
        let session = record.session;
        let orphan_at = session
            .last_seen_at()
            .saturating_add(self.inner.config.policy.orphan_timeout);
        if session.status() != Status::Started || orphan_at <= now {
            return false;
        }
        let mut timers = self.timers();
        // The fired timer left an ended entry that the same timeout pass evicted (retention
        // is zero); a failure leaves the session to the store sweep.
        let _ = timers.restore(session);
        drop(timers);
        self.inner.timers_changed.notify_one();
        true
    }

    /// Ends what the store says is due: the safety net for lost timers, crashed
    /// processes and dead nodes.
    async fn sweep(&self) -> Result<DueReport, EngineError> {
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
                count(&mut report, EndReason::Orphaned, &inner.metrics);
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
                    count(&mut report, reason, &inner.metrics);
                }
            }
            if !full {
                return Ok(report);
            }
        }
    }

    /// Claims due release intents and runs them. With `wait`, runs them all to the end
    /// before returning; without, spawns them and returns at once.
    async fn release_pass(&self, wait: bool) -> Result<DueReport, EngineError> {
        let inner = &self.inner;
        let mut report = DueReport::default();
        loop {
            let claim_guard = inner.claim_lock.lock().await;
            let now = inner.clock.now();
            let intents = inner
                .store
                .claim_releases(
                    &inner.config.node,
                    now,
                    inner.config.release_lease,
                    inner.config.release_batch,
                )
                .await?;
            inner
                .releases_in_flight
                .fetch_add(intents.len(), Ordering::SeqCst);
            drop(claim_guard);
            let full = intents.len() >= inner.config.release_batch as usize;
            let mut handles = Vec::with_capacity(intents.len());
            for intent in intents {
                let engine = self.clone();
                handles.push(tokio::spawn(
                    async move { engine.run_release(intent).await },
                ));
            }
            if !wait {
                return Ok(report);
            }
            for h in handles {
                match h.await {
                    Ok(true) => report.released += 1,
                    Ok(false) => report.release_failures += 1,
                    Err(e) => tracing::error!(error = %e, "release task died"),
                }
            }
            if !full {
                return Ok(report);
            }
        }
    }

    /// Runs one claimed release and records its outcome. True if it succeeded.
    async fn run_release(&self, intent: ReleaseIntent) -> bool {
        let inner = &self.inner;
        // Counted in by the pass that claimed it.
        let done = self.run_release_inner(intent).await;
        inner.releases_in_flight.fetch_sub(1, Ordering::SeqCst);
        done
    }

    async fn run_release_inner(&self, intent: ReleaseIntent) -> bool {
        let inner = &self.inner;
        let started = std::time::Instant::now();
        let result = match inner.by_kind.get(&intent.resource.kind) {
            Some(backend) => backend.release(intent.session, intent.resource).await,
            None => Err(crate::backend::ReleaseError(format!(
                "no backend for resource kind {}",
                intent.resource.kind.0
            ))),
        };
        let now = inner.clock.now();
        match result {
            Ok(note) => {
                inner.metrics.release_done(started.elapsed());
                tracing::info!(session = %intent.session, resource = ?intent.resource, note = %note, "resource released");
                // Recording is retried while the claim lasts (the store may be restarting);
                // after that the claim lapses and the (repeatable) release runs again.
                let mut delay = inner.config.policy.release_backoff_initial;
                while let Err(e) = inner
                    .store
                    .complete_release(intent, now, note.clone())
                    .await
                {
                    if started.elapsed() + delay >= inner.config.release_lease {
                        tracing::warn!(session = %intent.session, error = %e, "recording a release failed; it runs again when its claim lapses");
                        break;
                    }
                    tracing::warn!(session = %intent.session, error = %e, "recording a release failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(inner.config.policy.release_backoff_max);
                }
                true
            }
            Err(e) => {
                inner.metrics.release_failed();
                let attempts = intent.attempts.saturating_add(1);
                let backoff = inner.config.policy.release_backoff(attempts);
                tracing::warn!(session = %intent.session, resource = ?intent.resource, attempts, error = %e, "release failed; retrying");
                let retry_at = now.saturating_add(backoff);
                if let Err(e) = inner.store.fail_release(intent, retry_at, e.0).await {
                    tracing::warn!(session = %intent.session, error = %e, "recording a failed release failed");
                }
                // Wake the worker when the retry is due (the sweep is the fallback).
                let engine = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(backoff).await;
                    engine.inner.releases_due.notify_one();
                });
                false
            }
        }
    }

    /// Starts the background tasks: timers (sleeping until the next deadline), the
    /// periodic store sweep, the release worker and the resource event listener.
    pub fn spawn_background(&self) -> Background {
        let mut tasks = Vec::new();

        let engine = self.clone();
        let mut stop = self.inner.stop.subscribe();
        tasks.push(tokio::spawn(async move {
            loop {
                let next = engine.timers().next_deadline();
                let sleep = match next {
                    Some(deadline) => deadline.saturating_duration_since(engine.now()),
                    None => engine.inner.config.policy.sweep_interval,
                };
                tokio::select! {
                    _ = tokio::time::sleep(sleep) => {}
                    _ = engine.inner.timers_changed.notified() => continue,
                    _ = stop.wait_for(|stopped| *stopped) => break,
                }
                engine.fire_timers().await;
            }
        }));

        let engine = self.clone();
        let mut stop = self.inner.stop.subscribe();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(engine.inner.config.policy.sweep_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.wait_for(|stopped| *stopped) => break,
                }
                if let Err(e) = engine.sweep().await {
                    tracing::warn!(error = %e, "sweep failed");
                }
                // Retries whose wake-up was lost, and intents from other runs.
                engine.inner.releases_due.notify_one();
            }
        }));

        let engine = self.clone();
        let mut stop = self.inner.stop.subscribe();
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = engine.inner.releases_due.notified() => {}
                    _ = tokio::time::sleep(engine.inner.config.release_poll) => {}
                    _ = stop.wait_for(|stopped| *stopped) => break,
                }
                if let Err(e) = engine.release_pass(false).await {
                    tracing::warn!(error = %e, "claiming releases failed");
                }
            }
        }));

        // Heartbeat: other instances take this node's sessions over if it stops.
        let engine = self.clone();
        let mut stop = self.inner.stop.subscribe();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(engine.inner.config.node_heartbeat);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.wait_for(|stopped| *stopped) => break,
                }
                let inner = &engine.inner;
                if let Err(e) = inner
                    .store
                    .node_alive(&inner.config.node, inner.clock.now())
                    .await
                {
                    tracing::warn!(error = %e, "recording this node's heartbeat failed");
                }
            }
        }));

        // Ends on other instances of this node's sessions, pushed by the store.
        let engine = self.clone();
        let mut stop = self.inner.stop.subscribe();
        tasks.push(tokio::spawn(async move {
            let inner = &engine.inner;
            let wake = || inner.releases_due.notify_one();
            tokio::select! {
                _ = inner.store.watch_releases(&inner.config.node, &wake) => {}
                _ = stop.wait_for(|stopped| *stopped) => {}
            }
        }));

        let rx = self
            .inner
            .events_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(mut rx) = rx {
            let engine = self.clone();
            let mut stop = self.inner.stop.subscribe();
            tasks.push(tokio::spawn(async move {
                loop {
                    let event = tokio::select! {
                        e = rx.recv() => e,
                        _ = stop.wait_for(|stopped| *stopped) => None,
                    };
                    let Some(event) = event else { break };
                    if let Err(e) = engine.end_internal(event.session, event.reason).await {
                        tracing::warn!(session = %event.session, error = %e, "ending after a resource event failed");
                    }
                }
            }));
        }
        // Releases left by an earlier run go first.
        self.inner.releases_due.notify_one();
        Background { tasks }
    }

    /// Handles resource events reported so far (part of [`run_due`](Self::run_due), for
    /// drivers without background tasks).
    async fn handle_events(&self) -> Result<u32, EngineError> {
        let mut handled = 0;
        loop {
            let event = {
                let mut guard = self
                    .inner
                    .events_rx
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                match guard.as_mut().map(|rx| rx.try_recv()) {
                    Some(Ok(event)) => event,
                    _ => break,
                }
            };
            self.end_internal(event.session, event.reason).await?;
            handled += 1;
        }
        Ok(handled)
    }

    /// Stops taking sessions, ends every started session this engine tracks with
    /// `shutdown`, waits (up to `deadline`) for their releases, and stops the background
    /// tasks. Returns the number of sessions it ended.
    pub async fn shutdown(&self, deadline: Duration) -> Result<u32, EngineError> {
        self.inner.closing.store(true, Ordering::SeqCst);
        let ids: Vec<SessionId> = self
            .timers()
            .iter()
            .filter(|s| s.status() == Status::Started)
            .map(|s| *s.id())
            .collect();
        let mut ended = 0;
        for id in ids {
            if let (_, Transition::Committed) = self.end_internal(id, EndReason::Shutdown).await? {
                ended += 1;
            }
        }
        let give_up = tokio::time::Instant::now() + deadline;
        loop {
            let pass = self.release_pass(true).await?;
            let in_flight = {
                let _claims = self.inner.claim_lock.lock().await;
                self.inner.releases_in_flight.load(Ordering::SeqCst)
            };
            if pass.released == 0 && pass.release_failures == 0 && in_flight == 0 {
                break;
            }
            if in_flight > 0 {
                // The background worker is finishing releases it claimed first.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if tokio::time::Instant::now() >= give_up {
                tracing::warn!(
                    "shutdown deadline passed with releases still pending; they run on the next start"
                );
                break;
            }
            if pass.release_failures > 0 {
                tokio::time::sleep(self.inner.config.policy.release_backoff_initial).await;
            }
        }
        // A watch, not a notification: a task busy right now still sees it when it next
        // waits.
        self.inner.stop.send_replace(true);
        Ok(ended)
    }
}

fn count(report: &mut DueReport, reason: EndReason, metrics: &Metrics) {
    match reason {
        EndReason::Expired => report.expired += 1,
        EndReason::Orphaned => {
            report.orphaned += 1;
            metrics.orphan_found();
        }
        _ => {}
    }
}

/// 128 bits from the operating system's generator (ULIDs use 80 of them).
fn random_u128() -> u128 {
    let mut bytes = [0u8; 16];
    // The OS generator failing is not something a service can run without.
    getrandom::fill(&mut bytes).expect("the operating system's random generator failed");
    u128::from_le_bytes(bytes)
}

/// Builds the timer table directly on the heap. The table is a large inline array; built
/// on a task's stack it could overflow it, so it is built on a thread with room for it.
fn boxed_table(
    policy: Policy,
) -> Result<Box<SessionTable<TIMER_SLOTS>>, session_lifecycle::PolicyError> {
    let size = std::mem::size_of::<SessionTable<TIMER_SLOTS>>();
    std::thread::Builder::new()
        .name("timer-table".to_owned())
        .stack_size(4 * size + (1 << 20))
        .spawn(move || SessionTable::new(policy).map(Box::new))
        .expect("spawning a thread to build the timer table")
        .join()
        .expect("building the timer table panicked")
}
