//! The durable record of sessions and of each resource's release.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use crate::idempotency::IdempotencyStore;
use crate::outbox::EventOutbox;
use session_lifecycle::{
    EndReason, ReleaseState, Resource, Session, SessionId, Status, Timestamp, Transition,
};

/// A boxed, sendable future: what [`Store`] and backend methods return, so that both
/// traits can be used as `dyn` objects chosen at run time.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

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
}

/// What [`Store::create`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateOutcome {
    /// The session is recorded, started.
    Created,
    /// The tenant already has `max_concurrent` started sessions; nothing was written.
    LimitReached,
}

/// What [`Store::attach`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachOutcome {
    /// The resource is recorded as held by the started session.
    Attached,
    /// The session has ended (or does not exist): nothing was written, and the caller
    /// must release the resource at once.
    Refused,
}

/// What [`Store::touch`] did.
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
/// [`SessionStore::count_ends`]).
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

/// A claim on a session's releases taken with its end (see [`Store::end`]).
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

/// Any error, boxed: the source of a [`StoreError::Unavailable`] or a [`ReleaseError`]
/// (crate::ReleaseError).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a store call failed. Every failure leaves the store as it was before the call.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached or refused to work (I/O error, lock timeout, lost
    /// connection). Worth retrying later. The source is the driver's own error.
    #[error("store unavailable: {0}")]
    Unavailable(#[source] BoxError),
    /// The store's settings cannot be used (a malformed URL, ...). Not worth retrying.
    #[error("invalid store settings: {0}")]
    InvalidConfig(#[source] BoxError),
    /// The store was written by a newer version of this software: its schema version is
    /// beyond what this build knows. Not worth retrying.
    #[error("the store's schema version {found} is newer than this build's {supported}")]
    NewerSchema {
        /// The version found in the store.
        found: i64,
        /// The newest version this build writes.
        supported: i64,
    },
    /// A record in the store is not a possible session (corruption or a foreign writer).
    #[error("corrupt record for {id}: {detail}")]
    Corrupt {
        /// The session whose record is bad.
        id: String,
        /// What is wrong with it.
        detail: String,
    },
    /// A session with this id already exists.
    #[error("session {0} already exists")]
    DuplicateId(SessionId),
}

impl StoreError {
    /// The store could not be reached, because of `source`.
    pub fn unavailable(source: impl Into<BoxError>) -> StoreError {
        StoreError::Unavailable(source.into())
    }

    /// Whether the store could not be reached (as opposed to answering with a bad record
    /// or a refusal): an outage.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// Which tenant's sessions a call may see: `Some(tenant)` from the API, where another
/// tenant's session is the same as an unknown one; `None` for the service itself (timers,
/// the sweeper, webhooks that name no tenant).
pub type TenantScope<'a> = Option<&'a str>;

/// Sessions: their records, created, attached to, ended, read, touched and swept.
///
/// Every method of every store trait is one atomic step: it commits entirely or not at
/// all, and returns only after what it reports is durable. The conformance suite
/// (`conformance`, behind the feature of that name) pins down the semantics; every
/// implementation runs it unchanged.
pub trait SessionStore: Send + Sync + 'static {
    /// Records a started session, unless the tenant is at its concurrency limit.
    fn create(&self, new: NewSession) -> BoxFuture<'_, Result<CreateOutcome, StoreError>>;

    /// Records `resource` as held by the started session `id`, after those it already
    /// holds. Refused (and nothing written) if the session ended or does not exist.
    fn attach(
        &self,
        id: SessionId,
        resource: Resource,
    ) -> BoxFuture<'_, Result<AttachOutcome, StoreError>>;

    /// Ends `id` at `now` for `reason` if it is started and in `tenant`'s scope, in one
    /// conditional write that also does what the core's end does to its resources: every
    /// held one becomes a pending release (no attempt yet, due at the end), and the
    /// session's next release is due at the end if it holds any. `ended_at` is
    /// `max(now, started_at)`. Returns the session as it now stands and whether this call
    /// ended it; an already ended session is returned unchanged with
    /// [`Transition::AlreadyEnded`]. `None` if there is no such session in scope (nothing
    /// written).
    ///
    /// With `claim`, when the session runs on `claim.node` and has resources to release,
    /// this end also claims its releases for that node until `claim.until`, in the same
    /// write: the node ending its own session runs the releases at once, without another
    /// round trip (see [`ReleaseQueue::claim_releases`]).
    fn end<'a>(
        &'a self,
        id: SessionId,
        tenant: TenantScope<'a>,
        now: Timestamp,
        reason: EndReason,
        claim: Option<ReleaseClaim>,
    ) -> BoxFuture<'a, Result<Option<(SessionRecord, Transition)>, StoreError>>;

    /// The session `id`, if any.
    fn get(&self, id: SessionId) -> BoxFuture<'_, Result<Option<SessionRecord>, StoreError>>;

    /// Sessions matching `query`, newest first (ids are ULIDs, so by id descending).
    fn list(&self, query: ListQuery) -> BoxFuture<'_, Result<Vec<SessionRecord>, StoreError>>;

    /// Ended sessions of `tenant` (`None`: every tenant's) that ended at or after `since`,
    /// and every ended session whose releases are not all done whenever it ended; at most
    /// `limit`, those owing releases first (a limit never drops them for recent ones),
    /// each part by the latest end first. What the live page shows as recent ends and
    /// releases owed.
    fn ended_since(
        &self,
        tenant: Option<String>,
        since: Timestamp,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<SessionRecord>, StoreError>>;

    /// How many sessions of `tenant` (`None`: every tenant's) ended from `since` to
    /// `until` (both included), by reason and by `bucket`-long span counted from `since`,
    /// ordered by span then reason name; only non-zero counts. The live page's chart,
    /// however many ended.
    fn count_ends(
        &self,
        tenant: Option<String>,
        since: Timestamp,
        until: Timestamp,
        bucket: Duration,
    ) -> BoxFuture<'_, Result<Vec<EndCount>, StoreError>>;

    /// Records a liveness signal at `now` for the session `id` in `tenant`'s scope
    /// (`last_seen_at` never moves back) if it is started, and returns it as it now stands
    /// (a heartbeat's answer, in the same step).
    fn touch<'a>(
        &'a self,
        id: SessionId,
        tenant: TenantScope<'a>,
        now: Timestamp,
    ) -> BoxFuture<'a, Result<TouchOutcome, StoreError>>;

    /// Started sessions that are due to end at `now`: past `expires_at` (`expired`) or
    /// without liveness for `orphan_timeout` (`orphaned`; an expiry wins a tie), at most
    /// `limit`, most overdue first (by the earlier of their two deadlines). A client socket
    /// that a node holds (see [`PresenceStore`]) is liveness as of `now`: such a session is
    /// never orphaned.
    fn due(
        &self,
        now: Timestamp,
        orphan_timeout: Duration,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<(SessionId, EndReason)>, StoreError>>;
}

/// The release queue: ended sessions whose next release is due, claimed by the node that
/// holds their resources, and the progress its release runs make.
pub trait ReleaseQueue: Send + Sync + 'static {
    /// Claims up to `limit` ended sessions run by `node` whose next release is due at
    /// `now` (the time the core last gave, see [`ReleaseProgress::next_release_at`]) and
    /// that no live claim holds, for `node` until `now + lease`, most overdue first (equal
    /// ones in id order, so that every store hands them out alike). A
    /// claimed session is not handed to anyone else until its claim runs out or is given
    /// up. Sessions of a node declared dead stay owed by that node, and are offered to it
    /// when it returns. Returns the claimed sessions as they stand.
    fn claim_releases(
        &self,
        node: &str,
        now: Timestamp,
        lease: Duration,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<SessionRecord>, StoreError>>;

    /// Persists a release worker's progress on a session `node` claimed: the attempt's
    /// resource state and note, the session's next release time, and the claim kept or
    /// given up, in one step. A resource already recorded released stays as it was.
    fn record_release(
        &self,
        node: &str,
        progress: ReleaseProgress,
    ) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Drops every claim `node` holds (after a restart of that node, whose in-flight
    /// releases died with it), so their sessions can be claimed again at once.
    fn drop_claims(&self, node: &str) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Runs until dropped, calling `wake` whenever a release for `node` may have become
    /// due because another instance ended one of its sessions. A store shared by several
    /// instances pushes these (PostgreSQL: `LISTEN`); the engine also polls, so the
    /// default, which never wakes, is correct for a store used by one instance.
    fn watch_releases<'a>(
        &'a self,
        node: &'a str,
        wake: &'a (dyn Fn() + Send + Sync),
    ) -> BoxFuture<'a, ()> {
        let _ = (node, wake);
        Box::pin(std::future::pending())
    }
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
    /// What it last reported of itself (see [`NodeMembership::report_node`]).
    pub report: Option<String>,
}

