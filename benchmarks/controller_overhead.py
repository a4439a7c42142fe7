"""Controller orchestration overhead per trial on PostgreSQL, as `fpstune study run` reports it.

Each run: a fresh database on the server, the synthetic latency table the service tests use, then
exactly

    fpstune study run tests/service/data/tiny.yaml --storage postgresql+psycopg://... \\
        --workers W --trials N

in its own process (its own local Ray). The summary line gives the controller's wall and CPU time
per trial, outside the sampler and outside waiting for workers, and the sampler's. While it runs,
the CPU time of the database's server processes is sampled from /proc (Linux; a server on this
machine), so a slow trial can be told apart: controller CPU, server CPU, or waiting for a core.

    FPSTUNE_TEST_PG_URL=postgresql+psycopg://fpstune:...@127.0.0.1:5432/postgres \\
        python3 -m benchmarks.controller_overhead --workers 8 1 --runs 3 --trials 100

Writes benchmarks/results/<date>-cpu-controller_overhead.json (the controller runs on the CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from fpstune.latency.bench import environment, result_args, write_result

ROOT = Path(__file__).resolve().parents[1]
TINY = "tests/service/data/tiny.yaml"
# The service tests' synthetic latency table, filled by the checkout under test (its
# tests/service on PYTHONPATH).
_FILL = (
    "import sys; from service_helpers import TINY, fill_latency_table; "
    "from fpstune.spec.study import load_study; fill_latency_table(sys.argv[1], load_study(TINY))"
)

_SUMMARY = re.compile(
    r"(?P<complete>\d+)/(?P<budget>\d+) complete, (?P<failed>\d+) failed, front \d+, "
    r"(?P<elapsed_s>[\d.]+) s, controller overhead (?P<overhead_ms>[\d.]+) ms/trial "
    r"\((?P<overhead_cpu_ms>[\d.]+) ms CPU\), sampler (?P<sampler_ms>[\d.]+) ms/trial "
    r"\((?P<sampler_cpu_ms>[\d.]+) ms CPU\)"
)
_TICK_S = 1 / os.sysconf("SC_CLK_TCK")


class ServerCpu(threading.Thread):
    """CPU seconds of the server processes serving one database, polled from /proc (a process
    that exits between two polls loses at most one poll interval)."""

    def __init__(self, database: str, every_s: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.database, self.every_s = database, every_s
        self.seen: dict[int, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.every_s):
            for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if cmd.startswith(b"postgres: ") and f" {self.database} ".encode() in cmd:
                    self.seen[pid] = (int(stat[11]) + int(stat[12])) * _TICK_S

    def seconds(self) -> float:
        return sum(self.seen.values())


def one_run(admin_url: str, workers: int, trials: int, tree: Path = ROOT) -> dict[str, Any]:
    name = f"fpstune_bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(sa.text(f"CREATE DATABASE {name}"))
    url = sa.engine.make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    env = {**os.environ, "PYTHONPATH": str(tree)}  # that checkout's fpstune, Ray workers too
    try:
        helpers = {**env, "PYTHONPATH": f"{tree}{os.pathsep}{tree / 'tests' / 'service'}"}
        subprocess.run([sys.executable, "-c", _FILL, url], cwd=tree, env=helpers, check=True)
        cmd = [sys.executable, "-m", "fpstune", "study", "run", TINY, "--storage", url]
        cmd += ["--workers", str(workers), "--trials", str(trials)]
        server = ServerCpu(name)
        server.start()
        load_before = os.getloadavg()[0]
        t0 = time.monotonic()
        done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, check=True)
        out = done.stdout
        wall = time.monotonic() - t0
        server.stop.set()
        server.join()
    finally:
        with admin.connect() as c:
            c.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()
    m = _SUMMARY.search(out)
    if m is None:
        raise RuntimeError(f"no summary line in the output:\n{out}")
    row: dict[str, Any] = {"workers": workers, "trials": trials, "process_wall_s": wall}
    # Other jobs on the machine stretch every wall figure: say how busy it was.
    row["load_1min_before"], row["load_1min_after"] = load_before, os.getloadavg()[0]
    row.update({k: float(v) for k, v in m.groupdict().items()})
    row["summary"] = out[out.rfind("\n", 0, m.start()) + 1 : out.find("\n", m.end())]
    row["server_cpu_ms_per_trial"] = 1000 * server.seconds() / trials
    return row


def main() -> None:
    ap = argparse.ArgumentParser(
        prog="python3 -m benchmarks.controller_overhead",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--workers", type=int, nargs="+", default=[8, 1])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--pg-url", default=os.environ.get("FPSTUNE_TEST_PG_URL"))
    result_args(ap)
    ap.add_argument(
        "--tree",
        type=Path,
        default=ROOT,
        help="run the fpstune of this checkout (e.g. `git archive` of an older commit whose CLI "
        "prints the same summary) instead of this one",
    )
    args = ap.parse_args()
    if not args.pg_url:
        ap.error("--pg-url (or FPSTUNE_TEST_PG_URL): an admin URL of the PostgreSQL server")
    rows: list[dict[str, Any]] = []
    env = environment("cpu")
    path = None
    for workers in args.workers:
        for _ in range(args.runs):
            row = one_run(args.pg_url, workers, args.trials, args.tree.resolve())
            rows.append(row)
            print(json.dumps(row), flush=True)
            payload = {"tree": str(args.tree), "rows": rows}
            path = write_result("controller_overhead", payload, out=args.out,
                                folder=args.results, env=env)  # fmt: skip
    keys = ["overhead_ms", "overhead_cpu_ms", "sampler_ms", "sampler_cpu_ms"]
    keys += ["server_cpu_ms_per_trial", "elapsed_s", "process_wall_s"]
    print(f"\n{'workers':>7} {'figure':>24} {'median':>8} {'min':>8} {'max':>8}")
    for workers in args.workers:
        mine = [r for r in rows if r["workers"] == workers]
        for k in keys:
            v = [r[k] for r in mine]
            print(f"{workers:>7} {k:>24} {statistics.median(v):8.1f} {min(v):8.1f} {max(v):8.1f}")
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
