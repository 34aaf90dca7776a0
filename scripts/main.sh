#!/usr/bin/env bash
# The project's main job (README "Set-up"): builds `ecdit` and draws an image of a prompt
# with the bundled model (models/shapes-ec), then shows what else the engine does on this
# machine: its components, the size of the paper's largest EC model, a few seconds of
# training, and three benchmarks (matmul, MoE layer against dense, EC-DiT-S forward).
#
#   ./scripts/main.sh ["PROMPT"]      e.g. "a photo of two green triangles"
#   ECDIT_MAIN_IMAGE_ONLY=1 ./scripts/main.sh "..."   # stop after the image
set -euo pipefail
cd "$(dirname "$0")/.."
prompt="${1:-a photo of a red circle left of a blue square}"
cargo build --release --bin ecdit
ecdit=./target/release/ecdit
mkdir -p target/main
$ecdit generate "$prompt" -n 4 --seed 0 -o target/main/image.png
echo "wrote target/main/image.png: four samples of \"$prompt\" from the bundled model"
[[ "${ECDIT_MAIN_IMAGE_ONLY:-0}" == 1 ]] && exit 0

$ecdit components
$ecdit info --config ec-dit-m-64e
rm -rf target/runs/smoke
$ecdit train --config configs/train/smoke-ec.json --out target/runs/smoke --quiet
$ecdit bench gemm
$ecdit bench moe
$ecdit bench forward --config ec-s-8e --batch 8