impl NodeRow {
    /// Its last report, read; `None` if it made none or the text is not one.
    pub fn last_report(&self) -> Option<crate::NodeReport> {
        self.report
            .as_deref()
            .and_then(crate::NodeReport::from_json)
    }
}

/// Node membership: heartbeats, and taking over from nodes that stopped.
pub trait NodeMembership: Send + Sync + 'static {
    /// Records that `node` is alive at `now` (its heartbeat), registering it if it is new.
    /// A node that was declared dead is alive again from this call on. A store shared by
    /// several machines records its own clock's time instead of `now`, and judges node
    /// death on it too (see [`end_dead_nodes`](Self::end_dead_nodes)): the instances'
    /// clocks never meet.
    fn node_alive(&self, node: &str, now: Timestamp) -> BoxFuture<'_, Result<(), StoreError>>;

    /// How many nodes are alive at `now`: a heartbeat within `node_timeout` (a shared store
    /// judges on its own clock, as for [`end_dead_nodes`](Self::end_dead_nodes)). At
    /// least the caller's own, once it has written a heartbeat. Instances split limits
    /// that hold for the cluster by it.
    fn live_nodes(
        &self,
        now: Timestamp,
        node_timeout: Duration,
    ) -> BoxFuture<'_, Result<u32, StoreError>>;

    /// Records what `node` says of itself: a small JSON document its engine writes (whether
    /// it drains, whether it has room, its GPUs), kept as given until the next report.
    fn report_node<'a>(
        &'a self,
        node: &'a str,
        report: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Every node with a heartbeat within `window` of `now` (a shared store: of its own
    /// clock's now, as for [`live_nodes`](Self::live_nodes)), by id: whether it is alive
    /// (as `live_nodes` judges, with `node_timeout`) and its last report.
    fn nodes(
        &self,
        now: Timestamp,
        node_timeout: Duration,
        window: Duration,
    ) -> BoxFuture<'_, Result<Vec<NodeRow>, StoreError>>;

    /// Takes over from dead nodes: every node other than `except` whose last heartbeat is
    /// `node_timeout` or more before `now` (a shared store: before its own clock's now, and
    /// counting only time the store was up). Ends up to `limit` of their started sessions
    /// with `node_lost` (their releases become due, as an end makes them), and records every
    /// resource they hold and have not released as lost with that node: it cannot be freed
    /// from elsewhere, so it stays owed by that node. Lets go of the client sockets they
    /// held (see [`PresenceStore`]). Returns the sessions it ended.
    fn end_dead_nodes(
        &self,
        except: &str,
        now: Timestamp,
        node_timeout: Duration,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<SessionId>, StoreError>>;
}

/// Video rooms: who is present, from the providers' webhooks.
pub trait RoomStore: Send + Sync + 'static {
    /// Applies a room event to the started sessions bound to its room, once: `None` if an
    /// event with this id was applied before. A participant's presence follows its latest
    /// event by `at`, so a leave delivered before its join leaves it absent. A join is a
    /// liveness signal (`last_seen_at` moves to `now`). The room's `emptied_at` becomes
    /// `now` when this event leaves it empty after someone had joined, and is cleared when
    /// someone is present; an event that finds it empty already keeps the earlier time.
    fn room_event(
        &self,
        event: RoomEvent,
        now: Timestamp,
    ) -> BoxFuture<'_, Result<Option<Vec<RoomState>>, StoreError>>;

    /// Where the room of session `id` stands (all zero if it has none); `None` if there
    /// is no such session.
    fn room_state(&self, id: SessionId) -> BoxFuture<'_, Result<Option<RoomState>, StoreError>>;

    /// Records a liveness signal at `now` for every started session whose room has someone
    /// present (room presence keeps a session alive), returning those sessions.
    fn touch_present(&self, now: Timestamp) -> BoxFuture<'_, Result<Vec<SessionId>, StoreError>>;

    /// Forgets the room events and participants of sessions that ended at or before
    /// `ended_before`, at most `limit` sessions' worth (and their client socket presence,
    /// see [`PresenceStore`]); returns how many sessions' room rows went.
    fn prune_rooms(
        &self,
        ended_before: Timestamp,
        limit: u32,
    ) -> BoxFuture<'_, Result<u32, StoreError>>;
}

