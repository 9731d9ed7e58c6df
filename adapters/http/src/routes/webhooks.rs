//! The room webhook receivers: verify (401 when that fails), parse (400), apply.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::HeaderMap;
use session_lifecycle_runtime::{RoomEvent, RoomProvider};

use crate::error::{ApiError, ErrorBody, ErrorCode};
use crate::input::body_error;
use crate::state::AppState;
use crate::views::{WebhookOutcome, WebhookResponse};
use crate::webhooks::parse::{
    ParseError, ParsedEvent, is_daily_verification, parse_daily, parse_livekit,
};
use crate::webhooks::verify::{VerifyError, verify_daily, verify_livekit};

fn refused(e: VerifyError) -> ApiError {
    tracing::warn!(error = %e, "webhook refused");
    ApiError::new(
        ErrorCode::Unauthorized,
        "webhook signature invalid or missing",
    )
}

fn unparsable(e: ParseError) -> ApiError {
    ApiError::invalid(e.to_string())
}

async fn apply(
    state: &AppState,
    provider: RoomProvider,
    tenant: Option<&str>,
    parsed: Option<ParsedEvent>,
) -> Result<Json<WebhookResponse>, ApiError> {
    let answer = |outcome| {
        Ok(Json(WebhookResponse {
            success: true,
            outcome,
        }))
    };
    let Some(parsed) = parsed else {
        return answer(WebhookOutcome::Ignored);
    };
    let avatar = state.webhooks.avatar_identity.as_deref();
    if avatar.is_some_and(|a| parsed.aliases.iter().any(|alias| alias == a)) {
        return answer(WebhookOutcome::Ignored);
    }
    let report = state
        .engine
        .room_event(RoomEvent {
            tenant: tenant.map(str::to_owned),
            provider,
            room: parsed.room,
            event_id: parsed.event_id,
            at: parsed.at,
            kind: parsed.kind,
        })
        .await?;
    if report.duplicate {
        return answer(WebhookOutcome::Duplicate);
    }
    for id in &report.ended {
        tracing::info!(session = %id, "room empty: session ended");
    }
    answer(WebhookOutcome::Applied)
}

/// LiveKit webhook receiver.
#[utoipa::path(
    post, path = "/v1/webhooks/livekit", tag = "webhooks",
    request_body(content = String, description = "LiveKit's webhook event (JSON), signed in `Authorization`"),
    params(("Authorization" = String, Header, description = "The JWT LiveKit signs with the API secret")),
    responses(
        (status = 200, description = "Accepted (applied, duplicate or ignored)", body = WebhookResponse),
        (status = 400, description = "Signed, but not a webhook body (`invalid_request`)", body = ErrorBody),
        (status = 401, description = "Missing or bad signature, stale token, or no secret configured (`unauthorized`)", body = ErrorBody),
        (status = 413, description = "Body over the limit (`payload_too_large`)", body = ErrorBody),
        (status = 503, description = "Storage unavailable or overloaded", body = ErrorBody),
    )
)]
pub async fn livekit(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<WebhookResponse>, ApiError> {
    let body = body.map_err(body_error)?;
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok());
    let cfg = &state.webhooks;
    let tenant = verify_livekit(&cfg.livekit, auth, &body, state.engine.now(), cfg.tolerance)
        .map_err(refused)?;
    let parsed = parse_livekit(&body).map_err(unparsable)?;
    apply(&state, RoomProvider::Livekit, tenant, parsed).await
}

/// Daily webhook receiver.
///
/// Daily's check of the endpoint (body exactly `{"test":"test"}`, sent before it creates a
/// webhook or re-activates a failed one) is answered 200 with outcome `verification`,
/// signed or not, and changes nothing; every other delivery must be signed.
#[utoipa::path(
    post, path = "/v1/webhooks/daily", tag = "webhooks",
    request_body(content = String, description = "Daily's webhook event (JSON)"),
    params(
        ("X-Webhook-Signature" = String, Header, description = "base64 HMAC-SHA256 of `{timestamp}.{body}`"),
        ("X-Webhook-Timestamp" = String, Header, description = "Unix time of the signature"),
    ),
    responses(
        (status = 200, description = "Accepted (applied, duplicate or ignored), or Daily's endpoint check (`verification`)", body = WebhookResponse),
        (status = 400, description = "Signed, but not a webhook body (`invalid_request`)", body = ErrorBody),
        (status = 401, description = "Missing or bad signature, stale timestamp, or no secret configured (`unauthorized`)", body = ErrorBody),
        (status = 413, description = "Body over the limit (`payload_too_large`)", body = ErrorBody),
        (status = 503, description = "Storage unavailable or overloaded", body = ErrorBody),
    )
)]
pub async fn daily(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<WebhookResponse>, ApiError> {
    let body = body.map_err(body_error)?;
    if is_daily_verification(&body) {
        // Before any secret exists (Daily returns it when the webhook is created) and
        // whatever the signature: it asks only whether the endpoint answers.
        return Ok(Json(WebhookResponse {
            success: true,
            outcome: WebhookOutcome::Verification,
        }));
    }
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let cfg = &state.webhooks;
    let tenant = verify_daily(
        &cfg.daily,
        header("x-webhook-signature"),
        header("x-webhook-timestamp"),
        &body,
        state.engine.now(),
        cfg.tolerance,
    )
    .map_err(refused)?;
    let parsed = parse_daily(&body).map_err(unparsable)?;
    apply(&state, RoomProvider::Daily, tenant, parsed).await
}
