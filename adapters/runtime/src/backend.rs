//! Resource backends: what a session acquires when it starts and releases when it ends.

use session_lifecycle::{EndReason, Resource, ResourceKind, SessionId};
use tokio::sync::mpsc;

use crate::store::BoxFuture;

/// What a session asks of its resources, beyond what every session gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResourceRequest {
    /// GPU memory for the session, in bytes; `None` takes the GPU backend's default.
    pub gpu_memory: Option<u64>,
    /// The GPU to run on (its index), when it matters; `None` lets placement choose.
    pub gpu_device: Option<u32>,
}

/// What a backend is asked to acquire for a starting session.
#[derive(Debug, Clone)]
pub struct AcquireRequest<'a> {
    /// What the session asked for.
    pub resources: ResourceRequest,
    /// The session being started.
    pub session: SessionId,
    /// Its tenant.
    pub tenant: &'a str,
    /// Environment for the session's avatar server, from the backends acquired before
    /// this one (for example `CUDA_VISIBLE_DEVICES` from a GPU backend), starting with
    /// [`SESSION_ID_ENV`](crate::SESSION_ID_ENV).
    pub env: &'a [(String, String)],
}

/// A resource just acquired, and the environment it hands to later backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acquired {
    /// The resource, to be recorded as held by the session.
    pub resource: Resource,
    /// Variables for the avatar server's environment.
    pub env: Vec<(String, String)>,
}

/// Why a backend could not acquire its resource. It must have released anything it got
/// part-way before returning this.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AcquireError {
    /// No room for another session (no GPU with enough free memory, ...).
    #[error("no capacity: {0}")]
    CapacityExhausted(String),
    /// The resource could not be had for another reason (a command that cannot be
    /// spawned, a driver error, ...).
    #[error("{0}")]
    Failed(String),
}

/// Why a release attempt failed; the engine retries it with backoff.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ReleaseError(pub String);

/// Something that happened to a held resource on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceEvent {
    /// The session holding it.
    pub session: SessionId,
    /// The resource.
    pub resource: Resource,
    /// How the session must end because of it (an avatar server that exited by itself
    /// ends its session with `avatar_exited`).
    pub reason: EndReason,
}

/// Where backends report [`ResourceEvent`]s; the engine ends the session concerned.
#[derive(Debug, Clone)]
pub struct EventSink(pub(crate) mpsc::UnboundedSender<ResourceEvent>);

impl EventSink {
    /// Reports `event`. Dropped silently if the engine is gone.
    pub fn report(&self, event: ResourceEvent) {
        let _ = self.0.send(event);
    }

    /// A sink and its receiving end, for testing a backend on its own.
    pub fn channel() -> (EventSink, mpsc::UnboundedReceiver<ResourceEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (EventSink(tx), rx)
    }
}

/// One kind of resource a session holds (an avatar server process, a GPU assignment,
/// ...). The engine acquires from its backends in order when a session starts and releases
/// through the backend of the resource's kind when it ends.
pub trait ResourceBackend: Send + Sync + 'static {
    /// The kind of every resource this backend hands out; unique among an engine's
    /// backends.
    fn kind(&self) -> ResourceKind;

    /// A short name for logs.
    fn name(&self) -> &'static str;

    /// Acquires a resource for a starting session. Anything that happens to it later on
    /// its own is reported to `events`.
    fn acquire<'a>(
        &'a self,
        request: AcquireRequest<'a>,
        events: EventSink,
    ) -> BoxFuture<'a, Result<Acquired, AcquireError>>;

    /// Releases `resource`. Must be safe to repeat: releasing a resource that is already
    /// gone (a retry, or a release re-run after a crash) succeeds and does nothing. The
    /// returned note says how it went (for example `sigterm` or `sigkill`).
    fn release(
        &self,
        session: SessionId,
        resource: Resource,
    ) -> BoxFuture<'_, Result<String, ReleaseError>>;

    /// The longest one release may take, including the backend's own escalation (a
    /// SIGTERM grace and SIGKILL, an NVML wait and a kill). Past it the engine counts the
    /// attempt as failed and retries it after the backoff; the resource stays held
    /// meanwhile. [`EngineConfig::release_deadlines`](crate::EngineConfig::release_deadlines)
    /// overrides it per kind. The default is 30 s.
    fn release_deadline(&self) -> std::time::Duration {
        std::time::Duration::from_secs(30)
    }

    /// Whether a session asking `request` could get this backend's resource now (GPU
    /// memory neither used nor promised, ...), without acquiring anything: what readiness
    /// reports, so that a load balancer sends creates where they can succeed. The default
    /// always has room.
    fn room_for(&self, request: ResourceRequest) -> BoxFuture<'_, Result<(), AcquireError>> {
        let _ = request;
        Box::pin(async { Ok(()) })
    }

    /// Takes back `resource`, held by the started `session`, when a node starts again
    /// after a crash or an in-place upgrade: what the backend keeps in memory about its
    /// resources (a process to watch, a GPU share placement must count) is restored, and
    /// anything that happens to it later on its own is reported to `events`. The default
    /// does nothing.
    fn resume<'a>(
        &'a self,
        session: SessionId,
        resource: Resource,
        events: EventSink,
    ) -> BoxFuture<'a, Result<(), ReleaseError>> {
        let _ = (session, resource, events);
        Box::pin(async { Ok(()) })
    }

    /// Every resource of this backend it can find held for one of `sessions`, whether the
    /// store knows of it or not. Called once at start-up for the sessions that were
    /// started when the previous run stopped: a resource acquired just before a crash, and
    /// not yet recorded, is adopted then (and released with its session) instead of leaking.
    /// The default finds nothing.
    fn find_held<'a>(
        &'a self,
        sessions: &'a [SessionId],
    ) -> BoxFuture<'a, Result<Vec<(SessionId, Resource)>, ReleaseError>> {
        let _ = sessions;
        Box::pin(async { Ok(Vec::new()) })
    }
}
