//! GPU resources for `session-lifecycle`: the GPU half of what ending a session gives back.
//!
//! - [`NvmlGpu`] lists GPUs and their free memory and the processes holding memory on each
//!   (NVML, loaded at run time).
//! - [`AssignmentBackend`] ([`GPU_ASSIGNMENT_KIND`]) promises each session a share of one
//!   GPU's memory, placed on the device with the most memory neither used nor promised, and
//!   passes it to the avatar server as `CUDA_VISIBLE_DEVICES`. Its release waits until NVML
//!   shows the session's processes hold nothing on the device (bounded; then SIGKILL,
//!   reported in the release note).
//! - [`ReservationBackend`] ([`GPU_RESERVATION_KIND`]) allocates device memory in this
//!   process for a session and frees it on release, with one CUDA context per device.
//!
//! Both libraries are loaded at run time, so a binary with this crate builds and starts on
//! machines without CUDA: every entry point answers a typed [`GpuError`] there (cudarc
//! itself would panic without `libcuda`; this crate checks first).
//!
//! ```
//! use session_lifecycle_cuda::{AssignmentBackend, AssignmentConfig, GpuError, NvmlGpu};
//!
//! match NvmlGpu::discover() {
//!     Ok(gpu) => {
//!         let backend = AssignmentBackend::new(gpu, AssignmentConfig::default());
//!         // Engine::open(store, vec![Arc::new(backend), avatar_processes], ...)
//!         # drop(backend);
//!     }
//!     Err(e) => eprintln!("running without GPU resources: {e}"),
//! }
//! # let _ = GpuError::NoDevice;
//! ```

#![deny(unsafe_code)]

mod assignment;
mod gpu;
pub mod placement;
mod reservation;

pub use assignment::{
    AssignmentBackend, AssignmentConfig, GPU_ASSIGNMENT_KIND, assignment_bytes, assignment_device,
    assignment_handle,
};
pub use gpu::{DeviceMemory, GpuError, GpuInfo, GpuProcess, NvmlGpu, cuda_driver_present};
pub use reservation::{GPU_RESERVATION_KIND, ReservationBackend};
