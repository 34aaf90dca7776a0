#!/usr/bin/env bash
# GPU check for the CUDA backend, run on a GPU machine that has no Rust toolchain.
#
# Expects the prebuilt parity test binary at device-bin/cuda_parity (git-ignored), made on
# the dev box with (cudarc loads CUDA at run time, so no CUDA is needed to build it):
#   cargo test -p ecdit-backend-cuda --test cuda_parity --no-run 2>&1 | grep -o 'target/[^)]*'
#   mkdir -p device-bin && cp <that path> device-bin/cuda_parity
# Needs a CUDA driver plus cuBLAS and NVRTC (libcublas.so.12, libnvrtc.so.12) on the
# library path. Prints one table row per checked op: relative max error and tolerance.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=device-bin/cuda_parity
if [[ ! -x "$bin" ]]; then
    echo "gpu-check: $bin not found; nothing to run" >&2
    exit 2
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
log=$(mktemp)
status=0
"$bin" --ignored --nocapture --test-threads=1 >"$log" 2>&1 || status=$?
printf '%-40s %-12s %s\n' op max_rel_err tolerance
grep '^PARITY ' "$log" | awk '{ printf "%-40s %-12s %s\n", $2, $3, $4 }' || true
grep -E '^test result' "$log" || true
if [[ $status -ne 0 ]]; then
    echo "--- failures ---"
    grep -A3 'panicked at' "$log" | head -60 || true
fi
exit "$status"
