"""JSON encoding of the numbers and paths our results carry (NumPy scalars and arrays, Path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["json_default"]


def json_default(o):
    """``default=`` for json.dumps: NumPy scalars/arrays and paths become plain JSON values."""
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")
