"""After `mutmut run` (make mutation): the mutation score per module and overall, and the surviving mutants.

Score = killed (timeouts count as killed) over applicable = all mutants minus skipped ones. Mutants no
test reaches ("no tests") count against the score: they are gaps too. Reads mutmut's own result files
through its CLI (`mutmut results --all true`), so it follows whatever mutmut version is installed.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
from pathlib import Path

KILLED = {"killed", "timeout"}
PENDING = {"not checked"}  # an interrupted run: left out of the score, counted apart


def _module(name: str) -> str:
    found = re.match(r"^(.*?)\.x(?:ǁ|_)", name)  # mutmut names: module.x_function__mutmut_N, module.xǁClassǁ...
    return found.group(1) if found else name.split("__mutmut")[0]


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k/n (95% for z = 1.96)."""
    p = k / n
    mid = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return max(0.0, mid - half), min(1.0, mid + half)


def killed_applicable(c: collections.Counter) -> tuple[int, int]:
    """Killed (timeouts included) and applicable (all but skipped) counts of one tally of statuses."""
    return sum(c[s] for s in KILLED), sum(c.values()) - c["skipped"]


def weighted_score(by_module: dict[str, collections.Counter], population: collections.Counter) -> float:
    """Sum over the modules with results of (their mutants / all those modules' mutants) x their score."""
    parts = []
    for module, c in by_module.items():
        killed, app = killed_applicable(c)
        if app:
            parts.append((population[module], killed / app))
    weight = sum(w for w, _ in parts)
    return sum(w * sc for w, sc in parts) / weight if weight else 1.0


def restrict(rows: list[tuple[str, str]], only: set[str]) -> list[tuple[str, str]]:
    """Results outside ``only`` count as not checked (the population stays every mutant)."""
    return [(n, st if n in only else "not checked") for n, st in rows]


def main(argv: list[str] | None = None) -> int:
    """``--only FILE``: score just the mutants named in FILE (one per line: a sample), not every result
    mutmut holds (earlier runs' results of unchanged functions stay in mutants/)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", type=Path, metavar="FILE", help="score only the mutant names in FILE (a sample)")
    a = p.parse_args(argv)
    only = set(a.only.read_text().split()) if a.only else None
    exe = Path(sys.executable).with_name("mutmut")
    out = subprocess.run([str(exe), "results", "--all", "true"], capture_output=True, text=True, check=False).stdout
    rows = re.findall(r"^\s+(\S+): (.+)$", out, flags=re.M)
    if not rows:
        print("no mutation results: run `make mutation` (mutmut run) first")
        return 1
    if only is not None:
        rows = restrict(rows, only)
    by_module: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    survivors = []
    pending = sum(status in PENDING for _, status in rows)
    population = collections.Counter(_module(n) for n, _ in rows)  # every generated mutant, by module
    rows = [(n, st) for n, st in rows if st not in PENDING]
    if not rows:
        print(f"no mutant has a result yet ({pending} not checked): the run stopped before testing any")
        return 1
    for name, status in rows:
        by_module[_module(name)][status] += 1
        if status not in KILLED and status != "skipped":
            survivors.append((name, status))
    total = collections.Counter()
    print(f"{'module':<44} {'killed':>7} {'applicable':>10} {'score':>7}")
    for module, c in sorted(by_module.items()):
        total.update(c)
        killed, app = killed_applicable(c)
        print(f"{module:<44} {killed:>7} {app:>10} {killed / app if app else 1:>7.1%}")
    killed, app = killed_applicable(total)
    print(f"{'all':<44} {killed:>7} {app:>10} {killed / app if app else 1:>7.1%}")
    if app:
        lo, hi = wilson(killed, app)
        print(f"95% interval of the score (Wilson; the spread of a random sample of mutants): [{lo:.1%}, {hi:.1%}]")
    if pending:
        # A sample (make mutation-sample): weight each module's score by its share of all mutants, so a
        # small module sampled above its share does not tilt the estimate.
        weighted = weighted_score(by_module, population)
        print(f"estimated score over all {sum(population.values())} mutants (modules weighted by size): {weighted:.1%}")
    print(
        f"statuses: {dict(total)}"
        + (f"; {pending} not checked (an interrupted run, or outside the sample)" if pending else "")
    )
    print(f"\n{len(survivors)} not killed (see one with `mutmut show NAME`):")
    for name, status in survivors:
        print(f"  {status:<12} {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
