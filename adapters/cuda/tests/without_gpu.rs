//! The GPU backends' logic that needs no GPU: placement through the backend, the release
//! waiting on NVML and escalating to SIGKILL, and typed errors where there is no driver.
//! NVML is replaced by a fake whose processes are real ones.

use std::collections::HashMap;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use session_lifecycle::{Resource, SessionId, Timestamp};
use session_lifecycle_cuda::{
    AssignmentBackend, AssignmentConfig, DeviceMemory, GPU_ASSIGNMENT_KIND, GpuError, GpuInfo,
    GpuProcess, NvmlGpu, ReservationBackend, assignment_device, cuda_driver_present,
};
use session_lifecycle_runtime::{
    AcquireError, AcquireRequest, EventSink, ReleaseNote, ResourceBackend, ResourceRequest,
};

const GIB: u64 = 1 << 30;

/// Two GPUs; a process "holds" memory on GPU 0 while it runs.
struct FakeGpu {
    free: Vec<u64>,
    holders: Mutex<HashMap<u32, u64>>,
}

fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().to_owned())
        })
        .is_some_and(|rest| !rest.starts_with('Z'))
}

impl GpuInfo for FakeGpu {
    fn devices(&self) -> Result<Vec<DeviceMemory>, GpuError> {
        Ok(self
            .free
            .iter()
            .enumerate()
            .map(|(i, free)| DeviceMemory {
                index: i as u32,
                uuid: format!("GPU-fake-{i}"),
                name: "fake".to_owned(),
                total: 80 * GIB,
                free: *free,
            })
            .collect())
    }

    fn processes(&self, index: u32) -> Result<Vec<GpuProcess>, GpuError> {
        if index as usize >= self.free.len() {
            return Err(GpuError::UnknownDevice(index));
        }
        Ok(self
            .holders
            .lock()
            .unwrap()
            .iter()
            .filter(|(pid, _)| index == 0 && running(**pid))
            .map(|(pid, used)| GpuProcess {
                pid: *pid,
                used: *used,
            })
            .collect())
    }
}

fn id(n: u128) -> SessionId {
    SessionId::from_ulid_parts(Timestamp::from_millis(1_700_000_000_000), n)
}

