//! The `/v1` handlers, their JSON bodies and errors.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use session_lifecycle::{EndReason, ReleaseState, SessionId, Status};
use session_lifecycle_runtime::{
    EngineError, ListQuery, Readiness, ResourceRequest, RoomBinding, RoomProvider, SessionRecord,
    StartRequest,
};
use utoipa::{IntoParams, ToSchema};

use crate::AppState;
use crate::auth::Tenant;

/// Longest metadata document accepted, serialized.
pub const MAX_METADATA_BYTES: usize = 4096;
/// Longest room name accepted.
pub const MAX_ROOM_NAME: usize = 128;
/// Most GPU memory a session may ask for, in MiB (1 TiB).
pub const MAX_GPU_MEMORY_MIB: u64 = 1 << 20;
/// Highest GPU index a session may ask for.
pub const MAX_GPU_DEVICE: u32 = 1023;
/// Default and largest page of a listing.
pub const DEFAULT_PAGE: u32 = 20;
/// Largest page of a listing.
pub const MAX_PAGE: u32 = 100;

/// An error answer: `{"success": false, "error": {"code": ..., "message": ...}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after: Option<u64>,
}

/// The error body.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    /// Always `false`.
    pub success: bool,
    /// What went wrong.
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// A stable machine-readable code: `unauthorized`, `invalid_session_id`,
    /// `session_not_found`, `invalid_request`, `payload_too_large`, `plan_limit_reached`,
    /// `capacity_exhausted`, `storage_unavailable`, `session_ended`, `start_failed`,
    /// `shutting_down`, `overloaded`, `request_timeout`, `upgrade_required`, `not_found`.
    pub code: String,
    /// A human-readable explanation.
    pub message: String,
}

impl ApiError {
    pub(crate) fn new(
        status: StatusCode,
        code: &'static str,
        message: impl Into<String>,
    ) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    fn retry_after(mut self, secs: u64) -> ApiError {
        self.retry_after = Some(secs);
        self
    }

    pub(crate) fn unauthorized() -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or invalid API key",
        )
    }

    pub(crate) fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            success: false,
            error: ErrorDetail {
                code: self.code.to_owned(),
                message: self.message,
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> ApiError {
        match e {
            EngineError::NotFound => ApiError::new(
                StatusCode::NOT_FOUND,
                "session_not_found",
                "session not found",
            ),
            EngineError::SessionEnded => ApiError::new(
                StatusCode::CONFLICT,
                "session_ended",
                "the session has ended",
            ),
            EngineError::PlanLimit(n) => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "plan_limit_reached",
                format!("your plan allows {n} concurrent sessions"),
            ),
            EngineError::CapacityExhausted(m) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "capacity_exhausted", m)
                    .retry_after(5)
            }
            EngineError::StartFailed(m) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "start_failed", m)
            }
            EngineError::InvalidConfig(e) => {
                // Not reachable once the engine opened (its settings were checked then).
                tracing::error!(error = %e, "invalid engine settings");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal_error",
                    "the service is misconfigured",
                )
            }
            EngineError::Store(e) => {
                tracing::warn!(error = %e, "store failed");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "storage_unavailable",
                    "session storage is unavailable",
                )
                .retry_after(1)
            }
            EngineError::Draining => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "draining",
                "this instance is draining and takes no new sessions; retry (another instance takes it)",
            )
            .retry_after(1),
            EngineError::ShuttingDown => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "the service is shutting down",
            )
            .retry_after(5),
        }
    }
}

