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
