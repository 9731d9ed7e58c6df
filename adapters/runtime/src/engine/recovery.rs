//! What a node settles when it starts, before it serves: its stale claims, the timers of
//! its started sessions, resources acquired just before a crash, and every release it
//! still owes.

use std::collections::BTreeMap;
use std::sync::Arc;

use session_lifecycle::{Resource, Session, SessionId, Status};

use super::{Engine, EngineError};
use crate::store::{AttachOutcome, ListQuery};

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
        self.adopt_untracked(&candidates).await?;
        self.resume_held(&started).await;
        let owed = self.releases_once().await?;
        if owed.released + owed.release_failures > 0 {
            tracing::info!(
                released = owed.released,
                failed = owed.release_failures,
                "settled releases this node owed from its previous run"
            );
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
    /// of (acquired just before a crash), so that they are released with their session; one
    /// of a session that has ended is released at once.
    async fn adopt_untracked(&self, sessions: &[Session]) -> Result<(), EngineError> {
        if sessions.is_empty() {
            return Ok(());
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
        for (id, resources) in late {
            self.release_before_the_rest(id, resources);
        }
        Ok(())
    }

    /// Releases `resources` (in reverse acquisition order), acquired last by the ended
    /// session `id` and never recorded, in a tracked task that the session's recorded
    /// releases wait for (as they wait for a start): the node starts serving meanwhile, and
    /// nothing the session acquired earlier is released before them.
    fn release_before_the_rest(&self, id: SessionId, resources: Vec<Resource>) {
        let lock = Arc::new(tokio::sync::Mutex::new(()));
        let Ok(held) = Arc::clone(&lock).try_lock_owned() else {
            return;
        };
        super::lock(&self.inner.starting).insert(id, lock);
        let engine = self.clone();
        self.inner.tasks.spawn(async move {
            for resource in resources.into_iter().rev() {
                engine.release_now(id, resource).await;
            }
            super::lock(&engine.inner.starting).remove(&id);
            drop(held);
        });
    }
}
