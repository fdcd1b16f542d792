"""Checkpoint reading and validation: every refusal is one line naming the problem and the fix.

Each case builds a real file (torch.save, safetensors, raw bytes) with one thing wrong; the expected
message fragment is written by hand from the rule the loader states.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ats_deploy.errors import AtsDeployError, CheckpointError, ConfigError, InputError
from ats_deploy.model.checkpoints import load_checkpoint, validate_state_dict


@pytest.fixture
def sd(tiny_ckpt) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v.copy()) for k, v in tiny_ckpt.state_dict.items()}


def _one_line(exc: Exception) -> str:
    text = str(exc)
    assert "\n" not in text and text, text
    return text


def _refused(path, match: str, kind=CheckpointError, **kw) -> str:
    with pytest.raises(kind) as err:
        load_checkpoint(path, heads=2, **kw)
    text = _one_line(err.value)
    assert match in text, text
    return text


def test_plain_directory_and_empty_file(tmp_path):
    (tmp_path / "ckdir").mkdir()
    _refused(tmp_path / "ckdir", "is a directory; pass the checkpoint file inside it", InputError)
    (tmp_path / "empty.pt").write_bytes(b"")
    _refused(tmp_path / "empty.pt", "is empty; re-download or re-save it")


def test_corrupt_safetensors(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    _refused(bad, "is not a valid .safetensors file")


def test_bfloat16_safetensors_load_through_torch(tmp_path, sd):
    from safetensors.torch import save_file

    path = tmp_path / "bf16.safetensors"
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}, str(path))
    ck = load_checkpoint(path, heads=2)
    ref = sd["head.weight"].to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(ck.state_dict["head.weight"], ref)


def test_pickled_module_needs_trust_and_then_loads(tmp_path, tiny_ckpt):
    from ats_deploy.model import build_model

    model = build_model(tiny_ckpt)
    path = tmp_path / "module.pt"
    torch.save({"model": model}, path)
    _refused(path, "pass --trust-pickle if you trust its source")
    ck = load_checkpoint(path, heads=2, trust_pickle=True)  # {"model": nn.Module} unwrapped to its state_dict
    np.testing.assert_array_equal(ck.state_dict["pos_embed"], tiny_ckpt.state_dict["pos_embed"])
    torch.save(model, tmp_path / "bare.pt")
    assert load_checkpoint(tmp_path / "bare.pt", heads=2, trust_pickle=True).config == tiny_ckpt.config


def test_not_a_state_dict(tmp_path, sd):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    _refused(tmp_path / "list.pt", "holds a list, not a state_dict; save model.state_dict() instead")
    torch.save({"model": {"note": "no tensors here"}, "epoch": 3}, tmp_path / "notensors.pt")
    _refused(tmp_path / "notensors.pt", "holds no tensors")


def test_prefixes_and_numpy_values_are_accepted(tmp_path, sd):
    wrapped = {"state_dict": {"module." + k: v.numpy() if k.startswith("blocks.0") else v for k, v in sd.items()}}
    torch.save(wrapped, tmp_path / "ddp.pt")
    ck = load_checkpoint(tmp_path / "ddp.pt", heads=2, trust_pickle=True)  # NumPy arrays need the unpickler
    np.testing.assert_array_equal(ck.state_dict["blocks.0.attn.qkv.weight"], sd["blocks.0.attn.qkv.weight"].numpy())


def test_shape_problems_name_the_tensor(tmp_path, sd):
    bad = dict(sd)
    bad["patch_embed.proj.weight"] = torch.zeros(64, 3, 8, 4)  # not square
    torch.save(bad, tmp_path / "patch.pt")
    _refused(tmp_path / "patch.pt", "patch_embed.proj.weight has shape (64, 3, 8, 4), expected [C, 3, p, p]")
    bad = dict(sd)
    bad["pos_embed"] = torch.zeros(1, 64, 64)  # 64 = CLS + 63 patches: not a square grid
    torch.save(bad, tmp_path / "pos.pt")
    _refused(tmp_path / "pos.pt", "pos_embed has 64 tokens, not 1 prefix token(s) plus a square patch grid")
    bad = dict(sd)
    bad["blocks.1.mlp.fc2.weight"] = torch.zeros(64, 100)
    torch.save(bad, tmp_path / "fc2.pt")
    _refused(tmp_path / "fc2.pt", "blocks.1.mlp.fc2.weight (64, 100) != (64, 256)")
    with pytest.raises(ConfigError, match="embed dim 64 is not divisible by 3 heads"):
        load_checkpoint(tmp_path / "fc2.pt", heads=3)


def test_missing_and_unexpected_keys_are_listed(tiny_ckpt):
    sd = dict(tiny_ckpt.state_dict)
    del sd["norm.bias"]
    sd["extra.weight"] = np.zeros(3, np.float32)
    sd["blocks.0.attn.out_zero_mask"] = np.zeros(3, np.float32)  # ignored training leftovers
    with pytest.raises(CheckpointError) as err:
        validate_state_dict(sd, tiny_ckpt.config)
    assert (
        _one_line(err.value)
        == "checkpoint is not a timm/DeiT ViT state_dict: missing norm.bias; unexpected extra.weight"
    )


def test_missing_core_keys(tmp_path):
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "resnet.pt")
    text = _refused(tmp_path / "resnet.pt", "is not a timm/DeiT ViT: missing cls_token")
    assert "has fc.weight" in text


def test_every_refusal_is_an_ats_deploy_error(tmp_path):
    """The CLI maps AtsDeployError to exit 1 with one line; a stray exception type would be a traceback."""
    (tmp_path / "garbage.pt").write_bytes(b"\x80\x04garbage that is not a pickle stream")
    with pytest.raises(AtsDeployError):
        load_checkpoint(tmp_path / "garbage.pt")


def test_other_file_kinds_say_what_they_are(tmp_path, tiny_ckpt):
    """ONNX files and export directories are refused by kind, before any unpickling (no --trust-pickle hint)."""
    import onnx

    from ats_deploy.exporters.onnx import build_graph
    from ats_deploy.model.config import ATSConfig

    onnx.save(build_graph(tiny_ckpt.config, tiny_ckpt.state_dict, ATSConfig()), str(tmp_path / "model.pt"))
    text = _refused(tmp_path / "model.pt", "ONNX", AtsDeployError)
    assert "--trust-pickle" not in text
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "manifest.json").write_text("{}")
    _refused(tmp_path / "exp", "export", AtsDeployError)


def test_unknown_bytes_and_broken_pickles(tmp_path):
    (tmp_path / "noise.bin").write_bytes(b"just some text, neither zip nor pickle\n" * 4)
    text = _refused(tmp_path / "noise.bin", "is not a PyTorch checkpoint or .safetensors file (unknown format)")
    assert "--trust-pickle" not in text
    (tmp_path / "broken.pt").write_bytes(b"\x80\x04\x95garbage")
    _refused(tmp_path / "broken.pt", "cannot be unpickled (pickle data was truncated); re-save it", trust_pickle=True)


class _GoneNet:  # pickled by reference to a module that will not exist when loading
    pass


def test_pickle_needing_missing_code(tmp_path):
    import pickle
    import sys
    import types

    mod = types.ModuleType("ats_gone_module")
    _GoneNet.__module__ = "ats_gone_module"
    mod._GoneNet = _GoneNet
    sys.modules["ats_gone_module"] = mod
    try:
        with open(tmp_path / "net.pkl", "wb") as fh:
            pickle.dump({"model": _GoneNet()}, fh, protocol=2)
    finally:
        del sys.modules["ats_gone_module"]
        _GoneNet.__module__ = __name__
    _refused(tmp_path / "net.pkl", "needs code that is not importable here", trust_pickle=True)
    _refused(tmp_path / "net.pkl", "pass --trust-pickle if you trust its source")


def test_a_pickle_that_breaks_the_unpickler_otherwise_is_still_one_line(tmp_path):
    """Trusted garbage whose unpickling raises something else than UnpicklingError (here REDUCE on two ints:
    TypeError) is reported as corrupt, naming the exception type."""
    (tmp_path / "odd.pt").write_bytes(b"\x80\x02K\x01K\x02R.")
    _refused(tmp_path / "odd.pt", "is truncated or corrupt (TypeError); re-download or re-save it", trust_pickle=True)


def test_safetensors_checkpoints_load_without_torch(tmp_path, sd):
    """The on-device commands run where torch is absent: a .safetensors checkpoint is read and validated
    with NumPy alone (a child process in which importing torch fails)."""
    import subprocess
    import sys

    from safetensors.numpy import save_file

    path = tmp_path / "w.safetensors"
    save_file({k: v.numpy() for k, v in sd.items()}, str(path))
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from ats_deploy.model.checkpoints import load_checkpoint\n"
        f"ck = load_checkpoint({str(path)!r}, heads=2)\n"
        "print(ck.config.depth, ck.state_dict['head.weight'].dtype, 'torch' in sys.modules and sys.modules['torch'])\n"
        "print(repr(ck.state_dict['head.weight'].sum().item()), repr(ck.state_dict['pos_embed'].ravel()[7].item()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[:3] == [str(len({k.split(".")[1] for k in sd if k.startswith("blocks.")})), "float32", "None"]
    # the values read are the saved ones (float32 sums of the same array in the same order are bit-equal)
    assert out[3:] == [repr(sd["head.weight"].numpy().sum().item()), repr(sd["pos_embed"].numpy().ravel()[7].item())]


def test_a_checkpoint_saved_on_a_gpu_loads_on_the_cpu(tmp_path, sd, monkeypatch):
    """Checkpoints from GPU training carry 'cuda:0' storage tags: they must load here (map to the CPU),
    not fail with torch's 'deserialize object on a CUDA device'."""
    import torch.serialization as ser

    with monkeypatch.context() as m:
        m.setattr(ser, "location_tag", lambda storage: "cuda:0")  # what torch.save records for a GPU tensor
        torch.save(sd, tmp_path / "gpu.pt")
    assert b"cuda:0" in (tmp_path / "gpu.pt").read_bytes()
    ck = load_checkpoint(tmp_path / "gpu.pt")
    np.testing.assert_array_equal(ck.state_dict["head.weight"], sd["head.weight"].numpy())


def test_a_truncated_zip_checkpoint_names_torch_s_reason(tmp_path, sd):
    torch.save(sd, tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    text = _refused(tmp_path / "cut.pt", "is truncated or corrupt (")
    assert "PytorchStreamReader failed" in text and text.endswith("); re-download or re-save it")


def test_safetensors_load_in_process_when_torch_cannot_be_imported(tmp_path, sd, monkeypatch):
    """The same as the child-process test above, in this process (where a broken torch stand-in would show)."""
    import sys

    from safetensors.numpy import save_file

    path = tmp_path / "w.safetensors"
    save_file({k: v.numpy() for k, v in sd.items()}, str(path))
    pt = tmp_path / "w.pt"
    torch.save(sd, pt)
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    with pytest.raises(CheckpointError, match=r"w\.pt is a PyTorch file and torch is not installed here;.*safetensors"):
        load_checkpoint(pt)  # a .pt needs torch: one line that names the way out, not an ImportError
    ck = load_checkpoint(path, heads=2)
    assert ck.state_dict["head.weight"].dtype == np.float32 and ck.config.num_heads == 2
    for k, v in sd.items():
        np.testing.assert_array_equal(ck.state_dict[k], v.numpy(), err_msg=k)
