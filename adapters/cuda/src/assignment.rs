//! GPU shares promised to avatar servers: placement, `CUDA_VISIBLE_DEVICES`, and a release
//! that waits until NVML shows the session's processes hold no memory on the device.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use session_lifecycle::{Resource, ResourceKind, SessionId};
use session_lifecycle_runtime::{
    AcquireError, AcquireRequest, Acquired, BoxFuture, DeviceReport, EventSink, ReleaseError,
    ReleaseNote, ResourceBackend, ResourceRequest,
};

use session_lifecycle_process::session_of_pid;

use crate::gpu::{GpuError, GpuInfo, lock};
use crate::placement::{DeviceRoom, Promise, choose, device_report, outstanding};

/// The resource kind of GPU shares (see [`AssignmentBackend`]).
pub const GPU_ASSIGNMENT_KIND: ResourceKind = ResourceKind(2);

/// How GPU shares are handed out and taken back.
#[derive(Debug, Clone)]
pub struct AssignmentConfig {
    /// GPU memory of a session that does not say, in bytes.
    pub default_memory: u64,
    /// How long a release waits for the session's processes to free their memory before
    /// it kills them.
    pub release_timeout: Duration,
    /// After killing them, how long it waits for the memory to be freed before the attempt
    /// fails (and is retried).
    pub kill_wait: Duration,
    /// Time between NVML checks while waiting.
    pub poll: Duration,
}

impl Default for AssignmentConfig {
    fn default() -> Self {
        AssignmentConfig {
            default_memory: 2 << 30,
            release_timeout: Duration::from_secs(5),
            kill_wait: Duration::from_secs(5),
            poll: Duration::from_millis(5),
        }
    }
}

/// Hands each session a share of one GPU's memory: picks the device with the most memory
/// neither in use nor promised (or the one the session asked for), and tells the avatar
/// server through `CUDA_VISIBLE_DEVICES` (the device's UUID) and
/// `SESSION_LIFECYCLE_GPU_MEMORY_BYTES`.
///
/// A release runs after the session's avatar server was stopped (releases go in reverse
/// acquisition order, and the share is acquired first). It waits until NVML shows that no
/// process of the session (found by the session's cgroup, or the session id in its
/// environment) holds memory on the device: a child the avatar server left behind. Past
/// [`release_timeout`](AssignmentConfig::release_timeout) it kills them with SIGKILL and says
/// so in the release note. Then the share is free for other sessions.
///
/// Promises live in this process: after a restart, shares of sessions started before it
/// are not counted by placement until those sessions end (their releases still work, as
/// the handle names the device).
pub struct AssignmentBackend {
    gpu: Arc<dyn GpuInfo>,
    config: AssignmentConfig,
    promises: Arc<Mutex<HashMap<u64, Promise>>>,
    next: Arc<AtomicU64>,
}

/// Handle layout: device index in the top 10 bits, then the share in MiB (21 bits), then a
/// counter (33 bits). The device is all a release needs, even after a restart.
const DEVICE_SHIFT: u32 = 54;
const MIB_SHIFT: u32 = 33;
const MIB_MASK: u64 = (1 << 21) - 1;
const COUNTER_MASK: u64 = (1 << 33) - 1;

/// The handle of a share of `bytes` on `device`.
pub fn assignment_handle(device: u32, bytes: u64, counter: u64) -> u64 {
    (u64::from(device & 0x3ff) << DEVICE_SHIFT)
        | (((bytes >> 20).min(MIB_MASK)) << MIB_SHIFT)
        | (counter & COUNTER_MASK)
}

/// The device of a share's handle.
pub fn assignment_device(handle: u64) -> u32 {
    (handle >> DEVICE_SHIFT) as u32
}

/// The memory of a share's handle, in bytes (kept in MiB).
pub fn assignment_bytes(handle: u64) -> u64 {
    ((handle >> MIB_SHIFT) & MIB_MASK) << 20
}

/// Memory held on device `index` by each session's processes.
fn usage_by_session(gpu: &dyn GpuInfo, index: u32) -> Result<HashMap<SessionId, u64>, GpuError> {
    let mut used: HashMap<SessionId, u64> = HashMap::new();
    for p in gpu.processes(index)? {
        if let Some(id) = session_of_pid(p.pid) {
            let entry = used.entry(id).or_default();
            *entry = entry.saturating_add(p.used);
        }
    }
    Ok(used)
}

/// Places `bytes` for `session` and records the promise, all under the promises' lock so
/// that concurrent starts never promise the same memory twice. Blocks on NVML.
fn place(
    gpu: &dyn GpuInfo,
    promises: &Mutex<HashMap<u64, Promise>>,
    next: &AtomicU64,
    session: SessionId,
    bytes: u64,
    wanted: Option<u32>,
) -> Result<(u64, String), AcquireError> {
    let mut promises = lock(promises);
    let (index, uuid) = choose_device(gpu, &promises, bytes, wanted)?;
    let handle = assignment_handle(index, bytes, next.fetch_add(1, Ordering::Relaxed));
    promises.insert(
        handle,
        Promise {
            session,
            device: index,
            bytes,
        },
    );
    Ok((handle, uuid))
}