/// A session, as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SessionView {
    /// `sess_` + a 26-character ULID.
    #[schema(example = "sess_01HM6AQH20ZZHCK79E5QFWVW30")]
    pub session_id: String,
    /// `started` until the session ends, then `ended` for good.
    pub status: StatusView,
    /// RFC 3339 UTC, second precision.
    #[schema(example = "2024-01-15T10:30:00Z")]
    pub started_at: String,
    /// When it ended; `null` while started.
    #[schema(example = "2024-01-15T10:35:00Z")]
    pub ended_at: Option<String>,
    /// Why it ended; `null` while started.
    pub end_reason: Option<EndReasonView>,
    /// When it ends by itself: `started_at + min(requested duration, plan limit)`.
    pub expires_at: String,
    /// The latest liveness signal (WebSocket message, heartbeat).
    pub last_seen_at: String,
    /// The video room it is bound to.
    pub room: Option<RoomView>,
    /// The client's metadata, as given.
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<serde_json::Value>,
    /// What it holds, and where each release stands. Present on create, get, list and
    /// heartbeat answers; left out of end answers, which are identical on every repeat
    /// while releases progress in the background.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Vec<ResourceView>>,
}

/// Session status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StatusView {
    /// Running.
    Started,
    /// Terminated.
    Ended,
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EndReasonView {
    /// An explicit end call.
    Requested,
    /// The last client WebSocket closed or stopped answering pings.
    WebsocketDisconnected,
    /// The last participant left the video room.
    RoomEmpty,
    /// No participant joined its room in time.
    NobodyJoined,
    /// It reached `expires_at`.
    Expired,
    /// The safety sweeper found no liveness for the orphan timeout.
    Orphaned,
    /// The node running it died; another node ended it.
    NodeLost,
    /// The avatar server exited on its own.
    AvatarExited,
    /// Its resources could not be acquired.
    StartFailed,
    /// The service was stopped on purpose.
    Shutdown,
}

impl From<EndReason> for EndReasonView {
    fn from(r: EndReason) -> Self {
        match r {
            EndReason::Requested => EndReasonView::Requested,
            EndReason::WebsocketDisconnected => EndReasonView::WebsocketDisconnected,
            EndReason::RoomEmpty => EndReasonView::RoomEmpty,
            EndReason::NobodyJoined => EndReasonView::NobodyJoined,
            EndReason::Expired => EndReasonView::Expired,
            EndReason::Orphaned => EndReasonView::Orphaned,
            EndReason::NodeLost => EndReasonView::NodeLost,
            EndReason::AvatarExited => EndReasonView::AvatarExited,
            EndReason::StartFailed => EndReasonView::StartFailed,
            EndReason::Shutdown => EndReasonView::Shutdown,
        }
    }
}

/// A room binding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RoomView {
    /// The provider.
    pub provider: ProviderView,
    /// The room's name at the provider (1 to 128 characters).
    pub name: String,
}

/// A video room provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ProviderView {
    /// LiveKit.
    Livekit,
    /// Daily.
    Daily,
}

/// A resource a session holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ResourceView {
    /// `avatar_process`, `gpu_assignment`, `gpu_reservation`, or `kind_<n>`.
    pub kind: String,
    /// The adapter's handle (a process id, ...).
    pub handle: u64,
    /// `held`, `pending` or `released`.
    pub release: ReleaseView,
    /// Failed release attempts so far.
    pub release_attempts: u32,
    /// When a pending release is tried next (releases go one at a time, the last acquired
    /// first: a resource also waits for those acquired after it).
    pub retry_at: Option<String>,
    /// Why the last attempt failed, while the resource is still held.
    pub release_error: Option<String>,
    /// When it was released.
    pub released_at: Option<String>,
    /// How the release went (`sigterm`, `sigkill: cgroup.kill ...`, `freed`,
    /// `escalated: killed pids [...]`, `exited`, ...).
    pub note: Option<String>,
}

/// Where a resource's release stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseView {
    /// Held by a started session.
    Held,
    /// Being released (retried until it succeeds).
    Pending,
    /// Given back.
    Released,
}

fn kind_name(kind: u16) -> String {
    match kind {
        1 => "avatar_process".to_owned(),
        2 => "gpu_assignment".to_owned(),
        3 => "gpu_reservation".to_owned(),
        n => format!("kind_{n}"),
    }
}

