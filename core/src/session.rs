//! One session: its lifecycle state, its deadlines and the resources it holds.

use core::fmt;

use serde::{Deserialize, Serialize};

use crate::id::SessionId;
use crate::policy::Policy;
use crate::resource::{
    AttachRefusal, HeldResource, HeldResourceParts, HeldResources, ReleaseState, ReleaseStatus,
    Resource,
};
use crate::time::Timestamp;

/// A session's status. The only transition is `Started -> Ended`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Running: from the moment the session exists until it ends.
    Started,
    /// Terminated, for good.
    Ended,
}

/// Why a session ended. The first trigger to commit wins; later ones are no-ops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// An explicit end call.
    Requested,
    /// The session's last client WebSocket closed or missed its pings.
    WebsocketDisconnected,
    /// The last participant left the session's video room, or the room finished.
    RoomEmpty,
    /// No participant joined the session's room within its allowance.
    NobodyJoined,
    /// The session reached `expires_at` (its plan limit or requested duration).
    Expired,
    /// The safety sweeper found no liveness signal for the orphan timeout.
    Orphaned,
    /// The node running the session died (its heartbeat lapsed); another node ended it.
    NodeLost,
    /// The avatar server exited on its own.
    AvatarExited,
    /// Resources could not be acquired while starting.
    StartFailed,
    /// The service was stopped on purpose.
    Shutdown,
}

impl EndReason {
    /// Every reason, in declaration order.
    pub const ALL: [EndReason; 10] = [
        EndReason::Requested,
        EndReason::WebsocketDisconnected,
        EndReason::RoomEmpty,
        EndReason::NobodyJoined,
        EndReason::Expired,
        EndReason::Orphaned,
        EndReason::NodeLost,
        EndReason::AvatarExited,
        EndReason::StartFailed,
        EndReason::Shutdown,
    ];

    /// The reason's wire name, as in the JSON session object.
    pub const fn as_str(self) -> &'static str {
        match self {
            EndReason::Requested => "requested",
            EndReason::WebsocketDisconnected => "websocket_disconnected",
            EndReason::RoomEmpty => "room_empty",
            EndReason::NobodyJoined => "nobody_joined",
            EndReason::Expired => "expired",
            EndReason::Orphaned => "orphaned",
            EndReason::NodeLost => "node_lost",
            EndReason::AvatarExited => "avatar_exited",
            EndReason::StartFailed => "start_failed",
            EndReason::Shutdown => "shutdown",
        }
    }

    /// The reason with wire name `name`, if any.
    pub fn from_name(name: &str) -> Option<EndReason> {
        EndReason::ALL.into_iter().find(|r| r.as_str() == name)
    }
}

impl fmt::Display for EndReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl TryFrom<HeldResourceParts> for HeldResource {
    type Error = InvalidSession;
    fn try_from(p: HeldResourceParts) -> Result<Self, InvalidSession> {
        let release = match (p.release, p.release_attempts, p.retry_at, p.released_at) {
            (ReleaseStatus::Held, 0, None, None) => ReleaseState::Held,
            (ReleaseStatus::Pending, attempts, Some(retry_at), None) => {
                ReleaseState::Pending { attempts, retry_at }
            }
            (ReleaseStatus::Released, 0, None, Some(at)) => ReleaseState::Released { at },
            _ => return Err(InvalidSession::ReleaseFields),
        };
        Ok(HeldResource {
            resource: Resource {
                kind: p.kind,
                handle: p.handle,
            },
            release,
        })
    }
}

/// How a session ended: when, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ending {
    /// When it ended; never before `started_at`.
    pub at: Timestamp,
    /// Why.
    pub reason: EndReason,
}

/// A session: who it is, when it started, whether and how it ended, and what it holds.
///
/// Sessions are changed only through a `SessionTable`, which keeps
/// every invariant of the contract: a session only goes `started -> ended`, `ended_at` is
/// set iff it ended and is never before `started_at`, and each resource is released once.
///
/// Its serde form is the contract's session object:
///
/// ```
/// # use session_lifecycle::*;
/// let json = r#"{"session_id":"sess_01H3Z8G9YR3K2N5M6P7Q8W4T","status":"ended",
///   "started_at":"2024-01-15T10:30:00Z","ended_at":"2024-01-15T10:35:00Z",
///   "end_reason":"requested","expires_at":"2024-01-15T11:30:00Z",
///   "last_seen_at":"2024-01-15T10:34:00Z","resources":[]}"#;
/// let session: Session = serde_json::from_str(json).unwrap();
/// assert_eq!(session.status(), Status::Ended);
/// assert_eq!(session.end_reason(), Some(EndReason::Requested));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "SessionParts", try_from = "SessionParts")]
pub struct Session {
    id: SessionId,
    started_at: Timestamp,
    expires_at: Timestamp,
    last_seen_at: Timestamp,
    ending: Option<Ending>,
    resources: HeldResources,
    /// The resource whose release is handed out (by [`Session::poll_release`]) and whose
    /// outcome has not come back yet, as an index into `resources`. Not part of the wire
    /// shape: a record read back from storage has nothing in flight.
    releasing: Option<u8>,
}

