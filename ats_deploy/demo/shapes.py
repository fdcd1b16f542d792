"""A procedural 10-class image dataset: one small shape on a cluttered background, fixed by (seed, index).

Why: the embedded default model is untrained, so accuracy reports on it mean nothing. A model trained on
these images gives the demo a real accuracy to keep while ATS drops tokens, and the task is the one ATS
is for: the object covers a small part of the image (about 9% of its area by default), so most tokens are
background and a trained CLS attention can ignore them.

Every image is drawn from ``numpy.random.Generator(PCG64(SeedSequence([seed, index])))``, so it is the
same on every platform and NumPy version, needs no download and no disk. Shape parameters are relative
to the image side, so ``size`` changes the resolution of the same scene, not the scene.

The classes differ in form, not colour: colour, position, scale, rotation and a mild aspect jitter are
random for every class. Distractors (thin lines, scribbles, small dots) are never any class shape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..model.config import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "CLASSES",
    "NUM_CLASSES",
    "TRAIN_SEED",
    "HELDOUT_SEED",
    "DEFAULT_SCALE",
    "SceneParams",
    "ShapesDataset",
    "render",
    "render_with_mask",
    "write_samples",
]

CLASSES = ("circle", "square", "triangle", "star", "cross", "ring", "arrow", "crescent", "heart", "glyph_e")
NUM_CLASSES = len(CLASSES)
TRAIN_SEED = 0  # training draws (seed, index) from this seed
HELDOUT_SEED = 1_000_003  # evaluation seed: never used in training
# Object diameter (of its bounding disc) as a fraction of the image side. 0.35-0.55 gives a mean object
# area of about 8.7% of the image (about 17 of 196 patch tokens at least half covered): most tokens are
# background, as ATS wants, while each shape still spans several 16-px patches at 224 px, which a ViT
# trained from scratch on 2 CPU cores can learn (at 0.10-0.25, 1.4% area, it stayed near chance).
DEFAULT_SCALE = (0.35, 0.55)


# ---- class shapes: lists of (polygon in unit coordinates, fill) drawn in order; all fit the unit disc ----


def _ngon(n: int, r: float = 1.0, cx: float = 0.0, cy: float = 0.0, phase: float = 0.0) -> np.ndarray:
    t = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def _star() -> np.ndarray:
    t = -np.pi / 2 + np.pi * np.arange(10) / 5
    r = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y], axis=1)
    pts -= (pts.max(0) + pts.min(0)) / 2
    return pts / np.linalg.norm(pts, axis=1).max()


def _scaled(pts: list[tuple[float, float]]) -> np.ndarray:
    a = np.asarray(pts, dtype=np.float64)
    return a / np.linalg.norm(a, axis=1).max()


_SHAPES: dict[str, list[tuple[np.ndarray, int]]] = {
    "circle": [(_ngon(48), 255)],
    "square": [(_ngon(4, phase=np.pi / 4), 255)],
    "triangle": [(_ngon(3, phase=-np.pi / 2), 255)],
    "star": [(_star(), 255)],
    "cross": [
        (
            _scaled(
                [(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3)]
                + [(0.3, 1), (-0.3, 1), (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)]
            ),
            255,
        )
    ],
    "ring": [(_ngon(48), 255), (_ngon(48, r=0.55), 0)],
    "arrow": [(_scaled([(-1, -0.2), (0.15, -0.2), (0.15, -0.6), (1, 0), (0.15, 0.6), (0.15, 0.2), (-1, 0.2)]), 255)],
    "crescent": [(_ngon(48), 255), (_ngon(48, r=0.82, cx=0.45), 0)],
    "heart": [(_heart(), 255)],
    "glyph_e": [
        (
            _scaled(
                [(-0.7, -0.9), (0.7, -0.9), (0.7, -0.55), (-0.25, -0.55), (-0.25, -0.17), (0.45, -0.17)]
                + [(0.45, 0.17), (-0.25, 0.17), (-0.25, 0.55), (0.7, 0.55), (0.7, 0.9), (-0.7, 0.9)]
            ),
            255,
        )
    ],
}
assert tuple(_SHAPES) == CLASSES


@dataclass(frozen=True)
class SceneParams:
    """Where the object is, in fractions of the image side (for tests and for reports)."""

    label: int
    cx: float
    cy: float
    diameter: float  # of the object's bounding disc, as a fraction of the side
    angle: float


def _rng(seed: int, index: int, stream: int = 0) -> np.random.Generator:
    """PCG64 seeded by (seed, index, stream): stream 0 draws the image, stream 1 the label order."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(index), int(stream)])))


