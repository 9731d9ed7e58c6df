//! What a session event says, as webhooks and the event stream send it (the types are
//! [`session_lifecycle_api::events`], shared with the client), built from the engine's
//! records.
//!
//! An event's data is built from the session's record, using only what does not change
//! after the event (a `started` event never shows the end that came later), so every
//! delivery of one event, retries included, carries the same bytes.

use session_lifecycle::{EventKind, ReleaseState, Timestamp};
use session_lifecycle_runtime::usage::UsageRecord;
use session_lifecycle_runtime::{Delivery, DeliveryStatus, SessionEvent, SessionRecord};

use crate::outbound::endpoints::{UsageExport, UsageFormat};

pub use session_lifecycle_api::events::*;

use crate::views::{KindNames, RoomView, provider_view};

/// The envelope of `event` of `record` (the same session), resource kinds named by
/// `kind_name`.
pub fn envelope(
    event: &SessionEvent,
    record: &SessionRecord,
    kind_name: KindNames<'_>,
) -> EventEnvelope {
    let s = &record.session;
    let ended = matches!(event.kind, EventKind::Ended | EventKind::Released);
    let end = s.ended_at().filter(|_| ended);
    let releases = (event.kind == EventKind::Released).then(|| {
        s.resources()
            .iter()
            .map(|held| ReleaseNoteView {
                kind: kind_name(held.resource.kind)
                    .map_or_else(|| format!("kind_{}", held.resource.kind.0), str::to_owned),
                handle: held.resource.handle,
                released_at: match held.release {
                    ReleaseState::Released { at } => Some(at.to_string()),
                    _ => None,
                },
                note: record
                    .release_notes
                    .iter()
                    .find(|(r, _)| *r == held.resource)
                    .map(|(_, note)| note.clone()),
            })
            .collect()
    });
    EventEnvelope {
        kind: event.kind.into(),
        timestamp: event.at.to_string(),
        data: EventData {
            session_id: s.id().to_string(),
            sequence: event.kind.sequence(),
            started_at: s.started_at().to_string(),
            expires_at: s.expires_at().to_string(),
            ready_at: record
                .ready_at
                .filter(|_| event.kind != EventKind::Started)
                .map(|t| t.to_string()),
            ended_at: end.map(|t| t.to_string()),
            end_reason: s.end_reason().filter(|_| ended).map(Into::into),
            duration_secs: end.map(|t| t.saturating_duration_since(s.started_at()).as_secs()),
            metadata: record
                .metadata
                .as_deref()
                .and_then(|m| serde_json::from_str(m).ok()),
            room: record.room.as_ref().map(|room| RoomView {
                provider: provider_view(room.provider),
                name: room.name.clone(),
            }),
            releases,
        },
    }
}

/// The view of delivery `d`.
pub fn delivery_view(d: &Delivery) -> DeliveryView {
    DeliveryView {
        delivery_id: d.id,
        session_id: d.session.to_string(),
        event_type: d.kind.into(),
        webhook_id: message_id(&d.session, d.kind),
        endpoint: d.endpoint.clone(),
        url: d.url.clone(),
        status: delivery_status_view(d.status),
        attempts: d.attempts,
        last_attempt_at: d.last_attempt_at.map(|t| t.to_string()),
        last_status_code: d.last_status_code,
        last_error: d.last_error.clone(),
        next_attempt_at: d.next_attempt_at.map(|t| t.to_string()),
    }
}

/// The API's name of a delivery status.
pub fn delivery_status_view(s: DeliveryStatus) -> DeliveryStatusView {
    match s {
        DeliveryStatus::Pending => DeliveryStatusView::Pending,
        DeliveryStatus::Delivered => DeliveryStatusView::Delivered,
        DeliveryStatus::Failed => DeliveryStatusView::Failed,
    }
}

/// The body of a `usage.recorded` event of `record` in `format`, and its content type.
/// A record's bytes never change, so every delivery and retry of it is the same. Values
/// are billable milliseconds. A correction carries the value the span now has (not a
/// difference) and the identifier it replaces: a receiver drops the replaced one and
/// counts this one. In the Stripe shape the replacement is explicit: a correction carries
/// `adjustment`, the body of a Stripe meter event adjustment that cancels the replaced
/// identifier, to send before the rest (the meter event). Stripe refuses a meter event
/// with an unknown `adjustment` parameter, so a relay that forwards bodies unread fails
/// loudly instead of billing both values. The Stripe `timestamp` is the span's start, so
/// usage lands in the invoice of the period it was used in.
pub fn usage_body(
    record: &UsageRecord,
    format: UsageFormat,
    tenant: &str,
    export: &UsageExport,
) -> (&'static str, Vec<u8>) {
    let at = |t: Timestamp| t.to_string();
    let (from, to) = record
        .billable
        .map_or((None, None), |b| (Some(at(b.from())), Some(at(b.to()))));
    match format {
        UsageFormat::Stripe => {
            let mut body = serde_json::json!({
                "event_name": export.event_name,
                "identifier": record.id,
                "timestamp": record.span.0.as_secs(),
                "payload": {
                    "stripe_customer_id": export.customer,
                    "value": record.millis().to_string(),
                },
            });
            if let Some(corrects) = &record.corrects {
                body["adjustment"] = serde_json::json!({
                    "event_name": export.event_name,
                    "type": "cancel",
                    "cancel": {"identifier": corrects},
                });
            }
            ("application/json", body.to_string().into_bytes())
        }
        UsageFormat::CloudEvents => {
            let body = serde_json::json!({
                "specversion": "1.0",
                "id": record.id,
                "source": format!("/session-lifecycle/tenants/{tenant}"),
                "type": "usage.recorded",
                "subject": record.session.to_string(),
                "time": at(record.recorded_at),
                "datacontenttype": "application/json",
                "data": {
                    "session_id": record.session.to_string(),
                    "tenant": tenant,
                    "customer": export.customer,
                    "billable_ms": record.millis(),
                    "span_start": at(record.span.0),
                    "span_end": at(record.span.1),
                    "billable_from": from,
                    "billable_to": to,
                    "revision": record.revision,
                    "corrects": record.corrects,
                },
            });
            (
                "application/cloudevents+json",
                body.to_string().into_bytes(),
            )
        }
    }
}
