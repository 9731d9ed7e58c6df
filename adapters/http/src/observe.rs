//! The outermost middleware: gives every request its id, logs one line per request (in
//! the request's span, with its id and the session id when the path has one) and records
//! its latency by route and status.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tracing::Instrument as _;

use crate::request_id::{self, RequestId};
use crate::state::AppState;

/// Serves `request` with its id (the caller's `x-request-id` when reasonable, else a new
/// one) current, in a `request` span carrying it, and sets the id on the answer.
pub async fn observe(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let id = RequestId::from_header(
        request
            .headers()
            .get(request_id::HEADER)
            .map(HeaderValue::as_bytes),
    );
    let span = tracing::info_span!("request", request_id = %id);
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let header = HeaderValue::from_str(id.as_str()).ok();
    // Headers over the service's limits are refused here, in the layer every request
    // passes anyway: one layer less on every other request.
    let mut response = match crate::input::headers_too_large(request.headers()) {
        Some(refused) => {
            id.scope(async move { refused.into_response() })
                .instrument(span.clone())
                .await
        }
        None => id.scope(next.run(request)).instrument(span.clone()).await,
    };
    if let Some(header) = header {
        response.headers_mut().insert(request_id::HEADER, header);
    }
    let took = started.elapsed();
    let status = response.status().as_u16();
    state.http_metrics.observe(&route, status, took);
    let session = path
        .split('/')
        .find(|seg| seg.starts_with("sess_"))
        .unwrap_or("-");
    span.in_scope(|| {
        tracing::info!(
            %method,
            path = %path,
            route = %route,
            status,
            session,
            micros = took.as_micros() as u64,
            "request"
        );
    });
    response
}
