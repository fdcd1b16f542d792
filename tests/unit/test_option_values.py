"""Option values that used to be accepted and mean nothing (or crash): each is one line naming the fix."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from ats_deploy.cli import app
from ats_deploy.errors import ConfigError
from ats_deploy.model.config import parse_int_list

runner = CliRunner()


def test_int_lists_parse_by_hand_values():
    assert parse_int_list("3-5,7", what="x") == (3, 4, 5, 7)
    assert parse_int_list(" 3 , 4 ", what="x") == (3, 4)
    assert parse_int_list("5-5", what="x") == (5,)


@pytest.mark.parametrize(
    ("text", "msg"),
    [
        ("5-3", "--ats-blocks range '5-3' runs backwards"),
        (",", "--ats-blocks ',' is not a comma list of integers"),
        ("", "--ats-blocks '' is not a comma list of integers"),
        ("3,x", "--ats-blocks '3,x' is not a comma list of integers"),
    ],
)
def test_empty_or_backward_int_lists_are_refused(text, msg):
    """A reversed range or an empty list used to become () and silently give a dense export."""
    with pytest.raises(ConfigError, match="^" + msg.replace("(", r"\(")):
        parse_int_list(text, what="--ats-blocks")


@pytest.mark.parametrize(
    ("args", "msg"),
    [
        (["--ats-blocks", "none", "--max-k", "50"], "error: --max-k 50 has no ATS block to apply to"),
        (["--heads", "5"], "error: --heads 5 applies to a checkpoint file; the embedded default model has"),
        (["--ats-blocks", "5-3"], "error: --ats-blocks range '5-3' runs backwards"),
    ],
)
def test_export_refuses_options_that_would_be_ignored(tmp_path, args, msg):
    out = tmp_path / "o"
    res = runner.invoke(app, ["export", "-o", str(out), *args])
    assert res.exit_code == 1 and res.output.startswith(msg), res.output
    assert len(res.output.strip().splitlines()) == 1 and not out.exists()


def test_heads_must_be_positive(tiny_ckpt, tmp_path):
    from safetensors.numpy import save_file

    from ats_deploy.model.checkpoints import load_checkpoint

    path = tmp_path / "w.safetensors"
    save_file(dict(tiny_ckpt.state_dict), str(path))
    for heads in (0, -3):  # ZeroDivisionError / a complex-number TypeError before
        with pytest.raises(ConfigError, match=f"--heads {heads} must be a positive integer"):
            load_checkpoint(path, heads=heads)
        res = runner.invoke(app, ["export", str(path), "--heads", str(heads), "-o", str(tmp_path / "o")])
        assert res.exit_code == 2 and "--heads" in res.output and "Traceback" not in res.output
