//! What the store traits take and give: session records, room bindings and events, release
//! claims, progress and attempts, node rows.

use std::time::Duration;

use session_lifecycle::{EndReason, ReleaseState, Resource, Session, SessionId, Status, Timestamp};

/// The video room a session is bound to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RoomBinding {
    /// `livekit` or `daily`.
    pub provider: RoomProvider,
    /// The room's name at the provider.
    pub name: String,
}

/// A video room provider whose webhooks can end sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RoomProvider {
    /// LiveKit.
    Livekit,
    /// Daily.
    Daily,
}

impl RoomProvider {
    /// The provider's wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            RoomProvider::Livekit => "livekit",
            RoomProvider::Daily => "daily",
        }
    }

    /// The provider named `name`.
    pub fn from_name(name: &str) -> Option<RoomProvider> {
        match name {
            "livekit" => Some(RoomProvider::Livekit),
            "daily" => Some(RoomProvider::Daily),
            _ => None,
        }
    }
}

/// A session's own timeouts, chosen at its creation within its tenant's plan. `None` where
/// the session was recorded before it had its own (the service's defaults apply).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionTimeouts {
    /// How long after the last participant leaves its room it ends (`room_empty`); someone
    /// joining meanwhile keeps it.
    pub participant_left: Option<Duration>,
    /// How long after its creation a first participant may take to join its room before
    /// it ends (`nobody_joined`); `None`: no limit (the orphan timeout still applies).
    pub participant_absent: Option<Duration>,
    /// How long after its last client WebSocket closes (on every instance) it ends
    /// (`websocket_disconnected`); a reconnect meanwhile, to any instance, keeps it.
    pub websocket_grace: Option<Duration>,
}

/// A session as stored: the core's session value plus what the service knows about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    /// The session: status, timestamps, resources and their release states.
    pub session: Session,
    /// The tenant that owns it.
    pub tenant: String,
    /// Opaque client metadata (a small JSON document), if any.
    pub metadata: Option<String>,
    /// The video room it is bound to, if any.
    pub room: Option<RoomBinding>,
    /// The node that runs it and holds its resources.
    pub node: String,
    /// Its own timeouts.
    pub timeouts: SessionTimeouts,
    /// Notes on releases, in acquisition order, for resources that have one: what a
    /// finished release reported (for example `sigterm` or `sigkill`), or that the
    /// resource was lost with a dead node.
    pub release_notes: Vec<(Resource, String)>,
    /// The error of each resource's last failed release attempt, while it is not released.
    pub release_errors: Vec<(Resource, String)>,
    /// When its avatar server reported it is ready, if it has.
    pub ready_at: Option<Timestamp>,
}

/// What a new session is created with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSession {
    /// Its id (a fresh ULID id).
    pub id: SessionId,
    /// The owning tenant.
    pub tenant: String,
    /// Creation time, also its first liveness signal.
    pub started_at: Timestamp,
    /// `started_at + min(requested duration, plan limit)`.
    pub expires_at: Timestamp,
    /// Opaque client metadata.
    pub metadata: Option<String>,
    /// The video room it is bound to.
    pub room: Option<RoomBinding>,
    /// The tenant's limit on concurrently started sessions; the create fails with
    /// [`CreateOutcome::LimitReached`] instead of exceeding it.
    pub max_concurrent: Option<u32>,
    /// The node that runs the session and holds its resources: each resource attached
    /// later records it, and only that node claims their releases.
    pub node: String,
    /// Its own timeouts.
    pub timeouts: SessionTimeouts,
    /// Where its events go besides its tenant's endpoints (checked by the caller).
    pub callback_url: Option<String>,
    /// Its tenant's billing rule now, kept with it: its usage is measured by it (see the
    /// `usage` module).
    pub billing: session_lifecycle::usage::BillingRule,
}

/// What `Store::create` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateOutcome {
    /// The session is recorded, started.
    Created,
    /// The tenant already has `max_concurrent` started sessions; nothing was written.
    LimitReached,
}

/// What `Store::attach` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachOutcome {
    /// The resource is recorded as held by the started session.
    Attached,
    /// The session has ended (or does not exist): nothing was written, and the caller
    /// must release the resource at once.
    Refused,
}

