//! What a run is given and what it gives back.

use std::collections::BTreeMap;
use std::time::Duration;

use session_lifecycle_runtime::simulation::PlantedBug;

/// The store the nodes share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// The in-memory reference store.
    Memory,
    /// SQLite, in a file on tmpfs (`/dev/shm`) where there is one.
    Sqlite,
}

impl StoreKind {
    /// Its name in settings (`SIM_STORE`).
    pub fn name(self) -> &'static str {
        match self {
            StoreKind::Memory => "memory",
            StoreKind::Sqlite => "sqlite",
        }
    }
}

/// What a run is made of, beyond its seed.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// The shared store.
    pub store: StoreKind,
    /// How many nodes (1 to 4); `None` draws it from the seed.
    pub nodes: Option<usize>,
    /// How many workload operations; `None` draws 250 to 400 from the seed.
    pub ops: Option<u32>,
    /// A known bug switched on for the run.
    pub planted: Option<PlantedBug>,
}

/// What a run that held every invariant did.
#[derive(Debug, Clone)]
pub struct Report {
    /// Its seed.
    pub seed: u64,
    /// Its nodes.
    pub nodes: usize,
    /// Workload operations made.
    pub ops: u32,
    /// Sessions the store ended up holding.
    pub sessions: usize,
    /// Virtual time it lasted.
    pub virtual_time: Duration,
    /// How many of each kind of operation and fault it made.
    pub counts: BTreeMap<&'static str, u32>,
    /// The hash of its trace: the same seed gives the same hash.
    pub trace_hash: u64,
}

/// A run that broke an invariant.
#[derive(Debug, Clone)]
pub struct Failure {
    /// Its seed.
    pub seed: u64,
    /// Its store.
    pub store: StoreKind,
    /// Its nodes.
    pub nodes: usize,
    /// The bug planted, if any.
    pub planted: Option<PlantedBug>,
    /// What broke.
    pub violations: Vec<String>,
    /// The last lines of its trace.
    pub trace_tail: Vec<String>,
    /// The hash of its trace.
    pub trace_hash: u64,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "seed {} ({} store, {} nodes{}) broke an invariant:",
            self.seed,
            self.store.name(),
            self.nodes,
            self.planted
                .map(|b| format!(", planted {}", b.name()))
                .unwrap_or_default()
        )?;
        for v in self.violations.iter().take(10) {
            writeln!(f, "  - {v}")?;
        }
        writeln!(f, "last steps (trace hash {:016x}):", self.trace_hash)?;
        for line in &self.trace_tail {
            writeln!(f, "  {line}")?;
        }
        write!(
            f,
            "replay: SIM_SEED={} SIM_STORE={} SIM_NODES={}{} cargo test -p session-lifecycle-sim --test simulate -- --nocapture",
            self.seed,
            self.store.name(),
            self.nodes,
            self.planted
                .map(|b| format!(" SIM_PLANT={}", b.name()))
                .unwrap_or_default()
        )
    }
}

impl std::error::Error for Failure {}
