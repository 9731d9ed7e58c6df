//! What callers ask of the engine: start, end, get, list and liveness. Every change is
//! committed in the store first; the in-memory timer table follows what the store says.

use crate::backend::SESSION_ID_ENV;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use session_lifecycle::{EndReason, Resource, Session, SessionId, TouchError, Transition};

use super::{Engine, EngineError, StartRequest, lock};
use crate::backend::{AcquireError, AcquireRequest, Acquired, ResourceBackend};
use crate::simulation::PlantedBug;
use session_lifecycle_store::{
    AttachOutcome, CreateOutcome, ListQuery, NewSession, ReleaseClaim, SessionRecord,
    SessionTimeouts, TouchOutcome,
};

impl Engine {
    /// A session's timeouts, each the session's own or else the engine's default.
    pub fn timeouts_of(&self, own: &SessionTimeouts) -> SessionTimeouts {
        let config = &self.inner.config;
        SessionTimeouts {
            participant_left: own.participant_left.or(Some(config.room_grace)),
            participant_absent: own.participant_absent.or(config.participant_absent),
            websocket_grace: own.websocket_grace.or(Some(config.websocket_grace)),
        }
    }

    /// Starts a session for `request.tenant`: records it, then acquires its resources
    /// from every backend in order. If any acquire fails, the session ends `start_failed`
    /// and what was acquired is released.
    pub async fn start(&self, request: StartRequest) -> Result<SessionRecord, EngineError> {
        self.start_as(self.fresh_session_id(), request).await
    }

    /// A new session id (a ULID of now), for [`start_as`](Self::start_as).
    pub fn fresh_session_id(&self) -> SessionId {
        SessionId::from_ulid_parts(self.inner.clock.now(), random_u128())
    }

    /// [`start`](Self::start) with an id chosen beforehand (an idempotent create binds
    /// its key to the id first). An id that exists already is refused with
    /// [`StoreError::DuplicateId`](crate::StoreError::DuplicateId), nothing started.
    pub async fn start_as(
        &self,
        id: SessionId,
        request: StartRequest,
    ) -> Result<SessionRecord, EngineError> {
        let inner = &self.inner;
        // A draining node of a fleet still places creates, on the other nodes.
        let draining = inner.draining.load(Ordering::SeqCst);
        if draining && !inner.store.places() {
            return Err(EngineError::Draining);
        }
        if inner.closing.load(Ordering::SeqCst) && !draining {
            return Err(EngineError::ShuttingDown);
        }
        let down = lock(&inner.health).is_down();
        if down && inner.store.ping().await.is_err() {
            // A node that cannot write its heartbeat may be taken over any moment: it
            // starts nothing new.
            return Err(EngineError::Store(crate::StoreError::unavailable(
                "the store is unreachable from this node; it takes no new sessions",
            )));
        }
        request.plan.check(&request.timeouts)?;
        let now = inner.clock.now();
        let lifetime = request.duration.map_or(request.plan.max_session, |d| {
            d.min(request.plan.max_session)
        });
        // A start that has begun finishes, whoever waits for it: a caller that goes away
        // (a client that disconnects mid-request) must not leave a resource acquired and
        // never recorded. Tracked, so shutdown and handover wait for it.
        let engine = self.clone();
        let work = inner.tasks.spawn(async move {
            // Held until every acquire is done: this session's releases wait for it.
            let starting = Arc::new(tokio::sync::Mutex::new(()));
            let _acquiring = Arc::clone(&starting).lock_owned().await;
            lock(&engine.inner.starting).insert(id, starting);
            let result = engine.start_session(id, now, lifetime, request).await;
            lock(&engine.inner.starting).remove(&id);
            result
        });
        work.await.unwrap_or_else(|e| {
            Err(EngineError::StartFailed(format!(
                "the start was interrupted: {e}"
            )))
        })
    }

