#!/usr/bin/env bash
# GPU check of the CUDA backend: op-by-op parity with the CPU backend (f32 and
# bf16 storage, poisoned outputs), the whole EC-DiT forward and a training step
# against the CPU backend, device residency of a forward, and speed (an
# EC-DiT-XL-8E forward in bf16: images/s and MFU against the card's measured
# bf16 matmul peak; the EC layer against a dense FFN of equal FLOPs; the same
# model in PyTorch eager, timed in the same run). Prints one table; exits
# non-zero when a check failed.
#
# The GPU machine has CUDA and PyTorch but no Rust toolchain, so the test
# binaries are built on the dev box (cudarc opens CUDA at run time: no CUDA is
# needed to build) and carried over in device-bin/ (git-ignored):
#
#   1. on the dev box, from the repository root:
#        scripts/gpu-check.sh build
#      which runs (the test profile without debug info, stripped, to stay small)
#        CARGO_PROFILE_TEST_DEBUG=false cargo test -p ecdit-backend-cuda --test cuda_parity --no-run
#        CARGO_PROFILE_TEST_DEBUG=false cargo test -p ecdit-model --test cuda_model_parity --no-run
#      and copies the two executables to device-bin/cuda_parity and
#      device-bin/cuda_model_parity;
#   2. copy the working tree with device-bin/ to the GPU machine (the device
#      tool: carry ["device-bin"]);
#   3. on the GPU machine, from the repository root:
#        scripts/gpu-check.sh            (or: bash scripts/gpu-check.sh)
#
# Needs a CUDA driver, and cuBLAS and NVRTC 12 (libcublas.so.12, libnvrtc.so.12):
# the script adds the lib/ folders of PyTorch's nvidia-* wheels and
# /usr/local/cuda/lib64 to LD_LIBRARY_PATH when they exist. Sizes:
# ECDIT_BENCH_BATCH (default 32 images), ECDIT_BENCH_REPS (default 10). Each step
# has a time limit (the whole run stays under 10 minutes); the raw logs are in
# $GPU_CHECK_LOGS (default: a temporary folder), printed at the end.
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "build" ]]; then
    set -e
    mkdir -p device-bin
    for spec in "ecdit-backend-cuda cuda_parity" "ecdit-model cuda_model_parity"; do
        read -r pkg test <<<"$spec"
        exe=$(CARGO_PROFILE_TEST_DEBUG=false cargo test -p "$pkg" --test "$test" --no-run --message-format=json |
            python3 -c "
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get('reason') == 'compiler-artifact' and m.get('executable') and m['target']['name'] == '$test':
        print(m['executable'])")
        cp "$exe" "device-bin/$test"
        strip "device-bin/$test" 2>/dev/null || true
        echo "device-bin/$test <- $exe ($(du -h "device-bin/$test" | cut -f1))"
    done
    exit 0
fi

for bin in device-bin/cuda_parity device-bin/cuda_model_parity; do
    if [[ ! -x "$bin" ]]; then
        echo "gpu-check: $bin not found; build it on the dev box with: scripts/gpu-check.sh build" >&2
        exit 2
    fi
done

# cuBLAS and NVRTC from PyTorch's wheels or the CUDA toolkit.
extra=$(python3 - <<'EOF' 2>/dev/null
import importlib, os
dirs = []
for mod in ("nvidia.cublas", "nvidia.cuda_nvrtc", "nvidia.cuda_runtime"):
    try:
        m = importlib.import_module(mod)
    except Exception:
        continue
    for p in getattr(m, "__path__", []):
        if os.path.isdir(os.path.join(p, "lib")):
            dirs.append(os.path.join(p, "lib"))
print(":".join(dirs))
EOF
)
[[ -d /usr/local/cuda/lib64 ]] && extra="${extra:+$extra:}/usr/local/cuda/lib64"
export LD_LIBRARY_PATH="${extra}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export ECDIT_BENCH_BATCH="${ECDIT_BENCH_BATCH:-32}" ECDIT_BENCH_REPS="${ECDIT_BENCH_REPS:-10}"

logs="${GPU_CHECK_LOGS:-$(mktemp -d)}"
mkdir -p "$logs"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
failed=()

# step NAME SECONDS COMMAND...: runs with a time limit, output to $logs/NAME.log.
step() {
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$logs/$name.log" 2>&1
    local rc=$?
    printf 'gpu-check: %-14s rc=%-3s %4ss\n' "$name" "$rc" "$((SECONDS - start))" >&2
    [[ $rc -ne 0 ]] && failed+=("$name (rc $rc)")
    return 0
}

step parity 150 device-bin/cuda_parity --ignored --nocapture --test-threads=1
step model 90 device-bin/cuda_model_parity --ignored --nocapture --test-threads=1 \
    --skip bench_
step bench 180 device-bin/cuda_model_parity --ignored --nocapture --test-threads=1 bench_
step torch 150 python3 benches/reference/forward_torch_cuda.py --config configs/paper/ec-dit-xl-8e.json \
    --batch "$ECDIT_BENCH_BATCH" --reps "$ECDIT_BENCH_REPS"

echo
echo "== parity with the CPU backend (error = max |cuda - cpu| / max(|cpu|, 1); bits = elements not bit-identical)"
printf '%-52s %-5s %-10s %-6s %-16s %s\n' check dtype error tol bits result
cat "$logs/parity.log" "$logs/model.log" | awk '/^PARITY / {
    ok = ($4 == "-" || $5 == "-" || $4 + 0 <= $5 + 0) ? "ok" : "FAIL"
    printf "%-52s %-5s %-10s %-6s %-16s %s\n", $2, $3, $4, $5, $6, ok }'
