//! The event outbox: session events written with the state changes that cause them, fanned
//! out to the endpoints that want them, and the deliveries to those endpoints.
//!
//! A store writes an event in the same step as its cause (`SessionStore::create` writes
//! `session.started`, `SessionStore::end` and `NodeMembership::end_dead_nodes` write
//! `session.ended`, the last `ReleaseQueue::record_release` of a session, or the end of a
//! session that held nothing, writes `session.released`), so an event is never lost and
//! never made up. The service then fans each event out once ([`EventOutbox::dispatch_events`]:
//! one delivery per endpoint, and its place in the event stream) and delivers them, each
//! attempt claimed like a release so that it happens once across the cluster.
//!
//! The store traits (one module up the layering) are named without links: this module is
//! below them and knows nothing of them.

use std::time::Duration;

use session_lifecycle::{EventKind, SessionId, Timestamp};

use crate::error::{BoxFuture, StoreError, TenantScope};

/// One session event as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionEvent {
    /// Its place in the event stream, once fanned out (`None` before): increasing in the
    /// order events were fanned out, and never seen out of order by a reader.
    pub position: Option<u64>,
    /// The session.
    pub session: SessionId,
    /// The session's tenant.
    pub tenant: String,
    /// What happened.
    pub kind: EventKind,
    /// When it happened.
    pub at: Timestamp,
    /// The session's own callback URL, if its create named one.
    pub callback_url: Option<String>,
}

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeliveryStatus {
    /// Not delivered yet: due at its next attempt.
    Pending,
    /// The endpoint accepted it (a 2xx answer).
    Delivered,
    /// Given up after the retry period.
    Failed,
}

impl DeliveryStatus {
    /// Every status.
    pub const ALL: [DeliveryStatus; 3] = [
        DeliveryStatus::Pending,
        DeliveryStatus::Delivered,
        DeliveryStatus::Failed,
    ];

    /// Its wire and stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Failed => "failed",
        }
    }

    /// The status named `name`.
    pub fn from_name(name: &str) -> Option<DeliveryStatus> {
        DeliveryStatus::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

/// One event's delivery to one endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Its id, unique in the store.
    pub id: u64,
    /// The session whose event it carries.
    pub session: SessionId,
    /// The session's tenant.
    pub tenant: String,
    /// The event.
    pub kind: EventKind,
    /// When the event happened.
    pub event_at: Timestamp,
    /// The endpoint's name in the tenant's configuration (`callback` for the session's
    /// own callback URL).
    pub endpoint: String,
    /// The URL it is sent to.
    pub url: String,
    /// Where it stands.
    pub status: DeliveryStatus,
    /// Attempts made so far.
    pub attempts: u32,
    /// When it was fanned out (or retried by hand): its retry period counts from here.
    pub created_at: Timestamp,
    /// When it is due next, while pending.
    pub next_attempt_at: Option<Timestamp>,
    /// When it was last attempted.
    pub last_attempt_at: Option<Timestamp>,
    /// The HTTP status of the last answer, if there was one.
    pub last_status_code: Option<u16>,
    /// Why the last attempt failed, if it did.
    pub last_error: Option<String>,
}

/// What one attempt of a claimed delivery came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryAttempt {
    /// The delivery.
    pub id: u64,
    /// When the attempt was made.
    pub at: Timestamp,
    /// The HTTP status of the answer, if there was one.
    pub status_code: Option<u16>,
    /// Why it failed, if it did.
    pub error: Option<String>,
    /// What comes next, as the core's delivery policy decided.
    pub next: DeliveryNext,
}

/// The state a delivery is left in after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryNext {
    /// Delivered: done.
    Delivered,
    /// Tried again at this time.
    RetryAt(Timestamp),
    /// Given up.
    Failed,
}

/// One event to fan out, and where to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dispatch {
    /// The event's session.
    pub session: SessionId,
    /// The event.
    pub kind: EventKind,
    /// Its endpoints.
    pub to: Vec<Fanout>,
}

/// One endpoint an event is fanned out to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fanout {
    /// The endpoint's name (see [`Delivery::endpoint`]).
    pub endpoint: String,
    /// Its URL.
    pub url: String,
    /// The URL's origin (scheme, host and port): deliveries in flight are bounded per
    /// origin.
    pub origin: String,
}

/// Which deliveries a listing returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryQuery {
    /// Only this tenant's (`None`: every tenant's).
    pub tenant: Option<String>,
    /// Only those of this session.
    pub session: Option<SessionId>,
    /// Only those with this status.
    pub status: Option<DeliveryStatus>,
    /// At most this many, newest first.
    pub limit: u32,
}

