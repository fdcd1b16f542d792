"""Score vectors that stress the sampler's exact float32 behaviour, shared by the sampler tests.

Each case is (name, scores [B, n] float32, count_in [B] int32). Besides random Dirichlet rows, the hard
kinds are the ones where float32 rounding decides the pick: peaky rows whose tiny scores sit far below
ulp(y) (several patches' distances to a grid point round to the same float32 value, and the first of
them must win), exact ties in score and in F~, zeros, subnormals, -0.0, NaN, all-equal rows, one or no
valid patch, and padding slots that hold large scores.
"""

from __future__ import annotations

import numpy as np


def _dirichlet(rng, b, n, alpha):
    return rng.dirichlet(np.full(n, alpha), size=b).astype(np.float32)


def peaky(rng, b, n):
    """A few large scores over many tiny ones spread over decades: long rounding-collapse runs."""
    out = np.empty((b, n), np.float32)
    for i in range(b):
        tiny = 10.0 ** rng.uniform(-12, -5, size=n)
        if i % 3 == 0:  # equal-spaced tiny scores: F~ steps far below ulp(y)
            tiny = np.full(n, 10.0 ** rng.uniform(-11, -7))
        big = rng.choice(n, size=min(n, int(rng.integers(1, 4))), replace=False)
        tiny[big] = rng.uniform(0.2, 1.0, size=len(big))
        out[i] = tiny
    return out


def kinds(rng, b, n):
    """Ties, zeros, subnormals, -0.0, NaN and all-equal rows."""
    out = _dirichlet(rng, b, n, 0.3)
    for i in range(b):
        kind = i % 8
        row = out[i]
        if kind == 0:
            row[:] = np.round(row * 8) / 8  # many exact ties (and zeros)
        elif kind == 1:
            row[1 + n // 2 :] = 0.0
        elif kind == 2:
            row[::3] = np.float32(1e-40)  # subnormal
        elif kind == 3:
            row[::4] = -0.0
        elif kind == 4:
            row[n // 3] = np.nan  # NaN: the row counts as all-equal
        elif kind == 5:
            row[:] = 0.25
        elif kind == 6:
            row[:] = 0.0
        else:
            row[:] = rng.integers(1, 4, size=n).astype(np.float32)  # three distinct values
    return out


def cases(seed: int = 0, sizes=(2, 3, 5, 17, 50, 197)) -> list[tuple[str, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for n in sizes:
        b = 24
        for name, s in (
            ("dirichlet", _dirichlet(rng, b, n, float(rng.choice([0.02, 0.1, 1.0])))),
            ("peaky", peaky(rng, b, n)),
            ("kinds", kinds(rng, b, n)),
        ):
            count = rng.integers(1, n + 1, size=b).astype(np.int32)
            count[: b // 2] = n
            count[b // 2] = 1
            count[b // 2 + 1] = min(2, n)
            s = s.copy()
            s[:, 0] = rng.uniform(0, 1, size=b)  # CLS score: ignored
            pad = np.arange(n)[None, :] >= count[:, None]
            s[pad] = 5.0  # padding with large scores must never be picked
            out.append((f"{name}-n{n}", s, count))
    return out
