"""PyTorch backend: the reference model, with outputs named like the exported graph."""

from __future__ import annotations

import numpy as np

from ..model.checkpoints import LoadedCheckpoint
from ..model.config import ATSConfig
from .base import Runner, check_pixels

__all__ = ["TorchRunner"]


class TorchRunner(Runner):
    name = "torch"

    def __init__(self, ckpt: LoadedCheckpoint, ats: ATSConfig, *, device: str = "cpu") -> None:
        import torch

        from ..model import build_model

        self._torch = torch
        self.cfg = ckpt.config
        self.ats = ats
        self.device = device
        self.model = build_model(ckpt, ats).to(device)

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        x = check_pixels(feed["pixels"], channels=self.cfg.in_chans, size=self.cfg.img_size)
        with torch.inference_mode():
            out = self.model.forward_trace(torch.from_numpy(x).to(self.device))
        res = {"logits": out.logits.float().cpu().numpy()}
        for blk, ids, cnt in zip(self.ats.blocks, out.token_ids, out.counts):
            res[f"tokens_{blk}"] = ids.cpu().numpy().astype(np.int64)
            res[f"count_{blk}"] = cnt.cpu().numpy().astype(np.int32)
        return res
