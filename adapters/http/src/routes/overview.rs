//! The live page (`/ui`: a page and its script and style, embedded in the binary) and the
//! snapshot it shows (`GET /v1/overview`); the page follows `/v1/events` to stay current.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use session_lifecycle::{Status, Timestamp};
use session_lifecycle_runtime::{EndCount, ListQuery, NodeRow, SessionRecord};

use crate::error::{ApiError, ErrorBody};
use crate::extract::Viewer;
use crate::routes::sessions::view;
use crate::state::AppState;
use crate::views::{EndReasonView, ReleaseView};
use session_lifecycle_api::overview::{
    EndsBucket, GpuView, NodeView, OverviewResponse, OwedRelease, PlacedSessionView, ReasonCount,
};

/// Nodes heard from within this long are listed (and their `sessiond_node_alive`
/// exposed).
pub const NODE_WINDOW: Duration = Duration::from_secs(3600);
/// How far back recent ends go.
const ENDS_WINDOW: Duration = Duration::from_secs(3600);
/// The chart's buckets.
const BUCKET: Duration = Duration::from_secs(300);
const BUCKETS: u64 = 12;
/// Started sessions listed at most.
const MAX_SESSIONS: u32 = 500;
/// Ended sessions read at most.
const MAX_ENDS: u32 = 2000;

