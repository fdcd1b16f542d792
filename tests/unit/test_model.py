"""The PyTorch ViT with ATS: timm key names, shape modes, batch independence, distilled DeiT."""

from __future__ import annotations

import pytest
import torch

from ats_deploy.errors import ConfigError
from ats_deploy.model import build_model, resolve_ats
from ats_deploy.model.checkpoints import expected_keys
from ats_deploy.model.config import ATSConfig, default_ats_blocks
from ats_deploy.model.presets import PRESETS, preset


def _trace(ckpt, ats, x):
    with torch.no_grad():
        return build_model(ckpt, ats).forward_trace(torch.from_numpy(x))


def test_timm_key_names(tiny_ckpt):
    model = build_model(tiny_ckpt)
    names = set(model.state_dict())
    assert names == set(expected_keys(tiny_ckpt.config))
    for k in (
        "cls_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.5.mlp.fc2.bias",
        "norm.weight",
        "head.weight",
    ):
        assert k in names


def test_presets_shapes():
    assert preset("deit_small_patch16_224").embed_dim == 384
    assert preset("vit_large_patch16_384").num_tokens == 577
    assert preset("deit_base_distilled_patch16_224").num_tokens == 198
    assert len(PRESETS) >= 9
    with pytest.raises(ConfigError):
        preset("resnet50")


def test_default_blocks():
    assert default_ats_blocks(12) == tuple(range(3, 12))
    assert default_ats_blocks(24) == tuple(range(6, 24))


def test_static_and_dynamic_agree(tiny_ckpt, tiny_inputs):
    for max_k in (None, "33", "40,30,20,60"):
        s = _trace(tiny_ckpt, resolve_ats(tiny_ckpt.config, max_k=max_k, shape_mode="static"), tiny_inputs)
        d = _trace(tiny_ckpt, resolve_ats(tiny_ckpt.config, max_k=max_k, shape_mode="dynamic"), tiny_inputs)
        torch.testing.assert_close(s.logits, d.logits, atol=1e-5, rtol=0)
        for i in range(len(tiny_inputs)):
            assert s.kept(i) == d.kept(i)
        for ids_s, ids_d, c in zip(s.token_ids, d.token_ids, s.counts):
            assert ids_d.shape[1] == int(c.max())  # dynamic = static sliced to the batch's max count
            assert torch.equal(ids_s[:, : ids_d.shape[1]], ids_d)


def test_batch_of_8_equals_one_at_a_time(tiny_ckpt, tiny_inputs):
    ats = resolve_ats(tiny_ckpt.config, max_k="40")
    full = _trace(tiny_ckpt, ats, tiny_inputs)
    for i in range(len(tiny_inputs)):
        one = _trace(tiny_ckpt, ats, tiny_inputs[i : i + 1])
        assert one.kept(0) == full.kept(i)
        torch.testing.assert_close(one.logits[0], full.logits[i], atol=1e-5, rtol=0)


def test_k_varies_and_respects_budget(tiny_ckpt, tiny_inputs):
    out = _trace(tiny_ckpt, resolve_ats(tiny_ckpt.config, max_k="30"), tiny_inputs)
    for ids, cnt in zip(out.token_ids, out.counts):
        assert ids.shape[1] <= 30 and int(cnt.max()) <= 30
    first = out.counts[0]
    assert len(set(first.tolist())) > 1, "K' should vary from image to image on the seeded model"


def test_dense_is_ats_free(tiny_ckpt, tiny_inputs):
    dense = _trace(tiny_ckpt, ATSConfig(), tiny_inputs)
    assert dense.token_ids == () and dense.logits.shape == (8, 10)
    # The paper setting (K = token count) still drops tokens on this peaky model, so logits move.
    full = _trace(tiny_ckpt, resolve_ats(tiny_ckpt.config), tiny_inputs)
    assert int(full.counts[0].min()) < 65 and not torch.allclose(dense.logits, full.logits)


def test_distilled(tiny_distilled_ckpt, tiny_inputs):
    ck = tiny_distilled_ckpt
    ats = resolve_ats(ck.config, max_k="20")
    out = _trace(ck, ats, tiny_inputs)
    for i in range(len(tiny_inputs)):
        for ids in out.kept(i):
            assert ids[:2] == [0, 1], "CLS then the distillation token are always kept first"
            assert len(ids) - 2 <= 19
    d = _trace(ck, resolve_ats(ck.config, max_k="20", shape_mode="dynamic"), tiny_inputs)
    torch.testing.assert_close(out.logits, d.logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"max_k": "1"}, "below 2"),
        ({"max_k": "66"}, "above the token count"),
        ({"max_k": "10,20"}, "lists 2 values for 4 ATS blocks"),
        ({"blocks": "2,9"}, "out of range"),
        ({"blocks": "x"}, "comma list"),
        ({"shape_mode": "ragged"}, "--shape"),
    ],
)
def test_bad_ats_options(tiny_cfg, kw, msg):
    with pytest.raises(ConfigError, match=msg):
        resolve_ats(tiny_cfg, **kw)


def test_scores_are_float32_under_half_precision(tiny_ckpt, tiny_inputs):
    """The score path stays float32 even when the model runs in a lower precision."""
    model = build_model(tiny_ckpt, resolve_ats(tiny_ckpt.config)).to(torch.bfloat16)
    seen = []
    import ats_deploy.model.vit as vit

    orig = vit.select_tokens

    def spy(scores, count, **kw):
        seen.append(scores.dtype)
        return orig(scores, count, **kw)

    vit.select_tokens = spy
    try:
        with torch.no_grad():
            model(torch.from_numpy(tiny_inputs).to(torch.bfloat16))
    finally:
        vit.select_tokens = orig
    assert seen and all(d == torch.float32 for d in seen)
