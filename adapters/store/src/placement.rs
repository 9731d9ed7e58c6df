//! Fleet placement: which node of a fleet sharing one store runs a new session.
//!
//! A create on any instance chooses, in the transaction that records the session, a node
//! that can hold it (heartbeat fresh, not draining or stopped, a free session slot, GPU
//! memory for it) by the fleet's [`PlacementPolicy`], and records the choice with the
//! session. When the chosen node is another one, the session is recorded *assigned*: that
//! node claims it (woken by the store), acquires its resources and reports the outcome,
//! while the receiving instance waits for it. A store used by one machine places nothing
//! ([`FleetPlacement::places`] is false): every session runs where it was created.
//!
//! The choice is a pure function of the candidates ([`choose_node`]), so that every store
//! that places applies one rule, and it is tested here.

use std::time::Duration;

use session_lifecycle::SessionId;

use crate::error::{BoxFuture, StoreError};
use crate::record::{NewSession, SessionRecord};
use crate::report::NodeReport;

/// How a create chooses among the nodes that have room for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PlacementPolicy {
    /// The node with the largest free fraction (of its session slots, and of the memory of
    /// its roomiest GPU, whichever is scarcer; a node bounded by neither is wholly free):
    /// load spreads evenly, a node's failure touches few sessions.
    #[default]
    Spread,
    /// The node with the smallest free fraction that still has room: nodes fill one after
    /// the other, and empty ones can be scaled away.
    Pack,
}

/// What a placed create asks of the fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacementAsk {
    /// The node whose instance received the create.
    pub receiving: String,
    /// Whether the receiving node may take the session now (not draining or stopping, a
    /// free slot, its backends have room): it knows this better than its last report.
    pub receiving_has_room: bool,
    /// The receiving node's session slots (`None`: no limit), counted like any node's
    /// against the sessions the store records on it.
    pub receiving_slots: Option<u64>,
    /// Nodes not to choose (they refused this session already).
    pub exclude: Vec<String>,
    /// GPU memory the session needs, bytes; `None`: the default size, as each node's
    /// report judges it (`full`).
    pub gpu_memory: Option<u64>,
    /// How to choose among the nodes with room.
    pub policy: PlacementPolicy,
    /// A node whose heartbeat is older than this is not chosen.
    pub node_timeout: Duration,
}

/// One node a placement may choose, as the store sees it in the placing transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Its id.
    pub node: String,
    /// Its last report; `None` if it wrote none the store can read (it is not chosen:
    /// nothing says it has room).
    pub report: Option<NodeReport>,
    /// The started sessions recorded on it now (the store's count, not the report's).
    pub started: u64,
}

/// What a placed create did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlaceOutcome {
    /// The session is recorded on `node`: started there already if it is the receiving
    /// node (which acquires its resources now), else assigned to it.
    Placed {
        /// The chosen node.
        node: String,
    },
    /// No live node has room for it; nothing was written.
    NoRoom,
    /// The tenant already has its plan's most started sessions; nothing was written.
    LimitReached,
}

/// Where the start of a placed session stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartState {
    /// Recorded on its node, which has not claimed it yet.
    Assigned,
    /// Its node claimed it and is acquiring its resources.
    Starting,
    /// Its node refused it before acquiring anything (no room, draining, stopping), for
    /// the reason given: it may be placed again elsewhere.
    Refused(String),
    /// Its start finished: its resources are attached, it runs.
    Started,
}

/// A placed session as its waiting instance reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacedState {
    /// The node it is recorded on.
    pub node: String,
    /// It ended (whatever its start state was then).
    pub ended: bool,
    /// Its start.
    pub start: StartState,
}

/// A placed session a node claimed to start: its record, and what its create asked of
/// its resources (as the creating engine wrote it, see [`FleetPlacement::create_placed`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ClaimedStart {
    /// The session as recorded.
    pub record: SessionRecord,
    /// What its create asked of its resources, as the engine encoded it.
    pub request: String,
}

