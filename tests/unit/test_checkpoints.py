"""Checkpoint formats, architecture inference and the refusal of bad or unsafe files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ats_deploy.errors import CheckpointError, InputError
from ats_deploy.model import build_model
from ats_deploy.model.checkpoints import load_checkpoint


def _torch_sd(ckpt):
    return {k: torch.from_numpy(v.copy()) for k, v in ckpt.state_dict.items()}


@pytest.mark.parametrize("wrap", ["model", "state_dict", "bare", "module_prefix"])
def test_formats(tmp_path, tiny_ckpt, wrap):
    sd = _torch_sd(tiny_ckpt)
    obj = {
        "model": {"model": sd, "optimizer": {}, "epoch": 300},
        "state_dict": {"state_dict": sd},
        "bare": sd,
        "module_prefix": {"model": {"module." + k: v for k, v in sd.items()}},
    }[wrap]
    path = tmp_path / "ck.pth"
    torch.save(obj, path)
    ck = load_checkpoint(path, heads=2)
    assert ck.config == tiny_ckpt.config
    for k, v in tiny_ckpt.state_dict.items():
        np.testing.assert_array_equal(ck.state_dict[k], v)


def test_safetensors(tmp_path, tiny_ckpt):
    from safetensors.numpy import save_file

    path = tmp_path / "ck.safetensors"
    save_file(dict(tiny_ckpt.state_dict), str(path))
    ck = load_checkpoint(path, heads=2)
    assert ck.config == tiny_ckpt.config
    assert set(ck.state_dict) == set(tiny_ckpt.state_dict)
    for k, v in tiny_ckpt.state_dict.items():  # the values, not only names and shapes
        np.testing.assert_array_equal(ck.state_dict[k], v, err_msg=k)


def test_architecture_inference(tmp_path, tiny_ckpt, tiny_distilled_ckpt):
    cfg = tiny_ckpt.config
    path = tmp_path / "ck.pt"
    torch.save(_torch_sd(tiny_ckpt), path)
    ck = load_checkpoint(path)
    assert (ck.config.embed_dim, ck.config.depth, ck.config.patch_size, ck.config.img_size, ck.config.num_classes) == (
        cfg.embed_dim,
        cfg.depth,
        cfg.patch_size,
        cfg.img_size,
        cfg.num_classes,
    )
    assert ck.config.num_heads == 1  # 64 // 64 by default ...
    assert load_checkpoint(path, heads=4).config.num_heads == 4  # ... unless --heads is given
    path_d = tmp_path / "dist.pt"
    torch.save({"model": _torch_sd(tiny_distilled_ckpt)}, path_d)
    ckd = load_checkpoint(path_d, heads=2)
    assert ckd.config.distilled and ckd.config.num_tokens == 66
    build_model(ckd)  # loads strictly


def test_extra_keys_from_authors_code_are_ignored(tmp_path, tiny_ckpt):
    sd = _torch_sd(tiny_ckpt)
    sd["blocks.3.attn.out_zero_mask"] = torch.zeros(1, 64)
    path = tmp_path / "ats.pth"
    torch.save({"model": sd}, path)
    assert load_checkpoint(path, heads=2).config.depth == 6


def test_pickled_module_refused_unless_trusted(tmp_path, tiny_ckpt):
    model = build_model(tiny_ckpt)
    path = tmp_path / "module.pt"
    torch.save(model, path)
    with pytest.raises(CheckpointError, match="--trust-pickle"):
        load_checkpoint(path)
    assert load_checkpoint(path, trust_pickle=True, heads=2).config == tiny_ckpt.config


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_code_pickle_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"model": {"x": Evil()}}, path)
    with pytest.raises(CheckpointError, match="pickled code"):
        load_checkpoint(path)
    assert "pwned" not in capsys.readouterr().out


def test_missing_and_corrupt(tmp_path, tiny_ckpt):
    with pytest.raises(InputError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    path = tmp_path / "ck.pt"
    torch.save(_torch_sd(tiny_ckpt), path)
    data = path.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "trunc.pt")
    (tmp_path / "junk.pt").write_bytes(b"this is not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "junk.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(tmp_path / "empty.pt")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint(tmp_path / "bad.safetensors")


def test_not_a_vit(tmp_path, tiny_ckpt):
    path = tmp_path / "resnet.pt"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 512)}, path)
    with pytest.raises(CheckpointError, match="missing cls_token"):
        load_checkpoint(path)
    sd = _torch_sd(tiny_ckpt)
    del sd["blocks.2.mlp.fc1.weight"]
    sd["blocks.2.mlp.gate.weight"] = torch.zeros(3)
    path2 = tmp_path / "odd.pt"
    torch.save(sd, path2)
    with pytest.raises(
        CheckpointError, match=r"missing blocks\.2\.mlp\.fc1\.weight.*unexpected blocks\.2\.mlp\.gate\.weight"
    ):
        load_checkpoint(path2, heads=2)
