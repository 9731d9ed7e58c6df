//! Simulated resource backends (a GPU share and an avatar server process per session) and
//! the ledger of every resource the cluster ever acquired: the world's truth that the
//! release invariants are checked against, at the moment each release runs.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use session_lifecycle::{EndReason, ReleaseState, Resource, ResourceKind, SessionId};
use session_lifecycle_runtime::{
    AcquireError, AcquireRequest, Acquired, BoxFuture, EventSink, ReleaseError, ReleaseNote,
    ResourceBackend, ResourceEvent, Store, lock,
};

use crate::rng::Rng;

/// The GPU share's kind: acquired first, released last.
pub const GPU: ResourceKind = ResourceKind(2);
/// The avatar server process's kind: acquired second, released first.
pub const PROCESS: ResourceKind = ResourceKind(1);

/// Where one acquired resource stands in the world.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// Held by its session.
    Held,
    /// A release attempt is running.
    Releasing,
    /// Given back.
    Released,
}

/// One resource ever acquired.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Its session.
    pub session: SessionId,
    /// The node whose machine holds it.
    pub node: usize,
    /// Acquisition order across the world (later acquired, larger).
    pub order: u64,
    /// Where it stands. Given back once: a later release finds it gone and does nothing,
    /// which is allowed while the store had not recorded the release (a crash or a lost
    /// answer in between; releases are repeatable) and a violation once it had.
    pub state: Held,
}

/// Every resource acquired in the run, and what went wrong with their releases.
#[derive(Default)]
pub struct Ledger {
    /// By resource.
    pub entries: BTreeMap<Resource, Entry>,
    /// Release invariants broken, as they happened.
    pub violations: Vec<String>,
    /// The event sink of each node's current run, for avatars exiting on their own.
    pub sinks: BTreeMap<usize, EventSink>,
    next_handle: u64,
}

/// How the backends misbehave, set by the run.
#[derive(Debug, Clone, Copy, Default)]
pub struct Misbehaviour {
    /// Acquires and releases take time (up to a few seconds, sometimes much longer).
    pub slow: bool,
    /// Some acquires and releases fail.
    pub failing: bool,
    /// Some releases hang until the engine gives up on them.
    pub hanging: bool,
}

/// What the backends share: the ledger, the raw store (to check a release against what is
/// recorded), chance, and how they misbehave now.
pub struct World {
    /// The ledger.
    pub ledger: Mutex<Ledger>,
    /// The store as it is, without injected faults.
    pub store: Arc<dyn Store>,
    /// The backends' chance.
    pub rng: Mutex<Rng>,
    /// How they misbehave now.
    pub misbehaviour: Mutex<Misbehaviour>,
}

/// One node's backend of one kind.
pub struct SimBackend {
    kind: ResourceKind,
    node: usize,
    world: Arc<World>,
}

impl SimBackend {
    /// The backend of `kind` on node `node`.
    pub fn new(kind: ResourceKind, node: usize, world: Arc<World>) -> SimBackend {
        SimBackend { kind, node, world }
    }

    /// A delay, per the misbehaviour now: none, short, or (rarely, when hanging) longer
    /// than any release deadline.
    fn delay(&self, may_hang: bool) -> Duration {
        let how = *lock(&self.world.misbehaviour);
        let mut rng = lock(&self.world.rng);
        if may_hang && how.hanging && rng.chance(40) {
            return Duration::from_secs(3_600);
        }
        if how.slow {
            Duration::from_millis(rng.below(3_000))
        } else {
            Duration::ZERO
        }
    }

    fn fails(&self) -> bool {
        let how = *lock(&self.world.misbehaviour);
        how.failing && lock(&self.world.rng).chance(60)
    }
}

/// Marks a release attempt as no longer running if it is dropped (the engine gave up on
/// it at its deadline, or the node crashed) before it finished.
struct Attempt<'a> {
    world: &'a World,
    resource: Resource,
    done: bool,
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if !self.done {
            let mut ledger = lock(&self.world.ledger);
            if let Some(entry) = ledger.entries.get_mut(&self.resource)
                && entry.state == Held::Releasing
            {
                entry.state = Held::Held;
            }
        }
    }
}

impl ResourceBackend for SimBackend {
    fn kind(&self) -> ResourceKind {
        self.kind
    }

