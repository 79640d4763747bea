"""Ranking metrics on numpy arrays (AUC through scikit-learn, HIT@k per request)."""

from __future__ import annotations

import numpy as np


def roc_auc(labels: np.ndarray | list, scores: np.ndarray | list) -> float:
    """Area under the ROC curve (scikit-learn's ``roc_auc_score``; tied scores count half).

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
    if y.size == 0 or y.min() == y.max():
        return float("nan")
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y.astype(np.int64), s))


def hit_at_k(labels: np.ndarray | list, scores: np.ndarray | list, groups: np.ndarray | list, k: int = 3) -> float:
    """HIT@k as the TransAct papers report it, per request.

    For every request (``groups`` value) with at least one positive and more than ``k``
    candidates: the share of its top ``k`` slots (by score) that hold a positive, out of
    the most it could hold, ``min(k, positives)``. Mean over those requests; NaN when none
    qualifies. Ties are broken by candidate order (stable sort), so a constant scorer
    does not score as a perfect one by accident.

    Args:
        labels: (n,) 0/1 labels of one action.
        scores: (n,) the model's scores for that action.
        groups: (n,) request of each candidate.
        k: the cut-off.
    """
    y = np.asarray(labels).reshape(-1).astype(bool)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    g = np.asarray(groups).reshape(-1)
    if not (y.shape == s.shape == g.shape):
        raise ValueError(f"hit_at_k: labels/scores/groups have {y.size}/{s.size}/{g.size} values")
    if k < 1:
        raise ValueError(f"hit_at_k: k must be ≥ 1, got {k}")
    _, gid = np.unique(g, return_inverse=True)
    order = np.lexsort((-s, gid))  # by request, then score descending; stable on ties
    gid_sorted, y_sorted = gid[order], y[order]
    starts = np.flatnonzero(np.r_[True, gid_sorted[1:] != gid_sorted[:-1]])
    sizes = np.diff(np.r_[starts, gid_sorted.size])
    rank = np.arange(gid_sorted.size) - np.repeat(starts, sizes)  # 0-based rank within the request
    pos = np.bincount(gid_sorted, weights=y_sorted, minlength=len(starts))
    hits = np.bincount(gid_sorted, weights=y_sorted & (rank < k), minlength=len(starts))
    keep = (pos > 0) & (sizes > k)
    if not keep.any():
        return float("nan")
    return float(np.mean(hits[keep] / np.minimum(k, pos[keep])))