/// The device a share of `bytes` would go to now, and its UUID. Blocks on NVML.
fn choose_device(
    gpu: &dyn GpuInfo,
    promises: &HashMap<u64, Promise>,
    bytes: u64,
    wanted: Option<u32>,
) -> Result<(u32, String), AcquireError> {
    let failed = |e: GpuError| AcquireError::Failed(e.to_string());
    let devices = gpu.devices().map_err(failed)?;
    let mut rooms = Vec::with_capacity(devices.len());
    for d in &devices {
        let used = usage_by_session(gpu, d.index).map_err(failed)?;
        rooms.push(DeviceRoom {
            index: d.index,
            free: d.free,
            outstanding: outstanding(d.index, promises.values(), &used),
        });
    }
    let index = choose(&rooms, bytes, wanted)?;
    let uuid = devices
        .iter()
        .find(|d| d.index == index)
        .map(|d| d.uuid.clone())
        .unwrap_or_default();
    Ok((index, uuid))
}

impl AssignmentBackend {
    /// A backend placing shares on the GPUs `gpu` reports.
    pub fn new(gpu: Arc<dyn GpuInfo>, config: AssignmentConfig) -> AssignmentBackend {
        AssignmentBackend {
            gpu,
            config,
            promises: Arc::new(Mutex::new(HashMap::new())),
            next: Arc::new(AtomicU64::new(1)),
        }
    }

    /// Bytes promised and not yet released, per device.
    pub fn promised(&self) -> HashMap<u32, u64> {
        let mut out: HashMap<u32, u64> = HashMap::new();
        for p in lock(&self.promises).values() {
            *out.entry(p.device).or_default() += p.bytes;
        }
        out
    }

    /// The pids of `session` holding memory on `device`.
    async fn holders(&self, session: SessionId, device: u32) -> Result<Vec<u32>, ReleaseError> {
        let gpu = Arc::clone(&self.gpu);
        tokio::task::spawn_blocking(move || {
            gpu.processes(device).map(|ps| {
                ps.into_iter()
                    .filter(|p| session_of_pid(p.pid) == Some(session))
                    .map(|p| p.pid)
                    .collect()
            })
        })
        .await
        .map_err(|e| ReleaseError::transient("NVML query task failed").caused_by(e))?
        .map_err(|e| ReleaseError::transient("NVML query failed").caused_by(e))
    }

    /// Waits up to `limit` until `session` holds nothing on `device`; the pids still holding
    /// memory if it does not.
    async fn wait_freed(
        &self,
        session: SessionId,
        device: u32,
        limit: Duration,
    ) -> Result<Vec<u32>, ReleaseError> {
        let give_up = Instant::now() + limit;
        loop {
            let holders = self.holders(session, device).await?;
            if holders.is_empty() || Instant::now() >= give_up {
                return Ok(holders);
            }
            tokio::time::sleep(self.config.poll).await;
        }
    }
}

impl ResourceBackend for AssignmentBackend {
    fn kind(&self) -> ResourceKind {
        GPU_ASSIGNMENT_KIND
    }

