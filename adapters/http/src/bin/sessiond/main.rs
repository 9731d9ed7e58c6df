//! `sessiond`: serves the session API on an embedded SQLite file, with no setup.
//!
//! `cargo run --release --bin sessiond` prints its address, a generated API key and a
//! curl line that works as pasted. `sessiond --help` lists every flag; each also reads an
//! environment variable `SESSIOND_<NAME>`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
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
use session_lifecycle_runtime::{
    Engine, EngineConfig, PlacementPolicy, Plan, ResourceBackend, Store, SystemClock,
};
use session_lifecycle_sqlite::SqliteStore;

mod cli;
mod logging;
mod reconcile;

use cli::{Cli, Command, GpuMode, ShutdownMode};
use logging::init_logging;

// Each request allocates and frees many small buffers on whichever worker runs it; glibc's
// malloc spent a sixth of a loaded instance's CPU there (benches/http_load.sh under perf).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    if let Some(Command::Usage {
        action: cli::UsageCommand::Reconcile { from, to },
    }) = &cli.command
    {
        return reconcile::run(&cli.database, from, to).await;
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

/// Whether `database` names a PostgreSQL database (else a SQLite file).
fn is_shared(database: &str) -> bool {
    database.starts_with("postgres://") || database.starts_with("postgresql://")
}

/// The store `database` names: PostgreSQL for a `postgres://` URL, else a SQLite file.
async fn open_store(database: &str) -> Result<Arc<dyn Store>, String> {
    Ok(if is_shared(database) {
        Arc::new(
            PostgresStore::connect(database)
                .await
                .map_err(|e| format!("connecting to PostgreSQL: {e}"))?,
        )
    } else {
        Arc::new(SqliteStore::open(database).map_err(|e| format!("opening {database}: {e}"))?)
    })
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

    let shared = is_shared(&cli.database);
    // It names the node in the store, logs and metric labels.
    if cli
        .node_id
        .as_deref()
        .is_some_and(|id| id.is_empty() || id.len() > 128 || id.chars().any(char::is_control))
    {
        return Err("--node-id must have 1 to 128 bytes and no control characters".to_owned());
    }
    if cli.usage_period_secs == 0 || 3600 % cli.usage_period_secs != 0 {
        return Err("--usage-period-secs must divide 3600 (60, 300, 900, 3600...)".to_owned());
    }
    if cli.node_heartbeat_ms == 0 || cli.node_timeout_secs * 1000 <= 2 * cli.node_heartbeat_ms {
        return Err("--node-timeout-secs must exceed two --node-heartbeat-ms intervals".to_owned());
    }
    // Bound first: the default node id names the port actually bound (also for port 0).
    let listener = tokio::net::TcpListener::bind(cli.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", cli.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let store = open_store(&cli.database).await?;
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
            max_node_sessions: cli.max_node_sessions,
            placement: match cli.placement {
                cli::PlacementMode::Spread => PlacementPolicy::Spread,
                cli::PlacementMode::Pack => PlacementPolicy::Pack,
            },
            placement_wait: Duration::from_secs(cli.placement_wait_secs),
            usage_period: Duration::from_secs(cli.usage_period_secs),
            // Well within the node timeout, and longer than a claim by poll (release poll).
            placement_claim_timeout: (Duration::from_secs(cli.node_timeout_secs) / 4)
                .clamp(Duration::from_secs(1), Duration::from_secs(5)),
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
        session_lifecycle_http::serve(listener, app, async move {
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
