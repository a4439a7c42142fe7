"""Calibration sets: the Q/K/V that attention-output quality is judged on, per (layer, step).

On disk a set is one safetensors file (or an index and shards, below): tensors
``q/layer{L}/step{S}``, ``k/…``, ``v/…`` of shape (batch, heads, tokens, head_dim) in model token
order, and one header metadata entry ``fpstune`` holding JSON: format version, model name, grid
(of the stored tensors), the model's own grid, heads, head_dim, batch, the (layer, step) cells,
the model's layer and step counts, seed, source (``synthetic`` or ``captured``), dtype, and
(format 2) ``queries`` and ``query_box``.

`synthetic_calibration` makes a set with no model and no download: locally-peaked Q/K (a smooth 3D
positional component, so attention concentrates near each token as in video DiTs) plus noise whose
level grows with the denoising step index and varies per layer, so cells differ in how much
sparsity and FP8 hurt them. Every cell is generated from its own seed (seed, layer, step), so a
subset of cells is bit-identical to the same cells of the full set.

CPU studies of big models: pass a subset of ``layers``/``steps`` (see `evenly_spaced`) and a
``max_tokens`` cap; the cap shrinks the grid keeping its aspect (`cap_grid`) and is recorded
(``grid`` vs ``model_grid``), so the set says it is a smaller proxy of the real shape.

Sampled queries (format 2, what `fpstune capture --max-tokens` writes): k and v hold every token
of the grid, q only the rows listed by the ``query_index`` tensor (model token order, ascending;
metadata ``queries`` rows), which are whole boxes of ``query_box`` tokens aligned to the grid
origin (`query_rows`). A spec whose tile divides the box sees each sampled row exactly as the
full attention does (its q tile is whole; k and v are complete), see `fpstune.quality.probe`.
A large set is sharded: the index file holds the metadata, ``query_index`` and, under the header
key ``fpstune_cells``, the folder (next to it) holding one ``layer{L}-step{S}.safetensors`` per
cell (`CellWriter`). Format 1 files (one file, every query row) still load.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from fpstune.errors import one_line
from fpstune.kernels.atomic import replacing

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: no query sampling, no shards
META_KEY = "fpstune"
CELLS_KEY = "fpstune_cells"
QUERY_INDEX = "query_index"
SOURCES = ("synthetic", "captured")

Cell = tuple[int, int]  # (layer, step)
Grid = tuple[int, int, int]


class CalibrationError(ValueError):
    """A calibration file that cannot be used; the message is one line naming the file."""


@dataclass(frozen=True)
class CalibrationMeta:
    model: str
    grid: Grid
    model_grid: Grid
    heads: int
    head_dim: int
    batch: int
    cells: tuple[Cell, ...]
    model_layers: int
    model_steps: int
    seed: int | None
    source: str
    dtype: str
    queries: int | None = None  # query rows q holds (None: every token)
    query_box: Grid | None = None  # the whole boxes those rows make up (see `query_rows`)

    @property
    def tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def q_shape(self) -> tuple[int, int, int, int]:
        rows = self.tokens if self.queries is None else self.queries
        return (self.batch, self.heads, rows, self.head_dim)

    @property
    def capped(self) -> bool:
        return self.grid != self.model_grid

    @property
    def tensor_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.heads, self.tokens, self.head_dim)

    def to_json(self) -> str:
        d = asdict(self)
        d["format_version"] = FORMAT_VERSION
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CalibrationMeta:
        d = json.loads(text)
        if not isinstance(d, dict):
            raise ValueError("metadata is not a JSON object")
        version = d.pop("format_version", None)
        if version not in READABLE_VERSIONS:
            raise ValueError(
                f"format_version {version!r} is not supported "
                f"({', '.join(map(str, READABLE_VERSIONS))})"
            )
        optional = {"queries", "query_box"} if version == 1 else set()
        missing = set(cls.__dataclass_fields__) - optional - d.keys()
        unknown = d.keys() - set(cls.__dataclass_fields__)
        if missing or unknown:
            raise ValueError(f"metadata missing {sorted(missing)}, unknown {sorted(unknown)}")
        meta = cls(
            model=str(d["model"]),
            grid=_grid(d["grid"]),
            model_grid=_grid(d["model_grid"]),
            heads=int(d["heads"]),
            head_dim=int(d["head_dim"]),
            batch=int(d["batch"]),
            cells=tuple((int(c[0]), int(c[1])) for c in d["cells"]),
            model_layers=int(d["model_layers"]),
            model_steps=int(d["model_steps"]),
            seed=None if d["seed"] is None else int(d["seed"]),
            source=str(d["source"]),
            dtype=str(d["dtype"]),
            queries=None if d.get("queries") is None else int(d["queries"]),
            query_box=None if d.get("query_box") is None else _grid(d["query_box"]),
        )
        meta.validate()
        return meta

    def validate(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source {self.source!r} is not one of {', '.join(SOURCES)}")
        if min(self.heads, self.head_dim, self.batch, *self.grid, *self.model_grid) < 1:
            raise ValueError("heads, head_dim, batch and grid sizes must be positive")
        if (self.queries is None) != (self.query_box is None):
            raise ValueError("queries and query_box go together")
        if self.queries is not None and not 1 <= self.queries <= self.tokens:
            raise ValueError(f"queries {self.queries} is not in [1, {self.tokens}]")
        if self.query_box is not None and min(self.query_box) < 1:
            raise ValueError("query_box sizes must be positive")
        if not self.cells:
            raise ValueError("no (layer, step) cells")
        if len(set(self.cells)) != len(self.cells):
            raise ValueError("duplicate (layer, step) cells")
        for layer, step in self.cells:
            if not (0 <= layer < self.model_layers and 0 <= step < self.model_steps):
                raise ValueError(
                    f"cell [layer {layer}, step {step}] is outside the model's "
                    f"{self.model_layers} layers x {self.model_steps} steps"
                )


@dataclass(frozen=True)
class CalibrationSet:
    """Q/K/V per (layer, step) cell; tensors keyed ``q/layer{L}/step{S}`` etc. With
    ``query_index`` (sampled queries), q holds only those rows of the grid."""

    meta: CalibrationMeta
    tensors: dict[str, torch.Tensor]
    query_index: torch.Tensor | None = None

    @property
    def cells(self) -> tuple[Cell, ...]:
        return self.meta.cells

    def qkv(self, layer: int, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if (layer, step) not in self.meta.cells:
            raise KeyError(f"calibration set has no cell [layer {layer}, step {step}]")
        q, k, v = (self.tensors[tensor_name(x, layer, step)] for x in "qkv")
        return q, k, v

    def __iter__(self) -> Iterator[tuple[Cell, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
        for layer, step in self.cells:
            yield (layer, step), self.qkv(layer, step)

    def select(
        self, *, layers: Sequence[int] | None = None, steps: Sequence[int] | None = None
    ) -> CalibrationSet:
        """The cells whose layer is in ``layers`` and step in ``steps`` (None: any); KeyError
        naming a requested layer or step the set does not hold."""
        for name, want, have in (
            ("layer", layers, {c[0] for c in self.cells}),
            ("step", steps, {c[1] for c in self.cells}),
        ):
            missing = sorted(set(want or ()) - have)
            if missing:
                raise KeyError(f"calibration set has no {name} {missing[0]}")
        cells = tuple(
            (layer, step)
            for layer, step in self.cells
            if (layers is None or layer in layers) and (steps is None or step in steps)
        )
        keep = {tensor_name(x, layer, step) for layer, step in cells for x in "qkv"}
        meta = replace(self.meta, cells=cells)
        tensors = {n: t for n, t in self.tensors.items() if n in keep}
        return CalibrationSet(meta, tensors, self.query_index)

    def to(self, device: torch.device | str) -> CalibrationSet:
        idx = None if self.query_index is None else self.query_index.to(device)
        return CalibrationSet(self.meta, {n: t.to(device) for n, t in self.tensors.items()}, idx)


def tensor_name(which: str, layer: int, step: int) -> str:
    return f"{which}/layer{layer}/step{step}"


def evenly_spaced(n: int, k: int) -> list[int]:
    """``k`` indices spread over ``range(n)``, first and last included (all of them if k >= n)."""
    if k >= n:
        return list(range(n))
    if k == 1:
        return [0]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def cap_grid(grid: Sequence[int], max_tokens: int | None) -> Grid:
    """The grid, shrunk with its aspect kept until it holds at most ``max_tokens`` tokens."""
    g = _grid(grid)
    if max_tokens is None or math.prod(g) <= max_tokens:
        return g
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    f = (max_tokens / math.prod(g)) ** (1 / 3)
    out = [max(1, math.floor(x * f)) for x in g]
    while math.prod(out) > max_tokens:
        out[out.index(max(out))] -= 1
    return (out[0], out[1], out[2])


def query_rows(grid: Sequence[int], box: Sequence[int], max_tokens: int | None) -> torch.Tensor:
    """Model-order indices (ascending, int64) of a seeded sample of whole ``box``es of ``grid``,
    boxes aligned to the grid origin (edge boxes clipped), at most ``max_tokens`` rows but at
    least one box; every token when ``max_tokens`` is None or covers the grid."""
    g, b = _grid(grid), _grid(box)
    if min(b) < 1:
        raise ValueError(f"query box sizes must be positive, got {list(b)}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    n = math.prod(g)
    if max_tokens is None or max_tokens >= n:
        return torch.arange(n)
    per_axis = [math.ceil(x / s) for x, s in zip(g, b, strict=True)]
    order = torch.randperm(math.prod(per_axis), generator=torch.Generator().manual_seed(0))
    picked: list[torch.Tensor] = []
    total = 0
    for i in order.tolist():
        bt, rest = divmod(i, per_axis[1] * per_axis[2])
        bh, bw = divmod(rest, per_axis[2])
        t, h, w = (
            torch.arange(c * s, min((c + 1) * s, x))
            for c, s, x in zip((bt, bh, bw), b, g, strict=True)
        )
        rows = (
            t[:, None, None] * g[1] * g[2] + h[None, :, None] * g[2] + w[None, None, :]
        ).flatten()
        if picked and total + rows.numel() > max_tokens:
            continue
        picked.append(rows)
        total += rows.numel()
    return torch.cat(picked).sort().values


# -- synthetic sets -------------------------------------------------------------------------------

# Locality: per head, a Gaussian-kernel score profile sharp * exp(-|Δ/l|²/2) from random Fourier
# features; length scales in tokens, the temporal one shorter (latent frames are 4 video frames).
_SHARPNESS = (5.0, 10.0)
_LENGTH_HW = (1.0, 3.0)
_LENGTH_T = (0.6, 1.5)
_NOISE = 0.35  # noise level at the middle of the schedule (see `_cell`)
_K_OUTLIERS = 2  # channels of K with a large per-head offset (softmax-invariant; hurts FP8 scales)


def synthetic_calibration(
    model: Any,
    *,
    seed: int = 0,
    layers: Sequence[int] | None = None,
    steps: Sequence[int] | None = None,
    max_tokens: int | None = None,
    batch: int = 1,
    dtype: torch.dtype = torch.bfloat16,
) -> CalibrationSet:
    """A deterministic synthetic set for ``model`` (anything with name, heads, head_dim, layers,
    grid, steps: a policy's `ModelShape` or a study's model), over ``layers`` x ``steps``
    (default: all), on the grid capped at ``max_tokens`` tokens."""
    n_layers, n_steps = int(model.layers), int(model.steps)
    layers = list(range(n_layers)) if layers is None else sorted(set(layers))
    steps = list(range(n_steps)) if steps is None else sorted(set(steps))
    grid = cap_grid(model.grid, max_tokens)
    meta = CalibrationMeta(
        model=str(model.name),
        grid=grid,
        model_grid=_grid(model.grid),
        heads=int(model.heads),
        head_dim=int(model.head_dim),
        batch=batch,
        cells=tuple((layer, step) for layer in layers for step in steps),
        model_layers=n_layers,
        model_steps=n_steps,
        seed=seed,
        source="synthetic",
        dtype=str(dtype).removeprefix("torch."),
    )
    meta.validate()
    coords = _coords(grid)
    tensors: dict[str, torch.Tensor] = {}
    for layer in layers:
        layer_params = _layer_params(seed, layer, meta.heads, meta.head_dim)
        for step in steps:
            q, k, v = _cell(seed, layer, step, n_steps, coords, layer_params, batch)
            for name, x in zip("qkv", (q, k, v), strict=True):
                tensors[tensor_name(name, layer, step)] = x.to(dtype).contiguous()
    return CalibrationSet(meta, tensors)


@dataclass(frozen=True)
class _LayerParams:
    omega_qk: torch.Tensor  # (H, D/2, 3) frequencies of the positional score kernel
    omega_v: torch.Tensor  # (H, D/2, 3) frequencies of the smooth value field
    rot: torch.Tensor  # (H, D, D) orthogonal: mixes features across channels
    sharp: torch.Tensor  # (H,) peak logit
    k_offset: torch.Tensor  # (H, D) softmax-invariant offset with a few outlier channels
    noise: float  # this layer's noise factor


def _layer_params(seed: int, layer: int, heads: int, head_dim: int) -> _LayerParams:
    g = torch.Generator().manual_seed(_mix(seed, layer, -1))
    half = head_dim // 2

    def uniform(lo_hi: tuple[float, float], *shape: int) -> torch.Tensor:
        lo, hi = lo_hi
        return lo + (hi - lo) * torch.rand(*shape, generator=g, dtype=torch.float64)

    length = torch.stack(
        (uniform(_LENGTH_T, heads), uniform(_LENGTH_HW, heads), uniform(_LENGTH_HW, heads)), -1
    )
    omega_qk = torch.randn(heads, half, 3, generator=g, dtype=torch.float64) / length[:, None, :]
    omega_v = torch.randn(heads, half, 3, generator=g, dtype=torch.float64) / (2 * length[:, None])
    rot = torch.linalg.qr(torch.randn(heads, head_dim, head_dim, generator=g, dtype=torch.float64))[
        0
    ]
    k_offset = torch.zeros(heads, head_dim, dtype=torch.float64)
    idx = torch.randint(0, head_dim, (heads, _K_OUTLIERS), generator=g)
    k_offset.scatter_(
        1, idx, 4.0 * torch.randn(heads, _K_OUTLIERS, generator=g, dtype=torch.float64)
    )
    noise = float(0.6 + 0.8 * torch.rand((), generator=g, dtype=torch.float64))
    return _LayerParams(omega_qk, omega_v, rot, uniform(_SHARPNESS, heads), k_offset, noise)


def _cell(
    seed: int,
    layer: int,
    step: int,
    n_steps: int,
    coords: torch.Tensor,
    p: _LayerParams,
    batch: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(_mix(seed, layer, step))
    heads, half, _ = p.omega_qk.shape
    d = 2 * half
    n = coords.shape[0]

    def features(omega: torch.Tensor) -> torch.Tensor:  # (H, N, D), rows of unit norm
        phase = torch.einsum("nc,hfc->hnf", coords, omega)
        return torch.cat((phase.cos(), phase.sin()), -1) / math.sqrt(half)

    # q·k / sqrt(d) = sharp * φ(x)·φ(y) ≈ sharp * exp(-|Δ/l|²/2): local, peaked at Δ = 0.
    amp = (p.sharp * math.sqrt(d)).sqrt().view(heads, 1, 1)
    pos = features(p.omega_qk) @ p.rot * amp
    frac = step / max(1, n_steps - 1)
    sigma = _NOISE * p.noise * (0.5 + frac)  # grows along the schedule, varies per layer
    shape = (batch, heads, n, d)
    # Noise on each channel at amp / d**(1/4): its logits reach ~sharp * sigma / d**(1/4), enough
    # to spread attention mass late in the schedule without erasing locality.
    scale = amp / d**0.25

    def noisy() -> torch.Tensor:
        return torch.randn(shape, generator=g, dtype=torch.float64) * scale * sigma

    q = pos + noisy()
    k = pos + noisy() + p.k_offset.view(1, heads, 1, d)
    v_field = features(p.omega_v) @ p.rot * math.sqrt(d)
    v = v_field + 0.5 * torch.randn(shape, generator=g, dtype=torch.float64)
    return q.float(), k.float(), v.float()


def _coords(grid: Grid) -> torch.Tensor:
    t, h, w = (torch.arange(x, dtype=torch.float64) for x in grid)
    return torch.cartesian_prod(t, h, w)  # (N, 3) in (t, h, w) row-major: model token order


def _mix(seed: int, layer: int, step: int) -> int:
    return (seed * 1_000_003 + (layer + 1) * 10_007 + (step + 2) * 101) % (2**63 - 1)


# -- files ----------------------------------------------------------------------------------------


def save_calibration(cal: CalibrationSet, path: str | os.PathLike[str]) -> None:
    """Write a set as one safetensors file (atomically: a temp file in the same folder, then
    rename)."""
    _check_tensors(cal, str(path))
    tensors = dict(cal.tensors)
    if cal.query_index is not None:
        tensors[QUERY_INDEX] = cal.query_index
    _save(tensors, Path(path), {META_KEY: cal.meta.to_json()})


class CellWriter:
    """Writes a set cell by cell, each to its own shard as it comes (memory: one cell), then the
    index last (atomically), so a reader sees a whole set or none. Shards go to a fresh folder
    ``NAME.cells-XXXX`` next to ``path``; `finish` removes older ones of the same name."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.prefix = self.path.name.removesuffix(".safetensors") + ".cells-"
        self.folder = Path(tempfile.mkdtemp(prefix=self.prefix, dir=self.path.parent))
        self.folder.chmod(0o755)  # mkdtemp's 0700 would hide the set from other users

    def write(
        self, layer: int, step: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        tensors = {tensor_name(x, layer, step): t for x, t in zip("qkv", (q, k, v), strict=True)}
        for name, t in tensors.items():
            if not bool(torch.isfinite(t).all()):
                raise CalibrationError(f"{self.path}: tensor {name}: holds NaN or Inf")
        _save(tensors, self.folder / _shard_name(layer, step), {})

    def finish(self, meta: CalibrationMeta, query_index: torch.Tensor | None) -> None:
        meta.validate()
        tensors = {} if query_index is None else {QUERY_INDEX: query_index}
        header = {META_KEY: meta.to_json(), CELLS_KEY: self.folder.name}
        _check_index(meta, query_index, str(self.path))
        _save(tensors, self.path, header)
        for old in self.path.parent.iterdir():
            ours = old.name.startswith(self.prefix) and len(old.name) == len(self.folder.name)
            # by name: mkdtemp's path is absolute on Python >= 3.12, iterdir's may be relative
            if ours and old.name != self.folder.name and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _shard_name(layer: int, step: int) -> str:
    return f"layer{layer}-step{step}.safetensors"


def _save(tensors: Mapping[str, torch.Tensor], path: Path, header: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    out = {n: t.detach().cpu().contiguous() for n, t in tensors.items()}
    with replacing(path) as tmp:
        save_file(out, str(tmp), metadata=header)


def load_calibration(path: str | os.PathLike[str], *, model: Any = None) -> CalibrationSet:
    """Read and validate a set; with ``model``, also check heads, head_dim, layers and steps.

    Raises `CalibrationError` (one line, naming the file and, where one is at fault, the tensor)
    for a missing or unreadable file, bad metadata, a missing/extra/misshapen tensor, or NaN/Inf.
    """
    where = str(path)
    header, tensors = read_safetensors(path, what="calibration file", error=CalibrationError)
    if META_KEY not in header:
        raise CalibrationError(f"{where}: no {META_KEY!r} metadata in the safetensors header")
    try:
        meta = CalibrationMeta.from_json(header[META_KEY])
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise CalibrationError(f"{where}: metadata: {one_line(e)}") from None
    query_index = tensors.pop(QUERY_INDEX, None)
    _check_index(meta, query_index, where)
    if CELLS_KEY in header:  # sharded: the index holds no cells
        tensors = {}
        folder = Path(path).parent / header[CELLS_KEY]
        for layer, step in meta.cells:
            shard = folder / _shard_name(layer, step)
            _, part = read_safetensors(shard, what="calibration shard", error=CalibrationError)
            tensors.update(part)
    cal = CalibrationSet(meta, tensors, query_index)
    _check_tensors(cal, where)
    if model is not None:
        check_fits(cal, model, where=where)
    return cal


def check_fits(cal: CalibrationSet, model: Any, *, where: str = "calibration set") -> None:
    """Raise `CalibrationError` if ``cal`` was not made for ``model``'s attention shape."""
    m = cal.meta
    for name, ours, theirs in (
        ("heads", m.heads, int(model.heads)),
        ("head_dim", m.head_dim, int(model.head_dim)),
        ("layers", m.model_layers, int(model.layers)),
        ("steps", m.model_steps, int(model.steps)),
        ("grid", m.model_grid, _grid(model.grid)),
    ):
        if ours != theirs:
            raise CalibrationError(
                f"{where}: {name}: calibration set has {_show(ours)}, model has {_show(theirs)}"
            )


def _check_index(meta: CalibrationMeta, index: torch.Tensor | None, where: str) -> None:
    if meta.queries is None:
        if index is not None:
            raise CalibrationError(f"{where}: tensor {QUERY_INDEX} in a set of every query row")
        return
    if index is None:
        raise CalibrationError(f"{where}: tensor {QUERY_INDEX} is missing")
    ok = index.dtype == torch.int64 and tuple(index.shape) == (meta.queries,)
    if not ok or (index.numel() and (index.min() < 0 or index.max() >= meta.tokens)):
        raise CalibrationError(
            f"{where}: tensor {QUERY_INDEX}: expected {meta.queries} int64 token indices "
            f"in [0, {meta.tokens})"
        )
    if index.numel() > 1 and not bool((index[1:] > index[:-1]).all()):
        raise CalibrationError(f"{where}: tensor {QUERY_INDEX}: not strictly ascending")


def _check_tensors(cal: CalibrationSet, where: str) -> None:
    meta = cal.meta
    expected = {tensor_name(x, layer, step) for layer, step in meta.cells for x in "qkv"}
    missing = sorted(expected - cal.tensors.keys())
    if missing:
        raise CalibrationError(f"{where}: tensor {missing[0]} is missing ({len(missing)} missing)")
    extra = sorted(cal.tensors.keys() - expected)
    if extra:
        raise CalibrationError(f"{where}: tensor {extra[0]} is not a listed cell")
    for name in sorted(expected, key=_cell_order):
        t = cal.tensors[name]
        want = meta.q_shape if name.startswith("q/") else meta.tensor_shape
        if tuple(t.shape) != want:
            rows = "sampled query rows" if want != meta.tensor_shape else "tokens"
            raise CalibrationError(
                f"{where}: tensor {name}: shape {list(t.shape)}, expected {list(want)} "
                f"(batch, heads, {rows} of grid {list(meta.grid)}, head_dim)"
            )
        if not t.is_floating_point():
            raise CalibrationError(f"{where}: tensor {name}: dtype {t.dtype} is not floating")
        if not bool(torch.isfinite(t).all()):
            what = "NaN" if bool(torch.isnan(t).any()) else "Inf"
            count = int((~torch.isfinite(t)).sum())
            raise CalibrationError(f"{where}: tensor {name}: holds {what} ({count} non-finite)")


def _cell_order(name: str) -> tuple[int, int, str]:
    which, layer, step = name.split("/")
    return (int(layer.removeprefix("layer")), int(step.removeprefix("step")), which)


def _grid(g: Sequence[int]) -> Grid:
    if len(g) != 3:
        raise ValueError(f"grid must have three sizes (T, H, W), got {list(g)}")
    return (int(g[0]), int(g[1]), int(g[2]))


def _show(value: Any) -> str:
    return str(list(value)) if isinstance(value, tuple) else str(value)


def read_safetensors(
    path: str | os.PathLike[str], *, what: str, error: type[Exception]
) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The metadata and every tensor of a safetensors file a user handed in; ``error`` (one
    line naming the file, e.g. ``x: no such calibration file``) when it is missing or not one."""
    from safetensors import SafetensorError, safe_open

    from fpstune.safetensors_check import check_safetensors

    where = str(path)
    check_safetensors(path, what=what, error=error)  # dtypes, sizes: before any tensor is read
    try:
        with safe_open(where, framework="pt") as f:
            header = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as e:
        raise error(f"{where}: not a safetensors file: {one_line(e)}") from None
    return header, tensors
