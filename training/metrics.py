"""Ranking metrics (numpy only, so data-side code can use them without torch)."""

from __future__ import annotations

import numpy as np


def roc_auc(labels: np.ndarray | list, scores: np.ndarray | list) -> float:
    """Area under the ROC curve, rank based (Mann-Whitney U), tied scores get their average rank.

    AUC = P(score of a random positive > score of a random negative) + 0.5 * P(tie).

    Args:
        labels: 0/1 (or bool) labels, shape (n,).
        scores: real scores, shape (n,); higher means more likely positive.

    Returns:
        The AUC in [0, 1], or NaN when the labels hold only one class.

    Raises:
        ValueError: shapes differ, labels are not 0/1, or scores are not finite.
    """
    y = np.asarray(labels).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"roc_auc: labels have {y.shape[0]} values but scores have {s.shape[0]}")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError("roc_auc: labels must be 0/1")
    if not np.isfinite(s).all():
        raise ValueError("roc_auc: scores must be finite (found NaN or inf)")
    y = y.astype(bool)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    # Average 1-based rank of each run of equal scores.
    starts = np.concatenate([[0], np.flatnonzero(np.diff(sorted_s)) + 1])
    ends = np.concatenate([starts[1:], [s.size]])
    avg_rank = (starts + 1 + ends) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(s.size, dtype=np.float64)
    ranks[order] = np.repeat(avg_rank, ends - starts)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))
