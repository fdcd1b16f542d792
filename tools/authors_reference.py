#!/usr/bin/env python3
"""Run the ATS authors' own model on our seeded checkpoints and record what it keeps (a developer tool).

Why: docs/ATS_RULE.md section 2 says the authors' code (github.com/adaptivetokensampling/ATS, at batch size 1,
DROP_TOKENS on) is the reference for which tokens ATS keeps. This tool runs THEIR ``ViT`` on weights made by
our ``default_checkpoint`` (saved in their ``{"model": state_dict}`` format) and writes, per image and per
ATS block, the ORIGINAL token ids they keep, in their output order, plus their logits for the first images.
``tests/unit/test_authors_parity.py`` replays the fixture against our model, so the tests never need their
code; only regenerating the fixture does. None of their code is stored in this repository.

Usage (their code needs its own environment; see below)::

    git --git-dir=/path/to/ATS.git archive HEAD | tar -x -C /tmp/ats_authors
    python3 -m venv /tmp/venv_authors && /tmp/venv_authors/bin/pip install torch numpy
    /tmp/venv_authors/bin/python tools/authors_reference.py --authors-repo /tmp/ats_authors \\
        --authors-commit <sha of the exported commit>   # not needed when --authors-repo is a git checkout

What is stubbed, and why it cannot change an eval-mode result (everything else is their code, unmodified):

* ``timm`` (their files import ``DropPath``, ``to_2tuple``, ``trunc_normal_``, ``IMAGENET_DEFAULT_MEAN/STD``,
  ``register_model`` and ``build_model_with_cfg``). Current timm imports torchvision at package import, which
  this environment does not install, so when ``import timm.models.layers`` fails the tool puts small
  stand-ins into ``sys.modules`` first: ``DropPath`` is identity (their config has DROP_PATH_RATE 0.0, so
  they build ``nn.Identity`` and never instantiate it; it is also identity in eval), ``trunc_normal_`` only
  initialises weights that the checkpoint then overwrites (it draws from torch's generator, nothing else),
  ``to_2tuple`` is the same two-line helper, the ImageNet constants feed an unused ``default_cfgs`` table,
  ``register_model`` is an identity decorator on factory functions never called here, and
  ``build_model_with_cfg`` raises if ever called (it is not). If real timm imports, it is used instead.
* ``libs``, ``libs.models`` and ``libs.models.transformers`` are registered as bare packages, so their
  ``__init__`` files (which set up iopath/fvcore logging and the training registry) are not executed;
  ``libs.models.build`` is replaced by a module holding ``MODEL_REGISTRY`` with a ``register()`` decorator
  (their ``build.py`` only defines that fvcore registry and a GPU placement helper). ``ats_block.py``,
  ``transformer_block.py`` and ``vit.py`` are imported from ``--authors-repo`` as they are.

Observation hooks (they read, never change, what flows): ``AdaptiveTokenSampler.score_assignment_step``
and ``get_unique_indices`` are wrapped to record the sort order and the de-duplicated picks, and
``AdaptiveTokenSampler.forward`` is wrapped to check that the tokens it returns are exactly the input rows
those records name (so the recorded ids are what their model really kept).

Findings (authors' commit 9271257, torch 2.13 CPU): the committed fixture (5 configs x 12 images x 9 ATS
blocks = 540 pairs) matches our model exactly, logits within 1.1e-5. A one-off run with ``--images 100``
(4,442 comparable pairs) differed in 12 (0.27%), every one near a boundary by ``reference.near_boundary``:
11 with two patch scores tied to < 5e-6 relative (their order, and so the picks, swap), one with a grid point
2e-7 (relative) from the midpoint of two neighbouring CDF values. That is their epsilon-smoothed softmax and
normalise-before-cumsum arithmetic (docs/ATS_RULE.md section 2), not a rule difference.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np

TOOL_VERSION = 1
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "tests" / "data" / "authors_kept.json"
AUTHORS_URL = "https://github.com/adaptivetokensampling/ATS"
AUTHORS_FILES = (
    "libs/models/transformers/ats_block.py",
    "libs/models/transformers/transformer_block.py",
    "libs/models/transformers/vit.py",
    "configs/ImageNet/DeiT_S.yaml",
)
INPUT_SHAPE = (1, 3, 224, 224)

# (name, preset, weight seed, qk_gain, qkv_bias): DeiT-Ti and DeiT-S shapes, two gains so K' spans a wide
# range (gain 1.5: peaky attention, fewer kept; gain 1.0: flatter, more kept), and one without qkv bias.
CONFIGS = (
    ("ti_s20220723_g1.5", "deit_tiny_patch16_224", 20220723, 1.5, True),
    ("ti_s7_g1.0", "deit_tiny_patch16_224", 7, 1.0, True),
    ("ti_s11_g1.5_nobias", "deit_tiny_patch16_224", 11, 1.5, False),
    ("s_s20220723_g1.5", "deit_small_patch16_224", 20220723, 1.5, True),
    ("s_s3_g1.0", "deit_small_patch16_224", 3, 1.0, True),
)
FIRST_INPUT_SEED = 1000  # image i of every config uses input seed FIRST_INPUT_SEED + i
IMAGES = 12  # per config: 5 configs x 12 images x 9 blocks = 540 compared pairs, fixture ~0.3 MB
LOGIT_IMAGES = 3  # logits are stored for the first images only (fixture size)
LOGIT_DECIMALS = 5


def make_input(seed: int) -> np.ndarray:
    """The fixture's input image: standard normal noise, float32, NumPy PCG64 (reproducible anywhere)."""
    return np.random.default_rng(seed).normal(0.0, 1.0, INPUT_SHAPE).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------
