//! Video room webhooks: LiveKit and Daily tell when participants join and leave, and a
//! session bound to a room ends with `room_empty` when its last participant leaves (after
//! someone had joined) or the room finishes.
//!
//! Every delivery is verified before its body is parsed. LiveKit signs a JWT (HS256 with
//! the API secret) in `Authorization` whose `sha256` claim is the base64 SHA-256 of the raw
//! body. Daily signs `"{X-Webhook-Timestamp}.{body}"` with HMAC-SHA256 under the
//! base64-decoded webhook secret, base64 in `X-Webhook-Signature`; a timestamp outside
//! the tolerance window is refused (replays). With no secret configured for a provider,
//! its endpoint refuses every delivery.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use session_lifecycle::Timestamp;
use session_lifecycle_runtime::{RoomEvent, RoomEventKind, RoomProvider};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use utoipa::ToSchema;

use crate::AppState;
use crate::api::{ApiError, ErrorBody};

type HmacSha256 = Hmac<Sha256>;

/// A LiveKit API key and its secret, for one tenant (or any, when `tenant` is `None`).
#[derive(Debug, Clone)]
pub struct LivekitKey {
    /// The tenant whose sessions its events concern.
    pub tenant: Option<String>,
    /// The API key (the JWT's `iss`).
    pub api_key: String,
    /// The API secret.
    pub api_secret: String,
}

/// A Daily webhook secret (base64, as Daily gives it), for one tenant or any.
#[derive(Debug, Clone)]
pub struct DailySecret {
    /// The tenant whose sessions its events concern.
    pub tenant: Option<String>,
    /// The secret.
    pub secret: String,
}

/// Webhook settings.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// LiveKit keys.
    pub livekit: Vec<LivekitKey>,
    /// Daily secrets.
    pub daily: Vec<DailySecret>,
    /// The identity of the avatar's own participant, which does not count as presence.
    pub avatar_identity: Option<String>,
    /// How far a signature's time may be from ours.
    pub tolerance: Duration,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            livekit: Vec::new(),
            daily: Vec::new(),
            avatar_identity: Some("avatar".to_owned()),
            tolerance: Duration::from_secs(300),
        }
    }
}

/// Why a delivery was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// No secret is configured for this provider.
    #[error("no secret configured for this provider")]
    NotConfigured,
    /// A signature header is missing or malformed.
    #[error("missing or malformed signature")]
    Malformed,
    /// The signature does not match any configured secret.
    #[error("signature does not match")]
    BadSignature,
    /// The signed time is outside the tolerance window.
    #[error("stale or future timestamp")]
    Stale,
    /// The body is not the one that was signed.
    #[error("body does not match its signed digest")]
    BodyMismatch,
}

#[derive(Deserialize)]
struct JwtHeader {
    alg: String,
}

#[derive(Deserialize)]
struct LivekitClaims {
    iss: Option<String>,
    sha256: Option<String>,
    exp: Option<u64>,
    nbf: Option<u64>,
}

/// Verifies a LiveKit delivery; returns the tenant of the key that signed it.
pub fn verify_livekit<'k>(
    keys: &'k [LivekitKey],
    authorization: Option<&str>,
    body: &[u8],
    now: Timestamp,
    tolerance: Duration,
) -> Result<Option<&'k str>, VerifyError> {
    if keys.is_empty() {
        return Err(VerifyError::NotConfigured);
    }
    let token = authorization.ok_or(VerifyError::Malformed)?.trim();
    let token = token.strip_prefix("Bearer ").unwrap_or(token);
    let mut parts = token.split('.');
    let (Some(header), Some(claims), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(VerifyError::Malformed);
    };
    let decode = |part: &str| {
        URL_SAFE_NO_PAD
            .decode(part)
            .map_err(|_| VerifyError::Malformed)
    };
    let header: JwtHeader =
        serde_json::from_slice(&decode(header)?).map_err(|_| VerifyError::Malformed)?;
    if header.alg != "HS256" {
        return Err(VerifyError::Malformed);
    }
    let claims_json = decode(claims)?;
    let parsed: LivekitClaims =
        serde_json::from_slice(&claims_json).map_err(|_| VerifyError::Malformed)?;
    let signature = decode(signature)?;
    let signed = &token[..token.len() - token.rsplit('.').next().map_or(0, str::len) - 1];
    let iss = parsed.iss.as_deref().ok_or(VerifyError::Malformed)?;
    let key = keys
        .iter()
        .find(|k| bool::from(k.api_key.as_bytes().ct_eq(iss.as_bytes())))
        .ok_or(VerifyError::BadSignature)?;
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key.api_secret.as_bytes())
        .map_err(|_| VerifyError::NotConfigured)?;
    mac.update(signed.as_bytes());
    mac.verify_slice(&signature)
        .map_err(|_| VerifyError::BadSignature)?;
    let leeway = tolerance.as_secs();
    let now_secs = now.as_secs();
    if parsed
        .exp
        .is_some_and(|exp| now_secs > exp.saturating_add(leeway))
        || parsed
            .nbf
            .is_some_and(|nbf| now_secs.saturating_add(leeway) < nbf)
    {
        return Err(VerifyError::Stale);
    }
    let digest = STANDARD.encode(Sha256::digest(body));
    let claimed = parsed.sha256.ok_or(VerifyError::BodyMismatch)?;
    if !bool::from(digest.as_bytes().ct_eq(claimed.as_bytes())) {
        return Err(VerifyError::BodyMismatch);
    }
    Ok(key.tenant.as_deref())
}

