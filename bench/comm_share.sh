#!/usr/bin/env bash
# The share of a training step spent in communication, for data parallelism and
# for expert parallelism, with 2 local ranks (1 thread each) training the tiny
# V-MoE on Fashion-MNIST. Each rank's time inside c10d collectives is measured
# by the Communicator (waiting for the slower rank included) and rank 0 logs it
# per window as comm_share in log.jsonl; this prints the mean after warm-up.
# Run: bench/comm_share.sh [steps]   (after a build; MOEV= another moev binary,
# MOEV_BENCH_ARGS= extra train flags)
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${1:-150}"
every=$(( steps / 6 > 5 ? steps / 6 : 5 ))
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for mode in dp ep; do
  extra=""
  [ "$mode" = ep ] && extra="--set train.expert_parallel=true"
  "${MOEV:-build/moev}" launch --nproc 2 --master-port $((29600 + RANDOM % 300)) -- train --model vmoe-tiny \
    --max-steps "$steps" --threads 1 --set train.replicas=1 --set train.log_every=$every \
    --set train.progress=false --set train.eval_each_epoch=false --set train.checkpoint_every=0 \
    $extra ${MOEV_BENCH_ARGS:-} --out "$out/$mode" > "$out/$mode.txt" 2>&1 || { cat "$out/$mode.txt"; exit 1; }
  /usr/bin/python3 - "$out/$mode/log.jsonl" "$mode" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"comm_share"' in l][1:]  # first window: warm-up
share = sum(r["comm_share"] for r in rows) / len(rows)
rate = sum(r["images_per_s"] for r in rows) / len(rows)
name = {"dp": "data parallel  ", "ep": "expert parallel"}[sys.argv[2]]
print(f"{name}: {100 * share:5.1f}% of step time in communication, {rate:6.0f} img/s (2 ranks, tiny V-MoE, batch 128)")
PY
done