# Stand-ins (see the module docstring for why each one cannot change an eval-mode result)


def _module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    return mod


def _install_timm_stubs() -> str:
    """Use real timm if it imports; otherwise register the minimal stand-ins. Returns what was used."""
    try:
        import timm.data  # noqa: F401
        import timm.models.layers  # noqa: F401
        import timm.models.registry  # noqa: F401
        import timm.models.vision_transformer  # noqa: F401

        return f"real timm {timm.__version__}"
    except Exception as exc:  # torchvision missing, typically
        reason = f"{type(exc).__name__}: {exc}"
        for name in [m for m in sys.modules if m == "timm" or m.startswith("timm.")]:
            del sys.modules[name]

    import torch
    from torch import nn

    class DropPath(nn.Identity):
        """Identity: their config has drop_path_rate 0.0 (never built), and drop path is off in eval anyway."""

        def __init__(self, drop_prob: float = 0.0) -> None:
            super().__init__()
            self.drop_prob = drop_prob

    def to_2tuple(x):
        return tuple(x) if isinstance(x, (tuple, list)) else (x, x)

    def trunc_normal_(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0):
        """Initialisation only; every tensor it touches is overwritten by the checkpoint."""
        with torch.no_grad():
            return nn.init.trunc_normal_(tensor, mean=mean, std=std, a=a, b=b)

    def register_model(fn):
        return fn

    def build_model_with_cfg(*args, **kwargs):
        raise RuntimeError("stub: timm.build_model_with_cfg is not used by the ATS parity tool")

    timm = _module("timm", __path__=[])
    models = _module("timm.models", __path__=[])
    timm.models = models
    models.layers = _module("timm.models.layers", DropPath=DropPath, to_2tuple=to_2tuple, trunc_normal_=trunc_normal_)
    models.registry = _module("timm.models.registry", register_model=register_model)
    models.vision_transformer = _module("timm.models.vision_transformer", build_model_with_cfg=build_model_with_cfg)
    timm.data = _module(
        "timm.data", IMAGENET_DEFAULT_MEAN=(0.485, 0.456, 0.406), IMAGENET_DEFAULT_STD=(0.229, 0.224, 0.225)
    )
    return f"stubbed ({reason})"


class _Registry:
    """Stand-in for fvcore's Registry: ``register()`` returns the class unchanged and records it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.items: dict[str, type] = {}

    def register(self, obj=None):
        def deco(o):
            self.items[o.__name__] = o
            return o

        return deco if obj is None else deco(obj)

    def get(self, name: str):
        return self.items[name]


def import_authors(repo: Path):
    """Import their transformer modules from ``repo``; returns (vit module, ats_block module, timm note)."""
    timm_note = _install_timm_stubs()
    for pkg in ("libs", "libs.models", "libs.models.transformers"):
        _module(pkg, __path__=[str(repo / pkg.replace(".", "/"))], __package__=pkg)
    _module("libs.models.build", MODEL_REGISTRY=_Registry("MODEL"), __package__="libs.models")
    ats_block = importlib.import_module("libs.models.transformers.ats_block")
    vit = importlib.import_module("libs.models.transformers.vit")
    return vit, ats_block, timm_note


# ----------------------------------------------------------------------------------------------------------
# Their config


def read_authors_vit_cfg(repo: Path) -> dict:
    """The VIT section of their configs/ImageNet/DeiT_S.yaml (flat ``KEY: value`` lines; no yaml needed)."""
    text = (repo / "configs/ImageNet/DeiT_S.yaml").read_text()
    section = text.split("VIT:", 1)[1]
    out: dict = {}
    for line in section.splitlines()[1:]:
        if line and not line.startswith((" ", "\t")):
            break
        m = re.match(r"\s+([A-Z_]+):\s*(.*?)\s*$", line)
        if not m:
            continue
        key, raw = m.groups()
        try:
            out[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key] = raw
    return out


def authors_cfg(base: dict, vit_cfg, *, qkv_bias: bool) -> types.SimpleNamespace:
    """Their DeiT-S settings (ATS blocks, NUM_TOKENS, DROP_TOKENS, rates) with our preset's shapes."""
    v = dict(base)
    v.update(
        IMG_SIZE=vit_cfg.img_size,
        PATCH_SIZE=vit_cfg.patch_size,
        IN_CHANNELS=vit_cfg.in_chans,
        NUM_CLASSES=vit_cfg.num_classes,
        EMBED_DIM=vit_cfg.embed_dim,
        DEPTH=vit_cfg.depth,
        NUM_HEADS=vit_cfg.num_heads,
        MLP_RATIO=vit_cfg.mlp_ratio,
        QKV_BIAS=qkv_bias,
    )
    for key in ("QK_SCALE", "REPRESENTATION_SIZE", "HYBRID_BACKBONE", "NORM_LAYER"):
        if v.get(key) in ("None", None):
            v[key] = None
    return types.SimpleNamespace(VIT=types.SimpleNamespace(**v))


