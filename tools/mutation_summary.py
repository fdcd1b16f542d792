"""After `mutmut run` (make mutation): the mutation score per module and overall, and the surviving mutants.

Score = killed (timeouts count as killed) over applicable = all mutants minus skipped ones. Mutants no
test reaches ("no tests") count against the score: they are gaps too. Reads mutmut's own result files
through its CLI (`mutmut results --all true`), so it follows whatever mutmut version is installed.
"""

from __future__ import annotations

import collections
import re
import subprocess
import sys
from pathlib import Path

KILLED = {"killed", "timeout"}
PENDING = {"not checked"}  # an interrupted run: left out of the score, counted apart


def main() -> int:
    exe = Path(sys.executable).with_name("mutmut")
    out = subprocess.run([str(exe), "results", "--all", "true"], capture_output=True, text=True, check=False).stdout
    rows = re.findall(r"^\s+(\S+): (.+)$", out, flags=re.M)
    if not rows:
        print("no mutation results: run `make mutation` (mutmut run) first")
        return 1
    by_module: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    survivors = []
    pending = sum(status in PENDING for _, status in rows)
    rows = [(n, st) for n, st in rows if st not in PENDING]
    for name, status in rows:
        found = re.match(r"^(.*?)\.x(?:ǁ|_)", name)  # mutmut names: module.x_function__mutmut_N, module.xǁClassǁ...
        module = found.group(1) if found else name.split("__mutmut")[0]
        by_module[module][status] += 1
        if status not in KILLED and status != "skipped":
            survivors.append((name, status))
    total = collections.Counter()
    print(f"{'module':<44} {'killed':>7} {'applicable':>10} {'score':>7}")
    for module, c in sorted(by_module.items()):
        total.update(c)
        app = sum(c.values()) - c["skipped"]
        killed = sum(c[s] for s in KILLED)
        print(f"{module:<44} {killed:>7} {app:>10} {killed / app if app else 1:>7.1%}")
    app = sum(total.values()) - total["skipped"]
    killed = sum(total[s] for s in KILLED)
    print(f"{'all':<44} {killed:>7} {app:>10} {killed / app if app else 1:>7.1%}")
    print(f"statuses: {dict(total)}" + (f"; {pending} not checked yet (run interrupted)" if pending else ""))
    print(f"\n{len(survivors)} not killed (see one with `mutmut show NAME`):")
    for name, status in survivors:
        print(f"  {status:<12} {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