/// Client presence across instances: which nodes hold a WebSocket of a session, and the
/// word that a session ended, for every instance to close its sockets.
///
/// A node records only its own transitions (its first socket of a session opened, its last
/// one closed), never a ping: a held socket is liveness of its session by itself, with no
/// write while nothing changes. A dead node's holds are let go when its sessions are taken
/// over ([`NodeMembership::end_dead_nodes`]): its clients' sessions were live until then,
/// and have the orphan timeout to come back on another node.
pub trait PresenceStore: Send + Sync + 'static {
    /// Records that `node` holds client sockets of `session` (`holds`), or, at `now`, no
    /// longer does (the sockets were liveness until then).
    fn set_presence(
        &self,
        session: SessionId,
        node: &str,
        holds: bool,
        now: Timestamp,
    ) -> BoxFuture<'_, Result<(), StoreError>>;

    /// `node` (re)started at `now`: it holds no sockets, and the started sessions it held
    /// sockets of were live until now (as [`NodeMembership::end_dead_nodes`] lets go).
    fn clear_presence(&self, node: &str, now: Timestamp) -> BoxFuture<'_, Result<(), StoreError>>;

    /// The live nodes (heartbeat within `node_timeout` of `now`; a shared store judges on
    /// its own clock) that hold client sockets of `session`.
    fn presence(
        &self,
        session: SessionId,
        now: Timestamp,
        node_timeout: Duration,
    ) -> BoxFuture<'_, Result<Vec<String>, StoreError>>;

    /// Runs until dropped, calling `ended` with the id of every session any instance ends
    /// from now on (a shared store pushes them: PostgreSQL `LISTEN`; an in-process store
    /// broadcasts them). Best effort: a listener that falls behind may miss some, and the
    /// sockets of a session ended meanwhile find out at their next look.
    fn watch_ends<'a>(&'a self, ended: &'a (dyn Fn(SessionId) + Send + Sync)) -> BoxFuture<'a, ()>;
}

/// Whether the store can be reached.
pub trait StoreHealth: Send + Sync + 'static {
    /// Checks the store can be reached.
    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>>;
}

/// The durable record of sessions and of each resource's release state: every capability
/// a store has. Implement the capability traits; this one follows.
pub trait Store:
    SessionStore
    + ReleaseQueue
    + NodeMembership
    + RoomStore
    + PresenceStore
    + EventOutbox
    + IdempotencyStore
    + StoreHealth
{
}

impl<T> Store for T where
    T: SessionStore
        + ReleaseQueue
        + NodeMembership
        + RoomStore
        + PresenceStore
        + EventOutbox
        + IdempotencyStore
        + StoreHealth
{
}
