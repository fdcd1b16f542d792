"""Shared fixtures: tiny seeded ViTs built once per session (fast on a 2-core CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def vectors() -> dict:
    return json.loads((DATA / "ats_vectors.json").read_text())


@pytest.fixture(scope="session")
def tiny_cfg():
    from ats_deploy.model.config import ViTConfig

    # 64x64 images, patch 8 -> 64 patches + CLS = 65 tokens; 6 blocks (ATS default: blocks 2..5).
    return ViTConfig(img_size=64, patch_size=8, embed_dim=64, depth=6, num_heads=2, num_classes=10)


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_cfg):
    from ats_deploy.model.default import default_checkpoint

    return default_checkpoint(seed=7, cfg=tiny_cfg)


@pytest.fixture(scope="session")
def tiny_distilled_ckpt():
    from ats_deploy.model.config import ViTConfig
    from ats_deploy.model.default import default_checkpoint

    cfg = ViTConfig(img_size=64, patch_size=8, embed_dim=64, depth=6, num_heads=2, num_classes=10, distilled=True)
    return default_checkpoint(seed=8, cfg=cfg)


@pytest.fixture(scope="session")
def tiny_inputs(tiny_cfg) -> np.ndarray:
    return np.random.default_rng(3).standard_normal((8, 3, tiny_cfg.img_size, tiny_cfg.img_size)).astype(np.float32)
