"""On-device parity: a TensorRT engine against the PyTorch outputs stored at export (``reference.npz``).

The reference file holds the inputs (``pixels``) and PyTorch's ``logits``, ``tokens_<i>`` and ``count_<i>``,
so a Jetson proves parity without torch: numpy, tensorrt and polygraphy only. Gates come from
:data:`ats_deploy.reports.parity.TOLERANCES` for the engine's precision (its build record says which).

A reference from another model is refused before anything runs: when the reference file is the one the
engine's manifest lists (sha256), or a manifest beside it names the engine's ONNX, it is ours; in every
case its arrays must have the engine's input size and output names and widths.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..reports.parity import TOLERANCES, ParityResult, Tolerances, compare_outputs

__all__ = ["VerifyResult", "check_reference", "load_reference", "verify"]


@dataclass(frozen=True)
class VerifyResult:
    parity: ParityResult
    plan: Path
    reference: Path
    precision: str
    images: int
    batches: int

    def to_dict(self) -> dict:
        return {
            "plan": str(self.plan),
            "reference": str(self.reference),
            "precision": self.precision,
            "batches": self.batches,
            **self.parity.to_dict(),
        }


def load_reference(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The arrays of a reference.npz (InputError when missing or not an ats-deploy reference)."""
    p = Path(path)
    if p.is_dir():
        hint = f" ({p / 'reference.npz'})" if (p / "reference.npz").is_file() else ""
        raise InputError(f"reference {p} is a directory; pass the reference.npz file inside it{hint}")
    if not p.is_file():
        raise InputError(f"reference file {p} does not exist; pass the reference.npz written by ats-deploy export")
    try:
        z = np.load(p, allow_pickle=False)
    except EOFError:
        raise InputError(f"{p} is empty or truncated; pass the reference.npz written by ats-deploy export") from None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        reason = "it holds pickled objects" if "allow_pickle" in str(exc) else exc
        raise InputError(f"{p} is not a readable .npz file ({reason}); re-run ats-deploy export") from None
    if not isinstance(z, np.lib.npyio.NpzFile):  # a .npy array, not an archive of named arrays
        raise InputError(f"{p} is a single .npy array; pass the reference.npz written by ats-deploy export")
    try:
        with z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"{p} is not a readable .npz file ({exc}); re-run ats-deploy export") from None
    if "pixels" not in data or "logits" not in data:
        raise InputError(f"{p} has no pixels/logits arrays; pass the reference.npz written by ats-deploy export")
    return data


def _sha256(path: Path) -> str:
    from ..exporters.trt import sha256_file

    return sha256_file(path)


def check_reference(record: dict, ref: dict[str, np.ndarray], reference: Path) -> None:
    """Refuse a reference written for another model than the engine's (one InputError line)."""
    man = record.get("manifest", {})
    known = man.get("reference_sha256")
    same_file = known is not None and _sha256(reference) == known
    beside = reference.parent / "manifest.json"
    if not same_file and beside.is_file():
        try:
            other = json.loads(beside.read_text())
        except (OSError, json.JSONDecodeError):
            other = {}
        shas = {v.get("sha256") for v in other.get("artifacts", {}).values() if isinstance(v, dict)}
        ours = _sha256(beside) == man.get("sha256") or record.get("onnx", {}).get("sha256") in shas
        if not ours:
            raise InputError(
                f"{reference} belongs to another export (its manifest does not list this engine's ONNX); "
                f"use the reference.npz from {Path(man.get('path', '?')).parent}"
            )
    # Whatever the provenance: the arrays must fit this engine.
    inp = record.get("onnx", {}).get("input", {}).get("shape", [])
    if inp and tuple(ref["pixels"].shape[1:]) != tuple(inp[1:]):
        raise InputError(
            f"{reference.name} holds inputs {list(ref['pixels'].shape[1:])} but the engine takes {inp[1:]}: "
            "it is from another model"
        )
    outs = {o["name"]: o["shape"] for o in record.get("network", {}).get("outputs", [])}
    missing = sorted(set(outs) - set(ref))
    if outs and missing:
        raise InputError(f"{reference.name} lacks the engine outputs {missing}: it is from another model")
    for name, shape in outs.items():
        got = ref[name].shape
        if len(got) != len(shape):
            raise InputError(f"{reference.name}: {name} has shape {list(got)}, the engine's is {shape}")
        width = shape[-1] if len(shape) > 1 else -1  # -1: dynamic (size-tensor) width, not checkable
        if width >= 0 and got[-1] != width:
            what = "classes" if name == "logits" else "slots (another K schedule)"
            raise InputError(
                f"{reference.name}: {name} has {got[-1]} {what} but the engine has {width}: it is from another model"
            )


def verify(
    plan: str | os.PathLike[str],
    reference: str | os.PathLike[str],
    *,
    plugin_lib: str | os.PathLike[str] | None = None,
    tolerances: Tolerances | None = None,
    backend: str | None = None,
    runner=None,
) -> VerifyResult:
    """Run the reference inputs through the engine and compare with the stored PyTorch outputs.

    Returns the comparison; gating (exit 3) is the caller's decision, as for ``ats-deploy parity``.
    The engine runs through Polygraphy's TrtRunner (:class:`~ats_deploy.runtime.trt_runner.TrtRunner`);
    ``runner`` may be one already opened for ``plan`` (or anything with ``infer``, ``static_batch`` and
    ``batch_range``: the tests pass ONNX Runtime on the export's graph).
    """
    from ..exporters.trt import read_record
    from .ort_runner import stack_outputs

    plan, reference = Path(plan), Path(reference)
    record = read_record(plan)  # missing record or corrupt plan: InputError before TensorRT is touched
    ref = load_reference(reference)
    check_reference(record, ref, reference)
    precision = record.get("precision", "fp32")
    tol = tolerances or TOLERANCES.get(precision, TOLERANCES["default"])
    ats = record.get("manifest", {}).get("ats", {})
    blocks = [int(b) for b in ats.get("blocks", [])]
    prefix = int(ats.get("prefix_tokens", 1))
    x = ref["pixels"]
    own = runner is None
    if own:
        from .trt_runner import TrtRunner

        runner = TrtRunner(plan, plugin_lib=plugin_lib, backend=backend)
    try:
        hi = runner.batch_range[1]
        step = hi if runner.static_batch is None else runner.static_batch
        if len(x) % step and runner.static_batch is not None:
            raise InputError(f"{reference.name} holds {len(x)} images, not a multiple of the engine's batch {step}")
        parts = [runner.infer({"pixels": x[i : i + step]}) for i in range(0, len(x), step)]
    finally:
        if own:
            runner.close()
    got = stack_outputs(parts)
    want = {k: v for k, v in ref.items() if k != "pixels"}
    res = compare_outputs(want, got, blocks=blocks, prefix_tokens=prefix, tolerances=tol)
    return VerifyResult(res, plan, reference, precision, len(x), len(parts))
