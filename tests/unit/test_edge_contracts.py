"""Behaviours a sampled mutation run (`make mutation-sample`) found unguarded, one test each.

Expected values are worked out by hand in the comments (the rule's arithmetic, the message the code
promises the user), never taken from the function under test.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest

from ats_deploy.calibration.int8 import CalibrationSettings, calibrate, collect_ranges, quantize_int8
from ats_deploy.errors import CheckpointError, InputError
from ats_deploy.exporters.onnx import GraphOptions, build_graph
from ats_deploy.model.checkpoints import infer_config, validate_state_dict
from ats_deploy.model.config import resolve_ats
from ats_deploy.model.reference import near_boundary

# -- the CLI's error line and JSON output ------------------------------------------------------------


def test_an_error_without_a_message_is_named_by_its_type(capsys):
    from ats_deploy._cli_common import _emit_error

    _emit_error(CheckpointError(""))
    _emit_error(CheckpointError("first line\nsecond line"))
    assert capsys.readouterr().err.splitlines() == ["error: CheckpointError", "error: first line"]


def test_print_json_writes_paths_and_numpy_values_as_plain_json(capsys):
    from ats_deploy._cli_common import print_json

    print_json({"path": Path("out") / "model.onnx", "k": np.int64(7), "t": np.float32(0.5), "a": np.arange(3)})
    out = capsys.readouterr().out
    assert json.loads(out) == {"path": "out/model.onnx", "k": 7, "t": 0.5, "a": [0, 1, 2]}
    assert out.startswith('{\n  "path": "out/model.onnx",\n  "k": 7,')  # indented for people, one key a line


# -- near_boundary: both of its tests, at their edges ----------------------------------------------


def test_score_gap_exactly_at_the_tolerance_is_not_near():
    """Patches 1, 3, 6, 54 (in 64ths: they sum to 1, so normalising is exact), rtol = 1/8, floor 1/4
    (4 patches). Gaps 2/64, 3/64, 48/64 against 1/8 * max(next score, 1/4) = 2/64, 2/64, 6.75/64: the
    first gap equals its bound exactly, which the strict test does not flag. Midpoints: F~ = 0, 1/21,
    1/7, 1 (cdf 1, 4, 10, 64 over 63), K = 3 gives the grid 1/21 and 1, the midpoints are 1/42, 2/21
    and 4/7, and the nearest grid point to each is 1/42, 1/21 and 3/7 away, each more than 1/8 of the
    midpoint. A hair more tolerance flags the gap."""
    row = np.array([0.0, 1.0, 3.0, 6.0, 54.0]) / 64
    assert near_boundary(row, 5, k_max=3, n_ref=5, rtol=1 / 8) is False
    assert near_boundary(row, 5, k_max=3, n_ref=5, rtol=1 / 8 * 1.001) is True


def test_grid_point_on_a_midpoint_is_near():
    """Three patches, well apart (no score gap flags them). Patches 1, 2, 4: cdf 1, 3, 7 -> F~ = 0, 1/3, 1,
    c0 = 1/3; K = n_ref = 4 gives M = 3 grid points 1/3, 2/3, 1, and the midpoint of F~ 1/3 and 1 is 2/3:
    a grid point on a decision boundary. With three patches and M = 3 the middle grid point (c0 + 1) / 2
    is always that midpoint (1, 3, 4: F~ 0, 3/7, 1, grid 3/7, 5/7, 1; 1, 2, 3: F~ 0, 2/5, 1, grid 2/5,
    7/10, 1). K = 3 gives M = 2 points c0 and 1, and the midpoints c0 / 2 and (c0 + 1) / 2 are far off."""
    for patches in ([1.0, 2.0, 4.0], [1.0, 3.0, 4.0], [1.0, 2.0, 3.0]):
        row = np.array([0.0, *patches])
        assert near_boundary(row, 4, k_max=4, n_ref=4) is True, patches
        assert near_boundary(row, 4, k_max=3, n_ref=4) is False, patches


def test_float32_rule_reads_the_scores_in_float32():
    """1 + 1e-12 and 1.0 are two values in float64 but the same float32 (1.0): the float32 rule sees a tie
    and orders by slot (1, 2); the float64 rule puts the smaller, slot 2, first."""
    from ats_deploy.model.reference import select_one

    row = np.array([0.0, 1.0 + 1e-12, 1.0])
    assert select_one(row, 3, k_max=3, n_ref=3, dtype=np.float32).order.tolist() == [1, 2]
    assert select_one(row, 3, k_max=3, n_ref=3, dtype=np.float64).order.tolist() == [2, 1]


def test_rule_details_without_patches_or_with_one():
    """No valid patch: nothing kept, empty arrays of the requested dtype. One patch: it is kept, its
    normalised score is 1 and its F~ and grid are the single value 0."""
    from ats_deploy.model.reference import select_one

    none = select_one(np.array([0.5, 0.2]), 1, k_max=3, n_ref=3, dtype=np.float32)
    assert none.kept.size == none.order.size == 0
    for arr in (none.cdf, none.grid, none.scores):
        assert arr.shape == (0,) and arr.dtype == np.float32
    one = select_one(np.array([0.5, 0.2]), 2, k_max=3, n_ref=3, dtype=np.float32)
    assert one.kept.tolist() == [1] and one.order.tolist() == [1] and one.scores.tolist() == [1.0]
    assert one.cdf.tolist() == one.grid.tolist() == [0.0] and one.cdf.dtype == np.float32


# -- checkpoints: what infer_config reads and what the refusals say --------------------------------


def test_mlp_ratio_is_read_from_fc1(tiny_ckpt):
    sd = dict(tiny_ckpt.state_dict)
    c = tiny_ckpt.config.embed_dim
    for b in range(tiny_ckpt.config.depth):
        sd[f"blocks.{b}.mlp.fc1.weight"] = np.zeros((2 * c, c), np.float32)
        sd[f"blocks.{b}.mlp.fc1.bias"] = np.zeros(2 * c, np.float32)
        sd[f"blocks.{b}.mlp.fc2.weight"] = np.zeros((c, 2 * c), np.float32)
    cfg = infer_config(sd, heads=tiny_ckpt.config.num_heads)
    assert cfg.mlp_ratio == 2.0 and tiny_ckpt.config.mlp_ratio == 4.0
    validate_state_dict(sd, cfg)  # the shapes it implies are the ones present


def test_infer_config_refusal_names_the_checkpoint_and_the_fix():
    with pytest.raises(CheckpointError) as err:
        infer_config({"fc.weight": np.zeros((2, 2)), "fc.bias": np.zeros(2)})
    assert str(err.value) == (
        "checkpoint is not a timm/DeiT ViT: missing cls_token, pos_embed, patch_embed.proj.weight, head.weight "
        "(has fc.bias, fc.weight, ...); export a ViT/DeiT checkpoint with timm key names"
    )


def test_unexpected_keys_list_four_then_an_ellipsis(tiny_ckpt):
    sd = dict(tiny_ckpt.state_dict)
    for name in "abcde":
        sd[f"extra.{name}"] = np.zeros(1, np.float32)
    with pytest.raises(CheckpointError) as err:
        validate_state_dict(sd, tiny_ckpt.config)
    assert str(err.value).endswith("unexpected extra.a, extra.b, extra.c, extra.d ...")


def test_untrusted_pickle_message_is_the_whole_fix(tmp_path, tiny_ckpt):
    import torch

    from ats_deploy.model import build_model
    from ats_deploy.model.checkpoints import load_checkpoint

    path = tmp_path / "module.pt"
    torch.save({"model": build_model(tiny_ckpt)}, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, heads=2)
    assert str(err.value) == (
        f"checkpoint {path} contains pickled code or objects, not only tensors; "
        "pass --trust-pickle if you trust its source, or re-save it as a state_dict"
    )


# -- INT8 calibration: data in several batches, the cache file, the settings recorded --------------


@pytest.fixture(scope="module")
def portable(tiny_ckpt):
    ats = resolve_ats(tiny_ckpt.config, max_k="40")
    return build_graph(tiny_ckpt.config, tiny_ckpt.state_dict, ats, GraphOptions(batch=1, dynamic_batch=True))


@pytest.fixture(scope="module")
def data(tiny_cfg):
    return np.random.default_rng(5).standard_normal((16, 3, tiny_cfg.img_size, tiny_cfg.img_size)).astype(np.float32)


def test_ranges_from_a_loader_of_several_batches_match_one_array(portable, data):
    """The largest activations sit in the last batch (scaled x4): a loader yielding 3 + 13 images must
    see them, exactly as the one array does."""
    x = data.copy()
    x[3:] *= 4.0
    whole = collect_ranges(portable, [x], CalibrationSettings(method="max"), batch_size=4, progress=False)
    split = collect_ranges(portable, [x[:3], x[3:]], CalibrationSettings(method="max"), batch_size=4, progress=False)
    first = collect_ranges(portable, [x[:3]], CalibrationSettings(method="max"), batch_size=4, progress=False)
    assert split == whole
    assert any(first[k] < whole[k] for k in whole)  # the check could fail: the first batch alone differs


def test_calibrate_uses_the_cache_path_given_and_reports_no_output_without_one(tmp_path, portable, data):
    src = tmp_path / "m.onnx"
    onnx.save(portable, src)
    cache = tmp_path / "elsewhere" / "ranges.json"
    cache.parent.mkdir()
    res = calibrate(src, data, cache=cache, progress=False)
    assert res.cache_path == cache and cache.exists() and not (tmp_path / "calibration.json").exists()
    assert res.output is None and res.to_dict()["output"] is None
    out = tmp_path / "q" / "m.int8.onnx"
    out.parent.mkdir()
    res2 = calibrate(src, data, cache=cache, output=out, progress=False)
    assert res2.cache_hit and res2.to_dict()["output"] == str(out) and out.exists()


def test_bins_default_per_method(tmp_path, portable, data):
    """2048 bins for percentile (of |x|), 1024 otherwise, unless given."""
    got = {
        m: calibrate(portable, data, method=m, cache=False, progress=False).settings.num_bins
        for m in ("percentile", "max")
    }
    assert got == {"percentile": 2048, "max": 1024}
    given = calibrate(portable, data, method="percentile", num_bins=600, cache=False, progress=False)
    assert given.settings.num_bins == 600


def test_unwritable_cache_is_a_warning_that_names_it(tmp_path, portable, data, caplog):
    cache = tmp_path / "is_a_dir"
    cache.mkdir()
    with caplog.at_level(logging.WARNING, logger="ats_deploy"):
        res = calibrate(portable, data, cache=cache, progress=False)
    assert res.amax  # the ranges are still returned
    assert f"could not write calibration cache {cache} (Is a directory)" in caplog.text


def test_quantize_refuses_ranges_of_another_model(portable, data):
    amax = collect_ranges(portable, [data], CalibrationSettings(method="max"), progress=False)
    first = sorted(amax)[0]
    partial = {k: v for k, v in amax.items() if k != first}
    with pytest.raises(InputError) as err:
        quantize_int8(portable, partial)
    assert str(err.value).startswith(f"no calibrated range for 1 Linear layer(s) (first: {first}); ")
    assert str(err.value).endswith("re-run ats-deploy calibrate")


def test_quantized_graph_drops_the_float_weights_it_replaced(portable, data):
    """Every quantised Linear's weight lives on as int8 only: no float initializer of that name is left
    (a dead float copy would double the file), and everything the graph reads is still defined."""
    amax = collect_ranges(portable, [data], CalibrationSettings(method="max"), progress=False)
    q = quantize_int8(portable, amax)
    inits = {t.name: t for t in q.graph.initializer}
    float_weights = {
        t.name for t in portable.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2
    }
    quantised = {
        n.input[0][: -len(".int8")]
        for n in q.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0].endswith(".int8")
    }
    assert quantised and quantised <= float_weights
    assert not quantised & set(inits)
    produced = {o for n in q.graph.node for o in n.output} | set(inits) | {i.name for i in q.graph.input}
    assert {x for n in q.graph.node for x in n.input if x} <= produced
    onnx.checker.check_model(q)


def test_calibrate_export_records_what_it_did(tmp_path, tiny_ckpt, data):
    from ats_deploy.calibration.int8 import calibrate_export
    from ats_deploy.exporters.export import export_model

    ats = resolve_ats(tiny_ckpt.config, max_k="40")
    export_model(
        tiny_ckpt,
        ats,
        tmp_path,
        opts=GraphOptions(dynamic_batch=True),
        parity_count=0,
        source={"kind": "embedded", "seed": 7, "qk_gain": 1.5},
    )
    res, _ = calibrate_export(tmp_path, data, method="percentile", percentile=99.0, num_bins=1500, progress=False)
    assert res.settings.percentile == 99.0 and res.settings.num_bins == 1500
    details = json.loads((tmp_path / "manifest.json").read_text())["precisions"]["int8"]
    assert len(res.data_sha256) == 64 and details["data_sha256"] == res.data_sha256
    assert details["method"] == "percentile" and details["images"] == 16
    assert details["cache"] == "calibration.json" and (tmp_path / "calibration.json").exists()
    assert details["weights"] == "int8 symmetric per output channel"
    assert details["activations"] == "int8 symmetric per tensor"
    from ats_deploy.model.checkpoints import load_checkpoint

    with pytest.raises(InputError) as err:  # an export directory given where a checkpoint goes
        load_checkpoint(tmp_path)
    assert str(err.value).startswith(
        f"{tmp_path} is an export directory (written by ats-deploy export), not a checkpoint; "
    )
    (tmp_path / "model.onnx").unlink()
    with pytest.raises(InputError) as err:
        calibrate_export(tmp_path, data, progress=False)
    assert str(err.value) == f"{tmp_path} has no model.onnx; run ats-deploy export -o {tmp_path} first"


def test_calibrate_skips_unreadable_images_when_asked(tmp_path, portable, tiny_cfg):
    from PIL import Image

    size = tiny_cfg.img_size
    rng = np.random.default_rng(2)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(tmp_path / f"ok{i}.png")
    good = (tmp_path / "ok0.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(InputError, match="unreadable"):
        calibrate(portable, tmp_path, cache=False, progress=False)
    res = calibrate(portable, tmp_path, cache=False, progress=False, skip_unreadable=True)
    assert res.images == 8


def test_calibration_without_onnxruntime_says_what_to_install(monkeypatch, portable, data):
    import sys

    from ats_deploy.errors import DependencyError

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    with pytest.raises(DependencyError) as err:
        collect_ranges(portable, [data], CalibrationSettings(method="max"), progress=False)
    assert str(err.value) == "INT8 calibration needs ONNX Runtime; pip install 'ats-deploy[export]'"


# -- verify: records written before a field existed ------------------------------------------------


def test_verify_reads_records_without_precision_or_manifest(tmp_path, tiny_ckpt):
    from _helpers.trt_helpers import OrtEngine, fake_record

    from ats_deploy.exporters.export import export_model
    from ats_deploy.exporters.trt import sha256_file
    from ats_deploy.runtime.verify import verify

    out = tmp_path / "out"
    ats = resolve_ats(tiny_ckpt.config, max_k="40")
    export_model(
        tiny_ckpt,
        ats,
        out,
        opts=GraphOptions(batch=4),
        parity_count=8,
        source={"kind": "embedded", "seed": 7, "qk_gain": 1.5},
    )
    from ats_deploy.reports.parity import run_parity

    par, info = run_parity(out)  # the default: 16 inputs, PyTorch against ONNX Runtime
    assert par.images == 16 and par.passed
    assert info == {
        "inputs": info["inputs"],
        "backend": "onnxruntime",
        "reference": "torch",
        "onnx": str(out / "model.onnx"),
    }
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"not a real engine")
    rec = fake_record(out, engine={"sha256": sha256_file(plan)})
    rec.pop("precision")
    (tmp_path / "model.plan.json").write_text(json.dumps(rec))
    engine = OrtEngine(out / "model.onnx", 4, (4, 4))
    res = verify(plan, out / "reference.npz", runner=engine)
    assert res.precision == "fp32" and res.parity.passed
    assert res.parity.kept_pairs == 8 * len(ats.blocks)  # the manifest's ATS blocks are compared
    assert res.to_dict()["reference"] == str(out / "reference.npz") and res.to_dict()["precision"] == "fp32"

    # The very reference file the engine was built with (by sha256) is accepted wherever it lies, even
    # beside another export's manifest; a changed copy there is refused.
    elsewhere = tmp_path / "other"
    elsewhere.mkdir()
    (elsewhere / "manifest.json").write_text(json.dumps({"artifacts": {"model.onnx": {"sha256": "0" * 64}}}))
    (elsewhere / "reference.npz").write_bytes((out / "reference.npz").read_bytes())
    assert verify(plan, elsewhere / "reference.npz", runner=engine).parity.passed
    with np.load(out / "reference.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["logits"] = arrays["logits"] + 0.0  # same values, new file bytes: no longer the recorded file
    np.savez(elsewhere / "reference.npz", **{k: v for k, v in arrays.items() if k != "pixels"}, pixels=arrays["pixels"])
    with pytest.raises(InputError, match="belongs to another export"):
        verify(plan, elsewhere / "reference.npz", runner=engine)

    rec.pop("manifest")
    rec["network"] = {}  # older records: no output list to check the reference against
    (tmp_path / "model.plan.json").write_text(json.dumps(rec))
    bare = verify(plan, out / "reference.npz", runner=engine)
    assert bare.parity.passed and bare.parity.kept_pairs == 0  # no manifest: logits only


def test_near_boundary_needs_two_patches():
    """One valid patch (or none): one way to pick, nothing to disagree about."""
    assert near_boundary(np.array([0.0, 1.0, 1.0]), 2, k_max=3, n_ref=3) is False
    assert near_boundary(np.array([0.0, 1.0, 1.0]), 1, k_max=3, n_ref=3) is False
    assert near_boundary(np.array([0.0, 1.0, 1.0]), 3, k_max=3, n_ref=3) is True  # equal scores: a tie


def test_compiled_model_prefix_is_stripped(tmp_path, tiny_ckpt):
    """torch.compile saves keys as `_orig_mod.<name>`: they load as the plain names."""
    import torch

    from ats_deploy.model.checkpoints import load_checkpoint

    sd = {f"_orig_mod.{k}": torch.from_numpy(v.copy()) for k, v in tiny_ckpt.state_dict.items()}
    torch.save(sd, tmp_path / "compiled.pt")
    ck = load_checkpoint(tmp_path / "compiled.pt", heads=2)
    assert set(ck.state_dict) == set(tiny_ckpt.state_dict)


def test_quantized_graph_says_int8_in_its_metadata(portable, data):
    amax = collect_ranges(portable, [data], CalibrationSettings(method="max"), progress=False)
    props = {p.key: p.value for p in quantize_int8(portable, amax).metadata_props}
    before = {p.key: p.value for p in portable.metadata_props}
    assert props.get("ats_deploy.precision") == "int8"
    assert {k: v for k, v in props.items() if k != "ats_deploy.precision"} == {
        k: v for k, v in before.items() if k != "ats_deploy.precision"
    }


def test_int8_checker_reads_defaults_and_reports_instead_of_crashing(portable, data):
    """Three hand edits of a valid INT8 graph: a weight DequantizeLinear without its axis attribute is still
    per output channel (ONNX's default axis is 1: no violation); a Q/DQ without a zero-point input and a
    QuantizeLinear whose output nobody reads are violations, reported as messages, not crashes."""
    from ats_deploy.calibration.int8 import int8_violations

    amax = collect_ranges(portable, [data], CalibrationSettings(method="max"), progress=False)
    q = quantize_int8(portable, amax)
    assert int8_violations(q) == []

    def edited():
        m = onnx.ModelProto()
        m.CopyFrom(q)
        return m

    m = edited()
    w_dq = next(n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith(".int8"))
    kept = [a for a in w_dq.attribute if a.name != "axis"]
    del w_dq.attribute[:]
    w_dq.attribute.extend(kept)
    assert int8_violations(m) == []

    m = edited()
    w_dq = next(n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith(".int8"))
    del w_dq.input[2]
    assert len(int8_violations(m)) >= 1

    m = edited()
    q_node = next(n for n in m.graph.node if n.op_type == "QuantizeLinear")
    m.graph.node.append(onnx.helper.make_node("QuantizeLinear", list(q_node.input), ["dangling_q"], name="dangling"))
    assert any("dangling" in v or "dangling_q" in v for v in int8_violations(m)), int8_violations(m)


# -- third mutation sample's survivors --------------------------------------------------------------


def test_a_state_dict_is_recognised_by_any_of_its_key_kinds():
    """A dict is taken as the state itself (not a wrapper to open) on a `.weight` key, a `.bias` key or
    `cls_token` alone; training metadata is not a state."""
    from ats_deploy.model.checkpoints import _looks_like_state

    assert _looks_like_state({"head.weight": 0})
    assert _looks_like_state({"norm.bias": 0})
    assert _looks_like_state({"cls_token": 0})
    assert not _looks_like_state({"epoch": 3, "model": {}})
    assert not _looks_like_state({7: "weight", "bias": 1})  # non-string keys and a bare word are not names


def test_reference_of_another_width_is_named_as_classes_or_slots(tmp_path):
    """The message names what differs: classes for the logits, slots (another K schedule) for a block's
    kept tokens; a dynamic width (-1) is not checked; another rank is refused with both shapes."""
    from ats_deploy.runtime.verify import check_reference

    record = {
        "onnx": {"input": {"shape": [4, 3, 64, 64]}},
        "network": {"outputs": [{"name": "logits", "shape": [-1, 10]}, {"name": "tokens_2", "shape": [-1, 40]}]},
    }
    px = np.zeros((4, 3, 64, 64), np.float32)
    ref = tmp_path / "reference.npz"
    good = {"pixels": px, "logits": np.zeros((4, 10)), "tokens_2": np.zeros((4, 40))}
    check_reference(record, good, ref)  # fits: no error
    with pytest.raises(InputError) as e:
        check_reference(record, {**good, "logits": np.zeros((4, 12))}, ref)
    assert str(e.value) == "reference.npz: logits has 12 classes but the engine has 10: it is from another model"
    with pytest.raises(InputError) as e:
        check_reference(record, {**good, "tokens_2": np.zeros((4, 33))}, ref)
    assert str(e.value) == (
        "reference.npz: tokens_2 has 33 slots (another K schedule) but the engine has 40: it is from another model"
    )
    with pytest.raises(InputError) as e:
        check_reference(record, {**good, "tokens_2": np.zeros((4, 40, 1))}, ref)
    assert str(e.value) == "reference.npz: tokens_2 has shape [4, 40, 1], the engine's is [-1, 40]"
    dynamic = {**record, "network": {"outputs": [{"name": "tokens_2", "shape": [-1, -1]}]}}
    check_reference(dynamic, {**good, "tokens_2": np.zeros((4, 33))}, ref)  # size-tensor width: any


def test_verify_counts_kept_patches_without_both_prefix_tokens(tmp_path, tiny_distilled_ckpt):
    """A distilled export carries CLS and the distillation token in every block's count: K' (kept patches)
    is the count minus 2, read from the manifest's prefix_tokens."""
    from _helpers.trt_helpers import OrtEngine, fake_record

    from ats_deploy.exporters.export import export_model
    from ats_deploy.exporters.trt import sha256_file
    from ats_deploy.runtime.verify import verify

    out = tmp_path / "out"
    ats = resolve_ats(tiny_distilled_ckpt.config, max_k="40")
    export_model(tiny_distilled_ckpt, ats, out, opts=GraphOptions(batch=4), parity_count=8, source={"kind": "embedded"})
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"not a real engine")
    rec = fake_record(out, engine={"sha256": sha256_file(plan)})
    assert rec["manifest"]["ats"]["prefix_tokens"] == 2
    (tmp_path / "model.plan.json").write_text(json.dumps(rec))
    res = verify(plan, out / "reference.npz", runner=OrtEngine(out / "model.onnx", 4, (4, 4)))
    with np.load(out / "reference.npz") as z:
        for st in res.parity.blocks:
            counts = z[f"count_{st.block}"].astype(np.int64)
            assert st.kept_max == int(counts.max()) - 2 and st.kept_min == int(counts.min()) - 2
            assert st.kept_mean == pytest.approx(counts.mean() - 2)


