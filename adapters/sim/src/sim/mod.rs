//! One simulated run: the cluster (`cluster`), the workload drawn from the seed
//! (`workload`), and the checks and the verdict (`verdict`).

use std::collections::{BTreeMap, VecDeque};
use std::hash::{DefaultHasher, Hash};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use session_lifecycle::{Policy, SessionId, Timestamp};
use session_lifecycle_runtime::simulation::{self};
use session_lifecycle_runtime::{
    Background, Engine, EngineConfig, MemoryStore, Plan, ResourceBackend, RoomEvent, RoomProvider,
    SocketHold, Store, lock,
};
use session_lifecycle_sqlite::SqliteStore;
use tokio::task::JoinHandle;

use crate::backend::{self, GPU, Misbehaviour, PROCESS, SimBackend, World};
use crate::checks::{Down, Limits, Obs};
use crate::clock::SimClock;
use crate::faults::Faults;
use crate::rng::Rng;

mod cluster;
mod courier;
mod verdict;
mod workload;

pub use crate::report::{Failure, Report, SimConfig, StoreKind};

/// Runs the simulation of `seed`. Deterministic: the same seed and configuration give
/// the same run and the same trace hash.
pub fn run(seed: u64, config: &SimConfig) -> Result<Report, Failure> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a current-thread runtime builds");
    simulation::plant(config.planted);
    simulation::seed_ids(Some(seed));
    let result = runtime.block_on(async {
        let mut sim = Sim::new(seed, config).await;
        sim.run().await;
        sim.finish()
    });
    drop(runtime);
    simulation::plant(None);
    simulation::seed_ids(None);
    result
}

/// The trace: every step and answer, hashed as it goes; the last lines kept for a report.
struct Trace {
    hasher: DefaultHasher,
    tail: VecDeque<String>,
    /// Print every line as it comes (`SIM_TRACE=1`).
    echo: bool,
}

impl Trace {
    fn push(&mut self, line: String) {
        line.hash(&mut self.hasher);
        if self.echo {
            eprintln!("{line}");
        }
        if self.tail.len() == 60 {
            self.tail.pop_front();
        }
        self.tail.push_back(line);
    }
}

/// What tasks of the run share: what was seen, and the trace.
struct Shared {
    obs: Obs,
    trace: Trace,
    counts: BTreeMap<&'static str, u32>,
    clock: SimClock,
    rooms: Vec<Room>,
}

impl Shared {
    fn log(&mut self, line: impl Into<String>) {
        let t = self.clock.elapsed().as_millis();
        let line = line.into();
        self.trace.push(format!("{t:>8} {line}"));
    }

    fn count(&mut self, what: &'static str) {
        *self.counts.entry(what).or_default() += 1;
    }

    fn label(&self, id: &SessionId) -> String {
        self.obs.sessions.get(id).map_or_else(
            || format!("?{}", &id.to_string()[20..]),
            |s| s.label.clone(),
        )
    }
}

type SharedRef = Arc<Mutex<Shared>>;

/// One node: its engine while it runs, its machine (backends) always.
struct Node {
    name: String,
    engine: Option<Engine>,
    background: Option<Background>,
    backends: Vec<Arc<dyn ResourceBackend>>,
    calls: Vec<JoinHandle<()>>,
    sockets: Arc<Mutex<Vec<SocketHold>>>,
    /// Crashed: restarts at this virtual time.
    restart_at: Option<Duration>,
    /// Cut off from the store until this virtual time.
    cut_off_until: Option<Duration>,
}

/// A room of a session, as the provider sees it.
struct Room {
    tenant: String,
    provider: RoomProvider,
    name: String,
    present: Vec<String>,
    joined: u32,
    events: u32,
    sent: Vec<RoomEvent>,
    finished: bool,
}

/// Which kinds of trouble this seed uses.
#[derive(Debug, Clone, Copy)]
struct Swarm {
    flaky_store: bool,
    outages: bool,
    crashes: bool,
    cut_offs: bool,
    clock_steps: bool,
    backend_trouble: bool,
    room_trouble: bool,
    avatar_exits: bool,
}

