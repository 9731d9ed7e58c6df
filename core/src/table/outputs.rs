//! What the table hands its driver: work to do, what a sweep did, an end's outcome.

use crate::id::SessionId;
use crate::resource::Resource;
use crate::session::{EndReason, Session, Transition};

/// Work a table hands its driver from `SessionTable::poll`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// A started session reached its expiry (`expired`) or orphan deadline (`orphaned`).
    /// The table has not ended it: the driver commits the end wherever it must first (a
    /// database), then calls `SessionTable::end`; or, if it could not, puts the timer
    /// back with `SessionTable::defer_end`. Until then the session is not handed out
    /// again.
    End {
        /// The session.
        session: SessionId,
        /// Why it ends.
        reason: EndReason,
    },
    /// Release `resource` of the ended `session`, then report the outcome with
    /// `SessionTable::handle_release`. Nothing else of this session is handed out
    /// meanwhile.
    Release {
        /// The session.
        session: SessionId,
        /// What to release.
        resource: Resource,
    },
}

/// What one `SessionTable::handle_timeout` call did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Sessions ended with `expired`.
    pub expired: u32,
    /// Sessions ended with `orphaned`.
    pub orphaned: u32,
    /// Release attempts made (first attempts and retries).
    pub release_attempts: u32,
    /// Of those, the ones that failed and stay pending.
    pub release_failures: u32,
    /// Ended, fully released sessions dropped after their retention.
    pub evicted: u32,
}

/// The result of ending a session: the session as it now stands, and whether this call
/// ended it.
#[derive(Debug, Clone, Copy)]
pub struct EndOutcome<'a> {
    /// The session, ended. A repeated end sees the same `ended_at` and `end_reason`.
    pub session: &'a Session,
    /// [`Transition::Committed`] for the call that ended it, [`Transition::AlreadyEnded`]
    /// for every later one.
    pub transition: Transition,
}
