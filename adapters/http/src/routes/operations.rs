//! Operations: liveness, readiness, metrics, and the answers to unknown routes and methods.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use session_lifecycle_runtime::Readiness;

use crate::error::{ApiError, ErrorCode};
use crate::state::AppState;
use crate::views::{HealthResponse, HealthStatus};

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "Up", body = HealthResponse)))]
pub async fn healthz() -> Json<HealthResponse> {
    Json(HealthResponse {
        status: HealthStatus::Ok,
        detail: None,
    })
}

/// The service can take a session: not draining, a GPU has room, the store is reachable.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Ready", body = HealthResponse),
        (status = 503, description = "Not ready: `draining`, `no_capacity` (no GPU has room for a session of the default size) or `storage_unavailable`; or overloaded (an error body)", body = HealthResponse),
    ))]
pub async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let (status, detail) = match state.engine.readiness().await {
        Readiness::Ready => {
            return Json(HealthResponse {
                status: HealthStatus::Ok,
                detail: None,
            })
            .into_response();
        }
        Readiness::Draining => (HealthStatus::Draining, None),
        Readiness::NoCapacity(why) => (HealthStatus::NoCapacity, Some(why)),
        Readiness::StoreUnreachable(why) => (HealthStatus::StorageUnavailable, Some(why)),
    };
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(HealthResponse { status, detail }),
    )
        .into_response()
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text exposition", body = String, content_type = "text/plain")))]
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let mut text = state.http_metrics.render(
        &state.engine.metrics().snapshot(),
        state.engine.active_sessions(),
        state.engine.releases_failing(),
        &state.engine.node_report().devices,
    );
    // The store's figures only when it answers at once (both reads together, 2 s at most):
    // a scrape never waits on an outage. The nodes are every node the cluster heard from
    // in the last hour, alive or not: each instance reports the same, from the store.
    let (counts, nodes) = tokio::join!(
        tokio::time::timeout(
            std::time::Duration::from_secs(2),
            state.engine.store().delivery_counts(),
        ),
        tokio::time::timeout(
            std::time::Duration::from_secs(2),
            state.engine.cluster_nodes(super::overview::NODE_WINDOW),
        ),
    );
    if let Ok(Ok(nodes)) = nodes {
        crate::metrics::render_nodes(&mut text, &nodes);
    }
    if let Ok(Ok(counts)) = counts {
        let now = state.engine.now();
        let stats = state.outbound.get().map(|o| &o.stats);
        let load = |c: Option<&std::sync::atomic::AtomicU64>| {
            c.map_or(0, |c| c.load(std::sync::atomic::Ordering::Relaxed))
        };
        crate::metrics::render_webhooks(
            &mut text,
            &crate::metrics::WebhookFigures {
                counts,
                oldest_pending_secs: counts
                    .oldest_pending_at
                    .map_or(0.0, |at| now.saturating_duration_since(at).as_secs_f64()),
                delivered_attempts: load(stats.map(|s| &s.delivered)),
                failed_attempts: load(stats.map(|s| &s.failed_attempts)),
                given_up: load(stats.map(|s| &s.given_up)),
            },
        );
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// Any other path: 404 `not_found`.
pub async fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "no such route")
}

/// A known path with a method it does not take: 405 `method_not_allowed` (the router sets
/// `Allow`).
pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        "this route does not take this method",
    )
}

/// What the load limits answer: 503 `request_timeout` past the request timeout, else 503
/// `overloaded` (too many requests in flight).
pub async fn overloaded(error: tower::BoxError) -> ApiError {
    if error.is::<tower::timeout::error::Elapsed>() {
        ApiError::new(ErrorCode::RequestTimeout, "the request took too long")
    } else {
        ApiError::new(ErrorCode::Overloaded, "too many requests in flight; retry")
    }
}
