//! `sessiond`: the HTTP API of session-lifecycle (CONTRACT.md), as an axum [`router`] that
//! other services can mount, and the `sessiond` binary around it.
//!
//! Routes: `POST /v1/sessions`, `GET /v1/sessions`, `GET /v1/sessions/{id}`,
//! `POST /v1/sessions/{id}/end`, `POST /v1/sessions/{id}/heartbeat`,
//! `GET /v1/sessions/{id}/ws`, `GET /healthz`, `GET /readyz`, `GET /metrics`,
//! `GET /openapi.json`.

pub mod api;
pub mod auth;
pub mod observe;
pub mod webhooks;
pub mod ws;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use session_lifecycle_runtime::Engine;
use tower::ServiceBuilder;
use utoipa::OpenApi;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityScheme};

use crate::api::ApiError;
use crate::auth::{Tenants, TokenSigner};

/// HTTP settings.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Largest request body accepted (413 beyond).
    pub max_body_bytes: usize,
    /// Longest a request may take (503 `request_timeout` beyond).
    pub request_timeout: Duration,
    /// Most requests served at once; more are refused with 503 `overloaded`, never queued.
    pub max_in_flight: usize,
    /// Interval between WebSocket pings.
    pub ws_ping_interval: Duration,
    /// Silence after which a WebSocket counts as lost.
    pub ws_pong_timeout: Duration,
    /// Wait after a session's last WebSocket is gone before ending it (none by default).
    pub ws_grace: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            max_body_bytes: 16 * 1024,
            request_timeout: Duration::from_secs(30),
            max_in_flight: 1024,
            ws_ping_interval: Duration::from_secs(5),
            ws_pong_timeout: Duration::from_secs(15),
            ws_grace: Duration::ZERO,
        }
    }
}

/// What the handlers share.
pub struct AppState {
    /// The session engine.
    pub engine: Engine,
    /// Who may call, and their plans.
    pub tenants: Tenants,
    /// Signs client tokens.
    pub tokens: TokenSigner,
    /// HTTP settings.
    pub config: HttpConfig,
    /// Open WebSockets per session.
    pub presence: ws::Presence,
    /// Request metrics.
    pub http_metrics: observe::HttpMetrics,
    /// Answers of repeated ends.
    pub ended_answers: api::EndedAnswers,
    /// Room webhook secrets and settings.
    pub webhooks: webhooks::WebhookConfig,
    /// Flips to `true` when the service shuts down: WebSockets close.
    pub shutdown: tokio::sync::watch::Sender<bool>,
}

impl AppState {
    /// State over `engine`, with no room webhook secrets (those endpoints refuse all).
    pub fn new(
        engine: Engine,
        tenants: Tenants,
        tokens: TokenSigner,
        config: HttpConfig,
    ) -> Arc<AppState> {
        AppState::with_webhooks(
            engine,
            tenants,
            tokens,
            config,
            webhooks::WebhookConfig::default(),
        )
    }

    /// State over `engine`, with room webhooks configured.
    pub fn with_webhooks(
        engine: Engine,
        tenants: Tenants,
        tokens: TokenSigner,
        config: HttpConfig,
        webhooks: webhooks::WebhookConfig,
    ) -> Arc<AppState> {
        Arc::new(AppState {
            webhooks,
            engine,
            tenants,
            tokens,
            config,
            presence: ws::Presence::default(),
            http_metrics: observe::HttpMetrics::default(),
            ended_answers: api::EndedAnswers::new(65_536),
            shutdown: tokio::sync::watch::channel(false).0,
        })
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "sessiond",
        description = "Lifecycle of real-time, GPU-backed AI avatar sessions: start, end (idempotent), \
                       automatic termination, and resource release."
    ),
    paths(
        api::create_session,
        api::list_sessions,
        api::get_session,
        api::end_session,
        api::heartbeat,
        ws::session_ws,
        api::healthz,
        api::readyz,
        api::metrics,
        openapi_json,
        webhooks::livekit,
        webhooks::daily,
    ),
    components(schemas(
        api::ErrorBody,
        api::ErrorDetail,
        api::SessionView,
        api::StatusView,
        api::EndReasonView,
        api::RoomView,
        api::ProviderView,
        api::ResourceView,
        api::ReleaseView,
        api::SessionResponse,
        api::CreatedResponse,
        api::ListResponse,
        api::CreateRequest,
        api::HealthResponse,
        webhooks::WebhookResponse,
    )),
    modifiers(&ApiKeyScheme)
)]
struct ApiDoc;

struct ApiKeyScheme;

impl utoipa::Modify for ApiKeyScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("x-api-key"))),
        );
    }
}

/// The OpenAPI document of every route, generated from the handlers.
pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// This OpenAPI document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "The OpenAPI document of every route", body = Object)))]
async fn openapi_json() -> impl IntoResponse {
    axum::Json(openapi())
}

async fn overloaded(error: tower::BoxError) -> ApiError {
    if error.is::<tower::timeout::error::Elapsed>() {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "request_timeout",
            "the request took too long",
        )
    } else {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "too many requests in flight; retry",
        )
    }
}

/// The API as a router, ready to serve or to mount in another service's router.
pub fn router(state: Arc<AppState>) -> Router {
    let limits = ServiceBuilder::new()
        .layer(HandleErrorLayer::new(overloaded))
        .load_shed()
        .concurrency_limit(state.config.max_in_flight)
        .timeout(state.config.request_timeout);
    Router::new()
        .route(
            "/v1/sessions",
            post(api::create_session).get(api::list_sessions),
        )
        .route("/v1/sessions/{session_id}", get(api::get_session))
        .route("/v1/sessions/{session_id}/end", post(api::end_session))
        .route("/v1/sessions/{session_id}/heartbeat", post(api::heartbeat))
        .route("/v1/sessions/{session_id}/ws", get(ws::session_ws))
        .route("/v1/webhooks/livekit", post(webhooks::livekit))
        .route("/v1/webhooks/daily", post(webhooks::daily))
        .route("/healthz", get(api::healthz))
        .route("/readyz", get(api::readyz))
        .route("/metrics", get(api::metrics))
        .route("/openapi.json", get(openapi_json))
        .fallback(api::not_found)
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .layer(limits)
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            observe::observe,
        ))
        .with_state(state)
}
