//! The simulation's entry point. Settings, all optional, from the environment:
//!
//! - `SIM_SEEDS`: how many seeds to run (default 50); `SIM_FIRST_SEED`: the first (0).
//! - `SIM_SEED`: run this one seed only (a replay), printing its trace hash.
//! - `SIM_STORE`: `memory`, `sqlite` or `both` (default `both`: every seed runs on each;
//!   how many made the same trace on both is printed).
//! - `SIM_NODES`: 1 to 4 nodes for every seed (default: drawn from each seed).
//! - `SIM_PLANT`: a planted bug to switch on (`release_without_claim`,
//!   `acknowledge_end_before_store`, `forget_late_resource`, `judge_during_outage`): the
//!   run then expects a failure and passes when a seed finds it.

use std::collections::BTreeMap;
use std::time::Instant;

use session_lifecycle_sim::{PlantedBug, SimConfig, StoreKind, run};

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, not {v:?}"))
    })
}

fn stores() -> Vec<StoreKind> {
    match std::env::var("SIM_STORE").as_deref() {
        Ok("memory") => vec![StoreKind::Memory],
        Ok("sqlite") => vec![StoreKind::Sqlite],
        Ok("both") | Err(_) => vec![StoreKind::Memory, StoreKind::Sqlite],
        Ok(other) => panic!("SIM_STORE must be memory, sqlite or both, not {other:?}"),
    }
}

fn planted() -> Option<PlantedBug> {
    std::env::var("SIM_PLANT").ok().map(|name| {
        PlantedBug::from_name(&name).unwrap_or_else(|| panic!("no planted bug named {name:?}"))
    })
}

fn config(store: StoreKind, planted: Option<PlantedBug>) -> SimConfig {
    SimConfig {
        store,
        nodes: env_u64("SIM_NODES").map(|n| n as usize),
        ops: None,
        planted,
    }
}

/// The fault kinds of the issue, each to be injected in at least 10% of the seeds.
const FAULT_KINDS: [&str; 16] = [
    "create_over_plan",
    "db_outage",
    "end_api",
    "socket_open",
    "socket_loss",
    "touch",
    "room_duplicate",
    "room_reorder",
    "room_lost",
    "expiry",
    "clock_forward",
    "clock_back",
    "store_call_failed",
    "store_answer_lost",
    "node_crash",
    "node_death",
];

/// The runs of seeds `first..first + count` on each of `stores`, in seed order, computed
/// on as many threads as the machine has cores; after a failure, later seeds are not run.
fn run_seeds(
    first: u64,
    count: u64,
    stores: &[StoreKind],
    planted: Option<PlantedBug>,
) -> Vec<Vec<Result<session_lifecycle_sim::Report, session_lifecycle_sim::Failure>>> {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let next = AtomicU64::new(first);
    let failed = AtomicBool::new(false);
    let done = Mutex::new(BTreeMap::new());
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                loop {
                    let seed = next.fetch_add(1, Ordering::SeqCst);
                    if seed >= first + count || failed.load(Ordering::SeqCst) {
                        return;
                    }
                    let results: Vec<_> = stores
                        .iter()
                        .map(|&store| run(seed, &config(store, planted)))
                        .collect();
                    if results.iter().any(Result::is_err) {
                        failed.store(true, Ordering::SeqCst);
                    }
                    done.lock().unwrap().insert(seed, results);
                }
            });
        }
    });
    // Up to the first seed not run (after a failure), in order.
    let mut done = done.into_inner().unwrap();
    (first..first + count)
        .map_while(|seed| done.remove(&seed))
        .collect()
}

