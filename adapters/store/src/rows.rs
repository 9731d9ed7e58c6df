//! Decoding of the rows SQL stores keep, shared by every SQL `Store`: times
//! as milliseconds since the epoch, states and reasons as their wire names. Every check
//! that a record is a possible session happens here, once.

use session_lifecycle::{
    EndReason, HeldResource, HeldResourceParts, HeldResources, ReleaseState, ReleaseStatus,
    ResourceKind, Session, SessionId, SessionParts, Status, Timestamp,
};

use crate::error::StoreError;
use crate::record::{EndCount, RoomBinding, RoomProvider, SessionRecord, SessionTimeouts};

/// A timestamp as stored: milliseconds since the epoch.
pub fn millis(t: Timestamp) -> i64 {
    t.as_millis() as i64
}

/// A duration in milliseconds, as the stores keep them (saturating far beyond any use).
pub fn duration_ms(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 2)
}

/// A stored duration in milliseconds (negative values read as zero).
pub fn stored_duration(v: i64) -> std::time::Duration {
    std::time::Duration::from_millis(u64::try_from(v).unwrap_or(0))
}

/// The columns a session's own timeouts are stored in, in milliseconds:
/// `participant_left_ms`, `participant_absent_ms`, `websocket_grace_ms`.
pub fn timeout_columns(t: &SessionTimeouts) -> (Option<i64>, Option<i64>, Option<i64>) {
    (
        t.participant_left.map(duration_ms),
        t.participant_absent.map(duration_ms),
        t.websocket_grace.map(duration_ms),
    )
}

/// A stored timestamp (negative values read as the epoch).
pub fn timestamp(v: i64) -> Timestamp {
    Timestamp::from_millis(u64::try_from(v).unwrap_or(0))
}

/// The error for a stored record that is not a possible session.
pub fn corrupt(id: &str, detail: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        id: id.to_owned(),
        detail: detail.to_string(),
    }
}

/// One row of `SessionStore::count_ends`'s query (`sql_count_ends!`):
/// the span's index, the reason's wire name, the count.
pub fn end_count(bucket: i64, reason: &str, count: i64) -> Result<EndCount, StoreError> {
    Ok(EndCount {
        bucket: u64::try_from(bucket).map_err(|_| corrupt("-", format!("span {bucket}")))?,
        reason: EndReason::from_name(reason)
            .ok_or_else(|| corrupt("-", format!("end_reason {reason:?}")))?,
        count: u64::try_from(count).unwrap_or(0),
    })
}

/// A stored session id.
pub fn parse_id(text: &str) -> Result<SessionId, StoreError> {
    SessionId::parse(text).map_err(|e| corrupt(text, e))
}

fn kind(id: &str, kind: i64) -> Result<ResourceKind, StoreError> {
    u16::try_from(kind)
        .map(ResourceKind)
        .map_err(|_| corrupt(id, format!("resource kind {kind}")))
}

/// The note of a resource its dead node still owes: this, then the node's id.
pub const LOST_WITH_NODE: &str = "lost with node ";

/// What a lost resource's note gets before the note of its release, once its node returned
/// and released it: `lost with node <id>; released when the node returned: sigterm`.
pub const RELEASED_ON_RETURN: &str = "; released when the node returned: ";

/// The columns a resource's release state is stored in: `state`, `attempts`, `retry_at`
/// and `released_at`.
pub fn release_columns(release: ReleaseState) -> (&'static str, i64, Option<i64>, Option<i64>) {
    match release {
        ReleaseState::Held => ("held", 0, None, None),
        ReleaseState::Pending { attempts, retry_at } => {
            ("pending", i64::from(attempts), Some(millis(retry_at)), None)
        }
        ReleaseState::Released { at } => ("released", 0, None, Some(millis(at))),
    }
}

/// A `sessions` row.
#[derive(Debug, Clone)]
pub struct SessionRow {
    /// `id`.
    pub id: String,
    /// `tenant`.
    pub tenant: String,
    /// `status`: `started` or `ended`.
    pub status: String,
    /// `started_at`, ms.
    pub started_at: i64,
    /// `ended_at`, ms.
    pub ended_at: Option<i64>,
    /// `end_reason`, a wire name.
    pub end_reason: Option<String>,
    /// `expires_at`, ms.
    pub expires_at: i64,
    /// `last_seen_at`, ms.
    pub last_seen_at: i64,
    /// `metadata`.
    pub metadata: Option<String>,
    /// `room_provider`, a wire name.
    pub room_provider: Option<String>,
    /// `room_name`.
    pub room_name: Option<String>,
    /// `node`.
    pub node: String,
    /// `participant_left_ms`.
    pub participant_left_ms: Option<i64>,
    /// `participant_absent_ms`.
    pub participant_absent_ms: Option<i64>,
    /// `websocket_grace_ms`.
    pub websocket_grace_ms: Option<i64>,
    /// `ready_at`, ms.
    pub ready_at: Option<i64>,
}