impl From<&SessionRecord> for SessionView {
    fn from(r: &SessionRecord) -> Self {
        let s = &r.session;
        SessionView {
            session_id: s.id().to_string(),
            status: match s.status() {
                Status::Started => StatusView::Started,
                Status::Ended => StatusView::Ended,
            },
            started_at: s.started_at().to_string(),
            ended_at: s.ended_at().map(|t| t.to_string()),
            end_reason: s.end_reason().map(Into::into),
            expires_at: s.expires_at().to_string(),
            last_seen_at: s.last_seen_at().to_string(),
            room: r.room.as_ref().map(|room| RoomView {
                provider: match room.provider {
                    RoomProvider::Livekit => ProviderView::Livekit,
                    RoomProvider::Daily => ProviderView::Daily,
                },
                name: room.name.clone(),
            }),
            metadata: r
                .metadata
                .as_deref()
                .and_then(|m| serde_json::from_str(m).ok()),
            resources: Some(
                s.resources()
                    .iter()
                    .map(|held| {
                        let (release, release_attempts, retry_at, released_at) = match held.release
                        {
                            ReleaseState::Held => (ReleaseView::Held, 0, None, None),
                            ReleaseState::Pending { attempts, retry_at } => (
                                ReleaseView::Pending,
                                attempts,
                                Some(retry_at.to_string()),
                                None,
                            ),
                            ReleaseState::Released { at } => {
                                (ReleaseView::Released, 0, None, Some(at.to_string()))
                            }
                        };
                        let find = |list: &[(session_lifecycle::Resource, String)]| {
                            list.iter()
                                .find(|(res, _)| *res == held.resource)
                                .map(|(_, n)| n.clone())
                        };
                        ResourceView {
                            kind: kind_name(held.resource.kind.0),
                            handle: held.resource.handle,
                            release,
                            release_attempts,
                            retry_at,
                            release_error: find(&r.release_errors),
                            released_at,
                            note: find(&r.release_notes),
                        }
                    })
                    .collect(),
            ),
        }
    }
}

impl SessionView {
    /// The view of an ended session as every end answer shows it: only what never changes
    /// after the end.
    pub fn as_ended(mut self) -> SessionView {
        self.resources = None;
        self
    }
}

/// `{"success": true, "session": {...}}`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SessionResponse {
    /// Always `true`.
    pub success: bool,
    /// The session.
    pub session: SessionView,
}

/// The answer to a create: the session and its client token.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CreatedResponse {
    /// Always `true`.
    pub success: bool,
    /// The new session, `started`.
    pub session: SessionView,
    /// A signed, session-scoped token for the browser: open the session's WebSocket with
    /// `?token=<client_token>`. Valid until the session expires.
    pub client_token: String,
}

/// A page of sessions, newest first.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ListResponse {
    /// Always `true`.
    pub success: bool,
    /// The sessions of this page.
    pub sessions: Vec<SessionView>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

/// What a new session asks for. Every field is optional, and so is the body.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    /// How long the session may run, in seconds (the plan's limit caps it).
    #[schema(minimum = 1, maximum = 604800)]
    pub duration_secs: Option<u64>,
    /// Bind the session to a video room: it ends when the last participant leaves.
    pub room: Option<RoomView>,
    /// A small JSON object (at most 4096 bytes) returned with the session.
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
    /// GPU memory for the session's avatar server, in MiB (the service's default when
    /// absent). A start fails with 503 `capacity_exhausted` when no GPU has room.
    #[schema(minimum = 1, maximum = 1048576)]
    pub gpu_memory_mib: Option<u64>,
    /// The GPU (its index) to run on; placement chooses when absent.
    #[schema(maximum = 1023)]
    pub gpu_device: Option<u32>,
}

