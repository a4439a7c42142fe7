"""``fpstune study init``: a study YAML for a user's checkpoint, from its transformer config.

The adapter is the one that recognises the checkpoint's ``transformer/config.json``
``_class_name`` (or ``--adapter``); the ``model`` section is that adapter's `shape` at the given
video size; everything else is what the shipped Wan studies (``studies/wan2.1-*.yaml``) use: the
shipped search spaces by a path relative to the written file, ``latency_ms`` and ``rel_l2``
objectives with ``rel_l2 <= 0.1``, TPE, 40 kernel trials per bucket and 300 schedule trials,
synthetic calibration on a sample of layers and steps (or the ``--calibration`` capture's
cells). The file is validated as `load_study` validates it before it is written, atomically.

An adapter recognises a class when it lists it in an optional ``transformer_classes``
attribute, or, without one, when its `serves` accepts a bare instance of that diffusers class.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from fpstune.errors import BadInput, one_line
from fpstune.outputs import check_output

if TYPE_CHECKING:
    from fpstune.kernels.policy import ModelShape
    from fpstune.models.adapters import ModelAdapter


def _shipped_spaces() -> Path:
    found = importlib.util.find_spec("fpstune.search_spaces")
    locations = found.submodule_search_locations if found is not None else None
    return Path(next(iter(locations))) if locations else Path("search_spaces")


#: The shipped search spaces: the repository's ``search_spaces/``, installed as the package data
#: ``fpstune.search_spaces`` (pyproject.toml), so an installed fpstune has them too.
SPACES = _shipped_spaces()
KERNEL_SPACE = "kernel-default.yaml"
SCHEDULE_SPACE = "schedule-default.yaml"
TRANSFORMER_CONFIG = Path("transformer") / "config.json"
_RESOLUTION = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_CLASS = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def study_init_cmd(
    model_dir: Annotated[
        Path,
        typer.Argument(
            help="Local diffusers checkpoint folder (its transformer/config.json is read; no "
            "weights are loaded), e.g. ./Wan2.1-T2V-1.3B-Diffusers."
        ),
    ],
    resolution: Annotated[
        str,
        typer.Option(
            help="Video WIDTHxHEIGHT in pixels, e.g. 832x480 (Wan 480p) or 1280x720; both a "
            "multiple of the model's VAE x patch factor (16 for Wan).",
        ),
    ],
    frames: Annotated[int, typer.Option(help="Video frames, e.g. 81 (Wan: 1 + a multiple of 4).")],
    steps: Annotated[
        int, typer.Option(min=1, max=1000, help="Denoising steps, e.g. --steps 50.")
    ] = 50,
    cfg: Annotated[
        bool,
        typer.Option(
            "--cfg/--no-cfg",
            help="Classifier-free guidance: 2 attention passes per layer and step (--cfg), or 1 "
            "(--no-cfg: a capture's --guidance 1).",
        ),
    ] = True,
    adapter: Annotated[
        str | None,
        typer.Option(
            help="Model adapter, e.g. --adapter wan-diffusers (default: the one that "
            "recognises the transformer config's _class_name).",
        ),
    ] = None,
    calibration: Annotated[
        Path | None,
        typer.Option(
            help="A capture (fpstune capture -o calib.safetensors) to score quality on, e.g. "
            "--calibration calib.safetensors; its cells become calibration.layers and .steps "
            "(default: synthetic Q/K/V).",
        ),
    ] = None,
    kernel_space: Annotated[
        Path,
        typer.Option(
            help="Kernel search space the study names (by a path relative to the written file), "
            "e.g. --kernel-space search_spaces/kernel-mini.yaml.",
        ),
    ] = SPACES / KERNEL_SPACE,
    schedule_space: Annotated[
        Path,
        typer.Option(
            help="Schedule search space, e.g. --schedule-space my-schedule.yaml (the shipped one "
            "is made for Wan's 30 or 40 layers: a model of fewer than 3 layers needs another).",
        ),
    ] = SPACES / SCHEDULE_SPACE,
    name: Annotated[
        str | None,
        typer.Option(
            help="Model name, e.g. --name wan2.1-t2v-1.3b (default: the folder's name).",
        ),
    ] = None,
    study_name: Annotated[
        str | None,
        typer.Option(help="Study name (default: NAME-HEIGHTp, e.g. wan2.1-t2v-1.3b-480p)."),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "-o",
            "--output",
            help="Study YAML to write, e.g. -o my-study.yaml (default: STUDY_NAME.yaml here).",
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing -o file.")] = False,
) -> None:
    """Write a study YAML for a checkpoint from its transformer config: heads, head_dim, layers,
    the latent-patch grid at --resolution and --frames, steps and CFG; the search spaces,
    objectives, budgets and sampler of the shipped Wan studies. Nothing is downloaded.

    Example: fpstune study init ./Wan2.1-T2V-1.3B-Diffusers --resolution 832x480 --frames 81
    --calibration calib.safetensors -o my.yaml, then fpstune study run my.yaml."""
    from fpstune.kernels.atomic import write_text
    from fpstune.spec.loading import BadInput as SpecBadInput
    from fpstune.spec.loading import validate
    from fpstune.spec.study import StudySpec

    width, height = _resolution(resolution)
    model_name = name if name is not None else model_dir.resolve().name
    if not _NAME.match(model_name):
        option = "--name" if name is not None else "MODEL_DIR"
        raise BadInput(
            f"{option}: {model_name!r} is not a model name (letters, digits, '.', '_', '-'); "
            "give one with --name"
        )
    sname = study_name if study_name is not None else f"{model_name}-{height}p"
    if not _NAME.match(sname) or len(sname) > 200:
        raise BadInput(
            f"--study-name: {sname!r} is not a study name (letters, digits, '.', '_', '-')"
        )
    out = output if output is not None else Path(f"{sname}.yaml")
    check_output(out)
    if out.exists() and not force:
        raise BadInput(f"-o: {out}: exists; give --force to overwrite it")
    chosen, config = _adapter(model_dir, adapter)
    shape = _shape(chosen, config, model_dir, name=model_name, width=width, height=height,
                   frames=frames, steps=steps, cfg=2 if cfg else 1)  # fmt: skip
    for option, space in (("--kernel-space", kernel_space), ("--schedule-space", schedule_space)):
        if not space.is_file():
            raise BadInput(f"{option}: {space}: no such file")
    base = out.absolute().parent
    cal = _calibration(calibration, shape, base)
    text = render(
        name=sname,
        adapter=chosen.name,
        shape=shape,
        base=base,
        calibration=cal,
        spaces=(kernel_space.absolute(), schedule_space.absolute()),
        comment=_comment(model_dir, config, chosen.name, width, height, frames, shape),
    )
    import yaml

    # As `load_study` will read it from there (paths relative to its folder), before writing.
    try:
        validate(
            StudySpec,
            yaml.safe_load(text),
            file=out,
            context={"file": str(out), "base_dir": str(base)},
        )
    except SpecBadInput as e:
        if e.file == str(out):
            raise BadInput(f"{e} (the study init would write)") from None
        option = "--schedule-space" if e.file.endswith(schedule_space.name) else "--kernel-space"
        raise BadInput(
            f"{e} (a study of this model needs another search space: give {option})"
        ) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, text)
    t, h, w = shape.grid
    typer.echo(
        f"{out}: study {sname} ({chosen.name}): {shape.heads} heads x {shape.head_dim}, "
        f"{shape.layers} layers, grid {t}x{h}x{w} ({t * h * w} tokens"
        f"{f' + {shape.text} text' if shape.text else ''}), {shape.steps} steps, "
        f"cfg {shape.cfg}; next: fpstune study run {out}"
    )


# -- the parts ----------------------------------------------------------------------------------


def _resolution(text: str) -> tuple[int, int]:
    m = _RESOLUTION.match(text)
    if m is None or min(int(m[1]), int(m[2])) < 1:
        raise BadInput(f"--resolution: {text!r} is not WIDTHxHEIGHT in pixels (e.g. 832x480)")
    return int(m[1]), int(m[2])


def _read_class_name(model_dir: Path) -> tuple[Path, str]:
    if not model_dir.is_dir():
        raise BadInput(f"{model_dir}: no such model directory")
    file = model_dir / TRANSFORMER_CONFIG
    if not file.is_file():
        raise BadInput(
            f"{file}: no transformer config (expected a diffusers checkpoint folder; "
            "give --adapter for another layout)"
        )
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInput(f"{file}: not a JSON transformer config: {one_line(e)}") from None
    name = data.get("_class_name") if isinstance(data, dict) else None
    if not isinstance(name, str) or not name:
        raise BadInput(f"{file}: _class_name: missing; name the adapter with --adapter")
    return file, name


def recognises(adapter: ModelAdapter, class_name: str) -> bool:
    """Whether ``adapter`` serves transformers of the diffusers class ``class_name``: its
    ``transformer_classes`` names it, or (without that attribute) its `serves` accepts a bare,
    uninitialised instance of the class."""
    classes = getattr(adapter, "transformer_classes", None)
    if classes is not None:
        return class_name in classes
    if not _CLASS.match(class_name):
        return False
    import diffusers

    cls = getattr(diffusers, class_name, None)
    if not isinstance(cls, type):
        return False
    try:
        return bool(adapter.serves(object.__new__(cls)))
    except Exception:  # a serves() that reads what a bare instance lacks: not this adapter's
        return False


def _adapter(model_dir: Path, name: str | None) -> tuple[ModelAdapter, Any]:
    """The adapter (``name``, or the one recognising the checkpoint) and its config."""
    from fpstune.models import adapters

    if name is None:
        file, class_name = _read_class_name(model_dir)
        found = [a for a in map(adapters.get, adapters.names()) if recognises(a, class_name)]
        if not found:
            raise BadInput(
                f"{file}: _class_name: {class_name!r}: no adapter knows this transformer class "
                f"(registered: {', '.join(adapters.names())})"
            )
        if len(found) > 1:
            raise BadInput(
                f"{file}: _class_name: {class_name!r}: several adapters know it "
                f"({', '.join(a.name for a in found)}); choose one with --adapter"
            )
        chosen = found[0]
    else:
        if not model_dir.is_dir():
            raise BadInput(f"{model_dir}: no such model directory")
        try:
            chosen = adapters.get(name)
        except adapters.UnknownAdapter as e:
            raise BadInput(f"--adapter: {e}") from None
        if (model_dir / TRANSFORMER_CONFIG).is_file():  # else a layout only the adapter knows
            file, class_name = _read_class_name(model_dir)
            if not recognises(chosen, class_name):
                able = [
                    a.name for a in map(adapters.get, adapters.names()) if recognises(a, class_name)
                ]
                raise BadInput(
                    f"{file}: _class_name: {class_name!r}: adapter {chosen.name} does not know "
                    f"this transformer class (adapters that do: {', '.join(able) or 'none'})"
                )
    try:
        return chosen, chosen.config(model_dir)
    except adapters.NoModel as e:
        raise BadInput(f"--adapter: {one_line(e)}") from None


def _shape(
    adapter: ModelAdapter,
    config: Any,
    model_dir: Path,
    *,
    name: str,
    width: int,
    height: int,
    frames: int,
    steps: int,
    cfg: int,
) -> ModelShape:
    from fpstune.models import adapters

    try:
        return adapter.shape(
            config, name=name, height=height, width=width, frames=frames, steps=steps, cfg=cfg
        )
    except adapters.NoModel as e:
        raise BadInput(f"--adapter: {one_line(e)}") from None
    except BadInput as e:
        # The adapters say --height / --width (capture's options); here they are --resolution.
        message = str(e)
        for option, what in (("--height: ", "height"), ("--width: ", "width")):
            if message.startswith(option):
                raise BadInput(
                    f"--resolution: {width}x{height}: {what} {message[len(option) :]} (the "
                    f"model's VAE x patch factor, {model_dir})"
                ) from None
        raise


def _calibration(path: Path | None, shape: ModelShape, base: Path) -> dict[str, Any] | None:
    """The calibration section's source, layers and steps for a capture (None: synthetic);
    only its safetensors header is read."""
    if path is None:
        return None
    from safetensors import SafetensorError, safe_open

    from fpstune.quality.calibration import META_KEY, CalibrationMeta

    if path.suffix != ".safetensors" or not path.is_file():
        raise BadInput(f"--calibration: {path}: no such .safetensors file (fpstune capture -o)")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        meta = CalibrationMeta.from_json(header[META_KEY])
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise BadInput(f"--calibration: {path}: not a calibration set ({one_line(e)})") from None
    for what, ours, theirs in (
        ("heads", meta.heads, shape.heads),
        ("head_dim", meta.head_dim, shape.head_dim),
        ("layers", meta.model_layers, shape.layers),
        ("steps", meta.model_steps, shape.steps),
        ("grid", tuple(meta.model_grid), tuple(shape.grid)),
    ):
        if ours != theirs:
            raise BadInput(
                f"--calibration: {path}: {what}: captured with {_show(ours)}, the model at "
                f"this size has {_show(theirs)} (check --resolution, --frames, --steps)"
            )
    layers = sorted({c[0] for c in meta.cells})
    steps = sorted({c[1] for c in meta.cells})
    return {
        "source": os.path.relpath(path.absolute(), base),
        "layers": "all" if len(layers) == shape.layers else layers,
        "steps": "all" if len(steps) == shape.steps else steps,
    }


def _show(value: Any) -> str:
    return "x".join(map(str, value)) if isinstance(value, tuple) else str(value)


def sample_layers(n: int) -> list[int]:
    """The layers the shipped Wan studies score: the first and last three, and the quarters
    (30 -> 0, 1, 2, 7, 15, 22, 27, 28, 29)."""
    return sorted(
        {i for i in (0, 1, 2, n // 4, n // 2, 3 * n // 4, n - 3, n - 2, n - 1) if 0 <= i < n}
    )


def sample_steps(n: int) -> list[int]:
    """The steps the shipped Wan studies score: the first three, every tenth of the way, then
    every fifth, and the last (50 -> 0, 1, 2, 5, 10, 15, 20, 30, 40, 49)."""
    picks = (0, 1, 2, *(n * k // 10 for k in (1, 2, 3, 4, 6, 8)), n - 1)
    return sorted({i for i in picks if 0 <= i < n})


def _comment(
    model_dir: Path,
    config: Any,
    adapter: str,
    width: int,
    height: int,
    frames: int,
    shape: ModelShape,
) -> str:
    t, h, w = shape.grid
    cls = config.get("_class_name", "?") if hasattr(config, "get") else "?"
    passes = "with CFG (2 attention passes" if shape.cfg == 2 else f"({shape.cfg} attention pass"
    return (
        f"# {shape.name} at {width}x{height}, {frames} frames: {shape.heads} heads x "
        f"{shape.head_dim}, {shape.layers} layers,\n"
        f"# latent-patch grid {t}x{h}x{w} ({t * h * w:,} tokens), {shape.steps} steps {passes}"
        " per layer and step).\n"
        f"# Written by `fpstune study init` from {model_dir.absolute() / TRANSFORMER_CONFIG}\n"
        f"# ({cls}, adapter {adapter}); the rest as in the shipped Wan studies.\n"
    )


def _task_and_text(shape: ModelShape) -> str:
    """The ``task`` and ``text`` lines where they are not the defaults (t2v, no joint text)."""
    task = "" if shape.task == "t2v" else f"  task: {shape.task}\n"
    text = "" if not shape.text else f"  text: {shape.text}          # text tokens per joint call\n"
    return task + text


def render(
    *,
    name: str,
    adapter: str,
    shape: ModelShape,
    base: Path,
    calibration: dict[str, Any] | None,
    spaces: tuple[Path, Path] = (SPACES / KERNEL_SPACE, SPACES / SCHEDULE_SPACE),
    comment: str = "",
) -> str:
    """The study YAML, search spaces (kernel, schedule) named relative to ``base`` (the file's
    folder)."""

    def q(value: Any) -> str:  # a JSON string or list is a YAML flow scalar / sequence
        return json.dumps(value)

    kernel, schedule = (os.path.relpath(p, base) for p in spaces)
    t, h, w = shape.grid
    if calibration is None:
        cal = (
            "  # Replace with the .safetensors file `fpstune capture` writes from your checkpoint"
            " (or\n"
            "  # rerun with --calibration); synthetic Q/K/V exercise the pipeline but say nothing"
            " about\n"
            "  # this model's quality.\n"
            "  source: synthetic\n"
            "  seed: 0\n"
            f"  steps: {q(sample_steps(shape.steps))}\n"
            f"  layers: {q(sample_layers(shape.layers))}\n"
            "  samples_per_cell: 1\n"
            "  max_tokens: 4096       # synthetic sets: grid shrunk to <= 4096 tokens\n"
        )
    else:
        cal = (
            "  # `fpstune capture`'s set (relative to this file), scored on the cells it holds\n"
            f"  source: {q(calibration['source'])}\n"
            f"  steps: {q(calibration['steps'])}\n"
            f"  layers: {q(calibration['layers'])}\n"
        )
    return (
        f"{comment}"
        f"name: {q(name)}\n"
        "model:\n"
        f"  name: {q(shape.name)}\n"
        f"  adapter: {q(adapter)}\n"
        f"  heads: {shape.heads}\n"
        f"  head_dim: {shape.head_dim}\n"
        f"  layers: {shape.layers}\n"
        f"  grid: [{t}, {h}, {w}]\n"
        f"  steps: {shape.steps}\n"
        f"  cfg: {shape.cfg}\n"
        f"{_task_and_text(shape)}"
        "  batch: 1\n"
        f"kernel_space: {q(kernel)}\n"
        f"schedule_space: {q(schedule)}\n"
        "objectives:\n"
        "  - {name: latency_ms, direction: minimize}   # composed from the kernel stage's latency"
        " table\n"
        "  - {name: rel_l2, direction: minimize}       # attention output vs bf16 dense, on"
        " calibration Q/K/V\n"
        "constraints:\n"
        "  - {name: rel_l2, max: 0.1}\n"
        "sampler:\n"
        "  name: tpe\n"
        "  seed: 0\n"
        "  options: {n_startup_trials: 20, multivariate: true, group: true, constant_liar: true}\n"
        "trials:\n"
        "  kernel: 40      # per kernel bucket\n"
        "  schedule: 300\n"
        "calibration:\n"
        f"{cal}"
        "latency:\n"
        "  warmup: 10\n"
        "  reps: 50\n"
        "  rotate_inputs: true\n"
    )


def study_validate_cmd(
    study_file: Annotated[
        Path, typer.Argument(help="Study YAML, e.g. one `fpstune study init` wrote.")
    ],
) -> None:
    """Check a study file as `fpstune study run` loads it: its schema, the search spaces it
    names, and that they fit the model (a captured calibration set's tensors are read by
    `study run`, before its first trial). Prints one line; exit 2 naming the file and field."""
    from fpstune.spec.study import load_study

    spec = load_study(study_file)
    m = spec.model
    t, h, w = m.grid
    typer.echo(
        f"{study_file}: ok ({spec.name}: {m.adapter} {m.name}, {m.heads} heads x {m.head_dim}, "
        f"{m.layers} layers, grid {t}x{h}x{w}, {m.steps} steps, cfg {m.cfg}; calibration "
        f"{spec.calibration.source})"
    )
