#!/usr/bin/env bash
# Sets up and builds (see setup.sh), then trains the tiny V-MoE on Fashion-MNIST
# and evaluates it. Extra arguments go to `moev train` (e.g. --epochs 2).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
./build/moev train --config configs/vmoe_tiny_fmnist.toml "$@"
./build/moev eval runs/vmoe_tiny_fmnist/checkpoint.pt
