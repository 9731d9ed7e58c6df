//! Extractors: what every handler of a session route checks first, in this order.
//!
//! 1. [`Authenticated`]: the tenant whose key `x-api-key` carries (401 `unauthorized`
//!    alike for a missing, unknown or revoked key);
//! 2. [`SessionPath`]: the session id of the path (400 `invalid_session_id`).
//!
//! A handler takes them in that order, so a bad key is a 401 whatever the id. They need
//! only a [`TenantDirectory`] from the state, not the state itself.

use std::sync::Arc;

use axum::extract::{FromRequestParts, Path};
use axum::http::HeaderMap;
use axum::http::request::Parts;
use session_lifecycle::SessionId;
use utoipa::IntoParams;

use crate::error::{ApiError, ErrorCode};
use crate::input::session_id;
use crate::tenants::{Tenant, Tenants};

/// The header carrying the API key.
pub const API_KEY_HEADER: &str = "x-api-key";

/// Where the extractors find the tenants.
pub trait TenantDirectory {
    /// Every tenant the service knows.
    fn tenants(&self) -> &Tenants;
}

impl<T: TenantDirectory> TenantDirectory for Arc<T> {
    fn tenants(&self) -> &Tenants {
        T::tenants(self)
    }
}

/// The tenant whose API key `headers` carry, within its request rate limit (429
/// `rate_limited` with `Retry-After` beyond).
pub fn api_key_tenant(tenants: &Tenants, headers: &HeaderMap) -> Result<Arc<Tenant>, ApiError> {
    let key = headers.get(API_KEY_HEADER).and_then(|v| v.to_str().ok());
    let tenant = tenants
        .authenticate(key)
        .cloned()
        .ok_or_else(ApiError::unauthorized)?;
    tenants.admit(&tenant).map_err(|wait| {
        ApiError::new(
            ErrorCode::RateLimited,
            "over this tenant's request rate limit; retry after Retry-After",
        )
        .retry_after((wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1))
    })?;
    Ok(tenant)
}

/// Who reads the live page and the overview: an operator key sees every tenant, a tenant
/// key its own sessions.
#[derive(Debug, Clone)]
pub enum Viewer {
    /// An operator key (the tenants file's `operator_keys_sha256`, or `--operator-key`).
    Operator,
    /// A tenant's API key.
    Tenant(Arc<Tenant>),
}

impl Viewer {
    /// The tenant whose sessions this viewer sees; `None`: every tenant's.
    pub fn tenant(&self) -> Option<&str> {
        match self {
            Viewer::Operator => None,
            Viewer::Tenant(t) => Some(&t.name),
        }
    }
}

/// The viewer whose key `headers` carry: an operator key first, else a tenant's (with
/// its rate limit, as [`api_key_tenant`]).
pub fn viewer(tenants: &Tenants, headers: &HeaderMap) -> Result<Viewer, ApiError> {
    let key = headers.get(API_KEY_HEADER).and_then(|v| v.to_str().ok());
    if tenants.is_operator(key) {
        return Ok(Viewer::Operator);
    }
    api_key_tenant(tenants, headers).map(Viewer::Tenant)
}

impl<S: TenantDirectory + Send + Sync> FromRequestParts<S> for Viewer {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        viewer(state.tenants(), &parts.headers)
    }
}

/// The authenticated tenant of a request, from its `x-api-key` header.
#[derive(Debug, Clone)]
pub struct Authenticated(pub Arc<Tenant>);

impl<S: TenantDirectory + Send + Sync> FromRequestParts<S> for Authenticated {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        api_key_tenant(state.tenants(), &parts.headers).map(Authenticated)
    }
}

/// The session id of a `/v1/sessions/{session_id}/...` path, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, IntoParams)]
#[into_params(names("session_id"), parameter_in = Path)]
pub struct SessionPath(
    /// The session id: `sess_` + 1 to 64 Crockford base32 characters (digits and upper-case
    /// letters without I, L, O, U).
    #[param(
        value_type = String,
        pattern = "^sess_[0-9A-HJKMNP-TV-Z]{1,64}$",
        example = "sess_01HM6AQH20ZZHCK79E5QFWVW30"
    )]
    pub SessionId,
);

impl<S: Send + Sync> FromRequestParts<S> for SessionPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| {
                ApiError::new(
                    ErrorCode::InvalidSessionId,
                    format!("invalid session id: {}", e.body_text()),
                )
            })?;
        session_id(&raw).map(SessionPath)
    }
}
