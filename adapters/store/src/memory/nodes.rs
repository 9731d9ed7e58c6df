//! Node membership in the reference store: heartbeats, reports, takeover.

use std::time::Duration;

use session_lifecycle::{EndReason, ReleaseState, SessionId, Timestamp};

use super::{MemoryStore, ready};
use crate::error::{BoxFuture, StoreError};
use crate::record::NodeRow;
use crate::rows::LOST_WITH_NODE;
use crate::store::NodeMembership;

impl NodeMembership for MemoryStore {
    fn live_nodes(
        &self,
        now: Timestamp,
        node_timeout: Duration,
    ) -> BoxFuture<'_, Result<u32, StoreError>> {
        let state = self.state();
        let cutoff = now.saturating_sub(node_timeout);
        let live = state.nodes.values().filter(|seen| **seen > cutoff).count();
        ready(Ok(live as u32))
    }

    fn node_alive(&self, node: &str, now: Timestamp) -> BoxFuture<'_, Result<(), StoreError>> {
        let mut state = self.state();
        let seen = state.nodes.entry(node.to_owned()).or_insert(now);
        *seen = (*seen).max(now);
        ready(Ok(()))
    }

    fn report_node<'a>(
        &'a self,
        node: &'a str,
        report: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let mut state = self.state();
        state
            .node_reports
            .insert(node.to_owned(), report.to_owned());
        ready(Ok(()))
    }

    fn nodes(
        &self,
        now: Timestamp,
        node_timeout: Duration,
        window: Duration,
    ) -> BoxFuture<'_, Result<Vec<NodeRow>, StoreError>> {
        let state = self.state();
        let rows = state
            .nodes
            .iter()
            .filter(|(_, seen)| **seen > now.saturating_sub(window))
            .map(|(node, seen)| NodeRow {
                node: node.clone(),
                last_heartbeat_at: *seen,
                alive: *seen > now.saturating_sub(node_timeout),
                report: state.node_reports.get(node).cloned(),
            })
            .collect();
        ready(Ok(rows))
    }

    fn end_dead_nodes(
        &self,
        except: &str,
        now: Timestamp,
        node_timeout: Duration,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<SessionId>, StoreError>> {
        let mut state = self.state();
        let cutoff = now.saturating_sub(node_timeout);
        let mut dead: Vec<String> = state
            .nodes
            .iter()
            .filter(|(id, seen)| id.as_str() != except && **seen <= cutoff)
            .map(|(id, _)| id.clone())
            .collect();
        dead.sort();
        let mut ended: Vec<SessionId> = Vec::new();
        for node in dead {
            state.let_go_of(&node, now);
            let last_seen = state.nodes.get(&node).copied();
            let first = ended.len();
            for (id, s) in state.sessions.iter_mut() {
                if s.node != node {
                    continue;
                }
                if s.ending.is_none() && ended.len() < limit as usize {
                    s.node_last_seen = last_seen;
                    s.end(now, EndReason::NodeLost);
                    let _ = self.ended.send(*id);
                    ended.push(*id);
                }
                for r in &mut s.resources {
                    if matches!(r.release, ReleaseState::Pending { .. }) && !r.lost {
                        r.lost = true;
                        r.note = Some(format!("{LOST_WITH_NODE}{node}"));
                    }
                }
            }
            for id in ended[first..].iter().copied() {
                state.ended_events(id, now);
            }
        }
        ready(Ok(ended))
    }
}