/// Placement across a fleet of nodes sharing this store (see the [module docs](self)).
/// Every method but [`places`](Self::places) is called only when it answers true; the
/// defaults are those of a store used by one machine.
pub trait FleetPlacement: Send + Sync + 'static {
    /// Whether creates are placed across the nodes sharing this store.
    fn places(&self) -> bool {
        false
    }

    /// Records `new` on a node chosen by `ask` ([`choose_node`] over the live nodes, in
    /// the same transaction as the session and its `started` event, so two creates
    /// racing for a node's last slot never both get it), refused like
    /// `SessionStore::create` when its tenant is at its
    /// limit. `new.node` is ignored. A session placed on another node than the receiving
    /// one is recorded assigned, with `request` (what it asks of its resources) kept for
    /// that node, which is woken (see [`watch_starts`](Self::watch_starts)).
    fn create_placed<'a>(
        &'a self,
        new: NewSession,
        ask: &'a PlacementAsk,
        request: &'a str,
    ) -> BoxFuture<'a, Result<PlaceOutcome, StoreError>> {
        let _ = (new, ask, request);
        Box::pin(async { Err(not_placing()) })
    }

    /// Places session `id` again, on a node other than `from` and those `ask` excludes, if
    /// it is still started, recorded on `from`, and not claimed there (assigned, or
    /// refused). `None` if it is not (claimed, started, ended or moved meanwhile: nothing
    /// changed); `Some(NoRoom)` if no other node has room (nothing changed either).
    fn place_again<'a>(
        &'a self,
        id: SessionId,
        from: &'a str,
        ask: &'a PlacementAsk,
    ) -> BoxFuture<'a, Result<Option<PlaceOutcome>, StoreError>> {
        let _ = (id, from, ask);
        Box::pin(async { Err(not_placing()) })
    }

    /// Claims up to `limit` started sessions assigned to `node`, oldest first: they become
    /// [`StartState::Starting`] and no one else claims them.
    fn claim_starts<'a>(
        &'a self,
        node: &'a str,
        limit: u32,
    ) -> BoxFuture<'a, Result<Vec<ClaimedStart>, StoreError>> {
        let _ = (node, limit);
        Box::pin(async { Ok(Vec::new()) })
    }

    /// Reports the start of `id`, which `node` claimed: finished (`refused` is `None`), or
    /// refused before anything was acquired, for the reason given. False if the session is
    /// not starting on `node` (it ended meanwhile: nothing changed).
    fn finish_start<'a>(
        &'a self,
        id: SessionId,
        node: &'a str,
        refused: Option<&'a str>,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        let _ = (id, node, refused);
        Box::pin(async { Ok(false) })
    }

    /// Where the start of `id` stands; `None` if there is no such session.
    fn placed_state(
        &self,
        id: SessionId,
    ) -> BoxFuture<'_, Result<Option<PlacedState>, StoreError>> {
        let _ = id;
        Box::pin(async { Ok(None) })
    }

    /// The started sessions `node` had claimed and not finished starting (a start under
    /// way when its previous run stopped), so that it ends them: their creates were
    /// answered with an error, or are still waiting for one.
    fn interrupted_starts<'a>(
        &'a self,
        node: &'a str,
    ) -> BoxFuture<'a, Result<Vec<SessionId>, StoreError>> {
        let _ = node;
        Box::pin(async { Ok(Vec::new()) })
    }

    /// Runs until dropped, calling `wake` whenever a session may have been assigned to
    /// `node`. Best effort: the engine also polls.
    fn watch_starts<'a>(
        &'a self,
        node: &'a str,
        wake: &'a (dyn Fn() + Send + Sync),
    ) -> BoxFuture<'a, ()> {
        let _ = (node, wake);
        Box::pin(std::future::pending())
    }

    /// Runs until dropped, calling `heard` with the id of every placed session whose start
    /// finished or was refused, on any node. Best effort: waiters also poll.
    fn watch_placed<'a>(
        &'a self,
        heard: &'a (dyn Fn(SessionId) + Send + Sync),
    ) -> BoxFuture<'a, ()> {
        let _ = heard;
        Box::pin(std::future::pending())
    }
}

