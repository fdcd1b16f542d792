"""The README's Usage commands run as written, in order, in an empty directory (so the README stays true).

``pip install`` lines are skipped (this environment is the installed one); ``ats-deploy`` runs as
``python -m ats_deploy.cli`` from this checkout. Before the "your own checkpoint" block the test puts
what that block says the user has into the directory: a checkpoint ``model.pt`` (a small ViT) and a
folder ``images/`` of PNG files.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def usage_blocks() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Usage\n", 1)[1].split("\n### ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    out = []
    for block in blocks:
        lines = [ln.split("  #")[0].strip() for ln in block.splitlines()]
        out.append([ln for ln in lines if ln and not ln.startswith(("#", "pip "))])
    return out


def test_usage_blocks_are_found():
    blocks = usage_blocks()
    assert len(blocks) == 2 and all(b and all(c.startswith("ats-deploy ") for c in b) for b in blocks)
    assert any("model.pt" in c for c in blocks[1]) and not any("model.pt" in c for c in blocks[0])


def _user_files(d: Path) -> None:
    import torch
    from PIL import Image

    from ats_deploy.model.config import ViTConfig
    from ats_deploy.model.default import default_checkpoint

    cfg = ViTConfig(img_size=96, patch_size=8, embed_dim=64, depth=6, num_heads=1, num_classes=10)
    ck = default_checkpoint(seed=11, cfg=cfg)
    torch.save({"model": {k: torch.from_numpy(v.copy()) for k, v in ck.state_dict.items()}}, d / "model.pt")
    (d / "images").mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (120, 100, 3), dtype=np.uint8)).save(d / "images" / f"{i}.png")


def test_readme_usage_runs_as_written(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for i, block in enumerate(usage_blocks()):
        if i == 1:
            _user_files(tmp_path)
        for cmd in block:
            args = [sys.executable, "-m", "ats_deploy.cli", *shlex.split(cmd)[1:]]
            res = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
            assert res.returncode == 0, f"{cmd}\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
    assert (tmp_path / "report" / "kept_histogram.png").is_file(), "report wrote no plots (matplotlib missing?)"
    assert {"model.onnx", "manifest.json"} <= {p.name for p in (tmp_path / "mine").iterdir()}
