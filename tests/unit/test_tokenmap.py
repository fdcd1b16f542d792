"""Token maps (which patches ATS keeps, drawn over the input) and the demo's object-patch recall and token
work. Expected values are worked out by hand in each test."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from ats_deploy.demo.evaluate import object_recall, token_work
from ats_deploy.errors import ExportError
from ats_deploy.model.config import ATSConfig, ViTConfig
from ats_deploy.reports.tokenmap import (
    denormalise,
    kept_patch_mask,
    token_map,
    write_token_map,
    write_token_maps,
)


def test_object_recall_counts_kept_object_patches_only_in_valid_slots():
    # 4 patches (2x2), prefix 1: token id t is patch t-1. Image 0: object = patches 0, 1; kept slots
    # [CLS, patch 0, patch 2] then a padding slot holding id 2 (patch 1) beyond the count: not kept.
    ids = np.array([[0, 1, 3, 2], [0, 4, 0, 0], [0, 1, 2, 3]])
    counts = np.array([3, 2, 4])
    obj = np.array([[1, 1, 0, 0], [0, 0, 0, 0], [0, 1, 1, 1]], bool)
    got = object_recall(ids, counts, obj, prefix=1)
    assert got[0] == pytest.approx(0.5)
    assert np.isnan(got[1])  # no object patch: not counted
    assert got[2] == pytest.approx(2 / 3)  # patches 1, 2 kept of 1, 2, 3


def test_token_work_sums_the_rows_each_block_carries():
    cfg = ViTConfig(img_size=32, patch_size=8, embed_dim=16, depth=4, num_heads=2, num_classes=3)  # 17 tokens
    ats = ATSConfig(blocks=(1, 3), k_schedule=(17, 17))
    counts = {1: np.array([9, 17]), 3: np.array([5, 3])}
    # image 0: blocks carry 17, 9, 9, 5 -> 40 / 68; image 1: 17, 17, 17, 3 -> 54 / 68
    assert token_work(cfg, ats, counts) == pytest.approx((40 / 68 + 54 / 68) / 2)
    assert token_work(cfg, ATSConfig(), {}) == 1.0


def test_kept_patch_mask_maps_token_ids_to_the_grid():
    m = kept_patch_mask([0, 1, 4, 0], grid=2, prefix_tokens=1)
    assert m.tolist() == [[True, False], [False, True]]
    with pytest.raises(ValueError, match="outside"):
        kept_patch_mask([9], grid=2)


def test_token_map_keeps_kept_patches_and_dims_dropped_ones():
    rng = np.random.default_rng(0)
    img = rng.integers(60, 200, (32, 32, 3), dtype=np.uint8)
    out = np.asarray(token_map(img, [[0, 1, 4], [0, 4]], [3, 7], patch=16, columns=5))
    # Layout: 3 panels (input + 2 blocks) of 32 px, 4 px padding, an 18 px caption strip.
    assert out.shape == (4 + 18 + 32 + 4, 3 * 36 + 4, 3)
    y0 = 4 + 18
    panel = [out[y0 : y0 + 32, 4 + 36 * i : 4 + 36 * i + 32] for i in range(3)]
    assert np.array_equal(panel[0], img)
    # Block 3 kept patches 0 (top-left) and 3 (bottom-right); away from the outline they are untouched.
    assert np.array_equal(panel[1][1:15, 1:15], img[1:15, 1:15])
    assert np.array_equal(panel[1][17:31, 17:31], img[17:31, 17:31])
    assert not np.array_equal(panel[1][1:15, 17:31], img[1:15, 17:31])  # patch 1 dropped: dimmed
    assert panel[1][1:15, 17:31].mean() < img[1:15, 17:31].mean()
    # Block 7 kept only patch 3.
    assert not np.array_equal(panel[2][1:15, 1:15], img[1:15, 1:15])
    assert np.array_equal(panel[2][17:31, 17:31], img[17:31, 17:31])


def test_token_map_refuses_mismatched_inputs():
    img = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="2 kept lists for 1"):
        token_map(img, [[0], [0]], [3], patch=16)
    with pytest.raises(ValueError, match="multiple of the patch"):
        token_map(np.zeros((30, 30, 3), np.uint8), [[0]], [3], patch=16)


def test_denormalise_inverts_the_preprocessing():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    pix = np.array([[[0.0]], [[1.0]], [[-1.0]]], np.float32)  # one pixel
    got = denormalise(pix, mean, std)
    assert got.tolist() == [[[round(0.5 * 255), round(0.65 * 255), 0]]]


def test_write_token_map_writes_a_png_atomically(tmp_path):
    p = write_token_map(tmp_path / "a" / "m.png", np.zeros((32, 32, 3), np.uint8), [[0, 2]], [1], patch=16)
    assert p.is_file() and not list(p.parent.glob("*.tmp"))
    assert Image.open(p).format == "PNG"


def test_tokens_command_writes_one_token_map_per_input(tmp_path, tiny_ckpt):
    import torch
    from typer.testing import CliRunner

    from ats_deploy.cli import app

    ck = tmp_path / "tiny.pth"
    torch.save({"model": {k: torch.from_numpy(v.copy()) for k, v in tiny_ckpt.state_dict.items()}}, ck)
    x = np.random.default_rng(1).standard_normal((2, 3, 64, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    maps = tmp_path / "maps"
    args = ["tokens", str(ck), "--heads", "2", "--input", str(tmp_path / "x.npy"), "--png", str(maps), "--json"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert sorted(p.name for p in maps.iterdir()) == ["x.npy_0.png", "x.npy_1.png"]
    for img in doc["images"]:
        im = Image.open(img["png"])
        panels = 1 + len(doc["ats_blocks"])  # tiny model: ATS at blocks 2..5
        assert panels == 5 and im.size == (5 * 68 + 4, 18 + 18 + 64 + 8)
        assert len(img["kept"]) == 4


def _chmod_binds(tmp) -> bool:
    """Whether file modes stop this process (not for root, unless run without CAP_DAC_OVERRIDE)."""
    probe = tmp / ".chmod-probe"
    probe.write_text("")
    probe.chmod(0)
    try:
        probe.read_text()
        return False
    except PermissionError:
        return True
    finally:
        probe.chmod(0o600)
        probe.unlink()


@pytest.mark.parametrize("sub", ["m.png", "sub/m.png"])
def test_write_token_map_under_a_file_is_one_line(tmp_path, sub):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    with pytest.raises(ExportError, match=r"afile is a file, not a folder\); pass --png a folder path") as info:
        write_token_map(afile / sub, np.zeros((32, 32, 3), np.uint8), [[0, 2]], [1], patch=16)
    assert "\n" not in str(info.value)
    assert afile.read_text() == "keep me"


def test_write_token_maps_refuses_a_file_as_the_folder(tmp_path):
    from types import SimpleNamespace

    afile = tmp_path / "afile"
    afile.write_text("keep me")
    pre = SimpleNamespace(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    cfg = SimpleNamespace(patch_size=16, num_prefix_tokens=1)
    rec = {"input": "x", "top1": 0, "kept": {"1": [0, 2]}}
    for out in (afile, afile / "sub"):
        with pytest.raises(ExportError, match="cannot create the token-map folder .*afile is a file, not a folder"):
            write_token_maps(out, np.zeros((1, 3, 32, 32), np.float32), [rec], pre=pre, cfg=cfg, blocks=[1])
    assert afile.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_write_token_map_into_a_read_only_folder(tmp_path):
    if not _chmod_binds(tmp_path):
        pytest.skip("chmod does not bind this user (root): see test_write_token_map_under_a_file_is_one_line")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        for path in (ro / "m.png", ro / "maps" / "m.png"):
            with pytest.raises(ExportError, match=r"\(Permission denied\); pass --png"):
                write_token_map(path, np.zeros((32, 32, 3), np.uint8), [[0, 2]], [1], patch=16)
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_tokens_command_png_under_a_file_is_one_error_line(tmp_path, tiny_ckpt):
    import torch
    from typer.testing import CliRunner

    from ats_deploy.cli import app

    ck = tmp_path / "tiny.pth"
    torch.save({"model": {k: torch.from_numpy(v.copy()) for k, v in tiny_ckpt.state_dict.items()}}, ck)
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    for png in (afile, afile / "sub"):
        res = CliRunner().invoke(app, ["tokens", str(ck), "--heads", "2", "--png", str(png)])
        assert res.exit_code == 1, res.output
        assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: cannot create the token-map folder"), res.stderr
        assert "afile is a file, not a folder" in lines[0]
    assert afile.read_text() == "keep me"
    # checked before anything runs: even the checkpoint is not looked at yet
    res = CliRunner().invoke(app, ["tokens", str(tmp_path / "missing.pt"), "--png", str(afile / "sub")])
    assert res.exit_code == 1 and res.stderr.startswith("error: cannot create the token-map folder"), res.stderr
