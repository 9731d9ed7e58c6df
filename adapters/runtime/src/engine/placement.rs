//! Session slots and fleet placement: where a create's session runs.
//!
//! On one machine (a store that does not place) a session runs where it was created, and
//! this node's slots (`max_node_sessions`) bound it. On a store shared by a fleet the
//! create's transaction chooses a node with room ([`FleetPlacement`]); a session placed on
//! another node is started there: that node claims it (woken by the store, or by its own
//! poll), checks it still has room, runs it like its own, and reports back, while the
//! receiving instance waits within `placement_wait`. A node that refuses (draining, no
//! room, an acquire failed), or that does not claim within `placement_claim_timeout` (it
//! may have died with a fresh heartbeat), gets the session placed elsewhere, once; then
//! the create fails clearly and the session ends `start_failed`, holding nothing.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use session_lifecycle::{EndReason, SessionId};
use session_lifecycle_store::{
    ClaimedStart, NewSession, PlaceOutcome, PlacementAsk, SessionRecord, StartState,
};

use super::{Engine, EngineError, StartRequest, lock};
use crate::backend::{AcquireRequest, Acquired, ResourceRequest, SESSION_ID_ENV};

/// The most placed starts a node claims in one pass.
const CLAIM_BATCH: u32 = 32;

/// How often a waiting create looks at its placed session when no word comes.
const PLACED_POLL: Duration = Duration::from_millis(100);