def test_comparing_no_images_or_unequal_sets_is_an_input_error():
    from ats_deploy.reports.parity import compare_outputs

    empty = {"logits": np.zeros((0, 10), np.float32)}
    with pytest.raises(InputError, match="cannot compare 0 reference images with 0 outputs"):
        compare_outputs(empty, empty, blocks=[])
    three, two = {"logits": np.zeros((3, 10), np.float32)}, {"logits": np.zeros((2, 10), np.float32)}
    with pytest.raises(InputError, match="cannot compare 3 reference images with 2 outputs"):
        compare_outputs(three, two, blocks=[])


def test_rechunk_pads_the_last_chunk_with_copies_of_its_last_image():
    """A static-batch graph gets chunks of exactly its batch: 8 images in chunks of 5 (given as 3 + 5)."""
    from ats_deploy.calibration.int8 import _rechunk

    x = np.arange(8, dtype=np.float32).reshape(8, 1)
    got = [(c[:, 0].tolist(), real) for c, real in _rechunk([x[:3], x[3:]], 5)]
    assert got == [([0, 1, 2, 3, 4], 5), ([5, 6, 7, 7, 7], 3)]


def test_calibrate_cache_false_writes_no_cache_and_warnings_are_printed(tmp_path, portable, data, capsys):
    src = tmp_path / "m.onnx"
    onnx.save(portable, src)
    res = calibrate(src, data, cache=False, progress=False)
    assert res.cache_path is None and res.to_dict()["cache_path"] is None
    assert not (tmp_path / "calibration.json").exists()
    assert capsys.readouterr().err.count("warning: only 16 calibration images") == 1
    assert isinstance(res.seconds, float) and 0 < res.seconds < 600
    res = calibrate(src, data, progress=False)  # the default cache sits beside the model
    assert res.to_dict()["cache_path"] == str(tmp_path / "calibration.json")
    assert (tmp_path / "calibration.json").exists()


