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
//! - `placement`: session slots, and on a store shared by a fleet the node each create's
//!   session runs on, the starts other instances place here and the wait for one placed
//!   elsewhere;
//! - `recovery`: what a restarted node settles before it serves;
//! - `tasks`: the background loops, each a `run` over a `*_once` step that
//!   [`Engine::run_due`] calls too, every task tracked, and shutdown.
//!
//! # Shared state and its locks
//!
//! The store is the source of truth; what the engine keeps in memory is either a mirror
//! of it (the timers) or bookkeeping of work under way on this node. Each piece has one
//! lock, and each lock guards one invariant:
//!
//! | lock (in `Inner`) | guards |
//! | --- | --- |
//! | `timers` | the timer table mirrors the store's started sessions of this node: a session is ended in it only after the store has the end |
//! | `health` (shared with the watched store) | the record of when the store could not be reached, so silence in an outage is never judged |
//! | `pending_touches` | liveness received in an outage, written before anything is judged |
//! | `starting` | the sessions still acquiring resources here; each entry's own async lock is held for the whole start, so a release run of that session waits for it (last acquired, first released) |
//! | `releases` ([`ReleaseBook`]) | one release run per session at a time, the failing resources, progress not yet recorded (written before the next claim), the next retry time and the runs this node started with its own ends |
//! | `node_self` ([`NodeSelf`]) | what this node last wrote of itself: its heartbeat time and its report |
//! | `events_rx` | the one receiver of backend events, taken by the event loop |
//! | `slot_gate` (async) | one machine with limited slots: held from a create's slot count until its session is tracked, so the last slot is taken once |
//! | `sockets.held` | this node's client sockets per session; each session's own async lock (`Recorded`) orders its presence writes |
//!
//! Order: no synchronous lock is ever held while another is taken, nor across an
//! `.await` (each is taken, read or changed, and let go in one statement or block;
//! `clippy::await_holding_lock` in CI holds the second part). The two kinds of
//! per-session async locks (`starting`'s and `sockets`' `Recorded`) are held across store
//! and backend calls by design, are only ever taken with no synchronous lock held, and
//! never one inside the other; `slot_gate` is taken only by a start holding its own
//! `starting` lock, and no async lock is taken while it is held. `closing` and `draining`
//! are atomics read on their own.

mod api;
mod config;
mod health;
mod held;
mod outages;
mod placement;
mod recovery;
mod releases;
mod rooms;
pub(crate) mod sockets;
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

pub(crate) use config::STORE_RETRY;
pub use config::{
    Background, DueReport, EngineConfig, EngineError, Plan, Readiness, RoomEventReport,
    StartRequest, TIMER_SLOTS,
};

use crate::backend::{EventSink, ResourceBackend, ResourceEvent};
use crate::clock::RuntimeClock;
use crate::metrics::Metrics;
use session_lifecycle_store::NodeReport;
use session_lifecycle_store::Store;

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
    /// A session may have been placed on this node by another instance: claim its start.
    starts_due: Notify,
    /// A placed session's start finished or was refused somewhere: its waiter looks.
    placed_changed: Notify,
    /// Held from a create's slot count to its session being tracked, when this node's
    /// slots are limited and its store does not place (one machine): two creates never
    /// both take the last slot.
    slot_gate: tokio::sync::Mutex<()>,
    events: EventSink,
    events_rx: Mutex<Option<mpsc::Receiver<ResourceEvent>>>,
    /// Set when shutting down or draining: no new sessions.
    closing: AtomicBool,
    /// Set when draining: running sessions continue, no new ones start here.
    draining: AtomicBool,
    /// Sessions still acquiring their resources here: their releases wait for the start
    /// to finish, so that a resource acquired last is also released first.
    starting: Mutex<BTreeMap<SessionId, Arc<tokio::sync::Mutex<()>>>>,
    /// What this node last wrote of itself: its heartbeat and its report.
    node_self: Mutex<NodeSelf>,
    /// The release worker's bookkeeping on this node.
    releases: Mutex<ReleaseBook>,
    /// Every task the engine starts: background loops, room-grace waits.
    tasks: TaskTracker,
    /// The release runs of sessions (each one session's releases, in order).
    release_tasks: TaskTracker,
    /// Client WebSockets held on this node.
    sockets: held::Sockets,
    /// Cancelled at shutdown: every task stops.
    cancel: CancellationToken,
    metrics: Arc<Metrics>,
}

/// The release worker's bookkeeping on this node, one lock for the whole of it: each
/// field changes with a release run's start, outcome or end.
#[derive(Default)]
struct ReleaseBook {
    /// Sessions whose release run is going on this node (one run per session at a time).
    running: BTreeSet<SessionId>,
    /// Resources whose last release attempt here failed and that are not released yet.
    failing: BTreeSet<(SessionId, Resource)>,
    /// Release progress the store could not take when it was made; written before the next
    /// claim.
    unrecorded: Vec<session_lifecycle_store::ReleaseProgress>,
    /// The earliest retry time a session's releases wait for on this node.
    next_retry: Option<Timestamp>,
    /// Runs of sessions this node ended itself (claimed with the end), not yet waited for
    /// by a [`Engine::run_due`].
    local_runs: Vec<tokio::task::JoinHandle<DueReport>>,
}

/// What this node last wrote of itself to the store.
#[derive(Default)]
struct NodeSelf {
    /// When its heartbeat was last written.
    last_heartbeat: Option<Timestamp>,
    /// What it last reported of itself (draining, room, GPUs) ...
    report: NodeReport,
    /// ... and whether the store has that report.
    report_stored: bool,
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
        let period = config.usage_period;
        if period.subsec_nanos() != 0 || period.is_zero() || 3600 % period.as_secs() != 0 {
            return Err(EngineError::InvalidUsagePeriod { period });
        }
        let table_policy = Policy {
            retention: Duration::ZERO,
            ..config.policy
        };
        let timers = boxed_table(table_policy)?;
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
                starts_due: Notify::new(),
                placed_changed: Notify::new(),
                slot_gate: tokio::sync::Mutex::new(()),
                events,
                events_rx: Mutex::new(Some(events_rx)),
                closing: AtomicBool::new(false),
                draining: AtomicBool::new(false),
                starting: Mutex::new(BTreeMap::new()),
                node_self: Mutex::new(NodeSelf::default()),
                releases: Mutex::new(ReleaseBook::default()),
                tasks: TaskTracker::new(),
                release_tasks: TaskTracker::new(),
                sockets: held::Sockets::default(),
                cancel: CancellationToken::new(),
                metrics,
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
        lock(&self.inner.releases).failing.len()
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

/// Builds the timer table directly on the heap. The table is a large inline array; built
/// on a task's stack it could overflow it, so it is built on a thread with room for it.
fn boxed_table(policy: Policy) -> Result<Box<SessionTable<TIMER_SLOTS>>, EngineError> {
    let size = std::mem::size_of::<SessionTable<TIMER_SLOTS>>();
    std::thread::Builder::new()
        .name("timer-table".to_owned())
        .stack_size(4 * size + (1 << 20))
        .spawn(move || SessionTable::new(policy).map(Box::new))
        .map_err(|e| EngineError::StartFailed(format!("building the timer table: {e}")))?
        .join()
        .map_err(|_| EngineError::StartFailed("building the timer table panicked".to_owned()))?
        .map_err(EngineError::InvalidConfig)
}
