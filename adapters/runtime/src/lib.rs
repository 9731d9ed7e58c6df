//! The std/tokio driver of [`session_lifecycle`]: runs sessions for real, on one machine
//! or several, surviving crashes.
//!
//! - [`Store`]: the durable record of sessions and release intents (SQLite in
//!   `session-lifecycle-sqlite`, PostgreSQL in `session-lifecycle-postgres`), pinned down by
//!   the [`conformance`] suite every implementation runs.
//! - [`ResourceBackend`]: what a session acquires and releases (avatar server processes,
//!   GPU shares).
//! - [`Engine`]: start, end, get, list, liveness; its background tasks sleep until the core
//!   table's next deadline, sweep the store for orphans, and run release intents with
//!   backoff, finishing on start-up whatever a crash left behind.
//!
//! Ending a session is one conditional write in the store that also records a release
//! intent for every resource it holds; the releases run afterwards, each claimed with a
//! lease so that it runs once at a time, and retried until it succeeds. Backends' releases
//! are repeatable, so a release re-run after a crash does nothing the second time.

mod backend;
mod clock;
#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
mod engine;
pub mod faults;
mod idempotency;
mod memory;
mod metrics;
mod outbox;
mod report;
pub mod rows;
#[cfg(feature = "simulation")]
pub mod simulation;
#[cfg(not(feature = "simulation"))]
mod simulation;
pub mod sql;
mod store;

pub use backend::{
    AcquireError, AcquireRequest, Acquired, EVENT_QUEUE, EventSink, ReleaseError, ReleaseNote,
    ResourceBackend, ResourceEvent, ResourceEventKind, ResourceRequest,
};
pub use clock::{
    ManualClock, RuntimeClock, SystemClock, TokioClock, WALL_RECHECK, sleep_until_wall,
};
pub use engine::{
    Background, DueReport, Engine, EngineConfig, EngineError, Plan, Readiness, RoomEventReport,
    SESSION_ID_ENV, SocketHold, StartRequest, TIMER_SLOTS,
};
pub use idempotency::{
    IDEMPOTENCY_KEEP, IdempotencyBegin, IdempotencyStore, IdempotentRequest, KeyDecision,
    StoredKey, decide_key,
};
pub use memory::MemoryStore;

/// Locks `m`, also when a panic elsewhere poisoned it. The one lock helper of the
/// workspace: every mutex it is used on guards a value changed in single steps that do not
/// panic halfway, so a poisoned lock still guards a consistent value.
pub fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
pub use metrics::{Metrics, MetricsSnapshot, RELEASE_LATENCY_BUCKETS};
pub use outbox::{
    Delivery, DeliveryAttempt, DeliveryCounts, DeliveryNext, DeliveryQuery, DeliveryStatus,
    Dispatch, EventOutbox, Fanout, SessionEvent,
};
pub use report::{DeviceReport, NodeReport};
pub use store::{
    AttachOutcome, BoxError, BoxFuture, CreateOutcome, EndCount, ListQuery, NewSession,
    NodeMembership, NodeRow, PresenceStore, ReleaseAttempt, ReleaseClaim, ReleaseProgress,
    ReleaseQueue, RoomBinding, RoomEvent, RoomEventKind, RoomProvider, RoomState, RoomStore,
    SessionRecord, SessionStore, SessionTimeouts, Store, StoreError, StoreHealth, TenantScope,
    TouchOutcome,
};