async fn acquire(
    backend: &AssignmentBackend,
    session: SessionId,
    gpu_memory: u64,
    gpu_device: Option<u32>,
) -> Result<(Resource, Vec<(String, String)>), AcquireError> {
    let env = vec![];
    backend
        .acquire(
            AcquireRequest {
                resources: ResourceRequest {
                    gpu_memory: Some(gpu_memory),
                    gpu_device,
                    ready_timeout: None,
                },
                session,
                tenant: "t",
                env: &env,
            },
            EventSink::channel().0,
        )
        .await
        .map(|a| (a.resource, a.env))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_goes_where_most_memory_is_neither_used_nor_promised() {
    let gpu = Arc::new(FakeGpu {
        free: vec![10 * GIB, 20 * GIB],
        holders: Mutex::new(HashMap::new()),
    });
    let backend = AssignmentBackend::new(gpu, AssignmentConfig::default());
    let (first, env) = acquire(&backend, id(1), 8 * GIB, None).await.unwrap();
    assert_eq!(first.kind, GPU_ASSIGNMENT_KIND);
    assert_eq!(assignment_device(first.handle), 1);
    assert!(env.contains(&("CUDA_VISIBLE_DEVICES".to_owned(), "GPU-fake-1".to_owned())));
    assert!(env.contains(&(
        "SESSION_LIFECYCLE_GPU_MEMORY_BYTES".to_owned(),
        (8 * GIB).to_string()
    )));
    // 12 GiB unpromised on 1, 10 on 0.
    let (second, _) = acquire(&backend, id(2), 8 * GIB, None).await.unwrap();
    assert_eq!(assignment_device(second.handle), 1);
    let (third, _) = acquire(&backend, id(3), 8 * GIB, None).await.unwrap();
    assert_eq!(assignment_device(third.handle), 0);
    match acquire(&backend, id(4), 8 * GIB, None).await {
        Err(AcquireError::CapacityExhausted(m)) => assert!(m.contains("no GPU has"), "{m}"),
        other => panic!("expected capacity_exhausted, got {other:?}"),
    }
    assert!(matches!(
        acquire(&backend, id(4), GIB, Some(9)).await,
        Err(AcquireError::Failed(m)) if m.contains("no GPU 9")
    ));
    assert_eq!(backend.promised()[&1], 16 * GIB);
    // A released share is room again.
    assert_eq!(
        backend.release(id(1), first).await.unwrap(),
        ReleaseNote::Freed,
        "no process of the session holds memory"
    );
    let (again, _) = acquire(&backend, id(5), 8 * GIB, Some(1)).await.unwrap();
    assert_eq!(assignment_device(again.handle), 1);
}

/// A real process carrying `session` in its environment, which the fake GPU reports as
/// holding memory on GPU 0 while it runs. Killed when dropped, so a failing test leaves
/// nothing behind.
struct Holder(Child);

impl Holder {
    fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn holder(gpu: &FakeGpu, session: SessionId, ignore_term: bool) -> Holder {
    let script = if ignore_term {
        "trap '' TERM; while :; do sleep 0.05; done"
    } else {
        "sleep 30"
    };
    let child = Command::new("sh")
        .args(["-c", script])
        .env(
            session_lifecycle_runtime::SESSION_ID_ENV,
            session.to_string(),
        )
        .spawn()
        .unwrap();
    // Until it has exec'd, /proc shows the parent's environment; NVML would not list it
    // before it made a CUDA context either.
    while session_lifecycle_process::session_of_pid(child.id()) != Some(session) {
        std::thread::sleep(Duration::from_millis(1));
    }
    gpu.holders.lock().unwrap().insert(child.id(), GIB);
    Holder(child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_waits_for_the_memory_and_escalates_when_it_is_not_freed() {
    let gpu = Arc::new(FakeGpu {
        free: vec![40 * GIB],
        holders: Mutex::new(HashMap::new()),
    });
    let config = AssignmentConfig {
        release_timeout: Duration::from_millis(400),
        kill_wait: Duration::from_secs(2),
        ..AssignmentConfig::default()
    };
    let backend = AssignmentBackend::new(Arc::clone(&gpu) as Arc<dyn GpuInfo>, config);

    // The avatar server exits while the release waits: freed, no escalation.
    let (share, _) = acquire(&backend, id(10), GIB, None).await.unwrap();
    let polite = holder(&gpu, id(10), false);
    let pid = polite.id();
    let stopper = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        drop(polite);
    });
    assert_eq!(
        backend.release(id(10), share).await.unwrap(),
        ReleaseNote::Freed
    );
    stopper.join().unwrap();
    assert!(!running(pid));

    // One that never lets go is killed after the bound, and the note says so.
    let (share, _) = acquire(&backend, id(11), GIB, None).await.unwrap();
    let mut stubborn = holder(&gpu, id(11), true);
    let pid = stubborn.id();
    let started = std::time::Instant::now();
    let note = backend.release(id(11), share).await.unwrap().to_string();
    assert!(
        note.starts_with(&format!("escalated: killed pids [{pid}]")),
        "{note}"
    );
    assert!(started.elapsed() >= Duration::from_millis(400));
    let status = stubborn.0.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );
    // Another session's process is never touched.
    let (share, _) = acquire(&backend, id(12), GIB, None).await.unwrap();
    let bystander = holder(&gpu, id(13), true);
    assert_eq!(
        backend.release(id(12), share).await.unwrap(),
        ReleaseNote::Freed
    );
    assert!(running(bystander.id()));
    drop(bystander);
    assert!(backend.promised().is_empty(), "every share returned");
}

#[test]
fn no_driver_and_no_nvml_are_typed_errors_not_panics() {
    match NvmlGpu::discover() {
        Ok(_) => eprintln!("this machine has an NVIDIA GPU: the no-driver paths are not reachable"),
        Err(e) => assert!(
            matches!(e, GpuError::NvmlUnavailable(_) | GpuError::NoDevice),
            "{e:?}"
        ),
    }
    if !cuda_driver_present() {
        let gpu = Arc::new(FakeGpu {
            free: vec![GIB],
            holders: Mutex::new(HashMap::new()),
        });
        assert!(matches!(
            ReservationBackend::new(gpu, GIB),
            Err(GpuError::NoDriver)
        ));
    }
}

/// The engine on SQLite with a GPU share (NVML faked, its "processes" real ones) and an
/// avatar server process: the share is acquired first, so it is released last.
mod engine {
    use super::*;
    use session_lifecycle::{Clock, EndReason, ReleaseState};
    use session_lifecycle_process::{CgroupMode, ProcessBackend, ProcessConfig};
    use session_lifecycle_runtime::{
        Engine, EngineConfig, Plan, ResourceBackend, SessionRecord, StartRequest, SystemClock,
    };
    use session_lifecycle_sqlite::SqliteStore;

    fn fixture() -> std::path::PathBuf {
        let exe = std::env::current_exe().unwrap();
        exe.parent()
            .unwrap()
            .parent()
            .unwrap()
            .join("avatar-fixture")
    }

    async fn engine(
        dir: &std::path::Path,
        gpu: Arc<FakeGpu>,
        gpu_timeout: Duration,
        avatar: ProcessConfig,
    ) -> Engine {
        let share = AssignmentBackend::new(
            gpu as Arc<dyn GpuInfo>,
            AssignmentConfig {
                release_timeout: gpu_timeout,
                kill_wait: Duration::from_secs(2),
                ..AssignmentConfig::default()
            },
        );
        let backends: Vec<Arc<dyn ResourceBackend>> = vec![
            Arc::new(share),
            Arc::new(ProcessBackend::new(avatar).unwrap()),
        ];
        Engine::open(
            Arc::new(SqliteStore::open(dir.join("gpu.db")).unwrap()),
            backends,
            Arc::new(SystemClock),
            EngineConfig::default(),
        )
        .await
        .unwrap()
    }

    async fn start(engine: &Engine) -> SessionRecord {
        engine
            .start(StartRequest {
                callback_url: None,
                tenant: "t".into(),
                plan: Plan::new(None, Duration::from_secs(3600)),
                duration: None,
                metadata: None,
                room: None,
                timeouts: Default::default(),
                resources: ResourceRequest {
                    gpu_memory: Some(GIB),
                    gpu_device: None,
                    ready_timeout: None,
                },
            })
            .await
            .unwrap()
    }

    fn note(record: &SessionRecord, kind: session_lifecycle::ResourceKind) -> String {
        record
            .release_notes
            .iter()
            .find(|(r, _)| r.kind == kind)
            .map(|(_, n)| n.clone())
            .unwrap_or_default()
    }

    fn released_at(record: &SessionRecord, kind: session_lifecycle::ResourceKind) -> Timestamp {
        match record
            .session
            .resources()
            .iter()
            .find(|r| r.resource.kind == kind)
            .map(|r| r.release)
        {
            Some(ReleaseState::Released { at }) => at,
            other => panic!("{kind:?} not released: {other:?}"),
        }
    }

    /// Waits for `pid`'s file to name a process (the fixture writes it once running).
    fn pid_in(path: &std::path::Path) -> u32 {
        for _ in 0..500 {
            if let Some(pid) = std::fs::read_to_string(path)
                .ok()
                .and_then(|t| t.trim().parse().ok())
            {
                return pid;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("no pid in {}", path.display());
    }

    /// An avatar server that needs 7 s after SIGTERM, with a 10 s grace and a 5 s GPU
    /// release timeout: the GPU release starts only once the server is gone, so nothing is
    /// killed and nothing escalates.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_avatar_stops_in_its_grace_before_the_gpu_release_starts() {
        let dir = tempfile::tempdir().unwrap();
        let gpu = Arc::new(FakeGpu {
            free: vec![40 * GIB],
            holders: Mutex::new(HashMap::new()),
        });
        let mut avatar = ProcessConfig::new([
            fixture().into_os_string(),
            "slow-exit".into(),
            "7000".into(),
        ]);
        avatar.grace = Duration::from_secs(10);
        let engine = engine(dir.path(), Arc::clone(&gpu), Duration::from_secs(5), avatar).await;
        let started = start(&engine).await;
        let id = *started.session.id();
        let resources = started.session.resources();
        assert_eq!(
            resources[0].resource.kind, GPU_ASSIGNMENT_KIND,
            "the share first"
        );
        let pid = resources[1].resource.handle as u32;
        // The server holds its share's memory while it runs.
        gpu.holders.lock().unwrap().insert(pid, GIB);
        tokio::time::sleep(Duration::from_millis(200)).await;

        let t0 = SystemClock.now();
        engine.end(None, id, EndReason::Requested).await.unwrap();
        engine.run_due().await.unwrap();
        let record = engine.get(None, id).await.unwrap();
        assert!(record.session.is_fully_released());
        let process_kind = session_lifecycle_process::PROCESS_KIND;
        assert_eq!(
            note(&record, process_kind),
            "sigterm",
            "stopped in its grace"
        );
        assert_eq!(note(&record, GPU_ASSIGNMENT_KIND), "freed", "no escalation");
        let process_done = released_at(&record, process_kind);
        let gpu_done = released_at(&record, GPU_ASSIGNMENT_KIND);
        assert!(
            process_done.saturating_duration_since(t0) >= Duration::from_millis(6_900),
            "the server took its 7 s"
        );
        assert!(gpu_done >= process_done, "the share goes after the server");
        assert!(!running(pid));
        engine.shutdown(Duration::from_secs(5)).await.unwrap();
    }

    /// A child the avatar server left behind (it escaped the process group with `setsid`,
    /// as it can without cgroups) still holds GPU memory after the server stopped: the GPU
    /// release kills it and says so.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_child_left_holding_gpu_memory_is_killed_by_the_gpu_release() {
        let dir = tempfile::tempdir().unwrap();
        let gpu = Arc::new(FakeGpu {
            free: vec![40 * GIB],
            holders: Mutex::new(HashMap::new()),
        });
        let pid_file = dir.path().join("grandchild.pid");
        let mut avatar = ProcessConfig::new([
            fixture().into_os_string(),
            "setsid-child".into(),
            pid_file.clone().into_os_string(),
        ]);
        avatar.grace = Duration::from_secs(2);
        avatar.cgroups = CgroupMode::Off;
        let engine = engine(
            dir.path(),
            Arc::clone(&gpu),
            Duration::from_millis(500),
            avatar,
        )
        .await;
        let started = start(&engine).await;
        let id = *started.session.id();
        let grandchild = pid_in(&pid_file);
        struct Reap(u32);
        impl Drop for Reap {
            fn drop(&mut self) {
                if let Some(pid) = rustix::process::Pid::from_raw(self.0 as i32) {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                }
            }
        }
        let _cleanup = Reap(grandchild);
        gpu.holders.lock().unwrap().insert(grandchild, GIB);

        engine.end(None, id, EndReason::Requested).await.unwrap();
        engine.run_due().await.unwrap();
        let record = engine.get(None, id).await.unwrap();
        assert!(record.session.is_fully_released());
        assert_eq!(
            note(&record, session_lifecycle_process::PROCESS_KIND),
            "sigterm",
            "the server itself stopped gracefully"
        );
        let gpu_note = note(&record, GPU_ASSIGNMENT_KIND);
        assert!(
            gpu_note.starts_with(&format!("escalated: killed pids [{grandchild}]")),
            "{gpu_note}"
        );
        for _ in 0..200 {
            if !running(grandchild) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!running(grandchild), "the left-behind child is gone");
        engine.shutdown(Duration::from_secs(5)).await.unwrap();
    }

    /// Shares survive a restart: two sessions of 30 GiB on an 80 GiB device whose avatar
    /// servers have not allocated anything yet; the node restarts (a crash: the engine is
    /// dropped), and placement still counts both, so a third is refused.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shares_still_running_are_counted_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let gpu = Arc::new(FakeGpu {
            free: vec![80 * GIB],
            holders: Mutex::new(HashMap::new()),
        });
        let open = || async {
            let share = AssignmentBackend::new(
                Arc::clone(&gpu) as Arc<dyn GpuInfo>,
                AssignmentConfig::default(),
            );
            Engine::open(
                Arc::new(SqliteStore::open(dir.path().join("gpu.db")).unwrap()),
                vec![Arc::new(share) as Arc<dyn ResourceBackend>],
                Arc::new(SystemClock),
                EngineConfig::default(),
            )
            .await
            .unwrap()
        };
        let request = |gib: u64| StartRequest {
            callback_url: None,
            tenant: "t".into(),
            plan: Plan::new(None, Duration::from_secs(3600)),
            duration: None,
            metadata: None,
            room: None,
            timeouts: Default::default(),
            resources: ResourceRequest {
                gpu_memory: Some(gib * GIB),
                gpu_device: None,
                ready_timeout: None,
            },
        };
        let first = open().await;
        first.start(request(30)).await.unwrap();
        first.start(request(30)).await.unwrap();
        drop(first);

        let second = open().await;
        match second.start(request(30)).await {
            Err(session_lifecycle_runtime::EngineError::CapacityExhausted(_)) => {}
            other => panic!("a third 30 GiB share was not refused: {other:?}"),
        }
        // What is left (20 GiB) is still placed.
        second.start(request(20)).await.unwrap();
        second.shutdown(Duration::from_secs(5)).await.unwrap();
    }
}
