//! The engine: drives the core with a store, resource backends and a clock.
//!
//! The core ([`session_lifecycle`]) is the one rulebook; this module only drives it:
//!
//! - `api`: start, end, get, list and liveness, each committed in the store first and
//!   mirrored in the in-memory timer table second;
//! - `timers`: the timer table of this node's started sessions (expiry and orphan
//!   deadlines), whose due work is ended durably before it is ended in memory;
//! - `sweeper`: the store sweep for what timers cannot see (dead nodes, other instances'
//!   sessions, room presence) and this node's heartbeat;
//! - `releases`: the release worker: it claims *sessions* with a release due on this
//!   node, and for each asks the core which resource is next, runs it, records the
//!   outcome, and goes on until the core says wait or done;
//! - `rooms`: room webhook events and their waits (after the last participant left, for
//!   a first one to join);
//! - `sockets`: client WebSockets held here, presence shared through the store, and the
//!   word that a session ended;
//! - `recovery`: what a restarted node settles before it serves;
//! - `tasks`: the background loops, each a `run` over a `*_once` step that
//!   [`Engine::run_due`] calls too, every task tracked, and shutdown.

mod api;
mod config;
mod health;
mod outages;
mod recovery;
mod releases;
mod rooms;
mod sockets;
mod sweeper;
mod tasks;
#[cfg(test)]
mod tests;
mod timers;
mod watched;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};

pub(crate) use session_lifecycle_store::lock;
use std::time::Duration;

use session_lifecycle::{
    Policy, Resource, ResourceKind, SessionId, SessionTable, Status, Timestamp,
};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use api::SESSION_ID_ENV;
pub use config::{
    DueReport, EngineConfig, EngineError, Plan, RoomEventReport, StartRequest, TIMER_SLOTS,
};
pub use sockets::SocketHold;
pub use tasks::{Background, Readiness};

use crate::backend::{EventSink, ResourceBackend, ResourceEvent};
use crate::clock::RuntimeClock;
use crate::metrics::Metrics;
use session_lifecycle_store::NodeReport;
use session_lifecycle_store::Store;

/// How long to wait before trying again a store write that a timer or the sweep could not
/// make (the store was unreachable): the session's timer is put back for then.
const STORE_RETRY: Duration = Duration::from_secs(1);

pub(crate) struct Inner {
    /// The store, watched: every call records whether it could be reached.
    store: Arc<dyn Store>,
    /// What the store's reachability has been: outages, the last recovery.
    health: Arc<Mutex<health::Reachability>>,
    /// Liveness signals received while the store could not be reached, by session: written
    /// as soon as it is back, before anything is judged.
    pending_touches: Mutex<BTreeMap<SessionId, Timestamp>>,
    backends: Vec<Arc<dyn ResourceBackend>>,
    by_kind: HashMap<ResourceKind, Arc<dyn ResourceBackend>>,
    /// The longest one release of each kind may take.
    release_deadlines: HashMap<ResourceKind, Duration>,
    clock: Arc<dyn RuntimeClock>,
    config: EngineConfig,
    /// Timers of this engine's started sessions: expiry and orphan deadlines. It holds no
    /// resources: those are released from the store's record.
    timers: Mutex<Box<SessionTable<TIMER_SLOTS>>>,
    /// A timer changed: the timer loop looks at its next deadline again.
    timers_changed: Notify,
    /// A release may have become due here: the release worker claims again.
    releases_due: Notify,
    /// Release progress the store could not take when it was made; written before the next
    /// claim.
    unrecorded: Mutex<Vec<session_lifecycle_store::ReleaseProgress>>,
    /// The earliest retry time a session's releases wait for on this node.
    next_retry: Mutex<Option<Timestamp>>,
    events: EventSink,
    events_rx: Mutex<Option<mpsc::Receiver<ResourceEvent>>>,
    /// Set when shutting down or draining: no new sessions.
    closing: AtomicBool,
    /// Set when draining: running sessions continue, no new ones start here.
    draining: AtomicBool,
    /// Sessions still acquiring their resources here: their releases wait for the start
    /// to finish, so that a resource acquired last is also released first.
    starting: Mutex<BTreeMap<SessionId, Arc<tokio::sync::Mutex<()>>>>,
    /// When this node's heartbeat was last written.
    last_heartbeat: Mutex<Option<Timestamp>>,
    /// Sessions whose release run is going on this node (one run per session at a time).
    running: Mutex<BTreeSet<SessionId>>,
    /// Resources whose last release attempt here failed and that are not released yet.
    failing: Mutex<BTreeSet<(SessionId, Resource)>>,
    /// Every task the engine starts: background loops, room-grace waits.
    tasks: TaskTracker,
    /// The release runs of sessions (each one session's releases, in order).
    release_tasks: TaskTracker,
    /// Runs of sessions this node ended itself (claimed with the end), not yet waited for
    /// by a [`Engine::run_due`].
    local_runs: Mutex<Vec<tokio::task::JoinHandle<DueReport>>>,
    /// Client WebSockets held on this node.
    sockets: sockets::Sockets,
    /// Cancelled at shutdown: every task stops.
    cancel: CancellationToken,
    metrics: Arc<Metrics>,
    /// What this node last reported of itself, and whether the store has that report.
    report: Mutex<(NodeReport, bool)>,
}

