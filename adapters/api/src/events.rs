//! What a session event says, as webhooks and the event stream send it: the envelope the
//! Standard Webhooks specification recommends (`type`, `timestamp`, `data`).
//!
//! An event's data is built from the session's record, using only what does not change
//! after the event (a `started` event never shows the end that came later), so every
//! delivery of one event, retries included, carries the same bytes.

use serde::{Deserialize, Serialize};
use session_lifecycle::EventKind;
use utoipa::ToSchema;

use crate::views::{EndReasonView, RoomView};

/// The type of a session event. A client reads a type this version does not know (one a
/// newer server added) as [`EventType::Other`], with its wire name, instead of failing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventType {
    /// The session was created.
    #[serde(rename = "session.started")]
    Started,
    /// Its avatar server is ready.
    #[serde(rename = "session.ready")]
    Ready,
    /// The session ended.
    #[serde(rename = "session.ended")]
    Ended,
    /// Every resource it held is given back: its GPU capacity is free again.
    #[serde(rename = "session.released")]
    Released,
    /// A usage record was written (sent only to endpoints that export usage, in the
    /// shape they chose).
    #[serde(rename = "usage.recorded")]
    UsageRecorded,
    /// A type this version does not know, by its wire name. Never sent by this version.
    #[serde(untagged)]
    Other(String),
}

crate::wire::known_names_schema!(
    EventType,
    "The type of a session event.",
    [Started, Ready, Ended, Released, UsageRecorded]
);

impl From<EventKind> for EventType {
    fn from(kind: EventKind) -> EventType {
        match kind {
            EventKind::Started => EventType::Started,
            EventKind::Ready => EventType::Ready,
            EventKind::Ended => EventType::Ended,
            EventKind::Released => EventType::Released,
            EventKind::UsageRecorded(_) => EventType::UsageRecorded,
        }
    }
}

/// A session event: the body of every webhook, and the data of every event-stream message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EventEnvelope {
    /// What happened.
    #[serde(rename = "type")]
    pub kind: EventType,
    /// When it happened, RFC 3339 UTC.
    #[schema(example = "2024-01-15T10:35:00Z")]
    pub timestamp: String,
    /// The session as the event found it.
    pub data: EventData,
}

/// The session, as an event found it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EventData {
    /// The session.
    #[schema(example = "sess_01HM6AQH20ZZHCK79E5QFWVW30")]
    pub session_id: String,
    /// The event's place among the session's events (1 started, 2 ready, 3 ended, 4
    /// released): order a session's events by it. Gaps are events that did not happen.
    #[schema(minimum = 1, maximum = 4)]
    pub sequence: u32,
    /// When it started.
    pub started_at: String,
    /// When it would end by itself.
    pub expires_at: String,
    /// When its avatar server reported ready (`session.ready`, and the later events of a
    /// session that was ready).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_at: Option<String>,
    /// When it ended (`session.ended`, `session.released`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<String>,
    /// Why it ended (`session.ended`, `session.released`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_reason: Option<EndReasonView>,
    /// How long it ran, in whole seconds (`session.ended`, `session.released`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_secs: Option<u64>,
    /// The client's metadata, as given at its creation.
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<serde_json::Value>,
    /// The video room it is bound to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room: Option<RoomView>,
    /// Each resource it held and how its release went (`session.released`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub releases: Option<Vec<ReleaseNoteView>>,
}

/// How one resource was given back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ReleaseNoteView {
    /// What the resource is (`avatar_process`, `gpu_assignment`, ...).
    pub kind: String,
    /// Its handle.
    pub handle: u64,
    /// When it was released.
    pub released_at: Option<String>,
    /// How (`sigterm`, `sigkill ...`, `freed`, ...).
    pub note: Option<String>,
}

impl EventEnvelope {
    /// The body bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// The `webhook-id` of an event: the same for every delivery and retry of it.
pub fn message_id(event_session: &session_lifecycle::SessionId, kind: EventKind) -> String {
    format!("msg_{}_{}", event_session.suffix(), kind.sequence())
}

/// One webhook delivery: an event to one endpoint, and how its attempts went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DeliveryView {
    /// Its id (for a retry).
    pub delivery_id: u64,
    /// The session whose event it carries.
    pub session_id: String,
    /// The event's type.
    pub event_type: EventType,
    /// The event's `webhook-id`, the same on every attempt.
    pub webhook_id: String,
    /// The endpoint's name (`callback` for the session's own callback URL).
    pub endpoint: String,
    /// Where it is sent.
    pub url: String,
    /// `pending` (due at `next_attempt_at`), `delivered` or `failed` (given up).
    pub status: DeliveryStatusView,
    /// Attempts so far.
    pub attempts: u32,
    /// When its last attempt was made.
    pub last_attempt_at: Option<String>,
    /// The HTTP status of the last answer.
    pub last_status_code: Option<u16>,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
    /// When it is tried next, while pending.
    pub next_attempt_at: Option<String>,
}

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryStatusView {
    /// Not delivered yet.
    Pending,
    /// Accepted by the endpoint (2xx).
    Delivered,
    /// Given up after the retry period.
    Failed,
}

/// A list of deliveries, newest first.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeliveriesResponse {
    /// Always `true`.
    pub success: bool,
    /// The deliveries.
    pub deliveries: Vec<DeliveryView>,
}

/// One delivery.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeliveryResponse {
    /// Always `true`.
    pub success: bool,
    /// The delivery, as it now stands.
    pub delivery: DeliveryView,
}