struct Sim {
    seed: u64,
    rng: Rng,
    clock: SimClock,
    faults: Faults,
    world: Arc<World>,
    raw: Arc<dyn Store>,
    _dir: Option<tempfile::TempDir>,
    nodes: Vec<Node>,
    shared: SharedRef,
    delayed: Vec<(Duration, usize, RoomEvent)>,
    swarm: Swarm,
    ops: u32,
    target_ops: u32,
    outage_until: Option<Duration>,
    /// The latest time the wall clock has shown.
    wall_high_water: Timestamp,
    config: SimConfig,
    limits: Limits,
    /// The webhook receiver the outbox delivers to (see `courier`).
    receiver: courier::Receiver,
}

const TENANTS: [&str; 3] = ["t0", "t1", "t2"];
/// A base wall time: 2026-01-01.
const BASE: u64 = 1_767_225_600_000;

fn engine_config(node: &str) -> EngineConfig {
    EngineConfig {
        policy: Policy {
            orphan_timeout: Duration::from_secs(60),
            sweep_interval: Duration::from_secs(10),
            ..Policy::DEFAULT
        },
        node: node.to_owned(),
        node_heartbeat: Duration::from_secs(5),
        node_timeout: Duration::from_secs(30),
        release_poll: Duration::from_secs(2),
        release_lease: Duration::from_secs(30),
        websocket_grace: Duration::from_secs(5),
        outage_settle: Duration::from_secs(10),
        // Short, so that sessions run across several periods within a run.
        usage_period: Duration::from_secs(20),
        ..EngineConfig::default()
    }
}

fn plan(tenant: &str) -> Plan {
    // t0 has a small plan: some of its creates are over it.
    let limit = (tenant == "t0").then_some(3);
    Plan::new(limit, Duration::from_secs(20 * 60))
}

impl Sim {
    async fn new(seed: u64, config: &SimConfig) -> Sim {
        let root = Rng::new(seed);
        let mut rng = root.split(1);
        let clock = SimClock::new(Timestamp::from_millis(BASE));
        let (raw, dir): (Arc<dyn Store>, _) = match config.store {
            StoreKind::Memory => (Arc::new(MemoryStore::new()), None),
            StoreKind::Sqlite => {
                let shm = std::path::Path::new("/dev/shm");
                let dir = if shm.is_dir() {
                    tempfile::tempdir_in(shm)
                } else {
                    tempfile::tempdir()
                }
                .expect("a temporary directory");
                let store =
                    SqliteStore::open(dir.path().join("sim.db")).expect("the SQLite store opens");
                (Arc::new(store), Some(dir))
            }
        };
        let nodes = config
            .nodes
            .unwrap_or_else(|| 1 + rng.below(4) as usize)
            .clamp(1, 4);
        let target_ops = config.ops.unwrap_or_else(|| rng.between(250, 400) as u32);
        let swarm = Swarm {
            flaky_store: rng.chance(600),
            outages: rng.chance(600),
            crashes: rng.chance(600),
            cut_offs: nodes > 1 && rng.chance(600),
            clock_steps: rng.chance(600),
            backend_trouble: rng.chance(600),
            room_trouble: rng.chance(600),
            avatar_exits: rng.chance(600),
        };
        let world = Arc::new(World {
            ledger: Mutex::new(backend::Ledger::default()),
            store: Arc::clone(&raw),
            rng: Mutex::new(root.split(2)),
            misbehaviour: Mutex::new(Misbehaviour::default()),
        });
        let faults = Faults::new(nodes, root.split(3));
        let shared = Arc::new(Mutex::new(Shared {
            obs: Obs {
                down: vec![Vec::new(); nodes],
                ..Obs::default()
            },
            trace: Trace {
                hasher: DefaultHasher::new(),
                tail: VecDeque::new(),
                echo: std::env::var_os("SIM_TRACE").is_some_and(|v| v == "1"),
            },
            counts: BTreeMap::new(),
            clock: clock.clone(),
            rooms: Vec::new(),
        }));
        let config0 = engine_config("n0");
        let mut sim = Sim {
            seed,
            rng,
            clock,
            faults,
            world: Arc::clone(&world),
            raw,
            _dir: dir,
            nodes: (0..nodes)
                .map(|i| Node {
                    name: format!("n{i}"),
                    engine: None,
                    background: None,
                    backends: vec![
                        Arc::new(SimBackend::new(GPU, i, Arc::clone(&world))),
                        Arc::new(SimBackend::new(PROCESS, i, Arc::clone(&world))),
                    ],
                    calls: Vec::new(),
                    sockets: Arc::new(Mutex::new(Vec::new())),
                    restart_at: Some(Duration::ZERO),
                    cut_off_until: None,
                })
                .collect(),
            shared,
            delayed: Vec::new(),
            swarm,
            ops: 0,
            target_ops,
            outage_until: None,
            wall_high_water: Timestamp::from_millis(BASE),
            config: config.clone(),
            limits: Limits {
                orphan_timeout: config0.policy.orphan_timeout,
                node_timeout: config0.node_timeout,
            },
            receiver: courier::Receiver::new(root.split(4)),
        };
        sim.log(format!(
            // The store is not named: the same seed on either store makes the same trace.
            "seed {seed} nodes {nodes} ops {target_ops} {swarm:?}"
        ));
        for i in 0..nodes {
            sim.restart(i).await;
        }
        sim
    }

