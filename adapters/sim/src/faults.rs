//! Store faults: which calls of which node fail, or commit and lose their answer, decided
//! call by call from the run's seed; outages of the whole store, and nodes cut off from it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use session_lifecycle_runtime::faults::{CallFault, FaultDecider};
use session_lifecycle_runtime::lock;

use crate::rng::Rng;

/// What the run has switched on now.
#[derive(Debug, Default)]
pub struct FaultState {
    /// The whole store is unreachable.
    pub outage: bool,
    /// Nodes cut off from the store (a node that died, as the others see it).
    pub cut_off: Vec<bool>,
    /// Single calls fail now and then.
    pub flaky: bool,
    /// Calls that failed on purpose, before reaching the store.
    pub failed: u64,
    /// Calls that committed and lost their answer.
    pub lost_answers: u64,
}

/// The run's store faults, shared by every node's faulty store.
#[derive(Clone)]
pub struct Faults {
    state: Arc<Mutex<FaultState>>,
    rng: Arc<Mutex<Rng>>,
}

impl Faults {
    /// No faults yet, for `nodes` nodes, chance drawn from `rng`.
    pub fn new(nodes: usize, rng: Rng) -> Faults {
        Faults {
            state: Arc::new(Mutex::new(FaultState {
                cut_off: vec![false; nodes],
                ..FaultState::default()
            })),
            rng: Arc::new(Mutex::new(rng)),
        }
    }

    /// Changes what is switched on.
    pub fn with<R>(&self, f: impl FnOnce(&mut FaultState) -> R) -> R {
        f(&mut lock(&self.state))
    }

    /// The decider of node `node`'s store calls.
    pub fn decider(&self, node: usize) -> FaultDecider {
        let faults = self.clone();
        Box::new(move |_call, method| faults.decide(node, method))
    }

    fn decide(&self, node: usize, method: &'static str) -> CallFault {
        let mut state = lock(&self.state);
        if state.outage || state.cut_off.get(node).copied().unwrap_or(false) {
            return CallFault::Fail;
        }
        let mut rng = lock(&self.rng);
        // Now and then a call answers late: the order in which tasks meet follows the seed.
        let late = match rng.below(10) {
            0 => Some(Duration::ZERO),
            1 => Some(Duration::from_millis(rng.between(1, 40))),
            _ => None,
        };
        if !state.flaky {
            return late.map_or(CallFault::Pass, CallFault::Late);
        }
        let draw = rng.below(1000);
        // Reads losing their answer change nothing; writes losing theirs are the case that
        // matters (committed, but the caller cannot know).
        let writes = !matches!(method, "get" | "list" | "presence" | "room_state" | "ping");
        if draw < 25 {
            state.failed += 1;
            CallFault::Fail
        } else if draw < 50 && writes {
            state.lost_answers += 1;
            CallFault::LoseAnswer
        } else {
            late.map_or(CallFault::Pass, CallFault::Late)
        }
    }
}