fn not_placing() -> StoreError {
    StoreError::InvalidConfig("this store does not place sessions across nodes".into())
}

/// The node `ask` places a session on among `candidates`, by its policy; `None` if none
/// has room. A node has room when it is not excluded, and: for the receiving node, as it
/// says (`receiving_has_room`); for any other, its last report says it is neither
/// draining nor stopped nor full, it has a free session slot, and (when the session asks
/// for an amount) a GPU with that much memory neither used nor promised. Ties go to the
/// receiving node (no hop), then to the node with fewer sessions (spread) or more (pack),
/// then by id, so that every store chooses alike.
pub fn choose_node(candidates: &[Candidate], ask: &PlacementAsk) -> Option<String> {
    let mut best: Option<(&Candidate, f64)> = None;
    for candidate in candidates {
        if ask.exclude.contains(&candidate.node) {
            continue;
        }
        let Some(free) = free_fraction(candidate, ask) else {
            continue;
        };
        let better = match best {
            None => true,
            Some((current, current_free)) => {
                let by_free = match ask.policy {
                    PlacementPolicy::Spread => free.total_cmp(&current_free),
                    PlacementPolicy::Pack => current_free.total_cmp(&free),
                };
                let by_load = match ask.policy {
                    PlacementPolicy::Spread => current.started.cmp(&candidate.started),
                    PlacementPolicy::Pack => candidate.started.cmp(&current.started),
                };
                let receiving = |c: &Candidate| c.node == ask.receiving;
                by_free
                    .then(receiving(candidate).cmp(&receiving(current)))
                    .then(by_load)
                    .then(current.node.cmp(&candidate.node))
                    .is_gt()
            }
        };
        if better {
            best = Some((candidate, free));
        }
    }
    best.map(|(c, _)| c.node.clone())
}