/// Verifies a Daily delivery; returns the tenant of the secret that signed it.
pub fn verify_daily<'s>(
    secrets: &'s [DailySecret],
    signature: Option<&str>,
    timestamp: Option<&str>,
    body: &[u8],
    now: Timestamp,
    tolerance: Duration,
) -> Result<Option<&'s str>, VerifyError> {
    if secrets.is_empty() {
        return Err(VerifyError::NotConfigured);
    }
    let signature = STANDARD
        .decode(signature.ok_or(VerifyError::Malformed)?.trim())
        .map_err(|_| VerifyError::Malformed)?;
    let timestamp = timestamp.ok_or(VerifyError::Malformed)?.trim();
    let ts: u64 = timestamp.parse().map_err(|_| VerifyError::Malformed)?;
    // Seconds; milliseconds are accepted too.
    let ts_secs = if ts > 100_000_000_000 { ts / 1000 } else { ts };
    let mut matched = None;
    for candidate in secrets {
        let key = STANDARD
            .decode(candidate.secret.trim())
            .unwrap_or_else(|_| candidate.secret.as_bytes().to_vec());
        let Ok(mut mac) = <HmacSha256 as Mac>::new_from_slice(&key) else {
            continue;
        };
        mac.update(timestamp.as_bytes());
        mac.update(b".");
        mac.update(body);
        if mac.verify_slice(&signature).is_ok() {
            matched = Some(candidate);
        }
    }
    let secret = matched.ok_or(VerifyError::BadSignature)?;
    if now.as_secs().abs_diff(ts_secs) > tolerance.as_secs() {
        return Err(VerifyError::Stale);
    }
    Ok(secret.tenant.as_deref())
}

/// A room event in the provider's terms, before it is bound to a tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedEvent {
    /// The room.
    pub room: String,
    /// The provider's event id.
    pub event_id: String,
    /// When it happened.
    pub at: Timestamp,
    /// What happened.
    pub kind: RoomEventKind,
    /// Every identity the participant goes by (matched against the avatar's).
    pub aliases: Vec<String>,
}

fn number_or_string(v: &serde_json::Value) -> Option<f64> {
    match v {
        serde_json::Value::Number(n) => n.as_f64(),
        serde_json::Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

fn seconds(v: Option<&serde_json::Value>) -> Timestamp {
    let secs = v.and_then(number_or_string).unwrap_or(0.0).max(0.0);
    Timestamp::from_millis((secs * 1000.0) as u64)
}

fn text(v: &serde_json::Value, key: &str) -> Option<String> {
    v.get(key)
        .and_then(|x| x.as_str())
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// Parses a verified LiveKit body: `None` for events that do not concern presence.
pub fn parse_livekit(body: &[u8]) -> Result<Option<ParsedEvent>, ApiError> {
    let v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("invalid webhook body: {e}")))?;
    let event = text(&v, "event").ok_or_else(|| ApiError::invalid("webhook has no event"))?;
    let room = v.get("room").and_then(|r| text(r, "name"));
    let identity = v.get("participant").and_then(|p| text(p, "identity"));
    let kind = match (event.as_str(), &identity) {
        ("participant_joined", Some(p)) => RoomEventKind::Joined {
            participant: p.clone(),
        },
        ("participant_left", Some(p)) => RoomEventKind::Left {
            participant: p.clone(),
        },
        ("room_finished", _) => RoomEventKind::Finished,
        _ => return Ok(None),
    };
    let room = room.ok_or_else(|| ApiError::invalid("webhook has no room name"))?;
    let event_id = text(&v, "id").ok_or_else(|| ApiError::invalid("webhook has no id"))?;
    Ok(Some(ParsedEvent {
        room,
        event_id,
        at: seconds(v.get("createdAt")),
        kind,
        aliases: identity.into_iter().collect(),
    }))
}

/// Parses a verified Daily body: `None` for events that do not concern presence.
pub fn parse_daily(body: &[u8]) -> Result<Option<ParsedEvent>, ApiError> {
    let v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("invalid webhook body: {e}")))?;
    let kind_name = text(&v, "type").ok_or_else(|| ApiError::invalid("webhook has no type"))?;
    let payload = v.get("payload").cloned().unwrap_or_default();
    // A participant is its session in the meeting; user id and name are aliases.
    let participant = text(&payload, "session_id").or_else(|| text(&payload, "user_id"));
    let aliases: Vec<String> = ["session_id", "user_id", "user_name"]
        .iter()
        .filter_map(|k| text(&payload, k))
        .collect();
    let kind = match (kind_name.as_str(), participant) {
        ("participant.joined", Some(p)) => RoomEventKind::Joined { participant: p },
        ("participant.left", Some(p)) => RoomEventKind::Left { participant: p },
        ("meeting.ended", _) => RoomEventKind::Finished,
        _ => return Ok(None),
    };
    let room = text(&payload, "room").ok_or_else(|| ApiError::invalid("webhook has no room"))?;
    let event_id = text(&v, "id").ok_or_else(|| ApiError::invalid("webhook has no id"))?;
    Ok(Some(ParsedEvent {
        room,
        event_id,
        at: seconds(v.get("event_ts")),
        kind,
        aliases,
    }))
}

