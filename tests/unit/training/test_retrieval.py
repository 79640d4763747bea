"""HR/NDCG/MRR and the two ranking protocols against hand-computed tiny cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.retrieval import (
    paired_comparison,
    per_user_metric,
    ranks_full,
    ranks_full_excluding,
    ranks_sampled,
    retrieval_metrics,
)


def test_metrics_of_hand_computed_ranks() -> None:
    m = retrieval_metrics([0, 1, 4, 20], ks=(1, 5))
    assert m["hr@1"] == pytest.approx(0.25)
    assert m["hr@5"] == pytest.approx(0.75)
    assert m["ndcg@1"] == pytest.approx(0.25)  # only rank 0 counts, gain 1
    assert m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6)) / 4)
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 5 + 1 / 21) / 4)
    assert m["n"] == 4


def test_metrics_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="no ranks"):
        retrieval_metrics([])
    with pytest.raises(ValueError, match="≥ 0"):
        retrieval_metrics([-1])


def test_full_ranking_removes_the_users_other_items_but_never_the_target() -> None:
    scores = torch.tensor(
        [
            [0.9, 0.8, 0.7, 0.1],  # target col 2: cols 0 and 1 above it
            [0.9, 0.8, 0.7, 0.1],
        ]
    )
    targets = torch.tensor([2, 2])
    exclude = torch.tensor(
        [[False, False, False, False], [True, False, True, False]]
    )  # row 1 saw item 0 (and the target)
    assert ranks_full(scores, targets).tolist() == [2.0, 2.0]
    assert ranks_full(scores, targets, exclude).tolist() == [2.0, 1.0]


def test_ties_count_half() -> None:
    scores = torch.tensor([[0.5, 0.5, 0.5, 0.5]])
    assert ranks_full(scores, torch.tensor([1])).tolist() == [1.5]  # 3 ties → middle of 0..3
    assert ranks_sampled(torch.tensor([0.5]), torch.tensor([[0.5, 0.1, 0.9]])).tolist() == [1.5]


def test_sampled_protocol_counts_only_the_samples() -> None:
    target = torch.tensor([0.6, 0.0])
    negs = torch.tensor([[0.1, 0.7, 0.2], [0.1, 0.2, 0.3]])
    assert ranks_sampled(target, negs).tolist() == [1.0, 3.0]
    m = retrieval_metrics(ranks_sampled(target, negs), ks=(1, 2))
    assert m["hr@2"] == pytest.approx(0.5) and m["hr@1"] == 0.0
    assert np.isclose(m["ndcg@2"], 0.5 / math.log2(3))


def test_per_user_metrics_average_to_the_reported_ones() -> None:
    ranks = np.array([0.0, 1.5, 4.0, 9.0, 10.0, 200.0])
    m = retrieval_metrics(ranks)
    for name in ("hr@10", "ndcg@10", "hr@200", "ndcg@50", "mrr"):
        assert per_user_metric(ranks, name).mean() == pytest.approx(m[name])
    with pytest.raises(ValueError, match="metric"):
        per_user_metric(ranks, "recall@10")


def test_paired_comparison_of_hand_computed_ranks() -> None:
    a = np.array([0, 3, 20, 5])  # model A
    b = np.array([1, 3, 2, 30])  # model B: worse on users 0 and 3, better on user 2
    out = paired_comparison(a, b, metrics=("hr@10", "mrr"))
    assert out["n_users"] == 4
    hr = out["hr@10"]
    d = np.array([0.0, 0.0, 1.0, -1.0])  # b - a per user
    assert (hr["a"], hr["b"], hr["diff"]) == (0.75, 0.75, 0.0)
    assert hr["se"] == pytest.approx(d.std(ddof=1) / 2.0)
    assert (hr["b_better"], hr["a_better"]) == (1, 1)
    mrr = out["mrr"]
    d = 1 / (b + 1) - 1 / (a + 1)
    assert mrr["diff"] == pytest.approx(d.mean())
    assert mrr["ci95"] == pytest.approx([d.mean() - 1.96 * d.std(ddof=1) / 2, d.mean() + 1.96 * d.std(ddof=1) / 2])
    assert mrr["z"] == pytest.approx(d.mean() / (d.std(ddof=1) / 2))
    assert paired_comparison(a, a)["ndcg@10"]["z"] is None  # no difference anywhere
    with pytest.raises(ValueError, match="same users"):
        paired_comparison(a, b[:3])


def test_ranks_full_excluding_equals_the_mask_reference() -> None:
    g = torch.Generator().manual_seed(0)
    n_users, n_items = 40, 300
    scores = torch.randint(0, 25, (n_users, n_items), generator=g).float()  # many ties
    targets = torch.randint(0, n_items, (n_users,), generator=g)
    exclude = torch.rand(n_users, n_items, generator=g) < 0.2
    exclude[:5, :] = True  # every item removed for some users, the target included: it stays
    exclude[5, :] = False  # and none for one
    want = ranks_full(scores, targets, exclude)
    rows, cols = exclude.nonzero(as_tuple=True)
    got = ranks_full_excluding(scores.clone(), targets, rows, cols)
    assert torch.equal(got, want)
    assert torch.equal(got[:5], torch.zeros(5))  # only the target left
