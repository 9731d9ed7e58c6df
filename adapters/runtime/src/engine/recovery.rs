//! What a node settles when it starts, before it serves: its stale claims, the timers of
//! its started sessions, resources acquired just before a crash, and every release it
//! still owes.

use std::collections::BTreeMap;
use std::sync::Arc;

use session_lifecycle::{Resource, Session, SessionId, Status};

use super::{Engine, EngineError};
use session_lifecycle_store::{AttachOutcome, ListQuery};

impl Engine {
    pub(super) async fn recover(&self) -> Result<(), EngineError> {
        let inner = &self.inner;
        self.heartbeat_once().await?;
        inner.store.drop_claims(&inner.config.node).await?;
        // The client sockets it held went with its previous run; their sessions were live
        // until now and have the orphan timeout for their clients to come back.
        inner
            .store
            .clear_presence(&inner.config.node, inner.clock.now())
            .await?;
        let mut started = Vec::new();
        let mut records = Vec::new();
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
                started.push(record.session.clone());
                records.push(record);
            }
        }
        self.resume_room_waits(&records).await;
        // A session that was starting when the previous run stopped may have ended since
        // (taken over as `node_lost`, ended through another instance): resources it
        // acquired and never recorded are looked for too, among this node's newest
        // sessions, where every start the previous run had under way lies.
        let newest = inner
            .store
            .list(ListQuery {
                tenant: None,
                status: None,
                limit: 500,
                before: None,
                node: Some(inner.config.node.clone()),
            })
            .await?;
        let mut candidates = started.clone();
        candidates.extend(
            newest
                .into_iter()
                .map(|r| r.session)
                .filter(|s| s.status() != Status::Started),
        );
        let late = self.adopt_untracked(&candidates).await?;
        self.resume_held(&started).await;
        // Placed starts that were under way end now, releasing what was adopted above.
        self.end_interrupted_starts().await?;
        let owed = self.releases_once().await?;
        if owed.released + owed.release_failures > 0 {
            tracing::info!(
                released = owed.released,
                failed = owed.release_failures,
                "settled releases this node owed from its previous run"
            );
        }
        // Only once the node is sure to start: a failed start leaves nothing running.
        for release in late {
            self.release_before_the_rest(release);
        }
        Ok(())
    }

    /// Hands every resource the started `sessions` hold back to its backend (see
    /// [`ResourceBackend::resume`](crate::ResourceBackend::resume)).
    async fn resume_held(&self, sessions: &[Session]) {
        let inner = &self.inner;
        for session in sessions {
            let Some(record) = self.inner.store.get(*session.id()).await.ok().flatten() else {
                continue;
            };
            for held in record.session.resources() {
                let Some(backend) = inner.by_kind.get(&held.resource.kind) else {
                    continue;
                };
                if let Err(e) = backend
                    .resume(*session.id(), held.resource, inner.events.clone())
                    .await
                {
                    tracing::warn!(session = %session.id(), resource = ?held.resource, error = %e, "taking a resource back failed");
                }
            }
        }
    }

    /// Records resources the backends hold for `sessions` that the store does not know
    /// of (acquired just before a crash), so that they are released with their session.
    /// Those of a session that has ended are returned, to be released before the rest of
    /// it: the session is marked as starting meanwhile, so that its recorded releases wait
    /// (see [`claim_and_spawn_releases`](Engine::claim_and_spawn_releases)).
    async fn adopt_untracked(&self, sessions: &[Session]) -> Result<Vec<LateRelease>, EngineError> {
        if sessions.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<SessionId> = sessions.iter().map(|s| *s.id()).collect();
        // Unrecorded resources of sessions that ended meanwhile, in acquisition order.
        let mut late: BTreeMap<SessionId, Vec<Resource>> = BTreeMap::new();
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
                    AttachOutcome::Refused => late.entry(id).or_default().push(resource),
                }
            }
        }
        let mut out = Vec::with_capacity(late.len());
        for (session, resources) in late {
            let lock = Arc::new(tokio::sync::Mutex::new(()));
            let Ok(held) = Arc::clone(&lock).try_lock_owned() else {
                continue;
            };
            super::lock(&self.inner.starting).insert(session, lock);
            out.push(LateRelease {
                session,
                resources,
                held,
            });
        }
        Ok(out)
    }

    /// Releases a late release's resources, newest first, in a tracked task, then lets the
    /// session's recorded releases go (its claim, if the worker took one meanwhile, runs out
    /// first). The node serves meanwhile.
    fn release_before_the_rest(&self, late: LateRelease) {
        let engine = self.clone();
        self.inner.tasks.spawn(async move {
            let LateRelease {
                session,
                resources,
                held,
            } = late;
            for resource in resources.into_iter().rev() {
                engine.release_now(session, resource).await;
            }
            super::lock(&engine.inner.starting).remove(&session);
            drop(held);
            engine.inner.releases_due.notify_one();
        });
    }
}

/// Resources an ended session acquired last and never recorded, found at start-up; the
/// session is marked as starting (`held`) until they are released.
struct LateRelease {
    session: SessionId,
    resources: Vec<Resource>,
    held: tokio::sync::OwnedMutexGuard<()>,
}
