"""A production server imports only `fpstune.kernels`: that must not load the tuner's packages.

Triton is loaded lazily, on the first GPU call, so a CPU run never imports it either.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

FORBIDDEN = ("optuna", "ray", "sqlalchemy", "plotly", "diffusers", "triton")

SCRIPT = textwrap.dedent(
    """
    import json, sys, tempfile, pathlib
    import fpstune.kernels as fk

    # Use what a server uses at start-up, not just the import.
    here = fk.current_fingerprint("cpu")
    spec = fk.AttentionSpec.from_dict({"mode": "fp8_dense", "tile": [2, 8, 8]})
    policy = fk.Policy(
        model=fk.ModelShape(
            name="m", heads=2, head_dim=64, layers=2, grid=[2, 8, 8], steps=2, cfg=2
        ),
        hardware=here,
        default=spec,
    )
    path = pathlib.Path(tempfile.mkdtemp()) / "policy.yaml"
    policy.dump(path)
    assert fk.Policy.load(path, hardware=here).spec(layer=1, step=1) == spec
    print(json.dumps(sorted(sys.modules)))
    """
)


def test_kernels_import_pulls_in_no_tuner_dependency() -> None:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    leaked = sorted(m for m in loaded if m.split(".")[0] in FORBIDDEN)
    assert not leaked, f"importing fpstune.kernels loaded {leaked}"


def test_the_attention_kernels_import_the_shared_preparation_not_each_other() -> None:
    """`dispatch` chooses between the kernels; each kernel file reads only `prepare`'s shared
    pre-pass and helpers (lazy imports count: they hide a cycle without removing it)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "kernels"
    for name in ("triton_attention", "gluon_attention"):
        tree = ast.parse((root / f"{name}.py").read_text())
        local = {
            (node.module or "").split(".")[-1]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level
        }
        assert local == {"prepare"}, (name, local)
