"""What a new user meets first: help text, wrong kinds of files, progress, file modes, the import graph."""

from __future__ import annotations

import ast
import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from ats_deploy.cli import app

runner = CliRunner()
PKG = Path(__file__).resolve().parents[2] / "ats_deploy"


def _commands(group: typer.Typer, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = [prefix + (c.name or c.callback.__name__.replace("_", "-"),) for c in group.registered_commands]
    for sub in group.registered_groups:
        out += _commands(sub.typer_instance, prefix + (sub.name,))
    return out


COMMANDS = _commands(app)


def test_every_command_is_listed():
    names = {" ".join(c) for c in COMMANDS}
    assert {"export", "parity", "report", "verify", "demo train", "demo eval", "plugin build"} <= names


@pytest.mark.parametrize("cmd", COMMANDS, ids=" ".join)
def test_help_is_plain(cmd):
    """No emoji from rich markup (``shapes:train:N``), no value metavar on flags, choices listed, every
    option described."""
    res = runner.invoke(app, [*cmd, "--help"])
    assert res.exit_code == 0, res.output
    text = res.output
    assert "Usage: ats-deploy " + " ".join(cmd) in text
    assert "<bool>" not in text and "[-h]" not in text
    assert not re.search(r"[\U0001F300-\U0001FAFF]", text), "an emoji code was rendered"
    assert "<str>" not in re.sub(r"--(out|max-k|ats-blocks|batch|batches|cuda-arch|device|name)\b[^\n]*", "", text)
    if "shapes:" in text:
        assert re.search(r"shapes:(heldout|train):N", text)
    click_cmd = typer.main.get_command(app)
    for part in cmd:
        click_cmd = click_cmd.commands[part]  # type: ignore[attr-defined]
    for p in click_cmd.params:
        if p.param_type_name == "option" and p.name != "help":
            assert p.help, f"{' '.join(cmd)} {p.opts[0]} has no description"


def test_choices_are_listed_and_checked():
    assert "<portable|plugin>" in runner.invoke(app, ["export", "--help"]).output
    assert "<entropy|max|percentile>" in runner.invoke(app, ["calibrate", "--help"]).output
    res = runner.invoke(app, ["export", "--sampler", "magic"])
    assert res.exit_code == 2 and "magic" in res.output


def _edges(root: Path) -> dict[str, set[str]]:
    mods = {}
    for f in root.rglob("*.py"):
        parts = list(f.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        base = m.split(".") if f.name == "__init__.py" else m.split(".")[:-1]
        for node in ast.walk(ast.parse(f.read_text())):  # imports inside functions count too
            if isinstance(node, ast.ImportFrom):
                head = base[: len(base) - node.level + 1] if node.level else []
                target = ".".join(head + [node.module or ""]).strip(".")
                names = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            edges[m] |= {n for n in names if n in mods and n != m}
    return edges


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycles():
    edges = _edges(PKG)
    assert "ats_deploy.artifacts" in edges["ats_deploy.exporters.export"]  # the parser sees relative imports
    assert _cycle(edges) is None, " -> ".join(_cycle(edges) or [])


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


# -- the wrong kind of file -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_ckpt):
    import onnx
    import torch
    from safetensors.numpy import save_file

    d = tmp_path_factory.mktemp("kinds")
    torch.save({"model": {k: torch.from_numpy(v.copy()) for k, v in tiny_ckpt.state_dict.items()}}, d / "m.pt")
    torch.save({"w": torch.zeros(2)}, d / "legacy.pt", _use_new_zipfile_serialization=False)
    save_file({"w": np.zeros(2, np.float32)}, str(d / "m.safetensors"))
    g = onnx.helper.make_graph([], "g", [], [])
    onnx.save(onnx.helper.make_model(g), str(d / "m.onnx"))
    np.savez(d / "r.npz", a=np.zeros(2))
    np.save(d / "x.npy", np.zeros(2))
    (d / "exp").mkdir()
    (d / "exp" / "manifest.json").write_text("{}")
    (d / "plain").mkdir()
    return d


@pytest.mark.parametrize(
    "name,kind",
    [
        ("m.pt", "torch-zip"),
        ("legacy.pt", "pickle"),
        ("m.safetensors", "safetensors"),
        ("m.onnx", "onnx"),
        ("r.npz", "npz"),
        ("x.npy", "npy"),
        ("exp", "export-dir"),
        ("plain", "directory"),
        ("nothere", "missing"),
    ],
)
def test_file_kind(files, name, kind):
    from ats_deploy.artifacts import file_kind

    assert file_kind(files / name) == kind


def _one_line(res, code: int = 1) -> str:
    assert res.exit_code == code, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    return lines[0]


@pytest.mark.parametrize("cmd", [["tune-k"], ["export"], ["tokens"]])
def test_onnx_is_not_called_a_pickle(files, cmd):
    line = _one_line(runner.invoke(app, [*cmd, str(files / "m.onnx")]))
    assert "ONNX" in line and "pickle" not in line and "--trust-pickle" not in line


def test_checkpoint_where_export_dir_is_expected(files):
    for cmd in (["parity"], ["report"], ["calibrate", "--data", str(files)]):
        line = _one_line(runner.invoke(app, [cmd[0], str(files / "m.pt"), *cmd[1:]]))
        assert "not an export directory" in line and f"ats-deploy export {files / 'm.pt'} -o out/" in line


def test_verify_on_onnx_says_build_first(files):
    line = _one_line(runner.invoke(app, ["verify", str(files / "m.onnx"), "--reference", str(files / "r.npz")]))
    assert "this is ONNX: build an engine first" in line


def test_parity_on_missing_directory(files):
    line = _one_line(runner.invoke(app, ["parity", str(files / "nothere")]))
    assert "does not exist" in line and "manifest" not in line


def test_plugin_build_names_the_cli_flag(tmp_path):
    """`plugin build --tensorrt-root DIR` with no TensorRT under DIR: exit 1, one line that names DIR (the
    flag reached the build) and the CLI flag to fix it (not the Python keyword)."""
    from ats_deploy.errors import DependencyError
    from ats_deploy.exporters.plugin_lib import find_cmake, find_nvcc

    try:  # checked before TensorRT: without them the error is theirs, tested in test_plugin_sources
        find_cmake(), find_nvcc()
    except DependencyError as e:
        pytest.skip(f"cmake or nvcc missing here, so the TensorRT check is not reached: {e}")
    root = tmp_path / "no-trt-here"
    root.mkdir()
    res = runner.invoke(app, ["plugin", "build", "--tensorrt-root", str(root), "--build-dir", str(tmp_path / "b")])
    assert res.exit_code == 1, res.output
    line = res.output.strip()
    assert "\n" not in line and "Traceback" not in line
    assert "TensorRT headers" in line and str(root) in line
    assert "--tensorrt-root" in line and "tensorrt_root=" not in line


# -- progress, file modes, interrupted runs -----------------------------------------------------------------


def test_progress_off_a_terminal_is_plain_lines():
    from ats_deploy.progress import progress_bar

    buf = io.StringIO()  # not a TTY
    with progress_bar(True, 4, "parity", stream=buf, quiet_s=0) as advance:
        advance(2)
        advance(0, description="ONNX Runtime")
        advance(2)
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("parity: 0/4") and any(ln.startswith("ONNX Runtime: 2/4") for ln in lines)
    assert "4/4" in lines[-1] and "\r" not in buf.getvalue() and "\x1b" not in buf.getvalue()
    quick = io.StringIO()
    with progress_bar(True, 4, "parity", stream=quick, quiet_s=60) as advance:
        advance(4)
    assert quick.getvalue() == ""  # a quick run prints nothing


def test_atomic_files_follow_the_umask(tmp_path):
    from ats_deploy.artifacts import atomic_copy, atomic_write

    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.plan", b"x")
        atomic_copy(tmp_path / "a.plan", tmp_path / "b.plan")
    finally:
        os.umask(old)
    assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {"a.plan": 0o644, "b.plan": 0o644}


def test_interrupted_export_leaves_no_directory(tiny_ckpt, tmp_path, monkeypatch):
    import ats_deploy.exporters.export as ex
    from ats_deploy.model.config import resolve_ats

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ex, "compare_outputs", interrupt)
    with pytest.raises(KeyboardInterrupt):
        ex.export_model(tiny_ckpt, resolve_ats(tiny_ckpt.config), tmp_path / "new" / "out", parity_count=1)
    assert not (tmp_path / "new" / "out").exists()


def test_ctrl_c_in_a_command_is_one_line_and_exit_130(tiny_ckpt, tmp_path, monkeypatch):
    """The CLI's answer to Ctrl-C: one line on stderr, exit 130, no traceback, no output directory."""
    import torch
    from typer.testing import CliRunner

    import ats_deploy.exporters.export as ex
    from ats_deploy.cli import app

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    ck = tmp_path / "tiny.pth"
    torch.save({"model": {k: torch.from_numpy(v.copy()) for k, v in tiny_ckpt.state_dict.items()}}, ck)
    monkeypatch.setattr(ex, "compare_outputs", interrupt)
    args = ["export", str(ck), "--heads", "2", "-o", str(tmp_path / "out"), "--parity-inputs", "1"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 130, res.output
    want = "error: interrupted; outputs are renamed into place only when complete"
    assert res.stderr.strip() == want and "Traceback" not in res.output
    assert not (tmp_path / "out").exists()


def test_an_unforeseen_os_error_is_one_line_naming_the_file(tmp_path, monkeypatch, tiny_ckpt):
    """Fault injection: reading an artifact fails with EACCES where no check foresaw it (root ignores chmod,
    so the error is raised): one line with the file and the reason, exit 1, no traceback."""
    import torch
    from typer.testing import CliRunner

    import ats_deploy.exporters.export as ex
    from ats_deploy.cli import app

    ck = tmp_path / "tiny.pth"
    torch.save({"model": {k: torch.from_numpy(v.copy()) for k, v in tiny_ckpt.state_dict.items()}}, ck)

    def denied(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(ex, "sha256_file", denied)
    res = CliRunner().invoke(app, ["export", str(ck), "--heads", "2", "-o", str(tmp_path / "out")])
    assert res.exit_code == 1 and "Traceback" not in res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot access ") and "(Permission denied)" in lines[0]
    assert "model.onnx" in lines[0] and not (tmp_path / "out").exists()


def test_corrupt_image_is_named(tmp_path):
    from PIL import Image

    from ats_deploy.errors import InputError
    from ats_deploy.inputs import Preprocess, load_inputs

    for i in range(3):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(tmp_path / f"ok{i}.png")
    good = (tmp_path / "ok0.png").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(good[: len(good) // 2])
    pre = Preprocess(size=32)
    with pytest.raises(InputError, match=r"1 unreadable image.*cut\.jpg.*--skip-unreadable"):
        load_inputs(tmp_path, pre)
    x, names = load_inputs(tmp_path, pre, skip_unreadable=True)
    assert names == ["ok0.png", "ok1.png", "ok2.png"] and len(x) == 3


def test_kept_histogram_spans_what_was_kept(tiny_cfg):
    from ats_deploy.model.config import resolve_ats
    from ats_deploy.reports.latency import _token_stats

    ats = resolve_ats(tiny_cfg)
    counts = np.arange(31, 41)  # K' 30..39 of 64 patches: one late block
    outs = {"logits": np.zeros((10, 10))}
    outs.update({f"count_{b}": counts for b in ats.blocks})
    hist = _token_stats(tiny_cfg, ats, outs)["blocks"][0]["hist"]
    assert hist["edges"][0] == 30 and hist["edges"][-1] >= 39 and sum(c > 0 for c in hist["counts"]) == 10


# -- demo train / demo eval as typer commands ------------------------------------------------------------


def test_demo_train_options_map_to_train_config(monkeypatch, tmp_path):
    import ats_deploy.demo.train as tr

    seen = {}

    def fake_train(cfg, *, resume=True, progress=True):
        seen["cfg"], seen["resume"] = cfg, resume
        return type("R", (), {"final_weights": tmp_path / "final.safetensors"})()

    monkeypatch.setattr(tr, "train", fake_train)
    # The option mapping is the subject here: a CPU with bf16 units, so the default --amp is not refused
    # (test_demo.py covers the refusal against this machine's own measurement).
    monkeypatch.setattr(tr, "bf16_slowdown", lambda: 0.3)
    args = ["demo", "train", "--out", str(tmp_path), "--phase", "112:10:5e-4:2", "--phase", "224:5:1e-4:1:0.2:0.4"]
    res = runner.invoke(app, [*args, "--batch-size", "8", "--seed", "3", "--token-label", "0.5", "--no-resume"])
    assert res.exit_code == 0, res.output
    cfg = seen["cfg"]
    assert [(p.img_size, p.steps, p.lr, p.warmup) for p in cfg.phases] == [(112, 10, 5e-4, 2), (224, 5, 1e-4, 1)]
    assert cfg.phases[1].scale == (0.2, 0.4) and cfg.phases[0].scale is None
    assert (cfg.batch_size, cfg.seed, cfg.token_label, cfg.out_dir) == (8, 3, 0.5, str(tmp_path))
    assert seen["resume"] is False and res.stdout.strip().endswith("final.safetensors")
    res = runner.invoke(app, ["demo", "train", "--steps-low", "7", "--steps-high", "0", "--lr", "1e-3"])
    assert res.exit_code == 0, res.output
    assert [(p.steps, p.lr) for p in seen["cfg"].phases] == [(7, 1e-3)] and seen["cfg"].batch_size == 32
    assert runner.invoke(app, ["demo", "train", "--phase", "112:x"]).exit_code == 1
    # A guided ATS phase, --init demo (the shipped weights' path) and the guidance's background share.
    from ats_deploy.demo.weights import DEMO_WEIGHTS

    args = ["demo", "train", "--phase", "224:9:1e-4:2:ats:guide=0.5", "--init", "demo", "--guide-background", "0.3"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    cfg = seen["cfg"]
    assert (cfg.phases[0].ats, cfg.phases[0].guide, cfg.guide_background) == (True, 0.5, 0.3)
    assert cfg.init == str(DEMO_WEIGHTS)
    res = runner.invoke(app, ["demo", "train", "--phase", "224:9:1e-4:2", "--init", str(tmp_path / "w.safetensors")])
    assert res.exit_code == 0 and seen["cfg"].init == str(tmp_path / "w.safetensors")


def test_demo_eval_without_weights_says_how_to_get_them(monkeypatch, tmp_path):
    line = _one_line(runner.invoke(app, ["demo", "eval", str(tmp_path / "none.safetensors")]))
    assert "ats-deploy demo train" in line and "ats_deploy." not in line


def test_demo_eval_warns_on_other_class_count(monkeypatch, tiny_ckpt, tmp_path):
    from dataclasses import replace

    import ats_deploy.demo.evaluate as ev
    import ats_deploy.demo.weights as w

    big = replace(tiny_ckpt, config=replace(tiny_ckpt.config, num_classes=1000))  # an ImageNet head
    monkeypatch.setattr(w, "load_demo_checkpoint", lambda p=None: big)
    monkeypatch.setattr(ev, "evaluate", lambda ck, **k: type("R", (), {"to_json": lambda self: json.dumps({})})())
    monkeypatch.setattr(ev, "render_report", lambda rep: "report")
    res = runner.invoke(app, ["demo", "eval", str(tmp_path / "w.safetensors")])
    assert res.exit_code == 0, res.output
    assert "warning:" in res.stderr and "1000 classes" in res.stderr
    monkeypatch.setattr(w, "load_demo_checkpoint", lambda p=None: tiny_ckpt)  # 10 classes: no warning
    res = runner.invoke(app, ["demo", "eval", str(tmp_path / "w.safetensors")])
    assert res.exit_code == 0 and "warning" not in res.stderr



def test_demo_eval_passes_images_seed_and_max_k_to_the_real_evaluation(tiny_ckpt, tmp_path):
    """`demo eval W --images 6 --seed 5 --max-k 20 --json` on a tiny trained-format file runs the real
    evaluation with exactly those settings: its JSON equals a direct evaluate() call with them, and a
    different seed gives different K' (so a CLI that ignored --seed would not match)."""
    from ats_deploy.demo.evaluate import evaluate
    from ats_deploy.demo.train import save_weights
    from ats_deploy.demo.weights import load_demo_checkpoint
    from ats_deploy.model import build_model

    w = save_weights(build_model(tiny_ckpt), tmp_path / "w.safetensors")
    res = runner.invoke(app, ["demo", "eval", str(w), "--images", "6", "--seed", "5", "--max-k", "20", "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    assert got["images"] == 6 and got["seed"] == 5
    assert [max(s["ats"]["k_schedule"], default=None) for s in got["settings"]] == [None, tiny_ckpt.config.n_ref, 20]
    ck = load_demo_checkpoint(w)
    want = json.loads(evaluate(ck, images=6, seed=5, max_ks=(None, 20), progress=False).to_json())
    assert got["settings"] == want["settings"]
    other = json.loads(evaluate(ck, images=6, seed=0, max_ks=(None, 20), progress=False).to_json())
    assert other["settings"] != want["settings"]
