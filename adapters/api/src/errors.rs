//! Error answers: `{"success": false, "error": {"code", "message", "request_id"}}`.
//!
//! Every code the service answers is an [`ErrorCode`], and each code has one HTTP status:
//! the OpenAPI document lists the codes as an enum, so a client (or schemathesis) can check
//! that an answer's code is one the document names.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A stable, machine-readable error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// 401: a missing, unknown or revoked API key, an invalid client token, or a webhook
    /// whose signature is missing, wrong or stale.
    Unauthorized,
    /// 400: the session id is not `sess_` + 1 to 64 Crockford base32 characters.
    InvalidSessionId,
    /// 404: no such session (or another tenant's).
    SessionNotFound,
    /// 400: malformed JSON, an invalid field or query parameter.
    InvalidRequest,
    /// 413: the body is over the limit.
    PayloadTooLarge,
    /// 429: the tenant's plan allows no more concurrent sessions.
    PlanLimitReached,
    /// 503: no GPU has room for the session.
    CapacityExhausted,
    /// 503: the session store is unreachable; retry after `Retry-After`.
    StorageUnavailable,
    /// 409: the session has ended; the call applies only to started sessions.
    SessionEnded,
    /// 503: a resource could not be acquired; the session ended `start_failed`.
    StartFailed,
    /// 503: the service is shutting down.
    ShuttingDown,
    /// 503: this instance is draining and takes no new sessions.
    Draining,
    /// 503: the request took longer than the service allows.
    RequestTimeout,
    /// 503: too many requests in flight.
    Overloaded,
    /// 404: no such route.
    NotFound,
    /// 405: the route does not take this method (`Allow` lists those it takes).
    MethodNotAllowed,
    /// 426: the route takes a WebSocket upgrade.
    UpgradeRequired,
    /// 500: a fault of the service.
    InternalError,
    /// 404: no such webhook delivery (or another tenant's).
    DeliveryNotFound,
    /// 409: a create with this `Idempotency-Key` is still running.
    IdempotencyKeyInUse,
    /// 422: this `Idempotency-Key` was used with another request body.
    IdempotencyKeyReused,
    /// 429: the tenant is over its request rate limit; retry after `Retry-After`.
    RateLimited,
    /// 431: the request's headers are over the limit (count or bytes).
    HeadersTooLarge,
    /// 400: a time range whose `to` is before its `from`, or that is longer than 366 days.
    InvalidRange,
}

impl ErrorCode {
    /// Every code, in declaration order.
    pub const ALL: [ErrorCode; 24] = [
        ErrorCode::Unauthorized,
        ErrorCode::InvalidSessionId,
        ErrorCode::SessionNotFound,
        ErrorCode::InvalidRequest,
        ErrorCode::PayloadTooLarge,
        ErrorCode::PlanLimitReached,
        ErrorCode::CapacityExhausted,
        ErrorCode::StorageUnavailable,
        ErrorCode::SessionEnded,
        ErrorCode::StartFailed,
        ErrorCode::ShuttingDown,
        ErrorCode::Draining,
        ErrorCode::RequestTimeout,
        ErrorCode::Overloaded,
        ErrorCode::NotFound,
        ErrorCode::MethodNotAllowed,
        ErrorCode::UpgradeRequired,
        ErrorCode::InternalError,
        ErrorCode::DeliveryNotFound,
        ErrorCode::IdempotencyKeyInUse,
        ErrorCode::IdempotencyKeyReused,
        ErrorCode::RateLimited,
        ErrorCode::HeadersTooLarge,
        ErrorCode::InvalidRange,
    ];

    /// The code named `name` as error bodies spell it (`session_not_found`), if any.
    pub fn from_name(name: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.as_str() == name)
    }

    /// The code as it appears in error bodies.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::InvalidSessionId => "invalid_session_id",
            ErrorCode::SessionNotFound => "session_not_found",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::PlanLimitReached => "plan_limit_reached",
            ErrorCode::CapacityExhausted => "capacity_exhausted",
            ErrorCode::StorageUnavailable => "storage_unavailable",
            ErrorCode::SessionEnded => "session_ended",
            ErrorCode::StartFailed => "start_failed",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Draining => "draining",
            ErrorCode::RequestTimeout => "request_timeout",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::UpgradeRequired => "upgrade_required",
            ErrorCode::InternalError => "internal_error",
            ErrorCode::DeliveryNotFound => "delivery_not_found",
            ErrorCode::IdempotencyKeyInUse => "idempotency_key_in_use",
            ErrorCode::IdempotencyKeyReused => "idempotency_key_reused",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::HeadersTooLarge => "headers_too_large",
            ErrorCode::InvalidRange => "invalid_range",
        }
    }

    /// The HTTP status every answer with this code has.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::InvalidSessionId | ErrorCode::InvalidRequest | ErrorCode::InvalidRange => {
                400
            }
            ErrorCode::Unauthorized => 401,
            ErrorCode::SessionNotFound | ErrorCode::NotFound | ErrorCode::DeliveryNotFound => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::SessionEnded | ErrorCode::IdempotencyKeyInUse => 409,
            ErrorCode::IdempotencyKeyReused => 422,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::UpgradeRequired => 426,
            ErrorCode::HeadersTooLarge => 431,
            ErrorCode::PlanLimitReached | ErrorCode::RateLimited => 429,
            ErrorCode::InternalError => 500,
            ErrorCode::CapacityExhausted
            | ErrorCode::StorageUnavailable
            | ErrorCode::StartFailed
            | ErrorCode::ShuttingDown
            | ErrorCode::Draining
            | ErrorCode::RequestTimeout
            | ErrorCode::Overloaded => 503,
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error body.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// Always `false`.
    pub success: bool,
    /// What went wrong.
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// A stable machine-readable code.
    pub code: ErrorCode,
    /// A human-readable explanation.
    pub message: String,
    /// The request's id, as in the answer's `x-request-id` header.
    #[schema(
        pattern = "^[ -~]{1,128}$",
        example = "3f6c1b2a9d8e4f7a0b1c2d3e4f5a6b7c"
    )]
    pub request_id: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_serialize_as_their_names_and_read_back() {
        for code in ErrorCode::ALL {
            assert_eq!(
                serde_json::to_value(code).unwrap(),
                serde_json::Value::from(code.as_str())
            );
            assert_eq!(ErrorCode::from_name(code.as_str()), Some(code));
            assert!((400..600).contains(&code.http_status()));
        }
        assert_eq!(ErrorCode::from_name("teapot"), None);
    }
}
