"""Give the top-level name ``kernels`` back to the package that owns it.

This folder is installed as ``fpstune.kernels``, but a Python started in the repository root
also sees it as a top-level ``kernels``, which hides Hugging Face's ``kernels`` package that
transformers and diffusers import. ``kernels/__init__.py`` calls `load_upstream` in that case.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def load_upstream(name: str, init_file: str) -> None:
    """Put the ``name`` package found on sys.path outside this repository in ``sys.modules``
    (the import statement then returns it), or raise ModuleNotFoundError as if this folder
    were not on the path."""
    repo_root = os.path.dirname(os.path.dirname(os.path.realpath(init_file)))
    elsewhere = [p for p in sys.path if os.path.realpath(p or os.curdir) != repo_root]
    spec = importlib.machinery.PathFinder.find_spec(name, elsewhere)
    sys.modules.pop(f"{name}._upstream", None)  # this helper is not part of that package
    if spec is None or spec.loader is None:  # absent, or only a namespace folder
        del sys.modules[name]
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
