//! `sessiond`: the HTTP API of session-lifecycle (CONTRACT.md), as an axum [`router`] that
//! other services can mount, and the `sessiond` binary around it.
//!
//! Routes: `POST /v1/sessions`, `GET /v1/sessions`, `GET /v1/sessions/{id}`,
//! `POST /v1/sessions/{id}/end`, `POST /v1/sessions/{id}/heartbeat`,
//! `GET /v1/sessions/{id}/ws`, `POST /v1/webhooks/{livekit,daily}`, `GET /healthz`,
//! `GET /v1/events` (Server-Sent Events), `GET /v1/webhook-deliveries`,
//! `POST /v1/webhook-deliveries/{id}/retry`, `GET /v1/overview`, `GET /ui` (the live
//! page, feature `live-page`), `GET /readyz`, `GET /metrics`, `GET /openapi.json`.
//!
//! Modules, each using only those listed before it (`tests/module_graph.rs` fails on a
//! cycle):
//!
//! - leaves: [`request_id`], [`views`], [`tokens`], [`webhooks`] (the pure verifiers and
//!   parsers, with their own errors), [`answers`], [`metrics`], [`limits`];
//! - [`error`] (codes and error answers), [`input`] (what clients send, checked),
//!   [`tenants`] (API keys; uses the webhook secret types and outbound endpoint types);
//! - [`outbound`] (outbound webhooks: signing, address checks, payloads, the worker);
//! - [`extract`] (the authenticated tenant, the session id of the path), [`state`];
//! - [`observe`] (request ids, log lines, metrics), [`routes`], [`doc`], and this file,
//!   which builds the router.
//!
//! # Features
//!
//! - `sessiond` (default): the `sessiond` binary and what only it uses (the SQLite and
//!   PostgreSQL stores, GPUs, avatar processes, its command line and logging). A service
//!   that mounts the router brings its own store and backends: `default-features = false`.
//! - `live-page` (default): `GET /ui`, the live page, compiled into the router.
//! - `outbound-webhooks` (default): delivery of outbound webhooks and callbacks by
//!   [`outbound::Outbound`] (reqwest with rustls). Without it the worker still fans events
//!   out to the event stream and prunes the outbox, and refuses tenants that have webhook
//!   endpoints or a callback secret.
//!
//! A service mounts the API in its own router (see `examples/embed_axum.rs` for one
//! served with its own authentication in front):
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! use axum::body::Body;
//! use axum::http::{Request, StatusCode};
//! use session_lifecycle_http::tenants::Tenants;
//! use session_lifecycle_http::tokens::TokenSigner;
//! use session_lifecycle_http::{AppState, HttpConfig, router};
//! use session_lifecycle_runtime::{Engine, EngineConfig, MemoryStore, Plan, SystemClock};
//! use tower::ServiceExt as _;
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let store = Arc::new(MemoryStore::new());
//! let engine = Engine::open(store, Vec::new(), Arc::new(SystemClock), EngineConfig::default())
//!     .await
//!     .unwrap();
//! let tenants = Tenants::single("acme", "sk_test", Plan::new(None, Duration::from_secs(3600)));
//! let tokens = TokenSigner::from_secret("shared by the instances");
//! let state = AppState::new(engine, tenants, tokens, HttpConfig::default());
//! let app = axum::Router::new().nest("/avatar", router(state));
//!
//! let create = Request::post("/avatar/v1/sessions").header("x-api-key", "sk_test");
//! let answer = app.clone().oneshot(create.body(Body::empty()).unwrap()).await.unwrap();
//! assert_eq!(answer.status(), StatusCode::CREATED);
//! let anonymous = Request::post("/avatar/v1/sessions").body(Body::empty()).unwrap();
//! assert_eq!(app.oneshot(anonymous).await.unwrap().status(), StatusCode::UNAUTHORIZED);
//! # });
//! ```

pub mod answers;
pub mod doc;
pub mod error;
pub mod extract;
pub mod input;
pub mod limits;
pub mod metrics;
pub mod observe;
pub mod outbound;
pub mod request_id;
pub mod routes;
pub mod serve;
pub mod state;
pub mod tenants;
pub mod tokens;
pub mod views;
pub mod webhooks;

use std::sync::Arc;

use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use tower::ServiceBuilder;

pub use crate::doc::openapi;
pub use crate::serve::serve;
pub use crate::state::{AppState, HttpConfig};

use crate::routes::{events, operations, overview, sessions, usage, webhooks as hooks, ws};

/// The API as a router, ready to serve or to mount in another service's router.
pub fn router(state: Arc<AppState>) -> Router {
    let limits = ServiceBuilder::new()
        .layer(HandleErrorLayer::new(operations::overloaded))
        .load_shed()
        .concurrency_limit(state.config.max_in_flight)
        .timeout(state.config.request_timeout);
    let webhook_limit = state.config.webhook_max_body_bytes;
    let routes = Router::new()
        .route(
            "/v1/sessions",
            post(sessions::create_session).get(sessions::list_sessions),
        )
        .route("/v1/sessions/{session_id}", get(sessions::get_session))
        .route("/v1/sessions/{session_id}/end", post(sessions::end_session))
        .route(
            "/v1/sessions/{session_id}/heartbeat",
            post(sessions::heartbeat),
        )
        .route("/v1/sessions/{session_id}/ws", get(ws::session_ws))
        // Provider events carry room and participant metadata: a limit of their own.
        .route(
            "/v1/webhooks/livekit",
            post(hooks::livekit).layer(DefaultBodyLimit::max(webhook_limit)),
        )
        .route(
            "/v1/webhooks/daily",
            post(hooks::daily).layer(DefaultBodyLimit::max(webhook_limit)),
        )
        .route("/v1/events", get(events::stream_events))
        .route("/v1/webhook-deliveries", get(events::list_deliveries))
        .route(
            "/v1/webhook-deliveries/{delivery_id}/retry",
            post(events::retry_delivery),
        )
        .route("/v1/overview", get(overview::get_overview))
        .route("/v1/usage", get(usage::get_usage))
        .route("/healthz", get(operations::healthz))
        .route("/readyz", get(operations::readyz))
        .route("/metrics", get(operations::metrics))
        .route("/openapi.json", get(doc::openapi_json));
    with_live_page(routes)
        .method_not_allowed_fallback(operations::method_not_allowed)
        .fallback(operations::not_found)
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .layer(limits)
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            observe::observe,
        ))
        .with_state(state)
}

/// `GET /ui`, its trailing-slash redirect and its files.
#[cfg(feature = "live-page")]
fn with_live_page(routes: Router<Arc<AppState>>) -> Router<Arc<AppState>> {
    use crate::routes::page;
    routes
        .route("/ui", get(page::page))
        .route("/ui/", get(page::page_with_slash))
        .route("/ui/{asset}", get(page::page_asset))
}

/// Built without the live page: `/ui` is an unknown path.
#[cfg(not(feature = "live-page"))]
fn with_live_page(routes: Router<Arc<AppState>>) -> Router<Arc<AppState>> {
    routes
}