/// The session engine a service links in: start, end, get, list and record liveness,
/// with durable state, resource release and automatic termination.
///
/// Cloning is cheap; clones share one engine.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl Engine {
    /// Opens an engine over `store` and `backends` (acquired in this order at start,
    /// released in the reverse order at the end). Registers the node as alive, then
    /// recovers what a previous run of the same node left: claims it held are dropped, its
    /// started sessions get their timers back, resources acquired just before a crash are
    /// adopted, and every release it still owes (including those recorded as lost while it
    /// was away) runs before this returns.
    pub async fn open(
        store: Arc<dyn Store>,
        backends: Vec<Arc<dyn ResourceBackend>>,
        clock: Arc<dyn RuntimeClock>,
        config: EngineConfig,
    ) -> Result<Engine, EngineError> {
        config.policy.validate()?;
        let table_policy = Policy {
            retention: Duration::ZERO,
            ..config.policy
        };
        let timers = timers::boxed_table(table_policy)?;
        let by_kind = backends.iter().map(|b| (b.kind(), Arc::clone(b))).collect();
        let mut release_deadlines: HashMap<ResourceKind, Duration> = backends
            .iter()
            .map(|b| (b.kind(), b.release_deadline()))
            .collect();
        release_deadlines.extend(config.release_deadlines.iter().copied());
        let (events, events_rx) = EventSink::channel();
        let health = Arc::new(Mutex::new(health::Reachability::starting(clock.now())));
        let metrics = Arc::new(Metrics::default());
        let store: Arc<dyn Store> = Arc::new(watched::WatchedStore::new(
            store,
            Arc::clone(&health),
            Arc::clone(&clock),
            Arc::clone(&metrics),
        ));
        let engine = Engine {
            inner: Arc::new(Inner {
                store,
                health,
                pending_touches: Mutex::new(BTreeMap::new()),
                backends,
                by_kind,
                release_deadlines,
                clock,
                config,
                timers: Mutex::new(timers),
                timers_changed: Notify::new(),
                releases_due: Notify::new(),
                unrecorded: Mutex::new(Vec::new()),
                next_retry: Mutex::new(None),
                events,
                events_rx: Mutex::new(Some(events_rx)),
                closing: AtomicBool::new(false),
                draining: AtomicBool::new(false),
                starting: Mutex::new(BTreeMap::new()),
                last_heartbeat: Mutex::new(None),
                running: Mutex::new(BTreeSet::new()),
                failing: Mutex::new(BTreeSet::new()),
                tasks: TaskTracker::new(),
                release_tasks: TaskTracker::new(),
                local_runs: Mutex::new(Vec::new()),
                sockets: sockets::Sockets::default(),
                cancel: CancellationToken::new(),
                metrics,
                report: Mutex::new((NodeReport::default(), false)),
            }),
        };
        engine.recover().await?;
        Ok(engine)
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

    /// Resources whose last release attempt on this node failed and that are still held
    /// (for metrics: such a resource is retried, and never handed to another session).
    pub fn releases_failing(&self) -> usize {
        lock(&self.inner.failing).len()
    }

    /// When this node's timers next fire (an expiry, an orphan deadline, or a retry of an
    /// end the store could not take); `None` when no timer is armed.
    pub fn next_timer(&self) -> Option<Timestamp> {
        self.timers().next_deadline()
    }

    /// What the API calls resources of `kind` (see
    /// [`ResourceBackend::kind_name`](crate::ResourceBackend::kind_name)); `None` for a kind
    /// no backend of this engine hands out.
    pub fn kind_name(&self, kind: ResourceKind) -> Option<&'static str> {
        self.inner.by_kind.get(&kind).map(|b| b.kind_name())
    }

    /// The engine's store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// The engine's clock.
    pub fn now(&self) -> Timestamp {
        self.inner.clock.now()
    }

    /// Every node heard from within `window`, with whether it is alive (judged with this
    /// engine's `node_timeout`) and its last report of itself.
    pub async fn cluster_nodes(
        &self,
        window: Duration,
    ) -> Result<Vec<crate::NodeRow>, crate::StoreError> {
        let inner = &self.inner;
        inner
            .store
            .nodes(inner.clock.now(), inner.config.node_timeout, window)
            .await
    }

    /// This node's id.
    pub fn node(&self) -> &str {
        &self.inner.config.node
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.inner.config.policy
    }

    fn timers(&self) -> MutexGuard<'_, Box<SessionTable<TIMER_SLOTS>>> {
        lock(&self.inner.timers)
    }
}
