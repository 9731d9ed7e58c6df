//! Why a call failed, and whether trying again may help.

use std::time::Duration;

use session_lifecycle_api::errors::ErrorCode;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API answered with an error body.
    #[error("{code} (HTTP {status}): {message} [request {request_id}]")]
    Api {
        /// The HTTP status (the code's own, see [`ErrorCode::http_status`]).
        status: u16,
        /// The error code.
        code: ErrorCode,
        /// What went wrong, for people.
        message: String,
        /// The request's id, as the service logged it.
        request_id: String,
        /// How long the service asks to wait before a retry, if it says.
        retry_after: Option<Duration>,
    },
    /// An answer that is neither the route's success body nor an API error (another
    /// server, a proxy's page, a code this client does not know).
    #[error("unexpected answer (HTTP {status}): {body}")]
    UnexpectedAnswer {
        /// The HTTP status.
        status: u16,
        /// The start of the body.
        body: String,
    },
    /// The request could not be sent or its answer not read (connection, TLS, timeout).
    #[error("request failed: {0}")]
    Transport(#[from] reqwest::Error),
    /// The base URL is not an `http` or `https` URL.
    #[error("invalid base URL {0:?}: an http or https URL")]
    InvalidBaseUrl(String),
    /// The API key cannot be sent as a header (a control character, a non-ASCII one).
    #[error("invalid API key: printable ASCII only")]
    InvalidApiKey,
    /// A path argument that no route could take (empty, `.` or `..`): nothing was sent.
    #[error("invalid {what}: {value:?}")]
    InvalidArgument {
        /// What it is (`session id`).
        what: &'static str,
        /// What was given.
        value: String,
    },
    /// The event stream broke its format.
    #[error("invalid event stream: {0}")]
    InvalidStream(String),
}

impl Error {
    /// The API's error code, if the API answered one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Api { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// How long the service asked to wait before retrying, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::Api { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// Whether the same call may succeed later: the service was unavailable, overloaded,
    /// draining, out of capacity or rate limiting, or the connection failed. A create is
    /// safe to repeat only with an idempotency key (`Client::create_session_idempotent`).
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Api { code, .. } => matches!(
                code,
                ErrorCode::StorageUnavailable
                    | ErrorCode::CapacityExhausted
                    | ErrorCode::Overloaded
                    | ErrorCode::RequestTimeout
                    | ErrorCode::Draining
                    | ErrorCode::ShuttingDown
                    | ErrorCode::RateLimited
                    | ErrorCode::IdempotencyKeyInUse
            ),
            Error::Transport(e) => e.is_connect() || e.is_timeout(),
            _ => false,
        }
    }
}
