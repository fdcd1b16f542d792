"""The export's parity data in Polygraphy's own JSON formats, so ``polygraphy run`` can check an engine too.

``parity_inputs.json`` is what ``polygraphy run --load-inputs`` reads (a list of feed dicts, one per
iteration: ``{"pixels": [b, C, H, W] float32}``), and ``reference_outputs.json`` what ``--load-outputs``
reads (a ``RunResults`` with one iteration per feed, runner name ``pytorch``: ``logits``, ``tokens_<i>``,
``count_<i>``, plus the ``near_boundary_<i>`` flags, which Polygraphy ignores because no engine has such an
output). Both are written and read with Polygraphy's own serializer, so the files are exactly its format.
``ats-deploy verify`` runs the same feeds and compares with the same outputs (with the project's gates,
near-boundary latitude included), so a user can reproduce a verdict with NVIDIA's tool alone::

    polygraphy run model.onnx --onnxrt --load-inputs parity_inputs.json --load-outputs reference_outputs.json
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..errors import DependencyError, InputError

__all__ = [
    "INPUTS_FILE",
    "OUTPUTS_FILE",
    "RUNNER_NAME",
    "import_polygraphy_json",
    "polygraphy_command",
    "read_parity_files",
    "split_outputs",
    "write_parity_files",
]

INPUTS_FILE = "parity_inputs.json"
OUTPUTS_FILE = "reference_outputs.json"
RUNNER_NAME = "pytorch"
MAX_FEED = 16  # images per feed of a dynamic-batch graph: the default top of its TensorRT batch profile


def import_polygraphy_json():
    """(save_json, load_json, RunResults) from Polygraphy; DependencyError with the fix when it is missing."""
    try:
        from polygraphy.comparator import RunResults
        from polygraphy.json import load_json, save_json
    except ImportError:
        raise DependencyError("Polygraphy is not installed; pip install 'polygraphy>=0.49'") from None
    return save_json, load_json, RunResults


def _quiet():
    """Polygraphy logs each file it saves or loads to stdout; ``--json`` output must stay pure JSON."""
    from polygraphy.logger import G_LOGGER

    return G_LOGGER.verbosity(G_LOGGER.ERROR)


def split_outputs(outputs: Mapping[str, np.ndarray], sizes: list[int], *, dynamic_tokens: bool) -> list[dict]:
    """Per-feed output dicts from outputs stacked over all images. ``dynamic_tokens``: each feed's
    ``tokens_<i>`` is cut to that feed's largest count, as a data-dependent engine returns it."""
    parts, start = [], 0
    for size in sizes:
        part = {k: np.ascontiguousarray(v[start : start + size]) for k, v in outputs.items()}
        if dynamic_tokens:
            for key in [k for k in part if k.startswith("tokens_")]:
                width = int(part["count_" + key[len("tokens_") :]].max())
                part[key] = np.ascontiguousarray(part[key][:, :width])
        parts.append(part)
        start += size
    return parts


def feed_sizes(images: int, batch: int | None) -> list[int]:
    """Images per feed: the static batch, or up to :data:`MAX_FEED` for a dynamic-batch graph."""
    step = batch or min(images, MAX_FEED)
    return [min(step, images - i) for i in range(0, images, step)]


def write_parity_files(
    inputs_path: Path,
    outputs_path: Path,
    pixels: np.ndarray,
    outputs: Mapping[str, np.ndarray],
    *,
    batch: int | None,
    dynamic_tokens: bool,
) -> None:
    """Write ``pixels`` and the PyTorch ``outputs`` (stacked over images) as Polygraphy input/output JSON."""
    save_json, _, run_results = import_polygraphy_json()
    sizes = feed_sizes(len(pixels), batch)
    feeds, start = [], 0
    for size in sizes:
        feeds.append({"pixels": np.ascontiguousarray(pixels[start : start + size], dtype=np.float32)})
        start += size
    results = run_results()
    results.add(split_outputs(outputs, sizes, dynamic_tokens=dynamic_tokens), runner_name=RUNNER_NAME)
    with _quiet():
        save_json(feeds, str(inputs_path), description="ats-deploy parity inputs")
        results.save(str(outputs_path))


def read_parity_files(directory: str | os.PathLike[str]) -> tuple[list[dict], list[dict]]:
    """(feeds, expected outputs per feed) from the Polygraphy JSON pair in an export directory."""
    d = Path(directory)
    _, load_json, run_results = import_polygraphy_json()
    paths = [d / INPUTS_FILE, d / OUTPUTS_FILE]
    for p in paths:
        if not p.is_file():
            raise InputError(f"{d} has no {p.name}; re-run ats-deploy export (version 0.1+ writes it)")
    try:
        with _quiet():
            feeds = load_json(str(paths[0]))
            results = run_results.load(str(paths[1]))
    except Exception as exc:  # Polygraphy raises its own PolygraphyException (and JSON errors) on bad files
        names = f"{paths[0].name} / {paths[1].name}"
        raise InputError(f"{d}: {names} are not readable ({exc}); re-run ats-deploy export") from None
    if not isinstance(feeds, list) or not all(isinstance(f, Mapping) and "pixels" in f for f in feeds):
        raise InputError(f"{paths[0]} is not a list of feeds with 'pixels'; re-run ats-deploy export")
    if len(results) != 1 or len(results[0][1]) != len(feeds):
        raise InputError(f"{paths[1]} does not hold one {RUNNER_NAME} result per feed; re-run ats-deploy export")
    expected = [{k: np.asarray(v) for k, v in it.items()} for it in results[0][1]]
    return [{k: np.asarray(v) for k, v in f.items()} for f in feeds], expected


def polygraphy_command(onnx_name: str, *, plugin_lib: str | None = None, logits_atol: float = 1e-4) -> str:
    """The ``polygraphy run`` line that checks ``onnx_name`` against the export's PyTorch outputs.

    ONNX Runtime for the portable form, TensorRT (``--trt``) with the plugin library for the plugin form.
    Logits within ``logits_atol``; kept tokens and counts exactly (Polygraphy has no near-boundary rule: an
    image whose pick sits on a decision boundary can fail here and still pass ``ats-deploy verify``).
    """
    backend = f"--trt --plugins {plugin_lib}" if plugin_lib else "--onnxrt"
    return (
        f"polygraphy run {onnx_name} {backend} --load-inputs {INPUTS_FILE} --load-outputs {OUTPUTS_FILE} "
        f"--atol logits:{logits_atol:g} 0 --rtol 0"
    )
