//! `sessiond`: serves the session API on an embedded SQLite file, with no setup.
//!
//! `cargo run --release --bin sessiond` prints its address, a generated API key and a
//! curl line that works as pasted. `sessiond --help` lists every flag; each also reads an
//! environment variable `SESSIOND_<NAME>`.

use std::io::{BufWriter, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use session_lifecycle::{DeliveryPolicy, Policy};
use session_lifecycle_cuda::{AssignmentBackend, AssignmentConfig, GpuInfo, NvmlGpu};
use session_lifecycle_http::outbound::address::AddressPolicy;
use session_lifecycle_http::outbound::{Outbound, OutboundConfig};
use session_lifecycle_http::tenants::{Tenants, hash_key};
use session_lifecycle_http::tokens::TokenSigner;
use session_lifecycle_http::webhooks::{DailySecret, LivekitKey, WebhookConfig};
use session_lifecycle_http::{AppState, HttpConfig, router};
use session_lifecycle_postgres::PostgresStore;
use session_lifecycle_process::{CgroupMode, ProcessBackend, ProcessConfig};
use session_lifecycle_runtime::{Engine, EngineConfig, Plan, ResourceBackend, Store, SystemClock};
use session_lifecycle_sqlite::SqliteStore;

// Each request allocates and frees many small buffers on whichever worker runs it; glibc's
// malloc spent a sixth of a loaded instance's CPU there (benches/http_load.sh under perf).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Runs real-time avatar sessions: start, end, automatic termination, resource release.
#[derive(Parser, Debug)]
#[command(name = "sessiond", version, about, args_override_self = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    /// Address to listen on.
    #[arg(long, env = "SESSIOND_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,

    /// Where sessions are stored: a SQLite file path, or a postgres:// URL for several
    /// instances sharing one database.
    #[arg(long, env = "SESSIOND_DATABASE", default_value = "./sessiond.db")]
    database: String,

    /// This node's identity: it runs the sessions started here and alone releases their
    /// resources. Unique per instance sharing a database, and kept across restarts so a
    /// returning node settles what it owes. Default: `local` on SQLite (one machine), host
    /// name and listen port on PostgreSQL.
    #[arg(long, env = "SESSIOND_NODE_ID")]
    node_id: Option<String>,

    /// Command line of the avatar server started for each session (split on whitespace;
    /// it gets SESSION_LIFECYCLE_SESSION_ID in its environment). None: no process.
    #[arg(long, env = "SESSIOND_AVATAR_COMMAND")]
    avatar_command: Option<String>,

    /// Milliseconds an avatar server may take to report `READY=1` on its `NOTIFY_SOCKET`
    /// (the systemd notify protocol) before its session ends `start_failed`; a tenant may
    /// set its own (`avatar_ready_timeout_ms`). None: no limit (sessions whose server never
    /// reports are never `ready`).
    #[arg(long, env = "SESSIOND_AVATAR_READY_TIMEOUT_MS")]
    avatar_ready_timeout_ms: Option<u64>,

    /// Seconds between SIGTERM and SIGKILL when stopping an avatar server.
    #[arg(long, env = "SESSIOND_AVATAR_GRACE_SECS", default_value_t = 10)]
    avatar_grace_secs: u64,

    /// Where each avatar server gets a cgroup v2 of its own (stopped as one unit with
    /// `cgroup.kill`): `auto` finds this process's own cgroup in the mount table, a path
    /// names the subtree to use (as systemd's `Delegate=` or a container hands one over),
    /// `off` uses process groups. Without a writable cgroup v2 it falls back to process
    /// groups and says so once.
    #[arg(long, env = "SESSIOND_CGROUP_ROOT", default_value = "auto")]
    cgroup_root: String,

    /// The longest one release may take, per backend (`process=30000`,
    /// `gpu-assignment=20000`, in ms; repeat the flag or separate with commas). Past it the
    /// attempt counts as failed and is retried, while the resource stays held. Default:
    /// each backend's own bound (process: grace + 20 s; GPU: its timeouts + 5 s).
    #[arg(long, env = "SESSIOND_RELEASE_DEADLINE_MS", value_delimiter = ',')]
    release_deadline_ms: Vec<String>,

    /// GPU shares for avatar servers (NVML): `auto` uses the GPUs if there are any and
    /// runs without GPU resources otherwise (saying so once); `off` never looks.
    #[arg(long, env = "SESSIOND_GPU", value_enum, default_value_t = GpuMode::Auto)]
    gpu: GpuMode,

    /// GPU memory of a session that does not ask for an amount (`gpu_memory_mib`), MiB.
    #[arg(long, env = "SESSIOND_GPU_MEMORY_MIB", default_value_t = 2048)]
    gpu_memory_mib: u64,

    /// How long ending waits for a session's processes to free their GPU memory before it
    /// kills them, ms.
    #[arg(long, env = "SESSIOND_GPU_RELEASE_TIMEOUT_MS", default_value_t = 5000)]
    gpu_release_timeout_ms: u64,

    /// Tenants file (TOML): [[tenants]] with name, api_key_sha256,
    /// max_concurrent_sessions, max_session_secs (and optional revoked = true).
    #[arg(long, env = "SESSIOND_TENANTS", conflicts_with = "api_key")]
    tenants: Option<PathBuf>,

    /// Single-tenant shortcut for development: this key serves tenant `default` (and,
    /// without --operator-key, is the operator key of the live page too).
    #[arg(long, env = "SESSIOND_API_KEY")]
    api_key: Option<String>,

    /// An operator key: on the live page (`/ui`) and `GET /v1/overview` it sees every
    /// tenant and the nodes (a tenant key sees its own sessions). A tenants file can list
    /// them too (`operator_keys_sha256`).
    #[arg(long, env = "SESSIOND_OPERATOR_KEY")]
    operator_key: Option<String>,

    /// Plan of the `default` tenant (with --api-key or a generated key): most
    /// concurrent sessions.
    #[arg(long, env = "SESSIOND_MAX_CONCURRENT_SESSIONS", default_value_t = 100)]
    max_concurrent_sessions: u32,

    /// Request rate limit of every tenant without its own (`requests_per_second` in the
    /// tenants file), per second, for the whole cluster: each instance admits its share,
    /// split by the live nodes. 0: none.
    #[arg(long, env = "SESSIOND_REQUESTS_PER_SECOND", default_value_t = 0)]
    requests_per_second: u32,

    /// Requests a tenant may make at once after a quiet spell (default: one second's worth).
    #[arg(long, env = "SESSIOND_REQUEST_BURST")]
    request_burst: Option<u32>,

    /// Plan of the `default` tenant: longest session, in seconds.
    #[arg(long, env = "SESSIOND_MAX_SESSION_SECS", default_value_t = 3600)]
    max_session_secs: u64,

    /// Secret that signs client tokens; instances behind one load balancer share it.
    /// Default: random per process.
    #[arg(long, env = "SESSIOND_TOKEN_SECRET")]
    token_secret: Option<String>,

    /// Seconds without liveness after which a session is an orphan and ends.
    #[arg(long, env = "SESSIOND_ORPHAN_TIMEOUT_SECS", default_value_t = 60)]
    orphan_timeout_secs: u64,

    /// Seconds between safety sweeps of the store.
    #[arg(long, env = "SESSIOND_SWEEP_INTERVAL_SECS", default_value_t = 15)]
    sweep_interval_secs: u64,

    /// Milliseconds between this node's heartbeats in the store.
    #[arg(long, env = "SESSIOND_NODE_HEARTBEAT_MS", default_value_t = 5000)]
    node_heartbeat_ms: u64,

    /// Seconds without a heartbeat after which another instance declares a node dead, ends
    /// its sessions (`orphaned`) and records its resources as lost with it.
    #[arg(long, env = "SESSIOND_NODE_TIMEOUT_SECS", default_value_t = 30)]
    node_timeout_secs: u64,

    /// Milliseconds between looks for due releases, besides the store's notifications.
    #[arg(long, env = "SESSIOND_RELEASE_POLL_MS", default_value_t = 2000)]
    release_poll_ms: u64,

    /// Longest wait between retries of a failing release, in milliseconds.
    #[arg(long, env = "SESSIOND_RELEASE_BACKOFF_MAX_MS", default_value_t = 8000)]
    release_backoff_max_ms: u64,

    /// Milliseconds between WebSocket pings.
    #[arg(long, env = "SESSIOND_WS_PING_INTERVAL_MS", default_value_t = 5000)]
    ws_ping_interval_ms: u64,

    /// Milliseconds of WebSocket silence after which the socket is lost.
    #[arg(long, env = "SESSIOND_WS_PONG_TIMEOUT_MS", default_value_t = 15000)]
    ws_pong_timeout_ms: u64,

    /// Milliseconds to wait after a session's last WebSocket (on any instance) is gone
    /// before ending it; a session may set its own (`timeouts.websocket_grace_ms`).
    #[arg(long, env = "SESSIOND_WS_GRACE_MS", default_value_t = 0)]
    ws_grace_ms: u64,

    /// Largest API request body, in bytes.
    #[arg(long, env = "SESSIOND_MAX_BODY_BYTES", default_value_t = 16384)]
    max_body_bytes: usize,

    /// Largest room webhook body, in bytes (events carry room and participant metadata).
    #[arg(long, env = "SESSIOND_WEBHOOK_MAX_BODY_BYTES", default_value_t = 1 << 20)]
    webhook_max_body_bytes: usize,

    /// Longest a request may take, in seconds.
    #[arg(long, env = "SESSIOND_REQUEST_TIMEOUT_SECS", default_value_t = 30)]
    request_timeout_secs: u64,

    /// Most event streams (`GET /v1/events`) open at once; more get 503.
    #[arg(long, env = "SESSIOND_MAX_EVENT_STREAMS", default_value_t = 1024)]
    max_event_streams: usize,

    /// Most requests served at once; more get 503 at once.
    #[arg(long, env = "SESSIOND_MAX_IN_FLIGHT", default_value_t = 1024)]
    max_in_flight: usize,

    /// LiveKit API key whose webhooks may end sessions of any tenant (per-tenant keys go
    /// in the tenants file).
    #[arg(
        long,
        env = "SESSIOND_LIVEKIT_API_KEY",
        requires = "livekit_api_secret"
    )]
    livekit_api_key: Option<String>,

    /// LiveKit API secret of --livekit-api-key: it signs the webhooks' JWT.
    #[arg(
        long,
        env = "SESSIOND_LIVEKIT_API_SECRET",
        requires = "livekit_api_key"
    )]
    livekit_api_secret: Option<String>,

    /// Daily webhook secret (base64, as Daily gives it) for webhooks of any tenant.
    #[arg(long, env = "SESSIOND_DAILY_WEBHOOK_SECRET")]
    daily_webhook_secret: Option<String>,

    /// Participant identity of the avatar itself, which does not count as presence in a
    /// room (empty: count everyone).
    #[arg(long, env = "SESSIOND_ROOM_AVATAR_IDENTITY", default_value = "avatar")]
    room_avatar_identity: String,

    /// Milliseconds to wait after a room empties before ending its session; a session may
    /// set its own (`timeouts.participant_left_timeout_ms`).
    #[arg(long, env = "SESSIOND_ROOM_GRACE_MS", default_value_t = 0)]
    room_grace_ms: u64,

    /// Milliseconds a session bound to a room waits for a first participant before it ends
    /// `nobody_joined` (none by default: the orphan timeout applies); a session may set its
    /// own (`timeouts.participant_absent_timeout_ms`).
    #[arg(long, env = "SESSIOND_PARTICIPANT_ABSENT_MS")]
    participant_absent_ms: Option<u64>,

    /// Hours the room events and participants of an ended session are kept (for
    /// deduplicating late deliveries) before the sweep prunes them.
    #[arg(long, env = "SESSIOND_ROOM_RETENTION_HOURS", default_value_t = 24)]
    room_retention_hours: u64,

    /// Seconds a webhook signature's time may differ from ours.
    #[arg(long, env = "SESSIOND_WEBHOOK_TOLERANCE_SECS", default_value_t = 300)]
    webhook_tolerance_secs: u64,

    /// Outbound webhooks: allow plain `http://` to any host (default: HTTPS, or plain HTTP
    /// to loopback only).
    #[arg(long, env = "SESSIOND_WEBHOOK_ALLOW_HTTP")]
    webhook_allow_http: bool,

    /// Outbound webhooks: allow loopback addresses (127.0.0.0/8, ::1, localhost).
    #[arg(long, env = "SESSIOND_WEBHOOK_ALLOW_LOOPBACK")]
    webhook_allow_loopback: bool,

    /// Outbound webhooks: allow private, shared and link-local addresses (10/8, 172.16/12,
    /// 192.168/16, 100.64/10, 169.254/16 with cloud metadata services, fc00::/7, fe80::/10).
    #[arg(long, env = "SESSIOND_WEBHOOK_ALLOW_PRIVATE")]
    webhook_allow_private: bool,

    /// Outbound webhooks: seconds after an event during which failed deliveries are
    /// retried; then they are marked failed.
    #[arg(long, env = "SESSIOND_WEBHOOK_RETRY_SECS", default_value_t = 86400)]
    webhook_retry_secs: u64,

    /// Outbound webhooks: the wait after a first failed attempt, ms (doubling, jittered,
    /// up to an hour).
    #[arg(long, env = "SESSIOND_WEBHOOK_BACKOFF_MS", default_value_t = 1000)]
    webhook_backoff_ms: u64,

    /// Outbound webhooks: the longest an attempt may take, connection included, ms.
    #[arg(long, env = "SESSIOND_WEBHOOK_TIMEOUT_MS", default_value_t = 15000)]
    webhook_timeout_ms: u64,

    /// Hours events and finished webhook deliveries are kept (the event stream resumes
    /// within them).
    #[arg(long, env = "SESSIOND_EVENT_RETENTION_HOURS", default_value_t = 168)]
    event_retention_hours: u64,

    /// Outbound webhooks: attempts in flight at once per endpoint (scheme, host, port).
    #[arg(long, env = "SESSIOND_WEBHOOK_PER_ENDPOINT", default_value_t = 8)]
    webhook_per_endpoint: usize,

    /// Seconds to finish releases when shutting down.
    #[arg(long, env = "SESSIOND_SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    shutdown_grace_secs: u64,

    /// What SIGTERM (or SIGINT) does. `drain`: readiness answers 503 at once, creates
    /// answer 503 `draining`, running sessions continue until they end or
    /// --drain-timeout-secs passes, then the rest end `shutdown`. `handover`: for an
    /// in-place upgrade, exits leaving avatar servers running; the next start with the
    /// same --node-id takes them back. `end`: ends every session at once (`shutdown`). A
    /// second signal during a drain ends the rest at once.
    #[arg(long, env = "SESSIOND_SHUTDOWN_MODE", value_enum, default_value_t = ShutdownMode::Drain)]
    shutdown_mode: ShutdownMode,

    /// Longest a drain waits for running sessions to end by themselves, in seconds.
    #[arg(long, env = "SESSIOND_DRAIN_TIMEOUT_SECS", default_value_t = 1800)]
    drain_timeout_secs: u64,

    /// After the database comes back from an outage, milliseconds during which no session
    /// is judged silent (orphaned) and no node dead, so that live ones report again.
    /// Default: two --node-heartbeat-ms.
    #[arg(long, env = "SESSIOND_OUTAGE_SETTLE_MS")]
    outage_settle_ms: Option<u64>,

    /// Log format.
    #[arg(long, env = "SESSIOND_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain)]
    log_format: LogFormat,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Prints the hex SHA-256 of an API key, for a tenants file.
    HashKey {
        /// The key.
        key: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum GpuMode {
    Auto,
    Off,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ShutdownMode {
    Drain,
    Handover,
    End,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Plain,
    Json,
}

/// The one tenant `default` of development runs; its key is the operator key too unless
/// another is given.
fn single_tenant(key: &str, plan: Plan, operator: bool) -> Tenants {
    if operator {
        Tenants::single_operator("default", key, plan)
    } else {
        Tenants::single("default", key, plan)
    }
}

fn random_key() -> String {
    let mut bytes = [0u8; 24];
    getrandom::fill(&mut bytes).expect("the operating system's random generator failed");
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("sk_{hex}")
}

/// Where log lines go: stderr, through a buffer flushed every 100 ms (and when full, and
/// at exit), so that a request costs neither a write system call nor a thread wake-up for
/// its log line.
#[derive(Clone)]
struct LogSink(Arc<Mutex<BufWriter<std::io::Stderr>>>);

/// One log line being written into the buffer.
struct LogLine<'a>(MutexGuard<'a, BufWriter<std::io::Stderr>>);

impl Write for LogLine<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        // Flushed by the timer, not per line.
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogSink {
    type Writer = LogLine<'a>;
    fn make_writer(&'a self) -> LogLine<'a> {
        LogLine(self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl LogSink {
    fn flush(&self) {
        let _ = self.0.lock().unwrap_or_else(|p| p.into_inner()).flush();
    }
}

fn init_logging(format: LogFormat) -> LogSink {
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let sink = LogSink(Arc::new(Mutex::new(BufWriter::with_capacity(
        64 * 1024,
        std::io::stderr(),
    ))));
    let builder = tracing_subscriber::fmt()
        .with_writer(sink.clone())
        .with_target(false)
        .with_ansi(ansi);
    match format {
        LogFormat::Plain => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    sink
}

/// SIGTERM and SIGINT, caught from before the service says it listens: a signal at any
/// moment after that stops it gracefully, however early.
struct StopSignals {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
}

impl StopSignals {
    fn install() -> StopSignals {
        use tokio::signal::unix::{SignalKind, signal};
        StopSignals {
            term: signal(SignalKind::terminate()).ok(),
            int: signal(SignalKind::interrupt()).ok(),
        }
    }

    /// The next SIGTERM or SIGINT. Without handlers it waits for ever: the process still
    /// stops on signals, just not gracefully.
    async fn recv(&mut self) {
        match (&mut self.term, &mut self.int) {
            (Some(term), Some(int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => std::future::pending::<()>().await,
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::HashKey { key }) = &cli.command {
        println!("{}", hash_key(key));
        return ExitCode::SUCCESS;
    }
    let logs = init_logging(cli.log_format);
    let flusher = {
        let logs = logs.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                logs.flush();
            }
        })
    };
    let code = match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            tracing::error!("{message}");
            logs.flush();
            eprintln!("sessiond: {message}");
            ExitCode::FAILURE
        }
    };
    flusher.abort();
    logs.flush();
    code
}

async fn run(cli: Cli) -> Result<(), String> {
    let policy = Policy {
        orphan_timeout: Duration::from_secs(cli.orphan_timeout_secs),
        sweep_interval: Duration::from_secs(cli.sweep_interval_secs),
        release_backoff_max: Duration::from_millis(cli.release_backoff_max_ms),
        ..Policy::DEFAULT
    };
    policy
        .validate()
        .map_err(|e| format!("invalid timeouts: {e}"))?;
    if policy.orphan_cleanup_bound() > session_lifecycle::CONTRACT_ORPHAN_BOUND {
        tracing::warn!(
            bound_secs = policy.orphan_cleanup_bound().as_secs(),
            "these timeouts can leave an orphan for longer than the contract's 3 minutes"
        );
    }
    let default_plan = Plan::new(
        Some(cli.max_concurrent_sessions),
        Duration::from_secs(cli.max_session_secs.max(1)),
    );
    let (tenants, generated_key) = match (&cli.tenants, &cli.api_key) {
        (Some(path), _) => (Tenants::from_file(path).map_err(|e| e.to_string())?, None),
        (None, Some(key)) if !key.is_empty() => (
            single_tenant(key, default_plan, cli.operator_key.is_none()),
            None,
        ),
        (None, _) => {
            let key = random_key();
            (
                single_tenant(&key, default_plan, cli.operator_key.is_none()),
                Some(key),
            )
        }
    };
    let tenants = match cli.operator_key.as_deref() {
        Some("") => return Err("--operator-key is empty".to_owned()),
        Some(key) => tenants
            .with_operator_key(key)
            .map_err(|e| format!("--operator-key: {e}"))?,
        None => tenants,
    };
    let default_rate = match (cli.requests_per_second, cli.request_burst) {
        (_, Some(0)) => return Err("--request-burst must be positive".to_owned()),
        (0, Some(_)) => return Err("--request-burst needs --requests-per-second".to_owned()),
        (0, None) => None,
        (per_second, burst) => Some(session_lifecycle_http::limits::RateLimit {
            per_second,
            burst: burst.unwrap_or(per_second),
        }),
    };
    let tenants = tenants.with_default_rate(default_rate);
    let tokens = match &cli.token_secret {
        Some(secret) => TokenSigner::from_secret(secret),
        None => {
            let mut key = [0u8; 32];
            getrandom::fill(&mut key).map_err(|e| format!("random generator: {e}"))?;
            TokenSigner::new(key)
        }
    };

    let shared =
        cli.database.starts_with("postgres://") || cli.database.starts_with("postgresql://");
    // It names the node in the store, logs and metric labels.
    if cli
        .node_id
        .as_deref()
        .is_some_and(|id| id.is_empty() || id.len() > 128 || id.chars().any(char::is_control))
    {
        return Err("--node-id must have 1 to 128 bytes and no control characters".to_owned());
    }
    if cli.node_heartbeat_ms == 0 || cli.node_timeout_secs * 1000 <= 2 * cli.node_heartbeat_ms {
        return Err("--node-timeout-secs must exceed two --node-heartbeat-ms intervals".to_owned());
    }
    // Bound first: the default node id names the port actually bound (also for port 0).
    let listener = tokio::net::TcpListener::bind(cli.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", cli.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let store: Arc<dyn Store> = if shared {
        Arc::new(
            PostgresStore::connect(&cli.database)
                .await
                .map_err(|e| format!("connecting to PostgreSQL: {e}"))?,
        )
    } else {
        Arc::new(
            SqliteStore::open(&cli.database)
                .map_err(|e| format!("opening {}: {e}", cli.database))?,
        )
    };
    let node_id = cli.node_id.clone().unwrap_or_else(|| {
        if !shared {
            return "local".to_owned();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "localhost".to_owned());
        format!("{host}:{}", addr.port())
    });
    let mut backends: Vec<Arc<dyn ResourceBackend>> = Vec::new();
    // The GPU share comes first: its CUDA_VISIBLE_DEVICES reaches the avatar server, and
    // releases run in reverse, so the server stops before its share is checked and returned.
    if cli.gpu == GpuMode::Auto {
        match NvmlGpu::discover() {
            Ok(gpu) => {
                let devices = gpu.devices().map_err(|e| e.to_string())?;
                for d in &devices {
                    tracing::info!(index = d.index, name = %d.name, uuid = %d.uuid, total_mib = d.total >> 20, free_mib = d.free >> 20, "GPU");
                }
                backends.push(Arc::new(AssignmentBackend::new(
                    gpu,
                    AssignmentConfig {
                        default_memory: cli.gpu_memory_mib.max(1) << 20,
                        release_timeout: Duration::from_millis(cli.gpu_release_timeout_ms),
                        ..AssignmentConfig::default()
                    },
                )));
            }
            Err(e) => tracing::warn!("running without GPU resources: {e}"),
        }
    }
    if let Some(line) = &cli.avatar_command {
        let mut config =
            ProcessConfig::from_command_line(line).ok_or("--avatar-command is empty")?;
        config.grace = Duration::from_secs(cli.avatar_grace_secs);
        config.ready_timeout = cli
            .avatar_ready_timeout_ms
            .filter(|ms| *ms > 0)
            .map(Duration::from_millis);
        config.cgroups = match cli.cgroup_root.as_str() {
            "auto" => CgroupMode::Auto,
            "off" => CgroupMode::Off,
            path => CgroupMode::Root(PathBuf::from(path)),
        };
        let processes = ProcessBackend::new(config).map_err(|e| e.to_string())?;
        if processes.uses_cgroups() {
            tracing::info!("avatar servers run in a cgroup v2 each");
        }
        backends.push(Arc::new(processes));
    }
    let mut release_deadlines = Vec::new();
    for entry in &cli.release_deadline_ms {
        let parsed = entry.split_once('=').and_then(|(name, ms)| {
            let backend = backends.iter().find(|b| b.name() == name.trim())?;
            let ms = ms.trim().parse::<u64>().ok().filter(|ms| *ms > 0)?;
            Some((backend.kind(), Duration::from_millis(ms)))
        });
        let names: Vec<&str> = backends.iter().map(|b| b.name()).collect();
        release_deadlines.push(parsed.ok_or_else(|| {
            format!(
                "--release-deadline-ms {entry:?}: expected NAME=MS with NAME one of {names:?} and MS > 0"
            )
        })?);
    }
    let engine = Engine::open(
        store,
        backends,
        Arc::new(SystemClock),
        EngineConfig {
            policy,
            node: node_id.clone(),
            node_heartbeat: Duration::from_millis(cli.node_heartbeat_ms),
            node_timeout: Duration::from_secs(cli.node_timeout_secs),
            release_poll: Duration::from_millis(cli.release_poll_ms.max(1)),
            room_grace: Duration::from_millis(cli.room_grace_ms),
            participant_absent: cli.participant_absent_ms.map(Duration::from_millis),
            websocket_grace: Duration::from_millis(cli.ws_grace_ms),
            room_retention: Duration::from_secs(cli.room_retention_hours.saturating_mul(3600)),
            release_deadlines,
            outage_settle: Duration::from_millis(
                cli.outage_settle_ms.unwrap_or(2 * cli.node_heartbeat_ms),
            ),
            ..EngineConfig::default()
        },
    )
    .await
    .map_err(|e| format!("starting the engine: {e}"))?;
    let background = engine.spawn_background();
    let (mut livekit, mut daily) = tenants.webhook_secrets();
    if let (Some(api_key), Some(api_secret)) = (&cli.livekit_api_key, &cli.livekit_api_secret) {
        livekit.push(LivekitKey {
            tenant: None,
            api_key: api_key.clone(),
            api_secret: api_secret.clone(),
        });
    }
    if let Some(secret) = &cli.daily_webhook_secret {
        daily.push(DailySecret {
            tenant: None,
            secret: secret.clone(),
        });
    }
    let addresses = AddressPolicy {
        allow_http: cli.webhook_allow_http,
        allow_loopback: cli.webhook_allow_loopback,
        allow_private: cli.webhook_allow_private,
    };
    let webhooks = WebhookConfig {
        livekit,
        daily,
        avatar_identity: Some(cli.room_avatar_identity.clone()).filter(|s| !s.is_empty()),
        tolerance: Duration::from_secs(cli.webhook_tolerance_secs),
    };
    let state = AppState::with_webhooks(
        engine.clone(),
        tenants,
        tokens,
        HttpConfig {
            max_body_bytes: cli.max_body_bytes,
            request_timeout: Duration::from_secs(cli.request_timeout_secs),
            max_in_flight: cli.max_in_flight.max(1),
            ws_ping_interval: Duration::from_millis(cli.ws_ping_interval_ms.max(1)),
            ws_pong_timeout: Duration::from_millis(cli.ws_pong_timeout_ms.max(1)),
            webhook_max_body_bytes: cli.webhook_max_body_bytes,
            webhook_addresses: addresses,
            max_event_streams: cli.max_event_streams.max(1),
        },
        webhooks,
    );
    // Each limit is shared by the live nodes, looked at as often as heartbeats are written;
    // a node that reported it stopped (a deploy replaced it) serves no request and takes no
    // share, though its last heartbeat is still recent.
    {
        let (engine, limits) = (engine.clone(), Arc::clone(state.tenants.rate_limits()));
        let (every, node_timeout) = (
            Duration::from_millis(cli.node_heartbeat_ms),
            Duration::from_secs(cli.node_timeout_secs),
        );
        tokio::spawn(async move {
            loop {
                if let Ok(nodes) = engine.cluster_nodes(node_timeout).await {
                    // This node counts while it serves, whatever its row says.
                    let others = nodes.iter().filter(|n| {
                        n.node != engine.node()
                            && n.alive
                            && !n.last_report().is_some_and(|r| r.stopped)
                    });
                    limits.set_nodes(u32::try_from(others.count() + 1).unwrap_or(u32::MAX));
                }
                tokio::time::sleep(every).await;
            }
        });
    }
    let outbound = Outbound::new(
        engine.clone(),
        state.tenants.clone(),
        OutboundConfig {
            addresses,
            policy: DeliveryPolicy {
                backoff_initial: Duration::from_millis(cli.webhook_backoff_ms.max(1)),
                backoff_max: Duration::from_secs(3600)
                    .max(Duration::from_millis(cli.webhook_backoff_ms)),
                retry_for: Duration::from_secs(cli.webhook_retry_secs),
            },
            timeout: Duration::from_millis(cli.webhook_timeout_ms.max(1)),
            connect_timeout: Duration::from_millis(cli.webhook_timeout_ms.clamp(1, 5000)),
            per_endpoint: cli.webhook_per_endpoint.max(1),
            retention: Duration::from_secs(cli.event_retention_hours.max(1).saturating_mul(3600)),
            ..OutboundConfig::new(&node_id)
        },
    )
    .map_err(|e| e.to_string())?;
    let _ = state.outbound.set(Arc::clone(&outbound));
    let (stop_outbound, outbound_stop) = tokio::sync::watch::channel(false);
    let outbound_task = tokio::spawn(outbound.run(outbound_stop));
    // Events of sessions ended at shutdown are in the store; whatever this instance does
    // not deliver before it exits, another instance (or its next start) does.
    let stop_delivering = move || async move {
        let _ = stop_outbound.send(true);
        let _ = outbound_task.await;
    };
    let mut signals = StopSignals::install();
    println!(
        "sessiond listening on http://{addr} (database {}, node {node_id})",
        cli.database
    );
    if let Some(key) = &generated_key {
        println!("API key (tenant \"default\", shown once): {key}");
        println!("Try: curl -s -X POST http://{addr}/v1/sessions -H 'x-api-key: {key}'");
        println!("Live page: http://{addr}/ui#key={key}");
    }
    tracing::info!(%addr, "serving");

    let app = router(Arc::clone(&state));
    let (stop_serving, serving_stopped) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = serving_stopped.await;
            })
            .await
    });
    let stopped = tokio::select! {
        r = &mut server => Some(r),
        _ = signals.recv() => None,
    };
    if let Some(r) = stopped {
        return r
            .map_err(|e| format!("server task: {e}"))?
            .map_err(|e| format!("server error: {e}"));
    }
    let grace = Duration::from_secs(cli.shutdown_grace_secs);
    let ended = match cli.shutdown_mode {
        ShutdownMode::Handover => {
            tracing::info!("handing over: exiting with avatar servers left running");
            engine.drain();
            let _ = state.shutdown.send(true);
            let _ = stop_serving.send(());
            let _ = server.await;
            engine.handover().await;
            stop_delivering().await;
            background.join().await;
            return Ok(());
        }
        ShutdownMode::Drain => {
            engine.drain();
            let timeout = Duration::from_secs(cli.drain_timeout_secs);
            let drained = tokio::select! {
                drained = engine.wait_drained(timeout) => drained,
                _ = signals.recv() => false,
            };
            if !drained {
                tracing::warn!(
                    sessions = engine.active_sessions(),
                    "drain over: ending the sessions left (shutdown)"
                );
            }
            let _ = state.shutdown.send(true);
            let ended = engine
                .shutdown(grace)
                .await
                .map_err(|e| format!("shutdown: {e}"))?;
            let _ = stop_serving.send(());
            let _ = server.await;
            ended
        }
        ShutdownMode::End => {
            tracing::info!("shutting down: ending this node's sessions");
            let _ = stop_serving.send(());
            let _ = server.await;
            let _ = state.shutdown.send(true);
            engine
                .shutdown(grace)
                .await
                .map_err(|e| format!("shutdown: {e}"))?
        }
    };
    stop_delivering().await;
    background.join().await;
    tracing::info!(ended, "stopped");
    Ok(())
}
