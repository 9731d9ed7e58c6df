//! Device memory allocated in this process for a session (for services that run the
//! model in the Rust process), freed on release. One CUDA context per device, shared by
//! every session.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaSlice};
use session_lifecycle::{Resource, ResourceKind, SessionId};
use session_lifecycle_runtime::{
    AcquireError, AcquireRequest, Acquired, BoxFuture, EventSink, ReleaseError, ReleaseNote,
    ResourceBackend,
};

use crate::gpu::{GpuError, GpuInfo, cuda_driver_present, lock};
use crate::placement::{DeviceRoom, choose};

/// The resource kind of in-process device memory (see [`ReservationBackend`]).
pub const GPU_RESERVATION_KIND: ResourceKind = ResourceKind(3);

/// One device: its NVML index and its CUDA context.
struct Device {
    index: u32,
    context: Arc<CudaContext>,
}

/// Memory held for a session.
struct Allocation {
    session: SessionId,
    device: usize,
    memory: CudaSlice<u8>,
}

/// Allocates device memory for each session in this process, on the device with the
/// most free memory (or the one asked for), and frees it on release.
pub struct ReservationBackend {
    gpu: Arc<dyn GpuInfo>,
    devices: Arc<Vec<Device>>,
    allocations: Arc<Mutex<HashMap<u64, Allocation>>>,
    default_memory: u64,
    next: AtomicU64,
}

fn driver(e: cudarc::driver::DriverError) -> GpuError {
    GpuError::Driver(e.to_string())
}

/// A CUDA UUID in NVML's form: `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
fn uuid_text(bytes: &[std::ffi::c_char; 16]) -> String {
    let hex: Vec<String> = bytes.iter().map(|b| format!("{:02x}", *b as u8)).collect();
    format!(
        "GPU-{}-{}-{}-{}-{}",
        hex[0..4].concat(),
        hex[4..6].concat(),
        hex[6..8].concat(),
        hex[8..10].concat(),
        hex[10..16].concat()
    )
}

impl ReservationBackend {
    /// Opens one CUDA context per device. Fails with a typed error, never a panic, when
    /// there is no driver or no device.
    pub fn new(gpu: Arc<dyn GpuInfo>, default_memory: u64) -> Result<ReservationBackend, GpuError> {
        if !cuda_driver_present() {
            return Err(GpuError::NoDriver);
        }
        let nvml = gpu.devices()?;
        let count = CudaContext::device_count().map_err(driver)?;
        if count <= 0 {
            return Err(GpuError::NoDevice);
        }
        let mut devices = Vec::new();
        for ordinal in 0..count as usize {
            let context = CudaContext::new(ordinal).map_err(driver)?;
            let uuid = uuid_text(&context.uuid().map_err(driver)?.bytes);
            // CUDA numbers devices its own way; NVML's index is found by UUID.
            let index = nvml
                .iter()
                .find(|d| d.uuid == uuid)
                .map_or(ordinal as u32, |d| d.index);
            devices.push(Device { index, context });
        }
        Ok(ReservationBackend {
            gpu,
            devices: Arc::new(devices),
            allocations: Arc::new(Mutex::new(HashMap::new())),
            default_memory,
            next: AtomicU64::new(1),
        })
    }

    /// Bytes held, over all sessions.
    pub fn reserved(&self) -> u64 {
        lock(&self.allocations)
            .values()
            .map(|a| a.memory.len() as u64)
            .sum()
    }

    /// The sessions holding memory here.
    pub fn sessions(&self) -> Vec<SessionId> {
        lock(&self.allocations)
            .values()
            .map(|a| a.session)
            .collect()
    }
}

impl ResourceBackend for ReservationBackend {
    fn kind(&self) -> ResourceKind {
        GPU_RESERVATION_KIND
    }

