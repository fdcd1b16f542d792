"""Progress on stderr for anything that takes more than a few seconds.

On a terminal: a rich progress bar (transient). Anywhere else (a log file, CI, a pipe): plain lines,
once a run has taken :data:`QUIET_S` seconds: one when a phase starts, then at most one every
:data:`PLAIN_EVERY_S` seconds, and one at the end, so a 12-minute run never looks hung, a quick one prints
nothing, and a log never fills with carriage returns.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["Advance", "PLAIN_EVERY_S", "QUIET_S", "progress_bar"]

PLAIN_EVERY_S = 10.0
QUIET_S = 3.0  # plain lines only for runs longer than this (a bar on a terminal shows at once)
Advance = Callable[..., None]  # advance(n=1, description=None)


def _noop(n: int = 1, description: str | None = None) -> None:
    return None


@contextmanager
def progress_bar(
    enabled: bool, total: int, description: str, *, stream=None, quiet_s: float = QUIET_S
) -> Iterator[Advance]:
    """Yields ``advance(n=1, description=None)``; a no-op when ``enabled`` is False.

    ``stream`` defaults to ``sys.stderr`` (looked up at call time, so test runners that swap it see it).
    Plain lines start only once the run has taken ``quiet_s`` seconds: a quick run prints nothing.
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

    state = {"done": 0, "desc": description, "t0": time.monotonic(), "last": 0.0, "shown": False}

    def line() -> None:
        pct = f" ({100 * state['done'] / total:.0f}%)" if total else ""
        err.write(f"{state['desc']}: {state['done']}/{total}{pct}, {time.monotonic() - state['t0']:.0f} s\n")
        err.flush()
        state["last"], state["shown"] = time.monotonic(), True

    def advance_plain(n: int = 1, description: str | None = None) -> None:
        state["done"] += n
        now = time.monotonic()
        if description and description != state["desc"]:
            state["desc"] = description
            if state["shown"] or now - state["t0"] >= quiet_s:
                line()
        elif now - state["t0"] >= quiet_s and now - state["last"] >= PLAIN_EVERY_S:
            line()

    if quiet_s <= 0:
        line()
    try:
        yield advance_plain
    finally:
        if state["shown"]:  # a run that printed progress says where it ended
            state["desc"] = f"{state['desc']}: done" if state["done"] >= total else state["desc"]
            line()