/// The share of `candidate` still free for `ask` (in `0.0..=1.0`), `None` if it has no
/// room for the session.
fn free_fraction(candidate: &Candidate, ask: &PlacementAsk) -> Option<f64> {
    let receiving = candidate.node == ask.receiving;
    if receiving && !ask.receiving_has_room {
        return None;
    }
    let unreported = NodeReport::default();
    let report = match &candidate.report {
        Some(report) => report,
        // The receiving node vouches for itself; it may not have reported yet.
        None if receiving => &unreported,
        None => return None,
    };
    if !receiving && (report.draining || report.stopped || report.full.is_some()) {
        return None;
    }
    let mut free: Option<f64> = None;
    let slots = if receiving {
        ask.receiving_slots
    } else {
        report.slots
    };
    if let Some(slots) = slots {
        if candidate.started >= slots {
            return None;
        }
        let left = slots.saturating_sub(candidate.started);
        free = Some(if slots == 0 {
            0.0
        } else {
            left as f64 / slots as f64
        });
    }
    if !report.devices.is_empty() {
        let mut roomiest: Option<f64> = None;
        for device in &report.devices {
            let available = device
                .free
                .min(device.total.saturating_sub(device.promised));
            if let Some(want) = ask.gpu_memory
                && available < want
            {
                continue;
            }
            let fraction = if device.total == 0 {
                0.0
            } else {
                available as f64 / device.total as f64
            };
            roomiest = Some(roomiest.map_or(fraction, |r: f64| r.max(fraction)));
        }
        match roomiest {
            Some(gpu) => free = Some(free.map_or(gpu, |f| f.min(gpu))),
            None if !receiving => return None,
            None => {}
        }
    }
    // Nothing bounds it (no slots, no GPUs): wholly free, so that ties keep a session on
    // the node that received it, as on one machine.
    Some(free.unwrap_or(1.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::DeviceReport;

    fn ask(policy: PlacementPolicy) -> PlacementAsk {
        PlacementAsk {
            receiving: "a".to_owned(),
            receiving_has_room: true,
            // As `node("a", Some(2), _)` reports.
            receiving_slots: Some(2),
            exclude: Vec::new(),
            gpu_memory: None,
            policy,
            node_timeout: Duration::from_secs(30),
        }
    }

    fn node(id: &str, slots: Option<u64>, started: u64) -> Candidate {
        Candidate {
            node: id.to_owned(),
            report: Some(NodeReport {
                slots,
                ..NodeReport::default()
            }),
            started,
        }
    }

    #[test]
    fn spread_takes_the_freest_node_and_ties_stay_on_the_receiving_one() {
        let nodes = [
            node("a", Some(2), 1),
            node("b", Some(3), 1),
            node("c", Some(5), 1),
        ];
        assert_eq!(
            choose_node(&nodes, &ask(PlacementPolicy::Spread)).as_deref(),
            Some("c")
        );
        let empty = [
            node("c", Some(5), 0),
            node("a", Some(2), 0),
            node("b", Some(3), 0),
        ];
        assert_eq!(
            choose_node(&empty, &ask(PlacementPolicy::Spread)).as_deref(),
            Some("a")
        );
    }

    #[test]
    fn pack_fills_the_fullest_node_with_room_first() {
        let nodes = [
            node("a", Some(4), 0),
            node("b", Some(4), 3),
            node("c", Some(4), 4),
        ];
        assert_eq!(
            choose_node(&nodes, &ask(PlacementPolicy::Pack)).as_deref(),
            Some("b")
        );
    }

    #[test]
    fn full_draining_stopped_excluded_and_silent_nodes_are_never_chosen() {
        let mut draining = node("b", None, 0);
        draining.report.as_mut().unwrap().draining = true;
        let mut stopped = node("c", None, 0);
        stopped.report.as_mut().unwrap().stopped = true;
        let mut full = node("d", None, 0);
        full.report.as_mut().unwrap().full = Some("no GPU has room".to_owned());
        let silent = Candidate {
            node: "e".to_owned(),
            report: None,
            started: 0,
        };
        let at_slots = node("f", Some(2), 2);
        let excluded = node("g", None, 0);
        let mut a = ask(PlacementPolicy::Spread);
        a.receiving_has_room = false;
        a.exclude = vec!["g".to_owned()];
        let nodes = [
            node("a", None, 0),
            draining,
            stopped,
            full,
            silent,
            at_slots,
            excluded,
        ];
        assert_eq!(choose_node(&nodes, &a), None);
        a.receiving_has_room = true;
        assert_eq!(choose_node(&nodes, &a).as_deref(), Some("a"));
    }

    #[test]
    fn a_node_is_chosen_only_with_a_gpu_that_holds_the_asked_memory() {
        let gib = 1 << 30;
        let gpu = |total: u64, free: u64, promised: u64| DeviceReport {
            total,
            free,
            promised,
            ..DeviceReport::default()
        };
        let mut b = node("b", None, 0);
        b.report.as_mut().unwrap().devices = vec![gpu(80 * gib, 80 * gib, 79 * gib)];
        let mut c = node("c", None, 3);
        c.report.as_mut().unwrap().devices = vec![gpu(80 * gib, 10 * gib, 0)];
        let mut a = ask(PlacementPolicy::Spread);
        a.receiving_has_room = false;
        a.gpu_memory = Some(4 * gib);
        assert_eq!(
            choose_node(&[b.clone(), c.clone()], &a).as_deref(),
            Some("c")
        );
        a.gpu_memory = Some(16 * gib);
        assert_eq!(choose_node(&[b, c], &a), None);
    }
}
