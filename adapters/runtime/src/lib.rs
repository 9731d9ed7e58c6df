//! The std/tokio driver of [`session_lifecycle`]: runs sessions for real, on one machine
//! or several, surviving crashes.
//!
//! - [`Store`]: the durable record of sessions and release intents (SQLite in
//!   `session-lifecycle-sqlite`, PostgreSQL in `session-lifecycle-postgres`), defined in
//!   `session-lifecycle-store` with the conformance suite every implementation runs, and
//!   re-exported here.
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

// No synchronous lock across an await (the engine's lock order rests on it).
#![deny(clippy::await_holding_lock)]

mod backend;
mod clock;
mod engine;
mod metrics;
#[cfg(feature = "simulation")]
pub mod simulation;
#[cfg(not(feature = "simulation"))]
mod simulation;

pub use backend::{
    AcquireError, AcquireRequest, Acquired, EVENT_QUEUE, EventSink, ReleaseError, ReleaseNote,
    ResourceBackend, ResourceEvent, ResourceEventKind, ResourceRequest, SESSION_ID_ENV,
};
pub use clock::{
    ManualClock, RuntimeClock, SystemClock, TokioClock, WALL_RECHECK, sleep_until_wall,
};
pub use engine::sockets::SocketHold;
pub use engine::{
    Background, DueReport, Engine, EngineConfig, EngineError, Plan, Readiness, RoomEventReport,
    StartRequest, TIMER_SLOTS,
};
pub use metrics::{Metrics, MetricsSnapshot, RELEASE_LATENCY_BUCKETS};
// The store contract, re-exported so that a service that links the engine names one crate.
pub use session_lifecycle_store::{
    AttachOutcome, BoxError, BoxFuture, CreateOutcome, Delivery, DeliveryAttempt, DeliveryCounts,
    DeliveryNext, DeliveryQuery, DeliveryStatus, DeviceReport, Dispatch, EndCount, EventOutbox,
    Fanout, IDEMPOTENCY_KEEP, IdempotencyBegin, IdempotencyStore, IdempotentRequest, KeyDecision,
    ListQuery, MemoryStore, NewSession, NodeMembership, NodeReport, NodeRow, PresenceStore,
    ReleaseAttempt, ReleaseClaim, ReleaseProgress, ReleaseQueue, RoomBinding, RoomEvent,
    RoomEventKind, RoomProvider, RoomState, RoomStore, SessionEvent, SessionRecord, SessionStore,
    SessionTimeouts, Store, StoreError, StoreHealth, StoredKey, TenantScope, TouchOutcome,
    decide_key, faults, lock, rows, sql,
};
