//! What NVML says about the GPUs: devices, their free memory, and which processes hold
//! memory on each. Behind a trait, so that release and escalation logic is tested on
//! machines without a GPU.

use std::sync::Arc;

use nvml_wrapper::Nvml;
use nvml_wrapper::enums::device::UsedGpuMemory;

/// Why the GPUs cannot be used. Every way of failing is one of these, never a panic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GpuError {
    /// The CUDA driver library (`libcuda.so`) cannot be loaded: no NVIDIA driver here.
    #[error("the CUDA driver library (libcuda) cannot be loaded: no NVIDIA driver installed")]
    NoDriver,
    /// NVML (`libnvidia-ml.so.1`) cannot be loaded or initialized.
    #[error("NVML is not available: {0}")]
    NvmlUnavailable(String),
    /// The driver works but sees no GPU.
    #[error("no NVIDIA GPU found")]
    NoDevice,
    /// The session asked for a GPU that does not exist.
    #[error("there is no GPU {0}")]
    UnknownDevice(u32),
    /// An NVML call failed.
    #[error("NVML: {0}")]
    Nvml(String),
    /// A CUDA driver call failed (out of memory, a lost device, ...).
    #[error("CUDA driver: {0}")]
    Driver(String),
}

/// One GPU and its memory, as NVML reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceMemory {
    /// NVML index.
    pub index: u32,
    /// Its UUID (`GPU-...`), what `CUDA_VISIBLE_DEVICES` names it by: CUDA numbers devices
    /// in its own order, the UUID is the same everywhere.
    pub uuid: String,
    /// Its product name.
    pub name: String,
    /// Device memory, bytes.
    pub total: u64,
    /// Free device memory, bytes.
    pub free: u64,
}

/// A process holding memory on a GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuProcess {
    /// Its process id.
    pub pid: u32,
    /// Device memory it holds, bytes (0 when the driver does not say).
    pub used: u64,
}

/// The questions the GPU backends ask NVML. Calls block briefly (microseconds to a few
/// milliseconds); the backends make them off the async threads.
pub trait GpuInfo: Send + Sync + 'static {
    /// Every GPU with its memory.
    fn devices(&self) -> Result<Vec<DeviceMemory>, GpuError>;
    /// The compute processes holding memory on GPU `index`.
    fn processes(&self, index: u32) -> Result<Vec<GpuProcess>, GpuError>;
}

/// [`GpuInfo`] from NVML, loaded at run time.
pub struct NvmlGpu {
    nvml: Nvml,
}

impl NvmlGpu {
    /// Loads and initializes NVML and checks that it sees at least one GPU.
    pub fn discover() -> Result<Arc<NvmlGpu>, GpuError> {
        let nvml = Nvml::init().map_err(|e| GpuError::NvmlUnavailable(e.to_string()))?;
        let count = nvml.device_count().map_err(nvml_error)?;
        if count == 0 {
            return Err(GpuError::NoDevice);
        }
        Ok(Arc::new(NvmlGpu { nvml }))
    }
}

fn nvml_error(e: nvml_wrapper::error::NvmlError) -> GpuError {
    GpuError::Nvml(e.to_string())
}

impl GpuInfo for NvmlGpu {
    fn devices(&self) -> Result<Vec<DeviceMemory>, GpuError> {
        let count = self.nvml.device_count().map_err(nvml_error)?;
        (0..count)
            .map(|index| {
                let device = self.nvml.device_by_index(index).map_err(nvml_error)?;
                let memory = device.memory_info().map_err(nvml_error)?;
                Ok(DeviceMemory {
                    index,
                    uuid: device.uuid().map_err(nvml_error)?,
                    name: device.name().map_err(nvml_error)?,
                    total: memory.total,
                    free: memory.free,
                })
            })
            .collect()
    }

    fn processes(&self, index: u32) -> Result<Vec<GpuProcess>, GpuError> {
        let device = self
            .nvml
            .device_by_index(index)
            .map_err(|_| GpuError::UnknownDevice(index))?;
        let processes = device.running_compute_processes().map_err(nvml_error)?;
        Ok(processes
            .into_iter()
            .map(|p| GpuProcess {
                pid: p.pid,
                used: match p.used_gpu_memory {
                    UsedGpuMemory::Used(bytes) => bytes,
                    UsedGpuMemory::Unavailable => 0,
                },
            })
            .collect())
    }
}

/// Whether the CUDA driver library can be loaded. cudarc panics on first use when it
/// cannot, so this is asked first.
#[allow(unsafe_code)]
pub fn cuda_driver_present() -> bool {
    cudarc::get_lib_name_candidates("cuda").iter().any(|name| {
        // SAFETY: loading libcuda runs its initializers, exactly as cudarc's own loader
        // would a moment later; nothing from it is called here.
        unsafe { libloading::Library::new(name) }.is_ok()
    })
}

pub(crate) use session_lifecycle_runtime::lock;
