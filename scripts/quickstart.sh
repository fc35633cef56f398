#!/usr/bin/env bash
# Sets up and builds (see setup.sh), then trains the tiny V-MoE on Fashion-MNIST
# and evaluates it. Extra arguments go to `moev train` (e.g. --epochs 2).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# A second call continues (or just re-reads) the first run: moev refuses to
# train over a run's directory without --resume.
resume=()
[ -f runs/vmoe_tiny_fmnist/checkpoint.pt ] && resume=(--resume)
./build/moev train --config configs/vmoe_tiny_fmnist.toml "${resume[@]}" "$@"
./build/moev eval runs/vmoe_tiny_fmnist/checkpoint.pt
