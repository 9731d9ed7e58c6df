//! The command line: every flag, each also read from `SESSIOND_<NAME>`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// Runs real-time avatar sessions: start, end, automatic termination, resource release.
#[derive(Parser, Debug)]
#[command(name = "sessiond", version, about, args_override_self = true)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Option<Command>,

    /// Address to listen on.
    #[arg(long, env = "SESSIOND_LISTEN", default_value = "127.0.0.1:8080")]
    pub(crate) listen: SocketAddr,

    /// Where sessions are stored: a SQLite file path, or a postgres:// URL for several
    /// instances sharing one database.
    #[arg(
        long,
        env = "SESSIOND_DATABASE",
        default_value = "./sessiond.db",
        global = true
    )]
    pub(crate) database: String,

    /// This node's identity: it runs the sessions started here and alone releases their
    /// resources. Unique per instance sharing a database, and kept across restarts so a
    /// returning node settles what it owes. Default: `local` on SQLite (one machine), host
    /// name and listen port on PostgreSQL.
    #[arg(long, env = "SESSIOND_NODE_ID")]
    pub(crate) node_id: Option<String>,

    /// Command line of the avatar server started for each session (split on whitespace;
    /// it gets SESSION_LIFECYCLE_SESSION_ID in its environment). None: no process.
    #[arg(long, env = "SESSIOND_AVATAR_COMMAND")]
    pub(crate) avatar_command: Option<String>,

    /// Milliseconds an avatar server may take to report `READY=1` on its `NOTIFY_SOCKET`
    /// (the systemd notify protocol) before its session ends `start_failed`; a tenant may
    /// set its own (`avatar_ready_timeout_ms`). None: no limit (sessions whose server never
    /// reports are never `ready`).
    #[arg(long, env = "SESSIOND_AVATAR_READY_TIMEOUT_MS")]
    pub(crate) avatar_ready_timeout_ms: Option<u64>,

    /// Seconds between SIGTERM and SIGKILL when stopping an avatar server.
    #[arg(long, env = "SESSIOND_AVATAR_GRACE_SECS", default_value_t = 10)]
    pub(crate) avatar_grace_secs: u64,

    /// Where each avatar server gets a cgroup v2 of its own (stopped as one unit with
    /// `cgroup.kill`): `auto` finds this process's own cgroup in the mount table, a path
    /// names the subtree to use (as systemd's `Delegate=` or a container hands one over),
    /// `off` uses process groups. Without a writable cgroup v2 it falls back to process
    /// groups and says so once.
    #[arg(long, env = "SESSIOND_CGROUP_ROOT", default_value = "auto")]
    pub(crate) cgroup_root: String,

    /// The longest one release may take, per backend (`process=30000`,
    /// `gpu-assignment=20000`, in ms; repeat the flag or separate with commas). Past it the
    /// attempt counts as failed and is retried, while the resource stays held. Default:
    /// each backend's own bound (process: grace + 20 s; GPU: its timeouts + 5 s).
    #[arg(long, env = "SESSIOND_RELEASE_DEADLINE_MS", value_delimiter = ',')]
    pub(crate) release_deadline_ms: Vec<String>,

    /// GPU shares for avatar servers (NVML): `auto` uses the GPUs if there are any and
    /// runs without GPU resources otherwise (saying so once); `off` never looks.
    #[arg(long, env = "SESSIOND_GPU", value_enum, default_value_t = GpuMode::Auto)]
    pub(crate) gpu: GpuMode,

    /// GPU memory of a session that does not ask for an amount (`gpu_memory_mib`), MiB.
    #[arg(long, env = "SESSIOND_GPU_MEMORY_MIB", default_value_t = 2048)]
    pub(crate) gpu_memory_mib: u64,

    /// How long ending waits for a session's processes to free their GPU memory before it
    /// kills them, ms.
    #[arg(long, env = "SESSIOND_GPU_RELEASE_TIMEOUT_MS", default_value_t = 5000)]
    pub(crate) gpu_release_timeout_ms: u64,

    /// Tenants file (TOML): [[tenants]] with name, api_key_sha256,
    /// max_concurrent_sessions, max_session_secs (and optional revoked = true).
    #[arg(long, env = "SESSIOND_TENANTS", conflicts_with = "api_key")]
    pub(crate) tenants: Option<PathBuf>,

    /// Single-tenant shortcut for development: this key serves tenant `default` (and,
    /// without --operator-key, is the operator key of the live page too).
    #[arg(long, env = "SESSIOND_API_KEY")]
    pub(crate) api_key: Option<String>,

    /// An operator key: on the live page (`/ui`) and `GET /v1/overview` it sees every
    /// tenant and the nodes (a tenant key sees its own sessions). A tenants file can list
    /// them too (`operator_keys_sha256`).
    #[arg(long, env = "SESSIOND_OPERATOR_KEY")]
    pub(crate) operator_key: Option<String>,

    /// Plan of the `default` tenant (with --api-key or a generated key): most
    /// concurrent sessions.
    #[arg(long, env = "SESSIOND_MAX_CONCURRENT_SESSIONS", default_value_t = 100)]
    pub(crate) max_concurrent_sessions: u32,

    /// Request rate limit of every tenant without its own (`requests_per_second` in the
    /// tenants file), per second, for the whole cluster: each instance admits its share,
    /// split by the live nodes. 0: none.
    #[arg(long, env = "SESSIOND_REQUESTS_PER_SECOND", default_value_t = 0)]
    pub(crate) requests_per_second: u32,

    /// Requests a tenant may make at once after a quiet spell (default: one second's worth).
    #[arg(long, env = "SESSIOND_REQUEST_BURST")]
    pub(crate) request_burst: Option<u32>,

    /// Plan of the `default` tenant: longest session, in seconds.
    #[arg(long, env = "SESSIOND_MAX_SESSION_SECS", default_value_t = 3600)]
    pub(crate) max_session_secs: u64,

    /// Secret that signs client tokens; instances behind one load balancer share it.
    /// Default: random per process.
    #[arg(long, env = "SESSIOND_TOKEN_SECRET")]
    pub(crate) token_secret: Option<String>,

    /// Seconds without liveness after which a session is an orphan and ends.
    #[arg(long, env = "SESSIOND_ORPHAN_TIMEOUT_SECS", default_value_t = 60)]
    pub(crate) orphan_timeout_secs: u64,

    /// Seconds between safety sweeps of the store.
    #[arg(long, env = "SESSIOND_SWEEP_INTERVAL_SECS", default_value_t = 15)]
    pub(crate) sweep_interval_secs: u64,

    /// Milliseconds between this node's heartbeats in the store.
    #[arg(long, env = "SESSIOND_NODE_HEARTBEAT_MS", default_value_t = 5000)]
    pub(crate) node_heartbeat_ms: u64,

    /// Seconds without a heartbeat after which another instance declares a node dead, ends
    /// its sessions (`node_lost`) and records its resources as lost with it.
    #[arg(long, env = "SESSIOND_NODE_TIMEOUT_SECS", default_value_t = 30)]
    pub(crate) node_timeout_secs: u64,

    /// The most started sessions this node runs at once (its session slots); none by
    /// default. Full, a create answers 503 `capacity_exhausted`, or, with a PostgreSQL
    /// store shared by a fleet, its session goes to a node with a free slot.
    #[arg(long, env = "SESSIOND_MAX_NODE_SESSIONS")]
    pub(crate) max_node_sessions: Option<u32>,

    /// How a create on a fleet sharing PostgreSQL chooses the node of its session among
    /// those with room: `spread` (the largest free fraction of slots and GPU memory) or
    /// `pack` (the smallest that still has room).
    #[arg(long, env = "SESSIOND_PLACEMENT", value_enum, default_value_t = PlacementMode::Spread)]
    pub(crate) placement: PlacementMode,

    /// Seconds a create placed on another node waits for that node to start the session
    /// before it ends it `start_failed` and answers so.
    #[arg(long, env = "SESSIOND_PLACEMENT_WAIT_SECS", default_value_t = 20)]
    pub(crate) placement_wait_secs: u64,

    /// Seconds in a usage period: every started session gets a usage record per closed
    /// period, so that a bill can be cut while it runs. Periods count from the epoch; a
    /// divisor of 3600 (60, 300, 900, 3600...) so that every record falls in one hour.
    #[arg(long, env = "SESSIOND_USAGE_PERIOD_SECS", default_value_t = 300)]
    pub(crate) usage_period_secs: u64,

    /// Milliseconds between looks for due releases, besides the store's notifications.
    #[arg(long, env = "SESSIOND_RELEASE_POLL_MS", default_value_t = 2000)]
    pub(crate) release_poll_ms: u64,

    /// Longest wait between retries of a failing release, in milliseconds.
    #[arg(long, env = "SESSIOND_RELEASE_BACKOFF_MAX_MS", default_value_t = 8000)]
    pub(crate) release_backoff_max_ms: u64,

    /// Milliseconds between WebSocket pings.
    #[arg(long, env = "SESSIOND_WS_PING_INTERVAL_MS", default_value_t = 5000)]
    pub(crate) ws_ping_interval_ms: u64,

    /// Milliseconds of WebSocket silence after which the socket is lost.
    #[arg(long, env = "SESSIOND_WS_PONG_TIMEOUT_MS", default_value_t = 15000)]
    pub(crate) ws_pong_timeout_ms: u64,

    /// Milliseconds to wait after a session's last WebSocket (on any instance) is gone
    /// before ending it; a session may set its own (`timeouts.websocket_grace_ms`).
    #[arg(long, env = "SESSIOND_WS_GRACE_MS", default_value_t = 0)]
    pub(crate) ws_grace_ms: u64,

    /// Largest API request body, in bytes.
    #[arg(long, env = "SESSIOND_MAX_BODY_BYTES", default_value_t = 16384)]
    pub(crate) max_body_bytes: usize,

    /// Largest room webhook body, in bytes (events carry room and participant metadata).
    #[arg(long, env = "SESSIOND_WEBHOOK_MAX_BODY_BYTES", default_value_t = 1 << 20)]
    pub(crate) webhook_max_body_bytes: usize,

    /// Longest a request may take, in seconds.
    #[arg(long, env = "SESSIOND_REQUEST_TIMEOUT_SECS", default_value_t = 30)]
    pub(crate) request_timeout_secs: u64,

    /// Most event streams (`GET /v1/events`) open at once; more get 503.
    #[arg(long, env = "SESSIOND_MAX_EVENT_STREAMS", default_value_t = 1024)]
    pub(crate) max_event_streams: usize,

    /// Most requests served at once; more get 503 at once.
    #[arg(long, env = "SESSIOND_MAX_IN_FLIGHT", default_value_t = 1024)]
    pub(crate) max_in_flight: usize,

    /// LiveKit API key whose webhooks may end sessions of any tenant (per-tenant keys go
    /// in the tenants file).
    #[arg(
        long,
        env = "SESSIOND_LIVEKIT_API_KEY",
        requires = "livekit_api_secret"
    )]
    pub(crate) livekit_api_key: Option<String>,

    /// LiveKit API secret of --livekit-api-key: it signs the webhooks' JWT.
    #[arg(
        long,
        env = "SESSIOND_LIVEKIT_API_SECRET",
        requires = "livekit_api_key"
    )]
    pub(crate) livekit_api_secret: Option<String>,

    /// Daily webhook secret (base64, as Daily gives it) for webhooks of any tenant.
    #[arg(long, env = "SESSIOND_DAILY_WEBHOOK_SECRET")]
    pub(crate) daily_webhook_secret: Option<String>,

    /// Participant identity of the avatar itself, which does not count as presence in a
    /// room (empty: count everyone).
    #[arg(long, env = "SESSIOND_ROOM_AVATAR_IDENTITY", default_value = "avatar")]
    pub(crate) room_avatar_identity: String,

    /// Milliseconds to wait after a room empties before ending its session; a session may
    /// set its own (`timeouts.participant_left_timeout_ms`).
    #[arg(long, env = "SESSIOND_ROOM_GRACE_MS", default_value_t = 0)]
    pub(crate) room_grace_ms: u64,

    /// Milliseconds a session bound to a room waits for a first participant before it ends
    /// `nobody_joined` (none by default: the orphan timeout applies); a session may set its
    /// own (`timeouts.participant_absent_timeout_ms`).
    #[arg(long, env = "SESSIOND_PARTICIPANT_ABSENT_MS")]
    pub(crate) participant_absent_ms: Option<u64>,

    /// Hours the room events and participants of an ended session are kept (for
    /// deduplicating late deliveries) before the sweep prunes them.
    #[arg(long, env = "SESSIOND_ROOM_RETENTION_HOURS", default_value_t = 24)]
    pub(crate) room_retention_hours: u64,

    /// Seconds a webhook signature's time may differ from ours.
    #[arg(long, env = "SESSIOND_WEBHOOK_TOLERANCE_SECS", default_value_t = 300)]
    pub(crate) webhook_tolerance_secs: u64,

    /// Outbound webhooks: allow plain `http://` to any host (default: HTTPS, or plain HTTP
    /// to loopback only).
    #[arg(long, env = "SESSIOND_WEBHOOK_ALLOW_HTTP")]
    pub(crate) webhook_allow_http: bool,

    /// Outbound webhooks: allow loopback addresses (127.0.0.0/8, ::1, localhost).
    #[arg(long, env = "SESSIOND_WEBHOOK_ALLOW_LOOPBACK")]
    pub(crate) webhook_allow_loopback: bool,

    /// Outbound webhooks: allow private, shared and link-local addresses (10/8, 172.16/12,
    /// 192.168/16, 100.64/10, 169.254/16 with cloud metadata services, fc00::/7, fe80::/10).
    #[arg(long, env = "SESSIOND_WEBHOOK_ALLOW_PRIVATE")]
    pub(crate) webhook_allow_private: bool,

    /// Outbound webhooks: seconds after an event during which failed deliveries are
    /// retried; then they are marked failed.
    #[arg(long, env = "SESSIOND_WEBHOOK_RETRY_SECS", default_value_t = 86400)]
    pub(crate) webhook_retry_secs: u64,

    /// Outbound webhooks: the wait after a first failed attempt, ms (doubling, jittered,
    /// up to an hour).
    #[arg(long, env = "SESSIOND_WEBHOOK_BACKOFF_MS", default_value_t = 1000)]
    pub(crate) webhook_backoff_ms: u64,

    /// Outbound webhooks: the longest an attempt may take, connection included, ms.
    #[arg(long, env = "SESSIOND_WEBHOOK_TIMEOUT_MS", default_value_t = 15000)]
    pub(crate) webhook_timeout_ms: u64,

    /// Hours events and finished webhook deliveries are kept (the event stream resumes
    /// within them).
    #[arg(long, env = "SESSIOND_EVENT_RETENTION_HOURS", default_value_t = 168)]
    pub(crate) event_retention_hours: u64,

    /// Outbound webhooks: attempts in flight at once per endpoint (scheme, host, port).
    #[arg(long, env = "SESSIOND_WEBHOOK_PER_ENDPOINT", default_value_t = 8)]
    pub(crate) webhook_per_endpoint: usize,

    /// Seconds to finish releases when shutting down.
    #[arg(long, env = "SESSIOND_SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    pub(crate) shutdown_grace_secs: u64,

    /// What SIGTERM (or SIGINT) does. `drain`: readiness answers 503 at once, creates
    /// answer 503 `draining`, running sessions continue until they end or
    /// --drain-timeout-secs passes, then the rest end `shutdown`. `handover`: for an
    /// in-place upgrade, exits leaving avatar servers running; the next start with the
    /// same --node-id takes them back. `end`: ends every session at once (`shutdown`). A
    /// second signal during a drain ends the rest at once.
    #[arg(long, env = "SESSIOND_SHUTDOWN_MODE", value_enum, default_value_t = ShutdownMode::Drain)]
    pub(crate) shutdown_mode: ShutdownMode,

    /// Longest a drain waits for running sessions to end by themselves, in seconds.
    #[arg(long, env = "SESSIOND_DRAIN_TIMEOUT_SECS", default_value_t = 1800)]
    pub(crate) drain_timeout_secs: u64,

    /// After the database comes back from an outage, milliseconds during which no session
    /// is judged silent (orphaned) and no node dead, so that live ones report again.
    /// Default: two --node-heartbeat-ms.
    #[arg(long, env = "SESSIOND_OUTAGE_SETTLE_MS")]
    pub(crate) outage_settle_ms: Option<u64>,

    /// Log format.
    #[arg(long, env = "SESSIOND_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain)]
    pub(crate) log_format: LogFormat,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// Prints the hex SHA-256 of an API key, for a tenants file.
    HashKey {
        /// The key.
        key: String,
    },
    /// Usage records (`--database` names the store).
    Usage {
        #[command(subcommand)]
        action: UsageCommand,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum UsageCommand {
    /// Recomputes the usage of every session whose life overlaps the range from its
    /// session record, and reports every difference against the recorded usage (exit
    /// status 1 when there is any).
    Reconcile {
        /// Where the range starts (included), RFC 3339.
        #[arg(long)]
        from: String,
        /// Where it ends (excluded), RFC 3339.
        #[arg(long)]
        to: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum GpuMode {
    Auto,
    Off,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum PlacementMode {
    Spread,
    Pack,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum ShutdownMode {
    Drain,
    Handover,
    End,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub(crate) enum LogFormat {
    Plain,
    Json,
}
