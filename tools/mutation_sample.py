"""`make mutation-sample`: mutmut on a seeded random sample of the mutants, for a score in minutes.

A full `make mutation` over the modules in [tool.mutmut] only_mutate is thousands of mutants, hours on
two cores (about 0.3 mutants/s). A uniform random sample of n of them estimates the same score with a
binomial interval (the summary prints a 95% Wilson interval): 300 mutants give about +-3.5 points at 90%.
The sample is stratified by module (proportional, at least `--min-per-module` from each module), so
every module's survivors show up.

Steps: generate the mutants if `mutants/` has none (mutmut generates them, and collects which tests
reach each function, as the first part of any run: that run is given a name matching no mutant, so it
stops there), draw the sample, `mutmut run` exactly those names, then `tools/mutation_summary.py`.
The score printed is this sample's alone (its names are saved in `mutants/sample-seed<S>-n<N>.txt`;
`tools/mutation_summary.py --only FILE` prints it again); earlier runs' results stay in `mutants/`.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

NO_MUTANT = "ats_deploy.x_generate_only__mutmut_0"  # matches no mutant: mutmut generates, then stops


def mutant_names(root: Path = Path("mutants")) -> dict[str, list[str]]:
    """Every generated mutant's name, by source file, from mutmut's per-file .meta records."""
    by_file: dict[str, list[str]] = defaultdict(list)
    for meta in sorted(root.rglob("*.py.meta")):
        keys = json.loads(meta.read_text()).get("exit_code_by_key", {})
        by_file[str(meta.relative_to(root))[: -len(".meta")]].extend(sorted(keys))
    return dict(by_file)


def draw(by_file: dict[str, list[str]], n: int, seed: int, min_per_module: int) -> list[str]:
    """n names (fewer if there are fewer): proportional per file, at least min_per_module from each."""
    total = sum(len(v) for v in by_file.values())
    rng = random.Random(seed)
    picked: list[str] = []
    for _, names in sorted(by_file.items()):
        k = min(len(names), max(min_per_module, round(n * len(names) / max(total, 1))))
        picked.extend(rng.sample(names, k))
    return sorted(picked)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=300, help="mutants to run (default 300)")
    p.add_argument("--seed", type=int, default=0, help="sample seed (default 0)")
    p.add_argument("--min-per-module", type=int, default=10)
    p.add_argument("--jobs", type=int, default=2, help="mutmut --max-children (default 2)")
    p.add_argument("--list", action="store_true", help="print the sample and stop")
    a = p.parse_args(argv)
    if a.n < 1:
        p.error("--n must be at least 1")
    exe = str(Path(sys.executable).with_name("mutmut"))
    by_file = mutant_names()
    if not by_file:
        print("generating mutants and mapping tests to functions (the first part of a mutmut run) ...", flush=True)
        gen = subprocess.run([exe, "run", "--max-children", str(a.jobs), NO_MUTANT], capture_output=True, text=True)
        by_file = mutant_names()
        if not by_file:
            tail = (gen.stdout + gen.stderr).strip().splitlines()[-15:]
            print("mutmut generated no mutants; its output ended with:\n" + "\n".join(tail), file=sys.stderr)
            return 1
    sample = draw(by_file, a.n, a.seed, a.min_per_module)
    total = sum(len(v) for v in by_file.values())
    print(f"sample: {len(sample)} of {total} mutants (seed {a.seed}); per file:")
    chosen = set(sample)
    for f, names in sorted(by_file.items()):
        print(f"  {f}: {len(chosen.intersection(names))} of {len(names)}")
    if a.list:
        print("\n".join(sample))
        return 0
    rc = subprocess.run([exe, "run", "--max-children", str(a.jobs), *sample]).returncode
    names = Path("mutants") / f"sample-seed{a.seed}-n{a.n}.txt"
    names.write_text("\n".join(sample) + "\n")
    summary = Path(__file__).with_name("mutation_summary.py")
    print(f"\nscore of this sample ({names}):")
    subprocess.run([sys.executable, str(summary), "--only", str(names)], check=False)
    return rc


if __name__ == "__main__":
    sys.exit(main())
