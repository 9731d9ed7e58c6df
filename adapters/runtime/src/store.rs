//! The durable record of sessions and of each resource's release.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use session_lifecycle::{EndReason, Resource, Session, SessionId, Status, Timestamp, Transition};

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
    /// Notes on releases, in acquisition order, for resources that have one: what a
    /// finished release reported (for example `sigterm` or `sigkill`), or that the
    /// resource was lost with a dead node.
    pub release_notes: Vec<(Resource, String)>,
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TouchOutcome {
    /// `last_seen_at` moved forward (it never moves back).
    Touched,
    /// The session has ended; nothing was written.
    Ended,
    /// No such session.
    NotFound,
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

/// Where a started session bound to a room stands after a room event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoomUpdate {
    /// The session.
    pub session: SessionId,
    /// Participants present now.
    pub present: u32,
    /// Whether anyone has joined since the session started.
    pub ever_joined: bool,
    /// Whether the room finished.
    pub finished: bool,
}

/// A release the store asks a worker to run: claimed for that worker until `claimed_until`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReleaseIntent {
    /// The ended session that held the resource.
    pub session: SessionId,
    /// The resource to release.
    pub resource: Resource,
    /// Failed attempts so far.
    pub attempts: u32,
}

/// Why a store call failed. Every failure leaves the store as it was before the call.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached or refused to work (I/O error, lock timeout, lost
    /// connection). Worth retrying later.
    #[error("store unavailable: {0}")]
    Unavailable(String),
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

/// The durable record of sessions and of each resource's release state.
///
/// Every method is one atomic step: it commits entirely or not at all, and returns only
/// after what it reports is durable. The conformance suite in
/// [`crate::conformance`] pins down the semantics; every implementation runs it unchanged.
pub trait Store: Send + Sync + 'static {
    /// Records a started session, unless the tenant is at its concurrency limit.
    fn create(&self, new: NewSession) -> BoxFuture<'_, Result<CreateOutcome, StoreError>>;

    /// Records `resource` as held by the started session `id`, after those it already
    /// holds. Refused (and nothing written) if the session ended or does not exist.
    fn attach(
        &self,
        id: SessionId,
        resource: Resource,
    ) -> BoxFuture<'_, Result<AttachOutcome, StoreError>>;

    /// Ends `id` at `now` for `reason` if it is started, in one conditional write that
    /// also turns every held resource into a release intent due at once. `ended_at` is
    /// `max(now, started_at)`. Returns the session as it now stands and whether this call
    /// ended it; an already ended session is returned unchanged with
    /// [`Transition::AlreadyEnded`]. `None` if there is no such session.
    fn end(
        &self,
        id: SessionId,
        now: Timestamp,
        reason: EndReason,
    ) -> BoxFuture<'_, Result<Option<(SessionRecord, Transition)>, StoreError>>;

    /// The session `id`, if any.
    fn get(&self, id: SessionId) -> BoxFuture<'_, Result<Option<SessionRecord>, StoreError>>;

    /// Sessions matching `query`, newest first (ids are ULIDs, so by id descending).
    fn list(&self, query: ListQuery) -> BoxFuture<'_, Result<Vec<SessionRecord>, StoreError>>;

    /// Records a liveness signal for a started session.
    fn touch(
        &self,
        id: SessionId,
        now: Timestamp,
    ) -> BoxFuture<'_, Result<TouchOutcome, StoreError>>;

    /// Started sessions that are due to end at `now`: past `expires_at` (`expired`) or
    /// without liveness for `orphan_timeout` (`orphaned`; an expiry wins a tie), at most
    /// `limit`, most overdue first.
    fn due(
        &self,
        now: Timestamp,
        orphan_timeout: Duration,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<(SessionId, EndReason)>, StoreError>>;

    /// Claims up to `limit` release intents of resources held on `node` that are due at
    /// `now` and not claimed by a live lease, for `node` until `now + lease`. A claimed
    /// intent is not handed to anyone else until the lease runs out or the node finishes
    /// it. Resources recorded as lost with a dead node are still owed by that node, and
    /// offered to it when it returns.
    fn claim_releases(
        &self,
        node: &str,
        now: Timestamp,
        lease: Duration,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<ReleaseIntent>, StoreError>>;

    /// Marks a claimed intent done: the resource is released, for good, with `note`.
    fn complete_release(
        &self,
        intent: ReleaseIntent,
        now: Timestamp,
        note: String,
    ) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Records a failed attempt of a claimed intent: it is retried at `retry_at`.
    fn fail_release(
        &self,
        intent: ReleaseIntent,
        retry_at: Timestamp,
        error: String,
    ) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Drops every claim `node` holds (after a restart of that node, whose in-flight
    /// releases died with it), so they are due again at once.
    fn drop_claims(&self, node: &str) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Records that `node` is alive at `now` (its heartbeat), registering it if it is new.
    /// A node that was declared dead is alive again from this call on.
    fn node_alive(&self, node: &str, now: Timestamp) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Takes over from dead nodes: every node other than `except` whose last heartbeat is
    /// `node_timeout` or more before `now`. Ends up to `limit` of their started sessions
    /// with `orphaned` (their releases become due), and records every resource they hold
    /// and have not released as lost with that node: it cannot be freed from elsewhere,
    /// so it stays owed by that node. Returns the sessions it ended.
    fn end_dead_nodes(
        &self,
        except: &str,
        now: Timestamp,
        node_timeout: Duration,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<SessionId>, StoreError>>;

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

    /// Applies a room event to the started sessions bound to its room, once: `None` if an
    /// event with this id was applied before. A participant's presence follows its latest
    /// event by `at`, so a leave delivered before its join leaves it absent. A join is a
    /// liveness signal (`last_seen_at` moves to `now`).
    fn room_event(
        &self,
        event: RoomEvent,
        now: Timestamp,
    ) -> BoxFuture<'_, Result<Option<Vec<RoomUpdate>>, StoreError>>;

    /// Participants present in the room of session `id` (0 if it has none).
    fn room_presence(&self, id: SessionId) -> BoxFuture<'_, Result<u32, StoreError>>;

    /// Records a liveness signal at `now` for every started session whose room has someone
    /// present (room presence keeps a session alive), returning those sessions.
    fn touch_present(&self, now: Timestamp) -> BoxFuture<'_, Result<Vec<SessionId>, StoreError>>;

    /// Checks the store can be reached.
    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>>;
}