    fn name(&self) -> &'static str {
        "gpu-assignment"
    }

    fn kind_name(&self) -> &'static str {
        "gpu_assignment"
    }

    /// The wait for the memory, the kill and its wait, and a margin.
    fn release_deadline(&self) -> Duration {
        self.config.release_timeout + self.config.kill_wait + Duration::from_secs(5)
    }

    fn acquire<'a>(
        &'a self,
        request: AcquireRequest<'a>,
        _events: EventSink,
    ) -> BoxFuture<'a, Result<Acquired, AcquireError>> {
        Box::pin(async move {
            let bytes = request
                .resources
                .gpu_memory
                .unwrap_or(self.config.default_memory);
            if bytes == 0 {
                return Err(AcquireError::Failed(
                    "a GPU share needs at least one byte".to_owned(),
                ));
            }
            let (gpu, promises, next) = (
                Arc::clone(&self.gpu),
                Arc::clone(&self.promises),
                Arc::clone(&self.next),
            );
            let (session, wanted) = (request.session, request.resources.gpu_device);
            let (handle, uuid) = tokio::task::spawn_blocking(move || {
                place(&*gpu, &promises, &next, session, bytes, wanted)
            })
            .await
            .map_err(|e| AcquireError::Failed(format!("placement task failed: {e}")))??;
            Ok(Acquired {
                resource: Resource {
                    kind: GPU_ASSIGNMENT_KIND,
                    handle,
                },
                env: vec![
                    ("CUDA_VISIBLE_DEVICES".to_owned(), uuid),
                    (
                        "SESSION_LIFECYCLE_GPU_MEMORY_BYTES".to_owned(),
                        bytes.to_string(),
                    ),
                ],
            })
        })
    }

    /// Whether a share of `request`'s size (the default when it names none) can be placed
    /// now, without promising anything.
    fn room_for(&self, request: ResourceRequest) -> BoxFuture<'_, Result<(), AcquireError>> {
        Box::pin(async move {
            let bytes = request.gpu_memory.unwrap_or(self.config.default_memory);
            let (gpu, promises) = (Arc::clone(&self.gpu), Arc::clone(&self.promises));
            tokio::task::spawn_blocking(move || {
                let promises = lock(&promises);
                choose_device(&*gpu, &promises, bytes, request.gpu_device).map(|_| ())
            })
            .await
            .map_err(|e| AcquireError::Failed(format!("placement task failed: {e}")))?
        })
    }

    fn devices(&self) -> BoxFuture<'_, Vec<DeviceReport>> {
        Box::pin(async move {
            let (gpu, promises) = (Arc::clone(&self.gpu), Arc::clone(&self.promises));
            let reports = tokio::task::spawn_blocking(move || {
                let devices = gpu.devices()?;
                let promised: Vec<Promise> = lock(&promises).values().copied().collect();
                devices
                    .iter()
                    .map(|d| {
                        let used = usage_by_session(&*gpu, d.index)?;
                        Ok(device_report(d, &promised, &used))
                    })
                    .collect::<Result<Vec<_>, GpuError>>()
            })
            .await;
            match reports {
                Ok(Ok(reports)) => reports,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "reading GPU memory for the node report failed");
                    Vec::new()
                }
                Err(e) => {
                    tracing::warn!(error = %e, "GPU report task failed");
                    Vec::new()
                }
            }
        })
    }

    /// Counts a share of a session started by an earlier run (after a crash or a handover)
    /// as promised again, so that placement never promises its memory twice.
    fn resume<'a>(
        &'a self,
        session: SessionId,
        resource: Resource,
        _events: EventSink,
    ) -> BoxFuture<'a, Result<(), ReleaseError>> {
        Box::pin(async move {
            let promise = Promise {
                session,
                device: assignment_device(resource.handle),
                bytes: assignment_bytes(resource.handle),
            };
            lock(&self.promises).insert(resource.handle, promise);
            // New handles must not collide with taken-back ones.
            self.next.fetch_max(
                (resource.handle & COUNTER_MASK).saturating_add(1),
                Ordering::Relaxed,
            );
            Ok(())
        })
    }

    fn release(
        &self,
        session: SessionId,
        resource: Resource,
    ) -> BoxFuture<'_, Result<ReleaseNote, ReleaseError>> {
        Box::pin(async move {
            let device = assignment_device(resource.handle);
            let started = Instant::now();
            let holders = self
                .wait_freed(session, device, self.config.release_timeout)
                .await?;
            let note = if holders.is_empty() {
                ReleaseNote::Freed
            } else {
                // Escalate: whatever of the session still holds its memory is killed.
                for pid in &holders {
                    kill_if_session(*pid, session);
                }
                tracing::warn!(session = %session, device, pids = ?holders, "GPU memory not freed in time; killed its processes");
                let left = self
                    .wait_freed(session, device, self.config.kill_wait)
                    .await?;
                if !left.is_empty() {
                    return Err(ReleaseError::transient(format!(
                        "GPU {device} memory still held by pids {left:?} after SIGKILL"
                    )));
                }
                ReleaseNote::Escalated {
                    pids: holders,
                    after: started.elapsed(),
                }
            };
            lock(&self.promises).remove(&resource.handle);
            Ok(note)
        })
    }
}

/// SIGKILL to `pid` if it is still a process of `session`: the pid is pinned with a pidfd
/// first and checked after, so a pid reused by another process is never signalled.
fn kill_if_session(pid: u32, session: SessionId) {
    use rustix::process::{Pid, PidfdFlags, Signal, pidfd_open, pidfd_send_signal};
    let Some(raw) = i32::try_from(pid).ok().and_then(Pid::from_raw) else {
        return;
    };
    let Ok(pidfd) = pidfd_open(raw, PidfdFlags::empty()) else {
        return;
    };
    if session_of_pid(pid) == Some(session) {
        let _ = pidfd_send_signal(&pidfd, Signal::KILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_keep_the_device_and_stay_distinct() {
        let a = assignment_handle(7, 2 << 30, 1);
        let b = assignment_handle(7, 2 << 30, 2);
        assert_ne!(a, b);
        assert_eq!(assignment_device(a), 7);
        assert_eq!(
            assignment_device(assignment_handle(1023, u64::MAX, u64::MAX)),
            1023
        );
        assert_eq!((a >> MIB_SHIFT) & MIB_MASK, 2048);
    }
}