# ----------------------------------------------------------------------------------------------------------
# Recording what their sampler keeps


class Recorder:
    """Wraps three methods of their AdaptiveTokenSampler to record, per ATS block call, the kept slots."""

    def __init__(self, ats_block_mod) -> None:
        self.cls = ats_block_mod.AdaptiveTokenSampler
        self.calls: list[list[int]] = []  # per ATS block call: kept input slots (CLS excluded), output order
        self._sorted: object = None
        self._unique: object = None

    def install(self) -> None:
        import torch

        cls = self.cls
        orig_score = cls.score_assignment_step
        orig_unique = cls.get_unique_indices
        orig_forward = cls.forward
        rec = self

        def score_assignment_step(attn, v):
            sorted_scores, sorted_indices = orig_score(attn, v)
            rec._sorted = sorted_indices.detach().clone()
            return sorted_scores, sorted_indices

        def get_unique_indices(indices, max_value):
            out = orig_unique(indices, max_value)
            rec._unique = (out.detach().clone(), int(max_value))
            return out

        def forward(self, x, policy, sampler, n_tokens, raw_x, n_ref_tokens):
            rec._sorted = rec._unique = None
            out = orig_forward(self, x, policy, sampler, n_tokens, raw_x, n_ref_tokens)
            _x, selected_x, out_policy, _sampler = out
            assert raw_x.shape[0] == 1, "the reference is their code at batch size 1"
            n = raw_x.shape[1]
            unique, max_value = rec._unique
            assert max_value == n - 1
            u = unique[0, : n - 1]
            picks = u[u != n - 1]  # sorted positions of the kept tokens (ascending score)
            slots = (rec._sorted[0][picks] + 1).tolist()  # input slots (CLS = 0 excluded)
            # Self-check: with DROP_TOKENS at batch 1 they output CLS then exactly these input rows.
            assert selected_x.shape[1] == 1 + len(slots), (selected_x.shape, len(slots))
            assert int(out_policy.sum()) == 1 + len(slots)
            assert torch.equal(selected_x[0], raw_x[0, [0] + slots]), "recorded slots do not match their output"
            assert len(set(slots)) == len(slots)
            rec.calls.append(slots)
            return out

        cls.score_assignment_step = staticmethod(score_assignment_step)
        cls.get_unique_indices = staticmethod(get_unique_indices)
        cls.forward = forward


def to_original_ids(calls: list[list[int]], n_tokens: int) -> list[list[int]]:
    """Compose the per-block slot choices into original token ids (CLS = 0 first), per ATS block."""
    ids = list(range(n_tokens))
    out = []
    for slots in calls:
        ids = [ids[0]] + [ids[s] for s in slots]
        out.append(list(ids))
    return out


# ----------------------------------------------------------------------------------------------------------


def authors_commit(repo: Path, given: str | None) -> str:
    if given:
        return given

    def git(*cmd: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *cmd], check=True, capture_output=True, text=True).stdout.strip()

    try:
        # Only the repository's own top level counts: an export inside another checkout must not borrow its HEAD.
        if Path(git("rev-parse", "--show-toplevel")).resolve() == repo:
            return git("rev-parse", "HEAD")
    except (OSError, subprocess.CalledProcessError):
        pass
    raise SystemExit("--authors-repo is not a git checkout: pass --authors-commit SHA of the exported commit")


