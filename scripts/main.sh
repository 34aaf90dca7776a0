#!/usr/bin/env bash
# The project's main job (README "Set-up"): builds `ecdit` and shows what it does on this
# machine: the registered components, the size of the paper's largest EC model, and the
# three benchmarks (matmul, MoE layer against dense, EC-DiT-S forward).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin ecdit
ecdit=./target/release/ecdit
$ecdit components
$ecdit info --config ec-dit-m-64e
$ecdit bench gemm
$ecdit bench moe
$ecdit bench forward --config ec-s-8e --batch 8
