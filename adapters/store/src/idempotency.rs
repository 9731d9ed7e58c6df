//! Safe retries of creates (Stripe's `Idempotency-Key` is the model): a key binds one
//! request body to one session and, once answered, to its answer, so that a client that
//! timed out retries without starting a second session.
//!
//! A create with a key first [begins](IdempotencyStore::begin_idempotent) it: the first
//! request takes the key with the session id it will create; one that finds the key
//! answered replays the answer; one that finds it taken by a request still running is
//! told so (409), and one with another body is refused (422). A request that died holding
//! the key (its instance was killed) is taken over after `stale_after`: the retry creates
//! that same session id, or answers with it if it was created.

use std::time::Duration;

use session_lifecycle::{SessionId, Timestamp};

use crate::error::{BoxFuture, StoreError};

/// How long a key binds its request and answer.
pub const IDEMPOTENCY_KEEP: Duration = Duration::from_secs(24 * 3600);

/// What a key's owner sent: `tenant`'s request with `key`, whose body hashes to
/// `request_hash`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotentRequest {
    /// The tenant (keys are per tenant).
    pub tenant: String,
    /// The client's key.
    pub key: String,
    /// A hash of the request's body, compared on every retry.
    pub request_hash: String,
}

/// What [`IdempotencyStore::begin_idempotent`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdempotencyBegin {
    /// The caller holds the key: it creates `session` (and then finishes or abandons the
    /// key). `taken_over`: an earlier request held it and died; `session` may exist.
    Proceed {
        /// The session id the key is bound to.
        session: SessionId,
        /// Whether a dead earlier request held the key.
        taken_over: bool,
    },
    /// The key was answered: replay this answer.
    Answered {
        /// Its HTTP status.
        status: u16,
        /// Its body.
        body: String,
    },
    /// A request with the key is still running.
    InProgress,
    /// The key was used with another request body.
    Mismatch,
}

/// Idempotency keys of creates (see the module docs). Every method is one atomic step.
pub trait IdempotencyStore: Send + Sync + 'static {
    /// Takes the key for `request` at `now` with `candidate` as its session id, unless it
    /// is held: see [`IdempotencyBegin`]. A key older than `keep_for` counts as unused; a
    /// running request silent for `stale_after` counts as dead.
    fn begin_idempotent(
        &self,
        request: IdempotentRequest,
        candidate: SessionId,
        now: Timestamp,
        stale_after: Duration,
        keep_for: Duration,
    ) -> BoxFuture<'_, Result<IdempotencyBegin, StoreError>>;

    /// Records the answer of the request that holds the key for `session`, unless it was
    /// answered already (the first answer stays).
    fn finish_idempotent(
        &self,
        tenant: &str,
        key: &str,
        session: SessionId,
        status: u16,
        body: String,
    ) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Gives the key up (nothing was started): a retry runs afresh.
    fn abandon_idempotent(
        &self,
        tenant: &str,
        key: &str,
        session: SessionId,
    ) -> BoxFuture<'_, Result<(), StoreError>>;
}

/// Implements [`IdempotencyStore`] for a store wrapper `$ty` over `self.inner`, running
/// each call through the wrapper's macro `$wrap!(self, "name", call)`.
#[doc(hidden)]
#[macro_export]
macro_rules! delegate_idempotency {
    ($ty:ty, $wrap:ident) => {
        impl $crate::IdempotencyStore for $ty {
            fn begin_idempotent(
                &self,
                request: $crate::IdempotentRequest,
                candidate: session_lifecycle::SessionId,
                now: session_lifecycle::Timestamp,
                stale_after: std::time::Duration,
                keep_for: std::time::Duration,
            ) -> $crate::BoxFuture<'_, Result<$crate::IdempotencyBegin, $crate::StoreError>> {
                $wrap!(
                    self,
                    "begin_idempotent",
                    self.inner
                        .begin_idempotent(request, candidate, now, stale_after, keep_for)
                )
            }
            fn finish_idempotent(
                &self,
                tenant: &str,
                key: &str,
                session: session_lifecycle::SessionId,
                status: u16,
                body: String,
            ) -> $crate::BoxFuture<'_, Result<(), $crate::StoreError>> {
                let (tenant, key) = (tenant.to_owned(), key.to_owned());
                $wrap!(
                    self,
                    "finish_idempotent",
                    self.inner
                        .finish_idempotent(&tenant, &key, session, status, body)
                )
            }
            fn abandon_idempotent(
                &self,
                tenant: &str,
                key: &str,
                session: session_lifecycle::SessionId,
            ) -> $crate::BoxFuture<'_, Result<(), $crate::StoreError>> {
                let (tenant, key) = (tenant.to_owned(), key.to_owned());
                $wrap!(
                    self,
                    "abandon_idempotent",
                    self.inner.abandon_idempotent(&tenant, &key, session)
                )
            }
        }
    };
}

/// A stored key as a store reads it, and what it means for a new request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredKey {
    /// The body hash it was taken with.
    pub request_hash: String,
    /// Its session.
    pub session: SessionId,
    /// The answer, once there is one.
    pub answer: Option<(u16, String)>,
    /// When it was taken.
    pub created_at: Timestamp,
    /// When its holder last took it.
    pub claimed_at: Timestamp,
}

/// What a store does with a key it found (or did not): the rule, once, for every store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyDecision {
    /// Insert it (replacing an expired one) for the candidate.
    Take,
    /// Take it over from a dead holder: its claim time becomes now.
    TakeOver(SessionId),
    /// Answer with this, writing nothing.
    Answer(IdempotencyBegin),
}

/// The rule: what `found` (if any) means for a request with `request_hash` at `now`.
pub fn decide_key(
    found: Option<&StoredKey>,
    request_hash: &str,
    now: Timestamp,
    stale_after: Duration,
    keep_for: Duration,
) -> KeyDecision {
    let Some(key) = found.filter(|k| now < k.created_at.saturating_add(keep_for)) else {
        return KeyDecision::Take;
    };
    if key.request_hash != request_hash {
        return KeyDecision::Answer(IdempotencyBegin::Mismatch);
    }
    match &key.answer {
        Some((status, body)) => KeyDecision::Answer(IdempotencyBegin::Answered {
            status: *status,
            body: body.clone(),
        }),
        None if now < key.claimed_at.saturating_add(stale_after) => {
            KeyDecision::Answer(IdempotencyBegin::InProgress)
        }
        None => KeyDecision::TakeOver(key.session),
    }
}
