//! `/v1/sessions`: create, get, list, end, heartbeat.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderName, StatusCode, header};
use axum::response::{IntoResponse, Response};
use session_lifecycle::EndReason;
use session_lifecycle_runtime::{
    EngineError, IDEMPOTENCY_KEEP, IdempotencyBegin, IdempotentRequest, ListQuery, ResourceRequest,
    RoomBinding, SessionRecord, StartRequest,
};

use crate::error::{ApiError, ErrorBody, ErrorCode};
use crate::extract::{Authenticated, SessionPath};
use crate::input::{ListParams, body_error, parse_create};
use crate::outbound::check_callback;
use crate::state::AppState;
use crate::views::{CreateRequest, CreatedResponse, ListResponse, SessionResponse, SessionView};

/// The view of `record` in full, resource kinds named by the engine's backends.
pub(crate) fn view(state: &AppState, record: &SessionRecord) -> SessionView {
    crate::views::session_view(
        record,
        &|kind| state.engine.kind_name(kind),
        &state.engine.timeouts_of(&record.timeouts),
    )
}

/// Start a session.
#[utoipa::path(
    post, path = "/v1/sessions", tag = "sessions",
    params(
        ("Idempotency-Key" = Option<String>, Header, description = "Makes a retry safe: a repeat with the same key and body within 24 h answers the same session (201, with `idempotent-replayed: true`) instead of starting another; 1 to 255 printable ASCII characters"),
    ),
    request_body(content = Option<CreateRequest>, description = "Optional: absent, empty or `null` takes every default"),
    responses(
        (status = 201, description = "Started (or, for a repeated Idempotency-Key, the session it started)", body = CreatedResponse),
        (status = 409, description = "A request with this Idempotency-Key is still running (`idempotency_key_in_use`); retry after `Retry-After`", body = ErrorBody),
        (status = 422, description = "This Idempotency-Key was used with another body (`idempotency_key_reused`)", body = ErrorBody),
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
    headers: HeaderMap,
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
    let start = StartRequest {
        callback_url,
        tenant: tenant.name.clone(),
        plan: tenant.plan,
        duration: request.duration_secs.map(Duration::from_secs),
        metadata: request
            .metadata
            .map(|m| serde_json::Value::Object(m).to_string()),
        room: request.room.map(|r| RoomBinding {
            provider: crate::views::room_provider(r.provider),
            name: r.name,
        }),
        timeouts: request
            .timeouts
            .as_ref()
            .map(crate::views::requested_timeouts)
            .unwrap_or_default(),
        resources: ResourceRequest {
            gpu_memory: request
                .gpu_memory_mib
                .map(|mib| mib.saturating_mul(1 << 20)),
            gpu_device: request.gpu_device,
            ready_timeout: tenant.avatar_ready_timeout,
        },
    };
    let Some(key) = idempotency_key(&headers)? else {
        let record = state.engine.start(start).await?;
        return Ok((StatusCode::CREATED, Json(created(&state, &record))).into_response());
    };
    let store = state.engine.store();
    let begin = store
        .begin_idempotent(
            IdempotentRequest {
                tenant: tenant.name.clone(),
                key: key.clone(),
                request_hash: request_hash(&body),
            },
            state.engine.fresh_session_id(),
            state.engine.now(),
            state.config.request_timeout + IDEMPOTENCY_STALE_MARGIN,
            IDEMPOTENCY_KEEP,
        )
        .await
        .map_err(|e| ApiError::from(EngineError::Store(e)))?;
    let (id, taken_over) = match begin {
        IdempotencyBegin::Answered { status, body } => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::CREATED);
            return Ok((
                status,
                [
                    (header::CONTENT_TYPE, "application/json"),
                    (HeaderName::from_static(REPLAYED_HEADER), "true"),
                ],
                body,
            )
                .into_response());
        }
        IdempotencyBegin::InProgress => {
            return Err(ApiError::new(
                ErrorCode::IdempotencyKeyInUse,
                "a request with this Idempotency-Key is still running; retry when it has answered",
            )
            .retry_after(1));
        }
        IdempotencyBegin::Mismatch => {
            return Err(ApiError::new(
                ErrorCode::IdempotencyKeyReused,
                "this Idempotency-Key was used with another request body",
            ));
        }
        IdempotencyBegin::Proceed {
            session,
            taken_over,
        } => (session, taken_over),
    };
    // A request that died after its create committed: its session is the answer. Not
    // knowing (the store failed) is no answer: the key stays, for a later retry.
    let existing = if taken_over {
        state
            .engine
            .get(None, id)
            .await
            .map(Some)
            .or_else(|e| match e {
                EngineError::NotFound => Ok(None),
                e => Err(ApiError::from(e)),
            })?
    } else {
        None
    };
    let record = match existing {
        Some(record) => record,
        None => match state.engine.start_as(id, start).await {
            Ok(record) => record,
            Err(e) => {
                // The key is freed only if nothing was started; a session that exists
                // (its start failed after the create, or the create's answer was lost)
                // stays the key's answer.
                match state.engine.get(None, id).await {
                    Err(EngineError::NotFound) => {
                        let _ = store.abandon_idempotent(&tenant.name, &key, id).await;
                    }
                    // Created by the request that held the key before: its answer.
                    Ok(record)
                        if matches!(
                            e,
                            EngineError::Store(session_lifecycle_runtime::StoreError::DuplicateId(
                                _
                            ))
                        ) =>
                    {
                        return Ok(idempotent_answer(&state, &tenant.name, &key, id, &record).await);
                    }
                    Ok(record) => {
                        let answer =
                            serde_json::to_string(&created(&state, &record)).unwrap_or_default();
                        let _ = store
                            .finish_idempotent(&tenant.name, &key, id, 201, answer)
                            .await;
                    }
                    // Unknown: a retry takes the key over once stale, and finds out.
                    Err(_) => {}
                }
                return Err(e.into());
            }
        },
    };
    Ok(idempotent_answer(&state, &tenant.name, &key, id, &record).await)
}