/// Deliveries counted by status, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeliveryCounts {
    /// Pending, not attempted yet.
    pub pending: u64,
    /// Pending after at least one failed attempt.
    pub retrying: u64,
    /// Delivered.
    pub delivered: u64,
    /// Given up.
    pub failed: u64,
    /// When the oldest pending delivery was fanned out.
    pub oldest_pending_at: Option<Timestamp>,
}

/// The event outbox and its deliveries (see the module docs). Every method is one atomic
/// step, like every store method.
pub trait EventOutbox: Send + Sync + 'static {
    /// Records that the started session `session` is ready at `at`: its `ready_at`, and
    /// its `session.ready` event in the same step, once. `false` (nothing written) if it
    /// was ready already, has ended, or does not exist.
    fn record_ready(
        &self,
        session: SessionId,
        at: Timestamp,
    ) -> BoxFuture<'_, Result<bool, StoreError>>;

    /// Events not fanned out yet, oldest first, at most `limit`. (A store may return an
    /// event its fan-out of another writes, such as SQLite an end's usage events, right
    /// after that other.)
    fn undispatched_events(
        &self,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<SessionEvent>, StoreError>>;

    /// Fans events out, each once, in the order given, in one step: each takes the next
    /// place in the event stream and gets a pending delivery, due at `now`, to each of its
    /// endpoints. An event fanned out already (by this instance or another) is skipped.
    /// Returns how many were fanned out by this call.
    fn dispatch_events(
        &self,
        events: Vec<Dispatch>,
        now: Timestamp,
    ) -> BoxFuture<'_, Result<u32, StoreError>>;

    /// Fanned out events after stream position `after`, in stream order, at most `limit`;
    /// only `tenant`'s if it is given, only `session`'s if it is given.
    fn events_after<'a>(
        &'a self,
        tenant: TenantScope<'a>,
        session: Option<SessionId>,
        after: u64,
        limit: u32,
    ) -> BoxFuture<'a, Result<Vec<SessionEvent>, StoreError>>;

    /// The stream position of the last event fanned out so far (0: none yet): a reader
    /// that wants only what comes next starts after it.
    fn last_position(&self) -> BoxFuture<'_, Result<u64, StoreError>>;

    /// Claims up to `limit` pending deliveries due at `now` for `node` until `now + lease`,
    /// most overdue first, at most `per_origin` of them to any one origin and none to the
    /// origins in `busy` (those the caller has no room for). A delivery waits while an
    /// earlier event of its session is pending to the same endpoint (receivers get a
    /// session's events in order); nothing else holds it back.
    fn claim_deliveries(
        &self,
        node: &str,
        now: Timestamp,
        lease: Duration,
        limit: u32,
        per_origin: u32,
        busy: Vec<String>,
    ) -> BoxFuture<'_, Result<Vec<Delivery>, StoreError>>;

    /// Records attempts of deliveries `node` claimed, in one step, and gives their claims
    /// up. Nothing is written for a delivery no longer pending or claimed by `node`.
    fn record_deliveries(
        &self,
        node: &str,
        attempts: Vec<DeliveryAttempt>,
    ) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Gives up `node`'s claim on delivery `id` without an attempt (it is due again at
    /// once).
    fn unclaim_delivery(&self, node: &str, id: u64) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Deliveries matching `query`, newest first.
    fn deliveries(&self, query: DeliveryQuery) -> BoxFuture<'_, Result<Vec<Delivery>, StoreError>>;

    /// Makes delivery `id` (in `tenant`'s scope) pending again, due at `now`, with a fresh
    /// retry period from `now`. A delivered one stays as it is, and so does one whose
    /// attempt is under way (claimed). Returns it as it now
    /// stands, `None` if there is no such delivery in scope.
    fn retry_delivery<'a>(
        &'a self,
        tenant: TenantScope<'a>,
        id: u64,
        now: Timestamp,
    ) -> BoxFuture<'a, Result<Option<Delivery>, StoreError>>;

    /// Deliveries counted by status.
    fn delivery_counts(&self) -> BoxFuture<'_, Result<DeliveryCounts, StoreError>>;

    /// Forgets, at most `limit` of each: deliveries done (delivered or failed) that were
    /// fanned out at or before `events_before`, fanned out events at or before it with no
    /// delivery left, and idempotency keys taken at or before `keys_before`. Returns how
    /// many rows went.
    fn prune_outbox(
        &self,
        events_before: Timestamp,
        keys_before: Timestamp,
        limit: u32,
    ) -> BoxFuture<'_, Result<u32, StoreError>>;

    /// Runs until dropped, calling `wake` whenever another instance may have written or
    /// fanned out an event, for a store that can push that. The service also polls, so the
    /// default, which never wakes, is correct for every store.
    fn watch_events<'a>(&'a self, wake: &'a (dyn Fn() + Send + Sync)) -> BoxFuture<'a, ()> {
        let _ = wake;
        Box::pin(std::future::pending())
    }
}