/// Listing parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Only sessions with this status.
    #[param(value_type = Option<StatusView>)]
    pub status: Option<String>,
    /// Page size, 1 to 100 (default 20).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 100)]
    pub limit: Option<String>,
    /// The `next_cursor` of the previous page.
    #[param(pattern = "^sess_[0-9A-HJKMNP-TV-Z]{1,64}$")]
    pub cursor: Option<String>,
}

/// The authenticated tenant of a request, from its `x-api-key` header.
pub fn tenant<'a>(state: &'a AppState, headers: &HeaderMap) -> Result<&'a Tenant, ApiError> {
    let key = headers.get("x-api-key").and_then(|v| v.to_str().ok());
    state
        .tenants
        .authenticate(key)
        .ok_or_else(ApiError::unauthorized)
}

/// The caller's tenant and the session id of the path, checked in that order (a bad
/// key is a 401 whatever the id).
fn caller<'a>(
    state: &'a AppState,
    headers: &HeaderMap,
    raw_id: &str,
) -> Result<(&'a Tenant, SessionId), ApiError> {
    let tenant = tenant(state, headers)?;
    Ok((tenant, session_id(raw_id)?))
}

impl SessionResponse {
    /// The success answer showing `record` in full.
    fn of(record: &SessionRecord) -> Json<SessionResponse> {
        Json(SessionResponse {
            success: true,
            session: SessionView::from(record),
        })
    }
}

/// Parses a path's session id.
pub fn session_id(text: &str) -> Result<SessionId, ApiError> {
    SessionId::parse(text).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_session_id",
            format!("invalid session id: {e}"),
        )
    })
}

/// The error for a body that could not be read: 413 past the limit, else 400.
pub(crate) fn body_error(e: BytesRejection) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "request body too large",
        )
    } else {
        ApiError::invalid(format!("cannot read the request body: {e}"))
    }
}

/// Parses and checks a create body (empty means all defaults).
pub fn parse_create(body: &[u8]) -> Result<CreateRequest, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(CreateRequest::default());
    }
    let request: CreateRequest = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}")))?;
    if request.duration_secs.is_some_and(|d| d == 0 || d > 604_800) {
        return Err(ApiError::invalid(
            "duration_secs must be between 1 and 604800",
        ));
    }
    if request
        .room
        .as_ref()
        .is_some_and(|room| room.name.is_empty() || room.name.chars().count() > MAX_ROOM_NAME)
    {
        return Err(ApiError::invalid("room.name must have 1 to 128 characters"));
    }
    if request
        .gpu_memory_mib
        .is_some_and(|m| m == 0 || m > MAX_GPU_MEMORY_MIB)
    {
        return Err(ApiError::invalid(
            "gpu_memory_mib must be between 1 and 1048576",
        ));
    }
    if request.gpu_device.is_some_and(|d| d > MAX_GPU_DEVICE) {
        return Err(ApiError::invalid("gpu_device must be between 0 and 1023"));
    }
    if let Some(m) = &request.metadata {
        let size = serde_json::to_vec(m).map(|v| v.len()).unwrap_or(usize::MAX);
        if size > MAX_METADATA_BYTES {
            return Err(ApiError::invalid(
                "metadata must be at most 4096 bytes of JSON",
            ));
        }
    }
    Ok(request)
}

/// Start a session.
#[utoipa::path(
    post, path = "/v1/sessions", tag = "sessions",
    request_body(content = Option<CreateRequest>, description = "Optional; an empty body takes every default"),
    responses(
        (status = 201, description = "Started", body = CreatedResponse),
        (status = 400, description = "Malformed JSON or an invalid field (`invalid_request`)", body = ErrorBody),
        (status = 401, description = "Missing, unknown or revoked API key", body = ErrorBody),
        (status = 413, description = "Body over the limit", body = ErrorBody),
        (status = 429, description = "Plan limit of concurrent sessions reached", body = ErrorBody),
        (status = 503, description = "No capacity, start failed, storage unavailable, shutting down or overloaded", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn create_session(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let tenant = tenant(&state, &headers)?;
    let body = body.map_err(body_error)?;
    let request = parse_create(&body)?;
    let record = state
        .engine
        .start(StartRequest {
            tenant: tenant.name.clone(),
            plan: tenant.plan,
            duration: request.duration_secs.map(Duration::from_secs),
            metadata: request
                .metadata
                .map(|m| serde_json::Value::Object(m).to_string()),
            room: request.room.map(|r| RoomBinding {
                provider: match r.provider {
                    ProviderView::Livekit => RoomProvider::Livekit,
                    ProviderView::Daily => RoomProvider::Daily,
                },
                name: r.name,
            }),
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
            session: SessionView::from(&record),
            client_token: token,
        }),
    )
        .into_response())
}

