//! The store contract of [`session_lifecycle`]: what a durable store of sessions promises,
//! and the pieces every store shares.
//!
//! - [`Store`]: every capability a store has, one trait each ([`SessionStore`],
//!   [`ReleaseQueue`], [`NodeMembership`], [`RoomStore`], [`PresenceStore`],
//!   [`EventOutbox`], [`IdempotencyStore`], [`StoreHealth`]), with their rows and errors.
//! - [`MemoryStore`]: the reference store, in memory, the contract written as plainly as
//!   it can be.
//! - [`rows`] and [`sql`]: the decoding and the SQL rulebook the SQL stores share, so that
//!   SQLite and PostgreSQL apply one set of rules.
//! - `conformance` (feature `conformance`): the suite every store runs unchanged.
//! - [`faults`]: a store wrapper that fails on purpose.
//!
//! The modules form a line with no way back: [`error`](StoreError) at the bottom, then
//! the records, the outbox and idempotency contracts, the store traits, and the stores
//! and suites built on them.
//!
//! ```
//! use session_lifecycle_store::{ListQuery, MemoryStore, SessionStore};
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let store = MemoryStore::new();
//! let everyone = ListQuery { tenant: None, status: None, limit: 10, before: None, node: None };
//! assert!(store.list(everyone).await.unwrap().is_empty());
//! # });
//! ```

#![warn(missing_docs)]

#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
mod delegate;
mod error;
pub mod faults;
mod idempotency;
mod memory;
mod outbox;
pub mod placement;
mod record;
mod report;
pub mod rows;
pub mod sql;
mod store;
mod sync;
pub mod usage;

pub use error::{BoxError, BoxFuture, StoreError, TenantScope};
pub use idempotency::{
    IDEMPOTENCY_KEEP, IdempotencyBegin, IdempotencyStore, IdempotentRequest, KeyDecision,
    StoredKey, decide_key,
};
pub use memory::MemoryStore;
pub use outbox::{
    Delivery, DeliveryAttempt, DeliveryCounts, DeliveryNext, DeliveryQuery, DeliveryStatus,
    Dispatch, EventOutbox, Fanout, SessionEvent,
};
pub use placement::{
    Candidate, ClaimedStart, FleetPlacement, PlaceOutcome, PlacedState, PlacementAsk,
    PlacementPolicy, StartState, choose_node,
};
pub use record::{
    AttachOutcome, CreateOutcome, EndCount, ListQuery, NewSession, NodeRow, ReleaseAttempt,
    ReleaseClaim, ReleaseProgress, RoomBinding, RoomEvent, RoomEventKind, RoomProvider, RoomState,
    SessionRecord, SessionTimeouts, TouchOutcome,
};
pub use report::{DeviceReport, NodeReport};
/// The core crate, for [`delegate_store!`]'s paths: a caller need not depend on it.
#[doc(hidden)]
pub use session_lifecycle as __core;
pub use store::{
    NodeMembership, PresenceStore, ReleaseQueue, RoomStore, SessionStore, Store, StoreHealth,
};
pub use sync::lock;