/// A snapshot of what runs: started sessions, recent ends and a chart of them by reason,
/// releases owed, and (for an operator key) the nodes with their GPUs.
#[utoipa::path(
    get, path = "/v1/overview", tag = "operations",
    responses(
        (status = 200, description = "The snapshot", body = OverviewResponse),
        (status = 401, description = "Missing, unknown or revoked key (`unauthorized`)", body = ErrorBody),
        (status = 503, description = "Storage unavailable or overloaded", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn get_overview(
    State(state): State<Arc<AppState>>,
    viewer: Viewer,
) -> Result<Json<OverviewResponse>, ApiError> {
    let store = state.engine.store();
    let unavailable = |e| ApiError::from(session_lifecycle_runtime::EngineError::Store(e));
    let tenant = viewer.tenant().map(str::to_owned);
    // Read first: every change after it comes as an event after this id.
    let last_event_id = store.last_position().await.map_err(unavailable)?;
    let now = state.engine.now();
    let mut started = state
        .engine
        .list(ListQuery {
            tenant: tenant.clone(),
            status: Some(Status::Started),
            limit: MAX_SESSIONS + 1,
            before: None,
            node: None,
        })
        .await?;
    let sessions_truncated = started.len() > MAX_SESSIONS as usize;
    started.truncate(MAX_SESSIONS as usize);
    let mut ended = store
        .ended_since(
            tenant.clone(),
            now.saturating_sub(ENDS_WINDOW),
            MAX_ENDS + 1,
        )
        .await
        .map_err(unavailable)?;
    let ends_truncated = ended.len() > MAX_ENDS as usize;
    let counts = store
        .count_ends(tenant.clone(), chart_start(now), now, BUCKET)
        .await
        .map_err(unavailable)?;
    ended.truncate(MAX_ENDS as usize);
    // The store lists those owing releases first; the page shows the latest end first.
    ended.sort_by_key(|r| std::cmp::Reverse((r.session.ended_at(), *r.session.id())));
    let nodes = match viewer {
        Viewer::Operator => Some(
            state
                .engine
                .cluster_nodes(NODE_WINDOW)
                .await
                .map_err(unavailable)?
                .iter()
                .map(node_view)
                .collect(),
        ),
        Viewer::Tenant(_) => None,
    };
    let placed = |r: &SessionRecord| PlacedSessionView {
        tenant: r.tenant.clone(),
        node: r.node.clone(),
        session: view(&state, r),
    };
    let recent_ends: Vec<PlacedSessionView> = ended.iter().map(placed).collect();
    Ok(Json(OverviewResponse {
        success: true,
        generated_at: now.to_string(),
        tenant,
        last_event_id,
        sessions: started.iter().map(placed).collect(),
        sessions_truncated,
        ends_by_reason: ends_by_reason(&counts, chart_start(now)),
        releases: owed_releases(&recent_ends),
        recent_ends,
        ends_truncated,
        nodes,
    }))
}

/// The chart's first bucket starts here: an hour before `now`, so that the last one ends
/// at `now`.
fn chart_start(now: Timestamp) -> Timestamp {
    now.saturating_sub(BUCKET * BUCKETS as u32)
}

/// Ends of the last hour by reason, in 5-minute buckets from `first_start` (see
/// [`chart_start`]), from the store's counts: every end, however many. An end at `now`
/// itself falls in the last bucket.
fn ends_by_reason(counts: &[EndCount], first_start: Timestamp) -> Vec<EndsBucket> {
    let mut buckets: Vec<EndsBucket> = (0..BUCKETS)
        .map(|b| EndsBucket {
            start: first_start.saturating_add(BUCKET * b as u32).to_string(),
            ends: Vec::new(),
        })
        .collect();
    for c in counts {
        let b =
            usize::try_from(c.bucket).map_or(BUCKETS as usize - 1, |b| b.min(BUCKETS as usize - 1));
        let reason = EndReasonView::from(c.reason);
        match buckets[b].ends.iter_mut().find(|r| r.reason == reason) {
            Some(r) => r.count += c.count,
            None => buckets[b].ends.push(ReasonCount {
                reason,
                count: c.count,
            }),
        }
    }
    buckets
}

/// Every resource of an ended session not released yet.
fn owed_releases(ended: &[PlacedSessionView]) -> Vec<OwedRelease> {
    ended
        .iter()
        .flat_map(|p| {
            p.session
                .resources
                .iter()
                .flatten()
                .filter(|r| r.release != ReleaseView::Released)
                .map(|r| OwedRelease {
                    session_id: p.session.session_id.clone(),
                    tenant: p.tenant.clone(),
                    node: p.node.clone(),
                    failing: r.release_error.is_some(),
                    resource: r.clone(),
                })
        })
        .collect()
}

/// A node row as the page shows it; a report it cannot read shows as none.
fn node_view(row: &NodeRow) -> NodeView {
    let report = row.last_report().unwrap_or_default();
    NodeView {
        node: row.node.clone(),
        alive: row.alive,
        stopped: report.stopped,
        draining: report.draining,
        full: report.full,
        sessions: report.sessions,
        slots: report.slots,
        gpus: report
            .devices
            .into_iter()
            .map(|d| GpuView {
                index: d.index,
                name: d.name,
                total_bytes: d.total,
                free_bytes: d.free,
                used_by_sessions_bytes: d.used_by_sessions,
                promised_bytes: d.promised,
                not_returned_bytes: d.not_returned,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use session_lifecycle::EndReason;

    #[test]
    fn the_chart_counts_the_last_hour_by_reason() {
        let now = Timestamp::from_millis(10_000_000);
        let count = |bucket, reason, count| EndCount {
            bucket,
            reason,
            count,
        };
        let counts = [
            count(0, EndReason::Orphaned, 1),
            count(11, EndReason::Expired, 1),
            count(11, EndReason::Requested, 1),
            // At `now` itself: the last bucket's.
            count(12, EndReason::Requested, 1),
        ];
        let chart = ends_by_reason(&counts, chart_start(now));
        assert_eq!(chart.len(), 12);
        assert_eq!(chart[0].start, now.saturating_sub(ENDS_WINDOW).to_string());
        assert_eq!(
            chart[11].start,
            now.saturating_sub(Duration::from_secs(300)).to_string()
        );
        let count =
            |b: &EndsBucket, r| b.ends.iter().find(|c| c.reason == r).map_or(0, |c| c.count);
        assert_eq!(count(&chart[11], EndReasonView::Requested), 2);
        assert_eq!(count(&chart[11], EndReasonView::Expired), 1);
        assert_eq!(count(&chart[0], EndReasonView::Orphaned), 1);
        let total: u64 = chart.iter().flat_map(|b| &b.ends).map(|c| c.count).sum();
        assert_eq!(total, 4);
    }
}
