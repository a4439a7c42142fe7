#!/usr/bin/env bash
# Issue 7 on one GPU, from the repo root: the GPU kernel tests (FlashAttention's accuracy rule for
# every mode and config, exp2 variants included), the Gluon kernel's schedule ablations
# (benchmarks/gluon_schedule.py), the kernel variants against cuDNN (benchmarks/kernel_variants.py)
# and the Wan2.1 end-to-end bench (benchmarks/e2e_bench.py).
# Wheels for what the GPU host lacks (pydantic stack, diffusers, huggingface_hub<2,
# importlib_metadata, zipp) under $PKGS (default .gpu7). STEPS picks: tests schedule variants e2e;
# TESTS_ARGS adds pytest arguments (one word, e.g. "-kgluon"); E2E_ARGS are read from /tmp/run, so
# give paths in them absolute (e.g. --policy $PWD/docs/policies/mini-e2e-run6-25db.yaml).
# Writes under $OUT.
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"; PKGS=${PKGS:-.gpu7}; ROOT=$PWD
rm -rf /tmp/site/huggingface_hub*
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site "$PKGS"/*.whl \
  && python3 -m pip install -q --no-index --no-deps --no-build-isolation --upgrade --target /tmp/site . \
  || exit 1
export PYTHONUNBUFFERED=1
step() { [[ " ${STEPS:-tests schedule variants e2e} " == *" $1 "* ]]; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv,noheader
step tests && {
  ln -sfn ../kernels fpstune/kernels
  PYTHONPATH=$ROOT:/tmp/site timeout ${TESTS_TIMEOUT:-240} python3 -m pytest -q -m gpu tests/kernels ${TESTS_ARGS:-} \
    -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -5
  rm fpstune/kernels; }
export PYTHONPATH=/tmp/site
mkdir -p /tmp/run && cd /tmp/run || exit 1
step schedule && timeout ${SCHEDULE_TIMEOUT:-150} python3 $ROOT/benchmarks/gluon_schedule.py \
  --out "$OUT/schedule.json" 2>&1 | tee "$OUT/schedule.log" | tail -12
step variants && timeout ${VARIANTS_TIMEOUT:-300} python3 $ROOT/benchmarks/kernel_variants.py \
  --out "$OUT/variants.json" 2>&1 | tee "$OUT/variants.log" | tail -45
step e2e && timeout ${E2E_TIMEOUT:-420} python3 $ROOT/benchmarks/e2e_bench.py --reps ${E2E_REPS:-2} \
  ${E2E_ARGS:-} --out "$OUT/e2e.json" 2>&1 | tee "$OUT/e2e.log" | tail -40
