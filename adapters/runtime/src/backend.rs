//! Resource backends: what a session acquires when it starts and releases when it ends.

use session_lifecycle::{EndReason, Resource, ResourceKind, SessionId};
use tokio::sync::mpsc;

use std::time::Duration;

use session_lifecycle_store::{BoxError, BoxFuture};

/// The variable that carries the session id into every avatar server's environment.
pub const SESSION_ID_ENV: &str = "SESSION_LIFECYCLE_SESSION_ID";

/// What a session asks of its resources, beyond what every session gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResourceRequest {
    /// GPU memory for the session, in bytes; `None` takes the GPU backend's default.
    pub gpu_memory: Option<u64>,
    /// The GPU to run on (its index), when it matters; `None` lets placement choose.
    pub gpu_device: Option<u32>,
    /// How long the avatar server may take to report it is ready (`READY=1` on its
    /// `NOTIFY_SOCKET`) before the session ends `start_failed`; `None`: the backend's
    /// default (which may be no limit).
    pub ready_timeout: Option<Duration>,
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
    /// [`SESSION_ID_ENV`].
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

/// Why a release attempt failed. The engine retries it after the policy's backoff, and the
/// resource stays held meanwhile (a GPU share whose processes could not be stopped is never
/// handed to another session).
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    /// It may work on a later attempt (a process still exiting, a driver busy).
    #[error("{message}")]
    Transient {
        /// What failed.
        message: String,
        /// The error underneath, if any.
        #[source]
        source: Option<BoxError>,
    },
    /// It cannot work as things are (no backend for the resource's kind, a handle that
    /// names nothing valid): retried all the same, and logged as an error for an operator.
    #[error("{message}")]
    Permanent {
        /// What failed.
        message: String,
        /// The error underneath, if any.
        #[source]
        source: Option<BoxError>,
    },
}

impl ReleaseError {
    /// A failure worth retrying.
    pub fn transient(message: impl Into<String>) -> ReleaseError {
        ReleaseError::Transient {
            message: message.into(),
            source: None,
        }
    }

    /// A failure retrying cannot fix.
    pub fn permanent(message: impl Into<String>) -> ReleaseError {
        ReleaseError::Permanent {
            message: message.into(),
            source: None,
        }
    }

    /// The same error, caused by `source`.
    pub fn caused_by(self, source: impl Into<BoxError>) -> ReleaseError {
        match self {
            ReleaseError::Transient { message, .. } => ReleaseError::Transient {
                message,
                source: Some(source.into()),
            },
            ReleaseError::Permanent { message, .. } => ReleaseError::Permanent {
                message,
                source: Some(source.into()),
            },
        }
    }

    /// Whether retrying cannot fix it.
    pub fn is_permanent(&self) -> bool {
        matches!(self, ReleaseError::Permanent { .. })
    }
}

/// How a release went: the note kept with the released resource. Its display is the text
/// the store keeps and the API shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReleaseNote {
    /// Every process of the avatar server exited within the grace after SIGTERM.
    Sigterm,
    /// The process group was killed with SIGKILL after the grace (no cgroup).
    Sigkill,
    /// Something in the server's cgroup ignored SIGTERM: `cgroup.kill` after the grace.
    CgroupKilled {
        /// The grace it had.
        grace: Duration,
        /// Processes left in the cgroup when it was killed.
        left: usize,
    },
    /// The server had exited on its own and left nothing behind.
    Exited,
    /// The recorded process is no longer the session's: nothing was signalled.
    Gone,
    /// A GPU share: no process of the session held memory once its server was gone.
    Freed,
    /// A GPU share: processes of the session still held memory after the timeout and were
    /// killed.
    Escalated {
        /// The processes killed.
        pids: Vec<u32>,
        /// How long after the release began.
        after: Duration,
    },
    /// Any other backend's note.
    Other(String),
}

