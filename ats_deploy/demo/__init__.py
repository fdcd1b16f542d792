"""A trained demo: procedural shapes images, a DeiT-Ti trained on them, and its dense-vs-ATS evaluation.

Modules (import them directly; nothing here imports torch):
- ``shapes``: the dataset, fully determined by (seed, index), and PNG export for ``--inputs``.
- ``train``: the training recipe (low-resolution phase, then 224 fine-tune), checkpoints, throughput.
- ``evaluate``: top-1, mean K' per ATS block and GFLOPs per image, dense vs ATS.
- ``weights``: the shipped fp16 weights (``weights/deit_tiny_shapes.safetensors``) and their export.
"""
