//! What the table refuses, and why.

use core::fmt;

use crate::resource::{AttachRefusal, Resource};
use crate::session::NotInFlight;

/// Why a session could not be started or restored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartError {
    /// The table holds as many sessions as it can.
    TableFull,
    /// A session with this id is already in the table.
    DuplicateId,
}

impl core::error::Error for StartError {}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StartError::TableFull => "the session table is full",
            StartError::DuplicateId => "a session with this id already exists",
        })
    }
}

/// No session with the given id is in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotFound;

impl core::error::Error for NotFound {}

impl fmt::Display for NotFound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("no such session")
    }
}

/// Why a liveness signal was not recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TouchError {
    /// No session with that id is in the table.
    NotFound,
    /// The session has ended; liveness no longer matters to it.
    SessionEnded,
}

impl core::error::Error for TouchError {}

impl fmt::Display for TouchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TouchError::NotFound => "no such session",
            TouchError::SessionEnded => "the session has ended",
        })
    }
}

/// Why `SessionTable::handle_release` refused an outcome; nothing changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseRefused {
    /// No session with that id is in the table.
    NotFound,
    /// That resource's release is not in flight.
    NotInFlight(NotInFlight),
}

impl From<NotInFlight> for ReleaseRefused {
    fn from(e: NotInFlight) -> Self {
        ReleaseRefused::NotInFlight(e)
    }
}

impl fmt::Display for ReleaseRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReleaseRefused::NotFound => f.write_str("no such session"),
            ReleaseRefused::NotInFlight(e) => e.fmt(f),
        }
    }
}

impl core::error::Error for ReleaseRefused {}

/// A resource that could not be attached, handed back with the reason. The caller owns it
/// again and must release it at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttachError {
    /// Why it was refused.
    pub refusal: AttachRefusal,
    /// The resource, to be released by the caller.
    pub resource: Resource,
}

impl core::error::Error for AttachError {}

impl fmt::Display for AttachError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "resource not attached: {}", self.refusal)
    }
}