    fn name(&self) -> &'static str {
        "gpu-reservation"
    }

    fn kind_name(&self) -> &'static str {
        "gpu_reservation"
    }

    fn acquire<'a>(
        &'a self,
        request: AcquireRequest<'a>,
        _events: EventSink,
    ) -> BoxFuture<'a, Result<Acquired, AcquireError>> {
        Box::pin(async move {
            let bytes = request.resources.gpu_memory.unwrap_or(self.default_memory);
            let len = usize::try_from(bytes)
                .ok()
                .filter(|b| *b > 0)
                .ok_or_else(|| AcquireError::Failed(format!("cannot reserve {bytes} bytes")))?;
            let (gpu, devices, allocations) = (
                Arc::clone(&self.gpu),
                Arc::clone(&self.devices),
                Arc::clone(&self.allocations),
            );
            let handle = self.next.fetch_add(1, Ordering::Relaxed);
            let (session, wanted) = (request.session, request.resources.gpu_device);
            tokio::task::spawn_blocking(move || {
                let failed = |e: GpuError| AcquireError::Failed(e.to_string());
                let rooms: Vec<DeviceRoom> = gpu
                    .devices()
                    .map_err(failed)?
                    .into_iter()
                    .filter(|d| devices.iter().any(|c| c.index == d.index))
                    .map(|d| DeviceRoom {
                        index: d.index,
                        free: d.free,
                        outstanding: 0,
                    })
                    .collect();
                let index = choose(&rooms, bytes, wanted)?;
                let device = devices
                    .iter()
                    .position(|d| d.index == index)
                    .ok_or_else(|| failed(GpuError::UnknownDevice(index)))?;
                let context = &devices[device].context;
                let allocate = || {
                    context.bind_to_thread()?;
                    let stream = context.default_stream();
                    let memory = stream.alloc_zeros::<u8>(len)?;
                    stream.synchronize()?;
                    Ok::<_, cudarc::driver::DriverError>(memory)
                };
                // The driver's out-of-memory is capacity, not a fault.
                let memory = allocate().map_err(|e| {
                    if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
                        AcquireError::CapacityExhausted(format!("GPU {index}: {e}"))
                    } else {
                        failed(driver(e))
                    }
                })?;
                lock(&allocations).insert(
                    handle,
                    Allocation {
                        session,
                        device,
                        memory,
                    },
                );
                Ok(Acquired {
                    resource: Resource {
                        kind: GPU_RESERVATION_KIND,
                        handle,
                    },
                    env: Vec::new(),
                })
            })
            .await
            .map_err(|e| AcquireError::Failed(format!("allocation task failed: {e}")))?
        })
    }

    fn release(
        &self,
        _session: SessionId,
        resource: Resource,
    ) -> BoxFuture<'_, Result<ReleaseNote, ReleaseError>> {
        Box::pin(async move {
            let Some(allocation) = lock(&self.allocations).remove(&resource.handle) else {
                // Freed already, or held by a process that has since exited (its memory
                // went with it).
                return Ok(ReleaseNote::Gone);
            };
            let devices = Arc::clone(&self.devices);
            tokio::task::spawn_blocking(move || {
                let context = &devices[allocation.device].context;
                context.bind_to_thread().map_err(|e| {
                    ReleaseError::transient("freeing device memory failed").caused_by(e)
                })?;
                let stream = allocation.memory.stream().clone();
                drop(allocation.memory);
                // The free is ordered on the stream: done when it is synchronized.
                stream.synchronize().map_err(|e| {
                    ReleaseError::transient("freeing device memory failed").caused_by(e)
                })?;
                Ok(ReleaseNote::Freed)
            })
            .await
            .map_err(|e| ReleaseError::transient("free task failed").caused_by(e))?
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_read_as_nvml_writes_them() {
        let bytes: [std::ffi::c_char; 16] = core::array::from_fn(|i| (i as u8 * 17) as _);
        assert_eq!(
            uuid_text(&bytes),
            "GPU-00112233-4455-6677-8899-aabbccddeeff"
        );
    }
}
