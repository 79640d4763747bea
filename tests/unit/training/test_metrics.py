"""roc_auc against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.metrics import roc_auc


def test_perfect_and_reversed_ranking():
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert roc_auc([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9]) == 0.0


def test_hand_case_without_ties():
    # positives 0.35, 0.8; negatives 0.1, 0.4 -> pairs won: (0.35>0.1), (0.8>0.1), (0.8>0.4) = 3 of 4
    assert roc_auc([0, 1, 0, 1], [0.1, 0.35, 0.4, 0.8]) == pytest.approx(0.75)


def test_ties_count_half():
    # positive 0.5 ties negative 0.5 (half), beats negative 0.2 -> (1 + 0.5) / 2
    assert roc_auc([1, 0, 0], [0.5, 0.5, 0.2]) == pytest.approx(0.75)
    # all scores equal -> 0.5
    assert roc_auc([1, 0, 1, 0, 0], [3, 3, 3, 3, 3]) == pytest.approx(0.5)
    # 2 positives {0.7, 0.5}, 3 negatives {0.7, 0.5, 0.1}: 0.7 beats 0.5,0.1 ties 0.7 -> 2.5;
    # 0.5 beats 0.1 ties 0.5 -> 1.5; total 4 of 6
    assert roc_auc([1, 1, 0, 0, 0], [0.7, 0.5, 0.7, 0.5, 0.1]) == pytest.approx(4 / 6)


def test_matches_pairwise_definition_on_random_data():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.random(200), 1)  # many ties
    pos, neg = s[y == 1], s[y == 0]
    want = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg))
    assert roc_auc(y, s) == pytest.approx(want)


def test_single_class_is_nan_and_bad_input_raises():
    assert math.isnan(roc_auc([1, 1], [0.2, 0.3]))
    with pytest.raises(ValueError, match="labels have 2 values but scores have 3"):
        roc_auc([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="0/1"):
        roc_auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="finite"):
        roc_auc([0, 1], [0.1, float("nan")])


def test_hit_at_3_hand_computed():
    from training.metrics import hit_at_k

    groups = [0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3]
    labels = [1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0]
    scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.1, 0.2, 0.3, 0.4, 0.9, 0.1]
    # request 0: positives at ranks 1 and 5 → 1 of min(3, 2) = 0.5; request 1: its positive is last → 0;
    # request 2: no positive (skipped); request 3: only 2 candidates ≤ k (skipped)
    assert hit_at_k(labels, scores, groups, k=3) == pytest.approx(0.25)
    assert hit_at_k(labels, np.asarray(labels, float), groups, k=3) == pytest.approx(1.0)
    assert math.isnan(hit_at_k([0, 0, 0, 0], [1, 2, 3, 4], [0, 0, 0, 0]))
    with pytest.raises(ValueError, match="values"):
        hit_at_k([1, 0], [0.1], [0, 0])
