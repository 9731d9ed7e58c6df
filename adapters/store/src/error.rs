//! The errors of every store call and the shapes shared by every store trait; the bottom
//! of the crate: it imports nothing from it.

use std::future::Future;
use std::pin::Pin;

use session_lifecycle::SessionId;

/// A boxed, sendable future: what `Store` and backend methods return, so that both
/// traits can be used as `dyn` objects chosen at run time.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Any error, boxed: the source of a [`StoreError::Unavailable`] or of a resource
/// backend's release error.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a store call failed. Every failure leaves the store as it was before the call.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached or refused to work (I/O error, lock timeout, lost
    /// connection). Worth retrying later. The source is the driver's own error.
    #[error("store unavailable: {0}")]
    Unavailable(#[source] BoxError),
    /// The store's settings cannot be used (a malformed URL, ...). Not worth retrying.
    #[error("invalid store settings: {0}")]
    InvalidConfig(#[source] BoxError),
    /// The store was written by a newer version of this software: its schema version is
    /// beyond what this build knows. Not worth retrying.
    #[error("the store's schema version {found} is newer than this build's {supported}")]
    NewerSchema {
        /// The version found in the store.
        found: i64,
        /// The newest version this build writes.
        supported: i64,
    },
    /// A record in the store is not a possible session (corruption or a foreign writer).
    #[error("corrupt record for {id}: {detail}")]
    Corrupt {
        /// The session whose record is bad.
        id: String,
        /// What is wrong with it.
        detail: String,
    },
    /// A session with this id already exists.
    #[error("session {0} already exists")]
    DuplicateId(SessionId),
}

impl StoreError {
    /// The store could not be reached, because of `source`.
    pub fn unavailable(source: impl Into<BoxError>) -> StoreError {
        StoreError::Unavailable(source.into())
    }

    /// Whether the store could not be reached (as opposed to answering with a bad record
    /// or a refusal): an outage.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// Which tenant's sessions a call may see: `Some(tenant)` from the API, where another
/// tenant's session is the same as an unknown one; `None` for the service itself (timers,
/// the sweeper, webhooks that name no tenant).
pub type TenantScope<'a> = Option<&'a str>;
