#!/usr/bin/env bash
# The mini-e2e study on one GPU (run on the H100 for docs/quality.md) (TPE, 200 trials), the same study with random search
# (100 trials; it starts from the same baseline schedules as TPE does, so that the hypervolume
# comparison is fair), the four baselines; then benchmarks.mini_front on the storage. Run on the GPU
# machine from the repo root with the wheels of ../shared/gpu/pack-wheels.sh (+ diffusers,
# huggingface_hub<2, importlib_metadata, zipp, pydantic...) under .whl/. Writes under $OUT.
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"
rm -rf /tmp/site/huggingface_hub*
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site "${PKGS:-.whl}"/*.whl \
  && python3 -m pip install -q --upgrade --no-index --no-deps --no-build-isolation --target /tmp/site . \
  || exit 1
export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
ROOT=$PWD; mkdir -p /tmp/run && cd /tmp/run || exit 1
DB=sqlite:///$OUT/mini-e2e.db
python3 - "$ROOT" <<'PY'
import sys, yaml, pathlib
root = pathlib.Path(sys.argv[1])
d = yaml.safe_load((root / "studies/mini-e2e.yaml").read_text())
d["name"] = "mini-e2e-random"
d["sampler"] = {"name": "random", "seed": 0, "start_from_baselines": True}
for k in ("kernel_space", "schedule_space"):
    d[k] = str(root / "studies" / d[k])
pathlib.Path("mini-e2e-random.yaml").write_text(yaml.safe_dump(d))
PY
S=$(date +%s)
python3 -m fpstune study run $ROOT/studies/mini-e2e.yaml --trials ${TRIALS:-200} --storage $DB --no-progress 2>&1 | tail -3
echo "tpe run: $(( $(date +%s) - S )) s"
S=$(date +%s)
python3 -m fpstune baselines $ROOT/studies/mini-e2e.yaml --storage $DB 2>&1 | tail -5
echo "baselines: $(( $(date +%s) - S )) s"
S=$(date +%s)
python3 -m fpstune study run mini-e2e-random.yaml --trials ${RANDOM_TRIALS:-100} --storage $DB --no-progress 2>&1 | tail -2
echo "random run: $(( $(date +%s) - S )) s"
PYTHONPATH=$PYTHONPATH:$ROOT python3 -P -m benchmarks.mini_front --storage $DB --out $OUT/mini_front.json
