#!/usr/bin/env bash
# The tuning service on one GPU, end to end (run on the GPU machine from the repo root, with the
# wheels from ../shared/gpu/pack-wheels.sh under .whl/). Writes logs, SQLite studies and the
# latency tables under $OUT (default ./gpu-out):
#   1. kernel stage of studies/mini.yaml (its latency table);
#   2. schedule stage of the mini study on that table, export with one end-to-end run;
#   3. kernel stage of studies/wan2.1-t2v-1.3b-720p.yaml;
#   4. measurement noise: one config measured 10 times (SKIP_NOISE=1 skips it).
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
  && python3 -m pip install -q --upgrade --no-index --no-deps --no-build-isolation --target /tmp/site . \
  || exit 1
export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
# Run outside the checkout so `fpstune` is the installed package (with fpstune.kernels mapped).
ROOT=$PWD; mkdir -p /tmp/run && cd /tmp/run || exit 1
fp() { python3 -m fpstune "$@"; }
KT=${KERNEL_TRIALS:-3}
STEPS=" ${STEPS:-kmini sched k720 noise} "  # which steps to run
step() { [[ "$STEPS" == *" $1 "* ]]; }

step kmini && { echo "== kernel stage: mini"; fp study run $ROOT/studies/mini.yaml --stage kernel --trials "$KT" \
  --storage "sqlite:///$OUT/mini.db" --no-progress 2>&1 | tail -12 | tee "$OUT/kernel-mini.log"
fp latency export --storage "sqlite:///$OUT/mini.db" -o "$OUT/latency-mini.json"; }

step sched && {
echo "== schedule stage on the measured table, then export with an end-to-end run (${SCHEDULE_STUDY:=mini})"
study=$ROOT/studies/$SCHEDULE_STUDY.yaml; db=sqlite:///$OUT/$SCHEDULE_STUDY.db
[ "$SCHEDULE_STUDY" = mini ] || db=sqlite:///$OUT/wan720.db
[ -n "${SKIP_SCHEDULE_RUN:-}" ] || fp study run "$study" --trials "${SCHEDULE_TRIALS:-12}" --storage "$db" --no-progress 2>&1 \
  | tail -5 | tee "$OUT/schedule.log"
fp export "$study" --storage "$db" -o "$OUT/policy.yaml" 2>&1 | tail -5 | tee "$OUT/export.log"
fp policy validate "$OUT/policy.yaml" 2>&1 | tail -2; }

step k720 && {
echo "== kernel stage: wan2.1-t2v-1.3b-720p"
fp study run $ROOT/studies/wan2.1-t2v-1.3b-720p.yaml --stage kernel --trials "$KT" \
  --storage "sqlite:///$OUT/wan720.db" --no-progress 2>&1 | tail -12 | tee "$OUT/kernel-720p.log"
fp latency export --storage "sqlite:///$OUT/wan720.db" -o "$OUT/latency-720p.json"; }

step noise && {
echo "== noise: one config measured 10 times (1x12x75600x128, fp8_sparse window 90%)"
python3 - <<'PY' 2>&1 | tee "$OUT/noise.log"
import statistics, torch
from fpstune.stages.evaluators import KernelEvaluator
from fpstune.stages.candidates import KernelCandidate
from fpstune.latency.shape import AttentionShape
shape = AttentionShape(batch=1, heads=12, head_dim=128, grid=(21, 45, 80))
ev = KernelEvaluator(shape, device=torch.device("cuda"), warmup=10, reps=50, rotate_inputs=True)
spec = {"mode": "fp8_sparse", "tile": [1, 16, 8], "sparsity": 0.9, "pattern": {"kind": "window"}}
candidate = KernelCandidate.from_attr({"stage": "kernel", "spec": spec})
rows = [ev.evaluate(candidate) for _ in range(10)]
med = [r.values["latency_ms"] for r in rows]
rel = [r.attrs["iqr_ms"] / r.values["latency_ms"] for r in rows]
print("medians ms", [round(m, 3) for m in med])
print(f"IQR/median per measurement: max {max(rel):.4f}, median {statistics.median(rel):.4f}")
print(f"spread of the 10 medians: {(max(med) - min(med)) / statistics.median(med):.4f}")
PY
}