/// The wire shape of a [`Session`], field for field as in the contract's session object.
///
/// Converting it into a [`Session`] checks every invariant, so a record read back from
/// storage or from JSON cannot smuggle in an impossible state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionParts {
    /// The session's id.
    pub session_id: SessionId,
    /// `started` or `ended`.
    pub status: Status,
    /// When it started.
    pub started_at: Timestamp,
    /// When it ended; `null` while started.
    pub ended_at: Option<Timestamp>,
    /// Why it ended; `null` while started.
    pub end_reason: Option<EndReason>,
    /// When it expires: `started_at + min(requested duration, plan limit)`.
    pub expires_at: Timestamp,
    /// The latest liveness signal (at least `started_at`).
    pub last_seen_at: Timestamp,
    /// What it holds, in acquisition order, with release states.
    pub resources: HeldResources,
}

/// Why a [`SessionParts`] does not describe a possible session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidSession {
    /// `status`, `ended_at` and `end_reason` disagree on whether it ended.
    StatusFields,
    /// `ended_at`, `expires_at` or `last_seen_at` is before `started_at`.
    BeforeStart,
    /// A release state's fields disagree (pending without a retry time, ...).
    ReleaseFields,
    /// A started session lists a resource that is not simply held.
    ReleasedWhileStarted,
    /// The same resource is listed twice.
    DuplicateResource,
}

impl core::error::Error for InvalidSession {}

impl fmt::Display for InvalidSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            InvalidSession::StatusFields => {
                "status, ended_at and end_reason disagree on whether the session ended"
            }
            InvalidSession::BeforeStart => "a timestamp is before started_at",
            InvalidSession::ReleaseFields => "a resource's release fields are inconsistent",
            InvalidSession::ReleasedWhileStarted => {
                "a started session lists a resource that is not held"
            }
            InvalidSession::DuplicateResource => "a resource is listed twice",
        })
    }
}

impl From<Session> for SessionParts {
    fn from(s: Session) -> Self {
        SessionParts {
            session_id: s.id,
            status: s.status(),
            started_at: s.started_at,
            ended_at: s.ended_at(),
            end_reason: s.end_reason(),
            expires_at: s.expires_at,
            last_seen_at: s.last_seen_at,
            resources: s.resources,
        }
    }
}

impl TryFrom<SessionParts> for Session {
    type Error = InvalidSession;
    fn try_from(p: SessionParts) -> Result<Self, InvalidSession> {
        let ending = match (p.status, p.ended_at, p.end_reason) {
            (Status::Started, None, None) => None,
            (Status::Ended, Some(at), Some(reason)) => Some(Ending { at, reason }),
            _ => return Err(InvalidSession::StatusFields),
        };
        if p.expires_at < p.started_at
            || p.last_seen_at < p.started_at
            || ending.is_some_and(|e| e.at < p.started_at)
        {
            return Err(InvalidSession::BeforeStart);
        }
        for (i, r) in p.resources.iter().enumerate() {
            if ending.is_none() && r.release != ReleaseState::Held {
                return Err(InvalidSession::ReleasedWhileStarted);
            }
            if p.resources[..i].iter().any(|o| o.resource == r.resource) {
                return Err(InvalidSession::DuplicateResource);
            }
        }
        Ok(Session {
            id: p.session_id,
            started_at: p.started_at,
            expires_at: p.expires_at,
            last_seen_at: p.last_seen_at,
            ending,
            resources: p.resources,
            releasing: None,
        })
    }
}

/// What a call that may end a session did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// This call ended the session.
    Committed,
    /// The session had already ended; nothing ran, and the first ending stands.
    AlreadyEnded,
}

/// What a release attempt reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseOutcome {
    /// The resource is given back. It is never offered again.
    Released,
    /// Releasing failed; the resource stays pending and is offered again after a backoff.
    Failed,
}

/// Where releasing an ended session's resources stands (see [`Session::release_step`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseStep {
    /// The session has not ended: it releases nothing.
    NotEnded,
    /// This resource's release is due now.
    Due(Resource),
    /// The next release is due at this time (a failed release's backoff).
    WaitUntil(Timestamp),
    /// This resource's release was handed out and its outcome has not come back.
    InFlight(Resource),
    /// Every resource is released.
    Done,
}

/// An outcome reported for a resource whose release is not in flight: refused, nothing
/// changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotInFlight {
    /// The resource named in the report.
    pub resource: Resource,
}

