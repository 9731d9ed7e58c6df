//! One simulated run: the cluster, the workload drawn from the seed, and the checks.

use std::collections::{BTreeMap, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use session_lifecycle::{EndReason, Policy, SessionId, Status, Timestamp};
use session_lifecycle_runtime::faults::FaultyStore;
use session_lifecycle_runtime::simulation::{self, PlantedBug};
use session_lifecycle_runtime::{
    Background, Engine, EngineConfig, EngineError, ListQuery, MemoryStore, Plan, ResourceBackend,
    RoomBinding, RoomEvent, RoomEventKind, RoomProvider, SessionRecord, SessionTimeouts,
    SocketHold, StartRequest, Store, lock,
};
use session_lifecycle_sqlite::SqliteStore;
use tokio::task::JoinHandle;

use crate::backend::{self, GPU, Held, Misbehaviour, PROCESS, SimBackend, World};
use crate::checks::{Limits, Obs, SessionObs};
use crate::clock::SimClock;
use crate::faults::Faults;
use crate::rng::Rng;

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
        };
        sim.log(format!(
            "seed {seed} store {} nodes {nodes} ops {target_ops} {swarm:?}",
            config.store.name()
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

    /// Starts node `i`'s engine (again), if the store lets it.
    async fn restart(&mut self, i: usize) {
        let node = &self.nodes[i];
        let store: Arc<dyn Store> = Arc::new(FaultyStore::deciding(
            Arc::clone(&self.raw),
            self.faults.decider(i),
        ));
        let opened = Engine::open(
            store,
            node.backends.clone(),
            Arc::new(self.clock.clone()),
            engine_config(&node.name),
        )
        .await;
        match opened {
            Ok(engine) => {
                let background = engine.spawn_background();
                let node = &mut self.nodes[i];
                node.engine = Some(engine);
                node.background = Some(background);
                node.restart_at = None;
                self.log(format!("n{i} up"));
                let now = self.now();
                let mut shared = lock(&self.shared);
                if let Some(last) = shared.obs.down[i].last_mut()
                    && last.1.is_none()
                {
                    last.1 = Some(now);
                }
            }
            Err(e) => {
                self.nodes[i].restart_at = Some(self.now() + Duration::from_secs(2));
                self.log(format!("n{i} restart failed: {e}"));
            }
        }
    }

    /// Crashes node `i`: its memory is lost (tasks dropped where they stand, sockets gone
    /// without a word), its machine and the store are kept.
    async fn crash(&mut self, i: usize, down_for: Duration) {
        let now = self.now();
        let node = &mut self.nodes[i];
        let Some(engine) = node.engine.take() else {
            return;
        };
        for call in node.calls.drain(..) {
            call.abort();
        }
        for hold in lock(&node.sockets).drain(..) {
            hold.abandon();
        }
        engine.handover().await;
        node.background = None;
        node.restart_at = Some(now + down_for);
        {
            let mut shared = lock(&self.shared);
            let sockets_closed: Vec<SessionId> = shared.obs.sessions.keys().copied().collect();
            for id in sockets_closed {
                if let Some(s) = shared.obs.sessions.get_mut(&id) {
                    for sock in &mut s.sockets {
                        if sock.0 == i && sock.2.is_none() {
                            sock.2 = Some(now);
                        }
                    }
                }
            }
            shared.obs.down[i].push((now, None));
        }
        self.count("node_crash");
        self.log(format!("n{i} crashed for {} s", down_for.as_secs()));
    }

    fn up_nodes(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].engine.is_some())
            .collect()
    }

    fn pick_node(&mut self) -> Option<(usize, Engine)> {
        let up = self.up_nodes();
        if up.is_empty() {
            return None;
        }
        let i = up[self.rng.index(up.len())];
        self.nodes[i].engine.clone().map(|e| (i, e))
    }

    fn spawn_call<F>(&mut self, node: usize, call: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let handle = tokio::spawn(call);
        let calls = &mut self.nodes[node].calls;
        calls.retain(|c| !c.is_finished());
        calls.push(handle);
    }

    /// Sessions the run knows, started as far as it knows.
    fn live_sessions(&self) -> Vec<SessionId> {
        lock(&self.shared)
            .obs
            .sessions
            .iter()
            .filter(|(_, s)| s.first_end.is_none() && !s.said_ended)
            .map(|(id, _)| *id)
            .collect()
    }

    fn any_session(&mut self) -> Option<SessionId> {
        let all: Vec<SessionId> = lock(&self.shared).obs.sessions.keys().copied().collect();
        (!all.is_empty()).then(|| all[self.rng.index(all.len())])
    }

    fn pick_live(&mut self) -> Option<SessionId> {
        let live = self.live_sessions();
        (!live.is_empty()).then(|| live[self.rng.index(live.len())])
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
            if !lock(&self.shared).obs.violations.is_empty() {
                return;
            }
        }
        self.quiesce().await;
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
                if let Some(last) = shared.obs.down[i].last_mut() {
                    last.1 = Some(now);
                }
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

    async fn step(&mut self) {
        let draw = self.rng.below(100);
        match draw {
            0..=21 => self.create(),
            22..=31 => {
                if let Some(id) = self.any_session() {
                    self.end(id);
                }
            }
            32..=39 => self.open_socket(),
            40..=45 => self.lose_socket(),
            46..=55 => {
                if let Some(id) = self.pick_live() {
                    self.touch(id);
                }
            }
            56..=67 => self.room_event(),
            68..=69 if self.swarm.avatar_exits => self.avatar_exit().await,
            70..=72 if self.swarm.clock_steps => self.step_clock(),
            73..=76 if self.swarm.flaky_store => {
                let flaky = self.faults.with(|f| {
                    f.flaky = !f.flaky;
                    f.flaky
                });
                self.log(format!("store flaky: {flaky}"));
            }
            77 if self.swarm.outages && self.outage_until.is_none() => {
                let secs = self.rng.between(3, 120);
                self.outage_until = Some(self.now() + Duration::from_secs(secs));
                self.faults.with(|f| f.outage = true);
                self.count("db_outage");
                self.log(format!("store outage for {secs} s"));
            }
            78 if self.swarm.crashes => {
                let i = self.rng.index(self.nodes.len());
                let secs = self.rng.between(1, 60);
                self.crash(i, Duration::from_secs(secs)).await;
            }
            79 if self.swarm.cut_offs => self.cut_off(),
            80..=82 if self.swarm.backend_trouble => {
                let how = Misbehaviour {
                    slow: self.rng.chance(500),
                    failing: self.rng.chance(500),
                    hanging: self.rng.chance(300),
                };
                *lock(&self.world.misbehaviour) = how;
                if how.slow || how.failing || how.hanging {
                    self.count("backend_misbehaving");
                }
                self.log(format!("backends now {how:?}"));
            }
            _ => {
                if let Some(id) = self.pick_live() {
                    self.touch(id);
                }
            }
        }
    }

    fn create(&mut self) {
        let Some((i, engine)) = self.pick_node() else {
            return;
        };
        let tenant = TENANTS[self.rng.index(TENANTS.len())].to_owned();
        let duration = if self.rng.chance(200) {
            Some(Duration::from_secs(self.rng.between(20, 120)))
        } else if self.rng.chance(700) {
            Some(Duration::from_secs(self.rng.between(120, 900)))
        } else {
            None
        };
        let room = self.rng.chance(300).then(|| RoomBinding {
            provider: if self.rng.chance(500) {
                RoomProvider::Livekit
            } else {
                RoomProvider::Daily
            },
            name: format!("room-{}", self.rng.below(1 << 40)),
        });
        let timeouts = SessionTimeouts {
            participant_left: self
                .rng
                .chance(300)
                .then(|| Duration::from_secs(self.rng.below(30))),
            participant_absent: None,
            websocket_grace: self
                .rng
                .chance(400)
                .then(|| Duration::from_secs(self.rng.below(20))),
        };
        let kept_alive = self.rng.chance(500);
        let request = StartRequest {
            tenant: tenant.clone(),
            plan: plan(&tenant),
            duration,
            metadata: None,
            room: room.clone(),
            timeouts,
            resources: Default::default(),
        };
        self.count("create");
        let shared = Arc::clone(&self.shared);
        let clock = self.clock.clone();
        self.spawn_call(i, async move {
            let answer = engine.start(request).await;
            let now = clock.elapsed();
            let mut shared = lock(&shared);
            match answer {
                Ok(record) => {
                    let id = *record.session.id();
                    let label = format!("s{}", shared.obs.sessions.len());
                    let room = room.map(|binding| {
                        shared.rooms.push(Room {
                            tenant: tenant.clone(),
                            provider: binding.provider,
                            name: binding.name,
                            present: Vec::new(),
                            joined: 0,
                            events: 0,
                            sent: Vec::new(),
                            finished: false,
                        });
                        shared.rooms.len() - 1
                    });
                    let entry = shared.obs.sessions.entry(id).or_insert(SessionObs {
                        label: label.clone(),
                        owner: i,
                        seen: now,
                        started_at: record.session.started_at(),
                        tenant: tenant.clone(),
                        first_end: None,
                        acked_end: None,
                        said_ended: false,
                        touches: Vec::new(),
                        sockets: Vec::new(),
                        kept_alive: false,
                        kept_alive_until: None,
                        last_touch: now,
                        room: None,
                        in_store: false,
                    });
                    entry.kept_alive = kept_alive;
                    entry.room = room;
                    let label = entry.label.clone();
                    shared.log(format!("n{i} start {label} ({tenant}) -> started"));
                }
                Err(e) => {
                    if matches!(e, EngineError::PlanLimit(_)) {
                        shared.count("create_over_plan");
                    }
                    shared.log(format!("n{i} start ({tenant}) -> {e}"));
                }
            }
        });
    }

    fn end(&mut self, id: SessionId) {
        let Some((i, engine)) = self.pick_node() else {
            return;
        };
        let tenant = lock(&self.shared).obs.sessions[&id].tenant.clone();
        // Now and then through the operator's scope (any tenant).
        let scoped = self.rng.chance(800);
        self.count("end_api");
        let shared = Arc::clone(&self.shared);
        self.spawn_call(i, async move {
            let answer = engine
                .end(scoped.then_some(tenant.as_str()), id, EndReason::Requested)
                .await;
            let mut shared = lock(&shared);
            let label = shared.label(&id);
            match answer {
                Ok(record) => {
                    let ending = record.session.ended_at().zip(record.session.end_reason());
                    match ending {
                        Some(end) => {
                            if let Some(s) = shared.obs.sessions.get_mut(&id) {
                                s.acked_end.get_or_insert(end);
                            }
                            shared.log(format!("n{i} end {label} -> ended {:?}", end.1));
                        }
                        None => {
                            shared.obs.violations.push(format!(
                                "{label}: an end was answered with a started session"
                            ));
                        }
                    }
                }
                Err(e) => shared.log(format!("n{i} end {label} -> {e}")),
            }
        });
    }

    fn touch(&mut self, id: SessionId) {
        let Some((i, engine)) = self.pick_node() else {
            return;
        };
        let now = self.now();
        let tenant = {
            let mut shared = lock(&self.shared);
            let s = shared.obs.sessions.get_mut(&id).expect("a known session");
            s.last_touch = now;
            s.tenant.clone()
        };
        self.count("touch");
        let shared = Arc::clone(&self.shared);
        self.spawn_call(i, async move {
            let answer = engine.touch(Some(&tenant), id).await;
            let mut shared = lock(&shared);
            let label = shared.label(&id);
            let (acked, arrived) = match &answer {
                Ok(_) => (true, true),
                Err(EngineError::Store(e)) => (false, e.is_unavailable()),
                Err(EngineError::SessionEnded) => {
                    if let Some(s) = shared.obs.sessions.get_mut(&id) {
                        s.said_ended = true;
                    }
                    (false, false)
                }
                Err(_) => (false, false),
            };
            if arrived && let Some(s) = shared.obs.sessions.get_mut(&id) {
                // Sent at `now`: kept by the node if the store could not take it.
                s.touches.push((now, i, acked));
            }
            let said = match answer {
                Ok(_) => "ok".to_owned(),
                Err(e) => e.to_string(),
            };
            shared.log(format!("n{i} touch {label} -> {said}"));
        });
    }

    fn open_socket(&mut self) {
        let Some(id) = self.pick_live() else { return };
        let Some((i, engine)) = self.pick_node() else {
            return;
        };
        let tenant = lock(&self.shared).obs.sessions[&id].tenant.clone();
        self.count("socket_open");
        let shared = Arc::clone(&self.shared);
        let sockets = Arc::clone(&self.nodes[i].sockets);
        let clock = self.clock.clone();
        self.spawn_call(i, async move {
            let answer = engine.hold_socket(Some(&tenant), id).await;
            let now = clock.elapsed();
            let mut shared = lock(&shared);
            let label = shared.label(&id);
            match answer {
                Ok((hold, _)) => {
                    lock(&sockets).push(hold);
                    if let Some(s) = shared.obs.sessions.get_mut(&id) {
                        s.sockets.push((i, now, None));
                    }
                    shared.log(format!("n{i} socket {label} -> open"));
                }
                Err(e) => {
                    if matches!(e, EngineError::SessionEnded)
                        && let Some(s) = shared.obs.sessions.get_mut(&id)
                    {
                        s.said_ended = true;
                    }
                    shared.log(format!("n{i} socket {label} -> {e}"));
                }
            }
        });
    }

    fn lose_socket(&mut self) {
        let holders: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| !lock(&self.nodes[i].sockets).is_empty())
            .collect();
        if holders.is_empty() {
            return;
        }
        let i = holders[self.rng.index(holders.len())];
        let hold = {
            let mut sockets = lock(&self.nodes[i].sockets);
            let k = self.rng.index(sockets.len());
            sockets.remove(k)
        };
        let id = hold.session();
        drop(hold);
        let now = self.now();
        self.count("socket_loss");
        let mut shared = lock(&self.shared);
        if let Some(s) = shared.obs.sessions.get_mut(&id)
            && let Some(sock) = s.sockets.iter_mut().find(|k| k.0 == i && k.2.is_none())
        {
            sock.2 = Some(now);
        }
        let label = shared.label(&id);
        shared.log(format!("n{i} socket {label} lost"));
    }

    fn room_event(&mut self) {
        let rooms: Vec<usize> = {
            let shared = lock(&self.shared);
            (0..shared.rooms.len())
                .filter(|&r| !shared.rooms[r].finished)
                .collect()
        };
        if rooms.is_empty() {
            return;
        }
        let r = rooms[self.rng.index(rooms.len())];
        let at = self.clock_now();
        let event = {
            let mut shared = lock(&self.shared);
            let room = &mut shared.rooms[r];
            // Now and then a delivery of an event sent before (a provider's retry).
            if !room.sent.is_empty() && self.rng.chance(100) {
                let k = self.rng.index(room.sent.len());
                let again = room.sent[k].clone();
                shared.count("room_duplicate");
                drop(shared);
                self.deliver(r, again);
                return;
            }
            let kind = if room.present.is_empty() || self.rng.chance(350) {
                room.joined += 1;
                let who = format!("p{}", room.joined);
                room.present.push(who.clone());
                RoomEventKind::Joined { participant: who }
            } else if self.rng.chance(930) {
                let k = self.rng.index(room.present.len());
                RoomEventKind::Left {
                    participant: room.present.remove(k),
                }
            } else {
                room.finished = true;
                RoomEventKind::Finished
            };
            room.events += 1;
            let event = RoomEvent {
                tenant: Some(room.tenant.clone()),
                provider: room.provider,
                room: room.name.clone(),
                event_id: format!("{}-{}", room.name, room.events),
                at,
                kind,
            };
            room.sent.push(event.clone());
            event
        };
        if self.swarm.room_trouble && self.rng.chance(100) {
            self.count("room_lost");
            self.log(format!("room {r} event {} lost", event.event_id));
        } else if self.swarm.room_trouble && self.rng.chance(150) {
            let later = self.now() + Duration::from_millis(self.rng.between(500, 10_000));
            self.count("room_reorder");
            self.log(format!("room {r} event {} delayed", event.event_id));
            self.delayed.push((later, r, event));
        } else {
            self.deliver(r, event);
        }
    }

    fn deliver(&mut self, room: usize, event: RoomEvent) {
        let Some((i, engine)) = self.pick_node() else {
            return;
        };
        self.count("room_event");
        let shared = Arc::clone(&self.shared);
        self.spawn_call(i, async move {
            let id = event.event_id.clone();
            let answer = engine.room_event(event).await;
            let said = match answer {
                Ok(report) if report.duplicate => "duplicate".to_owned(),
                Ok(report) => format!("ended {}", report.ended.len()),
                Err(e) => e.to_string(),
            };
            lock(&shared).log(format!("n{i} room {room} event {id} -> {said}"));
        });
    }

    async fn avatar_exit(&mut self) {
        let held: Vec<(session_lifecycle::Resource, SessionId, usize)> = lock(&self.world.ledger)
            .entries
            .iter()
            .filter(|(r, e)| r.kind == PROCESS && e.state == Held::Held)
            .map(|(r, e)| (*r, e.session, e.node))
            .collect();
        if held.is_empty() {
            return;
        }
        let (resource, session, node) = held[self.rng.index(held.len())];
        if self.nodes[node].engine.is_none() {
            return;
        }
        self.count("avatar_exit");
        let label = lock(&self.shared).label(&session);
        self.log(format!("n{node} avatar of {label} exits"));
        backend::avatar_exits(&self.world, resource, session, node).await;
    }

    fn step_clock(&mut self) {
        let ms = self.rng.between(1_000, 180_000) as i64;
        let ms = if self.rng.chance(500) {
            self.count("clock_forward");
            ms
        } else {
            self.count("clock_back");
            -ms
        };
        self.wall_high_water = self.wall_high_water.max(self.clock_now());
        self.clock.step(ms);
        self.log(format!("clock stepped {ms} ms"));
    }

    fn clock_now(&self) -> Timestamp {
        session_lifecycle::Clock::now(&self.clock)
    }

    fn cut_off(&mut self) {
        let i = self.rng.index(self.nodes.len());
        if self.nodes[i].cut_off_until.is_some() || self.nodes[i].engine.is_none() {
            return;
        }
        let secs = self.rng.between(5, 90);
        let now = self.now();
        self.nodes[i].cut_off_until = Some(now + Duration::from_secs(secs));
        self.faults.with(|f| f.cut_off[i] = true);
        self.count("node_death");
        let mut shared = lock(&self.shared);
        shared.obs.down[i].push((now, None));
        shared.log(format!("n{i} cut off from the store for {secs} s"));
    }

    /// Reads every session from the store (without faults) and checks it, and the
    /// backends' ledger.
    async fn check(&mut self) {
        let records = self.all_records().await;
        let now = self.now();
        let mut shared = lock(&self.shared);
        let mut digest = DefaultHasher::new();
        for record in &records {
            let id = *record.session.id();
            if !shared.obs.sessions.contains_key(&id) {
                // Created, though its start was not answered (an answer lost, a crash).
                let label = format!("s{}", shared.obs.sessions.len());
                let owner = record.node.trim_start_matches('n').parse().unwrap_or(0);
                shared.obs.sessions.insert(
                    id,
                    SessionObs {
                        label,
                        owner,
                        seen: now,
                        started_at: record.session.started_at(),
                        tenant: record.tenant.clone(),
                        first_end: None,
                        acked_end: None,
                        said_ended: false,
                        touches: Vec::new(),
                        sockets: Vec::new(),
                        kept_alive: false,
                        kept_alive_until: None,
                        last_touch: now,
                        room: None,
                        in_store: true,
                    },
                );
            }
            shared
                .obs
                .check_record(record, now, self.clock_now(), self.limits);
            (
                record.session.status() == Status::Started,
                record.session.end_reason().map(|r| r.as_str()),
                record.session.ended_at(),
                record.session.resources().len(),
                record.session.is_fully_released(),
            )
                .hash(&mut digest);
        }
        // A session whose start was answered must be in the store.
        let missing: Vec<String> = shared
            .obs
            .sessions
            .iter()
            .filter(|(id, _)| !records.iter().any(|r| r.session.id() == *id))
            .map(|(_, s)| format!("{}: started, but the store has no such session", s.label))
            .collect();
        shared.obs.violations.extend(missing);
        let ledger_broken = std::mem::take(&mut lock(&self.world.ledger).violations);
        shared.obs.violations.extend(ledger_broken);
        shared.obs.last_check = now;
        let digest = digest.finish();
        shared.log(format!("check {} sessions {digest:016x}", records.len()));
    }

    async fn all_records(&self) -> Vec<SessionRecord> {
        let mut all = Vec::new();
        let mut before = None;
        loop {
            let page = self
                .raw
                .list(ListQuery {
                    tenant: None,
                    status: None,
                    limit: 500,
                    before,
                    node: None,
                })
                .await
                .expect("the store without faults answers");
            let Some(last) = page.last() else { break };
            before = Some(*last.session.id());
            let full = page.len() == 500;
            all.extend(page);
            if !full {
                break;
            }
        }
        all
    }

    /// The faults stop: every node comes back, rooms finish, clients go away. Within the
    /// contract's three minutes every session must have ended, and soon after every
    /// resource must be given back, exactly once.
    async fn quiesce(&mut self) {
        self.log("faults stop");
        self.outage_until = None;
        self.faults.with(|f| {
            f.outage = false;
            f.flaky = false;
            f.cut_off.iter_mut().for_each(|c| *c = false);
        });
        *lock(&self.world.misbehaviour) = Misbehaviour::default();
        let now = self.now();
        for i in 0..self.nodes.len() {
            self.nodes[i].cut_off_until = None;
            let mut shared = lock(&self.shared);
            if let Some(last) = shared.obs.down[i].last_mut()
                && last.1.is_none()
                && self.nodes[i].engine.is_some()
            {
                last.1 = Some(now);
            }
        }
        // Every node comes back (a node that was crashed restarts now).
        while let Some(i) = (0..self.nodes.len()).find(|&i| self.nodes[i].engine.is_none()) {
            self.restart(i).await;
            if self.nodes[i].engine.is_none() {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        // Calls still running finish (a socket opened now is closed below with the rest).
        let calls: Vec<JoinHandle<()>> = self
            .nodes
            .iter_mut()
            .flat_map(|n| n.calls.drain(..))
            .collect();
        for call in calls {
            let abort = call.abort_handle();
            if tokio::time::timeout(Duration::from_secs(60), call)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        // Clients go away; room providers report every room finished.
        for node in &self.nodes {
            lock(&node.sockets).clear();
        }
        {
            let mut shared = lock(&self.shared);
            for s in shared.obs.sessions.values_mut() {
                s.kept_alive = false;
                s.kept_alive_until = Some(now);
                for sock in &mut s.sockets {
                    sock.2.get_or_insert(now);
                }
            }
        }
        let rooms: Vec<usize> = (0..lock(&self.shared).rooms.len()).collect();
        for r in rooms {
            let event = {
                let mut shared = lock(&self.shared);
                let room = &mut shared.rooms[r];
                room.finished = true;
                room.events += 1;
                RoomEvent {
                    tenant: Some(room.tenant.clone()),
                    provider: room.provider,
                    room: room.name.clone(),
                    event_id: format!("{}-{}", room.name, room.events),
                    at: session_lifecycle::Clock::now(&self.clock),
                    kind: RoomEventKind::Finished,
                }
            };
            self.deliver(r, event);
        }
        // The bounds are on the wall clock, from the latest time it ever showed: a step
        // back delays every judgement of silence by as much (timestamps recorded before it
        // look recent), and ending a session late is safe where ending it early is not.
        let latest = self.wall_high_water.max(self.clock_now());
        let ended_by = latest.saturating_add(Duration::from_secs(180));
        let released_by = latest.saturating_add(Duration::from_secs(300));
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            self.scheduled().await;
            self.check().await;
            let now = self.clock_now();
            let records = self.all_records().await;
            let mut started: Vec<String> = Vec::new();
            for r in records
                .iter()
                .filter(|r| r.session.status() == Status::Started)
            {
                let id = *r.session.id();
                let wall = self.clock_now();
                let holders = self
                    .raw
                    .presence(id, wall, Duration::from_secs(3_600))
                    .await
                    .unwrap_or_default();
                let room = self.raw.room_state(id).await.ok().flatten();
                let label = lock(&self.shared).label(&id);
                started.push(format!(
                    "{label} (on {}, last seen {} ms ago, expires in {} ms, held by {holders:?}, room {room:?})",
                    r.node,
                    wall.as_millis() as i64 - r.session.last_seen_at().as_millis() as i64,
                    r.session.expires_at().as_millis() as i64 - wall.as_millis() as i64,
                ));
            }
            let unreleased: Vec<String> = {
                let ledger = lock(&self.world.ledger);
                let shared = lock(&self.shared);
                ledger
                    .entries
                    .iter()
                    .filter(|(_, e)| e.state != Held::Released || e.released != 1)
                    .map(|(r, e)| {
                        format!(
                            "{} {:?} on n{} ({:?}, released {} times)",
                            shared.label(&e.session),
                            r,
                            e.node,
                            e.state,
                            e.released
                        )
                    })
                    .chain(
                        records
                            .iter()
                            .filter(|r| !r.session.is_fully_released())
                            .map(|r| {
                                format!(
                                    "{}: releases left in the store",
                                    shared.label(r.session.id())
                                )
                            }),
                    )
                    .collect()
            };
            let mut shared = lock(&self.shared);
            if !shared.obs.violations.is_empty() {
                return;
            }
            if started.is_empty() && unreleased.is_empty() {
                shared.log("quiet: every session ended, every resource given back");
                return;
            }
            if now >= ended_by && !started.is_empty() {
                shared.obs.violations.push(format!(
                    "not ended within 180 s (on the wall clock) of the faults stopping: {}",
                    started.join(", ")
                ));
                return;
            }
            if now >= released_by {
                shared.obs.violations.push(format!(
                    "not given back within 300 s (on the wall clock) of the faults stopping: {}",
                    unreleased.join("; ")
                ));
                return;
            }
        }
    }

    fn finish(self) -> Result<Report, Failure> {
        let shared = lock(&self.shared);
        let trace_hash = shared.trace.hasher.clone().finish();
        if !shared.obs.violations.is_empty() {
            return Err(Failure {
                seed: self.seed,
                store: self.config.store,
                nodes: self.nodes.len(),
                planted: self.config.planted,
                violations: shared.obs.violations.clone(),
                trace_tail: shared.trace.tail.iter().cloned().collect(),
                trace_hash,
            });
        }
        let mut counts = shared.counts.clone();
        let mut expired = 0;
        for s in shared.obs.sessions.values() {
            if s.first_end.is_some_and(|(_, r)| r == EndReason::Expired) {
                expired += 1;
            }
        }
        if expired > 0 {
            counts.insert("expiry", expired);
        }
        let faults = self.faults.with(|f| (f.failed, f.lost_answers));
        if faults.0 > 0 {
            counts.insert("store_call_failed", faults.0 as u32);
        }
        if faults.1 > 0 {
            counts.insert("store_answer_lost", faults.1 as u32);
        }
        Ok(Report {
            seed: self.seed,
            nodes: self.nodes.len(),
            ops: self.ops,
            sessions: shared.obs.sessions.len(),
            virtual_time: self.clock.elapsed(),
            counts,
            trace_hash,
        })
    }
}
