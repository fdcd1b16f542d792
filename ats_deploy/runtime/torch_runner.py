"""PyTorch backend: the reference model, with outputs named like the exported graph."""

from __future__ import annotations

import numpy as np

from ..model.checkpoints import LoadedCheckpoint
from ..model.config import ATSConfig
from ..model.reference import NEAR_BOUNDARY
from .base import Runner, check_pixels

__all__ = ["TorchRunner"]


class TorchRunner(Runner):
    """The PyTorch model with the graph's output names.

    ``boundary=True`` adds ``near_boundary_<block>`` (bool [B]): whether that block's selection for the
    image is one docs/ATS_RULE.md lets implementations decide differently (a grid point within 1e-5 of a CDF
    step, or near-tied scores; ``model.reference.near_boundary`` on the float32 scores, in float64).
    Parity uses it to tell numerically undecidable picks from real disagreements.
    """

    name = "torch"

    def __init__(self, ckpt: LoadedCheckpoint, ats: ATSConfig, *, device: str = "cpu", boundary: bool = False) -> None:
        import torch

        from ..model import build_model

        self._torch = torch
        self.cfg = ckpt.config
        self.ats = ats
        self.device = device
        self.model = build_model(ckpt, ats).to(device)
        self.boundary = boundary

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        x = check_pixels(feed["pixels"], channels=self.cfg.in_chans, size=self.cfg.img_size)
        with torch.inference_mode():
            out = self.model.forward_trace(torch.from_numpy(x).to(self.device), sampler_inputs=self.boundary)
        res = {"logits": out.logits.float().cpu().numpy()}
        for blk, ids, cnt in zip(self.ats.blocks, out.token_ids, out.counts):
            res[f"tokens_{blk}"] = ids.cpu().numpy().astype(np.int64)
            res[f"count_{blk}"] = cnt.cpu().numpy().astype(np.int32)
        if self.boundary:
            from ..model.reference import near_boundary

            for blk, (scores, count) in zip(self.ats.blocks, out.sampler_inputs):
                s, c = scores.float().cpu().numpy(), count.cpu().numpy()
                k = self.ats.k_for(blk)
                res[f"{NEAR_BOUNDARY}{blk}"] = np.array(
                    [near_boundary(s[i], int(c[i]), k_max=k, n_ref=self.cfg.n_ref) for i in range(len(s))], bool
                )
        return res