/// A `resources` row.
#[derive(Debug, Clone)]
pub struct ResourceRow {
    /// `seq`: acquisition order.
    pub seq: i64,
    /// `kind`.
    pub kind: i64,
    /// `handle` (a `u64` stored as its bits).
    pub handle: i64,
    /// `state`: `held`, `pending` or `released`.
    pub state: String,
    /// `attempts`.
    pub attempts: i64,
    /// `retry_at`, ms.
    pub retry_at: Option<i64>,
    /// `released_at`, ms.
    pub released_at: Option<i64>,
    /// `note`.
    pub note: Option<String>,
    /// `last_error`: the error of the last failed attempt.
    pub last_error: Option<String>,
}

impl SessionRow {
    /// The record these rows describe, checked: a corrupt row is an error, never a panic
    /// or an impossible session.
    pub fn into_record(self, mut resources: Vec<ResourceRow>) -> Result<SessionRecord, StoreError> {
        let id = &self.id;
        let status = match self.status.as_str() {
            "started" => Status::Started,
            "ended" => Status::Ended,
            other => return Err(corrupt(id, format!("status {other:?}"))),
        };
        let end_reason = match &self.end_reason {
            None => None,
            Some(name) => Some(
                EndReason::from_name(name)
                    .ok_or_else(|| corrupt(id, format!("end_reason {name:?}")))?,
            ),
        };
        resources.sort_unstable_by_key(|r| r.seq);
        let mut held = HeldResources::new();
        let mut release_notes = Vec::new();
        let mut release_errors = Vec::new();
        for r in resources {
            let release = match r.state.as_str() {
                "held" => ReleaseStatus::Held,
                "pending" => ReleaseStatus::Pending,
                "released" => ReleaseStatus::Released,
                other => return Err(corrupt(id, format!("release state {other:?}"))),
            };
            let pending = release == ReleaseStatus::Pending;
            let resource: HeldResource = HeldResourceParts {
                kind: kind(id, r.kind)?,
                handle: r.handle as u64,
                release,
                release_attempts: if pending {
                    u32::try_from(r.attempts).unwrap_or(u32::MAX)
                } else {
                    0
                },
                retry_at: r.retry_at.filter(|_| pending).map(timestamp),
                released_at: r.released_at.map(timestamp),
            }
            .try_into()
            .map_err(|e| corrupt(id, e))?;
            if let Some(note) = r.note {
                release_notes.push((resource.resource, note));
            }
            if let Some(error) = r.last_error.filter(|_| pending) {
                release_errors.push((resource.resource, error));
            }
            held.push(resource)
                .map_err(|_| corrupt(id, "more resources than a session can hold"))?;
        }
        let session = Session::try_from(SessionParts {
            session_id: parse_id(id)?,
            status,
            started_at: timestamp(self.started_at),
            ended_at: self.ended_at.map(timestamp),
            end_reason,
            expires_at: timestamp(self.expires_at),
            last_seen_at: timestamp(self.last_seen_at),
            resources: held,
        })
        .map_err(|e| corrupt(id, e))?;
        let room = match (self.room_provider, self.room_name) {
            (Some(provider), Some(name)) => Some(RoomBinding {
                provider: RoomProvider::from_name(&provider)
                    .ok_or_else(|| corrupt(id, format!("room provider {provider:?}")))?,
                name,
            }),
            _ => None,
        };
        Ok(SessionRecord {
            session,
            tenant: self.tenant,
            metadata: self.metadata,
            room,
            node: self.node,
            timeouts: SessionTimeouts {
                participant_left: self.participant_left_ms.map(stored_duration),
                participant_absent: self.participant_absent_ms.map(stored_duration),
                websocket_grace: self.websocket_grace_ms.map(stored_duration),
            },
            release_notes,
            release_errors,
            ready_at: self.ready_at.map(timestamp),
        })
    }
}

/// A delivery row, columns as `delivery_columns!` lists them.
#[derive(Debug)]
pub struct DeliveryRow {
    /// `id`.
    pub id: i64,
    /// `session_id`.
    pub session_id: String,
    /// `tenant`.
    pub tenant: String,
    /// `session_seq`: the event's sequence number.
    pub session_seq: i64,
    /// `event_at`.
    pub event_at: i64,
    /// `endpoint`.
    pub endpoint: String,
    /// `url`.
    pub url: String,
    /// `status`.
    pub status: String,
    /// `attempts`.
    pub attempts: i64,
    /// `created_at`.
    pub created_at: i64,
    /// `next_attempt_at`.
    pub next_attempt_at: Option<i64>,
    /// `last_attempt_at`.
    pub last_attempt_at: Option<i64>,
    /// `last_status`.
    pub last_status: Option<i64>,
    /// `last_error`.
    pub last_error: Option<String>,
}

