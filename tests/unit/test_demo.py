"""The demo: procedural shapes data, the training loop, the evaluation and the shipped-weights loader."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ats_deploy.demo.shapes import (
    CLASSES,
    HELDOUT_SEED,
    NUM_CLASSES,
    TRAIN_SEED,
    ShapesDataset,
    label_of,
    render,
    write_samples,
)
from ats_deploy.errors import CheckpointError, ConfigError

TINY_ARCH = {"embed_dim": 32, "depth": 4, "num_heads": 2}


def test_same_seed_and_index_give_the_same_image():
    a, pa = render(3, 17, 96)
    b, pb = render(3, 17, 96)
    assert a.dtype == np.uint8 and a.shape == (96, 96, 3)
    assert np.array_equal(a, b) and pa == pb


def test_different_seed_or_index_gives_a_different_image():
    a, _ = render(3, 17, 96)
    assert not np.array_equal(a, render(4, 17, 96)[0])
    assert not np.array_equal(a, render(3, 18, 96)[0])


def test_training_and_heldout_seeds_differ():
    assert TRAIN_SEED != HELDOUT_SEED


def test_classes_are_balanced_in_every_block_of_ten():
    ds = ShapesDataset(5, 200, 32)
    labels = ds.labels()
    assert labels.min() >= 0 and labels.max() < NUM_CLASSES
    for block in labels.reshape(-1, NUM_CLASSES):
        assert sorted(block.tolist()) == list(range(NUM_CLASSES))
    # and the order inside a block is not the same for every block
    assert len({tuple(b) for b in labels.reshape(-1, NUM_CLASSES)}) > 1


def test_items_are_normalised_chw_float32_with_their_label():
    ds = ShapesDataset(0, 20, 64)
    for i in range(0, 20, 7):
        x, y = ds[i]
        assert x.dtype == np.float32 and x.shape == (3, 64, 64)
        assert np.isfinite(x).all() and -2.2 < x.min() and x.max() < 2.7  # ImageNet mean/std of 0..1 pixels
        assert y == label_of(0, i) and 0 <= y < NUM_CLASSES
    xb, yb = ds.batch(3, 4)
    assert xb.shape == (4, 3, 64, 64) and yb.dtype == np.int64
    assert np.array_equal(xb[0], ds[3][0])
    with pytest.raises(IndexError):
        ds[20]


def test_objects_are_small_and_inside_the_image():
    from ats_deploy.demo.shapes import render_with_mask

    areas = []
    for i in range(120):
        _, p, mask = render_with_mask(1, i, 224)
        assert 0.35 <= p.diameter <= 0.55
        assert 0 < p.cx - p.diameter / 2 and p.cx + p.diameter / 2 < 1
        assert 0 < p.cy - p.diameter / 2 and p.cy + p.diameter / 2 < 1
        areas.append(mask.mean())
    # Most tokens are background: the object covers at most 10% of the image on average (about 8.7%).
    assert 0.07 < np.mean(areas) <= 0.10 and max(areas) < 0.25


def test_write_samples_writes_pngs_that_the_input_loader_reads(tmp_path):
    from ats_deploy.inputs import Preprocess, load_images

    paths = write_samples(tmp_path, 4, seed=HELDOUT_SEED, size=64)
    assert [p.name.split("_", 1)[1][:-4] in CLASSES for p in paths] == [True] * 4
    rows = (tmp_path / "labels.csv").read_text().splitlines()
    assert rows[0] == "file,label,class" and len(rows) == 5
    arr, names = load_images(tmp_path, Preprocess(size=64))
    assert arr.shape == (4, 3, 64, 64) and names == [p.name for p in paths]


def test_lr_schedule_warms_up_then_decays_to_min():
    from ats_deploy.demo.train import Phase, lr_at

    ph = Phase(img_size=112, steps=100, lr=1e-3, warmup=10)
    assert lr_at(0, ph, 1e-6) == pytest.approx(1e-4)
    assert lr_at(9, ph, 1e-6) == pytest.approx(1e-3)
    assert lr_at(10, ph, 1e-6) == pytest.approx(1e-3)
    assert lr_at(100, ph, 1e-6) == pytest.approx(1e-6)
    lrs = [lr_at(s, ph, 1e-6) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_resize_pos_embed_keeps_prefix_and_constant_fields():
    import torch

    from ats_deploy.demo.train import resize_pos_embed

    pe = torch.randn(1, 1 + 49, 8)
    same = resize_pos_embed(pe, 7, 7)
    assert same is pe
    big = resize_pos_embed(pe, 7, 14)
    assert big.shape == (1, 1 + 196, 8) and torch.equal(big[:, 0], pe[:, 0])
    const = torch.ones(1, 1 + 49, 8)
    assert torch.allclose(resize_pos_embed(const, 7, 14), torch.ones(1, 197, 8), atol=1e-5)


def _tiny_train(tmp_path, name="run", *, resume=False, **overrides):
    from dataclasses import replace

    from ats_deploy.demo.train import Phase, TrainConfig, train

    cfg = TrainConfig(
        phases=(Phase(img_size=32, steps=3, lr=1e-3, warmup=1), Phase(img_size=48, steps=2, lr=1e-4, warmup=1)),
        batch_size=4,
        arch=TINY_ARCH,
        out_dir=str(tmp_path / name),
        eval_every=0,
        threads=1,
        amp="none",
    )
    return train(replace(cfg, **overrides), resume=resume, progress=False)


def test_training_loop_runs_both_phases_and_writes_loadable_weights(tmp_path):
    import json

    from ats_deploy.model import load_checkpoint

    res = _tiny_train(tmp_path)
    assert res.steps == 5 and math.isfinite(res.last_loss)
    ck = load_checkpoint(res.final_weights, heads=2)
    assert ck.config.img_size == 48 and ck.config.num_classes == NUM_CLASSES and ck.config.embed_dim == 32
    out = res.final_weights.parent
    for f in ("last.safetensors", "state.pt", "phase0_end.safetensors", "phase1_end.safetensors", "train.log"):
        assert (out / f).is_file(), f
    assert load_checkpoint(out / "phase0_end.safetensors", heads=2).config.img_size == 32
    events = [json.loads(line)["event"] for line in (out / "train.log").read_text().splitlines()]
    assert events[0] == "start" and events[-1] == "done" and "train" in events
    # Resuming a finished run (bookkeeping such as the eval cadence may differ) does no more steps
    # and gives the same weights.
    again = _tiny_train(tmp_path, resume=True, eval_every=50, ckpt_every_s=1.0)
    assert again.steps == 5 and again.history == []
    assert json.loads((out / "train.log").read_text().splitlines()[-2])["event"] == "resume"
    resumed = load_checkpoint(again.final_weights, heads=2).state_dict
    assert all(np.array_equal(ck.state_dict[k], resumed[k]) for k in resumed)


def test_training_is_deterministic_given_the_seed(tmp_path):
    from ats_deploy.model import load_checkpoint

    a = load_checkpoint(_tiny_train(tmp_path, "a").final_weights, heads=2).state_dict
    b = load_checkpoint(_tiny_train(tmp_path, "b").final_weights, heads=2).state_dict
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_evaluate_reports_dense_and_ats_settings_on_a_tiny_model():
    from ats_deploy.demo.evaluate import evaluate, render_report
    from ats_deploy.model.config import ViTConfig
    from ats_deploy.model.default import default_checkpoint

    cfg = ViTConfig(img_size=64, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=NUM_CLASSES)
    rep = evaluate(default_checkpoint(0, cfg), images=12, batch_size=6, max_ks=(None, 33, 999), progress=False)
    names = [s.name for s in rep.settings]
    assert names == ["dense", "ATS blocks 1..3, K=65", "ATS blocks 1..3, K=33"]  # K above n_ref left out
    dense, full, k33 = rep.settings
    assert dense.agreement == 100.0 and dense.mean_kept == {} and dense.gflops_adaptive == dense.gflops_static
    for s in rep.settings:
        assert 0.0 <= s.top1 <= 100.0 and len(s.per_class_top1) == NUM_CLASSES
    assert set(full.mean_kept) == {1, 2, 3} and all(0 < v <= 64 for v in full.mean_kept.values())
    assert all(v <= 32 for v in k33.mean_kept.values())
    assert full.gflops_adaptive < dense.gflops_static and k33.gflops_static < full.gflops_static
    assert "dense" in render_report(rep) and rep.to_dict()["images"] == 12


def test_demo_weights_round_trip_through_fp16(tmp_path):
    import torch

    from ats_deploy.demo.train import model_config, save_weights
    from ats_deploy.demo.weights import export_demo_weights, load_demo_checkpoint, sha256_of
    from ats_deploy.model.vit import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(model_config(32, TINY_ARCH))
    src = save_weights(model, tmp_path / "final.safetensors")
    dst = tmp_path / "shipped.safetensors"
    digest = export_demo_weights(src, dst)
    assert digest == sha256_of(dst) and len(digest) == 64
    assert dst.stat().st_size < src.stat().st_size * 0.6  # float16 on disk
    ck = load_demo_checkpoint(dst)
    assert ck.config.num_heads == 2 and ck.config.img_size == 32
    w = model.state_dict()["blocks.0.attn.qkv.weight"].numpy()
    got = ck.state_dict["blocks.0.attn.qkv.weight"]
    assert got.dtype == np.float32 and np.allclose(got, w, atol=1e-3)


def test_missing_demo_weights_say_how_to_make_them(tmp_path):
    from ats_deploy.demo.weights import load_demo_checkpoint

    with pytest.raises(CheckpointError, match="demo train"):
        load_demo_checkpoint(tmp_path / "nope.safetensors")


def test_worker_processes_produce_the_same_batches():
    from ats_deploy.demo.train import _batch_iter

    ds = ShapesDataset(0, 2**62, 32)
    for patch in (None, 8):
        a = list(_batch_iter(ds, 3, 5, 7, workers=0, patch=patch))
        b = list(_batch_iter(ds, 3, 5, 7, workers=1, patch=patch))
        assert len(a) == len(b) == 2
        for (xa, ya, ta), (xb, yb, tb) in zip(a, b):
            assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
            assert (ta is None and tb is None) if patch is None else np.array_equal(ta, tb)
        assert np.array_equal(a[0][0], ds.batch(15, 3)[0])


def test_patch_token_labels_mark_the_object_patches():
    from ats_deploy.demo.shapes import NUM_CLASSES, render_with_mask

    ds = ShapesDataset(0, 100, 64, scale=(0.3, 0.5))
    x, y, t = ds.batch_with_tokens(0, 6, patch=8)
    assert t.shape == (6, 64) and t.dtype == np.int64
    assert np.array_equal(x, ds.batch(0, 6)[0]) and np.array_equal(y, ds.batch(0, 6)[1])
    for i in range(6):
        img, p, mask = render_with_mask(0, i, 64, scale=(0.3, 0.5))
        assert np.array_equal(img, ds.raw(i)[0])  # the mask draws nothing from the RNG
        labels = set(t[i].tolist())
        assert labels <= {y[i], NUM_CLASSES} and y[i] in labels and NUM_CLASSES in labels
        # The patch under the object's centre is an object patch.
        r, c = min(int(p.cy * 8), 7), min(int(p.cx * 8), 7)
        if mask[r * 8 : r * 8 + 8, c * 8 : c * 8 + 8].mean() >= 0.15:
            assert t[i, r * 8 + c] == y[i]
        assert mask.max() > 0.99 and mask.min() == 0.0


def test_ship_writes_fp16_weights_and_a_card_filled_from_the_run(tmp_path):
    import json

    from ats_deploy.demo.card import read_run_log, ship_run
    from ats_deploy.errors import InputError

    res = _tiny_train(tmp_path, eval_every=2, eval_images=10)
    run = res.final_weights.parent
    log = read_run_log(run)
    recs = [json.loads(line) for line in (run / "train.log").read_text().splitlines()]
    held = [r for r in recs if "heldout_top1" in r]
    assert [c["global_step"] for c in log.curve] == [r["global_step"] for r in held] and len(held) >= 2
    assert [c["images"] for c in log.curve] == [r["global_step"] * 4 for r in held]
    assert log.steps == 5 and log.wall_s == pytest.approx(recs[-1]["time"] - recs[0]["time"])
    dst = tmp_path / "ship" / "w.safetensors"
    weights, card, report = ship_run(run, command="train it", dst=dst, images=10, progress=False)
    text = card.read_text()
    from ats_deploy.demo.weights import sha256_of

    assert weights == dst and f"`{sha256_of(dst)}`" in text and "Command: `train it`" in text
    # The architecture line describes the shipped file (this run's tiny arch), its parameters counted from it.
    from safetensors.numpy import load_file

    params = sum(v.size for v in load_file(str(dst)).values())
    assert f"- Architecture: ViT/16 (embed 32, depth 4, 2 heads, {params:,} parameters)," in text
    for c in held:  # every held-out check of the log is a row of the curve table
        assert f"| {c['global_step']} | {c['phase']} | {c['img_size']} | {c['global_step'] * 4:,} |" in text
    dense = report.settings[0]
    assert f"| dense | {dense.top1:.2f} | 100.00 |" in text
    assert json.loads((dst.parent / "eval.json").read_text())["images"] == 10
    # A run without its final weights or log is refused with a one-line reason.
    (run / "final.safetensors").unlink()
    with pytest.raises(InputError, match="final.safetensors is missing"):
        ship_run(run, command="x", dst=dst, images=10, progress=False)
    with pytest.raises(InputError, match="train.log is missing"):
        read_run_log(tmp_path)


def test_a_finished_run_extended_by_a_phase_equals_a_fresh_run_of_all_phases(tmp_path):
    from dataclasses import replace

    from ats_deploy.demo.card import read_run_log
    from ats_deploy.demo.train import Phase, TrainConfig, train
    from ats_deploy.model import load_checkpoint

    one = (Phase(img_size=32, steps=3, lr=1e-3, warmup=1),)
    two = one + (Phase(img_size=48, steps=2, lr=1e-4, warmup=1),)
    base = TrainConfig(phases=one, batch_size=4, arch=TINY_ARCH, eval_every=0, threads=1)
    train(replace(base, out_dir=str(tmp_path / "ext")), progress=False)
    ext = train(replace(base, phases=two, out_dir=str(tmp_path / "ext")), resume=True, progress=False)
    fresh = train(replace(base, phases=two, out_dir=str(tmp_path / "fresh")), progress=False)
    a = load_checkpoint(ext.final_weights, heads=2).state_dict
    b = load_checkpoint(fresh.final_weights, heads=2).state_dict
    assert all(np.array_equal(a[k], b[k]) for k in b)
    assert read_run_log(tmp_path / "ext").config["phases"][1]["img_size"] == 48
    # A different recipe (here: another learning rate in the finished phase) starts over instead.
    other = (Phase(img_size=32, steps=3, lr=5e-4, warmup=1),) + two[1:]
    restarted = train(replace(base, phases=other, out_dir=str(tmp_path / "ext")), resume=True, progress=False)
    assert restarted.steps == 5 and len(restarted.history) > 0


def test_an_ats_phase_alternates_ats_and_dense_steps_on_the_same_weights(tmp_path):
    import torch

    from ats_deploy.demo.train import Phase, TrainConfig, _parse_phase, _set_ats, model_config, train
    from ats_deploy.model.vit import VisionTransformer

    assert _parse_phase("224:10:1e-4:2:ats") == Phase(224, 10, 1e-4, 2, None, True)
    assert _parse_phase("112:5:1e-3:1:0.3:0.5") == Phase(112, 5, 1e-3, 1, (0.3, 0.5), False)
    model = VisionTransformer(model_config(32, TINY_ARCH))
    _set_ats(model, True)
    assert [b.k_max for b in model.blocks] == [None, 5, 5, 5]  # 4 blocks: ATS at 1..3, K = 1 + 4 patches
    out = model.forward_trace(torch.zeros(1, 3, 32, 32))
    assert len(out.counts) == 3
    _set_ats(model, False)
    assert all(b.k_max is None for b in model.blocks)
    assert len(model.forward_trace(torch.zeros(1, 3, 32, 32)).counts) == 0
    cfg = TrainConfig(
        phases=(Phase(img_size=32, steps=4, lr=1e-3, warmup=1, ats=True),),
        batch_size=4,
        arch=TINY_ARCH,
        out_dir=str(tmp_path / "ats"),
        eval_every=0,
        threads=1,
    )
    res = train(cfg, progress=False)
    assert res.steps == 4 and math.isfinite(res.last_loss)


@pytest.mark.parametrize(
    "every,expected", [(2, [False, True, False, True]), (1, [True] * 4), (3, [False, False, True, False])]
)
def test_ats_every_n_chooses_which_steps_run_through_ats(tmp_path, monkeypatch, every, expected):
    """':ats=N' runs step s through ATS when s % N == N - 1 (':ats' is N = 2); recorded by wrapping the real
    switch, which the training loop turns on for an ATS step and off after it."""
    from ats_deploy.demo import train as tr

    assert tr._parse_phase("224:10:1e-4:2:ats=1") == tr.Phase(224, 10, 1e-4, 2, None, True, 0.0, 1)
    assert tr._parse_phase("224:10:1e-4:2:ats=3:guide=0.5") == tr.Phase(224, 10, 1e-4, 2, None, True, 0.5, 3)
    assert tr._parse_phase("224:10:1e-4:2:ats").ats_every == 2
    for bad in ("224:10:1e-4:2:ats=0", "224:10:1e-4:2:ats=x:guide=1", "224:10:1e-4:2:ats="):
        with pytest.raises(ValueError, match=r"ats=N needs a whole number N >= 1"):
            tr._parse_phase(bad)
    with pytest.raises(ConfigError, match="ats_every must be at least 1"):
        tr.TrainConfig(phases=(tr.Phase(32, 2, 1e-3, 1, ats=True, ats_every=0),))
    calls = []
    real = tr._set_ats
    monkeypatch.setattr(tr, "_set_ats", lambda model, on: (calls.append(on), real(model, on))[1])
    cfg = tr.TrainConfig(
        phases=(tr.Phase(img_size=32, steps=4, lr=1e-3, warmup=1, ats=True, ats_every=every),),
        batch_size=2,
        arch=TINY_ARCH,
        out_dir=str(tmp_path / "e"),
        eval_every=0,
        threads=1,
        amp="none",
    )
    tr.train(cfg, progress=False)
    assert calls[0::2] == expected and not any(calls[1::2])


def test_guidance_loss_matches_hand_computed_cross_entropy():
    """Two ATS blocks, one image: the target puts 0.8 evenly on the object's valid patches and 0.2 evenly on
    the other valid ones; padding slots' scores (here large) must not count; the result is the mean over
    blocks. Expected values by hand (natural logs)."""
    import torch

    from ats_deploy.demo.train import guidance_loss

    obj = torch.tensor([[False, False, True, True]])  # patches 0..3 = tokens 1..4; the object is tokens 3 and 4
    # Block A: all 5 slots valid, scores of tokens 1..4 = 1, 1, 2, 4 -> p = 1/8, 1/8, 2/8, 4/8.
    # target 0.1, 0.1, 0.4, 0.4: CE = 0.2 ln 8 + 0.4 ln 4 + 0.4 ln 2.
    block_a = (torch.tensor([[7.0, 1.0, 1.0, 2.0, 4.0]]), torch.tensor([5]))
    # Block B: its input slots hold tokens 0, 4, 2 (then padding); 3 valid slots: token 4 (object) and
    # token 2 (background), scores 3 and 1 -> p = 3/4, 1/4; target 0.8, 0.2.
    block_b = (torch.tensor([[5.0, 3.0, 1.0, 9.0, 9.0]]), torch.tensor([3]))
    trace_ids = [torch.tensor([[0, 4, 2, 0, 0]]), torch.tensor([[0, 4, 0, 0, 0]])]
    ce_a = 0.2 * math.log(8) + 0.4 * math.log(4) + 0.4 * math.log(2)
    ce_b = -(0.8 * math.log(0.75) + 0.2 * math.log(0.25))
    got = float(guidance_loss([block_a, block_b], trace_ids, obj, background=0.2))
    assert got == pytest.approx((ce_a + ce_b) / 2, rel=1e-6)
    # No background among the valid slots (3 valid: tokens 1, 2, both object; p = 1/3, 2/3): the whole
    # target on the object. The first ATS block's slots are the original tokens; its trace ids are unused.
    rec = [(torch.tensor([[0.0, 1.0, 2.0, 5.0, 5.0]]), torch.tensor([3]))]
    ids = [torch.tensor([[0, 2, 1, 0, 0]])]
    head_obj = torch.tensor([[True, True, False, False]])
    assert float(guidance_loss(rec, ids, head_obj, background=0.2)) == pytest.approx(
        -0.5 * (math.log(1 / 3) + math.log(2 / 3)), rel=1e-6
    )
    # An image without object patches among its valid slots adds nothing (here: the only image -> 0).
    assert float(guidance_loss(rec, ids, torch.tensor([[False, False, True, True]]))) == 0.0


def test_guidance_reaches_the_attention_weights_of_the_ats_blocks():
    """The guidance loss is a function of the weights through the scores (the selection is not): its
    gradient reaches the query/key/value weights of every ATS block and none of the head's."""
    import torch

    from ats_deploy.demo.train import _set_ats, guidance_loss, model_config
    from ats_deploy.model.vit import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(model_config(32, TINY_ARCH))
    _set_ats(model, True)
    rec: list = []
    _, trace_ids, _ = model.forward_features(torch.randn(2, 3, 32, 32), rec)
    obj = torch.tensor([[True, False, False, False], [False, True, True, False]])
    guidance_loss(rec, trace_ids, obj).backward()
    for i in (1, 2, 3):  # ATS blocks of the 4-block model
        assert model.blocks[i].attn.qkv.weight.grad.abs().sum() > 0, i
    assert model.head.weight.grad is None


