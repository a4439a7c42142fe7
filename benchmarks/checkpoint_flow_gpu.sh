#!/usr/bin/env bash
# The whole flow of docs/pipeline.md as a user runs it, on a full-size random-weight checkpoint:
# write a WanPipeline folder, capture, kernel stage for the shape, schedule study, export with
# --verify-e2e, then the pipeline's own generation with fpstune.apply vs without (timed in one
# process). Each step's wall time goes to $OUT/times.tsv; logs to $OUT/*.log.
#
# On the GPU machine, from the repo root, with the wheels of ../shared/gpu/pack-wheels.sh
# (+ diffusers, pydantic, pydantic-core) under .whl/:
#   STEPS="kernel" bash benchmarks/checkpoint_flow_gpu.sh                 # ~4 min on an H200
#   DB_IN=.flow/flow.db STEPS="ckpt capture schedule export" bash ...    # ~6 min
#   POLICY=.flow/policy.yaml STEPS="ckpt pipeline" bash ...             # ~5 min
# CPU smoke run (tiny model, 2 steps): NO_WHEELS=1 MODEL=tiny HEIGHT=64 WIDTH=64 FRAMES=5 NSTEPS=2 GRID=2,4,4
#   LAYERS=0,1 SAMPLE_STEPS=0,1 LAYER_GROUPS=1 ST=3 STEPS="ckpt capture schedule export" \
#   TARGET="{heads: 12, head_dim: 128, grid: [21, 45, 80], layers: 30, steps: 50}" \
#   bash benchmarks/checkpoint_flow_gpu.sh   (no kernel stage on a CPU: costed at 1.3B-720p)
set -uo pipefail
ROOT=$PWD
OUT=${OUT:-$ROOT/flow-out}; mkdir -p "$OUT"
W=${W:-/tmp/flow}; mkdir -p "$W"
MODEL=${MODEL:-1.3b} HEIGHT=${HEIGHT:-480} WIDTH=${WIDTH:-832} FRAMES=${FRAMES:-81}
NSTEPS=${NSTEPS:-50} GRID=${GRID:-21,30,52} KT=${KT:-3} ST=${ST:-24}
LAYERS=${LAYERS:-0,7,15,22,29} SAMPLE_STEPS=${SAMPLE_STEPS:-0,2,10,25,40,49}
STEPS=" ${STEPS:-kernel ckpt capture schedule export pipeline} "
step() { [[ "$STEPS" == *" $1 "* ]]; }
if [ -d .whl ] && [ -z "${NO_WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl \
    && python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site . || exit 1
  export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
fi
export PYTHONUNBUFFERED=1 FPSTUNE_CACHE=$W/cache
DB=$OUT/flow.db
[ -n "${DB_IN:-}" ] && cp "$DB_IN" "$DB"
CK=$W/checkpoint
fp() { (cd "$W" && python3 -m fpstune "$@"); }  # outside the checkout: the installed fpstune
# benchmarks.* from this checkout, fpstune as installed: -P keeps the checkout's folder off the
# front of sys.path, so /tmp/site's fpstune (with fpstune.kernels mapped) wins.
bench() { PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$ROOT python3 -P -m "benchmarks.$1" "${@:2}"; }
timed() {  # timed NAME CMD...: run, log, record the wall time
  local name=$1; shift; local t0=$EPOCHREALTIME
  "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  awk -v n="$name" -v a="$t0" -v b="$EPOCHREALTIME" -v rc=$rc 'BEGIN { printf "%s\t%.1f\t%s\n", n, b - a, rc }' \
    | tee -a "$OUT/times.tsv"
  tail -4 "$OUT/$name.log"
  return $rc
}

case $MODEL in  # e2e_bench.CONFIGS
  tiny) heads=2 layers=2 ;; 1.3b) heads=12 layers=30 ;; 14b) heads=40 layers=40 ;;
  *) echo "MODEL: tiny, 1.3b or 14b" >&2; exit 2 ;;