    fn log(&self, line: impl Into<String>) {
        lock(&self.shared).log(line);
    }

    fn count(&self, what: &'static str) {
        lock(&self.shared).count(what);
    }

    fn now(&self) -> Duration {
        self.clock.elapsed()
    }

    fn clock_now(&self) -> Timestamp {
        session_lifecycle::Clock::now(&self.clock)
    }

    async fn run(&mut self) {
        while self.ops < self.target_ops {
            let pause = Duration::from_millis(self.rng.below(2_500));
            tokio::time::sleep(pause).await;
            self.scheduled().await;
            self.keep_alive();
            self.step().await;
            self.ops += 1;
            self.check().await;
            self.maybe_courier().await;
            if !lock(&self.shared).obs.violations.is_empty() {
                return;
            }
        }
        self.quiesce().await;
        if lock(&self.shared).obs.violations.is_empty() {
            self.settle_outbox().await;
        }
    }

    /// What was scheduled for now: outages ending, nodes restarting or coming back, room
    /// events delivered late.
    async fn scheduled(&mut self) {
        let now = self.now();
        if self.outage_until.is_some_and(|t| t <= now) {
            self.outage_until = None;
            self.faults.with(|f| f.outage = false);
            self.log("store back");
        }
        for i in 0..self.nodes.len() {
            if self.nodes[i].cut_off_until.is_some_and(|t| t <= now) {
                self.nodes[i].cut_off_until = None;
                self.faults.with(|f| f.cut_off[i] = false);
                let mut shared = lock(&self.shared);
                shared.obs.came_back(i, Down::CutOff, now);
                shared.log(format!("n{i} reaches the store again"));
            }
            if self.nodes[i].restart_at.is_some_and(|t| t <= now) {
                self.restart(i).await;
            }
        }
        let due: Vec<(Duration, usize, RoomEvent)>;
        (due, self.delayed) = std::mem::take(&mut self.delayed)
            .into_iter()
            .partition(|(t, _, _)| *t <= now);
        for (_, room, event) in due {
            self.deliver(room, event);
        }
    }

    /// Liveness for the sessions the run keeps alive, at a steady pace (every 5 to 20 s).
    fn keep_alive(&mut self) {
        let now = self.now();
        let due: Vec<SessionId> = lock(&self.shared)
            .obs
            .sessions
            .iter()
            .filter(|(_, s)| {
                s.kept_alive
                    && s.first_end.is_none()
                    && !s.said_ended
                    && now.saturating_sub(s.last_touch) >= Duration::from_secs(5)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            if self.rng.chance(300) || {
                let last = lock(&self.shared).obs.sessions[&id].last_touch;
                now.saturating_sub(last) >= Duration::from_secs(20)
            } {
                self.touch(id);
            }
        }
    }
}