impl Engine {
    /// This node's slot gate, taken when its slots are limited: held until the new
    /// session is tracked (see `run_here`). Refuses when every slot is taken.
    pub(super) async fn take_slot(
        &self,
    ) -> Result<Option<tokio::sync::MutexGuard<'_, ()>>, EngineError> {
        let Some(max) = self.inner.config.max_node_sessions else {
            return Ok(None);
        };
        let gate = self.inner.slot_gate.lock().await;
        if self.active_sessions() >= max as usize {
            return Err(no_slot(max));
        }
        Ok(Some(gate))
    }

    /// Whether this node may take `resources` now, as it knows itself: not draining or
    /// stopping, and every backend has room. (Its slots are counted by the store, which
    /// sees every node's sessions.) `Err` says why not.
    async fn room_here(&self, resources: ResourceRequest) -> Result<(), String> {
        let inner = &self.inner;
        if inner.draining.load(Ordering::SeqCst) {
            return Err("the node is draining".to_owned());
        }
        if inner.closing.load(Ordering::SeqCst) {
            return Err("the node is shutting down".to_owned());
        }
        for backend in &inner.backends {
            if let Err(e) = backend.room_for(resources).await {
                return Err(format!("{}: {e}", backend.name()));
            }
        }
        Ok(())
    }

    /// What a placement of `request` asks, received here.
    async fn ask(&self, request: &StartRequest, exclude: Vec<String>) -> PlacementAsk {
        let config = &self.inner.config;
        PlacementAsk {
            receiving: config.node.clone(),
            receiving_has_room: self.room_here(request.resources).await.is_ok(),
            receiving_slots: config.max_node_sessions.map(u64::from),
            exclude,
            gpu_memory: request.resources.gpu_memory,
            policy: config.placement,
            node_timeout: config.node_timeout,
        }
    }

    /// Records `new` on the node the fleet chooses: whether that is this node (which runs
    /// it now) rather than another.
    pub(super) async fn place(
        &self,
        new: NewSession,
        request: &StartRequest,
    ) -> Result<bool, EngineError> {
        let ask = self.ask(request, Vec::new()).await;
        let encoded = encode_request(&request.resources);
        let id = new.id;
        match self.inner.store.create_placed(new, &ask, &encoded).await? {
            PlaceOutcome::LimitReached => Err(EngineError::PlanLimit(
                request.plan.max_concurrent_sessions.unwrap_or(0),
            )),
            PlaceOutcome::NoRoom => Err(no_room()),
            PlaceOutcome::Placed { node } if node == self.inner.config.node => Ok(true),
            PlaceOutcome::Placed { node } => {
                tracing::info!(session = %id, node = %node, "session placed on another node");
                Ok(false)
            }
        }
    }

    /// Waits for the start of session `id`, placed on another node, and answers as a start here
    /// would: the session as started there, or an error (the session then ended, holding
    /// nothing this wait knows of).
    pub(super) async fn await_placed(
        &self,
        id: SessionId,
        request: &StartRequest,
    ) -> Result<SessionRecord, EngineError> {
        let inner = &self.inner;
        let deadline = tokio::time::Instant::now() + inner.config.placement_wait;
        let mut assigned_at = tokio::time::Instant::now();
        let mut placed_again = false;
        let mut refused_by = Vec::new();
        loop {
            // Registered before the look: word arriving between the two is not missed.
            let changed = inner.placed_changed.notified();
            let state = inner.store.placed_state(id).await?;
            let Some(state) = state else {
                return Err(EngineError::StartFailed(
                    "the placed session is gone from the store".to_owned(),
                ));
            };
            if state.ended {
                return Err(self.ended_while_placed(id).await);
            }
            let node = state.node;
            let refusal = match state.start {
                StartState::Started => {
                    return match inner.store.get(id).await? {
                        Some(record) => Ok(record),
                        None => Err(EngineError::StartFailed(
                            "the placed session is gone from the store".to_owned(),
                        )),
                    };
                }
                StartState::Refused(why) => Some(why),
                StartState::Assigned
                    if assigned_at.elapsed() >= inner.config.placement_claim_timeout =>
                {
                    Some(format!(
                        "node {node} did not take it within {:?}",
                        inner.config.placement_claim_timeout
                    ))
                }
                StartState::Assigned | StartState::Starting => None,
            };
            if let Some(why) = refusal {
                refused_by.push(node.clone());
                if placed_again {
                    self.end_internal(id, EndReason::StartFailed).await?;
                    return Err(EngineError::CapacityExhausted(format!(
                        "no node could start the session (last: {why})"
                    )));
                }
                placed_again = true;
                let ask = self.ask(request, refused_by.clone()).await;
                match inner.store.place_again(id, &node, &ask).await? {
                    Some(PlaceOutcome::Placed { node: next }) => {
                        tracing::info!(session = %id, from = %node, to = %next, reason = %why, "session placed again");
                        assigned_at = tokio::time::Instant::now();
                        continue;
                    }
                    Some(_) => {
                        self.end_internal(id, EndReason::StartFailed).await?;
                        return Err(EngineError::CapacityExhausted(format!(
                            "no other node has room for the session ({why})"
                        )));
                    }
                    // Claimed, started or ended meanwhile: look again.
                    None => continue,
                }
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                self.end_internal(id, EndReason::StartFailed).await?;
                return Err(EngineError::StartFailed(format!(
                    "node {node} did not start the session within {:?}",
                    inner.config.placement_wait
                )));
            }
            tokio::select! {
                biased;
                _ = inner.cancel.cancelled() => return Err(EngineError::ShuttingDown),
                _ = changed => {}
                _ = tokio::time::sleep(PLACED_POLL.min(deadline - now)) => {}
            }
        }
    }

    /// The error a create answers when its placed session ended before it started.
    async fn ended_while_placed(&self, id: SessionId) -> EngineError {
        let reason = match self.inner.store.get(id).await {
            Ok(Some(record)) => record.session.end_reason(),
            _ => None,
        };
        match reason {
            Some(EndReason::StartFailed) => EngineError::StartFailed(
                "the node chosen for the session could not start it".to_owned(),
            ),
            _ => EngineError::SessionEnded,
        }
    }

    /// Claims the sessions placed on this node by other instances and starts each in a
    /// tracked task, as a start here would run (see `start_as`). Part of the placed-start
    /// loop; returns how many it claimed.
    pub(super) async fn placed_starts_once(&self) -> Result<usize, EngineError> {
        let inner = &self.inner;
        if !inner.store.places() {
            return Ok(0);
        }
        let claimed = inner
            .store
            .claim_starts(&inner.config.node, CLAIM_BATCH)
            .await?;
        let count = claimed.len();
        for claim in claimed {
            let engine = self.clone();
            inner.tasks.spawn(async move {
                let id = *claim.record.session.id();
                let starting = Arc::new(tokio::sync::Mutex::new(()));
                let _acquiring = Arc::clone(&starting).lock_owned().await;
                lock(&engine.inner.starting).insert(id, starting);
                engine.start_claimed(claim).await;
                lock(&engine.inner.starting).remove(&id);
            });
        }
        Ok(count)
    }

    /// Starts a session another instance placed here, and reports the outcome: started,
    /// or refused so that it is placed elsewhere. It refuses when it has no room (draining,
    /// stopping, its backends full) and when an acquire fails (the avatar server cannot be
    /// spawned, the GPU share cannot be claimed): every backend acquires before anything
    /// is recorded or tracked, so a refusal gives back what was acquired and leaves the
    /// session as it was placed, holding nothing. A failure after that (recording a
    /// resource) ends it `start_failed` (see `run_here`).
    async fn start_claimed(&self, claim: ClaimedStart) {
        let inner = &self.inner;
        let node = inner.config.node.clone();
        let id = *claim.record.session.id();
        let resources = decode_request(&claim.request);
        let acquired = match self.room_here(resources).await {
            Ok(()) => self.acquire_unrecorded(&claim.record, resources).await,
            Err(why) => Err(Some(why)),
        };
        let acquired = match acquired {
            Ok(acquired) => acquired,
            // Stopping: the session stays as placed; this node's next start ends it
            // `start_failed` and adopts what the acquires left (`end_interrupted_starts`).
            Err(None) => return,
            Err(Some(why)) => {
                tracing::info!(session = %id, reason = %why, "refusing a session placed here");
                if let Err(e) = inner.store.finish_start(id, &node, Some(&why)).await {
                    tracing::warn!(session = %id, error = %e, "reporting a refused start failed; its create places it again when it sees no start");
                }
                return;
            }
        };
        match self.run_here(claim.record, resources, None, acquired).await {
            Ok(_) => {
                if let Err(e) = inner.store.finish_start(id, &node, None).await {
                    tracing::warn!(session = %id, error = %e, "reporting a finished start failed");
                }
            }
            Err(e) => {
                tracing::warn!(session = %id, error = %e, "a session placed here failed to start")
            }
        }
    }

    /// Acquires the session's resources from every backend in order, recording nothing.
    /// On a failure it releases what it acquired (the last first) and answers why; `None`
    /// when the engine stops meanwhile (what was acquired is left to the next start, as a
    /// stop leaves any interrupted acquire).
    async fn acquire_unrecorded(
        &self,
        record: &SessionRecord,
        resources: ResourceRequest,
    ) -> Result<Vec<Acquired>, Option<String>> {
        let inner = &self.inner;
        let id = *record.session.id();
        let mut env = vec![(SESSION_ID_ENV.to_owned(), id.to_string())];
        let mut acquired: Vec<Acquired> = Vec::with_capacity(inner.backends.len());
        for backend in &inner.backends {
            let request = AcquireRequest {
                resources,
                session: id,
                tenant: &record.tenant,
                env: &env,
            };
            let Some(outcome) = self.acquire_from(backend.as_ref(), request).await else {
                return Err(None);
            };
            match outcome {
                Ok(got) => {
                    env.extend(got.env.iter().cloned());
                    acquired.push(got);
                }
                Err(e) => {
                    tracing::warn!(session = %id, backend = backend.name(), error = %e, "acquire failed for a session placed here");
                    self.release_unrecorded(id, acquired.into_iter()).await;
                    return Err(Some(format!("{}: {e}", backend.name())));
                }
            }
        }
        Ok(acquired)
    }

    /// The placed-start loop: claims whenever the store says a session was placed here,
    /// and every `release_poll` besides.
    pub(super) async fn run_placed_starts(&self) {
        let inner = &self.inner;
        loop {
            if let Err(e) = self.placed_starts_once().await {
                tracing::warn!(error = %e, "claiming sessions placed on this node failed");
            }
            tokio::select! {
                _ = inner.starts_due.notified() => {}
                _ = inner.clock.sleep(inner.config.release_poll) => {}
            }
        }
    }

    /// Ends `start_failed` the placed sessions this node was starting when its previous
    /// run stopped (see `recover`): their creates were answered with an error, or give up
    /// on them, and resources the previous run acquired were adopted for their release.
    pub(super) async fn end_interrupted_starts(&self) -> Result<(), EngineError> {
        let inner = &self.inner;
        if !inner.store.places() {
            return Ok(());
        }
        for id in inner.store.interrupted_starts(&inner.config.node).await? {
            tracing::warn!(session = %id, "ending a placed start the previous run left unfinished");
            self.end_internal(id, EndReason::StartFailed).await?;
        }
        Ok(())
    }
}