impl std::fmt::Display for ReleaseNote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReleaseNote::Sigterm => f.write_str("sigterm"),
            ReleaseNote::Sigkill => f.write_str("sigkill"),
            ReleaseNote::CgroupKilled { grace, left } => {
                let processes = if *left == 1 { "process" } else { "processes" };
                write!(
                    f,
                    "sigkill: cgroup.kill after {} grace ({left} {processes} left)",
                    Brief(*grace)
                )
            }
            ReleaseNote::Exited => f.write_str("exited"),
            ReleaseNote::Gone => f.write_str("gone"),
            ReleaseNote::Freed => f.write_str("freed"),
            ReleaseNote::Escalated { pids, after } => write!(
                f,
                "escalated: killed pids {pids:?} after {} ms",
                after.as_millis()
            ),
            ReleaseNote::Other(text) => f.write_str(text),
        }
    }
}

impl PartialEq<&str> for ReleaseNote {
    /// Compares the note's text.
    fn eq(&self, other: &&str) -> bool {
        let text = self.to_string();
        text.as_str() == *other
    }
}

impl From<&str> for ReleaseNote {
    fn from(text: &str) -> Self {
        ReleaseNote::Other(text.to_owned())
    }
}

/// A duration as a note shows it: `10 s`, `500 ms`.
struct Brief(Duration);

impl std::fmt::Display for Brief {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.subsec_millis() == 0 && self.0.as_secs() > 0 {
            write!(f, "{} s", self.0.as_secs())
        } else {
            write!(f, "{} ms", self.0.as_millis())
        }
    }
}

/// Something that happened to a held resource on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceEvent {
    /// The session holding it.
    pub session: SessionId,
    /// The resource.
    pub resource: Resource,
    /// What happened.
    pub kind: ResourceEventKind,
}

/// What happened to a held resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResourceEventKind {
    /// The session must end, for this reason (an avatar server that exited by itself:
    /// `avatar_exited`; one not ready in time: `start_failed`).
    Ends(EndReason),
    /// The avatar server reported it is ready to serve.
    Ready,
}

/// How many reported events wait for the engine at most; a backend reporting more waits
/// for room (each event ends a session, so none is dropped).
pub const EVENT_QUEUE: usize = 256;

/// Where backends report [`ResourceEvent`]s; the engine ends the session concerned, or
/// records it ready.
#[derive(Debug, Clone)]
pub struct EventSink(pub(crate) mpsc::Sender<ResourceEvent>);

impl EventSink {
    /// Reports `event`, waiting while [`EVENT_QUEUE`] events are queued already. Dropped
    /// if the engine is gone (nothing would end the session anyway).
    pub async fn report(&self, event: ResourceEvent) {
        let _ = self.0.send(event).await;
    }

    /// A sink and its receiving end, for testing a backend on its own.
    pub fn channel() -> (EventSink, mpsc::Receiver<ResourceEvent>) {
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
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

    /// A short name for logs and settings (`process`, `gpu-assignment`).
    fn name(&self) -> &'static str;

    /// What the API calls this backend's resources (`avatar_process`, `gpu_assignment`).
    /// The default is [`name`](Self::name).
    fn kind_name(&self) -> &'static str {
        self.name()
    }

    /// Acquires a resource for a starting session. Anything that happens to it later on
    /// its own is reported to `events`.
    fn acquire<'a>(
        &'a self,
        request: AcquireRequest<'a>,
        events: EventSink,
    ) -> BoxFuture<'a, Result<Acquired, AcquireError>>;

    /// Releases `resource`. Must be safe to repeat: releasing a resource that is already
    /// gone (a retry, or a release re-run after a crash) succeeds and does nothing. The
    /// returned note says how it went.
    fn release(
        &self,
        session: SessionId,
        resource: Resource,
    ) -> BoxFuture<'_, Result<ReleaseNote, ReleaseError>>;

    /// The longest one release may take, including the backend's own escalation (a
    /// SIGTERM grace and SIGKILL, an NVML wait and a kill). Past it the engine counts the
    /// attempt as failed and retries it after the backoff; the resource stays held
    /// meanwhile. `EngineConfig::release_deadlines`
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

    /// The devices this backend places sessions on, with their memory (see
    /// [`DeviceReport`](crate::DeviceReport)): what the node reports of itself and its
    /// metrics show. The default has none.
    fn devices(&self) -> BoxFuture<'_, Vec<crate::DeviceReport>> {
        Box::pin(async { Vec::new() })
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
