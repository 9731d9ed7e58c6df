//! Error answers: `{"success": false, "error": {"code", "message", "request_id"}}`.
//!
//! Every code the service answers is an [`ErrorCode`], and each code has one HTTP status:
//! the OpenAPI document lists the codes as an enum, so a client (or schemathesis) can check
//! that an answer's code is one the document names.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use session_lifecycle_runtime::EngineError;
use utoipa::ToSchema;

use crate::request_id::RequestId;

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
}

impl ErrorCode {
    /// Every code, in declaration order.
    pub const ALL: [ErrorCode; 22] = [
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
    ];

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
        }
    }

    /// The HTTP status every answer with this code has.
    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::InvalidSessionId | ErrorCode::InvalidRequest => StatusCode::BAD_REQUEST,
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::SessionNotFound | ErrorCode::NotFound | ErrorCode::DeliveryNotFound => {
                StatusCode::NOT_FOUND
            }
            ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::SessionEnded | ErrorCode::IdempotencyKeyInUse => StatusCode::CONFLICT,
            ErrorCode::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::UpgradeRequired => StatusCode::UPGRADE_REQUIRED,
            ErrorCode::PlanLimitReached | ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::InternalError => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::CapacityExhausted
            | ErrorCode::StorageUnavailable
            | ErrorCode::StartFailed
            | ErrorCode::ShuttingDown
            | ErrorCode::Draining
            | ErrorCode::RequestTimeout
            | ErrorCode::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error answer. Its status follows from its code ([`ErrorCode::status`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    code: ErrorCode,
    message: String,
    retry_after: Option<u64>,
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

impl ApiError {
    /// An error with `code` (and the status it has) and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// The same error, telling the client to retry after `secs` seconds.
    pub fn retry_after(mut self, secs: u64) -> ApiError {
        self.retry_after = Some(secs);
        self
    }

    /// 401 `unauthorized`, the same for a missing, unknown or revoked key.
    pub fn unauthorized() -> ApiError {
        ApiError::new(ErrorCode::Unauthorized, "missing or invalid API key")
    }

    /// 400 `invalid_request`.
    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::InvalidRequest, message)
    }

    /// 500 `internal_error`; the cause goes to the log, not to the client.
    pub fn internal(cause: &dyn std::fmt::Display) -> ApiError {
        tracing::error!(error = %cause, "internal error");
        ApiError::new(ErrorCode::InternalError, "internal error")
    }

    /// Its code.
    pub fn code(&self) -> ErrorCode {
        self.code
    }

    /// Its HTTP status.
    pub fn status(&self) -> StatusCode {
        self.code.status()
    }

    /// Its message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Seconds the client is told to wait before retrying, if any.
    pub fn retry_after_secs(&self) -> Option<u64> {
        self.retry_after
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            success: false,
            error: ErrorDetail {
                code: self.code,
                message: self.message,
                request_id: RequestId::current().as_str().to_owned(),
            },
        };
        let mut response = (self.code.status(), Json(body)).into_response();
        let headers = response.headers_mut();
        if let Some(secs) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.code == ErrorCode::UpgradeRequired {
            // RFC 9110 15.5.22: a 426 names the protocol to upgrade to.
            headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        response
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> ApiError {
        match e {
            EngineError::NotFound => ApiError::new(ErrorCode::SessionNotFound, "session not found"),
            EngineError::SessionEnded => {
                ApiError::new(ErrorCode::SessionEnded, "the session has ended")
            }
            EngineError::PlanLimit(n) => ApiError::new(
                ErrorCode::PlanLimitReached,
                format!("your plan allows {n} concurrent sessions"),
            ),
            EngineError::CapacityExhausted(m) => {
                ApiError::new(ErrorCode::CapacityExhausted, m).retry_after(5)
            }
            EngineError::StartFailed(m) => ApiError::new(ErrorCode::StartFailed, m),
            e @ EngineError::TimeoutOverPlan { .. } => ApiError::invalid(e.to_string()),
            EngineError::InvalidConfig(e) => {
                // Not reachable once the engine opened (its settings were checked then).
                tracing::error!(error = %e, "invalid engine settings");
                ApiError::new(ErrorCode::InternalError, "the service is misconfigured")
            }
            EngineError::Store(e) => {
                tracing::warn!(error = %e, "store failed");
                ApiError::new(
                    ErrorCode::StorageUnavailable,
                    "session storage is unavailable",
                )
                .retry_after(1)
            }
            EngineError::Draining => ApiError::new(
                ErrorCode::Draining,
                "this instance is draining and takes no new sessions; retry (another instance takes it)",
            )
            .retry_after(1),
            EngineError::ShuttingDown => {
                ApiError::new(ErrorCode::ShuttingDown, "the service is shutting down")
                    .retry_after(5)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_serialize_as_their_names() {
        for code in ErrorCode::ALL {
            assert_eq!(
                serde_json::to_value(code).unwrap(),
                serde_json::Value::from(code.as_str())
            );
            assert!(code.status().is_client_error() || code.status().is_server_error());
        }
    }

    #[tokio::test]
    async fn an_error_body_names_its_request() {
        let id = RequestId::accept(b"req-7").unwrap();
        let response = id
            .scope(async {
                ApiError::new(ErrorCode::StorageUnavailable, "down")
                    .retry_after(1)
                    .into_response()
            })
            .await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"success": false, "error": {
                "code": "storage_unavailable", "message": "down", "request_id": "req-7"}})
        );
    }
}