def run_config(vit_mod, rec: Recorder, base_cfg: dict, entry: tuple, tmp: Path, n_images: int) -> dict:
    import torch

    from ats_deploy.model.default import default_checkpoint
    from ats_deploy.model.presets import preset

    name, preset_name, seed, gain, qkv_bias = entry
    cfg = preset(preset_name, qkv_bias=qkv_bias)
    ckpt = default_checkpoint(seed, cfg, qk_gain=gain)
    path = tmp / f"{name}.pth"
    torch.save({"model": {k: torch.from_numpy(v) for k, v in ckpt.state_dict.items()}}, path)

    model = vit_mod.ViT(authors_cfg(base_cfg, cfg, qkv_bias=qkv_bias))
    state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    missing, unexpected = model.load_state_dict(state, strict=False)  # as their checkpoint loader does
    if unexpected or any(not k.endswith("out_zero_mask") for k in missing):
        raise SystemExit(f"{name}: checkpoint does not fit their model: missing {missing}, unexpected {unexpected}")
    model.eval()

    images = []
    with torch.no_grad():
        for i, s in enumerate(range(FIRST_INPUT_SEED, FIRST_INPUT_SEED + n_images)):
            rec.calls = []
            logits, _ = model(torch.from_numpy(make_input(s)))
            kept = to_original_ids(rec.calls, cfg.num_tokens)
            assert len(kept) == len(base_cfg["ATS_BLOCKS"])
            item = {"input_seed": s, "kept": kept}
            if i < LOGIT_IMAGES:
                item["logits"] = [round(float(v), LOGIT_DECIMALS) for v in logits[0]]
            images.append(item)
            print(f"{name} image {s}: K'+1 per block {[len(k) for k in kept]}", file=sys.stderr)
    return {"name": name, "preset": preset_name, "seed": seed, "qk_gain": gain, "qkv_bias": qkv_bias, "images": images}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--authors-repo", type=Path, required=True, help="checkout or export of their repository")
    ap.add_argument("--authors-commit", help="commit of the export (read with git when the repo is a checkout)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument(
        "--images", type=int, default=IMAGES, help="images per config (more for a one-off study, not the fixture)"
    )
    args = ap.parse_args(argv)
    repo = args.authors_repo.resolve()
    for f in AUTHORS_FILES:
        if not (repo / f).is_file():
            raise SystemExit(f"{repo} does not look like their repository: {f} is missing")
    commit = authors_commit(repo, args.authors_commit)
    sys.path.insert(0, str(REPO_ROOT))  # our package (numpy-only parts: presets, default_checkpoint)

    import torch

    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)))
    vit_mod, ats_block_mod, timm_note = import_authors(repo)
    rec = Recorder(ats_block_mod)
    rec.install()
    base = read_authors_vit_cfg(repo)
    assert base["DROP_TOKENS"] is True and base["ATS_BLOCKS"] == list(range(3, 12)), base
    assert all(k == 197 for k in base["NUM_TOKENS"]), base["NUM_TOKENS"]

    with tempfile.TemporaryDirectory() as td:
        configs = [run_config(vit_mod, rec, base, entry, Path(td), args.images) for entry in CONFIGS]

    doc = {
        "tool": "tools/authors_reference.py",
        "tool_version": TOOL_VERSION,
        "authors_repo": AUTHORS_URL,
        "authors_commit": commit,
        "authors_files_sha256": {f: hashlib.sha256((repo / f).read_bytes()).hexdigest() for f in AUTHORS_FILES},
        "torch": torch.__version__,
        "numpy": np.__version__,
        "timm": timm_note,
        "settings": {
            "batch_size": 1,
            "ats_blocks": base["ATS_BLOCKS"],
            "num_tokens": base["NUM_TOKENS"][: len(base["ATS_BLOCKS"])],
            "drop_tokens": base["DROP_TOKENS"],
            "authors_config": "configs/ImageNet/DeiT_S.yaml (VIT section), EMBED_DIM/NUM_HEADS/QKV_BIAS per preset",
        },
        "input": {
            "shape": list(INPUT_SHAPE),
            "recipe": "numpy.random.default_rng(input_seed).normal(0.0, 1.0, shape).astype(float32), no normalisation",
        },
        "weights": "ats_deploy.model.default.default_checkpoint(seed, preset(name, qkv_bias=...), qk_gain=...)",
        "kept_format": "per ATS block: original token ids, CLS (0) first, then their output order (ascending score)",
        "logits": f"first {LOGIT_IMAGES} images per config, rounded to {LOGIT_DECIMALS} decimals",
        "configs": configs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    tmp_out.replace(args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
