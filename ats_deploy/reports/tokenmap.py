"""Token maps: which patches ATS keeps at each ATS block, drawn over the input image (PNG, Pillow only).

The figure every token-reduction paper shows: one panel for the input, then one per ATS block in which
the dropped patches are dimmed and greyed and the kept ones stay in full colour, captioned with K' (the
patches kept, CLS and other prefix tokens not counted). Panels are laid out in rows of ``columns``.

The image drawn is the network's own input, de-normalised with the graph's mean/std, so the map lines
up with the pixels the model saw (after resize and centre crop), whatever the source format.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import ExportError

__all__ = ["denormalise", "kept_patch_mask", "token_map", "write_token_map", "write_token_maps"]

_CAPTION = 18  # pixels of caption strip above each panel


def denormalise(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Normalised float [3, H, W] -> uint8 [H, W, 3] (what the network saw, clipped to 0..255)."""
    img = pixels.transpose(1, 2, 0) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


def kept_patch_mask(token_ids: Sequence[int], grid: int, prefix_tokens: int = 1) -> np.ndarray:
    """bool [grid, grid]: True where the patch (token id ``prefix_tokens + row * grid + col``) is kept."""
    mask = np.zeros(grid * grid, bool)
    for t in token_ids:
        p = int(t) - prefix_tokens
        if p >= 0:  # prefix tokens (CLS, distillation) and padding (id 0) are not patches
            if p >= grid * grid:
                raise ValueError(f"token id {t} is outside a {grid}x{grid} patch grid")
            mask[p] = True
    return mask.reshape(grid, grid)


def _panel(img: np.ndarray, keep: np.ndarray | None, patch: int) -> np.ndarray:
    if keep is None:
        return img
    full = np.kron(keep, np.ones((patch, patch), bool))[: img.shape[0], : img.shape[1]]
    grey = img.astype(np.float32).mean(axis=2, keepdims=True)
    dim = (0.25 * grey + 0.15 * img + 20.0).clip(0, 255).astype(np.uint8)
    out = np.where(full[..., None], img, dim)
    # Thin outline on kept patches' edges where they border dropped ones, so single patches stand out.
    edge = np.zeros_like(full)
    edge[:-1] |= full[:-1] & ~full[1:]
    edge[1:] |= full[1:] & ~full[:-1]
    edge[:, :-1] |= full[:, :-1] & ~full[:, 1:]
    edge[:, 1:] |= full[:, 1:] & ~full[:, :-1]
    out[edge] = (255, 220, 0)
    return out


def token_map(
    image: np.ndarray,
    kept: Sequence[Sequence[int]],
    blocks: Sequence[int],
    *,
    patch: int,
    prefix_tokens: int = 1,
    title: str = "",
    columns: int = 5,
):
    """A PIL image: the input plus one panel per ATS block (``kept[i]`` = token ids kept at ``blocks[i]``)."""
    from PIL import Image, ImageDraw

    if len(kept) != len(blocks):
        raise ValueError(f"{len(kept)} kept lists for {len(blocks)} ATS blocks")
    h, w = image.shape[:2]
    grid = h // patch
    if grid * patch != h or h != w:
        raise ValueError(f"image {w}x{h} is not a square multiple of the patch size {patch}")
    panels = [(_panel(image, None, patch), "input")]
    total = grid * grid
    for blk, ids in zip(blocks, kept):
        m = kept_patch_mask(ids, grid, prefix_tokens)
        panels.append((_panel(image, m, patch), f"block {blk}: {int(m.sum())}/{total} kept"))
    cols = max(1, min(columns, len(panels)))
    rows = -(-len(panels) // cols)
    pad, head = 4, (_CAPTION if title else 0)
    canvas = Image.new("RGB", (cols * (w + pad) + pad, head + rows * (h + _CAPTION + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, 3), title, fill=(0, 0, 0))
    for i, (arr, caption) in enumerate(panels):
        r, c = divmod(i, cols)
        x0, y0 = pad + c * (w + pad), head + pad + r * (h + _CAPTION + pad)
        draw.text((x0, y0 + 3), caption, fill=(0, 0, 0))
        canvas.paste(Image.fromarray(arr), (x0, y0 + _CAPTION))
    return canvas


def _blocking_file(d: Path) -> Path | None:
    """The nearest existing non-folder among ``d`` and its parents (what makes creating ``d`` fail), if any."""
    for p in (d, *d.parents):
        if p.exists():
            return None if p.is_dir() else p
    return None


def check_png_folder(d: Path) -> None:
    """Refuse a PNG folder that cannot be made because a file is in the way, creating nothing (a command
    calls this before its work, :func:`make_png_folder` when it writes)."""
    blocker = _blocking_file(Path(d))
    if blocker is not None:
        raise ExportError(
            f"cannot create the token-map folder {d} ({blocker} is a file, not a folder); pass --png a folder path"
        )


def make_png_folder(d: Path) -> None:
    """Create the PNG folder ``d``; a file in the way or an unwritable parent is a one-line ExportError."""
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        blocker = _blocking_file(d)
        why = f"{blocker} is a file, not a folder" if blocker is not None else (exc.strerror or type(exc).__name__)
        raise ExportError(f"cannot create the token-map folder {d} ({why}); pass --png a folder path") from None


def write_token_map(path: str | Path, *args, **kwargs) -> Path:
    """:func:`token_map` saved as PNG at ``path`` (written to a temporary name, then renamed)."""
    import os

    path = Path(path)
    make_png_folder(path.parent)
    image = token_map(*args, **kwargs)
    tmp = path.with_name(path.name + ".tmp")
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        why = exc.strerror or type(exc).__name__
        raise ExportError(f"cannot write {path} ({why}); pass --png a writable folder") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _file_stem(name: str) -> str:
    """An input's name as a safe file stem: ``shapes:heldout[3]`` -> ``shapes_heldout_3``."""
    import re

    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).stem if "/" in name else name).strip("_.")
    return stem or "input"


def write_token_maps(
    out_dir: str | Path,
    pixels: np.ndarray,
    images: Sequence[dict],
    *,
    pre,
    cfg,
    blocks: Sequence[int],
    demo: dict | None = None,
) -> list[Path]:
    """One PNG per input into ``out_dir`` from the ``tokens`` command's records (``input``, ``top1``,
    ``kept``: block -> ids). Class names are spelled out for the demo shapes model."""
    names: Sequence[str] | None = None
    if (demo or {}).get("kind") == "demo":
        from ..demo.shapes import CLASSES

        names = CLASSES
    make_png_folder(Path(out_dir))  # before any drawing: a file in the way fails at once, naming itself
    paths, used = [], set()
    for i, rec in enumerate(images):
        stem = _file_stem(rec["input"])
        if stem in used:  # two inputs with the same stem: number them
            stem = f"{stem}_{i}"
        used.add(stem)
        top = rec["top1"]
        label = f"{top} ({names[top]})" if names and 0 <= top < len(names) else str(top)
        kept = [rec["kept"][str(b)] for b in blocks]
        img = denormalise(pixels[i], pre.mean, pre.std)
        title = f"{rec['input']}: predicted class {label}"
        paths.append(
            write_token_map(
                Path(out_dir) / f"{stem}.png",
                img,
                kept,
                blocks,
                patch=cfg.patch_size,
                prefix_tokens=cfg.num_prefix_tokens,
                title=title,
            )
        )
    return paths
