//! What a node says of itself, for the people who run the cluster: written to the store
//! with its heartbeat (`NodeMembership::report_node`)
//! and read back by every instance's live page.

use serde::{Deserialize, Serialize};

/// One node's state as it last reported it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReport {
    /// It takes no new sessions (a deploy is replacing it); its running ones continue.
    pub draining: bool,
    /// Why it cannot take a session of the default size now (no GPU has room, ...), if it
    /// cannot.
    pub full: Option<String>,
    /// Started sessions it runs.
    pub sessions: u64,
    /// The most sessions it runs at once (`--max-node-sessions`); `None`: no limit.
    #[serde(default)]
    pub slots: Option<u64>,
    /// It stopped on purpose (its last report before a shutdown or a handover): its
    /// heartbeat is not missed while it runs no session.
    #[serde(default)]
    pub stopped: bool,
    /// Its devices (GPUs), as its resource backends see them.
    pub devices: Vec<DeviceReport>,
}

/// One device's memory, as the backend that places sessions on it sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceReport {
    /// Its index on the node (NVML's).
    pub index: u32,
    /// Its product name.
    pub name: String,
    /// Device memory, bytes.
    pub total: u64,
    /// Free device memory, bytes.
    pub free: u64,
    /// Memory the processes of started sessions hold, bytes.
    pub used_by_sessions: u64,
    /// Memory promised to started sessions (what placement counts), bytes.
    pub promised: u64,
    /// Memory held by processes of sessions that hold no share of this device (their share
    /// was released, or placed on another device): memory that did not come back, bytes.
    pub not_returned: u64,
}

impl NodeReport {
    /// The report as the store keeps it.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// A report the store kept; `None` if it is not one.
    pub fn from_json(text: &str) -> Option<NodeReport> {
        serde_json::from_str(text).ok()
    }
}
