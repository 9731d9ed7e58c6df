//! A small avatar server that holds GPU memory, for the GPU tests:
//! `gpu-fixture MIB [ignore-term]`.
//!
//! It allocates MIB of device memory on the first device it sees (`CUDA_VISIBLE_DEVICES`
//! picks it), prints `ready`, and holds it until SIGTERM, then exits (the driver frees the
//! memory with the process). With `ignore-term` it ignores SIGTERM: only SIGKILL stops it.
//! Without a driver it prints why and exits 2.

use cudarc::driver::CudaContext;
use signal_hook::consts::SIGTERM;
use signal_hook::iterator::Signals;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mib: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(256);
    let ignore_term = args.get(2).is_some_and(|a| a == "ignore-term");
    let mut signals = Signals::new([SIGTERM]).expect("install SIGTERM handler");
    if !session_lifecycle_cuda::cuda_driver_present() {
        eprintln!("gpu-fixture: no CUDA driver");
        std::process::exit(2);
    }
    let held = CudaContext::new(0).and_then(|ctx| {
        let stream = ctx.default_stream();
        let memory = stream.alloc_zeros::<u8>(mib << 20)?;
        stream.synchronize()?;
        Ok((ctx, memory))
    });
    let held = match held {
        Ok(held) => held,
        Err(e) => {
            eprintln!("gpu-fixture: {e}");
            std::process::exit(3);
        }
    };
    println!("ready");
    for _ in signals.forever() {
        if !ignore_term {
            break;
        }
    }
    drop(held);
}
