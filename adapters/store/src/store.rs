//! The store traits: the durable record of sessions and of each resource's release, one
//! trait per capability, and [`Store`], every capability at once.

use std::time::Duration;

use session_lifecycle::{EndReason, Resource, SessionId, Timestamp, Transition};

use crate::error::{BoxFuture, StoreError, TenantScope};
use crate::idempotency::IdempotencyStore;
use crate::outbox::EventOutbox;
use crate::placement::FleetPlacement;
use crate::record::*;
use crate::usage::UsageLedger;

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
    + FleetPlacement
    + UsageLedger
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
        + FleetPlacement
        + UsageLedger
        + StoreHealth
{
}