/// Implements [`EventOutbox`] for a store wrapper `$ty` over `self.inner`, running each
/// call through the wrapper's macro `$wrap!(self, "name", call)`.
#[doc(hidden)]
#[macro_export]
macro_rules! delegate_outbox {
    ($ty:ty, $wrap:ident) => {
        impl $crate::EventOutbox for $ty {
            fn undispatched_events(
                &self,
                limit: u32,
            ) -> $crate::BoxFuture<'_, Result<Vec<$crate::SessionEvent>, $crate::StoreError>> {
                $wrap!(
                    self,
                    "undispatched_events",
                    self.inner.undispatched_events(limit)
                )
            }
            fn record_ready(
                &self,
                session: session_lifecycle::SessionId,
                at: session_lifecycle::Timestamp,
            ) -> $crate::BoxFuture<'_, Result<bool, $crate::StoreError>> {
                $wrap!(self, "record_ready", self.inner.record_ready(session, at))
            }
            fn dispatch_events(
                &self,
                events: Vec<$crate::Dispatch>,
                now: session_lifecycle::Timestamp,
            ) -> $crate::BoxFuture<'_, Result<u32, $crate::StoreError>> {
                $wrap!(
                    self,
                    "dispatch_events",
                    self.inner.dispatch_events(events, now)
                )
            }
            fn events_after<'a>(
                &'a self,
                tenant: $crate::TenantScope<'a>,
                session: Option<session_lifecycle::SessionId>,
                after: u64,
                limit: u32,
            ) -> $crate::BoxFuture<'a, Result<Vec<$crate::SessionEvent>, $crate::StoreError>> {
                $wrap!(
                    self,
                    "events_after",
                    self.inner.events_after(tenant, session, after, limit)
                )
            }
            fn last_position(&self) -> $crate::BoxFuture<'_, Result<u64, $crate::StoreError>> {
                $wrap!(self, "last_position", self.inner.last_position())
            }
            fn claim_deliveries(
                &self,
                node: &str,
                now: session_lifecycle::Timestamp,
                lease: std::time::Duration,
                limit: u32,
                per_origin: u32,
                busy: Vec<String>,
            ) -> $crate::BoxFuture<'_, Result<Vec<$crate::Delivery>, $crate::StoreError>> {
                let node = node.to_owned();
                $wrap!(
                    self,
                    "claim_deliveries",
                    self.inner
                        .claim_deliveries(&node, now, lease, limit, per_origin, busy)
                )
            }
            fn record_deliveries(
                &self,
                node: &str,
                attempts: Vec<$crate::DeliveryAttempt>,
            ) -> $crate::BoxFuture<'_, Result<(), $crate::StoreError>> {
                let node = node.to_owned();
                $wrap!(
                    self,
                    "record_deliveries",
                    self.inner.record_deliveries(&node, attempts)
                )
            }
            fn unclaim_delivery(
                &self,
                node: &str,
                id: u64,
            ) -> $crate::BoxFuture<'_, Result<(), $crate::StoreError>> {
                let node = node.to_owned();
                $wrap!(
                    self,
                    "unclaim_delivery",
                    self.inner.unclaim_delivery(&node, id)
                )
            }
            fn deliveries(
                &self,
                query: $crate::DeliveryQuery,
            ) -> $crate::BoxFuture<'_, Result<Vec<$crate::Delivery>, $crate::StoreError>> {
                $wrap!(self, "deliveries", self.inner.deliveries(query))
            }
            fn retry_delivery<'a>(
                &'a self,
                tenant: $crate::TenantScope<'a>,
                id: u64,
                now: session_lifecycle::Timestamp,
            ) -> $crate::BoxFuture<'a, Result<Option<$crate::Delivery>, $crate::StoreError>> {
                $wrap!(
                    self,
                    "retry_delivery",
                    self.inner.retry_delivery(tenant, id, now)
                )
            }
            fn delivery_counts(
                &self,
            ) -> $crate::BoxFuture<'_, Result<$crate::DeliveryCounts, $crate::StoreError>> {
                $wrap!(self, "delivery_counts", self.inner.delivery_counts())
            }
            fn prune_outbox(
                &self,
                events_before: session_lifecycle::Timestamp,
                keys_before: session_lifecycle::Timestamp,
                limit: u32,
            ) -> $crate::BoxFuture<'_, Result<u32, $crate::StoreError>> {
                $wrap!(
                    self,
                    "prune_outbox",
                    self.inner.prune_outbox(events_before, keys_before, limit)
                )
            }
            fn watch_events<'a>(
                &'a self,
                wake: &'a (dyn Fn() + Send + Sync),
            ) -> $crate::BoxFuture<'a, ()> {
                self.inner.watch_events(wake)
            }
        }
    };
}
