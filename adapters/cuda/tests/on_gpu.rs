//! On a real NVIDIA GPU: in-process reservations, avatar servers holding GPU memory started
//! by sessions and stopped by end, and an avatar server that ignores SIGTERM. Each test says
//! it was skipped where NVML finds no GPU (`SESSION_LIFECYCLE_REQUIRE_GPU=1` makes that a
//! failure). Figures are printed as `GPU-RESULT` lines; `adapters/cuda/device-check.sh`
//! runs these tests on a GPU machine and keeps them.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use session_lifecycle::EndReason;
use session_lifecycle_cuda::{
    AssignmentBackend, AssignmentConfig, GpuInfo, NvmlGpu, ReservationBackend,
};
use session_lifecycle_process::{ProcessBackend, ProcessConfig};
use session_lifecycle_runtime::{
    AcquireRequest, Engine, EngineConfig, EventSink, Plan, ResourceBackend, ResourceRequest,
    StartRequest, SystemClock,
};
use session_lifecycle_sqlite::SqliteStore;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn gpu() -> Option<Arc<NvmlGpu>> {
    match NvmlGpu::discover() {
        Ok(gpu) => Some(gpu),
        Err(e) => {
            assert!(
                std::env::var("SESSION_LIFECYCLE_REQUIRE_GPU").as_deref() != Ok("1"),
                "SESSION_LIFECYCLE_REQUIRE_GPU=1 but there is no usable GPU: {e}"
            );
            eprintln!("skipped: no NVIDIA GPU ({e})");
            None
        }
    }
}

/// The fixture binary: `GPU_FIXTURE` where the tests were copied elsewhere, else the one
/// cargo built next to these tests.
fn fixture() -> String {
    std::env::var("GPU_FIXTURE").unwrap_or_else(|_| env!("CARGO_BIN_EXE_gpu-fixture").to_owned())
}

/// Device memory in use on every GPU, bytes.
fn used(gpu: &NvmlGpu) -> u64 {
    gpu.devices()
        .unwrap()
        .iter()
        .map(|d| d.total - d.free)
        .sum()
}

fn request(gpu_memory: u64) -> StartRequest {
    StartRequest {
        callback_url: None,
        tenant: "gpu".into(),
        plan: Plan::new(None, Duration::from_secs(3600)),
        duration: None,
        metadata: None,
        room: None,
        timeouts: Default::default(),
        resources: ResourceRequest {
            gpu_memory: Some(gpu_memory),
            gpu_device: None,
            ready_timeout: None,
        },
    }
}

async fn engine(backends: Vec<Arc<dyn ResourceBackend>>, dir: &tempfile::TempDir) -> Engine {
    let store = SqliteStore::open(dir.path().join("gpu.db")).unwrap();
    Engine::open(
        Arc::new(store),
        backends,
        Arc::new(SystemClock),
        EngineConfig::default(),
    )
    .await
    .unwrap()
}

