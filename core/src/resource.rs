//! What a session holds: resources, each with its release state.

use core::fmt;

use serde::{Deserialize, Serialize};

use crate::time::Timestamp;

/// The most resources one session can hold at once (avatar process, GPU assignment, GPU
/// reservation, and one to spare).
pub const MAX_RESOURCES: usize = 4;

/// What kind of thing a resource is. Opaque to the core: the adapter that acquires a
/// resource picks the number and knows what it means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ResourceKind(pub u16);

/// One resource held for a session: a kind and an adapter-given handle (a process id, a
/// device index and share, an allocation number, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Resource {
    /// What it is.
    pub kind: ResourceKind,
    /// Which one, in the acquiring adapter's terms.
    pub handle: u64,
}

/// Where a resource's release stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReleaseState {
    /// Held by a started session.
    Held,
    /// The session ended and the release is due at `retry_at`, after `attempts` failures
    /// (`attempts` is 0, and `retry_at` the end, until the first attempt fails). Releases
    /// go one at a time in reverse acquisition order, so a pending resource also waits for
    /// every resource acquired after it.
    Pending {
        /// Failed attempts so far.
        attempts: u32,
        /// When the next attempt is due.
        retry_at: Timestamp,
    },
    /// Given back, for good. Never offered for release again.
    Released {
        /// When the release succeeded.
        at: Timestamp,
    },
}

/// A resource and where its release stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "HeldResourceParts", try_from = "HeldResourceParts")]
pub struct HeldResource {
    /// The resource.
    pub resource: Resource,
    /// Its release state.
    pub release: ReleaseState,
}

/// The wire shape of a [`HeldResource`]: flat, so it needs no allocation to parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeldResourceParts {
    /// See [`Resource::kind`].
    pub kind: ResourceKind,
    /// See [`Resource::handle`].
    pub handle: u64,
    /// `held`, `pending` or `released`.
    pub release: ReleaseStatus,
    /// Failed release attempts (0 unless pending).
    #[serde(default)]
    pub release_attempts: u32,
    /// When a pending release is next tried.
    #[serde(default)]
    pub retry_at: Option<Timestamp>,
    /// When the release succeeded.
    #[serde(default)]
    pub released_at: Option<Timestamp>,
}

/// The release state's name on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseStatus {
    /// See [`ReleaseState::Held`].
    Held,
    /// See [`ReleaseState::Pending`].
    Pending,
    /// See [`ReleaseState::Released`].
    Released,
}

impl From<HeldResource> for HeldResourceParts {
    fn from(r: HeldResource) -> Self {
        let (release, release_attempts, retry_at, released_at) = match r.release {
            ReleaseState::Held => (ReleaseStatus::Held, 0, None, None),
            ReleaseState::Pending { attempts, retry_at } => {
                (ReleaseStatus::Pending, attempts, Some(retry_at), None)
            }
            ReleaseState::Released { at } => (ReleaseStatus::Released, 0, None, Some(at)),
        };
        HeldResourceParts {
            kind: r.resource.kind,
            handle: r.resource.handle,
            release,
            release_attempts,
            retry_at,
            released_at,
        }
    }
}

/// The resources of a session, in acquisition order: at most [`MAX_RESOURCES`], stored
/// inline. Serializes as a JSON array.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct HeldResources(heapless::Vec<HeldResource, MAX_RESOURCES>);

impl HeldResources {
    /// No resources.
    pub const fn new() -> HeldResources {
        HeldResources(heapless::Vec::new())
    }

    /// Appends `resource`; hands it back if [`MAX_RESOURCES`] are already held.
    pub fn push(&mut self, resource: HeldResource) -> Result<(), HeldResource> {
        self.0.push(resource)
    }
}

impl core::ops::Deref for HeldResources {
    type Target = [HeldResource];
    fn deref(&self) -> &[HeldResource] {
        &self.0
    }
}

impl core::ops::DerefMut for HeldResources {
    fn deref_mut(&mut self) -> &mut [HeldResource] {
        &mut self.0
    }
}

/// Why a resource could not be attached to a session. The resource is handed back with it,
/// and the caller must release it at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachRefusal {
    /// No session with that id is held.
    NotFound,
    /// The session has ended: a resource acquired too late is never kept.
    SessionEnded,
    /// The session already holds [`MAX_RESOURCES`] resources.
    TooManyResources,
    /// The session already holds this very resource.
    AlreadyHeld,
}

impl core::error::Error for AttachRefusal {}

impl fmt::Display for AttachRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AttachRefusal::NotFound => "no such session",
            AttachRefusal::SessionEnded => "the session has ended",
            AttachRefusal::TooManyResources => "the session holds the most resources it can",
            AttachRefusal::AlreadyHeld => "the session already holds this resource",
        })
    }
}
