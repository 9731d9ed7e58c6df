//! Hooks for the deterministic simulator (`session-lifecycle-sim`), compiled in with the
//! `simulation` feature: session ids drawn from a seed instead of the operating system, and
//! known bugs that can be switched on, one at a time, to prove the simulator finds them.
//!
//! Both are per thread: a simulation runs its whole cluster on one thread, and tests
//! running other simulations (or none) on other threads are not affected. Without the
//! feature nothing here can be switched on.

/// A known bug the engine can be made to have, to check that the simulator catches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PlantedBug {
    /// A repeated end of a session starts a release run of its own, without claiming the
    /// session's releases: two runs of one session release side by side.
    ReleaseWithoutClaim,
    /// An end through the API that the store could not take is answered as done from the
    /// in-memory table: an acknowledged end the store never recorded.
    AcknowledgeEndBeforeStore,
    /// A resource acquired while its session was ended meanwhile is forgotten instead of
    /// released.
    ForgetLateResource,
    /// Silence is judged right after a store outage, without waiting for the liveness
    /// kept meanwhile to be written or for other nodes to report again.
    JudgeDuringOutage,
}

#[cfg_attr(not(feature = "simulation"), allow(dead_code))]
impl PlantedBug {
    /// Every planted bug.
    pub const ALL: [PlantedBug; 4] = [
        PlantedBug::ReleaseWithoutClaim,
        PlantedBug::AcknowledgeEndBeforeStore,
        PlantedBug::ForgetLateResource,
        PlantedBug::JudgeDuringOutage,
    ];

    /// Its name in settings (`SIM_PLANT`).
    pub const fn name(self) -> &'static str {
        match self {
            PlantedBug::ReleaseWithoutClaim => "release_without_claim",
            PlantedBug::AcknowledgeEndBeforeStore => "acknowledge_end_before_store",
            PlantedBug::ForgetLateResource => "forget_late_resource",
            PlantedBug::JudgeDuringOutage => "judge_during_outage",
        }
    }

    /// The bug named `name`.
    pub fn from_name(name: &str) -> Option<PlantedBug> {
        PlantedBug::ALL.into_iter().find(|b| b.name() == name)
    }
}

#[cfg(feature = "simulation")]
mod hooks {
    use std::cell::Cell;

    use super::PlantedBug;

    thread_local! {
        static PLANTED: Cell<Option<PlantedBug>> = const { Cell::new(None) };
        static IDS: Cell<Option<u64>> = const { Cell::new(None) };
    }

    /// Switches `bug` on for engines running on this thread (`None`: none).
    pub fn plant(bug: Option<PlantedBug>) {
        PLANTED.with(|p| p.set(bug));
    }

    /// Draws the random part of session ids started on this thread from `seed` instead of
    /// the operating system (`None`: the operating system again).
    pub fn seed_ids(seed: Option<u64>) {
        IDS.with(|ids| ids.set(seed));
    }

    pub(crate) fn planted(bug: PlantedBug) -> bool {
        PLANTED.with(|p| p.get()) == Some(bug)
    }

    pub(crate) fn seeded_entropy() -> Option<u128> {
        IDS.with(|ids| {
            let state = ids.get()?;
            // SplitMix64, twice: the id's random bits follow the seed alone.
            let (a, state) = splitmix(state);
            let (b, state) = splitmix(state);
            ids.set(Some(state));
            Some((u128::from(a) << 64) | u128::from(b))
        })
    }

    fn splitmix(state: u64) -> (u64, u64) {
        let state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31), state)
    }
}

#[cfg(feature = "simulation")]
pub use hooks::{plant, seed_ids};

/// Whether `bug` is switched on for this thread.
#[inline]
pub(crate) fn planted(bug: PlantedBug) -> bool {
    #[cfg(feature = "simulation")]
    {
        hooks::planted(bug)
    }
    #[cfg(not(feature = "simulation"))]
    {
        let _ = bug;
        false
    }
}

/// Random bits for a session id drawn from the thread's seed, if one is set.
#[inline]
pub(crate) fn seeded_entropy() -> Option<u128> {
    #[cfg(feature = "simulation")]
    {
        hooks::seeded_entropy()
    }
    #[cfg(not(feature = "simulation"))]
    {
        None
    }
}
