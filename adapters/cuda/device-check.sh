#!/usr/bin/env bash
# The GPU checks, for a machine with an NVIDIA GPU and its driver but no Rust.
#
#   adapters/cuda/device-check.sh prepare   # here: build the test and bench binaries into gpu-check/
#   adapters/cuda/device-check.sh run       # there: run them; results in $OUT (or gpu-check/out)
#
# `run` needs nothing but the driver (libcuda, libnvidia-ml). It fails, never skips, where
# there is no GPU (SESSION_LIFECYCLE_REQUIRE_GPU=1).
set -euo pipefail
cd "$(dirname "$0")/../.."
dir=gpu-check

case "${1:-}" in
prepare)
    rm -rf "$dir" && mkdir -p "$dir"
    exe() { # cargo's JSON messages -> the executable of the named test or bench target
        python3 -c 'import json,sys
name=sys.argv[1]
for line in sys.stdin:
    m=json.loads(line)
    if m.get("reason")=="compiler-artifact" and m["target"]["name"]==name and m.get("executable"):
        print(m["executable"])' "$1"
    }
    cp "$(cargo test -p session-lifecycle-cuda --test on_gpu --no-run --message-format=json | exe on_gpu)" "$dir/on_gpu"
    cargo build -p session-lifecycle-cuda --bin gpu-fixture
    cp target/debug/gpu-fixture "$dir/gpu-fixture"
    cp "$(cargo bench -p session-lifecycle-benches --bench gpu --no-run --message-format=json | exe gpu)" "$dir/gpu_bench"
    # The device takes at most 64 MiB of carried files: no debug info.
    strip --strip-debug "$dir"/*
    ls -l "$dir"
    ;;
run)
    out="${OUT:-$dir/out}"
    mkdir -p "$out"
    { date -u; nvidia-smi -L || true; nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv || true; } >"$out/gpu.txt" 2>&1
    status=0
    GPU_FIXTURE="$PWD/$dir/gpu-fixture" SESSION_LIFECYCLE_REQUIRE_GPU=1 \
        timeout 400 "$dir/on_gpu" --nocapture --test-threads 1 >"$out/on_gpu.txt" 2>&1 || status=$?
    timeout 120 "$dir/gpu_bench" --bench --warm-up-time 1 --measurement-time 3 >"$out/bench.txt" 2>&1 || status=$?
    grep -h "GPU-RESULT\|test result\|panicked" "$out/on_gpu.txt" || true
    grep -h -A2 "^placement\|^nvml" "$out/bench.txt" || true
    exit "$status"
    ;;
*)
    echo "usage: $0 prepare|run" >&2
    exit 2
    ;;
esac
