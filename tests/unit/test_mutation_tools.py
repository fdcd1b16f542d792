"""The mutation-testing helpers in tools/: the sample drawn and the interval printed with its score."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_wilson_interval_matches_hand_values():
    wilson = _load("mutation_summary").wilson
    # 9 of 10, z = 1.96: centre (0.9 + 1.9208/10) / 1.38416 = 0.78898, half-width
    # 1.96 * sqrt(0.009 + 0.009604) / 1.38416 = 0.19314 (hand arithmetic).
    lo, hi = wilson(9, 10)
    assert lo == pytest.approx(0.59584, abs=2e-5) and hi == pytest.approx(0.98212, abs=2e-5)
    # all killed: the upper end is 1, the lower n / (n + z^2) = 300 / 303.8416
    lo, hi = wilson(300, 300)
    assert hi == pytest.approx(1.0) and lo == pytest.approx(300 / 303.8416, abs=1e-9)


def test_sample_is_proportional_seeded_and_covers_every_module(tmp_path):
    ms = _load("mutation_sample")
    root = tmp_path / "mutants"
    files = {"pkg/big.py": 900, "pkg/mid.py": 90, "pkg/tiny.py": 3}
    for f, count in files.items():
        meta = root / (f + ".meta")
        meta.parent.mkdir(parents=True, exist_ok=True)
        mod = f[:-3].replace("/", ".")
        names = {f"{mod}.x_f__mutmut_{i}": None for i in range(1, count + 1)}
        meta.write_text(json.dumps({"exit_code_by_key": names, "durations_by_key": {}}))
    by_file = ms.mutant_names(root)
    assert {f: len(v) for f, v in by_file.items()} == files
    sample = ms.draw(by_file, 100, seed=3, min_per_module=10)
    per = {f: sum(n.startswith(f[:-3].replace("/", ".") + ".") for n in sample) for f in files}
    # 100 * 900/993 = 90.6 -> 91; 100 * 90/993 = 9.06 -> at least 10; 3 mutants: all 3
    assert per == {"pkg/big.py": 91, "pkg/mid.py": 10, "pkg/tiny.py": 3}
    assert len(set(sample)) == len(sample) == 104
    assert ms.draw(by_file, 100, seed=3, min_per_module=10) == sample
    assert ms.draw(by_file, 100, seed=4, min_per_module=10) != sample


def test_sampled_score_weights_modules_by_their_mutant_counts():
    from collections import Counter

    summary = _load("mutation_summary")
    by_module = {"a": Counter(killed=8, timeout=1, survived=1), "b": Counter(killed=5, survived=5, skipped=2)}
    population = Counter(a=100, b=10)
    # a: 9 of 10 (timeouts count as killed), b: 5 of 10 (skipped ones are not applicable);
    # by hand (100 * 0.9 + 10 * 0.5) / 110 = 95 / 110, where the pooled ratio would be 14 / 20
    assert summary.weighted_score(by_module, population) == pytest.approx(95 / 110)
    assert summary._module("ats_deploy.model.ats.x_select_tokens__mutmut_7") == "ats_deploy.model.ats"
    assert summary._module("ats_deploy.reports.parity.xǁGateǁcheck__mutmut_2") == "ats_deploy.reports.parity"


def test_a_sample_is_scored_on_its_own_names():
    summary = _load("mutation_summary")
    rows = [("m.x_f__mutmut_1", "killed"), ("m.x_f__mutmut_2", "survived"), ("m.x_g__mutmut_1", "killed")]
    assert summary.restrict(rows, {"m.x_f__mutmut_1", "m.x_f__mutmut_2"}) == [
        ("m.x_f__mutmut_1", "killed"),
        ("m.x_f__mutmut_2", "survived"),
        ("m.x_g__mutmut_1", "not checked"),
    ]