    async fn start_session(
        &self,
        id: SessionId,
        now: session_lifecycle::Timestamp,
        lifetime: std::time::Duration,
        request: StartRequest,
    ) -> Result<SessionRecord, EngineError> {
        let inner = &self.inner;
        // Defaults resolved now and recorded: a later change of the service's defaults does
        // not change what a running session was told.
        let timeouts = self.timeouts_of(&request.timeouts);
        let new = NewSession {
            id,
            tenant: request.tenant.clone(),
            started_at: now,
            expires_at: now.saturating_add(lifetime),
            metadata: request.metadata.clone(),
            room: request.room.clone(),
            max_concurrent: request.plan.max_concurrent_sessions,
            node: inner.config.node.clone(),
            timeouts,
            callback_url: request.callback_url.clone(),
            billing: request.plan.billing,
        };
        let mut slot = None;
        if inner.store.places() {
            // The fleet chooses the node; one on another node starts there.
            if !self.place(new, &request).await? {
                return self.await_placed(id, &request).await;
            }
        } else {
            slot = self.take_slot().await?;
            let created = inner.store.create(new).await?;
            if created == CreateOutcome::LimitReached {
                return Err(EngineError::PlanLimit(
                    request.plan.max_concurrent_sessions.unwrap_or(0),
                ));
            }
        }
        let session = Session::new(id, now, now.saturating_add(lifetime));
        let answer = SessionRecord {
            session,
            tenant: request.tenant.clone(),
            metadata: request.metadata.clone(),
            room: request.room.clone(),
            node: inner.config.node.clone(),
            timeouts,
            release_notes: Vec::new(),
            release_errors: Vec::new(),
            ready_at: None,
        };
        self.run_here(answer, request.resources, slot, Vec::new())
            .await
    }

    /// Runs a session recorded on this node (`answer`, as recorded): tracks its timers,
    /// then acquires its resources from every backend in order, attaching each. If any
    /// acquire fails, the session ends `start_failed` and what was acquired is released.
    /// `slot` (this node's slot gate, see `take_slot`) is let go once the session is
    /// tracked. `acquired_before` holds what the first backends acquired already, in
    /// backend order and recorded nowhere (a placed start acquires everything before it
    /// records anything, see `start_claimed`); each is attached in its backend's turn.
    pub(super) async fn run_here(
        &self,
        mut answer: SessionRecord,
        resources: crate::backend::ResourceRequest,
        slot: Option<tokio::sync::MutexGuard<'_, ()>>,
        acquired_before: Vec<Acquired>,
    ) -> Result<SessionRecord, EngineError> {
        let mut acquired_before = acquired_before.into_iter();
        let inner = &self.inner;
        let id = *answer.session.id();
        let timeouts = answer.timeouts;
        inner.metrics.session_started();
        let session = answer.session.clone();
        // Tracked already: a placed session this node's recovery put back before it
        // claimed its start.
        let restore = |session| {
            matches!(
                self.timers().restore(session),
                Ok(_) | Err(session_lifecycle::StartError::DuplicateId)
            )
        };
        let mut tracked = restore(session.clone());
        if !tracked {
            // Ended sessions leave the table on its next pass: make room, then retry.
            self.timers_once().await;
            tracked = restore(session);
        }
        inner.timers_changed.notify_one();
        drop(slot);
        if !tracked {
            self.release_unrecorded(id, acquired_before).await;
            self.end_internal(id, EndReason::StartFailed).await?;
            return Err(EngineError::CapacityExhausted(
                "this node tracks the most sessions it can".to_owned(),
            ));
        }
        tracing::info!(session = %id, tenant = %answer.tenant, node = %answer.node, "session started");
        if answer.room.is_some()
            && let Some(allowance) = timeouts.participant_absent
        {
            self.spawn_join_wait(id, answer.session.started_at().saturating_add(allowance));
        }

        let mut env = vec![(SESSION_ID_ENV.to_owned(), id.to_string())];
        for backend in &inner.backends {
            // A stop (shutdown, handover) acquires nothing more: the session stays as
            // recorded, and the node's next start adopts anything an interrupted acquire
            // left behind (`find_held`).
            let acquired = match acquired_before.next() {
                Some(acquired) => Ok(acquired),
                None => {
                    let request = AcquireRequest {
                        resources,
                        session: id,
                        tenant: &answer.tenant,
                        env: &env,
                    };
                    match self.acquire_from(backend.as_ref(), request).await {
                        Some(outcome) => outcome,
                        None => return Err(EngineError::ShuttingDown),
                    }
                }
            };
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
            match self.attach_retrying(id, acquired.resource).await {
                Ok(AttachOutcome::Attached) => {
                    env.extend(acquired.env);
                    // Mirrors what the store recorded: the answer is built from the
                    // writes themselves, never from a read after them.
                    let _ = answer.session.attach(acquired.resource);
                }
                Ok(AttachOutcome::Refused) => {
                    // The session ended while we were acquiring: never keep a late resource.
                    // It is the last acquired, so it goes first; the session's other
                    // releases wait for this start to return.
                    if !crate::simulation::planted(PlantedBug::ForgetLateResource) {
                        self.release_unrecorded(id, acquired_before).await;
                        self.release_now(id, acquired.resource).await;
                    }
                    return Err(EngineError::SessionEnded);
                }
                Err(e) => {
                    self.release_unrecorded(id, acquired_before).await;
                    self.release_now(id, acquired.resource).await;
                    let _ = self.end_internal(id, EndReason::StartFailed).await;
                    return Err(e.into());
                }
            }
        }
        Ok(answer)
    }

