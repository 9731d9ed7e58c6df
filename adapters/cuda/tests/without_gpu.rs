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
    AcquireError, AcquireRequest, EventSink, ResourceBackend, ResourceRequest,
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
        "freed",
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
        .env("SESSION_LIFECYCLE_SESSION_ID", session.to_string())
        .spawn()
        .unwrap();
    // Until it has exec'd, /proc shows the parent's environment; NVML would not list it
    // before it made a CUDA context either.
    let want = session.to_string();
    while session_lifecycle_cuda::session_of(child.id()).as_deref() != Some(want.as_str()) {
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
    assert_eq!(backend.release(id(10), share).await.unwrap(), "freed");
    stopper.join().unwrap();
    assert!(!running(pid));

    // One that never lets go is killed after the bound, and the note says so.
    let (share, _) = acquire(&backend, id(11), GIB, None).await.unwrap();
    let mut stubborn = holder(&gpu, id(11), true);
    let pid = stubborn.id();
    let started = std::time::Instant::now();
    let note = backend.release(id(11), share).await.unwrap();
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
    assert_eq!(backend.release(id(12), share).await.unwrap(), "freed");
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