/// The answer of an idempotent create of `record`, recorded as the key's answer (the first
/// recorded stays; not recorded when the store fails: a retry takes the key over once
/// stale, and answers with this same session).
async fn idempotent_answer(
    state: &AppState,
    tenant: &str,
    key: &str,
    id: session_lifecycle::SessionId,
    record: &SessionRecord,
) -> Response {
    let answer = serde_json::to_string(&created(state, record)).unwrap_or_default();
    if let Err(e) = state
        .engine
        .store()
        .finish_idempotent(
            tenant,
            key,
            id,
            StatusCode::CREATED.as_u16(),
            answer.clone(),
        )
        .await
    {
        tracing::warn!(error = %e, session = %id, "recording an idempotent answer failed");
    }
    (
        StatusCode::CREATED,
        [(header::CONTENT_TYPE, "application/json")],
        answer,
    )
        .into_response()
}

/// The create answer of `record`.
fn created(state: &AppState, record: &SessionRecord) -> CreatedResponse {
    CreatedResponse {
        success: true,
        session: view(state, record),
        client_token: state
            .tokens
            .sign(*record.session.id(), record.session.expires_at()),
    }
}

/// The header naming a create's idempotency key.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";
/// Set on an answer replayed for a repeated idempotency key.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";
/// Past the request timeout, how long a silent holder of a key keeps it.
const IDEMPOTENCY_STALE_MARGIN: Duration = Duration::from_secs(5);
/// The longest key.
pub const MAX_IDEMPOTENCY_KEY: usize = 255;

/// The request's idempotency key, checked: 1 to 255 printable ASCII characters.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(IDEMPOTENCY_KEY_HEADER) else {
        return Ok(None);
    };
    let bad = || {
        ApiError::invalid(format!(
            "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters"
        ))
    };
    let text = value.to_str().map_err(|_| bad())?;
    if text.is_empty()
        || text.len() > MAX_IDEMPOTENCY_KEY
        || !text.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
    {
        return Err(bad());
    }
    Ok(Some(text.to_owned()))
}

/// The hash a key binds: of the body as JSON, so that spacing and key order do not count
/// (an absent, empty or `null` body alike).
fn request_hash(body: &[u8]) -> String {
    let canonical = if crate::input::is_blank(body) {
        "null".to_owned()
    } else {
        serde_json::from_slice::<serde_json::Value>(body)
            .map(|v| v.to_string())
            .unwrap_or_else(|_| String::from_utf8_lossy(body).into_owned())
    };
    crate::tenants::hash_key(&canonical)
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
