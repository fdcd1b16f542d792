"""Progress on stderr for anything that takes more than a few seconds.

On a terminal: a rich progress bar (transient). Anywhere else (a log file, CI, a pipe): plain lines,
one when a phase starts, then at most one every :data:`PLAIN_EVERY_S` seconds, and one at the end, so a
12-minute run never looks hung and a log never fills with carriage returns.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["Advance", "PLAIN_EVERY_S", "progress_bar"]

PLAIN_EVERY_S = 10.0
Advance = Callable[..., None]  # advance(n=1, description=None)


def _noop(n: int = 1, description: str | None = None) -> None:
    return None


@contextmanager
def progress_bar(enabled: bool, total: int, description: str, *, stream=None) -> Iterator[Advance]:
    """Yields ``advance(n=1, description=None)``; a no-op when ``enabled`` is False.

    ``stream`` defaults to ``sys.stderr`` (looked up at call time, so test runners that swap it see it).
    """
    if not enabled:
        yield _noop
        return
    err = stream if stream is not None else sys.stderr
    if getattr(err, "isatty", lambda: False)():
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*cols, console=Console(file=err), transient=True) as prog:
            task = prog.add_task(description, total=total)

            def advance(n: int = 1, description: str | None = None) -> None:
                prog.update(task, advance=n, **({"description": description} if description else {}))

            yield advance
        return

    state = {"done": 0, "desc": description, "t0": time.monotonic(), "last": time.monotonic()}

    def line() -> None:
        pct = f" ({100 * state['done'] / total:.0f}%)" if total else ""
        err.write(f"{state['desc']}: {state['done']}/{total}{pct}, {time.monotonic() - state['t0']:.0f} s\n")
        err.flush()
        state["last"] = time.monotonic()

    def advance_plain(n: int = 1, description: str | None = None) -> None:
        state["done"] += n
        if description and description != state["desc"]:
            state["desc"] = description
            line()
        elif time.monotonic() - state["last"] >= PLAIN_EVERY_S:
            line()

    line()
    try:
        yield advance_plain
    finally:
        if state["done"]:
            state["desc"] = f"{state['desc']}: done" if state["done"] >= total else state["desc"]
            line()
