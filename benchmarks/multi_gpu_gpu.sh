#!/usr/bin/env bash
# Scaling over the GPUs of one host (nvidia-h200-x2 here): a kernel-level and a schedule-level
# study with 1..N Ray workers (one per GPU) on a PostgreSQL server started on loopback, then the
# same configs measured on every GPU (benchmarks.gpu_spread). Run from the repo root on the GPU
# host. The host has no package index and no PostgreSQL, so $PKGS (default .mgpu, git-ignored)
# holds: the wheels of ../shared/gpu/pack-wheels.sh plus psycopg (pure Python), and pg.tar.xz, a
# relocatable PostgreSQL 16 build (bin/postgres, initdb, pg_ctl; lib/ with libpq.so.5; share/)
# taken from the pgserver wheel (PyPI), static libraries dropped. Writes under $OUT.
set -uo pipefail
# NVLink multicast stays off on shared hosts (KINDS.md); Ray's workers inherit these.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"; PKGS=${PKGS:-.mgpu}; ROOT=$PWD
# Everything lands in $LOGS; $OUT gets one archive of it (the device tool returns 8 files at most).
LOGS=/tmp/multi-gpu; rm -rf $LOGS; mkdir -p $LOGS; trap 'tar czf "$OUT/multi_gpu.tgz" -C $LOGS .' EXIT
[ -n "${SKIP_INSTALL:-}" ] || {
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site "$PKGS"/*.whl \
    && python3 -m pip install -q --no-index --no-deps --no-build-isolation --upgrade --target /tmp/site . \
    || exit 1; }
[ -n "${SKIP_INSTALL:-}" ] || export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
export PYTHONUNBUFFERED=1

# PostgreSQL: the server refuses to run as root, so it runs as a user of its own.
PG=/tmp/pg; rm -rf $PG; mkdir -p $PG && tar xJf "$PKGS/pg.tar.xz" -C $PG || exit 1
# the server's own libraries, and libpq.so.5 where psycopg (ctypes) looks for it
printf '%s\n' $PG/pg/lib $PG/pg/pgserver.libs > /etc/ld.so.conf.d/fpstune-pg.conf && ldconfig
id fpspg >/dev/null 2>&1 || useradd -M -s /bin/sh fpspg
chown -R fpspg $PG $LOGS
as_pg() { runuser -u fpspg -- "$@"; }
as_pg $PG/pg/bin/initdb -D $PG/data -U postgres --auth=trust -E UTF8 --locale=C >$LOGS/initdb.log 2>&1 || { tail $LOGS/initdb.log; exit 1; }
as_pg $PG/pg/bin/pg_ctl -D $PG/data -l $LOGS/server.log -w \
  -o "-h 127.0.0.1 -p 55432 -k $PG -c max_connections=300 -c shared_buffers=1GB" start || exit 1
python3 -c "import psycopg; print('psycopg', psycopg.pq.__impl__, psycopg.pq.version())" || exit 1
python3 -c "import psycopg; psycopg.connect('postgresql://postgres@127.0.0.1:55432/postgres', autocommit=True).execute('CREATE DATABASE fpstune')" || exit 1
URL=postgresql+psycopg://postgres@127.0.0.1:55432/fpstune

nvidia-smi -L; nvidia-smi topo -m 2>/dev/null | head -5
GPUS=$(python3 -c "import torch; print(torch.cuda.device_count())")
WORKERS=${WORKERS:-$(seq -s ' ' 1 "$GPUS")}
STUDY=$ROOT/studies/${STUDY:-wan2.1-t2v-1.3b-480p}.yaml
NAME=$(python3 -c "import yaml,sys; print(yaml.safe_load(open(sys.argv[1]))['name'])" "$STUDY")
mkdir -p /tmp/run && cd /tmp/run || exit 1
step() { [[ " ${STEPS:-kernel schedule spread} " == *" $1 "* ]]; }
# benchmarks.* from this checkout, fpstune as installed: -P keeps the checkout's folder off the
# front of sys.path, so /tmp/site's fpstune (with fpstune.kernels mapped) wins.
BENCH=(env "PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$ROOT" python3 -P -m)
step kernel && timeout ${KERNEL_TIMEOUT:-300} "${BENCH[@]}" benchmarks.multi_gpu_scaling "$STUDY" --stage kernel \
  --storage $URL --workers $WORKERS --trials ${KERNEL_TRIALS:-3} --work $LOGS/kernel --out $LOGS/scaling-kernel.json 2>&1 | tail -6
step schedule && timeout ${SCHEDULE_TIMEOUT:-150} "${BENCH[@]}" benchmarks.multi_gpu_scaling "$STUDY" --stage schedule \
  --storage $URL --workers $WORKERS --trials ${SCHEDULE_TRIALS:-30} --work $LOGS/schedule --out $LOGS/scaling-schedule.json 2>&1 | tail -6
step spread && timeout ${SPREAD_TIMEOUT:-150} "${BENCH[@]}" benchmarks.gpu_spread --storage $URL \
  --study "$NAME-w${WORKERS##* }" --top 2 --repeats 3 --work $LOGS/spread --out $LOGS/spread.json 2>&1 | tail -40
as_pg $PG/pg/bin/pg_ctl -D $PG/data -m fast stop >/dev/null