esac
cat > "$W/kernel.yaml" <<EOF
kind: kernel
modes: [bf16_dense, fp8_dense, fp8_sparse]
sparsities: [0.5, 0.9]
patterns: [window]
tiles: [[1, 16, 8]]
block_m: [64, 128]
block_n: [64, 128, 256]
num_warps: [4, 8]
num_stages: [2, 3, 4, 5]
impl: [triton, gluon_ws]
EOF
cat > "$W/schedule.yaml" <<EOF
kind: schedule
phases:
  bf16_until: {low: 0.0, high: 0.2, step: 0.02}
  fp8_dense_until: {low: 0.0, high: 0.5, step: 0.02}
sparse:
  splits: 2
  sparsity: {low: 0.5, high: 0.9, step: 0.05}
  pattern: [window]
  window: [[1, 1, 1], [2, 1, 1], [1, 1, 2]]
  tile: [[1, 16, 8]]
layers:
  dense_first: {low: 0, high: 3}
  dense_last: {low: 0, high: 2}
  dense_mode: fp8_dense
  groups: ${LAYER_GROUPS:-3}
  group_offset: [-0.1, 0.0, 0.05]
EOF
cat > "$W/flow.yaml" <<EOF
name: wan-flow
model: {name: wan-flow-$MODEL, adapter: wan-diffusers, heads: $heads, head_dim: 128,
        layers: $layers, grid: [$GRID], steps: $NSTEPS, cfg: 2, batch: 1}
kernel_space: kernel.yaml
schedule_space: schedule.yaml
objectives:
  - {name: latency_ms, direction: minimize}
  - {name: rel_l2, direction: minimize}
constraints:
  - {name: rel_l2, max: 0.1}
sampler: {name: tpe, seed: 0, options: {n_startup_trials: 8, multivariate: true, group: true, constant_liar: true}}
trials: {kernel: $KT, schedule: $ST}
calibration: {source: calib.safetensors, layers: [$LAYERS], steps: [$SAMPLE_STEPS]}
end_to_end: {seeds: [0], weights: checkpoint, min_psnr: ${MIN_PSNR:-20}}
latency: {warmup: 10, reps: 50, rotate_inputs: true${TARGET:+, target: $TARGET}}
EOF

# The kernel stage reads neither the capture nor the checkpoint: a copy of the study without them
# lets it run first (its latency rows are keyed by shape and GPU, not by study).
sed -e 's/^calibration:.*/calibration: {source: synthetic}/' -e '/^end_to_end:/d' "$W/flow.yaml" > "$W/flow-kernel.yaml"
step kernel && timed kernel fp study run flow-kernel.yaml --stage kernel --storage "sqlite:///$DB" --no-progress
step ckpt && timed ckpt bench write_wan_checkpoint --model "$MODEL" --out "$CK"
step capture && timed capture fp capture "$CK" -o calib.safetensors --prompt "a cat runs on the beach" \
  --negative-prompt "blurry" --height "$HEIGHT" --width "$WIDTH" --frames "$FRAMES" --steps "$NSTEPS" \
  --seeds 0 --layers "$LAYERS" --sample-steps "$SAMPLE_STEPS" --max-tokens 4096 \
  && du -sh "$W"/calib* | tee -a "$OUT/capture.log"
step schedule && timed schedule fp study run flow.yaml --storage "sqlite:///$DB" --no-progress
step export && timed export fp export flow.yaml --storage "sqlite:///$DB" -o "$OUT/policy.yaml" --verify-e2e 1 \
  && fp study status flow.yaml --storage "sqlite:///$DB" > "$OUT/status.log" 2>&1
step pipeline && timed pipeline bench pipeline_apply --checkpoint "$CK" \
  --policy "${POLICY:-$OUT/policy.yaml}" --out "$OUT/pipeline.json"
echo; echo "step	seconds	exit"; cat "$OUT/times.tsv"