/// What `Store::touch` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TouchOutcome {
    /// `last_seen_at` moved forward (it never moves back); the session as it now stands.
    Touched(SessionRecord),
    /// The session has ended; nothing was written. The session as it stands.
    Ended(SessionRecord),
    /// No such session in scope.
    NotFound,
}

/// How many sessions ended for one reason within one span of time (see
/// `SessionStore::count_ends`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndCount {
    /// The span: its index from the start of the count, each span one `bucket` long.
    pub bucket: u64,
    /// Why they ended.
    pub reason: EndReason,
    /// How many.
    pub count: u64,
}

/// Which sessions a listing returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListQuery {
    /// Only this tenant's sessions; `None` lists every tenant's (for the service itself).
    pub tenant: Option<String>,
    /// Only sessions with this status.
    pub status: Option<Status>,
    /// At most this many.
    pub limit: u32,
    /// Only sessions older than this one (the last id of the previous page).
    pub before: Option<SessionId>,
    /// Only sessions run by this node.
    pub node: Option<String>,
}

/// One verified webhook event of a video room provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomEvent {
    /// Only sessions of this tenant are concerned (`None`: any tenant's).
    pub tenant: Option<String>,
    /// The provider that sent it.
    pub provider: RoomProvider,
    /// The room's name at the provider.
    pub room: String,
    /// The provider's event id: an event applies once, however often it is delivered.
    pub event_id: String,
    /// When the provider says it happened (orders a participant's joins and leaves that
    /// arrive out of order).
    pub at: Timestamp,
    /// What happened.
    pub kind: RoomEventKind,
}

/// What happened in a room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoomEventKind {
    /// A participant joined.
    Joined {
        /// Its identity at the provider.
        participant: String,
    },
    /// A participant left.
    Left {
        /// Its identity at the provider.
        participant: String,
    },
    /// The room (meeting) finished.
    Finished,
}

/// Where the room of a session stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoomState {
    /// The session.
    pub session: SessionId,
    /// Participants present now.
    pub present: u32,
    /// Whether anyone has joined since the session started.
    pub ever_joined: bool,
    /// Whether the room finished.
    pub finished: bool,
    /// Since when (the receiving instance's clock) the room has been empty after someone
    /// had joined; `None` while someone is present, or before anyone joined.
    pub emptied_at: Option<Timestamp>,
    /// The session's wait after the last participant leaves (see [`SessionTimeouts`]).
    pub participant_left: Option<Duration>,
}

/// A claim on a session's releases taken with its end (see `Store::end`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseClaim {
    /// The node ending the session; the claim is taken only if the session runs on it.
    pub node: String,
    /// Until when the claim holds.
    pub until: Timestamp,
}

/// What a release worker persists after it asked the core what to do with a claimed
/// session: the attempt it made (if any), the core's answer to when the session's next
/// release is due, and whether it keeps the claim to go on at once.
///
/// The store decides nothing here: it writes these values, in one step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseProgress {
    /// The ended session being released.
    pub session: SessionId,
    /// The attempt just made, if any.
    pub attempt: Option<ReleaseAttempt>,
    /// When the session's next release is due (the core's
    /// [`Session::next_release_at`](session_lifecycle::Session::next_release_at)); `None`
    /// once everything is released.
    pub next_release_at: Option<Timestamp>,
    /// `Some(until)`: the worker goes on with the next release and keeps its claim until
    /// then. `None`: the claim is given up (the next release waits for its time, or there
    /// is none).
    pub keep_claim_until: Option<Timestamp>,
}

/// One release attempt, as the core recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseAttempt {
    /// The resource.
    pub resource: Resource,
    /// Its release state after the attempt: released, or pending with the retry time the
    /// core's backoff gave it.
    pub release: ReleaseState,
    /// The release note of a success (`sigterm`, `freed`, ...), or the error of a failure.
    pub note: String,
}

/// A node as the store last heard from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRow {
    /// Its id.
    pub node: String,
    /// Its last heartbeat (a shared store: on the store's own clock).
    pub last_heartbeat_at: Timestamp,
    /// Whether it counts as alive.
    pub alive: bool,
    /// What it last reported of itself (see `NodeMembership::report_node`).
    pub report: Option<String>,
}

impl NodeRow {
    /// Its last report, read; `None` if it made none or the text is not one.
    pub fn last_report(&self) -> Option<crate::report::NodeReport> {
        self.report
            .as_deref()
            .and_then(crate::report::NodeReport::from_json)
    }
}
