//! Error answers: `{"success": false, "error": {"code", "message", "request_id"}}`.
//!
//! Every code the service answers is an [`ErrorCode`], and each code has one HTTP status:
//! the OpenAPI document lists the codes as an enum, so a client (or schemathesis) can check
//! that an answer's code is one the document names.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use session_lifecycle_runtime::EngineError;

pub use session_lifecycle_api::errors::{ErrorBody, ErrorCode, ErrorDetail};

use crate::request_id::RequestId;

/// An error answer. Its status follows from its code ([`status_of`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    code: ErrorCode,
    message: String,
    retry_after: Option<u64>,
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
        status_of(self.code)
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

/// The HTTP status of every answer with `code`.
pub fn status_of(code: ErrorCode) -> StatusCode {
    StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
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
        let mut response = (status_of(self.code), Json(body)).into_response();
        let headers = response.headers_mut();
        if let Some(secs) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.code == ErrorCode::PayloadTooLarge {
            // The rest of the body is not read: the connection cannot carry another request,
            // and a client that reused it would see it cut.
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
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
            e @ (EngineError::InvalidConfig(_) | EngineError::InvalidUsagePeriod { .. }) => {
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
