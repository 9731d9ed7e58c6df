//! The tenant's session events: as a Server-Sent Events stream (`/v1/events`), and their
//! webhook deliveries (`/v1/webhook-deliveries`).

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use serde::Deserialize;
use session_lifecycle_runtime::{DeliveryQuery, SessionEvent, StoreError};
use utoipa::IntoParams;

use crate::error::{ApiError, ErrorBody, ErrorCode};
use crate::extract::{Authenticated, viewer};
use crate::input::session_id;
use crate::outbound::payload::{
    DeliveriesResponse, DeliveryResponse, DeliveryStatusView, delivery_view,
};
use crate::state::AppState;

/// How often an idle stream looks for events another instance fanned out.
const STREAM_POLL: Duration = Duration::from_secs(1);
/// Events read from the store at once.
const STREAM_BATCH: u32 = 100;

fn store_error(e: StoreError) -> ApiError {
    ApiError::from(session_lifecycle_runtime::EngineError::Store(e))
}

/// Where a stream starts.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StreamParams {
    /// Start after this event id (as `Last-Event-ID` does; the header wins). Absent: from
    /// the first event kept.
    #[param(value_type = Option<u64>, minimum = 0)]
    pub after: Option<String>,
    /// Only this session's events (with `token`: required).
    #[param(pattern = "^sess_[0-9A-HJKMNP-TV-Z]{1,64}$")]
    pub session_id: Option<String>,
    /// The session's `client_token` (from its create answer), instead of an API key: the
    /// stream then has that session's events only.
    pub token: Option<String>,
}

fn parse_position(text: &str, what: &str) -> Result<u64, ApiError> {
    text.trim()
        .parse::<u64>()
        .ok()
        .filter(|_| !text.trim().is_empty() && text.trim().bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| ApiError::invalid(format!("{what} must be an event id (digits)")))
}