impl fmt::Display for NotInFlight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "no release of resource {}/{} is in flight",
            self.resource.kind.0, self.resource.handle
        )
    }
}

impl core::error::Error for NotInFlight {}

impl Session {
    /// A new, started session holding nothing, alive as of `started_at`, expiring at
    /// `expires_at` (never before it started).
    ///
    /// This is a detached value: to run a session's lifecycle, with its releases and
    /// deadlines, start it in a `SessionTable`.
    pub fn new(id: SessionId, started_at: Timestamp, expires_at: Timestamp) -> Session {
        Session {
            id,
            started_at,
            expires_at: expires_at.max(started_at),
            last_seen_at: started_at,
            ending: None,
            resources: HeldResources::new(),
            releasing: None,
        }
    }

    /// The session's id.
    pub fn id(&self) -> &SessionId {
        &self.id
    }

    /// `Started` until it ends, then `Ended` for good.
    pub fn status(&self) -> Status {
        match self.ending {
            None => Status::Started,
            Some(_) => Status::Ended,
        }
    }

    /// When it started.
    pub fn started_at(&self) -> Timestamp {
        self.started_at
    }

    /// When it ended; `None` while started.
    pub fn ended_at(&self) -> Option<Timestamp> {
        self.ending.map(|e| e.at)
    }

    /// Why it ended; `None` while started.
    pub fn end_reason(&self) -> Option<EndReason> {
        self.ending.map(|e| e.reason)
    }

    /// When and why it ended, together.
    pub fn ending(&self) -> Option<Ending> {
        self.ending
    }

    /// When it expires.
    pub fn expires_at(&self) -> Timestamp {
        self.expires_at
    }

    /// The latest liveness signal.
    pub fn last_seen_at(&self) -> Timestamp {
        self.last_seen_at
    }

    /// Its resources, in acquisition order, with their release states.
    pub fn resources(&self) -> &[HeldResource] {
        &self.resources
    }

    /// Whether it has ended and every resource it held is released.
    pub fn is_fully_released(&self) -> bool {
        self.ending.is_some()
            && self
                .resources
                .iter()
                .all(|r| matches!(r.release, ReleaseState::Released { .. }))
    }

    /// The bare `started -> ended` transition at `now` for `reason`: idempotent, and
    /// `ended_at` is never before `started_at` even if the clock stepped back.
    ///
    /// Every held resource becomes a pending release due at the end; hand them out with
    /// [`poll_release`](Self::poll_release). A table's `SessionTable::end`
    /// calls this.
    pub fn end(&mut self, now: Timestamp, reason: EndReason) -> Transition {
        if self.ending.is_some() {
            return Transition::AlreadyEnded;
        }
        // A clock that stepped backwards must not end a session before it started.
        let at = now.max(self.started_at);
        self.ending = Some(Ending { at, reason });
        self.mark_releases_due(at);
        Transition::Committed
    }

    /// Records a liveness signal. Time never moves `last_seen_at` backwards.
    pub(crate) fn touch(&mut self, now: Timestamp) {
        self.last_seen_at = self.last_seen_at.max(now);
    }

    /// Adds a resource to a started session, after those it holds: refused once it ended,
    /// for a resource it already holds, or past `MAX_RESOURCES`. A table's
    /// `SessionTable::attach` calls this; a driver that keeps a session
    /// elsewhere mirrors the attach it recorded.
    pub fn attach(&mut self, resource: Resource) -> Result<(), AttachRefusal> {
        if self.ending.is_some() {
            return Err(AttachRefusal::SessionEnded);
        }
        if self.resources.iter().any(|r| r.resource == resource) {
            return Err(AttachRefusal::AlreadyHeld);
        }
        self.resources
            .push(HeldResource {
                resource,
                release: ReleaseState::Held,
            })
            .map_err(|_| AttachRefusal::TooManyResources)
    }

    /// What releasing this session's resources calls for at `now`: nothing yet (it has not
    /// ended), the next release (due now, or later after a failure's backoff), the release
    /// already handed out, or nothing more (every resource is released).
    ///
    /// The rules, in one place: resources are released one at a time, in reverse acquisition
    /// order; a resource's release starts only once every resource acquired after it is
    /// released; a failed release is retried after the policy's backoff; a released resource
    /// is never offered again.
    pub fn release_step(&self, now: Timestamp) -> ReleaseStep {
        if self.ending.is_none() {
            return ReleaseStep::NotEnded;
        }
        if let Some(resource) = self.release_in_flight() {
            return ReleaseStep::InFlight(resource);
        }
        match self.next_release() {
            None => ReleaseStep::Done,
            Some((resource, due_at)) if due_at <= now => ReleaseStep::Due(resource),
            Some((_, due_at)) => ReleaseStep::WaitUntil(due_at),
        }
    }