#[test]
fn seeds_hold_every_invariant() {
    if std::env::var_os("SIM_TRACE").is_some_and(|v| v == "1") {
        // The engines' own log lines, between the trace's.
        let _ = tracing_subscriber::fmt()
            .without_time()
            .with_writer(std::io::stderr)
            .try_init();
    }
    let planted = planted();
    let stores = stores();
    let (first, count) = match env_u64("SIM_SEED") {
        Some(seed) => (seed, 1),
        None => (
            env_u64("SIM_FIRST_SEED").unwrap_or(0),
            env_u64("SIM_SEEDS").unwrap_or(50),
        ),
    };
    let began = Instant::now();
    let mut runs_with: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut totals: BTreeMap<&'static str, u64> = BTreeMap::new();
    let (mut ops, mut sessions, mut virtual_secs) = (0u64, 0u64, 0u64);
    let mut by_nodes = [0u64; 5];
    let mut runs = 0u64;
    let mut same_trace = 0u64;
    // Seeds run on every core (each run is single-threaded and deterministic: its own
    // runtime, its own thread-local switches), then are judged in seed order, as one
    // loop would.
    let outcomes = run_seeds(first, count, &stores, planted);
    for (seed, results) in (first..first + count).zip(outcomes) {
        let mut hashes = Vec::new();
        for (store, result) in stores.iter().zip(results) {
            match result {
                Ok(report) => {
                    assert!(
                        report.ops >= 200,
                        "seed {seed} made {} operations, fewer than 200",
                        report.ops
                    );
                    if count == 1 {
                        println!(
                            "seed {seed} on {}: trace hash {:016x}",
                            store.name(),
                            report.trace_hash
                        );
                    }
                    for (kind, n) in &report.counts {
                        *runs_with.entry(kind).or_default() += 1;
                        *totals.entry(kind).or_default() += u64::from(*n);
                    }
                    ops += u64::from(report.ops);
                    sessions += report.sessions as u64;
                    virtual_secs += report.virtual_time.as_secs();
                    by_nodes[report.nodes] += 1;
                    runs += 1;
                    hashes.push(report.trace_hash);
                }
                Err(failure) if planted.is_some() => {
                    println!("planted bug found:\n{failure}");
                    return;
                }
                Err(failure) => panic!("{failure}"),
            }
        }
        // The reference store and SQLite met the same history. Their traces may still part
        // where the two stores yield at different points (SQLite's writer is shared), so
        // the same trace is counted, not required.
        if let [memory, sqlite] = hashes[..] {
            same_trace += u64::from(memory == sqlite);
        }
    }
    let wall = began.elapsed();
    if let Some(bug) = planted {
        panic!(
            "the planted bug {} was not found in {count} seeds",
            bug.name()
        );
    }
    println!(
        "{count} seeds, {runs} runs ({} stores; runs by nodes 1..4: {:?}) in {:.1} s: {ops} operations, {sessions} sessions ({:.0} simulated sessions/s of wall time), {} h of virtual time",
        stores
            .iter()
            .map(|s| s.name())
            .collect::<Vec<_>>()
            .join("+"),
        &by_nodes[1..],
        wall.as_secs_f64(),
        sessions as f64 / wall.as_secs_f64(),
        virtual_secs / 3600,
    );
    if stores.len() == 2 {
        println!("  the two stores made the same trace for {same_trace} of {count} seeds");
    }
    for (kind, with) in &runs_with {
        println!("  {kind:<20} in {with:>6} runs, {:>8} in all", totals[kind]);
    }
    if count >= 20 {
        for kind in FAULT_KINDS {
            let with = runs_with.get(kind).copied().unwrap_or(0);
            assert!(
                with * 10 >= runs,
                "{kind} was injected in {with} of {runs} runs, under 10%"
            );
        }
    }
}

#[test]
fn the_same_seed_replays_the_same_run() {
    for (seed, store) in [(11, StoreKind::Memory), (12, StoreKind::Sqlite)] {
        let config = SimConfig {
            store,
            nodes: None,
            ops: None,
            planted: None,
        };
        let first = run(seed, &config).unwrap_or_else(|f| panic!("{f}"));
        let second = run(seed, &config).unwrap_or_else(|f| panic!("{f}"));
        assert_eq!(
            first.trace_hash,
            second.trace_hash,
            "seed {seed} on {} replayed differently",
            store.name()
        );
        assert_eq!(first.counts, second.counts);
    }
}

/// Runs seeds from 0 with `bug` planted until one fails the way the bug shows itself
/// (a violation naming one of `shows`), within the CI budget of 500.
fn find(bug: PlantedBug, shows: &[&str]) {
    for seed in 0..500 {
        let store = if seed % 2 == 0 {
            StoreKind::Memory
        } else {
            StoreKind::Sqlite
        };
        let config = SimConfig {
            store,
            nodes: None,
            ops: None,
            planted: Some(bug),
        };
        if let Err(failure) = run(seed, &config) {
            println!("{} found by seed {seed}:\n{failure}", bug.name());
            assert!(
                failure
                    .violations
                    .iter()
                    .any(|v| shows.iter().any(|s| v.contains(s))),
                "seed {seed} failed, but not as {} shows itself: {:?}",
                bug.name(),
                failure.violations
            );
            return;
        }
    }
    panic!("the planted bug {} was not found in 500 seeds", bug.name());
}

#[test]
fn finds_a_release_run_without_a_claim() {
    find(
        PlantedBug::ReleaseWithoutClaim,
        &["two releases at once", "on node", "while"],
    );
}

#[test]
fn finds_an_end_acknowledged_before_the_store_took_it() {
    find(
        PlantedBug::AcknowledgeEndBeforeStore,
        &["the API acknowledged"],
    );
}

#[test]
fn finds_a_resource_forgotten_when_its_session_ended_during_the_start() {
    find(
        PlantedBug::ForgetLateResource,
        &["acquired after it", "not given back"],
    );
}

#[test]
fn finds_silence_judged_right_after_an_outage() {
    find(
        PlantedBug::JudgeDuringOutage,
        &["though its liveness kept arriving", "though its node"],
    );
}
