//! The engine's settings, requests, reports and errors.

use std::time::Duration;

use session_lifecycle::{Policy, ResourceKind, SessionId};

use tokio_util::task::TaskTracker;

use crate::backend::ResourceRequest;
use session_lifecycle_store::{PlacementPolicy, RoomBinding, SessionTimeouts, StoreError};

/// How many started sessions one engine tracks timers for. Starting more fails with
/// [`EngineError::CapacityExhausted`]; a node runs far fewer avatar servers than this.
pub const TIMER_SLOTS: usize = 16_384;

/// How long to wait before trying again a store write that a timer or the sweep could not
/// make (the store was unreachable): the session's timer is put back for then.
pub(crate) const STORE_RETRY: Duration = Duration::from_secs(1);

/// Whether a node can take new sessions (see `Engine::readiness`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// It can.
    Ready,
    /// It is draining: running sessions continue, new ones go elsewhere.
    Draining,
    /// A backend has no room for a session of the default size (no GPU with enough memory).
    NoCapacity(String),
    /// The store cannot be reached.
    StoreUnreachable(String),
}

/// The engine's background tasks; dropping this does not stop them, `Engine::shutdown`
/// does.
pub struct Background {
    pub(super) tasks: TaskTracker,
}

impl Background {
    /// Waits for every background task to finish (after `Engine::shutdown`).
    pub async fn join(self) {
        self.tasks.close();
        self.tasks.wait().await;
    }
}

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
    /// by ends here, by the store's notifications of ends elsewhere and by retry times.
    pub release_poll: Duration,
    /// How long a claim on a session's releases lasts; it is renewed before each release of
    /// the session, so it must outlast the longest single release (see
    /// [`release_deadlines`](Self::release_deadlines)).
    pub release_lease: Duration,
    /// The most sessions whose releases are claimed in one pass (they release in
    /// parallel, each session's resources one at a time).
    pub release_batch: u32,
    /// The longest one release attempt may take, per resource kind, overriding the
    /// backend's own [`release_deadline`](crate::ResourceBackend::release_deadline). Past
    /// it the attempt counts as failed and is retried after the backoff, while the resource
    /// stays held.
    pub release_deadlines: Vec<(ResourceKind, Duration)>,
    /// The most due sessions ended in one sweep pass.
    pub sweep_batch: u32,
    /// Wait after a room empties before ending its session (none by default); someone
    /// joining meanwhile keeps it. A session may set its own within its plan
    /// ([`SessionTimeouts::participant_left`]).
    pub room_grace: Duration,
    /// How long a session bound to a room waits for a first participant before it ends
    /// `nobody_joined` (no limit by default: the orphan timeout still applies). A session may
    /// set its own within its plan ([`SessionTimeouts::participant_absent`]).
    pub participant_absent: Option<Duration>,
    /// Wait after a session's last client WebSocket closes, on every instance, before it
    /// ends `websocket_disconnected` (none by default); a reconnect meanwhile, to any
    /// instance, keeps it. A session may set its own within its plan
    /// ([`SessionTimeouts::websocket_grace`]).
    pub websocket_grace: Duration,
    /// How long the room events and participants of an ended session are kept (for
    /// deduplicating late deliveries) before the sweep prunes them.
    pub room_retention: Duration,
    /// After the store comes back from an outage, how long nothing is judged silent (no
    /// orphan, no dead node), so that live nodes and clients have time to report again.
    /// Two heartbeats by default.
    pub outage_settle: Duration,
    /// The most started sessions this node runs at once (its session slots); `None`: no
    /// limit. A create beyond it fails with [`EngineError::CapacityExhausted`], or, on a
    /// store that places sessions across a fleet, goes to a node with a free slot.
    pub max_node_sessions: Option<u32>,
    /// How a create chooses the node of its session, on a store that places sessions
    /// across a fleet (see [`FleetPlacement`](session_lifecycle_store::FleetPlacement)).
    pub placement: PlacementPolicy,
    /// How long a create placed on another node waits for that node to start the session
    /// before it ends it `start_failed` and answers so.
    pub placement_wait: Duration,
    /// How long a session placed on another node may wait unclaimed (that node may have
    /// just died, its heartbeat still fresh) before it is placed on another node.
    pub placement_claim_timeout: Duration,
    /// How long a usage period is: each started session this node runs gets a usage
    /// record per closed period, so that a bill can be cut while it runs (see
    /// [`usage`](session_lifecycle_store::usage)). Periods count from the epoch; a
    /// divisor of an hour keeps every record inside one hour and one day. Must be whole
    /// seconds dividing an hour (60, 300, 900, 3600 ...), or `Engine::open`
    /// refuses it with [`EngineError::InvalidUsagePeriod`].
    pub usage_period: Duration,
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
            release_deadlines: Vec::new(),
            sweep_batch: 1024,
            room_grace: Duration::ZERO,
            participant_absent: None,
            websocket_grace: Duration::ZERO,
            room_retention: Duration::from_secs(24 * 3600),
            outage_settle: Duration::from_secs(10),
            max_node_sessions: None,
            placement: PlacementPolicy::Spread,
            placement_wait: Duration::from_secs(20),
            placement_claim_timeout: Duration::from_secs(3),
            usage_period: Duration::from_secs(300),
        }
    }
}

