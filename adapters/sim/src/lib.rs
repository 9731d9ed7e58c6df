//! Deterministic simulation of session-lifecycle engines and their cluster.
//!
//! One to four [`Engine`]s ("nodes") share one store (the in-memory reference store or
//! SQLite), with simulated resource backends, on one thread in virtual time (tokio's
//! current-thread runtime with its clock paused: it jumps to the next timer whenever every
//! task waits). One `u64` seed draws everything: the workload (creates, some over their
//! plan; ends; sockets opened and lost; liveness; room webhooks duplicated, reordered and
//! lost; avatars exiting), the faults (store calls failing or losing their answer after
//! they committed, store outages, nodes crashing and restarting, nodes cut off from the
//! store and coming back, wall-clock steps both ways, backends slow, failing or hanging),
//! and the session ids. Which kinds of trouble a seed uses is drawn too ("swarm testing"),
//! so that some runs are quiet enough for rare interleavings and others are storms.
//!
//! After every step the store and the backends' ledger are checked against what every
//! answer said (see [`checks`]); once the faults stop, every session must end within the
//! contract's three minutes and every resource be given back exactly once. A failure
//! names its seed and prints the end of its trace; the same seed replays the same run,
//! with the same trace hash.
//!
//! ```
//! use session_lifecycle_sim::{SimConfig, StoreKind, run};
//!
//! let config = SimConfig { store: StoreKind::Memory, nodes: Some(2), ops: Some(60), planted: None };
//! let first = run(7, &config).expect("seed 7 holds every invariant");
//! let again = run(7, &config).expect("and again");
//! assert_eq!(first.trace_hash, again.trace_hash);
//! ```

pub mod backend;
pub mod checks;
pub mod clock;
pub mod faults;
mod report;
pub mod rng;
mod sim;

pub use report::{Failure, Report, SimConfig, StoreKind};
pub use session_lifecycle_runtime::simulation::PlantedBug;
pub use sim::run;

#[doc(no_inline)]
pub use session_lifecycle_runtime::Engine;