def label_of(seed: int, index: int) -> int:
    """Labels are balanced exactly over every block of 10 indices, in a seeded random order."""
    perm = _rng(seed, index // NUM_CLASSES, 1).permutation(NUM_CLASSES)
    return int(perm[index % NUM_CLASSES])


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, 3)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """float32 [size, size, 3] in 0..255: gradient, smooth colour noise, stripes or blotches."""
    from PIL import Image

    kind = int(rng.integers(4))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    a, b = _colour(rng).astype(np.float32), _colour(rng).astype(np.float32)
    if kind == 0:  # linear gradient at a random angle
        t = rng.uniform(0, 2 * np.pi)
        u = np.cos(t) * xx + np.sin(t) * yy
        u = (u - u.min()) / max(float(u.max() - u.min()), 1e-6)
        img = a + (b - a) * u[..., None]
    elif kind == 1:  # smooth colour noise: a coarse random field upsampled bicubically
        g = int(rng.integers(3, 12))
        field = rng.uniform(0, 255, (g, g, 3)).astype(np.uint8)
        img = np.asarray(Image.fromarray(field).resize((size, size), Image.Resampling.BICUBIC), np.float32)
        img = a * 0.4 + img * 0.6
    elif kind == 2:  # low-contrast stripes at a random angle and frequency
        t = rng.uniform(0, np.pi)
        f = rng.uniform(3, 14)
        u = 0.5 + 0.5 * np.sin(2 * np.pi * f * (np.cos(t) * xx + np.sin(t) * yy) + rng.uniform(0, 2 * np.pi))
        img = a + (b - a) * 0.5 * u[..., None]
    else:  # blotches: a thresholded coarse field mixing two colours
        g = int(rng.integers(4, 10))
        field = rng.uniform(0, 255, (g, g)).astype(np.uint8)
        m = np.asarray(Image.fromarray(field).resize((size, size), Image.Resampling.BILINEAR), np.float32) / 255
        m = np.clip((m - 0.5) * 4 + 0.5, 0, 1)
        img = a + (b - a) * 0.6 * m[..., None]
    return img.astype(np.float32)


def _draw_distractors(rng: np.random.Generator, canvas, size: int) -> None:
    """Thin lines, scribbles and small dots: clutter that is never one of the class shapes."""
    from PIL import ImageDraw

    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(2, 10))):
        col = tuple(int(c) for c in _colour(rng))
        kind = int(rng.integers(3))
        if kind == 0:  # straight thin line
            p = rng.uniform(0, size, 4)
            draw.line([float(v) for v in p], fill=col, width=max(1, round(size * rng.uniform(0.003, 0.012))))
        elif kind == 1:  # scribble: an open polyline
            n = int(rng.integers(3, 7))
            start = rng.uniform(0, size, 2)
            pts = start + np.cumsum(rng.normal(0, size * 0.06, (n, 2)), axis=0)
            draw.line([tuple(map(float, q)) for q in pts], fill=col, width=max(1, round(size * 0.006)))
        else:  # small dot, at most a quarter of the smallest object's diameter
            r = size * rng.uniform(0.006, 0.022)
            c = rng.uniform(0, size, 2)
            draw.ellipse([float(c[0] - r), float(c[1] - r), float(c[0] + r), float(c[1] + r)], fill=col)


def _object_mask(label: int, r_px: float, angle: float, aspect: float, ss: int = 4) -> np.ndarray:
    """Anti-aliased alpha [h, w] float32 in 0..1 of the class shape, centred, supersampled ``ss`` times."""
    from PIL import Image, ImageDraw

    half = math.ceil(r_px * max(aspect, 1 / aspect)) + 2
    side = 2 * half * ss
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    for poly, fill in _SHAPES[CLASSES[label]]:
        p = poly * np.array([aspect, 1.0 / aspect]) * r_px
        p = p @ rot.T * ss + side / 2
        draw.polygon([tuple(map(float, q)) for q in p], fill=fill)
    small = mask.resize((2 * half, 2 * half), Image.Resampling.BOX)
    return np.asarray(small, np.float32) / 255.0


def render(
    seed: int, index: int, size: int = 224, *, scale: tuple[float, float] = DEFAULT_SCALE
) -> tuple[np.ndarray, SceneParams]:
    """One image as uint8 [size, size, 3] and its scene parameters; fully determined by the arguments."""
    img, params, _ = _render(seed, index, size, scale)
    return img, params


def render_with_mask(
    seed: int, index: int, size: int = 224, *, scale: tuple[float, float] = DEFAULT_SCALE
) -> tuple[np.ndarray, SceneParams, np.ndarray]:
    """:func:`render` plus the object's coverage (alpha) as float32 [size, size] in 0..1.

    The image is the same as :func:`render`'s (the mask is a by-product, it draws nothing from the RNG).
    Training uses it to label patch tokens (object class vs background).
    """
    return _render(seed, index, size, scale)


