"""The CLI as a user meets it: --help, exit statuses, one-line errors, nothing written."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import shared_helpers
from service_helpers import DATA, TINY

fpstune = partial(shared_helpers.fpstune, timeout=300)


def test_help_explains_every_command(tmp_path: Path) -> None:
    out = fpstune("--help", cwd=tmp_path)
    assert out.returncode == 0
    for cmd in ("study", "export", "policy", "latency"):
        assert cmd in out.stdout
    run_help = fpstune("study", "run", "--help", cwd=tmp_path).stdout
    for opt in ("--storage", "--workers", "--trials", "--stage", "--ray-address"):
        assert opt in run_help


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["study", "run", "missing.yaml"], "missing.yaml"),
        (["study", "run", str(TINY), "--stage", "warp"], "--stage"),
        (["study", "run", str(TINY), "--storage", "nosuchdb://x"], "--storage"),
        (["study", "run", str(DATA / "kernel-tiny.yaml")], "kernel-tiny.yaml"),
        (["policy", "validate", "nope.yaml"], "nope.yaml"),
        (["policy", "validate", str(TINY)], "tiny.yaml"),
        (["study", "status", "nosuch"], "no study database at fpstune.db"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    tmp_path: Path, args: list[str], says: str
) -> None:
    out = fpstune(*args, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], out.stderr
    assert "Traceback" not in out.stderr
    assert not list(tmp_path.iterdir())  # no storage file, nothing half-written


@pytest.mark.parametrize(
    "args",
    [
        ["study", "run", "missing.yaml"],
        ["study", "run", str(TINY), "--storage", "nosuchdb://x"],
        ["policy", "validate", str(TINY)],
        ["study", "status", "nosuch"],
        ["export", "nosuch", "--output", "p.yaml"],
        ["report", "nosuch"],
    ],
)
def test_bad_input_is_told_before_torch_or_ray_start(tmp_path: Path, args: list[str]) -> None:
    """A mistyped file or study name is answered at once: the command validates its arguments
    before it imports torch or Ray (seconds on a laptop), as `python -X importtime` shows."""
    out = fpstune(*args, cwd=tmp_path, env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert out.returncode == 2, out.stderr[-2000:]
    imported = {ln.rsplit("|", 1)[1].strip() for ln in out.stderr.splitlines() if "|" in ln}
    assert "typer" in imported  # the import log is there
    assert not imported & {"torch", "ray", "triton", "diffusers"}, args


def test_stage_kernel_without_gpu_is_refused(tmp_path: Path) -> None:
    out = fpstune("study", "run", str(TINY), "--stage", "kernel", cwd=tmp_path)
    assert out.returncode == 2
    assert "needs a GPU" in out.stderr and len(out.stderr.strip().splitlines()) == 1
