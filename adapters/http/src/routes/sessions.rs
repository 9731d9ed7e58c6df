//! `/v1/sessions`: create, get, list, end, heartbeat.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use session_lifecycle::EndReason;
use session_lifecycle_runtime::{
    ListQuery, ResourceRequest, RoomBinding, SessionRecord, StartRequest,
};

use crate::error::{ApiError, ErrorBody};
use crate::extract::{Authenticated, SessionPath};
use crate::input::{ListParams, body_error, parse_create};
use crate::outbound::check_callback;
use crate::state::AppState;
use crate::views::{CreateRequest, CreatedResponse, ListResponse, SessionResponse, SessionView};

/// The view of `record` in full, resource kinds named by the engine's backends.
fn view(state: &AppState, record: &SessionRecord) -> SessionView {
    SessionView::of(
        record,
        &|kind| state.engine.kind_name(kind),
        &state.engine.timeouts_of(&record.timeouts),
    )
}

/// Start a session.
#[utoipa::path(
    post, path = "/v1/sessions", tag = "sessions",
    request_body(content = Option<CreateRequest>, description = "Optional: absent, empty or `null` takes every default"),
    responses(
        (status = 201, description = "Started", body = CreatedResponse),
        (status = 400, description = "Malformed JSON, an invalid field, or a timeout over the plan's limit (`invalid_request`)", body = ErrorBody),
        (status = 401, description = "Missing, unknown or revoked API key (`unauthorized`)", body = ErrorBody),
        (status = 413, description = "Body over the limit (`payload_too_large`)", body = ErrorBody),
        (status = 429, description = "Plan limit of concurrent sessions reached (`plan_limit_reached`)", body = ErrorBody),
        (status = 503, description = "No capacity (`capacity_exhausted`), start failed, storage unavailable, draining, shutting down or overloaded", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn create_session(
    State(state): State<Arc<AppState>>,
    Authenticated(tenant): Authenticated,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(body_error)?;
    let request = parse_create(&body)?;
    let callback_url = match request.callback_url.as_deref() {
        Some(url) => Some(
            check_callback(&state.config.webhook_addresses, &tenant, url)
                .await
                .map_err(ApiError::invalid)?,
        ),
        None => None,
    };
    let record = state
        .engine
        .start(StartRequest {
            callback_url,
            tenant: tenant.name.clone(),
            plan: tenant.plan,
            duration: request.duration_secs.map(Duration::from_secs),
            metadata: request
                .metadata
                .map(|m| serde_json::Value::Object(m).to_string()),
            room: request.room.map(|r| RoomBinding {
                provider: r.provider.into(),
                name: r.name,
            }),
            timeouts: request
                .timeouts
                .as_ref()
                .map(|t| t.timeouts())
                .unwrap_or_default(),
            resources: ResourceRequest {
                gpu_memory: request
                    .gpu_memory_mib
                    .map(|mib| mib.saturating_mul(1 << 20)),
                gpu_device: request.gpu_device,
            },
        })
        .await?;
    let token = state
        .tokens
        .sign(*record.session.id(), record.session.expires_at());
    Ok((
        StatusCode::CREATED,
        Json(CreatedResponse {
            success: true,
            session: view(&state, &record),
            client_token: token,
        }),
    )
        .into_response())
}

/// Get a session.
#[utoipa::path(
    get, path = "/v1/sessions/{session_id}", tag = "sessions",
    params(SessionPath),
    responses(
        (status = 200, description = "The session", body = SessionResponse),
        (status = 400, description = "Malformed session id (`invalid_session_id`)", body = ErrorBody),
        (status = 401, description = "Missing, unknown or revoked API key (`unauthorized`)", body = ErrorBody),
        (status = 404, description = "Unknown session, or another tenant's (`session_not_found`)", body = ErrorBody),
        (status = 503, description = "Storage unavailable or overloaded", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn get_session(
    State(state): State<Arc<AppState>>,
    Authenticated(tenant): Authenticated,
    SessionPath(id): SessionPath,
) -> Result<Json<SessionResponse>, ApiError> {
    let record = state.engine.get(Some(&tenant.name), id).await?;
    Ok(Json(SessionResponse {
        success: true,
        session: view(&state, &record),
    }))
}

/// List sessions, newest first.
#[utoipa::path(
    get, path = "/v1/sessions", tag = "sessions",
    params(ListParams),
    responses(
        (status = 200, description = "A page of sessions", body = ListResponse),
        (status = 400, description = "Invalid status, limit or cursor (`invalid_request`)", body = ErrorBody),
        (status = 401, description = "Missing, unknown or revoked API key (`unauthorized`)", body = ErrorBody),
        (status = 503, description = "Storage unavailable or overloaded", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn list_sessions(
    State(state): State<Arc<AppState>>,
    Authenticated(tenant): Authenticated,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<ListResponse>, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::invalid(e.body_text()))?;
    let query = params.check()?;
    let records = state
        .engine
        .list(ListQuery {
            tenant: Some(tenant.name.clone()),
            status: query.status,
            limit: query.limit,
            before: query.before,
            node: None,
        })
        .await?;
    let next_cursor = if records.len() == query.limit as usize {
        records.last().map(|r| r.session.id().to_string())
    } else {
        None
    };
    Ok(Json(ListResponse {
        success: true,
        sessions: records.iter().map(|r| view(&state, r)).collect(),
        next_cursor,
    }))
}

/// End a session: stops its avatar server and releases its GPU resources. Idempotent:
/// ending an ended session returns it exactly as it was first ended.
#[utoipa::path(
    post, path = "/v1/sessions/{session_id}/end", tag = "sessions",
    params(SessionPath),
    responses(
        (status = 200, description = "Ended (now or before); every repeat is byte for byte the first answer", body = SessionResponse),
        (status = 400, description = "Malformed session id (`invalid_session_id`)", body = ErrorBody),
        (status = 401, description = "Missing, unknown or revoked API key (`unauthorized`)", body = ErrorBody),
        (status = 404, description = "Unknown session, or another tenant's (`session_not_found`)", body = ErrorBody),
        (status = 503, description = "Storage unavailable or overloaded", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn end_session(
    State(state): State<Arc<AppState>>,
    Authenticated(tenant): Authenticated,
    SessionPath(id): SessionPath,
) -> Result<Response, ApiError> {
    // An ended session never changes what an end answer shows: repeats are served from
    // memory, byte for byte the first answer.
    if let Some(body) = state.ended_answers.get(id, &tenant.name) {
        return Ok(json_bytes(body));
    }
    let record = state
        .engine
        .end(Some(&tenant.name), id, EndReason::Requested)
        .await?;
    let body = serde_json::to_vec(&SessionResponse {
        success: true,
        session: view(&state, &record).as_ended(),
    })
    .map_err(|e| ApiError::internal(&e))?;
    let body = Bytes::from(body);
    state.ended_answers.put(id, &tenant.name, body.clone());
    Ok(json_bytes(body))
}

fn json_bytes(body: Bytes) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// Record liveness: keeps a session from being ended as an orphan.
#[utoipa::path(
    post, path = "/v1/sessions/{session_id}/heartbeat", tag = "sessions",
    params(SessionPath),
    responses(
        (status = 200, description = "Recorded", body = SessionResponse),
        (status = 400, description = "Malformed session id (`invalid_session_id`)", body = ErrorBody),
        (status = 401, description = "Missing, unknown or revoked API key (`unauthorized`)", body = ErrorBody),
        (status = 404, description = "Unknown session, or another tenant's (`session_not_found`)", body = ErrorBody),
        (status = 409, description = "The session has ended (`session_ended`)", body = ErrorBody),
        (status = 503, description = "Storage unavailable or overloaded", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn heartbeat(
    State(state): State<Arc<AppState>>,
    Authenticated(tenant): Authenticated,
    SessionPath(id): SessionPath,
) -> Result<Json<SessionResponse>, ApiError> {
    let record = state.engine.touch(Some(&tenant.name), id).await?;
    Ok(Json(SessionResponse {
        success: true,
        session: view(&state, &record),
    }))
}
