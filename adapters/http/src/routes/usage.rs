//! Usage (`GET /v1/usage`): a range's billable time, from the usage records the store
//! wrote with their causes (see `session_lifecycle_store::usage`).

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use serde::Deserialize;
use session_lifecycle::{SessionId, Timestamp};
use session_lifecycle_api::errors::ErrorCode;
use session_lifecycle_api::usage::{UsageGroupView, UsageResponse};
use session_lifecycle_runtime::usage::{SessionPage, UsageGroup, UsageGrouping};
use utoipa::IntoParams;

use crate::error::{ApiError, ErrorBody};
use crate::extract::Viewer;
use crate::state::AppState;

/// The longest range one call may ask for.
pub const MAX_RANGE_DAYS: u64 = 366;

/// The most session groups one answer holds (and how many it holds unless `limit` says).
pub const MAX_SESSION_GROUPS: u32 = 10_000;

/// Which usage to total.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UsageParams {
    /// Where the range starts (included), RFC 3339 (`2026-12-01T00:00:00Z`; a fraction
    /// counts to the millisecond).
    #[param(value_type = String)]
    pub from: Option<String>,
    /// Where it ends (excluded), RFC 3339; not before `from`, at most 366 days after.
    #[param(value_type = String)]
    pub to: Option<String>,
    /// Groups to answer besides the total: `day` or `hour` (UTC), or `session`.
    #[param(value_type = Option<String>, pattern = "^(day|hour|session)$")]
    pub group_by: Option<String>,
    /// With `group_by=session`: session groups per answer, 1 to 10,000 (default 10,000).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 10000)]
    pub limit: Option<String>,
    /// With `group_by=session`: the `next_cursor` of the previous answer.
    #[param(pattern = "^sess_[0-9A-HJKMNP-TV-Z]{1,64}$")]
    pub cursor: Option<String>,
}

/// The page of session groups `limit` and `cursor` ask for; they apply to `group_by=session`
/// only.
fn session_page(
    params: &UsageParams,
    grouping: Option<UsageGrouping>,
) -> Result<SessionPage, ApiError> {
    if grouping != Some(UsageGrouping::Session) {
        if params.limit.is_some() || params.cursor.is_some() {
            return Err(ApiError::invalid(
                "limit and cursor apply to group_by=session only",
            ));
        }
        return Ok(SessionPage::ALL);
    }
    let limit = crate::input::page_limit(
        params.limit.as_deref(),
        MAX_SESSION_GROUPS,
        MAX_SESSION_GROUPS,
    )?;
    let after = match params.cursor.as_deref() {
        None => None,
        Some(c) => Some(SessionId::parse(c).map_err(|_| ApiError::invalid("invalid cursor"))?),
    };
    Ok(SessionPage { after, limit })
}

fn time(name: &str, text: Option<&str>) -> Result<Timestamp, ApiError> {
    let text = text.ok_or_else(|| ApiError::invalid(format!("{name} is required")))?;
    Timestamp::parse_rfc3339(text)
        .map_err(|_| ApiError::invalid(format!("{name} must be an RFC 3339 time")))
}

/// The caller's billable time inside a range (each session's billable interval cut at the
/// range's edges), in total and by day, hour or session. A tenant key sees its own
/// sessions; an operator key every tenant's. A running session counts up to its last
/// closed usage period.
#[utoipa::path(
    get, path = "/v1/usage", tag = "usage",
    params(UsageParams),
    responses(
        (status = 200, description = "The range's usage", body = UsageResponse),
        (status = 400, description = "Missing or invalid `from`, `to`, `group_by`, `limit` or `cursor`, or `limit`/`cursor` without `group_by=session` (`invalid_request`); `to` before `from`, or a range over 366 days (`invalid_range`)", body = ErrorBody),
        (status = 401, description = "Missing, unknown or revoked key (`unauthorized`)", body = ErrorBody),
        (status = 503, description = "Storage unavailable or overloaded", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn get_usage(
    State(state): State<Arc<AppState>>,
    viewer: Viewer,
    params: Result<Query<UsageParams>, QueryRejection>,
) -> Result<Json<UsageResponse>, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::invalid(e.body_text()))?;
    let from = time("from", params.from.as_deref())?;
    let to = time("to", params.to.as_deref())?;
    if to < from {
        return Err(ApiError::new(
            ErrorCode::InvalidRange,
            "to must not be before from",
        ));
    }
    if to.as_millis() - from.as_millis() > MAX_RANGE_DAYS * 86_400_000 {
        return Err(ApiError::new(
            ErrorCode::InvalidRange,
            format!("a range is at most {MAX_RANGE_DAYS} days"),
        ));
    }
    let grouping = match params.group_by.as_deref() {
        None => None,
        Some(name) => Some(
            UsageGrouping::from_name(name)
                .ok_or_else(|| ApiError::invalid("group_by must be day, hour or session"))?,
        ),
    };
    let page = session_page(&params, grouping)?;
    let tenant = viewer.tenant().map(str::to_owned);
    let sums = state
        .engine
        .store()
        .usage_totals(tenant.clone(), from, to, grouping, page)
        .await
        .map_err(|e| ApiError::from(session_lifecycle_runtime::EngineError::Store(e)))?;
    let groups = sums
        .groups
        .into_iter()
        .map(|(group, billable_ms)| match group {
            UsageGroup::Time(start) => UsageGroupView {
                start: Some(start.to_string()),
                session_id: None,
                tenant: None,
                billable_ms,
            },
            UsageGroup::Session(id, tenant) => UsageGroupView {
                start: None,
                session_id: Some(id.to_string()),
                tenant: Some(tenant),
                billable_ms,
            },
        })
        .collect::<Vec<_>>();
    let next_cursor = match groups.last() {
        Some(last) if groups.len() == page.limit as usize => last.session_id.clone(),
        _ => None,
    };
    Ok(Json(UsageResponse {
        success: true,
        tenant,
        from: params.from.unwrap_or_default(),
        to: params.to.unwrap_or_default(),
        group_by: grouping.map(|g| g.as_str().to_owned()),
        billable_ms: sums.total_ms,
        groups,
        next_cursor,
    }))
}