/// The tenant's session events (an operator key: every tenant's) as Server-Sent Events: each message's `id` is its place in
/// the event log, `event` its type, `data` the same JSON a webhook carries. Reconnect with
/// `Last-Event-ID` to resume after the last message received, without losing one.
#[utoipa::path(
    get, path = "/v1/events", tag = "events",
    params(
        StreamParams,
        ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this event id"),
    ),
    responses(
        (status = 200, description = "An endless `text/event-stream`: one message per event (`id`, `event` = type, `data` = the event's JSON, see `EventEnvelope`), and comments to keep the connection open", content_type = "text/event-stream", body = String),
        (status = 400, description = "An invalid `Last-Event-ID`, `after` or `session_id`, or a token without `session_id` (`invalid_request`, `invalid_session_id`)", body = ErrorBody),
        (status = 401, description = "Missing, unknown or revoked API key, or a client token not valid for `session_id` (`unauthorized`)", body = ErrorBody),
        (status = 404, description = "With a client token: no such session (`session_not_found`)", body = ErrorBody),
        (status = 503, description = "Storage unavailable or overloaded", body = ErrorBody),
    ),
    security(("api_key" = []), ("client_token" = []))
)]
pub async fn stream_events(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    params: Result<Query<StreamParams>, QueryRejection>,
) -> Result<Sse<impl futures_util::Stream<Item = Result<Event, std::convert::Infallible>>>, ApiError>
{
    let Query(params) = params.map_err(|e| ApiError::invalid(e.body_text()))?;
    let session = params.session_id.as_deref().map(session_id).transpose()?;
    // A client token sees its session's events; an API key its tenant's.
    let tenant = match (&params.token, session) {
        (Some(token), Some(id)) => {
            state
                .tokens
                .verify(token, id, state.engine.now())
                .map_err(|_| ApiError::unauthorized())?;
            Some(state.engine.get(None, id).await?.tenant)
        }
        (Some(_), None) => {
            return Err(ApiError::invalid(
                "a client token needs the session_id it is for",
            ));
        }
        // An operator key follows every tenant's events.
        (None, _) => viewer(&state.tenants, &headers)?
            .tenant()
            .map(str::to_owned),
    };
    let last = match headers.get("last-event-id") {
        Some(v) => parse_position(
            v.to_str()
                .map_err(|_| ApiError::invalid("Last-Event-ID must be digits"))?,
            "Last-Event-ID",
        )?,
        None => match params.after.as_deref() {
            Some(text) => parse_position(text, "after")?,
            None => 0,
        },
    };
    // Bounded: each open stream reads the store.
    let permit = Arc::clone(&state.event_streams)
        .try_acquire_owned()
        .map_err(|_| {
            ApiError::new(ErrorCode::Overloaded, "too many event streams open; retry")
                .retry_after(5)
        })?;
    let stream = futures_util::stream::unfold(
        Stream {
            state,
            tenant,
            session,
            last,
            pending: std::collections::VecDeque::new(),
            _permit: permit,
        },
        |mut s| async move { s.next().await.map(|m| (Ok(m), s)) },
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// One open event stream.
struct Stream {
    state: Arc<AppState>,
    /// Whose events (`None`: every tenant's, for an operator).
    tenant: Option<String>,
    session: Option<session_lifecycle::SessionId>,
    /// The place of the last event sent (or skipped for good).
    last: u64,
    /// Events read and not sent yet.
    pending: std::collections::VecDeque<SessionEvent>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Stream {
    /// The next message; `None` when the service shuts down.
    async fn next(&mut self) -> Option<Event> {
        // Woken by this instance's fan-outs, and by another instance's when the store pushes
        // them (PostgreSQL NOTIFY); the poll finds any other.
        let mut fanned_out = self.state.outbound.get().map(|o| o.fanned_out());
        loop {
            if *self.state.shutdown.borrow() {
                return None;
            }
            if let Some(event) = self.pending.front().cloned() {
                let position = event.position.unwrap_or(self.last);
                match message(&self.state, &event).await {
                    Ok(found) => {
                        self.pending.pop_front();
                        self.last = position;
                        match found {
                            Some(message) => return Some(message),
                            None => continue,
                        }
                    }
                    // Not skipped: tried again, so that no event is lost to a resume.
                    Err(()) => {
                        tokio::time::sleep(STREAM_POLL * 5).await;
                        continue;
                    }
                }
            }
            match self
                .state
                .engine
                .store()
                .events_after(
                    self.tenant.as_deref(),
                    self.session,
                    self.last,
                    STREAM_BATCH,
                )
                .await
            {
                Ok(events) if !events.is_empty() => self.pending.extend(events),
                Ok(_) => {
                    let poll = tokio::time::sleep(STREAM_POLL);
                    match fanned_out.as_mut() {
                        Some(fanned) => {
                            tokio::select! {
                                _ = fanned.changed() => {}
                                _ = poll => {}
                            }
                        }
                        None => poll.await,
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reading the event log failed; retrying");
                    tokio::time::sleep(STREAM_POLL * 5).await;
                }
            }
        }
    }
}

/// The SSE message of `event`; `Ok(None)` if its session is gone or it is a usage event
/// (those go to the endpoints that export usage, not to the lifecycle stream), `Err` if it
/// cannot be read now (logged).
async fn message(state: &AppState, event: &SessionEvent) -> Result<Option<Event>, ()> {
    if matches!(event.kind, session_lifecycle::EventKind::UsageRecorded(_)) {
        return Ok(None);
    }
    let record = match state.engine.store().get(event.session).await {
        Ok(Some(record)) => record,
        Ok(None) => return Ok(None),
        Err(e) => {
            tracing::warn!(error = %e, session = %event.session, "event's session unreadable");
            return Err(());
        }
    };
    let kind_name = |k| state.engine.kind_name(k);
    let envelope = crate::outbound::payload::envelope(event, &record, &kind_name);
    let data = serde_json::to_string(&envelope).map_err(|_| ())?;
    Ok(Some(
        Event::default()
            .id(event.position.unwrap_or(0).to_string())
            .event(event.kind.as_str())
            .data(data),
    ))
}

/// Which deliveries to list.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeliveryParams {
    /// Only those of this session.
    #[param(pattern = "^sess_[0-9A-HJKMNP-TV-Z]{1,64}$")]
    pub session_id: Option<String>,
    /// Only those with this status.
    #[param(value_type = Option<DeliveryStatusView>)]
    pub status: Option<String>,
    /// At most this many, 1 to 100 (default 50).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 100)]
    pub limit: Option<String>,
}

/// The tenant's webhook deliveries, newest first: where each stands, its attempts, its
/// last answer and its next retry.
#[utoipa::path(
    get, path = "/v1/webhook-deliveries", tag = "events",
    params(DeliveryParams),
    responses(
        (status = 200, description = "Deliveries, newest first", body = DeliveriesResponse),
        (status = 400, description = "Invalid session id, status or limit (`invalid_request`, `invalid_session_id`)", body = ErrorBody),
        (status = 401, description = "Missing, unknown or revoked API key (`unauthorized`)", body = ErrorBody),
        (status = 503, description = "Storage unavailable or overloaded", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn list_deliveries(
    State(state): State<Arc<AppState>>,
    Authenticated(tenant): Authenticated,
    params: Result<Query<DeliveryParams>, QueryRejection>,
) -> Result<Json<DeliveriesResponse>, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::invalid(e.body_text()))?;
    let session = params.session_id.as_deref().map(session_id).transpose()?;
    let status = match params.status.as_deref() {
        None => None,
        Some(text) => Some(
            session_lifecycle_runtime::DeliveryStatus::from_name(text)
                .ok_or_else(|| ApiError::invalid("status must be pending, delivered or failed"))?,
        ),
    };
    let limit = match params.limit.as_deref() {
        None => 50,
        Some(text) => text
            .parse::<u32>()
            .ok()
            .filter(|n| text.bytes().all(|b| b.is_ascii_digit()) && (1..=100).contains(n))
            .ok_or_else(|| ApiError::invalid("limit must be 1 to 100"))?,
    };
    let deliveries = state
        .engine
        .store()
        .deliveries(DeliveryQuery {
            tenant: Some(tenant.name.clone()),
            session,
            status,
            limit,
        })
        .await
        .map_err(store_error)?;
    Ok(Json(DeliveriesResponse {
        success: true,
        deliveries: deliveries.iter().map(delivery_view).collect(),
    }))
}

/// Try a delivery again now (a failed one gets a fresh retry period); a delivered one is
/// left as it is.
#[utoipa::path(
    post, path = "/v1/webhook-deliveries/{delivery_id}/retry", tag = "events",
    params(("delivery_id" = u64, Path, description = "The delivery's id", minimum = 1)),
    responses(
        (status = 200, description = "The delivery as it now stands", body = DeliveryResponse),
        (status = 400, description = "Not a delivery id (`invalid_request`)", body = ErrorBody),
        (status = 401, description = "Missing, unknown or revoked API key (`unauthorized`)", body = ErrorBody),
        (status = 404, description = "No such delivery of this tenant (`delivery_not_found`)", body = ErrorBody),
        (status = 503, description = "Storage unavailable or overloaded", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn retry_delivery(
    State(state): State<Arc<AppState>>,
    Authenticated(tenant): Authenticated,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<DeliveryResponse>, ApiError> {
    let Path(id) = id.map_err(|e| ApiError::invalid(e.body_text()))?;
    let id = id
        .parse::<u64>()
        .ok()
        .filter(|n| *n > 0 && id.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| ApiError::invalid("a delivery id is a positive integer"))?;
    let now = state.engine.now();
    let delivery = state
        .engine
        .store()
        .retry_delivery(Some(&tenant.name), id, now)
        .await
        .map_err(store_error)?
        .ok_or_else(|| ApiError::new(ErrorCode::DeliveryNotFound, "no such delivery"))?;
    if let Some(outbound) = state.outbound.get() {
        outbound.wake();
    }
    Ok(Json(DeliveryResponse {
        success: true,
        delivery: delivery_view(&delivery),
    }))
}
