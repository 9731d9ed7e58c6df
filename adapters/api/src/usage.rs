//! Usage as `GET /v1/usage` answers it: a range's billable time, in total and by group.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A range's billable time: the sum over the caller's sessions of their billable intervals
/// inside the range (each cut at the range's edges), from the usage records the store
/// wrote with their causes. A running session counts up to its last closed usage period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct UsageResponse {
    /// Always `true`.
    pub success: bool,
    /// The tenant whose usage this is; `null` for an operator key (every tenant).
    pub tenant: Option<String>,
    /// Where the range starts (included), as asked.
    pub from: String,
    /// Where the range ends (excluded), as asked.
    pub to: String,
    /// How `groups` is grouped (`day`, `hour` or `session`); `null`: no groups.
    pub group_by: Option<String>,
    /// Billable milliseconds inside the range.
    pub billable_ms: u64,
    /// The groups with billable time, in order (by time, or by session id). By day or
    /// hour they add up to the total; by session they are one page (`limit`, `cursor`),
    /// and the pages together add up to it.
    pub groups: Vec<UsageGroupView>,
    /// By session: pass as `cursor` for the next page of groups; `null` on the last page
    /// (and for the other groupings, which answer every group at once).
    #[serde(default)]
    #[schema(pattern = "^sess_[0-9A-HJKMNP-TV-Z]{1,64}$")]
    pub next_cursor: Option<String>,
}

/// One group of a usage answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct UsageGroupView {
    /// The UTC day or hour the group is (`group_by` `day` or `hour`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$")]
    pub start: Option<String>,
    /// The session the group is (`group_by` `session`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// The session's tenant (`group_by` `session`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Billable milliseconds of the group inside the range.
    pub billable_ms: u64,
}
