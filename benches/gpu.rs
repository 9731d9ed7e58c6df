//! The cost of one placement decision (8 GPUs, 64 promised shares, pure arithmetic) and of
//! one NVML query (every GPU's memory; one GPU's processes). The NVML half needs an NVIDIA
//! GPU and says it was skipped without one.
//!
//! Run: `cargo bench -p session-lifecycle-benches --bench gpu`

use std::collections::HashMap;
use std::hint::black_box;

use criterion::Criterion;
use session_lifecycle::{SessionId, Timestamp};
use session_lifecycle_cuda::placement::{DeviceRoom, Promise, choose, outstanding};
use session_lifecycle_cuda::{GpuInfo, NvmlGpu};

const GIB: u64 = 1 << 30;

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let ids: Vec<SessionId> = (0..64u128)
        .map(|n| SessionId::from_ulid_parts(Timestamp::from_millis(1_700_000_000_000), n))
        .collect();
    let promises: Vec<Promise> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| Promise {
            session: *id,
            device: (i % 8) as u32,
            bytes: 2 * GIB,
        })
        .collect();
    // Half the sessions have taken their memory already.
    let used: HashMap<SessionId, u64> = ids.iter().step_by(2).map(|id| (*id, 2 * GIB)).collect();
    c.bench_function("placement/8_gpus_64_promises", |b| {
        b.iter(|| {
            let rooms: Vec<DeviceRoom> = (0..8u32)
                .map(|index| DeviceRoom {
                    index,
                    free: (40 + u64::from(index)) * GIB,
                    outstanding: outstanding(index, &promises, &used),
                })
                .collect();
            choose(black_box(&rooms), black_box(2 * GIB), None)
        })
    });
    match NvmlGpu::discover() {
        Ok(gpu) => {
            c.bench_function("nvml/devices_memory", |b| b.iter(|| gpu.devices().unwrap()));
            c.bench_function("nvml/processes_of_gpu_0", |b| {
                b.iter(|| gpu.processes(0).unwrap())
            });
        }
        Err(e) => eprintln!("skipped NVML benches: no NVIDIA GPU ({e})"),
    }
    c.final_summary();
}