/// Get a session.
#[utoipa::path(
    get, path = "/v1/sessions/{session_id}", tag = "sessions",
    params(("session_id" = String, Path, description = "The session id")),
    responses(
        (status = 200, description = "The session", body = SessionResponse),
        (status = 400, description = "Malformed session id", body = ErrorBody),
        (status = 401, description = "Missing, unknown or revoked API key", body = ErrorBody),
        (status = 404, description = "Unknown session (or another tenant's)", body = ErrorBody),
        (status = 503, description = "Storage unavailable or overloaded", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn get_session(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<SessionResponse>, ApiError> {
    let (tenant, id) = caller(&state, &headers, &id)?;
    let record = state.engine.get(Some(&tenant.name), id).await?;
    Ok(SessionResponse::of(&record))
}

/// List sessions, newest first.
#[utoipa::path(
    get, path = "/v1/sessions", tag = "sessions",
    params(ListParams),
    responses(
        (status = 200, description = "A page of sessions", body = ListResponse),
        (status = 400, description = "Invalid status, limit or cursor", body = ErrorBody),
        (status = 401, description = "Missing, unknown or revoked API key", body = ErrorBody),
        (status = 503, description = "Storage unavailable or overloaded", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn list_sessions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    params: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<ListResponse>, ApiError> {
    let tenant = tenant(&state, &headers)?;
    let Query(params) = params.map_err(|e| ApiError::invalid(e.body_text()))?;
    let status = match params.status.as_deref() {
        None => None,
        Some("started") => Some(Status::Started),
        Some("ended") => Some(Status::Ended),
        Some(_) => return Err(ApiError::invalid("status must be started or ended")),
    };
    let limit = match params.limit.as_deref() {
        None => DEFAULT_PAGE,
        Some(text) => match text.parse::<u32>() {
            Ok(n) if (1..=MAX_PAGE).contains(&n) => n,
            _ => return Err(ApiError::invalid("limit must be an integer from 1 to 100")),
        },
    };
    let before = match params.cursor.as_deref() {
        None => None,
        Some(c) => Some(SessionId::parse(c).map_err(|_| ApiError::invalid("invalid cursor"))?),
    };
    let records = state
        .engine
        .list(ListQuery {
            tenant: Some(tenant.name.clone()),
            status,
            limit,
            before,
            node: None,
        })
        .await?;
    let next_cursor = if records.len() == limit as usize {
        records.last().map(|r| r.session.id().to_string())
    } else {
        None
    };
    Ok(Json(ListResponse {
        success: true,
        sessions: records.iter().map(SessionView::from).collect(),
        next_cursor,
    }))
}

/// End a session: stops its avatar server and releases its GPU resources. Idempotent:
/// ending an ended session returns it exactly as it was first ended.
#[utoipa::path(
    post, path = "/v1/sessions/{session_id}/end", tag = "sessions",
    params(("session_id" = String, Path, description = "The session id")),
    responses(
        (status = 200, description = "Ended (now or before)", body = SessionResponse),
        (status = 400, description = "Malformed session id", body = ErrorBody),
        (status = 401, description = "Missing, unknown or revoked API key", body = ErrorBody),
        (status = 404, description = "Unknown session (or another tenant's)", body = ErrorBody),
        (status = 503, description = "Storage unavailable or overloaded", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn end_session(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let (tenant, id) = caller(&state, &headers, &id)?;
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
        session: SessionView::from(&record).as_ended(),
    })
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    let body = Bytes::from(body);
    state.ended_answers.put(id, &tenant.name, body.clone());
    Ok(json_bytes(body))
}

fn json_bytes(body: Bytes) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// End answers of ended sessions, by session id (and tenant, checked on every hit).
/// Bounded: when full it starts over (a miss only costs a store read).
pub struct EndedAnswers {
    answers: std::sync::Mutex<std::collections::HashMap<SessionId, (String, Bytes)>>,
    capacity: usize,
}

impl EndedAnswers {
    /// Room for `capacity` answers.
    pub fn new(capacity: usize) -> EndedAnswers {
        EndedAnswers {
            answers: std::sync::Mutex::new(std::collections::HashMap::new()),
            capacity,
        }
    }

    fn get(&self, id: SessionId, tenant: &str) -> Option<Bytes> {
        let answers = self.answers.lock().unwrap_or_else(|p| p.into_inner());
        match answers.get(&id) {
            Some((owner, body)) if owner == tenant => Some(body.clone()),
            _ => None,
        }
    }

    fn put(&self, id: SessionId, tenant: &str, body: Bytes) {
        let mut answers = self.answers.lock().unwrap_or_else(|p| p.into_inner());
        if answers.len() >= self.capacity {
            answers.clear();
        }
        answers.insert(id, (tenant.to_owned(), body));
    }
}

/// Record liveness: keeps a session from being ended as an orphan.
#[utoipa::path(
    post, path = "/v1/sessions/{session_id}/heartbeat", tag = "sessions",
    params(("session_id" = String, Path, description = "The session id")),
    responses(
        (status = 200, description = "Recorded", body = SessionResponse),
        (status = 400, description = "Malformed session id", body = ErrorBody),
        (status = 401, description = "Missing, unknown or revoked API key", body = ErrorBody),
        (status = 404, description = "Unknown session (or another tenant's)", body = ErrorBody),
        (status = 409, description = "The session has ended (`session_ended`)", body = ErrorBody),
        (status = 503, description = "Storage unavailable or overloaded", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn heartbeat(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<SessionResponse>, ApiError> {
    let (tenant, id) = caller(&state, &headers, &id)?;
    let record = state.engine.touch(Some(&tenant.name), id).await?;
    Ok(SessionResponse::of(&record))
}

/// Liveness of the process.
#[derive(Serialize, ToSchema)]
pub struct HealthResponse {
    /// `ok`, or what is wrong: `draining`, `no_capacity`, `storage_unavailable`.
    pub status: String,
    /// Why, when not `ok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "Up", body = HealthResponse)))]
pub async fn healthz() -> Json<HealthResponse> {
    Json(HealthResponse {
        status: "ok".to_owned(),
        detail: None,
    })
}

/// The service can serve: its store is reachable.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Ready", body = HealthResponse),
        (status = 503, description = "Not ready: `draining`, `no_capacity` (no GPU has room for a session of the default size) or `storage_unavailable`", body = HealthResponse),
    ))]
pub async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let (status, detail) = match state.engine.readiness().await {
        Readiness::Ready => {
            return Json(HealthResponse {
                status: "ok".to_owned(),
                detail: None,
            })
            .into_response();
        }
        Readiness::Draining => ("draining", None),
        Readiness::NoCapacity(why) => ("no_capacity", Some(why)),
        Readiness::StoreUnreachable(why) => ("storage_unavailable", Some(why)),
    };
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(HealthResponse {
            status: status.to_owned(),
            detail,
        }),
    )
        .into_response()
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text exposition", body = String, content_type = "text/plain")))]
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let text = state.http_metrics.render(
        &state.engine.metrics().snapshot(),
        state.engine.active_sessions(),
        state.engine.releases_failing(),
    );
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// Any other path.
pub async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}
