//! The lifecycle of real-time, GPU-backed sessions as a pure state machine.
//!
//! A session goes `started -> ended`, once. Ending is idempotent, records `started_at`,
//! `ended_at` and why it ended, and releases every resource the session held, each exactly
//! once. Sessions also end by themselves: at `expires_at`, or when no liveness signal
//! arrived for the orphan timeout.
//!
//! The crate is `no_std`, allocates nothing and does no I/O: every input that depends on
//! time carries `now`, and [`SessionTable::next_deadline`] tells the driver when to look
//! again. Drivers (the `session-lifecycle-runtime` crate, a firmware loop, a test with a
//! simulated clock) bring the clock, the randomness for ids and the actual resource release.
//!
//! The rules of release live here, once: a session's resources are released one at a time,
//! in reverse acquisition order (what uses a resource goes before the resource); a
//! resource's release starts only once every resource acquired after it is released; a
//! failed release is retried after the policy's backoff; a released resource is never
//! offered again. Drivers get them two ways, over the same functions:
//!
//! - sans-IO, for releases that take time: [`SessionTable::poll`] hands out the next
//!   [`Work`] (a session to end, a release to run) and [`SessionTable::handle_release`]
//!   takes the outcome back; a driver that keeps sessions elsewhere (a database) does the
//!   same with a lone [`Session`] ([`Session::poll_release`], [`Session::handle_release`],
//!   [`Session::next_release_at`]);
//! - synchronous, for releases that finish at once: [`SessionTable::end_and_release`] and
//!   [`SessionTable::handle_timeout`] run the same loop through the [`Effects`] callbacks.
//!
//! ```
//! use core::time::Duration;
//! use session_lifecycle::*;
//!
//! /// Releases resources by remembering them; a real driver frees GPU memory or stops
//! /// processes here.
//! #[derive(Default)]
//! struct Releases { done: heapless::Vec<u64, 8> }
//! impl Effects for Releases {
//!     fn release(&mut self, _: &SessionId, resource: Resource) -> ReleaseOutcome {
//!         self.done.push(resource.handle).unwrap();
//!         ReleaseOutcome::Released
//!     }
//! }
//!
//! let mut table = SessionTable::<64>::new(Policy::DEFAULT).unwrap();
//! let mut effects = Releases::default();
//! let t0 = Timestamp::parse_rfc3339("2024-01-15T10:30:00Z").unwrap();
//!
//! let id = *table.start(t0, 0xC0FFEE, Duration::from_secs(3600)).unwrap().id();
//! let gpu = Resource { kind: ResourceKind(1), handle: 7 };
//! let process = Resource { kind: ResourceKind(2), handle: 4242 };
//! table.attach(&id, gpu).unwrap();
//! table.attach(&id, process).unwrap();
//!
//! // Five minutes later the client ends the session: the process goes first, then the GPU.
//! let t1 = Timestamp::parse_rfc3339("2024-01-15T10:35:00Z").unwrap();
//! let first = table.end_and_release(t1, &id, EndReason::Requested, &mut effects).unwrap();
//! assert_eq!(first.transition, Transition::Committed);
//! assert_eq!(first.session.ended_at(), Some(t1));
//! assert_eq!(effects.done, [4242, 7]);
//!
//! // Ending again is a no-op that returns the first answer.
//! let t2 = Timestamp::parse_rfc3339("2024-01-15T10:36:00Z").unwrap();
//! let again = table.end_and_release(t2, &id, EndReason::WebsocketDisconnected, &mut effects).unwrap();
//! assert_eq!(again.transition, Transition::AlreadyEnded);
//! assert_eq!(again.session.ended_at(), Some(t1));
//! assert_eq!(again.session.end_reason(), Some(EndReason::Requested));
//! assert_eq!(effects.done.len(), 2);
//!
//! // The driver sleeps until the next deadline: here, the end of the retention period.
//! let wake = table.next_deadline().unwrap();
//! let sweep = table.handle_timeout(wake, &mut effects);
//! assert_eq!(sweep.evicted, 1);
//! assert!(table.is_empty());
//! ```
//!
//! The same session driven the sans-IO way, as an async driver does with releases that take
//! seconds: it runs each release itself and reports back.
//!
//! ```
//! # use core::time::Duration;
//! # use session_lifecycle::*;
//! let mut table = SessionTable::<64>::new(Policy::DEFAULT).unwrap();
//! let t0 = Timestamp::parse_rfc3339("2024-01-15T10:30:00Z").unwrap();
//! let id = *table.start(t0, 1, Duration::from_secs(3600)).unwrap().id();
//! let gpu = Resource { kind: ResourceKind(1), handle: 7 };
//! let process = Resource { kind: ResourceKind(2), handle: 4242 };
//! table.attach(&id, gpu).unwrap();
//! table.attach(&id, process).unwrap();
//! table.end(t0, &id, EndReason::Requested).unwrap();
//!
//! // The process first; nothing else of this session until its outcome is back.
//! assert_eq!(table.poll(t0), Some(Work::Release { session: id, resource: process }));
//! assert_eq!(table.poll(t0), None);
//! // Stopping it failed: it is retried after the backoff, and the GPU waits.
//! table.handle_release(t0, &id, process, ReleaseOutcome::Failed).unwrap();
//! let retry = table.next_deadline().unwrap();
//! assert_eq!(retry, t0.saturating_add(Policy::DEFAULT.release_backoff_initial));
//! assert_eq!(table.poll(retry), Some(Work::Release { session: id, resource: process }));
//! table.handle_release(retry, &id, process, ReleaseOutcome::Released).unwrap();
//! assert_eq!(table.poll(retry), Some(Work::Release { session: id, resource: gpu }));
//! table.handle_release(retry, &id, gpu, ReleaseOutcome::Released).unwrap();
//! assert!(table.get(&id).unwrap().is_fully_released());
//! ```
#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

#[cfg(test)]
extern crate std;

mod event;
mod id;
mod policy;
mod resource;
mod session;
mod table;
mod time;
pub mod usage;

pub use event::{DeliveryPolicy, DeliveryStep, EventKind, USAGE_SEQUENCE_BASE};
pub use id::{
    IdText, SESSION_ID_MAX_CHARS, SESSION_ID_MAX_LEN, SESSION_ID_PREFIX, SessionId, SessionIdError,
};
pub use policy::{CONTRACT_ORPHAN_BOUND, Policy, PolicyError, RELEASE_ALLOWANCE};
pub use resource::{
    AttachRefusal, HeldResource, HeldResourceParts, HeldResources, MAX_RESOURCES, ReleaseState,
    ReleaseStatus, Resource, ResourceKind,
};
pub use session::{
    EndReason, Ending, InvalidSession, NotInFlight, ReleaseOutcome, ReleaseStep, Session,
    SessionParts, Status, Transition,
};
pub use table::{
    AttachError, Effects, EndOutcome, NotFound, ReleaseRefused, SessionTable, StartError, Sweep,
    TouchError, Work,
};
pub use time::{Clock, Timestamp, TimestampError};
