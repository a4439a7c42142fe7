#!/usr/bin/env bash
# The joint text + video models on one GPU machine without a package index, each part under the
# device tool's 10-minute limit (the figures of docs/performance.md, "Joint text + video models"):
#   bash benchmarks/joint_models_gpu.sh a   # kernel_bench HunyuanVideo 720p with and without its
#                                           # text; CogVideoX-5B and LTX-Video forwards (~2 min)
#   bash benchmarks/joint_models_gpu.sh b   # HunyuanVideo 13B forward at 720p (~4 min)
#   bash benchmarks/joint_models_gpu.sh t   # the GPU tests of tests/kernels and tests/models (~3 min)
# From the repo root, with the wheels of ../shared/gpu/pack-wheels.sh diffusers pydantic
# pydantic-core under .whl/; logs and JSON results go to $OUT.
set -u
OUT=${OUT:-$PWD/joint-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --upgrade --target /tmp/site . > $OUT/install.log 2>&1 || tail -5 $OUT/install.log
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
part=${1:-a}
mkdir -p /tmp/b && cp -r benchmarks /tmp/b/
if [ "$part" = a ]; then
  timeout 200 python3 benchmarks/kernel_bench.py --shapes hunyuan-720p hunyuan-720p-video \
     --kernel gluon_ws --quick --skip cudnn_fp8 --results $OUT > $OUT/kernel_bench_hv.log 2>&1
  tail -14 $OUT/kernel_bench_hv.log
  (cd /tmp/b && timeout 300 python3 -m benchmarks.model_step --models cogvideox-5b ltx-video --reps 3 --results $OUT > $OUT/model_step.log 2>&1)
  tail -30 $OUT/model_step.log
elif [ "$part" = t ]; then
  (cd tests && timeout 560 python3 -P -m pytest -q -m gpu kernels models -p no:cacheprovider -x 2>&1 | tail -15) | tee $OUT/gpu_tests.log
else
  (cd /tmp/b && timeout 560 python3 -m benchmarks.model_step --models hunyuanvideo --kernel gluon_ws --reps 2 --results $OUT > $OUT/model_step_hv.log 2>&1)
  tail -30 $OUT/model_step_hv.log
fi
