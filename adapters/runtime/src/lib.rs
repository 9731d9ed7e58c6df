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
//!
//! A service opens one engine per process over its store and backends (here the
//! reference in-memory store and no backends; see `examples/custom_backend.rs` for a
//! backend of one's own, and the `session-lifecycle-sqlite` and
//! `session-lifecycle-postgres` crates for durable stores):
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! use session_lifecycle::{EndReason, Status};
//! use session_lifecycle_runtime::{
//!     Engine, EngineConfig, EngineError, MemoryStore, Plan, StartRequest, SystemClock,
//! };
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let store = Arc::new(MemoryStore::new());
//! let engine = Engine::open(store, Vec::new(), Arc::new(SystemClock), EngineConfig::default())
//!     .await?;
//! let background = engine.spawn_background(); // timers, sweeper, release worker
//!
//! let plan = Plan::new(Some(10), Duration::from_secs(3600));
//! let started = engine.start(StartRequest::new("acme", plan)).await?;
//! let id = *started.session.id();
//! assert_eq!(started.session.status(), Status::Started);
//!
//! let ended = engine.end(Some("acme"), id, EndReason::Requested).await?;
//! // Ending again changes nothing and answers the first end.
//! let again = engine.end(Some("acme"), id, EndReason::Expired).await?;
//! assert_eq!(again.session.end_reason(), Some(EndReason::Requested));
//! assert_eq!(again.session.ended_at(), ended.session.ended_at());
//! // Another tenant's session answers like an unknown one.
//! assert!(matches!(engine.get(Some("other"), id).await, Err(EngineError::NotFound)));
//!
//! engine.shutdown(Duration::from_secs(5)).await?;
//! background.join().await;
//! # Ok::<(), EngineError>(())
//! # }).unwrap();
//! ```
//!
//! Feature `simulation`: hooks for the deterministic simulator (seeded ids, planted bugs);
//! nothing changes unless a simulation switches them on.

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
    decide_key, faults, lock, rows, sql, usage,
};
pub use session_lifecycle_store::{FleetPlacement, PlacementPolicy};