fn no_slot(max: u32) -> EngineError {
    EngineError::CapacityExhausted(format!(
        "this node runs the most sessions it may ({max}, --max-node-sessions)"
    ))
}

fn no_room() -> EngineError {
    EngineError::CapacityExhausted("no live node has room for the session".to_owned())
}

/// What a create asks of its resources, as kept with a session placed on another node.
fn encode_request(request: &ResourceRequest) -> String {
    let mut parts = Vec::new();
    if let Some(bytes) = request.gpu_memory {
        parts.push(format!("gpu_memory={bytes}"));
    }
    if let Some(device) = request.gpu_device {
        parts.push(format!("gpu_device={device}"));
    }
    if let Some(timeout) = request.ready_timeout {
        parts.push(format!("ready_timeout_ms={}", timeout.as_millis()));
    }
    parts.join(",")
}

/// [`encode_request`] read back; a part it does not know keeps its default.
fn decode_request(text: &str) -> ResourceRequest {
    let mut request = ResourceRequest::default();
    for part in text.split(',') {
        let Some((key, value)) = part.split_once('=') else {
            continue;
        };
        match key {
            "gpu_memory" => request.gpu_memory = value.parse().ok(),
            "gpu_device" => request.gpu_device = value.parse().ok(),
            "ready_timeout_ms" => {
                request.ready_timeout = value.parse().ok().map(Duration::from_millis);
            }
            _ => {}
        }
    }
    request
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_placed_request_reads_back_as_written() {
        let request = ResourceRequest {
            gpu_memory: Some(3 << 30),
            gpu_device: Some(1),
            ready_timeout: Some(Duration::from_millis(2500)),
        };
        assert_eq!(decode_request(&encode_request(&request)), request);
        assert_eq!(decode_request(""), ResourceRequest::default());
        assert_eq!(
            decode_request("gpu_memory=x,junk"),
            ResourceRequest::default()
        );
    }
}