def test_a_guided_phase_trains_and_logs_its_loss_and_the_ats_top1(tmp_path, monkeypatch):
    """The logged heldout_top1_ats is the real evaluation run with ATS switched on (a spy around
    evaluate_dense records what each call saw), and heldout_top1 the same one with ATS off."""
    import json

    import ats_deploy.demo.train as tr
    from ats_deploy.demo.train import Phase, TrainConfig, _parse_phase, train

    seen = []
    real_eval = tr.evaluate_dense

    def spy(model, *a, **k):
        top1 = real_eval(model, *a, **k)
        seen.append((model.ats.blocks, [blk.k_max for blk in model.blocks], top1))
        return top1

    monkeypatch.setattr(tr, "evaluate_dense", spy)

    assert _parse_phase("224:10:1e-4:2:ats:guide=0.5") == Phase(224, 10, 1e-4, 2, None, True, 0.5)
    with pytest.raises(ValueError, match="needs an ATS phase"):
        _parse_phase("224:10:1e-4:2:guide=0.5")
    with pytest.raises(ConfigError, match="needs an ATS phase"):
        TrainConfig(phases=(Phase(32, 2, 1e-3, 1, guide=1.0),))
    cfg = TrainConfig(
        phases=(Phase(img_size=32, steps=4, lr=1e-3, warmup=1, ats=True, guide=1.0),),
        batch_size=4,
        arch=TINY_ARCH,
        out_dir=str(tmp_path / "g"),
        eval_every=2,
        eval_images=4,
        threads=1,
        amp="none",
    )
    res = train(cfg, progress=False)
    assert res.steps == 4 and math.isfinite(res.last_loss)
    recs = [json.loads(line) for line in (tmp_path / "g" / "train.log").read_text().splitlines()]
    last = [r for r in recs if r["event"] == "train"][-1]
    assert math.isfinite(last["guide_loss"]) and last["guide_loss"] > 0
    evals = [r for r in recs if r["event"] == "train" and "heldout_top1" in r]
    assert len(evals) == 1 and len(seen) == 2  # logged at the phase's last step: dense, then ATS
    depth, tokens = TINY_ARCH["depth"], (32 // 16) ** 2 + 1  # patch 16: 2 x 2 patches + CLS
    for rec, (dense, ats) in zip(evals, zip(seen[::2], seen[1::2])):
        assert dense[0] == () and dense[1] == [None] * depth and rec["heldout_top1"] == dense[2]
        # the paper's placement scaled to depth 4 (blocks 3..11 of 12 -> 1..3), K = token count
        assert ats[0] == tuple(range(depth // 4, depth)) and rec["heldout_top1_ats"] == ats[2]
        assert ats[1] == [None] * (depth // 4) + [tokens] * (depth - depth // 4)


def test_init_starts_from_the_given_weights(tmp_path):
    """With --init and a zero learning rate the run's weights are the init file's, position embedding
    resized to the phase's grid; the recipe records the file's sha256. A missing or foreign file is one
    clear error."""
    import torch
    from safetensors.torch import save_file

    from ats_deploy.artifacts import sha256_file
    from ats_deploy.demo.card import read_run_log
    from ats_deploy.demo.train import Phase, TrainConfig, model_config, resize_pos_embed, train
    from ats_deploy.errors import ConfigError
    from ats_deploy.model import load_checkpoint
    from ats_deploy.model.vit import VisionTransformer

    torch.manual_seed(3)
    src = VisionTransformer(model_config(32, TINY_ARCH))
    for p in src.parameters():
        torch.nn.init.normal_(p, std=0.5)
    init = tmp_path / "init.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(init))
    base = TrainConfig(
        phases=(Phase(img_size=48, steps=1, lr=0.0, warmup=1),),
        batch_size=2,
        arch=TINY_ARCH,
        eval_every=0,
        threads=1,
        amp="none",
        min_lr=0.0,
        token_label=0.0,
    )
    res = train(replace_cfg(base, out_dir=str(tmp_path / "i"), init=str(init)), progress=False)
    got = load_checkpoint(res.final_weights, heads=2).state_dict
    want = {k: v.detach().numpy() for k, v in src.state_dict().items()}
    want["pos_embed"] = resize_pos_embed(src.pos_embed.detach(), 2, 3).numpy()
    assert set(got) == set(want)
    assert all(np.array_equal(got[k], want[k]) for k in want)
    assert read_run_log(tmp_path / "i").config["init"] == str(init)
    assert base.recipe().get("init_sha256") is None
    assert replace_cfg(base, init=str(init)).recipe()["init_sha256"] == sha256_file(init)
    with pytest.raises(ConfigError, match="no such file"):
        train(replace_cfg(base, out_dir=str(tmp_path / "m"), init=str(tmp_path / "nope.safetensors")), progress=False)
    other = tmp_path / "other.safetensors"
    save_file({"pos_embed": torch.zeros(1, 5, 8)}, str(other))
    with pytest.raises(ConfigError, match="not weights of this model"):
        train(replace_cfg(base, out_dir=str(tmp_path / "o"), init=str(other)), progress=False)


def replace_cfg(cfg, **kw):
    from dataclasses import replace

    return replace(cfg, **kw)


def test_a_card_of_fine_tuned_weights_keeps_the_history_of_its_starting_weights(tmp_path):
    """Ship run A, fine-tune B from A's shipped file (--init), ship B over it: B's card carries A's training
    section as its first stage (read before A's file is replaced) and names A's sha256; a card that does
    not describe the init file (another sha256) is not borrowed."""
    from ats_deploy.demo.card import base_training_section, ship_run
    from ats_deploy.demo.weights import sha256_of

    a = _tiny_train(tmp_path, "a", eval_every=2, eval_images=4)
    dst = tmp_path / "ship" / "w.safetensors"
    ship_run(a.final_weights.parent, command="train stage one", dst=dst, images=4, progress=False)
    sha_a = sha256_of(dst)
    section = base_training_section(dst)
    assert section.startswith("## Training (") and "Command: `train stage one`" in section
    import shutil

    a_copy = shutil.copy(dst, dst.parent / "a_copy.safetensors")
    assert base_training_section(a_copy) == section  # the card describes these bytes, whatever the name
    b = _tiny_train(tmp_path, "b", init=str(dst), eval_every=2, eval_images=4)
    _, card, _ = ship_run(b.final_weights.parent, command="train stage two", dst=dst, images=4, progress=False)
    text = card.read_text()
    first = text.index("## Training, first stage: the starting weights (")
    last = text.index("## Training, last stage (")
    assert first < text.index("Command: `train stage one`") < last < text.index("Command: `train stage two`")
    assert f"Started (`--init`) from weights with sha256 `{sha_a}` (the first stage above)" in text
    assert sha256_of(dst) != sha_a and f"`{sha256_of(dst)}`" in text
    # The card beside the copy now describes B, not A's bytes: nothing to borrow for A any more.
    assert base_training_section(a_copy) is None
    # A third stage C from B's file: A stays first, B becomes an earlier stage, C names B as the stage above.
    sha_b = sha256_of(dst)
    c = _tiny_train(tmp_path, "c", init=str(dst), eval_every=2, eval_images=4)
    _, card, _ = ship_run(c.final_weights.parent, command="train stage three", dst=dst, images=4, progress=False)
    text = card.read_text()
    order = [
        "## Training, first stage: the starting weights (",
        "Command: `train stage one`",
        "## Training, earlier stage (",
        f"Started (`--init`) from weights with sha256 `{sha_a}` (the first stage above)",
        "Command: `train stage two`",
        "## Training, last stage (",
        f"Started (`--init`) from weights with sha256 `{sha_b}` (the stage above)",
        "Command: `train stage three`",
    ]
    at = [text.index(x) for x in order]
    assert at == sorted(at) and text.count("## Training, last stage (") == 1
    # Shipping B's run again (its --init file now holds B): B's own history is not borrowed as its first
    # stage; the card still names the bytes the run started from (sha256 recorded in the log).
    _, card, _ = ship_run(b.final_weights.parent, command="train stage two", dst=dst, images=4, progress=False)
    again = card.read_text()
    assert "## Training, first stage" not in again and "## Training (" in again
    assert f"weights with sha256 `{sha_a}` (no card of them was found)" in again


def test_a_cpu_where_bf16_is_slower_is_named_in_the_log(tmp_path):
    """bf16 autocast is slower than float32 on some CPUs (emulated: hundreds of times; some with native
    bf16 too): the run logs the ratio it measured, and warns with the way out exactly when bf16 loses."""
    import json

    from ats_deploy.demo.train import BF16_SLOW, bf16_slowdown

    assert bf16_slowdown() > 0
    _tiny_train(tmp_path, "bf", amp="bf16")
    recs = [json.loads(line) for line in (tmp_path / "bf" / "train.log").read_text().splitlines()]
    (measured,) = [r["bf16_slowdown"] for r in recs if r["event"] == "amp"]
    warned = [r for r in recs if r["event"] == "warning"]
    assert len(warned) == (1 if measured > BF16_SLOW else 0)
    for r in warned:
        assert "--amp none" in r["message"] and r["bf16_slowdown"] == measured
        assert f"{measured:.1f}x slower" in r["message"]
    _tiny_train(tmp_path, "fp", amp="none")
    recs = [json.loads(line) for line in (tmp_path / "fp" / "train.log").read_text().splitlines()]
    assert not [r for r in recs if r["event"] in ("warning", "amp")]


def test_default_bf16_is_refused_only_where_the_cpu_emulates_it():
    """Without --amp, demo train refuses to start on a CPU that emulates bf16 (the run would take days)
    and names both ways out; CPUs with bf16 units, GPUs and an explicit choice are never refused."""
    from ats_deploy.demo.train import BF16_EMULATED, default_amp_refusal

    msg = default_amp_refusal("cpu", 66.4)
    assert msg is not None and "66x slower" in msg and "--amp none" in msg and "--amp bf16" in msg
    assert "\n" not in msg
    assert default_amp_refusal("cpu", 450.0) is not None
    assert default_amp_refusal("cpu", 0.3) is None  # AVX512-BF16: bf16 3x faster
    assert default_amp_refusal("cpu", 2.2) is None  # native bf16 that loses to float32: warned, not refused
    assert default_amp_refusal("cpu", BF16_EMULATED) is None
    assert default_amp_refusal("cuda", 66.4) is None


def test_demo_train_without_amp_follows_this_cpus_bf16_measurement(tmp_path):
    """End to end through the CLI and the real measurement: on a CPU that emulates bf16 the default run
    stops before writing anything, with the one-line way out; elsewhere it trains. --amp bf16 always runs."""
    from typer.testing import CliRunner

    from ats_deploy.cli import app
    from ats_deploy.demo.train import BF16_EMULATED, bf16_slowdown

    emulated = bf16_slowdown() > BF16_EMULATED
    args = ["demo", "train", "--out", str(tmp_path / "d"), "--phase", "32:1:1e-3:1", "--batch-size", "2"]
    args += ["--threads", "1", "--eval-every", "0", "--device", "cpu"]
    res = CliRunner().invoke(app, args)
    if emulated:
        assert res.exit_code != 0 and "--amp none" in res.output and "no native bf16" in res.output
        assert not (tmp_path / "d").exists()
    else:
        assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, [*args[:3], str(tmp_path / "n"), *args[4:], "--amp", "none"])
    assert res.exit_code == 0, res.output


def test_runs_saved_before_guidance_existed_still_resume():
    """A recipe saved by an older trainer (no guide_background, phases without guide) continues as the
    same recipe; one that differs otherwise does not."""
    from ats_deploy.demo.train import Phase, TrainConfig, _resumable

    cfg = TrainConfig(phases=(Phase(img_size=32, steps=3, lr=1e-3, warmup=1),), arch=TINY_ARCH)
    old = cfg.recipe()
    old.pop("guide_background")
    old["phases"] = [{k: v for k, v in p.items() if k not in ("ats", "guide")} for p in old["phases"]]
    assert _resumable(old, 3, cfg)
    assert not _resumable({**old, "batch_size": 7}, 3, cfg)


def test_card_phase_table_names_how_often_ats_ran():
    """Recipes saved before ats_every existed ran ATS every other step; the table says what each phase did."""
    from ats_deploy.demo.card import _phases

    cfg = {"batch_size": 8, "phases": [
        {"img_size": 112, "steps": 10, "lr": 1e-3, "warmup": 1},
        {"img_size": 224, "steps": 4, "lr": 1e-4, "warmup": 1, "ats": True, "guide": 0.5},
        {"img_size": 224, "steps": 4, "lr": 1e-4, "warmup": 1, "ats": True, "guide": 0.0, "ats_every": 1},
        {"img_size": 224, "steps": 6, "lr": 1e-4, "warmup": 1, "ats": True, "guide": 0.0, "ats_every": 3},
    ]}
    rows = _phases(cfg).splitlines()[2:]
    assert rows == [
        "| 0 | 112 | 10 | 80 | 0.001 | 1 | none | - |",
        "| 1 | 224 | 4 | 32 | 0.0001 | 1 | every other | weight 0.5 |",
        "| 2 | 224 | 4 | 32 | 0.0001 | 1 | every step | - |",
        "| 3 | 224 | 6 | 48 | 0.0001 | 1 | 1 in 3 | - |",
    ]