    /// When the next release of this ended session is due; `None` while it is started, while
    /// a release is in flight, and once everything is released. A driver that keeps the
    /// session elsewhere (a database) stores this as the session's "release due" time.
    pub fn next_release_at(&self) -> Option<Timestamp> {
        if self.releasing.is_some() {
            return None;
        }
        self.next_release().map(|(_, at)| at)
    }

    /// Hands out the next release if it is due at `now`, and marks it in flight: nothing else
    /// of this session is handed out until its outcome comes back through
    /// [`handle_release`](Self::handle_release). `None` when nothing is due (see
    /// [`release_step`](Self::release_step) for why).
    pub fn poll_release(&mut self, now: Timestamp) -> Option<Resource> {
        let ReleaseStep::Due(resource) = self.release_step(now) else {
            return None;
        };
        let index = self.resources.iter().position(|r| r.resource == resource)?;
        // At most MAX_RESOURCES (4) resources: the index fits.
        self.releasing = Some(index as u8);
        Some(resource)
    }

    /// The resource handed out by [`poll_release`](Self::poll_release) and not yet reported.
    pub fn release_in_flight(&self) -> Option<Resource> {
        self.releasing
            .map(|i| self.resources[usize::from(i)].resource)
    }

    /// Takes back the outcome of the release in flight at `now`: released for good, or
    /// failed and due again after `policy`'s backoff. Refused, changing nothing, unless
    /// `resource` is the one in flight.
    pub fn handle_release(
        &mut self,
        now: Timestamp,
        resource: Resource,
        outcome: ReleaseOutcome,
        policy: &Policy,
    ) -> Result<(), NotInFlight> {
        let index = match self.releasing {
            Some(i) if self.resources[usize::from(i)].resource == resource => usize::from(i),
            _ => return Err(NotInFlight { resource }),
        };
        let held = &mut self.resources[index];
        let failed_before = match held.release {
            ReleaseState::Pending { attempts, .. } => attempts,
            ReleaseState::Held | ReleaseState::Released { .. } => 0,
        };
        held.release = match outcome {
            ReleaseOutcome::Released => ReleaseState::Released { at: now },
            ReleaseOutcome::Failed => {
                let attempts = failed_before.saturating_add(1);
                ReleaseState::Pending {
                    attempts,
                    retry_at: now.saturating_add(policy.release_backoff(attempts)),
                }
            }
        };
        self.releasing = None;
        Ok(())
    }

    /// The next resource to release, ignoring what is in flight, and when it is due: the
    /// last one in acquisition order that is not released. `None` before the end and once
    /// everything is released.
    fn next_release(&self) -> Option<(Resource, Timestamp)> {
        let ending = self.ending?;
        let held = self
            .resources
            .iter()
            .rev()
            .find(|r| !matches!(r.release, ReleaseState::Released { .. }))?;
        let due_at = match held.release {
            // Not tried yet (a record from before the end marked it): due from the end on.
            ReleaseState::Held => ending.at,
            ReleaseState::Pending { retry_at, .. } => retry_at,
            ReleaseState::Released { .. } => return None,
        };
        Some((held.resource, due_at))
    }

    /// Turns every held resource into a pending release due at the end (what ending does,
    /// and what a store records in the same write).
    fn mark_releases_due(&mut self, at: Timestamp) {
        for r in self.resources.iter_mut() {
            if r.release == ReleaseState::Held {
                r.release = ReleaseState::Pending {
                    attempts: 0,
                    retry_at: at,
                };
            }
        }
    }

    /// The next moment a table must look at this session, under `policy`: its expiry or
    /// orphan deadline while started; its next release once ended ([`Timestamp::MAX`] while
    /// one is in flight: the driver reports back); the end of its retention once released.
    pub(crate) fn deadline(&self, policy: &Policy) -> Timestamp {
        let Some(ending) = self.ending else {
            return self.timeout(policy).0;
        };
        if self.releasing.is_some() {
            return Timestamp::MAX;
        }
        match self.next_release() {
            Some((_, due_at)) => due_at,
            None => {
                let released_at = self
                    .resources
                    .iter()
                    .filter_map(|r| match r.release {
                        ReleaseState::Released { at } => Some(at),
                        _ => None,
                    })
                    .fold(ending.at, Timestamp::max);
                released_at.saturating_add(policy.retention)
            }
        }
    }

    /// When a started session ends by itself, and why: at `expires_at` (`expired`) or
    /// `orphan_timeout` after its last liveness signal (`orphaned`); a tie is an expiry.
    pub(crate) fn timeout(&self, policy: &Policy) -> (Timestamp, EndReason) {
        let orphan_at = self.last_seen_at.saturating_add(policy.orphan_timeout);
        if self.expires_at <= orphan_at {
            (self.expires_at, EndReason::Expired)
        } else {
            (orphan_at, EndReason::Orphaned)
        }
    }
}

#[cfg(test)]
mod tests;
