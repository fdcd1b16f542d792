"""Load user inputs: a folder of images (PNG/JPEG) or .npy arrays, preprocessed as the manifest says.

The spec ``shapes:heldout:N`` (or ``shapes:train:N``) stands for N generated images of the demo dataset
(``ats_deploy.demo.shapes``) from its held-out (training) seed, rendered at the graph's size with exact
pixels: the inputs that go with the trained demo model, with nothing to download or write.

Images follow timm/DeiT evaluation preprocessing: convert to RGB (grey, palette, RGBA and 16-bit images
are converted, not refused), resize the shorter side to size / crop_pct (bicubic), centre-crop to
size x size, scale to [0, 1], normalise with mean/std, NCHW float32. ``.npy`` files hold already
preprocessed float arrays [N, 3, H, W] or [3, H, W].
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError

__all__ = [
    "Preprocess",
    "load_inputs",
    "load_images",
    "load_npy",
    "load_shapes",
    "random_inputs",
    "default_inputs",
    "input_labels",
    "IMAGE_SUFFIXES",
    "SHAPES_PREFIX",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
SHAPES_PREFIX = "shapes:"


@dataclass(frozen=True)
class Preprocess:
    """What the exported graph expects its ``pixels`` input to be (recorded in the manifest)."""

    size: int = 224
    channels: int = 3
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    crop_pct: float = 0.875
    interpolation: str = "bicubic"

    def to_dict(self) -> dict:
        return {
            "size": self.size,
            "channels": self.channels,
            "mean": list(self.mean),
            "std": list(self.std),
            "crop_pct": self.crop_pct,
            "interpolation": self.interpolation,
            "layout": "NCHW",
            "dtype": "float32",
        }

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        return cls(
            size=int(d["size"]),
            channels=int(d.get("channels", 3)),
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
            crop_pct=float(d.get("crop_pct", 0.875)),
            interpolation=str(d.get("interpolation", "bicubic")),
        )


class UnreadableImage(Exception):
    """Internal: why one image file could not be decoded (turned into an InputError by the callers)."""


def _image_to_array(path: Path, pre: Preprocess) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr16 = np.asarray(im, dtype=np.float32)
                im = Image.fromarray(np.clip(arr16 / max(arr16.max(), 1.0) * 255.0, 0, 255).astype(np.uint8))
            if im.mode in ("RGBA", "LA", "P"):
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, im)
            im = im.convert("RGB")
            short = min(im.size)
            scale = pre.size / pre.crop_pct / short
            new = (max(pre.size, round(im.size[0] * scale)), max(pre.size, round(im.size[1] * scale)))
            im = im.resize(new, Image.Resampling.BICUBIC)
            left, top = (new[0] - pre.size) // 2, (new[1] - pre.size) // 2
            im = im.crop((left, top, left + pre.size, top + pre.size))
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except UnidentifiedImageError:
        raise UnreadableImage("not an image") from None
    except (OSError, ValueError) as exc:
        raise UnreadableImage((str(exc).splitlines() or [type(exc).__name__])[0][:60]) from None
    arr = (arr - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    return arr.transpose(2, 0, 1)


def load_images(
    folder: Path, pre: Preprocess, *, limit: int | None = None, skip_unreadable: bool = False
) -> tuple[np.ndarray, list[str]]:
    """All images in ``folder`` (sorted by name), preprocessed.

    An unreadable file (corrupt, truncated, not an image) is an InputError naming every such file, so a
    check never silently runs on fewer inputs than the folder holds; ``skip_unreadable=True`` skips them
    with one warning line per file on stderr instead.
    """
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    arrays, names, bad = [], [], []
    for f in files:
        try:
            arrays.append(_image_to_array(f, pre))
            names.append(f.name)
        except UnreadableImage as exc:
            bad.append(f"{f.name} ({exc})")
        if limit and len(arrays) >= limit:
            break
    if bad and not skip_unreadable:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise InputError(
            f"{len(bad)} unreadable image(s) in {folder}: {', '.join(bad[:3])}{more}; "
            "fix or remove them, or pass --skip-unreadable to leave them out"
        )
    for b in bad:
        print(f"warning: skipped unreadable image {folder / b}", file=sys.stderr)
    if not arrays:
        raise InputError(
            f"no readable image in {folder} (looked for {', '.join(IMAGE_SUFFIXES)}); "
            "put PNG/JPEG files there or pass .npy arrays"
        )
    return np.stack(arrays).astype(np.float32), names


def load_npy(path: Path, pre: Preprocess) -> np.ndarray:
    """A preprocessed array [N, C, H, W] or [C, H, W] from ``path``."""
    try:
        arr = np.load(path, allow_pickle=False)
    except EOFError:  # an empty or truncated file
        raise InputError(f"{path} is empty or truncated; save the array again with numpy.save") from None
    except (ValueError, OSError) as exc:
        reason = "it holds pickled objects" if "allow_pickle" in str(exc) else str(exc)[:80]
        raise InputError(f"cannot read {path} as a .npy array ({reason}); save it with numpy.save") from None
    if not isinstance(arr, np.ndarray):  # a .npz archive under a .npy name
        arr.close()
        raise InputError(f"{path} is a .npz archive, not a .npy array; save one array with numpy.save")
    if arr.ndim == 3:
        arr = arr[None]
    want = (pre.channels, pre.size, pre.size)
    if arr.ndim != 4 or tuple(arr.shape[1:]) != want:
        raise InputError(
            f"{path} has shape {list(arr.shape)}, expected [N, {want[0]}, {want[1]}, {want[2]}] "
            "(NCHW, preprocessed); resize and transpose it first"
        )
    if not np.issubdtype(arr.dtype, np.floating):
        raise InputError(f"{path} has dtype {arr.dtype}; pass normalised floating-point pixels (float32)")
    bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
    if bad:
        raise InputError(f"{path} holds {bad} NaN/inf value(s); pass finite, normalised pixels")
    return arr.astype(np.float32)


def _parse_shapes(spec: str) -> tuple[str, int]:
    """``shapes:heldout:N`` / ``shapes:train:N`` / ``shapes:N`` -> (split, N); InputError when malformed."""
    parts = spec[len(SHAPES_PREFIX) :].split(":")
    split, count = ("heldout", parts[0]) if len(parts) == 1 else (parts[0], parts[-1])
    if len(parts) > 2 or split not in ("heldout", "train") or not count.isdigit() or int(count) < 1:
        raise InputError(f"bad input spec {spec!r}; write shapes:heldout:N or shapes:train:N with N >= 1")
    return split, int(count)


def load_shapes(spec: str, pre: Preprocess, *, limit: int | None = None) -> tuple[np.ndarray, list[str]]:
    """``shapes:heldout:N`` / ``shapes:train:N`` / ``shapes:N`` (held-out) -> N demo images, preprocessed."""
    from .demo.shapes import HELDOUT_SEED, TRAIN_SEED, ShapesDataset

    split, count = _parse_shapes(spec)
    seeds = {"heldout": HELDOUT_SEED, "train": TRAIN_SEED}
    if pre.channels != 3:
        raise InputError(f"{spec} gives RGB images but the graph takes {pre.channels} channels; pass your own data")
    n = min(count, limit) if limit else count
    ds = ShapesDataset(seeds[split], n, pre.size, mean=pre.mean, std=pre.std)
    x, _ = ds.batch(0, n)
    return x, [f"shapes:{split}[{i}]" for i in range(n)]


def check_input_source(path: str | Path) -> None:
    """Refuse a missing input path or a malformed ``shapes:`` spec before any work (the checks of
    :func:`load_inputs` that need no preprocessing settings)."""
    if str(path).startswith(SHAPES_PREFIX) and not Path(path).exists():
        _parse_shapes(str(path))
        return
    if not Path(path).exists():
        raise InputError(f"input {path} does not exist; pass an image folder, a .npy file or a folder of .npy files")


def load_inputs(
    path: str | Path, pre: Preprocess, *, limit: int | None = None, skip_unreadable: bool = False
) -> tuple[np.ndarray, list[str]]:
    """Inputs from an image folder, a folder of .npy files, a single .npy file, a single image, or a
    ``shapes:...`` spec (generated demo images). Unreadable images: see :func:`load_images`."""
    if str(path).startswith(SHAPES_PREFIX) and not Path(path).exists():
        return load_shapes(str(path), pre, limit=limit)
    check_input_source(path)
    p = Path(path)
    if p.is_file():
        if p.suffix == ".npy":
            arr = load_npy(p, pre)
            return arr[:limit] if limit else arr, [f"{p.name}[{i}]" for i in range(len(arr))][: limit or None]
        try:
            a = _image_to_array(p, pre)
        except UnreadableImage as exc:
            raise InputError(
                f"{p} is not a readable image or .npy file ({exc}); pass PNG/JPEG or a .npy array"
            ) from None
        return a[None], [p.name]
    npys = sorted(p.glob("*.npy"))
    if npys:
        arrs = [load_npy(f, pre) for f in npys]
        names = [f"{f.name}[{i}]" for f, a in zip(npys, arrs) for i in range(len(a))]
        arr = np.concatenate(arrs)
        return (arr[:limit], names[:limit]) if limit else (arr, names)
    return load_images(p, pre, limit=limit, skip_unreadable=skip_unreadable)


def default_inputs(source: dict | None, n: int, pre: Preprocess, *, seed: int = 0) -> tuple[np.ndarray, str]:
    """Held-out inputs when the user gave none, and their label: ``n`` held-out demo images for the trained
    demo model (what it was trained to see), standard-normal pixels for anything else."""
    if (source or {}).get("kind") == "demo" and pre.channels == 3:
        x, _ = load_shapes(f"{SHAPES_PREFIX}heldout:{n}", pre)
        return x, f"{n} held-out shapes images (shapes:heldout:{n})"
    return random_inputs(n, pre, seed=seed), f"{n} random inputs (seed {seed})"


def input_labels(inputs: str | Path | None, source: dict | None, n: int) -> np.ndarray | None:
    """True class labels of the first ``n`` inputs where they are known, else None: generated demo images
    (a ``shapes:...`` spec, or the held-out default of the demo model) know their labels."""
    from .demo.shapes import HELDOUT_SEED, TRAIN_SEED, ShapesDataset

    if inputs is None:
        if (source or {}).get("kind") != "demo":
            return None
        seed = HELDOUT_SEED
    elif str(inputs).startswith(SHAPES_PREFIX) and not Path(inputs).exists():
        parts = str(inputs)[len(SHAPES_PREFIX) :].split(":")
        seed = TRAIN_SEED if len(parts) > 1 and parts[0] == "train" else HELDOUT_SEED
    else:
        return None
    return ShapesDataset(seed, n).labels()


def random_inputs(n: int, pre: Preprocess, *, seed: int = 0) -> np.ndarray:
    """Standard-normal pixels (what normalised natural images roughly look like to the network)."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, pre.channels, pre.size, pre.size)).astype(np.float32)