    /// Attaches `resource`, trying again twice (50 ms apart) when the store could not be
    /// reached: the session is committed already, and its start should not fail for a
    /// blip.
    async fn attach_retrying(
        &self,
        id: SessionId,
        resource: Resource,
    ) -> Result<AttachOutcome, crate::StoreError> {
        let mut tries = 0;
        loop {
            match self.inner.store.attach(id, resource).await {
                Err(e) if e.is_unavailable() && tries < 2 => {
                    tries += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                result => return result,
            }
        }
    }

    /// Acquires from `backend`, or `None` if the engine stops first (a stop acquires
    /// nothing more; the node's next start adopts what an interrupted acquire left,
    /// `find_held`).
    pub(super) async fn acquire_from(
        &self,
        backend: &dyn ResourceBackend,
        request: AcquireRequest<'_>,
    ) -> Option<Result<Acquired, AcquireError>> {
        let inner = &self.inner;
        tokio::select! {
            biased;
            _ = inner.cancel.cancelled() => None,
            outcome = backend.acquire(request, inner.events.clone()) => Some(outcome),
        }
    }

    /// Releases resources that never made it into the store (acquired in this order), the
    /// last acquired first, each with `release_now`.
    pub(super) async fn release_unrecorded(
        &self,
        session: SessionId,
        acquired: impl DoubleEndedIterator<Item = Acquired>,
    ) {
        for acquired in acquired.rev() {
            self.release_now(session, acquired.resource).await;
        }
    }

    /// Releases a resource that never made it into the store, at once and in place: each
    /// attempt within the kind's release deadline, retried after the policy's backoff until
    /// it succeeds or the engine stops (the next start of the node finds the resource
    /// then, see `recovery`). The session's other releases wait meanwhile: this one was
    /// acquired last.
    pub(super) async fn release_now(&self, session: SessionId, resource: Resource) {
        let inner = &self.inner;
        let mut failures = 0;
        loop {
            match self.run_backend_release(session, resource).await {
                Ok(_) => return,
                Err(e) => {
                    failures += 1;
                    tracing::error!(session = %session, ?resource, error = %e, "releasing an unrecorded resource failed; trying again");
                }
            }
            let wait = inner.config.policy.release_backoff(failures);
            tokio::select! {
                biased;
                _ = inner.cancel.cancelled() => return,
                _ = inner.clock.sleep(wait) => {}
            }
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

    /// Ends `id` for `reason` if it belongs to `tenant` (any tenant's when `None`; another
    /// tenant's session answers like an unknown one and is never touched). Idempotent: an
    /// ended session is returned exactly as it was first ended. Its releases are recorded
    /// in the same write and run in the background. One store call.
    pub async fn end(
        &self,
        tenant: Option<&str>,
        id: SessionId,
        reason: EndReason,
    ) -> Result<SessionRecord, EngineError> {
        match self.end_in_scope(id, tenant, reason).await {
            Ok((record, _)) => Ok(record),
            Err(EngineError::Store(e))
                if e.is_unavailable()
                    && crate::simulation::planted(PlantedBug::AcknowledgeEndBeforeStore) =>
            {
                self.acknowledged_in_memory(id, reason)
                    .ok_or(EngineError::Store(e))
            }
            Err(e) => Err(e),
        }
    }

    /// The planted bug [`PlantedBug::AcknowledgeEndBeforeStore`]: ends `id` in the timer
    /// table only and answers as if the store had it.
    fn acknowledged_in_memory(&self, id: SessionId, reason: EndReason) -> Option<SessionRecord> {
        let now = self.inner.clock.now();
        let mut timers = self.timers();
        let _ = timers.end(now, &id, reason);
        let session = timers.get(&id)?.clone();
        Some(SessionRecord {
            session,
            tenant: String::new(),
            metadata: None,
            room: None,
            node: self.inner.config.node.clone(),
            timeouts: SessionTimeouts::default(),
            release_notes: Vec::new(),
            release_errors: Vec::new(),
            ready_at: None,
        })
    }

    /// Ends `id` for the service itself (timers, the sweeper, events); see
    /// [`end_in_scope`](Self::end_in_scope).
    pub(super) async fn end_internal(
        &self,
        id: SessionId,
        reason: EndReason,
    ) -> Result<(SessionRecord, Transition), EngineError> {
        self.end_in_scope(id, None, reason).await
    }

    /// Ends `id` in the store, then, once that committed, in the timer table (with the
    /// ending the store recorded, which an earlier trigger may have set), and starts its
    /// releases: at once here if it runs here, else through the owning node.
    async fn end_in_scope(
        &self,
        id: SessionId,
        tenant: Option<&str>,
        reason: EndReason,
    ) -> Result<(SessionRecord, Transition), EngineError> {
        let inner = &self.inner;
        let now = inner.clock.now();
        // A session of this node has its releases claimed with its end, and run at once.
        let claim = ReleaseClaim {
            node: inner.config.node.clone(),
            until: now.saturating_add(inner.config.release_lease),
        };
        let (record, transition) = inner
            .store
            .end(id, tenant, now, reason, Some(claim))
            .await?
            .ok_or(EngineError::NotFound)?;
        let ended_reason = record.session.end_reason().unwrap_or(reason);
        if transition != Transition::Committed
            && crate::simulation::planted(PlantedBug::ReleaseWithoutClaim)
            && record.session.next_release_at().is_some()
        {
            lock(&inner.releases)
                .local_runs
                .push(self.spawn_unguarded_run(record.clone(), None));
        }
        if transition == Transition::Committed {
            inner.metrics.session_ended(ended_reason);
            tracing::info!(session = %id, reason = %ended_reason, node = %inner.config.node, "session ended");
            if record.node == inner.config.node && record.session.next_release_at().is_some() {
                self.spawn_release_run(record.clone());
            } else {
                inner.releases_due.notify_one();
            }
        }
        // Durable first, memory second: the table learns of the end only now.
        let _ = self.timers().end(now, &id, ended_reason);
        inner.timers_changed.notify_one();
        Ok((record, transition))
    }

    /// Records a liveness signal (heartbeat, WebSocket message, room presence) for `id` if
    /// it belongs to `tenant` (any tenant's when `None`), and returns the session as it now
    /// stands. One store call.
    pub async fn touch(
        &self,
        tenant: Option<&str>,
        id: SessionId,
    ) -> Result<SessionRecord, EngineError> {
        let now = self.inner.clock.now();
        let touched = match self.inner.store.touch(id, tenant, now).await {
            Ok(touched) => touched,
            Err(e) => {
                // Liveness is not lost with the store: kept here, written once it is back,
                // before anything is judged silent.
                if e.is_unavailable() {
                    lock(&self.inner.pending_touches).insert(id, now);
                    let _ = self.timers().touch(now, &id);
                }
                return Err(e.into());
            }
        };
        match touched {
            TouchOutcome::Touched(record) => {
                match self.timers().touch(now, &id) {
                    Ok(()) | Err(TouchError::NotFound) | Err(TouchError::SessionEnded) => {}
                }
                self.inner.timers_changed.notify_one();
                Ok(record)
            }
            TouchOutcome::Ended(_) => Err(EngineError::SessionEnded),
            TouchOutcome::NotFound => Err(EngineError::NotFound),
        }
    }
}

/// 128 bits from the operating system's generator (ULIDs use 80 of them), or from the
/// simulation's seed when one is set.
fn random_u128() -> u128 {
    if let Some(bits) = crate::simulation::seeded_entropy() {
        return bits;
    }
    let mut bytes = [0u8; 16];
    // The OS generator failing is not something a service can run without.
    getrandom::fill(&mut bytes).expect("the operating system's random generator failed");
    u128::from_le_bytes(bytes)
}