/// The answer to an accepted delivery.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WebhookResponse {
    /// Always `true`.
    pub success: bool,
    /// `applied`, `duplicate` or `ignored` (not about presence, the avatar itself, or no
    /// started session bound to the room).
    pub outcome: String,
}

fn refused(e: VerifyError) -> ApiError {
    tracing::warn!(error = %e, "webhook refused");
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "webhook signature invalid or missing",
    )
}

async fn apply(
    state: &AppState,
    provider: RoomProvider,
    tenant: Option<&str>,
    parsed: Option<ParsedEvent>,
) -> Result<Json<WebhookResponse>, ApiError> {
    let answer = |outcome: &str| {
        Ok(Json(WebhookResponse {
            success: true,
            outcome: outcome.to_owned(),
        }))
    };
    let Some(parsed) = parsed else {
        return answer("ignored");
    };
    let avatar = state.webhooks.avatar_identity.as_deref();
    if avatar.is_some_and(|a| parsed.aliases.iter().any(|alias| alias == a)) {
        return answer("ignored");
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
        return answer("duplicate");
    }
    for id in &report.ended {
        tracing::info!(session = %id, "room empty: session ended");
    }
    answer("applied")
}

/// LiveKit webhook receiver.
#[utoipa::path(
    post, path = "/v1/webhooks/livekit", tag = "webhooks",
    request_body(content = String, description = "LiveKit's webhook event (JSON), signed in `Authorization`"),
    params(("Authorization" = String, Header, description = "The JWT LiveKit signs with the API secret")),
    responses(
        (status = 200, description = "Accepted (applied, duplicate or ignored)", body = WebhookResponse),
        (status = 400, description = "Signed, but not a webhook body", body = ErrorBody),
        (status = 401, description = "Missing or bad signature, stale token, or no secret configured", body = ErrorBody),
        (status = 413, description = "Body over the limit", body = ErrorBody),
        (status = 503, description = "Storage unavailable or overloaded", body = ErrorBody),
    )
)]
pub async fn livekit(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<WebhookResponse>, ApiError> {
    let body = body.map_err(crate::api::body_error)?;
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok());
    let cfg = &state.webhooks;
    let tenant = verify_livekit(&cfg.livekit, auth, &body, state.engine.now(), cfg.tolerance)
        .map_err(refused)?;
    let parsed = parse_livekit(&body)?;
    apply(&state, RoomProvider::Livekit, tenant, parsed).await
}

/// Daily webhook receiver.
#[utoipa::path(
    post, path = "/v1/webhooks/daily", tag = "webhooks",
    request_body(content = String, description = "Daily's webhook event (JSON)"),
    params(
        ("X-Webhook-Signature" = String, Header, description = "base64 HMAC-SHA256 of `{timestamp}.{body}`"),
        ("X-Webhook-Timestamp" = String, Header, description = "Unix time of the signature"),
    ),
    responses(
        (status = 200, description = "Accepted (applied, duplicate or ignored)", body = WebhookResponse),
        (status = 400, description = "Signed, but not a webhook body", body = ErrorBody),
        (status = 401, description = "Missing or bad signature, stale timestamp, or no secret configured", body = ErrorBody),
        (status = 413, description = "Body over the limit", body = ErrorBody),
        (status = 503, description = "Storage unavailable or overloaded", body = ErrorBody),
    )
)]
pub async fn daily(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<WebhookResponse>, ApiError> {
    let body = body.map_err(crate::api::body_error)?;
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
    let parsed = parse_daily(&body)?;
    apply(&state, RoomProvider::Daily, tenant, parsed).await
}