fn device_name(gpu: &NvmlGpu) -> String {
    gpu.devices().unwrap()[0].name.clone()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thirty_two_sessions_reserving_2_gib_give_it_all_back() {
    let Some(gpu) = gpu() else { return };
    let backend = Arc::new(ReservationBackend::new(gpu.clone(), 2 * GIB).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(vec![backend.clone()], &dir).await;
    // After the contexts exist: they stay for the life of the process.
    let before = used(&gpu);
    let mut ids = Vec::new();
    for _ in 0..32 {
        ids.push(*engine.start(request(2 * GIB)).await.unwrap().session.id());
    }
    let during = used(&gpu);
    assert!(
        during >= before + 64 * GIB - 64 * MIB,
        "NVML shows the reservations: before {before}, during {during}"
    );
    assert_eq!(backend.reserved(), 64 * GIB);
    let t = Instant::now();
    for id in &ids {
        engine.end(None, *id, EndReason::Requested).await.unwrap();
    }
    let report = engine.run_due().await.unwrap();
    assert_eq!(report.released, 32);
    let freed_in = t.elapsed();
    let after = used(&gpu);
    let diff = after.abs_diff(before);
    println!(
        "GPU-RESULT reservations device=\"{}\" sessions=32 each=2GiB before={}MiB during={}MiB after={}MiB diff={}MiB end_and_free_all={:?}",
        device_name(&gpu),
        before / MIB,
        during / MIB,
        after / MIB,
        diff / MIB,
        freed_in
    );
    assert!(
        diff <= 16 * MIB,
        "memory back within 16 MiB: {diff} bytes off"
    );
    assert_eq!(backend.reserved(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn avatar_servers_memory_is_freed_soon_after_end() {
    let Some(gpu) = gpu() else { return };
    let assignment = Arc::new(AssignmentBackend::new(
        gpu.clone(),
        AssignmentConfig::default(),
    ));
    let mut process = ProcessConfig::new([fixture(), "1024".to_owned()]);
    process.grace = Duration::from_secs(5);
    let process = Arc::new(ProcessBackend::new(process).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(vec![assignment.clone(), process], &dir).await;
    let background = engine.spawn_background();
    let baseline = used(&gpu);
    let mut latencies = Vec::new();
    for _ in 0..50 {
        let record = engine.start(request(2 * GIB)).await.unwrap();
        let id = *record.session.id();
        // Wait until the avatar server holds its memory (context and 1 GiB).
        let deadline = Instant::now() + Duration::from_secs(60);
        while used(&gpu) < baseline + GIB {
            assert!(
                Instant::now() < deadline,
                "the avatar server never allocated"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let t = Instant::now();
        engine.end(None, id, EndReason::Requested).await.unwrap();
        while used(&gpu) > baseline + 64 * MIB {
            assert!(t.elapsed() < Duration::from_secs(30), "memory never freed");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        latencies.push(t.elapsed());
        // Its releases are recorded before the next session starts.
        let give_up = Instant::now() + Duration::from_secs(30);
        while !engine
            .get(None, id)
            .await
            .unwrap()
            .session
            .is_fully_released()
        {
            assert!(Instant::now() < give_up, "releases never recorded");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    latencies.sort();
    let (p50, p99) = (percentile(&latencies, 0.50), percentile(&latencies, 0.99));
    println!(
        "GPU-RESULT avatar_free_latency device=\"{}\" sessions={} each=1GiB p50={p50:?} p99={p99:?} max={:?}",
        device_name(&gpu),
        latencies.len(),
        latencies[latencies.len() - 1]
    );
    engine.shutdown(Duration::from_secs(10)).await.unwrap();
    background.join().await;
    assert!(assignment.promised().is_empty());
    assert!(p99 < Duration::from_millis(250), "p99 {p99:?} over 250 ms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_avatar_server_ignoring_sigterm_is_killed_and_reported() {
    let Some(gpu) = gpu() else { return };
    let backend = AssignmentBackend::new(
        gpu.clone(),
        AssignmentConfig {
            release_timeout: Duration::from_secs(1),
            ..AssignmentConfig::default()
        },
    );
    let session = session_lifecycle::SessionId::from_ulid_parts(
        session_lifecycle::Timestamp::from_millis(1_700_000_000_000),
        42,
    );
    let env = vec![];
    let share = backend
        .acquire(
            AcquireRequest {
                resources: ResourceRequest {
                    gpu_memory: Some(GIB),
                    gpu_device: None,
                    ready_timeout: None,
                },
                session,
                tenant: "gpu",
                env: &env,
            },
            EventSink::channel().0,
        )
        .await
        .unwrap();
    let baseline = used(&gpu);
    let mut child = Command::new(fixture())
        .args(["512", "ignore-term"])
        .envs(share.env.iter().map(|(k, v)| (k, v)))
        .env(
            session_lifecycle_runtime::SESSION_ID_ENV,
            session.to_string(),
        )
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert_eq!(ready.trim(), "ready");
    let held = used(&gpu).saturating_sub(baseline);
    // SIGTERM is ignored: the memory stays.
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let t = Instant::now();
    let note = backend
        .release(session, share.resource)
        .await
        .unwrap()
        .to_string();
    let took = t.elapsed();
    println!(
        "GPU-RESULT escalation device=\"{}\" note=\"{note}\" release_took={took:?} held={}MiB",
        device_name(&gpu),
        held / MIB
    );
    assert!(note.starts_with("escalated: killed pids"), "{note}");
    let status = child.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );
    assert!(
        used(&gpu) <= baseline + 64 * MIB,
        "memory freed by escalation"
    );
}
