"""The official ATS rule: hand vectors, float64 sweep, bit-exact float32 agreement, edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ats_deploy.model.ats import select_tokens, token_scores
from ats_deploy.model.reference import near_boundary, select_one, select_reference


def test_scoring_vector(vectors):
    tv = vectors["scoring"]
    attn = torch.tensor(tv["cls_attention"], dtype=torch.float32)[None]  # [1, H, n]
    v = torch.tensor(tv["values"], dtype=torch.float32)[None]  # [1, H, n, d]
    r = token_scores(attn, v)[0, 1:]
    s = (r / r.sum()).numpy()
    np.testing.assert_allclose(s, tv["expected_scores_tokens_1_to_3"], atol=1e-6)
    assert not np.allclose(s, tv["wrong_formula_for_reference"]["per_head_norm_sum"], atol=1e-3)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_sampling_vectors_reference(vectors, dtype):
    for case in vectors["sampling"]:
        row = np.array([0.0] + case["scores"])
        kept = select_one(row, len(row), k_max=case["k"], n_ref=case["n_ref"], dtype=dtype).kept
        assert kept.tolist() == case["expected_kept"]


def test_sampling_vectors_torch(vectors):
    for case in vectors["sampling"]:
        row = torch.tensor([[0.0] + case["scores"]])
        idx, cnt = select_tokens(row, torch.tensor([row.shape[1]]), k_max=case["k"], n_ref=case["n_ref"])
        assert int(cnt[0]) == 1 + len(case["expected_kept"])
        assert idx[0, : int(cnt[0])].tolist() == [0] + case["expected_kept"]
        assert idx[0, int(cnt[0]) :].eq(0).all()  # padding points at CLS


def _random_case(rng, n):
    alpha = rng.choice([0.02, 0.1, 0.5, 1.0, 5.0])
    return rng.dirichlet(np.full(n, alpha)).astype(np.float32)


def test_float64_sweep_agrees_except_near_boundary():
    """Thousands of Dirichlet score vectors, n up to 577: float32 torch vs the float64 rule."""
    rng = np.random.default_rng(2022)
    total = disagreements = excused = 0
    for n in (2, 3, 10, 50, 197, 300, 577):
        for k in (2, 3, 50, 99, 197, 577):
            b = 64 if n <= 197 else 24
            scores = np.stack([_random_case(rng, n) for _ in range(b)])
            count = rng.integers(1, n + 1, size=b)
            count[: b // 2] = n
            idx, cnt = select_tokens(torch.from_numpy(scores), torch.from_numpy(count), k_max=k, n_ref=197)
            ref_idx, ref_cnt = select_reference(scores.astype(np.float64), count, k_max=k, n_ref=197)
            for i in range(b):
                total += 1
                same = int(cnt[i]) == ref_cnt[i] and (idx[i].numpy() == ref_idx[i]).all()
                if not same:
                    disagreements += 1
                    assert near_boundary(scores[i].astype(np.float64), int(min(count[i], n)), k_max=k, n_ref=197), (
                        f"n={n} k={k} image {i}: float32 differs from float64 away from any decision boundary"
                    )
                    excused += 1
    assert total >= 2000
    print(f"float64 sweep: {total} vectors, {disagreements} differ, all within 1e-5 of a boundary ({excused})")


def test_torch_matches_float32_reference_bit_for_bit():
    rng = np.random.default_rng(5)
    for n in (2, 9, 50, 197, 577):
        for k in (2, 50, 108, 197, 577):
            scores = np.stack([_random_case(rng, n) for _ in range(16)])
            scores[1] = 0.25  # all tied
            scores[2, 5:] = 0.0  # zero-score tail
            count = rng.integers(1, n + 1, size=16)
            count[:3] = n
            idx, cnt = select_tokens(torch.from_numpy(scores), torch.from_numpy(count), k_max=k, n_ref=197)
            r_idx, r_cnt = select_reference(scores, count, k_max=k, n_ref=197, dtype=np.float32)
            np.testing.assert_array_equal(idx.numpy(), r_idx)
            np.testing.assert_array_equal(cnt.numpy(), r_cnt)


def test_invariants():
    rng = np.random.default_rng(11)
    for _ in range(50):
        n = int(rng.integers(3, 200))
        s = _random_case(rng, n)
        s[0] = 0.0
        for k in (2, 10, 197):
            d = select_one(s, n, k_max=k, n_ref=197, dtype=np.float32)
            kept = d.kept.tolist()
            assert len(kept) <= min(k, 197) - 1
            assert len(set(kept)) == len(kept)
            order = d.order.tolist()
            assert order[0] not in kept, "the lowest-scored token is never kept"
            if k > 2 or n == 3:
                assert order[1] in kept or s[order[1]] == 0, "the second-lowest (c0 holder) is kept"
            pos = [order.index(t) for t in kept]
            assert pos == sorted(pos), "kept tokens come in ascending-score order"


def test_edge_cases():
    # one valid patch -> keep it
    idx, cnt = select_tokens(torch.tensor([[0.0, 0.7, 0.2, 0.1]]), torch.tensor([2]), k_max=4, n_ref=4)
    assert idx.tolist() == [[0, 1, 0, 0]] and cnt.tolist() == [2]
    # no valid patch -> CLS only
    idx, cnt = select_tokens(torch.tensor([[0.0, 0.7, 0.2]]), torch.tensor([1]), k_max=3, n_ref=3)
    assert idx.tolist() == [[0, 0, 0]] and cnt.tolist() == [1]
    # all-equal scores: all but the lowest by index
    idx, cnt = select_tokens(torch.full((1, 6), 0.2), torch.tensor([6]), k_max=197, n_ref=197)
    assert idx[0, : int(cnt[0])].tolist() == [0, 2, 3, 4, 5]
    # all-zero scores behave as all-equal
    idx0, cnt0 = select_tokens(torch.zeros(1, 6), torch.tensor([6]), k_max=197, n_ref=197)
    assert idx0.tolist() == idx.tolist() and cnt0.tolist() == cnt.tolist()
    # all-equal with fewer grid points than tokens: only M evenly spread tokens
    idx, cnt = select_tokens(torch.full((1, 21), 1.0), torch.tensor([21]), k_max=6, n_ref=197)
    assert int(cnt[0]) - 1 == 5
    # padding slots are excluded even with large scores
    s = torch.tensor([[0.0, 0.1, 0.2, 0.3, 9.0, 9.0]])
    idx, cnt = select_tokens(s, torch.tensor([4]), k_max=6, n_ref=6)
    assert set(idx[0, 1 : int(cnt[0])].tolist()) <= {1, 2, 3}


def test_batch_independence():
    rng = np.random.default_rng(9)
    n = 197
    scores = np.stack([_random_case(rng, n) for _ in range(8)])
    count = np.array([197, 150, 197, 10, 2, 197, 99, 1])
    idx, cnt = select_tokens(torch.from_numpy(scores), torch.from_numpy(count), k_max=120, n_ref=197)
    for i in range(8):
        one, c1 = select_tokens(
            torch.from_numpy(scores[i : i + 1]), torch.from_numpy(count[i : i + 1]), k_max=120, n_ref=197
        )
        assert torch.equal(one[0], idx[i]) and int(c1[0]) == int(cnt[i])


def test_static_slots_and_counts():
    scores = torch.rand(4, 50)
    idx, cnt = select_tokens(scores, torch.full((4,), 50), k_max=20, n_ref=197)
    assert idx.shape == (4, 20) and cnt.max() <= 20
    idx, cnt = select_tokens(scores, torch.full((4,), 50), k_max=197, n_ref=197)
    assert idx.shape == (4, 50)  # K_out = min(K, n)


def test_reference_outputs_have_the_contract_dtypes():
    """indices and count_out are int32 (the contract's, the plugin's and the kernel's), whatever the input."""
    idx, cnt = select_reference(np.random.default_rng(0).random((3, 9)), np.array([9, 4, 1]), k_max=5, n_ref=197)
    assert idx.dtype == np.int32 and cnt.dtype == np.int32 and idx.shape == (3, 5)
