"""Parity gates and docs/ATS_RULE.md's near-boundary latitude: flagged first differences are reported, not gated."""

from __future__ import annotations

import numpy as np
import pytest

from ats_deploy.model.config import resolve_ats
from ats_deploy.model.reference import near_boundary
from ats_deploy.reports.parity import Tolerances, compare_outputs, format_parity

BLOCKS = (1, 2)


def _outputs(n=4, width=5):
    toks = np.tile(np.arange(width), (n, 1)).astype(np.int64)
    ref = {"logits": np.tile(np.linspace(0, 1, 10), (n, 1)).astype(np.float32)}
    for b in BLOCKS:
        ref[f"tokens_{b}"] = toks.copy()
        ref[f"count_{b}"] = np.full(n, width, np.int32)
    got = {k: v.copy() for k, v in ref.items()}
    return ref, got


def _diverge(got, image, block):
    """Image ``image`` picks another token from ``block`` on, and its logits move (as they would)."""
    for b in BLOCKS:
        if b >= block:
            got[f"tokens_{b}"][image, 1] = 99
    got["logits"][image] = got["logits"][image][::-1]


def _flags(ref, **flagged):
    for b in BLOCKS:
        f = np.zeros(len(ref["logits"]), bool)
        for img in flagged.get(f"b{b}", ()):
            f[img] = True
        ref[f"near_boundary_{b}"] = f


def test_a_difference_that_starts_at_a_flagged_pick_is_reported_but_not_gated():
    ref, got = _outputs()
    _diverge(got, image=2, block=1)
    _flags(ref, b1=[2])
    res = compare_outputs(ref, got, blocks=BLOCKS)
    assert res.passed, res.failures
    assert res.kept_mismatches == 2 and res.kept_agreement == 0.75 and res.top1_agreement == 0.75
    assert res.excused_images == 1 and res.excused_mismatches == 2
    assert res.gated_kept_agreement == 1.0 and res.gated_top1_agreement == 1.0 and res.gated_logits_max_abs == 0
    assert "near-boundary: 1 image(s)" in format_parity(res)


def test_unflagged_differences_still_fail():
    ref, got = _outputs()
    _diverge(got, image=2, block=1)
    _flags(ref, b2=[2])  # flagged only at a later block: the first difference is not excused
    res = compare_outputs(ref, got, blocks=BLOCKS)
    assert not res.passed and res.excused_images == 0
    assert any("kept-set" in f for f in res.failures) and any("top-1" in f for f in res.failures)


def test_an_earlier_flag_decided_alike_excuses_nothing_later():
    ref, got = _outputs()
    _diverge(got, image=0, block=2)  # both sides agreed at block 1 despite its flag
    _flags(ref, b1=[0])
    res = compare_outputs(ref, got, blocks=BLOCKS)
    assert not res.passed and res.excused_images == 0


def test_without_flags_every_difference_counts():
    ref, got = _outputs()
    _diverge(got, image=1, block=2)
    res = compare_outputs(ref, got, blocks=BLOCKS)
    assert not res.passed and res.excused_images == -1


def test_too_many_excused_images_fail_as_unjudgeable():
    ref, got = _outputs()
    for i in range(3):
        _diverge(got, image=i, block=1)
    _flags(ref, b1=[0, 1, 2])
    res = compare_outputs(ref, got, blocks=BLOCKS, tolerances=Tolerances())
    assert not res.passed and any("too few to judge" in f for f in res.failures)


@pytest.mark.parametrize("shape", ["static", "dynamic"])
def test_torch_runner_flags_match_the_reference_rule(tiny_ckpt, shape):
    """The flags are reference.near_boundary on exactly the scores and counts each sampler saw.

    The 8 seeded inputs hold flagged and unflagged picks, so a runner that never or always flags fails;
    at K=8 one pick is flagged that K = n_ref would not flag, so a runner judging with the wrong K fails."""
    import torch

    from ats_deploy.model import build_model
    from ats_deploy.runtime.torch_runner import TorchRunner

    cfg = tiny_ckpt.config
    ats = resolve_ats(cfg, max_k="8", shape_mode=shape)
    x = np.random.default_rng(3).standard_normal((8, 3, cfg.img_size, cfg.img_size)).astype(np.float32)
    with TorchRunner(tiny_ckpt, ats, boundary=True) as r:
        out = r.infer({"pixels": x})
    with TorchRunner(tiny_ckpt, ats) as r:
        plain = r.infer({"pixels": x})
    assert not any(k.startswith("near_boundary_") for k in plain)
    for k, v in plain.items():
        assert np.array_equal(out[k], v), k  # recording the sampler inputs changes nothing
    model = build_model(tiny_ckpt, ats)
    with torch.inference_mode():
        trace = model.forward_trace(torch.from_numpy(x), sampler_inputs=True)
    assert len(trace.sampler_inputs) == len(ats.blocks)
    wants = []
    for blk, (s, c) in zip(ats.blocks, trace.sampler_inputs):
        want = [near_boundary(s[i].numpy(), int(c[i]), k_max=8, n_ref=cfg.n_ref) for i in range(len(x))]
        assert out[f"near_boundary_{blk}"].tolist() == want
        wants += want
    assert any(wants) and not all(wants), "the inputs must hold both flagged and unflagged picks"


def test_uniform_scores_are_flagged_and_peaky_ones_are_not():
    n = 65
    flat = np.ones(n, np.float32)
    peaky = np.random.default_rng(0).permutation(1.13 ** np.arange(n - 1))  # well separated, spread out
    assert near_boundary(flat, n, k_max=n, n_ref=n)
    assert not near_boundary(np.concatenate([[0], peaky]).astype(np.float32), n, k_max=17, n_ref=n)