/// A tenant's plan: how many sessions it may run at once, for how long, and the longest
/// timeouts a session may set for itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// The most started sessions at once; `None` for no limit.
    pub max_concurrent_sessions: Option<u32>,
    /// The longest a session may run.
    pub max_session: Duration,
    /// The longest [`SessionTimeouts::participant_left`] a session may set.
    pub max_participant_left: Duration,
    /// The longest [`SessionTimeouts::participant_absent`] a session may set.
    pub max_participant_absent: Duration,
    /// The longest [`SessionTimeouts::websocket_grace`] a session may set.
    pub max_websocket_grace: Duration,
    /// How its sessions' usage is billed (kept with each session at its creation).
    pub billing: session_lifecycle::usage::BillingRule,
}

impl Plan {
    /// A plan of `max_concurrent_sessions` sessions of at most `max_session` each, whose
    /// sessions may set any timeout up to `max_session`.
    pub fn new(max_concurrent_sessions: Option<u32>, max_session: Duration) -> Plan {
        Plan {
            max_concurrent_sessions,
            max_session,
            max_participant_left: max_session,
            max_participant_absent: max_session,
            max_websocket_grace: max_session,
            billing: session_lifecycle::usage::BillingRule::default(),
        }
    }

    /// Checks the timeouts a session asks for against this plan.
    pub fn check(&self, asked: &SessionTimeouts) -> Result<(), EngineError> {
        let limits = [
            (
                "participant_left_timeout_ms",
                asked.participant_left,
                self.max_participant_left,
            ),
            (
                "participant_absent_timeout_ms",
                asked.participant_absent,
                self.max_participant_absent,
            ),
            (
                "websocket_grace_ms",
                asked.websocket_grace,
                self.max_websocket_grace,
            ),
        ];
        for (timeout, value, max) in limits {
            if value.is_some_and(|v| v > max) {
                return Err(EngineError::TimeoutOverPlan { timeout, max });
            }
        }
        Ok(())
    }
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
    /// The timeouts it sets for itself (within its plan); `None` takes the engine's
    /// default.
    pub timeouts: SessionTimeouts,
    /// What it asks of its resources (GPU memory, device).
    pub resources: ResourceRequest,
    /// Where its events go besides its tenant's endpoints (the caller checked it).
    pub callback_url: Option<String>,
}

impl StartRequest {
    /// A session of `tenant` under `plan`, with every default: the plan's longest
    /// duration, no metadata, no room, the engine's timeouts, the backends' default
    /// resources, no callback.
    pub fn new(tenant: impl Into<String>, plan: Plan) -> StartRequest {
        StartRequest {
            tenant: tenant.into(),
            plan,
            duration: None,
            metadata: None,
            room: None,
            timeouts: SessionTimeouts::default(),
            resources: ResourceRequest::default(),
            callback_url: None,
        }
    }
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
    /// A timeout the session asked for is longer than its plan allows; nothing was done.
    #[error("{timeout} exceeds the plan's limit of {} ms", max.as_millis())]
    TimeoutOverPlan {
        /// The timeout's API name.
        timeout: &'static str,
        /// The plan's limit.
        max: Duration,
    },
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
    /// The engine's settings cannot be used (an invalid policy).
    #[error("invalid engine settings: {0}")]
    InvalidConfig(#[from] session_lifecycle::PolicyError),
    /// [`EngineConfig::usage_period`] is not a whole number of seconds that divides an
    /// hour (shorter periods would write a usage record per session every few
    /// milliseconds; others would cut records at every hour besides).
    #[error(
        "invalid engine settings: usage period of {} ms must be whole seconds dividing an hour",
        period.as_millis()
    )]
    InvalidUsagePeriod {
        /// The period asked for.
        period: Duration,
    },
    /// The store failed; nothing was acknowledged. Worth retrying.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The engine is shutting down and takes no new sessions.
    #[error("shutting down")]
    ShuttingDown,
    /// This node is draining: its running sessions continue, new ones go elsewhere.
    #[error("draining: this node takes no new sessions")]
    Draining,
}

/// What one `Engine::run_due` pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DueReport {
    /// Sessions this pass ended with `expired`.
    pub expired: u32,
    /// Sessions this pass ended with `orphaned`.
    pub orphaned: u32,
    /// Sessions of dead nodes this pass ended with `node_lost`.
    pub node_lost: u32,
    /// Releases completed.
    pub released: u32,
    /// Release attempts that failed (retried later).
    pub release_failures: u32,
    /// Sessions whose usage periods this pass closed.
    pub usage_closed: u32,
}

impl DueReport {
    pub(crate) fn add(&mut self, other: DueReport) {
        self.expired += other.expired;
        self.orphaned += other.orphaned;
        self.node_lost += other.node_lost;
        self.released += other.released;
        self.release_failures += other.release_failures;
        self.usage_closed += other.usage_closed;
    }
}

/// What one room event did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoomEventReport {
    /// The event was applied before (a repeated delivery): nothing happened.
    pub duplicate: bool,
    /// Sessions this event ended with `room_empty`.
    pub ended: Vec<SessionId>,
}