def _render(seed: int, index: int, size: int, scale: tuple[float, float]):
    from PIL import Image

    label = label_of(seed, index)
    rng = _rng(seed, index)
    img = _background(rng, size)
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    _draw_distractors(rng, canvas, size)
    img = np.asarray(canvas, np.float32).copy()

    diameter = float(rng.uniform(*scale))
    aspect = float(rng.uniform(0.87, 1.15))
    angle = float(rng.uniform(0, 2 * np.pi))
    r_px = diameter * size / 2
    alpha = _object_mask(label, r_px, angle, aspect)
    h = alpha.shape[0]
    # Keep the whole bounding box inside the image.
    lo, hi = h / 2 / size, 1 - h / 2 / size
    cx, cy = (float(rng.uniform(lo, hi)) for _ in range(2))
    x0, y0 = round(cx * size - h / 2), round(cy * size - h / 2)
    x0, y0 = min(max(x0, 0), size - h), min(max(y0, 0), size - h)
    region = img[y0 : y0 + h, x0 : x0 + h]
    local = region.reshape(-1, 3).mean(0)
    colour = _colour(rng)
    for _ in range(16):  # enough contrast against the local background, or the label is unreadable
        if np.linalg.norm(colour - local) >= 100:
            break
        colour = _colour(rng)
    else:
        colour = np.where(local > 127, 0.0, 255.0)
    region[:] = region * (1 - alpha[..., None]) + colour.astype(np.float32) * alpha[..., None]

    sigma = float(rng.uniform(0, 10))
    if sigma > 0.5:
        img += rng.standard_normal(img.shape, dtype=np.float32) * sigma
    out = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    mask = np.zeros((size, size), np.float32)
    mask[y0 : y0 + h, x0 : x0 + h] = alpha
    return out, SceneParams(label, (x0 + h / 2) / size, (y0 + h / 2) / size, diameter, angle), mask


class ShapesDataset:
    """``len`` images of seed ``seed``: item i is (normalised float32 [3, size, size], label int).

    Works as a ``torch.utils.data.Dataset`` (it has ``__len__`` and ``__getitem__``) without importing
    torch. ``mean``/``std`` default to ImageNet's, which the DeiT presets use.
    """

    def __init__(
        self,
        seed: int,
        length: int,
        size: int = 224,
        *,
        scale: tuple[float, float] = DEFAULT_SCALE,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        offset: int = 0,
    ) -> None:
        self.seed, self.length, self.size, self.scale, self.offset = int(seed), int(length), int(size), scale, offset
        self._mul = (1.0 / (255.0 * np.asarray(std, np.float32))).reshape(3, 1, 1)
        self._add = (-np.asarray(mean, np.float32) / np.asarray(std, np.float32)).reshape(3, 1, 1)

    def __len__(self) -> int:
        return self.length

    def raw(self, i: int) -> tuple[np.ndarray, SceneParams]:
        if not 0 <= i < self.length:
            raise IndexError(i)
        return render(self.seed, self.offset + i, self.size, scale=self.scale)

    def normalise(self, img: np.ndarray) -> np.ndarray:
        """uint8 [size, size, 3] -> normalised float32 [3, size, size]."""
        return (img.transpose(2, 0, 1).astype(np.float32) * self._mul + self._add).astype(np.float32)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        img, p = self.raw(i)
        return self.normalise(img), p.label

    def batch(self, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Items start..start+n-1 stacked: ([n, 3, size, size] float32, [n] int64)."""
        xs, ys = zip(*(self[i] for i in range(start, start + n)))
        return np.stack(xs), np.asarray(ys, np.int64)

    def batch_with_tokens(
        self, start: int, n: int, patch: int, threshold: float = 0.15
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`batch` plus a label per patch token, int64 [n, (size // patch) ** 2] in row-major order.

        A patch whose area is at least ``threshold`` covered by the object gets the image's class, any
        other patch gets ``NUM_CLASSES`` (background). Training uses these for token labelling.
        """
        if self.size % patch:
            raise ValueError(f"image size {self.size} is not a multiple of the patch size {patch}")
        g = self.size // patch
        xs, ys, ts = [], [], []
        for i in range(start, start + n):
            if not 0 <= i < self.length:
                raise IndexError(i)
            img, p, mask = render_with_mask(self.seed, self.offset + i, self.size, scale=self.scale)
            xs.append(self.normalise(img))
            ys.append(p.label)
            cover = mask.reshape(g, patch, g, patch).mean(axis=(1, 3)).reshape(-1)
            ts.append(np.where(cover >= threshold, p.label, NUM_CLASSES))
        return np.stack(xs), np.asarray(ys, np.int64), np.stack(ts).astype(np.int64)

    def labels(self) -> np.ndarray:
        return np.asarray([label_of(self.seed, self.offset + i) for i in range(self.length)], np.int64)


def write_samples(
    folder: str | Path, n: int, *, seed: int = HELDOUT_SEED, size: int = 224, scale: tuple[float, float] = DEFAULT_SCALE
) -> list[Path]:
    """Write ``n`` images as ``00000_<class>.png`` plus ``labels.csv`` (file,label,class) into ``folder``.

    Note: ``ats-deploy parity --inputs`` preprocesses images like timm evaluation (resize to size/0.875,
    centre crop), so the edges are cropped; use :class:`ShapesDataset` arrays for exact pixels.
    """
    from PIL import Image

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths, rows = [], ["file,label,class"]
    for i in range(n):
        img, p = render(seed, i, size, scale=scale)
        path = out / f"{i:05d}_{CLASSES[p.label]}.png"
        Image.fromarray(img).save(path)
        paths.append(path)
        rows.append(f"{path.name},{p.label},{CLASSES[p.label]}")
    (out / "labels.csv").write_text("\n".join(rows) + "\n")
    return paths