/// A stored event sequence number as its kind.
pub fn event_kind(id: &str, sequence: i64) -> Result<session_lifecycle::EventKind, StoreError> {
    u32::try_from(sequence)
        .ok()
        .and_then(session_lifecycle::EventKind::from_sequence)
        .ok_or_else(|| corrupt(id, format!("event sequence {sequence}")))
}

/// An event kind as stored: its sequence number.
pub fn event_sequence(kind: session_lifecycle::EventKind) -> i64 {
    i64::from(kind.sequence())
}

impl DeliveryRow {
    /// The delivery, checked.
    pub fn into_delivery(self) -> Result<crate::outbox::Delivery, StoreError> {
        let id = self.session_id.as_str();
        let status = crate::outbox::DeliveryStatus::from_name(&self.status)
            .ok_or_else(|| corrupt(id, format!("delivery status {:?}", self.status)))?;
        Ok(crate::outbox::Delivery {
            id: u64::try_from(self.id).map_err(|_| corrupt(id, "delivery id"))?,
            session: parse_id(id)?,
            kind: event_kind(id, self.session_seq)?,
            tenant: self.tenant,
            event_at: timestamp(self.event_at),
            endpoint: self.endpoint,
            url: self.url,
            status,
            attempts: u32::try_from(self.attempts).unwrap_or(u32::MAX),
            created_at: timestamp(self.created_at),
            next_attempt_at: self.next_attempt_at.map(timestamp),
            last_attempt_at: self.last_attempt_at.map(timestamp),
            last_status_code: self.last_status.and_then(|c| u16::try_from(c).ok()),
            last_error: self.last_error,
        })
    }
}

/// An event row: position (NULL before fan-out), session id, tenant, sequence, time,
/// callback URL.
pub type EventRow = (Option<i64>, String, String, i64, i64, Option<String>);

/// The event of an event row, checked.
pub fn event(row: EventRow) -> Result<crate::outbox::SessionEvent, StoreError> {
    let (position, session, tenant, sequence, at, callback_url) = row;
    Ok(crate::outbox::SessionEvent {
        position: position.and_then(|p| u64::try_from(p).ok()),
        kind: event_kind(&session, sequence)?,
        session: parse_id(&session)?,
        tenant,
        at: timestamp(at),
        callback_url,
    })
}

/// What a delivery attempt leaves as stored: status, next attempt.
pub fn delivery_next(next: crate::outbox::DeliveryNext) -> (&'static str, Option<i64>) {
    match next {
        crate::outbox::DeliveryNext::Delivered => {
            (crate::outbox::DeliveryStatus::Delivered.as_str(), None)
        }
        crate::outbox::DeliveryNext::RetryAt(at) => (
            crate::outbox::DeliveryStatus::Pending.as_str(),
            Some(millis(at)),
        ),
        crate::outbox::DeliveryNext::Failed => {
            (crate::outbox::DeliveryStatus::Failed.as_str(), None)
        }
    }
}

/// Delivery counts from `COUNT_DELIVERIES` rows: status, attempted (0 or 1), count, oldest.
pub fn delivery_counts(
    rows: impl IntoIterator<Item = (String, i64, i64, Option<i64>)>,
) -> crate::outbox::DeliveryCounts {
    let mut counts = crate::outbox::DeliveryCounts::default();
    for (status, attempted, n, oldest) in rows {
        let n = u64::try_from(n).unwrap_or(0);
        match (
            crate::outbox::DeliveryStatus::from_name(&status),
            attempted > 0,
        ) {
            (Some(crate::outbox::DeliveryStatus::Pending), false) => counts.pending += n,
            (Some(crate::outbox::DeliveryStatus::Pending), true) => counts.retrying += n,
            (Some(crate::outbox::DeliveryStatus::Delivered), _) => counts.delivered += n,
            (Some(crate::outbox::DeliveryStatus::Failed), _) => counts.failed += n,
            (None, _) => {}
        }
        if status == crate::outbox::DeliveryStatus::Pending.as_str()
            && let Some(oldest) = oldest.map(timestamp)
        {
            counts.oldest_pending_at =
                Some(counts.oldest_pending_at.map_or(oldest, |o| o.min(oldest)));
        }
    }
    counts
}

/// A stored idempotency key row (`KEY_OF`): body hash, session id, answer status and body,
/// taken and claimed times.
pub type KeyRow = (String, String, Option<i64>, Option<String>, i64, i64);

/// The key of a key row, checked.
pub fn stored_key(row: KeyRow) -> Result<crate::idempotency::StoredKey, StoreError> {
    let (request_hash, session, status, body, created_at, claimed_at) = row;
    let answer = match (status, body) {
        (Some(status), Some(body)) => Some((
            u16::try_from(status).map_err(|_| corrupt(&session, "idempotent answer status"))?,
            body,
        )),
        _ => None,
    };
    Ok(crate::idempotency::StoredKey {
        request_hash,
        session: parse_id(&session)?,
        answer,
        created_at: timestamp(created_at),
        claimed_at: timestamp(claimed_at),
    })
}
