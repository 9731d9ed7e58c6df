//! What the live page (`/ui`) shows: one snapshot of the cluster, as `GET /v1/overview`
//! answers it. An operator key sees every tenant and the nodes; a tenant key sees its own
//! sessions only.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::views::{EndReasonView, ResourceView, SessionView};

/// A snapshot of the cluster, and where the event stream stood when it was taken.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct OverviewResponse {
    /// Always `true`.
    pub success: bool,
    /// When the snapshot was taken (the answering instance's clock).
    #[schema(pattern = "^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$")]
    pub generated_at: String,
    /// The tenant whose sessions these are; `null` for an operator key (every tenant).
    pub tenant: Option<String>,
    /// The last event id when the snapshot was taken: follow `GET /v1/events?after=` it
    /// to hear of every change since.
    pub last_event_id: u64,
    /// Started sessions, newest first.
    pub sessions: Vec<PlacedSessionView>,
    /// Whether more started sessions exist than `sessions` lists.
    pub sessions_truncated: bool,
    /// Sessions that ended in the last hour, and older ones whose releases are still
    /// owed; the latest end first.
    pub recent_ends: Vec<PlacedSessionView>,
    /// Whether more ended sessions exist than `recent_ends` lists: those owing releases
    /// are always listed, recent ends are cut (the chart counts them all).
    pub ends_truncated: bool,
    /// Every end over the last hour by reason, in twelve 5-minute buckets, oldest first
    /// (the last one ends at `generated_at`).
    pub ends_by_reason: Vec<EndsBucket>,
    /// Resources of ended sessions not released yet: pending, or failing (with the
    /// error of their last attempt).
    pub releases: Vec<OwedRelease>,
    /// The nodes heard from in the last hour (operator key only; `null` for a tenant key).
    pub nodes: Option<Vec<NodeView>>,
}

/// A session with its tenant and the node that runs it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PlacedSessionView {
    /// The tenant that owns it.
    pub tenant: String,
    /// The node that runs it and holds its resources.
    pub node: String,
    /// The session, with its resources and their release states.
    pub session: SessionView,
}

/// The ends of one 5-minute bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct EndsBucket {
    /// Where the bucket starts.
    #[schema(pattern = "^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$")]
    pub start: String,
    /// Ends in it, by reason, in the order of the reasons' names (reasons without any are
    /// left out).
    pub ends: Vec<ReasonCount>,
}

/// How many sessions ended for one reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ReasonCount {
    /// The reason.
    pub reason: EndReasonView,
    /// How many.
    pub count: u64,
}

/// A resource an ended session still owes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct OwedRelease {
    /// The session.
    pub session_id: String,
    /// Its tenant.
    pub tenant: String,
    /// The node that holds the resource (and alone can release it).
    pub node: String,
    /// Whether its last attempt failed (`release_error` says why).
    pub failing: bool,
    /// The resource and its release state.
    pub resource: ResourceView,
}

/// A node as it last reported itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NodeView {
    /// Its id.
    pub node: String,
    /// Whether its heartbeat is within the node timeout.
    pub alive: bool,
    /// It stopped on purpose (a shutdown or a handover) and has not started again.
    pub stopped: bool,
    /// It takes no new sessions (a deploy is replacing it); running ones continue.
    pub draining: bool,
    /// Why it cannot take a session of the default size now, if it cannot.
    pub full: Option<String>,
    /// Started sessions it runs.
    pub sessions: u64,
    /// The most sessions it runs at once (`--max-node-sessions`); `null`: no limit.
    pub slots: Option<u64>,
    /// Its GPUs.
    pub gpus: Vec<GpuView>,
}

/// One GPU's memory, in bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct GpuView {
    /// Its index on the node.
    pub index: u32,
    /// Its product name.
    pub name: String,
    /// Device memory.
    pub total_bytes: u64,
    /// Free now.
    pub free_bytes: u64,
    /// Held by started sessions' processes.
    pub used_by_sessions_bytes: u64,
    /// Promised to started sessions.
    pub promised_bytes: u64,
    /// Held by processes of sessions that no longer hold a share: memory that did not come
    /// back after their end.
    pub not_returned_bytes: u64,
}