grep -h '^TRANSFERS ' "$logs/model.log" || true

echo
echo "== speed: EC-DiT-XL-8E forward, bf16, batch $ECDIT_BENCH_BATCH (ours: ecdit CUDA backend; torch: PyTorch eager)"
get() { awk -v k="$2" '$1 == "BENCH" && $2 == k { print $3; exit }' "$logs/$1.log"; }
ours_ips=$(get bench xl_forward_images_per_s); torch_ips=$(get torch torch_xl_forward_images_per_s)
ours_ms=$(get bench xl_forward_ms); torch_ms=$(get torch torch_xl_forward_ms)
tflops=$(get bench xl_forward_tflops); peak=$(get bench bf16_matmul_peak); mfu=$(get bench xl_forward_mfu)
torch_peak=$(get torch torch_bf16_matmul_peak)
torch_mfu=$(awk -v o="$ours_ips" -v t="$torch_ips" -v m="$mfu" 'BEGIN { if (o > 0 && t != "") printf "%.1f", m * t / o; else print "-" }')
printf '%-36s %-14s %-14s\n' metric ours torch
printf '%-36s %-14s %-14s\n' "forward ms (median)" "${ours_ms:--}" "${torch_ms:--}"
printf '%-36s %-14s %-14s\n' "images/s" "${ours_ips:--}" "${torch_ips:--}"
printf '%-36s %-14s %-14s\n' "achieved TFLOP/s" "${tflops:--}" "-"
printf '%-36s %-14s %-14s\n' "bf16 matmul peak TFLOP/s (measured)" "${peak:--}" "${torch_peak:--}"
printf '%-36s %-14s %-14s\n' "MFU % (against our peak)" "${mfu:--}" "$torch_mfu"
printf '%-36s %-14s %-14s\n' "EC layer ms" "$(get bench ec_layer_ms)" "$(get torch torch_ec_layer_ms)"
printf '%-36s %-14s %-14s\n' "dense FFN of equal FLOPs ms" "$(get bench dense_ffn_equal_flops_ms)" \
    "$(get torch torch_dense_ffn_equal_flops_ms)"
printf '%-36s %-14s %-14s\n' "EC / dense" "$(get bench ec_over_dense)" "$(get torch torch_ec_over_dense)"

echo
grep -hE '^test result' "$logs/parity.log" "$logs/model.log" "$logs/bench.log" || true
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "--- failed steps: ${failed[*]}"
    for f in parity model bench torch; do
        grep -hE -A12 'panicked at|^FAILED|Error|error:' "$logs/$f.log" 2>/dev/null | head -60
    done
fi
echo "logs: $logs"
[[ ${#failed[@]} -eq 0 ]]
