"""Parity reports accuracy against true labels where the inputs know them (generated demo images)."""

from __future__ import annotations

import numpy as np

from ats_deploy.demo.shapes import HELDOUT_SEED, TRAIN_SEED, label_of
from ats_deploy.inputs import input_labels
from ats_deploy.reports.parity import compare_outputs, format_parity


def _out(pred: list[int]) -> dict:
    logits = np.zeros((len(pred), 3), np.float32)
    logits[np.arange(len(pred)), pred] = 1.0
    return {"logits": logits}


def test_accuracy_of_both_sides_against_labels():
    ref, got = _out([0, 1, 2, 1]), _out([0, 1, 1, 1])
    res = compare_outputs(ref, got, blocks=[], labels=np.array([0, 1, 2, 0]))
    assert res.labelled == 4 and res.ref_accuracy == 0.75 and res.accuracy == 0.5
    assert "reference 75.00%, this backend 50.00%" in format_parity(res)
    # Only the first len(labels) images are labelled (the rest may be batch padding).
    res = compare_outputs(ref, got, blocks=[], labels=np.array([0, 0]))
    assert res.labelled == 2 and res.ref_accuracy == 0.5 and res.accuracy == 0.5
    plain = compare_outputs(ref, got, blocks=[])
    assert plain.labelled == 0 and plain.accuracy is None and "true labels" not in format_parity(plain)


def test_input_labels_know_generated_images_only(tmp_path):
    assert input_labels("shapes:heldout:5", None, 5).tolist() == [label_of(HELDOUT_SEED, i) for i in range(5)]
    assert input_labels("shapes:5", None, 5).tolist() == [label_of(HELDOUT_SEED, i) for i in range(5)]
    assert input_labels("shapes:train:3", None, 3).tolist() == [label_of(TRAIN_SEED, i) for i in range(3)]
    assert input_labels(None, {"kind": "demo"}, 4).tolist() == [label_of(HELDOUT_SEED, i) for i in range(4)]
    assert input_labels(None, {"kind": "checkpoint"}, 4) is None
    assert input_labels(tmp_path, {"kind": "demo"}, 4) is None  # a user's folder: labels unknown