def test_calibrate_collects_in_chunks_of_its_batch_size(portable, data):
    """Histogram methods merge per-chunk histograms, so the chunk size shows in the ranges."""
    st = CalibrationSettings(method="percentile", percentile=99.0, num_bins=2048)
    by4 = collect_ranges(portable, [data], st, batch_size=4, progress=False)
    by16 = collect_ranges(portable, [data], st, batch_size=16, progress=False)
    assert by4 != by16  # else this test could not tell the batch size apart
    res = calibrate(portable, data, method="percentile", percentile=99.0, batch_size=4, cache=False, progress=False)
    assert res.amax == by4


def test_image_calibration_of_an_export_uses_its_manifest_preprocessing(tmp_path, tiny_ckpt):
    from ats_deploy.calibration.int8 import _default_preprocess
    from ats_deploy.exporters.export import export_model
    from ats_deploy.inputs import Preprocess

    export_model(tiny_ckpt, resolve_ats(tiny_ckpt.config), tmp_path, parity_count=0, source={"kind": "test"})
    man = json.loads((tmp_path / "manifest.json").read_text())
    man["preprocessing"]["mean"] = [0.5, 0.5, 0.5]
    (tmp_path / "manifest.json").write_text(json.dumps(man))
    model = onnx.load(tmp_path / "model.onnx")
    assert _default_preprocess(model, tmp_path / "model.onnx").mean == (0.5, 0.5, 0.5)
    plain = tmp_path / "elsewhere" / "model.onnx"  # no manifest beside it: the graph's size, ImageNet stats
    plain.parent.mkdir()
    assert _default_preprocess(model, plain) == Preprocess(size=tiny_ckpt.config.img_size)


def test_histogram_calibration_without_onnxruntime_quantization_says_what_to_install(monkeypatch):
    import sys

    from ats_deploy.calibration.int8 import _Collector
    from ats_deploy.errors import DependencyError

    monkeypatch.setitem(sys.modules, "onnxruntime.quantization.calibrate", None)
    assert _Collector(CalibrationSettings(method="max")).hist is None  # max needs no collector
    with pytest.raises(DependencyError) as err:
        _Collector(CalibrationSettings(method="percentile"))
    assert str(err.value) == "INT8 calibration needs ONNX Runtime; pip install 'ats-deploy[export]'"


def test_a_model_without_linear_layers_cannot_be_calibrated(data):
    from onnx import TensorProto, helper

    g = helper.make_graph(
        [helper.make_node("Relu", ["pixels"], ["logits"], name="relu")],
        "no_linear",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [None, 3, 64, 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 3, 64, 64])],
    )
    with pytest.raises(InputError) as err:
        collect_ranges(helper.make_model(g), [data], CalibrationSettings(method="max"), progress=False)
    assert str(err.value) == (
        "the model has no Linear MatMul (blocks.*.weight.T) to quantise; pass an ats-deploy export"
    )