    fn name(&self) -> &'static str {
        if self.kind == GPU {
            "sim-gpu"
        } else {
            "sim-process"
        }
    }

    fn acquire<'a>(
        &'a self,
        request: AcquireRequest<'a>,
        events: EventSink,
    ) -> BoxFuture<'a, Result<Acquired, AcquireError>> {
        Box::pin(async move {
            let delay = self.delay(false);
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if self.fails() {
                return Err(AcquireError::Failed(format!("{} refused", self.name())));
            }
            let mut ledger = lock(&self.world.ledger);
            ledger.next_handle += 1;
            let resource = Resource {
                kind: self.kind,
                handle: ledger.next_handle,
            };
            let order = ledger.next_handle;
            ledger.entries.insert(
                resource,
                Entry {
                    session: request.session,
                    node: self.node,
                    order,
                    state: Held::Held,
                },
            );
            ledger.sinks.insert(self.node, events);
            Ok(Acquired {
                resource,
                env: Vec::new(),
            })
        })
    }

    fn release(
        &self,
        session: SessionId,
        resource: Resource,
    ) -> BoxFuture<'_, Result<ReleaseNote, ReleaseError>> {
        Box::pin(async move {
            {
                let mut ledger = lock(&self.world.ledger);
                let Some(entry) = ledger.entries.get(&resource).cloned() else {
                    ledger
                        .violations
                        .push(format!("release of {resource:?}, never acquired"));
                    return Ok(ReleaseNote::Gone);
                };
                if entry.session != session || entry.node != self.node {
                    ledger.violations.push(format!(
                        "{resource:?} released for session {session} on node {}, held by {} on node {}",
                        self.node, entry.session, entry.node
                    ));
                }
                if entry.state == Held::Releasing {
                    ledger
                        .violations
                        .push(format!("{resource:?} of {session}: two releases at once"));
                }
                // One release of a session at a time.
                if let Some((other, _)) = ledger.entries.iter().find(|(r, e)| {
                    e.session == session && e.state == Held::Releasing && **r != resource
                }) {
                    let message = format!(
                        "{resource:?} of {session} released while {other:?} of it was being released"
                    );
                    ledger.violations.push(message);
                }
                // Reverse acquisition order: everything the session acquired later is
                // given back first.
                let later_held = ledger.entries.iter().find(|(r, e)| {
                    e.session == session
                        && e.order > entry.order
                        && e.state != Held::Released
                        && **r != resource
                });
                if let Some((later, e)) = later_held
                    && entry.state != Held::Released
                {
                    let message = format!(
                        "{resource:?} of {session} released before {later:?}, acquired after it ({:?} on n{})",
                        e.state, e.node
                    );
                    ledger.violations.push(message);
                }
                if let Some(e) = ledger.entries.get_mut(&resource)
                    && e.state == Held::Held
                {
                    e.state = Held::Releasing;
                }
            }
            let mut attempt = Attempt {
                world: &self.world,
                resource,
                done: false,
            };
            // A release the store already records as done must never run again.
            if let Ok(Some(record)) = self.world.store.get(session).await {
                let recorded = record.session.resources().iter().any(|r| {
                    r.resource == resource && matches!(r.release, ReleaseState::Released { .. })
                });
                if recorded {
                    lock(&self.world.ledger).violations.push(format!(
                        "{resource:?} of {session} released again after the store recorded it released"
                    ));
                }
            }
            let delay = self.delay(true);
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            attempt.done = true;
            let failed = self.fails();
            let mut ledger = lock(&self.world.ledger);
            let Some(entry) = ledger.entries.get_mut(&resource) else {
                return Ok(ReleaseNote::Gone);
            };
            if failed {
                if entry.state == Held::Releasing {
                    entry.state = Held::Held;
                }
                return Err(ReleaseError::transient(format!("{} busy", self.name())));
            }
            if entry.state == Held::Released {
                Ok(ReleaseNote::Gone)
            } else {
                entry.state = Held::Released;
                Ok(if self.kind == GPU {
                    ReleaseNote::Freed
                } else {
                    ReleaseNote::Sigterm
                })
            }
        })
    }

    fn release_deadline(&self) -> Duration {
        Duration::from_secs(10)
    }

    fn resume<'a>(
        &'a self,
        _session: SessionId,
        _resource: Resource,
        events: EventSink,
    ) -> BoxFuture<'a, Result<(), ReleaseError>> {
        Box::pin(async move {
            lock(&self.world.ledger).sinks.insert(self.node, events);
            Ok(())
        })
    }

    fn find_held<'a>(
        &'a self,
        sessions: &'a [SessionId],
    ) -> BoxFuture<'a, Result<Vec<(SessionId, Resource)>, ReleaseError>> {
        Box::pin(async move {
            let ledger = lock(&self.world.ledger);
            Ok(ledger
                .entries
                .iter()
                .filter(|(r, e)| {
                    r.kind == self.kind
                        && e.node == self.node
                        && e.state != Held::Released
                        && sessions.contains(&e.session)
                })
                .map(|(r, e)| (e.session, *r))
                .collect())
        })
    }
}

/// An avatar server exiting on its own: reported through its node's current sink.
pub async fn avatar_exits(world: &World, resource: Resource, session: SessionId, node: usize) {
    let sink = lock(&world.ledger).sinks.get(&node).cloned();
    if let Some(sink) = sink {
        sink.report(ResourceEvent {
            session,
            resource,
            kind: session_lifecycle_runtime::ResourceEventKind::Ends(EndReason::AvatarExited),
        })
        .await;
    }
}
