#!/usr/bin/env bash
# The project's main job (README "Set-up"): builds `ecdit` and shows what it does on this
# machine: the registered components, the size of the paper's largest EC model, a preview
# of the data world, a few seconds of training, and three benchmarks (matmul, MoE layer
# against dense, EC-DiT-S forward).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin ecdit
ecdit=./target/release/ecdit
$ecdit components
$ecdit info --config ec-dit-m-64e
$ecdit data preview -o target/preview.png
rm -rf target/runs/smoke
$ecdit train --config configs/train/smoke-ec.json --out target/runs/smoke --quiet
$ecdit plot target/runs/smoke -o target/runs/smoke
$ecdit bench gemm
$ecdit bench moe
$ecdit bench forward --config ec-s-8e --batch 8
